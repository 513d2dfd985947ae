//! pg_tests: several Evolution servers (0.7.0). Each test runs its own mocks, one per server.
//! New sign-ups go to the server with the most free capacity and none passes its own; a row
//! placed on a server stays there (one instance per user across the fleet); one server's
//! circuit, key or slowness stops only its own calls; refreshes, deletions and the reconciler
//! go to the server that holds the instance; evoq_server_add, evoq_server_set and
//! evoq_server_remove refuse bad input and never show a key.

#[pgrx::pg_schema]
mod tests {
    use crate::testing::*;
    use evolution_mock::{FaultKind, Flavor, MockConfig, MockServer};
    use pgrx::prelude::*;
    use std::collections::BTreeSet;

    fn process() -> serde_json::Value {
        json("SELECT evoq_process_queue()")
    }

    fn add(name: &str, mock: &MockServer, extra: &str) -> serde_json::Value {
        let sql = format!(
            "SELECT evoq_server_add('{name}', '{}', '{}'{extra})",
            mock.url(),
            mock.api_key()
        );
        json(&sql)
    }

    fn mock_with_key(key: &str) -> MockServer {
        MockServer::start(
            0,
            MockConfig {
                api_key: key.into(),
                qr_ttl_ms: 0,
                ..MockConfig::default()
            },
        )
        .expect("start a mock")
    }

    /// The instance names evoq has on `server`.
    fn names_on(server: &str) -> BTreeSet<String> {
        let list = one::<String>(&format!(
            "SELECT string_agg(instance_name, ',') FROM evolution_instances
             WHERE server = '{server}' AND instance_status <> 'deleted'"
        ))
        .unwrap_or_default();
        list.split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }

    fn held_by(mock: &MockServer) -> BTreeSet<String> {
        mock.instance_names().into_iter().collect()
    }

    fn free_slots(server: &str) -> i64 {
        count(&format!(
            "SELECT free_slots FROM evoq_servers WHERE name = '{server}'"
        ))
    }

    #[pg_test]
    fn sign_ups_are_placed_by_free_capacity_and_no_server_passes_its_own() {
        let a = mock();
        let b = mock_with(Flavor::V1);
        let c = mock();
        configure(&a);
        profiles();
        run("SELECT evoq_server_set('default', capacity => 20)");
        add("b", &b, ", capacity => 40");
        add("c", &c, ", capacity => 80");
        sign_up(120);
        let mut created = 0;
        for _ in 0..5 {
            created += process()["created"].as_u64().unwrap_or(0);
        }
        assert_eq!(created, 120);
        for (server, mock, capacity) in [("default", &a, 20), ("b", &b, 40), ("c", &c, 80)] {
            let names = names_on(server);
            assert!(names.len() <= capacity, "{server}: {}", names.len());
            assert_eq!(
                held_by(mock),
                names,
                "{server} holds what evoq placed there"
            );
        }
        // By free capacity: 140 slots, 120 placed, the 20 left spread over the three servers
        // within a claim's grain (8) and one: placing on the largest first would leave all 20 at
        // default, in turn (40 each) none at default and 20 at c.
        let free: Vec<i64> = ["default", "b", "c"]
            .iter()
            .map(|s| free_slots(s))
            .collect();
        assert_eq!(free.iter().sum::<i64>(), 20);
        assert!(
            free.iter().max().unwrap() - free.iter().min().unwrap() <= 9,
            "free slots {free:?}"
        );
        assert_eq!(
            one::<String>("SELECT api_version FROM evoq_servers WHERE name = 'b'").as_deref(),
            Some("v1"),
            "each server's dialect is its own"
        );
        // 21 more: 20 fill the fleet, the last waits, untried and uncharged.
        sign_up(21);
        process();
        process();
        assert_eq!(count("SELECT count(*) FROM evolution_instances"), 140);
        assert_eq!(count("SELECT waiting_for_room FROM evoq_status"), 1);
        let reason = one::<String>("SELECT waiting_for_room_reason FROM evoq_status").unwrap();
        for name in ["default", "b", "c"] {
            assert!(
                reason.contains(&format!("server {name} is full")),
                "{reason}"
            );
        }
        for (server, capacity) in [("default", 20), ("b", 40), ("c", 80)] {
            assert_eq!(names_on(server).len(), capacity, "{server}");
        }
        // A new server is room: the last one goes there.
        let d = mock();
        add("d", &d, "");
        assert_eq!(process()["created"], 1);
        assert_eq!(held_by(&d), names_on("d"));
        assert_eq!(names_on("d").len(), 1);
    }

    #[pg_test]
    fn a_server_whose_circuit_opens_keeps_its_tried_rows_and_the_rest_go_elsewhere() {
        let a = mock();
        let b = mock();
        configure(&a);
        profiles();
        add("b", &b, "");
        run("SET evoq.concurrency = 4");
        a.add_fault(fault(
            "POST",
            "/instance/create",
            FaultKind::Status { code: 401 },
            None,
        ));
        sign_up(20);
        let summary = process();
        let tried_at_a = a.count_calls("POST", "/instance/create");
        assert!(tried_at_a > 0, "{summary}");
        assert_eq!(
            one::<String>("SELECT state FROM evoq_servers WHERE name = 'default'").as_deref(),
            Some("circuit_open")
        );
        assert_eq!(
            one::<String>("SELECT state FROM evoq_servers WHERE name = 'b'").as_deref(),
            Some("ok")
        );
        // Each server's own last error: a's 401, none at b (until 0.7.0 every server showed the
        // last error of any).
        let a_error = one::<String>(
            "SELECT last_error FROM evoq_servers WHERE name = 'default' AND last_error_at IS NOT NULL",
        );
        assert!(
            a_error.as_deref().is_some_and(|e| e.contains("401")),
            "{a_error:?} {summary}"
        );
        assert_eq!(
            one::<String>("SELECT coalesce(last_error, 'none') FROM evoq_servers WHERE name = 'b'")
                .as_deref(),
            Some("none")
        );
        // The rows whose creates went to a wait for it (a may hold them), uncharged; every
        // other one, those a had claimed ahead included, was created at b.
        let waiting = count(
            "SELECT count(*) FROM evolution_instance_creation_queue
             WHERE server = 'default' AND status = 'pending' AND attempts = 0",
        );
        assert_eq!(waiting as usize, tried_at_a, "{summary}");
        assert_eq!(held_by(&b).len(), 20 - tried_at_a, "{summary}");
        assert_eq!(held_by(&b), names_on("b"));
        // Another run leaves them waiting for a: b never takes them.
        process();
        assert_eq!(held_by(&b).len(), 20 - tried_at_a);
        // a comes back: its probe answers and its rows are created there.
        a.clear_faults();
        run("UPDATE evoq.circuit SET next_probe_at = now() - interval '1 second' WHERE server = 'default'");
        process();
        assert_eq!(held_by(&a).len(), tried_at_a);
        assert_eq!(held_by(&a), names_on("default"));
        assert!(held_by(&a).is_disjoint(&held_by(&b)));
        assert_eq!(count("SELECT count(*) FROM evolution_instances"), 20);
    }

    #[pg_test]
    fn a_create_that_timed_out_is_retried_at_its_server_and_gets_no_twin() {
        let a = mock();
        let b = mock();
        configure(&a);
        profiles();
        run("SELECT evoq_server_set('default', capacity => 1)");
        run("SET evoq.request_timeout_ms = 500");
        a.add_fault(fault("POST", "/instance/create", FaultKind::Hang, Some(1)));
        let user = sign_up(1).remove(0);
        let first = process();
        assert_eq!(first["retrying"], 1, "{first}");
        assert_eq!(queue_row(&user)["server"], "default");
        // a is full now that the create was tried, and b is empty and unbounded: an unplaced
        // row would go to b.
        add("b", &b, "");
        assert_eq!(free_slots("default"), 0);
        make_all_due();
        assert_eq!(
            json("SELECT evoq._claim_queue('b', 10, 60000)"),
            serde_json::json!([]),
            "b's claim never takes a row placed on default"
        );
        // The server made the instance after all (its answer was lost).
        let name = one::<String>(&format!("SELECT evoq_instance_name('{user}')")).unwrap();
        a.seed_instances(std::slice::from_ref(&name), "connecting");
        a.clear_faults();
        make_all_due();
        let second = process();
        assert_eq!(second["adopted"], 1, "{second}");
        assert_eq!(b.count_calls("", "/instance"), 0, "b was never asked");
        assert_eq!(held_by(&a), BTreeSet::from([name.clone()]));
        assert_eq!(instance_row(&user)["server"], "default");
    }

    #[pg_test]
    fn a_slow_probe_at_one_server_does_not_hold_up_another_servers_calls() {
        let a = mock();
        let b = mock();
        configure(&a);
        profiles();
        process(); // default's dialect is asked, and known from now on
                   // b's dialect is unknown, and its GET / takes 3 s (a busy 2.3.6 waits on WhatsApp's site).
        add("b", &b, "");
        run("SELECT evoq_server_drain('b')");
        b.add_fault(evolution_mock::FaultRule {
            method: Some("GET".into()),
            path_contains: String::new(),
            path_equals: Some("/".into()),
            kind: FaultKind::Delay { ms: 3000 },
            times: Some(1),
        });
        sign_up(3);
        let t0 = one::<String>("SELECT clock_timestamp()::text").unwrap();
        let summary = process();
        assert_eq!(summary["created"], 3, "{summary}");
        let ms = count(&format!(
            "SELECT (extract(epoch FROM max(processed_at) - '{t0}'::timestamptz) * 1000)::bigint
             FROM evolution_instance_creation_queue WHERE server = 'default'"
        ));
        assert!(
            ms < 1500,
            "default's creates waited {ms} ms for b's probe: {summary}"
        );
        let version_probes = b
            .calls()
            .iter()
            .filter(|c| c["method"] == "GET" && c["path"] == "/")
            .count();
        assert_eq!(version_probes, 1, "b's GET / was asked, in the same run");
        assert_eq!(
            one::<String>("SELECT api_version FROM evoq_servers WHERE name = 'b'").as_deref(),
            Some("v2")
        );
    }

    #[pg_test]
    fn a_re_creation_sent_and_unanswered_stays_at_its_server_when_asked_again() {
        let a = mock();
        let b = mock();
        configure(&a);
        profiles();
        add("b", &b, ", capacity => 1");
        run("SELECT evoq_server_drain('b')");
        let user = sign_up(1).remove(0);
        assert_eq!(process()["created"], 1);
        let name = one::<String>(&format!("SELECT evoq_instance_name('{user}')")).unwrap();
        // default loses the instance (404): it is created again, at b while default drains,
        // and b's create hangs until the row fails.
        assert!(a.remove_instance(&name));
        make_refresh_due();
        json("SELECT evoq_refresh_qr()");
        assert_eq!(instance_row(&user)["instance_status"], "lost");
        run("SELECT evoq_server_drain('default')");
        run("SELECT evoq_server_drain('b', false)");
        run("SET evoq.request_timeout_ms = 500");
        run("SET evoq.max_attempts = 1");
        b.add_fault(fault("POST", "/instance/create", FaultKind::Hang, Some(1)));
        let r = process();
        assert_eq!(r["failed"], 1, "{r}");
        assert_eq!(queue_row(&user)["server"], "b");
        // b made the instance after all (its answer was lost). The user asks again while
        // default, unbounded, has far more room than b: the row stays b's, and b answers for it.
        b.seed_instances(std::slice::from_ref(&name), "connecting");
        b.clear_faults();
        run("SELECT evoq_server_drain('default', false)");
        assert_eq!(
            one::<String>(&format!("SELECT evoq_reconnect('{user}')")).as_deref(),
            Some("lost")
        );
        make_all_due();
        let r = process();
        assert_eq!(r["adopted"], 1, "{r}");
        assert_eq!(queue_row(&user)["server"], "b");
        assert_eq!(instance_row(&user)["server"], "b");
        assert!(!held_by(&a).contains(&name), "no twin at default");
        assert_eq!(
            a.count_calls("POST", "/instance/create"),
            1,
            "only the first create"
        );
    }

    #[pg_test]
    fn each_server_is_asked_only_for_its_own_instances() {
        let a = mock();
        let b = mock();
        configure(&a);
        profiles();
        run("SELECT evoq_server_set('default', capacity => 2)");
        add("b", &b, ", capacity => 2");
        let users = sign_up(4);
        assert_eq!(process()["created"], 4);
        assert_eq!(names_on("default").len(), 2);
        assert_eq!(names_on("b").len(), 2);
        let before = [a.calls().len(), b.calls().len()];
        make_refresh_due();
        let refreshed = json("SELECT evoq_refresh_qr()");
        assert_eq!(refreshed["checked"], 4, "{refreshed}");
        for ((server, mock), before) in [("default", &a), ("b", &b)].into_iter().zip(before) {
            let asked: BTreeSet<String> = mock.calls()[before..]
                .iter()
                .filter_map(|c| {
                    c["path"]
                        .as_str()?
                        .strip_prefix("/instance/connect/")
                        .map(str::to_string)
                })
                .collect();
            assert_eq!(asked, names_on(server), "{server}");
        }
        // A deletion goes to the server that holds the instance.
        let on_b = users
            .iter()
            .find(|u| instance_row(u)["server"] == "b")
            .unwrap();
        let name = s(&instance_row(on_b)["instance_name"]).to_string();
        run(&format!("SELECT evoq_deprovision('{on_b}')"));
        assert_eq!(process()["deleted"], 1);
        assert!(!held_by(&b).contains(&name));
        assert_eq!(a.count_calls("DELETE", "/instance"), 0);
        assert_eq!(held_by(&a).len(), 2);
    }

    #[pg_test]
    fn the_reconciler_judges_each_server_by_its_own_rows() {
        let a = mock();
        let b = mock();
        configure(&a);
        profiles();
        run("SELECT evoq_server_set('default', capacity => 1)");
        add("b", &b, ", capacity => 1");
        run("SET evoq.orphan_grace_ms = 0");
        let users = sign_up(2);
        assert_eq!(process()["created"], 2);
        let (on_a, on_b) = if instance_row(&users[0])["server"] == "default" {
            (&users[0], &users[1])
        } else {
            (&users[1], &users[0])
        };
        let name_a = s(&instance_row(on_a)["instance_name"]).to_string();
        let name_b = s(&instance_row(on_b)["instance_name"]).to_string();
        // b lost its instance, and a holds a twin of it (a create that reached a long ago).
        b.remove_instance(&name_b);
        a.seed_instances(std::slice::from_ref(&name_b), "connecting");
        let summary = json("SELECT evoq_reconcile()");
        let (at_a, at_b) = (&summary["servers"]["default"], &summary["servers"]["b"]);
        assert_eq!(at_a["missing"], 0, "{summary}");
        assert_eq!(
            at_a["orphans"], 1,
            "the twin at a is an orphan there: {summary}"
        );
        assert_eq!(at_b["missing"], 1, "{summary}");
        assert_eq!(held_by(&a), BTreeSet::from([name_a]), "the twin is gone");
        assert_eq!(instance_row(on_a)["instance_status"], "connecting");
        assert_eq!(instance_row(on_b)["instance_status"], "lost");
        // Created again: a is full, so at b (its own loss made room there).
        assert_eq!(process()["created"], 1);
        assert_eq!(held_by(&b), BTreeSet::from([name_b]));
        assert_eq!(instance_row(on_b)["server"], "b");
    }

    #[pg_test]
    fn a_server_with_a_wrong_key_stops_only_its_own_calls_until_its_key_is_set() {
        let a = mock();
        let b = mock_with_key("sk-evoq-test-b-server-key");
        configure(&a);
        profiles();
        run(&format!(
            "SELECT evoq_server_add('b', '{}', 'sk-evoq-test-wrong-key', api_version => 'v2')",
            b.url()
        ));
        // default takes no new instance: the sign-ups go to b, which refuses its key.
        run("SELECT evoq_server_drain('default')");
        sign_up(5);
        process();
        assert_eq!(
            one::<String>("SELECT state FROM evoq_servers WHERE name = 'b'").as_deref(),
            Some("circuit_open")
        );
        let on_b = count("SELECT count(*) FROM evolution_instance_creation_queue WHERE server = 'b' AND status = 'pending'");
        assert!(on_b > 0, "b's tried rows wait for b");
        assert!(held_by(&b).is_empty());
        // default takes new instances again; b's circuit stops only b's calls.
        run("SELECT evoq_server_drain('default', false)");
        sign_up(3);
        process();
        assert_eq!(names_on("default").len(), 8 - on_b as usize);
        assert_eq!(held_by(&a), names_on("default"));
        assert_eq!(
            one::<String>("SELECT state FROM evoq_servers WHERE name = 'default'").as_deref(),
            Some("ok")
        );
        // A key rotation resets b's circuit, and its rows are created there.
        run("SELECT evoq_server_set('b', api_key => 'sk-evoq-test-b-server-key')");
        assert_eq!(
            one::<String>("SELECT state FROM evoq_servers WHERE name = 'b'").as_deref(),
            Some("ok")
        );
        process();
        assert_eq!(held_by(&b).len(), on_b as usize);
        assert_eq!(held_by(&b), names_on("b"));
        assert_eq!(count("SELECT count(*) FROM evolution_instances"), 8);
    }

    /// As PostgREST hands evoq_webhook a delivery with this secret header: its answer, or
    /// its error ("SQLSTATE: message").
    fn deliver(secret: &str, payload: serde_json::Value) -> Result<serde_json::Value, String> {
        Spi::run_with_args(
            "SELECT set_config('request.headers', $1, true)",
            &[serde_json::json!({"x-evoq-secret": secret})
                .to_string()
                .into()],
        )
        .unwrap();
        run("CREATE TEMP TABLE IF NOT EXISTS fleet_answer (r jsonb)");
        run("DELETE FROM fleet_answer");
        match error_of(&format!(
            "INSERT INTO fleet_answer SELECT evoq_webhook({}::jsonb)",
            pgrx::spi::quote_literal(payload.to_string())
        )) {
            Some(e) => Err(e),
            None => Ok(json("SELECT r FROM fleet_answer")),
        }
    }

    fn connection_update(name: &str, state: &str, at: &str) -> serde_json::Value {
        serde_json::json!({"event": "connection.update", "instance": name, "date_time": at,
            "data": {"state": state, "wuid": "5511999990000@s.whatsapp.net", "profileName": "U"}})
    }

    #[pg_test]
    fn a_delivery_counts_only_from_the_server_that_holds_the_instance() {
        let a = mock();
        let b = mock();
        configure(&a);
        profiles();
        run("SELECT evoq_server_set('default', capacity => 1)");
        add("b", &b, ", capacity => 1");
        let users = sign_up(2);
        assert_eq!(process()["created"], 2);
        let on_b = users
            .iter()
            .find(|u| instance_row(u)["server"] == "b")
            .unwrap()
            .clone();
        let name_b = s(&instance_row(&on_b)["instance_name"]).to_string();
        let secret_a = one::<String>("SELECT webhook_secret FROM evoq.settings").unwrap();
        let secret_b =
            one::<String>("SELECT webhook_secret FROM evoq.servers WHERE name = 'b'").unwrap();
        assert_ne!(secret_a, secret_b);
        assert_eq!(secret_b.len(), 64);
        // Each server gave its instances its own secret.
        let hook = &b.instance(&name_b).unwrap()["webhook"]["headers"];
        assert_eq!(s(&hook["x-evoq-secret"]), secret_b, "{hook}");
        // a's secret for b's instance: ignored and counted, the row unchanged, nothing relayed.
        // (The counter is a sequence: it outlives the other tests' rolled-back transactions.)
        let misdirected = count("SELECT webhooks_misdirected FROM evoq_status");
        let r = deliver(
            &secret_a,
            connection_update(&name_b, "open", "2099-01-01T00:00:00.000Z"),
        )
        .unwrap();
        assert_eq!(r["result"], "ignored", "{r}");
        assert_eq!(
            count("SELECT webhooks_misdirected FROM evoq_status"),
            misdirected + 1
        );
        assert_eq!(instance_row(&on_b)["instance_status"], "connecting");
        let message = serde_json::json!({"event": "messages.upsert", "instance": name_b,
            "date_time": "2099-01-01T00:00:01.000Z", "data": {"key": {"id": "m1"}}});
        assert_eq!(
            deliver(&secret_a, message.clone()).unwrap()["result"],
            "ignored"
        );
        assert_eq!(count("SELECT count(*) FROM evolution_instance_events"), 0);
        assert_eq!(
            count("SELECT webhooks_misdirected FROM evoq_status"),
            misdirected + 2
        );
        // b's own secret: applied.
        let r = deliver(
            &secret_b,
            connection_update(&name_b, "open", "2099-01-01T00:00:02.000Z"),
        )
        .unwrap();
        assert_eq!(r["result"], "applied", "{r}");
        assert_eq!(instance_row(&on_b)["instance_status"], "open");
        assert_eq!(deliver(&secret_b, message).unwrap()["result"], "relayed");
        // A rotation of b's secret: b's instance is given the new one by the next refresh (a's
        // are not asked), the old one is accepted until then and refused after.
        assert!(
            error_of("SELECT evoq_server_set('default', rotate_webhook_secret => true)")
                .is_some_and(|e| e.starts_with("22023"))
        );
        run("SELECT evoq_server_set('b', rotate_webhook_secret => true)");
        let new_b =
            one::<String>("SELECT webhook_secret FROM evoq.servers WHERE name = 'b'").unwrap();
        assert_ne!(new_b, secret_b);
        assert!(deliver(
            &secret_b,
            connection_update(&name_b, "open", "2099-01-01T00:00:03.000Z")
        )
        .is_ok());
        let sets_at_a = a.count_calls("POST", "/webhook/set");
        let refreshed = json("SELECT evoq_refresh_qr()");
        assert_eq!(refreshed["repointed"], 1, "{refreshed}");
        assert_eq!(
            a.count_calls("POST", "/webhook/set"),
            sets_at_a,
            "a was not asked"
        );
        let hook = &b.instance(&name_b).unwrap()["webhook"]["headers"];
        assert_eq!(s(&hook["x-evoq-secret"]), new_b, "{hook}");
        let old = deliver(
            &secret_b,
            connection_update(&name_b, "open", "2099-01-01T00:00:04.000Z"),
        );
        assert!(
            old.as_ref().is_err_and(|e| e.starts_with("42501")),
            "{old:?}"
        );
        assert!(deliver(
            &new_b,
            connection_update(&name_b, "open", "2099-01-01T00:00:05.000Z")
        )
        .is_ok());
    }

    #[pg_test]
    fn a_move_deletes_at_the_old_server_and_creates_at_the_new_one() {
        let a = mock();
        let b = mock();
        let c = mock();
        configure(&a);
        profiles();
        let users = sign_up(2);
        assert_eq!(process()["created"], 2);
        add("b", &b, ", capacity => 5");
        let (user, other) = (&users[0], &users[1]);
        let name = s(&instance_row(user)["instance_name"]).to_string();
        let moved = json(&format!("SELECT evoq_move('{user}', 'b')"));
        assert_eq!(moved["from"], "default", "{moved}");
        assert_eq!(moved["to"], "b");
        // The deletion at a, then the creation at b (one run each, or one run that does both).
        process();
        process();
        assert_eq!(
            a.count_calls("DELETE", &format!("/instance/logout/{name}")),
            1
        );
        assert_eq!(
            a.count_calls("DELETE", &format!("/instance/delete/{name}")),
            1
        );
        assert!(!held_by(&a).contains(&name));
        assert_eq!(held_by(&b), BTreeSet::from([name.clone()]));
        let row = instance_row(user);
        assert_eq!(
            (row["server"].as_str(), row["instance_status"].as_str()),
            (Some("b"), Some("connecting")),
            "{row}"
        );
        assert_eq!(queue_row(user)["status"], "completed");
        // Its next QR comes from b.
        make_refresh_due();
        json("SELECT evoq_refresh_qr()");
        assert_eq!(
            b.count_calls("GET", &format!("/instance/connect/{name}")),
            1
        );
        assert_eq!(
            a.count_calls("GET", &format!("/instance/connect/{name}")),
            0
        );
        // A linked instance moves only with force; to_server NULL is the best other server.
        let other_name = s(&instance_row(other)["instance_name"]).to_string();
        a.scan(&other_name, None, None);
        make_refresh_due();
        json("SELECT evoq_refresh_qr()");
        assert_eq!(instance_row(other)["instance_status"], "open");
        let e = error_of(&format!("SELECT evoq_move('{other}')")).unwrap_or_default();
        assert!(e.starts_with("55000") && e.contains("force => true"), "{e}");
        add("c", &c, "");
        let moved = json(&format!("SELECT evoq_move('{other}', force => true)"));
        assert_eq!(
            moved["to"], "c",
            "unbounded c has the most free capacity: {moved}"
        );
        process();
        process();
        assert_eq!(held_by(&c), BTreeSet::from([other_name]));
        assert!(held_by(&a).is_empty());
        // Bad input, each refused with nothing changed.
        let nobody = "00000000-0000-0000-0000-000000000001";
        for (sql, code) in [
            (format!("SELECT evoq_move('{nobody}')"), "55000"),
            (format!("SELECT evoq_move('{user}', 'nope')"), "22023"),
            (format!("SELECT evoq_move('{user}', 'b')"), "22023"),
        ] {
            let e = error_of(&sql).unwrap_or_default();
            assert!(e.starts_with(code), "{sql}: {e}");
        }
        run("SELECT evoq_server_drain('default')");
        let e = error_of(&format!("SELECT evoq_move('{user}', 'default')")).unwrap_or_default();
        assert!(e.starts_with("55000"), "draining: {e}");
        run("SELECT evoq_server_drain('default', false)");
        // default full: a sign-up while b and c drain fills its one slot
        run("SELECT evoq_server_set('default', capacity => 1)");
        run("SELECT evoq_server_drain('b')");
        run("SELECT evoq_server_drain('c')");
        sign_up(1);
        process();
        assert_eq!(free_slots("default"), 0);
        let e = error_of(&format!("SELECT evoq_move('{user}', 'default')")).unwrap_or_default();
        assert!(e.starts_with("55000") && e.contains("full"), "full: {e}");
        assert_eq!(instance_row(user)["server"], "b");
        supabase_like();
        for role in ["anon", "authenticated", "service_role"] {
            run(&format!("SET ROLE {role}"));
            let e = error_of(&format!("SELECT evoq_move('{user}', 'c')"));
            run("RESET ROLE");
            assert!(
                e.as_deref().is_some_and(|e| e.starts_with("42501")),
                "{role}: {e:?}"
            );
        }
    }

    #[pg_test]
    fn a_drain_with_moves_moves_the_unlinked_instances_and_leaves_the_linked_one() {
        let a = mock();
        let b = mock();
        configure(&a);
        profiles();
        let users = sign_up(4);
        assert_eq!(process()["created"], 4);
        let linked = s(&instance_row(&users[0])["instance_name"]).to_string();
        a.scan(&linked, None, None);
        make_refresh_due();
        json("SELECT evoq_refresh_qr()");
        add("b", &b, "");
        run("SET evoq.concurrency = 2");
        let drained = json("SELECT evoq_server_drain('default', move_unlinked => true)");
        assert_eq!(drained["moving"], 3, "{drained}");
        assert_eq!(drained["draining"], true);
        process();
        process();
        assert_eq!(held_by(&a), BTreeSet::from([linked]));
        assert_eq!(held_by(&b).len(), 3);
        assert_eq!(held_by(&b), names_on("b"));
        assert!(
            error_of("SELECT evoq_server_drain('default', false, move_unlinked => true)")
                .is_some_and(|e| e.starts_with("22023"))
        );
    }

    #[pg_test]
    fn a_drain_or_a_removal_never_leaves_a_user_without_a_server() {
        let a = mock();
        let b = mock();
        let c = mock();
        configure(&a);
        profiles();
        let users = sign_up(2);
        assert_eq!(process()["created"], 2);
        add("b", &b, ", capacity => 1");
        run("SELECT evoq_server_drain('b')");
        // Nowhere to go: refused, and nothing changed (default does not drain, nothing moves).
        let e = error_of("SELECT evoq_server_drain('default', move_unlinked => true)").unwrap();
        assert!(e.starts_with("55000"), "{e}");
        assert_eq!(
            one::<bool>("SELECT draining FROM evoq.servers WHERE name = 'default'"),
            Some(false)
        );
        assert_eq!(
            count("SELECT count(*) FROM evolution_instance_creation_queue WHERE action = 'delete'"),
            0
        );
        // b has room for one: one moves, the other stays until there is room.
        run("SELECT evoq_server_drain('b', false)");
        let drained = json("SELECT evoq_server_drain('default', move_unlinked => true)");
        assert_eq!(drained["moving"], 1, "{drained}");
        process();
        process();
        assert_eq!(held_by(&b).len(), 1);
        assert_eq!(held_by(&a).len(), 1);
        // A move on its way to c: c cannot be removed without force, and with force the move
        // is placed afresh (at b, given room) instead of at a server that is gone.
        let staying = users
            .iter()
            .find(|u| instance_row(u)["server"] == "default")
            .unwrap()
            .clone();
        add("c", &c, "");
        run("SELECT evoq_server_set('b', capacity => 2)");
        json(&format!("SELECT evoq_move('{staying}', 'c')"));
        let e = error_of("SELECT evoq_server_remove('c')").unwrap();
        assert!(e.starts_with("55006"), "{e}");
        json("SELECT evoq_server_remove('c', force => true)");
        assert_eq!(queue_row(&staying)["move_to"], "");
        process();
        process();
        assert_eq!(queue_row(&staying)["server"], "b");
        assert_eq!(queue_row(&staying)["status"], "completed");
        assert_eq!(held_by(&b).len(), 2);
        assert!(held_by(&a).is_empty());
        assert_eq!(c.count_calls("POST", "/instance/create"), 0);
    }

    #[pg_test]
    fn servers_refuse_bad_input_and_never_show_their_key() {
        let key = "sk-evoq-test-b-9d2c-DO-NOT-LEAK";
        let a = mock();
        let b = mock_with_key(key);
        let err = |sql: &str| error_of(sql).unwrap_or_else(|| panic!("{sql} did not fail"));
        assert!(
            err(&format!("SELECT evoq_server_add('b', '{}', 'k')", b.url())).starts_with("55000")
        );
        configure(&a);
        profiles();
        let url = b.url();
        // evoq_server_add hides its statement from the log while it runs, and only then.
        let logged = one::<String>("SELECT current_setting('log_min_error_statement')");
        json(&format!("SELECT evoq_server_add('z', '{url}/z', '{key}')"));
        json("SELECT evoq_server_set('z', capacity => 3)");
        assert_eq!(
            one::<String>("SELECT current_setting('log_min_error_statement')"),
            logged
        );
        json("SELECT evoq_server_remove('z')");
        for (sql, code) in [
            (
                format!("SELECT evoq_server_add('B C', '{url}', '{key}')"),
                "22023",
            ),
            (
                format!("SELECT evoq_server_add('default', '{url}', '{key}')"),
                "23505",
            ),
            (
                format!("SELECT evoq_server_add('b', 'ftp://example.com', '{key}')"),
                "22023",
            ),
            (
                format!("SELECT evoq_server_add('b', '{}', '{key}')", a.url()),
                "23505",
            ),
            (
                format!("SELECT evoq_server_add('b', '{url}/', '{key}', capacity => 0)"),
                "22023",
            ),
            (
                format!("SELECT evoq_server_add('b', '{url}', '{key}', max_in_flight => 0)"),
                "22023",
            ),
            (
                format!("SELECT evoq_server_add('b', '{url}', '{key}', api_version => 'v3')"),
                "22023",
            ),
            (
                format!("SELECT evoq_server_add('b', '{url}', NULL)"),
                "22023",
            ),
            (
                format!("SELECT evoq_server_add('b', '{url}', '  ')"),
                "22023",
            ),
        ] {
            let e = err(&sql);
            assert!(e.starts_with(code), "{sql}: {e}");
            assert!(!e.contains(key), "{e}");
        }
        assert_eq!(
            count("SELECT count(*) FROM evoq.servers"),
            1,
            "nothing was added"
        );
        let port = b.port();
        let added = json(&format!(
            "SELECT evoq_server_add('b', 'http://user:pw@127.0.0.1:{port}/', '{key}', capacity => 1)"
        ));
        assert_eq!(added["name"], "b");
        assert!(!added.to_string().contains(key));
        let row = one::<String>("SELECT row_to_json(s)::text FROM evoq_servers s WHERE name = 'b'")
            .unwrap();
        assert!(!row.contains(key) && !row.contains("pw@"), "{row}");
        assert!(row.contains("***@127.0.0.1"), "{row}");
        // Set: default's connection is evoq_configure's; one URL, one server.
        assert!(err(&format!(
            "SELECT evoq_server_set('default', api_url => '{url}')"
        ))
        .starts_with("22023"));
        assert!(err(&format!(
            "SELECT evoq_server_set('b', api_url => '{}')",
            a.url()
        ))
        .starts_with("23505"));
        assert!(err("SELECT evoq_server_set('b', api_key => '')").starts_with("22023"));
        run(&format!(
            "SELECT evoq_server_set('b', api_url => '{url}', api_key => '{key}')"
        ));
        assert!(err(&format!(
            "SELECT evoq_configure(api_url => '{url}', api_key => 'k')"
        ))
        .starts_with("22023"));
        // Remove: unknown, default, and one that holds an instance.
        assert!(err("SELECT evoq_server_remove('nope')").starts_with("22023"));
        assert!(err("SELECT evoq_server_remove('default')").starts_with("22023"));
        run("SELECT evoq_server_set('default', capacity => 1)");
        let users = sign_up(2);
        process();
        let on_b = users
            .iter()
            .find(|u| instance_row(u)["server"] == "b")
            .unwrap()
            .clone();
        let e = err("SELECT evoq_server_remove('b')");
        assert!(e.starts_with("55006") && e.contains("force => true"), "{e}");
        run("INSERT INTO evoq.circuit (server, opened_at, cause, next_probe_at) VALUES ('b', now(), 'x', now())");
        let removed = json("SELECT evoq_server_remove('b', force => true)");
        assert_eq!(removed["instances_lost"], 1, "{removed}");
        assert_eq!(
            count("SELECT count(*) FROM evoq.circuit"),
            0,
            "its circuit went with it"
        );
        assert_eq!(instance_row(&on_b)["instance_status"], "lost");
        // Its user is placed again: default has room once more.
        run("SELECT evoq_server_set('default', clear => '{capacity}')");
        assert_eq!(process()["created"], 1);
        assert_eq!(instance_row(&on_b)["server"], "default");
        // API roles may not call any of them.
        supabase_like();
        for role in ["anon", "authenticated", "service_role"] {
            for sql in [
                format!("SELECT evoq_server_add('c', 'http://127.0.0.1:9', '{key}')"),
                "SELECT evoq_server_remove('default')".to_string(),
                "SELECT evoq_server_set('default', capacity => 1)".to_string(),
            ] {
                run(&format!("SET ROLE {role}"));
                let e = error_of(&sql);
                run("RESET ROLE");
                assert!(
                    e.as_deref().is_some_and(|e| e.starts_with("42501")),
                    "{role}: {sql}: {e:?}"
                );
            }
        }
    }
}
