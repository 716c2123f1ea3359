//! Shared by the notary's integration tests: the real OpenTimestamps client.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use bitmote_regtest::RegtestNode;

/// The OpenTimestamps client (PyPI `opentimestamps-client`), installed with pip on first
/// use, like bitcoind the test suite provisions what it needs; a test fails if it cannot.
pub fn ots_command() -> Command {
    let present = Command::new("ots").arg("--version").output().is_ok_and(|o| o.status.success());
    if !present {
        let st = Command::new("python3").args(["-m", "pip", "install", "-q", "opentimestamps-client"]).status();
        assert!(st.is_ok_and(|s| s.success()), "cannot install the OpenTimestamps client: pip install opentimestamps-client");
    }
    Command::new("ots")
}

/// `ots --no-cache --btc-regtest --bitcoin-node http://USER:PASS@127.0.0.1:PORT/ verify -f FILE OTS`
/// against `node`: (exit status success, everything it printed).
pub fn ots_verify(node: &RegtestNode, file: &Path, ots: &Path) -> (bool, String) {
    let cookie = std::fs::read_to_string(node.cookie_path()).expect("the node's cookie file");
    let url = format!("{}/", node.rpc_url().replacen("http://", &format!("http://{}@", cookie.trim()), 1));
    let out = ots_command()
        .args(["--no-cache", "--btc-regtest", "--bitcoin-node", &url, "verify", "-f"])
        .arg(file)
        .arg(ots)
        .output()
        .expect("running ots");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}
