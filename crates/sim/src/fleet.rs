//! The simulated fleet of `bitmote up`: real separate processes (this same binary's
//! `device sensor`, `device actuator`, `provider run` and `meter run`) talking to the
//! gateway over the real protocols, each with its state under `<data-dir>/fleet/<name>/`
//! and its output appended to `<data-dir>/fleet/<name>.log`; and the [`Driver`] that makes
//! chain events happen for the actuators (a paid rental order for the lock, a lease that
//! ends at a height, signed on-chain commands for the relay).
//!
//! Children run in their own process groups (a terminal's Ctrl-C reaches only `up`, which
//! stops them in order: the meter first so it can close its session with the provider)
//! and get SIGTERM if `up` dies (`PR_SET_PDEATHSIG`), so none is ever left behind.

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bitmote_chain::bitcoin::{Amount, ScriptBuf, TxOut};
use bitmote_chain::{now_ms, ChainClient};
use bitmote_device::SigningKey;
use bitmote_proto::client::{ClientError, Gateway};
use bitmote_regtest::{coinbase_at, op_true_address, spend_op_true};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json};

use crate::keys;
use bitmote_actuator::rules::{Action, OrderRequest, PaymentOrder as Order, Rule, Trigger};

/// A member that ran this long before it exited is restarted after the first backoff (2 s).
const RAN_WELL: Duration = Duration::from_secs(10);

/// The lock rented by payment orders and the relay switched by signed on-chain commands.
pub const LOCK: &str = "lock-1";
pub const RELAY: &str = "relay-1";
/// The rule that authorizes the fleet's operator key to command the relay.
const RELAY_RULE: &str = "fleet-relay-remote";
/// The command domain of the relay's rule, which the operator key signs.
const RELAY_DOMAIN: &str = "fleet/relay";
/// Blocks a relay command stays valid for after the height it was made at.
const RELAY_VALID_BLOCKS: u32 = 144;
/// Fee of the driver's transactions (regtest).
const FEE_SAT: u64 = 1_000;
/// How long the meter may take to close its session when `up` stops: the prepaid
/// delivery limit (`bitmote_pay::meter::DELIVERY_LIMIT`, 30 s), the close and the
/// receipts' flush, with room.
const METER_STOP: Duration = Duration::from_secs(75);

/// `[fleet]`: the simulated fleet `bitmote up` runs beside the gateway on regtest (real
/// separate processes: sensors, a rental lock, a relay, an energy provider and meter).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSection {
    /// Run the fleet (default true; `bitmote up --no-sim` = false). Regtest only.
    pub enabled: Option<bool>,
    /// Simulated sensors publishing signed readings over MQTT (default 24).
    pub sensors: Option<u32>,
    /// Milliseconds between a sensor's sends (default 2000).
    pub sensor_interval_ms: Option<u64>,
    /// Every n-th sensor signs batches instead of single readings (default 4; 0 = none).
    pub batch_every: Option<u32>,
    /// Readings per signed batch of those sensors (default 8).
    pub batch_size: Option<u32>,
    /// Price of one rental of the lock, paid on-chain to a fresh order address (default 20000 sat).
    pub rental_sat: Option<u64>,
    /// Blocks between the end of a lease and the next rental order (default 3).
    pub rental_every_blocks: Option<u32>,
    /// Blocks a paid rental keeps the lock open (a height rule locks it again; default 3).
    pub lease_blocks: Option<u32>,
    /// Blocks between signed on-chain commands toggling the relay (default 4; 0 = never).
    pub relay_every_blocks: Option<u32>,
    /// Run the Lightning energy provider and meter (default true).
    pub meter: Option<bool>,
    /// The provider's tick length in ms (default 2000).
    pub tick_ms: Option<u64>,
    /// The provider's JSON API (default 127.0.0.1:8660; port 0 = pick a free port once and keep it).
    pub provider_http: Option<std::net::SocketAddr>,
    /// The provider's Lightning P2P address (default 127.0.0.1:9735; port 0 as above).
    pub provider_ln: Option<std::net::SocketAddr>,
    /// Where the provider process binds its JSON API, when that is not where it is reached
    /// (`provider_http`, which the meter and the dashboard use): behind a port forward or a
    /// proxy. Default: `provider_http`.
    pub provider_http_bind: Option<std::net::SocketAddr>,
    /// Where the provider's Lightning node listens, when that is not where peers reach it
    /// (`provider_ln`, which it then announces: `bitmote provider run --ln-announce`).
    /// Default: `provider_ln`.
    pub provider_ln_bind: Option<std::net::SocketAddr>,
    /// The meter's JSON API (default 127.0.0.1:8661; port 0 as above).
    pub meter_http: Option<std::net::SocketAddr>,
    /// The meter's Lightning P2P address (default 127.0.0.1:9736; port 0 as above).
    pub meter_ln: Option<std::net::SocketAddr>,
}

/// The fleet's settings, from `[fleet]` with defaults; ports resolved.
#[derive(Debug, Clone)]
pub struct Plan {
    pub sensors: u32,
    pub sensor_interval_ms: u64,
    pub batch_every: u32,
    pub batch_size: u32,
    pub rental_sat: u64,
    pub rental_every_blocks: u32,
    pub lease_blocks: u32,
    pub relay_every_blocks: u32,
    pub meter: bool,
    pub tick_ms: u64,
    /// Where the provider is reached (its API; its Lightning node, which it announces).
    pub provider_http: SocketAddr,
    pub provider_ln: SocketAddr,
    /// Where the provider process binds them (the same unless it sits behind a port
    /// forward or a proxy: `[fleet] provider_http_bind`, `provider_ln_bind`).
    pub provider_http_bind: SocketAddr,
    pub provider_ln_bind: SocketAddr,
    pub meter_http: SocketAddr,
    pub meter_ln: SocketAddr,
    /// The gateway's Lightning node, the hub the meter pays the provider through (None:
    /// `[gateway] lightning = false`, the meter then has a channel to the provider).
    pub gateway_ln: Option<SocketAddr>,
}

/// Ports picked for `port 0` settings on the first start, kept so restarts reuse them
/// (the meter's Lightning node remembers the provider's address).
#[derive(Default, Serialize, Deserialize)]
struct Ports(std::collections::BTreeMap<String, SocketAddr>);

impl Plan {
    /// The plan from `[fleet]` (`f`), the gateway's Lightning settings (whether it runs a
    /// node, and where it listens) and a `--sensors` override.
    pub fn resolve(
        f: &FleetSection,
        gateway_lightning: Option<bool>,
        gateway_lightning_listen: Option<SocketAddr>,
        fleet_dir: &Path,
        sensors: Option<u32>,
    ) -> Result<Plan> {
        let path = fleet_dir.join("ports.json");
        let mut ports: Ports = fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        let mut changed = false;
        let mut port = |key: &str, set: Option<SocketAddr>, default: u16| -> Result<SocketAddr> {
            let want = set.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], default)));
            if want.port() != 0 {
                return Ok(want);
            }
            if let Some(a) = ports.0.get(key).filter(|a| a.ip() == want.ip()) {
                return Ok(*a);
            }
            let a = std::net::TcpListener::bind(want).and_then(|l| l.local_addr()).with_context(|| format!("picking a port for {key}"))?;
            ports.0.insert(key.into(), a);
            changed = true;
            Ok(a)
        };
        let provider_http = port("provider_http", f.provider_http, 8660)?;
        let provider_ln = port("provider_ln", f.provider_ln, 9735)?;
        let provider_http_bind = match f.provider_http_bind {
            Some(b) => port("provider_http_bind", Some(b), 0)?,
            None => provider_http,
        };
        let provider_ln_bind = match f.provider_ln_bind {
            Some(b) => port("provider_ln_bind", Some(b), 0)?,
            None => provider_ln,
        };
        let plan = Plan {
            sensors: sensors.or(f.sensors).unwrap_or(24),
            sensor_interval_ms: f.sensor_interval_ms.unwrap_or(2000).max(10),
            batch_every: f.batch_every.unwrap_or(4),
            batch_size: f.batch_size.unwrap_or(8).max(1),
            rental_sat: f.rental_sat.unwrap_or(20_000).max(1_000),
            rental_every_blocks: f.rental_every_blocks.unwrap_or(3),
            lease_blocks: f.lease_blocks.unwrap_or(3).max(1),
            relay_every_blocks: f.relay_every_blocks.unwrap_or(4),
            meter: f.meter.unwrap_or(true),
            tick_ms: f.tick_ms.unwrap_or(2000).max(100),
            provider_http,
            provider_ln,
            provider_http_bind,
            provider_ln_bind,
            meter_http: port("meter_http", f.meter_http, 8661)?,
            meter_ln: port("meter_ln", f.meter_ln, 9736)?,
            gateway_ln: match gateway_lightning {
                Some(false) => None,
                _ => Some(port("gateway_ln", gateway_lightning_listen, 9737)?),
            },
        };
        if changed {
            fs::create_dir_all(fleet_dir)?;
            bitmote_chain::stream::write_atomic(&path, &serde_json::to_vec_pretty(&ports)?)?;
        }
        Ok(plan)
    }

    pub fn provider_url(&self) -> String {
        format!("http://{}", self.provider_http)
    }

    pub fn meter_url(&self) -> String {
        format!("http://{}", self.meter_http)
    }
}

/// One child process of the fleet.
pub struct Member {
    pub name: String,
    /// `sensor`, `lock`, `relay`, `provider` or `meter`.
    pub kind: &'static str,
    args: Vec<OsString>,
    pub log: PathBuf,
    /// The status URL of a provider or meter.
    pub url: Option<String>,
    /// Not (re)started before this URL answers (the meter waits for its provider).
    after: Option<String>,
    proc: Option<Child>,
    pub restarts: u32,
    next_start: Option<Instant>,
    backoff: Duration,
    started: Instant,
}

impl Member {
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Child::id)
    }
}

/// The running fleet.
pub struct Fleet {
    exe: PathBuf,
    dir: PathBuf,
    global: Vec<OsString>,
    env: Vec<(String, String)>,
    pub members: Vec<Member>,
    pub plan: Plan,
}

fn answers(url: &str) -> bool {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_millis(500)).build();
    agent.get(&format!("{url}/v1/status")).call().is_ok()
}

fn append(log: &Path, line: &str) {
    if let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(log) {
        let _ = writeln!(f, "--- bitmote up, {} ms: {line}", now_ms());
    }
}

/// What the fleet is started from: the `bitmote` executable its members run (`device
/// sensor`, `device actuator`, `provider run`, `meter run`), the data directory they live
/// under, the configuration file they share, and the gateway (with its admin token) that
/// enrols them.
pub struct Setup {
    pub exe: PathBuf,
    pub data_dir: PathBuf,
    pub config_file: Option<PathBuf>,
    pub admin: Gateway,
}

/// Where the gateway is, for the children.
pub struct Endpoints<'a> {
    pub gateway_url: String,
    pub mqtt: Option<SocketAddr>,
    pub client: &'a ChainClient,
    /// The gateway's Lightning node (`<node id>@<host:port>`), when it runs one.
    pub hub: Option<String>,
}

impl Fleet {
    /// Keys made and enrolled (first start only), children defined; nothing runs yet.
    pub fn prepare(setup: &Setup, plan: Plan, at: &Endpoints) -> Result<Fleet> {
        let dir = setup.data_dir.join("fleet");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let exe = setup.exe.clone();
        let mut env = vec![("BITMOTE_GATEWAY_URL".to_string(), at.gateway_url.clone())];
        // The children reach the same node: the embedded one by its cookie.
        let rpc = at.client.config();
        if let bitmote_chain::RpcAuth::Cookie(p) = &rpc.auth {
            env.push(("BITMOTE_CHAIN_RPC_URL".into(), rpc.url.clone()));
            env.push(("BITMOTE_CHAIN_RPC_COOKIE".into(), p.display().to_string()));
            env.push(("BITMOTE_CHAIN_NETWORK".into(), rpc.network.to_core_arg().into()));
        }
        let mut global: Vec<OsString> = vec![];
        if let Some(c) = &setup.config_file {
            global.extend(["--config".into(), c.into()]);
        }
        let mut members = vec![];
        let mut member =
            |name: String, kind: &'static str, data_dir: &Path, args: Vec<OsString>, url: Option<String>, after: Option<String>| {
                let mut full: Vec<OsString> = vec!["--data-dir".into(), data_dir.into()];
                full.extend(args);
                members.push(Member {
                    log: dir.join(format!("{name}.log")),
                    name,
                    kind,
                    args: full,
                    url,
                    after,
                    proc: None,
                    restarts: 0,
                    next_start: None,
                    backoff: Duration::from_secs(2),
                    started: Instant::now(),
                });
            };
        let mqtt = at.mqtt.map(|a| a.to_string());
        // Sensors: keys made and enrolled once, through the same path as `device enroll`.
        let bar = progress(plan.sensors as u64, "sensors: keys and enrolment");
        for i in 1..=plan.sensors {
            let name = format!("sensor-{i:02}");
            let sdir = dir.join(&name);
            fs::create_dir_all(&sdir)?;
            let key = sdir.join("device.key");
            keys::ensure_enrolled(&setup.admin, &key, &name)?;
            let batch = if plan.batch_every > 0 && i % plan.batch_every == 0 { plan.batch_size } else { 1 };
            let mut args: Vec<OsString> = vec!["device".into(), "sensor".into(), "--key".into(), key.into()];
            match &mqtt {
                Some(m) => args.extend(["--mqtt".into(), m.into()]),
                None => args.extend(["--transport".into(), "http".into()]),
            }
            args.extend(["--interval-ms".into(), plan.sensor_interval_ms.to_string().into(), "--batch".into(), batch.to_string().into()]);
            member(name, "sensor", &sdir, args, None, None);
            bar.inc(1);
        }
        bar.finish_and_clear();
        // The lock and the relay (MQTT only: commands and acknowledgements travel over it).
        match &mqtt {
            Some(m) => {
                for (name, kind) in [(LOCK, "lock"), (RELAY, "relay")] {
                    let adir = dir.join(name);
                    fs::create_dir_all(&adir)?;
                    let key = adir.join("device.key");
                    keys::ensure_enrolled(&setup.admin, &key, name)?;
                    let args = vec![
                        "device".into(),
                        "actuator".into(),
                        "--name".into(),
                        name.into(),
                        "--mqtt".into(),
                        m.into(),
                        "--state".into(),
                        adir.join("state.json").into(),
                        "--key".into(),
                        key.into(),
                    ];
                    member(name.into(), kind, &adir, args, None, None);
                }
            }
            None => tracing::warn!("no embedded MQTT broker: the fleet runs without its lock and relay"),
        }
        if plan.meter {
            let mut provider: Vec<OsString> = vec![
                "provider".into(),
                "run".into(),
                "--name".into(),
                "provider".into(),
                "--ln-listen".into(),
                plan.provider_ln_bind.to_string().into(),
                "--http".into(),
                plan.provider_http_bind.to_string().into(),
                "--tick-ms".into(),
                plan.tick_ms.to_string().into(),
                // Generous: on a busy machine a tick can be late without the meter cheating.
                "--grace-ms".into(),
                (plan.tick_ms * 5).to_string().into(),
            ];
            // Peers (the hub) must connect where the provider is reached, not where it binds.
            if plan.provider_ln != plan.provider_ln_bind {
                provider.extend(["--ln-announce".into(), plan.provider_ln.to_string().into()]);
            }
            member("provider".into(), "provider", &dir, provider, Some(plan.provider_url()), None);
            // The meter's device key, made here so it can be enrolled before the meter first
            // starts: each paid tick's signed register then goes to the notary as a receipt.
            let mdir = dir.join("meter");
            fs::create_dir_all(&mdir)?;
            let enrolled = mdir.join("meter.enrolled");
            if !enrolled.exists() {
                let k = bitmote_pay::meter::device_key(&bitmote_pay::meter::load_or_create_secret(&mdir)?)?;
                match setup.admin.enroll(&k.public_key().to_string(), Some("meter")) {
                    Ok(_) => {}
                    // The name is another key's: the meter still streams, its receipts are refused.
                    Err(e) if e.status() == Some(409) => tracing::warn!("enrolling the meter's device key: {e}"),
                    Err(e) => return Err(e).context("enrolling the meter's device key"),
                }
                fs::write(&enrolled, k.public_key().device_id().to_string())?;
            }
            let mut meter: Vec<OsString> = vec![
                "meter".into(),
                "run".into(),
                "--name".into(),
                "meter".into(),
                "--ln-listen".into(),
                plan.meter_ln.to_string().into(),
                "--http".into(),
                plan.meter_http.to_string().into(),
                "--provider-url".into(),
                plan.provider_url().into(),
                "--notary-url".into(),
                at.gateway_url.clone().into(),
            ];
            if let Some(hub) = &at.hub {
                meter.extend(["--via".into(), hub.into()]);
            }
            member("meter".into(), "meter", &dir, meter, Some(plan.meter_url()), Some(plan.provider_url()));
        }
        Ok(Fleet { exe, dir, global, env, members, plan })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let m = &mut self.members[i];
        let log = fs::OpenOptions::new().create(true).append(true).open(&m.log).with_context(|| format!("opening {}", m.log.display()))?;
        let mut cmd = Command::new(&self.exe);
        cmd.args(&self.global)
            .args(&m.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env_remove("BITMOTE_CONFIG")
            .env_remove("BITMOTE_DATA_DIR")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let parent = std::process::id() as i32;
        {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    // Die with `up`, even if it is killed with SIGKILL.
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 || libc::getppid() != parent {
                        libc::_exit(1);
                    }
                    Ok(())
                });
            }
        }
        append(&m.log, &format!("starting {} {}", m.name, m.args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")));
        let child = cmd.spawn().with_context(|| format!("starting {}", m.name))?;
        m.proc = Some(child);
        m.next_start = None;
        m.started = Instant::now();
        Ok(())
    }

    /// Start every member that can start now.
    pub fn start(&mut self) -> Result<()> {
        for i in 0..self.members.len() {
            if self.members[i].after.as_deref().is_none_or(answers) {
                self.spawn(i)?;
            } else {
                self.members[i].next_start = Some(Instant::now() + Duration::from_millis(500));
            }
        }
        Ok(())
    }

    /// Restart members that exited (with backoff); true when something changed.
    pub fn supervise(&mut self) -> bool {
        let mut changed = false;
        for i in 0..self.members.len() {
            let m = &mut self.members[i];
            if let Some(p) = &mut m.proc {
                match p.try_wait() {
                    Ok(Some(status)) => {
                        m.proc = None;
                        // A member that got going (it ran for a while) and then died is
                        // restarted promptly, however often it happens (a machine killed from
                        // outside, as the fault drill does every few rounds); only one that
                        // dies right after starting (a crash loop) backs off, up to a minute.
                        if m.started.elapsed() > RAN_WELL {
                            m.backoff = Duration::from_secs(2);
                        }
                        append(&m.log, &format!("{} exited ({status}); restarting in {} s", m.name, m.backoff.as_secs()));
                        tracing::warn!(
                            "fleet: {} exited ({status}); restarting in {} s (log {})",
                            m.name,
                            m.backoff.as_secs(),
                            m.log.display()
                        );
                        m.next_start = Some(Instant::now() + m.backoff);
                        m.backoff = (m.backoff * 2).min(Duration::from_secs(60));
                        m.restarts += 1;
                        changed = true;
                    }
                    Ok(None) => continue,
                    Err(e) => tracing::warn!("fleet: {}: {e}", m.name),
                }
            }
            let due = m.next_start.is_some_and(|t| Instant::now() >= t);
            if due && m.after.as_deref().is_none_or(answers) {
                if let Err(e) = self.spawn(i) {
                    tracing::warn!("fleet: {e:#}");
                    self.members[i].next_start = Some(Instant::now() + Duration::from_secs(5));
                }
                changed = true;
            } else if due {
                m.next_start = Some(Instant::now() + Duration::from_millis(500));
            }
        }
        changed
    }

    /// Stop every child: the meter first (it settles its tick in flight, delivers a
    /// prepaid tick ahead, closes its session with the provider and posts its receipts:
    /// usually a few seconds, [`METER_STOP`] at most), then the rest together; SIGKILL
    /// for any that does not exit in time. Waits for all.
    pub fn stop(&mut self) -> Vec<(String, Option<ExitStatus>)> {
        let mut out = vec![];
        let (meters, rest): (Vec<usize>, Vec<usize>) = (0..self.members.len()).partition(|&i| self.members[i].kind == "meter");
        for (group, grace) in [(meters, METER_STOP), (rest, Duration::from_secs(20))] {
            for &i in &group {
                if let Some(p) = &self.members[i].proc {
                    // SAFETY: a signal to our own child.
                    unsafe { libc::kill(p.id() as i32, libc::SIGTERM) };
                }
            }
            let deadline = Instant::now() + grace;
            for &i in &group {
                let m = &mut self.members[i];
                m.next_start = None;
                let Some(mut p) = m.proc.take() else { continue };
                let status = loop {
                    match p.try_wait() {
                        Ok(Some(s)) => break Some(s),
                        Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                        _ => {
                            tracing::warn!("fleet: {} did not stop in time; killing it", m.name);
                            let _ = p.kill();
                            break p.wait().ok();
                        }
                    }
                };
                append(&m.log, &format!("{} stopped ({})", m.name, status.map(|s| s.to_string()).unwrap_or_default()));
                out.push((m.name.clone(), status));
            }
        }
        out
    }

    /// The fleet as JSON, for `up.json` and `bitmote status`.
    pub fn json(&self) -> Json {
        json!(self
            .members
            .iter()
            .map(|m| json!({ "name": m.name, "kind": m.kind, "pid": m.pid(), "log": m.log, "url": m.url, "restarts": m.restarts }))
            .collect::<Vec<_>>())
    }
}

impl Drop for Fleet {
    /// Never leave a child behind, whatever path `up` leaves by.
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut p) = m.proc.take() {
                let _ = p.kill();
                let _ = p.wait();
            }
        }
    }
}

/// A progress bar on a terminal (hidden otherwise).
pub fn progress(len: u64, msg: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(indicatif::ProgressStyle::with_template("{spinner} {msg:40} {bar:30} {pos}/{len}").expect("valid template"));
    bar.set_message(msg.to_string());
    bar
}

/// A spinner on a terminal for a step of unknown length.
pub fn spinner(msg: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_msg}").expect("valid template"));
    bar.set_message(msg.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Size of the hub's channel to the fleet's provider (sat).
const HUB_CHANNEL_SAT: u64 = 1_000_000;

/// In the background, for as long as `up` runs: once the fleet's provider answers, give the
/// gateway's Lightning node (the hub) an announced channel to it (funded on regtest from a
/// coinbase; nothing to do after a restart), so the meter can pay the provider through the
/// hub; and whenever the provider (re)starts, connect the hub to it at once rather than at
/// ldk-node's next reconnection round (up to a minute, in which the meter's payments fail).
pub fn link_hub_to_provider(
    hub: std::sync::Arc<bitmote_pay::ldk_node::Node>,
    faucet: bitmote_regtest::RegtestFaucet,
    provider_url: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use bitmote_pay::node as ln;
    let provider = move |agent: &ureq::Agent| -> Result<_> {
        crate::machine_node(agent.get(&format!("{provider_url}/v1/status")).call()?.into_json()?)
    };
    let watch = move || {
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(2)).build();
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(Duration::from_secs(1));
            let Ok((pk, addr)) = provider(&agent) else { continue };
            let step = || -> Result<()> {
                if ln::channels_with(&hub, &pk).is_empty() {
                    ln::open_funded_channel(Some(&faucet), &hub, pk, addr.clone(), HUB_CHANNEL_SAT, true)?;
                    tracing::info!("hub: the gateway's Lightning node has a {HUB_CHANNEL_SAT} sat announced channel to the provider {pk}");
                } else if !hub.list_peers().iter().any(|p| p.node_id == pk && p.is_connected) {
                    hub.connect(pk, addr.clone(), true).map_err(|e| anyhow::anyhow!("connecting to the provider {pk}: {e}"))?;
                    tracing::info!("hub: connected to the provider {pk}");
                }
                Ok(())
            };
            if let Err(e) = step() {
                tracing::warn!("hub: {e:#}; trying again");
                std::thread::sleep(Duration::from_secs(5));
            }
        }
    };
    if let Err(e) = std::thread::Builder::new().name("hub".into()).spawn(watch) {
        tracing::warn!("hub: {e}");
    }
}

/// What the driver remembers across restarts (`<data-dir>/fleet/driver.json`).
#[derive(Default, Serialize, Deserialize)]
struct DriverState {
    /// Next height whose coinbase may still hold spendable regtest coins.
    coinbase_cursor: u32,
    relay_seq: u32,
    relay_on: bool,
    last_relay_height: u32,
    rental: Option<Rental>,
    next_rental_height: u32,
    rentals: u64,
    /// Rules of finished rentals (from an older version: removed when the next one starts).
    old_rules: Vec<String>,
    /// Rules of finished rentals and the height their rental ended: removed once that is
    /// [`RULE_KEEP_BLOCKS`] deep, so a reorg can still revert (or re-fire) what they did.
    #[serde(default)]
    retired: Vec<(String, u32)>,
}

/// How deep a finished rental's end must be before its rules are removed: as deep as the
/// deepest reorg the gateway's block stream follows (`max_reorg_depth`, 100), so a reorg
/// can always still revert (or re-fire) what they did. (The drill's reorgs are up to 6
/// deep, but a regtest node killed at the wrong time comes back having lost tens of
/// unflushed blocks: seen 23.) A removed rule's actions are not reverted by the engine.
const RULE_KEEP_BLOCKS: u32 = 100;

#[derive(Clone, Serialize, Deserialize)]
struct Rental {
    order_id: String,
    address: String,
    amount: u64,
    txid: String,
    paid_height: u32,
    lease_rule: String,
    lease_end: u32,
}

/// Makes the chain events the fleet's actuators react to, one step per block.
pub struct Driver {
    admin: Gateway,
    client: ChainClient,
    path: PathBuf,
    state: DriverState,
    operator: SigningKey,
    plan: Plan,
    has_lock: bool,
    relay_rule: bool,
    /// The gateway's log origin, once asked (see [`Driver::gateway_origin`]).
    origin: String,
}

impl Driver {
    pub fn new(fleet: &Fleet, admin: Gateway, client: &ChainClient) -> Result<Driver> {
        let path = fleet.dir().join("driver.json");
        let state = match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).with_context(|| format!("corrupt {}", path.display()))?,
            Err(_) => DriverState { coinbase_cursor: 1, ..Default::default() },
        };
        let key = fleet.dir().join("operator.key");
        if !key.exists() {
            keys::write_key(&key, &keys::new_key(false)?)?;
        }
        let has = |k: &str| fleet.members.iter().any(|m| m.kind == k);
        let mut d = Driver {
            admin,
            client: client.fresh()?,
            path,
            state,
            operator: keys::read_key(&key)?,
            plan: fleet.plan.clone(),
            has_lock: has("lock"),
            relay_rule: false,
            origin: String::new(),
        };
        if has("relay") && d.plan.relay_every_blocks > 0 {
            d.ensure_relay_rule()?;
        }
        Ok(d)
    }

    fn save(&self) -> Result<()> {
        bitmote_chain::stream::write_atomic(&self.path, &serde_json::to_vec_pretty(&self.state)?)?;
        Ok(())
    }

    /// The gateway's identity, which commands are signed for: its log origin.
    fn gateway_origin(&self) -> Result<String> {
        Ok(self.admin.log()?.origin)
    }

    /// The rule letting the operator key command the relay (kept by the gateway across restarts).
    fn ensure_relay_rule(&mut self) -> Result<()> {
        let rule = Rule {
            id: RELAY_RULE.into(),
            device: RELAY.into(),
            trigger: Trigger::Command { key: self.operator.public_key().to_string(), domain: Some(RELAY_DOMAIN.into()), confirmations: 1 },
            action: Action::new("*"),
            revert: Some(Action::new("inverse")),
            ttl_secs: Some(600),
        };
        match self.add_rule(&rule) {
            Ok(()) => {}
            Err(e) if e.status() == Some(409) && self.stored_relay_rule_predates_domains()? => {
                // Stored before commands named a domain: it matches no command any more.
                self.admin.delete(&format!("/v1/rules/{RELAY_RULE}"))?;
                self.add_rule(&rule).context("adding the relay's rule")?;
            }
            Err(e) if e.status() == Some(409) => {}
            Err(e) => return Err(e).context("adding the relay's rule"),
        }
        self.relay_rule = true;
        Ok(())
    }

    /// Whether the gateway keeps the relay's rule from before commands named a domain.
    fn stored_relay_rule_predates_domains(&self) -> Result<bool> {
        #[derive(serde::Deserialize)]
        struct Rules {
            rules: Vec<Entry>,
        }
        #[derive(serde::Deserialize)]
        struct Entry {
            id: String,
            trigger: TriggerDomain,
        }
        #[derive(serde::Deserialize)]
        struct TriggerDomain {
            domain: Option<String>,
        }
        let r: Rules = self.admin.get("/v1/rules")?;
        Ok(r.rules.iter().any(|e| e.id == RELAY_RULE && e.trigger.domain.is_none()))
    }

    fn add_rule(&self, rule: &Rule) -> Result<(), ClientError> {
        self.admin.post::<_, serde::de::IgnoredAny>("/v1/rules", rule).map(drop)
    }

    /// A mature, unspent anyone-can-spend coinbase worth at least `sat` (regtest).
    fn coin(&mut self, sat: u64) -> Result<bitmote_chain::bitcoin::Transaction> {
        let tip = self.client.tip()?.height;
        let spk = op_true_address().script_pubkey();
        let mut h = self.state.coinbase_cursor.max(1);
        while h + 100 <= tip {
            let cb = coinbase_at(&self.client, h)?;
            h += 1;
            let Some(vout) = cb.output.iter().position(|o| o.script_pubkey == spk && o.value.to_sat() >= sat + FEE_SAT) else { continue };
            let unspent: Json = self.client.raw("gettxout", &[json!(cb.compute_txid()), json!(vout), json!(true)])?;
            if !unspent.is_null() {
                self.state.coinbase_cursor = h;
                return Ok(cb);
            }
        }
        self.state.coinbase_cursor = h;
        bail!("no mature regtest coins to spend yet (tip {tip})")
    }

    fn send(&mut self, outputs: Vec<TxOut>) -> Result<String> {
        let sat: u64 = outputs.iter().map(|o| o.value.to_sat()).sum();
        let cb = self.coin(sat)?;
        let tx = spend_op_true(&cb, outputs, FEE_SAT).context("the coinbase pays enough")?;
        Ok(self.client.broadcast(&tx)?.to_string())
    }

    /// One step on a new block at `height`; problems are logged and retried on the next block.
    pub fn on_block(&mut self, height: u32) {
        if let Err(e) = self.relay(height) {
            tracing::warn!("fleet relay: {e:#}");
        }
        if let Err(e) = self.rental(height) {
            tracing::warn!("fleet rental: {e:#}");
        }
        if let Err(e) = self.save() {
            tracing::warn!("fleet: saving {}: {e:#}", self.path.display());
        }
    }

    /// Every `relay_every_blocks`, a signed on-chain command toggles the relay.
    fn relay(&mut self, height: u32) -> Result<()> {
        let every = self.plan.relay_every_blocks;
        if every == 0 || !self.relay_rule || height < self.state.last_relay_height + every {
            return Ok(());
        }
        let word = if self.state.relay_on { "off" } else { "on" };
        let seq = self.state.relay_seq + 1;
        if self.origin.is_empty() {
            self.origin = self.gateway_origin()?;
        }
        let scope =
            bitmote_actuator::command::Scope { network: self.client.network(), gateway: &self.origin, domain: RELAY_DOMAIN, device: RELAY };
        let payload = bitmote_actuator::command::encode(&self.operator, &scope, seq, height + RELAY_VALID_BLOCKS, word)?;
        // The sequence number is spent before the command is sent: never reused.
        self.state.relay_seq = seq;
        self.save()?;
        let script = ScriptBuf::new_op_return(<&bitmote_chain::bitcoin::script::PushBytes>::try_from(payload.as_slice())?);
        let txid = self.send(vec![TxOut { value: Amount::ZERO, script_pubkey: script }])?;
        tracing::info!("fleet: relay command {seq} {word:?} in {txid}");
        self.state.relay_on = !self.state.relay_on;
        self.state.last_relay_height = height;
        Ok(())
    }

    /// The rental cycle: order (a fresh address), pay it, a lease rule locks again later.
    fn rental(&mut self, height: u32) -> Result<()> {
        if !self.has_lock {
            return Ok(());
        }
        if let Some(r) = &self.state.rental {
            if r.txid.is_empty() && height < r.lease_end {
                // Ordered but not paid (no coins then, or a restart in between): pay now.
                let (address, amount) = (r.address.clone(), r.amount);
                let spk = address.parse::<bitmote_chain::bitcoin::Address<_>>()?.require_network(self.client.network())?.script_pubkey();
                let txid = self.send(vec![TxOut { value: Amount::from_sat(amount), script_pubkey: spk }])?;
                tracing::info!("fleet: paid {amount} sat to {address} in {txid}");
                if let Some(r) = &mut self.state.rental {
                    r.txid = txid;
                }
                return Ok(());
            }
            if height >= r.lease_end {
                let r = r.clone();
                self.state.retired.extend([(r.order_id, height), (r.lease_rule, height)]);
                self.state.rental = None;
                self.state.next_rental_height = height + self.plan.rental_every_blocks;
            }
            return Ok(());
        }
        let (done, keep): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.state.retired).into_iter().partition(|(_, h)| height >= h + RULE_KEEP_BLOCKS);
        self.state.retired = keep;
        self.state.old_rules.extend(done.into_iter().map(|(id, _)| id));
        for id in std::mem::take(&mut self.state.old_rules) {
            match self.admin.delete(&format!("/v1/rules/{id}")) {
                Ok(()) => {}
                Err(e) if e.status() == Some(404) => {}
                Err(e) => tracing::warn!("fleet: removing rule {id}: {e}"),
            }
        }
        if height < self.state.next_rental_height {
            return Ok(());
        }
        let order = OrderRequest {
            min_sat: self.plan.rental_sat,
            confirmations: Some(1),
            action: Action::new("unlock"),
            revert: Some(Action::new("lock")),
            ttl_secs: Some(600),
        };
        let o: Order = match self.admin.post(&format!("/v1/devices/{LOCK}/orders"), &order) {
            Ok(o) => o,
            Err(e) if e.status() == Some(409) => return Ok(()), // the lock is not online yet
            Err(e) => return Err(e).context("ordering a rental"),
        };
        let (order_id, address) = (o.order_id, o.address);
        let spk = address.parse::<bitmote_chain::bitcoin::Address<_>>()?.require_network(self.client.network())?.script_pubkey();
        self.state.rentals += 1;
        let lease_rule = format!("fleet-lease-{}", self.state.rentals);
        let lease_end = height + 1 + self.plan.lease_blocks;
        // Saved before paying, so a restart never pays an order twice.
        self.state.rental = Some(Rental {
            order_id: order_id.clone(),
            address: address.clone(),
            amount: self.plan.rental_sat,
            txid: String::new(),
            paid_height: height,
            lease_rule: lease_rule.clone(),
            lease_end,
        });
        self.save()?;
        let rule = Rule {
            id: lease_rule,
            device: LOCK.into(),
            trigger: Trigger::Height { height: lease_end },
            action: Action::new("lock"),
            ttl_secs: Some(600),
            // The chain falls back below the lease's end (a reorg to a shorter chain, a node
            // that lost blocks): the lease has not ended after all, so the lock opens again;
            // it locks again (a new generation) when the chain passes the end once more.
            revert: Some(Action::new("inverse")),
        };
        match self.add_rule(&rule) {
            Ok(()) => {}
            Err(e) if e.status() == Some(409) => {}
            Err(e) => return Err(e).context("adding the lease rule"),
        }
        let txid = self.send(vec![TxOut { value: Amount::from_sat(self.plan.rental_sat), script_pubkey: spk }])?;
        tracing::info!("fleet: rental {order_id}: paid {} sat to {address} in {txid}; lease ends at {lease_end}", self.plan.rental_sat);
        if let Some(r) = &mut self.state.rental {
            r.txid = txid;
        }
        Ok(())
    }

    /// For `up.json`.
    pub fn json(&self) -> Json {
        json!({
            "rentals": self.state.rentals, "rental": self.state.rental.as_ref().map(|r| json!({
                "order_id": r.order_id, "address": r.address, "amount": r.amount, "txid": r.txid, "lease_end": r.lease_end })),
            "relay_commands": self.state.relay_seq, "relay_on": self.state.relay_on,
            "operator_key": self.operator.public_key().to_string(),
        })
    }
}
