#!/usr/bin/env bash
# The quality study on a CPU (python -m spectrum_study.fair): the offline SmolLM2-135M-Instruct,
# KJV with John and Acts held out, pydoc as the forgetting domain, 200 steps of 4 x 128 tokens,
# evaluated every 25 steps; each method over its own learning-rate grid, then 3 seeds at its
# best rate.  Resumable: every finished configuration is one JSON file under OUT/runs/ (kept
# in git); the scratch folder OUT/work/ is not.  Several hours of CPU: run it in the background.
# To end a sitting without losing a configuration in progress: touch OUT/work/stop (each
# stream finishes what it trains, then exits); this script removes it when it starts.
#
#   scripts/run_study_cpu.sh [STREAMS [ARGS...]]   STREAMS processes side by side (default 2), one
#                                         thread each, at nice 10; OUT (default docs/results/study_cpu);
#                                         ARGS go to python -m spectrum_study.fair.
# The long horizon (4 methods, one seed, each at its best rate in the finished study):
#   OUT=docs/results/study_cpu_600 scripts/run_study_cpu.sh 2 --steps 600 --eval-every 50 \
#       --at-best docs/results/study_cpu
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-docs/results/study_cpu}
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT/work"
rm -f "$OUT/work/stop"
STREAMS=${1:-2}
shift || true
for i in $(seq 1 "$STREAMS"); do
  nice -n 10 python -m spectrum_study.fair --out "$OUT" --threads 1 "$@" > "$OUT/work/stream$i.log" 2>&1 &
  sleep 120  # the first stream writes the baseline before the second starts
done
wait
python -m spectrum_study.fair --out "$OUT" --report-only "$@"
