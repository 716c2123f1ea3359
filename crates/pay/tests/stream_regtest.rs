//! Streaming sessions between real ldk-node machines on a real regtest bitcoind.

mod common;

use std::time::Duration;

use bitmote_pay::ldk_node::lightning_types::payment::PaymentPreimage;
use bitmote_pay::ldk_node::payment::{PaymentDirection, PaymentStatus};
use bitmote_pay::ldk_node::{CustomTlvRecord, Node};
use bitmote_pay::meter::Meter;
use bitmote_pay::provider::Provider;
use bitmote_pay::store::State;
use bitmote_pay::tariff::Mode;
use bitmote_pay::tick::{Tick, TLV_TICK};
use bitmote_device::sign::SigningKey;
use common::*;

fn received_msat(n: &Node) -> u64 {
    n.list_payments()
        .iter()
        .filter(|p| p.direction == PaymentDirection::Inbound && p.status == PaymentStatus::Succeeded)
        .map(|p| p.amount_msat.unwrap_or(0))
        .sum()
}

/// Wait for a condition on the provider's store.
fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..300 {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what} did not happen within 30 s");
}

#[test]
fn sixty_tick_sessions_reconcile_in_both_modes() {
    let chain = regtest();
    let dir = tempfile::Builder::new().disable_cleanup(std::env::var_os("KEEP").is_some()).tempdir().unwrap();
    eprintln!("data in {}", dir.path().display());
    let pn = machine(&chain, &dir.path().join("provider"), "provider", false);
    let mn = machine(&chain, &dir.path().join("meter"), "meter", false);
    fund(&chain, &mn, 1);
    // The provider starts with 20,000 sat on its side, above its channel reserve, so
    // it can refund the prepaid cover at the end.
    channel(&chain, &mn, &pn, 1_000_000, Some(20_000_000), false);

    let http = free_addr();
    let mut paid_total = 0;
    for mode in [Mode::Postpaid, Mode::Prepaid] {
        let provider = Provider::start(pn.clone(), &dir.path().join("provider"), tariff(mode), http).unwrap();
        let meter = Meter::start(mn.clone(), &dir.path().join("meter"), &format!("http://{http}"), free_addr()).unwrap();
        let s = meter.open_session(&pn.node_id().to_string()).unwrap();
        let s = meter.run(&s.id, Some(60)).unwrap();
        assert_eq!(s.state, State::Open, "{:?}", s.reason);
        assert_eq!(s.account.ticks, 60);
        let out = meter.close(&s.id).unwrap();
        assert!(out.reconciled, "{mode:?}: accounts differ: {out:#?}");
        let a = &out.session.account;
        let t = &out.session.tariff;
        // Real energy flowed and exactly its price was paid (plus, postpaid, at most
        // one 1-msat keep-alive per tick; prepaid, the cover, which came back).
        assert!(a.register_mwh > 60 * 10, "{a:?}");
        let credit = a.credit_msat(t);
        match mode {
            Mode::Postpaid => assert!((0..=60).contains(&credit), "{a:?} credit {credit}"),
            Mode::Prepaid => {
                assert!(a.refunded_msat >= t.prepaid_cover_msat(), "{a:?}");
                assert_eq!(credit, 0, "{a:?}");
            }
        }
        // The provider's Lightning node really received what the accounts say.
        paid_total += a.paid_msat;
        eventually("money arrived", || received_msat(&pn) == paid_total);
        let ps = provider.session(&s.id).unwrap().unwrap();
        assert_eq!(ps.state, State::Closed);
        assert_eq!(ps.refused_msat, 0);
        // Every tick's register is a signed reading of the meter's device key.
        let ticks = meter.ticks(&s.id).unwrap();
        assert_eq!(ticks.len(), 60);
        assert!(ticks.iter().all(|r| r.done_ms.is_some()));
        provider.shutdown();
        meter.shutdown();
        std::thread::sleep(Duration::from_millis(500));
    }
    stop(&[&pn, &mn]);
}

#[test]
fn late_forged_replayed_and_short_payments_are_caught() {
    let chain = regtest();
    let dir = tempfile::Builder::new().disable_cleanup(std::env::var_os("KEEP").is_some()).tempdir().unwrap();
    eprintln!("data in {}", dir.path().display());
    let pn = machine(&chain, &dir.path().join("provider"), "provider", false);
    let mn = machine(&chain, &dir.path().join("meter"), "meter", false);
    fund(&chain, &mn, 1);
    channel(&chain, &mn, &pn, 1_000_000, None, false);
    let http = free_addr();
    let provider = Provider::start(pn.clone(), &dir.path().join("provider"), tariff(Mode::Postpaid), http).unwrap();
    let meter = Meter::start(mn.clone(), &dir.path().join("meter"), &format!("http://{http}"), free_addr()).unwrap();

    // A meter that stops paying: the provider cuts it after the grace period.
    let s = meter.open_session(&pn.node_id().to_string()).unwrap();
    let s = meter.run(&s.id, Some(4)).unwrap();
    eventually("late meter cut", || provider.session(&s.id).unwrap().unwrap().state == State::Cut);
    let ps = provider.session(&s.id).unwrap().unwrap();
    assert_eq!(ps.late, 1);
    assert!(ps.reason.as_deref().unwrap().contains("late"), "{:?}", ps.reason);
    assert!(!ps.supply);
    // And the meter, seeing no energy, stops paying.
    let after = meter.run(&s.id, Some(10)).unwrap();
    assert_eq!(after.account.ticks, 4);
    assert_eq!(after.state, State::Cut);

    // Hand-made payments on a fresh session.
    let s = meter.open_session(&pn.node_id().to_string()).unwrap();
    let s = meter.run(&s.id, Some(2)).unwrap();
    let acct = s.account.clone();
    let send = |tick: Tick, key: &SigningKey, amount: u64, n: u8| {
        let rec = CustomTlvRecord { type_num: TLV_TICK, value: tick.sign(key, 1000 + n as u64, 0).encode() };
        mn.spontaneous_payment()
            .send_with_preimage_and_custom_tlvs(amount, pn.node_id(), vec![rec], PaymentPreimage([n; 32]), None)
            .unwrap();
    };
    let refusals = || provider.status().unwrap()["totals"]["refused"].as_u64().unwrap();
    let good = acct.next_tick(&s.tariff, s.id, acct.register_mwh + 50);
    // Forged: signed by another key.
    let stranger = SigningKey::schnorr_from_secret(&[5; 32]).unwrap();
    send(good, &stranger, good.amount_msat, 1);
    eventually("forged refused", || refusals() == 1);
    // Replayed: an old tick number with a valid signature.
    let mut old = good;
    old.tick = 0;
    send(old, meter.device_key(), old.amount_msat, 2);
    eventually("replay refused", || refusals() == 2);
    // Wrong amount: the record says more than the HTLC carried.
    send(good, meter.device_key(), good.amount_msat - 1, 3);
    eventually("mismatch refused", || refusals() == 3);
    // None of those was credited.
    assert_eq!(provider.session(&s.id).unwrap().unwrap().account, acct);
    let st = provider.status().unwrap();
    let reasons = st["refusals"].to_string();
    assert!(reasons.contains("signature") && reasons.contains("replayed") && reasons.contains("carried"), "{reasons}");
    // Short: consistent record, but less than the register makes due: credited, then cut.
    let mut short = acct.next_tick(&s.tariff, s.id, acct.register_mwh + 400);
    short.amount_msat -= 50;
    short.paid_msat -= 50;
    send(short, meter.device_key(), short.amount_msat, 4);
    eventually("short payment cut", || provider.session(&s.id).unwrap().unwrap().state == State::Cut);
    let ps = provider.session(&s.id).unwrap().unwrap();
    assert_eq!(ps.short, 1);
    assert!(ps.reason.as_deref().unwrap().contains("short"), "{:?}", ps.reason);
    assert_eq!(ps.account.paid_msat, short.paid_msat);
    provider.shutdown();
    meter.shutdown();
    stop(&[&pn, &mn]);
}

#[test]
fn a_routed_session_pays_through_a_hub() {
    let chain = regtest();
    let dir = tempfile::Builder::new().disable_cleanup(std::env::var_os("KEEP").is_some()).tempdir().unwrap();
    eprintln!("data in {}", dir.path().display());
    let pn = machine(&chain, &dir.path().join("provider"), "provider", true);
    let hub = machine(&chain, &dir.path().join("hub"), "hub", true);
    let mn = machine(&chain, &dir.path().join("meter"), "meter", false);
    fund(&chain, &hub, 1);
    fund(&chain, &mn, 1);
    channel(&chain, &hub, &pn, 1_000_000, None, true);
    channel(&chain, &mn, &hub, 1_000_000, None, false);
    // Wait until the meter knows the hub–provider channel from gossip.
    let mine = || {
        chain.mine(1).unwrap();
    };
    bitmote_pay::node::wait_until(&mn, "gossip", Duration::from_secs(120), mine, |n| {
        n.network_graph().list_channels().len() >= 1
    })
    .unwrap();
    let http = free_addr();
    let provider = Provider::start(pn.clone(), &dir.path().join("provider"), tariff(Mode::Postpaid), http).unwrap();
    let meter = Meter::start(mn.clone(), &dir.path().join("meter"), &format!("http://{http}"), free_addr()).unwrap();
    let s = meter.open_session(&pn.node_id().to_string()).unwrap();
    let s = meter.run(&s.id, Some(10)).unwrap();
    assert_eq!(s.account.ticks, 10, "{:?}", s.reason);
    let out = meter.close(&s.id).unwrap();
    assert!(out.reconciled, "{out:#?}");
    // The hub charged a routing fee on top of what the provider received.
    let fees: u64 = mn
        .list_payments()
        .iter()
        .filter(|p| p.direction == PaymentDirection::Outbound && p.status == PaymentStatus::Succeeded)
        .map(|p| p.fee_paid_msat.unwrap_or(0))
        .sum();
    assert!(fees > 0);
    eprintln!("routed: {} ticks, {} msat to the provider, {fees} msat routing fees", s.account.ticks, s.account.paid_msat);
    provider.shutdown();
    meter.shutdown();
    stop(&[&pn, &mn, &hub]);
}
