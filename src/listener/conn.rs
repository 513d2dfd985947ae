//! The accept thread and the connection threads: from a socket to deliveries and back.

use super::http::{self, Framing, Head, Inbound, Refusal, Response, Timeouts};
use super::secrets::Check;
use super::slots::{Admission, Standing};
use super::{Delivery, Shared, Verdict, LISTENER_THREAD_NAME};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A connection's side of the listener, as a connection thread sees it.
type Conn<'a> = Inbound<&'a TcpStream>;

/// After an accept error that is not about one connection (out of descriptors...), how long
/// the accept thread pauses, so it does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

pub(super) fn accept_loop(socket: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = socket.accept();
        // Checked after accept returns: `stop` wakes this thread by connecting to it.
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        match accepted {
            Ok((stream, peer)) => {
                shared.accepted.fetch_add(1, Ordering::Relaxed);
                admit(stream, peer, &shared);
            }
            Err(e) => match e.kind() {
                // About that one connection (it went away before it was accepted).
                std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::Interrupted => {}
                _ => std::thread::sleep(ACCEPT_ERROR_PAUSE),
            },
        }
    }
}

/// One slot of `max_connections`, given back when the connection thread ends (also when it
/// panics).
struct Slot {
    shared: Arc<Shared>,
    id: u64,
}

impl Slot {
    /// Records where the connection stands; false if it was evicted meanwhile.
    fn stand(&self, standing: Standing) -> bool {
        self.shared.slots.stand(self.id, standing)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.shared.slots.release(self.id);
    }
}

/// What a connection thread owns. The field order is the drop order, and it matters: the
/// slot is given back before the socket is closed, so an eviction (which shuts the slot's
/// descriptor down) never reaches a descriptor that was closed and reused.
struct Connection {
    slot: Slot,
    stream: TcpStream,
}

/// Starts a thread for the connection, evicting an older one if every slot is taken, or
/// refuses it when every slot holds an authenticated request.
fn admit(stream: TcpStream, peer: SocketAddr, shared: &Arc<Shared>) {
    let accepted_at = Instant::now();
    // SAFETY: the descriptor is `stream`'s, which goes into a `Connection` with the slot and
    // is closed only after the slot is released (see `Connection`); if the slot is not
    // taken, nothing refers to the descriptor.
    let id = match unsafe { shared.slots.admit(stream.as_raw_fd()) } {
        Admission::Admitted { id, evicted } => {
            if evicted {
                shared.evicted.fetch_add(1, Ordering::Relaxed);
            }
            id
        }
        Admission::Full => {
            refuse(&stream, shared);
            return;
        }
    };
    let connection = Connection {
        slot: Slot {
            shared: shared.clone(),
            id,
        },
        stream,
    };
    // To answer on if no thread can be started (the closure, connection included, is dropped
    // then, giving the slot back).
    let spare = connection.stream.try_clone().ok();
    let started = crate::pool::spawn_with_signals_blocked(LISTENER_THREAD_NAME, move || {
        serve(&connection.stream, peer, accepted_at, &connection.slot);
    });
    if started.is_err() {
        if let Some(stream) = spare {
            refuse(&stream, shared);
        }
    }
}

/// 503 and close, on the accept thread: it must not wait on one client.
fn refuse(mut stream: &TcpStream, shared: &Shared) {
    shared.refused_full.fetch_add(1, Ordering::Relaxed);
    let response = Response {
        status: 503,
        body: error_body("too many connections"),
        keep_alive: false,
        idle_timeout: shared.config.read_timeout,
        head_only: false,
    };
    // A fresh socket's send buffer takes a small answer at once; the timeout is a backstop.
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    shared.count_answer(503);
    let _ = stream.write_all(&response.to_bytes());
    http::close_without_waiting(stream);
}

/// What to do after answering a request.
#[derive(PartialEq, Eq)]
enum Next {
    KeepAlive,
    Close,
}

/// Serves requests on one connection until it closes, fails, must close or is evicted.
fn serve(stream: &TcpStream, peer: SocketAddr, accepted_at: Instant, slot: &Slot) {
    let shared = &*slot.shared;
    let config = &shared.config;
    // Whole responses are written at once; Nagle would only delay them.
    let _ = stream.set_nodelay(true);
    if stream.set_write_timeout(Some(config.read_timeout)).is_err() {
        return;
    }
    let timeouts = Timeouts {
        read: config.read_timeout,
        head: config.head_timeout,
        body: config.body_timeout,
    };
    let mut conn = Inbound::new(stream, timeouts);
    // The first head is due within the head timeout of the accept, not of its first byte:
    // a connection that sends nothing holds its slot no longer than one that trickles.
    let mut since = Some(accepted_at);
    // No check of `stopping` before the next head: a request that arrives after the stop
    // gets its 503 from `handle`. A thread that had not yet come back here when the stop came
    // would close instead, and a keep-alive client's next request would go unanswered.
    loop {
        let next = match conn.read_head(crate::evolution::SECRET_HEADER, since.take()) {
            Ok(head) => {
                shared.requests.fetch_add(1, Ordering::Relaxed);
                handle(&mut conn, head, peer, slot)
            }
            Err(Refusal::Gone) => break,
            Err(refusal) => {
                answer_refusal(&mut conn, &refusal, shared);
                Next::Close
            }
        };
        if next == Next::Close {
            http::linger_close(conn.stream());
            break;
        }
    }
}

fn handle(conn: &mut Conn, head: Head, peer: SocketAddr, slot: &Slot) -> Next {
    let shared = &*slot.shared;
    let keep_alive = head.keep_alive;
    // A body this request leaves unread would be taken for the next request: close instead.
    let body_unread = head.framing.has_body();
    if shared.stopping.load(Ordering::SeqCst) {
        return send(
            conn,
            shared,
            503,
            error_body("the listener is stopping"),
            false,
            false,
        );
    }
    match head.method.as_str() {
        "GET" | "HEAD" => {
            let keep = keep_alive && !body_unread;
            let head_only = head.method == "HEAD";
            let (status, body) = match http::split_target(&head.target).0 {
                "/health" => health(shared),
                _ => (200, r#"{"status":"ok"}"#.to_string()),
            };
            send(conn, shared, status, body, keep, head_only)
        }
        "POST" => post(conn, head, peer, slot),
        _ => {
            let keep = keep_alive && !body_unread;
            send(
                conn,
                shared,
                405,
                error_body("only POST (deliveries) and GET (health)"),
                keep,
                false,
            )
        }
    }
}

/// `GET /health`: whether the main loop is turning, from its heartbeat.
fn health(shared: &Shared) -> (u16, String) {
    let (stalled, ago) = shared.config.heartbeat.stalled(shared.config.stale_after);
    let status = if stalled { "stalled" } else { "ok" };
    let body = serde_json::json!({ "status": status, "last_loop_ms_ago": ago }).to_string();
    (if stalled { 503 } else { 200 }, body)
}

/// A POST: its secret is checked first, on the head alone; only then is the body read and the
/// delivery handed to the main loop.
fn post(conn: &mut Conn, head: Head, peer: SocketAddr, slot: &Slot) -> Next {
    let shared = &*slot.shared;
    let (_, query) = http::split_target(&head.target);
    let secret = head
        .secret
        .clone()
        .or_else(|| query.and_then(|q| http::query_param(q, crate::evolution::SECRET_PARAM)));
    // The body is not read on these answers: they close (and the bounded linger discards at
    // most 256 KiB / 2 s of it, so the client reads the answer rather than a reset).
    match shared.config.secrets.check(secret.as_deref()) {
        Check::Accepted => {}
        Check::Unconfigured => {
            shared.unconfigured.fetch_add(1, Ordering::Relaxed);
            let body = error_body("evoq is not configured yet: no webhook secret is set");
            return send(conn, shared, 503, body, false, false);
        }
        Check::Refused { presented } => {
            shared.rejected.fetch_add(1, Ordering::Relaxed);
            shared.rejected_untaken.fetch_add(1, Ordering::Relaxed);
            let why = if presented {
                "webhook delivery refused: wrong webhook secret"
            } else {
                "webhook delivery refused: no webhook secret"
            };
            return send(conn, shared, 401, error_body(why), false, false);
        }
    }
    // Authenticated: from here until its answer is written, this connection is not evicted.
    if !slot.stand(Standing::Busy) {
        // Evicted between its head and now: its socket is shut down already.
        return Next::Close;
    }
    let next = authenticated_post(conn, head, secret, peer, shared);
    slot.stand(Standing::Idle);
    next
}

fn authenticated_post(
    conn: &mut Conn,
    head: Head,
    secret: Option<String>,
    peer: SocketAddr,
    shared: &Shared,
) -> Next {
    let config = &shared.config;
    match head.framing {
        Framing::Absent => {
            return answer_refusal(conn, &Refusal::LengthRequired, shared);
        }
        // Refused before a byte of body is read, and before the client is told to send it.
        Framing::Length(n) if n > config.max_body_bytes as u64 => {
            return answer_refusal(conn, &Refusal::BodyTooLarge, shared);
        }
        _ => {}
    }
    if head.expect_continue && http::send_continue(conn.stream()).is_err() {
        return Next::Close;
    }
    let body = match conn.read_body(head.framing, config.max_body_bytes) {
        Ok(body) => body,
        Err(Refusal::Gone) => return Next::Close,
        Err(refusal) => return answer_refusal(conn, &refusal, shared),
    };
    // The body is read: from here on the stream is at the next request.
    let keep_alive = head.keep_alive;
    let (path, _) = http::split_target(&head.target);
    let (reply, verdict) = mpsc::sync_channel(1);
    let abandoned = Arc::new(AtomicBool::new(false));
    let delivery = Delivery {
        body,
        secret,
        path: path.to_string(),
        peer,
        reply,
        abandoned: abandoned.clone(),
    };
    match shared.queue.try_send(delivery) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            shared.refused_full.fetch_add(1, Ordering::Relaxed);
            return send(conn, shared, 503, error_body("busy"), keep_alive, false);
        }
        Err(TrySendError::Disconnected(_)) => {
            return send(
                conn,
                shared,
                503,
                error_body("the listener is stopping"),
                false,
                false,
            );
        }
    }
    shared.deliveries.fetch_add(1, Ordering::Relaxed);
    // The caller's function; a panic in it must not take the answer down with it.
    let wake = shared.wake.clone();
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| wake()));
    match verdict.recv_timeout(config.reply_timeout) {
        Ok(v) => {
            let (status, body) = verdict_answer(&v);
            send(conn, shared, status, body, keep_alive, false)
        }
        Err(RecvTimeoutError::Timeout) => {
            abandoned.store(true, Ordering::SeqCst);
            shared.reply_timeouts.fetch_add(1, Ordering::Relaxed);
            let body = error_body("no answer from the database in time");
            send(conn, shared, 503, body, keep_alive, false)
        }
        Err(RecvTimeoutError::Disconnected) => {
            let body = error_body("the delivery was not processed");
            send(conn, shared, 503, body, keep_alive, false)
        }
    }
}

fn verdict_answer(verdict: &Verdict) -> (u16, String) {
    let body = match verdict {
        Verdict::Applied => r#"{"status":"applied"}"#.to_string(),
        Verdict::Ignored => r#"{"status":"ignored"}"#.to_string(),
        Verdict::Rejected(reason) | Verdict::Invalid(reason) | Verdict::Failed(reason) => {
            error_body(reason)
        }
    };
    (verdict.status(), body)
}

/// The answer to a request that could not be read; it always closes the connection.
fn answer_refusal(conn: &mut Conn, refusal: &Refusal, shared: &Shared) -> Next {
    let (status, message) = match refusal {
        Refusal::Gone => return Next::Close,
        Refusal::TimedOut => (408, "the request did not arrive in time"),
        Refusal::HeadTooLarge => (431, "the request head is too large"),
        Refusal::BodyTooLarge => (413, "the body is too large"),
        Refusal::LengthRequired => (411, "a POST needs Content-Length or chunked encoding"),
        Refusal::NotImplemented(why) => (501, *why),
        Refusal::Malformed(why) => (400, *why),
    };
    send(conn, shared, status, error_body(message), false, false);
    Next::Close
}

fn send(
    conn: &mut Conn,
    shared: &Shared,
    status: u16,
    body: String,
    keep_alive: bool,
    head_only: bool,
) -> Next {
    let response = Response {
        status,
        body,
        keep_alive,
        idle_timeout: shared.config.read_timeout,
        head_only,
    };
    // Counted before the write, so a client that has read the answer sees it counted.
    shared.count_answer(status);
    let stream = conn.stream();
    if stream.write_all(&response.to_bytes()).is_err() || stream.flush().is_err() {
        return Next::Close;
    }
    if keep_alive {
        Next::KeepAlive
    } else {
        Next::Close
    }
}

fn error_body(message: &str) -> String {
    serde_json::json!({ "error": message }).to_string()
}
