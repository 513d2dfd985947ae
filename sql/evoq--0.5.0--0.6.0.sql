-- evoq 0.5.0 -> 0.6.0: the reconciler (GET /instance/fetchInstances compared with the rows).
-- * evoq.reconciles (per server: the last reconcile, its lease) and evoq.reconcile_orphans
--   (instances of the namespace no row owns, and since when).
-- * evoq._reconcile_due_ms, _reconcile_begin, _reconcile_apply, _reconcile_finish; evoq_reconcile().
-- * _record_refresh_results takes the reconciler's findings (unlisted, unlisted_idle).
-- * _record_queue_results stamps a new instance row's updated_at with the time of the record,
--   not of the transaction's start (the reconciler judges rows older than its listing).
-- * evoq_status: last_reconcile_at, last_reconcile_summary, orphans_waiting.
-- No row changes.
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
                                              last_state_check_at, last_refresh_at, updated_at)
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
               clock_timestamp()
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
    (SELECT count(*) FROM evoq.reconcile_orphans) AS orphans_waiting
FROM evolution_instance_creation_queue q;

SELECT evoq_apply_policies();
