//! The evoq background worker (optional): loaded through `shared_preload_libraries`, it does
//! what the pg_cron jobs do, continuously, and receives the Evolution server's webhooks itself.
//!
//! - A committed sign-up wakes it (`shared::wake_at_commit`: SIGUSR1 sets its latch), so the
//!   create request leaves within milliseconds, not at the next cron tick. Idle, it sleeps on its
//!   latch until the next due retry, refresh or check, without polling.
//! - Its calls stream through the same pipeline as the SQL functions (`crate::pipeline`), but it
//!   commits its claims and then every group of results: a row is locked only while it is
//!   claimed or recorded, progress is visible as it happens, and a claimed queue row carries a
//!   lease, so a worker that dies strands nothing.
//! - With `evoq.listen_address` set, an HTTP listener on threads of its own hands deliveries to
//!   the main loop, which applies them through `webhook::ingest` (evoq_webhook's path) and
//!   answers 2xx only after the commit.
//!
//! The main thread owns every SPI call and transaction; HTTP calls and the listener run on
//! threads that never touch Postgres and block every signal. Settings in the style of pg_cron's.

mod deliveries;
mod main_loop;
mod probe;
mod reconcile;
pub mod shared;

use pgrx::bgworkers::{BackgroundWorkerBuilder, BgWorkerStartTime};
use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;
use std::time::Duration;

pub use shared::wake_at_commit;

static DATABASE_NAME: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));
static WORKER_ROLE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static ENABLED: GucSetting<bool> = GucSetting::<bool>::new(true);
static LISTEN_ADDRESS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// 100 ms, not 20 (#15, the CPU per creation): under load a group of results is one
/// transaction (its record statement, its commit and WAL flush), and at 20 ms the worker at
/// 320 creations/s recorded ~6 results a group. Measured on 2 000 sign-ups at 50 ms a call, the
/// worker's CPU per creation was 0.665-0.715 ms at 20, 0.64 at 50, 0.47-0.545 at 100 and 0.485
/// at 250. A lone sign-up is not held: a group is also committed when nothing else is in flight.
static COMMIT_MS: GucSetting<i32> = GucSetting::<i32>::new(100);
static LISTENER_CONNECTIONS: GucSetting<i32> = GucSetting::<i32>::new(256);

/// The worker's name in `pg_stat_activity.backend_type` and in `ps`.
pub const WORKER_TYPE: &str = "evoq worker";

fn text(setting: &GucSetting<Option<CString>>) -> Option<String> {
    setting
        .get()
        .and_then(|c| c.into_string().ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The worker's settings, read at start and again on SIGHUP.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerSettings {
    pub enabled: bool,
    pub listen_address: Option<String>,
    pub commit_every: Duration,
    pub listener_connections: usize,
}

pub fn worker_settings() -> WorkerSettings {
    WorkerSettings {
        enabled: ENABLED.get(),
        listen_address: text(&LISTEN_ADDRESS),
        commit_every: Duration::from_millis(COMMIT_MS.get().max(1) as u64),
        listener_connections: LISTENER_CONNECTIONS.get().max(1) as usize,
    }
}

/// The settings read only at server start: PostgreSQL accepts them only while preloading.
fn define_startup_gucs() {
    GucRegistry::define_string_guc(
        c"evoq.database_name",
        c"The database the evoq background worker connects to (where CREATE EXTENSION evoq ran).",
        c"Read at server start. The worker waits quietly while the extension is not installed there.",
        &DATABASE_NAME,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"evoq.worker_role",
        c"The role the evoq background worker runs as (default: the bootstrap superuser).",
        c"Read at server start. The role must be able to run evoq's jobs: the extension's owner or a superuser.",
        &WORKER_ROLE,
        GucContext::Postmaster,
        GucFlags::default(),
    );
}

fn define_gucs() {
    GucRegistry::define_bool_guc(
        c"evoq.worker",
        c"Whether the evoq background worker works (on) or idles (off).",
        c"Reloaded on SIGHUP. Off: it claims nothing and closes its listener; pg_cron's jobs, if scheduled, still run.",
        &ENABLED,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"evoq.listen_address",
        c"host:port where the evoq background worker receives webhook deliveries over HTTP (empty: no listener).",
        c"Reloaded on SIGHUP. Point the instances' webhook at http://<this address>/ with evoq_configure(webhook_url => ...).",
        &LISTEN_ADDRESS,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"evoq.worker_commit_ms",
        c"The evoq background worker commits finished calls at least this often, in ms.",
        c"Reloaded on SIGHUP. Results are also committed when a group reaches evoq.batch_size or nothing else is in flight.",
        &COMMIT_MS,
        1,
        10_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"evoq.listener_connections",
        c"Webhook connections the evoq listener serves at once; more are answered 503.",
        c"Reloaded on SIGHUP (the listener restarts).",
        &LISTENER_CONNECTIONS,
        1,
        10_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
}

/// From `_PG_init`. Loaded through shared_preload_libraries, evoq asks for its shared memory and
/// registers the worker; loaded later (a backend running a function of it), there is no worker
/// and the settings above are only placeholders.
pub fn init() {
    define_gucs();
    // SAFETY: a plain read of a global the postmaster sets while loading preloaded libraries.
    if !unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        return;
    }
    define_startup_gucs();
    shared::request();
    BackgroundWorkerBuilder::new(WORKER_TYPE)
        .set_type(WORKER_TYPE)
        .set_library("evoq")
        .set_function("evoq_worker_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        // The postmaster starts it again this long after a crash (or an exit with an error).
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

/// The database and role, as set when the server started.
fn connection_target() -> (String, Option<String>) {
    (
        text(&DATABASE_NAME).unwrap_or_else(|| "postgres".into()),
        text(&WORKER_ROLE),
    )
}
