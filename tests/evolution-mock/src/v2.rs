//! Evolution API 2.3.6 bodies and replies: camelCase create body, wrapped webhook/set body,
//! `hash` as a plain string, fetchInstances as an array of database rows.

use serde_json::{json, Map, Value};

use crate::http::Reply;
use crate::lifecycle;
use crate::routes::{is_global_key, qr_shape};
use crate::server::{Req, Shared};
use crate::state::{ConnState, Instance, Store, Webhook};
use crate::util::{iso8601, now_epoch_ms};
use crate::validate::{Check, Ty, V2_EVENTS};

const INTEGRATIONS: &[&str] = &["WHATSAPP-BAILEYS", "WHATSAPP-BUSINESS", "EVOLUTION"];
const BAILEYS: &str = "WHATSAPP-BAILEYS";
const LENGTH_TYPE_ERROR: &str = "Cannot read properties of undefined (reading 'length')";

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

pub fn create(shared: &Shared, store: &mut Store, req: &Req) -> Reply {
    let body = body_map(req);
    // instanceExistsGuard runs before auth, so a taken name wins over a bad key.
    if let Some(name) = body.as_ref().and_then(|b| str_field(b, "instanceName")) {
        if store.get(name).is_some() {
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
        .tys(&["instanceName", "token", "number", "businessId"], Ty::Str)
        .ty("qrcode", Ty::Bool)
        .number_pattern("number");
    let mut errors = check.errors;
    // The schema's "not empty" rule only fires when instanceName is the only property.
    if body.len() == 1 && str_field(&body, "instanceName") == Some("") {
        errors.push("The \"instanceName\" cannot be empty".into());
    }
    if !errors.is_empty() {
        return Reply::schema(errors);
    }

    let name = str_field(&body, "instanceName")
        .unwrap_or_default()
        .to_string();
    let Some(integration) = str_field(&body, "integration").filter(|i| INTEGRATIONS.contains(i))
    else {
        return Reply::thrown(400, "Invalid integration");
    };
    let token = str_field(&body, "token").filter(|t| !t.is_empty());
    let number = str_field(&body, "number").filter(|n| !n.is_empty());
    if integration == "WHATSAPP-BUSINESS" {
        if token.is_none() {
            return Reply::thrown(400, "token is required");
        }
        if number.is_none() {
            return Reply::thrown(400, "number is required");
        }
    }
    // `webhook.events.length` is read unguarded, so anything but an object with an
    // events array crashes inside create and comes back as a 400 with the TypeError text.
    let webhook_in = match body.get("webhook") {
        None | Some(Value::Null) => None,
        Some(Value::Object(w)) if w.get("events").is_some_and(Value::is_array) => Some(w.clone()),
        Some(_) => return Reply::thrown(400, LENGTH_TYPE_ERROR),
    };

    let mut inst = Instance::new(&name, token.map(str::to_string), integration);
    inst.number = number.map(str::to_string);
    let is_true = |k: &str| body.get(k) == Some(&Value::Bool(true));
    let text = |k: &str| str_field(&body, k).unwrap_or_default().to_string();
    inst.settings.reject_call = is_true("rejectCall");
    inst.settings.msg_call = text("msgCall");
    inst.settings.groups_ignore = is_true("groupsIgnore");
    inst.settings.always_online = is_true("alwaysOnline");
    inst.settings.read_messages = is_true("readMessages");
    inst.settings.read_status = is_true("readStatus");
    inst.settings.sync_full_history = is_true("syncFullHistory");
    inst.settings.wavoip_token = text("wavoipToken");

    let mut webhook_reply = Map::new();
    if let Some(w) = &webhook_in {
        let mut hook = Webhook::new();
        // `enabled` is ignored on create and always stored as true.
        hook.enabled = true;
        hook.url = str_field(w, "url").unwrap_or_default().to_string();
        hook.headers = w.get("headers").filter(|h| h.is_object()).cloned();
        hook.events = string_list(w.get("events"));
        hook.by_events = w.get("byEvents") == Some(&Value::Bool(true));
        hook.base64 = Some(w.get("base64") == Some(&Value::Bool(true)));
        inst.webhook = Some(hook);
        // The reply echoes the sent fields; absent ones are undefined and drop out of the JSON.
        for (from, to) in [
            ("url", "webhookUrl"),
            ("headers", "webhookHeaders"),
            ("byEvents", "webhookByEvents"),
            ("base64", "webhookBase64"),
        ] {
            if let Some(v) = w.get(from) {
                webhook_reply.insert(to.into(), v.clone());
            }
        }
    }

    // The webhook is stored before `instance.create` goes out, so it can receive it.
    lifecycle::announce_create(shared, &inst);
    let wants_qr = is_true("qrcode") && integration == BAILEYS;
    // Offline (and often online) no QR arrives within create's 5 s window: `{"count":0}`;
    // the first QR comes right after the reply (or within the window with qr_on_create).
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
            "integration": inst.integration,
            "webhookWaBusiness": null,
            "accessTokenWaBusiness": "",
            "status": inst.state.as_str(),
        },
        "hash": inst.token,
        "webhook": webhook_reply,
        "websocket": {},
        "rabbitmq": {},
        "nats": {},
        "sqs": {},
        "settings": {
            "rejectCall": inst.settings.reject_call,
            "msgCall": inst.settings.msg_call,
            "groupsIgnore": inst.settings.groups_ignore,
            "alwaysOnline": inst.settings.always_online,
            "readMessages": inst.settings.read_messages,
            "readStatus": inst.settings.read_status,
            "syncFullHistory": inst.settings.sync_full_history,
            "wavoipToken": inst.settings.wavoip_token,
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

fn string_list(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|e| e.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// One database row with its relations, as `monitor.service.ts` `instanceInfo` returns it.
fn row(i: &Instance) -> Value {
    let open = i.state == ConnState::Open;
    let jid = if open { i.wuid.clone() } else { None };
    let profile_name = if open { i.profile_name.clone() } else { None };
    json!({
        "id": i.id,
        "name": i.name,
        "connectionStatus": i.state.as_str(),
        "ownerJid": jid,
        "profileName": profile_name,
        "profilePicUrl": null,
        "integration": i.integration,
        "number": i.number,
        "businessId": null,
        "token": i.token,
        "clientName": "evolution_mock",
        "disconnectionReasonCode": null,
        "disconnectionObject": null,
        "disconnectionAt": null,
        "createdAt": iso8601(i.created_ms),
        "updatedAt": iso8601(i.updated_ms),
        "Chatwoot": null,
        "Proxy": null,
        "Rabbitmq": null,
        "Nats": null,
        "Sqs": null,
        "Websocket": null,
        "Setting": {
            "id": i.settings_id,
            "rejectCall": i.settings.reject_call,
            "msgCall": i.settings.msg_call,
            "groupsIgnore": i.settings.groups_ignore,
            "alwaysOnline": i.settings.always_online,
            "readMessages": i.settings.read_messages,
            "readStatus": i.settings.read_status,
            "syncFullHistory": i.settings.sync_full_history,
            "wavoipToken": i.settings.wavoip_token,
            "createdAt": iso8601(i.created_ms),
            "updatedAt": iso8601(i.updated_ms),
            "instanceId": i.id,
        },
        "_count": {"Message": 0, "Contact": 0, "Chat": 0},
    })
}

pub fn fetch_instances(shared: &Shared, store: &Store, req: &Req) -> Reply {
    // With database storage (required on v2) an instance token lists only its own instances.
    let key = req.apikey.as_deref().unwrap_or_default();
    let visible: Vec<&Instance> = if is_global_key(shared, req) {
        store.instances.iter().collect()
    } else {
        let own: Vec<&Instance> = store.instances.iter().filter(|i| i.token == key).collect();
        if own.is_empty() {
            return Reply::unauthorized();
        }
        own
    };
    let mut rows: Vec<&Instance> = visible;
    if let Some(name) = req.query_param("instanceName") {
        rows.retain(|i| i.name == name);
        if rows.is_empty() {
            return Reply::thrown(404, format!("Instance \"{name}\" not found"));
        }
    }
    if let Some(id) = req.query_param("instanceId") {
        rows.retain(|i| i.id == id);
    }
    if let Some(number) = req.query_param("number") {
        rows.retain(|i| i.number.as_deref() == Some(number));
    }
    Reply::json(200, Value::Array(rows.into_iter().map(row).collect()))
}

/// The stored webhook row: what both webhook/set and webhook/find return.
fn webhook_row(i: &Instance, w: &Webhook) -> Value {
    json!({
        "id": w.id,
        "url": w.url,
        "headers": w.headers,
        "enabled": w.enabled,
        "events": w.events,
        "webhookByEvents": w.by_events,
        "webhookBase64": w.base64.unwrap_or(false),
        "createdAt": iso8601(w.created_ms),
        "updatedAt": iso8601(w.updated_ms),
        "instanceId": i.id,
    })
}

pub fn webhook_set(i: &mut Instance, req: &Req) -> Reply {
    let Some(body) = body_map(req) else {
        return Reply::schema(vec!["instance is not of a type(s) object".into()]);
    };
    let mut outer = Check::new(&body, "");
    outer.required("webhook").ty("webhook", Ty::Obj);
    let mut errors = outer.errors;
    let inner = body.get("webhook").and_then(Value::as_object).cloned();
    if let Some(w) = &inner {
        let mut c = Check::new(w, "webhook");
        c.required("enabled")
            .required("url")
            .ty("enabled", Ty::Bool)
            .ty("url", Ty::Str)
            .ty("byEvents", Ty::Bool)
            .ty("base64", Ty::Bool)
            .ty("headers", Ty::Obj)
            .enum_array("events", V2_EVENTS);
        errors.extend(c.errors);
    }
    if !errors.is_empty() {
        return Reply::schema(errors);
    }
    let w = inner.unwrap_or_default();
    let enabled = w.get("enabled") == Some(&Value::Bool(true));
    if enabled && !w.get("events").is_some_and(Value::is_array) {
        // `events.length` on undefined: an unhandled TypeError, so a 500 with a string message.
        return Reply::crash(LENGTH_TYPE_ERROR);
    }
    let hook = i.webhook.get_or_insert_with(Webhook::new);
    hook.enabled = enabled;
    hook.url = str_field(&w, "url").unwrap_or_default().to_string();
    hook.events = if enabled {
        string_list(w.get("events"))
    } else {
        Vec::new()
    };
    // Fields left out keep their stored values.
    if let Some(b) = w.get("byEvents").and_then(Value::as_bool) {
        hook.by_events = b;
    }
    if let Some(b) = w.get("base64").and_then(Value::as_bool) {
        hook.base64 = Some(b);
    }
    if let Some(h) = w.get("headers") {
        hook.headers = Some(h.clone());
    }
    hook.updated_ms = now_epoch_ms();
    let hook = hook.clone();
    Reply::json(201, webhook_row(i, &hook))
}

pub fn webhook_find(i: &Instance) -> Reply {
    match &i.webhook {
        Some(w) => Reply::json(200, webhook_row(i, w)),
        // `event.controller.ts` `get` returns the missing row as JSON null.
        None => Reply::json(200, Value::Null),
    }
}
