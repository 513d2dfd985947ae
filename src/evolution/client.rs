//! The HTTP calls. One `Client` per run: its ureq agent is shared by the worker threads and
//! keeps connections alive between calls.

use super::reply::{
    envelope_message, parse_connect_reply, parse_create_reply, parse_fetch_instance, parse_version,
};
use super::request::{connect_path, create_body, path_segment, webhook_set_body};
use super::{ApiError, ApiVersion, ConnectOutcome, CreatedInstance, Webhook};
use std::time::Duration;
use ureq::http::Response;
use ureq::{Agent, Body};

#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Base URL without a trailing slash, e.g. `http://evolution:8080`.
    pub base_url: String,
    pub api_key: String,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// Idle keep-alive connections to keep: one per worker thread.
    pub max_idle: usize,
}

#[derive(Clone)]
pub struct Client {
    agent: Agent,
    base_url: String,
    api_key: String,
    request_timeout: Duration,
}

/// The base URL as it may appear in a message: any `user:password@` part is cut out.
fn display_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            if path.is_empty() {
                format!("{scheme}://{host}")
            } else {
                format!("{scheme}://{host}/{path}")
            }
        }
        None => url.to_string(),
    }
}

impl Client {
    pub fn new(config: ClientConfig) -> Client {
        let agent: Agent = Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(config.request_timeout))
            .timeout_connect(Some(config.connect_timeout))
            // A redirect would carry the apikey header to wherever it points.
            .max_redirects(0)
            .max_idle_connections(config.max_idle.max(1) * 2)
            .max_idle_connections_per_host(config.max_idle.max(1))
            .user_agent("evoq/0.1")
            .build()
            .into();
        Client {
            agent,
            base_url: config.base_url.trim_end_matches('/').to_string(),
            api_key: config.api_key,
            request_timeout: config.request_timeout,
        }
    }

    fn transport_error(&self, what: &str, err: ureq::Error) -> ApiError {
        let url = display_url(&self.base_url);
        match err {
            ureq::Error::Timeout(ureq::Timeout::Connect | ureq::Timeout::Resolve) => {
                ApiError::unreachable(format!(
                    "could not connect to the Evolution API at {url} in time ({what})"
                ))
            }
            ureq::Error::Timeout(_) => ApiError::transient(format!(
                "the Evolution API at {url} did not answer {what} within {} ms",
                self.request_timeout.as_millis()
            )),
            ureq::Error::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                ApiError::unreachable(format!(
                    "could not connect to the Evolution API at {url}: connection refused ({what})"
                ))
            }
            ureq::Error::HostNotFound => ApiError::unreachable(format!(
                "could not resolve the Evolution API host of {url} ({what})"
            )),
            ureq::Error::ConnectionFailed => ApiError::unreachable(format!(
                "could not connect to the Evolution API at {url} ({what})"
            )),
            ureq::Error::Io(e) => {
                ApiError::transient(format!("{what} to {url} failed: {}", e.kind()))
            }
            other => ApiError::transient(format!("{what} to {url} failed: {other}")),
        }
    }

    /// Sends one request and returns the status and the body text.
    /// `what` names the route in messages ("GET /instance/connect"), without the instance name
    /// that the row already carries.
    fn call(
        &self,
        method: &str,
        path: &str,
        what: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(u16, String), ApiError> {
        let url = format!("{}{}", self.base_url, path);
        let result: Result<Response<Body>, ureq::Error> = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("apikey", &self.api_key).call(),
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
        let mut response = result.map_err(|e| self.transport_error(what, e))?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(16 * 1024 * 1024)
            .read_to_string()
            .map_err(|e| match e {
                ureq::Error::Timeout(_) | ureq::Error::Io(_) => self.transport_error(what, e),
                _ => ApiError::malformed(what, "the body is not readable text"),
            })?;
        Ok((status, text))
    }

    fn expect_success(status: u16, body: &str, what: &str) -> Result<(), ApiError> {
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(ApiError::http(status, what, envelope_message(body)))
        }
    }

    /// `GET /`: which dialect the server speaks.
    pub fn probe_version(&self) -> Result<ApiVersion, ApiError> {
        let (status, body) = self.call("GET", "/", "GET /", None)?;
        Self::expect_success(status, &body, "GET /")?;
        parse_version(&body)
    }

    /// Creates the instance, or adopts it when the name is already taken (403): evoq names are
    /// derived from the user id, so a taken name is our own earlier attempt whose answer was lost.
    pub fn provision(
        &self,
        version: ApiVersion,
        name: &str,
        webhook: Option<&Webhook>,
    ) -> Result<Provisioned, ApiError> {
        const WHAT: &str = "POST /instance/create";
        let (status, body) = self.call(
            "POST",
            "/instance/create",
            WHAT,
            Some(&create_body(version, name, webhook)),
        )?;
        if status == 403 {
            return self
                .adopt(version, name, webhook)
                .map(|instance| Provisioned {
                    instance,
                    adopted: true,
                });
        }
        Self::expect_success(status, &body, WHAT)?;
        Ok(Provisioned {
            instance: parse_create_reply(&body, name)?,
            adopted: false,
        })
    }

    fn adopt(
        &self,
        version: ApiVersion,
        name: &str,
        webhook: Option<&Webhook>,
    ) -> Result<CreatedInstance, ApiError> {
        const WHAT: &str = "GET /instance/fetchInstances";
        let path = format!(
            "/instance/fetchInstances?instanceName={}",
            path_segment(name)
        );
        let (status, body) = self.call("GET", &path, WHAT, None)?;
        if status == 404 {
            // The name was taken a moment ago but the server has since dropped it (a failed
            // create is cleaned up asynchronously): the next attempt can create it afresh.
            return Err(ApiError::transient(format!(
                "instance {name:?} was reported in use, then not found; it will be created on the next attempt"
            )));
        }
        Self::expect_success(status, &body, WHAT)?;
        let instance = parse_fetch_instance(&body, name)?;
        if let Some(hook) = webhook {
            // The adopted instance may carry an older webhook: set ours.
            let what = "POST /webhook/set";
            let path = format!("/webhook/set/{}", path_segment(name));
            let (status, body) =
                self.call("POST", &path, what, Some(&webhook_set_body(version, hook)))?;
            Self::expect_success(status, &body, what)?;
        }
        Ok(instance)
    }

    /// `GET /instance/connect/{name}`: the current QR, or `open` once the user has scanned it.
    pub fn connect(&self, name: &str) -> Result<ConnectOutcome, ApiError> {
        const WHAT: &str = "GET /instance/connect";
        let (status, body) = self.call("GET", &connect_path(name), WHAT, None)?;
        if status == 404 {
            return Ok(ConnectOutcome::Lost);
        }
        Self::expect_success(status, &body, WHAT)?;
        parse_connect_reply(&body)
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
    use super::*;

    #[test]
    fn credentials_never_reach_a_message() {
        assert_eq!(
            display_url("https://user:secret@evo.example:8080/api"),
            "https://evo.example:8080/api"
        );
        assert_eq!(display_url("http://evo:8080"), "http://evo:8080");
    }
}
