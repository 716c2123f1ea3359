//! End to end against a real regtest bitcoind: devices sign readings (single and
//! batched, BIP340 and P-256), the notary logs and anchors them, and every reading's
//! proof verifies against the chain — with bitmote's verifier and with the standard
//! OpenTimestamps client (`ots`, from PyPI) — while tampering fails at the right step.

use std::path::Path;
use std::time::Duration;

use bitmote_chain::now_ms;
use bitmote_device::reading::{sensor, unit};
use bitmote_device::{Reading, SignedBatch, SignedReading, SigningKey, Value};
use bitmote_notary::anchor::{AnchorConfig, AnchorEvent, Anchorer, LogHead};
use bitmote_notary::checkpoint::CheckpointSigner;
use bitmote_notary::ingest::{IngestConfig, Ingestor, Receipt, Submission};
use bitmote_notary::log::MerkleLog;
use bitmote_notary::ots::DetachedTimestampFile;
use bitmote_notary::proof::{assemble, AnchorJson};
use bitmote_notary::registry::open_db;
use bitmote_notary::verify::{verify_bundle, verify_ots, HeadersFile, Policy, Step};
use bitmote_regtest::provision::{ensure_bitcoind, InstallOptions, LogProgress};
use bitmote_regtest::{RegtestNode, RegtestOptions};

mod common;

fn reading(k: &SigningKey, seq: u64, v: i64) -> Reading {
    Reading {
        device: k.public_key().device_id(),
        seq,
        timestamp_ms: now_ms(),
        sensor: sensor::TEMPERATURE,
        unit: unit::CELSIUS,
        value: Value::Scaled { mantissa: v, exponent: -2 },
    }
}

/// `ots verify` succeeded and said so.
fn ots_verified(node: &RegtestNode, file: &Path, ots: &Path) -> (bool, String) {
    let (ok, text) = common::ots_verify(node, file, ots);
    (ok && text.contains("Success!"), text)
}

#[test]
fn every_reading_gets_a_proof_that_bitmote_and_the_ots_client_verify() {
    let exe = ensure_bitcoind(&InstallOptions::default(), &mut LogProgress::new()).unwrap().bitcoind;
    let node = RegtestNode::start(RegtestOptions::new(exe)).unwrap();
    let c = node.client();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("notary.sqlite");
    let ing = Ingestor::start(&db, IngestConfig::default()).unwrap();
    let signer = CheckpointSigner::load_or_create(&dir.path().join("checkpoint.key"), "bitmote.test/log").unwrap();

    // Three devices: BIP340 single readings, P-256 single readings, BIP340 batches.
    let a = SigningKey::schnorr_from_secret(&[11; 32]).unwrap();
    let b = SigningKey::p256_from_secret(&[12; 32]).unwrap();
    let d = SigningKey::schnorr_from_secret(&[13; 32]).unwrap();
    for k in [&a, &b, &d] {
        ing.enroll(&k.public_key(), None).unwrap();
    }
    let mut receipts: Vec<(Receipt, Reading)> = vec![];
    for seq in 1..=5 {
        for k in [&a, &b] {
            let r = reading(k, seq, 2000 + seq as i64);
            let rc = ing.submit(Submission::Reading(SignedReading::sign(k, r.clone()).unwrap())).unwrap();
            receipts.push((rc[0], r));
        }
    }
    let batch: Vec<Reading> = (1..=7).map(|s| reading(&d, s, 1500 + s as i64)).collect();
    let rc = ing.submit(Submission::Batch(SignedBatch::sign(&d, batch.clone()).unwrap())).unwrap();
    receipts.extend(rc.into_iter().zip(batch));
    assert_eq!(receipts.len(), 17);

    let conn = open_db(&db).unwrap();
    // Before anchoring: the proof is pending and says so.
    let pending = assemble(&conn, c, &receipts[0].0.reading_id, Some(&signer)).unwrap();
    assert!(matches!(pending.anchor, AnchorJson::Pending { ref message } if message.contains("not anchored yet")));
    let headers_none = HeadersFile::default();
    let err = verify_bundle(&pending, &headers_none, &Policy::default()).unwrap_err();
    assert_eq!(err.step, Step::Anchored);
    assert!(err.detail.contains("pending"));

    // Anchor: fund the gateway wallet by mining, anchor the log head, confirm.
    let cfg = AnchorConfig { interval: Duration::ZERO, ..Default::default() };
    let mut anchorer = Anchorer::open(&db, &dir.path().join("wallet"), c.fresh().unwrap(), cfg, signer.clone()).unwrap();
    let addr = anchorer.wallet().new_address().unwrap();
    c.mine(1, &addr).unwrap();
    node.mine(100).unwrap();
    let log = MerkleLog::new(&conn);
    let head = LogHead { size: log.size().unwrap(), root: log.root_at(log.size().unwrap()).unwrap() };
    let ev = anchorer.poll(Some(head)).unwrap();
    assert!(matches!(ev[..], [AnchorEvent::Broadcast { tree_size: 17, .. }]), "{ev:?}");
    let still = assemble(&conn, c, &receipts[0].0.reading_id, None).unwrap();
    assert!(matches!(still.anchor, AnchorJson::Pending { ref message } if message.contains("waiting for confirmation")));
    node.mine(1).unwrap();
    assert!(matches!(anchorer.poll(Some(head)).unwrap()[..], [AnchorEvent::Confirmed { .. }]));

    let vkey = signer.verifier_key();
    let work = dir.path();
    for (i, (rc, r)) in receipts.iter().enumerate() {
        let bundle = assemble(&conn, c, &rc.reading_id, Some(&signer)).unwrap();
        let file = r.encode();
        let policy = Policy { reading_file: Some(&file), revoked: &[], checkpoint_key: Some(&vkey) };
        let v = verify_bundle(&bundle, c, &policy).unwrap();
        assert_eq!(v.leaf_index, rc.leaf_index);
        assert_eq!(v.tree_size, 17);
        // JSON round trip keeps it verifiable.
        let json = serde_json::to_string_pretty(&bundle).unwrap();
        let again = serde_json::from_str(&json).unwrap();
        verify_bundle(&again, c, &policy).unwrap();
        // The .ots: ours and the OpenTimestamps client agree, for a few leaves
        // (first, an odd index, a batched one, the last).
        let ots = bundle.to_ots().unwrap();
        let ots_bytes = ots.serialize().unwrap();
        assert_eq!(verify_ots(&file, &DetachedTimestampFile::deserialize(&ots_bytes).unwrap(), c).unwrap().0, v.block_height);
        if [0usize, 3, 12, 16].contains(&i) {
            let fp = work.join(format!("reading-{i}.bin"));
            let op = work.join(format!("reading-{i}.bin.ots"));
            std::fs::write(&fp, &file).unwrap();
            std::fs::write(&op, &ots_bytes).unwrap();
            let (ok, text) = ots_verified(&node, &fp, &op);
            assert!(ok, "ots verify failed for leaf {}: {text}", rc.leaf_index);
            eprintln!("ots verify (leaf {}): {}", rc.leaf_index, text.trim());
            assert!(text.contains(&format!("Bitcoin block {}", v.block_height)), "{text}");
            // A tampered reading file fails with the standard client too.
            let mut t = file.clone();
            let last = t.len() - 1;
            t[last] ^= 1;
            std::fs::write(&fp, &t).unwrap();
            let (ok, text) = ots_verified(&node, &fp, &op);
            assert!(!ok, "ots accepted a tampered file: {text}");
        }
    }

    // Each kind of tampering is caught at its own step.
    let (rc, r) = &receipts[12]; // batched reading
    let bundle = assemble(&conn, c, &rc.reading_id, Some(&signer)).unwrap();
    let file = r.encode();
    let check = |b: &bitmote_notary::proof::ProofBundle, p: &Policy<'_>| verify_bundle(b, c, p).unwrap_err().step;
    let base = Policy { reading_file: Some(&file), revoked: &[], checkpoint_key: Some(&vkey) };

    let mut tampered_file = file.clone();
    tampered_file[60] ^= 1;
    assert_eq!(check(&bundle, &Policy { reading_file: Some(&tampered_file), ..Default::default() }), Step::ReadingMatches);

    let mut t = bundle.clone();
    let mut enc = hex::decode(&t.reading).unwrap();
    enc[60] ^= 1;
    t.reading = hex::encode(enc);
    assert_eq!(check(&t, &Policy::default()), Step::DeviceSignature, "a tampered reading inside the proof");

    let mut t = bundle.clone();
    t.log.path[0] = hex::encode([0u8; 32]);
    assert_eq!(check(&t, &Policy::default()), Step::LogInclusion, "a tampered log path");

    let mut t = bundle.clone();
    t.log.root = hex::encode([1u8; 32]);
    assert_eq!(check(&t, &Policy::default()), Step::LogInclusion);

    let revoked = [d.public_key().device_id()];
    assert_eq!(check(&bundle, &Policy { revoked: &revoked, ..Default::default() }), Step::KeyNotRevoked);

    let other_signer = CheckpointSigner::from_seed("bitmote.test/log", [1; 32]).verifier_key();
    assert_eq!(check(&bundle, &Policy { checkpoint_key: Some(&other_signer), ..base }), Step::Checkpoint);

    // A wrong block: the bundle claims another block at that height.
    let mut t = bundle.clone();
    if let AnchorJson::Confirmed { block_hash, .. } = &mut t.anchor {
        *block_hash = c.block_hash(5).unwrap().unwrap().to_string();
    }
    assert_eq!(check(&t, &Policy::default()), Step::BlockOnChain);
    // A tampered transaction path.
    let mut t = bundle.clone();
    if let AnchorJson::Confirmed { tx_path, tx_index, .. } = &mut t.anchor {
        *tx_index ^= 1;
        let _ = tx_path;
    }
    assert_eq!(check(&t, &Policy::default()), Step::TxInBlock);

    // Offline: the same proof verifies against a headers file alone, and fails if the
    // file has a different header at that height.
    let AnchorJson::Confirmed { block_height, .. } = bundle.anchor else { unreachable!() };
    let header = c.header(&c.block_hash(block_height).unwrap().unwrap()).unwrap();
    let mut text = format!("{block_height} {}\n", bitmote_chain::bitcoin::consensus::encode::serialize_hex(&header));
    let offline = HeadersFile::parse(&text).unwrap();
    verify_bundle(&bundle, &offline, &base).unwrap();
    let other = c.header(&c.block_hash(block_height - 1).unwrap().unwrap()).unwrap();
    text = format!("{block_height} {}\n", bitmote_chain::bitcoin::consensus::encode::serialize_hex(&other));
    assert_eq!(verify_bundle(&bundle, &HeadersFile::parse(&text).unwrap(), &base).unwrap_err().step, Step::BlockOnChain);
}
