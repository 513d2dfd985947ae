//! A running postgrest-standin and an HTTP client for it, shared by the fake-psql tests
//! (postgrest.rs) and the real-PostgreSQL ones (postgrest_pg.rs).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

/// A running stand-in; killed on drop.
pub struct Standin {
    child: Child,
    pub base: String,
}

impl Standin {
    /// Starts `postgrest-standin --port 0 <args>` and waits for its "listening" line.
    pub fn start(args: &[&str]) -> Standin {
        let mut child = Command::new(env!("CARGO_BIN_EXE_postgrest-standin"))
            .args(["--port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let base = line
            .trim()
            .strip_prefix("postgrest-standin listening on ")
            .unwrap_or_else(|| panic!("first line: {line:?}"))
            .to_string();
        Standin { child, base }
    }

    /// POSTs a JSON body (Content-Type: application/json unless `headers` set one).
    pub fn post(&self, path: &str, body: &str, headers: &[(&str, &str)]) -> Resp {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // PGRST203 is a 300: a reply to read, not a redirect to follow.
            .max_redirects(0)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let mut req = agent.post(format!("{}{path}", self.base));
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            req = req.header("Content-Type", "application/json");
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let mut r = req.send(body).unwrap();
        Resp {
            status: r.status().as_u16(),
            content_type: header(&r, "content-type"),
            www_authenticate: header(&r, "www-authenticate"),
            body: r.body_mut().read_to_string().unwrap(),
        }
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn header(r: &ureq::http::Response<ureq::Body>, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

pub struct Resp {
    pub status: u16,
    pub content_type: Option<String>,
    pub www_authenticate: Option<String>,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|_| panic!("not JSON: {}", self.body))
    }
}

fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// `Bearer <jwt>` with these claims and a signature nobody checks (the stand-in does not).
pub fn bearer(claims: &Value) -> String {
    format!(
        "Bearer {}.{}.unchecked-signature",
        b64url(json!({"alg": "HS256", "typ": "JWT"}).to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    )
}
