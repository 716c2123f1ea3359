//! The notary database and its device registry: which public keys may submit
//! readings, since when, and whether they were revoked.
//!
//! One SQLite file holds the registry, the readings, the Merkle log
//! ([`crate::log`]) and the anchors, in WAL mode with `synchronous=FULL`: a
//! committed transaction survives a crash or power loss.

use std::path::Path;
use std::time::Duration;

use bitmote_device::{DeviceId, PublicKey};
use rusqlite::{params, Connection, OptionalExtension};

/// Errors of the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("device {0} is not enrolled")]
    Unknown(DeviceId),
    #[error("device {0} was revoked and cannot be enrolled again")]
    Revoked(DeviceId),
    #[error("a device named {0:?} already exists")]
    NameTaken(String),
    #[error("registry storage: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("corrupt registry row: {0}")]
    Corrupt(String),
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS devices (
    id BLOB PRIMARY KEY,
    pubkey BLOB NOT NULL,
    name TEXT NOT NULL UNIQUE,
    enrolled_ms INTEGER NOT NULL,
    revoked_ms INTEGER,
    revoke_reason TEXT,
    last_seq INTEGER
);
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY,
    device BLOB NOT NULL,
    first_seq INTEGER NOT NULL,
    count INTEGER NOT NULL,
    first_idx INTEGER NOT NULL,
    signature BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS readings (
    idx INTEGER PRIMARY KEY,
    id BLOB NOT NULL UNIQUE,
    device BLOB NOT NULL,
    seq INTEGER NOT NULL,
    ts_ms INTEGER NOT NULL,
    encoded BLOB NOT NULL,
    signature BLOB,
    batch_id INTEGER REFERENCES batches(id),
    batch_index INTEGER,
    received_ms INTEGER NOT NULL
);
";

/// Open (or create) the notary database with its whole schema.
pub fn open_db(path: &Path) -> rusqlite::Result<Connection> {
    let c = Connection::open(path)?;
    c.pragma_update(None, "journal_mode", "WAL")?;
    c.pragma_update(None, "synchronous", "FULL")?;
    c.busy_timeout(Duration::from_secs(30))?;
    // 64 MiB page cache and memory-mapped reads: the log's hot pages stay in memory.
    c.pragma_update(None, "cache_size", -65536)?;
    c.pragma_update(None, "mmap_size", 1i64 << 30)?;
    c.execute_batch(SCHEMA)?;
    c.execute_batch(crate::log::SCHEMA)?;
    c.execute_batch(crate::anchor::SCHEMA)?;
    Ok(c)
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A registered device.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Device {
    #[serde(serialize_with = "ser_display")]
    pub id: DeviceId,
    #[serde(serialize_with = "ser_display")]
    pub pubkey: PublicKey,
    pub name: String,
    pub enrolled_ms: u64,
    pub revoked_ms: Option<u64>,
    pub revoke_reason: Option<String>,
    /// Highest sequence number accepted so far.
    pub last_seq: Option<u64>,
}

fn ser_display<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

impl Device {
    pub fn is_revoked(&self) -> bool {
        self.revoked_ms.is_some()
    }
}

fn row_to_device(r: &rusqlite::Row<'_>) -> rusqlite::Result<(Vec<u8>, Vec<u8>, String, u64, Option<u64>, Option<String>, Option<u64>)> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?))
}

type Row = (Vec<u8>, Vec<u8>, String, u64, Option<u64>, Option<String>, Option<u64>);

fn to_device(row: Row) -> Result<Device, RegistryError> {
    let (id, pk, name, enrolled_ms, revoked_ms, revoke_reason, last_seq) = row;
    let id: [u8; 32] = id.try_into().map_err(|_| RegistryError::Corrupt("device id length".into()))?;
    let pubkey = PublicKey::decode(&pk).map_err(|e| RegistryError::Corrupt(e.to_string()))?;
    Ok(Device { id: DeviceId(id), pubkey, name, enrolled_ms, revoked_ms, revoke_reason, last_seq })
}

const COLS: &str = "id, pubkey, name, enrolled_ms, revoked_ms, revoke_reason, last_seq";

/// Enroll a key under `name` (default: the first 16 hex digits of its id). Enrolling
/// the same key again returns the existing record; a revoked key stays revoked.
pub fn enroll(c: &Connection, key: &PublicKey, name: Option<&str>) -> Result<Device, RegistryError> {
    let id = key.device_id();
    if let Some(d) = get(c, &id)? {
        if d.is_revoked() {
            return Err(RegistryError::Revoked(id));
        }
        return Ok(d);
    }
    let name = name.map(str::to_string).unwrap_or_else(|| id.to_string()[..16].to_string());
    match c.execute(
        "INSERT INTO devices (id, pubkey, name, enrolled_ms) VALUES (?1, ?2, ?3, ?4)",
        params![&id.0[..], key.encode(), name, now_ms()],
    ) {
        Ok(_) => {}
        Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::ConstraintViolation => {
            return Err(RegistryError::NameTaken(name));
        }
        Err(e) => return Err(e.into()),
    }
    get(c, &id)?.ok_or(RegistryError::Unknown(id))
}

/// Revoke a device: its readings already in the log stay (and stay provable, marked
/// as from a revoked key); new ones are refused.
pub fn revoke(c: &Connection, id: &DeviceId, reason: &str) -> Result<Device, RegistryError> {
    let n = c.execute(
        "UPDATE devices SET revoked_ms = ?2, revoke_reason = ?3 WHERE id = ?1 AND revoked_ms IS NULL",
        params![&id.0[..], now_ms(), reason],
    )?;
    let d = get(c, id)?.ok_or(RegistryError::Unknown(*id))?;
    if n == 0 && !d.is_revoked() {
        return Err(RegistryError::Unknown(*id));
    }
    Ok(d)
}

pub fn get(c: &Connection, id: &DeviceId) -> Result<Option<Device>, RegistryError> {
    let row = c
        .prepare_cached(&format!("SELECT {COLS} FROM devices WHERE id = ?1"))?
        .query_row([&id.0[..]], row_to_device)
        .optional()?;
    row.map(to_device).transpose()
}

pub fn by_name(c: &Connection, name: &str) -> Result<Option<Device>, RegistryError> {
    let row = c.query_row(&format!("SELECT {COLS} FROM devices WHERE name = ?1"), [name], row_to_device).optional()?;
    row.map(to_device).transpose()
}

pub fn list(c: &Connection) -> Result<Vec<Device>, RegistryError> {
    let mut st = c.prepare(&format!("SELECT {COLS} FROM devices ORDER BY enrolled_ms, name"))?;
    let rows = st.query_map([], row_to_device)?;
    rows.map(|r| to_device(r?)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitmote_device::SigningKey;

    #[test]
    fn enroll_is_idempotent_and_revocation_is_final() {
        let dir = tempfile::tempdir().unwrap();
        let c = open_db(&dir.path().join("n.sqlite")).unwrap();
        let k = SigningKey::schnorr_from_secret(&[5; 32]).unwrap().public_key();
        let p = SigningKey::p256_from_secret(&[5; 32]).unwrap().public_key();
        let d = enroll(&c, &k, Some("thermo-1")).unwrap();
        assert_eq!(d.id, k.device_id());
        assert_eq!(enroll(&c, &k, None).unwrap().name, "thermo-1");
        assert!(matches!(enroll(&c, &p, Some("thermo-1")), Err(RegistryError::NameTaken(_))));
        enroll(&c, &p, None).unwrap();
        assert_eq!(list(&c).unwrap().len(), 2);
        let r = revoke(&c, &d.id, "stolen").unwrap();
        assert!(r.is_revoked());
        assert_eq!(r.revoke_reason.as_deref(), Some("stolen"));
        assert!(matches!(enroll(&c, &k, None), Err(RegistryError::Revoked(_))));
        assert!(matches!(revoke(&c, &DeviceId([0; 32]), "x"), Err(RegistryError::Unknown(_))));
        assert_eq!(by_name(&c, "thermo-1").unwrap().unwrap().id, d.id);
    }
}
