//! In-memory server state: the instances and the call log. No HTTP shapes live here;
//! `v2.rs`/`v1.rs` render these structs the way each server version would.

use std::time::Instant;

use serde_json::{json, Value};

use crate::util;

/// Baileys connection state as `connectionState` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    Close,
    Connecting,
    Open,
}

impl ConnState {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnState::Close => "close",
            ConnState::Connecting => "connecting",
            ConnState::Open => "open",
        }
    }

    pub fn parse(s: &str) -> Option<ConnState> {
        match s {
            "close" => Some(ConnState::Close),
            "connecting" => Some(ConnState::Connecting),
            "open" => Some(ConnState::Open),
            _ => None,
        }
    }
}

/// One emitted QR. `count` is the instance's running QR counter at emission time.
#[derive(Clone, Debug)]
pub struct Qr {
    pub code: String,
    pub base64: String,
    /// 8-character code, only when a `number` was given (pairing instead of scanning).
    pub pairing_code: Option<String>,
}

impl Qr {
    pub fn new() -> Qr {
        // Real codes look like `2@<ref>,<noise key>,<identity key>,<adv secret>`.
        let code = format!(
            "2@{},{},{},{}",
            util::random_string(60, util::ALNUM),
            util::base64(&util::random_bytes(32)),
            util::base64(&util::random_bytes(32)),
            util::base64(&util::random_bytes(32)),
        );
        // A PNG signature followed by noise: valid base64, recognisably "an image".
        let mut png = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
        png.extend(util::random_bytes(48));
        Qr {
            code,
            base64: format!("data:image/png;base64,{}", util::base64(&png)),
            pairing_code: None,
        }
    }
}

/// A fresh random QR, as `new`.
impl Default for Qr {
    fn default() -> Qr {
        Qr::new()
    }
}

/// Webhook config of one instance, in a version-neutral form.
#[derive(Clone, Debug)]
pub struct Webhook {
    pub id: String,
    pub enabled: bool,
    pub url: String,
    pub headers: Option<Value>,
    pub events: Vec<String>,
    pub by_events: bool,
    /// `None` when never sent: v1.8 `webhook/find` leaves the key out then.
    pub base64: Option<bool>,
    pub created_ms: u64,
    pub updated_ms: u64,
}

impl Webhook {
    pub fn new() -> Webhook {
        let now = util::now_epoch_ms();
        Webhook {
            id: format!("c{}", util::random_string(24, util::LOWER_ALNUM)),
            enabled: false,
            url: String::new(),
            headers: None,
            events: Vec::new(),
            by_events: false,
            base64: None,
            created_ms: now,
            updated_ms: now,
        }
    }

    /// Neutral JSON used by the Rust API and `/__mock/instances`.
    pub fn to_json(&self) -> Value {
        json!({
            "enabled": self.enabled,
            "url": self.url,
            "events": self.events,
            "byEvents": self.by_events,
            "base64": self.base64.unwrap_or(false),
            "headers": self.headers,
        })
    }
}

/// Settings accepted on create; echoed back in the create reply and fetchInstances.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    pub reject_call: bool,
    pub msg_call: String,
    pub groups_ignore: bool,
    pub always_online: bool,
    pub read_messages: bool,
    pub read_status: bool,
    pub sync_full_history: bool,
    pub wavoip_token: String,
}

#[derive(Clone, Debug)]
pub struct Instance {
    pub name: String,
    pub id: String,
    pub token: String,
    pub integration: String,
    pub number: Option<String>,
    pub state: ConnState,
    pub qr_count: u32,
    pub qr: Option<Qr>,
    pub webhook: Option<Webhook>,
    pub settings: Settings,
    pub settings_id: String,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// Sockets the server keeps alive for this instance (contract 3.2, 7): +1 per socket
    /// start, 0 after a logout, 1 while open. The mock only counts them.
    pub sockets: u32,
    /// Owner JID (`<digits>@s.whatsapp.net`) from the scan until the session ends; the
    /// webhook envelope's `sender`.
    pub wuid: Option<String>,
    /// WhatsApp profile name from the scan (fetchInstances, the `open` webhook).
    pub profile_name: Option<String>,
    /// When the last QR was issued, or the socket started without one: the QR clock's
    /// next tick is `qr_anchor + qr_ttl_ms`. None when no socket is waiting for a scan.
    pub qr_anchor: Option<Instant>,
}

impl Instance {
    pub fn new(name: &str, token: Option<String>, integration: &str) -> Instance {
        let now = util::now_epoch_ms();
        Instance {
            name: name.to_string(),
            id: uuid::Uuid::new_v4().to_string(),
            token: token.unwrap_or_else(|| uuid::Uuid::new_v4().to_string().to_uppercase()),
            integration: integration.to_string(),
            number: None,
            state: ConnState::Close,
            qr_count: 0,
            qr: None,
            webhook: None,
            settings: Settings::default(),
            settings_id: format!("c{}", util::random_string(24, util::LOWER_ALNUM)),
            created_ms: now,
            updated_ms: now,
            sockets: 0,
            wuid: None,
            profile_name: None,
            qr_anchor: None,
        }
    }

    /// Emits a fresh QR, as Baileys does when a ref expires (count grows across QRs).
    pub fn issue_qr(&mut self) {
        self.qr_count += 1;
        let mut qr = Qr::new();
        if self.number.is_some() {
            qr.pairing_code = Some(util::random_string(8, b"ABCDEFGHJKLMNPQRSTVWXYZ0123456789"));
        }
        self.qr = Some(qr);
        self.qr_anchor = Some(Instant::now());
    }

    /// Moves to a new state; leaving `connecting` drops the QR since it can no longer be scanned.
    pub fn set_state(&mut self, state: ConnState) {
        self.state = state;
        if state != ConnState::Connecting {
            self.qr = None;
            self.qr_anchor = None;
        }
        self.updated_ms = util::now_epoch_ms();
    }

    /// Neutral JSON used by the Rust API and `/__mock/instances`.
    pub fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "id": self.id,
            "token": self.token,
            "integration": self.integration,
            "state": self.state.as_str(),
            "qr_count": self.qr_count,
            "qr_code": self.qr.as_ref().map(|q| q.code.clone()),
            "webhook": self.webhook.as_ref().map(Webhook::to_json),
            "sockets": self.sockets,
            "wuid": self.wuid,
            "profile_name": self.profile_name,
        })
    }
}

/// All instances, in creation order (fetchInstances lists them that way).
#[derive(Default)]
pub struct Store {
    pub instances: Vec<Instance>,
    /// Sockets of instances that were deleted (or lost) while their sockets still ran:
    /// a delete does not stop a running reconnect loop (contract 3.8).
    pub orphan_sockets: u64,
}

impl Store {
    pub fn get(&self, name: &str) -> Option<&Instance> {
        self.instances.iter().find(|i| i.name == name)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut Instance> {
        self.instances.iter_mut().find(|i| i.name == name)
    }

    /// Removes the instance; sockets it still had keep running as orphans.
    pub fn remove(&mut self, name: &str) -> bool {
        let Some(pos) = self.instances.iter().position(|i| i.name == name) else {
            return false;
        };
        let gone = self.instances.remove(pos);
        self.orphan_sockets += u64::from(gone.sockets);
        true
    }

    /// `{"total", "orphans", "per_instance": {name: n}}` for `GET /__mock/sockets`.
    pub fn sockets_json(&self) -> Value {
        let mut per = serde_json::Map::new();
        let mut total = self.orphan_sockets;
        for i in &self.instances {
            total += u64::from(i.sockets);
            per.insert(i.name.clone(), json!(i.sockets));
        }
        json!({"total": total, "orphans": self.orphan_sockets, "per_instance": per})
    }
}

/// Every non-control request, in arrival order. Entries are written on arrival (status null)
/// and completed when a reply goes out, so a hung request is visible with `status: null`.
pub struct CallLog {
    start: Instant,
    next_seq: u64,
    entries: Vec<Value>,
}

impl CallLog {
    pub fn new(start: Instant) -> CallLog {
        CallLog {
            start,
            next_seq: 1,
            entries: Vec::new(),
        }
    }

    pub fn record(
        &mut self,
        method: &str,
        path: &str,
        query: &str,
        apikey: Option<&str>,
        body: Value,
    ) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.entries.push(json!({
            "seq": seq,
            "method": method,
            "path": path,
            "query": query,
            "apikey": apikey,
            "body": body,
            "status": null,
            "at_ms": self.start.elapsed().as_millis() as u64,
        }));
        seq
    }

    pub fn set_status(&mut self, seq: u64, status: u16) {
        if let Some(e) = self.entries.iter_mut().rev().find(|e| e["seq"] == seq) {
            e["status"] = json!(status);
        }
    }

    pub fn entries(&self) -> Vec<Value> {
        self.entries.clone()
    }

    /// Keeps `next_seq` growing so a request still in flight across a reset cannot
    /// complete the entry of a newer request that reused its number.
    pub fn clear(&mut self) {
        self.entries.clear();
    }
}
