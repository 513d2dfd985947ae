//! The worker's probes, off its main loop: the circuit breaker's health probe and the version
//! probe (`GET /`) run on a thread of their own, and the main loop keeps applying webhook
//! deliveries meanwhile. 0.4.0 made them on the main thread: against a busy real 2.3.6 server
//! `GET /` took 23-33 s, and during that time no delivery got a verdict (the listener answered
//! 503, and a v1.8 server, which tries once, lost them) and SIGTERM waited as long.
//!
//! No pgrx here: the thread makes one HTTP call and hands the outcome back through a channel,
//! then wakes the main thread the way the pool's threads do.

use crate::evolution::{ApiError, ApiVersion, Client};
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::Arc;

/// What was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    /// `GET /instance/fetchInstances?instanceName=<none>`: is the server up, is the key right.
    Health,
    /// `GET /`: which dialect the server speaks.
    Version,
}

/// What a probe found.
#[derive(Debug, Clone)]
pub enum Outcome {
    Health(Result<(), ApiError>),
    Version(Result<ApiVersion, ApiError>),
}

/// A probe in flight.
pub struct Probe {
    pub kind: ProbeKind,
    rx: Receiver<Outcome>,
}

impl Probe {
    /// Starts the probe on a thread with every signal blocked; `notify` wakes the main thread
    /// when the answer is there. A thread that cannot be started answers at once, as a failure.
    pub fn start(kind: ProbeKind, client: Client, notify: Arc<dyn Fn() + Send + Sync>) -> Probe {
        let (tx, rx) = mpsc::channel();
        let spawned = crate::pool::spawn_with_signals_blocked("evoq-probe", move || {
            let outcome = match kind {
                ProbeKind::Health => Outcome::Health(client.probe_health()),
                ProbeKind::Version => Outcome::Version(client.probe_version()),
            };
            let _ = tx.send(outcome);
            notify();
        });
        // A thread that could not start took the channel's sender with it: `try_take` then
        // reports the probe as failed. A started one runs detached and ends after its call.
        drop(spawned);
        Probe { kind, rx }
    }

    fn failed_to_start(kind: ProbeKind, e: &std::io::Error) -> Outcome {
        let err = ApiError::transient(format!("could not start a probe thread: {e}"));
        match kind {
            ProbeKind::Health => Outcome::Health(Err(err)),
            ProbeKind::Version => Outcome::Version(Err(err)),
        }
    }

    /// The outcome, once there (never blocks).
    pub fn try_take(&self) -> Option<Outcome> {
        match self.rx.try_recv() {
            Ok(outcome) => Some(outcome),
            Err(TryRecvError::Empty) => None,
            // The thread is gone without an answer (it could not start, or panicked).
            Err(TryRecvError::Disconnected) => Some(Probe::failed_to_start(
                self.kind,
                &std::io::Error::other("the probe thread ended without an answer"),
            )),
        }
    }
}

/// The probes' findings, kept until a cycle has used them: a cycle may need both (an open
/// circuit due for its probe, and a version nobody knows yet), one after the other.
#[derive(Debug, Default, Clone)]
pub struct Findings {
    pub health: Option<Result<(), ApiError>>,
    pub version: Option<Result<ApiVersion, ApiError>>,
}

impl Findings {
    pub fn take(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Health(r) => self.health = Some(r),
            Outcome::Version(r) => self.version = Some(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evolution::ClientConfig;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    fn client(url: &str) -> Client {
        Client::new(ClientConfig {
            base_url: url.into(),
            api_key: "k".into(),
            request_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            max_idle: 1,
            other_secrets: vec![],
        })
    }

    /// A server that accepts and never answers: the probe must not hold up its caller, and
    /// its answer (a timeout) arrives later with a wake.
    #[test]
    fn a_probe_never_blocks_its_caller_and_wakes_it_when_done() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let woken = Arc::new(AtomicUsize::new(0));
        let w = woken.clone();
        let started = Instant::now();
        let probe = Probe::start(
            ProbeKind::Health,
            client(&url),
            Arc::new(move || {
                w.fetch_add(1, Ordering::SeqCst);
            }),
        );
        assert!(started.elapsed() < Duration::from_millis(100));
        assert!(probe.try_take().is_none());
        let outcome = loop {
            if let Some(o) = probe.try_take() {
                break o;
            }
            assert!(started.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(matches!(outcome, Outcome::Health(Err(ref e)) if e.server_wide));
        assert_eq!(woken.load(Ordering::SeqCst), 1);
        drop(listener);
    }
}
