//! End-to-end tests: a real MockServer on an ephemeral port, driven over HTTP with ureq.

use std::time::{Duration, Instant};

use evolution_mock::{FaultKind, FaultRule, Flavor, MockConfig, MockServer};
use serde_json::{json, Value};

const KEY: &str = "BQYHJGJHJ";

struct Client {
    agent: ureq::Agent,
    base: String,
}

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .into()
}

impl Client {
    fn new(mock: &MockServer) -> Client {
        Client::with_timeout(mock, Duration::from_secs(10))
    }

    fn with_timeout(mock: &MockServer, t: Duration) -> Client {
        Client {
            agent: agent(t),
            base: mock.url(),
        }
    }

    /// Sends a request; the body comes back as JSON, or a string if it is not JSON, or null if empty.
    fn try_req(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> Result<(u16, Value), ureq::Error> {
        let url = format!("{}{}", self.base, path);
        let resp = match method {
            "GET" => {
                let mut r = self.agent.get(&url);
                if let Some(k) = key {
                    r = r.header("apikey", k);
                }
                r.call()
            }
            "DELETE" => {
                let mut r = self.agent.delete(&url);
                if let Some(k) = key {
                    r = r.header("apikey", k);
                }
                r.call()
            }
            m => {
                let mut r = match m {
                    "POST" => self.agent.post(&url),
                    "PUT" => self.agent.put(&url),
                    _ => panic!("method {m}"),
                };
                if let Some(k) = key {
                    r = r.header("apikey", k);
                }
                match body {
                    Some(b) => r.send_json(&b),
                    None => r.send_empty(),
                }
            }
        };
        let mut resp = resp?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string()?;
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok((status, value))
    }

    fn req(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.try_req(method, path, key, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    fn get(&self, path: &str, key: Option<&str>) -> (u16, Value) {
        self.req("GET", path, key, None)
    }

    fn post(&self, path: &str, key: Option<&str>, body: Value) -> (u16, Value) {
        self.req("POST", path, key, Some(body))
    }
}

fn v2() -> MockServer {
    MockServer::start(0, MockConfig::default()).unwrap()
}

fn v1() -> MockServer {
    MockServer::start(
        0,
        MockConfig {
            flavor: Flavor::V1,
            ..MockConfig::default()
        },
    )
    .unwrap()
}

fn create_v2(c: &Client, name: &str, qrcode: bool) -> Value {
    let (s, b) = c.post(
        "/instance/create",
        Some(KEY),
        json!({"instanceName": name, "integration": "WHATSAPP-BAILEYS", "qrcode": qrcode}),
    );
    assert_eq!(s, 201, "{b}");
    b
}

fn rule(method: Option<&str>, path: &str, kind: FaultKind, times: Option<u32>) -> FaultRule {
    FaultRule {
        method: method.map(str::to_string),
        path_contains: path.to_string(),
        path_equals: None,
        kind,
        times,
    }
}

#[test]
fn root_reports_version() {
    let mock = v2();
    let c = Client::new(&mock);
    let (s, b) = c.get("/", None);
    assert_eq!(s, 200);
    assert_eq!(b["version"], "2.3.6");
    assert_eq!(b["clientName"], "evolution_mock");
    assert_eq!(b["whatsappWebVersion"], "2.3000.1027934701");
    assert_eq!(b["message"], "Welcome to the Evolution API, it is working!");

    let mock = v1();
    let (s, b) = Client::new(&mock).get("/", None);
    assert_eq!(s, 200);
    assert_eq!(b["version"], "1.8.2");
    assert!(b["swagger"].as_str().unwrap().ends_with("/docs"));
    assert!(b.get("whatsappWebVersion").is_none());
}

#[test]
fn create_v2_shape() {
    let mock = v2();
    let c = Client::new(&mock);
    let (s, b) = c.post(
        "/instance/create",
        Some(KEY),
        json!({
            "instanceName": "t1", "integration": "WHATSAPP-BAILEYS", "qrcode": true,
            "rejectCall": true, "groupsIgnore": true,
            "webhook": {"url": "http://127.0.0.1:9999/hook", "headers": {"x-test": "abc"},
                        "byEvents": false, "base64": false, "events": ["QRCODE_UPDATED"]}
        }),
    );
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["instance"]["instanceName"], "t1");
    assert_eq!(b["instance"]["integration"], "WHATSAPP-BAILEYS");
    assert_eq!(b["instance"]["status"], "connecting");
    assert_eq!(b["instance"]["webhookWaBusiness"], Value::Null);
    assert_eq!(b["instance"]["accessTokenWaBusiness"], "");
    let hash = b["hash"].as_str().expect("hash is a string on v2");
    assert_eq!(hash, hash.to_uppercase());
    assert_eq!(hash.len(), 36);
    assert_eq!(b["qrcode"], json!({"count": 0}));
    assert_eq!(
        b["webhook"],
        json!({"webhookUrl": "http://127.0.0.1:9999/hook", "webhookHeaders": {"x-test": "abc"},
               "webhookByEvents": false, "webhookBase64": false})
    );
    assert_eq!(b["settings"]["rejectCall"], true);
    assert_eq!(b["settings"]["alwaysOnline"], false);
    for k in ["websocket", "rabbitmq", "nats", "sqs"] {
        assert_eq!(b[k], json!({}));
    }
    let inst = mock.instance("t1").unwrap();
    assert_eq!(inst["state"], "connecting");
    assert_eq!(inst["token"], hash);
    assert_eq!(inst["webhook"]["url"], "http://127.0.0.1:9999/hook");
    assert_eq!(inst["webhook"]["enabled"], true);

    // Without qrcode: close, no qrcode key; a given token is used as the hash.
    let (s, b) = c.post(
        "/instance/create",
        Some(KEY),
        json!({"instanceName": "t2", "integration": "WHATSAPP-BAILEYS", "token": "tok-2"}),
    );
    assert_eq!(s, 201);
    assert_eq!(b["instance"]["status"], "close");
    assert_eq!(b["hash"], "tok-2");
    assert!(b.get("qrcode").is_none());
    assert_eq!(b["webhook"], json!({}));
    assert_eq!(mock.instance_names(), vec!["t1", "t2"]);
}

#[test]
fn create_v2_errors() {
    let mock = v2();
    let c = Client::new(&mock);
    let (s, b) = c.post("/instance/create", Some(KEY), json!({"instanceName": "x"}));
    assert_eq!(s, 400);
    assert_eq!(
        b,
        json!({"status":400,"error":"Bad Request","response":{"message":["Invalid integration"]}})
    );
    let (s, b) = c.post(
        "/instance/create",
        Some(KEY),
        json!({"instanceName": "x", "integration": "NOPE"}),
    );
    assert_eq!(
        (s, &b["response"]["message"]),
        (400, &json!(["Invalid integration"]))
    );
    let (s, b) = c.post(
        "/instance/create",
        Some(KEY),
        json!({"instanceName": "x", "integration": "WHATSAPP-BAILEYS", "webhook": {"url": "http://h/"}}),
    );
    assert_eq!(s, 400);
    assert_eq!(
        b["response"]["message"],
        json!(["Cannot read properties of undefined (reading 'length')"])
    );
    let (s, b) = c.post(
        "/instance/create",
        Some(KEY),
        json!({"instanceName": "x", "integration": "WHATSAPP-BAILEYS", "qrcode": "yes"}),
    );
    assert_eq!(s, 400);
    assert_eq!(
        b,
        json!({"status":400,"error":"Bad Request","response":{"message":[["qrcode is not of a type(s) boolean"]]}})
    );
    // None of the failures left an instance behind.
    assert!(mock.instance_names().is_empty());
}

#[test]
fn create_v1_shape() {
    let mock = v1();
    let c = Client::new(&mock);
    let (s, b) = c.post(
        "/instance/create",
        Some(KEY),
        json!({"instanceName": "v1a", "qrcode": true, "token": "T1",
               "webhook": "http://127.0.0.1:9999/hook", "webhook_by_events": false,
               "events": ["QRCODE_UPDATED", "CONNECTION_UPDATE"]}),
    );
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["instance"]["status"], "created");
    assert_eq!(b["instance"]["webhook_wa_business"], Value::Null);
    assert_eq!(b["hash"], json!({"apikey": "T1"}));
    assert_eq!(b["qrcode"], json!({"count": 0}));
    assert_eq!(
        b["webhook"],
        json!({"webhook": "http://127.0.0.1:9999/hook", "webhook_by_events": false,
               "events": ["QRCODE_UPDATED", "CONNECTION_UPDATE"]})
    );
    assert_eq!(b["settings"]["groups_ignore"], true);
    assert_eq!(b["typebot"], json!({"enabled": false}));
    assert_eq!(mock.instance("v1a").unwrap()["state"], "connecting");

    // Duplicate token, empty name, bad event name.
    let (s, b) = c.post(
        "/instance/create",
        Some(KEY),
        json!({"instanceName": "v1b", "token": "T1"}),
    );
    assert_eq!(
        (s, &b["response"]["message"]),
        (400, &json!(["Token already exists"]))
    );
    let (s, b) = c.post("/instance/create", None, json!({"instanceName": ""}));
    assert_eq!(s, 403);
    assert_eq!(
        b["response"]["message"],
        json!(["This name \"\" is already in use."])
    );
    let (s, b) = c.post(
        "/instance/create",
        Some(KEY),
        json!({"instanceName": "v1c", "events": ["MESSAGES_EDITED"]}),
    );
    assert_eq!(s, 400);
    let msg = &b["response"]["message"];
    assert!(
        msg[0][0]
            .as_str()
            .unwrap()
            .starts_with("events[0] is not one of enum values: "),
        "{b}"
    );

    // No qrcode: no qrcode key, hash generated, integration optional.
    let (s, b) = c.post(
        "/instance/create",
        Some(KEY),
        json!({"instanceName": "v1d"}),
    );
    assert_eq!(s, 201);
    assert!(b.get("qrcode").is_none());
    assert!(b["hash"]["apikey"].as_str().unwrap().len() == 36);
    assert_eq!(mock.instance("v1d").unwrap()["state"], "close");
}

#[test]
fn name_taken_403_comes_before_401() {
    let mock = v2();
    let c = Client::new(&mock);
    create_v2(&c, "t1", false);
    let (s, b) = c.post("/instance/create", None, json!({"instanceName": "t1"}));
    assert_eq!(s, 403);
    assert_eq!(
        b,
        json!({"status":403,"error":"Forbidden","response":{"message":["This name \"t1\" is already in use."]}})
    );
    // A free name without a key is plain 401.
    let (s, b) = c.post(
        "/instance/create",
        Some("wrong"),
        json!({"instanceName": "t9"}),
    );
    assert_eq!(s, 401);
    assert_eq!(
        b,
        json!({"status":401,"error":"Unauthorized","response":{"message":"Unauthorized"}})
    );
}

#[test]
fn not_found_404_comes_before_401_and_auth_rules() {
    let mock = v2();
    let c = Client::new(&mock);
    for path in [
        "/instance/connect/nope",
        "/instance/connectionState/nope",
        "/webhook/find/nope",
    ] {
        let (s, b) = c.get(path, None);
        assert_eq!(s, 404, "{path}");
        assert_eq!(
            b,
            json!({"status":404,"error":"Not Found","response":{"message":["The \"nope\" instance does not exist"]}})
        );
    }
    let created = create_v2(&c, "a", false);
    let token_a = created["hash"].as_str().unwrap().to_string();
    let token_b = create_v2(&c, "b", false)["hash"]
        .as_str()
        .unwrap()
        .to_string();
    let unauthorized =
        json!({"status":401,"error":"Unauthorized","response":{"message":"Unauthorized"}});
    assert_eq!(
        c.get("/instance/connectionState/a", None),
        (401, unauthorized.clone())
    );
    assert_eq!(
        c.get("/instance/connectionState/a", Some("bad")),
        (401, unauthorized.clone())
    );
    // Another instance's token is not accepted; the own token and the global key are.
    assert_eq!(c.get("/instance/connectionState/a", Some(&token_b)).0, 401);
    let (s, b) = c.get("/instance/connectionState/a", Some(&token_a));
    assert_eq!(
        (s, b),
        (
            200,
            json!({"instance":{"instanceName":"a","state":"close"}})
        )
    );
    assert_eq!(c.get("/instance/connectionState/a", Some(KEY)).0, 200);
    // Instance tokens never create.
    assert_eq!(
        c.post(
            "/instance/create",
            Some(&token_a),
            json!({"instanceName": "z"})
        )
        .0,
        401
    );
}

#[test]
fn apikey_header_name_is_case_insensitive() {
    let mock = v2();
    let c = Client::new(&mock);
    let resp = c
        .agent
        .get(format!("{}/instance/fetchInstances", mock.url()))
        .header("APIKEY", KEY)
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
}

#[test]
fn connect_qr_cadence() {
    let mock = v2();
    let c = Client::new(&mock);
    let created = create_v2(&c, "q", true);
    assert_eq!(created["qrcode"], json!({"count": 0}));

    // QR 1 arrives right after create; connect returns the current QR and mints none.
    let (s, q1) = c.get("/instance/connect/q", Some(KEY));
    assert_eq!(s, 200);
    assert_eq!(q1["count"], 1);
    assert_eq!(q1["pairingCode"], Value::Null);
    assert!(q1["code"].as_str().unwrap().starts_with("2@"));
    assert!(q1["base64"]
        .as_str()
        .unwrap()
        .starts_with("data:image/png;base64,"));
    let (_, again) = c.get("/instance/connect/q", Some(KEY));
    assert_eq!(again, q1);

    // TTL 0: no clock; every connect counts as a tick, so a new QR on every call.
    mock.set_qr_ttl_ms(0);
    let (_, q2) = c.get("/instance/connect/q", Some(KEY));
    let (_, q3) = c.get("/instance/connect/q", Some(KEY));
    assert_eq!(q2["count"], 2);
    assert_eq!(q3["count"], 3);
    assert_ne!(q1["code"], q2["code"]);
    assert_ne!(q2["code"], q3["code"]);

    // A close instance starts connecting on connect and gets a QR at once.
    create_v2(&c, "closed", false);
    let (_, q) = c.get("/instance/connect/closed", Some(KEY));
    assert_eq!(q["count"], 1);
    assert_eq!(mock.instance("closed").unwrap()["state"], "connecting");

    // ?number= while connecting: 2.3.6 answers the cached QR and ignores the number (contract
    // 12, evolution-api #2197).
    let (_, q) = c.get("/instance/connect/closed?number=5511999999999", Some(KEY));
    assert_eq!(q["pairingCode"], Value::Null);
    assert_eq!(mock.pairing("closed").unwrap().0, None);
    // After a logout (close), the connect takes the number and asks for a pairing code.
    let (s, _) = c.req("DELETE", "/instance/logout/closed", Some(KEY), None);
    assert_eq!(s, 200);
    let (_, q) = c.get("/instance/connect/closed?number=5511999999999", Some(KEY));
    let code = q["pairingCode"].as_str().unwrap().to_string();
    assert_eq!(code.len(), 8);
    assert_eq!(
        mock.pairing("closed").unwrap(),
        (Some("5511999999999".into()), Some(code.clone()))
    );
    // The user types the code into WhatsApp: only the current code links.
    let (s, _) = c.post(
        "/__mock/instances/closed/pair",
        None,
        json!({"code": "NOTTHIS1"}),
    );
    assert_eq!(s, 409);
    let (s, b) = c.post("/__mock/instances/closed/pair", None, json!({"code": code}));
    assert_eq!(
        (s, b["instance"]["state"].as_str()),
        (200, Some("open")),
        "{b}"
    );

    // Scanned: open, and connect answers with the state shape.
    assert!(mock.set_state("q", "open"));
    let (s, b) = c.get("/instance/connect/q", Some(KEY));
    assert_eq!(
        (s, b),
        (200, json!({"instance":{"instanceName":"q","state":"open"}}))
    );
    let (_, b) = c.get("/instance/connectionState/q", Some(KEY));
    assert_eq!(b, json!({"instance":{"instanceName":"q","state":"open"}}));
    assert!(!mock.set_state("q", "weird"));
    assert!(!mock.set_state("ghost", "open"));
}

/// A create with a phone number (all digits, as the schema's unanchored `^\d+[\.@\w-]+`
/// takes it) and qrcode: the reply's QR carries a pairing code, and so does every later QR.
#[test]
fn create_with_a_number_brings_a_pairing_code() {
    let mock = v2();
    mock.set_qr_on_create(true);
    let c = Client::new(&mock);
    let (s, b) = c.post(
        "/instance/create",
        Some(KEY),
        json!({"instanceName": "p", "integration": "WHATSAPP-BAILEYS", "qrcode": true,
               "number": "5511987654321"}),
    );
    assert_eq!(s, 201, "{b}");
    assert_eq!(
        b["qrcode"]["pairingCode"].as_str().map(str::len),
        Some(8),
        "{b}"
    );
    for bad in ["", "x5511", "5", "5 511"] {
        let (s, b) = c.post(
            "/instance/create",
            Some(KEY),
            json!({"instanceName": format!("bad{}", bad.len()), "integration": "WHATSAPP-BAILEYS",
                   "number": bad}),
        );
        assert_eq!(s, 400, "{bad:?}: {b}");
    }
}

#[test]
fn qr_on_create_and_qr_clock() {
    let mock = MockServer::start(
        0,
        MockConfig {
            qr_on_create: true,
            qr_ttl_ms: 150,
            ..MockConfig::default()
        },
    )
    .unwrap();
    let c = Client::new(&mock);
    let b = create_v2(&c, "q", true);
    assert_eq!(b["qrcode"]["count"], 1);
    assert_eq!(b["qrcode"]["pairingCode"], Value::Null);
    let code = b["qrcode"]["code"].clone();
    assert!(code.as_str().unwrap().starts_with("2@"));
    let (_, q) = c.get("/instance/connect/q", Some(KEY));
    assert_eq!(q["code"], code);
    // The QR clock rotates it after qr_ttl_ms; connect then answers the new one.
    let start = Instant::now();
    let q = loop {
        let (_, q) = c.get("/instance/connect/q", Some(KEY));
        if q["count"] != 1 {
            break q;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the QR never rotated"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(start.elapsed() >= Duration::from_millis(100));
    assert!(q["count"].as_u64().unwrap() >= 2);
    assert_ne!(q["code"], code);
}

#[test]
fn logout_and_delete() {
    let mock = v2();
    let c = Client::new(&mock);
    create_v2(&c, "d", false);
    let (s, b) = c.req("DELETE", "/instance/logout/d", Some(KEY), None);
    assert_eq!(s, 400);
    assert_eq!(
        b["response"]["message"],
        json!(["The \"d\" instance is not connected"])
    );
    mock.set_state("d", "open");
    let (s, b) = c.req("DELETE", "/instance/logout/d", Some(KEY), None);
    assert_eq!(
        (s, b),
        (
            200,
            json!({"status":"SUCCESS","error":false,"response":{"message":"Instance logged out"}})
        )
    );
    assert_eq!(mock.instance("d").unwrap()["state"], "close");
    mock.set_state("d", "open");
    // v2 deletes even an open instance.
    let (s, b) = c.req("DELETE", "/instance/delete/d", Some(KEY), None);
    assert_eq!(
        (s, b),
        (
            200,
            json!({"status":"SUCCESS","error":false,"response":{"message":"Instance deleted"}})
        )
    );
    assert_eq!(
        c.req("DELETE", "/instance/delete/d", Some(KEY), None).0,
        404
    );

    // v1.8 refuses to delete an open instance.
    let mock = v1();
    let c = Client::new(&mock);
    c.post("/instance/create", Some(KEY), json!({"instanceName": "o"}));
    mock.set_state("o", "open");
    let (s, b) = c.req("DELETE", "/instance/delete/o", Some(KEY), None);
    assert_eq!(s, 400);
    assert_eq!(
        b["response"]["message"],
        json!(["The \"o\" instance needs to be disconnected"])
    );
    mock.set_state("o", "close");
    assert_eq!(
        c.req("DELETE", "/instance/delete/o", Some(KEY), None).0,
        200
    );
    assert!(mock.instance_names().is_empty());
}

#[test]
fn webhook_set_and_find_v2() {
    let mock = v2();
    let c = Client::new(&mock);
    create_v2(&c, "w", false);
    let (s, b) = c.get("/webhook/find/w", Some(KEY));
    assert_eq!((s, b), (200, Value::Null));

    // The v1 flat body is refused on v2.
    let (s, b) = c.post(
        "/webhook/set/w",
        Some(KEY),
        json!({"url": "http://h/x", "enabled": true}),
    );
    assert_eq!(s, 400);
    assert_eq!(
        b["response"]["message"],
        json!([["instance requires property \"webhook\""]])
    );
    // enabled without events: an unhandled TypeError.
    let (s, b) = c.post(
        "/webhook/set/w",
        Some(KEY),
        json!({"webhook": {"enabled": true, "url": "http://h/x"}}),
    );
    assert_eq!(
        (s, b),
        (
            500,
            json!({"status":500,"error":"Internal Server Error","response":{"message":"Cannot read properties of undefined (reading 'length')"}})
        )
    );
    // Unknown event name.
    let (s, b) = c.post(
        "/webhook/set/w",
        Some(KEY),
        json!({"webhook": {"enabled": true, "url": "http://h/x", "events": ["NEW_JWT_TOKEN"]}}),
    );
    assert_eq!(s, 400);
    assert!(b["response"]["message"][0][0]
        .as_str()
        .unwrap()
        .starts_with("webhook.events[0] is not one of enum values: APPLICATION_STARTUP,"));

    let (s, row) = c.post(
        "/webhook/set/w",
        Some(KEY),
        json!({"webhook": {"enabled": true, "url": "http://h/x", "events": ["QRCODE_UPDATED", "CONNECTION_UPDATE"],
                           "byEvents": true, "base64": true, "headers": {"authorization": "Bearer x"}}}),
    );
    assert_eq!(s, 201, "{row}");
    assert_eq!(row["url"], "http://h/x");
    assert_eq!(row["enabled"], true);
    assert_eq!(row["webhookByEvents"], true);
    assert_eq!(row["webhookBase64"], true);
    assert_eq!(row["headers"], json!({"authorization": "Bearer x"}));
    assert_eq!(row["instanceId"], mock.instance("w").unwrap()["id"]);
    assert!(row["createdAt"].as_str().unwrap().ends_with('Z'));
    // Left-out fields keep their values.
    let (_, row2) = c.post(
        "/webhook/set/w",
        Some(KEY),
        json!({"webhook": {"enabled": true, "url": "http://h/y", "events": []}}),
    );
    assert_eq!(row2["url"], "http://h/y");
    assert_eq!(row2["webhookByEvents"], true);
    assert_eq!(row2["headers"], json!({"authorization": "Bearer x"}));
    assert_eq!(row2["id"], row["id"]);
    let (s, found) = c.get("/webhook/find/w", Some(KEY));
    assert_eq!((s, found), (200, row2));
}

#[test]
fn webhook_set_and_find_v1() {
    let mock = v1();
    let c = Client::new(&mock);
    c.post("/instance/create", Some(KEY), json!({"instanceName": "w"}));
    let (_, b) = c.get("/webhook/find/w", Some(KEY));
    assert_eq!(
        b,
        json!({"enabled":false,"url":"","events":[],"webhook_by_events":false,"webhook_base64":false})
    );
    // The v2 wrapper is refused on v1.8.
    let (s, b) = c.post(
        "/webhook/set/w",
        Some(KEY),
        json!({"webhook": {"enabled": true, "url": "http://h/x", "events": []}}),
    );
    assert_eq!(s, 400);
    assert_eq!(
        b["response"]["message"],
        json!([["instance requires property \"url\""]])
    );
    let (s, b) = c.post(
        "/webhook/set/w",
        Some(KEY),
        json!({"url": "not a url", "events": []}),
    );
    assert_eq!(
        (s, &b["response"]["message"]),
        (400, &json!(["Invalid \"url\" property"]))
    );

    let (s, b) = c.post(
        "/webhook/set/w",
        Some(KEY),
        json!({"url": "http://h/x", "enabled": true, "webhook_by_events": true,
               "events": ["CONNECTION_UPDATE", "QRCODE_UPDATED"]}),
    );
    assert_eq!(s, 201);
    assert_eq!(
        b,
        json!({"webhook":{"instanceName":"w","webhook":{"url":"http://h/x","enabled":true,
               "webhook_by_events":true,"webhook_base64":false,"events":["CONNECTION_UPDATE","QRCODE_UPDATED"]}}})
    );
    let (_, b) = c.get("/webhook/find/w", Some(KEY));
    assert_eq!(
        b,
        json!({"enabled":true,"url":"http://h/x","events":["CONNECTION_UPDATE","QRCODE_UPDATED"],"webhook_by_events":true})
    );
}

#[test]
fn fetch_instances_shapes() {
    let mock = v2();
    let c = Client::new(&mock);
    let token = create_v2(&c, "f1", false)["hash"]
        .as_str()
        .unwrap()
        .to_string();
    create_v2(&c, "f2", true);
    let (s, b) = c.get("/instance/fetchInstances", Some(KEY));
    assert_eq!(s, 200);
    let rows = b.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["name"], "f1");
    assert_eq!(rows[0]["token"], token.as_str());
    assert_eq!(rows[0]["connectionStatus"], "close");
    assert_eq!(rows[0]["integration"], "WHATSAPP-BAILEYS");
    assert_eq!(rows[0]["_count"], json!({"Message":0,"Contact":0,"Chat":0}));
    assert_eq!(rows[1]["connectionStatus"], "connecting");
    let (s, b) = c.get("/instance/fetchInstances?instanceName=f2", Some(KEY));
    assert_eq!(s, 200);
    assert_eq!(
        b.as_array().unwrap().len(),
        1,
        "v2 stays an array when filtered"
    );
    let (s, b) = c.get("/instance/fetchInstances?instanceName=nope", Some(KEY));
    assert_eq!(s, 404);
    assert_eq!(
        b["response"]["message"],
        json!(["Instance \"nope\" not found"])
    );
    // An instance token lists only its own instance (v2 keeps instances in a database).
    let (s, b) = c.get("/instance/fetchInstances", Some(&token));
    assert_eq!(s, 200);
    assert_eq!(b.as_array().unwrap().len(), 1);
    assert_eq!(c.get("/instance/fetchInstances", None).0, 401);

    let mock = v1();
    let c = Client::new(&mock);
    c.post("/instance/create", Some(KEY), json!({"instanceName": "g1"}));
    c.post(
        "/instance/create",
        Some(KEY),
        json!({"instanceName": "g2", "token": "TT"}),
    );
    let (_, b) = c.get("/instance/fetchInstances", Some(KEY));
    assert_eq!(b.as_array().unwrap().len(), 2);
    assert_eq!(b[0]["instance"]["instanceName"], "g1");
    assert_eq!(b[0]["instance"]["status"], "close");
    let (s, b) = c.get("/instance/fetchInstances?instanceName=g2", Some(KEY));
    assert_eq!(s, 200);
    assert!(
        b.is_object(),
        "v1.8 filtered by name is a single object: {b}"
    );
    assert_eq!(b["instance"]["instanceName"], "g2");
    assert_eq!(
        b["instance"]["instanceId"],
        mock.instance("g2").unwrap()["id"]
    );
    // File storage: instance tokens are refused here.
    assert_eq!(c.get("/instance/fetchInstances", Some("TT")).0, 401);
}

#[test]
fn unknown_routes_and_decoding() {
    let mock = v2();
    let c = Client::new(&mock);
    let (s, b) = c.req("PUT", "/instance/restart/t1", Some(KEY), None);
    assert_eq!(
        (s, b),
        (
            404,
            json!({"status":404,"error":"Not Found","response":{"message":["Cannot PUT /instance/restart/t1"]}})
        )
    );
    create_v2(&c, "t3 odd/name", false);
    let (s, b) = c.get("/instance/connectionState/t3%20odd%2Fname?x=1", Some(KEY));
    assert_eq!(
        (s, &b["instance"]["instanceName"]),
        (200, &json!("t3 odd/name"))
    );
    // v2 restart of a closed instance: HTTP 200 with an error body.
    let (s, b) = c.post("/instance/restart/t3%20odd%2Fname", Some(KEY), json!({}));
    assert_eq!(
        (s, b),
        (200, json!({"error": true, "message": "[object Object]"}))
    );
}

#[test]
fn fault_status_codes_and_bodies() {
    let mock = v2();
    let c = Client::new(&mock);
    mock.add_fault(rule(
        Some("POST"),
        "/instance/create",
        FaultKind::Status { code: 500 },
        Some(2),
    ));
    let body = json!({"instanceName": "x", "integration": "WHATSAPP-BAILEYS"});
    for _ in 0..2 {
        let (s, b) = c.post("/instance/create", Some(KEY), body.clone());
        assert_eq!(
            (s, b),
            (
                500,
                json!({"status":500,"error":"Internal Server Error","response":{"message":"mock fault: internal error"}})
            )
        );
    }
    // Expired after two: the real reply comes back.
    assert_eq!(c.post("/instance/create", Some(KEY), body.clone()).0, 201);

    let cases = [
        (401, json!("Unauthorized")),
        (400, json!(["mock fault: bad request"])),
        (403, json!(["This name \"x\" is already in use."])),
        (404, json!(["The \"x\" instance does not exist"])),
    ];
    for (code, message) in cases {
        mock.clear_faults();
        mock.add_fault(rule(
            None,
            "/instance/connect/x",
            FaultKind::Status { code },
            None,
        ));
        let (s, b) = c.get("/instance/connect/x", Some(KEY));
        assert_eq!(s, code);
        assert_eq!(b["status"], code);
        assert_eq!(b["response"]["message"], message, "code {code}");
    }
    mock.clear_faults();

    // Method filter: a GET rule does not touch POSTs.
    mock.add_fault(rule(Some("GET"), "/webhook", FaultKind::Garbage, None));
    let (s, _) = c.post(
        "/webhook/set/x",
        Some(KEY),
        json!({"webhook": {"enabled": false, "url": "http://h/"}}),
    );
    assert_eq!(s, 201);
    let (s, b) = c.get("/webhook/find/x", Some(KEY));
    assert_eq!((s, b), (200, json!("<html>not json")));
    mock.clear_faults();

    mock.add_fault(rule(
        None,
        "/instance/connect",
        FaultKind::Error200,
        Some(1),
    ));
    let (s, b) = c.get("/instance/connect/x", Some(KEY));
    assert_eq!(
        (s, b),
        (
            200,
            json!({"error": true, "message": "mock fault: 200 with error"})
        )
    );
    mock.add_fault(rule(
        None,
        "/instance/connect",
        FaultKind::Empty200,
        Some(1),
    ));
    let (s, b) = c.get("/instance/connect/x", Some(KEY));
    assert_eq!((s, b), (200, Value::Null));
    mock.add_fault(rule(None, "/instance/", FaultKind::MissingFields, Some(2)));
    let (s, b) = c.post(
        "/instance/create",
        Some(KEY),
        json!({"instanceName": "y", "integration": "WHATSAPP-BAILEYS"}),
    );
    assert_eq!((s, b), (201, json!({})));
    let (s, b) = c.get("/instance/connectionState/x", Some(KEY));
    assert_eq!((s, b), (200, json!({})));
    // The faulted create never created anything.
    assert!(mock.instance("y").is_none());
}

#[test]
fn fault_delay_and_latency() {
    let mock = v2();
    let c = Client::new(&mock);
    mock.add_fault(rule(None, "/", FaultKind::Delay { ms: 300 }, Some(1)));
    let t = Instant::now();
    let (s, b) = c.get("/", None);
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert_eq!((s, &b["version"]), (200, &json!("2.3.6")));

    mock.set_latency_ms(200);
    let t = Instant::now();
    assert_eq!(c.get("/", None).0, 200);
    assert!(t.elapsed() >= Duration::from_millis(200));
    // The control API is never delayed.
    let t = Instant::now();
    assert_eq!(c.get("/__mock/calls", None).0, 200);
    assert!(t.elapsed() < Duration::from_millis(150));
}

/// `path_equals: "/"` over the control API delays `GET /` (the version probe) and no other
/// GET, which `path_contains: "/"` cannot do: every path contains "/".
#[test]
fn fault_path_equals_singles_out_get_root() {
    let mock = v2();
    let c = Client::new(&mock);
    let (s, _) = c.post(
        "/__mock/faults",
        None,
        json!({"method":"GET","path_equals":"/","kind":"delay","ms":400,"times":1}),
    );
    assert_eq!(s, 200);
    let t = Instant::now();
    assert_eq!(
        c.get("/instance/fetchInstances?instanceName=nobody", Some(KEY))
            .0,
        404
    );
    assert!(
        t.elapsed() < Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    let (_, faults) = c.get("/__mock/faults", None);
    assert_eq!(faults[0]["path_equals"], "/", "still armed: {faults}");
    let t = Instant::now();
    assert_eq!(c.get("/", None).0, 200);
    assert!(t.elapsed() >= Duration::from_millis(400));
    let (_, faults) = c.get("/__mock/faults", None);
    assert_eq!(faults, json!([]));
}

/// The latency mix's slow sleep in the tests, and the most a fast call may take: far enough
/// apart that a loaded machine cannot blur them.
const SLOW: Duration = Duration::from_millis(400);
const FAST_MAX: Duration = Duration::from_millis(300);

/// "slow" or "fast" for one `GET /`, failing on anything in between.
fn timed_root(c: &Client) -> &'static str {
    let t = Instant::now();
    assert_eq!(c.get("/", None).0, 200);
    let took = t.elapsed();
    match took {
        d if d >= SLOW => "slow",
        d if d < FAST_MAX => "fast",
        d => panic!("neither fast nor slow: {d:?}"),
    }
}

#[test]
fn latency_mix_every_nth_call_is_slow() {
    let mock = MockServer::start(
        0,
        MockConfig {
            slow_every: 3,
            slow_ms: SLOW.as_millis() as u64,
            ..MockConfig::default()
        },
    )
    .unwrap();
    let c = Client::new(&mock);
    let mut got = Vec::new();
    for _ in 0..6 {
        got.push(timed_root(&c));
        // Control calls neither count nor sleep.
        let t = Instant::now();
        assert_eq!(c.get("/__mock/calls", None).0, 200);
        assert!(t.elapsed() < FAST_MAX);
    }
    assert_eq!(got, ["fast", "fast", "slow", "fast", "fast", "slow"]);

    // The control API shows and changes the mix; a new period counts from the change.
    let (_, cfg) = c.get("/__mock/config", None);
    assert_eq!(
        (&cfg["slow_every"], &cfg["slow_ms"]),
        (&json!(3), &json!(400))
    );
    timed_root(&c);
    let (s, cfg) = c.post("/__mock/config", None, json!({"slow_every": 2}));
    assert_eq!(s, 200);
    assert_eq!(
        (&cfg["slow_every"], &cfg["slow_ms"]),
        (&json!(2), &json!(400))
    );
    assert_eq!([timed_root(&c), timed_root(&c)], ["fast", "slow"]);

    // The handle's setters do the same; reset restarts the count too.
    mock.set_slow_every(4);
    mock.set_slow_ms(7);
    let (_, cfg) = c.get("/__mock/config", None);
    assert_eq!(
        (&cfg["slow_every"], &cfg["slow_ms"]),
        (&json!(4), &json!(7))
    );
    mock.set_slow_ms(SLOW.as_millis() as u64);
    mock.set_slow_every(2);
    timed_root(&c);
    mock.reset();
    assert_eq!(timed_root(&c), "fast");
    mock.set_slow_every(0);
    assert_eq!(timed_root(&c), "fast");
}

#[test]
fn fault_hang_times_out_without_blocking_others() {
    let mock = v2();
    mock.add_fault(rule(None, "/instance/connect/h", FaultKind::Hang, None));
    let short = Client::with_timeout(&mock, Duration::from_millis(300));
    let t = Instant::now();
    let err = short.try_req("GET", "/instance/connect/h", Some(KEY), None);
    assert!(err.is_err(), "hang must time out, got {err:?}");
    assert!(t.elapsed() >= Duration::from_millis(250));

    // While one request hangs, others are served at once.
    let hung = {
        let url = format!("{}/instance/connect/h", mock.url());
        std::thread::spawn(move || {
            let a = agent(Duration::from_secs(10));
            a.get(&url)
                .header("apikey", KEY)
                .call()
                .map(|r| r.status().as_u16())
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let c = Client::new(&mock);
    let t = Instant::now();
    assert_eq!(c.get("/", None).0, 200);
    assert!(t.elapsed() < Duration::from_millis(200));
    // The hung call is logged with no status.
    let calls = mock.calls();
    let h: Vec<_> = calls
        .iter()
        .filter(|c| c["path"] == "/instance/connect/h")
        .collect();
    assert_eq!(h.len(), 2);
    assert!(h.iter().all(|c| c["status"].is_null()));
    // Clearing the rules releases it (the connection closes without a reply).
    mock.clear_faults();
    let r = hung.join().unwrap();
    assert!(r.is_err(), "released hang closes without reply: {r:?}");
}

#[test]
fn drop_on_server_drop_releases_hang() {
    let mock = v2();
    mock.add_fault(rule(None, "/", FaultKind::Hang, None));
    let url = mock.url();
    let hung =
        std::thread::spawn(move || agent(Duration::from_secs(10)).get(&url).call().map(|_| ()));
    std::thread::sleep(Duration::from_millis(150));
    let t = Instant::now();
    drop(mock);
    assert!(hung.join().unwrap().is_err());
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn fault_drop_closes_connection() {
    let mock = v2();
    let c = Client::new(&mock);
    mock.add_fault(rule(
        Some("POST"),
        "/instance/create",
        FaultKind::Drop,
        Some(1),
    ));
    let t = Instant::now();
    let r = c.try_req(
        "POST",
        "/instance/create",
        Some(KEY),
        Some(json!({"instanceName": "d", "integration": "WHATSAPP-BAILEYS"})),
    );
    assert!(r.is_err(), "drop must fail the request, got {r:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "drop must not hang");
    // Logged with no status; the next attempt works.
    let last = mock.calls().last().unwrap().clone();
    assert_eq!(last["status"], Value::Null);
    let fresh = Client::new(&mock);
    assert_eq!(
        fresh
            .post(
                "/instance/create",
                Some(KEY),
                json!({"instanceName": "d", "integration": "WHATSAPP-BAILEYS"})
            )
            .0,
        201
    );
}

#[test]
fn control_api_over_http() {
    let mock = v2();
    let c = Client::new(&mock);
    let (s, b) = c.post(
        "/__mock/config",
        None,
        json!({"qr_ttl_ms": 0, "qr_on_create": true}),
    );
    assert_eq!(s, 200);
    assert_eq!(b["qr_ttl_ms"], 0);
    assert_eq!(b["latency_ms"], 0);
    let created = create_v2(&c, "k", true);
    assert_eq!(created["qrcode"]["count"], 1);

    let (s, b) = c.post("/__mock/instances/k/state", None, json!({"state": "open"}));
    assert_eq!((s, b), (200, json!({"ok": true})));
    assert_eq!(
        c.get("/instance/connectionState/k", Some(KEY)).1["instance"]["state"],
        "open"
    );
    assert_eq!(
        c.post(
            "/__mock/instances/nope/state",
            None,
            json!({"state": "open"})
        )
        .0,
        404
    );
    assert_eq!(
        c.post("/__mock/instances/k/state", None, json!({"state": "bogus"}))
            .0,
        400
    );
    let (s, b) = c.get("/__mock/instances", None);
    assert_eq!(s, 200);
    assert_eq!(b[0]["name"], "k");
    assert_eq!(b[0]["state"], "open");
    assert_eq!(b[0]["qr_count"], 1);

    let (s, _) = c.post(
        "/__mock/faults",
        None,
        json!({"method":"POST","path_contains":"/instance/create","kind":"status","code":500,"times":1}),
    );
    assert_eq!(s, 200);
    assert_eq!(
        c.post(
            "/__mock/faults",
            None,
            json!({"path_contains": "/", "kind": "nope"})
        )
        .0,
        400
    );
    let (_, faults) = c.get("/__mock/faults", None);
    assert_eq!(faults[0]["kind"], "status");
    assert_eq!(faults[0]["code"], 500);
    assert_eq!(
        c.post("/instance/create", Some(KEY), json!({"instanceName": "k2"}))
            .0,
        500
    );
    c.post(
        "/__mock/faults",
        None,
        json!({"path_contains": "/", "kind": "delay", "ms": 5000}),
    );
    assert_eq!(c.req("DELETE", "/__mock/faults", None, None).0, 200);
    let t = Instant::now();
    assert_eq!(c.get("/", None).0, 200);
    assert!(t.elapsed() < Duration::from_secs(2));

    // The server "loses" the instance.
    assert_eq!(c.req("DELETE", "/__mock/instances/k", None, None).0, 200);
    assert_eq!(c.get("/instance/connectionState/k", Some(KEY)).0, 404);
    assert_eq!(c.req("DELETE", "/__mock/instances/k", None, None).0, 404);

    let (_, calls) = c.get("/__mock/calls", None);
    assert!(!calls.as_array().unwrap().is_empty());
    assert!(calls
        .as_array()
        .unwrap()
        .iter()
        .all(|c| !c["path"].as_str().unwrap().starts_with("/__mock")));
    assert_eq!(c.post("/__mock/reset", None, json!({})).0, 200);
    assert_eq!(c.get("/__mock/calls", None).1, json!([]));
    assert_eq!(c.get("/__mock/instances", None).1, json!([]));
    assert_eq!(c.get("/__mock/faults", None).1, json!([]));
    assert_eq!(c.get("/__mock/nope", None).0, 404);
}

#[test]
fn call_log_contents() {
    let mock = v2();
    let c = Client::new(&mock);
    create_v2(&c, "l", false);
    c.get("/instance/connect/l?number=123", None);
    c.get("/instance/fetchInstances", Some("wrong"));
    let calls = mock.calls();
    assert_eq!(calls.len(), 3);
    assert_eq!(calls[0]["seq"], 1);
    assert_eq!(calls[0]["method"], "POST");
    assert_eq!(calls[0]["path"], "/instance/create");
    assert_eq!(calls[0]["query"], "");
    assert_eq!(calls[0]["apikey"], KEY);
    assert_eq!(calls[0]["body"]["instanceName"], "l");
    assert_eq!(calls[0]["status"], 201);
    assert!(calls[0]["at_ms"].is_u64());
    assert_eq!(calls[1]["query"], "number=123");
    assert_eq!(calls[1]["apikey"], Value::Null);
    assert_eq!(calls[1]["body"], Value::Null);
    assert_eq!(calls[1]["status"], 401);
    assert_eq!(calls[2]["status"], 401);
    assert_eq!(calls[2]["seq"], 3);
    assert!(calls[2]["at_ms"].as_u64() >= calls[0]["at_ms"].as_u64());
    assert_eq!(mock.count_calls("POST", "/instance/create"), 1);
    assert_eq!(mock.count_calls("get", "/instance/"), 2);
    assert_eq!(mock.count_calls("", "/"), 3);

    // A non-JSON body is logged raw and rejected before routing guards.
    let resp = c
        .agent
        .post(format!("{}/instance/create", mock.url()))
        .header("apikey", KEY)
        .header("content-type", "application/json")
        .send("{not json")
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    assert_eq!(mock.calls()[3]["body"], "{not json");

    mock.reset();
    assert!(mock.calls().is_empty());
    assert!(mock.instance_names().is_empty());
}

#[test]
fn many_concurrent_clients() {
    let mock = MockServer::start(
        0,
        MockConfig {
            latency_ms: 200,
            ..MockConfig::default()
        },
    )
    .unwrap();
    let url = mock.url();
    let t = Instant::now();
    let handles: Vec<_> = (0..64)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                let a = agent(Duration::from_secs(10));
                let mut r = a
                    .post(format!("{url}/instance/create"))
                    .header("apikey", KEY)
                    .send_json(
                        json!({"instanceName": format!("c{i}"), "integration": "WHATSAPP-BAILEYS"}),
                    )
                    .unwrap();
                let status = r.status().as_u16();
                let _ = r.body_mut().read_to_string();
                status
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), 201);
    }
    // Latency sleeps overlap: 64 × 200 ms done well under the serial 12.8 s.
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(mock.instance_names().len(), 64);
}
