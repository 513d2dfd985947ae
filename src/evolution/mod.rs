//! The Evolution API client: request bodies, reply parsing, errors, the HTTP calls, and the
//! checks of the connection settings.
//!
//! Nothing in here touches Postgres (no pgrx import): the worker threads run this code, and
//! plain `cargo test` covers it. The contract it follows is the Evolution API contract
//! (docs/evolution-api.md).

mod client;
mod config;
mod delivery;
mod error;
mod listing;
mod reply;
mod request;
mod resolver;
#[cfg(test)]
mod test_server;

pub use client::{Client, ClientConfig, Provisioned, MAX_REPLY_BYTES};
pub use config::{
    check_events, check_headers, check_url, mask_credentials, ConfigError, KNOWN_EVENTS,
};
pub use delivery::{
    header_secret, parse_delivery, same_secret, secret_in_url, Change, Connection, Delivery,
    DeliveryError, MAX_DELIVERY_BYTES,
};
pub use error::{ApiError, ErrorClass, ErrorKind, MAX_MESSAGE_CHARS, REDACTED};
pub use listing::{ListedInstance, MAX_LISTING_BYTES};
pub use reply::{
    envelope_message, parse_connect_reply, parse_create_reply, parse_fetch_instance, parse_version,
};
pub use reply::{ConnectOutcome, CreatedInstance, LiveState, Qr, Removal};
pub use reply::{MAX_ID_CHARS, MAX_PAIRING_CODE_CHARS, MAX_QR_CODE_CHARS, MAX_QR_IMAGE_BYTES};
pub use request::{
    connect_path, create_body, instance_path, webhook_set_body, Webhook, SECRET_HEADER,
    SECRET_PARAM,
};

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
