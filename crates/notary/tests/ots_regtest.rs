//! End to end against a real regtest bitcoind, with no notary database: 13 signed
//! readings (single and batched) form an RFC 9162 log; a hand-built transaction
//! spending a mature OP_TRUE coinbase commits the log's root in an OP_RETURN; once it
//! is mined, the proofs of the first, an odd, a batched and the last reading verify with
//! bitmote's verifier (the node as header source) and with the standard OpenTimestamps
//! client `ots` (PyPI `opentimestamps-client`); a tampered reading fails both.

use bitmote_chain::bitcoin::script::PushBytesBuf;
use bitmote_chain::bitcoin::{Amount, ScriptBuf, TxOut, Txid};
use bitmote_device::merkle::{self, Hash};
use bitmote_device::reading::{sensor, unit};
use bitmote_device::{Evidence, Reading, SignedBatch, SignedReading, SigningKey, Value};
use bitmote_notary::ots::DetachedTimestampFile;
use bitmote_notary::proof::{anchor_payload, AnchorEvidence, AnchorJson, ProofBundle};
use bitmote_notary::verify::{verify_bundle, verify_ots, Policy, Step};
use bitmote_regtest::provision::{ensure_bitcoind, InstallOptions, LogProgress};
use bitmote_regtest::{coinbase_at, op_true_address, spend_op_true, RegtestNode, RegtestOptions};

mod common;
use common::{ots_command, ots_verify};

const N: usize = 13;

fn reading(key: &SigningKey, seq: u64) -> Reading {
    Reading {
        device: key.public_key().device_id(),
        seq,
        timestamp_ms: 1_750_000_000_000 + seq * 2_000,
        sensor: sensor::TEMPERATURE,
        unit: unit::CELSIUS,
        value: Value::Scaled { mantissa: 2150 + seq as i64, exponent: -2 },
    }
}

#[test]
fn anchored_readings_verify_with_bitmote_and_the_ots_client() {
    let _ = ots_command(); // fail early, before starting a node, if `ots` is missing
    let exe = ensure_bitcoind(&InstallOptions::default(), &mut LogProgress::new()).unwrap().bitcoind;
    let node = RegtestNode::start(RegtestOptions::new(exe)).unwrap();
    let c = node.client();
    c.mine(105, &op_true_address()).unwrap();

    // The log: 6 readings signed one by one, then a signed batch of 7.
    let key = SigningKey::schnorr_from_secret(&[21; 32]).unwrap();
    let readings: Vec<Reading> = (1..=N as u64).map(|s| reading(&key, s)).collect();
    let mut evidence: Vec<Evidence> =
        readings[..6].iter().map(|r| Evidence::Single(SignedReading::sign(&key, r.clone()).unwrap().signature)).collect();
    let batch = SignedBatch::sign(&key, readings[6..].to_vec()).unwrap();
    evidence.extend((0..N - 6).map(|i| Evidence::Batch(batch.membership(i).unwrap())));
    let leaves: Vec<Hash> = readings.iter().map(|r| merkle::leaf_hash(&r.digest())).collect();
    let root = merkle::root(&leaves);

    // The anchor: OP_RETURN first (vout 0), change second; plus a few unrelated
    // transactions so the block's Merkle tree has several levels.
    let payload = PushBytesBuf::try_from(anchor_payload(N as u64, &root).to_vec()).unwrap();
    let op_return = TxOut { value: Amount::ZERO, script_pubkey: ScriptBuf::new_op_return(payload) };
    let anchor = spend_op_true(&coinbase_at(c, 1).unwrap(), vec![op_return], 2_000).unwrap();
    let anchor_txid: Txid = c.broadcast(&anchor).unwrap();
    assert_eq!(anchor_txid, anchor.compute_txid());
    for h in 2..=5 {
        let filler = spend_op_true(&coinbase_at(c, h).unwrap(), vec![], 1_000 + 700 * h as u64).unwrap();
        c.broadcast(&filler).unwrap();
    }

    // Before the block: the proof is pending, and says so.
    let path = merkle::inclusion_proof(&leaves, 12).unwrap();
    let pending =
        ProofBundle::build(&readings[12], &key.public_key(), &evidence[12], 12, N as u64, &path, None, None, "anchor broadcast").unwrap();
    assert!(pending.is_pending());
    let e = verify_bundle(&pending, c, &Policy::default()).unwrap_err();
    assert_eq!(e.step, Step::Anchored, "{e}");
    assert!(pending.to_ots().is_err());

    let block_hash = c.mine(1, &op_true_address()).unwrap()[0];
    let block = c.block(&block_hash).unwrap();
    let height = c.tip().unwrap().height;
    assert_eq!(block.txdata.len(), 6, "coinbase, the anchor and 4 others");

    let dir = tempfile::tempdir().unwrap();
    for i in [0usize, 5, 9, 12] {
        let path = merkle::inclusion_proof(&leaves, i as u64).unwrap();
        let ev = AnchorEvidence::from_block(&block, anchor_txid, height).unwrap();
        let bundle =
            ProofBundle::build(&readings[i], &key.public_key(), &evidence[i], i as u64, N as u64, &path, None, Some(&ev), "").unwrap();
        assert!(matches!(bundle.anchor, AnchorJson::Confirmed { vout: 0, .. }));
        let file = readings[i].encode();

        // (a) bitmote's verifier, with the node as the header source (via JSON, as shipped).
        let bundle: ProofBundle = serde_json::from_str(&serde_json::to_string(&bundle).unwrap()).unwrap();
        let v = verify_bundle(&bundle, c, &Policy { reading_file: Some(&file), ..Default::default() }).unwrap();
        assert_eq!((v.leaf_index, v.tree_size, v.block_height), (i as u64, N as u64, height));
        assert_eq!(v.block_hash, block_hash.to_string());

        // (b) the .ots: ours, then the OpenTimestamps client.
        let ots_bytes = bundle.to_ots().unwrap().serialize().unwrap();
        let ots = DetachedTimestampFile::deserialize(&ots_bytes).unwrap();
        assert_eq!(verify_ots(&file, &ots, c).unwrap().0, height);
        let fp = dir.path().join(format!("reading-{i}.bin"));
        let op = dir.path().join(format!("reading-{i}.bin.ots"));
        std::fs::write(&fp, &file).unwrap();
        std::fs::write(&op, &ots_bytes).unwrap();
        let (ok, text) = ots_verify(&node, &fp, &op);
        eprintln!("leaf {i}: ots verify: {}", text.trim());
        assert!(ok, "ots verify failed for leaf {i}: {text}");
        assert!(text.contains(&format!("Success! Bitcoin block {height} attests existence as of")), "{text}");

        // (c) one byte of the reading changed: both verifiers refuse it.
        let mut tampered = file.clone();
        tampered[45] ^= 1;
        let e = verify_bundle(&bundle, c, &Policy { reading_file: Some(&tampered), ..Default::default() }).unwrap_err();
        assert_eq!(e.step, Step::ReadingMatches, "{e}");
        let mut t = bundle.clone();
        t.reading = hex::encode(&tampered);
        assert_eq!(verify_bundle(&t, c, &Policy::default()).unwrap_err().step, Step::DeviceSignature);
        assert_eq!(verify_ots(&tampered, &ots, c).unwrap_err().step, Step::ReadingMatches);
        std::fs::write(&fp, &tampered).unwrap();
        let (ok, text) = ots_verify(&node, &fp, &op);
        assert!(!ok && !text.contains("Success!"), "ots accepted a tampered reading: {text}");
        eprintln!("leaf {i}: tampered: {}", text.trim());
    }
}
