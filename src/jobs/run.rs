//! What both jobs share: the client built from the settings, the deadline, the circuit breaker,
//! the server's dialect, the per-batch memory context, waiting on the pool while honouring
//! cancels, recording results so one bad row cannot wedge a batch, and the run summary.

use crate::errors::{EvoqError, OrRaise, SpiResult};
use crate::evolution::{ApiError, ApiVersion, Client, ClientConfig, ErrorClass};
use crate::policy::circuit_probe_delay;
use crate::pool::Pool;
use crate::settings::{
    forget_detected_version, load_connection, remember_detected_version, tunables, Connection,
    Tunables,
};
use crate::subxact;
use crate::summary::ErrorTally;
use pgrx::prelude::*;
use pgrx::{FromDatum, JsonB, PgMemoryContexts};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::time::Instant;

/// The longest `GET /` (the version probe) is waited for.
pub const VERSION_PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The circuit breaker, as a run finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    /// Open, its next probe not due yet.
    Open,
    /// Open, and its next probe is due.
    ProbeDue,
}

pub struct Run {
    pub job: &'static str,
    /// 0.7.0: the Evolution server this run calls (a job runs once per server: see `lanes`).
    pub server: String,
    pub started: Instant,
    pub deadline: Instant,
    pub tunables: Tunables,
    pub connection: Connection,
    pub client: Client,
    version: Option<ApiVersion>,
    pub errors: ErrorTally,
    notes: Vec<String>,
    /// The last note that is a problem (shown as last_error when no call failed).
    last_warning: Option<String>,
    /// The circuit was open and its probe answered: the next batch decides whether it closes.
    circuit_half_open: bool,
    /// Batches recorded inside a subtransaction so far (see `protect_next_batch`).
    protected_batches: u32,
    /// evoq_configure committed new settings after this run read them.
    replaced: bool,
}

/// Batches per run recorded inside a subtransaction. A transaction with more than 64
/// subtransactions that wrote overflows PostgreSQL's per-backend cache of them, and every
/// snapshot in the cluster gets slower until it ends. Later batches are written directly: a row
/// whose answer cannot be stored then aborts the run, but it is due first in the next run, where
/// it falls within the protected batches and fails alone.
pub const PROTECTED_BATCHES: u32 = 48;

impl Run {
    /// Reads the server's settings (ERROR if evoq is not configured, or if this database is a
    /// copy that was not told so) and builds the HTTP client.
    pub fn start(job: &'static str, server: &str) -> Run {
        let connection = load_connection(server).or_raise();
        let mut tunables = tunables();
        // Calls in flight fit the file descriptors this process may open beside PostgreSQL's
        // own (see fd_budget); the worker's pool takes its size from here too.
        // 0.7.0: every server's run in this process shares one budget (a SQL function runs them
        // side by side, the worker keeps a cycle per server), so each gets its share of it.
        let lanes = crate::servers::count().max(1);
        let (slots, fd_note) = crate::fd_budget::call_slots(tunables.concurrency * lanes);
        let slots = (slots / lanes).max(1);
        // 0.6.0: and the server's own bound (evoq_server_set(max_in_flight => ...)).
        tunables.concurrency = match crate::servers::max_in_flight(server) {
            Some(bound) => slots.min(bound),
            None => slots,
        };
        let client = Client::new(ClientConfig {
            base_url: connection.api_url.clone(),
            api_key: connection.api_key.clone(),
            request_timeout: tunables.request_timeout,
            connect_timeout: tunables.connect_timeout,
            max_idle: tunables.concurrency,
            other_secrets: connection
                .webhook
                .iter()
                .flat_map(|w| w.secret.iter().chain(w.headers.values()).cloned())
                .collect(),
        });
        let started = Instant::now();
        let mut run = Run {
            job,
            server: server.to_string(),
            started,
            deadline: started + tunables.time_budget,
            version: connection.api_version,
            tunables,
            connection,
            client,
            errors: ErrorTally::default(),
            notes: Vec::new(),
            last_warning: None,
            circuit_half_open: false,
            protected_batches: 0,
            replaced: false,
        };
        if let Some(note) = fd_note {
            run.warn(note);
        }
        run
    }

    /// Whether evoq_configure committed new settings since this run read them; checked before
    /// every claim, so no call leaves under settings that were replaced (a call to the old
    /// server, a webhook/set with the old URL). Once true, the run claims nothing more and ends
    /// when its calls in flight are recorded; the next run reads the new settings.
    pub fn settings_replaced(&mut self) -> bool {
        if !self.replaced && crate::settings::changed_since(&self.server, &self.connection.stamp) {
            self.replaced = true;
            self.note("evoq_configure changed the settings during this run: it claimed nothing more, the next run uses the new ones");
        }
        self.replaced
    }

    pub fn out_of_time(&self) -> bool {
        Instant::now() >= self.deadline
    }

    /// Counts a failed call for the summary.
    pub fn count_error(&mut self, err: &ApiError) {
        self.errors.add(&err.class(), &err.message);
    }

    /// Something the operator should read in the summary that is not a failed call.
    pub fn note(&mut self, message: impl Into<String>) {
        self.notes.push(message.into());
    }

    /// A note that is a problem: it also becomes the run's last_error if no call failed.
    pub fn warn(&mut self, message: impl Into<String>) {
        let message = message.into();
        self.last_warning = Some(message.clone());
        self.notes.push(message);
    }

    /// One call on a thread of its own, waited for like a batch: cancel and statement_timeout
    /// are honoured, and it gives up at the run's deadline. Nothing talks to the network from
    /// the backend thread itself.
    pub fn call_one<R: Send + 'static>(
        &self,
        work: impl Fn(&Client) -> R + Send + Sync + 'static,
    ) -> Option<R> {
        let client = self.client.clone();
        let mut pool = Pool::new(1, move |_: ()| work(&client));
        self.call_all(&mut pool, vec![()]).pop().flatten()
    }

    /// A client for `GET /` alone: it waits at most `VERSION_PROBE_TIMEOUT` (or the request
    /// timeout, if shorter), since on 2.3.6 that route waits on WhatsApp's website first.
    pub fn version_client(&self) -> Client {
        Client::new(ClientConfig {
            base_url: self.connection.api_url.clone(),
            api_key: self.connection.api_key.clone(),
            request_timeout: self.tunables.request_timeout.min(VERSION_PROBE_TIMEOUT),
            connect_timeout: self.tunables.connect_timeout,
            max_idle: 1,
            other_secrets: Vec::new(),
        })
    }

    /// The server's dialect if it is known without asking: pinned in the settings, or what
    /// `GET /` said the last time (kept in the settings, since a loaded server can take 18 s
    /// to answer it).
    pub fn known_version(&self) -> Option<ApiVersion> {
        self.version
    }

    /// The server's dialect: known, or asked now with `GET /` (see `take_version_probe`).
    pub fn version(&mut self) -> Result<ApiVersion, ApiError> {
        if let Some(v) = self.version {
            return Ok(v);
        }
        let client = self.version_client();
        let probed = self
            .call_one(move |_| client.probe_version())
            .unwrap_or_else(|| Err(self.budget_error("GET /")));
        self.take_version_probe(probed, None)
    }

    /// The health probe, asked now on a thread (the run waits, honouring cancels).
    fn probe_health_now(&self) -> Result<(), ApiError> {
        self.call_one(|client| client.probe_health())
            .unwrap_or_else(|| Err(self.budget_error("GET /instance/fetchInstances")))
    }

    /// What `GET /` said (asked here, or by the background worker on a thread of its own),
    /// remembered in the settings so that it is asked once, not every run:
    /// - a version: that one;
    /// - no answer in time: on 2.3.6 `GET /` first fetches WhatsApp's web client version from
    ///   the Internet, so a server without quick Internet access is slow there and nowhere
    ///   else. The health probe decides (`health`, or asked now): the server answers, so v2
    ///   (the current line) is assumed and said; it does not, and that is the error;
    /// - any other server-wide failure (refused, 5xx, a path that is no Evolution API): the
    ///   error, and the caller opens the circuit without charging a row;
    /// - a reply that is merely not a server's (a proxy's page): v2, and said.
    ///
    /// A wrong guess is corrected by the replies (`maybe_forget_version`).
    pub fn take_version_probe(
        &mut self,
        probed: Result<ApiVersion, ApiError>,
        health: Option<Result<(), ApiError>>,
    ) -> Result<ApiVersion, ApiError> {
        let v = match probed {
            Ok(v) => v,
            Err(e) if e.error_class() == ErrorClass::Deadline => return Err(e),
            Err(e) if e.error_class() == ErrorClass::Timeout => {
                health.unwrap_or_else(|| self.probe_health_now())?;
                self.warn(format!(
                    "GET / did not answer in time ({e}), though the server answers fetchInstances: on Evolution API \
                     2.3.6 GET / waits for WhatsApp's website; assuming v2. Pass api_version => 'v2' (or 'v1') to \
                     evoq_configure to skip the probe"
                ));
                ApiVersion::V2
            }
            Err(e) if e.server_wide => return Err(e),
            Err(e) => {
                self.warn(format!(
                    "could not tell the Evolution API version ({e}); assuming v2. \
                     Pass api_version => 'v2' (or 'v1') to evoq_configure to skip the probe"
                ));
                ApiVersion::V2
            }
        };
        remember_detected_version(&self.server, v);
        self.version = Some(v);
        Ok(v)
    }

    /// A reply said the server speaks the other dialect (it was upgraded or replaced): forget
    /// what GET / said, so the next run asks again. A pinned version is the operator's word.
    pub fn maybe_forget_version(&mut self, errors: &[&ApiError]) {
        if !self.connection.version_pinned && errors.iter().any(|e| e.suggests_other_version()) {
            forget_detected_version(&self.server);
            self.note(
                "a reply suggests the server speaks the other API dialect; the next run asks GET / again",
            );
        }
    }

    pub fn version_name(&self) -> Option<&'static str> {
        self.version.map(ApiVersion::as_str)
    }

    /// The circuit as this run finds it (the row is only read here, never locked: see
    /// `subxact::write_shared`).
    pub fn circuit_state(&self) -> CircuitState {
        let (open, due) = Spi::get_two_with_args::<bool, bool>(
            "SELECT true, next_probe_at <= now() FROM evoq.circuit WHERE server = $1",
            &[self.server.as_str().into()],
        )
        .or_internal("reading its state");
        match (open, due) {
            (Some(true), Some(true)) => CircuitState::ProbeDue,
            (Some(true), _) => CircuitState::Open,
            _ => CircuitState::Closed,
        }
    }

    /// The health probe answered while the circuit was open: one batch is tried (half-open),
    /// and that batch decides whether it closes.
    pub fn half_open(&mut self) {
        self.circuit_half_open = true;
        self.note("the circuit is open and the health probe answered: one batch is tried");
    }

    /// What the health probe said, asked here or by the background worker: half-open, or the
    /// circuit trips again (a longer wait).
    pub fn take_health_probe(&mut self, probed: Result<(), ApiError>) -> Option<&'static str> {
        match probed {
            Ok(()) => {
                self.half_open();
                None
            }
            Err(e) => {
                self.count_error(&e);
                self.trip(&e.message);
                Some("circuit_open")
            }
        }
    }

    /// Whether this run may call the server; the reason to stop if not. With the circuit open,
    /// no call is made until its next probe is due; then the health probe decides whether a
    /// batch may be tried (`take_health_probe`). A run whose probe was already made (the
    /// background worker's, on a thread of its own) is half-open already and asks nothing.
    pub fn circuit_blocks(&mut self) -> Option<&'static str> {
        self.circuit_blocks_given(None)
    }

    /// `circuit_blocks`, with the health probe's answer if it was asked already (`readiness`).
    pub fn circuit_blocks_given(
        &mut self,
        health: Option<Result<(), ApiError>>,
    ) -> Option<&'static str> {
        match self.circuit_state() {
            CircuitState::Closed => None,
            CircuitState::Open => Some("circuit_open"),
            CircuitState::ProbeDue if self.circuit_half_open => None,
            CircuitState::ProbeDue => {
                let probed = health.unwrap_or_else(|| self.probe_health_now());
                self.take_health_probe(probed)
            }
        }
    }

    /// What getting this run ready would ask its server: (the health probe, `GET /`). The
    /// health probe when the circuit is due for one; `GET /` when `with_version` and the
    /// dialect is unknown (a `GET /` that times out is then decided by a health probe asked
    /// after it, as `version` does). Nothing while the circuit is open and not due.
    pub fn probes_needed(&self, with_version: bool) -> (bool, bool) {
        let version = with_version && self.version.is_none();
        match self.circuit_state() {
            CircuitState::Open => (false, false),
            CircuitState::ProbeDue if !self.circuit_half_open => (true, version),
            _ => (false, version),
        }
    }

    /// `version`, with `GET /`'s answer (and the health probe's) if they were asked already.
    pub fn version_given(
        &mut self,
        probed: Option<Result<ApiVersion, ApiError>>,
        health: Option<Result<(), ApiError>>,
    ) -> Result<ApiVersion, ApiError> {
        if let Some(v) = self.version {
            return Ok(v);
        }
        match probed {
            Some(probed) => self.take_version_probe(probed, health),
            None => self.version(),
        }
    }

    /// A batch did not fail as a whole: a half-open circuit closes.
    pub fn batch_went_through(&mut self) {
        if self.circuit_half_open
            && crate::subxact::write_shared(
                "DELETE FROM evoq.circuit WHERE server = $1",
                &[self.server.as_str().into()],
            )
        {
            self.circuit_half_open = false;
            self.note("the circuit is closed again");
        }
    }

    /// Opens the circuit (or keeps it open, probing later each time; trips count on across a
    /// probe that answered, so a server that answers GET / but fails every call is asked less
    /// and less often).
    pub fn trip(&mut self, cause: &str) {
        self.circuit_half_open = false;
        let trips = Spi::get_one_with_args::<i32>(
            "SELECT trips FROM evoq.circuit WHERE server = $1",
            &[self.server.as_str().into()],
        )
        .or_internal("reading its state")
        .unwrap_or(0)
            + 1;
        let delay = circuit_probe_delay(trips as u32);
        crate::subxact::write_shared(
            "INSERT INTO evoq.circuit (server, opened_at, cause, trips, next_probe_at)
             VALUES ($4, now(), $1, $2, clock_timestamp() + $3 * interval '1 millisecond')
             ON CONFLICT (server) DO UPDATE SET cause = excluded.cause, trips = excluded.trips,
                 next_probe_at = excluded.next_probe_at",
            &[
                cause.into(),
                trips.into(),
                (delay.as_millis() as i64).into(),
                self.server.as_str().into(),
            ],
        );
        self.warn(format!(
            "circuit opened: every call failed the same way ({cause}); calls stop until the next probe in {} s",
            delay.as_secs()
        ));
    }

    /// A new transaction began (the background worker commits every group): its batches are
    /// protected again.
    pub fn reset_protection(&mut self) {
        self.protected_batches = 0;
    }

    /// Whether the next batch is recorded inside a subtransaction (see PROTECTED_BATCHES).
    pub fn protect_next_batch(&mut self) -> bool {
        self.protected_batches += 1;
        self.protected_batches <= PROTECTED_BATCHES
    }

    /// Runs one batch on the run's worker pool, checking for cancel and statement_timeout
    /// every few milliseconds. Items unanswered at the deadline come back as None; past the
    /// deadline nothing is handed out at all.
    pub fn call_all<T: Send + 'static, R: Send + 'static>(
        &self,
        pool: &mut Pool<T, R>,
        items: Vec<T>,
    ) -> Vec<Option<R>> {
        if self.out_of_time() {
            return items.iter().map(|_| None).collect();
        }
        pool.run(items, Some(self.deadline), || {
            pgrx::check_for_interrupts!();
        })
    }

    /// The worker pool for this run's HTTP calls.
    pub fn pool<T: Send + 'static, R: Send + 'static>(
        &self,
        work: impl Fn(T) -> R + Send + Sync + 'static,
    ) -> Pool<T, R> {
        Pool::new(self.tunables.concurrency, work)
    }

    /// The error for a call still unanswered when the run's time budget ran out.
    pub fn budget_error(&self, what: &str) -> ApiError {
        ApiError::deadline(format!(
            "{what}: no answer before the run's time budget (evoq.time_budget_ms = {}) ran out",
            self.tunables.time_budget.as_millis()
        ))
    }

    /// The run's summary (what the job counted, and the run's own figures and errors), and its
    /// last error, for `record_run` (`lanes` records several servers' runs as one).
    pub fn summarize(self, mut summary: Value) -> (Value, Option<String>) {
        summary["elapsed_ms"] = json!(self.started.elapsed().as_millis() as u64);
        // 0.7.0: the server it called (each server has a run of its own)
        summary["server"] = json!(self.server);
        // 0.6.0: the calls it sent at once at most (evoq.concurrency, the file descriptors, the
        // server's max_in_flight)
        summary["concurrency"] = json!(self.tunables.concurrency);
        if let Some(v) = self.version_name() {
            summary["api_version"] = json!(v);
        }
        let seen = self.errors.to_json();
        summary["errors_by_kind"] = seen["by_kind"].clone();
        summary["first_errors"] = seen["first"].clone();
        let last_error = self
            .errors
            .last()
            .map(str::to_string)
            .or(self.last_warning.clone());
        summary["last_error"] = json!(last_error);
        if !self.notes.is_empty() {
            summary["notes"] = json!(self.notes);
        }
        (summary, last_error)
    }
}

/// Remembers a run for evoq_status (`evoq.job_runs`, one row per job) and returns its summary.
pub fn record_run(job: &str, summary: Value, last_error: Option<String>) -> JsonB {
    Spi::run_with_args(
        "SELECT evoq._record_run($1, $2, $3)",
        &[job.into(), JsonB(summary.clone()).into(), last_error.into()],
    )
    .unwrap_or_else(|e| crate::errors::EvoqError::internal("could not record the run", e).raise());
    JsonB(summary)
}

/// Applies the requeue requests no other run's rows hold (see evoq._apply_requeue_requests);
/// returns how many it applied.
pub fn apply_requeue_requests() -> u64 {
    Spi::get_one::<i32>("SELECT evoq._apply_requeue_requests()")
        .or_internal("could not apply requeue requests")
        .unwrap_or(0) as u64
}

/// The process job refuses to run while an attached table's user id column is unusable: every
/// sign-up there is being skipped, and a WARNING in the inserting session goes unread.
pub fn require_working_attachments() {
    let problems = Spi::get_one::<String>("SELECT evoq._attachment_problems()")
        .or_internal("reading its state");
    if let Some(problems) = problems {
        let skipped = Spi::get_one::<i64>("SELECT count(*) FROM evoq.skipped_profiles")
            .or_internal("reading its state")
            .unwrap_or(0);
        EvoqError::NotReady {
            message: format!(
                "evoq's profile trigger cannot read the user id: {problems} ({skipped} profile rows skipped so far)"
            ),
            hint: "Attach it again with the right column: SELECT evoq_attach('your_table', user_id_column => 'the_uuid_column'); \
                   the skipped rows are listed in evoq.skipped_profiles."
                .into(),
        }
        .raise()
    }
}

/// Runs one batch's SQL and work inside its own memory context, freed afterwards, so a long
/// drain holds the memory of one batch, not of the whole queue.
pub fn in_batch_context<R>(f: impl FnOnce() -> R) -> R {
    let mut context = PgMemoryContexts::new("evoq batch");
    // SAFETY: nothing allocated in this context outlives the closure: results are plain Rust values.
    unsafe { context.switch_to(|_| f()) }
}

/// `SELECT <function>(args)` returning jsonb, decoded into Rust values.
///
/// The datum is decoded while SPI is still connected, so the temporary text lives in SPI's
/// context and dies with it. (pgrx's `Spi::get_one*` decodes into the parent of SPI's context,
/// which is TopTransactionContext: for a run that is one transaction, that grew by about
/// 400 bytes per claimed row until the run ended.)
pub fn call_json<T: DeserializeOwned>(sql: &str, args: &[pgrx::datum::DatumWithOid]) -> Vec<T> {
    let value = Spi::connect_mut(|client| {
        let table = client.update(sql, Some(1), args)?.first();
        let datum = table.get_datum_by_ordinal(1)?;
        // SAFETY: the datum is the jsonb result of the statement just run, still pinned by SPI.
        Ok::<_, pgrx::spi::Error>(
            datum
                .and_then(|d| unsafe { JsonB::from_datum(d, false) })
                .map(|j| j.0),
        )
    })
    .unwrap_or_else(|e| crate::errors::EvoqError::internal(sql, e).raise())
    .unwrap_or(Value::Array(vec![]));
    serde_json::from_value(value).unwrap_or_else(|e| {
        crate::errors::EvoqError::internal(&format!("{sql} returned an unexpected shape"), e)
            .raise()
    })
}

/// `sql` takes the results as `$1::jsonb`: they go in as JSON text, serialized from a borrow
/// (what pgrx's JsonB would do after a copy), so the fallback below still has them.
fn record_batch(sql: &str, results: &[Value]) -> Result<(), String> {
    let text = serde_json::to_string(results).map_err(|e| e.to_string())?;
    subxact::attempt(|| Spi::run_with_args(sql, &[text.into()]).map_err(|e| e.to_string()))
        .and_then(|r| r)
}

/// Writes a batch's results with one statement. Anything the server sent is data, so a reply
/// that still cannot be stored (it broke a constraint, a trigger of someone's refused it) must
/// not wedge the queue: the batch is then recorded row by row, and a row that cannot be recorded
/// is recorded as `as_failure(row, error)` instead. Returns how many rows took that path.
pub fn record(
    sql: &str,
    results: Vec<Value>,
    protect: bool,
    as_failure: impl Fn(&Value, &str) -> Value,
) -> u64 {
    if results.is_empty() {
        return 0;
    }
    if !protect {
        let text = serde_json::to_string(&results)
            .unwrap_or_else(|e| EvoqError::internal("could not encode results", e).raise());
        Spi::run_with_args(sql, &[text.into()])
            .unwrap_or_else(|e| EvoqError::internal("recording results", e).raise());
        return 0;
    }
    if record_batch(sql, &results).is_ok() {
        return 0;
    }
    let mut failed = 0;
    for row in results.chunks(1) {
        if let Err(e) = record_batch(sql, row) {
            failed += 1;
            let message = format!("the Evolution API's answer could not be stored: {e}");
            if let Err(e) = record_batch(sql, &[as_failure(&row[0], &message)]) {
                // The row stays claimed until the run ends, then is due again.
                pgrx::warning!("evoq could not record a result even as a failure: {e}");
            }
        }
    }
    failed
}
