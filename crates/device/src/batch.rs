//! Signed readings, one at a time or in batches.
//!
//! A batch is signed once: the device signs the tagged hash `bitmote/batch/v1` of
//! `device || first_seq (u64 BE) || count (u32 BE) || root`, where `root` is the
//! RFC 9162 root over `leaf_hash(SHA-256(reading encoding))` of each reading, in
//! order. The readings must be the device's own, with consecutive sequence numbers.
//! So per reading, device and gateway pay a hash, not a signature, and any single
//! reading can later be proven with a [`BatchMembership`] (the batch signature and a
//! Merkle path) without the rest of the batch.
//!
//! Wire formats (the first byte is the format and version; all integers big-endian;
//! `signature[65]` is `type u8 || sig[64]`, see [`crate::sign`]):
//! ```text
//! SignedReading: 'R' (0x52) | len u16 | reading[len] | signature[65]
//! SignedBatch:   'B' (0x42) | count u16 (1..=4096) | (len u16 | reading[len]) × count | signature[65]
//! Evidence:      0x00 | signature[65]                                   (single reading)
//!              | 0x01 | first_seq u64 | count u32 | index u32 | n u8 (<= 64)
//!                     | hash[32] × n | signature[65]                    (batch membership)
//! ```
//! Each `reading` is the canonical encoding of [`crate::reading`]; decoding rejects
//! truncation, trailing bytes, unknown format bytes or signature types, and any
//! reading the reading decoder rejects. Decoding checks form only: [`SignedBatch::verify`]
//! checks the device, the sequence numbers and the signature.

use alloc::vec::Vec;
use core::fmt;

use crate::merkle::{self, Hash};
use crate::reading::{DecodeError, DeviceId, Reader, Reading, MAX_ENCODED};
use crate::sign::{PublicKey, SignError, Signature, SigningKey, SIGNATURE_LEN};
use crate::tagged_hash;

/// Most readings in one batch.
pub const MAX_BATCH: usize = 4096;

/// The 32-byte message a batch signature signs: tagged hash `bitmote/batch/v1` of
/// `device || first_seq u64 BE || count u32 BE || merkle root`.
pub type BatchRoot = [u8; 32];

/// Why a batch or signed reading is not acceptable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchError {
    Empty,
    TooMany(usize),
    /// A reading names another device than the batch's first reading / the key.
    WrongDevice,
    /// Sequence numbers are not consecutive.
    NotConsecutive {
        expected: u64,
        got: u64,
    },
    Sign(SignError),
    Decode(DecodeError),
    Merkle(merkle::MerkleError),
}

impl fmt::Display for BatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BatchError::Empty => write!(f, "empty batch"),
            BatchError::TooMany(n) => write!(f, "batch of {n} readings is over the limit of {MAX_BATCH}"),
            BatchError::WrongDevice => write!(f, "reading of another device (device id must be the signing key's)"),
            BatchError::NotConsecutive { expected, got } => {
                write!(f, "batch sequence numbers must be consecutive: expected {expected}, got {got}")
            }
            BatchError::Sign(e) => write!(f, "{e}"),
            BatchError::Decode(e) => write!(f, "{e}"),
            BatchError::Merkle(e) => write!(f, "batch membership: {e}"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for BatchError {}

impl From<SignError> for BatchError {
    fn from(e: SignError) -> Self {
        BatchError::Sign(e)
    }
}
impl From<DecodeError> for BatchError {
    fn from(e: DecodeError) -> Self {
        BatchError::Decode(e)
    }
}

/// Leaf hash of a reading in a batch tree (and in the gateway's log):
/// `leaf_hash(SHA-256(encoding))`, i.e. [`Reading::leaf_hash`].
pub fn reading_leaf_hash(r: &Reading) -> Hash {
    merkle::leaf_hash(&r.digest())
}

/// The message a batch signature signs, from its parts (`root` is the RFC 9162 root
/// over the readings' [`reading_leaf_hash`]es).
pub fn batch_message(device: &DeviceId, first_seq: u64, count: u32, root: &Hash) -> BatchRoot {
    tagged_hash(b"bitmote/batch/v1", &[&device.0, &first_seq.to_be_bytes(), &count.to_be_bytes(), root])
}

/// The [`BatchRoot`] of readings, after checking they form a batch: 1 to
/// [`MAX_BATCH`] valid readings of one device with consecutive sequence numbers.
pub fn batch_root(readings: &[Reading]) -> Result<BatchRoot, BatchError> {
    Ok(batch_shape(readings)?.0)
}

/// One reading with its own signature over [`Reading::id`].
#[derive(Clone, Debug, PartialEq)]
pub struct SignedReading {
    pub reading: Reading,
    pub signature: Signature,
}

impl SignedReading {
    /// Sign one reading of `key`'s device: the signature is over [`Reading::id`].
    pub fn sign(key: &SigningKey, reading: Reading) -> Result<Self, BatchError> {
        if reading.device != key.public_key().device_id() {
            return Err(BatchError::WrongDevice);
        }
        reading.validate()?;
        let signature = key.sign(&reading.id());
        Ok(SignedReading { reading, signature })
    }

    /// Check the reading is `key`'s device's and the signature.
    pub fn verify(&self, key: &PublicKey) -> Result<(), BatchError> {
        if self.reading.device != key.device_id() {
            return Err(BatchError::WrongDevice);
        }
        self.reading.validate()?;
        Ok(key.verify(&self.reading.id(), &self.signature)?)
    }

    pub fn encode(&self) -> Vec<u8> {
        let r = self.reading.encode();
        let mut v = Vec::with_capacity(3 + r.len() + SIGNATURE_LEN);
        v.push(b'R');
        v.extend_from_slice(&(r.len() as u16).to_be_bytes());
        v.extend_from_slice(&r);
        v.extend_from_slice(&self.signature.encode());
        v
    }

    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader(b);
        let tag = r.u8()?;
        if tag != b'R' {
            return Err(DecodeError::UnknownTag(tag));
        }
        let reading = read_reading(&mut r)?;
        let signature = Signature::decode(r.take(SIGNATURE_LEN)?)?;
        r.end()?;
        Ok(SignedReading { reading, signature })
    }
}

fn read_reading(r: &mut Reader<'_>) -> Result<Reading, DecodeError> {
    let n = r.u16()? as usize;
    if n > MAX_ENCODED {
        return Err(DecodeError::PayloadTooLarge(n));
    }
    Reading::decode(r.take(n)?)
}

/// Readings of one device with one signature over their batch root.
#[derive(Clone, Debug, PartialEq)]
pub struct SignedBatch {
    pub readings: Vec<Reading>,
    pub signature: Signature,
}

/// Check the shape of a batch and return its signed message and leaf hashes.
fn batch_shape(readings: &[Reading]) -> Result<(BatchRoot, Vec<Hash>), BatchError> {
    let first = readings.first().ok_or(BatchError::Empty)?;
    if readings.len() > MAX_BATCH {
        return Err(BatchError::TooMany(readings.len()));
    }
    for (i, r) in readings.iter().enumerate() {
        if r.device != first.device {
            return Err(BatchError::WrongDevice);
        }
        let expected = first.seq.checked_add(i as u64).ok_or(BatchError::NotConsecutive { expected: u64::MAX, got: r.seq })?;
        if r.seq != expected {
            return Err(BatchError::NotConsecutive { expected, got: r.seq });
        }
        r.validate()?;
    }
    let leaves: Vec<Hash> = readings.iter().map(reading_leaf_hash).collect();
    let msg = batch_message(&first.device, first.seq, readings.len() as u32, &merkle::root(&leaves));
    Ok((msg, leaves))
}

impl SignedBatch {
    /// Sign readings of `key`'s device with consecutive sequence numbers (1 to
    /// [`MAX_BATCH`] of them) with one signature over their [`BatchRoot`].
    pub fn sign(key: &SigningKey, readings: Vec<Reading>) -> Result<Self, BatchError> {
        let (msg, _) = batch_shape(&readings)?;
        if readings.first().map(|r| r.device) != Some(key.public_key().device_id()) {
            return Err(BatchError::WrongDevice);
        }
        Ok(SignedBatch { signature: key.sign(&msg), readings })
    }

    /// Check the batch's shape, that it is `key`'s device's, and the signature.
    pub fn verify(&self, key: &PublicKey) -> Result<(), BatchError> {
        let (msg, _) = batch_shape(&self.readings)?;
        if self.readings.first().map(|r| r.device) != Some(key.device_id()) {
            return Err(BatchError::WrongDevice);
        }
        Ok(key.verify(&msg, &self.signature)?)
    }

    /// The signed message ([`BatchRoot`]); errors if the readings are not a batch.
    pub fn root(&self) -> Result<BatchRoot, BatchError> {
        batch_root(&self.readings)
    }

    /// Evidence that reading `index` belongs to this signed batch: the batch
    /// signature and the RFC 9162 inclusion proof of the reading's leaf.
    pub fn batch_proof(&self, index: usize) -> Result<BatchMembership, BatchError> {
        let (_, leaves) = batch_shape(&self.readings)?;
        let first_seq = self.readings.first().map(|r| r.seq).ok_or(BatchError::Empty)?;
        let proof = merkle::inclusion_proof(&leaves, index as u64).map_err(BatchError::Merkle)?;
        Ok(BatchMembership { first_seq, count: self.readings.len() as u32, index: index as u32, proof, signature: self.signature })
    }

    /// Same as [`batch_proof`](Self::batch_proof).
    pub fn membership(&self, index: usize) -> Result<BatchMembership, BatchError> {
        self.batch_proof(index)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(3 + self.readings.len() * 70 + SIGNATURE_LEN);
        v.push(b'B');
        v.extend_from_slice(&(self.readings.len().min(u16::MAX as usize) as u16).to_be_bytes());
        for r in &self.readings {
            let e = r.encode();
            v.extend_from_slice(&(e.len() as u16).to_be_bytes());
            v.extend_from_slice(&e);
        }
        v.extend_from_slice(&self.signature.encode());
        v
    }

    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader(b);
        let tag = r.u8()?;
        if tag != b'B' {
            return Err(DecodeError::UnknownTag(tag));
        }
        let n = r.u16()? as usize;
        if n > MAX_BATCH {
            return Err(DecodeError::TooMany(n));
        }
        if n == 0 {
            return Err(DecodeError::EmptyBatch);
        }
        let mut readings = Vec::with_capacity(n);
        for _ in 0..n {
            readings.push(read_reading(&mut r)?);
        }
        let signature = Signature::decode(r.take(SIGNATURE_LEN)?)?;
        r.end()?;
        Ok(SignedBatch { readings, signature })
    }
}

/// Proof that one reading is in a batch its device signed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchMembership {
    pub first_seq: u64,
    pub count: u32,
    pub index: u32,
    pub proof: Vec<Hash>,
    pub signature: Signature,
}

impl BatchMembership {
    /// Check that `reading` is reading `index` of a batch of `count` readings from
    /// `first_seq` that `key` signed.
    pub fn verify(&self, key: &PublicKey, reading: &Reading) -> Result<(), BatchError> {
        if reading.device != key.device_id() {
            return Err(BatchError::WrongDevice);
        }
        if self.count as usize > MAX_BATCH {
            return Err(BatchError::TooMany(self.count as usize));
        }
        reading.validate()?;
        let expected = self.first_seq.checked_add(self.index as u64);
        if expected != Some(reading.seq) {
            return Err(BatchError::NotConsecutive { expected: expected.unwrap_or(u64::MAX), got: reading.seq });
        }
        let root = merkle::root_from_inclusion_proof(self.index as u64, self.count as u64, &reading_leaf_hash(reading), &self.proof)
            .map_err(BatchError::Merkle)?;
        let msg = batch_message(&reading.device, self.first_seq, self.count, &root);
        Ok(key.verify(&msg, &self.signature)?)
    }
}

/// How a reading is authenticated: its own signature, or membership in a signed batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Evidence {
    Single(Signature),
    Batch(BatchMembership),
}

impl Evidence {
    pub fn verify(&self, key: &PublicKey, reading: &Reading) -> Result<(), BatchError> {
        match self {
            Evidence::Single(sig) => {
                if reading.device != key.device_id() {
                    return Err(BatchError::WrongDevice);
                }
                Ok(key.verify(&reading.id(), sig)?)
            }
            Evidence::Batch(m) => m.verify(key, reading),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        match self {
            Evidence::Single(sig) => {
                v.push(0);
                v.extend_from_slice(&sig.encode());
            }
            Evidence::Batch(m) => {
                v.push(1);
                v.extend_from_slice(&m.first_seq.to_be_bytes());
                v.extend_from_slice(&m.count.to_be_bytes());
                v.extend_from_slice(&m.index.to_be_bytes());
                v.push(m.proof.len() as u8);
                for h in &m.proof {
                    v.extend_from_slice(h);
                }
                v.extend_from_slice(&m.signature.encode());
            }
        }
        v
    }

    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader(b);
        let e = match r.u8()? {
            0 => Evidence::Single(Signature::decode(r.take(SIGNATURE_LEN)?)?),
            1 => {
                let first_seq = r.u64()?;
                let count = r.u32()?;
                let index = r.u32()?;
                let n = r.u8()? as usize;
                if n > 64 {
                    return Err(DecodeError::TooMany(n));
                }
                let mut proof = Vec::with_capacity(n);
                for _ in 0..n {
                    proof.push(r.arr32()?);
                }
                let signature = Signature::decode(r.take(SIGNATURE_LEN)?)?;
                Evidence::Batch(BatchMembership { first_seq, count, index, proof, signature })
            }
            t => return Err(DecodeError::UnknownTag(t)),
        };
        r.end()?;
        Ok(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::{sensor, unit, Value};
    use alloc::vec;

    fn key(p256: bool) -> SigningKey {
        if p256 {
            SigningKey::p256_from_secret(&[3; 32]).unwrap()
        } else {
            SigningKey::schnorr_from_secret(&[3; 32]).unwrap()
        }
    }

    fn readings(k: &SigningKey, first: u64, n: usize) -> Vec<Reading> {
        (0..n)
            .map(|i| Reading {
                device: k.public_key().device_id(),
                seq: first + i as u64,
                timestamp_ms: 1_764_000_000_000 + i as u64 * 1000,
                sensor: sensor::POWER,
                unit: unit::WATT,
                value: Value::Scaled { mantissa: 1000 + i as i64, exponent: 0 },
            })
            .collect()
    }

    #[test]
    fn batches_sign_verify_and_prove_each_member_for_both_curves() {
        for p in [false, true] {
            let k = key(p);
            let pk = k.public_key();
            for n in [1usize, 2, 7, 64] {
                let b = SignedBatch::sign(&k, readings(&k, 10, n)).unwrap();
                b.verify(&pk).unwrap();
                assert_eq!(SignedBatch::decode(&b.encode()).unwrap(), b);
                for i in 0..n {
                    let m = b.membership(i).unwrap();
                    let ev = Evidence::Batch(m.clone());
                    ev.verify(&pk, &b.readings[i]).unwrap();
                    assert_eq!(Evidence::decode(&ev.encode()).unwrap(), ev);
                    // Tampered reading or another reading of the batch does not pass.
                    let mut t = b.readings[i].clone();
                    t.value = Value::Scaled { mantissa: -1, exponent: 0 };
                    assert!(m.verify(&pk, &t).is_err());
                    if n > 1 {
                        assert!(m.verify(&pk, &b.readings[(i + 1) % n]).is_err());
                    }
                }
                let mut t = b.clone();
                t.readings[0].timestamp_ms += 1;
                assert_eq!(t.verify(&pk), Err(BatchError::Sign(SignError::Invalid)));
            }
        }
    }

    #[test]
    fn malformed_batches_are_refused() {
        let k = key(false);
        let other = key(true);
        assert_eq!(SignedBatch::sign(&k, vec![]), Err(BatchError::Empty));
        let mut r = readings(&k, 1, 3);
        r[2].seq = 9;
        assert_eq!(SignedBatch::sign(&k, r), Err(BatchError::NotConsecutive { expected: 3, got: 9 }));
        assert_eq!(SignedBatch::sign(&other, readings(&k, 1, 2)), Err(BatchError::WrongDevice));
        let mut mixed = readings(&k, 1, 2);
        mixed[1].device = other.public_key().device_id();
        assert_eq!(SignedBatch::sign(&k, mixed), Err(BatchError::WrongDevice));
        assert_eq!(SignedBatch::sign(&k, readings(&k, 0, MAX_BATCH + 1)), Err(BatchError::TooMany(MAX_BATCH + 1)));
        let b = SignedBatch::sign(&k, readings(&k, 1, 2)).unwrap();
        assert_eq!(b.verify(&other.public_key()), Err(BatchError::WrongDevice));
        let e = b.encode();
        for n in 0..e.len() {
            assert!(SignedBatch::decode(&e[..n]).is_err());
        }
    }

    #[test]
    fn single_signed_readings() {
        for p in [false, true] {
            let k = key(p);
            let s = SignedReading::sign(&k, readings(&k, 5, 1).remove(0)).unwrap();
            s.verify(&k.public_key()).unwrap();
            assert_eq!(SignedReading::decode(&s.encode()).unwrap(), s);
            Evidence::Single(s.signature).verify(&k.public_key(), &s.reading).unwrap();
            let mut t = s.clone();
            t.reading.seq += 1;
            assert!(t.verify(&k.public_key()).is_err());
            let e = s.encode();
            for n in 0..e.len() {
                assert!(SignedReading::decode(&e[..n]).is_err());
            }
        }
        let k = key(false);
        assert_eq!(SignedReading::sign(&key(true), readings(&k, 1, 1).remove(0)), Err(BatchError::WrongDevice));
    }

    #[test]
    fn batch_root_is_the_documented_tagged_hash() {
        let k = key(false);
        let rs = readings(&k, 41, 5);
        let leaves: Vec<Hash> = rs.iter().map(|r| merkle::leaf_hash(&crate::sha256(&r.encode()))).collect();
        let mut data = Vec::new();
        data.extend_from_slice(&k.public_key().device_id().0);
        data.extend_from_slice(&41u64.to_be_bytes());
        data.extend_from_slice(&5u32.to_be_bytes());
        data.extend_from_slice(&merkle::root(&leaves));
        assert_eq!(batch_root(&rs).unwrap(), tagged_hash(b"bitmote/batch/v1", &[&data]));
        let b = SignedBatch::sign(&k, rs.clone()).unwrap();
        assert_eq!(b.root().unwrap(), batch_root(&rs).unwrap());
        k.public_key().verify(&b.root().unwrap(), &b.signature).unwrap();
        // A frontier over the same leaves gives the same tree root.
        let mut f = merkle::MerkleFrontier::new();
        for r in &rs {
            f.push(r.leaf_hash());
        }
        assert_eq!(f.root(), merkle::root(&leaves));
    }

    #[test]
    fn sequence_numbers_must_be_strictly_consecutive() {
        let k = key(true);
        let mut dup = readings(&k, 1, 3);
        dup[1].seq = 1;
        assert_eq!(batch_root(&dup), Err(BatchError::NotConsecutive { expected: 2, got: 1 }));
        let mut down = readings(&k, 10, 3);
        down.swap(1, 2);
        assert!(matches!(SignedBatch::sign(&k, down), Err(BatchError::NotConsecutive { .. })));
        let mut wrap = readings(&k, 0, 2);
        wrap[0].seq = u64::MAX;
        wrap[1].seq = 0;
        assert!(matches!(SignedBatch::sign(&k, wrap), Err(BatchError::NotConsecutive { .. })));
        // The last sequence number is fine on its own and at the end of a batch.
        let mut last = readings(&k, 0, 2);
        last[0].seq = u64::MAX - 1;
        last[1].seq = u64::MAX;
        SignedBatch::sign(&k, last).unwrap().verify(&k.public_key()).unwrap();
        // A signed batch whose readings were reordered or thinned after signing fails.
        let b = SignedBatch::sign(&k, readings(&k, 1, 4)).unwrap();
        let mut t = b.clone();
        t.readings.remove(3);
        assert_eq!(t.verify(&k.public_key()), Err(BatchError::Sign(SignError::Invalid)));
        let mut t = b.clone();
        t.readings.remove(1);
        assert!(matches!(t.verify(&k.public_key()), Err(BatchError::NotConsecutive { .. })));
        // Invalid readings cannot be signed.
        let mut nan = readings(&k, 1, 2);
        nan[1].value = Value::Float(f64::NAN);
        assert_eq!(SignedBatch::sign(&k, nan), Err(BatchError::Decode(DecodeError::NotANumber)));
    }

    #[test]
    fn tampered_memberships_fail() {
        for p in [false, true] {
            let k = key(p);
            let pk = k.public_key();
            let b = SignedBatch::sign(&k, readings(&k, 100, 11)).unwrap();
            let r = &b.readings[6];
            let m = b.batch_proof(6).unwrap();
            assert_eq!(m, b.membership(6).unwrap());
            m.verify(&pk, r).unwrap();
            let variants = [
                BatchMembership { first_seq: 101, index: 5, ..m.clone() },
                BatchMembership { count: 12, ..m.clone() },
                BatchMembership { count: 10, ..m.clone() },
                BatchMembership { count: 0, ..m.clone() },
                BatchMembership { count: u32::MAX, ..m.clone() },
                BatchMembership { index: 7, first_seq: 99, ..m.clone() },
                BatchMembership { first_seq: u64::MAX, ..m.clone() },
                BatchMembership { proof: m.proof[1..].to_vec(), ..m.clone() },
                BatchMembership { proof: vec![[0; 32]; 64], ..m.clone() },
                BatchMembership { proof: vec![], ..m.clone() },
            ];
            for v in variants {
                assert!(v.verify(&pk, r).is_err(), "{v:?}");
            }
            let mut t = m.clone();
            t.proof[0][0] ^= 1;
            assert!(t.verify(&pk, r).is_err());
            let mut t = m.clone();
            let mut sig = t.signature.encode();
            sig[64] ^= 1;
            t.signature = Signature::decode(&sig).unwrap();
            assert!(t.verify(&pk, r).is_err());
            // Another key, the same reading with another value, a reading of another device.
            assert_eq!(m.verify(&key(!p).public_key(), r), Err(BatchError::WrongDevice));
            let other = key(!p);
            let mut foreign = r.clone();
            foreign.device = other.public_key().device_id();
            assert_eq!(m.verify(&pk, &foreign), Err(BatchError::WrongDevice));
            assert!(b.batch_proof(11).is_err());
        }
    }

    #[test]
    fn random_wire_bytes_never_panic() {
        let k = key(false);
        let s = SignedReading::sign(&k, readings(&k, 5, 1).remove(0)).unwrap().encode();
        let b = SignedBatch::sign(&k, readings(&k, 5, 3)).unwrap();
        let be = b.encode();
        let ev = Evidence::Batch(b.batch_proof(1).unwrap()).encode();
        let single = Evidence::Single(b.signature).encode();
        let bases = [s, be, ev, single];
        let mut rng = crate::reading::tests::XorShift(0x0bad_5eed_1234_5678);
        let mut accepted = 0usize;
        for i in 0..40_000 {
            let mut x = if i % 5 == 0 {
                let n = (rng.next() % 300) as usize;
                rng.bytes(n)
            } else {
                bases[i % bases.len()].clone()
            };
            for _ in 0..(rng.next() % 4) {
                if x.is_empty() {
                    break;
                }
                let pos = (rng.next() as usize) % x.len();
                x[pos] ^= rng.next() as u8 | 1;
            }
            if i % 3 == 0 {
                let n = (rng.next() as usize) % (x.len() + 1);
                x.truncate(n);
            }
            if let Ok(d) = SignedReading::decode(&x) {
                accepted += 1;
                assert_eq!(d.encode(), x);
                let _ = d.verify(&k.public_key());
            }
            if let Ok(d) = SignedBatch::decode(&x) {
                accepted += 1;
                assert_eq!(d.encode(), x);
                let _ = d.verify(&k.public_key());
                let _ = d.batch_proof(1);
            }
            if let Ok(d) = Evidence::decode(&x) {
                accepted += 1;
                assert_eq!(d.encode(), x);
                let _ = d.verify(&k.public_key(), &b.readings[1]);
            }
        }
        assert!(accepted > 0);
        // Counts over the limit are refused before anything is read.
        let mut over = vec![b'B'];
        over.extend_from_slice(&(MAX_BATCH as u16 + 1).to_be_bytes());
        assert_eq!(SignedBatch::decode(&over), Err(DecodeError::TooMany(MAX_BATCH + 1)));
        assert_eq!(SignedBatch::decode(b"R"), Err(DecodeError::UnknownTag(b'R')));
        assert_eq!(SignedReading::decode(&[]), Err(DecodeError::Truncated));
    }

    /// Found by `fuzz/` (target `submission`): `'B' 0000 | signature` decoded as a batch of no
    /// readings, although the format allows 1 to 4096.
    #[test]
    fn an_empty_batch_does_not_decode() {
        let mut b = vec![b'B', 0, 0];
        b.extend_from_slice(&key(false).sign(&[0; 32]).encode());
        assert_eq!(SignedBatch::decode(&b), Err(DecodeError::EmptyBatch));
        let empty = SignedBatch { readings: vec![], signature: Signature::decode(&b[3..]).unwrap() };
        assert_eq!(SignedBatch::decode(&empty.encode()), Err(DecodeError::EmptyBatch));
    }
}
