//! Reply values and their HTTP form. Closing a connection without a reply is done by the
//! service returning an error, which makes hyper drop the connection unanswered.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::Response;
use serde_json::{json, Value};

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
    hyper::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Unknown")
}

/// The hyper response for a reply.
pub fn to_response(reply: &Reply) -> Response<Full<Bytes>> {
    let data = match &reply.body {
        Body::Json(v) => v.to_string().into_bytes(),
        Body::RawJson(s) => s.clone().into_bytes(),
        Body::Empty => Vec::new(),
    };
    let mut builder = Response::builder().status(reply.status);
    if !matches!(reply.body, Body::Empty) {
        builder = builder.header("Content-Type", "application/json; charset=utf-8");
    }
    builder
        .body(Full::new(Bytes::from(data)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}
