//! The worker's main loop: the only thread of the worker that touches Postgres.
//!
//! Each turn: apply the webhook deliveries the listener queued (commit, then answer them), then
//! move the current cycle on: claim rows into free slots (commit), take the results that came
//! back, record a group when it is due (commit). A cycle is one run of each job (the queue first,
//! then the refreshes, sharing one bound on calls in flight); it ends when nothing more is due
//! and every call is recorded, or at `evoq.time_budget_ms`, and is then remembered in
//! evoq_status like a pg_cron run. Between cycles the worker sleeps on its latch until the next
//! due row, unless a sign-up, a delivery or a signal wakes it.
//!
//! Every step runs in its own transaction; an error or a panic in one is logged, the transaction
//! aborted, the cycle given up (rows it had claimed come due again when their lease runs out)
//! and the loop goes on after a short pause.

use super::probe::{Findings, Probe, ProbeKind};
use super::reconcile::{self, Reconciling};
use super::{connection_target, deliveries, shared, worker_settings, WorkerSettings, WORKER_TYPE};
use crate::jobs::process::QueueJob;
use crate::jobs::refresh::RefreshJob;
use crate::jobs::run::{CircuitState, Run};
use crate::listener::{Heartbeat, Listener, ListenerConfig, Secrets};
use crate::pipeline::{Both, Grouping, Pipeline};
use crate::pool::Pool;
use crate::prepared_watch::{self, PreparedWatch};
use pgrx::bgworkers::BackgroundWorker;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use pgrx::PgTryBuilder;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

type Jobs = Both<QueueJob, RefreshJob>;

/// One run of both jobs, across as many transactions as it takes.
struct Cycle {
    pipe: Pipeline<Jobs>,
    jobs: Jobs,
    deadline: Instant,
}

/// The longest the worker sleeps with nothing due: a safety net, not a poll (every due time it
/// knows of wakes it earlier).
const MAX_SLEEP: Duration = Duration::from_secs(60);
/// After a cycle that claimed nothing although something looked due (rows another session
/// holds, say), the next one waits at least this long; a sign-up still wakes it at once.
const EMPTY_CYCLE_PAUSE: Duration = Duration::from_secs(1);
/// Waiting deliveries applied per turn before the cycle gets its turn: at most this many
/// groups, and no new group after `DELIVERY_TIME_PER_TURN`.
const DELIVERY_GROUPS_PER_TURN: usize = 8;
const DELIVERY_TIME_PER_TURN: Duration = Duration::from_millis(200);

/// 0.7.0: what the worker keeps per Evolution server. Each server has its own cycle (its run,
/// pipeline and pool, so a slow server fills only its own slots), due time, probe, findings and
/// pauses: a dead server's circuit stops only its own work.
struct Lane {
    server: String,
    cycle: Option<Cycle>,
    /// When the next cycle should start if nothing wakes the worker earlier.
    next_due: Instant,
    /// Consecutive failed steps: the pause after an error grows with them.
    failures: u32,
    /// A webhook/set failed: repoints wait until then (a cycle would otherwise retry it at
    /// once, over and over, since the instance stays due).
    repoint_after: Instant,
    /// The probe in flight, on a thread of its own (see `probe`).
    probe: Option<Probe>,
    /// What the probes found, until a cycle started with it.
    findings: Findings,
    /// Its server's circuit is open: the next cycle waits for its probe (`next_due`), and the
    /// watch for prepared sign-ups leaves that wait alone.
    circuit_wait: bool,
}

impl Lane {
    fn new(server: String) -> Lane {
        Lane {
            server,
            cycle: None,
            next_due: Instant::now(),
            failures: 0,
            repoint_after: Instant::now(),
            probe: None,
            findings: Findings::default(),
            circuit_wait: false,
        }
    }

    fn in_flight(&self) -> usize {
        self.cycle.as_ref().map_or(0, |c| c.pipe.in_flight())
    }

    /// Drops the cycle, giving back (best effort, in a transaction of its own) the rows it had
    /// claimed ahead and never called: they were charged an attempt by their claim, and would
    /// otherwise wait for their lease.
    fn give_up_cycle(&mut self, why: &'static str) {
        let Some(mut cycle) = self.cycle.take() else {
            return;
        };
        if cycle.pipe.reserved() > 0 {
            cycle.pipe.stop(why);
            let Cycle { pipe, jobs, .. } = &mut cycle;
            let _ = in_transaction(|| pipe.claim(jobs));
        }
    }

    /// Logs a failed step and remembers it for evoq_status; the cycle is given up.
    fn failed(&mut self, what: &str, message: String) {
        self.failures += 1;
        let message = format!("{what}: {message}");
        pgrx::warning!("evoq worker: {message}");
        shared::set_error(&message);
        // The cycle is given up: its calls in flight are abandoned with its pool, and the rows it
        // claimed and committed come due when their lease runs out.
        self.give_up_cycle("failed");
        let pause = Duration::from_secs(1u64 << self.failures.min(5));
        self.next_due = Instant::now() + pause;
    }

    /// A probe's answer came back: kept for the next cycle, which starts at once.
    fn take_probe(&mut self) {
        let Some(outcome) = self.probe.as_ref().and_then(Probe::try_take) else {
            return;
        };
        self.probe = None;
        self.findings.take(outcome);
        self.next_due = Instant::now();
    }

    fn cycle_wait(&self, enabled: bool) -> Duration {
        match &self.cycle {
            Some(c) if c.pipe.in_flight() > 0 => c
                .pipe
                .group_due_in()
                .unwrap_or(Duration::from_secs(1))
                .min(Duration::from_secs(1)),
            Some(_) => Duration::ZERO,
            None if !enabled => MAX_SLEEP,
            // the probe's thread wakes the loop when it answers
            None if self.probe.is_some() => MAX_SLEEP,
            None => self.next_due.saturating_duration_since(Instant::now()),
        }
    }
}

struct Worker {
    settings: WorkerSettings,
    listener: Option<Listener>,
    /// The address the listener failed to bind, and when to try again.
    listener_retry: Option<Instant>,
    /// 0.7.0: one per Evolution server (`default` alone until evoq_server_add).
    lanes: Vec<Lane>,
    /// When the servers were last read.
    servers_read: Option<Instant>,
    /// The sign-up counter as the worker last saw it.
    wakes_seen: u64,
    /// A sign-up in a prepared transaction, whose COMMIT PREPARED wakes nobody: while this
    /// watch lasts every lane looks at least every `prepared_watch::POLL`.
    prepared: PreparedWatch,
    /// When running cycles last claimed again for the watch's sake.
    prepared_rearmed: Instant,
    /// Set by the pool's and the listener's threads before they signal the main thread, so a
    /// burst of results costs one signal.
    signalled: Arc<AtomicBool>,
    /// Why the worker cannot work in this database (its role, the schema's version), as last
    /// logged: logged once, not at every retry.
    blocked: Option<String>,
    /// The webhook secrets the listener accepts, shared with its threads: they refuse a
    /// delivery without one before reading its body.
    secrets: Secrets,
    /// When `secrets` was last read from the settings.
    secrets_read: Option<Instant>,
    /// The main loop's heartbeat, for the listener's `GET /health`.
    heartbeat: Heartbeat,
    /// 0.6.0: the reconcile in progress (its calls on a thread of their own), and when the next
    /// one is due to be looked at.
    reconcile: Option<Box<Reconciling>>,
    reconcile_due: Instant,
    /// The last reconcile failure logged (logged once, not every minute).
    reconcile_error: Option<String>,
    /// The last turn left deliveries queued (its share of time or groups ran out): the next
    /// turn comes at once. Their arrival signalled the latch once, and that wake was spent.
    deliveries_left: bool,
}

/// How often the worker reads the servers again (evoq_server_add and evoq_server_remove wake
/// it, which reads them at once; this bounds the rest).
const SERVERS_EVERY: Duration = Duration::from_secs(10);

/// How often the accepted secrets are read again while the listener is open (an
/// evoq_configure wakes the worker, which reads them at once; this bounds the rest).
const SECRETS_EVERY: Duration = Duration::from_secs(1);

/// What keeps a cycle from starting.
enum NotStarted {
    /// Sleep this long (the circuit's next probe, say).
    Wait(Duration),
    /// Ask the server this first, off the main loop.
    Probe(ProbeKind, crate::evolution::Client),
}

/// A cycle that claimed at least this many rows gives its memory back when it ends.
const BIG_CYCLE: u64 = 64;

/// How long repoints wait after a webhook/set failed.
const REPOINT_PAUSE: Duration = Duration::from_secs(60);

/// Wakes the main thread from another thread of this process: SIGUSR1 runs PostgreSQL's own
/// handler on the main thread (the only one that does not block it), which sets the latch.
fn signaller(flag: Arc<AtomicBool>) -> Arc<dyn Fn() + Send + Sync> {
    Arc::new(move || {
        if !flag.swap(true, Ordering::SeqCst) {
            // SAFETY: a signal to this very process.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGUSR1);
            }
        }
    })
}

fn caught_message(e: CaughtError) -> String {
    match e {
        CaughtError::PostgresError(r)
        | CaughtError::ErrorReport(r)
        | CaughtError::RustPanic { ereport: r, .. } => r.message().to_string(),
    }
}

/// PostgreSQL's timeout.h, which pgrx does not bind: its own backends arm the statement timeout
/// in the top-level query loop, which a background worker has not, so the worker arms it
/// around each of its transactions itself.
/// PostgreSQL's own signal handlers (postgres.c, interrupt.c), as C symbols: pgrx binds them
/// only as Rust wrappers, which cannot be handed to pqsignal.
mod handlers {
    extern "C-unwind" {
        pub fn die(signal: std::ffi::c_int);
        pub fn StatementCancelHandler(signal: std::ffi::c_int);
        pub fn SignalHandlerForConfigReload(signal: std::ffi::c_int);
    }
}

mod timeout {
    /// `STATEMENT_TIMEOUT` of `enum TimeoutId` (utils/timeout.h, PostgreSQL 15).
    pub const STATEMENT_TIMEOUT: std::ffi::c_int = 3;
    extern "C-unwind" {
        pub fn enable_timeout_after(id: std::ffi::c_int, delay_ms: std::ffi::c_int);
        pub fn disable_timeout(id: std::ffi::c_int, keep_indicator: bool);
    }
}

/// The longest one of the worker's transactions may run; past it PostgreSQL cancels the
/// statement (through SIGINT, as it does in every backend) and the step is given up and
/// retried. Each step is a claim, a group of results or of deliveries: milliseconds when
/// nothing waits.
const STEP_TIMEOUT_MS: i32 = 10_000;

/// Runs `f` in a transaction of its own and commits it; an error or a panic is caught, the
/// transaction aborted, and the message returned. Every wait inside is bounded: a row lock by
/// the session's lock_timeout, the whole transaction by `STEP_TIMEOUT_MS`.
fn in_transaction<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    // SAFETY: the worker's main thread, between transactions; every path below ends the
    // transaction begun here, and disarms the timeout armed here.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        // A cancel (pg_cancel_backend) that came between two steps cancels nothing.
        pg_sys::QueryCancelPending = 0;
        timeout::enable_timeout_after(timeout::STATEMENT_TIMEOUT, STEP_TIMEOUT_MS);
    }
    let f = std::panic::AssertUnwindSafe(f);
    let result = PgTryBuilder::new(move || {
        let f = f;
        let value = (f.0)();
        // SAFETY: the transaction begun above; a failing commit is caught below.
        unsafe {
            pg_sys::PopActiveSnapshot();
            pg_sys::CommitTransactionCommand();
        }
        Ok(value)
    })
    .catch_others(|e| {
        // SAFETY: pgrx copied and flushed the error; the transaction is rolled back, and any
        // subtransaction with it, as PostgreSQL's own workers do.
        unsafe { pg_sys::AbortOutOfAnyTransaction() };
        Err(caught_message(e))
    })
    .execute();
    // SAFETY: disarms the timeout armed above (a no-op if it fired); between transactions.
    unsafe { timeout::disable_timeout(timeout::STATEMENT_TIMEOUT, false) };
    // A backend reports its table statistics when idle; a worker never is, so it does so after
    // each transaction (PostgreSQL throttles unforced reports to one per second or so), or
    // autovacuum would never hear of the rows it updates.
    // SAFETY: between transactions, on the main thread.
    unsafe { pg_sys::pgstat_report_stat(false) };
    result
}

impl Worker {
    fn new() -> Worker {
        let mut w = Worker {
            settings: worker_settings(),
            listener: None,
            listener_retry: None,
            lanes: vec![Lane::new(crate::servers::DEFAULT_SERVER.to_string())],
            servers_read: None,
            wakes_seen: shared::wakes(),
            prepared: PreparedWatch::new(shared::prepares()),
            prepared_rearmed: Instant::now(),
            signalled: Arc::new(AtomicBool::new(false)),
            blocked: None,
            secrets: Secrets::new(),
            secrets_read: None,
            heartbeat: Heartbeat::new(),
            reconcile: None,
            reconcile_due: Instant::now(),
            reconcile_error: None,
            deliveries_left: false,
        };
        // A sign-up may have been prepared before this worker started (or restarted): its
        // PREPARE was counted while no one watched.
        if let Ok(prepared) = in_transaction(prepared_sign_ups) {
            w.prepared.looked(prepared, Instant::now());
        }
        w.open_listener();
        w
    }

    fn in_flight(&self) -> usize {
        self.lanes.iter().map(Lane::in_flight).sum()
    }

    fn give_up_cycles(&mut self, why: &'static str) {
        for lane in &mut self.lanes {
            lane.give_up_cycle(why);
        }
    }

    fn open_listener(&mut self) {
        self.listener_retry = None;
        let address = match (&self.settings.listen_address, self.settings.enabled) {
            (Some(a), true) => a.clone(),
            _ => {
                shared::set_listener(None);
                return;
            }
        };
        let mut config = ListenerConfig::new(address.clone());
        config.max_body_bytes = crate::evolution::MAX_DELIVERY_BYTES;
        config.max_connections = self.settings.listener_connections;
        // One delivery at most waits per connection: a queue as long never refuses one as busy.
        config.queue_capacity = self.settings.listener_connections;
        config.secrets = self.secrets.clone();
        config.heartbeat = self.heartbeat.clone();
        match Listener::start(config, signaller(self.signalled.clone())) {
            Ok(listener) => {
                let bound = listener.local_addr().to_string();
                log!("evoq worker: receiving webhook deliveries on http://{bound}/");
                shared::set_listener(Some(&bound));
                self.listener = Some(listener);
            }
            Err(e) => {
                let message = format!("could not listen on {address} (evoq.listen_address): {e}");
                pgrx::warning!("evoq worker: {message}; trying again in a minute");
                shared::set_error(&message);
                shared::set_listener(None);
                self.listener_retry = Some(Instant::now() + Duration::from_secs(60));
            }
        }
    }

    /// SIGHUP: the configuration file was read again. A running cycle claims nothing more, so
    /// the next one starts with the new settings (evoq.concurrency, the intervals...) as soon as
    /// its calls in flight are recorded.
    fn reload(&mut self) {
        for lane in &mut self.lanes {
            if let Some(cycle) = lane.cycle.as_mut() {
                cycle.pipe.stop("reload");
            }
            lane.next_due = Instant::now();
        }
        self.reconcile_due = Instant::now();
        let settings = worker_settings();
        if settings == self.settings {
            return;
        }
        let listener_changed = settings.listen_address != self.settings.listen_address
            || settings.enabled != self.settings.enabled
            || settings.listener_connections != self.settings.listener_connections;
        self.settings = settings;
        if listener_changed {
            if let Some(old) = self.listener.take() {
                old.stop();
            }
            self.open_listener();
        }
        if !self.settings.enabled {
            log!("evoq worker: evoq.worker = off; idle until it is turned on");
        }
    }

    /// One turn of the loop.
    fn turn(&mut self) {
        self.heartbeat.beat();
        self.signalled.store(false, Ordering::SeqCst);
        let wakes = shared::wakes();
        let woken = wakes != self.wakes_seen;
        self.wakes_seen = wakes;
        self.read_secrets(woken);
        self.take_deliveries();
        for lane in &mut self.lanes {
            lane.take_probe();
        }
        if self.listener.is_none() && self.listener_retry.is_some_and(|t| Instant::now() >= t) {
            self.open_listener();
        }
        if !self.settings.enabled {
            self.give_up_cycles("disabled");
            return;
        }
        self.read_servers(woken);
        self.step_reconcile();
        for i in 0..self.lanes.len() {
            let lane = &mut self.lanes[i];
            let due = woken || Instant::now() >= lane.next_due;
            match lane.cycle.as_mut() {
                Some(cycle) if woken => cycle.pipe.rearm(),
                Some(_) => {}
                None if due => self.start_cycle(i),
                None => {}
            }
            if self.lanes[i].cycle.is_some() {
                self.step_cycle(i);
                launch_ready(&mut self.lanes);
            }
        }
        // Last, after every lane set its next due time this turn (a cycle that ended just now
        // included): see `prepared_watch`.
        self.watch_prepared();
    }

    /// A PREPARE TRANSACTION that queued rows, or one a cycle's end saw: its COMMIT PREPARED will
    /// wake nobody, so every lane looks again within `prepared_watch::POLL` while the watch lasts:
    /// an idle lane starts a cycle by then, a running cycle whose last claim found nothing claims
    /// again (its turns come at least every second: `Lane::cycle_wait`). Lanes backing off after
    /// an error, or waiting for their circuit's probe, keep their wait: a sign-up is placed on
    /// another server meanwhile.
    fn watch_prepared(&mut self) {
        let now = Instant::now();
        self.prepared.counted(shared::prepares(), now);
        if !self.prepared.watching(now) {
            return;
        }
        let rearm = now >= self.prepared_rearmed + prepared_watch::POLL;
        if rearm {
            self.prepared_rearmed = now;
            // Cycles that run for long end (and look) rarely: look for them, so the watch lasts
            // as long as a sign-up is prepared.
            if self.lanes.iter().any(|l| l.cycle.is_some()) {
                if let Ok(prepared) = in_transaction(prepared_sign_ups) {
                    self.prepared.looked(prepared, now);
                }
            }
        }
        let Some(by) = self.prepared.look_by(now) else {
            return;
        };
        for lane in &mut self.lanes {
            match lane.cycle.as_mut() {
                Some(cycle) if rearm => cycle.pipe.rearm(),
                Some(_) => {}
                None if lane.failures > 0 || lane.circuit_wait => {}
                None => lane.next_due = lane.next_due.min(by),
            }
        }
    }

    /// 0.7.0: a lane per server (read at most every `SERVERS_EVERY`, and at once after a wake:
    /// evoq_server_add and evoq_server_remove wake the worker). A server removed has its cycle
    /// given up (evoq_server_remove already took its rows back).
    fn read_servers(&mut self, woken: bool) {
        if !woken
            && self
                .servers_read
                .is_some_and(|t| t.elapsed() < SERVERS_EVERY)
        {
            return;
        }
        let Ok(names) = in_transaction(|| {
            if pg_catalog_has_settings() {
                crate::servers::names()
            } else {
                vec![crate::servers::DEFAULT_SERVER.to_string()]
            }
        }) else {
            return; // the cycles say why, if it lasts
        };
        self.servers_read = Some(Instant::now());
        let mut lanes = std::mem::take(&mut self.lanes);
        for lane in lanes.iter_mut().filter(|l| !names.contains(&l.server)) {
            lane.give_up_cycle("server_removed");
        }
        lanes.retain(|l| names.contains(&l.server));
        for name in names {
            if !lanes.iter().any(|l| l.server == name) {
                lanes.push(Lane::new(name));
            }
        }
        self.lanes = lanes;
    }

    /// Gives the listener the secrets deliveries must carry (read at most every
    /// `SECRETS_EVERY`, and at once after a wake: evoq_configure wakes the worker), and counts
    /// what it refused since.
    fn read_secrets(&mut self, woken: bool) {
        let Some(listener) = self.listener.as_ref() else {
            return;
        };
        let due = woken
            || self
                .secrets_read
                .is_none_or(|t| t.elapsed() >= SECRETS_EVERY);
        let rejected = listener.take_rejected();
        if !due && rejected == 0 {
            return;
        }
        let read = in_transaction(|| {
            if rejected > 0 {
                let _ = Spi::run_with_args(
                    "SELECT pg_catalog.nextval('evoq.webhooks_rejected') FROM pg_catalog.generate_series(1, $1)",
                    &[(rejected as i64).into()],
                );
            }
            if pg_catalog_has_settings() {
                crate::webhook::settings().accepted_secrets()
            } else {
                Vec::new()
            }
        });
        match read {
            Ok(secrets) => {
                self.secrets.set(secrets);
                self.secrets_read = Some(Instant::now());
            }
            // Shown in evoq_status, not logged every second: the one cause seen (a role that may
            // not read evoq's settings) is logged once by `cannot_work_here`. Deliveries then get
            // 503 (none accepted yet) or are checked against the secrets read last.
            Err(message) => {
                shared::set_error(&format!("reading the webhook secrets: {message}"));
                self.secrets_read = Some(Instant::now());
            }
        }
    }

    /// Applies what the listener received, a group per transaction, and answers each delivery
    /// once its group committed.
    fn take_deliveries(&mut self) {
        self.deliveries_left = false;
        let Some(listener) = self.listener.as_ref() else {
            return;
        };
        let started = Instant::now();
        for _ in 0..DELIVERY_GROUPS_PER_TURN {
            // What is still queued waits for the next turn, which comes at once (see `wait`):
            // the cycle's claims (a sign-up) get their turn however many deliveries arrive.
            if started.elapsed() >= DELIVERY_TIME_PER_TURN {
                self.deliveries_left = true;
                return;
            }
            let group: Vec<_> = std::iter::from_fn(|| listener.try_recv())
                .take(deliveries::GROUP)
                .collect();
            if group.is_empty() {
                return;
            }
            // A full group may have more behind it; a short one emptied the queue.
            self.deliveries_left = group.len() == deliveries::GROUP;
            let applied = in_transaction(|| deliveries::apply(group));
            launch_ready(&mut self.lanes);
            match applied {
                Ok(answers) => {
                    for (delivery, verdict) in answers {
                        delivery.answer(verdict);
                    }
                }
                // The deliveries went into the aborted transaction and were dropped
                // unanswered: each gets a 503, and the Evolution server sends it again.
                Err(message) => {
                    let message = format!("applying webhook deliveries: {message}");
                    pgrx::warning!("evoq worker: {message}");
                    shared::set_error(&message);
                    // The rest waits for the next wake, not a turn at once: an error that
                    // repeats (the schema being dropped) would otherwise spin the loop.
                    self.deliveries_left = false;
                    return;
                }
            }
        }
    }

    /// The reconcile (see `reconcile`): a step when its thread answered, a start when one is
    /// due. One server at a time; each step is a transaction of its own; the server is never
    /// waited on here.
    fn step_reconcile(&mut self) {
        let notify = signaller(self.signalled.clone());
        if let Some(mut r) = self.reconcile.take() {
            if !r.poll() {
                self.reconcile = Some(r);
                return;
            }
            match in_transaction(|| (*r).step(notify)) {
                Ok(reconcile::Step::Waiting(r)) => self.reconcile = Some(r),
                Ok(reconcile::Step::Next(wait)) => {
                    self.reconcile_error = None;
                    self.reconcile_due = Instant::now() + wait;
                }
                Err(message) => self.reconcile_failed(message),
            }
            return;
        }
        if Instant::now() < self.reconcile_due {
            return;
        }
        let servers: Vec<String> = self.lanes.iter().map(|l| l.server.clone()).collect();
        let started = in_transaction(|| match cannot_work_here() {
            Some(_) => Err(reconcile::RETRY_PAUSE),
            None => {
                // the first server whose reconcile is due; otherwise the soonest one's wait
                let mut wait: Option<Duration> = None;
                for server in &servers {
                    match reconcile::start(server, notify.clone()) {
                        Ok(r) => return Ok(r),
                        Err(w) => wait = Some(wait.map_or(w, |v| v.min(w))),
                    }
                }
                Err(wait.unwrap_or(reconcile::RETRY_PAUSE))
            }
        });
        match started {
            Ok(Ok(r)) => self.reconcile = Some(Box::new(r)),
            Ok(Err(wait)) => self.reconcile_due = Instant::now() + wait,
            Err(message) => self.reconcile_failed(message),
        }
    }

    /// A reconcile step failed: logged, and tried again later (its lease, if it took one, runs
    /// out first). The cycles go on.
    fn reconcile_failed(&mut self, message: String) {
        let message = format!("reconciling: {message}");
        // Said once, like the cycles' reasons not to work (a copied database, say).
        if self.reconcile_error.as_deref() != Some(message.as_str()) {
            pgrx::warning!("evoq worker: {message}");
            shared::set_error(&message);
            self.reconcile_error = Some(message);
        }
        self.reconcile_due = Instant::now() + reconcile::RETRY_PAUSE;
    }

    fn start_cycle(&mut self, i: usize) {
        let lane = &mut self.lanes[i];
        if lane.probe.is_some() {
            return; // it starts when the probe answers
        }
        let signalled = self.signalled.clone();
        let commit_every = self.settings.commit_every;
        let repoint = Instant::now() >= lane.repoint_after;
        let findings = lane.findings.clone();
        let server = lane.server.clone();
        let started = in_transaction(|| {
            if let Some(why) = cannot_work_here() {
                return Err(why);
            }
            crate::jobs::run::require_working_attachments();
            let run = Run::start("process_queue", &server);
            let t = run.tunables;
            let mut queue = QueueJob::start(run, t.lease_ms);
            // The probes run on a thread (see `probe`): a cycle that needs one asks for it and
            // starts once it answered; the main loop applies deliveries meanwhile.
            match queue.run.circuit_state() {
                CircuitState::Closed => {}
                CircuitState::Open => {
                    queue.finish("circuit_open", 0);
                    return Ok(Err(NotStarted::Wait(circuit_probe_in(&server))));
                }
                CircuitState::ProbeDue => match findings.health.clone() {
                    None => {
                        let client = queue.run.client.clone();
                        return Ok(Err(NotStarted::Probe(ProbeKind::Health, client)));
                    }
                    Some(probed) => {
                        if let Some(reason) = queue.run.take_health_probe(probed) {
                            queue.finish(reason, 0);
                            return Ok(Err(NotStarted::Wait(circuit_probe_in(&server))));
                        }
                    }
                },
            }
            if queue.run.known_version().is_none() {
                let timed_out = |r: &Result<_, crate::evolution::ApiError>| {
                    r.as_ref()
                        .is_err_and(|e| e.error_class() == crate::evolution::ErrorClass::Timeout)
                };
                match findings.version {
                    None => {
                        let client = queue.run.version_client();
                        return Ok(Err(NotStarted::Probe(ProbeKind::Version, client)));
                    }
                    // GET / was too slow: whether the server is up is the health probe's word.
                    Some(ref probed) if timed_out(probed) && findings.health.is_none() => {
                        let client = queue.run.client.clone();
                        return Ok(Err(NotStarted::Probe(ProbeKind::Health, client)));
                    }
                    Some(probed) => {
                        if let Err(e) = queue.run.take_version_probe(probed, findings.health) {
                            queue.run.count_error(&e);
                            queue.run.trip(&e.message);
                            queue.finish("circuit_open", 0);
                            return Ok(Err(NotStarted::Wait(circuit_probe_in(&server))));
                        }
                    }
                }
            }
            if let Some(reason) = queue.ready() {
                queue.finish(reason, 0);
                return Ok(Err(NotStarted::Wait(circuit_probe_in(&server))));
            }
            let refresh = RefreshJob::start(
                Run::start("refresh_qr", &server),
                t.qr_refresh_interval_ms,
                repoint,
            );
            let work = Both::<QueueJob, RefreshJob>::work(queue.work(), refresh.work());
            let pool = Pool::new(t.concurrency, work).with_notify(signaller(signalled));
            let grouping = Grouping {
                size: t.batch_size.max(1) as usize,
                age: commit_every,
            };
            Ok(Ok(Cycle {
                // Sign-ups are claimed ahead, a reserve of twice the concurrency: one claim
                // transaction per concurrency's worth of calls instead of one per finished call
                // (see `pipeline`; what it saves at 50 ms is within this machine's noise so far:
                // docs/benchmarks.md). The claims are committed leases, so a reserved row
                // that waited half its lease is given back rather than called: slow calls never
                // make one outwait its lease, however large the reserve. QR refreshes, which
                // cannot be reserved, are claimed a quarter of the slots at a time: their claim
                // sorts every due instance whatever it takes.
                pipe: Pipeline::new(pool, grouping)
                    .claiming_ahead(2 * t.concurrency.max(1))
                    .reserving_for_at_most(Duration::from_millis(t.lease_ms.max(0) as u64 / 2))
                    .claiming_at_least((t.concurrency / 4).max(1)),
                jobs: Both {
                    first: queue,
                    second: refresh,
                },
                deadline: Instant::now() + t.time_budget,
            }))
        });
        let lane = &mut self.lanes[i];
        match started {
            Ok(Ok(Ok(cycle))) => {
                // The findings served this cycle; the next one asks again if it must.
                lane.findings = Findings::default();
                lane.circuit_wait = false;
                self.blocked = None;
                lane.cycle = Some(cycle);
            }
            Ok(Ok(Err(NotStarted::Wait(wait)))) => {
                lane.findings = Findings::default();
                lane.circuit_wait = true;
                lane.next_due = Instant::now() + wait;
            }
            Ok(Ok(Err(NotStarted::Probe(kind, client)))) => {
                lane.probe = Some(Probe::start(
                    kind,
                    client,
                    signaller(self.signalled.clone()),
                ));
            }
            // Not installed, not configured, not allowed, or the schema is of another version:
            // asleep until evoq_configure or a sign-up wakes it, or a minute passes. Said once.
            Ok(Err(why)) => {
                if let Some(why) = why {
                    if self.blocked.as_deref() != Some(why.as_str()) {
                        pgrx::warning!("evoq worker: {why}");
                        shared::set_error(&why);
                    }
                    self.blocked = Some(why);
                }
                lane.next_due = Instant::now() + MAX_SLEEP;
            }
            Err(message) => lane.failed("starting a run", message),
        }
    }

    fn step_cycle(&mut self, i: usize) {
        let lane = &mut self.lanes[i];
        let Some(mut cycle) = lane.cycle.take() else {
            return;
        };
        if Instant::now() >= cycle.deadline {
            // Calls in flight finish and are recorded; nothing new is claimed.
            cycle.pipe.stop("time_budget");
        }
        if cycle.pipe.wants_rows() {
            let Cycle { pipe, jobs, .. } = &mut cycle;
            // The claims commit before any call leaves: a call is never made for a claim that
            // rolled back. (After a stop, this gives the reserve back.)
            if let Err(message) = in_transaction(|| pipe.claim(jobs)) {
                lane.cycle = Some(cycle);
                return lane.failed("claiming rows", message);
            }
        }
        // Claimed rows (now, or earlier into the reserve) go out as slots free.
        cycle.pipe.launch();
        cycle.pipe.gather(Duration::ZERO);
        if cycle.pipe.group_due() {
            let Cycle { pipe, jobs, .. } = &mut cycle;
            // Each group is a transaction of its own: its results are recorded in a
            // subtransaction, so one that cannot be stored fails alone.
            jobs.first.run.reset_protection();
            jobs.second.run.reset_protection();
            if let Err(message) = in_transaction(|| pipe.flush(jobs)) {
                lane.cycle = Some(cycle);
                return lane.failed("recording results", message);
            }
        }
        if !cycle.pipe.finished() {
            lane.cycle = Some(cycle);
            return;
        }
        let prepared = finish_cycle(lane, cycle);
        self.prepared.looked(prepared, Instant::now());
    }

    /// How long the latch wait may last.
    fn wait(&self) -> Duration {
        if self.deliveries_left {
            return Duration::ZERO;
        }
        let enabled = self.settings.enabled;
        let cycle = self
            .lanes
            .iter()
            .map(|l| l.cycle_wait(enabled))
            .min()
            .unwrap_or(MAX_SLEEP);
        // While the watch for prepared sign-ups lasts, running cycles claim again every POLL
        // (`watch_prepared`): the loop turns by then, not a second after.
        let now = Instant::now();
        let cycle = if self.prepared.watching(now) && self.lanes.iter().any(|l| l.cycle.is_some()) {
            cycle.min((self.prepared_rearmed + prepared_watch::POLL).saturating_duration_since(now))
        } else {
            cycle
        };
        // A reconcile in progress wakes the loop when its thread answers.
        if enabled && self.reconcile.is_none() {
            cycle.min(self.reconcile_due.saturating_duration_since(Instant::now()))
        } else {
            cycle
        }
    }
}

/// Sends every lane's claimed rows whose slots are free now. The lanes share this one thread,
/// and a slot that frees while it is in a transaction (another lane's claim or group, a group
/// of deliveries) would otherwise stay empty until its own lane's turn: with four servers that
/// was a tenth of every 200 ms call's slot (docs/benchmarks.md). Only the reserve leaves here,
/// rows whose claims committed; nothing touches Postgres.
fn launch_ready(lanes: &mut [Lane]) {
    for cycle in lanes.iter_mut().filter_map(|l| l.cycle.as_mut()) {
        cycle.pipe.gather(Duration::ZERO);
        cycle.pipe.launch();
    }
}

/// Records the cycle's end and sets when the lane's next is due. True when a prepared
/// transaction wrote to evoq's tables (see `prepared_watch`).
fn finish_cycle(lane: &mut Lane, cycle: Cycle) -> bool {
    let Cycle { pipe, jobs, .. } = cycle;
    let stopped = pipe.stopped().unwrap_or("drained");
    let (claimed, groups) = (pipe.claimed, pipe.groups);
    drop(pipe);
    if jobs.second.repoint_failed() {
        lane.repoint_after = Instant::now() + REPOINT_PAUSE;
    }
    let repoint = Instant::now() >= lane.repoint_after;
    let big = claimed >= BIG_CYCLE;
    let finished = in_transaction(|| {
        let Both { first, second } = jobs;
        first.finish(stopped, groups);
        second.finish(
            if stopped == "drained" {
                "done"
            } else {
                stopped
            },
            groups,
        );
        next_due_in(repoint)
    });
    // The cycle's clients (and their kept-alive connections' buffers) are freed now; after
    // a big one, give the memory back to the operating system (the pool's last thread
    // trims too, but the clients outlive it).
    if big {
        crate::pool::give_back_memory();
    }
    match finished {
        Ok((due_in, prepared)) => {
            // Only a whole cycle resets the pause after errors: one that starts and then
            // fails (a library newer than the schema, say) keeps backing off.
            lane.failures = 0;
            let mut wait = due_in.min(MAX_SLEEP);
            if claimed == 0 {
                wait = wait.max(EMPTY_CYCLE_PAUSE);
            }
            lane.next_due = Instant::now() + wait;
            prepared
        }
        Err(message) => {
            lane.failed("finishing a run", message);
            false
        }
    }
}

/// Why the worker cannot work in this database now: Some(None) when there is quietly nothing
/// to do (evoq not installed or not configured yet), Some(Some(reason)) when something must be
/// fixed (said once, in the log and in evoq_status), None when it can work.
fn cannot_work_here() -> Option<Option<String>> {
    let installed = Spi::get_one::<String>(
        "SELECT e.extversion::text FROM pg_catalog.pg_extension e
         WHERE e.extname = 'evoq' AND pg_catalog.to_regclass('evoq.settings') IS NOT NULL",
    )
    .ok()
    .flatten();
    let Some(installed) = installed else {
        return Some(None);
    };
    let library = env!("CARGO_PKG_VERSION");
    if installed != library {
        return Some(Some(format!(
            "this database has evoq {installed}, and the server loaded evoq {library}: run ALTER EXTENSION evoq UPDATE; \
             the worker waits until then"
        )));
    }
    // The jobs' functions run as the extension's owner anyway; the worker also calls evoq's
    // internal functions directly, which only the owner (or a superuser) may.
    let (allowed, owner) = Spi::get_two::<bool, String>(
        "SELECT r.rolsuper OR pg_catalog.pg_has_role(r.oid, e.extowner, 'USAGE'),
                pg_catalog.pg_get_userbyid(e.extowner)::text
         FROM pg_catalog.pg_roles r, pg_catalog.pg_extension e
         WHERE r.rolname = current_user AND e.extname = 'evoq'",
    )
    .unwrap_or((None, None));
    if allowed != Some(true) {
        let role = Spi::get_one::<String>("SELECT current_user::text")
            .ok()
            .flatten()
            .unwrap_or_default();
        let owner = owner.unwrap_or_default();
        return Some(Some(format!(
            "role {role:?} (evoq.worker_role) cannot run evoq's work: it is neither a superuser nor a member of {owner:?}, \
             the owner of extension evoq; set evoq.worker_role = '{owner}' (on Supabase: supabase_admin) or a superuser, \
             and restart PostgreSQL"
        )));
    }
    let configured = Spi::get_one::<bool>("SELECT EXISTS (SELECT 1 FROM evoq.settings)")
        .ok()
        .flatten()
        .unwrap_or(false);
    if !configured {
        return Some(None);
    }
    None
}

/// How long until the server's circuit's next probe (at least a second, at most `MAX_SLEEP`).
fn circuit_probe_in(server: &str) -> Duration {
    let ms = Spi::get_one_with_args::<f64>(
        "SELECT extract(epoch FROM next_probe_at - clock_timestamp()) * 1000 FROM evoq.circuit WHERE server = $1",
        &[server.into()],
    )
    .ok()
    .flatten()
    .unwrap_or(1000.0);
    Duration::from_millis(ms.clamp(1000.0, MAX_SLEEP.as_millis() as f64) as u64)
}

/// How long until the next row is due for either job (zero if one is due now), and whether a
/// prepared transaction wrote to evoq's tables (`prepared_sign_ups`).
fn next_due_in(repoint: bool) -> (Duration, bool) {
    let t = crate::settings::tunables();
    let ms = Spi::get_one_with_args::<f64>(
        "SELECT evoq._next_due_ms($1, $2, $3, $4, $5, $6)",
        &[
            t.qr_refresh_interval_ms.into(),
            t.qr_window_ms.into(),
            t.state_check_interval_ms.into(),
            t.qr_refresh_interval_ms.into(),
            repoint.into(),
            (MAX_SLEEP.as_millis() as i64).into(),
        ],
    )
    .ok()
    .flatten()
    .unwrap_or(MAX_SLEEP.as_millis() as f64);
    (
        Duration::from_millis(ms.max(0.0) as u64),
        prepared_sign_ups(),
    )
}

/// Whether a prepared transaction wrote to one of evoq's tables: a sign-up, a re-insert, a
/// deletion, an evoq_reconnect or evoq_server_set..., whose COMMIT PREPARED may come from any
/// session, runs no trigger and wakes nobody (see `prepared_watch`). One that only read them, or
/// touched the application's tables alone, does not keep the worker looking. A prepared
/// transaction's locks are in pg_locks with no pid.
fn prepared_sign_ups() -> bool {
    Spi::get_one::<bool>(
        "SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_prepared_xacts WHERE database = current_database())
                THEN EXISTS (
                    SELECT 1 FROM pg_catalog.pg_locks l
                    JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
                                               AND d.objid = l.relation AND d.deptype = 'e'
                    JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid AND e.extname = 'evoq'
                    WHERE l.pid IS NULL AND l.locktype = 'relation' AND l.mode <> 'AccessShareLock'
                      AND l.database = (SELECT o.oid FROM pg_catalog.pg_database o
                                        WHERE o.datname = current_database()))
                ELSE false END",
    )
    .ok()
    .flatten()
    .unwrap_or(false)
}

/// Sets a setting of the worker's session, as a superuser's `SET` would.
fn set_session(name: &std::ffi::CStr, value: &std::ffi::CStr) {
    // SAFETY: sets a setting of this session, outside any transaction, on the main thread.
    unsafe {
        pg_sys::SetConfigOption(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
        )
    };
}

/// Sleeps on the latch for at most `wait`. A SIGTERM ends the process here (PostgreSQL's `die`
/// handler: the next CHECK_FOR_INTERRUPTS exits, as in any backend), as does the postmaster's
/// death. A cancel between steps cancels nothing: raised here, outside any transaction, it
/// would end the process.
fn sleep_on_latch(wait: Duration) {
    let ms = wait.as_millis().min(i32::MAX as u128) as std::ffi::c_long;
    // SAFETY: the main thread's own latch; the flags are plain reads and writes of this
    // backend's globals, as PostgreSQL's own workers do between waits.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            ms,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
        pg_sys::QueryCancelPending = 0;
    }
    pgrx::check_for_interrupts!();
}

/// Clears the worker's pid in shared memory however the process ends (a SIGTERM ends it from
/// inside a wait, through proc_exit, not by returning from the loop).
#[pg_guard]
unsafe extern "C-unwind" fn on_exit(_code: std::ffi::c_int, _arg: pg_sys::Datum) {
    shared::stopped();
}

/// The worker process's entry point (named in its registration).
#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn evoq_worker_main(_arg: pg_sys::Datum) {
    // PostgreSQL's own handlers, as its own background workers install them. SIGTERM: `die`,
    // so the process ends at the next CHECK_FOR_INTERRUPTS, which every lock wait and every
    // statement makes: within a second, whatever it waits on. SIGINT: the query cancel, which
    // is how PostgreSQL enforces lock_timeout and statement_timeout (it signals the backend
    // itself); 0.4.0 ignored SIGINT, so neither ever fired and one row lock froze the worker.
    // A pg_cancel_backend() now cancels the step running (it is given up and done again
    // later). SIGHUP: reload at the next turn.
    // SAFETY: the main thread, before any other thread exists.
    unsafe {
        pg_sys::pqsignal(libc::SIGHUP, Some(handlers::SignalHandlerForConfigReload));
        pg_sys::pqsignal(libc::SIGTERM, Some(handlers::die));
        pg_sys::pqsignal(libc::SIGINT, Some(handlers::StatementCancelHandler));
        pg_sys::BackgroundWorkerUnblockSignals();
    }
    let (database, role) = connection_target();
    BackgroundWorker::connect_worker_to_spi(Some(&database), role.as_deref());
    // Every wait is bounded: a step waiting on a row lock (a delivery behind a pg_cron run
    // holding the row) gives up after 2 s, and the step is done again later (the Evolution
    // server resends an unacknowledged delivery). In a deadlock with another session (DROP
    // EXTENSION evoq while the worker works, say) the worker notices first and gives way.
    set_session(c"lock_timeout", c"2s");
    set_session(c"deadlock_timeout", c"100ms");
    // Every name the worker's own statements use is resolved without the role's "$user"
    // schema or temporary tables.
    set_session(c"search_path", c"pg_catalog, public, pg_temp");
    // Its statements are small and planned once; JIT would only map libLLVM into the worker
    // (about 52 MiB resident after a burst, measured) and open its files.
    set_session(c"jit", c"off");
    // SAFETY: registers a callback of this process, once.
    unsafe { pg_sys::before_shmem_exit(Some(on_exit), pg_sys::Datum::from(0)) };
    // SAFETY: reads the process id.
    let pid = unsafe { libc::getpid() };
    shared::started(pid);
    log!("{WORKER_TYPE} started in database {database} (pid {pid})");
    // Calls in flight are capped by the file descriptors this process may use beside
    // PostgreSQL's own: said here once, with the figure and the setting to change (each run's
    // summary says it again).
    if let (_, Some(note)) = crate::fd_budget::call_slots(crate::settings::tunables().concurrency) {
        pgrx::warning!("evoq worker: {note}");
    }
    let mut worker = Worker::new();
    loop {
        // SAFETY: a flag PostgreSQL's SIGHUP handler sets; read and cleared on the main thread.
        if unsafe { pg_sys::ConfigReloadPending } != 0 {
            // SAFETY: the main thread, between transactions, as PostgreSQL's own workers do.
            unsafe {
                pg_sys::ConfigReloadPending = 0;
                pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP);
            }
            worker.reload();
        }
        worker.turn();
        shared::looped(worker.in_flight());
        let wait = worker.wait();
        if wait >= Duration::from_secs(1) {
            // Going to sleep: what the last transactions changed reaches the statistics now.
            // SAFETY: between transactions, on the main thread.
            unsafe { pg_sys::pgstat_report_stat(true) };
        }
        worker.heartbeat.sleeping(wait);
        sleep_on_latch(wait);
    }
}

/// Whether evoq's settings table exists here (the extension may not be installed yet).
fn pg_catalog_has_settings() -> bool {
    Spi::get_one::<bool>("SELECT pg_catalog.to_regclass('evoq.settings') IS NOT NULL")
        .ok()
        .flatten()
        .unwrap_or(false)
}
