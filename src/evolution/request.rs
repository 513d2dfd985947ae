//! Request bodies and paths, in the dialect of the server's version (contract section 3).

use super::ApiVersion;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::fmt;

/// The header that carries the webhook secret on v2 (PostgREST hands it to `evoq_webhook` in
/// `request.headers`, whose names are lower case).
pub const SECRET_HEADER: &str = "x-evoq-secret";
/// The query parameter that carries it on v1.8, which sends no custom headers; `evoq_webhook`
/// finds it again in the delivery's `destination`, the URL the server posted to.
pub const SECRET_PARAM: &str = "evoq_secret";

/// Where the Evolution server should POST events for an instance.
#[derive(Clone, PartialEq, Eq)]
pub struct Webhook {
    pub url: String,
    /// Event names such as `QRCODE_UPDATED`; always sent explicitly, because a missing list makes
    /// both versions fail or silently drop the webhook.
    pub events: Vec<String>,
    /// Extra headers for every delivery (v2 only), e.g. Supabase's `apikey` for its gateway.
    pub headers: BTreeMap<String, String>,
    /// The webhook secret evoq_webhook checks; None: deliveries carry none.
    pub secret: Option<String>,
}

/// The secret and the headers (a gateway key) stay out of log lines and panic messages.
impl fmt::Debug for Webhook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Webhook")
            .field("url", &super::mask_credentials(&self.url))
            .field("events", &self.events)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("secret", &self.secret.as_ref().map(|_| super::REDACTED))
            .finish()
    }
}

impl Webhook {
    /// The URL the server posts to: on v1.8 the secret rides in it, as `evoq_secret=`.
    pub fn url_for(&self, version: ApiVersion) -> String {
        match (&self.secret, version) {
            (Some(secret), ApiVersion::V1) => {
                let sep = if self.url.contains('?') { '&' } else { '?' };
                format!("{}{sep}{SECRET_PARAM}={secret}", self.url)
            }
            _ => self.url.clone(),
        }
    }

    /// The headers of every delivery (v2): the configured ones, then the secret (which wins).
    pub fn delivery_headers(&self) -> Map<String, Value> {
        let mut headers: Map<String, Value> = self
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        if let Some(secret) = &self.secret {
            headers.insert(SECRET_HEADER.into(), Value::String(secret.clone()));
        }
        headers
    }
}

/// `POST /instance/create`. Always asks for a QR (`qrcode: true`) and always names the Baileys
/// integration, which v2 requires in practice and v1.8 accepts.
pub fn create_body(version: ApiVersion, instance_name: &str, webhook: Option<&Webhook>) -> Value {
    let mut body = json!({
        "instanceName": instance_name,
        "integration": "WHATSAPP-BAILEYS",
        "qrcode": true,
    });
    if let Some(hook) = webhook {
        let map = body.as_object_mut().expect("object literal");
        match version {
            ApiVersion::V2 => {
                map.insert(
                    "webhook".into(),
                    json!({"url": hook.url, "byEvents": false, "base64": false,
                           "headers": hook.delivery_headers(), "events": hook.events}),
                );
            }
            ApiVersion::V1 => {
                map.insert("webhook".into(), json!(hook.url_for(version)));
                map.insert("webhook_by_events".into(), json!(false));
                map.insert("events".into(), json!(hook.events));
            }
        }
    }
    body
}

/// The create body with the user's phone number: the server then asks WhatsApp for a pairing
/// code, which comes in `qrcode.pairingCode` of the reply and of every `qrcode.updated` delivery
/// (contract 3.1, 6). Both dialects name it `number`: digits with the country code.
pub fn create_body_with_number(
    version: ApiVersion,
    instance_name: &str,
    webhook: Option<&Webhook>,
    number: Option<&str>,
) -> Value {
    let mut body = create_body(version, instance_name, webhook);
    if let Some(number) = number {
        body["number"] = Value::String(number.to_string());
    }
    body
}

/// `GET /instance/connect/{name}?number=...`: on a `close` instance the server connects with
/// the number and answers the QR object with a pairing code; while `connecting` it ignores the
/// number (contract 3.2, 6), so the caller logs the instance out first. `number` is digits
/// only (a validated `Phone`), nothing to escape.
pub fn connect_path_with_number(instance_name: &str, number: &str) -> String {
    format!("{}?number={number}", connect_path(instance_name))
}

/// `POST /webhook/set/{name}`: v2 wraps the settings in a `webhook` object, v1.8 is flat.
pub fn webhook_set_body(version: ApiVersion, hook: &Webhook) -> Value {
    match version {
        ApiVersion::V2 => json!({"webhook": {
            "enabled": true, "url": hook.url, "events": hook.events, "byEvents": false, "base64": false,
            "headers": hook.delivery_headers()
        }}),
        ApiVersion::V1 => json!({
            "enabled": true, "url": hook.url_for(version), "events": hook.events, "webhook_by_events": false
        }),
    }
}

/// Path segment for an instance name. evoq's own names are `[A-Za-z0-9_-]` only, but names read
/// back from a server are escaped anyway so nothing can steer the request into another route.
pub fn path_segment(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn connect_path(instance_name: &str) -> String {
    format!("/instance/connect/{}", path_segment(instance_name))
}

/// `/instance/<route>/<name>`, the name escaped: logout, delete, connectionState.
pub fn instance_path(route: &str, instance_name: &str) -> String {
    format!("/instance/{route}/{}", path_segment(instance_name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook() -> Webhook {
        Webhook {
            url: "https://app.example/hook".into(),
            events: vec!["QRCODE_UPDATED".into()],
            headers: BTreeMap::new(),
            secret: None,
        }
    }

    fn secret_hook() -> Webhook {
        Webhook {
            headers: BTreeMap::from([("apikey".to_string(), "anon-key".to_string())]),
            secret: Some("s3cret".into()),
            ..hook()
        }
    }

    #[test]
    fn v2_carries_the_secret_as_a_header_beside_the_configured_ones() {
        for b in [
            create_body(ApiVersion::V2, "evoq_1", Some(&secret_hook()))["webhook"].clone(),
            webhook_set_body(ApiVersion::V2, &secret_hook())["webhook"].clone(),
        ] {
            assert_eq!(b["url"], "https://app.example/hook");
            assert_eq!(
                b["headers"],
                json!({"apikey": "anon-key", "x-evoq-secret": "s3cret"})
            );
        }
    }

    #[test]
    fn v1_carries_the_secret_in_the_url() {
        let b = create_body(ApiVersion::V1, "evoq_1", Some(&secret_hook()));
        assert_eq!(b["webhook"], "https://app.example/hook?evoq_secret=s3cret");
        assert!(b.get("headers").is_none());
        let s = webhook_set_body(ApiVersion::V1, &secret_hook());
        assert_eq!(s["url"], "https://app.example/hook?evoq_secret=s3cret");
        let mut q = secret_hook();
        q.url = "https://app.example/hook?a=1".into();
        assert_eq!(
            q.url_for(ApiVersion::V1),
            "https://app.example/hook?a=1&evoq_secret=s3cret"
        );
        assert_eq!(q.url_for(ApiVersion::V2), "https://app.example/hook?a=1");
    }

    #[test]
    fn debug_shows_neither_secret_nor_header_values() {
        let shown = format!("{:?}", secret_hook());
        assert!(
            !shown.contains("s3cret") && !shown.contains("anon-key"),
            "{shown}"
        );
    }

    #[test]
    fn v2_create_nests_the_webhook() {
        let b = create_body(ApiVersion::V2, "evoq_1", Some(&hook()));
        assert_eq!(b["integration"], "WHATSAPP-BAILEYS");
        assert_eq!(b["qrcode"], true);
        assert_eq!(b["webhook"]["url"], "https://app.example/hook");
        assert_eq!(b["webhook"]["events"], json!(["QRCODE_UPDATED"]));
        assert!(b.get("events").is_none());
    }

    #[test]
    fn v1_create_is_flat() {
        let b = create_body(ApiVersion::V1, "evoq_1", Some(&hook()));
        assert_eq!(b["webhook"], "https://app.example/hook");
        assert_eq!(b["webhook_by_events"], false);
        assert_eq!(b["events"], json!(["QRCODE_UPDATED"]));
    }

    #[test]
    fn no_webhook_no_key() {
        let b = create_body(ApiVersion::V2, "evoq_1", None);
        assert!(b.get("webhook").is_none());
    }

    #[test]
    fn webhook_set_shapes() {
        assert_eq!(
            webhook_set_body(ApiVersion::V2, &hook())["webhook"]["enabled"],
            true
        );
        assert_eq!(
            webhook_set_body(ApiVersion::V1, &hook())["url"],
            "https://app.example/hook"
        );
    }

    #[test]
    fn path_segments_cannot_escape() {
        assert_eq!(connect_path("evoq_ab-1"), "/instance/connect/evoq_ab-1");
        assert_eq!(
            connect_path_with_number("evoq_ab-1", "5511987654321"),
            "/instance/connect/evoq_ab-1?number=5511987654321"
        );
        let b = create_body_with_number(ApiVersion::V2, "evoq_1", None, Some("5511987654321"));
        assert_eq!(b["number"], "5511987654321");
        assert_eq!(b["qrcode"], true);
        assert!(
            create_body_with_number(ApiVersion::V1, "evoq_1", None, None)
                .get("number")
                .is_none()
        );
        assert_eq!(
            connect_path("../delete/x?y"),
            "/instance/connect/..%2Fdelete%2Fx%3Fy"
        );
    }
}
