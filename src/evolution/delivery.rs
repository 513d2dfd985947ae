//! Webhook deliveries: what an Evolution API server POSTs to the URL evoq registers, read into
//! what evoq acts on (contract section 4). Both versions use one envelope:
//! `{"event", "instance", "data", "destination", "date_time", "sender", "server_url", "apikey"}`.
//!
//! Like replies, a delivery is data from outside: every value goes through the bounded field
//! functions of `reply.rs` (NUL removed, lengths bounded), so nothing in it can make the
//! statement that applies it fail.

use super::reply::{bounded_text, id_field, parse_qr, word_field, Qr};
use super::request::{SECRET_HEADER, SECRET_PARAM};
use serde_json::Value;

/// The largest delivery evoq_webhook reads. A QR delivery is 10-30 KB; 1 MiB leaves room for
/// the app's events (a message with a caption), and refuses what can only be abuse.
pub const MAX_DELIVERY_BYTES: usize = 1024 * 1024;
/// A phone number: at most 32 digits are kept.
const MAX_NUMBER_DIGITS: usize = 32;
/// A WhatsApp profile name.
const MAX_PROFILE_NAME_CHARS: usize = 256;
/// The `date_time` field, an ISO 8601 timestamp.
const MAX_TIMESTAMP_CHARS: usize = 40;

/// The connection states `connection.update` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connection {
    Connecting,
    Open,
    Close,
    Refused,
}

/// What a delivery says happened to an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `qrcode.updated` with a QR: the server's current QR.
    NewQr(Qr),
    /// `qrcode.updated` with the QR-limit message: the server gave up issuing QRs.
    QrLimit,
    /// `connection.update`.
    Connection {
        state: Connection,
        /// `statusReason`: 200, or why it closed (401 logged out, 428 QR limit...).
        status_reason: Option<i64>,
        /// The owner's number (digits of `wuid`), on `open` (v2 only).
        number: Option<String>,
        profile_name: Option<String>,
    },
    /// `logout.instance`: the session ended.
    LoggedOut,
    /// `remove.instance` / `instance.delete`: the instance no longer exists on the server.
    Removed,
    /// An event evoq does not consume (`messages.upsert`, ...): the application's.
    Other,
    /// A known event without what evoq needs (`connection.update` with no state): nothing to do.
    Incomplete(&'static str),
}

/// One delivery, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// As sent: dotted lower case (`qrcode.updated`); upper case with `_` is accepted too.
    pub event: String,
    pub instance: String,
    pub change: Change,
    /// `date_time`, only when it is a plain ISO 8601 timestamp. The server's local time
    /// labelled as UTC: right only when the server runs in UTC, but always comparable between
    /// deliveries of one server, which is all evoq uses it for (a late delivery never undoes a
    /// newer one).
    pub sent_at: Option<String>,
    /// `destination`: the URL the server posted to (v1.8 carries the secret in it).
    pub destination: Option<String>,
}

/// A payload that is not an Evolution API delivery at all: the caller's mistake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryError {
    NotAnObject,
    NoEvent,
    NoInstance,
}

impl DeliveryError {
    pub fn message(&self) -> &'static str {
        match self {
            DeliveryError::NotAnObject => "the webhook payload is not a JSON object",
            DeliveryError::NoEvent => "the webhook payload has no \"event\"",
            DeliveryError::NoInstance => "the webhook payload names no \"instance\"",
        }
    }
}

/// The secret in a destination URL's query (`...?evoq_secret=...`), if any.
pub fn secret_in_url(url: &str) -> Option<&str> {
    let query = url.split_once('?')?.1.split('#').next()?;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == SECRET_PARAM && !v.is_empty()).then_some(v)
    })
}

/// The secret header in PostgREST's `request.headers` (a JSON object, names in lower case).
pub fn header_secret(headers: &str) -> Option<String> {
    let v: Value = serde_json::from_str(headers).ok()?;
    v.get(SECRET_HEADER)?.as_str().map(str::to_string)
}

/// Compares without stopping at the first difference: how long a refusal takes says nothing
/// about how much of a guess was right.
pub fn same_secret(given: &str, expected: &str) -> bool {
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    let mut diff = a.len() ^ b.len();
    for (i, x) in b.iter().enumerate() {
        diff |= (a.get(i).copied().unwrap_or(0) ^ x) as usize;
    }
    diff == 0
}

/// A plain ISO 8601 timestamp (`2026-11-24T07:39:12.956Z`, an offset allowed), so the SQL
/// that compares it can cast it without failing.
fn timestamp_field(v: &Value, key: &str) -> Option<String> {
    let s = bounded_text(v, key, MAX_TIMESTAMP_CHARS)?;
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| r.clone().all(|i| b.get(i).is_some_and(u8::is_ascii_digit));
    let shape = b.len() >= 19
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19);
    if !shape {
        return None;
    }
    let rest = &s[19..];
    let rest = match rest.strip_prefix('.') {
        Some(r) => {
            let n = r.bytes().take_while(u8::is_ascii_digit).count();
            if n == 0 || n > 6 {
                return None;
            }
            &r[n..]
        }
        None => rest,
    };
    let zone_ok = rest == "Z"
        || (rest.len() == 6
            && matches!(rest.as_bytes()[0], b'+' | b'-')
            && rest.as_bytes()[3] == b':'
            && rest
                .bytes()
                .enumerate()
                .all(|(i, c)| i == 0 || i == 3 || c.is_ascii_digit()));
    zone_ok.then_some(s)
}

/// The digits of a WhatsApp id (`5511999990000:12@s.whatsapp.net` → `5511999990000`).
fn number_from_jid(jid: &str) -> Option<String> {
    let user = jid.split('@').next()?.split(':').next()?;
    (!user.is_empty()
        && user.len() <= MAX_NUMBER_DIGITS
        && user.bytes().all(|b| b.is_ascii_digit()))
    .then(|| user.to_string())
}

fn connection_change(data: &Value) -> Change {
    let state = match word_field(data, "state").as_deref() {
        Some("connecting") => Connection::Connecting,
        Some("open") => Connection::Open,
        Some("close") => Connection::Close,
        Some("refused") => Connection::Refused,
        Some(_) => return Change::Incomplete("an unknown connection state"),
        None => return Change::Incomplete("no connection state"),
    };
    let status_reason = data.get("statusReason").and_then(Value::as_i64);
    let open = state == Connection::Open;
    Change::Connection {
        state,
        status_reason,
        number: open
            .then(|| bounded_text(data, "wuid", 128).and_then(|j| number_from_jid(&j)))
            .flatten(),
        profile_name: open
            .then(|| bounded_text(data, "profileName", MAX_PROFILE_NAME_CHARS))
            .flatten(),
    }
}

fn qr_change(data: &Value) -> Change {
    if let Some(qr) = data.get("qrcode").filter(|q| q.is_object()) {
        let qr = parse_qr(qr);
        // A delivery carries no counter; the QR itself is what counts.
        return if qr.is_present() {
            Change::NewQr(Qr { count: None, ..qr })
        } else {
            Change::Incomplete("a qrcode without code or image")
        };
    }
    let message = bounded_text(data, "message", 512).unwrap_or_default();
    if message.to_ascii_lowercase().contains("limit") {
        Change::QrLimit
    } else {
        Change::Incomplete("no qrcode")
    }
}

/// Reads one delivery. Errors are payloads that are not deliveries; a delivery that is merely
/// of no use to evoq is `Change::Other` or `Change::Incomplete`.
pub fn parse_delivery(payload: &Value) -> Result<Delivery, DeliveryError> {
    if !payload.is_object() {
        return Err(DeliveryError::NotAnObject);
    }
    let event = word_field(payload, "event").ok_or(DeliveryError::NoEvent)?;
    let data = payload.get("data").cloned().unwrap_or(Value::Null);
    // `instance` is the name; some deliveries also carry it in data (instance.delete).
    let instance = id_field(payload, "instance")
        .or_else(|| id_field(&data, "instanceName"))
        .ok_or(DeliveryError::NoInstance)?;
    // QRCODE_UPDATED and qrcode.updated name the same event (the server's own matching).
    let normalized = event.to_ascii_lowercase().replace('_', ".");
    let change = match normalized.as_str() {
        "qrcode.updated" => qr_change(&data),
        "connection.update" => connection_change(&data),
        "logout.instance" => Change::LoggedOut,
        "remove.instance" | "instance.delete" => Change::Removed,
        _ => Change::Other,
    };
    Ok(Delivery {
        event: normalized,
        instance,
        change,
        sent_at: timestamp_field(payload, "date_time"),
        destination: bounded_text(payload, "destination", 2048),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn envelope(event: &str, data: Value) -> Value {
        json!({"event": event, "instance": "evoq_ns_1", "data": data,
               "destination": "https://db.example/rest/v1/rpc/evoq_webhook",
               "date_time": "2026-11-24T07:39:12.956Z", "server_url": "http://evo:8080", "apikey": null})
    }

    #[test]
    fn a_new_qr() {
        let d = parse_delivery(&envelope(
            "qrcode.updated",
            json!({"qrcode": {"instance": "evoq_ns_1", "pairingCode": null, "code": "2@abc",
                              "base64": "data:image/png;base64,iVBO"}}),
        ))
        .unwrap();
        assert_eq!(d.instance, "evoq_ns_1");
        assert_eq!(d.sent_at.as_deref(), Some("2026-11-24T07:39:12.956Z"));
        match d.change {
            Change::NewQr(qr) => {
                assert_eq!(qr.code.as_deref(), Some("2@abc"));
                assert_eq!(qr.base64.as_deref(), Some("data:image/png;base64,iVBO"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_qr_limit() {
        let d = parse_delivery(&envelope(
            "qrcode.updated",
            json!({"message": "QR code limit reached, please login again", "statusCode": 500}),
        ))
        .unwrap();
        assert_eq!(d.change, Change::QrLimit);
    }

    #[test]
    fn connection_updates_of_both_versions() {
        let open = parse_delivery(&envelope(
            "connection.update",
            json!({"instance": "evoq_ns_1", "wuid": "5511999990000:3@s.whatsapp.net",
                   "profileName": "Ana", "profilePictureUrl": null, "state": "open", "statusReason": 200}),
        ))
        .unwrap();
        assert_eq!(
            open.change,
            Change::Connection {
                state: Connection::Open,
                status_reason: Some(200),
                number: Some("5511999990000".into()),
                profile_name: Some("Ana".into()),
            }
        );
        // v1.8: no profile fields.
        let v1 = parse_delivery(
            &json!({"event": "connection.update", "instance": "evoq_ns_1",
            "data": {"instance": "evoq_ns_1", "state": "close", "statusReason": 408}}),
        )
        .unwrap();
        assert_eq!(
            v1.change,
            Change::Connection {
                state: Connection::Close,
                status_reason: Some(408),
                number: None,
                profile_name: None
            }
        );
        assert_eq!(v1.sent_at, None);
        let refused = parse_delivery(&envelope(
            "CONNECTION_UPDATE",
            json!({"instance": "evoq_ns_1", "state": "refused", "statusReason": 428, "wuid": null}),
        ))
        .unwrap();
        assert_eq!(refused.event, "connection.update");
        assert!(matches!(
            refused.change,
            Change::Connection {
                state: Connection::Refused,
                ..
            }
        ));
    }

    #[test]
    fn removal_logout_and_the_apps_events() {
        let kind =
            |event: &str, data: Value| parse_delivery(&envelope(event, data)).unwrap().change;
        assert_eq!(kind("logout.instance", Value::Null), Change::LoggedOut);
        assert_eq!(kind("remove.instance", Value::Null), Change::Removed);
        assert_eq!(
            kind(
                "instance.delete",
                json!({"instanceName": "evoq_ns_1", "instanceId": "x"})
            ),
            Change::Removed
        );
        assert_eq!(kind("messages.upsert", json!({"key": {}})), Change::Other);
        assert_eq!(kind("no.such.event", Value::Null), Change::Other);
    }

    #[test]
    fn known_events_without_their_fields_change_nothing() {
        let kind =
            |event: &str, data: Value| parse_delivery(&envelope(event, data)).unwrap().change;
        assert!(matches!(
            kind("connection.update", json!({})),
            Change::Incomplete(_)
        ));
        assert!(matches!(
            kind("connection.update", json!({"state": "weird"})),
            Change::Incomplete(_)
        ));
        assert!(matches!(
            kind("qrcode.updated", json!({"qrcode": {}})),
            Change::Incomplete(_)
        ));
        assert!(matches!(
            kind("qrcode.updated", Value::Null),
            Change::Incomplete(_)
        ));
        // A QR image that is not an image is not taken.
        assert!(matches!(
            kind(
                "qrcode.updated",
                json!({"qrcode": {"base64": "javascript:alert(1)"}})
            ),
            Change::Incomplete(_)
        ));
    }

    #[test]
    fn what_is_not_a_delivery() {
        assert_eq!(parse_delivery(&json!([1])), Err(DeliveryError::NotAnObject));
        assert_eq!(parse_delivery(&json!("x")), Err(DeliveryError::NotAnObject));
        assert_eq!(
            parse_delivery(&json!({"instance": "a"})),
            Err(DeliveryError::NoEvent)
        );
        assert_eq!(
            parse_delivery(&json!({"event": "x"})),
            Err(DeliveryError::NoInstance)
        );
        assert_eq!(
            parse_delivery(&json!({"event": "x", "instance": "a\u{0}"}))
                .unwrap()
                .instance,
            "a"
        );
        // An instance name longer than any server allows is no name.
        assert_eq!(
            parse_delivery(&json!({"event": "x", "instance": "a".repeat(300)})),
            Err(DeliveryError::NoInstance)
        );
    }

    #[test]
    fn only_plain_timestamps_are_kept() {
        let at = |t: &str| timestamp_field(&json!({"t": t}), "t");
        assert!(at("2026-11-24T07:39:12.956Z").is_some());
        assert!(at("2026-11-24T07:39:12Z").is_some());
        assert!(at("2026-11-24T07:39:12.956+03:00").is_some());
        assert_eq!(at("2026-11-24 07:39:12"), None);
        assert_eq!(at("2026-11-24T07:39:12.Z"), None);
        assert_eq!(at("2026-11-24T07:39:12.956Z'; DROP TABLE x; --"), None);
        assert_eq!(at("yesterday"), None);
    }

    #[test]
    fn the_secret_in_a_destination() {
        assert_eq!(secret_in_url("https://h/hook?evoq_secret=abc"), Some("abc"));
        assert_eq!(
            secret_in_url("https://h/hook?a=1&evoq_secret=abc#f"),
            Some("abc")
        );
        assert_eq!(secret_in_url("https://h/hook?evoq_secret="), None);
        assert_eq!(secret_in_url("https://h/hook"), None);
        assert_eq!(secret_in_url("https://h/hook?xevoq_secret=abc"), None);
    }

    #[test]
    fn numbers_from_jids() {
        assert_eq!(
            number_from_jid("5511999990000@s.whatsapp.net").as_deref(),
            Some("5511999990000")
        );
        assert_eq!(
            number_from_jid("5511999990000:12@s.whatsapp.net").as_deref(),
            Some("5511999990000")
        );
        assert_eq!(number_from_jid("abc@s.whatsapp.net"), None);
        assert_eq!(number_from_jid(""), None);
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abd", "abc"));
        assert!(!same_secret("ab", "abc"));
        assert!(!same_secret("abcd", "abc"));
        assert!(!same_secret("", "abc"));
    }

    #[test]
    fn the_secret_header_from_postgrest() {
        assert_eq!(
            header_secret(r#"{"x-evoq-secret": "s", "apikey": "k"}"#).as_deref(),
            Some("s")
        );
        assert_eq!(header_secret(r#"{"apikey": "k"}"#), None);
        assert_eq!(header_secret("not json"), None);
    }
}
