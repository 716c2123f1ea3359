//! Authenticated on-chain commands: an OP_RETURN that tells one device to do one thing,
//! signed by a key authorized for that device, numbered so it can never be replayed, and
//! bound to where it may take effect.
//!
//! ```text
//! payload = "BM" 0x02 | seq u32 BE | expires u24 BE | command (1..=6 bytes UTF-8) | signature[64]
//! signed  = tagged_hash("bitmote/command/v2",
//!             network | gateway | domain | device   (each: length u16 BE, then its bytes)
//!             | seq u32 BE | expires u32 BE | command)
//! ```
//! At most 80 bytes, so it relays under every Bitcoin Core's OP_RETURN policy. What is
//! signed but not carried binds the command to its context, so the same bytes are
//! worthless anywhere else:
//! - `network`: the chain (`main`, `test`, `testnet4`, `signet`, `regtest`);
//! - `gateway`: the gateway's identity, its log origin (`[notary] log_origin`);
//! - `domain`: the command domain the rule names (`domain = "site-7/doors"`);
//! - `device`: the rule's device (`lock-7`, not `lock-8`).
//!
//! `expires` is the last block height the command may be mined at; the gateway keeps
//! sequence numbers per (key, device), whatever rule matched, so renaming or re-adding a
//! rule never makes an old command new again.

use bitcoin::Network;
use bitmote_device::{PublicKey, Signature, SigningKey};

/// Payload tag and version.
pub const TAG: &[u8; 3] = b"BM\x02";
/// Longest command word.
pub const MAX_COMMAND: usize = 6;
/// Highest expiry height the payload can carry (24 bits: some 300 years of blocks).
pub const MAX_EXPIRES: u32 = 0x00ff_ffff;
/// Longest gateway identity or domain that can be signed.
pub const MAX_NAME: usize = 255;
const SIG: usize = 64;
const HEADER: usize = 3 + 4 + 3;

/// Where a command may take effect: what it is signed for besides its own fields.
#[derive(Clone, Copy, Debug)]
pub struct Scope<'a> {
    pub network: Network,
    /// The gateway's identity: its log origin.
    pub gateway: &'a str,
    /// The command domain the rule names.
    pub domain: &'a str,
    /// The device the rule commands.
    pub device: &'a str,
}

/// Why a command cannot be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CommandError {
    #[error("a command is 1 to {MAX_COMMAND} bytes, not {0}")]
    Length(usize),
    #[error("an expiry height is at most {MAX_EXPIRES}, not {0}")]
    Expires(u32),
    #[error("the {0} is 1 to {MAX_NAME} bytes")]
    Name(&'static str),
    #[error("on-chain commands are signed with BIP340 keys")]
    NotSchnorr,
}

/// A decoded (not yet verified) command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OnChainCommand {
    pub seq: u32,
    /// The last height it may be mined at.
    pub expires: u32,
    pub command: String,
    pub signature: [u8; 64],
}

fn message(scope: &Scope, seq: u32, expires: u32, command: &str) -> [u8; 32] {
    let net = scope.network.to_core_arg().as_bytes();
    let (g, d, dev) = (scope.gateway.as_bytes(), scope.domain.as_bytes(), scope.device.as_bytes());
    let len = |b: &[u8]| (b.len().min(u16::MAX as usize) as u16).to_be_bytes();
    let (ln, lg, ld, ldev) = (len(net), len(g), len(d), len(dev));
    bitmote_device::tagged_hash(
        b"bitmote/command/v2",
        &[&ln, net, &lg, g, &ld, d, &ldev, dev, &seq.to_be_bytes(), &expires.to_be_bytes(), command.as_bytes()],
    )
}

/// Check what a scope names can be signed (the device is checked by the rule).
pub fn check_scope(scope: &Scope) -> Result<(), CommandError> {
    if scope.gateway.is_empty() || scope.gateway.len() > MAX_NAME {
        return Err(CommandError::Name("gateway identity"));
    }
    if scope.domain.is_empty() || scope.domain.len() > MAX_NAME {
        return Err(CommandError::Name("command domain"));
    }
    if scope.device.is_empty() || scope.device.len() > MAX_NAME {
        return Err(CommandError::Name("device name"));
    }
    Ok(())
}

/// Build the signed OP_RETURN payload of `command` number `seq` for `scope`, valid in
/// blocks up to height `expires`.
pub fn encode(key: &SigningKey, scope: &Scope, seq: u32, expires: u32, command: &str) -> Result<Vec<u8>, CommandError> {
    if command.is_empty() || command.len() > MAX_COMMAND {
        return Err(CommandError::Length(command.len()));
    }
    if expires > MAX_EXPIRES {
        return Err(CommandError::Expires(expires));
    }
    check_scope(scope)?;
    let Signature::Schnorr(sig) = key.sign(&message(scope, seq, expires, command)) else {
        return Err(CommandError::NotSchnorr);
    };
    let mut p = TAG.to_vec();
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&expires.to_be_bytes()[1..]);
    p.extend_from_slice(command.as_bytes());
    p.extend_from_slice(&sig);
    Ok(p)
}

/// Parse an OP_RETURN script's data as a command; `None` if it is not one.
pub fn decode(script: &bitcoin::Script) -> Option<OnChainCommand> {
    let mut it = script.instructions();
    if !matches!(it.next()?.ok()?, bitcoin::script::Instruction::Op(bitcoin::opcodes::all::OP_RETURN)) {
        return None;
    }
    let bitcoin::script::Instruction::PushBytes(data) = it.next()?.ok()? else { return None };
    let d = data.as_bytes();
    if d.len() < HEADER + 1 + SIG || d.len() > HEADER + MAX_COMMAND + SIG || &d[..3] != TAG {
        return None;
    }
    let seq = u32::from_be_bytes(d[3..7].try_into().ok()?);
    let expires = u32::from_be_bytes([0, d[7], d[8], d[9]]);
    let (word, sig) = d[HEADER..].split_at(d.len() - HEADER - SIG);
    let command = std::str::from_utf8(word).ok()?.to_string();
    let signature: [u8; 64] = sig.try_into().ok()?;
    Some(OnChainCommand { seq, expires, command, signature })
}

impl OnChainCommand {
    /// Check the signature by `key` for `scope`.
    pub fn verify(&self, key: &PublicKey, scope: &Scope) -> bool {
        key.verify(&message(scope, self.seq, self.expires, &self.command), &Signature::Schnorr(self.signature)).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCOPE: Scope = Scope { network: Network::Regtest, gateway: "gw.example/log", domain: "site-7/doors", device: "lock-7" };

    fn decoded(p: Vec<u8>) -> OnChainCommand {
        decode(&bitcoin::ScriptBuf::new_op_return(bitcoin::script::PushBytesBuf::try_from(p).unwrap())).unwrap()
    }

    #[test]
    fn roundtrip_and_binding() {
        let k = SigningKey::schnorr_from_secret(&[9; 32]).unwrap();
        let p = encode(&k, &SCOPE, 3, 1_000, "unlock").unwrap();
        assert_eq!(p.len(), 80, "the longest command fits the 80-byte OP_RETURN policy");
        let c = decoded(p);
        assert_eq!((c.seq, c.expires, c.command.as_str()), (3, 1_000, "unlock"));
        assert!(c.verify(&k.public_key(), &SCOPE));
        let other = SigningKey::schnorr_from_secret(&[8; 32]).unwrap();
        assert!(!c.verify(&other.public_key(), &SCOPE), "bound to the key");
        for (what, scope) in [
            ("device", Scope { device: "lock-8", ..SCOPE }),
            ("network", Scope { network: Network::Signet, ..SCOPE }),
            ("gateway", Scope { gateway: "other.example/log", ..SCOPE }),
            ("domain", Scope { domain: "site-8/doors", ..SCOPE }),
        ] {
            assert!(!c.verify(&k.public_key(), &scope), "bound to the {what}");
        }
        // The length prefixes keep the fields apart: moving a byte between them breaks it.
        let shifted = Scope { gateway: "gw.example/logs", domain: "ite-7/doors", ..SCOPE };
        assert!(!c.verify(&k.public_key(), &shifted));
        let mut later = c.clone();
        later.expires += 1;
        assert!(!later.verify(&k.public_key(), &SCOPE), "the expiry is signed");
    }

    #[test]
    fn what_cannot_be_encoded_is_refused() {
        let k = SigningKey::schnorr_from_secret(&[9; 32]).unwrap();
        assert_eq!(encode(&k, &SCOPE, 1, 10, "toolong"), Err(CommandError::Length(7)));
        assert_eq!(encode(&k, &SCOPE, 1, 10, ""), Err(CommandError::Length(0)));
        assert_eq!(encode(&k, &SCOPE, 1, MAX_EXPIRES + 1, "on"), Err(CommandError::Expires(MAX_EXPIRES + 1)));
        assert_eq!(encode(&k, &Scope { domain: "", ..SCOPE }, 1, 10, "on"), Err(CommandError::Name("command domain")));
        let p256 = SigningKey::p256_from_secret(&[9; 32]).unwrap();
        assert_eq!(encode(&p256, &SCOPE, 1, 10, "on"), Err(CommandError::NotSchnorr));
        let c = decoded(encode(&k, &SCOPE, u32::MAX, MAX_EXPIRES, "on").unwrap());
        assert_eq!((c.seq, c.expires), (u32::MAX, MAX_EXPIRES));
    }

    #[test]
    fn other_data_is_not_a_command() {
        assert!(decode(&bitcoin::ScriptBuf::new_op_return([1u8, 2, 3])).is_none());
        let k = SigningKey::schnorr_from_secret(&[9; 32]).unwrap();
        let p = encode(&k, &SCOPE, 3, 1_000, "on").unwrap();
        let mut v1 = p.clone();
        v1[2] = 1;
        let s = |b: Vec<u8>| bitcoin::ScriptBuf::new_op_return(bitcoin::script::PushBytesBuf::try_from(b).unwrap());
        assert!(decode(&s(v1)).is_none(), "another version");
        // One byte short: the word and signature shift, and what is left does not verify.
        let short = decoded(p[..p.len() - 1].to_vec());
        assert!(!short.verify(&k.public_key(), &SCOPE));
        assert!(decode(&s(p[..HEADER + SIG].to_vec())).is_none(), "no command word");
        let mut bad = p.clone();
        bad[HEADER] = 0xff;
        assert!(decode(&s(bad)).is_none(), "not UTF-8");
    }
}
