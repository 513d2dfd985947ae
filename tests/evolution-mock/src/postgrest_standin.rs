//! `postgrest-standin [--port 3000] [--role anon] [--psql psql] -- <psql args...>`
//!
//! A stand-in for PostgREST's RPC path, for tests on machines where PostgREST is not
//! packaged. `POST /rest/v1/rpc/<function>` (or `/rpc/<function>`) with a JSON body runs, in
//! one `psql` per request (`-v ON_ERROR_STOP=1 -At -q`, script on stdin):
//!
//! ```sql
//! BEGIN;
//! SET LOCAL ROLE :"role";
//! SELECT set_config('request.headers', :'headers', true), set_config('request.method', 'POST', true),
//!        set_config('request.path', :'path', true) \gset
//! SELECT :"function"(:'body'::jsonb);
//! COMMIT;
//! ```
//!
//! `body`, `headers` (the request's headers as a JSON object, names lower-cased, as
//! PostgREST sets `request.headers`), `path` (`/rpc/<function>`, as PostgREST sees it
//! behind Supabase's gateway), `role` and `function` are psql variables given with `-v`, so
//! psql quotes them; a value over 100 000 bytes (the kernel caps one argument at 128 KiB)
//! goes through a private temporary file read with `\set name `cat 'file'``. Success: 200
//! with psql's output as the body (`null` when it printed nothing). An SQL error: PostgREST's
//! status for the SQLSTATE (42501 → 401 for the anon role, else 403; P0001, 22xxx and most
//! others → 400; 23503/23505 → 409; ...) and `{"code", "message", "details", "hint"}`,
//! read from psql's verbose error output. Other paths: 404. Bodies over 1 MiB: 413.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

const USAGE: &str =
    "usage: postgrest-standin [--port 3000] [--role anon] [--psql psql] -- <psql args...>";
const MAX_BODY: usize = 1 << 20;
/// Longest psql variable passed as an argument; longer ones go through a file.
const MAX_ARG: usize = 100_000;

struct Config {
    port: u16,
    role: String,
    psql: String,
    psql_args: Vec<String>,
}

fn parse_args(args: &[String]) -> Result<Config, String> {
    let mut cfg = Config {
        port: 3000,
        role: "anon".into(),
        psql: "psql".into(),
        psql_args: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == "--" {
            cfg.psql_args = it.cloned().collect();
            break;
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f, Some(v.to_string())),
            None => (arg.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag {
            "--port" => {
                let v = value()?;
                cfg.port = v.parse().map_err(|_| format!("--port: not a port: {v}"))?;
            }
            "--role" => cfg.role = value()?,
            "--psql" => cfg.psql = value()?,
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    if cfg.role.is_empty() {
        return Err("--role must not be empty".into());
    }
    Ok(cfg)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = match parse_args(&args) {
        Ok(c) => Arc::new(c),
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    let listener = match std::net::TcpListener::bind(("127.0.0.1", cfg.port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "postgrest-standin: cannot listen on 127.0.0.1:{}: {e}",
                cfg.port
            );
            return ExitCode::FAILURE;
        }
    };
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(cfg.port);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(512)
        .thread_name("postgrest-standin")
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("postgrest-standin: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listener = {
        let _guard = runtime.enter();
        match listener
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(listener))
        {
            Ok(l) => l,
            Err(e) => {
                eprintln!("postgrest-standin: {e}");
                return ExitCode::FAILURE;
            }
        }
    };
    runtime.spawn(accept_loop(listener, cfg));
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "postgrest-standin listening on http://127.0.0.1:{port}"
    );
    let _ = out.flush();
    drop(out);
    loop {
        std::thread::park();
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, cfg: Arc<Config>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let cfg = Arc::clone(&cfg);
        tokio::spawn(async move {
            let service = service_fn(move |request| serve(Arc::clone(&cfg), request));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A reply: status, JSON text, extra headers.
struct Answer {
    status: u16,
    body: String,
    www_authenticate: bool,
}

fn answer(status: u16, body: Value) -> Answer {
    Answer {
        status,
        body: body.to_string(),
        www_authenticate: false,
    }
}

/// PostgREST's own error shape.
fn pgrst_error(status: u16, code: &str, message: &str) -> Answer {
    answer(
        status,
        json!({"code": code, "details": null, "hint": null, "message": message}),
    )
}

fn respond(a: Answer) -> Response<Full<Bytes>> {
    let mut b = Response::builder()
        .status(a.status)
        .header("Content-Type", "application/json; charset=utf-8");
    if a.www_authenticate {
        b = b.header("WWW-Authenticate", "Bearer");
    }
    b.body(Full::new(Bytes::from(a.body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn valid_function(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

async fn serve(
    cfg: Arc<Config>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_string();
    let function = path
        .strip_prefix("/rest/v1/rpc/")
        .or_else(|| path.strip_prefix("/rpc/"))
        .map(|f| f.trim_end_matches('/').to_string())
        .filter(|f| valid_function(f));
    let Some(function) = function else {
        return Ok(respond(pgrst_error(
            404,
            "PGRST125",
            "Invalid path specified in request URL",
        )));
    };
    if parts.method != hyper::Method::POST {
        return Ok(respond(pgrst_error(
            405,
            "PGRST117",
            &format!("Unsupported HTTP method: {}", parts.method),
        )));
    }
    let declared = parts
        .headers
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Ok(respond(pgrst_error(413, "PGRST413", "Payload Too Large")));
    }
    let raw = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let too_big = e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            return Ok(respond(if too_big {
                pgrst_error(413, "PGRST413", "Payload Too Large")
            } else {
                pgrst_error(400, "PGRST102", "Could not read the request body")
            }));
        }
    };
    let text = String::from_utf8_lossy(&raw);
    let body_json = if text.trim().is_empty() {
        "{}".to_string()
    } else {
        match serde_json::from_str::<Value>(&text) {
            Ok(v) => v.to_string(),
            Err(_) => {
                return Ok(respond(pgrst_error(
                    400,
                    "PGRST102",
                    "Empty or invalid json",
                )))
            }
        }
    };
    let mut headers = BTreeMap::new();
    for (name, value) in &parts.headers {
        headers.insert(
            name.as_str().to_ascii_lowercase(),
            Value::String(String::from_utf8_lossy(value.as_bytes()).into_owned()),
        );
    }
    let headers_json = serde_json::to_string(&headers).unwrap_or_else(|_| "{}".into());
    let rpc_path = format!("/rpc/{function}");
    let outcome = tokio::task::spawn_blocking(move || {
        call(&cfg, &function, &body_json, &headers_json, &rpc_path)
    })
    .await
    .unwrap_or_else(|e| pgrst_error(500, "PGRST000", &format!("handler failed: {e}")));
    Ok(respond(outcome))
}

static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// A temporary file only this user can read; removed on drop.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn create(contents: &str) -> std::io::Result<TempFile> {
        use std::os::unix::fs::OpenOptionsExt;
        let n = TEMP_SEQ.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir();
        let path = dir.join(format!("postgrest-standin-{}-{n}.json", std::process::id()));
        let safe = path.to_str().is_some_and(|p| {
            p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "/_.-".contains(c))
        });
        if !safe {
            return Err(std::io::Error::other(format!(
                "temporary directory path not usable in a psql command: {}",
                dir.display()
            )));
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        f.write_all(contents.as_bytes())?;
        Ok(TempFile(path))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs the call in psql and maps the outcome to a PostgREST reply.
fn call(cfg: &Config, function: &str, body: &str, headers: &str, path: &str) -> Answer {
    let vars = [
        ("role", cfg.role.as_str()),
        ("function", function),
        ("body", body),
        ("headers", headers),
        ("path", path),
    ];
    let mut cmd = Command::new(&cfg.psql);
    cmd.args(&cfg.psql_args).args([
        "-v",
        "ON_ERROR_STOP=1",
        "-At",
        "-q",
        "-v",
        "VERBOSITY=verbose",
    ]);
    let mut script = String::new();
    let mut files = Vec::new();
    for (name, value) in vars {
        if value.len() <= MAX_ARG {
            cmd.arg("-v").arg(format!("{name}={value}"));
        } else {
            match TempFile::create(value) {
                Ok(f) => {
                    script.push_str(&format!("\\set {name} `cat '{}'`\n", f.0.display()));
                    files.push(f);
                }
                Err(e) => return pgrst_error(500, "PGRST000", &e.to_string()),
            }
        }
    }
    script.push_str(
        "\\set VERBOSITY verbose\n\
         BEGIN;\n\
         SET LOCAL ROLE :\"role\";\n\
         SELECT set_config('request.headers', :'headers', true) AS headers, \
         set_config('request.method', 'POST', true) AS method, \
         set_config('request.path', :'path', true) AS path \\gset pgrst_\n\
         SELECT :\"function\"(:'body'::jsonb);\n\
         COMMIT;\n",
    );
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return pgrst_error(503, "PGRST000", &format!("cannot run {}: {e}", cfg.psql)),
    };
    if let Some(mut stdin) = child.stdin.take() {
        // A psql that exits early closes the pipe; its exit status tells what happened.
        let _ = stdin.write_all(script.as_bytes());
    }
    let out = match child.wait_with_output() {
        Ok(o) => o,
        Err(e) => return pgrst_error(503, "PGRST000", &format!("psql failed: {e}")),
    };
    drop(files);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        let result = stdout.strip_suffix('\n').unwrap_or(&stdout);
        return Answer {
            status: 200,
            body: if result.is_empty() {
                "null".into()
            } else {
                result.to_string()
            },
            www_authenticate: false,
        };
    }
    match parse_error(&stderr) {
        Some(err) => {
            let status = status_for(&err.code, cfg.role == "anon");
            Answer {
                status,
                body: json!({
                    "code": err.code,
                    "details": err.details,
                    "hint": err.hint,
                    "message": err.message,
                })
                .to_string(),
                www_authenticate: status == 401,
            }
        }
        // No SQLSTATE: psql could not connect or died.
        None => pgrst_error(503, "PGRST000", stderr.trim()),
    }
}

#[derive(Debug, PartialEq)]
struct SqlError {
    code: String,
    message: String,
    details: Option<String>,
    hint: Option<String>,
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

fn parse_error(stderr: &str) -> Option<SqlError> {
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

/// PostgREST's HTTP status for an SQLSTATE (its `pgErrorStatus`).
fn status_for(code: &str, anon: bool) -> u16 {
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

    #[test]
    fn function_names() {
        assert!(valid_function("evoq_enqueue"));
        assert!(valid_function("_x1"));
        assert!(!valid_function("1x"));
        assert!(!valid_function("Evoq"));
        assert!(!valid_function("a;drop"));
        assert!(!valid_function(""));
    }
}
