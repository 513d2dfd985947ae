//! Instance life cycle: socket starts, QR arrivals, the QR limit, scans, logouts, restarts,
//! deletes, and the QR clock. Each transition queues the webhooks the real server sends
//! (contract section 4) and keeps the socket count (contract 3.2, 3.8, 7).
//!
//! Every function here runs with the state lock held, so events are queued in the order
//! they happen.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::server::{lock, Shared};
use crate::state::{ConnState, Instance, Qr};
use crate::webhook::emit;
use crate::Flavor;

/// The default owner number of a scan without one.
pub const DEFAULT_NUMBER: &str = "5511999999999";
/// The default profile name of a scan without one.
pub const DEFAULT_PROFILE: &str = "Mock User";

/// `connection.update` `connecting` (both versions send it when a socket starts).
fn emit_connecting(shared: &Shared, i: &Instance) {
    emit(shared, i, "connection.update", connecting_data(&i.name));
}

/// The `data` of `connection.update` `connecting` (the same on both versions). Public for
/// `webhook-blast`.
pub fn connecting_data(instance: &str) -> Value {
    json!({"instance": instance, "state": "connecting", "statusReason": 200})
}

/// The `data` of `qrcode.updated` carrying a QR (the same on both versions). Public for
/// `webhook-blast`.
pub fn qr_data(instance: &str, qr: &Qr) -> Value {
    json!({"qrcode": {
        "instance": instance,
        "pairingCode": qr.pairing_code,
        "code": qr.code,
        "base64": qr.base64,
    }})
}

fn emit_open(shared: &Shared, i: &Instance) {
    let data = match shared.flavor {
        Flavor::V2 => json!({
            "instance": i.name,
            "wuid": i.wuid,
            "profileName": i.profile_name,
            "profilePictureUrl": null,
            "state": "open",
            "statusReason": 200,
        }),
        Flavor::V1 => json!({"instance": i.name, "state": "open", "statusReason": 200}),
    };
    emit(shared, i, "connection.update", data);
}

/// A new socket: `connecting`, one more socket, the QR clock starts from now. The first QR
/// is the caller's business (`first_qr`), because create may answer before it arrives.
///
/// With `qr_never` (WhatsApp unreachable, contract 7) a v2 instance that was `close` stays
/// `close`: its socket fails at once and reconnects in a loop that connectionState mostly
/// reads as `close`, so the next connect starts yet another one (contract 3.2). v1.8 mostly
/// reads `connecting` there, which is what the mock keeps.
pub fn start_socket(shared: &Shared, i: &mut Instance) {
    i.sockets += 1;
    if shared.flavor == Flavor::V2 && i.state == ConnState::Close && shared.knobs().qr_never {
        emit_connecting(shared, i);
        return;
    }
    replace_socket(shared, i);
}

/// The current socket is ended and a new one started (restart): `connecting` again, the
/// socket count unchanged (at least 1), the old QR gone.
pub fn replace_socket(shared: &Shared, i: &mut Instance) {
    i.sockets = i.sockets.max(1);
    i.set_state(ConnState::Connecting);
    i.qr = None;
    i.qr_anchor = Some(Instant::now());
    emit_connecting(shared, i);
    shared.clock.poke();
}

/// The first QR of a fresh socket arrives, unless the server never gets any (`qr_never`).
pub fn first_qr(shared: &Shared, i: &mut Instance) {
    if !shared.knobs().qr_never {
        qr_arrives(shared, i);
    }
}

/// WhatsApp hands the socket a new QR ref: at the limit the server gives up instead
/// (`count === QRCODE_LIMIT` in `connectionUpdate`), else the counter grows and
/// `qrcode.updated` goes out.
pub fn qr_arrives(shared: &Shared, i: &mut Instance) {
    if i.qr_count >= shared.knobs().qr_limit {
        qr_limit(shared, i);
        return;
    }
    i.issue_qr();
    let data = qr_data(&i.name, i.qr.as_ref().expect("just issued"));
    emit(shared, i, "qrcode.updated", data);
}

/// QRCODE_LIMIT reached without a scan: the limit message, `refused`, then a silent logout
/// (state `close`, sockets stopped, counter back to 0).
pub fn qr_limit(shared: &Shared, i: &mut Instance) {
    emit(
        shared,
        i,
        "qrcode.updated",
        json!({"message": "QR code limit reached, please login again", "statusCode": 500}),
    );
    let refused = match shared.flavor {
        Flavor::V2 => json!({
            "instance": i.name,
            "state": "refused",
            "statusReason": 428,
            "wuid": null,
            "profileName": null,
            "profilePictureUrl": null,
        }),
        Flavor::V1 => json!({"instance": i.name, "state": "refused", "statusReason": 428}),
    };
    emit(shared, i, "connection.update", refused);
    end_session(i);
}

/// The session is gone: `close`, no socket, no QR, counter reset, no owner.
fn end_session(i: &mut Instance) {
    i.set_state(ConnState::Close);
    i.sockets = 0;
    i.qr_count = 0;
    i.wuid = None;
    i.profile_name = None;
}

/// The phone scanned the QR: `open` with an owner; an open instance keeps one socket.
pub fn scan(shared: &Shared, i: &mut Instance, number: Option<&str>, profile: Option<&str>) {
    let digits: String = number
        .or(i.number.as_deref())
        .unwrap_or(DEFAULT_NUMBER)
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    let digits = if digits.is_empty() {
        DEFAULT_NUMBER.to_string()
    } else {
        digits
    };
    i.wuid = Some(format!("{digits}@s.whatsapp.net"));
    i.profile_name = Some(profile.unwrap_or(DEFAULT_PROFILE).to_string());
    i.set_state(ConnState::Open);
    i.sockets = 1;
    emit_open(shared, i);
}

/// A final close (logout route, the phone unlinking the device, v2 delete): `close` 401,
/// then on v2 `logout.instance`; the session ends and every socket stops.
pub fn logout(shared: &Shared, i: &mut Instance) {
    emit(
        shared,
        i,
        "connection.update",
        json!({"instance": i.name, "state": "close", "statusReason": 401}),
    );
    if shared.flavor == Flavor::V2 {
        emit(shared, i, "logout.instance", Value::Null);
    }
    end_session(i);
}

/// Restart of an open instance: the socket is replaced and logs in again with the stored
/// session (`connecting`, then `open`).
pub fn reconnect_open(shared: &Shared, i: &mut Instance) {
    emit_connecting(shared, i);
    i.sockets = i.sockets.max(1);
    emit_open(shared, i);
}

/// Before a v2 delete removes the instance: `remove.instance`, then `instance.delete`.
pub fn announce_delete(shared: &Shared, i: &Instance) {
    emit(shared, i, "remove.instance", Value::Null);
    emit(
        shared,
        i,
        "instance.delete",
        json!({"instanceName": i.name, "instanceId": i.id}),
    );
}

/// `instance.create` (v2).
pub fn announce_create(shared: &Shared, i: &Instance) {
    emit(
        shared,
        i,
        "instance.create",
        json!({"instanceName": i.name, "instanceId": i.id}),
    );
}

/// The control API's "connecting": a close instance starts a socket as connect does; an open
/// one drops to `connecting` on its socket with a fresh QR; a connecting one is left alone.
pub fn force_connecting(shared: &Shared, i: &mut Instance) {
    match i.state {
        ConnState::Connecting => {}
        ConnState::Close => {
            i.sockets += 1;
            replace_socket(shared, i);
            first_qr(shared, i);
        }
        ConnState::Open => {
            i.wuid = None;
            i.profile_name = None;
            replace_socket(shared, i);
            first_qr(shared, i);
        }
    }
}

/// Wakes the QR clock when a deadline may have moved closer.
pub struct Clock {
    generation: Mutex<u64>,
    wake: Condvar,
}

impl Clock {
    pub fn new() -> Clock {
        Clock {
            generation: Mutex::new(0),
            wake: Condvar::new(),
        }
    }

    pub fn poke(&self) {
        *lock(&self.generation) += 1;
        self.wake.notify_all();
    }

    fn generation(&self) -> u64 {
        *lock(&self.generation)
    }

    fn wait(&self, seen: u64, timeout: Duration) {
        let g = lock(&self.generation);
        if *g == seen {
            let _ = self.wake.wait_timeout(g, timeout);
        }
    }
}

/// The QR clock: while an instance is `connecting` on a live socket, a new QR arrives every
/// `qr_ttl_ms` (Baileys' `qrTimeout`). Off when `qr_ttl_ms` is 0 (then every connect on a
/// connecting instance counts as a tick) or `qr_never` is set. Runs until the server stops.
pub fn run_clock(shared: Arc<Shared>) {
    const IDLE: Duration = Duration::from_millis(500);
    while !shared.is_stopped() {
        let seen = shared.clock.generation();
        let wait = {
            let knobs = shared.knobs();
            let mut store = lock(&shared.store);
            let now = Instant::now();
            let mut next: Option<Instant> = None;
            if knobs.qr_ttl_ms > 0 && !knobs.qr_never {
                let ttl = Duration::from_millis(knobs.qr_ttl_ms);
                for i in store.instances.iter_mut() {
                    if i.state != ConnState::Connecting || i.sockets == 0 {
                        continue;
                    }
                    let Some(anchor) = i.qr_anchor else { continue };
                    if anchor + ttl <= now {
                        qr_arrives(&shared, i);
                    }
                    if i.state == ConnState::Connecting {
                        if let Some(a) = i.qr_anchor {
                            let due = a + ttl;
                            next = Some(next.map_or(due, |n| n.min(due)));
                        }
                    }
                }
            }
            next.map_or(IDLE, |n| n.saturating_duration_since(now).min(IDLE))
        };
        if !wait.is_zero() {
            shared.clock.wait(seen, wait);
        }
    }
}
