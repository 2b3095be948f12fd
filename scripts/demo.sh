#!/usr/bin/env bash
# README's first command: install what is needed (into ./.venv unless a venv is active)
# and run a real Spectrum fine-tune of SmolLM2-135M-Instruct on the KJV Bible, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
# The Trainer imports DeepSpeed when it is installed; without a GPU it would announce
# "Setting accelerator to CPU" although the demo does not use it.
command -v nvidia-smi >/dev/null 2>&1 || export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
python scripts/demo.py "$@"
