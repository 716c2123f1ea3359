//! What every HTTP API and MQTT error topic answers with on a refusal, and small serde
//! helpers shared by the messages.

use serde::{Deserialize, Serialize};

/// An error: a message for people and a stable code for programs. HTTP answers carry it
/// with a 4xx/5xx status; MQTT devices get it on `bitmote/<id>/errors`. Clients branch on
/// `code` (and the HTTP status), never on the message text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    /// A stable code (`bad_request`, `disk_full`, `replay`, …); empty when an older server
    /// sent none.
    #[serde(default)]
    pub code: String,
    /// With `replay`: the last sequence number the gateway accepted from this device, so a
    /// device that lost its counter goes on after it (added compatibly: older gateways
    /// send none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<u64>,
}

impl ErrorBody {
    pub fn new(error: impl Into<String>, code: impl Into<String>) -> ErrorBody {
        ErrorBody { error: error.into(), code: code.into(), last_seq: None }
    }

    /// Whether nothing was stored for a reason that passes (a full disk, a storage error,
    /// the gateway stopping): the same readings may be sent again.
    pub fn is_transient(&self) -> bool {
        matches!(self.code.as_str(), "disk_full" | "storage" | "shutting_down")
    }
}

/// 32 bytes as 64 hex digits (lower case out; either case in).
pub mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        parse(&s).ok_or_else(|| serde::de::Error::custom("expected 64 hex digits"))
    }

    /// Parse 64 hex digits.
    pub fn parse(s: &str) -> Option<[u8; 32]> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_without_a_code_still_decodes() {
        let e: ErrorBody = crate::decode(br#"{"error":"nope"}"#).unwrap();
        assert_eq!(e, ErrorBody::new("nope", ""));
        assert!(ErrorBody::new("x", "disk_full").is_transient() && !ErrorBody::new("x", "replay").is_transient());
    }

    #[test]
    fn hex32_refuses_anything_but_64_hex_digits() {
        assert_eq!(hex32::parse(&"0F".repeat(32)), Some([0x0f; 32]));
        for bad in ["", "0f", &"0g".repeat(32), &"0f".repeat(33)] {
            assert_eq!(hex32::parse(bad), None, "{bad}");
        }
    }
}
