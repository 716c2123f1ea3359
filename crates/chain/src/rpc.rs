//! A typed client for Bitcoin Core's JSON-RPC interface.
//!
//! The same code talks to a regtest node that bitmote runs itself and to a
//! signet, testnet or mainnet node configured by URL plus cookie file or
//! user/password. Errors are mapped to [`ChainError`] variants that name the
//! problem (unreachable, bad credentials, wrong network, still starting).

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bitcoin::block::Header;
use bitcoin::consensus::encode::{deserialize_hex, serialize_hex};
use bitcoin::{Address, Block, BlockHash, FeeRate, Network, Transaction, Txid};
use bitcoincore_rpc::jsonrpc;
use bitcoincore_rpc::RpcApi;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{ChainError, Result};

/// How to authenticate to the node.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RpcAuth {
    /// Bitcoin Core's `.cookie` file; re-read when the node restarts.
    Cookie(PathBuf),
    /// `rpcuser` / `rpcpassword` (or an `rpcauth` entry).
    UserPass { user: String, password: String },
}

/// Never prints the password (configurations may end up in logs).
impl std::fmt::Debug for RpcAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RpcAuth::Cookie(p) => f.debug_tuple("Cookie").field(p).finish(),
            RpcAuth::UserPass { user, .. } => f.debug_struct("UserPass").field("user", user).field("password", &"<redacted>").finish(),
        }
    }
}

/// Where the node is and what network it must be on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RpcConfig {
    /// e.g. `http://127.0.0.1:18443`
    pub url: String,
    pub auth: RpcAuth,
    /// The network bitmote expects; connecting to a node on another one fails.
    pub network: Network,
}

/// A block's position: height and hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlockId {
    pub height: u32,
    pub hash: BlockHash,
}

/// What the node says about a header, as far as following the chain needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderState {
    pub id: BlockId,
    pub prev: Option<BlockHash>,
    /// False when the block is known but not on the active chain (reorged out).
    pub in_active_chain: bool,
    /// The next block on the active chain, when this one is on it and is not the tip.
    pub next: Option<BlockHash>,
    /// Confirmations on the active chain (0 when not on it).
    pub confirmations: u32,
}

/// Summary of the node for status displays.
#[derive(Clone, Debug, Serialize)]
pub struct NodeInfo {
    pub network: Network,
    pub version: String,
    pub blocks: u32,
    pub headers: u32,
    pub best_block_hash: BlockHash,
    pub initial_block_download: bool,
    pub connections: u32,
}

/// Fee rate used on regtest (and wherever the node has no estimate yet).
pub const FALLBACK_FEE_RATE: FeeRate = FeeRate::from_sat_per_vb_u32(2);

/// A connection to one Bitcoin Core node.
///
/// Calls on one client are serialised over one keep-alive HTTP connection; use
/// [`ChainClient::fresh`] for a second connection (e.g. for long-polling).
pub struct ChainClient {
    cfg: RpcConfig,
    timeout: Duration,
    /// Built on first use (and again after a dropped connection or a new cookie), so a
    /// client can be made while the node is down and its cookie file is missing.
    inner: Mutex<Option<bitcoincore_rpc::Client>>,
}

impl std::fmt::Debug for ChainClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainClient").field("url", &self.cfg.url).field("network", &self.cfg.network).finish()
    }
}

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

fn read_cookie(path: &PathBuf) -> Result<(String, String)> {
    let text = std::fs::read_to_string(path).map_err(|e| ChainError::Cookie { path: path.clone(), reason: e.to_string() })?;
    let line = text.lines().next().unwrap_or_default();
    match line.split_once(':') {
        Some((u, p)) if !u.is_empty() => Ok((u.to_string(), p.to_string())),
        _ => Err(ChainError::Cookie { path: path.clone(), reason: "expected `user:password`".into() }),
    }
}

fn build_inner(cfg: &RpcConfig, timeout: Duration) -> Result<bitcoincore_rpc::Client> {
    let (user, pass) = match &cfg.auth {
        RpcAuth::Cookie(p) => read_cookie(p)?,
        RpcAuth::UserPass { user, password } => (user.clone(), password.clone()),
    };
    let transport = jsonrpc::http::simple_http::Builder::new()
        .url(&cfg.url)
        .map_err(|e| ChainError::Config(format!("bad RPC URL {:?}: {e}", cfg.url)))?
        .auth(user, Some(pass))
        .timeout(timeout)
        .build();
    Ok(bitcoincore_rpc::Client::from_jsonrpc(jsonrpc::Client::with_transport(transport)))
}

/// Parse Bitcoin Core's `chain` name (`main`, `test`, `testnet4`, `signet`, `regtest`).
pub fn network_from_core(chain: &str) -> Option<Network> {
    Network::from_core_arg(chain).ok()
}

impl ChainClient {
    /// Connect and check the node: reachable, credentials accepted, right network.
    /// Waits up to `startup_wait` while the node reports it is still starting.
    pub fn connect(cfg: RpcConfig, startup_wait: Duration) -> Result<Self> {
        let client = Self::unchecked(cfg, DEFAULT_TIMEOUT)?;
        let deadline = Instant::now() + startup_wait;
        loop {
            match client.raw::<Value>("getblockchaininfo", &[]) {
                Ok(info) => {
                    let chain = info["chain"].as_str().unwrap_or_default();
                    let actual = network_from_core(chain);
                    if actual != Some(client.cfg.network) {
                        return Err(ChainError::WrongNetwork {
                            url: client.cfg.url.clone(),
                            expected: client.cfg.network.to_core_arg().to_string(),
                            actual: chain.to_string(),
                        });
                    }
                    return Ok(client);
                }
                Err(e @ ChainError::Warmup { .. }) if Instant::now() < deadline => {
                    tracing::debug!("{e}; waiting");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Build a client without contacting the node. Fails only on a malformed URL: the
    /// cookie file is read when the first call is made (the node may be down now).
    pub fn unchecked(cfg: RpcConfig, timeout: Duration) -> Result<Self> {
        jsonrpc::http::simple_http::Builder::new()
            .url(&cfg.url)
            .map_err(|e| ChainError::Config(format!("bad RPC URL {:?}: {e}", cfg.url)))?;
        Ok(ChainClient { cfg, timeout, inner: Mutex::new(None) })
    }

    /// A second client on its own connection, same configuration. Never reads the
    /// cookie, so it works while the node is down (calls then fail until it is back).
    pub fn fresh(&self) -> Result<Self> {
        Self::unchecked(self.cfg.clone(), self.timeout)
    }

    /// Same configuration with another HTTP timeout (long-polls need more than the call's own timeout).
    pub fn with_timeout(&self, timeout: Duration) -> Result<Self> {
        Self::unchecked(self.cfg.clone(), timeout)
    }

    pub fn config(&self) -> &RpcConfig {
        &self.cfg
    }

    pub fn network(&self) -> Network {
        self.cfg.network
    }

    fn map_err(&self, method: &str, e: bitcoincore_rpc::Error) -> ChainError {
        use bitcoincore_rpc::Error as E;
        use jsonrpc::http::simple_http::Error as H;
        let url = self.cfg.url.clone();
        match e {
            E::JsonRpc(jsonrpc::Error::Rpc(r)) if r.code == -28 => ChainError::Warmup { url, message: r.message },
            E::JsonRpc(jsonrpc::Error::Rpc(r)) => ChainError::Rpc { method: method.to_string(), code: r.code, message: r.message },
            E::JsonRpc(jsonrpc::Error::Transport(t)) => match t.downcast_ref::<H>() {
                Some(H::HttpErrorCode(401)) => ChainError::Unauthorized { url },
                Some(H::SocketError(io)) => ChainError::Unreachable { url, reason: io.to_string() },
                Some(H::InvalidUrl { reason, .. }) => ChainError::Config(format!("bad RPC URL {url}: {reason}")),
                _ => ChainError::Transport { url, message: t.to_string() },
            },
            E::JsonRpc(jsonrpc::Error::Json(j)) | E::Json(j) => ChainError::Protocol { method: method.to_string(), message: j.to_string() },
            other => ChainError::Protocol { method: method.to_string(), message: other.to_string() },
        }
    }

    /// Call any RPC method. Re-reads the cookie once if the node answers 401
    /// (a restarted node writes a new cookie).
    pub fn raw<T: serde::de::DeserializeOwned>(&self, method: &str, args: &[Value]) -> Result<T> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let c = match inner.take() {
            Some(c) => c,
            None => self.build()?,
        };
        let c = inner.insert(c);
        match c.call::<T>(method, args).map_err(|e| self.map_err(method, e)) {
            Err(ChainError::Unauthorized { .. } | ChainError::Transport { .. }) => {
                // A new cookie (401) or a dropped keep-alive connection (the node restarted):
                // retry once on a new connection, with the cookie read again.
                *inner = None;
                let c = inner.insert(self.build()?);
                c.call::<T>(method, args).map_err(|e| self.map_err(method, e))
            }
            other => other,
        }
    }

    /// A connection with the credentials as they are now. A cookie that cannot be read
    /// while nothing listens at the URL means the node is down (bitcoind deletes its
    /// cookie when it stops): reported as [`ChainError::Unreachable`].
    fn build(&self) -> Result<bitcoincore_rpc::Client> {
        build_inner(&self.cfg, self.timeout).map_err(|e| match e {
            ChainError::Cookie { .. } if !self.listening() => {
                ChainError::Unreachable { url: self.cfg.url.clone(), reason: format!("nothing listens there ({e})") }
            }
            e => e,
        })
    }

    fn listening(&self) -> bool {
        use std::net::ToSocketAddrs;
        let hostport = self.cfg.url.split("://").nth(1).unwrap_or(&self.cfg.url).split('/').next().unwrap_or_default();
        hostport
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .is_some_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_millis(500)).is_ok())
    }

    /// Node summary (version, heights, peers).
    pub fn info(&self) -> Result<NodeInfo> {
        let bc: Value = self.raw("getblockchaininfo", &[])?;
        let net: Value = self.raw("getnetworkinfo", &[])?;
        let chain = bc["chain"].as_str().unwrap_or_default();
        Ok(NodeInfo {
            network: network_from_core(chain)
                .ok_or_else(|| ChainError::Protocol { method: "getblockchaininfo".into(), message: format!("unknown chain {chain:?}") })?,
            version: net["subversion"].as_str().unwrap_or_default().trim_matches('/').to_string(),
            blocks: bc["blocks"].as_u64().unwrap_or(0) as u32,
            headers: bc["headers"].as_u64().unwrap_or(0) as u32,
            best_block_hash: parse_field(&bc, "bestblockhash", "getblockchaininfo")?,
            initial_block_download: bc["initialblockdownload"].as_bool().unwrap_or(false),
            connections: net["connections"].as_u64().unwrap_or(0) as u32,
        })
    }

    /// The active chain's tip.
    pub fn tip(&self) -> Result<BlockId> {
        let v: Value = self.raw("getblockchaininfo", &[])?;
        Ok(BlockId { height: v["blocks"].as_u64().unwrap_or(0) as u32, hash: parse_field(&v, "bestblockhash", "getblockchaininfo")? })
    }

    /// Hash of the active chain's block at `height`, `None` above the tip.
    pub fn block_hash(&self, height: u32) -> Result<Option<BlockHash>> {
        match self.raw::<BlockHash>("getblockhash", &[json!(height)]) {
            Ok(h) => Ok(Some(h)),
            Err(ChainError::Rpc { code: -8, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Where a header stands relative to the active chain; `None` if the node does not know it.
    pub fn header_state(&self, hash: &BlockHash) -> Result<Option<HeaderState>> {
        let v: Value = match self.raw("getblockheader", &[json!(hash), json!(true)]) {
            Ok(v) => v,
            Err(ChainError::Rpc { code: -5, .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let confirmations = v["confirmations"].as_i64().unwrap_or(-1);
        let opt_hash = |k: &str| -> Result<Option<BlockHash>> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(_) => parse_field(&v, k, "getblockheader").map(Some),
            }
        };
        Ok(Some(HeaderState {
            id: BlockId { height: v["height"].as_u64().unwrap_or(0) as u32, hash: *hash },
            prev: opt_hash("previousblockhash")?,
            in_active_chain: confirmations >= 1,
            next: opt_hash("nextblockhash")?,
            confirmations: confirmations.max(0) as u32,
        }))
    }

    /// A block header by hash.
    pub fn header(&self, hash: &BlockHash) -> Result<Header> {
        let hex: String = self.raw("getblockheader", &[json!(hash), json!(false)])?;
        deserialize_hex(&hex).map_err(|e| ChainError::Protocol { method: "getblockheader".into(), message: e.to_string() })
    }

    /// A full block by hash (also works for blocks that were reorged out, while the node keeps them).
    pub fn block(&self, hash: &BlockHash) -> Result<Block> {
        let hex: String = self.raw("getblock", &[json!(hash), json!(0)])?;
        deserialize_hex(&hex).map_err(|e| ChainError::Protocol { method: "getblock".into(), message: e.to_string() })
    }

    /// A transaction by id (needs `-txindex`, or the block it is in).
    pub fn raw_transaction(&self, txid: &Txid, block: Option<&BlockHash>) -> Result<Transaction> {
        let mut args = vec![json!(txid), json!(false)];
        if let Some(b) = block {
            args.push(json!(b));
        }
        let hex: String = self.raw("getrawtransaction", &args)?;
        deserialize_hex(&hex).map_err(|e| ChainError::Protocol { method: "getrawtransaction".into(), message: e.to_string() })
    }

    /// Broadcast a transaction.
    pub fn broadcast(&self, tx: &Transaction) -> Result<Txid> {
        self.raw("sendrawtransaction", &[json!(serialize_hex(tx))])
    }

    /// Whether `txid` is in the node's mempool (`getmempoolentry`; -5 means it is not).
    pub fn in_mempool(&self, txid: &Txid) -> Result<bool> {
        match self.raw::<serde::de::IgnoredAny>("getmempoolentry", &[json!(txid)]) {
            Ok(_) => Ok(true),
            Err(ChainError::Rpc { code: -5, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Fee rate for confirmation within `target_blocks`; falls back to
    /// [`FALLBACK_FEE_RATE`] on regtest or when the node has no estimate yet.
    pub fn fee_rate(&self, target_blocks: u16) -> Result<FeeRate> {
        let v: Value = self.raw("estimatesmartfee", &[json!(target_blocks)])?;
        match v["feerate"].as_f64() {
            // BTC per kvB -> sat per kwu: * 1e8 / 4
            Some(btc_kvb) if btc_kvb > 0.0 => Ok(FeeRate::from_sat_per_kwu((btc_kvb * 1e8 / 4.0).ceil() as u64)),
            _ if self.cfg.network == Network::Regtest => Ok(FALLBACK_FEE_RATE),
            _ => {
                tracing::warn!("node has no fee estimate for {target_blocks} blocks; using the fallback rate");
                Ok(FALLBACK_FEE_RATE)
            }
        }
    }

    /// Mine `n` blocks to `address` (regtest only).
    pub fn mine(&self, n: u32, address: &Address) -> Result<Vec<BlockHash>> {
        if self.cfg.network != Network::Regtest {
            return Err(ChainError::RegtestOnly("mine"));
        }
        self.raw("generatetoaddress", &[json!(n), json!(address.to_string())])
    }

    /// Mark a block invalid, reorganising away from it (regtest testing).
    pub fn invalidate_block(&self, hash: &BlockHash) -> Result<()> {
        if self.cfg.network != Network::Regtest {
            return Err(ChainError::RegtestOnly("invalidateblock"));
        }
        self.raw::<Value>("invalidateblock", &[json!(hash)]).map(|_| ())
    }

    /// Undo [`ChainClient::invalidate_block`].
    pub fn reconsider_block(&self, hash: &BlockHash) -> Result<()> {
        self.raw::<Value>("reconsiderblock", &[json!(hash)]).map(|_| ())
    }

    /// Long-poll: return as soon as the tip differs from `current` or after `timeout`.
    /// Uses `waitfornewblock`'s `current_tip` argument (Bitcoin Core 29+) so a block that
    /// arrived between two calls is never missed; older nodes fall back to a short poll.
    pub fn wait_for_tip_change(&self, current: &BlockHash, timeout: Duration) -> Result<BlockId> {
        let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as u64;
        match self.raw::<Value>("waitfornewblock", &[json!(ms), json!(current)]) {
            Ok(v) => Ok(BlockId { height: v["height"].as_u64().unwrap_or(0) as u32, hash: parse_field(&v, "hash", "waitfornewblock")? }),
            // Older Core: no `current_tip` parameter. Poll.
            Err(ChainError::Rpc { code: -1, .. }) => {
                let deadline = Instant::now() + timeout;
                loop {
                    let tip = self.tip()?;
                    if tip.hash != *current || Instant::now() >= deadline {
                        return Ok(tip);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Ask the node to shut down.
    pub fn stop_node(&self) -> Result<()> {
        self.raw::<Value>("stop", &[]).map(|_| ())
    }
}

fn parse_field<T: serde::de::DeserializeOwned>(v: &Value, key: &str, method: &str) -> Result<T> {
    serde_json::from_value(v[key].clone())
        .map_err(|e| ChainError::Protocol { method: method.to_string(), message: format!("field `{key}`: {e}") })
}
