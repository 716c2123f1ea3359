//! The proof bundle of one reading: everything needed to check it against Bitcoin
//! block headers, with no trust in the gateway.
//!
//! reading → (device signature, or batch membership + batch signature) → log
//! inclusion proof → tree root (optionally in a signed checkpoint) → the anchoring
//! transaction's OP_RETURN output → the transaction's Merkle path → the block header
//! at a height. Before the anchor confirms, the bundle's anchor is `pending` and it
//! stops at the root of the tree of `log.tree_size` readings.
//!
//! The bundle is JSON (`version` 1). Hashes are hex. `txid` and `block_hash` are in
//! the usual display (reversed) order; `tx_path` siblings and log hashes are in
//! internal byte order. [`ProofBundle::to_ots`] turns a confirmed bundle into an
//! OpenTimestamps file over the reading file.

use bitcoin::consensus::encode::{deserialize_hex, serialize};
use bitcoin::hashes::{sha256d, Hash as _};
use bitcoin::{Block, BlockHash, Transaction, Txid};
use bitmote_device::merkle::{self, Hash, MerkleError};
use bitmote_device::{BatchMembership, Evidence, PublicKey, Reading, Signature};
use serde::{Deserialize, Serialize};

use crate::ots::{Attestation, DetachedTimestampFile, HashOp, Op, OtsError, Timestamp};
use crate::{ANCHOR_PAYLOAD_LEN, ANCHOR_TAG};

/// The bundle format version this code writes and reads.
pub const BUNDLE_VERSION: u32 = 1;

/// Errors building a bundle or an `.ots` from one.
#[derive(Debug, thiserror::Error)]
pub enum ProofError {
    #[error("the proof is pending: the anchor covering this reading has not confirmed yet")]
    Pending,
    #[error("malformed proof bundle: {0}")]
    Malformed(String),
    #[error("transaction {0} is not in the block")]
    TxNotInBlock(Txid),
    #[error("the log inclusion path does not fit leaf {index} of {size}: {source}")]
    Inclusion { index: u64, size: u64, source: MerkleError },
    #[error("the anchor transaction has no OP_RETURN committing to tree size {size} and root {root}")]
    NoCommitment { size: u64, root: String },
    #[error("the proof cannot be written as an OpenTimestamps file: {0}")]
    Ots(#[from] OtsError),
}

/// How the device authenticated the reading.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EvidenceJson {
    /// A signature over the reading id.
    Signature { signature: String },
    /// Membership in a signed batch: `path` is the RFC 9162 inclusion path of the
    /// reading's leaf at `index` in the batch of `count` readings from `first_seq`.
    Batch { first_seq: u64, count: u32, index: u32, path: Vec<String>, signature: String },
}

/// The reading's place in the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogInclusion {
    pub leaf_index: u64,
    pub tree_size: u64,
    /// RFC 9162 inclusion path, leaf to root.
    pub path: Vec<String>,
    /// The root the path leads to (what the anchor commits to).
    pub root: String,
}

/// The anchor of the tree, or why there is none yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum AnchorJson {
    /// Not anchored in a confirmed block yet: the bundle proves inclusion in the tree
    /// of `log.tree_size` leaves, and nothing about time; `message` says what the
    /// anchor is waiting for.
    Pending { message: String },
    Confirmed {
        txid: String,
        /// Raw transaction (hex, as on the wire).
        tx: String,
        /// Index of the OP_RETURN output carrying the commitment.
        vout: u32,
        block_hash: String,
        block_height: u32,
        /// Position of the transaction in the block.
        tx_index: u32,
        /// Bitcoin Merkle path of the txid, leaf to root.
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
    /// The transaction's Merkle path in `block` (Bitcoin's tree: a level with an odd
    /// number of hashes pairs its last hash with itself).
    pub fn from_block(block: &Block, txid: Txid, height: u32) -> Result<Self, ProofError> {
        let ids: Vec<[u8; 32]> = block.txdata.iter().map(|t| t.compute_txid().to_byte_array()).collect();
        let index = ids.iter().position(|t| *t == txid.to_byte_array()).ok_or(ProofError::TxNotInBlock(txid))?;
        let (mut level, mut i, mut path) = (ids, index, vec![]);
        while level.len() > 1 {
            if level.len() & 1 == 1 {
                let last = level[level.len() - 1];
                level.push(last);
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

/// The block Merkle root a txid (internal byte order) and its path lead to, or `None`
/// if `tx_index` does not fit the path's length.
pub fn tx_merkle_root(txid: [u8; 32], tx_index: u32, path: &[[u8; 32]]) -> Option<[u8; 32]> {
    let mut h = txid;
    let mut i = tx_index as u64;
    for sib in path {
        let cat = if i & 1 == 0 { [h, *sib].concat() } else { [*sib, h].concat() };
        h = sha256d::Hash::hash(&cat).to_byte_array();
        i /= 2;
    }
    (i == 0).then_some(h)
}

/// The OP_RETURN payload committing to a tree: tag, size (u64 BE), root.
pub fn anchor_payload(tree_size: u64, root: &[u8; 32]) -> [u8; ANCHOR_PAYLOAD_LEN] {
    let mut p = [0u8; ANCHOR_PAYLOAD_LEN];
    p[..4].copy_from_slice(ANCHOR_TAG);
    p[4..12].copy_from_slice(&tree_size.to_be_bytes());
    p[12..].copy_from_slice(root);
    p
}

/// The (tree size, root) committed by output `vout` of `tx`, if it is an anchor output
/// (`OP_RETURN OP_PUSHBYTES_44 <payload>`).
pub fn anchor_commitment(tx: &Transaction, vout: u32) -> Option<(u64, [u8; 32])> {
    let s = tx.output.get(vout as usize)?.script_pubkey.as_bytes();
    if s.len() != 2 + ANCHOR_PAYLOAD_LEN || s[0] != 0x6a || s[1] as usize != ANCHOR_PAYLOAD_LEN || s[2..6] != ANCHOR_TAG[..] {
        return None;
    }
    let size = u64::from_be_bytes(s[6..14].try_into().ok()?);
    let root: [u8; 32] = s[14..46].try_into().ok()?;
    Some((size, root))
}

/// The first output of `tx` committing to exactly (`tree_size`, `root`).
pub fn find_commitment(tx: &Transaction, tree_size: u64, root: &[u8; 32]) -> Option<u32> {
    (0..tx.output.len() as u32).find(|&v| anchor_commitment(tx, v) == Some((tree_size, *root)))
}

/// A confirmed anchor, parsed from a bundle.
#[derive(Clone, Debug)]
pub struct AnchorParts {
    pub tx: Transaction,
    /// The txid the bundle states.
    pub txid: Txid,
    pub vout: u32,
    pub block_hash: BlockHash,
    pub block_height: u32,
    pub tx_index: u32,
    pub tx_path: Vec<[u8; 32]>,
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
    hex::decode(s).ok().and_then(|v| v.try_into().ok()).ok_or_else(|| ProofError::Malformed(format!("{what} is not 32 bytes of hex")))
}

impl ProofBundle {
    /// Assemble a bundle from plain data. `path` is the log inclusion path of
    /// `leaf_index` in the tree of `tree_size`; `anchor`, when given, must be a
    /// transaction committing to that tree (else [`ProofError::NoCommitment`]);
    /// without it the bundle is pending and carries `pending_message`.
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
        let root = merkle::root_from_inclusion_proof(leaf_index, tree_size, &leaf, path).map_err(|source| ProofError::Inclusion {
            index: leaf_index,
            size: tree_size,
            source,
        })?;
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
                vout: find_commitment(&a.tx, tree_size, &root)
                    .ok_or_else(|| ProofError::NoCommitment { size: tree_size, root: hx(&root) })?,
                block_hash: a.block_hash.to_string(),
                block_height: a.block_height,
                tx_index: a.tx_index,
                tx_path: a.tx_path.iter().map(|h| hx(h)).collect(),
            },
        };
        Ok(ProofBundle {
            version: BUNDLE_VERSION,
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

    /// The reading file: the reading's canonical encoding.
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
    pub fn anchor_parts(&self) -> Result<Option<AnchorParts>, ProofError> {
        match &self.anchor {
            AnchorJson::Pending { .. } => Ok(None),
            AnchorJson::Confirmed { txid, tx, vout, block_hash, block_height, tx_index, tx_path } => {
                let tx: Transaction = deserialize_hex(tx).map_err(|e| ProofError::Malformed(format!("anchor tx: {e}")))?;
                let txid: Txid = txid.parse().map_err(|e| ProofError::Malformed(format!("txid: {e}")))?;
                let block_hash: BlockHash = block_hash.parse().map_err(|e| ProofError::Malformed(format!("block hash: {e}")))?;
                let tx_path = tx_path.iter().map(|h| unhex32(h, "tx path")).collect::<Result<_, _>>()?;
                Ok(Some(AnchorParts { tx, txid, vout: *vout, block_hash, block_height: *block_height, tx_index: *tx_index, tx_path }))
            }
        }
    }

    /// The same proof as an OpenTimestamps file over the reading file: SHA-256 of the
    /// file → leaf hash → RFC 9162 path → root → inside the anchor transaction → txid
    /// → Bitcoin Merkle path → a Bitcoin block-header attestation at the block height.
    pub fn to_ots(&self) -> Result<DetachedTimestampFile, ProofError> {
        let a = self.anchor_parts()?.ok_or(ProofError::Pending)?;
        let reading = self.reading_bytes()?;
        let digest = HashOp::Sha256.hash(&reading);
        let path = self.log_path()?;
        let (index, size) = (self.log.leaf_index, self.log.tree_size);
        let sides = merkle::inclusion_sides(index, size, path.len()).map_err(|source| ProofError::Inclusion { index, size, source })?;
        // Leaf hash: SHA-256(0x00 || digest).
        let mut ops = vec![Op::Prepend(vec![0x00]), Op::Sha256];
        // Interior nodes: SHA-256(0x01 || left || right), sides as RFC 9162 §2.1.3.2 decides.
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
        let (prefix, suffix) = split_tx_at_root(&a.tx, a.vout, size, &root)?;
        ops.push(Op::Prepend(prefix));
        if !suffix.is_empty() {
            ops.push(Op::Append(suffix));
        }
        ops.extend([Op::Sha256, Op::Sha256]);
        // txid → block Merkle root (internal byte order, double SHA-256 per level).
        let mut i = a.tx_index;
        for sib in a.tx_path {
            ops.push(if i & 1 == 0 { Op::Append(sib.to_vec()) } else { Op::Prepend(sib.to_vec()) });
            ops.extend([Op::Sha256, Op::Sha256]);
            i /= 2;
        }
        let t = Timestamp::linear(digest, ops, Attestation::Bitcoin { height: a.block_height as u64 })?;
        Ok(DetachedTimestampFile::new(HashOp::Sha256, t)?)
    }
}

/// The transaction's txid serialization (without witnesses) around the root committed
/// by output `vout`: (bytes before the root, bytes after it).
pub fn split_tx_at_root(tx: &Transaction, vout: u32, tree_size: u64, root: &[u8; 32]) -> Result<(Vec<u8>, Vec<u8>), ProofError> {
    if anchor_commitment(tx, vout) != Some((tree_size, *root)) {
        return Err(ProofError::NoCommitment { size: tree_size, root: hx(root) });
    }
    let mut stripped = tx.clone();
    for i in &mut stripped.input {
        i.witness.clear();
    }
    let bytes = serialize(&stripped);
    // The output's serialization ends with its script; outputs end before the 4-byte
    // lock time, so the script of `vout` ends where the following outputs begin.
    let after: usize = stripped.output[vout as usize + 1..].iter().map(|o| serialize(o).len()).sum::<usize>() + 4;
    let layout = || ProofError::Malformed("anchor payload not where expected in the transaction".into());
    let end = bytes.len().checked_sub(after).ok_or_else(layout)?;
    let start = end.checked_sub(ANCHOR_PAYLOAD_LEN).ok_or_else(layout)?;
    if bytes[start..end] != anchor_payload(tree_size, root)[..] {
        return Err(layout());
    }
    let at = start + 12;
    Ok((bytes[..at].to_vec(), bytes[end..].to_vec()))
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
    assemble_with(conn, &|h| client.block(h).map(std::sync::Arc::new), id, signer)
}

/// [`assemble`], with the anchor's block from `block` (a block never changes under its
/// hash, so a cache in front of the node is always right; the gateway keeps one, so that
/// anonymous proof requests cost the node one `getblock` per anchor, not one per request).
pub fn assemble_with(
    conn: &rusqlite::Connection,
    block: &dyn Fn(&bitcoin::BlockHash) -> Result<std::sync::Arc<Block>, bitmote_chain::ChainError>,
    id: &[u8; 32],
    signer: Option<&crate::checkpoint::CheckpointSigner>,
) -> Result<ProofBundle, AssembleError> {
    let stored = crate::ingest::reading_by_id(conn, id)?.ok_or_else(|| AssembleError::NotFound(hex::encode(id)))?;
    let device =
        crate::registry::get(conn, &stored.reading.device)?.ok_or(crate::registry::RegistryError::Unknown(stored.reading.device))?;
    let log = crate::log::MerkleLog::new(conn);
    let index = stored.leaf_index;
    let (size, anchor, message) = match crate::anchor::covering(conn, index)? {
        Some(a) => {
            let block = block(&a.block_hash)?;
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

/// Test data without a node: signed readings, their log, an anchor transaction and a
/// block containing it. Shared with the verifier's tests.
#[cfg(test)]
pub(crate) mod fixture {
    use super::*;
    use bitcoin::absolute::LockTime;
    use bitcoin::block::{Header, Version as BlockVersion};
    use bitcoin::script::PushBytesBuf;
    use bitcoin::transaction::Version;
    use bitcoin::{Amount, CompactTarget, OutPoint, ScriptBuf, Sequence, TxIn, TxMerkleNode, TxOut, Witness};
    use bitmote_device::reading::{sensor, unit};
    use bitmote_device::{SignedBatch, SignedReading, SigningKey, Value};

    pub struct Fixture {
        pub key: SigningKey,
        pub readings: Vec<Reading>,
        pub evidence: Vec<Evidence>,
        pub leaves: Vec<Hash>,
        pub block: Block,
        pub height: u32,
        pub txid: Txid,
    }

    pub fn reading(key: &SigningKey, seq: u64) -> Reading {
        Reading {
            device: key.public_key().device_id(),
            seq,
            timestamp_ms: 1_700_000_000_000 + seq * 1000,
            sensor: sensor::TEMPERATURE,
            unit: unit::CELSIUS,
            value: Value::Scaled { mantissa: 2000 + seq as i64, exponent: -2 },
        }
    }

    fn tx(inputs: Vec<TxIn>, output: Vec<TxOut>) -> Transaction {
        Transaction { version: Version::TWO, lock_time: LockTime::ZERO, input: inputs, output }
    }

    fn input(seed: u8) -> TxIn {
        TxIn {
            previous_output: OutPoint { txid: Txid::from_byte_array([seed; 32]), vout: seed as u32 },
            script_sig: ScriptBuf::new(),
            sequence: Sequence::MAX,
            witness: Witness::from_slice(&[vec![0x51]]),
        }
    }

    /// An anchor transaction: change output first, then the OP_RETURN (vout 1).
    pub fn anchor_tx(tree_size: u64, root: &Hash) -> Transaction {
        let payload = PushBytesBuf::try_from(anchor_payload(tree_size, root).to_vec()).expect("44 bytes");
        tx(
            vec![input(200)],
            vec![
                TxOut {
                    value: Amount::from_sat(49_000),
                    script_pubkey: ScriptBuf::from(vec![0x00, 0x20].into_iter().chain([7; 32]).collect::<Vec<u8>>()),
                },
                TxOut { value: Amount::ZERO, script_pubkey: ScriptBuf::new_op_return(payload) },
            ],
        )
    }

    /// A block at `height` with `n_tx` transactions, `anchor` at position `pos` (>= 1).
    pub fn block_with(anchor: Transaction, n_tx: usize, pos: usize, height: u32) -> Block {
        let coinbase = tx(
            vec![TxIn {
                previous_output: OutPoint::null(),
                script_sig: ScriptBuf::from(vec![0x03, height as u8, (height >> 8) as u8, 0]),
                sequence: Sequence::MAX,
                witness: Witness::new(),
            }],
            vec![TxOut { value: Amount::from_sat(5_000_000_000), script_pubkey: ScriptBuf::from(vec![0x51]) }],
        );
        let mut txdata = vec![coinbase];
        for i in 1..n_tx {
            if i == pos {
                txdata.push(anchor.clone());
            } else {
                txdata.push(tx(
                    vec![input(i as u8)],
                    vec![TxOut { value: Amount::from_sat(i as u64), script_pubkey: ScriptBuf::from(vec![0x51]) }],
                ));
            }
        }
        let header = Header {
            version: BlockVersion::TWO,
            prev_blockhash: BlockHash::all_zeros(),
            merkle_root: TxMerkleNode::all_zeros(),
            time: 1_700_000_123,
            bits: CompactTarget::from_consensus(0x207fffff),
            nonce: 0,
        };
        let mut block = Block { header, txdata };
        block.header.merkle_root = block.compute_merkle_root().expect("transactions");
        block
    }

    /// `n` readings of one device (the first half signed one by one, the rest as one
    /// batch), all in the log and anchored by one transaction in a block at height 150.
    pub fn fixture(n: usize, n_tx: usize, pos: usize) -> Fixture {
        let key = SigningKey::schnorr_from_secret(&[42; 32]).expect("key");
        let readings: Vec<Reading> = (1..=n as u64).map(|s| reading(&key, s)).collect();
        let single = n / 2;
        let mut evidence: Vec<Evidence> =
            readings[..single].iter().map(|r| Evidence::Single(SignedReading::sign(&key, r.clone()).expect("sign").signature)).collect();
        if n > single {
            let b = SignedBatch::sign(&key, readings[single..].to_vec()).expect("batch");
            evidence.extend((0..n - single).map(|i| Evidence::Batch(b.membership(i).expect("member"))));
        }
        let leaves: Vec<Hash> = readings.iter().map(|r| merkle::leaf_hash(&r.digest())).collect();
        let anchor = anchor_tx(n as u64, &merkle::root(&leaves));
        let txid = anchor.compute_txid();
        Fixture { key, readings, evidence, leaves, block: block_with(anchor, n_tx, pos, 150), height: 150, txid }
    }

    impl Fixture {
        pub fn bundle(&self, index: usize, anchored: bool) -> ProofBundle {
            let path = merkle::inclusion_proof(&self.leaves, index as u64).expect("index");
            let ev = anchored.then(|| AnchorEvidence::from_block(&self.block, self.txid, self.height).expect("in block"));
            ProofBundle::build(
                &self.readings[index],
                &self.key.public_key(),
                &self.evidence[index],
                index as u64,
                self.leaves.len() as u64,
                &path,
                None,
                ev.as_ref(),
                "waiting for the next anchor",
            )
            .expect("bundle")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixture::*;
    use super::*;

    #[test]
    fn tx_merkle_paths_lead_to_the_block_merkle_root() {
        let root = merkle::root(&[[1; 32]]);
        for n_tx in 2..=9 {
            for pos in 1..n_tx {
                let block = block_with(anchor_tx(1, &root), n_tx, pos, 7);
                let txid = block.txdata[pos].compute_txid();
                let ev = AnchorEvidence::from_block(&block, txid, 7).unwrap();
                assert_eq!(ev.tx_index as usize, pos);
                let want = block.header.merkle_root.to_byte_array();
                assert_eq!(tx_merkle_root(txid.to_byte_array(), ev.tx_index, &ev.tx_path), Some(want), "{n_tx} txs, at {pos}");
                // An index that does not fit the path is refused; a wrong one misses the root.
                assert_eq!(tx_merkle_root(txid.to_byte_array(), ev.tx_index + (1 << ev.tx_path.len()), &ev.tx_path), None);
                if ev.tx_path.iter().all(|s| *s != txid.to_byte_array()) {
                    assert_ne!(tx_merkle_root(txid.to_byte_array(), ev.tx_index ^ 1, &ev.tx_path), Some(want));
                }
            }
        }
        let block = block_with(anchor_tx(1, &root), 3, 1, 7);
        assert!(matches!(AnchorEvidence::from_block(&block, Txid::all_zeros(), 7), Err(ProofError::TxNotInBlock(_))));
    }

    #[test]
    fn ots_follows_rfc9162_sides_for_every_leaf_of_every_size() {
        for n in 1..=13 {
            let f = fixture(n, 4, 3);
            let merkle_root = f.block.header.merkle_root.to_byte_array();
            for i in 0..n {
                let b = f.bundle(i, true);
                let ots = b.to_ots().unwrap();
                assert_eq!(ots.digest(), f.readings[i].digest());
                let res = ots.timestamp.evaluate();
                assert_eq!(res.len(), 1);
                assert_eq!(res[0].0, &Attestation::Bitcoin { height: 150 });
                assert_eq!(res[0].1, merkle_root, "leaf {i} of {n}");
                // And the file survives serialization.
                let bytes = ots.serialize().unwrap();
                assert_eq!(DetachedTimestampFile::deserialize(&bytes).unwrap(), ots);
            }
        }
    }

    #[test]
    fn the_anchor_output_and_root_position_are_exact() {
        let f = fixture(5, 2, 1);
        let b = f.bundle(4, true);
        let AnchorJson::Confirmed { vout, .. } = &b.anchor else { panic!("confirmed") };
        assert_eq!(*vout, 1);
        let a = b.anchor_parts().unwrap().unwrap();
        assert_eq!(a.txid, f.txid);
        let root = unhex32(&b.log.root, "root").unwrap();
        let (pre, post) = split_tx_at_root(&a.tx, 1, 5, &root).unwrap();
        let mut stripped = a.tx.clone();
        stripped.input[0].witness.clear();
        assert_eq!([&pre[..], &root, &post].concat(), serialize(&stripped));
        assert_eq!(post.len(), 4, "the OP_RETURN is the last output: only the lock time follows");
        assert!(split_tx_at_root(&a.tx, 0, 5, &root).is_err());
        assert!(split_tx_at_root(&a.tx, 1, 6, &root).is_err());
        // A transaction that does not commit to this tree cannot anchor the bundle.
        let other = anchor_tx(5, &[9; 32]);
        let block = block_with(other.clone(), 2, 1, 150);
        let ev = AnchorEvidence::from_block(&block, other.compute_txid(), 150).unwrap();
        let path = merkle::inclusion_proof(&f.leaves, 0).unwrap();
        let r = ProofBundle::build(&f.readings[0], &f.key.public_key(), &f.evidence[0], 0, 5, &path, None, Some(&ev), "");
        assert!(matches!(r, Err(ProofError::NoCommitment { size: 5, .. })));
        // A path of the wrong length is refused when building.
        let r = ProofBundle::build(&f.readings[0], &f.key.public_key(), &f.evidence[0], 0, 5, &path[1..], None, None, "");
        assert!(matches!(r, Err(ProofError::Inclusion { .. })));
    }

    #[test]
    fn pending_bundles_say_so_and_have_no_ots() {
        let f = fixture(3, 2, 1);
        let b = f.bundle(2, false);
        assert!(b.is_pending());
        assert!(matches!(b.to_ots(), Err(ProofError::Pending)));
        let json: serde_json::Value = serde_json::to_value(&b).unwrap();
        assert_eq!(json["anchor"]["status"], "pending");
        assert_eq!(json["log"]["tree_size"], 3);
        assert_eq!(json["anchor"]["message"], "waiting for the next anchor");
    }

    #[test]
    fn json_roundtrip_keeps_everything() {
        let f = fixture(6, 3, 2);
        for i in [0, 5] {
            let b = f.bundle(i, true);
            let json = serde_json::to_string_pretty(&b).unwrap();
            let again: ProofBundle = serde_json::from_str(&json).unwrap();
            assert_eq!(again, b);
            assert_eq!(again.parsed_evidence().unwrap(), f.evidence[i]);
            assert_eq!(again.reading_bytes().unwrap(), f.readings[i].encode());
        }
    }

    #[test]
    fn the_python_reference_implementation_evaluates_our_ots_to_the_merkle_root() {
        let f = fixture(13, 5, 4);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.ots");
        std::fs::write(&p, f.bundle(11, true).to_ots().unwrap().serialize().unwrap()).unwrap();
        let script = "import sys\n\
            from opentimestamps.core.timestamp import DetachedTimestampFile\n\
            from opentimestamps.core.serialize import StreamDeserializationContext\n\
            f = DetachedTimestampFile.deserialize(StreamDeserializationContext(open(sys.argv[1], 'rb')))\n\
            for msg, a in f.timestamp.all_attestations(): print(msg.hex(), a.height)\n";
        let out = std::process::Command::new("python3").arg("-c").arg(script).arg(&p).output().expect("python3");
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("No module named 'opentimestamps'") {
            println!("NOTICE: skipping: python-opentimestamps is not installed (pip install opentimestamps-client)");
            return;
        }
        assert!(out.status.success(), "{stderr}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("{} 150", hex::encode(f.block.header.merkle_root.to_byte_array())));
    }
}
