//! Webhook deliveries (contract section 4): the envelope, the event filter, the POSTs and
//! their retries, and the delivery log behind `GET /__mock/deliveries`.
//!
//! Events are queued while the state lock is held, so each instance's queue is in the order
//! the events happened. One worker thread per instance (started on demand, gone when its
//! queue is empty) makes the first attempt of each delivery in that order; a v2 delivery
//! that must be retried continues on a thread of its own, so a failing receiver does not
//! hold up later events (as on the real server, where the sends are not awaited in turn).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::server::Shared;
use crate::state::Instance;
use crate::util;
use crate::Flavor;

/// What `axios` (the real server's HTTP client) sends as its user agent.
pub const USER_AGENT: &str = "axios/1.7.9";
/// v2 `WEBHOOK.RETRY.MAX_ATTEMPTS` default.
pub const MAX_ATTEMPTS: u32 = 10;
/// v2 `WEBHOOK.RETRY.NON_RETRYABLE_STATUS_CODES` default.
pub const NON_RETRYABLE: &[u16] = &[400, 401, 403, 404, 422];
/// v2 `WEBHOOK.REQUEST.TIMEOUT_MS` default (v1.8 has none; the mock uses the same).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

/// `qrcode.updated` → `QRCODE_UPDATED` (the subscription form).
pub fn subscription_name(event: &str) -> String {
    event.replace(['.', '-'], "_").to_ascii_uppercase()
}

/// `qrcode.updated` → `qrcode-updated` (the byEvents path suffix).
pub fn path_suffix(event: &str) -> String {
    subscription_name(event)
        .replace('_', "-")
        .to_ascii_lowercase()
}

/// Queues `event` for the instance's webhook if it has one that is enabled, has an http(s)
/// URL and subscribes to the event (`[]` = every event). The webhook, sender and token are
/// captured now, so a delete right after does not stop the delivery.
pub fn emit(shared: &Shared, inst: &Instance, event: &str, data: Value) {
    let Some(hook) = inst.webhook.as_ref() else {
        return;
    };
    // v2 checks `^https?://`; v1.8 checks isURL, but only http(s) can be posted here.
    let lower = hook.url.to_ascii_lowercase();
    if !hook.enabled || !(lower.starts_with("http://") || lower.starts_with("https://")) {
        return;
    }
    let we = subscription_name(event);
    if !hook.events.is_empty() && !hook.events.contains(&we) {
        return;
    }
    let server_url = format!("http://127.0.0.1:{}", shared.port);
    let from = EnvelopeFrom {
        flavor: shared.flavor,
        server_url: &server_url,
        instance: &inst.name,
        wuid: inst.wuid.as_deref(),
        destination: &hook.url,
    };
    let envelope = envelope(&from, event, data, util::now_epoch_ms());
    let url = if hook.by_events {
        format!("{}/{}", hook.url, path_suffix(event))
    } else {
        hook.url.clone()
    };
    let headers = delivery_headers(shared.flavor, hook.headers.as_ref());
    let knobs = shared.knobs();
    let retry_base_ms = match shared.flavor {
        Flavor::V2 => Some(knobs.webhook_retry_ms),
        Flavor::V1 => None,
    };
    shared.deliveries.enqueue(Outgoing {
        key: inst.id.clone(),
        event: event.to_string(),
        instance: inst.name.clone(),
        url,
        headers,
        envelope,
        retry_base_ms,
    });
}

/// What an envelope says besides the event: who sends it, about which instance, to where.
pub struct EnvelopeFrom<'a> {
    pub flavor: Flavor,
    /// The server's own base URL (`server_url`).
    pub server_url: &'a str,
    /// The instance name (`instance`).
    pub instance: &'a str,
    /// The owner JID once the instance logged in (`sender`); None leaves the key out.
    pub wuid: Option<&'a str>,
    /// The configured webhook URL (`destination`), without the byEvents suffix; on v1.8
    /// evoq's secret rides in its query.
    pub destination: &'a str,
}

/// The delivery body both versions post (contract section 4). Public so `webhook-blast`
/// sends byte for byte the shape the mock's own deliveries have.
pub fn envelope(from: &EnvelopeFrom, event: &str, data: Value, date_time_ms: u64) -> Value {
    let mut env = Map::new();
    env.insert("event".into(), json!(event));
    env.insert("instance".into(), json!(from.instance));
    env.insert("data".into(), data);
    env.insert("destination".into(), json!(from.destination));
    env.insert("date_time".into(), json!(util::iso8601(date_time_ms)));
    // `sender: undefined` drops out of the JSON until the instance has logged in.
    if let Some(w) = from.wuid {
        env.insert("sender".into(), json!(w));
    }
    env.insert("server_url".into(), json!(from.server_url));
    // AUTHENTICATION_EXPOSE_IN_FETCH_INSTANCES is off: null on v2, absent on v1.8.
    if from.flavor == Flavor::V2 {
        env.insert("apikey".into(), Value::Null);
    }
    Value::Object(env)
}

/// The request headers of a delivery: axios' own, then on v2 the webhook's configured
/// `headers` object (overriding axios' of the same name); v1.8 sends no custom headers.
pub fn delivery_headers(flavor: Flavor, configured: Option<&Value>) -> Vec<(String, String)> {
    let mut headers = vec![
        (
            "Accept".to_string(),
            "application/json, text/plain, */*".to_string(),
        ),
        ("Content-Type".to_string(), "application/json".to_string()),
        ("User-Agent".to_string(), USER_AGENT.to_string()),
    ];
    if flavor == Flavor::V2 {
        if let Some(Value::Object(h)) = configured {
            for (k, v) in h {
                let v = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                headers.retain(|(name, _)| !name.eq_ignore_ascii_case(k));
                headers.push((k.clone(), v));
            }
        }
    }
    headers
}

/// The deliveries' HTTP client: statuses are outcomes, not errors; v2's attempt timeout.
pub fn delivery_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(ATTEMPT_TIMEOUT))
        // Receivers are local test servers: never route them through a proxy from the env.
        .proxy(None)
        .build()
        .into()
}

/// One delivery about to be queued.
pub struct Outgoing {
    /// Queue key: the instance id (a re-created name is another instance).
    pub key: String,
    pub event: String,
    pub instance: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub envelope: Value,
    /// v2: the backoff base; None: a single try (v1.8).
    pub retry_base_ms: Option<u64>,
}

#[derive(Clone)]
struct Job {
    seq: u64,
    generation: u64,
    url: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    retry_base_ms: Option<u64>,
}

struct Record {
    seq: u64,
    event: String,
    instance: String,
    url: String,
    /// The request headers sent, names lower-cased (as a receiver such as PostgREST sees them).
    headers: Map<String, Value>,
    attempts: u32,
    status: Option<u16>,
    error: Option<String>,
    delivered: bool,
    pending: bool,
    envelope: Value,
    first_sent_at_ms: Option<u64>,
    delivered_at_ms: Option<u64>,
}

impl Record {
    fn to_json(&self) -> Value {
        json!({
            "seq": self.seq,
            "event": self.event,
            "instance": self.instance,
            "url": self.url,
            "headers": self.headers,
            "attempts": self.attempts,
            "status": self.status,
            "error": self.error,
            "delivered": self.delivered,
            "pending": self.pending,
            "envelope": self.envelope,
            "first_sent_at_ms": self.first_sent_at_ms,
            "delivered_at_ms": self.delivered_at_ms,
        })
    }
}

struct Inner {
    next_seq: u64,
    log: Vec<Record>,
    queues: HashMap<String, VecDeque<Job>>,
    /// Queue keys that have a worker thread.
    busy: HashSet<String>,
    /// Bumped by `clear`: queued jobs and pending retries of older generations are dropped.
    generation: u64,
}

/// The delivery machinery shared by the state (which queues) and the worker threads.
pub struct Deliveries {
    inner: Mutex<Inner>,
    agent: ureq::Agent,
    stopped: AtomicBool,
}

enum Outcome {
    Status(u16),
    Error(String),
}

impl Deliveries {
    pub fn new() -> Arc<Deliveries> {
        let agent = delivery_agent();
        Arc::new(Deliveries {
            inner: Mutex::new(Inner {
                next_seq: 1,
                log: Vec::new(),
                queues: HashMap::new(),
                busy: HashSet::new(),
                generation: 0,
            }),
            agent,
            stopped: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Server shutdown: workers and retries stop after the attempt they are in.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
    }

    /// The log, oldest first.
    pub fn list(&self) -> Vec<Value> {
        self.lock().log.iter().map(Record::to_json).collect()
    }

    /// Empties the log and drops queued deliveries and pending retries.
    pub fn clear(&self) {
        let mut g = self.lock();
        g.log.clear();
        g.generation += 1;
        for q in g.queues.values_mut() {
            q.clear();
        }
    }

    fn enqueue(self: &Arc<Self>, out: Outgoing) {
        if self.is_stopped() {
            return;
        }
        let body = serde_json::to_vec(&out.envelope).unwrap_or_default();
        let headers: Map<String, Value> = out
            .headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), json!(v)))
            .collect();
        let mut g = self.lock();
        let seq = g.next_seq;
        g.next_seq += 1;
        let generation = g.generation;
        g.log.push(Record {
            seq,
            event: out.event,
            instance: out.instance,
            url: out.url.clone(),
            headers,
            attempts: 0,
            status: None,
            error: None,
            delivered: false,
            pending: true,
            envelope: out.envelope,
            first_sent_at_ms: None,
            delivered_at_ms: None,
        });
        g.queues.entry(out.key.clone()).or_default().push_back(Job {
            seq,
            generation,
            url: out.url,
            headers: out.headers,
            body,
            retry_base_ms: out.retry_base_ms,
        });
        if g.busy.insert(out.key.clone()) {
            let me = Arc::clone(self);
            let key = out.key.clone();
            let spawned = std::thread::Builder::new()
                .name("evolution-mock-webhook".into())
                .spawn(move || me.worker(&key));
            if spawned.is_err() {
                // No thread now: the next event tries again.
                g.busy.remove(&out.key);
            }
        }
    }

    /// First attempts of one instance's deliveries, in order.
    fn worker(self: &Arc<Self>, key: &str) {
        loop {
            let job = {
                let mut g = self.lock();
                let next = g.queues.get_mut(key).and_then(VecDeque::pop_front);
                match next {
                    Some(job) if !self.is_stopped() => job,
                    _ => {
                        g.queues.remove(key);
                        g.busy.remove(key);
                        return;
                    }
                }
            };
            if self.attempt_and_record(&job, 1) {
                let me = Arc::clone(self);
                let retried = job.clone();
                let spawned = std::thread::Builder::new()
                    .name("evolution-mock-webhook-retry".into())
                    .spawn(move || me.retry(retried));
                if spawned.is_err() {
                    self.abandon(&job);
                }
            }
        }
    }

    /// v2's retry loop for one delivery, after attempt 1 failed in a retryable way.
    fn retry(self: &Arc<Self>, job: Job) {
        let base = job.retry_base_ms.unwrap_or(0);
        let mut attempt = 1;
        loop {
            let wait = backoff_ms(base, attempt);
            if !self.sleep_while_live(Duration::from_millis(wait), job.generation) {
                self.abandon(&job);
                return;
            }
            attempt += 1;
            if !self.attempt_and_record(&job, attempt) {
                return;
            }
        }
    }

    /// Sleeps in slices; false if the server stopped or the log was cleared meanwhile.
    fn sleep_while_live(&self, d: Duration, generation: u64) -> bool {
        let until = Instant::now() + d;
        loop {
            if self.is_stopped() || self.lock().generation != generation {
                return false;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            std::thread::sleep(left.min(Duration::from_millis(20)));
        }
    }

    fn abandon(&self, job: &Job) {
        let mut g = self.lock();
        if g.generation == job.generation {
            if let Some(r) = g.log.iter_mut().find(|r| r.seq == job.seq) {
                r.pending = false;
            }
        }
    }

    /// Makes attempt number `n` and records it. True if another attempt should follow.
    fn attempt_and_record(&self, job: &Job, n: u32) -> bool {
        {
            let mut g = self.lock();
            if g.generation != job.generation {
                return false;
            }
            if let Some(r) = g.log.iter_mut().find(|r| r.seq == job.seq) {
                r.first_sent_at_ms.get_or_insert_with(util::now_epoch_ms);
            }
        }
        let outcome = self.post(job);
        let now = util::now_epoch_ms();
        let (status, error, delivered) = match outcome {
            Outcome::Status(s) => (Some(s), None, (200..300).contains(&s)),
            Outcome::Error(e) => (None, Some(e), false),
        };
        let again = !delivered
            && !self.is_stopped()
            && job.retry_base_ms.is_some()
            && n < MAX_ATTEMPTS
            && !status.is_some_and(|s| NON_RETRYABLE.contains(&s));
        let mut g = self.lock();
        if g.generation != job.generation {
            return false;
        }
        if let Some(r) = g.log.iter_mut().find(|r| r.seq == job.seq) {
            r.attempts = n;
            r.status = status;
            r.error = error;
            r.delivered = delivered;
            r.pending = again;
            if delivered {
                r.delivered_at_ms = Some(now);
            }
        }
        again
    }

    fn post(&self, job: &Job) -> Outcome {
        let mut req = self.agent.post(&job.url);
        for (k, v) in &job.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        match req.send(&job.body[..]) {
            Ok(resp) => Outcome::Status(resp.status().as_u16()),
            Err(e) => Outcome::Error(e.to_string()),
        }
    }
}

/// Delay before attempt `attempt + 1`, as v2's `retryWebhookRequest` computes it:
/// `max(base, min(base·2^(attempt-1), 60·base) ± 20 %)`.
pub fn backoff_ms(base: u64, attempt: u32) -> u64 {
    let nominal = base
        .saturating_mul(1u64 << (attempt.saturating_sub(1)).min(32))
        .min(base.saturating_mul(60)) as f64;
    let r = util::random_bytes(2);
    let unit = f64::from(u16::from_le_bytes([r[0], r[1]])) / f64::from(u16::MAX);
    let jittered = nominal + nominal * 0.2 * (unit * 2.0 - 1.0);
    jittered.max(base as f64).round() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(subscription_name("qrcode.updated"), "QRCODE_UPDATED");
        assert_eq!(path_suffix("connection.update"), "connection-update");
        assert_eq!(path_suffix("logout.instance"), "logout-instance");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        for _ in 0..50 {
            let d1 = backoff_ms(1000, 1);
            assert!((1000..=1200).contains(&d1), "{d1}");
            let d3 = backoff_ms(1000, 3);
            assert!((3200..=4800).contains(&d3), "{d3}");
            let d9 = backoff_ms(1000, 9);
            assert!((48_000..=72_000).contains(&d9), "{d9}");
        }
        assert_eq!(backoff_ms(0, 5), 0);
    }
}
