//! The system under test, seen from outside: a `bitmote up` process (node, gateway with its
//! broker and Lightning node, the fleet as separate processes) in the drill's own data
//! directory, configured so that the drill is the only one mining. Everything the drill
//! learns comes from what an operator could see: `up.json`, the HTTP API, pid files, the
//! node's RPC, the devices' state and logs.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitmote_chain::bitcoin::Network;
use bitmote_chain::{ChainClient, RpcAuth, RpcConfig};
use serde::Deserialize;

use crate::DrillError;

/// What `bitmote up` writes to `<data-dir>/up.json` (the fields the drill reads).
#[derive(Debug, Clone, Deserialize)]
pub struct UpStatus {
    pub pid: u32,
    pub rpc: String,
    pub http: String,
    #[serde(default)]
    pub fleet: Option<Vec<FleetMember>>,
    #[serde(default)]
    pub meter_url: Option<String>,
    #[serde(default)]
    pub provider_url: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct FleetMember {
    pub name: String,
    pub kind: String,
    pub pid: Option<u32>,
    pub log: PathBuf,
}

/// Ports the drill fixes in the configuration, so restarts reuse them.
#[derive(Debug, Clone)]
pub struct Ports {
    pub http: u16,
    pub mqtt: u16,
    pub gateway_ln: u16,
    /// Where the provider is reached: the drill's proxy listens there.
    pub provider_http: u16,
    pub provider_ln: u16,
    /// Where the provider binds (`[fleet] provider_http_bind`, `provider_ln_bind`): the
    /// proxy forwards there.
    pub provider_http_inner: u16,
    pub provider_ln_inner: u16,
    pub meter_http: u16,
    pub meter_ln: u16,
}

fn free_port() -> Result<u16, DrillError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| DrillError::io("picking a free port", e))?;
    Ok(l.local_addr().map_err(|e| DrillError::io("picking a free port", e))?.port())
}

impl Ports {
    pub fn pick() -> Result<Ports, DrillError> {
        Ok(Ports {
            http: free_port()?,
            mqtt: free_port()?,
            gateway_ln: free_port()?,
            provider_http: free_port()?,
            provider_ln: free_port()?,
            provider_http_inner: free_port()?,
            provider_ln_inner: free_port()?,
            meter_http: free_port()?,
            meter_ln: free_port()?,
        })
    }
}

/// The campaign's sizes: the fleet and the chain events it drives.
#[derive(Debug, Clone)]
pub struct Shape {
    pub sensors: u32,
    pub tick_ms: u64,
}

/// The output of one `bitmote up` (stdout and stderr, as `2>&1 | tee` would see them):
/// drained into a file by a thread, until the drill closes the pipe's read end.
struct Output {
    close: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Output {
    /// A pipe whose write end becomes the child's stdout and stderr.
    fn new(log: &Path) -> Result<(Output, OwnedFd), DrillError> {
        let mut fds = [0i32; 2];
        // SAFETY: pipe2 fills two fresh descriptors we then own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(DrillError::io("creating a pipe", std::io::Error::last_os_error()));
        }
        // SAFETY: both descriptors were just created and are owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| DrillError::io(format!("opening {}", log.display()), e))?;
        let close = Arc::new(AtomicBool::new(false));
        let flag = close.clone();
        let thread = std::thread::spawn(move || {
            let mut reader = fs::File::from(read);
            let mut buf = [0u8; 8192];
            while !flag.load(Ordering::SeqCst) {
                let mut p = libc::pollfd { fd: reader.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                // SAFETY: one valid pollfd.
                let n = unsafe { libc::poll(&mut p, 1, 200) };
                if n <= 0 {
                    continue;
                }
                match reader.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => {
                        let _ = file.write_all(&buf[..k]);
                    }
                }
            }
            // Dropping `reader` closes the read end: the child's next write gets EPIPE.
        });
        Ok((Output { close, thread: Some(thread) }, write))
    }

    /// Close the read end, as a dying `tee` does.
    fn close(&mut self) {
        self.close.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        self.close();
    }
}

/// The running system and how to reach it.
pub struct System {
    exe: PathBuf,
    pub dir: PathBuf,
    pub data: PathBuf,
    config: PathBuf,
    up: Option<Child>,
    output: Option<Output>,
    starts: u32,
    pub api: String,
    pub ports: Ports,
    pub token: Option<String>,
}

impl System {
    /// Write the configuration (the drill mines; small intervals so a round is short).
    pub fn new(exe: PathBuf, dir: PathBuf, shape: &Shape) -> Result<System, DrillError> {
        let data = dir.join("data");
        fs::create_dir_all(&data).map_err(|e| DrillError::io(format!("creating {}", data.display()), e))?;
        let ports = Ports::pick()?;
        let config = dir.join("bitmote.toml");
        let text = format!(
            "# Written by bitmote drill.\n\
             [chain]\nblock_interval_secs = 0\n\n\
             [gateway]\nhttp_listen = \"127.0.0.1:{http}\"\nmqtt_listen = \"127.0.0.1:{mqtt}\"\nlightning_listen = \"127.0.0.1:{gln}\"\n\n\
             [notary]\nanchor_interval_secs = 2\nbump_after_blocks = 3\n\n\
             [fleet]\nsensors = {sensors}\nsensor_interval_ms = 700\nbatch_every = 2\nbatch_size = 4\n\
             rental_every_blocks = 4\nlease_blocks = 3\nrelay_every_blocks = 3\ntick_ms = {tick}\n\
             provider_http = \"127.0.0.1:{ph}\"\nprovider_ln = \"127.0.0.1:{pl}\"\n\
             provider_http_bind = \"127.0.0.1:{phi}\"\nprovider_ln_bind = \"127.0.0.1:{pli}\"\nmeter_http = \"127.0.0.1:{mh}\"\nmeter_ln = \"127.0.0.1:{ml}\"\n",
            http = ports.http,
            mqtt = ports.mqtt,
            gln = ports.gateway_ln,
            sensors = shape.sensors,
            tick = shape.tick_ms,
            ph = ports.provider_http,
            pl = ports.provider_ln,
            phi = ports.provider_http_inner,
            pli = ports.provider_ln_inner,
            mh = ports.meter_http,
            ml = ports.meter_ln,
        );
        fs::write(&config, text).map_err(|e| DrillError::io(format!("writing {}", config.display()), e))?;
        let api = format!("http://127.0.0.1:{}", ports.http);
        Ok(System { exe, dir, data, config, up: None, output: None, starts: 0, api, ports, token: None })
    }

    /// Start `bitmote up` and wait until it says it is ready (`up.json` and `/health`).
    pub fn start(&mut self, timeout: Duration) -> Result<(), DrillError> {
        if self.up_alive() {
            return Ok(());
        }
        self.starts += 1;
        let log = self.dir.join(format!("up-{:03}.log", self.starts));
        let (output, write) = Output::new(&log)?;
        let err = write.try_clone().map_err(|e| DrillError::io("duplicating a pipe", e))?;
        let _ = fs::remove_file(self.data.join("up.json"));
        let mut cmd = Command::new(&self.exe);
        cmd.arg("--data-dir")
            .arg(&self.data)
            .arg("--config")
            .arg(&self.config)
            .arg("up")
            .stdin(Stdio::null())
            .stdout(Stdio::from(write))
            .stderr(Stdio::from(err));
        // Only the drill's configuration counts: no BITMOTE_* override from our environment.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("BITMOTE_") {
                cmd.env_remove(k);
            }
        }
        {
            use std::os::unix::process::CommandExt;
            // Its own process group: signals reach it only when the drill sends them.
            cmd.process_group(0);
            // If the drill dies, `up` gets SIGTERM and stops cleanly (never left behind).
            let parent = std::process::id() as i32;
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 || libc::getppid() != parent {
                        libc::_exit(1);
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().map_err(|e| DrillError::io(format!("starting {}", self.exe.display()), e))?;
        self.up = Some(child);
        self.output = Some(output);
        let deadline = Instant::now() + timeout;
        loop {
            if !self.up_alive() {
                return Err(DrillError::Setup(format!("bitmote up exited during start-up; see {}", log.display())));
            }
            if self.status().is_some() && self.healthy() {
                break;
            }
            if Instant::now() > deadline {
                return Err(DrillError::Setup(format!("bitmote up not ready after {timeout:?}; see {}", log.display())));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        if self.token.is_none() {
            let p = self.data.join("gateway").join("admin.token");
            self.token =
                Some(fs::read_to_string(&p).map_err(|e| DrillError::io(format!("reading {}", p.display()), e))?.trim().to_string());
        }
        Ok(())
    }

    /// Whether the `up` the drill started is still running (reaps it if not).
    pub fn up_alive(&mut self) -> bool {
        match &mut self.up {
            Some(c) => match c.try_wait() {
                Ok(None) => true,
                Ok(Some(_)) | Err(_) => {
                    self.up = None;
                    self.output = None;
                    false
                }
            },
            None => false,
        }
    }

    pub fn up_pid(&self) -> Option<u32> {
        self.up.as_ref().map(Child::id)
    }

    /// Send `sig` to `up`; with `close_output` first close its output pipe (a dead `tee`).
    pub fn signal_up(&mut self, sig: i32, close_output: bool) {
        if close_output {
            if let Some(o) = &mut self.output {
                o.close();
            }
        }
        if let Some(pid) = self.up_pid() {
            signal(pid, sig);
        }
    }

    /// Wait for `up` to exit; its exit code (`None`: killed by a signal or still running).
    pub fn wait_up(&mut self, timeout: Duration) -> Result<Option<i32>, DrillError> {
        let deadline = Instant::now() + timeout;
        let Some(child) = &mut self.up else { return Ok(None) };
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.up = None;
                    self.output = None;
                    return Ok(status.code());
                }
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
                Ok(None) => return Err(DrillError::Fault(format!("bitmote up did not exit within {timeout:?}"))),
                Err(e) => return Err(DrillError::io("waiting for bitmote up", e)),
            }
        }
    }

    /// SIGKILL `up` and wait for it (its fleet follows by PR_SET_PDEATHSIG).
    pub fn kill_up(&mut self) {
        if let Some(c) = &mut self.up {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.up = None;
        self.output = None;
    }

    /// Stop everything at the end of the campaign: SIGINT, as Ctrl-C does.
    pub fn stop(&mut self) -> Result<Option<i32>, DrillError> {
        if !self.up_alive() {
            return Ok(None);
        }
        self.signal_up(libc::SIGINT, false);
        self.wait_up(Duration::from_secs(120))
    }

    pub fn status(&self) -> Option<UpStatus> {
        let b = fs::read(self.data.join("up.json")).ok()?;
        serde_json::from_slice(&b).ok()
    }

    /// The provider's API at the port it binds, past the proxy: the drill observes the
    /// provider from outside, not over the link it impairs.
    pub fn provider_direct_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.provider_http_inner)
    }

    /// The routes of the drill's proxy: (public, inner) for the provider's API and node.
    pub fn provider_routes(&self) -> Vec<(std::net::SocketAddr, std::net::SocketAddr)> {
        let at = |p: u16| std::net::SocketAddr::from(([127, 0, 0, 1], p));
        let p = &self.ports;
        vec![(at(p.provider_http), at(p.provider_http_inner)), (at(p.provider_ln), at(p.provider_ln_inner))]
    }

    pub fn bitcoind_dir(&self) -> PathBuf {
        self.data.join("bitcoind")
    }

    /// The pid of the embedded bitcoind, from its pid file.
    pub fn node_pid(&self) -> Option<u32> {
        let t = fs::read_to_string(self.bitcoind_dir().join("regtest").join("bitcoind.pid")).ok()?;
        let pid: u32 = t.trim().parse().ok()?;
        process_alive(pid).then_some(pid)
    }

    pub fn member(&self, name: &str) -> Option<FleetMember> {
        self.status()?.fleet?.into_iter().find(|m| m.name == name)
    }

    pub fn members(&self) -> Vec<FleetMember> {
        self.status().and_then(|s| s.fleet).unwrap_or_default()
    }

    /// A client of the node (the cookie is read now; the RPC port from `up.json`).
    pub fn chain(&self) -> Result<ChainClient, DrillError> {
        let url = match self.status() {
            Some(s) => s.rpc,
            None => return Err(DrillError::Setup("up.json is missing: is bitmote up running?".into())),
        };
        let cfg = RpcConfig { url, auth: RpcAuth::Cookie(self.bitcoind_dir().join("regtest").join(".cookie")), network: Network::Regtest };
        ChainClient::unchecked(cfg, Duration::from_secs(10)).map_err(DrillError::Chain)
    }

    fn agent(&self) -> ureq::Agent {
        ureq::AgentBuilder::new().timeout(Duration::from_secs(10)).build()
    }

    /// `GET /health` answers 200.
    pub fn healthy(&self) -> bool {
        self.agent().get(&format!("{}/health", self.api)).call().is_ok()
    }

    pub fn get_json(&self, path: &str) -> Result<serde_json::Value, DrillError> {
        self.get_url(&format!("{}{path}", self.api))
    }

    pub fn get_url(&self, url: &str) -> Result<serde_json::Value, DrillError> {
        let mut req = self.agent().get(url);
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let r = req.call().map_err(|e| DrillError::Http(format!("GET {url}: {e}")))?;
        r.into_json().map_err(|e| DrillError::Http(format!("GET {url}: {e}")))
    }

    pub fn post(&self, path: &str, content_type: &str, body: &[u8]) -> Result<serde_json::Value, DrillError> {
        let url = format!("{}{path}", self.api);
        let mut req = self.agent().post(&url).set("Content-Type", content_type);
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        match req.send_bytes(body) {
            Ok(r) => r.into_json().map_err(|e| DrillError::Http(format!("POST {url}: {e}"))),
            Err(ureq::Error::Status(code, r)) => Err(DrillError::Refused(code, r.into_string().unwrap_or_default())),
            Err(e) => Err(DrillError::Http(format!("POST {url}: {e}"))),
        }
    }
}

impl Drop for System {
    fn drop(&mut self) {
        if self.up_alive() {
            self.signal_up(libc::SIGINT, false);
            if self.wait_up(Duration::from_secs(90)).is_err() {
                self.kill_up();
            }
        }
        // A node left running (e.g. after up was killed) goes too.
        if let Some(pid) = self.node_pid() {
            signal(pid, libc::SIGTERM);
        }
    }
}

pub fn signal(pid: u32, sig: i32) {
    // SAFETY: sending a signal has no memory effects on us.
    unsafe { libc::kill(pid as i32, sig) };
}

pub fn process_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    let exists = unsafe { libc::kill(pid as i32, 0) == 0 };
    exists
        && fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
}
