//! One tick's payment record and the per-session account both sides keep.
//!
//! Every keysend of a session carries one custom TLV record, [`TLV_TICK`] (odd, so a
//! node that does not know it ignores it, as BOLT 1 requires), whose value is a
//! bitmote [`SignedReading`] of the meter's device key. The reading's payload is
//!
//! ```text
//! session   [16]    session id
//! tick      u64 BE  0, 1, 2, … (one payment per tick, never repeated)
//! register  u64 BE  cumulative energy of the session, milli-watt-hours
//! amount    u64 BE  this payment, msat (must equal the HTLC amount received)
//! paid      u64 BE  cumulative payments of the session including this one, msat
//! ```
//!
//! so the meter's signature covers the session, the tick number, the register and the
//! money; the same signed reading is a notary receipt that proves the bill later.
//!
//! Both sides run the same arithmetic ([`Account`]): the money due for a register is
//! `register × price / 1000` rounded down on the *cumulative* register, so the
//! sub-millisatoshi remainder stays in the register and is never lost to rounding.

use bitmote_device::batch::SignedReading;
use bitmote_device::reading::{sensor, unit, Reading, Value};
use bitmote_device::sign::SigningKey;
use serde::{Deserialize, Serialize};

use crate::tariff::{Mode, Tariff};

/// Custom TLV type of a tick record ("btk" 01; odd = optional).
pub const TLV_TICK: u64 = 0x6274_6B01;
const PAYLOAD_LEN: usize = 16 + 4 * 8;

/// A session id.
pub type SessionId = [u8; 16];

/// What one payment says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tick {
    #[serde(with = "crate::hexs")]
    pub session: SessionId,
    pub tick: u64,
    pub register_mwh: u64,
    pub amount_msat: u64,
    pub paid_msat: u64,
}

/// Why a payment is not credited to a session.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq, Serialize)]
pub enum Refusal {
    #[error("no bitmote tick record in the payment")]
    Missing,
    #[error("malformed tick record: {0}")]
    Malformed(String),
    #[error("unknown session {0}")]
    UnknownSession(String),
    #[error("session {0} has ended")]
    Ended(String),
    #[error("register signature does not verify with the session's meter key")]
    BadSignature,
    #[error("tick {got} replayed or out of order (expected {expected})")]
    WrongTick { got: u64, expected: u64 },
    #[error("register went backwards ({got} mWh < {last} mWh)")]
    RegisterBackwards { got: u64, last: u64 },
    #[error("register grew {grew} mWh, more than the contracted power allows ({cap} mWh)")]
    Implausible { grew: u64, cap: u64 },
    #[error("record says {declared} msat but the payment carried {received} msat")]
    AmountMismatch { declared: u64, received: u64 },
    #[error("record says {declared} msat paid in total, the account says {account} msat")]
    PaidMismatch { declared: u64, account: u64 },
}

/// The result of a credited payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Verdict {
    /// Paid in full.
    Paid,
    /// Credited, but less than the register requires: the supply must be cut.
    Short { required_msat: u64, paid_msat: u64 },
}

impl Tick {
    fn payload(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(PAYLOAD_LEN);
        v.extend_from_slice(&self.session);
        for x in [self.tick, self.register_mwh, self.amount_msat, self.paid_msat] {
            v.extend_from_slice(&x.to_be_bytes());
        }
        v
    }

    /// The meter's signed reading for this tick (`seq` = the meter's reading counter).
    pub fn sign(&self, key: &SigningKey, seq: u64, time_ms: u64) -> SignedReading {
        let reading = Reading {
            device: key.public_key().device_id(),
            seq,
            timestamp_ms: time_ms,
            sensor: sensor::METER_TICK,
            unit: unit::WATT_HOUR,
            value: Value::Bytes(self.payload()),
        };
        SignedReading::sign(key, reading).expect("a tick reading is always valid for its own key")
    }

    /// The tick a reading carries (the signature is checked separately).
    pub fn from_reading(r: &Reading) -> Result<Self, Refusal> {
        let b = match (&r.value, r.sensor) {
            (Value::Bytes(b), sensor::METER_TICK) if b.len() == PAYLOAD_LEN => b,
            _ => return Err(Refusal::Malformed("not a meter tick reading".into())),
        };
        let n = |i: usize| u64::from_be_bytes(b[16 + 8 * i..24 + 8 * i].try_into().unwrap());
        Ok(Tick { session: b[..16].try_into().unwrap(), tick: n(0), register_mwh: n(1), amount_msat: n(2), paid_msat: n(3) })
    }

    /// Decode the TLV value (a signed reading).
    pub fn decode_record(value: &[u8]) -> Result<(SignedReading, Tick), Refusal> {
        let sr = SignedReading::decode(value).map_err(|e| Refusal::Malformed(format!("{e:?}")))?;
        let t = Tick::from_reading(&sr.reading)?;
        Ok((sr, t))
    }
}

/// The account of one session, identical on both sides when they agree.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Ticks paid.
    pub ticks: u64,
    /// Cumulative energy, mWh (the last register paid for).
    pub register_mwh: u64,
    /// Money paid, msat.
    pub paid_msat: u64,
}

impl Account {
    /// Money due for the energy so far, msat.
    pub fn due_msat(&self, t: &Tariff) -> u64 {
        t.due_msat(self.register_mwh)
    }

    /// Paid beyond the energy so far: a prepaid meter's tick ahead (delivered, never
    /// refunded, before the session closes), or postpaid 1-msat keep-alives.
    pub fn credit_msat(&self, t: &Tariff) -> i128 {
        self.paid_msat as i128 - self.due_msat(t) as i128
    }

    /// The meter's next payment at `register_mwh`, measured `elapsed_ms` after the
    /// register last paid for: exactly what the register makes due, plus, prepaid, one
    /// tick ahead at the rate just measured (the energy since the previous payment, scaled
    /// to one `tick_ms` when it accrued over longer: after a payment that took long, or a
    /// restart, the buyer still pays only one tick ahead); at least 1 msat, so every tick
    /// is paid and the provider can tell a live meter from a dead one.
    pub fn next_tick(&self, t: &Tariff, session: SessionId, register_mwh: u64, elapsed_ms: u64) -> Tick {
        let due = t.due_msat(register_mwh);
        let target = match t.mode {
            Mode::Postpaid => due,
            Mode::Prepaid => {
                let grew = due.saturating_sub(self.due_msat(t)) as u128;
                let ahead = grew * t.tick_ms as u128 / (elapsed_ms.max(t.tick_ms).max(1) as u128);
                due.saturating_add(ahead as u64)
            }
        };
        self.tick_of(session, register_mwh, target.saturating_sub(self.paid_msat).max(1))
    }

    /// `tick` (from [`Account::next_tick`]) with at most `max_ahead_msat` paid ahead of the
    /// energy its register makes due: the buyer's cover limit. Still at least 1 msat.
    pub fn with_ahead_at_most(&self, t: &Tariff, tick: Tick, max_ahead_msat: u64) -> Tick {
        let most = t.due_msat(tick.register_mwh).saturating_add(max_ahead_msat).max(self.paid_msat.saturating_add(1));
        if tick.paid_msat <= most {
            return tick;
        }
        Tick { amount_msat: most - self.paid_msat, paid_msat: most, ..tick }
    }

    /// A prepaid session's closing tick at `register_mwh`, with no tick ahead any more:
    /// the tick paid ahead is being delivered. `(tick, true)`: the register has made the
    /// whole payment due, and this last tick pays exactly the rest: the account is then
    /// settled to the millisatoshi (paid = due). `(keep-alive, false)`: not all delivered
    /// yet; 1 msat, so the provider keeps the supply on. (A register exactly at the
    /// payments gets a keep-alive too: a tick always carries money, and the next
    /// register passes it.)
    pub fn closing_tick(&self, t: &Tariff, session: SessionId, register_mwh: u64) -> (Tick, bool) {
        let due = t.due_msat(register_mwh);
        if due > self.paid_msat {
            (self.tick_of(session, register_mwh, due - self.paid_msat), true)
        } else {
            (self.tick_of(session, register_mwh, 1), false)
        }
    }

    fn tick_of(&self, session: SessionId, register_mwh: u64, amount_msat: u64) -> Tick {
        Tick { session, tick: self.ticks, register_mwh, amount_msat, paid_msat: self.paid_msat + amount_msat }
    }

    /// Provider side: check a received payment and credit it. `elapsed_ms` is the
    /// time since the previous payment (or since the session opened).
    pub fn accept(&mut self, t: &Tariff, tick: &Tick, received_msat: u64, elapsed_ms: u64) -> Result<Verdict, Refusal> {
        if tick.tick != self.ticks {
            return Err(Refusal::WrongTick { got: tick.tick, expected: self.ticks });
        }
        if tick.register_mwh < self.register_mwh {
            return Err(Refusal::RegisterBackwards { got: tick.register_mwh, last: self.register_mwh });
        }
        // Leave room for clock jitter between the two machines: one extra tick.
        let cap = t.cap_mwh(elapsed_ms + t.tick_ms + t.grace_ms);
        let grew = tick.register_mwh - self.register_mwh;
        if grew > cap {
            return Err(Refusal::Implausible { grew, cap });
        }
        if tick.amount_msat != received_msat {
            return Err(Refusal::AmountMismatch { declared: tick.amount_msat, received: received_msat });
        }
        // Checked: the total is the sum of real payments, but the record's numbers are not.
        if self.paid_msat.checked_add(received_msat) != Some(tick.paid_msat) {
            return Err(Refusal::PaidMismatch { declared: tick.paid_msat, account: self.paid_msat.saturating_add(received_msat) });
        }
        self.record(tick);
        // In both modes the register's energy must be paid in full. The prepaid tick
        // ahead is not checked: a meter that skips it exposes the provider to one tick
        // plus grace, as postpaid does; and a closing meter's last ticks deliver the tick
        // paid ahead without paying another.
        let required = t.due_msat(tick.register_mwh);
        Ok(if self.paid_msat < required { Verdict::Short { required_msat: required, paid_msat: self.paid_msat } } else { Verdict::Paid })
    }

    /// Credit a tick (the meter does this once its payment succeeded).
    pub fn record(&mut self, tick: &Tick) {
        self.ticks = tick.tick + 1;
        self.register_mwh = tick.register_mwh;
        self.paid_msat = tick.paid_msat;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tariff::{test_tariff, Mode};

    fn key() -> SigningKey {
        SigningKey::schnorr_from_secret(&[7; 32]).unwrap()
    }

    #[test]
    fn record_round_trips_and_is_signed() {
        let t = Tick { session: [9; 16], tick: 3, register_mwh: 1234, amount_msat: 56, paid_msat: 789 };
        let sr = t.sign(&key(), 42, 1000);
        sr.verify(&key().public_key()).unwrap();
        let (back_sr, back) = Tick::decode_record(&sr.encode()).unwrap();
        assert_eq!(back, t);
        assert_eq!(back_sr, sr);
        let other = SigningKey::schnorr_from_secret(&[8; 32]).unwrap();
        assert!(sr.verify(&other.public_key()).is_err());
        assert!(matches!(Tick::decode_record(&sr.encode()[..20]), Err(Refusal::Malformed(_))));
    }

    /// Meter and provider running the same arithmetic over a long session agree to
    /// the millisatoshi, in both modes, with energies that never divide evenly; a
    /// prepaid meter is exactly one measured tick ahead, and its closing ticks deliver
    /// that tick so the session ends with exactly the energy's price paid: nothing to
    /// refund.
    #[test]
    fn both_sides_agree_and_never_lose_a_millisatoshi() {
        for mode in [Mode::Postpaid, Mode::Prepaid] {
            let t = test_tariff(mode);
            let (mut meter, mut provider) = (Account::default(), Account::default());
            let mut register = 0;
            for i in 0..500u64 {
                let before = meter.clone();
                let tick = meter.next_tick(&t, [1; 16], register, t.tick_ms);
                assert_eq!(provider.accept(&t, &tick, tick.amount_msat, t.tick_ms), Ok(Verdict::Paid));
                meter.record(&tick);
                assert_eq!(meter, provider);
                let credit = meter.credit_msat(&t);
                match mode {
                    // Postpaid: never ahead by more than the 1-msat keep-alives of ticks
                    // whose energy was worth less than 1 msat.
                    Mode::Postpaid => assert!((0..=i as i128 + 1).contains(&credit), "credit {credit}"),
                    // Prepaid: ahead by the price of the tick just measured (at least; a
                    // tick whose load fell below the last one's still pays 1 msat), never
                    // more than one tick plus grace at the contracted power.
                    Mode::Prepaid => {
                        let last = (t.due_msat(register) - before.due_msat(&t)) as i128;
                        assert!(credit >= last, "credit {credit} < last tick {last}");
                        assert!(credit <= last.max(before.credit_msat(&t) + 1), "credit {credit}");
                        assert!(credit <= t.due_msat(t.cap_mwh(t.tick_ms + t.grace_ms)) as i128 + i as i128 + 1);
                    }
                }
                register += (i * 7919) % 1999 + 1; // 1..2 Wh per tick, awkward numbers
            }
            let last = meter.next_tick(&t, [1; 16], register, t.tick_ms);
            provider.accept(&t, &last, last.amount_msat, t.tick_ms).unwrap();
            meter.record(&last);
            assert_eq!(meter, provider);
            assert!(meter.paid_msat >= t.due_msat(register));
            if mode == Mode::Prepaid {
                // Closing: the tick ahead is delivered, 37 mWh (9.25 msat) a tick, with
                // 1-msat keep-alives, until the register makes the whole payment due. (The
                // keep-alives must be worth less than a closing tick's energy, as any real
                // load at these prices is: 180 W for 2 s is 25 msat.)
                let ahead = meter.credit_msat(&t);
                assert!(ahead > 0);
                let mut n = 0;
                loop {
                    register += 37;
                    n += 1;
                    let (tick, last) = meter.closing_tick(&t, [1; 16], register);
                    assert!(last || tick.amount_msat == 1);
                    assert_eq!(provider.accept(&t, &tick, tick.amount_msat, t.tick_ms), Ok(Verdict::Paid));
                    meter.record(&tick);
                    if last {
                        break;
                    }
                    assert!(n < 100_000);
                }
                assert_eq!(meter, provider);
                assert_eq!(meter.paid_msat, t.due_msat(register), "settled to the msat");
            }
        }
    }

    /// The closing tick settles exactly whatever the last register: a register past the
    /// payments pays the difference; one short of it, or exactly at it, a keep-alive.
    /// A tick measured long after the previous one (its payment took 22 s while the
    /// provider restarted) pays the energy of those 22 s in full, but only one tick ahead
    /// at their average rate, not 22 s ahead (found by `pay_cli`: 1,513 msat ahead that a
    /// close could not deliver in time).
    #[test]
    fn a_late_tick_pays_its_energy_and_only_one_tick_ahead() {
        let t = test_tariff(Mode::Prepaid);
        let a = Account { ticks: 15, register_mwh: 590, paid_msat: 0 };
        let a = Account { paid_msat: t.due_msat(a.register_mwh) + 1, ..a };
        let gap = 44 * t.tick_ms;
        let tick = a.next_tick(&t, [1; 16], 590 + 44_000, gap);
        let due = t.due_msat(590 + 44_000);
        let grew = due - t.due_msat(590);
        assert_eq!(tick.paid_msat, due + grew / 44);
        // At the usual pace, the whole growth is the tick ahead, as before.
        let tick = a.next_tick(&t, [1; 16], 590 + 1000, t.tick_ms);
        assert_eq!(tick.paid_msat, 2 * t.due_msat(590 + 1000) - t.due_msat(590));
        // A faster tick (shorter than tick_ms) is not scaled up.
        assert_eq!(a.next_tick(&t, [1; 16], 590 + 1000, 1).paid_msat, tick.paid_msat);
    }

    #[test]
    fn the_cover_is_capped_and_the_energy_still_paid() {
        let t = test_tariff(Mode::Prepaid);
        let a = Account { ticks: 3, register_mwh: 1000, paid_msat: 300 };
        let tick = a.next_tick(&t, [1; 16], 5000, t.tick_ms);
        let due = t.due_msat(5000);
        assert_eq!(tick.paid_msat, due + (due - t.due_msat(1000)));
        let capped = a.with_ahead_at_most(&t, tick, 10);
        assert_eq!((capped.paid_msat, capped.amount_msat), (due + 10, due + 10 - 300));
        assert_eq!(a.with_ahead_at_most(&t, tick, u64::MAX), tick);
        // Already ahead by more than the cap: 1 msat keeps the session alive, no more.
        let rich = Account { paid_msat: due + 500, ..a.clone() };
        let tick = rich.next_tick(&t, [1; 16], 5000, t.tick_ms);
        assert_eq!(rich.with_ahead_at_most(&t, tick, 10).amount_msat, 1);
    }

    #[test]
    fn closing_tick_settles_exactly() {
        let t = test_tariff(Mode::Prepaid);
        let a = Account { ticks: 5, register_mwh: 4000, paid_msat: 1500 }; // due 1000, 500 ahead
        let keep_alive = |r| {
            let (k, last) = a.closing_tick(&t, [1; 16], r);
            !last && k.amount_msat == 1
        };
        assert!(keep_alive(5000)); // due 1250 < 1500
        assert!(keep_alive(6000)); // due 1500 exactly
        let (last, done) = a.closing_tick(&t, [1; 16], 6011); // due 1502
        assert!(done);
        assert_eq!((last.tick, last.amount_msat, last.paid_msat), (5, 2, 1502));
    }

    #[test]
    fn provider_refuses_replays_lies_and_detects_short_payments() {
        let t = test_tariff(Mode::Postpaid);
        let mut acct = Account::default();
        let t0 = acct.next_tick(&t, [1; 16], 1000, t.tick_ms);
        acct.accept(&t, &t0, t0.amount_msat, 2000).unwrap();
        // The same tick again.
        assert_eq!(acct.accept(&t, &t0, t0.amount_msat, 2000), Err(Refusal::WrongTick { got: 0, expected: 1 }));
        let mut t1 = acct.next_tick(&t, [1; 16], 2000, t.tick_ms);
        assert!(matches!(acct.accept(&t, &t1, t1.amount_msat - 1, 2000), Err(Refusal::AmountMismatch { .. })));
        let mut back = t1;
        back.register_mwh = 10;
        assert!(matches!(acct.accept(&t, &back, back.amount_msat, 2000), Err(Refusal::RegisterBackwards { .. })));
        let mut huge = acct.next_tick(&t, [1; 16], 1_000_000, t.tick_ms);
        huge.paid_msat = acct.paid_msat + huge.amount_msat;
        assert!(matches!(acct.accept(&t, &huge, huge.amount_msat, 2000), Err(Refusal::Implausible { .. })));
        let before = acct.clone();
        // A short payment is credited and reported.
        t1.amount_msat -= 100;
        t1.paid_msat -= 100;
        let v = acct.accept(&t, &t1, t1.amount_msat, 2000).unwrap();
        assert_eq!(v, Verdict::Short { required_msat: 500, paid_msat: 400 });
        assert_eq!(acct.paid_msat, before.paid_msat + t1.amount_msat);
    }

    /// Found by `fuzz/` (target `tick`): a record whose amount brought the account's total
    /// over 2^64 msat panicked on the addition (overflow checks) instead of being refused.
    #[test]
    fn a_total_over_u64_is_refused_not_a_panic() {
        let t = test_tariff(Mode::Postpaid);
        let mut acct = Account { ticks: 3, register_mwh: 1000, paid_msat: u64::MAX - 5 };
        let before = acct.clone();
        let tick = Tick { session: [1; 16], tick: 3, register_mwh: 1000, amount_msat: 10, paid_msat: 4 };
        assert_eq!(acct.accept(&t, &tick, 10, 2000), Err(Refusal::PaidMismatch { declared: 4, account: u64::MAX }));
        assert_eq!(acct, before);
    }
}
