//! `bitmote-regtest`: everything about a private regtest chain that product code must not
//! do itself — used by the CLI (`bitmote node`, `bitmote up` on regtest), the tests, the
//! simulation, the drill and the benchmarks.
//!
//! * [`provision`]: find or build a `bitcoind` (from the Bitcoin Core source shipped in the
//!   `libbitcoinkernel-sys` crate), cached under `~/.cache/bitmote`;
//! * [`RegtestNode`]: start, stop, kill and attach to a real regtest node on loopback;
//! * anyone-can-spend coinbases ([`op_true_address`], [`spend_op_true`], [`coinbase_at`]);
//! * [`RegtestFaucet`]: the [`bitmote_chain::Faucet`] the CLI hands to libraries (the
//!   gateway's wallets, the payment machines), which never mine blocks themselves.

mod node;
pub mod provision;

pub use node::*;

use bitmote_chain::bitcoin::{Address, Network};
use bitmote_chain::{ChainClient, ChainError, Faucet, Result};

/// Coins and blocks on a regtest chain, by mining: `fund` mines coinbases to the address
/// and 100 more blocks (to an anyone-can-spend address) so they are spendable; `advance`
/// mines one block.
pub struct RegtestFaucet {
    client: ChainClient,
}

impl std::fmt::Debug for RegtestFaucet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegtestFaucet").field("rpc", &self.client.config().url).finish()
    }
}

impl RegtestFaucet {
    /// A faucet on the node behind `client` (its own connection); refused off regtest.
    pub fn new(client: &ChainClient) -> Result<RegtestFaucet> {
        if client.network() != Network::Regtest {
            return Err(ChainError::RegtestOnly("a mining faucet"));
        }
        Ok(RegtestFaucet { client: client.fresh()? })
    }

    /// The same, shared, as libraries take it (`GatewayConfig::faucet`, `pay::node`).
    pub fn shared(client: &ChainClient) -> Result<std::sync::Arc<dyn Faucet>> {
        Ok(std::sync::Arc::new(RegtestFaucet::new(client)?))
    }
}

impl RegtestNode {
    /// A faucet on this node (its own RPC connection).
    pub fn faucet(&self) -> Result<RegtestFaucet> {
        RegtestFaucet::new(self.client())
    }
}

impl Faucet for RegtestFaucet {
    fn fund(&self, address: &Address, coinbases: u32) -> Result<()> {
        self.client.mine(coinbases.max(1), address)?;
        self.client.mine(100, &op_true_address())?;
        Ok(())
    }

    fn advance(&self) -> Result<()> {
        self.client.mine(1, &op_true_address()).map(drop)
    }
}
