//! `bitmote up`, `bitmote node …` and `bitmote chain …`: provisioning, running and
//! following the Bitcoin node.

use std::fs;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bitmote_chain::bitcoin::{Address, Network};
use bitmote_chain::{BlockEvent, BlockStream, ChainClient, CursorStore, FileCursorStore, Start, StreamConfig};
use bitmote_regtest::provision::{self, Bitcoind, InstallOptions, LogProgress, Progress};
use bitmote_regtest::{self, RegtestNode, RegtestOptions};
use clap::{Args, Subcommand};

use crate::config::{ChainTarget, Config};
use crate::Global;

/// Default seconds between blocks that `bitmote up` mines on its regtest node.
const DEFAULT_BLOCK_INTERVAL: u64 = 10;
/// How long `up` waits before starting its node again after it exited.
const NODE_RESTART_PAUSE: Duration = Duration::from_secs(2);
/// Blocks mined on a new regtest chain so coinbase outputs are spendable.
const REGTEST_MATURITY: u32 = 101;

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Seconds between blocks mined on the embedded regtest node (0 = don't mine).
    #[arg(long, value_name = "SECS")]
    pub block_interval: Option<u64>,
    /// Run the gateway alone, without the simulated fleet.
    #[arg(long)]
    pub no_sim: bool,
    /// Number of simulated sensors (default 24, or `[fleet] sensors`).
    #[arg(long, value_name = "N")]
    pub sensors: Option<u32>,
}

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// Make a bitcoind available: $BITCOIND_EXE, a bitcoind on PATH, the cache, or build
    /// it from the Bitcoin Core source in the `libbitcoinkernel-sys` crate (~9 min on 2 cores).
    Install {
        /// Cache root (default ~/.cache/bitmote).
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
        /// Ignore $BITCOIND_EXE and PATH: use or fill the cache.
        #[arg(long)]
        cache_only: bool,
    },
    /// Start the embedded regtest node in the background.
    Start,
    /// Stop the embedded regtest node.
    Stop,
    /// Show the node's network, version, height and peers (exit code 3 when not running).
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Mine N blocks (regtest only).
    Mine {
        n: u32,
        /// Address to mine to (default: an anyone-can-spend P2WSH(OP_TRUE) address).
        #[arg(long, value_name = "ADDRESS")]
        to: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ChainCommand {
    /// Print block connect/disconnect events as JSON lines, reorg-aware and resumable.
    Watch {
        /// First height to deliver when there is no cursor (default: only new blocks).
        #[arg(long, value_name = "HEIGHT")]
        from: Option<u32>,
        /// Persist the position here and resume from it on the next run.
        #[arg(long, value_name = "FILE")]
        cursor: Option<PathBuf>,
        /// Stop after this many events.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },
}

/// Progress of the bitcoind build as a terminal progress bar.
struct BarProgress(indicatif::ProgressBar);

impl BarProgress {
    fn new() -> Self {
        let bar = indicatif::ProgressBar::new(100);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos:>3}% {wide_msg}").expect("valid template"),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        BarProgress(bar)
    }
}

impl Progress for BarProgress {
    fn stage(&mut self, message: &str) {
        self.0.set_message(message.to_string());
    }
    fn compile(&mut self, percent: u8, line: &str) {
        self.0.set_position(percent.into());
        self.0.set_message(line.trim().chars().take(100).collect::<String>());
    }
    fn done(&mut self, message: &str) {
        self.0.finish_and_clear();
        eprintln!("{message}");
    }
}

/// Find or build bitcoind, with a progress bar on a terminal and log lines otherwise.
pub fn install(opts: &InstallOptions) -> Result<Bitcoind> {
    if let Some(found) = provision::find_bitcoind(opts)? {
        return Ok(found);
    }
    let mut progress: Box<dyn Progress> =
        if std::io::stderr().is_terminal() { Box::new(BarProgress::new()) } else { Box::new(LogProgress::new()) };
    Ok(provision::ensure_bitcoind(opts, progress.as_mut())?)
}

/// Stop flag set by Ctrl-C / SIGTERM.
pub fn stop_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    ctrlc::set_handler(move || f.store(true, Ordering::SeqCst)).context("installing the Ctrl-C handler")?;
    Ok(flag)
}

/// Exclusive lock on the data directory, so two `bitmote up` never share it.
fn lock_data_dir(data_dir: &Path) -> Result<fs::File> {
    fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let path = data_dir.join("bitmote.lock");
    let f = fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path)?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(fs::TryLockError::WouldBlock) => {
            bail!("another bitmote is already running on {} (lock {})", data_dir.display(), path.display())
        }
        Err(fs::TryLockError::Error(e)) => Err(e).context("locking the data directory"),
    }
}

/// A connected node: either the embedded regtest node (maybe started by us) or an external one.
pub struct Node {
    pub client: ChainClient,
    /// Set when this process started the node and must stop it.
    pub owned: Option<RegtestNode>,
    /// The embedded node when it was already running (a `bitmote node start` daemon).
    pub attached: Option<RegtestNode>,
    /// The embedded node's P2P address (for light clients).
    pub p2p: Option<std::net::SocketAddr>,
}

/// Connect to the configured node; on the embedded target, start it when `start` is true.
fn open_node(g: &Global, cfg: &Config, start: bool) -> Result<Option<Node>> {
    match cfg.chain_target(&g.data_dir())? {
        ChainTarget::External(rpc) => {
            let client = ChainClient::connect(rpc, Duration::from_secs(60))?;
            Ok(Some(Node { client, owned: None, attached: None, p2p: None }))
        }
        ChainTarget::Embedded { data_dir } => {
            if let Some(n) = RegtestNode::attach(&data_dir)? {
                return Ok(Some(Node { client: n.client().fresh()?, owned: None, p2p: Some(n.p2p_addr()), attached: Some(n) }));
            }
            if !start {
                return Ok(None);
            }
            let exe = install(&InstallOptions::default())?;
            let mut opts = RegtestOptions::new(exe.bitcoind);
            opts.data_dir = Some(data_dir);
            let mut n = RegtestNode::start(opts)?;
            // Whatever way `up` ends (an error included), bitcoind is stopped cleanly, never killed.
            n.set_graceful_drop(true);
            Ok(Some(Node { client: n.client().fresh()?, p2p: Some(n.p2p_addr()), owned: Some(n), attached: None }))
        }
    }
}

/// A client for the configured node, which must be running.
pub fn connect(g: &Global, cfg: &Config) -> Result<ChainClient> {
    match open_node(g, cfg, false)? {
        Some(n) => Ok(n.client),
        None => bail!("bitcoind is not running (start it with `bitmote node start` or `bitmote up`)"),
    }
}

/// How many blocks a crash of the node `up` manages may lose at most (plus the few mined
/// between two checks): well inside the blocks a stream remembers (100).
const FLUSH_EVERY_BLOCKS: u32 = 20;

pub fn up(g: &Global, args: UpArgs) -> Result<()> {
    let data_dir = g.data_dir();
    let _lock = lock_data_dir(&data_dir)?;
    let cfg = Config::load(g.config.as_deref(), &data_dir)?;
    let stop = stop_flag()?;
    let Node { client, owned, attached, p2p } = open_node(g, &cfg, true)?.expect("start = true always yields a node");
    // The embedded node, which `up` watches and starts again (same data dir and ports)
    // whenever it exits; `owned` = `up` started it and stops it at the end.
    let mut managed: Option<(RegtestNode, bool)> = owned.map(|n| (n, true)).or(attached.map(|n| (n, false)));
    let client = &client;
    let network = client.network();
    let mut info = client.info()?;
    let regtest = network == Network::Regtest;
    if regtest && info.blocks < REGTEST_MATURITY {
        let n = REGTEST_MATURITY - info.blocks;
        tracing::info!("new regtest chain: mining {n} blocks so coinbase outputs mature");
        client.mine(n, &bitmote_regtest::op_true_address())?;
        info = client.info()?;
    }
    let interval = args.block_interval.or(cfg.chain.block_interval_secs).unwrap_or(DEFAULT_BLOCK_INTERVAL);
    let mut cursor_store = FileCursorStore::new(data_dir.join("up.cursor"));
    // Headers of the last blocks, kept with the cursor: a node that comes back without its
    // last blocks (a crash) is followed like a reorg instead of refusing to start.
    let stream_cfg = StreamConfig::with_history(data_dir.join("up.history.json"));
    let mut stream = BlockStream::resume(client.fresh()?, cursor_store.load()?, Start::Tip, stream_cfg.clone())?;

    // The simulated fleet (regtest only): its ports first, so the dashboard shows the meter.
    let sim = !args.no_sim && cfg.fleet.enabled.unwrap_or(true);
    if sim && !regtest {
        say!("the simulated fleet runs on regtest only; on {network} the gateway runs alone");
    }
    let plan = match sim && regtest {
        true => Some(bitmote_sim::fleet::Plan::resolve(
            &cfg.fleet,
            cfg.gateway.lightning,
            cfg.gateway.lightning_listen,
            &data_dir.join("fleet"),
            args.sensors,
        )?),
        false => None,
    };
    let mut pay_urls = cfg.gateway.pay_status_urls.clone();
    if let Some(p) = plan.as_ref().filter(|p| p.meter) {
        for u in [p.meter_url(), p.provider_url()] {
            if !pay_urls.contains(&u) {
                pay_urls.push(u);
            }
        }
    }
    // The gateway's Lightning node: on by default beside the fleet (its hub), else opt-in.
    let lightning = match (cfg.gateway.lightning, &plan) {
        (Some(false), _) => None,
        (_, Some(p)) => p.gateway_ln,
        (Some(true), None) => Some(cfg.gateway.lightning_listen.unwrap_or(bitmote_gateway::lightning::LightningConfig::default().listen)),
        (None, None) => None,
    };
    let gateway = start_gateway(&cfg, &data_dir, client, pay_urls, lightning)?;
    let hub = match (&gateway.shared().lightning, lightning) {
        (Some(n), Some(at)) => Some((n.clone(), format!("{}@{at}", n.node_id()))),
        _ => None,
    };
    let api = format!("http://{}", gateway.http_addr);
    let mqtt_addr = match (&cfg.gateway.mqtt_broker, gateway.mqtt_addr) {
        (Some(url), _) => url.trim_start_matches("mqtt://").parse().ok(),
        (None, a) => a,
    };
    let mut fleet = match plan {
        Some(plan) => {
            let hub_for_meter = hub.as_ref().filter(|_| plan.meter);
            let at = bitmote_sim::fleet::Endpoints {
                gateway_url: api.clone(),
                mqtt: mqtt_addr,
                client,
                hub: hub_for_meter.map(|h| h.1.clone()),
            };
            if let Some((n, _)) = hub_for_meter {
                bitmote_sim::fleet::link_hub_to_provider(
                    n.clone(),
                    bitmote_regtest::RegtestFaucet::new(client)?,
                    plan.provider_url(),
                    stop.clone(),
                );
            }
            let mut f = bitmote_sim::fleet::Fleet::prepare(&fleet_setup(g, &api)?, plan, &at)?;
            f.start()?;
            Some(f)
        }
        None => None,
    };
    let mut driver = match &fleet {
        Some(f) => Some(bitmote_sim::fleet::Driver::new(f, crate::api::admin(g, &api)?, client)?),
        None => None,
    };
    let rpc = client.config();
    say!("bitmote is up");
    say!("  data dir : {}", data_dir.display());
    say!("  bitcoind : {} on {network}, height {} ({})", info.version, info.blocks, info.best_block_hash);
    say!("  rpc      : {}", rpc.url);
    if let Some(p2p) = p2p {
        say!("  p2p      : {p2p}  (compact block filters, for device actuator --light-client)");
    }
    if let bitmote_chain::RpcAuth::Cookie(p) = &rpc.auth {
        say!("  cookie   : {}", p.display());
    }
    match (regtest, interval) {
        (true, 0) => say!("  mining   : off (bitmote node mine N)"),
        (true, s) => say!("  mining   : a block every {s} s"),
        _ => {}
    }
    say!("  http api : {api}  (OpenAPI: /openapi.json)");
    say!("  dashboard: {api}/  (metrics: /metrics)");
    match (&cfg.gateway.mqtt_broker, gateway.mqtt_addr) {
        (Some(url), _) => say!("  mqtt     : external broker {url}"),
        (None, Some(a)) => say!(
            "  mqtt     : mqtt://{a}  (each device logs in with the password issued at enrolment, on its own topics bitmote/<device>/...)"
        ),
        (None, None) => say!("  mqtt     : off"),
    }
    if let Some(n) = &gateway.shared().lightning {
        let at = n.listening_addresses().unwrap_or_default().first().map(|a| a.to_string()).unwrap_or_default();
        say!("  lightning: {}@{at}  (gateway node: invoices for Lightning rules; GET /v1/lightning)", n.node_id());
    }
    say!("  admin    : token in {}", data_dir.join("gateway").join("admin.token").display());
    match &fleet {
        Some(f) => {
            say!("  fleet    : {} processes, state and logs in {}", f.members.len(), f.dir().display());
            for m in &f.members {
                let url = m.url.as_deref().map(|u| format!(" {u}")).unwrap_or_default();
                let pid = m.pid().map(|p| format!("pid {p}")).unwrap_or_else(|| "waiting".into());
                say!("    {:<10} {:<8} {:<10}{url}  log {}", m.name, m.kind, pid, m.log.display());
            }
            if driver.is_some() {
                let p = &f.plan;
                say!(
                    "    chain events: a {} sat rental order for {} every ~{} blocks (lease {} blocks), a signed on-chain command for {} every {} blocks",
                    p.rental_sat,
                    bitmote_sim::fleet::LOCK,
                    p.rental_every_blocks + p.lease_blocks + 1,
                    p.lease_blocks,
                    bitmote_sim::fleet::RELAY,
                    p.relay_every_blocks
                );
            }
        }
        None => say!("  fleet    : off"),
    }
    let status_path = data_dir.join("up.json");
    let write_status = |fleet: &Option<bitmote_sim::fleet::Fleet>, driver: &Option<bitmote_sim::fleet::Driver>| {
        let v = serde_json::json!({
            "pid": std::process::id(), "network": network.to_core_arg(), "rpc": rpc.url,
            "http": api, "dashboard": format!("{api}/"),
            "mqtt": gateway.mqtt_addr.map(|a| format!("mqtt://{a}")).or(cfg.gateway.mqtt_broker.clone()),
            "fleet": fleet.as_ref().map(|f| f.json()),
            "meter_url": fleet.as_ref().filter(|f| f.plan.meter).map(|f| f.plan.meter_url()),
            "provider_url": fleet.as_ref().filter(|f| f.plan.meter).map(|f| f.plan.provider_url()),
            "driver": driver.as_ref().map(|d| d.json()),
        });
        if let Err(e) = bitmote_chain::stream::write_atomic(&status_path, serde_json::to_string_pretty(&v).unwrap_or_default().as_bytes()) {
            tracing::warn!("writing {}: {e}", status_path.display());
        }
    };
    write_status(&fleet, &driver);
    say!("ready; press Ctrl-C to stop");
    let _ = std::io::stdout().flush();

    // The first start funds the meter and opens its channel: a spinner until its API answers.
    let mut meter_wait = fleet.as_ref().filter(|f| f.plan.meter).map(|f| {
        let bar = bitmote_sim::fleet::spinner("meter: funding its wallet and opening a channel to the provider (first start only)");
        (f.plan.meter_url(), bar, Instant::now())
    });
    let mut next_mine = Instant::now() + Duration::from_secs(interval);
    // Node supervision: when it exits, start it again after a pause that grows while it
    // keeps failing; chain errors are logged once per kind, and never end `up`.
    let mut node_backoff = Duration::from_secs(1);
    let mut next_node_start: Option<Instant> = None;
    let mut last_chain_error = String::new();
    let mut stream_retry_at: Option<Instant> = None;
    let mut flushed_at = 0u32;
    let mut next_flush_check = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        if let Some((n, owned)) = &mut managed {
            if let Some(how) = n.exited() {
                let due = *next_node_start.get_or_insert_with(|| {
                    tracing::warn!(
                        "bitcoind exited ({how}); starting it again in {} s on {}",
                        NODE_RESTART_PAUSE.as_secs(),
                        n.data_dir().display()
                    );
                    Instant::now() + NODE_RESTART_PAUSE
                });
                if Instant::now() >= due {
                    match n.restart() {
                        Ok(()) => {
                            tracing::info!("bitcoind is running again at {}", n.rpc_url());
                            n.set_graceful_drop(true);
                            next_node_start = None;
                            node_backoff = Duration::from_secs(1);
                            *owned = true; // our child now: stopped with `up`
                        }
                        Err(e) => {
                            tracing::warn!("starting bitcoind again failed: {e}; next try in {} s", node_backoff.as_secs());
                            next_node_start = Some(Instant::now() + node_backoff);
                            node_backoff = (node_backoff * 2).min(Duration::from_secs(30));
                        }
                    }
                }
            }
        }
        // The embedded node writes its chain state to disk only now and then (hourly, or when
        // its cache fills): a crash of a regtest node that mined hundreds of blocks since
        // would lose them all, more than any cursor remembers (the drill saw 301 lost). So
        // `up` asks the node it manages to flush (`gettxoutsetinfo` does, first) every
        // FLUSH_EVERY_BLOCKS blocks: a crash then loses at most that many and a few more.
        if regtest && managed.is_some() && Instant::now() >= next_flush_check {
            next_flush_check = Instant::now() + Duration::from_secs(2);
            if let Ok(tip) = client.tip() {
                if tip.height >= flushed_at.saturating_add(FLUSH_EVERY_BLOCKS) || tip.height < flushed_at {
                    match client.raw::<serde_json::Value>("gettxoutsetinfo", &[serde_json::json!("none")]) {
                        Ok(_) => flushed_at = tip.height,
                        Err(e) => tracing::debug!("flushing the node's chain state: {e}"),
                    }
                }
            }
        }
        if regtest && interval > 0 && Instant::now() >= next_mine {
            next_mine = Instant::now() + Duration::from_secs(interval);
            if let Err(e) = client.mine(1, &bitmote_regtest::op_true_address()) {
                tracing::debug!("mining failed: {e}");
            }
        }
        if let Some(f) = &mut fleet {
            if f.supervise() {
                write_status(&fleet, &driver);
            }
        }
        if let Some((url, bar, since)) = &meter_wait {
            if since.elapsed() > Duration::from_secs(2) {
                let agent = ureq::AgentBuilder::new().timeout(Duration::from_millis(500)).build();
                let st: Option<serde_json::Value> = agent.get(&format!("{url}/v1/status")).call().ok().and_then(|r| r.into_json().ok());
                if let Some(st) = st {
                    bar.finish_and_clear();
                    let channels = st["node"]["channels"].as_array().map_or(0, Vec::len);
                    say!("meter    : streaming payments to the provider ({channels} channel(s)); status {url}/v1/status");
                    meter_wait = None;
                } else {
                    meter_wait = Some((url.clone(), bar.clone(), Instant::now()));
                }
            }
        }
        if stream_retry_at.is_some_and(|t| Instant::now() < t) {
            std::thread::sleep(Duration::from_millis(250));
            continue;
        }
        if stream_retry_at.take().is_some() {
            // Reopen from the stored cursor (after an error the stream cannot get past).
            match cursor_store
                .load()
                .map_err(anyhow::Error::from)
                .and_then(|c| Ok(BlockStream::resume(client.fresh()?, c, Start::Tip, stream_cfg.clone())?))
            {
                Ok(s) => stream = s,
                Err(e) => {
                    tracing::warn!("reopening the block stream: {e:#}");
                    stream_retry_at = Some(Instant::now() + Duration::from_secs(5));
                    continue;
                }
            }
        }
        match stream.next_event(Some(Duration::from_millis(250))) {
            Ok(Some(ev)) => {
                if !last_chain_error.is_empty() {
                    tracing::info!("following the chain again");
                    last_chain_error.clear();
                }
                log_event(&ev);
                if let Err(e) = cursor_store.save(ev.cursor_after()) {
                    tracing::warn!("saving the chain cursor: {e}");
                }
                // The driver acts at the tip only, not on each block of a burst (funding mines 100).
                let at_tip = || client.tip().is_ok_and(|t| t.height == ev.id().height);
                if ev.is_connected() && driver.is_some() && at_tip() {
                    if let Some(d) = &mut driver {
                        d.on_block(ev.id().height);
                        write_status(&fleet, &driver);
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                let kind = if e.is_transient() { "the Bitcoin node is unavailable".to_string() } else { e.to_string() };
                if kind != last_chain_error {
                    if e.is_transient() {
                        tracing::warn!("{e}; the gateway keeps accepting readings, waiting for the node");
                    } else {
                        tracing::error!("{e}; retrying every 5 s");
                    }
                    last_chain_error = kind;
                }
                if e.is_transient() {
                    std::thread::sleep(Duration::from_millis(500));
                } else {
                    stream_retry_at = Some(Instant::now() + Duration::from_secs(5));
                }
            }
        }
    }
    // stdout may be gone (a closed pipe): never let that stop a clean shutdown.
    say!("stopping");
    if let Some((_, bar, _)) = meter_wait.take() {
        bar.finish_and_clear();
    }
    if let Some(f) = &mut fleet {
        for (name, status) in f.stop() {
            tracing::info!("fleet: {name} stopped ({status:?})");
        }
    }
    drop(fleet);
    gateway.shutdown();
    let _ = std::fs::remove_file(&status_path);
    match managed {
        Some((n, true)) => {
            if let Err(e) = n.stop() {
                tracing::warn!("stopping bitcoind: {e}");
            }
        }
        Some((mut n, false)) => n.set_graceful_drop(false), // a daemon of its own: left running
        None => {}
    }
    say!("stopped");
    Ok(())
}

/// Start the gateway (HTTP, MQTT, notary, anchoring) under `<data-dir>/gateway`.
fn start_gateway(
    cfg: &Config,
    data_dir: &Path,
    client: &ChainClient,
    pay_status_urls: Vec<String>,
    lightning: Option<std::net::SocketAddr>,
) -> Result<bitmote_gateway::Gateway> {
    let mut g = bitmote_gateway::GatewayConfig::new(data_dir.join("gateway"));
    g.http_listen = cfg.http_listen();
    g.mqtt_listen = cfg.mqtt_listen()?;
    g.mqtt_broker = cfg.gateway.mqtt_broker.clone();
    g.mqtt_broker_login = cfg.mqtt_broker_login()?;
    g.pay_status_urls = pay_status_urls;
    if let Some(m) = cfg.gateway.disk_reserve_mib {
        g.disk.reserve_bytes = m.checked_mul(1 << 20).context("disk_reserve_mib is too large")?;
    }
    if let Some(m) = cfg.gateway.disk_min_free_mib {
        g.disk.min_free_bytes = m.checked_mul(1 << 20).context("disk_min_free_mib is too large")?;
    }
    g.api_actions = bitmote_gateway::ApiActions {
        exec_programs: cfg.gateway.api_exec_programs.clone(),
        webhook_secret_files: cfg.gateway.api_webhook_secret_files.clone(),
    };
    let gw = &cfg.gateway;
    if let Some(n) = gw.http_max_connections {
        anyhow::ensure!(n > 0, "http_max_connections must be at least 1");
        g.http_limits.max_connections = n;
    }
    if let Some(ms) = gw.http_header_timeout_ms {
        anyhow::ensure!(ms > 0, "http_header_timeout_ms must be at least 1");
        g.http_limits.header_timeout = Duration::from_millis(ms);
    }
    if let Some(ms) = gw.http_request_timeout_ms {
        anyhow::ensure!(ms > 0, "http_request_timeout_ms must be at least 1");
        g.http_limits.request_timeout = Duration::from_millis(ms);
    }
    if let Some(n) = gw.http_anonymous_per_sec {
        g.http_limits.anonymous_per_sec = n;
    }
    if let Some(b) = gw.http_rate_limit_loopback {
        g.http_limits.limit_loopback = b;
    }
    if let Some(listen) = lightning {
        g.lightning = Some(bitmote_gateway::lightning::LightningConfig { listen, ..Default::default() });
    }
    let regtest = client.network() == Network::Regtest;
    let n = &cfg.notary;
    g.anchor.interval = Duration::from_secs(n.anchor_interval_secs.unwrap_or(if regtest { 10 } else { 600 }));
    if let Some(b) = n.bump_after_blocks {
        g.anchor.bump_after_blocks = b;
    }
    if let Some(r) = n.max_fee_rate_sat_vb {
        g.anchor.max_fee_rate = bitmote_chain::bitcoin::FeeRate::from_sat_per_vb(r).context("max_fee_rate_sat_vb is too large")?;
    }
    if regtest {
        g.anchor.final_confirmations = 3;
        // On regtest the gateway's wallets are funded by mining; elsewhere by the operator.
        g.faucet = Some(bitmote_regtest::RegtestFaucet::shared(client)?);
    }
    if let Some(o) = &n.log_origin {
        g.log_origin = o.clone();
    }
    Ok(bitmote_gateway::Gateway::start(g, client.fresh()?)?)
}

fn log_event(ev: &BlockEvent) {
    let id = ev.id();
    let what = if ev.is_connected() { "connected" } else { "disconnected" };
    tracing::info!(height = id.height, hash = %id.hash, txs = ev.block().txdata.len(), "block {what}");
}

/// What the simulated fleet is started from: this executable, the data directory, the
/// configuration file its members share, the gateway's admin API.
fn fleet_setup(g: &Global, api: &str) -> Result<bitmote_sim::fleet::Setup> {
    let data_dir = g.data_dir();
    Ok(bitmote_sim::fleet::Setup {
        exe: std::env::current_exe().context("finding the bitmote executable")?,
        config_file: Config::path(g.config.as_deref(), &data_dir),
        admin: crate::api::admin(g, api)?,
        data_dir,
    })
}

pub fn node(g: &Global, cmd: NodeCommand) -> Result<()> {
    let data_dir = g.data_dir();
    let cfg = Config::load(g.config.as_deref(), &data_dir)?;
    match cmd {
        NodeCommand::Install { cache_dir, cache_only } => {
            let mut opts = InstallOptions { cache_only, ..InstallOptions::default() };
            if let Some(d) = cache_dir {
                opts.cache_dir = d;
            }
            let b = install(&opts)?;
            println!("{} ({}, {:?})", b.bitcoind.display(), b.version, b.origin);
            Ok(())
        }
        NodeCommand::Start => {
            let ChainTarget::Embedded { data_dir: node_dir } = cfg.chain_target(&data_dir)? else {
                bail!("a node is configured by rpc_url; bitmote only starts its own regtest node");
            };
            if let Some(n) = RegtestNode::attach(&node_dir)? {
                println!("already running at {}", n.rpc_url());
                return Ok(());
            }
            let exe = install(&InstallOptions::default())?;
            let mut opts = RegtestOptions::new(exe.bitcoind);
            opts.data_dir = Some(node_dir);
            let n = RegtestNode::start_daemon(opts)?;
            println!("regtest bitcoind started at {} (cookie {})", n.rpc_url(), n.cookie_path().display());
            Ok(())
        }
        NodeCommand::Stop => {
            let ChainTarget::Embedded { data_dir: node_dir } = cfg.chain_target(&data_dir)? else {
                bail!("a node is configured by rpc_url; bitmote does not stop nodes it does not own");
            };
            match RegtestNode::attach(&node_dir)? {
                Some(n) => {
                    n.stop()?;
                    println!("stopped");
                }
                None => println!("not running"),
            }
            Ok(())
        }
        NodeCommand::Status { json } => {
            let Some(node) = open_node(g, &cfg, false)? else {
                if json {
                    println!("{}", serde_json::json!({ "running": false }));
                } else {
                    println!("bitcoind: not running (start it with `bitmote node start` or `bitmote up`)");
                }
                std::process::exit(3);
            };
            let i = node.client.info()?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "running": true, "url": node.client.config().url, "network": i.network.to_core_arg(),
                        "version": i.version, "blocks": i.blocks, "headers": i.headers,
                        "best_block_hash": i.best_block_hash.to_string(),
                        "initial_block_download": i.initial_block_download, "connections": i.connections,
                    })
                );
            } else {
                println!("bitcoind {} at {}", i.version, node.client.config().url);
                println!("  network : {}", i.network);
                println!("  height  : {} (headers {}){}", i.blocks, i.headers, if i.initial_block_download { ", syncing" } else { "" });
                println!("  tip     : {}", i.best_block_hash);
                println!("  peers   : {}", i.connections);
            }
            Ok(())
        }
        NodeCommand::Mine { n, to } => {
            let Some(node) = open_node(g, &cfg, false)? else {
                bail!("bitcoind is not running (start it with `bitmote node start`)");
            };
            let addr = match to {
                Some(s) => s
                    .parse::<Address<_>>()
                    .with_context(|| format!("invalid address {s:?}"))?
                    .require_network(node.client.network())
                    .with_context(|| format!("{s} is not a {} address", node.client.network()))?,
                None => bitmote_regtest::op_true_address(),
            };
            let hashes = node.client.mine(n, &addr)?;
            let tip = node.client.tip()?;
            println!("mined {} blocks; height {} ({})", hashes.len(), tip.height, tip.hash);
            Ok(())
        }
    }
}

pub fn chain(g: &Global, cmd: ChainCommand) -> Result<()> {
    let data_dir = g.data_dir();
    let cfg = Config::load(g.config.as_deref(), &data_dir)?;
    match cmd {
        ChainCommand::Watch { from, cursor, count } => {
            let Some(node) = open_node(g, &cfg, false)? else {
                bail!("bitcoind is not running (start it with `bitmote node start` or `bitmote up`)");
            };
            let stop = stop_flag()?;
            let mut store = cursor.map(FileCursorStore::new);
            let stored = match &store {
                Some(s) => s.load()?,
                None => None,
            };
            let start = from.map(Start::Height).unwrap_or(Start::Tip);
            let mut stream = BlockStream::resume(node.client.fresh()?, stored, start, StreamConfig::default())?;
            let mut seen = 0u64;
            let mut out = std::io::stdout().lock();
            while !stop.load(Ordering::SeqCst) && count.is_none_or(|c| seen < c) {
                let Some(ev) = stream.next_event(Some(Duration::from_millis(250)))? else { continue };
                let id = ev.id();
                let line = serde_json::json!({
                    "event": if ev.is_connected() { "connected" } else { "disconnected" },
                    "height": id.height, "hash": id.hash.to_string(), "txs": ev.block().txdata.len(),
                });
                writeln!(out, "{line}")?;
                out.flush()?;
                if let Some(s) = &mut store {
                    s.save(ev.cursor_after())?;
                }
                seen += 1;
            }
            Ok(())
        }
    }
}
