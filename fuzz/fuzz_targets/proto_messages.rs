//! The JSON messages devices and the gateway decode from each other (`bitmote-proto`):
//! a command on an actuator's topic, an acknowledgement, receipts and error bodies on a
//! sensor's topics. Properties: decoding never panics; whatever decodes encodes and decodes
//! back to the same message; an ack's result is one of the three it may be.
#![no_main]
use bitmote_proto::{decode, encode, Ack, AckResult, Command, ErrorBody, Receipts};
use libfuzzer_sys::fuzz_target;

fn round_trip<T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(data: &[u8]) -> Option<T> {
    let m: T = decode(data).ok()?;
    let back: T = decode(&encode(&m)).expect("an encoded message decodes");
    assert_eq!(back, m, "round trip changed the message");
    Some(m)
}

fuzz_target!(|data: &[u8]| {
    if let Some(a) = round_trip::<Ack>(data) {
        assert!(matches!(a.result, AckResult::Done | AckResult::Expired | AckResult::Refused));
    }
    if let Some(c) = round_trip::<Command>(data) {
        let _ = c.is_late(u64::MAX);
    }
    round_trip::<Receipts>(data);
    round_trip::<ErrorBody>(data);
});
