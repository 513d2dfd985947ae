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

use super::{connection_target, deliveries, shared, worker_settings, WorkerSettings, WORKER_TYPE};
use crate::jobs::process::QueueJob;
use crate::jobs::refresh::RefreshJob;
use crate::jobs::run::Run;
use crate::listener::{Listener, ListenerConfig};
use crate::pipeline::{Both, Grouping, Pipeline};
use crate::pool::Pool;
use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
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
/// Waiting deliveries applied per turn before the cycle gets its turn.
const DELIVERY_GROUPS_PER_TURN: usize = 8;

struct Worker {
    settings: WorkerSettings,
    listener: Option<Listener>,
    /// The address the listener failed to bind, and when to try again.
    listener_retry: Option<Instant>,
    cycle: Option<Cycle>,
    /// When the next cycle should start if nothing wakes the worker earlier.
    next_due: Instant,
    /// The sign-up counter as the worker last saw it.
    wakes_seen: u64,
    /// Set by the pool's and the listener's threads before they signal the main thread, so a
    /// burst of results costs one signal.
    signalled: Arc<AtomicBool>,
    /// Consecutive failed steps: the pause after an error grows with them.
    failures: u32,
    /// A webhook/set failed: repoints wait until then (a cycle would otherwise retry it at
    /// once, over and over, since the instance stays due).
    repoint_after: Instant,
}

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

/// Runs `f` in a transaction of its own and commits it; an error or a panic is caught, the
/// transaction aborted, and the message returned.
fn in_transaction<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    // SAFETY: the worker's main thread, between transactions; every path below ends the
    // transaction begun here.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
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
            cycle: None,
            next_due: Instant::now(),
            wakes_seen: shared::wakes(),
            signalled: Arc::new(AtomicBool::new(false)),
            failures: 0,
            repoint_after: Instant::now(),
        };
        w.open_listener();
        w
    }

    fn in_flight(&self) -> usize {
        self.cycle.as_ref().map_or(0, |c| c.pipe.in_flight())
    }

    /// Logs a failed step and remembers it for evoq_status; the cycle is given up.
    fn failed(&mut self, what: &str, message: String) {
        self.failures += 1;
        let message = format!("{what}: {message}");
        pgrx::warning!("evoq worker: {message}");
        shared::set_error(&message);
        // The cycle is given up: its calls in flight are abandoned with its pool, and the rows it
        // claimed and committed come due when their lease runs out.
        self.cycle = None;
        let pause = Duration::from_secs(1u64 << self.failures.min(5));
        self.next_due = Instant::now() + pause;
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
        if let Some(cycle) = self.cycle.as_mut() {
            cycle.pipe.stop("reload");
        }
        self.next_due = Instant::now();
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
        self.next_due = Instant::now();
    }

    /// One turn of the loop.
    fn turn(&mut self) {
        self.signalled.store(false, Ordering::SeqCst);
        self.take_deliveries();
        if self.listener.is_none() && self.listener_retry.is_some_and(|t| Instant::now() >= t) {
            self.open_listener();
        }
        if !self.settings.enabled {
            self.cycle = None;
            return;
        }
        let wakes = shared::wakes();
        let woken = wakes != self.wakes_seen;
        self.wakes_seen = wakes;
        match self.cycle.as_mut() {
            Some(cycle) if woken => cycle.pipe.rearm(),
            Some(_) => {}
            None if woken || Instant::now() >= self.next_due => self.start_cycle(),
            None => {}
        }
        if self.cycle.is_some() {
            self.step_cycle();
        }
    }

    /// Applies what the listener received, a group per transaction, and answers each delivery
    /// once its group committed.
    fn take_deliveries(&mut self) {
        let Some(listener) = self.listener.as_ref() else {
            return;
        };
        for _ in 0..DELIVERY_GROUPS_PER_TURN {
            let group: Vec<_> = std::iter::from_fn(|| listener.try_recv())
                .take(deliveries::GROUP)
                .collect();
            if group.is_empty() {
                return;
            }
            match in_transaction(|| deliveries::apply(group)) {
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
                    return;
                }
            }
        }
    }

    fn start_cycle(&mut self) {
        let signalled = self.signalled.clone();
        let commit_every = self.settings.commit_every;
        let repoint = Instant::now() >= self.repoint_after;
        let started = in_transaction(|| {
            if !installed_and_configured() {
                return None;
            }
            crate::jobs::run::require_working_attachments();
            let run = Run::start("process_queue");
            let t = run.tunables;
            let mut queue = QueueJob::start(run, t.lease_ms);
            if let Some(reason) = queue.ready() {
                // The circuit is open (or the server cannot be told): nothing is claimed until
                // the circuit's next probe.
                queue.finish(reason, 0);
                return Some(Err(circuit_probe_in()));
            }
            let refresh =
                RefreshJob::start(Run::start("refresh_qr"), t.qr_refresh_interval_ms, repoint);
            let work = Both::<QueueJob, RefreshJob>::work(queue.work(), refresh.work());
            let pool = Pool::new(t.concurrency, work).with_notify(signaller(signalled));
            let grouping = Grouping {
                size: t.batch_size.max(1) as usize,
                age: commit_every,
            };
            Some(Ok(Cycle {
                pipe: Pipeline::new(pool, grouping),
                jobs: Both {
                    first: queue,
                    second: refresh,
                },
                deadline: Instant::now() + t.time_budget,
            }))
        });
        match started {
            Ok(Some(Ok(cycle))) => {
                self.failures = 0;
                self.cycle = Some(cycle);
            }
            // Not installed or not configured here (yet): asleep until evoq_configure or a
            // sign-up wakes it, or a minute passes.
            Ok(None) => self.next_due = Instant::now() + MAX_SLEEP,
            Ok(Some(Err(wait))) => self.next_due = Instant::now() + wait,
            Err(message) => self.failed("starting a run", message),
        }
    }

    fn step_cycle(&mut self) {
        let Some(mut cycle) = self.cycle.take() else {
            return;
        };
        if Instant::now() >= cycle.deadline {
            // Calls in flight finish and are recorded; nothing new is claimed.
            cycle.pipe.stop("time_budget");
        }
        if cycle.pipe.wants_rows() {
            let Cycle { pipe, jobs, .. } = &mut cycle;
            // The claims commit before any call leaves: a call is never made for a claim that
            // rolled back.
            match in_transaction(|| pipe.claim(jobs)) {
                Ok(claimed) => {
                    pipe.launch(claimed);
                }
                Err(message) => {
                    self.cycle = Some(cycle);
                    return self.failed("claiming rows", message);
                }
            }
        }
        cycle.pipe.gather(Duration::ZERO);
        if cycle.pipe.group_due() {
            let Cycle { pipe, jobs, .. } = &mut cycle;
            // Each group is a transaction of its own: its results are recorded in a
            // subtransaction, so one that cannot be stored fails alone.
            jobs.first.run.reset_protection();
            jobs.second.run.reset_protection();
            if let Err(message) = in_transaction(|| pipe.flush(jobs)) {
                self.cycle = Some(cycle);
                return self.failed("recording results", message);
            }
        }
        if !cycle.pipe.finished() {
            self.cycle = Some(cycle);
            return;
        }
        self.finish_cycle(cycle);
    }

    fn finish_cycle(&mut self, cycle: Cycle) {
        let Cycle { pipe, jobs, .. } = cycle;
        let stopped = pipe.stopped().unwrap_or("drained");
        let (claimed, groups) = (pipe.claimed, pipe.groups);
        drop(pipe);
        if jobs.second.repoint_failed() {
            self.repoint_after = Instant::now() + REPOINT_PAUSE;
        }
        let repoint = Instant::now() >= self.repoint_after;
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
        match finished {
            Ok(due_in) => {
                self.failures = 0;
                let mut wait = due_in.min(MAX_SLEEP);
                if claimed == 0 {
                    wait = wait.max(EMPTY_CYCLE_PAUSE);
                }
                self.next_due = Instant::now() + wait;
            }
            Err(message) => self.failed("finishing a run", message),
        }
    }

    /// How long the latch wait may last.
    fn wait(&self) -> Duration {
        match &self.cycle {
            Some(c) if c.pipe.in_flight() > 0 => c
                .pipe
                .group_due_in()
                .unwrap_or(Duration::from_secs(1))
                .min(Duration::from_secs(1)),
            Some(_) => Duration::ZERO,
            None if !self.settings.enabled => MAX_SLEEP,
            None => self.next_due.saturating_duration_since(Instant::now()),
        }
    }

    /// SIGTERM: calls in flight are abandoned (their rows come due by lease), the listener
    /// stops (deliveries not yet applied get a 503 and are sent again).
    fn shutdown(self) {
        if let Some(listener) = self.listener {
            listener.stop();
        }
        drop(self.cycle);
    }
}

/// Whether this database has evoq, configured: the worker has nothing to do otherwise.
fn installed_and_configured() -> bool {
    Spi::get_one::<bool>(
        "SELECT pg_catalog.to_regclass('evoq.settings') IS NOT NULL
            AND EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'evoq')",
    )
    .ok()
    .flatten()
    .unwrap_or(false)
        && Spi::get_one::<bool>("SELECT EXISTS (SELECT 1 FROM evoq.settings)")
            .ok()
            .flatten()
            .unwrap_or(false)
}

/// How long until the circuit's next probe (at least a second, at most `MAX_SLEEP`).
fn circuit_probe_in() -> Duration {
    let ms = Spi::get_one::<f64>(
        "SELECT extract(epoch FROM next_probe_at - clock_timestamp()) * 1000 FROM evoq.circuit",
    )
    .ok()
    .flatten()
    .unwrap_or(1000.0);
    Duration::from_millis(ms.clamp(1000.0, MAX_SLEEP.as_millis() as f64) as u64)
}

/// How long until the next row is due for either job (zero if one is due now).
fn next_due_in(repoint: bool) -> Duration {
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
    Duration::from_millis(ms.clamp(0.0, MAX_SLEEP.as_millis() as f64) as u64)
}

/// The worker process's entry point (named in its registration).
#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn evoq_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // A query cancel means nothing to the worker, and raised outside a transaction it would end
    // the process: pg_cancel_backend() on it is ignored.
    // SAFETY: installs SIG_IGN for SIGINT, on the main thread.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let (database, role) = connection_target();
    BackgroundWorker::connect_worker_to_spi(Some(&database), role.as_deref());
    // A step waiting on a row lock (a delivery behind a pg_cron run holding the row) gives up
    // after this, so SIGTERM is honoured soon and other deliveries are not held up; the step's
    // work is done again later (the Evolution server resends an unacknowledged delivery).
    // SAFETY: sets a setting of this session, outside any transaction.
    unsafe {
        pg_sys::SetConfigOption(
            c"lock_timeout".as_ptr(),
            c"2s".as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
        )
    };
    // SAFETY: reads the process id.
    let pid = unsafe { libc::getpid() };
    shared::started(pid);
    log!("{WORKER_TYPE} started in database {database} (pid {pid})");
    let mut worker = Worker::new();
    loop {
        if BackgroundWorker::sighup_received() {
            // SAFETY: the main thread, between transactions, as PostgreSQL's own workers do.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
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
        // False on SIGTERM or when the postmaster died.
        if !BackgroundWorker::wait_latch(Some(wait)) {
            break;
        }
    }
    worker.shutdown();
    shared::stopped();
    log!("{WORKER_TYPE} stopped");
    // Exit status 1: the postmaster starts the worker again after its restart time, so a
    // pg_terminate_backend() restarts it rather than removing it for good (0 would); when the
    // server is shutting down nothing is restarted anyway. evoq.worker = off is how to stop it.
    // SAFETY: ends the process the way PostgreSQL's own workers do.
    unsafe { pg_sys::proc_exit(1) };
}
