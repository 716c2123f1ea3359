//! Durable session state of a meter or a provider (SQLite, WAL, `synchronous=FULL`).
//!
//! A tick is written before its payment is sent (meter) and before the Lightning event
//! that delivered it is acknowledged (provider), keyed by payment hash, so a process
//! killed at any point resends or re-reads exactly the same tick and nothing is
//! counted twice.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::tariff::Tariff;
use crate::tick::{Account, SessionId, Tick};
use crate::PayError;

/// Where a session stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Open,
    /// Ended normally (closed by the meter, or the session limit reached).
    Closed,
    /// The provider cut the supply (late or short payment).
    Cut,
}

/// One session as a side sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    #[serde(with = "crate::hexs")]
    pub id: SessionId,
    pub tariff: Tariff,
    /// The meter's device key (bitmote encoding, hex) and node id.
    pub meter_key: String,
    pub meter_node: String,
    pub opened_ms: u64,
    pub state: State,
    pub reason: Option<String>,
    /// Is energy flowing (provider: relay closed)?
    pub supply: bool,
    pub account: Account,
    /// When the last tick was paid (provider: received), unix ms.
    pub last_paid_ms: u64,
    /// Payments that arrived for this session but were not credited, msat.
    pub refused_msat: u64,
    pub late: u64,
    pub short: u64,
    /// Provider: the number of ticks the meter's signed close request declared paid. A
    /// declared tick still in flight at the close is credited when it arrives; any later
    /// tick is refused (the session has ended).
    #[serde(default)]
    pub final_ticks: Option<u64>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sessions (id BLOB PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ticks (
    session BLOB NOT NULL, tick INTEGER NOT NULL, payment_hash BLOB NOT NULL UNIQUE,
    amount_msat INTEGER NOT NULL, register_mwh INTEGER NOT NULL, paid_msat INTEGER NOT NULL,
    reading BLOB NOT NULL, sent_ms INTEGER NOT NULL, done_ms INTEGER, latency_us INTEGER,
    PRIMARY KEY (session, tick));
CREATE TABLE IF NOT EXISTS refusals (
    payment_hash BLOB PRIMARY KEY, session BLOB, amount_msat INTEGER NOT NULL,
    reason TEXT NOT NULL, time_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
";

/// The store.
pub struct Store {
    db: Connection,
}

/// A tick row.
#[derive(Clone, Debug, Serialize)]
pub struct TickRow {
    pub tick: Tick,
    #[serde(with = "crate::hexs")]
    pub payment_hash: [u8; 32],
    /// The signed reading (the TLV value), hex.
    pub reading: String,
    pub sent_ms: u64,
    pub done_ms: Option<u64>,
    pub latency_us: Option<u64>,
}

fn db_err(e: rusqlite::Error) -> PayError {
    PayError::Store(e.to_string())
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, PayError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| PayError::Io(dir.into(), e))?;
        }
        let db = Connection::open(path).map_err(db_err)?;
        db.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000;").map_err(db_err)?;
        db.execute_batch(SCHEMA).map_err(db_err)?;
        // Added after the first release of the schema: the notary's receipt of each
        // tick reading (meter side), as JSON.
        let has_receipt: bool = db
            .query_row("SELECT COUNT(*) FROM pragma_table_info('ticks') WHERE name = 'receipt'", [], |r| r.get::<_, i64>(0))
            .map_err(db_err)?
            > 0;
        if !has_receipt {
            db.execute_batch("ALTER TABLE ticks ADD COLUMN receipt TEXT").map_err(db_err)?;
        }
        // Added later too: whether a session is open, indexed, so that deadline checks and
        // caps cost O(open sessions), not O(every session ever stored).
        let has_open: bool = db
            .query_row("SELECT COUNT(*) FROM pragma_table_info('sessions') WHERE name = 'open'", [], |r| r.get::<_, i64>(0))
            .map_err(db_err)?
            > 0;
        let store = Store { db };
        if !has_open {
            store.db.execute_batch("ALTER TABLE sessions ADD COLUMN open INTEGER NOT NULL DEFAULT 0").map_err(db_err)?;
            for s in store.sessions()? {
                store.put_session(&s)?;
            }
        }
        store.db.execute_batch("CREATE INDEX IF NOT EXISTS sessions_open ON sessions(open)").map_err(db_err)?;
        // The meter's day total (`paid_since`, before every payment) reads one day of ticks.
        store.db.execute_batch("CREATE INDEX IF NOT EXISTS ticks_sent ON ticks(sent_ms)").map_err(db_err)?;
        Ok(store)
    }

    pub fn put_session(&self, s: &Session) -> Result<(), PayError> {
        let body = serde_json::to_string(s).expect("a session serializes");
        self.db
            .execute(
                "INSERT OR REPLACE INTO sessions (id, body, open) VALUES (?1, ?2, ?3)",
                params![&s.id[..], body, s.state == State::Open],
            )
            .map_err(db_err)?;
        Ok(())
    }

    /// The open sessions (indexed: as cheap as there are open sessions).
    pub fn open_sessions(&self) -> Result<Vec<Session>, PayError> {
        self.sessions_where("SELECT body FROM sessions WHERE open = 1")
    }

    /// The sessions a `SELECT body …` query gives.
    fn sessions_where(&self, sql: &str) -> Result<Vec<Session>, PayError> {
        let mut st = self.db.prepare_cached(sql).map_err(db_err)?;
        let rows = st.query_map([], |r| r.get::<_, String>(0)).map_err(db_err)?;
        let mut out = Vec::new();
        for b in rows {
            out.push(serde_json::from_str(&b.map_err(db_err)?).map_err(|e| PayError::Store(format!("corrupt session: {e}")))?);
        }
        Ok(out)
    }

    pub fn session(&self, id: &SessionId) -> Result<Option<Session>, PayError> {
        let body: Option<String> =
            self.db.query_row("SELECT body FROM sessions WHERE id = ?1", [&id[..]], |r| r.get(0)).optional().map_err(db_err)?;
        body.map(|b| serde_json::from_str(&b).map_err(|e| PayError::Store(format!("corrupt session: {e}")))).transpose()
    }

    pub fn sessions(&self) -> Result<Vec<Session>, PayError> {
        self.sessions_where("SELECT body FROM sessions")
    }

    /// Record a tick (meter: before sending; provider: on receipt) together with the
    /// session it changes, atomically. Returns false if the payment hash is known.
    pub fn put_tick(&mut self, s: &Session, row: &TickRow) -> Result<bool, PayError> {
        let tx = self.db.transaction().map_err(db_err)?;
        let n = tx
            .execute(
                "INSERT OR IGNORE INTO ticks (session, tick, payment_hash, amount_msat, register_mwh, paid_msat,
                 reading, sent_ms, done_ms, latency_us) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10)",
                params![
                    &s.id[..],
                    row.tick.tick as i64,
                    &row.payment_hash[..],
                    row.tick.amount_msat as i64,
                    row.tick.register_mwh as i64,
                    row.tick.paid_msat as i64,
                    row.reading,
                    row.sent_ms as i64,
                    row.done_ms.map(|x| x as i64),
                    row.latency_us.map(|x| x as i64),
                ],
            )
            .map_err(db_err)?;
        if n == 1 {
            let body = serde_json::to_string(s).expect("a session serializes");
            tx.execute(
                "INSERT OR REPLACE INTO sessions (id, body, open) VALUES (?1, ?2, ?3)",
                params![&s.id[..], body, s.state == State::Open],
            )
            .map_err(db_err)?;
        }
        tx.commit().map_err(db_err)?;
        Ok(n == 1)
    }

    /// Mark a meter's tick paid, with the session now crediting it.
    pub fn tick_done(&mut self, s: &Session, tick: u64, done_ms: u64, latency_us: u64) -> Result<(), PayError> {
        let tx = self.db.transaction().map_err(db_err)?;
        tx.execute(
            "UPDATE ticks SET done_ms = ?3, latency_us = ?4 WHERE session = ?1 AND tick = ?2",
            params![&s.id[..], tick as i64, done_ms as i64, latency_us as i64],
        )
        .map_err(db_err)?;
        let body = serde_json::to_string(s).expect("a session serializes");
        tx.execute(
            "INSERT OR REPLACE INTO sessions (id, body, open) VALUES (?1, ?2, ?3)",
            params![&s.id[..], body, s.state == State::Open],
        )
        .map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    /// Forget a meter's tick that was written but never paid (its payment failed for
    /// good, or was never sent): no money moved, and the session closes without it.
    pub fn drop_unpaid_tick(&self, session: &SessionId, tick: u64) -> Result<(), PayError> {
        self.db
            .execute("DELETE FROM ticks WHERE session = ?1 AND tick = ?2 AND done_ms IS NULL", params![&session[..], tick as i64])
            .map_err(db_err)?;
        Ok(())
    }

    /// Paid ticks whose signed reading the notary has not acknowledged yet:
    /// (session, tick, reading hex), at most `limit`, in no particular order.
    pub fn unnotarized(&self, limit: usize) -> Result<Vec<(SessionId, u64, String)>, PayError> {
        let mut st = self
            .db
            .prepare_cached("SELECT session, tick, reading FROM ticks WHERE done_ms IS NOT NULL AND receipt IS NULL LIMIT ?1")
            .map_err(db_err)?;
        let rows = st
            .query_map([limit as i64], |r| {
                let s: Vec<u8> = r.get(0)?;
                Ok((s.try_into().unwrap_or([0; 16]), r.get::<_, i64>(1)? as u64, r.get(2)?))
            })
            .map_err(db_err)?;
        rows.collect::<Result<_, _>>().map_err(db_err)
    }

    /// Store the notary's receipt (JSON) for a tick's reading.
    pub fn set_receipt(&self, session: &SessionId, tick: u64, receipt: &str) -> Result<(), PayError> {
        self.db
            .execute("UPDATE ticks SET receipt = ?3 WHERE session = ?1 AND tick = ?2", params![&session[..], tick as i64, receipt])
            .map_err(db_err)?;
        Ok(())
    }

    /// (paid ticks with a notary receipt, paid ticks without one, the newest receipt).
    pub fn receipt_counts(&self) -> Result<(u64, u64, Option<String>), PayError> {
        self.db
            .query_row(
                "SELECT COUNT(receipt), COUNT(*) - COUNT(receipt),
                        (SELECT receipt FROM ticks WHERE receipt IS NOT NULL ORDER BY rowid DESC LIMIT 1)
                 FROM ticks WHERE done_ms IS NOT NULL",
                [],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64, r.get(2)?)),
            )
            .map_err(db_err)
    }

    pub fn ticks(&self, session: &SessionId) -> Result<Vec<TickRow>, PayError> {
        self.query_ticks(session, "")
    }

    /// The tick written but not yet confirmed paid, if any (at most one: the meter
    /// pays tick by tick).
    pub fn pending_tick(&self, session: &SessionId) -> Result<Option<TickRow>, PayError> {
        Ok(self.query_ticks(session, "AND done_ms IS NULL")?.pop())
    }

    fn query_ticks(&self, session: &SessionId, filter: &str) -> Result<Vec<TickRow>, PayError> {
        let mut st = self
            .db
            .prepare(&format!(
                "SELECT payment_hash, reading, sent_ms, done_ms, latency_us, tick, register_mwh, amount_msat, paid_msat
                 FROM ticks WHERE session = ?1 {filter} ORDER BY tick"
            ))
            .map_err(db_err)?;
        let rows = st
            .query_map([&session[..]], |r| {
                let h: Vec<u8> = r.get(0)?;
                Ok(TickRow {
                    payment_hash: h.try_into().unwrap_or([0; 32]),
                    reading: r.get(1)?,
                    sent_ms: r.get::<_, i64>(2)? as u64,
                    done_ms: r.get::<_, Option<i64>>(3)?.map(|x| x as u64),
                    latency_us: r.get::<_, Option<i64>>(4)?.map(|x| x as u64),
                    tick: Tick {
                        session: *session,
                        tick: r.get::<_, i64>(5)? as u64,
                        register_mwh: r.get::<_, i64>(6)? as u64,
                        amount_msat: r.get::<_, i64>(7)? as u64,
                        paid_msat: r.get::<_, i64>(8)? as u64,
                    },
                })
            })
            .map_err(db_err)?;
        rows.collect::<Result<_, _>>().map_err(db_err)
    }

    /// Record a refused payment once (keyed by payment hash); false if already known.
    pub fn refuse(&self, hash: &[u8; 32], session: Option<&SessionId>, amount_msat: u64, reason: &str, now: u64) -> Result<bool, PayError> {
        let n = self
            .db
            .execute(
                "INSERT OR IGNORE INTO refusals (payment_hash, session, amount_msat, reason, time_ms) VALUES (?1,?2,?3,?4,?5)",
                params![&hash[..], session.map(|s| s.to_vec()), amount_msat as i64, reason, now as i64],
            )
            .map_err(db_err)?;
        Ok(n == 1)
    }

    /// Refusals, newest first: (payment hash hex, amount, reason).
    pub fn refusals(&self) -> Result<Vec<(String, u64, String)>, PayError> {
        let mut st =
            self.db.prepare("SELECT payment_hash, amount_msat, reason FROM refusals ORDER BY time_ms DESC LIMIT 100").map_err(db_err)?;
        let rows = st
            .query_map([], |r| Ok((bitmote_device::hex_encode(&r.get::<_, Vec<u8>>(0)?), r.get::<_, i64>(1)? as u64, r.get(2)?)))
            .map_err(db_err)?;
        rows.collect::<Result<_, _>>().map_err(db_err)
    }

    /// Is this payment hash a known tick or refusal?
    pub fn known_payment(&self, hash: &[u8; 32]) -> Result<bool, PayError> {
        let n: i64 = self
            .db
            .query_row(
                "SELECT (SELECT COUNT(*) FROM ticks WHERE payment_hash = ?1) + (SELECT COUNT(*) FROM refusals WHERE payment_hash = ?1)",
                [&hash[..]],
                |r| r.get(0),
            )
            .map_err(db_err)?;
        Ok(n > 0)
    }

    /// Increment and return a named counter (the meter's reading sequence).
    /// What was paid (meter) or credited (provider) in ticks sent since `since_ms`.
    pub fn paid_since(&self, since_ms: u64) -> Result<u64, PayError> {
        self.db
            .query_row(
                "SELECT COALESCE(SUM(amount_msat), 0) FROM ticks WHERE sent_ms >= ?1 AND done_ms IS NOT NULL",
                [since_ms as i64],
                |r| r.get::<_, i64>(0),
            )
            .map(|v| v as u64)
            .map_err(db_err)
    }

    /// A named counter's value, if set.
    pub fn counter(&self, name: &str) -> Result<Option<u64>, PayError> {
        self.db
            .query_row("SELECT value FROM counters WHERE name = ?1", [name], |r| r.get::<_, i64>(0))
            .optional()
            .map(|v| v.map(|v| v as u64))
            .map_err(db_err)
    }

    pub fn set_counter(&self, name: &str, value: u64) -> Result<(), PayError> {
        self.db
            .execute("INSERT OR REPLACE INTO counters (name, value) VALUES (?1, ?2)", params![name, value as i64])
            .map(|_| ())
            .map_err(db_err)
    }

    pub fn next(&self, name: &str) -> Result<u64, PayError> {
        self.db
            .query_row(
                "INSERT INTO counters (name, value) VALUES (?1, 1) ON CONFLICT(name) DO UPDATE SET value = value + 1 RETURNING value",
                [name],
                |r| r.get::<_, i64>(0),
            )
            .map(|v| v as u64)
            .map_err(db_err)
    }
}
