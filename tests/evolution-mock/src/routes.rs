//! Route table, guards (exists → auth, in that order) and the routes whose replies are the
//! same in v1.8 and v2. Version-specific bodies and replies live in `v1.rs` and `v2.rs`.

use serde_json::{json, Value};

use crate::http::Reply;
use crate::server::{lock, Req, Shared};
use crate::state::{ConnState, Instance, Store};
use crate::{lifecycle, v1, v2, Flavor};

/// Which handler a request goes to, with the instance name from the path when there is one.
enum Route {
    Root,
    Create,
    FetchInstances,
    Connect(String),
    ConnectionState(String),
    Restart(String),
    Logout(String),
    Delete(String),
    WebhookSet(String),
    WebhookFind(String),
}

fn route(flavor: Flavor, method: &str, segs: &[String]) -> Option<Route> {
    // Express routing is case-insensitive for the fixed parts of a path.
    let lower: Vec<String> = segs.iter().map(|s| s.to_ascii_lowercase()).collect();
    let fixed: Vec<&str> = lower.iter().map(String::as_str).collect();
    let name = || segs.last().cloned().unwrap_or_default();
    let restart_method = match flavor {
        Flavor::V2 => "POST",
        Flavor::V1 => "PUT",
    };
    let r = match (method, fixed.as_slice()) {
        ("GET", [""]) => Route::Root,
        ("POST", ["instance", "create"]) => Route::Create,
        ("GET", ["instance", "fetchinstances"]) => Route::FetchInstances,
        ("GET", ["instance", "connect", n]) if !n.is_empty() => Route::Connect(name()),
        ("GET", ["instance", "connectionstate", n]) if !n.is_empty() => {
            Route::ConnectionState(name())
        }
        (m, ["instance", "restart", n]) if m == restart_method && !n.is_empty() => {
            Route::Restart(name())
        }
        ("DELETE", ["instance", "logout", n]) if !n.is_empty() => Route::Logout(name()),
        ("DELETE", ["instance", "delete", n]) if !n.is_empty() => Route::Delete(name()),
        ("POST", ["webhook", "set", n]) if !n.is_empty() => Route::WebhookSet(name()),
        ("GET", ["webhook", "find", n]) if !n.is_empty() => Route::WebhookFind(name()),
        _ => return None,
    };
    Some(r)
}

/// Runs one Evolution API request against the state and returns its reply.
pub fn dispatch(shared: &Shared, req: &Req) -> Reply {
    let Some(route) = route(shared.flavor, &req.method, &req.segments) else {
        return Reply::thrown(404, format!("Cannot {} {}", req.method, req.path));
    };
    if req.body_invalid {
        // body-parser rejects malformed JSON before any route or guard runs.
        return Reply::error(400, json!("Unexpected token in JSON at position 0"));
    }
    let mut store = lock(&shared.store);
    match route {
        Route::Root => root(shared),
        Route::Create => match shared.flavor {
            Flavor::V2 => v2::create(shared, &mut store, req),
            Flavor::V1 => v1::create(shared, &mut store, req),
        },
        Route::FetchInstances => match shared.flavor {
            Flavor::V2 => v2::fetch_instances(shared, &store, req),
            Flavor::V1 => v1::fetch_instances(shared, &store, req),
        },
        Route::Connect(n) => guarded(shared, &mut store, req, &n, connect),
        Route::ConnectionState(n) => guarded(shared, &mut store, req, &n, |_, i, _| {
            Reply::json(200, state_shape(i))
        }),
        Route::Restart(n) => guarded(shared, &mut store, req, &n, restart),
        Route::Logout(n) => guarded(shared, &mut store, req, &n, logout),
        Route::Delete(n) => {
            let r = guarded(shared, &mut store, req, &n, delete);
            if r.status == 200 {
                // Sockets still counted (a close instance's loops) become orphans (3.8).
                store.remove(&n);
            }
            r
        }
        Route::WebhookSet(n) => guarded(shared, &mut store, req, &n, |s, i, r| match s.flavor {
            Flavor::V2 => v2::webhook_set(i, r),
            Flavor::V1 => v1::webhook_set(i, r),
        }),
        Route::WebhookFind(n) => guarded(shared, &mut store, req, &n, |s, i, _| match s.flavor {
            Flavor::V2 => v2::webhook_find(i),
            Flavor::V1 => v1::webhook_find(i),
        }),
    }
}

/// The three guards of every `{instanceName}` route: 404 unknown instance (before auth),
/// then the global key or this instance's token.
fn guarded(
    shared: &Shared,
    store: &mut Store,
    req: &Req,
    name: &str,
    f: impl FnOnce(&Shared, &mut Instance, &Req) -> Reply,
) -> Reply {
    let Some(inst) = store.get_mut(name) else {
        return Reply::thrown(404, format!("The \"{name}\" instance does not exist"));
    };
    let key = req.apikey.as_deref();
    if key != Some(shared.api_key.as_str()) && key != Some(inst.token.as_str()) {
        return Reply::unauthorized();
    }
    f(shared, inst, req)
}

pub fn is_global_key(shared: &Shared, req: &Req) -> bool {
    req.apikey.as_deref() == Some(shared.api_key.as_str())
}

fn root(shared: &Shared) -> Reply {
    let base = format!("http://127.0.0.1:{}", shared.port);
    Reply::json(
        200,
        match shared.flavor {
            Flavor::V2 => json!({
                "status": 200,
                "message": "Welcome to the Evolution API, it is working!",
                "version": "2.3.6",
                "clientName": "evolution_mock",
                "manager": format!("{base}/manager"),
                "documentation": "https://doc.evolution-api.com",
                "whatsappWebVersion": "2.3000.1027934701",
            }),
            Flavor::V1 => json!({
                "status": 200,
                "message": "Welcome to the Evolution API, it is working!",
                "version": "1.8.2",
                "swagger": format!("{base}/docs"),
                "documentation": "https://doc.evolution-api.com",
            }),
        },
    )
}

/// `{"instance":{"instanceName":..,"state":..}}`, the connectionState reply.
pub fn state_shape(i: &Instance) -> Value {
    json!({"instance": {"instanceName": i.name, "state": i.state.as_str()}})
}

/// `{"status":"SUCCESS","error":false,"response":{"message":..}}`.
fn success(message: &str) -> Reply {
    Reply::json(
        200,
        json!({"status": "SUCCESS", "error": false, "response": {"message": message}}),
    )
}

/// The QR object of connect/create: `{pairingCode, code, base64, count}`, or `{"count":n}`
/// when no QR has been emitted yet.
pub fn qr_shape(i: &Instance) -> Value {
    match &i.qr {
        Some(qr) => {
            json!({
                "pairingCode": qr.pairing_code,
                "code": qr.code,
                "base64": qr.base64,
                "count": i.qr_count,
            })
        }
        None => json!({"count": i.qr_count}),
    }
}

fn connect(shared: &Shared, i: &mut Instance, req: &Req) -> Reply {
    // 2.3.6 takes `?number=` only on a `close` instance, whose connect starts a socket with it
    // (controller lines 295-330): while `connecting` it answers the cached QR and ignores the
    // number (contract 3.2, 6; evolution-api #2197). Switching to a pairing code takes a logout.
    if i.state == ConnState::Close {
        if let Some(n) = req.query_param("number").filter(|n| !n.is_empty()) {
            i.number = Some(n.to_string());
        }
    }
    match i.state {
        ConnState::Open => return Reply::json(200, state_shape(i)),
        ConnState::Close => {
            // Each connect on a close instance starts another socket (contract 3.2, 7); the
            // mock's "WhatsApp" hands it a QR at once (none with `qr_never`).
            lifecycle::start_socket(shared, i);
            lifecycle::first_qr(shared, i);
        }
        ConnState::Connecting => {
            // The current QR: the clock rotates it. Without a clock (qr_ttl_ms 0) every
            // connect counts as a tick, so each one sees a new QR.
            let knobs = shared.knobs();
            if knobs.qr_ttl_ms == 0 && !knobs.qr_never && i.sockets > 0 {
                lifecycle::qr_arrives(shared, i);
            }
        }
    }
    Reply::json(200, qr_shape(i))
}

fn restart(shared: &Shared, i: &mut Instance, _req: &Req) -> Reply {
    match (shared.flavor, i.state) {
        // v1.8 `PUT /instance/restart` reloads an open connection and answers with the
        // connectionState shape whatever the state.
        (Flavor::V1, ConnState::Open) => {
            lifecycle::reconnect_open(shared, i);
            Reply::json(200, state_shape(i))
        }
        (Flavor::V1, _) => Reply::json(200, state_shape(i)),
        // v2.3.6 fails a restart of a closed instance with an HTTP 200 error body.
        (Flavor::V2, ConnState::Close) => {
            Reply::json(200, json!({"error": true, "message": "[object Object]"}))
        }
        // v2 ends the socket and calls connect, which still sees the old state and answers
        // with it; the ended socket then reconnects.
        (Flavor::V2, ConnState::Open) => {
            let reply = Reply::json(200, state_shape(i));
            lifecycle::reconnect_open(shared, i);
            reply
        }
        (Flavor::V2, ConnState::Connecting) => {
            let reply = Reply::json(200, qr_shape(i));
            lifecycle::replace_socket(shared, i);
            lifecycle::first_qr(shared, i);
            reply
        }
    }
}

fn logout(shared: &Shared, i: &mut Instance, _req: &Req) -> Reply {
    if i.state == ConnState::Close {
        return Reply::thrown(400, format!("The \"{}\" instance is not connected", i.name));
    }
    // The session is gone, so the next connect starts counting QRs again.
    lifecycle::logout(shared, i);
    success("Instance logged out")
}

/// v2 logs out a connecting or open instance first, then announces the delete; v1.8
/// refuses an open instance and logs out a connecting one (its INSTANCE_DELETE is not an
/// event v1.8 subscriptions can name). The caller removes the instance.
fn delete(shared: &Shared, i: &mut Instance, _req: &Req) -> Reply {
    match (shared.flavor, i.state) {
        (Flavor::V1, ConnState::Open) => {
            return Reply::thrown(
                400,
                format!("The \"{}\" instance needs to be disconnected", i.name),
            )
        }
        (_, ConnState::Close) => {}
        _ => lifecycle::logout(shared, i),
    }
    if shared.flavor == Flavor::V2 {
        lifecycle::announce_delete(shared, i);
    }
    success("Instance deleted")
}

/// Best guess at the instance a request is about (path name, else body `instanceName`),
/// used to word injected 403/404 faults like the real ones.
pub fn instance_name_hint(req: &Req) -> Option<String> {
    if req.segments.len() == 3 && req.segments[0] != "__mock" && req.segments[1] != "create" {
        return Some(req.segments[2].clone());
    }
    req.body
        .get("instanceName")
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| req.query_param("instanceName").map(str::to_string))
}
