//! Configuration: a TOML file (every option optional), overridden by `BITMOTE_*`
//! environment variables. With no configuration at all bitmote runs on its
//! embedded defaults: a private regtest bitcoind under the data directory.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bitmote_chain::bitcoin::Network;
use bitmote_chain::{RpcAuth, RpcConfig};
use serde::Deserialize;

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
    /// machines' channels); default off.
    #[serde(default)]
    pub lightning: bool,
    /// Its Lightning P2P address, default `127.0.0.1:9735`.
    pub lightning_listen: Option<std::net::SocketAddr>,
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
        let c = &mut self.chain;
        if let Some(v) = get("BITMOTE_CHAIN_NETWORK") {
            c.network = Some(v);
        }
        if let Some(v) = get("BITMOTE_CHAIN_RPC_URL") {
            c.rpc_url = Some(v);
        }
        if let Some(v) = get("BITMOTE_CHAIN_RPC_COOKIE") {
            c.rpc_cookie = Some(v.into());
        }
        if let Some(v) = get("BITMOTE_CHAIN_RPC_USER") {
            c.rpc_user = Some(v);
        }
        if let Some(v) = get("BITMOTE_CHAIN_RPC_PASSWORD") {
            c.rpc_password = Some(v);
        }
        if let Some(v) = get("BITMOTE_GATEWAY_HTTP_LISTEN") {
            self.gateway.http_listen = Some(v.parse().context("BITMOTE_GATEWAY_HTTP_LISTEN must be host:port")?);
        }
        if let Some(v) = get("BITMOTE_GATEWAY_MQTT_LISTEN") {
            self.gateway.mqtt_listen = Some(v);
        }
        if let Some(v) = get("BITMOTE_GATEWAY_MQTT_BROKER") {
            self.gateway.mqtt_broker = Some(v);
        }
        if let Some(v) = get("BITMOTE_GATEWAY_MQTT_USERNAME") {
            self.gateway.mqtt_username = Some(v);
        }
        if let Some(v) = get("BITMOTE_GATEWAY_MQTT_PASSWORD_FILE") {
            self.gateway.mqtt_password_file = Some(v.into());
        }
        if let Some(v) = get("BITMOTE_GATEWAY_LIGHTNING") {
            self.gateway.lightning = matches!(v.as_str(), "1" | "true" | "yes" | "on");
        }
        if let Some(v) = get("BITMOTE_GATEWAY_LIGHTNING_LISTEN") {
            self.gateway.lightning_listen = Some(v.parse().context("BITMOTE_GATEWAY_LIGHTNING_LISTEN must be host:port")?);
        }
        if let Some(v) = get("BITMOTE_GATEWAY_URL") {
            self.gateway.url = Some(v);
        }
        if let Some(v) = get("BITMOTE_NOTARY_ANCHOR_INTERVAL_SECS") {
            self.notary.anchor_interval_secs = Some(v.parse().context("BITMOTE_NOTARY_ANCHOR_INTERVAL_SECS must be a number")?);
        }
        let c = &mut self.chain;
        if let Some(v) = get("BITMOTE_CHAIN_BLOCK_INTERVAL_SECS") {
            c.block_interval_secs = Some(v.parse().context("BITMOTE_CHAIN_BLOCK_INTERVAL_SECS must be a number of seconds")?);
        }
        Ok(())
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
        let cfg = parse("[chain]\nnetwork = \"signet\"\nrpc_url = \"http://127.0.0.1:38332\"\nrpc_cookie = \"/b/signet/.cookie\"\n").unwrap();
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
        let cfg = parse(&format!("[gateway]\nmqtt_broker = \"mqtt://b:1883\"\nmqtt_username = \"gw\"\nmqtt_password_file = {:?}\n", f)).unwrap();
        let login = cfg.mqtt_broker_login().unwrap().unwrap();
        assert_eq!((login.username.as_str(), login.password.as_str()), ("gw", "s3cret"));
        assert!(!format!("{login:?}").contains("s3cret"));
        let half = parse("[gateway]\nmqtt_username = \"gw\"\n").unwrap();
        assert!(format!("{:#}", half.mqtt_broker_login().unwrap_err()).contains("go together"));
        assert!(parse("").unwrap().mqtt_broker_login().unwrap().is_none());
        let rpc = RpcAuth::UserPass { user: "u".into(), password: "hunter2".into() };
        assert!(!format!("{rpc:?}").contains("hunter2"));
    }
}
