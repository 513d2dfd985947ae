//! What the background worker shares with every backend through shared memory: its pid (so a
//! committed sign-up can wake it) and what `evoq_status` shows of it. Exists only when evoq is
//! in `shared_preload_libraries`; everywhere else `loaded()` is false and nothing here touches
//! shared memory.

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic, PgLwLock};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

const LISTENER_BYTES: usize = 64;
const ERROR_BYTES: usize = 512;

/// The worker's state as `evoq_status` shows it. Plain bytes: shared memory holds no pointers.
#[derive(Clone, Copy)]
pub struct WorkerState {
    started_at: i64,
    last_loop_at: i64,
    in_flight: i32,
    listener_len: usize,
    listener: [u8; LISTENER_BYTES],
    error_len: usize,
    error: [u8; ERROR_BYTES],
}

impl Default for WorkerState {
    fn default() -> Self {
        WorkerState {
            started_at: 0,
            last_loop_at: 0,
            in_flight: 0,
            listener_len: 0,
            listener: [0; LISTENER_BYTES],
            error_len: 0,
            error: [0; ERROR_BYTES],
        }
    }
}

// SAFETY: only integers and byte arrays, valid in any process that maps the segment.
unsafe impl PGRXSharedMemory for WorkerState {}

// SAFETY: the names are evoq's own.
static STATE: PgLwLock<WorkerState> = unsafe { PgLwLock::new(c"evoq worker state") };
/// The running worker's pid, 0 when none runs. An atomic of its own: a committing backend reads
/// it without taking a lock.
static PID: PgAtomic<AtomicI32> = unsafe { PgAtomic::new(c"evoq worker pid") };
/// Counts the wakes committing backends sent: the worker tells a sign-up (claim now) from its
/// own threads' signals (a result came back) by this moving.
static WAKES: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"evoq worker wakes") };
/// Counts the PREPARE TRANSACTIONs that queued rows: the worker watches for their COMMIT
/// PREPARED, which wakes nobody (see `wake_at_commit`).
static PREPARES: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"evoq worker prepares") };

/// Set in the postmaster by `request` (and so in every process it forks): the shared memory
/// above exists.
static LOADED: AtomicBool = AtomicBool::new(false);

/// Asks for the shared memory; only from `_PG_init` while shared_preload_libraries loads.
pub fn request() {
    pg_shmem_init!(STATE);
    pg_shmem_init!(PID);
    pg_shmem_init!(WAKES);
    pg_shmem_init!(PREPARES);
    LOADED.store(true, Ordering::SeqCst);
}

/// Whether evoq was loaded through shared_preload_libraries (the worker's shared memory exists).
pub fn loaded() -> bool {
    LOADED.load(Ordering::SeqCst)
}

fn now() -> i64 {
    // SAFETY: reads the clock.
    unsafe { pg_sys::GetCurrentTimestamp() }
}

fn copy_into(dst: &mut [u8], text: &str) -> usize {
    // Cut at a character boundary: the bytes are read back as UTF-8.
    let mut end = text.len().min(dst.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    dst[..end].copy_from_slice(&text.as_bytes()[..end]);
    end
}

/// How many wakes committing backends have sent so far.
pub fn wakes() -> u64 {
    if !loaded() {
        return 0;
    }
    WAKES.get().load(Ordering::SeqCst)
}

/// How many PREPARE TRANSACTIONs queued rows so far.
pub fn prepares() -> u64 {
    if !loaded() {
        return 0;
    }
    PREPARES.get().load(Ordering::SeqCst)
}

/// The worker announces itself (and its listener's address, if any).
pub fn started(pid: i32) {
    let mut s = STATE.exclusive();
    *s = WorkerState::default();
    s.started_at = now();
    s.last_loop_at = s.started_at;
    drop(s);
    PID.get().store(pid, Ordering::SeqCst);
}

/// The worker is gone (shutdown); a crash leaves the pid, which `kill` then reports as gone.
pub fn stopped() {
    PID.get().store(0, Ordering::SeqCst);
}

/// One turn of the main loop, with the calls it has in flight.
pub fn looped(in_flight: usize) {
    let mut s = STATE.exclusive();
    s.last_loop_at = now();
    s.in_flight = in_flight.min(i32::MAX as usize) as i32;
}

pub fn set_listener(address: Option<&str>) {
    let mut s = STATE.exclusive();
    let mut buf = [0u8; LISTENER_BYTES];
    s.listener_len = copy_into(&mut buf, address.unwrap_or(""));
    s.listener = buf;
}

pub fn set_error(message: &str) {
    let mut s = STATE.exclusive();
    let mut buf = [0u8; ERROR_BYTES];
    s.error_len = copy_into(&mut buf, message);
    s.error = buf;
}

/// Wakes the worker, if one runs: SIGUSR1 sets its latch (PostgreSQL's own handler), as
/// PostgreSQL wakes its logical replication launcher. Never fails the caller.
pub fn wake() {
    if !loaded() {
        return;
    }
    let pid = PID.get().load(Ordering::SeqCst);
    if pid > 0 {
        WAKES.get().fetch_add(1, Ordering::SeqCst);
        // SAFETY: a signal to a process of the same user; a worker that died returns ESRCH.
        unsafe {
            libc::kill(pid, libc::SIGUSR1);
        }
    }
}

thread_local! {
    /// A wake is already arranged for this transaction's commit.
    static ARMED: Cell<bool> = const { Cell::new(false) };
}

/// Wakes the worker when the current transaction commits (not before: it would claim before the
/// row is visible, and find nothing). Once per transaction, however many rows it queues.
pub fn wake_at_commit() {
    if !loaded() || ARMED.with(Cell::get) {
        return;
    }
    ARMED.with(|a| a.set(true));
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, || {
        ARMED.with(|a| a.set(false));
        wake();
    });
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Abort, || {
        ARMED.with(|a| a.set(false));
    });
    // PREPARE TRANSACTION ends neither way: the row becomes visible at COMMIT PREPARED, which
    // may come from another session and runs no callback of ours. The worker is woken now
    // anyway: it finds nothing yet, and PREPARES moving starts its watch (crate::prepared_watch),
    // every lane looking every second until well after no transaction is prepared any more.
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Prepare, || {
        ARMED.with(|a| a.set(false));
        PREPARES.get().fetch_add(1, Ordering::SeqCst);
        wake();
    });
}

fn timestamp(t: i64) -> Option<pgrx::datum::TimestampWithTimeZone> {
    (t != 0).then(|| {
        // SAFETY: a TimestampTz datum is its i64 value.
        unsafe { pgrx::datum::TimestampWithTimeZone::from_datum(pg_sys::Datum::from(t), false) }
            .unwrap_or_else(|| unreachable!("a non-null datum"))
    })
}

#[pg_schema]
mod evoq {
    use super::*;

    /// The background worker as `evoq_status` shows it. All NULL but `loaded` when evoq is
    /// not in shared_preload_libraries or no worker runs.
    #[allow(clippy::type_complexity)]
    #[pg_extern]
    #[search_path(pg_catalog, @extschema@, pg_temp)]
    fn _worker_state() -> TableIterator<
        'static,
        (
            name!(loaded, bool),
            name!(pid, Option<i32>),
            name!(started_at, Option<pgrx::datum::TimestampWithTimeZone>),
            name!(last_loop_at, Option<pgrx::datum::TimestampWithTimeZone>),
            name!(in_flight, Option<i32>),
            name!(listener, Option<String>),
            name!(last_error, Option<String>),
        ),
    > {
        if !loaded() {
            return TableIterator::once((false, None, None, None, None, None, None));
        }
        let pid = PID.get().load(Ordering::SeqCst);
        if pid <= 0 {
            return TableIterator::once((true, None, None, None, None, None, None));
        }
        let s = *STATE.share();
        let text = |bytes: &[u8]| {
            Some(String::from_utf8_lossy(bytes).into_owned()).filter(|t| !t.is_empty())
        };
        TableIterator::once((
            true,
            Some(pid),
            timestamp(s.started_at),
            timestamp(s.last_loop_at),
            Some(s.in_flight),
            text(&s.listener[..s.listener_len]),
            text(&s.error[..s.error_len]),
        ))
    }
}
