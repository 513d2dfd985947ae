//! The webhook listener: a small HTTP/1.1 server, run inside a background worker, that
//! receives the deliveries an Evolution API server POSTs and hands each one to the worker's
//! main thread. Pure Rust, no pgrx.
//!
//! # Design
//!
//! - **The threads never touch Postgres.** Postgres is single-threaded: only the worker's
//!   main thread may use SPI, palloc, elog or latches' shared state. The listener's threads
//!   parse HTTP and nothing else; each delivery goes through a bounded queue
//!   ([`Listener::try_recv`]) to the main thread, which decides and commits. Every thread is
//!   started by [`crate::pool::spawn_with_signals_blocked`], so Postgres' signal handlers only
//!   ever run on the main thread, and is named `evoq-listener`.
//! - **The answer waits for the commit.** A connection thread holds the HTTP request open
//!   until the main thread gives its [`Verdict`] through [`Delivery::answer`], which it does
//!   after its transaction committed. The Evolution server retries a delivery that did not get
//!   a 2xx, so answering 200 first and committing later could lose a delivery (a crash or a
//!   failed transaction in between); answering after the commit means a delivery is either
//!   applied or retried. The price is duplicates: a verdict that comes after the client gave
//!   up, or after the listener's `reply_timeout`, leaves the client with an error (or a 503)
//!   for a delivery that was applied, and the retry applies it again. Applying a delivery must
//!   therefore be idempotent (evoq's is: a delivery older than the state it would change is
//!   ignored).
//! - **Any path.** With "webhook by events" the Evolution server appends the event name to the
//!   URL (`/hook/qrcode-updated`), so every POST, whatever its path, is a delivery; the path
//!   is passed on ([`Delivery::path`], without the query, which may hold the secret) for logs.
//! - **A sender without the secret costs a head.** The listener knows the accepted secrets
//!   ([`Secrets`], kept current by the main thread: the current one, and the previous one
//!   while a rotation is in progress). A POST's secret (the `x-evoq-secret` header, else the
//!   `evoq_secret` query parameter that v1.8 servers send, which send no custom header) is
//!   compared, in constant time, with each of them as soon as the head is read: before the
//!   body is read, before `100 Continue`, and without the main thread. A refusal is counted
//!   ([`Listener::take_rejected`], which the main loop adds to evoq's counter). The main
//!   thread checks the secret again (defence in depth): a [`Delivery`] carries what the
//!   request had.
//! - **Room for real deliveries.** Anyone can open connections, and until its head is read a
//!   connection may be anyone's. So the head must arrive within `head_timeout` of the accept,
//!   and when every slot is taken a newcomer evicts the oldest connection that is not in an
//!   authenticated request (see Limits) instead of being refused: slow or idle connections
//!   cannot keep a real delivery out.
//! - **Health tells of the main loop.** `GET /health` is answered by the listener's threads,
//!   so it reports the main loop's [`Heartbeat`]: a stuck loop (a long lock wait) answers 503
//!   `stalled`, not a reassuring 200.
//!
//! # Answers, and what the Evolution server does with them
//!
//! | answer | when | the sender |
//! |---|---|---|
//! | 200 `{"status":"applied"}` / `{"status":"ignored"}` | committed ([`Verdict::Applied`], [`Verdict::Ignored`]) | done |
//! | 401 `{"error":...}`, `Connection: close` | a POST whose secret matches none of [`Secrets`], or has none: at once, on the head alone (the body is never read), never queued; counted by [`Listener::take_rejected`] | gives up (v2 does not retry a 401); never applied |
//! | 401 `{"error":...}` | [`Verdict::Rejected`]: the main thread's own check refused it | same |
//! | 503 `{"error":...}`, `Retry-After: 1`, `Connection: close` | a POST while no secret is set (evoq not configured yet): on the head alone, never queued | retries later |
//! | 400 `{"error":...}` | [`Verdict::Invalid`]; a malformed request head or chunked body | gives up |
//! | 503 `{"error":...}`, `Retry-After: 1` | [`Verdict::Failed`]; queue full (`busy`); no verdict within `reply_timeout`; delivery dropped unanswered; every connection slot held by an authenticated request (`too many connections`); listener stopping | retries later |
//! | 413 | body over `max_body_bytes` (secret accepted) | gives up: it will never fit |
//! | 411 / 501 | POST (secret accepted) without Content-Length or chunked; a transfer coding other than chunked | client bug |
//! | 405 | neither GET, HEAD nor POST | client bug |
//! | 408 | a head not complete within `head_timeout`, or a body within `body_timeout`, or a read waiting `read_timeout` mid-request | retries |
//! | 431 | head over 16 KiB or over 64 headers | client bug |
//! | 200 `{"status":"ok","last_loop_ms_ago":N}` | `GET /health` (or HEAD), the main loop's last beat younger than `stale_after` (plus the sleep it announced) | a probe |
//! | 503 `{"status":"stalled","last_loop_ms_ago":N}` | `GET /health`, the main loop late | a probe |
//! | 200 `{"status":"ok"}` | any other GET (or HEAD); the main loop is not involved | a probe |
//!
//! Secret or not, the head is parsed first: a malformed one gets its 400 (or 431) before the
//! secret is looked at. Every 2xx and every answer after a fully read request keeps the
//! connection alive (HTTP/1.1 default, or HTTP/1.0 with `Connection: keep-alive`) unless the
//! client asked to close; answers that leave the stream unsynchronised (a body not read: 401
//! and 503 on the head alone, 413 by Content-Length, 411, a GET with a body; a bad head or
//! chunk) say `Connection: close` and close. Before closing after an answer, the listener
//! reads and discards what the client still sends (at most 256 KiB and 2 s), so the close
//! does not become a TCP reset that destroys the answer.
//!
//! # Limits
//!
//! - connections: at most `max_connections` hold a slot, one thread each. Each slot's
//!   connection is a *stranger* (no head with an accepted secret yet: a probe, a forger, a
//!   slow client, or a real sender whose head is still arriving), *idle* (kept alive
//!   between requests, after an authenticated one) or *busy* (in an authenticated request:
//!   its body, its verdict, its answer). When every slot is taken, the accept thread shuts
//!   down the oldest stranger, else the oldest idle connection, and gives its slot to the
//!   newcomer; a busy one is never evicted. Only when every slot is busy is the newcomer
//!   answered 503 and closed by the accept thread itself (it only discards what has already
//!   arrived; if the request arrives later, the client may see a reset instead of the 503:
//!   either way it retries). Nothing waits for a free slot, so nothing piles up. The oldest
//!   stranger goes first, so a real sender is put out only if `max_connections` newer
//!   connections arrive before its head does (milliseconds, for an Evolution server).
//! - queue: `queue_capacity` deliveries waiting for the main loop; full: 503 `busy` at once.
//!   Every queued delivery belongs to a connection waiting for its verdict, so the queue holds
//!   no memory that the connection limit does not already bound. Only authenticated POSTs
//!   are queued.
//! - time: a connection's first head must be complete within `head_timeout` of the accept
//!   (5 s by default; a later one on a kept-alive connection, within `head_timeout` of its
//!   first byte), else 408 (or a silent close if nothing came); a body within
//!   `body_timeout` of the end of its head (10 s), else 408. Each read waits at most
//!   `read_timeout` (10 s; an idle keep-alive connection is closed after it, silently), and
//!   so does each write. A verdict is awaited `reply_timeout`. So a sender without the
//!   secret holds a connection at most `head_timeout`, plus the 2 s discard after its 401,
//!   per POST, and is evictable all along; it costs no body read, no JSON parse and no
//!   main-loop work.
//! - size: head 16 KiB and 64 headers; body `max_body_bytes`, by Content-Length (checked
//!   before reading a byte of body, and before `100 Continue` is sent) or chunked (checked as
//!   each chunk size is read). Chunk-size lines 1 KiB, trailers 16 KiB (ignored).
//!
//! Memory per open connection: a thread (the default Rust stack, 2 MiB of address space of
//! which a few tens of KiB are touched: reads go through an 8 KiB buffer on it), a read buffer
//! of at most 16 KiB + 8 KiB (a head and what came with it), and, for an authenticated
//! request only, the body, which grows as it arrives, up to exactly `max_body_bytes`. So at
//! most about `max_connections` × (`max_body_bytes` + 24 KiB) of heap, plus the stacks'
//! touched pages; connections without the secret never get past the 24 KiB. An evicted
//! connection's thread no longer holds a slot and ends at once (whatever it is blocked in is
//! a read or a write on its socket, which is shut down), so threads exceed
//! `max_connections` only by those few winding down. Besides: a slot entry (16 bytes) per
//! connection, and the accepted secrets, as many as the main thread sets (two at most
//! today); each POST compares its secret with every one of them.
//!
//! # Stopping
//!
//! [`Listener::stop`] (or dropping the listener) stops accepting, wakes the accept thread by
//! connecting to the listener's own address (an idle listener uses no CPU: accept blocks) and
//! waits at most 2 s for it to close the listening socket, so the port is free when `stop`
//! returns. Deliveries still queued are dropped, so their requests get 503 and are retried.
//! Connection threads are not waited for: each ends on its own, within a read timeout (idle)
//! or a reply timeout (waiting for a verdict), and answers 503 to any request that arrives
//! after the stop.

mod conn;
mod heartbeat;
mod http;
mod secrets;
mod slots;
#[cfg(test)]
mod tests;

pub use heartbeat::Heartbeat;
pub use secrets::Secrets;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;
use std::time::Duration;

/// The name of every thread the listener starts, as `ps -L` and debuggers show it.
pub const LISTENER_THREAD_NAME: &str = "evoq-listener";

/// How long `stop` waits for the accept thread to close the listening socket.
const STOP_WAIT: Duration = Duration::from_secs(2);

/// How the listener listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    /// Where to listen, `host:port` (`127.0.0.1:8787`, `0.0.0.0:8787`, `[::1]:8787`); port 0
    /// picks a free one (see [`Listener::local_addr`]).
    pub address: String,
    /// The largest body accepted; beyond it: 413. The worker passes
    /// [`crate::evolution::MAX_DELIVERY_BYTES`].
    pub max_body_bytes: usize,
    /// Connections served at once (one thread each). When all are open, a newcomer takes the
    /// slot of the oldest one not in an authenticated request; if every one is, it gets 503.
    pub max_connections: usize,
    /// Deliveries waiting for the main loop; when full: 503 `busy` at once.
    pub queue_capacity: usize,
    /// How long a request waits for the main loop's verdict; then 503 (the sender retries).
    pub reply_timeout: Duration,
    /// How long one read (or write) may wait; an idle keep-alive connection is closed after it.
    pub read_timeout: Duration,
    /// How long a request head may take to arrive in full: from the accept for a connection's
    /// first request, from the first byte for later ones; then 408 (or a silent close if
    /// nothing came). The slowloris bound: the secret is in the head, so until it is read
    /// anyone can hold the connection, and only this long.
    pub head_timeout: Duration,
    /// How long a body (authenticated: its head carried an accepted secret) may take to
    /// arrive in full, from the end of its head; then 408.
    pub body_timeout: Duration,
    /// The secrets a POST must carry (`x-evoq-secret` header, or `evoq_secret` query
    /// parameter); checked as soon as the head is read. The main thread keeps it current.
    pub secrets: Secrets,
    /// The main loop's heartbeat, reported by `GET /health`.
    pub heartbeat: Heartbeat,
    /// `GET /health` answers 503 "stalled" when the heartbeat is older than this (plus the
    /// sleep the loop announced, see [`Heartbeat::sleeping`]).
    pub stale_after: Duration,
}

impl ListenerConfig {
    /// A configuration with moderate limits: a 1 MiB body, 64 connections, 64 queued
    /// deliveries, 10 s to reply, 10 s per read, 5 s for a head, 10 s for a body, stalled
    /// after 10 s; no secret yet (POSTs get 503 until [`Secrets::set`]) and a new heartbeat.
    pub fn new(address: impl Into<String>) -> ListenerConfig {
        ListenerConfig {
            address: address.into(),
            max_body_bytes: crate::evolution::MAX_DELIVERY_BYTES,
            max_connections: 64,
            queue_capacity: 64,
            reply_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(10),
            // An Evolution server writes its head (well under 1 KiB) in one go: it arrives in
            // milliseconds, even across the internet. 5 s is room for a congested link, and
            // all that a client without the secret can hold a slot for.
            head_timeout: Duration::from_secs(5),
            // 1 MiB (the largest delivery) in 10 s is 100 KiB/s; real deliveries are 10-30 KB
            // and arrive with their head. Only senders with the secret get this far.
            body_timeout: Duration::from_secs(10),
            secrets: Secrets::new(),
            heartbeat: Heartbeat::new(),
            // The same as the reply timeout: a loop that has not turned for that long would
            // leave a delivery arriving now unanswered (503) anyway. A turn takes milliseconds;
            // one statement waits at most the worker's lock_timeout (2 s).
            stale_after: Duration::from_secs(10),
        }
    }

    fn check(&self) -> std::io::Result<()> {
        let invalid = |what: &str| {
            Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("the webhook listener's {what} must be above zero"),
            ))
        };
        if self.max_body_bytes == 0 {
            return invalid("body size limit");
        }
        if self.max_connections == 0 {
            return invalid("connection limit");
        }
        // A capacity of 0 would be a rendezvous channel, which `try_send` never gets through
        // while the main loop only polls.
        if self.queue_capacity == 0 {
            return invalid("queue capacity");
        }
        if self.reply_timeout.is_zero() {
            return invalid("reply timeout");
        }
        // A zero socket timeout is an error for the socket API.
        if self.read_timeout.is_zero() {
            return invalid("read timeout");
        }
        if self.head_timeout.is_zero() {
            return invalid("head timeout");
        }
        if self.body_timeout.is_zero() {
            return invalid("body timeout");
        }
        if self.stale_after.is_zero() {
            return invalid("stale bound");
        }
        Ok(())
    }
}

/// What the main thread decided about a delivery; the HTTP answer follows from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Committed: 200 `{"status":"applied"}`.
    Applied,
    /// Nothing to do (an event evoq does not consume, an instance it does not know, a stale
    /// delivery), and that is final: 200 `{"status":"ignored"}`.
    Ignored,
    /// The secret is missing or wrong: 401 `{"error": reason}`.
    Rejected(String),
    /// Not a delivery (not JSON, no event...): 400 `{"error": reason}`.
    Invalid(String),
    /// Could not be applied now (the transaction failed, the database is shutting down): 503
    /// `{"error": reason}`, so the sender tries again.
    Failed(String),
}

impl Verdict {
    /// The HTTP status this verdict is answered with.
    pub fn status(&self) -> u16 {
        match self {
            Verdict::Applied | Verdict::Ignored => 200,
            Verdict::Rejected(_) => 401,
            Verdict::Invalid(_) => 400,
            Verdict::Failed(_) => 503,
        }
    }
}

/// One POST, read in full, waiting for the main thread's verdict.
pub struct Delivery {
    /// The request body, as sent (at most `max_body_bytes`).
    pub body: Vec<u8>,
    /// The `x-evoq-secret` header, else the percent-decoded `evoq_secret` query parameter;
    /// an empty value counts as none. The listener accepted it (it matched one of
    /// [`Secrets`] when the head was read); the main thread checks it again.
    pub secret: Option<String>,
    /// The request path without the query (`/hook/qrcode-updated`), as sent.
    pub path: String,
    /// Who sent it.
    pub peer: SocketAddr,
    reply: SyncSender<Verdict>,
    abandoned: Arc<AtomicBool>,
}

impl Delivery {
    /// Answers the request. Call it after the transaction that applied the delivery committed.
    /// Dropping a delivery without answering it answers 503.
    pub fn answer(self, verdict: Verdict) {
        // Fails only when the request no longer waits (reply timeout, listener stopped):
        // nobody left to tell.
        let _ = self.reply.try_send(verdict);
    }

    /// Whether the request already gave up waiting (its `reply_timeout` passed, and it was
    /// answered 503): the sender will retry, so the main loop may skip this one. Applying it
    /// anyway is harmless when applying is idempotent, which it must be (see the module docs).
    pub fn abandoned(&self) -> bool {
        self.abandoned.load(Ordering::SeqCst)
    }
}

/// The secret stays out of logs.
impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("body_bytes", &self.body.len())
            .field(
                "secret",
                &self.secret.as_ref().map(|_| crate::evolution::REDACTED),
            )
            .field("path", &self.path)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

/// Counters since the listener started, for logs and status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListenerStats {
    /// Connections accepted, refused ones included.
    pub accepted: u64,
    /// Requests whose head was read.
    pub requests: u64,
    /// Deliveries put on the queue for the main loop.
    pub deliveries: u64,
    /// Final answers sent, by class (counted as they are written; `100 Continue` is not one).
    pub answered_2xx: u64,
    pub answered_4xx: u64,
    pub answered_5xx: u64,
    /// 503s because the queue was full or `max_connections` authenticated requests were open.
    pub refused_full: u64,
    /// Connections shut down to make room for a newcomer (see `max_connections`).
    pub evicted: u64,
    /// POSTs answered 401 by the listener (wrong or missing secret), since the start; not
    /// reset by [`Listener::take_rejected`].
    pub rejected: u64,
    /// POSTs answered 503 because no secret was set yet.
    pub unconfigured: u64,
    /// 503s because no verdict came within `reply_timeout`.
    pub reply_timeouts: u64,
    /// Connections open now.
    pub open_connections: usize,
    /// Of those, the ones in the middle of an authenticated request (never evicted); the
    /// rest are strangers or idle keep-alives a newcomer may put out.
    pub busy_connections: usize,
}

/// What the accept thread, the connection threads and the `Listener` share.
struct Shared {
    config: ListenerConfig,
    stopping: AtomicBool,
    queue: SyncSender<Delivery>,
    wake: Arc<dyn Fn() + Send + Sync>,
    slots: slots::Slots,
    /// 401s not yet taken by [`Listener::take_rejected`].
    rejected_untaken: AtomicU64,
    rejected: AtomicU64,
    evicted: AtomicU64,
    unconfigured: AtomicU64,
    accepted: AtomicU64,
    requests: AtomicU64,
    deliveries: AtomicU64,
    answered_2xx: AtomicU64,
    answered_4xx: AtomicU64,
    answered_5xx: AtomicU64,
    refused_full: AtomicU64,
    reply_timeouts: AtomicU64,
}

impl Shared {
    fn count_answer(&self, status: u16) {
        let counter = match status {
            200..=299 => &self.answered_2xx,
            400..=499 => &self.answered_4xx,
            500..=599 => &self.answered_5xx,
            _ => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A running listener. Dropping it stops it, like [`Listener::stop`].
pub struct Listener {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    deliveries: Receiver<Delivery>,
    /// A second handle on the listening socket, to shut it down if connecting to it (to wake
    /// the accept thread) fails.
    socket: TcpListener,
    /// Disconnected when the accept thread has ended (it holds the sender and never sends).
    accept_ended: Receiver<()>,
}

impl Listener {
    /// Binds `config.address` now, so a bad address or a port in use is an error the caller can
    /// report, then starts the accept thread. `wake` is called (on a connection thread) after
    /// each delivery is queued; it should make the main thread look at [`Listener::try_recv`].
    pub fn start(
        config: ListenerConfig,
        wake: Arc<dyn Fn() + Send + Sync>,
    ) -> std::io::Result<Listener> {
        config.check()?;
        let socket = TcpListener::bind(&config.address)?;
        let local_addr = socket.local_addr()?;
        let accept_socket = socket.try_clone()?;
        let (queue, deliveries) = mpsc::sync_channel(config.queue_capacity);
        let max_connections = config.max_connections;
        let shared = Arc::new(Shared {
            config,
            stopping: AtomicBool::new(false),
            queue,
            wake,
            slots: slots::Slots::new(max_connections),
            rejected_untaken: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            unconfigured: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            deliveries: AtomicU64::new(0),
            answered_2xx: AtomicU64::new(0),
            answered_4xx: AtomicU64::new(0),
            answered_5xx: AtomicU64::new(0),
            refused_full: AtomicU64::new(0),
            reply_timeouts: AtomicU64::new(0),
        });
        let (ended_tx, accept_ended) = mpsc::channel::<()>();
        let for_thread = shared.clone();
        crate::pool::spawn_with_signals_blocked(LISTENER_THREAD_NAME, move || {
            let _ended = ended_tx;
            conn::accept_loop(accept_socket, for_thread);
        })?;
        Ok(Listener {
            local_addr,
            shared,
            deliveries,
            socket,
            accept_ended,
        })
    }

    /// The address actually bound (the port, when the configuration asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The next delivery waiting, without blocking. The main loop drains this after each wake.
    pub fn try_recv(&self) -> Option<Delivery> {
        self.deliveries.try_recv().ok()
    }

    pub fn stats(&self) -> ListenerStats {
        let s = &self.shared;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ListenerStats {
            accepted: get(&s.accepted),
            requests: get(&s.requests),
            deliveries: get(&s.deliveries),
            answered_2xx: get(&s.answered_2xx),
            answered_4xx: get(&s.answered_4xx),
            answered_5xx: get(&s.answered_5xx),
            refused_full: get(&s.refused_full),
            reply_timeouts: get(&s.reply_timeouts),
            evicted: get(&s.evicted),
            rejected: get(&s.rejected),
            unconfigured: get(&s.unconfigured),
            open_connections: s.slots.open(),
            busy_connections: s.slots.busy(),
        }
    }

    /// The POSTs the listener answered 401 (wrong or missing secret) since the last call, and
    /// resets that count: the main loop adds them to evoq's `webhooks_rejected` counter. They
    /// never reach [`Listener::try_recv`].
    pub fn take_rejected(&self) -> u64 {
        self.shared.rejected_untaken.swap(0, Ordering::Relaxed)
    }

    /// Stops accepting and releases the port (waiting at most 2 s for that); queued
    /// deliveries are answered 503. See the module docs.
    pub fn stop(self) {
        // Drop does it.
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wake the accept thread, blocked in accept: it sees the flag and closes its socket.
        let target = match self.local_addr {
            SocketAddr::V4(a) if a.ip().is_unspecified() => {
                SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, a.port()))
            }
            SocketAddr::V6(a) if a.ip().is_unspecified() => {
                SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port()))
            }
            a => a,
        };
        if TcpStream::connect_timeout(&target, Duration::from_secs(1)).is_err() {
            // Unreachable from here (a firewall?): shutting the listening socket down makes a
            // blocked accept fail at once on Linux.
            use std::os::fd::AsRawFd;
            // SAFETY: shutdown on a descriptor this struct owns; no memory is involved.
            unsafe { libc::shutdown(self.socket.as_raw_fd(), libc::SHUT_RDWR) };
        }
        // Bounded: whatever happens, the caller goes on after STOP_WAIT.
        let _ = self.accept_ended.recv_timeout(STOP_WAIT);
        // `deliveries` drops after this: queued deliveries are dropped, their requests get 503.
    }
}
