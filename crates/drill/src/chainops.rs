//! What the drill does to the chain: it is the only miner, and it replaces blocks. In a
//! reorg each transaction of the replaced blocks gets a fate chosen by the seed: mined
//! again in the new branch, dropped from it (it stays in the mempool and may come back
//! later), or double-spent (a conflicting transaction is mined instead, so it can never
//! come back). Only transactions spending anyone-can-spend regtest outputs (the fleet's
//! payments and signed commands) can be double-spent by the drill; the gateway's wallet
//! transactions (anchors) can only be re-mined or dropped.

use std::collections::{BTreeSet, HashMap};

use bitmote_chain::bitcoin::absolute::LockTime;
use bitmote_chain::bitcoin::consensus::encode::serialize_hex;
use bitmote_chain::bitcoin::transaction::Version;
use bitmote_chain::bitcoin::{Amount, BlockHash, ScriptBuf, Sequence, Transaction, TxIn, TxOut, Txid, Witness};
use bitmote_chain::ChainClient;
use bitmote_regtest::op_true_address;
use serde::Deserialize;
use serde_json::json;

use crate::rng::Rng;
use crate::DrillError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fate {
    Remined,
    Dropped,
    DoubleSpent,
}

impl Fate {
    pub fn name(self) -> &'static str {
        match self {
            Fate::Remined => "re-mined",
            Fate::Dropped => "dropped",
            Fate::DoubleSpent => "double-spent",
        }
    }
}

/// What one reorg did.
#[derive(Debug, Default)]
pub struct ReorgOutcome {
    pub depth: u32,
    pub fates: Vec<(Txid, Fate, &'static str)>,
}

/// Transactions the miner leaves out for now (dropped in a reorg this round).
#[derive(Default)]
pub struct Miner {
    pub excluded: BTreeSet<Txid>,
    /// Reorgs made so far: each new branch pays its coinbases to an address of its own, so
    /// no block of it can be identical to (and refused as) a block it replaces.
    reorgs: u32,
}

/// A P2WSH address no one needs to spend from: `<n> OP_DROP OP_TRUE`.
fn branch_address(n: u32) -> String {
    let script = bitmote_chain::bitcoin::script::Builder::new()
        .push_int(n as i64)
        .push_opcode(bitmote_chain::bitcoin::opcodes::all::OP_DROP)
        .push_opcode(bitmote_chain::bitcoin::opcodes::OP_TRUE)
        .into_script();
    bitmote_chain::bitcoin::Address::p2wsh(&script, bitmote_chain::bitcoin::Network::Regtest).to_string()
}

#[derive(Deserialize)]
struct MempoolEntry {
    #[serde(default)]
    depends: Vec<Txid>,
    #[serde(default)]
    ancestorcount: u64,
}

fn anchor_like(tx: &Transaction) -> bool {
    tx.output.iter().any(|o| o.script_pubkey.is_op_return() && o.script_pubkey.as_bytes().windows(3).any(|w| w == b"BMT"))
}

/// Every input spends an anyone-can-spend output: the drill can double-spend it.
fn spends_op_true(tx: &Transaction) -> bool {
    !tx.input.is_empty() && tx.input.iter().all(|i| i.witness.len() == 1 && i.witness.nth(0) == Some(&[0x51u8][..]))
}

impl Miner {
    /// Mine one block with the mempool minus the excluded transactions (and their
    /// descendants), in an order that respects dependencies.
    pub fn mine(&self, c: &ChainClient) -> Result<BlockHash, DrillError> {
        let pool: HashMap<Txid, MempoolEntry> = c.raw("getrawmempool", &[json!(true)])?;
        let mut left_out: BTreeSet<Txid> = self.excluded.clone();
        let mut changed = true;
        while changed {
            changed = false;
            for (txid, e) in &pool {
                if !left_out.contains(txid) && e.depends.iter().any(|d| left_out.contains(d)) {
                    left_out.insert(*txid);
                    changed = true;
                }
            }
        }
        let mut txs: Vec<(&Txid, &MempoolEntry)> = pool.iter().filter(|(t, _)| !left_out.contains(*t)).collect();
        txs.sort_by_key(|(t, e)| (e.ancestorcount, **t));
        let list: Vec<String> = txs.iter().map(|(t, _)| t.to_string()).collect();
        let v: serde_json::Value = c.raw("generateblock", &[json!(op_true_address().to_string()), json!(list)])?;
        v["hash"].as_str().and_then(|h| h.parse().ok()).ok_or_else(|| DrillError::Fault(format!("generateblock answered {v}")))
    }

    /// Replace the last `depth` blocks by a longer branch; each non-coinbase transaction of
    /// the replaced blocks gets a fate from `rng` (`double-spent` only where possible).
    pub fn reorg(&mut self, c: &ChainClient, depth: u32, rng: &mut Rng) -> Result<ReorgOutcome, DrillError> {
        let tip = c.tip()?;
        let depth = depth.clamp(1, tip.height.saturating_sub(101).max(1));
        let fork = tip.height - depth + 1;
        let mut old: Vec<Transaction> = vec![];
        for h in fork..=tip.height {
            let hash = c.block_hash(h)?.ok_or_else(|| DrillError::Fault(format!("no block at {h}")))?;
            old.extend(c.block(&hash)?.txdata.into_iter().skip(1));
        }
        let first = c.block_hash(fork)?.ok_or_else(|| DrillError::Fault(format!("no block at {fork}")))?;
        let mut out = ReorgOutcome { depth, fates: vec![] };
        // Fates, in block order; a transaction whose parent does not come back stays out.
        let mut gone: BTreeSet<Txid> = BTreeSet::new();
        let mut include: Vec<String> = vec![];
        for tx in &old {
            let txid = tx.compute_txid();
            let what = if anchor_like(tx) {
                "anchor"
            } else if spends_op_true(tx) {
                "trigger"
            } else {
                "other"
            };
            let orphan = tx.input.iter().any(|i| gone.contains(&i.previous_output.txid));
            let fate = if orphan {
                Fate::Dropped
            } else {
                match what {
                    // Channel fundings and the like: always back, a reorg is not a theft.
                    "other" => Fate::Remined,
                    "anchor" => *rng.pick(&[Fate::Remined, Fate::Dropped]),
                    _ => *rng.pick(&[Fate::Remined, Fate::Dropped, Fate::DoubleSpent]),
                }
            };
            match fate {
                Fate::Remined => include.push(serialize_hex(tx)),
                Fate::Dropped => {
                    gone.insert(txid);
                    self.excluded.insert(txid);
                }
                Fate::DoubleSpent => {
                    gone.insert(txid);
                    include.push(serialize_hex(&double_spend(tx)));
                }
            }
            out.fates.push((txid, fate, what));
        }
        c.invalidate_block(&first)?;
        // The new branch, one block longer: empty blocks, then one with what comes back (at
        // the new tip, so a transaction with an anti-fee-sniping lock time is final there).
        self.reorgs += 1;
        let addr = branch_address(self.reorgs);
        for _ in 0..depth {
            let _: serde_json::Value = c.raw("generateblock", &[json!(addr), json!(Vec::<String>::new())])?;
        }
        if let Err(e) = c.raw::<serde_json::Value>("generateblock", &[json!(addr), json!(include)]) {
            // Never leave the chain shorter than it was: finish the branch without them.
            let _: serde_json::Value = c.raw("generateblock", &[json!(addr), json!(Vec::<String>::new())])?;
            return Err(DrillError::Fault(format!("re-mining the replaced blocks' transactions: {e}")));
        }
        Ok(out)
    }
}

/// A transaction spending the same anyone-can-spend inputs as `tx`, all to OP_TRUE.
fn double_spend(tx: &Transaction) -> Transaction {
    let input: Vec<TxIn> = tx
        .input
        .iter()
        .map(|i| TxIn {
            previous_output: i.previous_output,
            script_sig: ScriptBuf::new(),
            sequence: Sequence::ENABLE_RBF_NO_LOCKTIME,
            witness: Witness::from_slice(&[vec![0x51u8]]),
        })
        .collect();
    // The spent value is not in the transaction: pay what the original paid out in total,
    // less one satoshi (its fee stays a fee), to OP_TRUE. Different outputs: a conflict.
    let value: u64 = tx.output.iter().map(|o| o.value.to_sat()).sum::<u64>().saturating_sub(1);
    Transaction {
        version: Version::TWO,
        lock_time: LockTime::ZERO,
        input,
        output: vec![TxOut { value: Amount::from_sat(value), script_pubkey: op_true_address().script_pubkey() }],
    }
}

/// Confirmations of `txid` on the node's best chain (0: not in it).
pub fn confirmations(c: &ChainClient, txid: &str) -> Result<u32, DrillError> {
    match c.raw::<serde_json::Value>("getrawtransaction", &[json!(txid), json!(true)]) {
        Ok(v) => Ok(v["confirmations"].as_u64().unwrap_or(0) as u32),
        Err(bitmote_chain::ChainError::Rpc { code: -5, .. }) => Ok(0),
        Err(e) => Err(e.into()),
    }
}
