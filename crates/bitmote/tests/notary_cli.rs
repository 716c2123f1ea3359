//! The notary from the command line, as an operator and a device would use it:
//! `bitmote up` (real bitcoind, gateway, MQTT broker), device keys and enrolment,
//! simulated sensors over MQTT and HTTP, proofs and offline verification, and a
//! `kill -9` of the gateway under load that loses no acknowledged reading.

use std::path::Path;
use std::process::Output;

mod common;
use common::{bitmote, up, Up};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bitmote_device::reading::{sensor, unit};
use bitmote_device::{Reading, SignedReading, SigningKey, Value};
use serde_json::Value as Json;

fn run(data_dir: &Path, gw: &str, args: &[&str]) -> Output {
    let out = bitmote(data_dir).env("BITMOTE_GATEWAY_URL", gw).args(args).output().unwrap();
    eprintln!("bitmote {args:?}: {}\n{}{}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    out
}

fn stop(up: Up) {
    assert!(up.interrupt().success());
}

fn wait_confirmed(gw: &str, tree_size: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v: Json = ureq::get(&format!("{gw}/v1/anchors")).call().unwrap().into_json().unwrap();
        let ok = v["anchors"].as_array().unwrap().iter().any(|a| a["state"] == "confirmed" && a["tree_size"].as_u64() >= Some(tree_size));
        if ok {
            return;
        }
        assert!(Instant::now() < deadline, "no confirmed anchor covering {tree_size} readings: {v}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn sensors_publish_and_anyone_verifies_their_readings_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let u = up(d, &["--block-interval", "1"]);
    let gw = u.http.clone();
    let key_a = d.join("a.key");
    let key_b = d.join("b.key");
    assert!(run(d, &gw, &["device", "keygen", "--out", key_a.to_str().unwrap()]).status.success());
    assert!(run(d, &gw, &["device", "keygen", "--p256", "--out", key_b.to_str().unwrap()]).status.success());
    // A sensor that is not enrolled is refused with a reason.
    let refused =
        run(d, &gw, &["device", "sensor", "--key", key_a.to_str().unwrap(), "--transport", "http", "--count", "1", "--interval-ms", "0"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not enrolled"));
    for (k, n) in [(&key_a, "thermo-a"), (&key_b, "thermo-b")] {
        assert!(run(d, &gw, &["device", "enroll", "--key", k.to_str().unwrap(), "--name", n]).status.success());
        // The device's MQTT password is written beside its key, for its owner only.
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(k.with_extension("mqtt")).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
    }
    let a = run(
        d,
        &gw,
        &[
            "device",
            "sensor",
            "--key",
            key_a.to_str().unwrap(),
            "--transport",
            "mqtt",
            "--mqtt",
            &u.mqtt,
            "--count",
            "5",
            "--interval-ms",
            "0",
        ],
    );
    assert!(a.status.success());
    let b = run(
        d,
        &gw,
        &[
            "device",
            "sensor",
            "--key",
            key_b.to_str().unwrap(),
            "--transport",
            "http",
            "--batch",
            "4",
            "--count",
            "8",
            "--interval-ms",
            "0",
        ],
    );
    assert!(b.status.success());
    let last: Json = serde_json::from_str(String::from_utf8_lossy(&b.stdout).lines().last().unwrap()).unwrap();
    let id = last["reading_id"].as_str().unwrap().to_string();
    assert_eq!(last["seq"], 8);
    let list = run(d, &gw, &["device", "list"]);
    assert!(String::from_utf8_lossy(&list.stdout).contains("thermo-b"));

    wait_confirmed(&gw, 13);
    let bundle = d.join("proof.json");
    let ots = d.join("reading.ots");
    let file = d.join("reading.bin");
    let p = run(
        d,
        &gw,
        &["proof", &id, "--out", bundle.to_str().unwrap(), "--ots", ots.to_str().unwrap(), "--reading", file.to_str().unwrap()],
    );
    assert!(p.status.success());
    let v = run(d, &gw, &["verify", bundle.to_str().unwrap(), "--reading", file.to_str().unwrap()]);
    assert!(v.status.success());
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("OK: reading"));
    let v = run(d, &gw, &["verify", ots.to_str().unwrap(), "--reading", file.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&v.stdout).contains("OK: Bitcoin block"));
    // A tampered reading file: a clear failure naming the step.
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[50] ^= 1;
    std::fs::write(&file, bytes).unwrap();
    let v = run(d, &gw, &["verify", bundle.to_str().unwrap(), "--reading", file.to_str().unwrap()]);
    assert!(!v.status.success());
    assert!(String::from_utf8_lossy(&v.stderr).contains("verification failed at matching the reading"));
    // Revoke a device: its new readings are refused.
    let b_id = SigningKeyFile::id(&key_b);
    assert!(run(d, &gw, &["device", "revoke", &b_id, "--reason", "stolen"]).status.success());
    let after =
        run(d, &gw, &["device", "sensor", "--key", key_b.to_str().unwrap(), "--transport", "http", "--count", "1", "--interval-ms", "0"]);
    assert!(String::from_utf8_lossy(&after.stderr).contains("revoked"));
    stop(u);
    run(d, &gw, &["node", "stop"]);
}

/// Reads a key file written by `bitmote device keygen` to find its device id.
struct SigningKeyFile;
impl SigningKeyFile {
    fn id(p: &Path) -> String {
        let text = std::fs::read_to_string(p).unwrap();
        let (kind, hex) = text.trim().split_once(':').unwrap();
        let s: [u8; 32] = hex::decode(hex).unwrap().try_into().unwrap();
        let k = if kind == "p256" { SigningKey::p256_from_secret(&s) } else { SigningKey::schnorr_from_secret(&s) }.unwrap();
        k.public_key().device_id().to_string()
    }
}

#[test]
fn kill_9_under_load_loses_no_acknowledged_reading() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let u = up(d, &["--block-interval", "1"]);
    let gw = u.http.clone();
    let token = std::fs::read_to_string(d.join("gateway/admin.token")).unwrap();
    let keys: Vec<SigningKey> = (1..=4u8).map(|i| SigningKey::schnorr_from_secret(&[40 + i; 32]).unwrap()).collect();
    for k in &keys {
        ureq::post(&format!("{gw}/v1/devices"))
            .set("Authorization", &format!("Bearer {}", token.trim()))
            .send_json(serde_json::json!({ "public_key": k.public_key().to_string() }))
            .unwrap();
    }
    // Four devices post as fast as they can; every acknowledged id is remembered.
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop_flag = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = keys
        .into_iter()
        .map(|k| {
            let (acked, stop_flag, gw) = (acked.clone(), stop_flag.clone(), gw.clone());
            std::thread::spawn(move || {
                let mut seq = 1;
                while !stop_flag.load(Ordering::SeqCst) {
                    let r = Reading {
                        device: k.public_key().device_id(),
                        seq,
                        timestamp_ms: bitmote_chain::now_ms(),
                        sensor: sensor::POWER,
                        unit: unit::WATT,
                        value: Value::Scaled { mantissa: seq as i64, exponent: 0 },
                    };
                    let body = SignedReading::sign(&k, r).unwrap().encode();
                    match ureq::post(&format!("{gw}/v1/readings")).set("Content-Type", "application/octet-stream").send_bytes(&body) {
                        Ok(resp) => {
                            let v: Json = resp.into_json().unwrap();
                            acked.lock().unwrap().push(v["receipts"][0]["reading_id"].as_str().unwrap().to_string());
                            seq += 1;
                        }
                        Err(_) => break, // the gateway died mid-request: not acknowledged
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let mut u = u;
    // SAFETY: SIGKILL to our own child: a crash, no cleanup.
    unsafe { libc::kill(u.child.id() as i32, libc::SIGKILL) };
    u.child.wait().unwrap();
    drop(u);
    stop_flag.store(true, Ordering::SeqCst);
    for w in workers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 50, "load was applied: {} readings acknowledged", acked.len());

    // Restart on the same data: every acknowledged reading is there and provable.
    let u = up(d, &["--block-interval", "1"]);
    let gw = u.http.clone();
    let log: Json = ureq::get(&format!("{gw}/v1/log")).call().unwrap().into_json().unwrap();
    assert!(log["tree_size"].as_u64().unwrap() >= acked.len() as u64);
    wait_confirmed(&gw, log["tree_size"].as_u64().unwrap());
    for id in &acked {
        let b: bitmote_notary::proof::ProofBundle = ureq::get(&format!("{gw}/v1/readings/{id}/proof"))
            .call()
            .unwrap_or_else(|e| panic!("acked reading {id} lost: {e}"))
            .into_json()
            .unwrap();
        assert!(!b.is_pending());
    }
    eprintln!("{} acknowledged readings survived kill -9, all provable", acked.len());
    stop(u);
    run(d, &gw, &["node", "stop"]);
}
