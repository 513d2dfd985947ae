//! Fault injection rules and the wait used by `hang`.

use std::sync::{Condvar, Mutex};

use serde::{Deserialize, Serialize};

/// What a matching request suffers. The JSON form (control API) is tagged by `kind`:
/// `{"kind":"status","code":500}`, `{"kind":"delay","ms":300}`, `{"kind":"hang"}`, ...
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FaultKind {
    /// Never answer; the connection stays open until the rule is cleared or the server stops.
    Hang,
    /// Extra latency, then the normal reply.
    Delay { ms: u64 },
    /// Reply this HTTP code with the Evolution error envelope.
    Status { code: u16 },
    /// HTTP 200, JSON content type, body `<html>not json`.
    Garbage,
    /// HTTP 200 `{"error":true,"message":"mock fault: 200 with error"}` (how v2 connect reports failures).
    Error200,
    /// HTTP 200 with an empty body (how v1.8 connect reports failures).
    Empty200,
    /// The usual success code with body `{}`.
    MissingFields,
    /// Close the connection without sending anything.
    Drop,
    /// Reply this HTTP code and this exact JSON body: what a server, a proxy or a WAF in front
    /// of it might send that the other faults do not cover (a `\u0000` in a QR, a count past
    /// 2^31, a 403 that is not about a name, an echo of the request's headers).
    Reply { code: u16, body: String },
}

/// One rule. `path_contains` is a substring of the request path (raw or percent-decoded);
/// `path_equals`, when given, must be the whole path (raw or percent-decoded): `"/"` then
/// singles out `GET /` (the version probe), which every path contains. A rule may give either
/// or both. `times` limits the rule to its first N matches, `None` means forever.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultRule {
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub path_contains: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_equals: Option<String>,
    #[serde(flatten)]
    pub kind: FaultKind,
    #[serde(default)]
    pub times: Option<u32>,
}

impl FaultRule {
    fn matches(&self, method: &str, raw_path: &str, decoded_path: &str) -> bool {
        let method_ok = self
            .method
            .as_deref()
            .is_none_or(|m| m.is_empty() || m.eq_ignore_ascii_case(method));
        let equals_ok = self
            .path_equals
            .as_deref()
            .is_none_or(|p| raw_path == p || decoded_path == p);
        method_ok
            && equals_ok
            && (raw_path.contains(&self.path_contains)
                || decoded_path.contains(&self.path_contains))
    }
}

struct Inner {
    rules: Vec<FaultRule>,
    /// Bumped on every clear so hung requests know their rule is gone.
    generation: u64,
    stopped: bool,
}

/// Rule list plus the condition variable hung requests sleep on (no busy waiting).
pub struct Faults {
    inner: Mutex<Inner>,
    wake: Condvar,
}

/// Ticket returned with a `hang` so the request can wait for exactly its release.
pub struct HangTicket(u64);

impl Faults {
    pub fn new() -> Faults {
        Faults {
            inner: Mutex::new(Inner {
                rules: Vec::new(),
                generation: 0,
                stopped: false,
            }),
            wake: Condvar::new(),
        }
    }

    pub fn add(&self, rule: FaultRule) {
        self.lock().rules.push(rule);
    }

    pub fn list(&self) -> Vec<FaultRule> {
        self.lock().rules.clone()
    }

    /// Drops every rule and releases requests hanging on them.
    pub fn clear(&self) {
        let mut g = self.lock();
        g.rules.clear();
        g.generation += 1;
        self.wake.notify_all();
    }

    /// Server shutdown: releases all hung requests for good.
    pub fn stop(&self) {
        self.lock().stopped = true;
        self.wake.notify_all();
    }

    /// First live rule matching the request, consuming one of its `times`.
    pub fn take(
        &self,
        method: &str,
        raw_path: &str,
        decoded_path: &str,
    ) -> Option<(FaultKind, HangTicket)> {
        let mut g = self.lock();
        let generation = g.generation;
        let idx = g
            .rules
            .iter()
            .position(|r| r.times != Some(0) && r.matches(method, raw_path, decoded_path))?;
        let rule = &mut g.rules[idx];
        let kind = rule.kind.clone();
        if let Some(t) = rule.times.as_mut() {
            *t = t.saturating_sub(1);
            if *t == 0 {
                g.rules.remove(idx);
            }
        }
        Some((kind, HangTicket(generation)))
    }

    /// Blocks until the rules are cleared (after `ticket` was taken) or the server stops.
    pub fn wait_release(&self, ticket: HangTicket) {
        let mut g = self.lock();
        while !g.stopped && g.generation == ticket.0 {
            g = self.wake.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panicking handler thread must not wedge the whole mock.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for Faults {
    fn default() -> Self {
        Faults::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_json_form() {
        let r: FaultRule = serde_json::from_str(
            r#"{"method":"POST","path_contains":"/instance/create","kind":"status","code":500,"times":2}"#,
        )
        .unwrap();
        assert_eq!(r.kind, FaultKind::Status { code: 500 });
        assert_eq!(r.times, Some(2));
        let r: FaultRule =
            serde_json::from_str(r#"{"path_contains":"/x","kind":"error200"}"#).unwrap();
        assert_eq!(r.kind, FaultKind::Error200);
        assert_eq!(r.method, None);
        let r: FaultRule =
            serde_json::from_str(r#"{"path_contains":"/x","kind":"missing_fields"}"#).unwrap();
        assert_eq!(r.kind, FaultKind::MissingFields);
    }

    #[test]
    fn times_expire_in_order() {
        let f = Faults::new();
        f.add(FaultRule {
            method: Some("GET".into()),
            path_contains: "/a".into(),
            path_equals: None,
            kind: FaultKind::Garbage,
            times: Some(1),
        });
        f.add(FaultRule {
            method: None,
            path_contains: "/a".into(),
            path_equals: None,
            kind: FaultKind::Drop,
            times: None,
        });
        assert_eq!(f.take("GET", "/a", "/a").unwrap().0, FaultKind::Garbage);
        assert_eq!(f.take("GET", "/a", "/a").unwrap().0, FaultKind::Drop);
        assert!(f.take("GET", "/b", "/b").is_none());
    }

    /// `path_contains: "/"` is every path; `path_equals: "/"` is `GET /` alone.
    #[test]
    fn path_equals_matches_the_whole_path_only() {
        let r: FaultRule = serde_json::from_str(
            r#"{"method":"GET","path_equals":"/","kind":"delay","ms":5,"times":1}"#,
        )
        .unwrap();
        assert_eq!(r.path_equals.as_deref(), Some("/"));
        assert_eq!(r.path_contains, "");
        assert!(r.matches("GET", "/", "/"));
        assert!(!r.matches(
            "GET",
            "/instance/fetchInstances",
            "/instance/fetchInstances"
        ));
        assert!(!r.matches("POST", "/", "/"));
        let f = Faults::new();
        f.add(r);
        assert!(f
            .take("GET", "/instance/connect/a", "/instance/connect/a")
            .is_none());
        assert_eq!(
            f.take("GET", "/", "/").unwrap().0,
            FaultKind::Delay { ms: 5 }
        );
        // Percent-decoded paths match too; a rule without it serialises as before.
        let r: FaultRule =
            serde_json::from_str(r#"{"path_equals":"/webhook/set/a b","kind":"drop"}"#).unwrap();
        assert!(r.matches("POST", "/webhook/set/a%20b", "/webhook/set/a b"));
        assert!(!r.matches("POST", "/webhook/set/a b c", "/webhook/set/a b c"));
        let plain: FaultRule =
            serde_json::from_str(r#"{"path_contains":"/x","kind":"drop"}"#).unwrap();
        assert!(!serde_json::to_string(&plain)
            .unwrap()
            .contains("path_equals"));
    }
}
