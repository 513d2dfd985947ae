//! Parsing the server's replies, in both dialects (contract sections 3.1, 3.2, 3.6, 3.10).
//!
//! Whatever a reply carries ends up in a row, through SQL that must not fail on it: a reply
//! with `\u0000` in a string, or `count: 99999999999`, once made the statement that records a
//! batch fail, and the queue wedged on that batch. So every value is taken from a reply by
//! exactly one of the field functions below, one per kind of value, and never read directly:
//! NUL characters removed, strings bounded, integers clamped into `integer` range.
//! A string over its bound is dropped (None), never cut: a cut token, id or QR is wrong data
//! that looks right, while None is "not given", which every caller already handles.

use super::{ApiError, ApiVersion};
use serde_json::Value;

/// A `data:image/png;base64,...` QR image. A real one is a few KB (a whole create reply with
/// its QR is 10-30 KB); 128 KiB is several times that, yet a batch of 200 rows holds at most
/// 25 MiB of QR images.
pub const MAX_QR_IMAGE_BYTES: usize = 128 * 1024;
/// The raw QR string (`2@...`, about 240 characters).
pub const MAX_QR_CODE_CHARS: usize = 2048;
/// Pairing codes are 8 characters.
pub const MAX_PAIRING_CODE_CHARS: usize = 64;
/// Instance names (v2 stores them in VARCHAR(255)), instance ids (UUIDs) and tokens (UUIDs
/// unless the creator chose one).
pub const MAX_ID_CHARS: usize = 255;
/// Short words: a connection state, a version.
pub const MAX_WORD_CHARS: usize = 64;

/// A QR code as the server hands it out.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Qr {
    /// The `data:image/png;base64,...` URL (at most `MAX_QR_IMAGE_BYTES`).
    pub base64: Option<String>,
    /// The raw code (starts with `2@`).
    pub code: Option<String>,
    pub pairing_code: Option<String>,
    /// How many QRs the server has issued for the instance, within `0..=i32::MAX`.
    pub count: Option<i64>,
}

impl Qr {
    /// `{"count":0}` (no QR yet) parses to a Qr with neither code nor image.
    pub fn is_present(&self) -> bool {
        self.code.is_some() || self.base64.is_some()
    }
}

/// What creating (or adopting) an instance left us with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedInstance {
    pub instance_name: String,
    pub instance_id: Option<String>,
    /// The instance token (`hash` on create, `token` on fetch). Kept private by the caller.
    pub token: Option<String>,
    /// `connecting` or `open`.
    pub status: String,
    pub qr: Option<Qr>,
}

/// What `GET /instance/connectionState/{name}` said (contract 3.3). It reads the server's
/// memory only and never starts a socket, which is why the sweep of open instances uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveState {
    Open,
    Connecting,
    Close,
    /// `{"instance": {"instanceName": "x"}}` with no state: known, but not loaded in memory.
    NotLoaded,
    /// 404 "instance does not exist".
    Lost,
}

/// What a logout or a delete achieved (contract 3.7, 3.8). Both are the goal reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// The server did it now.
    Done,
    /// Nothing to do: not connected (logout), or no such instance (either).
    AlreadyThere,
}

/// What `GET /instance/connect/{name}` said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectOutcome {
    /// The user scanned the code: the instance is connected.
    Open,
    /// A QR (possibly the same one as last time).
    Qr(Qr),
    /// No QR yet; not an error. `count` is the server's QR counter when it gave one
    /// (`{"count":0}` gives `Some(0)`), None when it answered with a state instead.
    NoQrYet { count: Option<i64> },
    /// 404 "instance does not exist": the server no longer knows the instance.
    Lost,
}

// ----------------------------------------------------------------- one function per kind --

/// The base of every string field: a JSON string, NUL removed, not empty, at most `max_chars`.
pub(super) fn bounded_text(v: &Value, key: &str, max_chars: usize) -> Option<String> {
    let s = v.get(key)?.as_str()?;
    let s = if s.contains('\0') {
        s.replace('\0', "")
    } else {
        s.to_string()
    };
    (!s.is_empty() && s.chars().count() <= max_chars).then_some(s)
}

/// Instance names, instance ids, tokens.
pub(super) fn id_field(v: &Value, key: &str) -> Option<String> {
    bounded_text(v, key, MAX_ID_CHARS)
}

/// Connection states, versions: only compared, never stored as they are.
pub(super) fn word_field(v: &Value, key: &str) -> Option<String> {
    bounded_text(v, key, MAX_WORD_CHARS)
}

pub(super) fn qr_code_field(v: &Value, key: &str) -> Option<String> {
    bounded_text(v, key, MAX_QR_CODE_CHARS)
}

/// Only a `data:image/...` URL within `MAX_QR_IMAGE_BYTES`: the app puts this value into an
/// image source as it is.
pub(super) fn qr_image_field(v: &Value, key: &str) -> Option<String> {
    bounded_text(v, key, MAX_QR_IMAGE_BYTES)
        .filter(|s| s.len() <= MAX_QR_IMAGE_BYTES && s.starts_with("data:image/"))
}

pub(super) fn pairing_code_field(v: &Value, key: &str) -> Option<String> {
    bounded_text(v, key, MAX_PAIRING_CODE_CHARS)
}

/// A counter, clamped into `0..=i32::MAX` (the column is an `integer`); huge, negative and
/// fractional numbers included. Not a number: None.
fn count_field(v: &Value, key: &str) -> Option<i64> {
    let n = v.get(key)?;
    let value = if let Some(i) = n.as_i64() {
        i
    } else if n.is_u64() {
        i64::MAX
    } else {
        // Finite by construction (JSON has no NaN); `as` saturates.
        n.as_f64()? as i64
    };
    Some(value.clamp(0, i32::MAX as i64))
}

/// Free text for a message (an envelope's or an error body's words): NUL removed. The client
/// bounds and scrubs the whole message before it leaves.
fn server_words(s: &str) -> String {
    s.replace('\0', "")
}

// --------------------------------------------------------------------------------- parsing --

fn parse_json(body: &str, what: &str) -> Result<Value, ApiError> {
    if body.trim().is_empty() {
        return Err(ApiError::empty_reply(what));
    }
    serde_json::from_str(body).map_err(|_| ApiError::malformed(what, "not JSON"))
}

/// A 200 reply can still be a failure: `{"error": true, "message": ...}` (contract 2.4, 3.2).
fn reject_error_body(v: &Value, what: &str) -> Result<(), ApiError> {
    if v.get("error").and_then(Value::as_bool) == Some(true) {
        let msg = match v.get("message") {
            Some(Value::String(s)) => server_words(s),
            Some(other) => server_words(&other.to_string()),
            None => "no message".into(),
        };
        return Err(ApiError::error_reply(what, &msg));
    }
    Ok(())
}

pub(super) fn parse_qr(v: &Value) -> Qr {
    Qr {
        base64: qr_image_field(v, "base64"),
        code: qr_code_field(v, "code"),
        pairing_code: pairing_code_field(v, "pairingCode"),
        count: count_field(v, "count"),
    }
}

/// The `response.message` of an error envelope (contract 2.3): a string, an array of strings, or
/// an array holding one array (schema validation). Flattened into one line.
pub fn envelope_message(body: &str) -> Option<String> {
    fn collect(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) => out.push(server_words(s)),
            Value::Array(items) => items.iter().for_each(|i| collect(i, out)),
            Value::Null => {}
            other => out.push(server_words(&other.to_string())),
        }
    }
    let v: Value = serde_json::from_str(body).ok()?;
    let message = v
        .get("response")
        .and_then(|r| r.get("message"))
        .or_else(|| v.get("message"))?;
    let mut parts = Vec::new();
    collect(message, &mut parts);
    let joined = parts.join("; ");
    (!joined.trim().is_empty()).then_some(joined)
}

/// What an error reply said: the envelope's message, or else the start of the body as text (a
/// proxy's or firewall's page), or None for an empty body.
pub fn error_words(body: &str) -> Option<String> {
    envelope_message(body).or_else(|| {
        let text: String = server_words(body)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .chars()
            .take(200)
            .collect();
        (!text.is_empty()).then_some(text)
    })
}

/// True for the envelope message of a 403 on create that means "this name is taken" (the real
/// text: `This name "x" is already in use.`), the only 403 that is answered by adoption.
pub fn is_name_in_use(message: &str) -> bool {
    message.to_ascii_lowercase().contains("is already in use")
}

/// True for the message of a 404 that means "no such instance" (`The "x" instance does not
/// exist`; fetchInstances: `Instance "x" not found`), as opposed to a route that does not
/// exist (`Cannot GET /prefix/instance/connect/x`, or a proxy's own 404 page).
pub fn is_instance_missing(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("instance") && (m.contains("does not exist") || m.contains("not found"))
}

/// `GET /`: `{"version": "2.3.6", ...}`.
pub fn parse_version(body: &str) -> Result<ApiVersion, ApiError> {
    let v = parse_json(body, "GET /")?;
    let version = word_field(&v, "version").ok_or_else(|| {
        ApiError::malformed(
            "GET /",
            "no version field; is this an Evolution API server?",
        )
    })?;
    Ok(if version.trim_start_matches('v').starts_with("1.") {
        ApiVersion::V1
    } else {
        ApiVersion::V2
    })
}

/// The 201 reply of `POST /instance/create`.
pub fn parse_create_reply(body: &str, expected_name: &str) -> Result<CreatedInstance, ApiError> {
    const WHAT: &str = "POST /instance/create";
    let v = parse_json(body, WHAT)?;
    reject_error_body(&v, WHAT)?;
    let instance = v
        .get("instance")
        .filter(|i| i.is_object())
        .ok_or_else(|| ApiError::malformed(WHAT, "missing the instance object"))?;
    let name = id_field(instance, "instanceName").unwrap_or_else(|| expected_name.to_string());
    if name != expected_name {
        return Err(ApiError::malformed(
            WHAT,
            format!("it names instance {name:?}, not {expected_name:?}"),
        ));
    }
    // v2: "hash": "<token>"; v1.8: "hash": {"apikey": "<token>"}.
    let token = match v.get("hash") {
        Some(obj @ Value::Object(_)) => id_field(obj, "apikey"),
        Some(_) => id_field(&v, "hash"),
        None => None,
    };
    // v1.8 always says "created"; v2 says the live state. With qrcode:true both are connecting.
    let status = match word_field(instance, "status").as_deref() {
        Some("open") => "open",
        _ => "connecting",
    }
    .to_string();
    // `{"count":0}` (no QR yet) is kept for its count: the row then says 0 QRs so far.
    let qr = v
        .get("qrcode")
        .filter(|q| q.is_object())
        .map(parse_qr)
        .filter(|q| q.is_present() || q.count.is_some());
    Ok(CreatedInstance {
        instance_name: name,
        instance_id: id_field(instance, "instanceId"),
        token,
        status,
        qr,
    })
}

/// `GET /instance/fetchInstances?instanceName=x`: an array of rows (v2) or one
/// `{"instance": {...}}` object (v1.8). Used to adopt an instance whose name was taken.
pub fn parse_fetch_instance(body: &str, name: &str) -> Result<CreatedInstance, ApiError> {
    const WHAT: &str = "GET /instance/fetchInstances";
    let v = parse_json(body, WHAT)?;
    reject_error_body(&v, WHAT)?;
    let items: Vec<&Value> = match &v {
        Value::Array(items) => items.iter().collect(),
        obj @ Value::Object(_) => vec![obj],
        _ => return Err(ApiError::malformed(WHAT, "neither an array nor an object")),
    };
    for item in items {
        // v2 rows are flat (name, id, token, connectionStatus); v1.8 nests them under "instance".
        let (row, name_key, id_key, status_key, token_key) = match item.get("instance") {
            Some(inner) if inner.is_object() => {
                (inner, "instanceName", "instanceId", "status", "apikey")
            }
            _ => (item, "name", "id", "connectionStatus", "token"),
        };
        if id_field(row, name_key).as_deref() != Some(name) {
            continue;
        }
        let status = match word_field(row, status_key).as_deref() {
            Some("open") => "open",
            _ => "connecting",
        };
        return Ok(CreatedInstance {
            instance_name: name.to_string(),
            instance_id: id_field(row, id_key),
            token: id_field(row, token_key).or_else(|| id_field(item, "apikey")),
            status: status.to_string(),
            qr: None,
        });
    }
    Err(ApiError::not_found(format!(
        "instance {name:?} is reported in use but fetchInstances does not list it"
    )))
}

/// `GET /instance/connect/{name}`.
pub fn parse_connect_reply(body: &str) -> Result<ConnectOutcome, ApiError> {
    const WHAT: &str = "GET /instance/connect";
    let v = parse_json(body, WHAT)?;
    reject_error_body(&v, WHAT)?;
    if !v.is_object() {
        return Err(ApiError::malformed(WHAT, "not an object"));
    }
    if let Some(state) = v.get("instance").and_then(|i| word_field(i, "state")) {
        return match state.as_str() {
            "open" => Ok(ConnectOutcome::Open),
            _ => Ok(ConnectOutcome::NoQrYet { count: None }),
        };
    }
    let qr = parse_qr(&v);
    if qr.is_present() {
        Ok(ConnectOutcome::Qr(qr))
    } else if qr.count.is_some() {
        Ok(ConnectOutcome::NoQrYet { count: qr.count })
    } else {
        Err(ApiError::malformed(
            WHAT,
            "neither a QR, a count nor a state",
        ))
    }
}

/// `GET /instance/connectionState/{name}`, a 200 reply: `{"instance": {"instanceName", "state"}}`.
pub fn parse_connection_state(body: &str) -> Result<LiveState, ApiError> {
    const WHAT: &str = "GET /instance/connectionState";
    let v = parse_json(body, WHAT)?;
    reject_error_body(&v, WHAT)?;
    let Some(instance) = v.get("instance").filter(|i| i.is_object()) else {
        return Err(ApiError::malformed(WHAT, "no instance object"));
    };
    Ok(match word_field(instance, "state").as_deref() {
        Some("open") => LiveState::Open,
        Some("connecting") => LiveState::Connecting,
        // `close` and anything else a newer server may say (`refused` only comes by webhook).
        Some(_) => LiveState::Close,
        None => LiveState::NotLoaded,
    })
}

/// True for the 400 of a logout on an instance without a session (`The "x" instance is not
/// connected`): nothing to log out, which is what the caller wanted.
pub fn is_not_connected(message: &str) -> bool {
    message.to_ascii_lowercase().contains("is not connected")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_states() {
        let state = |s: &str| parse_connection_state(s).unwrap();
        assert_eq!(
            state(r#"{"instance":{"instanceName":"t1","state":"open"}}"#),
            LiveState::Open
        );
        assert_eq!(
            state(r#"{"instance":{"instanceName":"t1","state":"close"}}"#),
            LiveState::Close
        );
        assert_eq!(
            state(r#"{"instance":{"instanceName":"t1","state":"connecting"}}"#),
            LiveState::Connecting
        );
        assert_eq!(
            state(r#"{"instance":{"instanceName":"t1"}}"#),
            LiveState::NotLoaded
        );
        assert!(parse_connection_state(r#"{"error":true,"message":"x"}"#).is_err());
        assert!(parse_connection_state("[]").is_err());
        assert!(parse_connection_state("").is_err());
    }

    #[test]
    fn not_connected_is_recognised() {
        assert!(is_not_connected("The \"t2\" instance is not connected"));
        assert!(!is_not_connected(
            "The \"t2\" instance needs to be disconnected"
        ));
    }

    #[test]
    fn envelope_messages_in_all_three_shapes() {
        let s = r#"{"status":401,"error":"Unauthorized","response":{"message":"Unauthorized"}}"#;
        assert_eq!(envelope_message(s).as_deref(), Some("Unauthorized"));
        let a = r#"{"status":404,"error":"Not Found","response":{"message":["The \"nope\" instance does not exist"]}}"#;
        assert_eq!(
            envelope_message(a).as_deref(),
            Some("The \"nope\" instance does not exist")
        );
        let aa = r#"{"status":400,"error":"Bad Request","response":{"message":[["qrcode is not of a type(s) boolean","x"]]}}"#;
        assert_eq!(
            envelope_message(aa).as_deref(),
            Some("qrcode is not of a type(s) boolean; x")
        );
        assert_eq!(envelope_message("<html>"), None);
    }

    #[test]
    fn version_probe() {
        assert_eq!(
            parse_version(r#"{"status":200,"version":"2.3.6"}"#).unwrap(),
            ApiVersion::V2
        );
        assert_eq!(
            parse_version(r#"{"status":200,"version":"1.8.2"}"#).unwrap(),
            ApiVersion::V1
        );
        assert!(parse_version("<html>").is_err());
        assert!(parse_version(r#"{"status":200}"#).is_err());
    }

    #[test]
    fn v2_create_reply_without_qr() {
        let body = r#"{"instance":{"instanceName":"t1","instanceId":"f6de","integration":"WHATSAPP-BAILEYS","status":"close"},
            "hash":"4BE17E02","webhook":{},"settings":{},"qrcode":{"count":0}}"#;
        let c = parse_create_reply(body, "t1").unwrap();
        assert_eq!(c.instance_id.as_deref(), Some("f6de"));
        assert_eq!(c.token.as_deref(), Some("4BE17E02"));
        assert_eq!(c.status, "connecting");
        let qr = c.qr.unwrap();
        assert!(!qr.is_present());
        assert_eq!(qr.count, Some(0));
    }

    #[test]
    fn v1_create_reply_with_qr() {
        let body = r#"{"instance":{"instanceName":"v1a","instanceId":"ba71","status":"created"},
            "hash":{"apikey":"3DD3"},"qrcode":{"pairingCode":null,"code":"2@abc","base64":"data:image/png;base64,AAA","count":1}}"#;
        let c = parse_create_reply(body, "v1a").unwrap();
        assert_eq!(c.token.as_deref(), Some("3DD3"));
        let qr = c.qr.unwrap();
        assert_eq!(qr.code.as_deref(), Some("2@abc"));
        assert_eq!(qr.pairing_code, None);
        assert_eq!(qr.count, Some(1));
    }

    #[test]
    fn create_reply_faults() {
        assert!(parse_create_reply("{}", "t1")
            .unwrap_err()
            .message
            .contains("missing the instance"));
        assert!(parse_create_reply("<html>", "t1")
            .unwrap_err()
            .message
            .contains("not JSON"));
        assert!(parse_create_reply("", "t1")
            .unwrap_err()
            .message
            .contains("empty reply"));
        let e = parse_create_reply(r#"{"error":true,"message":"boom"}"#, "t1").unwrap_err();
        assert!(e.message.contains("boom"));
        assert_eq!(e.kind, crate::evolution::ErrorKind::Transient);
        assert_eq!(e.class(), "error_reply");
        assert_eq!(
            parse_create_reply("<html>", "t1").unwrap_err().class(),
            "malformed"
        );
        assert_eq!(
            parse_create_reply("", "t1").unwrap_err().class(),
            "malformed"
        );
    }

    #[test]
    fn fetch_v2_array_and_v1_object() {
        let v2 = r#"[{"id":"f6","name":"other","connectionStatus":"open","token":"X"},
                     {"id":"f7","name":"t1","connectionStatus":"open","token":"T"}]"#;
        let c = parse_fetch_instance(v2, "t1").unwrap();
        assert_eq!(
            (
                c.instance_id.as_deref(),
                c.token.as_deref(),
                c.status.as_str()
            ),
            (Some("f7"), Some("T"), "open")
        );
        let v1 = r#"{"instance":{"instanceName":"t1","instanceId":"ba","status":"close"}}"#;
        let c = parse_fetch_instance(v1, "t1").unwrap();
        assert_eq!(
            (c.instance_id.as_deref(), c.token, c.status.as_str()),
            (Some("ba"), None, "connecting")
        );
        assert!(parse_fetch_instance("[]", "t1").is_err());
    }

    #[test]
    fn connect_replies() {
        assert_eq!(
            parse_connect_reply(r#"{"instance":{"instanceName":"x","state":"open"}}"#).unwrap(),
            ConnectOutcome::Open
        );
        assert_eq!(
            parse_connect_reply(r#"{"count":0}"#).unwrap(),
            ConnectOutcome::NoQrYet { count: Some(0) }
        );
        assert_eq!(
            parse_connect_reply(r#"{"instance":{"instanceName":"x","state":"close"}}"#).unwrap(),
            ConnectOutcome::NoQrYet { count: None }
        );
        match parse_connect_reply(
            r#"{"pairingCode":"ABCD1234","code":"2@x","base64":"data:x","count":3}"#,
        )
        .unwrap()
        {
            ConnectOutcome::Qr(q) => assert_eq!(q.pairing_code.as_deref(), Some("ABCD1234")),
            other => panic!("{other:?}"),
        }
        assert!(parse_connect_reply(r#"{"error":true,"message":"[object Object]"}"#).is_err());
        assert!(parse_connect_reply("").is_err());
        assert!(parse_connect_reply("{}").is_err());
    }

    #[test]
    fn nul_characters_never_leave_a_reply() {
        let body = r#"{"instance":{"instanceName":"t1","instanceId":"f6\u0000de","status":"open"},
            "hash":"TO\u0000KEN","qrcode":{"code":"2@a\u0000b","base64":"data:image/png;base64,A\u0000A",
            "pairingCode":"AB\u0000CD","count":1}}"#;
        let c = parse_create_reply(body, "t1").unwrap();
        assert_eq!(c.instance_id.as_deref(), Some("f6de"));
        assert_eq!(c.token.as_deref(), Some("TOKEN"));
        let qr = c.qr.unwrap();
        assert_eq!(qr.code.as_deref(), Some("2@ab"));
        assert_eq!(qr.base64.as_deref(), Some("data:image/png;base64,AA"));
        assert_eq!(qr.pairing_code.as_deref(), Some("ABCD"));
        // The name is compared after cleaning too.
        assert!(parse_create_reply(r#"{"instance":{"instanceName":"t\u00001"}}"#, "t1").is_ok());
        let e = parse_connect_reply(r#"{"error":true,"message":"bad\u0000news"}"#).unwrap_err();
        assert!(!e.message.contains('\0'));
        assert_eq!(
            envelope_message(r#"{"response":{"message":["a\u0000b"]}}"#).as_deref(),
            Some("ab")
        );
    }

    #[test]
    fn counts_are_clamped_into_integer_range() {
        let count = |json: &str| match parse_connect_reply(json).unwrap() {
            ConnectOutcome::NoQrYet { count } => count,
            ConnectOutcome::Qr(qr) => qr.count,
            other => panic!("{other:?}"),
        };
        assert_eq!(count(r#"{"count":99999999999}"#), Some(i32::MAX as i64));
        assert_eq!(
            count(r#"{"count":18446744073709551615}"#),
            Some(i32::MAX as i64)
        );
        assert_eq!(count(r#"{"count":1e300}"#), Some(i32::MAX as i64));
        assert_eq!(count(r#"{"count":-5}"#), Some(0));
        assert_eq!(count(r#"{"count":2.7}"#), Some(2));
        assert_eq!(count(r#"{"code":"2@x","count":7}"#), Some(7));
        // A count that is not a number is no count.
        assert!(parse_connect_reply(r#"{"count":"7"}"#).is_err());
    }

    #[test]
    fn strings_over_their_bound_are_dropped_not_cut() {
        let huge_image = format!("data:image/png;base64,{}", "A".repeat(MAX_QR_IMAGE_BYTES));
        let body =
            serde_json::json!({"code": "2@abc", "base64": huge_image, "count": 2}).to_string();
        match parse_connect_reply(&body).unwrap() {
            ConnectOutcome::Qr(qr) => {
                assert_eq!(qr.base64, None);
                assert_eq!(qr.code.as_deref(), Some("2@abc"));
            }
            other => panic!("{other:?}"),
        }
        let fits = format!(
            "data:image/png;base64,{}",
            "A".repeat(MAX_QR_IMAGE_BYTES - 30)
        );
        let body = serde_json::json!({"base64": fits, "count": 2}).to_string();
        assert!(
            matches!(parse_connect_reply(&body).unwrap(), ConnectOutcome::Qr(q) if q.base64.is_some())
        );

        let body = serde_json::json!({
            "instance": {"instanceName": "t1", "instanceId": "i".repeat(MAX_ID_CHARS + 1)},
            "hash": "t".repeat(MAX_ID_CHARS + 1),
            "qrcode": {"code": "2".repeat(MAX_QR_CODE_CHARS + 1), "pairingCode": "p".repeat(65), "count": 1}
        })
        .to_string();
        let c = parse_create_reply(&body, "t1").unwrap();
        assert_eq!((c.instance_id, c.token), (None, None));
        // The oversized code and pairing code are dropped; the count stays.
        let qr = c.qr.unwrap();
        assert_eq!((qr.code, qr.pairing_code, qr.count), (None, None, Some(1)));
        let at_bound = serde_json::json!({"instance": {"instanceName": "t1", "instanceId": "i".repeat(MAX_ID_CHARS)}});
        assert!(parse_create_reply(&at_bound.to_string(), "t1")
            .unwrap()
            .instance_id
            .is_some());
    }

    #[test]
    fn only_data_image_urls_are_qr_images() {
        let body = r#"{"base64":"javascript:alert(1)","code":"2@x","count":1}"#;
        match parse_connect_reply(body).unwrap() {
            ConnectOutcome::Qr(qr) => {
                assert_eq!((qr.base64, qr.code.as_deref()), (None, Some("2@x")))
            }
            other => panic!("{other:?}"),
        }
        // With nothing else usable it is "no QR yet", not an error.
        assert_eq!(
            parse_connect_reply(r#"{"base64":"https://x/y.png","count":3}"#).unwrap(),
            ConnectOutcome::NoQrYet { count: Some(3) }
        );
    }

    #[test]
    fn fetch_rows_are_cleaned_too() {
        let body = serde_json::json!([{"id": "f\u{0}7", "name": "t1", "token": "T".repeat(300), "connectionStatus": "open"}])
            .to_string();
        let c = parse_fetch_instance(&body, "t1").unwrap();
        assert_eq!((c.instance_id.as_deref(), c.token), (Some("f7"), None));
        let e = parse_fetch_instance("[]", "t1").unwrap_err();
        assert_eq!(e.class(), "not_found");
    }

    #[test]
    fn name_in_use_and_missing_instance_are_told_apart_from_look_alikes() {
        assert!(is_name_in_use("This name \"evoq_1\" is already in use."));
        assert!(!is_name_in_use("Forbidden"));
        assert!(!is_name_in_use("Missing global api key"));
        assert!(is_instance_missing("The \"nope\" instance does not exist"));
        assert!(is_instance_missing("Instance \"nope\" not found"));
        assert!(!is_instance_missing("Cannot GET /evo/instance/connect/x"));
        assert!(!is_instance_missing("Not Found"));
    }

    #[test]
    fn error_words_fall_back_to_the_body_text() {
        assert_eq!(
            error_words(r#"{"status":403,"error":"Forbidden","response":{"message":["x"]}}"#)
                .as_deref(),
            Some("x")
        );
        assert_eq!(
            error_words("<html>\n<title>403 Forbidden</title>\n</html>").as_deref(),
            Some("<html> <title>403 Forbidden</title> </html>")
        );
        assert_eq!(error_words("  "), None);
        assert_eq!(error_words(&"x".repeat(5000)).unwrap().len(), 200);
    }
}
