//! `bitmote-sim`: what `bitmote up` runs beside the gateway on regtest, and the device
//! programs behind `bitmote device sensor|actuator`.
//!
//! * [`sensor`] — a sensor's firmware: sign readings, send them, wait for each receipt;
//! * [`actuator`] — a lock's or relay's firmware: act once per command, acknowledge,
//!   optionally check payments with its own light client;
//! * [`keys`] — a device's key, MQTT password and sequence files, and enrolment;
//! * [`fleet`] — the fleet as real child processes, supervised, and its [`fleet::Driver`] of
//!   chain events (rental orders paid on-chain, leases ending at a height, signed relay
//!   commands), plus the hub channel the meter pays its provider through.
//!
//! Everything speaks the typed protocol of `bitmote-proto` with the gateway, exactly as a
//! third-party device would. These are programs the binary runs, not libraries anyone
//! matches errors of: they report with `anyhow`, like the binary.

pub mod actuator;
pub mod fleet;
pub mod keys;
pub mod sensor;

use anyhow::{Context, Result};
use bitmote_chain::bitcoin::secp256k1::PublicKey;
use bitmote_pay::ldk_node::lightning::ln::msgs::SocketAddress;

/// The part of a machine's `/v1/status` (provider or meter) that says how to reach its
/// Lightning node.
#[derive(serde::Deserialize)]
struct MachineStatus {
    node: NodeAddressing,
}

#[derive(serde::Deserialize)]
struct NodeAddressing {
    node_id: String,
    #[serde(default)]
    listening: Vec<String>,
    /// Where peers must connect (`--ln-announce`); absent from older versions' status.
    #[serde(default)]
    announced: Vec<String>,
}

/// A machine's Lightning node id and the address peers must connect to, from its
/// `/v1/status`: the first announced address (`node.announced`: behind a port forward or a
/// proxy it is not the one listened on), else the first listening one.
pub fn machine_node(status: serde_json::Value) -> Result<(PublicKey, SocketAddress)> {
    let s: MachineStatus = serde_json::from_value(status).context("a status without its node's id")?;
    let addr = s.node.announced.first().or(s.node.listening.first()).context("a node without a Lightning address")?;
    Ok((bitmote_pay::node::parse_node_id(&s.node.node_id)?, lightning_address(addr)?))
}

/// A Lightning peer address (`host:port`).
pub fn lightning_address(addr: &str) -> Result<SocketAddress> {
    addr.parse().map_err(|_| anyhow::anyhow!("bad Lightning address {addr}"))
}
