-- evoq schema, part 2 (finalize): runs after every Rust function exists.

-- The trigger fires as whichever role inserts the profile (often one with no right to the queue),
-- so it runs as the extension owner, with a pinned search_path.
ALTER FUNCTION handle_profile_evolution_instance() SECURITY DEFINER SET search_path = pg_catalog, @extschema@;
ALTER FUNCTION handle_profile_evolution_instance_delete() SECURITY DEFINER SET search_path = pg_catalog, @extschema@;

-- evoq_attach takes a regclass, so a missing table is reported by Postgres itself. SECURITY
-- DEFINER so that GRANT EXECUTE on it is all a role needs; attach_trigger checks that the calling
-- role may create triggers on that table itself.
CREATE FUNCTION evoq_attach(tbl regclass, user_id_column name DEFAULT 'id') RETURNS text
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, @extschema@
AS $$ SELECT evoq.attach_trigger(tbl::oid, user_id_column::text) $$;
COMMENT ON FUNCTION evoq_attach(regclass, name) IS
    'Creates the triggers on_profile_created_create_evolution_instance (AFTER INSERT: queue the user) and on_profile_deleted_delete_evolution_instance (AFTER DELETE: deprovision) on the profiles table.';

CREATE FUNCTION evoq_detach(tbl regclass) RETURNS text
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, @extschema@
AS $$ SELECT evoq.detach_trigger(tbl::oid) $$;

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

-- Privileges and policies: nothing is executable by PUBLIC but evoq_current_user_id (RLS calls it)
-- and evoq_instance_name (a user's instance name and the deployment's namespace),
-- whatever default privileges granted (see evoq_apply_policies). Grant the rest to your service
-- role explicitly (the SECURITY DEFINER ones then work without table privileges).
SELECT evoq_apply_policies();
