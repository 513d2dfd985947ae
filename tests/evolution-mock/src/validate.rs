//! A tiny imitation of the `jsonschema` checks Evolution runs on bodies, producing the same
//! message texts (`stack` with the leading `instance.` removed, as `dataValidate` does).

use serde_json::{Map, Value};

/// v2 event names (`EventController.events`, contract section 5).
pub const V2_EVENTS: &[&str] = &[
    "APPLICATION_STARTUP",
    "QRCODE_UPDATED",
    "MESSAGES_SET",
    "MESSAGES_UPSERT",
    "MESSAGES_EDITED",
    "MESSAGES_UPDATE",
    "MESSAGES_DELETE",
    "SEND_MESSAGE",
    "SEND_MESSAGE_UPDATE",
    "CONTACTS_SET",
    "CONTACTS_UPSERT",
    "CONTACTS_UPDATE",
    "PRESENCE_UPDATE",
    "CHATS_SET",
    "CHATS_UPSERT",
    "CHATS_UPDATE",
    "CHATS_DELETE",
    "GROUPS_UPSERT",
    "GROUP_UPDATE",
    "GROUP_PARTICIPANTS_UPDATE",
    "CONNECTION_UPDATE",
    "LABELS_EDIT",
    "LABELS_ASSOCIATION",
    "CALL",
    "TYPEBOT_START",
    "TYPEBOT_CHANGE_STATUS",
    "REMOVE_INSTANCE",
    "LOGOUT_INSTANCE",
    "INSTANCE_CREATE",
    "INSTANCE_DELETE",
    "STATUS_INSTANCE",
];

/// v1.8 event names (`validate.schema.ts`, contract section 5).
pub const V1_EVENTS: &[&str] = &[
    "APPLICATION_STARTUP",
    "QRCODE_UPDATED",
    "MESSAGES_SET",
    "MESSAGES_UPSERT",
    "MESSAGES_UPDATE",
    "MESSAGES_DELETE",
    "SEND_MESSAGE",
    "CONTACTS_SET",
    "CONTACTS_UPSERT",
    "CONTACTS_UPDATE",
    "PRESENCE_UPDATE",
    "CHATS_SET",
    "CHATS_UPSERT",
    "CHATS_UPDATE",
    "CHATS_DELETE",
    "GROUPS_UPSERT",
    "GROUP_UPDATE",
    "GROUP_PARTICIPANTS_UPDATE",
    "CONNECTION_UPDATE",
    "LABELS_EDIT",
    "LABELS_ASSOCIATION",
    "CALL",
    "NEW_JWT_TOKEN",
    "TYPEBOT_START",
    "TYPEBOT_CHANGE_STATUS",
    "CHAMA_AI_ACTION",
];

#[derive(Clone, Copy)]
pub enum Ty {
    Str,
    Bool,
    Arr,
    Obj,
}

impl Ty {
    fn name(self) -> &'static str {
        match self {
            Ty::Str => "string",
            Ty::Bool => "boolean",
            Ty::Arr => "array",
            Ty::Obj => "object",
        }
    }

    fn accepts(self, v: &Value) -> bool {
        match self {
            Ty::Str => v.is_string(),
            Ty::Bool => v.is_boolean(),
            Ty::Arr => v.is_array(),
            Ty::Obj => v.is_object(),
        }
    }
}

/// Collects schema messages for one object; `path` is "" for the body itself.
pub struct Check<'a> {
    obj: &'a Map<String, Value>,
    path: String,
    pub errors: Vec<String>,
}

impl<'a> Check<'a> {
    pub fn new(obj: &'a Map<String, Value>, path: &str) -> Check<'a> {
        Check {
            obj,
            path: path.to_string(),
            errors: Vec::new(),
        }
    }

    fn field_path(&self, field: &str) -> String {
        if self.path.is_empty() {
            field.to_string()
        } else {
            format!("{}.{field}", self.path)
        }
    }

    pub fn required(&mut self, field: &str) -> &mut Self {
        if !self.obj.contains_key(field) {
            let owner = if self.path.is_empty() {
                "instance"
            } else {
                &self.path
            };
            self.errors
                .push(format!("{owner} requires property \"{field}\""));
        }
        self
    }

    pub fn ty(&mut self, field: &str, ty: Ty) -> &mut Self {
        if let Some(v) = self.obj.get(field) {
            if !ty.accepts(v) {
                let p = self.field_path(field);
                self.errors
                    .push(format!("{p} is not of a type(s) {}", ty.name()));
            }
        }
        self
    }

    pub fn tys(&mut self, fields: &[&str], ty: Ty) -> &mut Self {
        for f in fields {
            self.ty(f, ty);
        }
        self
    }

    /// An array of strings drawn from `allowed` (also checks the array type).
    pub fn enum_array(&mut self, field: &str, allowed: &[&str]) -> &mut Self {
        self.ty(field, Ty::Arr);
        if let Some(Value::Array(items)) = self.obj.get(field) {
            let p = self.field_path(field);
            for (i, item) in items.iter().enumerate() {
                let ok = item.as_str().is_some_and(|s| allowed.contains(&s));
                if !ok {
                    self.errors.push(format!(
                        "{p}[{i}] is not one of enum values: {}",
                        allowed.join(",")
                    ));
                }
            }
        }
        self
    }

    /// `number` must match the schema's `^\d+[\.@\w-]+`. A JSON-schema pattern is not anchored
    /// at the end, and `\d+` backtracks (a digit is a `\w` too), so this holds exactly when the
    /// first character is a digit and a second one is in `[.@\w-]`: `5511987654321` matches,
    /// as on the real server. (The mock once required a non-digit after the digits, and refused
    /// every plain phone number a real 2.3.6 takes.)
    pub fn number_pattern(&mut self, field: &str) -> &mut Self {
        if let Some(Value::String(s)) = self.obj.get(field) {
            let mut chars = s.chars();
            let first_is_digit = chars.next().is_some_and(|c| c.is_ascii_digit());
            let ok = first_is_digit
                && chars
                    .next()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || "._@-".contains(c));
            if !ok {
                let p = self.field_path(field);
                self.errors.push(format!(
                    "{p} does not match pattern \"^\\\\d+[\\\\.@\\\\w-]+\""
                ));
            }
        }
        self
    }
}

/// class-validator `isURL(url, {require_tld: false})`, approximately: an optional
/// http/https/ftp scheme, then a host with no whitespace.
pub fn is_url(s: &str) -> bool {
    if s.is_empty() || s.chars().any(char::is_whitespace) {
        return false;
    }
    let rest = match s.split_once("://") {
        Some((scheme, rest)) => {
            if !["http", "https", "ftp"].contains(&scheme.to_ascii_lowercase().as_str()) {
                return false;
            }
            rest
        }
        None => s,
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = host.rsplit('@').next().unwrap_or("");
    let host = host.split(':').next().unwrap_or("");
    !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn messages_match_jsonschema() {
        let body = json!({"qrcode": "yes", "events": ["NOPE"]});
        let obj = body.as_object().unwrap();
        let mut c = Check::new(obj, "");
        c.required("url")
            .ty("qrcode", Ty::Bool)
            .enum_array("events", &["A", "B"]);
        assert_eq!(
            c.errors,
            vec![
                "instance requires property \"url\"",
                "qrcode is not of a type(s) boolean",
                "events[0] is not one of enum values: A,B",
            ]
        );
        let inner = json!({});
        let mut c = Check::new(inner.as_object().unwrap(), "webhook");
        c.required("url");
        assert_eq!(c.errors, vec!["webhook requires property \"url\""]);
    }

    #[test]
    fn urls() {
        assert!(is_url("http://127.0.0.1:9999/hook"));
        assert!(is_url("https://host/x?y=1"));
        assert!(is_url("localhost:8080"));
        assert!(!is_url("not a url"));
        assert!(!is_url("mailto://x"));
        assert!(!is_url(""));
    }
}
