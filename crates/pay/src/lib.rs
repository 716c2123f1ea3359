//! Machine-to-machine streaming micropayments over Lightning: the prepaid energy
//! meter and the energy provider, each a machine with an embedded ldk-node.
//!
//! - [`tariff`]: the provider's price list, signed with its node key.
//! - [`tick`]: what each keysend carries (a TLV with the meter's signed register) and
//!   the per-session [`tick::Account`] arithmetic both sides share.
//! - [`load`]: the simulated meter hardware (a household load profile and a
//!   cumulative Wh register).
//! - [`store`]: durable sessions and ticks.
//! - [`provider`] and [`meter`]: the two roles, each serving a small JSON API.
//! - [`node`]: building the Lightning node on the bitcoind RPC chain source.
//!
//! The session protocol, in one paragraph: the meter fetches the signed tariff over
//! HTTP, checks the signature against the provider's node id, and opens a session
//! naming the tariff id and its own device key. Every tick it measures the register
//! and pays by keysend exactly what the register makes due (postpaid: after the
//! tick; prepaid: in advance, keeping one tick paid ahead at the rate of the tick just
//! measured). The provider credits each payment only if the signature, tick number,
//! register and amounts check out, and cuts the supply when a payment is late past the
//! grace period or short. Both keep the same [`tick::Account`].
//!
//! Closing is one agreed state: the meter first settles the tick it has in flight
//! (its fate is in ldk-node's payment store), and, prepaid, delivers the tick paid
//! ahead (closing ticks with no tick ahead, until the register makes the whole payment
//! due: no refund is ever sent, so nothing depends on the provider's outbound
//! liquidity); then it sends its final account, signed with its device key. The
//! provider waits until it has credited every tick declared (a payment the meter saw
//! succeed may reach the provider's event loop a moment later), ends the session at
//! that account and signs its statement; the meter compares it with its own, to the
//! millisatoshi.

pub mod ldk_store;
pub mod load;
mod machine;
pub mod meter;
pub mod node;
pub mod provider;
pub mod store;
pub mod tariff;
pub mod tick;

pub use ldk_node;

use std::path::PathBuf;

/// Errors of the payment machines.
#[derive(Debug, thiserror::Error)]
pub enum PayError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("Lightning node: {0}")]
    Node(String),
    #[error("session store: {0}")]
    Store(String),
    #[error("timed out waiting for {0}")]
    Timeout(String),
    #[error("provider at {url}: {why}")]
    Provider { url: String, why: String },
    #[error(transparent)]
    Tariff(#[from] tariff::TariffError),
    #[error("session: {0}")]
    Session(String),
    #[error("not authorized: {0}")]
    Unauthorized(String),
    #[error("busy: {0}")]
    Busy(String),
    #[error("spending policy: {0}")]
    Policy(#[from] tariff::PolicyError),
}

/// Hex (de)serialization of fixed-size byte arrays (its own file so the fuzz targets can
/// compile the tick record without the Lightning node).
pub(crate) mod hexs;

/// What the meter signs, with its device key, to close session `id` with its final
/// `account`: only the session's meter can end it, and the provider settles to the
/// account it declares (`POST /v1/sessions/{id}/close` `{"account": {...}, "signature": hex}`).
pub fn close_message(id: &tick::SessionId, account: &tick::Account) -> [u8; 32] {
    let n = |x: u64| x.to_be_bytes();
    bitmote_device::tagged_hash(b"bitmote/pay/close", &[id, &n(account.ticks), &n(account.register_mwh), &n(account.paid_msat)])
}

/// What the meter signs, with its device key, to open a session (`POST /v1/sessions`):
/// only the holder of a meter key opens sessions for it, and a captured request cannot be
/// replayed (the provider accepts each meter's `timestamp_ms` only once, increasing, and
/// within [`provider::OPEN_CLOCK_SKEW`] of its clock).
pub fn open_message(tariff_id: &str, meter_key: &str, meter_node: &str, timestamp_ms: u64) -> [u8; 32] {
    let len = |x: &str| (x.len() as u64).to_be_bytes();
    bitmote_device::tagged_hash(
        b"bitmote/pay/open",
        &[
            &len(tariff_id),
            tariff_id.as_bytes(),
            &len(meter_key),
            meter_key.as_bytes(),
            &len(meter_node),
            meter_node.as_bytes(),
            &timestamp_ms.to_be_bytes(),
        ],
    )
}

/// Parse a session id (32 hex digits).
pub fn parse_session(s: &str) -> Option<tick::SessionId> {
    bitmote_device::hex_decode(s)?.try_into().ok()
}
pub use machine::{node_json, session_json};
