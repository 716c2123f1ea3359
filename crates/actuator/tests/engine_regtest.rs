//! The trigger engine against a real regtest bitcoind: payments with confirmations,
//! underpayments, heights, restarts, reorgs before and after firing, TTL.

use std::time::Duration;

use bitmote_actuator::{Engine, EngineEvent, OutboxState, RuleSet};
use bitmote_chain::bitcoin::{Address, Amount, FeeRate, Network, ScriptBuf};
use bitmote_chain::wallet::GatewayWallet;
use bitmote_chain::{BlockStream, ChainClient, Start, StreamConfig};
use bitmote_regtest::provision::{ensure_bitcoind, InstallOptions, LogProgress};
use bitmote_regtest::{op_true_address, RegtestNode, RegtestOptions};
use serde_json::json;

fn addr(tag: u8) -> Address {
    Address::p2wsh(&ScriptBuf::from(vec![0x60 + tag, 0x87]), Network::Regtest)
}

fn mine_empty(c: &ChainClient, n: usize) {
    for _ in 0..n {
        let _: serde_json::Value = c.raw("generateblock", &[json!(op_true_address().to_string()), json!([])]).unwrap();
    }
}

struct Runner {
    engine: Engine,
    stream: BlockStream<ChainClient>,
}

impl Runner {
    fn open(db: &std::path::Path, rules: &RuleSet, c: &ChainClient) -> Runner {
        let engine = Engine::open(db, rules.clone(), Network::Regtest, "gw.test/log").unwrap();
        let stored = engine.cursor().unwrap().map(Some);
        let stream = BlockStream::resume(c.fresh().unwrap(), stored, Start::Tip, StreamConfig::default()).unwrap();
        Runner { engine, stream }
    }

    fn drain(&mut self) -> Vec<EngineEvent> {
        let mut out = vec![];
        while let Some(ev) = self.stream.next_event(Some(Duration::from_millis(200))).unwrap() {
            out.extend(self.engine.apply(&ev).unwrap());
        }
        out
    }
}

/// A regtest node and a wallet holding one mature coinbase.
fn funded_node() -> (RegtestNode, tempfile::TempDir, GatewayWallet) {
    let exe = ensure_bitcoind(&InstallOptions::default(), &mut LogProgress::new()).unwrap().bitcoind;
    let node = RegtestNode::start(RegtestOptions::new(exe)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut wallet = GatewayWallet::open(&dir.path().join("wallet"), node.client()).unwrap();
    let fund = wallet.new_address().unwrap();
    node.client().mine(1, &fund).unwrap();
    node.mine(100).unwrap();
    wallet.sync(node.client()).unwrap();
    (node, dir, wallet)
}

fn dues(evs: &[EngineEvent]) -> Vec<String> {
    evs.iter().filter_map(|e| if let EngineEvent::Due { event_id } = e { Some(event_id.clone()) } else { None }).collect()
}

#[test]
fn payments_fire_once_when_buried_and_reorgs_cancel_or_revert() {
    let (node, dir, mut wallet) = funded_node();
    let c = node.client();
    let lease_height = c.tip().unwrap().height + 6;
    let rules = RuleSet::parse(
        &format!(
            "[[rule]]\nid = \"door\"\ndevice = \"lock-7\"\ntrigger = {{ kind = \"payment\", address = \"{}\", min_sat = 20000, confirmations = 2 }}\naction = {{ command = \"unlock\" }}\nrevert = {{ command = \"lock\" }}\n\n\
             [[rule]]\nid = \"vip\"\ndevice = \"lock-8\"\ntrigger = {{ kind = \"payment\", address = \"{}\", min_sat = 50000 }}\naction = {{ command = \"unlock\" }}\n\n\
             [[rule]]\nid = \"lease\"\ndevice = \"relay-2\"\ntrigger = {{ kind = \"height\", height = {lease_height} }}\naction = {{ command = \"off\" }}\nttl_secs = 0\n",
            addr(1),
            addr(2)
        ),
        Network::Regtest,
    )
    .unwrap();
    let db = dir.path().join("actuator.sqlite");
    let mut r = Runner::open(&db, &rules, c);
    let pay = |w: &mut GatewayWallet, to: &Address, sat: u64| {
        let tx = w.pay(to, Amount::from_sat(sat), FeeRate::from_sat_per_vb_u32(2)).unwrap();
        c.broadcast(&tx).unwrap();
        tx.compute_txid().to_string()
    };

    // A payment to the door (enough) and an underpayment to the VIP lock.
    let t1 = pay(&mut wallet, &addr(1), 30_000);
    pay(&mut wallet, &addr(2), 10_000);
    let b1 = node.mine(1).unwrap()[0];
    let evs = r.drain();
    assert!(evs.iter().any(|e| matches!(e, EngineEvent::PaymentSeen { rule_id, .. } if rule_id == "door")), "{evs:?}");
    assert!(!evs.iter().any(|e| matches!(e, EngineEvent::PaymentSeen { rule_id, .. } if rule_id == "vip")), "underpaid: {evs:?}");
    assert!(dues(&evs).is_empty(), "one confirmation is not two: {evs:?}");
    node.mine(1).unwrap();
    let evs = r.drain();
    let door_event = format!("door:{t1}:");
    assert!(matches!(&dues(&evs)[..], [e] if e.starts_with(&door_event)), "{evs:?}");
    let door_event = dues(&evs)[0].clone();

    // A restart in any state neither loses nor repeats: the engine resumes from its cursor.
    drop(r);
    let mut r = Runner::open(&db, &rules, c);
    node.mine(1).unwrap();
    assert!(dues(&r.drain()).is_empty(), "nothing fires twice after a restart");
    let pending = r.engine.pending().unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].event_id, door_event);
    assert_eq!(pending[0].device, "lock-7");
    assert!(r.engine.mark_delivered(&door_event).unwrap());
    assert!(r.engine.mark_acked(&door_event).unwrap());
    assert!(!r.engine.mark_acked(&door_event).unwrap(), "acknowledging twice changes nothing");

    // The height rule fires once when reached; with a zero TTL, late delivery is refused.
    let now = c.tip().unwrap().height;
    node.mine(lease_height - now).unwrap();
    let evs = r.drain();
    let lease_event = format!("lease:height:{lease_height}");
    assert_eq!(dues(&evs), vec![lease_event.clone()]);
    std::thread::sleep(Duration::from_millis(5));
    assert!(!r.engine.mark_delivered(&lease_event).unwrap());
    assert_eq!(r.engine.get(&lease_event).unwrap().unwrap().state, OutboxState::Expired);

    // A reorg takes the door payment away after the lock opened: alert + revert action.
    c.invalidate_block(&b1).unwrap();
    let tip = c.tip().unwrap().height;
    mine_empty(c, (lease_height - tip + 2) as usize);
    let evs = r.drain();
    assert!(evs.iter().any(|e| matches!(e, EngineEvent::Alert { event_id, .. } if *event_id == door_event)), "{evs:?}");
    assert!(dues(&evs).contains(&format!("{door_event}:revert")), "{evs:?}");
    assert!(!dues(&evs).contains(&lease_event), "the lease height was reached again: no second firing");
    assert_eq!(r.engine.get(&door_event).unwrap().unwrap().state, OutboxState::Reverted);
    let revert = r.engine.get(&format!("{door_event}:revert")).unwrap().unwrap();
    assert_eq!(revert.command, "lock");
    assert!(revert.payment.is_none(), "a revert is not a payment's action");

    // A new payment reorged out before its confirmations does not fire while it is out.
    let _: Vec<String> = c.raw("getrawmempool", &[]).unwrap();
    let t2 = pay(&mut wallet, &addr(1), 25_000);
    let b2 = c.mine(1, &op_true_address()).unwrap()[0];
    let evs = r.drain();
    assert!(dues(&evs).iter().all(|e| !e.contains(&t2)));
    c.invalidate_block(&b2).unwrap();
    mine_empty(c, 3);
    let evs = r.drain();
    assert!(dues(&evs).iter().all(|e| !e.contains(&t2)), "reorged out before 2 confirmations: {evs:?}");
    // Back in a block and buried: it fires, once.
    node.mine(2).unwrap();
    let evs = r.drain();
    let fired: Vec<String> = dues(&evs).into_iter().filter(|e| e.contains(&t2)).collect();
    assert_eq!(fired.len(), 1, "{evs:?}");
    node.mine(3).unwrap();
    assert!(dues(&r.drain()).iter().all(|e| !e.contains(&t2)));
    let log = r.engine.log().unwrap();
    assert!(log.iter().any(|i| i.event_id == fired[0] && i.state == OutboxState::Due));
}

/// The context the engine here runs in ([`Runner::open`]): regtest, gateway `gw.test/log`, domain `test/doors`.
fn scope(device: &str) -> bitmote_actuator::command::Scope<'_> {
    bitmote_actuator::command::Scope { network: Network::Regtest, gateway: "gw.test/log", domain: "test/doors", device }
}

/// Command `seq` for `device` in [`scope`], valid up to height 10,000.
fn signed(key: &bitmote_device::SigningKey, device: &str, seq: u32, word: &str) -> Vec<u8> {
    bitmote_actuator::command::encode(key, &scope(device), seq, 10_000, word).unwrap()
}

#[test]
fn signed_on_chain_commands_fire_once_and_replays_forgeries_and_disallowed_ones_do_not() {
    use bitmote_actuator::command;
    use bitmote_device::SigningKey;
    let (node, dir, mut wallet) = funded_node();
    let c = node.client();
    let operator = SigningKey::schnorr_from_secret(&[5; 32]).unwrap();
    let intruder = SigningKey::schnorr_from_secret(&[6; 32]).unwrap();
    let rules = RuleSet::parse(
        &format!(
            "[[rule]]\nid = \"door-cmd\"\ndevice = \"lock-9\"\ntrigger = {{ kind = \"command\", key = \"{pk}\", domain = \"test/doors\" }}\naction = {{ command = \"*\" }}\n\n\
             [[rule]]\nid = \"relay-cmd\"\ndevice = \"relay-1\"\ntrigger = {{ kind = \"command\", key = \"{pk}\", domain = \"test/doors\" }}\naction = {{ command = \"on\" }}\n",
            pk = operator.public_key()
        ),
        Network::Regtest,
    )
    .unwrap();
    let mut r = Runner::open(&dir.path().join("act.sqlite"), &rules, c);
    let send = |w: &mut GatewayWallet, payload: Vec<u8>| {
        let tx = w.op_return_tx(&payload, FeeRate::from_sat_per_vb_u32(2)).unwrap();
        c.broadcast(&tx).unwrap();
        tx.compute_txid().to_string()
    };
    let refused = |evs: &[EngineEvent]| -> Vec<String> {
        evs.iter().filter_map(|e| if let EngineEvent::CommandRefused { reason, .. } = e { Some(reason.clone()) } else { None }).collect()
    };

    let unlock = signed(&operator, "lock-9", 1, "unlock");
    send(&mut wallet, unlock.clone());
    node.mine(1).unwrap();
    let evs = r.drain();
    assert_eq!(dues(&evs), vec!["door-cmd:cmd:1".to_string()], "{evs:?}");
    assert_eq!(r.engine.get("door-cmd:cmd:1").unwrap().unwrap().command, "unlock");

    // The same signed command again (a replay), a forgery, the right key for another device
    // or another gateway, and a command the relay's rule does not allow: none fires.
    send(&mut wallet, unlock);
    send(&mut wallet, signed(&intruder, "lock-9", 7, "unlock"));
    send(&mut wallet, signed(&operator, "lock-8", 9, "unlock"));
    let elsewhere = command::Scope { gateway: "other.test/log", ..scope("lock-9") };
    send(&mut wallet, command::encode(&operator, &elsewhere, 9, 1_000, "unlock").unwrap());
    send(&mut wallet, signed(&operator, "relay-1", 1, "off"));
    node.mine(1).unwrap();
    let evs = r.drain();
    assert!(dues(&evs).is_empty(), "{evs:?}");
    let reasons = refused(&evs);
    assert!(reasons.iter().any(|m| m.contains("replayed")), "{reasons:?}");
    assert!(reasons.iter().any(|m| m.contains("not allowed")), "{reasons:?}");
    assert_eq!(reasons.len(), 2, "forgeries and other devices' commands are simply not ours: {reasons:?}");

    // The next number works, and carries its own command word.
    send(&mut wallet, signed(&operator, "lock-9", 2, "lock"));
    send(&mut wallet, signed(&operator, "relay-1", 2, "on"));
    node.mine(1).unwrap();
    let mut d = dues(&r.drain());
    d.sort();
    assert_eq!(d, vec!["door-cmd:cmd:2".to_string(), "relay-cmd:cmd:2".to_string()]);
    assert_eq!(r.engine.get("door-cmd:cmd:2").unwrap().unwrap().command, "lock");
}

#[test]
fn rules_added_through_the_engine_fire_from_the_next_block_and_survive_a_restart() {
    use bitmote_actuator::{Action, EngineError, Rule, RuleSource, Trigger};
    let (node, dir, mut wallet) = funded_node();
    let c = node.client();
    let file = RuleSet::parse(
        "[[rule]]\nid = \"lease\"\ndevice = \"relay-2\"\ntrigger = { kind = \"height\", height = 100000 }\naction = { command = \"off\" }\n",
        Network::Regtest,
    )
    .unwrap();
    let db = dir.path().join("actuator.sqlite");
    let mut r = Runner::open(&db, &file, c);
    let order = |n: u64, to: &Address| Rule {
        id: format!("order-{n}"),
        device: "lock-7".into(),
        trigger: Trigger::Payment { address: to.to_string(), min_sat: 20_000, confirmations: 1 },
        action: Action { command: "unlock".into(), args: json!({ "seconds": 60 }), webhook: None, exec: None },
        revert: None,
        ttl_secs: None,
    };

    // Numbered, checked, unique across the file and the database.
    let added = r.engine.add_rule_with(|n| order(n, &addr(3))).unwrap();
    assert_eq!(added.id, "order-1");
    assert_eq!(r.engine.add_rule_with(|n| order(n, &addr(4))).unwrap().id, "order-2");
    let mut dup = order(9, &addr(5));
    dup.id = "lease".into();
    assert!(matches!(r.engine.add_rule(dup), Err(EngineError::RuleExists(id)) if id == "lease"));
    let mut zero_conf = order(9, &addr(5));
    zero_conf.trigger = Trigger::Payment { address: addr(5).to_string(), min_sat: 1, confirmations: 0 };
    assert!(matches!(r.engine.add_rule(zero_conf), Err(EngineError::Rules(_))));
    assert!(matches!(r.engine.remove_rule("lease"), Err(EngineError::FileRule(_))), "file rules are the file's");
    assert!(matches!(r.engine.remove_rule("nope"), Err(EngineError::NoSuchRule(_))));
    assert_eq!(r.engine.remove_rule("order-2").unwrap().id, "order-2");

    // The added rule fires on the next payment, without reopening the engine.
    let tx = wallet.pay(&addr(3), Amount::from_sat(25_000), FeeRate::from_sat_per_vb_u32(2)).unwrap();
    c.broadcast(&tx).unwrap();
    node.mine(1).unwrap();
    let fired = dues(&r.drain());
    assert_eq!(fired.len(), 1, "{fired:?}");
    assert!(fired[0].starts_with(&format!("order-1:{}:", tx.compute_txid())));
    let item = r.engine.get(&fired[0]).unwrap().unwrap();
    assert_eq!(item.confirmations, Some(1));
    let p = item.payload();
    assert_eq!((p.rule.as_str(), p.device.as_str(), p.args["seconds"].as_u64()), ("order-1", "lock-7", Some(60)));
    // The command carries the payment, for devices that check it themselves.
    let paid = item.payment.clone().expect("a payment rule's action names its payment");
    let txid = tx.compute_txid().to_string();
    assert_eq!(
        (paid.txid.as_str(), paid.address.as_str(), paid.height),
        (txid.as_str(), addr(3).to_string().as_str(), c.tip().unwrap().height)
    );
    assert_eq!(tx.output[paid.vout as usize].value.to_sat(), paid.amount_sat);
    assert_eq!(p.payment.map(|p| p.txid), Some(txid.clone()));
    // A device that refuses it closes it: never delivered again.
    assert!(r.engine.mark_refused(&fired[0], "the device refused it: no such payment").unwrap());
    assert_eq!(r.engine.get(&fired[0]).unwrap().unwrap().state, OutboxState::Refused);
    assert!(r.engine.pending().unwrap().iter().all(|i| i.event_id != fired[0]));

    // After a restart the API rules are still watched (the removed one is not), numbering goes on.
    drop(r);
    let mut r = Runner::open(&db, &file, c);
    let rules = r.engine.rules();
    let ids: Vec<(&str, RuleSource)> = rules.iter().map(|e| (e.rule.id.as_str(), e.source)).collect();
    assert_eq!(ids, vec![("lease", RuleSource::File), ("order-1", RuleSource::Api)]);
    assert_eq!(r.engine.add_rule_with(|n| order(n, &addr(6))).unwrap().id, "order-3", "numbers are never reused");
    let tx = wallet.pay(&addr(6), Amount::from_sat(30_000), FeeRate::from_sat_per_vb_u32(2)).unwrap();
    c.broadcast(&tx).unwrap();
    node.mine(1).unwrap();
    assert!(matches!(&dues(&r.drain())[..], [e] if e.starts_with("order-3:")));

    // A file rule with the id of an API rule is refused at start, saying what to do.
    drop(r);
    let clash = RuleSet::parse(
        "[[rule]]\nid = \"order-1\"\ndevice = \"x\"\ntrigger = { kind = \"height\", height = 5 }\naction = { command = \"on\" }\n",
        Network::Regtest,
    )
    .unwrap();
    let err = Engine::open(&db, clash, Network::Regtest, "gw.test/log").err().expect("refused").to_string();
    assert!(err.contains("order-1") && err.contains("rename it in the file"), "{err}");
}

/// A device the test plays: everything pending is delivered and acknowledged; what it ran.
fn device_runs(r: &mut Runner) -> Vec<(String, String)> {
    let mut ran = vec![];
    for item in r.engine.pending().unwrap() {
        assert!(r.engine.mark_delivered(&item.event_id).unwrap());
        ran.push((item.event_id.clone(), item.command.clone()));
        r.engine.mark_acked(&item.event_id).unwrap();
    }
    ran
}

/// Issue 16, failure 2, on a real node: the payment confirms and the lock opens; its block
/// is invalidated (the payment goes back to the mempool) and the lock is locked again; the
/// payment is mined again in the new branch and buried: the lock opens again, under a new
/// event id, and the outbox says so (executed once net).
#[test]
fn a_payment_reorged_out_and_mined_again_opens_the_lock_again_after_its_revert() {
    let (node, dir, mut wallet) = funded_node();
    let c = node.client();
    let rules = RuleSet::parse(
        &format!(
            "[[rule]]\nid = \"rental\"\ndevice = \"lock-1\"\ntrigger = {{ kind = \"payment\", address = \"{}\", min_sat = 20000, confirmations = 3 }}\naction = {{ command = \"unlock\" }}\nrevert = {{ command = \"lock\" }}\nttl_secs = 600\n",
            addr(1)
        ),
        Network::Regtest,
    )
    .unwrap();
    let mut r = Runner::open(&dir.path().join("actuator.sqlite"), &rules, c);
    r.drain();
    let tx = wallet.pay(&addr(1), Amount::from_sat(25_000), FeeRate::from_sat_per_vb_u32(2)).unwrap();
    c.broadcast(&tx).unwrap();
    let txid = tx.compute_txid().to_string();
    let b_pay = node.mine(1).unwrap()[0];
    node.mine(2).unwrap();
    r.drain();
    let key = r.engine.pending().unwrap()[0].event_id.clone();
    assert!(key.starts_with(&format!("rental:{txid}:")), "{key}");
    assert_eq!(device_runs(&mut r), vec![(key.clone(), "unlock".to_string())]);

    // The payment's block is replaced: for now the best chain ends at its parent.
    c.invalidate_block(&b_pay).unwrap();
    let mempool: Vec<String> = c.raw("getrawmempool", &[]).unwrap();
    assert!(mempool.contains(&txid), "the payment went back to the mempool");
    let evs = r.drain();
    assert!(evs.iter().any(|e| matches!(e, EngineEvent::Alert { event_id, .. } if *event_id == key)), "{evs:?}");
    assert_eq!(device_runs(&mut r), vec![(format!("{key}:revert"), "lock".to_string())]);
    assert_eq!(r.engine.get(&key).unwrap().unwrap().state, OutboxState::Reverted);

    // The new branch mines it again (from the mempool) and buries it under 3 blocks. (Its
    // first block pays its coinbase elsewhere: the same block again would be the invalid one.)
    let b_new = c.mine(1, &addr(7)).unwrap()[0];
    assert!(c.block(&b_new).unwrap().txdata.iter().any(|t| t.compute_txid().to_string() == txid), "mined again");
    node.mine(1).unwrap();
    r.drain();
    assert!(device_runs(&mut r).is_empty(), "2 confirmations are not 3");
    node.mine(1).unwrap();
    let evs = r.drain();
    let again = format!("{key}:g2");
    assert_eq!(dues(&evs), vec![again.clone()], "{evs:?}");
    assert_eq!(device_runs(&mut r), vec![(again.clone(), "unlock".to_string())]);

    // The outbox: reverted, its revert done, the second generation done — once net.
    let log = r.engine.log().unwrap();
    let states: Vec<(&str, OutboxState, Option<&str>)> = log.iter().map(|i| (i.event_id.as_str(), i.state, i.reverts.as_deref())).collect();
    assert_eq!(states.len(), 3, "{states:?}");
    assert!(states.contains(&(key.as_str(), OutboxState::Reverted, None)));
    assert!(states.contains(&(format!("{key}:revert").as_str(), OutboxState::Acked, Some(key.as_str()))));
    assert!(states.contains(&(again.as_str(), OutboxState::Acked, None)));
    let g2 = r.engine.get(&again).unwrap().unwrap();
    assert_eq!(g2.payment.unwrap().height, c.tip().unwrap().height - 2, "the payment where it is now");
    assert!(log.iter().all(|i| i.trigger_key.as_deref() == Some(key.as_str())));
    // More blocks: nothing more.
    node.mine(3).unwrap();
    r.drain();
    assert!(device_runs(&mut r).is_empty());
}

/// The same shape for a signed on-chain command: reorged out after it ran, reverted, mined
/// again from the mempool: not refused as a replay, it runs again (new event id).
#[test]
fn a_signed_command_reorged_out_and_mined_again_takes_effect_again() {
    use bitmote_device::SigningKey;
    let (node, dir, mut wallet) = funded_node();
    let c = node.client();
    let operator = SigningKey::schnorr_from_secret(&[5; 32]).unwrap();
    let rules = RuleSet::parse(
        &format!(
            "[[rule]]\nid = \"door-cmd\"\ndevice = \"lock-9\"\ntrigger = {{ kind = \"command\", key = \"{}\", domain = \"test/doors\", confirmations = 2 }}\naction = {{ command = \"*\" }}\nrevert = {{ command = \"lock\" }}\n",
            operator.public_key()
        ),
        Network::Regtest,
    )
    .unwrap();
    let mut r = Runner::open(&dir.path().join("act.sqlite"), &rules, c);
    r.drain();
    let tx = wallet.op_return_tx(&signed(&operator, "lock-9", 1, "unlock"), FeeRate::from_sat_per_vb_u32(2)).unwrap();
    c.broadcast(&tx).unwrap();
    let b_cmd = node.mine(1).unwrap()[0];
    node.mine(1).unwrap();
    r.drain();
    assert_eq!(device_runs(&mut r), vec![("door-cmd:cmd:1".to_string(), "unlock".to_string())]);
    c.invalidate_block(&b_cmd).unwrap();
    r.drain();
    assert_eq!(device_runs(&mut r), vec![("door-cmd:cmd:1:revert".to_string(), "lock".to_string())]);
    c.mine(2, &addr(7)).unwrap(); // not the invalidated block again: another coinbase
    let evs = r.drain();
    assert!(!evs.iter().any(|e| matches!(e, EngineEvent::CommandRefused { .. })), "the same command is no replay: {evs:?}");
    assert_eq!(device_runs(&mut r), vec![("door-cmd:cmd:1:g2".to_string(), "unlock".to_string())]);
}
