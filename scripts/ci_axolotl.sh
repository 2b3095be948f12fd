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
log=$(mktemp)
set +e
.venv-axolotl/bin/python -m pytest -q -p no:cacheprovider tests/axolotl 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
summary=$(grep -E '[0-9]+ (passed|failed|errors?|skipped|deselected).* in [0-9.]+s' "$log" | tail -1 | tr -d '=' | xargs)
rm -f "$log"
line="axolotl plugin: $([ "$rc" -eq 0 ] && echo PASS || echo FAIL) (tests/axolotl: $summary; $(( $(date +%s) - t0 )) s; $(.venv-axolotl/bin/python scripts/ci_versions.py))"
echo "$line"
[ -z "${CI_SUMMARY:-}" ] || echo "$line" >> "$CI_SUMMARY"
exit "$rc"
