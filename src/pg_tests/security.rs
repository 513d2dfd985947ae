//! pg_tests: Privileges and row level security, on plain PostgreSQL and on a Supabase-like database.
//! Each test runs in its own rolled-back transaction against its own mock Evolution API.

#[pgrx::pg_schema]
mod tests {
    use crate::testing::*;

    use pgrx::prelude::*;

    #[pg_test]
    fn ordinary_roles_get_nothing() {
        run("CREATE ROLE evoq_nobody");
        run("SET LOCAL ROLE evoq_nobody");
        for sql in [
            "SELECT evoq_configure('http://x:1', 'k')",
            "SELECT evoq_process_queue()",
            "SELECT evoq_refresh_qr()",
            "SELECT evoq_schedule()",
            "SELECT evoq_retry()",
            "SELECT * FROM evoq.settings",
            "SELECT * FROM evoq.instance_tokens",
            "SELECT * FROM evoq_status",
            "SELECT * FROM evolution_instance_creation_queue",
        ] {
            let err = error_of(sql).unwrap_or_else(|| panic!("{sql} was allowed"));
            assert!(err.starts_with("42501"), "{sql}: {err}");
        }
        run("RESET ROLE");
    }

    /// PostgreSQL's rule for SECURITY DEFINER functions ("Writing SECURITY DEFINER Functions
    /// Safely"): a search_path that does not name pg_temp searches it FIRST, so any role allowed
    /// to create a temporary table could shadow what the function reads. Every function of the
    /// extension (SECURITY DEFINER ones, the triggers', the worker's and the jobs' helpers alike)
    /// pins its search_path with pg_temp last.
    #[pg_test]
    fn every_function_pins_its_search_path_with_pg_temp_last() {
        let offenders = one::<String>(
            "SELECT string_agg(p.oid::regprocedure::text || ' ' || coalesce(array_to_string(p.proconfig, ';'), '(none)'), ', ')
             FROM pg_proc p JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
             JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'evoq'
             WHERE p.pronamespace::regnamespace::text <> 'tests' -- the test build's own functions
               AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) c
                               WHERE c LIKE 'search_path=%' AND c ~ '(^search_path=|, )pg_temp$')",
        );
        assert_eq!(offenders, None, "functions without pg_temp last");
        assert!(count("SELECT count(*) FROM pg_proc p JOIN pg_depend d ON d.objid = p.oid AND d.deptype = 'e' WHERE p.prosecdef") > 10);
    }

    /// The attack of 0.4.0: a signed-in user's temporary table named like evoq's made the
    /// ownership check ("may the caller update evolution_instances?") look at the attacker's own
    /// table, and evoq_deprovision queued the deletion of someone else's instance.
    #[pg_test]
    fn a_temporary_table_cannot_pass_the_ownership_check() {
        let mock = mock();
        let (victim, _) = created_instance(&mock);
        supabase_like();
        run("GRANT TEMPORARY ON DATABASE pgrx_tests TO authenticated");
        run("SET LOCAL ROLE authenticated");
        run("SELECT set_config('request.jwt.claims', '{\"sub\": \"00000000-0000-4000-8000-0000000000aa\"}', true)");
        run("CREATE TEMP TABLE evolution_instances (user_id uuid, instance_name text)");
        run("CREATE TEMP TABLE evolution_instance_creation_queue (user_id uuid)");
        for f in ["evoq_deprovision", "evoq_reconnect"] {
            let e = error_of(&format!("SELECT {f}('{victim}')"))
                .unwrap_or_else(|| panic!("{f} let a temporary table vouch for the caller"));
            assert!(
                e.starts_with(&format!("42501: {f}: only the user themselves")),
                "{e}"
            );
        }
        run("RESET ROLE");
        assert_eq!(
            one::<String>(&format!(
                "SELECT action FROM public.evolution_instance_creation_queue WHERE user_id = '{victim}'"
            ))
            .as_deref(),
            Some("create")
        );
        assert_eq!(count("SELECT count(*) FROM evoq.requeue_requests"), 0);
    }

    /// Counts the rows `sql` returns for `role` signed in as `sub`; the count goes through the temp
    /// table `evoq_out` (created by the test, writable by every role) because the role may not be
    /// allowed to see what a plain SELECT would return.
    fn as_user(role: &str, sub: Option<&str>, sql: &str) -> Result<i64, String> {
        run(&format!("SET LOCAL ROLE {role}"));
        let claims = sub
            .map(|s| format!("{{\"sub\":\"{s}\",\"role\":\"{role}\"}}"))
            .unwrap_or_default();
        Spi::run_with_args(
            "SELECT set_config('request.jwt.claims', $1, true)",
            &[claims.into()],
        )
        .unwrap();
        let result = match error_of(&format!(
            "INSERT INTO pg_temp.evoq_out SELECT count(*) FROM ({sql}) x"
        )) {
            Some(e) => Err(e),
            None => Ok(count(
                "SELECT n FROM pg_temp.evoq_out ORDER BY ctid DESC LIMIT 1",
            )),
        };
        run("RESET ROLE");
        result
    }

    #[pg_test]
    fn rls_matrix_on_a_supabase_like_database() {
        supabase_like();
        assert_eq!(count("SELECT count(*) FROM pg_policies WHERE tablename = 'evolution_instance_creation_queue' AND policyname IN ('Service role can manage evolution instance queue', 'Users can view their own queue status')"), 2);
        let (a, b) = (
            "11111111-1111-1111-1111-111111111111",
            "22222222-2222-2222-2222-222222222222",
        );
        run(&format!(
            "INSERT INTO evolution_instance_creation_queue (user_id) VALUES ('{a}'), ('{b}')"
        ));
        run(&format!("INSERT INTO evolution_instances (user_id, instance_name) VALUES ('{a}', 'evoq_a'), ('{b}', 'evoq_b')"));
        run("CREATE TEMP TABLE evoq_out AS SELECT 0::bigint AS n; GRANT ALL ON evoq_out TO PUBLIC");
        let q = "SELECT * FROM evolution_instance_creation_queue";
        let i = "SELECT * FROM evolution_instances";
        assert_eq!(as_user("authenticated", Some(a), q), Ok(1));
        assert_eq!(
            as_user(
                "authenticated",
                Some(a),
                &format!("{q} WHERE user_id = '{b}'")
            ),
            Ok(0)
        );
        assert_eq!(as_user("authenticated", Some(b), i), Ok(1));
        assert_eq!(as_user("authenticated", None, q), Ok(0));
        assert_eq!(as_user("service_role", None, q), Ok(2));
        assert_eq!(as_user("service_role", None, i), Ok(2));
        // evoq_status calls evoq's own functions (the worker's state, _is_ours) as the reader.
        assert_eq!(
            as_user(
                "service_role",
                None,
                "SELECT * FROM evoq_status WHERE worker_loaded IS NOT NULL AND webhooks_to_repoint >= 0"
            ),
            Ok(1)
        );
        assert!(
            as_user("authenticated", Some(a), "SELECT * FROM evoq_status")
                .unwrap_err()
                .starts_with("42501")
        );
        assert!(as_user("anon", None, q).unwrap_err().starts_with("42501"));
        assert!(as_user("anon", None, i).unwrap_err().starts_with("42501"));
        // A user cannot change or delete rows, not even their own.
        run(&format!("SET LOCAL ROLE authenticated; SELECT set_config('request.jwt.claims', '{{\"sub\":\"{a}\"}}', true)"));
        assert!(
            error_of("UPDATE evolution_instance_creation_queue SET status = 'completed'")
                .unwrap()
                .starts_with("42501")
        );
        assert!(error_of("DELETE FROM evolution_instances")
            .unwrap()
            .starts_with("42501"));
        assert!(error_of("SELECT * FROM evoq.instance_tokens")
            .unwrap()
            .starts_with("42501"));
        run("RESET ROLE");
        assert_eq!(
            count(
                "SELECT count(*) FROM evolution_instance_creation_queue WHERE status = 'completed'"
            ),
            0
        );
    }

    #[pg_test]
    fn rls_on_plain_postgres_uses_the_jwt_claims() {
        assert_eq!(
            one::<String>("SELECT evoq_apply_policies()").unwrap(),
            "postgres"
        );
        run("CREATE ROLE evoq_web_user");
        run("GRANT SELECT ON evolution_instance_creation_queue, evolution_instances TO evoq_web_user");
        let (a, b) = (
            "11111111-1111-1111-1111-111111111111",
            "22222222-2222-2222-2222-222222222222",
        );
        run(&format!(
            "INSERT INTO evolution_instance_creation_queue (user_id) VALUES ('{a}'), ('{b}')"
        ));
        run("CREATE TEMP TABLE evoq_out AS SELECT 0::bigint AS n; GRANT ALL ON evoq_out TO PUBLIC");
        assert_eq!(
            as_user(
                "evoq_web_user",
                Some(a),
                "SELECT * FROM evolution_instance_creation_queue"
            ),
            Ok(1)
        );
        assert_eq!(
            as_user(
                "evoq_web_user",
                None,
                "SELECT * FROM evolution_instance_creation_queue"
            ),
            Ok(0)
        );
        assert_eq!(
            as_user(
                "evoq_web_user",
                Some("not-a-uuid"),
                "SELECT * FROM evolution_instance_creation_queue"
            ),
            Ok(0)
        );
    }
}
