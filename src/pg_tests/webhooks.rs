//! pg_tests: evoq_webhook. Deliveries are the mock's own (it POSTs them for real; the tests take
//! the envelopes it sent from its delivery log and hand them to evoq_webhook, as PostgREST
//! would), or written by hand where a shape must be exact (bad input, ordering).

#[pgrx::pg_schema]
mod tests {
    use crate::testing::*;
    use evolution_mock::{Flavor, MockServer};
    use pgrx::prelude::*;
    use serde_json::{json, Value};

    fn connecting_instance(mock: &MockServer) -> (String, String) {
        connecting_instance_with_webhook(mock)
    }

    fn secret() -> String {
        one::<String>("SELECT webhook_secret FROM evoq.settings").unwrap()
    }

    /// What PostgREST does for a request carrying the secret header.
    fn as_postgrest(secret: &str) {
        Spi::run_with_args(
            "SELECT set_config('request.headers', $1, true)",
            &[
                json!({"x-evoq-secret": secret, "content-type": "application/json"})
                    .to_string()
                    .into(),
            ],
        )
        .unwrap();
    }

    fn deliver(payload: &Value) -> Value {
        Spi::get_one_with_args::<pgrx::JsonB>(
            "SELECT evoq_webhook($1)",
            &[pgrx::JsonB(payload.clone()).into()],
        )
        .unwrap_or_else(|e| panic!("evoq_webhook({payload}): {e}"))
        .map(|j| j.0)
        .unwrap_or(Value::Null)
    }

    fn deliver_error(payload: &Value) -> String {
        error_of(&format!(
            "SELECT evoq_webhook({}::jsonb)",
            pgrx::spi::quote_literal(payload.to_string())
        ))
        .unwrap_or_else(|| panic!("evoq_webhook({payload}) succeeded"))
    }

    fn envelope(event: &str, name: &str, data: Value, at: &str) -> Value {
        json!({"event": event, "instance": name, "data": data,
               "destination": "http://127.0.0.1:9/rest/v1/rpc/evoq_webhook", "date_time": at,
               "server_url": "http://evolution:8080", "apikey": null})
    }

    fn counter(name: &str) -> i64 {
        count(&format!("SELECT {name} FROM evoq_status"))
    }

    /// The envelopes the mock sent for `event` (waiting up to 10 s for the first `n`).
    fn sent(mock: &MockServer, event: &str, n: usize) -> Vec<Value> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let found: Vec<Value> = mock
                .deliveries()
                .into_iter()
                .filter(|d| d["event"] == event)
                .map(|d| d["envelope"].clone())
                .collect();
            if found.len() >= n {
                return found;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the mock sent {} of {n} {event} deliveries",
                found.len()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    #[pg_test]
    fn a_delivery_without_the_right_secret_changes_nothing_and_is_counted() {
        // The counters are sequences, which no rollback resets: deliveries applied by earlier
        // tests (any file) are still counted.
        run("SELECT setval('evoq.webhooks_applied', 1, false), setval('evoq.webhooks_rejected', 1, false)");
        let mock = mock();
        let (user, name) = connecting_instance(&mock);
        let qr = envelope(
            "qrcode.updated",
            &name,
            json!({"qrcode": {"instance": name, "code": "2@forged", "base64": "data:image/png;base64,AA"}}),
            "2026-11-24T10:00:00.000Z",
        );
        let e = deliver_error(&qr);
        assert!(
            e.starts_with("42501: webhook delivery refused: no webhook secret"),
            "{e}"
        );
        assert!(
            e.contains("HINT: Deliveries carry the secret in the x-evoq-secret header"),
            "{e}"
        );
        as_postgrest("not-the-secret");
        let e = deliver_error(&qr);
        assert!(
            e.starts_with("42501: webhook delivery refused: wrong webhook secret"),
            "{e}"
        );
        assert_ne!(instance_row(&user)["qr_text"], "2@forged");
        // Counted although each call's ERROR rolled back its work.
        assert_eq!(counter("webhooks_rejected"), 2);
        assert_eq!(counter("webhooks_applied"), 0);

        as_postgrest(&secret());
        assert_eq!(deliver(&qr)["result"], "applied");
        assert_eq!(instance_row(&user)["qr_text"], "2@forged");
        assert_eq!(counter("webhooks_applied"), 1);
    }

    #[pg_test]
    fn the_mocks_v2_deliveries_carry_the_secret_header_and_apply() {
        let mock = mock();
        let (user, name) = connecting_instance(&mock);
        mock.rotate_qr(&name);
        let qr = sent(&mock, "qrcode.updated", 1).pop().unwrap();
        // The header evoq registered is the one the mock sent (its delivery log has the
        // request's headers; PostgREST would put them into request.headers).
        let headers = mock
            .deliveries()
            .into_iter()
            .find(|d| d["event"] == "qrcode.updated")
            .map(|d| d["headers"].clone())
            .unwrap_or(Value::Null);
        assert_eq!(s(&headers["x-evoq-secret"]), secret(), "{headers}");
        as_postgrest(s(&headers["x-evoq-secret"]));
        let applied = deliver(&qr);
        assert_eq!(applied["result"], "applied", "{applied}");
        let row = instance_row(&user);
        assert_eq!(row["qr_text"], qr["data"]["qrcode"]["code"], "{row}");
        assert!(row["last_qr_update"].is_string());

        // The scan: open, with the owner's number and profile name.
        assert!(mock.scan(&name, Some("5511999990000"), Some("Ana")));
        let open = sent(&mock, "connection.update", 1)
            .into_iter()
            .find(|e| e["data"]["state"] == "open")
            .expect("an open delivery");
        assert_eq!(deliver(&open)["status"], "open");
        let row = instance_row(&user);
        assert_eq!(
            (
                &row["instance_status"],
                &row["owner_number"],
                &row["profile_name"]
            ),
            (&json!("open"), &json!("5511999990000"), &json!("Ana")),
            "{row}"
        );
        assert_eq!(row["qr_code"], Value::Null);
    }

    #[pg_test]
    fn v1_deliveries_carry_the_secret_in_the_url() {
        let mock = mock_with(Flavor::V1);
        let (user, name) = connecting_instance(&mock);
        mock.rotate_qr(&name);
        let qr = sent(&mock, "qrcode.updated", 1).pop().unwrap();
        let destination = s(&qr["destination"]).to_string();
        assert!(
            destination.ends_with(&format!("?evoq_secret={}", secret())),
            "{destination}"
        );
        // No request.headers at all: the secret comes from the destination.
        assert_eq!(deliver(&qr)["result"], "applied");
        assert_eq!(instance_row(&user)["qr_text"], qr["data"]["qrcode"]["code"]);
    }

    #[pg_test]
    fn the_state_machine_not_arrival_order_decides() {
        let mock = mock();
        let (user, name) = connecting_instance(&mock);
        as_postgrest(&secret());
        let status = || s(&instance_row(&user)["instance_status"]).to_string();
        let open = envelope(
            "connection.update",
            &name,
            json!({"instance": name, "wuid": "5511@s.whatsapp.net", "profileName": "Ana", "state": "open", "statusReason": 200}),
            "2026-11-24T10:00:05.000Z",
        );
        assert_eq!(deliver(&open)["result"], "applied");
        // Replayed: nothing new, and a late 'connecting' or QR does not move it back.
        assert_eq!(deliver(&open)["result"], "applied");
        let late_connecting = envelope(
            "connection.update",
            &name,
            json!({"instance": name, "state": "connecting", "statusReason": 200}),
            "2026-11-24T10:00:01.000Z",
        );
        assert_eq!(deliver(&late_connecting)["result"], "ignored");
        let late_qr = envelope(
            "qrcode.updated",
            &name,
            json!({"qrcode": {"instance": name, "code": "2@late", "base64": "data:image/png;base64,AA"}}),
            "2026-11-24T10:00:02.000Z",
        );
        assert_eq!(deliver(&late_qr)["result"], "ignored");
        assert_eq!(status(), "open");

        // The phone unlinks: close with its reason. A transient close (408) changes nothing.
        let transient = envelope(
            "connection.update",
            &name,
            json!({"instance": name, "state": "close", "statusReason": 408}),
            "2026-11-24T10:01:00.000Z",
        );
        assert_eq!(deliver(&transient)["result"], "ignored");
        assert_eq!(status(), "open");
        let unlinked = envelope(
            "connection.update",
            &name,
            json!({"instance": name, "state": "close", "statusReason": 401}),
            "2026-11-24T10:02:00.000Z",
        );
        assert_eq!(deliver(&unlinked)["status"], "close");
        let row = instance_row(&user);
        assert!(s(&row["disconnect_reason"]).contains("unlinked"), "{row}");
        assert!(row["disconnected_at"].is_string());
        // The open sent before the close, retried late by the server: older, so ignored.
        assert_eq!(deliver(&open)["result"], "ignored");
        assert_eq!(status(), "close");
        // A newer open (the user linked again) applies.
        let relinked = envelope(
            "connection.update",
            &name,
            json!({"instance": name, "state": "open", "statusReason": 200}),
            "2026-11-24T10:03:00.000Z",
        );
        assert_eq!(deliver(&relinked)["status"], "open");
        assert_eq!(
            instance_row(&user)["owner_number"],
            "5511",
            "kept from the first open"
        );
    }

    #[pg_test]
    fn the_qr_limit_refuses() {
        let mock = mock();
        let (user, name) = connecting_instance(&mock);
        as_postgrest(&secret());
        assert!(mock.reach_qr_limit(&name));
        let limit = sent(&mock, "qrcode.updated", 1)
            .into_iter()
            .find(|e| e["data"]["message"].is_string())
            .expect("the limit message");
        assert_eq!(deliver(&limit)["status"], "refused");
        let refused = sent(&mock, "connection.update", 1)
            .into_iter()
            .find(|e| e["data"]["state"] == "refused")
            .expect("a refused delivery");
        assert_eq!(deliver(&refused)["result"], "ignored", "refused already");
        let row = instance_row(&user);
        assert_eq!(row["instance_status"], "refused");
        assert!(s(&row["disconnect_reason"]).contains("QR limit"), "{row}");
        assert_eq!(row["qr_code"], Value::Null);
    }

    #[pg_test]
    fn a_removed_live_instance_is_created_again() {
        let mock = mock();
        let (user, name) = connecting_instance(&mock);
        as_postgrest(&secret());
        // The server deletes it (an operator, say) while its user waits for a QR: lost, and
        // queued for creation again.
        assert!(mock.remove_instance(&name));
        let removed = envelope(
            "remove.instance",
            &name,
            Value::Null,
            "2099-01-01T00:00:00.000Z", // after every delivery the mock made
        );
        assert_eq!(deliver(&removed)["status"], "lost");
        assert_eq!(
            count("SELECT count(*) FROM evoq.requeue_requests WHERE reason = 'lost'"),
            1
        );
        assert_eq!(json("SELECT evoq_process_queue()")["created"], 1);
        assert_eq!(instance_row(&user)["instance_status"], "connecting");
    }

    #[pg_test]
    fn events_evoq_does_not_use_are_kept_for_the_app() {
        let mock = mock();
        let (user, name) = connecting_instance(&mock);
        as_postgrest(&secret());
        // The counters are sequences: they outlive the other tests' rolled-back transactions.
        let relayed = counter("webhooks_relayed");
        let message = envelope(
            "messages.upsert",
            &name,
            json!({"key": {"remoteJid": "5511@s.whatsapp.net", "id": "ABC"}, "message": {"conversation": "hi"}}),
            "2026-11-24T10:00:00.000Z",
        );
        let kept = deliver(&message);
        assert_eq!(kept["result"], "relayed", "{kept}");
        let row = json("SELECT to_jsonb(e) FROM evolution_instance_events e");
        assert_eq!(row["user_id"], json!(user));
        assert_eq!(row["event"], "messages.upsert");
        assert_eq!(row["payload"]["data"]["message"]["conversation"], "hi");
        assert_eq!(counter("webhooks_relayed"), relayed + 1);
        assert_eq!(counter("app_events_waiting"), 1);
    }

    #[pg_test]
    fn relayed_events_carry_no_secret() {
        let mock = mock();
        let (_, name) = connecting_instance(&mock);
        let secret = secret();
        let mut message = envelope(
            "messages.upsert",
            &name,
            json!({"key": {}}),
            "2026-11-24T10:00:00Z",
        );
        message["apikey"] = json!("INSTANCE-TOKEN-1234");
        message["destination"] = json!(format!(
            "https://db.example/rpc/evoq_webhook?evoq_secret={secret}"
        ));
        assert_eq!(deliver(&message)["result"], "relayed");
        let payload = json("SELECT payload FROM evolution_instance_events");
        assert!(payload.get("apikey").is_none(), "{payload}");
        assert_eq!(
            payload["destination"],
            "https://db.example/rpc/evoq_webhook"
        );
        assert!(!payload.to_string().contains(&secret));
    }

    #[pg_test]
    fn a_removed_idle_instance_is_created_again_only_when_its_user_asks() {
        let mock = mock();
        let (user, name) = connecting_instance(&mock);
        as_postgrest(&secret());
        run(&format!(
            "UPDATE evolution_instances SET instance_status = 'expired' WHERE user_id = '{user}'"
        ));
        assert!(mock.remove_instance(&name));
        let removed = envelope(
            "remove.instance",
            &name,
            Value::Null,
            "2099-01-01T00:00:00Z",
        );
        assert_eq!(deliver(&removed)["status"], "lost");
        assert_eq!(
            count("SELECT count(*) FROM evoq.requeue_requests"),
            0,
            "no socket nobody asked for"
        );
        json("SELECT evoq_process_queue()");
        assert_eq!(
            mock.count_calls("POST", "/instance/create"),
            1,
            "only the first"
        );
        assert!(s(&instance_row(&user)["last_error"]).contains("evoq_reconnect"));
        // The user asks for a QR: created again.
        assert_eq!(
            one::<String>(&format!("SELECT evoq_reconnect('{user}')")).as_deref(),
            Some("lost")
        );
        assert_eq!(json("SELECT evoq_process_queue()")["created"], 1);
        assert_eq!(instance_row(&user)["instance_status"], "connecting");
    }

    #[pg_test]
    fn bad_input_gets_clear_answers_and_changes_no_row() {
        let mock = mock();
        let (user, name) = connecting_instance(&mock);
        as_postgrest(&secret());
        let before = instance_row(&user);

        // The caller's mistakes: an ERROR with a hint.
        let e = deliver_error(&json!([1, 2]));
        assert!(
            e.starts_with("22023: the webhook payload is not a JSON object"),
            "{e}"
        );
        assert!(e.contains("HINT:"), "{e}");
        let e = deliver_error(&json!({"instance": name}));
        assert!(e.contains("has no \"event\""), "{e}");
        let big = json!({"event": "messages.upsert", "instance": name, "data": "x".repeat(5 * 1024 * 1024)});
        let e = deliver_error(&big);
        assert!(e.contains("over evoq's limit"), "{e}");

        // The server's: counted no-ops.
        let ignored = counter("webhooks_ignored");
        let ns = one::<String>("SELECT namespace FROM evoq.settings").unwrap();
        let sql_name = format!("evoq_{ns}_x'; DELETE FROM evolution_instances; --");
        for payload in [
            envelope(
                "connection.update",
                &sql_name,
                json!({"state": "open"}),
                "2026-11-24T10:00:00Z",
            ),
            envelope(
                "connection.update",
                &name,
                json!({}),
                "2026-11-24T10:00:00Z",
            ),
            envelope(
                "qrcode.updated",
                &name,
                json!({"qrcode": {"base64": "javascript:x"}}),
                "2026-11-24T10:00:00Z",
            ),
            envelope(
                "connection.update",
                "evoq_x'; DELETE FROM evolution_instances; --",
                json!({"state": "open"}),
                "2026-11-24T10:00:00Z",
            ),
            envelope(
                "connection.update",
                "evoq_othernamespace_00",
                json!({"state": "open"}),
                "2026-11-24T10:00:00Z",
            ),
        ] {
            let r = deliver(&payload);
            assert_eq!(r["result"], "ignored", "{payload} -> {r}");
        }
        assert_eq!(counter("webhooks_ignored"), ignored + 5);
        assert_eq!(instance_row(&user), before, "no row changed");
        assert_eq!(count("SELECT count(*) FROM evolution_instances"), 1);
    }

    #[pg_test]
    fn a_delivery_for_a_deleted_instance_changes_nothing() {
        let mock = mock();
        let (user, name) = connecting_instance(&mock);
        run(&format!("DELETE FROM public.profiles WHERE id = '{user}'"));
        let summary = json("SELECT evoq_process_queue()");
        assert_eq!(summary["deleted"], 1, "{summary}");
        assert_eq!(instance_row(&user)["instance_status"], "deleted");
        as_postgrest(&secret());
        for payload in [
            envelope(
                "connection.update",
                &name,
                json!({"state": "open"}),
                "2026-11-24T12:00:00Z",
            ),
            envelope(
                "qrcode.updated",
                &name,
                json!({"qrcode": {"code": "2@x"}}),
                "2026-11-24T12:00:00Z",
            ),
            envelope("messages.upsert", &name, json!({}), "2026-11-24T12:00:00Z"),
        ] {
            assert_eq!(deliver(&payload)["result"], "ignored", "{payload}");
        }
        assert_eq!(instance_row(&user)["instance_status"], "deleted");
    }

    #[pg_test]
    fn the_anonymous_api_role_may_deliver_and_nothing_else() {
        let mock = mock();
        let (user, name) = connecting_instance(&mock);
        supabase_like();
        let key = secret();
        run("SET LOCAL ROLE anon");
        as_postgrest(&key);
        let qr = envelope(
            "qrcode.updated",
            &name,
            json!({"qrcode": {"code": "2@anon", "base64": "data:image/png;base64,AA"}}),
            "2026-11-24T10:00:00Z",
        );
        assert_eq!(deliver(&qr)["result"], "applied");
        assert!(error_of("SELECT * FROM evolution_instances").is_some());
        assert!(error_of("SELECT evoq_process_queue()").is_some());
        run("RESET ROLE");
        assert_eq!(instance_row(&user)["qr_text"], "2@anon");
    }
}
