//! The main loop's heartbeat, which `GET /health` reports: the listener's threads answer
//! probes on their own, so without it a probe would say "ok" while the main loop (the only
//! thread that applies deliveries) is stuck.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// When the main loop last turned, shared with the listener. Cheap to clone (every clone is
/// the same heartbeat). A new heartbeat counts as a beat: the loop is starting.
#[derive(Clone)]
pub struct Heartbeat(Arc<Beat>);

struct Beat {
    /// Monotonic milliseconds (see `now_ms`) of the last beat.
    last_ms: AtomicU64,
    /// How much later than `stale_after` the next beat may come: the sleep announced by
    /// [`Heartbeat::sleeping`], 0 after [`Heartbeat::beat`].
    slack_ms: AtomicU64,
}

/// Milliseconds on a monotonic clock (from the first call in this process): a wall-clock
/// jump does not make the loop look stalled, or alive.
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let ms = EPOCH.get_or_init(Instant::now).elapsed().as_millis();
    u64::try_from(ms).unwrap_or(u64::MAX)
}

impl Heartbeat {
    pub fn new() -> Heartbeat {
        Heartbeat(Arc::new(Beat {
            last_ms: AtomicU64::new(now_ms()),
            slack_ms: AtomicU64::new(0),
        }))
    }

    /// The main loop is turning now. Call it at the start of every turn.
    pub fn beat(&self) {
        // `last` first: a probe reading between the two stores sees a fresh beat with the old
        // slack, which errs on the side of "ok" for a moment.
        self.0.last_ms.store(now_ms(), Ordering::SeqCst);
        self.0.slack_ms.store(0, Ordering::SeqCst);
    }

    /// The main loop is going to sleep on its latch for at most `wait`. A beat also, and the
    /// loop counts as stalled only `wait` later than it would after [`Heartbeat::beat`]: it
    /// sleeps because nothing is due, and a delivery wakes it at once (and it beats then).
    pub fn sleeping(&self, wait: Duration) {
        let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        self.0.slack_ms.store(wait_ms, Ordering::SeqCst);
        self.0.last_ms.store(now_ms(), Ordering::SeqCst);
    }

    /// Milliseconds since the last beat.
    pub fn ms_since_last(&self) -> u64 {
        now_ms().saturating_sub(self.0.last_ms.load(Ordering::SeqCst))
    }

    /// Whether the loop is late: no beat within `stale_after` (plus the sleep it announced).
    /// Also returns the milliseconds since the last beat.
    pub(super) fn stalled(&self, stale_after: Duration) -> (bool, u64) {
        let ago = self.ms_since_last();
        let slack = self.0.slack_ms.load(Ordering::SeqCst);
        let bound = u64::try_from(stale_after.as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(slack);
        (ago > bound, ago)
    }
}

impl Default for Heartbeat {
    fn default() -> Heartbeat {
        Heartbeat::new()
    }
}

/// Two handles are equal when they are the same heartbeat.
impl PartialEq for Heartbeat {
    fn eq(&self, other: &Heartbeat) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Heartbeat {}

impl std::fmt::Debug for Heartbeat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Heartbeat")
            .field("ms_since_last", &self.ms_since_last())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_is_stalled_when_its_beat_is_older_than_the_bound_plus_its_sleep() {
        let h = Heartbeat::new();
        let bound = Duration::from_millis(50);
        assert!(!h.stalled(bound).0, "new counts as a beat");
        std::thread::sleep(Duration::from_millis(80));
        let (stalled, ago) = h.stalled(bound);
        assert!(stalled && ago >= 80, "{ago}");
        h.beat();
        assert!(!h.stalled(bound).0);
        // Asleep for up to 10 s: not late 80 ms later.
        h.sleeping(Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(80));
        assert!(!h.stalled(bound).0);
        // Woken, and then stuck: the sleep's allowance is gone.
        h.beat();
        std::thread::sleep(Duration::from_millis(80));
        assert!(h.stalled(bound).0);
        assert_eq!(h, h.clone());
        assert_ne!(h, Heartbeat::new());
    }
}
