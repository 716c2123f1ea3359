//! The binary ingest format (HTTP `application/octet-stream` and MQTT payloads):
//! `bitmote_notary::ingest::Submission::decode` of a signed reading (`'R'`) or signed
//! batch (`'B'`, `bitmote_device::batch`). Properties: re-encoding gives the input bytes;
//! a decoded batch is one device with consecutive sequence numbers, its root computes,
//! and every membership proof of it leads back to that root; the size bound holds.
#![no_main]
use bitmote_device::merkle;
use bitmote_device::batch::reading_leaf_hash;
use bitmote_notary::ingest::{Submission, MAX_SUBMISSION_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(sub) = Submission::decode(data) else { return };
    assert!(data.len() <= MAX_SUBMISSION_BYTES);
    assert!(!sub.is_empty());
    match &sub {
        Submission::Reading(r) => assert_eq!(r.encode(), data, "signed reading: decode then encode differs"),
        Submission::Batch(b) => {
            assert_eq!(b.encode(), data, "signed batch: decode then encode differs");
            // What ingest does before accepting: the batch shape and root.
            if let Ok(root) = b.root() {
                let rs = &b.readings;
                for w in rs.windows(2) {
                    assert_eq!(w[0].device, w[1].device);
                    assert_eq!(w[0].seq + 1, w[1].seq);
                }
                // Membership proofs (as stored for each reading) lead back to the signed root.
                for i in [0, rs.len() / 2, rs.len() - 1] {
                    let m = b.batch_proof(i).expect("a proof for a reading of the batch");
                    let r = merkle::root_from_inclusion_proof(m.index as u64, m.count as u64, &reading_leaf_hash(&rs[i]), &m.proof)
                        .expect("a batch proof verifies");
                    assert_eq!(bitmote_device::batch::batch_message(&rs[0].device, m.first_seq, m.count, &r), root);
                }
            }
        }
    }
});
