//! The listener over real sockets on 127.0.0.1: a client on one side, a fake main loop (the
//! test thread, draining `try_recv` after each wake) on the other. Waits are on channels and
//! conditions; the timeouts only bound a failing test.

use super::*;
use std::io::{ErrorKind, Read, Write};
use std::sync::atomic::AtomicUsize;
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Mutex;
use std::time::Instant;

/// How long a test waits for something that should happen, before it fails.
const PATIENCE: Duration = Duration::from_secs(10);

/// The secret every test listener accepts (unless the test changes the set).
const SECRET: &str = "test-secret";
/// The head line that carries it.
const WITH_SECRET: &str = "X-Evoq-Secret: test-secret\r\n";

fn config() -> ListenerConfig {
    let secrets = Secrets::new();
    secrets.set(vec![SECRET.into()]);
    ListenerConfig {
        address: "127.0.0.1:0".into(),
        max_body_bytes: 1000,
        max_connections: 8,
        queue_capacity: 8,
        reply_timeout: PATIENCE,
        read_timeout: PATIENCE,
        head_timeout: PATIENCE,
        body_timeout: PATIENCE,
        secrets,
        heartbeat: Heartbeat::new(),
        stale_after: PATIENCE,
    }
}

/// For each wake: whether the calling thread had the Postgres signals blocked, and its name.
type Wakers = Arc<Mutex<Vec<(bool, Option<String>)>>>;

/// A listener and the main loop's side of it.
struct Harness {
    listener: Listener,
    wakes: Receiver<()>,
    woken: Arc<AtomicUsize>,
    wakers: Wakers,
    /// The listener's, as the main loop holds them.
    secrets: Secrets,
    heartbeat: Heartbeat,
}

fn start(config: ListenerConfig) -> Harness {
    let (secrets, heartbeat) = (config.secrets.clone(), config.heartbeat.clone());
    let (tx, wakes) = mpsc::channel();
    let woken = Arc::new(AtomicUsize::new(0));
    let wakers: Wakers = Arc::default();
    let (w, ws) = (woken.clone(), wakers.clone());
    let wake = move || {
        ws.lock().unwrap().push((
            pg_signals_blocked_here(),
            std::thread::current().name().map(str::to_string),
        ));
        w.fetch_add(1, Ordering::SeqCst);
        let _ = tx.send(());
    };
    let listener = Listener::start(config, Arc::new(wake)).unwrap();
    Harness {
        listener,
        wakes,
        woken,
        wakers,
        secrets,
        heartbeat,
    }
}

impl Harness {
    fn addr(&self) -> SocketAddr {
        self.listener.local_addr()
    }

    /// The next delivery, as the worker's main loop gets it: after a wake.
    fn next(&self) -> Delivery {
        loop {
            if let Some(d) = self.listener.try_recv() {
                return d;
            }
            self.wakes
                .recv_timeout(PATIENCE)
                .expect("a delivery should have woken the main loop");
        }
    }

    /// Waits until a delivery has been queued (its wake), without taking it.
    fn wait_for_wake(&self) {
        self.wakes.recv_timeout(PATIENCE).expect("a wake");
    }

    fn wait_until(&self, what: &str, ok: impl Fn(ListenerStats) -> bool) {
        let until = Instant::now() + PATIENCE;
        while !ok(self.listener.stats()) {
            assert!(
                Instant::now() < until,
                "{what}: {:?}",
                self.listener.stats()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// An HTTP answer as the client read it.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|_| panic!("JSON body: {self:?}"))
    }

    fn closes(&self) -> bool {
        self.header("connection") == Some("close")
    }
}

/// A minimal HTTP client that writes raw bytes, so tests can send what a real client would
/// not.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// A POST with the test secret in its header, and `headers`.
    fn post(&mut self, target: &str, headers: &str, body: &str) {
        self.post_without_secret(target, &format!("{WITH_SECRET}{headers}"), body);
    }

    /// A POST with only `headers` (the secret, if any, is up to the caller).
    fn post_without_secret(&mut self, target: &str, headers: &str, body: &str) {
        let request = format!(
            "POST {target} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{headers}\r\n{body}",
            body.len()
        );
        self.send(request.as_bytes());
    }

    fn get(&mut self, target: &str) -> Reply {
        self.send(format!("GET {target} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes());
        self.reply()
    }

    fn more(&mut self) -> usize {
        let mut chunk = [0u8; 4096];
        let n = match self.stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => 0,
            Err(e) => panic!("client read: {e}"),
        };
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    fn reply(&mut self) -> Reply {
        self.reply_with_body(true)
    }

    /// The next answer; `with_body`: false for the answer to HEAD.
    fn reply_with_body(&mut self, with_body: bool) -> Reply {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut r = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(len) = r.parse(&self.buf).unwrap() {
                let status = r.code.unwrap();
                let headers: Vec<(String, String)> = r
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8(h.value.to_vec()).unwrap(),
                        )
                    })
                    .collect();
                self.buf.drain(..len);
                let mut reply = Reply {
                    status,
                    headers,
                    body: String::new(),
                };
                let length: usize = match reply.header("content-length") {
                    Some(v) if with_body && status != 100 => v.parse().unwrap(),
                    _ => 0,
                };
                while self.buf.len() < length {
                    assert!(self.more() > 0, "the body was cut short");
                }
                reply.body = String::from_utf8(self.buf.drain(..length).collect()).unwrap();
                return reply;
            }
            assert!(self.more() > 0, "closed before an answer: {:?}", self.buf);
        }
    }

    /// Whether the server closed the connection (reads until the end, within PATIENCE).
    fn closed(&mut self) -> bool {
        loop {
            match self.more() {
                0 => return true,
                _ => continue,
            }
        }
    }
}

/// Sends `request` on a new connection from another thread; the answer comes on the channel.
fn spawn_request(addr: SocketAddr, request: String) -> Receiver<Reply> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut c = Client::connect(addr);
        c.send(request.as_bytes());
        let _ = tx.send(c.reply());
    });
    rx
}

/// A POST with the test secret in its header, and `headers`.
fn post_request(target: &str, headers: &str, body: &str) -> String {
    format!(
        "POST {target} HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n{WITH_SECRET}{headers}\r\n{body}",
        body.len()
    )
}

const PG_SIGNALS: [libc::c_int; 6] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
    libc::SIGHUP,
];

fn pg_signals_blocked_here() -> bool {
    // SAFETY: a query of the calling thread's mask into a local.
    unsafe {
        let mut cur: libc::sigset_t = std::mem::zeroed();
        assert_eq!(
            libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut cur),
            0
        );
        PG_SIGNALS.iter().all(|&s| libc::sigismember(&cur, s) == 1)
    }
}

#[test]
fn a_delivery_is_answered_200_only_after_the_main_loop_answers() {
    let h = start(config());
    let reply = spawn_request(
        h.addr(),
        post_request("/hook/qrcode-updated", "", r#"{"event":"qrcode.updated"}"#),
    );
    let d = h.next();
    assert_eq!(d.body, br#"{"event":"qrcode.updated"}"#);
    assert_eq!(d.path, "/hook/qrcode-updated");
    assert_eq!(
        d.secret.as_deref(),
        Some(SECRET),
        "passed on for the main thread"
    );
    assert!(d.peer.ip().is_loopback());
    assert!(!d.abandoned());
    // Held by the main loop: the client has no answer yet.
    assert!(matches!(
        reply.recv_timeout(Duration::from_millis(300)),
        Err(RecvTimeoutError::Timeout)
    ));
    d.answer(Verdict::Applied);
    let r = reply.recv_timeout(PATIENCE).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), serde_json::json!({"status": "applied"}));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("connection"), Some("keep-alive"));
    let s = h.listener.stats();
    assert_eq!((s.requests, s.deliveries, s.answered_2xx), (1, 1, 1));
}

#[test]
fn the_secret_comes_from_the_header_else_from_the_query_percent_decoded() {
    let h = start(config());
    h.secrets.set(vec![
        "from-header".into(),
        "ab+c d+e".into(),
        "header-wins".into(),
    ]);
    let mut c = Client::connect(h.addr());
    let cases = [
        (
            "/hook",
            "X-Evoq-Secret: from-header\r\n",
            Some("from-header"),
        ),
        ("/hook/x?a=1&evoq_secret=ab%2Bc%20d+e", "", Some("ab+c d+e")),
        (
            "/hook?evoq_secret=from-query",
            "x-evoq-secret: header-wins\r\n",
            Some("header-wins"),
        ),
    ];
    for (target, headers, want) in cases {
        c.post_without_secret(target, headers, "{}");
        let d = h.next();
        assert_eq!(d.secret.as_deref(), want, "{target} {headers}");
        assert!(
            !d.path.contains('?'),
            "the query (and its secret) stays out of the path"
        );
        // The secret never shows in Debug output.
        if let Some(secret) = want {
            assert!(!format!("{d:?}").contains(secret));
        }
        d.answer(Verdict::Ignored);
        assert_eq!(c.reply().json(), serde_json::json!({"status": "ignored"}));
    }
    // An empty query value is no secret; neither is another parameter.
    for target in ["/hook?evoq_secret=", "/hook?other=1"] {
        let mut c = Client::connect(h.addr());
        c.post_without_secret(target, "", "{}");
        let r = c.reply();
        assert_eq!(
            r.json(),
            serde_json::json!({"error": "webhook delivery refused: no webhook secret"})
        );
    }
    assert!(h.listener.try_recv().is_none());
}

/// The head of a 1 MiB POST, without its body.
fn head_of_a_big_post(target: &str, headers: &str) -> String {
    format!("POST {target} HTTP/1.1\r\nHost: test\r\nContent-Length: 1048576\r\n{headers}\r\n")
}

#[test]
fn a_wrong_or_missing_secret_is_401_before_the_body_is_sent() {
    let h = start(ListenerConfig {
        // Large enough that the size is not what refuses it.
        max_body_bytes: 2 << 20,
        ..config()
    });
    let forged = [
        ("/hook", "X-Evoq-Secret: guess\r\n", "wrong"),
        ("/hook", "", "no"),
        ("/hook?evoq_secret=guess", "", "wrong"),
        ("/hook?evoq_secret=test-secre", "", "wrong"),
        // A wrong header is not rescued by a right query: the header is the secret presented.
        (
            "/hook?evoq_secret=test-secret",
            "X-Evoq-Secret: guess\r\n",
            "wrong",
        ),
        // Told to send its body? No: 401 instead of 100 Continue.
        ("/hook", "Expect: 100-continue\r\n", "no"),
    ];
    for (target, headers, which) in forged {
        let mut c = Client::connect(h.addr());
        // The head only: an answer proves the listener did not wait for the body.
        c.send(head_of_a_big_post(target, headers).as_bytes());
        let started = Instant::now();
        let r = c.reply();
        assert!(started.elapsed() < Duration::from_secs(2), "{target}");
        assert_eq!((r.status, r.closes()), (401, true), "{target} {headers}");
        assert_eq!(
            r.json(),
            serde_json::json!({ "error": format!("webhook delivery refused: {which} webhook secret") })
        );
        assert!(c.closed());
    }
    // Nothing reached the main loop, and the main loop can count them.
    assert!(h.listener.try_recv().is_none());
    assert_eq!(h.woken.load(Ordering::SeqCst), 0);
    let n = forged.len() as u64;
    assert_eq!(h.listener.take_rejected(), n);
    assert_eq!(h.listener.take_rejected(), 0, "taken: reset");
    let s = h.listener.stats();
    assert_eq!((s.rejected, s.deliveries, s.answered_4xx), (n, 0, n));
}

#[test]
fn the_right_secret_in_the_header_or_the_v18_query_is_delivered() {
    let h = start(config());
    let mut c = Client::connect(h.addr());
    let requests = [
        ("/hook/qrcode-updated", WITH_SECRET),
        // v1.8 servers send no custom header: the secret is in the URL evoq gave them.
        ("/hook/qrcode-updated?evoq_secret=test-secret", ""),
        ("/hook?a=1&evoq_secret=test%2Dsecret", ""),
    ];
    for (target, headers) in requests {
        c.post_without_secret(target, headers, "{}");
        let d = h.next();
        assert_eq!(d.secret.as_deref(), Some(SECRET), "{target}");
        d.answer(Verdict::Applied);
        let r = c.reply();
        assert_eq!((r.status, r.closes()), (200, false));
    }
    assert_eq!(h.listener.take_rejected(), 0);
}

/// Sends a delivery with `secret` in its header: the status it is answered, the main loop
/// answering `Applied` to whatever reaches it.
fn status_with_secret(h: &Harness, secret: &str) -> u16 {
    let request =
        format!("POST /hook HTTP/1.1\r\nX-Evoq-Secret: {secret}\r\nContent-Length: 2\r\n\r\n{{}}");
    let reply = spawn_request(h.addr(), request);
    loop {
        if let Ok(r) = reply.recv_timeout(Duration::from_millis(10)) {
            return r.status;
        }
        if let Some(d) = h.listener.try_recv() {
            d.answer(Verdict::Applied);
            return reply.recv_timeout(PATIENCE).unwrap().status;
        }
    }
}

#[test]
fn an_updated_set_takes_effect_at_once_and_a_previous_secret_kept_in_it_still_works() {
    let h = start(config());
    assert_eq!(status_with_secret(&h, SECRET), 200);
    // A rotation: the new secret, and the previous one while servers catch up.
    h.secrets.set(vec!["rotated".into(), SECRET.into()]);
    assert_eq!(status_with_secret(&h, "rotated"), 200);
    assert_eq!(status_with_secret(&h, SECRET), 200);
    // The rotation is over: the old one is refused, from the next request on.
    h.secrets.set(vec!["rotated".into()]);
    assert_eq!(status_with_secret(&h, SECRET), 401);
    assert_eq!(status_with_secret(&h, "rotated"), 200);
    assert_eq!(h.listener.take_rejected(), 1);
    assert_eq!(h.listener.stats().deliveries, 4);
}

#[test]
fn with_no_secret_set_yet_a_post_is_503_and_never_delivered() {
    let h = start(ListenerConfig {
        secrets: Secrets::new(),
        max_body_bytes: 2 << 20,
        ..config()
    });
    for headers in [WITH_SECRET, ""] {
        let mut c = Client::connect(h.addr());
        c.send(head_of_a_big_post("/hook", headers).as_bytes());
        let r = c.reply();
        assert_eq!(
            (r.status, r.closes()),
            (503, true),
            "never 401: nobody is wrong yet"
        );
        assert_eq!(r.header("retry-after"), Some("1"));
        assert!(r.json()["error"]
            .as_str()
            .unwrap()
            .contains("not configured"));
        assert!(c.closed());
    }
    assert!(h.listener.try_recv().is_none());
    assert_eq!(h.woken.load(Ordering::SeqCst), 0);
    assert_eq!(h.listener.take_rejected(), 0);
    assert_eq!(h.listener.stats().unconfigured, 2);
    // Configured: the same request goes through.
    h.secrets.set(vec![SECRET.into()]);
    let reply = spawn_request(h.addr(), post_request("/hook", "", "{}"));
    h.next().answer(Verdict::Applied);
    assert_eq!(reply.recv_timeout(PATIENCE).unwrap().status, 200);
}

#[test]
fn two_requests_share_one_kept_alive_connection() {
    let h = start(config());
    let mut c = Client::connect(h.addr());
    c.post("/hook/a", "", "[1]");
    let d = h.next();
    assert_eq!(d.body, b"[1]");
    d.answer(Verdict::Applied);
    let r = c.reply();
    assert_eq!((r.status, r.closes()), (200, false));
    assert!(r.header("keep-alive").is_some());

    // The same connection, and this time the client asks to close.
    c.post("/hook/b", "Connection: close\r\n", "[2]");
    let d = h.next();
    assert_eq!(
        (d.body.as_slice(), d.path.as_str()),
        (&b"[2]"[..], "/hook/b")
    );
    d.answer(Verdict::Applied);
    let r = c.reply();
    assert_eq!((r.status, r.closes()), (200, true));
    assert!(c.closed());
    let s = h.listener.stats();
    assert_eq!((s.accepted, s.requests, s.answered_2xx), (1, 2, 2));
}

#[test]
fn verdicts_become_statuses_with_json_reasons() {
    let h = start(config());
    let mut c = Client::connect(h.addr());
    let cases = [
        (Verdict::Rejected("wrong \"secret\"".into()), 401),
        (Verdict::Invalid("not JSON".into()), 400),
        (Verdict::Failed("could not commit".into()), 503),
        (Verdict::Applied, 200),
    ];
    for (verdict, status) in cases {
        assert_eq!(verdict.status(), status);
        c.post("/", "", "x");
        let reason = match &verdict {
            Verdict::Rejected(r) | Verdict::Invalid(r) | Verdict::Failed(r) => Some(r.clone()),
            _ => None,
        };
        h.next().answer(verdict);
        let r = c.reply();
        assert_eq!(r.status, status);
        // The body was read: the connection goes on, even after an error.
        assert!(!r.closes());
        if let Some(reason) = reason {
            assert_eq!(r.json(), serde_json::json!({ "error": reason }));
        }
        assert_eq!(r.header("retry-after").is_some(), status == 503);
    }
    let s = h.listener.stats();
    assert_eq!((s.answered_2xx, s.answered_4xx, s.answered_5xx), (1, 2, 1));
}

#[test]
fn expect_100_continue_gets_continue_before_the_body() {
    let h = start(config());
    let mut c = Client::connect(h.addr());
    c.send(format!("POST /hook HTTP/1.1\r\nHost: t\r\n{WITH_SECRET}Content-Length: 5\r\nExpect: 100-continue\r\n\r\n").as_bytes());
    assert_eq!(c.reply().status, 100);
    c.send(b"hello");
    let d = h.next();
    assert_eq!(d.body, b"hello");
    d.answer(Verdict::Applied);
    assert_eq!(c.reply().status, 200);
}

#[test]
fn a_content_length_over_the_limit_is_refused_413_without_reading_the_body() {
    let h = start(config());
    for expect in ["", "Expect: 100-continue\r\n"] {
        let mut c = Client::connect(h.addr());
        // The head only: an answer proves the listener did not wait for the body.
        c.send(
            format!("POST /hook HTTP/1.1\r\n{WITH_SECRET}Content-Length: 10000000\r\n{expect}\r\n")
                .as_bytes(),
        );
        let r = c.reply();
        assert_eq!(r.status, 413, "not 100 Continue: {expect}");
        assert!(r.closes());
        assert!(c.closed());
    }
    // At the limit exactly: accepted.
    let mut c = Client::connect(h.addr());
    c.post("/hook", "", &"a".repeat(1000));
    let d = h.next();
    assert_eq!(d.body.len(), 1000);
    d.answer(Verdict::Applied);
    assert_eq!(c.reply().status, 200);
    assert_eq!(h.listener.stats().deliveries, 1);
}

#[test]
fn a_chunked_body_is_accepted_and_one_over_the_limit_is_refused_413() {
    let h = start(config());
    let mut c = Client::connect(h.addr());
    c.send(format!("POST /hook HTTP/1.1\r\n{WITH_SECRET}Transfer-Encoding: chunked\r\n\r\n4\r\n{{\"a\"\r\n3\r\n:1}}\r\n0\r\n\r\n").as_bytes());
    let d = h.next();
    assert_eq!(d.body, br#"{"a":1}"#);
    d.answer(Verdict::Applied);
    assert_eq!(c.reply().status, 200);

    let chunk = "a".repeat(600);
    c.send(format!("POST /hook HTTP/1.1\r\n{WITH_SECRET}Transfer-Encoding: chunked\r\n\r\n258\r\n{chunk}\r\n258\r\n{chunk}\r\n0\r\n\r\n").as_bytes());
    let r = c.reply();
    assert_eq!((r.status, r.closes()), (413, true));
    assert!(c.closed());
    assert_eq!(h.listener.stats().deliveries, 1);
}

#[test]
fn a_post_without_length_is_411_and_other_methods_are_405() {
    let h = start(config());
    let mut c = Client::connect(h.addr());
    c.send(format!("POST /hook HTTP/1.1\r\nHost: t\r\n{WITH_SECRET}\r\n").as_bytes());
    let r = c.reply();
    assert_eq!((r.status, r.closes()), (411, true));
    assert!(c.closed());

    let mut c = Client::connect(h.addr());
    c.send(b"DELETE /hook HTTP/1.1\r\n\r\n");
    let r = c.reply();
    assert_eq!((r.status, r.closes()), (405, false));
    assert_eq!(r.header("allow"), Some("GET, HEAD, POST"));
    // No body to skip: the connection goes on.
    assert_eq!(c.get("/health").status, 200);
    // With a body it does not read, the listener closes.
    c.send(b"PUT /hook HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc");
    let r = c.reply();
    assert_eq!((r.status, r.closes()), (405, true));
    assert!(c.closed());
    assert_eq!(h.listener.stats().deliveries, 0);
}

#[test]
fn get_answers_without_the_main_loop_and_health_reports_its_heartbeat() {
    let h = start(config());
    let mut c = Client::connect(h.addr());
    let r = c.get("/health");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ok");
    assert!(r.json()["last_loop_ms_ago"].as_u64().unwrap() < PATIENCE.as_millis() as u64);
    // The body carries the milliseconds since the last beat, which go on growing (nothing
    // beats here): a probe after 9 or 99 ms is a digit longer than one before. So the HEAD's
    // length is checked against the GET answers before and after it, not one earlier GET.
    let length_before = r.body.len();
    let r = c.get("/anything");
    assert_eq!(
        (r.status, r.json()),
        (200, serde_json::json!({"status": "ok"}))
    );
    c.send(b"HEAD /anything HTTP/1.1\r\n\r\n");
    let r = c.reply_with_body(false);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("15"));
    // Nothing after the HEAD answer's head: the next answer parses cleanly.
    c.send(b"HEAD /health HTTP/1.1\r\n\r\n");
    let r = c.reply_with_body(false);
    assert_eq!(r.status, 200);
    let head_length: usize = r.header("content-length").unwrap().parse().unwrap();
    let r = c.get("/health?x=1");
    assert_eq!(r.status, 200);
    let length_after = r.body.len();
    assert!(
        (length_before..=length_after).contains(&head_length),
        "HEAD said {head_length}, GET sent {length_before} before and {length_after} after"
    );
    assert!(h.listener.try_recv().is_none());
    assert_eq!(h.woken.load(Ordering::SeqCst), 0);
}

#[test]
fn health_answers_503_stalled_when_the_main_loop_stops_beating() {
    let h = start(ListenerConfig {
        stale_after: Duration::from_millis(200),
        ..config()
    });
    let mut c = Client::connect(h.addr());
    assert_eq!(c.get("/health").status, 200);
    // The loop does not turn for longer than the bound.
    std::thread::sleep(Duration::from_millis(300));
    let r = c.get("/health");
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["status"], "stalled");
    assert!(r.json()["last_loop_ms_ago"].as_u64().unwrap() >= 300);
    assert!(!r.closes(), "a probe's answer: the connection goes on");
    // Other paths are not health checks.
    assert_eq!(c.get("/").status, 200);
    // It turns again.
    h.heartbeat.beat();
    let r = c.get("/health");
    assert_eq!((r.status, r.json()["status"].as_str()), (200, Some("ok")));
    // Asleep on its latch for a while (nothing due): not stalled while the sleep lasts.
    h.heartbeat.sleeping(PATIENCE);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(c.get("/health").status, 200);
    // Woken, then stuck in a turn.
    h.heartbeat.beat();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(c.get("/health").status, 503);
}

#[test]
fn a_malformed_or_oversized_head_is_refused_and_closed() {
    let h = start(config());
    let mut c = Client::connect(h.addr());
    c.send(b"GARBAGE\r\n\r\n");
    let r = c.reply();
    assert_eq!((r.status, r.closes()), (400, true));
    assert!(r.json()["error"].is_string());
    assert!(c.closed());

    let mut c = Client::connect(h.addr());
    c.send(
        format!(
            "POST /hook HTTP/1.1\r\nX-Big: {}\r\n\r\n",
            "a".repeat(20_000)
        )
        .as_bytes(),
    );
    let r = c.reply();
    assert_eq!((r.status, r.closes()), (431, true));
    assert!(c.closed());
}

#[test]
fn a_full_queue_answers_503_busy_at_once() {
    let h = start(ListenerConfig {
        queue_capacity: 1,
        ..config()
    });
    let first = spawn_request(h.addr(), post_request("/hook", "", "1"));
    h.wait_for_wake();
    // Nobody drains: the second finds the queue full.
    let mut c = Client::connect(h.addr());
    c.post("/hook", "", "2");
    let r = c.reply();
    assert_eq!(r.status, 503);
    assert_eq!(r.json(), serde_json::json!({"error": "busy"}));
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(!r.closes(), "the body was read: the connection can go on");
    assert_eq!(h.listener.stats().refused_full, 1);

    let d = h.next();
    assert_eq!(d.body, b"1");
    d.answer(Verdict::Applied);
    assert_eq!(first.recv_timeout(PATIENCE).unwrap().status, 200);
    assert!(h.listener.try_recv().is_none());
}

#[test]
fn no_verdict_in_time_answers_503_and_marks_the_delivery_abandoned() {
    let h = start(ListenerConfig {
        reply_timeout: Duration::from_millis(200),
        ..config()
    });
    let reply = spawn_request(h.addr(), post_request("/hook", "", "{}"));
    let d = h.next();
    let r = reply.recv_timeout(PATIENCE).unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(d.abandoned());
    d.answer(Verdict::Applied); // too late, and harmless
    assert_eq!(h.listener.stats().reply_timeouts, 1);
}

#[test]
fn a_delivery_dropped_unanswered_answers_503() {
    let h = start(config());
    let reply = spawn_request(h.addr(), post_request("/hook", "", "{}"));
    drop(h.next());
    let r = reply.recv_timeout(PATIENCE).unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(h.listener.stats().reply_timeouts, 0);
}

#[test]
fn only_when_every_slot_holds_an_authenticated_request_is_a_newcomer_refused_503() {
    let h = start(ListenerConfig {
        max_connections: 2,
        ..config()
    });
    // Two deliveries waiting for their verdicts: neither may be evicted.
    let mut c1 = Client::connect(h.addr());
    let mut c2 = Client::connect(h.addr());
    c1.post("/hook/1", "", "1");
    c2.post("/hook/2", "", "2");
    let (d1, d2) = (h.next(), h.next());
    let s = h.listener.stats();
    assert_eq!((s.open_connections, s.busy_connections), (2, 2));

    let mut c3 = Client::connect(h.addr());
    let r = c3.reply();
    assert_eq!((r.status, r.closes()), (503, true));
    assert_eq!(
        r.json(),
        serde_json::json!({"error": "too many connections"})
    );
    assert!(c3.closed());
    assert_eq!(h.listener.stats().refused_full, 1);

    d1.answer(Verdict::Applied);
    d2.answer(Verdict::Applied);
    assert_eq!(c1.reply().status, 200);
    assert_eq!(c2.reply().status, 200);
    // Kept alive and idle now: a newcomer takes the slot of the older one. (A connection
    // stands idle just after its answer is written, so the client can read the answer first:
    // wait for both, or the newcomer may find only c2 idle and put it out instead.)
    h.wait_until("both idle", |s| s.busy_connections == 0);
    let mut c4 = Client::connect(h.addr());
    assert_eq!(c4.get("/health").status, 200);
    assert!(c1.closed());
    assert_eq!(c2.get("/health").status, 200);
    let s = h.listener.stats();
    assert_eq!((s.evicted, s.open_connections, s.accepted), (1, 2, 4));
}

#[test]
fn slow_connections_filling_the_listener_make_room_for_a_real_delivery() {
    let h = start(config());
    let max = config().max_connections;
    // Every slot taken by a client trickling its head, a byte every 50 ms (each read well
    // within the read timeout, and the head deadline far away).
    let stop = Arc::new(AtomicBool::new(false));
    let mut slow = Vec::new();
    for _ in 0..max {
        let mut c = Client::connect(h.addr());
        c.send(b"POST /hook HTTP/1.1\r\nX-Pad: ");
        let mut writer = c.stream.try_clone().unwrap();
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) && writer.write_all(b"a").is_ok() {
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        slow.push(c);
    }
    h.wait_until("every slot taken", |s| s.open_connections == max);

    // A real delivery: it takes the oldest slow connection's slot, and gets through.
    let reply = spawn_request(h.addr(), post_request("/hook/real", "", "{}"));
    let d = h.next();
    assert_eq!(d.path, "/hook/real");
    d.answer(Verdict::Applied);
    assert_eq!(reply.recv_timeout(PATIENCE).unwrap().status, 200);
    let s = h.listener.stats();
    assert_eq!((s.evicted, s.refused_full), (1, 0));
    // The one put out is the oldest, and it was closed without an answer.
    assert!(slow[0].closed());
    assert!(slow[0].buf.is_empty());
    stop.store(true, Ordering::SeqCst);
}

#[test]
fn a_slow_or_idle_client_is_closed() {
    let h = start(ListenerConfig {
        read_timeout: Duration::from_millis(300),
        ..config()
    });
    // Half a head, then nothing: 408 after a read timeout, and closed.
    let mut slow = Client::connect(h.addr());
    slow.send(b"POST /hook HTTP/1.1\r\nHost: t\r\n");
    let r = slow.reply();
    assert_eq!((r.status, r.closes()), (408, true));
    assert!(slow.closed());

    // Idle after a request: closed without a word.
    let mut idle = Client::connect(h.addr());
    assert_eq!(idle.get("/health").status, 200);
    assert!(idle.closed());
    assert!(idle.buf.is_empty());
}

#[test]
fn a_client_trickling_its_head_is_cut_off_by_the_head_deadline() {
    let head_timeout = Duration::from_millis(500);
    let h = start(ListenerConfig {
        head_timeout,
        ..config()
    });
    // A byte of a header every 20 ms, each well within the read timeout (10 s): only the
    // head deadline, counted from the accept, ends it.
    let started = Instant::now();
    let mut trickle = Client::connect(h.addr());
    let mut writer = trickle.stream.try_clone().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let t = std::thread::spawn(move || {
        let _ = writer.write_all(b"POST /hook HTTP/1.1\r\nX-A: ");
        while !stop2.load(Ordering::SeqCst) {
            if writer.write_all(b"b").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let r = trickle.reply();
    stop.store(true, Ordering::SeqCst);
    t.join().unwrap();
    assert_eq!((r.status, r.closes()), (408, true));
    let took = started.elapsed();
    assert!(took >= head_timeout && took < PATIENCE, "{took:?}");

    // One that sends nothing at all is closed, silently, at the same deadline.
    let started = Instant::now();
    let mut mute = Client::connect(h.addr());
    assert!(mute.closed());
    assert!(mute.buf.is_empty());
    let took = started.elapsed();
    assert!(took >= head_timeout && took < PATIENCE, "{took:?}");
}

#[test]
fn a_body_that_does_not_arrive_in_time_is_408() {
    let body_timeout = Duration::from_millis(400);
    let h = start(ListenerConfig {
        body_timeout,
        ..config()
    });
    let mut c = Client::connect(h.addr());
    c.send(format!("POST /hook HTTP/1.1\r\n{WITH_SECRET}Content-Length: 100\r\n\r\n").as_bytes());
    let started = Instant::now();
    let mut writer = c.stream.try_clone().unwrap();
    let t = std::thread::spawn(move || {
        for _ in 0..100 {
            if writer.write_all(b"a").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let r = c.reply();
    assert_eq!((r.status, r.closes()), (408, true));
    let took = started.elapsed();
    assert!(
        took >= body_timeout && took < Duration::from_secs(2),
        "{took:?}"
    );
    t.join().unwrap();
    assert!(h.listener.try_recv().is_none());
}

#[test]
fn stop_is_quick_frees_the_port_and_fails_what_is_pending() {
    let h = start(config());
    let addr = h.addr();
    let mut idle = Client::connect(addr);
    assert_eq!(idle.get("/health").status, 200);
    let pending = spawn_request(addr, post_request("/hook", "", "{}"));
    h.wait_for_wake();

    let started = Instant::now();
    h.listener.stop();
    assert!(started.elapsed() < STOP_WAIT, "{:?}", started.elapsed());
    // The delivery still queued is dropped: 503, and the sender retries.
    assert_eq!(pending.recv_timeout(PATIENCE).unwrap().status, 503);
    // The port is free again.
    drop(TcpListener::bind(addr).expect("the port is released"));
    // A connection still open answers its next request 503 and closes.
    let r = idle.get("/health");
    assert_eq!((r.status, r.closes()), (503, true));
    assert!(idle.closed());
}

#[test]
fn dropping_an_idle_listener_is_quick_too() {
    let h = start(config());
    let addr = h.addr();
    let started = Instant::now();
    drop(h);
    assert!(started.elapsed() < STOP_WAIT);
    let refused = TcpStream::connect(addr).map(|_| ()).unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused);
}

#[test]
fn wake_is_called_once_per_delivery_on_a_listener_thread_with_signals_blocked() {
    let h = start(config());
    let clients: Vec<Receiver<Reply>> = (0..5)
        .map(|i| spawn_request(h.addr(), post_request(&format!("/hook/{i}"), "", "{}")))
        .collect();
    let mut paths = Vec::new();
    for _ in 0..5 {
        let d = h.next();
        paths.push(d.path.clone());
        d.answer(Verdict::Applied);
    }
    for c in clients {
        assert_eq!(c.recv_timeout(PATIENCE).unwrap().status, 200);
    }
    paths.sort();
    assert_eq!(
        paths,
        (0..5).map(|i| format!("/hook/{i}")).collect::<Vec<_>>()
    );
    assert_eq!(h.woken.load(Ordering::SeqCst), 5);
    let wakers = h.wakers.lock().unwrap().clone();
    assert_eq!(wakers.len(), 5);
    for (blocked, name) in wakers {
        assert!(blocked, "a connection thread without the signals blocked");
        assert_eq!(name.as_deref(), Some(LISTENER_THREAD_NAME));
    }
}

#[test]
fn the_accept_thread_has_the_postgres_signals_blocked() {
    let h = start(config());
    // Rust names a thread from inside it, just after it starts: wait for the name to show.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while listener_threads_seen() == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        listener_threads_seen() >= 1,
        "the accept thread of this test's listener"
    );
    drop(h);
}

/// Checks every evoq-listener thread of this process (other tests' too: all must block
/// Postgres' signals) and returns how many it saw.
fn listener_threads_seen() -> usize {
    let mut seen = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = task.unwrap().path();
        // A thread may end between the listing and the reads: skip it then.
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        if comm.trim_end() != LISTENER_THREAD_NAME {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(dir.join("status")) else {
            continue;
        };
        let mask = status
            .lines()
            .find_map(|l| l.strip_prefix("SigBlk:"))
            .map(|hex| u64::from_str_radix(hex.trim(), 16).unwrap())
            .unwrap();
        for s in PG_SIGNALS {
            assert!(
                mask & (1 << (s - 1)) != 0,
                "signal {s} not blocked: {mask:x}"
            );
        }
        seen += 1;
    }
    seen
}

#[test]
fn start_reports_what_it_cannot_do() {
    let h = start(config());
    let taken = ListenerConfig {
        address: h.addr().to_string(),
        ..config()
    };
    let err = Listener::start(taken, Arc::new(|| {}))
        .map(|_| ())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AddrInUse);
    let bad = ListenerConfig {
        address: "not an address".into(),
        ..config()
    };
    assert!(Listener::start(bad, Arc::new(|| {})).is_err());
    let zero = ListenerConfig {
        queue_capacity: 0,
        ..config()
    };
    let err = Listener::start(zero, Arc::new(|| {}))
        .map(|_| ())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
}
