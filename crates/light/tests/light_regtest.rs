//! The light client against a real regtest bitcoind over P2P: a real payment checks out
//! once buried deep enough; claims about it that are false in any way are refused, each
//! with its reason.

use std::time::Duration;

use bitmote_chain::bitcoin::{Address, Amount, Network, ScriptBuf, TxOut, Txid};
use bitmote_light::{LightClient, LightError, PaymentClaim, Peers};
use bitmote_regtest::provision::{ensure_bitcoind, InstallOptions, LogProgress};
use bitmote_regtest::{coinbase_at, spend_op_true, RegtestNode, RegtestOptions};

#[test]
fn a_real_payment_checks_out_and_false_claims_are_refused() {
    let exe = ensure_bitcoind(&InstallOptions::default(), &mut LogProgress::new()).expect("bitcoind available").bitcoind;
    let node = RegtestNode::start(RegtestOptions::new(exe)).unwrap();
    let c = node.client();
    node.mine(101).unwrap();
    let to = Address::p2wsh(&ScriptBuf::from(vec![0x61, 0x87]), Network::Regtest);
    let pay = TxOut { value: Amount::from_sat(25_000), script_pubkey: to.script_pubkey() };
    let tx = spend_op_true(&coinbase_at(c, 1).unwrap(), vec![pay], 1_000).unwrap();
    let txid = c.broadcast(&tx).unwrap();
    node.mine(1).unwrap();
    let height = 102;

    let light = LightClient::start(node.p2p_addr(), Network::Regtest).unwrap();
    assert_eq!(light.wait_synced(Duration::from_secs(60)).unwrap(), height);
    let claim = PaymentClaim { txid, vout: 0, script_pubkey: to.script_pubkey(), min_sat: 20_000, height, confirmations: 1 };
    let short = Duration::from_millis(300);

    let ok = light.verify_payment(&claim, short).unwrap();
    assert_eq!((ok.height, ok.confirmations, ok.value_sat), (height, 1, 25_000));
    assert_eq!(ok.block_hash, c.block_hash(height).unwrap().unwrap());

    // Each false claim, refused with what is wrong.
    let refused = |f: &dyn Fn(&mut PaymentClaim)| {
        let mut cl = claim.clone();
        f(&mut cl);
        light.verify_payment(&cl, short).unwrap_err()
    };
    assert_eq!(refused(&|c| c.confirmations = 3), LightError::UnderConfirmed { have: 1, need: 3 });
    assert_eq!(refused(&|c| c.height = 500), LightError::NoBlock { height: 500, tip: height });
    assert_eq!(refused(&|c| c.height = 50), LightError::FilterMiss { height: 50 });
    let fake: Txid = "11".repeat(32).parse().unwrap();
    assert_eq!(refused(&|c| c.txid = fake), LightError::NoTransaction { height, txid: fake });
    assert!(matches!(refused(&|c| c.min_sat = 30_000), LightError::BadOutput { why, .. } if why.contains("less than")));
    assert!(matches!(refused(&|c| c.vout = 1), LightError::BadOutput { why, .. } if why.contains("another address")));
    assert!(matches!(refused(&|c| c.vout = 7), LightError::BadOutput { why, .. } if why.contains("does not exist")));

    // The device follows the chain: two more blocks make the 3-confirmation claim good.
    node.mine(2).unwrap();
    let deeper = PaymentClaim { confirmations: 3, ..claim.clone() };
    assert_eq!(light.verify_payment(&deeper, Duration::from_secs(60)).unwrap().confirmations, 3);

    // A payment older than the filters kept in memory is still checked (the filter is fetched again).
    node.mine(bitmote_light::KEEP_FILTERS + 5).unwrap();
    let top = c.tip().unwrap().height;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while light.tip().map(|t| t.0) != Some(top) {
        assert!(std::time::Instant::now() < deadline, "the light client never reached block {top}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let ok = light.verify_payment(&claim, Duration::from_secs(60)).unwrap();
    assert_eq!(ok.confirmations, 3 + bitmote_light::KEEP_FILTERS + 5);
}

/// Copy blocks `from..=to` of `src` into `dst` by RPC (`submitblock`): the nodes never meet
/// over P2P, so each keeps its own chain afterwards.
fn copy_blocks(src: &RegtestNode, dst: &RegtestNode, from: u32, to: u32) {
    use serde_json::{json, Value};
    for h in from..=to {
        let hash = src.client().block_hash(h).unwrap().unwrap();
        let hex: String = src.client().raw("getblock", &[json!(hash.to_string()), json!(0)]).unwrap();
        let r: Value = dst.client().raw("submitblock", &[json!(hex)]).unwrap();
        assert!(r.is_null(), "submitblock {h}: {r}");
    }
}

/// Issue #13 item 12: a device following several peers acts only on what all of them show.
/// Peer B mined the same payment in a block of its own (a chain A does not have): the
/// peers disagree and the payment is refused. A payment only A shows is refused (B has no
/// such block). A peer C that shows A's chain agrees, and then the payment counts.
#[test]
fn with_several_peers_a_payment_counts_only_if_every_peer_shows_it_in_the_same_block() {
    let exe = ensure_bitcoind(&InstallOptions::default(), &mut LogProgress::new()).expect("bitcoind available").bitcoind;
    let start = || RegtestNode::start(RegtestOptions::new(exe.clone())).unwrap();
    let (a, b, c) = (start(), start(), start());
    a.mine(101).unwrap();
    copy_blocks(&a, &b, 1, 101);
    // The same payment, mined by A and by B each in a block of its own.
    let to = Address::p2wsh(&ScriptBuf::from(vec![0x61, 0x87]), Network::Regtest);
    let pay = |sat| TxOut { value: Amount::from_sat(sat), script_pubkey: to.script_pubkey() };
    let tx = spend_op_true(&coinbase_at(a.client(), 1).unwrap(), vec![pay(25_000)], 1_000).unwrap();
    let txid = a.client().broadcast(&tx).unwrap();
    b.client().broadcast(&tx).unwrap();
    a.mine(1).unwrap();
    let elsewhere = Address::p2wsh(&ScriptBuf::from(vec![0x52]), Network::Regtest);
    b.client().mine(1, &elsewhere).unwrap();
    let (ha, hb) = (a.client().block_hash(102).unwrap().unwrap(), b.client().block_hash(102).unwrap().unwrap());
    assert_ne!(ha, hb, "B's block 102 is its own");
    copy_blocks(&a, &c, 1, 102);

    let claim = PaymentClaim { txid, vout: 0, script_pubkey: to.script_pubkey(), min_sat: 20_000, height: 102, confirmations: 1 };
    let short = Duration::from_millis(300);
    let ab = Peers::start(&[a.p2p_addr(), b.p2p_addr()], Network::Regtest).unwrap();
    assert_eq!(ab.wait_synced(Duration::from_secs(60)).unwrap(), 102);
    let e = ab.verify_payment(&claim, short).unwrap_err();
    assert_eq!(e, LightError::Disagree { height: 102, a: a.p2p_addr(), a_block: ha, b: b.p2p_addr(), b_block: hb }, "{e}");

    // A payment in a block only A has: B has no block 103.
    let tx2 = spend_op_true(&coinbase_at(a.client(), 2).unwrap(), vec![pay(30_000)], 1_000).unwrap();
    let txid2 = a.client().broadcast(&tx2).unwrap();
    a.mine(1).unwrap();
    copy_blocks(&a, &c, 103, 103);
    let claim2 = PaymentClaim { txid: txid2, height: 103, ..claim.clone() };
    let e = ab.verify_payment(&claim2, short).unwrap_err();
    assert_eq!(e, LightError::Peer { peer: b.p2p_addr(), error: Box::new(LightError::NoBlock { height: 103, tip: 102 }) }, "{e}");

    // A and C show the same chain: both payments count, as deep as the least buried view.
    let ac = Peers::start(&[a.p2p_addr(), c.p2p_addr()], Network::Regtest).unwrap();
    assert_eq!(ac.wait_synced(Duration::from_secs(60)).unwrap(), 103);
    let ok = ac.verify_payment(&claim, Duration::from_secs(30)).unwrap();
    assert_eq!((ok.block_hash, ok.confirmations, ok.value_sat), (ha, 2, 25_000));
    assert_eq!(ac.verify_payment(&claim2, Duration::from_secs(30)).unwrap().value_sat, 30_000);
}
