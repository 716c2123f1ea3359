//! The canonical, versioned binary encoding of one sensor reading, and its ids.
//!
//! ```text
//! v1:  0x01                version
//!      device   [32]       DeviceId
//!      seq      u64 BE     per-device sequence number, strictly increasing
//!      time     u64 BE     unix milliseconds, device clock
//!      sensor   u16 BE     sensor type code (see [`sensor`])
//!      unit     u16 BE     unit code (see [`unit`])
//!      tag      u8         value kind, then its body:
//!        0x01 scaled integer: mantissa i64 BE, decimal exponent i8  (2153, -2 = 21.53)
//!        0x02 float: IEEE 754 f64 bits BE (NaN rejected)
//!        0x03 opaque bytes: length u16 BE (<= 1024), bytes
//! ```
//! Every byte string has at most one meaning and every value exactly one encoding;
//! decoding rejects anything else (truncation, trailing bytes, unknown tags or versions,
//! a payload over 1024 bytes, NaN). All fields are fixed-width, so for every accepted
//! byte string `encode(decode(b)) == b`, and `decode(encode(r)) == r` for every valid
//! reading (see [`Reading::validate`]).
//!
//! Values are compared and encoded exactly: a scaled integer keeps its precision
//! (`2150e-2` and `215e-1` are different readings: 21.50 vs 21.5), and floats
//! compare by their bits (`-0.0` is not `0.0`), so equal readings have equal ids.
//!
//! Ids ([`Reading::id`], [`DeviceId`]) are BIP340-style tagged hashes
//! `SHA-256(SHA-256(tag) || SHA-256(tag) || data)`:
//! - device id: tag `bitmote/device/v1` over the public key encoding
//!   (`0x01 || x-only[32]` or `0x02 || SEC1-compressed[33]`);
//! - reading id: tag `bitmote/reading/v1` over the encoding; it is the message a
//!   single-reading signature signs.
//!
//! The log leaf of a reading (what the gateway's log and a batch tree hash with
//! `leaf_hash`) is `SHA-256(encoding)` ([`Reading::leaf`]), so a stored reading file
//! hashes directly to its leaf data.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::str::FromStr;

use crate::{hex_decode, hex_encode, sha256, tagged_hash};

/// Largest opaque payload.
pub const MAX_PAYLOAD: usize = 1024;
/// Largest encoded reading.
pub const MAX_ENCODED: usize = 1 + 32 + 8 + 8 + 2 + 2 + 1 + 2 + MAX_PAYLOAD;
const VERSION: u8 = 0x01;

/// Well-known sensor type codes (applications may use others from 0x8000 up).
///
/// | code | sensor      | usual unit        |
/// |------|-------------|-------------------|
/// | 0    | generic     | none (0)          |
/// | 1    | temperature | °C (1)            |
/// | 2    | humidity    | % relative (2)    |
/// | 3    | pressure    | Pa (3)            |
/// | 4    | power       | W (4)             |
/// | 5    | energy      | Wh (5)            |
/// | 6    | voltage     | V (6)             |
/// | 7    | current     | A (7)             |
/// | 8    | meter tick  | Wh (5)            |
pub mod sensor {
    /// Anything else (an opaque or application-defined measurement).
    pub const GENERIC: u16 = 0;
    pub const TEMPERATURE: u16 = 1;
    /// Relative humidity.
    pub const HUMIDITY: u16 = 2;
    pub const PRESSURE: u16 = 3;
    pub const POWER: u16 = 4;
    pub const ENERGY: u16 = 5;
    pub const VOLTAGE: u16 = 6;
    pub const CURRENT: u16 = 7;
    /// An energy meter's paid tick (opaque payload, see `bitmote-pay`'s tick record).
    pub const METER_TICK: u16 = 8;
    /// First code free for applications.
    pub const APPLICATION: u16 = 0x8000;
}

/// Well-known unit codes (applications may use others from 0x8000 up).
pub mod unit {
    /// Dimensionless, or implied by the sensor code.
    pub const NONE: u16 = 0;
    /// Degree Celsius.
    pub const CELSIUS: u16 = 1;
    pub const PERCENT: u16 = 2;
    pub const PASCAL: u16 = 3;
    pub const WATT: u16 = 4;
    pub const WATT_HOUR: u16 = 5;
    pub const VOLT: u16 = 6;
    pub const AMPERE: u16 = 7;
    /// First code free for applications.
    pub const APPLICATION: u16 = 0x8000;
}

/// Identity of a device: the tagged hash of its public key's canonical encoding.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId(pub [u8; 32]);

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex_encode(&self.0))
    }
}

impl DeviceId {
    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({self})")
    }
}

impl FromStr for DeviceId {
    type Err = DecodeError;
    fn from_str(s: &str) -> Result<Self, DecodeError> {
        let b = hex_decode(s).ok_or(DecodeError::BadHex)?;
        Ok(DeviceId(b.try_into().map_err(|_| DecodeError::BadHex)?))
    }
}

/// A measured value.
///
/// Equality is exact and follows the encoding: floats compare by their bits.
#[derive(Clone, Debug)]
pub enum Value {
    /// `mantissa × 10^exponent`, exact.
    Scaled { mantissa: i64, exponent: i8 },
    /// A float (never NaN).
    Float(f64),
    /// Application-defined bytes (at most [`MAX_PAYLOAD`]).
    Bytes(Vec<u8>),
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Value::Scaled { mantissa: a, exponent: x }, Value::Scaled { mantissa: b, exponent: y }) => a == b && x == y,
            (Value::Float(a), Value::Float(b)) => a.to_bits() == b.to_bits(),
            (Value::Bytes(a), Value::Bytes(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Value {}

/// One reading of one sensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reading {
    pub device: DeviceId,
    pub seq: u64,
    pub timestamp_ms: u64,
    pub sensor: u16,
    pub unit: u16,
    pub value: Value,
}

/// Why bytes are not a valid reading (or other device-side encoding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    Truncated,
    TrailingBytes,
    UnknownVersion(u8),
    UnknownTag(u8),
    PayloadTooLarge(usize),
    NotANumber,
    BadHex,
    BadKey,
    BadSignature,
    TooMany(usize),
    /// A batch of no readings (the format allows 1 to `MAX_BATCH`).
    EmptyBatch,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated => write!(f, "truncated encoding"),
            DecodeError::TrailingBytes => write!(f, "trailing bytes after the encoding"),
            DecodeError::UnknownVersion(v) => write!(f, "unknown encoding version {v:#04x}"),
            DecodeError::UnknownTag(t) => write!(f, "unknown tag {t:#04x}"),
            DecodeError::PayloadTooLarge(n) => write!(f, "payload of {n} bytes is over the limit of {MAX_PAYLOAD}"),
            DecodeError::NotANumber => write!(f, "NaN is not a reading"),
            DecodeError::BadHex => write!(f, "invalid hex"),
            DecodeError::BadKey => write!(f, "invalid public key"),
            DecodeError::BadSignature => write!(f, "malformed signature"),
            DecodeError::TooMany(n) => write!(f, "{n} items is over the limit"),
            DecodeError::EmptyBatch => write!(f, "a batch of no readings"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for DecodeError {}

/// A cursor over bytes that never panics.
pub(crate) struct Reader<'a>(pub(crate) &'a [u8]);

impl<'a> Reader<'a> {
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().map_err(|_| DecodeError::Truncated)?))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().map_err(|_| DecodeError::Truncated)?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().map_err(|_| DecodeError::Truncated)?))
    }
    pub(crate) fn arr32(&mut self) -> Result<[u8; 32], DecodeError> {
        self.take(32)?.try_into().map_err(|_| DecodeError::Truncated)
    }
    pub(crate) fn end(&self) -> Result<(), DecodeError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes)
        }
    }
}

impl Reading {
    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64);
        v.push(VERSION);
        v.extend_from_slice(&self.device.0);
        v.extend_from_slice(&self.seq.to_be_bytes());
        v.extend_from_slice(&self.timestamp_ms.to_be_bytes());
        v.extend_from_slice(&self.sensor.to_be_bytes());
        v.extend_from_slice(&self.unit.to_be_bytes());
        match &self.value {
            Value::Scaled { mantissa, exponent } => {
                v.push(0x01);
                v.extend_from_slice(&mantissa.to_be_bytes());
                v.push(*exponent as u8);
            }
            Value::Float(x) => {
                v.push(0x02);
                v.extend_from_slice(&x.to_bits().to_be_bytes());
            }
            Value::Bytes(b) => {
                v.push(0x03);
                v.extend_from_slice(&(b.len().min(u16::MAX as usize) as u16).to_be_bytes());
                v.extend_from_slice(b);
            }
        }
        v
    }

    /// Check a reading can be encoded canonically (payload size, no NaN).
    pub fn validate(&self) -> Result<(), DecodeError> {
        match &self.value {
            Value::Float(x) if x.is_nan() => Err(DecodeError::NotANumber),
            Value::Bytes(b) if b.len() > MAX_PAYLOAD => Err(DecodeError::PayloadTooLarge(b.len())),
            _ => Ok(()),
        }
    }

    /// Parse a canonical encoding; anything else is an error.
    pub fn decode(bytes: &[u8]) -> Result<Reading, DecodeError> {
        let mut r = Reader(bytes);
        let reading = Self::read(&mut r)?;
        r.end()?;
        Ok(reading)
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Reading, DecodeError> {
        let v = r.u8()?;
        if v != VERSION {
            return Err(DecodeError::UnknownVersion(v));
        }
        let device = DeviceId(r.arr32()?);
        let seq = r.u64()?;
        let timestamp_ms = r.u64()?;
        let sensor = r.u16()?;
        let unit = r.u16()?;
        let value = match r.u8()? {
            0x01 => {
                let mantissa = i64::from_be_bytes(r.take(8)?.try_into().map_err(|_| DecodeError::Truncated)?);
                let exponent = r.u8()? as i8;
                Value::Scaled { mantissa, exponent }
            }
            0x02 => {
                let x = f64::from_bits(r.u64()?);
                if x.is_nan() {
                    return Err(DecodeError::NotANumber);
                }
                Value::Float(x)
            }
            0x03 => {
                let n = r.u16()? as usize;
                if n > MAX_PAYLOAD {
                    return Err(DecodeError::PayloadTooLarge(n));
                }
                Value::Bytes(r.take(n)?.to_vec())
            }
            t => return Err(DecodeError::UnknownTag(t)),
        };
        Ok(Reading { device, seq, timestamp_ms, sensor, unit, value })
    }

    /// The reading id: tagged hash `bitmote/reading/v1` of the encoding. Also the
    /// 32-byte message a single-reading signature signs.
    pub fn id(&self) -> [u8; 32] {
        tagged_hash(b"bitmote/reading/v1", &[&self.encode()])
    }

    /// The log leaf: SHA-256 of the encoding (so a reading file hashes to it directly).
    pub fn digest(&self) -> [u8; 32] {
        sha256(&self.encode())
    }

    /// The leaf data that goes into the gateway's log and into a batch tree: the
    /// 32-byte [`digest`](Self::digest) `SHA-256(encoding)`.
    pub fn leaf(&self) -> [u8; 32] {
        self.digest()
    }

    /// The RFC 9162 leaf hash of this reading: `SHA-256(0x00 || SHA-256(encoding))`.
    pub fn leaf_hash(&self) -> crate::merkle::Hash {
        crate::merkle::leaf_hash(&self.leaf())
    }

    /// Human-readable value, e.g. `21.53`.
    pub fn value_string(&self) -> String {
        use alloc::format;
        match &self.value {
            Value::Scaled { mantissa, exponent } if *exponent >= 0 => {
                let mut s = format!("{mantissa}");
                for _ in 0..*exponent {
                    s.push('0');
                }
                s
            }
            Value::Scaled { mantissa, exponent } => {
                let digits = format!("{}", mantissa.unsigned_abs());
                let e = (-(*exponent as i32)) as usize;
                let sign = if *mantissa < 0 { "-" } else { "" };
                if digits.len() > e {
                    format!("{sign}{}.{}", &digits[..digits.len() - e], &digits[digits.len() - e..])
                } else {
                    format!("{sign}0.{}{}", "0".repeat(e - digits.len()), digits)
                }
            }
            Value::Float(x) => format!("{x}"),
            Value::Bytes(b) => hex_encode(b),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use alloc::vec;

    pub(crate) fn sample() -> Reading {
        Reading {
            device: DeviceId([0xab; 32]),
            seq: 7,
            timestamp_ms: 1_764_000_000_000,
            sensor: sensor::TEMPERATURE,
            unit: unit::CELSIUS,
            value: Value::Scaled { mantissa: 2153, exponent: -2 },
        }
    }

    #[test]
    fn encoding_is_exactly_the_documented_layout() {
        let mut want = vec![0x01];
        want.extend_from_slice(&[0xab; 32]);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 7]);
        want.extend_from_slice(&1_764_000_000_000u64.to_be_bytes());
        want.extend_from_slice(&[0, 1, 0, 1, 0x01]);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x08, 0x69, 0xfe]);
        assert_eq!(sample().encode(), want);
        assert_eq!(want.len(), 63);
        assert_eq!(sample().value_string(), "21.53");
    }

    #[test]
    fn roundtrips_and_rejects_non_canonical_bytes() {
        let values = [
            Value::Scaled { mantissa: -5, exponent: -3 },
            Value::Scaled { mantissa: i64::MIN, exponent: 127 },
            Value::Float(-0.0),
            Value::Float(f64::INFINITY),
            Value::Bytes(vec![]),
            Value::Bytes(vec![9; MAX_PAYLOAD]),
        ];
        for value in values {
            let r = Reading { value, ..sample() };
            let e = r.encode();
            assert_eq!(Reading::decode(&e).unwrap(), r);
            // Every strict prefix is truncated, any extra byte is trailing.
            for n in 0..e.len() {
                assert!(Reading::decode(&e[..n]).is_err());
            }
            let mut longer = e.clone();
            longer.push(0);
            assert_eq!(Reading::decode(&longer), Err(DecodeError::TrailingBytes));
        }
        let mut e = sample().encode();
        e[0] = 2;
        assert_eq!(Reading::decode(&e), Err(DecodeError::UnknownVersion(2)));
        let mut e = sample().encode();
        e[53] = 9;
        assert_eq!(Reading::decode(&e), Err(DecodeError::UnknownTag(9)));
        let nan = Reading { value: Value::Float(f64::NAN), ..sample() };
        assert_eq!(Reading::decode(&nan.encode()), Err(DecodeError::NotANumber));
        assert_eq!(nan.validate(), Err(DecodeError::NotANumber));
        let big = Reading { value: Value::Bytes(vec![0; MAX_PAYLOAD + 1]), ..sample() };
        assert_eq!(Reading::decode(&big.encode()), Err(DecodeError::PayloadTooLarge(MAX_PAYLOAD + 1)));
    }

    #[test]
    fn random_bytes_never_panic_and_accepted_bytes_are_canonical() {
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let base = sample().encode();
        for i in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut b = base.clone();
            // Flip a few bytes, sometimes truncate or extend.
            for k in 0..(x % 4) {
                let pos = ((x >> (8 * k)) as usize) % b.len();
                b[pos] ^= (x >> 32) as u8 | 1;
            }
            if i % 3 == 0 {
                b.truncate((x as usize >> 3) % (b.len() + 1));
            }
            if let Ok(r) = Reading::decode(&b) {
                assert_eq!(r.encode(), b, "accepted bytes re-encode identically");
            }
        }
    }

    #[test]
    fn ids_differ_from_digests_and_from_each_other() {
        let a = sample();
        let b = Reading { seq: 8, ..sample() };
        assert_ne!(a.id(), b.id());
        assert_ne!(a.id(), a.digest());
        assert_eq!(a.digest(), sha256(&a.encode()));
        let id: DeviceId = alloc::format!("{}", a.device).parse().unwrap();
        assert_eq!(id, a.device);
    }

    /// Deterministic xorshift64 PRNG for the fuzz-like tests.
    pub(crate) struct XorShift(pub(crate) u64);
    impl XorShift {
        pub(crate) fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
        pub(crate) fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    fn random_reading(rng: &mut XorShift) -> Reading {
        let mut device = [0u8; 32];
        device.copy_from_slice(&rng.bytes(32));
        let value = match rng.next() % 3 {
            0 => Value::Scaled { mantissa: rng.next() as i64, exponent: rng.next() as i8 },
            1 => {
                let x = f64::from_bits(rng.next());
                Value::Float(if x.is_nan() { 1.5 } else { x })
            }
            _ => {
                let n = (rng.next() % (MAX_PAYLOAD as u64 + 1)) as usize;
                Value::Bytes(rng.bytes(n))
            }
        };
        Reading {
            device: DeviceId(device),
            seq: rng.next(),
            timestamp_ms: rng.next(),
            sensor: rng.next() as u16,
            unit: rng.next() as u16,
            value,
        }
    }

    #[test]
    fn random_valid_readings_roundtrip() {
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        for _ in 0..2_000 {
            let r = random_reading(&mut rng);
            r.validate().unwrap();
            let e = r.encode();
            let d = Reading::decode(&e).unwrap();
            assert_eq!(d, r);
            assert_eq!(d.encode(), e);
            assert_eq!(d.id(), r.id());
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut rng = XorShift(0xdead_beef_cafe_f00d);
        let mut accepted = 0;
        for i in 0..50_000 {
            let len = (rng.next() % 120) as usize;
            let mut b = rng.bytes(len);
            // Make a fair share of inputs get past the version and tag checks.
            if i % 2 == 0 && !b.is_empty() {
                b[0] = VERSION;
            }
            if i % 4 == 0 && b.len() > 53 {
                b[53] = 1 + (rng.next() % 3) as u8;
            }
            if let Ok(r) = Reading::decode(&b) {
                accepted += 1;
                assert_eq!(r.encode(), b);
            }
        }
        assert!(accepted > 0);
    }

    #[test]
    fn float_equality_is_bitwise_and_scaled_values_keep_precision() {
        let pos = Reading { value: Value::Float(0.0), ..sample() };
        let neg = Reading { value: Value::Float(-0.0), ..sample() };
        assert_ne!(pos, neg);
        assert_ne!(pos.id(), neg.id());
        let a = Reading { value: Value::Scaled { mantissa: 2150, exponent: -2 }, ..sample() };
        let b = Reading { value: Value::Scaled { mantissa: 215, exponent: -1 }, ..sample() };
        assert_ne!(a, b);
        assert_eq!(a.value_string(), "21.50");
        assert_eq!(b.value_string(), "21.5");
        let c = Reading { value: Value::Scaled { mantissa: -5, exponent: -3 }, ..sample() };
        assert_eq!(c.value_string(), "-0.005");
        let d = Reading { value: Value::Scaled { mantissa: 12, exponent: 3 }, ..sample() };
        assert_eq!(d.value_string(), "12000");
        let e = Reading { value: Value::Scaled { mantissa: i64::MIN, exponent: i8::MIN }, ..sample() };
        assert!(e.value_string().starts_with("-0.000"));
        assert_eq!(sample().leaf(), sample().digest());
        assert_eq!(sample().leaf_hash(), crate::merkle::leaf_hash(&sample().digest()));
    }
}
