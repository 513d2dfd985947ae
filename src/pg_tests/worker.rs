//! pg_tests: what the background worker relies on in SQL, without the worker (the worker itself,
//! loaded through shared_preload_libraries, is tested by scripts/worker-check.sh): leases on
//! claimed queue rows, results written only where the claim still holds, refresh results left
//! alone when a delivery moved the row on, the QR cadence, and the next due time.

#[pgrx::pg_schema]
mod tests {
    use crate::testing::*;
    use pgrx::prelude::*;
    use serde_json::Value;

    #[pg_test]
    fn a_claimed_row_is_leased_and_its_result_lands_only_while_the_claim_holds() {
        let mock = mock();
        configure(&mock);
        profiles();
        let user = sign_up(1).remove(0);
        let claimed = json("SELECT evoq._claim_queue('default', 10, 60000)");
        let claim = claimed[0].clone();
        assert_eq!(claim["user_id"], Value::String(user.clone()), "{claimed}");
        // Leased: a later claim (another run, or the worker after a crash) does not take it...
        assert_eq!(
            json("SELECT evoq._claim_queue('default', 10, 60000)"),
            Value::Array(vec![])
        );
        assert_eq!(
            count(
                "SELECT count(*) FROM evolution_instance_creation_queue
                   WHERE status = 'processing' AND next_attempt_at > now() + interval '50 seconds'"
            ),
            1
        );
        // ...until the lease runs out; then it is claimed again, with a new stamp.
        run("UPDATE evolution_instance_creation_queue SET next_attempt_at = now() - interval '1 second'");
        let again = json("SELECT evoq._claim_queue('default', 10, 60000)");
        assert_eq!(again[0]["id"], claim["id"]);
        assert_ne!(again[0]["claimed_at"], claim["claimed_at"]);
        // The first claim's answer comes back late: it is not written.
        let late = serde_json::json!([{"id": claim["id"], "instance_name": "evoq_late", "ok": true,
                                       "action": "create", "instance_status": "connecting",
                                       "claimed_at": claim["claimed_at"]}]);
        run(&format!(
            "SELECT evoq._record_queue_results('{late}'::jsonb)"
        ));
        assert_eq!(queue_row(&user)["status"], "processing");
        assert_eq!(
            count("SELECT count(*) FROM evolution_instances WHERE instance_name = 'evoq_late'"),
            0
        );
        // The current claim's answer is.
        let current = serde_json::json!([{"id": claim["id"], "instance_name": "evoq_current", "ok": true,
                                          "action": "create", "instance_status": "connecting",
                                          "claimed_at": again[0]["claimed_at"]}]);
        run(&format!(
            "SELECT evoq._record_queue_results('{current}'::jsonb)"
        ));
        assert_eq!(queue_row(&user)["status"], "completed");
        assert_eq!(instance_row(&user)["instance_name"], "evoq_current");
    }

    #[pg_test]
    fn a_deprovisioning_waits_for_a_leased_row_and_is_applied_after() {
        let mock = mock();
        configure(&mock);
        profiles();
        let user = sign_up(1).remove(0);
        json("SELECT evoq._claim_queue('default', 10, 60000)");
        run("DELETE FROM profiles");
        // The request waits: the row is the worker's until its lease runs out or its result is in.
        assert_eq!(queue_row(&user)["action"], "create");
        assert_eq!(count("SELECT count(*) FROM evoq.requeue_requests"), 1);
        run("UPDATE evolution_instance_creation_queue SET next_attempt_at = now() - interval '1 second'");
        assert_eq!(one::<i32>("SELECT evoq._apply_requeue_requests()"), Some(1));
        let row = queue_row(&user);
        assert_eq!(
            (s(&row["action"]), s(&row["status"])),
            ("delete", "pending"),
            "{row}"
        );
    }

    #[pg_test]
    fn a_refresh_result_is_dropped_when_a_delivery_changed_the_row_meanwhile() {
        let mock = mock();
        let (user, _name) = created_instance(&mock);
        make_refresh_due();
        let claimed =
            json("SELECT evoq._claim_refresh('default', 10, 0, 600000, 300000, true, ARRAY[]::uuid[], 0)");
        let claim = claimed[0].clone();
        assert_eq!(claim["task"], "connect", "{claimed}");
        // A delivery lands while the connect call is in flight (same status, a newer QR).
        run(&format!(
            "UPDATE evolution_instances SET qr_text = 'from-a-webhook', updated_at = clock_timestamp() WHERE user_id = '{user}'"
        ));
        let stale = serde_json::json!([{"id": claim["id"], "outcome": "qr", "qr_text": "from-the-poll",
                                        "qr_code": "x", "claimed_status": "connecting",
                                        "claimed_at": claim["claimed_at"]}]);
        run(&format!(
            "SELECT evoq._record_refresh_results('{stale}'::jsonb)"
        ));
        assert_eq!(instance_row(&user)["qr_text"], "from-a-webhook");
        // A result for the row as claimed is written.
        make_refresh_due();
        let claim =
            json("SELECT evoq._claim_refresh('default', 10, 0, 600000, 300000, true, ARRAY[]::uuid[], 0)")[0]
                .clone();
        let fresh = serde_json::json!([{"id": claim["id"], "outcome": "qr", "qr_text": "from-the-poll",
                                        "qr_code": "x", "claimed_status": "connecting",
                                        "claimed_at": claim["claimed_at"]}]);
        run(&format!(
            "SELECT evoq._record_refresh_results('{fresh}'::jsonb)"
        ));
        assert_eq!(instance_row(&user)["qr_text"], "from-the-poll");
    }

    #[pg_test]
    fn polling_skips_a_qr_a_webhook_brought_recently_and_busy_rows() {
        let mock = mock();
        let (user, _name) = created_instance(&mock);
        let claim = |fresh_ms: i64, busy: &str| {
            json(&format!(
                "SELECT evoq._claim_refresh('default', 10, 0, 600000, 300000, true, {busy}, {fresh_ms})"
            ))
        };
        run(&format!(
            "UPDATE evolution_instances SET last_refresh_at = NULL, last_qr_update = now() WHERE user_id = '{user}'"
        ));
        assert_eq!(
            claim(20000, "ARRAY[]::uuid[]"),
            Value::Array(vec![]),
            "a fresh QR"
        );
        let id = s(&instance_row(&user)["id"]).to_string();
        run(&format!(
            "UPDATE evolution_instances SET last_refresh_at = NULL, last_qr_update = now() - interval '30 seconds' WHERE user_id = '{user}'"
        ));
        assert_eq!(
            claim(20000, &format!("ARRAY['{id}']::uuid[]")),
            Value::Array(vec![]),
            "busy: in flight in this run"
        );
        assert_eq!(
            claim(20000, "ARRAY[]::uuid[]")[0]["task"],
            "connect",
            "a stale QR"
        );
        // Past its window a connecting instance is expired whatever its QR's age.
        run(&format!(
            "UPDATE evolution_instances SET last_refresh_at = NULL, last_qr_update = now(),
                    connecting_since = now() - interval '1 hour' WHERE user_id = '{user}'"
        ));
        assert_eq!(claim(20000, "ARRAY[]::uuid[]")[0]["task"], "expire");
    }

    #[pg_test]
    fn the_next_due_time_matches_what_the_claims_take() {
        let mock = mock();
        let (user, _name) = created_instance(&mock);
        let due = |repoint: bool| {
            one::<f64>(&format!(
                "SELECT evoq._next_due_ms(20000, 600000, 300000, 20000, {repoint}, 60000)"
            ))
            .unwrap()
        };
        // Just created: asked at creation, a QR on create or not, due one interval later.
        run(&format!(
            "UPDATE evolution_instances SET last_refresh_at = now(), last_qr_update = now() WHERE user_id = '{user}'"
        ));
        let ms = due(true);
        assert!((15000.0..=20000.0).contains(&ms), "{ms}");
        // A QR from a webhook 5 s ago, last asked long ago: due when that QR is 20 s old.
        run(&format!(
            "UPDATE evolution_instances SET last_refresh_at = now() - interval '1 hour',
                    last_qr_update = now() - interval '5 seconds' WHERE user_id = '{user}'"
        ));
        let ms = due(true);
        assert!((10000.0..=15000.0).contains(&ms), "{ms}");
        // Asked just now after a failed expire: not due again for one interval, though its
        // window is over (the claim would not take it, so the worker must not wake for it).
        run(&format!(
            "UPDATE evolution_instances SET last_refresh_at = now(), connecting_since = now() - interval '1 hour'
             WHERE user_id = '{user}'"
        ));
        let ms = due(true);
        assert!((15000.0..=20000.0).contains(&ms), "{ms}");
        // A queued row due now: 0.
        sign_up(1);
        assert_eq!(due(true), 0.0);
        // Nothing at all: the cap.
        run("DELETE FROM evolution_instance_creation_queue; DELETE FROM evolution_instances");
        assert_eq!(due(true), 60000.0);
        // A webhook to repoint is due now, unless repoints are paused.
        sign_up(1);
        json("SELECT evoq_process_queue()");
        let user2 = one::<String>("SELECT user_id::text FROM evolution_instances LIMIT 1").unwrap();
        run(&format!(
            "UPDATE evolution_instances SET last_refresh_at = now(), last_qr_update = now(), webhook_set_at = NULL
             WHERE user_id = '{user2}';
             UPDATE evoq.settings SET webhook_url = 'https://app.example/hook', webhook_changed_at = now()"
        ));
        assert_eq!(due(true), 0.0);
        assert!(due(false) > 10000.0);
    }

    /// 0.4.0 raised "cannot subtract infinite timestamps" for a connecting row never asked and
    /// never given a QR, or an open row never checked: the worker's end-of-run transaction
    /// aborted and its summaries were lost.
    #[pg_test]
    fn the_next_due_time_of_rows_never_asked_is_now() {
        let mock = mock();
        let (user, _name) = created_instance(&mock);
        run(&format!(
            "UPDATE evolution_instances SET last_refresh_at = NULL, last_qr_update = NULL WHERE user_id = '{user}'"
        ));
        assert_eq!(
            one::<f64>("SELECT evoq._next_due_ms(20000, 600000, 300000, 20000, true, 60000)"),
            Some(0.0)
        );
        run(&format!(
            "UPDATE evolution_instances SET instance_status = 'open', last_state_check_at = NULL WHERE user_id = '{user}'"
        ));
        assert_eq!(
            one::<f64>("SELECT evoq._next_due_ms(20000, 600000, 300000, 20000, true, 60000)"),
            Some(0.0)
        );
    }

    /// With the QR delivered by webhook, a new instance whose create answered {"count":0} is
    /// polled on the cadence, not at once (0.4.0 sent a connect right after every such create);
    /// without deliveries it is asked at once, as before, unless its create brought the QR.
    #[pg_test]
    fn a_new_instance_is_polled_on_the_cadence_when_webhooks_deliver_its_qr() {
        use evolution_mock::Flavor;
        let mock = mock_with(Flavor::V2);
        configure(&mock); // a webhook subscribed to QRCODE_UPDATED
        profiles();
        let user = sign_up(1).remove(0);
        assert_eq!(json("SELECT evoq_process_queue()")["created"], 1);
        let connects = mock.count_calls("GET", "/instance/connect");
        json("SELECT evoq_refresh_qr()");
        assert_eq!(
            mock.count_calls("GET", "/instance/connect"),
            connects,
            "a connect right after the create"
        );
        assert!(instance_row(&user)["last_refresh_at"].is_string());

        // No webhook: nothing else brings the QR, so the first refresh asks at once.
        configure_with(&mock.url(), API_KEY, "");
        let second = sign_up(1).remove(0);
        assert_eq!(json("SELECT evoq_process_queue()")["created"], 1);
        assert!(instance_row(&second)["last_refresh_at"].is_null());
        json("SELECT evoq_refresh_qr()");
        let connects = mock.count_calls("GET", "/instance/connect");
        assert!(connects > 0);

        // No webhook, but the create's reply carried the QR (as a real server's does: it waits
        // for one): that QR is as fresh as a poll's, so the first poll waits its interval.
        mock.set_qr_on_create(true);
        let third = sign_up(1).remove(0);
        assert_eq!(json("SELECT evoq_process_queue()")["created"], 1);
        let row = instance_row(&third);
        assert!(row["qr_code"].is_string(), "{row}");
        assert!(row["last_refresh_at"].is_string(), "{row}");
        json("SELECT evoq_refresh_qr()");
        assert_eq!(
            mock.count_calls("GET", "/instance/connect"),
            connects,
            "a connect right after a create that brought its QR"
        );
    }
}
