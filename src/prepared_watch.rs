//! When the worker must look for rows although nothing woke it: a sign-up in a prepared
//! transaction. Pure logic, no pgrx.
//!
//! Its rows become visible at COMMIT PREPARED, which may come from any session, runs no trigger
//! and wakes nobody. So the worker watches: from the moment it learns of a prepared transaction
//! (the PREPARE's wake, counted in shared memory, or a look at `pg_prepared_xacts`) until
//! `WATCH` after the last time it saw one, every lane looks again at least every `POLL`.
//!
//! The watch outlives the prepared transaction on purpose. A cycle claims (finding nothing),
//! the COMMIT PREPARED lands, and the same cycle's end sees no transaction prepared any more:
//! a watch that ended with the last prepared transaction would let that lane sleep for its
//! full due time, a minute, with the sign-up visible and unclaimed (the clean-clone CI met
//! this: 5.4 s and more for a sign-up the worker takes in 1.3 s).

use std::time::{Duration, Instant};

/// How often the lanes look while the watch lasts.
pub const POLL: Duration = Duration::from_secs(1);
/// How long the watch lasts after the last sign of a prepared transaction.
pub const WATCH: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct PreparedWatch {
    /// The shared PREPARE counter as last seen.
    prepares_seen: u64,
    /// Until when the lanes look every POLL.
    until: Option<Instant>,
}

impl PreparedWatch {
    /// `prepares`: the shared counter now (PREPAREs before the worker started were seen by the
    /// look at `pg_prepared_xacts` at each cycle's end).
    pub fn new(prepares: u64) -> PreparedWatch {
        PreparedWatch {
            prepares_seen: prepares,
            until: None,
        }
    }

    /// The shared PREPARE counter as it is now: if it moved, a PREPARE TRANSACTION queued rows.
    pub fn counted(&mut self, prepares: u64, now: Instant) {
        if prepares != self.prepares_seen {
            self.prepares_seen = prepares;
            self.extend(now);
        }
    }

    /// What a look for prepared sign-ups found (the worker's `prepared_sign_ups`: at its start, at a
    /// cycle's end, and each second while a cycle runs and the watch lasts).
    pub fn looked(&mut self, prepared: bool, now: Instant) {
        if prepared {
            self.extend(now);
        }
    }

    fn extend(&mut self, now: Instant) {
        self.until = Some(now + WATCH);
    }

    /// Whether the watch lasts at `now`.
    pub fn watching(&self, now: Instant) -> bool {
        self.until.is_some_and(|until| now < until)
    }

    /// The latest a lane may look next, while the watch lasts (`None` once it has ended).
    pub fn look_by(&self, now: Instant) -> Option<Instant> {
        self.watching(now).then(|| now + POLL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_prepared_nothing_watched() {
        let mut w = PreparedWatch::new(7);
        let t = Instant::now();
        w.counted(7, t);
        w.looked(false, t);
        assert_eq!(w.look_by(t), None);
    }

    #[test]
    fn a_prepare_counted_has_the_lanes_look_every_poll_for_the_watch() {
        let mut w = PreparedWatch::new(0);
        let t = Instant::now();
        w.counted(1, t);
        assert_eq!(w.look_by(t), Some(t + POLL));
        assert!(w.watching(t) && !w.watching(t + WATCH));
        let later = t + WATCH - Duration::from_millis(1);
        assert_eq!(w.look_by(later), Some(later + POLL));
        assert_eq!(w.look_by(t + WATCH), None);
        // The counter did not move again: no new watch.
        w.counted(1, t + WATCH);
        assert_eq!(w.look_by(t + WATCH), None);
    }

    #[test]
    fn a_commit_prepared_between_a_cycles_claim_and_its_end_is_still_looked_for() {
        // A transaction prepared long ago (before the worker started, say: the counter never
        // moved) is seen at one cycle's end; the next cycle claims nothing, the COMMIT PREPARED
        // lands, and that cycle's end sees nothing prepared. The lanes must look again soon.
        let mut w = PreparedWatch::new(3);
        let t = Instant::now();
        w.counted(3, t);
        w.looked(true, t);
        let after_commit = t + POLL;
        w.looked(false, after_commit);
        assert_eq!(w.look_by(after_commit), Some(after_commit + POLL));
    }

    #[test]
    fn a_transaction_prepared_for_hours_is_watched_as_long_as_it_is_seen() {
        let mut w = PreparedWatch::new(0);
        let t = Instant::now();
        let mut now = t;
        for _ in 0..10 {
            now += WATCH; // each look comes a watch later: the last one keeps it going
            w.looked(true, now);
            assert_eq!(w.look_by(now), Some(now + POLL));
        }
        assert_eq!(w.look_by(now + WATCH), None);
    }
}
