//! Ingest: accept signed readings and batches, append them to the log with group
//! commit, and acknowledge each one only once it is durable.
//!
//! Checks that need no database (encoding, signature, clock) run on the caller's
//! thread, in parallel. One writer thread then takes everything queued, checks
//! enrolment and sequence numbers against the registry (a replay is refused even if
//! its twin is in the same group), and writes readings, log nodes and sequence
//! numbers in ONE SQLite transaction: one disk flush for the whole group. Only after
//! the commit does each submitter get its [`Receipt`]s; a storage error fails the
//! group and acknowledges nothing, and a rejected submission never affects another.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use bitmote_device::batch::reading_leaf_hash;
use bitmote_device::{BatchMembership, DeviceId, Evidence, PublicKey, Reading, SignedBatch, SignedReading, Signature};
use rusqlite::{params, Connection, OptionalExtension};

use crate::log::MerkleLog;
use crate::registry::{self, now_ms, Device, RegistryError};

/// Why a submission was refused (or could not be stored).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum IngestError {
    #[error("malformed submission: {0}")]
    Malformed(String),
    #[error("submission too large: {0}")]
    TooLarge(String),
    #[error("device {0} is not enrolled")]
    UnknownDevice(DeviceId),
    #[error("device {0} is revoked")]
    Revoked(DeviceId),
    #[error("bad signature: {0}")]
    BadSignature(String),
    #[error("replayed or out-of-order sequence number {got}: the last accepted for this device is {last}")]
    Replay { last: u64, got: u64 },
    #[error("reading timestamp {timestamp_ms} ms is not plausible (gateway clock {now_ms} ms): {why}")]
    ClockSkew { timestamp_ms: u64, now_ms: u64, why: &'static str },
    #[error("storage failed, nothing was acknowledged: {0}")]
    Storage(String),
    #[error("the gateway is shutting down")]
    ShuttingDown,
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
        }
    }
}

/// Acknowledgement of one durable reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Receipt {
    #[serde(serialize_with = "ser_hex")]
    pub reading_id: [u8; 32],
    pub leaf_index: u64,
    /// Size of the log once the group holding this reading was committed.
    pub tree_size: u64,
}

fn ser_hex<S: serde::Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(v))
}

/// Plausibility limits.
#[derive(Clone, Debug)]
pub struct IngestConfig {
    /// Readings may be at most this far ahead of the gateway clock.
    pub max_future_ms: u64,
    /// Readings before this are refused (default 2020-01-01).
    pub min_timestamp_ms: u64,
    /// Most readings written in one transaction.
    pub max_group: usize,
    /// Storage quota in database pages (4 KiB); `None` = until the disk is full. Either way a
    /// full store fails the group with a storage error and acknowledges nothing.
    pub max_db_pages: Option<u64>,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig { max_future_ms: 10 * 60 * 1000, min_timestamp_ms: 1_577_836_800_000, max_group: 16_384, max_db_pages: None }
    }
}

/// A submission as it arrives.
#[derive(Clone, Debug)]
pub enum Submission {
    Reading(SignedReading),
    Batch(SignedBatch),
}

impl Submission {
    /// Parse the binary wire format (`'R' …` or `'B' …`, see `bitmote_device::batch`).
    pub fn decode(b: &[u8]) -> Result<Self, IngestError> {
        match b.first() {
            Some(b'R') => SignedReading::decode(b).map(Submission::Reading),
            Some(b'B') => SignedBatch::decode(b).map(Submission::Batch),
            _ => return Err(IngestError::Malformed("expected a signed reading ('R') or batch ('B')".into())),
        }
        .map_err(|e| IngestError::Malformed(e.to_string()))
    }

    fn device(&self) -> Option<DeviceId> {
        match self {
            Submission::Reading(r) => Some(r.reading.device),
            Submission::Batch(b) => b.readings.first().map(|r| r.device),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Submission::Reading(_) => 1,
            Submission::Batch(b) => b.readings.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

type Reply = Box<dyn FnOnce(Result<Vec<Receipt>, IngestError>) + Send>;

struct Job {
    device: DeviceId,
    sub: Submission,
    reply: Reply,
}

/// Counters for metrics.
#[derive(Default)]
struct Stats {
    accepted: AtomicU64,
    groups: AtomicU64,
    rejected: Mutex<HashMap<&'static str, u64>>,
}

/// A snapshot of the counters.
#[derive(Clone, Debug, serde::Serialize)]
pub struct IngestStats {
    pub accepted: u64,
    pub groups: u64,
    pub mean_group: f64,
    pub rejected: HashMap<&'static str, u64>,
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
}

impl Ingestor {
    /// Open the database at `path` (creating it) and start the writer.
    pub fn start(path: &Path, cfg: IngestConfig) -> Result<Self, IngestError> {
        let storage = |e: rusqlite::Error| IngestError::Storage(e.to_string());
        let admin = registry::open_db(path).map_err(storage)?;
        let writer_conn = registry::open_db(path).map_err(storage)?;
        if let Some(pages) = cfg.max_db_pages {
            writer_conn.pragma_update(None, "max_page_count", pages as i64).map_err(storage)?;
        }
        let devices: HashMap<DeviceId, Device> = registry::list(&admin)
            .map_err(|e| IngestError::Storage(e.to_string()))?
            .into_iter()
            .map(|d| (d.id, d))
            .collect();
        let devices = Arc::new(RwLock::new(devices));
        let stats = Arc::new(Stats::default());
        let (tx, rx) = mpsc::channel::<Job>();
        let writer = {
            let devices = devices.clone();
            let stats = stats.clone();
            let max_group = cfg.max_group;
            std::thread::Builder::new()
                .name("notary-writer".into())
                .spawn(move || writer_loop(writer_conn, rx, devices, stats, max_group))
                .map_err(|e| IngestError::Storage(e.to_string()))?
        };
        Ok(Ingestor {
            path: path.to_path_buf(),
            cfg,
            queue: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            devices,
            admin: Mutex::new(admin),
            stats,
        })
    }

    pub fn db_path(&self) -> &Path {
        &self.path
    }

    fn reject(&self, e: IngestError) -> IngestError {
        *self.stats.rejected.lock().unwrap_or_else(|p| p.into_inner()).entry(e.code()).or_default() += 1;
        e
    }

    fn precheck(&self, sub: &Submission) -> Result<DeviceId, IngestError> {
        let device = sub.device().ok_or_else(|| IngestError::Malformed("empty batch".into()))?;
        let key: PublicKey = {
            let devs = self.devices.read().unwrap_or_else(|p| p.into_inner());
            let d = devs.get(&device).ok_or(IngestError::UnknownDevice(device))?;
            if d.is_revoked() {
                return Err(IngestError::Revoked(device));
            }
            d.pubkey
        };
        let now = now_ms();
        let readings: Vec<&Reading> = match sub {
            Submission::Reading(r) => vec![&r.reading],
            Submission::Batch(b) => b.readings.iter().collect(),
        };
        for r in readings {
            let why = if r.timestamp_ms > now.saturating_add(self.cfg.max_future_ms) {
                Some("in the future")
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
            bitmote_device::BatchError::Sign(s) => IngestError::BadSignature(s.to_string()),
            bitmote_device::BatchError::TooMany(n) => IngestError::TooLarge(format!("{n} readings in one batch")),
            other => IngestError::Malformed(other.to_string()),
        })?;
        Ok(device)
    }

    /// Validate on this thread, then queue; `reply` is called once the readings are
    /// durable (or refused). Never blocks on the disk.
    pub fn submit_with(&self, sub: Submission, reply: impl FnOnce(Result<Vec<Receipt>, IngestError>) + Send + 'static) {
        let device = match self.precheck(&sub) {
            Ok(d) => d,
            Err(e) => return reply(Err(self.reject(e))),
        };
        let stats = self.stats.clone();
        let reply: Reply = Box::new(move |res: Result<Vec<Receipt>, IngestError>| {
            if let Err(e) = &res {
                *stats.rejected.lock().unwrap_or_else(|p| p.into_inner()).entry(e.code()).or_default() += 1;
            }
            reply(res)
        });
        let q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        match q.as_ref() {
            Some(tx) => {
                if let Err(mpsc::SendError(job)) = tx.send(Job { device, sub, reply }) {
                    (job.reply)(Err(IngestError::ShuttingDown));
                }
            }
            None => reply(Err(IngestError::ShuttingDown)),
        }
    }

    /// Submit and wait until durable.
    pub fn submit(&self, sub: Submission) -> Result<Vec<Receipt>, IngestError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit_with(sub, move |r| {
            let _ = tx.send(r);
        });
        rx.recv().unwrap_or(Err(IngestError::ShuttingDown))
    }

    /// Enroll a device key.
    pub fn enroll(&self, key: &PublicKey, name: Option<&str>) -> Result<Device, RegistryError> {
        let c = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        let d = registry::enroll(&c, key, name)?;
        self.devices.write().unwrap_or_else(|p| p.into_inner()).insert(d.id, d.clone());
        Ok(d)
    }

    /// Revoke a device.
    pub fn revoke(&self, id: &DeviceId, reason: &str) -> Result<Device, RegistryError> {
        let c = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        let d = registry::revoke(&c, id, reason)?;
        self.devices.write().unwrap_or_else(|p| p.into_inner()).insert(d.id, d.clone());
        Ok(d)
    }

    pub fn device(&self, id: &DeviceId) -> Option<Device> {
        self.devices.read().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
    }

    pub fn devices(&self) -> Vec<Device> {
        let mut v: Vec<Device> = self.devices.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        v.sort_by(|a, b| (a.enrolled_ms, &a.name).cmp(&(b.enrolled_ms, &b.name)));
        v
    }

    pub fn stats(&self) -> IngestStats {
        let accepted = self.stats.accepted.load(Ordering::Relaxed);
        let groups = self.stats.groups.load(Ordering::Relaxed);
        IngestStats {
            accepted,
            groups,
            mean_group: if groups > 0 { accepted as f64 / groups as f64 } else { 0.0 },
            rejected: self.stats.rejected.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }

    /// Stop accepting, write everything queued, stop the writer.
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
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        let mut n = group[0].sub.len();
        while n < max_group {
            match rx.try_recv() {
                Ok(j) => {
                    n += j.sub.len();
                    group.push(j);
                }
                Err(_) => break,
            }
        }
        // Enrolment and sequence numbers, in queue order.
        let mut last: HashMap<DeviceId, Option<u64>> = HashMap::new();
        let mut accepted: Vec<Job> = Vec::with_capacity(group.len());
        {
            let devs = devices.read().unwrap_or_else(|p| p.into_inner());
            for job in group {
                let verdict = match devs.get(&job.device) {
                    None => Err(IngestError::UnknownDevice(job.device)),
                    Some(d) if d.is_revoked() => Err(IngestError::Revoked(job.device)),
                    Some(d) => {
                        let prev = *last.entry(job.device).or_insert(d.last_seq);
                        let (first_seq, last_seq) = match &job.sub {
                            Submission::Reading(r) => (r.reading.seq, r.reading.seq),
                            Submission::Batch(b) => (b.readings[0].seq, b.readings[b.readings.len() - 1].seq),
                        };
                        match prev {
                            Some(p) if first_seq <= p => {
                                // A device that did not get its acknowledgement sends again: if these
                                // exact readings are already in the log, acknowledge them again.
                                match already_stored(&conn, &job.sub) {
                                    Some(receipts) => {
                                        (job.reply)(Ok(receipts));
                                        continue;
                                    }
                                    None => Err(IngestError::Replay { last: p, got: first_seq }),
                                }
                            }
                            _ => {
                                last.insert(job.device, Some(last_seq));
                                Ok(())
                            }
                        }
                    }
                };
                match verdict {
                    Ok(()) => accepted.push(job),
                    Err(e) => (job.reply)(Err(e)),
                }
            }
        }
        if accepted.is_empty() {
            continue;
        }
        match write_group(&mut conn, &accepted, &last) {
            Ok(receipts) => {
                let mut devs = devices.write().unwrap_or_else(|p| p.into_inner());
                for (dev, seq) in &last {
                    if let (Some(d), Some(s)) = (devs.get_mut(dev), seq) {
                        d.last_seq = Some(*s);
                    }
                }
                drop(devs);
                stats.groups.fetch_add(1, Ordering::Relaxed);
                for (job, r) in accepted.into_iter().zip(receipts) {
                    stats.accepted.fetch_add(r.len() as u64, Ordering::Relaxed);
                    (job.reply)(Ok(r));
                }
            }
            Err(e) => {
                tracing::error!("notary write failed, {} submissions not acknowledged: {e}", accepted.len());
                for job in accepted {
                    (job.reply)(Err(IngestError::Storage(e.to_string())));
                }
            }
        }
    }
}

/// Receipts of a submission whose readings are all already in the log.
fn already_stored(conn: &Connection, sub: &Submission) -> Option<Vec<Receipt>> {
    let readings: Vec<&Reading> = match sub {
        Submission::Reading(r) => vec![&r.reading],
        Submission::Batch(b) => b.readings.iter().collect(),
    };
    let size = MerkleLog::new(conn).size().ok()?;
    readings
        .into_iter()
        .map(|r| {
            let id = r.id();
            let idx: i64 = conn.query_row("SELECT idx FROM readings WHERE id = ?1", [&id[..]], |row| row.get(0)).ok()?;
            Some(Receipt { reading_id: id, leaf_index: idx as u64, tree_size: size })
        })
        .collect()
}

fn write_group(
    conn: &mut Connection,
    jobs: &[Job],
    last: &HashMap<DeviceId, Option<u64>>,
) -> Result<Vec<Vec<Receipt>>, Box<dyn std::error::Error>> {
    let tx = conn.transaction()?;
    let log = MerkleLog::new(&tx);
    let start = log.size()?;
    let received = now_ms();
    let mut next = start;
    let mut leaves = Vec::new();
    let mut out = Vec::with_capacity(jobs.len());
    {
        let mut ins = tx.prepare_cached(
            "INSERT INTO readings (idx, id, device, seq, ts_ms, encoded, signature, batch_id, batch_index, received_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?;
        for job in jobs {
            let mut receipts = vec![];
            let (readings, sig, batch_id): (&[Reading], Option<&Signature>, Option<i64>) = match &job.sub {
                Submission::Reading(r) => (std::slice::from_ref(&r.reading), Some(&r.signature), None),
                Submission::Batch(b) => {
                    tx.execute(
                        "INSERT INTO batches (device, first_seq, count, first_idx, signature) VALUES (?1, ?2, ?3, ?4, ?5)",
                        params![&job.device.0[..], b.readings[0].seq as i64, b.readings.len() as i64, next as i64, &b.signature.encode()[..]],
                    )?;
                    (&b.readings, None, Some(tx.last_insert_rowid()))
                }
            };
            for (i, r) in readings.iter().enumerate() {
                let enc = r.encode();
                let id = r.id();
                ins.execute(params![
                    next as i64,
                    &id[..],
                    &r.device.0[..],
                    r.seq as i64,
                    r.timestamp_ms as i64,
                    enc,
                    sig.map(|s| s.encode().to_vec()),
                    batch_id,
                    batch_id.map(|_| i as i64),
                    received as i64,
                ])?;
                leaves.push(reading_leaf_hash(r));
                receipts.push(Receipt { reading_id: id, leaf_index: next, tree_size: 0 });
                next += 1;
            }
            out.push(receipts);
        }
    }
    log.append(&leaves)?;
    {
        let mut upd = tx.prepare_cached("UPDATE devices SET last_seq = ?2 WHERE id = ?1")?;
        for (dev, seq) in last {
            if let Some(s) = seq {
                upd.execute(params![&dev.0[..], *s as i64])?;
            }
        }
    }
    drop(log);
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
    pub evidence: Evidence,
    pub received_ms: u64,
}

fn load(c: &Connection, where_: &str, key: &dyn rusqlite::ToSql) -> Result<Option<StoredReading>, IngestError> {
    let st = |e: rusqlite::Error| IngestError::Storage(e.to_string());
    let row: Option<(i64, Vec<u8>, Option<Vec<u8>>, Option<i64>, Option<i64>, i64)> = c
        .query_row(
            &format!("SELECT idx, encoded, signature, batch_id, batch_index, received_ms FROM readings WHERE {where_}"),
            [key],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
        )
        .optional()
        .map_err(st)?;
    let Some((idx, enc, sig, batch_id, batch_index, received)) = row else { return Ok(None) };
    let corrupt = |m: String| IngestError::Storage(format!("corrupt reading {idx}: {m}"));
    let reading = Reading::decode(&enc).map_err(|e| corrupt(e.to_string()))?;
    let evidence = match (sig, batch_id, batch_index) {
        (Some(s), None, None) => Evidence::Single(Signature::decode(&s).map_err(|e| corrupt(e.to_string()))?),
        (None, Some(b), Some(i)) => {
            let (first_seq, count, first_idx, sig): (i64, i64, i64, Vec<u8>) = c
                .query_row("SELECT first_seq, count, first_idx, signature FROM batches WHERE id = ?1", [b], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
                .map_err(st)?;
            // Rebuild the batch tree from its readings (stored contiguously) for the path.
            let mut q = c.prepare_cached("SELECT encoded FROM readings WHERE idx >= ?1 AND idx < ?2 ORDER BY idx").map_err(st)?;
            let leaves = q
                .query_map([first_idx, first_idx + count], |r| r.get::<_, Vec<u8>>(0))
                .map_err(st)?
                .map(|e| {
                    let e = e.map_err(st)?;
                    Ok(bitmote_device::merkle::leaf_hash(&bitmote_device::sha256(&e)))
                })
                .collect::<Result<Vec<_>, IngestError>>()?;
            let proof = bitmote_device::merkle::inclusion_proof(&leaves, i as u64).map_err(|e| corrupt(e.to_string()))?;
            Evidence::Batch(BatchMembership {
                first_seq: first_seq as u64,
                count: count as u32,
                index: i as u32,
                proof,
                signature: Signature::decode(&sig).map_err(|e| corrupt(e.to_string()))?,
            })
        }
        _ => return Err(corrupt("neither a signature nor a batch".into())),
    };
    Ok(Some(StoredReading { leaf_index: idx as u64, reading, evidence, received_ms: received as u64 }))
}

/// A stored reading by its id.
pub fn reading_by_id(c: &Connection, id: &[u8; 32]) -> Result<Option<StoredReading>, IngestError> {
    load(c, "id = ?1", &id.to_vec())
}

/// A stored reading by its leaf index.
pub fn reading_at(c: &Connection, index: u64) -> Result<Option<StoredReading>, IngestError> {
    load(c, "idx = ?1", &(index as i64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitmote_device::merkle::verify_inclusion;
    use bitmote_device::reading::{sensor, unit};
    use bitmote_device::{SigningKey, Value};

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

    fn one(k: &SigningKey, seq: u64) -> Submission {
        Submission::Reading(SignedReading::sign(k, reading(k, seq)).unwrap())
    }

    #[test]
    fn concurrent_submissions_are_grouped_durable_and_provable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.sqlite");
        let ing = Arc::new(Ingestor::start(&path, IngestConfig::default()).unwrap());
        let keys: Vec<SigningKey> = (1..=8u8)
            .map(|i| if i % 2 == 0 { SigningKey::p256_from_secret(&[i; 32]) } else { SigningKey::schnorr_from_secret(&[i; 32]) }.unwrap())
            .collect();
        for k in &keys {
            ing.enroll(&k.public_key(), None).unwrap();
        }
        let threads: Vec<_> = keys
            .into_iter()
            .map(|k| {
                let ing = ing.clone();
                std::thread::spawn(move || (1..=125u64).flat_map(|s| ing.submit(one(&k, s)).unwrap()).collect::<Vec<_>>())
            })
            .collect();
        let receipts: Vec<Receipt> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        assert_eq!(receipts.len(), 1000);
        let stats = ing.stats();
        assert_eq!(stats.accepted, 1000);
        assert!(stats.groups < 1000, "group commit grouped: {} groups", stats.groups);
        let c = registry::open_db(&path).unwrap();
        let log = MerkleLog::new(&c);
        assert_eq!(log.size().unwrap(), 1000);
        let root = log.root_at(1000).unwrap();
        for r in &receipts {
            let stored = reading_by_id(&c, &r.reading_id).unwrap().unwrap();
            assert_eq!(stored.leaf_index, r.leaf_index);
            let p = log.inclusion_proof(r.leaf_index, 1000).unwrap();
            verify_inclusion(r.leaf_index, 1000, &reading_leaf_hash(&stored.reading), &p, &root).unwrap();
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
        assert!(matches!(e, IngestError::Storage(ref m) if m.contains("full")), "{e}");
        // Still full: the next one is refused too, not half-written.
        assert!(matches!(ing.submit(one(&k, seq)), Err(IngestError::Storage(_))));
        drop(ing);
        // Everything acknowledged is there, consistent, and the refused one is not.
        let c = registry::open_db(&path).unwrap();
        let log = MerkleLog::new(&c);
        assert_eq!(log.size().unwrap(), acked.len() as u64);
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

    #[test]
    fn refusals_are_clear_and_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ing = Ingestor::start(&dir.path().join("n.sqlite"), IngestConfig::default()).unwrap();
        let k = SigningKey::schnorr_from_secret(&[9; 32]).unwrap();
        let stranger = SigningKey::schnorr_from_secret(&[8; 32]).unwrap();
        assert_eq!(ing.submit(one(&k, 1)), Err(IngestError::UnknownDevice(k.public_key().device_id())));
        ing.enroll(&k.public_key(), Some("t")).unwrap();
        let first = SignedReading::sign(&k, reading(&k, 1)).unwrap();
        let r1 = ing.submit(Submission::Reading(first.clone())).unwrap();
        // The device missed the acknowledgement and sends the same reading again: same receipt.
        assert_eq!(ing.submit(Submission::Reading(first)).unwrap()[0].leaf_index, r1[0].leaf_index);
        // Another reading with a used sequence number is a replay.
        let mut other = reading(&k, 1);
        other.value = Value::Scaled { mantissa: -7, exponent: 0 };
        let other = Submission::Reading(SignedReading::sign(&k, other).unwrap());
        assert_eq!(ing.submit(other), Err(IngestError::Replay { last: 1, got: 1 }));
        // A forged signature: a stranger's signature over k's reading.
        let mut forged = SignedReading::sign(&k, reading(&k, 2)).unwrap();
        forged.signature = stranger.sign(&forged.reading.id());
        assert!(matches!(ing.submit(Submission::Reading(forged)), Err(IngestError::BadSignature(_))));
        let mut future = reading(&k, 3);
        future.timestamp_ms += 3_600_000;
        let s = Submission::Reading(SignedReading::sign(&k, future).unwrap());
        assert!(matches!(ing.submit(s), Err(IngestError::ClockSkew { .. })));
        assert!(matches!(Submission::decode(b"Rxx"), Err(IngestError::Malformed(_))));
        // A batch, then a replay of one of its sequence numbers.
        let b = SignedBatch::sign(&k, (2..12).map(|s| reading(&k, s)).collect()).unwrap();
        let r = ing.submit(Submission::Batch(b.clone())).unwrap();
        assert_eq!(r.len(), 10);
        assert_eq!(r[9].tree_size, 11);
        // (A different reading with a used number; the very same reading would be re-acknowledged.)
        let mut seven = reading(&k, 7);
        seven.value = Value::Scaled { mantissa: -77, exponent: 0 };
        let seven = Submission::Reading(SignedReading::sign(&k, seven).unwrap());
        assert!(matches!(ing.submit(seven), Err(IngestError::Replay { last: 11, .. })));
        ing.revoke(&k.public_key().device_id(), "lost").unwrap();
        assert!(matches!(ing.submit(one(&k, 20)), Err(IngestError::Revoked(_))));
        // Nothing accepted was lost; batch evidence is rebuilt and verifies.
        let c = registry::open_db(ing.db_path()).unwrap();
        assert_eq!(MerkleLog::new(&c).size().unwrap(), 11);
        let s = reading_at(&c, 5).unwrap().unwrap();
        assert!(matches!(s.evidence, Evidence::Batch(_)));
        s.evidence.verify(&k.public_key(), &s.reading).unwrap();
        assert_eq!(ing.stats().rejected.get("replay"), Some(&2));
    }
}
