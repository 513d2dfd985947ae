//! postgrest-standin against a real PostgreSQL 15: which function a body reaches, with which
//! arguments, as which role, seeing which settings. A throwaway cluster of its own (initdb as
//! `postgres` when run as root, in a temporary directory, listening only on a unix socket
//! there), with plain SQL functions made here; each test works in its own schema. Skipped, with
//! a message, only where PostgreSQL's binaries are absent (PG_BIN, default
//! /usr/lib/postgresql/15/bin).

mod standin;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use standin::{bearer, Standin};

struct Cluster {
    dir: PathBuf,
    port: u16,
    /// Never waited for: it outlives the tests by design (see the watchdog below).
    _watchdog: std::process::Child,
}

fn pg_bin() -> PathBuf {
    PathBuf::from(std::env::var("PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into()))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// PostgreSQL refuses to run as root: as root, run its programs as `postgres`.
fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("sudo");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// The shared cluster, started once; None (after saying so) without PostgreSQL's binaries.
fn cluster() -> Option<&'static Cluster> {
    static CLUSTER: OnceLock<Option<Cluster>> = OnceLock::new();
    CLUSTER
        .get_or_init(|| {
            let bin = pg_bin();
            if !bin.join("initdb").exists() || !bin.join("postgres").exists() {
                eprintln!(
                    "SKIPPED: no PostgreSQL binaries in {} (set PG_BIN); postgrest_pg tests need them",
                    bin.display()
                );
                return None;
            }
            Some(start_cluster(&bin))
        })
        .as_ref()
}

fn start_cluster(bin: &Path) -> Cluster {
    let pid = std::process::id();
    // Only a unix socket: the port names the socket file, no TCP port is taken.
    let port = 22000 + (pid % 1000) as u16;
    let dir = std::env::temp_dir().join(format!("standin-pg-{pid}"));
    let _ = std::fs::remove_dir_all(&dir);
    let made = if is_root() {
        Command::new("install")
            .args(["-d", "-o", "postgres", "-g", "postgres", "-m", "700"])
            .arg(&dir)
            .status()
            .unwrap()
            .success()
    } else {
        std::fs::create_dir(&dir).is_ok()
    };
    assert!(made, "cannot create {}", dir.display());
    let data = dir.join("data");
    let ok = as_postgres(&bin.join("initdb"))
        .args(["-U", "postgres", "--auth=trust", "-N", "-D"])
        .arg(&data)
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "initdb failed");
    // The server lives as long as this test process: a watchdog shell stops it (and removes
    // the directory) once the process that started it is gone, however the tests end.
    let watchdog = format!(
        "'{postgres}' -D '{data}' -p {port} -k '{dir}' -c listen_addresses= -c fsync=off \
         >'{dir}/server.log' 2>&1 & pg=$!; \
         while [ -d /proc/{pid} ] && kill -0 $pg 2>/dev/null; do sleep 0.2; done; \
         kill -INT $pg 2>/dev/null; wait $pg; rm -rf '{dir}'",
        postgres = bin.join("postgres").display(),
        data = data.display(),
        dir = dir.display(),
    );
    let watchdog = as_postgres(Path::new("/bin/sh"))
        .args(["-c", &watchdog])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let cluster = Cluster {
        dir,
        port,
        _watchdog: watchdog,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster.try_sql("SELECT 1").is_err() {
        assert!(Instant::now() < deadline, "PostgreSQL did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    cluster.sql(
        "CREATE ROLE anon NOLOGIN; CREATE ROLE authenticated NOLOGIN;
         GRANT USAGE ON SCHEMA public TO anon, authenticated;",
    );
    cluster
}

impl Cluster {
    fn psql_args(&self) -> Vec<String> {
        [
            "-h",
            self.dir.to_str().unwrap(),
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-X",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn try_sql(&self, sql: &str) -> Result<String, String> {
        let out = Command::new("psql")
            .args(self.psql_args())
            .args(["-q", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn sql(&self, sql: &str) -> String {
        self.try_sql(sql).unwrap_or_else(|e| panic!("{sql}\n{e}"))
    }

    /// A fresh schema the API roles may use, with these functions (`@` stands for the schema).
    fn schema(&self, name: &str, functions: &str) {
        self.sql(&format!(
            "DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name};
             GRANT USAGE ON SCHEMA {name} TO anon, authenticated;
             {}",
            functions.replace('@', name)
        ));
    }

    /// A stand-in over this cluster exposing `schema`.
    fn standin(&self, schema: &str) -> Standin {
        let mut args = vec!["--role", "anon", "--schema", schema, "--"];
        let psql = self.psql_args();
        args.extend(psql.iter().map(String::as_str));
        Standin::start(&args)
    }
}

macro_rules! cluster_or_skip {
    () => {
        match cluster() {
            Some(c) => c,
            None => return,
        }
    };
}

/// An Evolution API webhook delivery, as the server POSTs it.
fn evolution_delivery() -> Value {
    json!({
        "event": "qrcode.updated",
        "instance": "evoq_1",
        "data": {"qrcode": {"code": "2@abc", "base64": "data:image/png;base64,xx"}},
        "date_time": "2026-01-01T10:00:00.000Z",
        "apikey": "k"
    })
}

#[test]
fn body_keys_are_named_arguments() {
    let c = cluster_or_skip!();
    c.schema(
        "named",
        "CREATE FUNCTION @.echo(a integer, b text, doc jsonb, n numeric) RETURNS jsonb LANGUAGE sql
           AS $$ SELECT jsonb_build_object('a', a, 'a_type', pg_typeof(a), 'b', b, 'doc', doc, 'n', n) $$;
         CREATE FUNCTION @.swap(x text, y text) RETURNS text LANGUAGE sql AS $$ SELECT y || x $$;",
    );
    let s = c.standin("named");
    // Each key is the argument of that name: JSON strings' contents for text, the key's JSON
    // for jsonb, a JSON string or number cast to the parameter's type.
    let r = s.post(
        "/rest/v1/rpc/echo",
        r#"{"b": "it's \"quoted\"", "a": "41", "doc": {"k": [1, null]}, "n": 1.5}"#,
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json(),
        json!({"a": 41, "a_type": "integer", "b": "it's \"quoted\"", "doc": {"k": [1, null]}, "n": 1.5})
    );
    // By name, not by position.
    let r = s.post("/rpc/swap", r#"{"y": "1", "x": "2"}"#, &[]);
    assert_eq!((r.status, r.body.as_str()), (200, "12"));
    // A value the parameter's type refuses: PostgreSQL's error, 400.
    let r = s.post(
        "/rpc/echo",
        r#"{"a": "x", "b": "", "doc": null, "n": 1}"#,
        &[],
    );
    assert_eq!((r.status, r.json()["code"].clone()), (400, json!("22P02")));
}

#[test]
fn a_single_unnamed_json_parameter_takes_the_raw_body() {
    let c = cluster_or_skip!();
    c.schema(
        "rawbody",
        "CREATE FUNCTION @.hook(jsonb) RETURNS jsonb LANGUAGE sql AS $$ SELECT $1 $$;
         CREATE FUNCTION @.hook_json(json) RETURNS text LANGUAGE sql AS $$ SELECT $1::text $$;",
    );
    let s = c.standin("rawbody");
    let delivery = evolution_delivery();
    let r = s.post("/rest/v1/rpc/hook", &delivery.to_string(), &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), delivery);
    // json gets the body's text as sent; so does an array; an empty body is {}.
    let r = s.post("/rpc/hook_json", r#"{"b": 1,  "a": 2}"#, &[]);
    assert_eq!(r.body, r#"{"b": 1,  "a": 2}"#);
    assert_eq!(s.post("/rpc/hook", "[1, 2]", &[]).json(), json!([1, 2]));
    assert_eq!(s.post("/rpc/hook", "", &[]).json(), json!({}));
}

#[test]
fn a_named_jsonb_parameter_does_not_take_an_evolution_delivery() {
    // The production failure: evoq_webhook(payload jsonb) behind real PostgREST.
    let c = cluster_or_skip!();
    c.sql(
        "CREATE OR REPLACE FUNCTION public.named_hook(payload jsonb) RETURNS jsonb LANGUAGE sql
           AS $$ SELECT payload $$;",
    );
    let s = c.standin("public");
    let r = s.post(
        "/rest/v1/rpc/named_hook",
        &evolution_delivery().to_string(),
        &[],
    );
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(
        r.json(),
        json!({
            "code": "PGRST202",
            "message": "Could not find the function public.named_hook(apikey, data, date_time, event, instance) in the schema cache",
            "details": "Searched for the function public.named_hook with parameters apikey, data, date_time, event, instance or with a single unnamed json/jsonb parameter, but no matches were found in the schema cache.",
            "hint": "Perhaps you meant to call the function public.named_hook(payload)",
        })
    );
    // It is reached only with the body wrapped in its parameter's name.
    let wrapped = json!({"payload": evolution_delivery()});
    let r = s.post("/rest/v1/rpc/named_hook", &wrapped.to_string(), &[]);
    assert_eq!((r.status, r.json()), (200, evolution_delivery()));
    // Prefer: params=single-object is gone (PostgREST 13): no help either.
    let r = s.post(
        "/rest/v1/rpc/named_hook",
        &evolution_delivery().to_string(),
        &[("Prefer", "params=single-object")],
    );
    assert_eq!(r.status, 404);
}

#[test]
fn required_extra_and_default_arguments() {
    let c = cluster_or_skip!();
    c.schema(
        "defaults",
        "CREATE FUNCTION @.add(a integer, b integer DEFAULT 10) RETURNS integer LANGUAGE sql AS $$ SELECT a + b $$;
         CREATE FUNCTION @.opt(x text DEFAULT 'dx', y text DEFAULT 'dy') RETURNS text LANGUAGE sql AS $$ SELECT x || y $$;
         CREATE FUNCTION @.nothing() RETURNS text LANGUAGE sql AS $$ SELECT 'none' $$;",
    );
    let s = c.standin("defaults");
    let call = |f: &str, body: &str| {
        let r = s.post(&format!("/rpc/{f}"), body, &[]);
        (r.status, r.body)
    };
    // Defaults honoured: a parameter left out keeps its default.
    assert_eq!(call("add", r#"{"a": 1}"#), (200, "11".into()));
    assert_eq!(call("add", r#"{"a": 1, "b": 2}"#), (200, "3".into()));
    assert_eq!(call("opt", "{}"), (200, "dxdy".into()));
    assert_eq!(call("opt", r#"{"y": "Y"}"#), (200, "dxY".into()));
    assert_eq!(call("nothing", "{}"), (200, "none".into()));
    // A required argument missing: 404.
    let r = s.post("/rpc/add", r#"{"b": 2}"#, &[]);
    assert_eq!(r.status, 404);
    assert_eq!(
        r.json()["message"],
        "Could not find the function defaults.add(b) in the schema cache"
    );
    assert_eq!(
        r.json()["hint"],
        "Perhaps you meant to call the function defaults.add(a, b)"
    );
    // A key that names no parameter: 404.
    let r = s.post("/rpc/add", r#"{"a": 1, "c": 3}"#, &[]);
    assert_eq!(
        (r.status, r.json()["code"].clone()),
        (404, json!("PGRST202"))
    );
    let r = s.post("/rpc/nothing", r#"{"a": 1}"#, &[]);
    assert_eq!(
        (r.status, r.json()["code"].clone()),
        (404, json!("PGRST202"))
    );
    // No such function; and one outside the exposed schema is not found either.
    let r = s.post("/rpc/absent", "{}", &[]);
    assert_eq!(
        (r.status, r.json()["message"].clone()),
        (
            404,
            json!("Could not find the function defaults.absent without parameters in the schema cache")
        )
    );
    c.sql("CREATE OR REPLACE FUNCTION public.only_public() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$");
    assert_eq!(s.post("/rpc/only_public", "{}", &[]).status, 404);
}

#[test]
fn overloads_resolve_by_names_or_are_ambiguous() {
    let c = cluster_or_skip!();
    c.schema(
        "overloads",
        "CREATE FUNCTION @.o(x integer) RETURNS text LANGUAGE sql AS $$ SELECT 'x' $$;
         CREATE FUNCTION @.o(y text) RETURNS text LANGUAGE sql AS $$ SELECT 'y' $$;
         CREATE FUNCTION @.same(v integer) RETURNS text LANGUAGE sql AS $$ SELECT 'int' $$;
         CREATE FUNCTION @.same(v text) RETURNS text LANGUAGE sql AS $$ SELECT 'text' $$;
         CREATE FUNCTION @.m(jsonb) RETURNS text LANGUAGE sql AS $$ SELECT 'raw ' || $1::text $$;
         CREATE FUNCTION @.m(a integer) RETURNS text LANGUAGE sql AS $$ SELECT 'named' $$;",
    );
    let s = c.standin("overloads");
    assert_eq!(s.post("/rpc/o", r#"{"x": 1}"#, &[]).body, "x");
    assert_eq!(s.post("/rpc/o", r#"{"y": "a"}"#, &[]).body, "y");
    let r = s.post("/rpc/same", r#"{"v": 1}"#, &[]);
    assert_eq!(r.status, 300);
    assert_eq!(
        r.json(),
        json!({
            "code": "PGRST203",
            "message": "Could not choose the best candidate function between: overloads.same(v => integer), overloads.same(v => text)",
            "details": null,
            "hint": "Try renaming the parameters or the function itself in the database so function overloading can be resolved",
        })
    );
    // Named overloads first; the single unnamed jsonb one takes what they do not.
    assert_eq!(s.post("/rpc/m", r#"{"a": 1}"#, &[]).body, "named");
    assert_eq!(s.post("/rpc/m", r#"{"b": 1}"#, &[]).body, r#"raw {"b": 1}"#);
}

#[test]
fn jwt_claims_reach_sql_and_switch_the_role() {
    let c = cluster_or_skip!();
    c.schema(
        "jwt",
        "CREATE FUNCTION @.whoami() RETURNS jsonb LANGUAGE sql AS $$
           SELECT jsonb_build_object('user', current_user,
                                     'claims', current_setting('request.jwt.claims', true)::jsonb,
                                     'sub', current_setting('request.jwt.claims', true)::jsonb ->> 'sub') $$;
         CREATE FUNCTION @.members_only() RETURNS text LANGUAGE sql AS $$ SELECT 'welcome' $$;
         REVOKE EXECUTE ON FUNCTION @.members_only() FROM PUBLIC;
         CREATE FUNCTION @.nobody() RETURNS text LANGUAGE sql AS $$ SELECT 'no' $$;
         REVOKE EXECUTE ON FUNCTION @.nobody() FROM PUBLIC;
         GRANT EXECUTE ON FUNCTION @.members_only() TO authenticated;",
    );
    let s = c.standin("jwt");
    // No token: the anonymous role, and its claims are just that role.
    let r = s.post("/rpc/whoami", "{}", &[]);
    assert_eq!(
        r.json(),
        json!({"user": "anon", "claims": {"role": "anon"}, "sub": null})
    );
    let claims = json!({"sub": "7d3e4f00-0000-4000-8000-000000000001", "role": "authenticated", "aud": "authenticated"});
    let auth = bearer(&claims);
    let r = s.post("/rpc/whoami", "{}", &[("Authorization", &auth)]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json(),
        json!({"user": "authenticated", "claims": claims, "sub": claims["sub"]})
    );
    // The role decides what may run: 401 asks the anonymous caller for credentials, 403 tells
    // a signed-in one no.
    let r = s.post("/rpc/members_only", "{}", &[]);
    assert_eq!((r.status, r.json()["code"].clone()), (401, json!("42501")));
    let r = s.post("/rpc/members_only", "{}", &[("Authorization", &auth)]);
    assert_eq!((r.status, r.body.as_str()), (200, "welcome"));
    let r = s.post("/rpc/nobody", "{}", &[("Authorization", &auth)]);
    assert_eq!((r.status, r.json()["code"].clone()), (403, json!("42501")));
    // A role the token names but the database lacks: PostgreSQL refuses the SET ROLE.
    let r = s.post(
        "/rpc/whoami",
        "{}",
        &[("Authorization", &bearer(&json!({"role": "no\"such role"})))],
    );
    assert_eq!((r.status, r.json()["code"].clone()), (400, json!("22023")));
}

#[test]
fn request_headers_method_and_path_reach_sql() {
    let c = cluster_or_skip!();
    c.schema(
        "settings",
        "CREATE FUNCTION @.seen(jsonb) RETURNS jsonb LANGUAGE sql AS $$
           SELECT jsonb_build_object('headers', current_setting('request.headers', true)::jsonb,
                                     'method', current_setting('request.method', true),
                                     'path', current_setting('request.path', true)) $$;",
    );
    let s = c.standin("settings");
    let r = s.post(
        "/rest/v1/rpc/seen",
        "{}",
        &[("X-Evoq-Secret", "it's a secret"), ("apikey", "anon-key")],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let seen = r.json();
    assert_eq!(seen["headers"]["x-evoq-secret"], "it's a secret");
    assert_eq!(seen["headers"]["apikey"], "anon-key");
    assert_eq!(seen["headers"]["content-type"], "application/json");
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["path"], "/rpc/seen");
}

#[test]
fn odd_names_and_values_stay_quoted() {
    let c = cluster_or_skip!();
    c.schema(
        "quoting",
        r#"CREATE FUNCTION @.w("we'ird"" :name" text, "Upper" integer DEFAULT 0) RETURNS text LANGUAGE sql
             AS $$ SELECT $1 || $2 $$;"#,
    );
    let s = c.standin("quoting");
    let body = json!({"we'ird\" :name": "x'); DROP SCHEMA quoting CASCADE; --", "Upper": 1});
    let r = s.post("/rpc/w", &body.to_string(), &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, "x'); DROP SCHEMA quoting CASCADE; --1");
    assert_eq!(
        c.sql("SELECT count(*) FROM pg_namespace WHERE nspname = 'quoting'"),
        "1"
    );
    // A body past psql's argument limit (through a temporary file) is a named argument too.
    let big = json!({"we'ird\" :name": "y".repeat(300_000)});
    let r = s.post("/rpc/w", &big.to_string(), &[]);
    assert_eq!((r.status, r.body.len()), (200, 300_001));
}
