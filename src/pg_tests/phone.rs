//! pg_tests: "link with phone number" (a pairing code instead of a QR): evoq_link_with_phone,
//! the pairing done by the QR refresh (a logout, then a connect with the number), the number a
//! create carries, what is refused, and how long the number is kept.

#[pgrx::pg_schema]
mod tests {
    use crate::testing::*;
    use pgrx::prelude::*;
    use serde_json::{json, Value};

    const TYPED: &str = "+55 (11) 98765-4321";
    const DIGITS: &str = "5511987654321";

    fn status(user: &str) -> String {
        s(&instance_row(user)["instance_status"]).to_string()
    }

    fn links() -> i64 {
        count("SELECT count(*) FROM evoq.phone_links")
    }

    /// evoq_link_with_phone(user, phone), as the operator.
    fn link(user: &str, phone: &str) -> Option<String> {
        Spi::get_one_with_args::<String>(
            "SELECT evoq_link_with_phone($1::uuid, $2)",
            &[user.into(), phone.into()],
        )
        .unwrap_or_else(|e| panic!("evoq_link_with_phone: {e}"))
    }

    /// The mock's call log: the query strings of its connects.
    fn connect_queries(mock: &evolution_mock::MockServer) -> Vec<String> {
        mock.calls()
            .iter()
            .filter(|c| {
                c["path"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("/instance/connect/")
            })
            .map(|c| c["query"].as_str().unwrap_or("").to_string())
            .collect()
    }

    #[pg_test]
    fn a_connecting_instance_is_paired_by_a_logout_then_a_connect_with_the_number() {
        let mock = mock();
        let (user, name) = created_instance(&mock);
        assert_eq!(status(&user), "connecting");
        let logouts = mock.count_calls("DELETE", "/instance/logout/");

        assert_eq!(link(&user, TYPED).as_deref(), Some("connecting"));
        assert_eq!(
            one::<String>("SELECT phone FROM evoq.phone_links").as_deref(),
            Some(DIGITS)
        );
        let summary = json("SELECT evoq_refresh_qr()");
        assert_eq!(summary["paired"], 1, "{summary}");
        // The server ignores a number while connecting: the logout came first.
        assert_eq!(mock.count_calls("DELETE", "/instance/logout/"), logouts + 1);
        assert_eq!(
            connect_queries(&mock).last().map(String::as_str),
            Some(format!("number={DIGITS}").as_str())
        );
        let (number, code) = mock.pairing(&name).unwrap();
        assert_eq!(number.as_deref(), Some(DIGITS));
        let code = code.expect("the server shows a pairing code");
        let row = instance_row(&user);
        assert_eq!(s(&row["pairing_code"]), code, "{row}");
        assert_eq!(status(&user), "connecting");
        assert_eq!(links(), 0, "the number is not kept once the server has it");

        // The user types the code into WhatsApp: the next refresh sees the instance open.
        assert!(!mock.pair(&name, "WRONGCOD"));
        assert!(mock.pair(&name, &code));
        run(&format!(
            "UPDATE evolution_instances SET last_refresh_at = NULL WHERE user_id = '{user}'"
        ));
        json("SELECT evoq_refresh_qr()");
        assert_eq!(status(&user), "open");
        assert!(instance_row(&user)["pairing_code"].is_null());
    }

    #[pg_test]
    fn the_create_carries_the_number_when_the_user_gave_it_first() {
        let mock = mock();
        mock.set_qr_on_create(true);
        configure(&mock);
        profiles();
        let user = sign_up(1).remove(0);
        assert_eq!(link(&user, DIGITS).as_deref(), Some("queued"));
        let summary = json("SELECT evoq_process_queue()");
        assert_eq!(summary["created"], 1, "{summary}");
        let name = s(&instance_row(&user)["instance_name"]).to_string();
        let (number, code) = mock.pairing(&name).unwrap();
        assert_eq!(number.as_deref(), Some(DIGITS));
        assert_eq!(
            instance_row(&user)["pairing_code"].as_str(),
            code.as_deref(),
            "the create's reply brought the code"
        );
        assert!(code.is_some());
        assert_eq!(links(), 0);
        // No logout, no connect: the create did it all.
        assert_eq!(mock.count_calls("DELETE", "/instance/logout/"), 0);
        json("SELECT evoq_refresh_qr()");
        assert_eq!(mock.count_calls("GET", "/instance/connect/"), 0);
    }

    #[pg_test]
    fn an_expired_instance_gets_a_new_window_and_is_paired() {
        let mock = mock();
        let (user, name) = created_instance(&mock);
        run(&format!(
            "UPDATE evolution_instances SET connecting_since = now() - interval '11 minutes', last_refresh_at = NULL
             WHERE user_id = '{user}'"
        ));
        json("SELECT evoq_refresh_qr()");
        assert_eq!(status(&user), "expired");
        assert_eq!(link(&user, DIGITS).as_deref(), Some("connecting"));
        assert_eq!(json("SELECT evoq_refresh_qr()")["paired"], 1);
        assert_eq!(mock.pairing(&name).unwrap().0.as_deref(), Some(DIGITS));
        assert!(instance_row(&user)["pairing_code"].is_string());
    }

    #[pg_test]
    fn bad_input_is_refused_and_changes_nothing() {
        let mock = mock();
        let (user, _) = created_instance(&mock);
        let before = instance_row(&user);
        for bad in [
            "",
            "12345",
            "0011987654321",
            "+55 11 9876x4321",
            "1234567890123456",
        ] {
            let e = error_of(&format!("SELECT evoq_link_with_phone('{user}', '{bad}')"))
                .unwrap_or_else(|| panic!("{bad:?} was taken"));
            assert!(
                e.starts_with("22023: evoq_link_with_phone: the phone number"),
                "{e}"
            );
            assert!(!e.contains("98765"), "the refusal quotes the number: {e}");
        }
        assert_eq!(links(), 0);
        assert_eq!(instance_row(&user), before);

        // Someone else's instance, as a signed-in user.
        supabase_like();
        run("SET LOCAL ROLE authenticated");
        run("SELECT set_config('request.jwt.claims', '{\"sub\": \"00000000-0000-4000-8000-000000000001\"}', true)");
        let e = error_of(&format!(
            "SELECT evoq_link_with_phone('{user}', '{DIGITS}')"
        ))
        .unwrap();
        assert!(
            e.starts_with("42501: evoq_link_with_phone: only the user themselves"),
            "{e}"
        );
        // The signed-in user's own form: they have no instance.
        let e = error_of(&format!("SELECT evoq_link_with_phone('{DIGITS}')")).unwrap();
        assert!(
            e.starts_with("55000: evoq_link_with_phone: the user has no instance"),
            "{e}"
        );
        // The number is nobody's to read but the owner's.
        for role in ["authenticated", "anon", "service_role"] {
            run(&format!("SET LOCAL ROLE {role}"));
            let e = error_of("SELECT count(*) FROM evoq.phone_links").unwrap();
            assert!(e.starts_with("42501"), "{role}: {e}");
        }
        run("SET LOCAL ROLE authenticated");
        // As the user themselves, through the one-argument form.
        run(&format!(
            "SELECT set_config('request.jwt.claims', '{{\"sub\": \"{user}\"}}', true)"
        ));
        assert_eq!(
            one::<String>(&format!("SELECT evoq_link_with_phone('{TYPED}')")).as_deref(),
            Some("connecting")
        );
        run("RESET ROLE");
        assert_eq!(links(), 1);

        // Linked already, or deprovisioned: refused, nothing kept.
        run("DELETE FROM evoq.phone_links");
        for (state, refusal) in [
            ("open", "the instance is linked already"),
            ("deleted", "the user's instance was deprovisioned"),
        ] {
            run(&format!(
                "UPDATE evolution_instances SET instance_status = '{state}' WHERE user_id = '{user}'"
            ));
            let e = error_of(&format!(
                "SELECT evoq_link_with_phone('{user}', '{DIGITS}')"
            ))
            .unwrap();
            assert!(
                e.starts_with(&format!("55000: evoq_link_with_phone: {refusal}")),
                "{e}"
            );
        }
        assert_eq!(links(), 0);
    }

    /// Kept no longer than needed: a link whose instance opened, or older than the QR window,
    /// is deleted by the next refresh claim.
    #[pg_test]
    fn a_number_is_not_kept_past_the_window_or_an_open_instance() {
        let mock = mock();
        let (user, _) = created_instance(&mock);
        link(&user, DIGITS);
        run("UPDATE evoq.phone_links SET requested_at = now() - interval '11 minutes'");
        json("SELECT evoq_refresh_qr()");
        assert_eq!(links(), 0);
        assert_eq!(
            mock.count_calls("DELETE", "/instance/logout/"),
            0,
            "no pairing for a stale number"
        );

        for state in ["open", "expired", "deleted"] {
            run(&format!(
                "UPDATE evolution_instances SET instance_status = 'connecting' WHERE user_id = '{user}'"
            ));
            link(&user, DIGITS);
            run(&format!(
                "UPDATE evolution_instances SET instance_status = '{state}' WHERE user_id = '{user}'"
            ));
            json("SELECT evoq_refresh_qr()");
            assert_eq!(links(), 0, "{state}");
        }
    }

    /// From close and refused too: a new window, and the pairing.
    #[pg_test]
    fn a_close_or_refused_instance_is_paired() {
        let mock = mock();
        let (user, name) = created_instance(&mock);
        for state in ["close", "refused"] {
            run(&format!(
                "UPDATE evolution_instances SET instance_status = '{state}', pairing_requested_at = NULL
                 WHERE user_id = '{user}'"
            ));
            assert_eq!(
                link(&user, DIGITS).as_deref(),
                Some("connecting"),
                "{state}"
            );
            assert_eq!(json("SELECT evoq_refresh_qr()")["paired"], 1, "{state}");
            assert_eq!(mock.pairing(&name).unwrap().0.as_deref(), Some(DIGITS));
            assert_eq!(status(&user), "connecting");
        }
    }

    /// A lost instance (the server deleted it) is created again, and the create carries the
    /// number.
    #[pg_test]
    fn a_lost_instance_is_created_again_with_the_number() {
        let mock = mock();
        let (user, name) = created_instance(&mock);
        assert!(mock.remove_instance(&name));
        run(&format!(
            "UPDATE evolution_instances SET instance_status = 'lost' WHERE user_id = '{user}'"
        ));
        assert_eq!(link(&user, DIGITS).as_deref(), Some("queued"));
        let summary = json("SELECT evoq_process_queue()");
        assert_eq!(summary["created"], 1, "{summary}");
        assert_eq!(mock.pairing(&name).unwrap().0.as_deref(), Some(DIGITS));
        assert_eq!(links(), 0);
    }

    /// Each new QR brings a new code, in every qrcode.updated delivery too: the row keeps the
    /// latest.
    #[pg_test]
    fn a_delivery_brings_the_next_code() {
        let mock = mock();
        let (user, name) = connecting_instance_with_webhook(&mock);
        link(&user, DIGITS);
        assert_eq!(json("SELECT evoq_refresh_qr()")["paired"], 1);
        let first = s(&instance_row(&user)["pairing_code"]).to_string();
        mock.rotate_qr(&name);
        let delivery = wait_for_delivery(&mock, |d| {
            d["event"] == "qrcode.updated"
                && d["envelope"]["data"]["qrcode"]["pairingCode"].is_string()
                && d["envelope"]["data"]["qrcode"]["pairingCode"] != first.as_str()
        });
        let secret = one::<String>("SELECT webhook_secret FROM evoq.settings").unwrap();
        Spi::run_with_args(
            "SELECT set_config('request.headers', $1, true)",
            &[json!({"x-evoq-secret": secret}).to_string().into()],
        )
        .unwrap();
        let applied = json(&format!(
            "SELECT evoq_webhook({}::jsonb)",
            pgrx::spi::quote_literal(delivery["envelope"].to_string())
        ));
        assert_eq!(applied["result"], "applied", "{applied}");
        let row = instance_row(&user);
        assert_eq!(
            row["pairing_code"], delivery["envelope"]["data"]["qrcode"]["pairingCode"],
            "{row}"
        );
        assert_ne!(s(&row["pairing_code"]), first);
    }

    fn wait_for_delivery(
        mock: &evolution_mock::MockServer,
        wanted: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Some(d) = mock.deliveries().into_iter().find(|d| wanted(d)) {
                return d;
            }
            assert!(std::time::Instant::now() < deadline, "no such delivery");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// A listening app hears of the code as of a new QR, and the payload never carries it.
    #[pg_test]
    fn the_code_is_announced_like_a_new_qr_without_the_code() {
        clean_committed();
        let mock = mock();
        committed_configure(&mock, "");
        let user = "00000000-0000-4000-8000-0000000cafe1";
        committed(&format!(
            "INSERT INTO evolution_instance_creation_queue (user_id) VALUES ('{user}')"
        ));
        committed("DO $$ BEGIN PERFORM evoq_process_queue(); END $$");
        listen_for_instance_changes();
        committed(&format!(
            "DO $$ BEGIN PERFORM evoq_link_with_phone('{user}', '{DIGITS}'); END $$"
        ));
        committed("DO $$ BEGIN PERFORM evoq_refresh_qr(); END $$");
        let got = instance_changes_heard(1);
        let code: Option<String> = Spi::get_one(&format!(
            "SELECT pairing_code FROM evolution_instances WHERE user_id = '{user}'"
        ))
        .unwrap();
        clean_committed();
        let code = code.expect("a pairing code");
        let last: Value = serde_json::from_str(got.last().expect("a notification")).unwrap();
        assert!(last["qr_updated_at"].is_string(), "{got:?}");
        assert!(
            got.iter()
                .all(|n| !n.contains(&code) && !n.contains(DIGITS)),
            "{got:?}"
        );
    }

    /// The app knows the phone at sign-up: evoq_attach's phone_column. The create carries the
    /// number; a value that is not a phone number queues the user without one.
    #[pg_test]
    fn a_phone_column_of_the_profiles_table_goes_with_the_create() {
        let mock = mock();
        mock.set_qr_on_create(true);
        configure(&mock);
        run("CREATE TABLE public.profiles (id uuid NOT NULL, phone text, age integer, fixed character(15))");
        let e = error_of("SELECT evoq_attach('public.profiles', phone_column => 'fixed')").unwrap();
        assert!(
            e.starts_with("22023: column \"fixed\" of profiles is character(15), not text"),
            "{e}"
        );
        let e =
            error_of("SELECT evoq_attach('public.profiles', phone_column => 'mobile')").unwrap();
        assert!(
            e.starts_with("22023: table profiles has no column \"mobile\""),
            "{e}"
        );
        let e = error_of("SELECT evoq_attach('public.profiles', phone_column => 'age')").unwrap();
        assert!(
            e.starts_with("22023: column \"age\" of profiles is integer, not text"),
            "{e}"
        );
        assert!(
            one::<String>("SELECT evoq_attach('public.profiles', phone_column => 'phone')")
                .unwrap()
                .contains("phone column phone")
        );
        let user = one::<String>(&format!(
            "INSERT INTO public.profiles (id, phone) VALUES (gen_random_uuid(), '{TYPED}') RETURNING id::text"
        ))
        .unwrap();
        let nophone = one::<String>(
            "INSERT INTO public.profiles (id, phone) VALUES (gen_random_uuid(), NULL) RETURNING id::text",
        )
        .unwrap();
        let bad = one::<String>(
            "INSERT INTO public.profiles (id, phone) VALUES (gen_random_uuid(), 'call me') RETURNING id::text",
        )
        .unwrap();
        assert_eq!(
            one::<String>(&format!(
                "SELECT phone FROM evoq.phone_links WHERE user_id = '{user}'"
            ))
            .as_deref(),
            Some(DIGITS)
        );
        assert_eq!(links(), 1, "no number for {nophone} nor {bad}");
        assert_eq!(
            count("SELECT count(*) FROM evolution_instance_creation_queue"),
            3,
            "every profile is queued"
        );
        assert_eq!(json("SELECT evoq_process_queue()")["created"], 3);
        let name = s(&instance_row(&user)["instance_name"]).to_string();
        assert_eq!(mock.pairing(&name).unwrap().0.as_deref(), Some(DIGITS));
        assert!(instance_row(&user)["pairing_code"].is_string());
        assert!(instance_row(&bad)["pairing_code"].is_null());
        assert_eq!(links(), 0);
        // The attachment check reads the user id column only: the phone column is no problem.
        assert_eq!(one::<String>("SELECT evoq._attachment_problems()"), None);
    }

    fn deliver_as_the_server(envelope: &Value) -> Value {
        let secret = one::<String>("SELECT webhook_secret FROM evoq.settings").unwrap();
        Spi::run_with_args(
            "SELECT set_config('request.headers', $1, true)",
            &[json!({"x-evoq-secret": secret}).to_string().into()],
        )
        .unwrap();
        json(&format!(
            "SELECT evoq_webhook({}::jsonb)",
            pgrx::spi::quote_literal(envelope.to_string())
        ))
    }

    /// The pairing's own logout makes the server deliver a close (401) (and, on v2,
    /// logout.instance where subscribed). Applied after the pairing was recorded, they no longer move the row: it
    /// stays connecting with its code, and the next QR's code still lands.
    #[pg_test]
    fn the_pairings_own_logout_deliveries_do_not_close_the_instance() {
        let mock = mock();
        let (user, name) = connecting_instance_with_webhook(&mock);
        link(&user, DIGITS);
        let before = mock.deliveries().len();
        assert_eq!(json("SELECT evoq_refresh_qr()")["paired"], 1);
        let code = s(&instance_row(&user)["pairing_code"]).to_string();
        // Every delivery the pairing caused, in the order the server sent them.
        let sent: Vec<Value> = mock.deliveries().into_iter().skip(before).collect();
        let events: Vec<&str> = sent
            .iter()
            .map(|d| d["event"].as_str().unwrap_or(""))
            .collect();
        // (logout.instance too, when subscribed; evoq's default events are QRCODE_UPDATED and
        // CONNECTION_UPDATE)
        assert!(
            sent.iter()
                .any(|d| d["envelope"]["data"]["state"] == "close"
                    && d["envelope"]["data"]["statusReason"] == 401),
            "{events:?}"
        );
        for d in &sent {
            deliver_as_the_server(&d["envelope"]);
        }
        let row = instance_row(&user);
        assert_eq!(s(&row["instance_status"]), "connecting", "{row}");
        assert!(row["pairing_code"].is_string(), "{row}");
        // The next QR (and its code) is applied as usual.
        mock.rotate_qr(&name);
        let next = wait_for_delivery(&mock, |d| {
            d["event"] == "qrcode.updated"
                && d["envelope"]["data"]["qrcode"]["pairingCode"].is_string()
                && d["envelope"]["data"]["qrcode"]["pairingCode"] != code.as_str()
        });
        assert_eq!(
            deliver_as_the_server(&next["envelope"])["result"],
            "applied"
        );
        assert_ne!(s(&instance_row(&user)["pairing_code"]), code);
    }

    /// The other order (the usual one: a connect on a close instance waits 2 s): the logout's
    /// close is applied first, then the pairing's answer is recorded. The row is connecting
    /// again with the code, and the number is let go.
    #[pg_test]
    fn a_pairing_answer_recorded_after_its_logouts_close_reopens_the_row() {
        let mock = mock();
        let (user, name) = connecting_instance_with_webhook(&mock);
        link(&user, DIGITS);
        let row = instance_row(&user);
        let (id, claimed_at) = (row["id"].clone(), row["updated_at"].clone());
        let close = json!({"event": "connection.update", "instance": name,
                           "data": {"instance": name, "state": "close", "statusReason": 401},
                           "destination": "http://127.0.0.1:9/rest/v1/rpc/evoq_webhook",
                           "date_time": "2026-12-02T10:00:00.000Z",
                           "server_url": "http://evolution:8080", "apikey": null});
        assert_eq!(deliver_as_the_server(&close)["result"], "applied");
        assert_eq!(status(&user), "close");
        let answer = json!([{"id": id, "outcome": "qr", "qr_code": "data:image/png;base64,AA",
                             "qr_text": "2@paired", "pairing_code": "PAIR1234", "qr_count": 1,
                             "claimed_status": "connecting", "claimed_at": claimed_at,
                             "paired": true, "number": DIGITS}]);
        run(&format!(
            "SELECT evoq._record_refresh_results({}::jsonb)",
            pgrx::spi::quote_literal(answer.to_string())
        ));
        let row = instance_row(&user);
        assert_eq!(s(&row["instance_status"]), "connecting", "{row}");
        assert_eq!(s(&row["pairing_code"]), "PAIR1234");
        assert!(row["disconnect_reason"].is_null(), "{row}");
        assert_eq!(links(), 0);
    }

    /// Asking again with the same number while its pairing is pending changes nothing; a new
    /// number for an instance asked recently waits for its pace: calls in a row cannot make the
    /// server log out and connect again and again.
    #[pg_test]
    fn calls_in_a_row_do_not_make_logouts_in_a_row() {
        let mock = mock();
        let (user, _) = created_instance(&mock);
        let logouts = || mock.count_calls("DELETE", "/instance/logout/");
        link(&user, DIGITS);
        let rearmed = instance_row(&user);
        link(&user, TYPED);
        assert_eq!(
            instance_row(&user),
            rearmed,
            "the same number again changed the row"
        );
        assert_eq!(json("SELECT evoq_refresh_qr()")["paired"], 1);
        assert_eq!(logouts(), 1);
        // A new number right after: kept, but paired only once the pace allows.
        link(&user, "+1 415 555 0100");
        assert_eq!(json("SELECT evoq_refresh_qr()")["paired"], 0);
        assert_eq!(logouts(), 1);
        assert_eq!(
            one::<String>("SELECT phone FROM evoq.phone_links").as_deref(),
            Some("14155550100")
        );
        run(&format!(
            "UPDATE evolution_instances SET last_refresh_at = now() - interval '1 minute' WHERE user_id = '{user}'"
        ));
        assert_eq!(json("SELECT evoq_refresh_qr()")["paired"], 1);
        assert_eq!(logouts(), 2);
        assert_eq!(links(), 0);
    }
}
