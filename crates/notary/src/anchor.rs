//! Anchoring: commit the log's latest root to Bitcoin and follow it to finality.
//!
//! At most one anchor is in flight. When the log has grown past the last anchored size
//! and the interval has passed, [`Anchorer::poll`] pays for a transaction whose
//! OP_RETURN carries `"BMT" 0x01 || tree_size || root` from the gateway's
//! [`GatewayWallet`]. Block events (from the same reorg-aware stream as everything
//! else) update confirmations; a transaction that waits too long is replaced with a
//! higher fee (BIP125 RBF); an anchor that a reorg takes out of the chain is
//! rebroadcast, and abandoned (so a fresh anchor is made) if it can no longer confirm.
//! Every transaction is kept, so the cost per anchor and per reading is exact.
//!
//! The fork guard: before a (size, root) is anchored, its checkpoint is issued through
//! [`CheckpointSigner::issue`], which records it and refuses a root other than the one
//! already signed for that size. On that refusal nothing is anchored: `poll` reports
//! [`AnchorEvent::ForkRefused`] (logged as an error once per forked root) and goes on
//! following the chain and the anchors already made.

use std::path::Path;
use std::time::Duration;

use bitcoin::consensus::encode::{deserialize, serialize};
use bitcoin::{BlockHash, FeeRate, Transaction, Txid};
use bitmote_chain::wallet::{GatewayWallet, Reconciled, TxStatus};
use bitmote_chain::{BlockStream, ChainClient, ChainError, Rejection, StreamConfig};
use rusqlite::{params, Connection, OptionalExtension};

use crate::checkpoint::{CheckpointError, CheckpointSigner};
use crate::{ANCHOR_PAYLOAD_LEN, ANCHOR_TAG};
use bitmote_chain::now_secs;

/// Errors of the anchoring engine.
#[derive(Debug, thiserror::Error)]
pub enum AnchorError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("anchor database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("anchor database: {0}")]
    Store(#[from] crate::store::StoreError),
    /// Issuing the checkpoint of the head to anchor failed (not a fork: storage).
    #[error("issuing the checkpoint to anchor: {0}")]
    Checkpoint(#[from] CheckpointError),
    #[error("the gateway wallet cannot pay for an anchor ({balance} sat spendable): fund it at {address}")]
    Unfunded { balance: u64, address: String },
    #[error("corrupt anchor record: {0}")]
    Corrupt(String),
    /// The node refused a freshly built anchor transaction, and the one rebuilt after the
    /// wallet was brought in line with the node too. The wallet has forgotten both.
    #[error("the node refused anchor transaction {txid} ({rejection:?}): {reason}")]
    Refused { txid: Txid, rejection: Rejection, reason: String },
}

pub type Result<T, E = AnchorError> = std::result::Result<T, E>;

/// What the log looks like now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogHead {
    pub size: u64,
    pub root: [u8; 32],
}

/// The OP_RETURN payload committing to `head`.
pub fn anchor_payload(head: &LogHead) -> [u8; ANCHOR_PAYLOAD_LEN] {
    let mut p = [0u8; ANCHOR_PAYLOAD_LEN];
    p[..4].copy_from_slice(ANCHOR_TAG);
    p[4..12].copy_from_slice(&head.size.to_be_bytes());
    p[12..].copy_from_slice(&head.root);
    p
}

/// Find a bitmote anchor payload in a transaction's outputs: (output index, head).
pub fn find_anchor(tx: &Transaction) -> Option<(usize, LogHead)> {
    tx.output.iter().enumerate().find_map(|(i, out)| {
        let s = out.script_pubkey.as_bytes();
        // OP_RETURN OP_PUSHBYTES_44 <payload>
        if s.len() == 2 + ANCHOR_PAYLOAD_LEN && s[0] == 0x6a && s[1] as usize == ANCHOR_PAYLOAD_LEN && s[2..6] == ANCHOR_TAG[..] {
            let size = u64::from_be_bytes(s[6..14].try_into().ok()?);
            let root: [u8; 32] = s[14..46].try_into().ok()?;
            Some((i, LogHead { size, root }))
        } else {
            None
        }
    })
}

/// Policy of the anchoring engine.
#[derive(Clone, Debug)]
pub struct AnchorConfig {
    /// Least time between two anchors.
    pub interval: Duration,
    /// Replace an unconfirmed anchor with a higher fee after this many blocks.
    pub bump_after_blocks: u32,
    /// Confirmation target for the fee estimate.
    pub fee_target_blocks: u16,
    /// Never pay more than this.
    pub max_fee_rate: FeeRate,
    /// Confirmations after which an anchor is final and no longer watched.
    pub final_confirmations: u32,
}

impl Default for AnchorConfig {
    fn default() -> Self {
        AnchorConfig {
            interval: Duration::from_secs(600),
            bump_after_blocks: 3,
            fee_target_blocks: 6,
            max_fee_rate: FeeRate::from_sat_per_vb_u32(200),
            final_confirmations: 6,
        }
    }
}

/// State of an anchor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnchorState {
    /// Broadcast, not in the best chain.
    Pending,
    /// In the best chain.
    Confirmed,
    /// Can no longer confirm (conflicted after a reorg); superseded by a newer anchor.
    Abandoned,
}

impl AnchorState {
    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "pending" => AnchorState::Pending,
            "confirmed" => AnchorState::Confirmed,
            "abandoned" => AnchorState::Abandoned,
            other => return Err(AnchorError::Corrupt(format!("state {other:?}"))),
        })
    }
}

/// One anchor as listed to users.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AnchorInfo {
    pub id: i64,
    pub tree_size: u64,
    pub root: String,
    pub state: AnchorState,
    /// Transaction that is (or was last) trying to confirm.
    pub txid: Txid,
    /// Confirmed transaction (one of the RBF versions).
    pub confirmed_txid: Option<Txid>,
    pub block_height: Option<u32>,
    pub block_hash: Option<BlockHash>,
    pub confirmations: u32,
    /// Fee of the transaction that counts (the confirmed one, else the latest).
    pub fee_sat: u64,
    /// Readings this anchor newly covers (tree size minus the previous anchor's).
    pub new_readings: u64,
    pub fee_per_reading_sat: f64,
    /// Number of RBF replacements.
    pub bumps: u32,
    pub created_at: u64,
}

/// Something that happened to anchors during a [`Anchorer::poll`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AnchorEvent {
    Broadcast {
        id: i64,
        txid: Txid,
        tree_size: u64,
        fee_sat: u64,
    },
    Bumped {
        id: i64,
        old: Txid,
        new: Txid,
        fee_sat: u64,
    },
    Confirmed {
        id: i64,
        txid: Txid,
        height: u32,
    },
    /// A reorg took a confirmed anchor out of the best chain (an alert).
    Reorged {
        id: i64,
        txid: Txid,
        was_height: u32,
    },
    /// The anchor can no longer confirm; a new anchor will cover its readings.
    Abandoned {
        id: i64,
        txid: Txid,
        reason: String,
    },
    /// A wallet transaction missing from the node's mempool was sent again, or forgotten
    /// (with its descendants) because the node refused it.
    Wallet(Reconciled),
    /// The head to anchor has another root than the checkpoint already issued for its
    /// size (the fork guard, [`CheckpointSigner::issue`]): the log was rewritten. Nothing
    /// was anchored; it is reported on every poll while the head stays forked (an alert).
    ForkRefused {
        size: u64,
        /// The root of the checkpoint issued for `size` earlier.
        signed: [u8; 32],
        /// The root the log has now for `size`.
        root: [u8; 32],
    },
}

/// Everything a proof needs about the anchor that covers a leaf.
#[derive(Clone, Debug)]
pub struct ConfirmedAnchor {
    pub id: i64,
    pub tree_size: u64,
    pub root: [u8; 32],
    pub tx: Transaction,
    pub block_hash: BlockHash,
    pub block_height: u32,
}

/// The anchoring engine: wallet, node, the anchors table, and the checkpoint key of the
/// fork guard.
pub struct Anchorer {
    db: Connection,
    signer: CheckpointSigner,
    /// The last fork refused (logged once, not on every poll).
    refused: Option<(u64, [u8; 32])>,
    wallet: GatewayWallet,
    client: ChainClient,
    stream: BlockStream<ChainClient>,
    cfg: AnchorConfig,
    tip_height: u32,
    /// Set when blocks the wallet had applied left the node's chain (a reorg, or a node
    /// that lost blocks in a crash): confirmed anchors above this height are checked again,
    /// final or not, until the wallet's tip is back on the node's chain.
    recheck_above: Option<u32>,
}

fn parse_txid(s: &str) -> Result<Txid> {
    s.parse().map_err(|e| AnchorError::Corrupt(format!("txid {s:?}: {e}")))
}

impl Anchorer {
    /// Open the notary database at `db_path` and the wallet in `wallet_dir`, and catch up
    /// with the chain. Every head anchored is first issued as a checkpoint signed by
    /// `signer` (the fork guard).
    pub fn open(db_path: &Path, wallet_dir: &Path, client: ChainClient, cfg: AnchorConfig, signer: CheckpointSigner) -> Result<Self> {
        let db = crate::store::open(db_path)?;
        let mut wallet = GatewayWallet::open(wallet_dir, &client)?;
        // The wallet's last block still on the node's chain, *before* catching up: after a
        // node that lost blocks (or a reorg while the gateway was down), the sync replaces
        // the stale blocks in the wallet, and every anchor confirmed above the fork point,
        // final or not, must be checked again (`refresh`: back to pending and rebroadcast,
        // or confirmed in the new branch). Taken after the sync, the fork point would be
        // the new tip, and an anchor final in a lost block would keep naming that block
        // (found by `bitmote drill`: proofs answering 503 after a node crash and a restart).
        // The stream then follows from the wallet's last block on the node's chain after the
        // sync: not its tip, which stays on the lost blocks until the node's chain has a
        // block at a height the wallet has (a node back at the fork point exactly).
        let stale_tip = wallet.tip().height;
        let fork = wallet.resume_point(&client)?;
        wallet.sync(&client)?;
        let from = wallet.resume_point(&client)?;
        let stream = BlockStream::from_cursor(client.fresh()?, Some(from), StreamConfig::default());
        let tip_height = wallet.tip().height;
        let recheck_above = (fork.height < stale_tip).then_some(fork.height);
        Ok(Anchorer { db, signer, refused: None, wallet, client, stream, cfg, tip_height, recheck_above })
    }

    pub fn wallet(&mut self) -> &mut GatewayWallet {
        &mut self.wallet
    }

    pub fn config(&self) -> &AnchorConfig {
        &self.cfg
    }

    /// Follow the chain, update anchors, bump fees, and anchor `head` if it is due.
    pub fn poll(&mut self, head: Option<LogHead>) -> Result<Vec<AnchorEvent>> {
        let mut events = vec![];
        // 1. Apply new blocks to the wallet.
        let mut changed = false;
        while let Some(ev) = self.stream.next_event(Some(Duration::ZERO))? {
            if !ev.is_connected() {
                let below = ev.id().height.saturating_sub(1);
                self.recheck_above = Some(self.recheck_above.map_or(below, |h| h.min(below)));
            }
            self.wallet.apply(&ev)?;
            changed = true;
        }
        if changed {
            self.wallet.sync(&self.client)?; // persist (and catch anything that arrived meanwhile)
        }
        self.tip_height = self.wallet.tip().height;
        // 2. The wallet's unconfirmed transactions against the node's mempool (emptied by a
        //    node restart, or left without the parents a reorg took out): send them again,
        //    parents first, or forget those whose inputs are gone, before anything is built
        //    on them. Only when the wallet has every block of the node's chain.
        if self.client.tip()?.hash == self.wallet.tip().hash {
            for r in self.wallet.reconcile(&self.client)? {
                match &r {
                    Reconciled::Rebroadcast { txid } => tracing::warn!(%txid, "the node had lost wallet transaction {txid}; sent it again"),
                    Reconciled::Forgotten { txid, reason, with_descendants, .. } => {
                        tracing::warn!(%txid, ?with_descendants, "the node refuses wallet transaction {txid} ({reason}); the wallet forgot it")
                    }
                }
                events.push(AnchorEvent::Wallet(r));
            }
        }
        // 3. Update every anchor that is not final (and, after blocks left the chain, every
        //    anchor confirmed above the fork point).
        self.refresh(&mut events)?;
        if self.recheck_above.is_some() {
            let tip = self.wallet.tip();
            if self.client.block_hash(tip.height)? == Some(tip.hash) {
                self.recheck_above = None; // the wallet follows the node's chain again
            }
        }
        // 4. New anchor if due.
        if let Some(head) = head {
            self.maybe_anchor(head, &mut events)?;
        }
        Ok(events)
    }

    fn anchor_txids(&self, id: i64) -> Result<Vec<(Txid, Vec<u8>)>> {
        let mut st = self.db.prepare_cached("SELECT txid, raw FROM anchor_txs WHERE anchor_id = ?1 ORDER BY created_at, rowid")?;
        let rows = st.query_map([id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?)))?;
        let mut out = vec![];
        for r in rows {
            let (t, raw) = r?;
            out.push((parse_txid(&t)?, raw));
        }
        Ok(out)
    }

    fn refresh(&mut self, events: &mut Vec<AnchorEvent>) -> Result<()> {
        // (id, state, txid, block height, broadcast height, block hash), as stored.
        #[allow(clippy::type_complexity)]
        let watch: Vec<(i64, String, String, Option<u32>, u32, Option<String>)> = {
            let mut st = self.db.prepare(
                "SELECT id, state, txid, block_height, broadcast_height, block_hash FROM anchors
                 WHERE state = 'pending' OR (state = 'confirmed' AND block_height > ?1) ORDER BY id",
            )?;
            let mut floor = self.tip_height.saturating_sub(self.cfg.final_confirmations + 1);
            if let Some(h) = self.recheck_above {
                floor = floor.min(h);
            }
            let rows = st.query_map([floor], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        for (id, state, latest, was_height, broadcast_height, was_hash) in watch {
            let state = AnchorState::parse(&state)?;
            let latest = parse_txid(&latest)?;
            let txs = self.anchor_txids(id)?;
            let confirmed = txs.iter().find_map(|(t, _)| match self.wallet.status(*t) {
                TxStatus::Confirmed(b) => Some((*t, b)),
                _ => None,
            });
            match (state, confirmed) {
                (_, Some((txid, b))) => {
                    // Re-mined in another block, maybe at the same height (a reorg): the
                    // block hash decides, or proofs would name a block no longer on the chain.
                    if state != AnchorState::Confirmed
                        || was_height != Some(b.height)
                        || was_hash.as_deref() != Some(b.hash.to_string().as_str())
                    {
                        self.db.execute(
                            "UPDATE anchors SET state='confirmed', confirmed_txid=?2, block_height=?3, block_hash=?4 WHERE id=?1",
                            params![id, txid.to_string(), b.height, b.hash.to_string()],
                        )?;
                        events.push(AnchorEvent::Confirmed { id, txid, height: b.height });
                    }
                }
                (AnchorState::Confirmed, None) => {
                    let was = was_height.unwrap_or(0);
                    tracing::warn!(id, %latest, was_height = was, "a reorg took anchor {id} out of the chain; rebroadcasting");
                    self.db.execute(
                        "UPDATE anchors SET state='pending', confirmed_txid=NULL, block_height=NULL, block_hash=NULL, broadcast_height=?2 WHERE id=?1",
                        params![id, self.tip_height],
                    )?;
                    events.push(AnchorEvent::Reorged { id, txid: latest, was_height: was });
                    self.rebroadcast(id, &txs, events)?;
                }
                (AnchorState::Pending, None) => {
                    if self.wallet.status(latest) == TxStatus::Unknown {
                        // Not in the wallet's view any more (conflicted by a confirmed spend?).
                        self.rebroadcast(id, &txs, events)?;
                    } else if self.tip_height >= broadcast_height + self.cfg.bump_after_blocks {
                        self.bump(id, latest, events)?;
                    }
                }
                (AnchorState::Abandoned, None) => {}
            }
        }
        Ok(())
    }

    /// Put the latest version back in the mempool; abandon the anchor if the node refuses it.
    fn rebroadcast(&mut self, id: i64, txs: &[(Txid, Vec<u8>)], events: &mut Vec<AnchorEvent>) -> Result<()> {
        let Some((txid, raw)) = txs.last() else { return Ok(()) };
        let tx: Transaction = deserialize(raw).map_err(|e| AnchorError::Corrupt(e.to_string()))?;
        match self.client.broadcast(&tx) {
            Ok(_) => {
                self.wallet.mark_broadcast(&tx)?;
                Ok(())
            }
            Err(e) => match e.rejection() {
                Some(Rejection::AlreadyInChain) => Ok(()),
                Some(Rejection::MissingInputs | Rejection::Rejected) => {
                    self.db.execute("UPDATE anchors SET state='abandoned' WHERE id=?1", [id])?;
                    for (_, raw) in txs {
                        if let Ok(t) = deserialize::<Transaction>(raw) {
                            self.wallet.forget(&t)?;
                        }
                    }
                    let reason = match &e {
                        ChainError::Rpc { message, .. } => message.clone(),
                        other => other.to_string(),
                    };
                    tracing::warn!(id, %txid, "anchor {id} can no longer confirm ({reason}); its readings go into the next anchor");
                    events.push(AnchorEvent::Abandoned { id, txid: *txid, reason });
                    Ok(())
                }
                None => Err(e.into()),
            },
        }
    }

    fn bump(&mut self, id: i64, old: Txid, events: &mut Vec<AnchorEvent>) -> Result<()> {
        let old_tx = self.anchor_txids(id)?.into_iter().find(|(t, _)| *t == old).map(|(_, raw)| raw);
        let Some(old_raw) = old_tx else { return Err(AnchorError::Corrupt(format!("anchor {id} lost tx {old}"))) };
        let old_tx: Transaction = deserialize(&old_raw).map_err(|e| AnchorError::Corrupt(e.to_string()))?;
        let old_fee = self.wallet.fee(&old_tx)?;
        let old_rate = old_fee / old_tx.weight();
        let estimate = self.client.fee_rate(self.cfg.fee_target_blocks)?;
        // BIP125 needs a higher absolute fee and rate: at least double, at least the estimate.
        let doubled = FeeRate::from_sat_per_kwu(old_rate.to_sat_per_kwu().max(250) * 2);
        let rate = doubled.max(estimate).min(self.cfg.max_fee_rate);
        if rate <= old_rate {
            tracing::warn!(id, "anchor {id} waits, but its fee rate is already at the configured maximum");
            return Ok(());
        }
        let tx = self.wallet.bump_fee(old, rate)?;
        let fee = match self.broadcast_built(&tx, events) {
            Ok(fee) => fee,
            Err(AnchorError::Refused { txid, reason, .. }) => {
                // Forgotten with what it spent; the next poll sees where the original stands.
                tracing::warn!(id, %old, %txid, "the node refused the fee bump of anchor {id}: {reason}");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let txid = tx.compute_txid();
        let t = self.db.unchecked_transaction()?;
        record_tx(&t, id, &tx, fee)?;
        t.execute(
            "UPDATE anchors SET txid=?2, broadcast_height=?3, bumps=bumps+1 WHERE id=?1",
            params![id, txid.to_string(), self.tip_height],
        )?;
        t.commit()?;
        tracing::info!(id, %old, new = %txid, fee, "anchor {id} fee bumped");
        events.push(AnchorEvent::Bumped { id, old, new: txid, fee_sat: fee });
        Ok(())
    }

    /// Broadcast a transaction the wallet just built; if the node refuses it, the wallet
    /// forgets it (its coins are free again). A refusal (-25, -26) also brings the wallet
    /// in line with the node's mempool (a parent it spends may be gone), and is
    /// [`AnchorError::Refused`]: the transaction is never sent again, a new one is built.
    /// Returns the fee paid.
    fn broadcast_built(&mut self, tx: &Transaction, events: &mut Vec<AnchorEvent>) -> Result<u64> {
        let Err(e) = self.client.broadcast(tx) else { return Ok(self.wallet.fee(tx)?.to_sat()) };
        self.wallet.forget(tx)?;
        match e.rejection() {
            Some(rejection @ (Rejection::MissingInputs | Rejection::Rejected)) => {
                let reason = e.to_string();
                events.extend(self.wallet.reconcile(&self.client)?.into_iter().map(AnchorEvent::Wallet));
                Err(AnchorError::Refused { txid: tx.compute_txid(), rejection, reason })
            }
            _ => Err(e.into()),
        }
    }

    fn maybe_anchor(&mut self, head: LogHead, events: &mut Vec<AnchorEvent>) -> Result<()> {
        if head.size == 0 {
            return Ok(());
        }
        let (pending, anchored, last_at): (i64, Option<u64>, Option<u64>) = self.db.query_row(
            "SELECT (SELECT COUNT(*) FROM anchors WHERE state='pending'),
                    (SELECT MAX(tree_size) FROM anchors WHERE state!='abandoned'),
                    (SELECT MAX(created_at) FROM anchors)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        if pending > 0 || anchored.is_some_and(|s| s >= head.size) {
            return Ok(());
        }
        if last_at.is_some_and(|t| now_secs() < t + self.cfg.interval.as_secs()) {
            return Ok(());
        }
        // The fork guard: this (size, root) is recorded as an issued checkpoint before it
        // is committed to the chain, and a second root for a size is never anchored.
        match self.signer.issue(&self.db, head.size, head.root) {
            Ok(_) => self.refused = None,
            Err(CheckpointError::Fork { size, signed, new }) => {
                if self.refused != Some((size, new)) {
                    tracing::error!(
                        size,
                        signed = %hex::encode(signed),
                        root = %hex::encode(new),
                        "the log has forked: its root for tree size {size} is not the one checkpointed for it; not anchoring it"
                    );
                    self.refused = Some((size, new));
                }
                events.push(AnchorEvent::ForkRefused { size, signed, root: new });
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        let rate = self.client.fee_rate(self.cfg.fee_target_blocks)?.min(self.cfg.max_fee_rate);
        // A refused transaction is never sent again: the wallet forgets it (and whatever it
        // spent that the node no longer has), and the anchor is built again once from the
        // coins that are left.
        let mut attempts = 0;
        let (tx, fee) = loop {
            attempts += 1;
            let tx = match self.wallet.op_return_tx(&anchor_payload(&head), rate) {
                Ok(tx) => tx,
                Err(ChainError::Wallet(w)) if w.is_insufficient_funds() => {
                    let address = self.wallet.new_address()?.to_string();
                    return Err(AnchorError::Unfunded { balance: self.wallet.spendable().to_sat(), address });
                }
                Err(e) => return Err(e.into()),
            };
            match self.broadcast_built(&tx, events) {
                Ok(fee) => break (tx, fee),
                Err(AnchorError::Refused { txid, reason, .. }) if attempts < 2 => {
                    tracing::warn!(%txid, "the node refused a new anchor transaction ({reason}); building it again");
                }
                Err(e) => return Err(e),
            }
        };
        let txid = tx.compute_txid();
        let t = self.db.unchecked_transaction()?;
        t.execute(
            "INSERT INTO anchors (tree_size, root, state, txid, broadcast_height, created_at) VALUES (?1, ?2, 'pending', ?3, ?4, ?5)",
            params![head.size, head.root.to_vec(), txid.to_string(), self.tip_height, now_secs()],
        )?;
        let id = t.last_insert_rowid();
        record_tx(&t, id, &tx, fee)?;
        t.commit()?;
        tracing::info!(id, %txid, tree_size = head.size, fee, "anchor broadcast");
        events.push(AnchorEvent::Broadcast { id, txid, tree_size: head.size, fee_sat: fee });
        Ok(())
    }

    /// All anchors, newest first, with confirmations and cost.
    pub fn list(&self) -> Result<Vec<AnchorInfo>> {
        let mut st = self.db.prepare(
            "SELECT a.id, a.tree_size, a.root, a.state, a.txid, a.confirmed_txid, a.block_height, a.block_hash, a.bumps, a.created_at,
                    (SELECT fee_sat FROM anchor_txs t WHERE t.txid = COALESCE(a.confirmed_txid, a.txid)),
                    (SELECT MAX(b.tree_size) FROM anchors b WHERE b.id < a.id AND b.state != 'abandoned')
             FROM anchors a ORDER BY a.id DESC",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, u64>(1)?,
                r.get::<_, Vec<u8>>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, Option<String>>(5)?,
                r.get::<_, Option<u32>>(6)?,
                r.get::<_, Option<String>>(7)?,
                r.get::<_, u32>(8)?,
                r.get::<_, u64>(9)?,
                r.get::<_, Option<u64>>(10)?,
                r.get::<_, Option<u64>>(11)?,
            ))
        })?;
        let mut out = vec![];
        for row in rows {
            let (id, tree_size, root, state, txid, ctxid, height, hash, bumps, created_at, fee, prev) = row?;
            let state = AnchorState::parse(&state)?;
            let confirmations = match (state, height) {
                (AnchorState::Confirmed, Some(h)) => self.tip_height.saturating_sub(h) + 1,
                _ => 0,
            };
            let new_readings = tree_size.saturating_sub(prev.unwrap_or(0));
            let fee_sat = fee.unwrap_or(0);
            out.push(AnchorInfo {
                id,
                tree_size,
                root: hex::encode(root),
                state,
                txid: parse_txid(&txid)?,
                confirmed_txid: ctxid.as_deref().map(parse_txid).transpose()?,
                block_height: height,
                block_hash: hash.map(|h| h.parse().map_err(|e| AnchorError::Corrupt(format!("{e}")))).transpose()?,
                confirmations,
                fee_sat,
                new_readings,
                fee_per_reading_sat: if new_readings > 0 { fee_sat as f64 / new_readings as f64 } else { 0.0 },
                bumps,
                created_at,
            });
        }
        Ok(out)
    }

    /// The earliest confirmed anchor whose tree contains leaf `index`.
    pub fn covering(&self, index: u64) -> Result<Option<ConfirmedAnchor>> {
        covering(&self.db, index)
    }

    /// The pending anchor (if any) whose tree contains leaf `index`.
    pub fn pending_covering(&self, index: u64) -> Result<Option<(i64, u64, Txid)>> {
        pending_covering(&self.db, index)
    }

    /// Height of the last block the engine has seen.
    pub fn tip_height(&self) -> u32 {
        self.tip_height
    }
}

/// Keep every version of an anchor transaction (for proofs and for the cost).
fn record_tx(t: &rusqlite::Transaction<'_>, anchor_id: i64, tx: &Transaction, fee: u64) -> Result<()> {
    t.execute(
        "INSERT INTO anchor_txs (txid, anchor_id, raw, fee_sat, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![tx.compute_txid().to_string(), anchor_id, serialize(tx), fee, now_secs()],
    )?;
    Ok(())
}

/// Anchors are also read from other connections (HTTP handlers, the proof builder).
/// The earliest confirmed anchor whose tree contains leaf `index`.
pub fn covering(db: &Connection, index: u64) -> Result<Option<ConfirmedAnchor>> {
    let row = db
        .query_row(
            "SELECT a.id, a.tree_size, a.root, t.raw, a.block_hash, a.block_height
                 FROM anchors a JOIN anchor_txs t ON t.txid = a.confirmed_txid
                 WHERE a.state = 'confirmed' AND a.tree_size > ?1 ORDER BY a.tree_size LIMIT 1",
            [index],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, u64>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, Vec<u8>>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, u32>(5)?,
                ))
            },
        )
        .optional()?;
    let Some((id, tree_size, root, raw, hash, height)) = row else { return Ok(None) };
    Ok(Some(ConfirmedAnchor {
        id,
        tree_size,
        root: root.try_into().map_err(|_| AnchorError::Corrupt("root length".into()))?,
        tx: deserialize(&raw).map_err(|e| AnchorError::Corrupt(e.to_string()))?,
        block_hash: hash.parse().map_err(|e| AnchorError::Corrupt(format!("{e}")))?,
        block_height: height,
    }))
}

/// The pending anchor (if any) whose tree contains leaf `index`.
pub fn pending_covering(db: &Connection, index: u64) -> Result<Option<(i64, u64, Txid)>> {
    let row = db
        .query_row(
            "SELECT id, tree_size, txid FROM anchors WHERE state='pending' AND tree_size > ?1 ORDER BY tree_size LIMIT 1",
            [index],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, u64>(1)?, r.get::<_, String>(2)?)),
        )
        .optional()?;
    row.map(|(id, s, t)| Ok((id, s, parse_txid(&t)?))).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::{absolute, transaction, Amount, ScriptBuf, TxOut};

    #[test]
    fn payload_roundtrips_through_an_op_return_output() {
        let head = LogHead { size: 0x0102_0304_0506_0708, root: [7u8; 32] };
        let p = anchor_payload(&head);
        assert_eq!(&p[..4], b"BMT\x01");
        let push = bitcoin::script::PushBytesBuf::try_from(p.to_vec()).unwrap();
        let tx = Transaction {
            version: transaction::Version::TWO,
            lock_time: absolute::LockTime::ZERO,
            input: vec![],
            output: vec![
                TxOut { value: Amount::from_sat(1000), script_pubkey: ScriptBuf::new() },
                TxOut { value: Amount::ZERO, script_pubkey: ScriptBuf::new_op_return(push) },
            ],
        };
        assert_eq!(find_anchor(&tx), Some((1, head)));
        let mut other = p;
        other[3] = 2; // unknown version
        let push = bitcoin::script::PushBytesBuf::try_from(other.to_vec()).unwrap();
        let tx2 = Transaction { output: vec![TxOut { value: Amount::ZERO, script_pubkey: ScriptBuf::new_op_return(push) }], ..tx };
        assert_eq!(find_anchor(&tx2), None);
    }
}
