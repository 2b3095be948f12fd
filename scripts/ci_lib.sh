# Sourced by .ci/run, scripts/ci_stack.sh and scripts/ci_axolotl.sh.
#
# ci_pytest CMD...   runs CMD (a pytest run) with its output on the terminal, and sets
#                    CI_RC (its exit status), CI_VERDICT (PASS or FAIL) and CI_TESTS
#                    (pytest's closing "N passed, ... in Xs" line).
# ci_report LINE     prints LINE and appends it to $CI_SUMMARY when that is set.
ci_pytest() {
  local log
  log=$(mktemp)
  set +e
  "$@" 2>&1 | tee "$log"
  CI_RC=${PIPESTATUS[0]}
  set -e
  CI_TESTS=$(grep -E '[0-9]+ (passed|failed|errors?|skipped|deselected).* in [0-9.]+s' "$log" | tail -1 | tr -d '=' | xargs)
  rm -f "$log"
  if [ "$CI_RC" -eq 0 ]; then CI_VERDICT=PASS; else CI_VERDICT=FAIL; fi
}

ci_report() {
  echo "$1"
  [ -z "${CI_SUMMARY:-}" ] || echo "$1" >> "$CI_SUMMARY"
}
