//! Regtest node manager: a real `bitcoind -regtest` on 127.0.0.1, on demand.
//!
//! [`RegtestNode::start`] runs bitcoind as a child process with its own data dir,
//! free loopback ports, cookie authentication and the indexes bitmote uses
//! (`-txindex -blockfilterindex -peerblockfilters -rest`), waits until RPC
//! answers, and stops it cleanly ([`RegtestNode::stop`]) or kills it when dropped
//! (so a failing test never leaks a node). [`RegtestNode::start_daemon`] runs a
//! detached node that outlives the CLI (`bitmote node start`), and
//! [`RegtestNode::attach`] reconnects to it.

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bitmote_chain::bitcoin::absolute::LockTime;
use bitmote_chain::bitcoin::transaction::Version;
use bitmote_chain::bitcoin::{Address, Amount, BlockHash, Network, OutPoint, ScriptBuf, Sequence, Transaction, TxIn, TxOut, Witness};
use serde::{Deserialize, Serialize};

use bitmote_chain::{ChainClient, RpcAuth, RpcConfig};
use bitmote_chain::{ChainError, Result};

/// How to start a regtest node.
#[derive(Clone, Debug)]
pub struct RegtestOptions {
    /// The `bitcoind` binary.
    pub exe: PathBuf,
    /// Data directory; `None` = a fresh temporary one, deleted with the node.
    pub data_dir: Option<PathBuf>,
    /// RPC port; `None` = a free one (a persistent data dir remembers its ports).
    pub rpc_port: Option<u16>,
    /// P2P port; `None` = a free one.
    pub p2p_port: Option<u16>,
    /// Extra `-arg`s.
    pub extra_args: Vec<String>,
    /// How long to wait for RPC to answer.
    pub startup_timeout: Duration,
}

impl RegtestOptions {
    pub fn new(exe: impl Into<PathBuf>) -> Self {
        RegtestOptions {
            exe: exe.into(),
            data_dir: None,
            rpc_port: None,
            p2p_port: None,
            extra_args: vec![],
            startup_timeout: Duration::from_secs(60),
        }
    }
}

/// What bitcoind says when it will not start because an index is not on its chain: the
/// index's best block is on another branch, or unknown.
const INDEX_MISMATCH: [&str; 2] = ["index may be corrupted", "Please rebuild the index"];

/// Ports and binary of a node, remembered in `<data_dir>/bitmote-node.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeRecord {
    pub rpc_port: u16,
    pub p2p_port: u16,
    pub exe: PathBuf,
}

const RECORD: &str = "bitmote-node.json";

enum Process {
    /// Our child; killed on drop.
    Child(Child),
    /// Detached daemon (its pid in `regtest/bitcoind.pid`); left running on drop.
    Detached,
}

/// A running regtest bitcoind.
pub struct RegtestNode {
    process: Process,
    data_dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    rpc: RpcConfig,
    p2p: SocketAddr,
    client: ChainClient,
    /// How it was started, ports pinned (for [`RegtestNode::restart`]).
    opts: Option<RegtestOptions>,
    /// Stop cleanly (RPC `stop`, then SIGTERM) instead of killing when dropped.
    graceful_drop: bool,
}

/// An anyone-can-spend regtest address (P2WSH of `OP_TRUE`), the default target of
/// mining: coins there can be spent by tests without a wallet.
pub fn op_true_address() -> Address {
    let script = ScriptBuf::from(vec![0x51]);
    Address::p2wsh(&script, Network::Regtest)
}

/// A transaction spending the OP_TRUE output of `coinbase` (P2WSH: the witness is the
/// script `OP_TRUE` itself) to `outputs`, paying `fee` sat, change back to OP_TRUE.
/// `None` if the coinbase does not pay [`op_true_address`] enough.
pub fn spend_op_true(coinbase: &Transaction, mut outputs: Vec<TxOut>, fee: u64) -> Option<Transaction> {
    let spk = op_true_address().script_pubkey();
    let vout = coinbase.output.iter().position(|o| o.script_pubkey == spk)?;
    let spent: u64 = outputs.iter().map(|o| o.value.to_sat()).sum::<u64>() + fee;
    let change = coinbase.output[vout].value.to_sat().checked_sub(spent)?;
    outputs.push(TxOut { value: Amount::from_sat(change), script_pubkey: spk });
    Some(Transaction {
        version: Version::TWO,
        lock_time: LockTime::ZERO,
        input: vec![TxIn {
            previous_output: OutPoint { txid: coinbase.compute_txid(), vout: vout as u32 },
            script_sig: ScriptBuf::new(),
            sequence: Sequence::ENABLE_RBF_NO_LOCKTIME,
            witness: Witness::from_slice(&[vec![0x51u8]]),
        }],
        output: outputs,
    })
}

/// The coinbase transaction of the block at `height` of the active chain.
pub fn coinbase_at(c: &ChainClient, height: u32) -> Result<Transaction> {
    let hash = c.block_hash(height)?.ok_or_else(|| ChainError::Process(format!("no block at height {height}")))?;
    Ok(c.block(&hash)?.txdata.remove(0))
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| ChainError::io("finding a free port", e))?;
    Ok(l.local_addr().map_err(|e| ChainError::io("finding a free port", e))?.port())
}

fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

impl RegtestNode {
    /// Start bitcoind as a child process (killed when the node is dropped).
    pub fn start(opts: RegtestOptions) -> Result<Self> {
        // A port picked as free can be taken by someone else before bitcoind binds it: retry.
        let mut last = None;
        for _ in 0..3 {
            match Self::spawn_repairing(&opts, false) {
                Ok(n) => return Ok(n),
                Err(e @ ChainError::Process(_)) if opts.rpc_port.is_none() => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("tried at least once"))
    }

    /// Start a detached bitcoind that keeps running after this process exits.
    pub fn start_daemon(opts: RegtestOptions) -> Result<Self> {
        Self::spawn_repairing(&opts, true)
    }

    /// Connect to a node already running on `data_dir` (started by [`RegtestNode::start_daemon`]).
    /// Returns `Ok(None)` if none is running there.
    pub fn attach(data_dir: &Path) -> Result<Option<Self>> {
        let Some(rec) = read_record(data_dir)? else { return Ok(None) };
        if !daemon_running(data_dir) {
            return Ok(None);
        }
        let rpc = rpc_config(data_dir, rec.rpc_port);
        let client = ChainClient::connect(rpc.clone(), Duration::from_secs(30))?;
        let mut opts = RegtestOptions::new(rec.exe.clone());
        opts.data_dir = Some(data_dir.to_path_buf());
        opts.rpc_port = Some(rec.rpc_port);
        opts.p2p_port = Some(rec.p2p_port);
        Ok(Some(RegtestNode {
            process: Process::Detached,
            data_dir: data_dir.to_path_buf(),
            _temp: None,
            rpc,
            p2p: SocketAddr::from(([127, 0, 0, 1], rec.p2p_port)),
            client,
            opts: Some(opts),
            graceful_drop: false,
        }))
    }

    /// [`Self::spawn`]; but when bitcoind refuses to start because an index it keeps (the
    /// transaction or block filter index, data derived from its blocks) does not match its
    /// chain, remove the indexes and start once more: bitcoind rebuilds them from its blocks.
    /// Found by `bitmote drill`: a kill -9 right after a reorg left the chain state on the old
    /// branch and the block filter index on the new one, and bitcoind then refused every start
    /// ("Cannot read last block filter header; index may be corrupted").
    fn spawn_repairing(opts: &RegtestOptions, daemon: bool) -> Result<Self> {
        let Some(dir) = &opts.data_dir else { return Self::spawn(opts, daemon) };
        // What bitcoind logs during this attempt (its error comes before many lines of shutdown).
        let log = dir.join("regtest").join("debug.log");
        let offset = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let logged_since = || -> String {
            use std::io::{Read, Seek, SeekFrom};
            let mut text = String::new();
            if let Ok(mut f) = fs::File::open(&log) {
                if f.seek(SeekFrom::Start(offset)).is_ok() {
                    let _ = f.take(4 << 20).read_to_string(&mut text);
                }
            }
            text
        };
        match Self::spawn(opts, daemon) {
            Err(ChainError::Process(msg)) if INDEX_MISMATCH.iter().any(|m| msg.contains(m) || logged_since().contains(m)) => {
                let indexes = dir.join("regtest").join("indexes");
                tracing::warn!(
                    "bitcoind refused to start: an index does not match its chain (a crash left them apart); \
                     removing {} for bitcoind to rebuild it from its blocks",
                    indexes.display()
                );
                fs::remove_dir_all(&indexes).map_err(|e| ChainError::io(format!("removing {}", indexes.display()), e))?;
                Self::spawn(opts, daemon)
            }
            r => r,
        }
    }

    fn spawn(opts: &RegtestOptions, daemon: bool) -> Result<Self> {
        let (data_dir, temp) = match &opts.data_dir {
            Some(d) => (d.clone(), None),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("bitmote-regtest-")
                    .tempdir()
                    .map_err(|e| ChainError::io("creating a temp data dir", e))?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        fs::create_dir_all(&data_dir).map_err(|e| ChainError::io(format!("creating {}", data_dir.display()), e))?;
        if daemon_running(&data_dir) {
            return Err(ChainError::Process(format!("a bitcoind is already running on {}", data_dir.display())));
        }
        // Reuse remembered ports when they are free, so URLs stay stable across restarts.
        let rec = read_record(&data_dir)?;
        let pick = |want: Option<u16>, remembered: Option<u16>| -> Result<u16> {
            match (want, remembered) {
                (Some(p), _) => Ok(p),
                (None, Some(p)) if port_is_free(p) => Ok(p),
                _ => free_port(),
            }
        };
        let rpc_port = pick(opts.rpc_port, rec.as_ref().map(|r| r.rpc_port))?;
        let mut p2p_port = pick(opts.p2p_port, rec.as_ref().map(|r| r.p2p_port))?;
        if p2p_port == rpc_port {
            p2p_port = free_port()?;
        }
        let record = NodeRecord { rpc_port, p2p_port, exe: opts.exe.clone() };
        if opts.data_dir.is_some() {
            let body = serde_json::to_vec_pretty(&record).expect("record serializes");
            bitmote_chain::stream::write_atomic(&data_dir.join(RECORD), &body)?;
        }
        let regtest_dir = data_dir.join("regtest");
        // Credentials that survive node restarts: bitcoind writes a new random cookie each
        // time it starts, and a client that read the old one (ldk-node reads it once) would
        // be locked out after a restart. So bitmote keeps its own password (`rpcauth`, the
        // salted hash on the command line) and writes it where the cookie is expected;
        // bitcoind's own cookie goes to `.cookie.core`.
        let (rpcauth, cookie_line) = stable_credentials(&data_dir)?;
        fs::create_dir_all(&regtest_dir).map_err(|e| ChainError::io(format!("creating {}", regtest_dir.display()), e))?;
        bitmote_chain::wallet::write_secret(&regtest_dir.join(".cookie"), cookie_line.as_bytes())?;
        let mut cmd = Command::new(&opts.exe);
        cmd.arg("-regtest")
            .arg(format!("-datadir={}", data_dir.display()))
            .arg("-server=1")
            .arg(format!("-rpcbind=127.0.0.1:{rpc_port}"))
            .arg("-rpcallowip=127.0.0.1")
            .arg(format!("-rpcport={rpc_port}"))
            .arg(format!("-bind=127.0.0.1:{p2p_port}"))
            .arg(format!("-port={p2p_port}"))
            .args(["-listen=1", "-listenonion=0", "-discover=0", "-dnsseed=0", "-fixedseeds=0", "-natpmp=0"])
            .args(["-txindex=1", "-blockfilterindex=1", "-peerblockfilters=1", "-rest=1"])
            .args(["-printtoconsole=0", "-rpcworkqueue=128", "-rpcthreads=16"])
            .arg(format!("-rpcauth={rpcauth}"))
            .arg("-rpccookiefile=.cookie.core")
            .args(&opts.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if daemon {
            cmd.arg("-daemonwait=1");
        }
        // Own process group: a Ctrl-C in the terminal reaches bitmote, which then stops
        // the node in order (after flushing whatever depends on it), not both at once.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().map_err(|e| ChainError::Process(format!("cannot start {}: {e}", opts.exe.display())))?;
        let rpc = rpc_config(&data_dir, rpc_port);
        let mut process = if daemon {
            let out = child.wait_with_output().map_err(|e| ChainError::Process(e.to_string()))?;
            if !out.status.success() {
                return Err(ChainError::Process(format!(
                    "bitcoind -daemon failed: {}\n{}",
                    String::from_utf8_lossy(&out.stderr).trim(),
                    tail(&regtest_dir.join("debug.log"), 15)
                )));
            }
            Process::Detached
        } else {
            Process::Child(child)
        };
        // Wait for the cookie and for RPC to answer; fail fast if bitcoind exits.
        let deadline = Instant::now() + opts.startup_timeout;
        let client = loop {
            if let Process::Child(c) = &mut process {
                if let Ok(Some(status)) = c.try_wait() {
                    let mut stderr = String::new();
                    if let Some(mut e) = c.stderr.take() {
                        use std::io::Read;
                        let _ = e.read_to_string(&mut stderr);
                    }
                    return Err(ChainError::Process(format!(
                        "bitcoind exited during startup ({status}): {}\n{}",
                        stderr.trim(),
                        tail(&regtest_dir.join("debug.log"), 15)
                    )));
                }
            }
            if regtest_dir.join(".cookie").is_file() {
                match ChainClient::connect(rpc.clone(), Duration::from_millis(200)) {
                    Ok(c) => break c,
                    Err(e) if e.is_transient() || matches!(e, ChainError::Cookie { .. } | ChainError::Unauthorized { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            if Instant::now() > deadline {
                if let Process::Child(c) = &mut process {
                    let _ = c.kill();
                }
                return Err(ChainError::Process(format!(
                    "bitcoind did not answer RPC within {:?}\n{}",
                    opts.startup_timeout,
                    tail(&regtest_dir.join("debug.log"), 15)
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut pinned = opts.clone();
        pinned.data_dir = Some(data_dir.clone());
        pinned.rpc_port = Some(rpc_port);
        pinned.p2p_port = Some(p2p_port);
        Ok(RegtestNode {
            process,
            data_dir,
            _temp: temp,
            rpc,
            p2p: SocketAddr::from(([127, 0, 0, 1], p2p_port)),
            client,
            opts: Some(pinned),
            graceful_drop: false,
        })
    }

    /// When dropped, stop bitcoind cleanly (RPC `stop`, else SIGTERM, and wait for it
    /// to exit, so it flushes its chain state) instead of killing it. `bitmote up` sets
    /// this: an error on any path out of it must never turn a clean stop into a kill.
    pub fn set_graceful_drop(&mut self, graceful: bool) {
        self.graceful_drop = graceful;
    }

    /// Whether the process has exited (crashed, killed, or stopped by someone else),
    /// with how it ended.
    pub fn exited(&mut self) -> Option<String> {
        match &mut self.process {
            Process::Child(c) => match c.try_wait() {
                Ok(Some(status)) => Some(status.to_string()),
                Ok(None) => None,
                Err(e) => Some(format!("cannot wait for it: {e}")),
            },
            Process::Detached => (!daemon_running(&self.data_dir)).then(|| "no longer running".to_string()),
        }
    }

    /// Start the node again on the same data directory and ports (after it exited),
    /// as a child process of this one. The cookie changes; clients re-read it.
    pub fn restart(&mut self) -> Result<()> {
        if self.exited().is_none() {
            return Err(ChainError::Process("bitcoind is still running; stop it before restarting".into()));
        }
        let opts = self.opts.clone().ok_or_else(|| ChainError::Process("unknown start options".into()))?;
        let mut fresh = Self::spawn_repairing(&opts, false)?;
        // Take over the new process (what is left of `fresh` is a detached record, which
        // its drop leaves alone); keep our temp dir, ports and drop policy.
        self.process = std::mem::replace(&mut fresh.process, Process::Detached);
        std::mem::swap(&mut self.client, &mut fresh.client);
        Ok(())
    }

    /// The pid of the bitcoind process, when known.
    pub fn pid(&self) -> Option<i32> {
        match &self.process {
            Process::Child(c) => Some(c.id() as i32),
            Process::Detached => daemon_pid(&self.data_dir),
        }
    }

    /// RPC client (shared connection).
    pub fn client(&self) -> &ChainClient {
        &self.client
    }

    /// Configuration to open more RPC connections.
    pub fn rpc_config(&self) -> &RpcConfig {
        &self.rpc
    }

    pub fn rpc_url(&self) -> &str {
        &self.rpc.url
    }

    /// P2P address (for light clients and Lightning nodes).
    pub fn p2p_addr(&self) -> SocketAddr {
        self.p2p
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn cookie_path(&self) -> PathBuf {
        self.data_dir.join("regtest").join(".cookie")
    }

    /// Mine `n` blocks to the anyone-can-spend address.
    pub fn mine(&self, n: u32) -> Result<Vec<BlockHash>> {
        self.client.mine(n, &op_true_address())
    }

    /// Ask bitcoind to stop and wait until it has exited (killing it after `timeout`).
    pub fn stop(mut self) -> Result<()> {
        self.shutdown(Duration::from_secs(60))
    }

    fn shutdown(&mut self, timeout: Duration) -> Result<()> {
        if self.exited().is_some() {
            return Ok(());
        }
        // RPC `stop`; if RPC does not answer (cookie gone, node hung), SIGTERM does the same.
        if let Err(e) = self.client.stop_node() {
            tracing::debug!("bitcoind `stop` RPC failed ({e}); sending SIGTERM");
            if let Some(pid) = self.pid() {
                // SAFETY: plain kill(2) on bitcoind's pid (our child, or from its own pid file).
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        let deadline = Instant::now() + timeout;
        match &mut self.process {
            Process::Child(c) => loop {
                if c.try_wait().map_err(|e| ChainError::Process(e.to_string()))?.is_some() {
                    return Ok(());
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    return Err(ChainError::Process("bitcoind did not stop in time; killed".into()));
                }
                std::thread::sleep(Duration::from_millis(20));
            },
            Process::Detached => {
                while daemon_running(&self.data_dir) {
                    if Instant::now() > deadline {
                        return Err(ChainError::Process("bitcoind did not stop in time".into()));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Ok(())
            }
        }
    }

    /// Kill the process at once (SIGKILL), as a crash would. For fault-injection tests.
    pub fn kill(&mut self) -> Result<()> {
        match &mut self.process {
            Process::Child(c) => {
                c.kill().map_err(|e| ChainError::Process(e.to_string()))?;
                c.wait().map_err(|e| ChainError::Process(e.to_string()))?;
                Ok(())
            }
            Process::Detached => {
                let pid = daemon_pid(&self.data_dir).ok_or_else(|| ChainError::Process("no pid file".into()))?;
                // SAFETY: plain kill(2) on a pid we read from bitcoind's own pid file.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                Ok(())
            }
        }
    }
}

impl Drop for RegtestNode {
    fn drop(&mut self) {
        if self.graceful_drop {
            if let Err(e) = self.shutdown(Duration::from_secs(60)) {
                tracing::warn!("stopping bitcoind: {e}");
            }
            return;
        }
        if let Process::Child(c) = &mut self.process {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// The node's lasting RPC login: `(rpcauth argument, cookie-file line)`. The password is
/// made once and kept (mode 0600) in `<data_dir>/bitmote-rpc.secret`.
fn stable_credentials(data_dir: &Path) -> Result<(String, String)> {
    use bitmote_chain::bitcoin::hashes::{hmac, sha256, Hash, HashEngine};
    const USER: &str = "bitmote";
    let path = data_dir.join("bitmote-rpc.secret");
    let password = match fs::read_to_string(&path) {
        Ok(p) if p.trim().len() >= 32 => p.trim().to_string(),
        _ => {
            use bitmote_chain::bitcoin::secp256k1::rand::{thread_rng, RngCore};
            let mut b = [0u8; 32];
            thread_rng().fill_bytes(&mut b);
            let p: String = b.iter().map(|x| format!("{x:02x}")).collect();
            bitmote_chain::wallet::write_secret(&path, p.as_bytes())?;
            p
        }
    };
    // Bitcoin Core's share/rpcauth: HMAC-SHA256 keyed by the salt (as text) over the password.
    let salt: String = sha256::Hash::hash(format!("bitmote-rpcauth-salt:{password}").as_bytes()).to_string()[..32].to_string();
    let mut engine = hmac::HmacEngine::<sha256::Hash>::new(salt.as_bytes());
    engine.input(password.as_bytes());
    let mac = hmac::Hmac::<sha256::Hash>::from_engine(engine);
    Ok((format!("{USER}:{salt}${mac}"), format!("{USER}:{password}")))
}

fn rpc_config(data_dir: &Path, rpc_port: u16) -> RpcConfig {
    RpcConfig {
        url: format!("http://127.0.0.1:{rpc_port}"),
        auth: RpcAuth::Cookie(data_dir.join("regtest").join(".cookie")),
        network: Network::Regtest,
    }
}

fn read_record(data_dir: &Path) -> Result<Option<NodeRecord>> {
    match fs::read(data_dir.join(RECORD)) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| ChainError::Config(format!("corrupt {}: {e}", data_dir.join(RECORD).display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ChainError::io("reading node record", e)),
    }
}

fn daemon_pid(data_dir: &Path) -> Option<i32> {
    fs::read_to_string(data_dir.join("regtest").join("bitcoind.pid")).ok()?.trim().parse().ok()
}

/// Whether a bitcoind started with `-daemon` on this data dir is alive.
pub fn daemon_running(data_dir: &Path) -> bool {
    match daemon_pid(data_dir) {
        // SAFETY: signal 0 only checks that the process exists.
        Some(pid) => unsafe { libc::kill(pid, 0) == 0 },
        None => false,
    }
}
