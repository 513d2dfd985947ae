//! The `/__mock/*` JSON API (no auth, no latency, no faults, not logged) so shells and SQL
//! tests can drive a mock running as a separate binary.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::faults::FaultRule;
use crate::http::Reply;
use crate::lifecycle;
use crate::server::{lock, Req, Shared};
use crate::state::{ConnState, Instance};

/// `POST /__mock/config` body: any subset of the knobs.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigPatch {
    latency_ms: Option<u64>,
    slow_every: Option<u64>,
    slow_ms: Option<u64>,
    qr_on_create: Option<bool>,
    qr_ttl_ms: Option<u64>,
    qr_limit: Option<u32>,
    webhook_retry_ms: Option<u64>,
    qr_never: Option<bool>,
}

/// `POST /__mock/instances/{name}/pair` body: the code the user typed into WhatsApp.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PairBody {
    code: String,
}

/// `POST /__mock/instances/{name}/scan` body (optional).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ScanBody {
    number: Option<String>,
    profile_name: Option<String>,
}

fn ok() -> Reply {
    Reply::json(200, json!({"ok": true}))
}

fn bad(msg: impl Into<String>) -> Reply {
    Reply::json(400, json!({"ok": false, "error": msg.into()}))
}

fn config_json(shared: &Shared) -> Value {
    let k = shared.knobs();
    json!({
        "flavor": shared.flavor.version(),
        "api_key": shared.api_key,
        "latency_ms": k.latency_ms,
        "slow_every": k.slow_every,
        "slow_ms": k.slow_ms,
        "qr_on_create": k.qr_on_create,
        "qr_ttl_ms": k.qr_ttl_ms,
        "qr_limit": k.qr_limit,
        "webhook_retry_ms": k.webhook_retry_ms,
        "qr_never": k.qr_never,
    })
}

fn no_instance(name: &str) -> Reply {
    Reply::json(
        404,
        json!({"ok": false, "error": format!("no instance {name:?}")}),
    )
}

fn conflict(msg: String) -> Reply {
    Reply::json(409, json!({"ok": false, "error": msg}))
}

/// `{"ok": true, "instance": <the /__mock/instances item>}`.
fn ok_instance(i: &Instance) -> Reply {
    Reply::json(200, json!({"ok": true, "instance": i.to_json()}))
}

/// The phone-side and clock-side actions on one instance.
fn instance_action(shared: &Shared, name: &str, action: &str, body: &Value) -> Reply {
    let scan_body = if action == "scan" && !body.is_null() {
        match serde_json::from_value::<ScanBody>(body.clone()) {
            Ok(b) => b,
            Err(e) => return bad(e.to_string()),
        }
    } else {
        ScanBody::default()
    };
    let pair_code = if action == "pair" {
        match serde_json::from_value::<PairBody>(body.clone()) {
            Ok(b) => Some(b.code),
            Err(e) => return bad(format!("body must be {{\"code\": \"...\"}}: {e}")),
        }
    } else {
        None
    };
    let r = shared.with_instance(name, |s, i| match (action, i.state) {
        ("scan" | "pair", ConnState::Open) => {
            conflict(format!("instance {name:?} is already open"))
        }
        // The user typed the pairing code into WhatsApp: it links the phone only if it is the
        // code the server shows now (each new QR brings a new one).
        ("pair", _) => {
            let current = i.qr.as_ref().and_then(|q| q.pairing_code.clone());
            match current {
                Some(code) if Some(&code) == pair_code.as_ref() => {
                    let number = i.number.clone();
                    lifecycle::scan(s, i, number.as_deref(), None);
                    ok_instance(i)
                }
                Some(_) => conflict(format!("that is not the current pairing code of {name:?}")),
                None => conflict(format!("instance {name:?} shows no pairing code")),
            }
        }
        ("scan", _) => {
            lifecycle::scan(
                s,
                i,
                scan_body.number.as_deref(),
                scan_body.profile_name.as_deref(),
            );
            ok_instance(i)
        }
        ("unlink", ConnState::Close) => conflict(format!("instance {name:?} is not connected")),
        ("unlink", _) => {
            lifecycle::logout(s, i);
            ok_instance(i)
        }
        (_, ConnState::Connecting) if i.sockets > 0 => {
            if action == "qr" {
                lifecycle::qr_arrives(s, i);
            } else {
                lifecycle::qr_limit(s, i);
            }
            ok_instance(i)
        }
        _ => conflict(format!(
            "instance {name:?} is not connecting on a live socket"
        )),
    });
    r.unwrap_or_else(|| no_instance(name))
}

pub fn handle(shared: &Shared, req: &Req) -> Reply {
    let segs: Vec<&str> = req.segments.iter().skip(1).map(String::as_str).collect();
    match (req.method.as_str(), segs.as_slice()) {
        ("GET", ["calls"]) => Reply::json(200, Value::Array(lock(&shared.calls).entries())),
        ("GET", ["instances"]) => Reply::json(200, Value::Array(shared.instances_json())),
        ("GET", ["faults"]) => Reply::json(200, json!(shared.faults.list())),
        ("GET", ["config"]) => Reply::json(200, config_json(shared)),
        ("POST", ["reset"]) => {
            shared.reset();
            ok()
        }
        ("POST", ["config"]) => {
            let body = if req.body.is_null() {
                json!({})
            } else {
                req.body.clone()
            };
            let patch: ConfigPatch = match serde_json::from_value(body) {
                Ok(p) => p,
                Err(e) => return bad(e.to_string()),
            };
            {
                let mut k = lock(&shared.knobs);
                if let Some(v) = patch.latency_ms {
                    k.latency_ms = v;
                }
                if let Some(v) = patch.slow_ms {
                    k.slow_ms = v;
                }
                if let Some(v) = patch.qr_on_create {
                    k.qr_on_create = v;
                }
                if let Some(v) = patch.qr_ttl_ms {
                    k.qr_ttl_ms = v;
                }
                if let Some(v) = patch.qr_limit {
                    k.qr_limit = v;
                }
                if let Some(v) = patch.webhook_retry_ms {
                    k.webhook_retry_ms = v;
                }
                if let Some(v) = patch.qr_never {
                    k.qr_never = v;
                }
            }
            // After the knobs lock is released: it takes it again.
            if let Some(n) = patch.slow_every {
                shared.set_slow_every(n);
            }
            // A shorter period or QRs allowed again may bring the next tick closer.
            shared.clock.poke();
            Reply::json(200, config_json(shared))
        }
        ("POST", ["faults"]) => match serde_json::from_value::<FaultRule>(req.body.clone()) {
            Ok(rule) => {
                shared.faults.add(rule);
                Reply::json(
                    200,
                    json!({"ok": true, "faults": shared.faults.list().len()}),
                )
            }
            Err(e) => bad(e.to_string()),
        },
        ("DELETE", ["faults"]) => {
            shared.faults.clear();
            ok()
        }
        // Instances the server holds from before (another app's, a leftover): made as they
        // are, with no call, socket or delivery. {"names": [...], "state": "open"}
        ("POST", ["instances"]) => {
            let names: Vec<String> = match req
                .body
                .get("names")
                .cloned()
                .map(serde_json::from_value)
            {
                Some(Ok(names)) => names,
                _ => return bad(
                    "body must be {\"names\":[...], \"state\":\"open\"|\"close\"|\"connecting\"}",
                ),
            };
            let state = req
                .body
                .get("state")
                .and_then(Value::as_str)
                .unwrap_or("close");
            match shared.seed_instances(&names, state) {
                Some(n) => Reply::json(200, json!({"ok": true, "added": n})),
                None => bad(format!("unknown state {state:?}")),
            }
        }
        ("POST", ["instances", name, "state"]) => {
            let Some(state) = req.body.get("state").and_then(Value::as_str) else {
                return bad("body must be {\"state\":\"open\"|\"close\"|\"connecting\"}");
            };
            if !["open", "close", "connecting"].contains(&state) {
                return bad(format!("unknown state {state:?}"));
            }
            // "silent": the state changes with no delivery (webhooks that stopped, #2401)
            let silent = req
                .body
                .get("silent")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let changed = if silent {
                shared.set_instance_state_silently(name, state)
            } else {
                shared.set_instance_state(name, state)
            };
            if changed {
                ok()
            } else {
                no_instance(name)
            }
        }
        (
            "POST",
            ["instances", name, action @ ("scan" | "pair" | "unlink" | "qr" | "qr-limit")],
        ) => instance_action(shared, name, action, &req.body),
        ("DELETE", ["instances", name]) => {
            if shared.remove_instance(name) {
                ok()
            } else {
                no_instance(name)
            }
        }
        ("GET", ["deliveries"]) => Reply::json(200, Value::Array(shared.deliveries.list())),
        ("DELETE", ["deliveries"]) => {
            shared.deliveries.clear();
            ok()
        }
        ("GET", ["sockets"]) => Reply::json(200, shared.sockets_json()),
        _ => Reply::json(
            404,
            json!({"ok": false, "error": format!("unknown control route {} {}", req.method, req.path)}),
        ),
    }
}
