//! The fault drill's bounded campaign (CI): `bitmote drill --quick` for a few rounds of
//! seeded faults against the real system, and every invariant holds. The long campaign is
//! `bitmote drill --rounds 200 --seed S` (README, "Fault drill").

use std::process::Command;

use serde_json::Value as Json;

#[test]
fn a_short_seeded_campaign_finds_no_violation() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let rounds = std::env::var("BITMOTE_DRILL_CI_ROUNDS").unwrap_or_else(|_| "12".into());
    let seed = std::env::var("BITMOTE_DRILL_CI_SEED").unwrap_or_else(|_| "20261202".into());
    let out = Command::new(env!("CARGO_BIN_EXE_bitmote"))
        .env_remove("BITMOTE_DATA_DIR")
        .env_remove("BITMOTE_CONFIG")
        .env("RUST_LOG", "warn")
        // Every fault kind (`bitmote drill --rounds 200` soaks them all; see README, "Fault
        // drill"). Each kind comes up once in as many rounds as there are kinds (22), so 12
        // rounds see about half of them, chosen by the seed.
        .args(["drill", "--quick", "--sensors", "2", "--rounds", &rounds, "--seed", &seed, "--keep"])
        .arg("--dir")
        .arg(dir.path().join("system"))
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    let r: Json =
        serde_json::from_slice(&std::fs::read(&report).unwrap_or_else(|e| panic!("no report ({e}): {stdout}\n{stderr}"))).unwrap();
    assert!(out.status.success(), "the drill failed: {stdout}\n{stderr}");
    assert_eq!(r["violations"].as_array().unwrap().len(), 0, "{stdout}");
    assert_eq!(r["rounds"].as_u64().unwrap().to_string(), rounds);
    // At least one fault per round, and every invariant was actually checked.
    let faults: u64 = r["faults"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert!(faults >= rounds.parse::<u64>().unwrap(), "{stdout}");
    // (I4: the drill's customer buys a Lightning-paid action in about every other round.)
    for inv in ["I1 notary", "I2 actuators", "I3 payments", "I4 lightning", "I5 availability"] {
        assert!(r["checks_passed"][inv].as_u64().unwrap_or(0) > 0, "{inv} was never checked: {stdout}");
    }
    assert!(r["readings_acknowledged"].as_u64().unwrap() > 0);
}
