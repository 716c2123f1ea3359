//! A rental lock that opens when its payment confirms, end to end: `bitmote up` with a
//! rules file, a simulated lock (`bitmote device actuator`) on the embedded MQTT broker,
//! a real payment on regtest, the lock's acknowledgement in the action log.

use std::process::Stdio;

mod common;
use common::{bitmote, up};
use std::time::{Duration, Instant};

use bitmote_chain::bitcoin::{Address, Amount, FeeRate, Network, ScriptBuf};
use bitmote_chain::regtest::{op_true_address, RegtestNode};
use bitmote_chain::wallet::GatewayWallet;
use serde_json::Value as Json;

#[test]
fn a_lock_opens_once_when_its_payment_confirms() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pay_to = Address::p2wsh(&ScriptBuf::from(vec![0x61, 0x87]), Network::Regtest);
    std::fs::create_dir_all(d.join("gateway")).unwrap();
    std::fs::write(
        d.join("gateway/rules.toml"),
        format!(
            "[[rule]]\nid = \"rental\"\ndevice = \"lock-7\"\ntrigger = {{ kind = \"payment\", address = \"{pay_to}\", min_sat = 20000, confirmations = 1 }}\naction = {{ command = \"unlock\" }}\nrevert = {{ command = \"lock\" }}\nttl_secs = 600\n"
        ),
    )
    .unwrap();
    let u = up(d, &["--block-interval", "1"]);
    let (http, mqtt) = (u.http.clone(), u.mqtt.clone());

    // The lock, online before anyone pays.
    let lock = bitmote(d)
        .args(["device", "actuator", "--name", "lock-7", "--mqtt", &mqtt, "--count", "1", "--state"])
        .arg(d.join("lock-7.json"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();

    // The lock reports itself online (its MQTT presence, with a last will for going offline).
    wait_presence(&http, "lock-7", "online");

    // A customer pays from their own wallet on the same chain.
    let node = RegtestNode::attach(&d.join("bitcoind")).unwrap().expect("up's node is running");
    let c = node.client();
    let mut w = GatewayWallet::open(&d.join("customer-wallet"), c).unwrap();
    let a = w.new_address().unwrap();
    c.mine(1, &a).unwrap();
    c.mine(100, &op_true_address()).unwrap();
    w.sync(c).unwrap();
    let tx = w.pay(&pay_to, Amount::from_sat(25_000), FeeRate::from_sat_per_vb_u32(2)).unwrap();
    c.broadcast(&tx).unwrap();
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
    assert!(event.starts_with(&format!("rental:{}:", tx.compute_txid())));

    // The action log shows it acknowledged, exactly once.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log: Json = ureq::get(&format!("{http}/v1/actions")).call().unwrap().into_json().unwrap();
        let actions = log["actions"].as_array().unwrap();
        assert_eq!(actions.len(), 1, "{log}");
        if actions[0]["state"] == "acked" {
            assert_eq!(actions[0]["device"], "lock-7");
            assert_eq!(actions[0]["attempts"], 1);
            break;
        }
        assert!(Instant::now() < deadline, "no acknowledgement recorded: {log}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The lock process is gone: its last will marks it offline.
    wait_presence(&http, "lock-7", "offline");
    // A restarted lock with the same state does not act again on a redelivery.
    let state: Json = serde_json::from_slice(&std::fs::read(d.join("lock-7.json")).unwrap()).unwrap();
    assert_eq!(state["done"].as_array().unwrap().len(), 1);
    assert_eq!(state["output"], "open");

    assert!(u.interrupt().success());
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
