//! Ingest: accept signed readings and batches, append them to the log with group
//! commit, and acknowledge each one only once it is durable.
//!
//! Checks that need no database (shape, sizes, clock, enrolment as cached,
//! signature) and the per-reading hashing run on the submitter's thread, in
//! parallel. One writer thread then takes everything queued, checks enrolment and
//! sequence numbers again, in queue order (a replay is refused even if its twin is in
//! the same group), and writes readings, batches, log nodes and sequence numbers in
//! ONE SQLite transaction: one disk flush for the whole group. Only after the commit
//! does each submitter get its [`Receipt`]s; a storage error fails the group and
//! acknowledges nothing, and a refused submission never affects another. A device
//! that resends a reading it got no receipt for gets the same receipt again.
//!
//! One `Ingestor` per database: it caches the registry (keys, last sequence
//! numbers) and is the only writer of readings and log.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use bitmote_device::batch::MAX_BATCH;
use bitmote_device::reading::{MAX_ENCODED, MAX_PAYLOAD};
use bitmote_device::{
    BatchError, BatchMembership, DecodeError, DeviceId, Evidence, PublicKey, Reading, SignError, Signature, SignedBatch, SignedReading,
    Value,
};
use rusqlite::{params, Connection, OptionalExtension};

use crate::log::MerkleLog;
use crate::registry::{self, now_ms, Device, RegistryError};

/// Why a submission was refused (or could not be stored).
///
/// `Clone`: one storage failure reaches every submitter of a group commit, so the
/// sources it carries are shared ([`StorageError`]), not turned into text.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum IngestError {
    #[error("malformed submission: {0}")]
    Malformed(Malformed),
    #[error("submission too large: {0}")]
    TooLarge(TooLarge),
    #[error("device {0} is not enrolled")]
    UnknownDevice(DeviceId),
    #[error("device {0} is revoked")]
    Revoked(DeviceId),
    #[error("bad signature: {0}")]
    BadSignature(SignError),
    #[error("replayed or out-of-order sequence number {got}: the last accepted for this device is {last}")]
    Replay { last: u64, got: u64 },
    #[error("reading timestamp {timestamp_ms} ms is not plausible (gateway clock {now_ms} ms): {why}")]
    ClockSkew { timestamp_ms: u64, now_ms: u64, why: &'static str },
    #[error("storage failed, nothing was acknowledged: {0}")]
    Storage(StorageError),
    #[error("the gateway is shutting down")]
    ShuttingDown,
    /// The disk is (nearly) full: nothing of this submission was acknowledged.
    #[error("{0}")]
    DiskFull(String),
}

impl IngestError {
    /// Short machine-readable reason (metrics, MQTT error messages).
    pub fn code(&self) -> &'static str {
        match self {
            IngestError::Malformed(_) => "malformed",
            IngestError::TooLarge(_) => "too_large",
            IngestError::UnknownDevice(_) => "unknown_device",
            IngestError::Revoked(_) => "revoked",
            IngestError::BadSignature(_) => "bad_signature",
            IngestError::Replay { .. } => "replay",
            IngestError::ClockSkew { .. } => "clock_skew",
            IngestError::Storage(_) => "storage",
            IngestError::ShuttingDown => "shutting_down",
            IngestError::DiskFull(_) => "disk_full",
        }
    }
}

/// How a submission is malformed.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum Malformed {
    /// The device encoding (a reading, a signature, a batch) is invalid.
    #[error("{0}")]
    Decode(DecodeError),
    /// The batch is not one device's consecutive readings, or its tree is wrong.
    #[error("{0}")]
    Batch(BatchError),
    #[error("expected a signed reading ('R') or batch ('B')")]
    UnknownKind,
    #[error("empty batch")]
    EmptyBatch,
    #[error("sequence number {0} is over 2^63 - 1")]
    SeqOverflow(u64),
}

/// What in a submission is over its limit.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum TooLarge {
    /// Over a limit of the device encoding (payload, item count).
    #[error("{0}")]
    Decode(DecodeError),
    #[error("{got} bytes (at most {max})")]
    Bytes { got: usize, max: usize },
    #[error("{got} readings in one batch (at most {max})")]
    Batch { got: usize, max: usize },
    /// Over the wire format's batch limit (found while verifying).
    #[error("{0} readings in one batch")]
    BatchLen(usize),
    #[error("payload of {got} bytes (at most {max})")]
    Payload { got: usize, max: usize },
}

/// Why the store failed: nothing of the submission was acknowledged. Cloneable (one
/// failure answers every submitter of a group): the sources are shared, and two values
/// are equal when they are clones of one failure (or the same corruption).
/// [`source`](std::error::Error::source) is the failure itself (a `rusqlite::Error`,
/// a [`crate::log::LogError`], …), not its `Arc`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum StorageError {
    Sqlite(Arc<rusqlite::Error>),
    Store(Arc<crate::store::StoreError>),
    Log(Arc<crate::log::LogError>),
    Registry(Arc<RegistryError>),
    /// A stored reading or batch does not decode or does not add up.
    Corrupt(Corrupt),
    /// The log's size changed under the writer (another writer on the file).
    LogMoved {
        start: u64,
        now: u64,
    },
    /// The writer thread could not be started.
    Thread(Arc<std::io::Error>),
}

impl std::fmt::Display for StorageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StorageError::Sqlite(e) => write!(f, "{e}"),
            StorageError::Store(e) => write!(f, "{e}"),
            StorageError::Log(e) => write!(f, "{e}"),
            StorageError::Registry(e) => write!(f, "{e}"),
            StorageError::Corrupt(e) => write!(f, "{e}"),
            StorageError::LogMoved { start, now } => write!(f, "log size moved from {start} to {now} during the group"),
            StorageError::Thread(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StorageError::Sqlite(e) => Some(&**e),
            StorageError::Store(e) => Some(&**e),
            StorageError::Log(e) => Some(&**e),
            StorageError::Registry(e) => Some(&**e),
            StorageError::Corrupt(e) => e.source(),
            StorageError::LogMoved { .. } => None,
            StorageError::Thread(e) => Some(&**e),
        }
    }
}

impl From<Corrupt> for StorageError {
    fn from(e: Corrupt) -> Self {
        StorageError::Corrupt(e)
    }
}

impl StorageError {
    /// The database or disk is full (`SQLITE_FULL`, the quota of
    /// [`IngestConfig::max_db_pages`] included): nothing was written.
    pub fn is_full(&self) -> bool {
        let sqlite = match self {
            StorageError::Sqlite(e) => Some(&**e),
            StorageError::Store(e) => match &**e {
                crate::store::StoreError::Db(e) => Some(e),
                _ => None,
            },
            StorageError::Log(e) => match &**e {
                crate::log::LogError::Db(e) => Some(e),
                _ => None,
            },
            StorageError::Registry(e) => match &**e {
                RegistryError::Db(e) => Some(e),
                _ => None,
            },
            _ => None,
        };
        sqlite.and_then(rusqlite::Error::sqlite_error_code) == Some(rusqlite::ErrorCode::DiskFull)
    }
}

impl PartialEq for StorageError {
    fn eq(&self, other: &Self) -> bool {
        use StorageError::*;
        match (self, other) {
            (Sqlite(a), Sqlite(b)) => Arc::ptr_eq(a, b),
            (Store(a), Store(b)) => Arc::ptr_eq(a, b),
            (Log(a), Log(b)) => Arc::ptr_eq(a, b),
            (Registry(a), Registry(b)) => Arc::ptr_eq(a, b),
            (Thread(a), Thread(b)) => Arc::ptr_eq(a, b),
            (Corrupt(a), Corrupt(b)) => a == b,
            (LogMoved { start: a, now: b }, LogMoved { start: c, now: d }) => (a, b) == (c, d),
            _ => false,
        }
    }
}

impl Eq for StorageError {}

impl From<rusqlite::Error> for StorageError {
    fn from(e: rusqlite::Error) -> Self {
        StorageError::Sqlite(Arc::new(e))
    }
}

impl From<crate::store::StoreError> for StorageError {
    fn from(e: crate::store::StoreError) -> Self {
        StorageError::Store(Arc::new(e))
    }
}

impl From<crate::log::LogError> for StorageError {
    fn from(e: crate::log::LogError) -> Self {
        StorageError::Log(Arc::new(e))
    }
}

impl From<RegistryError> for StorageError {
    fn from(e: RegistryError) -> Self {
        StorageError::Registry(Arc::new(e))
    }
}

/// Storage failures, for `?` in the functions that read and write the store.
macro_rules! storage_from {
    ($($t:ty),*) => {$(
        impl From<$t> for IngestError {
            fn from(e: $t) -> Self {
                IngestError::Storage(e.into())
            }
        }
    )*};
}
storage_from!(StorageError, rusqlite::Error, crate::store::StoreError, crate::log::LogError, RegistryError, Corrupt);

/// A stored reading that does not decode or does not add up (leaf index `index`).
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum Corrupt {
    #[error("corrupt reading {index}: {source}")]
    Encoding { index: u64, source: DecodeError },
    #[error("corrupt reading {index}: batch index {batch_index} of a batch of {count}")]
    BatchIndex { index: u64, batch_index: i64, count: i64 },
    #[error("corrupt reading {index}: batch {batch} has {found} of its {count} readings")]
    BatchIncomplete { index: u64, batch: i64, found: usize, count: i64 },
    #[error("corrupt reading {index}: {source}")]
    BatchTree { index: u64, source: bitmote_device::merkle::MerkleError },
    #[error("corrupt reading {index}: neither a signature nor a batch")]
    NoEvidence { index: u64 },
    #[error("corrupt id of reading {index}")]
    Id { index: u64 },
}

fn decode_error(e: DecodeError) -> IngestError {
    match e {
        DecodeError::PayloadTooLarge(_) | DecodeError::TooMany(_) => IngestError::TooLarge(TooLarge::Decode(e)),
        _ => IngestError::Malformed(Malformed::Decode(e)),
    }
}

/// Acknowledgement of one durable reading: the protocol's receipt (`reading_id`,
/// `leaf_index`, `tree_size`), sent to the device as it is.
pub use bitmote_proto::Receipt;

/// Plausibility and size limits.
#[derive(Clone, Debug)]
pub struct IngestConfig {
    /// Readings may be at most this far ahead of the gateway clock (default 10 min).
    pub max_future_ms: u64,
    /// Readings before this are refused (default 2020-01-01).
    pub min_timestamp_ms: u64,
    /// Most readings written in one transaction.
    pub max_group: usize,
    /// Storage quota in database pages (4 KiB); `None` = until the disk is full. Either way a
    /// full store fails the group with a storage error and acknowledges nothing.
    pub max_db_pages: Option<u64>,
    /// Most readings in one batch (at most the wire format's `MAX_BATCH`, 4096).
    pub max_batch: usize,
    /// Largest opaque payload of a reading, in bytes (at most `MAX_PAYLOAD`, 1024).
    pub max_payload: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            max_future_ms: 10 * 60 * 1000,
            min_timestamp_ms: 1_577_836_800_000,
            max_group: 16_384,
            max_db_pages: None,
            max_batch: MAX_BATCH,
            max_payload: MAX_PAYLOAD,
        }
    }
}

/// Largest wire submission: a full batch of the largest readings.
pub const MAX_SUBMISSION_BYTES: usize = 3 + MAX_BATCH * (2 + MAX_ENCODED) + bitmote_device::sign::SIGNATURE_LEN;

/// A submission as it arrives.
#[derive(Clone, Debug, PartialEq)]
pub enum Submission {
    Reading(SignedReading),
    Batch(SignedBatch),
}

impl Submission {
    /// Parse the binary wire format (`'R' …` or `'B' …`, see `bitmote_device::batch`).
    pub fn decode(b: &[u8]) -> Result<Self, IngestError> {
        if b.len() > MAX_SUBMISSION_BYTES {
            return Err(IngestError::TooLarge(TooLarge::Bytes { got: b.len(), max: MAX_SUBMISSION_BYTES }));
        }
        match b.first() {
            Some(b'R') => SignedReading::decode(b).map(Submission::Reading),
            Some(b'B') => SignedBatch::decode(b).map(Submission::Batch),
            _ => return Err(IngestError::Malformed(Malformed::UnknownKind)),
        }
        .map_err(decode_error)
    }

    /// The readings, in order.
    pub fn readings(&self) -> &[Reading] {
        match self {
            Submission::Reading(r) => std::slice::from_ref(&r.reading),
            Submission::Batch(b) => &b.readings,
        }
    }

    pub fn len(&self) -> usize {
        self.readings().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A reading in JSON (the HTTP API's `POST /v1/readings` with `application/json`, and
/// every reading the API returns).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReadingJson {
    pub device: String,
    pub seq: u64,
    pub timestamp_ms: u64,
    pub sensor: u16,
    pub unit: u16,
    /// `{"scaled": [mantissa, exponent]}`, `{"float": x}` or `{"bytes": "hex"}`.
    pub value: ValueJson,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueJson {
    Scaled(i64, i8),
    Float(f64),
    Bytes(String),
}

impl ReadingJson {
    pub fn from_reading(r: &Reading) -> Self {
        ReadingJson {
            device: r.device.to_string(),
            seq: r.seq,
            timestamp_ms: r.timestamp_ms,
            sensor: r.sensor,
            unit: r.unit,
            value: match &r.value {
                Value::Scaled { mantissa, exponent } => ValueJson::Scaled(*mantissa, *exponent),
                Value::Float(x) => ValueJson::Float(*x),
                Value::Bytes(b) => ValueJson::Bytes(hex::encode(b)),
            },
        }
    }

    pub fn to_reading(&self) -> Result<Reading, ReadingJsonError> {
        let device: DeviceId = self.device.parse().map_err(ReadingJsonError::Device)?;
        let value = match &self.value {
            ValueJson::Scaled(m, e) => Value::Scaled { mantissa: *m, exponent: *e },
            ValueJson::Float(x) => Value::Float(*x),
            ValueJson::Bytes(h) => Value::Bytes(hex::decode(h).map_err(ReadingJsonError::Bytes)?),
        };
        let r = Reading { device, seq: self.seq, timestamp_ms: self.timestamp_ms, sensor: self.sensor, unit: self.unit, value };
        r.validate().map_err(ReadingJsonError::Invalid)?;
        Ok(r)
    }
}

/// Why a [`ReadingJson`] is not a reading.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum ReadingJsonError {
    #[error("device: {0}")]
    Device(DecodeError),
    #[error("bytes: {0}")]
    Bytes(hex::FromHexError),
    #[error("{0}")]
    Invalid(DecodeError),
}

/// JSON submission: one reading or a batch, with the signature in hex.
#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
enum SubmissionJson {
    Reading { reading: ReadingJson, signature: String },
    Batch { batch: Vec<ReadingJson>, signature: String },
}

/// Why a JSON submission was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum JsonSubmissionError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0} readings in one batch")]
    TooMany(usize),
}

impl Submission {
    /// Parse a JSON submission (`{"reading": …, "signature": hex}` or `{"batch": […],
    /// "signature": hex}`). The signature is checked later, as for the binary format.
    pub fn from_json(body: &[u8]) -> Result<Self, JsonSubmissionError> {
        let bad = JsonSubmissionError::Invalid;
        let j: SubmissionJson = serde_json::from_slice(body).map_err(|e| bad(format!("invalid JSON submission: {e}")))?;
        let sig = |s: &str| Signature::from_hex(s).map_err(|e| bad(format!("signature: {e}")));
        Ok(match j {
            SubmissionJson::Reading { reading, signature } => Submission::Reading(SignedReading {
                reading: reading.to_reading().map_err(|e| bad(e.to_string()))?,
                signature: sig(&signature)?,
            }),
            SubmissionJson::Batch { batch, signature } => {
                if batch.len() > MAX_BATCH {
                    return Err(JsonSubmissionError::TooMany(batch.len()));
                }
                let readings = batch.iter().map(|r| r.to_reading().map_err(|e| bad(e.to_string()))).collect::<Result<Vec<_>, _>>()?;
                Submission::Batch(SignedBatch { readings, signature: sig(&signature)? })
            }
        })
    }
}

type Reply = Box<dyn FnOnce(Result<Vec<Receipt>, IngestError>) + Send>;

/// What the writer needs of one reading, computed on the submitter's thread.
struct Prepared {
    id: [u8; 32],
    leaf: [u8; 32],
    encoded: Vec<u8>,
}

struct Job {
    device: DeviceId,
    sub: Submission,
    prepared: Vec<Prepared>,
    reply: Reply,
}

impl Job {
    fn seqs(&self) -> (u64, u64) {
        let r = self.sub.readings();
        (r[0].seq, r[r.len() - 1].seq)
    }
}

/// Counters for metrics.
#[derive(Default)]
struct Stats {
    accepted: AtomicU64,
    groups: AtomicU64,
    reacknowledged: AtomicU64,
    rejected: Mutex<HashMap<&'static str, u64>>,
}

impl Stats {
    fn reject(&self, e: &IngestError) {
        *self.rejected.lock().unwrap_or_else(|p| p.into_inner()).entry(e.code()).or_default() += 1;
    }
}

/// A snapshot of the counters.
#[derive(Clone, Debug, serde::Serialize)]
pub struct IngestStats {
    /// Readings made durable.
    pub accepted: u64,
    /// Transactions committed.
    pub groups: u64,
    /// Mean readings per committed transaction.
    pub mean_group: f64,
    /// Readings acknowledged again (resent after a lost receipt).
    pub reacknowledged: u64,
    /// Refused submissions by [`IngestError::code`].
    pub rejected: HashMap<&'static str, u64>,
}

/// The answer to a submission, to wait for (see [`Ingestor::submit_nowait`]).
pub struct Pending {
    rx: mpsc::Receiver<Result<Vec<Receipt>, IngestError>>,
    done: Option<Result<Vec<Receipt>, IngestError>>,
}

impl Pending {
    /// Block until the readings are durable (or refused).
    pub fn wait(mut self) -> Result<Vec<Receipt>, IngestError> {
        match self.done.take() {
            Some(r) => r,
            None => self.rx.recv().unwrap_or(Err(IngestError::ShuttingDown)),
        }
    }

    /// The answer if there is one yet (never blocks).
    pub fn try_wait(&mut self) -> Option<&Result<Vec<Receipt>, IngestError>> {
        if self.done.is_none() {
            self.done = match self.rx.try_recv() {
                Ok(r) => Some(r),
                Err(mpsc::TryRecvError::Empty) => None,
                Err(mpsc::TryRecvError::Disconnected) => Some(Err(IngestError::ShuttingDown)),
            };
        }
        self.done.as_ref()
    }

    /// Wait at most `timeout` for the answer.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<&Result<Vec<Receipt>, IngestError>> {
        if self.done.is_none() {
            self.done = match self.rx.recv_timeout(timeout) {
                Ok(r) => Some(r),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => Some(Err(IngestError::ShuttingDown)),
            };
        }
        self.done.as_ref()
    }
}

/// The ingest pipeline of one notary database.
pub struct Ingestor {
    path: PathBuf,
    cfg: IngestConfig,
    queue: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    devices: Arc<RwLock<HashMap<DeviceId, Device>>>,
    admin: Mutex<Connection>,
    stats: Arc<Stats>,
    /// Asked before each submission: `Some(why)` refuses it (a full disk).
    gate: RwLock<Option<Gate>>,
}

/// See [`Ingestor::set_gate`].
pub type Gate = Arc<dyn Fn() -> Option<String> + Send + Sync>;

impl Ingestor {
    /// Open the database at `path` (creating it) and start the writer.
    pub fn start(path: &Path, cfg: IngestConfig) -> Result<Self, IngestError> {
        let admin = crate::store::open(path)?;
        let writer_conn = crate::store::open(path)?;
        if let Some(pages) = cfg.max_db_pages {
            writer_conn.pragma_update(None, "max_page_count", pages as i64)?;
        }
        let devices: HashMap<DeviceId, Device> = registry::list(&admin)?.into_iter().map(|d| (d.id, d)).collect();
        let devices = Arc::new(RwLock::new(devices));
        let stats = Arc::new(Stats::default());
        let (tx, rx) = mpsc::channel::<Job>();
        let writer = {
            let devices = devices.clone();
            let stats = stats.clone();
            let max_group = cfg.max_group.max(1);
            std::thread::Builder::new()
                .name("notary-writer".into())
                .spawn(move || writer_loop(writer_conn, rx, devices, stats, max_group))
                .map_err(|e| StorageError::Thread(Arc::new(e)))?
        };
        Ok(Ingestor {
            path: path.to_path_buf(),
            cfg,
            queue: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            devices,
            admin: Mutex::new(admin),
            stats,
            gate: RwLock::new(None),
        })
    }

    pub fn db_path(&self) -> &Path {
        &self.path
    }

    pub fn config(&self) -> &IngestConfig {
        &self.cfg
    }

    /// Refuse submissions while `gate` says why (`IngestError::DiskFull`): the gateway's
    /// disk guard, so nothing is acknowledged that the disk may not be able to keep.
    pub fn set_gate(&self, gate: Gate) {
        *self.gate.write().unwrap_or_else(|p| p.into_inner()) = Some(gate);
    }

    /// Every check that needs no database, and the hashing the writer will need.
    fn precheck(&self, sub: &Submission) -> Result<(DeviceId, Vec<Prepared>), IngestError> {
        if let Some(why) = self.gate.read().unwrap_or_else(|p| p.into_inner()).as_ref().and_then(|g| g()) {
            return Err(IngestError::DiskFull(why));
        }
        let readings = sub.readings();
        let first = readings.first().ok_or(IngestError::Malformed(Malformed::EmptyBatch))?;
        let max_batch = self.cfg.max_batch.min(MAX_BATCH);
        if readings.len() > max_batch {
            return Err(IngestError::TooLarge(TooLarge::Batch { got: readings.len(), max: max_batch }));
        }
        let device = first.device;
        let key: PublicKey = {
            let devs = self.devices.read().unwrap_or_else(|p| p.into_inner());
            let d = devs.get(&device).ok_or(IngestError::UnknownDevice(device))?;
            if d.is_revoked() {
                return Err(IngestError::Revoked(device));
            }
            d.pubkey
        };
        let now = now_ms();
        let max_payload = self.cfg.max_payload.min(MAX_PAYLOAD);
        for r in readings {
            r.validate().map_err(decode_error)?;
            if let Value::Bytes(b) = &r.value {
                if b.len() > max_payload {
                    return Err(IngestError::TooLarge(TooLarge::Payload { got: b.len(), max: max_payload }));
                }
            }
            if r.seq > i64::MAX as u64 {
                return Err(IngestError::Malformed(Malformed::SeqOverflow(r.seq)));
            }
            let why = if r.timestamp_ms > now.saturating_add(self.cfg.max_future_ms) {
                Some("too far in the future")
            } else if r.timestamp_ms < self.cfg.min_timestamp_ms {
                Some("before the earliest accepted time")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(IngestError::ClockSkew { timestamp_ms: r.timestamp_ms, now_ms: now, why });
            }
        }
        let checked = match sub {
            Submission::Reading(r) => r.verify(&key),
            Submission::Batch(b) => b.verify(&key),
        };
        checked.map_err(|e| match e {
            BatchError::Sign(s) => IngestError::BadSignature(s),
            BatchError::TooMany(n) => IngestError::TooLarge(TooLarge::BatchLen(n)),
            BatchError::Decode(d) => decode_error(d),
            other => IngestError::Malformed(Malformed::Batch(other)),
        })?;
        let prepared = readings
            .iter()
            .map(|r| {
                let encoded = r.encode();
                Prepared { id: r.id(), leaf: bitmote_device::sha256(&encoded), encoded }
            })
            .collect();
        Ok((device, prepared))
    }

    /// Validate on this thread, then queue; `reply` is called (on the writer thread, or
    /// here for an immediate refusal) once the readings are durable or refused. Never
    /// blocks on the disk: for async callers.
    pub fn submit_with(&self, sub: Submission, reply: impl FnOnce(Result<Vec<Receipt>, IngestError>) + Send + 'static) {
        let (device, prepared) = match self.precheck(&sub) {
            Ok(p) => p,
            Err(e) => {
                self.stats.reject(&e);
                return reply(Err(e));
            }
        };
        let stats = self.stats.clone();
        let reply: Reply = Box::new(move |res: Result<Vec<Receipt>, IngestError>| {
            if let Err(e) = &res {
                stats.reject(e);
            }
            reply(res)
        });
        let q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        match q.as_ref() {
            Some(tx) => {
                if let Err(mpsc::SendError(job)) = tx.send(Job { device, sub, prepared, reply }) {
                    (job.reply)(Err(IngestError::ShuttingDown));
                }
            }
            None => {
                drop(q);
                reply(Err(IngestError::ShuttingDown))
            }
        }
    }

    /// Submit; the returned handle waits for the answer.
    pub fn submit_nowait(&self, sub: Submission) -> Pending {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit_with(sub, move |r| {
            let _ = tx.send(r);
        });
        Pending { rx, done: None }
    }

    /// Submit and wait until durable.
    pub fn submit(&self, sub: Submission) -> Result<Vec<Receipt>, IngestError> {
        self.submit_nowait(sub).wait()
    }

    /// Submit one signed reading and wait until durable (one receipt).
    pub fn submit_reading(&self, r: SignedReading) -> Result<Vec<Receipt>, IngestError> {
        self.submit(Submission::Reading(r))
    }

    /// Submit a signed batch and wait until durable (one receipt per reading, in order).
    pub fn submit_batch(&self, b: SignedBatch) -> Result<Vec<Receipt>, IngestError> {
        self.submit(Submission::Batch(b))
    }

    /// Put a registry record in the cache without ever lowering its last sequence number
    /// (the writer may have advanced it since the record was read).
    fn cache(&self, mut d: Device) {
        let mut devs = self.devices.write().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = devs.get(&d.id) {
            d.last_seq = d.last_seq.max(old.last_seq);
        }
        devs.insert(d.id, d);
    }

    fn admin(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.admin.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enroll a device key (idempotent; a revoked key is refused).
    pub fn enroll(&self, key: &PublicKey, name: Option<&str>) -> Result<Device, RegistryError> {
        let d = registry::enroll(&self.admin(), key, name)?;
        self.cache(d.clone());
        Ok(self.device(&d.id).unwrap_or(d))
    }

    /// Revoke a device: submissions already queued may still be stored; later ones are refused.
    pub fn revoke(&self, id: &DeviceId, reason: &str) -> Result<Device, RegistryError> {
        let d = registry::revoke(&self.admin(), id, reason)?;
        self.cache(d.clone());
        Ok(self.device(&d.id).unwrap_or(d))
    }

    pub fn device(&self, id: &DeviceId) -> Option<Device> {
        self.devices.read().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
    }

    /// All devices, revoked ones included, in enrolment order.
    pub fn devices(&self) -> Vec<Device> {
        let mut v: Vec<Device> = self.devices.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        v.sort_by(|a, b| (a.enrolled_ms, &a.name).cmp(&(b.enrolled_ms, &b.name)));
        v
    }

    /// A stored reading by its id.
    pub fn reading(&self, id: &[u8; 32]) -> Result<Option<StoredReading>, IngestError> {
        reading_by_id(&self.admin(), id)
    }

    /// The stored reading at a leaf index.
    pub fn reading_at(&self, leaf_index: u64) -> Result<Option<StoredReading>, IngestError> {
        reading_at(&self.admin(), leaf_index)
    }

    /// Size and root of the log as committed.
    pub fn head(&self) -> Result<(u64, [u8; 32]), IngestError> {
        Ok(MerkleLog::new(&self.admin()).head()?)
    }

    pub fn stats(&self) -> IngestStats {
        let accepted = self.stats.accepted.load(Ordering::Relaxed);
        let groups = self.stats.groups.load(Ordering::Relaxed);
        IngestStats {
            accepted,
            groups,
            mean_group: if groups > 0 { accepted as f64 / groups as f64 } else { 0.0 },
            reacknowledged: self.stats.reacknowledged.load(Ordering::Relaxed),
            rejected: self.stats.rejected.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }

    /// Stop accepting, write everything queued (answering every submitter), stop the writer.
    pub fn shutdown(&self) {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(w) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = w.join();
        }
    }
}

impl Drop for Ingestor {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn writer_loop(
    mut conn: Connection,
    rx: mpsc::Receiver<Job>,
    devices: Arc<RwLock<HashMap<DeviceId, Device>>>,
    stats: Arc<Stats>,
    max_group: usize,
) {
    // Ends once the queue is closed (shutdown) and drained.
    while let Ok(first) = rx.recv() {
        let mut n = first.sub.len();
        let mut group = vec![first];
        while n < max_group {
            match rx.try_recv() {
                Ok(j) => {
                    n += j.sub.len();
                    group.push(j);
                }
                Err(_) => break,
            }
        }
        commit_group(&mut conn, group, &devices, &stats);
    }
}

/// Check a group against the registry in queue order, write the acceptable part in
/// one transaction, answer everyone.
fn commit_group(conn: &mut Connection, group: Vec<Job>, devices: &RwLock<HashMap<DeviceId, Device>>, stats: &Stats) {
    let mut last: HashMap<DeviceId, u64> = HashMap::new();
    let mut accepted: Vec<Job> = Vec::with_capacity(group.len());
    // First reading id → position in `accepted`, to spot a submission sent twice into one group.
    let mut firsts: HashMap<[u8; 32], usize> = HashMap::new();
    let mut twins: Vec<(usize, Reply)> = vec![];
    {
        let devs = devices.read().unwrap_or_else(|p| p.into_inner());
        for job in group {
            let verdict = match devs.get(&job.device) {
                None => Err(IngestError::UnknownDevice(job.device)),
                Some(d) if d.is_revoked() => Err(IngestError::Revoked(job.device)),
                Some(d) => {
                    let (first_seq, last_seq) = job.seqs();
                    match last.get(&job.device).copied().or(d.last_seq) {
                        Some(p) if first_seq <= p => {
                            // A device that did not get its acknowledgement sends again: if these
                            // exact readings are in this group or already in the log, acknowledge
                            // them (again); any other reading with a used number is a replay.
                            if let Some(&i) = firsts.get(&job.prepared[0].id).filter(|&&i| accepted[i].sub == job.sub) {
                                twins.push((i, job.reply));
                                continue;
                            }
                            match already_stored(conn, &job.prepared) {
                                Ok(Some(receipts)) => {
                                    stats.reacknowledged.fetch_add(receipts.len() as u64, Ordering::Relaxed);
                                    (job.reply)(Ok(receipts));
                                    continue;
                                }
                                Ok(None) => Err(IngestError::Replay { last: p, got: first_seq }),
                                Err(e) => Err(IngestError::Storage(e)),
                            }
                        }
                        _ => {
                            last.insert(job.device, last_seq);
                            Ok(())
                        }
                    }
                }
            };
            match verdict {
                Ok(()) => {
                    firsts.insert(job.prepared[0].id, accepted.len());
                    accepted.push(job);
                }
                Err(e) => (job.reply)(Err(e)),
            }
        }
    }
    if accepted.is_empty() {
        return;
    }
    match write_group(conn, &accepted, &last) {
        Ok(receipts) => {
            {
                let mut devs = devices.write().unwrap_or_else(|p| p.into_inner());
                for (dev, seq) in &last {
                    if let Some(d) = devs.get_mut(dev) {
                        d.last_seq = d.last_seq.max(Some(*seq));
                    }
                }
            }
            stats.groups.fetch_add(1, Ordering::Relaxed);
            for (i, reply) in twins {
                stats.reacknowledged.fetch_add(receipts[i].len() as u64, Ordering::Relaxed);
                reply(Ok(receipts[i].clone()));
            }
            for (job, r) in accepted.into_iter().zip(receipts) {
                stats.accepted.fetch_add(r.len() as u64, Ordering::Relaxed);
                (job.reply)(Ok(r));
            }
        }
        Err(e) => {
            tracing::error!("notary write failed, {} submissions not acknowledged: {e}", accepted.len() + twins.len());
            // (A disk that filled between two looks of the gateway's guard ends here too:
            // "storage failed, nothing was acknowledged: database or disk is full".)
            let e = IngestError::Storage(e);
            for (_, reply) in twins {
                reply(Err(e.clone()));
            }
            for job in accepted {
                (job.reply)(Err(e.clone()));
            }
        }
    }
}

/// Receipts of readings that are all already in the log, or `None`.
fn already_stored(conn: &Connection, prepared: &[Prepared]) -> Result<Option<Vec<Receipt>>, StorageError> {
    let size = MerkleLog::new(conn).size()?;
    let mut q = conn.prepare_cached("SELECT idx FROM readings WHERE id = ?1")?;
    let mut out = Vec::with_capacity(prepared.len());
    for p in prepared {
        let Some(idx) = q.query_row([&p.id[..]], |row| row.get::<_, i64>(0)).optional()? else { return Ok(None) };
        out.push(Receipt { reading_id: p.id, leaf_index: idx as u64, tree_size: size });
    }
    Ok(Some(out))
}

fn write_group(conn: &mut Connection, jobs: &[Job], last: &HashMap<DeviceId, u64>) -> Result<Vec<Vec<Receipt>>, StorageError> {
    // IMMEDIATE: the write lock is taken (waiting out the busy timeout) before the first read.
    // A deferred transaction that reads the log size and then writes fails at once with
    // SQLITE_BUSY when another connection (the anchoring loop recording a checkpoint)
    // committed in between, and the group would be refused as a storage error (a 503 seen
    // in the dashboard test under load).
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let start = MerkleLog::new(&tx).size()?;
    let received = now_ms() as i64;
    let mut next = start;
    let mut leaves = Vec::new();
    let mut out = Vec::with_capacity(jobs.len());
    {
        let mut ins = tx.prepare_cached(
            "INSERT INTO readings (idx, id, device, seq, ts_ms, encoded, signature, batch_id, batch_index, received_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?;
        let mut ins_batch =
            tx.prepare_cached("INSERT INTO batches (device, first_seq, count, first_idx, signature) VALUES (?1, ?2, ?3, ?4, ?5)")?;
        for job in jobs {
            let (sig, batch_id): (Option<Vec<u8>>, Option<i64>) = match &job.sub {
                Submission::Reading(r) => (Some(r.signature.encode().to_vec()), None),
                Submission::Batch(b) => {
                    ins_batch.execute(params![
                        &job.device.0[..],
                        b.readings[0].seq as i64,
                        b.readings.len() as i64,
                        next as i64,
                        &b.signature.encode()[..]
                    ])?;
                    (None, Some(tx.last_insert_rowid()))
                }
            };
            let mut receipts = Vec::with_capacity(job.prepared.len());
            for (i, (r, p)) in job.sub.readings().iter().zip(&job.prepared).enumerate() {
                ins.execute(params![
                    next as i64,
                    &p.id[..],
                    &r.device.0[..],
                    r.seq as i64,
                    r.timestamp_ms as i64,
                    &p.encoded,
                    sig,
                    batch_id,
                    batch_id.map(|_| i as i64),
                    received,
                ])?;
                leaves.push(p.leaf);
                receipts.push(Receipt { reading_id: p.id, leaf_index: next, tree_size: 0 });
                next += 1;
            }
            out.push(receipts);
        }
    }
    let first = MerkleLog::append_batch(&tx, &leaves)?;
    if first != start {
        return Err(StorageError::LogMoved { start, now: first });
    }
    for (dev, seq) in last {
        registry::set_last_seq(&tx, dev, *seq)?;
    }
    tx.commit()?;
    for r in out.iter_mut().flatten() {
        r.tree_size = next;
    }
    Ok(out)
}

/// A reading as stored, with what authenticates it.
#[derive(Clone, Debug)]
pub struct StoredReading {
    pub leaf_index: u64,
    pub reading: Reading,
    /// The canonical encoding as stored (its SHA-256 is the log leaf).
    pub encoded: Vec<u8>,
    /// The device's signature, or the batch signature with the reading's path in the
    /// batch tree (rebuilt from the batch's stored readings).
    pub evidence: Evidence,
    pub received_ms: u64,
}

impl StoredReading {
    /// The log leaf: SHA-256 of the encoding.
    pub fn leaf(&self) -> [u8; 32] {
        bitmote_device::sha256(&self.encoded)
    }
}

type ReadingRow = (i64, Vec<u8>, Option<Vec<u8>>, Option<i64>, Option<i64>, i64);

fn load(c: &Connection, where_: &str, key: &dyn rusqlite::ToSql) -> Result<Option<StoredReading>, IngestError> {
    let row: Option<ReadingRow> = c
        .prepare_cached(&format!("SELECT idx, encoded, signature, batch_id, batch_index, received_ms FROM readings WHERE {where_}"))?
        .query_row([key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)))
        .optional()?;
    let Some((idx, encoded, sig, batch_id, batch_index, received)) = row else { return Ok(None) };
    let index = idx as u64;
    let encoding = |source: DecodeError| Corrupt::Encoding { index, source };
    let reading = Reading::decode(&encoded).map_err(encoding)?;
    let evidence = match (sig, batch_id, batch_index) {
        (Some(s), None, None) => Evidence::Single(Signature::decode(&s).map_err(encoding)?),
        (None, Some(b), Some(i)) => {
            let (first_seq, count, first_idx, sig): (i64, i64, i64, Vec<u8>) = c
                .prepare_cached("SELECT first_seq, count, first_idx, signature FROM batches WHERE id = ?1")?
                .query_row([b], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
            if !(0..count).contains(&i) || count as usize > MAX_BATCH {
                return Err(Corrupt::BatchIndex { index, batch_index: i, count }.into());
            }
            // Rebuild the batch tree from its readings (stored contiguously) for the path.
            let mut q = c.prepare_cached("SELECT encoded FROM readings WHERE idx >= ?1 AND idx < ?2 ORDER BY idx")?;
            let leaves = q
                .query_map([first_idx, first_idx + count], |r| r.get::<_, Vec<u8>>(0))?
                .map(|e| Ok(bitmote_device::merkle::leaf_hash(&bitmote_device::sha256(&e?))))
                .collect::<Result<Vec<_>, rusqlite::Error>>()?;
            if leaves.len() as i64 != count {
                return Err(Corrupt::BatchIncomplete { index, batch: b, found: leaves.len(), count }.into());
            }
            let proof =
                bitmote_device::merkle::inclusion_proof(&leaves, i as u64).map_err(|source| Corrupt::BatchTree { index, source })?;
            Evidence::Batch(BatchMembership {
                first_seq: first_seq as u64,
                count: count as u32,
                index: i as u32,
                proof,
                signature: Signature::decode(&sig).map_err(encoding)?,
            })
        }
        _ => return Err(Corrupt::NoEvidence { index }.into()),
    };
    Ok(Some(StoredReading { leaf_index: idx as u64, reading, encoded, evidence, received_ms: received as u64 }))
}

/// A stored reading by its id.
pub fn reading_by_id(c: &Connection, id: &[u8; 32]) -> Result<Option<StoredReading>, IngestError> {
    load(c, "id = ?1", &id.to_vec())
}

/// A stored reading by its leaf index.
pub fn reading_at(c: &Connection, index: u64) -> Result<Option<StoredReading>, IngestError> {
    match i64::try_from(index) {
        Ok(i) => load(c, "idx = ?1", &i),
        Err(_) => Ok(None),
    }
}

/// The id of the reading at a leaf index (without loading its evidence).
pub fn reading_id_at(c: &Connection, index: u64) -> Result<Option<[u8; 32]>, IngestError> {
    let Ok(i) = i64::try_from(index) else { return Ok(None) };
    let id: Option<Vec<u8>> =
        c.prepare_cached("SELECT id FROM readings WHERE idx = ?1").and_then(|mut q| q.query_row([i], |r| r.get(0)).optional())?;
    id.map(|v| v.try_into().map_err(|_| Corrupt::Id { index }.into())).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitmote_device::batch::reading_leaf_hash;
    use bitmote_device::merkle::verify_inclusion;
    use bitmote_device::reading::{sensor, unit};
    use bitmote_device::SigningKey;

    fn reading(k: &SigningKey, seq: u64) -> Reading {
        Reading {
            device: k.public_key().device_id(),
            seq,
            timestamp_ms: now_ms(),
            sensor: sensor::TEMPERATURE,
            unit: unit::CELSIUS,
            value: Value::Scaled { mantissa: 2000 + seq as i64, exponent: -2 },
        }
    }

    fn signed(k: &SigningKey, seq: u64) -> SignedReading {
        SignedReading::sign(k, reading(k, seq)).unwrap()
    }

    fn one(k: &SigningKey, seq: u64) -> Submission {
        Submission::Reading(signed(k, seq))
    }

    fn key(i: u8) -> SigningKey {
        if i.is_multiple_of(2) { SigningKey::p256_from_secret(&[i; 32]) } else { SigningKey::schnorr_from_secret(&[i; 32]) }.unwrap()
    }

    #[test]
    fn concurrent_submissions_are_grouped_durable_and_provable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.sqlite");
        let ing = Arc::new(Ingestor::start(&path, IngestConfig::default()).unwrap());
        let keys: Vec<SigningKey> = (1..=8u8).map(key).collect();
        for k in &keys {
            ing.enroll(&k.public_key(), None).unwrap();
        }
        let threads: Vec<_> = keys
            .into_iter()
            .enumerate()
            .map(|(t, k)| {
                let ing = ing.clone();
                std::thread::spawn(move || {
                    let mut out = vec![];
                    let mut s = 1u64;
                    while s <= 125 {
                        // Three ways in: blocking, handle, and a handle kept while the next is sent.
                        match (t + s as usize) % 3 {
                            0 => out.extend(ing.submit_reading(signed(&k, s)).unwrap()),
                            1 => out.extend(ing.submit_nowait(one(&k, s)).wait().unwrap()),
                            _ if s < 125 => {
                                let a = ing.submit_nowait(one(&k, s));
                                let b = ing.submit_nowait(one(&k, s + 1));
                                out.extend(a.wait().unwrap());
                                out.extend(b.wait().unwrap());
                                s += 1;
                            }
                            _ => out.extend(ing.submit(one(&k, s)).unwrap()),
                        }
                        s += 1;
                    }
                    out
                })
            })
            .collect();
        let receipts: Vec<Receipt> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        assert_eq!(receipts.len(), 1000);
        let stats = ing.stats();
        eprintln!("{stats:?}");
        assert_eq!(stats.accepted, 1000);
        assert!(stats.groups < 1000, "group commit grouped: {} groups", stats.groups);
        assert!(stats.mean_group > 1.0);
        assert!(stats.rejected.is_empty(), "{:?}", stats.rejected);
        let mut indices: Vec<u64> = receipts.iter().map(|r| r.leaf_index).collect();
        indices.sort();
        assert_eq!(indices, (0..1000).collect::<Vec<_>>());
        assert_eq!(ing.head().unwrap().0, 1000);
        let c = registry::open_db(&path).unwrap();
        let log = MerkleLog::new(&c);
        assert_eq!(log.size().unwrap(), 1000);
        log.audit().unwrap();
        for r in &receipts {
            let stored = ing.reading(&r.reading_id).unwrap().unwrap();
            assert_eq!(stored.leaf_index, r.leaf_index);
            assert!(r.leaf_index < r.tree_size && r.tree_size <= 1000);
            let leaf = bitmote_device::merkle::leaf_hash(&stored.leaf());
            assert_eq!(leaf, reading_leaf_hash(&stored.reading));
            // Provable in the tree of its receipt and in the final tree.
            for size in [r.tree_size, 1000] {
                let p = log.inclusion_proof(r.leaf_index, size).unwrap();
                verify_inclusion(r.leaf_index, size, &leaf, &p, &log.root_at(size).unwrap()).unwrap();
            }
            let dev = ing.device(&stored.reading.device).unwrap();
            stored.evidence.verify(&dev.pubkey, &stored.reading).unwrap();
        }
        // Sequence numbers are durable too.
        for d in registry::list(&c).unwrap() {
            assert_eq!(d.last_seq, Some(125));
        }
    }

    #[test]
    fn a_full_store_acknowledges_nothing_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.sqlite");
        let cfg = IngestConfig { max_db_pages: Some(64), ..Default::default() };
        let ing = Ingestor::start(&path, cfg).unwrap();
        let k = SigningKey::schnorr_from_secret(&[7; 32]).unwrap();
        ing.enroll(&k.public_key(), None).unwrap();
        let mut acked = vec![];
        let mut full = None;
        for seq in 1..10_000 {
            match ing.submit(one(&k, seq)) {
                Ok(r) => acked.push(r[0]),
                Err(e) => {
                    full = Some((seq, e));
                    break;
                }
            }
        }
        let (seq, e) = full.expect("the quota fills up");
        assert!(matches!(e, IngestError::Storage(ref s) if s.is_full()), "{e}");
        assert!(e.to_string().contains("full"), "{e}");
        // Still full: the next one is refused too, not half-written.
        assert!(matches!(ing.submit(one(&k, seq)), Err(IngestError::Storage(_))));
        drop(ing);
        // Everything acknowledged is there, consistent, and the refused one is not.
        let c = registry::open_db(&path).unwrap();
        let log = MerkleLog::new(&c);
        assert_eq!(log.size().unwrap(), acked.len() as u64);
        log.audit().unwrap();
        let root = log.root_at(acked.len() as u64).unwrap();
        for r in &acked {
            let s = reading_by_id(&c, &r.reading_id).unwrap().unwrap();
            let p = log.inclusion_proof(r.leaf_index, acked.len() as u64).unwrap();
            verify_inclusion(r.leaf_index, acked.len() as u64, &reading_leaf_hash(&s.reading), &p, &root).unwrap();
        }
        // With room again (no quota), ingest continues where it stopped.
        let ing = Ingestor::start(&path, IngestConfig::default()).unwrap();
        assert_eq!(ing.submit(one(&k, seq)).unwrap()[0].leaf_index, acked.len() as u64);
    }

    /// While the gate says the disk is full, nothing is queued or stored; once it opens
    /// again the same reading is accepted.
    #[test]
    fn a_closed_gate_refuses_with_its_reason_and_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.sqlite");
        let ing = Ingestor::start(&path, IngestConfig::default()).unwrap();
        let k = SigningKey::schnorr_from_secret(&[8; 32]).unwrap();
        ing.enroll(&k.public_key(), None).unwrap();
        ing.submit(one(&k, 1)).unwrap();
        let full = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let f = full.clone();
        ing.set_gate(Arc::new(move || f.load(Ordering::SeqCst).then(|| "the gateway's disk is full".to_string())));
        let e = ing.submit(one(&k, 2)).unwrap_err();
        assert!(matches!(&e, IngestError::DiskFull(m) if m.contains("disk is full")), "{e}");
        assert_eq!(e.code(), "disk_full");
        assert_eq!(MerkleLog::new(&registry::open_db(&path).unwrap()).size().unwrap(), 1);
        full.store(false, Ordering::SeqCst);
        assert_eq!(ing.submit(one(&k, 2)).unwrap()[0].leaf_index, 1);
        assert_eq!(ing.stats().rejected.get("disk_full"), Some(&1));
    }

    #[test]
    fn refusals_are_clear_and_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = IngestConfig { max_batch: 10, max_payload: 16, ..Default::default() };
        let ing = Ingestor::start(&dir.path().join("n.sqlite"), cfg).unwrap();
        let k = SigningKey::schnorr_from_secret(&[9; 32]).unwrap();
        let stranger = SigningKey::schnorr_from_secret(&[8; 32]).unwrap();
        assert_eq!(ing.submit(one(&k, 1)), Err(IngestError::UnknownDevice(k.public_key().device_id())));
        ing.enroll(&k.public_key(), Some("t")).unwrap();
        let first = signed(&k, 1);
        let r1 = ing.submit_reading(first.clone()).unwrap();
        // The device missed the acknowledgement and sends the same reading again: same receipt.
        assert_eq!(ing.submit_reading(first).unwrap()[0].leaf_index, r1[0].leaf_index);
        assert_eq!(ing.stats().reacknowledged, 1);
        // Another reading with a used sequence number is a replay.
        let mut other = reading(&k, 1);
        other.value = Value::Scaled { mantissa: -7, exponent: 0 };
        let other = Submission::Reading(SignedReading::sign(&k, other).unwrap());
        assert_eq!(ing.submit(other), Err(IngestError::Replay { last: 1, got: 1 }));
        // A forged signature: a stranger's signature over k's reading.
        let mut forged = signed(&k, 2);
        forged.signature = stranger.sign(&forged.reading.id());
        assert!(matches!(ing.submit_reading(forged), Err(IngestError::BadSignature(_))));
        // A stranger's own reading, and k's reading under the stranger's signature claims.
        assert!(matches!(ing.submit(one(&stranger, 2)), Err(IngestError::UnknownDevice(_))));
        // Clock: in the future, before 2020.
        let mut future = reading(&k, 3);
        future.timestamp_ms += 3_600_000;
        assert!(matches!(ing.submit_reading(SignedReading::sign(&k, future).unwrap()), Err(IngestError::ClockSkew { .. })));
        let mut past = reading(&k, 3);
        past.timestamp_ms = 1_000;
        assert!(matches!(ing.submit_reading(SignedReading::sign(&k, past).unwrap()), Err(IngestError::ClockSkew { .. })));
        // Sizes and shapes.
        assert!(matches!(Submission::decode(b"R\x00\x05abc"), Err(IngestError::Malformed(_))));
        assert!(matches!(Submission::decode(b"Rxx"), Err(IngestError::TooLarge(_)))); // claims 30 KB
        assert!(matches!(Submission::decode(b""), Err(IngestError::Malformed(_))));
        assert!(matches!(Submission::decode(&vec![b'B'; MAX_SUBMISSION_BYTES + 1]), Err(IngestError::TooLarge(_))));
        let mut big = reading(&k, 3);
        big.value = Value::Bytes(vec![0; 17]);
        assert!(matches!(ing.submit_reading(SignedReading::sign(&k, big).unwrap()), Err(IngestError::TooLarge(_))));
        let mut huge = signed(&k, 3);
        huge.reading.value = Value::Bytes(vec![0; MAX_PAYLOAD + 1]);
        assert!(matches!(ing.submit_reading(huge), Err(IngestError::TooLarge(_))));
        let mut nan = signed(&k, 3);
        nan.reading.value = Value::Float(f64::NAN);
        assert!(matches!(ing.submit_reading(nan), Err(IngestError::Malformed(_))));
        assert!(matches!(ing.submit_reading(signed(&k, 1 << 63)), Err(IngestError::Malformed(_))));
        let sig = signed(&k, 3).signature;
        assert!(matches!(ing.submit_batch(SignedBatch { readings: vec![], signature: sig }), Err(IngestError::Malformed(_))));
        let eleven = SignedBatch::sign(&k, (3..14).map(|s| reading(&k, s)).collect()).unwrap();
        assert!(matches!(ing.submit_batch(eleven), Err(IngestError::TooLarge(_))));
        // A batch, then a replay of one of its sequence numbers.
        let b = SignedBatch::sign(&k, (2..12).map(|s| reading(&k, s)).collect()).unwrap();
        let r = ing.submit_batch(b.clone()).unwrap();
        assert_eq!(r.len(), 10);
        assert_eq!(r[9].tree_size, 11);
        assert_eq!(ing.submit_batch(b).unwrap(), r.iter().map(|x| Receipt { tree_size: 11, ..*x }).collect::<Vec<_>>());
        // (A different reading with a used number; the very same reading would be re-acknowledged.)
        let mut seven = reading(&k, 7);
        seven.value = Value::Scaled { mantissa: -77, exponent: 0 };
        let seven = Submission::Reading(SignedReading::sign(&k, seven).unwrap());
        assert!(matches!(ing.submit(seven), Err(IngestError::Replay { last: 11, .. })));
        // Re-enrolling does not lower the sequence number.
        assert_eq!(ing.enroll(&k.public_key(), None).unwrap().last_seq, Some(11));
        ing.revoke(&k.public_key().device_id(), "lost").unwrap();
        assert!(matches!(ing.submit(one(&k, 20)), Err(IngestError::Revoked(_))));
        assert!(ing.device(&k.public_key().device_id()).unwrap().is_revoked());
        // Nothing accepted was lost; batch evidence is rebuilt and verifies.
        assert_eq!(ing.head().unwrap().0, 11);
        let s = ing.reading_at(5).unwrap().unwrap();
        assert!(matches!(s.evidence, Evidence::Batch(_)));
        assert_eq!(s.encoded, s.reading.encode());
        s.evidence.verify(&k.public_key(), &s.reading).unwrap();
        assert!(ing.reading_at(11).unwrap().is_none());
        assert!(ing.reading_at(u64::MAX).unwrap().is_none());
        assert!(ing.reading(&[0; 32]).unwrap().is_none());
        let st = ing.stats();
        assert_eq!(st.accepted, 11);
        assert_eq!(st.rejected.get("replay"), Some(&2));
        assert_eq!(st.rejected.get("too_large"), Some(&3));
        assert_eq!(st.rejected.get("clock_skew"), Some(&2));
        assert_eq!(st.rejected.get("unknown_device"), Some(&2));
        assert_eq!(st.rejected.get("revoked"), Some(&1));
        assert_eq!(st.rejected.get("bad_signature"), Some(&1));
    }

    #[test]
    fn a_submission_sent_twice_at_once_gets_one_entry_and_the_same_receipt() {
        let dir = tempfile::tempdir().unwrap();
        let ing = Ingestor::start(&dir.path().join("n.sqlite"), IngestConfig::default()).unwrap();
        let k = key(3);
        ing.enroll(&k.public_key(), None).unwrap();
        for seq in 1..=20 {
            let s = signed(&k, seq);
            let a = ing.submit_nowait(Submission::Reading(s.clone()));
            let b = ing.submit_nowait(Submission::Reading(s));
            let (a, b) = (a.wait().unwrap(), b.wait().unwrap());
            assert_eq!((a[0].reading_id, a[0].leaf_index), (b[0].reading_id, b[0].leaf_index));
        }
        assert_eq!(ing.head().unwrap().0, 20);
        assert_eq!(ing.stats().reacknowledged, 20);
        assert!(ing.stats().rejected.is_empty());
    }

    #[test]
    fn shutdown_answers_everything_queued() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.sqlite");
        let ing = Ingestor::start(&path, IngestConfig::default()).unwrap();
        let k = key(5);
        ing.enroll(&k.public_key(), None).unwrap();
        let mut pending: Vec<Pending> = (1..=300).map(|s| ing.submit_nowait(one(&k, s))).collect();
        ing.shutdown();
        for p in &mut pending {
            assert!(matches!(p.try_wait(), Some(Ok(_))));
        }
        assert_eq!(ing.submit(one(&k, 301)), Err(IngestError::ShuttingDown));
        drop(ing);
        let c = registry::open_db(&path).unwrap();
        assert_eq!(MerkleLog::new(&c).size().unwrap(), 300);
        let mut p = Ingestor::start(&path, IngestConfig::default()).unwrap().submit_nowait(one(&k, 301));
        assert!(matches!(p.wait_timeout(Duration::from_secs(60)), Some(Ok(r)) if r[0].leaf_index == 300));
    }

    /// Found by `fuzz/` (target `submission_json`): serde_json without `float_roundtrip` read
    /// `1e-142` as 9.999999999999999e-143, so a float reading submitted as JSON was not the
    /// reading its device had signed, and its signature failed.
    #[test]
    fn a_json_float_is_the_value_its_device_signed() {
        for x in [1e-142, 1.3333333333333337, 21.53, 5e-324, f64::MAX, -0.0, 0.1 + 0.2] {
            let reading =
                Reading { device: DeviceId([1; 32]), seq: 1, timestamp_ms: 1_700_000_000_000, sensor: 1, unit: 1, value: Value::Float(x) };
            let signature = Signature::Schnorr([7; 64]);
            let body = serde_json::json!({ "reading": ReadingJson::from_reading(&reading), "signature": signature.to_hex() }).to_string();
            let batch = serde_json::json!({ "batch": [ReadingJson::from_reading(&reading)], "signature": signature.to_hex() }).to_string();
            assert_eq!(
                Submission::from_json(body.as_bytes()),
                Ok(Submission::Reading(SignedReading { reading: reading.clone(), signature })),
                "{body}"
            );
            assert_eq!(
                Submission::from_json(batch.as_bytes()),
                Ok(Submission::Batch(SignedBatch { readings: vec![reading], signature })),
                "{batch}"
            );
        }
    }

    /// Issue 14: refusals are typed values, and what a device reads (the message and
    /// the code) is what it was when they were strings.
    #[test]
    fn refusals_are_typed_and_read_as_before() {
        let n = MAX_SUBMISSION_BYTES + 1;
        let e = Submission::decode(&vec![b'B'; n]).unwrap_err();
        assert_eq!(e, IngestError::TooLarge(TooLarge::Bytes { got: n, max: MAX_SUBMISSION_BYTES }));
        assert_eq!((e.to_string(), e.code()), (format!("submission too large: {n} bytes (at most {MAX_SUBMISSION_BYTES})"), "too_large"));
        let e = Submission::decode(b"").unwrap_err();
        assert_eq!(e, IngestError::Malformed(Malformed::UnknownKind));
        assert_eq!(e.to_string(), "malformed submission: expected a signed reading ('R') or batch ('B')");
        let e = Submission::decode(b"R\x00\x05abc").unwrap_err();
        assert!(matches!(e, IngestError::Malformed(Malformed::Decode(d)) if e.to_string() == format!("malformed submission: {d}")), "{e}");
        assert_eq!(e.code(), "malformed");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.sqlite");
        let ing = Ingestor::start(&path, IngestConfig { max_batch: 3, max_payload: 8, ..Default::default() }).unwrap();
        let k = SigningKey::schnorr_from_secret(&[4; 32]).unwrap();
        ing.enroll(&k.public_key(), None).unwrap();
        let e = ing.submit(Submission::Batch(SignedBatch::sign(&k, (1..=4).map(|s| reading(&k, s)).collect()).unwrap())).unwrap_err();
        assert_eq!(e, IngestError::TooLarge(TooLarge::Batch { got: 4, max: 3 }));
        assert_eq!(e.to_string(), "submission too large: 4 readings in one batch (at most 3)");
        let big = Reading { value: Value::Bytes(vec![0; 9]), ..reading(&k, 1) };
        let e = ing.submit_reading(SignedReading::sign(&k, big).unwrap()).unwrap_err();
        assert_eq!(e, IngestError::TooLarge(TooLarge::Payload { got: 9, max: 8 }));
        assert_eq!(e.to_string(), "submission too large: payload of 9 bytes (at most 8)");
        let mut forged = signed(&k, 1);
        forged.signature = SigningKey::schnorr_from_secret(&[5; 32]).unwrap().sign(&forged.reading.id());
        let e = ing.submit_reading(forged).unwrap_err();
        assert_eq!(e, IngestError::BadSignature(SignError::Invalid));
        assert_eq!((e.to_string(), e.code()), (format!("bad signature: {}", SignError::Invalid), "bad_signature"));
        let r = ing.submit(one(&k, 1)).unwrap();
        drop(ing);

        // A stored reading that no longer decodes: a typed storage error naming it.
        let c = registry::open_db(&path).unwrap();
        c.execute("UPDATE readings SET encoded = x'00' WHERE idx = 0", []).unwrap();
        let e = reading_at(&c, 0).unwrap_err();
        let IngestError::Storage(StorageError::Corrupt(Corrupt::Encoding { index: 0, source })) = e else { panic!("{e:?}") };
        assert_eq!(e.to_string(), format!("storage failed, nothing was acknowledged: corrupt reading 0: {source}"));
        assert_eq!(e.code(), "storage");
        assert!(matches!(reading_by_id(&c, &r[0].reading_id), Err(IngestError::Storage(StorageError::Corrupt(_)))));
        c.execute("UPDATE readings SET id = x'01' WHERE idx = 0", []).unwrap();
        assert_eq!(reading_id_at(&c, 0), Err(IngestError::Storage(StorageError::Corrupt(Corrupt::Id { index: 0 }))));
        // SQLite's own failures keep their source: clones of one failure are equal (every
        // submitter of a group gets the same), two failures are not.
        let fail = || IngestError::from(c.execute("INSERT INTO no_such_table VALUES (1)", []).unwrap_err());
        let (a, b) = (fail(), fail());
        assert_eq!(a.clone(), a);
        assert_ne!(a, b);
        let IngestError::Storage(s) = &a else { panic!("{a:?}") };
        assert!(!s.is_full());
        assert!(std::error::Error::source(s).is_some_and(|e| e.downcast_ref::<rusqlite::Error>().is_some()));
    }
}
