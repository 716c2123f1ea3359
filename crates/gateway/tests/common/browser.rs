//! What the browser tests need: Debian's Chromium, Node.js and playwright-core. Shared with
//! `crates/bitmote/tests/up_e2e.rs` (included there by path).

use std::path::Path;
use std::process::Command;

/// Debian's Chromium, driven by playwright-core with `executablePath`.
pub const CHROMIUM: &str = "/usr/bin/chromium";

fn ok(cmd: &mut Command) -> bool {
    cmd.status().is_ok_and(|s| s.success())
}

/// Chromium and Node.js (apt-get, as root) and playwright-core (`npm ci` in `browser_dir`)
/// when missing.
pub fn prerequisites(browser_dir: &Path) {
    let missing: Vec<&str> = [(CHROMIUM, "chromium"), ("/usr/bin/npm", "npm")]
        .into_iter()
        .filter(|(path, _)| !Path::new(path).exists())
        .map(|(_, package)| package)
        .collect();
    if !missing.is_empty() {
        let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.trim_ascii() == b"0");
        assert!(root, "missing {missing:?}: run `apt-get install -y {}` as root", missing.join(" "));
        let install = || ok(Command::new("apt-get").args(["install", "-y"]).args(&missing).env("DEBIAN_FRONTEND", "noninteractive"));
        assert!(install() || (ok(Command::new("apt-get").arg("update")) && install()), "apt-get install {missing:?} failed");
    }
    if !browser_dir.join("node_modules/playwright-core").is_dir() {
        assert!(
            ok(Command::new("npm").args(["ci", "--no-audit", "--no-fund"]).current_dir(browser_dir)),
            "npm ci in {}",
            browser_dir.display()
        );
    }
}
