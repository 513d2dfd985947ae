//! What both jobs share: the client built from the settings, the deadline, the per-batch memory
//! context, waiting on the pool while honouring cancels, and the run summary.

use crate::errors::OrRaise;
use crate::evolution::{ApiError, ApiVersion, Client, ClientConfig};
use crate::pool::Pool;
use crate::settings::{load_connection, tunables, Connection, Tunables};
use pgrx::prelude::*;
use pgrx::{FromDatum, JsonB, PgMemoryContexts};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::time::Instant;

pub struct Run {
    pub job: &'static str,
    pub started: Instant,
    pub deadline: Instant,
    pub tunables: Tunables,
    pub connection: Connection,
    pub client: Client,
    version: Option<ApiVersion>,
    pub last_error: Option<String>,
}

impl Run {
    /// Reads the settings (ERROR if evoq is not configured) and builds the HTTP client.
    pub fn start(job: &'static str) -> Run {
        let connection = load_connection().or_raise();
        let tunables = tunables();
        let client = Client::new(ClientConfig {
            base_url: connection.api_url.clone(),
            api_key: connection.api_key.clone(),
            request_timeout: tunables.request_timeout,
            connect_timeout: tunables.connect_timeout,
            max_idle: tunables.concurrency,
        });
        let started = Instant::now();
        Run {
            job,
            started,
            deadline: started + tunables.time_budget,
            version: connection.api_version,
            tunables,
            connection,
            client,
            last_error: None,
        }
    }

    pub fn out_of_time(&self) -> bool {
        Instant::now() >= self.deadline
    }

    /// The server's dialect: from the settings, or asked once per run with `GET /`.
    ///
    /// Only an unreachable server (or a rejected key) fails the probe. Any other trouble with
    /// `GET /` (a v2 server blocks there while it looks up the WhatsApp Web version; a proxy may
    /// answer it with HTML) falls back to v2, the current line, and says so in the summary.
    pub fn version(&mut self) -> Result<ApiVersion, ApiError> {
        if let Some(v) = self.version {
            return Ok(v);
        }
        let v = match self.client.probe_version() {
            Ok(v) => v,
            Err(e) if e.server_wide => return Err(e),
            Err(e) => {
                self.note_error(&format!(
                    "could not tell the Evolution API version ({e}); assuming v2. \
                     Pass api_version => 'v2' (or 'v1') to evoq_configure to skip the probe"
                ));
                ApiVersion::V2
            }
        };
        self.version = Some(v);
        Ok(v)
    }

    pub fn version_name(&self) -> Option<&'static str> {
        self.version.map(ApiVersion::as_str)
    }

    pub fn note_error(&mut self, message: &str) {
        self.last_error = Some(message.to_string());
    }

    /// Runs one batch on the run's worker pool, checking for cancel and statement_timeout
    /// every few milliseconds. Items unanswered at the deadline come back as None.
    pub fn call_all<T: Send + 'static, R: Send + 'static>(
        &self,
        pool: &mut Pool<T, R>,
        items: Vec<T>,
    ) -> Vec<Option<R>> {
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

    /// Remembers the run for evoq_status and returns the summary.
    pub fn finish(self, mut summary: Value) -> JsonB {
        summary["elapsed_ms"] = json!(self.started.elapsed().as_millis() as u64);
        if let Some(v) = self.version_name() {
            summary["api_version"] = json!(v);
        }
        Spi::run_with_args(
            "SELECT evoq._record_run($1, $2, $3)",
            &[
                self.job.into(),
                JsonB(summary.clone()).into(),
                self.last_error.clone().into(),
            ],
        )
        .unwrap_or_else(|e| pgrx::error!("evoq could not record the run: {e}"));
        JsonB(summary)
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
    .unwrap_or_else(|e| pgrx::error!("evoq: {sql} failed: {e}"))
    .unwrap_or(Value::Array(vec![]));
    serde_json::from_value(value)
        .unwrap_or_else(|e| pgrx::error!("evoq: {sql} returned an unexpected shape: {e}"))
}

/// Writes a batch's results with one statement.
pub fn record(sql: &str, results: Vec<Value>) {
    if results.is_empty() {
        return;
    }
    Spi::run_with_args(sql, &[JsonB(Value::Array(results)).into()])
        .unwrap_or_else(|e| pgrx::error!("evoq: recording results failed: {e}"));
}

/// The message for a call still unanswered when the run's time budget ran out.
pub fn budget_error(run: &Run) -> ApiError {
    ApiError::transient(format!(
        "no answer before the run's time budget (evoq.time_budget_ms = {}) ran out",
        run.tunables.time_budget.as_millis()
    ))
}
