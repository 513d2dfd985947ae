//! Helpers for the pg_test suite (compiled only into test builds). Every test gets its own mock
//! Evolution API: a real HTTP server on an ephemeral loopback port, run on threads of the test's
//! backend, so tests never share one.

use evolution_mock::{FaultKind, FaultRule, Flavor, MockConfig, MockServer};
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::Value;

/// A JSON string's text, or "" for anything else.
pub fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// A Supabase-like database: its three API roles, `auth.uid()`, and what Supabase's default
/// privileges give those roles on every table and function in public (ALL), as evoq's objects
/// have them right after CREATE EXTENSION; then evoq's policies applied over that.
pub fn supabase_like() {
    for role in ["anon", "authenticated", "service_role"] {
        run(&format!(
            "DO $$ BEGIN CREATE ROLE {role} NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$"
        ));
    }
    run("CREATE SCHEMA IF NOT EXISTS auth");
    run("CREATE OR REPLACE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS
         $$ SELECT (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')::uuid $$");
    run("GRANT USAGE ON SCHEMA auth TO anon, authenticated, service_role");
    run("GRANT ALL ON ALL TABLES IN SCHEMA public TO anon, authenticated, service_role");
    run("GRANT ALL ON ALL FUNCTIONS IN SCHEMA public TO anon, authenticated, service_role");
    assert_eq!(
        one::<String>("SELECT evoq_apply_policies()").as_deref(),
        Some("supabase")
    );
}

/// A distinctive key, so tests can prove it leaks nowhere.
pub const API_KEY: &str = "sk-evoq-test-7f3a9c1e-DO-NOT-LEAK";

pub fn mock_with(flavor: Flavor) -> MockServer {
    let config = MockConfig {
        flavor,
        api_key: API_KEY.into(),
        qr_ttl_ms: 0,
        ..MockConfig::default()
    };
    MockServer::start(0, config).expect("start the mock Evolution API")
}

pub fn mock() -> MockServer {
    mock_with(Flavor::V2)
}

pub fn fault(method: &str, path: &str, kind: FaultKind, times: Option<u32>) -> FaultRule {
    FaultRule {
        method: Some(method.into()),
        path_contains: path.into(),
        path_equals: None,
        kind,
        times,
    }
}

pub fn run(sql: &str) {
    Spi::run(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
}

pub fn one<T: pgrx::FromDatum + pgrx::IntoDatum>(sql: &str) -> Option<T> {
    Spi::get_one::<T>(sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
}

pub fn json(sql: &str) -> Value {
    one::<JsonB>(sql).map(|j| j.0).unwrap_or(Value::Null)
}

pub fn count(sql: &str) -> i64 {
    one::<i64>(sql).unwrap_or(0)
}

/// Runs `sql` in a subtransaction and returns "SQLSTATE: message" if it failed, None if not.
pub fn error_of(sql: &str) -> Option<String> {
    // Created once per session, by whoever runs first; later callers (maybe another role) reuse it.
    run(
        "DO $$ BEGIN IF to_regprocedure('pg_temp.evoq_try(text)') IS NULL THEN
         CREATE FUNCTION pg_temp.evoq_try(q text) RETURNS text LANGUAGE plpgsql AS $f$
         DECLARE h text;
         BEGIN EXECUTE q; RETURN NULL;
         EXCEPTION WHEN others THEN
             GET STACKED DIAGNOSTICS h = PG_EXCEPTION_HINT;
             RETURN SQLSTATE || ': ' || SQLERRM || coalesce(' HINT: ' || nullif(h, ''), '');
         END $f$;
         END IF; END $$",
    );
    Spi::get_one_with_args::<String>("SELECT pg_temp.evoq_try($1)", &[sql.into()]).unwrap()
}

/// The mock's URL and the test key, plus a webhook; in the test's own transaction.
pub fn configure(mock: &MockServer) {
    Spi::run_with_args(
        "SELECT evoq_configure(api_url => $1, api_key => $2, webhook_url => 'https://app.example/hooks/evolution')",
        &[mock.url().into(), API_KEY.into()],
    )
    .unwrap();
}

/// evoq_configure with this URL and key and any further named arguments (`extra`, e.g.
/// `", namespace => 'prod'"`), in the test's own transaction.
pub fn configure_with(url: &str, key: &str, extra: &str) {
    Spi::run_with_args(
        &format!("SELECT evoq_configure(api_url => $1, api_key => $2{extra})"),
        &[url.into(), key.into()],
    )
    .unwrap_or_else(|e| panic!("evoq_configure({url}, {extra}): {e}"));
}

/// A profiles table with the trigger attached.
pub fn profiles() {
    run("CREATE TABLE public.profiles (id uuid NOT NULL, email text)");
    run("SELECT evoq_attach('public.profiles')");
}

/// Inserts `n` profiles and returns their user ids in insertion order.
pub fn sign_up(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            one::<String>(&format!(
                "INSERT INTO public.profiles (id, email) VALUES (gen_random_uuid(), 'user{i}@example.com') RETURNING id::text"
            ))
            .unwrap()
        })
        .collect()
}

pub fn queue_row(user_id: &str) -> Value {
    json(&format!(
        "SELECT to_jsonb(q) FROM evolution_instance_creation_queue q WHERE user_id = '{user_id}'"
    ))
}

pub fn instance_row(user_id: &str) -> Value {
    json(&format!(
        "SELECT to_jsonb(i) FROM evolution_instances i WHERE user_id = '{user_id}'"
    ))
}

/// Configures evoq against `mock`, attaches a profiles table, signs one user up and creates
/// their instance: (user id, instance name).
pub fn created_instance(mock: &MockServer) -> (String, String) {
    configure(mock);
    profiles();
    let user = sign_up(1).remove(0);
    assert_eq!(json("SELECT evoq_process_queue()")["created"], 1);
    // Its first poll is due now, as it is without webhooks (with the webhook configured here,
    // a new instance would wait one evoq.qr_refresh_interval_ms for it).
    make_refresh_due();
    let name = s(&instance_row(&user)["instance_name"]).to_string();
    (user, name)
}

/// Makes every queued row due now (a failed row waits out its backoff otherwise).
pub fn make_all_due() {
    run("UPDATE evolution_instance_creation_queue SET next_attempt_at = now() - interval '1 second'");
}

/// Makes every instance due for a refresh now.
pub fn make_refresh_due() {
    run("UPDATE evolution_instances SET last_refresh_at = NULL");
}

/// A libpq connection string back to this test cluster, for work that must commit (dblink).
pub fn self_conninfo() -> String {
    one::<String>(
        "SELECT format('host=localhost port=%s dbname=%s user=%s', current_setting('port'), current_database(), current_user)",
    )
    .unwrap()
}

/// Runs SQL in its own committed transaction over dblink.
pub fn committed(sql: &str) {
    run("CREATE EXTENSION IF NOT EXISTS dblink");
    Spi::run_with_args(
        "SELECT dblink_exec($1, $2)",
        &[self_conninfo().into(), sql.into()],
    )
    .unwrap_or_else(|e| panic!("committed {sql}: {e}"));
}

/// A connecting instance whose webhook points at a closed port: the mock's deliveries fail
/// (and are logged with their envelopes) instead of going anywhere. (user id, instance name)
pub fn connecting_instance_with_webhook(mock: &MockServer) -> (String, String) {
    configure_with(
        &mock.url(),
        API_KEY,
        ", webhook_url => 'http://127.0.0.1:9/rest/v1/rpc/evoq_webhook'",
    );
    profiles();
    let user = sign_up(1).remove(0);
    assert_eq!(json("SELECT evoq_process_queue()")["created"], 1);
    let name = s(&instance_row(&user)["instance_name"]).to_string();
    (user, name)
}

/// A second session, `evoq_listener`, that LISTENs to `evoq_instances` as an app would.
pub fn listen_for_instance_changes() {
    run("CREATE EXTENSION IF NOT EXISTS dblink");
    Spi::run_with_args(
        "SELECT dblink_connect('evoq_listener', $1)",
        &[self_conninfo().into()],
    )
    .unwrap();
    run("SELECT dblink_exec('evoq_listener', 'LISTEN evoq_instances')");
}

/// The payloads `listen_for_instance_changes`' session received (committed changes only), and
/// the session closed. A notification reaches the listening session a moment after the commit
/// that sent it: this waits up to 10 s for `expected` of them, then 200 ms more for any beyond.
pub fn instance_changes_heard(expected: usize) -> Vec<String> {
    let read = || -> Vec<String> {
        Spi::connect(|c| {
            c.select(
                "SELECT extra FROM dblink_get_notify('evoq_listener') WHERE notify_name = 'evoq_instances'",
                None,
                &[],
            )
            .unwrap()
            .map(|row| row.get::<String>(1).unwrap().unwrap())
            .collect()
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut got = read();
    while got.len() < expected && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
        got.extend(read());
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    got.extend(read());
    let _ = error_of("SELECT dblink_disconnect('evoq_listener')");
    got
}

/// Removes everything tests commit through dblink.
pub fn clean_committed() {
    committed(
        "DO $$ BEGIN
            DELETE FROM evoq.instance_tokens; DELETE FROM evolution_instances;
            DELETE FROM evoq.requeue_requests; DELETE FROM evoq.circuit; DELETE FROM evoq.skipped_profiles;
            DELETE FROM evolution_instance_creation_queue; DELETE FROM evoq.settings; DELETE FROM evoq.job_runs;
            DELETE FROM evolution_instance_events; DELETE FROM evoq.phone_links; DELETE FROM evoq.servers;
            DROP TABLE IF EXISTS public.committed_profiles;
         END $$",
    );
}

pub fn committed_configure(mock: &MockServer, extra: &str) {
    committed(&format!(
        "DO $$ BEGIN PERFORM evoq_configure(api_url => '{}', api_key => '{}'); {extra} END $$",
        mock.url(),
        API_KEY
    ));
}

/// Queues `n` users in a committed transaction.
pub fn committed_queue(n: usize) {
    committed(&format!(
        "INSERT INTO evolution_instance_creation_queue (user_id) SELECT gen_random_uuid() FROM generate_series(1, {n})"
    ));
}

/// Opens a connection named `name`, runs `setup` there, then starts `sql` without waiting.
/// Returns the backend pid of that session.
pub fn start_in_session(name: &str, setup: &str, sql: &str) -> i32 {
    run("CREATE EXTENSION IF NOT EXISTS dblink");
    Spi::run_with_args(
        "SELECT dblink_connect($1, $2)",
        &[name.into(), self_conninfo().into()],
    )
    .unwrap();
    if !setup.is_empty() {
        Spi::run_with_args("SELECT dblink_exec($1, $2)", &[name.into(), setup.into()]).unwrap();
    }
    let pid = Spi::get_one_with_args::<i32>(
        "SELECT pid FROM dblink($1, 'SELECT pg_backend_pid()') AS t(pid int)",
        &[name.into()],
    )
    .unwrap()
    .unwrap();
    Spi::run_with_args(
        "SELECT dblink_send_query($1, $2)",
        &[name.into(), sql.into()],
    )
    .unwrap();
    pid
}

/// Waits for the result of a session started with `start_in_session` (its text, or its error
/// message) and closes the session.
pub fn finish_session(name: &str) -> String {
    let result = Spi::get_one_with_args::<String>(
        "SELECT coalesce((SELECT r FROM dblink_get_result($1, false) AS t(r text) LIMIT 1), dblink_error_message($1))",
        &[name.into()],
    )
    .unwrap()
    .unwrap_or_default();
    // Drain the final empty result, then close (the backend may already be gone).
    let _ = error_of(&format!(
        "SELECT * FROM dblink_get_result('{name}', false) AS t(r text)"
    ));
    let _ = error_of(&format!("SELECT dblink_disconnect('{name}')"));
    result
}

/// Waits (up to 10 s) until the mock has seen at least `n` calls of `method` under `path`;
/// panics if it has not by then, so a test never goes on believing the calls happened.
pub fn wait_for_calls(mock: &MockServer, method: &str, path: &str, n: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while mock.count_calls(method, path) < n {
        assert!(
            std::time::Instant::now() < deadline,
            "the mock saw {} of {n} {method} {path} calls in 10 s",
            mock.count_calls(method, path)
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Starts `sql` on `sessions` separate connections at once and waits for all of them.
/// `setup` runs first in each session (e.g. SET evoq.concurrency). Returns each session's result
/// or error text.
pub fn concurrently(sessions: usize, setup: &str, sql: &str) -> Vec<String> {
    let names: Vec<String> = (0..sessions).map(|i| format!("evoq_c{i}")).collect();
    for name in &names {
        start_in_session(name, setup, sql);
    }
    names.iter().map(|name| finish_session(name)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 0.1.0's wait_for_calls returned silently after 10 s, so a test could go on believing
    /// calls had happened. The mock is a plain HTTP server: no Postgres needed here.
    #[test]
    #[should_panic(expected = "the mock saw 0 of 1 GET /instance/connect calls in 10 s")]
    fn wait_for_calls_fails_loudly() {
        let mock = mock();
        wait_for_calls(&mock, "GET", "/instance/connect", 1);
    }
}
