#!/usr/bin/env bash
# The main job, end to end, against the bundled mock Evolution API:
# builds and installs evoq, starts a local PostgreSQL 15 cluster with pg_cron and the mock server,
# signs up a few users, lets pg_cron and evoq do their work, and shows the queue and instances.
# With the mock, the server's webhooks reach evoq_webhook through postgrest-standin (what PostgREST
# does for /rest/v1/rpc/evoq_webhook): QRs arrive as the server issues them and a scan is seen at once.
#   --worker           run it with the background worker (shared_preload_libraries) instead: sign-ups
#                      provisioned at once, webhooks delivered straight to the worker's listener
#   --two-servers      two mock Evolution servers, two live instances each at most: the sign-ups are
#                      placed by free capacity (with --worker too)
#   EVOQ_DEMO_KEEP=1   leave the cluster and the mock running afterwards (psql line printed)
#   EVOQ_API_URL/EVOQ_API_KEY   use a real Evolution API server instead of the mock
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/cluster.sh

scripts/setup.sh
echo "== building the mock Evolution API and installing evoq (release build, a few minutes the first time)"
cargo build -p evolution-mock --release --quiet
cargo pgrx install --release --pg-config "$PGBIN/pg_config" >/dev/null

WORKER=0 TWO=0
for arg in "$@"; do
  case $arg in
    --worker) WORKER=1 ;;
    --two-servers) TWO=1 ;;
    *) echo "demo: unknown option $arg (--worker, --two-servers)" >&2; exit 2 ;;
  esac
done
cluster_init /tmp/evoq-demo 55432 evoq_demo
if [ "$WORKER" = 1 ]; then
  cat >>"$CLUSTER_DIR/data/postgresql.conf" <<CONF
shared_preload_libraries = 'pg_cron,evoq'
evoq.database_name = 'evoq_demo'
evoq.listen_address = '127.0.0.1:18082'
CONF
fi
cluster_start
STANDIN_PID= MOCK2_PID=
stop_all() {
  mock_stop; [ -n "$STANDIN_PID" ] && kill "$STANDIN_PID" 2>/dev/null
  [ -n "$MOCK2_PID" ] && kill "$MOCK2_PID" 2>/dev/null; cluster_stop
}
if [ "${EVOQ_DEMO_KEEP:-0}" != 1 ]; then trap stop_all EXIT; fi
if [ -n "${EVOQ_API_URL:-}" ]; then
  API_URL=$EVOQ_API_URL API_KEY=${EVOQ_API_KEY:?set EVOQ_API_KEY too}
  WEBHOOK_URL=https://app.example.com/hooks/evolution
else
  API_KEY=demo-global-key
  # QRs every 5 s instead of 45 s, so the demo shows a few.
  mock_start 18080 --api-key "$API_KEY" --qr-ttl-ms 5000 --webhook-retry-ms 500
  API_URL=$MOCK_URL
  if [ "$TWO" = 1 ]; then
    target/release/evolution-mock --port 18083 --api-key "$API_KEY" --qr-ttl-ms 5000 --webhook-retry-ms 500 \
      >"$CLUSTER_DIR/mock2.log" 2>&1 &
    MOCK2_PID=$! MOCK2_URL=http://127.0.0.1:18083
    for _ in $(seq 100); do curl -fsS "$MOCK2_URL/" >/dev/null 2>&1 && break; sleep 0.1; done
  fi
  target/release/postgrest-standin --port 18081 --role anon -- -h 127.0.0.1 -p "$CLUSTER_PORT" -U postgres -d evoq_demo -X \
    >"$CLUSTER_DIR/standin.log" 2>&1 &
  STANDIN_PID=$!
  WEBHOOK_URL=http://127.0.0.1:18081/rest/v1/rpc/evoq_webhook
  # With the worker, the mock delivers to its listener: no PostgREST in between.
  [ "$WORKER" = 1 ] && WEBHOOK_URL=http://127.0.0.1:18082/
fi
echo "== cluster at $CLUSTER_DIR (port $CLUSTER_PORT), Evolution API at $API_URL"
cluster_psql -d postgres -c "CREATE DATABASE evoq_demo"

run() { echo; echo "evoq_demo=# $1"; cluster_psql -d evoq_demo -P pager=off -c "$1"; }
run "CREATE EXTENSION pg_cron"
run "CREATE ROLE anon NOLOGIN"   # PostgREST's anonymous role: the Evolution server has no JWT
run "CREATE EXTENSION evoq"
if [ "$WORKER" = 1 ]; then
  echo; echo "== the worker retries every 5 s until its database (evoq.database_name) exists; waiting for it"
  for _ in $(seq 100); do
    [ -n "$(cluster_psql -d evoq_demo -tA -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'evoq worker'")" ] && break
    sleep 0.1
  done
  run "SELECT pid, backend_type, datname, state FROM pg_stat_activity WHERE backend_type = 'evoq worker'"
fi
run "SELECT evoq_configure(api_url => '$API_URL', api_key => '$API_KEY', webhook_url => '$WEBHOOK_URL', webhook_headers => '{\"apikey\": \"<anon key>\"}')" \
  | sed "s/$API_KEY/***/g"
if [ "$TWO" = 1 ] && [ -n "${MOCK2_URL:-}" ]; then
  echo; echo "== a second Evolution server; each may hold two live instances"
  run "SELECT evoq_server_set('default', capacity => 2)"
  run "SELECT evoq_server_add('b', '$MOCK2_URL', '$API_KEY', capacity => 2)" | sed "s/$API_KEY/***/g"
fi
run "CREATE TABLE profiles (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), email text NOT NULL)"
run "SELECT evoq_attach('profiles')"
run "SELECT evoq_schedule()"
run "SELECT jobid, jobname, schedule, command, active FROM cron.job ORDER BY jobname"
run "INSERT INTO profiles (email) VALUES ('ana@example.com'), ('bruno@example.com'), ('carla@example.com')"
run "SELECT p.email, q.status, q.retry_count, q.created_at FROM evolution_instance_creation_queue q JOIN profiles p ON p.id = q.user_id ORDER BY p.email"

wait_sql() { # wait_sql SQL EXPECTED: up to 10 s
  for _ in $(seq 200); do [ "$(cluster_psql -d evoq_demo -tA -c "$1")" = "$2" ] && return 0; sleep 0.05; done
}
if [ "$WORKER" = 1 ]; then
  echo; echo "== the background worker was woken by the commit: no cron tick, no call by hand"
  wait_sql "SELECT count(*) FROM evolution_instance_creation_queue WHERE status = 'completed'" 3
  run "SELECT p.email, q.status, q.processed_at - q.created_at AS waited FROM evolution_instance_creation_queue q JOIN profiles p ON p.id = q.user_id ORDER BY p.email"
  run "SELECT worker_pid, worker_listener, worker_in_flight, worker_last_loop_at FROM evoq_status"
else
  echo; echo "== process-evolution-queue runs every 5 minutes; run its command now rather than wait"
  run "SELECT evoq_process_queue()"
fi
if [ "$TWO" = 1 ]; then
  echo; echo "== placed by free capacity: each instance at one server, none past its capacity"
  run "SELECT p.email, i.server, i.instance_status FROM evolution_instances i JOIN profiles p ON p.id = i.user_id ORDER BY p.email"
  run "SELECT name, state, api_url, capacity, live_instances, free_slots FROM evoq_servers ORDER BY name"
fi
if [ -n "$STANDIN_PID" ]; then
  echo; echo "== the server pushes each new QR to evoq_webhook: no refresh has run, yet the QRs are there"
  for _ in $(seq 50); do
    [ "$(cluster_psql -d evoq_demo -tA -c "SELECT count(*) FROM evolution_instances WHERE qr_text IS NOT NULL")" = 3 ] && break
    sleep 0.1
  done
  run "SELECT p.email, i.instance_status, left(i.qr_text, 16) || '...' AS qr_text, i.last_qr_update FROM evolution_instances i JOIN profiles p ON p.id = i.user_id ORDER BY p.email"
  sleep 5.5
  echo; echo "== five seconds later the server has rotated its QRs, and the rows followed"
  run "SELECT p.email, left(i.qr_text, 16) || '...' AS qr_text, i.last_qr_update FROM evolution_instances i JOIN profiles p ON p.id = i.user_id ORDER BY p.email"
  run "SELECT webhooks_applied, webhooks_ignored, webhooks_rejected FROM evoq_status"
fi
echo; echo "== waiting (up to a minute) for pg_cron to fire refresh-qr-codes (the fallback when no webhook arrives)"
for _ in $(seq 80); do
  fired=$(cluster_psql -d evoq_demo -tA -c "SELECT count(*) FROM cron.job_run_details d JOIN cron.job j USING (jobid) WHERE j.jobname = 'refresh-qr-codes' AND d.status = 'succeeded'")
  [ "$fired" -ge 1 ] && break
  sleep 1
done
run "SELECT j.jobname, d.status, d.return_message, d.start_time FROM cron.job_run_details d JOIN cron.job j USING (jobid) ORDER BY d.start_time"
run "SELECT p.email, q.status, q.instance_name, q.processed_at FROM evolution_instance_creation_queue q JOIN profiles p ON p.id = q.user_id ORDER BY p.email"
run "SELECT p.email, i.instance_status, left(i.qr_code, 40) || '...' AS qr_code, left(i.qr_text, 16) || '...' AS qr_text, i.last_qr_update FROM evolution_instances i JOIN profiles p ON p.id = i.user_id ORDER BY p.email"

if [ -z "${EVOQ_API_URL:-}" ]; then
  echo; echo "== ana scans her QR code; the server's connection.update reaches the row at once, no refresh needed"
  ana=$(cluster_psql -d evoq_demo -tA -c "SELECT i.instance_name FROM evolution_instances i JOIN profiles p ON p.id = i.user_id WHERE p.email = 'ana@example.com'")
  ana_url=$MOCK_URL
  [ "$(cluster_psql -d evoq_demo -tA -c "SELECT server FROM evolution_instances WHERE instance_name = '$ana'")" = b ] && ana_url=$MOCK2_URL
  curl -fsS -X POST "$ana_url/__mock/instances/$ana/scan" -d '{"number": "5511987654321", "profile_name": "Ana"}' >/dev/null
  start=$(date +%s%N)
  for _ in $(seq 50); do
    [ "$(cluster_psql -d evoq_demo -tA -c "SELECT instance_status FROM evolution_instances WHERE instance_name = '$ana'")" = open ] && break
    sleep 0.05
  done
  echo "(open in the row $(( ($(date +%s%N) - start) / 1000000 )) ms after the scan)"
  run "SELECT p.email, i.instance_status, i.owner_number, i.profile_name, i.qr_code IS NOT NULL AS has_qr, i.connected_at FROM evolution_instances i JOIN profiles p ON p.id = i.user_id ORDER BY p.email"
  echo; echo "== bruno deletes his account: his WhatsApp session is logged out and deleted at the server"
  run "DELETE FROM profiles WHERE email = 'bruno@example.com'"
  if [ "$WORKER" = 1 ]; then
    wait_sql "SELECT instance_status FROM evolution_instances i JOIN evolution_instance_creation_queue q USING (user_id) WHERE q.action = 'delete'" deleted
  else
    run "SELECT evoq_process_queue()"
  fi
  run "SELECT p.email, q.action, q.status, i.instance_status, i.disconnect_reason FROM evolution_instance_creation_queue q LEFT JOIN evolution_instances i USING (user_id) LEFT JOIN profiles p ON p.id = q.user_id ORDER BY q.created_at"
fi
run "SELECT pending, completed, failed, instances_connecting, instances_open, instances_deleted, webhooks_applied, last_process_run_at, last_error FROM evoq_status"

if [ "${EVOQ_DEMO_KEEP:-0}" = 1 ]; then
  echo; echo "Left running. Connect with: sudo -u postgres psql -h $CLUSTER_DIR -p $CLUSTER_PORT evoq_demo"
fi
