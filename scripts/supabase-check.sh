#!/usr/bin/env bash
# evoq on a database built the way self-hosted Supabase (the supabase/postgres image) builds it,
# in our own SQL from what supabase/postgres's init scripts and migrations do: `initdb -U supabase_admin`, `postgres`
# created and then demoted to a non-superuser (Supabase's demote-postgres migration) holding
# pg_read_all_data, the API roles anon / authenticated / service_role and authenticator, auth.uid()
# in a schema owned by supabase_auth_admin, Supabase's default privileges in public set before the
# extension exists, pg_cron. Supabase's own components are not packaged here: supautils is
# mirrored by creating evoq as supabase_admin (what supautils does for a privileged extension:
# its owner is supautils.privileged_extensions_superuser), PostgREST by postgrest-standin (which
# follows PostgREST's RPC rules, refusals included), GoTrue by inserting profiles ourselves.
#
# Checks: (a) the install and who may re-run evoq_apply_policies; (b) cron jobs scheduled by
# postgres run as postgres, schema-qualified, so look-alikes planted first in the search paths
# never run; (c) postgres as the operator: configure, attach, process, webhooks through the
# stand-in at /rest/v1/rpc/evoq_webhook; (d) row level security for the API roles; (e) the key in
# evoq.api_key_file, unreadable through pg_read_all_data; (f) pg_dump restored as postgres and as
# supabase_admin; (g) the background worker run as postgres (refuses clearly) and as the owner.
# Uses the extension installed in $PGBIN's PostgreSQL (scripts/test.sh installs it into the
# system one; PGBIN=/path/to/bin for a private copy).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/cluster.sh

KEY="sk-evoq-supabase-7c1d-NEVER-PRINT"
DIR=/tmp/evoq-supabase PORT=23432 DB=evoq_supa
MOCK_PORT=23091 STANDIN_PORT=23093 LISTEN=127.0.0.1:23787
STANDIN="http://127.0.0.1:$STANDIN_PORT"
HOOK_URL="$STANDIN/rest/v1/rpc/evoq_webhook"
source scripts/lib/checks.sh
# sq ROLE DB SQL: one psql call as ROLE (errors with their SQLSTATE, on stderr)
sq() { as_postgres "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -v VERBOSITY=verbose -h "$DIR" -p "$PORT" -U "$1" -d "$2" -tA -c "$3"; }
adm() { sq supabase_admin "${QDB:-$DB}" "$1"; }  # the bootstrap superuser
pg() { sq postgres "${QDB:-$DB}" "$1"; }         # Supabase's operator, not a superuser
wait_for() { # wait_for SQL EXPECTED SECONDS: polls (as supabase_admin) until SQL returns EXPECTED
  local v="" end=$((SECONDS + $3))
  while [ $SECONDS -le $end ]; do v=$(adm "$1" 2>/dev/null); [ "$v" = "$2" ] && break; sleep 0.2; done
  echo "$v"
}
code() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
jwt() { # jwt CLAIMS_JSON: an unsigned token (the stand-in believes any token that decodes)
  python3 -c "import base64,sys; e=lambda s: base64.urlsafe_b64encode(s.encode()).decode().rstrip('=');
print(e('{\"alg\":\"HS256\",\"typ\":\"JWT\"}') + '.' + e(sys.argv[1]) + '.sig')" "$1"
}
signup() { pg "INSERT INTO profiles (email) VALUES ('$1@example.com') RETURNING id"; }
status_of() { adm "SELECT status FROM evolution_instance_creation_queue WHERE user_id = '$1'"; }

cargo build -p evolution-mock --release --quiet || exit 1  # the mock and postgrest-standin

# --- the cluster, as Supabase's image makes it ----------------------------------------------------
CLUSTER_DIR=$DIR CLUSTER_PORT=$PORT CLUSTER_DB=$DB
export CLUSTER_DIR CLUSTER_PORT CLUSTER_DB
cluster_stop immediate 2>/dev/null || true
rm -rf "$DIR"
install -d -o postgres -g postgres -m 700 "$DIR"
as_postgres "$PGBIN/initdb" -D "$DIR/data" -U supabase_admin --auth=trust >/dev/null || exit 1
cat >>"$DIR/data/postgresql.conf" <<CONF
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DIR'
shared_preload_libraries = 'pg_cron'
cron.database_name = '$DB'
cron.use_background_workers = on
max_worker_processes = 32
CONF
cleanup() {
  [ -n "${standin_pid:-}" ] && kill "$standin_pid" 2>/dev/null
  mock_stop
  cluster_stop immediate
}
trap cleanup EXIT
cluster_start || { cat "$DIR/server.log"; exit 1; }

# Cluster-wide: the roles. supabase/postgres' migrate.sh creates postgres as a superuser (the init
# scripts run as it), the init scripts make the API roles, the migrations demote postgres
# (10000000000000_demote-postgres.sql) and grant it pg_monitor (20230306081037) and
# pg_read_all_data, pg_signal_backend (20240606060239). The search paths are post-setup.sql's,
# whose "\$user" is, in a .sql file, a schema literally named \$user (not the special $user).
sq supabase_admin postgres "
  CREATE ROLE postgres SUPERUSER LOGIN;
  ALTER ROLE postgres NOSUPERUSER CREATEDB CREATEROLE LOGIN REPLICATION BYPASSRLS;
  GRANT pg_read_all_data, pg_monitor, pg_signal_backend TO postgres;
  CREATE ROLE supabase_read_only_user LOGIN BYPASSRLS;
  GRANT pg_read_all_data TO supabase_read_only_user;
  CREATE ROLE anon NOLOGIN NOINHERIT;
  CREATE ROLE authenticated NOLOGIN NOINHERIT;
  CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS;
  CREATE ROLE authenticator NOINHERIT LOGIN;
  GRANT anon, authenticated, service_role TO authenticator;
  ALTER ROLE anon SET statement_timeout = '3s';
  ALTER ROLE authenticated SET statement_timeout = '8s';
  CREATE ROLE supabase_auth_admin NOINHERIT CREATEROLE LOGIN;
  ALTER ROLE supabase_admin SET search_path TO \"\\\$user\", public, auth, extensions;
  ALTER ROLE postgres SET search_path TO \"\\\$user\", public, extensions;" >/dev/null || exit 1

# Per database: what migrate.sh, the init scripts and the auth migrations make. The database
# belongs to postgres (migrate.sh: alter database postgres owner to postgres), so postgres owns
# schema public (pg_database_owner). The init scripts ran as postgres, so their plain
# `alter default privileges in schema public` are postgres' defaults; the `for user
# supabase_admin` ones cover what supabase_admin creates, evoq included: all set BEFORE the
# extension. auth.uid() as Supabase defines it. With no-auth, schema auth is left out (a restore
# brings it, after the extension).
supabase_database() { # supabase_database DBNAME [no-auth]
  sq supabase_admin postgres "CREATE DATABASE $1" >/dev/null || return 1
  sq supabase_admin "$1" "
    ALTER DATABASE $1 OWNER TO postgres;
    GRANT ALL ON DATABASE $1 TO postgres;
    CREATE SCHEMA extensions;
    GRANT USAGE ON SCHEMA public TO postgres, anon, authenticated, service_role;
    GRANT USAGE ON SCHEMA extensions TO postgres, anon, authenticated, service_role;
    GRANT ALL ON SCHEMA extensions TO postgres;
    SET ROLE postgres;
    alter default privileges in schema public grant all on tables    to postgres, anon, authenticated, service_role;
    alter default privileges in schema public grant all on functions to postgres, anon, authenticated, service_role;
    alter default privileges in schema public grant all on sequences to postgres, anon, authenticated, service_role;
    RESET ROLE;
    alter default privileges for user supabase_admin in schema public grant all on tables    to postgres, anon, authenticated, service_role;
    alter default privileges for user supabase_admin in schema public grant all on functions to postgres, anon, authenticated, service_role;
    alter default privileges for user supabase_admin in schema public grant all on sequences to postgres, anon, authenticated, service_role;
    SET client_min_messages = error;  -- wal_level is not logical here: the publication stays empty anyway
    create publication supabase_realtime;" >/dev/null || return 1
  [ "${2:-}" = no-auth ] && return 0
  sq supabase_admin "$1" "
    CREATE SCHEMA auth AUTHORIZATION supabase_auth_admin;
    GRANT ALL ON SCHEMA auth TO postgres;
    GRANT USAGE ON SCHEMA auth TO anon, authenticated, service_role;
    SET ROLE supabase_auth_admin;
    CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS \$\$
      SELECT coalesce(nullif(current_setting('request.jwt.claim.sub', true), ''),
                      (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub'))::uuid \$\$;
    GRANT EXECUTE ON FUNCTION auth.uid() TO anon, authenticated, service_role, postgres;
    RESET ROLE;" >/dev/null
}
supabase_database "$DB" || exit 1
# pg_cron as Supabase has it: created by supabase_admin, USAGE on its schema for postgres.
adm "CREATE EXTENSION pg_cron; GRANT USAGE ON SCHEMA cron TO postgres" >/dev/null || exit 1
# supautils (not packaged here) would create evoq for postgres AS supabase_admin, its
# privileged_extensions_superuser: the same as creating it as supabase_admin ourselves.
adm "CREATE EXTENSION evoq" >/dev/null || exit 1

# --- a. the install ---------------------------------------------------------------------------------
check "the extension's owner is supabase_admin" "$(adm "SELECT extowner::regrole FROM pg_extension WHERE extname = 'evoq'")" "supabase_admin"
check "postgres is not a superuser" "$(adm "SELECT rolsuper FROM pg_roles WHERE rolname = 'postgres'")" "f"
check "evoq_apply_policies() (as the owner) chooses Supabase mode" "$(adm "SELECT evoq_apply_policies()")" "supabase"
err=$(pg "SELECT evoq_apply_policies()" 2>&1)
check "as postgres evoq_apply_policies() fails with 42501" "$(grep -c '^ERROR:  42501' <<<"$err")" "1"
check "and its hint names supabase_admin" "$(grep -c '^HINT: .*connect as supabase_admin' <<<"$err")" "1"
for role in anon authenticated service_role; do
  check "Supabase's default privileges taken back: $role may not run evoq_configure" \
    "$(adm "SELECT has_function_privilege('$role', 'evoq_configure(text, text, text, text[], text, text, jsonb, boolean)', 'EXECUTE')")" "f"
done

# --- c. postgres, the operator, configures evoq; the webhook reaches it through PostgREST -------
mock_start $MOCK_PORT --api-key "$KEY" --qr-ttl-ms 1000 --webhook-retry-ms 200 || exit 1
target/release/postgrest-standin --port $STANDIN_PORT --role anon --psql "$PGBIN/psql" \
  -- -h "$DIR" -p "$PORT" -U authenticator -d "$DB" -X >"$DIR/standin.log" 2>&1 &
standin_pid=$!
for _ in $(seq 100); do grep -q listening "$DIR/standin.log" && break; sleep 0.1; done
pg "SELECT evoq_configure(api_url => '$MOCK_URL', api_key => '$KEY', webhook_url => '$HOOK_URL',
                          webhook_headers => '{\"apikey\": \"anon-gateway-key\"}')" >/dev/null
check "postgres configures evoq" "$(adm "SELECT api_url FROM evoq.settings")" "$MOCK_URL"
pg "CREATE TABLE public.profiles (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), email text)"
check "postgres attaches its own profiles table" "$(pg "SELECT evoq_attach('profiles')" >/dev/null 2>&1 && echo ok)" "ok"

# --- b. the cron jobs, scheduled by postgres, run as postgres ----------------------------------------
# Look-alikes where an unqualified name would find them first: postgres' and supabase_admin's
# paths start with a schema named \$user (post-setup.sql), which postgres may create (it owns
# the database); and, for other setups, postgres' own "$user" schema `postgres` and one named
# "$user" literally. Each records who ran it. (This script calls evoq's functions qualified.)
pg "CREATE TABLE public.hijack_log (who name, superuser text, at timestamptz DEFAULT now());
    GRANT INSERT ON public.hijack_log TO PUBLIC;
    CREATE SCHEMA postgres; CREATE SCHEMA \"\$user\"; CREATE SCHEMA \"\\\$user\";
    GRANT USAGE ON SCHEMA postgres, \"\$user\", \"\\\$user\" TO PUBLIC;" >/dev/null
for s in postgres '"$user"' '"\$user"'; do
  for f in evoq_process_queue evoq_refresh_qr; do
    pg "CREATE FUNCTION $s.$f() RETURNS jsonb LANGUAGE sql AS \$\$
          INSERT INTO public.hijack_log (who, superuser) VALUES (current_user, current_setting('is_superuser'));
          SELECT '{}'::jsonb \$\$;
        GRANT EXECUTE ON FUNCTION $s.$f() TO PUBLIC" >/dev/null
  done
done
check "the look-alikes are in place (6)" "$(adm "SELECT count(*) FROM pg_proc WHERE proname IN ('evoq_process_queue', 'evoq_refresh_qr') AND pronamespace::regnamespace::text <> 'public'")" "6"
pg "SELECT evoq_schedule('* * * * *', '* * * * *')" >/dev/null
scheduled_at=$(adm "SELECT now()")
check "postgres schedules the jobs; they run as postgres, schema-qualified" \
  "$(adm "SELECT string_agg(jobname || ' ' || username || ' ' || command, ', ' ORDER BY jobname) FROM cron.job")" \
  "process-evolution-queue postgres SELECT public.evoq_process_queue(), refresh-qr-codes postgres SELECT public.evoq_refresh_qr()"
check "postgres sees its jobs" "$(pg "SELECT count(*) FROM cron.job WHERE username = current_user")" "2"

# --- c (continued). a sign-up, provisioned by postgres; deliveries through the stand-in -------------
ana=$(signup ana)
pg "SELECT public.evoq_process_queue()" >/dev/null
check "postgres runs evoq_process_queue: ana's instance is created" "$(status_of "$ana")" "completed"
ana_name=$(adm "SELECT instance_name FROM evolution_instances WHERE user_id = '$ana'")
check "the mock's QR delivery reaches the row through /rest/v1/rpc/evoq_webhook" \
  "$(wait_for "SELECT qr_text IS NOT NULL FROM evolution_instances WHERE user_id = '$ana'" t 10)" "t"
curl -fsS -X POST "$MOCK_URL/__mock/instances/$ana_name/scan" -d '{"number": "5511999990000", "profile_name": "Ana"}' >/dev/null
check "a scan reaches the row through the stand-in (open)" \
  "$(wait_for "SELECT instance_status || ' ' || owner_number FROM evolution_instances WHERE user_id = '$ana'" "open 5511999990000" 10)" \
  "open 5511999990000"
check "the mock's deliveries went to the stand-in's URL, with the gateway header, and got 200" \
  "$(curl -fsS "$MOCK_URL/__mock/deliveries" | python3 -c "import json,sys; d=[x for x in json.load(sys.stdin) if x['instance']==sys.argv[1]]
print(len(d) > 0 and all(x['url'].startswith(sys.argv[2]) and x['headers'].get('apikey')=='anon-gateway-key' for x in d) and any(x['delivered'] and x['status']==200 for x in d))" "$ana_name" "$HOOK_URL")" "True"
delivery="{\"event\":\"connection.update\",\"instance\":\"$ana_name\",\"date_time\":\"2099-01-01T00:00:00.000Z\",\"data\":{\"state\":\"close\",\"statusReason\":401}}"
check "a forged delivery through the stand-in: 401 (the endpoint is reachable, the secret checked)" \
  "$(code -X POST "$HOOK_URL" -H 'Content-Type: application/json' -H 'x-evoq-secret: guessed' -d "$delivery")" "401"
pg "CREATE FUNCTION public.hook_named(payload jsonb) RETURNS jsonb LANGUAGE sql AS \$\$ SELECT payload \$\$" >/dev/null
check "a named-parameter function(payload jsonb) is 404 through the stand-in (as through PostgREST)" \
  "$(code -X POST "$STANDIN/rest/v1/rpc/hook_named" -H 'Content-Type: application/json' -d "$delivery")" "404"

# --- d. row level security for the API roles ------------------------------------------------------------
bo=$(signup bo)
pg "SELECT public.evoq_process_queue()" >/dev/null
as_api() { # as_api ROLE SUB SQL: as PostgREST does it, through authenticator
  sq authenticator "${QDB:-$DB}" "SET ROLE $1; SET request.jwt.claims = '{\"sub\": \"$2\", \"role\": \"$1\"}'; $3"
}
check "authenticated (sub = ana) sees only ana's instance" \
  "$(as_api authenticated "$ana" "SELECT string_agg(user_id::text, ',') FROM evolution_instances")" "$ana"
check "authenticated (sub = bo) sees only bo's queue row" \
  "$(as_api authenticated "$bo" "SELECT string_agg(user_id::text, ',') FROM evolution_instance_creation_queue")" "$bo"
err=$(as_api anon "" "SELECT count(*) FROM evolution_instances" 2>&1)
check "anon cannot read evolution_instances" "$(grep -c 'permission denied' <<<"$err")" "1"
check "service_role reads evoq_status" "$(as_api service_role "" "SELECT namespace IS NOT NULL FROM evoq_status")" "t"
check "service_role sees every instance (BYPASSRLS, its policy)" "$(as_api service_role "" "SELECT count(*) FROM evolution_instances")" "2"
# Through the stand-in with a Bearer token, as the app would (a SECURITY INVOKER function of postgres').
pg "CREATE FUNCTION public.my_instance_users() RETURNS text LANGUAGE sql STABLE AS
      \$\$ SELECT coalesce(string_agg(user_id::text, ','), '') FROM public.evolution_instances \$\$" >/dev/null
check "through the stand-in, a Bearer token with sub = bo sees bo's instance only" \
  "$(curl -s -X POST "$STANDIN/rest/v1/rpc/my_instance_users" -H 'Content-Type: application/json' \
       -H "Authorization: Bearer $(jwt "{\"sub\":\"$bo\",\"role\":\"authenticated\"}")" -d '{}' | tr -d '"')" "$bo"
check "through the stand-in without a token (anon): 401" \
  "$(code -X POST "$STANDIN/rest/v1/rpc/my_instance_users" -H 'Content-Type: application/json' -d '{}')" "401"

# --- e. the key: readable through pg_read_all_data when stored, nowhere with evoq.api_key_file --------
check "stored key: postgres reads it through pg_read_all_data (the README's warning)" "$(pg "SELECT api_key FROM evoq.settings")" "$KEY"
check "stored key: supabase_read_only_user reads it too" "$(sq supabase_read_only_user "$DB" "SELECT api_key FROM evoq.settings")" "$KEY"
printf '%s\n' "$KEY" >"$DIR/api_key"; chown postgres:postgres "$DIR/api_key"; chmod 600 "$DIR/api_key"
echo "evoq.api_key_file = '$DIR/api_key'" >>"$DIR/data/postgresql.conf"
adm "SELECT pg_reload_conf()" >/dev/null
sleep 0.5
err=$(pg "SELECT evoq_configure(api_url => '$MOCK_URL', api_key => '$KEY', webhook_url => '$HOOK_URL')" 2>&1)
check "with evoq.api_key_file set, a key passed to evoq_configure is refused" "$(grep -c 'api_key must be NULL' <<<"$err")" "1"
pg "SELECT evoq_configure(api_url => '$MOCK_URL', api_key => NULL, webhook_url => '$HOOK_URL',
                          webhook_headers => '{\"apikey\": \"anon-gateway-key\"}')" >/dev/null
check "key file: postgres reads NULL from evoq.settings" "$(pg "SELECT coalesce(api_key, 'NULL') FROM evoq.settings")" "NULL"
check "key file: supabase_read_only_user reads NULL" "$(sq supabase_read_only_user "$DB" "SELECT coalesce(api_key, 'NULL') FROM evoq.settings")" "NULL"
err=$(pg "SELECT pg_read_file('$DIR/api_key')" 2>&1)
check "postgres cannot read the key file (no pg_read_server_files)" "$(grep -c 'ERROR:  42501' <<<"$err")" "1"
cy=$(signup cy)
pg "SELECT public.evoq_process_queue()" >/dev/null
check "the jobs still create instances with the key from the file (the mock answers 401 otherwise)" "$(status_of "$cy")" "completed"
as_postgres "$PGBIN/pg_dump" -h "$DIR" -p "$PORT" -U postgres -f "$DIR/plain.sql" "$DB" 2>"$DIR/pg_dump.log"
check "postgres' pg_dump of the database works" "$([ -s "$DIR/plain.sql" ] && echo yes)" "yes"
check "the key is nowhere in it" "$(grep -c -- "$KEY" "$DIR/plain.sql")" "0"

# --- b (continued). a real pg_cron tick -------------------------------------------------------------------
runs="SELECT count(DISTINCT d.jobid) FROM cron.job_run_details d JOIN cron.job j USING (jobid)
      WHERE d.start_time >= '$scheduled_at' AND d.status IN ('succeeded', 'failed')"
check "a pg_cron tick ran both jobs (waited up to 75 s)" "$(wait_for "$runs" 2 75)" "2"
check "both succeeded" \
  "$(adm "SELECT string_agg(DISTINCT j.jobname || ' ' || d.status || ' ' || d.username, ', ') FROM cron.job_run_details d JOIN cron.job j USING (jobid) WHERE d.start_time >= '$scheduled_at'")" \
  "process-evolution-queue succeeded postgres, refresh-qr-codes succeeded postgres"
adm "SELECT j.jobname, d.status, d.return_message FROM cron.job_run_details d JOIN cron.job j USING (jobid) WHERE d.status <> 'succeeded'" | sed 's/^/     cron: /'
check "no look-alike ran (the jobs' commands are schema-qualified)" "$(adm "SELECT count(*) FROM public.hijack_log")" "0"
check "postgres unschedules its own two jobs" "$(pg "SELECT evoq_unschedule()")" "2"
check "none left" "$(adm "SELECT count(*) FROM cron.job")" "0"
# The original must hold still from its fingerprint to its dump (CI saw both restores "lose" rows
# that had only changed in between): a run a last tick started goes on after the unschedule, and
# the mock's QR clock (1 s here) sends a new QR of every connecting instance each second until its
# QR limit. So: no job run going, the clock stopped, and every delivery sent and answered.
check "no job run is still going" \
  "$(wait_for "SELECT count(*) FROM cron.job_run_details WHERE status IN ('starting', 'running')
               OR EXISTS (SELECT 1 FROM pg_stat_activity WHERE backend_type = 'pg_cron' AND state = 'active')" 0 60)" "0"
curl -fsS -X POST "$MOCK_URL/__mock/config" -d '{"qr_ttl_ms": 0}' >/dev/null
deliveries_pending() {
  curl -fsS "$MOCK_URL/__mock/deliveries" | python3 -c "import json,sys; print(sum(1 for d in json.load(sys.stdin) if d.get('pending')))"
}
for _ in $(seq 100); do [ "$(deliveries_pending)" = 0 ] && break; sleep 0.2; done
check "the mock's QR clock is stopped and no delivery is pending" "$(deliveries_pending)" "0"

# --- f. pg_dump restored as postgres into a database supautils prepared -------------------------------------
fingerprint="SELECT md5(string_agg(x, '|' ORDER BY x)) FROM (
  SELECT concat_ws(',', user_id, request_id, status, error_message, retry_count, attempts, instance_name) AS x FROM evolution_instance_creation_queue
  UNION ALL SELECT concat_ws(',', user_id, instance_name, instance_id, instance_status, qr_text, owner_number) FROM evolution_instances
  UNION ALL SELECT concat_ws(',', instance_name, token) FROM evoq.instance_tokens
  UNION ALL SELECT concat_ws(',', api_url, api_key, webhook_url, namespace, webhook_secret, webhook_headers) FROM evoq.settings
  UNION ALL SELECT concat_ws(',', job, started_at, summary) FROM evoq.job_runs) t"
# Who may do what with evoq's objects, and the policies: compared between original and copies.
privileges="SELECT x FROM (
  SELECT format('function %s %s %s', r, p.oid::regprocedure, has_function_privilege(r, p.oid, 'EXECUTE')) AS x
  FROM pg_depend d JOIN pg_proc p ON p.oid = d.objid, unnest(ARRAY['postgres', 'authenticated', 'service_role', 'anon']) r
  WHERE d.classid = 'pg_proc'::regclass AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'evoq') AND d.deptype = 'e'
  UNION ALL
  SELECT format('relation %s %s %s', r, c.oid::regclass, concat_ws(',',
           CASE WHEN c.relkind = 'S' THEN CASE WHEN has_sequence_privilege(r, c.oid, 'UPDATE') THEN 'UPDATE' END
                ELSE (SELECT string_agg(pr, ',' ORDER BY pr) FROM unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE']) pr
                      WHERE has_table_privilege(r, c.oid, pr)) END))
  FROM pg_depend d JOIN pg_class c ON c.oid = d.objid, unnest(ARRAY['postgres', 'authenticated', 'service_role', 'anon']) r
  WHERE d.classid = 'pg_class'::regclass AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'evoq') AND d.deptype = 'e'
  UNION ALL
  SELECT format('schema evoq %s %s', r, has_schema_privilege(r, 'evoq', 'USAGE'))
  FROM unnest(ARRAY['postgres', 'authenticated', 'service_role', 'anon']) r
  UNION ALL
  SELECT format('policy %s %s %s %s %s %s', schemaname, tablename, policyname, roles, cmd, qual) FROM pg_policies
  WHERE tablename IN ('evolution_instance_creation_queue', 'evolution_instances', 'evolution_instance_events')) t ORDER BY x"
triggers="SELECT string_agg(tgname || ' ' || tgenabled::text, ', ' ORDER BY tgname) FROM pg_trigger WHERE tgrelid = 'public.profiles'::regclass"
original=$(adm "$fingerprint")
adm "$privileges" >"$DIR/privileges.original"
original_triggers=$(adm "$triggers")
old_namespace=$(adm "SELECT namespace FROM evoq_status")
check "the original has rows to keep (3 instances, run history)" \
  "$(adm "SELECT (SELECT count(*) FROM evolution_instances) || ' ' || ((SELECT count(*) FROM evoq.job_runs) > 0)")" "3 true"
as_postgres "$PGBIN/pg_dump" -h "$DIR" -p "$PORT" -U postgres -Fc --exclude-schema=cron -f "$DIR/supa.dump" "$DB" 2>>"$DIR/pg_dump.log"
check "postgres dumps it (pg_read_all_data)" "$([ -s "$DIR/supa.dump" ] && echo yes)" "yes"

R1=evoq_restored
supabase_database $R1 || exit 1
QDB=$R1 adm "CREATE EXTENSION evoq" >/dev/null   # supautils' part, before the restore
as_postgres "$PGBIN/pg_restore" -h "$DIR" -p "$PORT" -U postgres -d $R1 "$DIR/supa.dump" 2>"$DIR/restore-postgres.log"
restore_errors() { # what pg_restore refused, for the reader (objects the target has, or that need supabase_admin)
  echo "     pg_restore as $1: $(grep -c '^pg_restore: error' "$2") errors:"
  sed -n 's/^pg_restore: error: could not execute query: ERROR:  /       /p' "$2" | sort | uniq -c | sed 's/^ */       /'
}
restore_errors postgres "$DIR/restore-postgres.log"
check "restore as postgres: no COPY of evoq's data failed" \
  "$(grep -A2 '^pg_restore: error' "$DIR/restore-postgres.log" | grep -c 'COPY\|setval')" "0"
grep -A2 '^pg_restore: error' "$DIR/restore-postgres.log" | grep -B1 -A1 'COPY\|setval' | sed 's/^/     /'
QDB=$R1
check "restore as postgres: queue, instances, tokens, settings and run history survive" "$(adm "$fingerprint")" "$original"
check "the profile triggers exist and are enabled" "$(adm "$triggers")" "$original_triggers"
adm "$privileges" >"$DIR/privileges.restored"
check "grants and policies as in the original (postgres, authenticated, service_role, anon)" \
  "$(diff "$DIR/privileges.original" "$DIR/privileges.restored" >"$DIR/privileges.diff" && echo same || echo "differ: $(head -c 600 "$DIR/privileges.diff" | tr '\n' ';')")" "same"
check "the copy stays in Supabase mode (evoq_apply_policies as supabase_admin)" "$(adm "SELECT evoq_apply_policies()")" "supabase"
dan=$(signup dan)
check "a new sign-up in the restored database is queued (the trigger fires)" "$(status_of "$dan")" "pending"
err=$(pg "SELECT public.evoq_process_queue()" 2>&1)
check "the restored copy refuses to call the server until told (55000)" "$(grep -c 'ERROR:  55000' <<<"$err")" "1"
# "Deployments and copies": the same deployment, moved: confirm it with its old namespace.
pg "SELECT evoq_configure(api_url => '$MOCK_URL', api_key => NULL, webhook_url => '$HOOK_URL', namespace => '$old_namespace')" >/dev/null
pg "SELECT public.evoq_process_queue()" >/dev/null
check "told its namespace, postgres runs evoq_process_queue in the copy: dan is created" "$(status_of "$dan")" "completed"
check "authenticated (sub = ana) sees ana's instance in the copy" \
  "$(as_api authenticated "$ana" "SELECT string_agg(user_id::text, ',') FROM evolution_instances")" "$ana"
unset QDB

# --- f (continued). restored as supabase_admin where auth.uid() comes only after the extension -------------
R2=evoq_restored_admin
supabase_database $R2 no-auth || exit 1
as_postgres "$PGBIN/pg_restore" -h "$DIR" -p "$PORT" -U supabase_admin -d $R2 "$DIR/supa.dump" 2>"$DIR/restore-admin.log"
restore_errors supabase_admin "$DIR/restore-admin.log"
QDB=$R2
check "auth.uid() came with the restore, after the extension" \
  "$(adm "SELECT (SELECT count(*) FROM pg_proc WHERE oid = 'auth.uid()'::regprocedure) || ' ' || (SELECT e.oid < p.oid FROM pg_extension e, pg_proc p WHERE e.extname = 'evoq' AND p.oid = 'auth.uid()'::regprocedure)")" "1 true"
check "restore as supabase_admin: the rows survive" "$(adm "$fingerprint")" "$original"
adm "$privileges" >"$DIR/privileges.restored-admin"
check "its grants and policies are Supabase's (as in the original)" \
  "$(diff "$DIR/privileges.original" "$DIR/privileges.restored-admin" >"$DIR/privileges-admin.diff" && echo same || echo "differ: $(head -c 600 "$DIR/privileges-admin.diff" | tr '\n' ';')")" "same"
check "authenticated (sub = bo) sees only bo's instance there" \
  "$(as_api authenticated "$bo" "SELECT string_agg(user_id::text, ',') FROM evolution_instances")" "$bo"
check "service_role reads evoq_status there" "$(as_api service_role "" "SELECT count(*) FROM evoq_status")" "1"
unset QDB

# --- g. the background worker run as postgres, then as the owner -----------------------------------------
cluster_stop
cat >>"$DIR/data/postgresql.conf" <<CONF
shared_preload_libraries = 'pg_cron,evoq'
evoq.database_name = '$DB'
evoq.worker_role = 'postgres'
evoq.listen_address = '$LISTEN'
CONF
cluster_start
refusal="role \"postgres\" (evoq.worker_role) cannot run evoq's work"
lines() { grep -c -F -- "$refusal" "$DIR/server.log"; }
end=$((SECONDS + 15)); while [ $SECONDS -le $end ] && [ "$(lines)" -lt 1 ]; do sleep 0.2; done
check "the worker as postgres logs one clear WARNING" "$(grep -F -- "$refusal" "$DIR/server.log" | grep -c 'WARNING')" "1"
eve=$(signup eve)
sleep 10
check "not repeated every 2 s (lines over 10 s: at most 2)" "$([ "$(lines)" -le 2 ] && echo yes || echo "no: $(lines)")" "yes"
check "a sign-up stays pending" "$(status_of "$eve")" "pending"
secret=$(adm "SELECT webhook_secret FROM evoq.settings")
check "its listener answers a delivery with the right secret 503 (not 401)" \
  "$(code -X POST "http://$LISTEN/hook" -H 'Content-Type: application/json' -H "x-evoq-secret: $secret" -d "$delivery")" "503"
check "and one with a wrong secret 401" \
  "$(code -X POST "http://$LISTEN/hook" -H 'Content-Type: application/json' -H 'x-evoq-secret: guessed' -d "$delivery")" "401"
cluster_stop
echo "evoq.worker_role = 'supabase_admin'" >>"$DIR/data/postgresql.conf"
cluster_start
check "with evoq.worker_role = 'supabase_admin' (the owner) the worker provisions the sign-up" \
  "$(wait_for "SELECT status FROM evolution_instance_creation_queue WHERE user_id = '$eve'" completed 20)" "completed"
check "its listener applies a delivery with the right secret (200)" \
  "$(code -X POST "http://$LISTEN/hook" -H 'Content-Type: application/json' -H "x-evoq-secret: $secret" -d "$delivery")" "200"
check "no look-alike ran as supabase_admin (whose search_path starts with \\\$user)" "$(adm "SELECT count(*) FROM public.hijack_log")" "0"
check "the API key is nowhere in the server log" "$(grep -c -- "$KEY" "$DIR/server.log")" "0"

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
