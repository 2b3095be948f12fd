# Sourced by .ci/run, scripts/run_tests.sh, scripts/ci_stack.sh and scripts/ci_axolotl.sh.
#
# ci_pytest CMD...   runs CMD (a pytest run) with its output on the terminal, and sets
#                    CI_RC (its exit status), CI_VERDICT (PASS or FAIL) and CI_TESTS
#                    (pytest's closing "N passed, ... in Xs" line).
# ci_suite PY ARGS.. the suite's two halves side by side (below).
# ci_report LINE     prints LINE and appends it to $CI_SUMMARY when that is set.
ci_pytest() {
  local log
  log=$(mktemp)
  set +e
  "$@" 2>&1 | tee "$log"
  CI_RC=${PIPESTATUS[0]}
  set -e
  CI_TESTS=$(_ci_closing_line "$log")
  rm -f "$log"
  if [ "$CI_RC" -eq 0 ]; then CI_VERDICT=PASS; else CI_VERDICT=FAIL; fi
}

ci_report() {
  echo "$1"
  [ -z "${CI_SUMMARY:-}" ] || echo "$1" >> "$CI_SUMMARY"
}

# ci_suite PY [PYTEST_ARGS...]
#                    the suite as two pytest runs side by side, so that the single-process
#                    tests use the core the multi-process ones leave idle: tests/distributed
#                    (2-process launches, one after another; output on the terminal) and
#                    tests/unit (one process; its output follows when both are done). Sets
#                    CI_RC (0 only if both passed), CI_VERDICT and CI_TESTS (both closing lines).
ci_suite() {
  local py=$1 ulog dlog upid urc drc
  shift
  ulog=$(mktemp)
  dlog=$(mktemp)
  set +e
  "$py" -m pytest "$@" tests/unit > "$ulog" 2>&1 &
  upid=$!
  trap 'kill "$upid" 2>/dev/null' INT TERM
  "$py" -m pytest "$@" tests/distributed 2>&1 | tee "$dlog"
  drc=${PIPESTATUS[0]}
  wait "$upid"
  urc=$?
  trap - INT TERM
  set -e
  echo "== tests/unit (ran beside tests/distributed)"
  cat "$ulog"
  # pytest's 5 is "no test collected": a filter (-k, -m) may leave one half empty
  if [ "$urc" -eq 5 ] && [ "$drc" -ne 5 ]; then urc=0; fi
  if [ "$drc" -eq 5 ] && [ "$urc" -ne 5 ]; then drc=0; fi
  CI_RC=$(( urc > drc ? urc : drc ))
  CI_TESTS="unit: $(_ci_closing_line "$ulog"); distributed: $(_ci_closing_line "$dlog")"
  rm -f "$ulog" "$dlog"
  if [ "$CI_RC" -eq 0 ]; then CI_VERDICT=PASS; else CI_VERDICT=FAIL; fi
}

_ci_closing_line() {
  grep -E '[0-9]+ (passed|failed|errors?|skipped|deselected).* in [0-9.]+s' "$1" | tail -1 | tr -d '=' | xargs
}
