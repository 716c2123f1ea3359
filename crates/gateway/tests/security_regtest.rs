// ureq::Error (the HTTP client's own error) is large; these are tests.
#![allow(clippy::result_large_err)]

//! Security by default, against the real gateway (real regtest bitcoind, real embedded
//! MQTT broker behind its front, real MQTT clients, real HTTP): devices log in with the
//! credentials issued at enrolment and may only use their own topics; revoking a device
//! closes its MQTT access; every admin route wants the admin token; secrets are 0600.

mod common;
use common::api_with_header as api;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bitmote_chain::now_ms;
use bitmote_device::reading::{sensor, unit};
use bitmote_device::{Reading, SignedReading, SigningKey, Value};
use bitmote_gateway::{Gateway, GatewayConfig};
use bitmote_regtest::provision::{ensure_bitcoind, InstallOptions, LogProgress};
use bitmote_regtest::{RegtestNode, RegtestOptions};
use rumqttc::{ConnectReturnCode, QoS};
use serde_json::{json, Value as Json};

fn gateway(dir: &Path) -> (RegtestNode, Gateway, String, String) {
    gateway_with(dir, |_| {})
}

fn gateway_with(dir: &Path, tune: impl FnOnce(&mut GatewayConfig)) -> (RegtestNode, Gateway, String, String) {
    let exe = ensure_bitcoind(&InstallOptions::default(), &mut LogProgress::new()).unwrap().bitcoind;
    let node = RegtestNode::start(RegtestOptions::new(exe)).unwrap();
    let mut cfg = GatewayConfig::new(dir);
    cfg.http_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.mqtt_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    tune(&mut cfg);
    let gw = Gateway::start(cfg, node.client().fresh().unwrap()).unwrap();
    let base = format!("http://{}", gw.http_addr);
    let token = std::fs::read_to_string(dir.join("admin.token")).unwrap().trim().to_string();
    (node, gw, base, token)
}

/// What an MQTT client sees.
#[derive(Debug, PartialEq)]
enum Ev {
    Connected,
    SubAck,
    Msg(String, Vec<u8>),
    Refused(ConnectReturnCode),
    /// The connection ended (the client does not reconnect).
    Closed,
}

/// A client on `broker` logged in as `login`, with an optional last will; it stops at the
/// first connection error, so a refusal or a disconnection is seen once.
fn client(broker: SocketAddr, client_id: &str, login: Option<(&str, &str)>, will: Option<&str>) -> (rumqttc::Client, mpsc::Receiver<Ev>) {
    let mut opts = rumqttc::MqttOptions::new(client_id, broker.ip().to_string(), broker.port());
    opts.set_keep_alive(Duration::from_secs(5));
    if let Some((u, p)) = login {
        opts.set_credentials(u, p);
    }
    if let Some(t) = will {
        opts.set_last_will(rumqttc::LastWill::new(t, "offline", QoS::AtLeastOnce, true));
    }
    let (client, mut conn) = bitmote_gateway::mqtt::client(opts, 16);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for ev in conn.iter() {
            let e = match ev {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => Ev::Connected,
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => Ev::SubAck,
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => Ev::Msg(p.topic.clone(), p.payload.to_vec()),
                Ok(_) => continue,
                Err(rumqttc::ConnectionError::ConnectionRefused(code)) => Ev::Refused(code),
                Err(e) => {
                    eprintln!("mqtt client: {e}");
                    Ev::Closed
                }
            };
            let last = matches!(e, Ev::Refused(_) | Ev::Closed);
            if tx.send(e).is_err() || last {
                return;
            }
        }
    });
    (client, rx)
}

/// The next event, within 20 s.
fn next(rx: &mpsc::Receiver<Ev>) -> Ev {
    rx.recv_timeout(Duration::from_secs(20)).expect("an MQTT event")
}

fn reading(k: &SigningKey, seq: u64) -> Vec<u8> {
    let r = Reading {
        device: k.public_key().device_id(),
        seq,
        timestamp_ms: now_ms(),
        sensor: sensor::TEMPERATURE,
        unit: unit::CELSIUS,
        value: Value::Scaled { mantissa: 2000 + seq as i64, exponent: -2 },
    };
    SignedReading::sign(k, r).unwrap().encode()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o777
}

#[test]
fn mqtt_devices_need_their_credentials_and_keep_to_their_own_topics() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, gw, base, token) = gateway(dir.path());
    let mqtt = gw.mqtt_addr.unwrap();
    let bearer = format!("Bearer {token}");
    let enroll = |k: &SigningKey, name: &str| {
        let (code, v) = api(
            "POST",
            &format!("{base}/v1/devices"),
            Some(&bearer),
            Some(json!({ "public_key": k.public_key().to_string(), "name": name })),
        );
        assert_eq!(code, 200, "{v}");
        (v["mqtt"]["username"].as_str().unwrap().to_string(), v["mqtt"]["password"].as_str().unwrap().to_string())
    };
    let a = SigningKey::schnorr_from_secret(&[51; 32]).unwrap();
    let b = SigningKey::schnorr_from_secret(&[52; 32]).unwrap();
    let (ida, idb) = (a.public_key().device_id().to_string(), b.public_key().device_id().to_string());
    let (user_a, pass_a) = enroll(&a, "sensor-a");
    let (user_b, pass_b) = enroll(&b, "lock-b");
    assert_eq!((user_a.as_str(), user_b.as_str()), (ida.as_str(), idb.as_str()));
    // Device names that would reach into other devices' topics are refused.
    for bad in ["lock/x", "lock+", &ida] {
        let k = SigningKey::schnorr_from_secret(&[53; 32]).unwrap();
        let (code, v) = api(
            "POST",
            &format!("{base}/v1/devices"),
            Some(&bearer),
            Some(json!({ "public_key": k.public_key().to_string(), "name": bad })),
        );
        assert_eq!(code, 400, "{bad}: {v}");
    }

    // No login, a wrong password, another device's password, an unknown user: refused.
    let refused = |login: Option<(&str, &str)>| {
        let (_c, rx) = client(mqtt, "x", login, None);
        next(&rx)
    };
    assert_eq!(refused(None), Ev::Refused(ConnectReturnCode::NotAuthorized));
    assert_eq!(refused(Some((&user_a, "wrong"))), Ev::Refused(ConnectReturnCode::BadUserNamePassword));
    assert_eq!(refused(Some((&user_a, &pass_b))), Ev::Refused(ConnectReturnCode::BadUserNamePassword));
    assert_eq!(refused(Some(("nobody", &pass_a))), Ev::Refused(ConnectReturnCode::BadUserNamePassword));
    // Raw bytes: an MQTT 3.1 CONNECT ("MQIsdp", level 3) gets CONNACK 1 (unacceptable
    // protocol); a first packet that is not a CONNECT just closes the connection.
    let raw = |bytes: &[u8]| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(mqtt).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(bytes).unwrap();
        let mut got = vec![];
        s.read_to_end(&mut got).unwrap();
        got
    };
    let mqtt31 = [0x10, 0x12, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 0x02, 0, 60, 0, 4, b't', b'e', b's', b't'];
    assert_eq!(raw(&mqtt31), vec![0x20, 0x02, 0x00, 0x01]);
    assert_eq!(raw(&[0xC0, 0x00]), Vec::<u8>::new(), "PINGREQ before CONNECT");
    // A last will on another device's topic is refused at CONNECT.
    let (_c, rx) = client(mqtt, "a-will", Some((&user_a, &pass_a)), Some("bitmote/lock-b/presence"));
    assert_eq!(next(&rx), Ev::Refused(ConnectReturnCode::NotAuthorized));

    // Device A with its credentials publishes a reading and gets its receipt.
    let (ca, rxa) = client(mqtt, "a", Some((&user_a, &pass_a)), Some(&format!("bitmote/{ida}/presence")));
    assert_eq!(next(&rxa), Ev::Connected);
    ca.subscribe(format!("bitmote/{ida}/receipts"), QoS::AtLeastOnce).unwrap();
    assert_eq!(next(&rxa), Ev::SubAck);
    ca.publish(format!("bitmote/{ida}/readings"), QoS::AtLeastOnce, false, reading(&a, 1)).unwrap();
    match next(&rxa) {
        Ev::Msg(topic, body) => {
            assert_eq!(topic, format!("bitmote/{ida}/receipts"));
            let v: Json = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["receipts"][0]["leaf_index"], 0, "{v}");
        }
        other => panic!("expected a receipt, got {other:?}"),
    }

    // Device B logs in by its name and listens on its own topics.
    let (cb, rxb) = client(mqtt, "b", Some(("lock-b", &pass_b)), Some("bitmote/lock-b/presence"));
    assert_eq!(next(&rxb), Ev::Connected);
    cb.subscribe("bitmote/lock-b/commands", QoS::AtLeastOnce).unwrap();
    assert_eq!(next(&rxb), Ev::SubAck);
    cb.subscribe(format!("bitmote/{idb}/#"), QoS::AtLeastOnce).unwrap();
    assert_eq!(next(&rxb), Ev::SubAck);

    // A publishing on B's readings topic: disconnected, nothing reaches B or the log.
    ca.publish(format!("bitmote/{idb}/readings"), QoS::AtLeastOnce, false, reading(&a, 2)).unwrap();
    assert_eq!(next(&rxa), Ev::Closed);
    // A subscribing to B's commands, or to everyone's: disconnected, no SUBACK.
    for filter in ["bitmote/lock-b/commands", "bitmote/+/commands", "#"] {
        let (c, rx) = client(mqtt, "a", Some((&user_a, &pass_a)), None);
        assert_eq!(next(&rx), Ev::Connected);
        c.subscribe(filter, QoS::AtLeastOnce).unwrap();
        assert_eq!(next(&rx), Ev::Closed, "{filter}");
    }
    // … and publishing a command to B: disconnected.
    let (c, rx) = client(mqtt, "a", Some((&user_a, &pass_a)), None);
    assert_eq!(next(&rx), Ev::Connected);
    c.publish("bitmote/lock-b/commands", QoS::AtLeastOnce, false, "{\"event_id\":\"x\",\"command\":\"unlock\"}").unwrap();
    assert_eq!(next(&rx), Ev::Closed);
    // A connecting with B's client id does not take over B's session (client ids are
    // scoped per device by the front): B stays connected, as its receipt below shows.
    let (_same_id, rx_same) = client(mqtt, "b", Some((&user_a, &pass_a)), None);
    assert_eq!(next(&rx_same), Ev::Connected);
    // B's own reading still goes through, and is the first thing B hears: A's foreign
    // publishes never reached the broker (the gateway would have answered on B's errors topic).
    cb.publish(format!("bitmote/{idb}/readings"), QoS::AtLeastOnce, false, reading(&b, 1)).unwrap();
    loop {
        match next(&rxb) {
            // (B's subscription to bitmote/<idb>/# also hears its own reading.)
            Ev::Msg(topic, _) if topic == format!("bitmote/{idb}/readings") => continue,
            Ev::Msg(topic, _) => break assert_eq!(topic, format!("bitmote/{idb}/receipts")),
            other => panic!("expected B's receipt, got {other:?}"),
        }
    }
    let log = api("GET", &format!("{base}/v1/log"), None, None).1;
    assert_eq!(log["tree_size"], 2, "only A's and B's own readings: {log}");

    // The operator's identity (user admin, the admin token) may watch every device.
    let (cadm, rxadm) = client(mqtt, "ops", Some(("admin", &token)), None);
    assert_eq!(next(&rxadm), Ev::Connected);
    cadm.subscribe("bitmote/+/presence", QoS::AtMostOnce).unwrap();
    assert!(matches!(next(&rxadm), Ev::SubAck | Ev::Msg(..)));
    assert_eq!(refused(Some(("admin", "wrong"))), Ev::Refused(ConnectReturnCode::BadUserNamePassword));

    // Revoking B closes its connection, and it cannot log in again.
    let (code, v) = api("POST", &format!("{base}/v1/devices/{idb}/revoke"), Some(&bearer), Some(json!({ "reason": "stolen" })));
    assert_eq!(code, 200, "{v}");
    loop {
        match next(&rxb) {
            Ev::Closed => break,
            Ev::Msg(..) => continue,
            other => panic!("expected B to be disconnected, got {other:?}"),
        }
    }
    assert_eq!(refused(Some((&user_b, &pass_b))), Ev::Refused(ConnectReturnCode::NotAuthorized));

    // Enrolling A again issues a new password: the old one stops working, and its open
    // connection is closed.
    let (c, rx) = client(mqtt, "a", Some((&user_a, &pass_a)), None);
    assert_eq!(next(&rx), Ev::Connected);
    let (_, new_pass) = enroll(&a, "sensor-a");
    assert_ne!(new_pass, pass_a);
    assert_eq!(next(&rx), Ev::Closed);
    drop(c);
    assert_eq!(refused(Some((&user_a, &pass_a))), Ev::Refused(ConnectReturnCode::BadUserNamePassword));
    let (_c, rx) = client(mqtt, "a", Some((&user_a, &new_pass)), None);
    assert_eq!(next(&rx), Ev::Connected);

    // Every refusal is counted for Prometheus: 7 logins (none, wrong, another's password,
    // unknown user, wrong admin token, revoked, replaced password) and 6 foreign topics (a
    // last will, a publish on B's readings, three subscriptions, a publish on B's commands).
    let mut text = String::new();
    std::io::Read::read_to_string(&mut ureq::get(&format!("{base}/metrics")).call().unwrap().into_reader(), &mut text).unwrap();
    assert!(text.lines().any(|l| l == "bitmote_mqtt_refused_total{reason=\"login\"} 7"), "{text}");
    assert!(text.lines().any(|l| l == "bitmote_mqtt_refused_total{reason=\"topic\"} 6"), "{text}");
    gw.shutdown();
}

#[test]
fn every_admin_route_wants_the_admin_token_and_secrets_are_private_files() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, gw, base, token) = gateway(dir.path());
    let id = SigningKey::schnorr_from_secret(&[61; 32]).unwrap().public_key().device_id().to_string();
    let enroll = json!({ "public_key": SigningKey::schnorr_from_secret(&[61; 32]).unwrap().public_key().to_string(), "name": "t" });
    let rule = json!({ "id": "r", "device": "relay-1", "trigger": { "kind": "height", "height": 100000 }, "action": { "command": "on" } });
    let order = json!({ "min_sat": 1000, "action": { "command": "unlock" } });
    let routes: Vec<(&str, String, Option<Json>)> = vec![
        ("POST", format!("{base}/v1/devices"), Some(enroll.clone())),
        ("POST", format!("{base}/v1/devices/{id}/revoke"), Some(json!({ "reason": "x" }))),
        ("GET", format!("{base}/v1/rules"), None),
        ("POST", format!("{base}/v1/rules"), Some(rule.clone())),
        ("DELETE", format!("{base}/v1/rules/r"), None),
        ("POST", format!("{base}/v1/devices/lock-1/orders"), Some(order)),
    ];
    let wrong = format!("Bearer {}", "0".repeat(token.len()));
    let basic = format!("Basic {token}");
    for (method, url, body) in &routes {
        for auth in [None, Some("Bearer wrong"), Some(wrong.as_str()), Some(basic.as_str()), Some("Bearer ")] {
            let (code, v) = api(method, url, auth, body.clone());
            assert_eq!(code, 401, "{method} {url} with {auth:?}: {v}");
            assert_eq!(v["code"], "unauthorized");
        }
        // The token is checked before the body: a malformed body without it is still 401.
        if body.is_some() {
            let r = ureq::request(method, url).set("Content-Type", "application/json").send_string("{not json");
            assert!(matches!(r, Err(ureq::Error::Status(401, _))), "{method} {url}: {r:?}");
        }
    }
    // With the token the same calls get through (enrolment first, so revoke finds the device).
    let bearer = format!("Bearer {token}");
    for (method, url, body) in &routes {
        let (code, v) = api(method, url, Some(&bearer), body.clone());
        assert_ne!(code, 401, "{method} {url}: {v}");
    }
    // A rule whose confirmations would wrap `height + confirmations` (u32) is refused
    // before it is stored or watched (issue #13, item 11).
    for c in [u32::MAX, 10_001] {
        let huge = json!({ "id": format!("wrap-{c}"), "device": "relay-1", "action": { "command": "on" },
            "trigger": { "kind": "payment", "address": "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080", "min_sat": 1000, "confirmations": c } });
        let (code, v) = api("POST", &format!("{base}/v1/rules"), Some(&bearer), Some(huge));
        assert_eq!(code, 400, "{v}");
        assert!(v.to_string().contains("is more than 10000"), "{v}");
    }
    let (_, rules) = api("GET", &format!("{base}/v1/rules"), Some(&bearer), None);
    assert!(!rules.to_string().contains("wrap-"), "{rules}");

    // Public routes stay public.
    for path in ["/health", "/v1/devices", "/v1/log", "/v1/anchors", "/v1/actions", "/v1/presence", "/openapi.json"] {
        assert_eq!(api("GET", &format!("{base}{path}"), None, None).0, 200, "{path}");
    }

    // Secrets are files only their owner can read.
    let d = dir.path();
    for f in ["admin.token", "checkpoint.key"] {
        assert_eq!(mode(&d.join(f)), 0o600, "{f}");
    }
    let seed = d.join("wallet/wallet.seed");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seed.exists() {
        assert!(Instant::now() < deadline, "the anchoring loop never created the wallet");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(mode(&seed), 0o600);
    gw.shutdown();
}

/// Issue #13, item 6: the MQTT front never forwards a CONNECT it would have to cut. A
/// client id, login or last will over the front's limits is refused with a CONNACK that
/// says which (2, 4, 5) — a 65,000-byte client id, once the front prefixed the device's
/// label, would have been cut by the encoder and the broker would have read the client's
/// bytes as the will; a device may have only so many connections open; an idle client
/// is closed after 1.5 keep-alive periods.
#[test]
fn oversized_connects_extra_connections_and_idle_clients_are_refused() {
    use rumqttc::mqttbytes::v4::{Connect, LastWill, Login};
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let (_node, gw, base, token) = gateway(dir.path());
    let mqtt = gw.mqtt_addr.unwrap();
    let k = SigningKey::schnorr_from_secret(&[71; 32]).unwrap();
    let (code, v) = api(
        "POST",
        &format!("{base}/v1/devices"),
        Some(&format!("Bearer {token}")),
        Some(json!({ "public_key": k.public_key().to_string(), "name": "big" })),
    );
    assert_eq!(code, 200, "{v}");
    let (user, pass) = (v["mqtt"]["username"].as_str().unwrap().to_string(), v["mqtt"]["password"].as_str().unwrap().to_string());
    let id = k.public_key().device_id().to_string();
    // Raw CONNECT bytes, and the CONNACK code the front answers (None: closed without one).
    let connack = |c: &Connect| -> (Option<u8>, std::net::TcpStream) {
        let mut bytes = bytes::BytesMut::new();
        c.write(&mut bytes).unwrap();
        let mut s = std::net::TcpStream::connect(mqtt).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        s.write_all(&bytes).unwrap();
        let mut ack = [0u8; 4];
        let code = s.read_exact(&mut ack).ok().map(|()| ack[3]);
        (code, s)
    };
    let connect = |client_id: &str| {
        let mut c = Connect::new(client_id);
        c.login = Some(Login::new(user.clone(), pass.clone()));
        c.keep_alive = 2;
        c
    };
    assert_eq!(connack(&connect("ok")).0, Some(0), "a normal CONNECT is accepted");
    // A client id that fits MQTT but not the front's prefix: refused, not cut.
    assert_eq!(connack(&connect(&"x".repeat(65_000))).0, Some(2));
    assert_eq!(connack(&connect(&"x".repeat(129))).0, Some(2));
    let mut long_login = connect("l");
    long_login.login = Some(Login::new(user.clone(), "p".repeat(300)));
    assert_eq!(connack(&long_login).0, Some(4));
    let mut big_will = connect("w");
    big_will.last_will =
        Some(LastWill::new(format!("bitmote/v1/devices/{id}/presence"), vec![b'x'; 5000], rumqttc::mqttbytes::QoS::AtLeastOnce, false));
    assert_eq!(connack(&big_will).0, Some(5));
    // Connections per device: the first four stay open, the fifth gets CONNACK 3.
    let open: Vec<_> = (0..4)
        .map(|i| {
            let (code, s) = connack(&connect(&format!("c{i}")));
            assert_eq!(code, Some(0), "connection {i}");
            s
        })
        .collect();
    assert_eq!(connack(&connect("c4")).0, Some(3));
    drop(open);
    // Closed ones free their place again (the front notices within a moment).
    let deadline = Instant::now() + Duration::from_secs(10);
    let (code, mut idle) = loop {
        let (code, s) = connack(&connect("again"));
        if code == Some(0) || Instant::now() > deadline {
            break (code, s);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(code, Some(0));
    // Keep-alive 2 s and silence: closed after about 3 s (read returns 0 bytes: EOF).
    let t0 = Instant::now();
    let mut b = [0u8; 1];
    assert_eq!(idle.read(&mut b).unwrap_or(0), 0);
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_secs(2) && waited < Duration::from_secs(14), "closed after {waited:?}");
    gw.shutdown();
}

/// Issue 13, item 7: HTTP clients that open connections and send nothing, or send a body a
/// byte at a time, cannot starve the service. With 2,000 idle connections and 50 slow bodies
/// open, a device's reading is still acknowledged; the idle connections are closed by the
/// header read timeout and the slow bodies answered 408 at the request timeout; past the
/// connection cap a connection is answered 503 at once, and once the idle ones are gone
/// ingest answers again.
#[test]
fn idle_connections_and_slow_bodies_do_not_starve_ingest() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let dir = tempfile::tempdir().unwrap();
    let (_node, gw, base, token) = gateway_with(dir.path(), |cfg| {
        cfg.http_limits.max_connections = 2_100;
        cfg.http_limits.header_timeout = Duration::from_secs(8);
        cfg.http_limits.request_timeout = Duration::from_secs(4);
    });
    let addr = gw.http_addr;
    let k = SigningKey::schnorr_from_secret(&[71; 32]).unwrap();
    let (code, v) = api(
        "POST",
        &format!("{base}/v1/devices"),
        Some(&format!("Bearer {token}")),
        Some(json!({ "public_key": k.public_key().to_string(), "name": "patient" })),
    );
    assert_eq!(code, 200, "{v}");
    let post = |seq: u64| -> Result<ureq::Response, ureq::Error> {
        ureq::post(&format!("{base}/v1/readings"))
            .set("Content-Type", "application/octet-stream")
            .timeout(Duration::from_secs(10))
            .send_bytes(&reading(&k, seq))
    };

    let idle: Vec<TcpStream> = (0..2_000).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let mut slow: Vec<TcpStream> = (0..50)
        .map(|_| {
            let mut c = TcpStream::connect(addr).unwrap();
            c.write_all(
                b"POST /v1/readings HTTP/1.1\r\nHost: gw\r\nContent-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\nx",
            )
            .unwrap();
            c
        })
        .collect();
    let r = post(1).expect("ingest answers with 2,050 idle and slow connections open");
    assert_eq!(r.status(), 200);
    let v: Json = r.into_json().unwrap();
    assert_eq!(v["receipts"].as_array().map(Vec::len), Some(1), "{v}");

    // The slow bodies are answered 408 at the request timeout; the idle connections closed.
    for (i, c) in slow.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut head = [0u8; 12];
        c.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 408", "{}", String::from_utf8_lossy(&head));
        if i == 0 {
            // With the API's error body, like every other refusal.
            c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let (mut text, mut buf) = (String::new(), [0u8; 4096]);
            while !text.contains("request_timeout") {
                match c.read(&mut buf) {
                    Ok(n) if n > 0 => text.push_str(&String::from_utf8_lossy(&buf[..n])),
                    _ => break,
                }
            }
            assert!(text.contains("\"code\":\"request_timeout\""), "{text}");
        }
    }
    for mut c in idle {
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut b = [0u8; 1];
        match c.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("an idle connection was not closed by the header timeout: {other:?}"),
        }
    }

    // Up to the cap, then 503 at once for one more; ingest is back when the idle ones go.
    // 100 more than the cap: the ones accepted last get their 503 at once, well before the
    // idle ones' header timeout (8 s) frees slots. (Which ones is the accept order.)
    let full: Vec<TcpStream> = (0..2_200).map(|_| TcpStream::connect(addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(1_500));
    let mut refused = 0;
    for mut c in &full {
        c.set_nonblocking(true).unwrap();
        let mut answer = vec![0u8; 512];
        // 0 would be a connection already closed by the header timeout (not expected here).
        let got = c.read(&mut answer);
        if let Ok(n @ 1..) = got {
            let answer = String::from_utf8_lossy(&answer[..n]);
            assert!(answer.starts_with("HTTP/1.1 503") && answer.contains("too_many_connections"), "{answer}");
            refused += 1;
        }
    }
    assert!(refused > 0, "2,200 connections to a gateway that takes 2,100, and none refused");
    assert!(refused <= 100, "{refused} refused, more than the 100 over the cap");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seq = 2;
    loop {
        match post(seq) {
            Ok(r) if r.status() == 200 => break,
            other => {
                assert!(Instant::now() < deadline, "ingest did not answer again after the idle connections were closed: {other:?}");
                seq += 1;
                std::thread::sleep(Duration::from_millis(250));
            }
        }
    }
    drop(full);
}

/// Issue 13, item 7: the anonymous routes that reach the Bitcoin node (`proof`, `proof.ots`,
/// `verify`) are rate-limited per client address: a burst of twice the rate, then 429 with
/// Retry-After; the admin token is not limited, and other routes are not either.
#[test]
fn anonymous_proof_and_verify_calls_are_rate_limited_per_client() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, _gw, base, token) = gateway_with(dir.path(), |cfg| {
        cfg.http_limits.anonymous_per_sec = 2;
        cfg.http_limits.limit_loopback = true; // the test's client is on loopback
    });
    let bearer = format!("Bearer {token}");
    let k = SigningKey::schnorr_from_secret(&[72; 32]).unwrap();
    let (code, v) = api(
        "POST",
        &format!("{base}/v1/devices"),
        Some(&bearer),
        Some(json!({ "public_key": k.public_key().to_string(), "name": "counted" })),
    );
    assert_eq!(code, 200, "{v}");
    let r: Json = ureq::post(&format!("{base}/v1/readings"))
        .set("Content-Type", "application/octet-stream")
        .send_bytes(&reading(&k, 1))
        .unwrap()
        .into_json()
        .unwrap();
    let id = r["receipts"][0]["reading_id"].as_str().unwrap().to_string();
    let proof = format!("{base}/v1/readings/{id}/proof");
    let get = |auth: Option<&str>| {
        let mut req = ureq::get(&proof);
        if let Some(a) = auth {
            req = req.set("Authorization", a);
        }
        match req.call() {
            Ok(r) => (r.status(), None),
            Err(ureq::Error::Status(code, r)) => (code, r.header("Retry-After").map(String::from)),
            Err(e) => panic!("{e}"),
        }
    };
    // The burst (4), then refused; the route's own answers were all 200 (a pending proof).
    // (A slow machine may see a token come back meanwhile: at most one more per 500 ms.)
    let answers: Vec<u16> = (0..8).map(|_| get(None).0).collect();
    assert_eq!(&answers[..4], &[200; 4], "{answers:?}");
    assert!(answers[4..].contains(&429), "{answers:?}");
    let (code, retry) = get(None);
    assert_eq!(code, 429);
    assert!(retry.as_deref().and_then(|r| r.parse::<u64>().ok()).is_some_and(|s| s >= 1), "{retry:?}");
    let (code, v) = api("POST", &format!("{base}/v1/readings/{id}/verify"), None, None);
    assert_eq!((code, v["code"].as_str()), (429, Some("rate_limited")), "{v}");
    // The admin is not limited; nor are the other anonymous routes.
    assert!((0..10).all(|_| get(Some(&bearer)).0 == 200));
    assert!((0..10).all(|_| ureq::get(&format!("{base}/v1/log")).call().is_ok_and(|r| r.status() == 200)));
    // A token comes back after 1/rate.
    std::thread::sleep(Duration::from_millis(1_100));
    assert_eq!(get(None).0, 200);
}
