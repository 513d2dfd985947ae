//! A bounded pool of plain std threads for the HTTP calls of one run. Pure logic, no pgrx:
//! the worker threads must never touch Postgres, and this module cannot.
//!
//! The calling (backend) thread waits in short slices and runs `on_wait` between them; the
//! caller uses that to check for query cancel and statement_timeout. If `on_wait` unwinds (a
//! cancel), the pool is abandoned: workers finish the call in hand (bounded by the HTTP
//! timeout), take nothing new, and exit on their own; nobody waits for them.
//!
//! Two process-wide rules hold for every thread evoq starts here:
//! - it runs with every signal blocked (`spawn_with_signals_blocked`), so Postgres' signal
//!   handlers only ever run on the backend's main thread, which is the only thread they are
//!   written for;
//! - at most `MAX_LIVE_THREADS` pool threads are alive in one backend, counting the ones that
//!   earlier runs left behind, still waiting on a slow server until their HTTP timeout.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long the calling thread blocks before it runs `on_wait` again.
pub const WAIT_SLICE: Duration = Duration::from_millis(20);

/// The most pool threads alive at once in one backend process, leftovers of earlier runs
/// included.
///
/// `evoq.concurrency` tops out at 4096, so twice that lets one run have its full concurrency
/// while a whole pool left behind by the previous run (all its threads stuck on a slow server
/// until their HTTP timeout) is still draining. Beyond that, more threads only add load on a
/// server that is already not answering. Each thread costs a stack (`THREAD_STACK_BYTES`
/// reserved, the touched pages resident) and at most one reply in flight
/// (`evolution::MAX_REPLY_BYTES`, replies are small in practice).
pub const MAX_LIVE_THREADS: usize = 8_192;

/// The stack of a pool thread. An HTTP call (ureq, rustls, serde_json on a 1 MiB reply at most)
/// needs far less than Rust's default 2 MiB, and thousands of calls in flight mean thousands of
/// threads: reserved address space, of which only the touched pages cost memory.
pub const THREAD_STACK_BYTES: usize = 512 * 1024;

/// How long a pool thread waits for work before it ends.
///
/// Without it a pool's threads lived as long as the pool, and the background worker keeps one
/// pool for a whole cycle (up to `evoq.time_budget_ms`): after a burst at
/// `evoq.concurrency = 1000`, a thousand threads sat parked while the worker had nothing to do.
/// Within a drain a thread is never idle that long (the pipeline claims a replacement as soon
/// as a call finishes; the gap is one claim, milliseconds), so a busy pool never churns
/// threads. Between two waves of QR refreshes (`evoq.qr_refresh_interval_ms`, 20 s by default)
/// the threads do end, and the next wave starts them again: a thread costs tens of
/// microseconds to start, against its stack and bookkeeping held for the whole gap.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// The name of every pool thread, as `ps -L` and debuggers show it.
pub const WORKER_THREAD_NAME: &str = "evoq-http";

/// Starts a named thread with every signal blocked, and leaves the caller's signal mask as it
/// was.
///
/// A new thread inherits the signal mask of the thread that creates it, so the mask is set
/// *before* the thread exists: there is no moment in which the new thread could take a
/// signal. (Blocking from inside the new thread would leave a window between its start and
/// that call.) Postgres' handlers (SIGINT for cancel, SIGTERM, SIGUSR1 for latches and
/// barriers, SIGALRM for timeouts...) set flags and latches that only the main thread checks;
/// run on another thread they would corrupt its state or be lost. Signals the kernel cannot
/// block (SIGKILL, SIGSTOP) and the ones glibc keeps for itself are left alone, as they must.
///
/// Meant for every thread evoq starts: the HTTP pool here, and later a background worker's or
/// a listener's threads.
pub fn spawn_with_signals_blocked<F, T>(name: &str, f: F) -> std::io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    spawn_sized(name, None, f)
}

/// `spawn_with_signals_blocked` with a stack of `stack_size` bytes (None: Rust's default).
pub fn spawn_sized<F, T>(
    name: &str,
    stack_size: Option<usize>,
    f: F,
) -> std::io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let mut builder = std::thread::Builder::new().name(name.to_string());
    if let Some(bytes) = stack_size {
        builder = builder.stack_size(bytes);
    }
    let _restore = SignalMask::block_all()?;
    builder.spawn(f)
    // `_restore` drops here: the caller gets its own mask back once the thread has been
    // created with the full one.
}

/// The calling thread's signal mask as it was before `block_all`, put back on drop (also
/// when spawning fails or unwinds).
struct SignalMask {
    old: libc::sigset_t,
}

impl SignalMask {
    fn block_all() -> std::io::Result<SignalMask> {
        // SAFETY: sigset_t is plain data that sigfillset/pthread_sigmask initialise; both
        // pointers are to live locals.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            if libc::sigfillset(&mut all) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let rc = libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            if rc != 0 {
                return Err(std::io::Error::from_raw_os_error(rc));
            }
            Ok(SignalMask { old })
        }
    }
}

impl Drop for SignalMask {
    fn drop(&mut self) {
        // SAFETY: `old` was filled in by pthread_sigmask in `block_all`.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut());
        }
    }
}

/// A count of live threads with a hard cap. One process-wide instance (`GLOBAL_BUDGET`) serves
/// every pool; tests give a pool a small one of its own.
struct ThreadBudget {
    cap: usize,
    live: AtomicUsize,
    /// The highest `live` ever reached, for tests and diagnostics.
    peak: AtomicUsize,
    /// What the last thread to end runs: `give_back_memory` for the process-wide budget; the
    /// tests' own budgets run nothing, or a probe of their own.
    when_empty: Option<fn()>,
}

static GLOBAL_BUDGET: ThreadBudget = ThreadBudget {
    when_empty: Some(give_back_memory),
    ..ThreadBudget::new(MAX_LIVE_THREADS)
};

impl ThreadBudget {
    const fn new(cap: usize) -> ThreadBudget {
        ThreadBudget {
            cap,
            live: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            when_empty: None,
        }
    }

    /// One slot, or None when `cap` threads are alive. Taken before a thread is started and
    /// given back when it ends, so `live` never exceeds `cap`, even for a moment.
    fn try_take(&'static self) -> Option<BudgetSlot> {
        let mut live = self.live.load(Ordering::SeqCst);
        loop {
            if live >= self.cap {
                return None;
            }
            match self.live.compare_exchange_weak(
                live,
                live + 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => {
                    self.peak.fetch_max(live + 1, Ordering::SeqCst);
                    return Some(BudgetSlot(self));
                }
                Err(now) => live = now,
            }
        }
    }
}

struct BudgetSlot(&'static ThreadBudget);

impl Drop for BudgetSlot {
    fn drop(&mut self) {
        let was = self.0.live.fetch_sub(1, Ordering::SeqCst);
        // The last pool thread of the process is ending: no call is in flight, a quiet moment
        // to hand back what the burst freed. (Another thread may start meanwhile; trimming
        // is safe alongside it, only less complete.)
        if was == 1 {
            if let Some(when_empty) = self.0.when_empty {
                when_empty();
            }
        }
    }
}

/// Returns the memory malloc holds free to the OS.
///
/// glibc gives each thread that allocates concurrently an arena of its own (up to 8 per core)
/// and keeps what is freed there for reuse: after a burst of calls, the replies, buffers and
/// TLS state of a thousand threads stay resident although nothing uses them.
/// `malloc_trim(0)` releases the free pages of every arena. It is MT-safe, takes each arena's
/// lock in turn (a few milliseconds on a large heap) and touches no Postgres state. Called
/// when the process's last pool thread ends; elsewhere it is only ever a saving, never needed
/// for correctness. Does nothing on a C library without it (musl).
pub fn give_back_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks malloc's own free lists, under its own locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Pool threads alive in this process right now, leftovers of earlier runs included.
pub fn live_threads() -> usize {
    GLOBAL_BUDGET.live.load(Ordering::SeqCst)
}

/// An item handed to the workers: its generation, its key, the work.
type Job<T> = (u64, u64, T);

/// Items waiting for a worker, and the pool's count of live workers, under one lock: a worker
/// decides to end (nothing queued, idle long enough) and leaves the count in the same step, so
/// `submit` never relies on a thread that is on its way out.
struct Queue<T> {
    state: Mutex<QueueState<T>>,
    /// Signalled when an item is queued or the pool is dropped.
    ready: Condvar,
}

struct QueueState<T> {
    jobs: VecDeque<Job<T>>,
    /// The pool is gone: workers end once they see it.
    closed: bool,
    /// This pool's live workers, counted from just before they start until they leave.
    workers: usize,
}

impl<T> Queue<T> {
    fn new() -> Queue<T> {
        Queue {
            state: Mutex::new(QueueState {
                jobs: VecDeque::new(),
                closed: false,
                workers: 0,
            }),
            ready: Condvar::new(),
        }
    }

    /// The lock is never held while work runs, so a panic cannot poison it with anything
    /// half-done; a poisoned lock is taken as it is.
    fn lock(&self) -> MutexGuard<'_, QueueState<T>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next item, waiting at most `idle` for one; None when the worker should end (idle
    /// that long, or the pool is gone), in which case it has left the count.
    fn next(&self, idle: Duration) -> Option<Job<T>> {
        let until = Instant::now() + idle;
        let mut state = self.lock();
        loop {
            if let Some(job) = state.jobs.pop_front() {
                return Some(job);
            }
            let left = until.saturating_duration_since(Instant::now());
            if state.closed || left.is_zero() {
                state.workers -= 1;
                return None;
            }
            state = self
                .ready
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// What a worker holds for its whole life; dropping it (the thread ends, or never started)
/// gives back the process-wide slot, and the pool's count if the worker had not left it.
struct WorkerLife<T> {
    _slot: BudgetSlot,
    queue: Arc<Queue<T>>,
    /// Still in the pool's count: the thread never started, or unwound.
    counted: bool,
}

impl<T> Drop for WorkerLife<T> {
    fn drop(&mut self) {
        if self.counted {
            self.queue.lock().workers -= 1;
        }
    }
}
/// A result: the generation and key of its item; None if the work panicked.
type Done<R> = (u64, u64, Option<R>);

/// Worker threads that take HTTP calls one at a time, as they come: a streaming pool. The
/// caller `submit`s an item whenever a slot is free and takes results as they arrive, so no call
/// waits for another (a batch that waits for its slowest call wastes the other slots: measured
/// on 0.1.0, 50 % of what the concurrency allows with one call in ten slow). A thread serves
/// item after item, so a long drain does not start thousands of threads (nor churn their stacks
/// and malloc arenas); one that found nothing to do for `IDLE_TIMEOUT` ends, so a pool kept
/// after a burst does not keep the burst's threads.
///
/// A pool starts up to `concurrency` threads, as items come, fewer when the process-wide cap
/// leaves less room; it keeps trying to start the missing ones while it waits, as leftovers of
/// earlier runs exit. `abandon` forgets everything submitted so far: items not started yet never
/// start, late answers are dropped.
pub struct Pool<T, R> {
    concurrency: usize,
    work: Arc<dyn Fn(T) -> R + Send + Sync>,
    queue: Arc<Queue<T>>,
    /// How long a worker waits for an item before it ends (`IDLE_TIMEOUT`; tests shorten it).
    idle_timeout: Duration,
    results_tx: mpsc::Sender<Done<R>>,
    results: mpsc::Receiver<Done<R>>,
    /// Items of this generation may start; bumped by `abandon` and when the pool is dropped, so
    /// an item still queued then is thrown away unstarted: nobody waits for its answer any more.
    generation: Arc<AtomicU64>,
    /// Submitted in the current generation and not yet received.
    in_flight: usize,
    /// Called by a worker after each result it sends (the background worker sets its latch).
    notify: Option<Arc<dyn Fn() + Send + Sync>>,
    budget: &'static ThreadBudget,
}

/// Abandons the pool's current generation when dropped (`run` returns or unwinds).
struct Abandon(Arc<AtomicU64>);

impl Drop for Abandon {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl<T: Send + 'static, R: Send + 'static> Pool<T, R> {
    pub fn new<F: Fn(T) -> R + Send + Sync + 'static>(concurrency: usize, work: F) -> Pool<T, R> {
        Pool::with_budget(concurrency, work, &GLOBAL_BUDGET, IDLE_TIMEOUT)
    }

    fn with_budget<F: Fn(T) -> R + Send + Sync + 'static>(
        concurrency: usize,
        work: F,
        budget: &'static ThreadBudget,
        idle_timeout: Duration,
    ) -> Pool<T, R> {
        let (results_tx, results) = mpsc::channel();
        Pool {
            concurrency: concurrency.max(1),
            work: Arc::new(work),
            queue: Arc::new(Queue::new()),
            idle_timeout,
            results_tx,
            results,
            generation: Arc::new(AtomicU64::new(1)),
            in_flight: 0,
            notify: None,
            budget,
        }
    }

    /// `notify` is called on the worker thread after each result is sent.
    pub fn with_notify(mut self, notify: Arc<dyn Fn() + Send + Sync>) -> Self {
        self.notify = Some(notify);
        self
    }

    /// This pool's live threads (at most `concurrency`; fewer while the process-wide cap is
    /// reached, or after `IDLE_TIMEOUT` without work).
    pub fn workers(&self) -> usize {
        self.queue.lock().workers
    }

    /// Items submitted (since the last `abandon`) whose results have not been received.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// How many items may be in flight at once.
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// Free slots: how many more items can be submitted without queueing behind others.
    pub fn room(&self) -> usize {
        self.concurrency.saturating_sub(self.in_flight)
    }

    /// Starts one worker if the budget has room; false if it has none (or the OS refused).
    fn spawn_worker(&mut self) -> bool {
        let Some(slot) = self.budget.try_take() else {
            return false;
        };
        self.queue.lock().workers += 1;
        let life = WorkerLife {
            _slot: slot,
            queue: self.queue.clone(),
            counted: true,
        };
        let (results, generation, work, notify, idle) = (
            self.results_tx.clone(),
            self.generation.clone(),
            self.work.clone(),
            self.notify.clone(),
            self.idle_timeout,
        );
        // On failure the closure, and with it `life`, is dropped: the slot and the count are
        // given back.
        spawn_sized(WORKER_THREAD_NAME, Some(THREAD_STACK_BYTES), move || {
            // `life` first: locals drop in reverse order, so the work (and with it the last
            // handle on the HTTP client, its kept-alive connections and their buffers) is freed
            // before `life` gives the slot back and the last thread trims malloc. Captured
            // variables would drop after the body's locals: the trim ran first and missed the
            // burst's buffers (measured: 254 MiB resident 60 s after 1000 calls, 48 MiB idle;
            // a malloc_trim from outside then brought it to 103 MiB).
            let mut life = life;
            let (results, generation, work, notify) = (results, generation, work, notify);
            loop {
                let Some((gen, key, item)) = life.queue.next(idle) else {
                    // `next` took it out of the count already.
                    life.counted = false;
                    return;
                };
                if generation.load(Ordering::SeqCst) != gen {
                    continue;
                }
                let result =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(item))).ok();
                if results.send((gen, key, result)).is_err() {
                    return;
                }
                if let Some(notify) = &notify {
                    notify();
                }
            }
        })
        .is_ok()
    }

    /// Starts workers until the pool has enough for what is in flight, or the budget is
    /// exhausted. Only while items wait: with none queued, every item in flight is in a
    /// worker's hands or answered.
    fn top_up(&mut self) {
        let wanted = self.concurrency.min(self.in_flight);
        loop {
            let short = {
                let state = self.queue.lock();
                !state.jobs.is_empty() && state.workers < wanted
            };
            if !short || !self.spawn_worker() {
                break;
            }
        }
    }

    /// Hands one item to the workers; its result comes back from `recv_timeout`/`try_recv`
    /// with `key`. Submitting more than `room()` items queues them behind the others.
    pub fn submit(&mut self, key: u64, item: T) {
        let gen = self.generation.load(Ordering::SeqCst);
        self.queue.lock().jobs.push_back((gen, key, item));
        self.queue.ready.notify_one();
        self.in_flight += 1;
        self.top_up();
    }

    /// The next result of the current generation, waiting at most `wait`. `Some((key, None))`:
    /// that item's work panicked. None: nothing arrived in time.
    pub fn recv_timeout(&mut self, wait: Duration) -> Option<(u64, Option<R>)> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let got = if left.is_zero() {
                self.results.try_recv().ok()
            } else {
                self.results.recv_timeout(left).ok()
            };
            match got {
                // A late answer of an abandoned generation is dropped.
                Some((gen, key, result)) if gen == self.generation.load(Ordering::SeqCst) => {
                    self.in_flight = self.in_flight.saturating_sub(1);
                    return Some((key, result));
                }
                Some(_) => continue,
                None => {
                    // Threads left behind by earlier runs may have exited since.
                    self.top_up();
                    return None;
                }
            }
        }
    }

    /// A result already there, without waiting.
    pub fn try_recv(&mut self) -> Option<(u64, Option<R>)> {
        self.recv_timeout(Duration::ZERO)
    }

    /// Forgets every item submitted so far: the ones not started never start, the answers of
    /// the ones in hand are dropped when they come.
    pub fn abandon(&mut self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.in_flight = 0;
    }

    /// Runs the work over `items` and returns the results in input order. Items not finished by
    /// `deadline` come back as None (a call in hand finishes alone; one not started yet never
    /// starts); a panicking item yields None. If `on_wait` unwinds (a cancel), the items are
    /// abandoned.
    pub fn run<W: FnMut()>(
        &mut self,
        items: Vec<T>,
        deadline: Option<Instant>,
        mut on_wait: W,
    ) -> Vec<Option<R>> {
        let total = items.len();
        let mut results: Vec<Option<R>> = (0..total).map(|_| None).collect();
        if total == 0 {
            return results;
        }
        let _abandon = Abandon(self.generation.clone());
        for (index, item) in items.into_iter().enumerate() {
            self.submit(index as u64, item);
        }
        let mut received = 0;
        while received < total && self.in_flight > 0 {
            let slice = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    left.min(WAIT_SLICE)
                }
                None => WAIT_SLICE,
            };
            match self.recv_timeout(slice) {
                Some((index, result)) => {
                    results[index as usize] = result;
                    received += 1;
                }
                None => on_wait(),
            }
        }
        self.in_flight = 0;
        results
    }
}

impl<T, R> Drop for Pool<T, R> {
    /// Workers finish the call in hand, take nothing new, and exit; nobody waits for them.
    fn drop(&mut self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        let unstarted = {
            let mut state = self.queue.lock();
            state.closed = true;
            std::mem::take(&mut state.jobs)
        };
        self.queue.ready.notify_all();
        // Dropped outside the lock: an item's drop is the caller's code.
        drop(unstarted);
    }
}

/// One batch on a pool of its own (see `Pool::run`); the tests' shorthand.
#[cfg(test)]
fn run<T, R, F, W>(
    items: Vec<T>,
    concurrency: usize,
    deadline: Option<Instant>,
    work: F,
    on_wait: W,
) -> Vec<Option<R>>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> R + Send + Sync + 'static,
    W: FnMut(),
{
    Pool::new(concurrency, work).run(items, deadline, on_wait)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn one_pool_serves_many_batches_with_the_same_threads() {
        let threads = Arc::new(Mutex::new(std::collections::HashSet::new()));
        let t = threads.clone();
        let mut pool = Pool::new(4, move |i: u32| {
            t.lock().unwrap().insert(std::thread::current().id());
            i + 1
        });
        for batch in 0..50u32 {
            let out = pool.run((0..20).map(|i| batch * 100 + i).collect(), None, || {});
            assert_eq!(
                out,
                (0..20)
                    .map(|i| Some(batch * 100 + i + 1))
                    .collect::<Vec<_>>()
            );
        }
        assert!(threads.lock().unwrap().len() <= 4);
    }

    #[test]
    fn a_late_answer_does_not_leak_into_the_next_batch() {
        let mut pool = Pool::new(2, |ms: u64| {
            std::thread::sleep(Duration::from_millis(ms));
            ms
        });
        let first = pool.run(
            vec![400, 1],
            Some(Instant::now() + Duration::from_millis(100)),
            || {},
        );
        assert_eq!(first, vec![None, Some(1)]);
        let second = pool.run(vec![2, 3], None, || {});
        assert_eq!(second, vec![Some(2), Some(3)]);
    }

    #[test]
    fn results_come_back_in_input_order() {
        let out = run((0..100).collect(), 8, None, |i: u32| i * 2, || {});
        assert_eq!(out, (0..100).map(|i| Some(i * 2)).collect::<Vec<_>>());
    }

    #[test]
    fn never_more_than_concurrency_at_once() {
        let live = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (l, p) = (live.clone(), peak.clone());
        run(
            (0..40).collect(),
            4,
            None,
            move |_: u32| {
                let now = l.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
                l.fetch_sub(1, Ordering::SeqCst);
            },
            || {},
        );
        assert_eq!(peak.load(Ordering::SeqCst), 4);
    }

    /// Waits (at most 10 s) until `count` reaches `n`: a rendezvous that only completes when the
    /// calls really run at the same time, with no wall-clock bound to flake on a busy machine.
    fn rendezvous(count: &AtomicUsize, n: usize) -> bool {
        count.fetch_add(1, Ordering::SeqCst);
        let until = Instant::now() + Duration::from_secs(10);
        while count.load(Ordering::SeqCst) < n {
            if Instant::now() > until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    #[test]
    fn calls_overlap() {
        let arrived = Arc::new(AtomicUsize::new(0));
        let a = arrived.clone();
        let out = run(
            (0..16).collect(),
            16,
            None,
            move |_: u32| rendezvous(&a, 16),
            || {},
        );
        assert!(
            out.iter().all(|met| *met == Some(true)),
            "not all 16 calls were in flight at once: {out:?}"
        );
    }

    #[test]
    fn a_panic_yields_none_for_that_item_only() {
        let out = run(
            (0..10).collect(),
            3,
            None,
            |i: u32| if i == 4 { panic!("boom") } else { i },
            || {},
        );
        assert_eq!(out[4], None);
        assert_eq!(out.iter().filter(|r| r.is_some()).count(), 9);
    }

    #[test]
    fn deadline_returns_unfinished_items_as_none() {
        let release = Arc::new(AtomicBool::new(false));
        let r = release.clone();
        let out = run(
            vec![false, true],
            2,
            Some(Instant::now() + Duration::from_millis(200)),
            move |blocks: bool| {
                // The blocking call runs until the test lets it go, long after the deadline.
                while blocks && !r.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                blocks
            },
            || {},
        );
        release.store(true, Ordering::SeqCst);
        assert_eq!(out, vec![Some(false), None]);
    }

    #[test]
    fn unwinding_out_of_on_wait_abandons_the_rest_promptly() {
        let started = Arc::new(AtomicUsize::new(0));
        let finished = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(AtomicBool::new(false));
        let (s, f, r) = (started.clone(), finished.clone(), release.clone());
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut waits = 0;
            run(
                (0..100).collect(),
                2,
                None,
                move |_: u32| {
                    s.fetch_add(1, Ordering::SeqCst);
                    // Calls in hand block until the test releases them: the cancel cannot
                    // have waited for them if it returns while they are still blocked.
                    while !r.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    f.fetch_add(1, Ordering::SeqCst);
                },
                || {
                    waits += 1;
                    if waits == 3 {
                        panic!("cancel");
                    }
                },
            )
        }));
        assert!(caught.is_err());
        assert_eq!(
            finished.load(Ordering::SeqCst),
            0,
            "the cancel waited for calls in hand"
        );
        release.store(true, Ordering::SeqCst);
        let until = Instant::now() + Duration::from_secs(10);
        while finished.load(Ordering::SeqCst) < started.load(Ordering::SeqCst)
            && Instant::now() < until
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(50));
        // Only the calls in hand ran (at most the two workers'); nothing new was taken after.
        assert!(
            started.load(Ordering::SeqCst) <= 2,
            "{} calls started",
            started.load(Ordering::SeqCst)
        );
    }

    /// What Postgres installs handlers for, and so must never see delivered to a worker.
    const PG_SIGNALS: [libc::c_int; 6] = [
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGALRM,
        libc::SIGHUP,
    ];

    /// The calling thread's mask: for each signal 1..=64, whether it is blocked.
    fn mask_now() -> Vec<bool> {
        // SAFETY: a query of the current mask into a local.
        unsafe {
            let mut cur: libc::sigset_t = std::mem::zeroed();
            assert_eq!(
                libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut cur),
                0
            );
            (1..=64).map(|s| libc::sigismember(&cur, s) == 1).collect()
        }
    }

    fn blocked_now(signal: libc::c_int) -> bool {
        mask_now()[signal as usize - 1]
    }

    fn pg_signals_blocked_here() -> bool {
        PG_SIGNALS.iter().all(|&s| blocked_now(s))
    }

    #[test]
    fn a_spawned_thread_starts_with_every_signal_blocked() {
        let handle = spawn_with_signals_blocked("evoq-test", || {
            (
                PG_SIGNALS.map(blocked_now),
                std::thread::current().name().map(str::to_string),
            )
        })
        .unwrap();
        let (blocked, name) = handle.join().unwrap();
        assert_eq!(
            blocked, [true; 6],
            "SIGINT, SIGTERM, SIGUSR1, SIGUSR2, SIGALRM, SIGHUP"
        );
        assert_eq!(name.as_deref(), Some("evoq-test"));
    }

    #[test]
    fn spawning_leaves_the_callers_mask_as_it_was() {
        // A mask that is neither empty nor full, so "unchanged" cannot pass by accident.
        // SAFETY: changes this test thread's own mask and puts it back at the end.
        let old = unsafe {
            let mut only_usr2: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut only_usr2);
            libc::sigaddset(&mut only_usr2, libc::SIGUSR2);
            assert_eq!(
                libc::pthread_sigmask(libc::SIG_SETMASK, &only_usr2, &mut old),
                0
            );
            old
        };
        let before = mask_now();
        let worker_blocked = spawn_with_signals_blocked("evoq-test", pg_signals_blocked_here)
            .unwrap()
            .join()
            .unwrap();
        let after = mask_now();
        // SAFETY: restores the mask saved above.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
        assert!(worker_blocked);
        assert_eq!(before, after);
        assert!(after[libc::SIGUSR2 as usize - 1]);
        assert!(!after[libc::SIGINT as usize - 1]);
    }

    #[test]
    fn pool_workers_block_signals_and_carry_the_evoq_name() {
        let out = run(
            (0..8).collect(),
            4,
            None,
            |_: u32| {
                (
                    pg_signals_blocked_here(),
                    std::thread::current().name() == Some(WORKER_THREAD_NAME),
                )
            },
            || {},
        );
        assert!(out.iter().all(|r| *r == Some((true, true))), "{out:?}");
    }

    /// A budget of its own, so tests running in parallel do not share the process-wide count.
    fn budget(cap: usize) -> &'static ThreadBudget {
        Box::leak(Box::new(ThreadBudget::new(cap)))
    }

    // The cap leaves room for one run at the highest evoq.concurrency (4096) plus a whole
    // pool left behind by the run before.
    const _: () = assert!(MAX_LIVE_THREADS >= 2 * 4_096);

    #[test]
    fn a_pool_works_with_fewer_threads_than_asked_and_never_exceeds_the_cap() {
        let budget = budget(3);
        let live = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (l, p) = (live.clone(), peak.clone());
        let mut pool = Pool::with_budget(
            8,
            move |i: u32| {
                let now = l.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(10));
                l.fetch_sub(1, Ordering::SeqCst);
                i
            },
            budget,
            IDLE_TIMEOUT,
        );
        let out = pool.run((0..30).collect(), None, || {});
        assert_eq!(out, (0..30).map(Some).collect::<Vec<_>>());
        assert_eq!(pool.workers(), 3);
        assert_eq!(budget.peak.load(Ordering::SeqCst), 3);
        assert!(peak.load(Ordering::SeqCst) <= 3);
    }

    #[test]
    fn with_the_cap_taken_by_leftovers_a_run_still_returns_by_its_deadline() {
        let budget = budget(2);
        let release = Arc::new(AtomicBool::new(false));
        // A run whose two calls hang past its deadline: its threads are left behind.
        let r = release.clone();
        let mut first = Pool::with_budget(
            2,
            move |_: u32| {
                while !r.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            },
            budget,
            IDLE_TIMEOUT,
        );
        let out = first.run(
            vec![1, 2],
            Some(Instant::now() + Duration::from_millis(50)),
            || {},
        );
        assert_eq!(out, vec![None, None]);
        drop(first);
        assert_eq!(budget.live.load(Ordering::SeqCst), 2);

        // The next run gets no thread at all: it waits (still calling on_wait, so a cancel
        // would be honoured) and returns at its deadline with everything unserved.
        let mut second = Pool::with_budget(2, |i: u32| i, budget, IDLE_TIMEOUT);
        let mut waits = 0;
        let started = Instant::now();
        let out = second.run(
            vec![1, 2, 3],
            Some(Instant::now() + Duration::from_millis(200)),
            || waits += 1,
        );
        let took = started.elapsed();
        assert_eq!(out, vec![None, None, None]);
        assert!(
            took >= Duration::from_millis(190) && took < Duration::from_millis(1000),
            "took {took:?}"
        );
        assert!(waits >= 5, "on_wait ran {waits} times");
        assert_eq!(second.workers(), 0);

        // Once the leftovers exit, the same pool gets its threads and serves the next batch.
        release.store(true, Ordering::SeqCst);
        let out = second.run(
            vec![4, 5, 6],
            Some(Instant::now() + Duration::from_secs(5)),
            || {},
        );
        assert_eq!(out, vec![Some(4), Some(5), Some(6)]);
        assert_eq!(budget.peak.load(Ordering::SeqCst), 2, "never above the cap");
    }

    /// Waits (at most 10 s) until `f` holds; how long that took.
    fn until(f: impl Fn() -> bool) -> Option<Duration> {
        let started = Instant::now();
        while !f() {
            if started.elapsed() > Duration::from_secs(10) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Some(started.elapsed())
    }

    #[test]
    fn after_a_burst_idle_threads_end_and_the_pool_serves_again() {
        const N: usize = 64;
        let budget = budget(MAX_LIVE_THREADS);
        let arrived = Arc::new(AtomicUsize::new(0));
        let a = arrived.clone();
        let mut pool = Pool::with_budget(
            N,
            // Every call waits for all N: the burst really has N threads.
            move |_: u32| rendezvous(&a, N),
            budget,
            Duration::from_millis(200),
        );
        let out = pool.run((0..N as u32).collect(), None, || {});
        assert!(out.iter().all(|met| *met == Some(true)), "{out:?}");
        assert_eq!(budget.peak.load(Ordering::SeqCst), N);

        // The pool is kept (the worker keeps its pool for a whole cycle), yet its threads end.
        let took = until(|| budget.live.load(Ordering::SeqCst) == 0);
        assert!(
            took.is_some(),
            "{} threads still alive long after the idle timeout",
            budget.live.load(Ordering::SeqCst)
        );
        assert_eq!(pool.workers(), 0);

        // The next burst starts them again.
        arrived.store(0, Ordering::SeqCst);
        let out = pool.run((0..N as u32).collect(), None, || {});
        assert!(out.iter().all(|met| *met == Some(true)), "{out:?}");
        assert_eq!(pool.workers(), N);
    }

    #[test]
    fn an_item_submitted_as_the_workers_time_out_is_still_served() {
        let budget = budget(MAX_LIVE_THREADS);
        // Idle timeouts of a millisecond or so, and gaps around that: submissions keep landing
        // while workers are deciding to end.
        let mut pool = Pool::with_budget(4, |i: u32| i, budget, Duration::from_millis(1));
        for i in 0..300u32 {
            std::thread::sleep(Duration::from_micros(u64::from(i % 7) * 300));
            let out = pool.run(
                vec![i, i + 1],
                Some(Instant::now() + Duration::from_secs(5)),
                || {},
            );
            assert_eq!(out, vec![Some(i), Some(i + 1)], "round {i}");
        }
        assert!(until(|| budget.live.load(Ordering::SeqCst) == 0).is_some());
    }

    #[test]
    fn items_still_queued_when_a_batch_ends_are_never_started() {
        let started = Arc::new(AtomicUsize::new(0));
        let s = started.clone();
        let mut pool = Pool::new(1, move |i: u32| {
            s.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(150));
            i
        });
        let out = pool.run(
            (0..5).collect(),
            Some(Instant::now() + Duration::from_millis(50)),
            || {},
        );
        assert_eq!(out, vec![None; 5]);
        // The pool stays alive (a caller recording its results), yet the four unstarted
        // items are dropped rather than called for nobody.
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(started.load(Ordering::SeqCst), 1);
        assert_eq!(pool.run(vec![7], None, || {}), vec![Some(7)]);
    }

    /// Set when the work of `the_last_thread_trims_after_the_work_is_freed` is dropped.
    static WORK_FREED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    /// What that test's "trim" saw: 1 the work was still alive, 2 it was freed already.
    static TRIM_SAW: AtomicUsize = AtomicUsize::new(0);

    #[test]
    fn the_last_thread_trims_after_the_work_is_freed() {
        // The work owns what a burst leaves behind (the HTTP client's kept-alive connections
        // and their buffers); trimming before it is freed gives nothing back.
        struct Owned;
        impl Drop for Owned {
            fn drop(&mut self) {
                WORK_FREED.store(true, Ordering::SeqCst);
            }
        }
        fn trim() {
            TRIM_SAW.store(
                if WORK_FREED.load(Ordering::SeqCst) {
                    2
                } else {
                    1
                },
                Ordering::SeqCst,
            );
        }
        let budget: &'static ThreadBudget = Box::leak(Box::new(ThreadBudget {
            when_empty: Some(trim),
            ..ThreadBudget::new(8)
        }));
        let owned = Owned;
        let mut pool = Pool::with_budget(
            2,
            move |i: u32| {
                let _ = &owned;
                std::thread::sleep(Duration::from_millis(100));
                i
            },
            budget,
            Duration::from_secs(10),
        );
        // Dropped while both calls are in hand (as when the worker's cycle ends, dropping its
        // pool, before its threads do): the threads then hold the last handles on the work.
        pool.submit(1, 1);
        pool.submit(2, 2);
        std::thread::sleep(Duration::from_millis(20));
        drop(pool);
        assert!(until(|| TRIM_SAW.load(Ordering::SeqCst) != 0).is_some());
        assert_eq!(
            TRIM_SAW.load(Ordering::SeqCst),
            2,
            "the trim ran before the work was freed"
        );
    }

    #[test]
    fn pool_threads_are_counted_process_wide() {
        let mut pool = Pool::new(3, |i: u32| i);
        assert_eq!(pool.run((0..6).collect(), None, || {}).len(), 6);
        assert_eq!(pool.workers(), 3);
        assert!(live_threads() >= 3);
        assert!(live_threads() <= MAX_LIVE_THREADS);
    }
}
