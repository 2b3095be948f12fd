#!/usr/bin/env bash
# The selection-policy study on a CPU (do moving selections pay off?): real SmolLM2-135M,
# the setting of docs/results/compare_cpu_reduced.md but 200 steps, at the lr that was best
# there for Spectrum (1.5e-4), a new selection every 50 steps, 3 seeds for the seeded methods.
# Results: docs/results/policies.md. Resumable: every finished configuration is one JSON file
# under docs/results/compare_cpu_policies/runs/ (kept in git), so the study can be stopped and
# started again; the trainer's scratch folder (work/) is ignored by git.
#
#   nice -n 10 scripts/run_policy_study_cpu.sh [STREAM]
# STREAM (a or b, default both in turn) splits the list in two halves that can run side by
# side, one thread each, on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=docs/results/compare_cpu_policies
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
COMMON=(--out "$OUT" --steps 200 --batch-size 4 --block-size 128 --eval-every 25 --eval-blocks 16
        --eval-batch-size 8 --update-every 50 --threads 1 --lrs 1.5e-4)
run() {  # a failing stage is reported and the next one still runs
  echo "=== stage: $* ($(date +%T))"
  python -m spectrum_study.compare "${COMMON[@]}" "$@" || echo "=== stage FAILED with status $?: $*"
}
stream=${1:-ab}
if [[ $stream == *a* ]]; then
  run --methods spectrum,spectrum-rotate,lisa,cyclic,spectrum-dynamic --random-seeds 0
  run --methods lisa --random-seeds 1,2
  run --methods spectrum-dynamic --lrs 5e-5
fi
if [[ $stream == *b* ]]; then
  run --methods random --random-seeds 0,1,2
  run --methods spectrum-rotate-park,lisa-park,cyclic-park --random-seeds 0
  run --methods lisa-park --random-seeds 1,2
  run --methods full --random-seeds 0
fi
echo "=== done ($(date +%T))"
