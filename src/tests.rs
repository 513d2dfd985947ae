// The pg_test suite: included into `mod tests` in lib.rs. Each test runs in its own transaction
// (rolled back) against its own mock Evolution API. Run with `cargo pgrx test` (see README).

use crate::testing::*;
use evolution_mock::{FaultKind, Flavor};
use pgrx::prelude::*;
use serde_json::Value;
use std::time::{Duration, Instant};

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

// ---------------------------------------------------------------- schema and configuration --

#[pg_test]
fn schema_is_in_place() {
    assert_eq!(count("SELECT count(*) FROM pg_indexes WHERE indexname = 'evolution_instance_creation_queue_status_created_at_idx'"), 1);
    assert_eq!(one::<bool>("SELECT relrowsecurity FROM pg_class WHERE oid = 'evolution_instance_creation_queue'::regclass"), Some(true));
    assert_eq!(one::<bool>("SELECT relrowsecurity FROM pg_class WHERE oid = 'evolution_instances'::regclass"), Some(true));
    // pg_dump keeps the data of these tables.
    assert_eq!(count("SELECT cardinality(extconfig) FROM pg_extension WHERE extname = 'evoq'"), 10);
    assert!(error_of("INSERT INTO evolution_instance_creation_queue (user_id, status) VALUES (gen_random_uuid(), 'bogus')").unwrap().starts_with("23514"));
    assert_eq!(
        one::<String>("SELECT evoq_instance_name('0f8fad5b-d9cb-469f-a165-70867728950e')").unwrap(),
        format!("evoq_{}_0f8fad5bd9cb469fa16570867728950e", one::<String>("SELECT evoq._default_namespace()").unwrap())
    );
}

#[pg_test]
fn configure_rejects_bad_input_and_changes_nothing() {
    run("DELETE FROM evoq.settings");
    for (sql, needle) in [
        ("SELECT evoq_configure('', 'k')", "api_url must not be empty"),
        ("SELECT evoq_configure('ftp://evo:8080', 'k')", "api_url must be an http:// or https:// URL"),
        ("SELECT evoq_configure('http://', 'k')", "api_url must be"),
        ("SELECT evoq_configure('http://evo:8080', '')", "api_key must not be empty"),
        ("SELECT evoq_configure('http://evo:8080', '   ')", "api_key must not be empty"),
        ("SELECT evoq_configure('http://evo:8080', 'k', webhook_url => 'not a url')", "webhook_url must"),
        ("SELECT evoq_configure('http://evo:8080', 'k', webhook_events => ARRAY['NOPE'])", "unknown webhook event"),
        ("SELECT evoq_configure('http://evo:8080', 'k', api_version => 'v3')", "api_version must be"),
    ] {
        let err = error_of(sql).unwrap_or_else(|| panic!("{sql} succeeded"));
        assert!(err.starts_with("22023: ") && err.contains(needle), "{sql}: {err}");
        assert!(err.contains("HINT: "), "{sql} has no hint: {err}");
    }
    assert_eq!(count("SELECT count(*) FROM evoq.settings"), 0);
    let out = json("SELECT evoq_configure('http://evo:8080/', 'secret-key')");
    assert_eq!(out["api_url"], "http://evo:8080");
    assert!(!out.to_string().contains("secret-key"));
}

#[pg_test]
fn tunables_are_bounded_gucs() {
    assert!(error_of("SET evoq.concurrency = 0").unwrap().contains("0 is outside the valid range"));
    assert!(error_of("SET evoq.concurrency = 100000").unwrap().contains("outside the valid range"));
    assert!(error_of("SET evoq.batch_size = -1").is_some());
    run("SET LOCAL evoq.concurrency = 64");
    assert_eq!(one::<String>("SHOW evoq.concurrency").unwrap(), "64");
}

// ----------------------------------------------------------------------------- the trigger --

#[pg_test]
fn trigger_queues_new_profiles_and_requeues_reinserts() {
    profiles();
    assert_eq!(
        count("SELECT count(*) FROM pg_trigger WHERE tgname = 'on_profile_created_create_evolution_instance' AND tgenabled = 'O' AND tgrelid = 'public.profiles'::regclass"),
        1
    );
    let users = sign_up(2);
    let row = queue_row(&users[0]);
    assert_eq!(row["status"], "pending");
    assert_eq!(row["retry_count"], 0);
    let first_request = row["request_id"].clone();
    assert!(first_request.is_string());

    run("UPDATE evolution_instance_creation_queue SET status = 'completed'");
    run(&format!("INSERT INTO public.profiles (id) VALUES ('{}')", users[0]));
    let again = queue_row(&users[0]);
    assert_eq!(again["status"], "pending");
    assert_eq!(again["retry_count"], 1);
    assert_ne!(again["request_id"], first_request);
    assert_eq!(queue_row(&users[1])["status"], "completed");
    assert_eq!(count("SELECT count(*) FROM evolution_instance_creation_queue"), 2);
}

#[pg_test]
fn trigger_never_fails_an_insert() {
    profiles();
    // A NULL user id is skipped with a warning; the profile row goes in.
    run("ALTER TABLE public.profiles ALTER COLUMN id DROP NOT NULL");
    run("INSERT INTO public.profiles (id) VALUES (NULL)");
    assert_eq!(count("SELECT count(*) FROM public.profiles"), 1);
    assert_eq!(count("SELECT count(*) FROM evolution_instance_creation_queue"), 0);
    // The trigger works for a role with no right on the queue (it is SECURITY DEFINER).
    run("CREATE ROLE evoq_app_writer");
    run("GRANT INSERT ON public.profiles TO evoq_app_writer");
    run("SET LOCAL ROLE evoq_app_writer");
    run("INSERT INTO public.profiles (id) VALUES (gen_random_uuid())");
    run("RESET ROLE");
    assert_eq!(count("SELECT count(*) FROM evolution_instance_creation_queue"), 1);
}

#[pg_test]
fn attach_rejects_bad_targets() {
    run("CREATE TABLE public.p_text (id text)");
    run("CREATE VIEW public.p_view AS SELECT gen_random_uuid() AS id");
    let missing = error_of("SELECT evoq_attach('public.nope')").unwrap();
    assert!(missing.contains("relation \"public.nope\" does not exist"), "{missing}");
    let column = error_of("SELECT evoq_attach('public.p_text', 'user_id')").unwrap();
    assert!(column.contains("has no column \"user_id\"") && column.contains("HINT"), "{column}");
    let wrong_type = error_of("SELECT evoq_attach('public.p_text')").unwrap();
    assert!(wrong_type.contains("is text, not uuid"), "{wrong_type}");
    let view = error_of("SELECT evoq_attach('public.p_view')").unwrap();
    assert!(view.contains("is not a table"), "{view}");
    assert_eq!(count("SELECT count(*) FROM pg_trigger WHERE tgname = 'on_profile_created_create_evolution_instance'"), 0);
    // A custom column works.
    run("CREATE TABLE public.accounts (owner uuid, name text)");
    run("SELECT evoq_attach('public.accounts', 'owner')");
    run("INSERT INTO public.accounts VALUES (gen_random_uuid(), 'a')");
    assert_eq!(count("SELECT count(*) FROM evolution_instance_creation_queue"), 1);
    run("SELECT evoq_detach('public.accounts')");
    run("INSERT INTO public.accounts VALUES (gen_random_uuid(), 'b')");
    assert_eq!(count("SELECT count(*) FROM evolution_instance_creation_queue"), 1);
}

// ------------------------------------------------------------------------ processing the queue --

#[pg_test]
fn process_before_configure_is_a_clear_error_and_changes_nothing() {
    run("DELETE FROM evoq.settings");
    profiles();
    let users = sign_up(1);
    let err = error_of("SELECT evoq_process_queue()").unwrap();
    assert!(err.starts_with("55000") && err.contains("evoq is not configured") && err.contains("evoq_configure"), "{err}");
    assert!(error_of("SELECT evoq_refresh_qr()").unwrap().contains("evoq is not configured"));
    let row = queue_row(&users[0]);
    assert_eq!((row["status"].clone(), row["retry_count"].clone(), row["attempts"].clone()), ("pending".into(), 0.into(), 0.into()));
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
        let token = one::<String>(&format!("SELECT token FROM evoq.instance_tokens WHERE instance_name = '{name}'")).unwrap();
        assert_eq!(server["token"], token.as_str());
    }
    assert_eq!(mock.count_calls("POST", "/instance/create"), 3);
    assert_eq!(mock.count_calls("GET", "/"), 1, "one version probe per run");
    let create = mock.calls().into_iter().find(|c| c["path"] == "/instance/create").unwrap();
    assert_eq!(create["apikey"], API_KEY);
    assert_eq!(create["body"]["integration"], "WHATSAPP-BAILEYS");
    assert_eq!(create["body"]["qrcode"], true);
    assert_eq!(create["body"]["webhook"]["url"], "https://app.example/hooks/evolution");
    assert_eq!(create["body"]["webhook"]["events"], serde_json::json!(["QRCODE_UPDATED", "CONNECTION_UPDATE"]));

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
    let create = mock.calls().into_iter().find(|c| c["path"] == "/instance/create").unwrap();
    assert_eq!(create["body"]["webhook"], "https://app.example/hooks/evolution");
    assert_eq!(create["body"]["events"], serde_json::json!(["QRCODE_UPDATED", "CONNECTION_UPDATE"]));
    let i = instance_row(&users[0]);
    assert!(s(&i["qr_code"]).starts_with("data:image/png;base64,"), "{i}");
    assert!(s(&i["qr_text"]).starts_with("2@"));
    assert!(i["last_qr_update"].is_string());
    let name = s(&i["instance_name"]).to_string();
    let token = one::<String>(&format!("SELECT token FROM evoq.instance_tokens WHERE instance_name = '{name}'")).unwrap();
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
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
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
    assert_eq!(mock.count_calls("POST", "/webhook/set/"), 1, "the adopted instance gets our webhook");
    let hook = mock.calls().into_iter().find(|c| s(&c["path"]).starts_with("/webhook/set/")).unwrap();
    assert_eq!(hook["body"]["webhook"]["enabled"], true);
    assert_eq!(queue_row(&users[0])["status"], "completed");
    assert_eq!(instance_row(&users[0])["instance_id"], mock.instance(&name).unwrap()["id"]);
}

/// Runs one process_queue over `n` fresh users with `rule` installed and returns the users.
fn process_with_fault(mock: &evolution_mock::MockServer, n: usize, rule: evolution_mock::FaultRule) -> (Vec<String>, Value) {
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
    assert!(s(&row["error_message"]).contains(needle), "{needle:?} not in {row}");
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
    let (users, summary) = process_with_fault(&mock, 3, fault("POST", "/instance/create", FaultKind::Status { code: 500 }, Some(1)));
    assert_eq!((summary["created"].clone(), summary["retrying"].clone()), (2.into(), 1.into()), "{summary}");
    let failed: Vec<&String> = users.iter().filter(|u| queue_row(u)["status"] == "pending").collect();
    assert_eq!(failed.len(), 1);
    let row = queue_row(failed[0]);
    assert_retrying(&row, "Evolution API answered 500 to POST /instance/create: mock fault: internal error");
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
    let (users, summary) = process_with_fault(&mock, 1, fault("POST", "/instance/create", FaultKind::Status { code: 400 }, None));
    assert_eq!(summary["failed"], 1, "{summary}");
    let row = queue_row(&users[0]);
    assert_eq!(row["status"], "failed");
    assert_eq!(row["error_kind"], "permanent");
    assert_eq!(row["last_http_status"], 400);
    assert!(s(&row["error_message"]).contains("mock fault: bad request"), "{row}");
    mock.clear_faults();
    assert_eq!(one::<i64>("SELECT evoq_retry()"), Some(1));
    let row = queue_row(&users[0]);
    assert_eq!((row["status"].clone(), row["attempts"].clone()), ("pending".into(), 0.into()));
    assert_eq!(json("SELECT evoq_process_queue()")["created"], 1);
    assert_eq!(one::<i64>(&format!("SELECT evoq_retry('{}')", users[0])), Some(0));
}

#[pg_test]
fn a_rejected_key_stops_the_run_and_charges_no_row() {
    let mock = mock();
    run("SET LOCAL evoq.batch_size = 2");
    let (users, summary) = process_with_fault(&mock, 5, fault("POST", "/instance/create", FaultKind::Status { code: 401 }, None));
    assert_eq!(summary["stopped"], "circuit_open", "{summary}");
    assert_eq!(summary["claimed"], 2, "{summary}");
    assert_eq!(summary["released"], 2, "{summary}");
    for u in &users {
        let row = queue_row(u);
        assert_eq!((row["status"].clone(), row["attempts"].clone()), ("pending".into(), 0.into()), "{row}");
    }
    let status = json("SELECT to_jsonb(s) FROM evoq_status s");
    let cause = s(&status["circuit_cause"]);
    assert!(cause.contains("401") && cause.contains("check the api_key"), "{status}");
    assert!(!status.to_string().contains(API_KEY));
}

#[pg_test]
fn malformed_replies_are_transient() {
    for (kind, needle) in [
        (FaultKind::Garbage, "malformed reply to POST /instance/create: not JSON"),
        (FaultKind::MissingFields, "missing the instance object"),
        (FaultKind::Error200, "mock fault: 200 with error"),
        (FaultKind::Empty200, "empty reply to POST /instance/create"),
        (FaultKind::Drop, "POST /instance/create"),
    ] {
        run("DROP TABLE IF EXISTS public.profiles; DELETE FROM evolution_instance_creation_queue");
        let mock = mock();
        let (users, summary) = process_with_fault(&mock, 1, fault("POST", "/instance/create", kind, None));
        assert_eq!(summary["retrying"], 1, "{summary}");
        assert_retrying(&queue_row(&users[0]), needle);
    }
}

#[pg_test]
fn an_unreachable_api_opens_the_circuit_and_charges_no_row() {
    // A port nobody listens on: bind one, then let it go.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    Spi::run_with_args("SELECT evoq_configure($1, $2)", &[format!("http://127.0.0.1:{port}").into(), API_KEY.into()]).unwrap();
    profiles();
    let users = sign_up(2);
    let summary = json("SELECT evoq_process_queue()");
    assert_eq!(summary["stopped"], "circuit_open", "{summary}");
    for u in &users {
        let row = queue_row(u);
        assert_eq!((row["status"].clone(), row["attempts"].clone()), ("pending".into(), 0.into()), "{row}");
    }
    let status = json("SELECT to_jsonb(s) FROM evoq_status s");
    assert!(s(&status["last_error"]).contains("connection refused"), "{status}");
    assert!(s(&status["circuit_cause"]).contains("connection refused"), "{status}");
    assert_eq!(status["circuit"], "open");
}

#[pg_test]
fn a_hanging_or_slow_api_times_out_within_the_budget() {
    let mock = mock();
    run("SET LOCAL evoq.request_timeout_ms = 400");
    mock.add_fault(fault("POST", "/instance/create", FaultKind::Delay { ms: 250 }, Some(1)));
    let (users, summary) = process_with_fault(&mock, 3, fault("POST", "/instance/create", FaultKind::Hang, Some(1)));
    // One call hung (timed out), one was slow but inside the timeout, one was quick.
    assert_eq!((summary["created"].clone(), summary["retrying"].clone()), (2.into(), 1.into()), "{summary}");
    let hung = users.iter().map(|u| queue_row(u)).find(|r| r["status"] == "pending").unwrap();
    assert_retrying(&hung, "did not answer POST /instance/create within 400 ms");

    // Latency just over the timeout, and a run budget shorter than the hang: the run still
    // returns inside its budget and the unanswered call is recorded as such.
    run("DELETE FROM evolution_instance_creation_queue");
    mock.clear_faults();
    mock.add_fault(fault("POST", "/instance/create", FaultKind::Delay { ms: 600 }, None));
    sign_up(1);
    assert_eq!(json("SELECT evoq_process_queue()")["retrying"], 1);
    run("DELETE FROM evolution_instance_creation_queue");
    run("SET LOCAL evoq.request_timeout_ms = 60000; SET LOCAL evoq.time_budget_ms = 1500");
    mock.clear_faults();
    mock.add_fault(fault("POST", "/instance/create", FaultKind::Hang, None));
    let users = sign_up(1);
    let started = Instant::now();
    let summary = json("SELECT evoq_process_queue()");
    assert!(started.elapsed() < Duration::from_millis(4000), "run took {:?}", started.elapsed());
    assert_retrying(&queue_row(&users[0]), "time budget");
    assert_eq!(summary["retrying"], 1);
}

#[pg_test]
fn max_attempts_leaves_the_row_failed_with_its_last_error() {
    let mock = mock();
    run("SET LOCAL evoq.max_attempts = 3");
    let (users, _) = process_with_fault(&mock, 1, fault("POST", "/instance/create", FaultKind::Status { code: 503 }, None));
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
    assert_eq!(json("SELECT evoq_process_queue()")["claimed"], 0, "failed rows are not claimed");
    let status = json("SELECT to_jsonb(s) FROM evoq_status s");
    assert_eq!(status["failed"], 1);
}

// ----------------------------------------------------------------------------- QR refresh --

fn created_instance(mock: &evolution_mock::MockServer) -> (String, String) {
    configure(mock);
    profiles();
    let user = sign_up(1).remove(0);
    assert_eq!(json("SELECT evoq_process_queue()")["created"], 1);
    let name = s(&instance_row(&user)["instance_name"]).to_string();
    (user, name)
}

#[pg_test]
fn refresh_stores_new_qrs_and_notices_the_scan() {
    let mock = mock();
    let (user, name) = created_instance(&mock);
    let summary = json("SELECT evoq_refresh_qr()");
    assert_eq!(summary["new_qr"], 1, "{summary}");
    let first = instance_row(&user);
    assert!(s(&first["qr_code"]).starts_with("data:image/png;base64,"), "{first}");
    assert!(s(&first["qr_text"]).starts_with("2@"));
    assert!(first["last_qr_update"].is_string());

    // Within evoq.qr_refresh_interval_ms nothing is asked again.
    assert_eq!(json("SELECT evoq_refresh_qr()")["checked"], 0);
    make_refresh_due();
    json("SELECT evoq_refresh_qr()");
    let second = instance_row(&user);
    assert_ne!(second["qr_text"], first["qr_text"], "the mock rotates the QR on every call (qr_ttl_ms = 0)");

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
    let bad = s(&instance_row(&users[1])["instance_name"]).to_string();
    mock.add_fault(fault("GET", &format!("/instance/connect/{bad}"), FaultKind::Error200, None));
    let summary = json("SELECT evoq_refresh_qr()");
    assert_eq!((summary["new_qr"].clone(), summary["errors"].clone()), (2.into(), 1.into()), "{summary}");
    let row = instance_row(&users[1]);
    assert_eq!(row["instance_status"], "connecting");
    assert!(s(&row["last_error"]).contains("mock fault: 200 with error"), "{row}");
    assert!(instance_row(&users[0])["qr_text"].is_string());
}

#[pg_test]
fn refresh_fault_matrix_records_each_failure_and_goes_on() {
    run("SET LOCAL evoq.request_timeout_ms = 400");
    for (kind, needle) in [
        (FaultKind::Hang, "did not answer GET /instance/connect within 400 ms"),
        (FaultKind::Delay { ms: 600 }, "within 400 ms"),
        (FaultKind::Status { code: 500 }, "mock fault: internal error"),
        (FaultKind::Status { code: 401 }, "answered 401"),
        (FaultKind::Status { code: 400 }, "mock fault: bad request"),
        (FaultKind::Garbage, "not JSON"),
        (FaultKind::Empty200, "empty reply to GET /instance/connect"),
        (FaultKind::MissingFields, "neither a QR, a count nor a state"),
        (FaultKind::Drop, "GET /instance/connect"),
    ] {
        run("DROP TABLE IF EXISTS public.profiles; DELETE FROM evolution_instances; DELETE FROM evolution_instance_creation_queue");
        let mock = mock();
        configure(&mock);
        profiles();
        let users = sign_up(2);
        json("SELECT evoq_process_queue()");
        let bad = s(&instance_row(&users[0])["instance_name"]).to_string();
        mock.add_fault(fault("GET", &format!("/instance/connect/{bad}"), kind.clone(), None));
        let started = Instant::now();
        let summary = json("SELECT evoq_refresh_qr()");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!((summary["errors"].clone(), summary["new_qr"].clone()), (1.into(), 1.into()), "{kind:?}: {summary}");
        let row = instance_row(&users[0]);
        assert_eq!(row["instance_status"], "connecting", "{kind:?}");
        assert!(s(&row["last_error"]).contains(needle), "{kind:?}: {needle:?} not in {row}");
        assert!(!s(&row["last_error"]).contains(API_KEY));
        assert!(row["last_error_at"].is_string());
        assert!(s(&instance_row(&users[1])["qr_text"]).starts_with("2@"), "the other instance was refreshed");
    }
    // Connection refused for the whole server.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    Spi::run_with_args("SELECT evoq_configure($1, $2)", &[format!("http://127.0.0.1:{port}").into(), API_KEY.into()]).unwrap();
    make_refresh_due();
    let summary = json("SELECT evoq_refresh_qr()");
    assert_eq!(summary["stopped"], "circuit_open", "{summary}");
    assert!(s(&summary["last_error"]).contains("connection refused"));
}

#[pg_test]
fn a_failing_version_probe_falls_back_to_v2() {
    let mock = mock();
    mock.add_fault(evolution_mock::FaultRule { method: Some("GET".into()), path_contains: "/".into(), kind: FaultKind::Garbage, times: Some(1) });
    configure(&mock);
    profiles();
    sign_up(1);
    let summary = json("SELECT evoq_process_queue()");
    assert_eq!(summary["created"], 1, "{summary}");
    assert_eq!(summary["api_version"], "v2");
    assert!(s(&summary["last_error"]).contains("assuming v2"), "{summary}");
    // A configured version skips the probe.
    run("SELECT evoq_configure('http://127.0.0.1:1', 'k', api_version => 'v1')");
    Spi::run_with_args("SELECT evoq_configure($1, $2, api_version => 'v2')", &[mock.url().into(), API_KEY.into()]).unwrap();
    let probes = mock.count_calls("GET", "/");
    sign_up(1);
    assert_eq!(json("SELECT evoq_process_queue()")["created"], 1);
    assert_eq!(mock.count_calls("GET", "/"), probes);
}

// ------------------------------------------------------------------------------- security --

#[pg_test]
fn ordinary_roles_get_nothing() {
    run("CREATE ROLE evoq_nobody");
    run("SET LOCAL ROLE evoq_nobody");
    for sql in [
        "SELECT evoq_configure('http://x:1', 'k')",
        "SELECT evoq_process_queue()",
        "SELECT evoq_refresh_qr()",
        "SELECT evoq_schedule()",
        "SELECT evoq_retry()",
        "SELECT * FROM evoq.settings",
        "SELECT * FROM evoq.instance_tokens",
        "SELECT * FROM evoq_status",
        "SELECT * FROM evolution_instance_creation_queue",
    ] {
        let err = error_of(sql).unwrap_or_else(|| panic!("{sql} was allowed"));
        assert!(err.starts_with("42501"), "{sql}: {err}");
    }
    run("RESET ROLE");
    // SECURITY DEFINER functions pin their search_path.
    assert_eq!(
        count("SELECT count(*) FROM pg_proc p JOIN pg_depend d ON d.objid = p.oid AND d.deptype = 'e'
               JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'evoq'
               WHERE p.prosecdef AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) c WHERE c LIKE 'search_path=%')"),
        0
    );
}

fn supabase_roles() {
    for role in ["anon", "authenticated", "service_role"] {
        run(&format!("DO $$ BEGIN CREATE ROLE {role} NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$"));
    }
    run("CREATE SCHEMA IF NOT EXISTS auth");
    run("CREATE OR REPLACE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS
         $$ SELECT (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')::uuid $$");
    run("GRANT USAGE ON SCHEMA auth TO anon, authenticated, service_role");
    assert_eq!(one::<String>("SELECT evoq_apply_policies()").unwrap(), "supabase");
}

/// Counts the rows `sql` returns for `role` signed in as `sub`; the count goes through the temp
/// table `evoq_out` (created by the test, writable by every role) because the role may not be
/// allowed to see what a plain SELECT would return.
fn as_user(role: &str, sub: Option<&str>, sql: &str) -> Result<i64, String> {
    run(&format!("SET LOCAL ROLE {role}"));
    let claims = sub.map(|s| format!("{{\"sub\":\"{s}\",\"role\":\"{role}\"}}")).unwrap_or_default();
    Spi::run_with_args("SELECT set_config('request.jwt.claims', $1, true)", &[claims.into()]).unwrap();
    let result = match error_of(&format!("INSERT INTO pg_temp.evoq_out SELECT count(*) FROM ({sql}) x")) {
        Some(e) => Err(e),
        None => Ok(count("SELECT n FROM pg_temp.evoq_out ORDER BY ctid DESC LIMIT 1")),
    };
    run("RESET ROLE");
    result
}

#[pg_test]
fn rls_matrix_on_a_supabase_like_database() {
    supabase_roles();
    assert_eq!(count("SELECT count(*) FROM pg_policies WHERE tablename = 'evolution_instance_creation_queue' AND policyname IN ('Service role can manage evolution instance queue', 'Users can view their own queue status')"), 2);
    let (a, b) = ("11111111-1111-1111-1111-111111111111", "22222222-2222-2222-2222-222222222222");
    run(&format!("INSERT INTO evolution_instance_creation_queue (user_id) VALUES ('{a}'), ('{b}')"));
    run(&format!("INSERT INTO evolution_instances (user_id, instance_name) VALUES ('{a}', 'evoq_a'), ('{b}', 'evoq_b')"));
    run("CREATE TEMP TABLE evoq_out AS SELECT 0::bigint AS n; GRANT ALL ON evoq_out TO PUBLIC");
    let q = "SELECT * FROM evolution_instance_creation_queue";
    let i = "SELECT * FROM evolution_instances";
    assert_eq!(as_user("authenticated", Some(a), q), Ok(1));
    assert_eq!(as_user("authenticated", Some(a), &format!("{q} WHERE user_id = '{b}'")), Ok(0));
    assert_eq!(as_user("authenticated", Some(b), i), Ok(1));
    assert_eq!(as_user("authenticated", None, q), Ok(0));
    assert_eq!(as_user("service_role", None, q), Ok(2));
    assert_eq!(as_user("service_role", None, i), Ok(2));
    assert!(as_user("anon", None, q).unwrap_err().starts_with("42501"));
    assert!(as_user("anon", None, i).unwrap_err().starts_with("42501"));
    // A user cannot change or delete rows, not even their own.
    run(&format!("SET LOCAL ROLE authenticated; SELECT set_config('request.jwt.claims', '{{\"sub\":\"{a}\"}}', true)"));
    assert!(error_of("UPDATE evolution_instance_creation_queue SET status = 'completed'").unwrap().starts_with("42501"));
    assert!(error_of("DELETE FROM evolution_instances").unwrap().starts_with("42501"));
    assert!(error_of("SELECT * FROM evoq.instance_tokens").unwrap().starts_with("42501"));
    run("RESET ROLE");
    assert_eq!(count("SELECT count(*) FROM evolution_instance_creation_queue WHERE status = 'completed'"), 0);
}

#[pg_test]
fn rls_on_plain_postgres_uses_the_jwt_claims() {
    assert_eq!(one::<String>("SELECT evoq_apply_policies()").unwrap(), "postgres");
    run("CREATE ROLE evoq_web_user");
    run("GRANT SELECT ON evolution_instance_creation_queue, evolution_instances TO evoq_web_user");
    let (a, b) = ("11111111-1111-1111-1111-111111111111", "22222222-2222-2222-2222-222222222222");
    run(&format!("INSERT INTO evolution_instance_creation_queue (user_id) VALUES ('{a}'), ('{b}')"));
    run("CREATE TEMP TABLE evoq_out AS SELECT 0::bigint AS n; GRANT ALL ON evoq_out TO PUBLIC");
    assert_eq!(as_user("evoq_web_user", Some(a), "SELECT * FROM evolution_instance_creation_queue"), Ok(1));
    assert_eq!(as_user("evoq_web_user", None, "SELECT * FROM evolution_instance_creation_queue"), Ok(0));
    assert_eq!(as_user("evoq_web_user", Some("not-a-uuid"), "SELECT * FROM evolution_instance_creation_queue"), Ok(0));
}

// ------------------------------------------------------------------------------- scheduling --

#[pg_test]
fn schedule_without_pg_cron_says_what_to_install() {
    if count("SELECT count(*) FROM pg_extension WHERE extname = 'pg_cron'") > 0 {
        run("DROP EXTENSION pg_cron");
    }
    let err = error_of("SELECT evoq_schedule()").unwrap();
    assert!(err.contains("pg_cron is not installed") && err.contains("shared_preload_libraries"), "{err}");
}

// ------------------------------------------------- concurrency, cancels and crashes (committed) --

#[pg_test]
fn concurrent_runs_create_each_instance_exactly_once() {
    for sessions in [2usize, 4] {
        clean_committed();
        let mock = mock();
        mock.set_latency_ms(2);
        committed_configure(&mock, "");
        committed_queue(200);
        let results = concurrently(sessions, "SET evoq.batch_size = 20; SET evoq.concurrency = 4", "SELECT evoq_process_queue()");
        let created: i64 = results
            .iter()
            .map(|r| serde_json::from_str::<Value>(r).unwrap_or_else(|_| panic!("session failed: {r}"))["created"].as_i64().unwrap())
            .sum();
        assert_eq!(created, 200, "{results:?}");
        assert_eq!(mock.count_calls("POST", "/instance/create"), 200, "one create per user");
        assert_eq!(mock.instance_names().len(), 200);
        assert_eq!(count("SELECT count(*) FROM evolution_instance_creation_queue WHERE status = 'completed' AND retry_count = 0"), 200);
        assert_eq!(count("SELECT count(DISTINCT instance_name) FROM evolution_instances"), 200);

        // Refresh: every instance once per round, never twice.
        let results = concurrently(sessions, "SET evoq.batch_size = 20; SET evoq.concurrency = 4", "SELECT evoq_refresh_qr()");
        let checked: i64 = results.iter().map(|r| serde_json::from_str::<Value>(r).unwrap()["checked"].as_i64().unwrap()).sum();
        assert_eq!(checked, 200, "{results:?}");
        assert_eq!(mock.count_calls("GET", "/instance/connect/"), 200);
    }
    clean_committed();
}

#[pg_test]
fn a_cancel_stops_a_run_promptly_and_loses_nothing() {
    clean_committed();
    let mock = mock();
    mock.add_fault(fault("POST", "/instance/create", FaultKind::Hang, None));
    committed_configure(&mock, "");
    committed_queue(10);
    // statement_timeout fires while every worker waits on a hanging server with a 60 s timeout.
    let started = Instant::now();
    let results = concurrently(
        1,
        "SET evoq.request_timeout_ms = 60000; SET evoq.concurrency = 8; SET statement_timeout = '1s'",
        "SELECT evoq_process_queue()",
    );
    let took = started.elapsed();
    assert!(results[0].contains("statement timeout"), "{results:?}");
    assert!(took < Duration::from_secs(5), "cancel took {took:?}");
    // The claimed rows were rolled back: all due again, nothing stuck in processing.
    assert_eq!(count("SELECT count(*) FROM evolution_instance_creation_queue WHERE status = 'pending' AND attempts = 0"), 10);

    // The same with pg_cancel_backend from another session.
    let pid = start_in_session("evoq_cancelled", "SET evoq.request_timeout_ms = 60000", "SELECT evoq_process_queue()");
    wait_for_calls(&mock, "POST", "/instance/create", 18);
    let started = Instant::now();
    assert_eq!(one::<bool>(&format!("SELECT pg_cancel_backend({pid})")), Some(true));
    let err = finish_session("evoq_cancelled");
    let took = started.elapsed();
    assert!(err.contains("canceling statement due to user request"), "{err}");
    assert!(took < Duration::from_secs(5), "cancel took {took:?}");
    assert_eq!(count("SELECT count(*) FROM evolution_instance_creation_queue WHERE status = 'pending' AND attempts = 0"), 10);
    // The next run adopts whatever the abandoned calls created and creates the rest.
    mock.clear_faults();
    let results = concurrently(1, "", "SELECT evoq_process_queue()");
    let summary: Value = serde_json::from_str(&results[0]).unwrap_or_else(|_| panic!("{results:?}"));
    assert_eq!(summary["claimed"], 10, "{summary}");
    assert_eq!(count("SELECT count(*) FROM evolution_instance_creation_queue WHERE status = 'completed'"), 10);
    assert_eq!(mock.instance_names().len(), 10);
    clean_committed();
}

#[pg_test]
fn a_terminated_backend_mid_batch_leaves_exactly_one_instance_per_user() {
    clean_committed();
    let mock = mock();
    mock.set_latency_ms(100);
    committed_configure(&mock, "");
    committed_queue(30);
    let pid = start_in_session("evoq_victim", "SET evoq.concurrency = 4; SET evoq.batch_size = 8", "SELECT evoq_process_queue()");
    // Let it get some creates through, then kill it mid-batch.
    wait_for_calls(&mock, "POST", "/instance/create", 10);
    assert_eq!(one::<bool>(&format!("SELECT pg_terminate_backend({pid}, 10000)")), Some(true));
    // The connection died with its backend: just forget it.
    let _ = error_of("SELECT dblink_disconnect('evoq_victim')");
    assert!(mock.count_calls("POST", "/instance/create") >= 10);
    assert_eq!(count("SELECT count(*) FROM evolution_instance_creation_queue WHERE status <> 'pending'"), 0);
    mock.set_latency_ms(0);
    let results = concurrently(1, "", "SELECT evoq_process_queue()");
    let summary: Value = serde_json::from_str(&results[0]).unwrap_or_else(|_| panic!("{results:?}"));
    assert_eq!(summary["claimed"], 30, "{summary}");
    assert!(summary["adopted"].as_i64().unwrap() >= 1, "{summary}");
    assert_eq!(count("SELECT count(*) FROM evolution_instance_creation_queue WHERE status = 'completed'"), 30);
    assert_eq!(mock.instance_names().len(), 30, "exactly one instance per user at the server");
    assert_eq!(count("SELECT count(*) FROM evolution_instances"), 30);
    clean_committed();
}

/// The end-to-end path with a real pg_cron job: schedule, sign up, wait for the tick.
#[pg_test]
fn z_pg_cron_fires_the_job_and_an_instance_appears() {
    clean_committed();
    let mock = mock();
    committed("CREATE EXTENSION IF NOT EXISTS pg_cron");
    committed_configure(&mock, "");
    committed(
        "DO $$ BEGIN
            CREATE TABLE public.committed_profiles (id uuid PRIMARY KEY);
            PERFORM evoq_attach('public.committed_profiles');
            PERFORM evoq_schedule(process_schedule => '* * * * *', refresh_schedule => '* * * * *');
            INSERT INTO public.committed_profiles VALUES (gen_random_uuid());
         END $$",
    );
    // The verification queries of the original setup guide.
    assert_eq!(count("SELECT count(*) FROM cron.job WHERE jobname = 'process-evolution-queue' AND active AND schedule = '* * * * *' AND command = 'SELECT evoq_process_queue()'"), 1);
    assert_eq!(count("SELECT count(*) FROM cron.job WHERE jobname = 'refresh-qr-codes' AND active AND command = 'SELECT evoq_refresh_qr()'"), 1);
    assert_eq!(count(&format!("SELECT count(*) FROM cron.job WHERE command LIKE '%{API_KEY}%'")), 0);

    let deadline = Instant::now() + Duration::from_secs(150);
    loop {
        let done = count("SELECT count(*) FROM evolution_instances WHERE qr_text IS NOT NULL");
        if done == 1 || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(count("SELECT count(*) FROM evolution_instance_creation_queue WHERE status = 'completed'"), 1);
    assert_eq!(count("SELECT count(*) FROM evolution_instances"), 1);
    assert_eq!(mock.count_calls("POST", "/instance/create"), 1);
    assert!(count("SELECT count(*) FROM cron.job_run_details d JOIN cron.job j USING (jobid) WHERE j.jobname = 'process-evolution-queue' AND d.status = 'succeeded'") >= 1);
    assert!(count("SELECT count(*) FROM cron.job_run_details d JOIN cron.job j USING (jobid) WHERE j.jobname = 'refresh-qr-codes' AND d.status = 'succeeded'") >= 1);
    assert_eq!(count("SELECT count(*) FROM cron.job_run_details WHERE status = 'failed'"), 0);
    assert_eq!(count(&format!("SELECT count(*) FROM cron.job_run_details WHERE command LIKE '%{API_KEY}%' OR return_message LIKE '%{API_KEY}%'")), 0);

    committed("DO $$ BEGIN PERFORM evoq_unschedule(); END $$");
    assert_eq!(count("SELECT count(*) FROM cron.job WHERE jobname IN ('process-evolution-queue', 'refresh-qr-codes')"), 0);
    // pg_cron stays: this transaction has read cron.job, so dropping it from a second session
    // would wait for us while we wait for it.
    committed("DROP TABLE public.committed_profiles");
    clean_committed();
}
