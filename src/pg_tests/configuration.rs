//! pg_tests: Schema, configuration, settings and pg_cron scheduling.
//! Each test runs in its own rolled-back transaction against its own mock Evolution API.

#[pgrx::pg_schema]
mod tests {
    use crate::testing::*;

    use pgrx::prelude::*;

    #[pg_test]
    fn schema_is_in_place() {
        assert_eq!(count("SELECT count(*) FROM pg_indexes WHERE indexname = 'evolution_instance_creation_queue_status_created_at_idx'"), 1);
        assert_eq!(one::<bool>("SELECT relrowsecurity FROM pg_class WHERE oid = 'evolution_instance_creation_queue'::regclass"), Some(true));
        assert_eq!(
            one::<bool>(
                "SELECT relrowsecurity FROM pg_class WHERE oid = 'evolution_instances'::regclass"
            ),
            Some(true)
        );
        // pg_dump keeps the data of these tables (and sequences); 0.6.0: the reconciler's two
        // and evoq.servers; 0.7.0: the webhooks_misdirected counter.
        assert_eq!(
            count("SELECT cardinality(extconfig) FROM pg_extension WHERE extname = 'evoq'"),
            20
        );
        assert_eq!(
            count("SELECT count(*) FROM pg_extension, unnest(extconfig) c WHERE extname = 'evoq' AND c = 'evoq.webhooks_misdirected'::regclass"),
            1
        );
        assert!(error_of("INSERT INTO evolution_instance_creation_queue (user_id, status) VALUES (gen_random_uuid(), 'bogus')").unwrap().starts_with("23514"));
        assert_eq!(
            one::<String>("SELECT evoq_instance_name('0f8fad5b-d9cb-469f-a165-70867728950e')")
                .unwrap(),
            format!(
                "evoq_{}_0f8fad5bd9cb469fa16570867728950e",
                one::<String>("SELECT evoq._default_namespace()").unwrap()
            )
        );
    }

    #[pg_test]
    fn configure_rejects_bad_input_and_changes_nothing() {
        run("DELETE FROM evoq.settings");
        for (sql, needle) in [
            (
                "SELECT evoq_configure('', 'k')",
                "api_url must not be empty",
            ),
            (
                "SELECT evoq_configure('ftp://evo:8080', 'k')",
                "api_url must be an http:// or https:// URL",
            ),
            ("SELECT evoq_configure('http://', 'k')", "api_url must be"),
            (
                "SELECT evoq_configure('http://evo:8080', '')",
                "api_key must not be empty",
            ),
            (
                "SELECT evoq_configure('http://evo:8080', '   ')",
                "api_key must not be empty",
            ),
            (
                "SELECT evoq_configure('http://evo:8080', 'k', webhook_url => 'not a url')",
                "webhook_url must",
            ),
            (
                "SELECT evoq_configure('http://evo:8080', 'k', webhook_events => ARRAY['NOPE'])",
                "unknown webhook event",
            ),
            (
                "SELECT evoq_configure('http://evo:8080', 'k', api_version => 'v3')",
                "api_version must be",
            ),
        ] {
            let err = error_of(sql).unwrap_or_else(|| panic!("{sql} succeeded"));
            assert!(
                err.starts_with("22023: ") && err.contains(needle),
                "{sql}: {err}"
            );
            assert!(err.contains("HINT: "), "{sql} has no hint: {err}");
        }
        assert_eq!(count("SELECT count(*) FROM evoq.settings"), 0);
        let out = json("SELECT evoq_configure('http://evo:8080/', 'secret-key')");
        assert_eq!(out["api_url"], "http://evo:8080");
        assert!(!out.to_string().contains("secret-key"));
    }

    #[pg_test]
    fn tunables_are_bounded_gucs() {
        assert!(error_of("SET evoq.concurrency = 0")
            .unwrap()
            .contains("0 is outside the valid range"));
        assert!(error_of("SET evoq.concurrency = 100000")
            .unwrap()
            .contains("outside the valid range"));
        let err = error_of("SET evoq.batch_size = -1").unwrap();
        assert!(
            err.starts_with("22023")
                && err.contains("-1 is outside the valid range for parameter \"evoq.batch_size\""),
            "{err}"
        );
        run("SET LOCAL evoq.concurrency = 64");
        assert_eq!(one::<String>("SHOW evoq.concurrency").unwrap(), "64");
    }

    #[pg_test]
    fn schedule_without_pg_cron_says_what_to_install() {
        if count("SELECT count(*) FROM pg_extension WHERE extname = 'pg_cron'") > 0 {
            run("DROP EXTENSION pg_cron");
        }
        let err = error_of("SELECT evoq_schedule()").unwrap();
        assert!(
            err.contains("pg_cron is not installed") && err.contains("shared_preload_libraries"),
            "{err}"
        );
    }

    #[pg_test]
    fn a_schedule_pg_cron_refuses_gets_evoqs_error_and_hint() {
        run("CREATE EXTENSION IF NOT EXISTS pg_cron");
        let err = error_of("SELECT evoq_schedule(process_schedule => 'every minute')").unwrap();
        assert!(
            err.starts_with("22023")
                && err.contains("pg_cron refused the schedule")
                && err.contains("HINT: Use a cron expression"),
            "{err}"
        );
        assert_eq!(
            count("SELECT count(*) FROM cron.job WHERE jobname = 'process-evolution-queue'"),
            0
        );
    }
}
