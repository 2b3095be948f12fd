#!/usr/bin/env bash
# README's test command: installs what the tests need (into ./.venv unless a venv is
# active) and runs the whole suite (2 CPU cores: about 10 minutes): tests/unit and
# tests/distributed side by side (scripts/ci_lib.sh, ci_suite). Arguments go to both pytest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export DS_ACCELERATOR=cpu
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/spectrum_callback/torch_extensions}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
source scripts/ci_lib.sh
ci_suite python -q "$@"
echo "$CI_TESTS"
exit "$CI_RC"
