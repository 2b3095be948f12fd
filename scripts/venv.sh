# Sourced by scripts/demo.sh and scripts/run_tests.sh from the repository root: enter
# ./.venv (created if missing) unless a virtual environment is active, then install what
# the project needs (scripts/setup_env.sh).
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  source .venv/bin/activate
fi
bash scripts/setup_env.sh
