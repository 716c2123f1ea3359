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
//! Wire formats:
//! ```text
//! SignedReading: 'R' | len u16 BE | reading | signature[65]
//! SignedBatch:   'B' | count u16 BE | (len u16 BE | reading) × count | signature[65]
//! Evidence:      0x00 | signature[65]
//!              | 0x01 | first_seq u64 | count u32 | index u32 | n u8 | hash[32] × n | signature[65]
//! ```

use alloc::vec::Vec;
use core::fmt;

use crate::merkle::{self, Hash};
use crate::reading::{DecodeError, DeviceId, Reader, Reading, MAX_ENCODED};
use crate::sign::{PublicKey, SignError, Signature, SigningKey, SIGNATURE_LEN};
use crate::tagged_hash;

/// Most readings in one batch.
pub const MAX_BATCH: usize = 4096;

/// Why a batch or signed reading is not acceptable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchError {
    Empty,
    TooMany(usize),
    /// A reading names another device than the batch's first reading / the key.
    WrongDevice,
    /// Sequence numbers are not consecutive.
    NotConsecutive { expected: u64, got: u64 },
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

/// Leaf of a reading in a batch tree (and in the gateway's log).
pub fn reading_leaf_hash(r: &Reading) -> Hash {
    merkle::leaf_hash(&r.digest())
}

/// The message a batch signature signs.
pub fn batch_message(device: &DeviceId, first_seq: u64, count: u32, root: &Hash) -> [u8; 32] {
    tagged_hash(b"bitmote/batch/v1", &[&device.0, &first_seq.to_be_bytes(), &count.to_be_bytes(), root])
}

/// One reading with its own signature over [`Reading::id`].
#[derive(Clone, Debug, PartialEq)]
pub struct SignedReading {
    pub reading: Reading,
    pub signature: Signature,
}

impl SignedReading {
    pub fn sign(key: &SigningKey, reading: Reading) -> Result<Self, BatchError> {
        if reading.device != key.public_key().device_id() {
            return Err(BatchError::WrongDevice);
        }
        reading.validate()?;
        let signature = key.sign(&reading.id());
        Ok(SignedReading { reading, signature })
    }

    pub fn verify(&self, key: &PublicKey) -> Result<(), BatchError> {
        if self.reading.device != key.device_id() {
            return Err(BatchError::WrongDevice);
        }
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
        if r.u8()? != b'R' {
            return Err(DecodeError::UnknownTag(b[0]));
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
fn batch_shape(readings: &[Reading]) -> Result<([u8; 32], Vec<Hash>), BatchError> {
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
    pub fn sign(key: &SigningKey, readings: Vec<Reading>) -> Result<Self, BatchError> {
        let (msg, _) = batch_shape(&readings)?;
        if readings[0].device != key.public_key().device_id() {
            return Err(BatchError::WrongDevice);
        }
        Ok(SignedBatch { signature: key.sign(&msg), readings })
    }

    pub fn verify(&self, key: &PublicKey) -> Result<(), BatchError> {
        let (msg, _) = batch_shape(&self.readings)?;
        if self.readings[0].device != key.device_id() {
            return Err(BatchError::WrongDevice);
        }
        Ok(key.verify(&msg, &self.signature)?)
    }

    /// Evidence that reading `index` belongs to this signed batch.
    pub fn membership(&self, index: usize) -> Result<BatchMembership, BatchError> {
        let (_, leaves) = batch_shape(&self.readings)?;
        let proof = merkle::inclusion_proof(&leaves, index as u64).map_err(BatchError::Merkle)?;
        Ok(BatchMembership {
            first_seq: self.readings[0].seq,
            count: self.readings.len() as u32,
            index: index as u32,
            proof,
            signature: self.signature,
        })
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
        if r.u8()? != b'B' {
            return Err(DecodeError::UnknownTag(b[0]));
        }
        let n = r.u16()? as usize;
        if n > MAX_BATCH {
            return Err(DecodeError::TooMany(n));
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
    pub fn verify(&self, key: &PublicKey, reading: &Reading) -> Result<(), BatchError> {
        if reading.device != key.device_id() {
            return Err(BatchError::WrongDevice);
        }
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
}
