#!/usr/bin/env bash
# The axolotl plugin with the real axolotl (tests/axolotl/): ./.venv-axolotl with axolotl 0.19
# and its pinned versions (scripts/ci_stack.sh axolotl --install-only), then `axolotl train`
# on CPU, static and dynamic, and the configs the plugin refuses. One summary line at the end
# (also appended to $CI_SUMMARY when set).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ci_stack.sh axolotl --install-only
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export SPECTRUM_AXOLOTL_TESTS=1 AXOLOTL_DO_NOT_TRACK=1 WANDB_MODE=disabled
t0=$(date +%s)
source scripts/ci_lib.sh
ci_pytest .venv-axolotl/bin/python -m pytest -q -p no:cacheprovider tests/axolotl
ci_report "axolotl plugin: $CI_VERDICT (tests/axolotl: $CI_TESTS; $(( $(date +%s) - t0 )) s; $(.venv-axolotl/bin/python scripts/ci_versions.py))"
exit "$CI_RC"
