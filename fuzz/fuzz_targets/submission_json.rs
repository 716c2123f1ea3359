//! The JSON ingest format (HTTP `application/json`):
//! `bitmote_notary::ingest::Submission::from_json`. Properties: a parsed submission
//! printed back as JSON parses to the same submission (readings and signature, floats to
//! the bit), and each of its readings has a canonical binary encoding that decodes to it.
#![no_main]
use bitmote_device::Reading;
use bitmote_notary::ingest::{ReadingJson, Submission};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(sub) = Submission::from_json(data) else { return };
    let json = match &sub {
        Submission::Reading(r) => serde_json::json!({ "reading": ReadingJson::from_reading(&r.reading), "signature": r.signature.to_hex() }),
        Submission::Batch(b) => serde_json::json!({
            "batch": b.readings.iter().map(ReadingJson::from_reading).collect::<Vec<_>>(),
            "signature": b.signature.to_hex(),
        }),
    };
    let text = serde_json::to_vec(&json).unwrap();
    let again = Submission::from_json(&text).expect("a printed submission parses");
    assert_eq!(again, sub, "JSON round trip changed the submission");
    for r in sub.readings() {
        assert_eq!(&Reading::decode(&r.encode()).expect("a JSON reading has a binary encoding"), r);
    }
});
