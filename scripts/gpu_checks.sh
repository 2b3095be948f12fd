#!/usr/bin/env bash
# The GPU measurements of issue #4, for a session that has a GPU machine (about 15
# minutes of device time): two device calls, each well under the 10-minute call limit.
#
#   bash scripts/gpu_checks.sh analyzer   # eigen-solve and scan benchmarks, about 6-7 minutes on one H100
#   bash scripts/gpu_checks.sh train      # training benchmark, about 3-4 minutes
#   bash scripts/gpu_checks.sh            # both: up to 12.5 minutes, too long for one device call
#
# Results go to $OUT (the device tool's folder that comes back; runs/gpu by default):
# at most 8 files per part. It needs torch with CUDA, transformers and peft (the device
# image has them) and runs from the checkout without installing it (PYTHONPATH). Each
# step has its own time limit, so one slow step cannot eat the others' time; the
# analyzer benchmark writes its JSON after each phase, so a step cut short keeps what
# it measured. Estimates
# come from ../shared/design/landscape.md (fp32 svdvals of the 8B shapes: ~169 s). Smoke
# test on a CPU:
#
#   DEVICE=cpu SHAPES=toy PRESET=cpu EIG_K=256 STEPS=8 UPDATE_EVERY=4 bash scripts/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
DEVICE=${DEVICE:-cuda}
SHAPES=${SHAPES:-8b}          # bench_analyzer shapes: Llama-3-8B (32 layers, 224 matrices)
LAYERS_SVD64=${LAYERS_SVD64:-2}  # layers checked against float64 svdvals (slow on a GPU)
PRESET=${PRESET:-cuda}        # bench_train model: Llama-3-8B widths, 4 layers, batch 4 x 2048
EIG_K=${EIG_K:-4096}          # bench_eig_gpu matrix size
STEPS=${STEPS:-40}
UPDATE_EVERY=${UPDATE_EVERY:-20}
what=${1:-all}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
status=0

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout -k 15 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    [ $rc -eq 0 ] || status=1
}

$PY - <<'PYEOF' | tee "$OUT/versions.txt"
import platform, torch, transformers
print("python", platform.python_version(), "torch", torch.__version__, "transformers", transformers.__version__)
try:
    import peft
    print("peft", peft.__version__)
except ImportError:
    print("peft missing: bench_train's LoRA run will fail")
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), "cuda", torch.version.cuda)
PYEOF

if [ "$what" = all ] || [ "$what" = analyzer ]; then
    # First the eigen-solve alone (what the fast scan spends its time on): cusolver vs magma,
    # fp32 vs fp64, loop vs batched; it says where a faster scan could come from.
    step eig 90 $PY scripts/bench_eig_gpu.py --device "$DEVICE" --k "$EIG_K" --json "$OUT/bench_eig_${DEVICE}.json"
    # Whole model: fp32 svdvals per matrix (the original tool) vs the analyzer, errors against
    # float64 Gram eigenvalues; then a few layers against float64 svdvals itself.
    step analyzer_full 330 $PY scripts/bench_analyzer.py --device "$DEVICE" --shapes "$SHAPES" --repeat 1 \
        --reference gram64 --json "$OUT/bench_analyzer_${DEVICE}_${SHAPES}.json"
    step analyzer_svd64 100 $PY scripts/bench_analyzer.py --device "$DEVICE" --shapes "$SHAPES" --repeat 1 \
        --layers "$LAYERS_SVD64" --reference svd64 --json "$OUT/bench_analyzer_${DEVICE}_${SHAPES}_${LAYERS_SVD64}layers_svd64.json"
fi
if [ "$what" = all ] || [ "$what" = train ]; then
    step train 240 $PY scripts/bench_train.py --device "$DEVICE" --preset "$PRESET" --steps "$STEPS" \
        --update-every "$UPDATE_EVERY" --json "$OUT/bench_train_${DEVICE}.json" --plot "$OUT/bench_train_${DEVICE}.png"
fi
ls -l "$OUT"
exit $status
