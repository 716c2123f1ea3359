//! The MQTT front's reading of a client's bytes (`bitmote_gateway::mqtt_wire`, the code the
//! public MQTT port runs before anything reaches the broker): framing, the first packet as
//! a CONNECT, then every later packet checked against the client's topics. Input: the
//! client's byte stream; its first byte picks who is logged in (admin, a device by id, a
//! device with a name). Properties: framing takes exactly one whole packet and never more
//! than the limit; a CONNECT the front accepts is 3.1.1 and re-encodes (with the front's
//! rewritten client id and login) to a CONNECT that reads back the same; a packet that
//! passes the check is a PUBLISH only on the device's own device-to-gateway topics, or a
//! SUBSCRIBE only under its own prefix.
#![no_main]
use bitmote_device::DeviceId;
use bitmote_fuzz::mqtt_wire::{allowed, next_packet, read_connect, Who, MAX_PACKET};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use rumqttc::mqttbytes::v4::{Connect, Login, Publish, Subscribe};
use rumqttc::mqttbytes::{PacketType, Protocol};

fuzz_target!(|data: &[u8]| {
    let Some((&which, stream)) = data.split_first() else { return };
    let id = DeviceId([0xab; 32]);
    let who = match which % 3 {
        0 => Who::Admin,
        1 => Who::Device { id, name: None },
        _ => Who::Device { id, name: Some("pump".into()) },
    };
    let label = who.label();
    let mut buf = BytesMut::from(stream);
    let len = buf.len();
    let (fh, first) = match next_packet(&mut buf) {
        Ok(Some(p)) => p,
        Ok(None) => {
            assert_eq!(buf.len(), len, "an incomplete packet was consumed");
            return;
        }
        Err(_) => return,
    };
    assert!(first.len() <= MAX_PACKET && first.len() == fh.frame_length());
    assert_eq!(&first[..], &stream[..first.len()], "framing took other bytes than the first packet");
    let Ok(mut connect) = read_connect(fh, first) else { return };
    assert_eq!(connect.protocol, Protocol::V4);
    // What the front forwards to the broker.
    connect.client_id = format!("{label}.{}", connect.client_id);
    connect.login = Some(Login::new("bitmote-front", "secret"));
    let mut out = BytesMut::new();
    if connect.write(&mut out).is_ok() {
        let mut o = out.clone();
        let (fh2, b2) = next_packet(&mut o).expect("a written CONNECT frames").expect("whole");
        assert!(o.is_empty());
        let back = Connect::read(fh2, b2).expect("a written CONNECT reads back");
        assert_eq!(back, connect, "the rewritten CONNECT changed on the way to the broker");
    }
    // Then every packet of the stream, as the front checks it.
    loop {
        let before = buf.len();
        let (fh, bytes) = match next_packet(&mut buf) {
            Ok(Some(p)) => p,
            Ok(None) => {
                assert_eq!(buf.len(), before);
                return;
            }
            Err(_) => return,
        };
        assert_eq!(before - buf.len(), bytes.len());
        if allowed(&who, &label, fh, &bytes).is_err() {
            return;
        }
        match fh.packet_type() {
            Ok(PacketType::Publish) => {
                let p = Publish::read(fh, bytes).unwrap();
                if let Who::Device { name, .. } = &who {
                    let ok = ["readings", "acks", "presence"].iter().any(|t| {
                        p.topic == format!("bitmote/{id}/{t}") || name.as_ref().is_some_and(|n| p.topic == format!("bitmote/{n}/{t}"))
                    });
                    assert!(ok, "a device published on {:?}", p.topic);
                }
            }
            Ok(PacketType::Subscribe) => {
                let s = Subscribe::read(fh, bytes).unwrap();
                if let Who::Device { name, .. } = &who {
                    for f in &s.filters {
                        let under = |p: String| f.path.len() > p.len() && f.path.starts_with(&p);
                        assert!(under(format!("bitmote/{id}/")) || name.as_ref().is_some_and(|n| under(format!("bitmote/{n}/"))), "a device subscribed to {:?}", f.path);
                    }
                }
            }
            Ok(PacketType::Connect) => panic!("a second CONNECT passed"),
            _ => {}
        }
    }
});
