//! Webhook deliveries the listener received, applied by the worker's main thread through
//! `webhook::ingest` (evoq_webhook's own path: the same secret check, the same guarded UPDATE,
//! the same counters). Each delivery runs in a subtransaction, so a refused or broken one
//! changes nothing and does not undo the others of its group; the caller commits, then answers.

use crate::listener::{Delivery, Verdict};
use crate::webhook::Settings;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use serde_json::Value;
use std::collections::HashSet;

/// Deliveries applied per transaction: each takes a subtransaction, and a transaction with more
/// than 64 that wrote overflows PostgreSQL's per-backend cache of them.
pub const GROUP: usize = 32;

/// How long a delivery waits for its instance's row when another session holds it (a pg_cron
/// run, an operator's transaction): then it gets 503 and the server sends it again. The
/// worker's own lock_timeout (2 s) is for its other steps; a delivery must not hold up the
/// deliveries behind it, nor the sign-ups the main loop claims between groups.
const DELIVERY_LOCK_TIMEOUT: &str = "100ms";

/// Applies each delivery in its own subtransaction; returns the verdicts to give once the
/// transaction committed. A delivery whose request already gave up waiting is not applied (the
/// server sends it again); one for an instance whose row another delivery of this group found
/// locked is answered 503 without waiting again.
pub fn apply(group: Vec<Delivery>) -> Vec<(Delivery, Verdict)> {
    let _ = Spi::run_with_args(
        "SELECT pg_catalog.set_config('lock_timeout', $1, true)",
        &[DELIVERY_LOCK_TIMEOUT.into()],
    );
    // Read once for the group: a change of the secret commits before or after the whole group.
    let settings = crate::webhook::settings();
    let mut locked = HashSet::new();
    group
        .into_iter()
        .filter(|d| !d.abandoned())
        .map(|d| {
            let verdict = verdict_for(&settings, &d.body, d.secret.as_deref(), &mut locked);
            (d, verdict)
        })
        .collect()
}

fn verdict_for(
    settings: &Settings,
    body: &[u8],
    secret: Option<&str>,
    locked: &mut HashSet<String>,
) -> Verdict {
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
    let instance = payload
        .get("instance")
        .and_then(Value::as_str)
        .map(str::to_string);
    if instance.as_ref().is_some_and(|i| locked.contains(i)) {
        return Verdict::Failed(ROW_LOCKED.into());
    }
    match crate::subxact::attempt_coded(|| crate::webhook::ingest_with(settings, payload, secret)) {
        Ok(result) if result["result"] == "ignored" => Verdict::Ignored,
        Ok(_) => Verdict::Applied,
        Err((PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, message)) => {
            Verdict::Invalid(message)
        }
        Err((PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE, _)) => {
            locked.extend(instance);
            Verdict::Failed(ROW_LOCKED.into())
        }
        // Anything else is evoq's or the database's trouble, a permission the worker's role
        // lacks included (the secret was right, so 401 would be a lie, and the Evolution server
        // never retries a 401): 503, and the sender tries again later.
        Err((_, message)) => Verdict::Failed(message),
    }
}

/// What a delivery for a row another session holds is answered (with 503: sent again).
const ROW_LOCKED: &str =
    "the instance's row is locked by another session (a pg_cron run?); send it again";
