# Sourced by the one-call GPU scripts (gpu_fsdp2.sh, gpu_bench_switch.sh), from the repo root:
# installs the carried wheels (.whl: transformers 5.24.0, deepspeed 0.19.8 and their kin; torch
# and accelerate come with the device machine's image) into /tmp/site, sets PYTHONPATH and the
# offline switches, and makes $OUT.
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
