//! A regtest chain and Lightning machines on loopback, for the payment tests.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::Arc;

use bitmote_pay::ldk_node::Node;
use bitmote_pay::meter::Meter;
use bitmote_pay::node::{self, NodeConfig};
use bitmote_pay::provider::Provider;
use bitmote_pay::tariff::{Mode, Tariff};
use bitmote_regtest::provision::{ensure_bitcoind, InstallOptions, LogProgress};
use bitmote_regtest::{RegtestNode, RegtestOptions};

pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

pub fn regtest() -> RegtestNode {
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_test_writer().try_init();
    let exe = ensure_bitcoind(&InstallOptions::default(), &mut LogProgress::new()).unwrap().bitcoind;
    let n = RegtestNode::start(RegtestOptions::new(exe)).unwrap();
    n.mine(101).unwrap();
    n
}

pub fn machine(chain: &RegtestNode, dir: &Path, alias: &str, announce: bool) -> Arc<Node> {
    let cfg = NodeConfig {
        dir: dir.join("ldk"),
        listen: free_addr(),
        rpc: chain.rpc_config().clone(),
        alias: alias.into(),
        announce,
        announce_as: None,
    };
    node::start(&cfg).unwrap()
}

/// Mine coinbases to the node's wallet and wait until it sees them.
pub fn fund(chain: &RegtestNode, n: &Node, blocks: u32) {
    node::fund(&chain.faucet().unwrap(), n, blocks).unwrap();
}

/// Open a channel from `a` to `b` (pushing `push_msat` to `b`, so it is above its
/// reserve and can send) and wait until both can use it.
pub fn channel(chain: &RegtestNode, a: &Node, b: &Node, sat: u64, push_msat: Option<u64>, announced: bool) {
    let addr = b.listening_addresses().unwrap()[0].clone();
    let faucet = chain.faucet().unwrap();
    node::open_channel(Some(&faucet), a, b.node_id(), addr, sat, push_msat, announced).unwrap();
    node::wait_usable(Some(&faucet), b, a.node_id()).unwrap();
}

pub fn tariff(mode: Mode) -> Tariff {
    Tariff {
        provider: String::new(),
        price_msat_per_wh: 250,
        tick_ms: 500,
        mode,
        grace_ms: 5000,
        max_power_w: 3000,
        session_limit_msat: 100_000_000,
        valid_until: u64::MAX,
    }
}

/// Stop nodes before their directories go away.
pub fn stop(nodes: &[&Arc<Node>]) {
    for n in nodes {
        n.stop().ok();
    }
}

/// A regtest chain, a provider and a meter machine under a temporary directory (kept
/// when `KEEP` is set), the meter funded.
pub struct Pair {
    pub chain: RegtestNode,
    pub dir: tempfile::TempDir,
    pub pn: Arc<Node>,
    pub mn: Arc<Node>,
}

pub fn pair(announce_provider: bool) -> Pair {
    let chain = regtest();
    let dir = tempfile::Builder::new().disable_cleanup(std::env::var_os("KEEP").is_some()).tempdir().unwrap();
    eprintln!("data in {}", dir.path().display());
    let pn = machine(&chain, &dir.path().join("provider"), "provider", announce_provider);
    let mn = machine(&chain, &dir.path().join("meter"), "meter", false);
    fund(&chain, &mn, 2);
    Pair { chain, dir, pn, mn }
}

impl Pair {
    /// Start the provider role with `tariff` (on `http`) and the meter role talking to it.
    pub fn roles(&self, tariff: Tariff, http: SocketAddr) -> (Arc<Provider>, Arc<Meter>) {
        let provider = Provider::start(self.pn.clone(), &self.dir.path().join("provider"), tariff, http).unwrap();
        let meter = Meter::start(self.mn.clone(), &self.dir.path().join("meter"), &format!("http://{http}"), free_addr()).unwrap();
        (provider, meter)
    }
}
