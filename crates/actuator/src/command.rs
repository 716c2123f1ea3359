//! Authenticated on-chain commands: an OP_RETURN that tells one device to do one thing,
//! signed by a key authorized for that device, numbered so it can never be replayed.
//!
//! ```text
//! payload = "BMC" 0x01 | seq u32 BE | len u8 | command (1..=7 bytes UTF-8) | signature[64]
//! signed  = tagged_hash("bitmote/command/v1", device name | 0x00 | seq u32 BE | command)
//! ```
//! At most 80 bytes, so it relays under every Bitcoin Core's OP_RETURN policy. The device
//! name is signed but not carried: a signature for `lock-7` is worthless for `lock-8`.

use bitmote_device::{PublicKey, Signature, SigningKey};

/// Payload tag and version.
pub const TAG: &[u8; 4] = b"BMC\x01";
/// Longest command word.
pub const MAX_COMMAND: usize = 7;

/// A decoded (not yet verified) command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OnChainCommand {
    pub seq: u32,
    pub command: String,
    pub signature: [u8; 64],
}

fn message(device: &str, seq: u32, command: &str) -> [u8; 32] {
    bitmote_device::tagged_hash(b"bitmote/command/v1", &[device.as_bytes(), &[0], &seq.to_be_bytes(), command.as_bytes()])
}

/// Build the signed OP_RETURN payload of `command` number `seq` for `device`.
pub fn encode(key: &SigningKey, device: &str, seq: u32, command: &str) -> Result<Vec<u8>, String> {
    if command.is_empty() || command.len() > MAX_COMMAND {
        return Err(format!("a command is 1 to {MAX_COMMAND} bytes"));
    }
    let Signature::Schnorr(sig) = key.sign(&message(device, seq, command)) else {
        return Err("on-chain commands are signed with BIP340 keys".into());
    };
    let mut p = TAG.to_vec();
    p.extend_from_slice(&seq.to_be_bytes());
    p.push(command.len() as u8);
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
    if d.len() < 4 + 4 + 1 || &d[..4] != TAG {
        return None;
    }
    let seq = u32::from_be_bytes(d[4..8].try_into().ok()?);
    let n = d[8] as usize;
    if n == 0 || n > MAX_COMMAND || d.len() != 9 + n + 64 {
        return None;
    }
    let command = std::str::from_utf8(&d[9..9 + n]).ok()?.to_string();
    let signature: [u8; 64] = d[9 + n..].try_into().ok()?;
    Some(OnChainCommand { seq, command, signature })
}

impl OnChainCommand {
    /// Check the signature by `key` for `device`.
    pub fn verify(&self, key: &PublicKey, device: &str) -> bool {
        key.verify(&message(device, self.seq, &self.command), &Signature::Schnorr(self.signature)).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_binding() {
        let k = SigningKey::schnorr_from_secret(&[9; 32]).unwrap();
        let p = encode(&k, "lock-7", 3, "unlock").unwrap();
        assert!(p.len() <= 80);
        let script = bitcoin::ScriptBuf::new_op_return(bitcoin::script::PushBytesBuf::try_from(p).unwrap());
        let c = decode(&script).unwrap();
        assert_eq!((c.seq, c.command.as_str()), (3, "unlock"));
        assert!(c.verify(&k.public_key(), "lock-7"));
        assert!(!c.verify(&k.public_key(), "lock-8"), "bound to the device");
        let other = SigningKey::schnorr_from_secret(&[8; 32]).unwrap();
        assert!(!c.verify(&other.public_key(), "lock-7"), "bound to the key");
        assert!(encode(&k, "x", 1, "toolongcmd").is_err());
        assert!(decode(&bitcoin::ScriptBuf::new_op_return([1u8, 2, 3])).is_none());
    }
}
