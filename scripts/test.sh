#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine (as root) or a developer's shell:
#   1. setup (packages, cargo-pgrx, pgrx init)      scripts/setup.sh
#   2. style                                          cargo fmt --check, cargo clippy -D warnings
#   3. plain Rust tests of the mock Evolution API     cargo test -p evolution-mock
#   4. the extension's tests in a real PostgreSQL 15  cargo pgrx test (pure Rust tests + #[pg_test]s,
#      pg_cron preloaded, each test with its own mock server)
#   5. integration tests against a real cluster       scripts/integration.sh
#      (system install, crash with pg_ctl stop -m immediate, pg_dump/restore, secrets in logs)
#   6. the background worker, really preloaded        scripts/worker-check.sh
#      (sign-up without cron, listener, kill -9, SIGTERM, pg_ctl stop -m immediate, SIGHUP)
#   6b. a cluster built as self-hosted Supabase builds it  scripts/supabase-check.sh
#      (postgres demoted, API roles, default privileges, cron hijack, PostgREST's rules,
#      the key file, restores, the worker as postgres)
#   7. the upgrades from 0.1.0 ... 0.6.0             scripts/upgrade-check.sh
#      UPDATE: equal to a fresh install, every row kept
#   8. the Debian package, installed as a DBA would  scripts/package.sh, scripts/package-check.sh
#      (apt-get install ./postgresql-15-evoq_*.deb on a PostgreSQL without evoq's files, what
#      evoq.so links, the quickstart, the worker preloaded, the upgrades with the package's files,
#      apt-get remove). Last, because it removes evoq from the system PostgreSQL and leaves it so.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

echo "== style (cargo fmt --check, cargo clippy -D warnings)"
cargo fmt --all -- --check
cargo clippy --quiet --all-targets --features "pg15 pg_test" -- -D warnings
cargo clippy --quiet --all-targets -p evolution-mock -- -D warnings

echo "== mock Evolution API tests"
cargo test -p evolution-mock --quiet 2>&1 | grep -E "^test result|FAILED|panicked"

echo "== extension tests (cargo pgrx test, PostgreSQL 15)"
# PostgreSQL refuses to run as root: as root, the test cluster runs as `postgres` in a data
# directory it owns. Tests run one at a time because some commit state through a second
# connection (pg_cron, concurrent sessions, crashes).
PGDATA_DIR=${EVOQ_TEST_PGDATA:-/tmp/evoq-test-pgdata}
runas=()
if [ "$(id -u)" = 0 ]; then
  rm -rf "$PGDATA_DIR"
  install -d -o postgres -g postgres -m 700 "$PGDATA_DIR"
  runas=(--runas postgres --pgdata "$PGDATA_DIR")
fi
RUST_TEST_THREADS=1 cargo pgrx test pg15 "${runas[@]}"

echo "== integration tests (real cluster)"
scripts/integration.sh

echo "== the background worker (shared_preload_libraries = 'pg_cron,evoq')"
scripts/worker-check.sh

echo "== a Supabase-like cluster (postgres is not the superuser)"
scripts/supabase-check.sh

echo "== upgrades from 0.1.0, 0.2.0, 0.3.0, 0.4.0, 0.5.0 and 0.6.0 (ALTER EXTENSION evoq UPDATE)"
scripts/upgrade-check.sh

echo "== the Debian package (scripts/package.sh: a release build), installed and removed with apt-get"
scripts/package-check.sh
