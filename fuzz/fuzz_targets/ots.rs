//! The OpenTimestamps `.ots` parser (`bitmote_notary::ots::DetachedTimestampFile::deserialize`),
//! which `bitmote verify --ots` runs on a file the user hands it. Properties: a parsed file
//! serializes, the result parses to the same timestamp and serializes to the same bytes
//! (a fixed point), and evaluating every path of the tree and checking it against a
//! chain without headers neither panics nor succeeds.
#![no_main]
use bitmote_notary::ots::DetachedTimestampFile;
use bitmote_notary::verify::{verify_ots, HeadersFile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(f) = DetachedTimestampFile::deserialize(data) else { return };
    let bytes = f.serialize().expect("a parsed timestamp serializes");
    let again = DetachedTimestampFile::deserialize(&bytes).expect("a serialized timestamp parses");
    assert_eq!(again, f, "serialize then deserialize changed the timestamp");
    assert_eq!(again.serialize().unwrap(), bytes, "serialization is not a fixed point");
    for (_attestation, msg) in f.timestamp.evaluate() {
        let _ = msg.len();
    }
    let _ = f.matches_file(b"");
    assert!(verify_ots(b"", &f, &HeadersFile::default()).is_err(), "verified against no headers");
});
