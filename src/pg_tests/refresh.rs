//! pg_tests: evoq_refresh_qr: new QRs, scans, lost instances and its fault matrix.
//! Each test runs in its own rolled-back transaction against its own mock Evolution API.

#[pgrx::pg_schema]
mod tests {
    use crate::testing::*;
    use evolution_mock::FaultKind;
    use pgrx::prelude::*;
    use serde_json::Value;
    use std::time::{Duration, Instant};

    #[pg_test]
    fn refresh_stores_new_qrs_and_notices_the_scan() {
        let mock = mock();
        let (user, name) = created_instance(&mock);
        let summary = json("SELECT evoq_refresh_qr()");
        assert_eq!(summary["new_qr"], 1, "{summary}");
        let first = instance_row(&user);
        assert!(
            s(&first["qr_code"]).starts_with("data:image/png;base64,"),
            "{first}"
        );
        assert!(s(&first["qr_text"]).starts_with("2@"));
        assert!(first["last_qr_update"].is_string());

        // Within evoq.qr_refresh_interval_ms nothing is asked again.
        assert_eq!(json("SELECT evoq_refresh_qr()")["checked"], 0);
        make_refresh_due();
        json("SELECT evoq_refresh_qr()");
        let second = instance_row(&user);
        assert_ne!(
            second["qr_text"], first["qr_text"],
            "the mock rotates the QR on every call (qr_ttl_ms = 0)"
        );

        // The user scans it.
        assert!(mock.set_state(&name, "open"));
        make_refresh_due();
        let summary = json("SELECT evoq_refresh_qr()");
        assert_eq!(summary["opened"], 1, "{summary}");
        let open = instance_row(&user);
        assert_eq!(open["instance_status"], "open");
        assert_eq!(open["qr_code"], Value::Null);
        assert_eq!(open["qr_text"], Value::Null);
        assert!(open["connected_at"].is_string());
        // Refreshing stops for open instances.
        make_refresh_due();
        let calls = mock.count_calls("GET", "/instance/connect/");
        assert_eq!(json("SELECT evoq_refresh_qr()")["checked"], 0);
        assert_eq!(mock.count_calls("GET", "/instance/connect/"), calls);
    }

    #[pg_test]
    fn refresh_requeues_an_instance_the_server_lost() {
        let mock = mock();
        let (user, name) = created_instance(&mock);
        assert!(mock.remove_instance(&name));
        let summary = json("SELECT evoq_refresh_qr()");
        assert_eq!(summary["lost"], 1, "{summary}");
        assert_eq!(instance_row(&user)["instance_status"], "lost");
        let q = queue_row(&user);
        assert_eq!(q["status"], "pending");
        assert_eq!(q["retry_count"], 1);
        // The next processing run creates it again, and refreshing resumes.
        assert_eq!(json("SELECT evoq_process_queue()")["created"], 1);
        assert_eq!(instance_row(&user)["instance_status"], "connecting");
        assert!(mock.instance(&name).is_some());
    }

    #[pg_test]
    fn refresh_records_errors_per_instance_and_goes_on() {
        let mock = mock();
        configure(&mock);
        profiles();
        let users = sign_up(3);
        json("SELECT evoq_process_queue()");
        make_refresh_due();
        let bad = s(&instance_row(&users[1])["instance_name"]).to_string();
        mock.add_fault(fault(
            "GET",
            &format!("/instance/connect/{bad}"),
            FaultKind::Error200,
            None,
        ));
        let summary = json("SELECT evoq_refresh_qr()");
        assert_eq!(
            (summary["new_qr"].clone(), summary["errors"].clone()),
            (2.into(), 1.into()),
            "{summary}"
        );
        let row = instance_row(&users[1]);
        assert_eq!(row["instance_status"], "connecting");
        assert!(
            s(&row["last_error"]).contains("mock fault: 200 with error"),
            "{row}"
        );
        assert!(instance_row(&users[0])["qr_text"].is_string());
    }

    #[pg_test]
    fn refresh_fault_matrix_records_each_failure_and_goes_on() {
        run("SET LOCAL evoq.request_timeout_ms = 400");
        for (kind, needle) in [
            (
                FaultKind::Hang,
                "did not answer GET /instance/connect within 400 ms",
            ),
            (FaultKind::Delay { ms: 600 }, "within 400 ms"),
            (
                FaultKind::Status { code: 500 },
                "mock fault: internal error",
            ),
            (FaultKind::Status { code: 401 }, "answered 401"),
            (FaultKind::Status { code: 400 }, "mock fault: bad request"),
            (
                FaultKind::Garbage,
                "malformed reply to GET /instance/connect: not JSON",
            ),
            (FaultKind::Empty200, "empty reply to GET /instance/connect"),
            (
                FaultKind::MissingFields,
                "neither a QR, a count nor a state",
            ),
            (
                FaultKind::Drop,
                "GET /instance/connect to the Evolution API failed",
            ),
        ] {
            run("DROP TABLE IF EXISTS public.profiles; DELETE FROM evolution_instances; DELETE FROM evolution_instance_creation_queue");
            let mock = mock();
            configure(&mock);
            profiles();
            let users = sign_up(2);
            json("SELECT evoq_process_queue()");
            make_refresh_due();
            let bad = s(&instance_row(&users[0])["instance_name"]).to_string();
            mock.add_fault(fault(
                "GET",
                &format!("/instance/connect/{bad}"),
                kind.clone(),
                None,
            ));
            let started = Instant::now();
            let summary = json("SELECT evoq_refresh_qr()");
            assert!(started.elapsed() < Duration::from_secs(5));
            assert_eq!(
                (summary["errors"].clone(), summary["new_qr"].clone()),
                (1.into(), 1.into()),
                "{kind:?}: {summary}"
            );
            let row = instance_row(&users[0]);
            assert_eq!(row["instance_status"], "connecting", "{kind:?}");
            assert!(
                s(&row["last_error"]).contains(needle),
                "{kind:?}: {needle:?} not in {row}"
            );
            assert!(!s(&row["last_error"]).contains(API_KEY));
            assert!(row["last_error_at"].is_string());
            assert!(
                s(&instance_row(&users[1])["qr_text"]).starts_with("2@"),
                "the other instance was refreshed"
            );
        }
        // Connection refused for the whole server.
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
        make_refresh_due();
        let summary = json("SELECT evoq_refresh_qr()");
        assert_eq!(summary["stopped"], "circuit_open", "{summary}");
        assert!(s(&summary["last_error"]).contains("connection refused"));
    }

    #[pg_test]
    fn a_failing_version_probe_falls_back_to_v2() {
        let mock = mock();
        mock.add_fault(evolution_mock::FaultRule {
            method: Some("GET".into()),
            path_contains: "/".into(),
            path_equals: None,
            kind: FaultKind::Garbage,
            times: Some(1),
        });
        configure(&mock);
        profiles();
        sign_up(1);
        let summary = json("SELECT evoq_process_queue()");
        assert_eq!(summary["created"], 1, "{summary}");
        assert_eq!(summary["api_version"], "v2");
        assert!(
            s(&summary["last_error"]).contains("assuming v2"),
            "{summary}"
        );
        // A configured version skips the probe.
        run("SELECT evoq_configure('http://127.0.0.1:1', 'k', api_version => 'v1')");
        Spi::run_with_args(
            "SELECT evoq_configure($1, $2, api_version => 'v2')",
            &[mock.url().into(), API_KEY.into()],
        )
        .unwrap();
        let probes = mock.count_calls("GET", "/");
        sign_up(1);
        assert_eq!(json("SELECT evoq_process_queue()")["created"], 1);
        assert_eq!(mock.count_calls("GET", "/"), probes);
    }
}
