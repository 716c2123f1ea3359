//! A rental lock that opens when its payment confirms, end to end: `bitmote up` with a
//! rules file, a simulated lock (`bitmote device actuator`) on the embedded MQTT broker,
//! a real payment on regtest, the lock's acknowledgement in the action log; and a lock that
//! checks payments itself with its light client, refusing fake ones published to its topic;
//! and `up` with its Lightning node selling an invoice whose payment opens the lock once,
//! through a kill -9 of `up` between the payment and the lock's acknowledgement (the
//! payment is held meanwhile, and claimed on the acknowledgement); and a payment reorged
//! out and mined again, which opens the lock again after its revert (issue 16).

use std::process::Stdio;

mod common;
use common::{bitmote, up, Up};
use std::time::{Duration, Instant};

use bitmote_chain::bitcoin::{Address, Amount, FeeRate, Network, ScriptBuf};
use bitmote_chain::wallet::GatewayWallet;
use bitmote_regtest::{op_true_address, RegtestNode};
use serde_json::Value as Json;

#[test]
fn a_lock_opens_once_when_its_payment_confirms() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pay_to = rental_rule(d);
    let u = up(d, &["--block-interval", "1"]);
    let (http, mqtt) = (u.http.clone(), u.mqtt.clone());

    // The lock, online before anyone pays.
    let lock = lock_7(d, &http, &mqtt);

    // The lock reports itself online (its MQTT presence, with a last will for going offline).
    wait_presence(&http, "lock-7", "online");

    // A customer pays from their own wallet on the same chain.
    let txid = customer_pays(d, &pay_to);
    let paid = Instant::now();

    // `up` mines a block within a second; the lock acts and exits after one command.
    let output = lock.wait_with_output().unwrap();
    let acted = String::from_utf8_lossy(&output.stdout).to_string();
    eprintln!("lock opened {:?} after the payment was broadcast: {acted}", paid.elapsed());
    assert!(output.status.success());
    let v: Json = serde_json::from_str(acted.lines().next().unwrap()).unwrap();
    assert_eq!(v["command"], "unlock");
    assert_eq!(v["output"], "open");
    let event = v["event_id"].as_str().unwrap().to_string();
    assert!(event.starts_with(&format!("rental:{txid}:")));

    // The action log shows it acknowledged, exactly once.
    let acked = the_one_action_acked(&http);
    assert_eq!((acked["device"].as_str(), acked["attempts"].as_u64()), (Some("lock-7"), Some(1)));
    // The lock process is gone: its last will marks it offline.
    wait_presence(&http, "lock-7", "offline");
    // A restarted lock with the same state does not act again on a redelivery.
    let state: Json = serde_json::from_slice(&std::fs::read(d.join("lock-7.json")).unwrap()).unwrap();
    assert_eq!(state["done"].as_array().unwrap().len(), 1);
    assert_eq!(state["output"], "open");

    assert!(u.interrupt().success());
}

#[test]
fn an_order_needs_its_lock_online_gets_a_fresh_address_and_its_payment_opens_the_lock_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let u = up(d, &["--block-interval", "1"]);
    let (http, mqtt) = (u.http.clone(), u.mqtt.clone());
    let token = std::fs::read_to_string(d.join("gateway/admin.token")).unwrap();
    let order = || {
        let r = ureq::post(&format!("{http}/v1/devices/lock-7/orders"))
            .set("Authorization", &format!("Bearer {}", token.trim()))
            .send_json(serde_json::json!({ "min_sat": 20000, "confirmations": 1, "action": { "command": "unlock" }, "ttl_secs": 600 }));
        match r {
            Ok(r) => (r.status(), r.into_json::<Json>().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_json::<Json>().unwrap()),
            Err(e) => panic!("{e}"),
        }
    };
    let cli = |args: &[&str]| {
        let out = bitmote(d).env("BITMOTE_GATEWAY_URL", &http).args(args).output().unwrap();
        assert!(out.status.success(), "bitmote {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };

    // No payment address while the lock cannot act.
    let (code, body) = order();
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["error"], "device lock-7 is offline");

    // Rules from the command line: added, listed, removed (through the admin API).
    std::fs::write(d.join("extra.toml"), "[[rule]]\nid = \"lease\"\ndevice = \"relay-2\"\ntrigger = { kind = \"height\", height = 100000 }\naction = { command = \"off\" }\n").unwrap();
    assert_eq!(cli(&["rules", "add", d.join("extra.toml").to_str().unwrap()]).trim(), "added lease");
    assert!(cli(&["rules", "list"]).lines().any(|l| l.starts_with("lease") && l.contains("relay-2") && l.ends_with("api")));
    assert_eq!(cli(&["rules", "remove", "lease"]).trim(), "removed lease");
    assert!(cli(&["rules", "list"]).trim().is_empty());

    let lock = lock_7(d, &http, &mqtt);
    wait_presence(&http, "lock-7", "online");

    // Each order gets its own fresh address from the gateway's wallet.
    let (code, first) = order();
    assert_eq!(code, 201, "{first}");
    let (_, second) = order();
    assert_ne!(first["address"], second["address"]);
    assert_ne!(first["order_id"], second["order_id"]);
    assert_eq!((first["amount"].as_u64(), first["confirmations"].as_u64()), (Some(20000), Some(1)));
    let pay_to: Address = first["address"].as_str().unwrap().parse::<Address<_>>().unwrap().require_network(Network::Regtest).unwrap();
    let order_id = first["order_id"].as_str().unwrap().to_string();

    let txid = customer_pays(d, &pay_to);

    let output = lock.wait_with_output().unwrap();
    assert!(output.status.success());
    let acted = String::from_utf8_lossy(&output.stdout).to_string();
    assert_eq!(acted.lines().count(), 1, "{acted}");
    let v: Json = serde_json::from_str(acted.trim()).unwrap();
    assert_eq!((v["command"].as_str(), v["output"].as_str()), (Some("unlock"), Some("open")));
    assert!(v["event_id"].as_str().unwrap().starts_with(&format!("{order_id}:{txid}:")), "{v}");
    let state: Json = serde_json::from_slice(&std::fs::read(d.join("lock-7.json")).unwrap()).unwrap();
    assert_eq!(state["done"].as_array().unwrap().len(), 1);
    let acked = the_one_action_acked(&http);
    assert_eq!((acked["rule_id"].as_str(), acked["attempts"].as_u64()), (Some(order_id.as_str()), Some(1)));
    assert!(u.interrupt().success());
}

#[test]
fn a_light_client_lock_checks_payments_itself_and_refuses_fake_ones() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pay_to = rental_rule(d);
    let u = up(d, &["--block-interval", "1"]);
    let (http, mqtt) = (u.http.clone(), u.mqtt.clone());
    let node = RegtestNode::attach(&d.join("bitcoind")).unwrap().expect("up's node is running");
    enroll_lock_7(d, &http);
    // A light client without a payment policy of its own would take the gateway's word for
    // amount and address: it refuses to start (issue #13, item 12).
    let out = actuator(d, &mqtt, "lock-7").args(["--count", "1", "--light-client", &node.p2p_addr().to_string()]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--pay-to ADDRESS"), "{}", String::from_utf8_lossy(&out.stderr));
    // Its policy: the rental address (and, for the under-confirmed claim below, the
    // anyone-can-spend address the test chain's coinbases pay), 20,000 sat at least.
    let (mut lock, mut lines) = light_lock_7(
        d,
        &mqtt,
        &http,
        &node,
        &["--pay-to", &pay_to.to_string(), "--pay-to", &op_true_address().to_string(), "--min-sat", "20000"],
    );

    // A compromised gateway (here: anyone with the admin token, whose MQTT identity may
    // publish on every topic) claims payments.
    let token = std::fs::read_to_string(d.join("gateway/admin.token")).unwrap();
    let mut opts = rumqttc::MqttOptions::new("intruder", "127.0.0.1", mqtt.rsplit_once(':').unwrap().1.parse().unwrap());
    opts.set_credentials("admin", token.trim());
    let (fake, mut conn) = bitmote_gateway::mqtt::client(opts, 10);
    std::thread::spawn(move || for _ in conn.iter() {});
    let c = node.client();
    let tip = c.tip().unwrap();
    let coinbase = c.block(&tip.hash).unwrap().txdata.remove(0).compute_txid();
    let claim = |id: &str, txid: String, address: String, height: u32, confirmations: u32| {
        let cmd = serde_json::json!({ "event_id": id, "command": "unlock", "confirmations": confirmations,
            "payment": { "txid": txid, "vout": 0, "address": address, "amount_sat": 25000, "height": height } });
        fake.publish("bitmote/lock-7/commands", rumqttc::QoS::AtLeastOnce, false, cmd.to_string()).unwrap();
    };
    // A payment that does not exist …
    claim("fake-1", "11".repeat(32), pay_to.to_string(), tip.height, 1);
    // … and a real output (the tip's coinbase) claimed with confirmations it does not have.
    claim("fake-2", coinbase.to_string(), op_true_address().to_string(), tip.height, 1000);
    let mut refused = |id: &str| {
        let v = lines.next().expect("the lock printed a line");
        assert_eq!((v["event_id"].as_str(), v["output"].as_str()), (Some(id), None), "{v}");
        v["refused"].as_str().unwrap().to_string()
    };
    let r1 = refused("fake-1");
    assert!(r1.contains(&format!("compact filter of block {}", tip.height)), "{r1}");
    let r2 = refused("fake-2");
    assert!(r2.starts_with("under-confirmed") && r2.ends_with("1000 required"), "{r2}");

    // The real payment, through the gateway, opens the lock.
    let txid = customer_pays(d, &pay_to);
    let v = lines.next().expect("the lock acted");
    assert_eq!((v["command"].as_str(), v["output"].as_str()), (Some("unlock"), Some("open")), "{v}");
    assert!(v["event_id"].as_str().unwrap().starts_with(&format!("rental:{txid}:")));
    assert!(lock.wait().unwrap().success());
    let acked = the_one_action_acked(&http);
    assert_eq!(acked["payment"]["txid"].as_str(), Some(txid.as_str()), "the command carried the payment: {acked}");
    let state: Json = serde_json::from_slice(&std::fs::read(d.join("lock-7.json")).unwrap()).unwrap();
    assert_eq!((state["output"].as_str(), state["done"].as_array().unwrap().len()), (Some("open"), 1));
    assert_eq!(state["paid"][0].as_str().unwrap(), format!("{txid}:{}", acked["payment"]["vout"]));

    // The lock again, now pinning the gateway wallet's receive descriptor instead of an
    // address: a payment order (a fresh wallet address each) opens it without reconfiguring
    // it, and an address the descriptor does not derive is refused.
    let admin = |method: &str, path: &str| {
        ureq::request(method, &format!("{http}{path}")).set("Authorization", &format!("Bearer {}", token.trim()))
    };
    let wallet: Json = admin("GET", "/v1/wallet").call().unwrap().into_json().unwrap();
    let desc = wallet["receive_descriptor"].as_str().unwrap().to_string();
    assert!(desc.starts_with("wpkh([") && !desc.contains("prv"), "{desc}");
    assert_eq!(ureq::get(&format!("{http}/v1/wallet")).call().unwrap_err().into_response().map(|r| r.status()), Some(401), "admin only");
    let (mut lock, mut lines) = light_lock_7(d, &mqtt, &http, &node, &["--pay-to-descriptor", &desc, "--min-sat", "20000"]);
    claim("fake-3", txid.clone(), pay_to.to_string(), tip.height, 1);
    let v = lines.next().expect("the lock printed a line");
    assert_eq!(v["event_id"].as_str(), Some("fake-3"), "{v}");
    assert!(v["refused"].as_str().unwrap().contains("is not an address this device accepts payments to"), "{v}");
    let order: Json = admin("POST", "/v1/devices/lock-7/orders")
        .send_json(serde_json::json!({ "min_sat": 20000, "confirmations": 1, "action": { "command": "unlock" }, "ttl_secs": 600 }))
        .unwrap()
        .into_json()
        .unwrap();
    let to: Address = order["address"].as_str().unwrap().parse::<Address<_>>().unwrap().require_network(Network::Regtest).unwrap();
    let paid = customer_pays(d, &to);
    let v = lines.next().expect("the lock acted");
    assert_eq!((v["command"].as_str(), v["output"].as_str()), (Some("unlock"), Some("open")), "{v}");
    assert!(v["event_id"].as_str().unwrap().starts_with(&format!("{}:{paid}:", order["order_id"].as_str().unwrap())), "{v}");
    assert!(lock.wait().unwrap().success());
    assert!(u.interrupt().success());
}

#[test]
fn with_its_lightning_node_up_sells_an_invoice_whose_payment_opens_the_lock_once_even_after_kill_9() {
    // No automatic mining: a held payment has about 3 blocks before its claim deadline,
    // which one-second blocks would pass while the lock is away.
    use bitmote_pay::ldk_node::lightning_invoice::Bolt11Invoice;
    use bitmote_pay::ldk_node::payment::PaymentStatus;
    use bitmote_pay::node::{self, NodeConfig};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ln = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    std::fs::write(d.join("bitmote.toml"), format!("[gateway]\nlightning = true\nlightning_listen = \"{ln}\"\n")).unwrap();
    std::fs::create_dir_all(d.join("gateway")).unwrap();
    std::fs::write(
        d.join("gateway/rules.toml"),
        "[[rule]]\nid = \"coffee\"\ndevice = \"lock-7\"\ntrigger = { kind = \"lightning\", amount_msat = 21000 }\naction = { command = \"unlock\" }\nttl_secs = 600\n",
    )
    .unwrap();
    let u = up(d, &["--block-interval", "0"]);
    let (http, mqtt) = (u.http.clone(), u.mqtt.clone());
    let line = u.lines.iter().find(|l| l.starts_with("lightning:")).unwrap_or_else(|| panic!("no lightning line: {:?}", u.lines));
    assert!(line.contains(&format!("@{ln}")), "{line}");

    // The gateway's node, funded by `up` on regtest so it accepts a channel.
    let status = || ureq::get(&format!("{http}/v1/lightning")).call().unwrap().into_json::<Json>().unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    while status()["onchain_sat"].as_u64().unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "the gateway's Lightning wallet was never funded: {}", status());
        std::thread::sleep(Duration::from_millis(200));
    }
    let gw_id = node::parse_node_id(status()["node_id"].as_str().unwrap()).unwrap();

    // A customer's node with a channel to it.
    let chain = RegtestNode::attach(&d.join("bitcoind")).unwrap().expect("up's node is running");
    let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let payer = node::start(&NodeConfig {
        dir: d.join("customer/ldk"),
        listen,
        rpc: chain.rpc_config().clone(),
        alias: "customer".into(),
        announce: false,
        announce_as: None,
    })
    .unwrap();
    let faucet = chain.faucet().unwrap();
    node::fund(&faucet, &payer, 1).unwrap();
    node::open_channel(Some(&faucet), &payer, gw_id, ln.into(), 100_000, None, false).unwrap();

    let mut lock = lock_7(d, &http, &mqtt);
    wait_presence(&http, "lock-7", "online");
    let token = std::fs::read_to_string(d.join("gateway/admin.token")).unwrap();
    let order: Json = ureq::post(&format!("{http}/v1/devices/lock-7/orders"))
        .set("Authorization", &format!("Bearer {}", token.trim()))
        .send_json(serde_json::json!({ "rule": "coffee" }))
        .unwrap()
        .into_json()
        .unwrap();
    let invoice: Bolt11Invoice = order["invoice"].as_str().unwrap().parse().unwrap();
    assert_eq!(invoice.amount_milli_satoshis(), Some(21_000));

    // The lock loses power after the sale; the customer pays; the gateway holds the payment
    // and sends the action (to the broker, for the offline lock). The channel is usable on
    // the gateway's side a moment after the payer's: retry routing.
    lock.kill().unwrap();
    lock.wait().unwrap();
    let delivered = || {
        let log: Json = ureq::get(&format!("{http}/v1/actions")).call().unwrap().into_json().unwrap();
        log["actions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["rule_id"] == "coffee" && a["state"] == "delivered" && a["lightning"]["claim"] == "held")
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    let paid = 'paid: loop {
        let id = payer.bolt11_payment().send(&invoice, None).unwrap();
        let waited = Instant::now();
        while waited.elapsed() < Duration::from_secs(30) {
            if delivered() {
                break 'paid id;
            }
            if payer.payment(&id).is_some_and(|p| p.status == PaymentStatus::Failed) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(Instant::now() < deadline, "the invoice could not be paid: {:?}", payer.payment(&id));
        std::thread::sleep(Duration::from_secs(1));
    };
    // Not claimed while the lock has not acknowledged.
    assert_eq!(payer.payment(&paid).map(|p| p.status), Some(PaymentStatus::Pending));
    // The gateway crashes there, between the payment and the acknowledgement.
    kill_9(u);

    // Restarted, with the lock back: it opens once, the action is acknowledged once, and
    // then the payment is claimed: the customer's payment succeeds.
    let u = up(d, &["--block-interval", "0"]);
    let (http, mqtt) = (u.http.clone(), u.mqtt.clone());
    let lock = lock_7(d, &http, &mqtt);
    let output = lock.wait_with_output().unwrap();
    assert!(output.status.success());
    let acted = String::from_utf8_lossy(&output.stdout).to_string();
    assert_eq!(acted.lines().count(), 1, "{acted}");
    let v: Json = serde_json::from_str(acted.trim()).unwrap();
    assert_eq!((v["command"].as_str(), v["output"].as_str()), (Some("unlock"), Some("open")));
    assert_eq!(v["event_id"].as_str(), order["order_id"].as_str());
    let acked = the_one_action_acked(&http);
    assert_eq!((acked["trigger"].as_str(), acked["lightning"]["amount_msat"].as_u64()), (Some("lightning"), Some(21_000)));
    assert!(acked["attempts"].as_u64().unwrap() >= 2, "sent before the crash and after: {acked}");
    let state: Json = serde_json::from_slice(&std::fs::read(d.join("lock-7.json")).unwrap()).unwrap();
    assert_eq!(state["done"].as_array().unwrap().len(), 1);
    // (The customer's node reconnects to the restarted gateway within a minute.)
    let deadline = Instant::now() + Duration::from_secs(120);
    while payer.payment(&paid).map(|p| p.status) != Some(PaymentStatus::Succeeded) {
        assert!(Instant::now() < deadline, "the held payment was never claimed: {:?}", payer.payment(&paid));
        std::thread::sleep(Duration::from_millis(200));
    }
    let claimed = the_one_action_acked(&http);
    assert_eq!(claimed["lightning"]["claim"], "claimed", "{claimed}");
    payer.stop().unwrap();
    assert!(u.interrupt().success());
    assert!(bitmote(d).args(["node", "stop"]).status().unwrap().success());
}

/// The gateway's rules file: `rental` opens lock-7 on 20,000 sat to a fixed address (returned).
fn rental_rule(d: &std::path::Path) -> Address {
    let pay_to = Address::p2wsh(&ScriptBuf::from(vec![0x61, 0x87]), Network::Regtest);
    std::fs::create_dir_all(d.join("gateway")).unwrap();
    std::fs::write(
        d.join("gateway/rules.toml"),
        format!(
            "[[rule]]\nid = \"rental\"\ndevice = \"lock-7\"\ntrigger = {{ kind = \"payment\", address = \"{pay_to}\", min_sat = 20000, confirmations = 1 }}\naction = {{ command = \"unlock\" }}\nrevert = {{ command = \"lock\" }}\nttl_secs = 600\n"
        ),
    )
    .unwrap();
    pay_to
}

/// A key for the lock `name`, enrolled under that name (its MQTT password beside it, as
/// `<name>.mqtt`), once: `<name>.key` in `d`.
fn enroll_lock(d: &std::path::Path, http: &str, name: &str) {
    let key = d.join(format!("{name}.key"));
    if !d.join(format!("{name}.mqtt")).exists() {
        for args in [&["device", "keygen", "--out"][..], &["device", "enroll", "--name", name, "--key"][..]] {
            let out = bitmote(d).env("BITMOTE_GATEWAY_URL", http).args(args).arg(&key).output().unwrap();
            assert!(out.status.success(), "bitmote {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        assert!(d.join(format!("{name}.mqtt")).exists(), "enrolment wrote the MQTT password beside the key");
    }
}

fn enroll_lock_7(d: &std::path::Path, http: &str) {
    enroll_lock(d, http, "lock-7")
}

/// `bitmote device actuator` for the lock `name` enrolled earlier with [`enroll_lock`]: its
/// key `<name>.key` (MQTT password beside it) and state `<name>.json` in `d`.
fn actuator(d: &std::path::Path, mqtt: &str, name: &str) -> std::process::Command {
    let mut c = bitmote(d);
    c.args(["device", "actuator", "--name", name, "--mqtt", mqtt, "--key"])
        .arg(d.join(format!("{name}.key")))
        .arg("--state")
        .arg(d.join(format!("{name}.json")));
    c
}

/// `lock-7` in light-client mode against `node`, with the payment `policy` given (its
/// arguments), exiting after acting once: the process, and the JSON lines it prints; online.
fn light_lock_7(
    d: &std::path::Path,
    mqtt: &str,
    http: &str,
    node: &RegtestNode,
    policy: &[&str],
) -> (std::process::Child, impl Iterator<Item = Json>) {
    let mut lock = actuator(d, mqtt, "lock-7")
        .args(["--count", "1", "--light-wait-secs", "3", "--light-client", &node.p2p_addr().to_string()])
        .args(policy)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = std::io::BufRead::lines(std::io::BufReader::new(lock.stdout.take().unwrap()));
    wait_presence(http, "lock-7", "online");
    (lock, lines.map(|l| serde_json::from_str::<Json>(&l.unwrap()).unwrap()))
}

/// The simulated lock `lock-7` (enrolled here), which exits after acting once.
fn lock_7(d: &std::path::Path, http: &str, mqtt: &str) -> std::process::Child {
    enroll_lock_7(d, http);
    actuator(d, mqtt, "lock-7").args(["--count", "1"]).stdout(Stdio::piped()).spawn().unwrap()
}

/// A customer pays 25,000 sat to `to` from their own wallet on `up`'s chain; the txid.
fn customer_pays(d: &std::path::Path, to: &Address) -> String {
    let node = RegtestNode::attach(&d.join("bitcoind")).unwrap().expect("up's node is running");
    let c = node.client();
    let mut w = GatewayWallet::open(&d.join("customer-wallet"), c).unwrap();
    let a = w.new_address().unwrap();
    c.mine(1, &a).unwrap();
    c.mine(100, &op_true_address()).unwrap();
    w.sync(c).unwrap();
    let tx = w.pay(to, Amount::from_sat(25_000), FeeRate::from_sat_per_vb_u32(2)).unwrap();
    c.broadcast(&tx).unwrap();
    tx.compute_txid().to_string()
}

/// Wait until the action log's only action is acknowledged; that action.
fn the_one_action_acked(http: &str) -> Json {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log: Json = ureq::get(&format!("{http}/v1/actions")).call().unwrap().into_json().unwrap();
        let actions = log["actions"].as_array().unwrap();
        // (The API's copy of the action log is refreshed by the actuator loop: right after
        // the device acted it may not hold the action yet.)
        assert!(actions.len() <= 1, "one action, exactly: {log}");
        if actions.len() == 1 && actions[0]["state"] == "acked" {
            return actions[0].clone();
        }
        assert!(Instant::now() < deadline, "no acknowledgement recorded: {log}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Wait until the gateway reports `device` in presence `state`.
fn wait_presence(http: &str, device: &str, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p: Json = ureq::get(&format!("{http}/v1/presence")).call().unwrap().into_json().unwrap();
        if p["devices"][device]["state"] == state {
            return;
        }
        assert!(Instant::now() < deadline, "{device} never became {state}: {p}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Start `lock-<n>` once so the broker knows its persistent session, then kill it: it is
/// offline (its last will says so) but the broker keeps what is sent to it.
fn lock_goes_offline(d: &std::path::Path, http: &str, mqtt: &str, name: &str) {
    enroll_lock(d, http, name);
    let mut lock = actuator(d, mqtt, name).stdout(Stdio::null()).spawn().unwrap();
    wait_presence(http, name, "online");
    lock.kill().unwrap(); // SIGKILL: no goodbye, the last will fires
    lock.wait().unwrap();
    wait_presence(http, name, "offline");
}

/// The action of `rule` once `done` holds for it.
fn wait_action(http: &str, rule: &str, what: &str, done: impl Fn(&Json) -> bool) -> Json {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log: Json = ureq::get(&format!("{http}/v1/actions")).call().unwrap().into_json().unwrap();
        let found: Vec<&Json> = log["actions"].as_array().unwrap().iter().filter(|a| a["rule_id"] == rule).collect();
        assert!(found.len() <= 1, "one action per (rule, payment): {log}");
        if let Some(a) = found.first().filter(|a| done(a)) {
            return (*a).clone();
        }
        assert!(Instant::now() < deadline, "{rule}: never {what}: {log}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Run `name` until it has acted on (or answered) `count` commands; what it printed.
fn lock_runs(d: &std::path::Path, mqtt: &str, name: &str, count: u64) -> String {
    let out = actuator(d, mqtt, name).args(["--count", &count.to_string()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn an_offline_lock_acts_on_reconnecting_within_the_ttl_and_not_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pay_to = rental_rule(d);
    // A second rule for lock-8 whose command lives 3 s.
    let short_to = Address::p2wsh(&ScriptBuf::from(vec![0x62, 0x87]), Network::Regtest);
    let mut rules = std::fs::read_to_string(d.join("gateway/rules.toml")).unwrap();
    rules.push_str(&format!(
        "\n[[rule]]\nid = \"short\"\ndevice = \"lock-8\"\ntrigger = {{ kind = \"payment\", address = \"{short_to}\", min_sat = 20000, confirmations = 1 }}\naction = {{ command = \"unlock\" }}\nttl_secs = 3\n"
    ));
    std::fs::write(d.join("gateway/rules.toml"), rules).unwrap();
    let u = up(d, &["--block-interval", "1"]);
    let (http, mqtt) = (u.http.clone(), u.mqtt.clone());
    lock_goes_offline(d, &http, &mqtt, "lock-7");
    lock_goes_offline(d, &http, &mqtt, "lock-8");

    // Both payments confirm while both locks are offline: the commands go out, unanswered.
    customer_pays(d, &pay_to);
    customer_pays(d, &short_to);
    wait_action(&http, "rental", "delivered", |a| a["state"] == "delivered");
    // (Its 3 s may already be over when we look: then the gateway has expired it itself.)
    let short = wait_action(&http, "short", "delivered", |a| a["state"] == "delivered" || a["state"] == "expired");
    assert!(short["acked_ms"].is_null(), "{short}");

    // lock-7 comes back within its 600 s: it receives the command it missed and acts once.
    let out = lock_runs(d, &mqtt, "lock-7", 1);
    let v: Json = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!((v["command"].as_str(), v["output"].as_str()), (Some("unlock"), Some("open")), "{out}");
    wait_action(&http, "rental", "acked", |a| a["state"] == "acked");

    // lock-8 comes back after its command's 3 s: it does not act, and the gateway records why.
    std::thread::sleep(Duration::from_secs(4));
    let mut lock8 = actuator(d, &mqtt, "lock-8").stdout(Stdio::piped()).spawn().unwrap();
    let expired = wait_action(&http, "short", "expired", |a| a["state"] == "expired");
    assert!(expired["acked_ms"].is_null(), "{expired}");
    wait_presence(&http, "lock-8", "online");
    lock8.kill().unwrap();
    let out = lock8.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty(), "lock-8 must not act: {}", String::from_utf8_lossy(&out.stdout));
    let state: Json = serde_json::from_slice(&std::fs::read(d.join("lock-8.json")).unwrap_or_else(|_| b"{}".to_vec())).unwrap();
    assert_ne!(state["output"], "open", "{state}");
    assert!(u.interrupt().success());
}

#[test]
fn gateway_kill_9_between_the_trigger_and_the_acknowledgement_neither_loses_nor_repeats_the_action() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pay_to = rental_rule(d);
    let u = up(d, &["--block-interval", "1"]);
    let (http, mqtt) = (u.http.clone(), u.mqtt.clone());
    lock_goes_offline(d, &http, &mqtt, "lock-7");

    // The payment fires the rule; the command is out, not acknowledged (the lock is away).
    let txid = customer_pays(d, &pay_to);
    let before = wait_action(&http, "rental", "delivered", |a| a["state"] == "delivered");

    // The gateway crashes there.
    kill_9(u);

    // It restarts on the same data (more blocks follow); the lock comes back and acts once.
    let u = up(d, &["--block-interval", "1"]);
    let (http, mqtt) = (u.http.clone(), u.mqtt.clone());
    let out = lock_runs(d, &mqtt, "lock-7", 1);
    assert_eq!(out.lines().count(), 1, "{out}");
    let v: Json = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["event_id"], before["event_id"], "{out}");
    assert!(v["event_id"].as_str().unwrap().starts_with(&format!("rental:{txid}:")));
    let acked = the_one_action_acked(&http);
    assert_eq!(acked["event_id"], before["event_id"]);
    // More blocks, and the lock listening again: nothing is delivered twice.
    std::thread::sleep(Duration::from_secs(3));
    let mut again = actuator(d, &mqtt, "lock-7").stdout(Stdio::piped()).spawn().unwrap();
    wait_presence(&http, "lock-7", "online");
    std::thread::sleep(Duration::from_secs(2));
    again.kill().unwrap();
    let out = again.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty(), "acted again: {}", String::from_utf8_lossy(&out.stdout));
    let state: Json = serde_json::from_slice(&std::fs::read(d.join("lock-7.json")).unwrap()).unwrap();
    assert_eq!(state["done"].as_array().unwrap().len(), 1, "{state}");
    the_one_action_acked(&http);
    assert!(u.interrupt().success());
    // The node outlived the killed `up` (the second one only attached to it): stop it.
    assert!(bitmote(d).args(["node", "stop"]).status().unwrap().success());
}

/// The gateway (`up`) crashes: SIGKILL, no cleanup.
fn kill_9(mut u: Up) {
    // SAFETY: SIGKILL to our own child.
    unsafe { libc::kill(u.child.id() as i32, libc::SIGKILL) };
    u.child.wait().unwrap();
}

/// Issue 16, failure 2: a harmless reorg must not lock a paying customer out. The rental
/// payment confirms (3 blocks) and lock-7 opens; the payment's block is invalidated (the
/// payment goes back to the mempool) and the revert locks it; the payment is mined again
/// in the new branch and buried under 3 blocks: the lock opens again — executed once net,
/// and the action log says so.
#[test]
fn a_payment_reorged_out_and_mined_again_opens_the_lock_again() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pay_to = rental_rule(d);
    let rules = std::fs::read_to_string(d.join("gateway/rules.toml")).unwrap().replace("confirmations = 1", "confirmations = 3");
    std::fs::write(d.join("gateway/rules.toml"), rules).unwrap();
    // No automatic mining: the test makes the chain.
    let u = up(d, &["--block-interval", "0"]);
    let (http, mqtt) = (u.http.clone(), u.mqtt.clone());
    enroll_lock_7(d, &http);
    let mut lock = actuator(d, &mqtt, "lock-7").args(["--count", "3"]).stdout(Stdio::piped()).spawn().unwrap();
    let (tx_lines, lines) = std::sync::mpsc::channel();
    let out = lock.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines() {
            let _ = tx_lines.send(serde_json::from_str::<Json>(&l.unwrap()).unwrap());
        }
    });
    let next = || lines.recv_timeout(Duration::from_secs(60)).expect("the lock acted");
    wait_presence(&http, "lock-7", "online");

    let txid = customer_pays(d, &pay_to);
    let node = RegtestNode::attach(&d.join("bitcoind")).unwrap().expect("up's node is running");
    let c = node.client();
    let b_pay = node.mine(1).unwrap()[0];
    node.mine(2).unwrap();
    let v = next();
    assert_eq!((v["command"].as_str(), v["output"].as_str()), (Some("unlock"), Some("open")), "{v}");
    let key = v["event_id"].as_str().unwrap().to_string();
    assert!(key.starts_with(&format!("rental:{txid}:")), "{key}");

    // The payment's block is replaced; until the new branch comes, the best chain ends at its parent.
    c.invalidate_block(&b_pay).unwrap();
    let mempool: Vec<String> = c.raw("getrawmempool", &[]).unwrap();
    assert!(mempool.contains(&txid), "the payment went back to the mempool");
    let v = next();
    assert_eq!((v["event_id"].as_str(), v["output"].as_str()), (Some(format!("{key}:revert").as_str()), Some("closed")), "{v}");

    // Mined again in the new branch, then buried under 3 blocks: the lock opens again. (The
    // new block pays its coinbase elsewhere: the same block again would be the invalid one.)
    let elsewhere = Address::p2wsh(&ScriptBuf::from(vec![0x67, 0x87]), Network::Regtest);
    let b_new = c.mine(1, &elsewhere).unwrap()[0];
    assert!(c.block(&b_new).unwrap().txdata.iter().any(|t| t.compute_txid().to_string() == txid), "mined again");
    node.mine(2).unwrap();
    let v = next();
    assert_eq!((v["event_id"].as_str(), v["output"].as_str()), (Some(format!("{key}:g2").as_str()), Some("open")), "{v}");
    assert!(lock.wait().unwrap().success());

    // The action log: the action reverted (it ran), its revert done, the second generation done.
    let deadline = Instant::now() + Duration::from_secs(30);
    let actions = loop {
        let log: Json = ureq::get(&format!("{http}/v1/actions")).call().unwrap().into_json().unwrap();
        let actions = log["actions"].as_array().unwrap().clone();
        if actions.len() == 3 && actions.iter().filter(|a| a["state"] == "acked").count() == 2 {
            break actions;
        }
        assert!(Instant::now() < deadline, "{log}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let find = |id: &str| actions.iter().find(|a| a["event_id"] == id).unwrap_or_else(|| panic!("no {id}: {actions:?}")).clone();
    let first = find(&key);
    assert_eq!(first["state"], "reverted");
    assert!(!first["acked_ms"].is_null(), "it ran before it was reverted: {first}");
    assert_eq!(find(&format!("{key}:revert"))["reverts"], key.as_str());
    let again = find(&format!("{key}:g2"));
    assert_eq!((again["trigger_key"].as_str(), again["generation"].as_u64()), (Some(key.as_str()), Some(2)));
    assert_eq!(again["payment"]["height"].as_u64(), Some(c.tip().unwrap().height as u64 - 2));
    let state: Json = serde_json::from_slice(&std::fs::read(d.join("lock-7.json")).unwrap()).unwrap();
    assert_eq!((state["output"].as_str(), state["done"].as_array().unwrap().len()), (Some("open"), 3));
    assert!(u.interrupt().success());
}
