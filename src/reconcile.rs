//! The reconciler's logic, free of Postgres: what to compare, the calls a comparison leads to,
//! and what their answers mean. `jobs::reconcile` (the SQL function and the QR refresh) and the
//! background worker run it; `evoq._reconcile_apply` does the comparison with the rows.
//!
//! Why a reconciler: rows drift from what a server holds and no webhook says so. Servers lose
//! instances (a restart with `DEL_INSTANCE`, a deletion in the Manager), keep instances no row
//! owns (a create that timed out but succeeded, a deleted user's leftover, each a socket that
//! loops forever), and change state without a delivery (webhooks that stop until a restart).
//! `GET /instance/fetchInstances` lists them all; this compares.

use crate::evolution::{ApiError, Client, ListedInstance, LiveState};
use crate::names;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};

/// The one Evolution server there is until several servers are data (#17).
pub const DEFAULT_SERVER: &str = "default";
/// Calls a reconcile may make after its listing: connectionState for a state that drifted, a
/// logout and a delete for an orphan due to go. The rest waits for the next reconcile.
pub const MAX_FOLLOW_UPS: usize = 64;
/// Threads those calls share (the server is one Node process; a reconcile is background work).
pub const FOLLOW_UP_THREADS: usize = 4;
/// Rounds of calls a reconcile's lease allows for (`jobs::reconcile::lease_ms`).
pub const FOLLOW_UPS_LEASE_ROUNDS: usize = MAX_FOLLOW_UPS.div_ceil(FOLLOW_UP_THREADS);

/// A listed instance of this deployment's namespace, as `_reconcile_apply` takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ours {
    /// The instance name.
    pub n: String,
    /// The state the server lists.
    pub s: Option<String>,
    /// The user it is named after.
    pub u: uuid::Uuid,
}

/// A listing, sorted: ours to compare with the rows; the others only counted, never touched.
#[derive(Debug, Default)]
pub struct Sorted {
    pub ours: Vec<Ours>,
    pub foreign: usize,
}

/// Keeps the names this deployment makes (`names::user_of`); counts the rest.
pub fn sort_listing(listed: Vec<ListedInstance>, namespace: &str, owns_legacy: bool) -> Sorted {
    let mut sorted = Sorted::default();
    for item in listed {
        match names::user_of(&item.name, namespace, owns_legacy) {
            Some(u) => sorted.ours.push(Ours {
                n: item.name,
                s: item.state,
                u,
            }),
            None => sorted.foreign += 1,
        }
    }
    sorted
}

/// An instance whose listed state contradicts its row: asked connectionState.
#[derive(Debug, Clone, Deserialize)]
pub struct Check {
    pub id: uuid::Uuid,
    pub instance_name: String,
    /// The row's status when it was compared.
    pub status: String,
    /// The row's updated_at then: the answer is written only to a row nothing changed since.
    pub claimed_at: Value,
}

/// What `_reconcile_apply` found and applied, and the calls it asks for.
#[derive(Debug, Clone, Deserialize)]
pub struct Plan {
    /// Rows the server does not list, now lost (or, for idle ones, lost until their user asks).
    pub missing: u64,
    /// Rows the server does not list, left alone: too many at once (see `_reconcile_apply`).
    pub missing_held_back: u64,
    pub checks: Vec<Check>,
    /// Listed names of the namespace no row owns.
    pub orphans: u64,
    /// Orphans unowned for the grace period: to be logged out and deleted.
    pub remove: Vec<String>,
    pub orphans_waiting: u64,
}

/// The answers to a plan's calls.
#[derive(Debug, Default)]
pub struct FollowUps {
    pub checks: Vec<(Check, Result<LiveState, ApiError>)>,
    pub removals: Vec<(String, Result<(), ApiError>)>,
}

enum Job {
    Check(Check),
    Remove(String),
}

/// Makes a plan's calls on up to `threads` threads (each with every signal blocked), and returns
/// when all are answered. Each call is bounded by the client's request timeout.
pub fn follow_up(
    client: &Client,
    checks: Vec<Check>,
    remove: Vec<String>,
    threads: usize,
) -> FollowUps {
    let jobs: Vec<Job> = checks
        .into_iter()
        .map(Job::Check)
        .chain(remove.into_iter().map(Job::Remove))
        .collect();
    let threads = threads.clamp(1, jobs.len().max(1));
    let queue = Arc::new(Mutex::new(jobs));
    let done = Arc::new(Mutex::new(FollowUps::default()));
    let mut handles = Vec::new();
    for _ in 0..threads {
        let (queue, done, client) = (queue.clone(), done.clone(), client.clone());
        let work = move || loop {
            let Some(job) = queue.lock().unwrap_or_else(|p| p.into_inner()).pop() else {
                return;
            };
            match job {
                Job::Check(c) => {
                    let answer = client.connection_state(&c.instance_name);
                    done.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .checks
                        .push((c, answer));
                }
                Job::Remove(name) => {
                    let answer = client.remove(&name).map(|_| ());
                    done.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .removals
                        .push((name, answer));
                }
            }
        };
        match crate::pool::spawn_with_signals_blocked("evoq-reconcile", work.clone()) {
            Ok(h) => handles.push(h),
            // No thread to be had: this one does the calls itself.
            Err(_) => work(),
        }
    }
    for h in handles {
        let _ = h.join();
    }
    let mut done = done.lock().unwrap_or_else(|p| p.into_inner());
    std::mem::take(&mut *done)
}

/// What a check's answer means for its row, as a record for `_record_refresh_results` (the
/// same statement the QR refresh writes with); None when the live state does not confirm the
/// listing (it lagged, or the instance is between reconnects): nothing changes.
pub fn check_record(check: &Check, answer: &LiveState) -> Option<Value> {
    let live = matches!(check.status.as_str(), "connecting" | "open");
    let outcome = match (answer, check.status.as_str()) {
        (LiveState::Open, s) if s != "open" => "open",
        (LiveState::Close, "open") => "closed",
        (LiveState::Lost, _) if live => "lost",
        (LiveState::Lost, _) => "gone",
        _ => return None,
    };
    Some(
        json!({"id": check.id, "outcome": outcome, "claimed_status": check.status,
                "claimed_at": check.claimed_at}),
    )
}

/// A reconcile's counts, for its summary (and evoq_status).
#[derive(Debug, Default, Clone, Serialize)]
pub struct Tally {
    pub listed: u64,
    pub foreign: u64,
    pub missing: u64,
    pub missing_held_back: u64,
    pub drift_checked: u64,
    pub drift_applied: u64,
    pub orphans: u64,
    pub orphans_removed: u64,
    pub orphans_waiting: u64,
    pub errors: u64,
}

/// Everything after the listing, once the calls are answered: the records to write, the
/// removals to note (`[{"n", "error"}]`), and the tally; `last_error` is the last failed call.
pub struct Outcome {
    pub records: Vec<Value>,
    pub removals: Value,
    pub last_error: Option<String>,
}

pub fn outcome(plan: &Plan, answers: &FollowUps, tally: &mut Tally) -> Outcome {
    tally.missing = plan.missing;
    tally.missing_held_back = plan.missing_held_back;
    tally.orphans = plan.orphans;
    tally.orphans_waiting = plan.orphans_waiting;
    let mut last_error = None;
    let mut records = Vec::new();
    for (check, answer) in &answers.checks {
        match answer {
            Ok(state) => {
                tally.drift_checked += 1;
                if let Some(r) = check_record(check, state) {
                    tally.drift_applied += 1;
                    records.push(r);
                }
            }
            Err(e) => {
                tally.errors += 1;
                last_error = Some(e.message.clone());
            }
        }
    }
    let mut removals = Vec::new();
    for (name, answer) in &answers.removals {
        match answer {
            Ok(()) => {
                tally.orphans_removed += 1;
                removals.push(json!({"n": name, "error": null}));
            }
            Err(e) => {
                tally.errors += 1;
                tally.orphans_waiting += 1;
                last_error = Some(e.message.clone());
                removals.push(json!({"n": name, "error": e.message}));
            }
        }
    }
    Outcome {
        records,
        removals: Value::Array(removals),
        last_error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(status: &str) -> Check {
        Check {
            id: uuid::Uuid::nil(),
            instance_name: "evoq_ns_x".into(),
            status: status.into(),
            claimed_at: json!("2026-01-01T00:00:00+00:00"),
        }
    }

    #[test]
    fn only_this_deployments_names_are_compared() {
        let u = uuid::Uuid::new_v4();
        let listed = vec![
            ListedInstance {
                name: names::instance_name("ns", u),
                state: Some("open".into()),
            },
            ListedInstance {
                name: names::instance_name("other", u),
                state: None,
            },
            ListedInstance {
                name: "shop_support".into(),
                state: Some("open".into()),
            },
            ListedInstance {
                name: names::legacy_instance_name(u),
                state: None,
            },
        ];
        let sorted = sort_listing(listed.clone(), "ns", false);
        assert_eq!(
            sorted.ours,
            vec![Ours {
                n: names::instance_name("ns", u),
                s: Some("open".into()),
                u
            }]
        );
        assert_eq!(sorted.foreign, 3);
        assert_eq!(sort_listing(listed, "ns", true).ours.len(), 2);
    }

    #[test]
    fn a_check_applies_only_what_the_live_state_confirms() {
        let outcome = |status: &str, state: LiveState| {
            check_record(&check(status), &state).map(|r| r["outcome"].as_str().unwrap().to_string())
        };
        assert_eq!(
            outcome("connecting", LiveState::Open).as_deref(),
            Some("open")
        );
        assert_eq!(outcome("expired", LiveState::Open).as_deref(), Some("open"));
        assert_eq!(outcome("open", LiveState::Close).as_deref(), Some("closed"));
        assert_eq!(outcome("open", LiveState::Lost).as_deref(), Some("lost"));
        assert_eq!(outcome("close", LiveState::Lost).as_deref(), Some("gone"));
        // The listing lagged, or the instance is between reconnects: nothing changes.
        assert_eq!(outcome("open", LiveState::Open), None);
        assert_eq!(outcome("open", LiveState::Connecting), None);
        assert_eq!(outcome("connecting", LiveState::Connecting), None);
        assert_eq!(outcome("open", LiveState::NotLoaded), None);
        let r = check_record(&check("open"), &LiveState::Close).unwrap();
        assert_eq!(r["claimed_status"], "open");
        assert_eq!(r["claimed_at"], "2026-01-01T00:00:00+00:00");
    }

    #[test]
    fn failed_calls_are_counted_and_a_failed_removal_waits() {
        let plan = Plan {
            missing: 2,
            missing_held_back: 0,
            checks: vec![],
            orphans: 3,
            remove: vec!["a".into(), "b".into()],
            orphans_waiting: 1,
        };
        let answers = FollowUps {
            checks: vec![
                (check("open"), Err(ApiError::timeout("slow"))),
                (check("open"), Ok(LiveState::Close)),
            ],
            removals: vec![
                ("a".into(), Ok(())),
                ("b".into(), Err(ApiError::transient("refused"))),
            ],
        };
        let mut tally = Tally::default();
        let out = outcome(&plan, &answers, &mut tally);
        assert_eq!(out.records.len(), 1);
        assert_eq!(
            out.removals,
            json!([{"n": "a", "error": null}, {"n": "b", "error": "refused"}])
        );
        assert_eq!(
            (tally.drift_checked, tally.drift_applied, tally.errors),
            (1, 1, 2)
        );
        assert_eq!(
            (tally.orphans_removed, tally.orphans_waiting, tally.missing),
            (1, 2, 2)
        );
        assert_eq!(out.last_error.as_deref(), Some("refused"));
    }
}
