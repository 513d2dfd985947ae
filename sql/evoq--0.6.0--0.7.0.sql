-- evoq 0.6.0 -> 0.7.0: several Evolution servers.
-- * evoq.servers gains a server's own URL, key, version (pinned or detected) and when they last
--   changed; `default` keeps its own in evoq.settings (evoq_configure's). One URL, one server.
-- * evoq.circuit is per server (keyed by its name, and gone with it).
-- * _claim_queue and _claim_refresh claim for one server: its own rows, and the unplaced
--   creations it is the best place for (_placement_share); _claim_rows says which rows it
--   placed, and _release_queue puts an uncalled one back unplaced; _next_due_ms and evoq_status
--   look at every server (_placement_blocked).
-- * _reconcile_apply and _reconcile_finish judge one server's rows (a twin elsewhere is an
--   orphan there).
-- * evoq_server_add, evoq_server_remove; evoq_server_set also takes api_url, api_key,
--   api_version and rotate_webhook_secret; evoq_servers shows each server's URL, version and circuit,
--   and its own last error (evoq.servers.last_error, written by _record_run).
-- * evoq_move, evoq_server_drain(..., move_unlinked): a deletion at the old server and a creation
--   on the new one, one queued request (queue.move_to); _record_queue_results turns the done
--   deletion into the creation, _apply_requeue_requests ends a move another request overrides.
-- * each server's own webhook secret (evoq.servers.webhook_secret; `default`'s stays
--   evoq.settings'): _apply_delivery applies a delivery only to an instance of the server whose
--   secret it carried (evoq.webhooks_misdirected counts the others, evoq_status shows it); the
--   repoint compares with the server's own change too.
\echo Use "ALTER EXTENSION evoq UPDATE TO '0.7.0'" to load this file. \quit

-- A server's own connection (NULL for `default`, whose connection is evoq.settings').
ALTER TABLE evoq.servers
    ADD COLUMN api_url text,
    ADD COLUMN api_key text,
    ADD COLUMN api_version text NOT NULL DEFAULT 'auto' CHECK (api_version IN ('auto', 'v1', 'v2')),
    ADD COLUMN detected_version text CHECK (detected_version IN ('v1', 'v2')),
    ADD COLUMN detected_at timestamptz,
    ADD COLUMN connection_changed_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN webhook_secret text,
    ADD COLUMN webhook_secret_previous text,
    ADD COLUMN webhook_changed_at timestamptz,
    ADD COLUMN last_error text,
    ADD COLUMN last_error_at timestamptz;
ALTER TABLE evoq.servers ADD CONSTRAINT servers_connection_check
    CHECK (CASE WHEN name = 'default' THEN api_url IS NULL AND api_key IS NULL
                ELSE api_url IS NOT NULL AND api_key IS NOT NULL END);
-- 0.7.0: one URL, one server (two names for one server would place past its capacity).
CREATE UNIQUE INDEX servers_api_url_key ON evoq.servers (api_url);

-- 0.7.0: a move in progress (evoq_move): the deletion is followed by a creation there.
ALTER TABLE evolution_instance_creation_queue ADD COLUMN move_to text;

-- 0.7.0: deliveries that carried one server's secret for an instance another server holds
CREATE SEQUENCE evoq.webhooks_misdirected;
SELECT pg_catalog.pg_extension_config_dump('evoq.webhooks_misdirected', '');

-- The circuit of `default` (the only server there was), keyed by its server from now on.
ALTER TABLE evoq.circuit DROP CONSTRAINT circuit_pkey;
ALTER TABLE evoq.circuit DROP COLUMN singleton;
ALTER TABLE evoq.circuit ADD COLUMN server text;
UPDATE evoq.circuit SET server = 'default';
DELETE FROM evoq.circuit c WHERE NOT EXISTS (SELECT 1 FROM evoq.servers s WHERE s.name = c.server);
ALTER TABLE evoq.circuit ALTER COLUMN server SET NOT NULL;
ALTER TABLE evoq.circuit ADD PRIMARY KEY (server);
ALTER TABLE evoq.circuit ADD FOREIGN KEY (server) REFERENCES evoq.servers (name) ON DELETE CASCADE;

-- The claims take the server they claim for.
DROP FUNCTION evoq._claim_queue(integer, bigint);
DROP FUNCTION evoq._claim_rows(uuid[], integer, bigint);
DROP FUNCTION evoq._claim_refresh(integer, bigint, bigint, bigint, boolean, uuid[], bigint);
DROP FUNCTION evoq_server_set(text, integer, integer, text[]);
DROP FUNCTION evoq_server_drain(text, boolean);

-- 0.7.0: a new webhook secret: 64 hex digits from two random (v4) uuids, which PostgreSQL draws
-- from the operating system's random source (what evoq_configure's Rust does for `default`).
CREATE FUNCTION evoq._new_webhook_secret() RETURNS text
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT replace(gen_random_uuid()::text, '-', '') || replace(gen_random_uuid()::text, '-', '') $$;

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

-- 0.7.0: why no server takes a new instance now (each one's reason); NULL when one does, or when
-- there is no server yet.
CREATE FUNCTION evoq._placement_blocked() RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$
    SELECT CASE WHEN bool_and(f.reason IS NOT NULL) THEN string_agg(f.reason, '; ' ORDER BY f.name) END
    FROM (SELECT s.name, evoq._server_full(s.name) AS reason FROM evoq.servers s) f
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

-- Puts claimed rows back exactly as they were (the circuit breaker: a batch that failed because
-- of the server or the configuration is not the rows' fault and costs them nothing). 0.7.0: a
-- row the claim placed goes back unplaced when "unplace" says its call never left (claimed ahead
-- and not called), so it may go to another server; a row whose call left stays where it went.
CREATE OR REPLACE FUNCTION evoq._release_queue(claims jsonb) RETURNS void
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
CREATE OR REPLACE FUNCTION evoq._reconcile_apply(server text, listed jsonb, listed_at timestamptz, grace_ms bigint,
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
CREATE OR REPLACE FUNCTION evoq._reconcile_finish(server text, began timestamptz, summary jsonb, last_error text,
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

CREATE  FUNCTION evoq."_check_url"(
	"label" TEXT, /* & str */
	"url" TEXT /* & str */
) RETURNS void
STRICT
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_check_url_wrapper';

-- 0.6.0: a server's own settings. capacity: how many live instances it may hold (a sign-up beyond
-- waits pending, untried); max_in_flight: calls it is sent at once (at most evoq.concurrency);
-- clear: settings reset to none ('capacity', 'max_in_flight'). Wakes the background worker, which
-- places the sign-ups that waited for room. 0.7.0: and a server's URL, key (a rotation) and
-- version, for the servers evoq_server_add made (`default`'s are evoq_configure's); a run that
-- read the old ones claims nothing more.
CREATE FUNCTION evoq_server_set(name text, capacity integer DEFAULT NULL, max_in_flight integer DEFAULT NULL,
                                clear text[] DEFAULT '{}', api_url text DEFAULT NULL, api_key text DEFAULT NULL,
                                api_version text DEFAULT NULL, rotate_webhook_secret boolean DEFAULT false) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$
DECLARE
    -- restored before returning: the caller's transaction goes on logging as it did
    logged_statements text := current_setting('log_min_error_statement');
    result jsonb;
    srv evoq.servers;
    unknown text := (SELECT string_agg(coalesce(quote_literal(f), 'NULL'), ', ') FROM unnest(clear) f
                     WHERE f IS NULL OR f NOT IN ('capacity', 'max_in_flight'));
    url text := rtrim(btrim(evoq_server_set.api_url), '/');
    connection boolean := evoq_server_set.api_url IS NOT NULL OR evoq_server_set.api_key IS NOT NULL
                          OR evoq_server_set.api_version IS NOT NULL;
BEGIN
    -- the statement's text may hold a key: an error must not log it
    PERFORM set_config('log_min_error_statement', 'panic', true);
    IF unknown IS NOT NULL THEN
        RAISE EXCEPTION 'evoq_server_set: clear names no setting evoq_server_set can reset: %', unknown
            USING ERRCODE = '22023', HINT = 'clear takes ''capacity'' (no bound on instances) and ''max_in_flight'' (evoq.concurrency).';
    END IF;
    PERFORM evoq._check_server_settings('evoq_server_set', evoq_server_set.capacity, evoq_server_set.max_in_flight);
    IF (evoq_server_set.capacity IS NOT NULL AND 'capacity' = ANY (clear))
       OR (evoq_server_set.max_in_flight IS NOT NULL AND 'max_in_flight' = ANY (clear)) THEN
        RAISE EXCEPTION 'evoq_server_set: a setting is both given and cleared'
            USING ERRCODE = '22023', HINT = 'Give a value, or name it in clear, not both.';
    END IF;
    IF evoq_server_set.rotate_webhook_secret IS NULL THEN
        RAISE EXCEPTION 'evoq_server_set: rotate_webhook_secret must be true or false, not NULL'
            USING ERRCODE = '22023', HINT = 'Leave it out (false), or pass true to give the server a new webhook secret.';
    END IF;
    IF evoq_server_set.rotate_webhook_secret THEN
        IF evoq_server_set.name = 'default' THEN
            RAISE EXCEPTION 'evoq_server_set: the webhook secret of the server ''default'' is evoq_configure''s'
                USING ERRCODE = '22023', HINT = 'Call evoq_configure(..., rotate_webhook_secret => true) to rotate it.';
        END IF;
        IF EXISTS (SELECT 1 FROM evoq.servers s WHERE s.name = evoq_server_set.name
                   AND s.webhook_secret_previous IS NOT NULL) THEN
            RAISE EXCEPTION 'evoq_server_set: the previous rotation of server %''s webhook secret is still being applied',
                            quote_literal(evoq_server_set.name)
                USING ERRCODE = '55000',
                      HINT = 'evoq_refresh_qr gives each of its instances the current secret and then retires the old one; rotate again after that. Rotating now would lock out the instances that still carry the first secret.';
        END IF;
    END IF;
    IF connection THEN
        IF evoq_server_set.name = 'default' THEN
            RAISE EXCEPTION 'evoq_server_set: the URL, key and version of the server ''default'' are evoq_configure''s'
                USING ERRCODE = '22023', HINT = 'Call evoq_configure(api_url => ..., api_key => ..., api_version => ...) to change them.';
        END IF;
        PERFORM evoq._check_server_connection('evoq_server_set', evoq_server_set.name, url, evoq_server_set.api_key,
                                              coalesce(evoq_server_set.api_version, 'auto'), url IS NOT NULL,
                                              evoq_server_set.api_key IS NOT NULL);
    END IF;
    UPDATE evoq.servers s SET
        capacity = CASE WHEN 'capacity' = ANY (clear) THEN NULL ELSE coalesce(evoq_server_set.capacity, s.capacity) END,
        max_in_flight = CASE WHEN 'max_in_flight' = ANY (clear) THEN NULL
                             ELSE coalesce(evoq_server_set.max_in_flight, s.max_in_flight) END,
        api_url = coalesce(url, s.api_url),
        api_key = coalesce(btrim(evoq_server_set.api_key), s.api_key),
        api_version = coalesce(evoq_server_set.api_version, s.api_version),
        -- another URL (or dialect) may be another server's: GET / is asked again
        detected_version = CASE WHEN url IS NOT NULL OR evoq_server_set.api_version IS NOT NULL THEN NULL
                                ELSE s.detected_version END,
        detected_at = CASE WHEN url IS NOT NULL OR evoq_server_set.api_version IS NOT NULL THEN NULL
                           ELSE s.detected_at END,
        connection_changed_at = CASE WHEN connection THEN clock_timestamp() ELSE s.connection_changed_at END,
        -- a new secret: the one before is accepted until each of its instances has the new one
        webhook_secret_previous = CASE WHEN evoq_server_set.rotate_webhook_secret THEN s.webhook_secret
                                       ELSE s.webhook_secret_previous END,
        webhook_secret = CASE WHEN evoq_server_set.rotate_webhook_secret THEN evoq._new_webhook_secret()
                              ELSE s.webhook_secret END,
        webhook_changed_at = CASE WHEN evoq_server_set.rotate_webhook_secret THEN clock_timestamp()
                                  ELSE s.webhook_changed_at END,
        updated_at = now()
    WHERE s.name = evoq_server_set.name
    RETURNING s.* INTO srv;
    IF connection AND srv.name IS NOT NULL THEN
        -- a new configuration deserves a fresh start: the circuit may have opened because of the old one
        DELETE FROM evoq.circuit c WHERE c.server = srv.name;
    END IF;
    result := evoq._server_changed(srv, evoq_server_set.name);
    PERFORM set_config('log_min_error_statement', logged_statements, true);
    RETURN result;
END
$$;
COMMENT ON FUNCTION evoq_server_set(text, integer, integer, text[], text, text, text, boolean) IS
    'Sets an Evolution server''s capacity (live instances it may hold) and max_in_flight (calls at once); clear resets them. For a server evoq_server_add made, also its URL, key and version, and a new webhook secret.';

-- 0.7.0: the checks evoq_server_add and evoq_server_set share, so both say the same.
CREATE FUNCTION evoq._check_server_settings(caller text, capacity integer, max_in_flight integer) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$
BEGIN
    IF _check_server_settings.capacity IS NOT NULL AND _check_server_settings.capacity < 1 THEN
        RAISE EXCEPTION '%: capacity must be at least 1, not %', caller, _check_server_settings.capacity
            USING ERRCODE = '22023',
                  HINT = 'capacity is how many live instances the server may hold; leave it NULL (or clear => ''{capacity}'') for no bound.';
    END IF;
    IF _check_server_settings.max_in_flight IS NOT NULL AND _check_server_settings.max_in_flight < 1 THEN
        RAISE EXCEPTION '%: max_in_flight must be at least 1, not %', caller, _check_server_settings.max_in_flight
            USING ERRCODE = '22023',
                  HINT = 'max_in_flight is how many calls the server is sent at once; leave it NULL (or clear => ''{max_in_flight}'') for evoq.concurrency.';
    END IF;
END
$$;
-- 0.7.0: a server's URL (checked like evoq_configure's, and no other server's), key and version.
CREATE FUNCTION evoq._check_server_connection(caller text, name text, url text, key text, version text,
                                              url_given boolean, key_given boolean) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$
BEGIN
    IF url_given THEN
        PERFORM evoq._check_url(caller || ': api_url', url);
        IF EXISTS (SELECT 1 FROM evoq.servers s WHERE s.api_url = _check_server_connection.url
                   AND s.name <> _check_server_connection.name)
           OR EXISTS (SELECT 1 FROM evoq.settings s WHERE rtrim(s.api_url, '/') = _check_server_connection.url) THEN
            RAISE EXCEPTION '%: another server already has this api_url', caller
                USING ERRCODE = '23505',
                      HINT = 'One Evolution server, one name: two names for it would place instances past its capacity (evoq_servers lists them).';
        END IF;
    END IF;
    IF key_given AND coalesce(btrim(key), '') = '' THEN
        RAISE EXCEPTION '%: api_key must not be empty', caller
            USING ERRCODE = '22023', HINT = 'Pass the server''s global key (AUTHENTICATION_API_KEY).';
    END IF;
    IF version IS NULL OR version NOT IN ('auto', 'v1', 'v2') THEN
        RAISE EXCEPTION '%: api_version must be ''auto'', ''v1'' or ''v2'', not %', caller, coalesce(quote_literal(version), 'NULL')
            USING ERRCODE = '22023', HINT = 'Leave it at ''auto'' to ask the server once.';
    END IF;
END
$$;
-- 0.7.0: another Evolution server, with its own URL, key, capacity, bound on calls and dialect.
-- New sign-ups are placed on it as soon as it has the most free capacity; nothing moves onto it.
CREATE FUNCTION evoq_server_add(name text, api_url text, api_key text, capacity integer DEFAULT NULL,
                                max_in_flight integer DEFAULT NULL, api_version text DEFAULT 'auto') RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$
DECLARE
    -- restored before returning: the caller's transaction goes on logging as it did
    logged_statements text := current_setting('log_min_error_statement');
    result jsonb;
    srv evoq.servers;
    url text := rtrim(btrim(evoq_server_add.api_url), '/');
BEGIN
    -- the statement's text holds a key: an error must not log it
    PERFORM set_config('log_min_error_statement', 'panic', true);
    IF NOT EXISTS (SELECT 1 FROM evoq.settings) THEN
        RAISE EXCEPTION 'evoq_server_add: evoq is not configured yet'
            USING ERRCODE = '55000',
                  HINT = 'evoq_configure(api_url => ..., api_key => ..., webhook_url => ...) first: it makes the server ''default'' and the webhook every server is given.';
    END IF;
    IF evoq_server_add.name IS NULL OR evoq_server_add.name !~ '^[a-z0-9][a-z0-9_-]{0,39}$' THEN
        RAISE EXCEPTION 'evoq_server_add: % is not a server name', coalesce(quote_literal(evoq_server_add.name), 'NULL')
            USING ERRCODE = '22023', HINT = 'A name is 1 to 40 lower-case letters, digits, ''-'' or ''_'', starting with a letter or digit.';
    END IF;
    IF EXISTS (SELECT 1 FROM evoq.servers s WHERE s.name = evoq_server_add.name) THEN
        RAISE EXCEPTION 'evoq_server_add: there is already a server named %', quote_literal(evoq_server_add.name)
            USING ERRCODE = '23505', HINT = 'evoq_server_set changes a server''s settings; evoq_servers lists them.';
    END IF;
    IF url IS NULL OR url = '' THEN
        RAISE EXCEPTION 'evoq_server_add: api_url must not be empty or NULL'
            USING ERRCODE = '22023', HINT = 'Pass api_url => ''http://your-evolution-host:8080''.';
    END IF;
    IF evoq_server_add.api_key IS NULL THEN
        RAISE EXCEPTION 'evoq_server_add: api_key must not be NULL'
            USING ERRCODE = '22023', HINT = 'Pass the server''s global key (AUTHENTICATION_API_KEY).';
    END IF;
    PERFORM evoq._check_server_settings('evoq_server_add', evoq_server_add.capacity, evoq_server_add.max_in_flight);
    PERFORM evoq._check_server_connection('evoq_server_add', evoq_server_add.name, url, evoq_server_add.api_key,
                                          evoq_server_add.api_version, true, true);
    -- Its own webhook secret (64 hex digits from the operating system's random source, as
    -- evoq_configure makes default's): its instances are given it when they are created.
    INSERT INTO evoq.servers (name, capacity, max_in_flight, api_url, api_key, api_version, webhook_secret,
                              webhook_changed_at)
    VALUES (evoq_server_add.name, evoq_server_add.capacity, evoq_server_add.max_in_flight, url,
            btrim(evoq_server_add.api_key), evoq_server_add.api_version, evoq._new_webhook_secret(), clock_timestamp())
    RETURNING * INTO srv;
    result := evoq._server_changed(srv, evoq_server_add.name);
    PERFORM set_config('log_min_error_statement', logged_statements, true);
    RETURN result;
END
$$;
COMMENT ON FUNCTION evoq_server_add(text, text, text, integer, integer, text) IS
    'Adds an Evolution API server: new instances are placed on the server with the most free capacity. The key is readable by no ordinary role and never printed.';

-- 0.7.0: removes a server evoq_server_add made. Refused while it holds live instances or queued
-- work (drain it, and let them go); with force its instances are given up: they become lost
-- (connecting and open ones are created again on another server, the others when their user
-- asks: evoq_reconnect), its unfinished creations are placed afresh and its deletions are done.
CREATE FUNCTION evoq_server_remove(name text, force boolean DEFAULT false) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$
DECLARE
    live bigint;
    queued bigint;
    lost jsonb;
    replaced integer;
    done integer;
BEGIN
    IF evoq_server_remove.force IS NULL THEN
        RAISE EXCEPTION 'evoq_server_remove: force must be true or false, not NULL'
            USING ERRCODE = '22023', HINT = 'Leave it out (false) to remove only a server that holds nothing.';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM evoq.servers s WHERE s.name = evoq_server_remove.name) THEN
        PERFORM evoq._no_such_server(evoq_server_remove.name);
    END IF;
    IF evoq_server_remove.name = 'default' THEN
        RAISE EXCEPTION 'evoq_server_remove: the server ''default'' is the one evoq_configure describes, and stays'
            USING ERRCODE = '22023',
                  HINT = 'evoq_server_drain(''default'') stops new instances on it; evoq_configure can point it at another server.';
    END IF;
    -- Its row first: a claim placing on it holds it (evoq._claim_queue), and this waits for it.
    PERFORM 1 FROM evoq.servers s WHERE s.name = evoq_server_remove.name FOR UPDATE;
    SELECT l.live INTO live FROM evoq.server_load l WHERE l.name = evoq_server_remove.name;
    -- (a move on its way to it counts too: its creation would be sent there)
    SELECT count(*) INTO queued FROM evolution_instance_creation_queue q
    WHERE (q.server = evoq_server_remove.name OR q.move_to = evoq_server_remove.name)
      AND q.status IN ('pending', 'processing');
    IF (live > 0 OR queued > 0) AND NOT evoq_server_remove.force THEN
        RAISE EXCEPTION 'evoq_server_remove: server % still holds % live instances and % queued requests',
                        quote_literal(evoq_server_remove.name), live, queued
            USING ERRCODE = '55006',
                  HINT = format('Drain it (evoq_server_drain(%L)) and remove it once evoq_servers shows nothing live; or pass force => true to give its instances up: they become lost, and their users get a new instance (and QR) on another server.', evoq_server_remove.name);
    END IF;
    -- Given up: its live instances are lost, as if the server had said 404. Their rows are
    -- locked first, waiting for a run that holds them (the worker's hold is a group's commit;
    -- a SQL function's, its run), so that none is skipped.
    PERFORM 1 FROM evolution_instances i
     WHERE i.server = evoq_server_remove.name
       AND i.instance_status IN ('connecting', 'open', 'close', 'refused', 'expired')
     FOR UPDATE;
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'id', i.id,
               'outcome', CASE WHEN i.instance_status IN ('connecting', 'open') THEN 'unlisted' ELSE 'unlisted_idle' END,
               'claimed_status', i.instance_status, 'claimed_at', i.updated_at)), '[]')
      INTO lost
      FROM evolution_instances i
     WHERE i.server = evoq_server_remove.name
       AND i.instance_status IN ('connecting', 'open', 'close', 'refused', 'expired');
    IF jsonb_array_length(lost) > 0 THEN
        PERFORM evoq._record_refresh_results(lost);
    END IF;
    -- (A safeguard: an instance row must never be left on a server that no longer exists.)
    IF EXISTS (SELECT 1 FROM evolution_instances i WHERE i.server = evoq_server_remove.name
               AND i.instance_status IN ('connecting', 'open', 'close', 'refused', 'expired')) THEN
        RAISE EXCEPTION 'evoq_server_remove: some of server %''s instances are held by a run in progress',
                        quote_literal(evoq_server_remove.name)
            USING ERRCODE = '55006', HINT = 'Try again once the run (evoq_refresh_qr, pg_cron or the worker) has ended.';
    END IF;
    -- A move on its way to it is placed afresh instead.
    UPDATE evolution_instance_creation_queue q SET move_to = '', updated_at = clock_timestamp()
    WHERE q.move_to = evoq_server_remove.name AND q.status IN ('pending', 'processing');
    -- Its deletions are done (nothing there to delete any more); its creations go elsewhere. A
    -- call still in flight to it finds its claim gone (updated_at moved) and is not recorded.
    UPDATE evolution_instance_creation_queue q
    SET status = 'completed', processed_at = clock_timestamp(), updated_at = clock_timestamp(),
        error_message = format('its server %s was removed (evoq_server_remove with force)', evoq_server_remove.name)
    WHERE q.server = evoq_server_remove.name AND q.status IN ('pending', 'processing') AND q.action = 'delete';
    GET DIAGNOSTICS done = ROW_COUNT;
    UPDATE evolution_instances i SET instance_status = 'deleted', updated_at = clock_timestamp()
    WHERE i.server = evoq_server_remove.name AND i.instance_status = 'lost'
      AND EXISTS (SELECT 1 FROM evolution_instance_creation_queue q
                  WHERE q.user_id = i.user_id AND q.action = 'delete' AND q.status = 'completed');
    UPDATE evolution_instance_creation_queue q
    SET server = NULL, status = 'pending', attempts = 0, next_attempt_at = now(), updated_at = clock_timestamp()
    WHERE q.server = evoq_server_remove.name AND q.status IN ('pending', 'processing') AND q.action = 'create';
    GET DIAGNOSTICS replaced = ROW_COUNT;
    DELETE FROM evoq.reconcile_orphans o WHERE o.server = evoq_server_remove.name;
    DELETE FROM evoq.reconciles r WHERE r.server = evoq_server_remove.name;
    DELETE FROM evoq.servers s WHERE s.name = evoq_server_remove.name;
    PERFORM evoq._apply_requeue_requests();
    PERFORM evoq._wake_worker_at_commit();
    RETURN jsonb_build_object('removed', evoq_server_remove.name, 'instances_lost', jsonb_array_length(lost),
                              'creations_placed_again', replaced, 'deletions_done', done);
END
$$;
COMMENT ON FUNCTION evoq_server_remove(text, boolean) IS
    'Removes an Evolution API server that holds nothing; with force, its instances become lost and are created again elsewhere.';

-- 0.6.0: draining: the server takes no new instance; what it holds goes on (retries, QR
-- refreshes, state checks, deletions). false takes new instances again, and wakes the worker.
-- 0.7.0: move_unlinked also moves every instance on it that is not linked (connecting, close,
-- refused, expired) to the other servers, in the background (evoq_move's way, placed by free
-- capacity); linked (open) ones stay.
CREATE FUNCTION evoq_server_drain(name text, draining boolean DEFAULT true, move_unlinked boolean DEFAULT false)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$
DECLARE
    srv evoq.servers;
    moving integer := 0;
    room bigint;
    result jsonb;
BEGIN
    IF evoq_server_drain.draining IS NULL OR evoq_server_drain.move_unlinked IS NULL THEN
        RAISE EXCEPTION 'evoq_server_drain: draining and move_unlinked must be true or false, not NULL'
            USING ERRCODE = '22023', HINT = 'evoq_server_drain(name) drains; evoq_server_drain(name, false) ends it.';
    END IF;
    IF evoq_server_drain.move_unlinked AND NOT evoq_server_drain.draining THEN
        RAISE EXCEPTION 'evoq_server_drain: move_unlinked moves instances off a server that drains'
            USING ERRCODE = '22023', HINT = 'evoq_server_drain(name, move_unlinked => true) drains it and moves them.';
    END IF;
    UPDATE evoq.servers s SET draining = evoq_server_drain.draining, updated_at = now()
    WHERE s.name = evoq_server_drain.name
    RETURNING s.* INTO srv;
    result := evoq._server_changed(srv, evoq_server_drain.name);
    IF evoq_server_drain.draining THEN
        -- A move on its way here (still at its deletion) is placed afresh instead.
        UPDATE evolution_instance_creation_queue q SET move_to = '', updated_at = clock_timestamp()
        WHERE q.move_to = srv.name AND q.status IN ('pending', 'processing');
    END IF;
    IF evoq_server_drain.move_unlinked THEN
        -- Never more than the other servers have room for: a moved instance is deleted here
        -- first, and its user would be left with none (NULL: one of them is unbounded).
        SELECT CASE WHEN bool_or(s.capacity IS NULL) THEN NULL
                    ELSE sum(greatest(s.capacity - l.live, 0)) END
          INTO room
          FROM evoq.servers s JOIN evoq.server_load l ON l.name = s.name
         WHERE s.name <> srv.name AND NOT s.draining
           AND NOT EXISTS (SELECT 1 FROM evoq.circuit c WHERE c.server = s.name);
        IF NOT FOUND OR room = 0 OR NOT EXISTS (SELECT 1 FROM evoq.servers s WHERE s.name <> srv.name
                                                 AND NOT s.draining
                                                 AND NOT EXISTS (SELECT 1 FROM evoq.circuit c WHERE c.server = s.name)) THEN
            RAISE EXCEPTION 'evoq_server_drain: no other server takes new instances now, so none can move off %',
                            quote_literal(srv.name)
                USING ERRCODE = '55000',
                      HINT = 'evoq_servers shows why (full, draining, circuit open); evoq_server_add adds one. evoq_server_drain(name) alone drains without moving.';
        END IF;
        moving := evoq._queue_move(ARRAY(
            SELECT i.user_id FROM evolution_instances i
            WHERE i.server = srv.name AND i.instance_status IN ('connecting', 'close', 'refused', 'expired')
            ORDER BY i.instance_status = 'expired', i.created_at
            LIMIT room), '');
    END IF;
    RETURN result || jsonb_build_object('moving', moving);
END
$$;
COMMENT ON FUNCTION evoq_server_drain(text, boolean, boolean) IS
    'Stops (or, with false, resumes) new instances on an Evolution server; its own instances go on. move_unlinked moves those not linked to the other servers.';

-- 0.7.0: queues the moves of these users' instances: a deletion at their server (logout, then
-- delete), then a creation on move_to ('': placed afresh by free capacity). Only a user whose
-- instance was created and whose queue row is idle (its creation completed) is moved; returns
-- how many.
CREATE FUNCTION evoq._queue_move(user_ids uuid[], move_to text) RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$
DECLARE
    n integer;
BEGIN
    UPDATE evolution_instance_creation_queue q SET
        action = 'delete', status = 'pending', attempts = 0, request_id = gen_random_uuid(),
        next_attempt_at = now(), processed_at = NULL, error_message = NULL, error_kind = NULL,
        last_http_status = NULL, move_to = _queue_move.move_to, updated_at = clock_timestamp()
    FROM evolution_instances i
    WHERE q.user_id = ANY (user_ids) AND i.user_id = q.user_id
      AND q.status = 'completed' AND q.action = 'create' AND q.server = i.server
      AND i.instance_status IN ('connecting', 'open', 'close', 'refused', 'expired');
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM evoq._wake_worker_at_commit();
    END IF;
    RETURN n;
END
$$;
-- 0.7.0: moves a user's instance to another server: logged out and deleted where it is, created
-- on to_server (NULL: the other server with the most free capacity), and its next QR comes from
-- there. A linked (open) instance moves only with force: its phone is logged out, and its user
-- links again.
CREATE FUNCTION evoq_move(user_id uuid, to_server text DEFAULT NULL, force boolean DEFAULT false) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$
DECLARE
    inst record;
    qrow record;
    target text := evoq_move.to_server;
    why text;
BEGIN
    IF evoq_move.force IS NULL THEN
        RAISE EXCEPTION 'evoq_move: force must be true or false, not NULL'
            USING ERRCODE = '22023', HINT = 'Leave it out (false) to move only an instance that is not linked.';
    END IF;
    SELECT i.instance_name, i.instance_status, i.server INTO inst FROM evolution_instances i
    WHERE i.user_id = evoq_move.user_id;
    IF NOT FOUND OR inst.instance_status IN ('lost', 'deleted') THEN
        RAISE EXCEPTION 'evoq_move: user % has no instance to move', coalesce(evoq_move.user_id::text, 'NULL')
            USING ERRCODE = '55000',
                  HINT = 'Only an instance evoq created (evolution_instances) moves; a user still queued is placed when created.';
    END IF;
    SELECT q.status, q.action INTO qrow FROM evolution_instance_creation_queue q
    WHERE q.user_id = evoq_move.user_id FOR UPDATE;
    IF qrow.status IS DISTINCT FROM 'completed' OR qrow.action IS DISTINCT FROM 'create' THEN
        RAISE EXCEPTION 'evoq_move: user %''s instance is busy (its queue row is % %)', evoq_move.user_id,
                        coalesce(qrow.action, 'missing'), coalesce(qrow.status, '')
            USING ERRCODE = '55000', HINT = 'Move it once evoq_process_queue has finished with it (a creation, a deletion or a move).';
    END IF;
    IF inst.instance_status = 'open' AND NOT evoq_move.force THEN
        RAISE EXCEPTION 'evoq_move: user %''s instance is linked (open): a move logs the phone out', evoq_move.user_id
            USING ERRCODE = '55000',
                  HINT = 'Pass force => true to move it anyway: its user scans a new QR (or pairs again) from the new server.';
    END IF;
    IF target IS NOT NULL THEN
        IF NOT EXISTS (SELECT 1 FROM evoq.servers s WHERE s.name = target) THEN
            PERFORM evoq._no_such_server(target);
        END IF;
        IF target = inst.server THEN
            RAISE EXCEPTION 'evoq_move: user %''s instance is already on server %', evoq_move.user_id, quote_literal(target)
                USING ERRCODE = '22023', HINT = 'Name another server, or leave to_server out for the one with the most free capacity.';
        END IF;
        why := coalesce(evoq._server_full(target),
                        (SELECT format('server %s has its circuit open (%s)', c.server, c.cause)
                         FROM evoq.circuit c WHERE c.server = target));
        IF why IS NOT NULL THEN
            RAISE EXCEPTION 'evoq_move: % takes no new instance now: %', quote_literal(target), why
                USING ERRCODE = '55000', HINT = 'evoq_servers shows each server''s free slots; move to another.';
        END IF;
    ELSE
        -- the other server that takes new instances with the most free capacity (unbounded
        -- first), then the fewest claimed rows
        SELECT s.name INTO target FROM evoq.servers s
        WHERE s.name <> inst.server AND NOT s.draining
          AND NOT EXISTS (SELECT 1 FROM evoq.circuit c WHERE c.server = s.name)
          AND evoq._server_full(s.name) IS NULL
        ORDER BY s.capacity IS NOT NULL,
                 s.capacity - (SELECT l.live FROM evoq.server_load l WHERE l.name = s.name) DESC,
                 (SELECT count(*) FROM evolution_instance_creation_queue q
                  WHERE q.server = s.name AND q.status = 'processing' AND q.next_attempt_at > now()),
                 s.name
        LIMIT 1;
        IF target IS NULL THEN
            RAISE EXCEPTION 'evoq_move: no other server takes new instances now'
                USING ERRCODE = '55000', HINT = 'evoq_servers shows why (full, draining, circuit open); evoq_server_add adds one.';
        END IF;
    END IF;
    PERFORM evoq._queue_move(ARRAY[evoq_move.user_id], target);
    RETURN jsonb_build_object('user_id', evoq_move.user_id, 'instance', inst.instance_name, 'from', inst.server,
                              'to', target, 'status', 'moving');
END
$$;
COMMENT ON FUNCTION evoq_move(uuid, text, boolean) IS
    'Moves a user''s instance to another Evolution server: deleted where it is, created on to_server (NULL: the one with the most free capacity). A linked one only with force.';

-- The end of a run: remembered for evoq_status. 0.7.0: and each server's last error for
-- evoq_servers, from the run's summary (a server's own: "server" and "last_error"; several
-- servers' added up: each one's under "servers").
CREATE OR REPLACE FUNCTION evoq._record_run(job text, summary jsonb, last_error text) RETURNS void
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

CREATE OR REPLACE VIEW evoq_servers AS
SELECT
    l.name,
    -- everything up to the last '@' masked: a password with an unescaped '/' or '@' too
    regexp_replace(CASE WHEN l.name = 'default' THEN (SELECT s.api_url FROM evoq.settings s) ELSE v.api_url END,
                   '^([a-z][a-z0-9+.-]*://)?.*@', '\1***@', 'i') AS api_url,
    CASE WHEN EXISTS (SELECT 1 FROM evoq.circuit c WHERE c.server = l.name) THEN 'circuit_open'
         WHEN l.draining THEN 'draining'
         ELSE 'ok' END AS state,
    CASE WHEN l.name = 'default'
         THEN (SELECT coalesce(nullif(s.api_version, 'auto'), s.detected_version) FROM evoq.settings s)
         ELSE coalesce(nullif(v.api_version, 'auto'), v.detected_version)
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
    -- 0.7.0: the server's own (until then every server showed the last error of any)
    v.last_error,
    (SELECT c.opened_at FROM evoq.circuit c WHERE c.server = l.name)     AS circuit_opened_at,
    (SELECT c.cause FROM evoq.circuit c WHERE c.server = l.name)         AS circuit_cause,
    (SELECT c.trips FROM evoq.circuit c WHERE c.server = l.name)         AS circuit_trips,
    (SELECT c.next_probe_at FROM evoq.circuit c WHERE c.server = l.name) AS circuit_next_probe_at,
    (SELECT r.finished_at FROM evoq.reconciles r WHERE r.server = l.name AND r.summary IS NOT NULL) AS last_reconcile_at,
    (SELECT r.summary FROM evoq.reconciles r WHERE r.server = l.name) AS last_reconcile_summary,
    (SELECT count(*) FROM evoq.reconcile_orphans o WHERE o.server = l.name) AS orphans_waiting,
    v.last_error_at
FROM evoq.server_load l JOIN evoq.servers v ON v.name = l.name;

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
    -- 0.7.0: the circuit of the server `default` (evoq_servers shows every server's)
    CASE WHEN EXISTS (SELECT 1 FROM evoq.circuit WHERE server = 'default') THEN 'open' ELSE 'closed' END AS circuit,
    (SELECT opened_at FROM evoq.circuit WHERE server = 'default')     AS circuit_opened_at,
    (SELECT cause FROM evoq.circuit WHERE server = 'default')         AS circuit_cause,
    (SELECT next_probe_at FROM evoq.circuit WHERE server = 'default') AS circuit_next_probe_at,
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
       AND (i.webhook_set_at IS NULL
            OR i.webhook_set_at < greatest(s.webhook_changed_at,
                                           (SELECT v.webhook_changed_at FROM evoq.servers v WHERE v.name = i.server)))
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
    -- 0.6.0: creations waiting for room (untried, no attempt charged), and why (evoq_servers
    -- shows each server's load). 0.7.0: an unplaced one waits while no server takes new
    -- instances; one placed on a server, while that server is full or draining.
    count(*) FILTER (WHERE q.status = 'pending' AND q.action = 'create' AND q.attempts = 0
                     AND CASE WHEN q.server IS NULL
                              THEN (SELECT bool_and(l.full_reason IS NOT NULL) FROM evoq.server_load l)
                              ELSE (SELECT l.full_reason FROM evoq.server_load l WHERE l.name = q.server) IS NOT NULL END)
        AS waiting_for_room,
    -- (evoq._placement_blocked, inlined: a view's functions run with its reader's privileges)
    (SELECT CASE WHEN bool_and(l.full_reason IS NOT NULL) THEN string_agg(l.full_reason, '; ' ORDER BY l.name) END
     FROM evoq.server_load l) AS waiting_for_room_reason,
    -- 0.7.0: deliveries carrying one server's secret for an instance another server holds
    (SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM evoq.webhooks_misdirected) AS webhooks_misdirected
FROM evolution_instance_creation_queue q;

SELECT evoq_apply_policies();
