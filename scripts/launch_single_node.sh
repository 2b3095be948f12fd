#!/usr/bin/env bash
# Spectrum + DeepSpeed ZeRO on one machine with N GPUs.
#
#   scripts/launch_single_node.sh N_GPUS your_train.py [your args...]
#
# your_train.py builds TrainingArguments(..., deepspeed=os.environ["DS_CONFIG"]) (or takes
# --deepspeed) and calls trainer.add_callback(SpectrumCallback(...)); see docs/deepspeed.md.
#
# Environment:
#   LAUNCHER   torchrun (default) | deepspeed | accelerate
#   DS_CONFIG  DeepSpeed config (default configs/ds_zero3.json; configs/ds_zero2.json for ZeRO-2)
#   ACCELERATE_CONFIG  for LAUNCHER=accelerate (default configs/accelerate_deepspeed_zero3.yaml)
#   MASTER_PORT        default 29500
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,14p' "$0"; exit 2
fi
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
NGPUS="$1"; shift
SCRIPT="$1"; shift
export DS_CONFIG="${DS_CONFIG:-$ROOT/configs/ds_zero3.json}"
LAUNCHER="${LAUNCHER:-torchrun}"
PORT="${MASTER_PORT:-29500}"
case "$LAUNCHER" in
  torchrun)
    exec torchrun --standalone --nproc_per_node="$NGPUS" "$SCRIPT" "$@" ;;
  deepspeed)
    exec deepspeed --num_gpus="$NGPUS" --master_port="$PORT" "$SCRIPT" "$@" ;;
  accelerate)
    CFG="${ACCELERATE_CONFIG:-$ROOT/configs/accelerate_deepspeed_zero3.yaml}"
    exec accelerate launch --config_file "$CFG" --num_processes "$NGPUS" --main_process_port "$PORT" "$SCRIPT" "$@" ;;
  *)
    echo "LAUNCHER=$LAUNCHER: use torchrun, deepspeed or accelerate" >&2; exit 2 ;;
esac
