//! bitmote-notary: the tamper-evident record of what sensors measured.
//!
//! Data path, top to bottom:
//! * [`store`]: the one SQLite file all of them live in, its pragmas and its versioned
//!   schema (migrations);
//! * [`registry`]: which device keys may submit readings (enrol, revoke);
//! * [`ingest`]: verify a signed reading or batch, reject replays, append to the log
//!   with group commit, acknowledge only once durable;
//! * [`log`]: the append-only RFC 9162 Merkle log in SQLite, with inclusion and
//!   consistency proofs in O(log n) reads;
//! * [`checkpoint`]: signed checkpoints in the C2SP `tlog-checkpoint` signed-note format;
//! * [`anchor`]: commit checkpoints to Bitcoin in an OP_RETURN, follow confirmations
//!   through reorgs, bump fees;
//! * [`proof`]: the self-contained proof bundle of one reading, down to a block header;
//! * [`ots`]: the same proof as an OpenTimestamps `.ots` file;
//! * [`verify`]: check a bundle or `.ots` against block headers, explaining any failure.
//!
//! Conventions shared by all modules:
//! * a log leaf is the 32-byte SHA-256 digest of a reading's canonical encoding, so the
//!   leaf hash is `SHA-256(0x00 || SHA-256(encoding))`, reachable from the reading file by
//!   OpenTimestamps operations;
//! * an anchor's OP_RETURN payload is `"BMT" || 0x01 || tree_size (u64 BE) || root (32 bytes)`.

pub mod anchor;
pub mod checkpoint;
pub mod ingest;
pub mod log;
pub mod ots;
pub mod proof;
pub mod registry;
pub mod store;
pub mod verify;

/// Tag and version of an anchor's OP_RETURN payload.
pub const ANCHOR_TAG: &[u8; 4] = b"BMT\x01";
/// Length of an anchor payload: tag, tree size, root.
pub const ANCHOR_PAYLOAD_LEN: usize = 4 + 8 + 32;
