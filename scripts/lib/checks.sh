# shellcheck shell=bash
# The check scripts' tally (integration, worker-check, supabase-check, upgrade-check,
# package-check): `check NAME ACTUAL EXPECTED` prints an ok or FAIL line and counts it; each
# script ends with "$passed passed, $failed failed" and fails when $failed is not 0.
passed=0 failed=0
check() { # check NAME ACTUAL EXPECTED
  if [ "$2" = "$3" ]; then passed=$((passed + 1)); echo "ok   $1"
  else failed=$((failed + 1)); echo "FAIL $1: got '$2', expected '$3'"; fi
}
