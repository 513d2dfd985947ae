//! What a run saw go wrong, for its summary: a count per kind of error and the first few
//! distinct messages. (0.1.0 kept only the last message, which hid the cause whenever a run met
//! more than one problem.) Pure logic, no pgrx.

use serde_json::{json, Value};
use std::collections::BTreeMap;

/// How many distinct messages a summary keeps, in the order they were first seen.
pub const FIRST_MESSAGES: usize = 5;

#[derive(Debug, Default, Clone)]
pub struct ErrorTally {
    by_kind: BTreeMap<String, u64>,
    first: Vec<String>,
    last: Option<String>,
}

impl ErrorTally {
    pub fn add(&mut self, kind: &str, message: &str) {
        *self.by_kind.entry(kind.to_string()).or_default() += 1;
        if self.first.len() < FIRST_MESSAGES && !self.first.iter().any(|m| m == message) {
            self.first.push(message.to_string());
        }
        self.last = Some(message.to_string());
    }

    pub fn total(&self) -> u64 {
        self.by_kind.values().sum()
    }

    pub fn last(&self) -> Option<&str> {
        self.last.as_deref()
    }

    /// `{"by_kind": {"http_500": 3, ...}, "first": ["...", ...]}`.
    pub fn to_json(&self) -> Value {
        json!({"by_kind": self.by_kind, "first": self.first})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_every_kind_and_keeps_the_first_distinct_messages() {
        let mut t = ErrorTally::default();
        t.add("http_401", "key rejected");
        for i in 0..10 {
            t.add("http_500", &format!("boom {}", i % 7));
        }
        t.add("timeout", "slow");
        assert_eq!(t.total(), 12);
        assert_eq!(
            t.to_json(),
            json!({"by_kind": {"http_401": 1, "http_500": 10, "timeout": 1},
                   "first": ["key rejected", "boom 0", "boom 1", "boom 2", "boom 3"]})
        );
        assert_eq!(t.last(), Some("slow"));
    }

    #[test]
    fn repeated_messages_are_kept_once() {
        let mut t = ErrorTally::default();
        for _ in 0..3 {
            t.add("unreachable", "refused");
        }
        assert_eq!(t.to_json()["first"], json!(["refused"]));
    }
}
