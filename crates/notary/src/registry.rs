//! The device registry: which public keys may submit readings, since when, whether
//! they were revoked (when and why), and the last sequence number accepted from each.
//!
//! Its table (`devices`) lives in the notary database, whose connections, pragmas and
//! schema belong to [`crate::store`]; [`open_db`], [`Store`] and [`SCHEMA_VERSION`] are
//! re-exported here for the callers that have always found them here.

use bitmote_device::{DeviceId, PublicKey};
use rusqlite::{params, Connection, OptionalExtension};

pub use crate::store::{open_db, Store, SCHEMA_VERSION};
pub(crate) use bitmote_chain::now_ms;

/// Errors of the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("device {0} is not enrolled")]
    Unknown(DeviceId),
    #[error("device {0} was revoked and cannot be enrolled again")]
    Revoked(DeviceId),
    #[error("a device named {0:?} already exists")]
    NameTaken(String),
    #[error("invalid device name {0:?}: 1 to 64 characters, no control characters")]
    BadName(String),
    #[error("registry storage: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("corrupt registry row: {0}")]
    Corrupt(String),
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

type Row = (Vec<u8>, Vec<u8>, String, i64, Option<i64>, Option<String>, Option<i64>);

fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?))
}

fn to_device(row: Row) -> Result<Device, RegistryError> {
    let (id, pk, name, enrolled_ms, revoked_ms, revoke_reason, last_seq) = row;
    let corrupt = |what: &str| RegistryError::Corrupt(format!("device {}: {what}", hex::encode(&id)));
    let id_arr: [u8; 32] = id.clone().try_into().map_err(|_| corrupt("id is not 32 bytes"))?;
    let pubkey = PublicKey::decode(&pk).map_err(|e| corrupt(&e.to_string()))?;
    if pubkey.device_id().0 != id_arr {
        return Err(corrupt("id is not the id of its key"));
    }
    let u = |v: i64| u64::try_from(v).map_err(|_| corrupt("negative number"));
    Ok(Device {
        id: DeviceId(id_arr),
        pubkey,
        name,
        enrolled_ms: u(enrolled_ms)?,
        revoked_ms: revoked_ms.map(u).transpose()?,
        revoke_reason,
        last_seq: last_seq.map(u).transpose()?,
    })
}

const COLS: &str = "id, pubkey, name, enrolled_ms, revoked_ms, revoke_reason, last_seq";

fn check_name(name: &str) -> Result<(), RegistryError> {
    let n = name.chars().count();
    if n == 0 || n > 64 || name.chars().any(char::is_control) || name.trim() != name {
        return Err(RegistryError::BadName(name.to_string()));
    }
    Ok(())
}

/// Enroll a key under `name` (default: the first 16 hex digits of its id). Enrolling
/// the same key again returns the existing record (whatever name is given); a revoked
/// key stays revoked ([`RegistryError::Revoked`]).
pub fn enroll(c: &Connection, key: &PublicKey, name: Option<&str>) -> Result<Device, RegistryError> {
    let id = key.device_id();
    let existing = |c: &Connection| -> Result<Option<Device>, RegistryError> {
        match get(c, &id)? {
            Some(d) if d.is_revoked() => Err(RegistryError::Revoked(id)),
            d => Ok(d),
        }
    };
    if let Some(d) = existing(c)? {
        return Ok(d);
    }
    let name = name.map(str::to_string).unwrap_or_else(|| id.to_string()[..16].to_string());
    check_name(&name)?;
    match c.execute(
        "INSERT INTO devices (id, pubkey, name, enrolled_ms) VALUES (?1, ?2, ?3, ?4)",
        params![&id.0[..], key.encode(), name, now_ms() as i64],
    ) {
        Ok(_) => {}
        Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::ConstraintViolation => {
            // Either the name is taken, or another connection enrolled this key just now.
            return existing(c)?.ok_or(RegistryError::NameTaken(name));
        }
        Err(e) => return Err(e.into()),
    }
    get(c, &id)?.ok_or(RegistryError::Unknown(id))
}

/// Revoke a device, recording the time and `reason`: its readings already in the log
/// stay (and stay provable, marked as from a revoked key); new ones are refused.
/// Revoking a revoked device changes nothing and returns its record.
pub fn revoke(c: &Connection, id: &DeviceId, reason: &str) -> Result<Device, RegistryError> {
    c.execute(
        "UPDATE devices SET revoked_ms = ?2, revoke_reason = ?3 WHERE id = ?1 AND revoked_ms IS NULL",
        params![&id.0[..], now_ms() as i64, reason],
    )?;
    get(c, id)?.ok_or(RegistryError::Unknown(*id))
}

/// The device with this id, revoked or not.
pub fn get(c: &Connection, id: &DeviceId) -> Result<Option<Device>, RegistryError> {
    let row = c.prepare_cached(&format!("SELECT {COLS} FROM devices WHERE id = ?1"))?.query_row([&id.0[..]], read_row).optional()?;
    row.map(to_device).transpose()
}

pub fn by_name(c: &Connection, name: &str) -> Result<Option<Device>, RegistryError> {
    let row = c.query_row(&format!("SELECT {COLS} FROM devices WHERE name = ?1"), [name], read_row).optional()?;
    row.map(to_device).transpose()
}

/// All devices, revoked ones included, in enrolment order.
pub fn list(c: &Connection) -> Result<Vec<Device>, RegistryError> {
    let mut st = c.prepare(&format!("SELECT {COLS} FROM devices ORDER BY enrolled_ms, name"))?;
    let rows = st.query_map([], read_row)?;
    rows.map(|r| to_device(r?)).collect()
}

/// Record `seq` as the device's last accepted sequence number (ingest does this in
/// its group transaction). It never goes down.
pub fn set_last_seq(c: &Connection, id: &DeviceId, seq: u64) -> Result<(), RegistryError> {
    let seq = i64::try_from(seq).map_err(|_| RegistryError::Corrupt(format!("sequence number {seq} is over 2^63")))?;
    let n = c
        .prepare_cached("UPDATE devices SET last_seq = MAX(COALESCE(last_seq, -1), ?2) WHERE id = ?1")?
        .execute(params![&id.0[..], seq])?;
    if n == 0 {
        return Err(RegistryError::Unknown(*id));
    }
    Ok(())
}

/// The registry functions as methods on one connection.
pub struct Registry<'c> {
    conn: &'c Connection,
}

impl<'c> Registry<'c> {
    pub fn new(conn: &'c Connection) -> Self {
        Registry { conn }
    }
    pub fn enroll(&self, key: &PublicKey, name: Option<&str>) -> Result<Device, RegistryError> {
        enroll(self.conn, key, name)
    }
    pub fn revoke(&self, id: &DeviceId, reason: &str) -> Result<Device, RegistryError> {
        revoke(self.conn, id, reason)
    }
    pub fn get(&self, id: &DeviceId) -> Result<Option<Device>, RegistryError> {
        get(self.conn, id)
    }
    pub fn by_name(&self, name: &str) -> Result<Option<Device>, RegistryError> {
        by_name(self.conn, name)
    }
    pub fn list(&self) -> Result<Vec<Device>, RegistryError> {
        list(self.conn)
    }
    /// Last accepted sequence number (`None`: nothing accepted yet).
    pub fn last_seq(&self, id: &DeviceId) -> Result<Option<u64>, RegistryError> {
        Ok(get(self.conn, id)?.ok_or(RegistryError::Unknown(*id))?.last_seq)
    }
    pub fn set_last_seq(&self, id: &DeviceId, seq: u64) -> Result<(), RegistryError> {
        set_last_seq(self.conn, id, seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitmote_device::SigningKey;

    #[test]
    fn enroll_is_idempotent_and_revocation_is_final() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("n.sqlite")).unwrap();
        let reg = store.registry();
        let k = SigningKey::schnorr_from_secret(&[5; 32]).unwrap().public_key();
        let p = SigningKey::p256_from_secret(&[5; 32]).unwrap().public_key();
        let d = reg.enroll(&k, Some("thermo-1")).unwrap();
        assert_eq!(d.id, k.device_id());
        assert!(!d.is_revoked());
        assert_eq!(d.last_seq, None);
        // Again, with or without another name: the same record.
        assert_eq!(reg.enroll(&k, None).unwrap().name, "thermo-1");
        assert_eq!(reg.enroll(&k, Some("other")).unwrap().enrolled_ms, d.enrolled_ms);
        assert!(matches!(reg.enroll(&p, Some("thermo-1")), Err(RegistryError::NameTaken(_))));
        assert!(matches!(reg.enroll(&p, Some("")), Err(RegistryError::BadName(_))));
        assert!(matches!(reg.enroll(&p, Some("a\nb")), Err(RegistryError::BadName(_))));
        assert!(matches!(reg.enroll(&p, Some(&"x".repeat(65))), Err(RegistryError::BadName(_))));
        let dp = reg.enroll(&p, None).unwrap();
        assert_eq!(dp.name, &dp.id.to_string()[..16]);
        assert_eq!(reg.list().unwrap().len(), 2);

        reg.set_last_seq(&d.id, 7).unwrap();
        reg.set_last_seq(&d.id, 3).unwrap(); // never goes down
        assert_eq!(reg.last_seq(&d.id).unwrap(), Some(7));
        assert!(matches!(reg.set_last_seq(&DeviceId([0; 32]), 1), Err(RegistryError::Unknown(_))));

        let r = reg.revoke(&d.id, "stolen").unwrap();
        assert!(r.is_revoked());
        assert_eq!(r.revoke_reason.as_deref(), Some("stolen"));
        assert!(r.revoked_ms.unwrap() >= r.enrolled_ms);
        // Revoking again keeps the first time and reason.
        let again = reg.revoke(&d.id, "other reason").unwrap();
        assert_eq!((again.revoked_ms, again.revoke_reason.as_deref()), (r.revoked_ms, Some("stolen")));
        assert!(matches!(reg.enroll(&k, None), Err(RegistryError::Revoked(_))));
        assert!(matches!(reg.revoke(&DeviceId([0; 32]), "x"), Err(RegistryError::Unknown(_))));
        // Revoked devices stay listed, with their history.
        let all = reg.list().unwrap();
        assert_eq!(all.len(), 2);
        assert!(all.iter().any(|x| x.id == d.id && x.is_revoked() && x.last_seq == Some(7)));
        assert_eq!(reg.by_name("thermo-1").unwrap().unwrap().id, d.id);
        assert!(reg.get(&DeviceId([1; 32])).unwrap().is_none());
    }

    #[test]
    fn the_database_is_wal_full_sync_and_versioned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.sqlite");
        let c = open_db(&path).unwrap();
        let mode: String = c.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = c.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
        assert_eq!(sync, 2, "synchronous=FULL");
        let v: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        // Reopening (migrations again) is harmless; a newer schema is refused.
        drop(c);
        let c = open_db(&path).unwrap();
        c.execute_batch(&format!("PRAGMA user_version = {}", SCHEMA_VERSION + 1)).unwrap();
        drop(c);
        let e = open_db(&path).unwrap_err().to_string();
        assert!(e.contains("newer"), "{e}");
    }

    #[test]
    fn a_corrupt_row_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("n.sqlite")).unwrap();
        store.conn().execute("INSERT INTO devices (id, pubkey, name, enrolled_ms) VALUES (x'0102', x'00', 'bad', 1)", []).unwrap();
        assert!(matches!(store.registry().list(), Err(RegistryError::Corrupt(_))));
        assert!(matches!(store.registry().by_name("bad"), Err(RegistryError::Corrupt(_))));
    }
}
