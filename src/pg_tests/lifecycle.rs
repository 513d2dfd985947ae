//! pg_tests: the rest of an instance's life that jobs and users drive: the QR window and
//! expiry, evoq_reconnect, the sweep of open instances, deprovisioning, a changed webhook,
//! instances that never get a QR, and NOTIFY.

#[pgrx::pg_schema]
mod tests {
    use crate::testing::*;
    use evolution_mock::FaultKind;
    use pgrx::prelude::*;
    use serde_json::{json, Value};

    /// Moves the instance's QR window start into the past.
    fn window_started(user: &str, ago: &str) {
        run(&format!(
            "UPDATE evolution_instances SET connecting_since = now() - interval '{ago}', last_refresh_at = NULL
             WHERE user_id = '{user}'"
        ));
    }

    fn status(user: &str) -> String {
        s(&instance_row(user)["instance_status"]).to_string()
    }

    #[pg_test]
    fn an_unscanned_instance_expires_is_logged_out_and_never_connected_again() {
        let mock = mock();
        let (user, name) = created_instance(&mock);
        assert!(instance_row(&user)["connecting_since"].is_string());
        assert_eq!(
            mock.instance(&name).unwrap()["sockets"],
            1,
            "create started a socket"
        );
        // Inside the window: refreshed as before.
        json("SELECT evoq_refresh_qr()");
        assert_eq!(mock.count_calls("GET", "/instance/connect/"), 1);

        window_started(&user, "11 minutes");
        let summary = json("SELECT evoq_refresh_qr()");
        assert_eq!(summary["expired"], 1, "{summary}");
        assert_eq!(mock.count_calls("DELETE", "/instance/logout/"), 1);
        assert_eq!(
            mock.count_calls("GET", "/instance/connect/"),
            1,
            "no connect for it"
        );
        let row = instance_row(&user);
        assert_eq!(row["instance_status"], "expired");
        assert_eq!(row["qr_code"], Value::Null);
        assert!(s(&row["disconnect_reason"]).contains("QR window"), "{row}");
        assert_eq!(
            mock.instance(&name).unwrap()["sockets"],
            0,
            "an expired instance costs the server no socket"
        );

        // Later runs leave it alone: no connect starts a new socket behind the user's back.
        for _ in 0..3 {
            make_refresh_due();
            json("SELECT evoq_refresh_qr()");
        }
        assert_eq!(mock.count_calls("GET", "/instance/connect/"), 1);
        assert_eq!(mock.count_calls("DELETE", "/instance/logout/"), 1);
        assert_eq!(mock.instance(&name).unwrap()["sockets"], 0);

        // The user asks for a new QR: a new window, and the next run connects.
        assert_eq!(
            one::<String>(&format!("SELECT evoq_reconnect('{user}')")).as_deref(),
            Some("connecting")
        );
        let summary = json("SELECT evoq_refresh_qr()");
        assert_eq!(summary["new_qr"], 1, "{summary}");
        assert_eq!(status(&user), "connecting");
        assert_eq!(mock.instance(&name).unwrap()["sockets"], 1);
    }

    #[pg_test]
    fn the_window_is_a_setting() {
        let mock = mock();
        let (user, _) = created_instance(&mock);
        window_started(&user, "3 seconds");
        run("SET LOCAL evoq.qr_window_ms = 2000");
        assert_eq!(json("SELECT evoq_refresh_qr()")["expired"], 1);
        assert_eq!(status(&user), "expired");
    }

    #[pg_test]
    fn a_failed_logout_keeps_the_row_connecting_and_is_tried_again() {
        let mock = mock();
        let (user, _) = created_instance(&mock);
        window_started(&user, "11 minutes");
        mock.add_fault(fault(
            "DELETE",
            "/instance/logout/",
            FaultKind::Status { code: 500 },
            Some(1),
        ));
        let summary = json("SELECT evoq_refresh_qr()");
        assert_eq!(summary["errors"], 1, "{summary}");
        assert_eq!(status(&user), "connecting");
        assert_eq!(mock.count_calls("GET", "/instance/connect/"), 0);
        make_refresh_due();
        assert_eq!(json("SELECT evoq_refresh_qr()")["expired"], 1);
        assert_eq!(status(&user), "expired");
    }

    #[pg_test]
    fn reconnect_is_for_the_user_themselves() {
        let mock = mock();
        let (user, _) = created_instance(&mock);
        supabase_like();
        window_started(&user, "11 minutes");
        json("SELECT evoq_refresh_qr()");
        assert_eq!(status(&user), "expired");

        run("SET LOCAL ROLE authenticated");
        run(&format!(
            "SELECT set_config('request.jwt.claims', '{{\"sub\": \"{}\"}}', true)",
            "00000000-0000-4000-8000-000000000001"
        ));
        let e = error_of(&format!("SELECT evoq_reconnect('{user}')")).expect("refused");
        assert!(
            e.starts_with("42501: evoq_reconnect: only the user themselves"),
            "{e}"
        );
        let e = error_of(&format!("SELECT evoq_deprovision('{user}')")).expect("refused");
        assert!(
            e.starts_with("42501: evoq_deprovision: only the user themselves"),
            "{e}"
        );
        run(&format!(
            "SELECT set_config('request.jwt.claims', '{{\"sub\": \"{user}\"}}', true)"
        ));
        assert_eq!(
            one::<String>(&format!("SELECT evoq_reconnect('{user}')")).as_deref(),
            Some("connecting")
        );
        run("RESET ROLE");
        assert_eq!(status(&user), "connecting");

        // An open instance has nothing to reconnect.
        run(&format!(
            "UPDATE evolution_instances SET instance_status = 'open' WHERE user_id = '{user}'"
        ));
        let e = error_of(&format!("SELECT evoq_reconnect('{user}')")).unwrap();
        assert!(
            e.starts_with("55000: evoq_reconnect: the instance is connected already"),
            "{e}"
        );
    }

    #[pg_test]
    fn a_phone_that_unlinks_is_noticed_without_webhooks() {
        let mock = mock();
        let (user, name) = created_instance(&mock);
        assert!(mock.scan(&name, None, None));
        make_refresh_due();
        assert_eq!(json("SELECT evoq_refresh_qr()")["opened"], 1);
        assert_eq!(status(&user), "open");
        let connects = mock.count_calls("GET", "/instance/connect/");

        // Not due yet: an open instance is checked once per evoq.state_check_interval_ms.
        json("SELECT evoq_refresh_qr()");
        assert_eq!(mock.count_calls("GET", "/instance/connectionState/"), 0);
        run("UPDATE evolution_instances SET last_state_check_at = now() - interval '6 minutes'");
        let summary = json("SELECT evoq_refresh_qr()");
        assert_eq!(summary["still_open"], 1, "{summary}");
        assert_eq!(status(&user), "open");

        assert!(mock.unlink(&name));
        run("UPDATE evolution_instances SET last_state_check_at = now() - interval '6 minutes'");
        let summary = json("SELECT evoq_refresh_qr()");
        assert_eq!(summary["closed"], 1, "{summary}");
        let row = instance_row(&user);
        assert_eq!(row["instance_status"], "close");
        assert!(
            s(&row["disconnect_reason"]).contains("connectionState"),
            "{row}"
        );
        // Never a connect: that would start a socket for a user who did not ask.
        for _ in 0..2 {
            make_refresh_due();
            run("UPDATE evolution_instances SET last_state_check_at = NULL");
            json("SELECT evoq_refresh_qr()");
        }
        assert_eq!(mock.count_calls("GET", "/instance/connect/"), connects);
        assert_eq!(mock.instance(&name).unwrap()["sockets"], 0);
    }

    #[pg_test]
    fn deleting_a_profile_deletes_its_instance_at_the_server() {
        let mock = mock();
        let (user, name) = created_instance(&mock);
        assert!(one::<String>(&format!(
            "SELECT token FROM evoq.instance_tokens WHERE instance_name = '{name}'"
        ))
        .is_some());
        run(&format!("DELETE FROM public.profiles WHERE id = '{user}'"));
        let q = queue_row(&user);
        assert_eq!(
            (&q["action"], &q["status"]),
            (&json!("delete"), &json!("pending")),
            "{q}"
        );

        let summary = json("SELECT evoq_process_queue()");
        assert_eq!(summary["deleted"], 1, "{summary}");
        let calls: Vec<String> = mock
            .calls()
            .iter()
            .filter(|c| c["method"] == "DELETE")
            .map(|c| s(&c["path"]).to_string())
            .collect();
        assert_eq!(
            calls,
            vec![
                format!("/instance/logout/{name}"),
                format!("/instance/delete/{name}")
            ],
            "logout first, then delete"
        );
        assert!(mock.instance(&name).is_none(), "gone from the server");
        let row = instance_row(&user);
        assert_eq!(row["instance_status"], "deleted");
        assert_eq!(queue_row(&user)["status"], "completed");
        assert_eq!(
            count(&format!(
                "SELECT count(*) FROM evoq.instance_tokens WHERE instance_name = '{name}'"
            )),
            0,
            "its token is removed"
        );

        // The user signs up again later: a fresh instance.
        run(&format!(
            "INSERT INTO public.profiles (id, email) VALUES ('{user}', 'back@example.com')"
        ));
        assert_eq!(json("SELECT evoq_process_queue()")["created"], 1);
        assert_eq!(status(&user), "connecting");
        assert!(mock.instance(&name).is_some());
    }

    #[pg_test]
    fn a_pending_creation_becomes_a_deletion_and_nothing_is_ever_created() {
        let mock = mock();
        configure(&mock);
        profiles();
        let user = sign_up(1).remove(0);
        run(&format!("DELETE FROM public.profiles WHERE id = '{user}'"));
        let q = queue_row(&user);
        assert_eq!(
            (&q["action"], &q["status"]),
            (&json!("delete"), &json!("pending")),
            "{q}"
        );
        // The deletion is still sent, under the name the creation would have used: a run that
        // was cancelled after the server created the instance leaves no trace in the row.
        assert_eq!(json("SELECT evoq_process_queue()")["deleted"], 1);
        let name = one::<String>(&format!("SELECT evoq_instance_name('{user}')")).unwrap();
        assert_eq!(
            mock.count_calls("DELETE", &format!("/instance/delete/{name}")),
            1
        );
        assert_eq!(mock.count_calls("POST", "/instance/"), 0, "nothing created");
        assert_eq!(queue_row(&user)["status"], "completed");
        assert_eq!(count("SELECT count(*) FROM evolution_instances"), 0);
    }

    #[pg_test]
    fn deprovisioning_an_instance_already_gone_is_done() {
        let mock = mock();
        let (user, name) = created_instance(&mock);
        assert!(mock.remove_instance(&name));
        assert_eq!(
            one::<String>(&format!("SELECT evoq_deprovision('{user}')")).as_deref(),
            Some("queued")
        );
        assert_eq!(json("SELECT evoq_process_queue()")["deleted"], 1);
        assert_eq!(status(&user), "deleted");
        // Again: nothing to do, and no call.
        let deletes = mock.count_calls("DELETE", "/instance/");
        assert_eq!(
            one::<String>(&format!("SELECT evoq_deprovision('{user}')")).as_deref(),
            Some("done")
        );
        json("SELECT evoq_process_queue()");
        assert_eq!(mock.count_calls("DELETE", "/instance/"), deletes);
        assert_eq!(
            one::<String>("SELECT evoq_deprovision(gen_random_uuid())").as_deref(),
            Some("nothing")
        );
    }

    /// A deletion whose answer was lost (a 503) waits to be retried; meanwhile the refresh, a
    /// removal delivery and a stray loss must not turn it back into a creation.
    #[pg_test]
    fn a_loss_never_turns_a_deletion_back_into_a_creation() {
        let mock = mock();
        let (user, name) = created_instance(&mock);
        mock.add_fault(fault(
            "DELETE",
            "/instance/delete/",
            FaultKind::Status { code: 503 },
            Some(1),
        ));
        one::<String>(&format!("SELECT evoq_deprovision('{user}')"));
        assert_eq!(json("SELECT evoq_process_queue()")["retrying"], 1);
        assert!(
            mock.remove_instance(&name),
            "the server deleted it after all"
        );
        // The refresh leaves an instance being deleted alone: no connect (it would 404 and
        // queue a creation), no expiry, no check.
        window_started(&user, "11 minutes");
        let gets = mock.count_calls("GET", "/instance/");
        assert_eq!(json("SELECT evoq_refresh_qr()")["checked"], 0);
        assert_eq!(mock.count_calls("GET", "/instance/"), gets);
        // A loss reported anyway (a refresh that claimed the row just before) loses to it.
        run(&format!(
            "INSERT INTO evoq.requeue_requests (user_id, reason) VALUES ('{user}', 'lost')"
        ));
        run("SELECT evoq._apply_requeue_requests()");
        assert_eq!(queue_row(&user)["action"], "delete");
        assert_eq!(count("SELECT count(*) FROM evoq.requeue_requests"), 0);
        make_all_due();
        assert_eq!(json("SELECT evoq_process_queue()")["deleted"], 1);
        assert_eq!(status(&user), "deleted");
        assert_eq!(
            mock.count_calls("POST", "/instance/create"),
            1,
            "only the first creation"
        );
    }

    #[pg_test]
    fn an_expiry_checks_for_a_scan_first() {
        let mock = mock();
        let (user, name) = created_instance(&mock);
        assert!(mock.scan(&name, None, None));
        window_started(&user, "11 minutes");
        let summary = json("SELECT evoq_refresh_qr()");
        assert_eq!(summary["opened"], 1, "{summary}");
        assert_eq!(mock.count_calls("DELETE", "/instance/logout/"), 0);
        assert_eq!(status(&user), "open");
    }

    #[pg_test]
    fn a_failed_delete_is_retried_like_a_creation() {
        let mock = mock();
        let (user, _) = created_instance(&mock);
        mock.add_fault(fault(
            "DELETE",
            "/instance/delete/",
            FaultKind::Status { code: 503 },
            Some(1),
        ));
        one::<String>(&format!("SELECT evoq_deprovision('{user}')"));
        let summary = json("SELECT evoq_process_queue()");
        assert_eq!(summary["retrying"], 1, "{summary}");
        let q = queue_row(&user);
        assert_eq!(
            (&q["action"], &q["status"]),
            (&json!("delete"), &json!("pending")),
            "{q}"
        );
        make_all_due();
        assert_eq!(json("SELECT evoq_process_queue()")["deleted"], 1);
        assert_eq!(status(&user), "deleted");
    }

    #[pg_test]
    fn a_changed_webhook_is_set_on_existing_instances_and_the_old_secret_retires() {
        let mock = mock();
        let (_, name) = created_instance(&mock);
        let old = one::<String>("SELECT webhook_secret FROM evoq.settings").unwrap();
        assert_eq!(
            count("SELECT webhooks_to_repoint FROM evoq_status"),
            0,
            "created with the webhook"
        );
        configure_with(
            &mock.url(),
            API_KEY,
            ", webhook_url => 'https://db.example/rest/v1/rpc/evoq_webhook', webhook_headers => '{\"apikey\": \"anon-key\"}', rotate_webhook_secret => true",
        );
        let new = one::<String>("SELECT webhook_secret FROM evoq.settings").unwrap();
        assert_ne!(new, old);
        assert_eq!(
            one::<String>("SELECT webhook_secret_previous FROM evoq.settings").as_deref(),
            Some(old.as_str()),
            "the old secret is accepted until every instance has the new one"
        );
        assert_eq!(count("SELECT webhooks_to_repoint FROM evoq_status"), 1);
        let summary = json("SELECT evoq_refresh_qr()");
        assert_eq!(summary["repointed"], 1, "{summary}");
        let hook = &mock.instance(&name).unwrap()["webhook"];
        assert_eq!(
            hook["url"], "https://db.example/rest/v1/rpc/evoq_webhook",
            "{hook}"
        );
        assert_eq!(hook["headers"]["apikey"], "anon-key", "{hook}");
        assert_eq!(s(&hook["headers"]["x-evoq-secret"]), new, "{hook}");
        assert_eq!(count("SELECT webhooks_to_repoint FROM evoq_status"), 0);
        assert_eq!(
            one::<String>("SELECT webhook_secret_previous FROM evoq.settings"),
            None,
            "retired once no instance carries it"
        );
        // Configuring again with the same webhook sets nothing again.
        configure_with(
            &mock.url(),
            API_KEY,
            ", webhook_url => 'https://db.example/rest/v1/rpc/evoq_webhook', webhook_headers => '{\"apikey\": \"anon-key\"}'",
        );
        assert_eq!(count("SELECT webhooks_to_repoint FROM evoq_status"), 0);
    }

    #[pg_test]
    fn bad_webhook_headers_are_refused() {
        let mock = mock();
        for (headers, expected) in [
            ("'[1]'", "webhook_headers must be a JSON object"),
            ("'{\"bad name\": \"x\"}'", "is not a header name"),
            ("'{\"x-evoq-secret\": \"x\"}'", "evoq's own header"),
        ] {
            let e = error_of(&format!(
                "SELECT evoq_configure(api_url => '{}', api_key => 'k', webhook_headers => {headers})",
                mock.url()
            ))
            .expect("refused");
            assert!(e.starts_with("22023: ") && e.contains(expected), "{e}");
        }
    }

    #[pg_test]
    fn instances_that_never_get_a_qr_surface_in_status() {
        let mock = mock();
        mock.set_qr_never(true);
        let (_, _) = created_instance(&mock);
        for _ in 0..3 {
            make_refresh_due();
            json("SELECT evoq_refresh_qr()");
        }
        let status = json("SELECT to_jsonb(s) FROM evoq_status s");
        assert_eq!(status["instances_without_qr"], 1, "{status}");
        assert!(
            s(&status["instances_without_qr_hint"]).contains("WhatsApp Web version"),
            "{status}"
        );
    }

    /// A listening application: a second session LISTENs, changes are committed, and it reads
    /// what arrived.
    #[pg_test]
    fn every_status_and_qr_change_is_announced() {
        clean_committed();
        let mock = mock();
        committed_configure(&mock, "");
        let user = "00000000-0000-4000-8000-00000000beef";
        listen_for_instance_changes();
        committed(&format!(
            "INSERT INTO evolution_instance_creation_queue (user_id) VALUES ('{user}')"
        ));
        committed("DO $$ BEGIN PERFORM evoq_process_queue(); END $$");
        committed("UPDATE evolution_instances SET last_refresh_at = NULL");
        committed("DO $$ BEGIN PERFORM evoq_refresh_qr(); END $$");
        // Not a status or QR change: no notification.
        committed("UPDATE evolution_instances SET last_refresh_at = NULL");
        let got: Vec<Value> = instance_changes_heard(2)
            .iter()
            .map(|n| serde_json::from_str(n).unwrap())
            .collect();
        clean_committed();
        assert_eq!(got.len(), 2, "created, then a new QR: {got:?}");
        assert_eq!(got[0]["user_id"], user);
        assert_eq!(got[0]["status"], "connecting");
        assert!(got[1]["qr_updated_at"].is_string(), "{got:?}");
        assert!(got
            .iter()
            .all(|n| n.get("qr_code").is_none() && n.get("qr_text").is_none()));
    }

    /// A 2.3.6 server that cannot reach WhatsApp goes on reconnecting an instance after its
    /// logout (and even after its delete): its deliveries keep coming. They are counted on the
    /// row, evoq_status shows the instance as still looping with a hint, and the logout is
    /// tried again: at once the first time, then no sooner than its backoff, at most 5 times.
    #[pg_test]
    fn an_expired_instance_the_server_still_reconnects_is_shown_and_logged_out_again() {
        let mock = mock();
        let (user, name) = created_instance(&mock);
        window_started(&user, "11 minutes");
        json("SELECT evoq_refresh_qr()");
        assert_eq!(status(&user), "expired");
        let logouts = || mock.count_calls("DELETE", "/instance/logout/");
        assert_eq!(logouts(), 1);
        let secret = one::<String>("SELECT webhook_secret FROM evoq.settings").unwrap();
        Spi::run_with_args(
            "SELECT set_config('request.headers', $1, true)",
            &[serde_json::json!({"x-evoq-secret": secret})
                .to_string()
                .into()],
        )
        .unwrap();
        let deliver = |event: &str, data: Value| {
            Spi::run_with_args(
                "SELECT evoq_webhook($1)",
                &[pgrx::JsonB(
                    serde_json::json!({"event": event, "instance": name, "data": data,
                    "date_time": "2099-01-01T00:00:00.000Z"}),
                )
                .into()],
            )
            .unwrap();
        };
        // Nothing counted before a delivery comes.
        assert_eq!(count("SELECT instances_still_looping FROM evoq_status"), 0);
        deliver(
            "connection.update",
            serde_json::json!({"state": "connecting"}),
        );
        deliver(
            "qrcode.updated",
            serde_json::json!({"qrcode": {"code": "2@x", "base64": "data:image/png;base64,AA"}}),
        );
        assert_eq!(status(&user), "expired", "a late QR never re-opens it");
        assert_eq!(instance_row(&user)["server_loop_deliveries"], 2);
        assert_eq!(count("SELECT instances_still_looping FROM evoq_status"), 1);
        assert!(
            one::<String>("SELECT instances_still_looping_hint FROM evoq_status")
                .unwrap()
                .contains("restart of the Evolution server")
        );
        // Logged out again by the next refresh, and not again right after.
        let summary = json("SELECT evoq_refresh_qr()");
        assert_eq!(summary["relogged"], 1, "{summary}");
        assert_eq!(logouts(), 2);
        deliver(
            "connection.update",
            serde_json::json!({"state": "connecting"}),
        );
        json("SELECT evoq_refresh_qr()");
        assert_eq!(logouts(), 2, "the second retry waits its backoff");
        // Due again: logged out again; after five retries, no more.
        for _ in 0..6 {
            run(&format!(
                "UPDATE evolution_instances SET server_loop_logout_at = server_loop_logout_at - interval '1 day'
                 WHERE user_id = '{user}'"
            ));
            deliver(
                "connection.update",
                serde_json::json!({"state": "connecting"}),
            );
            json("SELECT evoq_refresh_qr()");
        }
        assert_eq!(logouts(), 6, "one logout at expiry, then five retries");
        // Reconnecting starts a new life: nothing counted any more.
        run("RESET ROLE");
        json(&format!("SELECT to_jsonb(evoq_reconnect('{user}'))"));
        assert_eq!(instance_row(&user)["server_loop_deliveries"], 0);
    }
}
