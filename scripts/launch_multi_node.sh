#!/usr/bin/env bash
# Spectrum + DeepSpeed ZeRO (or FSDP2) across several machines, from a DeepSpeed hostfile.
# FSDP2: LAUNCHER=torchrun, and your script sets TrainingArguments(fsdp="full_shard",
# fsdp_config={"fsdp_version": 2}) (DS_CONFIG is then unused).
#
#   scripts/launch_multi_node.sh HOSTFILE your_train.py [your args...]
#
# HOSTFILE lines look like "node1 slots=8" (DeepSpeed format); run this on the first host,
# which must reach the others by passwordless ssh (the deepspeed launcher uses pdsh/ssh).
# Every node needs the same code, environment and data paths.
#
# Environment:
#   DS_CONFIG    DeepSpeed config (default configs/ds_zero3.json)
#   MASTER_ADDR  address of the first host (default: first name in HOSTFILE)
#   MASTER_PORT  default 29500
#   LAUNCHER     deepspeed (default) | torchrun (then run this script on EVERY node with NODE_RANK set)
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,17p' "$0"; exit 2
fi
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
HOSTFILE="$1"; shift
SCRIPT="$1"; shift
[ -f "$HOSTFILE" ] || { echo "hostfile $HOSTFILE not found" >&2; exit 2; }
export DS_CONFIG="${DS_CONFIG:-$ROOT/configs/ds_zero3.json}"
MASTER_ADDR="${MASTER_ADDR:-$(grep -v '^\s*#' "$HOSTFILE" | awk 'NF{print $1; exit}')}"
PORT="${MASTER_PORT:-29500}"
NNODES="$(grep -v '^\s*#' "$HOSTFILE" | awk 'NF' | wc -l)"
SLOTS="$(grep -v '^\s*#' "$HOSTFILE" | awk 'NF' | head -1 | sed -n 's/.*slots=\([0-9]*\).*/\1/p')"
case "${LAUNCHER:-deepspeed}" in
  deepspeed)
    exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$PORT" \
      "$SCRIPT" "$@" ;;
  torchrun)
    : "${NODE_RANK:?set NODE_RANK (0..$((NNODES-1))) on each node}"
    exec torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="${SLOTS:-8}" \
      --master_addr="$MASTER_ADDR" --master_port="$PORT" "$SCRIPT" "$@" ;;
  *)
    echo "LAUNCHER=${LAUNCHER}: use deepspeed or torchrun" >&2; exit 2 ;;
esac
