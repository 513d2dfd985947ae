//! pg_tests: the Evolution server as data (0.6.0): its capacity keeps sign-ups beyond it
//! pending, untried and uncharged, until room appears; draining stops new instances and not the
//! server's own; max_in_flight bounds the calls at once; evoq_servers shows it, its key never;
//! bad input and API roles are refused.

#[pgrx::pg_schema]
mod tests {
    use crate::testing::*;
    use evolution_mock::FaultKind;
    use pgrx::prelude::*;

    fn process() -> serde_json::Value {
        json("SELECT evoq_process_queue()")
    }

    /// (live instances, capacity) of the default server, as evoq_servers shows them.
    fn load() -> (i64, Option<i32>) {
        (
            count("SELECT live_instances FROM evoq_servers WHERE name = 'default'"),
            one::<i32>("SELECT capacity FROM evoq_servers WHERE name = 'default'"),
        )
    }

    /// Sign-ups that wait for room: pending, never placed, never tried.
    fn waiting_untried() -> i64 {
        count(
            "SELECT count(*) FROM evolution_instance_creation_queue
             WHERE status = 'pending' AND server IS NULL AND attempts = 0 AND retry_count = 0",
        )
    }

    /// When the background worker would next find work (ms): instances polled and checked
    /// every minute, repoints left out.
    fn worker_due_in_ms() -> f64 {
        one::<f64>("SELECT evoq._next_due_ms(60000, 600000, 60000, 60000, false, 120000)").unwrap()
    }

    #[pg_test]
    fn a_full_server_keeps_new_sign_ups_pending_and_untried_until_room_appears() {
        let mock = mock();
        configure(&mock);
        profiles();
        assert_eq!(
            json("SELECT evoq_server_set('default', capacity => 2)")["capacity"],
            2
        );
        let users = sign_up(4);
        assert_eq!(process()["created"], 2);
        assert_eq!(mock.count_calls("POST", "/instance/create"), 2);
        assert_eq!(waiting_untried(), 2);
        assert_eq!(load(), (2, Some(2)));
        assert_eq!(count("SELECT waiting_for_room FROM evoq_status"), 2);
        let reason = one::<String>("SELECT waiting_for_room_reason FROM evoq_status").unwrap();
        assert!(
            reason.contains("full: 2 live instances, capacity 2"),
            "{reason}"
        );
        assert_eq!(
            one::<String>("SELECT full_reason FROM evoq_servers").as_deref(),
            Some(reason.as_str())
        );
        assert_eq!(count("SELECT free_slots FROM evoq_servers"), 0);
        // Another run places nothing, calls nothing and charges nothing.
        assert_eq!(process()["created"], 0);
        assert_eq!(mock.count_calls("POST", "/instance/create"), 2);
        assert_eq!(waiting_untried(), 2);
        // Nor is the worker woken for them: they are not due while they must wait (the two
        // instances' first poll is a minute away).
        assert!(worker_due_in_ms() > 30_000.0, "{}", worker_due_in_ms());
        run("SELECT evoq_server_drain('default')");
        run("SELECT evoq_server_set('default', capacity => 3)");
        assert!(
            worker_due_in_ms() > 30_000.0,
            "draining: {}",
            worker_due_in_ms()
        );
        run("SELECT evoq_server_drain('default', false)");
        assert_eq!(worker_due_in_ms(), 0.0, "room for one: due now");
        run("SELECT evoq_server_set('default', capacity => 2)");
        // A deletion makes room for one.
        let first = &users[0];
        run(&format!("SELECT evoq_deprovision('{first}')"));
        for _ in 0..3 {
            process();
        }
        assert_eq!(instance_row(first)["instance_status"], "deleted");
        assert_eq!(waiting_untried(), 1);
        assert_eq!(load(), (2, Some(2)));
        assert_eq!(mock.count_calls("POST", "/instance/create"), 3);
        // A capacity raised makes room for the rest; each placed row is on the server.
        run("SELECT evoq_server_set('default', capacity => 10)");
        assert_eq!(process()["created"], 1);
        assert_eq!((waiting_untried(), load()), (0, (3, Some(10))));
        assert_eq!(count("SELECT waiting_for_room FROM evoq_status"), 0);
        assert!(one::<String>("SELECT waiting_for_room_reason FROM evoq_status").is_none());
        assert_eq!(
            count(
                "SELECT count(*) FROM evolution_instances i
                 JOIN evolution_instance_creation_queue q USING (user_id)
                 WHERE i.server = 'default' AND q.server = 'default'"
            ),
            4
        );
        // No bound at all again.
        run("SELECT evoq_server_set('default', clear => '{capacity}')");
        assert_eq!(load(), (3, None));
        assert!(one::<i64>("SELECT free_slots FROM evoq_servers").is_none());
    }

    #[pg_test]
    fn a_re_creation_after_the_server_lost_the_instance_is_placed_afresh_within_capacity() {
        let mock = mock();
        let (user, name) = created_instance(&mock);
        run("SELECT evoq_server_set('default', capacity => 1)");
        let second = sign_up(1).remove(0);
        assert_eq!(process()["created"], 0, "full");
        // The server loses the first one: it no longer holds it, so it is not counted, and its
        // creation again is a placement like any other (here: the oldest due row takes the room).
        assert!(mock.remove_instance(&name));
        run("SET LOCAL evoq.orphan_grace_ms = 0");
        assert_eq!(json("SELECT evoq_reconcile()")["missing"], 1);
        assert_eq!(instance_row(&user)["instance_status"], "lost");
        run("SELECT evoq._apply_requeue_requests()");
        assert!(queue_row(&user)["server"].is_null(), "{}", queue_row(&user));
        assert_eq!(load().0, 0);
        make_all_due();
        assert_eq!(process()["created"], 1);
        assert_eq!(load(), (1, Some(1)));
        let placed: Vec<_> = [&user, &second]
            .iter()
            .map(|u| queue_row(u)["status"].clone())
            .collect();
        assert_eq!(
            placed.iter().filter(|s| *s == "completed").count(),
            1,
            "{placed:?}"
        );
    }

    #[pg_test]
    fn a_retried_failure_and_a_row_given_back_untried_need_room_again() {
        let mock = mock();
        configure(&mock);
        profiles();
        run("SELECT evoq_server_set('default', capacity => 2)");
        // One of three creates refused for good (400): it holds no room once failed.
        mock.add_fault(fault(
            "POST",
            "/instance/create",
            FaultKind::Status { code: 400 },
            Some(1),
        ));
        let users = sign_up(3);
        assert_eq!(process()["created"], 2);
        let failed = users
            .iter()
            .find(|u| queue_row(u)["status"] == "failed")
            .unwrap()
            .clone();
        assert_eq!(load(), (2, Some(2)));
        // evoq_retry gives it a fresh start: untried again, so it waits for room like a sign-up.
        run(&format!("SELECT evoq_retry('{failed}')"));
        assert_eq!(process()["created"], 0);
        assert_eq!(
            (
                queue_row(&failed)["status"].clone(),
                queue_row(&failed)["attempts"].clone()
            ),
            ("pending".into(), 0.into())
        );
        assert_eq!(load(), (2, Some(2)));
        assert_eq!(count("SELECT waiting_for_room FROM evoq_status"), 1);
        // A claimed row given back untried (the worker's reserve at a cycle's end) is the same.
        run("SELECT evoq_server_set('default', capacity => 3)");
        let claims = json("SELECT evoq._claim_queue('default', 5, 60000)");
        assert_eq!(claims.as_array().unwrap().len(), 1, "{claims}");
        assert_eq!(load(), (3, Some(3)), "claimed: counted");
        run(&format!("SELECT evoq._release_queue('{claims}'::jsonb)"));
        assert_eq!(load(), (2, Some(3)), "given back untried: not counted");
        assert_eq!(process()["created"], 1);
        assert_eq!(queue_row(&failed)["status"], "completed");
        assert_eq!(load(), (3, Some(3)));
    }

    #[pg_test]
    fn an_instance_expiring_unscanned_makes_room() {
        let mock = mock();
        let (user, _) = created_instance(&mock);
        run("SELECT evoq_server_set('default', capacity => 1)");
        let second = sign_up(1).remove(0);
        assert_eq!(process()["created"], 0, "full");
        // Its QR window passes unscanned: logged out, expired, no longer live.
        run(&format!(
            "UPDATE evolution_instances SET connecting_since = now() - interval '11 minutes' WHERE user_id = '{user}'"
        ));
        assert_eq!(json("SELECT evoq_refresh_qr()")["expired"], 1);
        assert_eq!(load(), (0, Some(1)));
        assert_eq!(process()["created"], 1);
        assert_eq!(queue_row(&second)["status"], "completed");
        assert_eq!(load(), (1, Some(1)));
        // Its user reopens it: at its server, whatever the capacity (nothing is created).
        assert_eq!(
            one::<String>(&format!("SELECT evoq_reconnect('{user}')")).as_deref(),
            Some("connecting")
        );
        assert_eq!(load(), (2, Some(1)));
        assert_eq!(count("SELECT free_slots FROM evoq_servers"), -1);
    }

    #[pg_test]
    fn two_runs_at_once_never_place_past_the_capacity_together() {
        clean_committed();
        let mock = mock();
        // Each create takes half a second, so the two runs overlap: each would see the other's
        // placements only once that one commits.
        mock.set_latency_ms(500);
        committed_configure(&mock, "PERFORM evoq_server_set('default', capacity => 5);");
        committed_queue(40);
        let results = concurrently(
            2,
            "SET evoq.batch_size = 5; SET evoq.concurrency = 4",
            "SELECT evoq_process_queue()",
        );
        let created: i64 = results
            .iter()
            .map(|r| {
                serde_json::from_str::<serde_json::Value>(r)
                    .unwrap_or_else(|_| panic!("session failed: {r}"))["created"]
                    .as_i64()
                    .unwrap()
            })
            .sum();
        assert_eq!(created, 5, "{results:?}");
        assert_eq!(mock.count_calls("POST", "/instance/create"), 5);
        assert_eq!(load(), (5, Some(5)));
        assert_eq!(count("SELECT waiting_for_room FROM evoq_status"), 35);
        clean_committed();
    }

    #[pg_test]
    fn draining_stops_new_instances_but_not_the_server_s_own_retries() {
        let mock = mock();
        configure(&mock);
        profiles();
        // Three sign-ups placed and tried: the server failed one of them (503), due again later
        // (one failure in three is the row's, not the server's: no circuit).
        mock.add_fault(fault(
            "POST",
            "/instance/create",
            FaultKind::Status { code: 503 },
            Some(1),
        ));
        let first = sign_up(3);
        assert_eq!(process()["created"], 2);
        let tried = first
            .iter()
            .find(|u| queue_row(u)["status"] == "pending")
            .unwrap()
            .clone();
        assert_eq!(queue_row(&tried)["server"], "default");
        assert_eq!(queue_row(&tried)["attempts"], 1);
        assert_eq!(
            json("SELECT evoq_server_drain('default')")["draining"],
            true
        );
        let new = sign_up(2);
        make_all_due();
        assert_eq!(process()["created"], 1, "the placed row goes on");
        assert_eq!(queue_row(&tried)["status"], "completed");
        assert_eq!(waiting_untried(), 2);
        assert_eq!(
            one::<String>("SELECT state FROM evoq_servers").as_deref(),
            Some("draining")
        );
        assert!(
            one::<String>("SELECT waiting_for_room_reason FROM evoq_status")
                .unwrap()
                .contains("draining"),
        );
        run("SELECT evoq_server_drain('default', false)");
        assert_eq!(process()["created"], 2);
        for u in &new {
            assert_eq!(queue_row(u)["status"], "completed");
        }
        assert_eq!(
            one::<String>("SELECT state FROM evoq_servers").as_deref(),
            Some("ok")
        );
    }

    #[pg_test]
    fn max_in_flight_bounds_the_calls_the_server_is_sent_at_once() {
        let mock = mock();
        configure(&mock);
        profiles();
        run("SET LOCAL evoq.concurrency = 6");
        run("SELECT evoq_server_set('default', max_in_flight => 2)");
        mock.set_latency_ms(300);
        sign_up(6);
        let summary = process();
        assert_eq!(summary["created"], 6, "{summary}");
        assert_eq!(summary["concurrency"], 2, "{summary}");
        // 6 creates, 2 at a time, 300 ms each: at least three rounds.
        assert!(summary["elapsed_ms"].as_u64().unwrap() >= 900, "{summary}");
        run("SELECT evoq_server_set('default', clear => '{max_in_flight}')");
        sign_up(6);
        let summary = process();
        assert_eq!(
            (summary["created"].clone(), summary["concurrency"].clone()),
            (6.into(), 6.into()),
            "{summary}"
        );
    }

    #[pg_test]
    fn bad_input_gets_its_sqlstate_and_hint_and_changes_nothing() {
        // Not configured (what tests that commit may have left aside).
        run("DELETE FROM evoq.servers");
        run("DELETE FROM evoq.settings");
        let e = error_of("SELECT evoq_server_set('default', capacity => 5)").unwrap();
        assert!(
            e.starts_with("55000") && e.contains("evoq_configure"),
            "{e}"
        );
        let mock = mock();
        configure(&mock);
        run("SELECT evoq_server_set('default', capacity => 5, max_in_flight => 3)");
        let before = json("SELECT to_jsonb(s) FROM evoq.servers s");
        for (sql, says) in [
            (
                "SELECT evoq_server_set('default', capacity => 0)",
                "capacity must be at least 1",
            ),
            (
                "SELECT evoq_server_set('default', capacity => -3)",
                "capacity must be at least 1",
            ),
            (
                "SELECT evoq_server_set('default', max_in_flight => 0)",
                "max_in_flight must be at least 1",
            ),
            (
                "SELECT evoq_server_set('default', clear => '{capacity,speed}')",
                "'speed'",
            ),
            (
                "SELECT evoq_server_set('default', clear => ARRAY[NULL]::text[])",
                "NULL",
            ),
            (
                "SELECT evoq_server_set('default', capacity => 4, clear => '{capacity}')",
                "both given and cleared",
            ),
            (
                "SELECT evoq_server_set('eu-1', capacity => 4)",
                "no Evolution server named 'eu-1'",
            ),
            (
                "SELECT evoq_server_drain('eu-1')",
                "no Evolution server named 'eu-1'",
            ),
            (
                "SELECT evoq_server_drain('default', NULL)",
                "must be true or false",
            ),
        ] {
            let e = error_of(sql).unwrap_or_else(|| panic!("{sql} was accepted"));
            assert!(
                e.starts_with("22023") && e.contains(says) && e.contains("HINT"),
                "{sql}: {e}"
            );
        }
        let e = error_of("SELECT evoq_server_drain('eu-1')").unwrap();
        assert!(e.contains("evoq_servers lists them: 'default'"), "{e}");
        assert_eq!(json("SELECT to_jsonb(s) FROM evoq.servers s"), before);
    }

    #[pg_test]
    fn the_servers_view_masks_credentials_and_never_shows_the_key_and_api_roles_are_refused() {
        let mock = mock();
        let url = mock.url().replacen("http://", "http://admin:pa55word@", 1);
        configure_with(&url, API_KEY, "");
        let row = json("SELECT to_jsonb(v) FROM evoq_servers v");
        assert_eq!(row["name"], "default");
        assert_eq!(
            s(&row["api_url"]),
            mock.url().replacen("http://", "http://***@", 1),
            "{row}"
        );
        assert!(
            !row.to_string().contains("pa55word") && !row.to_string().contains(API_KEY),
            "{row}"
        );
        assert_eq!(row["state"], "ok");
        // Who is placing on it now: the claim's transaction lock (only taken under a capacity).
        assert!(row["placing_pid"].is_null(), "{row}");
        run("SELECT evoq_server_set('default', capacity => 5)");
        run("SELECT evoq._claim_queue('default', 1, 1000)");
        assert_eq!(
            one::<i32>("SELECT placing_pid FROM evoq_servers"),
            one::<i32>("SELECT pg_backend_pid()")
        );
        run("SELECT evoq_server_set('default', clear => '{capacity}')");
        supabase_like();
        for role in ["anon", "authenticated", "service_role"] {
            run(&format!("SET LOCAL ROLE {role}"));
            let set = error_of("SELECT evoq_server_set('default', capacity => 1)");
            let drain = error_of("SELECT evoq_server_drain('default')");
            let view = error_of("SELECT count(*) FROM evoq_servers");
            run("RESET ROLE");
            for e in [&set, &drain] {
                assert!(
                    e.as_deref().unwrap_or("").starts_with("42501"),
                    "{role}: {e:?}"
                );
            }
            // The view is for operators: service_role reads it, as it reads evoq_status.
            if role == "service_role" {
                assert!(view.is_none(), "{role}: {view:?}");
            } else {
                assert!(
                    view.as_deref().unwrap_or("").starts_with("42501"),
                    "{role}: {view:?}"
                );
            }
        }
        assert!(one::<i32>("SELECT capacity FROM evoq.servers").is_none());
        assert!(!one::<bool>("SELECT draining FROM evoq.servers").unwrap());
    }
}
