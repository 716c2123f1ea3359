//! The `bitmote` binary end to end, as a user runs it, against a real regtest bitcoind.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

mod common;
use common::{bitmote, up};

fn run(data_dir: &Path, args: &[&str]) -> Output {
    let out = bitmote(data_dir).args(args).output().unwrap();
    eprintln!("bitmote {args:?}: {}\n{}{}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    out
}

fn status(data_dir: &Path) -> (i32, serde_json::Value) {
    let out = run(data_dir, &["node", "status", "--json"]);
    (out.status.code().unwrap_or(-1), serde_json::from_slice(&out.stdout).unwrap())
}

#[test]
fn up_runs_a_regtest_node_mines_and_stops_cleanly_on_ctrl_c_then_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let u = up(dir.path(), &["--block-interval", "1"]);
    let lines = u.lines.clone();
    assert!(lines.iter().any(|l| l.contains("bitcoind") && l.contains("regtest")), "{lines:?}");
    // A second `up` on the same data dir is refused while the first runs.
    let second = run(dir.path(), &["up"]);
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("already running"));
    // The node answers other commands, has a mature chain, and grows on schedule.
    let (code, s1) = status(dir.path());
    assert_eq!(code, 0);
    assert_eq!(s1["network"], "regtest");
    let h1 = s1["blocks"].as_u64().unwrap();
    assert!(h1 >= 101, "{s1}");
    std::thread::sleep(Duration::from_millis(2500));
    let h2 = status(dir.path()).1["blocks"].as_u64().unwrap();
    assert!(h2 > h1, "up mines a block every second: {h1} -> {h2}");

    let exit = u.interrupt();
    assert!(exit.success(), "{exit}");
    let (code, s) = status(dir.path());
    assert_eq!(code, 3, "the node is stopped with bitmote: {s}");
    assert_eq!(s["running"], false);

    // Up again on the same data: the chain is still there.
    let u = up(dir.path(), &["--block-interval", "0"]);
    let h3 = status(dir.path()).1["blocks"].as_u64().unwrap();
    assert!(h3 >= h2, "chain kept across restarts: {h2} -> {h3}");
    assert!(u.interrupt().success());
}

#[test]
fn node_commands_and_a_resumable_chain_watch() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert!(run(d, &["node", "start"]).status.success());
    let mined = run(d, &["node", "mine", "5"]);
    assert!(String::from_utf8_lossy(&mined.stdout).contains("height 5"));
    let cursor = d.join("watch.cursor");
    let c = cursor.to_str().unwrap();
    let w = run(d, &["chain", "watch", "--from", "0", "--cursor", c, "--count", "6"]);
    let heights: Vec<u64> = String::from_utf8_lossy(&w.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .inspect(|v| assert_eq!(v["event"], "connected"))
        .map(|v| v["height"].as_u64().unwrap())
        .collect();
    assert_eq!(heights, vec![0, 1, 2, 3, 4, 5]);
    run(d, &["node", "mine", "2"]);
    let w = run(d, &["chain", "watch", "--cursor", c, "--count", "2"]);
    let heights: Vec<u64> = String::from_utf8_lossy(&w.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["height"].as_u64().unwrap())
        .collect();
    assert_eq!(heights, vec![6, 7], "resumed from the cursor");
    // Mining to a mainnet address on regtest is refused with a reason.
    let bad = run(d, &["node", "mine", "1", "--to", "bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("is not a regtest address"));
    assert!(run(d, &["node", "stop"]).status.success());
    assert_eq!(status(d).0, 3);
}

#[test]
fn a_misconfigured_node_gets_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cfg = dir.path().join("bitmote.toml");
    std::fs::write(&cfg, format!("[chain]\nrpc_url = \"http://127.0.0.1:{port}\"\nrpc_user = \"u\"\nrpc_password = \"p\"\n")).unwrap();
    let out = run(dir.path(), &["node", "status"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no Bitcoin node answers at http://127.0.0.1:"), "{err}");
    assert!(!err.contains("panicked"));

    std::fs::write(&cfg, "[chain]\nnetwork = \"signet\"\n").unwrap();
    let out = run(dir.path(), &["up"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs rpc_url"));
}

#[test]
fn help_explains_the_commands() {
    let out = Command::new(env!("CARGO_BIN_EXE_bitmote")).arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for word in ["up", "node", "chain", "bench", "--data-dir", "--config"] {
        assert!(text.contains(word), "--help mentions {word}:\n{text}");
    }
}

/// Found by `up_e2e` (a `kill -9` of `up`, whose fleet then gets SIGTERM): a sensor whose
/// gateway does not answer retried its send forever and never looked at its stop flag, so
/// it outlived `up`. Stopped now, it exits; nothing was acknowledged, so nothing is lost
/// (its sequence number is unchanged and the next start sends the same readings).
#[test]
fn a_sensor_stopped_while_its_gateway_does_not_answer_exits() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = d.join("s.key");
    std::fs::write(&key, format!("schnorr:{}", "11".repeat(32))).unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut sensor = bitmote(d)
        .env("BITMOTE_GATEWAY_URL", format!("http://{closed}"))
        .args(["device", "sensor", "--key", key.to_str().unwrap(), "--transport", "http"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(sensor.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("send failed") {
        line.clear();
        assert!(std::io::BufRead::read_line(&mut err, &mut line).unwrap() > 0, "the sensor ended before trying to send");
    }
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(sensor.id() as i32, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = sensor.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = sensor.kill();
            panic!("the sensor did not stop within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status:?}");
    assert!(!key.with_extension("seq").exists() || std::fs::read_to_string(key.with_extension("seq")).unwrap().trim() == "1");
}
