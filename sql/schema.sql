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
    api_key        text NOT NULL,
    webhook_url    text,
    webhook_events text[] NOT NULL,
    api_version    text NOT NULL DEFAULT 'auto' CHECK (api_version IN ('auto', 'v1', 'v2')),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

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
    error_kind       text CHECK (error_kind IN ('transient', 'permanent'))
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
CREATE INDEX evolution_instance_creation_queue_due_idx
    ON evolution_instance_creation_queue (next_attempt_at)
    WHERE status IN ('pending', 'processing');
ALTER TABLE evolution_instance_creation_queue ENABLE ROW LEVEL SECURITY;

CREATE TABLE evolution_instances (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id         uuid NOT NULL UNIQUE,
    instance_name   text NOT NULL UNIQUE,
    instance_id     text,
    instance_status text NOT NULL DEFAULT 'connecting'
                    CHECK (instance_status IN ('connecting', 'open', 'lost')),
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
    updated_at      timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE evolution_instances IS
    'One row per user instance on the Evolution API server. instance_status: connecting (waiting for a QR scan), open (connected), lost (the server no longer knows it; re-queued).';
COMMENT ON COLUMN evolution_instances.qr_code IS 'The QR as a data:image/png;base64 URL, ready for an <img src>.';
COMMENT ON COLUMN evolution_instances.qr_text IS 'The raw QR string (2@...), for clients that render it themselves.';
CREATE INDEX evolution_instances_connecting_idx
    ON evolution_instances (last_refresh_at NULLS FIRST)
    WHERE instance_status = 'connecting';
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

-- pg_dump keeps the rows of these tables (extension tables are otherwise dumped empty).
SELECT pg_catalog.pg_extension_config_dump('evolution_instance_creation_queue', '');
SELECT pg_catalog.pg_extension_config_dump('evolution_instances', '');
SELECT pg_catalog.pg_extension_config_dump('evoq.settings', '');
SELECT pg_catalog.pg_extension_config_dump('evoq.instance_tokens', '');
SELECT pg_catalog.pg_extension_config_dump('evoq.job_runs', '');

-- The signed-in user's id. Supabase's auth.uid() when it exists; otherwise the `sub` claim that
-- PostgREST puts in request.jwt.claims (or the older request.jwt.claim.sub).
CREATE FUNCTION evoq_current_user_id() RETURNS uuid
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog
AS $$
DECLARE
    claims text := nullif(current_setting('request.jwt.claims', true), '');
    sub text;
BEGIN
    IF to_regprocedure('auth.uid()') IS NOT NULL THEN
        EXECUTE 'SELECT auth.uid()' INTO sub;
        RETURN sub::uuid;
    END IF;
    sub := coalesce(claims::jsonb ->> 'sub', nullif(current_setting('request.jwt.claim.sub', true), ''));
    RETURN sub::uuid;
EXCEPTION WHEN invalid_text_representation OR invalid_parameter_value THEN
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION evoq_current_user_id() IS
    'The signed-in user''s id for row level security: auth.uid() on Supabase, else the sub claim of request.jwt.claims.';

-- (Re)creates the row level security policies and grants. Supabase-like databases (roles
-- authenticated and service_role, function auth.uid()) get the original setup's policies by
-- name; plain Postgres gets the same rules keyed on evoq_current_user_id(). Runs at install, and
-- again by hand if the Supabase roles appear later.
CREATE FUNCTION evoq_apply_policies() RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog
AS $$
DECLARE
    ext_schema text := (SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
                        WHERE e.extname = 'evoq');
    supabase boolean := to_regrole('authenticated') IS NOT NULL AND to_regrole('service_role') IS NOT NULL
                        AND to_regprocedure('auth.uid()') IS NOT NULL;
    queue text := format('%I.evolution_instance_creation_queue', ext_schema);
    inst text := format('%I.evolution_instances', ext_schema);
    status_view text := format('%I.evoq_status', ext_schema);
    pol record;
BEGIN
    FOR pol IN SELECT policyname, tablename FROM pg_policies
               WHERE schemaname = ext_schema
                 AND tablename IN ('evolution_instance_creation_queue', 'evolution_instances') LOOP
        EXECUTE format('DROP POLICY %I ON %I.%I', pol.policyname, ext_schema, pol.tablename);
    END LOOP;

    IF supabase THEN
        EXECUTE format('CREATE POLICY "Service role can manage evolution instance queue" ON %s
                        FOR ALL TO service_role USING (true) WITH CHECK (true)', queue);
        EXECUTE format('CREATE POLICY "Users can view their own queue status" ON %s
                        FOR SELECT TO authenticated USING (auth.uid() = user_id)', queue);
        EXECUTE format('CREATE POLICY "Service role can manage evolution instances" ON %s
                        FOR ALL TO service_role USING (true) WITH CHECK (true)', inst);
        EXECUTE format('CREATE POLICY "Users can view their own evolution instance" ON %s
                        FOR SELECT TO authenticated USING (auth.uid() = user_id)', inst);
        EXECUTE format('GRANT SELECT ON %s, %s TO authenticated', queue, inst);
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %s, %s TO service_role', queue, inst);
        EXECUTE format('GRANT SELECT ON %s TO service_role', status_view);
        IF to_regrole('anon') IS NOT NULL THEN
            -- Supabase's default privileges may grant anon everything on new tables: take it back.
            EXECUTE format('REVOKE ALL ON %s, %s, %s FROM anon', queue, inst, status_view);
        END IF;
        EXECUTE format('REVOKE ALL ON %s FROM authenticated', status_view);
        RETURN 'supabase';
    END IF;

    EXECUTE format('CREATE POLICY "Users can view their own queue status" ON %s
                    FOR SELECT USING (user_id = %I.evoq_current_user_id())', queue, ext_schema);
    EXECUTE format('CREATE POLICY "Users can view their own evolution instance" ON %s
                    FOR SELECT USING (user_id = %I.evoq_current_user_id())', inst, ext_schema);
    RETURN 'postgres';
END
$$;
REVOKE ALL ON FUNCTION evoq_apply_policies() FROM PUBLIC;
COMMENT ON FUNCTION evoq_apply_policies() IS
    'Recreates evoq''s row level security policies for this database (Supabase-like or plain Postgres).';

-- ---------------------------------------------------------------------------------------------
-- Internal statements used by the Rust jobs. Each takes and returns jsonb so that one statement
-- handles a whole batch (set-based), and the Rust side stays free of SQL string building.
-- ---------------------------------------------------------------------------------------------

-- Claims up to batch_size due rows. SKIP LOCKED: an overlapping run takes other rows. A claimed
-- row stays locked until the run's transaction ends, so a crash or cancel simply makes it due
-- again; 'processing' is never visible to anyone else.
CREATE FUNCTION evoq._claim_queue(batch_size integer) RETURNS jsonb
LANGUAGE sql
SET search_path = pg_catalog, @extschema@
AS $$
    WITH due AS (
        SELECT id FROM evolution_instance_creation_queue
        WHERE status IN ('pending', 'processing') AND next_attempt_at <= now()
        ORDER BY next_attempt_at, created_at
        LIMIT batch_size
        FOR UPDATE SKIP LOCKED
    ), claimed AS (
        UPDATE evolution_instance_creation_queue q
        SET status = 'processing', attempts = q.attempts + 1, updated_at = clock_timestamp()
        FROM due WHERE q.id = due.id
        RETURNING q.id, q.user_id, q.request_id, q.attempts
    )
    SELECT coalesce(jsonb_agg(jsonb_build_object(
        'id', id, 'user_id', user_id, 'request_id', request_id, 'attempts', attempts)), '[]')
    FROM claimed
$$;

-- Writes the outcome of a batch. Each element of results:
--   {"id", "instance_name", "ok": true, "instance_id", "token", "instance_status",
--    "qr_code", "qr_text", "pairing_code", "qr_count"}
--   {"id", "instance_name", "ok": false, "error", "http_status", "error_kind", "retry_in_ms" | null (give up)}
CREATE FUNCTION evoq._record_queue_results(results jsonb) RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, @extschema@
AS $$
    WITH r AS (
        SELECT * FROM jsonb_to_recordset(results) AS x(
            id uuid, instance_name text, ok boolean, instance_id text, token text, instance_status text,
            qr_code text, qr_text text, pairing_code text, qr_count integer,
            error text, http_status integer, error_kind text, retry_in_ms bigint)
    ), ok AS (
        SELECT r.*, q.user_id FROM r JOIN evolution_instance_creation_queue q ON q.id = r.id WHERE r.ok
    ), instances AS (
        INSERT INTO evolution_instances AS i (user_id, instance_name, instance_id, instance_status,
                                              qr_code, qr_text, pairing_code, qr_count, last_qr_update,
                                              connected_at)
        SELECT user_id, instance_name, instance_id, instance_status, qr_code, qr_text, pairing_code, qr_count,
               CASE WHEN qr_code IS NOT NULL OR qr_text IS NOT NULL THEN clock_timestamp() END,
               CASE WHEN instance_status = 'open' THEN clock_timestamp() END
        FROM ok
        ON CONFLICT (user_id) DO UPDATE SET
            instance_name = excluded.instance_name,
            instance_id = coalesce(excluded.instance_id, i.instance_id),
            instance_status = excluded.instance_status,
            qr_code = coalesce(excluded.qr_code, CASE WHEN excluded.instance_status = 'open' THEN NULL ELSE i.qr_code END),
            qr_text = coalesce(excluded.qr_text, CASE WHEN excluded.instance_status = 'open' THEN NULL ELSE i.qr_text END),
            pairing_code = coalesce(excluded.pairing_code, CASE WHEN excluded.instance_status = 'open' THEN NULL ELSE i.pairing_code END),
            qr_count = coalesce(excluded.qr_count, i.qr_count),
            last_qr_update = coalesce(excluded.last_qr_update, i.last_qr_update),
            connected_at = coalesce(i.connected_at, excluded.connected_at),
            last_error = NULL, last_error_at = NULL,
            updated_at = clock_timestamp()
        RETURNING i.instance_name
    ), tokens AS (
        INSERT INTO evoq.instance_tokens AS t (instance_name, token)
        SELECT ok.instance_name, ok.token FROM ok JOIN instances USING (instance_name)
        WHERE ok.token IS NOT NULL
        ON CONFLICT (instance_name) DO UPDATE SET token = excluded.token, updated_at = clock_timestamp()
    )
    UPDATE evolution_instance_creation_queue q SET
        status = CASE WHEN r.ok THEN 'completed' WHEN r.retry_in_ms IS NULL THEN 'failed' ELSE 'pending' END,
        instance_name = r.instance_name,
        processed_at = CASE WHEN r.ok THEN clock_timestamp() ELSE q.processed_at END,
        error_message = CASE WHEN r.ok THEN NULL ELSE r.error END,
        error_kind = CASE WHEN r.ok THEN NULL ELSE r.error_kind END,
        last_http_status = r.http_status,
        last_error_at = CASE WHEN r.ok THEN q.last_error_at ELSE clock_timestamp() END,
        retry_count = q.retry_count + CASE WHEN r.ok THEN 0 ELSE 1 END,
        next_attempt_at = CASE WHEN r.ok OR r.retry_in_ms IS NULL THEN q.next_attempt_at
                               ELSE clock_timestamp() + r.retry_in_ms * interval '1 millisecond' END,
        updated_at = clock_timestamp()
    FROM r WHERE q.id = r.id
$$;

-- Claims up to batch_size connecting instances not refreshed within min_interval_ms.
CREATE FUNCTION evoq._claim_refresh(batch_size integer, min_interval_ms bigint) RETURNS jsonb
LANGUAGE sql
SET search_path = pg_catalog, @extschema@
AS $$
    WITH due AS (
        SELECT id FROM evolution_instances
        WHERE instance_status = 'connecting'
          AND (last_refresh_at IS NULL OR last_refresh_at <= now() - min_interval_ms * interval '1 millisecond')
        ORDER BY last_refresh_at NULLS FIRST
        LIMIT batch_size
        FOR UPDATE SKIP LOCKED
    ), claimed AS (
        UPDATE evolution_instances i SET last_refresh_at = clock_timestamp()
        FROM due WHERE i.id = due.id
        RETURNING i.id, i.user_id, i.instance_name, i.qr_text
    )
    SELECT coalesce(jsonb_agg(jsonb_build_object(
        'id', id, 'user_id', user_id, 'instance_name', instance_name, 'qr_text', qr_text)), '[]')
    FROM claimed
$$;

-- Writes the outcome of a refresh batch. Each element: {"id", "outcome": "qr"|"open"|"no_qr"|"lost"|"error",
-- "qr_code", "qr_text", "pairing_code", "qr_count", "error"}.
CREATE FUNCTION evoq._record_refresh_results(results jsonb) RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, @extschema@
AS $$
    WITH r AS (
        SELECT * FROM jsonb_to_recordset(results) AS x(
            id uuid, outcome text, qr_code text, qr_text text, pairing_code text, qr_count integer, error text)
    ), updated AS (
        UPDATE evolution_instances i SET
            instance_status = CASE r.outcome WHEN 'open' THEN 'open' WHEN 'lost' THEN 'lost' ELSE i.instance_status END,
            qr_code = CASE WHEN r.outcome IN ('open', 'lost') THEN NULL WHEN r.outcome = 'qr' THEN r.qr_code ELSE i.qr_code END,
            qr_text = CASE WHEN r.outcome IN ('open', 'lost') THEN NULL WHEN r.outcome = 'qr' THEN r.qr_text ELSE i.qr_text END,
            pairing_code = CASE WHEN r.outcome IN ('open', 'lost') THEN NULL WHEN r.outcome = 'qr' THEN r.pairing_code ELSE i.pairing_code END,
            qr_count = CASE WHEN r.outcome = 'qr' THEN coalesce(r.qr_count, i.qr_count) ELSE i.qr_count END,
            -- Only a QR that differs from the stored one counts as an update.
            last_qr_update = CASE WHEN r.outcome = 'qr' AND r.qr_text IS DISTINCT FROM i.qr_text
                                  THEN clock_timestamp() ELSE i.last_qr_update END,
            connected_at = CASE WHEN r.outcome = 'open' THEN clock_timestamp() ELSE i.connected_at END,
            last_error = CASE WHEN r.outcome = 'error' THEN r.error
                              WHEN r.outcome = 'lost' THEN 'the Evolution API no longer knows this instance (404); its creation was queued again'
                              ELSE NULL END,
            last_error_at = CASE WHEN r.outcome IN ('error', 'lost') THEN clock_timestamp() ELSE i.last_error_at END,
            updated_at = clock_timestamp()
        FROM r WHERE i.id = r.id
        RETURNING i.user_id, i.instance_name, r.outcome
    )
    -- A lost instance is created again: its queue row goes back to pending with a new request.
    INSERT INTO evolution_instance_creation_queue AS q (user_id, instance_name, status)
    SELECT user_id, instance_name, 'pending' FROM updated WHERE outcome = 'lost'
    ON CONFLICT (user_id) DO UPDATE SET
        status = 'pending', request_id = gen_random_uuid(), retry_count = q.retry_count + 1, attempts = 0,
        next_attempt_at = now(), processed_at = NULL,
        error_message = 'the Evolution API no longer knows this instance (404); creating it again',
        error_kind = NULL, last_http_status = 404, updated_at = clock_timestamp()
$$;

-- The end of a run: remembered for evoq_status.
CREATE FUNCTION evoq._record_run(job text, summary jsonb, last_error text) RETURNS void
LANGUAGE sql
SET search_path = pg_catalog
AS $$
    INSERT INTO evoq.job_runs AS j (job, started_at, finished_at, summary, last_error, last_error_at)
    VALUES (job, now(), clock_timestamp(), summary, last_error, CASE WHEN last_error IS NOT NULL THEN clock_timestamp() END)
    ON CONFLICT (job) DO UPDATE SET
        started_at = excluded.started_at, finished_at = excluded.finished_at, summary = excluded.summary,
        last_error = coalesce(excluded.last_error, j.last_error),
        last_error_at = coalesce(excluded.last_error_at, j.last_error_at)
$$;

-- One row for operators. Not security_invoker on purpose: it reads evoq's private tables, so it
-- is revoked from PUBLIC and granted explicitly (to service_role on Supabase-like databases).
CREATE VIEW evoq_status AS
SELECT
    count(*) FILTER (WHERE q.status = 'pending')                               AS pending,
    count(*) FILTER (WHERE q.status = 'processing')                            AS processing,
    count(*) FILTER (WHERE q.status = 'completed')                             AS completed,
    count(*) FILTER (WHERE q.status = 'failed')                                AS failed,
    count(*) FILTER (WHERE q.status = 'failed' AND q.error_kind = 'permanent') AS failed_permanent,
    count(*) FILTER (WHERE q.status = 'pending' AND q.error_kind = 'transient') AS retrying,
    now() - min(q.created_at) FILTER (WHERE q.status IN ('pending', 'processing')) AS oldest_pending_age,
    min(q.next_attempt_at) FILTER (WHERE q.status IN ('pending', 'processing')) AS next_attempt_at,
    (SELECT count(*) FROM evolution_instances WHERE instance_status = 'connecting') AS instances_connecting,
    (SELECT count(*) FROM evolution_instances WHERE instance_status = 'open')       AS instances_open,
    (SELECT count(*) FROM evolution_instances WHERE instance_status = 'lost')       AS instances_lost,
    (SELECT finished_at FROM evoq.job_runs WHERE job = 'process_queue') AS last_process_run_at,
    (SELECT summary FROM evoq.job_runs WHERE job = 'process_queue')     AS last_process_summary,
    (SELECT finished_at FROM evoq.job_runs WHERE job = 'refresh_qr')    AS last_refresh_run_at,
    (SELECT summary FROM evoq.job_runs WHERE job = 'refresh_qr')        AS last_refresh_summary,
    (SELECT last_error FROM evoq.job_runs WHERE last_error_at IS NOT NULL ORDER BY last_error_at DESC LIMIT 1) AS last_error,
    (SELECT max(last_error_at) FROM evoq.job_runs) AS last_error_at,
    EXISTS (SELECT 1 FROM evoq.settings) AS configured
FROM evolution_instance_creation_queue q;
REVOKE ALL ON evoq_status FROM PUBLIC;
COMMENT ON VIEW evoq_status IS 'Queue counts per state, oldest pending age, last runs and last error. Grant it to your operators.';
