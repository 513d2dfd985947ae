//! psql's report of a failed statement, read back into PostgREST's error body and status.
//!
//! psql runs with `VERBOSITY=verbose`, so an error reads
//! `psql:<stdin>:6: ERROR:  42501: permission denied for function f`, then `DETAIL:  `,
//! `HINT:  `, `CONTEXT:  `, `LOCATION:  ` lines.

#[derive(Debug, PartialEq)]
pub struct SqlError {
    pub code: String,
    pub message: String,
    pub details: Option<String>,
    pub hint: Option<String>,
}

/// The SQLSTATE after `ERROR:  ` (or FATAL/PANIC) in psql's verbose output:
/// `psql:<stdin>:6: ERROR:  42501: permission denied for function f`.
fn split_sqlstate(line: &str) -> Option<(String, String)> {
    let mut from = 0;
    while let Some(pos) = line[from..].find(":  ") {
        let start = from + pos + 3;
        let rest = &line[start..];
        let code: String = rest.chars().take(5).collect();
        if code.len() == 5
            && code
                .chars()
                .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase())
            && rest[5..].starts_with(": ")
        {
            let severity = line[..from + pos].rsplit([' ', ':']).next().unwrap_or("");
            if ["ERROR", "FATAL", "PANIC"].contains(&severity) {
                return Some((code, rest[7..].to_string()));
            }
        }
        from = start;
    }
    None
}

pub fn parse_error(stderr: &str) -> Option<SqlError> {
    let mut lines = stderr.lines();
    let (code, message) = lines.by_ref().find_map(split_sqlstate)?;
    let mut err = SqlError {
        code,
        message,
        details: None,
        hint: None,
    };
    // Which field a continuation line belongs to: 0 message, 1 details, 2 hint, 3 other.
    let mut field = 0;
    for line in lines {
        if let Some(d) = line.strip_prefix("DETAIL:  ") {
            err.details = Some(d.to_string());
            field = 1;
        } else if let Some(h) = line.strip_prefix("HINT:  ") {
            err.hint = Some(h.to_string());
            field = 2;
        } else if is_other_field(line) {
            field = 3;
        } else {
            let target = match field {
                0 => Some(&mut err.message),
                1 => err.details.as_mut(),
                2 => err.hint.as_mut(),
                _ => None,
            };
            if let Some(t) = target {
                t.push('\n');
                t.push_str(line);
            }
        }
    }
    Some(err)
}

/// A line of another field of a verbose report (`CONTEXT:  `, `LOCATION:  `, `SCHEMA NAME:  `,
/// `LINE 1: `, ...) or a new psql message: it ends the message, detail or hint before it.
fn is_other_field(line: &str) -> bool {
    let tagged = line.split_once(":  ").is_some_and(|(tag, _)| {
        !tag.is_empty() && tag.chars().all(|c| c.is_ascii_uppercase() || c == ' ')
    });
    tagged || line.starts_with("LINE ") || line.starts_with("psql:")
}

/// PostgREST's HTTP status for an SQLSTATE (its `pgErrorStatus`); `anon`: the call ran as the
/// anonymous role (insufficient privilege is then 401, asking for credentials, else 403).
pub fn status_for(code: &str, anon: bool) -> u16 {
    let class = &code[..2.min(code.len())];
    match code {
        "23503" | "23505" => return 409,
        "25006" => return 405,
        "53400" => return 500,
        "42883" | "42P01" => return 404,
        "42P17" => return 500,
        "42501" => return if anon { 401 } else { 403 },
        "P0001" => return 400,
        _ => {}
    }
    if let Some(n) = code.strip_prefix("PT") {
        return n
            .parse()
            .ok()
            .filter(|s| (100..600).contains(s))
            .unwrap_or(500);
    }
    match class {
        "08" | "53" => 503,
        "0L" | "0P" | "28" => 403,
        "09" | "25" | "2D" | "38" | "39" | "3B" | "40" | "54" | "55" | "57" | "58" | "F0"
        | "HV" | "P0" | "XX" => 500,
        _ => 400,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_verbose_errors() {
        let e = parse_error(
            "psql:<stdin>:6: ERROR:  P0001: not allowed\nline two\nDETAIL:  d1\nHINT:  ask an admin\n\
             CONTEXT:  PL/pgSQL function f(jsonb) line 1 at RAISE\nLOCATION:  exec_stmt_raise, pl_exec.c:3911\n",
        )
        .unwrap();
        assert_eq!(
            e,
            SqlError {
                code: "P0001".into(),
                message: "not allowed\nline two".into(),
                details: Some("d1".into()),
                hint: Some("ask an admin".into()),
            }
        );
        let e = parse_error("psql:<stdin>:6: ERROR:  42501: permission denied for function f: x\n")
            .unwrap();
        assert_eq!(e.code, "42501");
        assert_eq!(e.message, "permission denied for function f: x");
        assert!(parse_error("psql: error: connection to server failed\n").is_none());
    }

    #[test]
    fn statuses() {
        assert_eq!(status_for("42501", true), 401);
        assert_eq!(status_for("42501", false), 403);
        assert_eq!(status_for("P0001", true), 400);
        assert_eq!(status_for("22P02", true), 400);
        assert_eq!(status_for("23514", true), 400);
        assert_eq!(status_for("23505", true), 409);
        assert_eq!(status_for("42883", true), 404);
        assert_eq!(status_for("57014", true), 500);
        assert_eq!(status_for("PT418", true), 418);
        assert_eq!(status_for("0A000", true), 400);
    }
}
