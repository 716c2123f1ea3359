//! OpenTimestamps `.ots` files, byte for byte as the OpenTimestamps project defines
//! them (python-opentimestamps `core/timestamp.py`, `op.py`, `notary.py`,
//! `serialize.py`), so the standard `ots` client verifies a bitmote proof with no
//! bitmote code involved.
//!
//! A file is the magic header, major version 1, the file hash op and the file digest,
//! then a timestamp tree: each node holds a message, the attestations of that message
//! and the operations (hashes, append, prepend, …) leading to child nodes. Items of a
//! node are written sorted (attestations, then operations, as the Python library
//! does); all but the last are preceded by the `0xff` fork marker. bitmote writes one
//! linear path ending in a Bitcoin block-header attestation; it reads any tree (forks,
//! pending and unknown attestations) with the Python library's limits: 4096-byte
//! messages and results, 8192-byte attestation payloads, 1000-byte calendar URIs,
//! nesting depth 256. Bad input is an [`OtsError`], never a panic.

use std::cmp::Ordering;

use bitcoin::hashes::{ripemd160, sha1, sha256, Hash as _};

/// Header magic of a detached timestamp file.
pub const MAGIC: &[u8] = b"\x00OpenTimestamps\x00\x00Proof\x00\xbf\x89\xe2\xe8\x84\xe8\x92\x94";
/// The only major version of the format.
pub const MAJOR_VERSION: u64 = 1;
/// Longest message an operation accepts, and longest result it may produce.
pub const MAX_MSG_LENGTH: usize = 4096;
/// Longest attestation payload.
pub const MAX_PAYLOAD_SIZE: usize = 8192;
/// Longest calendar URI of a pending attestation.
pub const MAX_URI_LENGTH: usize = 1000;
/// Deepest nesting of timestamp nodes read from a file.
pub const RECURSION_LIMIT: usize = 256;
/// Characters a pending attestation's URI may use.
pub const ALLOWED_URI_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._/:";

/// Tag of a Bitcoin block-header attestation.
pub const TAG_BITCOIN: [u8; 8] = [0x05, 0x88, 0x96, 0x0d, 0x73, 0xd7, 0x19, 0x01];
/// Tag of a pending (calendar) attestation.
pub const TAG_PENDING: [u8; 8] = [0x83, 0xdf, 0xe3, 0x0d, 0x2e, 0xf9, 0x0c, 0x8e];

/// Errors reading, building or writing an `.ots` file.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum OtsError {
    #[error("not an OpenTimestamps proof (bad magic)")]
    BadMagic,
    #[error("unsupported OpenTimestamps major version {0}")]
    UnsupportedVersion(u64),
    #[error("{0:#04x} is not a file hash operation")]
    NotAHashOp(u8),
    #[error("file digest is {got} bytes, the file hash op gives {expected}")]
    DigestLength { expected: usize, got: usize },
    #[error("truncated OpenTimestamps proof")]
    Truncated,
    #[error("trailing bytes after the OpenTimestamps data")]
    TrailingGarbage,
    #[error("unknown operation tag {0:#04x}")]
    UnknownOp(u8),
    #[error("variable-length integer does not fit in 64 bits")]
    VarintOverflow,
    #[error("{what} is {len} bytes, more than the limit of {max}")]
    TooLong { what: &'static str, len: usize, max: usize },
    #[error("{0} argument is empty")]
    EmptyArgument(&'static str),
    #[error("cannot apply {op} to this message: {reason}")]
    InvalidMessage { op: &'static str, reason: &'static str },
    #[error("timestamp nested deeper than {RECURSION_LIMIT} levels")]
    RecursionLimit,
    #[error("an empty timestamp (no operation, no attestation) cannot be serialized")]
    EmptyTimestamp,
    #[error("invalid calendar URI: {0}")]
    BadUri(String),
}

fn too_long(what: &'static str, len: usize, max: usize) -> OtsError {
    OtsError::TooLong { what, len, max }
}

fn keccak256(msg: &[u8]) -> [u8; 32] {
    use tiny_keccak::Hasher as _;
    let mut k = tiny_keccak::Keccak::v256();
    k.update(msg);
    let mut out = [0u8; 32];
    k.finalize(&mut out);
    out
}

/// A hash operation that can hash the timestamped file itself (python `CryptOp`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HashOp {
    Sha1,
    Ripemd160,
    Sha256,
    Keccak256,
}

impl HashOp {
    pub fn tag(self) -> u8 {
        self.op().tag()
    }

    pub fn from_tag(tag: u8) -> Option<Self> {
        Some(match tag {
            0x02 => HashOp::Sha1,
            0x03 => HashOp::Ripemd160,
            0x08 => HashOp::Sha256,
            0x67 => HashOp::Keccak256,
            _ => return None,
        })
    }

    /// Length of the digest.
    pub fn digest_len(self) -> usize {
        match self {
            HashOp::Sha1 | HashOp::Ripemd160 => 20,
            HashOp::Sha256 | HashOp::Keccak256 => 32,
        }
    }

    /// Hash data of any length (files are not subject to the message length limit).
    pub fn hash(self, data: &[u8]) -> Vec<u8> {
        match self {
            HashOp::Sha1 => sha1::Hash::hash(data).to_byte_array().to_vec(),
            HashOp::Ripemd160 => ripemd160::Hash::hash(data).to_byte_array().to_vec(),
            HashOp::Sha256 => sha256::Hash::hash(data).to_byte_array().to_vec(),
            HashOp::Keccak256 => keccak256(data).to_vec(),
        }
    }

    /// The same hash as a timestamp operation.
    pub fn op(self) -> Op {
        match self {
            HashOp::Sha1 => Op::Sha1,
            HashOp::Ripemd160 => Op::Ripemd160,
            HashOp::Sha256 => Op::Sha256,
            HashOp::Keccak256 => Op::Keccak256,
        }
    }
}

/// A timestamp operation: an edge of the timestamp tree.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Sha1,
    Ripemd160,
    Sha256,
    Keccak256,
    /// Append bytes (1..=4096 of them) to the message.
    Append(Vec<u8>),
    /// Prepend bytes (1..=4096 of them) to the message.
    Prepend(Vec<u8>),
    Reverse,
    /// Lower-case hexadecimal of the message.
    Hexlify,
}

impl Op {
    /// The one-byte tag of the operation.
    pub fn tag(&self) -> u8 {
        match self {
            Op::Sha1 => 0x02,
            Op::Ripemd160 => 0x03,
            Op::Sha256 => 0x08,
            Op::Keccak256 => 0x67,
            Op::Append(_) => 0xf0,
            Op::Prepend(_) => 0xf1,
            Op::Reverse => 0xf2,
            Op::Hexlify => 0xf3,
        }
    }

    /// The operation's name as the `ots` client prints it.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Sha1 => "sha1",
            Op::Ripemd160 => "ripemd160",
            Op::Sha256 => "sha256",
            Op::Keccak256 => "keccak256",
            Op::Append(_) => "append",
            Op::Prepend(_) => "prepend",
            Op::Reverse => "reverse",
            Op::Hexlify => "hexlify",
        }
    }

    fn arg(&self) -> &[u8] {
        match self {
            Op::Append(a) | Op::Prepend(a) => a,
            _ => &[],
        }
    }

    /// Check an append/prepend argument against the format's limits.
    fn check(&self) -> Result<(), OtsError> {
        if let Op::Append(a) | Op::Prepend(a) = self {
            if a.is_empty() {
                return Err(OtsError::EmptyArgument(self.name()));
            }
            if a.len() > MAX_MSG_LENGTH {
                return Err(too_long("operation argument", a.len(), MAX_MSG_LENGTH));
            }
        }
        Ok(())
    }

    /// Apply the operation to `msg`, with the Python library's limits: the message
    /// at most 4096 bytes (2048 for hexlify), not empty for reverse and hexlify, the
    /// result at most 4096 bytes.
    pub fn apply(&self, msg: &[u8]) -> Result<Vec<u8>, OtsError> {
        self.check()?;
        let max_msg = if *self == Op::Hexlify { MAX_MSG_LENGTH / 2 } else { MAX_MSG_LENGTH };
        if msg.len() > max_msg {
            return Err(too_long("message", msg.len(), max_msg));
        }
        let out = match self {
            Op::Sha1 | Op::Ripemd160 | Op::Sha256 | Op::Keccak256 => {
                let h = match self {
                    Op::Sha1 => HashOp::Sha1,
                    Op::Ripemd160 => HashOp::Ripemd160,
                    Op::Sha256 => HashOp::Sha256,
                    _ => HashOp::Keccak256,
                };
                h.hash(msg)
            }
            Op::Append(a) => [msg, a].concat(),
            Op::Prepend(p) => [&p[..], msg].concat(),
            Op::Reverse | Op::Hexlify if msg.is_empty() => {
                return Err(OtsError::InvalidMessage { op: self.name(), reason: "the message is empty" })
            }
            Op::Reverse => msg.iter().rev().copied().collect(),
            Op::Hexlify => hex::encode(msg).into_bytes(),
        };
        if out.len() > MAX_MSG_LENGTH {
            return Err(too_long("operation result", out.len(), MAX_MSG_LENGTH));
        }
        Ok(out)
    }

    fn write(&self, w: &mut Vec<u8>) {
        w.push(self.tag());
        if let Op::Append(b) | Op::Prepend(b) = self {
            write_varbytes(w, b);
        }
    }

    fn read(tag: u8, r: &mut Reader<'_>) -> Result<Self, OtsError> {
        let op = match tag {
            0x02 => Op::Sha1,
            0x03 => Op::Ripemd160,
            0x08 => Op::Sha256,
            0x67 => Op::Keccak256,
            0xf0 => Op::Append(r.varbytes(MAX_MSG_LENGTH, "operation argument")?),
            0xf1 => Op::Prepend(r.varbytes(MAX_MSG_LENGTH, "operation argument")?),
            0xf2 => Op::Reverse,
            0xf3 => Op::Hexlify,
            other => return Err(OtsError::UnknownOp(other)),
        };
        op.check()?;
        Ok(op)
    }
}

/// Python's order: by tag, then by argument.
impl Ord for Op {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.tag(), self.arg()).cmp(&(other.tag(), other.arg()))
    }
}

impl PartialOrd for Op {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// A time attestation: what a path of operations ends in.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Attestation {
    /// The message is the Merkle root of the Bitcoin block at this height.
    Bitcoin { height: u64 },
    /// A calendar server promises a complete timestamp later.
    Pending { uri: String },
    /// Any other attestation, kept byte for byte.
    Unknown { tag: [u8; 8], payload: Vec<u8> },
}

impl Attestation {
    /// A pending attestation, checking the URI like the Python library.
    pub fn pending(uri: &str) -> Result<Self, OtsError> {
        check_uri(uri.as_bytes())?;
        Ok(Attestation::Pending { uri: uri.to_string() })
    }

    pub fn tag(&self) -> [u8; 8] {
        match self {
            Attestation::Bitcoin { .. } => TAG_BITCOIN,
            Attestation::Pending { .. } => TAG_PENDING,
            Attestation::Unknown { tag, .. } => *tag,
        }
    }

    fn payload(&self) -> Result<Vec<u8>, OtsError> {
        let mut p = vec![];
        match self {
            Attestation::Bitcoin { height } => write_varuint(&mut p, *height),
            Attestation::Pending { uri } => {
                check_uri(uri.as_bytes())?;
                write_varbytes(&mut p, uri.as_bytes());
            }
            Attestation::Unknown { payload, .. } => p.extend_from_slice(payload),
        }
        if p.len() > MAX_PAYLOAD_SIZE {
            return Err(too_long("attestation payload", p.len(), MAX_PAYLOAD_SIZE));
        }
        Ok(p)
    }

    fn write(&self, w: &mut Vec<u8>) -> Result<(), OtsError> {
        let payload = self.payload()?;
        w.extend_from_slice(&self.tag());
        write_varbytes(w, &payload);
        Ok(())
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, OtsError> {
        let tag: [u8; 8] = r.array()?;
        let payload = r.varbytes(MAX_PAYLOAD_SIZE, "attestation payload")?;
        let mut p = Reader(&payload);
        let a = match tag {
            TAG_BITCOIN => Attestation::Bitcoin { height: p.varuint()? },
            TAG_PENDING => {
                let uri = p.varbytes(MAX_URI_LENGTH, "calendar URI")?;
                check_uri(&uri)?;
                // check_uri admits ASCII only.
                Attestation::Pending { uri: String::from_utf8_lossy(&uri).into_owned() }
            }
            _ => return Ok(Attestation::Unknown { tag, payload }),
        };
        p.end()?;
        Ok(a)
    }

    fn rank(&self) -> u8 {
        match self {
            Attestation::Bitcoin { .. } => 0,
            Attestation::Pending { .. } => 1,
            Attestation::Unknown { .. } => 2,
        }
    }
}

/// Python's order: by tag, then height, URI or payload.
impl Ord for Attestation {
    fn cmp(&self, other: &Self) -> Ordering {
        self.tag().cmp(&other.tag()).then_with(|| match (self, other) {
            (Attestation::Bitcoin { height: a }, Attestation::Bitcoin { height: b }) => a.cmp(b),
            (Attestation::Pending { uri: a }, Attestation::Pending { uri: b }) => a.cmp(b),
            (Attestation::Unknown { payload: a, .. }, Attestation::Unknown { payload: b, .. }) => a.cmp(b),
            _ => self.rank().cmp(&other.rank()),
        })
    }
}

impl PartialOrd for Attestation {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

fn check_uri(uri: &[u8]) -> Result<(), OtsError> {
    if uri.len() > MAX_URI_LENGTH {
        return Err(too_long("calendar URI", uri.len(), MAX_URI_LENGTH));
    }
    if let Some(c) = uri.iter().find(|c| !ALLOWED_URI_CHARS.contains(c)) {
        return Err(OtsError::BadUri(format!("character {:?} is not allowed", *c as char)));
    }
    Ok(())
}

/// A node of the timestamp tree: a message, its attestations, and operations to
/// child nodes. Every child's message is the operation applied to this message
/// (enforced: children are only made by [`Timestamp::add_op`]). Attestations and
/// operations are kept sorted and without duplicates, as in the Python library.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timestamp {
    msg: Vec<u8>,
    attestations: Vec<Attestation>,
    ops: Vec<(Op, Timestamp)>,
}

impl Timestamp {
    /// An empty node for `msg` (at most 4096 bytes).
    pub fn new(msg: Vec<u8>) -> Result<Self, OtsError> {
        if msg.len() > MAX_MSG_LENGTH {
            return Err(too_long("message", msg.len(), MAX_MSG_LENGTH));
        }
        Ok(Timestamp { msg, attestations: vec![], ops: vec![] })
    }

    /// A single path from `msg`: apply `ops` in order, then `attestation`.
    pub fn linear(msg: Vec<u8>, ops: Vec<Op>, attestation: Attestation) -> Result<Self, OtsError> {
        let mut root = Timestamp::new(msg)?;
        let mut node = &mut root;
        for op in ops {
            node = node.add_op(op)?;
        }
        node.add_attestation(attestation);
        Ok(root)
    }

    /// The message of this node.
    pub fn msg(&self) -> &[u8] {
        &self.msg
    }

    /// The attestations of this node's message, sorted.
    pub fn attestations(&self) -> &[Attestation] {
        &self.attestations
    }

    /// The operations to child nodes, sorted.
    pub fn ops(&self) -> &[(Op, Timestamp)] {
        &self.ops
    }

    pub fn add_attestation(&mut self, a: Attestation) {
        if let Err(i) = self.attestations.binary_search(&a) {
            self.attestations.insert(i, a);
        }
    }

    /// The child reached by `op` (created, with the op applied, if new).
    pub fn add_op(&mut self, op: Op) -> Result<&mut Timestamp, OtsError> {
        let i = match self.ops.binary_search_by(|(o, _)| o.cmp(&op)) {
            Ok(i) => i,
            Err(i) => {
                let child = Timestamp::new(op.apply(&self.msg)?)?;
                self.ops.insert(i, (op, child));
                i
            }
        };
        Ok(&mut self.ops[i].1)
    }

    /// Add all operations and attestations of `other` (a timestamp of the same message).
    pub fn merge(&mut self, other: Timestamp) -> Result<(), OtsError> {
        if other.msg != self.msg {
            return Err(OtsError::InvalidMessage { op: "merge", reason: "the timestamps are for different messages" });
        }
        for a in other.attestations {
            self.add_attestation(a);
        }
        for (op, t) in other.ops {
            self.add_op(op)?.merge(t)?;
        }
        Ok(())
    }

    /// Every attestation in the tree with the message it attests, depth first.
    pub fn evaluate(&self) -> Vec<(&Attestation, &[u8])> {
        let mut out = vec![];
        let mut stack = vec![self];
        while let Some(t) = stack.pop() {
            out.extend(t.attestations.iter().map(|a| (a, t.msg.as_slice())));
            stack.extend(t.ops.iter().rev().map(|(_, c)| c));
        }
        out
    }

    /// Serialize the tree below this node (not its message).
    pub fn serialize_into(&self, w: &mut Vec<u8>) -> Result<(), OtsError> {
        // Iterative, so a deep tree cannot overflow the stack.
        // Nodes at depth RECURSION_LIMIT or more would not be read back (here or by
        // the Python library): refuse to write them.
        enum Item<'a> {
            Node(&'a Timestamp, usize),
            Bytes(u8),
        }
        let mut stack = vec![Item::Node(self, 0)];
        while let Some(item) = stack.pop() {
            let (t, depth) = match item {
                Item::Bytes(b) => {
                    w.push(b);
                    continue;
                }
                Item::Node(t, depth) => (t, depth),
            };
            if depth >= RECURSION_LIMIT {
                return Err(OtsError::RecursionLimit);
            }
            let n = t.attestations.len() + t.ops.len();
            if n == 0 {
                return Err(OtsError::EmptyTimestamp);
            }
            let mut k = 0;
            for a in &t.attestations {
                k += 1;
                if k < n {
                    w.push(0xff);
                }
                w.push(0x00);
                a.write(w)?;
            }
            // Ops are written in order, each followed by its subtree: push in reverse.
            let mut pending = vec![];
            for (op, child) in &t.ops {
                k += 1;
                let mut head = vec![];
                if k < n {
                    head.push(0xff);
                }
                op.write(&mut head);
                pending.push((head, child));
            }
            for (head, child) in pending.into_iter().rev() {
                stack.push(Item::Node(child, depth + 1));
                stack.extend(head.into_iter().rev().map(Item::Bytes));
            }
        }
        Ok(())
    }

    /// Read a tree for `msg` (the message is not part of the serialization).
    fn read(r: &mut Reader<'_>, msg: Vec<u8>, limit: usize) -> Result<Self, OtsError> {
        if limit == 0 {
            return Err(OtsError::RecursionLimit);
        }
        let mut t = Timestamp::new(msg)?;
        loop {
            let mut tag = r.byte()?;
            let fork = tag == 0xff;
            if fork {
                tag = r.byte()?;
            }
            if tag == 0x00 {
                t.add_attestation(Attestation::read(r)?);
            } else {
                let op = Op::read(tag, r)?;
                let child = Timestamp::read(r, op.apply(&t.msg)?, limit - 1)?;
                t.add_op(op)?.merge(child)?;
            }
            if !fork {
                return Ok(t);
            }
        }
    }
}

/// A detached timestamp: the proof for a file, given by its digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DetachedTimestampFile {
    /// How the file was hashed.
    pub file_hash_op: HashOp,
    /// The tree, rooted at the file's digest.
    pub timestamp: Timestamp,
}

impl DetachedTimestampFile {
    /// Check that the timestamp's message is a digest of `file_hash_op`.
    pub fn new(file_hash_op: HashOp, timestamp: Timestamp) -> Result<Self, OtsError> {
        if timestamp.msg().len() != file_hash_op.digest_len() {
            return Err(OtsError::DigestLength { expected: file_hash_op.digest_len(), got: timestamp.msg().len() });
        }
        Ok(DetachedTimestampFile { file_hash_op, timestamp })
    }

    /// The digest of the timestamped file.
    pub fn digest(&self) -> &[u8] {
        self.timestamp.msg()
    }

    /// Whether `file` is the file this timestamp is for.
    pub fn matches_file(&self, file: &[u8]) -> bool {
        self.file_hash_op.hash(file) == self.digest()
    }

    pub fn serialize(&self) -> Result<Vec<u8>, OtsError> {
        let digest = self.digest();
        if digest.len() != self.file_hash_op.digest_len() {
            return Err(OtsError::DigestLength { expected: self.file_hash_op.digest_len(), got: digest.len() });
        }
        let mut w = MAGIC.to_vec();
        write_varuint(&mut w, MAJOR_VERSION);
        w.push(self.file_hash_op.tag());
        w.extend_from_slice(digest);
        self.timestamp.serialize_into(&mut w)?;
        Ok(w)
    }

    pub fn deserialize(b: &[u8]) -> Result<Self, OtsError> {
        let mut r = Reader(b);
        if r.take(MAGIC.len()).map_err(|_| OtsError::BadMagic)? != MAGIC {
            return Err(OtsError::BadMagic);
        }
        let v = r.varuint()?;
        if v != MAJOR_VERSION {
            return Err(OtsError::UnsupportedVersion(v));
        }
        let tag = r.byte()?;
        let file_hash_op = HashOp::from_tag(tag).ok_or(OtsError::NotAHashOp(tag))?;
        let digest = r.take(file_hash_op.digest_len())?.to_vec();
        let timestamp = Timestamp::read(&mut r, digest, RECURSION_LIMIT)?;
        r.end()?;
        Ok(DetachedTimestampFile { file_hash_op, timestamp })
    }
}

/// LEB128, as the format's `varuint`.
pub fn write_varuint(w: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            w.push(b);
            return;
        }
        w.push(b | 0x80);
    }
}

fn write_varbytes(w: &mut Vec<u8>, b: &[u8]) {
    write_varuint(w, b.len() as u64);
    w.extend_from_slice(b);
}

/// A cursor over serialized bytes.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], OtsError> {
        if self.0.len() < n {
            return Err(OtsError::Truncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], OtsError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn byte(&mut self) -> Result<u8, OtsError> {
        Ok(self.take(1)?[0])
    }

    fn varuint(&mut self) -> Result<u64, OtsError> {
        let mut v = 0u64;
        let mut shift = 0u32;
        loop {
            let b = self.byte()?;
            let bits = (b & 0x7f) as u64;
            if shift >= 64 || (shift == 63 && bits > 1) {
                if bits != 0 {
                    return Err(OtsError::VarintOverflow);
                }
            } else {
                v |= bits << shift;
            }
            if b & 0x80 == 0 {
                return Ok(v);
            }
            shift = shift.saturating_add(7);
            if shift > 7 * 20 {
                // Over-long zero padding: no sane encoder writes this.
                return Err(OtsError::VarintOverflow);
            }
        }
    }

    fn varbytes(&mut self, max: usize, what: &'static str) -> Result<Vec<u8>, OtsError> {
        let n = self.varuint()?;
        if n > max as u64 {
            return Err(too_long(what, usize::try_from(n).unwrap_or(usize::MAX), max));
        }
        Ok(self.take(n as usize)?.to_vec())
    }

    fn end(&self) -> Result<(), OtsError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(OtsError::TrailingGarbage)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(b: &[u8]) -> Vec<u8> {
        sha256::Hash::hash(b).to_byte_array().to_vec()
    }

    fn sample() -> DetachedTimestampFile {
        let ops = vec![Op::Prepend(vec![0]), Op::Sha256, Op::Append(vec![7; 32]), Op::Sha256, Op::Sha256];
        let t = Timestamp::linear(vec![1; 32], ops, Attestation::Bitcoin { height: 300 }).unwrap();
        DetachedTimestampFile::new(HashOp::Sha256, t).unwrap()
    }

    fn forked() -> DetachedTimestampFile {
        let mut t = Timestamp::new(vec![3; 32]).unwrap();
        t.add_attestation(Attestation::pending("https://alice.btc.calendar.opentimestamps.org").unwrap());
        t.add_attestation(Attestation::Bitcoin { height: 7 });
        t.add_op(Op::Sha256).unwrap().add_op(Op::Reverse).unwrap().add_attestation(Attestation::Bitcoin { height: 1 });
        let h = t.add_op(Op::Hexlify).unwrap();
        h.add_attestation(Attestation::Unknown { tag: [0x99; 8], payload: vec![1, 2] });
        h.add_op(Op::Keccak256).unwrap().add_attestation(Attestation::Bitcoin { height: 128 });
        t.add_op(Op::Append(vec![0xaa, 0xbb]))
            .unwrap()
            .add_op(Op::Ripemd160)
            .unwrap()
            .add_op(Op::Sha1)
            .unwrap()
            .add_attestation(Attestation::Pending { uri: "http://127.0.0.1:14788".into() });
        t.add_op(Op::Prepend(vec![0xcc])).unwrap().add_attestation(Attestation::Bitcoin { height: 1 << 40 });
        DetachedTimestampFile::new(HashOp::Sha256, t).unwrap()
    }

    #[test]
    fn roundtrip_and_evaluate() {
        let f = sample();
        let b = f.serialize().unwrap();
        assert!(b.starts_with(MAGIC));
        assert_eq!(DetachedTimestampFile::deserialize(&b).unwrap(), f);
        let res = f.timestamp.evaluate();
        assert_eq!(res.len(), 1);
        let mut m = sha(&[&[0u8][..], &[1; 32]].concat());
        m.extend_from_slice(&[7; 32]);
        m = sha(&sha(&m));
        assert_eq!(res[0], (&Attestation::Bitcoin { height: 300 }, m.as_slice()));
        for n in 0..b.len() {
            assert!(DetachedTimestampFile::deserialize(&b[..n]).is_err(), "prefix of {n} bytes accepted");
        }
        let mut t = b.clone();
        t.push(0);
        assert_eq!(DetachedTimestampFile::deserialize(&t), Err(OtsError::TrailingGarbage));
    }

    #[test]
    fn forks_keccak_pending_and_unknown_attestations_roundtrip() {
        let f = forked();
        let b = f.serialize().unwrap();
        let g = DetachedTimestampFile::deserialize(&b).unwrap();
        assert_eq!(g, f);
        assert_eq!(g.serialize().unwrap(), b);
        assert_eq!(f.timestamp.evaluate().len(), 7);
        // keccak256("") is well known; check the implementation once.
        assert_eq!(hex::encode(keccak256(b"")), "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470");
        // Other file hash ops.
        let t = Timestamp::linear(vec![5; 20], vec![Op::Sha256], Attestation::Bitcoin { height: 2 }).unwrap();
        let f = DetachedTimestampFile::new(HashOp::Ripemd160, t).unwrap();
        assert_eq!(DetachedTimestampFile::deserialize(&f.serialize().unwrap()).unwrap(), f);
        assert!(DetachedTimestampFile::new(HashOp::Sha256, Timestamp::new(vec![0; 20]).unwrap()).is_err());
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let good = sample().serialize().unwrap();
        let head = MAGIC.len() + 2 + 32;
        let with = |tail: &[u8]| DetachedTimestampFile::deserialize(&[&good[..head], tail].concat());
        assert_eq!(DetachedTimestampFile::deserialize(b"hello"), Err(OtsError::BadMagic));
        let mut v = good.clone();
        v[MAGIC.len()] = 2;
        assert_eq!(DetachedTimestampFile::deserialize(&v), Err(OtsError::UnsupportedVersion(2)));
        v = good.clone();
        v[MAGIC.len() + 1] = 0xf0;
        assert_eq!(DetachedTimestampFile::deserialize(&v), Err(OtsError::NotAHashOp(0xf0)));
        assert_eq!(with(&[0x42]), Err(OtsError::UnknownOp(0x42)));
        assert_eq!(with(&[0xff, 0xff]), Err(OtsError::UnknownOp(0xff)));
        assert_eq!(with(&[0xf0, 0x00]), Err(OtsError::EmptyArgument("append")));
        assert!(matches!(with(&[0xf0, 0x81, 0x20]), Err(OtsError::TooLong { len: 4097, .. })));
        // Reverse of a hexlify of … grows past 4096 bytes: rejected while reading.
        let deep = vec![0xf3; 8];
        assert!(matches!(with(&deep), Err(OtsError::TooLong { .. })));
        // Nesting: 255 levels are fine, 256 are not (the Python limit).
        let ok = [vec![0x08; 255], vec![0x00], TAG_BITCOIN.to_vec(), vec![1, 0]].concat();
        assert!(with(&ok).is_ok());
        let deep = [vec![0x08; 256], vec![0x00], TAG_BITCOIN.to_vec(), vec![1, 0]].concat();
        assert_eq!(with(&deep), Err(OtsError::RecursionLimit));
        // Attestation payloads: trailing bytes, bad URIs, oversize, huge varints.
        assert_eq!(with(&[&[0x00][..], &TAG_BITCOIN, &[2, 1, 0]].concat()), Err(OtsError::TrailingGarbage));
        assert!(matches!(with(&[&[0x00][..], &TAG_PENDING, &[3, 2, b'a', b'?']].concat()), Err(OtsError::BadUri(_))));
        assert!(matches!(with(&[&[0x00][..], &TAG_PENDING, &[0x81, 0x40]].concat()), Err(OtsError::TooLong { .. })));
        let big = [&[0x00][..], &TAG_BITCOIN, &[11], &[0xff; 10], &[0x01]].concat();
        assert_eq!(with(&big), Err(OtsError::VarintOverflow));
        let max = [&[0x00][..], &TAG_BITCOIN, &[10], &[0xff; 9], &[0x01]].concat();
        assert_eq!(with(&max).unwrap().timestamp.evaluate()[0].0, &Attestation::Bitcoin { height: u64::MAX });
        // Building: empty nodes, bad URIs, oversized arguments.
        assert_eq!(
            DetachedTimestampFile::new(HashOp::Sha256, Timestamp::new(vec![0; 32]).unwrap()).unwrap().serialize(),
            Err(OtsError::EmptyTimestamp)
        );
        assert!(Attestation::pending("https://x?y").is_err());
        assert!(Timestamp::linear(vec![0; 32], vec![Op::Append(vec![0; 4090])], Attestation::Bitcoin { height: 0 }).is_err());
        assert!(Op::Reverse.apply(&[]).is_err());
        let deep = |n| {
            let t = Timestamp::linear(vec![0; 32], vec![Op::Sha256; n], Attestation::Bitcoin { height: 0 }).unwrap();
            DetachedTimestampFile::new(HashOp::Sha256, t).unwrap().serialize()
        };
        assert!(DetachedTimestampFile::deserialize(&deep(255).unwrap()).is_ok());
        assert_eq!(deep(256), Err(OtsError::RecursionLimit));
    }

    #[test]
    fn serialization_is_canonical_like_python() {
        // Items added in any order serialize sorted, duplicates once.
        let mut a = Timestamp::new(vec![1; 32]).unwrap();
        a.add_op(Op::Sha256).unwrap().add_attestation(Attestation::Bitcoin { height: 5 });
        a.add_op(Op::Append(vec![2])).unwrap().add_attestation(Attestation::Bitcoin { height: 3 });
        a.add_attestation(Attestation::Bitcoin { height: 9 });
        let mut b = Timestamp::new(vec![1; 32]).unwrap();
        b.add_attestation(Attestation::Bitcoin { height: 9 });
        b.add_attestation(Attestation::Bitcoin { height: 9 });
        b.add_op(Op::Append(vec![2])).unwrap().add_attestation(Attestation::Bitcoin { height: 3 });
        b.add_op(Op::Sha256).unwrap().add_attestation(Attestation::Bitcoin { height: 5 });
        let (fa, fb) = (DetachedTimestampFile::new(HashOp::Sha256, a).unwrap(), DetachedTimestampFile::new(HashOp::Sha256, b).unwrap());
        let bytes = fa.serialize().unwrap();
        assert_eq!(bytes, fb.serialize().unwrap());
        // 0xff 0x00 <bitcoin 9>, 0xff 0x08 (sha256 first: tag 0x08 < 0xf0) …, 0xf0 …
        let tail = &bytes[MAGIC.len() + 2 + 32..];
        assert_eq!(&tail[..3], &[0xff, 0x00, 0x05]);
        assert_eq!(tail[12..14], [0xff, 0x08]);
    }

    /// Runs python-opentimestamps on `script` with the file at `path` as `sys.argv[1]`.
    fn python(script: &str, path: &std::path::Path) -> String {
        let out = std::process::Command::new("python3").arg("-c").arg(script).arg(path).output();
        let out = match out {
            Ok(o) => o,
            Err(e) => panic!("python3 is needed for this test (and pip install opentimestamps-client): {e}"),
        };
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && stderr.contains("No module named 'opentimestamps'") {
            println!(
                "NOTICE: skipping the python-opentimestamps cross-check: the module is not installed (pip install opentimestamps-client)"
            );
            return String::new();
        }
        assert!(out.status.success(), "python-opentimestamps rejected our file: {stderr}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    const PY_READ: &str = "import sys\n\
        from opentimestamps.core.timestamp import DetachedTimestampFile\n\
        from opentimestamps.core.serialize import StreamDeserializationContext, BytesSerializationContext\n\
        f = DetachedTimestampFile.deserialize(StreamDeserializationContext(open(sys.argv[1], 'rb')))\n\
        print(f.file_hash_op, f.file_digest.hex())\n\
        for msg, a in sorted(f.timestamp.all_attestations(), key=lambda x: (x[1], x[0])): print(msg.hex(), repr(a))\n\
        c = BytesSerializationContext(); f.serialize(c); print('reserialized', c.getbytes().hex())\n";

    #[test]
    fn the_python_reference_implementation_reads_our_files() {
        let dir = tempfile::tempdir().unwrap();
        for f in [sample(), forked()] {
            let p = dir.path().join("x.ots");
            let bytes = f.serialize().unwrap();
            std::fs::write(&p, &bytes).unwrap();
            let text = python(PY_READ, &p);
            if text.is_empty() {
                return;
            }
            let mut lines = text.lines();
            assert_eq!(lines.next().unwrap(), format!("sha256 {}", hex::encode(f.digest())));
            // Same attestations, on the same messages, as our evaluation.
            let mut ours: Vec<_> = f.timestamp.evaluate().into_iter().map(|(a, m)| (a.clone(), m.to_vec())).collect();
            ours.sort();
            for (a, m) in ours {
                let line = lines.next().unwrap();
                let repr = match a {
                    Attestation::Bitcoin { height } => format!("BitcoinBlockHeaderAttestation({height})"),
                    Attestation::Pending { uri } => format!("PendingAttestation('{uri}')"),
                    Attestation::Unknown { tag, payload } => format!(
                        "UnknownAttestation(b'{}', b'{}')",
                        tag.iter().map(|b| format!("\\x{b:02x}")).collect::<String>(),
                        payload.iter().map(|b| format!("\\x{b:02x}")).collect::<String>()
                    ),
                };
                assert_eq!(line, format!("{} {repr}", hex::encode(m)));
            }
            // Python writes exactly the bytes we wrote.
            assert_eq!(lines.next().unwrap(), format!("reserialized {}", hex::encode(&bytes)));
        }
    }

    #[test]
    fn we_read_files_the_python_library_writes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("py.ots");
        let script = "import sys\n\
            from opentimestamps.core.timestamp import DetachedTimestampFile, Timestamp\n\
            from opentimestamps.core.op import OpSHA256, OpAppend, OpPrepend, OpKECCAK256, OpHexlify\n\
            from opentimestamps.core.notary import BitcoinBlockHeaderAttestation, PendingAttestation\n\
            from opentimestamps.core.serialize import StreamSerializationContext\n\
            t = Timestamp(bytes(range(32)))\n\
            a = t.ops.add(OpAppend(b'\\x01\\x02')).ops.add(OpSHA256())\n\
            a.attestations.add(BitcoinBlockHeaderAttestation(654321))\n\
            a.ops.add(OpKECCAK256()).attestations.add(PendingAttestation('https://finney.calendar.eternitywall.com'))\n\
            t.ops.add(OpPrepend(b'\\xff' * 300)).ops.add(OpHexlify()).attestations.add(BitcoinBlockHeaderAttestation(1))\n\
            f = DetachedTimestampFile(OpSHA256(), t)\n\
            f.serialize(StreamSerializationContext(open(sys.argv[1], 'wb')))\n\
            for msg, a in sorted(t.all_attestations(), key=lambda x: (x[1], x[0])): print(msg.hex(), repr(a))\n";
        let text = python(script, &p);
        if text.is_empty() {
            return;
        }
        let bytes = std::fs::read(&p).unwrap();
        let f = DetachedTimestampFile::deserialize(&bytes).unwrap();
        assert_eq!(f.serialize().unwrap(), bytes);
        let mut ours: Vec<_> = f.timestamp.evaluate().into_iter().map(|(a, m)| (a.clone(), m.to_vec())).collect();
        ours.sort();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(ours.len(), lines.len());
        for ((a, m), line) in ours.iter().zip(lines) {
            assert!(line.starts_with(&hex::encode(m)), "{line}");
            match a {
                Attestation::Bitcoin { height } => assert!(line.ends_with(&format!("BitcoinBlockHeaderAttestation({height})"))),
                Attestation::Pending { uri } => assert!(line.ends_with(&format!("PendingAttestation('{uri}')"))),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}
