//! The trigger engine and its outbox: block events in, due actions out, exactly once.
//!
//! Each [`BlockEvent`] is applied in ONE SQLite transaction together with the engine's
//! stream cursor, so a crash at any point either applied an event completely (and the
//! restarted stream continues after it) or not at all (and it is applied again). An
//! action enters the outbox under a deterministic event id — `rule:txid:vout` for a
//! payment, `rule:height:H` for a height — with `INSERT OR IGNORE`, so no event fires
//! twice, whatever happens to the process.
//!
//! Payments become due only when buried under the rule's confirmations. A payment that
//! a reorg removes before that never fires (its pending entry is cancelled); one removed
//! after the action was delivered raises an alert and, if the rule has one, a
//! compensating `revert` action (`<event id>:revert`).

use std::path::Path;
use std::time::Duration;

use bitcoin::{Network, ScriptBuf};
use bitmote_chain::{BlockEvent, BlockId};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use crate::rules::{Action, Rule, RuleSet, Trigger};
use bitmote_chain::now_ms;

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("actuator database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error(transparent)]
    Rules(#[from] crate::rules::RuleError),
    #[error("corrupt actuator record: {0}")]
    Corrupt(String),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS act_cursor (k INTEGER PRIMARY KEY CHECK (k = 0), height INTEGER, hash TEXT);
CREATE TABLE IF NOT EXISTS act_payments (
    rule_id TEXT NOT NULL, txid TEXT NOT NULL, vout INTEGER NOT NULL, amount INTEGER NOT NULL,
    height INTEGER NOT NULL, block_hash TEXT NOT NULL,
    PRIMARY KEY (rule_id, txid, vout)
);
CREATE TABLE IF NOT EXISTS act_commands (
    rule_id TEXT NOT NULL, seq INTEGER NOT NULL, txid TEXT NOT NULL, command TEXT NOT NULL,
    height INTEGER NOT NULL, block_hash TEXT NOT NULL,
    PRIMARY KEY (rule_id, seq)
);
CREATE TABLE IF NOT EXISTS act_outbox (
    event_id TEXT PRIMARY KEY,
    rule_id TEXT NOT NULL,
    device TEXT NOT NULL,
    command TEXT NOT NULL,
    args TEXT NOT NULL,
    txid TEXT,
    height INTEGER NOT NULL,
    state TEXT NOT NULL,
    due_ms INTEGER NOT NULL,
    ttl_ms INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    delivered_ms INTEGER,
    acked_ms INTEGER,
    note TEXT
);
CREATE INDEX IF NOT EXISTS act_outbox_state ON act_outbox(state);
";


/// State of an outbox entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboxState {
    /// Triggered and waiting to be delivered.
    Due,
    /// Sent to the device, waiting for its acknowledgement.
    Delivered,
    /// The device acknowledged it acted.
    Acked,
    /// Delivered too late (after its TTL): not executed, reported.
    Expired,
    /// Its trigger was reorged away before it was delivered: never executed.
    Cancelled,
    /// Its trigger was reorged away after delivery (see the revert entry and the alert).
    Reverted,
}

impl OutboxState {
    fn as_str(self) -> &'static str {
        match self {
            OutboxState::Due => "due",
            OutboxState::Delivered => "delivered",
            OutboxState::Acked => "acked",
            OutboxState::Expired => "expired",
            OutboxState::Cancelled => "cancelled",
            OutboxState::Reverted => "reverted",
        }
    }
    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "due" => OutboxState::Due,
            "delivered" => OutboxState::Delivered,
            "acked" => OutboxState::Acked,
            "expired" => OutboxState::Expired,
            "cancelled" => OutboxState::Cancelled,
            "reverted" => OutboxState::Reverted,
            other => return Err(EngineError::Corrupt(format!("outbox state {other:?}"))),
        })
    }
}

/// One action in the outbox.
#[derive(Clone, Debug, Serialize)]
pub struct OutboxItem {
    pub event_id: String,
    pub rule_id: String,
    pub device: String,
    pub command: String,
    pub args: serde_json::Value,
    /// The triggering transaction, for payment rules.
    pub txid: Option<String>,
    /// Height at which it became due.
    pub height: u32,
    pub state: OutboxState,
    pub due_ms: u64,
    pub ttl_ms: Option<u64>,
    pub attempts: u32,
    pub delivered_ms: Option<u64>,
    pub acked_ms: Option<u64>,
    pub note: Option<String>,
}

/// What applying a block event did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EngineEvent {
    /// A qualifying payment was seen (not yet buried deep enough).
    PaymentSeen { rule_id: String, txid: String, vout: u32, amount: u64, height: u32 },
    /// An action became due.
    Due { event_id: String },
    /// An on-chain command for a rule was refused (bad signature, replay, not allowed).
    CommandRefused { rule_id: String, txid: String, reason: String },
    /// A pending trigger was reorged away before firing: it never fires.
    Cancelled { event_id: String },
    /// A trigger was reorged away after its action was delivered: an alert (and a revert, if any).
    Alert { event_id: String, message: String },
}

struct Watched {
    rule: Rule,
    script: Option<ScriptBuf>,
}

/// The engine over one database.
pub struct Engine {
    db: Connection,
    watched: Vec<Watched>,
}

impl Engine {
    pub fn open(path: &Path, rules: RuleSet, network: Network) -> Result<Self> {
        let db = Connection::open(path)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.busy_timeout(Duration::from_secs(30))?;
        db.execute_batch(SCHEMA)?;
        let watched = rules
            .rules
            .into_iter()
            .map(|r| Ok(Watched { script: r.watched_script(network)?, rule: r }))
            .collect::<Result<_>>()?;
        Ok(Engine { db, watched })
    }

    /// The last block applied (`None` = none yet: start the stream where you like).
    pub fn cursor(&self) -> Result<Option<BlockId>> {
        let row: Option<(u32, String)> =
            self.db.query_row("SELECT height, hash FROM act_cursor WHERE k = 0", [], |r| Ok((r.get(0)?, r.get(1)?))).optional()?;
        row.map(|(height, h)| Ok(BlockId { height, hash: h.parse().map_err(|e| EngineError::Corrupt(format!("cursor: {e}")))? }))
            .transpose()
    }

    /// Apply one block event, atomically with the cursor.
    pub fn apply(&mut self, ev: &BlockEvent) -> Result<Vec<EngineEvent>> {
        let tx = self.db.transaction()?;
        let mut out = vec![];
        let id = ev.id();
        match ev {
            BlockEvent::Connected { block, .. } => {
                for t in &block.txdata {
                    let txid = t.compute_txid().to_string();
                    for (vout, o) in t.output.iter().enumerate() {
                        for w in &self.watched {
                            let (Some(script), Trigger::Payment { min_sat, .. }) = (&w.script, &w.rule.trigger) else { continue };
                            if o.script_pubkey == *script && o.value.to_sat() >= *min_sat {
                                tx.execute(
                                    "INSERT OR REPLACE INTO act_payments (rule_id, txid, vout, amount, height, block_hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                                    params![w.rule.id, txid, vout as u32, o.value.to_sat() as i64, id.height, id.hash.to_string()],
                                )?;
                                out.push(EngineEvent::PaymentSeen {
                                    rule_id: w.rule.id.clone(),
                                    txid: txid.clone(),
                                    vout: vout as u32,
                                    amount: o.value.to_sat(),
                                    height: id.height,
                                });
                            }
                        }
                    }
                }
                // Authenticated commands for the rules' devices.
                for t in &block.txdata {
                    for o in &t.output {
                        let Some(cmd) = crate::command::decode(&o.script_pubkey) else { continue };
                        let txid = t.compute_txid().to_string();
                        for w in &self.watched {
                            let Trigger::Command { key, .. } = &w.rule.trigger else { continue };
                            let Ok(key) = key.parse::<bitmote_device::PublicKey>() else { continue };
                            if !cmd.verify(&key, &w.rule.device) {
                                continue; // not for this rule (or forged): only its key counts
                            }
                            let refuse = |reason: String| EngineEvent::CommandRefused { rule_id: w.rule.id.clone(), txid: txid.clone(), reason };
                            if w.rule.action.command != "*" && w.rule.action.command != cmd.command {
                                out.push(refuse(format!("command {:?} is not allowed by the rule (allowed: {:?})", cmd.command, w.rule.action.command)));
                                continue;
                            }
                            let last: Option<u32> = tx.query_row("SELECT MAX(seq) FROM act_commands WHERE rule_id = ?1", [&w.rule.id], |r| r.get(0))?;
                            if last.is_some_and(|l| cmd.seq <= l) {
                                out.push(refuse(format!("replayed or out-of-order sequence number {} (last {})", cmd.seq, last.unwrap_or(0))));
                                continue;
                            }
                            tx.execute(
                                "INSERT INTO act_commands (rule_id, seq, txid, command, height, block_hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                                params![w.rule.id, cmd.seq, txid, cmd.command, id.height, id.hash.to_string()],
                            )?;
                        }
                    }
                }
                // Fire what is now deep enough.
                for w in &self.watched {
                    match &w.rule.trigger {
                        Trigger::Payment { confirmations, .. } => {
                            let max_height = id.height as i64 - *confirmations as i64 + 1;
                            let due: Vec<(String, u32)> = {
                                let mut st = tx.prepare_cached("SELECT txid, vout FROM act_payments WHERE rule_id = ?1 AND height <= ?2")?;
                                let rows = st.query_map(params![w.rule.id, max_height], |r| Ok((r.get(0)?, r.get(1)?)))?;
                                rows.collect::<Result<_, _>>()?
                            };
                            for (txid, vout) in due {
                                let event_id = format!("{}:{txid}:{vout}", w.rule.id);
                                if insert_due(&tx, &event_id, &w.rule, &w.rule.action, Some(&txid), id.height)? {
                                    out.push(EngineEvent::Due { event_id });
                                }
                            }
                        }
                        Trigger::Height { height } if id.height >= *height => {
                            let event_id = format!("{}:height:{height}", w.rule.id);
                            if insert_due(&tx, &event_id, &w.rule, &w.rule.action, None, id.height)? {
                                out.push(EngineEvent::Due { event_id });
                            }
                        }
                        Trigger::Height { .. } => {}
                        Trigger::Command { confirmations, .. } => {
                            let max_height = id.height as i64 - *confirmations as i64 + 1;
                            let due: Vec<(u32, String, String)> = {
                                let mut st = tx.prepare_cached("SELECT seq, txid, command FROM act_commands WHERE rule_id = ?1 AND height <= ?2")?;
                                let rows = st.query_map(params![w.rule.id, max_height], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
                                rows.collect::<Result<_, _>>()?
                            };
                            for (seq, txid, command) in due {
                                let event_id = format!("{}:cmd:{seq}", w.rule.id);
                                let action = Action { command, args: w.rule.action.args.clone() };
                                if insert_due(&tx, &event_id, &w.rule, &action, Some(&txid), id.height)? {
                                    out.push(EngineEvent::Due { event_id });
                                }
                            }
                        }
                    }
                }
            }
            BlockEvent::Disconnected { .. } => {
                let gone: Vec<(String, String, u32)> = {
                    let mut st = tx.prepare_cached("SELECT rule_id, txid, vout FROM act_payments WHERE block_hash = ?1")?;
                    let rows = st.query_map([id.hash.to_string()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
                    rows.collect::<Result<_, _>>()?
                };
                tx.execute("DELETE FROM act_payments WHERE block_hash = ?1", [id.hash.to_string()])?;
                let gone_cmds: Vec<(String, String, u32)> = {
                    let mut st = tx.prepare_cached("SELECT rule_id, txid, seq FROM act_commands WHERE block_hash = ?1")?;
                    let rows = st.query_map([id.hash.to_string()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
                    rows.collect::<Result<_, _>>()?
                };
                tx.execute("DELETE FROM act_commands WHERE block_hash = ?1", [id.hash.to_string()])?;
                let gone = gone
                    .into_iter()
                    .map(|(r, t, v)| (format!("{r}:{t}:{v}"), r, t.clone(), format!("payment {t}:{v}")))
                    .chain(gone_cmds.into_iter().map(|(r, t, s)| (format!("{r}:cmd:{s}"), r, t.clone(), format!("command {t} (seq {s})"))));
                for (event_id, rule_id, txid, what) in gone {
                    // The same payment may confirm again in the new branch: then the entry
                    // stays as it is (same event id, no second firing).
                    let state: Option<String> =
                        tx.query_row("SELECT state FROM act_outbox WHERE event_id = ?1", [&event_id], |r| r.get(0)).optional()?;
                    match state.as_deref().map(OutboxState::parse).transpose()? {
                        None => {}
                        Some(OutboxState::Due) => {
                            tx.execute(
                                "UPDATE act_outbox SET state = 'cancelled', note = 'payment reorged out before delivery' WHERE event_id = ?1",
                                [&event_id],
                            )?;
                            out.push(EngineEvent::Cancelled { event_id });
                        }
                        Some(OutboxState::Delivered) | Some(OutboxState::Acked) => {
                            tx.execute(
                                "UPDATE act_outbox SET state = 'reverted', note = 'payment reorged out after the action' WHERE event_id = ?1",
                                [&event_id],
                            )?;
                            let rule = self.watched.iter().find(|w| w.rule.id == rule_id).map(|w| w.rule.clone());
                            let mut message = format!("{what} that triggered {event_id} was reorged out after the action");
                            if let Some(rule) = rule {
                                if let Some(revert) = &rule.revert {
                                    let revert_id = format!("{event_id}:revert");
                                    if insert_due(&tx, &revert_id, &rule, revert, Some(&txid), id.height)? {
                                        message.push_str("; revert action queued");
                                        tracing::warn!("{message}");
                                        out.push(EngineEvent::Alert { event_id, message });
                                        out.push(EngineEvent::Due { event_id: revert_id });
                                        continue;
                                    }
                                }
                            }
                            tracing::warn!("{message}");
                            out.push(EngineEvent::Alert { event_id, message });
                        }
                        Some(_) => {}
                    }
                }
            }
        }
        let cursor = ev.cursor_after();
        tx.execute(
            "INSERT OR REPLACE INTO act_cursor (k, height, hash) VALUES (0, ?1, ?2)",
            params![cursor.map(|c| c.height), cursor.map(|c| c.hash.to_string())],
        )?;
        tx.commit()?;
        Ok(out)
    }

    fn items(&self, where_: &str, p: &[&dyn rusqlite::ToSql]) -> Result<Vec<OutboxItem>> {
        let mut st = self.db.prepare(&format!(
            "SELECT event_id, rule_id, device, command, args, txid, height, state, due_ms, ttl_ms, attempts, acked_ms, note, delivered_ms
             FROM act_outbox {where_} ORDER BY due_ms, event_id"
        ))?;
        let rows = st.query_map(p, |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, Option<String>>(5)?,
                r.get::<_, u32>(6)?,
                r.get::<_, String>(7)?,
                r.get::<_, u64>(8)?,
                r.get::<_, Option<u64>>(9)?,
                r.get::<_, u32>(10)?,
                r.get::<_, Option<u64>>(11)?,
                r.get::<_, Option<String>>(12)?,
                r.get::<_, Option<u64>>(13)?,
            ))
        })?;
        let mut out = vec![];
        for row in rows {
            let (event_id, rule_id, device, command, args, txid, height, state, due_ms, ttl_ms, attempts, acked_ms, note, delivered_ms) = row?;
            out.push(OutboxItem {
                event_id,
                rule_id,
                device,
                command,
                args: serde_json::from_str(&args).map_err(|e| EngineError::Corrupt(e.to_string()))?,
                txid,
                height,
                state: OutboxState::parse(&state)?,
                due_ms,
                ttl_ms,
                attempts,
                delivered_ms,
                acked_ms,
                note,
            });
        }
        Ok(out)
    }

    /// Actions to deliver (due, or delivered and not yet acknowledged).
    pub fn pending(&self) -> Result<Vec<OutboxItem>> {
        self.items("WHERE state IN ('due', 'delivered')", &[])
    }

    /// The whole action log.
    pub fn log(&self) -> Result<Vec<OutboxItem>> {
        self.items("", &[])
    }

    pub fn get(&self, event_id: &str) -> Result<Option<OutboxItem>> {
        Ok(self.items("WHERE event_id = ?1", &[&event_id])?.into_iter().next())
    }

    /// Record a delivery attempt. Returns false (and expires the entry) when its TTL has passed.
    pub fn mark_delivered(&self, event_id: &str) -> Result<bool> {
        let now = now_ms();
        let expired = self.db.execute(
            "UPDATE act_outbox SET state = 'expired', note = 'delivered after its time-to-live; not executed'
             WHERE event_id = ?1 AND state IN ('due', 'delivered') AND ttl_ms IS NOT NULL AND due_ms + ttl_ms < ?2",
            params![event_id, now],
        )?;
        if expired > 0 {
            tracing::warn!("{event_id} expired before delivery");
            return Ok(false);
        }
        self.db.execute(
            "UPDATE act_outbox SET state = 'delivered', attempts = attempts + 1, delivered_ms = ?2 WHERE event_id = ?1 AND state IN ('due', 'delivered')",
            params![event_id, now],
        )?;
        Ok(true)
    }

    /// The device reports it did not act because the command arrived after its TTL.
    pub fn mark_expired(&self, event_id: &str, note: &str) -> Result<bool> {
        let n = self.db.execute(
            "UPDATE act_outbox SET state = 'expired', note = ?2 WHERE event_id = ?1 AND state IN ('due', 'delivered')",
            params![event_id, note],
        )?;
        Ok(n > 0)
    }

    /// The device acknowledged it acted (idempotent).
    pub fn mark_acked(&self, event_id: &str) -> Result<bool> {
        let n = self.db.execute(
            "UPDATE act_outbox SET state = 'acked', acked_ms = ?2 WHERE event_id = ?1 AND state IN ('due', 'delivered')",
            params![event_id, now_ms()],
        )?;
        Ok(n > 0)
    }
}

/// Put an action in the outbox once; returns whether it is new.
fn insert_due(tx: &rusqlite::Transaction<'_>, event_id: &str, rule: &Rule, action: &Action, txid: Option<&str>, height: u32) -> Result<bool> {
    let n = tx.execute(
        "INSERT OR IGNORE INTO act_outbox (event_id, rule_id, device, command, args, txid, height, state, due_ms, ttl_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'due', ?8, ?9)",
        params![
            event_id,
            rule.id,
            rule.device,
            action.command,
            action.args.to_string(),
            txid,
            height,
            now_ms(),
            rule.ttl_secs.map(|s| s * 1000),
        ],
    )?;
    Ok(n > 0)
}

impl OutboxState {
    pub fn name(self) -> &'static str {
        self.as_str()
    }
}
