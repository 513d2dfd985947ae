//! `webhook-blast` end to end: the built binary against a tiny keep-alive receiver in the
//! test, which records every request and answers scripted statuses.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

#[derive(Clone, Debug)]
struct Got {
    /// Path and query, as requested.
    target: String,
    /// Lower-cased names.
    headers: Vec<(String, String)>,
    body: Value,
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<Got>>>,
    /// TCP connections accepted: the blaster keeps one alive per thread.
    connections: Arc<AtomicUsize>,
}

impl Receiver {
    /// `answer(n)` is the status of the n-th request (from 0).
    fn start(answer: fn(usize) -> u16) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let got = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (g, c) = (Arc::clone(&got), Arc::clone(&connections));
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                c.fetch_add(1, Ordering::SeqCst);
                let g = Arc::clone(&g);
                std::thread::spawn(move || serve_connection(stream, &g, answer));
            }
        });
        Receiver {
            port,
            got,
            connections,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    fn requests(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }
}

/// Requests one after another on one connection until the client closes it.
fn serve_connection(stream: TcpStream, got: &Mutex<Vec<Got>>, answer: fn(usize) -> u16) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut stream = stream;
    while let Some(req) = read_request(&mut reader) {
        let status = {
            let mut g = got.lock().unwrap();
            g.push(req);
            answer(g.len() - 1)
        };
        let reply = format!("HTTP/1.1 {status} X\r\nContent-Length: 2\r\n\r\n{{}}");
        if stream.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Got> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let target = line.split_whitespace().nth(1)?.to_string();
    let mut headers = Vec::new();
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.trim_end().split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_string());
            if k == "content-length" {
                len = v.parse().unwrap_or(0);
            }
            headers.push((k, v));
        }
    }
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    Some(Got {
        target,
        headers,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    })
}

/// Writes an instances file under the test's scratch directory.
fn instances_file(name: &str, text: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("blast-{name}.txt"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs the binary; its exit code and its stdout as JSON (null if it printed none).
fn blast(args: &[&str]) -> (i32, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_webhook-blast"))
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), summary)
}

/// The request bodies of each instance, in arrival order.
fn by_instance(got: &[Got]) -> BTreeMap<String, Vec<Value>> {
    let mut map: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for g in got {
        let name = g.body["instance"].as_str().unwrap().to_string();
        map.entry(name).or_default().push(g.body.clone());
    }
    map
}

fn date_times(bodies: &[Value]) -> Vec<String> {
    bodies
        .iter()
        .map(|b| b["date_time"].as_str().unwrap().to_string())
        .collect()
}

fn assert_summary_is_consistent(s: &Value) {
    let p = |k: &str| s[k].as_f64().unwrap_or_else(|| panic!("{k} in {s}"));
    assert!(
        p("p50_ms") <= p("p90_ms") && p("p90_ms") <= p("p99_ms"),
        "{s}"
    );
    assert!(p("p99_ms") <= p("max_ms"), "{s}");
    assert!(p("elapsed_ms") > 0.0 && p("per_second") > 0.0, "{s}");
}

#[test]
fn blast_v2_posts_fresh_qr_deliveries_with_the_header_secret() {
    // Every fifth request is refused, to see the counts split.
    let rx = Receiver::start(|n| if n % 5 == 4 { 503 } else { 200 });
    let file = instances_file("v2", "a\n\n  b \nc\n");
    let url = rx.url();
    let (code, s) = blast(&[
        "--url",
        &url,
        "--instances",
        file.to_str().unwrap(),
        "--total",
        "30",
        "--concurrency",
        "4",
        "--secret",
        "s3cret",
    ]);
    assert_eq!(code, 0, "{s}");
    assert_eq!(
        (&s["sent"], &s["ok"], &s["errors"]),
        (&json!(30), &json!(24), &json!(0)),
        "{s}"
    );
    assert_eq!(s["status_counts"], json!({"200": 24, "503": 6}));
    assert_summary_is_consistent(&s);

    let got = rx.requests();
    assert_eq!(got.len(), 30);
    let mut qrs = HashSet::new();
    for g in &got {
        assert_eq!(g.target, "/hook");
        assert_eq!(g.header("x-evoq-secret"), Some("s3cret"));
        assert_eq!(g.header("content-type"), Some("application/json"));
        assert_eq!(g.header("user-agent"), Some("axios/1.7.9"));
        let b = &g.body;
        assert_eq!(b["event"], "qrcode.updated");
        assert_eq!(b["destination"], url.as_str());
        assert!(b.as_object().unwrap().contains_key("apikey"), "v2: {b}");
        let qr = &b["data"]["qrcode"];
        assert_eq!(qr["instance"], b["instance"]);
        assert!(qr["base64"]
            .as_str()
            .unwrap()
            .starts_with("data:image/png;base64,"));
        // A fresh QR every time.
        assert!(qrs.insert(qr["code"].as_str().unwrap().to_string()));
    }
    // Round-robin over the names; each instance's stamps all differ (the four threads may
    // deliver two of one instance's side by side, so arrival order is not checked here).
    let per = by_instance(&got);
    assert_eq!(per.keys().collect::<Vec<_>>(), ["a", "b", "c"]);
    for (name, bodies) in &per {
        assert_eq!(bodies.len(), 10, "{name}");
        let mut stamps = date_times(bodies);
        stamps.sort();
        assert!(stamps.windows(2).all(|w| w[0] < w[1]), "{name}: {stamps:?}");
    }
    // Keep-alive: one connection per thread, not one per request.
    assert!(rx.connections.load(Ordering::SeqCst) <= 4);
}

#[test]
fn blast_v1_puts_the_secret_in_the_url_and_stamps_grow() {
    let rx = Receiver::start(|_| 200);
    let file = instances_file("v1", "x\ny\n");
    let (code, s) = blast(&[
        "--url",
        &rx.url(),
        "--instances",
        file.to_str().unwrap(),
        "--total=8",
        "--concurrency=1",
        "--secret=s3cret",
        "--api-version=1.8.2",
        "--event=connection.update",
    ]);
    assert_eq!(code, 0, "{s}");
    assert_eq!((&s["sent"], &s["ok"]), (&json!(8), &json!(8)), "{s}");
    assert_eq!(s["status_counts"], json!({"200": 8}));
    let got = rx.requests();
    let with_secret = format!("{}?evoq_secret=s3cret", rx.url());
    for g in &got {
        assert_eq!(g.target, "/hook?evoq_secret=s3cret");
        assert_eq!(
            g.header("x-evoq-secret"),
            None,
            "v1.8 sends no custom headers"
        );
        let b = &g.body;
        assert_eq!(b["destination"], with_secret.as_str());
        assert!(b.get("apikey").is_none(), "v1.8: {b}");
        assert_eq!(
            b["data"],
            json!({"instance": b["instance"], "state": "connecting", "statusReason": 200})
        );
    }
    // One thread: deliveries arrive in the order they were stamped, each newer than the last.
    for (name, bodies) in by_instance(&got) {
        assert_eq!(bodies.len(), 4, "{name}");
        let stamps = date_times(&bodies);
        assert!(stamps.windows(2).all(|w| w[0] < w[1]), "{name}: {stamps:?}");
    }
    assert_eq!(rx.connections.load(Ordering::SeqCst), 1);
}

#[test]
fn blast_counts_transport_errors_and_rejects_bad_usage() {
    // A port nobody listens on: every request is a transport error, still exit code 0.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://127.0.0.1:{}/", closed.local_addr().unwrap().port());
    drop(closed);
    let file = instances_file("errors", "e\n");
    let path = file.to_str().unwrap();
    let (code, s) = blast(&[
        "--url",
        &url,
        "--instances",
        path,
        "--total",
        "3",
        "--concurrency",
        "2",
    ]);
    assert_eq!(code, 0, "{s}");
    assert_eq!(
        (&s["sent"], &s["ok"], &s["errors"], &s["status_counts"]),
        (&json!(3), &json!(0), &json!(3), &json!({})),
        "{s}"
    );

    let empty = instances_file("empty", "\n  \n");
    let empty = empty.to_str().unwrap();
    for bad in [
        vec!["--url", &url, "--instances", path, "--concurrency", "1"],
        vec![
            "--url",
            &url,
            "--instances",
            path,
            "--total",
            "1",
            "--concurrency",
            "0",
        ],
        vec![
            "--url",
            &url,
            "--instances",
            empty,
            "--total",
            "1",
            "--concurrency",
            "1",
        ],
        vec![
            "--url",
            &url,
            "--instances",
            "/nonexistent/x",
            "--total",
            "1",
            "--concurrency",
            "1",
        ],
        vec![
            "--url",
            &url,
            "--instances",
            path,
            "--total",
            "1",
            "--concurrency",
            "1",
            "--api-version",
            "3",
        ],
        vec!["--bogus"],
    ] {
        let (code, s) = blast(&bad);
        assert_eq!((code, s), (2, Value::Null), "{bad:?}");
    }
}
