//! bitmote-light: a device checks a payment itself, so a compromised gateway cannot make
//! it act on a payment that does not exist.
//!
//! [`LightClient`] runs a BIP157/158 compact-filter client (the `bip157` crate) against
//! one Bitcoin node over P2P. It syncs block headers itself, checking that they link and
//! carry valid proof of work (and the network's difficulty rules), and the chain of
//! filter headers that commits to each block's BIP158 filter. It keeps the filters of
//! the most recent blocks in memory.
//!
//! [`LightClient::verify_payment`] checks a [`PaymentClaim`] — "output `txid:vout`, in the
//! block at `height`, pays at least `min_sat` to `script_pubkey`, under `confirmations`
//! blocks" — against that chain only: the block at `height` on its own chain of most work
//! is deep enough, its filter matches the script, and the block itself (fetched over P2P,
//! its merkle root checked against the header) holds the output. Anything else is a
//! [`LightError`] that says why, and the device refuses to act.
//!
//! One peer can hide blocks or show a chain of its own (with enough hash power, or on a
//! test network). [`Peers`] follows several peers, each with its own client, and accepts a
//! payment only if every one of them finds it, in the same block: a peer that does not,
//! or that shows another block at that height, makes the device refuse.

// `LightError::Disagree` carries both peers and both block hashes, so a device can say
// which peer lied; an error happens at most once per payment check, so its size is free.
#![allow(clippy::result_large_err)]

pub mod policy;
pub use policy::{PaymentPolicy, PolicyError};

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bip157::chain::{BlockHeaderChanges, ChainState};
use bip157::{Builder, Client, Event, HashCheckpoint, IndexedFilter, Requester, TrustedPeer};
use bitcoin::{BlockHash, Network, ScriptBuf, Txid};

/// Filters kept in memory: the most recent blocks (older ones are fetched again on demand).
pub const KEEP_FILTERS: u32 = 288;
/// How long fetching one block may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a payment was not accepted (or the client could not check it).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LightError {
    #[error("light client: {0}")]
    Client(String),
    #[error("no block {height} in the device's own chain (its tip is {tip})")]
    NoBlock { height: u32, tip: u32 },
    #[error("under-confirmed: {have} confirmations in the device's own chain, {need} required")]
    UnderConfirmed { have: u32, need: u32 },
    #[error("the compact filter of block {height} has no output to the address")]
    FilterMiss { height: u32 },
    #[error("block {height} has no transaction {txid}")]
    NoTransaction { height: u32, txid: Txid },
    #[error("output {txid}:{vout} {why}")]
    BadOutput { txid: Txid, vout: u32, why: String },
    #[error("peer {peer}: {error}")]
    Peer { peer: SocketAddr, error: Box<LightError> },
    #[error("the peers disagree: {a} has block {a_block} at height {height}, {b} has {b_block}")]
    Disagree { height: u32, a: SocketAddr, a_block: BlockHash, b: SocketAddr, b_block: BlockHash },
    #[error("no peer to follow")]
    NoPeers,
}

/// What the device is told triggered a command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PaymentClaim {
    pub txid: Txid,
    pub vout: u32,
    /// The script of the address paid.
    pub script_pubkey: ScriptBuf,
    pub min_sat: u64,
    /// Height of the block that holds the payment.
    pub height: u32,
    pub confirmations: u32,
}

/// A payment found in the device's own chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Confirmed {
    pub block_hash: BlockHash,
    pub height: u32,
    pub confirmations: u32,
    pub value_sat: u64,
}

#[derive(Default)]
struct State {
    tip: Option<(u32, BlockHash)>,
    synced: bool,
    filters: BTreeMap<u32, IndexedFilter>,
    /// Heights asked for again with a rescan: kept even if older than the window.
    wanted: Vec<u32>,
    stopped: Option<String>,
}

type Shared = Arc<(Mutex<State>, Condvar)>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, State> {
    s.0.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running compact-filter client connected to one node.
pub struct LightClient {
    rt: tokio::runtime::Runtime,
    /// The requester of the current client run (replaced when it restarts).
    requester: Arc<Mutex<Requester>>,
    state: Shared,
}

fn build(peer: SocketAddr, network: Network) -> (bip157::Node, Client) {
    Builder::new(network)
        .add_peer(TrustedPeer::from(peer))
        .whitelist_only()
        .required_peers(1)
        .chain_state(ChainState::Checkpoint(HashCheckpoint::from_genesis(network)))
        .build()
}

/// Apply the client's events to the state until it stops; log its messages.
async fn pump(s: Shared, client: Client) {
    let Client { mut info_rx, mut warn_rx, mut event_rx, .. } = client;
    loop {
        tokio::select! {
            Some(i) = info_rx.recv() => tracing::debug!("light client: {i}"),
            Some(w) = warn_rx.recv() => tracing::debug!("light client: {w}"),
            Some(ev) = event_rx.recv() => {
                apply(&mut lock(&s), ev);
                s.1.notify_all();
            }
            else => break,
        }
    }
}

impl LightClient {
    /// Connect to the node at `peer` (it must serve compact filters: Bitcoin Core with
    /// `-blockfilterindex -peerblockfilters`) and sync from the genesis block. When the
    /// connection is lost (or the client drops the peer for a message it cannot use), the
    /// client starts again a second later and syncs anew.
    pub fn start(peer: SocketAddr, network: Network) -> Result<Self, LightError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("light-client")
            .enable_all()
            .build()
            .map_err(|e| LightError::Client(format!("starting its runtime: {e}")))?;
        let first = build(peer, network);
        let requester = Arc::new(Mutex::new(first.1.requester.clone()));
        let mut next = Some(first);
        let state: Shared = Arc::default();
        let (s, r) = (state.clone(), requester.clone());
        rt.spawn(async move {
            loop {
                let (node, client) = next.take().unwrap_or_else(|| build(peer, network));
                *r.lock().unwrap_or_else(|p| p.into_inner()) = client.requester.clone();
                let events = tokio::spawn(pump(s.clone(), client));
                let why = match node.run().await {
                    Ok(()) => break, // asked to stop
                    Err(e) => e.to_string(),
                };
                events.abort();
                tracing::warn!("light client stopped ({why}); starting again");
                {
                    let mut st = lock(&s);
                    (st.stopped, st.synced) = (Some(why), false);
                }
                s.1.notify_all();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        Ok(LightClient { rt, requester, state })
    }

    fn requester(&self) -> Requester {
        self.requester.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Wait until the filters are synced to the node's tip; the tip height.
    pub fn wait_synced(&self, timeout: Duration) -> Result<u32, LightError> {
        let st = self.wait_for(timeout, |s| s.synced)?;
        match st.tip {
            Some((h, _)) if st.synced => Ok(h),
            _ => Err(LightError::Client(format!("not synced with the node within {timeout:?}"))),
        }
    }

    /// The tip of the device's own chain of most work.
    pub fn tip(&self) -> Option<(u32, BlockHash)> {
        lock(&self.state).tip
    }

    /// Wait (at most `timeout`) until `ready` holds; then the state, locked.
    fn wait_for(&self, timeout: Duration, mut ready: impl FnMut(&State) -> bool) -> Result<std::sync::MutexGuard<'_, State>, LightError> {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.state);
        loop {
            if ready(&st) {
                return Ok(st);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(st);
            }
            st = self.state.1.wait_timeout(st, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Check `claim` against the device's own chain, waiting at most `wait` for the chain
    /// to reach the confirmations the claim needs (at least one).
    /// A verdict is final; a failure of the client itself (a lost connection, a reorganization
    /// while checking) is tried again until `wait` has passed.
    pub fn verify_payment(&self, claim: &PaymentClaim, wait: Duration) -> Result<Confirmed, LightError> {
        let deadline = Instant::now() + wait;
        loop {
            match self.check(claim, deadline) {
                Err(LightError::Client(why)) if Instant::now() < deadline => {
                    tracing::debug!("checking a payment: {why}; trying again");
                    std::thread::sleep(Duration::from_millis(100));
                }
                verdict => return verdict,
            }
        }
    }

    fn check(&self, claim: &PaymentClaim, deadline: Instant) -> Result<Confirmed, LightError> {
        let left = || deadline.saturating_duration_since(Instant::now());
        let (h, need) = (claim.height, claim.confirmations.max(1));
        let deep = |s: &State| s.tip.is_some_and(|(t, _)| t >= h && t - h + 1 >= need);
        // Synced with no filter for a deep enough block: older than those kept, ask again.
        let mut st = self.wait_for(left(), |s| deep(s) && (s.synced || s.filters.contains_key(&h)))?;
        if deep(&st) && !st.filters.contains_key(&h) {
            if !st.wanted.contains(&h) {
                st.wanted.push(h);
            }
            drop(st);
            // The client sends the filters after the height given (and ignores the request
            // while it is syncing headers: then this is tried again).
            self.requester().rescan_from(h.saturating_sub(1)).map_err(|e| self.failed(e))?;
            st = self.wait_for(left().min(Duration::from_secs(2)), |s| s.filters.contains_key(&h))?;
        }
        let tip = st.tip.map_or(0, |t| t.0);
        st.wanted.retain(|w| *w != h);
        if tip < h {
            return Err(LightError::NoBlock { height: h, tip });
        }
        if tip - h + 1 < need {
            return Err(LightError::UnderConfirmed { have: tip - h + 1, need });
        }
        let filter = st.filters.get(&h).cloned().ok_or_else(|| LightError::Client(format!("no filter for block {h}")))?;
        drop(st);
        let hash = filter.block_hash();
        let on_chain = self.rt.block_on(self.requester().get_header(h)).map_err(|e| self.failed(e))?;
        if on_chain.map(|i| i.header.block_hash()) != Some(hash) {
            return Err(LightError::Client(format!("block {h} changed while checking (a reorganization); try again")));
        }
        if !filter.contains_any(std::iter::once(&claim.script_pubkey)) {
            return Err(LightError::FilterMiss { height: h });
        }
        let block = self
            .rt
            .block_on(async { tokio::time::timeout(FETCH_TIMEOUT, self.requester().get_block(hash)).await })
            .map_err(|_| LightError::Client(format!("block {hash} did not arrive within {FETCH_TIMEOUT:?}")))?
            .map_err(|e| LightError::Client(format!("fetching block {hash}: {e}")))?
            .block;
        if block.block_hash() != hash || !block.check_merkle_root() {
            return Err(LightError::Client(format!("the peer sent a block that does not match header {hash}")));
        }
        let (txid, vout) = (claim.txid, claim.vout);
        let tx = block.txdata.iter().find(|t| t.compute_txid() == txid).ok_or(LightError::NoTransaction { height: h, txid })?;
        let bad = |why: String| LightError::BadOutput { txid, vout, why };
        let out = tx.output.get(vout as usize).ok_or_else(|| bad("does not exist".into()))?;
        if out.script_pubkey != claim.script_pubkey {
            return Err(bad("pays another address".into()));
        }
        if out.value.to_sat() < claim.min_sat {
            return Err(bad(format!("pays {} sat, less than {}", out.value.to_sat(), claim.min_sat)));
        }
        Ok(Confirmed { block_hash: hash, height: h, confirmations: tip - h + 1, value_sat: out.value.to_sat() })
    }
}

impl LightClient {
    /// A request failed: say why the client stopped, if it did.
    fn failed(&self, e: impl std::fmt::Display) -> LightError {
        LightError::Client(match &lock(&self.state).stopped {
            Some(why) => format!("{e} (the client was restarted after: {why})"),
            None => e.to_string(),
        })
    }
}

impl Drop for LightClient {
    fn drop(&mut self) {
        let _ = self.requester().shutdown();
    }
}

fn apply(st: &mut State, ev: Event) {
    match ev {
        Event::ChainUpdate(BlockHeaderChanges::Connected(h)) => {
            st.tip = Some((h.height, h.header.block_hash()));
            st.synced = false;
        }
        Event::ChainUpdate(BlockHeaderChanges::Reorganized { accepted, reorganized }) => {
            st.synced = false;
            for r in &reorganized {
                st.filters.remove(&r.height);
            }
            if let Some(h) = accepted.iter().max() {
                st.tip = Some((h.height, h.header.block_hash()));
            }
        }
        Event::ChainUpdate(BlockHeaderChanges::ForkAdded(_)) => {}
        Event::FiltersSynced(u) => {
            st.synced = true;
            st.tip = Some((u.tip().height, u.tip().hash));
        }
        Event::IndexedFilter(f) => {
            let h = f.height();
            st.filters.insert(h, f);
            let top = st.filters.keys().next_back().copied().unwrap_or(0);
            let wanted = std::mem::take(&mut st.wanted);
            st.filters.retain(|k, _| k + KEEP_FILTERS > top || wanted.contains(k));
            st.wanted = wanted;
        }
    }
}

/// Several peers, each followed by a [`LightClient`] of its own (issue #13 item 12): a
/// payment counts only if every peer finds it, in the same block.
pub struct Peers {
    clients: Vec<(SocketAddr, LightClient)>,
}

impl Peers {
    /// Start a client for each peer (at least one).
    pub fn start(peers: &[SocketAddr], network: Network) -> Result<Self, LightError> {
        if peers.is_empty() {
            return Err(LightError::NoPeers);
        }
        let clients = peers
            .iter()
            .map(|&peer| LightClient::start(peer, network).map(|c| (peer, c)).map_err(|e| LightError::Peer { peer, error: Box::new(e) }))
            .collect::<Result<_, _>>()?;
        Ok(Peers { clients })
    }

    /// Wait until every client has synced; the lowest of their tips.
    pub fn wait_synced(&self, timeout: Duration) -> Result<u32, LightError> {
        let mut low = u32::MAX;
        for (peer, c) in &self.clients {
            low = low.min(c.wait_synced(timeout).map_err(|e| LightError::Peer { peer: *peer, error: Box::new(e) })?);
        }
        Ok(low)
    }

    /// The peers followed.
    pub fn addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.clients.iter().map(|(p, _)| *p)
    }

    /// [`LightClient::verify_payment`] on every peer at once: the payment as the least
    /// buried view shows it, if every peer finds it in the same block; else why not (the
    /// first peer that refused, or two that show different blocks; with one peer, its own
    /// error as it is).
    pub fn verify_payment(&self, claim: &PaymentClaim, wait: Duration) -> Result<Confirmed, LightError> {
        if let [(_, only)] = self.clients.as_slice() {
            return only.verify_payment(claim, wait); // one peer: its own answer, unwrapped
        }
        let results: Vec<(SocketAddr, Result<Confirmed, LightError>)> = std::thread::scope(|s| {
            let handles: Vec<_> = self.clients.iter().map(|(peer, c)| (*peer, s.spawn(move || c.verify_payment(claim, wait)))).collect();
            handles
                .into_iter()
                .map(|(peer, h)| (peer, h.join().unwrap_or_else(|_| Err(LightError::Client("the check panicked".into())))))
                .collect()
        });
        let mut agreed: Option<(SocketAddr, Confirmed)> = None;
        for (peer, r) in results {
            let ok = r.map_err(|e| LightError::Peer { peer, error: Box::new(e) })?;
            match &agreed {
                None => agreed = Some((peer, ok)),
                Some((a, first)) if first.block_hash != ok.block_hash => {
                    return Err(LightError::Disagree {
                        height: claim.height,
                        a: *a,
                        a_block: first.block_hash,
                        b: peer,
                        b_block: ok.block_hash,
                    });
                }
                Some((_, first)) if ok.confirmations < first.confirmations => agreed = Some((peer, ok)),
                Some(_) => {}
            }
        }
        agreed.map(|(_, c)| c).ok_or(LightError::NoPeers)
    }
}
