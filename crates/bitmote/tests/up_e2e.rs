//! The whole system as a newcomer runs it: the real `bitmote up` binary with its simulated
//! fleet (separate sensor, lock, relay, provider and meter processes) on free ports, its
//! dashboard checked in Debian's Chromium (playwright-core, `crates/gateway/tests/browser/up.mjs`):
//! readings anchored and confirmed, the lock opened by a paid order, a meter session
//! streaming payments. Then Ctrl-C: every process is gone; `up` again on the same data:
//! same devices, same channel, the log kept and growing.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value as Json;

mod common;
use common::{bitmote, up_with, Up};
#[path = "../../gateway/tests/common/browser.rs"]
mod browser;
use browser::prerequisites;

/// `bitmote up` with the fleet on, every port free (fleet ports picked once and kept).
fn start(data_dir: &Path) -> Up {
    start_with(data_dir, 12)
}

fn start_with(data_dir: &Path, sensors: u32) -> Up {
    let mut c = bitmote(data_dir);
    c.env("BITMOTE_FLEET_ENABLED", "true").env("BITMOTE_NOTARY_ANCHOR_INTERVAL_SECS", "2").env("BITMOTE_FLEET_SENSOR_INTERVAL_MS", "1000");
    for k in ["FLEET_PROVIDER_HTTP", "FLEET_PROVIDER_LN", "FLEET_METER_HTTP", "FLEET_METER_LN", "GATEWAY_LIGHTNING_LISTEN"] {
        c.env(format!("BITMOTE_{k}"), "127.0.0.1:0");
    }
    c.args(["up", "--block-interval", "2", "--sensors", &sensors.to_string()]);
    up_with(c)
}

fn get(url: &str) -> Json {
    ureq::get(url).call().unwrap_or_else(|e| panic!("GET {url}: {e}")).into_json().unwrap()
}

fn up_json(data_dir: &Path) -> Json {
    serde_json::from_slice(&std::fs::read(data_dir.join("up.json")).unwrap()).unwrap()
}

fn pids(up: &Json) -> Vec<(String, i32)> {
    up["fleet"].as_array().unwrap().iter().filter_map(|m| Some((m["name"].as_str()?.to_string(), m["pid"].as_i64()? as i32))).collect()
}

fn exists(pid: i32) -> bool {
    // SAFETY: signal 0 only checks whether the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

fn log_size(api: &str) -> u64 {
    get(&format!("{api}/v1/log"))["tree_size"].as_u64().unwrap()
}

/// The meter's channel ids (from its status API).
fn channels(meter: &str) -> Vec<String> {
    get(&format!("{meter}/v1/status"))["node"]["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["channel_id"].as_str().unwrap().to_string())
        .collect()
}

/// `bitmote status --json` on the data directory: exit code and report.
fn status(data_dir: &Path) -> (i32, Json) {
    let out = bitmote(data_dir).args(["status", "--json"]).output().unwrap();
    (out.status.code().unwrap_or(-1), serde_json::from_slice(&out.stdout).unwrap_or(Json::Null))
}

/// Wait (bounded) for `f` to hold; the deadline only guards against a hang.
fn eventually(what: &str, f: impl FnMut() -> bool) {
    eventually_within(what, 240, f)
}

/// [`eventually`] with a bound of its own: a first start (funding the meter, opening and
/// announcing the channels, 6 blocks for the route) takes minutes when the rest of the test
/// suite shares the machine's two cores; once it missed 240 s.
fn eventually_within(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn up_runs_the_whole_system_shows_it_in_a_browser_stops_every_process_and_resumes() {
    let browser_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../gateway/tests/browser");
    prerequisites(&browser_dir);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    let u = start(d);
    for word in ["dashboard:", "fleet    :", "sensor-12", "lock-1", "relay-1", "provider", "meter", ".log"] {
        assert!(u.lines.iter().any(|l| l.contains(word)), "up prints {word:?}: {:#?}", u.lines);
    }
    let api = u.http.clone();
    let first = up_json(d);
    let meter = first["meter_url"].as_str().unwrap().to_string();
    assert_eq!(first["fleet"].as_array().unwrap().len(), 12 + 2 + 2, "{first}");

    // The dashboard in a real browser: anchors confirmed, the lock opened by a payment,
    // the meter's payments growing.
    let shot = std::env::var("BITMOTE_SCREENSHOT").unwrap_or_default();
    let mut browser =
        Command::new("node").arg(browser_dir.join("up.mjs")).arg(&api).arg(&shot).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let seen: Vec<String> =
        BufReader::new(browser.stdout.take().unwrap()).lines().map_while(Result::ok).inspect(|l| println!("browser: {l}")).collect();
    assert!(browser.wait().unwrap().success(), "the browser did not see it all: {seen:#?}");
    let seen = seen.join("\n");
    for line in ["anchor confirmed:", "lock opened by a payment: order-", "meter streaming: paid", "routing fees", "all seen"] {
        assert!(seen.contains(line), "{line:?} not in {seen}");
    }

    // The same, from the API and from `bitmote status`.
    let devices = get(&format!("{api}/v1/devices"))["devices"].as_array().unwrap().clone();
    assert_eq!(devices.len(), 12 + 2 + 1, "one enrolment per sensor, actuator and the meter");
    let lock_state: Json = serde_json::from_slice(&std::fs::read(d.join("fleet/lock-1/state.json")).unwrap()).unwrap();
    assert!(lock_state["done"].as_array().unwrap().iter().any(|e| e.as_str().unwrap().starts_with("order-")), "{lock_state}");
    let channel = channels(&meter);
    assert_eq!(channel.len(), 1, "the meter opened one channel");
    // ... to the gateway's Lightning node, the hub it pays the provider through.
    let hub = get(&format!("{api}/v1/lightning"));
    assert_eq!(hub["enabled"], true, "{hub}");
    let m = get(&format!("{meter}/v1/status"));
    assert_eq!(m["node"]["channels"][0]["peer"], hub["node_id"], "{m}");
    // The hub's fee is 0.1 % and no base fee: at most 1 % of what the ticks paid (with
    // prepaid ticks of a few tens of msat and no cover payment, LDK rounds it down to 0).
    let paid: u64 = m["sessions"].as_array().unwrap().iter().map(|s| s["account"]["paid_msat"].as_u64().unwrap_or(0)).sum();
    let fees = m["node"]["routing_fees_paid_msat"].as_u64().unwrap();
    assert!(paid > 0 && fees * 100 <= paid, "routing fees {fees} msat for {paid} msat of ticks: {m}");
    // Each paid tick is a notary reading of the meter's enrolled key.
    eventually("tick receipts at the notary", || get(&format!("{meter}/v1/status"))["notary"]["posted"].as_u64().unwrap_or(0) > 0);
    let (code, s) = status(d);
    println!("status: {s:#}");
    assert_eq!(code, 0, "{s:#}");
    assert_eq!(s["fleet"]["alive"], 16, "{s:#}");
    assert_eq!(s["bitcoind"]["network"], "regtest");
    assert!(s["lightning"].as_array().unwrap().iter().any(|l| l["role"] == "meter" && l["session"]["state"] == "open"), "{s:#}");

    // Ctrl-C: `up` stops, and with it every process of the fleet and the node.
    let now = up_json(d);
    let children = pids(&now);
    assert_eq!(children.len(), 16, "every member runs: {now}");
    let before = log_size(&api);
    let exit = u.interrupt();
    assert!(exit.success(), "{exit}");
    for (name, pid) in &children {
        assert!(!exists(*pid), "{name} (pid {pid}) is still running after Ctrl-C");
    }
    assert_eq!(status(d).0, 3, "nothing runs");
    let node = bitmote(d).args(["node", "status", "--json"]).output().unwrap();
    assert_eq!(node.status.code(), Some(3), "bitcoind stopped too");

    // Up again: the same data, devices, keys and channel; the log goes on from where it was.
    let u = start(d);
    let api = u.http.clone();
    let after = log_size(&api);
    assert!(after >= before, "the log shrank across a restart: {before} -> {after}");
    eventually("new readings after the restart", || log_size(&api) > after);
    assert_eq!(get(&format!("{api}/v1/devices"))["devices"].as_array().unwrap().len(), 15, "no new enrolment on restart");
    let again = up_json(d);
    assert_eq!(again["meter_url"], first["meter_url"], "fleet ports are kept");
    eventually("the meter back with its channel", || ureq::get(&format!("{meter}/v1/status")).call().is_ok());
    assert_eq!(channels(&meter), channel, "the same channel after the restart");
    eventually("the meter streaming again", || {
        let Some(st) = ureq::get(&format!("{meter}/v1/status")).call().ok().and_then(|r| r.into_json::<Json>().ok()) else {
            return false; // restarting
        };
        st["sessions"].as_array().unwrap().iter().any(|s| s["state"] == "open" && s["account"]["paid_msat"].as_u64().unwrap_or(0) > 0)
    });
    let children = pids(&up_json(d));
    assert!(u.interrupt().success());
    for (name, pid) in &children {
        assert!(!exists(*pid), "{name} (pid {pid}) is still running after the second Ctrl-C");
    }

    // `up` killed with SIGKILL: its fleet goes with it (each member gets SIGTERM).
    let mut u = start(d);
    let children = pids(&up_json(d));
    assert!(children.len() >= 15, "all run (the meter once its provider answers): {children:?}");
    u.child.kill().unwrap();
    u.child.wait().unwrap();
    for (name, pid) in &children {
        eventually(&format!("{name} (pid {pid}) gone after kill -9 of up"), || !exists(*pid));
    }
    // The node is a daemon of its own then: stop it.
    assert!(bitmote(d).args(["node", "stop"]).status().unwrap().success());
}

/// The newcomer's flagship run: `bitmote up` (the meter paying its provider, prepaid,
/// through the gateway's Lightning node, where the provider's side is under its channel
/// reserve), some seconds of streaming, Ctrl-C. The meter's final statement
/// (`<data-dir>/fleet/meter/statement.json`) says reconciled: both accounts equal to
/// the millisatoshi, nothing unsettled, nothing paid for energy not delivered, every
/// tick reading notarized.
#[test]
fn up_then_ctrl_c_ends_with_the_meters_accounts_reconciled() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let u = start_with(d, 2);
    let meter = up_json(d)["meter_url"].as_str().unwrap().to_string();
    let paid_ticks = || -> u64 {
        let Some(st) = ureq::get(&format!("{meter}/v1/status")).call().ok().and_then(|r| r.into_json::<Json>().ok()) else { return 0 };
        st["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["state"] == "open")
            .filter_map(|s| s["account"]["ticks"].as_u64())
            .max()
            .unwrap_or(0)
    };
    eventually_within("the meter streaming", 480, || paid_ticks() > 0);
    let from = paid_ticks();
    // About 20 s of streaming at the 2 s tick.
    eventually("ten more ticks", || paid_ticks() >= from + 10);
    std::thread::sleep(Duration::from_millis(700)); // somewhere inside a tick
    let exit = u.interrupt();
    assert!(exit.success(), "{exit}");
    let path = d.join("fleet/meter/statement.json");
    let s: Json = serde_json::from_slice(&std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap();
    println!("final statement: {s:#}");
    assert_eq!(s["reconciled"], true, "{s:#}");
    assert_eq!(s["unsettled"], Json::Null, "{s:#}");
    assert_eq!(s["meter"], s["provider"], "{s:#}");
    assert_eq!(s["state"], "closed", "{s:#}");
    assert_eq!(s["credit_msat"], 0, "paid exactly the energy delivered: {s:#}");
    assert!(s["meter"]["ticks"].as_u64().unwrap() >= from + 10, "{s:#}");
    assert_eq!(s["notary"]["waiting"], 0, "every tick reading notarized: {s:#}");
    assert_eq!(s["provider_statement"]["session"]["state"], "closed", "{s:#}");
}
