//! Parsing the server's replies, in both dialects (contract sections 3.1, 3.2, 3.6, 3.10).

use super::{ApiError, ApiVersion};
use serde_json::Value;

/// A QR code as the server hands it out.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Qr {
    /// The `data:image/png;base64,...` URL.
    pub base64: Option<String>,
    /// The raw code (starts with `2@`).
    pub code: Option<String>,
    pub pairing_code: Option<String>,
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
    /// `connecting`, `open` or `close` as the server said.
    pub status: String,
    pub qr: Option<Qr>,
}

/// What `GET /instance/connect/{name}` said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectOutcome {
    /// The user scanned the code: the instance is connected.
    Open,
    /// A QR (possibly the same one as last time).
    Qr(Qr),
    /// `{"count":0}`: no QR yet. Not an error.
    NoQrYet,
    /// 404: the server no longer knows the instance.
    Lost,
}

fn str_field(v: &Value, key: &str) -> Option<String> {
    v.get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

fn parse_json(body: &str, what: &str) -> Result<Value, ApiError> {
    if body.trim().is_empty() {
        return Err(ApiError::transient(format!("empty reply to {what}")));
    }
    serde_json::from_str(body).map_err(|_| ApiError::malformed(what, "not JSON"))
}

/// A 200 reply can still be a failure: `{"error": true, "message": ...}` (contract 2.4, 3.2).
fn reject_error_body(v: &Value, what: &str) -> Result<(), ApiError> {
    if v.get("error").and_then(Value::as_bool) == Some(true) {
        let msg = match v.get("message") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => "no message".into(),
        };
        return Err(ApiError::transient(format!(
            "Evolution API reported an error for {what}: {msg}"
        )));
    }
    Ok(())
}

fn parse_qr(v: &Value) -> Qr {
    Qr {
        base64: str_field(v, "base64"),
        code: str_field(v, "code"),
        pairing_code: str_field(v, "pairingCode"),
        count: v.get("count").and_then(Value::as_i64),
    }
}

/// The `response.message` of an error envelope (contract 2.3): a string, an array of strings, or
/// an array holding one array (schema validation). Flattened into one line.
pub fn envelope_message(body: &str) -> Option<String> {
    fn collect(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) => out.push(s.clone()),
            Value::Array(items) => items.iter().for_each(|i| collect(i, out)),
            Value::Null => {}
            other => out.push(other.to_string()),
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
    (!joined.is_empty()).then_some(joined)
}

/// `GET /`: `{"version": "2.3.6", ...}`.
pub fn parse_version(body: &str) -> Result<ApiVersion, ApiError> {
    let v = parse_json(body, "GET /")?;
    let version = v.get("version").and_then(Value::as_str).ok_or_else(|| {
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
    let name = str_field(instance, "instanceName").unwrap_or_else(|| expected_name.to_string());
    if name != expected_name {
        return Err(ApiError::malformed(
            WHAT,
            format!("it names instance {name:?}, not {expected_name:?}"),
        ));
    }
    // v2: "hash": "<token>"; v1.8: "hash": {"apikey": "<token>"}.
    let token = match v.get("hash") {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(obj @ Value::Object(_)) => str_field(obj, "apikey"),
        _ => None,
    };
    // v1.8 always says "created"; v2 says the live state. With qrcode:true both are connecting.
    let status = match str_field(instance, "status").as_deref() {
        Some("open") => "open",
        _ => "connecting",
    }
    .to_string();
    let qr = v
        .get("qrcode")
        .filter(|q| q.is_object())
        .map(parse_qr)
        .filter(Qr::is_present);
    Ok(CreatedInstance {
        instance_name: name,
        instance_id: str_field(instance, "instanceId"),
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
        if str_field(row, name_key).as_deref() != Some(name) {
            continue;
        }
        let status = match str_field(row, status_key).as_deref() {
            Some("open") => "open",
            _ => "connecting",
        };
        return Ok(CreatedInstance {
            instance_name: name.to_string(),
            instance_id: str_field(row, id_key),
            token: str_field(row, token_key).or_else(|| str_field(item, "apikey")),
            status: status.to_string(),
            qr: None,
        });
    }
    Err(ApiError::transient(format!(
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
    if let Some(state) = v
        .get("instance")
        .and_then(|i| i.get("state"))
        .and_then(Value::as_str)
    {
        return match state {
            "open" => Ok(ConnectOutcome::Open),
            _ => Ok(ConnectOutcome::NoQrYet),
        };
    }
    let qr = parse_qr(&v);
    if qr.is_present() {
        Ok(ConnectOutcome::Qr(qr))
    } else if qr.count.is_some() {
        Ok(ConnectOutcome::NoQrYet)
    } else {
        Err(ApiError::malformed(
            WHAT,
            "neither a QR, a count nor a state",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(c.qr, None);
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
            ConnectOutcome::NoQrYet
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
}
