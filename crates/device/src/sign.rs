//! Device keys and signatures: BIP340 Schnorr over secp256k1, and ECDSA over P-256
//! (the curve of common secure elements: ATECC608, TPMs, phone keystores).
//!
//! Both sign a 32-byte message (a tagged hash); P-256 signs it as an ECDSA prehash.
//! Encodings: public key `0x01 || x-only[32]` or `0x02 || SEC1-compressed[33]`;
//! signature `0x01 || sig[64]` (BIP340) or `0x02 || r[32] || s[32]` (P-256, low-S
//! only, on signing and on verification, so signatures are not malleable).
//!
//! - BIP340: the 32-byte message is signed as is, deterministically
//!   (`sign_schnorr_no_aux_rand`: libsecp256k1 with `aux_rand32 = NULL`, which is
//!   BIP340 with `aux_rand` = 32 zero bytes); any valid BIP340 signature verifies,
//!   so another implementation may add auxiliary randomness.
//! - P-256: ECDSA with the 32-byte message as the prehash (`e` = the message as a
//!   big-endian integer, no further hashing), RFC 6979 deterministic nonces, `s`
//!   normalised to `s <= n/2`. Verification refuses high-S signatures: a C
//!   implementation must normalise too (`s = n - s` if `s > n/2`).
//!
//! Secret keys are 32 bytes big-endian, `1 <= d < n` for either curve.
//! [`SigningKey::generate_schnorr`] and [`SigningKey::generate_p256`] draw one from
//! the OS (feature `std`); without `std`, the firmware supplies the secret.

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
    /// The OS random number generator failed.
    Rng,
}

impl fmt::Display for SignError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SignError::KeyTypeMismatch => write!(f, "signature type does not match the key type"),
            SignError::Invalid => write!(f, "invalid signature"),
            SignError::BadSecret => write!(f, "invalid secret key"),
            SignError::Rng => write!(f, "the system random number generator failed"),
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
            Some((&SCHNORR, k)) if k.len() == 32 => XOnlyPublicKey::from_slice(k).map(PublicKey::Schnorr).map_err(|_| DecodeError::BadKey),
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

/// Verify `sig` by `key` over the 32-byte `msg` (same as [`PublicKey::verify`]).
pub fn verify(key: &PublicKey, msg: &[u8; 32], sig: &Signature) -> Result<(), SignError> {
    key.verify(msg, sig)
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

    /// The 64 signature bytes without the type byte.
    pub fn as_bytes(&self) -> &[u8; 64] {
        match self {
            Signature::Schnorr(s) | Signature::P256(s) => s,
        }
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl FromStr for Signature {
    type Err = DecodeError;
    fn from_str(s: &str) -> Result<Self, DecodeError> {
        Signature::from_hex(s)
    }
}

impl fmt::Debug for SigningKey {
    /// Shows the public key only, never the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({})", self.public_key())
    }
}

impl SigningKey {
    /// A BIP340 key from a 32-byte secret.
    pub fn schnorr_from_secret(secret: &[u8; 32]) -> Result<Self, SignError> {
        Keypair::from_seckey_slice(&Secp256k1::signing_only(), secret).map(SigningKey::Schnorr).map_err(|_| SignError::BadSecret)
    }

    /// A P-256 key from a 32-byte secret.
    pub fn p256_from_secret(secret: &[u8; 32]) -> Result<Self, SignError> {
        p256::ecdsa::SigningKey::from_bytes(secret.into()).map(SigningKey::P256).map_err(|_| SignError::BadSecret)
    }

    /// A new BIP340 key from the OS random number generator.
    #[cfg(feature = "std")]
    pub fn generate_schnorr() -> Result<Self, SignError> {
        Self::generate_with(Self::schnorr_from_secret)
    }

    /// A new P-256 key from the OS random number generator.
    #[cfg(feature = "std")]
    pub fn generate_p256() -> Result<Self, SignError> {
        Self::generate_with(Self::p256_from_secret)
    }

    #[cfg(feature = "std")]
    fn generate_with(from: fn(&[u8; 32]) -> Result<Self, SignError>) -> Result<Self, SignError> {
        // A uniform 32-byte string is out of range with probability < 2^-32 on
        // both curves; retry rather than reduce, so the secret stays uniform.
        for _ in 0..64 {
            let mut secret = [0u8; 32];
            getrandom::getrandom(&mut secret).map_err(|_| SignError::Rng)?;
            if let Ok(k) = from(&secret) {
                return Ok(k);
            }
        }
        Err(SignError::Rng)
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
                // Fails only if RFC 6979 yields r = 0 or s = 0 (probability ~2^-256),
                // never because of the message: any 32-byte prehash is accepted.
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

    #[test]
    fn another_key_of_the_same_type_does_not_verify() {
        let msg = [9u8; 32];
        let a = [SigningKey::schnorr_from_secret(&[1; 32]).unwrap(), SigningKey::p256_from_secret(&[1; 32]).unwrap()];
        let b = [SigningKey::schnorr_from_secret(&[2; 32]).unwrap(), SigningKey::p256_from_secret(&[2; 32]).unwrap()];
        for (a, b) in a.iter().zip(b.iter()) {
            let sig = a.sign(&msg);
            assert_eq!(verify(&a.public_key(), &msg, &sig), Ok(()));
            assert_eq!(verify(&b.public_key(), &msg, &sig), Err(SignError::Invalid));
            // Signing is deterministic, and signatures print and parse as hex.
            assert_eq!(a.sign(&msg), sig);
            assert_eq!(alloc::format!("{sig}").parse::<Signature>().unwrap(), sig);
            assert_eq!(&sig.encode()[1..], sig.as_bytes());
            // Debug shows the public key, never the secret.
            let dbg = alloc::format!("{a:?}");
            assert!(dbg.contains(&alloc::format!("{}", a.public_key())));
            assert!(!dbg.contains(&crate::hex_encode(&a.secret_bytes())));
        }
        // All-zero signatures and r = 0 / s = 0 are errors, not panics.
        for k in a.iter() {
            for sig in [Signature::Schnorr([0; 64]), Signature::P256([0; 64]), Signature::P256([0xff; 64])] {
                assert!(k.public_key().verify(&msg, &sig).is_err());
            }
        }
    }

    #[test]
    fn uncompressed_and_hybrid_p256_keys_are_refused() {
        let [_, k] = keys();
        let PublicKey::P256(vk) = k.public_key() else { unreachable!() };
        let mut unc = alloc::vec![0x02];
        unc.extend_from_slice(vk.to_encoded_point(false).as_bytes());
        assert_eq!(PublicKey::decode(&unc), Err(DecodeError::BadKey));
        let mut other_parity = k.public_key().encode();
        other_parity[1] ^= 1; // 0x02 <-> 0x03: another valid point, another key
        assert_ne!(PublicKey::decode(&other_parity).ok(), Some(k.public_key()));
        assert!("zz".parse::<PublicKey>().is_err());
        assert!("".parse::<PublicKey>().is_err());
    }

    #[cfg(feature = "std")]
    #[test]
    fn generated_keys_are_fresh_and_work() {
        let a = SigningKey::generate_schnorr().unwrap();
        let b = SigningKey::generate_schnorr().unwrap();
        let c = SigningKey::generate_p256().unwrap();
        assert_ne!(a.secret_bytes(), b.secret_bytes());
        assert!(matches!(c, SigningKey::P256(_)));
        for k in [a, c] {
            let sig = k.sign(&[5; 32]);
            k.public_key().verify(&[5; 32], &sig).unwrap();
        }
    }

    #[test]
    fn random_key_and_signature_bytes_never_panic() {
        let mut rng = crate::reading::tests::XorShift(0x1234_5678_9abc_def1);
        for i in 0..5_000 {
            let len = [0, 1, 33, 34, 64, 65, 66][i % 7];
            let mut b = rng.bytes(len);
            if let Some(t) = b.first_mut() {
                *t %= 4;
            }
            if let Ok(k) = PublicKey::decode(&b) {
                assert_eq!(k.encode(), b);
            }
            if let Ok(s) = Signature::decode(&b) {
                assert_eq!(s.encode().as_slice(), b.as_slice());
                let _ = SigningKey::schnorr_from_secret(&[1; 32]).unwrap().public_key().verify(&[0; 32], &s);
                let _ = SigningKey::p256_from_secret(&[1; 32]).unwrap().public_key().verify(&[0; 32], &s);
            }
        }
    }
}
