#!/usr/bin/env bash
# The main job, end to end, against the bundled mock Evolution API:
# builds and installs evoq, starts a local PostgreSQL 15 cluster with pg_cron and the mock server,
# signs up a few users, lets pg_cron and evoq do their work, and shows the queue and instances.
#   EVOQ_DEMO_KEEP=1   leave the cluster and the mock running afterwards (psql line printed)
#   EVOQ_API_URL/EVOQ_API_KEY   use a real Evolution API server instead of the mock
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/cluster.sh

scripts/setup.sh
echo "== building the mock Evolution API and installing evoq (release build, a few minutes the first time)"
cargo build -p evolution-mock --release --quiet
cargo pgrx install --release --pg-config "$PGBIN/pg_config" >/dev/null

cluster_init /tmp/evoq-demo 55432 evoq_demo
cluster_start
if [ "${EVOQ_DEMO_KEEP:-0}" != 1 ]; then trap 'mock_stop; cluster_stop' EXIT; fi
if [ -n "${EVOQ_API_URL:-}" ]; then
  API_URL=$EVOQ_API_URL API_KEY=${EVOQ_API_KEY:?set EVOQ_API_KEY too}
else
  API_KEY=demo-global-key
  mock_start 18080 --api-key "$API_KEY"
  API_URL=$MOCK_URL
fi
echo "== cluster at $CLUSTER_DIR (port $CLUSTER_PORT), Evolution API at $API_URL"
cluster_psql -d postgres -c "CREATE DATABASE evoq_demo"

run() { echo; echo "evoq_demo=# $1"; cluster_psql -d evoq_demo -P pager=off -c "$1"; }
run "CREATE EXTENSION pg_cron"
run "CREATE EXTENSION evoq"
run "SELECT evoq_configure(api_url => '$API_URL', api_key => '$API_KEY', webhook_url => 'https://app.example.com/hooks/evolution')" \
  | sed "s/$API_KEY/***/g"
run "CREATE TABLE profiles (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), email text NOT NULL)"
run "SELECT evoq_attach('profiles')"
run "SELECT evoq_schedule()"
run "SELECT jobid, jobname, schedule, command, active FROM cron.job ORDER BY jobname"
run "INSERT INTO profiles (email) VALUES ('ana@example.com'), ('bruno@example.com'), ('carla@example.com')"
run "SELECT p.email, q.status, q.retry_count, q.created_at FROM evolution_instance_creation_queue q JOIN profiles p ON p.id = q.user_id ORDER BY p.email"

echo; echo "== process-evolution-queue runs every 5 minutes; run its command now rather than wait"
run "SELECT evoq_process_queue()"
run "SELECT p.email, i.instance_status, i.qr_code IS NOT NULL AS has_qr FROM evolution_instances i JOIN profiles p ON p.id = i.user_id ORDER BY p.email"
echo; echo "== waiting (up to a minute) for pg_cron to fire refresh-qr-codes, which fetches the QR codes"
for _ in $(seq 80); do
  done_count=$(cluster_psql -d evoq_demo -tA -c "SELECT count(*) FROM evolution_instances WHERE qr_text IS NOT NULL")
  [ "$done_count" = 3 ] && break
  sleep 1
done
run "SELECT j.jobname, d.status, d.return_message, d.start_time FROM cron.job_run_details d JOIN cron.job j USING (jobid) ORDER BY d.start_time"
run "SELECT p.email, q.status, q.instance_name, q.processed_at FROM evolution_instance_creation_queue q JOIN profiles p ON p.id = q.user_id ORDER BY p.email"
run "SELECT p.email, i.instance_status, left(i.qr_code, 40) || '...' AS qr_code, left(i.qr_text, 16) || '...' AS qr_text, i.last_qr_update FROM evolution_instances i JOIN profiles p ON p.id = i.user_id ORDER BY p.email"

if [ -z "${EVOQ_API_URL:-}" ]; then
  echo; echo "== ana scans her QR code (the mock moves her instance to 'open'); the next refresh notices"
  ana=$(cluster_psql -d evoq_demo -tA -c "SELECT i.instance_name FROM evolution_instances i JOIN profiles p ON p.id = i.user_id WHERE p.email = 'ana@example.com'")
  curl -fsS -X POST "$MOCK_URL/__mock/instances/$ana/state" -d '{"state":"open"}' >/dev/null
  run "SET evoq.qr_refresh_interval_ms = 0; SELECT evoq_refresh_qr()"
  run "SELECT p.email, i.instance_status, i.qr_code IS NOT NULL AS has_qr, i.connected_at FROM evolution_instances i JOIN profiles p ON p.id = i.user_id ORDER BY p.email"
fi
run "SELECT pending, completed, failed, instances_connecting, instances_open, last_process_run_at, last_error FROM evoq_status"

if [ "${EVOQ_DEMO_KEEP:-0}" = 1 ]; then
  echo; echo "Left running. Connect with: sudo -u postgres psql -h $CLUSTER_DIR -p $CLUSTER_PORT evoq_demo"
fi
