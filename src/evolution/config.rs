//! Checks of the connection settings given to `evoq_configure`, kept here (pure, no pgrx) so
//! they are unit tested with the client that depends on them: evoq builds every request URL
//! as `api_url` + `/instance/create` and so on, which only works for a plain base address.

use std::fmt;

/// Event names either server version accepts (contract section 5); the default subscription is
/// what evoq's users need to follow a login.
pub const KNOWN_EVENTS: &[&str] = &[
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
    "NEW_JWT_TOKEN",
    "CHAMA_AI_ACTION",
];

/// A refused setting: what is wrong (`message`) and how to fix it (`hint`), ready for an
/// ERROR's message and HINT. Neither repeats a password found in a URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub message: String,
    pub hint: String,
}

impl ConfigError {
    fn new(message: impl Into<String>, hint: impl Into<String>) -> ConfigError {
        ConfigError {
            message: message.into(),
            hint: hint.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// How a URL appears in a message: credentials masked, at most 200 characters, quoted.
fn shown(url: &str) -> String {
    let masked = mask_credentials(url);
    if masked.chars().count() > 200 {
        let cut: String = masked.chars().take(199).collect();
        format!("{cut:?}…")
    } else {
        format!("{masked:?}")
    }
}

/// Refuses anything but a plain `http(s)://host[:port][/path]` base address.
///
/// A query or a fragment is refused because evoq appends the API paths to the address: with
/// `https://evo/?x=1` requests went to `/?x=1/instance/create`, which the server answers as
/// `GET /`-ish nonsense. White space and control characters are refused because they are never
/// meant (a pasted line break) and would be sent as they are.
pub fn check_url(what: &str, url: &str) -> Result<(), ConfigError> {
    let usage = format!("Pass {what} => 'https://host[:port][/path]'.");
    if url.is_empty() {
        return Err(ConfigError::new(
            format!("{what} must be an http:// or https:// URL with a host, got an empty string"),
            usage,
        ));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ConfigError::new(
            format!(
                "{what} must not contain white space or control characters, got {}",
                shown(url)
            ),
            format!("Remove the spaces or line breaks. {usage}"),
        ));
    }
    let lower = url.to_ascii_lowercase();
    let rest = if lower.starts_with("http://") {
        &url["http://".len()..]
    } else if lower.starts_with("https://") {
        &url["https://".len()..]
    } else {
        return Err(ConfigError::new(
            format!(
                "{what} must be an http:// or https:// URL with a host, got {}",
                shown(url)
            ),
            usage,
        ));
    };
    if url.contains('?') || url.contains('#') {
        return Err(ConfigError::new(
            format!(
                "{what} must not have a query (?...) or a fragment (#...), got {}",
                shown(url)
            ),
            format!(
                "evoq appends paths such as /instance/create to {what}, so a query or fragment \
                 would end up in the middle of every request. {usage}"
            ),
        ));
    }
    let authority = rest.split('/').next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = if let Some(v6) = host_port.strip_prefix('[') {
        match v6.split_once(']') {
            Some((h, p)) if !h.is_empty() => (h, p.strip_prefix(':')),
            _ => ("", None),
        }
    } else {
        match host_port.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host_port, None),
        }
    };
    if host.is_empty() {
        return Err(ConfigError::new(
            format!("{what} has no host, got {}", shown(url)),
            usage,
        ));
    }
    if let Some(p) = port {
        let valid = !p.is_empty()
            && p.len() <= 5
            && p.bytes().all(|b| b.is_ascii_digit())
            && matches!(p.parse::<u32>(), Ok(1..=65535));
        if !valid {
            return Err(ConfigError::new(
                format!("{what} has an invalid port, got {}", shown(url)),
                format!("The port must be a number from 1 to 65535. {usage}"),
            ));
        }
    }
    Ok(())
}

/// Refuses event names neither server version knows (the server would store them and never
/// send anything). An empty list is allowed: the server reads it as "every event".
pub fn check_events(events: &[String]) -> Result<(), ConfigError> {
    for event in events {
        if KNOWN_EVENTS.contains(&event.as_str()) {
            continue;
        }
        let upper = event.trim().to_ascii_uppercase();
        let hint = if KNOWN_EVENTS.contains(&upper.as_str()) {
            format!("Event names are upper case: did you mean {upper}?")
        } else {
            "Use Evolution API event names such as QRCODE_UPDATED, CONNECTION_UPDATE, \
             MESSAGES_UPSERT."
                .to_string()
        };
        let shown: String = event.chars().take(64).collect();
        return Err(ConfigError::new(
            format!("unknown webhook event {shown:?}"),
            hint,
        ));
    }
    Ok(())
}

/// Checks the extra webhook headers: a JSON object of header names to string values, as the
/// server sends them with every delivery (v2). Names are HTTP tokens, values one line, the
/// secret's header is evoq's own, and the whole is small (the server stores it per instance).
pub fn check_headers(headers: &serde_json::Value) -> Result<(), ConfigError> {
    const HINT: &str = "Pass a JSON object of header names and string values, e.g. \
                        webhook_headers => '{\"apikey\": \"<your anon key>\"}'.";
    let Some(map) = headers.as_object() else {
        return Err(ConfigError::new(
            "webhook_headers must be a JSON object",
            HINT,
        ));
    };
    if map.len() > 16 || headers.to_string().len() > 8192 {
        return Err(ConfigError::new(
            "webhook_headers is too large (at most 16 headers, 8 KB)",
            HINT,
        ));
    }
    for (name, value) in map {
        let shown: String = name.chars().take(64).collect();
        let token = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.!#$%&'*+^`|~".contains(&b));
        if !token {
            return Err(ConfigError::new(
                format!("webhook_headers: {shown:?} is not a header name"),
                HINT,
            ));
        }
        if name.eq_ignore_ascii_case(super::SECRET_HEADER) {
            return Err(ConfigError::new(
                format!("webhook_headers: {shown} is evoq's own header"),
                "evoq sends the webhook secret in it; rotate the secret with rotate_webhook_secret => true.",
            ));
        }
        let Some(v) = value.as_str() else {
            return Err(ConfigError::new(
                format!("webhook_headers: the value of {shown} is not a string"),
                HINT,
            ));
        };
        if v.contains(['\r', '\n', '\0']) {
            return Err(ConfigError::new(
                format!("webhook_headers: the value of {shown} spans lines"),
                HINT,
            ));
        }
    }
    Ok(())
}

/// The URL with any `user:password@` replaced by `***@`, for echoing a URL back:
/// `https://user:pass@host/x` → `https://***@host/x`. Anything else is returned unchanged.
pub fn mask_credentials(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    if let Some(at) = rest[..authority_end].rfind('@') {
        return format!("{scheme}***{}", &rest[at..]);
    }
    // A password with an unescaped '/', '?' or '#' (invalid, but pasted all the same) makes
    // the authority seem to end inside it: `user:pa/ss@host`. Mask up to the '@' when what
    // precedes it reads as user:password rather than host:port followed by a path.
    if let Some(at) = rest.find('@') {
        if let Some((_, after_colon)) = rest[..at].split_once(':') {
            let port = after_colon.split(['/', '?', '#']).next().unwrap_or("");
            if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
                return format!("{scheme}***{}", &rest[at..]);
            }
        }
    }
    url.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_base_addresses_pass() {
        for url in [
            "http://evo:8080",
            "https://evo.example.com",
            "https://evo.example.com/api/v2",
            "HTTPS://EVO.EXAMPLE.COM",
            "http://127.0.0.1:8080",
            "http://[::1]:8080/x",
            "https://user:pass@evo.example.com",
        ] {
            assert_eq!(check_url("api_url", url), Ok(()), "{url}");
        }
    }

    fn refused(url: &str) -> ConfigError {
        check_url("api_url", url).expect_err(url)
    }

    #[test]
    fn not_http_or_no_host_is_refused_with_a_hint() {
        for url in [
            "",
            "evo:8080",
            "ftp://evo",
            "http://",
            "http:///path",
            "https://:8080",
        ] {
            let e = refused(url);
            assert!(
                e.message.starts_with("api_url must be") || e.message.contains("no host"),
                "{url}: {e:?}"
            );
            assert!(
                e.hint.contains("api_url => 'https://host[:port][/path]'"),
                "{e:?}"
            );
        }
        assert!(refused("").message.contains("an empty string"));
    }

    #[test]
    fn queries_and_fragments_are_refused() {
        // Requests went to /?x=1/instance/create.
        let e = refused("https://evo.example/?x=1");
        assert!(e.message.contains("query"), "{e:?}");
        assert!(e.hint.contains("/instance/create"), "{e:?}");
        assert!(refused("https://evo.example/#top")
            .message
            .contains("fragment"));
    }

    #[test]
    fn white_space_and_bad_ports_are_refused() {
        assert!(refused("https://evo .example")
            .message
            .contains("white space"));
        assert!(refused("https://evo.example\n")
            .message
            .contains("white space"));
        assert!(refused(" https://evo.example")
            .message
            .contains("white space"));
        assert!(refused("http://evo:port").message.contains("invalid port"));
        assert!(refused("http://evo:0").message.contains("invalid port"));
        assert!(refused("http://evo:65536").message.contains("invalid port"));
        assert!(refused("http://evo:").message.contains("invalid port"));
    }

    #[test]
    fn a_refusal_never_repeats_a_password() {
        let e = refused("https://user:s3cret@evo.example/?x=1");
        assert!(!e.message.contains("s3cret"), "{e:?}");
        assert!(e.message.contains("https://***@evo.example/?x=1"), "{e:?}");
        let e = refused("https://user:s3/cret@evo.example");
        assert!(!e.message.contains("cret"), "{e:?}");
    }

    #[test]
    fn events() {
        let ok: Vec<String> = vec!["QRCODE_UPDATED".into(), "CONNECTION_UPDATE".into()];
        assert_eq!(check_events(&ok), Ok(()));
        assert_eq!(check_events(&[]), Ok(()));
        let e = check_events(&["QRCODE_UPDATED".into(), "NOPE".into()]).unwrap_err();
        assert_eq!(e.message, "unknown webhook event \"NOPE\"");
        assert!(e.hint.contains("QRCODE_UPDATED"));
        let e = check_events(&["qrcode_updated".into()]).unwrap_err();
        assert!(e.hint.contains("did you mean QRCODE_UPDATED"), "{e:?}");
    }

    #[test]
    fn credentials_are_masked() {
        assert_eq!(
            mask_credentials("https://user:pass@host/x"),
            "https://***@host/x"
        );
        assert_eq!(
            mask_credentials("https://user:secret@evo.example:8080/api"),
            "https://***@evo.example:8080/api"
        );
        assert_eq!(mask_credentials("http://evo:8080"), "http://evo:8080");
        // An @ in the path or query is not a credential.
        assert_eq!(
            mask_credentials("https://host/a@b?c=d@e"),
            "https://host/a@b?c=d@e"
        );
        assert_eq!(mask_credentials("https://token@host"), "https://***@host");
        assert_eq!(mask_credentials("user:pw@host/x"), "***@host/x");
        assert_eq!(mask_credentials("/relative/path"), "/relative/path");
        // A password with an unescaped slash is masked whole, not cut at the slash.
        assert_eq!(
            mask_credentials("https://user:pa/ss@host/x"),
            "https://***@host/x"
        );
        assert_eq!(
            mask_credentials("https://host:8080/a@b"),
            "https://host:8080/a@b"
        );
    }

    #[test]
    fn webhook_headers_are_checked() {
        use serde_json::json;
        assert!(check_headers(&json!({})).is_ok());
        assert!(check_headers(&json!({"apikey": "anon", "Authorization": "Bearer x"})).is_ok());
        let msg = |v| check_headers(&v).unwrap_err().message;
        assert_eq!(msg(json!(["a"])), "webhook_headers must be a JSON object");
        assert!(msg(json!({"bad name": "x"})).contains("not a header name"));
        assert!(msg(json!({"X-Evoq-Secret": "x"})).contains("evoq's own header"));
        assert!(msg(json!({"apikey": 1})).contains("not a string"));
        assert!(msg(json!({"apikey": "a\r\nInjected: yes"})).contains("spans lines"));
        let many: serde_json::Map<String, serde_json::Value> =
            (0..17).map(|i| (format!("h{i}"), json!("v"))).collect();
        assert!(msg(serde_json::Value::Object(many)).contains("too large"));
    }
}
