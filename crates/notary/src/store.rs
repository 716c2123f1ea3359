//! The notary database, `notary.sqlite`: how it is opened ([`open`]) and its schema
//! ([`NOTARY`]), in one place.
//!
//! One SQLite file holds the registry ([`crate::registry`]), the readings and batches
//! ([`crate::ingest`]), the Merkle log ([`crate::log`]), the issued checkpoints
//! ([`crate::checkpoint`]) and the anchors ([`crate::anchor`]). Those modules read and
//! write their tables; none of them creates one. Every connection to the file is made
//! by [`open`], with one set of pragmas: WAL, `synchronous=FULL` (a committed
//! transaction survives a crash or power loss), a [`BUSY_TIMEOUT`] of 30 s, a 64 MiB
//! page cache and memory-mapped reads.
//!
//! # Schema versions
//!
//! A [`Schema`] is a name and a list of numbered migrations; its version is the number
//! of migrations applied. The table `schema_versions (name, version)` records one row
//! per schema (as BDK's `migrate_schema` does), so that another crate can keep its own
//! tables in this file, versioned apart from the notary's ([`migrate`]; the gateway's
//! MQTT credentials are one). The notary schema's version is also written to `PRAGMA
//! user_version`, which is where bitmote recorded it before this table existed: a
//! binary from then refuses a file whose `user_version` is newer than it knows, and so
//! keeps refusing the files of a newer schema.
//!
//! [`migrate`] reads the recorded version (no write when it is current); if migrations
//! are missing it takes the write lock (`BEGIN IMMEDIATE`), reads the version again
//! (another connection may have migrated meanwhile), applies each missing migration and
//! records the new version in the same transaction. A version newer than the code
//! knows is refused ([`StoreError::TooNew`]) rather than misread.
//!
//! Version 1 of the notary schema is the tables as they were created before
//! versioning, every statement `CREATE … IF NOT EXISTS`: a database from before
//! versioning (`user_version` 0), or one from when `user_version` was the only record
//! (1, no `schema_versions` table), opens unchanged and is recorded at version 1. A
//! later change (a column, an index, a backfill) is a new migration at the end of
//! [`NOTARY`]'s list; released migrations never change.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use crate::log::MerkleLog;
use crate::registry::Registry;

/// How long a connection waits for another's write lock before failing with `SQLITE_BUSY`.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// A named, versioned set of tables: migration `i` (0-based) brings the schema from
/// version `i` to version `i + 1`.
#[derive(Clone, Copy, Debug)]
pub struct Schema {
    /// Key in `schema_versions` (e.g. `"notary"`, `"gateway.mqtt"`).
    pub name: &'static str,
    /// SQL batches, applied in order, each exactly once.
    pub migrations: &'static [&'static str],
}

impl Schema {
    /// The version this code knows: the number of migrations.
    pub const fn version(&self) -> i64 {
        self.migrations.len() as i64
    }
}

/// Version 1 of the notary schema: the tables as created before versioning.
const NOTARY_V1: &str = "
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
-- The Merkle log (crate::log): one row per complete, aligned subtree, and the size.
CREATE TABLE IF NOT EXISTS log_nodes (
    level INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    hash BLOB NOT NULL,
    PRIMARY KEY (level, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS log_meta (
    k TEXT PRIMARY KEY,
    v INTEGER NOT NULL
);
INSERT OR IGNORE INTO log_meta (k, v) VALUES ('size', 0);
-- Checkpoints issued through the fork guard (crate::checkpoint::CheckpointSigner::issue).
CREATE TABLE IF NOT EXISTS checkpoints (
    size INTEGER PRIMARY KEY,
    root BLOB NOT NULL,
    note TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
-- Anchors (crate::anchor) and every version (RBF) of their transactions.
CREATE TABLE IF NOT EXISTS anchors (
    id INTEGER PRIMARY KEY,
    tree_size INTEGER NOT NULL,
    root BLOB NOT NULL,
    state TEXT NOT NULL,
    txid TEXT NOT NULL,
    confirmed_txid TEXT,
    block_height INTEGER,
    block_hash TEXT,
    broadcast_height INTEGER NOT NULL,
    bumps INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS anchor_txs (
    txid TEXT PRIMARY KEY,
    anchor_id INTEGER NOT NULL REFERENCES anchors(id),
    raw BLOB NOT NULL,
    fee_sat INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS anchor_txs_by_anchor ON anchor_txs(anchor_id);
";

/// The notary's own schema.
pub const NOTARY: Schema = Schema { name: "notary", migrations: &[NOTARY_V1] };

/// Version of [`NOTARY`] this code writes (also `PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = NOTARY.version();

const VERSIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_versions (name TEXT PRIMARY KEY, version INTEGER NOT NULL);";

/// Errors opening or migrating the database.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The file system or SQLite build cannot do WAL (which concurrent readers and the
    /// crash guarantees rely on).
    #[error("{}: SQLite refused WAL mode (journal_mode is {mode})", path.display())]
    NoWal { path: PathBuf, mode: String },
    /// The file was written by a newer bitmote.
    #[error("{path}: schema version {found} of {schema:?} is newer than this bitmote understands ({known}); upgrade bitmote")]
    TooNew { path: String, schema: &'static str, found: i64, known: i64 },
    #[error(transparent)]
    Db(#[from] rusqlite::Error),
}

/// For the callers that speak `rusqlite::Error` ([`open_db`]): a refusal becomes
/// `SQLITE_CANTOPEN` with the same message.
impl From<StoreError> for rusqlite::Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Db(e) => e,
            other => rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN), Some(other.to_string())),
        }
    }
}

/// Open (or create) the notary database at `path`: the pragmas, then the [`NOTARY`]
/// schema brought to [`SCHEMA_VERSION`].
pub fn open(path: &Path) -> Result<Connection, StoreError> {
    let c = Connection::open(path)?;
    c.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String = c.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::NoWal { path: path.to_path_buf(), mode });
    }
    c.pragma_update(None, "synchronous", "FULL")?;
    // 64 MiB page cache and memory-mapped reads: the log's hot pages stay in memory.
    c.pragma_update(None, "cache_size", -65536)?;
    c.pragma_update(None, "mmap_size", 1i64 << 30)?;
    migrate(&c, &NOTARY)?;
    Ok(c)
}

/// [`open`], with the error as a `rusqlite::Error` (for callers whose error types
/// wrap SQLite's).
pub fn open_db(path: &Path) -> rusqlite::Result<Connection> {
    Ok(open(path)?)
}

/// The recorded version of `schema` (0: never applied).
pub fn schema_version(c: &Connection, schema: &Schema) -> Result<i64, StoreError> {
    Ok(versions(c, schema)?.1)
}

/// The `schema_versions` row of `schema`, and its version (for the notary, the larger
/// of that row and `user_version`).
fn versions(c: &Connection, schema: &Schema) -> Result<(Option<i64>, i64), StoreError> {
    let has_table: bool =
        c.query_row("SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_versions')", [], |r| r.get(0))?;
    let row: Option<i64> = if has_table {
        c.query_row("SELECT version FROM schema_versions WHERE name = ?1", [schema.name], |r| r.get(0)).optional()?
    } else {
        None
    };
    let mut v = row.unwrap_or(0);
    if schema.name == NOTARY.name {
        // Where the version was recorded before `schema_versions`.
        v = v.max(c.query_row("PRAGMA user_version", [], |r| r.get(0))?);
    }
    Ok((row, v))
}

/// Bring `schema` to its latest version on `c` (see the module documentation); returns
/// that version. Cheap, and writes nothing, when it is current and recorded.
pub fn migrate(c: &Connection, schema: &Schema) -> Result<i64, StoreError> {
    let known = schema.version();
    let too_new = |found: i64| StoreError::TooNew { path: c.path().unwrap_or(":memory:").to_string(), schema: schema.name, found, known };
    let (row, found) = versions(c, schema)?;
    if found > known {
        return Err(too_new(found));
    }
    if found == known && row == Some(known) {
        return Ok(known);
    }
    // Missing migrations, or a version only `user_version` recorded (a database from
    // before `schema_versions`): write, under the write lock.
    let tx = rusqlite::Transaction::new_unchecked(c, TransactionBehavior::Immediate)?;
    tx.execute_batch(VERSIONS_TABLE)?;
    let (_, found) = versions(&tx, schema)?;
    if found > known {
        return Err(too_new(found));
    }
    for m in &schema.migrations[found as usize..] {
        tx.execute_batch(m)?;
    }
    tx.execute(
        "INSERT INTO schema_versions (name, version) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET version = excluded.version",
        rusqlite::params![schema.name, known],
    )?;
    if schema.name == NOTARY.name {
        tx.pragma_update(None, "user_version", known)?;
    }
    tx.commit()?;
    Ok(known)
}

/// The notary database: owns one connection; hands out views of the log and the
/// registry over it. (Ingest and the anchorer open their own connections with [`open`].)
pub struct Store {
    conn: Connection,
}

impl Store {
    /// Open (or create) the database at `path`; see [`open`].
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Ok(Store { conn: open(path)? })
    }

    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    /// For transactions spanning the log and other tables.
    pub fn conn_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }

    pub fn log(&self) -> MerkleLog<'_> {
        MerkleLog::new(&self.conn)
    }

    pub fn registry(&self) -> Registry<'_> {
        Registry::new(&self.conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The DDL of bitmote before this module, verbatim: `registry::SCHEMA`,
    /// `log::SCHEMA`, `checkpoint::SCHEMA`, `anchor::SCHEMA` (each `IF NOT EXISTS`).
    const OLD_DDL: &str = "
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

CREATE TABLE IF NOT EXISTS log_nodes (
    level INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    hash BLOB NOT NULL,
    PRIMARY KEY (level, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS log_meta (
    k TEXT PRIMARY KEY,
    v INTEGER NOT NULL
);
INSERT OR IGNORE INTO log_meta (k, v) VALUES ('size', 0);

CREATE TABLE IF NOT EXISTS checkpoints (
    size INTEGER PRIMARY KEY,
    root BLOB NOT NULL,
    note TEXT NOT NULL,
    created_at INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS anchors (
    id INTEGER PRIMARY KEY,
    tree_size INTEGER NOT NULL,
    root BLOB NOT NULL,
    state TEXT NOT NULL,
    txid TEXT NOT NULL,
    confirmed_txid TEXT,
    block_height INTEGER,
    block_hash TEXT,
    broadcast_height INTEGER NOT NULL,
    bumps INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS anchor_txs (
    txid TEXT PRIMARY KEY,
    anchor_id INTEGER NOT NULL REFERENCES anchors(id),
    raw BLOB NOT NULL,
    fee_sat INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS anchor_txs_by_anchor ON anchor_txs(anchor_id);
";

    /// Every table and index with its SQL, but the version record.
    fn tables(c: &Connection) -> Vec<(String, Option<String>)> {
        let mut st = c
            .prepare("SELECT name, sql FROM sqlite_master WHERE tbl_name != 'schema_versions' AND type IN ('table', 'index') ORDER BY name")
            .unwrap();
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect()
    }

    fn user_version(c: &Connection) -> i64 {
        c.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap()
    }

    fn recorded(c: &Connection, name: &str) -> Option<i64> {
        c.query_row("SELECT version FROM schema_versions WHERE name = ?1", [name], |r| r.get(0)).optional().unwrap()
    }

    /// A database made by the code before versioning (user_version 0), and one from when
    /// user_version was the only record (1): both open with their rows unchanged and are
    /// recorded at the current version; opening again changes nothing.
    #[test]
    fn old_databases_open_unchanged_and_are_brought_to_the_current_version() {
        for old_user_version in [0, 1] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("n.sqlite");
            {
                let c = Connection::open(&path).unwrap();
                c.execute_batch(OLD_DDL).unwrap();
                // The anchorer's own open created its tables again (IF NOT EXISTS).
                c.execute_batch(OLD_DDL).unwrap();
                c.execute_batch(&format!("PRAGMA user_version = {old_user_version}")).unwrap();
                c.execute("INSERT INTO devices (id, pubkey, name, enrolled_ms) VALUES (x'01', x'02', 'old', 7)", []).unwrap();
                c.execute("UPDATE log_meta SET v = 3 WHERE k = 'size'", []).unwrap();
                c.execute("INSERT INTO checkpoints (size, root, note, created_at) VALUES (3, x'aa', 'note', 9)", []).unwrap();
                // The gateway's table, which is not the notary's.
                c.execute_batch("CREATE TABLE mqtt_credentials (device BLOB PRIMARY KEY, hash BLOB NOT NULL, issued_ms INTEGER NOT NULL)")
                    .unwrap();
            }
            let before = tables(&Connection::open(&path).unwrap());
            let c = open(&path).unwrap();
            assert_eq!(tables(&c), before, "no table or index added, dropped or changed but the version record");
            assert_eq!(recorded(&c, "notary"), Some(SCHEMA_VERSION));
            assert_eq!(user_version(&c), SCHEMA_VERSION);
            assert_eq!(schema_version(&c, &NOTARY).unwrap(), SCHEMA_VERSION);
            let name: String = c.query_row("SELECT name FROM devices", [], |r| r.get(0)).unwrap();
            assert_eq!(name, "old");
            assert_eq!(MerkleLog::new(&c).size().unwrap(), 3, "log_meta's size is not reset by the INSERT OR IGNORE");
            let n: i64 = c.query_row("SELECT COUNT(*) FROM checkpoints", [], |r| r.get(0)).unwrap();
            assert_eq!(n, 1);
            drop(c);
            // Twice, and with a connection already open: idempotent, nothing written.
            let other = open(&path).unwrap();
            let changes_before: i64 = other.query_row("PRAGMA data_version", [], |r| r.get(0)).unwrap();
            let c = open(&path).unwrap();
            let changes_after: i64 = other.query_row("PRAGMA data_version", [], |r| r.get(0)).unwrap();
            assert_eq!(changes_before, changes_after, "a current database is opened without writing to it");
            assert_eq!(recorded(&c, "notary"), Some(SCHEMA_VERSION));
            let rows: i64 = c.query_row("SELECT COUNT(*) FROM schema_versions", [], |r| r.get(0)).unwrap();
            assert_eq!(rows, 1);
            assert_eq!(MerkleLog::new(&c).size().unwrap(), 3);
        }
    }

    #[test]
    fn a_new_database_has_the_whole_schema_and_its_pragmas() {
        let dir = tempfile::tempdir().unwrap();
        let c = open(&dir.path().join("n.sqlite")).unwrap();
        // The same tables, columns and indexes as the old DDL made.
        let old = Connection::open_in_memory().unwrap();
        old.execute_batch(OLD_DDL).unwrap();
        assert_eq!(tables(&c), tables(&old));
        assert_eq!(tables(&c).len(), 14);
        assert_eq!(recorded(&c, "notary"), Some(SCHEMA_VERSION));
        let mode: String = c.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = c.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
        assert_eq!(sync, 2, "synchronous=FULL");
        let busy: i64 = c.query_row("PRAGMA busy_timeout", [], |r| r.get(0)).unwrap();
        assert_eq!(busy, BUSY_TIMEOUT.as_millis() as i64);
        assert_eq!(MerkleLog::new(&c).size().unwrap(), 0);
    }

    /// Numbered migrations run once each, in order, across opens; a schema recorded
    /// newer than the code is refused, for the notary (user_version or the table) and for
    /// another named schema; schemas are versioned apart.
    #[test]
    fn migrations_run_once_in_order_and_newer_versions_are_refused() {
        const V1: Schema = Schema { name: "test.extra", migrations: &["CREATE TABLE extra (a INTEGER)"] };
        const V2: Schema =
            Schema { name: "test.extra", migrations: &["CREATE TABLE extra (a INTEGER)", "ALTER TABLE extra ADD COLUMN b TEXT"] };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.sqlite");
        let c = open(&path).unwrap();
        assert_eq!(schema_version(&c, &V1).unwrap(), 0);
        assert_eq!(migrate(&c, &V1).unwrap(), 1);
        // Not `IF NOT EXISTS`: running it twice would fail, so passing means it ran once.
        assert_eq!(migrate(&c, &V1).unwrap(), 1);
        c.execute("INSERT INTO extra (a) VALUES (5)", []).unwrap();
        assert_eq!(migrate(&c, &V2).unwrap(), 2);
        assert_eq!(migrate(&c, &V2).unwrap(), 2);
        let (a, b): (i64, Option<String>) = c.query_row("SELECT a, b FROM extra", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        assert_eq!((a, b), (5, None));
        assert_eq!(recorded(&c, "test.extra"), Some(2));
        assert_eq!(recorded(&c, "notary"), Some(SCHEMA_VERSION), "the notary's version is its own");
        assert_eq!(user_version(&c), SCHEMA_VERSION, "another schema does not touch user_version");
        // Older code meets the newer extra schema.
        let e = migrate(&c, &V1).unwrap_err();
        assert!(matches!(e, StoreError::TooNew { schema: "test.extra", found: 2, known: 1, .. }), "{e}");
        drop(c);
        // A notary schema newer than this code, recorded either way, is refused at open.
        for how in ["PRAGMA user_version = 99", "UPDATE schema_versions SET version = 99 WHERE name = 'notary'"] {
            let p = dir.path().join(format!("{}.sqlite", how.len()));
            open(&p).unwrap().execute_batch(how).unwrap();
            let e = open(&p).unwrap_err();
            assert!(matches!(e, StoreError::TooNew { schema: "notary", found: 99, .. }), "{e}");
            let e = rusqlite::Error::from(e).to_string();
            assert!(e.contains("newer") && e.contains("upgrade bitmote"), "{e}");
            assert!(open_db(&p).is_err());
        }
    }

    /// Connections racing to create and migrate one new file: each migration runs once
    /// (a second run of the test schema's non-idempotent migration would fail).
    #[test]
    fn concurrent_first_opens_migrate_once() {
        const EXTRA: Schema = Schema { name: "test.race", migrations: &["CREATE TABLE race (a INTEGER)"] };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.sqlite");
        let threads: Vec<_> = (0..6)
            .map(|_| {
                let p = path.clone();
                std::thread::spawn(move || {
                    let c = open(&p).unwrap();
                    migrate(&c, &EXTRA).unwrap()
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), 1);
        }
        let c = open(&path).unwrap();
        assert_eq!(recorded(&c, "test.race"), Some(1));
        assert_eq!(recorded(&c, "notary"), Some(SCHEMA_VERSION));
    }
}
