//! The Lightning trigger end to end, against a real regtest bitcoind, the gateway's real
//! ldk-node, a real payer ldk-node with a channel to it and a real MQTT device: an
//! invoice is refused while the device is offline; the paid invoice is held (not claimed)
//! until the device acknowledges, makes the device act exactly once, and is claimed on the
//! acknowledgement; the same invoice cannot be paid twice; the gateway's node routes a
//! payment to a third node (a hub); a gateway restart between the payment and the
//! device's acknowledgement delivers the action again under the same event id, the device
//! acts once and the payment is claimed then; a payment whose action the device refuses,
//! or which it does not acknowledge within the action's time-to-live or before the claim
//! deadline, is failed back to the payer (issue 16, invariant I4).

mod common;
use common::api;

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bitmote_gateway::actuator::Retry;
use bitmote_gateway::lightning::LightningConfig;
use bitmote_gateway::{Gateway, GatewayConfig};
use bitmote_pay::ldk_node::lightning_invoice::Bolt11Invoice;
use bitmote_pay::ldk_node::payment::PaymentStatus;
use bitmote_pay::node::{self, NodeConfig};
use bitmote_regtest::provision::{ensure_bitcoind, InstallOptions, LogProgress};
use bitmote_regtest::{RegtestNode, RegtestOptions};
use serde_json::{json, Value as Json};

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// The gateway in `dir` with its Lightning node on `ln` and its broker on `mqtt` (fixed,
/// so a restarted gateway is found again), retrying every 100 ms at first.
fn gateway(dir: &Path, chain: &RegtestNode, mqtt: SocketAddr, ln: SocketAddr) -> (Gateway, String, String) {
    let mut cfg = GatewayConfig::new(dir);
    cfg.http_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.mqtt_listen = Some(mqtt);
    cfg.anchor_poll = Duration::from_millis(100);
    cfg.actuator_retry = Retry { first: Duration::from_millis(100), max: Duration::from_millis(400) };
    cfg.lightning = Some(LightningConfig { listen: ln, ..LightningConfig::default() });
    // Coins for the gateway's wallets come from mining (libraries never mine themselves).
    cfg.faucet = Some(bitmote_regtest::RegtestFaucet::shared(chain.client()).unwrap());
    let gw = Gateway::start(cfg, chain.client().fresh().unwrap()).unwrap();
    let base = format!("http://{}", gw.http_addr);
    let token = std::fs::read_to_string(dir.join("admin.token")).unwrap().trim().to_string();
    (gw, base, token)
}

fn wait(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {secs} s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A lock on the broker at `mqtt` with a persistent session: it executes each event id
/// once (kept in `done`) and acknowledges only while `ack` is set; it (re)subscribes and
/// reports itself online on every connection, and its last will says offline. Returns
/// what stops it (a disconnect). It logs in with `login`, the MQTT credentials issued at its
/// enrolment.
fn lock(name: &str, mqtt: SocketAddr, login: &(String, String), done: Arc<Mutex<Vec<String>>>, ack: Arc<AtomicBool>) -> impl FnOnce() {
    lock_answering(name, mqtt, login, done, ack, Arc::new(Mutex::new("done")))
}

/// [`lock`], answering `answer` (`done`, `refused`) when it acknowledges; it acts only
/// when it answers `done` (or does not answer).
fn lock_answering(
    name: &str,
    mqtt: SocketAddr,
    login: &(String, String),
    done: Arc<Mutex<Vec<String>>>,
    ack: Arc<AtomicBool>,
    answer: Arc<Mutex<&'static str>>,
) -> impl FnOnce() {
    let mut opts = rumqttc::MqttOptions::new(name, mqtt.ip().to_string(), mqtt.port());
    opts.set_credentials(login.0.clone(), login.1.clone());
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_clean_session(false);
    let presence = format!("bitmote/{name}/presence");
    opts.set_last_will(rumqttc::LastWill::new(&presence, "offline", rumqttc::QoS::AtLeastOnce, true));
    let (client, mut conn) = rumqttc::Client::new(opts, 16);
    let (commands, acks) = (format!("bitmote/{name}/commands"), format!("bitmote/{name}/acks"));
    let quit = Arc::new(AtomicBool::new(false));
    let (q, c) = (quit.clone(), client.clone());
    std::thread::spawn(move || {
        for ev in conn.iter() {
            if q.load(Ordering::SeqCst) {
                break;
            }
            match ev {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                    client.try_subscribe(&commands, rumqttc::QoS::AtLeastOnce).unwrap();
                    client.try_publish(&presence, rumqttc::QoS::AtLeastOnce, true, "online").unwrap();
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) if p.topic == commands => {
                    let v: Json = serde_json::from_slice(&p.payload).unwrap();
                    let id = v["event_id"].as_str().unwrap().to_string();
                    let result = *answer.lock().unwrap();
                    let mut d = done.lock().unwrap();
                    if !d.contains(&id) && result == "done" {
                        assert_eq!(v["command"], "unlock");
                        d.push(id.clone()); // "opens the lock", once per event id
                    }
                    if ack.load(Ordering::SeqCst) {
                        let a = json!({ "event_id": id, "result": result, "reason": "jammed" }).to_string();
                        client.try_publish(&acks, rumqttc::QoS::AtLeastOnce, false, a).unwrap();
                    }
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    });
    move || {
        quit.store(true, Ordering::SeqCst);
        let _ = c.disconnect();
    }
}

#[test]
fn a_paid_invoice_opens_the_lock_once_even_across_a_gateway_restart() {
    let exe = ensure_bitcoind(&InstallOptions::default(), &mut LogProgress::new()).unwrap().bitcoind;
    let chain = RegtestNode::start(RegtestOptions::new(exe)).unwrap();
    chain.mine(101).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("rules.toml"),
        "[[rule]]\nid = \"coffee\"\ndevice = \"lock-ln\"\ntrigger = { kind = \"lightning\", amount_msat = 50000, expiry_secs = 600 }\n\
         action = { command = \"unlock\" }\nttl_secs = 600\n\n\
         [[rule]]\nid = \"quick\"\ndevice = \"lock-ln\"\ntrigger = { kind = \"lightning\", amount_msat = 20000 }\naction = { command = \"unlock\" }\nttl_secs = 3\n\n\
         [[rule]]\nid = \"lease\"\ndevice = \"lock-ln\"\ntrigger = { kind = \"height\", height = 100000 }\naction = { command = \"off\" }\n",
    )
    .unwrap();
    let (mqtt, ln) = (free_addr(), free_addr());
    let (gw, base, token) = gateway(d, &chain, mqtt, ln);
    let t = Some(token.as_str());

    // The gateway's node: its id and address in /v1/lightning; on regtest it funds its
    // wallet, the reserve ldk-node needs to accept inbound channels.
    let status = |base: &str| api("GET", &format!("{base}/v1/lightning"), None, None).1;
    wait("the gateway's Lightning wallet funded", 180, || status(&base)["onchain_sat"].as_u64().unwrap_or(0) > 0);
    let s = status(&base);
    assert_eq!(s["enabled"], true, "{s}");
    assert_eq!(s["listening"][0].as_str(), Some(ln.to_string().as_str()), "{s}");
    let gw_id = node::parse_node_id(s["node_id"].as_str().unwrap()).unwrap();

    // A payer with its own node, funded, with a channel to the gateway's node.
    let payer = node::start(&NodeConfig {
        dir: d.join("payer/ldk"),
        listen: free_addr(),
        rpc: chain.rpc_config().clone(),
        alias: "payer".into(),
        announce: false,
        announce_as: None,
    })
    .unwrap();
    let faucet = chain.faucet().unwrap();
    node::fund(&faucet, &payer, 2).unwrap();
    node::open_channel(Some(&faucet), &payer, gw_id, ln.into(), 200_000, None, false).unwrap();
    wait("the gateway sees the channel usable", 120, || status(&base)["channels"].as_array().unwrap().iter().any(|c| c["usable"] == true));

    // The gateway's node is a hub: a shop with an announced channel to it (opened by the
    // shop, which pushes some of it to the gateway so the gateway can forward; ldk-node
    // forwards only to announced channels) is paid by the payer through the gateway; that
    // payment is not an actuator invoice and fires nothing.
    let shop = node::start(&NodeConfig {
        dir: d.join("shop/ldk"),
        listen: free_addr(),
        rpc: chain.rpc_config().clone(),
        alias: "shop".into(),
        announce: false,
        announce_as: None,
    })
    .unwrap();
    node::fund(&faucet, &shop, 1).unwrap();
    node::open_channel(Some(&faucet), &shop, gw_id, ln.into(), 200_000, Some(100_000_000), true).unwrap();
    node::wait_usable(Some(&faucet), &payer, gw_id).unwrap();
    let desc = bitmote_pay::ldk_node::lightning_invoice::Bolt11InvoiceDescription::Direct(
        bitmote_pay::ldk_node::lightning_invoice::Description::new("tea".into()).unwrap(),
    );
    let tea = shop.bolt11_payment().receive(30_000, &desc, 600).unwrap();
    let routed = Instant::now() + Duration::from_secs(180);
    loop {
        // The payer may not have the channel's announcement yet (gossip): retry, whether the
        // send fails at once (no route: PaymentSendingFailed) or later.
        if let Ok(id) = payer.bolt11_payment().send(&tea, None) {
            wait("the routed payment settled", 60, || payer.payment(&id).is_some_and(|p| p.status != PaymentStatus::Pending));
            if payer.payment(&id).unwrap().status == PaymentStatus::Succeeded {
                break;
            }
        }
        assert!(Instant::now() < routed, "the payer could not pay the shop through the gateway");
        std::thread::sleep(Duration::from_secs(1));
    }
    wait("the shop has the payment", 30, || {
        shop.list_payments().iter().any(|p| p.status == PaymentStatus::Succeeded && p.amount_msat == Some(30_000))
    });
    shop.stop().unwrap();

    // No invoice while the lock is offline; none for rules that are not Lightning rules.
    let orders = format!("{base}/v1/devices/lock-ln/orders");
    let (code, body) = api("POST", &orders, t, Some(json!({ "rule": "coffee" })));
    assert_eq!((code, body["error"].as_str()), (409, Some("device lock-ln is offline")), "{body}");
    assert_eq!(api("POST", &orders, None, Some(json!({ "rule": "coffee" }))).0, 401);
    assert_eq!(api("POST", &orders, t, Some(json!({ "rule": "nope" }))).0, 404);
    let (code, body) = api("POST", &orders, t, Some(json!({ "rule": "lease" })));
    assert_eq!(code, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("not a Lightning rule"), "{body}");

    // The lock comes online (acting, but not acknowledging yet).
    let done = Arc::new(Mutex::new(vec![]));
    let ack = Arc::new(AtomicBool::new(false));
    let key = bitmote_device::SigningKey::schnorr_from_secret(&[7; 32]).unwrap();
    let (code, e) =
        api("POST", &format!("{base}/v1/devices"), t, Some(json!({ "public_key": key.public_key().to_string(), "name": "lock-ln" })));
    assert_eq!(code, 200, "{e}");
    let login = (e["mqtt"]["username"].as_str().unwrap().to_string(), e["mqtt"]["password"].as_str().unwrap().to_string());
    let stop_lock = lock("lock-ln", mqtt, &login, done.clone(), ack.clone());
    wait("lock-ln online", 30, || api("GET", &format!("{base}/v1/presence"), None, None).1["devices"]["lock-ln"]["state"] == "online");
    let (code, order) = api("POST", &orders, t, Some(json!({ "rule": "coffee" })));
    assert_eq!(code, 201, "{order}");
    assert_eq!((order["amount_msat"].as_u64(), order["expiry_secs"].as_u64()), (Some(50_000), Some(600)));
    let invoice: Bolt11Invoice = order["invoice"].as_str().unwrap().parse().unwrap();
    assert_eq!(invoice.amount_milli_satoshis(), Some(50_000));
    let hash = order["payment_hash"].as_str().unwrap().to_string();
    assert_eq!(hex::encode(bitmote_chain::bitcoin::hashes::Hash::to_byte_array(*invoice.payment_hash())), hash);
    let event_id = format!("coffee:ln:{hash}");

    // The payer pays; the lock acts once; the gateway has delivered it, unacknowledged, and
    // holds the payment: not claimed while the device has not acknowledged.
    let paid = payer.bolt11_payment().send(&invoice, None).unwrap();
    wait("the lock acted", 60, || !done.lock().unwrap().is_empty());
    assert_eq!(*done.lock().unwrap(), vec![event_id.clone()]);
    let action = |base: &str| {
        let log = api("GET", &format!("{base}/v1/actions"), None, None).1;
        let a: Vec<Json> = log["actions"].as_array().unwrap().iter().filter(|a| a["rule_id"] == "coffee").cloned().collect();
        assert!(a.len() <= 1, "one action for the payment, exactly: {log:#}");
        a.into_iter().next().unwrap_or(Json::Null)
    };
    let a = action(&base);
    assert_eq!((a["event_id"].as_str(), a["state"].as_str()), (Some(event_id.as_str()), Some("delivered")), "{a}");
    assert_eq!((a["trigger"].as_str(), a["lightning"]["payment_hash"].as_str()), (Some("lightning"), Some(hash.as_str())), "{a}");
    assert_eq!((a["lightning"]["amount_msat"].as_u64(), a["txid"].as_str()), (Some(50_000), None), "{a}");
    assert_eq!(a["lightning"]["claim"], "held", "{a}");
    assert!(a["lightning"]["claim_deadline"].as_u64().is_some(), "{a}");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(payer.payment(&paid).map(|p| p.status), Some(PaymentStatus::Pending), "not claimed before the acknowledgement");
    let received = |gw: &Gateway, msat: u64| {
        gw.shared().lightning.as_ref().unwrap().list_payments().iter().any(|p| {
            p.direction == bitmote_pay::ldk_node::payment::PaymentDirection::Inbound
                && p.status == PaymentStatus::Succeeded
                && p.amount_msat == Some(msat)
        })
    };
    assert!(!received(&gw, 50_000), "the gateway's node has not taken the money");

    // The same invoice cannot be paid again.
    assert!(payer.bolt11_payment().send(&invoice, None).is_err(), "a second payment of the same invoice");

    // The gateway stops before the lock acknowledges, and starts again: the action is
    // delivered again under the same event id; the lock acknowledges and does not act twice.
    // (The embedded broker does not give its port back within the process, so the restarted
    // gateway's broker, and the lock's new connection, are on another port.)
    gw.shutdown();
    stop_lock();
    ack.store(true, Ordering::SeqCst);
    let mqtt = free_addr();
    let (gw, base, _) = gateway(d, &chain, mqtt, ln);
    let stop_lock = lock("lock-ln", mqtt, &login, done.clone(), ack.clone());
    wait("the action acknowledged after the restart", 60, || action(&base)["state"] == "acked");
    let a = action(&base);
    assert!(a["attempts"].as_u64().unwrap() >= 2, "delivered before and after the restart: {a}");
    assert_eq!(*done.lock().unwrap(), vec![event_id.clone()], "the lock acted once");
    // Acknowledged: claimed, the payer's payment succeeds and the gateway's node has the money.
    wait("the payer's payment succeeded (it reconnects to the restarted gateway within a minute)", 120, || {
        payer.payment(&paid).is_some_and(|p| p.status == PaymentStatus::Succeeded)
    });
    wait("the gateway's node received it", 30, || received(&gw, 50_000));
    wait("the action shows it claimed", 10, || action(&base)["lightning"]["claim"] == "claimed");
    // Nothing fires again later (a replayed node event would be ignored, too).
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(action(&base)["event_id"].as_str(), Some(event_id.as_str()));
    assert_eq!(done.lock().unwrap().len(), 1);
    stop_lock();

    // The lock refuses the next paid action: not executed, the payment failed back.
    let answer = Arc::new(Mutex::new("refused"));
    let stop_lock = lock_answering("lock-ln", mqtt, &login, done.clone(), ack.clone(), answer.clone());
    let online = || api("GET", &format!("{base}/v1/presence"), None, None).1["devices"]["lock-ln"]["state"] == "online";
    wait("lock-ln online", 30, online);
    let orders = format!("{base}/v1/devices/lock-ln/orders"); // the restarted gateway's
    let order = |rule: &str| -> (String, Bolt11Invoice) {
        let (code, order) = api("POST", &orders, t, Some(json!({ "rule": rule })));
        assert_eq!(code, 201, "{order}");
        (order["order_id"].as_str().unwrap().to_string(), order["invoice"].as_str().unwrap().parse().unwrap())
    };
    let one = |base: &str, id: &str| {
        let log = api("GET", &format!("{base}/v1/actions"), None, None).1;
        log["actions"].as_array().unwrap().iter().find(|a| a["event_id"] == id).cloned().unwrap_or(Json::Null)
    };
    let failed = |p: &bitmote_pay::ldk_node::lightning::ln::channelmanager::PaymentId| {
        payer.payment(p).is_some_and(|p| p.status == PaymentStatus::Failed)
    };
    let (refused_id, invoice) = order("coffee");
    let refused_pay = payer.bolt11_payment().send(&invoice, None).unwrap();
    wait("the refused payment failed back to the payer", 60, || failed(&refused_pay));
    let a = one(&base, &refused_id);
    assert_eq!((a["state"].as_str(), a["lightning"]["claim"].as_str()), (Some("refused"), Some("failed_back")), "{a}");
    assert!(a["note"].as_str().unwrap().contains("payment failed back"), "{a}");
    assert_eq!(done.lock().unwrap().len(), 1, "not executed");

    // Sold while the lock is online; paid while it is offline, past the action's 3 s:
    // expired, the payment failed back.
    *answer.lock().unwrap() = "done";
    let (late_id, late_invoice) = order("quick");
    let (held_id, held_invoice) = order("coffee");
    stop_lock();
    let late_pay = payer.bolt11_payment().send(&late_invoice, None).unwrap();
    wait("the unanswered payment failed back to the payer", 60, || failed(&late_pay));
    let a = one(&base, &late_id);
    assert_eq!((a["state"].as_str(), a["lightning"]["claim"].as_str()), (Some("expired"), Some("failed_back")), "{a}");

    // Unanswered as blocks come: one block short of the claim deadline the action is expired
    // and the payment failed back (before LDK would fail it back by itself).
    let held_pay = payer.bolt11_payment().send(&held_invoice, None).unwrap();
    wait("the action delivered", 60, || one(&base, &held_id)["state"] == "delivered");
    let a = one(&base, &held_id);
    let deadline = a["lightning"]["claim_deadline"].as_u64().unwrap();
    let tip = chain.client().tip().unwrap().height as u64;
    assert!(deadline > tip + 1, "{a}");
    chain.mine((deadline - tip - 1) as u32).unwrap();
    wait("the held payment failed back at its deadline", 60, || failed(&held_pay));
    let a = one(&base, &held_id);
    assert_eq!((a["state"].as_str(), a["lightning"]["claim"].as_str()), (Some("expired"), Some("failed_back")), "{a}");
    assert!(a["note"].as_str().unwrap().contains("claim deadline"), "{a}");
    assert!(!received(&gw, 20_000), "nothing kept for actions not done");
    assert_eq!(done.lock().unwrap().len(), 1, "nothing else executed");
    payer.stop().unwrap();
    gw.shutdown();
}
