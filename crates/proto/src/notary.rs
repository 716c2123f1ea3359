//! Notarization: the gateway's receipts for durable readings (MQTT `bitmote/<id>/receipts`
//! and the answer to `POST /v1/readings`), and device enrolment over the admin API.

use serde::{Deserialize, Serialize};

/// Acknowledgement of one durable reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The reading's id (SHA-256 of its canonical encoding), 64 hex digits on the wire.
    #[serde(with = "crate::api::hex32")]
    pub reading_id: [u8; 32],
    pub leaf_index: u64,
    /// Size of the log right after the commit that made this reading durable (for a
    /// re-acknowledged reading: the size when it was re-acknowledged).
    pub tree_size: u64,
}

/// The receipts of one submission (a reading, or every reading of a batch, in order).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipts {
    pub receipts: Vec<Receipt>,
}

/// `POST /v1/devices` (admin): enrol a device key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolRequest {
    /// The device's public key: BIP340 x-only or compressed P-256, in hex.
    pub public_key: String,
    /// The device's name (a single MQTT topic level).
    #[serde(default)]
    pub name: Option<String>,
}

/// A device as the gateway's registry holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// The device id (64 hex digits).
    pub id: String,
    /// Its public key (hex).
    pub pubkey: String,
    pub name: String,
    pub enrolled_ms: u64,
    #[serde(default)]
    pub revoked_ms: Option<u64>,
    #[serde(default)]
    pub revoke_reason: Option<String>,
    /// Highest sequence number accepted so far.
    #[serde(default)]
    pub last_seq: Option<u64>,
}

impl DeviceRecord {
    pub fn is_revoked(&self) -> bool {
        self.revoked_ms.is_some()
    }
}

/// MQTT credentials issued at enrolment; the password is shown only in this answer.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MqttLogin {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for MqttLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttLogin").field("username", &self.username).field("password", &"<redacted>").finish()
    }
}

/// The answer to an enrolment: the device and its new MQTT login.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolment {
    pub device: DeviceRecord,
    pub mqtt: MqttLogin,
}

/// `POST /v1/devices/{id}/revoke` (admin).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokeRequest {
    pub reason: String,
}

/// An answer naming one device (`revoke`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceAnswer {
    pub device: DeviceRecord,
}

/// `GET /v1/devices`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceList {
    pub devices: Vec<DeviceRecord>,
}

/// `GET /v1/log`: the log's identity (its origin, which on-chain commands are signed
/// for) and its head, with a signed checkpoint of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogInfo {
    pub origin: String,
    pub tree_size: u64,
    /// Hex of the root at `tree_size`.
    pub root: String,
    /// A C2SP signed note of (origin, size, root).
    pub checkpoint: String,
    pub verifier_key: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode, encode};

    #[test]
    fn receipts_carry_the_reading_id_as_hex() {
        let r = Receipts { receipts: vec![Receipt { reading_id: [0xab; 32], leaf_index: 4, tree_size: 5 }] };
        let text = String::from_utf8(encode(&r)).unwrap();
        assert_eq!(text, format!(r#"{{"receipts":[{{"reading_id":"{}","leaf_index":4,"tree_size":5}}]}}"#, "ab".repeat(32)));
        assert_eq!(decode::<Receipts>(text.as_bytes()).unwrap(), r);
        assert!(decode::<Receipts>(br#"{"receipts":[{"reading_id":"ab","leaf_index":4,"tree_size":5}]}"#).is_err());
    }

    #[test]
    fn the_mqtt_password_never_shows_in_debug() {
        let l = MqttLogin { username: "u".into(), password: "secret".into() };
        assert!(!format!("{l:?}").contains("secret"));
    }
}
