//! The reading wire format (`bitmote_device::reading`), and the keys, signatures and
//! evidence records (`sign`, `batch::Evidence`) that travel with it. The first byte
//! picks the decoder. Property: a decoder accepts only the canonical encoding, so
//! anything decoded re-encodes to exactly the input bytes (one reading, one id).
#![no_main]
use bitmote_device::{DeviceId, Evidence, PublicKey, Reading, Signature};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, b)) = data.split_first() else { return };
    match which % 4 {
        0 => {
            if let Ok(r) = Reading::decode(b) {
                assert_eq!(r.encode(), b, "Reading: decode then encode differs");
                r.validate().expect("a decoded reading is valid");
                let _ = r.id();
                let _ = r.value_string();
                let id: DeviceId = r.device.to_string().parse().expect("a device id parses back");
                assert_eq!(id, r.device);
            }
        }
        1 => {
            if let Ok(k) = PublicKey::decode(b) {
                assert_eq!(k.encode(), b, "PublicKey: decode then encode differs");
                let again: PublicKey = k.to_string().parse().expect("a key's text parses back");
                assert_eq!(again, k);
            }
        }
        2 => {
            if let Ok(s) = Signature::decode(b) {
                assert_eq!(&s.encode()[..], b, "Signature: decode then encode differs");
                assert_eq!(Signature::from_hex(&s.to_hex()).expect("hex parses back"), s);
            }
        }
        _ => {
            if let Ok(e) = Evidence::decode(b) {
                assert_eq!(e.encode(), b, "Evidence: decode then encode differs");
            }
        }
    }
});
