//! Device keys and signatures: BIP340 Schnorr over secp256k1, and ECDSA over P-256
//! (the curve of common secure elements: ATECC608, TPMs, phone keystores).
//!
//! Both sign a 32-byte message (a tagged hash); P-256 signs it as an ECDSA prehash.
//! Encodings: public key `0x01 || x-only[32]` or `0x02 || SEC1-compressed[33]`;
//! signature `0x01 || sig[64]` (BIP340) or `0x02 || r[32] || s[32]` (P-256, low-S
//! only, on signing and on verification, so signatures are not malleable).

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::str::FromStr;

use p256::ecdsa::signature::hazmat::{PrehashSigner, PrehashVerifier};
use secp256k1::{schnorr, Keypair, Message, Secp256k1, XOnlyPublicKey};

use crate::reading::{DecodeError, DeviceId};
use crate::{hex_decode, hex_encode, tagged_hash};

const SCHNORR: u8 = 0x01;
const P256: u8 = 0x02;
/// Encoded length of a [`Signature`].
pub const SIGNATURE_LEN: usize = 65;

/// A device's public key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum PublicKey {
    Schnorr(XOnlyPublicKey),
    P256(p256::ecdsa::VerifyingKey),
}

/// A signature of either kind.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Signature {
    Schnorr([u8; 64]),
    P256([u8; 64]),
}

/// A device's secret key.
#[derive(Clone)]
pub enum SigningKey {
    Schnorr(Keypair),
    P256(p256::ecdsa::SigningKey),
}

/// Why a signature does not verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignError {
    /// A Schnorr signature for a P-256 key or the reverse.
    KeyTypeMismatch,
    /// Not a valid signature of this message by this key.
    Invalid,
    /// A secret key out of range.
    BadSecret,
}

impl fmt::Display for SignError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SignError::KeyTypeMismatch => write!(f, "signature type does not match the key type"),
            SignError::Invalid => write!(f, "invalid signature"),
            SignError::BadSecret => write!(f, "invalid secret key"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for SignError {}

impl PublicKey {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(34);
        match self {
            PublicKey::Schnorr(k) => {
                v.push(SCHNORR);
                v.extend_from_slice(&k.serialize());
            }
            PublicKey::P256(k) => {
                v.push(P256);
                v.extend_from_slice(k.to_encoded_point(true).as_bytes());
            }
        }
        v
    }

    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        match b.split_first() {
            Some((&SCHNORR, k)) if k.len() == 32 => {
                XOnlyPublicKey::from_slice(k).map(PublicKey::Schnorr).map_err(|_| DecodeError::BadKey)
            }
            Some((&P256, k)) if k.len() == 33 => {
                let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(k).map_err(|_| DecodeError::BadKey)?;
                // Only the compressed form, so that a key has exactly one encoding (and one device id).
                if key.to_encoded_point(true).as_bytes() != k {
                    return Err(DecodeError::BadKey);
                }
                Ok(PublicKey::P256(key))
            }
            _ => Err(DecodeError::BadKey),
        }
    }

    /// The device id this key is enrolled under.
    pub fn device_id(&self) -> DeviceId {
        DeviceId(tagged_hash(b"bitmote/device/v1", &[&self.encode()]))
    }

    /// Verify `sig` over the 32-byte `msg`.
    pub fn verify(&self, msg: &[u8; 32], sig: &Signature) -> Result<(), SignError> {
        match (self, sig) {
            (PublicKey::Schnorr(k), Signature::Schnorr(s)) => {
                let s = schnorr::Signature::from_slice(s).map_err(|_| SignError::Invalid)?;
                // With std, one global context; without, a context per call (building one
                // costs more than a verification, so gateways must use std).
                #[cfg(feature = "std")]
                let ctx = secp256k1::SECP256K1;
                #[cfg(not(feature = "std"))]
                let ctx = &Secp256k1::verification_only();
                ctx.verify_schnorr(&s, &Message::from_digest(*msg), k).map_err(|_| SignError::Invalid)
            }
            (PublicKey::P256(k), Signature::P256(s)) => {
                let s = p256::ecdsa::Signature::from_slice(s).map_err(|_| SignError::Invalid)?;
                if s.normalize_s().is_some() {
                    return Err(SignError::Invalid); // high-S: malleated
                }
                k.verify_prehash(msg, &s).map_err(|_| SignError::Invalid)
            }
            _ => Err(SignError::KeyTypeMismatch),
        }
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex_encode(&self.encode()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = DecodeError;
    fn from_str(s: &str) -> Result<Self, DecodeError> {
        PublicKey::decode(&hex_decode(s).ok_or(DecodeError::BadHex)?)
    }
}

impl Signature {
    pub fn encode(&self) -> [u8; SIGNATURE_LEN] {
        let mut out = [0u8; SIGNATURE_LEN];
        let (t, s) = match self {
            Signature::Schnorr(s) => (SCHNORR, s),
            Signature::P256(s) => (P256, s),
        };
        out[0] = t;
        out[1..].copy_from_slice(s);
        out
    }

    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        if b.len() != SIGNATURE_LEN {
            return Err(DecodeError::BadSignature);
        }
        let mut s = [0u8; 64];
        s.copy_from_slice(&b[1..]);
        match b[0] {
            SCHNORR => Ok(Signature::Schnorr(s)),
            P256 => Ok(Signature::P256(s)),
            _ => Err(DecodeError::BadSignature),
        }
    }

    pub fn to_hex(&self) -> String {
        hex_encode(&self.encode())
    }

    pub fn from_hex(s: &str) -> Result<Self, DecodeError> {
        Signature::decode(&hex_decode(s).ok_or(DecodeError::BadHex)?)
    }
}

impl SigningKey {
    /// A BIP340 key from a 32-byte secret.
    pub fn schnorr_from_secret(secret: &[u8; 32]) -> Result<Self, SignError> {
        Keypair::from_seckey_slice(&Secp256k1::signing_only(), secret)
            .map(SigningKey::Schnorr)
            .map_err(|_| SignError::BadSecret)
    }

    /// A P-256 key from a 32-byte secret.
    pub fn p256_from_secret(secret: &[u8; 32]) -> Result<Self, SignError> {
        p256::ecdsa::SigningKey::from_bytes(secret.into()).map(SigningKey::P256).map_err(|_| SignError::BadSecret)
    }

    /// The 32-byte secret (for storing a key file).
    pub fn secret_bytes(&self) -> [u8; 32] {
        match self {
            SigningKey::Schnorr(k) => k.secret_bytes(),
            SigningKey::P256(k) => k.to_bytes().into(),
        }
    }

    pub fn public_key(&self) -> PublicKey {
        match self {
            SigningKey::Schnorr(k) => PublicKey::Schnorr(k.x_only_public_key().0),
            SigningKey::P256(k) => PublicKey::P256(*k.verifying_key()),
        }
    }

    /// Sign a 32-byte message (deterministic: BIP340 without aux randomness, RFC 6979 for P-256).
    pub fn sign(&self, msg: &[u8; 32]) -> Signature {
        match self {
            SigningKey::Schnorr(k) => {
                #[cfg(feature = "std")]
                let ctx = secp256k1::SECP256K1;
                #[cfg(not(feature = "std"))]
                let ctx = &Secp256k1::signing_only();
                let s = ctx.sign_schnorr_no_aux_rand(&Message::from_digest(*msg), k);
                Signature::Schnorr(*s.as_ref())
            }
            SigningKey::P256(k) => {
                let s: p256::ecdsa::Signature = k.sign_prehash(msg).expect("a 32-byte prehash is always signable");
                let s = s.normalize_s().unwrap_or(s);
                let mut b = [0u8; 64];
                b.copy_from_slice(&s.to_bytes());
                Signature::P256(b)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> [SigningKey; 2] {
        [SigningKey::schnorr_from_secret(&[1; 32]).unwrap(), SigningKey::p256_from_secret(&[1; 32]).unwrap()]
    }

    #[test]
    fn sign_verify_and_tamper_for_both_curves() {
        let msg = [42u8; 32];
        for k in keys() {
            let pk = k.public_key();
            let sig = k.sign(&msg);
            pk.verify(&msg, &sig).unwrap();
            let mut other = msg;
            other[0] ^= 1;
            assert_eq!(pk.verify(&other, &sig), Err(SignError::Invalid));
            let mut bad = sig.encode();
            bad[10] ^= 1;
            assert!(pk.verify(&msg, &Signature::decode(&bad).unwrap()).is_err());
            // Encodings round-trip.
            assert_eq!(PublicKey::decode(&pk.encode()).unwrap(), pk);
            assert_eq!(alloc::format!("{pk}").parse::<PublicKey>().unwrap(), pk);
            assert_eq!(Signature::from_hex(&sig.to_hex()).unwrap(), sig);
            // Reconstructing from the secret gives the same key.
            let again = match k {
                SigningKey::Schnorr(_) => SigningKey::schnorr_from_secret(&k.secret_bytes()).unwrap(),
                SigningKey::P256(_) => SigningKey::p256_from_secret(&k.secret_bytes()).unwrap(),
            };
            assert_eq!(again.public_key(), pk);
        }
        let [s, p] = keys();
        assert_eq!(s.public_key().verify(&msg, &p.sign(&msg)), Err(SignError::KeyTypeMismatch));
        assert_ne!(s.public_key().device_id(), p.public_key().device_id());
    }

    #[test]
    fn p256_high_s_signatures_are_refused() {
        let [_, k] = keys();
        let msg = [7u8; 32];
        let Signature::P256(b) = k.sign(&msg) else { unreachable!() };
        let s = p256::ecdsa::Signature::from_slice(&b).unwrap();
        // s' = n - s is the malleated twin of a valid signature.
        let (r, s_) = s.split_scalars();
        let high = p256::ecdsa::Signature::from_scalars(r, -*s_).unwrap();
        let mut hb = [0u8; 64];
        hb.copy_from_slice(&high.to_bytes());
        assert_eq!(k.public_key().verify(&msg, &Signature::P256(hb)), Err(SignError::Invalid));
    }

    #[test]
    fn bad_keys_and_signatures_are_errors() {
        assert!(PublicKey::decode(&[]).is_err());
        let mut x_too_big = [0xffu8; 33];
        x_too_big[0] = 0x01; // x-only key with x >= p
        assert_eq!(PublicKey::decode(&x_too_big), Err(DecodeError::BadKey));
        let mut bad_sec1 = [0u8; 34];
        bad_sec1[0] = 0x02;
        bad_sec1[1] = 0x05; // not a SEC1 compressed-point tag
        assert_eq!(PublicKey::decode(&bad_sec1), Err(DecodeError::BadKey));
        assert_eq!(PublicKey::decode(&[3; 34]), Err(DecodeError::BadKey));
        assert_eq!(Signature::decode(&[1; 64]), Err(DecodeError::BadSignature));
        assert_eq!(Signature::decode(&[9; 65]), Err(DecodeError::BadSignature));
        assert!(SigningKey::schnorr_from_secret(&[0; 32]).is_err());
        assert!(SigningKey::p256_from_secret(&[0xff; 32]).is_err());
    }
}
