#!/usr/bin/env bash
# Upgrade check: databases created by evoq 0.1.0, 0.2.0, 0.3.0, 0.4.0, 0.5.0 and 0.6.0, each built from the commit that
# shipped it, filled with rows in every state and then brought forward with ALTER EXTENSION evoq
# UPDATE (0.1.0 through every script in between), must equal a fresh install of this tree, object
# for object, and keep every row.
#
# PostgreSQL 15 loads extensions only from its own sharedir and pkglibdir, so this installs into
# the system PostgreSQL: 0.1.0 for a while, and this tree's build again before it exits, whatever
# happens (the integration tests and the demo use the system install).
#
# UPGRADE_CHECK_INSTALLED=1  checks the evoq $NEW already installed there (scripts/package-check.sh:
#   the Debian package's files) instead of building this tree: those files are copied aside before
#   the older versions are installed over them and put back in their place for the upgrade (and
#   at exit, whatever happens), and what the older versions added is removed at exit.
# UPGRADE_CHECK_SELFTEST=schema  gives the fresh install an extra column the upgrade lacks;
# UPGRADE_CHECK_SELFTEST=rows    loses a row after the upgrade. Either way the check must fail.
# UC_DIR, UC_PG_PORT, UC_MOCK_PORT move the cluster, its port and the mock's, so two runs on one
# machine do not collide.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
source scripts/lib/cluster.sh

OLD=0.1.0 OLD_COMMIT=2519dd4872fdd462eb4d1dee86e032a52cd20bf1
MID=0.2.0 MID_COMMIT=6c1a042c83255abfde00339aa5dc809ce7932dbe
LAST=0.3.0 LAST_COMMIT=75abd16c3d496136d848fb0ccee0084bc02c007f
PREV=0.4.0 PREV_COMMIT=1e2e89ebdca84b3cd3dd8f9fed60d66d10c9edc2
LATEST=0.5.0 LATEST_COMMIT=d15f3ae7e93ede7b994476df03a4bdaf00647209
SIXTH=0.6.0 SIXTH_COMMIT=024f04064badca76471e44c7cfa87f1d7c6679c5
NEW=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
PG_CONFIG=$PGBIN/pg_config
EXTDIR=$("$PG_CONFIG" --sharedir)/extension
LIBDIR=$("$PG_CONFIG" --pkglibdir)
UC_DIR=${UC_DIR:-/tmp/evoq-upgrade}
UC_PG_PORT=${UC_PG_PORT:-55435} UC_MOCK_PORT=${UC_MOCK_PORT:-18095}
OLD_SRC=$UC_DIR-src-$OLD
INSTALLED=${UPGRADE_CHECK_INSTALLED:-}
KEY=sk-evoq-upgrade-check
A=evoq_upgraded B=evoq_fresh C=evoq_from_020 D=evoq_from_030 E=evoq_from_040 F=evoq_from_050 G=evoq_from_060
SELFTEST=${UPGRADE_CHECK_SELFTEST:-}
# Both builds share this tree's target directory: the dependencies scripts/test.sh compiled for
# cargo pgrx test are reused, not compiled again.
CARGO_TARGET_DIR=$(realpath -m "${CARGO_TARGET_DIR:-target}")
export CARGO_TARGET_DIR MOCK_BIN=$CARGO_TARGET_DIR/release/evolution-mock

source scripts/lib/checks.sh
die() { echo "upgrade-check: $*" >&2; echo "$passed passed, $((failed + 1)) failed"; exit 1; }
q() { cluster_psql -d "$1" -tA -c "$2"; } # q DB SQL
mock() { curl -fsS -X "$1" "$MOCK_URL/__mock/$2" ${3:+-d "$3"} >/dev/null; }
signup() { q "$1" "INSERT INTO profiles (email) VALUES ('$2@example.com')"; } # signup DB NAME
control_version() { sed -n "s/^default_version = '\(.*\)'$/\1/p" "$EXTDIR/evoq.control"; }

installed=
install_from() { # install_from SOURCE_DIR VERSION
  # A debug build, like cargo pgrx test's: on a CI machine after scripts/test.sh the whole check
  # takes 25 s; --release would first compile every dependency again (3 min more on 2 cores).
  # Both versions link target/debug/deps/libevoq.so, a name without a hash: left in place, cargo
  # would take the other version's library for fresh and install it under this version's name.
  rm -f "$CARGO_TARGET_DIR"/debug/libevoq.so "$CARGO_TARGET_DIR"/debug/deps/libevoq.so
  local sudo=() log=$UC_DIR-install-$2.log start=$SECONDS
  [ "$(id -u)" = 0 ] || sudo=(--sudo)
  if ! (cd "$1" && cargo pgrx install "${sudo[@]}" --pg-config "$PG_CONFIG") >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    return 1
  fi
  installed=$2
  echo "     installed evoq $2 from $1 in $((SECONDS - start)) s"
}

# UPGRADE_CHECK_INSTALLED: evoq's files as found, kept in $SAVED (their paths in $SAVED/list).
SAVED=$UC_DIR-installed-files
evoq_files() { find "$LIBDIR" "$EXTDIR" -maxdepth 1 -type f -name 'evoq*' | sort; }
put_back_installed() {
  local f
  while read -r f; do
    # A new file, not the old one overwritten: a backend still running the older library
    # has it mapped (dpkg and cargo pgrx install replace files the same way).
    cp -p --remove-destination "$SAVED/files$f" "$f" || return 1
  done <"$SAVED/list"
  installed=$NEW
  echo "     put the installed evoq $NEW back in place"
}
if [ -n "$INSTALLED" ]; then
  rm -rf "$SAVED" && mkdir -p "$SAVED/files"
  evoq_files >"$SAVED/list"
  [ -s "$SAVED/list" ] || die "UPGRADE_CHECK_INSTALLED: no evoq files in $LIBDIR or $EXTDIR"
  [ "$(control_version)" = "$NEW" ] || die "UPGRADE_CHECK_INSTALLED: the installed evoq is '$(control_version)', this tree is $NEW"
  while read -r f; do install -D -p -m "$(stat -c %a "$f")" "$f" "$SAVED/files$f"; done <"$SAVED/list"
  installed=$NEW
fi
install_new() {
  if [ -n "$INSTALLED" ]; then put_back_installed; else install_from "$ROOT" "$NEW"; fi
}

cleanup() {
  mock_stop
  cluster_stop immediate
  if [ -n "$installed" ] && [ "$installed" != "$NEW" ]; then
    echo "upgrade-check: putting evoq $NEW back in place" >&2
    install_new || echo "upgrade-check: could not; run cargo pgrx install" >&2
  fi
  if [ -n "$INSTALLED" ] && [ -s "$SAVED/list" ]; then
    # The older versions' install scripts (evoq--0.1.0.sql, ...) are this check's, not the install's.
    evoq_files | grep -vxF -f "$SAVED/list" | xargs -r rm -f
    rm -rf "$SAVED"
  fi
}
trap cleanup EXIT

# --- the releases exactly as they shipped -----------------------------------------------------------
source_of() { # source_of COMMIT VERSION DIR: that commit's tree in DIR
  if ! git cat-file -e "$1^{commit}" 2>/dev/null; then
    # A shallow or single-branch clone (many CI checkouts) lacks it.
    echo "upgrade-check: fetching $1 (evoq $2) into this clone"
    if [ "$(git rev-parse --is-shallow-repository)" = true ]; then git fetch --quiet --unshallow; fi
    git cat-file -e "$1^{commit}" 2>/dev/null || git fetch --quiet origin "$1"
    git cat-file -e "$1^{commit}" 2>/dev/null \
      || die "commit $1 (evoq $2 as shipped) is not in this clone and could not be fetched; clone with full history (no --depth; actions/checkout: fetch-depth: 0)"
  fi
  rm -rf "$3" && mkdir -p "$3"
  git archive "$1" | tar -x -C "$3" || die "git archive $1 failed"
}
source_of "$OLD_COMMIT" "$OLD" "$OLD_SRC"

cargo build -p evolution-mock --release --quiet || die "the mock Evolution API does not build"
install_from "$OLD_SRC" "$OLD" || die "evoq $OLD does not build or install"
check "the installed control file defaults to $OLD" "$(control_version)" "$OLD"

# --- database A: 0.1.0 with rows in every state -----------------------------------------------------
cluster_init "$UC_DIR" "$UC_PG_PORT" "$A"
cluster_start || die "the cluster does not start; see $UC_DIR/server.log"
mock_start "$UC_MOCK_PORT" --api-key "$KEY" || die "the mock does not start"
cluster_psql -d postgres -c "CREATE DATABASE $A" -c "CREATE DATABASE $B"
# A partitioned profiles table: Postgres clones its triggers onto each partition under the same
# name, which an upgrade that adds triggers to attached tables must not trip over.
partitioned_with_trigger() {
  q "$1" "CREATE TABLE part_profiles (id uuid NOT NULL DEFAULT gen_random_uuid(), region text NOT NULL) PARTITION BY LIST (region);
          CREATE TABLE part_profiles_br PARTITION OF part_profiles FOR VALUES IN ('br')"
  q "$1" "SELECT evoq_attach('part_profiles')" >/dev/null
}
profiles_with_trigger() {
  q "$1" "CREATE TABLE profiles (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), email text)"
  q "$1" "SELECT evoq_attach('profiles')" >/dev/null
}
q "$A" "CREATE EXTENSION pg_cron"
q "$A" "CREATE EXTENSION evoq VERSION '$OLD'"
q "$A" "SELECT evoq_configure(api_url => '$MOCK_URL', api_key => '$KEY', webhook_url => 'https://app.example/hook')" >/dev/null
profiles_with_trigger "$A"
partitioned_with_trigger "$A"
# 31 February never comes: the jobs exist across the upgrade but never touch the rows under test.
q "$A" "SELECT evoq_schedule('0 0 31 2 *', '0 0 31 2 *')" >/dev/null

# fill_in_every_state DB U1 .. U6: six sign-ups, and the queue rows and instances in every state.
fill_in_every_state() {
  local db=$1; shift
  signup "$db" "$1"; signup "$db" "$2"; signup "$db" "$3"
  q "$db" "SELECT evoq_process_queue()" >/dev/null # completed
  mock POST faults '{"method":"POST","path_contains":"/instance/create","kind":"status","code":400,"times":1}'
  signup "$db" "$4"
  q "$db" "SELECT evoq_process_queue()" >/dev/null # failed: permanent
  mock POST faults '{"method":"POST","path_contains":"/instance/create","kind":"status","code":500,"times":1}'
  signup "$db" "$5"
  q "$db" "SELECT evoq_process_queue()" >/dev/null # pending: transient, backing off
  signup "$db" "$6"                                # pending: never tried
  mock POST "instances/$(q "$db" "SELECT evoq_instance_name(id) FROM profiles WHERE email = '$1@example.com'")/state" '{"state":"open"}'
  q "$db" "SELECT evoq_refresh_qr()" >/dev/null    # U1 open, U2 and U3 with a QR
}
fill_in_every_state "$A" ana bo cy dee eve fay

check "0.1.0 queue rows in every state" \
  "$(q "$A" "SELECT string_agg(status || '=' || n, ',' ORDER BY status) FROM (SELECT status, count(*) n FROM evolution_instance_creation_queue GROUP BY 1) s")" \
  "completed=3,failed=1,pending=2"
check "0.1.0 instances, QR codes, tokens, settings, runs" \
  "$(q "$A" "SELECT concat_ws(',', (SELECT string_agg(instance_status || '=' || n, ',' ORDER BY instance_status) FROM (SELECT instance_status, count(*) n FROM evolution_instances GROUP BY 1) s),
       (SELECT count(qr_code) FROM evolution_instances), (SELECT count(*) FROM evoq.instance_tokens),
       (SELECT count(*) FROM evoq.settings), (SELECT count(*) FROM evoq.job_runs))")" \
  "connecting=2,open=1,2,3,1,2"

# Every row of every evoq table, over the columns the old version has, copied aside to compare
# with after the upgrade: columns the upgrade adds do not count, a value it changes or a row it
# loses does. copy_aside DB VERSION sets compare_rows (the query listing every difference) and
# copied ("N tables, M rows").
copy_aside() {
  local db=$1 version=$2 t cols tables n=0
  q "$db" "CREATE SCHEMA upgrade_check"
  tables=$(q "$db" "SELECT c.oid::regclass FROM pg_depend d JOIN pg_class c ON c.oid = d.objid
                   WHERE d.classid = 'pg_class'::regclass AND d.deptype = 'e' AND c.relkind IN ('r', 'p')
                     AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'evoq') ORDER BY 1")
  compare_rows=''
  for t in $tables; do
    # (0.7.0 drops evoq.circuit.singleton on purpose: the circuit is keyed by its server now)
    cols=$(q "$db" "SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) FROM pg_attribute
                   WHERE attrelid = '$t'::regclass AND attnum > 0 AND NOT attisdropped
                     AND NOT ('$t' = 'evoq.circuit' AND attname = 'singleton')")
    q "$db" "CREATE TABLE upgrade_check.\"$t\" AS SELECT $cols FROM $t"
    n=$((n + $(q "$db" "SELECT count(*) FROM upgrade_check.\"$t\"")))
    compare_rows+="${compare_rows:+ UNION ALL }
      (SELECT '$t, only in $version: ' || x FROM (SELECT s::text FROM upgrade_check.\"$t\" s
         EXCEPT ALL SELECT r::text FROM (SELECT $cols FROM $t) r) d(x))
      UNION ALL
      (SELECT '$t, only after the upgrade: ' || x FROM (SELECT r::text FROM (SELECT $cols FROM $t) r
         EXCEPT ALL SELECT s::text FROM upgrade_check.\"$t\" s) d(x))"
  done
  copied="$(wc -w <<<"$tables") tables, $n rows"
}
copy_aside "$A" "$OLD"
compare_rows_a=$compare_rows
check "0.1.0 rows copied aside" "$copied" "5 tables, 15 rows"
# What evoq--0.1.0--0.2.0.sql changes in 0.1.0 columns on purpose, done to the copy as well.
# Users queued before 0.2.0 keep the 0.1.0 instance name:
expected_migration="UPDATE upgrade_check.evolution_instance_creation_queue
  SET instance_name = 'evoq_' || replace(user_id::text, '-', '') WHERE instance_name IS NULL"

# database_made_by VERSION COMMIT DB: DB created by evoq VERSION built from COMMIT, configured against
# the mock, with a profiles table and a partitioned one attached.
database_made_by() {
  local src=$UC_DIR-src-$1
  source_of "$2" "$1" "$src"
  install_from "$src" "$1" || die "evoq $1 does not build or install"
  cluster_psql -d postgres -c "CREATE DATABASE $3" >/dev/null
  q "$3" "CREATE EXTENSION evoq VERSION '$1'"
  q "$3" "SELECT evoq_configure(api_url => '$MOCK_URL', api_key => '$KEY', webhook_url => 'https://app.example/hook')" >/dev/null
  profiles_with_trigger "$3"
  partitioned_with_trigger "$3"
}

# --- database C: evoq 0.2.0 as it shipped, with rows in every state of its own tables -----------------
database_made_by "$MID" "$MID_COMMIT" "$C"
fill_in_every_state "$C" gus hal ivy jon kim lea
# 0.2.0's own tables: a requeue request waiting, a skipped profile, an open circuit.
q "$C" "INSERT INTO evoq.requeue_requests (user_id, reason) SELECT id, 'reinserted' FROM profiles WHERE email = 'hal@example.com';
        INSERT INTO evoq.skipped_profiles (table_name, reason) VALUES ('public.profiles', 'column id is NULL');
        INSERT INTO evoq.circuit (opened_at, cause, trips, next_probe_at) VALUES (now(), 'a test', 2, now() + interval '1 hour')"
check "0.2.0 rows in every state" \
  "$(q "$C" "SELECT concat_ws(',', (SELECT string_agg(status || '=' || n, ',' ORDER BY status) FROM (SELECT status, count(*) n FROM evolution_instance_creation_queue GROUP BY 1) s),
       (SELECT string_agg(instance_status || '=' || n, ',' ORDER BY instance_status) FROM (SELECT instance_status, count(*) n FROM evolution_instances GROUP BY 1) s),
       (SELECT count(*) FROM evoq.requeue_requests), (SELECT count(*) FROM evoq.skipped_profiles), (SELECT count(*) FROM evoq.circuit))")" \
  "completed=3,failed=1,pending=2,connecting=2,open=1,1,1,1"
copy_aside "$C" "$MID"
compare_rows_c=$compare_rows
check "0.2.0 rows copied aside" "$copied" "8 tables, 18 rows"

# --- database D: evoq 0.3.0 as it shipped, with rows in every state of its own features ---------------
database_made_by "$LAST" "$LAST_COMMIT" "$D"
fill_in_every_state "$D" max ned ola pat quin rex
# 0.3.0's own states and tables: a webhook delivery applied (ned's scan: open, with the owner's
# number), an event kept for the application, a deprovisioned user whose deletion is queued.
d_secret=$(q "$D" "SELECT webhook_secret FROM evoq.settings")
ned=$(q "$D" "SELECT evoq_instance_name(id) FROM profiles WHERE email = 'ned@example.com'")
q "$D" "SET request.headers = '{\"x-evoq-secret\": \"$d_secret\"}';
        SELECT evoq_webhook('{\"event\": \"connection.update\", \"instance\": \"$ned\", \"date_time\": \"2099-01-01T00:00:00.000Z\",
                              \"data\": {\"state\": \"open\", \"wuid\": \"5511999990000@s.whatsapp.net\", \"profileName\": \"Ned\"}}');
        SELECT evoq_webhook('{\"event\": \"messages.upsert\", \"instance\": \"$ned\", \"date_time\": \"2099-01-01T00:00:01.000Z\",
                              \"data\": {\"key\": {\"id\": \"m1\"}}}')" >/dev/null
q "$D" "DELETE FROM profiles WHERE email = 'ola@example.com'"
check "0.3.0 rows in every state" \
  "$(q "$D" "SELECT concat_ws(',', (SELECT string_agg(status || '=' || n, ',' ORDER BY status) FROM (SELECT status, count(*) n FROM evolution_instance_creation_queue GROUP BY 1) s),
       (SELECT string_agg(instance_status || '=' || n, ',' ORDER BY instance_status) FROM (SELECT instance_status, count(*) n FROM evolution_instances GROUP BY 1) s),
       (SELECT count(*) FROM evolution_instance_events), (SELECT owner_number FROM evolution_instances WHERE instance_name = '$ned'))")" \
  "completed=2,failed=1,pending=3,connecting=1,open=2,1,5511999990000"
copy_aside "$D" "$LAST"
compare_rows_d=$compare_rows
check "0.3.0 rows copied aside" "$copied" "9 tables, 16 rows"

# --- database E: evoq 0.4.0 as it shipped, with rows in every state, a deletion queued -------------
database_made_by "$PREV" "$PREV_COMMIT" "$E"
fill_in_every_state "$E" sam tom uma vic wes xia
q "$E" "DELETE FROM profiles WHERE email = 'uma@example.com'"
check "0.4.0 rows in every state" \
  "$(q "$E" "SELECT concat_ws(',', (SELECT string_agg(status || '=' || n, ',' ORDER BY status) FROM (SELECT status, count(*) n FROM evolution_instance_creation_queue GROUP BY 1) s),
       (SELECT string_agg(instance_status || '=' || n, ',' ORDER BY instance_status) FROM (SELECT instance_status, count(*) n FROM evolution_instances GROUP BY 1) s))")" \
  "completed=2,failed=1,pending=3,connecting=2,open=1"
copy_aside "$E" "$PREV"
compare_rows_e=$compare_rows
check "0.4.0 rows copied aside" "$copied" "9 tables, 15 rows"

# --- database F: evoq 0.5.0 as it shipped, with rows in every state, a phone link waiting -----------
database_made_by "$LATEST" "$LATEST_COMMIT" "$F"
fill_in_every_state "$F" yul zed abe bea cal dov
# 0.5.0's own rows: a number waiting in evoq.phone_links (the never-tried sign-up's create carries it).
q "$F" "SELECT evoq_link_with_phone(id, '+55 11 99999-0001') FROM profiles WHERE email = 'dov@example.com'" >/dev/null
check "0.5.0 rows in every state" \
  "$(q "$F" "SELECT concat_ws(',', (SELECT string_agg(status || '=' || n, ',' ORDER BY status) FROM (SELECT status, count(*) n FROM evolution_instance_creation_queue GROUP BY 1) s),
       (SELECT string_agg(instance_status || '=' || n, ',' ORDER BY instance_status) FROM (SELECT instance_status, count(*) n FROM evolution_instances GROUP BY 1) s),
       (SELECT count(*) FROM evoq.phone_links))")" \
  "completed=3,failed=1,pending=2,connecting=3,1"
copy_aside "$F" "$LATEST"
compare_rows_f=$compare_rows
check "0.5.0 rows copied aside" "$copied" "10 tables, 16 rows"

# --- database G: evoq 0.6.0 as it shipped, with a capacity, an open circuit and a reconcile ----------
database_made_by "$SIXTH" "$SIXTH_COMMIT" "$G"
fill_in_every_state "$G" eli fio gia hob ike jo
q "$G" "SELECT evoq_server_set('default', capacity => 50, max_in_flight => 8)" >/dev/null
q "$G" "SELECT evoq_reconcile()" >/dev/null
q "$G" "INSERT INTO evoq.circuit (opened_at, cause, trips, next_probe_at) VALUES (now(), 'a test', 2, now() + interval '1 hour')"
check "0.6.0 rows in every state" \
  "$(q "$G" "SELECT concat_ws(',', (SELECT string_agg(status || '=' || n, ',' ORDER BY status) FROM (SELECT status, count(*) n FROM evolution_instance_creation_queue GROUP BY 1) s),
       (SELECT string_agg(instance_status || '=' || n, ',' ORDER BY instance_status) FROM (SELECT instance_status, count(*) n FROM evolution_instances GROUP BY 1) s),
       (SELECT capacity || '/' || max_in_flight FROM evoq.servers), (SELECT count(*) FROM evoq.reconciles WHERE summary IS NOT NULL),
       (SELECT count(*) FROM evoq.circuit))")" \
  "completed=3,failed=1,pending=2,connecting=2,open=1,50/8,1,1"
copy_aside "$G" "$SIXTH"
compare_rows_g=$compare_rows
check "0.6.0 rows copied aside" "$copied" "13 tables, 18 rows"

# --- this tree's build (or the installed evoq), then ALTER EXTENSION evoq UPDATE ----------------------
if [ -n "$INSTALLED" ]; then
  put_back_installed || die "the installed evoq $NEW could not be put back"
  check "the files installed at the start are back, byte for byte" \
    "$(while read -r f; do cmp "$SAVED/files$f" "$f" || echo differs; done <"$SAVED/list")" ""
else
  install_from "$ROOT" "$NEW" || die "this tree (evoq $NEW) does not build or install"
fi
check "the installed control file defaults to $NEW" "$(control_version)" "$NEW"
check "$OLD's, $MID's, $LAST's, $PREV's, $LATEST's and $SIXTH's install scripts are still installed" \
  "$([ -f "$EXTDIR/evoq--$OLD.sql" ] && [ -f "$EXTDIR/evoq--$MID.sql" ] && [ -f "$EXTDIR/evoq--$LAST.sql" ] && [ -f "$EXTDIR/evoq--$PREV.sql" ] && [ -f "$EXTDIR/evoq--$LATEST.sql" ] && [ -f "$EXTDIR/evoq--$SIXTH.sql" ] && echo yes)" "yes"
# cargo pgrx install copies sql/evoq--*--*.sql itself, with @CARGO_VERSION@ filled in. ALTER
# EXTENSION UPDATE chains them: $OLD -> ... -> $NEW.
for script in sql/evoq--*--*.sql; do
  check "this tree's $(basename "$script") is installed" \
    "$(sed "s/@CARGO_VERSION@/$NEW/g" "$script" | cmp - "$EXTDIR/$(basename "$script")" 2>&1 && echo same)" "same"
done

# Between installing the new files and ALTER EXTENSION evoq UPDATE, backends run the new library
# against the old schema: a sign-up, and a profile inserted again, must still work (rolled back,
# so the row comparison below is unaffected).
window=$(q "$A" "BEGIN;
  INSERT INTO profiles (email) VALUES ('window@example.com');
  DELETE FROM profiles WHERE email = 'ana@example.com';
  INSERT INTO profiles (id, email) SELECT user_id, 'ana@example.com' FROM evolution_instance_creation_queue q
    WHERE NOT EXISTS (SELECT 1 FROM profiles p WHERE p.id = q.user_id) LIMIT 1;
  ROLLBACK" 2>&1 && echo ok)
check "before ALTER EXTENSION UPDATE, sign-ups and re-inserts still work on the new library" "$(tail -n 1 <<<"$window")" "ok"

q "$A" "ALTER EXTENSION evoq UPDATE"
check "ALTER EXTENSION evoq UPDATE reaches $NEW" "$(q "$A" "SELECT extversion FROM pg_extension WHERE extname = 'evoq'")" "$NEW"
[ "$SELFTEST" = rows ] && q "$A" "DELETE FROM evoq.job_runs WHERE job = 'refresh_qr'"
q "$A" "$expected_migration" >/dev/null
row_changes=$(q "$A" "$compare_rows_a" 2>&1)
[ -z "$row_changes" ] || echo "$row_changes"
check "every row and value survives the upgrade from $OLD" "$(grep -c . <<<"$row_changes")" "0"
q "$A" "SET client_min_messages = warning; DROP SCHEMA upgrade_check CASCADE" # not evoq's

q "$C" "ALTER EXTENSION evoq UPDATE"
check "ALTER EXTENSION evoq UPDATE from $MID reaches $NEW" "$(q "$C" "SELECT extversion FROM pg_extension WHERE extname = 'evoq'")" "$NEW"
row_changes=$(q "$C" "$compare_rows_c" 2>&1)
[ -z "$row_changes" ] || echo "$row_changes"
check "every row and value survives the upgrade from $MID" "$(grep -c . <<<"$row_changes")" "0"
check "a partitioned profiles table got one delete trigger, cloned onto its partition" \
  "$(q "$C" "SELECT string_agg(tgrelid::regclass || ':' || (tgparentid <> 0), ',' ORDER BY tgrelid::regclass::text)
             FROM pg_trigger WHERE tgname = 'on_profile_deleted_delete_evolution_instance' AND tgrelid::regclass::text LIKE 'part_profiles%'")" \
  "part_profiles:false,part_profiles_br:true"
q "$C" "SET client_min_messages = warning; DROP SCHEMA upgrade_check CASCADE"

q "$D" "ALTER EXTENSION evoq UPDATE"
check "ALTER EXTENSION evoq UPDATE from $LAST reaches $NEW" "$(q "$D" "SELECT extversion FROM pg_extension WHERE extname = 'evoq'")" "$NEW"
row_changes=$(q "$D" "$compare_rows_d" 2>&1)
[ -z "$row_changes" ] || echo "$row_changes"
check "every row and value survives the upgrade from $LAST" "$(grep -c . <<<"$row_changes")" "0"
q "$D" "SET client_min_messages = warning; DROP SCHEMA upgrade_check CASCADE"

q "$E" "ALTER EXTENSION evoq UPDATE"
check "ALTER EXTENSION evoq UPDATE from $PREV reaches $NEW" "$(q "$E" "SELECT extversion FROM pg_extension WHERE extname = 'evoq'")" "$NEW"
row_changes=$(q "$E" "$compare_rows_e" 2>&1)
[ -z "$row_changes" ] || echo "$row_changes"
check "every row and value survives the upgrade from $PREV" "$(grep -c . <<<"$row_changes")" "0"
q "$E" "SET client_min_messages = warning; DROP SCHEMA upgrade_check CASCADE"

q "$F" "ALTER EXTENSION evoq UPDATE"
check "ALTER EXTENSION evoq UPDATE from $LATEST reaches $NEW" "$(q "$F" "SELECT extversion FROM pg_extension WHERE extname = 'evoq'")" "$NEW"
row_changes=$(q "$F" "$compare_rows_f" 2>&1)
[ -z "$row_changes" ] || echo "$row_changes"
check "every row and value survives the upgrade from $LATEST" "$(grep -c . <<<"$row_changes")" "0"
# 0.6.0: the server is data: `default` made, every instance on it, every queue row ever tried on
# it (its server may hold the instance), the never-tried sign-up unplaced (placed at its claim).
check "the upgrade from $LATEST makes the server default and places every row ever tried on it" \
  "$(q "$F" "SELECT concat_ws(',', (SELECT string_agg(name, '+') FROM evoq.servers),
       (SELECT count(*) FILTER (WHERE server = 'default') || '/' || count(*) FROM evolution_instances),
       (SELECT string_agg(coalesce(server, 'unplaced'), '+' ORDER BY coalesce(server, 'unplaced')) FROM evolution_instance_creation_queue))")" \
  "default,3/3,default+default+default+default+default+unplaced"
q "$F" "SET client_min_messages = warning; DROP SCHEMA upgrade_check CASCADE"

q "$G" "ALTER EXTENSION evoq UPDATE"
check "ALTER EXTENSION evoq UPDATE from $SIXTH reaches $NEW" "$(q "$G" "SELECT extversion FROM pg_extension WHERE extname = 'evoq'")" "$NEW"
row_changes=$(q "$G" "$compare_rows_g" 2>&1)
[ -z "$row_changes" ] || echo "$row_changes"
check "every row and value survives the upgrade from $SIXTH" "$(grep -c . <<<"$row_changes")" "0"
# 0.7.0: the open circuit is the server default's; default's connection stays evoq.settings'.
check "the upgrade from $SIXTH keys the circuit by its server, and default keeps its settings" \
  "$(q "$G" "SELECT concat_ws(',', (SELECT string_agg(server, '+') FROM evoq.circuit),
       (SELECT state FROM evoq_servers WHERE name = 'default'),
       (SELECT coalesce(api_url, 'none') || '/' || api_version FROM evoq.servers WHERE name = 'default'),
       (SELECT api_url IS NOT NULL FROM evoq_servers WHERE name = 'default'))")" \
  "default,circuit_open,none/auto,t"
q "$G" "SET client_min_messages = warning; DROP SCHEMA upgrade_check CASCADE"
check "the circuit 0.2.0 left open is the server default's after the upgrade" \
  "$(q "$C" "SELECT string_agg(server, '+') FROM evoq.circuit")" "default"

# --- database B: a fresh install; both must be the same, object for object -------------------------
q "$B" "CREATE EXTENSION evoq"
check "a fresh install is $NEW" "$(q "$B" "SELECT extversion FROM pg_extension WHERE extname = 'evoq'")" "$NEW"
profiles_with_trigger "$B"
partitioned_with_trigger "$B"
[ "$SELFTEST" = schema ] && q "$B" "ALTER TABLE evolution_instances ADD COLUMN selftest integer"

# pg_dump prints only CREATE EXTENSION for an extension's objects, except with --binary-upgrade,
# which prints each one with its definition, grants, comments and extension membership. What the
# filter drops differs between two equal databases:
read -r -d '' normalize <<'PERL'
s/^SELECT pg_catalog\.binary_upgrade_set_next_[^\n]*\n//mg;   # the OIDs, relfilenodes, LSNs objects happen to have
s/^-- For binary upgrade, set (heap|toast)'s relfrozenxid and relminmxid\nUPDATE pg_catalog\.pg_class\nSET relfrozenxid [^\n]*\nWHERE oid = [^\n]*\n//mg;   # a table's transaction horizon
s/(binary_upgrade_create_empty_extension\([^{]*)\{[\d,]*\}/$1\{config tables by oid\}/g;   # compared by name below
s/^\\(un)?restrict [^\n]*\n//mg;   # a random key per dump (15.14+)
s/^SELECT pg_catalog\.setval\([^\n]*\n//mg;   # where a sequence stands: data (the rows are compared above)
# Traces of ALTER TABLE in an upgraded table that a fresh one cannot have: the value rows older
# than an ADD COLUMN ... DEFAULT take (the DEFAULT itself is compared), and dropped columns.
s/^-- set missing value\.\nSELECT pg_catalog\.binary_upgrade_set_missing_value\([^\n]*\n//mg;
s/^-- For binary upgrade, recreate dropped column\.\n(?:[^\n]*\n){4}ALTER TABLE ONLY [^\n]* DROP COLUMN "\.+pg\.dropped\.\d+\.+";\n//mg;
s/,\n +"\.+pg\.dropped\.\d+\.+" INTEGER \/\* dummy \*\///g;
s/\(\n +"\.+pg\.dropped\.\d+\.+" INTEGER \/\* dummy \*\/,/(/g;
s/\n{3,}/\n\n/g;   # what the above leaves behind
PERL
schema() { # schema DB
  as_postgres "$PGBIN/pg_dump" -h "$CLUSTER_DIR" -p "$CLUSTER_PORT" -U postgres \
    --schema-only --binary-upgrade --extension=evoq "$1" | perl -0pe "$normalize" &&
  q "$1" "
    SELECT * FROM (SELECT 'config table ' || t.rel::regclass || ' dumped where ' || quote_literal(t.cond)
                   FROM pg_extension e, unnest(e.extconfig, e.extcondition) t(rel, cond)
                   WHERE e.extname = 'evoq' ORDER BY 1) c
    UNION ALL
    SELECT * FROM (SELECT 'member ' || pg_describe_object(classid, objid, objsubid) FROM pg_depend
                   WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
                     AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'evoq') ORDER BY 1) m"
}
schema "$A" >"$UC_DIR"/schema-upgraded.sql && schema "$B" >"$UC_DIR"/schema-fresh.sql &&
  schema "$C" >"$UC_DIR"/schema-from-020.sql && schema "$D" >"$UC_DIR"/schema-from-030.sql &&
  schema "$E" >"$UC_DIR"/schema-from-040.sql && schema "$F" >"$UC_DIR"/schema-from-050.sql &&
  schema "$G" >"$UC_DIR"/schema-from-060.sql
ntables=$(q "$B" "SELECT count(*) FROM pg_class WHERE relkind IN ('r', 'p') AND relnamespace::regnamespace::text IN ('public', 'evoq')")
check "both dumps show every table" "$(cat "$UC_DIR"/schema-{upgraded,fresh}.sql | grep -c '^CREATE TABLE')" "$((2 * ntables))"
if diff -u --label "upgraded from $OLD" --label "fresh $NEW" "$UC_DIR"/schema-{upgraded,fresh}.sql; then
  check "the upgraded schema equals a fresh install" same same
else
  check "the upgraded schema equals a fresh install (diff above)" differs same
fi
if diff -u --label "upgraded from $MID" --label "fresh $NEW" "$UC_DIR"/schema-{from-020,fresh}.sql; then
  check "the schema upgraded from $MID equals a fresh install" same same
else
  check "the schema upgraded from $MID equals a fresh install (diff above)" differs same
fi

if diff -u --label "upgraded from $LAST" --label "fresh $NEW" "$UC_DIR"/schema-{from-030,fresh}.sql; then
  check "the schema upgraded from $LAST equals a fresh install" same same
else
  check "the schema upgraded from $LAST equals a fresh install (diff above)" differs same
fi

if diff -u --label "upgraded from $PREV" --label "fresh $NEW" "$UC_DIR"/schema-{from-040,fresh}.sql; then
  check "the schema upgraded from $PREV equals a fresh install" same same
else
  check "the schema upgraded from $PREV equals a fresh install (diff above)" differs same
fi

if diff -u --label "upgraded from $LATEST" --label "fresh $NEW" "$UC_DIR"/schema-{from-050,fresh}.sql; then
  check "the schema upgraded from $LATEST equals a fresh install" same same
else
  check "the schema upgraded from $LATEST equals a fresh install (diff above)" differs same
fi

if diff -u --label "upgraded from $SIXTH" --label "fresh $NEW" "$UC_DIR"/schema-{from-060,fresh}.sql; then
  check "the schema upgraded from $SIXTH equals a fresh install" same same
else
  check "the schema upgraded from $SIXTH equals a fresh install (diff above)" differs same
fi

# --- the upgraded database works ----------------------------------------------------------------
# What pg_cron would run, verbatim: the commands scheduled under 0.1.0 must work against $NEW.
for job in process-evolution-queue refresh-qr-codes; do
  cmd=$(q "$A" "SELECT command FROM cron.job WHERE jobname = '$job'")
  check "cron job $job runs after the upgrade" "$([ -n "$cmd" ] && q "$A" "$cmd" >/dev/null && echo ok)" "ok"
done
check "the upgrade named evoq's schema in the jobs scheduled before (a look-alike earlier in the job role's search_path is not run)" \
  "$(q "$A" "SELECT string_agg(command, ' ' ORDER BY jobname) FROM cron.job WHERE jobname IN ('process-evolution-queue', 'refresh-qr-codes')")" \
  "SELECT public.evoq_process_queue() SELECT public.evoq_refresh_qr()"
check "the upgrade created the webhook secret and asks for every instance to be pointed at it" \
  "$(q "$A" "SELECT length(webhook_secret), webhook_changed_at IS NOT NULL FROM evoq.settings" | tr '|' ' ')" "64 t"
check "the upgrade attached the delete trigger where the insert trigger was" \
  "$(q "$A" "SELECT count(*) FROM pg_trigger WHERE tgname = 'on_profile_deleted_delete_evolution_instance' AND tgrelid = 'profiles'::regclass")" "1"
check "the never-tried user is completed after the upgrade" \
  "$(q "$A" "SELECT q.status FROM evolution_instance_creation_queue q JOIN profiles p ON p.id = q.user_id WHERE p.email = 'fay@example.com'")" \
  "completed"

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
