//! The HTTP calls. One `Client` per run: its ureq agent is shared by the worker threads and
//! keeps connections alive between calls.
//!
//! Error messages end up in rows users can read. So no message names the configured URL (the
//! operator knows it; "the Evolution API" says enough), and every error leaving a public
//! method passes through `Client::scrubbed`, the one place that removes secrets (the API key,
//! credentials in the URL, instance tokens met along the way) and bounds the text: a proxy
//! that echoes request headers once put the key into an error message.

use super::config::mask_credentials;
use super::listing::{
    read_listing, ListedInstance, ListingError, MAX_LISTING_BYTES, MAX_LISTING_LABEL,
};
use super::reply::{
    envelope_message, error_words, is_instance_missing, is_name_in_use, is_not_connected,
    parse_connect_reply, parse_connection_state, parse_create_reply, parse_fetch_instance,
    parse_version, LiveState, Removal,
};
use super::request::{
    connect_path, connect_path_with_number, create_body_with_number, instance_path, path_segment,
    webhook_set_body,
};
use super::resolver::InlineResolver;
use super::{ApiError, ApiVersion, ConnectOutcome, CreatedInstance, ErrorClass, Webhook};
use crate::phone::{redact_numbers, Phone};
use std::fmt;
use std::time::Duration;
use ureq::http::Response;
use ureq::{Agent, Body};

/// The largest reply evoq reads; a longer one is an error (`too_large`) and is not kept.
///
/// A real create reply with its base64 QR image is 10-30 KB, so 1 MiB is generous. The bound
/// is what keeps memory in check: each worker thread holds at most one reply, so replies in
/// flight take at most `evoq.concurrency` × `MAX_REPLY_BYTES` (128 MiB at the highest
/// concurrency; up to twice that for a moment while a read buffer grows), and never more than
/// `pool::MAX_LIVE_THREADS` × `MAX_REPLY_BYTES` in one backend.
pub const MAX_REPLY_BYTES: u64 = 1024 * 1024;
/// `MAX_REPLY_BYTES` as messages say it.
const MAX_REPLY_LABEL: &str = "1 MiB";

/// A probe that got no answer (refused, DNS, a timeout, a broken connection) says the server
/// is down or unreachable: the whole server's fault, not a row's.
fn probe_failure(e: ApiError) -> ApiError {
    match e.error_class() {
        ErrorClass::Unreachable | ErrorClass::Timeout | ErrorClass::Network => server_wide(e),
        _ => e,
    }
}

fn server_wide(mut e: ApiError) -> ApiError {
    e.server_wide = true;
    e
}

/// The instance name the health probe asks for: outside every namespace evoq makes
/// (`evoq_<namespace>_<hex>`), and with characters no name evoq creates carries.
pub const HEALTH_PROBE_NAME: &str = "evoq-health-probe--no-such-instance";

#[derive(Clone)]
pub struct ClientConfig {
    /// Base URL without a trailing slash, e.g. `http://evolution:8080`.
    pub base_url: String,
    pub api_key: String,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// Idle keep-alive connections to keep: one per worker thread.
    pub max_idle: usize,
    /// Further secrets no error may repeat: the webhook secret (in the URL of a v1.8 body) and
    /// the webhook's header values.
    pub other_secrets: Vec<String>,
}

/// Written by hand so that no `{:?}` (a log line, a panic message) can print the key or a
/// password in the URL.
impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("base_url", &mask_credentials(&self.base_url))
            .field("api_key", &super::REDACTED)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_idle", &self.max_idle)
            .field("other_secrets", &self.other_secrets.len())
            .finish()
    }
}

#[derive(Clone)]
pub struct Client {
    agent: Agent,
    base_url: String,
    api_key: String,
    /// `user:password` and `password` of a base URL that has them: secrets like the key.
    url_secrets: Vec<String>,
    request_timeout: Duration,
}

/// A reply that was read in full: status and body text.
struct Reply {
    status: u16,
    body: String,
}

/// The `user:password` part of a URL, and the password alone.
fn url_secrets(url: &str) -> Vec<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let Some((userinfo, _)) = authority.rsplit_once('@') else {
        return Vec::new();
    };
    let mut secrets = vec![userinfo.to_string()];
    if let Some((_, password)) = userinfo.split_once(':') {
        secrets.push(password.to_string());
    }
    secrets
}

impl Client {
    pub fn new(config: ClientConfig) -> Client {
        let agent_config = Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(config.request_timeout))
            .timeout_connect(Some(config.connect_timeout))
            // A redirect would carry the apikey header to wherever it points; a 3xx comes back
            // as an error that says where it points instead.
            .max_redirects(0)
            .max_idle_connections(config.max_idle.max(1) * 2)
            .max_idle_connections_per_host(config.max_idle.max(1))
            // ureq's buffers stay at their defaults (128 KiB each way per connection, kept
            // while the connection idles in the agent's pool): glibc serves them with mmap,
            // so they go back to the OS when the client is dropped. Measured at 1000 calls in
            // flight, 32 + 16 KiB buffers halved the peak (394 → 178 MB) but left 45 MB more
            // resident after the client was gone, even after malloc_trim: small blocks stay
            // in the threads' arenas.
            .user_agent(concat!("evoq/", env!("CARGO_PKG_VERSION")))
            .build();
        // Name lookups on the calling thread: ureq's own resolver starts a thread per call
        // (see `resolver`).
        let agent = Agent::with_parts(
            agent_config,
            ureq::unversioned::transport::DefaultConnector::default(),
            InlineResolver::default(),
        );
        let base_url = config.base_url.trim_end_matches('/').to_string();
        let mut secrets = url_secrets(&base_url);
        secrets.extend(config.other_secrets.into_iter().filter(|s| !s.is_empty()));
        Client {
            agent,
            url_secrets: secrets,
            base_url,
            api_key: config.api_key,
            request_timeout: config.request_timeout,
        }
    }

    /// Runs one public call. `seen` collects secrets met on the way (the token of an adopted
    /// instance); an error is scrubbed of them and of the client's own before it leaves.
    fn scrubbed<T>(
        &self,
        call: impl FnOnce(&mut Vec<String>) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let mut seen = Vec::new();
        call(&mut seen).map_err(|e| {
            let secrets: Vec<&str> = std::iter::once(self.api_key.as_str())
                .chain(self.url_secrets.iter().map(String::as_str))
                .chain(seen.iter().map(String::as_str))
                .collect();
            e.scrubbed(&secrets)
        })
    }

    fn transport_error(&self, what: &str, err: ureq::Error) -> ApiError {
        match err {
            ureq::Error::Timeout(ureq::Timeout::Connect | ureq::Timeout::Resolve) => {
                ApiError::unreachable(format!(
                    "could not connect to the Evolution API in time ({what})"
                ))
            }
            ureq::Error::Timeout(_) => ApiError::timeout(format!(
                "the Evolution API did not answer {what} within {} ms",
                self.request_timeout.as_millis()
            )),
            // EMFILE/ENFILE: std calls it an "uncategorized error", which says nothing.
            ureq::Error::Io(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                ApiError::network(format!(
                    "{what} to the Evolution API failed: this PostgreSQL process is out of file \
                     descriptors (lower evoq.concurrency, or raise the service's open files limit)"
                ))
            }
            ureq::Error::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                ApiError::unreachable(format!(
                    "could not connect to the Evolution API: connection refused ({what})"
                ))
            }
            ureq::Error::HostNotFound => {
                ApiError::unreachable(format!("could not resolve the Evolution API host ({what})"))
            }
            ureq::Error::ConnectionFailed => {
                ApiError::unreachable(format!("could not connect to the Evolution API ({what})"))
            }
            ureq::Error::BodyExceedsLimit(_) => ApiError::too_large(what, MAX_REPLY_LABEL),
            // Settings a request cannot be built from. The errors' own texts are not used:
            // they may repeat the URL, credentials and all.
            ureq::Error::BadUri(_) => ApiError::invalid_api_url(what),
            ureq::Error::Http(e)
                if e.get_ref().is::<ureq::http::uri::InvalidUri>()
                    || e.get_ref().is::<ureq::http::uri::InvalidUriParts>() =>
            {
                ApiError::invalid_api_url(what)
            }
            ureq::Error::Http(_) => ApiError::invalid_settings(what),
            ureq::Error::Io(e) => {
                ApiError::network(format!("{what} to the Evolution API failed: {}", e.kind()))
            }
            other => ApiError::network(format!("{what} to the Evolution API failed: {other}")),
        }
    }

    /// Sends one request and reads the reply, at most `MAX_REPLY_BYTES` of UTF-8 text.
    /// A 3xx is an error. `what` names the route in messages ("GET /instance/connect"),
    /// without the instance name that the row already carries.
    fn call(
        &self,
        method: &str,
        path: &str,
        what: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Reply, ApiError> {
        let mut response = self.send(method, path, what, body)?;
        let status = response.status().as_u16();
        // One byte over the limit is enough to know the reply is too large.
        let bytes = response
            .body_mut()
            .with_config()
            .limit(MAX_REPLY_BYTES + 1)
            .read_to_vec()
            .map_err(|e| self.transport_error(what, e))?;
        if bytes.len() as u64 > MAX_REPLY_BYTES {
            return Err(ApiError::too_large(what, MAX_REPLY_LABEL));
        }
        let body = String::from_utf8(bytes)
            .map_err(|_| ApiError::malformed(what, "the body is not UTF-8 text"))?;
        Ok(Reply { status, body })
    }

    /// Sends one request with the key and returns the response, its body unread; a 3xx is an
    /// error (`call` reads the body; the listing streams it).
    fn send(
        &self,
        method: &str,
        path: &str,
        what: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Response<Body>, ApiError> {
        let url = format!("{}{}", self.base_url, path);
        let result: Result<Response<Body>, ureq::Error> = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("apikey", &self.api_key).call(),
            ("DELETE", _) => self
                .agent
                .delete(&url)
                .header("apikey", &self.api_key)
                .call(),
            (_, Some(json)) => self
                .agent
                .post(&url)
                .header("apikey", &self.api_key)
                .send_json(json),
            (_, None) => self
                .agent
                .post(&url)
                .header("apikey", &self.api_key)
                .send_empty(),
        };
        let response = result.map_err(|e| self.transport_error(what, e))?;
        let status = response.status().as_u16();
        if (300..400).contains(&status) {
            let location = response
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .map(mask_credentials);
            return Err(ApiError::redirect(status, what, location.as_deref()));
        }
        Ok(response)
    }

    fn expect_success(reply: &Reply, what: &str) -> Result<(), ApiError> {
        if (200..300).contains(&reply.status) {
            Ok(())
        } else {
            Err(ApiError::http(reply.status, what, error_words(&reply.body)))
        }
    }

    /// `GET /`: which dialect the server speaks. Failures are classified for the caller:
    /// - no answer (refused, DNS, timeouts, a broken connection) or 5xx/408/429: server-wide
    ///   and transient, the server is down or busy;
    /// - a 3xx or any other 4xx: server-wide and permanent (`redirect`, `wrong_api_url`).
    ///   `GET /` needs no key and always answers 200 on an Evolution API server, so api_url
    ///   points at something else, e.g. with a wrong path prefix;
    /// - a 2xx that is not JSON or has no `version` (a proxy's page): not server-wide, so the
    ///   caller can fall back to v2 and let the real calls tell.
    pub fn probe_version(&self) -> Result<ApiVersion, ApiError> {
        const WHAT: &str = "GET /";
        self.scrubbed(|_| {
            let reply = self.call("GET", "/", WHAT, None).map_err(probe_failure)?;
            match reply.status {
                200..=299 => parse_version(&reply.body),
                s if s >= 500 || s == 408 || s == 429 => Err(server_wide(ApiError::http(
                    s,
                    WHAT,
                    error_words(&reply.body),
                ))),
                s => Err(ApiError::wrong_api_url(s, error_words(&reply.body))),
            }
        })
    }

    /// The health probe of the circuit breaker: `GET /instance/fetchInstances?instanceName=`
    /// with a name no instance can have. It stays inside the server and proves the key: a
    /// healthy server answers 404 "not found" (or 200, should the name exist), a wrong key 401.
    /// `GET /` is no health probe on 2.3.6: every call of it fetches WhatsApp's web client
    /// version from the Internet first (src/api/routes/index.router.ts,
    /// src/utils/fetchLatestWaWebVersion.ts), so a server with slow or no Internet access
    /// looks dead there (23-33 s seen) while fetchInstances answers in milliseconds.
    /// Failures: no answer, 5xx/408/429 and 401 are server-wide; any other status means api_url
    /// points at something else (`wrong_api_url`).
    pub fn probe_health(&self) -> Result<(), ApiError> {
        const WHAT: &str = "GET /instance/fetchInstances";
        self.scrubbed(|_| {
            let path = format!("/instance/fetchInstances?instanceName={HEALTH_PROBE_NAME}");
            let reply = self.call("GET", &path, WHAT, None).map_err(probe_failure)?;
            match reply.status {
                200..=299 | 404 => Ok(()),
                s if s >= 500 || s == 408 || s == 429 || s == 401 => Err(server_wide(
                    ApiError::http(s, WHAT, error_words(&reply.body)),
                )),
                s => Err(ApiError::wrong_api_url(s, error_words(&reply.body))),
            }
        })
    }

    /// `GET /instance/fetchInstances` unfiltered: every instance the server holds (the global
    /// key lists them all), for the reconciler. The reply is read as a stream and only names and
    /// states are kept (`listing`), up to its own bound `MAX_LISTING_BYTES` rather than
    /// `MAX_REPLY_BYTES`: a server with 5 000 instances answers about 4.7 MB.
    pub fn list_instances(&self) -> Result<Vec<ListedInstance>, ApiError> {
        const WHAT: &str = "GET /instance/fetchInstances";
        self.scrubbed(|_| {
            let mut response = self.send("GET", "/instance/fetchInstances", WHAT, None)?;
            let status = response.status().as_u16();
            if !(200..300).contains(&status) {
                let bytes = response
                    .body_mut()
                    .with_config()
                    .limit(MAX_REPLY_BYTES)
                    .read_to_vec()
                    .unwrap_or_default();
                return Err(ApiError::http(
                    status,
                    WHAT,
                    error_words(&String::from_utf8_lossy(&bytes)),
                ));
            }
            let reader = response
                .body_mut()
                .with_config()
                .limit(MAX_LISTING_BYTES + 1)
                .reader();
            read_listing(reader).map_err(|e| match e {
                ListingError::TooLarge => ApiError::too_large(WHAT, MAX_LISTING_LABEL),
                ListingError::Malformed(m) => ApiError::malformed(WHAT, m),
            })
        })
    }

    /// Creates the instance, or adopts it when the name is already taken: evoq names are
    /// derived from the user id, so a taken name is our own earlier attempt whose answer was
    /// lost. Only the 403 whose message says the name is in use means that; any other 403
    /// (a firewall, a proxy) is a permanent error with the server's words.
    pub fn provision(
        &self,
        version: ApiVersion,
        name: &str,
        webhook: Option<&Webhook>,
    ) -> Result<Provisioned, ApiError> {
        self.provision_with_number(version, name, webhook, None)
    }

    /// [`Client::provision`], with the user's phone number for a pairing code when there is
    /// one. An adopted instance (our own earlier create) is not given the number: the caller
    /// pairs it later, from `Provisioned::adopted`.
    pub fn provision_with_number(
        &self,
        version: ApiVersion,
        name: &str,
        webhook: Option<&Webhook>,
        number: Option<&Phone>,
    ) -> Result<Provisioned, ApiError> {
        const WHAT: &str = "POST /instance/create";
        let body = create_body_with_number(version, name, webhook, number.map(Phone::digits));
        let result = self.scrubbed(|seen| {
            let reply = self.call("POST", "/instance/create", WHAT, Some(&body))?;
            if reply.status == 403 {
                let envelope = envelope_message(&reply.body);
                if envelope.as_deref().is_some_and(is_name_in_use) {
                    return self
                        .adopt(version, name, webhook, seen)
                        .map(|instance| Provisioned {
                            instance,
                            adopted: true,
                        });
                }
                let mut e = ApiError::http(403, WHAT, error_words(&reply.body));
                if envelope.is_none() {
                    e.message.push_str(
                        " (not an Evolution API reply: is a proxy or firewall in front of it?)",
                    );
                }
                return Err(e);
            }
            Self::expect_success(&reply, WHAT)?;
            Ok(Provisioned {
                instance: parse_create_reply(&reply.body, name)?,
                adopted: false,
            })
        });
        without_numbers(result, number.is_some())
    }

    fn adopt(
        &self,
        version: ApiVersion,
        name: &str,
        webhook: Option<&Webhook>,
        seen: &mut Vec<String>,
    ) -> Result<CreatedInstance, ApiError> {
        const WHAT: &str = "GET /instance/fetchInstances";
        let path = format!(
            "/instance/fetchInstances?instanceName={}",
            path_segment(name)
        );
        let reply = self.call("GET", &path, WHAT, None)?;
        if reply.status == 404 {
            // The name was taken a moment ago but the server has since dropped it (a failed
            // create is cleaned up asynchronously): the next attempt can create it afresh.
            return Err(ApiError::not_found(format!(
                "instance {name:?} was reported in use, then not found; it will be created on the next attempt"
            )));
        }
        Self::expect_success(&reply, WHAT)?;
        let instance = parse_fetch_instance(&reply.body, name)?;
        if let Some(token) = &instance.token {
            seen.push(token.clone());
        }
        if let Some(hook) = webhook {
            // The adopted instance may carry an older webhook: set ours.
            let what = "POST /webhook/set";
            let path = format!("/webhook/set/{}", path_segment(name));
            let reply = self.call("POST", &path, what, Some(&webhook_set_body(version, hook)))?;
            Self::expect_success(&reply, what)?;
        }
        Ok(instance)
    }

    /// `GET /instance/connect/{name}`: the current QR, or `open` once the user has scanned it.
    /// A 404 means the instance is gone only when the server says so; a 404 for a route that
    /// does not exist (a wrong api_url prefix) is an error, not a reason to create the
    /// instance again.
    pub fn connect(&self, name: &str) -> Result<ConnectOutcome, ApiError> {
        self.connect_at(&connect_path(name))
    }

    /// "Link with phone number": a logout (a `connecting` instance ignores the number; a
    /// `close` one has nothing to log out: 400 "not connected" is fine), then a connect with
    /// the number. The reply's QR object carries the pairing code once WhatsApp gave one.
    /// Asked first: an instance linked since the last look is never logged out (`Open`), and a
    /// gone one is `Lost`. 2.3.6 logs out in the background (contract 3.7): the connect waits
    /// until the server no longer reads `connecting`, at most `PAIR_LOGOUT_WAIT`, or it would
    /// answer the cached QR and ignore the number.
    pub fn pair(&self, name: &str, number: &Phone) -> Result<ConnectOutcome, ApiError> {
        match self.connection_state(name)? {
            LiveState::Open => return Ok(ConnectOutcome::Open),
            LiveState::Lost => return Ok(ConnectOutcome::Lost),
            _ => {}
        }
        self.logout(name)?;
        let waited = std::time::Instant::now();
        while self.connection_state(name)? == LiveState::Connecting
            && waited.elapsed() < PAIR_LOGOUT_WAIT
        {
            std::thread::sleep(Duration::from_millis(250));
        }
        let result = self.connect_at(&connect_path_with_number(name, number.digits()));
        without_numbers(result, true)
    }

    fn connect_at(&self, path: &str) -> Result<ConnectOutcome, ApiError> {
        const WHAT: &str = "GET /instance/connect";
        self.scrubbed(|_| {
            let reply = self.call("GET", path, WHAT, None)?;
            if reply.status == 404 {
                if envelope_message(&reply.body)
                    .as_deref()
                    .is_some_and(is_instance_missing)
                {
                    return Ok(ConnectOutcome::Lost);
                }
                let mut e = ApiError::http(404, WHAT, error_words(&reply.body));
                e.message.push_str(
                    " (not the Evolution API's \"instance does not exist\": check api_url)",
                );
                return Err(e);
            }
            Self::expect_success(&reply, WHAT)?;
            parse_connect_reply(&reply.body)
        })
    }
}

/// How long a pairing waits for the server to finish its logout before the connect.
const PAIR_LOGOUT_WAIT: Duration = Duration::from_secs(3);

/// A call that carried a phone number: the server's words in an error may quote it back, and
/// error messages are stored and logged.
fn without_numbers<T>(result: Result<T, ApiError>, sent_a_number: bool) -> Result<T, ApiError> {
    result.map_err(|mut e| {
        if sent_a_number {
            e.message = redact_numbers(&e.message);
        }
        e
    })
}

impl Client {
    /// A 404 that says the instance does not exist (`Ok(true)`), or an error for a 404 of
    /// something else: a route that does not exist means a wrong api_url, not a gone instance.
    fn missing_instance(reply: &Reply, what: &str) -> Result<bool, ApiError> {
        if reply.status != 404 {
            return Ok(false);
        }
        if envelope_message(&reply.body)
            .as_deref()
            .is_some_and(is_instance_missing)
        {
            return Ok(true);
        }
        let mut e = ApiError::http(404, what, error_words(&reply.body));
        e.message
            .push_str(" (not the Evolution API's \"instance does not exist\": check api_url)");
        Err(e)
    }

    /// `GET /instance/connectionState/{name}`: the state in the server's memory. Never starts a
    /// socket, unlike connect on a closed instance (contract 3.2, 3.3).
    pub fn connection_state(&self, name: &str) -> Result<LiveState, ApiError> {
        const WHAT: &str = "GET /instance/connectionState";
        self.scrubbed(|_| {
            let reply = self.call("GET", &instance_path("connectionState", name), WHAT, None)?;
            if Self::missing_instance(&reply, WHAT)? {
                return Ok(LiveState::Lost);
            }
            Self::expect_success(&reply, WHAT)?;
            parse_connection_state(&reply.body)
        })
    }

    /// `DELETE /instance/logout/{name}`: ends the session and stops the socket and its QR loop.
    /// "Not connected" (400) and "no such instance" (404) leave nothing to stop: the goal.
    pub fn logout(&self, name: &str) -> Result<Removal, ApiError> {
        const WHAT: &str = "DELETE /instance/logout";
        self.scrubbed(|_| {
            let reply = self.call("DELETE", &instance_path("logout", name), WHAT, None)?;
            if Self::missing_instance(&reply, WHAT)? {
                return Ok(Removal::AlreadyThere);
            }
            if reply.status == 400
                && envelope_message(&reply.body)
                    .as_deref()
                    .is_some_and(is_not_connected)
            {
                return Ok(Removal::AlreadyThere);
            }
            Self::expect_success(&reply, WHAT)?;
            Ok(Removal::Done)
        })
    }

    /// `DELETE /instance/delete/{name}`; 404 means already gone (contract 3.8).
    pub fn delete(&self, name: &str) -> Result<Removal, ApiError> {
        const WHAT: &str = "DELETE /instance/delete";
        self.scrubbed(|_| {
            let reply = self.call("DELETE", &instance_path("delete", name), WHAT, None)?;
            if Self::missing_instance(&reply, WHAT)? {
                return Ok(Removal::AlreadyThere);
            }
            Self::expect_success(&reply, WHAT)?;
            Ok(Removal::Done)
        })
    }

    /// Deprovisioning: log out first (a delete alone was seen to leave a reconnect loop running
    /// on a real 2.3.6 server), then delete.
    pub fn remove(&self, name: &str) -> Result<Removal, ApiError> {
        self.logout(name)?;
        self.delete(name)
    }

    /// `POST /webhook/set/{name}`: points an existing instance at the configured webhook (after
    /// evoq_configure changed its URL, events, headers or secret). `Ok(false)`: the server no
    /// longer knows the instance.
    pub fn set_webhook(
        &self,
        version: ApiVersion,
        name: &str,
        hook: &Webhook,
    ) -> Result<bool, ApiError> {
        const WHAT: &str = "POST /webhook/set";
        self.scrubbed(|_| {
            let path = format!("/webhook/set/{}", path_segment(name));
            let reply = self.call("POST", &path, WHAT, Some(&webhook_set_body(version, hook)))?;
            if Self::missing_instance(&reply, WHAT)? {
                return Ok(false);
            }
            Self::expect_success(&reply, WHAT)?;
            Ok(true)
        })
    }
}

/// The result of `Client::provision`.
#[derive(Debug, Clone)]
pub struct Provisioned {
    pub instance: CreatedInstance,
    /// True when the name was taken and the existing instance was adopted.
    pub adopted: bool,
}

#[cfg(test)]
mod tests {
    use super::super::test_server::{Canned, TestServer};
    use super::*;
    use crate::evolution::ErrorKind;

    const KEY: &str = "sk-unit-test-key-0123456789";

    fn client_for(base_url: &str, timeout_ms: u64) -> Client {
        Client::new(ClientConfig {
            base_url: base_url.to_string(),
            api_key: KEY.to_string(),
            request_timeout: Duration::from_millis(timeout_ms),
            connect_timeout: Duration::from_millis(timeout_ms),
            max_idle: 2,
            other_secrets: vec!["whsec-unit-test".into()],
        })
    }

    fn client(server: &TestServer) -> Client {
        client_for(&server.url, 2000)
    }

    fn envelope(status: u16, message: &str) -> String {
        serde_json::json!({"status": status, "error": "x", "response": {"message": [message]}})
            .to_string()
    }

    /// A port nothing listens on.
    fn closed_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn a_call_starts_no_thread_of_its_own_to_a_name_or_an_ip_literal() {
        let server = TestServer::start(|_| Canned::json(200, r#"{"version":"2.3.6"}"#));
        let port = server.url.rsplit(':').next().unwrap().to_string();
        for host in ["127.0.0.1", "localhost"] {
            let client = client_for(&format!("http://{host}:{port}"), 2000);
            for _ in 0..3 {
                let before = crate::thread_births::started_here();
                assert_eq!(client.probe_version(), Ok(ApiVersion::V2), "{host}");
                assert_eq!(
                    crate::thread_births::started_here() - before,
                    0,
                    "a call to {host} started a thread"
                );
            }
        }
        assert_eq!(server.requests().len(), 6);
    }

    #[test]
    fn out_of_descriptors_says_so_rather_than_uncategorized() {
        let client = client_for("http://127.0.0.1:9", 100);
        for errno in [libc::EMFILE, libc::ENFILE] {
            let err = client.transport_error(
                "GET /",
                ureq::Error::Io(std::io::Error::from_raw_os_error(errno)),
            );
            assert!(
                err.message.contains("out of file descriptors"),
                "{}",
                err.message
            );
        }
    }

    #[test]
    fn debug_of_the_config_hides_the_key_and_url_passwords() {
        let config = ClientConfig {
            base_url: "https://user:pw-secret@evo.example".into(),
            api_key: KEY.into(),
            request_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            max_idle: 1,
            other_secrets: Vec::new(),
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains(KEY), "{shown}");
        assert!(!shown.contains("pw-secret"), "{shown}");
        assert!(shown.contains("api_key: \"[redacted]\""), "{shown}");
        assert!(shown.contains("https://***@evo.example"), "{shown}");
    }

    #[test]
    fn the_user_agent_names_this_version() {
        let server = TestServer::start(|_| Canned::json(200, r#"{"version":"2.3.6"}"#));
        client(&server).probe_version().unwrap();
        let ua = server.requests()[0]
            .header("user-agent")
            .unwrap_or_default();
        assert_eq!(ua, format!("evoq/{}", env!("CARGO_PKG_VERSION")));
        assert_ne!(ua, "evoq/0.1");
    }

    #[test]
    fn an_unreachable_server_is_server_wide_and_the_url_is_not_in_the_message() {
        let port = closed_port();
        let c = client_for(&format!("http://user:pw-secret@127.0.0.1:{port}"), 2000);
        let e = c.connect("evoq_1").unwrap_err();
        assert_eq!(
            e.message,
            "could not connect to the Evolution API: connection refused (GET /instance/connect)"
        );
        assert_eq!((e.class().as_str(), e.server_wide), ("unreachable", true));
        let e = c.probe_version().unwrap_err();
        assert!(!e.message.contains("127.0.0.1") && !e.message.contains("pw-secret"));
        assert_eq!((e.kind, e.server_wide), (ErrorKind::Transient, true));
    }

    #[test]
    fn a_silent_server_times_out() {
        let server = TestServer::start(|_| Canned::hang());
        let c = client_for(&server.url, 300);
        let e = c.connect("evoq_1").unwrap_err();
        assert_eq!(
            e.message,
            "the Evolution API did not answer GET /instance/connect within 300 ms"
        );
        assert_eq!((e.class().as_str(), e.server_wide), ("timeout", false));
        // The probe says the same about the whole server.
        let e = c.probe_version().unwrap_err();
        assert_eq!((e.class().as_str(), e.server_wide), ("timeout", true));
        assert_eq!(e.kind, ErrorKind::Transient);
    }

    #[test]
    fn replies_over_the_size_limit_are_refused_and_at_the_limit_accepted() {
        // Valid JSON of exactly MAX_REPLY_BYTES bytes: {"count":0,"pad":"xxx..."}.
        let frame = r#"{"count":0,"pad":""}"#.len();
        let at_limit = format!(
            r#"{{"count":0,"pad":"{}"}}"#,
            "x".repeat(MAX_REPLY_BYTES as usize - frame)
        );
        assert_eq!(at_limit.len() as u64, MAX_REPLY_BYTES);
        let over = format!("{at_limit} ");
        let server = TestServer::start(move |r| {
            if r.path.ends_with("/big") {
                Canned::json(200, &over)
            } else {
                Canned::json(200, &at_limit)
            }
        });
        let c = client(&server);
        assert_eq!(
            c.connect("fits").unwrap(),
            ConnectOutcome::NoQrYet { count: Some(0) }
        );
        let e = c.connect("big").unwrap_err();
        assert_eq!(
            e.message,
            "the reply to GET /instance/connect is over the size limit (1 MiB)"
        );
        assert_eq!(
            (e.class().as_str(), e.kind),
            ("too_large", ErrorKind::Transient)
        );
    }

    #[test]
    fn removal_logs_out_then_deletes_and_takes_gone_as_done() {
        let server = TestServer::start(|r| match (r.method.as_str(), r.path.as_str()) {
            ("DELETE", "/instance/logout/live") => Canned::json(
                200,
                r#"{"status":"SUCCESS","error":false,"response":{"message":"Instance logged out"}}"#,
            ),
            ("DELETE", "/instance/logout/closed") => Canned::json(
                400,
                &envelope(400, "The \"closed\" instance is not connected"),
            ),
            ("DELETE", p) if p.starts_with("/instance/logout/") => {
                Canned::json(404, &envelope(404, "The \"gone\" instance does not exist"))
            }
            ("DELETE", "/instance/delete/gone") => {
                Canned::json(404, &envelope(404, "The \"gone\" instance does not exist"))
            }
            ("DELETE", "/instance/delete/open-v1") => Canned::json(
                400,
                &envelope(400, "The \"open-v1\" instance needs to be disconnected"),
            ),
            ("DELETE", _) => Canned::json(
                200,
                r#"{"status":"SUCCESS","error":false,"response":{"message":"Instance deleted"}}"#,
            ),
            _ => Canned::json(500, "{}"),
        });
        let c = client(&server);
        assert_eq!(c.remove("live").unwrap(), Removal::Done);
        assert_eq!(c.remove("closed").unwrap(), Removal::Done);
        assert_eq!(c.remove("gone").unwrap(), Removal::AlreadyThere);
        let e = c.remove("open-v1").unwrap_err();
        assert!(
            e.message.contains("needs to be disconnected"),
            "{}",
            e.message
        );
        let seen: Vec<(String, String)> = server
            .requests()
            .iter()
            .map(|r| (r.method.clone(), r.path.clone()))
            .collect();
        assert_eq!(seen[0], ("DELETE".into(), "/instance/logout/live".into()));
        assert_eq!(seen[1], ("DELETE".into(), "/instance/delete/live".into()));
        assert_eq!(seen.len(), 8, "{seen:?}");
    }

    #[test]
    fn a_404_of_a_wrong_route_is_an_error_not_a_gone_instance() {
        let server = TestServer::start(|_| {
            Canned::json(404, &envelope(404, "Cannot DELETE /x/instance/delete/a"))
        });
        let c = client(&server);
        assert!(c.delete("a").unwrap_err().message.contains("check api_url"));
        assert!(c.logout("a").is_err());
        assert!(c.connection_state("a").is_err());
    }

    #[test]
    fn connection_state_never_connects() {
        let server = TestServer::start(|r| {
            if r.path.ends_with("/lost") {
                Canned::json(404, &envelope(404, "The \"lost\" instance does not exist"))
            } else {
                Canned::json(200, r#"{"instance":{"instanceName":"a","state":"close"}}"#)
            }
        });
        let c = client(&server);
        assert_eq!(c.connection_state("a").unwrap(), LiveState::Close);
        assert_eq!(c.connection_state("lost").unwrap(), LiveState::Lost);
        assert!(server
            .requests()
            .iter()
            .all(|r| r.method == "GET" && r.path.starts_with("/instance/connectionState/")));
    }

    #[test]
    fn a_body_that_is_not_utf8_says_so() {
        let server = TestServer::start(|_| Canned::raw(200, vec![b'{', 0xff, 0xfe, b'}']));
        let e = client(&server).connect("x").unwrap_err();
        assert_eq!(
            e.message,
            "malformed reply to GET /instance/connect: the body is not UTF-8 text"
        );
        assert_eq!(e.class(), "malformed");
    }

    #[test]
    fn a_redirect_says_where_it_points_and_is_not_followed() {
        let server = TestServer::start(|_| {
            Canned::json(307, "").header("Location", "https://user:pw-secret@host/path")
        });
        let c = client(&server);
        let e = c.probe_version().unwrap_err();
        assert_eq!(
            e.message,
            "Evolution API answered 307 to GET /: a redirect to https://***@host/path; evoq does \
             not follow redirects: point api_url at the final address"
        );
        assert_eq!(
            (e.kind, e.server_wide, e.http_status, e.class().as_str()),
            (ErrorKind::Permanent, true, Some(307), "redirect")
        );
        let e = c.connect("x").unwrap_err();
        assert!(e.message.starts_with("Evolution API answered 307 to GET /instance/connect: a redirect to https://***@host/path"));
        assert_eq!(server.requests().len(), 2, "no request followed a redirect");
    }

    #[test]
    fn the_webhook_secret_echoed_by_a_proxy_is_redacted() {
        let server = TestServer::start(|r| {
            Canned::json(
                502,
                &envelope(502, &format!("bad gateway; body: {}", r.body)),
            )
        });
        let hook = Webhook {
            url: "https://app.example/hook".into(),
            events: vec![],
            headers: Default::default(),
            secret: Some("whsec-unit-test".into()),
        };
        let e = client(&server)
            .provision(ApiVersion::V1, "evoq_1", Some(&hook))
            .unwrap_err();
        assert!(!e.message.contains("whsec-unit-test"), "{}", e.message);
        assert!(
            e.message.contains("evoq_secret=[redacted]"),
            "{}",
            e.message
        );
    }

    #[test]
    fn the_key_echoed_by_a_proxy_is_redacted() {
        // A proxy that puts the request's headers into its error message.
        let server = TestServer::start(|r| {
            let key = r.header("apikey").unwrap_or_default();
            Canned::json(
                502,
                &envelope(502, &format!("bad gateway; headers: apikey={key}")),
            )
        });
        let e = client(&server).connect("x").unwrap_err();
        assert!(!e.message.contains(KEY), "{}", e.message);
        assert!(e.message.contains("apikey=[redacted]"), "{}", e.message);
        assert_eq!(
            (e.class().as_str(), e.kind),
            ("http_502", ErrorKind::Transient)
        );
    }

    #[test]
    fn the_token_of_an_adopted_instance_is_redacted() {
        const TOKEN: &str = "ADOPTED-TOKEN-4BE17E02";
        let server = TestServer::start(|r| match r.path.as_str() {
            "/instance/create" => Canned::json(
                403,
                &envelope(403, "This name \"evoq_1\" is already in use."),
            ),
            p if p.starts_with("/instance/fetchInstances") => Canned::json(
                200,
                &format!(
                    r#"[{{"id":"f7","name":"evoq_1","connectionStatus":"close","token":"{TOKEN}"}}]"#
                ),
            ),
            _ => Canned::json(
                500,
                &envelope(500, &format!("cannot set webhook for token {TOKEN}")),
            ),
        });
        let hook = Webhook {
            url: "https://app.example/hook".into(),
            events: vec!["QRCODE_UPDATED".into()],
            headers: Default::default(),
            secret: None,
        };
        let e = client(&server)
            .provision(ApiVersion::V2, "evoq_1", Some(&hook))
            .unwrap_err();
        assert!(!e.message.contains(TOKEN), "{}", e.message);
        assert!(e.message.contains("token [redacted]"), "{}", e.message);
    }

    #[test]
    fn only_name_in_use_is_adopted() {
        let server = TestServer::start(|r| match r.path.as_str() {
            "/instance/create" => Canned::json(
                403,
                &envelope(403, "This name \"evoq_1\" is already in use."),
            ),
            p if p.starts_with("/instance/fetchInstances") => Canned::json(
                200,
                r#"[{"id":"f7","name":"evoq_1","connectionStatus":"open","token":"T0KEN"}]"#,
            ),
            _ => Canned::json(201, "{}"),
        });
        let hook = Webhook {
            url: "https://app.example/hook".into(),
            events: vec![],
            headers: Default::default(),
            secret: None,
        };
        let p = client(&server)
            .provision(ApiVersion::V2, "evoq_1", Some(&hook))
            .unwrap();
        assert!(p.adopted);
        assert_eq!(p.instance.instance_id.as_deref(), Some("f7"));
        let calls: Vec<String> = server
            .requests()
            .into_iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect();
        assert_eq!(
            calls,
            [
                "POST /instance/create",
                "GET /instance/fetchInstances?instanceName=evoq_1",
                "POST /webhook/set/evoq_1"
            ]
        );
    }

    #[test]
    fn any_other_403_is_a_permanent_error_with_the_servers_words() {
        let server = TestServer::start(|r| {
            if r.body.contains("waf") {
                Canned::raw(
                    403,
                    b"<html><h1>Request blocked by WAF</h1></html>".to_vec(),
                )
            } else {
                Canned::json(403, &envelope(403, "Missing global api key"))
            }
        });
        let c = client(&server);
        let e = c.provision(ApiVersion::V2, "evoq_waf", None).unwrap_err();
        assert_eq!(
            (e.kind, e.http_status, e.server_wide, e.class().as_str()),
            (ErrorKind::Permanent, Some(403), false, "http_403")
        );
        assert!(
            e.message.contains("Request blocked by WAF"),
            "{}",
            e.message
        );
        assert!(e.message.contains("proxy or firewall"), "{}", e.message);
        let e = c.provision(ApiVersion::V2, "evoq_2", None).unwrap_err();
        assert_eq!(
            e.message,
            "Evolution API answered 403 to POST /instance/create: Missing global api key"
        );
        assert!(
            server
                .requests()
                .iter()
                .all(|r| r.path == "/instance/create"),
            "no adoption was attempted"
        );
    }

    /// The reconciler's listing: unfiltered fetchInstances with the global key, a reply over
    /// `MAX_REPLY_BYTES` still read (its own bound), an error status an error with the server's
    /// words, and the tokens in the rows never in what comes back.
    #[test]
    fn the_listing_is_read_beyond_the_reply_cap_and_keeps_no_token() {
        let row = |i: usize| {
            format!(
                r#"{{"name":"evoq_ns_{i:032x}","connectionStatus":"open","token":"TOKEN-{i}","pad":"{}"}}"#,
                "x".repeat(900)
            )
        };
        let body = format!("[{}]", (0..2000).map(row).collect::<Vec<_>>().join(","));
        assert!(body.len() as u64 > MAX_REPLY_BYTES);
        let server = TestServer::start(move |_| Canned::json(200, &body));
        let listed = client(&server).list_instances().unwrap();
        assert_eq!(listed.len(), 2000);
        assert!(!format!("{listed:?}").contains("TOKEN"));
        let asked = server.requests();
        assert_eq!(asked[0].path, "/instance/fetchInstances");
        assert_eq!(asked[0].header("apikey").as_deref(), Some(KEY));
        let server = TestServer::start(|_| Canned::json(401, &envelope(401, "Unauthorized")));
        assert_eq!(
            client(&server).list_instances().unwrap_err().class(),
            "http_401"
        );
        let server = TestServer::start(|_| Canned::json(200, r#"{"status":"ok"}"#));
        assert_eq!(
            client(&server).list_instances().unwrap_err().class(),
            "malformed"
        );
    }

    /// The health probe asks fetchInstances for a name that cannot exist, with the key: 404 is
    /// healthy, 401 a rejected key (server-wide), 5xx busy or down (server-wide), and it never
    /// asks `GET /` (which on 2.3.6 waits on WhatsApp's website).
    #[test]
    fn the_health_probe_stays_inside_the_server_and_proves_the_key() {
        let server = TestServer::start(|_| Canned::json(404, &envelope(404, "Instance not found")));
        client(&server).probe_health().unwrap();
        let asked = server.requests();
        assert_eq!(asked.len(), 1);
        assert_eq!(
            asked[0].path,
            format!("/instance/fetchInstances?instanceName={HEALTH_PROBE_NAME}")
        );
        assert_eq!(asked[0].header("apikey").as_deref(), Some(KEY));
        let server = TestServer::start(|_| Canned::json(200, "[]"));
        client(&server).probe_health().unwrap();
        for (status, class) in [(401, "http_401"), (500, "http_500"), (503, "http_503")] {
            let server = TestServer::start(move |_| Canned::json(status, "{}"));
            let e = client(&server).probe_health().unwrap_err();
            assert!(e.server_wide, "{status}");
            assert_eq!(e.class(), class);
        }
        let server = TestServer::start(|_| Canned::json(405, "{}"));
        assert_eq!(
            client(&server).probe_health().unwrap_err().class(),
            "wrong_api_url"
        );
        let e = client_for(&format!("http://127.0.0.1:{}", closed_port()), 500)
            .probe_health()
            .unwrap_err();
        assert!(e.server_wide);
    }

    #[test]
    fn probe_failures_are_classified() {
        let probe = |canned: fn() -> Canned| {
            let server = TestServer::start(move |_| canned());
            client(&server).probe_version()
        };
        assert_eq!(
            probe(|| Canned::json(200, r#"{"status":200,"version":"2.3.6"}"#)).unwrap(),
            ApiVersion::V2
        );
        assert_eq!(
            probe(|| Canned::json(200, r#"{"version":"1.8.2"}"#)).unwrap(),
            ApiVersion::V1
        );
        // A wrong path prefix: the server (or a proxy) has no such route.
        let e = probe(|| Canned::json(404, &envelope(404, "Cannot GET /evo/"))).unwrap_err();
        assert!(e
            .message
            .starts_with("api_url does not look like an Evolution API server: GET / answered 404"));
        assert_eq!(
            (e.kind, e.server_wide, e.class().as_str()),
            (ErrorKind::Permanent, true, "wrong_api_url")
        );
        for status in [400, 401, 403, 405] {
            let server = TestServer::start(move |_| Canned::json(status, "{}"));
            let e = client(&server).probe_version().unwrap_err();
            assert_eq!(
                (e.kind, e.server_wide),
                (ErrorKind::Permanent, true),
                "{status}"
            );
            assert_eq!(e.class(), "wrong_api_url");
        }
        for status in [500, 503, 429] {
            let server = TestServer::start(move |_| Canned::json(status, "{}"));
            let e = client(&server).probe_version().unwrap_err();
            assert_eq!(
                (e.kind, e.server_wide),
                (ErrorKind::Transient, true),
                "{status}"
            );
            assert_eq!(e.class(), format!("http_{status}"));
        }
        // A proxy's page, or JSON without a version: not server-wide, so the caller can fall
        // back to v2.
        for canned in [
            (|| Canned::raw(200, b"<html>welcome</html>".to_vec())) as fn() -> Canned,
            || Canned::json(200, r#"{"status":200}"#),
            || Canned::json(200, ""),
        ] {
            let e = probe(canned).unwrap_err();
            assert_eq!(
                (e.kind, e.server_wide),
                (ErrorKind::Transient, false),
                "{e:?}"
            );
            assert_eq!(e.class(), "malformed");
        }
    }

    /// Pairing: a logout first (a `connecting` instance ignores the number; "not connected"
    /// is fine), then a connect with `?number=`; the reply's pairing code is read.
    #[test]
    fn a_pairing_logs_out_then_connects_with_the_number() {
        let server = TestServer::start(|r| {
            if r.path.starts_with("/instance/connectionState/") {
                Canned::json(200, r#"{"instance":{"instanceName":"p","state":"close"}}"#)
            } else if r.method == "DELETE" {
                Canned::json(400, &envelope(400, "The \"p\" instance is not connected"))
            } else {
                Canned::json(
                    200,
                    r#"{"pairingCode":"WZYEH1YY","code":"2@x","base64":"data:x","count":1}"#,
                )
            }
        });
        let phone = Phone::parse("+55 11 98765-4321").unwrap();
        match client(&server).pair("p", &phone).unwrap() {
            ConnectOutcome::Qr(qr) => assert_eq!(qr.pairing_code.as_deref(), Some("WZYEH1YY")),
            other => panic!("{other:?}"),
        }
        let seen: Vec<(String, String)> = server
            .requests()
            .into_iter()
            .map(|r| (r.method, r.path))
            .collect();
        assert_eq!(
            seen,
            vec![
                ("GET".to_string(), "/instance/connectionState/p".to_string()),
                ("DELETE".to_string(), "/instance/logout/p".to_string()),
                ("GET".to_string(), "/instance/connectionState/p".to_string()),
                (
                    "GET".to_string(),
                    "/instance/connect/p?number=5511987654321".to_string()
                ),
            ]
        );
    }

    /// Linked since the last look (the user scanned the QR meanwhile): never logged out.
    #[test]
    fn a_pairing_never_logs_out_an_open_instance() {
        let server = TestServer::start(|_| {
            Canned::json(200, r#"{"instance":{"instanceName":"p","state":"open"}}"#)
        });
        let phone = Phone::parse("5511987654321").unwrap();
        assert_eq!(
            client(&server).pair("p", &phone).unwrap(),
            ConnectOutcome::Open
        );
        assert!(server
            .requests()
            .iter()
            .all(|r| r.method == "GET" && r.path.starts_with("/instance/connectionState/")));
    }

    /// 2.3.6 logs out in the background: the connect waits while the server still reads
    /// `connecting`, so the number is not ignored.
    #[test]
    fn a_pairing_waits_for_the_logout_to_take() {
        let states = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = states.clone();
        let server = TestServer::start(move |r| {
            if r.path.starts_with("/instance/connectionState/") {
                // connecting before the logout, and for two more looks after it
                let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let state = if n < 3 { "connecting" } else { "close" };
                Canned::json(
                    200,
                    &format!(r#"{{"instance":{{"instanceName":"p","state":"{state}"}}}}"#),
                )
            } else if r.method == "DELETE" {
                Canned::json(200, r#"{"status":"SUCCESS"}"#)
            } else {
                Canned::json(200, r#"{"pairingCode":"ABCD1234","code":"2@x","count":1}"#)
            }
        });
        let phone = Phone::parse("5511987654321").unwrap();
        assert!(matches!(
            client(&server).pair("p", &phone).unwrap(),
            ConnectOutcome::Qr(_)
        ));
        let paths: Vec<String> = server.requests().into_iter().map(|r| r.path).collect();
        let connect = paths
            .iter()
            .position(|p| p.starts_with("/instance/connect/"))
            .unwrap();
        assert_eq!(
            states.load(std::sync::atomic::Ordering::SeqCst),
            4,
            "{paths:?}"
        );
        assert_eq!(connect, paths.len() - 1, "{paths:?}");
    }

    /// A server error quoting the number back never carries it into the message evoq stores.
    #[test]
    fn an_error_quoting_the_number_is_redacted() {
        let server = TestServer::start(|r| {
            if r.path.starts_with("/instance/connectionState/") {
                Canned::json(200, r#"{"instance":{"instanceName":"p","state":"close"}}"#)
            } else if r.method == "DELETE" {
                Canned::json(200, r#"{"status":"SUCCESS"}"#)
            } else if r.method == "POST" {
                Canned::json(400, &envelope(400, "invalid number 5511987654321"))
            } else {
                Canned::json(500, &envelope(500, "cannot pair 5511987654321"))
            }
        });
        let phone = Phone::parse("5511987654321").unwrap();
        let c = client(&server);
        let e = c.pair("p", &phone).unwrap_err();
        assert!(!e.message.contains("987654"), "{}", e.message);
        assert!(e.message.contains("[number]"), "{}", e.message);
        let e = c
            .provision_with_number(ApiVersion::V2, "p", None, Some(&phone))
            .unwrap_err();
        assert!(!e.message.contains("987654"), "{}", e.message);
        let sent = server
            .requests()
            .into_iter()
            .find(|r| r.method == "POST")
            .unwrap();
        let body: serde_json::Value = serde_json::from_str(&sent.body).unwrap();
        assert_eq!(body["number"], "5511987654321");
    }

    #[test]
    fn only_the_servers_instance_does_not_exist_means_lost() {
        let server = TestServer::start(|r| {
            if r.path.ends_with("/gone") {
                Canned::json(404, &envelope(404, "The \"gone\" instance does not exist"))
            } else {
                Canned::json(404, &envelope(404, "Cannot GET /evo/instance/connect/x"))
            }
        });
        let c = client(&server);
        assert_eq!(c.connect("gone").unwrap(), ConnectOutcome::Lost);
        let e = c.connect("x").unwrap_err();
        assert_eq!(
            (e.kind, e.class().as_str()),
            (ErrorKind::Permanent, "http_404")
        );
        assert!(e.message.contains("check api_url"), "{}", e.message);
    }

    #[test]
    fn server_text_is_bounded_and_cleaned() {
        let server = TestServer::start(|_| {
            Canned::json(
                400,
                &envelope(400, &format!("bad\u{0}\n{}", "word ".repeat(5000))),
            )
        });
        let e = client(&server).connect("x").unwrap_err();
        assert!(e.message.chars().count() <= crate::evolution::MAX_MESSAGE_CHARS);
        assert!(e
            .message
            .starts_with("Evolution API answered 400 to GET /instance/connect: bad word word"));
        assert!(!e.message.contains('\0') && !e.message.contains('\n'));
    }

    #[test]
    fn settings_no_request_can_be_built_from_are_permanent_and_server_wide() {
        let server = TestServer::start(|_| Canned::json(200, r#"{"count":0}"#));
        let e = client_for(&format!("{}/a b", server.url), 2000)
            .connect("x")
            .unwrap_err();
        assert_eq!(
            (e.kind, e.server_wide, e.class().as_str()),
            (ErrorKind::Permanent, true, "wrong_api_url"),
            "{e:?}"
        );
        assert!(e.message.contains("check api_url"), "{}", e.message);
        // A key no header can carry (a pasted line break).
        let c = Client::new(ClientConfig {
            base_url: server.url.clone(),
            api_key: "sk-pasted\nkey".into(),
            request_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            max_idle: 1,
            other_secrets: Vec::new(),
        });
        let e = c.connect("x").unwrap_err();
        assert_eq!(
            (e.kind, e.server_wide, e.class().as_str()),
            (ErrorKind::Permanent, true, "settings"),
            "{e:?}"
        );
        assert!(e.message.contains("api_key"), "{}", e.message);
        assert!(server.requests().is_empty());
    }

    #[test]
    fn url_credentials_are_secrets() {
        assert_eq!(
            url_secrets("https://user:pw@host:1/x"),
            vec!["user:pw".to_string(), "pw".to_string()]
        );
        assert!(url_secrets("https://host/a@b").is_empty());
    }
}
