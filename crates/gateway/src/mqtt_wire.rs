//! The MQTT front's reading of untrusted bytes, with no I/O and no gateway state: framing,
//! the CONNECT a client opens with, and whether a client may send a packet. The front
//! ([`crate::mqtt_front`]) calls these on every byte a client sends. This file uses nothing
//! of the gateway crate (`crate::`), so the fuzz targets (`fuzz/`) compile it on its own,
//! without the gateway's Lightning node.

use bitmote_device::DeviceId;
use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{Connect, Publish, Subscribe};
use rumqttc::mqttbytes::{check, FixedHeader, PacketType, Protocol};

/// The operator's MQTT user name (its password is the admin token).
pub const ADMIN_USER: &str = "admin";
/// Largest MQTT packet the front accepts (the broker's payload limit, plus headers).
pub const MAX_PACKET: usize = (1 << 20) + 4096;

/// Who is connected: the operator, or a device with the topic prefixes it owns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Who {
    Admin,
    Device { id: DeviceId, name: Option<String> },
}

impl Who {
    fn prefixes(&self) -> Vec<String> {
        match self {
            Who::Admin => vec![],
            Who::Device { id, name } => {
                let mut v = vec![format!("bitmote/{id}/")];
                v.extend(name.iter().map(|n| format!("bitmote/{n}/")));
                v
            }
        }
    }

    /// A device publishes only on its own device-to-gateway topics.
    pub fn may_publish(&self, topic: &str) -> bool {
        match self {
            Who::Admin => true,
            Who::Device { .. } => self.prefixes().iter().any(|p| {
                topic.strip_prefix(p.as_str()).is_some_and(|rest| matches!(rest, "readings" | "acks" | "presence"))
            }),
        }
    }

    /// A device subscribes only to filters under its own prefix (wildcards below it cannot
    /// reach another device's topics, since topic-safe names contain no `/`).
    pub fn may_subscribe(&self, filter: &str) -> bool {
        match self {
            Who::Admin => true,
            Who::Device { .. } => self.prefixes().iter().any(|p| filter.strip_prefix(p.as_str()).is_some_and(|rest| !rest.is_empty())),
        }
    }

    /// The name logs and client-id namespaces use.
    pub fn label(&self) -> String {
        match self {
            Who::Admin => ADMIN_USER.to_string(),
            Who::Device { id, .. } => id.to_string(),
        }
    }
}

/// Whether a device name can be used in topics: no MQTT separators or wildcards, and not
/// something that could be read as another identity (a device id, the admin user).
pub fn topic_safe(name: &str) -> bool {
    let looks_like_an_id = name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit());
    !(name.is_empty() || name.contains(['/', '+', '#', '\0']) || looks_like_an_id || name == ADMIN_USER || name.starts_with('$'))
}

/// The next whole packet at the front of `buf` (its fixed header and bytes, fixed header
/// included), taken out of `buf`; `None` if more bytes are needed. A packet larger than
/// [`MAX_PACKET`] or a malformed fixed header is an error (the connection is closed).
pub fn next_packet(buf: &mut BytesMut) -> Result<Option<(FixedHeader, Bytes)>, String> {
    match check(buf.iter(), MAX_PACKET) {
        Ok(fh) => Ok(Some((fh, buf.split_to(fh.frame_length()).freeze()))),
        Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(format!("malformed packet: {e:?}")),
    }
}

/// Why a client's first packet is not a CONNECT the front serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectRefusal {
    /// Another protocol or version than MQTT 3.1.1: answered with CONNACK 1.
    Unsupported(String),
    /// Not a CONNECT, or a malformed one: the connection is closed without an answer.
    Malformed(String),
}

/// Read the client's first packet as an MQTT 3.1.1 CONNECT.
pub fn read_connect(fh: FixedHeader, bytes: Bytes) -> Result<Connect, ConnectRefusal> {
    if !matches!(fh.packet_type(), Ok(PacketType::Connect)) {
        return Err(ConnectRefusal::Malformed("the first packet is not a CONNECT".into()));
    }
    let connect = match Connect::read(fh, bytes) {
        Ok(c) => c,
        Err(e @ (rumqttc::mqttbytes::Error::InvalidProtocol | rumqttc::mqttbytes::Error::InvalidProtocolLevel(_))) => {
            return Err(ConnectRefusal::Unsupported(format!("unsupported protocol: {e:?}")));
        }
        Err(e) => return Err(ConnectRefusal::Malformed(format!("malformed CONNECT: {e:?}"))),
    };
    if connect.protocol != Protocol::V4 {
        return Err(ConnectRefusal::Unsupported("only MQTT 3.1.1 is served".into()));
    }
    Ok(connect)
}

/// Whether the client may send this packet (a PUBLISH or SUBSCRIBE on its own topics, or a
/// packet that names no topic); why not, as the error that ends the connection (ending in
/// "refused" when the packet was well formed but its topic is not the client's).
pub fn allowed(who: &Who, label: &str, fh: FixedHeader, bytes: &Bytes) -> Result<(), String> {
    match fh.packet_type() {
        Ok(PacketType::Publish) => {
            let p = Publish::read(fh, bytes.clone()).map_err(|e| format!("malformed PUBLISH: {e:?}"))?;
            if !who.may_publish(&p.topic) {
                tracing::warn!(device = %label, topic = ?p.topic, "MQTT publish on a foreign topic refused; disconnecting");
                return Err(format!("publish on {} refused", p.topic));
            }
        }
        Ok(PacketType::Subscribe) => {
            let s = Subscribe::read(fh, bytes.clone()).map_err(|e| format!("malformed SUBSCRIBE: {e:?}"))?;
            if let Some(f) = s.filters.iter().find(|f| !who.may_subscribe(&f.path)) {
                tracing::warn!(device = %label, filter = ?f.path, "MQTT subscribe to a foreign topic refused; disconnecting");
                return Err(format!("subscribe to {} refused", f.path));
            }
        }
        Ok(PacketType::Connect) => return Err("a second CONNECT".into()),
        Ok(_) => {}
        Err(e) => return Err(format!("bad packet type: {e:?}")),
    }
    Ok(())
}
