//! The gateway on a full disk (issue 16, fault "disk full"), on the real system: `bitmote up`
//! with its regtest bitcoind, the gateway's Lightning node (the hub the simulated meter pays
//! its provider through, a payment every second, so its channel monitors are written all
//! along) and the fleet, the gateway's data directory on a small tmpfs the test mounts
//! (root only: skipped with a message otherwise) and fills from outside, as a runaway
//! process would:
//! * while full, a reading is refused with HTTP 507 and a message saying the disk is full;
//! * the readings acknowledged before are all there, with their proofs;
//! * the Lightning node did not panic (nothing in `up`'s output), and went on forwarding;
//! * once the space is freed, ingest acknowledges again, without a restart;
//! * SIGTERM of `up` exits 0.

use std::io::Write;
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bitmote_device::SigningKey;
use serde_json::Value as Json;

mod common;
use common::{post_temperature as post, up_with};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn get(url: &str) -> Json {
    ureq::get(url).call().unwrap_or_else(|e| panic!("GET {url}: {e}")).into_json().unwrap()
}

fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Unmounts on drop (after `up` is gone), so a failing test leaves nothing mounted.
struct Mount(std::path::PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fill the file system at `dir` to the last byte, as the drill does.
fn fill(dir: &Path, n: usize) -> std::path::PathBuf {
    let path = dir.join(format!("filler-{n}"));
    let mut f = std::fs::File::create(&path).unwrap();
    for size in [1 << 20, 4096, 1] {
        let chunk = vec![0x5au8; size];
        let e = loop {
            if let Err(e) = f.write_all(&chunk) {
                break e;
            }
        };
        eprintln!("fill: {size}-byte writes stopped at {} bytes: {e}; {} bytes free", f.metadata().unwrap().len(), free(dir));
    }
    let _ = f.sync_all();
    path
}

fn free(dir: &Path) -> u64 {
    let out = Command::new("df").arg("-B1").arg("--output=avail").arg(dir).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().nth(1).unwrap().trim().parse().unwrap()
}

/// What the provider has been paid in all (msat), from its status.
fn provider_paid(url: &str) -> u64 {
    ureq::get(&format!("{url}/v1/status"))
        .call()
        .ok()
        .and_then(|r| r.into_json::<Json>().ok())
        .and_then(|v| v["totals"]["received_msat"].as_u64())
        .unwrap_or(0)
}

#[test]
fn a_full_disk_refuses_new_readings_keeps_the_acknowledged_ones_and_never_kills_the_gateway() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: mounting a small tmpfs for the gateway needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let gw_dir = d.join("gateway");
    std::fs::create_dir_all(&gw_dir).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=96m,mode=0700", "bitmote-test-disk"])
        .arg(&gw_dir)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIPPED: cannot mount a tmpfs at {} (no tmpfs, or not allowed here)", gw_dir.display());
        return;
    }
    let _mount = Mount(gw_dir.clone());

    // The whole system (meter paying its provider through the gateway's node), on free ports.
    let (http, mqtt, gln, ph, pl, mh, ml) = (free_port(), free_port(), free_port(), free_port(), free_port(), free_port(), free_port());
    let cfg = d.join("bitmote.toml");
    std::fs::write(
        &cfg,
        format!(
            "[chain]\nblock_interval_secs = 1\n\n\
             [gateway]\nhttp_listen = \"127.0.0.1:{http}\"\nmqtt_listen = \"127.0.0.1:{mqtt}\"\nlightning_listen = \"127.0.0.1:{gln}\"\n\n\
             [notary]\nanchor_interval_secs = 1\n\n\
             [fleet]\nsensors = 1\nsensor_interval_ms = 1000\ntick_ms = 1000\n\
             provider_http = \"127.0.0.1:{ph}\"\nprovider_ln = \"127.0.0.1:{pl}\"\nmeter_http = \"127.0.0.1:{mh}\"\nmeter_ln = \"127.0.0.1:{ml}\"\n"
        ),
    )
    .unwrap();
    let log_path = d.join("up.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_bitmote"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("BITMOTE_") {
            c.env_remove(k);
        }
    }
    c.env("RUST_LOG", "warn").arg("--data-dir").arg(d).arg("--config").arg(&cfg).arg("up").stderr(log);
    let u = up_with(c);
    let gw = u.http.clone();
    let provider = format!("http://127.0.0.1:{ph}");

    // The reserve is made: 32 MiB by default, and ingest accepts.
    eventually("the disk guard holds its whole reserve", Duration::from_secs(10), || {
        get(&format!("{gw}/v1/stats"))["disk"]["reserve_held_bytes"].as_u64() == Some(32 << 20)
    });
    let token = std::fs::read_to_string(gw_dir.join("admin.token")).unwrap();
    let k = SigningKey::schnorr_from_secret(&[77; 32]).unwrap();
    ureq::post(&format!("{gw}/v1/devices"))
        .set("Authorization", &format!("Bearer {}", token.trim()))
        .send_json(serde_json::json!({ "public_key": k.public_key().to_string() }))
        .unwrap();
    let before: Vec<String> = (1..=3).map(|s| post(&gw, &k, s).expect("acknowledged before the disk is full")).collect();
    // Payments flow through the gateway's node before the fault.
    eventually("the meter pays its provider through the gateway's node", Duration::from_secs(240), || provider_paid(&provider) > 0);

    // An outside process fills the disk.
    eprintln!("before the fill: {:?}", get(&format!("{gw}/v1/stats"))["disk"]);
    // It keeps writing while there is room (the guard may give its reserve back while the
    // filler runs, and the filler then takes that too): until the guard had to give a piece
    // of its reserve back, which is what a runaway writer makes it do.
    let mut fillers = vec![fill(&gw_dir, 0)];
    eventually("the guard gives a piece of its reserve back", Duration::from_secs(10), || {
        let disk = get(&format!("{gw}/v1/stats"))["disk"].clone();
        eprintln!("after {} fills: {disk}", fillers.len());
        disk["releases"].as_u64() >= Some(1) || {
            fillers.push(fill(&gw_dir, fillers.len()));
            false
        }
    });
    let paid_at_fill = provider_paid(&provider);
    let mut seq = 4;
    eventually("a reading refused for the full disk", Duration::from_secs(10), || match post(&gw, &k, seq) {
        Ok(_) => {
            seq += 1; // acknowledged before the guard saw the disk full (the commit had room)
            false
        }
        Err((507, body)) => {
            assert_eq!(body["code"], "disk_full", "{body}");
            assert!(body["error"].as_str().unwrap().contains("disk is full"), "{body}");
            true
        }
        Err((code, body)) => panic!("a reading on the full disk got {code} {body}, not 507 disk_full"),
    });
    let stats = get(&format!("{gw}/v1/stats"));
    assert_eq!(stats["disk"]["state"], "reserve", "the reserve was given back: {stats}");
    // Several seconds full: the meter's ticks go on through the gateway's node (its channel
    // monitors are written meanwhile), and readings are refused all along.
    std::thread::sleep(Duration::from_secs(6));
    let (code, _) = post(&gw, &k, seq).expect_err("still refused while the disk is full");
    assert_eq!(code, 507);
    let paid_full = provider_paid(&provider);
    assert!(
        paid_full > paid_at_fill,
        "the meter's payments through the gateway's node went on while the disk was full ({paid_at_fill} → {paid_full} msat)"
    );
    // Acknowledged readings are there, with proofs.
    for id in &before {
        get(&format!("{gw}/v1/readings/{id}"));
        let p = get(&format!("{gw}/v1/readings/{id}/proof"));
        assert!(p.is_object(), "the proof of {id}: {p}");
    }
    let out = std::fs::read_to_string(&log_path).unwrap();
    assert!(!out.contains("panicked"), "a panic while the disk was full:\n{out}");

    // Space comes back: ingest acknowledges again, no restart.
    for f in &fillers {
        std::fs::remove_file(f).unwrap();
    }
    let freed = Instant::now();
    eventually("ingest acknowledges again after the space is freed", Duration::from_secs(20), || post(&gw, &k, seq).is_ok());
    eprintln!("acknowledged again {:.1} s after the space was freed", freed.elapsed().as_secs_f64());
    let stats = get(&format!("{gw}/v1/stats"));
    assert_eq!(stats["disk"]["state"], "ok", "{stats}");
    assert_eq!(stats["disk"]["reserve_held_bytes"], 32 << 20, "the reserve is whole again: {stats}");
    assert!(stats["disk"]["releases"].as_u64().unwrap() >= 1, "{stats}");
    eventually("payments still flow after the episode", Duration::from_secs(30), || provider_paid(&provider) > paid_full.max(paid_at_fill));
    eprintln!(
        "free after the episode: {} MiB; provider paid {paid_at_fill} msat at the fill, {paid_full} msat after 6 s full",
        free(&gw_dir) >> 20
    );

    // A clean stop is clean.
    let mut child_up = u;
    // SAFETY: SIGTERM to our own child.
    unsafe { libc::kill(child_up.child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(s) = child_up.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "bitmote up did not stop within 90 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = std::fs::read_to_string(&log_path).unwrap();
    assert!(!out.contains("panicked"), "a panic in the gateway:\n{out}");
    assert_eq!(status.code(), Some(0), "SIGTERM of up after a full disk: {status:?}\n{out}");
}
