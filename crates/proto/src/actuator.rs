//! Actuators: the commands the gateway sends (`bitmote/<name>/commands`), the device's
//! acknowledgements (`bitmote/<name>/acks`) and its presence (`bitmote/<name>/presence`).
//! The same [`Command`] is the body of a webhook and the stdin of a program delivery.

use serde::{Deserialize, Serialize};

use crate::Version;

/// An action for a device, as delivered (MQTT, webhook, program). The event id is the same
/// on every attempt, so receivers execute each id once. Only the event id is required to
/// decode: the gateway always sends every field, and a device judges what it gets.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Command {
    #[serde(default, skip_serializing_if = "Version::is_current")]
    pub v: Version,
    pub event_id: String,
    /// The rule that made it due.
    #[serde(default)]
    pub rule: String,
    #[serde(default)]
    pub device: String,
    /// The command word (`unlock`, `lock`, `on`, `off`, `open`, `close`, or the rule's own).
    #[serde(default)]
    pub command: String,
    /// The rule's arguments, as written in the rule (free-form JSON).
    #[serde(default)]
    pub args: serde_json::Value,
    /// The triggering transaction (payment and command rules).
    #[serde(default)]
    pub txid: Option<String>,
    /// Height at which it became due.
    #[serde(default)]
    pub height: u32,
    /// Blocks the trigger was buried under when it became due (none for heights).
    #[serde(default)]
    pub confirmations: Option<u32>,
    /// The payment that triggered it, for devices that check it themselves.
    #[serde(default)]
    pub payment: Option<Payment>,
    /// The Lightning payment that triggered it (Lightning rules).
    #[serde(default)]
    pub lightning: Option<LightningPayment>,
    /// When it became due (ms since the Unix epoch).
    #[serde(default)]
    pub due_ms: Option<u64>,
    /// How long after `due_ms` it may still be executed.
    #[serde(default)]
    pub ttl_ms: Option<u64>,
    /// For a revert, the event id of the action it undoes.
    #[serde(default)]
    pub reverts: Option<String>,
}

impl Command {
    /// Whether it arrived after its time-to-live (`now_ms` past `due_ms + ttl_ms`; never
    /// when either is missing).
    pub fn is_late(&self, now_ms: u64) -> bool {
        matches!((self.due_ms, self.ttl_ms), (Some(due), Some(ttl)) if now_ms > due.saturating_add(ttl))
    }
}

/// A payment that triggered an action: where it is, what it pays to whom.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    pub txid: String,
    pub vout: u32,
    pub address: String,
    pub amount_sat: u64,
    /// Height of the block that holds it.
    pub height: u32,
}

/// A Lightning payment received by the gateway's node for an invoice of a Lightning rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LightningPayment {
    /// Hex of the payment hash (the invoice's, and the key of the action's exactly-once).
    pub payment_hash: String,
    /// What was received.
    pub amount_msat: u64,
    /// What the invoice asked for.
    pub invoice_msat: u64,
    /// The block height at which LDK fails the held payment back by itself (held invoices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_deadline: Option<u32>,
    /// Where the held payment stands (none for invoices claimed on arrival, before holding).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<ClaimState>,
}

/// A held Lightning payment: claimed only once its action is acknowledged, else failed back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClaimState {
    /// Claimable, waiting for the device's acknowledgement.
    Held,
    /// Claimed (the device acknowledged the action).
    Claimed,
    /// Failed back to the payer (the device refused, the action expired, or it was underpaid).
    FailedBack,
}

/// A device's answer to a [`Command`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    #[serde(default, skip_serializing_if = "Version::is_current")]
    pub v: Version,
    pub event_id: String,
    pub result: AckResult,
    /// Why it refused (with [`AckResult::Refused`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Ack {
    pub fn new(event_id: impl Into<String>, result: AckResult) -> Ack {
        Ack { v: Version, event_id: event_id.into(), result, reason: None }
    }

    pub fn refused(event_id: impl Into<String>, reason: impl Into<String>) -> Ack {
        Ack { reason: Some(reason.into()), ..Ack::new(event_id, AckResult::Refused) }
    }
}

/// What the device did with a command. A closed set: an ack with any other result does not
/// decode, so a typo or a newer device's value is never taken for `done`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckResult {
    /// Executed (now, or already before: a redelivered command is acknowledged again).
    Done,
    /// Arrived after its time-to-live; not executed.
    Expired,
    /// Refused by the device's own checks (light-client mode); see [`Ack::reason`].
    Refused,
}

/// A device's presence, retained on `bitmote/<name>/presence`: the plain words `online`
/// and (its last will) `offline`, not JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Presence {
    Online,
    Offline,
}

impl Presence {
    pub fn as_str(self) -> &'static str {
        match self {
            Presence::Online => "online",
            Presence::Offline => "offline",
        }
    }

    /// A presence payload: exactly `online` is online; anything else counts as offline.
    pub fn from_payload(payload: &[u8]) -> Presence {
        if payload == b"online" {
            Presence::Online
        } else {
            Presence::Offline
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode, encode};

    #[test]
    fn acks_decode_their_three_results_and_refuse_others() {
        let a: Ack = decode(br#"{"event_id":"r:1","result":"done"}"#).unwrap();
        assert_eq!(a, Ack::new("r:1", AckResult::Done));
        let r: Ack = decode(br#"{"event_id":"r:1","result":"refused","reason":"no payment"}"#).unwrap();
        assert_eq!(r, Ack::refused("r:1", "no payment"));
        assert_eq!(decode::<Ack>(br#"{"event_id":"r:1","result":"expired"}"#).unwrap().result, AckResult::Expired);
        for bad in [
            &br#"{"event_id":"r:1","result":"Done"}"#[..],
            br#"{"event_id":"r:1","result":"ok"}"#,
            br#"{"event_id":"r:1"}"#,
            br#"{"result":"done"}"#,
        ] {
            assert!(decode::<Ack>(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        // The wire form is what devices have always sent.
        assert_eq!(encode(&Ack::new("r:1", AckResult::Done)), br#"{"event_id":"r:1","result":"done"}"#);
    }

    #[test]
    fn a_command_round_trips_and_reads_its_ttl() {
        let c = Command {
            v: Version,
            event_id: "rent:ab:0".into(),
            rule: "rent".into(),
            device: "lock-1".into(),
            command: "unlock".into(),
            args: serde_json::json!({ "minutes": 5 }),
            txid: Some("ab".into()),
            height: 7,
            confirmations: Some(1),
            payment: Some(Payment { txid: "ab".into(), vout: 0, address: "bcrt1q".into(), amount_sat: 1000, height: 7 }),
            lightning: None,
            due_ms: Some(1_000),
            ttl_ms: Some(500),
            reverts: None,
        };
        assert_eq!(decode::<Command>(&encode(&c)).unwrap(), c);
        assert!(!c.is_late(1_500) && c.is_late(1_501));
        assert!(!Command { ttl_ms: None, ..c.clone() }.is_late(u64::MAX));
        assert!(!Command { due_ms: None, ..c }.is_late(u64::MAX));
        // Only the event id is required: a device decodes (and then judges) whatever a
        // gateway, or someone posing as one, sends it.
        let bare: Command = decode(br#"{"event_id":"x","command":"unlock"}"#).unwrap();
        assert_eq!((bare.event_id.as_str(), bare.command.as_str(), bare.payment), ("x", "unlock", None));
    }

    #[test]
    fn presence_is_online_only_when_it_says_so() {
        assert_eq!(Presence::from_payload(b"online"), Presence::Online);
        for p in [&b"offline"[..], b"", b"Online", b"online\n"] {
            assert_eq!(Presence::from_payload(p), Presence::Offline);
        }
    }
}
