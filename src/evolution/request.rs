//! Request bodies and paths, in the dialect of the server's version (contract section 3).

use super::ApiVersion;
use serde_json::{json, Value};

/// Where the Evolution server should POST events for an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    pub url: String,
    /// Event names such as `QRCODE_UPDATED`; always sent explicitly, because a missing list makes
    /// both versions fail or silently drop the webhook.
    pub events: Vec<String>,
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
                    json!({"url": hook.url, "byEvents": false, "base64": false, "events": hook.events}),
                );
            }
            ApiVersion::V1 => {
                map.insert("webhook".into(), json!(hook.url));
                map.insert("webhook_by_events".into(), json!(false));
                map.insert("events".into(), json!(hook.events));
            }
        }
    }
    body
}

/// `POST /webhook/set/{name}`: v2 wraps the settings in a `webhook` object, v1.8 is flat.
pub fn webhook_set_body(version: ApiVersion, hook: &Webhook) -> Value {
    match version {
        ApiVersion::V2 => json!({"webhook": {
            "enabled": true, "url": hook.url, "events": hook.events, "byEvents": false, "base64": false
        }}),
        ApiVersion::V1 => json!({
            "enabled": true, "url": hook.url, "events": hook.events, "webhook_by_events": false
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

#[cfg(test)]
mod tests {
    use super::*;

    fn hook() -> Webhook {
        Webhook {
            url: "https://app.example/hook".into(),
            events: vec!["QRCODE_UPDATED".into()],
        }
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
            connect_path("../delete/x?y"),
            "/instance/connect/..%2Fdelete%2Fx%3Fy"
        );
    }
}
