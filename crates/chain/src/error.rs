//! Errors of the chain layer: every failure names what went wrong and where.

use std::path::PathBuf;

/// Everything that can go wrong talking to, provisioning or following a Bitcoin node.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// Nothing answered at the RPC address (wrong URL, node not running, wrong port).
    #[error("no Bitcoin node answers at {url}: {reason} (is bitcoind running and is the RPC port right?)")]
    Unreachable { url: String, reason: String },
    /// The node answered HTTP 401.
    #[error("the Bitcoin node at {url} rejected the RPC credentials (HTTP 401): check the cookie file or rpcuser/rpcpassword")]
    Unauthorized { url: String },
    /// The node is on another network than the one configured.
    #[error("the Bitcoin node at {url} is on {actual}, but bitmote is configured for {expected}")]
    WrongNetwork { url: String, expected: String, actual: String },
    /// The node is still starting (RPC code -28) and did not finish within the allowed time.
    #[error("the Bitcoin node at {url} is still starting: {message}")]
    Warmup { url: String, message: String },
    /// The node returned a JSON-RPC error.
    #[error("bitcoind RPC `{method}` failed with code {code}: {message}")]
    Rpc { method: String, code: i32, message: String },
    /// The transport failed in a way that is neither of the above.
    #[error("RPC transport error talking to {url}: {message}")]
    Transport { url: String, message: String },
    /// The node answered something we could not understand.
    #[error("unexpected answer to `{method}`: {message}")]
    Protocol { method: String, message: String },
    /// Cookie file missing or unreadable.
    #[error("cannot read the RPC cookie file {path}: {reason}")]
    Cookie { path: PathBuf, reason: String },
    /// Configuration that cannot work.
    #[error("invalid chain configuration: {0}")]
    Config(String),
    /// An operation that only makes sense on regtest was asked of another network.
    #[error("`{0}` is only allowed on regtest")]
    RegtestOnly(&'static str),
    /// A persisted cursor points at a block the node does not know, deeper than the
    /// history the stream keeps (a node that lost a few blocks is followed like a reorg).
    #[error(
        "the stream cursor {hash} (height {height}) is unknown to this node and older than the recent blocks bitmote remembers: \
         the node's data was replaced, or it lost more blocks than a crash can. To follow the node's chain as it is now, stop \
         bitmote and reset the cursor (see \"The node lost blocks or was replaced\" in docs/operations.md)"
    )]
    CursorUnknown { height: u32, hash: String },
    /// A reorganisation deeper than the configured limit.
    #[error("chain reorganisation deeper than the configured limit of {limit} blocks (cursor at height {height})")]
    ReorgTooDeep { limit: u32, height: u32 },
    /// bitcoind provisioning failed.
    #[error("cannot provide bitcoind: {0}")]
    Provision(String),
    /// The node process failed to start or stop.
    #[error("bitcoind process: {0}")]
    Process(String),
    /// The gateway wallet failed (load, build, sign, persist).
    #[error("wallet: {0}")]
    Wallet(#[from] WalletError),
    /// Local I/O error (data dirs, cursor files, logs).
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// Why the gateway wallet ([`crate::wallet::GatewayWallet`]) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WalletError {
    /// Building a transaction needs more than the wallet can spend (BDK's
    /// `InsufficientFunds`): fund the wallet.
    #[error("{context}: insufficient funds: {available} available of {needed} needed")]
    InsufficientFunds { context: &'static str, needed: bitcoin::Amount, available: bitcoin::Amount },
    /// The seed file does not hold a 32-byte hex seed.
    #[error("{} does not hold a 32-byte hex seed", path.display())]
    BadSeed { path: PathBuf },
    /// The wallet's keys did not sign every input of a transaction it built.
    #[error("the wallet could not sign every input")]
    Unsigned,
    /// Anything else BDK, its SQLite store or the key derivation reported, with what the
    /// wallet was doing.
    #[error("{context}: {source}")]
    Bdk {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl WalletError {
    /// True when the wallet cannot pay (more coins would help).
    pub fn is_insufficient_funds(&self) -> bool {
        matches!(self, WalletError::InsufficientFunds { .. })
    }
}

impl ChainError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ChainError::Io { context: context.into(), source }
    }

    /// True for errors that are worth retrying after a pause: the node is down, starting
    /// or restarting (bitcoind deletes its cookie file when it stops and writes a new one
    /// when it starts, so a missing cookie or a 401 in between is the same condition).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ChainError::Unreachable { .. }
                | ChainError::Warmup { .. }
                | ChainError::Transport { .. }
                | ChainError::Cookie { .. }
                | ChainError::Unauthorized { .. }
        )
    }
}

/// Why the node refused a transaction (`sendrawtransaction`), by its RPC error code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// -25 (`RPC_VERIFY_ERROR`): an input is missing or already spent
    /// (`bad-txns-inputs-missingorspent`): a parent is gone from the chain and the mempool,
    /// or a conflicting spend confirmed. Sending it again cannot help.
    MissingInputs,
    /// -26 (`RPC_VERIFY_REJECTED`): refused by consensus or policy (a conflict in the
    /// mempool, non-final, premature coinbase spend, fee too low).
    Rejected,
    /// -27 (`RPC_VERIFY_ALREADY_IN_CHAIN`): it is already in the chain.
    AlreadyInChain,
}

impl ChainError {
    /// The node's reason for refusing a broadcast, when this is such a refusal.
    pub fn rejection(&self) -> Option<Rejection> {
        match self {
            ChainError::Rpc { method, code, .. } if method == "sendrawtransaction" => match code {
                -25 => Some(Rejection::MissingInputs),
                -26 => Some(Rejection::Rejected),
                -27 => Some(Rejection::AlreadyInChain),
                _ => None,
            },
            _ => None,
        }
    }
}

pub type Result<T, E = ChainError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn rpc(method: &str, code: i32) -> ChainError {
        ChainError::Rpc { method: method.into(), code, message: "whatever the node says".into() }
    }

    #[test]
    fn a_broadcast_refusal_is_told_by_its_code_not_its_message() {
        assert_eq!(rpc("sendrawtransaction", -25).rejection(), Some(Rejection::MissingInputs));
        assert_eq!(rpc("sendrawtransaction", -26).rejection(), Some(Rejection::Rejected));
        assert_eq!(rpc("sendrawtransaction", -27).rejection(), Some(Rejection::AlreadyInChain));
        assert_eq!(rpc("sendrawtransaction", -5).rejection(), None);
        assert_eq!(rpc("getblock", -25).rejection(), None, "only a broadcast is refused");
        assert_eq!(ChainError::Config("x".into()).rejection(), None);
    }
}
