-- evoq 0.4.0 -> 0.5.0: evoq under real conditions and on Supabase as it really is.
-- * Every function pins its search_path with pg_temp last (PostgreSQL's rule for SECURITY
--   DEFINER functions: a temporary table must not shadow what a function reads).
-- * evoq_schedule/evoq_unschedule run with the caller's rights; the jobs' commands name evoq's
--   schema (jobs scheduled before are rewritten here; they keep the role they run as).
-- * evoq_webhook(jsonb) takes one unnamed parameter: the shape PostgREST hands a raw body to.
-- * evoq_apply_policies: Supabase-like by its roles; postgres is Supabase's operator; trigger
--   functions executable by PUBLIC (restores); a hint for callers who are not the owner.
-- * evoq.settings.api_key may be NULL (evoq.api_key_file holds the key).
-- * A new instance whose QR comes by webhook, or whose create brought one, is polled on the
--   cadence; _next_due_ms copes with rows never asked. The record functions are PL/pgSQL.
-- * Link with phone number: evoq.phone_links, evoq_link_with_phone, creates and connects that
--   carry the number.
-- No row changes; what a fresh 0.5.0 install has, this makes.
\echo Use "ALTER EXTENSION evoq UPDATE TO '0.5.0'" to load this file. \quit

-- pg_temp last in every pinned search_path, and pinned where pgrx had none.
DO $$
DECLARE
    f record;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure AS fn, substr(c, length('search_path=') + 1) AS path
        FROM pg_catalog.pg_proc p
        JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND d.objid = p.oid
             AND d.deptype = 'e' AND d.refobjid = (SELECT oid FROM pg_catalog.pg_extension WHERE extname = 'evoq'),
             unnest(p.proconfig) c
        WHERE c LIKE 'search_path=%' AND c NOT LIKE '%pg_temp'
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = %s, pg_temp', f.fn, f.path);
    END LOOP;
END
$$;
ALTER FUNCTION evoq.attach_trigger(oid, text) SET search_path = pg_catalog, @extschema@, pg_temp;
ALTER FUNCTION evoq.detach_trigger(oid) SET search_path = pg_catalog, @extschema@, pg_temp;
ALTER FUNCTION evoq._worker_state() SET search_path = pg_catalog, @extschema@, pg_temp;

-- The jobs run as whoever schedules them.
ALTER FUNCTION evoq_schedule(text, text) SECURITY INVOKER;
ALTER FUNCTION evoq_unschedule() SECURITY INVOKER;
DO $$
BEGIN
    IF pg_catalog.to_regclass('cron.job') IS NOT NULL THEN
        UPDATE cron.job SET command = 'SELECT @extschema@.evoq_process_queue()'
        WHERE jobname = 'process-evolution-queue' AND command = 'SELECT evoq_process_queue()';
        UPDATE cron.job SET command = 'SELECT @extschema@.evoq_refresh_qr()'
        WHERE jobname = 'refresh-qr-codes' AND command = 'SELECT evoq_refresh_qr()';
    END IF;
END
$$;

-- The webhook endpoint: one unnamed jsonb parameter (grants are made again below).
DROP FUNCTION evoq_webhook(jsonb);
CREATE  FUNCTION evoq."_webhook"(
	"payload" jsonb /* pgrx :: JsonB */
) RETURNS jsonb /* pgrx :: JsonB */
STRICT SECURITY DEFINER
SET search_path TO pg_catalog, @extschema@, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'evoq_webhook_wrapper';

-- The webhook endpoint: ONE UNNAMED jsonb parameter, the shape PostgREST hands a raw JSON body
-- to (every other shape makes each key of the body a named argument, and a delivery's keys name
-- no parameter: 404 PGRST202). SQL callers call it positionally, as always.
CREATE FUNCTION evoq_webhook(jsonb) RETURNS jsonb
LANGUAGE sql STRICT SECURITY DEFINER
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$ SELECT evoq._webhook($1) $$;
COMMENT ON FUNCTION evoq_webhook(jsonb) IS
    'Applies one Evolution API webhook delivery (checks the webhook secret first). Point the instances'' webhook at it, e.g. through PostgREST: /rest/v1/rpc/evoq_webhook.';


ALTER TABLE evoq.settings ALTER COLUMN api_key DROP NOT NULL;

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


-- Instances the server still reconnects after their logout or delete.
ALTER TABLE evolution_instances
    ADD COLUMN server_loop_deliveries integer NOT NULL DEFAULT 0,
    ADD COLUMN server_loop_seen_at    timestamptz,
    ADD COLUMN server_loop_logouts    integer NOT NULL DEFAULT 0,
    ADD COLUMN server_loop_logout_at  timestamptz,
    ADD COLUMN pairing_requested_at   timestamptz;
COMMENT ON COLUMN evolution_instances.server_loop_deliveries IS
    'Deliveries received after the instance was expired or deleted: the server is still reconnecting it (a restart of the Evolution server ends such loops).';

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

-- The claim's index, in the claim's order.
DROP INDEX evolution_instance_creation_queue_due_idx;
CREATE INDEX evolution_instance_creation_queue_due_idx
    ON evolution_instance_creation_queue (next_attempt_at, created_at)
    WHERE status IN ('pending', 'processing');

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
CREATE OR REPLACE FUNCTION evoq._claim_queue(batch_size integer, lease_ms bigint) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$
DECLARE
    result jsonb;
BEGIN
    WITH due AS (
        SELECT id, status, updated_at, next_attempt_at FROM evolution_instance_creation_queue
        WHERE status IN ('pending', 'processing') AND next_attempt_at <= now()
        ORDER BY next_attempt_at, created_at
        LIMIT batch_size
        FOR UPDATE SKIP LOCKED
    ), claimed AS (
        UPDATE evolution_instance_creation_queue q
        SET status = 'processing', attempts = q.attempts + 1, updated_at = clock_timestamp(),
            next_attempt_at = clock_timestamp() + lease_ms * interval '1 millisecond'
        FROM due WHERE q.id = due.id
        RETURNING q.id, q.user_id, q.request_id, q.attempts, q.instance_name, q.action, q.updated_at,
                  due.status AS prev_status, due.updated_at AS prev_updated_at,
                  due.next_attempt_at AS prev_next_attempt_at
    )
    SELECT coalesce(jsonb_agg(jsonb_build_object(
        'id', c.id, 'user_id', c.user_id, 'request_id', c.request_id, 'attempts', c.attempts,
        'instance_name', c.instance_name, 'action', c.action,
        'instance_row_name', (SELECT i.instance_name FROM evolution_instances i WHERE i.user_id = c.user_id),
        -- 0.5.0: a create carries the number the user gave for a pairing code
        'number', (SELECT p.phone FROM evoq.phone_links p WHERE p.user_id = c.user_id AND c.action = 'create'),
        'prev_status', c.prev_status, 'prev_updated_at', c.prev_updated_at,
        'prev_next_attempt_at', c.prev_next_attempt_at, 'claimed_at', c.updated_at)), '[]')
    INTO result
    FROM claimed c;
    RETURN result;
END
$$;

-- Writes the outcome of a batch. Each element of results:
--   {"id", "instance_name", "ok": true, "action": "create", "instance_id", "token", "instance_status",
--    "qr_code", "qr_text", "pairing_code", "qr_count", "webhook_version"}
--   (webhook_version: the evoq.settings.webhook_changed_at whose webhook the create carried)
--   {"id", "instance_name", "ok": true, "action": "delete"}
--   {"id", "instance_name", "ok": false, "error", "http_status", "error_kind", "retry_in_ms" | null (give up)}
-- each with "claimed_at" (0.4.0), the claim's stamp: a row no longer held by that claim is left alone.
CREATE OR REPLACE FUNCTION evoq._record_queue_results(results jsonb) RETURNS void
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
        SELECT r.*, q.user_id FROM r JOIN evolution_instance_creation_queue q ON q.id = r.id
        WHERE r.ok AND coalesce(r.action, 'create') = 'create'
    ), instances AS (
        INSERT INTO evolution_instances AS i (user_id, instance_name, instance_id, instance_status,
                                              qr_code, qr_text, pairing_code, qr_count, last_qr_update,
                                              connected_at, connecting_since, webhook_set_at,
                                              last_state_check_at, last_refresh_at)
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
                    THEN clock_timestamp() END
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
            disconnect_reason = 'deprovisioned: deleted at the Evolution API',
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
        status = CASE WHEN r.ok THEN 'completed' WHEN r.retry_in_ms IS NULL THEN 'failed' ELSE 'pending' END,
        instance_name = coalesce(r.instance_name, q.instance_name),
        processed_at = CASE WHEN r.ok THEN clock_timestamp() ELSE q.processed_at END,
        error_message = CASE WHEN r.ok THEN NULL ELSE evoq._redact(r.error, r.instance_name) END,
        error_kind = CASE WHEN r.ok THEN NULL ELSE r.error_kind END,
        last_http_status = r.http_status,
        last_error_at = CASE WHEN r.ok THEN q.last_error_at ELSE clock_timestamp() END,
        retry_count = q.retry_count + CASE WHEN r.ok THEN 0 ELSE 1 END,
        next_attempt_at = CASE WHEN r.ok OR r.retry_in_ms IS NULL THEN q.next_attempt_at
                               ELSE clock_timestamp() + r.retry_in_ms * interval '1 millisecond' END,
        updated_at = clock_timestamp()
    FROM r WHERE q.id = r.id;
END
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
-- polling stays a fallback.
CREATE OR REPLACE FUNCTION evoq._claim_refresh(batch_size integer, min_interval_ms bigint, window_ms bigint,
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
BEGIN
    SELECT namespace, owns_legacy_names, webhook_url, webhook_changed_at INTO s FROM evoq.settings;

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
          AND evoq._is_ours(instance_name, s.namespace, s.owns_legacy_names)
          -- a user being deprovisioned: only the deletion touches the instance
          AND NOT EXISTS (SELECT 1 FROM evolution_instance_creation_queue q
                          WHERE q.user_id = evolution_instances.user_id AND q.action = 'delete')
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
    IF repoint AND s.webhook_url IS NOT NULL AND s.webhook_changed_at IS NOT NULL THEN
        WITH due AS (
            SELECT id FROM evolution_instances
            WHERE instance_status IN ('connecting', 'open', 'close', 'refused', 'expired')
              AND (webhook_set_at IS NULL OR webhook_set_at < s.webhook_changed_at)
              AND evoq._is_ours(instance_name, s.namespace, s.owns_legacy_names)
              AND NOT EXISTS (SELECT 1 FROM evolution_instance_creation_queue q
                              WHERE q.user_id = evolution_instances.user_id AND q.action = 'delete')
              AND id NOT IN (SELECT (c->>'id')::uuid FROM jsonb_array_elements(claimed) c)
              AND id <> ALL (busy)
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
          AND NOT EXISTS (SELECT 1 FROM evolution_instance_creation_queue q
                          WHERE q.user_id = evolution_instances.user_id AND q.action = 'delete')
          AND id NOT IN (SELECT (c->>'id')::uuid FROM jsonb_array_elements(claimed) c)
          AND id <> ALL (busy)
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
CREATE OR REPLACE FUNCTION evoq._record_refresh_results(results jsonb) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$
-- 0.5.0: PL/pgSQL, so the statement is planned once per session: as an SQL function it was
-- planned at every call, about 2 ms of each group's record in the worker (measured).
BEGIN
    WITH r AS (
        SELECT * FROM jsonb_to_recordset(results) AS x(
            id uuid, outcome text, qr_code text, qr_text text, pairing_code text, qr_count integer, error text,
            webhook_version timestamptz, claimed_status text, claimed_at timestamptz, paired boolean,
            number text)
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

-- 0.4.0: how long, in ms, until the next row is due for either job (0: one is due now; at most
-- max_ms). The background worker sleeps that long when nothing wakes it earlier. The same
-- conditions as the claims (evoq._claim_queue, evoq._claim_refresh with qr_fresh_ms and repoint),
-- so a row no claim would take never keeps the worker awake.
CREATE OR REPLACE FUNCTION evoq._next_due_ms(min_interval_ms bigint, window_ms bigint, check_interval_ms bigint,
                                  qr_fresh_ms bigint, repoint boolean, max_ms bigint) RETURNS double precision
LANGUAGE sql STABLE
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$
    WITH s AS (SELECT namespace, owns_legacy_names, webhook_url, webhook_changed_at FROM evoq.settings),
    mine AS (
        SELECT i.* FROM evolution_instances i, s
        WHERE evoq._is_ours(i.instance_name, s.namespace, s.owns_legacy_names)
          AND NOT EXISTS (SELECT 1 FROM evolution_instance_creation_queue q
                          WHERE q.user_id = i.user_id AND q.action = 'delete')
    ), due AS (
        SELECT min(next_attempt_at) AS at FROM evolution_instance_creation_queue
        WHERE status IN ('pending', 'processing')
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
          AND (mine.webhook_set_at IS NULL OR mine.webhook_set_at < s.webhook_changed_at)
    )
    -- 0.5.0: a row never asked or checked is due since '-infinity', and PostgreSQL cannot
    -- subtract an infinite timestamp: clamp it first (anything in the past is due now).
    SELECT greatest(0, least(max_ms::double precision,
                             CASE WHEN min(at) <= clock_timestamp() THEN 0
                                  ELSE extract(epoch FROM (min(at) - clock_timestamp())) * 1000 END))
    FROM due
$$;

-- evoq_status: instances the server still reconnects, at the end.
CREATE OR REPLACE VIEW evoq_status AS
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
    EXISTS (SELECT 1 FROM evoq.settings) AS configured,
    -- 0.2.0
    (SELECT namespace FROM evoq.settings) AS namespace,
    (SELECT coalesce(nullif(api_version, 'auto'), detected_version) FROM evoq.settings) AS api_version,
    CASE WHEN EXISTS (SELECT 1 FROM evoq.circuit) THEN 'open' ELSE 'closed' END AS circuit,
    (SELECT opened_at FROM evoq.circuit)     AS circuit_opened_at,
    (SELECT cause FROM evoq.circuit)         AS circuit_cause,
    (SELECT next_probe_at FROM evoq.circuit) AS circuit_next_probe_at,
    (SELECT count(*) FROM evoq.skipped_profiles) AS profiles_skipped,
    (SELECT format('%s at %s: %s', table_name, skipped_at, reason) FROM evoq.skipped_profiles
     ORDER BY id DESC LIMIT 1) AS last_profile_skip,
    (SELECT count(*) FROM evoq.requeue_requests) AS requeue_requests_waiting,
    -- 0.3.0
    (SELECT count(*) FROM evolution_instances WHERE instance_status = 'close')   AS instances_close,
    (SELECT count(*) FROM evolution_instances WHERE instance_status = 'refused') AS instances_refused,
    (SELECT count(*) FROM evolution_instances WHERE instance_status = 'expired') AS instances_expired,
    (SELECT count(*) FROM evolution_instances WHERE instance_status = 'deleted') AS instances_deleted,
    (SELECT count(*) FROM evolution_instances WHERE instance_status = 'connecting' AND no_qr_rounds >= 3)
        AS instances_without_qr,
    CASE WHEN EXISTS (SELECT 1 FROM evolution_instances WHERE instance_status = 'connecting' AND no_qr_rounds >= 3)
         THEN 'the Evolution API answers {"count":0} (no QR) for these instances, round after round: usually the '
              'server''s WhatsApp Web version (CONFIG_SESSION_PHONE_VERSION) or its network to WhatsApp; see '
              'Evolution API issues #1541 and #2385' END AS instances_without_qr_hint,
    (SELECT count(*) FILTER (WHERE q.action = 'delete' AND q.status IN ('pending', 'processing'))) AS deletions_pending,
    (SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM evoq.webhooks_applied)  AS webhooks_applied,
    (SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM evoq.webhooks_ignored)  AS webhooks_ignored,
    (SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM evoq.webhooks_rejected) AS webhooks_rejected,
    (SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM evoq.webhooks_relayed)  AS webhooks_relayed,
    (SELECT count(*) FROM evolution_instance_events) AS app_events_waiting,
    (SELECT count(*) FROM evolution_instances i, evoq.settings s
     WHERE s.webhook_url IS NOT NULL AND s.webhook_changed_at IS NOT NULL
       AND i.instance_status IN ('connecting', 'open', 'close', 'refused', 'expired')
       AND (i.webhook_set_at IS NULL OR i.webhook_set_at < s.webhook_changed_at)
       AND evoq._is_ours(i.instance_name, s.namespace, s.owns_legacy_names)) AS webhooks_to_repoint,
    -- 0.4.0: the background worker, from shared memory (all NULL but worker_loaded when evoq is
    -- not in shared_preload_libraries, or the worker is not running)
    (SELECT w.loaded FROM evoq._worker_state() w)       AS worker_loaded,
    (SELECT w.pid FROM evoq._worker_state() w)          AS worker_pid,
    (SELECT w.started_at FROM evoq._worker_state() w)   AS worker_started_at,
    (SELECT w.last_loop_at FROM evoq._worker_state() w) AS worker_last_loop_at,
    (SELECT w.in_flight FROM evoq._worker_state() w)    AS worker_in_flight,
    (SELECT w.listener FROM evoq._worker_state() w)     AS worker_listener,
    (SELECT w.last_error FROM evoq._worker_state() w)   AS worker_last_error,
    -- 0.5.0: expired or deleted instances whose deliveries still come (the server reconnects them)
    (SELECT count(*) FROM evolution_instances
     WHERE instance_status IN ('expired', 'deleted') AND server_loop_seen_at > now() - interval '1 hour')
        AS instances_still_looping,
    CASE WHEN EXISTS (SELECT 1 FROM evolution_instances
                      WHERE instance_status IN ('expired', 'deleted') AND server_loop_seen_at > now() - interval '1 hour')
         THEN 'the Evolution server is still reconnecting these expired or deleted instances (their deliveries keep '
              'coming, each reconnect a new socket): evoq logs them out again, up to 5 times; a restart of the '
              'Evolution server ends such loops' END AS instances_still_looping_hint
FROM evolution_instance_creation_queue q;


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
CREATE OR REPLACE FUNCTION evoq_apply_policies() RETURNS text
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
        EXECUTE format('GRANT SELECT ON %s TO service_role', status_view);
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
            EXECUTE format('GRANT SELECT ON %s TO %I', status_view, operator);
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

-- Link with phone number (pgrx's definitions, as a fresh install makes them).
CREATE  FUNCTION "evoq_link_with_phone"(
	"user_id" uuid, /* pgrx :: Uuid */
	"phone" TEXT /* & str */
) RETURNS TEXT /* String */
STRICT SECURITY DEFINER 
SET search_path TO pg_catalog, @extschema@, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'evoq_link_with_phone_for_wrapper';
CREATE  FUNCTION "evoq_link_with_phone"(
	"phone" TEXT /* & str */
) RETURNS TEXT /* String */
STRICT SECURITY DEFINER 
SET search_path TO pg_catalog, @extschema@, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'evoq_link_with_phone_self_wrapper';
COMMENT ON FUNCTION evoq_link_with_phone(text) IS
    'Link with phone number for the signed-in user: asks for a pairing code (the user types it into WhatsApp) instead of a QR. The number is kept only until the Evolution API has it.';
COMMENT ON FUNCTION evoq_link_with_phone(uuid, text) IS
    'Link with phone number for a user (the operator''s form; a signed-in user may call it for their own id).';

-- evoq_attach gains phone_column: its signature changes, so it is made again. A GRANT made on
-- evoq_attach(regclass, name) is to be made again on evoq_attach(regclass, name, name).
CREATE  FUNCTION evoq."attach_trigger_with_phone"(
	"table" oid, /* pg_sys :: Oid */
	"user_id_column" TEXT, /* & str */
	"phone_column" TEXT /* Option < & str > */
) RETURNS TEXT /* String */
SET search_path TO pg_catalog, @extschema@, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'attach_trigger_with_phone_wrapper';
DROP FUNCTION evoq_attach(regclass, name);
-- 0.5.0: phone_column, the profiles table's column with the user's WhatsApp number: the create
-- carries it, so the first pairing code comes with the instance.
CREATE FUNCTION evoq_attach(tbl regclass, user_id_column name DEFAULT 'id', phone_column name DEFAULT NULL) RETURNS text
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$ SELECT evoq.attach_trigger_with_phone(tbl::oid, user_id_column::text, phone_column::text) $$;
COMMENT ON FUNCTION evoq_attach(regclass, name, name) IS
    'Creates the triggers on_profile_created_create_evolution_instance (AFTER INSERT: queue the user, with the number of phone_column if given) and on_profile_deleted_delete_evolution_instance (AFTER DELETE: deprovision) on the profiles table.';

SELECT evoq_apply_policies();
