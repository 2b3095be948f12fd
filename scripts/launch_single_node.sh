#!/usr/bin/env bash
# Spectrum + DeepSpeed ZeRO or FSDP2 on one machine with N GPUs.
#
#   scripts/launch_single_node.sh N_GPUS your_train.py [your args...]
#
# your_train.py calls trainer.add_callback(SpectrumCallback(...)). DeepSpeed: it builds
# TrainingArguments(..., deepspeed=os.environ["DS_CONFIG"]) (or takes --deepspeed); see
# docs/guide/engines.md. FSDP2: ENGINE=fsdp2 launches with accelerate and
# configs/accelerate_fsdp2.yaml (or, with LAUNCHER=torchrun, your script sets
# TrainingArguments(fsdp="full_shard", fsdp_config={"fsdp_version": 2})); README "FSDP2".
#
# Environment:
#   ENGINE     zero3 (default) | zero2 | fsdp2
#   LAUNCHER   torchrun (default; accelerate for ENGINE=fsdp2) | deepspeed | accelerate
#   DS_CONFIG  DeepSpeed config (default configs/ds_zero3.json; configs/ds_zero2.json for ENGINE=zero2)
#   ACCELERATE_CONFIG  for LAUNCHER=accelerate (default configs/accelerate_deepspeed_zero3.yaml,
#                      configs/accelerate_fsdp2.yaml for ENGINE=fsdp2)
#   MASTER_PORT        default 29500
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,21p' "$0"; exit 2
fi
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
NGPUS="$1"; shift
SCRIPT="$1"; shift
ENGINE="${ENGINE:-zero3}"
case "$ENGINE" in
  zero3) export DS_CONFIG="${DS_CONFIG:-$ROOT/configs/ds_zero3.json}"; DEFAULT_LAUNCHER=torchrun
         DEFAULT_ACC="$ROOT/configs/accelerate_deepspeed_zero3.yaml" ;;
  zero2) export DS_CONFIG="${DS_CONFIG:-$ROOT/configs/ds_zero2.json}"; DEFAULT_LAUNCHER=torchrun
         DEFAULT_ACC="$ROOT/configs/accelerate_deepspeed_zero3.yaml" ;;
  fsdp2) DEFAULT_LAUNCHER=accelerate; DEFAULT_ACC="$ROOT/configs/accelerate_fsdp2.yaml" ;;
  *) echo "ENGINE=$ENGINE: use zero3, zero2 or fsdp2" >&2; exit 2 ;;
esac
LAUNCHER="${LAUNCHER:-$DEFAULT_LAUNCHER}"
PORT="${MASTER_PORT:-29500}"
case "$LAUNCHER" in
  torchrun)
    exec torchrun --standalone --nproc_per_node="$NGPUS" "$SCRIPT" "$@" ;;
  deepspeed)
    exec deepspeed --num_gpus="$NGPUS" --master_port="$PORT" "$SCRIPT" "$@" ;;
  accelerate)
    CFG="${ACCELERATE_CONFIG:-$DEFAULT_ACC}"
    exec accelerate launch --config_file "$CFG" --num_processes "$NGPUS" --main_process_port "$PORT" "$SCRIPT" "$@" ;;
  *)
    echo "LAUNCHER=$LAUNCHER: use torchrun, deepspeed or accelerate" >&2; exit 2 ;;
esac
