//! OpenTimestamps `.ots` files, byte for byte as the OpenTimestamps project defines
//! them (python-opentimestamps `core/timestamp.py`, `op.py`, `notary.py`), so the
//! standard `ots` client verifies a bitmote proof with no bitmote code involved.
//!
//! A file is the magic header, version 1, the file hash op (we write SHA-256) and
//! the file digest, then a timestamp tree: operations (append, prepend, hashes)
//! leading from the digest to attestations. bitmote writes one linear path ending in
//! a Bitcoin block-header attestation; it reads any tree (forks, pending and unknown
//! attestations) so `bitmote verify` can check files from elsewhere too.

use bitcoin::hashes::{ripemd160, sha1, sha256, Hash as _};

/// Header magic of a detached timestamp file.
pub const MAGIC: &[u8] = b"\x00OpenTimestamps\x00\x00Proof\x00\xbf\x89\xe2\xe8\x84\xe8\x92\x94";
const TAG_BITCOIN: [u8; 8] = [0x05, 0x88, 0x96, 0x0d, 0x73, 0xd7, 0x19, 0x01];
const TAG_PENDING: [u8; 8] = [0x83, 0xdf, 0xe3, 0x0d, 0x2e, 0xf9, 0x0c, 0x8e];
const MAX_MSG: usize = 4096;
const MAX_DEPTH: usize = 256;

/// Errors reading or evaluating an `.ots` file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OtsError {
    #[error("not an OpenTimestamps proof (bad magic)")]
    BadMagic,
    #[error("unsupported OpenTimestamps major version {0}")]
    Version(u64),
    #[error("unsupported file hash op {0:#04x} (bitmote reads SHA-256 files)")]
    FileHashOp(u8),
    #[error("truncated OpenTimestamps proof")]
    Truncated,
    #[error("trailing bytes after the OpenTimestamps proof")]
    Trailing,
    #[error("unknown operation tag {0:#04x}")]
    UnknownOp(u8),
    #[error("operation {0} is not supported for evaluation")]
    Unsupported(&'static str),
    #[error("message or argument too long ({0} bytes)")]
    TooLong(usize),
    #[error("proof nested too deeply")]
    TooDeep,
    #[error("an empty timestamp cannot be serialized")]
    Empty,
}

/// A timestamp operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Sha256,
    Ripemd160,
    Sha1,
    Keccak256,
    Append(Vec<u8>),
    Prepend(Vec<u8>),
    Reverse,
    Hexlify,
}

impl Op {
    fn tag(&self) -> u8 {
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

    /// Apply the operation to `msg`.
    pub fn apply(&self, msg: &[u8]) -> Result<Vec<u8>, OtsError> {
        let out = match self {
            Op::Sha256 => sha256::Hash::hash(msg).to_byte_array().to_vec(),
            Op::Ripemd160 => ripemd160::Hash::hash(msg).to_byte_array().to_vec(),
            Op::Sha1 => sha1::Hash::hash(msg).to_byte_array().to_vec(),
            Op::Keccak256 => return Err(OtsError::Unsupported("keccak256")),
            Op::Append(a) => [msg, a].concat(),
            Op::Prepend(p) => [&p[..], msg].concat(),
            Op::Reverse => msg.iter().rev().copied().collect(),
            Op::Hexlify => hex::encode(msg).into_bytes(),
        };
        if out.len() > MAX_MSG {
            return Err(OtsError::TooLong(out.len()));
        }
        Ok(out)
    }
}

/// What a path of operations ends in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attestation {
    /// The message is the Merkle root of the Bitcoin block at this height.
    Bitcoin { height: u64 },
    /// A calendar server promises a later attestation.
    Pending { uri: String },
    Unknown { tag: [u8; 8], payload: Vec<u8> },
}

/// A node of the timestamp tree (its message is implied by the path to it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Timestamp {
    pub attestations: Vec<Attestation>,
    pub ops: Vec<(Op, Timestamp)>,
}

impl Timestamp {
    /// A single path: apply `ops` in order, then `attestation`.
    pub fn linear(ops: Vec<Op>, attestation: Attestation) -> Self {
        let mut t = Timestamp { attestations: vec![attestation], ops: vec![] };
        for op in ops.into_iter().rev() {
            t = Timestamp { attestations: vec![], ops: vec![(op, t)] };
        }
        t
    }

    /// Every attestation with the message it attests, starting from `msg`.
    pub fn evaluate(&self, msg: &[u8]) -> Result<Vec<(Attestation, Vec<u8>)>, OtsError> {
        let mut out = vec![];
        self.eval_into(msg, &mut out, 0)?;
        Ok(out)
    }

    fn eval_into(&self, msg: &[u8], out: &mut Vec<(Attestation, Vec<u8>)>, depth: usize) -> Result<(), OtsError> {
        if depth > MAX_DEPTH {
            return Err(OtsError::TooDeep);
        }
        for a in &self.attestations {
            out.push((a.clone(), msg.to_vec()));
        }
        for (op, t) in &self.ops {
            t.eval_into(&op.apply(msg)?, out, depth + 1)?;
        }
        Ok(())
    }

    fn serialize(&self, w: &mut Vec<u8>) -> Result<(), OtsError> {
        let (na, no) = (self.attestations.len(), self.ops.len());
        if na == 0 && no == 0 {
            return Err(OtsError::Empty);
        }
        // All but the last item are preceded by the 0xff fork marker (as python-opentimestamps writes).
        let mut items = 0;
        for a in &self.attestations {
            items += 1;
            if items < na + no {
                w.push(0xff);
            }
            w.push(0x00);
            write_attestation(w, a);
        }
        for (op, t) in &self.ops {
            items += 1;
            if items < na + no {
                w.push(0xff);
            }
            w.push(op.tag());
            if let Op::Append(b) | Op::Prepend(b) = op {
                write_varbytes(w, b);
            }
            t.serialize(w)?;
        }
        Ok(())
    }

    fn deserialize(r: &mut Reader<'_>, depth: usize) -> Result<Self, OtsError> {
        if depth > MAX_DEPTH {
            return Err(OtsError::TooDeep);
        }
        let mut t = Timestamp::default();
        loop {
            let mut tag = r.byte()?;
            let fork = tag == 0xff;
            if fork {
                tag = r.byte()?;
            }
            if tag == 0x00 {
                t.attestations.push(read_attestation(r)?);
            } else {
                let op = match tag {
                    0x02 => Op::Sha1,
                    0x03 => Op::Ripemd160,
                    0x08 => Op::Sha256,
                    0x67 => Op::Keccak256,
                    0xf0 => Op::Append(r.varbytes(MAX_MSG)?),
                    0xf1 => Op::Prepend(r.varbytes(MAX_MSG)?),
                    0xf2 => Op::Reverse,
                    0xf3 => Op::Hexlify,
                    other => return Err(OtsError::UnknownOp(other)),
                };
                t.ops.push((op, Timestamp::deserialize(r, depth + 1)?));
            }
            if !fork {
                return Ok(t);
            }
        }
    }
}

/// A detached timestamp of a file hashed with SHA-256.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DetachedTimestampFile {
    pub digest: [u8; 32],
    pub timestamp: Timestamp,
}

impl DetachedTimestampFile {
    pub fn serialize(&self) -> Result<Vec<u8>, OtsError> {
        let mut w = MAGIC.to_vec();
        write_varuint(&mut w, 1);
        w.push(0x08);
        w.extend_from_slice(&self.digest);
        self.timestamp.serialize(&mut w)?;
        Ok(w)
    }

    pub fn deserialize(b: &[u8]) -> Result<Self, OtsError> {
        let mut r = Reader(b);
        if r.take(MAGIC.len()).map_err(|_| OtsError::BadMagic)? != MAGIC {
            return Err(OtsError::BadMagic);
        }
        let v = r.varuint()?;
        if v != 1 {
            return Err(OtsError::Version(v));
        }
        let op = r.byte()?;
        if op != 0x08 {
            return Err(OtsError::FileHashOp(op));
        }
        let digest: [u8; 32] = r.take(32)?.try_into().map_err(|_| OtsError::Truncated)?;
        let timestamp = Timestamp::deserialize(&mut r, 0)?;
        if !r.0.is_empty() {
            return Err(OtsError::Trailing);
        }
        Ok(DetachedTimestampFile { digest, timestamp })
    }
}

fn write_varuint(w: &mut Vec<u8>, mut v: u64) {
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

fn write_attestation(w: &mut Vec<u8>, a: &Attestation) {
    let (tag, payload) = match a {
        Attestation::Bitcoin { height } => {
            let mut p = vec![];
            write_varuint(&mut p, *height);
            (TAG_BITCOIN, p)
        }
        Attestation::Pending { uri } => {
            let mut p = vec![];
            write_varbytes(&mut p, uri.as_bytes());
            (TAG_PENDING, p)
        }
        Attestation::Unknown { tag, payload } => (*tag, payload.clone()),
    };
    w.extend_from_slice(&tag);
    write_varbytes(w, &payload);
}

fn read_attestation(r: &mut Reader<'_>) -> Result<Attestation, OtsError> {
    let tag: [u8; 8] = r.take(8)?.try_into().map_err(|_| OtsError::Truncated)?;
    let payload = r.varbytes(8192)?;
    let mut p = Reader(&payload);
    let a = match tag {
        TAG_BITCOIN => Attestation::Bitcoin { height: p.varuint()? },
        TAG_PENDING => {
            Attestation::Pending { uri: String::from_utf8(p.varbytes(1000)?).map_err(|_| OtsError::Truncated)? }
        }
        _ => return Ok(Attestation::Unknown { tag, payload }),
    };
    if !p.0.is_empty() {
        return Err(OtsError::Trailing);
    }
    Ok(a)
}

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
    fn byte(&mut self) -> Result<u8, OtsError> {
        Ok(self.take(1)?[0])
    }
    fn varuint(&mut self) -> Result<u64, OtsError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(OtsError::TooLong(10))
    }
    fn varbytes(&mut self, max: usize) -> Result<Vec<u8>, OtsError> {
        let n = self.varuint()? as usize;
        if n > max {
            return Err(OtsError::TooLong(n));
        }
        Ok(self.take(n)?.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DetachedTimestampFile {
        let ops = vec![Op::Prepend(vec![0]), Op::Sha256, Op::Append(vec![7; 32]), Op::Sha256, Op::Sha256];
        DetachedTimestampFile { digest: [1; 32], timestamp: Timestamp::linear(ops, Attestation::Bitcoin { height: 300 }) }
    }

    #[test]
    fn roundtrip_and_evaluate() {
        let f = sample();
        let b = f.serialize().unwrap();
        assert!(b.starts_with(MAGIC));
        assert_eq!(DetachedTimestampFile::deserialize(&b).unwrap(), f);
        let res = f.timestamp.evaluate(&f.digest).unwrap();
        assert_eq!(res.len(), 1);
        let mut m = [&[0u8][..], &[1; 32]].concat();
        m = sha256::Hash::hash(&m).to_byte_array().to_vec();
        m.extend_from_slice(&[7; 32]);
        m = sha256::Hash::hash(&sha256::Hash::hash(&m).to_byte_array()).to_byte_array().to_vec();
        assert_eq!(res[0], (Attestation::Bitcoin { height: 300 }, m));
        for n in 0..b.len() {
            assert!(DetachedTimestampFile::deserialize(&b[..n]).is_err());
        }
        let mut t = b.clone();
        t.push(0);
        assert_eq!(DetachedTimestampFile::deserialize(&t), Err(OtsError::Trailing));
    }

    #[test]
    fn forks_and_other_attestations_roundtrip() {
        let t = Timestamp {
            attestations: vec![Attestation::Pending { uri: "https://example.invalid".into() }],
            ops: vec![
                (Op::Sha256, Timestamp::linear(vec![Op::Reverse], Attestation::Bitcoin { height: 1 })),
                (Op::Hexlify, Timestamp::linear(vec![], Attestation::Unknown { tag: [9; 8], payload: vec![1, 2] })),
            ],
        };
        let f = DetachedTimestampFile { digest: [3; 32], timestamp: t };
        let b = f.serialize().unwrap();
        assert_eq!(DetachedTimestampFile::deserialize(&b).unwrap(), f);
        assert_eq!(f.timestamp.evaluate(&f.digest).unwrap().len(), 3);
    }

    #[test]
    fn the_python_reference_implementation_reads_our_files() {
        let f = sample();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.ots");
        std::fs::write(&p, f.serialize().unwrap()).unwrap();
        let script = format!(
            "from opentimestamps.core.timestamp import DetachedTimestampFile\n\
             from opentimestamps.core.serialize import StreamDeserializationContext\n\
             f = DetachedTimestampFile.deserialize(StreamDeserializationContext(open({:?}, 'rb')))\n\
             print(f.file_digest.hex()); print(sorted(f.timestamp.all_attestations())[0][1])",
            p.to_str().unwrap()
        );
        let out = std::process::Command::new("python3").args(["-c", &script]).output().expect("python3 runs");
        assert!(
            out.status.success(),
            "python-opentimestamps must parse our file (pip install opentimestamps-client): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&hex::encode([1u8; 32])), "{text}");
        assert!(text.contains("BitcoinBlockHeaderAttestation(300)"), "{text}");
    }
}
