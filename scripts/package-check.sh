#!/usr/bin/env bash
# The Debian package, installed the way a DBA installs it, on a PostgreSQL 15 without evoq's files:
#
#   scripts/package-check.sh [DEB]   DEB defaults to what scripts/package.sh builds (it runs it)
#
# Removes what `cargo pgrx install` put into the system PostgreSQL, checks SHA256SUMS and runs
# `apt-get install ./postgresql-15-evoq_<version>_<arch>.deb`, then checks: where the files land;
# that evoq.so links only libraries of a stock Debian host (an allow-list of glibc's and libgcc's),
# each from a package the .deb Depends on; a fresh cluster: CREATE EXTENSION evoq and the README's
# quickstart against the mock Evolution API, a sign-up provisioned by evoq_process_queue(), then,
# after a restart with shared_preload_libraries = 'pg_cron,evoq', one provisioned by the background
# worker alone; ALTER EXTENSION evoq UPDATE from every earlier version with the package's files
# (scripts/upgrade-check.sh with UPGRADE_CHECK_INSTALLED=1); and that `apt-get remove`, then purge,
# leave no evoq file behind.
#
# It ends with evoq NOT installed in the system PostgreSQL (scripts/test.sh runs it last): run
# `cargo pgrx install --pg-config /usr/lib/postgresql/15/bin/pg_config` or install the package
# again before anything that uses the system install. Run as root (apt-get, and the files it removes).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
source scripts/lib/cluster.sh

NAME=postgresql-15-evoq
NEW=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
KEY=sk-evoq-package-check
DB=evoq_pkg
# Ports away from the other checks' (5543x, 1808x-1809x, 1878x), so a run next to them is possible.
PKG_DIR=${PKG_DIR:-/tmp/evoq-package-check}
PG_PORT=${PKG_PG_PORT:-56101} MOCK_PORT=${PKG_MOCK_PORT:-18301} LISTEN=127.0.0.1:${PKG_LISTEN_PORT:-18302}
UC_PORTS=(UC_DIR="$PKG_DIR-upgrade" UC_PG_PORT="${PKG_UC_PG_PORT:-56102}" UC_MOCK_PORT="${PKG_UC_MOCK_PORT:-18303}")
# The system's PostgreSQL 15 is the one a package installs into, whatever PGBIN says.
PGBIN=/usr/lib/postgresql/15/bin
LIBDIR=$("$PGBIN/pg_config" --pkglibdir) EXTDIR=$("$PGBIN/pg_config" --sharedir)/extension
CARGO_TARGET_DIR=$(realpath -m "${CARGO_TARGET_DIR:-target}")
export CARGO_TARGET_DIR MOCK_BIN=$CARGO_TARGET_DIR/release/evolution-mock

source scripts/lib/checks.sh
die() { echo "package-check: $*" >&2; echo "$passed passed, $((failed + 1)) failed"; exit 1; }
q() { cluster_psql -d "$DB" -tA -c "$1"; }
wait_for() { # wait_for SQL EXPECTED SECONDS: polls until SQL returns EXPECTED; prints the last value
  local v="" end=$((SECONDS + $3))
  while [ $SECONDS -le $end ]; do v=$(q "$1" 2>/dev/null); [ "$v" = "$2" ] && break; sleep 0.1; done
  echo "$v"
}
evoq_files() { find "$LIBDIR" "$EXTDIR" -maxdepth 1 -name 'evoq*' | sort; }
apt() { DEBIAN_FRONTEND=noninteractive apt-get -y "$@" >>"$PKG_DIR-apt.log" 2>&1; }
package_status() { dpkg-query -W -f='${Status} ${Version}' "$NAME" 2>/dev/null; }

[ "$(id -u)" = 0 ] || die "run as root: it installs and removes a package"
start_all=$SECONDS
rm -f "$PKG_DIR-apt.log"

# --- the package ---------------------------------------------------------------------------------
if [ -n "${1:-}" ]; then
  DEB=$(realpath "$1")
else
  scripts/package.sh "$CARGO_TARGET_DIR/package" || die "scripts/package.sh failed"
  DEB=$CARGO_TARGET_DIR/package/${NAME}_${NEW}_$(dpkg --print-architecture).deb
fi
[ -f "$DEB" ] || die "no package at $DEB"
cargo build -p evolution-mock --release --quiet || die "the mock Evolution API does not build"
check "the package is $NAME $NEW for $(dpkg --print-architecture)" \
  "$(dpkg-deb -f "$DEB" Package Version Architecture | tr '\n' ' ')" "Package: $NAME Version: $NEW Architecture: $(dpkg --print-architecture) "
check "it depends on the PostgreSQL 15 server and recommends pg_cron" \
  "$(dpkg-deb -f "$DEB" Depends | grep -oE '(^|, )postgresql-15(,|$)' | tr -d ', ') $(dpkg-deb -f "$DEB" Recommends)" \
  "postgresql-15 postgresql-15-cron"
check "it has no maintainer scripts (nothing to run: PostgreSQL reads the files when asked)" \
  "$(dpkg-deb --ctrl-tarfile "$DEB" | tar -t | sed 's|^\./||' | grep -vxE 'control|md5sums|' | tr '\n' ' ')" ""

# --- a machine without evoq's files ----------------------------------------------------------------
# What cargo pgrx install (scripts/test.sh's earlier steps) put there, and a package a failed run left.
if [ -n "$(package_status)" ]; then apt purge "$NAME" || die "could not purge an earlier $NAME; see $PKG_DIR-apt.log"; fi
rm -f "$LIBDIR/evoq.so" "$EXTDIR/evoq.control" "$EXTDIR"/evoq--*.sql
check "no evoq file in $LIBDIR or $EXTDIR before the install" "$(evoq_files)" ""

# --- apt-get install ./postgresql-15-evoq_<version>_<arch>.deb, as the README says --------------------
check "SHA256SUMS beside the package matches it" \
  "$(cd "$(dirname "$DEB")" && sha256sum -c SHA256SUMS 2>&1)" "$(basename "$DEB"): OK"
(cd "$(dirname "$DEB")" && apt install "./$(basename "$DEB")")
check "apt-get install ./$(basename "$DEB") installs it" "$(package_status)" "install ok installed $NEW"
listed=$(dpkg -L "$NAME" | sort)
expected_files="$LIBDIR/evoq.so
$EXTDIR/evoq--$NEW.sql
$EXTDIR/evoq.control"
for script in sql/evoq--*--*.sql; do expected_files+=$'\n'"$EXTDIR/$(basename "$script")"; done
check "its files are evoq.so in $LIBDIR and the control file, install script and every upgrade script in $EXTDIR" \
  "$(while read -r f; do [ -f "$f" ] && echo "$f"; done <<<"$listed" | sort)" "$(sort <<<"$expected_files")"
check "no other evoq file is there" "$(evoq_files)" "$(sort <<<"$expected_files")"
for script in sql/evoq--*--*.sql; do
  check "the package's $(basename "$script") is this tree's" \
    "$(sed "s/@CARGO_VERSION@/$NEW/g" "$script" | cmp - "$EXTDIR/$(basename "$script")" 2>&1 && echo same)" "same"
done

# --- what evoq.so links ------------------------------------------------------------------------------
# A stock Debian PostgreSQL host has glibc and libgcc_s (libc6 and libgcc-s1 are essential or
# required): anything else (libssl, libz, ...) would have to be declared in Depends, and is not.
needed=$(readelf -d "$LIBDIR/evoq.so" | sed -n 's/.*(NEEDED).*\[\(.*\)\]$/\1/p')
echo "     evoq.so NEEDED: $(tr '\n' ' ' <<<"$needed")"
check "evoq.so NEEDs libc" "$(grep -cx 'libc.so.6' <<<"$needed")" "1"
check "every NEEDED entry of evoq.so is glibc's or libgcc_s (no libssl, no libz)" \
  "$(grep -vxE 'libc\.so\.6|libm\.so\.6|libgcc_s\.so\.1|ld-linux[-_a-z0-9.]*\.so\.[0-9]+|libpthread\.so\.0|libdl\.so\.2|librt\.so\.1|libutil\.so\.1' <<<"$needed")" ""
depends=$(dpkg-deb -f "$DEB" Depends)
undeclared=""
for lib in $needed; do
  # The file the loader would use, and the package that ships it, which Depends must name.
  path=$(ldd "$LIBDIR/evoq.so" | awk -v l="$lib" '$1 == l && $2 == "=>" { print $3 } $1 ~ ("/" l "$") { print $1 }' | head -n1)
  pkg=$(dpkg -S "$path" 2>/dev/null | head -n1 | cut -d: -f1)
  grep -qE "(^|, )$pkg( |,|$)" <<<"$depends" || undeclared+="$lib ($path: ${pkg:-no package}) "
done
check "each library it links comes from a package in Depends ($depends)" "$undeclared" ""
check "the linker resolves every NEEDED entry on this host" "$(ldd "$LIBDIR/evoq.so" | grep -c 'not found')" "0"

# --- a fresh cluster: CREATE EXTENSION and the quickstart ---------------------------------------------
cluster_init "$PKG_DIR" "$PG_PORT" "$DB"
cluster_start || die "the cluster does not start; see $PKG_DIR/server.log"
trap 'mock_stop; cluster_stop immediate' EXIT
mock_start "$MOCK_PORT" --api-key "$KEY" --qr-ttl-ms 1500 --webhook-retry-ms 200 || die "the mock does not start"
cluster_psql -d postgres -c "CREATE DATABASE $DB" >/dev/null
q "CREATE EXTENSION pg_cron"
check "CREATE EXTENSION evoq from the package's files" \
  "$(q "CREATE EXTENSION evoq" 2>&1 && q "SELECT extversion FROM pg_extension WHERE extname = 'evoq'")" "$NEW"
check "evoq_configure against the mock" \
  "$(q "SELECT evoq_configure(api_url => '$MOCK_URL', api_key => '$KEY') ->> 'api_url'" 2>&1)" "$MOCK_URL"
q "CREATE TABLE profiles (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), email text)"
check "evoq_attach('public.profiles')" "$(q "SELECT evoq_attach('public.profiles') IS NOT NULL" 2>&1)" "t"
check "evoq_schedule() creates the two pg_cron jobs" \
  "$(q "SELECT evoq_schedule() IS NOT NULL; SELECT string_agg(jobname, ',' ORDER BY jobname) FROM cron.job" 2>&1 | tail -n1)" \
  "process-evolution-queue,refresh-qr-codes"
q "SELECT evoq_unschedule()" >/dev/null # the check runs the jobs itself: no tick racing it
ana=$(q "INSERT INTO profiles (email) VALUES ('ana@example.com') RETURNING id")
check "a sign-up is queued" "$(q "SELECT status FROM evolution_instance_creation_queue WHERE user_id = '$ana'")" "pending"
check "evoq_process_queue() provisions it" \
  "$(q "SELECT evoq_process_queue() ->> 'created'; SELECT status FROM evolution_instance_creation_queue WHERE user_id = '$ana'" | tr '\n' ' ')" \
  "1 completed "
check "the mock holds its instance" \
  "$(curl -fsS "$MOCK_URL/__mock/instances" | grep -c "$(q "SELECT evoq_instance_name('$ana')")")" "1"
check "evoq_refresh_qr() brings its QR code" \
  "$(q "SELECT evoq_refresh_qr() IS NOT NULL; SELECT instance_status || ' ' || (qr_code LIKE 'data:image/png;base64,%') FROM evolution_instances WHERE user_id = '$ana'" | tail -n1)" \
  "connecting true"
check "evoq_status shows it" "$(q "SELECT completed || ' ' || instances_connecting || ' ' || configured FROM evoq_status")" "1 1 true"

# --- the background worker, through shared_preload_libraries ------------------------------------------
cluster_stop || die "the cluster does not stop"
cat >>"$CLUSTER_DIR/data/postgresql.conf" <<CONF
shared_preload_libraries = 'pg_cron,evoq'
evoq.database_name = '$DB'
evoq.listen_address = '$LISTEN'
CONF
cluster_start || die "the cluster does not start with evoq preloaded; see $PKG_DIR/server.log"
check "after a restart with shared_preload_libraries = 'pg_cron,evoq' the worker runs" \
  "$(wait_for "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'evoq worker'" 1 15)" "1"
check "evoq_status shows it loaded, with its listener" \
  "$(q "SELECT worker_loaded || ' ' || worker_listener FROM evoq_status")" "true $LISTEN"
q "SELECT evoq_configure(api_url => '$MOCK_URL', api_key => '$KEY', webhook_url => 'http://$LISTEN/hook')" >/dev/null
bo=$(q "INSERT INTO profiles (email) VALUES ('bo@example.com') RETURNING id")
check "a sign-up is provisioned by the worker alone (completed within 10 s, no job called)" \
  "$(wait_for "SELECT status FROM evolution_instance_creation_queue WHERE user_id = '$bo'" completed 10)" "completed"
check "its QR arrives by webhook through the worker's listener" \
  "$(wait_for "SELECT qr_code LIKE 'data:image/png;base64,%' FROM evolution_instances WHERE user_id = '$bo'" t 10)" "t"
mock_stop
cluster_stop immediate
trap - EXIT

# --- ALTER EXTENSION evoq UPDATE from every earlier version, with the package's files ------------------
echo "     scripts/upgrade-check.sh with UPGRADE_CHECK_INSTALLED=1 (the package's files):"
uc_start=$SECONDS
env "${UC_PORTS[@]}" UPGRADE_CHECK_INSTALLED=1 scripts/upgrade-check.sh >"$PKG_DIR-upgrade.log" 2>&1
uc_rc=$?
sed 's/^/     | /' "$PKG_DIR-upgrade.log" | grep -E '^     \| (FAIL|[0-9]+ passed)|upgrade-check:' || tail -n 20 "$PKG_DIR-upgrade.log"
check "ALTER EXTENSION evoq UPDATE from every earlier version with the package's files ($((SECONDS - uc_start)) s, $PKG_DIR-upgrade.log)" \
  "$uc_rc $(grep -cE '^FAIL' "$PKG_DIR-upgrade.log")" "0 0"
check "and the package's files are as it shipped them afterwards (dpkg --verify)" "$(dpkg --verify "$NAME" 2>&1)" ""
check "and the upgrade check left no evoq file of its own" "$(evoq_files)" "$(sort <<<"$expected_files")"

# --- apt-get remove, then purge -------------------------------------------------------------------------
apt remove "$NAME"
check "apt-get remove $NAME removes it" "$(package_status | grep -c '^install ok installed')" "0"
check "none of the files dpkg -L listed is left" "$(while read -r f; do [ -f "$f" ] && echo "$f"; done <<<"$listed")" ""
check "no evoq file in $LIBDIR or $EXTDIR" "$(evoq_files)" ""
apt purge "$NAME"
check "after apt-get purge dpkg knows nothing of it" "$(package_status | grep -vc '^unknown ok not-installed')" "0"

echo "$passed passed, $failed failed ($((SECONDS - start_all)) s)"
echo "package-check: evoq is NOT installed in the system PostgreSQL now (the package was removed);"
echo "               run 'cargo pgrx install --pg-config $PGBIN/pg_config' or install the package again to use it"
[ "$failed" = 0 ]
