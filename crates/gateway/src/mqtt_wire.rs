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
            Who::Device { .. } => self
                .prefixes()
                .iter()
                .any(|p| topic.strip_prefix(p.as_str()).is_some_and(|rest| matches!(rest, "readings" | "acks" | "presence"))),
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
    /// A field longer than the front allows: answered with this CONNACK code (2 for the
    /// client id, 4 for the login, 5 for the last will).
    TooLarge(u8, String),
}

/// The longest client id the front takes (it prefixes the device's label, and the result
/// must still fit MQTT's 65,535-byte strings: a longer one would be cut when re-encoded,
/// and the broker would read the client's bytes as other fields).
pub const MAX_CLIENT_ID: usize = 128;
/// The longest username and password (a device's are 64 and 64 hex digits).
pub const MAX_LOGIN: usize = 256;
/// The longest last-will topic and payload.
pub const MAX_WILL_TOPIC: usize = 256;
pub const MAX_WILL_PAYLOAD: usize = 4096;

/// Check the sizes of a CONNECT's fields against the front's limits.
pub fn check_sizes(c: &Connect) -> Result<(), ConnectRefusal> {
    if c.client_id.len() > MAX_CLIENT_ID {
        return Err(ConnectRefusal::TooLarge(2, format!("a client id of {} bytes (at most {MAX_CLIENT_ID})", c.client_id.len())));
    }
    if let Some(l) = &c.login {
        if l.username.len() > MAX_LOGIN || l.password.len() > MAX_LOGIN {
            return Err(ConnectRefusal::TooLarge(4, format!("a username or password over {MAX_LOGIN} bytes")));
        }
    }
    if let Some(w) = &c.last_will {
        if w.topic.len() > MAX_WILL_TOPIC || w.message.len() > MAX_WILL_PAYLOAD {
            return Err(ConnectRefusal::TooLarge(
                5,
                format!("a last will of {} + {} bytes (at most {MAX_WILL_TOPIC} + {MAX_WILL_PAYLOAD})", w.topic.len(), w.message.len()),
            ));
        }
    }
    Ok(())
}

/// Encode the CONNECT the front sends the broker, and read it back: it must say exactly
/// what the front checked (nothing cut, nothing shifted), or it is not sent.
pub fn encode_checked(c: &Connect) -> Result<BytesMut, String> {
    let mut out = BytesMut::new();
    c.write(&mut out).map_err(|e| format!("encoding CONNECT: {e:?}"))?;
    let mut again = out.clone();
    let back = match next_packet(&mut again)? {
        Some((fh, bytes)) if again.is_empty() => read_connect(fh, bytes).map_err(|e| format!("re-reading the CONNECT: {e:?}"))?,
        _ => return Err("the re-encoded CONNECT is not one whole packet".into()),
    };
    if &back != c {
        return Err("the re-encoded CONNECT does not read back the same".into());
    }
    Ok(out)
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
