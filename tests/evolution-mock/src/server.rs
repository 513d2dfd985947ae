//! The request pipeline: accept loop (hyper on a small tokio runtime), each request's work on
//! a blocking thread of its own (so latency sleeps and hangs never hold up other clients), call
//! logging, latency, fault injection, then either the control API or the Evolution routes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::Response;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use crate::faults::{FaultKind, Faults};
use crate::http::{self, Body, Reply};
use crate::lifecycle::{self, Clock};
use crate::state::{CallLog, ConnState, Store};
use crate::webhook::Deliveries;
use crate::{control, routes, Flavor};

/// Knobs that can change while the server runs.
#[derive(Clone, Debug)]
pub struct Knobs {
    pub latency_ms: u64,
    /// Latency mix: every `slow_every`-th Evolution API request sleeps `slow_ms` instead of
    /// `latency_ms`; 0 = off.
    pub slow_every: u64,
    pub slow_ms: u64,
    pub qr_on_create: bool,
    /// The QR clock's period; 0 = no clock, every connect on a connecting instance ticks.
    pub qr_ttl_ms: u64,
    /// QRCODE_LIMIT: after this many QRs without a scan the next one is refused.
    pub qr_limit: u32,
    /// v2 webhook retry backoff base.
    pub webhook_retry_ms: u64,
    /// The server never gets a QR (connect answers `{"count":0}` forever).
    pub qr_never: bool,
}

/// Everything request threads share.
pub struct Shared {
    pub flavor: Flavor,
    pub api_key: String,
    pub port: u16,
    pub knobs: Mutex<Knobs>,
    pub store: Mutex<Store>,
    pub calls: Mutex<CallLog>,
    pub faults: Faults,
    pub stopped: AtomicBool,
    /// Evolution API requests (not control ones) since the start, the last reset or the last
    /// change of `slow_every`: the latency mix picks its slow requests by this count.
    pub api_requests: AtomicU64,
    pub deliveries: Arc<Deliveries>,
    pub clock: Clock,
}

/// Poison-tolerant lock: one panicking request thread must not break every later request.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub fn knobs(&self) -> Knobs {
        lock(&self.knobs).clone()
    }

    /// Sets the latency mix period. The count restarts, so the `n`-th request from now is the
    /// first slow one whatever came before (benchmarks get the same mix on every run).
    pub fn set_slow_every(&self, n: u64) {
        lock(&self.knobs).slow_every = n;
        self.api_requests.store(0, Ordering::SeqCst);
    }

    /// The sleep before the reply of Evolution API request number `n` (counted from 1).
    fn latency_for(&self, n: u64) -> u64 {
        let k = lock(&self.knobs);
        mixed_latency(k.latency_ms, k.slow_every, k.slow_ms, n)
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Simulates the phone side, with the webhooks that go with it: "open" is a scan (as
    /// `scan` with defaults), "close" the phone unlinking the device (as `unlink`),
    /// "connecting" a socket starting (`lifecycle::force_connecting`). Asking for the state
    /// the instance is already in changes nothing. False for an unknown name or state.
    pub fn set_instance_state(&self, name: &str, state: &str) -> bool {
        let Some(state) = ConnState::parse(state) else {
            return false;
        };
        let mut store = lock(&self.store);
        let Some(i) = store.get_mut(name) else {
            return false;
        };
        match state {
            _ if state == i.state => {}
            ConnState::Open => lifecycle::scan(self, i, None, None),
            ConnState::Close => lifecycle::logout(self, i),
            ConnState::Connecting => lifecycle::force_connecting(self, i),
        }
        true
    }

    /// The state changes and nothing else happens: no socket, no QR, no delivery (a server
    /// whose webhooks stopped). Its database row (fetchInstances) shows it too.
    pub fn set_instance_state_silently(&self, name: &str, state: &str) -> bool {
        let Some(state) = ConnState::parse(state) else {
            return false;
        };
        match lock(&self.store).get_mut(name) {
            Some(i) => {
                i.set_state(state);
                true
            }
            None => false,
        }
    }

    /// Adds instances as a server holds them from before, with no call, socket or delivery;
    /// names already there are left alone. How many were added, or None for an unknown state.
    pub fn seed_instances(&self, names: &[String], state: &str) -> Option<usize> {
        let state = ConnState::parse(state)?;
        let mut store = lock(&self.store);
        let known: std::collections::HashSet<String> =
            store.instances.iter().map(|i| i.name.clone()).collect();
        let mut added = 0;
        for name in names {
            if known.contains(name) {
                continue;
            }
            let mut i = crate::state::Instance::new(name, None, "WHATSAPP-BAILEYS");
            i.set_state(state);
            store.instances.push(i);
            added += 1;
        }
        Some(added)
    }

    /// Runs `f` on the named instance under the state lock; None if there is no such instance.
    pub fn with_instance<T>(
        &self,
        name: &str,
        f: impl FnOnce(&Shared, &mut crate::state::Instance) -> T,
    ) -> Option<T> {
        let mut store = lock(&self.store);
        store.get_mut(name).map(|i| f(self, i))
    }

    /// The server "loses" the instance, as if its row or directory vanished (its sockets, if
    /// any, keep running as orphans).
    pub fn remove_instance(&self, name: &str) -> bool {
        lock(&self.store).remove(name)
    }

    /// `GET /__mock/sockets`.
    pub fn sockets_json(&self) -> Value {
        lock(&self.store).sockets_json()
    }

    pub fn instances_json(&self) -> Vec<Value> {
        lock(&self.store)
            .instances
            .iter()
            .map(|i| i.to_json())
            .collect()
    }

    /// Forget instances, orphan sockets, calls, deliveries (pending ones are dropped) and
    /// faults (hung requests are released).
    pub fn reset(&self) {
        {
            let mut store = lock(&self.store);
            store.instances.clear();
            store.orphan_sockets = 0;
        }
        lock(&self.calls).clear();
        self.api_requests.store(0, Ordering::SeqCst);
        self.deliveries.clear();
        self.faults.clear();
    }
}

/// A parsed request as the route handlers see it.
pub struct Req {
    pub method: String,
    /// Path as received, without the query string.
    pub path: String,
    /// Percent-decoded path segments; a trailing empty one (from a final `/`) is dropped.
    pub segments: Vec<String>,
    pub query: Vec<(String, String)>,
    pub apikey: Option<String>,
    /// `Value::Null` for an empty body; a `Value::String` when the body is not JSON.
    pub body: Value,
    /// True when a body was sent that does not parse as JSON.
    pub body_invalid: bool,
    /// The query string as received (for the call log).
    pub raw_query: String,
}

impl Req {
    pub fn query_param(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn decoded_path(&self) -> String {
        format!("/{}", self.segments.join("/"))
    }
}

/// Accepts connections until the runtime is shut down; each connection is served by hyper.
pub async fn accept_loop(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service = service_fn(move |request| serve(Arc::clone(&shared), request));
            // Errors here are clients going away, or our own "close without reply".
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// One request: read it, then handle it on a blocking thread. `Err` makes hyper close the
/// connection without a byte of reply (the `hang` and `drop` faults).
async fn serve(
    shared: Arc<Shared>,
    request: hyper::Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let (parts, body) = request.into_parts();
    let raw = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let req = parse(&parts, &raw);
    let outcome = tokio::task::spawn_blocking(move || handle(&shared, req))
        .await
        .ok()
        .flatten();
    match outcome {
        Some(reply) => Ok(http::to_response(&reply)),
        None => Err(std::io::Error::other("closed without reply")),
    }
}

fn parse(parts: &hyper::http::request::Parts, raw: &[u8]) -> Req {
    let method = parts.method.as_str().to_ascii_uppercase();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().unwrap_or("").to_string();
    let mut segments: Vec<String> = path
        .split('/')
        .skip(1)
        .map(|s| crate::util::percent_decode(s, false))
        .collect();
    if segments.len() > 1 && segments.last().is_some_and(String::is_empty) {
        segments.pop();
    }
    let apikey = parts
        .headers
        .get("apikey")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let text = String::from_utf8_lossy(raw).into_owned();
    let (body, body_invalid) = if text.trim().is_empty() {
        (Value::Null, false)
    } else {
        match serde_json::from_str::<Value>(&text) {
            Ok(v) => (v, false),
            Err(_) => (Value::String(text), true),
        }
    };
    Req {
        method,
        path,
        segments,
        query: crate::util::parse_query(&query),
        apikey,
        body,
        body_invalid,
        raw_query: query,
    }
}

/// The reply for one request, or None to close the connection without one.
fn handle(shared: &Shared, req: Req) -> Option<Reply> {
    if shared.stopped.load(Ordering::SeqCst) {
        return None;
    }

    if req.path == "/__mock" || req.path.starts_with("/__mock/") {
        return Some(control::handle(shared, &req));
    }

    let seq = lock(&shared.calls).record(
        &req.method,
        &req.path,
        &req.raw_query,
        req.apikey.as_deref(),
        req.body.clone(),
    );

    // Counted on arrival, so concurrent clients still see exactly one slow request in every
    // `slow_every` consecutive ones.
    let n = shared.api_requests.fetch_add(1, Ordering::SeqCst) + 1;
    let latency = shared.latency_for(n);
    if latency > 0 {
        std::thread::sleep(Duration::from_millis(latency));
    }

    let fault = shared
        .faults
        .take(&req.method, &req.path, &req.decoded_path());
    let reply = match fault {
        None => routes::dispatch(shared, &req),
        Some((kind, ticket)) => match kind {
            FaultKind::Hang => {
                shared.faults.wait_release(ticket);
                return None;
            }
            FaultKind::Drop => return None,
            FaultKind::Delay { ms } => {
                sleep_unless_stopped(shared, ms);
                routes::dispatch(shared, &req)
            }
            other => fault_reply(&other, &req),
        },
    };
    lock(&shared.calls).set_status(seq, reply.status);
    Some(reply)
}

/// `slow_ms` for every `slow_every`-th request (`n` counts from 1), else `latency_ms`.
fn mixed_latency(latency_ms: u64, slow_every: u64, slow_ms: u64, n: u64) -> u64 {
    if slow_every > 0 && n.is_multiple_of(slow_every) {
        slow_ms
    } else {
        latency_ms
    }
}

fn sleep_unless_stopped(shared: &Shared, ms: u64) {
    // Sliced so a stopped server does not keep threads around for long delays.
    let until = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < until && !shared.stopped.load(Ordering::SeqCst) {
        let left = until.saturating_duration_since(Instant::now());
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

/// The canned reply of a non-hanging fault.
fn fault_reply(kind: &FaultKind, req: &Req) -> Reply {
    match kind {
        FaultKind::Status { code } => status_fault(*code, req),
        FaultKind::Reply { code, body } => Reply {
            status: *code,
            body: Body::RawJson(body.clone()),
        },
        FaultKind::Garbage => Reply {
            status: 200,
            body: Body::RawJson("<html>not json".into()),
        },
        FaultKind::Error200 => Reply::json(
            200,
            json!({"error": true, "message": "mock fault: 200 with error"}),
        ),
        FaultKind::Empty200 => Reply {
            status: 200,
            body: Body::Empty,
        },
        FaultKind::MissingFields => {
            let created = req.method == "POST"
                && (req.path.starts_with("/instance/create")
                    || req.path.starts_with("/webhook/set"));
            Reply::json(if created { 201 } else { 200 }, json!({}))
        }
        // Handled by the caller; kept total for safety.
        FaultKind::Hang | FaultKind::Drop | FaultKind::Delay { .. } => {
            Reply::crash("mock fault: internal error")
        }
    }
}

/// An error reply for `code` shaped like the real server's error of that code.
fn status_fault(code: u16, req: &Req) -> Reply {
    let name = routes::instance_name_hint(req).unwrap_or_else(|| "mock".to_string());
    match code {
        401 => Reply::unauthorized(),
        400 => Reply::thrown(400, "mock fault: bad request"),
        403 => Reply::thrown(403, format!("This name \"{name}\" is already in use.")),
        404 => Reply::thrown(404, format!("The \"{name}\" instance does not exist")),
        500 => Reply::crash("mock fault: internal error"),
        c if c >= 500 => Reply::crash(format!("mock fault: status {c}")),
        c => Reply::thrown(c, format!("mock fault: status {c}")),
    }
}

#[cfg(test)]
mod tests {
    use super::mixed_latency;

    #[test]
    fn latency_mix_picks_every_nth() {
        let got: Vec<u64> = (1..=10).map(|n| mixed_latency(50, 5, 2500, n)).collect();
        assert_eq!(got, [50, 50, 50, 50, 2500, 50, 50, 50, 50, 2500]);
        // Off: always the plain latency.
        assert!((1..=10).all(|n| mixed_latency(7, 0, 2500, n) == 7));
        // Every request slow.
        assert!((1..=3).all(|n| mixed_latency(0, 1, 9, n) == 9));
    }
}
