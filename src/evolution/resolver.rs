//! Name lookups for the HTTP calls, on the thread that makes the call, and once per client for
//! every call made within `LOOKUP_REUSE`.
//!
//! ureq's `DefaultResolver` starts a thread for every call (even to an IP literal, even on a
//! kept-alive connection: ureq resolves before it looks in its pool) so that it can give up on
//! a lookup at the call's timeout. That thread counts against no bound (not evoq's
//! `pool::MAX_LIVE_THREADS`), takes a default 2 MiB stack, and outlives a lookup that timed out;
//! each lookup also opens descriptors (`/etc/hosts`, a socket to the name server) that nobody
//! budgets. Here:
//! - an IP literal needs no lookup at all;
//! - a host name is looked up on the calling (pool) thread, which is counted, and one lookup at
//!   a time per client: the calls behind it wait for its answer and share it, so a burst of a
//!   thousand calls asks the name server once, and the lookup's descriptors are a constant,
//!   not one set per call in flight (see `fd_budget::RESERVED`).
//!
//! What this gives up: a lookup is not cut short at the call's timeout. A name server that does
//! not answer holds the calls for the C library's resolver timeout (resolv.conf's `timeout` ×
//! `attempts`, 10 s per server by default); the SQL jobs still return at their deadline (the
//! pool abandons what is in flight), and the thread ends when the lookup does.

use std::collections::HashMap;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};
use ureq::config::Config;
use ureq::http::Uri;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::NextTimeout;
use ureq::Error;

/// How long a lookup's answer (or failure) serves the calls after it. Short, so a server that
/// moved (a container restarted with a new address) is found again within seconds; long
/// enough that a burst asks once.
pub const LOOKUP_REUSE: Duration = Duration::from_secs(5);

/// A lookup's answer: the addresses, or None if the name did not resolve.
struct Answer {
    addrs: Option<Vec<SocketAddr>>,
    at: Instant,
}

#[derive(Default)]
pub struct InlineResolver {
    /// `host:port` → its last answer. The lock is held during a lookup: that is what makes the
    /// calls behind it wait for it rather than each asking again.
    answers: Mutex<HashMap<String, Answer>>,
    /// Lookups made (not answered from `answers`), for the tests.
    #[cfg(test)]
    pub lookups: std::sync::atomic::AtomicUsize,
}

impl fmt::Debug for InlineResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InlineResolver").finish()
    }
}

impl InlineResolver {
    /// The addresses of `host_port` (`name:port`, `1.2.3.4:port` or `[::1]:port`); None if it
    /// does not resolve.
    fn addresses(&self, host_port: &str) -> Option<Vec<SocketAddr>> {
        if let Ok(literal) = host_port.parse::<SocketAddr>() {
            return Some(vec![literal]);
        }
        let mut answers = self.answers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(answer) = answers.get(host_port) {
            if answer.at.elapsed() < LOOKUP_REUSE {
                return answer.addrs.clone();
            }
        }
        #[cfg(test)]
        self.lookups
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let addrs = host_port
            .to_socket_addrs()
            .ok()
            .map(Iterator::collect::<Vec<_>>)
            .filter(|a| !a.is_empty());
        answers.insert(
            host_port.to_string(),
            Answer {
                addrs: addrs.clone(),
                at: Instant::now(),
            },
        );
        addrs
    }
}

impl Resolver for InlineResolver {
    fn resolve(
        &self,
        uri: &Uri,
        config: &Config,
        _timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, Error> {
        let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
            return Err(Error::BadUri("no scheme or host".into()));
        };
        let host_port = DefaultResolver::host_and_port(scheme, authority)
            .ok_or_else(|| Error::BadUri(format!("unknown scheme: {scheme}")))?;
        let addrs = self.addresses(&host_port).ok_or(Error::HostNotFound)?;
        let mut result = self.empty();
        for addr in config.ip_family().keep_wanted(addrs.into_iter()) {
            // ureq keeps 16 addresses at most.
            if result.try_push(addr).is_err() {
                break;
            }
        }
        if result.is_empty() {
            return Err(Error::HostNotFound);
        }
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    fn resolve(resolver: &InlineResolver, url: &str) -> Result<Vec<SocketAddr>, Error> {
        let uri: Uri = url.parse().unwrap();
        let config = Config::default();
        resolver
            .resolve(&uri, &config, NextTimeout::default())
            .map(|a| a.iter().copied().collect())
    }

    #[test]
    fn an_ip_literal_needs_no_lookup() {
        let r = InlineResolver::default();
        assert_eq!(
            resolve(&r, "http://10.1.2.3:8080/instance").unwrap(),
            vec!["10.1.2.3:8080".parse().unwrap()]
        );
        assert_eq!(
            resolve(&r, "https://[::1]/").unwrap(),
            vec!["[::1]:443".parse().unwrap()]
        );
        assert_eq!(r.lookups.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_name_is_looked_up_once_for_the_calls_that_follow() {
        let r = InlineResolver::default();
        for _ in 0..5 {
            let addrs = resolve(&r, "http://localhost:8080/").unwrap();
            assert!(addrs
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 8080));
        }
        assert_eq!(r.lookups.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_name_that_does_not_resolve_is_host_not_found_and_asked_once() {
        let r = InlineResolver::default();
        for _ in 0..3 {
            let err = resolve(&r, "http://no-such-host.invalid/").unwrap_err();
            assert!(matches!(err, Error::HostNotFound), "{err:?}");
        }
        assert_eq!(r.lookups.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn an_old_answer_is_asked_again() {
        let r = InlineResolver::default();
        resolve(&r, "http://localhost:80/").unwrap();
        r.answers
            .lock()
            .unwrap()
            .get_mut("localhost:80")
            .unwrap()
            .at -= LOOKUP_REUSE;
        resolve(&r, "http://localhost:80/").unwrap();
        assert_eq!(r.lookups.load(Ordering::SeqCst), 2);
    }
}
