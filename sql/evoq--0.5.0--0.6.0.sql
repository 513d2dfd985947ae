-- evoq 0.5.0 -> 0.6.0: the reconciler (GET /instance/fetchInstances compared with the rows), and
-- the Evolution server as data.
-- * evoq.reconciles (per server: the last reconcile, its lease) and evoq.reconcile_orphans
--   (instances of the namespace no row owns, and since when).
-- * evoq._reconcile_due_ms, _reconcile_begin, _reconcile_apply, _reconcile_finish; evoq_reconcile().
-- * _record_refresh_results takes the reconciler's findings (unlisted, unlisted_idle).
-- * _record_queue_results stamps a new instance row's updated_at with the time of the record,
--   not of the transaction's start (the reconciler judges rows older than its listing), and
--   writes the instance's server.
-- * evoq.servers (one row, `default`, made here when evoq is configured), evoq.server_load,
--   evoq_servers, evoq_server_set, evoq_server_drain; a `server` column on the queue and the
--   instances (every instance and every queue row already tried is on `default`; an untried
--   one is placed at its first claim, within the server's capacity).
-- * _claim_queue places creations within the server's room; _apply_requeue_requests places a
--   re-creation afresh once its server answered for the old instance; _next_due_ms does not
--   count creations that wait for room.
-- * evoq_status: last_reconcile_at, last_reconcile_summary, orphans_waiting, waiting_for_room,
--   waiting_for_room_reason. evoq_apply_policies grants evoq_servers like evoq_status.
\echo Use "ALTER EXTENSION evoq UPDATE TO '0.6.0'" to load this file. \quit

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

SELECT pg_catalog.pg_extension_config_dump('evoq.reconciles', '');
SELECT pg_catalog.pg_extension_config_dump('evoq.reconcile_orphans', '');

-- 0.6.0: the Evolution servers, as data.
CREATE TABLE evoq.servers (
    name          text PRIMARY KEY CHECK (name ~ '^[a-z0-9][a-z0-9_-]{0,39}$'),
    -- live instances it may hold (evoq.server_load says which count); NULL: no bound
    capacity      integer CHECK (capacity > 0),
    -- calls sent to it at once; NULL: evoq.concurrency
    max_in_flight integer CHECK (max_in_flight > 0),
    -- takes no new instance (its own go on: retries, refreshes, deletions)
    draining      boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('evoq.servers', '');

-- The server of a queue row (NULL: not placed yet) and of an instance.
ALTER TABLE evolution_instance_creation_queue ADD COLUMN server text;
ALTER TABLE evolution_instances ADD COLUMN server text NOT NULL DEFAULT 'default';

-- The one server there is, when evoq is configured (evoq_configure makes it otherwise). Every
-- queue row whose create (or delete) was ever sent is on it: the server may hold its instance.
-- An untried creation stays unplaced: its first claim places it, within the server's capacity.
INSERT INTO evoq.servers (name) SELECT 'default' FROM evoq.settings;
UPDATE evolution_instance_creation_queue SET server = 'default'
WHERE status <> 'pending' OR attempts > 0 OR action = 'delete';

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

CREATE OR REPLACE FUNCTION evoq._record_refresh_results(results jsonb) RETURNS void
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

CREATE OR REPLACE FUNCTION evoq._claim_queue(batch_size integer, lease_ms bigint) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$
DECLARE
    -- 0.6.0: how many untried creations this claim may take (each takes room at the server)
    room integer := batch_size;
    -- the rows to claim when the server has less room than the claim may take
    ids uuid[];
BEGIN
    -- Without a capacity or a drain the server always has room: one read, no lock, no count.
    IF EXISTS (SELECT 1 FROM evoq.servers s WHERE s.name = 'default' AND (s.capacity IS NOT NULL OR s.draining)) THEN
        room := evoq._server_room('default', batch_size);
    END IF;
    IF room < batch_size THEN
        -- A full or draining server: first the rows that need no room (deletions, and creations
        -- already tried, which it counts), then as many untried creations as there is room for.
        -- The rest stay pending, untried and uncharged, until room appears.
        ids := ARRAY(SELECT id FROM evolution_instance_creation_queue
                     WHERE status IN ('pending', 'processing') AND next_attempt_at <= now()
                       AND (action = 'delete' OR attempts > 0)
                     ORDER BY next_attempt_at, created_at
                     LIMIT batch_size
                     FOR UPDATE SKIP LOCKED);
        IF room > 0 AND cardinality(ids) < batch_size THEN
            ids := ids || ARRAY(SELECT id FROM evolution_instance_creation_queue
                                WHERE status IN ('pending', 'processing') AND next_attempt_at <= now()
                                  AND action = 'create' AND attempts = 0
                                ORDER BY next_attempt_at, created_at
                                LIMIT least(room, batch_size - cardinality(ids))
                                FOR UPDATE SKIP LOCKED);
        END IF;
    END IF;
    RETURN evoq._claim_rows(ids, batch_size, lease_ms);
END
$$;

CREATE OR REPLACE FUNCTION evoq._apply_requeue_requests(only_user uuid DEFAULT NULL) RETURNS integer
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
            error_message = CASE d.reason WHEN 'lost'
                THEN 'the Evolution API no longer knows this instance (404); creating it again' END,
            last_http_status = CASE d.reason WHEN 'lost' THEN 404 END,
            -- 0.6.0: a creation is placed afresh once its server answered for the old instance
            -- (lost: 404; or deleted); otherwise it stays where the server may still hold it
            server = CASE WHEN d.reason <> 'deprovision' AND EXISTS (
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
        -- 0.6.0: an untried creation is due only while its server takes new instances (a full
        -- one would have the worker claim nothing every second; room wakes it: evoq_server_set,
        -- evoq_server_drain, or its own deletions and expiries; otherwise it looks again within
        -- a minute). Each branch's test of the server is a one-time filter: one branch is read.
        SELECT min(next_attempt_at) AS at FROM evolution_instance_creation_queue
        WHERE status IN ('pending', 'processing') AND evoq._server_full('default') IS NULL
        UNION ALL
        SELECT min(next_attempt_at) FROM evolution_instance_creation_queue
        WHERE status IN ('pending', 'processing') AND (action = 'delete' OR attempts > 0)
          AND evoq._server_full('default') IS NOT NULL
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

CREATE FUNCTION evoq._claim_rows(ids uuid[], batch_size integer, lease_ms bigint) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$
DECLARE
    result jsonb;
BEGIN
    WITH due AS (
        SELECT id, status, updated_at, next_attempt_at FROM evolution_instance_creation_queue
        WHERE status IN ('pending', 'processing') AND next_attempt_at <= now()
          AND (ids IS NULL OR id = ANY (ids))
        ORDER BY next_attempt_at, created_at
        LIMIT batch_size
        FOR UPDATE SKIP LOCKED
    ), claimed AS (
        UPDATE evolution_instance_creation_queue q
        SET status = 'processing', attempts = q.attempts + 1, updated_at = clock_timestamp(),
            next_attempt_at = clock_timestamp() + lease_ms * interval '1 millisecond',
            server = coalesce(q.server, 'default')
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

CREATE FUNCTION evoq._server_full(server text) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$
    SELECT CASE WHEN s.draining OR s.capacity IS NOT NULL
                THEN (SELECT l.full_reason FROM evoq.server_load l WHERE l.name = s.name) END
    FROM evoq.servers s WHERE s.name = _server_full.server
$$;

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
        WHERE i.updated_at < listed_at
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
    WHERE NOT EXISTS (SELECT 1 FROM evolution_instances i WHERE i.instance_name = l.n AND i.instance_status <> 'deleted')
      AND NOT EXISTS (SELECT 1 FROM evolution_instance_creation_queue q
                      WHERE q.user_id = l.u AND q.status IN ('pending', 'processing') AND q.action = 'create')
      AND NOT EXISTS (SELECT 1 FROM evolution_instance_creation_queue q
                      WHERE q.instance_name = l.n AND q.status IN ('pending', 'processing') AND q.action = 'create');
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
     WHERE i.instance_status IN ('connecting', 'open');
    IF jsonb_array_length(retaken) > 0 THEN
        PERFORM evoq._record_refresh_results(retaken);
    END IF;
    UPDATE evoq.reconciles r SET finished_at = clock_timestamp(), lease_until = NULL, summary = _reconcile_finish.summary,
        last_error = coalesce(_reconcile_finish.last_error, r.last_error),
        last_error_at = CASE WHEN _reconcile_finish.last_error IS NOT NULL THEN clock_timestamp() ELSE r.last_error_at END
    WHERE r.server = _reconcile_finish.server AND r.started_at = _reconcile_finish.began;
END
$$;

CREATE  FUNCTION "evoq_reconcile"(
	"server" TEXT DEFAULT NULL /* Option < & str > */
) RETURNS jsonb /* pgrx :: JsonB */
SECURITY DEFINER
SET search_path TO pg_catalog, @extschema@, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'evoq_reconcile_wrapper';

CREATE  FUNCTION evoq."_wake_worker_at_commit"() RETURNS void
STRICT
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_wake_worker_at_commit_wrapper';

CREATE VIEW evoq_servers AS
SELECT
    l.name,
    CASE WHEN l.name = 'default'
         -- everything up to the last '@' masked: a password with an unescaped '/' or '@' too
         THEN (SELECT regexp_replace(s.api_url, '^([a-z][a-z0-9+.-]*://)?.*@', '\1***@', 'i') FROM evoq.settings s)
    END AS api_url,
    CASE WHEN EXISTS (SELECT 1 FROM evoq.circuit) AND l.name = 'default' THEN 'circuit_open'
         WHEN l.draining THEN 'draining'
         ELSE 'ok' END AS state,
    CASE WHEN l.name = 'default'
         THEN (SELECT coalesce(nullif(s.api_version, 'auto'), s.detected_version) FROM evoq.settings s)
    END AS api_version,
    l.capacity,
    l.max_in_flight,
    l.draining,
    l.live AS live_instances,
    l.capacity - l.live AS free_slots,
    (SELECT count(*) FROM evolution_instance_creation_queue q
     WHERE q.server = l.name AND q.status = 'processing' AND q.next_attempt_at > now()) AS claimed,
    l.full_reason,
    -- the session placing on it now (a claim's transaction lock, see evoq._server_room): while one
    -- holds it, no other run places (a pg_cron run holds it to its end; so would a transaction left
    -- open after calling evoq_process_queue)
    (SELECT k.pid FROM pg_locks k
     WHERE k.locktype = 'advisory' AND k.granted AND k.objsubid = 2
       AND k.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
       AND k.classid = hashtext('evoq placement')::oid AND k.objid = hashtext(l.name)::oid
     LIMIT 1) AS placing_pid,
    (SELECT j.last_error FROM evoq.job_runs j WHERE j.last_error_at IS NOT NULL
     ORDER BY j.last_error_at DESC LIMIT 1) AS last_error,
    (SELECT c.opened_at FROM evoq.circuit c WHERE l.name = 'default')     AS circuit_opened_at,
    (SELECT c.cause FROM evoq.circuit c WHERE l.name = 'default')         AS circuit_cause,
    (SELECT c.trips FROM evoq.circuit c WHERE l.name = 'default')         AS circuit_trips,
    (SELECT c.next_probe_at FROM evoq.circuit c WHERE l.name = 'default') AS circuit_next_probe_at,
    (SELECT r.finished_at FROM evoq.reconciles r WHERE r.server = l.name AND r.summary IS NOT NULL) AS last_reconcile_at,
    (SELECT r.summary FROM evoq.reconciles r WHERE r.server = l.name) AS last_reconcile_summary,
    (SELECT count(*) FROM evoq.reconcile_orphans o WHERE o.server = l.name) AS orphans_waiting
FROM evoq.server_load l;
REVOKE ALL ON evoq_servers FROM PUBLIC;
COMMENT ON VIEW evoq_servers IS
    'One row per Evolution API server: state (ok, circuit_open, draining), capacity, live instances, free slots, circuit and last reconcile. Never the key.';

CREATE FUNCTION evoq._server_changed(srv evoq.servers, name text) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$
BEGIN
    IF srv.name IS NULL THEN
        PERFORM evoq._no_such_server(_server_changed.name);
    END IF;
    PERFORM evoq._wake_worker_at_commit();
    RETURN jsonb_build_object('name', srv.name, 'capacity', srv.capacity, 'max_in_flight', srv.max_in_flight,
                              'draining', srv.draining);
END
$$;

CREATE FUNCTION evoq_server_set(name text, capacity integer DEFAULT NULL, max_in_flight integer DEFAULT NULL,
                                clear text[] DEFAULT '{}') RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$
DECLARE
    srv evoq.servers;
    unknown text := (SELECT string_agg(coalesce(quote_literal(f), 'NULL'), ', ') FROM unnest(clear) f
                     WHERE f IS NULL OR f NOT IN ('capacity', 'max_in_flight'));
BEGIN
    IF unknown IS NOT NULL THEN
        RAISE EXCEPTION 'evoq_server_set: clear names no setting evoq_server_set can reset: %', unknown
            USING ERRCODE = '22023', HINT = 'clear takes ''capacity'' (no bound on instances) and ''max_in_flight'' (evoq.concurrency).';
    END IF;
    IF evoq_server_set.capacity IS NOT NULL AND evoq_server_set.capacity < 1 THEN
        RAISE EXCEPTION 'evoq_server_set: capacity must be at least 1, not %', evoq_server_set.capacity
            USING ERRCODE = '22023',
                  HINT = 'capacity is how many live instances the server may hold; clear => ''{capacity}'' removes the bound.';
    END IF;
    IF evoq_server_set.max_in_flight IS NOT NULL AND evoq_server_set.max_in_flight < 1 THEN
        RAISE EXCEPTION 'evoq_server_set: max_in_flight must be at least 1, not %', evoq_server_set.max_in_flight
            USING ERRCODE = '22023',
                  HINT = 'max_in_flight is how many calls the server is sent at once; clear => ''{max_in_flight}'' makes it evoq.concurrency.';
    END IF;
    IF (evoq_server_set.capacity IS NOT NULL AND 'capacity' = ANY (clear))
       OR (evoq_server_set.max_in_flight IS NOT NULL AND 'max_in_flight' = ANY (clear)) THEN
        RAISE EXCEPTION 'evoq_server_set: a setting is both given and cleared'
            USING ERRCODE = '22023', HINT = 'Give a value, or name it in clear, not both.';
    END IF;
    UPDATE evoq.servers s SET
        capacity = CASE WHEN 'capacity' = ANY (clear) THEN NULL ELSE coalesce(evoq_server_set.capacity, s.capacity) END,
        max_in_flight = CASE WHEN 'max_in_flight' = ANY (clear) THEN NULL
                             ELSE coalesce(evoq_server_set.max_in_flight, s.max_in_flight) END,
        updated_at = now()
    WHERE s.name = evoq_server_set.name
    RETURNING s.* INTO srv;
    RETURN evoq._server_changed(srv, evoq_server_set.name);
END
$$;
COMMENT ON FUNCTION evoq_server_set(text, integer, integer, text[]) IS
    'Sets an Evolution server''s capacity (live instances it may hold) and max_in_flight (calls at once); clear resets them.';

CREATE FUNCTION evoq_server_drain(name text, draining boolean DEFAULT true) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$
DECLARE
    srv evoq.servers;
BEGIN
    IF evoq_server_drain.draining IS NULL THEN
        RAISE EXCEPTION 'evoq_server_drain: draining must be true or false, not NULL'
            USING ERRCODE = '22023', HINT = 'evoq_server_drain(name) drains; evoq_server_drain(name, false) ends it.';
    END IF;
    UPDATE evoq.servers s SET draining = evoq_server_drain.draining, updated_at = now()
    WHERE s.name = evoq_server_drain.name
    RETURNING s.* INTO srv;
    RETURN evoq._server_changed(srv, evoq_server_drain.name);
END
$$;
COMMENT ON FUNCTION evoq_server_drain(text, boolean) IS
    'Stops (or, with false, resumes) new instances on an Evolution server; its own instances go on.';

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
              'Evolution server ends such loops' END AS instances_still_looping_hint,
    -- 0.6.0: the reconciler (fetchInstances compared with the rows), of the one server there is
    (SELECT finished_at FROM evoq.reconciles WHERE server = 'default' AND summary IS NOT NULL) AS last_reconcile_at,
    (SELECT summary FROM evoq.reconciles WHERE server = 'default') AS last_reconcile_summary,
    (SELECT count(*) FROM evoq.reconcile_orphans) AS orphans_waiting,
    -- 0.6.0: creations waiting for room at the server (untried, no attempt charged),
    -- and why (evoq_servers shows each server's load)
    count(*) FILTER (WHERE q.status = 'pending' AND q.action = 'create' AND q.attempts = 0
                     AND (SELECT l.full_reason FROM evoq.server_load l WHERE l.name = 'default') IS NOT NULL)
        AS waiting_for_room,
    (SELECT l.full_reason FROM evoq.server_load l WHERE l.name = 'default') AS waiting_for_room_reason
FROM evolution_instance_creation_queue q;

SELECT evoq_apply_policies();
