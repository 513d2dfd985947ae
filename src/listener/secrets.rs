//! The webhook secrets the listener accepts, shared with the worker's main thread, which keeps
//! them current. The listener checks a request's secret as soon as its head is read, so a
//! sender without it costs a head parse and nothing else: no body read, no JSON, no main-loop
//! work.

use std::sync::{Arc, RwLock};

/// The set of accepted secrets: cheap to clone (every clone is the same set), updated by
/// [`Secrets::set`] and read by every connection thread. Empty until the first `set`: evoq is
/// not configured yet, and POSTs are answered 503 (the sender retries) rather than 401.
#[derive(Clone, Default)]
pub struct Secrets(Arc<RwLock<Vec<String>>>);

/// What a request's secret is worth against the set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Check {
    /// The set is empty: no secret is known yet, so nobody can be told they are wrong.
    Unconfigured,
    Accepted,
    /// Wrong (`presented`) or missing.
    Refused {
        presented: bool,
    },
}

impl Secrets {
    /// An empty set.
    pub fn new() -> Secrets {
        Secrets::default()
    }

    /// Replaces the set (the current secret, plus the previous one while a rotation is in
    /// progress); it applies to every request whose head is read after this returns. Empty
    /// strings are dropped: they could only match a request that carries no secret.
    pub fn set(&self, secrets: Vec<String>) {
        let secrets: Vec<String> = secrets.into_iter().filter(|s| !s.is_empty()).collect();
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = secrets;
    }

    /// How many secrets are accepted now.
    pub fn count(&self) -> usize {
        self.0.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Checks `presented` against every accepted secret, each in constant time, and without
    /// stopping at a match: how long a refusal takes tells nothing about how close a guess
    /// was, nor which secret matched.
    pub(super) fn check(&self, presented: Option<&str>) -> Check {
        let accepted = self.0.read().unwrap_or_else(|e| e.into_inner());
        if accepted.is_empty() {
            return Check::Unconfigured;
        }
        let Some(presented) = presented else {
            return Check::Refused { presented: false };
        };
        let matched = accepted.iter().fold(false, |any, s| {
            any | crate::evolution::same_secret(presented, s)
        });
        if matched {
            Check::Accepted
        } else {
            Check::Refused { presented: true }
        }
    }
}

/// Two handles are equal when they are the same set (a configuration compares equal to its
/// clone).
impl PartialEq for Secrets {
    fn eq(&self, other: &Secrets) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Secrets {}

/// The secrets stay out of logs: only how many there are.
impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field("accepted", &self.count())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_is_checked_against_every_accepted_one() {
        let s = Secrets::new();
        assert_eq!(s.check(Some("a")), Check::Unconfigured);
        assert_eq!(s.check(None), Check::Unconfigured);
        s.set(vec!["new".into(), String::new(), "old".into()]);
        assert_eq!(s.count(), 2, "the empty one is dropped");
        assert_eq!(s.check(Some("new")), Check::Accepted);
        assert_eq!(s.check(Some("old")), Check::Accepted);
        assert_eq!(s.check(Some("ol")), Check::Refused { presented: true });
        assert_eq!(s.check(Some("newer")), Check::Refused { presented: true });
        assert_eq!(s.check(None), Check::Refused { presented: false });
        // A clone is the same set.
        let clone = s.clone();
        clone.set(vec!["only".into()]);
        assert_eq!(s.check(Some("new")), Check::Refused { presented: true });
        assert_eq!(s.check(Some("only")), Check::Accepted);
        assert_eq!(s, clone);
        assert_ne!(s, Secrets::new());
        assert!(!format!("{s:?}").contains("only"));
        s.set(Vec::new());
        assert_eq!(s.check(Some("only")), Check::Unconfigured);
    }
}
