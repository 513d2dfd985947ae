//! The Evolution API client: request bodies, reply parsing, errors and the HTTP calls.
//!
//! Nothing in here touches Postgres (no pgrx import): the worker threads run this code, and
//! plain `cargo test` covers it. The contract it follows is `shared/evolution-api.md`.

mod client;
mod error;
mod reply;
mod request;

pub use client::{Client, ClientConfig, Provisioned};
pub use error::{ApiError, ErrorKind};
pub use reply::{
    envelope_message, parse_connect_reply, parse_create_reply, parse_fetch_instance, parse_version,
};
pub use reply::{ConnectOutcome, CreatedInstance, Qr};
pub use request::{connect_path, create_body, webhook_set_body, Webhook};

/// The two body dialects of the Evolution API. v1.8 is snake_case and flat; v2 is camelCase with
/// a nested webhook object. `GET /` tells which one a server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiVersion {
    V1,
    V2,
}

impl ApiVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            ApiVersion::V1 => "v1",
            ApiVersion::V2 => "v2",
        }
    }
}
