//! The verifier: check a proof bundle or an `.ots` file against Bitcoin block headers,
//! and say exactly which step fails.
//!
//! It needs no bitmote gateway, only headers: from a node over RPC
//! ([`bitmote_chain::ChainClient`]) or from a headers file, so a proof can be checked
//! offline. A headers file has one block per line, `<height> <80-byte header in hex>`
//! (the hex of `getblockheader <hash> false`); blank lines and `#` comments are
//! ignored; only the heights a proof needs have to be present.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use bitcoin::block::Header;
use bitcoin::consensus::encode::{deserialize_hex, serialize_hex};
use bitcoin::hashes::Hash as _;
use bitmote_device::merkle;
use bitmote_device::{DeviceId, PublicKey, Reading};

use crate::checkpoint;
use crate::ots::{Attestation, DetachedTimestampFile};
use crate::proof::{anchor_commitment, tx_merkle_root, unhex32, AnchorJson, ProofBundle, BUNDLE_VERSION};

/// Why headers could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("reading headers file {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("headers file line {line}: {detail}")]
    Parse { line: usize, detail: String },
    #[error("asking the node: {0}")]
    Node(#[from] bitmote_chain::ChainError),
}

/// Where block headers come from.
pub trait HeaderSource {
    /// The active chain's header at `height`, `None` if there is none (above the tip,
    /// or not in the file).
    fn header_at(&self, height: u32) -> Result<Option<Header>, HeaderError>;
}

impl HeaderSource for bitmote_chain::ChainClient {
    fn header_at(&self, height: u32) -> Result<Option<Header>, HeaderError> {
        match self.block_hash(height)? {
            Some(h) => Ok(Some(self.header(&h)?)),
            None => Ok(None),
        }
    }
}

/// Headers read from a file: lines `<height> <header hex>`; `#` starts a comment.
#[derive(Debug, Default, Clone)]
pub struct HeadersFile(HashMap<u32, Header>);

impl HeadersFile {
    pub fn parse(text: &str) -> Result<Self, HeaderError> {
        let mut m = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let err = |detail: String| HeaderError::Parse { line: n + 1, detail };
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let (h, hex) = line.split_once(char::is_whitespace).ok_or_else(|| err("expected `<height> <header hex>`".into()))?;
            let height: u32 = h.parse().map_err(|_| err(format!("bad height {h:?}")))?;
            let hex = hex.trim();
            if hex.len() != 160 {
                return Err(err(format!("a header is 80 bytes (160 hex digits), got {} digits", hex.len())));
            }
            let header: Header = deserialize_hex(hex).map_err(|e| err(format!("bad header: {e}")))?;
            if m.insert(height, header).is_some_and(|old| old != header) {
                return Err(err(format!("two different headers for height {height}")));
            }
        }
        Ok(HeadersFile(m))
    }

    pub fn read(path: &Path) -> Result<Self, HeaderError> {
        let text = std::fs::read_to_string(path).map_err(|source| HeaderError::Io { path: path.display().to_string(), source })?;
        Self::parse(&text)
    }

    pub fn insert(&mut self, height: u32, header: Header) {
        self.0.insert(height, header);
    }

    /// One line of the file format.
    pub fn line(height: u32, header: &Header) -> String {
        format!("{height} {}\n", serialize_hex(header))
    }

    /// The whole file, sorted by height.
    pub fn to_text(&self) -> String {
        let mut hs: Vec<_> = self.0.iter().collect();
        hs.sort_by_key(|(h, _)| **h);
        hs.into_iter().map(|(h, hd)| Self::line(*h, hd)).collect()
    }
}

impl HeaderSource for HeadersFile {
    fn header_at(&self, height: u32) -> Result<Option<Header>, HeaderError> {
        Ok(self.0.get(&height).copied())
    }
}

/// The steps of verification, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// The bundle, reading and key parse, and the bundle is consistent.
    Decode,
    /// The reading is the one the caller holds.
    ReadingMatches,
    /// The device signed it (directly, or a batch it is a member of).
    DeviceSignature,
    /// The device key was not revoked.
    KeyNotRevoked,
    /// The log inclusion proof leads to the stated root.
    LogInclusion,
    /// The signed checkpoint (checked when a key is given) is valid and names this root.
    Checkpoint,
    /// The anchor has confirmed; failing here means the proof is pending.
    Anchored,
    /// The anchor transaction's OP_RETURN commits to this tree size and root.
    AnchorCommitsRoot,
    /// The transaction's Merkle path leads to the block header's Merkle root.
    TxInBlock,
    /// The block at that height on the chain is that block.
    BlockOnChain,
}

impl Step {
    /// Every step, in the order [`verify_bundle`] runs them (the bundle is decoded first,
    /// its anchor part just before the anchor steps).
    pub const ALL: [Step; 10] = [
        Step::Decode,
        Step::ReadingMatches,
        Step::DeviceSignature,
        Step::KeyNotRevoked,
        Step::LogInclusion,
        Step::Checkpoint,
        Step::Anchored,
        Step::AnchorCommitsRoot,
        Step::BlockOnChain,
        Step::TxInBlock,
    ];
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
            Step::Anchored => "the anchor's confirmation",
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

impl VerifyError {
    /// Whether the proof is merely pending (not anchored yet), rather than wrong.
    pub fn is_pending(&self) -> bool {
        self.step == Step::Anchored
    }
}

fn fail<T>(step: Step, detail: impl Into<String>) -> Result<T, VerifyError> {
    Err(VerifyError { step, detail: detail.into() })
}

/// What a successful verification established.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Verified {
    pub reading_id: String,
    pub device: String,
    pub leaf_index: u64,
    pub tree_size: u64,
    pub anchor_txid: String,
    pub block_height: u32,
    pub block_hash: String,
    /// Block timestamp: the reading existed no later than this (unix seconds).
    pub block_time: u32,
}

/// What the verifier is told besides the bundle.
#[derive(Default, Clone, Copy)]
pub struct Policy<'a> {
    /// The reading file the user holds; if given, it must be the bundle's reading.
    pub reading_file: Option<&'a [u8]>,
    /// Device ids known to be revoked.
    pub revoked: &'a [DeviceId],
    /// The gateway's checkpoint verifier key (`name+hash+base64`); if given, the bundle
    /// must carry a checkpoint signed by it for its tree.
    pub checkpoint_key: Option<&'a str>,
}

/// Verify a proof bundle step by step, stopping at the first failing step.
pub fn verify_bundle(b: &ProofBundle, headers: &dyn HeaderSource, policy: &Policy<'_>) -> Result<Verified, VerifyError> {
    if b.version != BUNDLE_VERSION {
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
        .or_else(|e| fail(Step::LogInclusion, format!("leaf {} of {}: {e}", b.log.leaf_index, b.log.tree_size)))?;

    if let Some(vkey) = policy.checkpoint_key {
        let Some(note) = &b.checkpoint else {
            return fail(Step::Checkpoint, "a checkpoint key was given but the bundle has no signed checkpoint");
        };
        let cp = checkpoint::verify_note(note, vkey).or_else(|e| fail(Step::Checkpoint, e.to_string()))?;
        if cp.size != b.log.tree_size || cp.root != root {
            return fail(
                Step::Checkpoint,
                format!("the checkpoint is for tree size {}, root {}, not this tree", cp.size, hex::encode(cp.root)),
            );
        }
    }

    let Some(a) = b.anchor_parts().or_else(|e| fail(Step::Decode, e.to_string()))? else {
        let message = match &b.anchor {
            AnchorJson::Pending { message, .. } if !message.is_empty() => format!(" ({message})"),
            _ => String::new(),
        };
        return fail(
            Step::Anchored,
            format!("pending: inclusion in the log of {} readings is proven, but no anchor has confirmed yet{message}", b.log.tree_size),
        );
    };
    let txid = a.tx.compute_txid();
    if txid != a.txid {
        return fail(Step::Decode, format!("the bundle names txid {} but the transaction is {txid}", a.txid));
    }
    match anchor_commitment(&a.tx, a.vout) {
        None => return fail(Step::AnchorCommitsRoot, format!("output {} of the transaction is not a bitmote anchor", a.vout)),
        Some((size, _)) if size != b.log.tree_size => {
            return fail(Step::AnchorCommitsRoot, format!("the transaction commits to tree size {size}, not {}", b.log.tree_size))
        }
        Some((_, r)) if r != root => {
            return fail(Step::AnchorCommitsRoot, format!("the transaction commits to root {}, not {}", hex::encode(r), b.log.root))
        }
        Some(_) => {}
    }

    let height = a.block_height;
    let header =
        headers.header_at(height).or_else(|e| fail(Step::BlockOnChain, format!("cannot get the header at height {height}: {e}")))?;
    let Some(header) = header else {
        return fail(Step::BlockOnChain, format!("no block at height {height} (on this chain or in the headers given)"));
    };
    if header.block_hash() != a.block_hash {
        return fail(
            Step::BlockOnChain,
            format!("the block at height {height} is {}, not {} (reorged out?)", header.block_hash(), a.block_hash),
        );
    }
    match tx_merkle_root(txid.to_byte_array(), a.tx_index, &a.tx_path) {
        None => {
            return fail(Step::TxInBlock, format!("transaction index {} does not fit a path of {} hashes", a.tx_index, a.tx_path.len()))
        }
        Some(r) if r != header.merkle_root.to_byte_array() => {
            return fail(Step::TxInBlock, "the transaction's Merkle path does not lead to the block's Merkle root")
        }
        Some(_) => {}
    }
    Ok(Verified {
        reading_id: hex::encode(reading.id()),
        device: key.device_id().to_string(),
        leaf_index: b.log.leaf_index,
        tree_size: b.log.tree_size,
        anchor_txid: txid.to_string(),
        block_height: height,
        block_hash: a.block_hash.to_string(),
        block_time: header.time,
    })
}

/// Verify an `.ots` file over `file`: some Bitcoin attestation in it must commit to the
/// Merkle root of the header at its height. Returns (height, block time) of the
/// earliest such attestation.
pub fn verify_ots(file: &[u8], ots: &DetachedTimestampFile, headers: &dyn HeaderSource) -> Result<(u32, u32), VerifyError> {
    if !ots.matches_file(file) {
        return fail(Step::ReadingMatches, "the file's hash differs from the digest in the .ots (tampered file?)");
    }
    let mut best: Option<(u32, u32)> = None;
    let mut last_err = None;
    let mut pending = vec![];
    for (att, msg) in ots.timestamp.evaluate() {
        let height = match att {
            Attestation::Bitcoin { height } => *height,
            Attestation::Pending { uri } => {
                pending.push(uri.as_str());
                continue;
            }
            Attestation::Unknown { .. } => continue,
        };
        let err = |step, detail: String| Some(VerifyError { step, detail });
        let Ok(height) = u32::try_from(height) else {
            last_err = err(Step::BlockOnChain, format!("no block at height {height}"));
            continue;
        };
        if msg.len() != 32 {
            last_err = err(Step::TxInBlock, format!("the attestation for block {height} is not on a 32-byte digest"));
            continue;
        }
        match headers.header_at(height) {
            Ok(Some(h)) if h.merkle_root.to_byte_array()[..] == *msg => {
                if best.is_none_or(|(b, _)| height < b) {
                    best = Some((height, h.time));
                }
            }
            Ok(Some(_)) => last_err = err(Step::TxInBlock, format!("the proof does not lead to the Merkle root of block {height}")),
            Ok(None) => last_err = err(Step::BlockOnChain, format!("no block at height {height} (on this chain or in the headers given)")),
            Err(e) => last_err = err(Step::BlockOnChain, format!("cannot get the header at height {height}: {e}")),
        }
    }
    if let Some(b) = best {
        return Ok(b);
    }
    match last_err {
        Some(e) => Err(e),
        None if !pending.is_empty() => fail(Step::Anchored, format!("pending: only calendar attestations ({})", pending.join(", "))),
        None => fail(Step::Anchored, "pending: the .ots has no Bitcoin attestation"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::CheckpointSigner;
    use crate::ots::{HashOp, Op, Timestamp};
    use crate::proof::fixture::{anchor_tx, block_with, fixture, Fixture};

    fn headers(f: &Fixture) -> HeadersFile {
        let mut h = HeadersFile::default();
        h.insert(f.height, f.block.header);
        h
    }

    fn step(b: &ProofBundle, h: &dyn HeaderSource, p: &Policy<'_>) -> Step {
        verify_bundle(b, h, p).unwrap_err().step
    }

    fn confirmed(b: &mut ProofBundle) -> (&mut String, &mut String, &mut u32, &mut String, &mut u32, &mut u32, &mut Vec<String>) {
        match &mut b.anchor {
            AnchorJson::Confirmed { txid, tx, vout, block_hash, block_height, tx_index, tx_path } => {
                (txid, tx, vout, block_hash, block_height, tx_index, tx_path)
            }
            AnchorJson::Pending { .. } => panic!("not confirmed"),
        }
    }

    #[test]
    fn a_good_bundle_verifies_single_and_batched() {
        let f = fixture(13, 6, 5);
        let h = headers(&f);
        for i in [0, 5, 6, 11, 12] {
            let b = f.bundle(i, true);
            let file = f.readings[i].encode();
            let v = verify_bundle(&b, &h, &Policy { reading_file: Some(&file), ..Default::default() }).unwrap();
            assert_eq!((v.leaf_index, v.tree_size, v.block_height, v.block_time), (i as u64, 13, 150, 1_700_000_123));
            assert_eq!(v.block_hash, f.block.block_hash().to_string());
            assert_eq!(v.anchor_txid, f.txid.to_string());
            assert_eq!(v.reading_id, hex::encode(f.readings[i].id()));
        }
        // The headers file format round-trips.
        let again = HeadersFile::parse(&format!("# test\n\n{}", h.to_text())).unwrap();
        verify_bundle(&f.bundle(3, true), &again, &Policy::default()).unwrap();
    }

    #[test]
    fn a_tampered_reading_fails() {
        let f = fixture(6, 3, 1);
        let h = headers(&f);
        for i in [1, 4] {
            // single, batched
            let b = f.bundle(i, true);
            let mut file = f.readings[i].encode();
            file[45] ^= 1; // a timestamp byte: still a well-formed reading
            let p = Policy { reading_file: Some(&file), ..Default::default() };
            assert_eq!(step(&b, &h, &p), Step::ReadingMatches);
            let mut t = b.clone();
            t.reading = hex::encode(&file);
            assert_eq!(step(&t, &h, &p), Step::DeviceSignature, "reading {i} altered inside the bundle");
            // A byte that breaks the encoding.
            t.reading = hex::encode(&file[..file.len() - 1]);
            assert_eq!(step(&t, &h, &Policy::default()), Step::Decode);
        }
    }

    #[test]
    fn a_tampered_log_path_fails() {
        let f = fixture(13, 3, 2);
        let h = headers(&f);
        let b = f.bundle(12, true);
        let mut t = b.clone();
        t.log.path[0] = hex::encode([0u8; 32]);
        assert_eq!(step(&t, &h, &Policy::default()), Step::LogInclusion);
        let mut t = b.clone();
        t.log.path.pop();
        assert_eq!(step(&t, &h, &Policy::default()), Step::LogInclusion);
        let mut t = b.clone();
        t.log.leaf_index = 11;
        assert_eq!(step(&t, &h, &Policy::default()), Step::LogInclusion);
        // A consistent path to another root is caught by the anchor's commitment.
        let mut t = f.bundle(2, true);
        let leaves = &f.leaves[..12];
        t.log.tree_size = 12;
        t.log.path = merkle::inclusion_proof(leaves, 2).unwrap().iter().map(hex::encode).collect();
        t.log.root = hex::encode(merkle::root(leaves));
        assert_eq!(step(&t, &h, &Policy::default()), Step::AnchorCommitsRoot);
    }

    #[test]
    fn a_wrong_block_fails() {
        let f = fixture(5, 4, 3);
        let h = headers(&f);
        let b = f.bundle(1, true);
        // The bundle names another block at the same height.
        let other = block_with(anchor_tx(5, &merkle::root(&f.leaves)), 5, 2, 150);
        let mut t = b.clone();
        *confirmed(&mut t).3 = other.block_hash().to_string();
        assert_eq!(step(&t, &h, &Policy::default()), Step::BlockOnChain);
        // The chain (headers) has another block at that height.
        let mut h2 = HeadersFile::default();
        h2.insert(150, other.header);
        assert_eq!(step(&b, &h2, &Policy::default()), Step::BlockOnChain);
        // No block at the claimed height.
        let mut t = b.clone();
        *confirmed(&mut t).4 = 151;
        assert_eq!(step(&t, &h, &Policy::default()), Step::BlockOnChain);
        // The transaction is not in the block: tampered Merkle path or index.
        let mut t = b.clone();
        confirmed(&mut t).6[0] = hex::encode([5u8; 32]);
        assert_eq!(step(&t, &h, &Policy::default()), Step::TxInBlock);
        let mut t = b.clone();
        *confirmed(&mut t).5 ^= 1;
        assert_eq!(step(&t, &h, &Policy::default()), Step::TxInBlock);
        let mut t = b.clone();
        *confirmed(&mut t).5 += 4;
        assert_eq!(step(&t, &h, &Policy::default()), Step::TxInBlock);
        // Another transaction, or another output of it.
        let mut t = b.clone();
        *confirmed(&mut t).2 = 0;
        assert_eq!(step(&t, &h, &Policy::default()), Step::AnchorCommitsRoot);
        let mut t = b.clone();
        let forged = anchor_tx(5, &[3; 32]);
        *confirmed(&mut t).1 = bitcoin::consensus::encode::serialize_hex(&forged);
        assert_eq!(step(&t, &h, &Policy::default()), Step::Decode, "txid no longer matches");
        *confirmed(&mut t).0 = forged.compute_txid().to_string();
        assert_eq!(step(&t, &h, &Policy::default()), Step::AnchorCommitsRoot);
    }

    #[test]
    fn a_revoked_key_fails() {
        let f = fixture(4, 2, 1);
        let revoked = [f.key.public_key().device_id()];
        let b = f.bundle(0, true);
        let e = verify_bundle(&b, &headers(&f), &Policy { revoked: &revoked, ..Default::default() }).unwrap_err();
        assert_eq!(e.step, Step::KeyNotRevoked);
        assert!(e.to_string().contains("revoked"), "{e}");
        let other = [DeviceId([1; 32])];
        verify_bundle(&b, &headers(&f), &Policy { revoked: &other, ..Default::default() }).unwrap();
    }

    #[test]
    fn a_pending_bundle_says_pending() {
        let f = fixture(4, 2, 1);
        let b = f.bundle(3, false);
        let e = verify_bundle(&b, &HeadersFile::default(), &Policy::default()).unwrap_err();
        assert_eq!(e.step, Step::Anchored);
        assert!(e.is_pending());
        assert!(e.detail.starts_with("pending") && e.detail.contains("waiting for the next anchor"), "{e}");
        // A pending bundle is still checked up to the root.
        let mut t = b.clone();
        t.log.root = hex::encode([0u8; 32]);
        assert_eq!(step(&t, &HeadersFile::default(), &Policy::default()), Step::LogInclusion);
    }

    #[test]
    fn checkpoints_are_checked_when_a_key_is_given() {
        let f = fixture(7, 2, 1);
        let h = headers(&f);
        let signer = CheckpointSigner::from_seed("bitmote.test/log", [3; 32]);
        let key = signer.verifier_key();
        let p = Policy { checkpoint_key: Some(&key), ..Default::default() };
        let mut b = f.bundle(6, true);
        assert_eq!(step(&b, &h, &p), Step::Checkpoint, "no checkpoint in the bundle");
        b.checkpoint = Some(signer.sign(7, merkle::root(&f.leaves)));
        verify_bundle(&b, &h, &p).unwrap();
        let other = CheckpointSigner::from_seed("bitmote.test/log", [4; 32]).verifier_key();
        assert_eq!(step(&b, &h, &Policy { checkpoint_key: Some(&other), ..Default::default() }), Step::Checkpoint);
        b.checkpoint = Some(signer.sign(6, merkle::root(&f.leaves[..6])));
        assert_eq!(step(&b, &h, &p), Step::Checkpoint, "checkpoint of another tree");
        verify_bundle(&b, &h, &Policy::default()).unwrap();
    }

    #[test]
    fn malformed_bundles_fail_at_decode() {
        let f = fixture(2, 2, 1);
        let h = headers(&f);
        let b = f.bundle(1, true);
        let mut t = b.clone();
        t.version = 2;
        assert_eq!(step(&t, &h, &Policy::default()), Step::Decode);
        let mut t = b.clone();
        t.device_key = "zz".into();
        assert_eq!(step(&t, &h, &Policy::default()), Step::Decode);
        let mut t = b.clone();
        *confirmed(&mut t).1 = "00".into();
        assert_eq!(step(&t, &h, &Policy::default()), Step::Decode);
        let mut t = b.clone();
        t.log.root = "abc".into();
        assert_eq!(step(&t, &h, &Policy::default()), Step::Decode);
    }

    #[test]
    fn ots_files_verify_and_fail_like_bundles() {
        let f = fixture(13, 4, 2);
        let h = headers(&f);
        for i in [0, 7, 12] {
            let file = f.readings[i].encode();
            let ots = f.bundle(i, true).to_ots().unwrap();
            let ots = DetachedTimestampFile::deserialize(&ots.serialize().unwrap()).unwrap();
            assert_eq!(verify_ots(&file, &ots, &h).unwrap(), (150, 1_700_000_123));
            let mut t = file.clone();
            t[50] ^= 0x80;
            assert_eq!(verify_ots(&t, &ots, &h).unwrap_err().step, Step::ReadingMatches);
            assert_eq!(verify_ots(&file, &ots, &HeadersFile::default()).unwrap_err().step, Step::BlockOnChain);
            let mut wrong = HeadersFile::default();
            wrong.insert(150, block_with(anchor_tx(1, &[0; 32]), 2, 1, 150).header);
            assert_eq!(verify_ots(&file, &ots, &wrong).unwrap_err().step, Step::TxInBlock);
        }
        // Only a calendar's promise: pending.
        let file = b"hello".to_vec();
        let t = Timestamp::linear(
            HashOp::Sha256.hash(&file),
            vec![Op::Append(vec![1])],
            Attestation::pending("https://a.pool.opentimestamps.org").unwrap(),
        )
        .unwrap();
        let ots = DetachedTimestampFile::new(HashOp::Sha256, t).unwrap();
        let e = verify_ots(&file, &ots, &h).unwrap_err();
        assert_eq!(e.step, Step::Anchored);
        assert!(e.detail.contains("a.pool.opentimestamps.org"), "{e}");
    }

    #[test]
    fn bad_headers_files_are_errors() {
        assert!(matches!(HeadersFile::parse("150"), Err(HeaderError::Parse { line: 1, .. })));
        assert!(matches!(HeadersFile::parse("x 00"), Err(HeaderError::Parse { .. })));
        assert!(matches!(HeadersFile::parse(&format!("1 {}", "00".repeat(79))), Err(HeaderError::Parse { .. })));
        assert!(matches!(HeadersFile::parse(&format!("\n1 {}", "zz".repeat(80))), Err(HeaderError::Parse { line: 2, .. })));
        let f = fixture(2, 2, 1);
        let other = block_with(anchor_tx(1, &[0; 32]), 2, 1, 150).header;
        let text = format!("{}{}", HeadersFile::line(150, &f.block.header), HeadersFile::line(150, &other));
        assert!(matches!(HeadersFile::parse(&text), Err(HeaderError::Parse { line: 2, .. })));
        assert!(matches!(HeadersFile::read(Path::new("/nonexistent/headers")), Err(HeaderError::Io { .. })));
    }
}
