//! evoq_process_queue(): create an Evolution instance for every due queue row, or delete the
//! instance of a deprovisioned user (the row's action).

use super::run::{
    apply_requeue_requests, call_json, in_batch_context, record, require_working_attachments, Run,
};
use crate::evolution::{ApiError, ApiVersion, ErrorClass, Provisioned, Webhook};
use crate::names::{instance_name, is_ours};
use crate::phone::Phone;
use crate::pipeline::{Claimed, Flow, Grouping, Pipeline, Source, Waker};
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
    #[serde(default)]
    prev_next_attempt_at: Value,
    /// The row's updated_at as the claim set it: the result is written only to a row still
    /// held by this claim (a lease that ran out may have let another run take it).
    #[serde(default)]
    claimed_at: Value,
    /// 0.5.0: the number the user gave for a pairing code, which the create carries.
    #[serde(default)]
    number: Option<Phone>,
    /// 0.7.0: this claim placed the row on its server (it had none): given back uncalled, it
    /// goes back unplaced, free to go to another server.
    #[serde(default)]
    placed: bool,
}

fn create_action() -> String {
    "create".into()
}

/// One row's call.
pub enum Call {
    /// With the user's phone number for a pairing code, if they gave one.
    Create(ApiVersion, String, Option<Phone>),
    /// Log out, then delete.
    Remove(String),
}

pub enum Done {
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
    deleted: u64,
}

/// `sent_number`: the create carried a phone number (an adopted instance did not get it).
fn success_record(
    id: uuid::Uuid,
    name: &str,
    p: &Provisioned,
    webhook_version: &Value,
    sent_number: bool,
) -> Value {
    let qr = p.instance.qr.clone().unwrap_or_default();
    json!({
        "id": id, "instance_name": name, "ok": true, "action": "create",
        "paired": sent_number && !p.adopted,
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
    (
        Call::Create(version, name.clone(), row.number.clone()),
        Some(name),
    )
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

/// The queue as a pipeline source: claims due rows, records their outcomes. Owns the run it
/// belongs to (settings, client, circuit, summary).
pub struct QueueJob {
    pub run: Run,
    policy: RetryPolicy,
    webhook: Option<Webhook>,
    namespace: String,
    owns_legacy_names: bool,
    webhook_version: Value,
    /// Asked (or remembered) before the first claim, by `ready`.
    version: ApiVersion,
    /// How long a claimed row is not due for anyone else (see evoq._claim_queue).
    lease_ms: i64,
    /// The circuit opened during this run.
    tripped: bool,
    tally: Tally,
}

/// A claimed row with the name its call uses.
pub struct QueueRow {
    row: ClaimedRow,
    name: Option<String>,
}

impl QueueJob {
    /// Applies the requeue requests no run holds, and reads what the run's calls need.
    pub fn start(run: Run, lease_ms: i64) -> QueueJob {
        let policy = RetryPolicy {
            max_attempts: run.tunables.max_attempts,
            base: run.tunables.backoff_base,
            cap: run.tunables.backoff_max,
        };
        let webhook = run.connection.webhook.clone();
        QueueJob {
            policy,
            namespace: run.connection.namespace.clone(),
            owns_legacy_names: run.connection.owns_legacy_names,
            webhook_version: json!(webhook.as_ref().and(run.connection.webhook_version.clone())),
            webhook,
            version: ApiVersion::V2,
            lease_ms,
            tripped: false,
            tally: Tally {
                requeued: apply_requeue_requests(),
                ..Tally::default()
            },
            run,
        }
    }

    /// What the pool's threads run for a row.
    pub fn work(&self) -> impl Fn(Call) -> Result<Done, ApiError> + Send + Sync + 'static {
        let client = self.run.client.clone();
        let webhook = self.webhook.clone();
        move |call: Call| match call {
            Call::Create(version, name, number) => client
                .provision_with_number(version, &name, webhook.as_ref(), number.as_ref())
                .map(Done::Created),
            Call::Remove(name) => client.remove(&name).map(|_| Done::Removed),
        }
    }

    /// None when calls may be made; otherwise why not: the circuit is open, or the server's
    /// dialect cannot be told (a server that cannot even answer GET / costs no row an attempt).
    pub fn ready(&mut self) -> Option<&'static str> {
        self.ready_given(super::readiness::Answers::default())
    }

    /// `ready`, with what its server was asked ahead (`readiness::ask_all`).
    pub fn ready_given(&mut self, told: super::readiness::Answers) -> Option<&'static str> {
        if let Some(reason) = self.run.circuit_blocks_given(told.health.clone()) {
            return Some(reason);
        }
        match self.run.version_given(told.version, told.health) {
            Ok(v) => {
                self.version = v;
                None
            }
            Err(e) => {
                self.run.count_error(&e);
                if e.error_class() == ErrorClass::Deadline {
                    return Some("time_budget");
                }
                self.run.trip(&e.message);
                Some("circuit_open")
            }
        }
    }

    /// Remembers the run for evoq_status and returns its summary.
    pub fn finish(self, stopped: &str, groups: u64) -> pgrx::JsonB {
        let job = self.run.job;
        let (summary, last_error) = self.summarize(stopped, groups);
        super::run::record_run(job, summary, last_error)
    }

    /// The run's summary and last error, not recorded yet (see `lanes`).
    pub fn summarize(self, stopped: &str, groups: u64) -> (Value, Option<String>) {
        let t = &self.tally;
        let summary = json!({
            "claimed": t.claimed, "created": t.created, "adopted": t.adopted,
            "retrying": t.retrying, "failed": t.failed, "released": t.released,
            "unrecordable": t.unrecordable, "requeued": t.requeued, "batches": groups,
            "deleted": t.deleted, "stopped": stopped,
        });
        self.run.summarize(summary)
    }

    /// `called`: their calls left (the circuit opened): they stay on the server they went to,
    /// which may hold their instances. Rows never called go back as unplaced as they came.
    fn give_back(&mut self, rows: &[QueueRow], called: bool) {
        let claims: Vec<Value> = rows
            .iter()
            .map(|r| {
                json!({"id": r.row.id, "prev_status": r.row.prev_status,
                       "prev_updated_at": r.row.prev_updated_at,
                       "prev_next_attempt_at": r.row.prev_next_attempt_at,
                       "claimed_at": r.row.claimed_at,
                       "unplace": r.row.placed && !called})
            })
            .collect();
        Spi::run_with_args(
            "SELECT evoq._release_queue($1)",
            &[pgrx::JsonB(Value::Array(claims)).into()],
        )
        .unwrap_or_else(|e| {
            crate::errors::EvoqError::internal("could not release a batch", e).raise()
        });
        self.tally.released += rows.len() as u64;
    }
}

impl Source for QueueJob {
    type Row = QueueRow;
    type Call = Call;
    type Answer = Result<Done, ApiError>;

    /// Claims ahead too: a claimed row is held by its lease (4 request timeouts and 10 s, far
    /// beyond the wait in the reserve, about one call), and `_release_queue` gives it back as
    /// it was.
    fn claim(&mut self, room: usize, ahead: usize, _busy: &[&QueueRow]) -> Claimed<Self> {
        if self.run.settings_replaced() {
            return Claimed::hold();
        }
        let asked = room + ahead;
        // A claimed row's lease puts it out of reach of later claims, this run's included.
        let rows: Vec<ClaimedRow> = in_batch_context(|| {
            call_json(
                "SELECT evoq._claim_queue($1, $2, $3)",
                &[
                    self.run.server.as_str().into(),
                    (asked as i32).into(),
                    self.lease_ms.into(),
                ],
            )
        });
        self.tally.claimed += rows.len() as u64;
        let rows = rows
            .into_iter()
            .map(|row| {
                let (call, name) =
                    call_for(&row, self.version, &self.namespace, self.owns_legacy_names);
                (QueueRow { row, name }, call)
            })
            .collect();
        Claimed::of(rows, asked)
    }

    /// Rows claimed ahead and never called: given back as they were, and not counted as
    /// claimed (the summary's `claimed` and `released` count rows that were called).
    fn release(&mut self, rows: Vec<QueueRow>) {
        in_batch_context(|| self.give_back(&rows, false));
        self.tally.released -= rows.len() as u64;
        self.tally.claimed -= rows.len() as u64;
    }

    fn record(&mut self, done: Vec<(QueueRow, Option<Result<Done, ApiError>>)>) -> Flow {
        in_batch_context(|| self.record_group(done))
    }
}

impl QueueJob {
    fn record_group(&mut self, done: Vec<(QueueRow, Option<Result<Done, ApiError>>)>) -> Flow {
        let (rows, answers): (Vec<QueueRow>, Vec<Option<Result<Done, ApiError>>>) =
            done.into_iter().unzip();
        let run = &mut self.run;
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
                    Err(run.budget_error(if r.row.action == "delete" {
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

        // The server or the configuration failed, not the rows: they go back untouched. Calls
        // still in flight when the circuit opened are released too when they come back: they
        // went to the same server (one that answered after all is asked again, and adopted).
        if self.tripped {
            self.give_back(&rows, true);
            return Flow::Stop("circuit_open");
        }
        if let Some(cause) = verdict {
            self.give_back(&rows, true);
            self.run.trip(&cause);
            self.tripped = true;
            return Flow::Stop("circuit_open");
        }
        self.run.batch_went_through();

        let tally = &mut self.tally;
        let mut records = Vec::with_capacity(rows.len());
        for (r, outcome) in rows.iter().zip(&outcomes) {
            let (row, name) = (&r.row, &r.name);
            let mut rec = match outcome {
                Ok(Done::Created(p)) => {
                    if p.adopted {
                        tally.adopted += 1
                    } else {
                        tally.created += 1
                    }
                    let name = name.as_deref().unwrap_or_default();
                    let mut rec = success_record(
                        row.id,
                        name,
                        p,
                        &self.webhook_version,
                        row.number.is_some(),
                    );
                    // Which number went out: only that one is let go (a newer one stays).
                    rec["number"] = json!(row.number.as_ref().map(|p| p.digits()));
                    rec
                }
                Ok(Done::Removed) => {
                    tally.deleted += 1;
                    json!({"id": row.id, "instance_name": name, "ok": true, "action": "delete"})
                }
                Err(err) => {
                    let (rec, retrying) = failure_record(
                        &json!(row.id),
                        &json!(name),
                        row.attempts,
                        err,
                        &self.policy,
                    );
                    if retrying {
                        tally.retrying += 1
                    } else {
                        tally.failed += 1
                    }
                    rec
                }
            };
            rec["claimed_at"] = row.claimed_at.clone();
            records.push(rec);
        }
        let claims: std::collections::HashMap<String, (i32, Value)> = rows
            .iter()
            .map(|r| {
                (
                    r.row.id.to_string(),
                    (r.row.attempts, r.row.claimed_at.clone()),
                )
            })
            .collect();
        let policy = &self.policy;
        tally.unrecordable += record(
            "SELECT evoq._record_queue_results($1::jsonb)",
            records,
            self.run.protect_next_batch(),
            |rec, message| {
                let (attempts, claimed_at) = rec["id"]
                    .as_str()
                    .and_then(|id| claims.get(id))
                    .cloned()
                    .unwrap_or((1, Value::Null));
                let mut failure = failure_record(
                    &rec["id"],
                    &rec["instance_name"],
                    attempts,
                    &ApiError::transient(message),
                    policy,
                )
                .0;
                failure["claimed_at"] = claimed_at;
                failure
            },
        );
        Flow::Continue
    }
}

/// How the SQL functions group their results: one record statement per `batch_size` results,
/// or per second. (The worker commits every group, so it groups by far fewer milliseconds.)
pub fn sql_grouping(run: &Run) -> Grouping {
    Grouping {
        size: run.tunables.batch_size.max(1) as usize,
        age: std::time::Duration::from_secs(1),
    }
}

/// How many claimed rows a SQL function's run keeps waiting for a free slot.
///
/// One server: a batch (`evoq.batch_size`). 0.7.0 kept one concurrency's worth and claimed
/// again each time half of it was gone: at 50 ms and concurrency 16 that was a claim per 8
/// calls, and the claims were most of the run's CPU (each costs ~0.5 ms whatever it takes:
/// planning, executor start, and the index entries of the rows this transaction already
/// claimed). A reserve this large is safe here, not in the worker: the run's one transaction
/// holds every row it claimed until it ends (other runs skip locked rows), and its claims
/// compare leases with `now()`, the transaction's start, so a row of its own reserve never
/// comes due to it again, however long it waits. (The worker commits its claims: a row that
/// waited past its lease would be anyone's.)
///
/// Several servers: one concurrency's worth, as before. A claim places the unplaced rows it
/// takes on its server, so a lane with a batch in reserve would keep rows from the other
/// lanes' free slots at the end of a burst.
fn sql_reserve(run: &Run, several: bool) -> usize {
    // (The pipeline caps either at a batch: a claim takes a group's worth at most.)
    if several {
        run.tunables.concurrency.max(1)
    } else {
        run.tunables.batch_size.max(1) as usize
    }
}

#[pg_extern(security_definer)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
pub fn evoq_process_queue() -> pgrx::JsonB {
    require_working_attachments();
    // 0.7.0: one run per server, side by side (see `lanes`)
    let waker = Waker::default();
    let servers = crate::servers::names();
    let several = servers.len() > 1;
    let jobs: Vec<(String, QueueJob)> = servers
        .into_iter()
        .map(|server| {
            let run = Run::start("process_queue", &server);
            let lease_ms = run.tunables.lease_ms;
            (server, QueueJob::start(run, lease_ms))
        })
        .collect();
    // The servers that must be probed first run after the others, their probes in flight
    // meanwhile (see `readiness`).
    let ended = super::readiness::run_in_two_rounds(
        jobs,
        true,
        |job| &job.run,
        |jobs, told| run_queue_lanes(jobs, told, &waker, several),
    );
    super::lanes::record("process_queue", ended)
}

/// Gets each server's run ready (with what it was told ahead, if anything) and runs the lanes
/// of those that are, side by side.
fn run_queue_lanes(
    jobs: Vec<(String, QueueJob)>,
    told: Vec<super::readiness::Answers>,
    waker: &Waker,
    several: bool,
) -> Vec<super::lanes::Ended> {
    let mut ended = Vec::new();
    let mut lanes = Vec::new();
    for ((server, mut job), told) in jobs.into_iter().zip(told) {
        match job.ready_given(told) {
            Some(reason) => ended.push((server, job.summarize(reason, 0))),
            None => {
                let grouping = sql_grouping(&job.run);
                let ahead = sql_reserve(&job.run, several);
                let pool = super::lanes::woken_by(job.run.pool(job.work()), waker, several);
                let pipe = Pipeline::new(pool, grouping).claiming_ahead(ahead);
                lanes.push((server, pipe, job));
            }
        }
    }
    ended.extend(super::lanes::run(
        lanes,
        waker,
        |job| job.run.deadline,
        |job, why, groups| job.summarize(why, groups),
    ));
    ended
}
