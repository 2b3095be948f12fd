#!/usr/bin/env bash
# Issue #14's GPU check: the Trainer's own FSDP2 path (fsdp="full_shard", fsdp_version 2) on
# one GPU, bf16 mixed precision, activation checkpointing, a Llama of Llama-3-8B widths
# (4 layers, 1.1 B parameters, random init): full fine-tuning, static and dynamic Spectrum
# in one process (scripts/gpu_trainer_check.py). One device call, with .whl carried
# (transformers 5.24.0 and its kin; torch and accelerate come with the machine's image):
#
#   bash scripts/gpu_fsdp2.sh            # writes $OUT/trainer_wide_fsdp2.json and its log
#
# CPU rehearsal of the same script (accelerate runs DDP on CPU, so FSDP2 is forced, as in the
# tests): python scripts/gpu_trainer_check.py --device cpu --model tiny --engine fsdp2 \
#   --force-fsdp2-on-cpu --steps 8 --update-every 2 --gradient-checkpointing
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/versions.txt"
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)" | tee -a "$OUT/versions.txt"
timeout -k 15 "${LIMIT:-460}" python3 scripts/gpu_trainer_check.py --engine fsdp2 --model wide --layers "${LAYERS:-4}" \
    --gradient-checkpointing --batch 4 --seq 1024 --steps "${STEPS:-12}" --full-steps 8 --update-every 4 --lr 1e-3 \
    --json "$OUT/trainer_wide_fsdp2.json" 2>&1 | tee "$OUT/trainer_wide_fsdp2.log"
