//! bitmote-device: what runs on the microcontroller.
//!
//! `#![no_std]` with `alloc`: the canonical binary encoding of sensor readings
//! ([`reading`]), BIP340 and P-256 keys and signatures ([`sign`]), single and batch
//! signing ([`batch`]), and the RFC 9162 Merkle primitives ([`merkle`]) that the
//! gateway's log and every verifier share. Other implementations (C on an ESP32,
//! a secure element's firmware) interoperate through the formats documented in
//! each module; the hashes are plain SHA-256 and BIP340-style tagged hashes
//! (`SHA-256(SHA-256(tag) || SHA-256(tag) || data)`).
#![no_std]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod batch;
pub mod merkle;
pub mod reading;
pub mod sign;

pub use batch::{BatchError, BatchMembership, Evidence, SignedBatch, SignedReading};
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
    if b.len() % 2 != 0 {
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
