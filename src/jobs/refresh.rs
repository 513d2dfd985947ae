//! evoq_refresh_qr(): everything an existing instance needs from the server, in one run:
//! - connecting instances: the current QR, and noticing the scan;
//! - connecting instances past the QR window: a logout, so an abandoned sign-up stops costing
//!   the server a socket and a QR loop (the row becomes `expired`);
//! - open instances: a periodic connectionState, so a phone that unlinked the device is noticed
//!   without webhooks;
//! - instances registered before the webhook changed: the new URL, headers and secret;
//! - expired or deleted instances whose deliveries keep coming (the server still reconnects
//!   them): a logout again, on a bounded schedule (`evoq._claim_refresh`).
//!
//! A `close`, `refused` or `expired` instance is never connected from here: connect on a closed
//! instance starts a new socket, and only `evoq_reconnect` (the user asking) may do that.

use super::run::{apply_requeue_requests, call_json, in_batch_context, record, Run};
use crate::evolution::{ApiError, ApiVersion, ConnectOutcome, LiveState, Webhook};
use crate::phone::Phone;
use crate::pipeline::{Claimed, Flow, Pipeline, Source, Waker};
use crate::policy::circuit_verdict;
use pgrx::prelude::*;
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Connect,
    Expire,
    Check,
    Repoint,
    /// 0.5.0: log out again an expired or deleted instance the server still reconnects.
    Relogout,
    /// 0.5.0: link with phone number: a logout, then a connect with the user's number (a
    /// `connecting` instance ignores a number), whose reply brings the pairing code.
    Pair,
}

#[derive(Debug, Deserialize)]
pub struct ClaimedInstance {
    id: uuid::Uuid,
    instance_name: String,
    qr_text: Option<String>,
    /// The row's status at the claim.
    status: String,
    /// The row's updated_at at the claim: its outcome is written only if nothing changed it
    /// since (the worker does not hold the row while it calls).
    #[serde(default)]
    claimed_at: Value,
    task: Task,
    /// For `pair`: the number the user gave.
    #[serde(default)]
    number: Option<Phone>,
}

/// What a call answered.
pub enum Answer {
    Connect(ConnectOutcome),
    /// Past the window: logged out (or nothing was left to log out).
    LoggedOut,
    /// Past the window, but scanned since the last look: nothing to log out.
    ScannedInTime,
    State(LiveState),
    /// webhook/set answered; false: the server no longer knows the instance.
    Repointed(bool),
    /// A logout tried again; with the error it met, if any. Never a failure of the run's: such
    /// an instance is expected to be half gone (404, "not connected" while it flaps).
    Relogged(Option<String>),
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
    expired: u64,
    closed: u64,
    still_open: u64,
    repointed: u64,
    relogged: u64,
    paired: u64,
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
        Ok(Answer::Relogged(_)) => {
            tally.relogged += 1;
            json!({"id": row.id, "outcome": "relogged"})
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
        Task::Relogout => "DELETE /instance/logout",
        Task::Pair => "DELETE /instance/logout, GET /instance/connect",
    }
}

/// What a pool thread calls for one instance.
pub type RefreshCall = (Task, String, Option<ApiVersion>, Option<Phone>);

/// The instances with something to do, as a pipeline source. Owns the run it belongs to.
pub struct RefreshJob {
    pub run: Run,
    webhook: Option<Webhook>,
    webhook_version: Value,
    /// A webhook/set that failed is tried again by the next run, not over and over in this one.
    repoint: bool,
    repoint_failed: bool,
    /// Connecting instances whose last QR (polled or delivered by webhook) is younger than this
    /// are not asked (0: the QR's age does not matter, only the last ask's).
    qr_fresh_ms: i64,
    tally: Tally,
}

impl RefreshJob {
    /// `repoint`: whether instances registered before the webhook changed are asked for now.
    pub fn start(run: Run, qr_fresh_ms: i64, repoint: bool) -> RefreshJob {
        RefreshJob {
            webhook: run.connection.webhook.clone(),
            webhook_version: json!(run.connection.webhook_version),
            repoint,
            repoint_failed: false,
            qr_fresh_ms,
            tally: Tally::default(),
            run,
        }
    }

    /// What the pool's threads run for an instance.
    pub fn work(&self) -> impl Fn(RefreshCall) -> Result<Answer, ApiError> + Send + Sync + 'static {
        let client = self.run.client.clone();
        let webhook = self.webhook.clone();
        move |(task, name, version, number): RefreshCall| match task {
            Task::Connect => client.connect(&name).map(Answer::Connect),
            Task::Pair => match &number {
                Some(number) => client.pair(&name, number).map(Answer::Connect),
                None => client.connect(&name).map(Answer::Connect),
            },
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
            Task::Relogout => Ok(Answer::Relogged(
                client.logout(&name).err().map(|e| e.message),
            )),
        }
    }

    /// Whether a webhook/set failed in this run (the worker then leaves repoints alone for a
    /// while instead of retrying them cycle after cycle).
    pub fn repoint_failed(&self) -> bool {
        self.repoint_failed
    }

    /// Applies the requeue requests the lost instances made, retires a rotated secret every
    /// instance has replaced, and remembers the run for evoq_status.
    pub fn finish(self, stopped: &str, groups: u64) -> pgrx::JsonB {
        let job = self.run.job;
        let (summary, last_error) = self.summarize(stopped, groups);
        super::run::record_run(job, summary, last_error)
    }

    /// What `finish` does but the record: the summary and last error (see `lanes`).
    pub fn summarize(mut self, stopped: &str, groups: u64) -> (Value, Option<String>) {
        // Lost instances were turned into requeue requests; apply those no run holds now, so
        // the queue row is pending as soon as this run commits.
        self.tally.requeued = apply_requeue_requests();
        // Once every instance of the server carries its current secret, the one before a
        // rotation is refused (0.7.0: each server's own; `default`'s is evoq.settings').
        let server = self.run.server.as_str();
        if server == crate::servers::DEFAULT_SERVER {
            crate::subxact::write_shared(
                "UPDATE evoq.settings s SET webhook_secret_previous = NULL
                 WHERE webhook_secret_previous IS NOT NULL
                   AND NOT EXISTS (SELECT 1 FROM evolution_instances i
                                   WHERE i.instance_status IN ('connecting', 'open', 'close', 'refused', 'expired')
                                     AND i.server = 'default'
                                     AND (i.webhook_set_at IS NULL OR i.webhook_set_at < s.webhook_changed_at)
                                     AND evoq._is_ours(i.instance_name, s.namespace, s.owns_legacy_names))",
                &[],
            );
        } else {
            crate::subxact::write_shared(
                "UPDATE evoq.servers v SET webhook_secret_previous = NULL
                 FROM evoq.settings s
                 WHERE v.name = $1 AND v.webhook_secret_previous IS NOT NULL
                   AND NOT EXISTS (SELECT 1 FROM evolution_instances i
                                   WHERE i.instance_status IN ('connecting', 'open', 'close', 'refused', 'expired')
                                     AND i.server = v.name
                                     AND (i.webhook_set_at IS NULL
                                          OR i.webhook_set_at < greatest(s.webhook_changed_at, v.webhook_changed_at))
                                     AND evoq._is_ours(i.instance_name, s.namespace, s.owns_legacy_names))",
                &[server.into()],
            );
        }
        let t = &self.tally;
        let summary = json!({
            "checked": t.checked, "new_qr": t.new_qr, "unchanged": t.unchanged,
            "opened": t.opened, "lost": t.lost, "errors": t.errors, "batches": groups,
            "unrecordable": t.unrecordable, "requeued": t.requeued, "expired": t.expired,
            "closed": t.closed, "still_open": t.still_open, "repointed": t.repointed,
            "relogged": t.relogged, "paired": t.paired, "stopped": stopped,
        });
        self.run.summarize(summary)
    }

    fn record_group(
        &mut self,
        done: Vec<(ClaimedInstance, Option<Result<Answer, ApiError>>)>,
    ) -> Flow {
        let (rows, answers): (Vec<ClaimedInstance>, Vec<Option<Result<Answer, ApiError>>>) =
            done.into_iter().unzip();
        let errors: Vec<Option<&ApiError>> = answers
            .iter()
            .map(|a| a.as_ref().and_then(|o| o.as_ref().err()))
            .collect();
        if let Some(cause) = circuit_verdict(&errors) {
            // Nothing is recorded against the instances: the server is at fault.
            for e in errors.iter().flatten() {
                self.run.count_error(e);
            }
            self.run.trip(&cause);
            return Flow::Stop("circuit_open");
        }
        self.run.batch_went_through();
        let outcomes: Vec<Result<Answer, ApiError>> = answers
            .into_iter()
            .zip(&rows)
            .map(|(a, r)| a.unwrap_or_else(|| Err(self.run.budget_error(route(r.task)))))
            .collect();
        let mut records = Vec::with_capacity(rows.len());
        for (row, outcome) in rows.iter().zip(&outcomes) {
            if let Ok(Answer::Relogged(Some(message))) = outcome {
                self.run.note(format!(
                    "logging {} out again: {message}",
                    row.instance_name
                ));
            }
            if let Err(e) = outcome {
                self.run.count_error(e);
                if row.task == Task::Repoint {
                    self.repoint = false;
                    self.repoint_failed = true;
                }
            }
            let mut rec = outcome_record(row, outcome, &self.webhook_version, &mut self.tally);
            // The server took the number: its reply carries a pairing code. evoq lets the
            // number go then (and the row is connecting again even if the logout's own close
            // delivery came first: _record_refresh_results). Without a code (no QR yet, or the
            // server still connecting ignored the number) the number stays for the next
            // refresh; a lost instance keeps it for its creation.
            let took_number = matches!(
                outcome,
                Ok(Answer::Connect(ConnectOutcome::Qr(qr))) if qr.pairing_code.is_some()
            );
            if row.task == Task::Pair && took_number {
                rec["paired"] = json!(true);
                rec["number"] = json!(row.number.as_ref().map(|p| p.digits()));
                self.tally.paired += 1;
            }
            // Written only while the row is as claimed: a webhook delivery may have moved it on
            // while the call was in flight (the worker does not hold the row).
            rec["claimed_status"] = json!(row.status);
            rec["claimed_at"] = row.claimed_at.clone();
            records.push(rec);
        }
        self.tally.unrecordable += record(
            "SELECT evoq._record_refresh_results($1::jsonb)",
            records,
            self.run.protect_next_batch(),
            |rec, message| {
                json!({"id": rec["id"], "outcome": "error", "error": message,
                       "claimed_status": rec["claimed_status"], "claimed_at": rec["claimed_at"]})
            },
        );
        Flow::Continue
    }
}

impl Source for RefreshJob {
    type Row = ClaimedInstance;
    type Call = RefreshCall;
    type Answer = Result<Answer, ApiError>;

    /// Never claims ahead (`ahead` is ignored): a claim pushes the instance's due time
    /// (last_refresh_at, ...), which a release could not put back, so every row it claims is
    /// called at once.
    fn claim(&mut self, room: usize, _ahead: usize, busy: &[&ClaimedInstance]) -> Claimed<Self> {
        if self.run.settings_replaced() {
            return Claimed::hold();
        }
        let t = self.run.tunables;
        let busy: Vec<pgrx::Uuid> = busy
            .iter()
            .map(|r| pgrx::Uuid::from_bytes(*r.id.as_bytes()))
            .collect();
        let rows: Vec<ClaimedInstance> = in_batch_context(|| {
            call_json(
                "SELECT evoq._claim_refresh($1, $2, $3, $4, $5, $6, $7, $8)",
                &[
                    self.run.server.as_str().into(),
                    (room as i32).into(),
                    t.qr_refresh_interval_ms.into(),
                    t.qr_window_ms.into(),
                    t.state_check_interval_ms.into(),
                    self.repoint.into(),
                    busy.into(),
                    self.qr_fresh_ms.into(),
                ],
            )
        });
        self.tally.checked += rows.len() as u64;
        // Only a webhook/set has a dialect; the version is asked (or remembered) only then.
        let version = if rows.iter().any(|r| r.task == Task::Repoint) {
            match self.run.version() {
                Ok(v) => Some(v),
                Err(e) => {
                    self.run.count_error(&e);
                    None
                }
            }
        } else {
            None
        };
        let rows = rows
            .into_iter()
            .map(|r| {
                let call = (r.task, r.instance_name.clone(), version, r.number.clone());
                (r, call)
            })
            .collect();
        Claimed::of(rows, room)
    }

    /// Nothing to give back: it never claims ahead, so the pipeline never holds its rows
    /// uncalled.
    fn release(&mut self, rows: Vec<ClaimedInstance>) {
        debug_assert!(rows.is_empty(), "a QR refresh row was held uncalled");
    }

    fn record(&mut self, done: Vec<(ClaimedInstance, Option<Result<Answer, ApiError>>)>) -> Flow {
        in_batch_context(|| self.record_group(done))
    }
}

#[pg_extern(security_definer)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
pub fn evoq_refresh_qr() -> pgrx::JsonB {
    // 0.7.0: one run per server, side by side (see `lanes`)
    let waker = Waker::default();
    let servers = crate::servers::names();
    let several = servers.len() > 1;
    let jobs: Vec<(String, RefreshJob)> = servers
        .into_iter()
        .map(|server| {
            let job = RefreshJob::start(Run::start("refresh_qr", &server), 0, true);
            (server, job)
        })
        .collect();
    let deadline = jobs.iter().map(|(_, job)| job.run.deadline).min();
    // The servers whose circuit is due for its probe run after the others, their probes in
    // flight meanwhile (see `readiness`; `GET /` is asked only by a claim that repoints a
    // webhook of unknown dialect).
    let mut ended = super::readiness::run_in_two_rounds(
        jobs,
        false,
        |job| &job.run,
        |jobs, told| run_refresh_lanes(jobs, told, &waker, several),
    );
    // 0.6.0: every evoq.reconcile_interval_ms, each server's listing compared with its rows,
    // within this run's time budget (a cron slot is not held longer than before)
    if let Some(deadline) = deadline {
        for (server, (summary, _)) in ended.iter_mut() {
            if let Some(reconciled) = super::reconcile::reconcile_if_due(server, deadline) {
                summary["reconcile"] = reconciled;
            }
        }
    }
    super::lanes::record("refresh_qr", ended)
}

/// Gets each server's run ready (with its health probe's answer if it was asked ahead) and runs
/// the lanes of those that are, side by side.
fn run_refresh_lanes(
    jobs: Vec<(String, RefreshJob)>,
    told: Vec<super::readiness::Answers>,
    waker: &Waker,
    several: bool,
) -> Vec<super::lanes::Ended> {
    let mut ended = Vec::new();
    let mut lanes = Vec::new();
    for ((server, mut job), told) in jobs.into_iter().zip(told) {
        match job.run.circuit_blocks_given(told.health) {
            Some(reason) => ended.push((server, job.summarize(reason, 0))),
            None => {
                let grouping = super::process::sql_grouping(&job.run);
                // A refresh claim sorts every due instance whatever it takes: a quarter of the
                // slots at a time, not one per finished call.
                let quarter = (job.run.tunables.concurrency / 4).max(1);
                let pool = super::lanes::woken_by(job.run.pool(job.work()), waker, several);
                let pipe = Pipeline::new(pool, grouping).claiming_at_least(quarter);
                lanes.push((server, pipe, job));
            }
        }
    }
    ended.extend(super::lanes::run(
        lanes,
        waker,
        |job| job.run.deadline,
        |job, why, groups| job.summarize(if why == "drained" { "done" } else { why }, groups),
    ));
    ended
}
