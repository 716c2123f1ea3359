//! `bitmote-proto`: the messages bitmote's processes exchange, typed once and used on both
//! sides — the gateway and its devices over MQTT, the gateway's HTTP API and its clients
//! (the `bitmote` CLI, the simulated fleet), the meter and its provider.
//!
//! Everything here is data: serde types and topic names, no I/O and no dependency on any
//! other bitmote crate (serde, serde_json and hex only, without feature `client`), so a device's firmware (or a test) can speak the protocol without
//! linking the gateway.
//!
//! # Versions
//!
//! Every JSON message is version 1 today and carries no version field on the wire (v1 is
//! what bitmote has always sent). The rule for what comes next, after the parity rule of
//! Lightning's TLVs (`lightning/src/util/ser_macros.rs`):
//!
//! * **"odd" changes are compatible**: a new optional field. Receivers ignore fields they do
//!   not know (no `deny_unknown_fields`), so an older receiver reads a newer message.
//! * **"even" changes are not**: a field whose meaning a receiver must know, or a new value
//!   of a closed enum (an [`actuator::AckResult`]). Such a message says `"v": 2` (see
//!   [`Version`]); a receiver refuses a version it does not know instead of guessing.
//!   A closed enum's unknown value is an error, never read as a success.
//!
//! The binary encodings (readings, batches, tick records, on-chain commands) are versioned
//! by their own leading bytes and live with their codecs (`bitmote-device`,
//! `bitmote-pay::tick`, `bitmote-actuator::command`).

pub mod actuator;
pub mod api;
#[cfg(feature = "client")]
pub mod client;
pub mod notary;
pub mod topic;

pub use actuator::{Ack, AckResult, Command, Presence};
pub use api::ErrorBody;
pub use notary::{Receipt, Receipts};

/// A message's version: absent on the wire means 1. Decoding refuses any other (see the
/// crate docs: a version a receiver does not know is an "even" change).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Version;

impl Version {
    /// The one version this crate speaks.
    pub const CURRENT: u32 = 1;

    /// Serde's `skip_serializing_if`: version 1 is not written (the wire stays as it was).
    pub fn is_current(_: &Version) -> bool {
        true
    }
}

impl serde::Serialize for Version {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(Self::CURRENT)
    }
}

impl<'de> serde::Deserialize<'de> for Version {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = u32::deserialize(d)?;
        if v == Self::CURRENT {
            Ok(Version)
        } else {
            Err(serde::de::Error::custom(format_args!("message version {v} is not supported (this receiver speaks version 1)")))
        }
    }
}

/// Decode a JSON message of type `T` from bytes (MQTT payloads, HTTP bodies).
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, serde_json::Error> {
    serde_json::from_slice(bytes)
}

/// Encode a message as JSON bytes.
pub fn encode<T: serde::Serialize>(msg: &T) -> Vec<u8> {
    // Serializing these types cannot fail: no maps with non-string keys, no custom errors.
    serde_json::to_vec(msg).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct M {
        #[serde(default, skip_serializing_if = "Version::is_current")]
        v: Version,
        x: u32,
    }

    #[test]
    fn version_one_is_implicit_and_others_are_refused() {
        assert_eq!(encode(&M { v: Version, x: 3 }), br#"{"x":3}"#);
        assert_eq!(decode::<M>(br#"{"x":3}"#).unwrap(), M { v: Version, x: 3 });
        assert_eq!(decode::<M>(br#"{"v":1,"x":3}"#).unwrap(), M { v: Version, x: 3 });
        let e = decode::<M>(br#"{"v":2,"x":3}"#).unwrap_err().to_string();
        assert!(e.contains("version 2 is not supported"), "{e}");
        // Unknown fields are the compatible ("odd") kind of change.
        assert_eq!(decode::<M>(br#"{"x":3,"later":true}"#).unwrap(), M { v: Version, x: 3 });
    }
}
