//! Webhook deliveries, the QR clock, the QR limit and socket accounting, end to end: a real
//! MockServer posting to a tiny receiver in the test.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use evolution_mock::{Flavor, MockConfig, MockServer};
use serde_json::{json, Value};

const KEY: &str = "BQYHJGJHJ";
/// Upper bound for anything the tests wait for.
const DEADLINE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// A webhook receiver: records every request and answers scripted statuses (then 200).

#[derive(Clone, Debug)]
struct Received {
    method: String,
    path: String,
    /// Lower-cased names.
    headers: Vec<(String, String)>,
    body: Value,
    at: Instant,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<Received>>>,
    script: Arc<Mutex<VecDeque<u16>>>,
}

impl Receiver {
    fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let got = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(VecDeque::new()));
        let (g, s) = (Arc::clone(&got), Arc::clone(&script));
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (g, s) = (Arc::clone(&g), Arc::clone(&s));
                std::thread::spawn(move || serve_one(stream, &g, &s));
            }
        });
        Receiver { port, got, script }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The next answers, in order; 200 once they are used up.
    fn answer(&self, statuses: &[u16]) {
        self.script.lock().unwrap().extend(statuses);
    }

    fn requests(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    /// Waits until at least `n` requests arrived.
    fn wait_for(&self, n: usize) -> Vec<Received> {
        wait_until(&format!("{n} webhook requests"), || {
            let r = self.requests();
            (r.len() >= n).then_some(r)
        })
    }
}

fn serve_one(stream: TcpStream, got: &Mutex<Vec<Received>>, script: &Mutex<VecDeque<u16>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.trim_end().split_once(':') {
            let k = k.trim().to_ascii_lowercase();
            let v = v.trim().to_string();
            if k == "content-length" {
                len = v.parse().unwrap_or(0);
            }
            headers.push((k, v));
        }
    }
    let mut body = vec![0; len];
    reader.read_exact(&mut body).unwrap();
    let status = script.lock().unwrap().pop_front().unwrap_or(200);
    got.lock().unwrap().push(Received {
        method,
        path,
        headers,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        at: Instant::now(),
    });
    let mut stream = stream;
    let _ = write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Length: 2\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{{}}"
    );
}

// ---------------------------------------------------------------------------------------
// Helpers

/// Polls `f` until it returns Some, failing after DEADLINE.
fn wait_until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

struct Client {
    agent: ureq::Agent,
    base: String,
}

impl Client {
    fn new(mock: &MockServer) -> Client {
        Client {
            agent: agent(),
            base: mock.url(),
        }
    }

    fn req(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let url = format!("{}{}", self.base, path);
        let resp = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("apikey", KEY).call(),
            ("DELETE", _) => self.agent.delete(&url).header("apikey", KEY).call(),
            ("POST", Some(b)) => self.agent.post(&url).header("apikey", KEY).send_json(&b),
            ("POST", None) => self.agent.post(&url).header("apikey", KEY).send_empty(),
            ("PUT", _) => self.agent.put(&url).header("apikey", KEY).send_empty(),
            (m, _) => panic!("method {m}"),
        };
        let mut resp = resp.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap();
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, v)
    }

    fn get(&self, path: &str) -> (u16, Value) {
        self.req("GET", path, None)
    }

    fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.req("POST", path, Some(body))
    }

    fn delete(&self, path: &str) -> (u16, Value) {
        self.req("DELETE", path, None)
    }

    fn config(&self, knobs: Value) {
        let (s, b) = self.post("/__mock/config", knobs);
        assert_eq!(s, 200, "{b}");
    }

    fn instance(&self, name: &str) -> Value {
        let (_, all) = self.get("/__mock/instances");
        all.as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == name)
            .cloned()
            .unwrap_or(Value::Null)
    }

    fn deliveries(&self) -> Vec<Value> {
        self.get("/__mock/deliveries").1.as_array().unwrap().clone()
    }

    /// Waits until `n` deliveries are logged and none is still pending.
    fn settled_deliveries(&self, n: usize) -> Vec<Value> {
        wait_until(&format!("{n} settled deliveries"), || {
            let d = self.deliveries();
            (d.len() >= n && d.iter().all(|x| x["pending"] == false)).then_some(d)
        })
    }

    fn sockets(&self) -> Value {
        self.get("/__mock/sockets").1
    }
}

fn start(flavor: Flavor, tweak: impl FnOnce(&mut MockConfig)) -> MockServer {
    let mut config = MockConfig {
        flavor,
        ..MockConfig::default()
    };
    tweak(&mut config);
    MockServer::start(0, config).unwrap()
}

/// Creates `name` with a webhook to `url`: v2 object form, v1.8 flat form.
fn create_hooked(
    c: &Client,
    flavor: Flavor,
    name: &str,
    url: &str,
    events: &[&str],
    by_events: bool,
    qrcode: bool,
) -> Value {
    let body = match flavor {
        Flavor::V2 => json!({
            "instanceName": name, "integration": "WHATSAPP-BAILEYS", "qrcode": qrcode,
            "webhook": {"url": url, "byEvents": by_events, "base64": false,
                        "headers": {"x-hook-secret": "s3cret", "authorization": "Bearer t"},
                        "events": events},
        }),
        Flavor::V1 => json!({
            "instanceName": name, "qrcode": qrcode, "webhook": url,
            "webhook_by_events": by_events, "events": events,
        }),
    };
    let (s, b) = c.post("/instance/create", body);
    assert_eq!(s, 201, "{b}");
    b
}

fn events(reqs: &[Received]) -> Vec<String> {
    reqs.iter()
        .map(|r| r.body["event"].as_str().unwrap_or("?").to_string())
        .collect()
}

fn is_rfc3339_millis_z(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 24
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'.'
        && b[23] == b'Z'
        && s.chars()
            .enumerate()
            .all(|(i, c)| [4, 7, 10, 13, 16, 19, 23].contains(&i) || c.is_ascii_digit())
}

const FLAVORS: [Flavor; 2] = [Flavor::V2, Flavor::V1];

// ---------------------------------------------------------------------------------------
// Tests

#[test]
fn envelope_headers_and_log_both_flavors() {
    for flavor in FLAVORS {
        let rx = Receiver::start();
        let mock = start(flavor, |_| {});
        let c = Client::new(&mock);
        let hook = rx.url("/hook");
        create_hooked(&c, flavor, "e1", &hook, &[], false, true);
        let inst = c.instance("e1");
        let id = inst["id"].as_str().unwrap().to_string();

        let before_scan = match flavor {
            Flavor::V2 => vec!["instance.create", "connection.update", "qrcode.updated"],
            Flavor::V1 => vec!["connection.update", "qrcode.updated"],
        };
        let reqs = rx.wait_for(before_scan.len());
        assert_eq!(events(&reqs), before_scan, "{flavor:?}");
        for r in &reqs {
            assert_eq!(r.method, "POST");
            assert_eq!(r.path, "/hook");
            assert_eq!(r.header("content-type"), Some("application/json"));
            assert_eq!(r.header("user-agent"), Some("axios/1.7.9"));
            let b = &r.body;
            assert_eq!(b["instance"], "e1");
            assert_eq!(b["destination"], hook.as_str());
            assert_eq!(b["server_url"], mock.url().as_str());
            assert!(is_rfc3339_millis_z(b["date_time"].as_str().unwrap()), "{b}");
            assert!(b.get("sender").is_none(), "no sender before login: {b}");
            match flavor {
                Flavor::V2 => {
                    assert_eq!(b["apikey"], Value::Null);
                    assert!(b.as_object().unwrap().contains_key("apikey"));
                    assert_eq!(r.header("x-hook-secret"), Some("s3cret"));
                    assert_eq!(r.header("authorization"), Some("Bearer t"));
                    assert_eq!(b.as_object().unwrap().len(), 7, "{b}");
                }
                Flavor::V1 => {
                    assert!(b.get("apikey").is_none(), "{b}");
                    assert_eq!(b.as_object().unwrap().len(), 6, "{b}");
                }
            }
        }
        let mut at = 0;
        if flavor == Flavor::V2 {
            assert_eq!(
                reqs[0].body["data"],
                json!({"instanceName": "e1", "instanceId": id})
            );
            at = 1;
        }
        assert_eq!(
            reqs[at].body["data"],
            json!({"instance": "e1", "state": "connecting", "statusReason": 200})
        );
        let qr = &reqs[at + 1].body["data"]["qrcode"];
        assert_eq!(qr["instance"], "e1");
        assert_eq!(qr["pairingCode"], Value::Null);
        assert_eq!(qr["code"], inst["qr_code"]);
        assert!(qr["base64"]
            .as_str()
            .unwrap()
            .starts_with("data:image/png;base64,"));

        // The scan: open, and from now on a sender.
        let (s, b) = c.post(
            "/__mock/instances/e1/scan",
            json!({"number": "5511999990000", "profile_name": "Ana"}),
        );
        assert_eq!(s, 200, "{b}");
        assert_eq!(b["instance"]["state"], "open");
        assert_eq!(b["instance"]["wuid"], "5511999990000@s.whatsapp.net");
        let reqs = rx.wait_for(before_scan.len() + 1);
        let open = &reqs.last().unwrap().body;
        assert_eq!(open["event"], "connection.update");
        assert_eq!(open["sender"], "5511999990000@s.whatsapp.net");
        match flavor {
            Flavor::V2 => assert_eq!(
                open["data"],
                json!({"instance": "e1", "wuid": "5511999990000@s.whatsapp.net", "profileName": "Ana",
                       "profilePictureUrl": null, "state": "open", "statusReason": 200})
            ),
            Flavor::V1 => assert_eq!(
                open["data"],
                json!({"instance": "e1", "state": "open", "statusReason": 200})
            ),
        }

        // The log mirrors what was received.
        let log = c.settled_deliveries(reqs.len());
        assert_eq!(log.len(), reqs.len());
        for (i, (d, r)) in log.iter().zip(&reqs).enumerate() {
            assert_eq!(d["seq"], i as u64 + 1);
            assert_eq!(d["event"], r.body["event"]);
            assert_eq!(d["instance"], "e1");
            assert_eq!(d["url"], hook.as_str());
            assert_eq!(d["attempts"], 1);
            assert_eq!(d["status"], 200);
            assert_eq!(d["error"], Value::Null);
            assert_eq!(d["delivered"], true);
            assert_eq!(d["envelope"], r.body);
            // The headers sent, names lower-cased, exactly what the receiver got.
            let sent = d["headers"].as_object().unwrap();
            assert_eq!(sent["content-type"], "application/json");
            assert_eq!(sent["user-agent"], "axios/1.7.9");
            for (k, v) in sent {
                assert_eq!(r.header(k), v.as_str(), "{k}");
            }
            if flavor == Flavor::V2 {
                assert_eq!(sent["x-hook-secret"], "s3cret");
            } else {
                assert!(sent.get("x-hook-secret").is_none());
            }
            let first = d["first_sent_at_ms"].as_u64().unwrap();
            assert!(d["delivered_at_ms"].as_u64().unwrap() >= first);
        }
        // fetchInstances shows the owner from the scan.
        if flavor == Flavor::V2 {
            let (_, rows) = c.get("/instance/fetchInstances?instanceName=e1");
            assert_eq!(rows[0]["ownerJid"], "5511999990000@s.whatsapp.net");
            assert_eq!(rows[0]["profileName"], "Ana");
        } else {
            let (_, row) = c.get("/instance/fetchInstances?instanceName=e1");
            assert_eq!(row["instance"]["owner"], "5511999990000@s.whatsapp.net");
        }

        // DELETE clears the log; reset too.
        assert_eq!(c.delete("/__mock/deliveries").0, 200);
        assert!(c.deliveries().is_empty());
        c.post("/__mock/instances/e1/unlink", json!({}));
        c.settled_deliveries(1);
        assert_eq!(c.post("/__mock/reset", json!({})).0, 200);
        assert!(c.deliveries().is_empty());
        assert!(mock.deliveries().is_empty());
    }
}

#[test]
fn by_events_urls_and_event_filter() {
    for flavor in FLAVORS {
        let rx = Receiver::start();
        let mock = start(flavor, |_| {});
        let c = Client::new(&mock);
        create_hooked(&c, flavor, "b1", &rx.url("/hook"), &[], true, true);
        let want: Vec<&str> = match flavor {
            Flavor::V2 => vec![
                "/hook/instance-create",
                "/hook/connection-update",
                "/hook/qrcode-updated",
            ],
            Flavor::V1 => vec!["/hook/connection-update", "/hook/qrcode-updated"],
        };
        let reqs = rx.wait_for(want.len());
        let paths: Vec<&str> = reqs.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(paths, want, "{flavor:?}");
        // The envelope still names the configured URL.
        assert_eq!(reqs[0].body["destination"], rx.url("/hook").as_str());

        // Only QRCODE_UPDATED: the connecting update and instance.create are filtered out.
        let rx2 = Receiver::start();
        create_hooked(
            &c,
            flavor,
            "f1",
            &rx2.url("/only-qr"),
            &["QRCODE_UPDATED"],
            false,
            true,
        );
        let reqs = rx2.wait_for(1);
        assert_eq!(events(&reqs), vec!["qrcode.updated"]);
        // Moving the subscription with webhook/set: CONNECTION_UPDATE to a new URL.
        let rx3 = Receiver::start();
        let set_body = match flavor {
            Flavor::V2 => json!({"webhook": {"enabled": true, "url": rx3.url("/conn"),
                                              "events": ["CONNECTION_UPDATE"]}}),
            Flavor::V1 => json!({"enabled": true, "url": rx3.url("/conn"),
                                 "events": ["CONNECTION_UPDATE"]}),
        };
        assert_eq!(c.post("/webhook/set/f1", set_body).0, 201);
        c.post("/__mock/instances/f1/qr", json!({}));
        c.post("/__mock/instances/f1/scan", json!({}));
        let reqs = rx3.wait_for(1);
        assert_eq!(events(&reqs), vec!["connection.update"]);
        assert_eq!(reqs[0].body["data"]["state"], "open");
        // The QR rotated by the control API went nowhere: neither receiver saw it.
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(rx2.requests().len(), 1);
        assert_eq!(rx3.requests().len(), 1);
        // A disabled webhook sends nothing.
        let off = match flavor {
            Flavor::V2 => json!({"webhook": {"enabled": false, "url": rx3.url("/conn")}}),
            Flavor::V1 => json!({"enabled": false, "url": rx3.url("/conn")}),
        };
        assert_eq!(c.post("/webhook/set/f1", off).0, 201);
        c.post("/__mock/instances/f1/unlink", json!({}));
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(rx3.requests().len(), 1);
    }
}

#[test]
fn v2_webhook_set_keeps_omitted_fields_for_delivery() {
    let rx = Receiver::start();
    let mock = start(Flavor::V2, |_| {});
    let c = Client::new(&mock);
    let (s, _) = c.post(
        "/instance/create",
        json!({"instanceName": "w", "integration": "WHATSAPP-BAILEYS"}),
    );
    assert_eq!(s, 201);
    let set = |body: Value| assert_eq!(c.post("/webhook/set/w", body).0, 201);
    set(
        json!({"webhook": {"enabled": true, "url": rx.url("/a"), "events": [],
                           "byEvents": true, "headers": {"x-one": "1"}}}),
    );
    // byEvents and headers left out: kept.
    set(
        json!({"webhook": {"enabled": true, "url": rx.url("/b"), "events": ["CONNECTION_UPDATE"]}}),
    );
    c.get("/instance/connect/w");
    let reqs = rx.wait_for(1);
    assert_eq!(reqs[0].path, "/b/connection-update");
    assert_eq!(reqs[0].header("x-one"), Some("1"));
}

#[test]
fn qr_clock_rotates_and_connect_returns_the_current_qr() {
    for flavor in FLAVORS {
        let rx = Receiver::start();
        let mock = start(flavor, |c| c.qr_ttl_ms = 150);
        let c = Client::new(&mock);
        let created = create_hooked(
            &c,
            flavor,
            "q",
            &rx.url("/hook"),
            &["QRCODE_UPDATED"],
            false,
            true,
        );
        assert_eq!(created["qrcode"], json!({"count": 0}));
        // QR 1 right after create, then one per tick, each delivered.
        let reqs = rx.wait_for(3);
        let codes: Vec<&Value> = reqs
            .iter()
            .map(|r| &r.body["data"]["qrcode"]["code"])
            .collect();
        assert_ne!(codes[0], codes[1]);
        assert_ne!(codes[1], codes[2]);
        let gap = reqs[2].at.duration_since(reqs[1].at);
        assert!(gap >= Duration::from_millis(100), "ticks {gap:?} apart");
        assert!(c.instance("q")["qr_count"].as_u64().unwrap() >= 3);

        // connect answers the current QR and mints none.
        let (count, code) = wait_until("a connect between two ticks", || {
            let before = c.instance("q");
            let (_, q) = c.get("/instance/connect/q");
            let after = c.instance("q");
            (before["qr_count"] == after["qr_count"]).then(|| {
                assert_eq!(q["count"], after["qr_count"]);
                assert_eq!(q["code"], after["qr_code"]);
                (q["count"].clone(), q["code"].clone())
            })
        });
        assert!(count.as_u64().unwrap() >= 3);
        assert!(
            c.settled_deliveries(3)
                .iter()
                .any(|d| d["envelope"]["data"]["qrcode"]["code"] == code),
            "the current QR was delivered"
        );
        // Stopping the clock (qr_ttl_ms 0): once the last tick's delivery is in, nothing
        // more arrives by itself.
        c.config(json!({"qr_ttl_ms": 0}));
        let logged = c.deliveries().len();
        let settled = c.settled_deliveries(logged).len();
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(c.deliveries().len(), settled);
        assert_eq!(rx.requests().len(), settled);
    }
}

#[test]
fn qr_never_and_offline_sockets() {
    // v2, WhatsApp unreachable: connect stays {"count":0}, the instance reads close, every
    // connect starts another socket, logout refuses, delete leaves the sockets as orphans.
    let rx = Receiver::start();
    let mock = start(Flavor::V2, |c| {
        c.qr_never = true;
        c.qr_ttl_ms = 100;
    });
    let c = Client::new(&mock);
    let created = create_hooked(&c, Flavor::V2, "n", &rx.url("/h"), &[], false, true);
    assert_eq!(created["qrcode"], json!({"count": 0}));
    assert_eq!(created["instance"]["status"], "close");
    for _ in 0..2 {
        let (s, q) = c.get("/instance/connect/n");
        assert_eq!((s, q), (200, json!({"count": 0})));
    }
    assert_eq!(c.instance("n")["sockets"], 3);
    assert_eq!(
        c.get("/instance/connectionState/n").1["instance"]["state"],
        "close"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(c.get("/instance/connect/n").1, json!({"count": 0}));
    assert_eq!(c.instance("n")["sockets"], 4);
    assert_eq!(c.delete("/instance/logout/n").0, 400);
    assert_eq!(
        c.sockets(),
        json!({"total": 4, "orphans": 0, "per_instance": {"n": 4}})
    );
    assert_eq!(c.delete("/instance/delete/n").0, 200);
    assert_eq!(
        c.sockets(),
        json!({"total": 4, "orphans": 4, "per_instance": {}})
    );
    // instance.create, 4 × connecting, remove.instance, instance.delete; no QR ever.
    let reqs = rx.wait_for(7);
    let ev = events(&reqs);
    assert_eq!(ev[0], "instance.create");
    assert_eq!(
        ev.iter().filter(|e| *e == "connection.update").count(),
        4,
        "{ev:?}"
    );
    assert_eq!(&ev[5..], ["remove.instance", "instance.delete"]);
    assert!(!ev.contains(&"qrcode.updated".to_string()));
    // reset forgets the orphans (a restarted server has no loops).
    c.post("/__mock/reset", json!({}));
    assert_eq!(c.sockets()["total"], 0);

    // v1.8 offline: connecting, {"count":0}, one socket.
    let mock = start(Flavor::V1, |c| c.qr_never = true);
    let c = Client::new(&mock);
    c.post(
        "/instance/create",
        json!({"instanceName": "m", "qrcode": true}),
    );
    assert_eq!(c.get("/instance/connect/m").1, json!({"count": 0}));
    assert_eq!(c.instance("m")["state"], "connecting");
    assert_eq!(c.instance("m")["sockets"], 1);
}

#[test]
fn scan_unlink_logout_sequences_and_sockets() {
    for flavor in FLAVORS {
        let rx = Receiver::start();
        let mock = start(flavor, |_| {});
        let c = Client::new(&mock);
        create_hooked(
            &c,
            flavor,
            "s",
            &rx.url("/h"),
            &["CONNECTION_UPDATE", "LOGOUT_INSTANCE"][..match flavor {
                Flavor::V2 => 2,
                Flavor::V1 => 1,
            }],
            false,
            true,
        );
        let sockets = |c: &Client| c.instance("s")["sockets"].as_u64().unwrap();
        assert_eq!(sockets(&c), 1);
        // Connect on a connecting instance starts nothing.
        c.get("/instance/connect/s");
        assert_eq!(sockets(&c), 1);
        assert_eq!(c.post("/__mock/instances/s/scan", json!({})).0, 200);
        assert_eq!(c.post("/__mock/instances/s/scan", json!({})).0, 409);
        assert_eq!(sockets(&c), 1);
        assert_eq!(c.post("/__mock/instances/s/unlink", json!({})).0, 200);
        assert_eq!(sockets(&c), 0);
        assert_eq!(c.instance("s")["state"], "close");
        assert_eq!(c.post("/__mock/instances/s/unlink", json!({})).0, 409);
        // Connect on close: a new socket and a fresh QR count.
        let (_, q) = c.get("/instance/connect/s");
        assert_eq!(q["count"], 1);
        assert_eq!(sockets(&c), 1);
        let (s, _) = c.delete("/instance/logout/s");
        assert_eq!(s, 200);
        assert_eq!(sockets(&c), 0);
        assert_eq!(c.delete("/instance/logout/s").0, 400);
        // The legacy state route emits the same events.
        c.get("/instance/connect/s");
        c.post("/__mock/instances/s/state", json!({"state": "open"}));
        c.post("/__mock/instances/s/state", json!({"state": "close"}));

        let close = json!({"instance": "s", "state": "close", "statusReason": 401});
        let connecting = json!({"instance": "s", "state": "connecting", "statusReason": 200});
        let open = match flavor {
            Flavor::V2 => json!({"instance": "s", "wuid": "5511999999999@s.whatsapp.net",
                                  "profileName": "Mock User", "profilePictureUrl": null,
                                  "state": "open", "statusReason": 200}),
            Flavor::V1 => json!({"instance": "s", "state": "open", "statusReason": 200}),
        };
        let mut want = vec![
            ("connection.update", connecting.clone()), // create
            ("connection.update", open.clone()),       // scan
            ("connection.update", close.clone()),      // unlink
            ("connection.update", connecting.clone()), // connect on close
            ("connection.update", close.clone()),      // logout route
            ("connection.update", connecting.clone()), // connect on close
            ("connection.update", open.clone()),       // state open
            ("connection.update", close.clone()),      // state close
        ];
        if flavor == Flavor::V2 {
            for at in [8, 5, 3] {
                want.insert(at, ("logout.instance", Value::Null));
            }
        }
        let reqs = rx.wait_for(want.len());
        let got: Vec<(String, Value)> = reqs
            .iter()
            .map(|r| {
                (
                    r.body["event"].as_str().unwrap().to_string(),
                    r.body["data"].clone(),
                )
            })
            .collect();
        let want: Vec<(String, Value)> =
            want.into_iter().map(|(e, d)| (e.to_string(), d)).collect();
        assert_eq!(got, want, "{flavor:?}");
        // The close and logout.instance of a logged-in session still carry its sender; the
        // next session's connecting does not.
        let senders: Vec<Option<&str>> = reqs.iter().map(|r| r.body["sender"].as_str()).collect();
        assert_eq!(senders[0], None);
        assert_eq!(senders[2], Some("5511999999999@s.whatsapp.net"));
        if flavor == Flavor::V2 {
            assert_eq!(senders[3], Some("5511999999999@s.whatsapp.net"));
            assert_eq!(senders[4], None);
        } else {
            assert_eq!(senders[3], None);
        }
        assert_eq!(
            c.sockets(),
            json!({"total": 0, "orphans": 0, "per_instance": {"s": 0}})
        );
    }
}

#[test]
fn connect_on_close_counts_sockets_and_restart_replaces() {
    for flavor in FLAVORS {
        let rx = Receiver::start();
        let mock = start(flavor, |_| {});
        let c = Client::new(&mock);
        create_hooked(
            &c,
            flavor,
            "r",
            &rx.url("/h"),
            &["CONNECTION_UPDATE"],
            false,
            false,
        );
        assert_eq!(c.instance("r")["sockets"], 0);
        c.get("/instance/connect/r");
        assert_eq!(c.instance("r")["sockets"], 1);
        match flavor {
            Flavor::V2 => {
                let before = c.instance("r")["qr_code"].clone();
                let (s, q) = c.post("/instance/restart/r", json!({}));
                assert_eq!(s, 200);
                // Answered with the QR of the ended socket; the new socket has a new one.
                assert_eq!(q["code"], before);
                assert_ne!(c.instance("r")["qr_code"], before);
                assert_eq!(c.instance("r")["sockets"], 1);
                c.post("/__mock/instances/r/scan", json!({}));
                let (_, b) = c.post("/instance/restart/r", json!({}));
                assert_eq!(
                    b,
                    json!({"instance": {"instanceName": "r", "state": "open"}})
                );
                assert_eq!(c.instance("r")["sockets"], 1);
                let states: Vec<String> = rx
                    .wait_for(5)
                    .iter()
                    .map(|r| r.body["data"]["state"].as_str().unwrap().to_string())
                    .collect();
                assert_eq!(
                    states,
                    ["connecting", "connecting", "open", "connecting", "open"]
                );
            }
            Flavor::V1 => {
                c.post("/__mock/instances/r/scan", json!({}));
                let (s, b) = c.req("PUT", "/instance/restart/r", None);
                assert_eq!(
                    (s, b),
                    (
                        200,
                        json!({"instance": {"instanceName": "r", "state": "open"}})
                    )
                );
                assert_eq!(c.instance("r")["sockets"], 1);
                let states: Vec<String> = rx
                    .wait_for(4)
                    .iter()
                    .map(|r| r.body["data"]["state"].as_str().unwrap().to_string())
                    .collect();
                assert_eq!(states, ["connecting", "open", "connecting", "open"]);
            }
        }
    }
}

#[test]
fn qr_limit_sequences() {
    for flavor in FLAVORS {
        let rx = Receiver::start();
        let mock = start(flavor, |c| {
            c.qr_ttl_ms = 100;
            c.qr_limit = 3;
        });
        let c = Client::new(&mock);
        create_hooked(
            &c,
            flavor,
            "l",
            &rx.url("/h"),
            &["QRCODE_UPDATED", "CONNECTION_UPDATE"],
            false,
            true,
        );
        // connecting, 3 QRs, then the limit message and refused.
        let reqs = rx.wait_for(6);
        let ev = events(&reqs[..6]);
        assert_eq!(
            ev,
            [
                "connection.update",
                "qrcode.updated",
                "qrcode.updated",
                "qrcode.updated",
                "qrcode.updated",
                "connection.update"
            ]
        );
        assert_eq!(
            reqs[4].body["data"],
            json!({"message": "QR code limit reached, please login again", "statusCode": 500})
        );
        let refused = match flavor {
            Flavor::V2 => json!({"instance": "l", "state": "refused", "statusReason": 428,
                                  "wuid": null, "profileName": null, "profilePictureUrl": null}),
            Flavor::V1 => json!({"instance": "l", "state": "refused", "statusReason": 428}),
        };
        assert_eq!(reqs[5].body["data"], refused);
        let i = wait_until("logged out after the limit", || {
            let i = c.instance("l");
            (i["state"] == "close").then_some(i)
        });
        assert_eq!(i["sockets"], 0);
        assert_eq!(i["qr_count"], 0);
        assert_eq!(i["qr_code"], Value::Null);
        // The clock stays quiet for a close instance.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(rx.requests().len(), 6);

        // The control route reaches it at once; a close instance cannot.
        c.config(json!({"qr_ttl_ms": 60000}));
        assert_eq!(c.post("/__mock/instances/l/qr-limit", json!({})).0, 409);
        let (_, q) = c.get("/instance/connect/l");
        assert_eq!(q["count"], 1);
        assert_eq!(
            c.post("/__mock/instances/l/qr", json!({})).1["instance"]["qr_count"],
            2
        );
        let (s, b) = c.post("/__mock/instances/l/qr-limit", json!({}));
        assert_eq!(s, 200);
        assert_eq!(b["instance"]["state"], "close");
        assert_eq!(b["instance"]["sockets"], 0);
        let reqs = rx.wait_for(11);
        assert_eq!(
            events(&reqs[6..]),
            [
                "connection.update",
                "qrcode.updated",
                "qrcode.updated",
                "qrcode.updated",
                "connection.update"
            ]
        );
        assert_eq!(reqs[10].body["data"]["state"], "refused");
    }
}

#[test]
fn delete_sequences() {
    // v2: logout first when connecting or open, then remove.instance and instance.delete,
    // delivered although the instance is gone.
    let rx = Receiver::start();
    let mock = start(Flavor::V2, |_| {});
    let c = Client::new(&mock);
    create_hooked(&c, Flavor::V2, "d", &rx.url("/h"), &[], false, true);
    let id = c.instance("d")["id"].as_str().unwrap().to_string();
    c.post("/__mock/instances/d/scan", json!({}));
    rx.wait_for(4);
    assert_eq!(c.delete("/instance/delete/d").0, 200);
    let reqs = rx.wait_for(8);
    assert_eq!(
        events(&reqs[4..]),
        [
            "connection.update",
            "logout.instance",
            "remove.instance",
            "instance.delete"
        ]
    );
    assert_eq!(reqs[4].body["data"]["state"], "close");
    assert_eq!(reqs[6].body["data"], Value::Null);
    assert_eq!(
        reqs[7].body["data"],
        json!({"instanceName": "d", "instanceId": id})
    );
    assert_eq!(
        c.sockets(),
        json!({"total": 0, "orphans": 0, "per_instance": {}})
    );
    // A close instance: no logout, just the two.
    create_hooked(&c, Flavor::V2, "d2", &rx.url("/h"), &[], false, false);
    rx.wait_for(9);
    c.delete("/instance/delete/d2");
    let reqs = rx.wait_for(11);
    assert_eq!(events(&reqs[9..]), ["remove.instance", "instance.delete"]);

    // v1.8: refuses open; a connecting one is logged out (close) and deleted, nothing else.
    let rx = Receiver::start();
    let mock = start(Flavor::V1, |_| {});
    let c = Client::new(&mock);
    create_hooked(&c, Flavor::V1, "d", &rx.url("/h"), &[], false, true);
    c.post("/__mock/instances/d/scan", json!({}));
    assert_eq!(c.delete("/instance/delete/d").0, 400);
    c.post("/__mock/instances/d/unlink", json!({}));
    c.get("/instance/connect/d");
    rx.wait_for(6);
    assert_eq!(c.delete("/instance/delete/d").0, 200);
    let reqs = rx.wait_for(7);
    std::thread::sleep(Duration::from_millis(100));
    let reqs_after = rx.requests();
    assert_eq!(reqs_after.len(), 7, "{:?}", events(&reqs_after));
    assert_eq!(
        reqs[6].body["data"],
        json!({"instance": "d", "state": "close", "statusReason": 401})
    );
    assert_eq!(c.sockets()["total"], 0);
}

#[test]
fn v2_retries_with_backoff_then_succeeds() {
    let rx = Receiver::start();
    let mock = start(Flavor::V2, |c| c.webhook_retry_ms = 50);
    let c = Client::new(&mock);
    rx.answer(&[500, 503, 502]);
    create_hooked(
        &c,
        Flavor::V2,
        "t",
        &rx.url("/h"),
        &["INSTANCE_CREATE"],
        false,
        false,
    );
    let log = c.settled_deliveries(1);
    let d = &log[0];
    assert_eq!(d["event"], "instance.create");
    assert_eq!(d["attempts"], 4);
    assert_eq!(d["status"], 200);
    assert_eq!(d["delivered"], true);
    assert_eq!(d["error"], Value::Null);
    let reqs = rx.requests();
    assert_eq!(reqs.len(), 4);
    assert!(
        reqs.iter().all(|r| r.body == reqs[0].body),
        "same envelope each time"
    );
    // Gaps: ≥ base, ≥ 2·base·0.8, ≥ 4·base·0.8.
    let gaps: Vec<u128> = reqs
        .windows(2)
        .map(|w| w[1].at.duration_since(w[0].at).as_millis())
        .collect();
    assert!(gaps[0] >= 50, "{gaps:?}");
    assert!(gaps[1] >= 80, "{gaps:?}");
    assert!(gaps[2] >= 160, "{gaps:?}");
    let took = d["delivered_at_ms"].as_u64().unwrap() - d["first_sent_at_ms"].as_u64().unwrap();
    assert!(took >= 290, "{took}");

    // A connection error is retried too, and gives up after 10 attempts.
    let dead = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    c.config(json!({"webhook_retry_ms": 1}));
    create_hooked(
        &c,
        Flavor::V2,
        "dead",
        &format!("http://127.0.0.1:{port}/h"),
        &["INSTANCE_CREATE"],
        false,
        false,
    );
    let log = c.settled_deliveries(2);
    let d = &log[1];
    assert_eq!(d["attempts"], 10);
    assert_eq!(d["delivered"], false);
    assert_eq!(d["status"], Value::Null);
    assert!(d["error"].as_str().is_some_and(|e| !e.is_empty()), "{d}");
    assert_eq!(d["delivered_at_ms"], Value::Null);
}

#[test]
fn v2_does_not_retry_404_and_v1_tries_once() {
    let rx = Receiver::start();
    let mock = start(Flavor::V2, |c| c.webhook_retry_ms = 20);
    let c = Client::new(&mock);
    rx.answer(&[404]);
    create_hooked(
        &c,
        Flavor::V2,
        "n4",
        &rx.url("/h"),
        &["INSTANCE_CREATE", "CONNECTION_UPDATE"],
        false,
        false,
    );
    let d = c.settled_deliveries(1)[0].clone();
    assert_eq!(
        (d["attempts"].clone(), d["status"].clone()),
        (json!(1), json!(404))
    );
    assert_eq!(d["delivered"], false);
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(rx.requests().len(), 1);
    // A later event still goes out (the failure holds nothing up).
    c.get("/instance/connect/n4");
    let log = c.settled_deliveries(2);
    assert_eq!(log[1]["event"], "connection.update");
    assert_eq!(log[1]["delivered"], true);
    assert_eq!(rx.requests().len(), 2);

    let rx = Receiver::start();
    let mock = start(Flavor::V1, |c| c.webhook_retry_ms = 20);
    let c = Client::new(&mock);
    rx.answer(&[500, 500]);
    create_hooked(
        &c,
        Flavor::V1,
        "o",
        &rx.url("/h"),
        &["CONNECTION_UPDATE"],
        false,
        true,
    );
    let d = c.settled_deliveries(1)[0].clone();
    assert_eq!(d["attempts"], 1);
    assert_eq!(d["status"], 500);
    assert_eq!(d["delivered"], false);
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(rx.requests().len(), 1);
    // The next event is delivered on its own try (it got the second 500, then a 200).
    c.post("/__mock/instances/o/scan", json!({}));
    c.post("/__mock/instances/o/unlink", json!({}));
    let log = c.settled_deliveries(3);
    assert_eq!(log[1]["status"], 500);
    assert_eq!(log[2]["status"], 200);
    assert!(log.iter().all(|d| d["attempts"] == 1));
}

#[test]
fn slow_receiver_never_slows_requests_and_order_holds() {
    // A receiver that takes 300 ms per POST: the requests that cause events return at once.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let order = Arc::new(Mutex::new(Vec::<String>::new()));
    {
        let order = Arc::clone(&order);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut len = 0;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; len];
                reader.read_exact(&mut body).unwrap();
                let v: Value = serde_json::from_slice(&body).unwrap();
                std::thread::sleep(Duration::from_millis(300));
                order
                    .lock()
                    .unwrap()
                    .push(v["data"]["state"].as_str().unwrap_or("qr").to_string());
                let mut s = stream;
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
            }
        });
    }
    let mock = start(Flavor::V2, |_| {});
    let c = Client::new(&mock);
    let t = Instant::now();
    create_hooked(
        &c,
        Flavor::V2,
        "slow",
        &format!("http://127.0.0.1:{port}/h"),
        &["CONNECTION_UPDATE"],
        false,
        true,
    );
    c.post("/__mock/instances/slow/scan", json!({}));
    c.post("/__mock/instances/slow/unlink", json!({}));
    // Three deliveries take ≥ 900 ms; the three requests that caused them return long before.
    assert!(
        t.elapsed() < Duration::from_millis(600),
        "{:?}",
        t.elapsed()
    );
    let got = wait_until("3 slow deliveries", || {
        let o = order.lock().unwrap().clone();
        (o.len() == 3).then_some(o)
    });
    assert_eq!(got, ["connecting", "open", "close"]);
}

#[test]
fn control_config_and_rust_api() {
    let mock = start(Flavor::V2, |_| {});
    let c = Client::new(&mock);
    let (_, cfg) = c.get("/__mock/config");
    assert_eq!(cfg["qr_ttl_ms"], 45000);
    assert_eq!(cfg["qr_limit"], 30);
    assert_eq!(cfg["webhook_retry_ms"], 5000);
    assert_eq!(cfg["qr_never"], false);
    let (s, cfg) = c.post(
        "/__mock/config",
        json!({"qr_limit": 5, "webhook_retry_ms": 10, "qr_never": true, "qr_ttl_ms": 1000}),
    );
    assert_eq!(s, 200);
    assert_eq!(
        (
            &cfg["qr_limit"],
            &cfg["webhook_retry_ms"],
            &cfg["qr_never"],
            &cfg["qr_ttl_ms"]
        ),
        (&json!(5), &json!(10), &json!(true), &json!(1000))
    );
    assert_eq!(c.post("/__mock/config", json!({"nope": 1})).0, 400);
    c.config(json!({"qr_never": false}));
    // 404 for unknown instances on every action; 400 for a bad scan body.
    for action in ["scan", "unlink", "qr", "qr-limit"] {
        assert_eq!(
            c.post(&format!("/__mock/instances/ghost/{action}"), json!({}))
                .0,
            404
        );
    }
    c.post(
        "/instance/create",
        json!({"instanceName": "k", "integration": "WHATSAPP-BAILEYS", "qrcode": true}),
    );
    assert_eq!(
        c.post("/__mock/instances/k/scan", json!({"nmber": "1"})).0,
        400
    );
    let item = c.instance("k");
    for key in [
        "name",
        "id",
        "token",
        "integration",
        "state",
        "qr_count",
        "qr_code",
        "webhook",
        "sockets",
        "wuid",
        "profile_name",
    ] {
        assert!(item.get(key).is_some(), "{key} in {item}");
    }
    // The Rust API does the same.
    assert!(mock.rotate_qr("k"));
    assert_eq!(mock.instance("k").unwrap()["qr_count"], 2);
    assert!(mock.scan("k", Some("+55 11 98888-7777"), Some("Bo")));
    assert_eq!(
        mock.instance("k").unwrap()["wuid"],
        "5511988887777@s.whatsapp.net"
    );
    assert!(!mock.scan("k", None, None));
    assert!(!mock.rotate_qr("k"));
    assert!(mock.unlink("k"));
    assert!(!mock.unlink("k"));
    assert_eq!(mock.sockets()["total"], 0);
    assert!(mock.deliveries().is_empty(), "no webhook configured");
}
