//! evoq_process_queue(): create an Evolution instance for every due queue row, or delete the
//! instance of a deprovisioned user (the row's action).

use super::run::{
    apply_requeue_requests, call_json, in_batch_context, record, require_working_attachments, Run,
};
use crate::evolution::{ApiError, ApiVersion, ErrorClass, Provisioned, Webhook};
use crate::names::{instance_name, is_ours};
use crate::policy::{circuit_verdict, random_unit, Decision, RetryPolicy};
use pgrx::prelude::*;
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Debug, Deserialize)]
struct ClaimedRow {
    id: uuid::Uuid,
    user_id: uuid::Uuid,
    attempts: i32,
    /// Set once a row has been tried (and for every row queued before 0.2.0, whose instances
    /// keep their 0.1.0 names); a stored name always wins over a derived one.
    instance_name: Option<String>,
    /// `create` or `delete` (0.3.0).
    #[serde(default = "create_action")]
    action: String,
    /// The name in the user's instance row, if there is one: what a delete removes.
    #[serde(default)]
    instance_row_name: Option<String>,
    /// How the row was before the claim, handed back as it is if the batch is released.
    prev_status: String,
    prev_updated_at: Value,
}

fn create_action() -> String {
    "create".into()
}

/// One row's call.
enum Call {
    Create(ApiVersion, String),
    /// Log out, then delete.
    Remove(String),
}

enum Done {
    Created(Provisioned),
    /// Logged out and deleted, or already gone.
    Removed,
}

#[derive(Default)]
struct Tally {
    claimed: u64,
    created: u64,
    adopted: u64,
    retrying: u64,
    failed: u64,
    released: u64,
    unrecordable: u64,
    requeued: u64,
    batches: u64,
    deleted: u64,
}

fn success_record(id: uuid::Uuid, name: &str, p: &Provisioned, webhook_version: &Value) -> Value {
    let qr = p.instance.qr.clone().unwrap_or_default();
    json!({
        "id": id, "instance_name": name, "ok": true, "action": "create",
        "instance_id": p.instance.instance_id, "token": p.instance.token,
        "instance_status": p.instance.status,
        "qr_code": qr.base64, "qr_text": qr.code, "pairing_code": qr.pairing_code, "qr_count": qr.count,
        "webhook_version": webhook_version,
    })
}

/// What a row's call is: a create under its stored (or derived) name, or the removal of the
/// user's instance under the same name. A removal is sent even for a creation that looks
/// untried: a run cancelled (or a batch released) after the server created the instance leaves
/// no trace in the row, and a 404 costs one call.
fn call_for(
    row: &ClaimedRow,
    version: ApiVersion,
    namespace: &str,
    owns_legacy: bool,
) -> (Call, Option<String>) {
    if row.action == "delete" {
        let name = row
            .instance_name
            .iter()
            .chain(row.instance_row_name.iter())
            .find(|n| is_ours(n, namespace, owns_legacy))
            .cloned()
            .unwrap_or_else(|| instance_name(namespace, row.user_id));
        return (Call::Remove(name.clone()), Some(name));
    }
    let name = match &row.instance_name {
        Some(stored) if is_ours(stored, namespace, owns_legacy) => stored.clone(),
        _ => instance_name(namespace, row.user_id),
    };
    (Call::Create(version, name.clone()), Some(name))
}

fn failure_record(
    id: &Value,
    name: &Value,
    attempts: i32,
    err: &ApiError,
    policy: &RetryPolicy,
) -> (Value, bool) {
    let decision = policy.decide(attempts.max(1) as u32, err.kind, random_unit());
    let retry_in_ms = match decision {
        Decision::RetryAfter(d) => Some(d.as_millis() as u64),
        Decision::GiveUp => None,
    };
    let record = json!({
        "id": id, "instance_name": name, "ok": false, "error": err.message,
        "http_status": err.http_status, "error_kind": err.kind.as_str(), "retry_in_ms": retry_in_ms,
    });
    (record, retry_in_ms.is_some())
}

#[pg_extern(security_definer)]
#[search_path(pg_catalog, @extschema@)]
pub fn evoq_process_queue() -> pgrx::JsonB {
    require_working_attachments();
    let mut run = Run::start("process_queue");
    let policy = RetryPolicy {
        max_attempts: run.tunables.max_attempts,
        base: run.tunables.backoff_base,
        cap: run.tunables.backoff_max,
    };
    let webhook: Option<Webhook> = run.connection.webhook.clone();
    let namespace = run.connection.namespace.clone();
    let owns_legacy_names = run.connection.owns_legacy_names;
    let mut tally = Tally {
        requeued: apply_requeue_requests(),
        ..Tally::default()
    };
    let webhook_version = json!(webhook.as_ref().and(run.connection.webhook_version.clone()));
    let client = run.client.clone();
    let mut pool = run.pool(move |call: Call| match call {
        Call::Create(version, name) => client
            .provision(version, &name, webhook.as_ref())
            .map(Done::Created),
        Call::Remove(name) => client.remove(&name).map(|_| Done::Removed),
    });

    let stopped = run.circuit_blocks().unwrap_or_else(|| loop {
        if run.out_of_time() {
            break "time_budget";
        }
        // The dialect first, before any row is claimed: a server that cannot even answer GET /
        // costs no row an attempt.
        let version = match run.version() {
            Ok(v) => v,
            Err(e) => {
                run.count_error(&e);
                if e.error_class() == ErrorClass::Deadline {
                    break "time_budget";
                }
                run.trip(&e.message);
                break "circuit_open";
            }
        };
        let stop = in_batch_context(|| {
            let rows: Vec<ClaimedRow> = call_json(
                "SELECT evoq._claim_queue($1)",
                &[run.tunables.batch_size.into()],
            );
            if rows.is_empty() {
                return Some("drained");
            }
            tally.batches += 1;
            tally.claimed += rows.len() as u64;
            let (calls, names): (Vec<Call>, Vec<Option<String>>) = rows
                .iter()
                .map(|r| call_for(r, version, &namespace, owns_legacy_names))
                .unzip();

            // None: no answer before the run's deadline.
            let answers: Vec<Option<Result<Done, ApiError>>> = run.call_all(&mut pool, calls);
            // Unanswered calls are not failures of the server's: they do not open the circuit.
            let errors: Vec<Option<&ApiError>> = answers
                .iter()
                .map(|a| a.as_ref().and_then(|o| o.as_ref().err()))
                .collect();
            let verdict = circuit_verdict(&errors);
            run.maybe_forget_version(&errors.iter().flatten().copied().collect::<Vec<_>>());
            let outcomes: Vec<Result<Done, ApiError>> = answers
                .into_iter()
                .zip(&rows)
                .map(|(a, r)| {
                    a.unwrap_or_else(|| {
                        Err(run.budget_error(if r.action == "delete" {
                            "DELETE /instance/logout, /instance/delete"
                        } else {
                            "POST /instance/create"
                        }))
                    })
                })
                .collect();
            for e in outcomes.iter().filter_map(|o| o.as_ref().err()) {
                run.count_error(e);
            }

            // The server or the configuration failed, not the rows: they go back untouched.
            if let Some(cause) = verdict {
                let claims: Vec<Value> = rows
                    .iter()
                    .map(|r| {
                        json!({"id": r.id, "prev_status": r.prev_status, "prev_updated_at": r.prev_updated_at})
                    })
                    .collect();
                Spi::run_with_args(
                    "SELECT evoq._release_queue($1)",
                    &[pgrx::JsonB(Value::Array(claims)).into()],
                )
                .unwrap_or_else(|e| {
                    crate::errors::EvoqError::internal("could not release a batch", e).raise()
                });
                tally.released += rows.len() as u64;
                run.trip(&cause);
                return Some("circuit_open");
            }
            run.batch_went_through();

            let mut records = Vec::with_capacity(rows.len());
            for ((row, name), outcome) in rows.iter().zip(&names).zip(&outcomes) {
                match outcome {
                    Ok(Done::Created(p)) => {
                        if p.adopted {
                            tally.adopted += 1
                        } else {
                            tally.created += 1
                        }
                        let name = name.as_deref().unwrap_or_default();
                        records.push(success_record(row.id, name, p, &webhook_version));
                    }
                    Ok(Done::Removed) => {
                        tally.deleted += 1;
                        records.push(json!({
                            "id": row.id, "instance_name": name, "ok": true, "action": "delete",
                        }));
                    }
                    Err(err) => {
                        let (rec, retrying) = failure_record(
                            &json!(row.id),
                            &json!(name),
                            row.attempts,
                            err,
                            &policy,
                        );
                        if retrying {
                            tally.retrying += 1
                        } else {
                            tally.failed += 1
                        }
                        records.push(rec);
                    }
                }
            }
            let attempts: std::collections::HashMap<String, i32> = rows
                .iter()
                .map(|r| (r.id.to_string(), r.attempts))
                .collect();
            tally.unrecordable += record(
                "SELECT evoq._record_queue_results($1::jsonb)",
                records,
                run.protect_next_batch(),
                |rec, message| {
                    let attempts = rec["id"]
                        .as_str()
                        .and_then(|id| attempts.get(id))
                        .copied()
                        .unwrap_or(1);
                    failure_record(
                        &rec["id"],
                        &rec["instance_name"],
                        attempts,
                        &ApiError::transient(message),
                        &policy,
                    )
                    .0
                },
            );
            None
        });
        if let Some(reason) = stop {
            break reason;
        }
    });

    let summary = json!({
        "claimed": tally.claimed, "created": tally.created, "adopted": tally.adopted,
        "retrying": tally.retrying, "failed": tally.failed, "released": tally.released,
        "unrecordable": tally.unrecordable, "requeued": tally.requeued, "batches": tally.batches,
        "deleted": tally.deleted, "stopped": stopped,
    });
    run.finish(summary)
}
