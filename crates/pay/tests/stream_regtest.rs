//! Streaming sessions between real ldk-node machines on a real regtest bitcoind.

mod common;

use std::time::Duration;

use bitmote_device::sign::SigningKey;
use bitmote_pay::ldk_node::lightning_types::payment::PaymentPreimage;
use bitmote_pay::ldk_node::payment::{PaymentDirection, PaymentKind, PaymentStatus};
use bitmote_pay::ldk_node::{CustomTlvRecord, Node};
use bitmote_pay::provider::Statement;
use bitmote_pay::store::State;
use bitmote_pay::tariff::Mode;
use bitmote_pay::tick::{Tick, TLV_TICK};
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
    let p = pair(false);
    let (chain, pn, mn) = (&p.chain, &p.pn, &p.mn);
    // Nothing on the provider's side: under its channel reserve, it cannot send a
    // millisatoshi, and needs not (no refund: a prepaid tick ahead is delivered).
    channel(chain, mn, pn, 1_000_000, None, false);

    let http = free_addr();
    let mut paid_total = 0;
    for mode in [Mode::Postpaid, Mode::Prepaid] {
        let (provider, meter) = p.roles(tariff(mode), http);
        let s = meter.open_session(&pn.node_id().to_string()).unwrap();
        let s = meter.run(&s.id, Some(60)).unwrap();
        assert_eq!(s.state, State::Open, "{:?}", s.reason);
        assert_eq!(s.account.ticks, 60);
        if mode == Mode::Prepaid {
            // One measured tick paid ahead while streaming.
            assert!(s.account.credit_msat(&s.tariff) > 0, "{:?}", s.account);
        }
        let out = meter.close(&s.id).unwrap();
        assert!(out.reconciled, "{mode:?}: accounts differ: {out:#?}");
        assert_eq!(out.unsettled, None, "{out:#?}");
        let a = &out.session.account;
        let t = &out.session.tariff;
        // Real energy flowed and exactly its price was paid (plus, postpaid, at most
        // one 1-msat keep-alive per tick; prepaid, the tick ahead was delivered by the
        // closing ticks: not a millisatoshi more than the energy).
        assert!(a.register_mwh > 60 * 10, "{a:?}");
        let credit = a.credit_msat(t);
        match mode {
            Mode::Postpaid => {
                assert!((0..=60).contains(&credit), "{a:?} credit {credit}");
                assert_eq!(a.ticks, 60);
            }
            Mode::Prepaid => {
                assert_eq!(credit, 0, "{a:?}");
                assert!(a.ticks > 60, "closing ticks delivered the tick ahead: {a:?}");
            }
        }
        // The provider's Lightning node really received what the accounts say.
        paid_total += a.paid_msat;
        eventually("money arrived", || received_msat(pn) == paid_total);
        let ps = provider.session(&s.id).unwrap().unwrap();
        assert_eq!(ps.state, State::Closed);
        assert_eq!(ps.refused_msat, 0);
        // Every tick's register is a signed reading of the meter's device key.
        let ticks = meter.ticks(&s.id).unwrap();
        assert_eq!(ticks.len() as u64, a.ticks);
        assert!(ticks.iter().all(|r| r.done_ms.is_some()));
        provider.shutdown();
        meter.shutdown();
        std::thread::sleep(Duration::from_millis(500));
    }
    stop(&[pn, mn]);
}

#[test]
fn late_forged_replayed_and_short_payments_are_caught() {
    let p = pair(false);
    let (chain, pn, mn) = (&p.chain, &p.pn, &p.mn);
    channel(chain, mn, pn, 1_000_000, None, false);
    let http = free_addr();
    let (provider, meter) = p.roles(tariff(Mode::Postpaid), http);

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
    let good = acct.next_tick(&s.tariff, s.id, acct.register_mwh + 50, s.tariff.tick_ms);
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
    // Nobody but the session's meter may close it: unsigned, or signed by another key, is 401.
    let close = format!("http://{http}/v1/sessions/{}/close", bitmote_device::hex_encode(&s.id));
    let forged = bitmote_device::hex_encode(&stranger.sign(&bitmote_pay::close_message(&s.id, &acct)).encode());
    // And a close signed by the meter for another account than the one it carries.
    let mut other = acct.clone();
    other.ticks += 5;
    let replaced = bitmote_device::hex_encode(&meter.device_key().sign(&bitmote_pay::close_message(&s.id, &other)).encode());
    for body in [
        serde_json::json!({ "account": acct, "signature": "00" }),
        serde_json::json!({ "account": acct, "signature": forged }),
        serde_json::json!({ "account": acct, "signature": replaced }),
    ] {
        match ureq::post(&close).send_json(body) {
            Err(ureq::Error::Status(code, r)) => assert_eq!(code, 401, "{}", r.into_string().unwrap()),
            other => panic!("a close not signed by the meter was accepted: {other:?}"),
        }
    }
    assert_eq!(provider.session(&s.id).unwrap().unwrap().state, State::Open, "still open");
    let st = provider.status().unwrap();
    let reasons = st["refusals"].to_string();
    assert!(reasons.contains("signature") && reasons.contains("replayed") && reasons.contains("carried"), "{reasons}");
    // Short: consistent record, but less than the register makes due: credited, then cut.
    let mut short = acct.next_tick(&s.tariff, s.id, acct.register_mwh + 400, s.tariff.tick_ms);
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
    stop(&[pn, mn]);
}

#[test]
fn a_routed_session_pays_through_a_hub() {
    let p = pair(true);
    let (chain, pn, mn) = (&p.chain, &p.pn, &p.mn);
    let hub = machine(chain, &p.dir.path().join("hub"), "hub", true);
    fund(chain, &hub, 1);
    channel(chain, &hub, pn, 1_000_000, None, true);
    channel(chain, mn, &hub, 1_000_000, None, false);
    // Wait until the meter knows the hub–provider channel from gossip.
    let mine = || {
        chain.mine(1).unwrap();
    };
    bitmote_pay::node::wait_until(mn, "gossip", Duration::from_secs(120), mine, |n| !n.network_graph().list_channels().is_empty()).unwrap();
    let http = free_addr();
    let (provider, meter) = p.roles(tariff(Mode::Postpaid), http);
    let s = meter.open_session(&pn.node_id().to_string()).unwrap();
    let s = meter.run(&s.id, Some(10)).unwrap();
    assert_eq!(s.account.ticks, 10, "{:?}", s.reason);
    let out = meter.close(&s.id).unwrap();
    assert!(out.reconciled, "{out:#?}");
    // The hub charged its routing fee on top of each tick: its base fee (LDK's default,
    // 1000 msat, no proportional part), nothing more. (On-chain payments, e.g. the channel
    // funding, are listed too and carry mining fees: not routing.)
    let ticks: Vec<u64> = mn
        .list_payments_with_filter(|p| {
            p.direction == PaymentDirection::Outbound
                && p.status == PaymentStatus::Succeeded
                && matches!(p.kind, PaymentKind::Spontaneous { .. })
        })
        .iter()
        .map(|p| p.fee_paid_msat.unwrap_or(0))
        .collect();
    assert_eq!(ticks, vec![1000; 10], "one routing fee per tick");
    let fees: u64 = ticks.iter().sum();
    eprintln!("routed: {} ticks, {} msat to the provider, {fees} msat routing fees", s.account.ticks, s.account.paid_msat);
    provider.shutdown();
    meter.shutdown();
    std::thread::sleep(Duration::from_millis(500));

    // Prepaid in the same topology (`bitmote up`'s default): the provider's side of the
    // hub's channel is under its channel reserve, so it cannot send a millisatoshi. The
    // buyer stops mid-stream; it pays exactly the energy it consumed, nothing is owed.
    let reserve = pn.list_channels().remove(0);
    assert_eq!(reserve.outbound_capacity_msat, 0, "the provider can send nothing: {reserve:?}");
    let before = received_msat(pn);
    let (provider, meter) = p.roles(tariff(Mode::Prepaid), http);
    let s = meter.open_session(&pn.node_id().to_string()).unwrap();
    let out = stop_mid_tick_and_close(&meter, &s.id, 8, 230);
    assert!(out.reconciled, "{out:#?}");
    assert_eq!(out.unsettled, None, "{out:#?}");
    let a = &out.session.account;
    assert_eq!(a.paid_msat, out.session.tariff.due_msat(a.register_mwh), "paid exactly the energy: {a:?}");
    eventually("money arrived", || received_msat(pn) == before + a.paid_msat);
    let ps = provider.session(&s.id).unwrap().unwrap();
    assert_eq!((ps.state, ps.refused_msat, ps.late, ps.short), (State::Closed, 0, 0, 0), "{ps:#?}");
    eprintln!(
        "prepaid via a hub, provider under reserve: {} ticks, {} msat, {} Wh, nothing owed",
        a.ticks,
        a.paid_msat,
        a.register_mwh as f64 / 1000.0
    );
    provider.shutdown();
    meter.shutdown();
    stop(&[pn, mn, &hub]);
}

/// Stream until `ticks` ticks are paid, then `offset_ms` into the next tick stop
/// streaming (what Ctrl-C does) and close.
fn stop_mid_tick_and_close(
    meter: &std::sync::Arc<bitmote_pay::meter::Meter>,
    id: &bitmote_pay::tick::SessionId,
    ticks: u64,
    offset_ms: u64,
) -> bitmote_pay::meter::Outcome {
    let (m, sid) = (meter.clone(), *id);
    let run = std::thread::spawn(move || m.run(&sid, None));
    eventually("ticks paid", || meter.account(id).unwrap().unwrap().ticks >= ticks);
    std::thread::sleep(Duration::from_millis(offset_ms));
    meter.stop_streaming();
    let s = run.join().unwrap().unwrap();
    assert_eq!(s.state, State::Open, "{:?}", s.reason);
    meter.close(id).unwrap()
}

/// Ctrl-C at any instant of a tick (before it is sent, while its payment is in flight,
/// just after) ends in one state both sides agree on, to the millisatoshi, in both
/// modes; prepaid, the tick ahead is delivered and nothing is left paid for nothing.
#[test]
fn stopping_anywhere_in_a_tick_closes_with_equal_accounts() {
    let p = pair(false);
    let (chain, pn, mn) = (&p.chain, &p.pn, &p.mn);
    channel(chain, mn, pn, 1_000_000, None, false);
    let http = free_addr();
    let mut paid_total = 0;
    for mode in [Mode::Postpaid, Mode::Prepaid] {
        let (provider, unused) = p.roles(tariff(mode), http);
        unused.shutdown();
        std::thread::sleep(Duration::from_millis(500));
        // The tariff's tick is 500 ms: stops spread over it.
        for offset in [0, 120, 260, 410] {
            // A stopped meter stays stopped (Ctrl-C): a fresh one for each session.
            let meter =
                bitmote_pay::meter::Meter::start(mn.clone(), &p.dir.path().join("meter"), &format!("http://{http}"), free_addr()).unwrap();
            let s = meter.open_session(&pn.node_id().to_string()).unwrap();
            let out = stop_mid_tick_and_close(&meter, &s.id, 4, offset);
            assert!(out.reconciled, "{mode:?} stop at +{offset} ms: {out:#?}");
            assert_eq!(out.unsettled, None, "{out:#?}");
            let a = &out.session.account;
            let ps = provider.session(&s.id).unwrap().unwrap();
            assert_eq!(&ps.account, a, "{mode:?} +{offset} ms");
            assert_eq!((ps.state, ps.refused_msat, ps.late, ps.short), (State::Closed, 0, 0, 0), "{ps:#?}");
            // Every tick in the meter's store is paid: none left pending.
            let rows = meter.ticks(&s.id).unwrap();
            assert_eq!(rows.len() as u64, a.ticks);
            assert!(rows.iter().all(|r| r.done_ms.is_some()));
            if mode == Mode::Prepaid {
                assert_eq!(a.paid_msat, out.session.tariff.due_msat(a.register_mwh), "{a:?}");
            }
            paid_total += a.paid_msat;
            eventually("money arrived", || received_msat(pn) == paid_total);
            eprintln!("{mode:?}, stop at +{offset} ms: {} ticks, {} msat, reconciled", a.ticks, a.paid_msat);
            meter.shutdown();
            std::thread::sleep(Duration::from_millis(500));
        }
        provider.shutdown();
        std::thread::sleep(Duration::from_millis(500));
    }
    stop(&[pn, mn]);
}

/// On-chain balance, sat.
fn onchain(n: &Node) -> u64 {
    n.list_balances().total_onchain_balance_sats
}

#[test]
fn cooperative_and_force_close_return_the_right_amounts_on_chain() {
    let p = pair(false);
    let (chain, pn, mn) = (&p.chain, &p.pn, &p.mn);
    let http = free_addr();
    // A dear tariff, so the provider's side ends above the dust limit.
    let mut t = tariff(Mode::Postpaid);
    t.price_msat_per_wh = 20_000_000;
    let (provider, meter) = p.roles(t, http);
    // A buyer who agreed to that price (its spending policy allows it).
    meter.set_policy(bitmote_pay::tariff::BuyerPolicy {
        max_price_msat_per_wh: 20_000_000,
        max_session_msat: 100_000_000,
        max_day_msat: 1_000_000_000,
        ..Default::default()
    });
    let mine = || {
        chain.mine(1).unwrap();
    };
    let session = |ticks| {
        let s = meter.open_session(&pn.node_id().to_string()).unwrap();
        let s = meter.run(&s.id, Some(ticks)).unwrap();
        let out = meter.close(&s.id).unwrap();
        assert!(out.reconciled, "{out:#?}");
        out.session.account.paid_msat
    };

    // Cooperative close: the provider gets exactly what it was paid (rounded down to
    // the satoshi), the meter the rest minus the closing fee, which it pays as funder.
    channel(chain, mn, pn, 500_000, None, false);
    let paid = session(10);
    assert!(paid > 1_000_000, "paid {paid} msat");
    let (m0, p0) = (onchain(mn), onchain(pn));
    let ch = mn.list_channels().remove(0);
    let local_sat = ch.outbound_capacity_msat / 1000 + ch.unspendable_punishment_reserve.unwrap_or(0);
    mn.close_channel(&ch.user_channel_id, pn.node_id()).unwrap();
    bitmote_pay::node::wait_until(pn, "provider paid out", Duration::from_secs(120), mine, |n| onchain(n) > p0).unwrap();
    bitmote_pay::node::wait_until(mn, "meter paid out", Duration::from_secs(60), mine, |n| onchain(n) > m0).unwrap();
    assert_eq!(onchain(pn) - p0, paid / 1000, "provider's close output");
    let back = onchain(mn) - m0;
    assert!(back <= 500_000 - paid / 1000 && back + 5_000 >= local_sat.min(500_000 - paid / 1000), "meter got {back} sat back");
    eprintln!("cooperative close: provider {} sat, meter {back} sat of a 500000 sat channel", paid / 1000);

    // Force close: the provider vanishes mid-life; the meter closes alone and gets its
    // balance after the to_self_delay timelock.
    channel(chain, mn, pn, 300_000, None, false);
    let paid = session(5);
    provider.shutdown();
    pn.stop().unwrap();
    let m1 = onchain(mn);
    let ch = mn.list_channels().into_iter().find(|c| c.channel_value_sats == 300_000).unwrap();
    mn.force_close_channel(&ch.user_channel_id, pn.node_id(), Some("provider vanished".into())).unwrap();
    // Ten blocks a second: the commitment confirms, the 144-block timelock passes, the
    // sweep confirms.
    let mine10 = || {
        chain.mine(10).unwrap();
    };
    bitmote_pay::node::wait_until(mn, "timelocked funds swept", Duration::from_secs(240), mine10, |n| {
        let b = n.list_balances();
        // (ldk-node keeps listing the sweep as "awaiting threshold confirmations" for a
        // while after the money is back in the wallet; the wallet is what counts.)
        b.lightning_balances.is_empty() && onchain(n) + 10_000 > m1 + 300_000 - paid / 1000
    })
    .unwrap_or_else(|e| panic!("{e}: {:#?}, on-chain before {m1}", mn.list_balances()));
    let back = onchain(mn) - m1;
    assert!(back <= 300_000 - paid / 1000 && back + 10_000 >= 300_000 - paid / 1000, "meter recovered {back} sat");
    eprintln!("force close: meter recovered {back} sat of {} after the timelock", 300_000 - paid / 1000);
    meter.shutdown();
    stop(&[mn]);
}

/// Issue #13, item 4: opening a session takes the meter key's signature, a signed request
/// cannot be replayed, a meter has one open session, and the provider as a whole at most
/// `MAX_OPEN_SESSIONS`; spam does not slow the deadline checks of honest sessions (they
/// read only open sessions). Real HTTP against a real provider on regtest.
#[test]
fn opening_a_session_needs_the_meter_key_and_spam_is_capped() {
    use bitmote_pay::provider::{OpenRequest, MAX_OPEN_SESSIONS};
    let p = pair(false);
    let http = free_addr();
    // A long grace period: no session is cut for lateness while the test opens them all.
    let (provider, _meter) = p.roles(bitmote_pay::tariff::Tariff { grace_ms: 600_000, ..tariff(Mode::Postpaid) }, http);
    let url = format!("http://{http}/v1/sessions");
    let tariff_id = provider.tariff().id();
    let node = p.mn.node_id().to_string();
    let signed = |k: &SigningKey, ts: u64| {
        let key = bitmote_device::hex_encode(&k.public_key().encode());
        let sig = bitmote_device::hex_encode(&k.sign(&bitmote_pay::open_message(&tariff_id, &key, &node, ts)).encode());
        OpenRequest { tariff_id: tariff_id.clone(), meter_key: key, meter_node: node.clone(), timestamp_ms: ts, signature: sig }
    };
    let post = |r: &OpenRequest| match ureq::post(&url).send_json(serde_json::to_value(r).unwrap()) {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap()),
        Err(e) => panic!("{e}"),
    };
    let k = SigningKey::schnorr_from_secret(&[11; 32]).unwrap();
    let now = bitmote_chain::now_ms();
    // Unsigned (the old request) and signed by another key: refused.
    let unsigned = serde_json::json!({ "tariff_id": tariff_id, "meter_key": signed(&k, now).meter_key, "meter_node": node });
    assert_eq!(ureq::post(&url).send_json(unsigned).unwrap_err().into_response().map(|r| r.status()), Some(422));
    let mut forged = signed(&SigningKey::schnorr_from_secret(&[12; 32]).unwrap(), now);
    forged.meter_key = signed(&k, now).meter_key;
    let (code, why) = post(&forged);
    assert_eq!(code, 401, "{why}");
    assert!(why.contains("not signed by its meter key"), "{why}");
    // Far from the provider's clock: refused.
    assert_eq!(post(&signed(&k, now - 3_600_000)).0, 401);
    // Signed: opened. The same request again (a replay), or an older one: refused.
    let first = signed(&k, now);
    assert_eq!(post(&first).0, 200);
    let (code, why) = post(&first);
    assert_eq!(code, 401, "{why}");
    assert!(why.contains("replayed"), "{why}");
    // A fresh request while the meter's session is open: one open session per meter.
    let (code, why) = post(&signed(&k, now + 1));
    assert_eq!(code, 409, "{why}");
    // Spam from many keys: capped overall.
    let t0 = std::time::Instant::now();
    let mut opened = 1;
    for i in 0u32.. {
        let mut secret = [0u8; 32];
        secret[..4].copy_from_slice(&i.to_be_bytes());
        secret[31] = 1;
        let (code, why) = post(&signed(&SigningKey::schnorr_from_secret(&secret).unwrap(), bitmote_chain::now_ms()));
        if code != 200 {
            assert_eq!(code, 409, "{why}");
            assert!(why.contains("sessions are open"), "{why}");
            break;
        }
        opened += 1;
    }
    assert_eq!(opened, MAX_OPEN_SESSIONS);
    eprintln!("{MAX_OPEN_SESSIONS} sessions opened in {:?}", t0.elapsed());
    assert_eq!(provider.status().unwrap()["sessions"].as_array().map(Vec::len), Some(MAX_OPEN_SESSIONS));
}

/// Issue #13, item 1: the meter pays only within its own spending policy, whatever the
/// provider signs. A tariff above its price limit is refused before anything is paid; a
/// prepaid session pays at most its cover ahead and stops before passing its session limit.
#[test]
fn the_meter_pays_only_within_its_spending_policy() {
    use bitmote_pay::tariff::{BuyerPolicy, Tariff};
    let p = pair(false);
    let (chain, pn, mn) = (&p.chain, &p.pn, &p.mn);
    channel(chain, mn, pn, 1_000_000, None, false);
    let sent =
        || mn.list_payments().iter().filter(|x| x.direction == PaymentDirection::Outbound && x.status == PaymentStatus::Succeeded).count();
    // A provider asking 1,000,000 msat per Wh (the default limit is 1,000).
    let greedy = Tariff { price_msat_per_wh: 1_000_000, ..tariff(Mode::Prepaid) };
    let http = free_addr();
    let (provider, meter) = p.roles(greedy, http);
    let before = sent();
    let e = meter.open_session(&pn.node_id().to_string()).unwrap_err().to_string();
    assert!(e.contains("spending policy") && e.contains("1000000 msat/Wh"), "{e}");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(sent(), before, "nothing was paid");
    assert!(provider.status().unwrap()["sessions"].as_array().unwrap().is_empty(), "no session was opened");
    provider.shutdown();
    meter.shutdown();

    // A fair price, but a small cover and a small session limit.
    let http = free_addr();
    let (_provider, meter) = p.roles(tariff(Mode::Prepaid), http);
    meter.set_policy(BuyerPolicy { max_cover_msat: 3, max_session_msat: 200, ..BuyerPolicy::default() });
    let s = meter.open_session(&pn.node_id().to_string()).unwrap();
    let s = meter.run(&s.id, Some(1000)).unwrap();
    assert!(s.reason.as_deref().is_some_and(|r| r.contains("spending policy")), "{:?}", s.reason);
    assert!(s.account.paid_msat <= 200, "{:?}", s.account);
    assert!(s.account.credit_msat(&s.tariff) <= 3, "at most the cover ahead: {:?}", s.account);
    for row in meter.ticks(&s.id).unwrap() {
        assert!(row.tick.paid_msat as i128 - s.tariff.due_msat(row.tick.register_mwh) as i128 <= 3, "{:?}", row.tick);
    }
    let out = meter.close(&s.id).unwrap();
    assert!(out.reconciled, "{out:#?}");
    // The closing ticks stay within the policy too: the session never pays past its limit.
    assert!(out.session.account.paid_msat <= 200, "{:?}", out.session.account);
}

/// Issue #13, items 2 and 3: nothing is ever refunded (a prepaid tick ahead is delivered
/// before the close), so concurrent closes cannot collect anything: eight validly signed
/// closes at once get the same statement, the provider sends no payment, and the account
/// stays what the meter declared. A keysend to the meter from anyone (a "refund" record or
/// any other) is not part of any account: the meter's statement does not change.
#[test]
fn concurrent_closes_collect_nothing_and_strangers_keysends_change_no_account() {
    let p = pair(false);
    let (chain, pn, mn) = (&p.chain, &p.pn, &p.mn);
    // The provider has outbound liquidity here (a push): if any code path could refund, it could.
    channel(chain, mn, pn, 1_000_000, Some(200_000_000), false);
    let http = free_addr();
    let (provider, meter) = p.roles(tariff(Mode::Prepaid), http);
    let s = meter.open_session(&pn.node_id().to_string()).unwrap();
    let s = meter.run(&s.id, Some(6)).unwrap();
    let out = meter.close(&s.id).unwrap();
    assert!(out.reconciled, "{out:#?}");
    let account = out.session.account.clone();
    let outbound = |n: &Node| n.list_payments().iter().filter(|x| x.direction == PaymentDirection::Outbound).count();
    let provider_sent = outbound(pn);
    let req = serde_json::json!({
        "account": account,
        "signature": bitmote_device::hex_encode(&meter.device_key().sign(&bitmote_pay::close_message(&s.id, &account)).encode()),
    });
    let url = format!("http://{http}/v1/sessions/{}/close", bitmote_device::hex_encode(&s.id));
    let statements: Vec<serde_json::Value> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..8)
            .map(|_| sc.spawn(|| ureq::post(&url).send_json(req.clone()).unwrap().into_json::<serde_json::Value>().unwrap()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for st in &statements {
        assert_eq!(st["session"]["account"], serde_json::json!(account), "{st:#}");
        assert_eq!(st["session"]["state"], "closed", "{st:#}");
    }
    // A statement counts only if the provider the tariff pinned signed it (issue #13 item 3):
    // one signed by another node key naming itself, or the provider's signature under
    // another signer's name, does not.
    let genuine: Statement = serde_json::from_value(statements[0].clone()).unwrap();
    let provider_id = pn.node_id().to_string();
    assert!(genuine.verify_by(mn, &provider_id));
    let forged = Statement::sign(mn, genuine.session.clone());
    assert!(!forged.verify_by(mn, &provider_id), "signed by another key");
    let renamed = Statement { signer: mn.node_id().to_string(), ..genuine.clone() };
    assert!(!renamed.verify_by(mn, &provider_id) && !renamed.verify_by(mn, &mn.node_id().to_string()));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(outbound(pn), provider_sent, "the provider sent nothing");
    // A stranger (here the provider's node, as an attacker would) keysends the meter money
    // with records of its own.
    let rec = CustomTlvRecord { type_num: 0x62746b03, value: b"refund 999999".to_vec() };
    pn.spontaneous_payment().send_with_custom_tlvs(5_000, mn.node_id(), None, vec![rec]).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(meter.account(&s.id).unwrap(), Some(account.clone()));
    assert_eq!(provider.session(&s.id).unwrap().unwrap().account, account);
}
