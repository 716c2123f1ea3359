//! A rental lock that opens when its payment confirms, end to end: `bitmote up` with a
//! rules file, a simulated lock (`bitmote device actuator`) on the embedded MQTT broker,
//! a real payment on regtest, the lock's acknowledgement in the action log.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bitmote_chain::bitcoin::{Address, Amount, FeeRate, Network, ScriptBuf};
use bitmote_chain::regtest::{op_true_address, RegtestNode};
use bitmote_chain::wallet::GatewayWallet;
use serde_json::Value as Json;

fn bitmote(data_dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bitmote"));
    c.env("BITMOTE_DATA_DIR", data_dir)
        .env_remove("BITMOTE_CONFIG")
        .env("RUST_LOG", "warn")
        .env("BITMOTE_GATEWAY_HTTP_LISTEN", "127.0.0.1:0")
        .env("BITMOTE_GATEWAY_MQTT_LISTEN", "127.0.0.1:0");
    c
}

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
    let mut up = KillOnDrop(bitmote(d).args(["up", "--block-interval", "1"]).stdout(Stdio::piped()).spawn().unwrap());
    let mut out = BufReader::new(up.0.stdout.take().unwrap());
    let (mut http, mut mqtt) = (String::new(), String::new());
    loop {
        let mut l = String::new();
        assert!(out.read_line(&mut l).unwrap() > 0, "up exited early");
        if let Some(r) = l.trim().strip_prefix("http api : ") {
            http = r.split_whitespace().next().unwrap().to_string();
        }
        if let Some(r) = l.trim().strip_prefix("mqtt     : mqtt://") {
            mqtt = r.split_whitespace().next().unwrap().to_string();
        }
        if l.starts_with("ready") {
            break;
        }
    }
    std::thread::spawn(move || for _ in out.lines() {});

    // The lock, online before anyone pays.
    let lock = bitmote(d)
        .args(["device", "actuator", "--name", "lock-7", "--mqtt", &mqtt, "--count", "1", "--state"])
        .arg(d.join("lock-7.json"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();

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
    // A restarted lock with the same state does not act again on a redelivery.
    let state: Json = serde_json::from_slice(&std::fs::read(d.join("lock-7.json")).unwrap()).unwrap();
    assert_eq!(state["done"].as_array().unwrap().len(), 1);
    assert_eq!(state["output"], "open");

    // SAFETY: SIGINT to our own child, as Ctrl-C would.
    unsafe { libc::kill(up.0.id() as i32, libc::SIGINT) };
    assert!(up.0.wait().unwrap().success());
}

/// Stops `bitmote up` (and so its node) even when an assertion fails.
struct KillOnDrop(std::process::Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            // SAFETY: SIGINT to our own child.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
            let _ = self.0.wait();
        }
    }
}
