//! `evoq_webhook(payload)`: applies the Evolution server's webhook deliveries. The one code path
//! every transport calls (PostgREST's `/rpc/evoq_webhook` today, a listener in a background
//! worker later): `ingest` takes the payload and the secret the transport saw in a header.
//!
//! Cost per delivery: one read of the settings, at most one indexed UPDATE of the instance row
//! (or one INSERT for an event kept for the application), and one counter. A forged delivery
//! costs a counter and nothing else: the secret is checked before anything is read.

use crate::errors::{EvoqError, SpiResult};
use crate::evolution::{
    header_secret, parse_delivery, same_secret, secret_in_url, Delivery, MAX_DELIVERY_BYTES,
    SECRET_HEADER, SECRET_PARAM,
};
use crate::lifecycle::{effect, Effect, Write};
use crate::names::is_ours;
use pgrx::prelude::*;
use serde_json::{json, Value};

/// What the caller presented, and what the settings accept.
struct Gate {
    secret: Option<String>,
    /// 0.7.0: each server's secrets: (name, current, previous while a rotation is applied);
    /// `default`'s (evoq_configure's) first.
    servers: Vec<(String, Option<String>, Option<String>)>,
    namespace: Option<String>,
    owns_legacy_names: bool,
    /// The `x-evoq-secret` header PostgREST put into `request.headers`.
    header: Option<String>,
}

fn count(counter: &str) {
    // nextval is not transactional: a delivery rejected with an ERROR stays counted.
    Spi::run(&format!(
        "SELECT pg_catalog.nextval('evoq.webhooks_{counter}')"
    ))
    .unwrap_or_else(|e| EvoqError::internal("could not count a webhook delivery", e).raise());
}

fn read_gate() -> Option<Gate> {
    Spi::connect(|client| {
        let rows = client.select(
            "SELECT webhook_secret, webhook_secret_previous, namespace, owns_legacy_names,
                    pg_catalog.current_setting('request.headers', true)
             FROM evoq.settings",
            Some(1),
            &[],
        )?;
        if rows.is_empty() {
            return Ok::<_, pgrx::spi::Error>(None);
        }
        let row = rows.first();
        let headers: Option<String> = row.get(5)?;
        let secret: Option<String> = row.get(1)?;
        let mut servers = vec![(
            crate::servers::DEFAULT_SERVER.to_string(),
            secret.clone(),
            row.get::<String>(2)?,
        )];
        let namespace = row.get(3)?;
        let owns_legacy_names = row.get::<bool>(4)?.unwrap_or(false);
        let others = client.select(
            "SELECT name, webhook_secret, webhook_secret_previous FROM evoq.servers
             WHERE name <> 'default' ORDER BY name",
            None,
            &[],
        )?;
        for row in others {
            servers.push((
                row.get::<String>(1)?.unwrap_or_default(),
                row.get::<String>(2)?,
                row.get::<String>(3)?,
            ));
        }
        Ok(Some(Gate {
            secret,
            servers,
            namespace,
            owns_legacy_names,
            header: headers.and_then(|h| header_secret(&h)),
        }))
    })
    .or_internal("reading its settings")
}

/// 0.7.0: the server whose secret `presented` is (current or previous), comparing it with every
/// secret in constant time and without stopping at a match: how long it takes tells nothing
/// about how close a guess was, nor which server's secret matched.
fn server_of(gate: &Gate, presented: &str) -> Option<String> {
    gate.servers
        .iter()
        .fold(None, |found, (name, current, previous)| {
            let current = current
                .as_deref()
                .is_some_and(|c| same_secret(presented, c));
            let previous = previous
                .as_deref()
                .is_some_and(|p| same_secret(presented, p));
            found.or((current | previous).then(|| name.clone()))
        })
}

/// 0.7.0: the server that holds the instance, if evoq has a row for it.
fn holder_of(instance: &str) -> Option<String> {
    Spi::get_one_with_args::<String>(
        "SELECT server FROM evolution_instances WHERE instance_name = $1",
        &[instance.into()],
    )
    .or_internal("reading which server holds an instance")
}

fn refuse(message: impl Into<String>, hint: impl Into<String>) -> ! {
    count("rejected");
    EvoqError::PermissionDenied {
        message: message.into(),
        hint: hint.into(),
    }
    .raise()
}

fn invalid(message: impl Into<String>, hint: impl Into<String>) -> ! {
    count("rejected");
    EvoqError::invalid(message, hint).raise()
}

fn ignored(d: &Delivery, why: &str) -> Value {
    count("ignored");
    // A QR or a connection update is a socket being started: for an expired or deleted
    // instance, the proof that the server still reconnects it (counted on the row).
    if matches!(
        d.event.to_ascii_lowercase().replace('_', ".").as_str(),
        "qrcode.updated" | "connection.update"
    ) {
        let _ = Spi::get_one_with_args::<bool>(
            "SELECT evoq._count_server_loop($1)",
            &[d.instance.clone().into()],
        )
        .or_internal("counting a delivery for an instance the server still reconnects");
    }
    json!({"result": "ignored", "event": d.event, "instance": d.instance, "why": why})
}

/// The guarded UPDATE for one applicable delivery (see `evoq._apply_delivery`).
fn apply_step(d: &Delivery, step: &crate::lifecycle::Step, server: &str) -> Option<String> {
    let mut arg = json!({
        "instance": d.instance,
        "server": server,
        "from": step.from.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        "to": step.to.as_str(),
        "event_at": d.sent_at,
    });
    let fields = match &step.write {
        Write::Qr(qr) => json!({"kind": "qr", "qr_code": qr.base64, "qr_text": qr.code,
                                "pairing_code": qr.pairing_code}),
        Write::Opened {
            number,
            profile_name,
        } => json!({"kind": "open", "number": number, "profile_name": profile_name}),
        Write::Closed { reason } => json!({"kind": "close", "reason": reason}),
        Write::Refused => json!({"kind": "refused",
            "reason": "the Evolution API stopped issuing QR codes (its QR limit); evoq_reconnect starts again"}),
        Write::Removed => json!({"kind": "removed",
            "reason": "the Evolution API deleted the instance"}),
    };
    if let (Some(a), Some(f)) = (arg.as_object_mut(), fields.as_object()) {
        a.extend(f.clone());
    }
    Spi::get_one_with_args::<String>(
        "SELECT evoq._apply_delivery($1)",
        &[pgrx::JsonB(arg).into()],
    )
    .or_internal("applying a webhook delivery")
}

/// What the app gets of a delivery: not the instance token (`apikey`, sent when the server
/// exposes tokens) nor the query of `destination` (on v1.8 it holds the webhook secret).
fn without_secrets(mut payload: Value) -> Value {
    if let Some(map) = payload.as_object_mut() {
        map.remove("apikey");
        if let Some(Value::String(d)) = map.get_mut("destination") {
            if let Some(i) = d.find('?') {
                d.truncate(i);
            }
        }
    }
    payload
}

/// The settings a delivery is checked against, read once for a group of deliveries (the
/// worker's listener applies them in groups). None: evoq is not configured.
pub struct Settings(Option<Gate>);

/// Reads the settings deliveries are checked against.
pub fn settings() -> Settings {
    Settings(read_gate())
}

impl Settings {
    /// The secrets a delivery may carry now: the current one, and the previous one while a
    /// rotation is being applied. Empty: evoq is not configured (no delivery can be checked).
    pub fn accepted_secrets(&self) -> Vec<String> {
        self.0
            .iter()
            .flat_map(|g| g.servers.iter())
            .flat_map(|(_, current, previous)| current.iter().chain(previous.iter()))
            .cloned()
            .collect()
    }

    /// Whether `presented` is one of them (compared in constant time).
    pub fn accepts(&self, presented: Option<&str>) -> bool {
        presented.is_some_and(|p| self.accepted_secrets().iter().any(|s| same_secret(p, s)))
    }
}

/// Applies one delivery. `header` is the secret the transport received in the
/// `x-evoq-secret` header, if it has headers; PostgREST's `request.headers` is read too.
pub fn ingest(payload: Value, header: Option<&str>) -> Value {
    ingest_with(&settings(), payload, header)
}

/// `ingest` with the settings already read.
pub fn ingest_with(settings: &Settings, payload: Value, header: Option<&str>) -> Value {
    let size = serde_json::to_string(&payload).map_or(usize::MAX, |s| s.len());
    if size > MAX_DELIVERY_BYTES {
        invalid(
            format!("the webhook payload is {size} bytes, over evoq's limit of {MAX_DELIVERY_BYTES}"),
            "Evolution API deliveries are a few KB. Subscribe the webhook without base64 media (evoq always sends base64: false).",
        );
    }
    let Some(gate) = settings.0.as_ref() else {
        refuse(
            "webhook delivery refused: evoq is not configured",
            "Run evoq_configure first; it creates the webhook secret deliveries must carry.",
        )
    };
    if gate.secret.is_none() {
        refuse(
            "webhook delivery refused: no webhook secret is set",
            "Run evoq_configure again: it creates the secret and sets it on every instance.",
        )
    };
    let destination = payload.get("destination").and_then(Value::as_str);
    let presented = header
        .map(str::to_string)
        .or(gate.header.clone())
        .or_else(|| destination.and_then(secret_in_url).map(str::to_string));
    let sender = presented.as_deref().and_then(|p| server_of(gate, p));
    let Some(sender) = sender else {
        refuse(
            if presented.is_some() {
                "webhook delivery refused: wrong webhook secret"
            } else {
                "webhook delivery refused: no webhook secret"
            },
            format!(
                "Deliveries carry the secret in the {SECRET_HEADER} header (v2) or as ?{SECRET_PARAM}= in the URL (v1.8); \
                 evoq sets both on every instance it creates, and evoq_refresh_qr sets them again after evoq_configure changes them."
            ),
        )
    };

    let delivery = match parse_delivery(&payload) {
        Ok(d) => d,
        Err(e) => invalid(
            e.message(),
            "evoq_webhook takes an Evolution API webhook delivery: {\"event\": ..., \"instance\": ..., \"data\": ...}.",
        ),
    };
    let namespace = gate.namespace.as_deref().unwrap_or("");
    if !is_ours(&delivery.instance, namespace, gate.owns_legacy_names) {
        return ignored(&delivery, "not an instance of this deployment");
    }
    // 0.7.0: a delivery counts only from the server that holds the instance (one server's
    // leaked secret cannot forge another's instances). With one server there is no other.
    if gate.servers.len() > 1 {
        if let Some(holder) = holder_of(&delivery.instance).filter(|h| *h != sender) {
            count("misdirected");
            return json!({"result": "ignored", "event": delivery.event, "instance": delivery.instance,
                          "why": format!("the instance is held by server {holder}, and the delivery carried the secret of server {sender}")});
        }
    }
    match effect(&delivery.change) {
        Effect::Apply(step) => match apply_step(&delivery, &step, &sender) {
            Some(status) => {
                count("applied");
                json!({"result": "applied", "event": delivery.event, "instance": delivery.instance,
                       "status": status})
            }
            None => ignored(
                &delivery,
                "nothing to change: no such instance, or its state or a newer delivery rules it out",
            ),
        },
        Effect::Ignore(why) => ignored(&delivery, why),
        Effect::Relay => {
            let payload = without_secrets(payload);
            let kept = Spi::get_one_with_args::<i64>(
                "SELECT evoq._relay_event($1, $2, $3)",
                &[
                    delivery.instance.clone().into(),
                    delivery.event.clone().into(),
                    pgrx::JsonB(payload).into(),
                ],
            )
            .or_internal("keeping a webhook delivery for the application");
            match kept {
                Some(id) => {
                    count("relayed");
                    json!({"result": "relayed", "event": delivery.event, "instance": delivery.instance,
                           "id": id})
                }
                None => ignored(&delivery, "no such instance"),
            }
        }
    }
}

/// Applies one Evolution API webhook delivery: the body of `evoq_webhook(jsonb)`, the public
/// function (sql/finalize.sql), whose one parameter has no name. PostgREST turns every key of a
/// JSON body into a named argument, except for a function with a single unnamed json/jsonb
/// parameter, which gets the raw body: that is the only shape an Evolution delivery
/// (`{"event", "instance", "data", ...}`) can reach through `/rest/v1/rpc/evoq_webhook`, and
/// pgrx names every parameter, hence the SQL wrapper. The secret comes from the `x-evoq-secret`
/// request header; v1.8 servers, which send no headers, carry it in the URL.
///
/// The Rust name stays `evoq_webhook`: its C symbol (`evoq_webhook_wrapper`) is what the
/// upgrade scripts of 0.3.0 and 0.4.0 create `evoq_webhook` with, and an upgrade from those
/// versions runs them against this library.
#[pg_extern(security_definer, schema = "evoq", name = "_webhook")]
#[search_path(pg_catalog, @extschema@, pg_temp)]
fn evoq_webhook(payload: pgrx::JsonB) -> pgrx::JsonB {
    pgrx::JsonB(ingest(payload.0, None))
}
