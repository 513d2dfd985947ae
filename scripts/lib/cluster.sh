# Sourced by the demo, the integration tests and the benchmark: a throwaway PostgreSQL 15
# cluster with pg_cron, owned and run by the `postgres` user (PostgreSQL refuses to run as root),
# listening only on a unix socket in its own directory and on 127.0.0.1.
#
#   cluster_init DIR PORT DBNAME   create it (pg_cron preloaded for DBNAME)
#   cluster_start / cluster_stop [mode] / cluster_psql [args...]

# PGBIN may point at another PostgreSQL 15 installation (a private copy, say).
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}

as_postgres() {
  if [ "$(id -u)" = 0 ]; then sudo -u postgres -- "$@"; else "$@"; fi
}

cluster_init() {
  CLUSTER_DIR=$1 CLUSTER_PORT=$2 CLUSTER_DB=$3
  export CLUSTER_DIR CLUSTER_PORT CLUSTER_DB
  cluster_stop immediate 2>/dev/null || true
  rm -rf "$CLUSTER_DIR"
  install -d -o postgres -g postgres -m 700 "$CLUSTER_DIR"
  as_postgres "$PGBIN/initdb" -D "$CLUSTER_DIR/data" -U postgres --auth=trust >/dev/null
  cat >>"$CLUSTER_DIR/data/postgresql.conf" <<CONF
port = $CLUSTER_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$CLUSTER_DIR'
shared_preload_libraries = 'pg_cron'
cron.database_name = '$CLUSTER_DB'
# Debian-style clusters require passwords on TCP; background workers need no connection.
cron.use_background_workers = on
max_worker_processes = 32
CONF
}

cluster_start() {
  as_postgres "$PGBIN/pg_ctl" -D "$CLUSTER_DIR/data" -l "$CLUSTER_DIR/server.log" -w start >/dev/null
}

cluster_stop() {
  [ -n "${CLUSTER_DIR:-}" ] && [ -f "$CLUSTER_DIR/data/postmaster.pid" ] || return 0
  as_postgres "$PGBIN/pg_ctl" -D "$CLUSTER_DIR/data" -m "${1:-fast}" -w stop >/dev/null
}

cluster_psql() {
  as_postgres psql -X -q -v ON_ERROR_STOP=1 -h "$CLUSTER_DIR" -p "$CLUSTER_PORT" -U postgres "$@"
}

# Starts the mock Evolution API in the background; sets MOCK_PID and MOCK_URL.
mock_start() {
  local port=$1; shift
  local bin=${MOCK_BIN:-target/release/evolution-mock}
  "$bin" --port "$port" "$@" >"${CLUSTER_DIR:-/tmp}/mock.log" 2>&1 &
  MOCK_PID=$!
  MOCK_URL="http://127.0.0.1:$port"
  for _ in $(seq 100); do
    curl -fsS "$MOCK_URL/" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "the mock Evolution API did not start; see ${CLUSTER_DIR:-/tmp}/mock.log" >&2
  return 1
}

mock_stop() {
  [ -n "${MOCK_PID:-}" ] && kill "$MOCK_PID" 2>/dev/null || true
}
