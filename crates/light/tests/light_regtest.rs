//! The light client against a real regtest bitcoind over P2P: a real payment checks out
//! once buried deep enough; claims about it that are false in any way are refused, each
//! with its reason.

use std::time::Duration;

use bitmote_chain::bitcoin::{Address, Amount, Network, ScriptBuf, TxOut, Txid};
use bitmote_chain::provision::{ensure_bitcoind, InstallOptions, LogProgress};
use bitmote_chain::regtest::{coinbase_at, spend_op_true, RegtestNode, RegtestOptions};
use bitmote_light::{LightClient, LightError, PaymentClaim};

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
