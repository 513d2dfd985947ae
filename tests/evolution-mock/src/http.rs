//! The thin layer over tiny_http: reply values, sending them, and closing a connection
//! without a reply (which tiny_http itself cannot do).

use serde_json::{json, Value};
use tiny_http::{Header, Request, Response, StatusCode};

/// What a handler decided to send.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Body,
}

#[derive(Debug, Clone)]
pub enum Body {
    Json(Value),
    /// Raw text sent with a JSON content type (the `garbage` fault).
    RawJson(String),
    Empty,
}

impl Reply {
    pub fn json(status: u16, body: Value) -> Reply {
        Reply {
            status,
            body: Body::Json(body),
        }
    }

    /// Evolution's error envelope; `message` is an array, an array of arrays, or a string
    /// depending on where the error came from (see the contract, section 2.3).
    pub fn error(status: u16, message: Value) -> Reply {
        Reply::json(
            status,
            json!({"status": status, "error": reason(status), "response": {"message": message}}),
        )
    }

    /// An exception thrown by the server itself: message is an array of strings.
    pub fn thrown(status: u16, msg: impl Into<String>) -> Reply {
        Reply::error(status, json!([msg.into()]))
    }

    /// A JSON-schema validation failure: the router wraps the message list once more.
    pub fn schema(msgs: Vec<String>) -> Reply {
        Reply::error(400, json!([msgs]))
    }

    /// A JavaScript crash (TypeError etc.): a plain string under HTTP 500.
    pub fn crash(msg: impl Into<String>) -> Reply {
        Reply::error(500, json!(msg.into()))
    }

    pub fn unauthorized() -> Reply {
        Reply::error(401, json!("Unauthorized"))
    }
}

/// HTTP reason phrase, as Express puts it in the envelope's `error` field.
pub fn reason(status: u16) -> &'static str {
    StatusCode(status).default_reason_phrase()
}

/// Sends the reply; errors mean the client went away, which is not the mock's problem.
pub fn send(request: Request, reply: &Reply) {
    let json_type = Header::from_bytes(
        &b"Content-Type"[..],
        &b"application/json; charset=utf-8"[..],
    )
    .expect("static header");
    let data = match &reply.body {
        Body::Json(v) => v.to_string().into_bytes(),
        Body::RawJson(s) => s.clone().into_bytes(),
        Body::Empty => Vec::new(),
    };
    let mut response = Response::from_data(data).with_status_code(reply.status);
    if !matches!(reply.body, Body::Empty) {
        response = response.with_header(json_type);
    }
    let _ = request.respond(response);
}

/// Closes the client's connection without writing a byte.
///
/// tiny_http answers 500 when a `Request` is dropped unanswered and never exposes the socket,
/// so we find the socket among our own file descriptors by its address pair and shut it down.
/// The descriptor stays owned (and later closed) by tiny_http.
pub fn close_without_reply(request: Request, server_port: u16) {
    let peer = request.remote_addr().copied();
    // Taking the writer marks the request as answered, so dropping it writes nothing.
    let writer = request.into_writer();
    if let Some(peer) = peer {
        shutdown_socket(peer, server_port);
    }
    drop(writer);
}

#[cfg(target_os = "linux")]
fn shutdown_socket(peer: std::net::SocketAddr, server_port: u16) {
    use std::mem::ManuallyDrop;
    use std::net::{Shutdown, TcpStream};
    use std::os::fd::FromRawFd;

    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    for entry in dir.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: the stream is never dropped (ManuallyDrop), so the descriptor is not closed;
        // getpeername/getsockname on a non-socket or a foreign socket merely fail or mismatch,
        // and we only shut down the one TCP connection whose address pair is this request's.
        let stream = ManuallyDrop::new(unsafe { TcpStream::from_raw_fd(fd) });
        let same_peer = stream.peer_addr().map(|a| a == peer).unwrap_or(false);
        let same_local = stream
            .local_addr()
            .map(|a| a.port() == server_port)
            .unwrap_or(false);
        if same_peer && same_local {
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn shutdown_socket(_peer: std::net::SocketAddr, _server_port: u16) {
    // Without /proc the connection simply stays silent until the client gives up.
}
