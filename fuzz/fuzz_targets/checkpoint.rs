//! The C2SP checkpoint / signed-note parser (`bitmote_notary::checkpoint`): verifier keys,
//! notes and checkpoint bodies, as `bitmote verify` and a witness read them from a
//! gateway. Input: a verifier key line, then the note. Properties: a parsed key prints
//! back to itself (key id in lower case); a note verifies under our own key only if it carries our signature
//! line for its text; a parsed body prints to a body that parses the same; signing a parsed
//! checkpoint and verifying it gives it back.
#![no_main]
use bitmote_notary::checkpoint::{Checkpoint, CheckpointSigner, Verifier};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn signer() -> &'static CheckpointSigner {
    static S: OnceLock<CheckpointSigner> = OnceLock::new();
    S.get_or_init(|| CheckpointSigner::from_seed("fuzz.example/log", [7; 32]))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (vkey, note) = text.split_once('\n').unwrap_or((text, ""));
    if let Ok(v) = Verifier::parse(vkey) {
        // It prints back to itself, but for the case of the key id's hex digits (accepted
        // in either case, as the Go reference does; printed in lower case).
        let mut parts: Vec<String> = vkey.splitn(3, '+').map(str::to_string).collect();
        parts[1].make_ascii_lowercase();
        assert_eq!(v.vkey(), parts.join("+"), "a verifier key prints back to itself");
        assert_eq!(Verifier::parse(&v.vkey()).expect("a printed key parses").vkey(), v.vkey());
        let _ = v.verify_checkpoint(note);
    }
    let ours = signer().verifier();
    // Anything that verifies under our key carries our (deterministic) signature of its text.
    if let Ok(body) = ours.open(note) {
        let signed = signer().sign_note(body).expect("verified text is signable");
        let line = &signed[body.len() + 1..];
        assert!(note.starts_with(body) && note.contains(line), "a note verified without our signature line");
    }
    if let Ok(cp) = Checkpoint::parse_body(note) {
        assert_eq!(Checkpoint::parse_body(&cp.body()).expect("a printed body parses"), cp);
        if let Ok(signed) = signer().sign_checkpoint(&cp) {
            assert_eq!(ours.verify_checkpoint(&signed).expect("our own note verifies"), cp);
        }
    }
});
