-- evoq schema, part 1 (bootstrap): tables, indexes, views and internal SQL functions.
-- The extension installs into its own schema (public by default). Secrets and bookkeeping live in
-- the private schema `evoq`, which no ordinary role can even look into.

CREATE SCHEMA evoq;
REVOKE ALL ON SCHEMA evoq FROM PUBLIC;
COMMENT ON SCHEMA evoq IS 'evoq internals: connection settings, instance tokens, run history. Not for ordinary roles.';

-- Connection settings: one row, written by evoq_configure(). The API key lives here and nowhere
-- else: not in a GUC (SHOW would print it), not in a cron command.
CREATE TABLE evoq.settings (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    api_url        text NOT NULL,
    -- 0.5.0: NULL when the key is kept in the file evoq.api_key_file names.
    api_key        text,
    webhook_url    text,
    webhook_events text[] NOT NULL,
    api_version    text NOT NULL DEFAULT 'auto' CHECK (api_version IN ('auto', 'v1', 'v2')),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    -- 0.2.0: what GET / said, kept so a slow server is not asked on every run; cleared when a
    -- reply says the server now speaks the other dialect.
    detected_version    text CHECK (detected_version IN ('v1', 'v2')),
    detected_at         timestamptz,
    -- 0.2.0: the deployment namespace in new instance names, and the database it was bound to.
    -- A restored copy has another identity and refuses to touch the server until told.
    namespace           text CHECK (namespace ~ '^[a-z0-9]{1,12}$'),
    deployment_identity text,
    -- 0.2.0: whether the 0.1.0 names (evoq_<hex>, no namespace) are this database's: true only
    -- where the upgrade from 0.1.0 ran, false once a copy is given a namespace of its own.
    owns_legacy_names   boolean NOT NULL DEFAULT false,
    -- 0.3.0: the secret every webhook delivery must carry (a header on v2, a query parameter of
    -- the URL on v1.8); the one before a rotation, accepted until every instance carries the
    -- new one; extra delivery headers (a gateway's key); when the webhook last changed
    -- (instances registered before are pointed at it again by evoq_refresh_qr).
    webhook_secret          text,
    webhook_secret_previous text,
    webhook_headers         jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(webhook_headers) = 'object'),
    webhook_changed_at      timestamptz
);
COMMENT ON COLUMN evoq.settings.namespace IS
    'Part of every new instance name (evoq_<namespace>_<user hex>), so two databases never share an instance.';
COMMENT ON COLUMN evoq.settings.deployment_identity IS
    'system_identifier:database oid of the database the namespace was bound to; a copy differs.';

-- The queue, as the product's edge-function setup had it, plus what the worker needs.
CREATE TABLE evolution_instance_creation_queue (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id          uuid NOT NULL UNIQUE,
    request_id       uuid NOT NULL DEFAULT gen_random_uuid(),
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'processing', 'completed', 'failed')),
    error_message    text,
    retry_count      integer NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    processed_at     timestamptz,
    -- evoq's additions
    instance_name    text,
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_error_at    timestamptz,
    last_http_status integer,
    error_kind       text CHECK (error_kind IN ('transient', 'permanent')),
    -- 0.3.0: what the row's current request is: create the user's instance, or delete it
    -- (deprovisioning: the profile was deleted, or evoq_deprovision). Same claims, retries, backoff.
    action           text NOT NULL DEFAULT 'create' CHECK (action IN ('create', 'delete')),
    -- 0.6.0: the Evolution server (evoq.servers) the user's instance is placed on: set by the
    -- claim that first takes the row, which commits before the create leaves (NULL until then).
    -- Retries and adoption stay on it; a re-creation after the server lost the instance, or after
    -- a deletion, is placed afresh. A creation takes room at its server once tried
    -- (evoq.server_load), and needs room to be claimed untried.
    server           text,
    -- 0.7.0: a move in progress (evoq_move, evoq_server_drain with move_unlinked): the row's
    -- deletion at its server is followed by a creation on this server ('' : placed afresh)
    move_to          text
);
COMMENT ON TABLE evolution_instance_creation_queue IS
    'One row per user whose Evolution instance evoq must create. Filled by the profile trigger, drained by evoq_process_queue().';
COMMENT ON COLUMN evolution_instance_creation_queue.retry_count IS
    'Failed attempts plus re-inserts of the profile, over the row''s whole life (as in the original setup).';
COMMENT ON COLUMN evolution_instance_creation_queue.attempts IS
    'API attempts for the current request_id; the retry policy and evoq.max_attempts count these.';
COMMENT ON COLUMN evolution_instance_creation_queue.next_attempt_at IS
    'A pending row is not claimed before this time (exponential backoff after a failure).';
COMMENT ON COLUMN evolution_instance_creation_queue.error_kind IS
    'transient: worth retrying (network, timeout, 5xx); permanent: the API refused the request (400, 401...).';

CREATE INDEX evolution_instance_creation_queue_status_created_at_idx
    ON evolution_instance_creation_queue (status, created_at);
-- What the claim query scans: only rows that can still be due.
-- 0.5.0: in the claim's order (next_attempt_at, created_at), so a claim reads the rows it takes,
-- not every due row (a one-row claim with 2 000 due sorted all 2 000: 1.1 ms).
CREATE INDEX evolution_instance_creation_queue_due_idx
    ON evolution_instance_creation_queue (next_attempt_at, created_at)
    WHERE status IN ('pending', 'processing');
ALTER TABLE evolution_instance_creation_queue ENABLE ROW LEVEL SECURITY;

CREATE TABLE evolution_instances (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id         uuid NOT NULL UNIQUE,
    instance_name   text NOT NULL UNIQUE,
    instance_id     text,
    instance_status text NOT NULL DEFAULT 'connecting'
                    CHECK (instance_status IN ('connecting', 'open', 'close', 'refused', 'expired', 'lost', 'deleted')),
    qr_code         text,
    qr_text         text,
    pairing_code    text,
    qr_count        integer,
    last_qr_update  timestamptz,
    last_refresh_at timestamptz,
    connected_at    timestamptz,
    last_error      text,
    last_error_at   timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    -- 0.3.0: the rest of an instance's life.
    owner_number        text,
    profile_name        text,
    connecting_since    timestamptz,
    disconnected_at     timestamptz,
    disconnect_reason   text,
    last_event_at       timestamptz,
    no_qr_rounds        integer NOT NULL DEFAULT 0,
    last_state_check_at timestamptz,
    webhook_set_at      timestamptz,
    -- 0.5.0: a logout and a delete do not stop a 2.3.6 server's reconnect loop for an instance
    -- that cannot reach WhatsApp; its deliveries that keep coming for an expired or deleted row
    -- are the evidence. Counted here, and the logout is tried again on a bounded schedule.
    server_loop_deliveries integer NOT NULL DEFAULT 0,
    server_loop_seen_at    timestamptz,
    server_loop_logouts    integer NOT NULL DEFAULT 0,
    server_loop_logout_at  timestamptz,
    -- 0.5.0: when a pairing (a logout, then a connect with the user's number) was last sent:
    -- evoq_link_with_phone keeps its pace from it (each pairing is a new socket at the server)
    pairing_requested_at   timestamptz,
    -- 0.6.0: the Evolution server (evoq.servers) that holds the instance
    server                 text NOT NULL DEFAULT 'default'
);
COMMENT ON TABLE evolution_instances IS
    'One row per user instance on the Evolution API server. instance_status: connecting (waiting for a QR scan), open (connected), close (disconnected; disconnect_reason says why), refused (the server''s QR limit), expired (not scanned within evoq.qr_window_ms; logged out), lost (the server no longer knows it; re-queued), deleted (deprovisioned).';
COMMENT ON COLUMN evolution_instances.connecting_since IS
    'Start of the QR window: a connecting instance not scanned within evoq.qr_window_ms expires.';
COMMENT ON COLUMN evolution_instances.last_event_at IS
    'The server''s date_time of the last webhook delivery applied; an older delivery changes nothing.';
COMMENT ON COLUMN evolution_instances.no_qr_rounds IS
    'Consecutive refreshes that got no QR ({"count":0}); 3 or more shows in evoq_status.instances_without_qr.';
COMMENT ON COLUMN evolution_instances.server_loop_deliveries IS
    'Deliveries received after the instance was expired or deleted: the server is still reconnecting it (a restart of the Evolution server ends such loops).';
COMMENT ON COLUMN evolution_instances.qr_code IS 'The QR as a data:image/png;base64 URL, ready for an <img src>.';
COMMENT ON COLUMN evolution_instances.qr_text IS 'The raw QR string (2@...), for clients that render it themselves.';
CREATE INDEX evolution_instances_connecting_idx
    ON evolution_instances (last_refresh_at NULLS FIRST)
    WHERE instance_status = 'connecting';
-- 0.3.0: the sweep of open instances, and instances to point at a changed webhook.
CREATE INDEX evolution_instances_open_idx
    ON evolution_instances (last_state_check_at NULLS FIRST)
    WHERE instance_status = 'open';
CREATE INDEX evolution_instances_webhook_idx
    ON evolution_instances (webhook_set_at NULLS FIRST)
    WHERE instance_status IN ('connecting', 'open', 'close', 'refused', 'expired');
ALTER TABLE evolution_instances ENABLE ROW LEVEL SECURITY;

-- Instance tokens (the `hash` of create): they authorize anything on that instance, so they are
-- kept out of the user-visible table.
CREATE TABLE evoq.instance_tokens (
    instance_name text PRIMARY KEY REFERENCES evolution_instances (instance_name) ON DELETE CASCADE,
    token         text NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- The last run of each job, for evoq_status. Written once at the end of a run.
CREATE TABLE evoq.job_runs (
    job           text PRIMARY KEY CHECK (job IN ('process_queue', 'refresh_qr')),
    started_at    timestamptz NOT NULL,
    finished_at   timestamptz NOT NULL,
    summary       jsonb NOT NULL,
    last_error    text,
    last_error_at timestamptz
);

-- 0.2.0: requests to put a user back in line, written where updating the queue row could wait
-- on a job's lock: by the profile trigger for a re-inserted profile, and by the QR refresh for an
-- instance the server lost. Append-only for writers (nothing to conflict on, so never a wait);
-- evoq_process_queue applies them at the start of each run, skipping rows another run holds.
CREATE TABLE evoq.requeue_requests (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id      uuid NOT NULL,
    reason       text NOT NULL CHECK (reason IN ('reinserted', 'lost', 'deprovision')),
    requested_at timestamptz NOT NULL DEFAULT now()
);

-- 0.2.0: profile rows the trigger could not queue (user id column NULL, renamed or retyped after
-- evoq_attach). Append-only, shown in evoq_status; a job run fails loudly while an attached
-- table's user id column is unusable.
CREATE TABLE evoq.skipped_profiles (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    table_name text NOT NULL,
    reason     text NOT NULL,
    skipped_at timestamptz NOT NULL DEFAULT now()
);

-- 0.5.0: "link with phone number" (a pairing code instead of a QR scan). The number a user gave,
-- digits with the country code, kept only until the server has it: until the call that carries it
-- (the create, or a connect after a logout) is answered, the instance opens, expires or is deleted,
-- or evoq.qr_window_ms passes (each QR refresh claim deletes what is due to go). Personal data:
-- readable by the extension's owner only, never in a message or a log, and left out of pg_dump
-- on purpose (a restore loses at most a pending link; the user asks again).
CREATE TABLE evoq.phone_links (
    user_id      uuid PRIMARY KEY,
    phone        text NOT NULL CHECK (phone ~ '^[1-9][0-9]{7,14}$'),
    requested_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- 0.6.0: the reconciler (evoq_reconcile, and every evoq.reconcile_interval_ms in the QR refresh
-- and the worker): GET /instance/fetchInstances compared with the rows, so that rows stay true to
-- what the server holds when no webhook says so. One row per Evolution server (`default` until
-- several servers are data): the last reconcile's findings, and a lease a reconcile in progress
-- holds (two at once would only do the same work twice; the lease also outlives a crash).
CREATE TABLE evoq.reconciles (
    server        text PRIMARY KEY,
    started_at    timestamptz,
    lease_until   timestamptz,
    finished_at   timestamptz,
    summary       jsonb,
    last_error    text,
    last_error_at timestamptz,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- 0.6.0: instances of this deployment's namespace that a server holds and no row owns (a create
-- that timed out but succeeded and was never retried, a deleted user's leftover). Each costs its
-- server a socket. Deleted (logged out, then deleted) only when seen unowned for
-- evoq.orphan_grace_ms: first_seen_at is when a reconcile first found it so.
CREATE TABLE evoq.reconcile_orphans (
    server        text NOT NULL,
    instance_name text NOT NULL,
    first_seen_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    last_seen_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    removals      integer NOT NULL DEFAULT 0,
    last_error    text,
    PRIMARY KEY (server, instance_name)
);

-- 0.6.0: the Evolution servers, as data. `default` is the server evoq_configure describes (its
-- URL, key, version and webhook stay in evoq.settings), made by evoq_configure or by the upgrade;
-- 0.7.0: the others are added by evoq_server_add, each with its own URL, key and version. What is
-- the server's own: how many instances it may hold (an Evolution server is one Node process with a
-- WhatsApp socket per instance, and slows past about 80), how many calls it is sent at once, and
-- whether it takes new instances. Written by evoq_server_add, evoq_server_set and
-- evoq_server_drain; shown by evoq_servers (never its key).
CREATE TABLE evoq.servers (
    name          text PRIMARY KEY CHECK (name ~ '^[a-z0-9][a-z0-9_-]{0,39}$'),
    -- live instances it may hold (evoq.server_load says which count); NULL: no bound
    capacity      integer CHECK (capacity > 0),
    -- calls sent to it at once; NULL: evoq.concurrency
    max_in_flight integer CHECK (max_in_flight > 0),
    -- takes no new instance (its own go on: retries, refreshes, deletions)
    draining      boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    -- 0.7.0: a server other than `default`: its URL, its global key, its dialect (pinned, or what
    -- GET / said), and when its URL, key or version last changed (a run that read them before
    -- claims nothing more). `default` keeps these in evoq.settings: they are NULL here.
    api_url               text,
    api_key               text,
    api_version           text NOT NULL DEFAULT 'auto' CHECK (api_version IN ('auto', 'v1', 'v2')),
    detected_version      text CHECK (detected_version IN ('v1', 'v2')),
    detected_at           timestamptz,
    connection_changed_at timestamptz NOT NULL DEFAULT now(),
    -- 0.7.0: the secret this server's deliveries carry (each server its own: a leaked one cannot
    -- forge another server's instances), the one before a rotation, and when it last changed
    -- (its instances are pointed at it again). `default`'s are evoq.settings'.
    webhook_secret          text,
    webhook_secret_previous text,
    webhook_changed_at      timestamptz,
    -- 0.7.0: the last error a run met at this server, and when (evoq._record_run)
    last_error              text,
    last_error_at           timestamptz,
    CONSTRAINT servers_connection_check CHECK (CASE WHEN name = 'default' THEN api_url IS NULL AND api_key IS NULL
                                                    ELSE api_url IS NOT NULL AND api_key IS NOT NULL END)
);
-- 0.7.0: one URL, one server (two names for one server would place past its capacity).
CREATE UNIQUE INDEX servers_api_url_key ON evoq.servers (api_url);

-- 0.2.0: the circuit breaker. When every call of a batch fails the same way (server down, key
-- rejected, wrong URL) the fault is the server's or the configuration's, not the rows': the batch
-- is released unchanged and runs stop calling until next_probe_at, when one probe decides.
-- 0.7.0: one per server (a dead server stops only its own calls); it goes with its server.
CREATE TABLE evoq.circuit (
    opened_at     timestamptz NOT NULL,
    cause         text NOT NULL,
    trips         integer NOT NULL DEFAULT 1,
    next_probe_at timestamptz NOT NULL,
    server        text PRIMARY KEY REFERENCES evoq.servers (name) ON DELETE CASCADE
);

-- 0.3.0: webhook deliveries evoq does not consume itself (messages.upsert and the rest the
-- operator subscribed to), kept for the application, which reads and deletes them; each insert
-- is announced on the channel evoq_events.
CREATE TABLE evolution_instance_events (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id       uuid,
    instance_name text NOT NULL,
    event         text NOT NULL,
    payload       jsonb NOT NULL,
    received_at   timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE evolution_instance_events IS
    'Webhook deliveries evoq does not consume (messages and the like), for the application to read and delete. NOTIFY channel: evoq_events.';
ALTER TABLE evolution_instance_events ENABLE ROW LEVEL SECURITY;

-- 0.3.0: webhook counters. Sequences, not rows: they count without a row lock that concurrent
-- deliveries would queue on, and a rejected delivery is counted although its ERROR rolls the
-- transaction back (nextval is not transactional). After a crash a counter may jump ahead by
-- up to 32.
CREATE SEQUENCE evoq.webhooks_applied;
CREATE SEQUENCE evoq.webhooks_ignored;
CREATE SEQUENCE evoq.webhooks_rejected;
CREATE SEQUENCE evoq.webhooks_relayed;
-- 0.7.0: deliveries that carried one server's secret for an instance another server holds
CREATE SEQUENCE evoq.webhooks_misdirected;

-- pg_dump keeps the rows of these tables (extension tables are otherwise dumped empty).
SELECT pg_catalog.pg_extension_config_dump('evolution_instance_creation_queue', '');
SELECT pg_catalog.pg_extension_config_dump('evolution_instances', '');
SELECT pg_catalog.pg_extension_config_dump('evoq.settings', '');
SELECT pg_catalog.pg_extension_config_dump('evoq.instance_tokens', '');
SELECT pg_catalog.pg_extension_config_dump('evoq.job_runs', '');
SELECT pg_catalog.pg_extension_config_dump('evoq.requeue_requests', '');
SELECT pg_catalog.pg_extension_config_dump('evoq.requeue_requests_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('evoq.skipped_profiles', '');
SELECT pg_catalog.pg_extension_config_dump('evoq.skipped_profiles_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('evoq.circuit', '');
SELECT pg_catalog.pg_extension_config_dump('evolution_instance_events', '');
SELECT pg_catalog.pg_extension_config_dump('evolution_instance_events_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('evoq.webhooks_applied', '');
SELECT pg_catalog.pg_extension_config_dump('evoq.webhooks_ignored', '');
SELECT pg_catalog.pg_extension_config_dump('evoq.webhooks_rejected', '');
SELECT pg_catalog.pg_extension_config_dump('evoq.webhooks_relayed', '');
SELECT pg_catalog.pg_extension_config_dump('evoq.webhooks_misdirected', '');
SELECT pg_catalog.pg_extension_config_dump('evoq.reconciles', '');
SELECT pg_catalog.pg_extension_config_dump('evoq.reconcile_orphans', '');
SELECT pg_catalog.pg_extension_config_dump('evoq.servers', '');

-- This database's identity: a copy restored elsewhere (or into another database) differs.
CREATE FUNCTION evoq._deployment_identity() RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT (SELECT system_identifier::text FROM pg_control_system()) || ':'
        || (SELECT oid::text FROM pg_database WHERE datname = current_database())
$$;

-- The namespace a deployment gets unless evoq_configure is told one: short, stable, derived from
-- the identity above.
CREATE FUNCTION evoq._default_namespace() RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT substr(md5(evoq._deployment_identity()), 1, 8) $$;

-- The signed-in user's id. Supabase's auth.uid() when it exists; otherwise the `sub` claim that
-- PostgREST puts in request.jwt.claims (or the older request.jwt.claim.sub). Anything that is
-- not a uuid (an anonymous caller, a service token) is nobody. No EXCEPTION block: that would be
-- a subtransaction per call; the policies call it once per statement as (SELECT ...).
CREATE FUNCTION evoq_current_user_id() RETURNS uuid
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    sub text;
BEGIN
    IF to_regprocedure('auth.uid()') IS NOT NULL THEN
        EXECUTE 'SELECT auth.uid()::text' INTO sub;
    ELSE
        sub := coalesce(nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub',
                        nullif(current_setting('request.jwt.claim.sub', true), ''));
    END IF;
    IF sub ~* '^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$' THEN
        RETURN sub::uuid;
    END IF;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION evoq_current_user_id() IS
    'The signed-in user''s id for row level security: auth.uid() on Supabase, else the sub claim of request.jwt.claims.';

-- (Re)creates the privileges and row level security policies of everything evoq owns. Runs at
-- install, at every upgrade, and again by hand if the Supabase roles appear later. It changes
-- grants and policies on evoq's objects, so it runs as their owner (the role that created the
-- extension: supabase_admin on Supabase) or a superuser.
--
-- Privileges first: whatever default privileges granted at creation time is taken back before
-- evoq grants what each role needs. Supabase grants anon, authenticated and service_role ALL on
-- every new table and function in public; RLS covers neither TRUNCATE nor EXECUTE of a SECURITY
-- DEFINER function, so left alone that lets any signed-in user wipe the queue or repoint
-- evoq_configure. TRIGGER, TRUNCATE and REFERENCES are taken from every role but the owner (a
-- trigger on evoq's tables would run inside evoq's SECURITY DEFINER jobs); other grants an
-- operator made to roles of their own stay.
--
-- 0.5.0: a database is Supabase-like when Supabase's API roles exist. Roles belong to the
-- cluster, so that holds from the first statement of a restore on, while auth.uid() (which
-- 0.4.0 also required) is restored only after the extension: a restored database used to come
-- back with plain-PostgreSQL privileges. The policies call evoq_current_user_id(), which uses
-- auth.uid() whenever it exists at query time. On Supabase, `postgres` (not a superuser there)
-- is the operator: it may run every evoq_* function and read evoq_status, and it may INSERT
-- evoq's rows and set its sequences, which is what restoring a dump as postgres does (it cannot
-- read the key through evoq's grants; pg_read_all_data, which Supabase gives it, can).
CREATE FUNCTION evoq_apply_policies() RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ext_oid oid := (SELECT oid FROM pg_extension WHERE extname = 'evoq');
    ext_owner name := (SELECT r.rolname FROM pg_extension e JOIN pg_roles r ON r.oid = e.extowner
                       WHERE e.extname = 'evoq');
    ext_schema text := (SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
                        WHERE e.extname = 'evoq');
    supabase boolean := to_regrole('anon') IS NOT NULL AND to_regrole('authenticated') IS NOT NULL
                        AND to_regrole('service_role') IS NOT NULL;
    operator text := CASE WHEN supabase AND EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'postgres'
                                                    AND NOT rolsuper AND rolname <> ext_owner)
                          THEN 'postgres' END;
    api_roles text[] := ARRAY(SELECT r FROM unnest(ARRAY['anon', 'authenticated', 'service_role']) r
                              WHERE to_regrole(r) IS NOT NULL);
    queue text := format('%I.evolution_instance_creation_queue', ext_schema);
    inst text := format('%I.evolution_instances', ext_schema);
    status_view text := format('%I.evoq_status', ext_schema);
    servers_view text := format('%I.evoq_servers', ext_schema);
    app_events text := format('%I.evolution_instance_events', ext_schema);
    me text := format('(SELECT %I.evoq_current_user_id())', ext_schema);
    member record;
    pol record;
BEGIN
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
       AND NOT pg_has_role(current_user, ext_owner, 'USAGE') THEN
        RAISE EXCEPTION 'evoq_apply_policies() must be run by the owner of extension evoq (%) or a superuser, not by %',
                        ext_owner, current_user
            USING ERRCODE = '42501',
                  HINT = format('It changes the grants and policies of evoq''s own tables, which only their owner may do. '
                                'It runs by itself at CREATE EXTENSION and ALTER EXTENSION evoq UPDATE; to run it again '
                                '(the Supabase roles appeared later, say), connect as %s (on Supabase: supabase_admin).',
                                ext_owner);
    END IF;
    FOR member IN
        SELECT CASE c.relkind WHEN 'S' THEN 'SEQUENCE ' ELSE 'TABLE ' END || c.oid::regclass::text AS target,
               a.grantee, a.privilege_type
        FROM pg_depend d JOIN pg_class c ON c.oid = d.objid, aclexplode(c.relacl) a
        WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_extension'::regclass
          AND d.refobjid = ext_oid AND d.deptype = 'e' AND a.grantee <> c.relowner
        UNION ALL
        SELECT 'FUNCTION ' || p.oid::regprocedure::text, a.grantee, a.privilege_type
        FROM pg_depend d JOIN pg_proc p ON p.oid = d.objid,
             aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
        WHERE d.classid = 'pg_proc'::regclass AND d.refclassid = 'pg_extension'::regclass
          AND d.refobjid = ext_oid AND d.deptype = 'e' AND a.grantee <> p.proowner
    LOOP
        IF member.grantee = 0 OR member.privilege_type IN ('TRUNCATE', 'REFERENCES', 'TRIGGER')
           OR (SELECT rolname FROM pg_roles WHERE oid = member.grantee) = ANY (api_roles) THEN
            EXECUTE format('REVOKE %s ON %s FROM %s', member.privilege_type, member.target,
                           CASE WHEN member.grantee = 0 THEN 'PUBLIC'
                                ELSE quote_ident((SELECT rolname FROM pg_roles WHERE oid = member.grantee)) END);
        END IF;
    END LOOP;
    -- The two functions that reveal nothing: row level security calls the first as the querying
    -- role, and the second names a user's instance.
    EXECUTE format('GRANT EXECUTE ON FUNCTION %I.evoq_current_user_id(), %I.evoq_instance_name(uuid) TO PUBLIC',
                   ext_schema, ext_schema);
    -- A trigger function cannot be called except as a trigger, and CREATE TRIGGER requires
    -- EXECUTE on it: a dump of the profiles table restored by its owner (not evoq's) recreates the
    -- triggers with it.
    EXECUTE format('GRANT EXECUTE ON FUNCTION %I.handle_profile_evolution_instance(),
                    %I.handle_profile_evolution_instance_delete() TO PUBLIC', ext_schema, ext_schema);
    -- The webhook endpoint is for PostgREST's anonymous role: the Evolution server has no JWT.
    -- It checks the webhook secret before it reads anything else.
    IF to_regrole('anon') IS NOT NULL THEN
        EXECUTE format('GRANT EXECUTE ON FUNCTION %I.evoq_webhook(jsonb) TO anon', ext_schema);
    END IF;

    FOR pol IN SELECT policyname, tablename FROM pg_policies
               WHERE schemaname = ext_schema
                 AND tablename IN ('evolution_instance_creation_queue', 'evolution_instances',
                                   'evolution_instance_events') LOOP
        EXECUTE format('DROP POLICY %I ON %I.%I', pol.policyname, ext_schema, pol.tablename);
    END LOOP;

    IF supabase THEN
        -- (SELECT ...): evaluated once per statement, not once per row (Supabase lint 0003).
        EXECUTE format('CREATE POLICY "Service role can manage evolution instance queue" ON %s
                        FOR ALL TO service_role USING (true) WITH CHECK (true)', queue);
        EXECUTE format('CREATE POLICY "Users can view their own queue status" ON %s
                        FOR SELECT TO authenticated USING (%s = user_id)', queue, me);
        EXECUTE format('CREATE POLICY "Service role can manage evolution instances" ON %s
                        FOR ALL TO service_role USING (true) WITH CHECK (true)', inst);
        EXECUTE format('CREATE POLICY "Users can view their own evolution instance" ON %s
                        FOR SELECT TO authenticated USING (%s = user_id)', inst, me);
        EXECUTE format('GRANT SELECT ON %s, %s TO authenticated', queue, inst);
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %s, %s TO service_role', queue, inst);
        EXECUTE format('GRANT SELECT ON %s, %s TO service_role', status_view, servers_view);
        -- The view calls these as the reading role: PostgreSQL checks a function's EXECUTE
        -- against whoever queries the view, not its owner.
        EXECUTE 'GRANT EXECUTE ON FUNCTION evoq._worker_state(), evoq._is_ours(text, text, boolean) TO service_role';
        EXECUTE format('CREATE POLICY "Service role can manage instance events" ON %s
                        FOR ALL TO service_role USING (true) WITH CHECK (true)', app_events);
        EXECUTE format('GRANT SELECT, DELETE ON %s TO service_role', app_events);
        -- Each checks that the signed-in user acts on their own instance.
        EXECUTE format('GRANT EXECUTE ON FUNCTION %I.evoq_reconnect(uuid), %I.evoq_deprovision(uuid),
                        %I.evoq_link_with_phone(text), %I.evoq_link_with_phone(uuid, text)
                        TO authenticated, service_role', ext_schema, ext_schema, ext_schema, ext_schema);
        IF operator IS NOT NULL THEN
            FOR member IN
                SELECT p.oid::regprocedure::text AS target FROM pg_depend d JOIN pg_proc p ON p.oid = d.objid
                WHERE d.classid = 'pg_proc'::regclass AND d.refobjid = ext_oid AND d.deptype = 'e'
                  AND p.pronamespace = ext_schema::regnamespace AND p.proname LIKE 'evoq\_%'
                  AND p.proname <> 'evoq_apply_policies'
            LOOP
                EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', member.target, operator);
            END LOOP;
            EXECUTE format('GRANT SELECT ON %s, %s TO %I', status_view, servers_view, operator);
            EXECUTE format('GRANT EXECUTE ON FUNCTION evoq._worker_state(), evoq._is_ours(text, text, boolean) TO %I', operator);
            -- What restoring a dump writes: evoq's rows (COPY), its sequences (setval).
            EXECUTE format('GRANT USAGE ON SCHEMA evoq TO %I', operator);
            FOR member IN
                SELECT c.oid::regclass::text AS target, c.relkind FROM pg_depend d JOIN pg_class c ON c.oid = d.objid
                WHERE d.classid = 'pg_class'::regclass AND d.refobjid = ext_oid AND d.deptype = 'e'
                  AND c.relkind IN ('r', 'p', 'S')
            LOOP
                EXECUTE format('GRANT %s ON %s %s TO %I',
                               CASE WHEN member.relkind = 'S' THEN 'UPDATE' ELSE 'INSERT' END,
                               CASE WHEN member.relkind = 'S' THEN 'SEQUENCE' ELSE 'TABLE' END,
                               member.target, operator);
            END LOOP;
        END IF;
        RETURN 'supabase';
    END IF;

    EXECUTE format('CREATE POLICY "Users can view their own queue status" ON %s
                    FOR SELECT USING (user_id = %s)', queue, me);
    EXECUTE format('CREATE POLICY "Users can view their own evolution instance" ON %s
                    FOR SELECT USING (user_id = %s)', inst, me);
    RETURN 'postgres';
END
$$;
REVOKE ALL ON FUNCTION evoq_apply_policies() FROM PUBLIC;
COMMENT ON FUNCTION evoq_apply_policies() IS
    'Recreates evoq''s privileges and row level security policies for this database (Supabase-like or plain Postgres).';

-- ---------------------------------------------------------------------------------------------
-- Internal statements used by the Rust jobs. Each takes and returns jsonb so that one statement
-- handles a whole batch (set-based), and the Rust side stays free of SQL string building.
-- ---------------------------------------------------------------------------------------------

-- Takes the API key and the instance's token out of a message before it is stored where users
-- can read it (a proxy that echoes request headers put the key into an error body). The client
-- already redacts what it knows; this is the last line.
CREATE FUNCTION evoq._redact(message text, instance text) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    -- 0.3.0: the webhook secrets too (v1.8 carries the secret in the URL of the request body).
    SELECT replace(replace(replace(replace(message,
        coalesce((SELECT nullif(api_key, '') FROM evoq.settings), ''), '[redacted]'),
        coalesce((SELECT nullif(token, '') FROM evoq.instance_tokens WHERE instance_name = instance), ''), '[redacted]'),
        coalesce((SELECT nullif(webhook_secret, '') FROM evoq.settings), ''), '[redacted]'),
        coalesce((SELECT nullif(webhook_secret_previous, '') FROM evoq.settings), ''), '[redacted]')
$$;

-- 0.6.0: each server's load: the instances it holds or is about to hold, which its capacity
-- bounds. Counted ("live"):
--   * instances connecting (a QR on screen), open, close (the server reconnects it by itself) and
--     refused (the server keeps it for its user's reconnect): each is, or may become again, a
--     WhatsApp socket at the server;
--   * creations on it that were tried and are not finished (pending or processing, attempts > 0):
--     the create may be in flight, or may have succeeded with its answer lost.
-- Not counted: expired (logged out at the server), lost (the server does not hold it), deleted.
-- A creation not tried in its current request (attempts = 0: a new sign-up, a re-creation after
-- a loss, an evoq_retry, a claimed row given back untried) is not counted: it needs room to be
-- claimed. A user is counted once. full_reason: why the server takes no new instance now (NULL when it
-- does). Read by the claims (as the extension's owner), evoq_servers and evoq_status.
CREATE VIEW evoq.server_load AS
SELECT s.name, s.capacity, s.max_in_flight, s.draining, c.live,
       CASE WHEN s.draining THEN format('server %s is draining (evoq_server_drain)', s.name)
            WHEN s.capacity <= c.live THEN format('server %s is full: %s live instances, capacity %s',
                                                  s.name, c.live, s.capacity)
       END AS full_reason
FROM evoq.servers s
CROSS JOIN LATERAL (
    SELECT count(*) AS live FROM (
        SELECT i.user_id FROM evolution_instances i
        WHERE i.server = s.name AND i.instance_status IN ('connecting', 'open', 'close', 'refused')
        UNION
        SELECT q.user_id FROM evolution_instance_creation_queue q
        WHERE q.server = s.name AND q.status IN ('pending', 'processing') AND q.action = 'create'
          AND q.attempts > 0
    ) u
) c;

-- Claims up to batch_size due rows. SKIP LOCKED: an overlapping run takes other rows. 0.4.0: a
-- claimed row carries a lease: its next_attempt_at moves lease_ms ahead, so it is due for nobody
-- else (this run's later claims included) until its result is written or the lease runs out. A
-- SQL function's run holds its rows locked until it ends, so a crash or cancel there simply
-- makes them due again; the background worker commits its claims, and a worker that died
-- leaves rows that come due when their lease runs out (adoption on 403 keeps the retry free of
-- duplicates). With the row's action, the name of the user's instance row (what a delete
-- removes), and claimed_at: the results are written only to a row still held by this claim.
-- 0.5.0: PL/pgSQL, so its plan is made once per session and kept (a SQL function with a SET
-- clause is never inlined and was planned anew at every claim: the worker claims once per
-- finished call).
-- 0.7.0: for one server: the rows placed on it, and the unplaced ones it is the place for.
-- A row placed on a server stays there (its create may have reached it: one instance per user
-- across the fleet); an unplaced creation goes to the server with the most free capacity
-- (evoq._placement_share).
CREATE FUNCTION evoq._claim_queue(server text, batch_size integer, lease_ms bigint) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$
DECLARE
    -- 0.6.0: how many untried creations this claim may take onto the server (each takes room)
    room integer := batch_size;
    -- 0.7.0: how many of them may be unplaced ones (the server is their best place)
    place integer;
    -- the rows to claim when the claim may not take every due row it finds
    ids uuid[];
    taken integer;
    -- the server has a capacity or drains; there are other servers
    bounded boolean;
    several boolean;
BEGIN
    -- Without a capacity or a drain, and alone, the server always has room: one read of the
    -- (few) servers, no lock, no count.
    SELECT coalesce(bool_or(s.name = _claim_queue.server AND (s.capacity IS NOT NULL OR s.draining)), false),
           coalesce(bool_or(s.name <> _claim_queue.server), false)
      INTO bounded, several
      FROM evoq.servers s;
    IF bounded THEN
        room := evoq._server_room(_claim_queue.server, batch_size);
    END IF;
    place := room;
    IF several THEN
        -- Several servers: this one's row is held while the claim places on it, so that
        -- evoq_server_remove waits for the claim (and a removed server places nothing).
        PERFORM 1 FROM evoq.servers s WHERE s.name = _claim_queue.server FOR KEY SHARE;
        IF NOT FOUND THEN
            RETURN '[]';
        END IF;
        IF place > 0 THEN
            place := evoq._placement_share(_claim_queue.server, place);
        END IF;
    END IF;
    IF place < batch_size THEN
        -- First the rows that need no room: deletions, and creations already tried here (which
        -- it counts); a deletion never placed (its creation never left) is anyone's to send.
        ids := ARRAY(SELECT q.id FROM evolution_instance_creation_queue q
                     WHERE q.status IN ('pending', 'processing') AND q.next_attempt_at <= now()
                       AND ((q.server = _claim_queue.server AND (q.action = 'delete' OR q.attempts > 0))
                            OR (q.server IS NULL AND q.action = 'delete'))
                     ORDER BY q.next_attempt_at, q.created_at
                     LIMIT batch_size
                     FOR UPDATE SKIP LOCKED);
        -- Then untried creations placed here (an evoq_retry, a row given back untried): they
        -- stay here, within its room.
        IF room > 0 AND cardinality(ids) < batch_size THEN
            taken := cardinality(ids);
            ids := ids || ARRAY(SELECT q.id FROM evolution_instance_creation_queue q
                                WHERE q.status IN ('pending', 'processing') AND q.next_attempt_at <= now()
                                  AND q.server = _claim_queue.server AND q.action = 'create' AND q.attempts = 0
                                ORDER BY q.next_attempt_at, q.created_at
                                LIMIT least(room, batch_size - taken)
                                FOR UPDATE SKIP LOCKED);
            room := room - (cardinality(ids) - taken);
            place := least(place, room);
        END IF;
        -- Then as many unplaced creations as this server is the place for. The rest stay
        -- pending, untried and uncharged, until room appears here or elsewhere.
        IF place > 0 AND cardinality(ids) < batch_size THEN
            ids := ids || ARRAY(SELECT q.id FROM evolution_instance_creation_queue q
                                WHERE q.status IN ('pending', 'processing') AND q.next_attempt_at <= now()
                                  AND q.server IS NULL AND q.action = 'create'
                                ORDER BY q.next_attempt_at, q.created_at
                                LIMIT least(place, batch_size - cardinality(ids))
                                FOR UPDATE SKIP LOCKED);
        END IF;
    END IF;
    RETURN evoq._claim_rows(ids, batch_size, lease_ms, _claim_queue.server);
END
$$;

-- The claim itself: the rows `ids` names, or (NULL) the first batch_size due rows in due order
-- of those placed on the server or on none, each placed on the server if it was not yet (0.6.0:
-- committed with the claim, before the create leaves), leased and returned with what its call
-- needs (0.7.0: and whether this claim placed it). One statement, planned once.
CREATE FUNCTION evoq._claim_rows(ids uuid[], batch_size integer, lease_ms bigint, server text) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$
DECLARE
    result jsonb;
BEGIN
    WITH due AS (
        SELECT q.id, q.status, q.updated_at, q.next_attempt_at, q.server FROM evolution_instance_creation_queue q
        WHERE q.status IN ('pending', 'processing') AND q.next_attempt_at <= now()
          AND (ids IS NULL OR q.id = ANY (ids))
          AND (q.server IS NULL OR q.server = _claim_rows.server)
        ORDER BY q.next_attempt_at, q.created_at
        LIMIT batch_size
        FOR UPDATE SKIP LOCKED
    ), claimed AS (
        UPDATE evolution_instance_creation_queue q
        SET status = 'processing', attempts = q.attempts + 1, updated_at = clock_timestamp(),
            next_attempt_at = clock_timestamp() + lease_ms * interval '1 millisecond',
            server = coalesce(q.server, _claim_rows.server)
        FROM due WHERE q.id = due.id
        RETURNING q.id, q.user_id, q.request_id, q.attempts, q.instance_name, q.action, q.updated_at,
                  due.status AS prev_status, due.updated_at AS prev_updated_at,
                  due.next_attempt_at AS prev_next_attempt_at, due.server IS NULL AS placed
    )
    SELECT coalesce(jsonb_agg(jsonb_build_object(
        'id', c.id, 'user_id', c.user_id, 'request_id', c.request_id, 'attempts', c.attempts,
        'instance_name', c.instance_name, 'action', c.action,
        'instance_row_name', (SELECT i.instance_name FROM evolution_instances i WHERE i.user_id = c.user_id),
        -- 0.5.0: a create carries the number the user gave for a pairing code
        'number', (SELECT p.phone FROM evoq.phone_links p WHERE p.user_id = c.user_id AND c.action = 'create'),
        'prev_status', c.prev_status, 'prev_updated_at', c.prev_updated_at,
        'prev_next_attempt_at', c.prev_next_attempt_at, 'claimed_at', c.updated_at, 'placed', c.placed)), '[]')
    INTO result
    FROM claimed c;
    RETURN result;
END
$$;

-- 0.7.0: how many unplaced creations the server may take now, at most `wanted` (its own room):
-- none while another server that takes new instances is a clearly better place for them:
-- unbounded where this one has a capacity, or more than a claim's grain (8) more free slots. A
-- server that drains, is full or has its circuit open is no place. With a capacity, no more than
-- leaves it a grain below the next best, so a burst is spread as the free slots are; the grain
-- lets claims take rows in batches (one row per claim would leave the servers' slots idle).
-- Between servers alike, the rows go to whichever has calls to spare: a lane claims only when
-- it has free slots, so a server with fewer calls in flight asks sooner and for more. Its
-- capacity is kept by its own room (the lock in evoq._server_room); what this reads of the
-- others only decides where a row is best.
CREATE FUNCTION evoq._placement_share(server text, wanted integer) RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$
DECLARE
    grain CONSTANT integer := 8;
    mine record;
BEGIN
    WITH c AS (
        SELECT s.name,
               CASE WHEN s.capacity IS NOT NULL
                    THEN s.capacity - (SELECT l.live FROM evoq.server_load l WHERE l.name = s.name) END AS free
        FROM evoq.servers s
        WHERE s.name = _placement_share.server
           OR (NOT s.draining AND NOT EXISTS (SELECT 1 FROM evoq.circuit k WHERE k.server = s.name))
    ), e AS (
        SELECT c.* FROM c WHERE c.name = _placement_share.server OR c.free IS NULL OR c.free > 0
    )
    SELECT m.free,
           EXISTS (SELECT 1 FROM e p
                   WHERE p.name <> m.name
                     AND ((p.free IS NULL AND m.free IS NOT NULL) OR p.free > m.free + grain)) AS beaten,
           (SELECT max(p.free) FROM e p WHERE p.name <> m.name) AS best_other
    INTO mine
    FROM e m WHERE m.name = _placement_share.server;
    IF NOT FOUND OR mine.beaten THEN
        RETURN 0;
    ELSIF mine.free IS NULL OR mine.best_other IS NULL THEN
        RETURN wanted;
    END IF;
    RETURN least(wanted, greatest(mine.free - mine.best_other + grain, 1))::integer;
END
$$;

-- 0.6.0: how many untried creations a claim may place on the server now, at most `wanted`:
-- none while it drains, or while another transaction is placing on it (the count this one sees
-- would miss what that one places until it commits: a pg_cron run's whole run; the lock is never
-- waited for), or in a transaction whose snapshot predates the lock (REPEATABLE READ or
-- SERIALIZABLE: its count would miss what others committed meanwhile); its free capacity
-- otherwise, `wanted` when it has no capacity.
CREATE FUNCTION evoq._server_room(server text, wanted integer) RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$
DECLARE
    s record;
BEGIN
    SELECT l.name, l.capacity, l.draining INTO s FROM evoq.servers l WHERE l.name = _server_room.server;
    IF NOT FOUND OR (s.capacity IS NULL AND NOT s.draining) THEN
        RETURN wanted;
    ELSIF s.draining OR current_setting('transaction_isolation') <> 'read committed'
          OR NOT pg_try_advisory_xact_lock(hashtext('evoq placement'), hashtext(s.name)) THEN
        RETURN 0;
    END IF;
    RETURN (SELECT least(wanted, greatest(l.capacity - l.live, 0))::integer
            FROM evoq.server_load l WHERE l.name = s.name);
END
$$;

-- 0.7.0: a new webhook secret: 64 hex digits from two random (v4) uuids, which PostgreSQL draws
-- from the operating system's random source (what evoq_configure's Rust does for `default`).
CREATE FUNCTION evoq._new_webhook_secret() RETURNS text
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT replace(gen_random_uuid()::text, '-', '') || replace(gen_random_uuid()::text, '-', '') $$;

-- 0.6.0: the error for a server name evoq does not know.
CREATE FUNCTION evoq._no_such_server(name text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM evoq.servers) THEN
        RAISE EXCEPTION 'there is no Evolution server named %: evoq is not configured yet',
                        coalesce(quote_literal(name), 'NULL')
            USING ERRCODE = '55000',
                  HINT = 'evoq_configure(api_url => ..., api_key => ...) makes the server named ''default''.';
    END IF;
    RAISE EXCEPTION 'there is no Evolution server named %', coalesce(quote_literal(name), 'NULL')
        USING ERRCODE = '22023',
              HINT = format('evoq_servers lists them: %s.',
                            (SELECT string_agg(quote_literal(s.name), ', ' ORDER BY s.name) FROM evoq.servers s));
END
$$;

-- 0.6.0: why a server takes no new instance now; NULL when it does. Its instances are counted
-- only when it has a capacity or drains.
CREATE FUNCTION evoq._server_full(server text) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$
    SELECT CASE WHEN s.draining OR s.capacity IS NOT NULL
                THEN (SELECT l.full_reason FROM evoq.server_load l WHERE l.name = s.name) END
    FROM evoq.servers s WHERE s.name = _server_full.server
$$;

-- 0.7.0: why no server takes a new instance now (each one's reason); NULL when one does, or when
-- there is no server yet.
CREATE FUNCTION evoq._placement_blocked() RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$
    SELECT CASE WHEN bool_and(f.reason IS NOT NULL) THEN string_agg(f.reason, '; ' ORDER BY f.name) END
    FROM (SELECT s.name, evoq._server_full(s.name) AS reason FROM evoq.servers s) f
$$;

-- Puts claimed rows back exactly as they were (the circuit breaker: a batch that failed because
-- of the server or the configuration is not the rows' fault and costs them nothing). 0.7.0: a
-- row the claim placed goes back unplaced when "unplace" says its call never left (claimed ahead
-- and not called), so it may go to another server; a row whose call left stays where it went.
CREATE FUNCTION evoq._release_queue(claims jsonb) RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$
    UPDATE evolution_instance_creation_queue q
    SET status = c.prev_status, attempts = greatest(q.attempts - 1, 0), updated_at = c.prev_updated_at,
        next_attempt_at = coalesce(c.prev_next_attempt_at, q.next_attempt_at),
        server = CASE WHEN c.unplace THEN NULL ELSE q.server END
    FROM jsonb_to_recordset(claims) AS c(id uuid, prev_status text, prev_updated_at timestamptz,
                                         prev_next_attempt_at timestamptz, claimed_at timestamptz,
                                         unplace boolean)
    WHERE q.id = c.id AND q.status = 'processing'
      AND (c.claimed_at IS NULL OR q.updated_at = c.claimed_at)
$$;

-- Applies the requeue requests (re-inserted profiles, lost instances, deprovisioned users) whose
-- queue rows no other run holds; the rest wait for a later run. Never waits on a row lock, so the
-- profile triggers (for their own user only: an application's transaction must not hold other
-- users' rows) and either job can call it while holding their own. The one place that says what
-- requeueing a row means:
--   * the user's latest re-insert or deprovisioning decides: signing up again after a deletion
--     creates a fresh instance, deleting after a re-insert deletes;
--   * a lost instance is created again, but a loss never overrides a deletion (queued or done);
--   * deprovisioning a user whose instance is already deleted, or whom evoq never queued, is a
--     no-op.
-- A deletion is always sent to the server (logout, then delete; 404 means done), even for a
-- creation that looks untried: a run that was cancelled or released after the server created
-- the instance leaves no trace in the row.
CREATE FUNCTION evoq._apply_requeue_requests(only_user uuid DEFAULT NULL) RETURNS integer
LANGUAGE sql
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$
    WITH req AS (
        SELECT id, user_id, reason, requested_at FROM evoq.requeue_requests
        WHERE only_user IS NULL OR user_id = only_user
        FOR UPDATE SKIP LOCKED
    ), per_user AS (
        -- n: re-inserts and losses, which retry_count counts (as the original setup did); a
        -- deprovisioning is not a retry.
        SELECT user_id, count(*) FILTER (WHERE reason <> 'deprovision') AS n,
               coalesce((array_agg(reason ORDER BY requested_at DESC, id DESC)
                         FILTER (WHERE reason <> 'lost'))[1], 'lost') AS reason
        FROM req GROUP BY user_id
    ), free AS (
        -- 0.4.0: a row the background worker claimed is held by its lease, not by a lock
        SELECT q.id, q.user_id, q.action, q.status FROM evolution_instance_creation_queue q
        WHERE q.user_id IN (SELECT user_id FROM per_user)
          AND NOT (q.status = 'processing' AND q.next_attempt_at > clock_timestamp())
        FOR UPDATE SKIP LOCKED
    ), decided AS (
        SELECT free.id, free.user_id, p.n, p.reason,
               (p.reason = 'lost' AND free.action = 'delete')
               OR (p.reason = 'deprovision' AND free.action = 'delete' AND free.status = 'completed'
                   AND NOT EXISTS (SELECT 1 FROM evolution_instances i
                                   WHERE i.user_id = free.user_id AND i.instance_status <> 'deleted')) AS moot
        FROM free JOIN per_user p USING (user_id)
    ), requeued AS (
        UPDATE evolution_instance_creation_queue q SET
            action = CASE d.reason WHEN 'deprovision' THEN 'delete' ELSE 'create' END,
            status = 'pending', request_id = gen_random_uuid(), retry_count = q.retry_count + d.n,
            attempts = 0, next_attempt_at = now(), processed_at = NULL, error_kind = NULL,
            -- 0.7.0: a re-insert, a loss or a deprovisioning ends a move in progress
            move_to = NULL,
            error_message = CASE d.reason WHEN 'lost'
                THEN 'the Evolution API no longer knows this instance (404); creating it again' END,
            last_http_status = CASE d.reason WHEN 'lost' THEN 404 END,
            -- 0.6.0: a creation is placed afresh once its server answered for the old instance
            -- (lost: 404; or deleted); otherwise it stays where the server may still hold it.
            -- 0.7.0: and only when the row's last request was answered (completed): a
            -- re-creation sent and unanswered (retrying, failed) may exist at its server
            server = CASE WHEN d.reason <> 'deprovision' AND q.status = 'completed' AND EXISTS (
                              SELECT 1 FROM evolution_instances i WHERE i.user_id = q.user_id
                              AND i.instance_status IN ('lost', 'deleted'))
                          THEN NULL ELSE q.server END,
            updated_at = clock_timestamp()
        FROM decided d
        WHERE q.id = d.id AND NOT d.moot
        RETURNING q.user_id
    ), added AS (
        -- A lost or deprovisioned instance whose queue row is gone (deleted by hand) is queued
        -- afresh. Not for a re-inserted profile: its own insert queued it.
        INSERT INTO evolution_instance_creation_queue (user_id, instance_name, action, server)
        SELECT p.user_id, i.instance_name, CASE p.reason WHEN 'deprovision' THEN 'delete' ELSE 'create' END,
               CASE p.reason WHEN 'deprovision' THEN i.server END
        FROM per_user p
        LEFT JOIN evolution_instances i ON i.user_id = p.user_id
        WHERE (p.reason = 'lost' OR (p.reason = 'deprovision' AND i.instance_status <> 'deleted'))
          AND NOT EXISTS (SELECT 1 FROM evolution_instance_creation_queue q WHERE q.user_id = p.user_id)
        ON CONFLICT (user_id) DO NOTHING
        RETURNING user_id
    ), applied AS (
        DELETE FROM evoq.requeue_requests r USING req
        WHERE r.id = req.id
          AND (req.user_id IN (SELECT user_id FROM requeued) OR req.user_id IN (SELECT user_id FROM added)
               OR req.user_id IN (SELECT user_id FROM decided WHERE moot)
               -- nothing to do: a deprovisioned user evoq never queued
               OR (req.reason = 'deprovision'
                   AND NOT EXISTS (SELECT 1 FROM evolution_instance_creation_queue q WHERE q.user_id = req.user_id)
                   AND NOT EXISTS (SELECT 1 FROM evolution_instances i WHERE i.user_id = req.user_id
                                   AND i.instance_status <> 'deleted')))
        RETURNING 1
    )
    SELECT count(*)::integer FROM applied
$$;

-- Unusable attachments: an attached table whose user id column was renamed, dropped or retyped
-- after evoq_attach. NULL when every attachment works.
CREATE FUNCTION evoq._attachment_problems() RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT string_agg(format('%s: %s', t.tgrelid::regclass,
               CASE WHEN a.attname IS NULL THEN format('no column %I', arg.col)
                    ELSE format('column %I is %s, not uuid', arg.col, format_type(a.atttypid, a.atttypmod)) END),
           '; ' ORDER BY t.tgrelid::regclass::text)
    FROM pg_trigger t
    CROSS JOIN LATERAL (SELECT CASE WHEN t.tgnargs > 0
                                    THEN split_part(encode(t.tgargs, 'escape'), '\000', 1) ELSE 'id' END AS col) arg
    LEFT JOIN pg_attribute a ON a.attrelid = t.tgrelid AND a.attname = arg.col AND a.attnum > 0 AND NOT a.attisdropped
    WHERE t.tgname = 'on_profile_created_create_evolution_instance'
      AND (a.attname IS NULL OR a.atttypid <> 'uuid'::regtype)
$$;

-- Writes the outcome of a batch. Each element of results:
--   {"id", "instance_name", "ok": true, "action": "create", "instance_id", "token", "instance_status",
--    "qr_code", "qr_text", "pairing_code", "qr_count", "webhook_version"}
--   (webhook_version: the evoq.settings.webhook_changed_at whose webhook the create carried)
--   {"id", "instance_name", "ok": true, "action": "delete"}
--   {"id", "instance_name", "ok": false, "error", "http_status", "error_kind", "retry_in_ms" | null (give up)}
-- each with "claimed_at" (0.4.0), the claim's stamp: a row no longer held by that claim is left alone.
CREATE FUNCTION evoq._record_queue_results(results jsonb) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$
-- 0.5.0: PL/pgSQL, so the statement is planned once per session: as an SQL function it was
-- planned at every call, about 2 ms of each group's record in the worker (measured).
BEGIN
    WITH given AS (
        SELECT * FROM jsonb_to_recordset(results) AS x(
            id uuid, instance_name text, ok boolean, action text, instance_id text, token text, instance_status text,
            qr_code text, qr_text text, pairing_code text, qr_count integer, webhook_version timestamptz,
            error text, http_status integer, error_kind text, retry_in_ms bigint, claimed_at timestamptz,
            paired boolean, number text)
    ), r AS (
        -- 0.4.0: only rows still held by the claim that made the call (a worker's lease that
        -- ran out may have let another run take the row, or a deprovisioning re-queued it)
        SELECT given.* FROM given JOIN evolution_instance_creation_queue q ON q.id = given.id
        WHERE q.status = 'processing' AND (given.claimed_at IS NULL OR q.updated_at = given.claimed_at)
    ), ok AS (
        SELECT r.*, q.user_id, q.server FROM r JOIN evolution_instance_creation_queue q ON q.id = r.id
        WHERE r.ok AND coalesce(r.action, 'create') = 'create'
    ), instances AS (
        INSERT INTO evolution_instances AS i (user_id, instance_name, instance_id, instance_status,
                                              qr_code, qr_text, pairing_code, qr_count, last_qr_update,
                                              connected_at, connecting_since, webhook_set_at,
                                              last_state_check_at, last_refresh_at, updated_at, server)
        SELECT user_id, instance_name, instance_id, instance_status, qr_code, qr_text, pairing_code, qr_count,
               CASE WHEN qr_code IS NOT NULL OR qr_text IS NOT NULL THEN clock_timestamp() END,
               CASE WHEN instance_status = 'open' THEN clock_timestamp() END,
               clock_timestamp(),
               webhook_version,
               -- an open instance is checked one evoq.state_check_interval_ms from now
               CASE WHEN instance_status = 'open' THEN clock_timestamp() END,
               -- 0.5.0: the create asked for a QR (qrcode: true), and the server delivers the QR
               -- by webhook when the create carried one subscribed to QRCODE_UPDATED: the first
               -- poll then waits its evoq.qr_refresh_interval_ms like any other, instead of a
               -- connect at once (which spent slots creations needed, and on a server that
               -- cannot reach WhatsApp went through its close path and started a socket)
               -- The create's reply carried a QR: it is as fresh as a poll's, and the same poll
               -- at once would only fetch it again.
               CASE WHEN (webhook_version IS NOT NULL
                          AND (SELECT s.webhook_events = '{}' OR 'QRCODE_UPDATED' = ANY (s.webhook_events)
                               FROM evoq.settings s))
                         OR qr_code IS NOT NULL OR qr_text IS NOT NULL
                    THEN clock_timestamp() END,
               -- 0.6.0: when the answer was recorded, not when the transaction began: the
               -- reconciler judges only rows written before its listing was asked for, and the SQL
               -- function's transaction may have begun before the server made the instance
               clock_timestamp(),
               coalesce(server, 'default')
        FROM ok
        ON CONFLICT (user_id) DO UPDATE SET
            instance_name = excluded.instance_name,
            instance_id = coalesce(excluded.instance_id, i.instance_id),
            instance_status = excluded.instance_status,
            qr_code = coalesce(excluded.qr_code, CASE WHEN excluded.instance_status = 'connecting' AND i.instance_status = 'connecting' THEN i.qr_code END),
            qr_text = coalesce(excluded.qr_text, CASE WHEN excluded.instance_status = 'connecting' AND i.instance_status = 'connecting' THEN i.qr_text END),
            pairing_code = coalesce(excluded.pairing_code, CASE WHEN excluded.instance_status = 'connecting' AND i.instance_status = 'connecting' THEN i.pairing_code END),
            qr_count = coalesce(excluded.qr_count, i.qr_count),
            last_qr_update = coalesce(excluded.last_qr_update, i.last_qr_update),
            connected_at = coalesce(i.connected_at, excluded.connected_at),
            last_error = NULL, last_error_at = NULL,
            -- A created (or adopted) instance starts a new life: a new QR window, no old events.
            connecting_since = excluded.connecting_since,
            disconnected_at = NULL, disconnect_reason = NULL, last_event_at = NULL, no_qr_rounds = 0,
            last_state_check_at = excluded.last_state_check_at,
            last_refresh_at = excluded.last_refresh_at,
            server_loop_deliveries = 0, server_loop_seen_at = NULL, server_loop_logouts = 0,
            server_loop_logout_at = NULL,
            webhook_set_at = coalesce(excluded.webhook_set_at, i.webhook_set_at),
            -- 0.6.0: a re-creation may have been placed on another server
            server = excluded.server,
            updated_at = clock_timestamp()
        RETURNING i.instance_name
    ), tokens AS (
        INSERT INTO evoq.instance_tokens AS t (instance_name, token)
        SELECT ok.instance_name, ok.token FROM ok JOIN instances USING (instance_name)
        WHERE ok.token IS NOT NULL
        ON CONFLICT (instance_name) DO UPDATE SET token = excluded.token, updated_at = clock_timestamp()
    ), removed AS (
        -- Deprovisioned: the row stays (the app may show "deleted"), its QR and token go.
        UPDATE evolution_instances i SET
            instance_status = 'deleted', qr_code = NULL, qr_text = NULL, pairing_code = NULL,
            disconnected_at = coalesce(i.disconnected_at, clock_timestamp()),
            disconnect_reason = CASE WHEN q.move_to IS NOT NULL
                                     THEN format('moving to %s: deleted at its server', coalesce(nullif(q.move_to, ''), 'another server'))
                                     ELSE 'deprovisioned: deleted at the Evolution API' END,
            last_error = NULL, last_error_at = NULL, updated_at = clock_timestamp()
        FROM r JOIN evolution_instance_creation_queue q ON q.id = r.id
        WHERE r.ok AND r.action = 'delete' AND i.user_id = q.user_id
        RETURNING i.instance_name
    ), forgotten AS (
        DELETE FROM evoq.instance_tokens t USING removed WHERE t.instance_name = removed.instance_name
    ), unlinked AS (
        -- 0.5.0: a create that carried a phone number was answered (the server holds it now; an
        -- adopted instance did not get it, and is paired by the QR refresh), or the user's
        -- instance was deleted: the number is not kept any longer
        DELETE FROM evoq.phone_links p USING r JOIN evolution_instance_creation_queue q ON q.id = r.id
        WHERE r.ok AND p.user_id = q.user_id
          -- only the number the create carried: a newer one given meanwhile stays
          AND (r.action = 'delete' OR r.paired AND p.phone = r.number)
    )
    UPDATE evolution_instance_creation_queue q SET
        status = CASE WHEN r.ok AND r.action = 'delete' AND q.move_to IS NOT NULL THEN 'pending'
                      WHEN r.ok THEN 'completed' WHEN r.retry_in_ms IS NULL THEN 'failed' ELSE 'pending' END,
        -- 0.7.0: a move's deletion is done: the creation on the new server is queued (an untried
        -- request there: it needs room, and waits for it)
        action = CASE WHEN r.ok AND r.action = 'delete' AND q.move_to IS NOT NULL THEN 'create' ELSE q.action END,
        attempts = CASE WHEN r.ok AND r.action = 'delete' AND q.move_to IS NOT NULL THEN 0 ELSE q.attempts END,
        request_id = CASE WHEN r.ok AND r.action = 'delete' AND q.move_to IS NOT NULL THEN gen_random_uuid()
                          ELSE q.request_id END,
        server = CASE WHEN r.ok AND r.action = 'delete' AND q.move_to IS NOT NULL THEN nullif(q.move_to, '')
                      ELSE q.server END,
        move_to = CASE WHEN r.ok AND r.action = 'delete' THEN NULL ELSE q.move_to END,
        instance_name = coalesce(r.instance_name, q.instance_name),
        processed_at = CASE WHEN r.ok AND r.action = 'delete' AND q.move_to IS NOT NULL THEN NULL
                            WHEN r.ok THEN clock_timestamp() ELSE q.processed_at END,
        error_message = CASE WHEN r.ok THEN NULL ELSE evoq._redact(r.error, r.instance_name) END,
        error_kind = CASE WHEN r.ok THEN NULL ELSE r.error_kind END,
        last_http_status = r.http_status,
        last_error_at = CASE WHEN r.ok THEN q.last_error_at ELSE clock_timestamp() END,
        retry_count = q.retry_count + CASE WHEN r.ok THEN 0 ELSE 1 END,
        -- (now(): due at once, for a later claim of this run too)
        next_attempt_at = CASE WHEN r.ok AND r.action = 'delete' AND q.move_to IS NOT NULL THEN now()
                               WHEN r.ok OR r.retry_in_ms IS NULL THEN q.next_attempt_at
                               ELSE clock_timestamp() + r.retry_in_ms * interval '1 millisecond' END,
        updated_at = clock_timestamp()
    FROM r WHERE q.id = r.id;
END
$$;

-- Whether an instance name is this deployment's to touch: its namespace's, or a 0.1.0 name
-- (no namespace) where this database was upgraded from 0.1.0. The SQL twin of names::is_ours.
CREATE FUNCTION evoq._is_ours(instance_name text, namespace text, owns_legacy_names boolean) RETURNS boolean
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN instance_name LIKE 'evoq\_%\_%'
                THEN instance_name LIKE 'evoq\_' || namespace || '\_%'
                ELSE instance_name LIKE 'evoq\_%' AND coalesce(owns_legacy_names, false) END
$$;

-- Claims up to batch_size instances with something to do, each with its task, in this order:
--   expire:  connecting, not scanned within window_ms: log it out (its QR loop costs the server);
--   connect: connecting, not refreshed within min_interval_ms: ask for the current QR;
--   repoint: registered before the webhook last changed (URL, events, headers, secret), unless
--            the caller says not to;
--   check:   open, not checked within check_interval_ms: ask connectionState (never connect).
-- close, refused and expired instances are never connected by a job: only evoq_reconnect
-- re-arms them. Another deployment's instances (rows a copy inherited) are not touched.
-- 0.4.0: busy are the instances the caller has in flight (its own transaction would otherwise
-- claim them again: they are locked by itself); qr_fresh_ms > 0 also skips connecting instances
-- whose QR (polled or delivered by webhook) is younger than that, so with webhooks arriving
-- polling stays a fallback. 0.7.0: the instances of one server.
CREATE FUNCTION evoq._claim_refresh(server text, batch_size integer, min_interval_ms bigint, window_ms bigint,
                                    check_interval_ms bigint, repoint boolean, busy uuid[],
                                    qr_fresh_ms bigint) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$
DECLARE
    s record;
    claimed jsonb := '[]';
    part jsonb;
    paced timestamptz := now() - min_interval_ms * interval '1 millisecond';
    -- 0.7.0: when this server's instances' webhook last changed: the deployment's (URL,
    -- events, headers) or the server's own secret
    changed_at timestamptz;
BEGIN
    SELECT namespace, owns_legacy_names, webhook_url, webhook_changed_at INTO s FROM evoq.settings;
    changed_at := greatest(s.webhook_changed_at,
                           (SELECT v.webhook_changed_at FROM evoq.servers v WHERE v.name = _claim_refresh.server));

    -- 0.5.0: a phone number is kept no longer than the QR window, nor once its instance opened,
    -- expired or was deleted (rows evoq_link_with_phone holds are left for the next claim).
    DELETE FROM evoq.phone_links p WHERE p.user_id IN (
        SELECT l.user_id FROM evoq.phone_links l
        WHERE l.requested_at <= now() - window_ms * interval '1 millisecond'
           OR EXISTS (SELECT 1 FROM evolution_instances i WHERE i.user_id = l.user_id
                      AND i.instance_status IN ('open', 'expired', 'deleted'))
              -- a creation queued again (a new sign-up after a deprovisioning) still needs it
              AND NOT EXISTS (SELECT 1 FROM evolution_instance_creation_queue q
                              WHERE q.user_id = l.user_id AND q.action = 'create'
                                AND q.status IN ('pending', 'processing'))
        FOR UPDATE SKIP LOCKED);

    -- Connecting instances not asked within min_interval_ms: past their window first (expire),
    -- then those whose user gave a phone number (pair: a logout, then a connect with the
    -- number), then the rest (connect). One statement, so a row is claimed for one task.
    WITH due AS (
        SELECT id, coalesce(connecting_since, created_at) <= now() - window_ms * interval '1 millisecond' AS past,
               user_id,
               EXISTS (SELECT 1 FROM evoq.phone_links p WHERE p.user_id = evolution_instances.user_id) AS pair
        FROM evolution_instances
        WHERE instance_status = 'connecting'
          AND (last_refresh_at IS NULL OR last_refresh_at <= paced)
          AND (qr_fresh_ms <= 0 OR last_qr_update IS NULL
               OR last_qr_update <= now() - qr_fresh_ms * interval '1 millisecond'
               OR coalesce(connecting_since, created_at) <= now() - window_ms * interval '1 millisecond'
               OR EXISTS (SELECT 1 FROM evoq.phone_links p WHERE p.user_id = evolution_instances.user_id))
          AND id <> ALL (busy)
          AND evolution_instances.server = _claim_refresh.server
          AND evoq._is_ours(instance_name, s.namespace, s.owns_legacy_names)
          -- a user being deprovisioned: only the deletion touches the instance. (0.7.0: a lookup
          -- by the queue's unique user_id for each instance, not an anti-join: planned while the
          -- tables were small, the anti-join read the whole queue for each instance, 90 ms a
          -- claim after a burst of 1 600 sign-ups, and held up every other lane of the worker.)
          AND (SELECT q.action FROM evolution_instance_creation_queue q
               WHERE q.user_id = evolution_instances.user_id) IS DISTINCT FROM 'delete'
        ORDER BY 2 DESC, last_refresh_at NULLS FIRST
        LIMIT batch_size
        FOR UPDATE SKIP LOCKED
    ), upd AS (
        UPDATE evolution_instances i SET last_refresh_at = clock_timestamp(),
            pairing_requested_at = CASE WHEN due.pair AND NOT due.past THEN clock_timestamp()
                                        ELSE i.pairing_requested_at END
        FROM due WHERE i.id = due.id
        RETURNING i.id, i.instance_name, i.qr_text, due.past, i.updated_at,
                  CASE WHEN NOT due.past THEN (SELECT p.phone FROM evoq.phone_links p WHERE p.user_id = due.user_id) END AS number
    )
    SELECT coalesce(jsonb_agg(jsonb_build_object('id', id, 'instance_name', instance_name, 'qr_text', qr_text,
                                                 'status', 'connecting', 'claimed_at', updated_at, 'number', number,
                                                 'task', CASE WHEN past THEN 'expire' WHEN number IS NOT NULL THEN 'pair'
                                                              ELSE 'connect' END)), '[]')
    INTO part FROM upd;
    claimed := claimed || part;

    -- Not paced by a column: the caller stops asking for these once one failed in its run.
    IF repoint AND s.webhook_url IS NOT NULL AND changed_at IS NOT NULL THEN
        WITH due AS (
            SELECT id FROM evolution_instances
            WHERE instance_status IN ('connecting', 'open', 'close', 'refused', 'expired')
              AND (webhook_set_at IS NULL OR webhook_set_at < changed_at)
              AND evoq._is_ours(instance_name, s.namespace, s.owns_legacy_names)
              AND (SELECT q.action FROM evolution_instance_creation_queue q
                   WHERE q.user_id = evolution_instances.user_id) IS DISTINCT FROM 'delete'
              AND id NOT IN (SELECT (c->>'id')::uuid FROM jsonb_array_elements(claimed) c)
              AND id <> ALL (busy)
          AND evolution_instances.server = _claim_refresh.server
            ORDER BY webhook_set_at NULLS FIRST
            LIMIT batch_size - jsonb_array_length(claimed)
            FOR UPDATE SKIP LOCKED
        )
        SELECT coalesce(jsonb_agg(jsonb_build_object('id', i.id, 'instance_name', i.instance_name,
                                                     'qr_text', i.qr_text, 'status', i.instance_status,
                                                     'claimed_at', i.updated_at, 'task', 'repoint')), '[]')
        INTO part FROM due JOIN evolution_instances i USING (id);
        claimed := claimed || part;
    END IF;

    -- 0.5.0: expired or deleted instances the server still reconnects (its deliveries keep
    -- coming): logged out again, at most 5 times, 1, 2, 4, 8 and 16 minutes apart.
    WITH due AS (
        SELECT id FROM evolution_instances
        WHERE instance_status IN ('expired', 'deleted')
          AND server_loop_seen_at IS NOT NULL
          AND server_loop_seen_at > coalesce(server_loop_logout_at, '-infinity')
          AND server_loop_logouts < 5
          AND coalesce(server_loop_logout_at, '-infinity')
              <= now() - (60000 * 2 ^ server_loop_logouts) * interval '1 millisecond'
          AND evoq._is_ours(instance_name, s.namespace, s.owns_legacy_names)
          AND id NOT IN (SELECT (c->>'id')::uuid FROM jsonb_array_elements(claimed) c)
          AND id <> ALL (busy)
          AND evolution_instances.server = _claim_refresh.server
        ORDER BY server_loop_seen_at
        LIMIT batch_size - jsonb_array_length(claimed)
        FOR UPDATE SKIP LOCKED
    ), upd AS (
        UPDATE evolution_instances i SET server_loop_logout_at = clock_timestamp(),
                                         server_loop_logouts = i.server_loop_logouts + 1
        FROM due WHERE i.id = due.id
        RETURNING i.id, i.instance_name, i.qr_text, i.instance_status, i.updated_at
    )
    SELECT coalesce(jsonb_agg(jsonb_build_object('id', id, 'instance_name', instance_name, 'qr_text', qr_text,
                                                 'status', instance_status, 'claimed_at', updated_at,
                                                 'task', 'relogout')), '[]')
    INTO part FROM upd;
    claimed := claimed || part;

    WITH due AS (
        SELECT id FROM evolution_instances
        WHERE instance_status = 'open'
          AND (last_state_check_at IS NULL
               OR last_state_check_at <= now() - check_interval_ms * interval '1 millisecond')
          AND evoq._is_ours(instance_name, s.namespace, s.owns_legacy_names)
          -- a user being deprovisioned: only the deletion touches the instance
          AND (SELECT q.action FROM evolution_instance_creation_queue q
               WHERE q.user_id = evolution_instances.user_id) IS DISTINCT FROM 'delete'
          AND id NOT IN (SELECT (c->>'id')::uuid FROM jsonb_array_elements(claimed) c)
          AND id <> ALL (busy)
          AND evolution_instances.server = _claim_refresh.server
        ORDER BY last_state_check_at NULLS FIRST
        LIMIT batch_size - jsonb_array_length(claimed)
        FOR UPDATE SKIP LOCKED
    ), upd AS (
        UPDATE evolution_instances i SET last_state_check_at = clock_timestamp()
        FROM due WHERE i.id = due.id
        RETURNING i.id, i.instance_name, i.qr_text, i.updated_at
    )
    SELECT coalesce(jsonb_agg(jsonb_build_object('id', id, 'instance_name', instance_name, 'qr_text', qr_text,
                                                 'status', 'open', 'claimed_at', updated_at, 'task', 'check')), '[]')
    INTO part FROM upd;
    RETURN claimed || part;
END
$$;

-- 0.4.0: how long, in ms, until the next row is due for either job (0: one is due now; at most
-- max_ms). The background worker sleeps that long when nothing wakes it earlier. The same
-- conditions as the claims (evoq._claim_queue, evoq._claim_refresh with qr_fresh_ms and repoint),
-- so a row no claim would take never keeps the worker awake.
CREATE FUNCTION evoq._next_due_ms(min_interval_ms bigint, window_ms bigint, check_interval_ms bigint,
                                  qr_fresh_ms bigint, repoint boolean, max_ms bigint) RETURNS double precision
LANGUAGE sql STABLE
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$
    WITH s AS (SELECT namespace, owns_legacy_names, webhook_url, webhook_changed_at FROM evoq.settings),
    mine AS (
        SELECT i.* FROM evolution_instances i, s
        WHERE evoq._is_ours(i.instance_name, s.namespace, s.owns_legacy_names)
          AND (SELECT q.action FROM evolution_instance_creation_queue q
               WHERE q.user_id = i.user_id) IS DISTINCT FROM 'delete'
    ), due AS (
        -- 0.6.0: an untried creation is due only while a server takes new instances (a full
        -- one would have the worker claim nothing every second; room wakes it: evoq_server_set,
        -- evoq_server_drain, or its own deletions and expiries; otherwise it looks again within
        -- a minute). Each branch's test of the servers is a one-time filter: one branch is read.
        -- 0.7.0: any server (evoq._placement_blocked).
        SELECT min(next_attempt_at) AS at FROM evolution_instance_creation_queue
        WHERE status IN ('pending', 'processing') AND evoq._placement_blocked() IS NULL
        UNION ALL
        SELECT min(next_attempt_at) FROM evolution_instance_creation_queue
        WHERE status IN ('pending', 'processing') AND (action = 'delete' OR attempts > 0)
          AND evoq._placement_blocked() IS NOT NULL
        UNION ALL
        -- connecting: once asked min_interval_ms ago, and its QR is older than qr_fresh_ms (or
        -- its window is over)
        SELECT min(greatest(coalesce(last_refresh_at, '-infinity') + min_interval_ms * interval '1 millisecond',
                            CASE WHEN qr_fresh_ms <= 0 THEN '-infinity'
                                 ELSE least(coalesce(last_qr_update, '-infinity') + qr_fresh_ms * interval '1 millisecond',
                                            coalesce(connecting_since, created_at) + window_ms * interval '1 millisecond')
                            END))
        FROM mine WHERE instance_status = 'connecting'
        UNION ALL
        SELECT min(coalesce(last_state_check_at, '-infinity') + check_interval_ms * interval '1 millisecond')
        FROM mine WHERE instance_status = 'open'
        UNION ALL
        -- 0.5.0: a logout tried again for an instance the server still reconnects
        SELECT min(coalesce(server_loop_logout_at, '-infinity')
                   + (60000 * 2 ^ server_loop_logouts) * interval '1 millisecond')
        FROM evolution_instances i, s
        WHERE i.instance_status IN ('expired', 'deleted') AND i.server_loop_seen_at IS NOT NULL
          AND i.server_loop_seen_at > coalesce(i.server_loop_logout_at, '-infinity')
          AND i.server_loop_logouts < 5
          AND evoq._is_ours(i.instance_name, s.namespace, s.owns_legacy_names)
        UNION ALL
        SELECT now() FROM mine, s
        WHERE repoint AND s.webhook_url IS NOT NULL AND s.webhook_changed_at IS NOT NULL
          AND mine.instance_status IN ('connecting', 'open', 'close', 'refused', 'expired')
          AND (mine.webhook_set_at IS NULL
               OR mine.webhook_set_at < greatest(s.webhook_changed_at,
                                                 (SELECT v.webhook_changed_at FROM evoq.servers v WHERE v.name = mine.server)))
    )
    -- 0.5.0: a row never asked or checked is due since '-infinity', and PostgreSQL cannot
    -- subtract an infinite timestamp: clamp it first (anything in the past is due now).
    SELECT greatest(0, least(max_ms::double precision,
                             CASE WHEN min(at) <= clock_timestamp() THEN 0
                                  ELSE extract(epoch FROM (min(at) - clock_timestamp())) * 1000 END))
    FROM due
$$;

-- Writes the outcome of a refresh batch. Each element: {"id", "outcome", "qr_code", "qr_text",
-- "pairing_code", "qr_count", "error"}, outcome one of
--   qr, no_qr, open, lost, error           (connect);
--   expired                                (expire: logged out);
--   checked, closed                        (check: still open, or the server says close; lost as above);
--   repointed                              (repoint; with "webhook_version", as above);
--   gone                                   (repoint of an idle instance the server lost: lost,
--                                           not created again until evoq_reconnect);
--   relogged                               (0.5.0: a logout tried again; nothing changes).
-- and "claimed_status", "claimed_at" (0.4.0): the row's status and updated_at at the claim; a row
-- changed since (a webhook delivery, an operator) is left alone.
CREATE FUNCTION evoq._record_refresh_results(results jsonb) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$
-- 0.5.0: PL/pgSQL, so the statement is planned once per session: as an SQL function it was
-- planned at every call, about 2 ms of each group's record in the worker (measured).
BEGIN
    WITH given AS (
        SELECT * FROM jsonb_to_recordset(results) AS x(
            id uuid, outcome text, qr_code text, qr_text text, pairing_code text, qr_count integer, error text,
            webhook_version timestamptz, claimed_status text, claimed_at timestamptz, paired boolean,
            number text)
    ), r AS (
        -- 0.6.0: the reconciler's findings: a live instance the server does not list is lost
        -- (created again), an idle one gone (created again when its user asks), as on a 404
        SELECT id, CASE outcome WHEN 'unlisted' THEN 'lost' WHEN 'unlisted_idle' THEN 'gone' ELSE outcome END AS outcome,
               outcome IN ('unlisted', 'unlisted_idle') AS unlisted, qr_code, qr_text, pairing_code, qr_count, error,
               webhook_version, claimed_status, claimed_at, paired, number
        FROM given
    ), free AS (
        -- 0.5.0: a row another session holds (a pg_cron run, an operator) keeps its state: its
        -- result is dropped, and the next refresh asks again. Waiting for it froze the worker's
        -- main loop for a lock timeout per attempt (the batch, the row, the row as a failure).
        SELECT i.id FROM evolution_instances i JOIN r ON r.id = i.id FOR UPDATE OF i SKIP LOCKED
    ), updated AS (
        UPDATE evolution_instances i SET
            -- 0.5.0: a pairing's reply (a code: the server took the number) leaves the row
            -- connecting, also when the pairing's own logout was delivered first and closed it
            instance_status = CASE WHEN r.paired THEN 'connecting' ELSE
                              CASE r.outcome WHEN 'open' THEN 'open' WHEN 'lost' THEN 'lost' WHEN 'gone' THEN 'lost'
                                             WHEN 'expired' THEN 'expired' WHEN 'closed' THEN 'close'
                                             ELSE i.instance_status END END,
            qr_code = CASE WHEN r.outcome IN ('open', 'lost', 'gone', 'expired', 'closed') THEN NULL WHEN r.outcome = 'qr' THEN r.qr_code ELSE i.qr_code END,
            qr_text = CASE WHEN r.outcome IN ('open', 'lost', 'gone', 'expired', 'closed') THEN NULL WHEN r.outcome = 'qr' THEN r.qr_text ELSE i.qr_text END,
            pairing_code = CASE WHEN r.outcome IN ('open', 'lost', 'gone', 'expired', 'closed') THEN NULL WHEN r.outcome = 'qr' THEN r.pairing_code ELSE i.pairing_code END,
            qr_count = CASE WHEN r.outcome IN ('qr', 'no_qr') THEN coalesce(r.qr_count, i.qr_count) ELSE i.qr_count END,
            no_qr_rounds = CASE r.outcome WHEN 'no_qr' THEN i.no_qr_rounds + 1 WHEN 'qr' THEN 0 ELSE i.no_qr_rounds END,
            -- Only a QR that differs from the stored one counts as an update.
            last_qr_update = CASE WHEN r.outcome = 'qr' AND r.qr_text IS DISTINCT FROM i.qr_text
                                  THEN clock_timestamp() ELSE i.last_qr_update END,
            connected_at = CASE WHEN r.outcome = 'open' THEN clock_timestamp() ELSE i.connected_at END,
            last_state_check_at = CASE WHEN r.outcome = 'open' THEN clock_timestamp() ELSE i.last_state_check_at END,
            disconnected_at = CASE WHEN r.paired THEN NULL
                                   WHEN r.outcome IN ('expired', 'closed') THEN clock_timestamp()
                                   WHEN r.outcome = 'open' THEN NULL ELSE i.disconnected_at END,
            disconnect_reason = CASE WHEN r.paired THEN NULL ELSE CASE r.outcome
                WHEN 'expired' THEN 'not scanned within the QR window (evoq.qr_window_ms); logged out at the server'
                WHEN 'closed' THEN 'the Evolution API reports the session closed (connectionState)'
                WHEN 'open' THEN NULL ELSE i.disconnect_reason END END,
            -- 0.5.0: deliveries older than the pairing's answer (its own logout's close among
            -- them) no longer move the row
            last_event_at = CASE WHEN r.paired THEN greatest(i.last_event_at, clock_timestamp())
                                 ELSE i.last_event_at END,
            webhook_set_at = CASE WHEN r.outcome = 'repointed' THEN r.webhook_version
                                  WHEN r.outcome = 'gone' THEN clock_timestamp() ELSE i.webhook_set_at END,
            last_error = CASE WHEN r.outcome = 'error' THEN evoq._redact(r.error, i.instance_name)
                              WHEN r.unlisted AND r.outcome = 'lost' THEN 'the Evolution API does not list this instance (fetchInstances, evoq''s reconcile); its creation was queued again'
                              WHEN r.unlisted THEN 'the Evolution API does not list this instance (fetchInstances, evoq''s reconcile); evoq_reconnect creates it again'
                              WHEN r.outcome = 'lost' THEN 'the Evolution API no longer knows this instance (404); its creation was queued again'
                              WHEN r.outcome = 'gone' THEN 'the Evolution API no longer knows this instance (404); evoq_reconnect creates it again'
                              WHEN r.outcome IN ('checked', 'repointed', 'relogged') THEN i.last_error
                              ELSE NULL END,
            last_error_at = CASE WHEN r.outcome IN ('error', 'lost', 'gone') THEN clock_timestamp() ELSE i.last_error_at END,
            updated_at = clock_timestamp()
        FROM r WHERE i.id = r.id AND i.id IN (SELECT id FROM free)
          -- 0.4.0: the worker does not hold the row during the call; a delivery that moved it
          -- on meanwhile wins (0.5.0: except the close of a pairing's own logout)
          AND ((r.claimed_status IS NULL OR i.instance_status = r.claimed_status)
               AND (r.claimed_at IS NULL OR i.updated_at = r.claimed_at)
               OR r.paired AND i.instance_status = 'close' AND i.disconnected_at >= r.claimed_at)
        RETURNING i.user_id, i.instance_name, r.outcome, r.paired, r.number
    ), unlinked AS (
        -- 0.5.0: the pairing's connect was answered with a code and recorded: the server holds
        -- the number, evoq lets it go (only that number: a newer one given meanwhile stays)
        DELETE FROM evoq.phone_links p USING updated u
        WHERE u.paired AND p.user_id = u.user_id AND p.phone = u.number
    )
    -- A lost instance is created again: a requeue request, applied by the queue's next run (or at
    -- the end of this one) to a row no run holds. Updating the queue row here would lock it while
    -- this run holds the instance row, the opposite order of evoq_process_queue: a deadlock.
    INSERT INTO evoq.requeue_requests (user_id, reason)
    SELECT user_id, 'lost' FROM updated WHERE outcome = 'lost';
END
$$;

-- 0.6.0: the reconciler. How long until the server's next reconcile is due (0: now), from the
-- end of the last one; the first is due one interval after the server is first seen here, not at
-- once (a new deployment has nothing to reconcile yet). NULL: turned off (interval 0).
CREATE FUNCTION evoq._reconcile_due_ms(server text, interval_ms bigint) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    last timestamptz;
BEGIN
    IF interval_ms <= 0 THEN
        RETURN NULL;
    END IF;
    SELECT coalesce(r.finished_at, r.created_at) INTO last FROM evoq.reconciles r WHERE r.server = _reconcile_due_ms.server;
    IF NOT FOUND THEN
        -- (only when there is none: ON CONFLICT would wait for a reconcile in progress to commit)
        INSERT INTO evoq.reconciles (server) VALUES (_reconcile_due_ms.server) ON CONFLICT DO NOTHING;
        RETURN interval_ms;
    END IF;
    RETURN greatest(0, ceil(extract(epoch FROM last + interval_ms * interval '1 millisecond' - clock_timestamp()) * 1000))::bigint;
END
$$;

-- Takes the server's lease for one reconcile; returns when it did (the moment the listing is
-- asked for: rows changed after it are not judged by that listing), or NULL when another
-- reconcile holds it (its lease not run out, or its transaction still open).
CREATE FUNCTION evoq._reconcile_begin(server text, lease_ms bigint) RETURNS timestamptz
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    began timestamptz;
BEGIN
    -- Only when there is none: ON CONFLICT would wait for a reconcile in progress to commit,
    -- where this must say "busy" at once.
    IF NOT EXISTS (SELECT 1 FROM evoq.reconciles x WHERE x.server = _reconcile_begin.server) THEN
        INSERT INTO evoq.reconciles (server) VALUES (_reconcile_begin.server) ON CONFLICT DO NOTHING;
    END IF;
    UPDATE evoq.reconciles r SET started_at = clock_timestamp(),
                                 lease_until = clock_timestamp() + lease_ms * interval '1 millisecond'
    WHERE r.server = (SELECT x.server FROM evoq.reconciles x
                      WHERE x.server = _reconcile_begin.server
                        AND (x.lease_until IS NULL OR x.lease_until < clock_timestamp())
                      FOR UPDATE SKIP LOCKED)
    RETURNING r.started_at INTO began;
    RETURN began;
END
$$;

-- Compares what the server listed at listed_at (only the names of this deployment's namespace:
-- [{"n": name, "s": state or null, "u": user id}]) with the rows, and applies what needs no call:
-- * missing: a row the server does not list. connecting/open: lost, and created again (as a 404
--   does); close/refused/expired: lost, created again when its user asks (evoq_reconnect).
--   Rows changed after listed_at are not judged: the listing may predate them. When the server
--   lists none of many rows (more than 10, and more than half of the live ones) nothing is
--   applied: that is more likely a server that lost its database for a moment than a real loss,
--   and every instance's own 404 still tells (reported as missing_held_back).
-- * drift: a listed state that contradicts the row's (open there, connecting or idle here; close
--   there, open here). A listing has no server time, so it ranks below every delivery and call:
--   it is not applied as such, the instance is asked connectionState (the live truth; the
--   listing's state is the server's database, which lags), and that answer is written only to a
--   row nothing changed since this function read it. Up to max_calls, returned as "checks".
-- * orphans: listed names no row owns (no instance row but a deleted one, no queued creation).
--   Tracked in evoq.reconcile_orphans; those unowned for grace_ms are returned as "remove" (up to
--   max_calls), the caller logs them out and deletes them. Names outside the namespace never
--   reach this function.
-- 0.7.0: only the rows placed on this server are judged, and a name is an orphan here when no
-- live row of this server (nor a creation not placed elsewhere) owns it: a twin at another
-- server than the user's is removed.
CREATE FUNCTION evoq._reconcile_apply(server text, listed jsonb, listed_at timestamptz, grace_ms bigint,
                                      max_calls integer) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$
DECLARE
    cfg evoq.settings;
    names text[];
    live_rows integer;
    missing_live integer;
    missing_records jsonb;
    checks jsonb;
    unowned text[];
    remove jsonb;
    held_back boolean;
BEGIN
    SELECT * INTO cfg FROM evoq.settings;
    SELECT coalesce(array_agg(DISTINCT x.n), '{}') INTO names
    FROM jsonb_to_recordset(listed) AS x(n text) WHERE x.n IS NOT NULL;

    SELECT count(*), count(*) FILTER (WHERE NOT EXISTS (SELECT 1 FROM unnest(names) AS l(n) WHERE l.n = i.instance_name))
      INTO live_rows, missing_live
      FROM evolution_instances i
     WHERE i.instance_status IN ('connecting', 'open', 'close', 'refused', 'expired') AND i.updated_at < listed_at
       AND i.server = _reconcile_apply.server
       AND evoq._is_ours(i.instance_name, cfg.namespace, cfg.owns_legacy_names);
    held_back := missing_live > 10 AND missing_live * 2 > live_rows;

    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'id', i.id,
               'outcome', CASE WHEN i.instance_status IN ('connecting', 'open') THEN 'unlisted' ELSE 'unlisted_idle' END,
               'claimed_status', i.instance_status, 'claimed_at', i.updated_at)), '[]')
      INTO missing_records
      FROM evolution_instances i
     WHERE NOT held_back
       AND i.instance_status IN ('connecting', 'open', 'close', 'refused', 'expired')
       AND i.updated_at < listed_at
       AND i.server = _reconcile_apply.server
       AND evoq._is_ours(i.instance_name, cfg.namespace, cfg.owns_legacy_names)
       AND NOT EXISTS (SELECT 1 FROM unnest(names) AS l(n) WHERE l.n = i.instance_name);
    IF jsonb_array_length(missing_records) > 0 THEN
        PERFORM evoq._record_refresh_results(missing_records);
    END IF;

    WITH l AS (SELECT DISTINCT ON (x.n) x.n, x.s FROM jsonb_to_recordset(listed) AS x(n text, s text))
    SELECT coalesce(jsonb_agg(d.c), '[]') INTO checks FROM (
        SELECT jsonb_build_object('id', i.id, 'instance_name', i.instance_name, 'status', i.instance_status,
                                  'claimed_at', i.updated_at) AS c
        FROM evolution_instances i JOIN l ON l.n = i.instance_name
        WHERE i.updated_at < listed_at AND i.server = _reconcile_apply.server
          AND ((l.s = 'open' AND i.instance_status IN ('connecting', 'close', 'refused', 'expired'))
               OR (l.s = 'close' AND i.instance_status = 'open'))
        ORDER BY i.updated_at
        LIMIT max_calls) d;

    -- Orphans: owned by nothing. A queued creation (pending or processing) owns its user's
    -- name, whatever the rows say yet: its create may be in flight, or have timed out and be
    -- about to be retried (and adopt the instance). Only names of this deployment's namespace:
    -- a 0.1.0 name (evoq_<hex>) carries none, so another database that also owns such names
    -- could hold it; those are never taken for orphans.
    WITH l AS (SELECT DISTINCT ON (x.n) x.n, x.u FROM jsonb_to_recordset(listed) AS x(n text, u uuid)
               WHERE x.n LIKE 'evoq\_' || cfg.namespace || '\_%')
    SELECT coalesce(array_agg(l.n), '{}') INTO unowned FROM l
    WHERE NOT EXISTS (SELECT 1 FROM evolution_instances i WHERE i.instance_name = l.n AND i.instance_status <> 'deleted'
                      AND i.server = _reconcile_apply.server)
      AND NOT EXISTS (SELECT 1 FROM evolution_instance_creation_queue q
                      WHERE q.user_id = l.u AND q.status IN ('pending', 'processing') AND q.action = 'create'
                        AND (q.server IS NULL OR q.server = _reconcile_apply.server))
      AND NOT EXISTS (SELECT 1 FROM evolution_instance_creation_queue q
                      WHERE q.instance_name = l.n AND q.status IN ('pending', 'processing') AND q.action = 'create'
                        AND (q.server IS NULL OR q.server = _reconcile_apply.server));
    DELETE FROM evoq.reconcile_orphans o
    WHERE o.server = _reconcile_apply.server AND NOT EXISTS (SELECT 1 FROM unnest(unowned) AS u(n) WHERE u.n = o.instance_name);
    INSERT INTO evoq.reconcile_orphans (server, instance_name)
    SELECT _reconcile_apply.server, u FROM unnest(unowned) u
    ON CONFLICT ON CONSTRAINT reconcile_orphans_pkey DO UPDATE SET last_seen_at = clock_timestamp();
    SELECT coalesce(jsonb_agg(d.instance_name), '[]') INTO remove FROM (
        SELECT o.instance_name FROM evoq.reconcile_orphans o
        WHERE o.server = _reconcile_apply.server
          AND o.first_seen_at <= clock_timestamp() - grace_ms * interval '1 millisecond'
        ORDER BY o.first_seen_at, o.instance_name
        -- one budget for the checks and the removals (the reconcile's lease is sized for it)
        LIMIT greatest(0, max_calls - jsonb_array_length(checks))) d;

    RETURN jsonb_build_object(
        'missing', jsonb_array_length(missing_records),
        'missing_held_back', CASE WHEN held_back THEN missing_live ELSE 0 END,
        'checks', checks, 'orphans', cardinality(unowned), 'remove', remove,
        'orphans_waiting', cardinality(unowned) - jsonb_array_length(remove));
END
$$;

-- Ends a reconcile that began at `began` (a later one that took the lease after it ran out is
-- left alone): its summary, the orphans it removed (their tracking goes) and those it could not
-- (tried again next time), and the lease given back. A removed name that a row took meanwhile
-- (a create queued after the comparison, which adopted the instance just before its removal)
-- is lost again at once, so it is created afresh rather than waiting for a poll's 404.
CREATE FUNCTION evoq._reconcile_finish(server text, began timestamptz, summary jsonb, last_error text,
                                       removals jsonb) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$
DECLARE
    retaken jsonb;
BEGIN
    DELETE FROM evoq.reconcile_orphans o USING jsonb_to_recordset(_reconcile_finish.removals) AS x(n text, error text)
    WHERE o.server = _reconcile_finish.server AND o.instance_name = x.n AND x.error IS NULL;
    UPDATE evoq.reconcile_orphans o SET removals = o.removals + 1, last_error = x.error
    FROM jsonb_to_recordset(_reconcile_finish.removals) AS x(n text, error text)
    WHERE o.server = _reconcile_finish.server AND o.instance_name = x.n AND x.error IS NOT NULL;
    SELECT coalesce(jsonb_agg(jsonb_build_object('id', i.id, 'outcome', 'unlisted', 'claimed_status', i.instance_status,
                                                 'claimed_at', i.updated_at)), '[]')
      INTO retaken
      FROM evolution_instances i JOIN jsonb_to_recordset(_reconcile_finish.removals) AS x(n text, error text)
           ON x.n = i.instance_name AND x.error IS NULL
     WHERE i.instance_status IN ('connecting', 'open') AND i.server = _reconcile_finish.server;
    IF jsonb_array_length(retaken) > 0 THEN
        PERFORM evoq._record_refresh_results(retaken);
    END IF;
    UPDATE evoq.reconciles r SET finished_at = clock_timestamp(), lease_until = NULL, summary = _reconcile_finish.summary,
        last_error = coalesce(_reconcile_finish.last_error, r.last_error),
        last_error_at = CASE WHEN _reconcile_finish.last_error IS NOT NULL THEN clock_timestamp() ELSE r.last_error_at END
    WHERE r.server = _reconcile_finish.server AND r.started_at = _reconcile_finish.began;
END
$$;

-- 0.5.0: a delivery of a socket's life (a QR, a connection update) for an expired or deleted
-- instance proves that the server still reconnects it: counted on the row (evoq_status shows
-- such instances, and the refresh logs them out again). Returns whether it counted.
CREATE FUNCTION evoq._count_server_loop(instance text) RETURNS boolean
LANGUAGE sql
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$
    WITH counted AS (
        UPDATE evolution_instances SET server_loop_deliveries = server_loop_deliveries + 1,
                                       server_loop_seen_at = clock_timestamp()
        WHERE instance_name = instance AND instance_status IN ('expired', 'deleted')
        RETURNING 1
    )
    SELECT EXISTS (SELECT 1 FROM counted)
$$;

-- Applies one webhook delivery to its instance row: a single guarded UPDATE (webhook.rs and
-- lifecycle.rs decide what it writes). d: {"instance", "from": [states it may leave], "to",
-- "kind": "qr"|"open"|"close"|"refused"|"removed", "event_at", "qr_code", "qr_text",
-- "pairing_code", "number", "profile_name", "reason"}. The row changes only from a state in
-- "from", and only if no newer delivery of the server was applied already; a row being
-- deprovisioned that the server reports removed is deleted, any other is lost and queued for
-- creation again (as a 404 in the refresh). Returns the row's new status, NULL when nothing
-- changed. 0.4.0: PL/pgSQL, so a session applying delivery after delivery (the worker's
-- listener) plans the statement once, not once per call as a SQL function's body is.
CREATE FUNCTION evoq._apply_delivery(d jsonb) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$
DECLARE
    result text;
BEGIN
    WITH x AS (
        SELECT * FROM jsonb_to_record(d) AS x(
            instance text, "from" text[], "to" text, kind text, event_at timestamptz,
            qr_code text, qr_text text, pairing_code text, number text, profile_name text, reason text,
            server text)
    ), changed AS (
        UPDATE evolution_instances i SET
            instance_status = CASE
                WHEN x.kind = 'removed' AND EXISTS (SELECT 1 FROM evolution_instance_creation_queue q
                                                    WHERE q.user_id = i.user_id AND q.action = 'delete')
                THEN 'deleted' ELSE x."to" END,
            qr_code = CASE WHEN x.kind = 'qr' THEN x.qr_code END,
            qr_text = CASE WHEN x.kind = 'qr' THEN x.qr_text END,
            pairing_code = CASE WHEN x.kind = 'qr' THEN x.pairing_code END,
            last_qr_update = CASE WHEN x.kind = 'qr' AND x.qr_text IS DISTINCT FROM i.qr_text
                                  THEN clock_timestamp() ELSE i.last_qr_update END,
            no_qr_rounds = CASE WHEN x.kind = 'qr' THEN 0 ELSE i.no_qr_rounds END,
            owner_number = CASE WHEN x.kind = 'open' THEN coalesce(x.number, i.owner_number) ELSE i.owner_number END,
            profile_name = CASE WHEN x.kind = 'open' THEN coalesce(x.profile_name, i.profile_name) ELSE i.profile_name END,
            connected_at = CASE WHEN x.kind = 'open' AND i.instance_status <> 'open' THEN clock_timestamp()
                                ELSE i.connected_at END,
            last_state_check_at = CASE WHEN x.kind = 'open' AND i.instance_status <> 'open' THEN clock_timestamp()
                                       ELSE i.last_state_check_at END,
            disconnected_at = CASE WHEN x.kind IN ('close', 'refused', 'removed') THEN clock_timestamp()
                                   WHEN x.kind = 'open' THEN NULL ELSE i.disconnected_at END,
            disconnect_reason = CASE WHEN x.kind IN ('close', 'refused', 'removed') THEN x.reason
                                     WHEN x.kind = 'open' THEN NULL ELSE i.disconnect_reason END,
            last_event_at = coalesce(x.event_at, i.last_event_at),
            -- Removed at the server: a live instance (a user waiting for a QR, or connected) is
            -- created again; an idle one (close, refused, expired) only when the user asks.
            last_error = CASE WHEN x.kind <> 'removed' THEN i.last_error
                              WHEN i.instance_status IN ('connecting', 'open')
                              THEN 'the Evolution API deleted the instance; its creation was queued again'
                              ELSE 'the Evolution API deleted the instance; evoq_reconnect creates it again' END,
            updated_at = clock_timestamp()
        FROM x
        WHERE i.instance_name = x.instance
          -- 0.7.0: only a delivery of the server that holds the instance
          AND (x.server IS NULL OR i.server = x.server)
          AND i.instance_status = ANY (x."from")
          AND (x.event_at IS NULL OR i.last_event_at IS NULL OR i.last_event_at <= x.event_at)
        RETURNING i.user_id, i.instance_status, i.last_error
    ), requeued AS (
        INSERT INTO evoq.requeue_requests (user_id, reason)
        SELECT user_id, 'lost' FROM changed
        WHERE instance_status = 'lost' AND last_error LIKE '%creation was queued again'
    )
    SELECT instance_status INTO result FROM changed;
    RETURN result;
END
$$;

-- Keeps a delivery evoq does not consume for the application, if the instance is one of this
-- deployment's rows, and announces it on evoq_events. Returns the new row's id, NULL if none.
CREATE FUNCTION evoq._relay_event(instance text, event text, payload jsonb) RETURNS bigint
LANGUAGE sql
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$
    WITH kept AS (
        INSERT INTO evolution_instance_events (user_id, instance_name, event, payload)
        SELECT i.user_id, i.instance_name, event, payload FROM evolution_instances i
        WHERE i.instance_name = instance AND i.instance_status <> 'deleted'
        RETURNING id, user_id, instance_name, event
    )
    -- pg_notify is volatile, so the planner keeps it although nothing reads its column.
    SELECT id FROM (SELECT id, pg_notify('evoq_events', json_build_object(
                                   'id', id, 'user_id', user_id, 'instance_name', instance_name,
                                   'event', event)::text)
                    FROM kept) announced
$$;

-- Every change of an instance's status or QR is announced on the channel evoq_instances with
-- {user_id, instance_name, status, qr_updated_at}; never the QR itself: a listener re-reads
-- the row, which row level security lets it see or not.
CREATE FUNCTION evoq._notify_instance_change() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pg_notify('evoq_instances', json_build_object(
        'user_id', NEW.user_id, 'instance_name', NEW.instance_name,
        'status', NEW.instance_status, 'qr_updated_at', NEW.last_qr_update)::text);
    RETURN NULL;
END
$$;
CREATE TRIGGER evoq_notify_insert AFTER INSERT ON evolution_instances
    FOR EACH ROW EXECUTE FUNCTION evoq._notify_instance_change();
CREATE TRIGGER evoq_notify_update AFTER UPDATE ON evolution_instances
    FOR EACH ROW
    WHEN (OLD.instance_status IS DISTINCT FROM NEW.instance_status
          OR OLD.last_qr_update IS DISTINCT FROM NEW.last_qr_update)
    EXECUTE FUNCTION evoq._notify_instance_change();

-- The end of a run: remembered for evoq_status. 0.7.0: and each server's last error for
-- evoq_servers, from the run's summary (a server's own: "server" and "last_error"; several
-- servers' added up: each one's under "servers").
CREATE FUNCTION evoq._record_run(job text, summary jsonb, last_error text) RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO evoq.job_runs AS j (job, started_at, finished_at, summary, last_error, last_error_at)
    VALUES (job, now(), clock_timestamp(), summary, last_error, CASE WHEN last_error IS NOT NULL THEN clock_timestamp() END)
    ON CONFLICT (job) DO UPDATE SET
        started_at = excluded.started_at, finished_at = excluded.finished_at, summary = excluded.summary,
        last_error = coalesce(excluded.last_error, j.last_error),
        last_error_at = coalesce(excluded.last_error_at, j.last_error_at);
    UPDATE evoq.servers v SET last_error = e.error, last_error_at = clock_timestamp()
    FROM (SELECT summary->>'server' AS name, summary->>'last_error' AS error
          UNION ALL
          SELECT x.key, x.value->>'last_error'
          FROM jsonb_each(CASE jsonb_typeof(summary->'servers') WHEN 'object' THEN summary->'servers'
                              ELSE '{}' END) x) e
    WHERE v.name = e.name AND e.error IS NOT NULL;
$$;

