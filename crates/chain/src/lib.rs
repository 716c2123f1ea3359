//! bitmote-chain: everything bitmote needs from a Bitcoin node.
//!
//! * [`rpc`]: a typed JSON-RPC client that works the same against regtest,
//!   signet, testnet and mainnet nodes.
//! * [`stream`]: a reorg-aware, resumable stream of block connect/disconnect
//!   events — what the notary (anchor confirmations) and the actuators (triggers)
//!   consume.
//! * [`wallet`]: the gateway's BDK descriptor wallet, fed by the block stream.
//! * [`Faucet`]: where coins come from on a test chain, supplied from outside.
//!
//! Nothing here builds, runs or mines a node: that is `bitmote-regtest`, which the CLI,
//! the tests and the simulation use, and which hands libraries a [`Faucet`].

pub mod error;
pub mod rpc;
pub mod stream;
pub mod wallet;

pub use bitcoin;
pub use error::{ChainError, Rejection, Result, WalletError};
pub use rpc::{BlockId, ChainClient, HeaderState, NodeInfo, RpcAuth, RpcConfig};
pub use stream::{BlockEvent, BlockSource, BlockStream, Cursor, CursorStore, FileCursorStore, Start, StreamConfig};

/// Unix time in milliseconds (0 if the clock is before 1970). One clock for every crate.
/// Coins and blocks on demand on a test chain: what a library asks for when a wallet it
/// runs is empty or it waits for confirmations. The caller supplies one (on regtest,
/// `bitmote_regtest::RegtestFaucet`, which mines); libraries never mine themselves, and on
/// a real network there is none: the operator funds the wallet.
pub trait Faucet: Send + Sync + std::fmt::Debug {
    /// Send spendable coins to `address` (on regtest: `coinbases` coinbases, matured).
    fn fund(&self, address: &bitcoin::Address, coinbases: u32) -> Result<()>;
    /// Make the chain move on by a block, so that a wait for confirmations ends.
    fn advance(&self) -> Result<()>;
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Unix time in seconds.
pub fn now_secs() -> u64 {
    now_ms() / 1000
}
