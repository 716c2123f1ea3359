//! Configuration: a TOML file (every option optional), overridden by `BITMOTE_*`
//! environment variables. With no configuration at all bitmote runs on its
//! embedded defaults: a private regtest bitcoind under the data directory.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bitmote_chain::bitcoin::Network;
use bitmote_chain::{RpcAuth, RpcConfig};
use serde::Deserialize;

pub use bitmote_sim::fleet::FleetSection;

/// The whole configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub chain: ChainSection,
    #[serde(default)]
    pub gateway: GatewaySection,
    #[serde(default)]
    pub notary: NotarySection,
    #[serde(default)]
    pub fleet: FleetSection,
}

/// `[gateway]`: where the gateway listens.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySection {
    /// HTTP API, default `127.0.0.1:8650`.
    pub http_listen: Option<std::net::SocketAddr>,
    /// Embedded MQTT broker, default `127.0.0.1:1883`; `"off"` disables MQTT.
    pub mqtt_listen: Option<String>,
    /// An external MQTT broker (`mqtt://host:port`) instead of the embedded one.
    pub mqtt_broker: Option<String>,
    /// The gateway's username on the external broker (if it wants a login).
    pub mqtt_username: Option<String>,
    /// File holding the gateway's password on the external broker (keep it 0600).
    pub mqtt_password_file: Option<std::path::PathBuf>,
    /// The gateway's URL for CLI commands (default `http://<http_listen>`).
    pub url: Option<String>,
    /// Lightning meters and providers whose `/v1/status` the dashboard shows.
    #[serde(default)]
    pub pay_status_urls: Vec<String>,
    /// Run the gateway's own Lightning node (invoices for Lightning rules, a hub for
    /// machines' channels). Default: on in `bitmote up` with its simulated fleet (the
    /// fleet's meter pays its provider through it), off otherwise.
    pub lightning: Option<bool>,
    /// Its Lightning P2P address, default `127.0.0.1:9735` (`127.0.0.1:9737` beside the
    /// simulated fleet, whose provider has 9735; port 0 picks a free port once and keeps it).
    pub lightning_listen: Option<std::net::SocketAddr>,
    /// Disk reserve the gateway keeps in its data directory and gives back to the file
    /// system when it is full, so the notary's commits and the Lightning node's writes can
    /// complete (MiB, default 32; 0 = none).
    pub disk_reserve_mib: Option<u64>,
    /// Free space below which ingest refuses new readings (HTTP 507, MQTT `disk_full`) until
    /// space is freed (MiB, default 32).
    pub disk_min_free_mib: Option<u64>,
    /// Programs that rules and orders added over the admin API may run as `exec` actions
    /// (absolute paths, compared exactly). Empty by default: `exec` comes only from `rules.toml`.
    #[serde(default)]
    pub api_exec_programs: Vec<std::path::PathBuf>,
    /// Secret files that webhooks added over the admin API may name (the gateway reads
    /// them). Empty by default: webhooks come only from `rules.toml`.
    #[serde(default)]
    pub api_webhook_secret_files: Vec<std::path::PathBuf>,
    /// Most HTTP connections open at once; one more is answered 503 (default 4096).
    pub http_max_connections: Option<usize>,
    /// A request's head must arrive within this (ms, default 10000); an idle connection is
    /// closed after it.
    pub http_header_timeout_ms: Option<u64>,
    /// A whole request, body included, within this (ms, default 30000), else 408.
    pub http_request_timeout_ms: Option<u64>,
    /// Anonymous `proof`, `proof.ots` and `verify` calls per second and client address
    /// (bursts of twice that; default 20; 0 = no limit); over it, 429.
    pub http_anonymous_per_sec: Option<u32>,
    /// Apply that limit to loopback clients too (default false; set it behind a local proxy).
    pub http_rate_limit_loopback: Option<bool>,
}

/// `[notary]`: anchoring policy.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotarySection {
    /// Least seconds between anchors (default 600; 10 on regtest).
    pub anchor_interval_secs: Option<u64>,
    /// Replace an unconfirmed anchor with a higher fee after this many blocks (default 3).
    pub bump_after_blocks: Option<u32>,
    /// Fee-rate ceiling in sat/vB (default 200).
    pub max_fee_rate_sat_vb: Option<u64>,
    /// Origin line of signed checkpoints (default `bitmote.local/log`).
    pub log_origin: Option<String>,
}

/// `[chain]`: which Bitcoin node to use.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainSection {
    /// `regtest` (default), `signet`, `testnet`, `testnet4` or `bitcoin` (mainnet).
    pub network: Option<String>,
    /// RPC URL of an existing node, e.g. `http://127.0.0.1:38332`. Unset = the embedded regtest node.
    pub rpc_url: Option<String>,
    /// Cookie file of that node (e.g. `~/.bitcoin/signet/.cookie`).
    pub rpc_cookie: Option<PathBuf>,
    /// Or user and password (`rpcuser`/`rpcpassword`, or `rpcauth`).
    pub rpc_user: Option<String>,
    pub rpc_password: Option<String>,
    /// Seconds between blocks mined by `bitmote up` on the embedded regtest node (0 = never).
    pub block_interval_secs: Option<u64>,
}

/// Which node bitmote talks to.
#[derive(Debug, Clone)]
pub enum ChainTarget {
    /// The regtest bitcoind bitmote runs itself, in this data directory.
    Embedded { data_dir: PathBuf },
    /// A node someone else runs.
    External(RpcConfig),
}

impl Config {
    /// Read `path` if given (it must exist), else `<data_dir>/bitmote.toml` if it exists; then apply env overrides.
    pub fn load(path: Option<&Path>, data_dir: &Path) -> Result<Self> {
        let (path, required) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (data_dir.join("bitmote.toml"), false),
        };
        let mut cfg: Config = match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).with_context(|| format!("invalid configuration file {}", path.display()))?,
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => Config::default(),
            Err(e) => return Err(e).with_context(|| format!("cannot read configuration file {}", path.display())),
        };
        cfg.apply_env(|k| std::env::var(k).ok())?;
        Ok(cfg)
    }

    fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<()> {
        fn parse<T: std::str::FromStr>(key: &str, v: String, what: &str) -> Result<T> {
            v.trim().parse().map_err(|_| anyhow::anyhow!("{key} must be {what}, not {v:?}"))
        }
        macro_rules! env {
            ($key:literal, $field:expr) => {
                if let Some(v) = get($key) {
                    $field = Some(v);
                }
            };
            ($key:literal, $field:expr, $what:literal) => {
                if let Some(v) = get($key) {
                    $field = Some(parse($key, v, $what)?);
                }
            };
        }
        env!("BITMOTE_CHAIN_NETWORK", self.chain.network);
        env!("BITMOTE_CHAIN_RPC_URL", self.chain.rpc_url);
        env!("BITMOTE_CHAIN_RPC_COOKIE", self.chain.rpc_cookie, "a path");
        env!("BITMOTE_CHAIN_RPC_USER", self.chain.rpc_user);
        env!("BITMOTE_CHAIN_RPC_PASSWORD", self.chain.rpc_password);
        env!("BITMOTE_CHAIN_BLOCK_INTERVAL_SECS", self.chain.block_interval_secs, "a number of seconds");
        env!("BITMOTE_GATEWAY_HTTP_LISTEN", self.gateway.http_listen, "host:port");
        env!("BITMOTE_GATEWAY_MQTT_LISTEN", self.gateway.mqtt_listen);
        env!("BITMOTE_GATEWAY_MQTT_BROKER", self.gateway.mqtt_broker);
        env!("BITMOTE_GATEWAY_MQTT_USERNAME", self.gateway.mqtt_username);
        env!("BITMOTE_GATEWAY_MQTT_PASSWORD_FILE", self.gateway.mqtt_password_file, "a path");
        if let Some(v) = get("BITMOTE_GATEWAY_LIGHTNING") {
            self.gateway.lightning = Some(parse::<bool>("BITMOTE_GATEWAY_LIGHTNING", v, "true or false")?);
        }
        env!("BITMOTE_GATEWAY_LIGHTNING_LISTEN", self.gateway.lightning_listen, "host:port");
        env!("BITMOTE_GATEWAY_URL", self.gateway.url);
        env!("BITMOTE_GATEWAY_DISK_RESERVE_MIB", self.gateway.disk_reserve_mib, "a number of MiB");
        env!("BITMOTE_GATEWAY_DISK_MIN_FREE_MIB", self.gateway.disk_min_free_mib, "a number of MiB");
        if let Some(v) = get("BITMOTE_GATEWAY_PAY_STATUS_URLS") {
            self.gateway.pay_status_urls = v.split(',').map(str::trim).filter(|u| !u.is_empty()).map(String::from).collect();
        }
        env!("BITMOTE_NOTARY_ANCHOR_INTERVAL_SECS", self.notary.anchor_interval_secs, "a number");
        env!("BITMOTE_NOTARY_BUMP_AFTER_BLOCKS", self.notary.bump_after_blocks, "a number");
        env!("BITMOTE_NOTARY_MAX_FEE_RATE_SAT_VB", self.notary.max_fee_rate_sat_vb, "a number");
        env!("BITMOTE_NOTARY_LOG_ORIGIN", self.notary.log_origin);
        let f = &mut self.fleet;
        env!("BITMOTE_FLEET_ENABLED", f.enabled, "true or false");
        env!("BITMOTE_FLEET_SENSORS", f.sensors, "a number");
        env!("BITMOTE_FLEET_SENSOR_INTERVAL_MS", f.sensor_interval_ms, "a number of ms");
        env!("BITMOTE_FLEET_BATCH_EVERY", f.batch_every, "a number");
        env!("BITMOTE_FLEET_BATCH_SIZE", f.batch_size, "a number");
        env!("BITMOTE_FLEET_RENTAL_SAT", f.rental_sat, "a number of sat");
        env!("BITMOTE_FLEET_RENTAL_EVERY_BLOCKS", f.rental_every_blocks, "a number of blocks");
        env!("BITMOTE_FLEET_LEASE_BLOCKS", f.lease_blocks, "a number of blocks");
        env!("BITMOTE_FLEET_RELAY_EVERY_BLOCKS", f.relay_every_blocks, "a number of blocks");
        env!("BITMOTE_FLEET_METER", f.meter, "true or false");
        env!("BITMOTE_FLEET_TICK_MS", f.tick_ms, "a number of ms");
        env!("BITMOTE_FLEET_PROVIDER_HTTP", f.provider_http, "host:port");
        env!("BITMOTE_FLEET_PROVIDER_LN", f.provider_ln, "host:port");
        env!("BITMOTE_FLEET_PROVIDER_HTTP_BIND", f.provider_http_bind, "host:port");
        env!("BITMOTE_FLEET_PROVIDER_LN_BIND", f.provider_ln_bind, "host:port");
        env!("BITMOTE_FLEET_METER_HTTP", f.meter_http, "host:port");
        env!("BITMOTE_FLEET_METER_LN", f.meter_ln, "host:port");
        Ok(())
    }

    /// The configuration file `load` reads, if any.
    pub fn path(path: Option<&Path>, data_dir: &Path) -> Option<PathBuf> {
        match path {
            Some(p) => Some(p.to_path_buf()),
            None => Some(data_dir.join("bitmote.toml")).filter(|p| p.is_file()),
        }
    }

    /// The gateway's HTTP address.
    pub fn http_listen(&self) -> std::net::SocketAddr {
        self.gateway.http_listen.unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 8650)))
    }

    /// The embedded MQTT broker's address, `None` when disabled.
    /// The gateway's login on an external broker: `mqtt_username` and the password in `mqtt_password_file`.
    pub fn mqtt_broker_login(&self) -> Result<Option<bitmote_gateway::mqtt_front::BrokerLogin>> {
        match (&self.gateway.mqtt_username, &self.gateway.mqtt_password_file) {
            (None, None) => Ok(None),
            (Some(u), Some(f)) => {
                let p = std::fs::read_to_string(f).with_context(|| format!("reading [gateway] mqtt_password_file {}", f.display()))?;
                Ok(Some(bitmote_gateway::mqtt_front::BrokerLogin { username: u.clone(), password: p.trim().to_string() }))
            }
            _ => anyhow::bail!("[gateway] mqtt_username and mqtt_password_file go together"),
        }
    }

    pub fn mqtt_listen(&self) -> Result<Option<std::net::SocketAddr>> {
        match self.gateway.mqtt_listen.as_deref() {
            None => Ok(Some(std::net::SocketAddr::from(([127, 0, 0, 1], 1883)))),
            Some("off") => Ok(None),
            Some(a) => Ok(Some(a.parse().with_context(|| format!("[gateway] mqtt_listen {a:?} must be host:port or \"off\""))?)),
        }
    }

    /// URL of the gateway for CLI commands.
    pub fn gateway_url(&self) -> String {
        self.gateway.url.clone().unwrap_or_else(|| format!("http://{}", self.http_listen()))
    }

    pub fn network(&self) -> Result<Network> {
        match self.chain.network.as_deref() {
            None => Ok(Network::Regtest),
            Some(n) => parse_network(n),
        }
    }

    /// Resolve the configured node.
    pub fn chain_target(&self, data_dir: &Path) -> Result<ChainTarget> {
        let network = self.network()?;
        let c = &self.chain;
        let Some(url) = c.rpc_url.clone() else {
            if network != Network::Regtest {
                bail!("[chain] network = {network} needs rpc_url (and rpc_cookie or rpc_user/rpc_password): bitmote only runs its own node on regtest");
            }
            if c.rpc_cookie.is_some() || c.rpc_user.is_some() {
                bail!("[chain] rpc_cookie / rpc_user are set but rpc_url is not");
            }
            return Ok(ChainTarget::Embedded { data_dir: data_dir.join("bitcoind") });
        };
        let auth = match (&c.rpc_cookie, &c.rpc_user, &c.rpc_password) {
            (Some(_), Some(_), _) => bail!("[chain] set either rpc_cookie or rpc_user/rpc_password, not both"),
            (Some(p), None, _) => RpcAuth::Cookie(expand_home(p)),
            (None, Some(u), Some(pw)) => RpcAuth::UserPass { user: u.clone(), password: pw.clone() },
            (None, Some(_), None) => bail!("[chain] rpc_user is set but rpc_password is not"),
            (None, None, _) => bail!("[chain] rpc_url needs rpc_cookie or rpc_user/rpc_password"),
        };
        Ok(ChainTarget::External(RpcConfig { url, auth, network }))
    }
}

/// Parse a network name as Bitcoin Core and rust-bitcoin spell them.
pub fn parse_network(name: &str) -> Result<Network> {
    match name {
        "main" | "mainnet" | "bitcoin" => Ok(Network::Bitcoin),
        "test" | "testnet" | "testnet3" => Ok(Network::Testnet),
        "testnet4" => Ok(Network::Testnet4),
        "signet" => Ok(Network::Signet),
        "regtest" => Ok(Network::Regtest),
        other => bail!("unknown network {other:?} (expected regtest, signet, testnet, testnet4 or bitcoin)"),
    }
}

fn expand_home(p: &Path) -> PathBuf {
    match p.strip_prefix("~") {
        Ok(rest) => dirs::home_dir().map(|h| h.join(rest)).unwrap_or_else(|| p.to_path_buf()),
        Err(_) => p.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config> {
        Ok(toml::from_str(text)?)
    }

    #[test]
    fn empty_config_is_the_embedded_regtest_node() {
        let cfg = parse("").unwrap();
        match cfg.chain_target(Path::new("/d")).unwrap() {
            ChainTarget::Embedded { data_dir } => assert_eq!(data_dir, Path::new("/d/bitcoind")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn external_node_with_cookie() {
        let cfg =
            parse("[chain]\nnetwork = \"signet\"\nrpc_url = \"http://127.0.0.1:38332\"\nrpc_cookie = \"/b/signet/.cookie\"\n").unwrap();
        match cfg.chain_target(Path::new("/d")).unwrap() {
            ChainTarget::External(rpc) => {
                assert_eq!(rpc.network, Network::Signet);
                assert_eq!(rpc.url, "http://127.0.0.1:38332");
                assert!(matches!(rpc.auth, RpcAuth::Cookie(ref p) if p == Path::new("/b/signet/.cookie")));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn inconsistent_configs_are_refused_with_a_reason() {
        for (text, needle) in [
            ("[chain]\nnetwork = \"signet\"\n", "needs rpc_url"),
            ("[chain]\nrpc_url = \"http://x\"\n", "needs rpc_cookie"),
            ("[chain]\nrpc_url = \"http://x\"\nrpc_user = \"u\"\n", "rpc_password"),
            ("[chain]\nnetwork = \"moon\"\n", "unknown network"),
        ] {
            let err = parse(text).and_then(|c| c.chain_target(Path::new("/d"))).unwrap_err();
            assert!(format!("{err:#}").contains(needle), "{text}: {err:#}");
        }
        assert!(parse("[chain]\nrpc_ulr = \"x\"\n").is_err(), "typos are rejected");
    }

    #[test]
    fn env_overrides_file() {
        let mut cfg = parse("[chain]\nrpc_url = \"http://a\"\n").unwrap();
        cfg.apply_env(|k| match k {
            "BITMOTE_CHAIN_RPC_URL" => Some("http://b".into()),
            "BITMOTE_CHAIN_BLOCK_INTERVAL_SECS" => Some("3".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(cfg.chain.rpc_url.as_deref(), Some("http://b"));
        assert_eq!(cfg.chain.block_interval_secs, Some(3));
    }

    #[test]
    fn the_gateway_login_on_an_external_broker_comes_from_a_file_and_is_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("mqtt.password");
        std::fs::write(&f, "s3cret\n").unwrap();
        let cfg =
            parse(&format!("[gateway]\nmqtt_broker = \"mqtt://b:1883\"\nmqtt_username = \"gw\"\nmqtt_password_file = {:?}\n", f)).unwrap();
        let login = cfg.mqtt_broker_login().unwrap().unwrap();
        assert_eq!((login.username.as_str(), login.password.as_str()), ("gw", "s3cret"));
        assert!(!format!("{login:?}").contains("s3cret"));
        let half = parse("[gateway]\nmqtt_username = \"gw\"\n").unwrap();
        assert!(format!("{:#}", half.mqtt_broker_login().unwrap_err()).contains("go together"));
        assert!(parse("").unwrap().mqtt_broker_login().unwrap().is_none());
        let rpc = RpcAuth::UserPass { user: "u".into(), password: "hunter2".into() };
        assert!(!format!("{rpc:?}").contains("hunter2"));
    }

    #[test]
    fn every_section_has_env_overrides() {
        let mut cfg = parse("[fleet]\nsensors = 5\nmeter = true\n").unwrap();
        cfg.apply_env(|k| match k {
            "BITMOTE_FLEET_SENSORS" => Some("7".into()),
            "BITMOTE_FLEET_METER" => Some("false".into()),
            "BITMOTE_FLEET_PROVIDER_HTTP" => Some("127.0.0.1:0".into()),
            "BITMOTE_FLEET_PROVIDER_LN_BIND" => Some("127.0.0.1:19735".into()),
            "BITMOTE_GATEWAY_PAY_STATUS_URLS" => Some("http://a, http://b".into()),
            "BITMOTE_NOTARY_LOG_ORIGIN" => Some("example/log".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(cfg.fleet.sensors, Some(7));
        assert_eq!(cfg.fleet.meter, Some(false));
        assert_eq!(cfg.fleet.provider_http, Some("127.0.0.1:0".parse().unwrap()));
        assert_eq!(cfg.fleet.provider_ln_bind, Some("127.0.0.1:19735".parse().unwrap()));
        assert_eq!(cfg.gateway.pay_status_urls, ["http://a", "http://b"]);
        assert_eq!(cfg.notary.log_origin.as_deref(), Some("example/log"));
        let err = parse("").unwrap().apply_env(|k| (k == "BITMOTE_FLEET_SENSORS").then(|| "many".into())).unwrap_err();
        assert!(err.to_string().contains("BITMOTE_FLEET_SENSORS must be a number"), "{err}");
        assert!(parse("[fleet]\nsensor = 3\n").is_err(), "typos are rejected");
    }
}
