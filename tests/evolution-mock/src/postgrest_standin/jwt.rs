//! The JWT part of PostgREST's request handling, as far as a stand-in needs it: the claims of
//! `Authorization: Bearer <jwt>` become `request.jwt.claims`, and their `role` the role the
//! call runs as.
//!
//! The signature is NOT checked (the stand-in has no secret): any token that decodes is
//! believed, `exp` included. Real PostgREST verifies it with `jwt-secret` and answers 401 to a
//! forged token, so a test that passes here with a hand-made token proves nothing about
//! PostgREST's verification, only about what the SQL does with the claims.

use serde_json::{Map, Value};

/// Why a bearer token was refused: PostgREST's code and message (401 for all of them).
#[derive(Debug, PartialEq)]
pub struct JwtError {
    pub code: &'static str,
    pub message: String,
}

fn refused(code: &'static str, message: impl Into<String>) -> JwtError {
    JwtError {
        code,
        message: message.into(),
    }
}

/// The claims of the request's bearer token: `Ok(None)` without one (no `Authorization`
/// header, or another scheme: PostgREST ignores those and serves the anonymous role).
pub fn bearer_claims(authorization: Option<&str>) -> Result<Option<Map<String, Value>>, JwtError> {
    let Some(value) = authorization else {
        return Ok(None);
    };
    let value = value.trim();
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Ok(None);
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(refused(
            "PGRST301",
            "Empty JWT is sent in Authorization header",
        ));
    }
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return Err(refused(
            "PGRST301",
            format!("Expected 3 parts in JWT; got {}", parts.len()),
        ));
    }
    let payload = base64url_decode(parts[1])
        .ok_or_else(|| refused("PGRST301", "JWT cryptographic operation failed"))?;
    let claims = match serde_json::from_slice::<Value>(&payload) {
        Ok(Value::Object(m)) => m,
        _ => return Err(refused("PGRST303", "JWT claims decoding failed")),
    };
    // PostgREST rejects an expired token before touching the database (13: PGRST303; 12 used
    // PGRST301 for the same refusal).
    if let Some(exp) = claims.get("exp").and_then(Value::as_f64) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        if exp <= now {
            return Err(refused("PGRST303", "JWT expired"));
        }
    }
    Ok(Some(claims))
}

/// The role a token asks for: its `role` claim (PostgREST's default `jwt-role-claim-key`).
pub fn claimed_role(claims: &Map<String, Value>) -> Option<&str> {
    claims
        .get("role")
        .and_then(Value::as_str)
        .filter(|r| !r.is_empty())
}

/// RFC 4648 base64url, with or without `=` padding (JWTs leave it out).
fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // A lone leftover character (6 bits) cannot end a valid encoding.
    if bits >= 6 {
        return None;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn b64(bytes: &[u8]) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
            for i in 0..=chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }

    fn token(claims: &Value) -> String {
        format!(
            "Bearer {}.{}.sig",
            b64(br#"{"alg":"HS256","typ":"JWT"}"#),
            b64(claims.to_string().as_bytes())
        )
    }

    #[test]
    fn decodes_base64url() {
        for s in [
            "",
            "f",
            "fo",
            "foo",
            "foob",
            "fooba",
            "foobar",
            "\u{ff}\u{fe}?>",
        ] {
            assert_eq!(base64url_decode(&b64(s.as_bytes())).unwrap(), s.as_bytes());
        }
        assert_eq!(base64url_decode("Zm9vYg==").unwrap(), b"foob");
        assert_eq!(base64url_decode("-_8").unwrap(), [0xfb, 0xff]);
        assert!(base64url_decode("Zm9v+").is_none());
        assert!(base64url_decode("Z").is_none());
    }

    #[test]
    fn claims_and_role() {
        let claims = json!({"sub": "u1", "role": "authenticated", "exp": 4_000_000_000u64});
        let got = bearer_claims(Some(&token(&claims))).unwrap().unwrap();
        assert_eq!(Value::Object(got.clone()), claims);
        assert_eq!(claimed_role(&got), Some("authenticated"));
        let no_role = bearer_claims(Some(&token(&json!({"sub": "u1"}))))
            .unwrap()
            .unwrap();
        assert_eq!(claimed_role(&no_role), None);
        // The scheme is case-insensitive; other schemes are not PostgREST's business.
        assert!(
            bearer_claims(Some(&token(&claims).replace("Bearer", "bearer")))
                .unwrap()
                .is_some()
        );
        assert_eq!(bearer_claims(None).unwrap(), None);
        assert_eq!(bearer_claims(Some("Basic dXNlcjpwdw==")).unwrap(), None);
    }

    #[test]
    fn refusals() {
        let code = |h: &str| bearer_claims(Some(h)).unwrap_err().code;
        assert_eq!(code("Bearer "), "PGRST301");
        assert_eq!(code("Bearer abc"), "PGRST301");
        assert_eq!(
            bearer_claims(Some("Bearer a.b")).unwrap_err().message,
            "Expected 3 parts in JWT; got 2"
        );
        assert_eq!(code("Bearer a.!!.c"), "PGRST301");
        assert_eq!(code(&token(&json!([1, 2]))), "PGRST303");
        let expired = bearer_claims(Some(&token(&json!({"role": "x", "exp": 1000}))));
        assert_eq!(
            expired.unwrap_err(),
            JwtError {
                code: "PGRST303",
                message: "JWT expired".into()
            }
        );
    }
}
