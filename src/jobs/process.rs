//! evoq_process_queue(): create an Evolution instance for every due queue row.

use super::run::{budget_error, call_json, in_batch_context, record, Run};
use crate::evolution::{ApiError, ApiVersion, Provisioned, Webhook};
use crate::names::instance_name;
use crate::policy::{random_unit, Decision, RetryPolicy};
use pgrx::prelude::*;
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Debug, Deserialize)]
struct ClaimedRow {
    id: uuid::Uuid,
    user_id: uuid::Uuid,
    attempts: i32,
}

#[derive(Default)]
struct Tally {
    claimed: u64,
    created: u64,
    adopted: u64,
    retrying: u64,
    failed: u64,
    batches: u64,
}

fn success_record(id: uuid::Uuid, name: &str, p: &Provisioned) -> Value {
    let qr = p.instance.qr.clone().unwrap_or_default();
    json!({
        "id": id, "instance_name": name, "ok": true,
        "instance_id": p.instance.instance_id, "token": p.instance.token,
        "instance_status": p.instance.status,
        "qr_code": qr.base64, "qr_text": qr.code, "pairing_code": qr.pairing_code, "qr_count": qr.count,
    })
}

fn failure_record(
    id: uuid::Uuid,
    name: &str,
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
    let mut run = Run::start("process_queue");
    let policy = RetryPolicy {
        max_attempts: run.tunables.max_attempts,
        base: run.tunables.backoff_base,
        cap: run.tunables.backoff_max,
    };
    let webhook: Option<Webhook> = run.connection.webhook.clone();
    let mut tally = Tally::default();
    let client = run.client.clone();
    let mut pool = run.pool(move |(version, name): (ApiVersion, String)| {
        client.provision(version, &name, webhook.as_ref())
    });

    let stopped = loop {
        if run.out_of_time() {
            break "time_budget";
        }
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
            let jobs: Vec<(ClaimedRow, String)> = rows
                .into_iter()
                .map(|r| {
                    let n = instance_name(r.user_id);
                    (r, n)
                })
                .collect();

            // One version probe per run; if the server cannot be reached at all, every row of
            // the batch gets that error and the run stops (all failures are server-wide).
            let outcomes: Vec<Result<Provisioned, ApiError>> = match run.version() {
                Err(e) => jobs.iter().map(|_| Err(e.clone())).collect(),
                Ok(version) => {
                    let calls = jobs.iter().map(|(_, n)| (version, n.clone())).collect();
                    run.call_all(&mut pool, calls)
                        .into_iter()
                        .map(|o| o.unwrap_or_else(|| Err(budget_error(&run))))
                        .collect()
                }
            };

            let mut records = Vec::with_capacity(jobs.len());
            let mut server_wide_failures = 0;
            for ((row, name), outcome) in jobs.iter().zip(&outcomes) {
                match outcome {
                    Ok(p) => {
                        if p.adopted {
                            tally.adopted += 1
                        } else {
                            tally.created += 1
                        }
                        records.push(success_record(row.id, name, p));
                    }
                    Err(err) => {
                        let (rec, retrying) =
                            failure_record(row.id, name, row.attempts, err, &policy);
                        if retrying {
                            tally.retrying += 1
                        } else {
                            tally.failed += 1
                        }
                        if err.server_wide {
                            server_wide_failures += 1
                        }
                        run.note_error(&err.message);
                        records.push(rec);
                    }
                }
            }
            record("SELECT evoq._record_queue_results($1)", records);
            // Unreachable server or rejected key: the rest of the queue would fail the same way.
            (server_wide_failures > 0 && server_wide_failures == outcomes.len())
                .then_some("api_unreachable")
        });
        if let Some(reason) = stop {
            break reason;
        }
    };

    let summary = json!({
        "claimed": tally.claimed, "created": tally.created, "adopted": tally.adopted,
        "retrying": tally.retrying, "failed": tally.failed, "batches": tally.batches,
        "stopped": stopped, "last_error": run.last_error,
    });
    run.finish(summary)
}
