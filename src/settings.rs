//! Settings. Two kinds, on purpose:
//! - the connection (API URL, API key, webhook) lives in the private table `evoq.settings`,
//!   written by `evoq_configure()`: a GUC would show the key to anyone who runs SHOW;
//! - tunables are GUCs (`evoq.*`) with bounds that Postgres enforces, set like any other
//!   setting (`ALTER DATABASE ... SET evoq.concurrency = 32`), which pg_cron's sessions pick up.

use crate::errors::{EvoqError, OrRaise, SpiResult};
use crate::evolution::{
    check_events, check_headers, check_url, mask_credentials, ApiVersion, Webhook,
};
use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::collections::BTreeMap;
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
    CONCURRENCY = c"evoq.concurrency", 16, 1, 4_096,
        c"Evolution API calls in flight at once within one run, or in the background worker (one thread each).";
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
    QR_WINDOW_MS = c"evoq.qr_window_ms", 600_000, 1_000, 86_400_000,
        c"A connecting instance not scanned within this many ms is logged out and becomes expired (the server itself gives up after about 22 minutes); evoq_reconnect re-arms it.";
    STATE_CHECK_INTERVAL_MS = c"evoq.state_check_interval_ms", 300_000, 1_000, 86_400_000,
        c"Each open instance is checked with connectionState at most once per this many ms, to notice a phone that unlinked the device when no webhook says so.";
    RECONCILE_INTERVAL_MS = c"evoq.reconcile_interval_ms", 600_000, 0, 86_400_000,
        c"Every this many ms the Evolution server's instances (fetchInstances) are compared with evoq's rows: lost ones are created again, orphans deleted, drifted states checked. 0 turns it off; evoq_reconcile() runs one at once.";
    ORPHAN_GRACE_MS = c"evoq.orphan_grace_ms", 3_600_000, 0, 604_800_000,
        c"An instance of this deployment's namespace that no row owns is logged out and deleted only after the reconciler has seen it unowned for this many ms.";
}

/// `evoq.api_key_file`: a file holding the API key, so that no table, dump or role holds it.
static API_KEY_FILE: GucSetting<Option<std::ffi::CString>> =
    GucSetting::<Option<std::ffi::CString>>::new(None);

/// The key file named by `evoq.api_key_file`, if any.
pub fn api_key_file() -> Option<String> {
    API_KEY_FILE
        .get()
        .and_then(|c| c.into_string().ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The key, read from `path` by the server's operating-system user. Only its first line
/// counts (a trailing newline is what editors leave). Errors name the file, never its content.
fn read_key_file(path: &str) -> Result<String, EvoqError> {
    let hint = "evoq.api_key_file names a file the PostgreSQL server's OS user can read (e.g. chmod 600, owned by postgres), \
                holding the Evolution API's global key on its first line; set it in postgresql.conf and reload.";
    let text = std::fs::read_to_string(path).map_err(|e| EvoqError::NotReady {
        message: format!("evoq.api_key_file: cannot read {path:?}: {}", e.kind()),
        hint: hint.into(),
    })?;
    let key = text.lines().next().unwrap_or("").trim().to_string();
    if key.is_empty() {
        return Err(EvoqError::NotReady {
            message: format!("evoq.api_key_file: {path:?} is empty"),
            hint: hint.into(),
        });
    }
    Ok(key)
}

/// Registers the GUCs; called from _PG_init.
pub fn register_gucs() {
    // SIGHUP: only postgresql.conf (or ALTER SYSTEM) sets it, and a reload changes it; only a
    // superuser may even see it. The key itself never passes through a setting.
    GucRegistry::define_string_guc(
        c"evoq.api_key_file",
        c"A file holding the Evolution API key; when set, the key is read from it and not kept in evoq.settings.",
        c"Set in postgresql.conf and reload. The file must be readable by the server's OS user; nothing in the database then holds the key.",
        &API_KEY_FILE,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
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
    pub qr_window_ms: i64,
    pub state_check_interval_ms: i64,
    /// How long a claimed queue row is out of reach of other runs: longer than its calls can
    /// take (a delete is two calls, a create up to three), so only a run that died leaves a
    /// row to wait for it.
    pub lease_ms: i64,
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
        qr_window_ms: QR_WINDOW_MS.get() as i64,
        state_check_interval_ms: STATE_CHECK_INTERVAL_MS.get() as i64,
        lease_ms: 4 * REQUEST_TIMEOUT_MS.get().max(0) as i64 + 10_000,
    }
}

/// The connection settings, from `evoq.settings`.
#[derive(Clone)]
pub struct Connection {
    pub api_url: String,
    pub api_key: String,
    pub webhook: Option<Webhook>,
    /// Pinned by evoq_configure (`v1`/`v2`), or what `GET /` said last time; None: ask.
    pub api_version: Option<ApiVersion>,
    /// True when evoq_configure pinned the version (then it is never asked nor forgotten).
    pub version_pinned: bool,
    /// The deployment namespace in new instance names.
    pub namespace: String,
    /// Whether 0.1.0's names (`evoq_<hex>`) are this deployment's (see `names::is_ours`).
    pub owns_legacy_names: bool,
    /// `webhook_changed_at` as this run read it: an instance given this run's webhook is
    /// recorded as carrying this version, so a change committed meanwhile still repoints it.
    pub webhook_version: Option<String>,
    /// `updated_at` as this run read it: evoq_configure sets it, so a run that finds another
    /// value stops claiming (no call may leave under settings an evoq_configure has replaced).
    pub stamp: String,
}

fn parse_version(v: Option<&str>) -> Option<ApiVersion> {
    match v {
        Some("v1") => Some(ApiVersion::V1),
        Some("v2") => Some(ApiVersion::V2),
        _ => None,
    }
}

type SettingsRow = (
    String,
    String,
    Option<String>,
    Vec<String>,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    bool,
    Option<pgrx::JsonB>,
    Option<String>,
    Option<String>,
    Option<String>,
);

/// What tells a run that the connection it read was replaced: evoq_configure's `updated_at`,
/// and for a server evoq_server_add made, its `connection_changed_at` (NULL once it is removed).
const STAMP: &str = "s.updated_at::text || CASE WHEN $1 = 'default' THEN '' ELSE '/' || v.connection_changed_at::text END";

/// Reads the settings of one server (0.7.0: `default` is evoq_configure's, the others
/// evoq_server_add's; the webhook and the namespace are the deployment's) and refuses to go on
/// in a database that is a copy of the one the deployment was bound to: a staging copy restored
/// from production must not adopt production's instances, take their tokens and move their
/// webhooks to itself.
pub fn load_connection(server: &str) -> Result<Connection, EvoqError> {
    let row: Option<SettingsRow> = Spi::connect(|client| {
        let table = client.select(
            &format!(
                "SELECT CASE WHEN $1 = 'default' THEN s.api_url ELSE v.api_url END,
                        coalesce(CASE WHEN $1 = 'default' THEN s.api_key ELSE v.api_key END, ''),
                        s.webhook_url, s.webhook_events,
                        CASE WHEN $1 = 'default' THEN s.api_version ELSE v.api_version END,
                        CASE WHEN $1 = 'default' THEN s.detected_version ELSE v.detected_version END,
                        s.namespace, s.deployment_identity, evoq._deployment_identity(), s.owns_legacy_names,
                        s.webhook_headers,
                        CASE WHEN $1 = 'default' THEN s.webhook_secret ELSE v.webhook_secret END,
                        CASE WHEN $1 = 'default' THEN s.webhook_changed_at
                             ELSE greatest(s.webhook_changed_at, v.webhook_changed_at) END::text,
                        {STAMP}
                 FROM evoq.settings s LEFT JOIN evoq.servers v ON v.name = $1
                 WHERE $1 = 'default' OR v.name IS NOT NULL"
            ),
            Some(1),
            &[server.into()],
        )?;
        if table.is_empty() {
            return Ok(None);
        }
        let row = table.first();
        Ok::<_, pgrx::spi::Error>(Some((
            row.get::<String>(1)?.unwrap_or_default(),
            row.get::<String>(2)?.unwrap_or_default(),
            row.get::<String>(3)?,
            row.get::<Vec<String>>(4)?.unwrap_or_default(),
            row.get::<String>(5)?.unwrap_or_else(|| "auto".into()),
            row.get::<String>(6)?,
            row.get::<String>(7)?,
            row.get::<String>(8)?,
            row.get::<String>(9)?,
            row.get::<bool>(10)?.unwrap_or(false),
            row.get::<pgrx::JsonB>(11)?,
            row.get::<String>(12)?,
            row.get::<String>(13)?,
            row.get::<String>(14)?,
        )))
    })
    .or_internal("reading its settings");
    let (
        api_url,
        api_key,
        webhook_url,
        events,
        pinned,
        detected,
        namespace,
        bound,
        identity,
        owns_legacy_names,
        headers,
        secret,
        webhook_version,
        stamp,
    ) = match row {
        Some(row) => row,
        None if server != crate::servers::DEFAULT_SERVER && configured() => {
            return Err(EvoqError::invalid(
                format!("there is no Evolution server named {server:?}"),
                "evoq_servers lists them; evoq_server_add adds one.",
            ))
        }
        None => return Err(EvoqError::NotConfigured),
    };
    let namespace = match namespace {
        Some(ns) if bound.is_some() && bound == identity => ns,
        other => return Err(crate::deployment::copied_database(other.as_deref())),
    };
    let version_pinned = pinned != "auto";
    // evoq.api_key_file holds the key of `default`, evoq_configure's server
    let key_file = api_key_file().filter(|_| server == crate::servers::DEFAULT_SERVER);
    let api_key = match key_file {
        Some(path) => read_key_file(&path)?,
        None if api_key.is_empty() => {
            return Err(EvoqError::NotReady {
                message: "evoq has no API key: evoq_configure stored none and evoq.api_key_file is not set".into(),
                hint: "Set evoq.api_key_file in postgresql.conf (and reload), or pass api_key to evoq_configure.".into(),
            })
        }
        None => api_key,
    };
    Ok(Connection {
        api_url,
        api_key,
        webhook: webhook_url.map(|url| Webhook {
            url,
            events,
            headers: header_map(headers.map(|h| h.0)),
            secret,
        }),
        api_version: if version_pinned {
            parse_version(Some(&pinned))
        } else {
            parse_version(detected.as_deref())
        },
        version_pinned,
        namespace,
        owns_legacy_names,
        webhook_version,
        stamp: stamp.unwrap_or_default(),
    })
}

/// Whether evoq_configure (or evoq_server_set, for the server's URL, key or version; or
/// evoq_server_remove) committed a change since `stamp` was read (see `Connection::stamp`).
/// A fresh read: under READ COMMITTED each statement sees what committed before it began.
pub fn changed_since(server: &str, stamp: &str) -> bool {
    // Asked before every claim: `default`'s stamp is the settings' alone (one indexed read).
    let changed = if server == crate::servers::DEFAULT_SERVER {
        Spi::get_one_with_args::<bool>(
            "SELECT s.updated_at::text IS DISTINCT FROM $1 FROM evoq.settings s",
            &[stamp.into()],
        )
    } else {
        Spi::get_one_with_args::<bool>(
            &format!(
                "SELECT {STAMP} IS DISTINCT FROM $2
                 FROM evoq.settings s LEFT JOIN evoq.servers v ON v.name = $1"
            ),
            &[server.into(), stamp.into()],
        )
    };
    changed.or_internal("reading its settings").unwrap_or(true)
}

/// Whether evoq_configure ever ran here.
fn configured() -> bool {
    Spi::get_one::<bool>("SELECT EXISTS (SELECT 1 FROM evoq.settings)")
        .or_internal("reading its settings")
        .unwrap_or(false)
}

/// The stored extra headers (a JSON object of strings; evoq_configure checked them).
fn header_map(headers: Option<serde_json::Value>) -> BTreeMap<String, String> {
    match headers {
        Some(serde_json::Value::Object(map)) => map
            .into_iter()
            .filter_map(|(k, v)| v.as_str().map(|v| (k, v.to_string())))
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// A new webhook secret: 64 hex digits from the operating system's random source.
fn new_webhook_secret() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// Forgets the server's detected version (a reply said it now speaks the other dialect), so
/// the next run asks `GET /` again.
pub fn forget_detected_version(server: &str) {
    if server == crate::servers::DEFAULT_SERVER {
        crate::subxact::write_shared(
            "UPDATE evoq.settings SET detected_version = NULL, detected_at = NULL",
            &[],
        );
    } else {
        crate::subxact::write_shared(
            "UPDATE evoq.servers SET detected_version = NULL, detected_at = NULL WHERE name = $1",
            &[server.into()],
        );
    }
}

/// Remembers what the server's `GET /` said, so later runs do not ask a slow server again.
pub fn remember_detected_version(server: &str, version: ApiVersion) {
    if server == crate::servers::DEFAULT_SERVER {
        crate::subxact::write_shared(
            "UPDATE evoq.settings SET detected_version = $1, detected_at = now()",
            &[version.as_str().into()],
        );
    } else {
        crate::subxact::write_shared(
            "UPDATE evoq.servers SET detected_version = $1, detected_at = now() WHERE name = $2",
            &[version.as_str().into(), server.into()],
        );
    }
}

fn config_error(e: crate::evolution::ConfigError) -> EvoqError {
    EvoqError::invalid(e.message, e.hint)
}

fn required<'a>(name: &str, value: Option<&'a str>, hint: &str) -> &'a str {
    match value.map(str::trim) {
        Some(v) if !v.is_empty() => v,
        _ => EvoqError::invalid(format!("{name} must not be empty or NULL"), hint).raise(),
    }
}

/// Stores the connection settings. Only the URL (credentials masked) appears in what it returns;
/// the key never.
// One argument per setting, named in SQL (`api_url => ...`): the SQL signature is the API.
#[allow(clippy::too_many_arguments)]
#[pg_extern(security_definer)]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn evoq_configure(
    api_url: Option<&str>,
    api_key: Option<&str>,
    webhook_url: default!(Option<&str>, "NULL"),
    webhook_events: default!(
        Option<Vec<String>>,
        "ARRAY['QRCODE_UPDATED','CONNECTION_UPDATE']"
    ),
    api_version: default!(Option<&str>, "'auto'"),
    namespace: default!(Option<&str>, "NULL"),
    webhook_headers: default!(Option<pgrx::JsonB>, "NULL"),
    rotate_webhook_secret: default!(bool, "false"),
) -> pgrx::JsonB {
    // A worker waiting for a configuration starts at this commit.
    crate::worker::wake_at_commit();
    // Postgres logs the text of a failing statement (log_min_error_statement = error), and this
    // statement's text holds the key. Errors are reported before the transaction unwinds, so
    // raising the threshold here keeps the key out of the log for any error from now on; it is
    // put back before returning, so it does not outlive the call.
    let saved =
        Spi::get_one::<String>("SELECT pg_catalog.current_setting('log_min_error_statement')")
            .or_internal("reading its settings")
            .unwrap_or_else(|| "error".into());
    Spi::run("SELECT pg_catalog.set_config('log_min_error_statement', 'panic', true)")
        .unwrap_or_else(|e| {
            crate::errors::EvoqError::internal("could not protect the key from the log", e).raise()
        });
    let api_url = required(
        "api_url",
        api_url,
        "Pass api_url => 'http://your-evolution-host:8080'.",
    )
    .trim_end_matches('/');
    check_url("api_url", api_url)
        .map_err(config_error)
        .or_raise();
    // 0.7.0: one Evolution server, one name (two would place instances past its capacity).
    let taken = Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT 1 FROM evoq.servers WHERE api_url = $1)",
        &[api_url.into()],
    )
    .or_internal("reading its settings");
    if taken == Some(true) {
        EvoqError::invalid(
            "api_url is already the URL of another server (evoq_server_add)",
            "One Evolution server, one name: evoq_servers lists them; evoq_server_remove removes one.",
        )
        .raise();
    }
    // With evoq.api_key_file set the key stays in that file: none is stored (and one passed
    // anyway is refused, so that nobody believes it is used).
    let api_key = match (api_key_file(), api_key.map(str::trim).filter(|k| !k.is_empty())) {
        (Some(path), None) => {
            read_key_file(&path).or_raise();
            None
        }
        (Some(_), Some(_)) => EvoqError::invalid(
            "api_key must be NULL: evoq.api_key_file is set, and the key is read from that file",
            "Call evoq_configure(api_url => ..., api_key => NULL, ...); nothing in the database then holds the key.",
        )
        .raise(),
        (None, key) => Some(required(
            "api_key",
            key,
            "Pass the Evolution API's global key (AUTHENTICATION_API_KEY), or set evoq.api_key_file in postgresql.conf to keep it in a file.",
        )),
    };
    let webhook_url = webhook_url.map(str::trim).filter(|w| !w.is_empty());
    if let Some(w) = webhook_url {
        check_url("webhook_url", w).map_err(config_error).or_raise();
    }
    let Some(webhook_events) = webhook_events else {
        EvoqError::invalid(
            "webhook_events must not be NULL",
            "Leave it out for the default (QRCODE_UPDATED, CONNECTION_UPDATE), or pass an array of event names; '{}' subscribes to every event.",
        )
        .raise()
    };
    check_events(&webhook_events)
        .map_err(config_error)
        .or_raise();
    let api_version = api_version.unwrap_or("auto");
    if !matches!(api_version, "auto" | "v1" | "v2") {
        EvoqError::invalid(
            format!("api_version must be 'auto', 'v1' or 'v2', got {api_version:?}"),
            "Leave it at 'auto' to ask the server once.",
        )
        .raise();
    }
    let webhook_headers = webhook_headers.map_or(serde_json::json!({}), |h| h.0);
    check_headers(&webhook_headers)
        .map_err(config_error)
        .or_raise();
    let header_names: Vec<String> = webhook_headers
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    let namespace = crate::deployment::choose_namespace(namespace);
    if rotate_webhook_secret {
        let rotating =
            Spi::get_one::<bool>("SELECT webhook_secret_previous IS NOT NULL FROM evoq.settings")
                .or_internal("reading its settings");
        if rotating == Some(true) {
            EvoqError::NotReady {
                message: "the previous rotation of the webhook secret is still being applied".into(),
                hint: "evoq_refresh_qr gives every instance the current secret (evoq_status.webhooks_to_repoint counts those left) and then retires the old one; rotate again after that. Rotating now would lock out the instances that still carry the first secret.".into(),
            }
            .raise();
        }
    }
    // A new namespace (a copy given its own): rows not completed yet carry names of the old
    // deployment, whose instances this one must never adopt. They get names in the new one.
    Spi::run_with_args(
        "UPDATE evolution_instance_creation_queue SET instance_name = NULL
         WHERE status <> 'completed' AND instance_name IS NOT NULL
           AND EXISTS (SELECT 1 FROM evoq.settings WHERE namespace IS DISTINCT FROM $1)",
        &[namespace.clone().into()],
    )
    .unwrap_or_else(|e| {
        crate::errors::EvoqError::internal("could not rename queued instances", e).raise()
    });
    Spi::run_with_args(
        "INSERT INTO evoq.settings (singleton, api_url, api_key, webhook_url, webhook_events, api_version,
                                    namespace, deployment_identity, webhook_headers, webhook_secret,
                                    webhook_changed_at)
         VALUES (true, $1, $2, $3, $4, $5, $6, evoq._deployment_identity(), $7, $8, clock_timestamp())
         ON CONFLICT (singleton) DO UPDATE SET api_url = excluded.api_url, api_key = excluded.api_key,
             -- A webhook that changed (or a new secret) is set again on every instance by the
             -- refresh job; until then the previous secret is still accepted.
             webhook_changed_at = CASE
                 WHEN $9 OR evoq.settings.webhook_secret IS NULL
                      OR evoq.settings.webhook_url IS DISTINCT FROM excluded.webhook_url
                      OR evoq.settings.webhook_events IS DISTINCT FROM excluded.webhook_events
                      OR evoq.settings.webhook_headers IS DISTINCT FROM excluded.webhook_headers
                 THEN clock_timestamp() ELSE evoq.settings.webhook_changed_at END,
             webhook_secret_previous = CASE WHEN $9 THEN evoq.settings.webhook_secret
                                            ELSE evoq.settings.webhook_secret_previous END,
             webhook_secret = CASE WHEN $9 OR evoq.settings.webhook_secret IS NULL
                                   THEN excluded.webhook_secret ELSE evoq.settings.webhook_secret END,
             webhook_headers = excluded.webhook_headers,
             webhook_url = excluded.webhook_url, webhook_events = excluded.webhook_events,
             api_version = excluded.api_version, namespace = excluded.namespace,
             -- a copy given a namespace of its own does not own the original's 0.1.0 names
             owns_legacy_names = evoq.settings.owns_legacy_names
                                 AND evoq.settings.namespace IS NOT DISTINCT FROM excluded.namespace,
             deployment_identity = excluded.deployment_identity, updated_at = now(),
             -- another server (or another URL for it) may speak another dialect
             detected_version = NULL, detected_at = NULL",
        &[
            api_url.into(),
            api_key.into(),
            webhook_url.into(),
            webhook_events.clone().into(),
            api_version.into(),
            namespace.clone().into(),
            pgrx::JsonB(webhook_headers).into(),
            new_webhook_secret().into(),
            rotate_webhook_secret.into(),
        ],
    )
    .unwrap_or_else(|e| crate::errors::EvoqError::internal("could not store the settings", e).raise());
    // 0.6.0: the server these settings describe, as data (its capacity and drain are its own).
    crate::servers::ensure_default();
    // A new configuration deserves a fresh start: the circuit may have opened because of the old one.
    Spi::run("DELETE FROM evoq.circuit WHERE server = 'default'").unwrap_or_else(|e| {
        crate::errors::EvoqError::internal("could not reset the circuit", e).raise()
    });
    Spi::run_with_args(
        "SELECT pg_catalog.set_config('log_min_error_statement', $1, true)",
        &[saved.into()],
    )
    .unwrap_or_else(|e| {
        crate::errors::EvoqError::internal("could not restore log_min_error_statement", e).raise()
    });
    pgrx::JsonB(serde_json::json!({
        "api_url": mask_credentials(api_url),
        "webhook_url": webhook_url.map(mask_credentials),
        "webhook_events": webhook_events,
        "api_version": api_version,
        "namespace": namespace,
        "api_key": if api_key.is_some() { "(stored; not shown)" } else { "(read from evoq.api_key_file; not stored)" },
        "webhook_headers": header_names,
        "webhook_secret": if rotate_webhook_secret {
            "(rotated; the previous one is accepted until every instance has the new one)"
        } else {
            "(stored; not shown)"
        },
    }))
}
