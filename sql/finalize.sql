-- evoq schema, part 2 (finalize): runs after every Rust function exists.

-- The trigger fires as whichever role inserts the profile (often one with no right to the queue),
-- so it runs as the extension owner, with a pinned search_path.
ALTER FUNCTION handle_profile_evolution_instance() SECURITY DEFINER SET search_path = pg_catalog, @extschema@, pg_temp;
ALTER FUNCTION handle_profile_evolution_instance_delete() SECURITY DEFINER SET search_path = pg_catalog, @extschema@, pg_temp;

-- evoq_attach takes a regclass, so a missing table is reported by Postgres itself. SECURITY
-- DEFINER so that GRANT EXECUTE on it is all a role needs; attach_trigger checks that the calling
-- role may create triggers on that table itself.
-- 0.5.0: phone_column, the profiles table's column with the user's WhatsApp number: the create
-- carries it, so the first pairing code comes with the instance.
CREATE FUNCTION evoq_attach(tbl regclass, user_id_column name DEFAULT 'id', phone_column name DEFAULT NULL) RETURNS text
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$ SELECT evoq.attach_trigger_with_phone(tbl::oid, user_id_column::text, phone_column::text) $$;
COMMENT ON FUNCTION evoq_attach(regclass, name, name) IS
    'Creates the triggers on_profile_created_create_evolution_instance (AFTER INSERT: queue the user, with the number of phone_column if given) and on_profile_deleted_delete_evolution_instance (AFTER DELETE: deprovision) on the profiles table.';

CREATE FUNCTION evoq_detach(tbl regclass) RETURNS text
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$ SELECT evoq.detach_trigger(tbl::oid) $$;

-- The webhook endpoint: ONE UNNAMED jsonb parameter, the shape PostgREST hands a raw JSON body
-- to (every other shape makes each key of the body a named argument, and a delivery's keys name
-- no parameter: 404 PGRST202). SQL callers call it positionally, as always.
CREATE FUNCTION evoq_webhook(jsonb) RETURNS jsonb
LANGUAGE sql STRICT SECURITY DEFINER
SET search_path = pg_catalog, @extschema@, pg_temp
AS $$ SELECT evoq._webhook($1) $$;

COMMENT ON FUNCTION evoq_configure(text, text, text, text[], text, text, jsonb, boolean) IS
    'Stores the Evolution API URL, key and webhook (with its secret). The key is readable by no ordinary role and never printed.';
COMMENT ON FUNCTION evoq_process_queue() IS
    'Claims due queue rows, creates their Evolution instances, records the results; returns a jsonb summary.';
COMMENT ON FUNCTION evoq_refresh_qr() IS
    'Refreshes the QR of every connecting instance and marks scanned ones open; returns a jsonb summary.';
COMMENT ON FUNCTION evoq_retry(uuid) IS 'Puts failed queue rows (all, or one user''s) back to pending.';
COMMENT ON FUNCTION evoq_webhook(jsonb) IS
    'Applies one Evolution API webhook delivery (checks the webhook secret first). Point the instances'' webhook at it, e.g. through PostgREST: /rest/v1/rpc/evoq_webhook.';
COMMENT ON FUNCTION evoq_reconnect(uuid) IS
    'Re-arms a user''s instance (close, refused, expired or connecting): a new QR window. Callable by that user for their own instance.';
COMMENT ON FUNCTION evoq_deprovision(uuid) IS
    'Deletes a user''s instance at the Evolution API (log out, then delete), or cancels its creation if never tried.';
COMMENT ON FUNCTION evoq_link_with_phone(text) IS
    'Link with phone number for the signed-in user: asks for a pairing code (the user types it into WhatsApp) instead of a QR. The number is kept only until the Evolution API has it.';
COMMENT ON FUNCTION evoq_link_with_phone(uuid, text) IS
    'Link with phone number for a user (the operator''s form; a signed-in user may call it for their own id).';

-- 0.4.0: the view moved here from the schema part: it reads the worker's state from shared
-- memory through a Rust function, which exists only once the schema part has run.
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
REVOKE ALL ON evoq_status FROM PUBLIC;
COMMENT ON VIEW evoq_status IS 'Queue counts per state, oldest pending age, last runs and last error. Grant it to your operators.';

-- 0.6.0: one row per Evolution server, for operators (revoked from PUBLIC and granted like
-- evoq_status). The URL with any credentials in it masked; never the key.
CREATE VIEW evoq_servers AS
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
REVOKE ALL ON evoq_servers FROM PUBLIC;
COMMENT ON VIEW evoq_servers IS
    'One row per Evolution API server: state (ok, circuit_open, draining), capacity, live instances, free slots, circuit and last reconcile. Never the key.';

-- 0.6.0: what evoq_server_set and evoq_server_drain end with: the error for a name no row has
-- (srv is all NULL), else a wake for the worker (there may be room now) and the server's row.
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

-- Privileges and policies: nothing is executable by PUBLIC but evoq_current_user_id (RLS calls it)
-- and evoq_instance_name (a user's instance name and the deployment's namespace),
-- whatever default privileges granted (see evoq_apply_policies). Grant the rest to your service
-- role explicitly (the SECURITY DEFINER ones then work without table privileges).
SELECT evoq_apply_policies();
