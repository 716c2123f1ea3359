//! Anchoring against a real regtest bitcoind: funding by mining, broadcast,
//! confirmation, RBF fee bump, a reorg that takes an anchor out, restart.

use std::time::Duration;

use bitmote_chain::provision::{ensure_bitcoind, InstallOptions, LogProgress};
use bitmote_chain::regtest::{op_true_address, RegtestNode, RegtestOptions};
use bitmote_chain::ChainClient;
use bitmote_notary::anchor::{find_anchor, AnchorConfig, AnchorEvent, AnchorState, Anchorer, LogHead};
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
    let mut a = Anchorer::open(&db, &wallet_dir, c.fresh().unwrap(), cfg.clone()).unwrap();

    // Unfunded: a clear error naming an address to fund.
    let err = a.poll(Some(head(10))).unwrap_err();
    assert!(err.to_string().contains("fund it at bcrt1"), "{err}");

    // Fund by mining to the wallet, then let the coinbase mature.
    let addr = a.wallet().new_address().unwrap();
    c.mine(1, &addr).unwrap();
    node.mine(100).unwrap();
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
    assert!(matches!(ev[0], AnchorEvent::Reorged { txid, .. } if txid == t2b), "{ev:?}");
    let info = a.list().unwrap();
    assert_eq!(info[0].state, AnchorState::Pending);
    node.mine(1).unwrap();
    let ev = a.poll(None).unwrap();
    assert!(matches!(ev[0], AnchorEvent::Confirmed { txid, .. } if txid == t2b), "{ev:?}");

    // Restart: everything is still there.
    drop(a);
    let mut a = Anchorer::open(&db, &wallet_dir, c.fresh().unwrap(), cfg).unwrap();
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
    let t4 = ev.iter().find_map(|e| match e { AnchorEvent::Broadcast { txid, tree_size: 40, .. } => Some(*txid), _ => None }).expect("re-anchored");
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
    let mut a = Anchorer::open(&dir.path().join("notary.sqlite"), &dir.path().join("wallet"), c.fresh().unwrap(), cfg).unwrap();
    let addr = a.wallet().new_address().unwrap();
    c.mine(1, &addr).unwrap();
    node.mine(100).unwrap();
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
