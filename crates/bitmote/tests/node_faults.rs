//! `bitmote up` when its Bitcoin node fails, as operators and crashes make it fail, on a
//! real regtest bitcoind (issue 16, failures 3 and 4, invariant I5):
//! * the node stopped with SIGTERM (an upgrade): `up` stays, starts the node again on the
//!   same data and ports, ingest acknowledges meanwhile (proofs say pending), and anchoring
//!   resumes without a restart;
//! * Ctrl-C of `up` whose stdout and stderr are a closed pipe (`| tee` ended by the same
//!   Ctrl-C): a clean exit, bitcoind shut down cleanly ("Shutdown done" in its log), no block lost,
//!   and the next `up` starts;
//! * a node that comes back without its last blocks (its data as it was earlier, which is
//!   what a crash before flushing leaves): `up` starts, follows it back to the fork point,
//!   re-anchors what those blocks had confirmed, and every reading is provable again.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::{Duration, Instant};

use bitmote_device::SigningKey;
use serde_json::Value as Json;

mod common;
use common::{bitmote, up, up_with};

fn get(url: &str) -> Json {
    ureq::get(url).call().unwrap_or_else(|e| panic!("GET {url}: {e}")).into_json().unwrap()
}

fn enroll(data_dir: &Path, gw: &str, k: &SigningKey) {
    let token = std::fs::read_to_string(data_dir.join("gateway/admin.token")).unwrap();
    ureq::post(&format!("{gw}/v1/devices"))
        .set("Authorization", &format!("Bearer {}", token.trim()))
        .send_json(serde_json::json!({ "public_key": k.public_key().to_string() }))
        .unwrap();
}

/// Post reading `seq` of `k`: the receipt's reading id (panics unless acknowledged).
fn post(gw: &str, k: &SigningKey, seq: u64) -> String {
    common::post_temperature(gw, k, seq).unwrap_or_else(|(code, body)| panic!("reading {seq} not acknowledged: {code} {body}"))
}

fn proof(gw: &str, id: &str) -> bitmote_notary::proof::ProofBundle {
    ureq::get(&format!("{gw}/v1/readings/{id}/proof")).call().unwrap_or_else(|e| panic!("proof of {id}: {e}")).into_json().unwrap()
}

/// The gateway's own verification of a reading against its node: "verified", "pending", "failed".
fn verified(gw: &str, id: &str) -> String {
    let v: Json = ureq::post(&format!("{gw}/v1/readings/{id}/verify")).call().map(|r| r.into_json().unwrap()).unwrap_or(Json::Null);
    v["result"].as_str().unwrap_or("").to_string()
}

/// Wait (bounded; the deadline only guards against a hang) for `f`, calling `between` meanwhile.
fn eventually(what: &str, mut f: impl FnMut() -> bool, mut between: impl FnMut()) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !f() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        between();
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn confirmed_covering(gw: &str, size: u64) -> Option<Json> {
    get(&format!("{gw}/v1/anchors"))["anchors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["state"] == "confirmed" && a["tree_size"].as_u64() >= Some(size))
        .cloned()
}

fn node_dir(d: &Path) -> std::path::PathBuf {
    d.join("bitcoind")
}

fn node_pid(d: &Path) -> Option<i32> {
    std::fs::read_to_string(node_dir(d).join("regtest/bitcoind.pid")).ok()?.trim().parse().ok()
}

/// Alive and not a zombie.
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

fn rpc_port(d: &Path) -> u16 {
    let rec: Json = serde_json::from_slice(&std::fs::read(node_dir(d).join("bitmote-node.json")).unwrap()).unwrap();
    rec["rpc_port"].as_u64().unwrap() as u16
}

fn height(d: &Path) -> u64 {
    let out = bitmote(d).args(["node", "status", "--json"]).output().unwrap();
    serde_json::from_slice::<Json>(&out.stdout).unwrap()["blocks"].as_u64().unwrap()
}

/// Whether bitcoind's log says it finished a clean shutdown ("Shutdown: done" in older
/// Bitcoin Core versions, "Shutdown done" in newer ones).
fn clean_shutdown(log: &str) -> bool {
    log.contains("Shutdown: done") || log.contains("Shutdown done")
}

/// What bitcoind logged since it last started.
fn last_session_log(d: &Path) -> String {
    let log = std::fs::read_to_string(node_dir(d).join("regtest/debug.log")).unwrap();
    let start = log.rfind("Bitcoin Core version").unwrap_or(0);
    log[start..].to_string()
}

#[test]
fn sigterm_of_the_node_does_not_stop_up_which_restarts_it_and_anchoring_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut u = up(d, &["--block-interval", "1"]);
    let gw = u.http.clone();
    let k = SigningKey::schnorr_from_secret(&[61; 32]).unwrap();
    enroll(d, &gw, &k);
    let first = post(&gw, &k, 1);
    eventually("the first reading anchored", || confirmed_covering(&gw, 1).is_some(), || {});

    // SIGTERM, as an operator stopping bitcoind for an upgrade.
    let pid = node_pid(d).unwrap();
    // SAFETY: a signal to the bitcoind that `up` started for this test.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    eventually("bitcoind exits on SIGTERM", || !alive(pid), || {});
    // Hold its RPC port, so the node `up` starts again (after 2 s) cannot serve RPC for as
    // long as the test wants the outage to last.
    let hold = std::net::TcpListener::bind(("127.0.0.1", rpc_port(d))).unwrap();
    let down_since = Instant::now();

    // Meanwhile: `up` runs, readings are acknowledged, their proofs say pending, and the
    // node is reported as down.
    let during = post(&gw, &k, 2);
    assert!(proof(&gw, &during).is_pending());
    eventually(
        "the gateway reports the node unreachable",
        || get(&format!("{gw}/v1/anchors"))["node"].as_str().unwrap_or("").starts_with("unreachable"),
        || {},
    );
    let st = bitmote(d).args(["status", "--json"]).output().unwrap();
    let st: Json = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(st["bitcoind"]["ok"], false, "{st:#}");
    assert_eq!(st["up"]["running"], true, "{st:#}");
    while down_since.elapsed() < Duration::from_secs(6) {
        assert!(u.child.try_wait().unwrap().is_none(), "bitmote up exited while its node was down");
        std::thread::sleep(Duration::from_millis(200));
    }
    let also_during = post(&gw, &k, 3);
    drop(hold);

    // The node comes back (started by `up`, same data dir and ports) and anchoring resumes.
    eventually("up starts bitcoind again", || node_pid(d).is_some_and(|p| p != pid && alive(p)), || {});
    eventually("the readings of the outage anchored", || confirmed_covering(&gw, 3).is_some(), || {});
    eventually("the gateway sees the node again", || get(&format!("{gw}/v1/anchors"))["node"] == "ok", || {});
    for id in [&first, &during, &also_during] {
        eventually(&format!("reading {id} verified against the chain"), || verified(&gw, id) == "verified", || {});
    }
    assert!(u.child.try_wait().unwrap().is_none(), "bitmote up kept running");
    assert!(u.interrupt().success());
    assert!(clean_shutdown(&last_session_log(d)), "the restarted node was stopped cleanly too");
}

#[test]
fn ctrl_c_of_up_with_its_output_closed_stops_the_node_cleanly_and_up_starts_again() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // `bitmote up 2>&1 | tee up.log`: both outputs into one pipe whose reader we close.
    let (reader, writer) = std::io::pipe().unwrap();
    let mut c = bitmote(d);
    c.env("RUST_LOG", "info").args(["up", "--block-interval", "1"]);
    c.stdout(writer.try_clone().unwrap()).stderr(writer);
    let mut child = c.spawn().unwrap();
    drop(c); // our copies of the write end
    let mut lines = BufReader::new(reader);
    loop {
        let mut l = String::new();
        assert!(lines.read_line(&mut l).unwrap() > 0, "up exited before it was ready");
        if l.starts_with("ready") {
            break;
        }
    }
    drop(lines); // `tee` is gone: every later write of `up` fails with EPIPE
                 // It keeps running (it logs a line per block, each one failing to be written).
    std::thread::sleep(Duration::from_secs(3));
    assert!(child.try_wait().unwrap().is_none(), "up died of its closed output");
    let before = height(d);

    // SAFETY: SIGINT to our own child, as Ctrl-C would send.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "up did not stop within 60 s of Ctrl-C");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "a clean exit: {status}");
    let log = last_session_log(d);
    assert!(clean_shutdown(&log), "bitcoind shut down cleanly: {}", &log[log.len().saturating_sub(2000)..]);

    // The next `up` starts on the same data, with every block it had.
    let u = up(d, &["--block-interval", "0"]);
    assert!(height(d) >= before, "no block lost");
    assert!(u.interrupt().success());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let t = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), &t).unwrap();
        }
    }
}

#[test]
fn a_node_back_without_its_last_blocks_is_a_reorg_up_follows_and_re_anchors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mine = || {
        let _ = bitmote(d).args(["node", "mine", "1"]).output();
    };
    // 1. A first session: a reading anchored and final.
    let u = up(d, &["--block-interval", "0"]);
    let gw = u.http.clone();
    let k = SigningKey::schnorr_from_secret(&[62; 32]).unwrap();
    enroll(d, &gw, &k);
    let r1 = post(&gw, &k, 1);
    eventually("reading 1 anchored", || confirmed_covering(&gw, 1).is_some_and(|a| a["confirmations"].as_u64() >= Some(4)), mine);
    assert!(u.interrupt().success());
    // The node's data as it is now: what it will come back with.
    copy_dir(&node_dir(d), &d.join("older"));
    let old_tip = {
        let u = up(d, &["--block-interval", "0"]);
        let h = height(d);
        // 2. A second session: two more readings anchored in blocks the node will lose.
        let gw = u.http.clone();
        let r2 = post(&gw, &k, 2);
        let r3 = post(&gw, &k, 3);
        eventually(
            "readings 2 and 3 anchored and final",
            || confirmed_covering(&gw, 3).is_some_and(|a| a["confirmations"].as_u64() >= Some(4)),
            mine,
        );
        let lost = confirmed_covering(&gw, 3).unwrap();
        assert!(lost["block_height"].as_u64().unwrap() > h);
        assert_eq!(verified(&gw, &r2), "verified");
        assert!(u.interrupt().success());
        (h, lost, r2, r3)
    };
    let (fork, lost, r2, r3) = old_tip;
    // 3. The node comes back without those blocks.
    std::fs::remove_dir_all(node_dir(d)).unwrap();
    std::fs::rename(d.join("older"), node_dir(d)).unwrap();

    let log = d.join("up3.log");
    let mut c = bitmote(d);
    c.args(["up", "--block-interval", "0"]).stderr(std::fs::File::create(&log).unwrap());
    let u = up_with(c);
    let gw = u.http.clone();
    assert_eq!(height(d), fork, "the node is back at the older tip");
    // The node's new blocks replace the lost ones: the anchor they confirmed is broadcast
    // again and confirms in the new branch; every reading is provable against the chain.
    eventually(
        "readings 2 and 3 anchored again in the node's chain",
        || confirmed_covering(&gw, 3).is_some_and(|a| a["block_hash"] != lost["block_hash"] && a["confirmations"].as_u64() >= Some(1)),
        mine,
    );
    for id in [&r1, &r2, &r3] {
        eventually(&format!("reading {id} verified"), || verified(&gw, id) == "verified", mine);
    }
    let again = confirmed_covering(&gw, 3).unwrap();
    assert!(again["block_height"].as_u64().unwrap() > fork, "{again}");
    // More readings are anchored as usual afterwards.
    let r4 = post(&gw, &k, 4);
    eventually("reading 4 anchored", || confirmed_covering(&gw, 4).is_some(), mine);
    assert_eq!(verified(&gw, &r4), "verified");
    assert!(u.interrupt().success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("no longer knows a delivered block"), "the lost blocks were disconnected: {text}");
    assert!(!text.contains("unknown to this node"), "{text}");
    assert!(!text.contains("panicked"), "{text}");
}
