//! The tick TLV record of a Lightning keysend (`bitmote_pay::tick::Tick::decode_record`),
//! which the provider decodes from every payment it receives, and the provider's check of
//! it (`Account::accept`). Input: the record, then 8 bytes of the amount received (or the
//! record's own amount). Properties: a decoded record re-encodes to its bytes and decodes
//! the same; the accounting neither panics nor overflows (overflow checks are on) and only
//! credits a tick that is the next one, for the amount received, with a consistent total.
#![no_main]
use bitmote_fuzz::tariff::{Mode, Tariff};
use bitmote_fuzz::tick::{Account, Tick};
use libfuzzer_sys::fuzz_target;

fn tariff(mode: Mode) -> Tariff {
    Tariff {
        provider: "02".repeat(33),
        price_msat_per_wh: 250,
        tick_ms: 2000,
        mode,
        grace_ms: 4000,
        max_power_w: 3000,
        session_limit_msat: 1_000_000,
        valid_until: u64::MAX,
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let (record, tail) = data.split_at(data.len() - 9);
    let Ok((sr, t)) = Tick::decode_record(record) else { return };
    assert_eq!(sr.encode(), record, "tick record: decode then encode differs");
    let (sr2, t2) = Tick::decode_record(&sr.encode()).expect("re-encoded record decodes");
    assert_eq!((sr2, t2), (sr.clone(), t));
    assert_eq!(Tick::from_reading(&sr.reading), Ok(t));
    let received = if tail[0] & 1 == 0 { t.amount_msat } else { u64::from_be_bytes(tail[1..9].try_into().unwrap()) };
    let mode = if tail[0] & 2 == 0 { Mode::Postpaid } else { Mode::Prepaid };
    let tf = tariff(mode);
    // From a fresh account, and from one that has seen ticks up to this one (fewer than
    // 2^48: one payment per tick, so a tick count near 2^64 is not a state that exists).
    for mut acc in [Account::default(), Account { ticks: t.tick.min(1 << 48), register_mwh: t.register_mwh / 2, paid_msat: t.paid_msat / 2 }] {
        let before = acc.clone();
        let elapsed = u64::from(tail[0]) * 1000;
        match acc.accept(&tf, &t, received, elapsed) {
            Ok(_) => {
                assert_eq!(t.tick, before.ticks);
                assert_eq!(t.amount_msat, received);
                assert_eq!(Some(t.paid_msat), before.paid_msat.checked_add(received));
                assert!(t.register_mwh >= before.register_mwh);
                assert_eq!(acc.ticks, before.ticks + 1);
                let _ = acc.credit_msat(&tf);
            }
            Err(_) => assert_eq!(acc, before, "a refused tick changed the account"),
        }
    }
});
