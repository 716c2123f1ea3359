//! The proof bundle JSON and the headers file that `bitmote verify` reads
//! (`bitmote_notary::proof::ProofBundle`, `verify::verify_bundle`, `verify::HeadersFile`).
//! The first byte picks the bundle or the headers file. Properties: a parsed bundle prints
//! and parses back the same; its parts decode without panicking; it never verifies
//! against an empty chain (a verified bundle names a block); a parsed headers file prints
//! back to a file that parses the same.
#![no_main]
use bitmote_notary::proof::ProofBundle;
use bitmote_notary::verify::{verify_bundle, HeadersFile, Policy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, b)) = data.split_first() else { return };
    if which & 1 == 0 {
        let Ok(bundle) = serde_json::from_slice::<ProofBundle>(b) else { return };
        let text = serde_json::to_string(&bundle).expect("a bundle serializes");
        assert_eq!(serde_json::from_str::<ProofBundle>(&text).expect("a printed bundle parses"), bundle);
        let _ = bundle.reading_bytes();
        let _ = bundle.parsed_evidence();
        let _ = bundle.log_path();
        let _ = bundle.anchor_parts();
        if let Ok(ots) = bundle.to_ots() {
            let _ = ots.serialize();
        }
        let none = HeadersFile::default();
        assert!(verify_bundle(&bundle, &none, &Policy::default()).is_err(), "verified without a chain");
        let key = "fuzz.example/log+00000000+AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        let _ = verify_bundle(&bundle, &none, &Policy { reading_file: Some(b""), revoked: &[], checkpoint_key: Some(key) });
    } else {
        let Ok(text) = std::str::from_utf8(b) else { return };
        let Ok(h) = HeadersFile::parse(text) else { return };
        let printed = h.to_text();
        let again = HeadersFile::parse(&printed).expect("a printed headers file parses");
        assert_eq!(again.to_text(), printed);
    }
});
