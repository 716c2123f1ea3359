//! Reorg-aware block event stream.
//!
//! [`BlockStream`] turns the node's view of the best chain into an ordered
//! sequence of [`BlockEvent::Connected`] / [`BlockEvent::Disconnected`] events,
//! starting from a [`Cursor`]: the last block the consumer has applied (or
//! "before genesis"). Each event carries the cursor *after* it; a consumer that
//! stores that cursor atomically with the effects of handling the event and
//! restarts from it sees every event exactly once.
//!
//! The next event is a pure function of (cursor, node's block tree):
//! * cursor on the active chain and not the tip: `Connected(next block)`;
//! * cursor no longer on the active chain (reorg): `Disconnected(cursor block)`,
//!   walking back one block at a time to the fork point, then connecting the
//!   new branch. Depth is bounded by [`StreamConfig::max_reorg_depth`];
//! * cursor at the tip: long-poll `waitfornewblock` with the cursor as
//!   `current_tip`, so a block mined between two calls is never missed.
//!
//! * cursor unknown to the node (bitcoind crashed and lost blocks it had already
//!   served, e.g. killed before it flushed its chain state): a reorg like any other.
//!   The stream walks back with the headers of the last [`StreamConfig::remember_blocks`]
//!   blocks it delivered — kept durably in [`StreamConfig::history`] (written before the
//!   `Connected` event is returned, so any cursor a consumer stores is in it), and in
//!   memory otherwise — emitting `Disconnected` for each block the node no longer has,
//!   down to one it has, then connects the node's branch. A `Disconnected` event for a
//!   block the node forgot carries the block in full when the stream still holds it in
//!   memory, else its header only (no transactions): consumers revert by block hash.
//!   Only a cursor deeper than that history is refused ([`ChainError::CursorUnknown`],
//!   whose message says how to recover).
//!
//! Two RPCs per event (`getblockheader`, `getblock`) keep block-to-event latency
//! in the low milliseconds.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitcoin::{Block, BlockHash};
use serde::{Deserialize, Serialize};

use crate::error::{ChainError, Result};
use crate::rpc::{BlockId, ChainClient, HeaderState};

/// Position of a consumer: the last block it has applied; `None` = before genesis.
pub type Cursor = Option<BlockId>;

/// One change of the best chain.
#[derive(Clone, Debug)]
pub enum BlockEvent {
    /// `block` at `id` became part of the best chain (its parent is the previous cursor).
    Connected { id: BlockId, block: Arc<Block> },
    /// `block` at `id`, the previous cursor, left the best chain.
    Disconnected { id: BlockId, block: Arc<Block> },
}

impl BlockEvent {
    pub fn id(&self) -> BlockId {
        match self {
            BlockEvent::Connected { id, .. } | BlockEvent::Disconnected { id, .. } => *id,
        }
    }

    pub fn block(&self) -> &Arc<Block> {
        match self {
            BlockEvent::Connected { block, .. } | BlockEvent::Disconnected { block, .. } => block,
        }
    }

    pub fn is_connected(&self) -> bool {
        matches!(self, BlockEvent::Connected { .. })
    }

    /// The cursor once this event is applied.
    pub fn cursor_after(&self) -> Cursor {
        match self {
            BlockEvent::Connected { id, .. } => Some(*id),
            BlockEvent::Disconnected { id, block } => {
                if id.height == 0 {
                    None
                } else {
                    Some(BlockId { height: id.height - 1, hash: block.header.prev_blockhash })
                }
            }
        }
    }
}

/// What the stream needs from a node. [`ChainClient`] implements it; tests of the
/// algorithm may implement it over an in-memory block tree.
pub trait BlockSource {
    /// Position of a header relative to the active chain; `None` if unknown.
    fn header_state(&self, hash: &BlockHash) -> Result<Option<HeaderState>>;
    /// Active chain hash at `height`, `None` above the tip.
    fn block_hash(&self, height: u32) -> Result<Option<BlockHash>>;
    fn block(&self, hash: &BlockHash) -> Result<Block>;
    fn tip(&self) -> Result<BlockId>;
    /// Return when the tip differs from `current`, or after `timeout`.
    fn wait_for_tip_change(&self, current: &BlockHash, timeout: Duration) -> Result<BlockId>;
}

impl BlockSource for ChainClient {
    fn header_state(&self, hash: &BlockHash) -> Result<Option<HeaderState>> {
        ChainClient::header_state(self, hash)
    }
    fn block_hash(&self, height: u32) -> Result<Option<BlockHash>> {
        ChainClient::block_hash(self, height)
    }
    fn block(&self, hash: &BlockHash) -> Result<Block> {
        ChainClient::block(self, hash)
    }
    fn tip(&self) -> Result<BlockId> {
        ChainClient::tip(self)
    }
    fn wait_for_tip_change(&self, current: &BlockHash, timeout: Duration) -> Result<BlockId> {
        ChainClient::wait_for_tip_change(self, current, timeout)
    }
}

/// Where a stream without a stored cursor begins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// Emit `Connected` for the block at this height first (0 = genesis).
    Height(u32),
    /// Emit only blocks that arrive after the current tip.
    Tip,
}

/// Tuning of a [`BlockStream`].
#[derive(Clone, Debug)]
pub struct StreamConfig {
    /// Deepest reorganisation followed; deeper ones stop the stream with [`ChainError::ReorgTooDeep`].
    pub max_reorg_depth: u32,
    /// Longest single long-poll; [`BlockStream::next_event`] waits in slices of this.
    pub poll_slice: Duration,
    /// Headers of the most recent blocks delivered that the stream keeps, to roll back
    /// blocks a crashed node forgot (the last [`FULL_BLOCKS_IN_MEMORY`] also in full, in memory).
    pub remember_blocks: usize,
    /// File that keeps those headers across restarts (`None` = memory only). Give each
    /// consumer its own file, next to where it stores its cursor.
    pub history: Option<PathBuf>,
}

/// Blocks kept in full in memory, for `Disconnected` events with their transactions.
pub const FULL_BLOCKS_IN_MEMORY: usize = 12;

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig { max_reorg_depth: 100, poll_slice: Duration::from_secs(1), remember_blocks: 100, history: None }
    }
}

impl StreamConfig {
    /// The defaults, with the block history kept in `path`.
    pub fn with_history(path: impl Into<PathBuf>) -> Self {
        StreamConfig { history: Some(path.into()), ..Default::default() }
    }
}

/// Headers of recently delivered blocks, by hash: what lets the stream walk back from a
/// cursor the node no longer knows. Not a chain: a header stays known after its block
/// is disconnected (another consumer's cursor may still point at it).
#[derive(Default)]
struct History {
    headers: std::collections::HashMap<BlockHash, (u32, bitcoin::block::Header)>,
    max_height: u32,
}

#[derive(Serialize, Deserialize)]
struct HistoryFile {
    /// (height, header in consensus hex), oldest first.
    headers: Vec<(u32, String)>,
}

impl History {
    fn load(path: &Path) -> History {
        let mut h = History::default();
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return h,
            Err(e) => {
                tracing::warn!("cannot read the block history {}: {e}; starting without it", path.display());
                return h;
            }
        };
        match serde_json::from_str::<HistoryFile>(&text) {
            Ok(f) => {
                for (height, hex) in f.headers {
                    if let Ok(header) = bitcoin::consensus::encode::deserialize_hex::<bitcoin::block::Header>(&hex) {
                        h.insert(height, header);
                    }
                }
            }
            Err(e) => tracing::warn!("corrupt block history {}: {e}; starting without it", path.display()),
        }
        h
    }

    fn insert(&mut self, height: u32, header: bitcoin::block::Header) {
        self.headers.insert(header.block_hash(), (height, header));
        self.max_height = self.max_height.max(height);
    }

    fn prune(&mut self, keep: usize) {
        let floor = self.max_height.saturating_sub(keep as u32);
        self.headers.retain(|_, (h, _)| *h > floor);
    }

    fn save(&self, path: &Path) -> Result<()> {
        let mut v: Vec<(u32, String)> = self.headers.values().map(|(h, hd)| (*h, bitcoin::consensus::encode::serialize_hex(hd))).collect();
        v.sort();
        let body = serde_json::to_vec(&HistoryFile { headers: v })
            .map_err(|e| ChainError::Config(format!("serializing the block history: {e}")))?;
        write_atomic(path, &body)
    }
}

/// Ordered, reorg-aware, resumable block events from a [`BlockSource`].
pub struct BlockStream<S: BlockSource> {
    source: S,
    cursor: Cursor,
    cfg: StreamConfig,
    /// Consecutive disconnections in the reorg being followed.
    unwinding: u32,
    /// The last blocks delivered as connected, oldest first.
    recent: std::collections::VecDeque<(BlockId, Arc<Block>)>,
    /// Headers of the last [`StreamConfig::remember_blocks`] blocks delivered.
    history: History,
    /// The node's tip height as last seen (to skip persisting the history far below it).
    tip_hint: u32,
}

impl<S: BlockSource> BlockStream<S> {
    /// Resume from a stored cursor (`None` = before genesis).
    pub fn from_cursor(source: S, cursor: Cursor, cfg: StreamConfig) -> Self {
        let history = cfg.history.as_deref().map(History::load).unwrap_or_default();
        BlockStream { source, cursor, cfg, unwinding: 0, recent: Default::default(), history, tip_hint: 0 }
    }

    /// Begin at `start` when there is no stored cursor.
    pub fn starting_at(source: S, start: Start, cfg: StreamConfig) -> Result<Self> {
        let cursor = match start {
            Start::Tip => Some(source.tip()?),
            Start::Height(0) => None,
            Start::Height(h) => {
                let hash =
                    source.block_hash(h - 1)?.ok_or_else(|| ChainError::Config(format!("start height {h} is above the node's tip")))?;
                Some(BlockId { height: h - 1, hash })
            }
        };
        Ok(Self::from_cursor(source, cursor, cfg))
    }

    /// Stored cursor if any, else `start`.
    pub fn resume(source: S, stored: Option<Cursor>, start: Start, cfg: StreamConfig) -> Result<Self> {
        match stored {
            Some(c) => Ok(Self::from_cursor(source, c, cfg)),
            None => Self::starting_at(source, start, cfg),
        }
    }

    /// Cursor after the last event returned.
    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    pub fn source(&self) -> &S {
        &self.source
    }

    /// The next event, waiting up to `timeout` for one (`None` = wait forever).
    /// Returns `Ok(None)` when the timeout passes with nothing new.
    pub fn next_event(&mut self, timeout: Option<Duration>) -> Result<Option<BlockEvent>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(ev) = self.step()? {
                match &ev {
                    BlockEvent::Connected { id, block } => {
                        // Durably remembered before the consumer can store a cursor at it.
                        self.history.insert(id.height, block.header);
                        self.history.prune(self.cfg.remember_blocks);
                        if let Some(path) = &self.cfg.history {
                            if self.tip_hint.saturating_sub(id.height) < self.cfg.remember_blocks as u32 {
                                self.history.save(path)?;
                            }
                        }
                        self.recent.push_back((*id, block.clone()));
                        while self.recent.len() > FULL_BLOCKS_IN_MEMORY.min(self.cfg.remember_blocks) {
                            self.recent.pop_front();
                        }
                    }
                    BlockEvent::Disconnected { id, .. } => {
                        if self.recent.back().is_some_and(|(r, _)| r == id) {
                            self.recent.pop_back();
                        }
                    }
                }
                self.cursor = ev.cursor_after();
                return Ok(Some(ev));
            }
            // At the tip: long-poll for a change.
            let slice = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    left.min(self.cfg.poll_slice)
                }
                None => self.cfg.poll_slice,
            };
            match self.cursor {
                Some(c) => {
                    self.source.wait_for_tip_change(&c.hash, slice)?;
                }
                None => std::thread::sleep(slice.min(Duration::from_millis(100))),
            }
        }
    }

    /// Compute the next event from the cursor, or `None` if the cursor is the tip.
    fn step(&mut self) -> Result<Option<BlockEvent>> {
        let Some(cur) = self.cursor else {
            // Before genesis: connect the genesis block.
            let Some(hash) = self.source.block_hash(0)? else { return Ok(None) };
            let block = self.source.block(&hash)?;
            self.unwinding = 0;
            return Ok(Some(BlockEvent::Connected { id: BlockId { height: 0, hash }, block: Arc::new(block) }));
        };
        let Some(state) = self.source.header_state(&cur.hash)? else {
            // The node forgot a block it served (crash before flushing): a reorg, rolled back
            // from what the stream remembers of the blocks it delivered.
            let block = match self.recent.back() {
                Some((id, block)) if *id == cur => Some(block.clone()),
                _ => match self.history.headers.get(&cur.hash) {
                    Some((h, header)) if *h == cur.height => Some(Arc::new(Block { header: *header, txdata: vec![] })),
                    _ => None,
                },
            };
            let Some(block) = block else {
                return Err(ChainError::CursorUnknown { height: cur.height, hash: cur.hash.to_string() });
            };
            if self.unwinding >= self.cfg.max_reorg_depth {
                return Err(ChainError::ReorgTooDeep { limit: self.cfg.max_reorg_depth, height: cur.height });
            }
            self.unwinding += 1;
            tracing::warn!(height = cur.height, hash = %cur.hash, "the node no longer knows a delivered block; disconnecting it");
            return Ok(Some(BlockEvent::Disconnected { id: cur, block }));
        };
        if state.in_active_chain {
            self.tip_hint = cur.height + state.confirmations.saturating_sub(1);
        }
        if state.in_active_chain {
            let Some(next) = state.next else { return Ok(None) };
            let block = self.source.block(&next)?;
            if block.header.prev_blockhash != cur.hash {
                return Err(ChainError::Protocol {
                    method: "getblock".into(),
                    message: format!("block {next} does not build on {}", cur.hash),
                });
            }
            self.unwinding = 0;
            Ok(Some(BlockEvent::Connected { id: BlockId { height: cur.height + 1, hash: next }, block: Arc::new(block) }))
        } else {
            if self.unwinding >= self.cfg.max_reorg_depth {
                return Err(ChainError::ReorgTooDeep { limit: self.cfg.max_reorg_depth, height: cur.height });
            }
            let block = self.source.block(&cur.hash)?;
            self.unwinding += 1;
            Ok(Some(BlockEvent::Disconnected { id: cur, block: Arc::new(block) }))
        }
    }
}

/// Persistence of a cursor for consumers that have no database of their own.
pub trait CursorStore {
    /// `None` = nothing stored yet; `Some(None)` = stored "before genesis".
    fn load(&self) -> Result<Option<Cursor>>;
    fn save(&mut self, cursor: Cursor) -> Result<()>;
}

#[derive(Serialize, Deserialize)]
struct CursorFile {
    height: Option<u32>,
    hash: Option<BlockHash>,
}

/// A cursor in a small JSON file, replaced atomically (write, fsync, rename, fsync dir).
#[derive(Clone, Debug)]
pub struct FileCursorStore {
    path: PathBuf,
}

impl FileCursorStore {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileCursorStore { path: path.into() }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl CursorStore for FileCursorStore {
    fn load(&self) -> Result<Option<Cursor>> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ChainError::io(format!("reading cursor {}", self.path.display()), e)),
        };
        let f: CursorFile =
            serde_json::from_str(&text).map_err(|e| ChainError::Config(format!("corrupt cursor file {}: {e}", self.path.display())))?;
        match (f.height, f.hash) {
            (Some(height), Some(hash)) => Ok(Some(Some(BlockId { height, hash }))),
            (None, None) => Ok(Some(None)),
            _ => Err(ChainError::Config(format!("corrupt cursor file {}", self.path.display()))),
        }
    }

    fn save(&mut self, cursor: Cursor) -> Result<()> {
        let body =
            serde_json::to_vec(&CursorFile { height: cursor.map(|c| c.height), hash: cursor.map(|c| c.hash) }).expect("cursor serializes");
        write_atomic(&self.path, &body)
    }
}

/// Replace `path` with `bytes` atomically and durably.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let ctx = || format!("writing {}", path.display());
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| ChainError::io(ctx(), e))?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp).map_err(|e| ChainError::io(ctx(), e))?;
        f.write_all(bytes).map_err(|e| ChainError::io(ctx(), e))?;
        f.sync_all().map_err(|e| ChainError::io(ctx(), e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| ChainError::io(ctx(), e))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| ChainError::io(ctx(), e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The algorithm against an in-memory block tree with arbitrary reorgs.
    //! (Integration tests in `tests/` run the same stream against a real bitcoind.)
    use super::*;
    use bitcoin::block::{Header, Version};
    use bitcoin::hashes::Hash;
    use bitcoin::{CompactTarget, TxMerkleNode};
    use std::cell::RefCell;
    use std::collections::HashMap;

    #[derive(Default)]
    struct Tree {
        blocks: HashMap<BlockHash, (u32, Block)>,
        active: Vec<BlockHash>,
        nonce: u32,
    }

    struct MemSource(RefCell<Tree>);

    impl MemSource {
        fn new() -> Self {
            let s = MemSource(RefCell::new(Tree::default()));
            s.extend_from(None, 1);
            s
        }
        /// Build `n` blocks on top of `parent` (None = genesis) and make the branch active.
        fn extend_from(&self, parent: Option<BlockHash>, n: u32) -> Vec<BlockHash> {
            let mut t = self.0.borrow_mut();
            let mut prev = parent;
            let mut out = vec![];
            for _ in 0..n {
                t.nonce += 1;
                let height = prev.map(|p| t.blocks[&p].0 + 1).unwrap_or(0);
                let header = Header {
                    version: Version::ONE,
                    prev_blockhash: prev.unwrap_or(BlockHash::all_zeros()),
                    merkle_root: TxMerkleNode::all_zeros(),
                    time: 0,
                    bits: CompactTarget::from_consensus(0x207fffff),
                    nonce: t.nonce,
                };
                let hash = header.block_hash();
                t.blocks.insert(hash, (height, Block { header, txdata: vec![] }));
                t.active.truncate(height as usize);
                t.active.push(hash);
                prev = Some(hash);
                out.push(hash);
            }
            out
        }
        /// Forget the top `n` blocks entirely, as a node that crashed before flushing does.
        fn forget_top(&self, n: u32) {
            let mut t = self.0.borrow_mut();
            for _ in 0..n {
                let h = t.active.pop().unwrap();
                t.blocks.remove(&h);
            }
        }
        fn at(&self, h: u32) -> BlockHash {
            self.0.borrow().active[h as usize]
        }
        fn height(&self) -> u32 {
            self.0.borrow().active.len() as u32 - 1
        }
    }

    impl BlockSource for &MemSource {
        fn header_state(&self, hash: &BlockHash) -> Result<Option<HeaderState>> {
            let t = self.0.borrow();
            let Some((h, b)) = t.blocks.get(hash) else { return Ok(None) };
            let active = t.active.get(*h as usize) == Some(hash);
            Ok(Some(HeaderState {
                id: BlockId { height: *h, hash: *hash },
                prev: if *h == 0 { None } else { Some(b.header.prev_blockhash) },
                in_active_chain: active,
                next: if active { t.active.get(*h as usize + 1).copied() } else { None },
                confirmations: if active { t.active.len() as u32 - h } else { 0 },
            }))
        }
        fn block_hash(&self, height: u32) -> Result<Option<BlockHash>> {
            Ok(self.0.borrow().active.get(height as usize).copied())
        }
        fn block(&self, hash: &BlockHash) -> Result<Block> {
            Ok(self.0.borrow().blocks[hash].1.clone())
        }
        fn tip(&self) -> Result<BlockId> {
            let t = self.0.borrow();
            Ok(BlockId { height: t.active.len() as u32 - 1, hash: *t.active.last().unwrap() })
        }
        fn wait_for_tip_change(&self, _: &BlockHash, _: Duration) -> Result<BlockId> {
            self.tip()
        }
    }

    /// Drain all currently available events.
    fn drain<S: BlockSource>(s: &mut BlockStream<S>) -> Vec<BlockEvent> {
        let mut v = vec![];
        while let Some(e) = s.next_event(Some(Duration::ZERO)).unwrap() {
            v.push(e);
        }
        v
    }

    /// Apply events to a consumer-side chain and check it equals the source's active chain.
    fn apply(chain: &mut Vec<BlockHash>, evs: &[BlockEvent]) {
        for e in evs {
            match e {
                BlockEvent::Connected { id, block } => {
                    assert_eq!(id.height as usize, chain.len());
                    if let Some(last) = chain.last() {
                        assert_eq!(*last, block.header.prev_blockhash);
                    }
                    chain.push(id.hash);
                }
                BlockEvent::Disconnected { id, .. } => {
                    assert_eq!(chain.pop(), Some(id.hash));
                }
            }
        }
    }

    #[test]
    fn connects_every_block_once_in_order() {
        let src = MemSource::new();
        src.extend_from(Some(src.at(0)), 20);
        let mut s = BlockStream::starting_at(&src, Start::Height(0), StreamConfig::default()).unwrap();
        let evs = drain(&mut s);
        assert_eq!(evs.len(), 21);
        let mut chain = vec![];
        apply(&mut chain, &evs);
        assert_eq!(chain, src.0.borrow().active);
    }

    #[test]
    fn reorg_disconnects_then_connects() {
        let src = MemSource::new();
        src.extend_from(Some(src.at(0)), 10);
        let mut s = BlockStream::starting_at(&src, Start::Height(0), StreamConfig::default()).unwrap();
        let mut chain = vec![];
        apply(&mut chain, &drain(&mut s));
        let old_tip3: Vec<_> = (8..=10).rev().map(|h| src.at(h)).collect();
        src.extend_from(Some(src.at(7)), 5);
        let evs = drain(&mut s);
        let disc: Vec<_> = evs.iter().take_while(|e| !e.is_connected()).map(|e| e.id().hash).collect();
        assert_eq!(disc, old_tip3);
        assert_eq!(evs.len(), 3 + 5);
        assert!(evs[3..].iter().all(|e| e.is_connected()));
        apply(&mut chain, &evs);
        assert_eq!(chain, src.0.borrow().active);
    }

    #[test]
    fn reorg_deeper_than_limit_is_an_error() {
        let src = MemSource::new();
        src.extend_from(Some(src.at(0)), 10);
        let cfg = StreamConfig { max_reorg_depth: 2, ..Default::default() };
        let mut s = BlockStream::starting_at(&src, Start::Tip, cfg).unwrap();
        src.extend_from(Some(src.at(6)), 6);
        let mut n = 0;
        let err = loop {
            match s.next_event(Some(Duration::ZERO)) {
                Ok(Some(_)) => n += 1,
                Ok(None) => panic!("stream ended without error"),
                Err(e) => break e,
            }
        };
        assert_eq!(n, 2);
        assert!(matches!(err, ChainError::ReorgTooDeep { limit: 2, .. }), "{err}");
    }

    #[test]
    fn restart_from_any_cursor_neither_misses_nor_repeats() {
        // Random forks; a consumer that "crashes" after every k-th event and restarts from
        // its saved cursor ends with exactly the source's chain.
        let src = MemSource::new();
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut rnd = |m: u32| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % m as u64) as u32
        };
        let mut saved: Cursor = None;
        let mut chain: Vec<BlockHash> = vec![];
        for round in 0..200 {
            let h = src.height();
            let fork = h.saturating_sub(rnd(5));
            src.extend_from(Some(src.at(fork)), 1 + rnd(4));
            let mut s = BlockStream::from_cursor(&src, saved, StreamConfig::default());
            let take = 1 + rnd(6) as usize;
            for _ in 0..take {
                match s.next_event(Some(Duration::ZERO)).unwrap() {
                    Some(e) => {
                        apply(&mut chain, std::slice::from_ref(&e));
                        saved = e.cursor_after();
                    }
                    None => break,
                }
            }
            if round % 7 == 0 {
                apply(&mut chain, &drain(&mut s));
                saved = s.cursor();
                assert_eq!(chain, src.0.borrow().active);
            }
        }
        let mut s = BlockStream::from_cursor(&src, saved, StreamConfig::default());
        apply(&mut chain, &drain(&mut s));
        assert_eq!(chain, src.0.borrow().active);
    }

    #[test]
    fn blocks_a_crashed_node_forgot_are_rolled_back_from_memory() {
        let src = MemSource::new();
        src.extend_from(Some(src.at(0)), 20);
        let mut s = BlockStream::starting_at(&src, Start::Height(0), StreamConfig::default()).unwrap();
        let mut chain = vec![];
        apply(&mut chain, &drain(&mut s));
        src.forget_top(5);
        src.extend_from(Some(src.at(15)), 7);
        let evs = drain(&mut s);
        assert_eq!(evs.iter().filter(|e| !e.is_connected()).count(), 5);
        apply(&mut chain, &evs);
        assert_eq!(chain, src.0.borrow().active);
        // Beyond what the stream remembers: a clear error, not a guess.
        let cfg = StreamConfig { remember_blocks: 2, ..Default::default() };
        let mut s = BlockStream::starting_at(&src, Start::Height(0), cfg).unwrap();
        drain(&mut s);
        src.forget_top(3);
        for _ in 0..2 {
            assert!(!s.next_event(Some(Duration::ZERO)).unwrap().unwrap().is_connected());
        }
        assert!(matches!(s.next_event(Some(Duration::ZERO)), Err(ChainError::CursorUnknown { .. })));
    }

    #[test]
    fn a_restarted_consumer_walks_back_through_blocks_a_crashed_node_forgot() {
        // The consumer stores its cursor, stops; the node crashes and comes back without
        // its last 7 blocks, then mines another branch. A new stream (no memory of the old
        // one) walks back with the durable history, then connects the new branch.
        let dir = tempfile::tempdir().unwrap();
        let history = dir.path().join("h.json");
        let src = MemSource::new();
        src.extend_from(Some(src.at(0)), 30);
        let mut s = BlockStream::starting_at(&src, Start::Height(0), StreamConfig::with_history(&history)).unwrap();
        let mut chain = vec![];
        apply(&mut chain, &drain(&mut s));
        let saved = s.cursor();
        drop(s);
        let lost: Vec<_> = (24..=30).rev().map(|h| src.at(h)).collect();
        src.forget_top(7);
        src.extend_from(Some(src.at(23)), 3);
        let mut s = BlockStream::from_cursor(&src, saved, StreamConfig::with_history(&history));
        let evs = drain(&mut s);
        let disc: Vec<_> = evs.iter().take_while(|e| !e.is_connected()).map(|e| e.id().hash).collect();
        assert_eq!(disc, lost, "every forgotten block disconnected, newest first");
        assert!(evs[7..].iter().all(|e| e.is_connected()) && evs.len() == 7 + 3);
        apply(&mut chain, &evs);
        assert_eq!(chain, src.0.borrow().active);
        // Without the history file, the same cursor is refused with the recovery hint.
        let mut s = BlockStream::from_cursor(&src, saved, StreamConfig::default());
        let err = s.next_event(Some(Duration::ZERO)).unwrap_err();
        assert!(matches!(err, ChainError::CursorUnknown { height: 30, .. }), "{err}");
        assert!(err.to_string().contains("docs/operations.md"), "{err}");
    }

    #[test]
    fn the_history_keeps_only_the_last_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let history = dir.path().join("h.json");
        let src = MemSource::new();
        src.extend_from(Some(src.at(0)), 50);
        let cfg = StreamConfig { remember_blocks: 10, ..StreamConfig::with_history(&history) };
        let mut s = BlockStream::starting_at(&src, Start::Height(0), cfg.clone()).unwrap();
        drain(&mut s);
        let saved = s.cursor();
        drop(s);
        let f: HistoryFile = serde_json::from_slice(&std::fs::read(&history).unwrap()).unwrap();
        assert_eq!(f.headers.len(), 10);
        assert_eq!(f.headers.first().unwrap().0, 41);
        // Losing 10 blocks is followed; losing 11 is refused.
        src.forget_top(11);
        let mut s = BlockStream::from_cursor(&src, saved, cfg);
        for _ in 0..10 {
            assert!(!s.next_event(Some(Duration::ZERO)).unwrap().unwrap().is_connected());
        }
        assert!(matches!(s.next_event(Some(Duration::ZERO)), Err(ChainError::CursorUnknown { height: 40, .. })));
    }

    #[test]
    fn unknown_cursor_is_a_clear_error() {
        let src = MemSource::new();
        let bogus = BlockId { height: 5, hash: BlockHash::all_zeros() };
        let mut s = BlockStream::from_cursor(&src, Some(bogus), StreamConfig::default());
        let err = s.next_event(Some(Duration::ZERO)).unwrap_err();
        assert!(matches!(err, ChainError::CursorUnknown { height: 5, .. }), "{err}");
    }

    #[test]
    fn file_cursor_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = FileCursorStore::new(dir.path().join("c.json"));
        assert_eq!(st.load().unwrap(), None);
        st.save(None).unwrap();
        assert_eq!(st.load().unwrap(), Some(None));
        let c = BlockId { height: 7, hash: BlockHash::all_zeros() };
        st.save(Some(c)).unwrap();
        assert_eq!(st.load().unwrap(), Some(Some(c)));
        std::fs::write(st.path(), b"{nonsense").unwrap();
        assert!(matches!(st.load(), Err(ChainError::Config(_))));
    }
}
