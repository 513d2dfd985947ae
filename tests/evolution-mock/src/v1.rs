//! Evolution API 1.8.2 bodies and replies: snake_case create body with `webhook` as a URL
//! string, flat webhook/set body, `hash` as `{"apikey":..}`, fetchInstances as `{"instance":..}`
//! items (a single object when filtered by name).

use serde_json::{json, Map, Value};

use crate::http::Reply;
use crate::lifecycle;
use crate::routes::{is_global_key, qr_shape};
use crate::server::{Req, Shared};
use crate::state::{ConnState, Instance, Store, Webhook};
use crate::util::now_epoch_ms;
use crate::validate::{is_url, Check, Ty, V1_EVENTS};

fn body_map(req: &Req) -> Option<Map<String, Value>> {
    match &req.body {
        Value::Null => Some(Map::new()),
        Value::Object(m) => Some(m.clone()),
        _ => None,
    }
}

fn str_field<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    m.get(k).and_then(Value::as_str)
}

fn string_list(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|e| e.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

pub fn create(shared: &Shared, store: &mut Store, req: &Req) -> Reply {
    let body = body_map(req);
    if let Some(name) = body.as_ref().and_then(|b| str_field(b, "instanceName")) {
        // With file storage the guard tests for `instances/<name>`; for "" that is the
        // `instances/` directory itself, which always exists.
        if name.is_empty() || store.get(name).is_some() {
            return Reply::thrown(403, format!("This name \"{name}\" is already in use."));
        }
    }
    if !is_global_key(shared, req) {
        return Reply::unauthorized();
    }
    let Some(body) = body else {
        return Reply::schema(vec!["instance is not of a type(s) object".into()]);
    };
    let mut check = Check::new(&body, "");
    check
        .required("instanceName")
        .tys(&["instanceName", "token", "number", "webhook"], Ty::Str)
        .tys(
            &["qrcode", "mobile", "webhook_by_events", "webhook_base64"],
            Ty::Bool,
        )
        .enum_array("events", V1_EVENTS)
        .number_pattern("number");
    if !check.errors.is_empty() {
        return Reply::schema(check.errors);
    }

    let name = str_field(&body, "instanceName")
        .unwrap_or_default()
        .to_string();
    let token = str_field(&body, "token").filter(|t| !t.is_empty());
    if let Some(t) = token {
        if store.instances.iter().any(|i| i.token == t) {
            return Reply::thrown(400, "Token already exists");
        }
    }
    let webhook_url = str_field(&body, "webhook").filter(|u| !u.is_empty());
    if let Some(url) = webhook_url {
        if !is_url(url) {
            return Reply::thrown(400, "Invalid \"url\" property in webhook");
        }
    }

    let integration = str_field(&body, "integration").unwrap_or("WHATSAPP-BAILEYS");
    let mut inst = Instance::new(&name, token.map(str::to_string), integration);
    inst.number = str_field(&body, "number").map(str::to_string);
    let is_true = |k: &str| body.get(k) == Some(&Value::Bool(true));
    inst.settings.reject_call = is_true("reject_call");
    inst.settings.msg_call = str_field(&body, "msg_call").unwrap_or_default().to_string();
    // Computed as `groups_ignore || true` in 1.8.2, so it is always true.
    inst.settings.groups_ignore = true;
    inst.settings.always_online = is_true("always_online");
    inst.settings.read_messages = is_true("read_messages");
    inst.settings.read_status = is_true("read_status");
    inst.settings.sync_full_history = is_true("sync_full_history");

    let mut webhook_reply = Map::new();
    if let Some(url) = webhook_url {
        webhook_reply.insert("webhook".into(), json!(url));
        if let Some(b) = body.get("webhook_by_events") {
            webhook_reply.insert("webhook_by_events".into(), b.clone());
        }
        // Without an events array the save throws a TypeError that create swallows:
        // the webhook is silently not stored.
        if let Some(events) = body.get("events").filter(|e| e.is_array()) {
            let mut hook = Webhook::new();
            hook.enabled = true;
            hook.url = url.to_string();
            hook.events = string_list(Some(events));
            hook.by_events = is_true("webhook_by_events");
            hook.base64 = body.get("webhook_base64").and_then(Value::as_bool);
            inst.webhook = Some(hook);
            webhook_reply.insert("events".into(), events.clone());
        }
    }

    let wants_qr = is_true("qrcode");
    // As on v2: the first QR comes after the reply unless qr_on_create.
    let qr_in_reply = wants_qr && shared.knobs().qr_on_create;
    if wants_qr {
        lifecycle::start_socket(shared, &mut inst);
        if qr_in_reply {
            lifecycle::first_qr(shared, &mut inst);
        }
    }

    let mut reply = json!({
        "instance": {
            "instanceName": inst.name,
            "instanceId": inst.id,
            "webhook_wa_business": null,
            "access_token_wa_business": "",
            // 1.8.2 always says "created", whatever the connection is doing.
            "status": "created",
        },
        "hash": {"apikey": inst.token},
        "webhook": webhook_reply,
        "websocket": {},
        "rabbitmq": {},
        "sqs": {},
        "typebot": {"enabled": false},
        "settings": {
            "reject_call": inst.settings.reject_call,
            "msg_call": inst.settings.msg_call,
            "groups_ignore": inst.settings.groups_ignore,
            "always_online": inst.settings.always_online,
            "read_messages": inst.settings.read_messages,
            "read_status": inst.settings.read_status,
            "sync_full_history": inst.settings.sync_full_history,
        },
    });
    if wants_qr {
        reply["qrcode"] = qr_shape(&inst);
        if !qr_in_reply {
            lifecycle::first_qr(shared, &mut inst);
        }
    }
    store.instances.push(inst);
    Reply::json(201, reply)
}

fn item(i: &Instance) -> Value {
    let mut inst = json!({
        "instanceName": i.name,
        "instanceId": i.id,
        "status": i.state.as_str(),
    });
    if i.state == ConnState::Open {
        inst["owner"] = json!(i.wuid);
        inst["profileName"] = json!(i.profile_name);
        inst["profilePictureUrl"] = Value::Null;
        inst["profileStatus"] = json!("");
    }
    json!({ "instance": inst })
}

pub fn fetch_instances(shared: &Shared, store: &Store, req: &Req) -> Reply {
    // File storage (the 1.8 default): instance tokens are not accepted here.
    if !is_global_key(shared, req) {
        return Reply::unauthorized();
    }
    if let Some(name) = req.query_param("instanceName") {
        return match store.get(name) {
            Some(i) => Reply::json(200, item(i)),
            None => Reply::thrown(404, format!("Instance \"{name}\" not found")),
        };
    }
    let mut rows: Vec<&Instance> = store.instances.iter().collect();
    if let Some(id) = req.query_param("instanceId") {
        rows.retain(|i| i.id == id);
    }
    Reply::json(200, Value::Array(rows.into_iter().map(item).collect()))
}

pub fn webhook_set(i: &mut Instance, req: &Req) -> Reply {
    let Some(body) = body_map(req) else {
        return Reply::schema(vec!["instance is not of a type(s) object".into()]);
    };
    let mut check = Check::new(&body, "");
    check
        .required("url")
        .ty("url", Ty::Str)
        .tys(
            &["enabled", "webhook_by_events", "webhook_base64"],
            Ty::Bool,
        )
        .enum_array("events", V1_EVENTS);
    if !check.errors.is_empty() {
        return Reply::schema(check.errors);
    }
    let url = str_field(&body, "url").unwrap_or_default();
    if !is_url(url) {
        return Reply::thrown(400, "Invalid \"url\" property");
    }
    let enabled = body.get("enabled").and_then(Value::as_bool).unwrap_or(true);
    if enabled && !body.get("events").is_some_and(Value::is_array) {
        return Reply::crash("Cannot read properties of undefined (reading 'length')");
    }
    let hook = i.webhook.get_or_insert_with(Webhook::new);
    hook.enabled = enabled;
    // Disabling blanks both the url and the events.
    hook.url = if enabled {
        url.to_string()
    } else {
        String::new()
    };
    hook.events = if enabled {
        string_list(body.get("events"))
    } else {
        Vec::new()
    };
    hook.by_events = body.get("webhook_by_events") == Some(&Value::Bool(true));
    hook.base64 = body.get("webhook_base64").and_then(Value::as_bool);
    hook.updated_ms = now_epoch_ms();
    let hook = hook.clone();
    Reply::json(
        201,
        json!({"webhook": {"instanceName": i.name, "webhook": {
            "url": hook.url,
            "enabled": hook.enabled,
            "webhook_by_events": hook.by_events,
            "webhook_base64": hook.base64.unwrap_or(false),
            "events": hook.events,
        }}}),
    )
}

pub fn webhook_find(i: &Instance) -> Reply {
    let Some(w) = &i.webhook else {
        return Reply::json(
            200,
            json!({"enabled": false, "url": "", "events": [], "webhook_by_events": false, "webhook_base64": false}),
        );
    };
    let mut reply = json!({
        "enabled": w.enabled,
        "url": w.url,
        "events": w.events,
        "webhook_by_events": w.by_events,
    });
    // Left out when it was never set (seen on 1.8.2).
    if let Some(b) = w.base64 {
        reply["webhook_base64"] = json!(b);
    }
    Reply::json(200, reply)
}
