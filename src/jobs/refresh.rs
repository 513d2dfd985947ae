//! evoq_refresh_qr(): keep the QR of every connecting instance fresh, and notice when the user
//! has scanned it.

use super::run::{apply_requeue_requests, call_json, in_batch_context, record, Run};
use crate::evolution::{ApiError, ConnectOutcome};
use crate::policy::circuit_verdict;
use pgrx::prelude::*;
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Debug, Deserialize)]
struct ClaimedInstance {
    id: uuid::Uuid,
    instance_name: String,
    qr_text: Option<String>,
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
}

fn outcome_record(
    row: &ClaimedInstance,
    outcome: &Result<ConnectOutcome, ApiError>,
    tally: &mut Tally,
) -> Value {
    match outcome {
        Ok(ConnectOutcome::Open) => {
            tally.opened += 1;
            json!({"id": row.id, "outcome": "open"})
        }
        Ok(ConnectOutcome::Lost) => {
            tally.lost += 1;
            json!({"id": row.id, "outcome": "lost"})
        }
        Ok(ConnectOutcome::NoQrYet { count }) => {
            tally.unchanged += 1;
            json!({"id": row.id, "outcome": "no_qr", "qr_count": count})
        }
        Ok(ConnectOutcome::Qr(qr)) => {
            if qr.code.is_some() && qr.code == row.qr_text {
                tally.unchanged += 1
            } else {
                tally.new_qr += 1
            }
            json!({"id": row.id, "outcome": "qr", "qr_code": qr.base64, "qr_text": qr.code,
                   "pairing_code": qr.pairing_code, "qr_count": qr.count})
        }
        Err(e) => {
            tally.errors += 1;
            json!({"id": row.id, "outcome": "error", "error": e.message})
        }
    }
}

#[pg_extern(security_definer)]
#[search_path(pg_catalog, @extschema@)]
pub fn evoq_refresh_qr() -> pgrx::JsonB {
    let mut run = Run::start("refresh_qr");
    let mut tally = Tally::default();
    let client = run.client.clone();
    let mut pool = run.pool(move |name: String| client.connect(&name));

    let stopped = run.circuit_blocks().unwrap_or_else(|| loop {
        if run.out_of_time() {
            break "time_budget";
        }
        let stop = in_batch_context(|| {
            let rows: Vec<ClaimedInstance> = call_json(
                "SELECT evoq._claim_refresh($1, $2)",
                &[
                    run.tunables.batch_size.into(),
                    run.tunables.qr_refresh_interval_ms.into(),
                ],
            );
            if rows.is_empty() {
                return Some("done");
            }
            tally.batches += 1;
            tally.checked += rows.len() as u64;
            let names: Vec<String> = rows.iter().map(|r| r.instance_name.clone()).collect();
            let answers = run.call_all(&mut pool, names);
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
            let outcomes: Vec<Result<ConnectOutcome, ApiError>> = answers
                .into_iter()
                .map(|a| a.unwrap_or_else(|| Err(run.budget_error("GET /instance/connect"))))
                .collect();
            let mut records = Vec::with_capacity(rows.len());
            for (row, outcome) in rows.iter().zip(&outcomes) {
                if let Err(e) = outcome {
                    run.count_error(e);
                }
                records.push(outcome_record(row, outcome, &mut tally));
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

    let summary = json!({
        "checked": tally.checked, "new_qr": tally.new_qr, "unchanged": tally.unchanged,
        "opened": tally.opened, "lost": tally.lost, "errors": tally.errors, "batches": tally.batches,
        "unrecordable": tally.unrecordable, "requeued": tally.requeued, "stopped": stopped,
    });
    run.finish(summary)
}
