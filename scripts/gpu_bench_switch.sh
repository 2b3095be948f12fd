#!/usr/bin/env bash
# Issue #13 on one GPU: scripts/bench_switch.py with one process (NCCL, world size 1), device
# memory of a ZeRO-3 / ZeRO-2 switch and of start-up, at real widths. One device call with
# .whl carried (deepspeed 0.19.8 built as a pure-Python wheel, its kin, transformers 5.24.0):
#   bash scripts/gpu_bench_switch.sh      # writes $OUT/bench_switch_gpu.json and logs
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
# CONFIGS: "engine hidden [--bf16]" items
for cfg in ${CONFIGS:-"zero2 4096" "zero2 4096 --bf16" "zero3 4096" "zero3 4096 --bf16"}; do
    set -- $cfg
    tag="$1_$2${3:+_bf16}"
    echo "== $1 hidden $2 ${3:-}"
    timeout -k 10 "${LIMIT:-150}" python3 scripts/bench_switch.py --engine "$1" --hidden "$2" ${3:-} --nproc 1 \
        --device cuda --json "$OUT/bench_switch_gpu.json" >"$OUT/bench_switch_$tag.log" 2>&1
    echo "   exit $?"; tail -n 4 "$OUT/bench_switch_$tag.log"
done
