//! evoq_refresh_qr(): everything an existing instance needs from the server, in one run:
//! - connecting instances: the current QR, and noticing the scan;
//! - connecting instances past the QR window: a logout, so an abandoned sign-up stops costing
//!   the server a socket and a QR loop (the row becomes `expired`);
//! - open instances: a periodic connectionState, so a phone that unlinked the device is noticed
//!   without webhooks;
//! - instances registered before the webhook changed: the new URL, headers and secret.
//!
//! A `close`, `refused` or `expired` instance is never connected from here: connect on a closed
//! instance starts a new socket, and only `evoq_reconnect` (the user asking) may do that.

use super::run::{apply_requeue_requests, call_json, in_batch_context, record, Run};
use crate::evolution::{ApiError, ApiVersion, ConnectOutcome, LiveState, Webhook};
use crate::policy::circuit_verdict;
use pgrx::prelude::*;
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Task {
    Connect,
    Expire,
    Check,
    Repoint,
}

#[derive(Debug, Deserialize)]
struct ClaimedInstance {
    id: uuid::Uuid,
    instance_name: String,
    qr_text: Option<String>,
    /// The row's status at the claim.
    status: String,
    task: Task,
}

/// What a call answered.
enum Answer {
    Connect(ConnectOutcome),
    /// Past the window: logged out (or nothing was left to log out).
    LoggedOut,
    /// Past the window, but scanned since the last look: nothing to log out.
    ScannedInTime,
    State(LiveState),
    /// webhook/set answered; false: the server no longer knows the instance.
    Repointed(bool),
}

#[derive(Default)]
struct Tally {
    checked: u64,
    new_qr: u64,
    unchanged: u64,
    opened: u64,
    lost: u64,
    errors: u64,
    unrecordable: u64,
    requeued: u64,
    batches: u64,
    expired: u64,
    closed: u64,
    still_open: u64,
    repointed: u64,
}

fn outcome_record(
    row: &ClaimedInstance,
    outcome: &Result<Answer, ApiError>,
    webhook_version: &Value,
    tally: &mut Tally,
) -> Value {
    match outcome {
        Ok(Answer::Connect(ConnectOutcome::Open)) | Ok(Answer::ScannedInTime) => {
            tally.opened += 1;
            json!({"id": row.id, "outcome": "open"})
        }
        Ok(Answer::Connect(ConnectOutcome::Lost)) | Ok(Answer::State(LiveState::Lost)) => {
            tally.lost += 1;
            json!({"id": row.id, "outcome": "lost"})
        }
        Ok(Answer::Connect(ConnectOutcome::NoQrYet { count })) => {
            tally.unchanged += 1;
            json!({"id": row.id, "outcome": "no_qr", "qr_count": count})
        }
        Ok(Answer::Connect(ConnectOutcome::Qr(qr))) => {
            if qr.code.is_some() && qr.code == row.qr_text {
                tally.unchanged += 1
            } else {
                tally.new_qr += 1
            }
            json!({"id": row.id, "outcome": "qr", "qr_code": qr.base64, "qr_text": qr.code,
                   "pairing_code": qr.pairing_code, "qr_count": qr.count})
        }
        Ok(Answer::LoggedOut) => {
            tally.expired += 1;
            json!({"id": row.id, "outcome": "expired"})
        }
        Ok(Answer::State(LiveState::Close)) => {
            tally.closed += 1;
            json!({"id": row.id, "outcome": "closed"})
        }
        // Open, or reconnecting by itself, or not loaded: nothing to change.
        Ok(Answer::State(_)) => {
            tally.still_open += 1;
            json!({"id": row.id, "outcome": "checked"})
        }
        Ok(Answer::Repointed(true)) => {
            tally.repointed += 1;
            json!({"id": row.id, "outcome": "repointed", "webhook_version": webhook_version})
        }
        // A live instance the server lost is created again, as on a connect's 404; an idle one
        // (close, refused, expired) only when its user asks (evoq_reconnect).
        Ok(Answer::Repointed(false)) => {
            tally.lost += 1;
            let live = matches!(row.status.as_str(), "connecting" | "open");
            json!({"id": row.id, "outcome": if live { "lost" } else { "gone" }})
        }
        Err(e) => {
            tally.errors += 1;
            json!({"id": row.id, "outcome": "error", "error": e.message})
        }
    }
}

fn route(task: Task) -> &'static str {
    match task {
        Task::Connect => "GET /instance/connect",
        Task::Expire => "DELETE /instance/logout",
        Task::Check => "GET /instance/connectionState",
        Task::Repoint => "POST /webhook/set",
    }
}

#[pg_extern(security_definer)]
#[search_path(pg_catalog, @extschema@)]
pub fn evoq_refresh_qr() -> pgrx::JsonB {
    let mut run = Run::start("refresh_qr");
    let mut tally = Tally::default();
    let client = run.client.clone();
    let webhook: Option<Webhook> = run.connection.webhook.clone();
    let mut pool = run.pool(
        move |(task, name, version): (Task, String, Option<ApiVersion>)| match task {
            Task::Connect => client.connect(&name).map(Answer::Connect),
            // A scan since the last look must not be logged out: ask first (connectionState
            // never starts a socket).
            Task::Expire => match client.connection_state(&name) {
                Ok(LiveState::Open) => Ok(Answer::ScannedInTime),
                Ok(_) => client.logout(&name).map(|_| Answer::LoggedOut),
                Err(e) => Err(e),
            },
            Task::Check => client.connection_state(&name).map(Answer::State),
            Task::Repoint => match (&webhook, version) {
                (Some(hook), Some(v)) => client.set_webhook(v, &name, hook).map(Answer::Repointed),
                _ => Err(ApiError::transient(
                    "POST /webhook/set: the server's API version is not known yet",
                )),
            },
        },
    );
    let t = run.tunables;
    let webhook_version = json!(run.connection.webhook_version);
    // A webhook/set that failed is tried again by the next run, not over and over in this one.
    let mut repoint = true;

    let stopped = run.circuit_blocks().unwrap_or_else(|| loop {
        if run.out_of_time() {
            break "time_budget";
        }
        let stop = in_batch_context(|| {
            let rows: Vec<ClaimedInstance> = call_json(
                "SELECT evoq._claim_refresh($1, $2, $3, $4, $5)",
                &[
                    t.batch_size.into(),
                    t.qr_refresh_interval_ms.into(),
                    t.qr_window_ms.into(),
                    t.state_check_interval_ms.into(),
                    repoint.into(),
                ],
            );
            if rows.is_empty() {
                return Some("done");
            }
            tally.batches += 1;
            tally.checked += rows.len() as u64;
            // Only a webhook/set has a dialect; the version is asked (or remembered) only then.
            let version = if rows.iter().any(|r| r.task == Task::Repoint) {
                match run.version() {
                    Ok(v) => Some(v),
                    Err(e) => {
                        run.count_error(&e);
                        None
                    }
                }
            } else {
                None
            };
            let calls = rows
                .iter()
                .map(|r| (r.task, r.instance_name.clone(), version))
                .collect();
            let answers = run.call_all(&mut pool, calls);
            let errors: Vec<Option<&ApiError>> = answers
                .iter()
                .map(|a| a.as_ref().and_then(|o| o.as_ref().err()))
                .collect();
            if let Some(cause) = circuit_verdict(&errors) {
                // Nothing is recorded against the instances: the server is at fault.
                for e in errors.iter().flatten() {
                    run.count_error(e);
                }
                run.trip(&cause);
                return Some("circuit_open");
            }
            run.batch_went_through();
            let outcomes: Vec<Result<Answer, ApiError>> = answers
                .into_iter()
                .zip(&rows)
                .map(|(a, r)| a.unwrap_or_else(|| Err(run.budget_error(route(r.task)))))
                .collect();
            let mut records = Vec::with_capacity(rows.len());
            for (row, outcome) in rows.iter().zip(&outcomes) {
                if let Err(e) = outcome {
                    run.count_error(e);
                    if row.task == Task::Repoint {
                        repoint = false;
                    }
                }
                records.push(outcome_record(row, outcome, &webhook_version, &mut tally));
            }
            tally.unrecordable += record(
                "SELECT evoq._record_refresh_results($1::jsonb)",
                records,
                run.protect_next_batch(),
                |rec, message| json!({"id": rec["id"], "outcome": "error", "error": message}),
            );
            None
        });
        if let Some(reason) = stop {
            break reason;
        }
    });
    // Lost instances were turned into requeue requests; apply those no run holds now, so the
    // queue row is pending as soon as this run commits.
    tally.requeued = apply_requeue_requests();
    // Once every instance carries the current secret, the one before a rotation is refused.
    crate::subxact::write_shared(
        "UPDATE evoq.settings s SET webhook_secret_previous = NULL
         WHERE webhook_secret_previous IS NOT NULL
           AND NOT EXISTS (SELECT 1 FROM evolution_instances i
                           WHERE i.instance_status IN ('connecting', 'open', 'close', 'refused', 'expired')
                             AND (i.webhook_set_at IS NULL OR i.webhook_set_at < s.webhook_changed_at)
                             AND evoq._is_ours(i.instance_name, s.namespace, s.owns_legacy_names))",
        &[],
    );

    let summary = json!({
        "checked": tally.checked, "new_qr": tally.new_qr, "unchanged": tally.unchanged,
        "opened": tally.opened, "lost": tally.lost, "errors": tally.errors, "batches": tally.batches,
        "unrecordable": tally.unrecordable, "requeued": tally.requeued, "expired": tally.expired,
        "closed": tally.closed, "still_open": tally.still_open, "repointed": tally.repointed,
        "stopped": stopped,
    });
    run.finish(summary)
}
