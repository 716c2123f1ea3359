//! Signed checkpoints: the log's size and root in the C2SP `tlog-checkpoint` format
//! (<https://c2sp.org/tlog-checkpoint>), signed as a C2SP `signed-note`
//! (<https://c2sp.org/signed-note>) with Ed25519.
//!
//! ```text
//! <origin>
//! <tree size, decimal>
//! <base64 root>
//!
//! — <key name> <base64(key id[4] || signature[64])>
//! ```
//! The key id is the first 4 bytes of SHA-256(name || "\n" || 0x01 || public key);
//! the verifier key is published as `<name>+<key id hex>+<base64(0x01 || public key)>`.
//! Parsing follows the reference implementation (`golang.org/x/mod/sumdb/note`,
//! `Open`): UTF-8 without control characters other than newline, the signature block
//! after the last blank line, every line of it `— name base64`, at most 100
//! signatures; signatures by other keys are ignored, a bad one by our key is an error.
//! A checkpoint lets anyone hold the gateway to one history: two signed checkpoints
//! that no consistency proof joins are evidence of a forked log. [`CheckpointSigner::issue`]
//! records every checkpoint it signs and refuses to sign two roots for one size.
//!
//! The fork guard sits on the anchoring path: [`crate::anchor::Anchorer`] issues the
//! checkpoint of every (size, root) through [`CheckpointSigner::issue`] before it
//! anchors it, and anchors nothing when that is refused. What is committed to Bitcoin
//! is therefore one root per size, for good. The read paths (the API's and dashboard's
//! checkpoint of the current head, proof bundles) sign with [`CheckpointSigner::sign`],
//! which records nothing: a signature over the head as it is is still correct, and a
//! read never writes.

use std::io::Write as _;
use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::{Signer, Verifier as _};
use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

/// Errors of checkpoint signing and verification.
#[derive(Debug, thiserror::Error, PartialEq)]
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
    /// A checkpoint of another root was issued for this size: the log has forked.
    #[error("refusing to sign root {} for tree size {size}: root {} was already signed for it", hex::encode(new), hex::encode(signed))]
    Fork { size: u64, signed: [u8; 32], new: [u8; 32] },
    #[error("checkpoint storage: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("checkpoint storage: {0}")]
    Log(#[from] crate::log::LogError),
    #[error("checkpoint storage: the root recorded for tree size {size} is not 32 bytes")]
    CorruptRoot { size: u64 },
}

type Result<T, E = CheckpointError> = std::result::Result<T, E>;

/// Signature type byte of Ed25519 in signed notes.
const ALG_ED25519: u8 = 0x01;
/// Most signature lines a note may carry (as the reference implementation).
const MAX_SIGNATURES: usize = 100;
/// Largest note accepted (a checkpoint with 100 signatures is under 16 KiB).
const MAX_NOTE_LEN: usize = 1 << 20;
const SIG_PREFIX: &str = "\u{2014} ";

/// A log checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: [u8; 32],
}

impl Checkpoint {
    /// The note body (text).
    pub fn body(&self) -> String {
        format!("{}\n{}\n{}\n", self.origin, self.size, B64.encode(self.root))
    }

    /// Parse a checkpoint note body: origin, size and root lines, then optional
    /// non-empty extension lines (accepted and ignored, as the spec asks of clients).
    pub fn parse_body(text: &str) -> Result<Self> {
        let malformed = |m: &str| Err(CheckpointError::Malformed(m.to_string()));
        let Some(text) = text.strip_suffix('\n') else { return malformed("the checkpoint must end with a newline") };
        let lines: Vec<&str> = text.split('\n').collect();
        if lines.len() < 3 {
            return malformed("a checkpoint has origin, tree size and root hash lines");
        }
        if lines.iter().any(|l| l.is_empty()) {
            return malformed("empty line in the checkpoint");
        }
        let size_line = lines[1];
        let canonical = size_line.bytes().all(|b| b.is_ascii_digit()) && (size_line == "0" || !size_line.starts_with('0'));
        let size: u64 = match size_line.parse() {
            Ok(s) if canonical => s,
            _ => return Err(CheckpointError::Malformed(format!("tree size {size_line:?} is not a canonical decimal number"))),
        };
        let root: [u8; 32] = B64
            .decode(lines[2])
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| CheckpointError::Malformed("the root hash is not 32 bytes of standard base64".into()))?;
        Ok(Checkpoint { origin: lines[0].to_string(), size, root })
    }
}

/// A valid key (signature) name: non-empty, no Unicode white space, no `+`.
fn is_valid_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('+') && !name.chars().any(char::is_whitespace)
}

fn key_id(name: &str, pk: &[u8; 32]) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([ALG_ED25519]);
    h.update(pk);
    let d = h.finalize();
    [d[0], d[1], d[2], d[3]]
}

/// Text of a note: UTF-8 without control characters other than newline.
fn check_text_chars(s: &str) -> Result<()> {
    if s.chars().any(|c| c < ' ' && c != '\n') {
        return Err(CheckpointError::Malformed("control character in the note".into()));
    }
    Ok(())
}

/// An Ed25519 note verifier, from its published verifier key.
#[derive(Clone, Debug)]
pub struct Verifier {
    name: String,
    id: [u8; 4],
    key: ed25519_dalek::VerifyingKey,
}

impl Verifier {
    /// Parse `<name>+<hex key id>+<base64(0x01 || public key)>`.
    pub fn parse(vkey: &str) -> Result<Self> {
        let bad = |m: &str| CheckpointError::BadKey(m.to_string());
        let mut parts = vkey.splitn(3, '+');
        let (Some(name), Some(id_hex), Some(key_b64)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad("expected <name>+<key id>+<key>"));
        };
        if !is_valid_name(name) {
            return Err(bad("invalid key name"));
        }
        let id: [u8; 4] = match hex::decode(id_hex) {
            Ok(v) if id_hex.len() == 8 => v.try_into().map_err(|_| bad("key id is not 8 hex digits"))?,
            _ => return Err(bad("key id is not 8 hex digits")),
        };
        let raw = B64.decode(key_b64).map_err(|e| CheckpointError::BadKey(format!("key is not base64: {e}")))?;
        let pk: [u8; 32] = match raw.split_first() {
            Some((&ALG_ED25519, k)) => k.try_into().map_err(|_| bad("an Ed25519 key is 32 bytes"))?,
            Some((alg, _)) => return Err(CheckpointError::BadKey(format!("unknown key type {alg:#04x} (only Ed25519, 0x01)"))),
            None => return Err(bad("empty key")),
        };
        if key_id(name, &pk) != id {
            return Err(bad("the key id does not match the name and key"));
        }
        let key = ed25519_dalek::VerifyingKey::from_bytes(&pk).map_err(|e| CheckpointError::BadKey(e.to_string()))?;
        Ok(Verifier { name: name.to_string(), id, key })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The verifier key string.
    pub fn vkey(&self) -> String {
        vkey_string(&self.name, &self.key.to_bytes())
    }

    /// Check `note` carries a valid signature by this key and return its text
    /// (everything before the blank line, with its final newline).
    pub fn open<'n>(&self, note: &'n str) -> Result<&'n str> {
        let malformed = |m: &str| Err(CheckpointError::Malformed(m.to_string()));
        if note.len() > MAX_NOTE_LEN {
            return malformed("note too large");
        }
        check_text_chars(note)?;
        let Some(split) = note.rfind("\n\n") else { return malformed("no blank line before the signatures") };
        let (text, sigs) = (&note[..split + 1], &note[split + 2..]);
        let Some(sigs) = sigs.strip_suffix('\n') else { return malformed("the signature block must end with a newline") };
        if sigs.is_empty() {
            return malformed("no signature lines");
        }
        let mut count = 0;
        let mut verified = false;
        for line in sigs.split('\n') {
            let Some(rest) = line.strip_prefix(SIG_PREFIX) else {
                return Err(CheckpointError::Malformed(format!("signature line {line:?} does not start with an em dash and a space")));
            };
            let (name, b64) = rest.split_once(' ').unwrap_or((rest, ""));
            let blob = match B64.decode(b64) {
                Ok(b) if is_valid_name(name) && b.len() >= 5 => b,
                _ => return Err(CheckpointError::Malformed(format!("signature line {line:?} is not `— <name> <base64>`"))),
            };
            count += 1;
            if count > MAX_SIGNATURES {
                return malformed("more than 100 signatures");
            }
            // Another key's signature (or a repeat of ours, which the reference drops): skip.
            if name != self.name || blob[..4] != self.id || verified {
                continue;
            }
            let sig = ed25519_dalek::Signature::from_slice(&blob[4..]).map_err(|_| CheckpointError::BadSignature(self.name.clone()))?;
            self.key.verify(text.as_bytes(), &sig).map_err(|_| CheckpointError::BadSignature(self.name.clone()))?;
            verified = true;
        }
        if !verified {
            return Err(CheckpointError::NotSigned(self.name.clone()));
        }
        Ok(text)
    }

    /// Verify a signed checkpoint note and parse its body.
    pub fn verify_checkpoint(&self, note: &str) -> Result<Checkpoint> {
        Checkpoint::parse_body(self.open(note)?)
    }
}

fn vkey_string(name: &str, pk: &[u8; 32]) -> String {
    format!("{}+{}+{}", name, hex::encode(key_id(name, pk)), B64.encode([&[ALG_ED25519][..], pk].concat()))
}

/// Parse `vkey`, check `note` carries a valid signature by it, and return the checkpoint.
pub fn parse_and_verify(note: &str, vkey: &str) -> Result<Checkpoint> {
    Verifier::parse(vkey)?.verify_checkpoint(note)
}

/// Same as [`parse_and_verify`].
pub fn verify_note(note: &str, vkey: &str) -> Result<Checkpoint> {
    parse_and_verify(note, vkey)
}

/// A checkpoint as issued and recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedCheckpoint {
    pub size: u64,
    pub root: [u8; 32],
    pub note: String,
    pub created_at: u64,
}

/// The gateway's checkpoint signing key.
#[derive(Clone)]
pub struct CheckpointSigner {
    name: String,
    key: ed25519_dalek::SigningKey,
}

impl CheckpointSigner {
    /// A signer named `name` (also the origin of its checkpoints) with this Ed25519
    /// seed. The name must be a valid key name (see [`CheckpointSigner::new`]).
    pub fn from_seed(name: &str, seed: [u8; 32]) -> Self {
        CheckpointSigner { name: name.to_string(), key: ed25519_dalek::SigningKey::from_bytes(&seed) }
    }

    /// [`from_seed`](Self::from_seed), refusing a name that is empty, contains white
    /// space or `+`, or control characters.
    pub fn new(name: &str, seed: [u8; 32]) -> Result<Self> {
        if !is_valid_name(name) || check_text_chars(name).is_err() {
            return Err(CheckpointError::BadKey(format!("{name:?} is not a valid key name (non-empty, no spaces or '+')")));
        }
        Ok(Self::from_seed(name, seed))
    }

    /// Load the key from `path` (32-byte hex seed), creating it (mode 0600, never
    /// overwriting a file another process created meanwhile) on first use. A key file
    /// readable by group or others is refused.
    pub fn load_or_create(path: &Path, name: &str) -> Result<Self> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let err = |e: String| CheckpointError::KeyFile(path.display().to_string(), e);
        Self::new(name, [0; 32])?;
        let load = || -> Result<Self> {
            let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(err(format!("readable by others (mode {mode:o}); run chmod 600 on it")));
            }
            let t = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
            let seed: [u8; 32] =
                hex::decode(t.trim()).ok().and_then(|v| v.try_into().ok()).ok_or_else(|| err("not a 32-byte hex seed".into()))?;
            Self::new(name, seed)
        };
        match std::fs::symlink_metadata(path) {
            Ok(_) => return load(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e.to_string())),
        }
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).map_err(|e| err(e.to_string()))?;
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        // Write a private temporary file, then link it into place: the key appears
        // whole or not at all, and an existing key is never replaced.
        let mut nonce = [0u8; 8];
        getrandom::getrandom(&mut nonce).map_err(|e| err(e.to_string()))?;
        let tmp = path.with_extension(format!("tmp.{}.{}", std::process::id(), hex::encode(nonce)));
        let written = (|| -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
            f.write_all(hex::encode(seed).as_bytes())?;
            f.sync_all()
        })();
        let linked = written.and_then(|_| match std::fs::hard_link(&tmp, path) {
            // A file system without hard links: rename (this loses only the no-clobber race).
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists && !path.exists() => std::fs::rename(&tmp, path),
            r => r,
        });
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                if let Ok(d) = std::fs::File::open(dir) {
                    let _ = d.sync_all();
                }
                Self::new(name, seed)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load(),
            Err(e) => Err(err(e.to_string())),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The verifier key string to publish.
    pub fn verifier_key(&self) -> String {
        vkey_string(&self.name, &self.key.verifying_key().to_bytes())
    }

    pub fn verifier(&self) -> Verifier {
        let pk = self.key.verifying_key();
        Verifier { name: self.name.clone(), id: key_id(&self.name, &pk.to_bytes()), key: pk }
    }

    fn signature_line(&self, text: &str) -> String {
        let sig = self.key.sign(text.as_bytes());
        let pk = self.key.verifying_key().to_bytes();
        let blob = [&key_id(&self.name, &pk)[..], &sig.to_bytes()].concat();
        format!("{SIG_PREFIX}{} {}\n", self.name, B64.encode(blob))
    }

    /// Sign any note text (non-empty, ending in a newline, no control characters).
    pub fn sign_note(&self, text: &str) -> Result<String> {
        if !text.ends_with('\n') {
            return Err(CheckpointError::Malformed("note text must end with a newline".into()));
        }
        check_text_chars(text)?;
        Ok(format!("{text}\n{}", self.signature_line(text)))
    }

    /// Sign a checkpoint of this log (origin = the key name). Nothing is recorded and
    /// nothing is checked against earlier checkpoints: for the read paths. Anything
    /// about to be committed elsewhere (an anchor) goes through [`issue`](Self::issue).
    pub fn sign(&self, size: u64, root: [u8; 32]) -> String {
        let body = Checkpoint { origin: self.name.clone(), size, root }.body();
        format!("{body}\n{}", self.signature_line(&body))
    }

    /// Sign a checkpoint with any origin.
    pub fn sign_checkpoint(&self, cp: &Checkpoint) -> Result<String> {
        if cp.origin.is_empty() || cp.origin.contains('\n') {
            return Err(CheckpointError::Malformed("the origin must be one non-empty line".into()));
        }
        self.sign_note(&cp.body())
    }

    /// Sign a checkpoint of (`size`, `root`) and record it in `checkpoints`. Signing the
    /// same size again returns a fresh note; a different root for a size already
    /// signed is refused ([`CheckpointError::Fork`]): the log is append-only.
    pub fn issue(&self, conn: &Connection, size: u64, root: [u8; 32]) -> Result<String> {
        let size_i = i64::try_from(size).map_err(|_| CheckpointError::Malformed(format!("tree size {size} is too large")))?;
        let note = self.sign(size, root);
        conn.execute(
            "INSERT INTO checkpoints (size, root, note, created_at) VALUES (?1, ?2, ?3, ?4) ON CONFLICT(size) DO NOTHING",
            params![size_i, &root[..], note, crate::registry::now_ms() as i64],
        )?;
        let signed: Vec<u8> = conn.query_row("SELECT root FROM checkpoints WHERE size = ?1", [size_i], |r| r.get(0))?;
        let signed: [u8; 32] = signed.try_into().map_err(|_| CheckpointError::CorruptRoot { size })?;
        if signed != root {
            return Err(CheckpointError::Fork { size, signed, new: root });
        }
        Ok(note)
    }

    /// Sign and record a checkpoint of the log's current head.
    pub fn issue_head(&self, conn: &Connection) -> Result<(Checkpoint, String)> {
        let (size, root) = crate::log::MerkleLog::new(conn).head()?;
        let note = self.issue(conn, size, root)?;
        Ok((Checkpoint { origin: self.name.clone(), size, root }, note))
    }
}

fn issued(row: Option<(i64, Vec<u8>, String, i64)>) -> Result<Option<IssuedCheckpoint>> {
    row.map(|(size, root, note, created_at)| {
        Ok(IssuedCheckpoint {
            size: size as u64,
            root: root.try_into().map_err(|_| CheckpointError::CorruptRoot { size: size as u64 })?,
            note,
            created_at: created_at as u64,
        })
    })
    .transpose()
}

fn query_issued(conn: &Connection, sql: &str, p: impl rusqlite::Params) -> Result<Option<IssuedCheckpoint>> {
    let row = conn.query_row(sql, p, |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))).optional()?;
    issued(row)
}

/// The most recent (largest) checkpoint issued.
pub fn latest(conn: &Connection) -> Result<Option<IssuedCheckpoint>> {
    query_issued(conn, "SELECT size, root, note, created_at FROM checkpoints ORDER BY size DESC LIMIT 1", [])
}

/// The checkpoint issued for `size`, if any.
pub fn issued_at(conn: &Connection, size: u64) -> Result<Option<IssuedCheckpoint>> {
    query_issued(conn, "SELECT size, root, note, created_at FROM checkpoints WHERE size = ?1", [size.min(i64::MAX as u64) as i64])
}

#[cfg(test)]
mod tests {
    use super::*;

    // golang.org/x/mod/sumdb/note, note_test.go.
    const PETER_VKEY: &str = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
    const PETER_SKEY: &str = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
    const ENOCH_VKEY: &str = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop";
    const TEXT: &str = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n";
    const PETER_SIG: &str =
        "\u{2014} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n";
    const ENOCH_SIG: &str =
        "\u{2014} EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ=\n";

    fn peter() -> CheckpointSigner {
        // PRIVATE+KEY+<name>+<id>+<base64(0x01 || seed)>; the base64 may contain '+'.
        let b64 = PETER_SKEY.splitn(5, '+').nth(4).unwrap();
        let raw = B64.decode(b64).unwrap();
        assert_eq!(raw[0], ALG_ED25519);
        CheckpointSigner::new("PeterNeumann", raw[1..].try_into().unwrap()).unwrap()
    }

    #[test]
    fn the_go_reference_vectors() {
        let s = peter();
        assert_eq!(s.verifier_key(), PETER_VKEY);
        let note = s.sign_note(TEXT).unwrap();
        assert_eq!(note, format!("{TEXT}\n{PETER_SIG}"));
        let v = Verifier::parse(PETER_VKEY).unwrap();
        assert_eq!(v.vkey(), PETER_VKEY);
        assert_eq!(v.open(&note).unwrap(), TEXT);
        // Other keys' signatures are ignored, before or after ours; repeats are dropped.
        assert_eq!(v.open(&format!("{TEXT}\n{ENOCH_SIG}{PETER_SIG}")).unwrap(), TEXT);
        assert_eq!(v.open(&format!("{TEXT}\n{PETER_SIG}{PETER_SIG}{ENOCH_SIG}{ENOCH_SIG}")).unwrap(), TEXT);
        let enoch = Verifier::parse(ENOCH_VKEY).unwrap();
        assert_eq!(enoch.open(&format!("{TEXT}\n{PETER_SIG}{ENOCH_SIG}")).unwrap(), TEXT);
        assert_eq!(enoch.open(&note), Err(CheckpointError::NotSigned("EnochRoot".into())));
        // Too many signatures.
        assert!(matches!(v.open(&format!("{TEXT}\n{}", PETER_SIG.repeat(101))), Err(CheckpointError::Malformed(_))));
        // A corrupted signature by the known key.
        let bad = format!("{TEXT}\n{}ABCD{}", &PETER_SIG[..60], &PETER_SIG[60..]);
        assert_eq!(v.open(&bad), Err(CheckpointError::BadSignature("PeterNeumann".into())));
        // The reference's malformed messages.
        for m in [
            TEXT.to_string(),
            format!("{TEXT}\n"),
            format!("{TEXT}\n{}", &PETER_SIG[..PETER_SIG.len() - 1]),
            format!("\x01{TEXT}\n{PETER_SIG}"),
            format!(
                "{TEXT}\n\u{2014} Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM="
            ),
            format!("{TEXT}\n{PETER_SIG}Unexpected line.\n"),
        ] {
            assert!(matches!(v.open(&m), Err(CheckpointError::Malformed(_))), "accepted {m:?}");
        }
        // ("\xff" + text: not UTF-8, so not a &str to begin with.)
    }

    #[test]
    fn verifier_keys_are_parsed_strictly() {
        Verifier::parse(PETER_VKEY).unwrap();
        let b = PETER_VKEY.as_bytes();
        // Every proper substring and every single-byte change is refused (as in the reference test).
        for i in 0..=b.len() {
            for j in i + 1..=b.len() {
                if (i, j) != (0, b.len()) {
                    if let Ok(s) = std::str::from_utf8(&b[i..j]) {
                        assert!(Verifier::parse(s).is_err(), "accepted {s:?}");
                    }
                }
            }
        }
        for i in 0..b.len() {
            let mut m = b.to_vec();
            m[i] += 1;
            if let Ok(s) = std::str::from_utf8(&m) {
                assert!(Verifier::parse(s).is_err(), "accepted {s:?}");
            }
        }
        // Wrong length with an adjusted id; unknown algorithm with an adjusted id.
        assert!(Verifier::parse("PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==").is_err());
        assert!(Verifier::parse("PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW").is_err());
        assert!(matches!(verify_note("x", "garbage"), Err(CheckpointError::BadKey(_))));
    }

    #[test]
    fn sign_verify_and_every_tampering_fails() {
        let s = CheckpointSigner::from_seed("bitmote.example/log", [4; 32]);
        let note = s.sign(42, [9; 32]);
        let vkey = s.verifier_key();
        let cp = parse_and_verify(&note, &vkey).unwrap();
        assert_eq!(cp, Checkpoint { origin: "bitmote.example/log".into(), size: 42, root: [9; 32] });
        assert!(note.starts_with(&format!("bitmote.example/log\n42\n{}\n\n\u{2014} bitmote.example/log ", B64.encode([9; 32]))));
        assert_eq!(s.sign_checkpoint(&cp).unwrap(), note);
        // Any change of any character breaks it.
        let chars: Vec<char> = note.chars().collect();
        for i in 0..chars.len() {
            for repl in ['A', '0', '\n', ' ', '-'] {
                if chars[i] == repl {
                    continue;
                }
                let mut t = chars.clone();
                t[i] = repl;
                let t: String = t.into_iter().collect();
                assert!(verify_note(&t, &vkey).is_err(), "tampered note accepted: {t:?}");
            }
            // Deleting it too.
            let t: String = chars.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, c)| c).collect();
            assert!(verify_note(&t, &vkey).is_err(), "tampered note accepted: {t:?}");
        }
        // Structural damage, each with its own error.
        let malformed = |t: &str| matches!(verify_note(t, &vkey), Err(CheckpointError::Malformed(_)));
        assert!(malformed(&note.replace('\u{2014}', "-")));
        assert!(malformed(&note.replace('\u{2014}', "\u{2013}")));
        assert!(malformed(&note.replace("\n\n", "\n")));
        assert!(malformed(&note[..note.len() - 1]));
        assert!(malformed(&format!("{note}extra line\n")));
        assert!(verify_note(&note.replace("\n\n", "\n\n\n"), &vkey).is_err()); // the blank line joins the text
        assert!(malformed(&format!("{note}\n")));
        // A signature by an unknown key is not ours; a wrong key id is another key.
        let other = CheckpointSigner::from_seed("bitmote.example/log", [5; 32]);
        assert_eq!(verify_note(&note, &other.verifier_key()), Err(CheckpointError::NotSigned("bitmote.example/log".into())));
        let renamed = CheckpointSigner::from_seed("other.example/log", [4; 32]);
        assert!(matches!(verify_note(&note, &renamed.verifier_key()), Err(CheckpointError::NotSigned(_))));
        // A signature by the right key over another body: the body was changed.
        let forged = format!("{}{}", s.sign(43, [9; 32]).split_once("\n\n").unwrap().0, &note[note.find("\n\n").unwrap()..]);
        assert_eq!(verify_note(&forged, &vkey), Err(CheckpointError::BadSignature("bitmote.example/log".into())));
        // Co-signatures by others are fine.
        let cosigned = format!("{note}{}", other.sign(42, [9; 32]).split_once("\n\n").unwrap().1);
        assert_eq!(verify_note(&cosigned, &vkey).unwrap(), cp);
    }

    #[test]
    fn checkpoint_bodies_are_parsed_strictly() {
        let s = CheckpointSigner::from_seed("o", [1; 32]);
        let v = s.verifier();
        let root = B64.encode([7u8; 32]);
        let ok = |body: &str| v.verify_checkpoint(&s.sign_note(body).unwrap());
        assert_eq!(ok(&format!("o\n0\n{root}\n")).unwrap().size, 0);
        // Extension lines are allowed (and ignored).
        assert_eq!(ok(&format!("example.com/log\n18446744073709551615\n{root}\nextension\n")).unwrap().size, u64::MAX);
        for bad in [
            format!("o\n01\n{root}\n"),
            format!("o\n+1\n{root}\n"),
            format!("o\n1 \n{root}\n"),
            format!("o\n18446744073709551616\n{root}\n"),
            format!("o\n1\n{}\n", B64.encode([7u8; 31])),
            format!("o\n1\n{}\n", root.trim_end_matches('=')),
            format!("o\n1\n{root}\n\nextension\n"),
            format!("\n1\n{root}\n"),
            "o\n1\n".to_string(),
        ] {
            assert!(matches!(ok(&bad), Err(CheckpointError::Malformed(_))), "accepted {bad:?}");
        }
        assert!(s.sign_note("no newline").is_err());
        assert!(s.sign_note("tab\there\n").is_err());
        assert!(CheckpointSigner::new("has space", [1; 32]).is_err());
        assert!(CheckpointSigner::new("a+b", [1; 32]).is_err());
        assert!(CheckpointSigner::new("", [1; 32]).is_err());
        assert!(s.sign_checkpoint(&Checkpoint { origin: "a\nb".into(), size: 1, root: [0; 32] }).is_err());
    }

    #[test]
    fn key_file_is_private_stable_and_never_replaced() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("gw").join("checkpoint.key");
        let a = CheckpointSigner::load_or_create(&p, "x").unwrap();
        let b = CheckpointSigner::load_or_create(&p, "x").unwrap();
        assert_eq!(a.verifier_key(), b.verifier_key());
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        // Concurrent first use: everyone ends up with the one key on disk.
        let q = dir.path().join("race.key");
        let keys: Vec<String> = (0..8)
            .map(|_| {
                let q = q.clone();
                std::thread::spawn(move || CheckpointSigner::load_or_create(&q, "x").unwrap().verifier_key())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        assert!(keys.iter().all(|k| *k == keys[0]));
        assert_eq!(CheckpointSigner::load_or_create(&q, "x").unwrap().verifier_key(), keys[0]);
        // Refused: a world-readable key, garbage, a bad name.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(CheckpointSigner::load_or_create(&p, "x"), Err(CheckpointError::KeyFile(..))));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&p, "zz").unwrap();
        assert!(matches!(CheckpointSigner::load_or_create(&p, "x"), Err(CheckpointError::KeyFile(..))));
        assert!(matches!(CheckpointSigner::load_or_create(&q, "bad name"), Err(CheckpointError::BadKey(_))));
    }

    #[test]
    fn issued_checkpoints_are_recorded_and_forks_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::registry::Store::open(&dir.path().join("n.sqlite")).unwrap();
        let s = CheckpointSigner::from_seed("bitmote.test/log", [3; 32]);
        let log = store.log();
        log.append(&[[1; 32], [2; 32], [3; 32]]).unwrap();
        let (cp, note) = s.issue_head(store.conn()).unwrap();
        assert_eq!((cp.size, cp.root), log.head().unwrap());
        assert_eq!(parse_and_verify(&note, &s.verifier_key()).unwrap(), cp);
        assert_eq!(s.issue(store.conn(), 3, cp.root).unwrap(), note);
        let e = s.issue(store.conn(), 3, [0; 32]).unwrap_err();
        assert!(matches!(e, CheckpointError::Fork { size: 3, .. }), "{e}");
        assert_eq!(e, CheckpointError::Fork { size: 3, signed: cp.root, new: [0; 32] });
        assert!(e.to_string().contains(&hex::encode(cp.root)), "{e}");
        assert_eq!(issued_at(store.conn(), 3).unwrap().unwrap().root, cp.root, "the refusal records nothing");
        s.issue(store.conn(), 2, log.root_at(2).unwrap()).unwrap();
        let last = latest(store.conn()).unwrap().unwrap();
        assert_eq!((last.size, last.root, last.note), (3, cp.root, note));
        assert_eq!(issued_at(store.conn(), 2).unwrap().unwrap().root, log.root_at(2).unwrap());
        assert_eq!(issued_at(store.conn(), 9).unwrap(), None);
        // A damaged record is a typed storage error, for reads and for the guard.
        store.conn().execute("UPDATE checkpoints SET root = x'01' WHERE size = 2", []).unwrap();
        assert_eq!(issued_at(store.conn(), 2), Err(CheckpointError::CorruptRoot { size: 2 }));
        assert_eq!(s.issue(store.conn(), 2, log.root_at(2).unwrap()), Err(CheckpointError::CorruptRoot { size: 2 }));
    }
}
