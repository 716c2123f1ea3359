//! MQTT topics. `<id>` is a device id (64 hex digits), `<name>` an actuator's name (the
//! `device` of its rules); both are one topic level.
//!
//! * `bitmote/<id>/readings` — a sensor publishes (QoS 1) a signed reading or batch in the
//!   binary wire format (`bitmote_device::batch`);
//! * `bitmote/<id>/receipts` — the gateway answers once they are durable ([`crate::Receipts`]);
//! * `bitmote/<id>/errors` — or says why not ([`crate::ErrorBody`]);
//! * `bitmote/<name>/commands` — the gateway sends an actuator its [`crate::Command`]s;
//! * `bitmote/<name>/acks` — the actuator answers each with an [`crate::Ack`];
//! * `bitmote/<name>/presence` — `online` (retained), its last will `offline` ([`crate::Presence`]).

/// Topic a device publishes readings on.
pub fn readings(device: &str) -> String {
    format!("bitmote/{device}/readings")
}
/// Topic the gateway publishes receipts on.
pub fn receipts(device: &str) -> String {
    format!("bitmote/{device}/receipts")
}
/// Topic the gateway publishes refusals on.
pub fn errors(device: &str) -> String {
    format!("bitmote/{device}/errors")
}
/// Topic an actuator receives commands on.
pub fn commands(device: &str) -> String {
    format!("bitmote/{device}/commands")
}
/// Topic an actuator acknowledges commands on.
pub fn acks(device: &str) -> String {
    format!("bitmote/{device}/acks")
}
/// Topic an actuator reports its presence on (retained, with a last will).
pub fn presence(device: &str) -> String {
    format!("bitmote/{device}/presence")
}

/// What the gateway subscribes to: every device's readings, acknowledgements and presence.
pub const GATEWAY_SUBSCRIPTIONS: [&str; 3] = ["bitmote/+/readings", "bitmote/+/acks", "bitmote/+/presence"];

/// What a topic the gateway receives on is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inbound<'a> {
    Readings(&'a str),
    Acks(&'a str),
    Presence(&'a str),
}

impl<'a> Inbound<'a> {
    /// Parse `bitmote/<device>/{readings,acks,presence}`; anything else is not for the gateway.
    pub fn parse(topic: &'a str) -> Option<Inbound<'a>> {
        let (device, kind) = topic.strip_prefix("bitmote/")?.split_once('/')?;
        if device.is_empty() || device.contains(['+', '#']) {
            return None;
        }
        match kind {
            "readings" => Some(Inbound::Readings(device)),
            "acks" => Some(Inbound::Acks(device)),
            "presence" => Some(Inbound::Presence(device)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_topics_parse_and_others_do_not() {
        assert_eq!(Inbound::parse(&readings("ab")), Some(Inbound::Readings("ab")));
        assert_eq!(Inbound::parse(&acks("lock-1")), Some(Inbound::Acks("lock-1")));
        assert_eq!(Inbound::parse(&presence("lock-1")), Some(Inbound::Presence("lock-1")));
        for t in [commands("x"), receipts("x"), errors("x"), "bitmote//acks".into(), "bitmote/a/b/acks".into(), "other/a/acks".into()] {
            assert_eq!(Inbound::parse(&t), None, "{t}");
        }
    }
}
