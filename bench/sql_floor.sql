-- The SQL part of a creation alone, no call made: what the queue's contract asks of the database
-- per creation (the claim's UPDATE of the queue row, then the record: the queue row again, the
-- evolution_instances row with its NOTIFY trigger, the token row), run through the very functions
-- the worker and evoq_process_queue() run. bench/run.sh prints its CPU beside theirs.
--   evoq_bench.claim_rows  rows per evoq._claim_queue call
--   evoq_bench.record_rows results per evoq._record_queue_results call
--   evoq_bench.commit_each on: commit after every record (the worker's way); off: one transaction
--                         (the SQL function's way)
-- The results are the ones a create answered with a QR yields (success_record in
-- src/jobs/process.rs), made here in SQL.
DO $$
DECLARE
    claim_size integer := current_setting('evoq_bench.claim_rows')::integer;
    group_size integer := current_setting('evoq_bench.record_rows')::integer;
    commit_each boolean := current_setting('evoq_bench.commit_each')::boolean;
    claimed jsonb;
    pending jsonb := '[]';
BEGIN
    LOOP
        claimed := evoq._claim_queue('default', claim_size, 600000);
        EXIT WHEN jsonb_array_length(claimed) = 0;
        pending := pending || (
            SELECT jsonb_agg(jsonb_build_object(
                'id', c->'id', 'instance_name', 'evoq_default_' || replace(c->>'user_id', '-', ''),
                'ok', true, 'action', 'create', 'paired', false,
                'instance_id', gen_random_uuid(), 'token', upper(gen_random_uuid()::text),
                'instance_status', 'connecting',
                'qr_code', 'data:image/png;base64,iVBORw0KGgo' || md5(c->>'id') || md5(c->>'user_id'),
                'qr_text', '2@' || md5(c->>'id') || ',' || md5(c->>'user_id'), 'qr_count', 1,
                'webhook_version', NULL, 'number', NULL, 'claimed_at', c->'claimed_at'))
            FROM jsonb_array_elements(claimed) c);
        IF jsonb_array_length(pending) >= group_size THEN
            PERFORM evoq._record_queue_results(pending);
            pending := '[]';
            IF commit_each THEN
                COMMIT;
            END IF;
        END IF;
    END LOOP;
    IF jsonb_array_length(pending) > 0 THEN
        PERFORM evoq._record_queue_results(pending);
    END IF;
END
$$;
