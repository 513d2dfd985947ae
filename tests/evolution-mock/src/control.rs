//! The `/__mock/*` JSON API (no auth, no latency, no faults, not logged) so shells and SQL
//! tests can drive a mock running as a separate binary.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::faults::FaultRule;
use crate::http::Reply;
use crate::server::{lock, Req, Shared};

/// `POST /__mock/config` body: any subset of the knobs.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigPatch {
    latency_ms: Option<u64>,
    qr_on_create: Option<bool>,
    qr_ttl_ms: Option<u64>,
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
        "qr_on_create": k.qr_on_create,
        "qr_ttl_ms": k.qr_ttl_ms,
    })
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
                if let Some(v) = patch.qr_on_create {
                    k.qr_on_create = v;
                }
                if let Some(v) = patch.qr_ttl_ms {
                    k.qr_ttl_ms = v;
                }
            }
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
        ("POST", ["instances", name, "state"]) => {
            let Some(state) = req.body.get("state").and_then(Value::as_str) else {
                return bad("body must be {\"state\":\"open\"|\"close\"|\"connecting\"}");
            };
            if !["open", "close", "connecting"].contains(&state) {
                return bad(format!("unknown state {state:?}"));
            }
            if shared.set_instance_state(name, state) {
                ok()
            } else {
                Reply::json(
                    404,
                    json!({"ok": false, "error": format!("no instance {name:?}")}),
                )
            }
        }
        ("DELETE", ["instances", name]) => {
            if shared.remove_instance(name) {
                ok()
            } else {
                Reply::json(
                    404,
                    json!({"ok": false, "error": format!("no instance {name:?}")}),
                )
            }
        }
        _ => Reply::json(
            404,
            json!({"ok": false, "error": format!("unknown control route {} {}", req.method, req.path)}),
        ),
    }
}
