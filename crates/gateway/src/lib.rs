//! bitmote-gateway: the long-running service that devices talk to.
//!
//! It composes the capability crates: HTTP ([`http`]) and MQTT ([`mqtt`]) ingest into
//! the notary's group-commit pipeline, the anchoring loop that commits the log to
//! Bitcoin, and the read side (readings, proofs, `.ots`, checkpoints, consistency
//! proofs, anchors) with an OpenAPI description, a live dashboard ([`dashboard`]) and
//! Prometheus metrics ([`metrics`]). Everything binds to 127.0.0.1 unless configured
//! otherwise; admin calls need the token in `<data>/admin.token`.

pub mod actuator;
pub mod dashboard;
pub mod deliver;
pub mod disk;
pub mod http;
pub mod lightning;
pub mod metrics;
pub mod mqtt;
pub mod mqtt_front;
pub mod mqtt_wire;
pub mod serve;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bitmote_chain::bitcoin::Network;
use bitmote_chain::wallet::GatewayWallet;
use bitmote_chain::ChainClient;
use bitmote_notary::anchor::{AnchorConfig, AnchorError, AnchorEvent, AnchorInfo, Anchorer, LogHead};
use bitmote_notary::checkpoint::CheckpointSigner;
use bitmote_notary::ingest::{IngestConfig, Ingestor};
use bitmote_notary::log::MerkleLog;
use bitmote_notary::registry::open_db;

/// Errors starting or running the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error(transparent)]
    Ingest(#[from] bitmote_notary::ingest::IngestError),
    #[error(transparent)]
    Checkpoint(#[from] bitmote_notary::checkpoint::CheckpointError),
    #[error(transparent)]
    Chain(#[from] bitmote_chain::ChainError),
    #[error("MQTT broker: {0}")]
    Mqtt(String),
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("actuators: {0}")]
    Actuator(String),
    #[error("Lightning node: {0}")]
    Lightning(String),
}

/// How the gateway runs.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    pub data_dir: PathBuf,
    /// HTTP API and the dashboard (`/`).
    pub http_listen: SocketAddr,
    /// Embedded MQTT broker; `None` = no embedded broker.
    pub mqtt_listen: Option<SocketAddr>,
    /// An external MQTT broker (`mqtt://host:port`) to use instead of the embedded one.
    pub mqtt_broker: Option<String>,
    /// Username and password of the gateway's client on the external broker, if it wants them.
    pub mqtt_broker_login: Option<mqtt_front::BrokerLogin>,
    pub anchor: AnchorConfig,
    /// How often the anchoring loop looks at the chain and the log.
    pub anchor_poll: Duration,
    /// Where coins come from when the gateway's wallets are empty on a test chain (the
    /// anchoring wallet, and its Lightning node's on-chain reserve): supplied by the caller
    /// (`bitmote_regtest::RegtestFaucet` on regtest); `None` = the operator funds them.
    pub faucet: Option<std::sync::Arc<dyn bitmote_chain::Faucet>>,
    /// Origin line of signed checkpoints.
    pub log_origin: String,
    /// When unacknowledged actions are delivered again.
    pub actuator_retry: actuator::Retry,
    /// Lightning meter and provider processes whose `/v1/status` the dashboard shows.
    pub pay_status_urls: Vec<String>,
    /// The gateway's own Lightning node (off by default): invoices for Lightning rules,
    /// and a hub that accepts channels from machines.
    pub lightning: Option<lightning::LightningConfig>,
    /// The disk reserve and the free space ingest needs (see [`disk`]).
    pub disk: disk::DiskConfig,
    /// What rules and orders added over the admin API may run or read. Empty by default:
    /// `exec` actions and webhooks (whose `secret_file` the gateway reads) come only from
    /// the operator's `rules.toml`, so the admin token is not a shell.
    pub api_actions: ApiActions,
    /// The HTTP listener's connection cap and timeouts ([`serve::HttpLimits`]).
    pub http_limits: serve::HttpLimits,
}

/// The allow-list for actions that run a program or read a file, when they come from the
/// admin API instead of the operator's `rules.toml` (`[gateway] api_exec_programs` and
/// `api_webhook_secret_files` in `bitmote.toml`). Paths are compared exactly.
#[derive(Clone, Debug, Default)]
pub struct ApiActions {
    pub exec_programs: Vec<PathBuf>,
    pub webhook_secret_files: Vec<PathBuf>,
}

impl ApiActions {
    /// `Err(why)` if `action` runs a program or reads a file the allow-list does not name.
    pub fn check(&self, action: &bitmote_actuator::Action) -> Result<(), String> {
        if let Some(e) = &action.exec {
            if !self.exec_programs.contains(&e.program) {
                return Err(format!(
                    "an exec action ({}) added over the API runs a program on the gateway: exec actions come from the operator's \
                     rules.toml, or programs listed in [gateway] api_exec_programs",
                    e.program.display()
                ));
            }
        }
        if let Some(w) = &action.webhook {
            if !self.webhook_secret_files.contains(&w.secret_file) {
                return Err(format!(
                    "a webhook added over the API makes the gateway read {}: webhooks come from the operator's rules.toml, or \
                     secret files listed in [gateway] api_webhook_secret_files",
                    w.secret_file.display()
                ));
            }
        }
        Ok(())
    }
}

impl GatewayConfig {
    /// Defaults for a data directory: HTTP on 127.0.0.1:8650, MQTT on 127.0.0.1:1883.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        GatewayConfig {
            data_dir: data_dir.into(),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 8650)),
            mqtt_listen: Some(SocketAddr::from(([127, 0, 0, 1], 1883))),
            mqtt_broker: None,
            mqtt_broker_login: None,
            anchor: AnchorConfig::default(),
            anchor_poll: Duration::from_secs(1),
            faucet: None,
            log_origin: "bitmote.local/log".into(),
            actuator_retry: actuator::Retry::default(),
            pay_status_urls: vec![],
            lightning: None,
            disk: disk::DiskConfig::default(),
            api_actions: ApiActions::default(),
            http_limits: serve::HttpLimits::default(),
        }
    }
}

/// State shared by the HTTP handlers, the MQTT bridge and the anchoring loop.
pub struct Shared {
    pub ingest: Ingestor,
    pub db_path: PathBuf,
    /// Idle read connections for [`Shared::db`].
    db_pool: Mutex<Vec<rusqlite::Connection>>,
    pub client: ChainClient,
    pub signer: CheckpointSigner,
    pub admin_token: String,
    pub anchors: Mutex<Vec<AnchorInfo>>,
    pub anchor_status: Mutex<String>,
    /// The Bitcoin node as the chain-facing loops last found it: `"ok"`, or why it is not
    /// reachable (while it is down, ingest goes on and proofs say pending).
    pub node_status: Mutex<String>,
    pub tip_height: Mutex<u32>,
    pub network: Network,
    pub stop: AtomicBool,
    /// Messages for devices, published by the MQTT side (set when MQTT runs).
    pub mqtt_out: Mutex<Option<MqttOut>>,
    /// Device acknowledgements of actuator commands, for the actuator loop.
    pub acks: Mutex<Option<std::sync::mpsc::Sender<(String, bitmote_proto::Ack)>>>,
    /// The action log (latest snapshot) and alerts, for the API.
    pub actions: Mutex<Vec<bitmote_actuator::OutboxItem>>,
    pub alerts: Mutex<Vec<String>>,
    /// Last presence each device reported (`online`/`offline`, from its MQTT last will), with the time.
    pub presence: Mutex<std::collections::BTreeMap<String, (String, u64)>>,
    /// Work for the actuator loop, which owns the engine (rules added or removed over the API).
    pub actuator_jobs: mpsc::Sender<Job<bitmote_actuator::Engine>>,
    /// Work for the anchoring loop, which owns the wallet (fresh payment addresses).
    pub wallet_jobs: mpsc::Sender<Job<GatewayWallet>>,
    /// Status URLs of Lightning meters and providers (see [`GatewayConfig::pay_status_urls`]).
    pub pay_status_urls: Vec<String>,
    /// HTTP requests answered, by status code (for `/metrics`).
    pub http_requests: Mutex<std::collections::BTreeMap<u16, u64>>,
    /// Devices' MQTT credentials and open connections (see [`mqtt_front`]).
    pub mqtt_auth: mqtt_front::MqttAuth,
    /// The gateway's Lightning node, when it runs one.
    pub lightning: Option<Arc<bitmote_pay::ldk_node::Node>>,
    /// The guard of the data directory's free space (see [`disk`]).
    pub disk: Arc<disk::DiskGuard>,
    /// See [`GatewayConfig::api_actions`].
    pub api_actions: ApiActions,
    /// Anchor blocks fetched for proofs ([`http::BlockCache`]).
    pub blocks: http::BlockCache,
    /// Anonymous calls to the routes that reach the node, per client ([`serve::RateLimiter`]).
    pub anonymous_rate: serve::RateLimiter,
}

/// Idle connections [`Shared::db`] keeps at most.
const DB_POOL_IDLE: usize = 8;

/// A connection from [`Shared::db`]'s pool.
pub struct PooledDb<'a> {
    conn: Option<rusqlite::Connection>,
    pool: &'a Mutex<Vec<rusqlite::Connection>>,
}

impl std::ops::Deref for PooledDb<'_> {
    type Target = rusqlite::Connection;
    fn deref(&self) -> &rusqlite::Connection {
        self.conn.as_ref().expect("present until dropped")
    }
}

impl Drop for PooledDb<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            // Only a connection with no transaction left open goes back.
            if c.is_autocommit() {
                let mut idle = self.pool.lock().unwrap_or_else(|p| p.into_inner());
                if idle.len() < DB_POOL_IDLE {
                    idle.push(c);
                }
            }
        }
    }
}

/// A closure run by the loop that owns a `T`, so the API can use it without sharing it.
pub type Job<T> = Box<dyn FnOnce(&mut T) + Send>;

impl Shared {
    /// A read connection to the notary database, from a small pool (opening one costs
    /// pragmas and a cold page cache, on every request otherwise); it goes back on drop.
    pub fn db(&self) -> rusqlite::Result<PooledDb<'_>> {
        let idle = self.db_pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match idle {
            Some(c) => c,
            None => open_db(&self.db_path)?,
        };
        Ok(PooledDb { conn: Some(conn), pool: &self.db_pool })
    }
}

/// A running gateway.
pub struct Gateway {
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
    threads: Vec<JoinHandle<()>>,
    disk_thread: Option<JoinHandle<()>>,
    stopped: bool,
    pub http_addr: SocketAddr,
    pub mqtt_addr: Option<SocketAddr>,
}

/// The queue of MQTT messages for devices: (topic, payload).
pub type MqttOut = std::sync::mpsc::Sender<(String, Vec<u8>)>;

/// What a device is told when ingest refuses its readings (HTTP body, MQTT errors topic).
pub fn ingest_error_body(e: &bitmote_notary::ingest::IngestError) -> bitmote_proto::ErrorBody {
    let mut body = bitmote_proto::ErrorBody::new(e.to_string(), e.code());
    if let bitmote_notary::ingest::IngestError::Replay { last, .. } = e {
        body.last_seq = Some(*last);
    }
    body
}

/// The protocol's record of a registered device.
pub fn device_record(d: &bitmote_notary::registry::Device) -> bitmote_proto::notary::DeviceRecord {
    bitmote_proto::notary::DeviceRecord {
        id: d.id.to_string(),
        pubkey: d.pubkey.to_string(),
        name: d.name.clone(),
        enrolled_ms: d.enrolled_ms,
        revoked_ms: d.revoked_ms,
        revoke_reason: d.revoke_reason.clone(),
        last_seq: d.last_seq,
    }
}

/// The admin token in `path`, created on first start. A token file that exists but
/// cannot be read, or is empty, is an error: replacing it would lock out every client
/// configured with the old token, so the gateway refuses to start and says why.
fn load_or_create_token(path: &Path) -> Result<String, GatewayError> {
    let refuse = |why: String| GatewayError::Io {
        context: format!("{} {why}; fix or remove it (it is never overwritten)", path.display()),
        source: std::io::Error::other(why.clone()),
    };
    match std::fs::read(path) {
        Ok(b) => {
            let t = String::from_utf8(b).map_err(|_| refuse("is not text".into()))?;
            if t.trim().is_empty() {
                return Err(refuse("is empty".into()));
            }
            use std::os::unix::fs::PermissionsExt;
            if std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0) {
                tracing::warn!("{} is readable by others than its owner; chmod 600 it", path.display());
            }
            Ok(t.trim().to_string())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut b = [0u8; 24];
            getrandom::getrandom(&mut b).map_err(|e| GatewayError::Io { context: "random token".into(), source: e.into() })?;
            let t = hex::encode(b);
            bitmote_chain::wallet::create_secret(path, t.as_bytes())?;
            Ok(t)
        }
        Err(e) => Err(refuse(format!("cannot be read ({e})"))),
    }
}

impl Gateway {
    /// Start everything. `client` must be connected to the configured node.
    pub fn start(cfg: GatewayConfig, client: ChainClient) -> Result<Gateway, GatewayError> {
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(|e| GatewayError::Io { context: format!("creating {}", cfg.data_dir.display()), source: e })?;
        // The disk guard first: its reserve is made before anything else takes the space.
        let disk = disk::DiskGuard::new(&cfg.data_dir, cfg.disk.clone());
        let db_path = cfg.data_dir.join("notary.sqlite");
        let ingest = Ingestor::start(&db_path, IngestConfig::default())?;
        {
            let d = disk.clone();
            ingest.set_gate(Arc::new(move || d.refusal()));
        }
        let signer = CheckpointSigner::load_or_create(&cfg.data_dir.join("checkpoint.key"), &cfg.log_origin)?;
        let admin_token = load_or_create_token(&cfg.data_dir.join("admin.token"))?;
        let network = client.network();
        let (actuator_jobs, actuator_rx) = mpsc::channel();
        let (wallet_jobs, wallet_rx) = mpsc::channel();
        let ln_node = match &cfg.lightning {
            Some(l) => Some(lightning::start_node(l, &cfg.data_dir, &client, &disk)?),
            None => None,
        };
        let shared = Arc::new(Shared {
            ingest,
            db_path: db_path.clone(),
            db_pool: Mutex::new(vec![]),
            client: client.fresh()?,
            signer,
            admin_token,
            anchors: Mutex::new(vec![]),
            anchor_status: Mutex::new("starting".into()),
            node_status: Mutex::new("starting".into()),
            tip_height: Mutex::new(0),
            network,
            stop: AtomicBool::new(false),
            mqtt_out: Mutex::new(None),
            acks: Mutex::new(None),
            actions: Mutex::new(vec![]),
            alerts: Mutex::new(vec![]),
            presence: Mutex::new(Default::default()),
            actuator_jobs,
            wallet_jobs,
            pay_status_urls: cfg.pay_status_urls.clone(),
            http_requests: Mutex::new(Default::default()),
            mqtt_auth: mqtt_front::MqttAuth::load(&open_db(&db_path)?)?,
            lightning: ln_node,
            disk,
            api_actions: cfg.api_actions.clone(),
            blocks: http::BlockCache::default(),
            anonymous_rate: serve::RateLimiter::new(&cfg.http_limits),
        });
        let mut threads = vec![];

        // Anchoring loop.
        {
            let shared = shared.clone();
            let cfg = cfg.clone();
            let client = client.fresh()?;
            threads.push(
                std::thread::Builder::new()
                    .name("anchor".into())
                    .spawn(move || anchor_loop(shared, cfg, client, wallet_rx))
                    .map_err(|e| GatewayError::Io { context: "spawning the anchor thread".into(), source: e })?,
            );
        }

        raise_fd_limit();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("gateway")
            .build()
            .map_err(|e| GatewayError::Io { context: "starting the async runtime".into(), source: e })?;
        let listener = runtime
            .block_on(async { serve::bind(cfg.http_listen, &cfg.http_limits) })
            .map_err(|e| GatewayError::Io { context: format!("binding HTTP on {}", cfg.http_listen), source: e })?;
        let http_addr = listener.local_addr().map_err(|e| GatewayError::Io { context: "HTTP address".into(), source: e })?;
        {
            let app = http::router(shared.clone());
            let shared = shared.clone();
            let limits = cfg.http_limits.clone();
            runtime.spawn(async move {
                let stop = async move {
                    while !shared.stop.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                };
                serve::serve(listener, app, limits, stop).await;
            });
        }

        let mqtt_addr = match (&cfg.mqtt_broker, cfg.mqtt_listen) {
            (Some(url), _) => {
                threads.extend(mqtt::start_external(shared.clone(), url, cfg.mqtt_broker_login.clone())?);
                None
            }
            (None, Some(addr)) => {
                let (addr, handles) = mqtt::start(shared.clone(), addr)?;
                threads.extend(handles);
                Some(addr)
            }
            (None, None) => None,
        };
        // Actuators: the rules file (optional) and the rules added over the API.
        let rules_path = cfg.data_dir.join("rules.toml");
        let mut rules = bitmote_actuator::RuleSet::default();
        if rules_path.is_file() {
            let text = std::fs::read_to_string(&rules_path)
                .map_err(|e| GatewayError::Io { context: format!("reading {}", rules_path.display()), source: e })?;
            rules = bitmote_actuator::RuleSet::parse(&text, network).map_err(|e| GatewayError::Actuator(e.to_string()))?;
            tracing::info!("{} actuator rules from {}", rules.rules.len(), rules_path.display());
        }
        threads.push(actuator::start(shared.clone(), &cfg.data_dir, client.fresh()?, rules, cfg.actuator_retry, actuator_rx)?);
        if shared.lightning.is_some() {
            threads.push(lightning::start_events(shared.clone(), cfg.faucet.clone())?);
        }
        let disk_thread = shared.disk.start().map_err(|e| GatewayError::Io { context: "spawning the disk guard".into(), source: e })?;
        tracing::info!(%http_addr, ?mqtt_addr, "gateway up");
        Ok(Gateway { shared, runtime: Some(runtime), threads, disk_thread: Some(disk_thread), stopped: false, http_addr, mqtt_addr })
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Stop accepting, flush the ingest queue, stop the loops.
    pub fn shutdown(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        // Once: `shutdown` stops, then `drop` finds it done (a second `Node::stop` after a
        // panic inside LDK would panic again, in a destructor, and abort the process).
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
        self.shared.ingest.shutdown();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(n) = &self.shared.lightning {
            // LDK panics on a poisoned lock, which an earlier panic inside it leaves behind:
            // a stop must still be a stop (and exit 0), so such a panic is caught and logged.
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| n.stop())) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!("stopping the Lightning node: {e}"),
                Err(_) => {
                    tracing::error!("the Lightning node panicked while stopping (an earlier failure inside LDK); its state on disk is what it last persisted");
                    // ldk-node's `Drop` calls `stop` again, which would panic on the same
                    // poisoned lock: never drop this one (the process is about to exit).
                    std::mem::forget(n.clone());
                }
            }
        }
        // Last: the Lightning node's final writes may need the reserve.
        self.shared.disk.stop();
        if let Some(t) = self.disk_thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn log_head(shared: &Shared) -> Option<LogHead> {
    let c = shared.db().ok()?;
    let log = MerkleLog::new(&c);
    let size = log.size().ok()?;
    Some(LogHead { size, root: log.root_at(size).ok()? })
}

/// Pause after a failed attempt to reach the node: doubles from 1 s up to this.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

fn set(m: &Mutex<String>, v: impl Into<String>) {
    *m.lock().unwrap_or_else(|p| p.into_inner()) = v.into();
}

/// Record that the node answered (or why not). Node trouble is never fatal: the loops retry.
pub(crate) fn node_seen(shared: &Shared, result: Result<(), &bitmote_chain::ChainError>) {
    let now = match result {
        Ok(()) => "ok".to_string(),
        Err(e) => format!("unreachable: {e}"),
    };
    let mut cur = shared.node_status.lock().unwrap_or_else(|p| p.into_inner());
    if *cur != now {
        match result {
            Ok(()) if cur.starts_with("unreachable") => tracing::info!("the Bitcoin node is back"),
            Ok(()) => {}
            Err(e) => tracing::warn!("the Bitcoin node is unavailable ({e}); ingest goes on, anchoring resumes when it is back"),
        }
        *cur = now;
    }
}

/// Every HTTP and MQTT connection is a file descriptor: the soft limit (often 1,024) is
/// raised to the hard one, so the connection caps (4,096 each by default) are what limits.
fn raise_fd_limit() {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                tracing::warn!("could not raise the open file limit to {}", r.rlim_max);
            }
        }
    }
}

/// The anchoring loop: follows the chain and anchors the log's head through
/// [`Anchorer::poll`], which issues the checkpoint of each head it anchors through the
/// fork guard ([`CheckpointSigner::issue`]). A refused fork anchors nothing; it is
/// logged, raised as an alert once per forked root, shown as the anchor status, and the
/// loop goes on.
fn anchor_loop(shared: Arc<Shared>, cfg: GatewayConfig, client: ChainClient, wallet_jobs: mpsc::Receiver<Job<GatewayWallet>>) {
    let mut anchorer: Option<Anchorer> = None;
    let mut backoff = Duration::from_secs(1);
    let mut fork_alerted: Option<(u64, [u8; 32])> = None;
    while !shared.stop.load(Ordering::SeqCst) {
        if anchorer.is_none() {
            let opened = client
                .fresh()
                .map_err(AnchorError::from)
                .and_then(|c| Anchorer::open(&shared.db_path, &cfg.data_dir.join("wallet"), c, cfg.anchor.clone(), shared.signer.clone()));
            match opened {
                Ok(a) => {
                    anchorer = Some(a);
                    backoff = Duration::from_secs(1);
                    node_seen(&shared, Ok(()));
                }
                Err(e) => {
                    match &e {
                        AnchorError::Chain(c) if c.is_transient() => {
                            node_seen(&shared, Err(c));
                            set(&shared.anchor_status, format!("waiting for the Bitcoin node: {c}"));
                        }
                        _ => {
                            set(&shared.anchor_status, format!("cannot open: {e}"));
                            tracing::warn!("anchoring unavailable: {e}");
                        }
                    }
                    sleep_unless_stopped(&shared, backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            }
        }
        let Some(a) = anchorer.as_mut() else { continue };
        match a.poll(log_head(&shared)) {
            Ok(events) => {
                let mut status = "ok".to_string();
                for e in events {
                    match e {
                        AnchorEvent::ForkRefused { size, signed, root } => {
                            let msg = format!(
                                "not anchoring: the log's root for tree size {size} ({}) is not the one checkpointed for it ({}); \
                                 the log has forked",
                                hex::encode(root),
                                hex::encode(signed)
                            );
                            if fork_alerted.replace((size, root)) != Some((size, root)) {
                                // As the actuator raises its alerts, but at error level.
                                tracing::error!("{msg}");
                                shared.alerts.lock().unwrap_or_else(|p| p.into_inner()).push(msg.clone());
                            }
                            status = msg;
                        }
                        e => tracing::info!("anchor: {e:?}"),
                    }
                }
                set(&shared.anchor_status, status);
                node_seen(&shared, Ok(()));
            }
            Err(AnchorError::Unfunded { balance, address }) => {
                let msg = format!("wallet unfunded ({balance} sat); fund {address}");
                if let Some(faucet) = &cfg.faucet {
                    tracing::info!("asking the faucet for coins to the gateway wallet for anchoring");
                    if let Ok(addr) = a.wallet().new_address() {
                        if let Err(e) = faucet.fund(&addr, 1) {
                            tracing::warn!("the faucet: {e}");
                        }
                    }
                } else {
                    tracing::warn!("{msg}");
                }
                set(&shared.anchor_status, msg);
            }
            Err(AnchorError::Chain(c)) if c.is_transient() => {
                // The node went away: readings are still accepted (proofs say pending);
                // reopen (and resync) when it is back.
                node_seen(&shared, Err(&c));
                set(&shared.anchor_status, format!("waiting for the Bitcoin node: {c}"));
                anchorer = None;
                sleep_unless_stopped(&shared, backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
            Err(e) => {
                tracing::warn!("anchoring: {e}");
                set(&shared.anchor_status, e.to_string());
            }
        }
        if let Some(a) = &anchorer {
            if let Ok(list) = a.list() {
                *shared.anchors.lock().unwrap_or_else(|p| p.into_inner()) = list;
            }
            *shared.tip_height.lock().unwrap_or_else(|p| p.into_inner()) = a.tip_height();
        }
        // Until the next poll, serve the wallet to the API.
        let end = Instant::now() + cfg.anchor_poll;
        while let Some(left) = end.checked_duration_since(Instant::now()).filter(|_| !shared.stop.load(Ordering::SeqCst)) {
            let wait = left.min(Duration::from_millis(50));
            match anchorer.as_mut() {
                Some(a) => wallet_jobs.recv_timeout(wait).into_iter().for_each(|job| job(a.wallet())),
                None => std::thread::sleep(wait),
            }
        }
    }
}

fn sleep_unless_stopped(shared: &Shared, d: Duration) {
    let end = std::time::Instant::now() + d;
    while std::time::Instant::now() < end && !shared.stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod token_tests {
    use super::*;

    /// Issue #13, item 9: an admin token that cannot be read is never replaced.
    #[test]
    fn an_unreadable_or_empty_token_is_refused_not_replaced() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("admin.token");
        let t = load_or_create_token(&p).unwrap();
        assert_eq!(load_or_create_token(&p).unwrap(), t);
        std::fs::write(&p, [0xff, 0xfe, b'\n']).unwrap();
        let e = load_or_create_token(&p).unwrap_err().to_string();
        assert!(e.contains("is not text") && e.contains("never overwritten"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), [0xff, 0xfe, b'\n']);
        std::fs::write(&p, "  \n").unwrap();
        assert!(load_or_create_token(&p).unwrap_err().to_string().contains("is empty"));
        std::fs::remove_file(&p).unwrap();
        std::fs::create_dir(&p).unwrap();
        assert!(load_or_create_token(&p).unwrap_err().to_string().contains("cannot be read"));
        assert!(p.is_dir());
    }
}
