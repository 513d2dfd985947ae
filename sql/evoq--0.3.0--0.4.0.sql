-- evoq 0.3.0 -> 0.4.0: the background worker. A claimed queue row carries a lease (its
-- next_attempt_at while processing), results are written only to rows their claim still holds,
-- the refresh claim skips what the caller has in flight and (for the worker) instances whose
-- QR is fresh, the worker's next due time, its state in evoq_status (and the right to read it
-- for service_role). No table changes: every row is kept as it is; what a fresh 0.4.0 install
-- has, this makes.
\echo Use "ALTER EXTENSION evoq UPDATE TO '0.4.0'" to load this file. \quit

DROP FUNCTION evoq._claim_queue(integer);

-- Claims up to batch_size due rows. SKIP LOCKED: an overlapping run takes other rows. 0.4.0: a
-- claimed row carries a lease: its next_attempt_at moves lease_ms ahead, so it is due for nobody
-- else (this run's later claims included) until its result is written or the lease runs out. A
-- SQL function's run holds its rows locked until it ends, so a crash or cancel there simply
-- makes them due again; the background worker commits its claims, and a worker that died
-- leaves rows that come due when their lease runs out (adoption on 403 keeps the retry free of
-- duplicates). With the row's action, the name of the user's instance row (what a delete
-- removes), and claimed_at: the results are written only to a row still held by this claim.
CREATE FUNCTION evoq._claim_queue(batch_size integer, lease_ms bigint) RETURNS jsonb
LANGUAGE sql
SET search_path = pg_catalog, @extschema@
AS $$
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
        'prev_status', c.prev_status, 'prev_updated_at', c.prev_updated_at,
        'prev_next_attempt_at', c.prev_next_attempt_at, 'claimed_at', c.updated_at)), '[]')
    FROM claimed c
$$;

-- Puts claimed rows back exactly as they were (the circuit breaker: a batch that failed because
-- of the server or the configuration is not the rows' fault and costs them nothing).
CREATE OR REPLACE FUNCTION evoq._release_queue(claims jsonb) RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, @extschema@
AS $$
    UPDATE evolution_instance_creation_queue q
    SET status = c.prev_status, attempts = greatest(q.attempts - 1, 0), updated_at = c.prev_updated_at,
        next_attempt_at = coalesce(c.prev_next_attempt_at, q.next_attempt_at)
    FROM jsonb_to_recordset(claims) AS c(id uuid, prev_status text, prev_updated_at timestamptz,
                                         prev_next_attempt_at timestamptz, claimed_at timestamptz)
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
CREATE OR REPLACE FUNCTION evoq._apply_requeue_requests(only_user uuid DEFAULT NULL) RETURNS integer
LANGUAGE sql
SET search_path = pg_catalog, @extschema@
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
            error_message = CASE d.reason WHEN 'lost'
                THEN 'the Evolution API no longer knows this instance (404); creating it again' END,
            last_http_status = CASE d.reason WHEN 'lost' THEN 404 END,
            updated_at = clock_timestamp()
        FROM decided d
        WHERE q.id = d.id AND NOT d.moot
        RETURNING q.user_id
    ), added AS (
        -- A lost or deprovisioned instance whose queue row is gone (deleted by hand) is queued
        -- afresh. Not for a re-inserted profile: its own insert queued it.
        INSERT INTO evolution_instance_creation_queue (user_id, instance_name, action)
        SELECT p.user_id, i.instance_name, CASE p.reason WHEN 'deprovision' THEN 'delete' ELSE 'create' END
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

-- Writes the outcome of a batch. Each element of results:
--   {"id", "instance_name", "ok": true, "action": "create", "instance_id", "token", "instance_status",
--    "qr_code", "qr_text", "pairing_code", "qr_count", "webhook_version"}
--   (webhook_version: the evoq.settings.webhook_changed_at whose webhook the create carried)
--   {"id", "instance_name", "ok": true, "action": "delete"}
--   {"id", "instance_name", "ok": false, "error", "http_status", "error_kind", "retry_in_ms" | null (give up)}
-- each with "claimed_at" (0.4.0), the claim's stamp: a row no longer held by that claim is left alone.
CREATE OR REPLACE FUNCTION evoq._record_queue_results(results jsonb) RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, @extschema@
AS $$
    WITH given AS (
        SELECT * FROM jsonb_to_recordset(results) AS x(
            id uuid, instance_name text, ok boolean, action text, instance_id text, token text, instance_status text,
            qr_code text, qr_text text, pairing_code text, qr_count integer, webhook_version timestamptz,
            error text, http_status integer, error_kind text, retry_in_ms bigint, claimed_at timestamptz)
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
                                              last_state_check_at)
        SELECT user_id, instance_name, instance_id, instance_status, qr_code, qr_text, pairing_code, qr_count,
               CASE WHEN qr_code IS NOT NULL OR qr_text IS NOT NULL THEN clock_timestamp() END,
               CASE WHEN instance_status = 'open' THEN clock_timestamp() END,
               clock_timestamp(),
               webhook_version,
               -- an open instance is checked one evoq.state_check_interval_ms from now
               CASE WHEN instance_status = 'open' THEN clock_timestamp() END
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
    FROM r WHERE q.id = r.id
$$;

DROP FUNCTION evoq._claim_refresh(integer, bigint, bigint, bigint, boolean);

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
CREATE FUNCTION evoq._claim_refresh(batch_size integer, min_interval_ms bigint, window_ms bigint,
                                    check_interval_ms bigint, repoint boolean, busy uuid[],
                                    qr_fresh_ms bigint) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, @extschema@
AS $$
DECLARE
    s record;
    claimed jsonb := '[]';
    part jsonb;
    paced timestamptz := now() - min_interval_ms * interval '1 millisecond';
BEGIN
    SELECT namespace, owns_legacy_names, webhook_url, webhook_changed_at INTO s FROM evoq.settings;

    -- Connecting instances not asked within min_interval_ms: past their window first (expire),
    -- then the rest (connect). One statement, so a row is claimed for one of the two.
    WITH due AS (
        SELECT id, coalesce(connecting_since, created_at) <= now() - window_ms * interval '1 millisecond' AS past
        FROM evolution_instances
        WHERE instance_status = 'connecting'
          AND (last_refresh_at IS NULL OR last_refresh_at <= paced)
          AND (qr_fresh_ms <= 0 OR last_qr_update IS NULL
               OR last_qr_update <= now() - qr_fresh_ms * interval '1 millisecond'
               OR coalesce(connecting_since, created_at) <= now() - window_ms * interval '1 millisecond')
          AND id <> ALL (busy)
          AND evoq._is_ours(instance_name, s.namespace, s.owns_legacy_names)
          -- a user being deprovisioned: only the deletion touches the instance
          AND NOT EXISTS (SELECT 1 FROM evolution_instance_creation_queue q
                          WHERE q.user_id = evolution_instances.user_id AND q.action = 'delete')
        ORDER BY 2 DESC, last_refresh_at NULLS FIRST
        LIMIT batch_size
        FOR UPDATE SKIP LOCKED
    ), upd AS (
        UPDATE evolution_instances i SET last_refresh_at = clock_timestamp()
        FROM due WHERE i.id = due.id
        RETURNING i.id, i.instance_name, i.qr_text, due.past, i.updated_at
    )
    SELECT coalesce(jsonb_agg(jsonb_build_object('id', id, 'instance_name', instance_name, 'qr_text', qr_text,
                                                 'status', 'connecting', 'claimed_at', updated_at,
                                                 'task', CASE WHEN past THEN 'expire' ELSE 'connect' END)), '[]')
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

-- 0.4.0: how long, in ms, until the next row is due for either job (0: one is due now; at most
-- max_ms). The background worker sleeps that long when nothing wakes it earlier. The same
-- conditions as the claims (evoq._claim_queue, evoq._claim_refresh with qr_fresh_ms and repoint),
-- so a row no claim would take never keeps the worker awake.
CREATE FUNCTION evoq._next_due_ms(min_interval_ms bigint, window_ms bigint, check_interval_ms bigint,
                                  qr_fresh_ms bigint, repoint boolean, max_ms bigint) RETURNS double precision
LANGUAGE sql STABLE
SET search_path = pg_catalog, @extschema@
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
        SELECT now() FROM mine, s
        WHERE repoint AND s.webhook_url IS NOT NULL AND s.webhook_changed_at IS NOT NULL
          AND mine.instance_status IN ('connecting', 'open', 'close', 'refused', 'expired')
          AND (mine.webhook_set_at IS NULL OR mine.webhook_set_at < s.webhook_changed_at)
    )
    SELECT greatest(0, least(max_ms::double precision,
                             extract(epoch FROM (min(at) - clock_timestamp())) * 1000))
    FROM due
$$;

-- Writes the outcome of a refresh batch. Each element: {"id", "outcome", "qr_code", "qr_text",
-- "pairing_code", "qr_count", "error"}, outcome one of
--   qr, no_qr, open, lost, error           (connect);
--   expired                                (expire: logged out);
--   checked, closed                        (check: still open, or the server says close; lost as above);
--   repointed                              (repoint; with "webhook_version", as above);
--   gone                                   (repoint of an idle instance the server lost: lost,
--                                           not created again until evoq_reconnect).
-- and "claimed_status", "claimed_at" (0.4.0): the row's status and updated_at at the claim; a row
-- changed since (a webhook delivery, an operator) is left alone.
CREATE OR REPLACE FUNCTION evoq._record_refresh_results(results jsonb) RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, @extschema@
AS $$
    WITH r AS (
        SELECT * FROM jsonb_to_recordset(results) AS x(
            id uuid, outcome text, qr_code text, qr_text text, pairing_code text, qr_count integer, error text,
            webhook_version timestamptz, claimed_status text, claimed_at timestamptz)
    ), updated AS (
        UPDATE evolution_instances i SET
            instance_status = CASE r.outcome WHEN 'open' THEN 'open' WHEN 'lost' THEN 'lost' WHEN 'gone' THEN 'lost'
                                             WHEN 'expired' THEN 'expired' WHEN 'closed' THEN 'close'
                                             ELSE i.instance_status END,
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
            disconnected_at = CASE WHEN r.outcome IN ('expired', 'closed') THEN clock_timestamp()
                                   WHEN r.outcome = 'open' THEN NULL ELSE i.disconnected_at END,
            disconnect_reason = CASE r.outcome
                WHEN 'expired' THEN 'not scanned within the QR window (evoq.qr_window_ms); logged out at the server'
                WHEN 'closed' THEN 'the Evolution API reports the session closed (connectionState)'
                WHEN 'open' THEN NULL ELSE i.disconnect_reason END,
            webhook_set_at = CASE WHEN r.outcome = 'repointed' THEN r.webhook_version
                                  WHEN r.outcome = 'gone' THEN clock_timestamp() ELSE i.webhook_set_at END,
            last_error = CASE WHEN r.outcome = 'error' THEN evoq._redact(r.error, i.instance_name)
                              WHEN r.outcome = 'lost' THEN 'the Evolution API no longer knows this instance (404); its creation was queued again'
                              WHEN r.outcome = 'gone' THEN 'the Evolution API no longer knows this instance (404); evoq_reconnect creates it again'
                              WHEN r.outcome IN ('checked', 'repointed') THEN i.last_error
                              ELSE NULL END,
            last_error_at = CASE WHEN r.outcome IN ('error', 'lost', 'gone') THEN clock_timestamp() ELSE i.last_error_at END,
            updated_at = clock_timestamp()
        FROM r WHERE i.id = r.id
          -- 0.4.0: the worker does not hold the row during the call; a delivery that moved it
          -- on meanwhile wins
          AND (r.claimed_status IS NULL OR i.instance_status = r.claimed_status)
          AND (r.claimed_at IS NULL OR i.updated_at = r.claimed_at)
        RETURNING i.user_id, i.instance_name, r.outcome
    )
    -- A lost instance is created again: a requeue request, applied by the queue's next run (or at
    -- the end of this one) to a row no run holds. Updating the queue row here would lock it while
    -- this run holds the instance row, the opposite order of evoq_process_queue: a deadlock.
    INSERT INTO evoq.requeue_requests (user_id, reason)
    SELECT user_id, 'lost' FROM updated WHERE outcome = 'lost'
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
CREATE OR REPLACE FUNCTION evoq._apply_delivery(d jsonb) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, @extschema@
AS $$
DECLARE
    result text;
BEGIN
    WITH x AS (
        SELECT * FROM jsonb_to_record(d) AS x(
            instance text, "from" text[], "to" text, kind text, event_at timestamptz,
            qr_code text, qr_text text, pairing_code text, number text, profile_name text, reason text)
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

-- The worker's state, read from shared memory by Rust.
CREATE  FUNCTION evoq."_worker_state"() RETURNS TABLE (
	"loaded" bool,  /* bool */
	"pid" INT,  /* Option < i32 > */
	"started_at" timestamp with time zone,  /* Option < pgrx :: datum :: TimestampWithTimeZone > */
	"last_loop_at" timestamp with time zone,  /* Option < pgrx :: datum :: TimestampWithTimeZone > */
	"in_flight" INT,  /* Option < i32 > */
	"listener" TEXT,  /* Option < String > */
	"last_error" TEXT  /* Option < String > */
)
STRICT
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_worker_state_wrapper';

-- evoq_status: the worker's columns at the end.
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
    (SELECT w.last_error FROM evoq._worker_state() w)   AS worker_last_error
FROM evolution_instance_creation_queue q;
REVOKE ALL ON evoq_status FROM PUBLIC;
COMMENT ON VIEW evoq_status IS 'Queue counts per state, oldest pending age, last runs and last error. Grant it to your operators.';

-- (Re)creates the privileges and row level security policies of everything evoq owns. Runs at
-- install, at every upgrade, and again by hand if the Supabase roles appear later.
--
-- Privileges first: whatever default privileges granted at creation time is taken back before
-- evoq grants what each role needs. Supabase grants anon, authenticated and service_role ALL on
-- every new table and function in public; RLS covers neither TRUNCATE nor EXECUTE of a SECURITY
-- DEFINER function, so left alone that lets any signed-in user wipe the queue or repoint
-- evoq_configure. TRIGGER, TRUNCATE and REFERENCES are taken from every role but the owner (a
-- trigger on evoq's tables would run inside evoq's SECURITY DEFINER jobs); other grants an
-- operator made to roles of their own stay.
CREATE OR REPLACE FUNCTION evoq_apply_policies() RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog
AS $$
DECLARE
    ext_oid oid := (SELECT oid FROM pg_extension WHERE extname = 'evoq');
    ext_schema text := (SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
                        WHERE e.extname = 'evoq');
    supabase boolean := to_regrole('authenticated') IS NOT NULL AND to_regrole('service_role') IS NOT NULL
                        AND to_regprocedure('auth.uid()') IS NOT NULL;
    api_roles text[] := ARRAY(SELECT r FROM unnest(ARRAY['anon', 'authenticated', 'service_role']) r
                              WHERE to_regrole(r) IS NOT NULL);
    queue text := format('%I.evolution_instance_creation_queue', ext_schema);
    inst text := format('%I.evolution_instances', ext_schema);
    status_view text := format('%I.evoq_status', ext_schema);
    app_events text := format('%I.evolution_instance_events', ext_schema);
    member record;
    pol record;
BEGIN
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
        -- (SELECT auth.uid()): evaluated once per statement, not once per row (Supabase lint 0003).
        EXECUTE format('CREATE POLICY "Service role can manage evolution instance queue" ON %s
                        FOR ALL TO service_role USING (true) WITH CHECK (true)', queue);
        EXECUTE format('CREATE POLICY "Users can view their own queue status" ON %s
                        FOR SELECT TO authenticated USING ((SELECT auth.uid()) = user_id)', queue);
        EXECUTE format('CREATE POLICY "Service role can manage evolution instances" ON %s
                        FOR ALL TO service_role USING (true) WITH CHECK (true)', inst);
        EXECUTE format('CREATE POLICY "Users can view their own evolution instance" ON %s
                        FOR SELECT TO authenticated USING ((SELECT auth.uid()) = user_id)', inst);
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
        EXECUTE format('GRANT EXECUTE ON FUNCTION %I.evoq_reconnect(uuid), %I.evoq_deprovision(uuid)
                        TO authenticated, service_role', ext_schema, ext_schema);
        RETURN 'supabase';
    END IF;

    EXECUTE format('CREATE POLICY "Users can view their own queue status" ON %s
                    FOR SELECT USING (user_id = (SELECT %I.evoq_current_user_id()))', queue, ext_schema);
    EXECUTE format('CREATE POLICY "Users can view their own evolution instance" ON %s
                    FOR SELECT USING (user_id = (SELECT %I.evoq_current_user_id()))', inst, ext_schema);
    RETURN 'postgres';
END
$$;

-- Privileges and policies, redone for every object (new ones included).
SELECT evoq_apply_policies();
