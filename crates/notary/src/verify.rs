//! The verifier: check a proof bundle or an `.ots` file against Bitcoin block headers,
//! and say exactly which step fails.
//!
//! It needs no bitmote gateway, only headers: from a node over RPC
//! ([`bitmote_chain::ChainClient`]) or from a headers file (one line per block,
//! `<height> <80-byte header in hex>`), so a proof can be checked offline.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use bitcoin::block::Header;
use bitcoin::consensus::encode::deserialize_hex;
use bitcoin::hashes::{sha256d, Hash as _};
use bitmote_device::merkle;
use bitmote_device::{DeviceId, PublicKey, Reading};

use crate::anchor::find_anchor;
use crate::checkpoint;
use crate::ots::{Attestation, DetachedTimestampFile};
use crate::proof::{unhex32, ProofBundle};

/// Where block headers come from.
pub trait HeaderSource {
    /// The active chain's header at `height`, `None` above the tip.
    fn header_at(&self, height: u32) -> Result<Option<Header>, String>;
}

impl HeaderSource for bitmote_chain::ChainClient {
    fn header_at(&self, height: u32) -> Result<Option<Header>, String> {
        match self.block_hash(height).map_err(|e| e.to_string())? {
            Some(h) => self.header(&h).map(Some).map_err(|e| e.to_string()),
            None => Ok(None),
        }
    }
}

/// Headers read from a file: lines `<height> <header hex>`; `#` starts a comment.
#[derive(Debug, Default)]
pub struct HeadersFile(HashMap<u32, Header>);

impl HeadersFile {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut m = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let (h, hex) = line.split_once(char::is_whitespace).ok_or_else(|| format!("line {}: expected `<height> <header hex>`", n + 1))?;
            let height: u32 = h.parse().map_err(|_| format!("line {}: bad height {h:?}", n + 1))?;
            let header: Header = deserialize_hex(hex.trim()).map_err(|e| format!("line {}: bad header: {e}", n + 1))?;
            m.insert(height, header);
        }
        Ok(HeadersFile(m))
    }

    pub fn read(path: &Path) -> Result<Self, String> {
        Self::parse(&std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?)
    }

    pub fn insert(&mut self, height: u32, header: Header) {
        self.0.insert(height, header);
    }
}

impl HeaderSource for HeadersFile {
    fn header_at(&self, height: u32) -> Result<Option<Header>, String> {
        Ok(self.0.get(&height).copied())
    }
}

/// The steps of verification, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// The bundle, reading and key parse.
    Decode,
    /// The reading is the one the caller holds.
    ReadingMatches,
    /// The device signed it (directly or through a signed batch).
    DeviceSignature,
    /// The device key was not revoked.
    KeyNotRevoked,
    /// The log inclusion proof leads to the stated root.
    LogInclusion,
    /// The signed checkpoint (when present and a key is given) is valid and names this root.
    Checkpoint,
    /// The anchor has confirmed (else the proof is pending).
    Anchored,
    /// The anchor transaction's OP_RETURN commits to this tree size and root.
    AnchorCommitsRoot,
    /// The transaction's Merkle path leads to the block header's Merkle root.
    TxInBlock,
    /// The block at that height on the chain is that block.
    BlockOnChain,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Step::Decode => "decoding the proof",
            Step::ReadingMatches => "matching the reading",
            Step::DeviceSignature => "the device signature",
            Step::KeyNotRevoked => "the device key's status",
            Step::LogInclusion => "the log inclusion proof",
            Step::Checkpoint => "the signed checkpoint",
            Step::Anchored => "the anchor",
            Step::AnchorCommitsRoot => "the anchor transaction's commitment",
            Step::TxInBlock => "the transaction's Merkle path",
            Step::BlockOnChain => "the block on the chain",
        };
        f.write_str(s)
    }
}

/// A failed verification: the step and what was wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("verification failed at {step}: {detail}")]
pub struct VerifyError {
    pub step: Step,
    pub detail: String,
}

fn fail<T>(step: Step, detail: impl Into<String>) -> Result<T, VerifyError> {
    Err(VerifyError { step, detail: detail.into() })
}

/// What a successful verification established.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Verified {
    pub reading_id: String,
    pub device: String,
    pub leaf_index: u64,
    pub tree_size: u64,
    pub block_height: u32,
    pub block_hash: String,
    /// Block timestamp: the reading existed no later than this (unix seconds).
    pub block_time: u32,
}

/// What the verifier is told besides the bundle.
#[derive(Default)]
pub struct Policy<'a> {
    /// The reading file the user holds; if given, it must be the bundle's reading.
    pub reading_file: Option<&'a [u8]>,
    /// Device ids known to be revoked.
    pub revoked: &'a [DeviceId],
    /// The gateway's checkpoint verifier key (`name+hash+base64`), to check the checkpoint.
    pub checkpoint_key: Option<&'a str>,
}

/// Verify a proof bundle step by step.
pub fn verify_bundle(b: &ProofBundle, headers: &dyn HeaderSource, policy: &Policy<'_>) -> Result<Verified, VerifyError> {
    if b.version != 1 {
        return fail(Step::Decode, format!("unknown bundle version {}", b.version));
    }
    let bytes = b.reading_bytes().or_else(|e| fail(Step::Decode, e.to_string()))?;
    if let Some(f) = policy.reading_file {
        if f != bytes.as_slice() {
            return fail(Step::ReadingMatches, "the reading file differs from the reading in the proof (tampered reading?)");
        }
    }
    let reading = Reading::decode(&bytes).or_else(|e| fail(Step::Decode, format!("reading: {e}")))?;
    let key: PublicKey = b.device_key.parse().or_else(|e| fail(Step::Decode, format!("device key: {e}")))?;
    let evidence = b.parsed_evidence().or_else(|e| fail(Step::Decode, e.to_string()))?;
    evidence.verify(&key, &reading).or_else(|e| fail(Step::DeviceSignature, e.to_string()))?;
    if policy.revoked.contains(&key.device_id()) {
        return fail(Step::KeyNotRevoked, format!("device {} is revoked", key.device_id()));
    }
    let path = b.log_path().or_else(|e| fail(Step::Decode, e.to_string()))?;
    let root = unhex32(&b.log.root, "log root").or_else(|e| fail(Step::Decode, e.to_string()))?;
    let leaf = merkle::leaf_hash(&reading.digest());
    merkle::verify_inclusion(b.log.leaf_index, b.log.tree_size, &leaf, &path, &root)
        .or_else(|e| fail(Step::LogInclusion, e.to_string()))?;
    if let (Some(note), Some(vkey)) = (&b.checkpoint, policy.checkpoint_key) {
        let cp = checkpoint::verify_note(note, vkey).or_else(|e| fail(Step::Checkpoint, e.to_string()))?;
        if cp.size != b.log.tree_size || cp.root != root {
            return fail(Step::Checkpoint, "the checkpoint is for another tree");
        }
    }
    let Some((tx, block_hash, height, tx_index, tx_path)) = b.anchor_parts().or_else(|e| fail(Step::Decode, e.to_string()))? else {
        return fail(Step::Anchored, "pending: the anchor covering this reading has not confirmed yet");
    };
    match find_anchor(&tx) {
        Some((_, head)) if head.size == b.log.tree_size && head.root == root => {}
        Some((_, head)) => {
            return fail(
                Step::AnchorCommitsRoot,
                format!("the transaction commits to tree size {} root {}, not this tree", head.size, hex::encode(head.root)),
            )
        }
        None => return fail(Step::AnchorCommitsRoot, "the transaction has no bitmote anchor output"),
    }
    let mut h = tx.compute_txid().to_byte_array();
    let mut i = tx_index;
    for sib in &tx_path {
        let cat = if i % 2 == 0 { [h, *sib].concat() } else { [*sib, h].concat() };
        h = sha256d::Hash::hash(&cat).to_byte_array();
        i /= 2;
    }
    let header = headers
        .header_at(height)
        .or_else(|e| fail(Step::BlockOnChain, format!("cannot get the header at height {height}: {e}")))?;
    let Some(header) = header else {
        return fail(Step::BlockOnChain, format!("no block at height {height} on this chain"));
    };
    if header.block_hash() != block_hash {
        return fail(Step::BlockOnChain, format!("the block at height {height} is {}, not {block_hash}", header.block_hash()));
    }
    if header.merkle_root.to_byte_array() != h {
        return fail(Step::TxInBlock, "the transaction's Merkle path does not lead to the block's Merkle root");
    }
    Ok(Verified {
        reading_id: hex::encode(reading.id()),
        device: key.device_id().to_string(),
        leaf_index: b.log.leaf_index,
        tree_size: b.log.tree_size,
        block_height: height,
        block_hash: block_hash.to_string(),
        block_time: header.time,
    })
}

/// Verify an `.ots` file over `file`: some Bitcoin attestation must match a block header.
/// Returns (height, block time) of the earliest matching attestation.
pub fn verify_ots(file: &[u8], ots: &DetachedTimestampFile, headers: &dyn HeaderSource) -> Result<(u32, u32), VerifyError> {
    if bitmote_device::sha256(file) != ots.digest {
        return fail(Step::ReadingMatches, "the file's SHA-256 differs from the digest in the .ots (tampered file?)");
    }
    let results = ots.timestamp.evaluate(&ots.digest).or_else(|e| fail(Step::Decode, e.to_string()))?;
    let mut best: Option<(u32, u32)> = None;
    let mut last_err = VerifyError { step: Step::Anchored, detail: "no Bitcoin attestation (pending?)".into() };
    for (att, msg) in results {
        let Attestation::Bitcoin { height } = att else { continue };
        let Ok(height) = u32::try_from(height) else { continue };
        match headers.header_at(height) {
            Ok(Some(h)) if h.merkle_root.to_byte_array().as_slice() == msg.as_slice() => {
                if best.is_none_or(|(b, _)| height < b) {
                    best = Some((height, h.time));
                }
            }
            Ok(Some(_)) => {
                last_err = VerifyError { step: Step::TxInBlock, detail: format!("the proof does not lead to the Merkle root of block {height}") }
            }
            Ok(None) => last_err = VerifyError { step: Step::BlockOnChain, detail: format!("no block at height {height}") },
            Err(e) => last_err = VerifyError { step: Step::BlockOnChain, detail: e },
        }
    }
    best.ok_or(last_err)
}
