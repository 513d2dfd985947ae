//! The retry policy: what happens to a queue row after a failed attempt. Pure logic, no pgrx.
//!
//! Backoff is exponential with "equal jitter" (half the delay fixed, half random) and a cap, so
//! a burst of rows that failed together does not come back as a burst. Errors that cannot
//! succeed on retry (400, 401...) fail the row at once; the operator fixes the cause and calls
//! `evoq_retry()`.

use crate::evolution::ErrorKind;
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
}
