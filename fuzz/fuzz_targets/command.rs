//! The on-chain command decoder (`bitmote_actuator::command::decode`), run on every
//! OP_RETURN output of every block the actuator sees. The first byte chooses a raw script
//! or an `OP_RETURN <push>` of the rest (to reach the payload parser). Properties: a
//! decoded command is exactly its payload (tag, seq, expiry, command, signature, nothing
//! else); a fuzzed signature does not verify unless it is the real one; encoding the same
//! command with a key and decoding it gives it back, and that one verifies in its scope
//! and in no other (another device, network, gateway or domain).
#![no_main]
use bitmote_actuator::command::{decode, encode, Scope, TAG};
use bitmote_device::SigningKey;
use bitcoin::script::{Builder, PushBytesBuf};
use bitcoin::{opcodes, Network, ScriptBuf};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn key() -> &'static SigningKey {
    static K: OnceLock<SigningKey> = OnceLock::new();
    K.get_or_init(|| SigningKey::schnorr_from_secret(&[3; 32]).unwrap())
}

const SCOPE: Scope = Scope { network: Network::Regtest, gateway: "fuzz.test/log", domain: "fuzz/doors", device: "lock-1" };

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    let script = if which & 1 == 0 {
        ScriptBuf::from_bytes(rest.to_vec())
    } else {
        let Ok(push) = PushBytesBuf::try_from(rest.to_vec()) else { return };
        Builder::new().push_opcode(opcodes::all::OP_RETURN).push_slice(push).into_script()
    };
    let Some(c) = decode(&script) else { return };
    let mut payload = TAG.to_vec();
    payload.extend_from_slice(&c.seq.to_be_bytes());
    payload.extend_from_slice(&c.expires.to_be_bytes()[1..]);
    payload.extend_from_slice(c.command.as_bytes());
    payload.extend_from_slice(&c.signature);
    assert!(script.as_bytes().windows(payload.len()).any(|w| w == payload), "decoded command is not its payload");
    let pk = key().public_key();
    let real = encode(key(), &SCOPE, c.seq, c.expires, &c.command).expect("a decoded command encodes");
    if c.verify(&pk, &SCOPE) {
        assert_eq!(&real[real.len() - 64..], &c.signature[..], "a signature verified that is not the key's");
    }
    let push = PushBytesBuf::try_from(real).unwrap();
    let again = decode(&Builder::new().push_opcode(opcodes::all::OP_RETURN).push_slice(push).into_script()).expect("an encoded command decodes");
    assert_eq!((again.seq, again.expires, &again.command), (c.seq, c.expires, &c.command));
    assert!(again.verify(&pk, &SCOPE));
    for other in [
        Scope { device: "lock-2", ..SCOPE },
        Scope { network: Network::Bitcoin, ..SCOPE },
        Scope { gateway: "other.test/log", ..SCOPE },
        Scope { domain: "fuzz/relays", ..SCOPE },
    ] {
        assert!(!again.verify(&pk, &other), "verified in another scope: {other:?}");
    }
});
