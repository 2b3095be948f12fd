#!/usr/bin/env bash
# The GPU measurements of issue #15, for a session with a lent GPU machine (15 minutes of
# device time, starts included): two device calls, the second right after the first, while
# the machine is still warm (it keeps /tmp for about 30 s after a call).
#
#   bash scripts/gpu_checks.sh A   # ~5 min: rehearsal of the Trainer checks on a tiny model
#                                  # (torch, ZeRO-3, ZeRO-2), eigen-solver options, the 8B-shape
#                                  # scan, the 2 B-parameter training step; stashes GGUF part 1
#   bash scripts/gpu_checks.sh B   # ~2 min: real SmolLM2 Trainer runs, torch / ZeRO-3 / ZeRO-2
#
# What the device machine lacks travels in ignored folders named in the call's `carry`
# (see docs/gpu.md): .whl (deepspeed 0.19.8 built here as a pure-Python wheel, pydantic and
# its kin, transformers 5.24.0, peft 0.21.2, gguf), .gpu_assets/A (the first 42 MB of the
# SmolLM2 GGUF) and .gpu_assets/B (the rest, gguf's wheel and kjv.jsonl.gz). Install them
# first:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
# Results: every log and JSON goes to $STASH/out_<A|B>, packed after each step into
# $OUT/results_<A|B>.tgz (the device tool brings back at most 8 files from $OUT, its folder
# that comes back; runs/gpu by default). Each step has its own time limit, so one slow
# step cannot eat the others' time. Smoke test on a CPU:
#
#   DEVICE=cpu SHAPES=toy PRESET=cpu EIG_K=256 STEPS=6 UPDATE_EVERY=3 BASELINE_LAYERS=2 bash scripts/gpu_checks.sh A
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
DEVICE=${DEVICE:-cuda}
SHAPES=${SHAPES:-8b}                  # bench_analyzer shapes: Llama-3-8B (32 layers, 224 matrices)
BASELINE_LAYERS=${BASELINE_LAYERS:-8}  # per-matrix svdvals timed on these layers, extrapolated to 32
PRESET=${PRESET:-cuda}                # bench_train model: Llama-3-8B widths, 8 layers, batch 4 x 2048
EIG_K=${EIG_K:-4096,1024}
STEPS=${STEPS:-40}
UPDATE_EVERY=${UPDATE_EVERY:-20}
STASH=${STASH:-/tmp/spectrum_gpu}     # survives between two calls on a warm machine
what=${1:-A}
RES=$STASH/out_$what
mkdir -p "$OUT" "$STASH" "$RES"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$STASH/torch_extensions}
PY=${PYTHON:-python3}
status=0

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout -k 15 "$limit" "$@" >"$RES/$name.log" 2>&1
    local rc=$?
    tail -n 12 "$RES/$name.log"
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    [ $rc -eq 0 ] || status=1
    pack
}

pack() { tar czf "$OUT/results_$what.tgz" -C "$RES" . ; }

versions() {
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

trainer_checks() {  # trainer_checks MODEL PREFIX EXTRA...: the three engines at once (one GPU, small models)
    local model=$1 prefix=$2
    shift 2
    local pids=() e
    for e in torch zero3 zero2; do
        timeout -k 15 "${CHECK_LIMIT:-300}" $PY scripts/gpu_trainer_check.py --device "$DEVICE" --model "$model" --engine $e \
            --json "$RES/${prefix}_$e.json" "$@" >"$RES/${prefix}_$e.log" 2>&1 &
        pids+=($!)
    done
    for i in 0 1 2; do
        wait "${pids[$i]}" || status=1
    done
    grep -hE "^(torch|zero2|zero3) |Error|error" "$RES"/${prefix}_*.log | tail -n 30
    pack
}

if [ "$what" = A ]; then
    versions | tee "$RES/versions.txt"
    if [ -f .gpu_assets/A/gguf.part1 ]; then cp .gpu_assets/A/gguf.part1 "$STASH/"; fi
    echo "== rehearsal: tiny random Llama through the Trainer checks"
    CHECK_LIMIT=150 trainer_checks tiny rehearsal --steps 12 --update-every 4 --batch 4 --seq 64 --lr 3e-3 --modes static,dynamic
    step eig 100 $PY scripts/bench_eig_gpu.py --device "$DEVICE" --k "$EIG_K" --batch 4 --repeat 1 \
        --json "$RES/bench_eig_${DEVICE}.json"
    step analyzer 240 $PY scripts/bench_analyzer.py --device "$DEVICE" --shapes "$SHAPES" --repeat 1 \
        --reference gram64 --baseline-layers "$BASELINE_LAYERS" --json "$RES/bench_analyzer_${DEVICE}_${SHAPES}.json"
    step train 220 $PY scripts/bench_train.py --device "$DEVICE" --preset "$PRESET" --steps "$STEPS" \
        --update-every "$UPDATE_EVERY" --json "$RES/bench_train_${DEVICE}.json" --plot "$RES/bench_train_${DEVICE}.png"
    echo "== rehearsal verdict:"; grep -h " ok=" "$RES"/rehearsal_*.log
fi
if [ "$what" = B ]; then
    versions | tee "$RES/versions.txt"
    gguf="$STASH/SmolLM2-135M-Instruct.Q4_1.gguf"
    cat "$STASH/gguf.part1" .gpu_assets/B/gguf.part2 >"$gguf" || exit 3
    echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $gguf" | sha256sum -c - || exit 3
    gunzip -c .gpu_assets/B/kjv.jsonl.gz >"$STASH/kjv.jsonl"
    export SPECTRUM_SMOLLM2_GGUF=$gguf SPECTRUM_KJV_JSONL=$STASH/kjv.jsonl SPECTRUM_CACHE=$STASH/cache
    # Dequantize once (the three engines then load the cached plain checkpoint).
    step dequantize 120 $PY -c "from spectrum_study.assets import smollm2_dir; print(smollm2_dir())"
    trainer_checks smollm2 trainer --steps "${TRAINER_STEPS:-40}" --update-every "${TRAINER_UPDATE_EVERY:-8}" \
        --batch "${TRAINER_BATCH:-8}" --seq "${TRAINER_SEQ:-256}" --full-steps "${TRAINER_FULL_STEPS:-12}"
fi
pack
ls -l "$RES" "$OUT"
exit $status
