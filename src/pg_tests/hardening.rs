//! pg_tests for the 0.2.0 hardening (issue #9): each one fails on 0.1.0 for the reason its name
//! gives. Each test runs in its own rolled-back transaction against its own mock Evolution API;
//! the ones that need a second session commit through dblink and clean up after themselves.

#[pgrx::pg_schema]
mod tests {
    use crate::testing::*;
    use evolution_mock::{FaultKind, FaultRule};
    use pgrx::prelude::*;
    use serde_json::Value;
    use std::time::{Duration, Instant};

    fn reply_fault(method: &str, path: &str, code: u16, body: &str) -> FaultRule {
        fault(
            method,
            path,
            FaultKind::Reply {
                code,
                body: body.into(),
            },
            None,
        )
    }

    /// `GET /` calls only (the mock's count_calls matches a path prefix, and "/" is every path).
    fn probes(mock: &evolution_mock::MockServer) -> usize {
        mock.calls()
            .iter()
            .filter(|c| c["method"] == "GET" && c["path"] == "/")
            .count()
    }

    fn process() -> Value {
        json("SELECT evoq_process_queue()")
    }

    #[pg_test]
    fn supabase_default_privileges_let_no_api_role_wipe_or_reconfigure() {
        supabase_like();
        let user = "11111111-1111-1111-1111-111111111111";
        run(&format!(
            "INSERT INTO evolution_instance_creation_queue (user_id) VALUES ('{user}')"
        ));
        for role in ["authenticated", "anon", "service_role"] {
            run(&format!("SET LOCAL ROLE {role}"));
            Spi::run_with_args(
                "SELECT set_config('request.jwt.claims', $1, true)",
                &[format!("{{\"sub\":\"{user}\"}}").into()],
            )
            .unwrap();
            for sql in [
                "TRUNCATE evolution_instance_creation_queue",
                "TRUNCATE evolution_instances",
                "SELECT evoq_configure('http://attacker.example', 'k')",
                "SELECT evoq_retry()",
                "SELECT evoq_process_queue()",
                "SELECT evoq_attach('evolution_instances')",
                "CREATE TRIGGER t BEFORE UPDATE ON evolution_instance_creation_queue FOR EACH ROW EXECUTE FUNCTION suppress_redundant_updates_trigger()",
            ] {
                let err = error_of(sql).unwrap_or_else(|| panic!("{role} could run {sql}"));
                assert!(err.starts_with("42501"), "{role}: {sql}: {err}");
            }
            run("RESET ROLE");
        }
        assert_eq!(
            count("SELECT count(*) FROM evolution_instance_creation_queue"),
            1
        );
        // What each role is meant to have still works, and policies run auth.uid() once per
        // statement (an InitPlan), not once per row.
        run("SET LOCAL ROLE authenticated");
        assert_eq!(
            count("SELECT count(*) FROM evolution_instance_creation_queue"),
            1
        );
        run("RESET ROLE");
        let policy = one::<String>(
            "SELECT qual FROM pg_policies WHERE policyname = 'Users can view their own queue status'",
        )
        .unwrap();
        // 0.5.0: evoq_current_user_id(), which calls auth.uid() when it exists (a restore
        // creates the policies before auth.uid() is restored).
        assert!(policy.contains("SELECT evoq_current_user_id()"), "{policy}");
    }

    #[pg_test]
    fn plain_postgres_policies_call_the_user_function_once_per_statement() {
        assert_eq!(
            one::<String>("SELECT evoq_apply_policies()").unwrap(),
            "postgres"
        );
        let policy =
            one::<String>("SELECT qual FROM pg_policies WHERE tablename = 'evolution_instances'")
                .unwrap();
        assert!(policy.contains("( SELECT"), "{policy}");
        // Grants an operator made to a role of their own stay; TRUNCATE, TRIGGER and REFERENCES,
        // which RLS does not cover, are taken back.
        run("CREATE ROLE evoq_web");
        run("GRANT SELECT, TRUNCATE, TRIGGER ON evolution_instance_creation_queue TO evoq_web");
        one::<String>("SELECT evoq_apply_policies()");
        assert_eq!(
            one::<String>("SELECT concat_ws(',', has_table_privilege('evoq_web', 'evolution_instance_creation_queue', 'SELECT'),
                                  has_table_privilege('evoq_web', 'evolution_instance_creation_queue', 'TRUNCATE'),
                                  has_table_privilege('evoq_web', 'evolution_instance_creation_queue', 'TRIGGER'))").as_deref(),
            Some("t,f,f")
        );
        // No EXCEPTION block (a subtransaction per call) in the function.
        assert!(!one::<String>(
            "SELECT prosrc FROM pg_proc WHERE proname = 'evoq_current_user_id'"
        )
        .unwrap()
        .contains("EXCEPTION"));
    }

    #[pg_test]
    fn a_granted_role_can_attach_to_its_own_table_only() {
        run("CREATE ROLE evoq_app_owner");
        run("GRANT EXECUTE ON FUNCTION evoq_attach(regclass, name, name), evoq_detach(regclass) TO evoq_app_owner");
        run("GRANT CREATE, USAGE ON SCHEMA public TO evoq_app_owner");
        run("CREATE TABLE public.not_theirs (id uuid)");
        run("SET LOCAL ROLE evoq_app_owner");
        run("CREATE TABLE public.their_profiles (id uuid)");
        assert_eq!(
            error_of("SELECT evoq_attach('public.their_profiles')"),
            None
        );
        let err = error_of("SELECT evoq_attach('public.not_theirs')").unwrap();
        assert!(err.starts_with("42501") && err.contains("TRIGGER"), "{err}");
        run("RESET ROLE");
        assert_eq!(count("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.their_profiles'::regclass AND tgname = 'on_profile_created_create_evolution_instance'"), 1);
        assert_eq!(
            count("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.not_theirs'::regclass"),
            0
        );
    }

    #[pg_test]
    fn a_reinserted_profile_never_waits_on_a_running_job() {
        // Everything here commits through sessions of its own, so the test's own transaction
        // holds no lock the cleanup would wait for.
        clean_committed();
        let user = "33333333-3333-3333-3333-333333333333";
        committed(&format!(
            "DO $$ BEGIN
                CREATE TABLE public.committed_profiles (id uuid PRIMARY KEY);
                PERFORM evoq_attach('public.committed_profiles');
                INSERT INTO public.committed_profiles VALUES ('{user}');
             END $$"
        ));
        // A job holds the queue row, as a run does from its claim to its commit.
        start_in_session(
            "evoq_holder",
            "BEGIN",
            "SELECT evoq._claim_queue('default', 10, 60000)::text",
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while count(&format!(
            "SELECT count(*) FROM evolution_instance_creation_queue WHERE user_id = '{user}' AND status = 'processing'"
        )) == 0
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        // The same user's profile again (after a delete; or in a second attached table), from
        // an app whose statements may wait half a second at most.
        let started = Instant::now();
        let insert = format!(
            "SELECT dblink_exec('{}', $s$DO $d$ BEGIN SET LOCAL lock_timeout = '500ms';
                DELETE FROM public.committed_profiles;
                INSERT INTO public.committed_profiles VALUES ('{user}'); END $d$$s$)",
            self_conninfo()
        );
        assert_eq!(error_of(&insert), None, "the profile insert failed");
        assert!(
            started.elapsed() < Duration::from_millis(450),
            "it waited {:?}",
            started.elapsed()
        );
        assert_eq!(
            count("SELECT count(*) FROM evoq.requeue_requests WHERE reason = 'reinserted'"),
            1
        );
        let _ = finish_session("evoq_holder");
        // Once no job holds the row, the next run applies it: a new request, retry_count + 1.
        committed("DO $$ BEGIN PERFORM evoq._apply_requeue_requests(); END $$");
        let row = json("SELECT to_jsonb(q) FROM evolution_instance_creation_queue q");
        assert_eq!(row["retry_count"], 1, "{row}");
        assert_eq!(row["status"], "pending", "{row}");
        assert_eq!(count("SELECT count(*) FROM evoq.requeue_requests"), 0);
        clean_committed();
    }

    #[pg_test]
    fn a_renamed_user_id_column_is_counted_and_stops_the_next_run() {
        let mock = mock();
        configure(&mock);
        profiles();
        run("ALTER TABLE public.profiles RENAME COLUMN id TO user_uuid");
        run("INSERT INTO public.profiles (user_uuid, email) VALUES (gen_random_uuid(), 'x@example.com')");
        assert_eq!(
            count("SELECT count(*) FROM evolution_instance_creation_queue"),
            0
        );
        assert_eq!(count("SELECT profiles_skipped FROM evoq_status"), 1);
        let err = error_of("SELECT evoq_process_queue()").unwrap();
        assert!(
            err.starts_with("55000")
                && err.contains("no column id")
                && err.contains("1 profile rows skipped"),
            "{err}"
        );
        assert!(err.contains("evoq_attach"), "{err}");
    }

    #[pg_test]
    fn overlapping_jobs_do_not_deadlock_on_a_lost_instance() {
        let mock = mock();
        clean_committed();
        committed_configure(&mock, "");
        let user = "44444444-4444-4444-4444-444444444444";
        let name = "evoq_legacy4444";
        // The user is due again and their old instance is gone from the server (connect: 404).
        committed(&format!(
            "INSERT INTO evolution_instance_creation_queue (user_id, instance_name) VALUES ('{user}', '{name}');
             INSERT INTO evolution_instances (user_id, instance_name) VALUES ('{user}', '{name}')"
        ));
        let instance_id = one::<String>("SELECT id::text FROM evolution_instances").unwrap();
        // The refresh job holds the instance row...
        run("CREATE EXTENSION IF NOT EXISTS dblink");
        Spi::run_with_args(
            "SELECT dblink_connect('evoq_refresh', $1)",
            &[self_conninfo().into()],
        )
        .unwrap();
        run("SELECT dblink_exec('evoq_refresh', 'BEGIN')");
        run("SELECT * FROM dblink('evoq_refresh', 'SELECT evoq._claim_refresh(''default'', 10, 0, 600000, 300000, true, ARRAY[]::uuid[], 0)::text') AS t(x text)");
        // ...while the queue job claims the queue row and waits for the instance row.
        let pid = start_in_session("evoq_proc", "", "SELECT evoq_process_queue()::text");
        let deadline = Instant::now() + Duration::from_secs(10);
        while count(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = {pid} AND wait_event_type = 'Lock'"
        )) == 0
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        // The refresh records the 404. 0.1.0 updated the queue row here: a lock cycle.
        let record = format!(
            "SELECT * FROM dblink('evoq_refresh', $q$SELECT evoq._record_refresh_results('[{{\"id\": \"{instance_id}\", \"outcome\": \"lost\"}}]')::text$q$) AS t(x text)"
        );
        assert_eq!(error_of(&record), None);
        run("SELECT dblink_exec('evoq_refresh', 'COMMIT')");
        run("SELECT dblink_disconnect('evoq_refresh')");
        let summary = finish_session("evoq_proc");
        assert!(
            summary.contains("\"created\": 1") && !summary.contains("deadlock"),
            "{summary}"
        );
        // The lost-instance request waits for the queue's next run, which applies it.
        assert_eq!(
            count("SELECT count(*) FROM evoq.requeue_requests WHERE reason = 'lost'"),
            1
        );
        clean_committed();
    }

    #[pg_test]
    fn a_reply_with_nul_or_a_huge_count_is_stored_sanitized() {
        let mock = mock();
        configure(&mock);
        profiles();
        let users = sign_up(2);
        mock.add_fault(reply_fault(
            "POST",
            "/instance/create",
            201,
            r#"{"instance":{"instanceName":"x","instanceId":"id\u0000","status":"connecting"},"hash":"T\u0000K","qrcode":{"code":"2@a\u0000b","base64":"data:image/png;base64,AA","count":99999999999}}"#,
        ));
        let summary = process();
        assert_eq!(summary["created"], 0, "{summary}");
        // The name in the reply is not the one asked for: a malformed reply, retried, not a wedge.
        assert_eq!(summary["retrying"], 2, "{summary}");
        mock.clear_faults();
        mock.add_fault(reply_fault(
            "GET",
            "/instance/connect",
            200,
            r#"{"code":"2@a\u0000b","base64":"data:image/png;base64,AA","count":99999999999}"#,
        ));
        make_all_due();
        assert_eq!(process()["created"], 2);
        make_refresh_due();
        let refreshed = json("SELECT evoq_refresh_qr()");
        assert_eq!(refreshed["errors"], 0, "{refreshed}");
        let row = instance_row(&users[0]);
        assert_eq!(row["qr_text"], "2@ab");
        assert_eq!(row["qr_count"], i32::MAX);
    }

    #[pg_test]
    fn a_row_that_cannot_be_recorded_fails_alone() {
        let mock = mock();
        configure(&mock);
        profiles();
        let users = sign_up(3);
        // Something in the database refuses one user's instance row (a constraint, someone's trigger).
        run(&format!(
            "CREATE FUNCTION pg_temp.refuse() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN IF NEW.user_id = '{}' THEN RAISE EXCEPTION 'refused by a test trigger'; END IF; RETURN NEW; END $$",
            users[1]
        ));
        run("CREATE TRIGGER refuse BEFORE INSERT ON evolution_instances FOR EACH ROW EXECUTE FUNCTION pg_temp.refuse()");
        let summary = process();
        assert_eq!(summary["created"], 3, "{summary}");
        assert_eq!(summary["unrecordable"], 1, "{summary}");
        assert_eq!(queue_row(&users[0])["status"], "completed");
        assert_eq!(queue_row(&users[2])["status"], "completed");
        let refused = queue_row(&users[1]);
        assert_eq!(refused["status"], "pending");
        assert!(
            s(&refused["error_message"]).contains("refused by a test trigger"),
            "{refused}"
        );
    }

    #[pg_test]
    fn a_hanging_version_probe_honours_the_budget_and_sends_nothing_late() {
        let mock = mock();
        configure(&mock);
        profiles();
        let users = sign_up(3);
        mock.add_fault(fault("GET", "/", FaultKind::Hang, None));
        run("SET LOCAL evoq.time_budget_ms = 1000");
        let started = Instant::now();
        let summary = process();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "took {:?}",
            started.elapsed()
        );
        assert_eq!(summary["stopped"], "time_budget", "{summary}");
        // Nothing was claimed, so nothing was charged...
        for u in &users {
            assert_eq!(queue_row(u)["attempts"], 0);
        }
        // ...and no create is sent after the run gave up.
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(mock.count_calls("POST", "/instance/create"), 0);
        mock.clear_faults();
    }

    #[pg_test]
    fn statement_timeout_holds_while_the_version_probe_hangs() {
        // 0.1.0 asked GET / on the backend thread: statement_timeout = 1s fired after 20 s.
        let mock = mock();
        clean_committed();
        committed_configure(&mock, "");
        committed_queue(2);
        mock.add_fault(fault("GET", "/", FaultKind::Hang, None));
        let started = Instant::now();
        start_in_session(
            "evoq_timeout",
            "SET statement_timeout = '1s'; SET evoq.time_budget_ms = 600000",
            "SELECT evoq_process_queue()::text",
        );
        let result = finish_session("evoq_timeout");
        assert!(result.contains("statement timeout"), "{result}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "took {:?}",
            started.elapsed()
        );
        assert_eq!(mock.count_calls("POST", "/instance/create"), 0);
        mock.clear_faults();
        clean_committed();
    }

    #[pg_test]
    fn the_version_is_asked_once_and_kept() {
        let mock = mock();
        configure(&mock);
        profiles();
        sign_up(1);
        process();
        sign_up(1);
        process();
        assert_eq!(probes(&mock), 1);
        assert_eq!(
            one::<String>("SELECT detected_version FROM evoq.settings").as_deref(),
            Some("v2")
        );
    }

    #[pg_test]
    fn a_rejected_key_releases_the_batch_and_opens_the_circuit() {
        let mock = mock();
        configure_with(&mock.url(), "wrong-key", "");
        profiles();
        let users = sign_up(3);
        let summary = process();
        assert_eq!(summary["stopped"], "circuit_open", "{summary}");
        assert_eq!(summary["released"], 3, "{summary}");
        for u in &users {
            let row = queue_row(u);
            assert_eq!(row["status"], "pending", "{row}");
            assert_eq!(row["attempts"], 0, "{row}");
            assert_eq!(row["retry_count"], 0, "{row}");
        }
        let status = json("SELECT to_jsonb(s) FROM evoq_status s");
        assert_eq!(status["circuit"], "open");
        assert!(s(&status["circuit_cause"]).contains("401"), "{status}");
        // While it is open, runs make no call at all.
        let calls = mock.calls().len();
        assert_eq!(process()["stopped"], "circuit_open");
        assert_eq!(mock.calls().len(), calls);
        // The right key: configuring again closes it, and everything is created.
        configure(&mock);
        assert_eq!(process()["created"], 3);
    }

    #[pg_test]
    fn a_wrong_path_prefix_burns_no_row() {
        let mock = mock();
        configure_with(&format!("{}/wrong/prefix", mock.url()), API_KEY, "");
        profiles();
        let users = sign_up(4);
        let summary = process();
        assert_eq!(summary["stopped"], "circuit_open", "{summary}");
        assert_eq!(queue_row(&users[0])["attempts"], 0);
        assert_eq!(mock.count_calls("POST", "/"), 0);
        // When the probe is due, a server that still does not answer keeps it open.
        run("UPDATE evoq.circuit SET next_probe_at = now() - interval '1 second'");
        assert_eq!(process()["stopped"], "circuit_open");
        assert_eq!(one::<i32>("SELECT trips FROM evoq.circuit"), Some(2));
    }

    #[pg_test]
    fn a_circuit_closes_only_after_a_batch_goes_through() {
        let mock = mock();
        configure(&mock);
        profiles();
        let users = sign_up(3);
        mock.add_fault(fault(
            "POST",
            "/instance/create",
            FaultKind::Status { code: 500 },
            None,
        ));
        assert_eq!(process()["stopped"], "circuit_open");
        // GET / answers, but every create still fails the same way: open again, probed later.
        run("UPDATE evoq.circuit SET next_probe_at = now() - interval '1 second'");
        let summary = process();
        assert_eq!(summary["stopped"], "circuit_open", "{summary}");
        assert_eq!(one::<i32>("SELECT trips FROM evoq.circuit"), Some(2));
        assert!(
            count("SELECT count(*) FROM evoq.circuit WHERE next_probe_at > now() + interval '50 seconds'") == 1,
            "the second trip waits longer"
        );
        assert_eq!(queue_row(&users[0])["attempts"], 0);
        // The server recovers: the probe lets one batch through, and it closes the circuit.
        mock.clear_faults();
        run("UPDATE evoq.circuit SET next_probe_at = now() - interval '1 second'");
        let summary = process();
        assert_eq!(summary["created"], 3, "{summary}");
        assert_eq!(
            one::<String>("SELECT circuit FROM evoq_status").as_deref(),
            Some("closed")
        );
    }

    #[pg_test]
    fn a_403_that_is_not_about_the_name_is_not_adopted() {
        let mock = mock();
        configure(&mock);
        profiles();
        let users = sign_up(1);
        mock.add_fault(reply_fault(
            "POST",
            "/instance/create",
            403,
            r#"{"status":403,"error":"Forbidden","response":{"message":["Request blocked by the firewall"]}}"#,
        ));
        let summary = process();
        assert_eq!(summary["adopted"], 0, "{summary}");
        assert_eq!(mock.count_calls("GET", "/instance/fetchInstances"), 0);
        let row = queue_row(&users[0]);
        assert_eq!(row["status"], "failed");
        assert!(s(&row["error_message"]).contains("firewall"), "{row}");
    }

    #[pg_test]
    fn secrets_echoed_by_a_proxy_never_reach_a_row() {
        let mock = mock();
        configure(&mock);
        profiles();
        let users = sign_up(1);
        mock.add_fault(reply_fault(
            "POST",
            "/instance/create",
            400,
            &format!(
                r#"{{"status":400,"error":"Bad Request","response":{{"message":["bad request; headers were apikey: {API_KEY}"]}}}}"#
            ),
        ));
        process();
        let row = queue_row(&users[0]);
        let message = s(&row["error_message"]);
        assert!(
            !message.contains(API_KEY) && message.contains("[redacted]"),
            "{message}"
        );
        assert!(!message.contains(&mock.url()), "{message}");
        assert_eq!(
            count(&format!(
                "SELECT count(*) FROM evoq.job_runs WHERE summary::text LIKE '%{API_KEY}%'"
            )),
            0
        );
    }

    #[pg_test]
    fn new_names_carry_the_namespace_and_old_ones_are_kept() {
        let mock = mock();
        configure_with(&mock.url(), API_KEY, ", namespace => 'prod'");
        profiles();
        let users = sign_up(1);
        // A database upgraded from 0.1.0 owns the 0.1.0 names.
        run("UPDATE evoq.settings SET owns_legacy_names = true");
        let legacy_user = "55555555-5555-5555-5555-555555555555";
        run(&format!(
            "INSERT INTO evolution_instance_creation_queue (user_id, instance_name) VALUES ('{legacy_user}', 'evoq_55555555555555555555555555555555')"
        ));
        assert_eq!(process()["created"], 2);
        let hex = users[0].replace('-', "");
        assert_eq!(
            instance_row(&users[0])["instance_name"],
            format!("evoq_prod_{hex}")
        );
        assert_eq!(
            instance_row(legacy_user)["instance_name"],
            "evoq_55555555555555555555555555555555"
        );
        assert_eq!(
            one::<String>(&format!("SELECT evoq_instance_name('{}')", users[0])).unwrap(),
            format!("evoq_prod_{hex}")
        );
    }

    #[pg_test]
    fn a_copied_database_refuses_to_touch_the_server_until_told() {
        let mock = mock();
        configure(&mock);
        profiles();
        sign_up(2);
        // What a restore into another database or cluster looks like: another identity.
        run("UPDATE evoq.settings SET deployment_identity = '123:456'");
        for sql in ["SELECT evoq_process_queue()", "SELECT evoq_refresh_qr()"] {
            let err = error_of(sql).unwrap();
            assert!(err.starts_with("55000") && err.contains("copy"), "{err}");
            assert!(err.contains("namespace =>"), "{err}");
        }
        assert_eq!(mock.calls().len(), 0);
        // Rows the original had tried carry the original's names; instances it created are in the
        // table too: one of its own namespace, and one from before namespaces (it was upgraded
        // from 0.1.0, so it owns those names).
        run("UPDATE evolution_instance_creation_queue SET instance_name = 'evoq_orig_' || replace(user_id::text, '-', '')");
        run("INSERT INTO evolution_instances (user_id, instance_name) VALUES (gen_random_uuid(), 'evoq_orig_0000')");
        run("INSERT INTO evolution_instances (user_id, instance_name) VALUES (gen_random_uuid(), 'evoq_00000000000000000000000000000000')");
        run("UPDATE evoq.settings SET owns_legacy_names = true");
        // A user the original had completed, whose profile the copy sees inserted again later.
        let done_user = "66666666-6666-6666-6666-666666666666";
        run(&format!(
            "INSERT INTO evolution_instance_creation_queue (user_id, instance_name, status) VALUES ('{done_user}', 'evoq_00000000000000000000000000000066', 'completed')"
        ));
        // Reconfiguring without a namespace is refused too: it would silently reuse the original's.
        assert!(error_of(&format!(
            "SELECT evoq_configure('{}', '{API_KEY}')",
            mock.url()
        ))
        .unwrap()
        .contains("copy"));
        configure_with(&mock.url(), API_KEY, ", namespace => 'staging'");
        assert_eq!(process()["created"], 2);
        assert_eq!(
            count("SELECT count(*) FROM evolution_instances WHERE instance_name LIKE 'evoq\\_staging\\_%'"),
            2
        );
        assert_eq!(
            one::<bool>("SELECT owns_legacy_names FROM evoq.settings"),
            Some(false)
        );
        // The completed user comes back: a new name in the copy's namespace, not the original's.
        run(&format!(
            "UPDATE evolution_instance_creation_queue SET status = 'pending' WHERE user_id = '{done_user}'"
        ));
        assert_eq!(process()["created"], 1);
        assert!(s(&queue_row(done_user)["instance_name"]).starts_with("evoq_staging_"));
        assert_eq!(mock.count_calls("GET", "/instance/fetchInstances"), 0);
        // The original's instances are not the copy's to refresh.
        make_refresh_due();
        json("SELECT evoq_refresh_qr()");
        assert_eq!(mock.count_calls("GET", "/instance/connect/evoq_orig_"), 0);
        assert_eq!(mock.count_calls("GET", "/instance/connect/evoq_0000"), 0);
        // The copy's own three (the two new users and the returning one) are.
        assert_eq!(
            mock.count_calls("GET", "/instance/connect/evoq_staging_"),
            3
        );
    }

    #[pg_test]
    fn configuration_that_cannot_work_is_refused_clearly() {
        for (sql, needle) in [
            (
                "SELECT evoq_configure('http://evo:8080/?x=1', 'k')",
                "query",
            ),
            (
                "SELECT evoq_configure('http://evo:8080/#frag', 'k')",
                "fragment",
            ),
            (
                "SELECT evoq_configure('http://evo:8080', 'k', webhook_events => NULL)",
                "webhook_events must not be NULL",
            ),
            (
                "SELECT evoq_configure(NULL, 'k')",
                "api_url must not be empty",
            ),
            (
                "SELECT evoq_configure('http://evo:8080', NULL)",
                "api_key must not be empty",
            ),
            (
                "SELECT evoq_configure('http://evo:8080', 'k', namespace => 'Bad_NS')",
                "namespace must be",
            ),
        ] {
            let err = error_of(sql).unwrap_or_else(|| panic!("{sql} was accepted"));
            assert!(
                err.starts_with("22023") && err.contains(needle),
                "{sql}: {err}"
            );
            assert!(!err.contains("unwrap"), "{err}");
        }
        assert_eq!(count("SELECT count(*) FROM evoq.settings"), 0);
        let echoed = json("SELECT evoq_configure('https://user:hunter2@evo.example:8080', 'k')");
        assert!(!echoed.to_string().contains("hunter2"), "{echoed}");
        // The log threshold evoq_configure raises to keep the key out of the log is put back.
        assert_eq!(
            one::<String>("SELECT current_setting('log_min_error_statement')").as_deref(),
            Some("error")
        );
    }

    #[pg_test]
    fn a_summary_counts_every_kind_of_error() {
        let mock = mock();
        configure(&mock);
        profiles();
        sign_up(4);
        mock.add_fault(fault(
            "POST",
            "/instance/create",
            FaultKind::Status { code: 500 },
            Some(2),
        ));
        mock.add_fault(fault(
            "POST",
            "/instance/create",
            FaultKind::Status { code: 400 },
            Some(1),
        ));
        let summary = process();
        assert_eq!(summary["created"], 1, "{summary}");
        assert_eq!(summary["errors_by_kind"]["http_500"], 2, "{summary}");
        assert_eq!(summary["errors_by_kind"]["http_400"], 1, "{summary}");
        assert_eq!(
            summary["first_errors"].as_array().unwrap().len(),
            2,
            "{summary}"
        );
    }

    #[pg_test]
    fn no_qr_yet_stores_a_count_of_zero() {
        let mock = mock();
        configure(&mock);
        profiles();
        let users = sign_up(1);
        // The create reply says {"count":0}...
        process();
        assert_eq!(instance_row(&users[0])["qr_count"], 0);
        // ...a refresh brings a QR and the server's count...
        make_refresh_due();
        json("SELECT evoq_refresh_qr()");
        let name = s(&instance_row(&users[0])["instance_name"]).to_string();
        let server_count = mock.instance(&name).unwrap()["qr_count"].clone();
        assert!(server_count.as_i64().unwrap_or(0) >= 1, "{server_count}");
        assert_eq!(instance_row(&users[0])["qr_count"], server_count);
        // ...and a server that starts over says {"count":0} again.
        make_refresh_due();
        mock.add_fault(reply_fault(
            "GET",
            "/instance/connect",
            200,
            r#"{"count":0}"#,
        ));
        json("SELECT evoq_refresh_qr()");
        assert_eq!(instance_row(&users[0])["qr_count"], 0);
    }

    #[pg_test]
    fn a_reply_in_the_other_dialect_makes_the_next_run_ask_again() {
        let mock = mock();
        configure(&mock);
        profiles();
        sign_up(1);
        process();
        assert_eq!(probes(&mock), 1);
        // The server was replaced by one that speaks the other dialect.
        mock.add_fault(reply_fault(
            "POST",
            "/instance/create",
            400,
            r#"{"status":400,"error":"Bad Request","response":{"message":[["instance requires property \"webhook\""]]}}"#,
        ));
        sign_up(1);
        let summary = process();
        assert_eq!(summary["failed"], 1, "{summary}");
        assert_eq!(
            one::<String>("SELECT detected_version FROM evoq.settings"),
            None
        );
        mock.clear_faults();
        sign_up(1);
        process();
        assert_eq!(probes(&mock), 2);
    }
}
