//! Hex (de)serialization of fixed-size byte arrays (`#[serde(with = "crate::hexs")]`).

use serde::{Deserialize, Deserializer, Serializer};
pub fn serialize<S: Serializer, const N: usize>(v: &[u8; N], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&bitmote_device::hex_encode(v))
}
pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(d: D) -> Result<[u8; N], D::Error> {
    let s = String::deserialize(d)?;
    bitmote_device::hex_decode(&s)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| serde::de::Error::custom(format!("expected {} hex digits", 2 * N)))
}
