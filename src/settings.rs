//! Settings. Two kinds, on purpose:
//! - the connection (API URL, API key, webhook) lives in the private table `evoq.settings`,
//!   written by `evoq_configure()`: a GUC would show the key to anyone who runs SHOW;
//! - tunables are GUCs (`evoq.*`) with bounds that Postgres enforces, set like any other
//!   setting (`ALTER DATABASE ... SET evoq.concurrency = 32`), which pg_cron's sessions pick up.

use crate::errors::{EvoqError, OrRaise};
use crate::evolution::{ApiVersion, Webhook};
use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::time::Duration;

pub struct IntGuc {
    pub name: &'static std::ffi::CStr,
    pub setting: &'static GucSetting<i32>,
    pub min: i32,
    pub max: i32,
    pub description: &'static std::ffi::CStr,
}

macro_rules! gucs {
    ($($ident:ident = $name:literal, $default:expr, $min:expr, $max:expr, $desc:literal;)*) => {
        $(pub static $ident: GucSetting<i32> = GucSetting::<i32>::new($default);)*
        pub fn all_gucs() -> Vec<IntGuc> {
            vec![$(IntGuc { name: $name, setting: &$ident, min: $min, max: $max, description: $desc }),*]
        }
    };
}

gucs! {
    BATCH_SIZE = c"evoq.batch_size", 200, 1, 10_000,
        c"Rows (or instances) claimed per batch; a run takes batch after batch until nothing is due or its time budget is spent.";
    CONCURRENCY = c"evoq.concurrency", 16, 1, 128,
        c"Evolution API calls in flight at once within one run (worker threads).";
    REQUEST_TIMEOUT_MS = c"evoq.request_timeout_ms", 30_000, 100, 300_000,
        c"Timeout of one Evolution API call, in ms. Create with a QR request takes about 5 s on a real server.";
    CONNECT_TIMEOUT_MS = c"evoq.connect_timeout_ms", 5_000, 100, 60_000,
        c"Timeout for opening a connection to the Evolution API, in ms.";
    TIME_BUDGET_MS = c"evoq.time_budget_ms", 50_000, 1_000, 3_600_000,
        c"A run stops claiming new work after this many ms; calls still unanswered at the end count as timed out.";
    MAX_ATTEMPTS = c"evoq.max_attempts", 8, 1, 100,
        c"Attempts per queued request before the row is left failed.";
    BACKOFF_BASE_MS = c"evoq.backoff_base_ms", 10_000, 100, 86_400_000,
        c"Delay before the second attempt, in ms; doubles with each attempt, with jitter.";
    BACKOFF_MAX_MS = c"evoq.backoff_max_ms", 3_600_000, 1_000, 604_800_000,
        c"Upper bound of the retry delay, in ms.";
    QR_REFRESH_INTERVAL_MS = c"evoq.qr_refresh_interval_ms", 20_000, 0, 3_600_000,
        c"An instance is asked for a new QR at most once per this many ms (the server issues one every 45 s).";
}

/// Registers the GUCs; called from _PG_init.
pub fn register_gucs() {
    for guc in all_gucs() {
        GucRegistry::define_int_guc(
            guc.name,
            guc.description,
            guc.description,
            guc.setting,
            guc.min,
            guc.max,
            GucContext::Userset,
            GucFlags::default(),
        );
    }
}

/// The tunables of one run, read once at its start.
#[derive(Debug, Clone, Copy)]
pub struct Tunables {
    pub batch_size: i32,
    pub concurrency: usize,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    pub time_budget: Duration,
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub qr_refresh_interval_ms: i64,
}

fn ms(v: &GucSetting<i32>) -> Duration {
    Duration::from_millis(v.get().max(0) as u64)
}

pub fn tunables() -> Tunables {
    Tunables {
        batch_size: BATCH_SIZE.get(),
        concurrency: CONCURRENCY.get().max(1) as usize,
        request_timeout: ms(&REQUEST_TIMEOUT_MS),
        connect_timeout: ms(&CONNECT_TIMEOUT_MS),
        time_budget: ms(&TIME_BUDGET_MS),
        max_attempts: MAX_ATTEMPTS.get().max(1) as u32,
        backoff_base: ms(&BACKOFF_BASE_MS),
        backoff_max: ms(&BACKOFF_MAX_MS),
        qr_refresh_interval_ms: QR_REFRESH_INTERVAL_MS.get() as i64,
    }
}

/// The connection settings, from `evoq.settings`.
#[derive(Clone)]
pub struct Connection {
    pub api_url: String,
    pub api_key: String,
    pub webhook: Option<Webhook>,
    /// None means "ask the server" (GET /).
    pub api_version: Option<ApiVersion>,
}

pub fn load_connection() -> Result<Connection, EvoqError> {
    let row = Spi::connect(|client| {
        let table = client
            .select("SELECT api_url, api_key, webhook_url, webhook_events, api_version FROM evoq.settings", Some(1), &[])
            .ok()?;
        let row = table.first();
        Some((
            row.get::<String>(1).ok().flatten()?,
            row.get::<String>(2).ok().flatten()?,
            row.get::<String>(3).ok().flatten(),
            row.get::<Vec<String>>(4).ok().flatten().unwrap_or_default(),
            row.get::<String>(5)
                .ok()
                .flatten()
                .unwrap_or_else(|| "auto".into()),
        ))
    });
    let (api_url, api_key, webhook_url, events, version) = row.ok_or(EvoqError::NotConfigured)?;
    Ok(Connection {
        api_url,
        api_key,
        webhook: webhook_url.map(|url| Webhook { url, events }),
        api_version: match version.as_str() {
            "v1" => Some(ApiVersion::V1),
            "v2" => Some(ApiVersion::V2),
            _ => None,
        },
    })
}

/// Event names either server version accepts (contract section 5); the default subscription is
/// what evoq's users need to follow a login.
const KNOWN_EVENTS: &[&str] = &[
    "APPLICATION_STARTUP",
    "QRCODE_UPDATED",
    "MESSAGES_SET",
    "MESSAGES_UPSERT",
    "MESSAGES_EDITED",
    "MESSAGES_UPDATE",
    "MESSAGES_DELETE",
    "SEND_MESSAGE",
    "SEND_MESSAGE_UPDATE",
    "CONTACTS_SET",
    "CONTACTS_UPSERT",
    "CONTACTS_UPDATE",
    "PRESENCE_UPDATE",
    "CHATS_SET",
    "CHATS_UPSERT",
    "CHATS_UPDATE",
    "CHATS_DELETE",
    "GROUPS_UPSERT",
    "GROUP_UPDATE",
    "GROUP_PARTICIPANTS_UPDATE",
    "CONNECTION_UPDATE",
    "LABELS_EDIT",
    "LABELS_ASSOCIATION",
    "CALL",
    "TYPEBOT_START",
    "TYPEBOT_CHANGE_STATUS",
    "REMOVE_INSTANCE",
    "LOGOUT_INSTANCE",
    "INSTANCE_CREATE",
    "INSTANCE_DELETE",
    "STATUS_INSTANCE",
    "NEW_JWT_TOKEN",
    "CHAMA_AI_ACTION",
];

fn check_url(what: &str, url: &str) -> Result<(), EvoqError> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    match rest {
        Some(r)
            if !r.is_empty() && !r.starts_with('/') && !url.chars().any(char::is_whitespace) =>
        {
            Ok(())
        }
        _ => Err(EvoqError::invalid(
            format!(
                "{what} must be an http:// or https:// URL with a host, got {}",
                if url.is_empty() {
                    "an empty string".to_string()
                } else {
                    format!("{url:?}")
                }
            ),
            format!("Pass {what} => 'https://host[:port][/path]'."),
        )),
    }
}

/// Stores the connection settings. Only the URL host appears in what it returns; the key never.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, @extschema@)]
fn evoq_configure(
    api_url: &str,
    api_key: &str,
    webhook_url: default!(Option<&str>, "NULL"),
    webhook_events: default!(Vec<String>, "ARRAY['QRCODE_UPDATED','CONNECTION_UPDATE']"),
    api_version: default!(&str, "'auto'"),
) -> pgrx::JsonB {
    // Postgres logs the text of a failing statement (log_min_error_statement = error), and this
    // statement's text holds the key. Errors are reported before the transaction unwinds, so a
    // transaction-local setting here keeps the key out of the log for any error from now on.
    Spi::run("SELECT pg_catalog.set_config('log_min_error_statement', 'panic', true)")
        .unwrap_or_else(|e| {
            pgrx::error!("evoq_configure could not protect the key from the log: {e}")
        });
    let api_url = api_url.trim().trim_end_matches('/');
    check_url("api_url", api_url).or_raise();
    if api_key.trim().is_empty() {
        EvoqError::invalid(
            "api_key must not be empty",
            "Pass the Evolution API's global key (AUTHENTICATION_API_KEY).",
        )
        .raise();
    }
    let webhook_url = webhook_url.map(str::trim).filter(|w| !w.is_empty());
    if let Some(w) = webhook_url {
        check_url("webhook_url", w).or_raise();
    }
    for event in &webhook_events {
        if !KNOWN_EVENTS.contains(&event.as_str()) {
            EvoqError::invalid(
                format!("unknown webhook event {event:?}"),
                "Use Evolution API event names such as QRCODE_UPDATED, CONNECTION_UPDATE, MESSAGES_UPSERT.",
            )
            .raise();
        }
    }
    if !matches!(api_version, "auto" | "v1" | "v2") {
        EvoqError::invalid(
            format!("api_version must be 'auto', 'v1' or 'v2', got {api_version:?}"),
            "Leave it at 'auto' to ask the server.",
        )
        .raise();
    }
    Spi::run_with_args(
        "INSERT INTO evoq.settings (singleton, api_url, api_key, webhook_url, webhook_events, api_version)
         VALUES (true, $1, $2, $3, $4, $5)
         ON CONFLICT (singleton) DO UPDATE SET api_url = excluded.api_url, api_key = excluded.api_key,
             webhook_url = excluded.webhook_url, webhook_events = excluded.webhook_events,
             api_version = excluded.api_version, updated_at = now()",
        &[
            api_url.into(),
            api_key.into(),
            webhook_url.into(),
            webhook_events.clone().into(),
            api_version.into(),
        ],
    )
    .unwrap_or_else(|e| pgrx::error!("evoq_configure could not store the settings: {e}"));
    pgrx::JsonB(serde_json::json!({
        "api_url": api_url,
        "webhook_url": webhook_url,
        "webhook_events": webhook_events,
        "api_version": api_version,
        "api_key": "(stored; not shown)",
    }))
}
