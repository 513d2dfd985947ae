//! One error type for every way a call to the Evolution API can go wrong, classified for the
//! retry policy. Messages are written for operators: they carry the API's own words from the
//! error envelope and never a header, a key or a Rust debug dump.

use std::fmt;

/// Whether trying again later can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Network trouble, timeouts, 5xx, 200-with-error, malformed replies: worth retrying.
    Transient,
    /// The server understood and said no (400, 401, 403, 404...): retrying the same request
    /// cannot succeed until someone changes the configuration or the data.
    Permanent,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Transient => "transient",
            ErrorKind::Permanent => "permanent",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub kind: ErrorKind,
    /// The HTTP status when the server answered at all.
    pub http_status: Option<u16>,
    /// True when the failure is about the server as a whole (unreachable, key rejected), so the
    /// rest of a run would fail the same way and should not be attempted.
    pub server_wide: bool,
    pub message: String,
}

impl ApiError {
    pub fn transient(message: impl Into<String>) -> Self {
        ApiError {
            kind: ErrorKind::Transient,
            http_status: None,
            server_wide: false,
            message: message.into(),
        }
    }

    pub fn unreachable(message: impl Into<String>) -> Self {
        ApiError {
            server_wide: true,
            ..ApiError::transient(message)
        }
    }

    pub fn malformed(what: &str, detail: impl fmt::Display) -> Self {
        ApiError::transient(format!("malformed reply to {what}: {detail}"))
    }

    /// An HTTP error status. `api_message` is what the error envelope said, if it said anything.
    pub fn http(status: u16, what: &str, api_message: Option<String>) -> Self {
        let kind = if status >= 500 || status == 408 || status == 429 {
            ErrorKind::Transient
        } else {
            ErrorKind::Permanent
        };
        let detail = api_message.unwrap_or_else(|| "no message".to_string());
        let mut message = format!("Evolution API answered {status} to {what}: {detail}");
        if status == 401 {
            message.push_str(" (check the api_key given to evoq_configure)");
        }
        ApiError {
            kind,
            http_status: Some(status),
            server_wide: status == 401,
            message,
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        assert_eq!(ApiError::http(500, "x", None).kind, ErrorKind::Transient);
        assert_eq!(ApiError::http(503, "x", None).kind, ErrorKind::Transient);
        assert_eq!(ApiError::http(429, "x", None).kind, ErrorKind::Transient);
        assert_eq!(ApiError::http(400, "x", None).kind, ErrorKind::Permanent);
        assert_eq!(ApiError::http(401, "x", None).kind, ErrorKind::Permanent);
        assert!(ApiError::http(401, "x", None).server_wide);
        assert!(!ApiError::http(400, "x", None).server_wide);
    }

    #[test]
    fn message_carries_the_api_words() {
        let e = ApiError::http(
            400,
            "POST /instance/create",
            Some("Invalid integration".into()),
        );
        assert_eq!(
            e.to_string(),
            "Evolution API answered 400 to POST /instance/create: Invalid integration"
        );
    }
}
