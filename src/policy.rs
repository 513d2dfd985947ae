//! The retry policy: what happens to a queue row after a failed attempt. Pure logic, no pgrx.
//!
//! Backoff is exponential with "equal jitter" (half the delay fixed, half random) and a cap, so
//! a burst of rows that failed together does not come back as a burst. Errors that cannot
//! succeed on retry (400, 401...) fail the row at once; the operator fixes the cause and calls
//! `evoq_retry()`.

use crate::evolution::{ApiError, ErrorKind};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base: Duration,
    pub cap: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Back to `pending`, due again after this delay.
    RetryAfter(Duration),
    /// `failed` for good (until `evoq_retry`).
    GiveUp,
}

impl RetryPolicy {
    /// The delay before attempt `attempt + 1`, without jitter: base × 2^(attempt-1), capped.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(40);
        let ms = (self.base.as_millis() as u64).saturating_mul(1u64 << exp);
        Duration::from_millis(ms).min(self.cap.max(self.base))
    }

    /// `attempt` is the number of attempts made so far (1 after the first failure); `jitter` is
    /// a random number in [0, 1).
    pub fn decide(&self, attempt: u32, kind: ErrorKind, jitter: f64) -> Decision {
        if kind == ErrorKind::Permanent || attempt >= self.max_attempts {
            return Decision::GiveUp;
        }
        let ceiling = self.ceiling(attempt).as_millis() as f64;
        let jitter = jitter.clamp(0.0, 1.0);
        Decision::RetryAfter(Duration::from_millis(
            (ceiling / 2.0 + ceiling / 2.0 * jitter) as u64,
        ))
    }
}

/// A random number in [0, 1) from the operating system's generator (through uuid's v4).
pub fn random_unit() -> f64 {
    let bits = uuid::Uuid::new_v4().as_u128() as u64 >> 11;
    bits as f64 / (1u64 << 53) as f64
}

/// A batch whose every call failed the same way says something about the server or the
/// configuration, not about its rows: the circuit opens, the rows are released unchanged.
/// "The same way": every error is server-wide (unreachable, key rejected, a redirect), or the
/// batch has at least this many calls and all share one error class (a wrong path prefix gives
/// every create a 404; https to a plain-http port gives every call the same TLS failure).
pub const SAME_FAILURE_MIN_CALLS: usize = 3;

/// `Some(cause)` when a batch's outcomes should open the circuit. `errors` holds one entry per
/// call: None for a call that succeeded, Some(error) for one that failed.
pub fn circuit_verdict(errors: &[Option<&ApiError>]) -> Option<String> {
    let failed: Vec<&ApiError> = errors.iter().copied().collect::<Option<_>>()?;
    let first = failed.first()?;
    let all_server_wide = failed.iter().all(|e| e.server_wide);
    let one_class = failed.iter().all(|e| e.class() == first.class());
    (all_server_wide || (one_class && failed.len() >= SAME_FAILURE_MIN_CALLS))
        .then(|| first.message.clone())
}

/// How long an open circuit waits before the next probe: 30 s, doubling with every trip, at
/// most 10 minutes. Short enough that a restarted server is noticed soon, long enough that a dead
/// one is not hammered.
pub fn circuit_probe_delay(trips: u32) -> Duration {
    let exp = trips.saturating_sub(1).min(10);
    Duration::from_secs(30u64 << exp).min(Duration::from_secs(600))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            base: Duration::from_secs(10),
            cap: Duration::from_secs(60),
        }
    }

    #[test]
    fn grows_exponentially_then_caps() {
        let p = policy();
        assert_eq!(p.ceiling(1), Duration::from_secs(10));
        assert_eq!(p.ceiling(2), Duration::from_secs(20));
        assert_eq!(p.ceiling(3), Duration::from_secs(40));
        assert_eq!(p.ceiling(4), Duration::from_secs(60));
        assert_eq!(p.ceiling(400), Duration::from_secs(60));
    }

    #[test]
    fn jitter_stays_within_half_and_full_ceiling() {
        let p = policy();
        assert_eq!(
            p.decide(2, ErrorKind::Transient, 0.0),
            Decision::RetryAfter(Duration::from_secs(10))
        );
        assert_eq!(
            p.decide(2, ErrorKind::Transient, 0.999_999),
            Decision::RetryAfter(Duration::from_millis(19_999))
        );
        for _ in 0..1000 {
            match p.decide(3, ErrorKind::Transient, random_unit()) {
                Decision::RetryAfter(d) => {
                    assert!(d >= Duration::from_secs(20) && d < Duration::from_secs(40))
                }
                Decision::GiveUp => panic!("gave up early"),
            }
        }
    }

    #[test]
    fn gives_up_after_max_attempts_or_on_permanent_errors() {
        let p = policy();
        assert!(matches!(
            p.decide(4, ErrorKind::Transient, 0.5),
            Decision::RetryAfter(_)
        ));
        assert_eq!(p.decide(5, ErrorKind::Transient, 0.5), Decision::GiveUp);
        assert_eq!(p.decide(1, ErrorKind::Permanent, 0.5), Decision::GiveUp);
    }

    #[test]
    fn cap_below_base_does_not_shrink_the_base() {
        let p = RetryPolicy {
            max_attempts: 3,
            base: Duration::from_secs(10),
            cap: Duration::from_secs(1),
        };
        assert_eq!(p.ceiling(3), Duration::from_secs(10));
    }

    #[test]
    fn random_unit_is_in_range() {
        for _ in 0..1000 {
            let r = random_unit();
            assert!((0.0..1.0).contains(&r));
        }
    }

    fn err(class_status: u16, server_wide: bool) -> ApiError {
        let mut e = ApiError::http(class_status, "POST /instance/create", Some("no".into()));
        e.server_wide = server_wide;
        e
    }

    #[test]
    fn a_batch_failing_the_same_way_opens_the_circuit() {
        let e404 = err(404, false);
        assert!(circuit_verdict(&[Some(&e404), Some(&e404), Some(&e404)]).is_some());
        // Too few calls to blame the server for a per-row error...
        assert!(circuit_verdict(&[Some(&e404), Some(&e404)]).is_none());
        // ...unless the error is about the server as a whole.
        let down = ApiError::unreachable("connection refused");
        assert_eq!(
            circuit_verdict(&[Some(&down)]),
            Some("connection refused".into())
        );
    }

    #[test]
    fn one_success_or_mixed_failures_keep_it_closed() {
        let (e404, e500) = (err(404, false), err(500, false));
        assert!(circuit_verdict(&[Some(&e404), None, Some(&e404), Some(&e404)]).is_none());
        assert!(circuit_verdict(&[Some(&e404), Some(&e500), Some(&e404)]).is_none());
        assert!(circuit_verdict(&[]).is_none());
    }

    #[test]
    fn probes_back_off_to_ten_minutes() {
        assert_eq!(circuit_probe_delay(1), Duration::from_secs(30));
        assert_eq!(circuit_probe_delay(2), Duration::from_secs(60));
        assert_eq!(circuit_probe_delay(5), Duration::from_secs(480));
        assert_eq!(circuit_probe_delay(6), Duration::from_secs(600));
        assert_eq!(circuit_probe_delay(u32::MAX), Duration::from_secs(600));
    }
}
