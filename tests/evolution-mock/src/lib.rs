//! A faithful in-memory mock of the Evolution API (WhatsApp HTTP API) server, following
//! `docs/evolution-api.md`: v2.3.6 or v1.8.2 body shapes, the error envelope, guard
//! order (404 and 403 before 401), the QR clock and QR limit, webhook deliveries with v2's
//! retries, socket accounting, plus fault injection and a `/__mock` control API.
//!
//! ```no_run
//! use evolution_mock::{MockConfig, MockServer};
//! let mock = MockServer::start(0, MockConfig::default()).unwrap();
//! println!("{}", mock.url());
//! ```

mod control;
mod faults;
mod http;
mod lifecycle;
mod routes;
mod server;
mod state;
mod util;
mod v1;
mod v2;
mod validate;
mod webhook;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::Value;

pub use faults::{FaultKind, FaultRule};
// The pieces of a webhook delivery, public so `webhook-blast` posts exactly what the mock's
// own deliveries post instead of a copy that could drift from them.
pub use lifecycle::{connecting_data, qr_data};
pub use state::Qr;
pub use webhook::{delivery_agent, delivery_headers, envelope, EnvelopeFrom};

use server::{lock, Knobs, Shared};
use state::{CallLog, Store};

/// Which server version to imitate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// Evolution API 2.3.6 (camelCase bodies, wrapped webhook/set, `hash` string).
    V2,
    /// Evolution API 1.8.2 (snake_case bodies, flat webhook/set, `hash: {apikey}`).
    V1,
}

impl Flavor {
    /// The `version` reported by `GET /`.
    pub fn version(self) -> &'static str {
        match self {
            Flavor::V2 => "2.3.6",
            Flavor::V1 => "1.8.2",
        }
    }

    /// `--api-version`: any 2.x is v2, any 1.x is v1.8; None for anything else.
    pub fn from_version(version: &str) -> Option<Flavor> {
        if version.starts_with('2') {
            Some(Flavor::V2)
        } else if version.starts_with("1.") {
            Some(Flavor::V1)
        } else {
            None
        }
    }
}

#[derive(Clone, Debug)]
pub struct MockConfig {
    pub flavor: Flavor,
    /// The global key (`AUTHENTICATION_API_KEY`).
    pub api_key: String,
    /// Delay added before every non-control reply.
    pub latency_ms: u64,
    /// Latency mix: every `slow_every`-th Evolution API request (control routes do not count)
    /// sleeps `slow_ms` instead of `latency_ms`, so "90 % fast, 10 % slow" is exact and
    /// repeatable. 0 = off.
    pub slow_every: u64,
    /// The sleep of the slow requests of the mix.
    pub slow_ms: u64,
    /// Put a real QR into the create reply instead of the usual `{"count":0}`.
    pub qr_on_create: bool,
    /// The QR clock: a connecting instance gets a new QR every this many ms (Evolution's
    /// `qrTimeout`, 45 s). 0 = no clock; then every connect on a connecting instance counts
    /// as a tick and returns a new QR.
    pub qr_ttl_ms: u64,
    /// QRCODE_LIMIT: after this many QRs without a scan, the next one is refused and the
    /// instance logged out (default 30).
    pub qr_limit: u32,
    /// v2 webhook retries: backoff base in ms (default 5000), doubling, capped at 60× base.
    pub webhook_retry_ms: u64,
    /// The server never gets a QR: connect and create answer `{"count":0}` forever.
    pub qr_never: bool,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            flavor: Flavor::V2,
            api_key: "BQYHJGJHJ".to_string(),
            latency_ms: 0,
            slow_every: 0,
            slow_ms: 0,
            qr_on_create: false,
            qr_ttl_ms: 45_000,
            qr_limit: 30,
            webhook_retry_ms: 5_000,
            qr_never: false,
        }
    }
}

/// A running mock. Dropping it stops accepting connections and releases hung requests.
pub struct MockServer {
    shared: Arc<Shared>,
    /// Owns the accept loop and every connection; shut down on drop.
    runtime: Option<tokio::runtime::Runtime>,
}

impl MockServer {
    /// Binds `127.0.0.1:port` (0 = ephemeral) and serves on background threads.
    pub fn start(port: u16, config: MockConfig) -> std::io::Result<MockServer> {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port))?;
        let port = listener.local_addr()?.port();
        listener.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(1024)
            .thread_name("evolution-mock")
            .enable_all()
            .build()?;
        let start = Instant::now();
        let shared = Arc::new(Shared {
            flavor: config.flavor,
            api_key: config.api_key,
            port,
            knobs: Mutex::new(Knobs {
                latency_ms: config.latency_ms,
                slow_every: config.slow_every,
                slow_ms: config.slow_ms,
                qr_on_create: config.qr_on_create,
                qr_ttl_ms: config.qr_ttl_ms,
                qr_limit: config.qr_limit,
                webhook_retry_ms: config.webhook_retry_ms,
                qr_never: config.qr_never,
            }),
            store: Mutex::new(Store::default()),
            calls: Mutex::new(CallLog::new(start)),
            faults: faults::Faults::new(),
            stopped: AtomicBool::new(false),
            api_requests: AtomicU64::new(0),
            deliveries: webhook::Deliveries::new(),
            clock: lifecycle::Clock::new(),
        });
        {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("evolution-mock-qr-clock".into())
                .spawn(move || lifecycle::run_clock(shared))?;
        }
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        runtime.spawn(server::accept_loop(listener, Arc::clone(&shared)));
        Ok(MockServer {
            shared,
            runtime: Some(runtime),
        })
    }

    pub fn port(&self) -> u16 {
        self.shared.port
    }

    /// `http://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.shared.port)
    }

    pub fn flavor(&self) -> Flavor {
        self.shared.flavor
    }

    pub fn api_key(&self) -> &str {
        &self.shared.api_key
    }

    /// The call log: `{seq, method, path, query, apikey, body, status, at_ms}` per request.
    pub fn calls(&self) -> Vec<Value> {
        lock(&self.shared.calls).entries()
    }

    /// Logged calls with this method (case-insensitive; "" = any) whose path starts with the prefix.
    pub fn count_calls(&self, method: &str, path_prefix: &str) -> usize {
        self.calls()
            .iter()
            .filter(|c| {
                let m = c["method"].as_str().unwrap_or_default();
                let p = c["path"].as_str().unwrap_or_default();
                (method.is_empty() || m.eq_ignore_ascii_case(method)) && p.starts_with(path_prefix)
            })
            .count()
    }

    pub fn add_fault(&self, rule: FaultRule) {
        self.shared.faults.add(rule);
    }

    /// Removes all rules and releases requests held by `hang`.
    pub fn clear_faults(&self) {
        self.shared.faults.clear();
    }

    pub fn set_latency_ms(&self, ms: u64) {
        lock(&self.shared.knobs).latency_ms = ms;
    }

    /// Every `n`-th Evolution API request from now on sleeps `slow_ms` (0 = off). The count
    /// restarts, so the `n`-th request after this call is the first slow one.
    pub fn set_slow_every(&self, n: u64) {
        self.shared.set_slow_every(n);
    }

    /// The sleep of the slow requests of the latency mix (`set_slow_every`).
    pub fn set_slow_ms(&self, ms: u64) {
        lock(&self.shared.knobs).slow_ms = ms;
    }

    pub fn set_qr_on_create(&self, on: bool) {
        lock(&self.shared.knobs).qr_on_create = on;
    }

    pub fn set_qr_ttl_ms(&self, ms: u64) {
        lock(&self.shared.knobs).qr_ttl_ms = ms;
        self.shared.clock.poke();
    }

    pub fn set_qr_limit(&self, n: u32) {
        lock(&self.shared.knobs).qr_limit = n;
    }

    pub fn set_webhook_retry_ms(&self, ms: u64) {
        lock(&self.shared.knobs).webhook_retry_ms = ms;
    }

    pub fn set_qr_never(&self, on: bool) {
        lock(&self.shared.knobs).qr_never = on;
        self.shared.clock.poke();
    }

    /// "open" (as `scan` with defaults), "close" (as `unlink`) or "connecting" (a socket
    /// starts), with their webhooks; the current state is a no-op. False for an unknown
    /// instance or state.
    pub fn set_state(&self, name: &str, state: &str) -> bool {
        self.shared.set_instance_state(name, state)
    }

    /// The phone scans the QR: `open` with owner `<number digits>@s.whatsapp.net` (default
    /// 5511999999999) and this profile name (default "Mock User"). False if there is no such
    /// instance or it is already open.
    pub fn scan(&self, name: &str, number: Option<&str>, profile_name: Option<&str>) -> bool {
        self.shared
            .with_instance(name, |s, i| {
                if i.state == state::ConnState::Open {
                    return false;
                }
                lifecycle::scan(s, i, number, profile_name);
                true
            })
            .unwrap_or(false)
    }

    /// The user types `code` into WhatsApp ("link with phone number"): the instance opens if
    /// `code` is the pairing code it shows now; false otherwise (or if it is open already).
    pub fn pair(&self, name: &str, code: &str) -> bool {
        self.shared
            .with_instance(name, |s, i| {
                let current = i.qr.as_ref().and_then(|q| q.pairing_code.as_deref());
                if i.state == state::ConnState::Open || current != Some(code) {
                    return false;
                }
                let number = i.number.clone();
                lifecycle::scan(s, i, number.as_deref(), None);
                true
            })
            .unwrap_or(false)
    }

    /// The number the server holds for an instance (given on create or on a connect while
    /// `close`), and the pairing code it shows now.
    pub fn pairing(&self, name: &str) -> Option<(Option<String>, Option<String>)> {
        self.shared.with_instance(name, |_, i| {
            (
                i.number.clone(),
                i.qr.as_ref().and_then(|q| q.pairing_code.clone()),
            )
        })
    }

    /// The phone unlinks the device: `close` 401 (+ `logout.instance` on v2), sockets 0.
    /// False if there is no such instance or it is `close`.
    pub fn unlink(&self, name: &str) -> bool {
        self.shared
            .with_instance(name, |s, i| {
                if i.state == state::ConnState::Close {
                    return false;
                }
                lifecycle::logout(s, i);
                true
            })
            .unwrap_or(false)
    }

    /// The QR clock ticks now for this instance (a new QR, or the limit if reached).
    /// False unless it is `connecting` on a live socket.
    pub fn rotate_qr(&self, name: &str) -> bool {
        self.connecting_action(name, lifecycle::qr_arrives)
    }

    /// The QR limit is reached now. False unless it is `connecting` on a live socket.
    pub fn reach_qr_limit(&self, name: &str) -> bool {
        self.connecting_action(name, lifecycle::qr_limit)
    }

    fn connecting_action(&self, name: &str, f: fn(&Shared, &mut state::Instance)) -> bool {
        self.shared
            .with_instance(name, |s, i| {
                if i.state != state::ConnState::Connecting || i.sockets == 0 {
                    return false;
                }
                f(s, i);
                true
            })
            .unwrap_or(false)
    }

    /// The delivery log (`GET /__mock/deliveries`), oldest first: `{seq, event, instance, url,
    /// headers, attempts, status, error, delivered, pending, envelope, first_sent_at_ms,
    /// delivered_at_ms}` per event.
    pub fn deliveries(&self) -> Vec<Value> {
        self.shared.deliveries.list()
    }

    /// Empties the delivery log and drops queued deliveries and pending retries.
    pub fn clear_deliveries(&self) {
        self.shared.deliveries.clear();
    }

    /// `{"total", "orphans", "per_instance": {name: n}}` (`GET /__mock/sockets`).
    pub fn sockets(&self) -> Value {
        self.shared.sockets_json()
    }

    /// The server "loses" the instance. False if it did not exist.
    /// Instances the server holds from before (see `POST /__mock/instances`).
    pub fn seed_instances(&self, names: &[String], state: &str) -> usize {
        self.shared.seed_instances(names, state).unwrap_or(0)
    }

    /// A state change no webhook tells of.
    pub fn set_state_silently(&self, name: &str, state: &str) -> bool {
        self.shared.set_instance_state_silently(name, state)
    }

    pub fn remove_instance(&self, name: &str) -> bool {
        self.shared.remove_instance(name)
    }

    pub fn instance_names(&self) -> Vec<String> {
        lock(&self.shared.store)
            .instances
            .iter()
            .map(|i| i.name.clone())
            .collect()
    }

    /// `{name, id, token, integration, state, qr_count, qr_code, webhook, sockets, wuid,
    /// profile_name}` or None.
    pub fn instance(&self, name: &str) -> Option<Value> {
        lock(&self.shared.store).get(name).map(|i| i.to_json())
    }

    /// Forget instances, orphan sockets, calls, deliveries and faults; the latency mix counts
    /// from the start again.
    pub fn reset(&self) {
        self.shared.reset();
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        self.shared.faults.stop();
        self.shared.deliveries.stop();
        self.shared.clock.poke();
        // Drops the accept loop and every connection; blocking handlers still sleeping finish
        // on their own and find the server stopped.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
