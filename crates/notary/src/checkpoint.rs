//! Signed checkpoints: the log's size and root in the C2SP `tlog-checkpoint` format,
//! signed as a C2SP `signed-note` with Ed25519.
//!
//! ```text
//! <origin>
//! <tree size>
//! <base64 root>
//!
//! — <key name> <base64(key id[4] || signature[64])>
//! ```
//! The key id is the first 4 bytes of SHA-256(name || "\n" || 0x01 || public key);
//! the verifier key is published as `<name>+<key id hex>+<base64(0x01 || public key)>`.
//! A checkpoint lets anyone hold the gateway to one history: two signed
//! checkpoints that no consistency proof joins are evidence of a forked log.

use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::{Signer, Verifier};
use sha2::{Digest, Sha256};

/// Errors of checkpoint signing and verification.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckpointError {
    #[error("malformed signed note: {0}")]
    Malformed(String),
    #[error("malformed verifier key: {0}")]
    BadKey(String),
    #[error("no signature by key {0} on the note")]
    NotSigned(String),
    #[error("the note's signature by {0} is invalid")]
    BadSignature(String),
    #[error("checkpoint key file {0}: {1}")]
    KeyFile(String, String),
}

/// A log checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: [u8; 32],
}

impl Checkpoint {
    /// The note body.
    pub fn body(&self) -> String {
        format!("{}\n{}\n{}\n", self.origin, self.size, B64.encode(self.root))
    }
}

fn key_id(name: &str, pk: &[u8; 32]) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([0x01]);
    h.update(pk);
    let d = h.finalize();
    [d[0], d[1], d[2], d[3]]
}

/// The gateway's checkpoint signing key.
pub struct CheckpointSigner {
    name: String,
    key: ed25519_dalek::SigningKey,
}

impl CheckpointSigner {
    pub fn from_seed(name: &str, seed: [u8; 32]) -> Self {
        CheckpointSigner { name: name.to_string(), key: ed25519_dalek::SigningKey::from_bytes(&seed) }
    }

    /// Load the key from `path` (32-byte hex seed), creating it (mode 0600) on first use.
    pub fn load_or_create(path: &Path, name: &str) -> Result<Self, CheckpointError> {
        let err = |e: String| CheckpointError::KeyFile(path.display().to_string(), e);
        match std::fs::read_to_string(path) {
            Ok(t) => {
                let seed: [u8; 32] = hex::decode(t.trim()).ok().and_then(|v| v.try_into().ok()).ok_or_else(|| err("not a 32-byte hex seed".into()))?;
                Ok(Self::from_seed(name, seed))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut seed = [0u8; 32];
                getrandom::getrandom(&mut seed).map_err(|e| err(e.to_string()))?;
                bitmote_chain::wallet::write_secret(path, hex::encode(seed).as_bytes()).map_err(|e| err(e.to_string()))?;
                Ok(Self::from_seed(name, seed))
            }
            Err(e) => Err(err(e.to_string())),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The verifier key string to publish.
    pub fn verifier_key(&self) -> String {
        let pk = self.key.verifying_key().to_bytes();
        format!("{}+{}+{}", self.name, hex::encode(key_id(&self.name, &pk)), B64.encode([&[0x01][..], &pk].concat()))
    }

    /// Sign a checkpoint of this log (origin = the key name).
    pub fn sign(&self, size: u64, root: [u8; 32]) -> String {
        let cp = Checkpoint { origin: self.name.clone(), size, root };
        let body = cp.body();
        let sig = self.key.sign(body.as_bytes());
        let pk = self.key.verifying_key().to_bytes();
        let blob = [&key_id(&self.name, &pk)[..], &sig.to_bytes()].concat();
        format!("{body}\n\u{2014} {} {}\n", self.name, B64.encode(blob))
    }
}

/// Parse `vkey`, check `note` carries a valid signature by it, and return the checkpoint.
pub fn verify_note(note: &str, vkey: &str) -> Result<Checkpoint, CheckpointError> {
    let mut parts = vkey.splitn(3, '+');
    let (Some(name), Some(id_hex), Some(key_b64)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(CheckpointError::BadKey("expected name+keyid+key".into()));
    };
    let raw = B64.decode(key_b64).map_err(|e| CheckpointError::BadKey(e.to_string()))?;
    let (Some(&0x01), Ok(pk)) = (raw.first(), <[u8; 32]>::try_from(&raw[1.min(raw.len())..])) else {
        return Err(CheckpointError::BadKey("not an Ed25519 key".into()));
    };
    let id = key_id(name, &pk);
    if hex::encode(id) != id_hex {
        return Err(CheckpointError::BadKey("key id does not match the key".into()));
    }
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&pk).map_err(|e| CheckpointError::BadKey(e.to_string()))?;

    let (body, sigs) = note.split_once("\n\n").ok_or_else(|| CheckpointError::Malformed("no blank line before the signatures".into()))?;
    let body = format!("{body}\n");
    if !sigs.ends_with('\n') || sigs.is_empty() {
        return Err(CheckpointError::Malformed("signature lines must end with a newline".into()));
    }
    let mut found = false;
    for line in sigs[..sigs.len() - 1].split('\n') {
        let rest = line.strip_prefix("\u{2014} ").ok_or_else(|| CheckpointError::Malformed(format!("signature line {line:?} does not start with an em dash")))?;
        let (n, b64) = rest.split_once(' ').ok_or_else(|| CheckpointError::Malformed("signature line needs a name and a signature".into()))?;
        let blob = B64.decode(b64).map_err(|e| CheckpointError::Malformed(e.to_string()))?;
        if blob.len() < 4 {
            return Err(CheckpointError::Malformed("signature too short".into()));
        }
        if n != name || blob[..4] != id {
            continue; // another signer's line: allowed by the spec
        }
        let sig = ed25519_dalek::Signature::from_slice(&blob[4..]).map_err(|_| CheckpointError::BadSignature(name.into()))?;
        vk.verify(body.as_bytes(), &sig).map_err(|_| CheckpointError::BadSignature(name.into()))?;
        found = true;
    }
    if !found {
        return Err(CheckpointError::NotSigned(name.into()));
    }
    let lines: Vec<&str> = body[..body.len() - 1].split('\n').collect();
    if lines.len() < 3 {
        return Err(CheckpointError::Malformed("a checkpoint has origin, size and root lines".into()));
    }
    let size: u64 = lines[1].parse().map_err(|_| CheckpointError::Malformed(format!("bad tree size {:?}", lines[1])))?;
    if lines[1] != size.to_string() {
        return Err(CheckpointError::Malformed("non-canonical tree size".into()));
    }
    let root: [u8; 32] = B64
        .decode(lines[2])
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| CheckpointError::Malformed("root is not 32 bytes of base64".into()))?;
    Ok(Checkpoint { origin: lines[0].to_string(), size, root })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_every_tampering_fails() {
        let s = CheckpointSigner::from_seed("bitmote.example/log", [4; 32]);
        let note = s.sign(42, [9; 32]);
        let vkey = s.verifier_key();
        let cp = verify_note(&note, &vkey).unwrap();
        assert_eq!(cp, Checkpoint { origin: "bitmote.example/log".into(), size: 42, root: [9; 32] });
        assert!(note.starts_with("bitmote.example/log\n42\n"));
        // Any change in any line breaks it.
        for (i, _) in note.char_indices().filter(|(_, c)| c.is_ascii_alphanumeric()) {
            let mut t: Vec<char> = note.chars().collect();
            let idx = note[..i].chars().count();
            t[idx] = if t[idx] == 'A' { 'B' } else { 'A' };
            let t: String = t.into_iter().collect();
            if t != note {
                assert!(verify_note(&t, &vkey).is_err(), "tampered note accepted: {t:?}");
            }
        }
        assert!(matches!(verify_note(&note.replace('\u{2014}', "-"), &vkey), Err(CheckpointError::Malformed(_))));
        assert!(matches!(verify_note(&note.replace("\n\n", "\n"), &vkey), Err(CheckpointError::Malformed(_))));
        let other = CheckpointSigner::from_seed("bitmote.example/log", [5; 32]);
        assert!(matches!(verify_note(&note, &other.verifier_key()), Err(CheckpointError::NotSigned(_))));
        assert!(verify_note(&note, "garbage").is_err());
    }

    #[test]
    fn key_file_is_private_and_stable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("checkpoint.key");
        let a = CheckpointSigner::load_or_create(&p, "x").unwrap();
        let b = CheckpointSigner::load_or_create(&p, "x").unwrap();
        assert_eq!(a.verifier_key(), b.verifier_key());
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
