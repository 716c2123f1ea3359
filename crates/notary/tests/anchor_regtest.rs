//! Anchoring against a real regtest bitcoind: funding by mining, broadcast,
//! confirmation, RBF fee bump, a reorg that takes an anchor out, restart.

use std::time::Duration;

use bitmote_chain::wallet::Reconciled;
use bitmote_chain::ChainClient;
use bitmote_notary::anchor::{find_anchor, AnchorConfig, AnchorEvent, AnchorState, Anchorer, LogHead};
use bitmote_notary::checkpoint::CheckpointSigner;
use bitmote_regtest::provision::{ensure_bitcoind, InstallOptions, LogProgress};
use bitmote_regtest::{op_true_address, RegtestNode, RegtestOptions};
use serde_json::json;

fn node() -> RegtestNode {
    let exe = ensure_bitcoind(&InstallOptions::default(), &mut LogProgress::new()).unwrap().bitcoind;
    RegtestNode::start(RegtestOptions::new(exe)).unwrap()
}

/// Mine a block that leaves the mempool alone (so an anchor stays unconfirmed).
fn mine_empty(c: &ChainClient) -> bitmote_chain::bitcoin::BlockHash {
    let v: serde_json::Value = c.raw("generateblock", &[json!(op_true_address().to_string()), json!([])]).unwrap();
    v["hash"].as_str().unwrap().parse().unwrap()
}

/// A coinbase to the anchorer's wallet, matured (the 100 blocks after it).
fn fund(node: &RegtestNode, a: &mut Anchorer) {
    let addr = a.wallet().new_address().unwrap();
    node.client().mine(1, &addr).unwrap();
    node.mine(100).unwrap();
}

/// The checkpoint key of the anchorer's fork guard.
fn signer() -> CheckpointSigner {
    CheckpointSigner::from_seed("bitmote.test/log", [9; 32])
}

fn head(size: u64) -> LogHead {
    LogHead { size, root: [size as u8; 32] }
}

#[test]
fn anchors_confirm_get_bumped_survive_reorgs_and_restarts() {
    let node = node();
    let c = node.client();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("notary.sqlite");
    let wallet_dir = dir.path().join("wallet");
    let cfg = AnchorConfig { interval: Duration::ZERO, bump_after_blocks: 2, final_confirmations: 3, ..Default::default() };
    let mut a = Anchorer::open(&db, &wallet_dir, c.fresh().unwrap(), cfg.clone(), signer()).unwrap();

    // Unfunded: a clear error naming an address to fund.
    let err = a.poll(Some(head(10))).unwrap_err();
    assert!(err.to_string().contains("fund it at bcrt1"), "{err}");

    // Fund by mining to the wallet, then let the coinbase mature.
    fund(&node, &mut a);
    assert!(a.poll(None).unwrap().is_empty());
    assert!(a.wallet().spendable().to_sat() > 0);

    // First anchor.
    let ev = a.poll(Some(head(10))).unwrap();
    let AnchorEvent::Broadcast { txid: t1, fee_sat, .. } = ev[0] else { panic!("{ev:?}") };
    assert!(fee_sat > 0);
    assert!(a.poll(Some(head(12))).unwrap().is_empty(), "one anchor in flight at a time");
    node.mine(1).unwrap();
    let ev = a.poll(Some(head(10))).unwrap();
    assert!(matches!(ev[0], AnchorEvent::Confirmed { txid, .. } if txid == t1), "{ev:?}");
    let first = a.covering(9).unwrap().unwrap();
    assert_eq!(find_anchor(&first.tx).unwrap().1, head(10));
    assert!(a.covering(10).unwrap().is_none(), "leaf 10 is not in a tree of size 10");
    assert!(a.poll(Some(head(10))).unwrap().is_empty(), "no new anchor while the log has not grown");

    // Second anchor waits in the mempool while empty blocks are mined: it gets bumped.
    let ev = a.poll(Some(head(25))).unwrap();
    let AnchorEvent::Broadcast { txid: t2, fee_sat: fee2, .. } = ev[0] else { panic!("{ev:?}") };
    mine_empty(c);
    assert!(a.poll(None).unwrap().is_empty());
    mine_empty(c);
    let ev = a.poll(None).unwrap();
    let AnchorEvent::Bumped { old, new: t2b, fee_sat: fee2b, .. } = ev[0] else { panic!("{ev:?}") };
    assert_eq!(old, t2);
    assert!(fee2b > fee2);
    let mempool: Vec<String> = c.raw("getrawmempool", &[]).unwrap();
    assert!(mempool.contains(&t2b.to_string()) && !mempool.contains(&t2.to_string()), "the replacement replaced");
    let confirm_block = node.mine(1).unwrap()[0];
    let ev = a.poll(None).unwrap();
    assert!(matches!(ev[0], AnchorEvent::Confirmed { txid, .. } if txid == t2b), "{ev:?}");

    // A reorg takes the second anchor out: alert, then it confirms again in the new chain.
    c.invalidate_block(&confirm_block).unwrap();
    mine_empty(c);
    mine_empty(c);
    let ev = a.poll(None).unwrap();
    // The wallet saw the replaced version t2 in the mempool once, so with t2b out of the
    // chain it counts t2 as unconfirmed again; the node refuses it (t2b, back in its
    // mempool, pays more), and the wallet forgets t2.
    let (wallet, ev): (Vec<_>, Vec<_>) = ev.into_iter().partition(|e| matches!(e, AnchorEvent::Wallet(_)));
    assert!(wallet.iter().all(|e| matches!(e, AnchorEvent::Wallet(Reconciled::Forgotten { txid, .. }) if *txid == t2)), "{wallet:?}");
    assert!(matches!(ev[0], AnchorEvent::Reorged { txid, .. } if txid == t2b), "{ev:?}");
    let info = a.list().unwrap();
    assert_eq!(info[0].state, AnchorState::Pending);
    node.mine(1).unwrap();
    let ev = a.poll(None).unwrap();
    assert!(matches!(ev[0], AnchorEvent::Confirmed { txid, .. } if txid == t2b), "{ev:?}");

    // Restart: everything is still there.
    drop(a);
    let mut a = Anchorer::open(&db, &wallet_dir, c.fresh().unwrap(), cfg, signer()).unwrap();
    let info = a.list().unwrap();
    assert_eq!(info.len(), 2);
    assert!(info.iter().all(|i| i.state == AnchorState::Confirmed && i.confirmations >= 1));
    assert_eq!(info[0].new_readings, 15);
    assert_eq!(info[0].bumps, 1);
    assert_eq!(info[1].new_readings, 10);
    assert!((info[1].fee_per_reading_sat - info[1].fee_sat as f64 / 10.0).abs() < 1e-9);
    let second = a.covering(20).unwrap().unwrap();
    assert_eq!(second.tx.compute_txid(), t2b);

    // A reorg whose new chain spends the anchor's coins elsewhere: the anchor can never
    // confirm; it is abandoned and the log is anchored again.
    let ev = a.poll(Some(head(40))).unwrap();
    let AnchorEvent::Broadcast { txid: t3, .. } = ev[0] else { panic!("{ev:?}") };
    let b3 = node.mine(1).unwrap()[0];
    assert!(matches!(a.poll(None).unwrap()[0], AnchorEvent::Confirmed { txid, .. } if txid == t3));
    c.invalidate_block(&b3).unwrap();
    mine_empty(c);
    mine_empty(c);
    let ev = a.poll(None).unwrap();
    assert!(matches!(ev[0], AnchorEvent::Reorged { txid, .. } if txid == t3), "{ev:?}");
    // A conflicting spend of the same coins (built with the wallet's keys, then forgotten by
    // it), mined in the new chain.
    let conflict = a.wallet().bump_fee(t3, bitmote_chain::bitcoin::FeeRate::from_sat_per_vb_u32(60)).unwrap();
    a.wallet().forget(&conflict).unwrap();
    let hex = bitmote_chain::bitcoin::consensus::encode::serialize_hex(&conflict);
    let _: serde_json::Value = c.raw("generateblock", &[json!(op_true_address().to_string()), json!([hex])]).unwrap();
    let ev = a.poll(Some(head(40))).unwrap();
    assert!(ev.iter().any(|e| matches!(e, AnchorEvent::Abandoned { txid, .. } if *txid == t3)), "{ev:?}");
    let ev = if ev.iter().any(|e| matches!(e, AnchorEvent::Broadcast { .. })) { ev } else { a.poll(Some(head(40))).unwrap() };
    let t4 = ev
        .iter()
        .find_map(|e| match e {
            AnchorEvent::Broadcast { txid, tree_size: 40, .. } => Some(*txid),
            _ => None,
        })
        .expect("re-anchored");
    node.mine(1).unwrap();
    assert!(a.poll(None).unwrap().iter().any(|e| matches!(e, AnchorEvent::Confirmed { txid, .. } if *txid == t4)));
    assert_eq!(a.covering(30).unwrap().unwrap().tx.compute_txid(), t4);
    let states: Vec<AnchorState> = a.list().unwrap().iter().map(|i| i.state).collect();
    assert_eq!(states, vec![AnchorState::Confirmed, AnchorState::Abandoned, AnchorState::Confirmed, AnchorState::Confirmed]);
}

/// Found by `bitmote drill`: a reorg that replaces the anchor's block by another block at
/// the same height which mines the anchor again. The record must name the new block (a
/// proof naming the replaced one fails at "the block on the chain").
#[test]
fn an_anchor_re_mined_at_the_same_height_names_the_new_block() {
    let node = node();
    let c = node.client();
    let dir = tempfile::tempdir().unwrap();
    let cfg = AnchorConfig { interval: Duration::ZERO, ..Default::default() };
    let mut a = Anchorer::open(&dir.path().join("notary.sqlite"), &dir.path().join("wallet"), c.fresh().unwrap(), cfg, signer()).unwrap();
    fund(&node, &mut a);
    a.poll(None).unwrap();
    let ev = a.poll(Some(head(10))).unwrap();
    let AnchorEvent::Broadcast { txid, .. } = ev[0] else { panic!("{ev:?}") };
    let raw: String = c.raw("getrawtransaction", &[json!(txid.to_string())]).unwrap();
    let old = node.mine(1).unwrap()[0];
    assert!(matches!(a.poll(None).unwrap()[0], AnchorEvent::Confirmed { .. }));
    let height = a.list().unwrap()[0].block_height.unwrap();
    assert_eq!(a.list().unwrap()[0].block_hash, Some(old));

    // The same height, another block (its coinbase pays elsewhere), the same anchor in it.
    c.invalidate_block(&old).unwrap();
    let other = bitmote_chain::bitcoin::Address::p2wsh(
        &bitmote_chain::bitcoin::ScriptBuf::from(vec![0x01, 0x07, 0x75, 0x51]),
        bitmote_chain::bitcoin::Network::Regtest,
    );
    let v: serde_json::Value = c.raw("generateblock", &[json!(other.to_string()), json!([raw])]).unwrap();
    let new: bitmote_chain::bitcoin::BlockHash = v["hash"].as_str().unwrap().parse().unwrap();
    assert_eq!(c.tip().unwrap().height, height);
    a.poll(None).unwrap();
    let info = &a.list().unwrap()[0];
    assert_eq!((info.block_height, info.block_hash), (Some(height), Some(new)), "the record follows the anchor into the new block");
    assert_eq!(info.state, AnchorState::Confirmed);
}

/// Found by `bitmote drill` (issue 16): anchors chained on each other's change, a reorg
/// that takes them out of the chain, and a node restarted without its mempool (a kill -9).
/// First the coins they spend still exist: they go back to the node parents first and
/// confirm. Then a reorg double-spends the coin under the whole chain of anchors: the
/// wallet must forget them (BDK kept them as unconfirmed forever, and every new anchor
/// spent their change: `bad-txns-inputs-missingorspent` on every poll, no root anchored
/// again), abandon them, and anchor the log again from coins that exist, so that every
/// reading's proof verifies against the chain at the end.
#[test]
fn anchoring_resumes_after_a_reorg_drops_chained_anchors_and_the_node_loses_its_mempool() {
    use bitmote_chain::bitcoin::{Amount, TxOut};
    use bitmote_device::reading::{sensor, unit};
    use bitmote_device::{Reading, SignedReading, SigningKey, Value};
    use bitmote_notary::ingest::{IngestConfig, Ingestor, Receipt, Submission};
    use bitmote_notary::log::MerkleLog;
    use bitmote_notary::proof::assemble;
    use bitmote_notary::registry::open_db;
    use bitmote_notary::verify::{verify_bundle, Policy};
    use bitmote_regtest::{coinbase_at, spend_op_true};

    let exe = ensure_bitcoind(&InstallOptions::default(), &mut LogProgress::new()).unwrap().bitcoind;
    let dir = tempfile::tempdir().unwrap();
    let mut opts = RegtestOptions::new(exe);
    opts.data_dir = Some(dir.path().join("bitcoind"));
    // As after a kill -9: the node comes back with an empty mempool.
    opts.extra_args = vec!["-persistmempool=0".into()];
    let mut node = RegtestNode::start(opts.clone()).unwrap();
    let restart = |node: RegtestNode| {
        node.stop().unwrap();
        RegtestNode::start(opts.clone()).unwrap()
    };
    let c = node.client().fresh().unwrap();
    let db = dir.path().join("notary.sqlite");
    let ing = Ingestor::start(&db, IngestConfig::default()).unwrap();
    let key = SigningKey::schnorr_from_secret(&[21; 32]).unwrap();
    ing.enroll(&key.public_key(), None).unwrap();
    let mut seq = 0;
    let mut receipts: Vec<(Receipt, Reading)> = vec![];
    let mut ingest = |n: usize, receipts: &mut Vec<(Receipt, Reading)>| {
        for _ in 0..n {
            seq += 1;
            let r = Reading {
                device: key.public_key().device_id(),
                seq,
                timestamp_ms: bitmote_chain::now_ms(),
                sensor: sensor::TEMPERATURE,
                unit: unit::CELSIUS,
                value: Value::Scaled { mantissa: seq as i64, exponent: 0 },
            };
            let rc = ing.submit(Submission::Reading(SignedReading::sign(&key, r.clone()).unwrap())).unwrap();
            receipts.push((rc[0], r));
        }
    };
    let conn = open_db(&db).unwrap();
    let log_head = || {
        let log = MerkleLog::new(&conn);
        let size = log.size().unwrap();
        LogHead { size, root: log.root_at(size).unwrap() }
    };
    let in_mempool = |c: &ChainClient, t: &bitmote_chain::bitcoin::Txid| c.in_mempool(t).unwrap();

    // The wallet's only coin: a payment from an anyone-can-spend coinbase (so the drill's
    // kind of double spend can take it away later), confirmed.
    let cfg = AnchorConfig { interval: Duration::ZERO, ..Default::default() };
    let mut a = Anchorer::open(&db, &dir.path().join("wallet"), c.fresh().unwrap(), cfg.clone(), signer()).unwrap();
    node.mine(101).unwrap();
    let coinbase = coinbase_at(&c, 1).unwrap();
    let to_wallet = TxOut { value: Amount::from_sat(10_000_000), script_pubkey: a.wallet().new_address().unwrap().script_pubkey() };
    // Through an intermediate transaction the wallet does not see: when a conflicting
    // spend of it is mined, the wallet sees nothing conflict with its payment (as when
    // the node lost the blocks that made a coin), yet the payment's input is gone.
    let parent = spend_op_true(
        &coinbase,
        vec![TxOut { value: Amount::from_sat(20_000_000), script_pubkey: op_true_address().script_pubkey() }],
        1_000,
    )
    .unwrap();
    let funding = spend_op_true(&parent, vec![to_wallet], 1_000).unwrap();
    c.broadcast(&parent).unwrap();
    c.broadcast(&funding).unwrap();
    let funding_block = node.mine(1).unwrap()[0];
    a.poll(None).unwrap();
    assert_eq!(a.wallet().spendable().to_sat(), 10_000_000);

    // Three anchors, each spending the previous one's change, each confirmed.
    let mut anchors = vec![];
    for _ in 0..3 {
        ingest(5, &mut receipts);
        let ev = a.poll(Some(log_head())).unwrap();
        let Some(&AnchorEvent::Broadcast { txid, .. }) = ev.iter().find(|e| matches!(e, AnchorEvent::Broadcast { .. })) else {
            panic!("{ev:?}")
        };
        let block = node.mine(1).unwrap()[0];
        assert!(a.poll(None).unwrap().iter().any(|e| matches!(e, AnchorEvent::Confirmed { txid: t, .. } if *t == txid)));
        anchors.push((txid, block));
    }

    // 1. A reorg takes the last two out (back to the mempool, the second one's parent
    //    unconfirmed), then the node restarts without its mempool: both go back to the
    //    node, parents first, and confirm again.
    c.invalidate_block(&anchors[1].1).unwrap();
    mine_empty(&c);
    mine_empty(&c);
    mine_empty(&c);
    node = restart(node);
    assert!(!in_mempool(&c, &anchors[1].0) && !in_mempool(&c, &anchors[2].0), "the restarted node has an empty mempool");
    let ev = a.poll(Some(log_head())).unwrap();
    assert!(in_mempool(&c, &anchors[1].0) && in_mempool(&c, &anchors[2].0), "sent again, parent first: {ev:?}");
    node.mine(1).unwrap();
    a.poll(Some(log_head())).unwrap();
    let states: Vec<AnchorState> = a.list().unwrap().iter().map(|i| i.state).collect();
    assert_eq!(states, vec![AnchorState::Confirmed; 3]);

    // 2. A deeper reorg takes out the funding payment and every anchor, and its new branch
    //    double-spends the coin under the payment: no anchor can ever confirm again. More
    //    readings arrive meanwhile; the node restarts (empty mempool).
    ingest(5, &mut receipts);
    c.invalidate_block(&funding_block).unwrap();
    let double_spend = spend_op_true(&coinbase, vec![], 5_000).unwrap();
    let hex = bitmote_chain::bitcoin::consensus::encode::serialize_hex(&double_spend);
    let _: serde_json::Value = c.raw("generateblock", &[json!(op_true_address().to_string()), json!([hex])]).unwrap();
    for _ in 0..8 {
        mine_empty(&c);
    }
    node = restart(node);
    // The wallet forgets the payment and the anchors, the anchors are abandoned, and with no
    // coin left the anchorer asks for funds (instead of spending a coin that is gone).
    let mut polls = 0;
    let err = loop {
        polls += 1;
        match a.poll(Some(log_head())) {
            Ok(ev) => {
                assert!(!ev.iter().any(|e| matches!(e, AnchorEvent::Broadcast { .. })), "an anchor built on coins that are gone: {ev:?}");
                assert!(polls < 10, "{ev:?}");
            }
            Err(e) => break e,
        }
    };
    assert!(matches!(err, bitmote_notary::anchor::AnchorError::Unfunded { balance: 0, .. }), "{err}");
    let states: Vec<AnchorState> = a.list().unwrap().iter().map(|i| i.state).collect();
    assert_eq!(states, vec![AnchorState::Abandoned; 3]);
    assert!(a.wallet().status(funding.compute_txid()) == bitmote_chain::wallet::TxStatus::Unknown, "the double-spent payment is forgotten");

    // Funded again, the log is anchored again from the new coin, and every reading ever
    // acknowledged is provable against the chain.
    fund(&node, &mut a);
    let ev = a.poll(Some(log_head())).unwrap();
    let Some(&AnchorEvent::Broadcast { txid, tree_size, .. }) = ev.iter().find(|e| matches!(e, AnchorEvent::Broadcast { .. })) else {
        panic!("{ev:?}")
    };
    assert_eq!(tree_size, receipts.len() as u64);
    node.mine(1).unwrap();
    assert!(a.poll(Some(log_head())).unwrap().iter().any(|e| matches!(e, AnchorEvent::Confirmed { txid: t, .. } if *t == txid)));
    for (rc, r) in &receipts {
        let bundle = assemble(&conn, &c, &rc.reading_id, None).unwrap();
        let file = r.encode();
        let v = verify_bundle(&bundle, &c, &Policy { reading_file: Some(&file), ..Default::default() })
            .unwrap_or_else(|e| panic!("reading {} does not verify: {e:?}", rc.leaf_index));
        assert_eq!(v.tree_size, receipts.len() as u64);
    }
    drop(node);
}

/// Found by `bitmote drill` (issue 16): an anchor final in blocks the node then lost (a
/// crash before it flushed them), noticed only when anchoring reopens (the gateway reopens
/// it whenever the node comes back). Catching the wallet up first and taking the fork
/// point afterwards found no fork at all, so the anchor, final by then, kept naming a block
/// that is not on the node's chain, and its readings' proofs answered 503 from then on.
/// Here the node's chain is replaced below the anchor's block while anchoring is closed,
/// by more blocks than make an anchor final: at reopening the anchor goes back to pending
/// (its transaction is back in the mempool), and confirms again in the node's branch.
#[test]
fn an_anchor_final_in_blocks_the_node_lost_while_anchoring_was_closed_is_checked_again() {
    let node = node();
    let c = node.client();
    let dir = tempfile::tempdir().unwrap();
    let cfg = AnchorConfig { interval: Duration::ZERO, ..Default::default() };
    let open = |cfg: &AnchorConfig| {
        Anchorer::open(&dir.path().join("notary.sqlite"), &dir.path().join("wallet"), c.fresh().unwrap(), cfg.clone(), signer()).unwrap()
    };
    let mut a = open(&cfg);
    fund(&node, &mut a);
    a.poll(None).unwrap();
    let ev = a.poll(Some(head(10))).unwrap();
    assert!(matches!(ev[0], AnchorEvent::Broadcast { .. }), "{ev:?}");
    let lost = node.mine(1).unwrap()[0];
    node.mine(cfg.final_confirmations + 2).unwrap();
    a.poll(None).unwrap();
    let info = a.list().unwrap().remove(0);
    assert_eq!((info.state, info.block_hash), (AnchorState::Confirmed, Some(lost)));
    assert!(info.confirmations > cfg.final_confirmations, "{info:?}");
    drop(a);

    // The node's chain loses the anchor's block and everything after it; a longer branch
    // without the anchor replaces them (its transaction is back in the mempool).
    c.invalidate_block(&lost).unwrap();
    for _ in 0..cfg.final_confirmations + 4 {
        mine_empty(c);
    }
    let mut a = open(&cfg);
    a.poll(None).unwrap();
    let info = a.list().unwrap().remove(0);
    assert_eq!(
        info.state,
        AnchorState::Pending,
        "the anchor still names block {:?}, which the node's chain lost: {info:?}",
        info.block_hash
    );

    let again = node.mine(1).unwrap()[0];
    a.poll(None).unwrap();
    let info = a.list().unwrap().remove(0);
    assert_eq!((info.state, info.block_hash), (AnchorState::Confirmed, Some(again)), "{info:?}");
    assert_eq!(c.block_hash(info.block_height.unwrap()).unwrap(), Some(again));
}

/// The fork guard on the anchoring path (issue 14). A checkpoint for tree size 10 was
/// issued with one root; the log then claims another root for that size. The anchorer
/// must broadcast nothing and record no anchor, on every poll, and say why; the checkpoint
/// on record stays. It keeps working: the root that was checkpointed is re-issued and
/// anchored, and a later size gets its checkpoint recorded before its anchor.
#[test]
fn the_anchorer_never_anchors_a_root_other_than_the_one_checkpointed_for_its_size() {
    use bitmote_notary::checkpoint::{issued_at, parse_and_verify};
    use bitmote_notary::registry::open_db;
    let node = node();
    let c = node.client();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("notary.sqlite");
    let cfg = AnchorConfig { interval: Duration::ZERO, ..Default::default() };
    let s = signer();
    let mut a = Anchorer::open(&db, &dir.path().join("wallet"), c.fresh().unwrap(), cfg, s.clone()).unwrap();
    fund(&node, &mut a);
    assert!(a.poll(None).unwrap().is_empty());
    let mempool = || c.raw::<Vec<String>>("getrawmempool", &[]).unwrap();
    assert!(mempool().is_empty());

    let conn = open_db(&db).unwrap();
    let (signed, forked) = ([0xaa; 32], [0xbb; 32]);
    s.issue(&conn, 10, signed).unwrap();
    for _ in 0..3 {
        let ev = a.poll(Some(LogHead { size: 10, root: forked })).unwrap();
        assert_eq!(ev, vec![AnchorEvent::ForkRefused { size: 10, signed, root: forked }]);
        assert!(a.list().unwrap().is_empty(), "no anchor row for a forked root");
        assert!(mempool().is_empty(), "no anchor transaction for a forked root");
    }
    assert_eq!(issued_at(&conn, 10).unwrap().unwrap().root, signed, "the refusal changes no checkpoint");
    // A block later, still refused (the guard is not a one-off).
    node.mine(1).unwrap();
    let ev = a.poll(Some(LogHead { size: 10, root: forked })).unwrap();
    assert_eq!(ev, vec![AnchorEvent::ForkRefused { size: 10, signed, root: forked }]);
    assert!(a.list().unwrap().is_empty());

    // The root that was checkpointed: issued again without complaint, and anchored.
    let ev = a.poll(Some(LogHead { size: 10, root: signed })).unwrap();
    let [AnchorEvent::Broadcast { txid, tree_size: 10, .. }] = ev[..] else { panic!("{ev:?}") };
    assert_eq!(mempool(), vec![txid.to_string()]);
    let tx = c.raw_transaction(&txid, None).unwrap();
    assert_eq!(find_anchor(&tx).unwrap().1, LogHead { size: 10, root: signed });
    node.mine(1).unwrap();
    assert!(matches!(a.poll(None).unwrap()[..], [AnchorEvent::Confirmed { .. }]));

    // A new size: its checkpoint is issued (recorded, signed by the key) as it is anchored.
    assert_eq!(issued_at(&conn, 12).unwrap(), None);
    let ev = a.poll(Some(LogHead { size: 12, root: [0x12; 32] })).unwrap();
    assert!(matches!(ev[..], [AnchorEvent::Broadcast { tree_size: 12, .. }]), "{ev:?}");
    let cp = issued_at(&conn, 12).unwrap().unwrap();
    assert_eq!(cp.root, [0x12; 32]);
    let verified = parse_and_verify(&cp.note, &s.verifier_key()).unwrap();
    assert_eq!((verified.size, verified.root), (12, [0x12; 32]));
    // Anchored roots are checkpointed roots: another root for 12 is now a fork.
    let e = s.issue(&conn, 12, [0x99; 32]).unwrap_err();
    assert!(matches!(e, bitmote_notary::checkpoint::CheckpointError::Fork { size: 12, .. }), "{e}");
}
