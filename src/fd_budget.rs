//! How many HTTP calls this process may have in flight without taking the file descriptors
//! PostgreSQL counts on. Pure logic, no pgrx.
//!
//! Debian starts PostgreSQL with a soft open-files limit of 1024 (the hard one is usually
//! 524288). At `evoq.concurrency = 1000` a backend ran out: a tenth of the calls failed, and
//! the backend itself could no longer load llvmjit.so ("Too many open files"). PostgreSQL
//! budgets its own files once, in the postmaster, from `max_files_per_process` and the soft
//! limit it started with; each backend's fd.c keeps its files under that figure and knows
//! nothing of evoq's sockets. So:
//! - the soft limit is raised toward the hard one, as far as the calls need (`raise_toward`);
//!   PostgreSQL never uses the extra, so it is evoq's;
//! - what PostgreSQL may use, up to the limit it started with (`Limits::postgres_soft`), is
//!   never evoq's. If the limit cannot be raised far enough, evoq takes at most half of the
//!   descriptors still free, so the backend keeps room for what it opens without fd.c's
//!   help (a library it loads, a file it reads);
//! - what is left caps the calls in flight, and says so with the figures and what to change.
//!
//! (PostgreSQL 13+'s AcquireExternalFD() is for the backend's main thread and caps one user at
//! a third of its budget: a few hundred calls, from threads it does not know of. The extra
//! above PostgreSQL's own limit is the room it leaves unused.)

use std::sync::OnceLock;

/// Descriptors one call in flight may hold: its connection, and a kept-alive connection of
/// the process's other client idle meanwhile (the background worker runs its sign-ups and its
/// QR refreshes on two clients over one pool, and each keeps up to `evoq.concurrency`
/// connections for reuse).
pub const DESCRIPTORS_PER_CALL: usize = 2;

/// Descriptors kept aside besides the calls: name lookups (one at a time per client, a few
/// descriptors each: /etc/hosts, the name server's socket), the worker's latch and listener
/// socket.
pub const RESERVED: usize = 16;

/// The open-files limits of this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The soft limit PostgreSQL started with: its own files stay within it.
    pub postgres_soft: u64,
    pub soft: u64,
    pub hard: u64,
}

/// Descriptors open in this process now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Open {
    pub all: usize,
    /// Sockets: evoq's connections (and the backend's own few, counted as evoq's to be safe).
    pub sockets: usize,
}

/// How many calls may be in flight of the `requested`, with these limits and this many
/// descriptors open; when that is fewer than requested, a line that says why and what to
/// change. Never fewer than one: a call that finds no descriptor fails on its own, and a run
/// that can make none would never say so.
pub fn slots(requested: usize, limits: Limits, open: Open) -> (usize, Option<String>) {
    let requested = requested.max(1);
    let soft = limits.soft as usize;
    // Above what PostgreSQL started with: evoq's, less what its sockets already hold.
    let above_postgres = soft
        .saturating_sub(limits.postgres_soft as usize)
        .saturating_sub(open.sockets);
    // Otherwise half of what is free, the other half left to the backend.
    let half_of_free = soft.saturating_sub(open.all) / 2;
    let room = above_postgres.max(half_of_free).saturating_sub(RESERVED);
    let allowed = (room / DESCRIPTORS_PER_CALL).clamp(1, requested);
    if allowed >= requested {
        return (requested, None);
    }
    let hard = if limits.hard == libc::RLIM_INFINITY {
        "unlimited".to_string()
    } else {
        limits.hard.to_string()
    };
    let note = format!(
        "calls in flight capped at {allowed} of evoq.concurrency = {requested}: this PostgreSQL \
         process may open {soft} files (soft limit; hard limit {hard}; PostgreSQL started with \
         {}) and has {} open, {DESCRIPTORS_PER_CALL} per call; raise the open files limit of \
         the PostgreSQL service (LimitNOFILE= in its systemd unit, ulimit -n where it starts) \
         or lower evoq.concurrency",
        limits.postgres_soft, open.all
    );
    (allowed, Some(note))
}

/// The soft limit a run at `requested` calls needs, given the limit PostgreSQL started with
/// and the sockets evoq holds already.
pub fn needed_soft_limit(requested: usize, postgres_soft: u64, open: Open) -> u64 {
    postgres_soft + (open.sockets + RESERVED + requested.max(1) * DESCRIPTORS_PER_CALL) as u64
}

/// This process's soft and hard open-files limits.
fn current() -> std::io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills in the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((limit.rlim_cur, limit.rlim_max))
}

/// Raises the soft open-files limit to `target`, or as near as the hard limit allows; never
/// lowers it. Returns the soft and hard limits after.
pub fn raise_toward(target: u64) -> std::io::Result<(u64, u64)> {
    let (soft, hard) = current()?;
    let target = target.min(hard);
    if target <= soft {
        return Ok((soft, hard));
    }
    let limit = libc::rlimit {
        rlim_cur: target,
        rlim_max: hard,
    };
    // SAFETY: sets this process's own limit from a live struct; an unprivileged process may
    // raise its soft limit up to the hard one.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    current()
}

/// The descriptors open in this process, from /proc/self/fd (None where there is no /proc).
pub fn count_open() -> Option<Open> {
    let entries = std::fs::read_dir("/proc/self/fd").ok()?;
    let mut open = Open { all: 0, sockets: 0 };
    for entry in entries.flatten() {
        open.all += 1;
        let target = std::fs::read_link(entry.path()).unwrap_or_default();
        if target.to_string_lossy().starts_with("socket:") {
            open.sockets += 1;
        }
    }
    // The directory being read was one of them.
    open.all = open.all.saturating_sub(1);
    Some(open)
}

/// The soft limit as this process first saw it, before evoq raised it: what PostgreSQL
/// started with and budgets its own files under.
fn postgres_soft_limit(seen_now: u64) -> u64 {
    static FIRST: OnceLock<u64> = OnceLock::new();
    *FIRST.get_or_init(|| seen_now)
}

/// How many of `requested` calls may be in flight in this process, raising the soft
/// open-files limit first if that lets more run; and, when fewer than requested, the line that
/// says why (for the run's notes, evoq_status and the worker's log).
pub fn call_slots(requested: usize) -> (usize, Option<String>) {
    let Ok((soft, _)) = current() else {
        return (requested, None);
    };
    let postgres_soft = postgres_soft_limit(soft);
    // Without /proc: as if PostgreSQL used all it may.
    let open = count_open().unwrap_or(Open {
        all: postgres_soft as usize,
        sockets: 0,
    });
    let (soft, hard) = raise_toward(needed_soft_limit(requested, postgres_soft, open))
        .or_else(|_| current())
        .unwrap_or((soft, soft));
    slots(
        requested,
        Limits {
            postgres_soft,
            soft,
            hard,
        },
        open,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(postgres_soft: u64, soft: u64, hard: u64) -> Limits {
        Limits {
            postgres_soft,
            soft,
            hard,
        }
    }

    fn open(all: usize, sockets: usize) -> Open {
        Open { all, sockets }
    }

    #[test]
    fn a_raised_limit_runs_everything_asked() {
        let (n, note) = slots(1000, limits(1024, 524_288, 524_288), open(40, 2));
        assert_eq!((n, note), (1000, None));
        // Just enough: what needed_soft_limit asks for.
        let need = needed_soft_limit(1000, 1024, open(40, 2));
        assert_eq!(
            slots(1000, limits(1024, need, need), open(40, 2)),
            (1000, None)
        );
        assert!(slots(1000, limits(1024, need - 1, need), open(40, 2)).0 < 1000);
    }

    #[test]
    fn debians_1024_unraised_caps_at_half_of_what_is_free_and_says_what_to_change() {
        let (n, note) = slots(1000, limits(1024, 1024, 1024), open(40, 2));
        // (1024 - 40) / 2 = 492 for evoq, less 16 reserved, 2 per call.
        assert_eq!(n, 238);
        let note = note.unwrap();
        for part in [
            "capped at 238 of evoq.concurrency = 1000",
            "may open 1024 files",
            "hard limit 1024",
            "has 40 open",
            "LimitNOFILE",
            "ulimit -n",
        ] {
            assert!(note.contains(part), "{part:?} not in {note}");
        }
        // What PostgreSQL keeps: everything evoq may take leaves it more than half the free.
        assert!(1024 - 40 - n * DESCRIPTORS_PER_CALL >= (1024 - 40) / 2);
    }

    #[test]
    fn a_small_raise_is_never_worse_than_none() {
        let none = slots(1000, limits(1024, 1024, 1024), open(40, 2)).0;
        let small = slots(1000, limits(1024, 1100, 1100), open(40, 2)).0;
        assert!(small >= none, "{small} < {none}");
    }

    #[test]
    fn postgres_share_is_never_evoqs_and_evoqs_own_sockets_count() {
        // Raised by 2000 over PostgreSQL's 1024; 300 sockets of an earlier run still open.
        let (n, _) = slots(4096, limits(1024, 3024, 3024), open(340, 300));
        assert_eq!(n, (2000 - 300 - RESERVED) / DESCRIPTORS_PER_CALL);
    }

    #[test]
    fn with_nothing_free_one_call_still_runs() {
        let (n, note) = slots(16, limits(1024, 1024, 1024), open(1024, 0));
        assert_eq!(n, 1);
        assert!(note.is_some());
        assert_eq!(slots(1, limits(1024, 1024, 1024), open(1024, 0)), (1, None));
    }

    #[test]
    fn an_unlimited_hard_limit_reads_as_such() {
        let (_, note) = slots(1000, limits(64, 64, libc::RLIM_INFINITY), open(40, 0));
        assert!(note.unwrap().contains("hard limit unlimited"));
    }

    #[test]
    fn open_descriptors_are_counted_sockets_apart() {
        let before = count_open().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let file = std::fs::File::open("/proc/self/status").unwrap();
        let after = count_open().unwrap();
        // Other tests open and close descriptors meanwhile: at least ours are seen.
        assert!(
            after.sockets >= 1 && after.all >= 2,
            "{before:?} → {after:?}"
        );
        assert!(after.sockets <= after.all);
        drop((listener, file));
    }

    #[test]
    fn the_soft_limit_is_raised_toward_the_hard_one_and_never_lowered() {
        let (soft, hard) = current().unwrap();
        // Make room to raise into: a little below the current soft limit, so tests running
        // alongside keep plenty.
        let lowered = soft - 64.min(soft / 2);
        let limit = libc::rlimit {
            rlim_cur: lowered,
            rlim_max: hard,
        };
        // SAFETY: this process's own limit, from a live struct.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
        assert_eq!(current().unwrap(), (lowered, hard));
        assert_eq!(raise_toward(lowered + 10).unwrap(), (lowered + 10, hard));
        // Never lowered; never past the hard limit.
        assert_eq!(raise_toward(lowered).unwrap(), (lowered + 10, hard));
        assert_eq!(raise_toward(soft).unwrap(), (soft, hard));
        assert_eq!(raise_toward(u64::MAX).unwrap().0, hard);
    }

    #[test]
    fn in_this_process_a_few_calls_fit() {
        assert_eq!(call_slots(4), (4, None));
    }
}
