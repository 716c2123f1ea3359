//! The gateway end to end: real regtest bitcoind, real HTTP, the real embedded MQTT
//! broker with a real MQTT client, anchoring, proofs that verify against the chain.

use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bitmote_chain::now_ms;
use bitmote_device::reading::{sensor, unit};
use bitmote_device::{Reading, SignedBatch, SignedReading, SigningKey, Value};
use bitmote_gateway::{Gateway, GatewayConfig};
use bitmote_notary::anchor::AnchorConfig;
use bitmote_notary::ots::DetachedTimestampFile;
use bitmote_notary::proof::ProofBundle;
use bitmote_notary::verify::{verify_bundle, verify_ots, Policy};
use bitmote_regtest::provision::{ensure_bitcoind, InstallOptions, LogProgress};
use bitmote_regtest::{RegtestNode, RegtestOptions};
use serde_json::{json, Value as Json};

fn reading(k: &SigningKey, seq: u64) -> Reading {
    Reading {
        device: k.public_key().device_id(),
        seq,
        timestamp_ms: now_ms(),
        sensor: sensor::HUMIDITY,
        unit: unit::PERCENT,
        value: Value::Scaled { mantissa: 400 + seq as i64, exponent: -1 },
    }
}

fn post(url: &str, token: Option<&str>, body: Json) -> (u16, Json) {
    let mut req = ureq::post(url);
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    match req.send_json(body) {
        Ok(r) => (r.status(), r.into_json().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or(Json::Null)),
        Err(e) => panic!("{e}"),
    }
}

fn post_bytes(url: &str, body: &[u8]) -> (u16, Json) {
    match ureq::post(url).set("Content-Type", "application/octet-stream").send_bytes(body) {
        Ok(r) => (r.status(), r.into_json().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or(Json::Null)),
        Err(e) => panic!("{e}"),
    }
}

fn get(url: &str) -> ureq::Response {
    ureq::get(url).call().unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// An MQTT device session (persistent) on `broker`, logged in with `login` (username,
/// password), and the (topic, JSON) of what it receives.
fn mqtt_device(id: &str, broker: SocketAddr, login: Option<(&str, &str)>) -> (rumqttc::Client, mpsc::Receiver<(String, Json)>) {
    let mut opts = rumqttc::MqttOptions::new(id, broker.ip().to_string(), broker.port());
    if let Some((u, p)) = login {
        opts.set_credentials(u, p);
    }
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_clean_session(false);
    let (client, mut conn) = bitmote_gateway::mqtt::client(opts, 16);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for ev in conn.iter() {
            match ev {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    let _ = tx.send((p.topic.clone(), serde_json::from_slice::<Json>(&p.payload).unwrap()));
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    });
    (client, rx)
}

#[test]
fn devices_submit_over_http_and_mqtt_and_get_proofs_that_verify() {
    let exe = ensure_bitcoind(&InstallOptions::default(), &mut LogProgress::new()).unwrap().bitcoind;
    let node = RegtestNode::start(RegtestOptions::new(exe)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = GatewayConfig::new(dir.path());
    cfg.http_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.mqtt_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    cfg.anchor = AnchorConfig { interval: Duration::ZERO, ..Default::default() };
    cfg.anchor_poll = Duration::from_millis(100);
    // Coins for the gateway's wallets come from mining (libraries never mine themselves).
    cfg.faucet = Some(bitmote_regtest::RegtestFaucet::shared(node.client()).unwrap());
    let gw = Gateway::start(cfg, node.client().fresh().unwrap()).unwrap();
    let base = format!("http://{}", gw.http_addr);
    let token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();

    // Enrolment is an admin call.
    let a = SigningKey::schnorr_from_secret(&[21; 32]).unwrap();
    let b = SigningKey::p256_from_secret(&[22; 32]).unwrap();
    let enroll = |k: &SigningKey, name: &str, tok: Option<&str>| {
        post(&format!("{base}/v1/devices"), tok, json!({ "public_key": k.public_key().to_string(), "name": name }))
    };
    assert_eq!(enroll(&a, "a", None).0, 401);
    assert_eq!(enroll(&a, "a", Some("wrong")).0, 401);
    let (code, enrolled_a) = enroll(&a, "a", Some(&token));
    assert_eq!(code, 200);
    assert_eq!(enroll(&b, "b", Some(&token)).0, 200);
    // Enrolment returns the device's MQTT login, once: its id and a fresh password.
    let mqtt_a =
        (enrolled_a["mqtt"]["username"].as_str().unwrap().to_string(), enrolled_a["mqtt"]["password"].as_str().unwrap().to_string());
    assert_eq!(mqtt_a.0, a.public_key().device_id().to_string());

    // HTTP, binary wire format and JSON.
    let url = format!("{base}/v1/readings");
    let r1 = SignedReading::sign(&a, reading(&a, 1)).unwrap();
    let (code, body) = post_bytes(&url, &r1.encode());
    assert_eq!(code, 200, "{body}");
    let id1 = body["receipts"][0]["reading_id"].as_str().unwrap().to_string();
    let r2 = SignedReading::sign(&b, reading(&b, 1)).unwrap();
    let j = json!({ "reading": bitmote_gateway::http::ReadingJson::from_reading(&r2.reading), "signature": r2.signature.to_hex() });
    let (code, body) = post(&url, None, j);
    assert_eq!(code, 200, "{body}");
    // Refusals with clear statuses, nothing lost.
    assert_eq!(post_bytes(&url, &r1.encode()).0, 200, "resending a stored reading is idempotent");
    let mut replay = reading(&a, 1);
    replay.value = Value::Float(1.5);
    assert_eq!(post_bytes(&url, &SignedReading::sign(&a, replay).unwrap().encode()).0, 409);
    let mut forged = SignedReading::sign(&a, reading(&a, 2)).unwrap();
    forged.signature = b.sign(&forged.reading.id());
    let (code, body) = post_bytes(&url, &forged.encode());
    assert_eq!(code, 422, "{body}");
    assert_eq!(body["code"], "bad_signature");
    let stranger = SigningKey::schnorr_from_secret(&[23; 32]).unwrap();
    assert_eq!(post_bytes(&url, &SignedReading::sign(&stranger, reading(&stranger, 1)).unwrap().encode()).0, 403);
    let (code, body) = post_bytes(&url, b"not a reading");
    assert_eq!(code, 400, "{body}");

    // MQTT: a batch from device a (logged in with its credentials), receipts on its topic.
    // (Confinement to its own topics is tested in security_regtest.rs.)
    let mqtt = gw.mqtt_addr.unwrap();
    let (client, rx) = mqtt_device("device-a", mqtt, Some((&mqtt_a.0, &mqtt_a.1)));
    let ida = a.public_key().device_id().to_string();
    client.subscribe(format!("bitmote/{ida}/receipts"), rumqttc::QoS::AtLeastOnce).unwrap();
    client.subscribe(format!("bitmote/{ida}/errors"), rumqttc::QoS::AtLeastOnce).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let batch = SignedBatch::sign(&a, (2..=9).map(|s| reading(&a, s)).collect()).unwrap();
    client.publish(format!("bitmote/{ida}/readings"), rumqttc::QoS::AtLeastOnce, false, batch.encode()).unwrap();
    let (topic, msg) = rx.recv_timeout(Duration::from_secs(10)).expect("a receipt over MQTT");
    assert_eq!(topic, format!("bitmote/{ida}/receipts"), "{msg}");
    assert_eq!(msg["receipts"].as_array().unwrap().len(), 8);
    let batched_id = msg["receipts"][3]["reading_id"].as_str().unwrap().to_string();

    // Anchoring happens on its own (the regtest wallet funds itself); mine to confirm.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v: Json = get(&format!("{base}/v1/anchors")).into_json().unwrap();
        let anchors = v["anchors"].as_array().unwrap().clone();
        if anchors.iter().any(|a| a["state"] == "confirmed" && a["tree_size"].as_u64() == Some(10)) {
            break;
        }
        if anchors.iter().any(|a| a["state"] == "pending") {
            node.mine(1).unwrap();
        }
        assert!(Instant::now() < deadline, "no confirmed anchor of the 10 readings: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Proofs from the API verify against the chain, as JSON bundle and as .ots.
    for id in [&id1, &batched_id] {
        let bundle: ProofBundle = get(&format!("{base}/v1/readings/{id}/proof")).into_json().unwrap();
        let v = verify_bundle(&bundle, node.client(), &Policy::default()).unwrap();
        assert!(v.leaf_index < v.tree_size && v.tree_size <= 10, "{v:?}");
        let mut ots = vec![];
        std::io::Read::read_to_end(&mut get(&format!("{base}/v1/readings/{id}/proof.ots")).into_reader(), &mut ots).unwrap();
        let r: Json = get(&format!("{base}/v1/readings/{id}")).into_json().unwrap();
        let file = hex::decode(r["encoded"].as_str().unwrap()).unwrap();
        verify_ots(&file, &DetachedTimestampFile::deserialize(&ots).unwrap(), node.client()).unwrap();
    }
    let log: Json = get(&format!("{base}/v1/log")).into_json().unwrap();
    assert_eq!(log["tree_size"], 10);
    bitmote_notary::checkpoint::verify_note(log["checkpoint"].as_str().unwrap(), log["verifier_key"].as_str().unwrap()).unwrap();
    let c: Json = get(&format!("{base}/v1/log/consistency?old=3&new=10")).into_json().unwrap();
    let h = |v: &Json| -> [u8; 32] { hex::decode(v.as_str().unwrap()).unwrap().try_into().unwrap() };
    let proof: Vec<[u8; 32]> = c["proof"].as_array().unwrap().iter().map(h).collect();
    bitmote_device::merkle::verify_consistency(3, 10, &h(&c["old_root"]), &h(&c["new_root"]), &proof).unwrap();
    assert_eq!(h(&c["new_root"]), h(&log["root"]));
    let spec: Json = get(&format!("{base}/openapi.json")).into_json().unwrap();
    assert!(spec["paths"]["/v1/readings/{id}/proof.ots"].is_object());
    let missing = ureq::get(&format!("{base}/v1/readings/{}", "00".repeat(32))).call();
    assert!(matches!(missing, Err(ureq::Error::Status(404, _))));

    // The node goes down: ingest goes on (readings are durable and provable in the log),
    // anchoring reports the node as unreachable, and a new reading's proof says pending.
    node.stop().unwrap();
    let r = SignedReading::sign(&b, reading(&b, 2)).unwrap();
    let (code, body) = post_bytes(&url, &r.encode());
    assert_eq!(code, 200, "{body}");
    let id = body["receipts"][0]["reading_id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v: Json = get(&format!("{base}/v1/anchors")).into_json().unwrap();
        if v["status"].as_str().unwrap_or("").contains("no Bitcoin node answers") {
            break;
        }
        assert!(Instant::now() < deadline, "anchoring does not report the node down: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let bundle: ProofBundle = get(&format!("{base}/v1/readings/{id}/proof")).into_json().unwrap();
    assert!(bundle.is_pending());
    gw.shutdown();
}

#[test]
fn the_gateway_can_use_an_external_mqtt_broker() {
    // A separate broker, as an operator's own would be, with its own logins: one for the
    // gateway, one for the sensor.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut config = bitmote_gateway::mqtt::broker_config(addr).unwrap();
    let logins = [("bitmote-gateway", "gw-pass"), ("sensor-x", "sensor-pass")];
    for server in config.v4.iter_mut().flat_map(|m| m.values_mut()) {
        server.connections.auth = Some(logins.iter().map(|(u, p)| (u.to_string(), p.to_string())).collect());
    }
    let mut broker = rumqttd::Broker::new(config);
    std::thread::spawn(move || drop(broker.start()));

    let exe = ensure_bitcoind(&InstallOptions::default(), &mut LogProgress::new()).unwrap().bitcoind;
    let node = RegtestNode::start(RegtestOptions::new(exe)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = GatewayConfig::new(dir.path());
    cfg.http_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.mqtt_listen = None;
    cfg.mqtt_broker = Some(format!("mqtt://{addr}"));
    cfg.mqtt_broker_login =
        Some(bitmote_gateway::mqtt_front::BrokerLogin { username: "bitmote-gateway".into(), password: "gw-pass".into() });
    // Coins for the gateway's wallets come from mining (libraries never mine themselves).
    cfg.faucet = Some(bitmote_regtest::RegtestFaucet::shared(node.client()).unwrap());
    let gw = Gateway::start(cfg, node.client().fresh().unwrap()).unwrap();
    assert!(gw.mqtt_addr.is_none(), "no embedded broker");
    let k = SigningKey::schnorr_from_secret(&[31; 32]).unwrap();
    gw.shared().ingest.enroll(&k.public_key(), None).unwrap();

    let (client, rx) = mqtt_device("sensor-x", addr, Some(("sensor-x", "sensor-pass")));
    let id = k.public_key().device_id().to_string();
    client.subscribe(format!("bitmote/{id}/receipts"), rumqttc::QoS::AtLeastOnce).unwrap();
    client.subscribe(format!("bitmote/{id}/errors"), rumqttc::QoS::AtLeastOnce).unwrap();
    // Publish until the gateway's subscription is in place and a receipt comes back.
    let r = SignedReading::sign(&k, reading(&k, 1)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let receipt = loop {
        client.publish(format!("bitmote/{id}/readings"), rumqttc::QoS::AtLeastOnce, false, r.encode()).unwrap();
        if let Ok((_, v)) = rx.recv_timeout(Duration::from_millis(500)) {
            break v;
        }
        assert!(Instant::now() < deadline, "no receipt through the external broker");
    };
    assert_eq!(receipt["receipts"][0]["leaf_index"], 0);
    // A broker without topic rules lets anyone publish on a device's topic; the gateway
    // still refuses readings signed by another device than the topic names.
    let other = SigningKey::schnorr_from_secret(&[32; 32]).unwrap();
    let wrong = SignedReading::sign(&other, reading(&other, 1)).unwrap();
    client.publish(format!("bitmote/{id}/readings"), rumqttc::QoS::AtLeastOnce, false, wrong.encode()).unwrap();
    let msg = loop {
        let (topic, msg) = rx.recv_timeout(Duration::from_secs(10)).expect("a refusal over MQTT");
        if topic.ends_with("/errors") {
            break msg;
        }
    };
    assert_eq!(msg["code"], "wrong_topic", "{msg}");
    gw.shutdown();
}

#[test]
fn ingest_goes_on_while_the_node_is_down_and_anchoring_resumes_when_it_is_back() {
    // Invariant I5, at the gateway: a node outage never stops ingest, and when the node is
    // back (same data and ports, a new cookie) anchoring and the actuator loop resume from
    // their cursors, without restarting the gateway.
    let exe = ensure_bitcoind(&InstallOptions::default(), &mut LogProgress::new()).unwrap().bitcoind;
    let dir = tempfile::tempdir().unwrap();
    let mut opts = RegtestOptions::new(exe);
    opts.data_dir = Some(dir.path().join("node"));
    let node = RegtestNode::start(opts.clone()).unwrap();
    let mut cfg = GatewayConfig::new(dir.path().join("gw"));
    cfg.http_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.mqtt_listen = None;
    cfg.anchor = AnchorConfig { interval: Duration::ZERO, ..Default::default() };
    cfg.anchor_poll = Duration::from_millis(100);
    // Coins for the gateway's wallets come from mining (libraries never mine themselves).
    cfg.faucet = Some(bitmote_regtest::RegtestFaucet::shared(node.client()).unwrap());
    let gw = Gateway::start(cfg, node.client().fresh().unwrap()).unwrap();
    let base = format!("http://{}", gw.http_addr);
    let url = format!("{base}/v1/readings");
    let k = SigningKey::schnorr_from_secret(&[41; 32]).unwrap();
    gw.shared().ingest.enroll(&k.public_key(), None).unwrap();
    let anchors = || -> Json { get(&format!("{base}/v1/anchors")).into_json().unwrap() };
    let confirmed = |size: u64| {
        anchors()["anchors"].as_array().unwrap().iter().any(|a| a["state"] == "confirmed" && a["tree_size"].as_u64() >= Some(size))
    };
    let (code, body) = post_bytes(&url, &SignedReading::sign(&k, reading(&k, 1)).unwrap().encode());
    assert_eq!(code, 200, "{body}");
    let first = body["receipts"][0]["reading_id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !confirmed(1) {
        node.mine(1).unwrap();
        assert!(Instant::now() < deadline, "first anchor never confirmed: {}", anchors());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(anchors()["node"], "ok");
    let anchored: ProofBundle = get(&format!("{base}/v1/readings/{first}/proof")).into_json().unwrap();
    assert!(!anchored.is_pending());

    // Down (stopped, as for an upgrade).
    node.stop().unwrap();
    let mut ids = vec![];
    for seq in 2..=4 {
        let (code, body) = post_bytes(&url, &SignedReading::sign(&k, reading(&k, seq)).unwrap().encode());
        assert_eq!(code, 200, "acknowledged while the node is down: {body}");
        ids.push(body["receipts"][0]["reading_id"].as_str().unwrap().to_string());
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = anchors();
        if v["node"].as_str().unwrap_or("").starts_with("unreachable") {
            assert!(v["status"].as_str().unwrap().contains("waiting for the Bitcoin node"), "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "the node is not reported down: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
    for id in &ids {
        let bundle: ProofBundle = get(&format!("{base}/v1/readings/{id}/proof")).into_json().unwrap();
        assert!(bundle.is_pending(), "a proof during the outage says pending");
    }
    // An anchored reading's proof needs the anchor's block, which the gateway fetched once
    // and keeps by hash: served during the outage too, the same bundle.
    let cached: ProofBundle = get(&format!("{base}/v1/readings/{first}/proof")).into_json().unwrap();
    assert_eq!(serde_json::to_value(&cached).unwrap(), serde_json::to_value(&anchored).unwrap());
    std::thread::sleep(Duration::from_secs(3)); // a few failed rounds of both loops

    // Back: the same gateway anchors the readings of the outage.
    let node = RegtestNode::start(opts).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !confirmed(4) {
        node.mine(1).unwrap();
        assert!(Instant::now() < deadline, "anchoring did not resume: {}", anchors());
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(anchors()["node"], "ok");
    for id in &ids {
        let bundle: ProofBundle = get(&format!("{base}/v1/readings/{id}/proof")).into_json().unwrap();
        verify_bundle(&bundle, node.client(), &Policy::default()).unwrap();
    }
    gw.shutdown();
}

/// Issue 14: the anchoring loop goes through the checkpoint fork guard. A checkpoint of
/// another root is on record for tree size 1 (as if signed and published earlier) when the
/// first reading makes the log that size: the gateway anchors nothing, says why (anchor
/// status, one alert however often it polls), keeps ingesting and polling, and anchors the
/// log once it has grown past the forked size.
#[test]
fn the_gateway_never_anchors_a_forked_root_and_raises_one_alert() {
    let exe = ensure_bitcoind(&InstallOptions::default(), &mut LogProgress::new()).unwrap().bitcoind;
    let node = RegtestNode::start(RegtestOptions::new(exe)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = GatewayConfig::new(dir.path().join("gw"));
    cfg.http_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.mqtt_listen = None;
    cfg.anchor = AnchorConfig { interval: Duration::ZERO, ..Default::default() };
    cfg.anchor_poll = Duration::from_millis(100);
    // Coins for the gateway's wallets come from mining (libraries never mine themselves).
    cfg.faucet = Some(bitmote_regtest::RegtestFaucet::shared(node.client()).unwrap());
    let gw = Gateway::start(cfg, node.client().fresh().unwrap()).unwrap();
    let base = format!("http://{}", gw.http_addr);
    let url = format!("{base}/v1/readings");
    let forged = [0xee; 32];
    gw.shared().signer.issue(&gw.shared().db().unwrap(), 1, forged).unwrap();
    let k = SigningKey::schnorr_from_secret(&[43; 32]).unwrap();
    gw.shared().ingest.enroll(&k.public_key(), None).unwrap();
    let anchors = || -> Json { get(&format!("{base}/v1/anchors")).into_json().unwrap() };
    let fork_alerts = || -> Vec<String> {
        let v: Json = get(&format!("{base}/v1/actions")).into_json().unwrap();
        v["alerts"].as_array().unwrap().iter().filter_map(|a| a.as_str()).filter(|a| a.contains("forked")).map(String::from).collect()
    };

    let (code, body) = post_bytes(&url, &SignedReading::sign(&k, reading(&k, 1)).unwrap().encode());
    assert_eq!(code, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !anchors()["status"].as_str().unwrap_or("").contains("forked") {
        assert!(Instant::now() < deadline, "the fork is never reported: {}", anchors());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1)); // ten more polls
    let v = anchors();
    assert!(v["anchors"].as_array().unwrap().is_empty(), "a forked root was anchored: {v}");
    assert!(v["status"].as_str().unwrap().contains("tree size 1"), "{v}");
    assert_eq!(fork_alerts().len(), 1, "one alert per forked root, not one per poll: {:?}", fork_alerts());
    assert!(fork_alerts()[0].contains(&hex::encode(forged)), "{:?}", fork_alerts());
    assert!(node.client().raw::<Vec<String>>("getrawmempool", &[]).unwrap().is_empty(), "no anchor transaction");

    // Still running: the log grows past the forked size and that head is anchored.
    let (code, body) = post_bytes(&url, &SignedReading::sign(&k, reading(&k, 2)).unwrap().encode());
    assert_eq!(code, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = anchors();
        if let Some(a) = v["anchors"].as_array().unwrap().iter().find(|a| a["state"] == "confirmed") {
            assert_eq!(a["tree_size"], 2, "{v}");
            assert_eq!(v["status"], "ok", "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "the grown log was never anchored: {v}");
        node.mine(1).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(fork_alerts().len(), 1);
    gw.shutdown();
}
