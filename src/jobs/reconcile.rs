//! evoq_reconcile(), and the reconcile the QR refresh runs every `evoq.reconcile_interval_ms`:
//! `GET /instance/fetchInstances` compared with the rows (see `crate::reconcile` for why and
//! how). The SQL side is here: the lease, the comparison (`evoq._reconcile_apply`), the
//! records. The calls run on threads while the backend waits, honouring cancels; the background
//! worker drives the same steps across transactions without waiting (`worker::reconcile`).

use super::run::{call_json, Run};
use crate::errors::{EvoqError, SpiResult};
use crate::evolution::{ApiError, ListedInstance};
use crate::reconcile::{
    follow_up, outcome, sort_listing, FollowUps, Plan, Tally, FOLLOW_UPS_LEASE_ROUNDS,
    FOLLOW_UP_THREADS, MAX_FOLLOW_UPS,
};
use crate::settings::{Connection, Tunables};
use pgrx::prelude::*;
use serde_json::{json, Value};
use std::time::Instant;

const WHAT: &str = "GET /instance/fetchInstances";

/// How long a reconcile holds its server's lease: its listing and every round of its calls at
/// the request timeout (a logout and a delete per orphan), and 10 s. Only a reconcile that died
/// (a crash, a killed worker) leaves it to run out.
pub fn lease_ms(t: &Tunables) -> i64 {
    let timeout = t.request_timeout.as_millis() as i64;
    timeout * (1 + 2 * FOLLOW_UPS_LEASE_ROUNDS as i64) + 10_000
}

/// The ms until `server`'s next reconcile is due (0: now); None when turned off.
pub fn due_in_ms(server: &str) -> Option<i64> {
    Spi::get_one_with_args::<i64>(
        "SELECT evoq._reconcile_due_ms($1, $2)",
        &[
            server.into(),
            (crate::settings::RECONCILE_INTERVAL_MS.get() as i64).into(),
        ],
    )
    .or_internal("reading when the next reconcile is due")
}

/// Takes the server's lease; the time the listing is asked for, or None when another reconcile
/// holds it.
pub fn begin(server: &str, t: &Tunables) -> Option<pgrx::datum::TimestampWithTimeZone> {
    Spi::get_one_with_args::<pgrx::datum::TimestampWithTimeZone>(
        "SELECT evoq._reconcile_begin($1, $2)",
        &[server.into(), lease_ms(t).into()],
    )
    .or_internal("starting a reconcile")
}

/// The comparison: what needs no call is applied, the calls that remain are planned.
pub fn apply(
    server: &str,
    listed: Vec<ListedInstance>,
    listed_at: pgrx::datum::TimestampWithTimeZone,
    connection: &Connection,
    tally: &mut Tally,
) -> Plan {
    tally.listed = listed.len() as u64;
    let sorted = sort_listing(listed, &connection.namespace, connection.owns_legacy_names);
    tally.foreign = sorted.foreign as u64;
    let ours = serde_json::to_string(&sorted.ours)
        .unwrap_or_else(|e| EvoqError::internal("could not encode the listing", e).raise());
    drop(sorted);
    let grace = crate::settings::ORPHAN_GRACE_MS.get() as i64;
    let mut plans: Vec<Plan> = call_json(
        "SELECT jsonb_build_array(evoq._reconcile_apply($1, $2::jsonb, $3, $4, $5))",
        &[
            server.into(),
            ours.into(),
            listed_at.into(),
            grace.into(),
            (MAX_FOLLOW_UPS as i32).into(),
        ],
    );
    plans.pop().unwrap_or_else(|| {
        EvoqError::internal("evoq._reconcile_apply returned nothing", "").raise()
    })
}

/// Writes the answers of the plan's calls and ends the reconcile (its summary, its lease).
pub fn finish(
    server: &str,
    began: pgrx::datum::TimestampWithTimeZone,
    plan: Option<&Plan>,
    answers: &FollowUps,
    mut tally: Tally,
    failure: Option<&ApiError>,
    started: Instant,
) -> Value {
    let (records, removals, last_error) = match plan {
        Some(plan) => {
            let out = outcome(plan, answers, &mut tally);
            (out.records, out.removals, out.last_error)
        }
        None => (Vec::new(), json!([]), None),
    };
    if !records.is_empty() {
        let text = serde_json::to_string(&records)
            .unwrap_or_else(|e| EvoqError::internal("could not encode results", e).raise());
        Spi::run_with_args(
            "SELECT evoq._record_refresh_results($1::jsonb)",
            &[text.into()],
        )
        .unwrap_or_else(|e| EvoqError::internal("recording the reconcile's findings", e).raise());
    }
    let last_error = failure.map(|e| e.message.clone()).or(last_error);
    let mut summary = serde_json::to_value(&tally).unwrap_or_else(|_| json!({}));
    summary["server"] = json!(server);
    summary["elapsed_ms"] = json!(started.elapsed().as_millis() as u64);
    summary["last_error"] = json!(last_error);
    summary["stopped"] = json!(if failure.is_some() {
        "listing_failed"
    } else {
        "done"
    });
    Spi::run_with_args(
        "SELECT evoq._reconcile_finish($1, $2, $3, $4, $5)",
        &[
            server.into(),
            began.into(),
            pgrx::JsonB(summary.clone()).into(),
            last_error.into(),
            pgrx::JsonB(removals).into(),
        ],
    )
    .unwrap_or_else(|e| EvoqError::internal("could not record the reconcile", e).raise());
    summary
}

/// Why a reconcile stopped when evoq_configure committed new settings during it.
pub fn settings_replaced() -> ApiError {
    ApiError::transient(
        "evoq_configure changed the settings during the reconcile; the next one uses the new ones",
    )
}

/// One reconcile of the server, now, in this backend (its calls on threads, waited for).
pub fn reconcile_now(run: &mut Run, server: &str) -> Value {
    let started = Instant::now();
    let Some(listed_at) = begin(server, &run.tunables) else {
        return json!({"server": server, "stopped": "busy",
                      "note": "another reconcile of this server is in progress"});
    };
    let mut tally = Tally::default();
    let listing = run
        .call_one(|client| client.list_instances())
        .unwrap_or_else(|| Err(run.budget_error(WHAT)))
        // evoq_configure pointed evoq at another server meanwhile: this listing is not that one's.
        .and_then(|listed| match run.settings_replaced() {
            true => Err(settings_replaced()),
            false => Ok(listed),
        });
    let listed = match listing {
        Ok(listed) => listed,
        Err(e) => {
            let none = FollowUps::default();
            return finish(server, listed_at, None, &none, tally, Some(&e), started);
        }
    };
    let plan = apply(server, listed, listed_at, &run.connection, &mut tally);
    let (checks, remove) = (plan.checks.clone(), plan.remove.clone());
    let answers = if checks.is_empty() && remove.is_empty() {
        FollowUps::default()
    } else {
        run.call_one(move |client| {
            follow_up(client, checks.clone(), remove.clone(), FOLLOW_UP_THREADS)
        })
        .unwrap_or_default()
    };
    finish(
        server,
        listed_at,
        Some(&plan),
        &answers,
        tally,
        None,
        started,
    )
}

/// Reconciles the server when its interval has passed (the QR refresh calls this at its end,
/// within what is left of its own time budget, `deadline`); the summary, or None when not due.
pub fn reconcile_if_due(server: &str, deadline: Instant) -> Option<Value> {
    let due = due_in_ms(server)?;
    if due > 0 || Instant::now() >= deadline {
        return None;
    }
    let mut run = Run::start("refresh_qr", server);
    run.deadline = run.deadline.min(deadline);
    // An open circuit waits for the refresh's own probe (none is made twice in one run).
    if run.circuit_state() != super::run::CircuitState::Closed {
        return None;
    }
    Some(reconcile_now(&mut run, server))
}

/// Compares what the Evolution server holds (`GET /instance/fetchInstances`) with evoq's rows,
/// now, and applies what it finds: instances the server lost are created again, orphans of this
/// deployment's namespace unowned for `evoq.orphan_grace_ms` are logged out and deleted, states
/// that drifted are checked with connectionState. `server`: one server's name; NULL reconciles
/// each in turn (0.7.0), and returns one summary per server under "servers" when there are
/// several.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn evoq_reconcile(server: default!(Option<&str>, "NULL")) -> pgrx::JsonB {
    let servers = match server {
        Some(name) => {
            crate::servers::require(name);
            vec![name.to_string()]
        }
        None => crate::servers::names(),
    };
    let mut each: Vec<(String, Value)> = servers
        .into_iter()
        .map(|server| {
            let mut run = Run::start("refresh_qr", &server);
            let summary = match run.circuit_blocks() {
                Some(reason) => json!({"server": server, "stopped": reason,
                    "note": "the circuit is open: the server failed every call; the reconcile waits for it"}),
                None => reconcile_now(&mut run, &server),
            };
            (server, summary)
        })
        .collect();
    if each.len() == 1 {
        return pgrx::JsonB(each.pop().map(|(_, s)| s).unwrap_or(Value::Null));
    }
    pgrx::JsonB(json!({"servers": each.into_iter().collect::<serde_json::Map<String, Value>>()}))
}
