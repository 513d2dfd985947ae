//! One error type for every way a call to the Evolution API can go wrong, classified for the
//! retry policy and labelled for counting. Messages are written for operators and end up in
//! rows users can read: they carry the API's own words from the error envelope and never a
//! header, a key, the configured URL or a Rust debug dump.

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

/// What kind of failure an `ApiError` is, finer than `ErrorKind`: a run summary counts errors
/// per class, and a circuit breaker asks whether every call of a batch failed the same way.
///
/// The labels (`label()`, also `ApiError::class()`) are stable; new classes may be added:
///
/// | label | meaning |
/// | --- | --- |
/// | `unreachable` | no connection: refused, DNS failure, connect timeout |
/// | `timeout` | connected, but no (complete) answer within the request timeout |
/// | `network` | the connection broke mid-call (reset, closed unanswered, TLS or protocol failure) |
/// | `http_NNN` | the server answered with error status NNN, e.g. `http_500`, `http_401`, `http_403` |
/// | `redirect` | a 3xx: evoq does not follow redirects, api_url must be the final address |
/// | `wrong_api_url` | `GET /` answered 404 or another 4xx (api_url is not an Evolution API server), or api_url is not a usable URL |
/// | `settings` | no request can be built from the settings (e.g. a line break in the key) |
/// | `malformed` | a 2xx reply evoq cannot use: not JSON, not UTF-8, empty, fields missing |
/// | `too_large` | a reply over `MAX_REPLY_BYTES` |
/// | `error_reply` | a 200 whose body says `"error": true` |
/// | `not_found` | an instance reported as taken that the server then could not find |
/// | `deadline` | no answer before the run's time budget ran out |
/// | `other` | anything else (`ApiError::transient`) |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    Unreachable,
    Timeout,
    Network,
    Http(u16),
    Redirect,
    WrongApiUrl,
    Settings,
    Malformed,
    TooLarge,
    ErrorReply,
    NotFound,
    Deadline,
    Other,
}

impl ErrorClass {
    pub fn label(self) -> String {
        match self {
            ErrorClass::Unreachable => "unreachable".into(),
            ErrorClass::Timeout => "timeout".into(),
            ErrorClass::Network => "network".into(),
            ErrorClass::Http(status) => format!("http_{status}"),
            ErrorClass::Redirect => "redirect".into(),
            ErrorClass::WrongApiUrl => "wrong_api_url".into(),
            ErrorClass::Settings => "settings".into(),
            ErrorClass::Malformed => "malformed".into(),
            ErrorClass::TooLarge => "too_large".into(),
            ErrorClass::ErrorReply => "error_reply".into(),
            ErrorClass::NotFound => "not_found".into(),
            ErrorClass::Deadline => "deadline".into(),
            ErrorClass::Other => "other".into(),
        }
    }
}

/// Messages are cut to this many characters: enough for the API's own sentence, short enough
/// for a table cell, and a proxy's HTML page cannot fill a row.
pub const MAX_MESSAGE_CHARS: usize = 500;

/// What stands in for a secret in a message.
pub const REDACTED: &str = "[redacted]";

/// Secrets shorter than this are not searched for: a string of 1-3 characters occurs in
/// ordinary words, so replacing it would garble every message while protecting nothing (a key
/// that short can be guessed anyway).
const MIN_SECRET_CHARS: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub kind: ErrorKind,
    /// The HTTP status when the server answered at all.
    pub http_status: Option<u16>,
    /// True when the failure is about the server as a whole (unreachable, key rejected,
    /// api_url pointing at the wrong place), so the rest of a run would fail the same way and
    /// should not be attempted.
    pub server_wide: bool,
    pub message: String,
    /// Set by the constructors; read with `class()` / `error_class()`.
    class: ErrorClass,
}

impl ApiError {
    fn new(kind: ErrorKind, class: ErrorClass, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            http_status: None,
            server_wide: false,
            message: message.into(),
            class,
        }
    }

    /// A transient failure of no particular class (`other`).
    pub fn transient(message: impl Into<String>) -> Self {
        ApiError::new(ErrorKind::Transient, ErrorClass::Other, message)
    }

    /// The server cannot be reached at all (`unreachable`, server-wide).
    pub fn unreachable(message: impl Into<String>) -> Self {
        ApiError {
            server_wide: true,
            ..ApiError::new(ErrorKind::Transient, ErrorClass::Unreachable, message)
        }
    }

    /// No answer within the request timeout (`timeout`).
    pub fn timeout(message: impl Into<String>) -> Self {
        ApiError::new(ErrorKind::Transient, ErrorClass::Timeout, message)
    }

    /// The connection failed mid-call (`network`).
    pub fn network(message: impl Into<String>) -> Self {
        ApiError::new(ErrorKind::Transient, ErrorClass::Network, message)
    }

    /// No answer before the run's time budget ran out (`deadline`).
    pub fn deadline(message: impl Into<String>) -> Self {
        ApiError::new(ErrorKind::Transient, ErrorClass::Deadline, message)
    }

    /// An instance the server said was taken but then could not find (`not_found`).
    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(ErrorKind::Transient, ErrorClass::NotFound, message)
    }

    pub fn malformed(what: &str, detail: impl fmt::Display) -> Self {
        ApiError::new(
            ErrorKind::Transient,
            ErrorClass::Malformed,
            format!("malformed reply to {what}: {detail}"),
        )
    }

    /// A 2xx reply with nothing in it (v1.8 connect reports failures that way).
    pub fn empty_reply(what: &str) -> Self {
        ApiError::new(
            ErrorKind::Transient,
            ErrorClass::Malformed,
            format!("empty reply to {what}"),
        )
    }

    /// A reply over the size limit; `limit` is how the limit reads ("1 MiB").
    pub fn too_large(what: &str, limit: &str) -> Self {
        ApiError::new(
            ErrorKind::Transient,
            ErrorClass::TooLarge,
            format!("the reply to {what} is over the size limit ({limit})"),
        )
    }

    /// A 200 whose body says `"error": true` (contract 2.4, 3.2).
    pub fn error_reply(what: &str, api_message: &str) -> Self {
        ApiError::new(
            ErrorKind::Transient,
            ErrorClass::ErrorReply,
            format!("Evolution API reported an error for {what}: {api_message}"),
        )
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
            http_status: Some(status),
            server_wide: status == 401,
            ..ApiError::new(kind, ErrorClass::Http(status), message)
        }
    }

    /// A 3xx. Following it would send the apikey header wherever it points, so evoq does not;
    /// the fix is in the configuration, hence permanent and server-wide. `location` should
    /// already have any credentials masked.
    pub fn redirect(status: u16, what: &str, location: Option<&str>) -> Self {
        let target = match location {
            Some(l) if !l.trim().is_empty() => format!("a redirect to {}", l.trim()),
            _ => "a redirect without a Location".to_string(),
        };
        ApiError {
            http_status: Some(status),
            server_wide: true,
            ..ApiError::new(
                ErrorKind::Permanent,
                ErrorClass::Redirect,
                format!(
                    "Evolution API answered {status} to {what}: {target}; evoq does not follow \
                     redirects: point api_url at the final address"
                ),
            )
        }
    }

    /// `GET /` answered a status an Evolution API server never gives there (it needs no key
    /// and always answers 200): api_url points at something else, typically with a wrong path
    /// prefix. Permanent and server-wide: every call of the run would go to the same place.
    pub fn wrong_api_url(status: u16, api_message: Option<String>) -> Self {
        let mut message =
            format!("api_url does not look like an Evolution API server: GET / answered {status}");
        if let Some(m) = api_message {
            message.push_str(&format!(" ({m})"));
        }
        message.push_str(
            "; check api_url in evoq_configure: it must be the address (with any path prefix) \
             at which GET / shows the Evolution API version",
        );
        ApiError {
            http_status: Some(status),
            server_wide: true,
            ..ApiError::new(ErrorKind::Permanent, ErrorClass::WrongApiUrl, message)
        }
    }

    /// api_url cannot even be made into a request (ureq refused the URL). The URL is not
    /// repeated: it may hold credentials.
    pub fn invalid_api_url(what: &str) -> Self {
        ApiError {
            server_wide: true,
            ..ApiError::new(
                ErrorKind::Permanent,
                ErrorClass::WrongApiUrl,
                format!(
                    "api_url cannot be made into a request for {what}; check api_url in \
                     evoq_configure"
                ),
            )
        }
    }

    /// A request could not be built from the settings for another reason than the URL (a key
    /// with a character no header may carry). Neither value is repeated.
    pub fn invalid_settings(what: &str) -> Self {
        ApiError {
            server_wide: true,
            ..ApiError::new(
                ErrorKind::Permanent,
                ErrorClass::Settings,
                format!(
                    "evoq could not build a request for {what} from its settings; check api_url \
                     and api_key in evoq_configure (a line break or another character a URL or \
                     header cannot carry?)"
                ),
            )
        }
    }

    /// The failure's class.
    pub fn error_class(&self) -> ErrorClass {
        self.class
    }

    /// The failure's class as its stable label (see `ErrorClass`): `timeout`, `http_500`...
    pub fn class(&self) -> String {
        self.class.label()
    }

    /// True when a 400 says the body had the shape of the other dialect: the server was
    /// probably upgraded (or downgraded) since its version was probed, and probing again
    /// should fix it.
    /// - v2 given a v1 webhook/set body: `instance requires property "webhook"`;
    /// - v1.8 given a v2 webhook/set body: `instance requires property "url"`;
    /// - v2 given a create body without `integration`: `Invalid integration`.
    pub fn suggests_other_version(&self) -> bool {
        const SIGNS: [&str; 3] = [
            "requires property \"webhook\"",
            "requires property \"url\"",
            "Invalid integration",
        ];
        self.http_status == Some(400) && SIGNS.iter().any(|s| self.message.contains(s))
    }

    /// The message made safe to store where users can read it: NUL characters removed (a text
    /// column refuses them), every secret replaced by `[redacted]`, control characters and
    /// runs of white space folded into one space, and the whole cut to `MAX_MESSAGE_CHARS` on
    /// a character boundary. Secrets are replaced before the cut, so a cut cannot leave a
    /// recognisable part of one behind.
    pub fn scrubbed(mut self, secrets: &[&str]) -> ApiError {
        self.message = scrub(&self.message, secrets);
        self
    }
}

fn scrub(message: &str, secrets: &[&str]) -> String {
    let mut text = message.replace('\0', "");
    let mut secrets: Vec<String> = secrets
        .iter()
        .map(|s| s.replace('\0', ""))
        .filter(|s| s.chars().count() >= MIN_SECRET_CHARS)
        .collect();
    // Longest first, so a secret that contains another is replaced whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    for secret in &secrets {
        text = text.replace(secret.as_str(), REDACTED);
    }
    let folded = text
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|word| !word.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if folded.chars().count() <= MAX_MESSAGE_CHARS {
        return folded;
    }
    // Mark the cut so a reader knows there was more.
    let mut cut: String = folded.chars().take(MAX_MESSAGE_CHARS - 1).collect();
    cut.push('…');
    cut
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

    #[test]
    fn every_constructor_has_its_label() {
        let cases = [
            (ApiError::unreachable("x"), "unreachable"),
            (ApiError::timeout("x"), "timeout"),
            (ApiError::network("x"), "network"),
            (ApiError::http(500, "x", None), "http_500"),
            (ApiError::http(401, "x", None), "http_401"),
            (ApiError::redirect(307, "GET /", None), "redirect"),
            (ApiError::wrong_api_url(404, None), "wrong_api_url"),
            (ApiError::invalid_api_url("GET /"), "wrong_api_url"),
            (ApiError::invalid_settings("GET /"), "settings"),
            (ApiError::malformed("x", "y"), "malformed"),
            (ApiError::empty_reply("x"), "malformed"),
            (ApiError::too_large("x", "1 MiB"), "too_large"),
            (ApiError::error_reply("x", "y"), "error_reply"),
            (ApiError::not_found("x"), "not_found"),
            (ApiError::deadline("x"), "deadline"),
            (ApiError::transient("x"), "other"),
        ];
        for (e, label) in cases {
            assert_eq!(e.class(), label, "{e:?}");
            assert_eq!(e.error_class().label(), label);
        }
    }

    #[test]
    fn redirects_say_where_they_point_and_are_configuration() {
        let e = ApiError::redirect(307, "GET /", Some("https://host/path"));
        assert_eq!(
            e.message,
            "Evolution API answered 307 to GET /: a redirect to https://host/path; evoq does not \
             follow redirects: point api_url at the final address"
        );
        assert_eq!(
            (e.kind, e.server_wide, e.http_status),
            (ErrorKind::Permanent, true, Some(307))
        );
        assert!(ApiError::redirect(301, "GET /", None)
            .message
            .contains("a redirect without a Location"));
    }

    #[test]
    fn a_wrong_api_url_is_permanent_and_server_wide() {
        let e = ApiError::wrong_api_url(404, Some("Cannot GET /evo/".into()));
        assert!(e
            .message
            .starts_with("api_url does not look like an Evolution API server: GET / answered 404"));
        assert!(e.message.contains("Cannot GET /evo/"));
        assert_eq!((e.kind, e.server_wide), (ErrorKind::Permanent, true));
    }

    #[test]
    fn the_other_dialects_400s_suggest_a_new_probe() {
        let e = |status, m: &str| ApiError::http(status, "POST /webhook/set", Some(m.into()));
        assert!(e(400, "instance requires property \"webhook\"").suggests_other_version());
        assert!(e(400, "instance requires property \"url\"").suggests_other_version());
        assert!(e(400, "Invalid integration").suggests_other_version());
        assert!(!e(400, "qrcode is not of a type(s) boolean").suggests_other_version());
        assert!(!e(500, "Invalid integration").suggests_other_version());
        assert!(!ApiError::transient("Invalid integration").suggests_other_version());
    }

    #[test]
    fn scrubbing_redacts_secrets_before_cutting() {
        let key = "sk-evoq-test-7f3a9c1e-DO-NOT-LEAK";
        let e = ApiError::http(
            502,
            "GET /",
            Some(format!("upstream said: apikey: {key}; token TOK-123456")),
        )
        .scrubbed(&[key, "TOK-123456"]);
        assert!(!e.message.contains(key));
        assert!(!e.message.contains("TOK-123456"));
        assert!(e.message.contains("apikey: [redacted]; token [redacted]"));

        // A key that straddles the cut is replaced whole, not left half visible.
        let long = format!(
            "{}{key}{}",
            "x".repeat(MAX_MESSAGE_CHARS - 10),
            "y".repeat(50)
        );
        let cut = scrub(&long, &[key]);
        assert!(!cut.contains("sk-evoq"), "{cut}");
        assert_eq!(cut.chars().count(), MAX_MESSAGE_CHARS);
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn scrubbing_removes_nul_folds_lines_and_cuts_on_a_char_boundary() {
        assert_eq!(scrub("a\0b\n\n  c\td", &[]), "ab c d");
        let long = "é".repeat(MAX_MESSAGE_CHARS * 3);
        let cut = scrub(&long, &[]);
        assert_eq!(cut.chars().count(), MAX_MESSAGE_CHARS);
        assert!(cut.ends_with('…'));
        assert_eq!(scrub("short", &[]), "short");
        assert_eq!(
            scrub(&"x".repeat(MAX_MESSAGE_CHARS), &[]).chars().count(),
            MAX_MESSAGE_CHARS
        );
        assert!(!scrub(&"x".repeat(MAX_MESSAGE_CHARS), &[]).ends_with('…'));
    }

    #[test]
    fn a_secret_with_a_nul_inside_is_still_found() {
        assert_eq!(scrub("key=ab\0cdef!", &["abcdef"]), "key=[redacted]!");
    }

    #[test]
    fn very_short_secrets_do_not_garble_messages() {
        assert_eq!(
            scrub("could not connect", &["k", "", "co"]),
            "could not connect"
        );
    }
}
