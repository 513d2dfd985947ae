//! Webhook deliveries the listener received, applied by the worker's main thread through
//! `webhook::ingest` (evoq_webhook's own path: the same secret check, the same guarded UPDATE,
//! the same counters). Each delivery runs in a subtransaction, so a refused or broken one
//! changes nothing and does not undo the others of its group; the caller commits, then answers.

use crate::listener::{Delivery, Verdict};
use crate::webhook::Settings;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use serde_json::Value;

/// Deliveries applied per transaction: each takes a subtransaction, and a transaction with more
/// than 64 that wrote overflows PostgreSQL's per-backend cache of them.
pub const GROUP: usize = 32;

/// Applies each delivery in its own subtransaction; returns the verdicts to give once the
/// transaction committed.
pub fn apply(group: Vec<Delivery>) -> Vec<(Delivery, Verdict)> {
    // Read once for the group: a change of the secret commits before or after the whole group.
    let settings = crate::webhook::settings();
    group
        .into_iter()
        .map(|d| {
            let verdict = verdict_for(&settings, &d.body, d.secret.as_deref());
            (d, verdict)
        })
        .collect()
}

fn verdict_for(settings: &Settings, body: &[u8], secret: Option<&str>) -> Verdict {
    // The secret first, before a byte of the body is parsed: a sender without it costs a
    // comparison and a counter (the listener itself refuses most of them earlier).
    if settings.accepted_secrets().is_empty() {
        return Verdict::Failed("evoq is not configured in this database yet".into());
    }
    if !settings.accepts(secret) {
        let _ = Spi::run("SELECT pg_catalog.nextval('evoq.webhooks_rejected')");
        return Verdict::Rejected(
            if secret.is_some() {
                "webhook delivery refused: wrong webhook secret"
            } else {
                "webhook delivery refused: no webhook secret"
            }
            .into(),
        );
    }
    let payload: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            // Counted like evoq_webhook's refusals; PostgREST would not even have called it.
            let _ = Spi::run("SELECT pg_catalog.nextval('evoq.webhooks_rejected')");
            return Verdict::Invalid(format!("the body is not JSON: {e}"));
        }
    };
    match crate::subxact::attempt_coded(|| crate::webhook::ingest_with(settings, payload, secret)) {
        Ok(result) if result["result"] == "ignored" => Verdict::Ignored,
        Ok(_) => Verdict::Applied,
        Err((PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, message)) => {
            Verdict::Invalid(message)
        }
        // Anything else is evoq's or the database's trouble, a permission the worker's role
        // lacks included (the secret was right, so 401 would be a lie, and the Evolution server
        // never retries a 401): 503, and the sender tries again later.
        Err((_, message)) => Verdict::Failed(message),
    }
}
