//! The proof bundle of one reading: everything needed to check it against Bitcoin
//! block headers, with no trust in the gateway.
//!
//! reading → (device signature, or batch membership + batch signature) → log
//! inclusion proof → tree root (optionally in a signed checkpoint) → the anchoring
//! transaction's OP_RETURN → the transaction's Merkle path → the block header at a
//! height. Before the anchor confirms, the bundle says `pending` and stops at the root.
//!
//! Hashes are hex. Block-level hashes (`txid`, `block_hash`) are in the usual
//! display order; `tx_path` siblings are in internal (serialization) byte order.

use bitcoin::consensus::encode::{deserialize_hex, serialize};
use bitcoin::hashes::{sha256d, Hash as _};
use bitcoin::{Block, BlockHash, Transaction, Txid};
use bitmote_device::merkle::{self, Hash};
use bitmote_device::{BatchMembership, Evidence, PublicKey, Reading, Signature};
use serde::{Deserialize, Serialize};

use crate::anchor::find_anchor;
use crate::ots::{Attestation, DetachedTimestampFile, Op, Timestamp};
use crate::{ANCHOR_PAYLOAD_LEN, ANCHOR_TAG};

/// Errors building a bundle or an `.ots` from one.
#[derive(Debug, thiserror::Error)]
pub enum ProofError {
    #[error("the proof is pending: the anchor covering this reading has not confirmed yet")]
    Pending,
    #[error("malformed proof bundle: {0}")]
    Malformed(String),
    #[error("transaction {0} is not in the block")]
    TxNotInBlock(Txid),
}

/// How the device authenticated the reading.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EvidenceJson {
    Signature { signature: String },
    Batch { first_seq: u64, count: u32, index: u32, path: Vec<String>, signature: String },
}

/// The reading's place in the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogInclusion {
    pub leaf_index: u64,
    pub tree_size: u64,
    pub path: Vec<String>,
    /// The root the path leads to (what the anchor commits to).
    pub root: String,
}

/// The anchor of the tree, or why there is none yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum AnchorJson {
    Pending { message: String },
    Confirmed {
        txid: String,
        /// Raw transaction (hex, as on the wire).
        tx: String,
        block_hash: String,
        block_height: u32,
        tx_index: u32,
        tx_path: Vec<String>,
    },
}

/// Confirmed anchor data, computed from the block.
#[derive(Clone, Debug)]
pub struct AnchorEvidence {
    pub tx: Transaction,
    pub block_hash: BlockHash,
    pub block_height: u32,
    pub tx_index: u32,
    pub tx_path: Vec<[u8; 32]>,
}

impl AnchorEvidence {
    /// The transaction's Merkle path in `block` (Bitcoin's tree: odd levels duplicate their last hash).
    pub fn from_block(block: &Block, txid: Txid, height: u32) -> Result<Self, ProofError> {
        let ids: Vec<[u8; 32]> = block.txdata.iter().map(|t| t.compute_txid().to_byte_array()).collect();
        let index = ids.iter().position(|t| *t == txid.to_byte_array()).ok_or(ProofError::TxNotInBlock(txid))?;
        let (mut level, mut i, mut path) = (ids, index, vec![]);
        while level.len() > 1 {
            if level.len() % 2 == 1 {
                level.push(*level.last().expect("non-empty"));
            }
            path.push(level[i ^ 1]);
            level = level.chunks(2).map(|p| sha256d::Hash::hash(&[p[0], p[1]].concat()).to_byte_array()).collect();
            i /= 2;
        }
        Ok(AnchorEvidence {
            tx: block.txdata[index].clone(),
            block_hash: block.block_hash(),
            block_height: height,
            tx_index: index as u32,
            tx_path: path,
        })
    }
}

/// Everything needed to verify one reading.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProofBundle {
    pub version: u32,
    /// The reading's canonical encoding (hex): the "file" that is timestamped.
    pub reading: String,
    pub reading_id: String,
    /// The device key (hex, bitmote encoding).
    pub device_key: String,
    pub evidence: EvidenceJson,
    pub log: LogInclusion,
    /// The C2SP signed checkpoint for `log.tree_size`, if the gateway signs checkpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    pub anchor: AnchorJson,
}

fn hx(h: &[u8]) -> String {
    hex::encode(h)
}

pub(crate) fn unhex32(s: &str, what: &str) -> Result<[u8; 32], ProofError> {
    hex::decode(s)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| ProofError::Malformed(format!("{what} is not 32 bytes of hex")))
}

impl ProofBundle {
    /// Assemble a bundle. `path` is the log inclusion path of `leaf_index` in a tree of `tree_size`.
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        reading: &Reading,
        key: &PublicKey,
        evidence: &Evidence,
        leaf_index: u64,
        tree_size: u64,
        path: &[Hash],
        checkpoint: Option<String>,
        anchor: Option<&AnchorEvidence>,
        pending_message: &str,
    ) -> Result<Self, ProofError> {
        let leaf = merkle::leaf_hash(&reading.digest());
        let root = merkle::root_from_inclusion_proof(leaf_index, tree_size, &leaf, path)
            .map_err(|e| ProofError::Malformed(e.to_string()))?;
        let evidence = match evidence {
            Evidence::Single(s) => EvidenceJson::Signature { signature: s.to_hex() },
            Evidence::Batch(m) => EvidenceJson::Batch {
                first_seq: m.first_seq,
                count: m.count,
                index: m.index,
                path: m.proof.iter().map(|h| hx(h)).collect(),
                signature: m.signature.to_hex(),
            },
        };
        let anchor = match anchor {
            None => AnchorJson::Pending { message: pending_message.to_string() },
            Some(a) => AnchorJson::Confirmed {
                txid: a.tx.compute_txid().to_string(),
                tx: hex::encode(serialize(&a.tx)),
                block_hash: a.block_hash.to_string(),
                block_height: a.block_height,
                tx_index: a.tx_index,
                tx_path: a.tx_path.iter().map(|h| hx(h)).collect(),
            },
        };
        Ok(ProofBundle {
            version: 1,
            reading: hex::encode(reading.encode()),
            reading_id: hx(&reading.id()),
            device_key: key.to_string(),
            evidence,
            log: LogInclusion { leaf_index, tree_size, path: path.iter().map(|h| hx(h)).collect(), root: hx(&root) },
            checkpoint,
            anchor,
        })
    }

    pub fn is_pending(&self) -> bool {
        matches!(self.anchor, AnchorJson::Pending { .. })
    }

    pub fn reading_bytes(&self) -> Result<Vec<u8>, ProofError> {
        hex::decode(&self.reading).map_err(|_| ProofError::Malformed("reading is not hex".into()))
    }

    pub fn parsed_evidence(&self) -> Result<Evidence, ProofError> {
        let sig = |s: &str| Signature::from_hex(s).map_err(|e| ProofError::Malformed(format!("signature: {e}")));
        Ok(match &self.evidence {
            EvidenceJson::Signature { signature } => Evidence::Single(sig(signature)?),
            EvidenceJson::Batch { first_seq, count, index, path, signature } => Evidence::Batch(BatchMembership {
                first_seq: *first_seq,
                count: *count,
                index: *index,
                proof: path.iter().map(|h| unhex32(h, "batch path")).collect::<Result<_, _>>()?,
                signature: sig(signature)?,
            }),
        })
    }

    pub fn log_path(&self) -> Result<Vec<Hash>, ProofError> {
        self.log.path.iter().map(|h| unhex32(h, "log path")).collect()
    }

    /// The anchoring transaction and its block data, if confirmed.
    pub fn anchor_parts(&self) -> Result<Option<(Transaction, BlockHash, u32, u32, Vec<[u8; 32]>)>, ProofError> {
        match &self.anchor {
            AnchorJson::Pending { .. } => Ok(None),
            AnchorJson::Confirmed { tx, block_hash, block_height, tx_index, tx_path, .. } => {
                let tx: Transaction = deserialize_hex(tx).map_err(|e| ProofError::Malformed(format!("anchor tx: {e}")))?;
                let bh: BlockHash = block_hash.parse().map_err(|e| ProofError::Malformed(format!("block hash: {e}")))?;
                let path = tx_path.iter().map(|h| unhex32(h, "tx path")).collect::<Result<_, _>>()?;
                Ok(Some((tx, bh, *block_height, *tx_index, path)))
            }
        }
    }

    /// The same proof as an OpenTimestamps file over the reading's encoding.
    pub fn to_ots(&self) -> Result<DetachedTimestampFile, ProofError> {
        let Some((tx, _, height, tx_index, tx_path)) = self.anchor_parts()? else { return Err(ProofError::Pending) };
        let reading = self.reading_bytes()?;
        let digest: [u8; 32] = bitmote_device::sha256(&reading);
        let mut ops = vec![Op::Prepend(vec![0x00]), Op::Sha256];
        let path = self.log_path()?;
        let sides = merkle::inclusion_sides(self.log.leaf_index, self.log.tree_size, path.len())
            .map_err(|e| ProofError::Malformed(e.to_string()))?;
        for (sib, left) in path.iter().zip(sides) {
            if left {
                ops.push(Op::Prepend([&[0x01][..], sib].concat()));
            } else {
                ops.push(Op::Prepend(vec![0x01]));
                ops.push(Op::Append(sib.to_vec()));
            }
            ops.push(Op::Sha256);
        }
        // Root → txid: the root sits inside the transaction's non-witness serialization.
        let root = unhex32(&self.log.root, "log root")?;
        let (prefix, suffix) = split_tx_at_root(&tx, self.log.tree_size, &root)?;
        ops.extend([Op::Prepend(prefix), Op::Append(suffix), Op::Sha256, Op::Sha256]);
        // txid → block Merkle root.
        let mut i = tx_index;
        for sib in tx_path {
            ops.push(if i % 2 == 0 { Op::Append(sib.to_vec()) } else { Op::Prepend(sib.to_vec()) });
            ops.extend([Op::Sha256, Op::Sha256]);
            i /= 2;
        }
        Ok(DetachedTimestampFile {
            digest,
            timestamp: Timestamp::linear(ops, Attestation::Bitcoin { height: height as u64 }),
        })
    }
}

/// The transaction's txid-serialization around the committed root: (before, after).
pub fn split_tx_at_root(tx: &Transaction, tree_size: u64, root: &[u8; 32]) -> Result<(Vec<u8>, Vec<u8>), ProofError> {
    match find_anchor(tx) {
        Some((_, head)) if head.size == tree_size && head.root == *root => {}
        _ => return Err(ProofError::Malformed("the anchor transaction does not commit to this tree".into())),
    }
    let mut stripped = tx.clone();
    for i in &mut stripped.input {
        i.witness.clear();
    }
    let bytes = serialize(&stripped);
    let mut payload = Vec::with_capacity(ANCHOR_PAYLOAD_LEN);
    payload.extend_from_slice(ANCHOR_TAG);
    payload.extend_from_slice(&tree_size.to_be_bytes());
    payload.extend_from_slice(root);
    let pos = bytes
        .windows(ANCHOR_PAYLOAD_LEN)
        .position(|w| w == payload.as_slice())
        .ok_or_else(|| ProofError::Malformed("anchor payload not found in the transaction".into()))?;
    let at = pos + 12;
    Ok((bytes[..at].to_vec(), bytes[at + 32..].to_vec()))
}

/// Errors assembling a proof from the notary database.
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error("no reading with id {0}")]
    NotFound(String),
    #[error(transparent)]
    Ingest(#[from] crate::ingest::IngestError),
    #[error(transparent)]
    Log(#[from] crate::log::LogError),
    #[error(transparent)]
    Anchor(#[from] crate::anchor::AnchorError),
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error(transparent)]
    Proof(#[from] ProofError),
    #[error("fetching the anchor block: {0}")]
    Chain(#[from] bitmote_chain::ChainError),
}

/// Build the proof bundle of reading `id` from the database, fetching the anchor's
/// block from the node. Before an anchor confirms the bundle is pending and proves
/// inclusion in the current tree.
pub fn assemble(
    conn: &rusqlite::Connection,
    client: &bitmote_chain::ChainClient,
    id: &[u8; 32],
    signer: Option<&crate::checkpoint::CheckpointSigner>,
) -> Result<ProofBundle, AssembleError> {
    let stored = crate::ingest::reading_by_id(conn, id)?.ok_or_else(|| AssembleError::NotFound(hex::encode(id)))?;
    let device = crate::registry::get(conn, &stored.reading.device)?
        .ok_or(crate::registry::RegistryError::Unknown(stored.reading.device))?;
    let log = crate::log::MerkleLog::new(conn);
    let index = stored.leaf_index;
    let (size, anchor, message) = match crate::anchor::covering(conn, index)? {
        Some(a) => {
            let block = client.block(&a.block_hash)?;
            let ev = AnchorEvidence::from_block(&block, a.tx.compute_txid(), a.block_height)?;
            (a.tree_size, Some(ev), String::new())
        }
        None => {
            let size = log.size()?;
            let msg = match crate::anchor::pending_covering(conn, index)? {
                Some((_, s, txid)) => format!("anchor transaction {txid} (tree size {s}) is waiting for confirmation"),
                None => "this reading is not anchored yet; it will be in the next anchor".to_string(),
            };
            (size, None, msg)
        }
    };
    let path = log.inclusion_proof(index, size)?;
    let checkpoint = signer.map(|s| Ok::<_, AssembleError>(s.sign(size, log.root_at(size)?))).transpose()?;
    Ok(ProofBundle::build(&stored.reading, &device.pubkey, &stored.evidence, index, size, &path, checkpoint, anchor.as_ref(), &message)?)
}
