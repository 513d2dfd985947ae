//! postgrest-standin against a fake psql (a shell script that prints its arguments and its
//! stdin, or fails the way psql does), so no PostgreSQL is needed: the variables, the script,
//! the error mapping, the big-body path. Which function a body reaches is decided by SQL in
//! the catalog and tested against a real PostgreSQL in postgrest_pg.rs.

mod standin;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use standin::{bearer, Standin};

/// The lookup's verdict a real psql prints first when exactly one function matched.
const FOUND: &str =
    r#"{"matches": 1, "chosen": [{"names": [""], "types": ["jsonb"]}], "overloads": []}"#;

const FAKE_PSQL: &str = r#"#!/bin/sh
# Fake psql: prints the lookup's verdict (found), then its arguments and its stdin, or fails as
# psql does for some functions.
script=$(cat)
case "$script" in
  *'\set body `cat '*)
    f=$(printf '%s\n' "$script" | grep '^\\set body' | cut -d"'" -f2)
    printf '%s\nbigbody %s %s\n' "$FOUND" "$(wc -c < "$f" | tr -d ' ')" "$f"
    exit 0;;
esac
for a in "$@"; do
  case "$a" in
    function=raise_p0001)
      printf 'psql:<stdin>:6: ERROR:  P0001: not allowed here\nHINT:  ask an admin\nCONTEXT:  PL/pgSQL function raise_p0001(jsonb) line 3 at RAISE\nLOCATION:  exec_stmt_raise, pl_exec.c:3911\n' >&2
      exit 3;;
    function=denied)
      printf 'psql:<stdin>:6: ERROR:  42501: permission denied for function denied\nLOCATION:  aclcheck_error, aclchk.c:2806\n' >&2
      exit 3;;
    function=dup)
      printf 'psql:<stdin>:6: ERROR:  23505: duplicate key value violates unique constraint "t_pkey"\nDETAIL:  Key (id)=(1) already exists.\nSCHEMA NAME:  public\n' >&2
      exit 3;;
    function=bad_input)
      printf 'psql:<stdin>:6: ERROR:  22P02: invalid input syntax for type uuid: "x"\n' >&2
      exit 3;;
    function=down)
      printf 'psql: error: connection to server on socket "/tmp/.s.PGSQL.55432" failed: No such file or directory\n' >&2
      exit 2;;
    function=nothing)
      printf '%s\n' "$FOUND"
      exit 0;;
    function=slow)
      sleep 0.4;;
  esac
done
printf '%s\nARGS\n' "$FOUND"
for a in "$@"; do printf '%s\n' "$a"; done
printf 'STDIN\n%s\n' "$script"
"#;

fn fake_psql() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("fake-psql-{}.sh", std::process::id()));
        let script = FAKE_PSQL.replacen("\n", &format!("\nFOUND='{FOUND}'\n"), 1);
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path.to_str().unwrap().to_string()
    })
}

/// A stand-in whose psql is the fake.
fn start(role: &str) -> Standin {
    Standin::start(&[
        "--role",
        role,
        "--psql",
        fake_psql(),
        "--",
        "-h",
        "/tmp",
        "-p",
        "55432",
        "-d",
        "evoq",
        "-U",
        "postgres",
        "-X",
        "-q",
    ])
}

/// The fake's output: (arguments, stdin).
fn echoed(body: &str) -> (Vec<String>, String) {
    let rest = body
        .strip_prefix("ARGS\n")
        .unwrap_or_else(|| panic!("{body}"));
    let (args, stdin) = rest.split_once("STDIN\n").unwrap();
    (
        args.lines().map(str::to_string).collect(),
        stdin.to_string(),
    )
}

#[test]
fn rpc_call_runs_psql_with_variables_and_script() {
    let s = start("anon");
    let r = s.post(
        "/rest/v1/rpc/evoq_echo",
        r#"{"user_id": "u1", "quote": "it's"}"#,
        &[("Authorization", "Basic abc"), ("X-Client-Info", "Test/1")],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.content_type.as_deref(),
        Some("application/json; charset=utf-8")
    );
    let (args, stdin) = echoed(&r.body);
    // The given psql arguments first, then the stand-in's own.
    assert_eq!(
        args[..10],
        ["-h", "/tmp", "-p", "55432", "-d", "evoq", "-U", "postgres", "-X", "-q"]
    );
    assert_eq!(
        args[10..16],
        [
            "-v",
            "ON_ERROR_STOP=1",
            "-At",
            "-q",
            "-v",
            "VERBOSITY=verbose"
        ]
    );
    let var = |name: &str| -> String {
        let i = args
            .iter()
            .position(|a| a.starts_with(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no -v {name}: {args:?}"));
        assert_eq!(args[i - 1], "-v");
        args[i][name.len() + 1..].to_string()
    };
    assert_eq!(var("role"), "anon");
    assert_eq!(var("schema"), "public");
    assert_eq!(var("function"), "evoq_echo");
    assert_eq!(var("path"), "/rpc/evoq_echo");
    // The body as sent; its keys, sorted, for the lookup; no token: the anonymous claims.
    assert_eq!(var("body"), r#"{"user_id": "u1", "quote": "it's"}"#);
    assert_eq!(var("keys"), r#"["quote","user_id"]"#);
    assert_eq!(var("claims"), r#"{"role":"anon"}"#);
    let headers: Value = serde_json::from_str(&var("headers")).unwrap();
    assert_eq!(headers["authorization"], "Basic abc");
    assert_eq!(headers["x-client-info"], "Test/1");
    assert_eq!(headers["content-type"], "application/json");
    assert!(headers
        .as_object()
        .unwrap()
        .keys()
        .all(|k| *k == k.to_lowercase()));
    // The script: one transaction, the role, the request settings, the lookup, the call.
    let want = [
        "BEGIN;",
        "SET LOCAL ROLE :\"role\";",
        "set_config('request.jwt.claims', :'claims', true)",
        "set_config('request.headers', :'headers', true)",
        "set_config('request.method', 'POST', true)",
        "set_config('request.path', :'path', true)",
        "n.nspname = :'schema' AND p.proname = :'function'",
        "\\echo :pgrst_lookup",
        "\\if :pgrst_found",
        "SELECT :'pgrst_prepare' \\gexec",
        "EXECUTE pgrst_call(:'body');",
        "\\endif",
        "COMMIT;",
    ];
    let mut at = 0;
    for w in want {
        let pos = stdin[at..]
            .find(w)
            .unwrap_or_else(|| panic!("{w} not after {at} in:\n{stdin}"));
        at += pos + w.len();
    }
    // The user's data never appears in the script itself.
    assert!(
        !stdin.contains("it's") && !stdin.contains("Basic"),
        "{stdin}"
    );

    // The short path works too; no output is JSON null.
    let r = s.post("/rpc/evoq_echo", "{}", &[]);
    assert_eq!(r.status, 200);
    let r = s.post("/rpc/nothing", "{}", &[]);
    assert_eq!((r.status, r.body.as_str()), (200, "null"));
    // An empty body is {}.
    let r = s.post("/rpc/evoq_echo", "", &[]);
    let (args, _) = echoed(&r.body);
    assert!(args.contains(&"body={}".to_string()), "{args:?}");
    assert!(args.contains(&"keys=[]".to_string()), "{args:?}");
    // A body that is not an object has no keys to match by name.
    let r = s.post("/rpc/evoq_echo", "[1, 2]", &[]);
    let (args, _) = echoed(&r.body);
    assert!(args.contains(&"keys=null".to_string()), "{args:?}");
}

#[test]
fn bearer_tokens_set_claims_and_role() {
    let s = start("anon");
    let claims = json!({"sub": "u1", "role": "authenticated", "email": "it's@x"});
    let auth = bearer(&claims);
    let r = s.post("/rpc/evoq_echo", "{}", &[("Authorization", &auth)]);
    assert_eq!(r.status, 200, "{}", r.body);
    let (args, _) = echoed(&r.body);
    let var = |name: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name}: {args:?}"))
            .to_string()
    };
    assert_eq!(
        serde_json::from_str::<Value>(&var("claims")).unwrap(),
        claims
    );
    assert_eq!(var("role"), "authenticated");
    // No role claim: the anonymous role.
    let auth = bearer(&json!({"sub": "u1"}));
    let (args, _) = echoed(
        &s.post("/rpc/evoq_echo", "{}", &[("Authorization", &auth)])
            .body,
    );
    assert!(args.contains(&"role=anon".to_string()), "{args:?}");
    // Refused before psql runs, as PostgREST refuses them.
    for (auth, code) in [
        ("Bearer ".to_string(), "PGRST301"),
        ("Bearer not-a-jwt".to_string(), "PGRST301"),
        (
            bearer(&json!({"role": "authenticated", "exp": 1000})),
            "PGRST303",
        ),
    ] {
        let r = s.post("/rpc/evoq_echo", "{}", &[("Authorization", &auth)]);
        assert_eq!(
            (r.status, r.json()["code"].clone()),
            (401, json!(code)),
            "{auth}"
        );
        assert!(r
            .www_authenticate
            .unwrap()
            .starts_with("Bearer error=\"invalid_token\""));
    }
}

#[test]
fn sql_errors_answer_like_postgrest() {
    let s = start("anon");
    let r = s.post("/rest/v1/rpc/raise_p0001", "{}", &[]);
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json(),
        json!({"code": "P0001", "message": "not allowed here", "hint": "ask an admin", "details": null})
    );
    let r = s.post("/rest/v1/rpc/denied", "{}", &[]);
    assert_eq!(r.status, 401);
    assert_eq!(r.www_authenticate.as_deref(), Some("Bearer"));
    assert_eq!(
        r.json(),
        json!({"code": "42501", "message": "permission denied for function denied", "hint": null, "details": null})
    );
    let r = s.post("/rest/v1/rpc/dup", "{}", &[]);
    assert_eq!(r.status, 409);
    assert_eq!(r.json()["details"], "Key (id)=(1) already exists.");
    let r = s.post("/rest/v1/rpc/bad_input", "{}", &[]);
    assert_eq!((r.status, r.json()["code"].clone()), (400, json!("22P02")));
    // psql could not connect: 503 as PostgREST without a database.
    let r = s.post("/rest/v1/rpc/down", "{}", &[]);
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["code"], "PGRST000");
    assert!(r.json()["message"]
        .as_str()
        .unwrap()
        .contains("connection to server"));

    // A token's role, not the anonymous one: insufficient privilege is 403.
    let auth = bearer(&json!({"role": "authenticated"}));
    let r = s.post("/rest/v1/rpc/denied", "{}", &[("Authorization", &auth)]);
    assert_eq!(r.status, 403);
    assert_eq!(r.www_authenticate, None);
    // --role names the anonymous role (PostgREST's db-anon-role).
    let s = start("web_anon");
    let r = s.post("/rest/v1/rpc/evoq_echo", "{}", &[]);
    let (args, _) = echoed(&r.body);
    assert!(args.contains(&"role=web_anon".to_string()));
    assert_eq!(s.post("/rest/v1/rpc/denied", "{}", &[]).status, 401);
}

#[test]
fn paths_methods_and_bodies() {
    let s = start("anon");
    for path in [
        "/rest/v1/tables",
        "/rest/v1/rpc/",
        "/rest/v1/rpc/Evoq",
        "/rest/v1/rpc/a;drop",
        "/rpc/1x",
        "/",
    ] {
        let r = s.post(path, "{}", &[]);
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(r.json()["code"], "PGRST125");
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let r = agent
        .get(format!("{}/rest/v1/rpc/evoq_echo", s.base))
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    let r = s.post("/rest/v1/rpc/evoq_echo", "{not json", &[]);
    assert_eq!(
        (r.status, r.json()["code"].clone()),
        (400, json!("PGRST102"))
    );
    // Only JSON bodies are imitated.
    let r = s.post(
        "/rest/v1/rpc/evoq_echo",
        "x=1",
        &[("Content-Type", "application/x-www-form-urlencoded")],
    );
    assert_eq!(
        (r.status, r.json()["code"].clone()),
        (415, json!("PGRST107"))
    );
    let r = s.post(
        "/rest/v1/rpc/evoq_echo",
        "{}",
        &[("Content-Type", "application/json; charset=utf-8")],
    );
    assert_eq!(r.status, 200);

    // Over 1 MiB: 413 without reading it.
    let addr = s.base.strip_prefix("http://").unwrap();
    let mut tcp = TcpStream::connect(addr).unwrap();
    write!(
        tcp,
        "POST /rest/v1/rpc/evoq_echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        (1 << 20) + 1
    )
    .unwrap();
    let mut head = [0u8; 12];
    tcp.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 413");

    // A body past the argument limit goes through a private temporary file, removed after.
    let big = json!({"blob": "x".repeat(200_000)}).to_string();
    let r = s.post("/rest/v1/rpc/evoq_echo", &big, &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    let mut words = r.body.split_whitespace();
    assert_eq!(words.next(), Some("bigbody"));
    assert_eq!(words.next(), Some(big.len().to_string().as_str()));
    let file = words.next().unwrap();
    assert!(!std::path::Path::new(file).exists(), "{file} left behind");
    // Exactly 1 MiB is accepted.
    let pad = (1 << 20) - json!({"p": ""}).to_string().len();
    let max = json!({"p": "y".repeat(pad)}).to_string();
    assert_eq!(max.len(), 1 << 20);
    assert_eq!(s.post("/rest/v1/rpc/evoq_echo", &max, &[]).status, 200);
}

#[test]
fn concurrent_requests_run_in_parallel() {
    let s = std::sync::Arc::new(start("anon"));
    let t = Instant::now();
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let s = std::sync::Arc::clone(&s);
            std::thread::spawn(move || s.post("/rest/v1/rpc/slow", "{}", &[]).status)
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), 200);
    }
    // 8 × 400 ms serially would be 3.2 s.
    assert!(
        t.elapsed() < Duration::from_millis(2000),
        "{:?}",
        t.elapsed()
    );
}
