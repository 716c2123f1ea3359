//! The Lightning node inside a machine: ldk-node on the bitcoind RPC chain source,
//! stored in the machine's data directory, listening on loopback TCP.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitcoin::secp256k1::PublicKey;
use bitmote_chain::Faucet;
use bitmote_chain::{RpcAuth, RpcConfig};
use ldk_node::config::Config;
use ldk_node::lightning::ln::msgs::SocketAddress;
use ldk_node::logger::LogLevel;
use ldk_node::{Builder, ChannelDetails, Node};

use crate::PayError;

/// Where a machine's node lives and how it reaches the chain.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// `<data>/ldk`: keys seed, channel state (SQLite), logs.
    pub dir: PathBuf,
    /// Lightning P2P listening address (loopback by default).
    pub listen: std::net::SocketAddr,
    pub rpc: RpcConfig,
    pub alias: String,
    /// Announce our address so channels opened with `announced = true` enter the
    /// public graph (a routing hub needs this).
    pub announce: bool,
    /// The address to announce instead of `listen`, when peers reach this node elsewhere
    /// (a port forward, a proxy): what its status and its gossip tell them to connect to.
    /// Announced even when `announce` is false (a private node's status still shows it).
    pub announce_as: Option<std::net::SocketAddr>,
}

/// Read the user and password of a bitcoind RPC config (a cookie is read now).
fn rpc_credentials(rpc: &RpcConfig) -> Result<(String, u16, String, String), PayError> {
    let url = rpc.url.trim_start_matches("http://").trim_end_matches('/');
    let (host, port) = url.rsplit_once(':').ok_or_else(|| PayError::Config(format!("RPC URL {} has no port", rpc.url)))?;
    let port = port.parse().map_err(|_| PayError::Config(format!("bad RPC port in {}", rpc.url)))?;
    let (user, pass) = match &rpc.auth {
        RpcAuth::UserPass { user, password } => (user.clone(), password.clone()),
        RpcAuth::Cookie(p) => {
            let c = std::fs::read_to_string(p).map_err(|e| PayError::Config(format!("cookie {}: {e}", p.display())))?;
            let (u, p) = c.trim().split_once(':').ok_or_else(|| PayError::Config("malformed cookie".into()))?;
            (u.to_string(), p.to_string())
        }
    };
    Ok((host.to_string(), port, user, pass))
}

/// How the node keeps its state on disk: a [`MakeRoom`](crate::ldk_store::MakeRoom) its
/// store asks for space when a write is refused, and its log file (to pause it).
#[derive(Clone, Default)]
pub struct NodeStorage {
    pub room: Option<Arc<dyn crate::ldk_store::MakeRoom>>,
    pub log: Option<Arc<crate::ldk_store::FileLog>>,
}

/// Build and start the node.
pub fn start(cfg: &NodeConfig) -> Result<Arc<Node>, PayError> {
    start_with(cfg, NodeStorage::default())
}

/// Build and start the node, its store and log as `storage` says. The store is ldk-node's
/// SQLite store (the same file `Builder::build` uses) with refused writes retried, and the
/// log never panics on a full disk (see [`crate::ldk_store`]).
pub fn start_with(cfg: &NodeConfig, storage: NodeStorage) -> Result<Arc<Node>, PayError> {
    std::fs::create_dir_all(&cfg.dir).map_err(|e| PayError::Io(cfg.dir.clone(), e))?;
    let addr = SocketAddress::from(cfg.listen);
    let mut config = Config {
        storage_dir_path: cfg.dir.to_string_lossy().into_owned(),
        network: cfg.rpc.network,
        listening_addresses: Some(vec![addr.clone()]),
        ..Config::default()
    };
    match cfg.announce_as {
        Some(a) => config.announcement_addresses = Some(vec![SocketAddress::from(a)]),
        None if cfg.announce => config.announcement_addresses = Some(vec![addr]),
        None => {}
    }
    let mut b = Builder::from_config(config);
    let (host, port, user, pass) = rpc_credentials(&cfg.rpc)?;
    b.set_chain_source_bitcoind_rpc(host, port, user, pass);
    b.set_gossip_source_p2p();
    let log = storage.log.unwrap_or_else(|| Arc::new(crate::ldk_store::FileLog::new(cfg.dir.join("ldk_node.log"), LogLevel::Info)));
    b.set_custom_logger(log);
    let alias = ldk_node::lightning::routing::gossip::NodeAlias({
        let mut a = [0u8; 32];
        let n = cfg.alias.len().min(32);
        a[..n].copy_from_slice(&cfg.alias.as_bytes()[..n]);
        a
    });
    b.set_node_alias(alias.to_string()).map_err(|e| PayError::Node(format!("alias: {e}")))?;
    let store = crate::ldk_store::GuardedStore::open(&cfg.dir, storage.room)
        .map_err(|e| PayError::Node(format!("opening the Lightning store in {}: {e}", cfg.dir.display())))?;
    let store = Arc::new(crate::ldk_store::SharedStore(Arc::new(store)));
    let node = b.build_with_store(store).map_err(|e| PayError::Node(format!("building the Lightning node: {e}")))?;
    node.start().map_err(|e| PayError::Node(format!("starting the Lightning node: {e}")))?;
    Ok(Arc::new(node))
}

/// Parse a node id.
pub fn parse_node_id(s: &str) -> Result<PublicKey, PayError> {
    s.parse().map_err(|_| PayError::Config(format!("{s:?} is not a node id")))
}

/// The usable channels with `peer`.
pub fn channels_with(node: &Node, peer: &PublicKey) -> Vec<ChannelDetails> {
    node.list_channels().into_iter().filter(|c| &c.counterparty_node_id == peer).collect()
}

/// Wait until `ok(node)` holds, syncing wallets in between; `mine` is called once per
/// second so that test chains advance (a no-op on real networks: see [`advancing`]).
pub fn wait_until(node: &Node, what: &str, timeout: Duration, mut mine: impl FnMut(), ok: impl Fn(&Node) -> bool) -> Result<(), PayError> {
    let start = Instant::now();
    let mut last_mine = Instant::now();
    loop {
        if ok(node) {
            return Ok(());
        }
        if start.elapsed() > timeout {
            return Err(PayError::Timeout(format!("{what} after {timeout:?}")));
        }
        if last_mine.elapsed() > Duration::from_secs(1) {
            mine();
            let _ = node.sync_wallets();
            last_mine = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The directory of the node under a machine's data directory.
pub fn node_dir(data: &Path) -> PathBuf {
    data.join("ldk")
}

/// Ask `faucet` for coins to the node's wallet (on regtest: `coinbases` coinbases,
/// matured), and wait until the wallet sees them.
pub fn fund(faucet: &dyn Faucet, node: &Node, coinbases: u32) -> Result<(), PayError> {
    let addr = node.onchain_payment().new_address().map_err(|e| PayError::Node(e.to_string()))?;
    faucet.fund(&addr, coinbases).map_err(|e| PayError::Node(format!("the faucet: {e}")))?;
    wait_until(node, "funds", Duration::from_secs(120), || {}, |n| n.list_balances().spendable_onchain_balance_sats > 0)
}

/// Open a channel to `peer` (pushing `push_msat` to it) and wait until it is usable,
/// with the faucet (if any) moving the chain on a block a second.
pub fn open_channel(
    faucet: Option<&dyn Faucet>,
    node: &Node,
    peer: PublicKey,
    addr: SocketAddress,
    sat: u64,
    push_msat: Option<u64>,
    announced: bool,
) -> Result<(), PayError> {
    let opened = if announced {
        node.open_announced_channel(peer, addr, sat, push_msat, None)
    } else {
        node.open_channel(peer, addr, sat, push_msat, None)
    };
    opened.map_err(|e| PayError::Node(format!("opening a channel to {peer}: {e}")))?;
    // Until it is usable, or gone: an open the peer dropped (it restarted during the
    // negotiation) leaves no channel, and waiting for it would wait the full 10 minutes
    // (found by `bitmote drill`: the hub's reopen to a provider killed mid-open).
    if !wait_usable_or_gone(faucet, node, peer)? {
        return Err(PayError::Node(format!("the channel to {peer} did not open (the peer dropped it, or went away during the open)")));
    }
    Ok(())
}

/// On-chain funds a node keeps beyond a channel's size when it opens one (fees, and the
/// anchor reserve ldk-node wants for fee bumping).
pub const CHANNEL_RESERVE_SAT: u64 = 50_000;

/// Open a `sat` channel to `peer` (announced or not) and wait until it is usable. If the
/// node's wallet holds too little, fund it from the faucet; without one, say where to send funds.
pub fn open_funded_channel(
    faucet: Option<&dyn Faucet>,
    node: &Node,
    peer: PublicKey,
    addr: SocketAddress,
    sat: u64,
    announced: bool,
) -> Result<(), PayError> {
    let _ = node.sync_wallets();
    let need = sat + CHANNEL_RESERVE_SAT;
    if node.list_balances().spendable_onchain_balance_sats < need {
        let Some(f) = faucet else {
            let to = node.onchain_payment().new_address().map_err(|e| PayError::Node(e.to_string()))?;
            return Err(PayError::Node(format!("the wallet needs {need} sat to open a {sat} sat channel: send them to {to}")));
        };
        fund(f, node, 1)?;
    }
    open_channel(faucet, node, peer, addr, sat, None, announced)
}

/// Called once a second while waiting: the faucet moves the chain on a block, so that what
/// waits for confirmations gets them. Without a faucet (a real network), nothing.
pub fn advancing(faucet: Option<&dyn Faucet>) -> impl FnMut() + '_ {
    move || {
        if let Some(f) = faucet {
            let _ = f.advance();
        }
    }
}

/// Wait until a channel with `peer` is usable, the faucet (if any) moving the chain on a block a second.
pub fn wait_usable(faucet: Option<&dyn Faucet>, node: &Node, peer: PublicKey) -> Result<(), PayError> {
    wait_until(node, "a usable channel", Duration::from_secs(600), advancing(faucet), |n| {
        channels_with(n, &peer).iter().any(|c| c.is_usable)
    })
}

/// Wait until a channel with `peer` is usable (`Ok(true)`), or none is left (`Ok(false)`):
/// LDK force-closes, just after a restart, a channel whose latest state it lost (a
/// `kill -9` between its ChannelMonitor and ChannelManager writes, on either side), and a
/// caller waiting for that channel would wait forever.
pub fn wait_usable_or_gone(faucet: Option<&dyn Faucet>, node: &Node, peer: PublicKey) -> Result<bool, PayError> {
    wait_until(node, "a usable channel", Duration::from_secs(600), advancing(faucet), |n| {
        let c = channels_with(n, &peer);
        c.is_empty() || c.iter().any(|c| c.is_usable)
    })?;
    Ok(channels_with(node, &peer).iter().any(|c| c.is_usable))
}

/// Wait until `node`'s graph (from gossip) holds an announced channel from `hub` to
/// `provider` whose hub side is enabled, so keysends to `provider` can be routed through
/// `hub`; the faucet (if any) moving the chain on a block a second (the announcement needs 6 confirmations).
pub fn wait_for_route(faucet: Option<&dyn Faucet>, node: &Node, hub: PublicKey, provider: PublicKey) -> Result<(), PayError> {
    use ldk_node::lightning::routing::gossip::NodeId;
    let (hub, provider) = (NodeId::from_pubkey(&hub), NodeId::from_pubkey(&provider));
    wait_until(node, "a route to the provider through the hub", Duration::from_secs(600), advancing(faucet), |n| {
        let g = n.network_graph();
        g.list_channels().into_iter().filter_map(|scid| g.channel(scid)).any(|c| {
            let hub_side = match (c.node_one, c.node_two) {
                (one, two) if one == hub && two == provider => c.one_to_two,
                (one, two) if one == provider && two == hub => c.two_to_one,
                _ => None,
            };
            hub_side.is_some_and(|u| u.enabled)
        })
    })
}
