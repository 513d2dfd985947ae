//! pg_tests: evoq_process_queue: creation, adoption, the fault matrix, retries and time budgets.
//! Each test runs in its own rolled-back transaction against its own mock Evolution API.

#[pgrx::pg_schema]
mod tests {
    use crate::testing::*;
    use evolution_mock::{FaultKind, Flavor};
    use pgrx::prelude::*;
    use serde_json::Value;
    use std::time::{Duration, Instant};

    #[pg_test]
    fn process_before_configure_is_a_clear_error_and_changes_nothing() {
        run("DELETE FROM evoq.settings");
        profiles();
        let users = sign_up(1);
        let err = error_of("SELECT evoq_process_queue()").unwrap();
        assert!(
            err.starts_with("55000")
                && err.contains("evoq is not configured")
                && err.contains("evoq_configure"),
            "{err}"
        );
        assert!(error_of("SELECT evoq_refresh_qr()")
            .unwrap()
            .contains("evoq is not configured"));
        let row = queue_row(&users[0]);
        assert_eq!(
            (
                row["status"].clone(),
                row["retry_count"].clone(),
                row["attempts"].clone()
            ),
            ("pending".into(), 0.into(), 0.into())
        );
    }

    #[pg_test]
    fn process_creates_instances_with_webhook_v2() {
        let mock = mock();
        configure(&mock);
        profiles();
        let users = sign_up(3);
        let summary = json("SELECT evoq_process_queue()");
        assert_eq!(summary["created"], 3, "{summary}");
        assert_eq!(summary["claimed"], 3);
        assert_eq!(summary["stopped"], "drained");
        assert_eq!(summary["api_version"], "v2");
        assert!(!summary.to_string().contains(API_KEY));

        for user in &users {
            let name = one::<String>(&format!("SELECT evoq_instance_name('{user}')")).unwrap();
            let q = queue_row(user);
            assert_eq!(q["status"], "completed");
            assert!(q["processed_at"].is_string());
            assert_eq!(q["instance_name"], name.as_str());
            assert_eq!(q["error_message"], Value::Null);
            let i = instance_row(user);
            assert_eq!(i["instance_status"], "connecting");
            assert_eq!(i["instance_name"], name.as_str());
            assert!(i["instance_id"].is_string());
            // The create reply said {"count":0}: no QR yet.
            assert_eq!(i["qr_code"], Value::Null);
            let server = mock.instance(&name).expect("created at the mock");
            // The token is kept privately, and it is the one the server issued.
            let token = one::<String>(&format!(
                "SELECT token FROM evoq.instance_tokens WHERE instance_name = '{name}'"
            ))
            .unwrap();
            assert_eq!(server["token"], token.as_str());
        }
        assert_eq!(mock.count_calls("POST", "/instance/create"), 3);
        assert_eq!(mock.count_calls("GET", "/"), 1, "one version probe per run");
        let create = mock
            .calls()
            .into_iter()
            .find(|c| c["path"] == "/instance/create")
            .unwrap();
        assert_eq!(create["apikey"], API_KEY);
        assert_eq!(create["body"]["integration"], "WHATSAPP-BAILEYS");
        assert_eq!(create["body"]["qrcode"], true);
        assert_eq!(
            create["body"]["webhook"]["url"],
            "https://app.example/hooks/evolution"
        );
        assert_eq!(
            create["body"]["webhook"]["events"],
            serde_json::json!(["QRCODE_UPDATED", "CONNECTION_UPDATE"])
        );

        // Nothing left: a second run makes no call at all.
        let calls_before = mock.calls().len();
        let again = json("SELECT evoq_process_queue()");
        assert_eq!(again["claimed"], 0);
        assert_eq!(mock.calls().len(), calls_before);
    }

    #[pg_test]
    fn process_speaks_v1_8_to_a_v1_8_server() {
        let mock = mock_with(Flavor::V1);
        mock.set_qr_on_create(true);
        configure(&mock);
        profiles();
        let users = sign_up(1);
        let summary = json("SELECT evoq_process_queue()");
        assert_eq!(summary["created"], 1, "{summary}");
        assert_eq!(summary["api_version"], "v1");
        let create = mock
            .calls()
            .into_iter()
            .find(|c| c["path"] == "/instance/create")
            .unwrap();
        // v1.8 sends no custom headers: the webhook secret rides in the URL.
        assert_eq!(
            s(&create["body"]["webhook"]),
            format!(
                "https://app.example/hooks/evolution?evoq_secret={}",
                one::<String>("SELECT webhook_secret FROM evoq.settings").unwrap()
            )
        );
        assert_eq!(
            create["body"]["events"],
            serde_json::json!(["QRCODE_UPDATED", "CONNECTION_UPDATE"])
        );
        let i = instance_row(&users[0]);
        assert!(
            s(&i["qr_code"]).starts_with("data:image/png;base64,"),
            "{i}"
        );
        assert!(s(&i["qr_text"]).starts_with("2@"));
        assert!(i["last_qr_update"].is_string());
        let name = s(&i["instance_name"]).to_string();
        let token = one::<String>(&format!(
            "SELECT token FROM evoq.instance_tokens WHERE instance_name = '{name}'"
        ))
        .unwrap();
        assert_eq!(mock.instance(&name).unwrap()["token"], token.as_str());
    }

    #[pg_test]
    fn a_taken_name_is_adopted_never_duplicated() {
        let mock = mock();
        configure(&mock);
        profiles();
        let users = sign_up(1);
        let name = one::<String>(&format!("SELECT evoq_instance_name('{}')", users[0])).unwrap();
        // An earlier attempt created the instance but its answer was lost.
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let resp = agent
            .post(&format!("{}/instance/create", mock.url()))
            .header("apikey", API_KEY)
            .send_json(serde_json::json!({"instanceName": name, "integration": "WHATSAPP-BAILEYS"}))
            .unwrap();
        assert_eq!(resp.status().as_u16(), 201);

        let summary = json("SELECT evoq_process_queue()");
        assert_eq!(summary["adopted"], 1, "{summary}");
        assert_eq!(mock.instance_names().len(), 1);
        assert_eq!(mock.count_calls("GET", "/instance/fetchInstances"), 1);
        assert_eq!(
            mock.count_calls("POST", "/webhook/set/"),
            1,
            "the adopted instance gets our webhook"
        );
        let hook = mock
            .calls()
            .into_iter()
            .find(|c| s(&c["path"]).starts_with("/webhook/set/"))
            .unwrap();
        assert_eq!(hook["body"]["webhook"]["enabled"], true);
        assert_eq!(queue_row(&users[0])["status"], "completed");
        assert_eq!(
            instance_row(&users[0])["instance_id"],
            mock.instance(&name).unwrap()["id"]
        );
    }

    /// Runs one process_queue over `n` fresh users with `rule` installed and returns the users.
    fn process_with_fault(
        mock: &evolution_mock::MockServer,
        n: usize,
        rule: evolution_mock::FaultRule,
    ) -> (Vec<String>, Value) {
        configure(mock);
        profiles();
        let users = sign_up(n);
        mock.add_fault(rule);
        let summary = json("SELECT evoq_process_queue()");
        (users, summary)
    }

    fn assert_retrying(row: &Value, needle: &str) {
        assert_eq!(row["status"], "pending", "{row}");
        assert_eq!(row["retry_count"], 1, "{row}");
        assert_eq!(row["attempts"], 1, "{row}");
        assert_eq!(row["error_kind"], "transient", "{row}");
        assert!(
            s(&row["error_message"]).contains(needle),
            "{needle:?} not in {row}"
        );
        assert!(!s(&row["error_message"]).contains(API_KEY));
        assert!(row["last_error_at"].is_string());
    }

    fn next_attempt_in_seconds(user: &str) -> f64 {
        one::<f64>(&format!(
            "SELECT extract(epoch FROM next_attempt_at - clock_timestamp())::float8 FROM evolution_instance_creation_queue WHERE user_id = '{user}'"
        ))
        .unwrap()
    }

    #[pg_test]
    fn a_500_is_retried_with_backoff_and_the_other_rows_go_on() {
        let mock = mock();
        run("SET LOCAL evoq.backoff_base_ms = 60000");
        let (users, summary) = process_with_fault(
            &mock,
            3,
            fault(
                "POST",
                "/instance/create",
                FaultKind::Status { code: 500 },
                Some(1),
            ),
        );
        assert_eq!(
            (summary["created"].clone(), summary["retrying"].clone()),
            (2.into(), 1.into()),
            "{summary}"
        );
        let failed: Vec<&String> = users
            .iter()
            .filter(|u| queue_row(u)["status"] == "pending")
            .collect();
        assert_eq!(failed.len(), 1);
        let row = queue_row(failed[0]);
        assert_retrying(
            &row,
            "Evolution API answered 500 to POST /instance/create: mock fault: internal error",
        );
        assert_eq!(row["last_http_status"], 500);
        // Backoff: between half and all of the 60 s base for the first retry.
        let wait = next_attempt_in_seconds(failed[0]);
        assert!((29.0..=60.5).contains(&wait), "next attempt in {wait} s");
        // Not due yet: a second run does not touch it.
        assert_eq!(json("SELECT evoq_process_queue()")["claimed"], 0);
        // Once due it succeeds.
        make_all_due();
        assert_eq!(json("SELECT evoq_process_queue()")["created"], 1);
        assert_eq!(queue_row(failed[0])["status"], "completed");
        assert_eq!(queue_row(failed[0])["retry_count"], 1);
    }

    #[pg_test]
    fn permanent_errors_fail_at_once_and_evoq_retry_requeues() {
        let mock = mock();
        let (users, summary) = process_with_fault(
            &mock,
            1,
            fault(
                "POST",
                "/instance/create",
                FaultKind::Status { code: 400 },
                None,
            ),
        );
        assert_eq!(summary["failed"], 1, "{summary}");
        let row = queue_row(&users[0]);
        assert_eq!(row["status"], "failed");
        assert_eq!(row["error_kind"], "permanent");
        assert_eq!(row["last_http_status"], 400);
        assert!(
            s(&row["error_message"]).contains("mock fault: bad request"),
            "{row}"
        );
        mock.clear_faults();
        assert_eq!(one::<i64>("SELECT evoq_retry()"), Some(1));
        let row = queue_row(&users[0]);
        assert_eq!(
            (row["status"].clone(), row["attempts"].clone()),
            ("pending".into(), 0.into())
        );
        assert_eq!(json("SELECT evoq_process_queue()")["created"], 1);
        assert_eq!(
            one::<i64>(&format!("SELECT evoq_retry('{}')", users[0])),
            Some(0)
        );
    }

    #[pg_test]
    fn a_rejected_key_stops_the_run_and_charges_no_row() {
        let mock = mock();
        run("SET LOCAL evoq.batch_size = 2");
        let (users, summary) = process_with_fault(
            &mock,
            5,
            fault(
                "POST",
                "/instance/create",
                FaultKind::Status { code: 401 },
                None,
            ),
        );
        assert_eq!(summary["stopped"], "circuit_open", "{summary}");
        // Streaming: rows claimed while the first calls were in flight are released as well.
        assert!(summary["claimed"].as_u64().unwrap() >= 2, "{summary}");
        assert_eq!(summary["released"], summary["claimed"], "{summary}");
        for u in &users {
            let row = queue_row(u);
            assert_eq!(
                (row["status"].clone(), row["attempts"].clone()),
                ("pending".into(), 0.into()),
                "{row}"
            );
        }
        let status = json("SELECT to_jsonb(s) FROM evoq_status s");
        let cause = s(&status["circuit_cause"]);
        assert!(
            cause.contains("401") && cause.contains("check the api_key"),
            "{status}"
        );
        assert!(!status.to_string().contains(API_KEY));
    }

    #[pg_test]
    fn malformed_replies_are_transient() {
        for (kind, needle) in [
            (
                FaultKind::Garbage,
                "malformed reply to POST /instance/create: not JSON",
            ),
            (FaultKind::MissingFields, "missing the instance object"),
            (FaultKind::Error200, "mock fault: 200 with error"),
            (FaultKind::Empty200, "empty reply to POST /instance/create"),
            (
                FaultKind::Drop,
                "POST /instance/create to the Evolution API failed",
            ),
        ] {
            run("DROP TABLE IF EXISTS public.profiles; DELETE FROM evolution_instance_creation_queue");
            let mock = mock();
            let (users, summary) =
                process_with_fault(&mock, 1, fault("POST", "/instance/create", kind, None));
            assert_eq!(summary["retrying"], 1, "{summary}");
            assert_retrying(&queue_row(&users[0]), needle);
        }
    }

    #[pg_test]
    fn an_unreachable_api_opens_the_circuit_and_charges_no_row() {
        // A port nobody listens on: bind one, then let it go.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Spi::run_with_args(
            "SELECT evoq_configure($1, $2)",
            &[format!("http://127.0.0.1:{port}").into(), API_KEY.into()],
        )
        .unwrap();
        profiles();
        let users = sign_up(2);
        let summary = json("SELECT evoq_process_queue()");
        assert_eq!(summary["stopped"], "circuit_open", "{summary}");
        for u in &users {
            let row = queue_row(u);
            assert_eq!(
                (row["status"].clone(), row["attempts"].clone()),
                ("pending".into(), 0.into()),
                "{row}"
            );
        }
        let status = json("SELECT to_jsonb(s) FROM evoq_status s");
        assert!(
            s(&status["last_error"]).contains("connection refused"),
            "{status}"
        );
        assert!(
            s(&status["circuit_cause"]).contains("connection refused"),
            "{status}"
        );
        assert_eq!(status["circuit"], "open");
    }

    #[pg_test]
    fn a_hanging_or_slow_api_times_out_within_the_budget() {
        let mock = mock();
        run("SET LOCAL evoq.request_timeout_ms = 400");
        mock.add_fault(fault(
            "POST",
            "/instance/create",
            FaultKind::Delay { ms: 250 },
            Some(1),
        ));
        let (users, summary) = process_with_fault(
            &mock,
            3,
            fault("POST", "/instance/create", FaultKind::Hang, Some(1)),
        );
        // One call hung (timed out), one was slow but inside the timeout, one was quick.
        assert_eq!(
            (summary["created"].clone(), summary["retrying"].clone()),
            (2.into(), 1.into()),
            "{summary}"
        );
        let hung = users
            .iter()
            .map(|u| queue_row(u))
            .find(|r| r["status"] == "pending")
            .unwrap();
        assert_retrying(&hung, "did not answer POST /instance/create within 400 ms");

        // Latency just over the timeout, and a run budget shorter than the hang: the run still
        // returns inside its budget and the unanswered call is recorded as such.
        run("DELETE FROM evolution_instance_creation_queue");
        mock.clear_faults();
        mock.add_fault(fault(
            "POST",
            "/instance/create",
            FaultKind::Delay { ms: 600 },
            None,
        ));
        sign_up(1);
        assert_eq!(json("SELECT evoq_process_queue()")["retrying"], 1);
        run("DELETE FROM evolution_instance_creation_queue");
        run("SET LOCAL evoq.request_timeout_ms = 60000; SET LOCAL evoq.time_budget_ms = 1500");
        mock.clear_faults();
        mock.add_fault(fault("POST", "/instance/create", FaultKind::Hang, None));
        let users = sign_up(1);
        let started = Instant::now();
        let summary = json("SELECT evoq_process_queue()");
        assert!(
            started.elapsed() < Duration::from_millis(4000),
            "run took {:?}",
            started.elapsed()
        );
        assert_retrying(&queue_row(&users[0]), "time budget");
        assert_eq!(summary["retrying"], 1);
    }

    /// How many times `evoq._claim_queue` ran in this transaction so far.
    fn claims_so_far() -> i64 {
        count("SELECT coalesce(pg_stat_get_xact_function_calls('evoq._claim_queue(text, integer, bigint)'::regprocedure), 0)")
    }

    #[pg_test]
    fn a_run_claims_its_reserve_a_batch_at_a_time() {
        // One transaction holds every row the run claims, so its reserve is a batch (0.7.0 kept
        // one concurrency's worth and claimed every half of it: at 50 ms and concurrency 16
        // that was a claim per 8 calls, most of the run's CPU).
        let mock = mock();
        configure(&mock);
        run("SET LOCAL track_functions = 'pl'");
        run("SET LOCAL evoq.concurrency = 16; SET LOCAL evoq.batch_size = 200");
        run("INSERT INTO evolution_instance_creation_queue (user_id) SELECT gen_random_uuid() FROM generate_series(1, 400)");
        let before = claims_so_far();
        let summary = json("SELECT evoq_process_queue()");
        assert_eq!(summary["created"], 400, "{summary}");
        let claims = claims_so_far() - before;
        // 200, then a top-up of about 100 each time half the reserve is gone, and the last
        // claim that finds nothing: 5 or 6. A reserve of 16 took at least 25.
        assert!(claims <= 8, "{claims} claims for 400 rows: {summary}");
        assert_eq!(mock.count_calls("POST", "/instance/create"), 400);
    }

    #[pg_test]
    fn rows_waiting_in_the_reserve_past_their_lease_are_not_claimed_twice() {
        // What makes a reserve of a whole batch safe in a SQL function (see sql_reserve): the
        // lease is 4 x 200 ms + 10 s = 10.8 s; one call at a time, 120 ms each, so the run
        // claims 200 rows and tops its reserve up when 100 are left, 99 calls (11.9 s) in. By
        // then the 100 rows still waiting are past their lease. A claim that compared leases
        // with the clock instead of the transaction's start would find them due, this run's
        // own rows, and create each of them twice.
        let mock = mock();
        configure(&mock);
        mock.set_latency_ms(120);
        run("SET LOCAL evoq.concurrency = 1; SET LOCAL evoq.batch_size = 200; SET LOCAL evoq.request_timeout_ms = 200");
        run("INSERT INTO evolution_instance_creation_queue (user_id) SELECT gen_random_uuid() FROM generate_series(1, 200)");
        let summary = json("SELECT evoq_process_queue()");
        assert_eq!(summary["claimed"], 200, "{summary}");
        assert_eq!(summary["created"], 200, "{summary}");
        assert_eq!(summary["adopted"], 0, "{summary}");
        assert_eq!(
            mock.count_calls("POST", "/instance/create"),
            200,
            "one create per row"
        );
        assert_eq!(
            count("SELECT count(*) FROM evolution_instance_creation_queue WHERE status = 'completed' AND attempts = 1"),
            200
        );
    }

    #[pg_test]
    fn max_attempts_leaves_the_row_failed_with_its_last_error() {
        let mock = mock();
        run("SET LOCAL evoq.max_attempts = 3");
        let (users, _) = process_with_fault(
            &mock,
            1,
            fault(
                "POST",
                "/instance/create",
                FaultKind::Status { code: 503 },
                None,
            ),
        );
        for _ in 0..2 {
            make_all_due();
            json("SELECT evoq_process_queue()");
        }
        let row = queue_row(&users[0]);
        assert_eq!(row["status"], "failed", "{row}");
        assert_eq!(row["attempts"], 3);
        assert_eq!(row["retry_count"], 3);
        assert!(s(&row["error_message"]).contains("503"));
        make_all_due();
        assert_eq!(
            json("SELECT evoq_process_queue()")["claimed"],
            0,
            "failed rows are not claimed"
        );
        let status = json("SELECT to_jsonb(s) FROM evoq_status s");
        assert_eq!(status["failed"], 1);
    }
}
