//! bitmote-device: what runs on the microcontroller.
//!
//! `#![no_std]` with `alloc`: the canonical binary encoding of sensor readings
//! ([`reading`]), BIP340 and P-256 keys and signatures ([`sign`]), single and batch
//! signing ([`batch`]), and the RFC 9162 Merkle primitives ([`merkle`]) that the
//! gateway's log and every verifier share. The `std` feature adds
//! `std::error::Error` impls, key generation from the OS RNG and the global
//! secp256k1 context (gateways and verifiers should enable it).
//!
//! # Wire format (v1)
//!
//! Other implementations (C on an ESP32, a secure element's firmware) interoperate
//! through the following; all integers are big-endian, `||` is concatenation.
//!
//! **Hashes.** `SHA-256`; the tagged hash of BIP340,
//! `TH(tag, x) = SHA-256(SHA-256(tag) || SHA-256(tag) || x)` with ASCII tags.
//!
//! **Public key** (33 or 34 bytes): `0x01 || x[32]` (BIP340 x-only secp256k1 key) or
//! `0x02 || sec1[33]` (P-256, SEC1 compressed `0x02/0x03 || x`; the only form
//! accepted). Hex in text.
//!
//! **Device id** (32 bytes): `TH("bitmote/device/v1", public key encoding)`.
//!
//! **Reading** (63 bytes + a payload):
//! ```text
//! 0x01                      version
//! device      [32]          device id
//! seq         u64           per-device sequence number
//! timestamp   u64           unix milliseconds
//! sensor      u16           sensor type code (reading::sensor)
//! unit        u16           unit code (reading::unit)
//! tag         u8, then:
//!   0x01  mantissa i64, exponent i8       value = mantissa × 10^exponent
//!   0x02  f64 bits u64                    IEEE 754 binary64, NaN refused
//!   0x03  len u16 (<= 1024), bytes[len]   opaque payload
//! ```
//! Decoders refuse another version or tag, truncation, trailing bytes, a longer
//! payload and NaN; every accepted encoding re-encodes to the same bytes.
//!
//! **Reading id** (the message of a single-reading signature):
//! `TH("bitmote/reading/v1", reading encoding)`.
//!
//! **Log leaf of a reading**: leaf data `SHA-256(reading encoding)`, leaf hash
//! `SHA-256(0x00 || SHA-256(reading encoding))` (RFC 9162 leaf hash of the digest).
//!
//! **Merkle trees**: RFC 9162 §2.1: `node = SHA-256(0x01 || left || right)`, split
//! at the largest power of two below the size, empty tree = `SHA-256("")`.
//!
//! **Batch root** (the message of a batch signature), for readings of one device
//! with consecutive sequence numbers `first_seq .. first_seq + count - 1`,
//! `1 <= count <= 4096`:
//! `TH("bitmote/batch/v1", device[32] || first_seq u64 || count u32 || root[32])`,
//! `root` = RFC 9162 root of the readings' leaf hashes in sequence order.
//!
//! **Signatures** (65 bytes): `0x01 || BIP340 sig[64]` over the 32-byte message, or
//! `0x02 || r[32] || s[32]`: ECDSA P-256 with the 32-byte message as the prehash
//! (no further hashing), `s <= n/2` (high-S is refused). This crate signs
//! deterministically (BIP340 with `aux_rand` = 32 zero bytes, RFC 6979 for P-256),
//! which the vectors below assume; verifiers accept any valid nonce.
//!
//! **Messages**:
//! ```text
//! SignedReading: 'R' | len u16 | reading[len] | signature[65]
//! SignedBatch:   'B' | count u16 (1..=4096) | (len u16 | reading[len]) × count | signature[65]
//! Evidence:      0x00 | signature[65]
//!              | 0x01 | first_seq u64 | count u32 | index u32 | n u8 (<= 64) | hash[32] × n | signature[65]
//! ```
//! `Evidence` proves one reading: its own signature, or membership in a signed
//! batch (index in the batch and the RFC 9162 inclusion proof of its leaf hash).
//!
//! # Test vector
//!
//! Secret key `01` × 32, BIP340:
//! ```text
//! public key  011b84c5567b126440995d3ed5aaba0565d71e1834604819ff9c17f5e9d5dd078f
//! device id   fd89cfba4b04a14f96d87a09207fb7fd42ddeccb1defeef377f7411ccd111aff
//! reading     seq 1, time 1700000000000, temperature (1) in °C (1), 2153 × 10^-2:
//!             01 fd89cfba4b04a14f96d87a09207fb7fd42ddeccb1defeef377f7411ccd111aff
//!             0000000000000001 0000018bcfe56800 0001 0001 01 0000000000000869 fe
//! reading id  ebc3be9b2ada6c1348435807cdb1f42407c6e5892fd704038b59e93add2b2b0e
//! signature   01 87b5807b599725fc416637f8c56d59be1245dd8fbc81c18fa35138584d678fa5
//!                4d5165cd306faceb2e189d2bb1e76f83b898c4a9a2c9afb53b070e313fe7fc2e
//! ```
//! Same secret, P-256: public key
//! `02026ff03b949241ce1dadd43519e6960e0a85b41a69a05c328103aa2bce1594ca16`, device id
//! `31709f035d5a4639c1aa413c3c7b5b6c57b18de8508c106204f8164c8012a131`. More vectors
//! (a batch, P-256 signatures) are in this crate's tests.
#![no_std]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod batch;
pub mod merkle;
pub mod reading;
pub mod sign;

pub use batch::{BatchError, BatchMembership, BatchRoot, Evidence, SignedBatch, SignedReading, MAX_BATCH};
pub use merkle::{Hash, MerkleError, MerkleFrontier};
pub use reading::{DecodeError, DeviceId, Reading, Value};
pub use sign::{PublicKey, SignError, Signature, SigningKey};

use alloc::string::String;
use alloc::vec::Vec;
use sha2::{Digest, Sha256};

/// SHA-256.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// BIP340-style tagged hash over the concatenation of `parts`.
pub fn tagged_hash(tag: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let t = Sha256::digest(tag);
    let mut h = Sha256::new();
    h.update(t);
    h.update(t);
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// Lowercase hex.
pub fn hex_encode(b: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(D[(x >> 4) as usize] as char);
        s.push(D[(x & 15) as usize] as char);
    }
    s
}

/// Parse hex (either case); `None` if invalid.
pub fn hex_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if b.len() & 1 == 1 {
        return None;
    }
    let nib = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    b.chunks(2).map(|p| Some(nib(p[0])? << 4 | nib(p[1])?)).collect()
}

/// Fixed vectors for other implementations. The expected bytes are written out
/// from the format description; the hashes and signatures were computed by an
/// independent implementation (Python: hashlib, textbook curve arithmetic,
/// the BIP340 reference algorithm with `aux_rand` = 32 zero bytes, RFC 6979).
#[cfg(test)]
mod vectors {
    use super::*;
    use crate::reading::{sensor, unit};
    use alloc::string::ToString;
    use alloc::vec;

    fn h(s: &str) -> Vec<u8> {
        hex_decode(s).unwrap()
    }

    fn reading(device: DeviceId, i: u64) -> Reading {
        Reading {
            device,
            seq: 1 + i,
            timestamp_ms: 1_700_000_000_000 + 1000 * i,
            sensor: sensor::TEMPERATURE,
            unit: unit::CELSIUS,
            value: Value::Scaled { mantissa: 2153 + i as i64, exponent: -2 },
        }
    }

    #[test]
    fn schnorr_key_reading_and_signature() {
        let k = SigningKey::schnorr_from_secret(&[1; 32]).unwrap();
        let pk = k.public_key();
        assert_eq!(pk.encode(), h("011b84c5567b126440995d3ed5aaba0565d71e1834604819ff9c17f5e9d5dd078f"));
        let dev = pk.device_id();
        assert_eq!(dev.to_string(), "fd89cfba4b04a14f96d87a09207fb7fd42ddeccb1defeef377f7411ccd111aff");
        assert_eq!(dev.0, tagged_hash(b"bitmote/device/v1", &[&pk.encode()]));

        let r = reading(dev, 0);
        let mut want = vec![0x01]; // version
        want.extend_from_slice(&dev.0); // device id
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1]); // seq 1
        want.extend_from_slice(&[0, 0, 0x01, 0x8b, 0xcf, 0xe5, 0x68, 0x00]); // 1_700_000_000_000 ms
        want.extend_from_slice(&[0, 1]); // sensor: temperature
        want.extend_from_slice(&[0, 1]); // unit: °C
        want.push(0x01); // scaled integer
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x08, 0x69]); // 2153
        want.push(0xfe); // exponent -2
        let e = r.encode();
        assert_eq!(e, want);
        assert_eq!(e.len(), 63);
        assert_eq!(Reading::decode(&want).unwrap(), r);
        assert_eq!(hex_encode(&r.id()), "ebc3be9b2ada6c1348435807cdb1f42407c6e5892fd704038b59e93add2b2b0e");
        assert_eq!(hex_encode(&r.leaf()), "938af7c8f0b45c1ee3f16840f678a0c0ecffecccc5398820cdd5241c358a83ed");
        assert_eq!(hex_encode(&r.leaf_hash()), "b1f08967fe60e9347d86fc6ab5e7e72f5df094fa4a84fa08a8f1f751dfb45cc8");

        let want_sig = "87b5807b599725fc416637f8c56d59be1245dd8fbc81c18fa35138584d678fa5\
                        4d5165cd306faceb2e189d2bb1e76f83b898c4a9a2c9afb53b070e313fe7fc2e";
        let s = SignedReading::sign(&k, r.clone()).unwrap();
        assert_eq!(s.signature, Signature::Schnorr(h(want_sig).try_into().unwrap()));
        s.verify(&pk).unwrap();
        // The wire message: 'R', length 63, the reading, type 0x01 and the signature.
        let mut wire = vec![b'R', 0, 63];
        wire.extend_from_slice(&want);
        wire.push(0x01);
        wire.extend_from_slice(&h(want_sig));
        assert_eq!(s.encode(), wire);
        assert_eq!(SignedReading::decode(&wire).unwrap(), s);
    }

    #[test]
    fn schnorr_batch() {
        let k = SigningKey::schnorr_from_secret(&[1; 32]).unwrap();
        let dev = k.public_key().device_id();
        let rs: Vec<Reading> = (0..3).map(|i| reading(dev, i)).collect();
        let leaves: Vec<Hash> = rs.iter().map(Reading::leaf_hash).collect();
        assert_eq!(hex_encode(&merkle::root(&leaves)), "5dffd1e6858ae299cdb8172127da8534dfbf5b76ff4ee876821316daa21fc96a");
        assert_eq!(hex_encode(&batch::batch_root(&rs).unwrap()), "1ab36b067dd168ee66e82f6cbf1568b5545cb7ee5413053f2b4ed1a91d6723e8");
        let b = SignedBatch::sign(&k, rs).unwrap();
        assert_eq!(
            b.signature.to_hex(),
            "01ed627cf7220b79e87b4e889175d590337327b7d1010cd6b62587301f50060809\
             46609fc1fb7c370a154723ebed1e3eff1545b3ccfb45538f76af7f7949141551"
        );
        let m = b.batch_proof(2).unwrap();
        assert_eq!((m.first_seq, m.count, m.index), (1, 3, 2));
        assert_eq!(m.proof, vec![<[u8; 32]>::try_from(h("e07b9c7e8ec84f5beb6f4490d2dbf2e33a006dbd06293f0ab9807ac878205400")).unwrap()]);
        m.verify(&k.public_key(), &b.readings[2]).unwrap();
        // 'B', count 3, then each reading with its u16 length, then the signature.
        let e = b.encode();
        assert_eq!(e.len(), 1 + 2 + 3 * (2 + 63) + 65);
        assert_eq!(e[..5], [b'B', 0, 3, 0, 63]);
    }

    #[test]
    fn p256_key_and_signature() {
        let k = SigningKey::p256_from_secret(&[1; 32]).unwrap();
        let pk = k.public_key();
        assert_eq!(pk.encode(), h("02026ff03b949241ce1dadd43519e6960e0a85b41a69a05c328103aa2bce1594ca16"));
        let dev = pk.device_id();
        assert_eq!(dev.to_string(), "31709f035d5a4639c1aa413c3c7b5b6c57b18de8508c106204f8164c8012a131");
        let r = reading(dev, 0);
        assert_eq!(hex_encode(&r.id()), "b780364fd31531d0467f50736f4b1599a762ceecb909cb09c7914d8a62a3dca8");
        let s = SignedReading::sign(&k, r).unwrap();
        assert_eq!(
            s.signature.to_hex(),
            "02d8cf699fd73949398868da7f28dedd67519edf8f3742083f2df3e62720b02b0d\
             42178a0c7098d1897c4addf9e6663cd6b4d54723d4ef17e5532f92442aa778f5"
        );
        s.verify(&pk).unwrap();
    }

    #[test]
    fn tagged_hash_and_hex_helpers() {
        // TH(tag, x) = SHA-256(SHA-256(tag) || SHA-256(tag) || x), parts concatenated.
        let t = sha256(b"bitmote/reading/v1");
        let mut pre = Vec::new();
        pre.extend_from_slice(&t);
        pre.extend_from_slice(&t);
        pre.extend_from_slice(b"abc");
        assert_eq!(tagged_hash(b"bitmote/reading/v1", &[b"a", b"bc"]), sha256(&pre));
        assert_eq!(hex_encode(&[0x00, 0xab, 0xff]), "00abff");
        assert_eq!(hex_decode("00ABff"), Some(vec![0x00, 0xab, 0xff]));
        for bad in ["0", "zz", "0g", "é0"] {
            assert_eq!(hex_decode(bad), None, "{bad}");
        }
        assert!("fd89".parse::<DeviceId>().is_err());
    }
}
