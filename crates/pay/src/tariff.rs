//! The provider's tariff, signed with its Lightning node key.
//!
//! The tariff is serialized as canonical JSON (fields in declaration order, no
//! whitespace); the provider signs those bytes with its node key (`sign_message`,
//! the Lightning message-signing scheme) and a meter checks the signature against
//! the node id it is about to open a session with. The session then refers to the
//! tariff by [`SignedTariff::id`], so neither side can change prices mid-session.

use serde::{Deserialize, Serialize};

/// When a tick is paid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The meter pays before the energy flows: the supply starts after the first
    /// payment, and each payment keeps one tick paid ahead at the rate of the tick just
    /// measured. The buyer risks at most that tick, which is delivered when the session
    /// closes (never refunded: returning money would need the provider's outbound
    /// liquidity); the provider at most a rise of the load within one tick plus grace.
    Prepaid,
    /// The meter pays for each tick after it: the buyer risks nothing, the provider at
    /// most one tick (plus grace) of energy.
    Postpaid,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "prepaid" => Ok(Mode::Prepaid),
            "postpaid" => Ok(Mode::Postpaid),
            _ => Err(format!("unknown payment mode {s:?} (prepaid or postpaid)")),
        }
    }
}

/// What energy costs and how it is paid.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tariff {
    /// The provider's node id (hex); payments go there.
    pub provider: String,
    /// Price per watt-hour, in millisatoshis.
    pub price_msat_per_wh: u64,
    /// Length of one tick in milliseconds (default 2000).
    pub tick_ms: u64,
    pub mode: Mode,
    /// How late a tick's payment may be before the supply is cut, in milliseconds.
    pub grace_ms: u64,
    /// The contracted power: the most a meter may register per unit of time, in watts.
    pub max_power_w: u64,
    /// A session ends when this much has been paid (millisatoshis).
    pub session_limit_msat: u64,
    /// Unix seconds after which no new session may use this tariff.
    pub valid_until: u64,
}

/// Why a tariff is not acceptable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TariffError {
    #[error("tariff signature does not verify against provider {0}")]
    BadSignature(String),
    #[error("tariff is for provider {got}, expected {expected}")]
    WrongProvider { got: String, expected: String },
    #[error("tariff expired at {0}")]
    Expired(u64),
    #[error("tariff is unusable: {0}")]
    Invalid(&'static str),
}

impl Tariff {
    /// The canonical bytes that are signed.
    pub fn canonical(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a tariff always serializes")
    }

    /// Sanity of the numbers (a provider publishing nonsense is refused). Every field is
    /// bounded, so no time or amount computed from a tariff can overflow.
    pub fn check(&self, now_secs: u64) -> Result<(), TariffError> {
        if self.tick_ms < 10 || self.tick_ms > 3_600_000 {
            return Err(TariffError::Invalid("tick length must be 10 ms to 1 h"));
        }
        if self.grace_ms > 3_600_000 {
            return Err(TariffError::Invalid("the grace period must be at most 1 h"));
        }
        if self.price_msat_per_wh > 1_000_000_000 || self.max_power_w > 100_000_000 {
            return Err(TariffError::Invalid("price (at most 10^9 msat/Wh) or power (at most 100 MW) out of range"));
        }
        if self.session_limit_msat > MAX_MSAT {
            return Err(TariffError::Invalid("the session limit is more than all bitcoin"));
        }
        if self.price_msat_per_wh == 0 || self.max_power_w == 0 || self.session_limit_msat == 0 {
            return Err(TariffError::Invalid("price, power and session limit must be positive"));
        }
        if self.price_msat_per_wh.checked_mul(self.max_power_w).is_none_or(|x| x > 1 << 48) {
            return Err(TariffError::Invalid("price × power out of range"));
        }
        if now_secs > self.valid_until {
            return Err(TariffError::Expired(self.valid_until));
        }
        Ok(())
    }

    /// The most energy (milli-watt-hours) the contracted power delivers in `ms`.
    pub fn cap_mwh(&self, ms: u64) -> u64 {
        // W × ms / 3600 = mWh
        ((self.max_power_w as u128 * ms as u128).div_ceil(3600)) as u64
    }

    /// Cost of a cumulative register (mWh) in msat, rounded down: the sub-millisatoshi
    /// remainder is never lost, it stays in the register and is paid with later energy.
    pub fn due_msat(&self, register_mwh: u64) -> u64 {
        (register_mwh as u128 * self.price_msat_per_wh as u128 / 1000) as u64
    }
}

/// All the bitcoin there will ever be, in millisatoshis.
pub const MAX_MSAT: u64 = 21_000_000 * 100_000_000 * 1000;

/// What the buyer (the meter) is willing to pay, whatever the provider signs: a tariff
/// outside it is refused before anything is paid, and streaming stops before a payment
/// would pass a limit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuyerPolicy {
    /// The highest price accepted, msat per Wh.
    pub max_price_msat_per_wh: u64,
    /// The most one session may cost, msat (the session ends there).
    pub max_session_msat: u64,
    /// The most all sessions together may cost in any 24 hours, msat.
    pub max_day_msat: u64,
    /// The most a prepaid meter pays ahead of its energy (its cover), msat.
    pub max_cover_msat: u64,
}

impl Default for BuyerPolicy {
    /// A household's meter: up to 1 sat/Wh (1,000 sat/kWh), 10,000 sat a session, 50,000
    /// sat a day, 100 sat ahead.
    fn default() -> Self {
        BuyerPolicy { max_price_msat_per_wh: 1_000, max_session_msat: 10_000_000, max_day_msat: 50_000_000, max_cover_msat: 100_000 }
    }
}

/// Why the buyer's policy refuses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("the tariff's price {price} msat/Wh is above this meter's limit of {max} msat/Wh")]
    Price { price: u64, max: u64 },
    #[error("paying {amount} msat would bring this session to {total} msat, above the limit of {max} msat")]
    Session { amount: u64, total: u64, max: u64 },
    #[error("paying {amount} msat would bring the last 24 hours to {total} msat, above the limit of {max} msat a day")]
    Day { amount: u64, total: u64, max: u64 },
}

impl BuyerPolicy {
    /// Whether a session may be opened under `t`.
    pub fn admit(&self, t: &Tariff) -> Result<(), PolicyError> {
        if t.price_msat_per_wh > self.max_price_msat_per_wh {
            return Err(PolicyError::Price { price: t.price_msat_per_wh, max: self.max_price_msat_per_wh });
        }
        Ok(())
    }

    /// Whether `amount` may be paid in a session that has paid `session_paid` under `t`,
    /// when `day_paid` was paid in the last 24 hours.
    pub fn allows(&self, t: &Tariff, amount: u64, session_paid: u64, day_paid: u64) -> Result<(), PolicyError> {
        let max = self.max_session_msat.min(t.session_limit_msat);
        let total = session_paid.saturating_add(amount);
        if total > max {
            return Err(PolicyError::Session { amount, total, max });
        }
        let total = day_paid.saturating_add(amount);
        if total > self.max_day_msat {
            return Err(PolicyError::Day { amount, total, max: self.max_day_msat });
        }
        Ok(())
    }
}

/// A tariff with the provider's node signature (zbase32, Lightning `signmessage`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedTariff {
    pub tariff: Tariff,
    pub signature: String,
}

impl SignedTariff {
    /// The tariff's id: hex SHA-256 of its canonical bytes.
    pub fn id(&self) -> String {
        bitmote_device::hex_encode(&bitmote_device::sha256(&self.tariff.canonical()))
    }

    /// Check the signature with `verify(message, signature, provider)` (the node's
    /// `verify_signature`), the provider and the numbers.
    pub fn check(&self, expected_provider: &str, now_secs: u64, verify: impl Fn(&[u8], &str) -> bool) -> Result<(), TariffError> {
        if self.tariff.provider != expected_provider {
            return Err(TariffError::WrongProvider { got: self.tariff.provider.clone(), expected: expected_provider.into() });
        }
        if !verify(&self.tariff.canonical(), &self.signature) {
            return Err(TariffError::BadSignature(self.tariff.provider.clone()));
        }
        self.tariff.check(now_secs)
    }
}

#[cfg(test)]
pub(crate) fn test_tariff(mode: Mode) -> Tariff {
    Tariff {
        provider: "02aa".into(),
        price_msat_per_wh: 250,
        tick_ms: 2000,
        mode,
        grace_ms: 1000,
        max_power_w: 3600,
        session_limit_msat: 10_000_000,
        valid_until: u64::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_rounds_down_and_keeps_remainder_in_register() {
        let t = test_tariff(Mode::Postpaid);
        // 3 mWh at 250 msat/Wh = 0.75 msat: nothing due yet, but the register keeps it.
        assert_eq!(t.due_msat(3), 0);
        assert_eq!(t.due_msat(4), 1);
        // Summing per-tick rounded costs would lose money; cumulative rounding never does.
        let per_tick: u64 = (0..1000).map(|_| t.due_msat(3)).sum();
        assert_eq!(per_tick, 0);
        assert_eq!(t.due_msat(3000), 750);
    }

    #[test]
    fn cap() {
        let t = test_tariff(Mode::Prepaid);
        // 3600 W for 3 s = 3 Wh = 3000 mWh; at 250 msat/Wh = 750 msat.
        assert_eq!(t.cap_mwh(3000), 3000);
        assert_eq!(t.due_msat(t.cap_mwh(3000)), 750);
    }

    #[test]
    fn signed_tariff_checks() {
        let st = SignedTariff { tariff: test_tariff(Mode::Postpaid), signature: "sig".into() };
        let ok = |m: &[u8], s: &str| s == "sig" && m == st.tariff.canonical().as_slice();
        assert_eq!(st.check("02aa", 0, ok), Ok(()));
        assert!(matches!(st.check("02bb", 0, ok), Err(TariffError::WrongProvider { .. })));
        assert!(matches!(st.check("02aa", 0, |_: &[u8], _: &str| false), Err(TariffError::BadSignature(_))));
        let mut bad = st.clone();
        bad.tariff.valid_until = 5;
        assert_eq!(bad.check("02aa", 6, |_: &[u8], _: &str| true), Err(TariffError::Expired(5)));
        bad.tariff.valid_until = u64::MAX;
        bad.tariff.tick_ms = 1;
        assert!(matches!(bad.check("02aa", 6, |_: &[u8], _: &str| true), Err(TariffError::Invalid(_))));
        // Every field is bounded (a huge grace period used to overflow `Instant + Duration`).
        for f in [
            |t: &mut Tariff| t.grace_ms = u64::MAX,
            |t: &mut Tariff| t.price_msat_per_wh = u64::MAX,
            |t: &mut Tariff| t.max_power_w = u64::MAX,
            |t: &mut Tariff| t.session_limit_msat = u64::MAX,
        ] {
            let mut t = test_tariff(Mode::Prepaid);
            f(&mut t);
            assert!(matches!(t.check(0), Err(TariffError::Invalid(_))), "{t:?}");
        }
        assert_eq!(st.id().len(), 64);
    }

    #[test]
    fn the_buyers_policy_bounds_price_session_and_day() {
        let p = BuyerPolicy { max_price_msat_per_wh: 300, max_session_msat: 1000, max_day_msat: 1500, max_cover_msat: 50 };
        let mut t = test_tariff(Mode::Prepaid);
        assert_eq!(p.admit(&t), Ok(()));
        t.price_msat_per_wh = 301;
        assert_eq!(p.admit(&t), Err(PolicyError::Price { price: 301, max: 300 }));
        let t = test_tariff(Mode::Prepaid);
        assert_eq!(p.allows(&t, 100, 900, 0), Ok(()));
        assert!(matches!(p.allows(&t, 101, 900, 0), Err(PolicyError::Session { .. })));
        assert!(matches!(p.allows(&t, 100, 0, 1401), Err(PolicyError::Day { .. })));
        // The tariff's own session limit, if lower, counts too.
        let small = Tariff { session_limit_msat: 500, ..t.clone() };
        assert!(matches!(p.allows(&small, 100, 450, 0), Err(PolicyError::Session { max: 500, .. })));
        assert!(matches!(p.allows(&t, u64::MAX, u64::MAX, 0), Err(PolicyError::Session { .. })));
    }
}
