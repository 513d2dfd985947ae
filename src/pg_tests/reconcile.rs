//! pg_tests: the reconciler (evoq_reconcile, and the QR refresh's reconcile when due): lost
//! instances created again, orphans deleted after their grace and never before, names outside
//! the namespace never touched, drifted states checked, rows newer than the listing not judged.

#[pgrx::pg_schema]
mod tests {
    use crate::testing::*;
    use evolution_mock::{FaultKind, Flavor};
    use pgrx::prelude::*;

    fn reconcile() -> serde_json::Value {
        json("SELECT evoq_reconcile()")
    }

    /// A name of this deployment's namespace for a user nobody signed up.
    fn unowned_name() -> String {
        one::<String>("SELECT evoq_instance_name(gen_random_uuid())").unwrap()
    }

    #[pg_test]
    fn an_instance_the_server_lost_is_created_again_and_other_names_are_never_touched() {
        for flavor in [Flavor::V2, Flavor::V1] {
            clean_instances();
            let mock = mock_with(flavor);
            let (user, name) = created_instance(&mock);
            // Another app's instance, and one of another deployment's namespace.
            let other_ns = format!("evoq_staging_{}", uuid::Uuid::new_v4().simple());
            mock.seed_instances(&["shop_support".to_string(), other_ns.clone()], "open");
            run("SET LOCAL evoq.orphan_grace_ms = 0");
            assert!(mock.remove_instance(&name));
            let summary = reconcile();
            assert_eq!(
                (
                    summary["listed"].clone(),
                    summary["foreign"].clone(),
                    summary["missing"].clone()
                ),
                (2.into(), 2.into(), 1.into()),
                "{flavor:?}: {summary}"
            );
            assert_eq!(summary["orphans"], 0, "{summary}");
            let row = instance_row(&user);
            assert_eq!(row["instance_status"], "lost", "{row}");
            assert!(
                s(&row["last_error"]).contains("does not list this instance"),
                "{row}"
            );
            // Created again by the queue, as after a 404.
            assert_eq!(json("SELECT evoq_process_queue()")["created"], 1);
            assert_eq!(instance_row(&user)["instance_status"], "connecting");
            assert!(mock.instance(&name).is_some());
            // The foreign names were listed and left alone: no call ever named them.
            for foreign in ["shop_support", other_ns.as_str()] {
                assert!(mock.instance(foreign).is_some(), "{foreign}");
                assert!(!mock
                    .calls()
                    .iter()
                    .any(|c| c["path"].as_str().unwrap_or("").contains(foreign)));
            }
            // A second look finds nothing more.
            let again = reconcile();
            assert_eq!(
                (again["missing"].clone(), again["orphans"].clone()),
                (0.into(), 0.into()),
                "{again}"
            );
            assert_eq!(
                one::<String>("SELECT last_reconcile_summary->>'stopped' FROM evoq_status")
                    .as_deref(),
                Some("done")
            );
        }
    }

    fn clean_instances() {
        run("DROP TABLE IF EXISTS public.profiles");
        run("DELETE FROM evoq.instance_tokens");
        run("DELETE FROM evolution_instances");
        run("DELETE FROM evolution_instance_creation_queue");
        run("DELETE FROM evoq.requeue_requests");
        run("DELETE FROM evoq.reconcile_orphans");
    }

    #[pg_test]
    fn an_orphan_is_deleted_after_its_grace_period_and_not_before() {
        let mock = mock();
        configure(&mock);
        let orphan = unowned_name();
        mock.seed_instances(std::slice::from_ref(&orphan), "connecting");
        // The default grace: an hour.
        let first = reconcile();
        assert_eq!(
            (first["orphans"].clone(), first["orphans_waiting"].clone()),
            (1.into(), 1.into()),
            "{first}"
        );
        assert_eq!(first["orphans_removed"], 0);
        assert!(mock.instance(&orphan).is_some());
        assert_eq!(mock.count_calls("DELETE", "/instance/"), 0);
        assert_eq!(count("SELECT orphans_waiting FROM evoq_status"), 1);
        // Still unowned an hour later: logged out, then deleted.
        run("UPDATE evoq.reconcile_orphans SET first_seen_at = first_seen_at - interval '61 minutes'");
        let later = reconcile();
        assert_eq!(
            (
                later["orphans_removed"].clone(),
                later["orphans_waiting"].clone()
            ),
            (1.into(), 0.into()),
            "{later}"
        );
        assert!(mock.instance(&orphan).is_none());
        assert_eq!(
            mock.count_calls("DELETE", &format!("/instance/logout/{orphan}")),
            1
        );
        assert_eq!(
            mock.count_calls("DELETE", &format!("/instance/delete/{orphan}")),
            1
        );
        assert_eq!(count("SELECT count(*) FROM evoq.reconcile_orphans"), 0);
    }

    /// An orphan that a user's sign-up then owns is no orphan any more: its waiting ends, and
    /// the create adopts it.
    #[pg_test]
    fn a_queued_creation_owns_its_instance_even_before_its_row_exists() {
        let mock = mock();
        configure(&mock);
        profiles();
        // The create reached the server, and its answer was lost: the row is retrying.
        mock.add_fault(fault("POST", "/instance/create", FaultKind::Drop, Some(1)));
        let user = sign_up(1).remove(0);
        json("SELECT evoq_process_queue()");
        let name = one::<String>(&format!("SELECT evoq_instance_name('{user}')")).unwrap();
        mock.seed_instances(std::slice::from_ref(&name), "connecting");
        assert_eq!(queue_row(&user)["status"], "pending");
        run("SET LOCAL evoq.orphan_grace_ms = 0");
        let summary = reconcile();
        assert_eq!(
            (
                summary["orphans"].clone(),
                summary["orphans_removed"].clone()
            ),
            (0.into(), 0.into()),
            "{summary}"
        );
        assert!(mock.instance(&name).is_some());
        make_all_due();
        assert_eq!(json("SELECT evoq_process_queue()")["adopted"], 1);
        // A deleted user's instance the server still holds is an orphan again.
        run(&format!(
            "UPDATE evolution_instances SET instance_status = 'deleted' WHERE user_id = '{user}'"
        ));
        run(&format!(
            "DELETE FROM evolution_instance_creation_queue WHERE user_id = '{user}'"
        ));
        let summary = reconcile();
        assert_eq!(summary["orphans_removed"], 1, "{summary}");
        assert!(mock.instance(&name).is_none());
    }

    #[pg_test]
    fn a_state_that_drifted_without_a_delivery_is_checked_and_applied() {
        let mock = mock();
        let (user, name) = created_instance(&mock);
        // Scanned, and no webhook said so.
        assert!(mock.set_state_silently(&name, "open"));
        let summary = reconcile();
        assert_eq!(
            (
                summary["drift_checked"].clone(),
                summary["drift_applied"].clone()
            ),
            (1.into(), 1.into()),
            "{summary}"
        );
        assert_eq!(
            mock.count_calls("GET", &format!("/instance/connectionState/{name}")),
            1
        );
        assert_eq!(instance_row(&user)["instance_status"], "open");
        // Closed at the server, and no webhook said so.
        assert!(mock.set_state_silently(&name, "close"));
        assert_eq!(reconcile()["drift_applied"], 1);
        let row = instance_row(&user);
        assert_eq!(row["instance_status"], "close", "{row}");
        // In step: nothing asked.
        let calls = mock.count_calls("GET", "/instance/connectionState/");
        assert_eq!(reconcile()["drift_checked"], 0);
        assert_eq!(mock.count_calls("GET", "/instance/connectionState/"), calls);
    }

    /// A listing asked for before a row was written says nothing about that row (the instance
    /// may have been made after the server answered), and a listing that lacks most live rows
    /// at once is held back.
    #[pg_test]
    fn rows_newer_than_the_listing_are_not_judged_and_a_mass_loss_is_held_back() {
        let mock = mock();
        configure(&mock);
        profiles();
        sign_up(12);
        // A listing asked for after this transaction began, before the instances were made
        // (what a SQL function's run that began earlier meets): it lists none of them.
        let listed_at = one::<String>("SELECT clock_timestamp()::text").unwrap();
        assert_eq!(json("SELECT evoq_process_queue()")["created"], 12);
        let plan = json(&format!(
            "SELECT evoq._reconcile_apply('default', '[]', '{listed_at}', 0, 64)"
        ));
        assert_eq!(
            (plan["missing"].clone(), plan["missing_held_back"].clone()),
            (0.into(), 0.into()),
            "{plan}"
        );
        mock.reset();
        let summary = reconcile();
        assert_eq!(
            (
                summary["missing"].clone(),
                summary["missing_held_back"].clone()
            ),
            (0.into(), 12.into()),
            "{summary}"
        );
        assert_eq!(
            count("SELECT count(*) FROM evolution_instances WHERE instance_status = 'connecting'"),
            12
        );
    }

    /// A reconcile in progress (its lease not run out) keeps another from starting; one whose
    /// lease ran out no longer does, and the first one's end then leaves the second's alone.
    #[pg_test]
    fn a_reconcile_holds_its_server_and_a_late_end_changes_nothing() {
        let mock = mock();
        configure(&mock);
        reconcile();
        run("UPDATE evoq.reconciles SET started_at = clock_timestamp(), lease_until = clock_timestamp() + interval '1 hour', summary = NULL");
        let busy = reconcile();
        assert_eq!(busy["stopped"], "busy", "{busy}");
        assert_eq!(mock.count_calls("GET", "/instance/fetchInstances"), 1);
        run("UPDATE evoq.reconciles SET lease_until = clock_timestamp() - interval '1 second'");
        let old_start = one::<String>("SELECT started_at::text FROM evoq.reconciles").unwrap();
        assert_eq!(reconcile()["stopped"], "done");
        run(&format!(
            "SELECT evoq._reconcile_finish('default', '{old_start}', '{{\"stopped\": \"late\"}}', NULL, '[]')"
        ));
        assert_eq!(
            one::<String>("SELECT summary->>'stopped' FROM evoq.reconciles").as_deref(),
            Some("done")
        );
    }

    /// A 0.1.0 name carries no namespace (another database that owns such names may hold it):
    /// never taken for an orphan. A removed name that a row took meanwhile is lost again.
    #[pg_test]
    fn legacy_names_are_never_orphans_and_a_name_taken_meanwhile_is_lost_again() {
        let mock = mock();
        configure(&mock);
        run("UPDATE evoq.settings SET owns_legacy_names = true");
        run("SET LOCAL evoq.orphan_grace_ms = 0");
        let legacy = format!("evoq_{}", uuid::Uuid::new_v4().simple());
        mock.seed_instances(std::slice::from_ref(&legacy), "open");
        let summary = reconcile();
        assert_eq!(
            (summary["orphans"].clone(), summary["foreign"].clone()),
            (0.into(), 0.into()),
            "{summary}"
        );
        assert!(mock.instance(&legacy).is_some());
        // A create adopted the instance after the comparison, just before its removal.
        profiles();
        let user = sign_up(1).remove(0);
        assert_eq!(json("SELECT evoq_process_queue()")["created"], 1);
        let name = s(&instance_row(&user)["instance_name"]).to_string();
        let started = one::<String>("SELECT started_at::text FROM evoq.reconciles").unwrap();
        run(&format!(
            "SELECT evoq._reconcile_finish('default', '{started}', '{{}}', NULL, '[{{\"n\": \"{name}\", \"error\": null}}]')"
        ));
        let row = instance_row(&user);
        assert_eq!(row["instance_status"], "lost", "{row}");
        assert_eq!(
            count(&format!(
                "SELECT count(*) FROM evoq.requeue_requests WHERE user_id = '{user}'"
            )),
            1
        );
    }

    #[pg_test]
    fn a_listing_that_fails_changes_nothing_and_says_why() {
        let mock = mock();
        let (user, name) = created_instance(&mock);
        assert!(mock.remove_instance(&name));
        mock.add_fault(fault(
            "GET",
            "/instance/fetchInstances",
            FaultKind::Status { code: 500 },
            None,
        ));
        let summary = reconcile();
        assert_eq!(summary["stopped"], "listing_failed", "{summary}");
        assert!(s(&summary["last_error"]).contains("500"), "{summary}");
        assert_eq!(instance_row(&user)["instance_status"], "connecting");
        mock.add_fault(fault(
            "GET",
            "/instance/fetchInstances",
            FaultKind::Garbage,
            None,
        ));
        assert_eq!(reconcile()["stopped"], "listing_failed");
        assert_eq!(instance_row(&user)["instance_status"], "connecting");
        assert!(!s(&json("SELECT to_jsonb(evoq_status) FROM evoq_status")
            ["last_reconcile_summary"]["last_error"])
        .contains(API_KEY));
    }

    #[pg_test]
    fn the_qr_refresh_reconciles_every_interval_and_never_when_turned_off() {
        let mock = mock();
        let (_user, name) = created_instance(&mock);
        run("SET LOCAL evoq.reconcile_interval_ms = 60000");
        // (Tests that commit leave this row behind.)
        run("DELETE FROM evoq.reconciles");
        // The first look starts the clock: one interval from now.
        assert!(json("SELECT evoq_refresh_qr()").get("reconcile").is_none());
        assert_eq!(mock.count_calls("GET", "/instance/fetchInstances"), 0);
        // Lost after its poll: only the reconcile can tell before the next one.
        assert!(mock.remove_instance(&name));
        run("UPDATE evoq.reconciles SET created_at = created_at - interval '2 minutes'");
        let summary = json("SELECT evoq_refresh_qr()");
        assert_eq!(summary["reconcile"]["missing"], 1, "{summary}");
        // Not again within the interval.
        assert!(json("SELECT evoq_refresh_qr()").get("reconcile").is_none());
        run("SET LOCAL evoq.reconcile_interval_ms = 0");
        run("UPDATE evoq.reconciles SET finished_at = finished_at - interval '1 day'");
        assert!(json("SELECT evoq_refresh_qr()").get("reconcile").is_none());
    }

    #[pg_test]
    fn evoq_reconcile_knows_one_server_and_is_for_operators_only() {
        let mock = mock();
        configure(&mock);
        let e = error_of("SELECT evoq_reconcile('eu-1')").unwrap();
        assert!(e.starts_with("22023") && e.contains("'default'"), "{e}");
        assert_eq!(reconcile()["server"], "default");
        supabase_like();
        for role in ["anon", "authenticated", "service_role"] {
            run(&format!("SET LOCAL ROLE {role}"));
            let e = error_of("SELECT evoq_reconcile()").unwrap_or_default();
            run("RESET ROLE");
            assert!(e.starts_with("42501"), "{role}: {e}");
        }
    }
}
