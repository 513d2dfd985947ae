//! pg_tests: Concurrent runs, cancels, terminated backends and pg_cron firing for real (these commit through dblink).
//! Each test runs in its own rolled-back transaction against its own mock Evolution API.

#[pgrx::pg_schema]
mod tests {
    use crate::testing::*;
    use evolution_mock::FaultKind;
    use pgrx::prelude::*;
    use serde_json::Value;
    use std::time::{Duration, Instant};

    #[pg_test]
    fn concurrent_runs_create_each_instance_exactly_once() {
        for sessions in [2usize, 4] {
            clean_committed();
            let mock = mock();
            mock.set_latency_ms(2);
            committed_configure(&mock, "");
            committed_queue(200);
            let results = concurrently(
                sessions,
                "SET evoq.batch_size = 20; SET evoq.concurrency = 4",
                "SELECT evoq_process_queue()",
            );
            let created: i64 = results
                .iter()
                .map(|r| {
                    serde_json::from_str::<Value>(r)
                        .unwrap_or_else(|_| panic!("session failed: {r}"))["created"]
                        .as_i64()
                        .unwrap()
                })
                .sum();
            assert_eq!(created, 200, "{results:?}");
            assert_eq!(
                mock.count_calls("POST", "/instance/create"),
                200,
                "one create per user"
            );
            assert_eq!(mock.instance_names().len(), 200);
            assert_eq!(count("SELECT count(*) FROM evolution_instance_creation_queue WHERE status = 'completed' AND retry_count = 0"), 200);
            assert_eq!(
                count("SELECT count(DISTINCT instance_name) FROM evolution_instances"),
                200
            );

            // Refresh: every instance once per round, never twice.
            let results = concurrently(
                sessions,
                "SET evoq.batch_size = 20; SET evoq.concurrency = 4",
                "SELECT evoq_refresh_qr()",
            );
            let checked: i64 = results
                .iter()
                .map(|r| {
                    serde_json::from_str::<Value>(r).unwrap()["checked"]
                        .as_i64()
                        .unwrap()
                })
                .sum();
            assert_eq!(checked, 200, "{results:?}");
            assert_eq!(mock.count_calls("GET", "/instance/connect/"), 200);
        }
        clean_committed();
    }

    #[pg_test]
    fn a_cancel_stops_a_run_promptly_and_loses_nothing() {
        clean_committed();
        let mock = mock();
        mock.add_fault(fault("POST", "/instance/create", FaultKind::Hang, None));
        committed_configure(&mock, "");
        committed_queue(10);
        // statement_timeout fires while every worker waits on a hanging server with a 60 s timeout.
        let started = Instant::now();
        let results = concurrently(
            1,
            "SET evoq.request_timeout_ms = 60000; SET evoq.concurrency = 8; SET statement_timeout = '1s'",
            "SELECT evoq_process_queue()",
        );
        let took = started.elapsed();
        assert!(results[0].contains("statement timeout"), "{results:?}");
        assert!(took < Duration::from_secs(5), "cancel took {took:?}");
        // The claimed rows were rolled back: all due again, nothing stuck in processing.
        assert_eq!(count("SELECT count(*) FROM evolution_instance_creation_queue WHERE status = 'pending' AND attempts = 0"), 10);

        // The same with pg_cancel_backend from another session.
        let pid = start_in_session(
            "evoq_cancelled",
            "SET evoq.request_timeout_ms = 60000",
            "SELECT evoq_process_queue()",
        );
        wait_for_calls(&mock, "POST", "/instance/create", 18);
        let started = Instant::now();
        assert_eq!(
            one::<bool>(&format!("SELECT pg_cancel_backend({pid})")),
            Some(true)
        );
        let err = finish_session("evoq_cancelled");
        let took = started.elapsed();
        assert!(
            err.contains("canceling statement due to user request"),
            "{err}"
        );
        assert!(took < Duration::from_secs(5), "cancel took {took:?}");
        assert_eq!(count("SELECT count(*) FROM evolution_instance_creation_queue WHERE status = 'pending' AND attempts = 0"), 10);
        // The next run adopts whatever the abandoned calls created and creates the rest.
        mock.clear_faults();
        let results = concurrently(1, "", "SELECT evoq_process_queue()");
        let summary: Value =
            serde_json::from_str(&results[0]).unwrap_or_else(|_| panic!("{results:?}"));
        assert_eq!(summary["claimed"], 10, "{summary}");
        assert_eq!(
            count(
                "SELECT count(*) FROM evolution_instance_creation_queue WHERE status = 'completed'"
            ),
            10
        );
        assert_eq!(mock.instance_names().len(), 10);
        clean_committed();
    }

    #[pg_test]
    fn a_terminated_backend_mid_batch_leaves_exactly_one_instance_per_user() {
        clean_committed();
        let mock = mock();
        mock.set_latency_ms(100);
        committed_configure(&mock, "");
        committed_queue(30);
        let pid = start_in_session(
            "evoq_victim",
            "SET evoq.concurrency = 4; SET evoq.batch_size = 8",
            "SELECT evoq_process_queue()",
        );
        // Let it get some creates through, then kill it mid-batch.
        wait_for_calls(&mock, "POST", "/instance/create", 10);
        assert_eq!(
            one::<bool>(&format!("SELECT pg_terminate_backend({pid}, 10000)")),
            Some(true)
        );
        // The connection died with its backend: just forget it.
        let _ = error_of("SELECT dblink_disconnect('evoq_victim')");
        assert!(mock.count_calls("POST", "/instance/create") >= 10);
        assert_eq!(
            count(
                "SELECT count(*) FROM evolution_instance_creation_queue WHERE status <> 'pending'"
            ),
            0
        );
        mock.set_latency_ms(0);
        let results = concurrently(1, "", "SELECT evoq_process_queue()");
        let summary: Value =
            serde_json::from_str(&results[0]).unwrap_or_else(|_| panic!("{results:?}"));
        assert_eq!(summary["claimed"], 30, "{summary}");
        assert!(summary["adopted"].as_i64().unwrap() >= 1, "{summary}");
        assert_eq!(
            count(
                "SELECT count(*) FROM evolution_instance_creation_queue WHERE status = 'completed'"
            ),
            30
        );
        assert_eq!(
            mock.instance_names().len(),
            30,
            "exactly one instance per user at the server"
        );
        assert_eq!(count("SELECT count(*) FROM evolution_instances"), 30);
        clean_committed();
    }

    /// Runs SQL committed, over dblink, as `role` (the test cluster trusts local connections).
    fn committed_as(role: &str, sql: &str) {
        let conninfo = one::<String>(&format!(
            "SELECT format('host=localhost port=%s dbname=%s user={role}', current_setting('port'), current_database())"
        ))
        .unwrap();
        Spi::run_with_args("SELECT dblink_exec($1, $2)", &[conninfo.into(), sql.into()])
            .unwrap_or_else(|e| panic!("as {role}: {sql}: {e}"));
    }

    /// The end-to-end path with a real pg_cron job: schedule, sign up, wait for the tick. The
    /// jobs are scheduled by an ordinary role with CREATE on the database, which also plants
    /// functions named like evoq's in a schema of its own name, first in its search_path
    /// ("$user"): 0.4.0's unqualified job commands ran those, as the extension's owner.
    #[pg_test]
    fn pg_cron_fires_the_job_and_an_instance_appears() {
        clean_committed();
        let mock = mock();
        committed("CREATE EXTENSION IF NOT EXISTS pg_cron");
        committed_configure(&mock, "");
        committed(
            "DO $$ BEGIN
                DROP SCHEMA IF EXISTS evoq_scheduler CASCADE;
                IF to_regrole('evoq_scheduler') IS NULL THEN CREATE ROLE evoq_scheduler LOGIN; END IF;
                GRANT CREATE ON DATABASE pgrx_tests TO evoq_scheduler;
                GRANT USAGE ON SCHEMA cron TO evoq_scheduler;
                GRANT EXECUTE ON FUNCTION evoq_schedule(text, text), evoq_unschedule(),
                                          evoq_process_queue(), evoq_refresh_qr() TO evoq_scheduler;
                CREATE TABLE public.committed_profiles (id uuid PRIMARY KEY);
                PERFORM evoq_attach('public.committed_profiles');
             END $$",
        );
        committed_as(
            "evoq_scheduler",
            "DO $$ BEGIN
                CREATE SCHEMA evoq_scheduler;
                CREATE TABLE evoq_scheduler.hijacked (who text, superuser text);
                CREATE FUNCTION evoq_scheduler.evoq_process_queue() RETURNS jsonb LANGUAGE sql AS
                  $f$ INSERT INTO evoq_scheduler.hijacked VALUES (current_user, current_setting('is_superuser')) RETURNING '{}'::jsonb $f$;
                CREATE FUNCTION evoq_scheduler.evoq_refresh_qr() RETURNS jsonb LANGUAGE sql AS
                  $f$ INSERT INTO evoq_scheduler.hijacked VALUES (current_user, current_setting('is_superuser')) RETURNING '{}'::jsonb $f$;
                PERFORM evoq_schedule(process_schedule => '* * * * *', refresh_schedule => '* * * * *');
             END $$",
        );
        committed("INSERT INTO public.committed_profiles VALUES (gen_random_uuid())");
        // The verification queries of the original setup guide; the jobs belong to the role that
        // scheduled them and name evoq's schema.
        assert_eq!(count("SELECT count(*) FROM cron.job WHERE jobname = 'process-evolution-queue' AND active AND schedule = '* * * * *' AND command = 'SELECT public.evoq_process_queue()' AND username = 'evoq_scheduler'"), 1);
        assert_eq!(count("SELECT count(*) FROM cron.job WHERE jobname = 'refresh-qr-codes' AND active AND command = 'SELECT public.evoq_refresh_qr()' AND username = 'evoq_scheduler'"), 1);
        assert_eq!(
            count(&format!(
                "SELECT count(*) FROM cron.job WHERE command LIKE '%{API_KEY}%'"
            )),
            0
        );

        let deadline = Instant::now() + Duration::from_secs(150);
        loop {
            let done = count("SELECT count(*) FROM evolution_instances WHERE qr_text IS NOT NULL");
            if done == 1 || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        assert_eq!(
            count(
                "SELECT count(*) FROM evolution_instance_creation_queue WHERE status = 'completed'"
            ),
            1
        );
        assert_eq!(count("SELECT count(*) FROM evolution_instances"), 1);
        assert_eq!(mock.count_calls("POST", "/instance/create"), 1);
        assert!(count("SELECT count(*) FROM cron.job_run_details d JOIN cron.job j USING (jobid) WHERE j.jobname = 'process-evolution-queue' AND d.status = 'succeeded'") >= 1);
        assert!(count("SELECT count(*) FROM cron.job_run_details d JOIN cron.job j USING (jobid) WHERE j.jobname = 'refresh-qr-codes' AND d.status = 'succeeded'") >= 1);
        assert_eq!(
            count("SELECT count(*) FROM cron.job_run_details WHERE status = 'failed'"),
            0
        );
        assert_eq!(count(&format!("SELECT count(*) FROM cron.job_run_details WHERE command LIKE '%{API_KEY}%' OR return_message LIKE '%{API_KEY}%'")), 0);

        // Read over a connection of its own: a lock this transaction took on the table would
        // keep the DROP SCHEMA below (committed, over dblink) waiting for the test itself.
        assert_eq!(
            one::<i64>(&format!(
                "SELECT n FROM dblink('{}', 'SELECT count(*) FROM evoq_scheduler.hijacked') AS t(n bigint)",
                self_conninfo()
            )),
            Some(0),
            "a job ran the scheduling role's look-alike function"
        );
        // The role that scheduled the jobs sees and removes them itself.
        committed_as(
            "evoq_scheduler",
            "DO $$ BEGIN IF evoq_unschedule() <> 2 THEN RAISE 'evoq_unschedule did not find both jobs'; END IF; END $$",
        );
        assert_eq!(count("SELECT count(*) FROM cron.job WHERE jobname IN ('process-evolution-queue', 'refresh-qr-codes')"), 0);
        committed("DROP SCHEMA evoq_scheduler CASCADE");
        // pg_cron stays: this transaction has read cron.job, so dropping it from a second session
        // would wait for us while we wait for it.
        committed("DROP TABLE public.committed_profiles");
        clean_committed();
    }
}
