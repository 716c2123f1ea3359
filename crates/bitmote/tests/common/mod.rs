//! Shared by the command-line tests: run `bitmote` on a private data directory with
//! free ports, and start `bitmote up` until it says it is ready.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// `bitmote` on `data_dir`, gateway on free loopback ports, anchors at most every second,
/// no simulated fleet (`up_e2e.rs` runs the whole system).
pub fn bitmote(data_dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bitmote"));
    c.env("BITMOTE_DATA_DIR", data_dir)
        .env_remove("BITMOTE_CONFIG")
        .env("RUST_LOG", "warn")
        .env("BITMOTE_GATEWAY_HTTP_LISTEN", "127.0.0.1:0")
        .env("BITMOTE_GATEWAY_MQTT_LISTEN", "127.0.0.1:0")
        .env("BITMOTE_NOTARY_ANCHOR_INTERVAL_SECS", "1")
        .env("BITMOTE_FLEET_ENABLED", "false");
    c
}

/// A running `bitmote up`, with what it printed until "ready".
pub struct Up {
    pub child: Child,
    pub lines: Vec<String>,
    /// `http://host:port`
    pub http: String,
    /// `host:port`
    pub mqtt: String,
}

/// Start `bitmote up` with `args` and wait until it is ready.
pub fn up(data_dir: &Path, args: &[&str]) -> Up {
    let mut c = bitmote(data_dir);
    c.arg("up").args(args);
    up_with(c)
}

/// Start `cmd` (a `bitmote up`) and wait until it is ready.
pub fn up_with(mut cmd: Command) -> Up {
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let (mut lines, mut http, mut mqtt) = (vec![], String::new(), String::new());
    loop {
        let mut l = String::new();
        assert!(out.read_line(&mut l).unwrap() > 0, "bitmote up exited before it was ready: {lines:?}");
        let t = l.trim().to_string();
        if let Some(rest) = t.strip_prefix("http api : ") {
            http = rest.split_whitespace().next().unwrap().to_string();
        }
        if let Some(rest) = t.strip_prefix("mqtt     : mqtt://") {
            mqtt = rest.split_whitespace().next().unwrap().to_string();
        }
        lines.push(t);
        if l.starts_with("ready") {
            break;
        }
    }
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in out.lines() {});
    Up { child, lines, http, mqtt }
}

impl Up {
    /// Ctrl-C, and wait for a clean exit.
    pub fn interrupt(mut self) -> std::process::ExitStatus {
        // SAFETY: SIGINT to our own child, as Ctrl-C would send.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(std::time::Instant::now() < deadline, "bitmote up did not stop within 60 s of Ctrl-C");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for Up {
    /// Never leave a `bitmote up` (and its node) behind when a test fails.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: SIGINT to our own child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
            let _ = self.child.wait();
        }
    }
}

/// Post signed temperature reading `seq` of `k` (20.0 °C + seq / 10) to the gateway at
/// `gw`: `Ok(reading id)` when acknowledged, `Err((status, body))` when refused; a
/// transport error panics.
pub fn post_temperature(gw: &str, k: &bitmote_device::SigningKey, seq: u64) -> Result<String, (u16, serde_json::Value)> {
    use bitmote_device::reading::{sensor, unit};
    use bitmote_device::{Reading, SignedReading, Value};
    let r = Reading {
        device: k.public_key().device_id(),
        seq,
        timestamp_ms: bitmote_chain::now_ms(),
        sensor: sensor::TEMPERATURE,
        unit: unit::CELSIUS,
        value: Value::Scaled { mantissa: 200 + seq as i64, exponent: -1 },
    };
    let body = SignedReading::sign(k, r).unwrap().encode();
    match ureq::post(&format!("{gw}/v1/readings")).set("Content-Type", "application/octet-stream").send_bytes(&body) {
        Ok(resp) => {
            let v: serde_json::Value = resp.into_json().unwrap();
            Ok(v["receipts"][0]["reading_id"].as_str().unwrap().to_string())
        }
        Err(ureq::Error::Status(code, resp)) => Err((code, resp.into_json().unwrap_or(serde_json::Value::Null))),
        Err(e) => panic!("reading {seq}: {e}"),
    }
}
