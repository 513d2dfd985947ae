//! `webhook-blast --url URL --instances FILE --total N --concurrency C [--secret S]
//! [--api-version 2.3.6|1.8.2] [--event qrcode.updated]`
//!
//! A webhook load generator: POSTs N Evolution API deliveries to URL from C threads (one
//! keep-alive HTTP client each), round-robin over the instance names in FILE (one a line),
//! and prints one JSON line:
//!
//! `{"sent","ok","status_counts":{"200":n,..},"errors","elapsed_ms","per_second","p50_ms",
//! "p90_ms","p99_ms","max_ms"}`
//!
//! The receiver (evoq's webhook endpoint) answers 2xx only once the delivery is committed, so
//! a request's round trip is the "delivery → row" latency; the percentiles cover every
//! request, answered or not, and `errors` counts transport failures. Exit code 0 whatever the
//! receiver answered (the caller judges), 2 for bad usage.
//!
//! Deliveries are built by the mock's own code (`envelope`, `delivery_headers`, `qr_data`),
//! so they are what the mock, and the real server it imitates, would send: `qrcode.updated`
//! carries a fresh QR each time, and each instance's `date_time` grows strictly from one
//! delivery to the next, so the receiver never skips one as older. On v2 the secret goes in
//! the `x-evoq-secret` header (a configured webhook header); v1.8 sends no custom headers,
//! so there it rides in the URL as `evoq_secret=`, where evoq puts it.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use evolution_mock::{
    connecting_data, delivery_agent, delivery_headers, envelope, qr_data, EnvelopeFrom, Flavor, Qr,
};
use serde_json::{json, Value};

const USAGE: &str = "usage: webhook-blast --url URL --instances FILE --total N --concurrency C \
[--secret S] [--api-version 2.3.6|1.8.2] [--event qrcode.updated]";
/// The header and query parameter evoq reads the secret from (evoq's `SECRET_HEADER` and
/// `SECRET_PARAM`; the root crate is a pgrx extension, so they are not imported from it).
const SECRET_HEADER: &str = "x-evoq-secret";
const SECRET_PARAM: &str = "evoq_secret";
/// The envelope's `server_url`: Evolution's default address (receivers do not use it).
const SERVER_URL: &str = "http://127.0.0.1:8080";

struct Config {
    url: String,
    instances: Vec<String>,
    total: u64,
    concurrency: u64,
    secret: Option<String>,
    flavor: Flavor,
    event: String,
}

fn parse_args(args: &[String]) -> Result<Config, String> {
    let mut url = None;
    let mut file = None;
    let mut total = None;
    let mut concurrency = None;
    let mut cfg = Config {
        url: String::new(),
        instances: Vec::new(),
        total: 0,
        concurrency: 0,
        secret: None,
        flavor: Flavor::V2,
        event: "qrcode.updated".into(),
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        // Accept both `--flag value` and `--flag=value`, as the other binaries do.
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f, Some(v.to_string())),
            None => (arg.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag {
            "--url" => url = Some(value()?),
            "--instances" => file = Some(value()?),
            "--total" => total = Some(positive(flag, &value()?)?),
            "--concurrency" => concurrency = Some(positive(flag, &value()?)?),
            "--secret" => cfg.secret = Some(value()?),
            "--api-version" => {
                let v = value()?;
                cfg.flavor = Flavor::from_version(&v)
                    .ok_or_else(|| format!("--api-version: expected 2.3.6 or 1.8.2, got {v}"))?;
            }
            "--event" => cfg.event = value()?,
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    let missing = |name: &str| format!("{name} is required\n{USAGE}");
    cfg.url = url.ok_or_else(|| missing("--url"))?;
    cfg.total = total.ok_or_else(|| missing("--total"))?;
    cfg.concurrency = concurrency.ok_or_else(|| missing("--concurrency"))?;
    cfg.instances = read_instances(&file.ok_or_else(|| missing("--instances"))?)?;
    Ok(cfg)
}

fn positive(flag: &str, v: &str) -> Result<u64, String> {
    match v.parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{flag}: expected a positive number, got {v}")),
    }
}

/// One name a line; blank lines and surrounding spaces are ignored.
fn read_instances(path: &str) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("--instances {path}: {e}"))?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    if names.is_empty() {
        return Err(format!("--instances {path}: no instance names"));
    }
    Ok(names)
}

/// The URL evoq registers on v1.8: the secret in the query (evoq's `Webhook::url_for`).
fn url_with_secret(url: &str, secret: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{SECRET_PARAM}={secret}")
}

/// What every delivery shares: where it goes and with which headers.
struct Target {
    flavor: Flavor,
    /// The URL posted to, which is also the envelope's `destination`.
    url: String,
    headers: Vec<(String, String)>,
    event: String,
}

impl Target {
    fn new(cfg: &Config) -> Target {
        let url = match (&cfg.secret, cfg.flavor) {
            (Some(s), Flavor::V1) => url_with_secret(&cfg.url, s),
            _ => cfg.url.clone(),
        };
        // On v2 the secret is a configured webhook header; `delivery_headers` drops those on
        // v1.8, as the server does.
        let configured = cfg.secret.as_ref().map(|s| json!({ SECRET_HEADER: s }));
        Target {
            flavor: cfg.flavor,
            url,
            headers: delivery_headers(cfg.flavor, configured.as_ref()),
            event: cfg.event.clone(),
        }
    }

    /// The body of one delivery about `instance`, stamped `date_time_ms`.
    fn body(&self, instance: &str, date_time_ms: u64) -> Vec<u8> {
        let from = EnvelopeFrom {
            flavor: self.flavor,
            server_url: SERVER_URL,
            instance,
            wuid: None,
            destination: &self.url,
        };
        let env = envelope(
            &from,
            &self.event,
            event_data(&self.event, instance),
            date_time_ms,
        );
        serde_json::to_vec(&env).unwrap_or_default()
    }
}

/// The `data` the mock sends with this event: a fresh QR, a `connecting` update, or null
/// (as with `logout.instance` and `remove.instance`) for any other event.
fn event_data(event: &str, instance: &str) -> Value {
    match event {
        "qrcode.updated" => qr_data(instance, &Qr::new()),
        "connection.update" => connecting_data(instance),
        _ => Value::Null,
    }
}

fn now_epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Per-instance `date_time` clocks: the wall clock, but always at least 1 ms past the
/// instance's previous stamp, since the receiver ignores a delivery that is not newer than the
/// last one it applied and `date_time` has only millisecond precision.
struct Stamps(Vec<AtomicU64>);

impl Stamps {
    fn new(n: usize) -> Stamps {
        Stamps((0..n).map(|_| AtomicU64::new(0)).collect())
    }

    fn next(&self, instance: usize) -> u64 {
        let now = now_epoch_ms();
        let prev = self.0[instance]
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |p| Some(now.max(p + 1)))
            .unwrap_or_default();
        now.max(prev + 1)
    }
}

/// One request's outcome.
struct Sample {
    took: Duration,
    /// None: a transport failure (no HTTP status).
    status: Option<u16>,
}

/// POSTs one delivery and reads the reply to its end, so the connection goes back to the
/// agent's pool for the next request.
fn post(agent: &ureq::Agent, target: &Target, body: &[u8]) -> Option<u16> {
    let mut req = agent.post(&target.url);
    for (k, v) in &target.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let mut resp = req.send(body).ok()?;
    let status = resp.status().as_u16();
    let _ = std::io::copy(&mut resp.body_mut().as_reader(), &mut std::io::sink());
    Some(status)
}

/// One worker: takes delivery numbers from `next` until `total` are taken. Delivery `j` is
/// about instance `j mod K`, so the instances take turns whatever the concurrency.
fn worker(cfg: &Config, target: &Target, stamps: &Stamps, next: &AtomicU64) -> Vec<Sample> {
    let agent = delivery_agent();
    let mut samples = Vec::new();
    loop {
        let j = next.fetch_add(1, Ordering::SeqCst);
        if j >= cfg.total {
            return samples;
        }
        let i = (j % cfg.instances.len() as u64) as usize;
        // Stamped just before sending, so stamps follow the wall clock. With at least as many
        // instances as threads, two deliveries of one instance are in flight together only
        // behind an unusually slow one; the later-arriving older one is then skipped by the
        // receiver, as it would be coming from the real server.
        let body = target.body(&cfg.instances[i], stamps.next(i));
        let start = Instant::now();
        let status = post(&agent, target, &body);
        samples.push(Sample {
            took: start.elapsed(),
            status,
        });
    }
}

/// Runs the blast and returns every request's outcome and the wall time it took.
fn blast(cfg: &Config) -> (Vec<Sample>, Duration) {
    let target = Target::new(cfg);
    let stamps = Stamps::new(cfg.instances.len());
    let next = AtomicU64::new(0);
    let threads = cfg.concurrency.min(cfg.total);
    let start = Instant::now();
    let samples = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| s.spawn(|| worker(cfg, &target, &stamps, &next)))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect::<Vec<_>>()
    });
    (samples, start.elapsed())
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// The nearest-rank percentile of sorted values (`p` in 0..=100); 0 for none.
fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    ms(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// The one-line JSON summary.
fn summary(samples: &[Sample], elapsed: Duration) -> Value {
    let mut status_counts: BTreeMap<String, u64> = BTreeMap::new();
    for s in samples {
        if let Some(code) = s.status {
            *status_counts.entry(code.to_string()).or_default() += 1;
        }
    }
    let ok = samples
        .iter()
        .filter(|s| s.status.is_some_and(|c| (200..300).contains(&c)))
        .count();
    let errors = samples.iter().filter(|s| s.status.is_none()).count();
    let mut took: Vec<Duration> = samples.iter().map(|s| s.took).collect();
    took.sort();
    let secs = elapsed.as_secs_f64();
    let per_second = if secs > 0.0 {
        (samples.len() as f64 / secs * 10.0).round() / 10.0
    } else {
        0.0
    };
    json!({
        "sent": samples.len(),
        "ok": ok,
        "status_counts": status_counts,
        "errors": errors,
        "elapsed_ms": ms(elapsed),
        "per_second": per_second,
        "p50_ms": percentile(&took, 50.0),
        "p90_ms": percentile(&took, 90.0),
        "p99_ms": percentile(&took, 99.0),
        "max_ms": took.last().copied().map_or(0.0, ms),
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = match parse_args(&args) {
        Ok(c) => c,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    let (samples, elapsed) = blast(&cfg);
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", summary(&samples, elapsed));
    let _ = out.flush();
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_joins_the_query() {
        assert_eq!(
            url_with_secret("http://h/x", "s"),
            "http://h/x?evoq_secret=s"
        );
        assert_eq!(
            url_with_secret("http://h/x?a=1", "s"),
            "http://h/x?a=1&evoq_secret=s"
        );
    }

    #[test]
    fn stamps_grow_strictly_per_instance() {
        let stamps = Stamps::new(2);
        let a: Vec<u64> = (0..50).map(|_| stamps.next(0)).collect();
        assert!(a.windows(2).all(|w| w[1] > w[0]), "{a:?}");
        // Another instance has a clock of its own.
        let b = stamps.next(1);
        assert_eq!(stamps.0[0].load(Ordering::SeqCst), a[49]);
        assert_eq!(stamps.0[1].load(Ordering::SeqCst), b);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let d: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&d, 50.0), 50.0);
        assert_eq!(percentile(&d, 90.0), 90.0);
        assert_eq!(percentile(&d, 99.0), 99.0);
        assert_eq!(percentile(&d[..1], 99.0), 1.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn summary_counts() {
        let s = |ms: u64, status: Option<u16>| Sample {
            took: Duration::from_millis(ms),
            status,
        };
        let v = summary(
            &[
                s(10, Some(200)),
                s(20, Some(503)),
                s(30, None),
                s(40, Some(204)),
            ],
            Duration::from_secs(2),
        );
        assert_eq!(v["sent"], 4);
        assert_eq!(v["ok"], 2);
        assert_eq!(v["errors"], 1);
        assert_eq!(v["status_counts"], json!({"200": 1, "204": 1, "503": 1}));
        assert_eq!(v["per_second"], 2.0);
        assert_eq!(v["max_ms"], 40.0);
    }
}
