#!/usr/bin/env bash
# The background worker, really loaded: a PostgreSQL 15 cluster with shared_preload_libraries =
# 'pg_cron,evoq', the mock Evolution API delivering webhooks to the worker's listener, and no
# pg_cron job at all. Checks each point of the worker: it shows in pg_stat_activity and
# evoq_status; a sign-up is provisioned without any cron tick; the mock's webhooks reach the
# rows through the listener (and forged, oversized or broken ones do not); a kill -9 of the
# worker mid-call, a SIGTERM mid-call and `pg_ctl stop -m immediate` mid-call strand nothing
# (the lease brings the row back, adoption keeps one instance per user); SIGHUP moves the
# listener; an error in a step is logged and the loop goes on; its threads block every signal.
# Uses the extension as installed on the system (scripts/test.sh installs it first).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/cluster.sh

KEY="sk-evoq-worker-check"
DB=evoq_w LISTEN=127.0.0.1:18787 LISTEN2=127.0.0.1:18788 MOCK_PORT=18094
passed=0 failed=0
check() { # check NAME ACTUAL EXPECTED
  if [ "$2" = "$3" ]; then passed=$((passed + 1)); echo "ok   $1"
  else failed=$((failed + 1)); echo "FAIL $1: got '$2', expected '$3'"; fi
}
q() { cluster_psql -d "$DB" -tA -c "$1"; }
wait_for() { # wait_for SQL EXPECTED SECONDS: polls until SQL returns EXPECTED; prints the last value
  local v="" end=$((SECONDS + $3))
  while [ $SECONDS -le $end ]; do v=$(q "$1" 2>/dev/null); [ "$v" = "$2" ] && break; sleep 0.1; done
  echo "$v"
}
worker_pid() { q "SELECT pid FROM pg_stat_activity WHERE backend_type = 'evoq worker'"; }
wait_worker() { # wait_worker SECONDS [OTHER_THAN_PID]: prints the worker's pid once it runs
  local end=$((SECONDS + $1)) p=""
  while [ $SECONDS -le $end ]; do
    p=$(worker_pid 2>/dev/null)
    [ -n "$p" ] && [ "$p" != "${2:-}" ] && break
    p=""; sleep 0.2
  done
  echo "$p"
}
mock() { curl -fsS -X "$1" "http://127.0.0.1:$MOCK_PORT/__mock/$2" ${3:+-d "$3"}; }
creates_for() { # creates_for INSTANCE: create calls the mock received for it
  mock GET calls | python3 -c "import json,sys; print(sum(1 for c in json.load(sys.stdin) if c.get('path')=='/instance/create' and sys.argv[1] in json.dumps(c)))" "$1"
}
signup() { q "INSERT INTO profiles (email) VALUES ('$1@example.com') RETURNING id"; }
name_of() { q "SELECT evoq_instance_name('$1')"; }
status_of() { q "SELECT status FROM evolution_instance_creation_queue WHERE user_id = '$1'"; }

cargo build -p evolution-mock --release --quiet || exit 1
cluster_init /tmp/evoq-worker 55434 "$DB"
cat >>"$CLUSTER_DIR/data/postgresql.conf" <<CONF
shared_preload_libraries = 'pg_cron,evoq'
evoq.database_name = '$DB'
evoq.listen_address = '$LISTEN'
# A short HTTP timeout, so a lease (4 x timeout + 10 s) runs out within the test.
evoq.request_timeout_ms = 2000
CONF
target/release/evolution-mock --port $MOCK_PORT --api-key "$KEY" --qr-ttl-ms 1500 --webhook-retry-ms 200 \
  >/tmp/evoq-worker-mock.log 2>&1 &
mock_pid=$!
trap 'kill $mock_pid 2>/dev/null; cluster_stop immediate' EXIT
cluster_start
cluster_psql -d postgres -c "CREATE DATABASE $DB" >/dev/null

# --- 1. the worker, loaded -------------------------------------------------------------------------
pid=$(wait_worker 15)
check "the worker runs, named 'evoq worker' in pg_stat_activity" "$([ -n "$pid" ] && echo yes)" "yes"
q "CREATE EXTENSION pg_cron" >/dev/null
q "CREATE EXTENSION evoq" >/dev/null
check "evoq_status shows its pid and listener" \
  "$(q "SELECT worker_loaded, worker_pid = $pid, worker_listener, worker_started_at IS NOT NULL FROM evoq_status" | tr '|' ' ')" \
  "t t $LISTEN t"
check "its listener answers a health check" "$(curl -fsS "http://$LISTEN/health")" '{"status":"ok"}'
q "SELECT evoq_configure(api_url => 'http://127.0.0.1:$MOCK_PORT', api_key => '$KEY', webhook_url => 'http://$LISTEN/hook')" >/dev/null
q "CREATE TABLE profiles (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), email text)"
q "SELECT evoq_attach('profiles')" >/dev/null
check "no pg_cron job exists" "$(q "SELECT count(*) FROM cron.job")" "0"

# --- 2. a sign-up is provisioned without any cron tick -------------------------------------------
ana=$(signup ana)
check "a sign-up is provisioned by the worker alone (completed within 5 s)" \
  "$(wait_for "SELECT status FROM evolution_instance_creation_queue WHERE user_id = '$ana'" completed 5)" "completed"
ana_name=$(name_of "$ana")
check "exactly one create call for it" "$(creates_for "$ana_name")" "1"

check "the worker's updates reach the statistics autovacuum reads" \
  "$(wait_for "SELECT n_tup_upd > 0 FROM pg_stat_user_tables WHERE relid = 'evolution_instance_creation_queue'::regclass" t 10)" "t"
before=$(worker_pid)
q "SELECT pg_cancel_backend($before)" >/dev/null
sleep 1
check "pg_cancel_backend() on the worker is ignored" "$(worker_pid)" "$before"

# --- 6. the mock's webhooks reach the rows through the listener ------------------------------------
check "its QR arrives by webhook through the listener" \
  "$(wait_for "SELECT qr_text IS NOT NULL FROM evolution_instances WHERE user_id = '$ana'" t 5)" "t"
applied_before=$(q "SELECT webhooks_applied FROM evoq_status")
first=$(q "SELECT qr_text FROM evolution_instances WHERE user_id = '$ana'")
check "the QR follows the server's clock (a new one by webhook)" \
  "$(wait_for "SELECT qr_text <> '$first' FROM evolution_instances WHERE user_id = '$ana'" t 5)" "t"
check "deliveries are counted as applied" "$(q "SELECT webhooks_applied > $applied_before FROM evoq_status")" "t"
mock POST "instances/$ana_name/scan" '{"number": "5511999990000", "profile_name": "Ana"}' >/dev/null
check "a scan reaches the row through the listener" \
  "$(wait_for "SELECT instance_status || ' ' || owner_number FROM evolution_instances WHERE user_id = '$ana'" "open 5511999990000" 5)" \
  "open 5511999990000"
code() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
check "a delivery with a wrong secret is refused with 401" \
  "$(code -X POST "http://$LISTEN/hook" -H 'Content-Type: application/json' -H 'x-evoq-secret: guessed' \
       -d "{\"event\":\"connection.update\",\"instance\":\"$ana_name\",\"date_time\":\"2099-01-01T00:00:00.000Z\",\"data\":{\"state\":\"close\",\"statusReason\":401}}")" "401"
check "and it changed nothing" "$(q "SELECT instance_status FROM evolution_instances WHERE user_id = '$ana'")" "open"
secret=$(q "SELECT webhook_secret FROM evoq.settings")
check "a body that is not JSON gets 400" \
  "$(code -X POST "http://$LISTEN/hook" -H "x-evoq-secret: $secret" -H 'Content-Type: application/json' -d 'not json')" "400"
head -c 1100000 /dev/zero | tr '\0' 'x' >/tmp/evoq-worker-big.json
check "a body over 1 MiB gets 413" \
  "$(code -X POST "http://$LISTEN/hook" -H "x-evoq-secret: $secret" -H 'Content-Type: application/json' --data-binary @/tmp/evoq-worker-big.json)" "413"
check "the secret in the URL (v1.8's way) is accepted" \
  "$(code -X POST "http://$LISTEN/hook?evoq_secret=$secret" -H 'Content-Type: application/json' \
       -d "{\"event\":\"connection.update\",\"instance\":\"$ana_name\",\"date_time\":\"2099-01-01T00:00:00.000Z\",\"data\":{\"state\":\"close\",\"statusReason\":401}}")" "200"
check "and applied once committed (200 came after the commit)" \
  "$(q "SELECT instance_status FROM evolution_instances WHERE user_id = '$ana'")" "close"

# --- 7. its threads block every signal ------------------------------------------------------------
pid=$(worker_pid)
unblocked=$(for t in /proc/"$pid"/task/*; do
  [ "$(basename "$t")" = "$pid" ] && continue
  mask=$(sed -n 's/^SigBlk:\t//p' "$t/status")
  # SIGHUP 1, SIGINT 2, SIGUSR1 10, SIGTERM 15, SIGALRM 14, SIGURG 23: bits 0,1,9,13,14,22
  python3 -c "import sys; m=int(sys.argv[1],16); print('' if all(m>>b & 1 for b in (0,1,9,13,14,22)) else sys.argv[2])" "$mask" "$(cat "$t/comm")"
done | grep -c .)
threads=$(ls /proc/"$pid"/task | wc -l)
check "every thread of the worker but the main one blocks Postgres' signals ($((threads - 1)) threads)" "$unblocked" "0"

# --- 4. kill -9 of the worker mid-call: the postmaster restarts, the lease brings the row back ----
mock POST faults '{"method":"POST","path_contains":"/instance/create","kind":"delay","ms":1500,"times":1}' >/dev/null
bo=$(signup bo)
check "bo's create is in flight (claimed, committed as processing)" \
  "$(wait_for "SELECT status FROM evolution_instance_creation_queue WHERE user_id = '$bo'" processing 5)" "processing"
old=$(worker_pid)
kill -9 "$old"
new=$(wait_worker 30 "$old")
check "after kill -9 the postmaster started a new worker" "$([ -n "$new" ] && echo yes)" "yes"
check "the row is still processing under its lease (not stranded, not doubled)" "$(status_of "$bo")" "processing"
check "once the lease ran out the worker completed it" \
  "$(wait_for "SELECT status FROM evolution_instance_creation_queue WHERE user_id = '$bo'" completed 30)" "completed"
check "one instance for bo at the server (the retry adopted it)" \
  "$(mock GET instances | python3 -c "import json,sys; d=json.load(sys.stdin); print(sum(1 for i in d if '$(name_of "$bo")' in json.dumps(i)))")" "1"

# --- 7. SIGTERM mid-call: the worker stops within a second --------------------------------------
mock POST faults '{"method":"POST","path_contains":"/instance/create","kind":"delay","ms":1500,"times":1}' >/dev/null
cy=$(signup cy)
wait_for "SELECT status FROM evolution_instance_creation_queue WHERE user_id = '$cy'" processing 5 >/dev/null
old=$(worker_pid)
start=$(date +%s%N)
kill -TERM "$old"
while kill -0 "$old" 2>/dev/null && [ $(( ($(date +%s%N) - start) / 1000000 )) -lt 5000 ]; do sleep 0.02; done
stopped_ms=$(( ($(date +%s%N) - start) / 1000000 ))
check "SIGTERM during a call: the worker exits within a second (${stopped_ms} ms)" "$([ "$stopped_ms" -lt 1000 ] && echo yes)" "yes"
new=$(wait_worker 15 "$old")
check "the postmaster starts it again (pg_terminate_backend restarts it; evoq.worker = off stops it)" "$([ -n "$new" ] && echo yes)" "yes"
check "the abandoned row completes once its lease runs out" \
  "$(wait_for "SELECT status FROM evolution_instance_creation_queue WHERE user_id = '$cy'" completed 30)" "completed"

# --- pg_ctl stop -m immediate mid-call --------------------------------------------------------
mock POST faults '{"method":"POST","path_contains":"/instance/create","kind":"delay","ms":1500,"times":1}' >/dev/null
di=$(signup di)
wait_for "SELECT status FROM evolution_instance_creation_queue WHERE user_id = '$di'" processing 5 >/dev/null
cluster_stop immediate
cluster_start
check "after pg_ctl stop -m immediate the worker is back" "$([ -n "$(wait_worker 15)" ] && echo yes)" "yes"
check "and the row it had in flight completes" \
  "$(wait_for "SELECT status FROM evolution_instance_creation_queue WHERE user_id = '$di'" completed 30)" "completed"
check "one instance per user at the server after all three crashes" \
  "$(mock GET instances | python3 -c "import json,sys; print(len(json.load(sys.stdin)))")" "$(q "SELECT count(*) FROM profiles")"

# --- an error in a step is logged, the loop goes on --------------------------------------------
before=$(worker_pid)
q "ALTER TABLE evoq.job_runs RENAME TO job_runs_away" >/dev/null
ed=$(signup ed)
check "a step that fails (recording the run) shows in evoq_status.worker_last_error" \
  "$(wait_for "SELECT worker_last_error LIKE '%job_runs%' FROM evoq_status" t 10)" "t"
check "what was recorded before the failing step is kept (ed completed)" "$(status_of "$ed")" "completed"
q "ALTER TABLE evoq.job_runs_away RENAME TO job_runs" >/dev/null
gus=$(signup gus)
check "the loop goes on once the cause is gone" \
  "$(wait_for "SELECT status FROM evolution_instance_creation_queue WHERE user_id = '$gus'" completed 40)" "completed"
check "in the same process (the error did not kill the worker)" "$(worker_pid)" "$before"
check "the worker logged the failure" "$(grep -c 'evoq worker: .*job_runs' "$CLUSTER_DIR/server.log" | awk '{print ($1 > 0)}')" "1"

# --- SIGHUP: the listener moves ---------------------------------------------------------------
q "ALTER SYSTEM SET evoq.listen_address = '$LISTEN2'" >/dev/null
q "SELECT pg_reload_conf()" >/dev/null
check "after a reload the listener is on the new address" \
  "$(wait_for "SELECT worker_listener FROM evoq_status" "$LISTEN2" 5)" "$LISTEN2"
check "the new address answers" "$(curl -fsS "http://$LISTEN2/health")" '{"status":"ok"}'
check "the old one is closed" "$(curl -s -o /dev/null -w '%{http_code}' "http://$LISTEN/health")" "000"
q "ALTER SYSTEM SET evoq.worker = off" >/dev/null
q "SELECT pg_reload_conf()" >/dev/null
sleep 1
fi_=$(signup fi)
sleep 2
check "evoq.worker = off: a sign-up waits (for pg_cron or the worker)" "$(status_of "$fi_")" "pending"
check "and the listener is closed" "$(curl -s -o /dev/null -w '%{http_code}' "http://$LISTEN2/health")" "000"
q "ALTER SYSTEM SET evoq.worker = on" >/dev/null
q "SELECT pg_reload_conf()" >/dev/null
check "turned on again, the worker takes it" \
  "$(wait_for "SELECT status FROM evolution_instance_creation_queue WHERE user_id = '$fi_'" completed 10)" "completed"
check "no API key in the server log" "$(grep -c -- "$KEY" "$CLUSTER_DIR/server.log")" "0"

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
