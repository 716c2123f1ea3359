//! Provisioning of a `bitcoind` binary.
//!
//! Order of preference: `$BITCOIND_EXE`; a `bitcoind` on `PATH`; a binary
//! cached under `~/.cache/bitmote/bitcoin-core/<key>/bin/`; otherwise build Bitcoin
//! Core from the source that the crate `libbitcoinkernel-sys` ships (fetched with
//! cargo from crates.io — nothing is downloaded from anywhere else), and cache it.
//! A file lock makes concurrent callers (parallel tests, two shells) wait for
//! one build instead of starting two.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bitmote_chain::{ChainError, Result};

/// The crate whose bundled Bitcoin Core source we build.
pub const KERNEL_SYS_CRATE: &str = "libbitcoinkernel-sys";
/// Pinned version of that crate (ships Bitcoin Core v31.99 source).
pub const KERNEL_SYS_VERSION: &str = "0.4.1";

/// Debian packages the build needs.
pub const BUILD_PACKAGES: &[&str] = &["cmake", "pkg-config", "libevent-dev", "libboost-dev", "g++", "make"];

const CMAKE_FLAGS: &[&str] = &[
    "-DWITH_EMBEDDED_ASMAP=OFF",
    "-DENABLE_WALLET=OFF",
    "-DBUILD_TESTS=OFF",
    "-DBUILD_BENCH=OFF",
    "-DBUILD_TX=OFF",
    "-DBUILD_UTIL=OFF",
    "-DBUILD_KERNEL_LIB=OFF",
    "-DENABLE_IPC=OFF",
    "-DBUILD_GUI=OFF",
    "-DWITH_ZMQ=OFF",
    "-DCMAKE_BUILD_TYPE=Release",
];

/// Where a usable `bitcoind` came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Env,
    Path,
    Cache,
    Built,
}

/// A usable `bitcoind` (and `bitcoin-cli` when known).
#[derive(Clone, Debug)]
pub struct Bitcoind {
    pub bitcoind: PathBuf,
    pub cli: Option<PathBuf>,
    pub version: String,
    pub origin: Origin,
}

/// Progress of a long build, for CLIs to display.
pub trait Progress: Send {
    fn stage(&mut self, message: &str);
    /// `percent` of the compile done, with the last line of build output.
    fn compile(&mut self, percent: u8, line: &str);
    fn done(&mut self, message: &str);
}

/// Reports progress through `tracing` (used when there is no terminal, e.g. in tests and CI).
pub struct LogProgress {
    last: Option<u8>,
}

impl LogProgress {
    pub fn new() -> Self {
        LogProgress { last: None }
    }
}

impl Default for LogProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress for LogProgress {
    fn stage(&mut self, message: &str) {
        tracing::info!("{message}");
    }
    fn compile(&mut self, percent: u8, _line: &str) {
        let bucket = percent / 10;
        if self.last != Some(bucket) {
            self.last = Some(bucket);
            tracing::info!("building bitcoind: {percent}%");
        }
    }
    fn done(&mut self, message: &str) {
        tracing::info!("{message}");
    }
}

/// Options of [`ensure_bitcoind`].
#[derive(Clone, Debug)]
pub struct InstallOptions {
    /// Root of bitmote's cache (default `~/.cache/bitmote`).
    pub cache_dir: PathBuf,
    /// Skip `$BITCOIND_EXE` and `PATH`, use or fill the cache only.
    pub cache_only: bool,
    /// Install missing Debian packages with apt-get when running as root.
    pub install_packages: bool,
    /// Parallel compile jobs (default: available cores).
    pub jobs: usize,
}

impl Default for InstallOptions {
    fn default() -> Self {
        InstallOptions {
            cache_dir: default_cache_dir(),
            cache_only: false,
            install_packages: true,
            jobs: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
        }
    }
}

/// `$XDG_CACHE_HOME/bitmote` or `~/.cache/bitmote`.
pub fn default_cache_dir() -> PathBuf {
    dirs::cache_dir().unwrap_or_else(|| PathBuf::from(".cache")).join("bitmote")
}

fn cache_key() -> String {
    format!("kernel-sys-{KERNEL_SYS_VERSION}")
}

fn core_dir(cache: &Path) -> PathBuf {
    cache.join("bitcoin-core")
}

/// Run `exe -version` and return its first line.
///
/// Runs in a private empty data directory: this bitcoind writes `settings.json` into its
/// data directory even for `-version`, and concurrent probes on `~/.bitcoin` race.
pub fn probe_version(exe: &Path) -> Result<String> {
    let scratch = tempfile::tempdir().map_err(|e| ChainError::io("creating a scratch dir", e))?;
    let out = Command::new(exe)
        .arg(format!("-datadir={}", scratch.path().display()))
        .arg("-version")
        .output()
        .map_err(|e| ChainError::Provision(format!("cannot run {}: {e}", exe.display())))?;
    if !out.status.success() {
        return Err(ChainError::Provision(format!(
            "{} -version failed ({}): {}",
            exe.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().to_string())
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// A `bitcoind` that is already available, without building anything.
pub fn find_bitcoind(opts: &InstallOptions) -> Result<Option<Bitcoind>> {
    if !opts.cache_only {
        if let Some(exe) = std::env::var_os("BITCOIND_EXE").filter(|v| !v.is_empty()) {
            let exe = PathBuf::from(exe);
            let version = probe_version(&exe).map_err(|e| ChainError::Provision(format!("BITCOIND_EXE: {e}")))?;
            let cli = exe.parent().map(|d| d.join("bitcoin-cli")).filter(|p| p.is_file());
            return Ok(Some(Bitcoind { bitcoind: exe, cli, version, origin: Origin::Env }));
        }
        if let Some(exe) = which("bitcoind") {
            let version = probe_version(&exe)?;
            return Ok(Some(Bitcoind { bitcoind: exe, cli: which("bitcoin-cli"), version, origin: Origin::Path }));
        }
    }
    let dir = core_dir(&opts.cache_dir).join(cache_key()).join("bin");
    let exe = dir.join("bitcoind");
    if exe.is_file() {
        let version = probe_version(&exe)?;
        let cli = Some(dir.join("bitcoin-cli")).filter(|p| p.is_file());
        return Ok(Some(Bitcoind { bitcoind: exe, cli, version, origin: Origin::Cache }));
    }
    Ok(None)
}

/// Find a `bitcoind` or build one (see the module docs). Safe to call concurrently.
pub fn ensure_bitcoind(opts: &InstallOptions, progress: &mut dyn Progress) -> Result<Bitcoind> {
    if let Some(b) = find_bitcoind(opts)? {
        return Ok(b);
    }
    let root = core_dir(&opts.cache_dir);
    fs::create_dir_all(&root).map_err(|e| ChainError::io(format!("creating {}", root.display()), e))?;
    let lock_path = root.join(format!("{}.lock", cache_key()));
    let lock = File::create(&lock_path).map_err(|e| ChainError::io(format!("creating {}", lock_path.display()), e))?;
    if lock.try_lock().is_err() {
        progress.stage("another process is building bitcoind; waiting for it");
        lock.lock().map_err(|e| ChainError::io("waiting for the build lock", e))?;
    }
    // Someone else may have finished while we waited.
    if let Some(b) = find_bitcoind(&InstallOptions { cache_only: true, ..opts.clone() })? {
        return Ok(b);
    }
    let result = build(opts, &root, progress);
    drop(lock);
    result
}

fn missing_packages() -> Vec<&'static str> {
    let mut missing = vec![];
    if which("cmake").is_none() {
        missing.push("cmake");
    }
    if which("pkg-config").is_none() {
        missing.push("pkg-config");
    }
    let has_libevent = which("pkg-config")
        .map(|pc| Command::new(pc).args(["--exists", "libevent"]).status().map(|s| s.success()).unwrap_or(false))
        .unwrap_or(false)
        || Path::new("/usr/include/event2/event.h").is_file();
    if !has_libevent {
        missing.push("libevent-dev");
    }
    if !Path::new("/usr/include/boost/version.hpp").is_file() {
        missing.push("libboost-dev");
    }
    if which("g++").is_none() {
        missing.push("g++");
    }
    if which("make").is_none() {
        missing.push("make");
    }
    missing
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn install_packages(opts: &InstallOptions, progress: &mut dyn Progress) -> Result<()> {
    let missing = missing_packages();
    if missing.is_empty() {
        return Ok(());
    }
    let cmd = format!("apt-get install -y --no-install-recommends {}", missing.join(" "));
    if !(opts.install_packages && is_root() && which("apt-get").is_some()) {
        return Err(ChainError::Provision(format!(
            "building bitcoind needs these system packages: {}. Install them with:\n    sudo apt-get update && sudo {cmd}\n\
             or point BITCOIND_EXE at an existing bitcoind",
            missing.join(", ")
        )));
    }
    progress.stage(&format!("installing build packages: {}", missing.join(" ")));
    for args in [vec!["update", "-qq"], cmd.split_whitespace().skip(1).collect::<Vec<_>>()] {
        let out = Command::new("apt-get")
            .args(&args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .map_err(|e| ChainError::Provision(format!("apt-get: {e}")))?;
        if !out.status.success() {
            return Err(ChainError::Provision(format!(
                "apt-get {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    match missing_packages() {
        m if m.is_empty() => Ok(()),
        m => Err(ChainError::Provision(format!("still missing after apt-get: {}", m.join(", ")))),
    }
}

/// Fetch `libbitcoinkernel-sys` with cargo and return the path of its `bitcoin/` source folder.
fn fetch_source(root: &Path, progress: &mut dyn Progress) -> Result<PathBuf> {
    progress.stage(&format!("fetching Bitcoin Core source ({KERNEL_SYS_CRATE} {KERNEL_SYS_VERSION}) with cargo"));
    let dir = root.join("fetch");
    fs::create_dir_all(dir.join("src")).map_err(|e| ChainError::io("creating fetch dir", e))?;
    let manifest = format!(
        "[package]\nname = \"bitmote-core-source\"\nversion = \"0.0.0\"\nedition = \"2021\"\npublish = false\n\n\
         [dependencies]\n{KERNEL_SYS_CRATE} = {{ version = \"={KERNEL_SYS_VERSION}\", default-features = false }}\n\n[workspace]\n"
    );
    fs::write(dir.join("Cargo.toml"), manifest).map_err(|e| ChainError::io("writing fetch manifest", e))?;
    fs::write(dir.join("src/lib.rs"), "").map_err(|e| ChainError::io("writing fetch crate", e))?;
    let cargo = std::env::var_os("CARGO")
        .map(PathBuf::from)
        .or_else(|| which("cargo"))
        .ok_or_else(|| ChainError::Provision("cargo is needed to fetch the Bitcoin Core source from crates.io".into()))?;
    let out = Command::new(&cargo)
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(dir.join("Cargo.toml"))
        .output()
        .map_err(|e| ChainError::Provision(format!("cargo metadata: {e}")))?;
    if !out.status.success() {
        return Err(ChainError::Provision(format!(
            "cargo could not fetch {KERNEL_SYS_CRATE}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| ChainError::Provision(format!("cargo metadata output: {e}")))?;
    let manifest_path = meta["packages"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == KERNEL_SYS_CRATE))
        .and_then(|p| p["manifest_path"].as_str())
        .ok_or_else(|| ChainError::Provision(format!("{KERNEL_SYS_CRATE} not in cargo metadata")))?;
    let src = Path::new(manifest_path).parent().unwrap_or(Path::new("/")).join("bitcoin");
    if !src.join("CMakeLists.txt").is_file() {
        return Err(ChainError::Provision(format!("no Bitcoin Core source at {}", src.display())));
    }
    Ok(src)
}

fn run_logged(mut cmd: Command, log: &mut File, mut on_line: impl FnMut(&str)) -> Result<()> {
    let desc = format!("{cmd:?}");
    writeln!(log, "$ {desc}").ok();
    let mut child =
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().map_err(|e| ChainError::Provision(format!("cannot run {desc}: {e}")))?;
    let stderr = child.stderr.take().expect("piped");
    let err_thread = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(std::result::Result::ok) {
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let mut tail: Vec<String> = vec![];
    for line in BufReader::new(child.stdout.take().expect("piped")).lines().map_while(std::result::Result::ok) {
        writeln!(log, "{line}").ok();
        on_line(&line);
        tail.push(line);
        if tail.len() > 20 {
            tail.remove(0);
        }
    }
    let status = child.wait().map_err(|e| ChainError::Provision(format!("{desc}: {e}")))?;
    let stderr = err_thread.join().unwrap_or_default();
    write!(log, "{stderr}").ok();
    if !status.success() {
        let err_tail: Vec<&str> = stderr.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect();
        return Err(ChainError::Provision(format!("{desc} failed ({status}):\n{}\n{}", tail.join("\n"), err_tail.join("\n"))));
    }
    Ok(())
}

/// Parse the `[ 42%]` prefix of a CMake/Make progress line.
pub fn parse_percent(line: &str) -> Option<u8> {
    let rest = line.trim_start().strip_prefix('[')?;
    let (num, _) = rest.split_once("%]")?;
    num.trim().parse().ok()
}

fn build(opts: &InstallOptions, root: &Path, progress: &mut dyn Progress) -> Result<Bitcoind> {
    install_packages(opts, progress)?;
    let src = fetch_source(root, progress)?;
    let key = cache_key();
    let build_dir = root.join(format!("build-{key}"));
    let log_path = root.join(format!("build-{key}.log"));
    let mut log = File::create(&log_path).map_err(|e| ChainError::io("creating build log", e))?;
    let started = Instant::now();
    progress.stage(&format!("configuring Bitcoin Core (log: {})", log_path.display()));
    let mut cfg = Command::new("cmake");
    cfg.arg("-S").arg(&src).arg("-B").arg(&build_dir).args(CMAKE_FLAGS);
    run_logged(cfg, &mut log, |_| {}).map_err(|e| with_log(e, &log_path))?;
    progress.stage(&format!("compiling bitcoind with {} jobs (about 9 minutes on 2 cores)", opts.jobs));
    let mut make = Command::new("cmake");
    make.arg("--build").arg(&build_dir).args(["--target", "bitcoind", "bitcoin-cli", "-j"]).arg(opts.jobs.to_string());
    // cmake reports per-target percentages; show the highest seen so progress never goes back.
    let mut shown = 0u8;
    run_logged(make, &mut log, |line| {
        if let Some(p) = parse_percent(line) {
            shown = shown.max(p);
            progress.compile(shown, line);
        }
    })
    .map_err(|e| with_log(e, &log_path))?;
    // Install atomically: copy to a temp dir, then rename into place.
    let final_dir = root.join(&key);
    let tmp_dir = root.join(format!("{key}.partial"));
    let _ = fs::remove_dir_all(&tmp_dir);
    fs::create_dir_all(tmp_dir.join("bin")).map_err(|e| ChainError::io("creating install dir", e))?;
    for name in ["bitcoind", "bitcoin-cli"] {
        let from = build_dir.join("bin").join(name);
        fs::copy(&from, tmp_dir.join("bin").join(name)).map_err(|e| ChainError::io(format!("copying {}", from.display()), e))?;
    }
    let version = probe_version(&tmp_dir.join("bin/bitcoind"))?;
    fs::write(tmp_dir.join("VERSION"), format!("{version}\nsource: {KERNEL_SYS_CRATE} {KERNEL_SYS_VERSION}\n"))
        .map_err(|e| ChainError::io("writing VERSION", e))?;
    let _ = fs::remove_dir_all(&final_dir);
    fs::rename(&tmp_dir, &final_dir).map_err(|e| ChainError::io("installing bitcoind into the cache", e))?;
    // The build tree is large and not needed any more.
    let _ = fs::remove_dir_all(&build_dir);
    progress.done(&format!("built {version} in {:.0?}", round_secs(started.elapsed())));
    let bin = final_dir.join("bin");
    Ok(Bitcoind { bitcoind: bin.join("bitcoind"), cli: Some(bin.join("bitcoin-cli")), version, origin: Origin::Built })
}

fn round_secs(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

fn with_log(e: ChainError, log: &Path) -> ChainError {
    ChainError::Provision(format!("{e}\n(full build log: {})", log.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_lines() {
        assert_eq!(parse_percent("[ 42%] Building CXX object src/x.o"), Some(42));
        assert_eq!(parse_percent("[100%] Linking CXX executable"), Some(100));
        assert_eq!(parse_percent("-- Configuring done"), None);
        assert_eq!(parse_percent("[abc%] x"), None);
    }

    #[test]
    fn cache_hit_does_not_build() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bitcoin-core").join(cache_key()).join("bin");
        fs::create_dir_all(&bin).unwrap();
        let fake = bin.join("bitcoind");
        fs::write(&fake, "#!/bin/sh\necho 'Bitcoin Core daemon version v0-test'\n").unwrap();
        fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let opts = InstallOptions { cache_dir: dir.path().into(), cache_only: true, ..Default::default() };
        let b = find_bitcoind(&opts).unwrap().unwrap();
        assert_eq!(b.origin, Origin::Cache);
        assert_eq!(b.version, "Bitcoin Core daemon version v0-test");
    }
}
