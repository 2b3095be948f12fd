#!/usr/bin/env bash
# REDUCED quality study on a CPU (the full study, 300 steps of 16 x 256 tokens per
# configuration, needs a GPU).  Staged so that the most informative configurations
# finish first; every stage writes into the same resumable folder, so rerunning this
# script after an interruption skips what is done.  Reports (results.json, table.md,
# compare.png) are rebuilt after every stage from all finished configurations.
#
#   nice -n 10 scripts/run_study_cpu.sh [OUT]        (default OUT: runs/compare_cpu_reduced)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/compare_cpu_reduced}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread: the machine is shared, spinning OpenMP threads lose badly
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
COMMON=(--out "$OUT" --steps 60 --batch-size 4 --block-size 128 --eval-every 15 --eval-blocks 16
        --eval-batch-size 8 --update-every 15 --random-seeds 0 --threads ${OMP_NUM_THREADS})
run() {  # a failing stage is reported and the next one still runs
  echo "=== stage: $* ($(date +%T))"
  python -m spectrum_study.compare "${COMMON[@]}" "$@" || echo "=== stage FAILED with status $?: $*"
}
# 1. one lr per method (5e-5; LoRA 10x)
run --methods spectrum,full,random,lora,bottom,spectrum-dynamic --lrs 5e-5 --lora-lrs 5e-4
# 2. more random seeds at the same lr
run --methods random --random-seeds 1,2 --lrs 5e-5
# 3. a second, higher lr (cheapest methods first)
run --methods spectrum,random,lora,full --lrs 1.5e-4 --lora-lrs 1.5e-3
echo "=== done ($(date +%T))"
