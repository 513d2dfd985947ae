#!/usr/bin/env bash
# Integration tests against a real PostgreSQL 15 cluster and the mock Evolution API binary, for
# what a #[pg_test] cannot do from inside one backend: install from the extension package as a
# user does, stop the whole cluster with `pg_ctl stop -m immediate` in the middle of a batch,
# pg_dump and restore, and read the server log for the API key.
# Uses the extension as installed on the system (scripts/test.sh runs cargo pgrx test first,
# which installs it; otherwise run `cargo pgrx install`).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/cluster.sh

KEY="sk-evoq-integration-5b2e-NEVER-PRINT"
source scripts/lib/checks.sh
q() { cluster_psql -d "${DB:-evoq_it}" -tA -c "$1"; }
mock_count() { # mock_count calls|instances [path]
  curl -fsS "$MOCK_URL/__mock/$1" | python3 -c "import json,sys; d=json.load(sys.stdin); p=sys.argv[1]; print(sum(1 for c in d if not p or c.get('path')==p))" "${2:-}"
}

cargo build -p evolution-mock --release --quiet
cluster_init /tmp/evoq-it 55433 evoq_it
cluster_start
trap 'mock_stop; cluster_stop immediate' EXIT
mock_start 18091 --api-key "$KEY"

cluster_psql -c "CREATE DATABASE evoq_it" -d postgres
q "CREATE EXTENSION evoq"
check "CREATE EXTENSION evoq works without pg_cron" "$(q "SELECT extversion FROM pg_extension WHERE extname = 'evoq'")" "$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)"
err=$(q "SELECT evoq_schedule()" 2>&1)
check "evoq_schedule without pg_cron names the fix" "$(grep -c 'pg_cron is not installed' <<<"$err")" "1"
q "CREATE EXTENSION pg_cron" >/dev/null
q "SELECT evoq_configure(api_url => '$MOCK_URL', api_key => '$KEY', webhook_url => 'https://app.example/hook')" >/dev/null
q "CREATE TABLE profiles (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), email text)"
q "SELECT evoq_attach('profiles')" >/dev/null
q "SELECT evoq_schedule()" >/dev/null
check "cron commands carry no key" "$(q "SELECT count(*) FROM cron.job WHERE command LIKE '%$KEY%'")" "0"
check "cron jobs as named" "$(q "SELECT string_agg(jobname || ' ' || schedule, ',' ORDER BY jobname) FROM cron.job")" \
  "process-evolution-queue */5 * * * *,refresh-qr-codes */1 * * * *"
q "SELECT evoq_unschedule()" >/dev/null  # the test drives the jobs itself

# --- the whole cluster stops hard in the middle of a batch -------------------------------------
q "INSERT INTO profiles (email) SELECT 'u' || g || '@example.com' FROM generate_series(1, 40) g"
curl -fsS -X POST "$MOCK_URL/__mock/config" -d '{"latency_ms": 150}' >/dev/null
cluster_psql -d evoq_it -c "SET evoq.concurrency = 4; SET evoq.batch_size = 8; SELECT evoq_process_queue()" >/dev/null 2>&1 &
psql_pid=$!
for _ in $(seq 100); do
  [ "$(mock_count calls /instance/create)" -ge 10 ] && break
  sleep 0.1
done
running=$(q "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%evoq_process_queue%' AND pid <> pg_backend_pid()")
check "a run is in flight when the cluster is stopped" "$running" "1"
check "pg_stat_activity shows no key" "$(q "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%$KEY%' AND pid <> pg_backend_pid()")" "0"
cluster_stop immediate
wait "$psql_pid" 2>/dev/null
cluster_start
check "after the crash nothing is processing" "$(q "SELECT count(*) FROM evolution_instance_creation_queue WHERE status <> 'pending'")" "0"
curl -fsS -X POST "$MOCK_URL/__mock/config" -d '{"latency_ms": 0}' >/dev/null
summary=$(q "SELECT evoq_process_queue()")
check "every user completed after restart" "$(q "SELECT count(*) FROM evolution_instance_creation_queue WHERE status = 'completed'")" "40"
check "exactly one instance per user at the server" "$(mock_count instances)" "40"
check "one instance row per user" "$(q "SELECT count(DISTINCT instance_name) FROM evolution_instances")" "40"
check "the lost answers were adopted, not duplicated" "$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['adopted'] > 0)" "$summary")" "True"

# --- backup and restore ------------------------------------------------------------------------
curl -fsS -X POST "$MOCK_URL/__mock/faults" -d '{"method":"POST","path_contains":"/instance/create","kind":"status","code":400}' >/dev/null
q "INSERT INTO profiles (email) VALUES ('bad1@example.com'), ('bad2@example.com')"
q "SELECT evoq_process_queue()" >/dev/null
curl -fsS -X DELETE "$MOCK_URL/__mock/faults" >/dev/null
q "SELECT evoq_refresh_qr()" >/dev/null
fingerprint="SELECT md5(string_agg(x, '|' ORDER BY x)) FROM (
  SELECT concat_ws(',', user_id, request_id, status, error_message, retry_count, attempts, instance_name) AS x FROM evolution_instance_creation_queue
  UNION ALL SELECT concat_ws(',', user_id, instance_name, instance_id, instance_status, qr_text, last_qr_update) FROM evolution_instances
  UNION ALL SELECT concat_ws(',', instance_name, token) FROM evoq.instance_tokens) t"
before=$(q "$fingerprint")
check "two failed rows before the dump" "$(q "SELECT count(*) FROM evolution_instance_creation_queue WHERE status = 'failed'")" "2"
as_postgres "$PGBIN/pg_dump" -h "$CLUSTER_DIR" -p "$CLUSTER_PORT" -U postgres -Fc -f "$CLUSTER_DIR/evoq_it.dump" evoq_it
cluster_psql -d postgres -c "CREATE DATABASE evoq_restored"
as_postgres "$PGBIN/pg_restore" -h "$CLUSTER_DIR" -p "$CLUSTER_PORT" -U postgres -d evoq_restored "$CLUSTER_DIR/evoq_it.dump" 2>"$CLUSTER_DIR/restore.log"
DB=evoq_restored
check "rows, statuses, instances and tokens survive pg_dump/restore" "$(q "$fingerprint")" "$before"
check "the trigger survives too" "$(q "SELECT count(*) FROM pg_trigger WHERE tgname = 'on_profile_created_create_evolution_instance' AND tgenabled = 'O'")" "1"
check "evoq_retry works in the restored database" "$(q "SELECT evoq_retry()")" "2"
# A restored copy pointed at the same server must not take over the original's instances.
calls_before=$(mock_count calls)
err=$(q "SELECT evoq_process_queue()" 2>&1)
check "the restored copy refuses to call the server until told it is a copy" "$(grep -c 'not the one evoq was configured in' <<<"$err")" "1"
check "and it made no call" "$(mock_count calls)" "$calls_before"
q "SELECT evoq_configure(api_url => '$MOCK_URL', api_key => '$KEY', namespace => 'restored')" >/dev/null
q "SELECT evoq_process_queue()" >/dev/null
check "once given its own namespace, the copy creates its own instances" \
  "$(q "SELECT count(*) FROM evolution_instance_creation_queue WHERE status = 'completed' AND instance_name LIKE 'evoq\_restored\_%'")" "2"
check "one instance per user at the server, none taken over" "$(mock_count instances)" "42"
DB=evoq_it

# --- secrets in the server log -------------------------------------------------------------------
# Faults from an unreachable server, and bad configuration attempts, all logged at default levels.
q "SELECT evoq_configure(api_url => 'http://127.0.0.1:9', api_key => '$KEY')" >/dev/null
q "INSERT INTO profiles (email) VALUES ('late@example.com')"
q "SELECT evoq_process_queue()" >/dev/null
q "SELECT evoq_configure(api_url => 'ftp://nope', api_key => '$KEY')" >/dev/null 2>&1
# A call that fails before evoq_configure runs (a misspelled argument) logs its statement: the key
# read from a file is not in that text.
printf '%s' "$KEY" >"$CLUSTER_DIR/api_key"; chown postgres "$CLUSTER_DIR/api_key"; chmod 600 "$CLUSTER_DIR/api_key"
q "SELECT evoq_configure(api_urll => '$MOCK_URL', api_key => pg_read_file('$CLUSTER_DIR/api_key'))" >/dev/null 2>&1
check "a call that fails before it runs logs its statement" "$(grep -c "STATEMENT:.*api_urll" "$CLUSTER_DIR/server.log")" "1"
check "the API key is nowhere in the server log" "$(grep -c -- "$KEY" "$CLUSTER_DIR/server.log")" "0"
check "the cause is in evoq_status, the row is not charged" \
  "$(q "SELECT circuit_cause LIKE '%connection refused%' FROM evoq_status")$(q "SELECT attempts FROM evolution_instance_creation_queue q JOIN profiles p ON p.id = q.user_id WHERE p.email = 'late@example.com'")" "t0"

# --- scheduling from a database pg_cron does not run in ---------------------------------------------
err=$(cluster_psql -d evoq_restored -tA -c "SELECT evoq_schedule()" 2>&1)
check "evoq_schedule outside cron.database_name says what to run there" \
  "$(grep -c "cron.schedule_in_database('process-evolution-queue'" <<<"$err")" "1"

# --- Supabase's default privileges in place before CREATE EXTENSION ----------------------------------
cluster_psql -d postgres -c "CREATE DATABASE evoq_supa" >/dev/null
DB=evoq_supa
q "CREATE ROLE anon NOLOGIN; CREATE ROLE authenticated NOLOGIN; CREATE ROLE service_role NOLOGIN;
   CREATE SCHEMA auth; GRANT USAGE ON SCHEMA auth TO anon, authenticated, service_role;
   CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS \$\$ SELECT (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')::uuid \$\$;
   ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO anon, authenticated, service_role;
   ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON FUNCTIONS TO anon, authenticated, service_role;
   ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON SEQUENCES TO anon, authenticated, service_role;
   GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role" >/dev/null 2>&1
q "CREATE EXTENSION evoq" >/dev/null
q "INSERT INTO evolution_instance_creation_queue (user_id) VALUES (gen_random_uuid())" >/dev/null
for role in anon authenticated service_role; do
  err=$(q "SET ROLE $role; TRUNCATE evolution_instance_creation_queue" 2>&1)
  check "with Supabase's default privileges, $role cannot TRUNCATE the queue" "$(grep -c 'permission denied' <<<"$err")" "1"
  err=$(q "SET ROLE $role; SELECT evoq_configure('http://attacker.example', 'k')" 2>&1)
  check "with Supabase's default privileges, $role cannot call evoq_configure" "$(grep -c 'permission denied' <<<"$err")" "1"
done
check "the queue row survived" "$(q "SELECT count(*) FROM evolution_instance_creation_queue")" "1"
DB=evoq_it

# --- webhooks over HTTP: the mock delivers, a PostgREST stand-in calls evoq_webhook as anon ------------
# PostgREST is not packaged here; postgrest-standin does what it does for this call (SET LOCAL ROLE
# anon, request.headers, the body as the jsonb argument), through psql over TCP.
cluster_psql -d postgres -c "CREATE DATABASE evoq_hooks" >/dev/null
DB=evoq_hooks
HOOK_MOCK=http://127.0.0.1:18092 STANDIN_PORT=18093
target/release/evolution-mock --port 18092 --api-key "$KEY" --qr-ttl-ms 1000 --webhook-retry-ms 200 >"$CLUSTER_DIR/mock-hooks.log" 2>&1 &
hook_mock_pid=$!
target/release/postgrest-standin --port $STANDIN_PORT --role anon -- -h 127.0.0.1 -p "$CLUSTER_PORT" -U postgres -d evoq_hooks -X \
  >"$CLUSTER_DIR/standin.log" 2>&1 &
standin_pid=$!
trap 'kill $hook_mock_pid $standin_pid 2>/dev/null; mock_stop; cluster_stop immediate' EXIT
for _ in $(seq 100); do curl -fsS "$HOOK_MOCK/" >/dev/null 2>&1 && grep -q listening "$CLUSTER_DIR/standin.log" && break; sleep 0.1; done
q "CREATE ROLE anon NOLOGIN" >/dev/null 2>&1
q "CREATE EXTENSION evoq" >/dev/null
q "SELECT evoq_configure(api_url => '$HOOK_MOCK', api_key => '$KEY',
     webhook_url => 'http://127.0.0.1:$STANDIN_PORT/rest/v1/rpc/evoq_webhook',
     webhook_headers => '{\"apikey\": \"anon-gateway-key\"}')" >/dev/null
q "CREATE TABLE profiles (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), email text)"
q "SELECT evoq_attach('profiles')" >/dev/null
q "INSERT INTO profiles (email) VALUES ('ana@example.com'), ('bo@example.com')"
q "SELECT evoq_process_queue()" >/dev/null
ana=$(q "SELECT i.instance_name FROM evolution_instances i JOIN profiles p ON p.id = i.user_id WHERE p.email = 'ana@example.com'")
bo=$(q "SELECT i.instance_name FROM evolution_instances i JOIN profiles p ON p.id = i.user_id WHERE p.email = 'bo@example.com'")
wait_for() { # wait_for SQL EXPECTED SECONDS: polls until SQL returns EXPECTED; prints the last value
  local v="" end=$((SECONDS + $3))
  while [ $SECONDS -le $end ]; do v=$(q "$1"); [ "$v" = "$2" ] && break; sleep 0.1; done
  echo "$v"
}
check "a QR arrives by webhook, with no refresh run" \
  "$(wait_for "SELECT qr_text IS NOT NULL FROM evolution_instances WHERE instance_name = '$ana'" t 5)" "t"
first=$(q "SELECT qr_text FROM evolution_instances WHERE instance_name = '$ana'")
check "the stored QR follows the server's clock" \
  "$(wait_for "SELECT qr_text <> '$first' FROM evolution_instances WHERE instance_name = '$ana'" t 5)" "t"
check "no refresh ran at all" "$(q "SELECT count(*) FROM evoq.job_runs WHERE job = 'refresh_qr'")" "0"
curl -fsS -X POST "$HOOK_MOCK/__mock/instances/$ana/scan" -d '{"number": "5511999990000", "profile_name": "Ana"}' >/dev/null
check "a scan is noticed at once (open, with the owner's number)" \
  "$(wait_for "SELECT instance_status || ' ' || owner_number FROM evolution_instances WHERE instance_name = '$ana'" "open 5511999990000" 3)" "open 5511999990000"
curl -fsS -X POST "$HOOK_MOCK/__mock/instances/$ana/unlink" >/dev/null
check "a phone that unlinks is noticed at once" \
  "$(wait_for "SELECT instance_status FROM evolution_instances WHERE instance_name = '$ana'" close 3)" "close"
forged=$(curl -s -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:$STANDIN_PORT/rest/v1/rpc/evoq_webhook" \
  -H 'Content-Type: application/json' -H 'x-evoq-secret: guessed' \
  -d "{\"event\":\"connection.update\",\"instance\":\"$bo\",\"data\":{\"state\":\"open\"}}")
check "a forged delivery is refused with 401 (the server does not retry it)" "$forged" "401"
check "and counted, and it changed nothing" \
  "$(q "SELECT webhooks_rejected FROM evoq_status")$(q "SELECT instance_status FROM evolution_instances WHERE instance_name = '$bo'")" "1connecting"
# Two kinds of delivery racing for one row, 10 of each at once, arriving in any order: the newer
# (by the server's date_time) wins, whatever came last.
secret=$(q "SELECT webhook_secret FROM evoq.settings")
racers=()
for _ in $(seq 10); do
  for body in "{\"event\":\"connection.update\",\"instance\":\"$bo\",\"date_time\":\"2099-01-01T10:00:00.000Z\",\"data\":{\"state\":\"open\",\"statusReason\":200}}" \
              "{\"event\":\"connection.update\",\"instance\":\"$bo\",\"date_time\":\"2099-01-01T10:00:01.000Z\",\"data\":{\"state\":\"close\",\"statusReason\":401}}"; do
    curl -s -o /dev/null -X POST "http://127.0.0.1:$STANDIN_PORT/rest/v1/rpc/evoq_webhook" \
      -H 'Content-Type: application/json' -H "x-evoq-secret: $secret" -d "$body" &
    racers+=($!)
  done
done
wait "${racers[@]}"
check "racing deliveries end in the newer state" \
  "$(q "SELECT instance_status FROM evolution_instances WHERE instance_name = '$bo'")" "close"
# Deprovisioning: the profile goes, its instance is logged out and deleted at the server.
q "DELETE FROM profiles WHERE email = 'ana@example.com'"
q "SELECT evoq_process_queue()" >/dev/null
check "a deleted profile's instance is gone from the server" \
  "$(curl -fsS "$HOOK_MOCK/__mock/sockets" | python3 -c "import json,sys; d=json.load(sys.stdin); print('$ana' in d['per_instance'], d['orphans'])")" "False 0"
check "its row says deleted, and later deliveries leave it so" \
  "$(wait_for "SELECT instance_status FROM evolution_instances WHERE instance_name = '$ana'" deleted 3)" "deleted"
undelivered=$(curl -fsS "$HOOK_MOCK/__mock/deliveries" | python3 -c "import json,sys; print(sum(1 for d in json.load(sys.stdin) if not d['delivered'] and not d['pending']))")
check "every delivery of the mock was acknowledged" "$undelivered" "0"
DB=evoq_it

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
