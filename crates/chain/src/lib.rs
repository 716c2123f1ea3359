//! bitmote-chain: everything bitmote needs from a Bitcoin node.
//!
//! * [`provision`]: find or build a `bitcoind` (from the Bitcoin Core source shipped
//!   in the `libbitcoinkernel-sys` crate), cached under `~/.cache/bitmote`.
//! * [`regtest`]: start, stop and attach to a real regtest node on loopback.
//! * [`rpc`]: a typed JSON-RPC client that works the same against regtest,
//!   signet, testnet and mainnet nodes.
//! * [`stream`]: a reorg-aware, resumable stream of block connect/disconnect
//!   events — what the notary (anchor confirmations) and the actuators (triggers)
//!   consume.
//! * [`wallet`]: the gateway's BDK descriptor wallet, fed by the block stream.

pub mod error;
pub mod provision;
pub mod regtest;
pub mod rpc;
pub mod stream;
pub mod wallet;

pub use bitcoin;
pub use error::{ChainError, Rejection, Result, WalletError};
pub use rpc::{BlockId, ChainClient, HeaderState, NodeInfo, RpcAuth, RpcConfig};
pub use stream::{BlockEvent, BlockSource, BlockStream, Cursor, CursorStore, FileCursorStore, Start, StreamConfig};

/// Unix time in milliseconds (0 if the clock is before 1970). One clock for every crate.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Unix time in seconds.
pub fn now_secs() -> u64 {
    now_ms() / 1000
}
