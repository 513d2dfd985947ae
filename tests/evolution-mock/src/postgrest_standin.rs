//! `postgrest-standin [--port 3000] [--role anon] [--schema public] [--psql psql] -- <psql args...>`
//!
//! A stand-in for PostgREST's RPC path, for tests on machines where PostgREST is not packaged.
//! It follows PostgREST's documented rules, the refusing ones included, because a stand-in
//! kinder than production hides defects: an earlier version passed the whole body as the one
//! argument of any function, so `evoq_webhook(payload jsonb)` passed every test here and was
//! unreachable through real PostgREST.
//!
//! `POST /rest/v1/rpc/<function>` (Supabase's gateway path) or `POST /rpc/<function>` with a
//! JSON body runs one `psql` (`-v ON_ERROR_STOP=1 -At -q`, script on stdin) per request:
//!
//! ```sql
//! BEGIN;
//! SET LOCAL ROLE :"role";
//! SELECT set_config('request.jwt.claims', :'claims', true), set_config('request.headers', :'headers', true),
//!        set_config('request.method', 'POST', true), set_config('request.path', :'path', true) \gset
//! -- the lookup of the function in pg_proc, then, if exactly one matched:
//! PREPARE pgrst_call(text) AS SELECT "public"."f"("a" := pgrst_args."a") FROM json_to_record($1::json) AS pgrst_args("a" integer);
//! EXECUTE pgrst_call(:'body');
//! COMMIT;
//! ```
//!
//! Which function, and how its arguments are passed (see `routine` for the SQL), as in
//! PostgREST's docs, "Functions as RPC" (<https://docs.postgrest.org/en/v12/references/api/functions.html>):
//! * "To supply arguments in an API call, include a JSON object in the request payload. Each
//!   key/value of the object will become an argument": each key is a NAMED argument. The
//!   function is found by name in the exposed schema (`--schema`, default `public`) and by
//!   its parameter names: every key must name a parameter, every parameter without a default
//!   must be given. Values reach the function as PostgREST converts them (`json_to_record`:
//!   a `text` parameter gets a JSON string's contents, `json`/`jsonb` the key's JSON).
//! * "Functions with a single unnamed JSON parameter" receive the raw body, whatever its keys
//!   (PostgREST 9+, meant for webhooks). A single NAMED `json`/`jsonb` parameter is an ordinary
//!   named argument: `f(payload jsonb)` called with `{"event": ..., "instance": ..., "data": ...}`
//!   finds nothing. (Before PostgREST PR #4553, merged December 2025, PostgREST answered that
//!   with 404 `42883 function public.f() does not exist`; since, with the PGRST202 below. Both
//!   are 404: unreachable either way.)
//! * `Prefer: params=single-object` (deprecated in 12.2, removed in 13) is not supported: the
//!   header is ignored, as PostgREST 13 ignores it.
//! * No function matches: 404 `{"code": "PGRST202", "message": "Could not find the function
//!   public.f(a, b) in the schema cache", "details": "Searched for the function public.f with
//!   parameters a, b or with a single unnamed json/jsonb parameter, but no matches were found in
//!   the schema cache.", "hint": "Perhaps you meant to call the function public.f(x)" or null}`
//!   (keys sorted; the hint names the overload sharing the most names, where PostgREST
//!   fuzzy-matches). More than one: 300 PGRST203.
//!
//! The request's settings, as PostgREST sets them: `request.headers` (a JSON object, names
//! lower-cased), `request.method`, `request.path` (`/rpc/<function>`, as PostgREST sees it
//! behind the gateway) and `request.jwt.claims`: the payload of `Authorization: Bearer <jwt>`
//! (base64url-decoded middle part), or `{"role": <--role>}` without a token. The call runs as
//! the claims' `role`, else as `--role` (PostgREST's `db-anon-role`, `anon` on Supabase).
//! THE SIGNATURE IS NOT CHECKED: any token that decodes is believed (an expired `exp` is
//! refused, 401 PGRST303; a malformed token 401 PGRST301). Real PostgREST verifies the
//! signature against its `jwt-secret`. The older `request.jwt.claim.<name>` settings are not set.
//!
//! Every value (body, keys, claims, headers, role, schema, function name) is a psql variable
//! given with `-v`, so psql quotes it (`:'v'`, `:"v"`); the identifiers in the call come from
//! the catalog, quoted with `format('%I')`. A value over 100 000 bytes (the kernel caps one
//! argument at 128 KiB) goes through a private temporary file read with `\set name `cat 'file'``.
//!
//! Success: 200 with psql's output of the call as the body (`null` when it printed nothing;
//! results are not re-encoded as PostgREST would). An SQL error: PostgREST's status for the
//! SQLSTATE (42501 → 401 when the call ran as the anonymous role, else 403; P0001, 22xxx and most
//! others → 400; 23503/23505 → 409; ...) and `{"code", "message", "details", "hint"}`, read from
//! psql's verbose error output. A function name outside `[a-z_][a-z0-9_]*` or another path:
//! 404 PGRST125. Bodies over 1 MiB: 413. A `Content-Type` other than `application/json` (or
//! none): 415 (PostgREST's raw `text/plain`, `text/xml`, `application/octet-stream` bodies for a
//! single unnamed text/xml/bytea parameter are not imitated, nor are form or CSV bodies). Not
//! imitated either: `Content-Profile` (choosing among several exposed schemas), GET calls,
//! `db-extra-search-path` (PostgREST sets `search_path`; the stand-in leaves psql's), bulk calls
//! with an array body, and `request.cookies`.

// A binary's root module looks for its modules beside it, among the library's: name the
// directory explicitly.
#[path = "postgrest_standin/jwt.rs"]
mod jwt;
#[path = "postgrest_standin/routine.rs"]
mod routine;
#[path = "postgrest_standin/sql_error.rs"]
mod sql_error;

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

use routine::Lookup;
use sql_error::{parse_error, status_for};

const USAGE: &str = "usage: postgrest-standin [--port 3000] [--role anon] [--schema public] [--psql psql] -- <psql args...>";
const MAX_BODY: usize = 1 << 20;
/// Longest psql variable passed as an argument; longer ones go through a file.
const MAX_ARG: usize = 100_000;

struct Config {
    port: u16,
    /// The anonymous role (PostgREST's `db-anon-role`): requests without a role claim run as it.
    role: String,
    /// The exposed schema (PostgREST's `db-schemas`, one of them).
    schema: String,
    psql: String,
    psql_args: Vec<String>,
}

fn parse_args(args: &[String]) -> Result<Config, String> {
    let mut cfg = Config {
        port: 3000,
        role: "anon".into(),
        schema: "public".into(),
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
            "--schema" => cfg.schema = value()?,
            "--psql" => cfg.psql = value()?,
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    if cfg.role.is_empty() {
        return Err("--role must not be empty".into());
    }
    if cfg.schema.is_empty() {
        return Err("--schema must not be empty".into());
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

/// A reply: status, JSON text, a `WWW-Authenticate` header for a 401.
struct Answer {
    status: u16,
    body: String,
    www_authenticate: Option<String>,
}

fn answer(status: u16, body: Value) -> Answer {
    Answer {
        status,
        body: body.to_string(),
        www_authenticate: None,
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
    if let Some(challenge) = a.www_authenticate {
        b = b.header("WWW-Authenticate", challenge);
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

/// `application/json`, with any parameters (`; charset=utf-8`), or no `Content-Type` at all
/// (PostgREST assumes JSON then).
fn json_content_type(value: Option<&str>) -> bool {
    value.is_none_or(|v| {
        v.split(';')
            .next()
            .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
    })
}

/// One RPC request, read and checked, ready for psql.
struct Call {
    function: String,
    /// The body's text as sent (`{}` for an empty body), already checked to be JSON.
    body: String,
    /// The body's keys, sorted, or None for a body that is not an object.
    keys: Option<Vec<String>>,
    claims: String,
    role: String,
    headers: String,
    path: String,
}

async fn serve(
    cfg: Arc<Config>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let (parts, body) = request.into_parts();
    let call = match read_call(&cfg, parts, body).await {
        Ok(c) => c,
        Err(refusal) => return Ok(respond(refusal)),
    };
    let outcome = tokio::task::spawn_blocking(move || run(&cfg, &call))
        .await
        .unwrap_or_else(|e| pgrst_error(500, "PGRST000", &format!("handler failed: {e}")));
    Ok(respond(outcome))
}

/// Everything PostgREST checks before it touches the database.
async fn read_call(
    cfg: &Config,
    parts: hyper::http::request::Parts,
    body: Incoming,
) -> Result<Call, Answer> {
    let path = parts.uri.path().to_string();
    let function = path
        .strip_prefix("/rest/v1/rpc/")
        .or_else(|| path.strip_prefix("/rpc/"))
        .map(|f| f.trim_end_matches('/').to_string())
        .filter(|f| valid_function(f))
        .ok_or_else(|| pgrst_error(404, "PGRST125", "Invalid path specified in request URL"))?;
    if parts.method != hyper::Method::POST {
        return Err(pgrst_error(
            405,
            "PGRST117",
            &format!("Unsupported HTTP method: {}", parts.method),
        ));
    }
    let header = |name: hyper::header::HeaderName| {
        parts
            .headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let content_type = header(hyper::header::CONTENT_TYPE);
    if !json_content_type(content_type.as_deref()) {
        return Err(pgrst_error(
            415,
            "PGRST107",
            &format!(
                "postgrest-standin imitates only application/json bodies, not {}",
                content_type.unwrap_or_default()
            ),
        ));
    }
    let claims =
        jwt::bearer_claims(header(hyper::header::AUTHORIZATION).as_deref()).map_err(|e| {
            Answer {
                www_authenticate: Some(format!(
                    "Bearer error=\"invalid_token\", error_description=\"{}\"",
                    e.message
                )),
                ..pgrst_error(401, e.code, &e.message)
            }
        })?;
    let role = claims
        .as_ref()
        .and_then(jwt::claimed_role)
        .unwrap_or(&cfg.role)
        .to_string();
    // Without a token PostgREST's claims are just the anonymous role.
    let claims = match claims {
        Some(c) => Value::Object(c).to_string(),
        None => json!({ "role": cfg.role }).to_string(),
    };
    let declared = header(hyper::header::CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(pgrst_error(413, "PGRST413", "Payload Too Large"));
    }
    let raw = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let too_big = e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            return Err(if too_big {
                pgrst_error(413, "PGRST413", "Payload Too Large")
            } else {
                pgrst_error(400, "PGRST102", "Could not read the request body")
            });
        }
    };
    let invalid = || pgrst_error(400, "PGRST102", "Empty or invalid json");
    let text = String::from_utf8(raw.to_vec()).map_err(|_| invalid())?;
    // PostgREST calls a function with an empty body as with {}.
    let text = if text.trim().is_empty() {
        "{}".to_string()
    } else {
        text
    };
    let keys = match serde_json::from_str::<Value>(&text).map_err(|_| invalid())? {
        Value::Object(m) => Some(m.keys().cloned().collect()),
        _ => None,
    };
    let mut headers = BTreeMap::new();
    for (name, value) in &parts.headers {
        headers.insert(
            name.as_str().to_ascii_lowercase(),
            Value::String(String::from_utf8_lossy(value.as_bytes()).into_owned()),
        );
    }
    Ok(Call {
        path: format!("/rpc/{function}"),
        function,
        body: text,
        keys,
        claims,
        role,
        headers: serde_json::to_string(&headers).unwrap_or_else(|_| "{}".into()),
    })
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

/// The script after the variables: the request's transaction, settings, lookup and call.
fn script() -> String {
    format!(
        "\\set VERBOSITY verbose\n\
         BEGIN;\n\
         SET LOCAL ROLE :\"role\";\n\
         SELECT set_config('request.jwt.claims', :'claims', true) AS claims, \
         set_config('request.headers', :'headers', true) AS headers, \
         set_config('request.method', 'POST', true) AS method, \
         set_config('request.path', :'path', true) AS path \\gset pgrst_\n\
         {}\
         COMMIT;\n",
        routine::LOOKUP_AND_CALL
    )
}

/// Runs the lookup and the call in psql and maps the outcome to a PostgREST reply.
fn run(cfg: &Config, call: &Call) -> Answer {
    let keys_json = match &call.keys {
        Some(k) => serde_json::to_string(k).unwrap_or_else(|_| "[]".into()),
        None => "null".into(),
    };
    let vars = [
        ("role", call.role.as_str()),
        ("schema", cfg.schema.as_str()),
        ("function", call.function.as_str()),
        ("keys", keys_json.as_str()),
        ("body", call.body.as_str()),
        ("claims", call.claims.as_str()),
        ("headers", call.headers.as_str()),
        ("path", call.path.as_str()),
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
    let mut script_text = String::new();
    let mut files = Vec::new();
    for (name, value) in vars {
        if value.len() <= MAX_ARG {
            cmd.arg("-v").arg(format!("{name}={value}"));
        } else {
            match TempFile::create(value) {
                Ok(f) => {
                    script_text.push_str(&format!("\\set {name} `cat '{}'`\n", f.0.display()));
                    files.push(f);
                }
                Err(e) => return pgrst_error(500, "PGRST000", &e.to_string()),
            }
        }
    }
    script_text.push_str(&script());
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return pgrst_error(503, "PGRST000", &format!("cannot run {}: {e}", cfg.psql)),
    };
    if let Some(mut stdin) = child.stdin.take() {
        // A psql that exits early closes the pipe; its exit status tells what happened.
        let _ = stdin.write_all(script_text.as_bytes());
    }
    let out = match child.wait_with_output() {
        Ok(o) => o,
        Err(e) => return pgrst_error(503, "PGRST000", &format!("psql failed: {e}")),
    };
    drop(files);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        return answer_output(cfg, call, &stdout);
    }
    match parse_error(&stderr) {
        Some(err) => {
            let status = status_for(&err.code, call.role == cfg.role);
            Answer {
                status,
                body: json!({
                    "code": err.code,
                    "details": err.details,
                    "hint": err.hint,
                    "message": err.message,
                })
                .to_string(),
                www_authenticate: (status == 401).then(|| "Bearer".to_string()),
            }
        }
        // No SQLSTATE: psql could not connect or died.
        None => pgrst_error(503, "PGRST000", stderr.trim()),
    }
}

/// A successful psql run: the lookup's verdict first, then the call's output if it ran.
fn answer_output(cfg: &Config, call: &Call, stdout: &str) -> Answer {
    let (verdict, result) = stdout.split_once('\n').unwrap_or((stdout, ""));
    let lookup: Lookup = match serde_json::from_str(verdict) {
        Ok(l) => l,
        Err(e) => {
            return pgrst_error(
                500,
                "PGRST000",
                &format!("postgrest-standin: unexpected psql output ({e}): {verdict}"),
            )
        }
    };
    if lookup.matches != 1 {
        let (status, body) =
            routine::refusal(&lookup, &cfg.schema, &call.function, call.keys.as_deref());
        return answer(status, body);
    }
    let result = result.strip_suffix('\n').unwrap_or(result);
    Answer {
        status: 200,
        body: if result.is_empty() {
            "null".into()
        } else {
            result.to_string()
        },
        www_authenticate: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_names() {
        assert!(valid_function("evoq_enqueue"));
        assert!(valid_function("_x1"));
        assert!(!valid_function("1x"));
        assert!(!valid_function("Evoq"));
        assert!(!valid_function("a;drop"));
        assert!(!valid_function(""));
    }

    #[test]
    fn content_types() {
        assert!(json_content_type(None));
        assert!(json_content_type(Some("application/json")));
        assert!(json_content_type(Some("Application/JSON; charset=utf-8")));
        assert!(!json_content_type(Some("text/plain")));
        assert!(!json_content_type(Some(
            "application/x-www-form-urlencoded"
        )));
    }

    #[test]
    fn arguments() {
        let args = |a: &[&str]| parse_args(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let cfg = args(&["--port", "0", "--role", "anon", "--", "-h", "x", "-X"]).unwrap();
        assert_eq!(
            (cfg.port, cfg.role.as_str(), cfg.schema.as_str()),
            (0, "anon", "public")
        );
        assert_eq!(cfg.psql_args, ["-h", "x", "-X"]);
        assert_eq!(args(&["--schema=api"]).unwrap().schema, "api");
        assert!(args(&["--schema", ""]).is_err());
    }
}
