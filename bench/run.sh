#!/usr/bin/env bash
# The evoq benchmark: its own cluster and mock Evolution API, a table of figures, each beside the
# baseline measured in the same run. Speed targets live here, never in a timed test.
#   BENCH_LATENCY_MS (50)  mock latency per call
#   BENCH_ROWS (10000)     queue size for the concurrency-64 and memory runs
#   BENCH_BIG_ROWS (100000) queue size for the big memory drain
#   BENCH_PGBENCH_SECONDS (10)
#   BENCH_ONLY             comma list of sections to run: calls,trigger,memory (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/cluster.sh

LAT=${BENCH_LATENCY_MS:-50}
ROWS=${BENCH_ROWS:-10000}
BIG=${BENCH_BIG_ROWS:-100000}
PGB_T=${BENCH_PGBENCH_SECONDS:-10}

scripts/setup.sh >/dev/null
echo "building (release) ..."
cargo build -p evolution-mock --release --quiet
cargo pgrx install --release --pg-config "$PGBIN/pg_config" >/dev/null
cluster_init /tmp/evoq-bench 55434 evoq_bench
echo "synchronous_commit = off" >>"$CLUSTER_DIR/data/postgresql.conf"
cluster_start
trap 'mock_stop; cluster_stop immediate' EXIT
mock_start 18092 --api-key bench-key --latency-ms "$LAT" --qr-ttl-ms 0
cluster_psql -d postgres -c "CREATE DATABASE evoq_bench"
q() { cluster_psql -d evoq_bench -tA -c "$1"; }
q "CREATE EXTENSION evoq" >/dev/null
q "SELECT evoq_configure('$MOCK_URL', 'bench-key')" >/dev/null
q "ALTER DATABASE evoq_bench SET evoq.time_budget_ms = 3600000"
jget() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }
reset_all() {
  q "SET client_min_messages = warning; TRUNCATE evolution_instance_creation_queue, evolution_instances CASCADE" >/dev/null
  curl -fsS -X POST "$MOCK_URL/__mock/reset" >/dev/null
}
table_row() { # job concurrency rows elapsed_ms rate baseline_rate
  python3 -c "
job, c, n, ms, rate, base, lat = '$1', $2, $3, $4, $5, $6, $LAT
ideal = c * 1000 / lat
print('%-9s %-6d %7d %9.2f %11.1f %10.1f %8.0f%% %8.1fx' % (job, c, n, ms / 1000, rate, ideal, 100 * rate / ideal, rate / base))"
}
only() { [ -z "${BENCH_ONLY:-}" ] || [[ ",$BENCH_ONLY," == *",$1,"* ]]; }
rows_for() { local n=$(($1 * 160)); ((n < 200)) && n=200; ((n > ROWS)) && n=$ROWS; echo "$n"; }

echo
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(. /etc/os-release; echo "$PRETTY_NAME"), PostgreSQL $("$PGBIN/pg_config" --version | awk '{print $2}')"
echo "mock latency: ${LAT} ms per call; ideal rate = concurrency / latency"
echo
if only calls; then
printf '%-9s %-6s %7s %9s %11s %10s %9s %9s\n' job conc rows seconds "per second" ideal "of ideal" speed-up
base_process="" base_refresh=""
for c in 1 8 32 64; do
  n=$(rows_for "$c")
  reset_all
  q "INSERT INTO evolution_instance_creation_queue (user_id) SELECT gen_random_uuid() FROM generate_series(1, $n)"
  bs=$((c * 8)); ((bs < 200)) && bs=200
  s=$(q "SET evoq.concurrency = $c; SET evoq.batch_size = $bs; SELECT evoq_process_queue()")
  created=$(jget "$s" created); ms=$(jget "$s" elapsed_ms)
  [ "$created" = "$n" ] || { echo "process run created $created of $n: $s"; exit 1; }
  rate=$(python3 -c "print(round($created / ($ms / 1000), 1))")
  [ -z "$base_process" ] && base_process=$rate
  table_row process "$c" "$n" "$ms" "$rate" "$base_process"

  # Refresh the same instances: all connecting, none refreshed yet.
  q "UPDATE evolution_instances SET last_refresh_at = NULL" >/dev/null
  s=$(q "SET evoq.concurrency = $c; SET evoq.batch_size = $bs; SET evoq.qr_refresh_interval_ms = 0; SELECT evoq_refresh_qr()")
  checked=$(jget "$s" checked); ms=$(jget "$s" elapsed_ms); newqr=$(jget "$s" new_qr)
  [ "$newqr" = "$n" ] || { echo "refresh run got $newqr new QRs of $n: $s"; exit 1; }
  rate=$(python3 -c "print(round($checked / ($ms / 1000), 1))")
  [ -z "$base_refresh" ] && base_refresh=$rate
  table_row refresh "$c" "$checked" "$ms" "$rate" "$base_refresh"
done

fi

if only trigger; then
echo
echo "trigger: pgbench, 2 clients, ${PGB_T} s per run, 3 interleaved rounds (median), synchronous_commit = off"
q "CREATE TABLE p_none (id uuid NOT NULL, email text)"
q "CREATE TABLE p_evoq (id uuid NOT NULL, email text)"
q "CREATE TABLE p_plpgsql (id uuid NOT NULL, email text)"
q "SELECT evoq_attach('p_evoq')" >/dev/null
# The baseline: the same enqueue logic as a PL/pgSQL trigger.
q "CREATE FUNCTION bench_plpgsql_enqueue() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS \$\$
BEGIN
  INSERT INTO evolution_instance_creation_queue AS q (user_id) VALUES (NEW.id)
  ON CONFLICT (user_id) DO UPDATE SET status = 'pending', request_id = gen_random_uuid(), retry_count = q.retry_count + 1,
      attempts = 0, error_message = NULL, error_kind = NULL, last_http_status = NULL, next_attempt_at = now(),
      processed_at = NULL, updated_at = now();
  RETURN NULL;
END \$\$"
q "CREATE TRIGGER bench_enqueue AFTER INSERT ON p_plpgsql FOR EACH ROW EXECUTE FUNCTION bench_plpgsql_enqueue()"
# Three interleaved rounds, median of each: single 10 s runs on 2 cores vary by ~5%.
declare -A tps
for t in p_none p_evoq p_plpgsql; do
  echo "INSERT INTO $t (id, email) VALUES (gen_random_uuid(), 'bench@example.com');" >"$CLUSTER_DIR/$t.sql"
  chmod 644 "$CLUSTER_DIR/$t.sql"
done
for round in 1 2 3; do
  for t in p_none p_evoq p_plpgsql; do
    reset_all
    q "CHECKPOINT" >/dev/null
    tps[$t]+="$(as_postgres "$PGBIN/pgbench" -n -h "$CLUSTER_DIR" -p "$CLUSTER_PORT" -U postgres -c 2 -j 2 -T "$PGB_T" -f "$CLUSTER_DIR/$t.sql" evoq_bench 2>/dev/null \
      | awk '/^tps/ {print $3; exit}') "
  done
done
median() { tr ' ' '\n' <<<"$1" | grep . | sort -n | sed -n 2p; }
for t in p_none p_evoq p_plpgsql; do
  echo "  $t rounds: ${tps[$t]}"
  tps[$t]=$(median "${tps[$t]}")
done
python3 -c "
n, e, p = ${tps[p_none]}, ${tps[p_evoq]}, ${tps[p_plpgsql]}
print('%-22s %10s %12s %14s' % ('table', 'TPS', 'vs PL/pgSQL', 'vs no trigger'))
print('%-22s %10.0f %12s %13.2fx' % ('no trigger', n, '', 1))
print('%-22s %10.0f %11.2fx %13.2fx' % ('PL/pgSQL trigger', p, 1, p / n))
print('%-22s %10.0f %11.2fx %13.2fx' % ('evoq Rust trigger', e, e / p, e / n))"

fi

if only memory; then
echo
echo "memory: the backend that ran the drain, concurrency 64, batch 500, mock latency 2 ms"
curl -fsS -X POST "$MOCK_URL/__mock/config" -d '{"latency_ms": 2}' >/dev/null
# Each drain runs in a fresh session. A sampler reads the backend's private memory (RssAnon:
# memory contexts, the Rust heap, thread stacks) every 50 ms; at the end the session reads its
# own VmHWM, which also counts the shared buffers it touched (shared_buffers = 128 MB).
hwm() { # -> "peak_private_kB vmhwm_kB"
  reset_all
  [ "$1" -gt 0 ] && q "INSERT INTO evolution_instance_creation_queue (user_id) SELECT gen_random_uuid() FROM generate_series(1, $1)"
  cluster_psql -d "dbname=evoq_bench application_name=evoq_drain" -tA -c "SET evoq.concurrency = 64" \
    -c "SET evoq.batch_size = 500" -c "SELECT pg_sleep(0.3)" -c "SELECT evoq_process_queue()" -c "SELECT pg_sleep(0.3)" \
    -c "SELECT substring(pg_read_file('/proc/self/status') from 'VmHWM:\\s+([0-9]+)')" >"$CLUSTER_DIR/drain.out" &
  local psql_pid=$! pid="" peak=0 rss
  while kill -0 "$psql_pid" 2>/dev/null; do
    [ -z "$pid" ] && pid=$(q "SELECT pid FROM pg_stat_activity WHERE application_name = 'evoq_drain'")
    if [ -n "$pid" ]; then
      rss=$(awk '/^RssAnon/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
      [ -n "$rss" ] && [ "$rss" -gt "$peak" ] && peak=$rss
    fi
    sleep 0.05
  done
  echo "$peak $(tail -n 1 "$CLUSTER_DIR/drain.out")"
}
idle=$(hwm 0)
m10=$(hwm "$ROWS")
m100=$(hwm "$BIG")
python3 -c "
(ia, it), (aa, at), (ba, bt) = [tuple(int(x) for x in v.split()) for v in ('$idle', '$m10', '$m100')]
print('%-22s %14s %14s %20s' % ('run', 'peak private', 'over idle', 'VmHWM (incl. shared)'))
print('%-22s %11.1f MB %14s %17.1f MB' % ('idle (empty queue)', ia / 1024, '', it / 1024))
print('%-22s %11.1f MB %11.1f MB %17.1f MB' % ('drain $ROWS rows', aa / 1024, (aa - ia) / 1024, at / 1024))
print('%-22s %11.1f MB %11.1f MB %17.1f MB' % ('drain $BIG rows', ba / 1024, (ba - ia) / 1024, bt / 1024))"
fi
