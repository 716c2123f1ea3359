//! The dashboard in a real browser: Debian's Chromium, driven by playwright-core
//! (`tests/browser/dashboard.mjs`), against a real gateway on regtest — live numbers, a
//! confirmed anchor, proof and `.ots` downloads through the page, the verifier run from it.
//! Installs what it needs when missing: Chromium and Node.js with apt-get (as root), and
//! playwright-core with `npm ci`.

mod common;
use common::browser::prerequisites;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bitmote_chain::now_ms;
use bitmote_device::reading::{sensor, unit};
use bitmote_device::{Reading, SignedReading, SigningKey, Value};
use bitmote_gateway::{Gateway, GatewayConfig};
use bitmote_notary::anchor::AnchorConfig;
use bitmote_notary::ots::DetachedTimestampFile;
use bitmote_notary::proof::ProofBundle;
use bitmote_notary::verify::{verify_bundle, verify_ots, Policy};
use bitmote_regtest::provision::{ensure_bitcoind, InstallOptions, LogProgress};
use bitmote_regtest::{RegtestNode, RegtestOptions};
use serde_json::{json, Value as Json};

/// A stand-in for a Lightning meter and its provider (`/meter`, `/provider`): real HTTP,
/// their `/v1/status` shapes, one session paying a little more on every request.
fn pay_stand_in() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for (n, conn) in listener.incoming().enumerate() {
            let Ok(mut c) = conn else { continue };
            let mut req = [0u8; 1024];
            let len = c.read(&mut req).unwrap_or(0);
            let role = if req[..len].starts_with(b"GET /provider/") { "provider" } else { "meter" };
            let n = n as u64;
            let session = json!({
                "id": "5e55", "tariff": { "price_msat_per_wh": 200, "tick_ms": 2000, "mode": "prepaid" }, "state": "open", "supply": true,
                "account": { "ticks": n, "register_mwh": n * 1500, "paid_msat": n * 700 },
                "energy_wh": n as f64 * 1.5, "due_msat": n * 300, "credit_msat": 400, "late": 0, "short": 0, "refused_msat": 0,
            });
            let node = json!({ "node_id": format!("02{role}"), "onchain_sat": 90000, "lightning_sat": 40000, "channels": [{}] });
            let body =
                json!({ "role": role, "power_w": 1000 + n % 5 * 100, "register_mwh": n * 1500, "node": node, "sessions": [session] });
            let body = body.to_string();
            let head =
                format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = c.write_all((head + &body).as_bytes());
        }
    });
    format!("http://{addr}")
}

fn get(url: &str) -> ureq::Response {
    ureq::get(url).call().unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

#[test]
fn the_dashboard_shows_live_numbers_and_verifies_a_proof_in_chromium() {
    let browser_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    prerequisites(&browser_dir);
    let exe = ensure_bitcoind(&InstallOptions::default(), &mut LogProgress::new()).unwrap().bitcoind;
    let node = RegtestNode::start(RegtestOptions::new(exe)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = GatewayConfig::new(dir.path());
    cfg.http_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.mqtt_listen = None;
    cfg.anchor = AnchorConfig { interval: Duration::ZERO, ..Default::default() };
    cfg.anchor_poll = Duration::from_millis(100);
    let pay = pay_stand_in();
    let closed = format!("http://{}", TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap());
    cfg.pay_status_urls = vec![format!("{pay}/meter"), format!("{pay}/provider"), closed.clone()];
    // Coins for the gateway's wallets come from mining (libraries never mine themselves).
    cfg.faucet = Some(bitmote_regtest::RegtestFaucet::shared(node.client()).unwrap());
    let gw = Gateway::start(cfg, node.client().fresh().unwrap()).unwrap();
    let base = format!("http://{}", gw.http_addr);
    let key = SigningKey::schnorr_from_secret(&[41; 32]).unwrap();
    gw.shared().ingest.enroll(&key.public_key(), Some("thermo-1")).unwrap();
    // Submits readings over HTTP; the id of the last one.
    let submit = |seqs: std::ops::Range<u64>| {
        let mut last = String::new();
        for seq in seqs {
            let reading = Reading {
                device: key.public_key().device_id(),
                seq,
                timestamp_ms: now_ms(),
                sensor: sensor::TEMPERATURE,
                unit: unit::CELSIUS,
                value: Value::Scaled { mantissa: 215 + seq as i64, exponent: -1 },
            };
            let body = SignedReading::sign(&key, reading).unwrap().encode();
            let r = ureq::post(&format!("{base}/v1/readings")).set("Content-Type", "application/octet-stream").send_bytes(&body);
            let receipt: Json = r.unwrap_or_else(|e| panic!("{e}")).into_json().unwrap();
            last = receipt["receipts"][0]["reading_id"].as_str().unwrap().to_string();
        }
        last
    };

    // Readings, anchored and confirmed (the regtest wallet funds itself; we mine).
    submit(1..6);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v: Json = get(&format!("{base}/v1/anchors")).into_json().unwrap();
        let anchors = v["anchors"].as_array().unwrap();
        if anchors.iter().any(|a| a["state"] == "confirmed") {
            break;
        }
        if anchors.iter().any(|a| a["state"] == "pending") {
            node.mine(1).unwrap();
        }
        assert!(Instant::now() < deadline, "no confirmed anchor: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // The browser: it loads the page, we submit more readings, it watches them arrive.
    let downloads = tempfile::tempdir().unwrap();
    let mut child = Command::new("node")
        .arg(browser_dir.join("dashboard.mjs"))
        .arg(&base)
        .arg(downloads.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("node runs");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines().map_while(Result::ok);
    let first = lines.next().unwrap_or_default();
    assert_eq!(first, "loaded 5", "the page shows the log size");
    let newest = submit(6..11);
    writeln!(child.stdin.as_mut().unwrap(), "submitted").unwrap();
    let out: Vec<String> = lines.collect();
    let status = child.wait().unwrap();
    let out = out.join("\n");
    println!("{out}");
    assert!(status.success(), "the browser script failed: {out}");
    let live: u64 = out.split_once("live ").and_then(|(_, r)| r.split(' ').next()?.parse().ok()).expect("a live count");
    assert!(live > 5, "{out}");
    assert!(out.contains("lightning: meter 5e55"), "{out}");
    assert!(out.contains(&format!("lightning error: {closed}")), "{out}");
    for seen in ["verify: verified", "the device signature: ok", "the signed checkpoint: ok", "the block on the chain: ok", ".ots file: ok"]
    {
        assert!(out.contains(seen), "the page does not show {seen:?}: {out}");
    }

    // What the page's links downloaded are real proofs.
    let bundle: ProofBundle = serde_json::from_slice(&std::fs::read(downloads.path().join("proof.json")).unwrap()).unwrap();
    let v = verify_bundle(&bundle, node.client(), &Policy::default()).unwrap();
    assert_eq!(v.device, key.public_key().device_id().to_string());
    let ots = DetachedTimestampFile::deserialize(&std::fs::read(downloads.path().join("reading.ots")).unwrap()).unwrap();
    assert_eq!(verify_ots(&bundle.reading_bytes().unwrap(), &ots, node.client()).unwrap().0, v.block_height);

    // The verifier on a reading no confirmed anchor covers yet (nothing mines now): pending,
    // at the anchor step, after every earlier step held; unknown and malformed ids are refused.
    let verify = |id: &str| match ureq::post(&format!("{base}/v1/readings/{id}/verify")).call() {
        Ok(r) => (r.status(), r.into_json::<Json>().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap()),
        Err(e) => panic!("{e}"),
    };
    let (code, v) = verify(&newest);
    assert_eq!((code, &v["result"]), (200, &json!("pending")), "{v}");
    let results: Vec<&str> = v["steps"].as_array().unwrap().iter().map(|s| s["result"].as_str().unwrap()).collect();
    assert_eq!(results, ["ok", "ok", "ok", "ok", "ok", "ok", "pending", "not_run", "not_run", "not_run"], "{v}");
    assert_eq!(v["ots"]["result"], "pending", "{v}");
    assert_eq!(verify(&"00".repeat(32)).0, 404);
    assert_eq!(verify("xyz").0, 400);

    // The same gateway's metrics.
    let metrics = get(&format!("{base}/metrics")).into_string().unwrap();
    for line in ["bitmote_log_size 10", "bitmote_readings_ingested_total 10", "bitmote_devices 1"] {
        assert!(metrics.lines().any(|l| l == line), "no {line:?} in\n{metrics}");
    }
    assert!(metrics.contains("bitmote_http_requests_total{code=\"200\"}"), "{metrics}");
    gw.shutdown();
}
