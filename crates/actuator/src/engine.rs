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
//!
//! Rules come from the operator's `rules.toml` (given to [`Engine::open`]) and from the
//! API ([`Engine::add_rule`]). API rules are stored in this database, not written back
//! to `rules.toml`: that file is the operator's, with their comments and layout, and
//! may be edited by hand at any time; the database is already the engine's durable state
//! (written with `synchronous=FULL`), so an added rule is durable the moment it is
//! watched, and the file is never rewritten under the operator's feet.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use bitcoin::{Network, ScriptBuf};
use bitmote_chain::{BlockEvent, BlockId};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use crate::rules::{Action, Delivery, Rule, RuleSet, Trigger};
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
    #[error("a rule {0:?} exists already")]
    RuleExists(String),
    #[error("no rule {0:?}")]
    NoSuchRule(String),
    #[error("rule {0:?} is defined in the rules file: edit the file to change it")]
    FileRule(String),
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
CREATE TABLE IF NOT EXISTS act_rules (n INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, rule TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS act_invoices (
    payment_hash TEXT PRIMARY KEY,
    rule TEXT NOT NULL,
    amount_msat INTEGER NOT NULL,
    bolt11 TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    paid_ms INTEGER,
    paid_msat INTEGER
);
";

/// Columns added to `act_outbox` after its first release (`delivery` NULL = MQTT).
/// `payment` is the triggering payment as JSON ([`Payment`]).
/// `trigger` is the rule's trigger kind; `lightning` the triggering Lightning payment as
/// JSON ([`LightningPayment`]).
const OUTBOX_COLUMNS: [(&str, &str); 5] =
    [("delivery", "TEXT"), ("confirmations", "INTEGER"), ("payment", "TEXT"), ("trigger", "TEXT"), ("lightning", "TEXT")];


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
    /// The device refused it: its own check of the trigger failed (see the note).
    Refused,
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
            OutboxState::Refused => "refused",
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
            "refused" => OutboxState::Refused,
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
    /// Why it was expired, cancelled or reverted, or why the last delivery attempt failed.
    pub note: Option<String>,
    pub delivery: Delivery,
    /// Blocks the trigger was buried under when it became due (none for heights).
    pub confirmations: Option<u32>,
    /// The payment that triggered it (payment rules), for devices that check it themselves.
    pub payment: Option<Payment>,
    /// The kind of trigger that made it due (`payment`, `height`, `command`, `lightning`;
    /// none for entries made before it was recorded).
    pub trigger: Option<String>,
    /// The Lightning payment that triggered it (Lightning rules).
    pub lightning: Option<LightningPayment>,
}

/// A Lightning payment received by the gateway's node for an invoice of a Lightning rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct LightningPayment {
    /// Hex of the payment hash (the invoice's, and the key of the action's exactly-once).
    pub payment_hash: String,
    /// What was received.
    pub amount_msat: u64,
    /// What the invoice asked for.
    pub invoice_msat: u64,
}

/// An invoice handed out for a Lightning rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Invoice {
    pub payment_hash: String,
    pub rule_id: String,
    pub device: String,
    pub amount_msat: u64,
    pub bolt11: String,
    pub created_ms: u64,
    pub expires_ms: u64,
    pub paid_ms: Option<u64>,
    pub paid_msat: Option<u64>,
}

/// A payment that triggered an action: where it is, what it pays to whom.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Payment {
    pub txid: String,
    pub vout: u32,
    pub address: String,
    pub amount_sat: u64,
    /// Height of the block that holds it.
    pub height: u32,
}

impl OutboxItem {
    /// What the device (or webhook, or program) receives. The event id is the same on
    /// every attempt, so receivers deduplicate by it.
    pub fn payload(&self) -> serde_json::Value {
        serde_json::json!({
            "event_id": self.event_id, "rule": self.rule_id, "device": self.device,
            "command": self.command, "args": self.args,
            "txid": self.txid, "height": self.height, "confirmations": self.confirmations,
            "payment": self.payment, "lightning": self.lightning, "due_ms": self.due_ms, "ttl_ms": self.ttl_ms,
        })
    }
}

/// Where a rule comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleSource {
    /// `rules.toml`
    File,
    /// Added over the API, kept in the database.
    Api,
}

/// A rule as the engine watches it.
#[derive(Clone, Debug, Serialize)]
pub struct RuleEntry {
    #[serde(flatten)]
    pub rule: Rule,
    pub source: RuleSource,
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
    /// A payment arrived for an invoice of a Lightning rule that cannot act on it.
    LightningRefused { payment_hash: String, reason: String },
}

struct Watched {
    rule: Rule,
    script: Option<ScriptBuf>,
    source: RuleSource,
}

/// The engine over one database.
pub struct Engine {
    db: Connection,
    watched: Vec<Watched>,
    network: Network,
}

impl Engine {
    /// Open the database and watch the file's `rules` and the rules added over the API.
    pub fn open(path: &Path, rules: RuleSet, network: Network) -> Result<Self> {
        let db = Connection::open(path)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.busy_timeout(Duration::from_secs(30))?;
        db.execute_batch(SCHEMA)?;
        for (col, ty) in OUTBOX_COLUMNS {
            let have: bool = db.prepare("SELECT 1 FROM pragma_table_info('act_outbox') WHERE name = ?1")?.exists([col])?;
            if !have {
                db.execute_batch(&format!("ALTER TABLE act_outbox ADD COLUMN {col} {ty}"))?;
            }
        }
        let stored: Vec<Rule> = {
            let mut st = db.prepare("SELECT rule FROM act_rules ORDER BY n")?;
            let rows = st.query_map([], |r| json_col(r, 0))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut engine = Engine { db, watched: vec![], network };
        let sources = rules.rules.into_iter().map(|r| (r, RuleSource::File)).chain(stored.into_iter().map(|r| (r, RuleSource::Api)));
        for (rule, source) in sources {
            // API rules were checked when added; a secret file gone since then must not stop
            // the gateway (delivery reports it), so only the id and the script count here.
            if engine.watched.iter().any(|w| w.rule.id == rule.id) {
                let why = "is in the rules file and was also added over the API: rename it in the file".into();
                return Err(crate::RuleError::Invalid { id: rule.id, why }.into());
            }
            engine.watch(rule, source)?;
        }
        Ok(engine)
    }

    fn watch(&mut self, rule: Rule, source: RuleSource) -> Result<()> {
        self.watched.push(Watched { script: rule.watched_script(self.network)?, rule, source });
        Ok(())
    }

    /// The rules watched now.
    pub fn rules(&self) -> Vec<RuleEntry> {
        self.watched.iter().map(|w| RuleEntry { rule: w.rule.clone(), source: w.source }).collect()
    }

    /// Check, store and watch a rule made by `make` from its number (unique, never reused:
    /// a rule id like `order-<n>` can be derived from it). It applies from the next block.
    pub fn add_rule_with(&mut self, make: impl FnOnce(u64) -> Rule) -> Result<Rule> {
        let last: Option<u64> =
            self.db.query_row("SELECT seq FROM sqlite_sequence WHERE name = 'act_rules'", [], |r| r.get(0)).optional()?;
        let n = last.unwrap_or(0) + 1;
        let rule = make(n);
        rule.check(self.network)?;
        if self.watched.iter().any(|w| w.rule.id == rule.id) {
            return Err(EngineError::RuleExists(rule.id));
        }
        let json = serde_json::to_string(&rule).map_err(|e| EngineError::Corrupt(e.to_string()))?;
        self.db.execute("INSERT INTO act_rules (n, id, rule) VALUES (?1, ?2, ?3)", params![n, rule.id, json])?;
        self.watch(rule.clone(), RuleSource::Api)?;
        Ok(rule)
    }

    pub fn add_rule(&mut self, rule: Rule) -> Result<Rule> {
        self.add_rule_with(|_| rule)
    }

    /// Stop watching an API rule and forget it. Actions it already made due stay in the
    /// outbox and are still delivered; its payments not yet buried never fire.
    pub fn remove_rule(&mut self, id: &str) -> Result<Rule> {
        let i = self.watched.iter().position(|w| w.rule.id == id).ok_or_else(|| EngineError::NoSuchRule(id.into()))?;
        if self.watched[i].source == RuleSource::File {
            return Err(EngineError::FileRule(id.into()));
        }
        self.db.execute("DELETE FROM act_rules WHERE id = ?1", [id])?;
        Ok(self.watched.remove(i).rule)
    }

    /// The Lightning rule `id` (for a payment order).
    pub fn lightning_rule(&self, id: &str) -> Result<Rule> {
        let w = self.watched.iter().find(|w| w.rule.id == id).ok_or_else(|| EngineError::NoSuchRule(id.into()))?;
        match w.rule.trigger {
            Trigger::Lightning { .. } => Ok(w.rule.clone()),
            _ => Err(crate::RuleError::Invalid { id: id.into(), why: "is not a Lightning rule (trigger kind \"lightning\")".into() }.into()),
        }
    }

    /// Remember an invoice handed out for the Lightning rule `rule` (kept with the rule
    /// as it is now, so a payment still fires it if the rule is removed meanwhile).
    pub fn add_invoice(&mut self, rule: &Rule, payment_hash: &str, bolt11: &str, amount_msat: u64, expires_ms: u64) -> Result<()> {
        let json = serde_json::to_string(rule).map_err(|e| EngineError::Corrupt(e.to_string()))?;
        self.db.execute(
            "INSERT INTO act_invoices (payment_hash, rule, amount_msat, bolt11, created_ms, expires_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![payment_hash, json, amount_msat, bolt11, now_ms(), expires_ms],
        )?;
        Ok(())
    }

    /// The invoices handed out, newest first.
    pub fn invoices(&self) -> Result<Vec<Invoice>> {
        let mut st = self.db.prepare(
            "SELECT payment_hash, rule, amount_msat, bolt11, created_ms, expires_ms, paid_ms, paid_msat FROM act_invoices ORDER BY created_ms DESC",
        )?;
        let rows = st.query_map([], |r| {
            let rule: Rule = json_col(r, 1)?;
            Ok(Invoice {
                payment_hash: r.get(0)?,
                rule_id: rule.id,
                device: rule.device,
                amount_msat: r.get(2)?,
                bolt11: r.get(3)?,
                created_ms: r.get(4)?,
                expires_ms: r.get(5)?,
                paid_ms: r.get(6)?,
                paid_msat: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The gateway's Lightning node received `amount_msat` for `payment_hash`: if that is
    /// the hash of one of our invoices, its rule's action becomes due, once — event id
    /// `rule:ln:<payment hash>`, `INSERT OR IGNORE`, in one transaction with marking the
    /// invoice paid. Call it before acknowledging the node's event: when it returns Ok the
    /// action is durable, and a replayed event (after a crash) or a second payment of the
    /// same hash changes nothing. `Ok(None)`: not an actuator invoice, or already fired.
    pub fn lightning_received(&mut self, payment_hash: &str, amount_msat: u64) -> Result<Option<EngineEvent>> {
        let tx = self.db.transaction()?;
        let row: Option<(String, u64)> = tx
            .query_row("SELECT rule, amount_msat FROM act_invoices WHERE payment_hash = ?1", [payment_hash], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        let Some((rule, invoice_msat)) = row else { return Ok(None) };
        let rule: Rule = serde_json::from_str(&rule).map_err(|e| EngineError::Corrupt(e.to_string()))?;
        tx.execute(
            "UPDATE act_invoices SET paid_ms = ?2, paid_msat = ?3 WHERE payment_hash = ?1 AND paid_ms IS NULL",
            params![payment_hash, now_ms(), amount_msat],
        )?;
        if amount_msat < invoice_msat {
            tx.commit()?;
            let reason = format!("received {amount_msat} msat for an invoice of {invoice_msat} msat; not acting");
            return Ok(Some(EngineEvent::LightningRefused { payment_hash: payment_hash.into(), reason }));
        }
        let height: u32 = tx.query_row("SELECT height FROM act_cursor WHERE k = 0", [], |r| r.get::<_, Option<u32>>(0)).optional()?.flatten().unwrap_or(0);
        let event_id = format!("{}:ln:{payment_hash}", rule.id);
        let ln = LightningPayment { payment_hash: payment_hash.into(), amount_msat, invoice_msat };
        let new = insert_due(&tx, &event_id, &rule, &rule.action, None, height, None, Some(&ln))?;
        tx.commit()?;
        Ok(new.then_some(EngineEvent::Due { event_id }))
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
                // Payment rules by the script they watch: one lookup per output.
                let mut by_script: HashMap<&ScriptBuf, Vec<&Watched>> = HashMap::new();
                for w in &self.watched {
                    if let Some(script) = &w.script {
                        by_script.entry(script).or_default().push(w);
                    }
                }
                for t in &block.txdata {
                    let mut txid = None;
                    for (vout, o) in t.output.iter().enumerate() {
                        for w in by_script.get(&o.script_pubkey).into_iter().flatten() {
                            let Trigger::Payment { min_sat, .. } = &w.rule.trigger else { continue };
                            if o.value.to_sat() >= *min_sat {
                                let txid: &str = txid.get_or_insert_with(|| t.compute_txid().to_string());
                                tx.execute(
                                    "INSERT OR REPLACE INTO act_payments (rule_id, txid, vout, amount, height, block_hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                                    params![w.rule.id, txid, vout as u32, o.value.to_sat() as i64, id.height, id.hash.to_string()],
                                )?;
                                out.push(EngineEvent::PaymentSeen {
                                    rule_id: w.rule.id.clone(),
                                    txid: txid.to_string(),
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
                // Fire what is now deep enough: payments not fired yet (one query for all rules) …
                let waiting: Vec<(String, Payment)> = {
                    let mut st = tx.prepare_cached(
                        "SELECT rule_id, txid, vout, amount, height FROM act_payments p
                         WHERE NOT EXISTS (SELECT 1 FROM act_outbox o WHERE o.event_id = p.rule_id || ':' || p.txid || ':' || p.vout)",
                    )?;
                    let rows = st.query_map([], |r| {
                        let p = Payment { txid: r.get(1)?, vout: r.get(2)?, address: String::new(), amount_sat: r.get(3)?, height: r.get(4)? };
                        Ok((r.get(0)?, p))
                    })?;
                    rows.collect::<Result<_, _>>()?
                };
                let by_id: HashMap<&str, &Watched> = self.watched.iter().map(|w| (w.rule.id.as_str(), w)).collect();
                for (rule_id, mut p) in waiting {
                    let Some(w) = by_id.get(rule_id.as_str()) else { continue };
                    let Trigger::Payment { confirmations, address, .. } = &w.rule.trigger else { continue };
                    if id.height + 1 < p.height + confirmations {
                        continue;
                    }
                    p.address = address.clone();
                    let event_id = format!("{rule_id}:{}:{}", p.txid, p.vout);
                    if insert_due(&tx, &event_id, &w.rule, &w.rule.action, Some(&p.txid), id.height, Some(&p), None)? {
                        out.push(EngineEvent::Due { event_id });
                    }
                }
                // … heights reached and commands buried deep enough.
                for w in &self.watched {
                    match &w.rule.trigger {
                        Trigger::Payment { .. } | Trigger::Lightning { .. } => {}
                        Trigger::Height { height } if id.height >= *height => {
                            let event_id = format!("{}:height:{height}", w.rule.id);
                            if insert_due(&tx, &event_id, &w.rule, &w.rule.action, None, id.height, None, None)? {
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
                                let action = Action { command, ..w.rule.action.clone() };
                                if insert_due(&tx, &event_id, &w.rule, &action, Some(&txid), id.height, None, None)? {
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
                                    if insert_due(&tx, &revert_id, &rule, revert, Some(&txid), id.height, None, None)? {
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
            "SELECT event_id, rule_id, device, command, args, txid, height, state, due_ms, ttl_ms, attempts, delivered_ms, acked_ms, note,
                    COALESCE(delivery, '\"mqtt\"'), confirmations, payment, trigger, lightning
             FROM act_outbox {where_} ORDER BY due_ms, event_id"
        ))?;
        let rows = st.query_map(p, |r| {
            Ok(OutboxItem {
                event_id: r.get(0)?,
                rule_id: r.get(1)?,
                device: r.get(2)?,
                command: r.get(3)?,
                args: json_col(r, 4)?,
                txid: r.get(5)?,
                height: r.get(6)?,
                state: OutboxState::parse(&r.get::<_, String>(7)?).map_err(|e| conversion(7, e))?,
                due_ms: r.get(8)?,
                ttl_ms: r.get(9)?,
                attempts: r.get(10)?,
                delivered_ms: r.get(11)?,
                acked_ms: r.get(12)?,
                note: r.get(13)?,
                delivery: json_col(r, 14)?,
                confirmations: r.get(15)?,
                payment: r.get::<_, Option<String>>(16)?.map(|t| serde_json::from_str(&t).map_err(|e| conversion(16, e))).transpose()?,
                trigger: r.get(17)?,
                lightning: r.get::<_, Option<String>>(18)?.map(|t| serde_json::from_str(&t).map_err(|e| conversion(18, e))).transpose()?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
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

    /// A delivery attempt failed (it is retried): say why in the log.
    pub fn mark_failed(&self, event_id: &str, why: &str) -> Result<()> {
        self.db.execute("UPDATE act_outbox SET note = ?2 WHERE event_id = ?1 AND state IN ('due', 'delivered')", params![event_id, why])?;
        Ok(())
    }

    /// The device reports it did not act because the command arrived after its TTL.
    pub fn mark_expired(&self, event_id: &str, note: &str) -> Result<bool> {
        self.close(event_id, OutboxState::Expired, note)
    }

    /// The device reports it did not act because its own check of the trigger failed.
    pub fn mark_refused(&self, event_id: &str, note: &str) -> Result<bool> {
        self.close(event_id, OutboxState::Refused, note)
    }

    fn close(&self, event_id: &str, state: OutboxState, note: &str) -> Result<bool> {
        let n = self.db.execute(
            "UPDATE act_outbox SET state = ?3, note = ?2 WHERE event_id = ?1 AND state IN ('due', 'delivered')",
            params![event_id, note, state.as_str()],
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

/// Put an action in the outbox once; returns whether it is new. Every trigger goes
/// through here — chain events from [`Engine::apply`], Lightning payments from
/// [`Engine::lightning_received`] — so they share the outbox, its delivery and its
/// exactly-once: the event id is the key (`rule:txid:vout`, `rule:height:H`,
/// `rule:cmd:seq`, `rule:ln:<payment hash>`).
#[allow(clippy::too_many_arguments)]
fn insert_due(
    tx: &rusqlite::Transaction<'_>,
    event_id: &str,
    rule: &Rule,
    action: &Action,
    txid: Option<&str>,
    height: u32,
    payment: Option<&Payment>,
    lightning: Option<&LightningPayment>,
) -> Result<bool> {
    let corrupt = |e: serde_json::Error| EngineError::Corrupt(e.to_string());
    let n = tx.execute(
        "INSERT OR IGNORE INTO act_outbox (event_id, rule_id, device, command, args, txid, height, state, due_ms, ttl_ms, delivery, confirmations, payment, trigger, lightning)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'due', ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
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
            serde_json::to_string(&action.delivery()).map_err(corrupt)?,
            rule.trigger.confirmations(),
            payment.map(serde_json::to_string).transpose().map_err(corrupt)?,
            rule.trigger.kind(),
            lightning.map(serde_json::to_string).transpose().map_err(corrupt)?,
        ],
    )?;
    Ok(n > 0)
}

fn conversion(col: usize, e: impl std::error::Error + Send + Sync + 'static) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(col, rusqlite::types::Type::Text, Box::new(e))
}

/// A JSON text column.
fn json_col<T: serde::de::DeserializeOwned>(r: &rusqlite::Row<'_>, col: usize) -> rusqlite::Result<T> {
    serde_json::from_str(&r.get::<_, String>(col)?).map_err(|e| conversion(col, e))
}

impl OutboxState {
    pub fn name(self) -> &'static str {
        self.as_str()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(id: &str, trigger: Trigger) -> Rule {
        Rule {
            id: id.into(),
            device: "lock-7".into(),
            trigger,
            action: Action { command: "unlock".into(), args: serde_json::Value::Null, webhook: None, exec: None },
            revert: None,
            ttl_secs: Some(600),
        }
    }

    #[test]
    fn a_lightning_payment_fires_its_rule_once_across_replays_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("actuator.sqlite");
        let coffee = rule("coffee", Trigger::Lightning { amount_msat: 50_000, expiry_secs: 600 });
        let lease = rule("lease", Trigger::Height { height: 900 });
        let rules = RuleSet::new(vec![coffee.clone(), lease], Network::Regtest).unwrap();
        let mut e = Engine::open(&path, rules.clone(), Network::Regtest).unwrap();

        assert_eq!(e.lightning_rule("coffee").unwrap(), coffee);
        assert!(e.lightning_rule("lease").unwrap_err().to_string().contains("not a Lightning rule"));
        assert!(matches!(e.lightning_rule("nope"), Err(EngineError::NoSuchRule(_))));

        let (h1, h2) = ("11".repeat(32), "22".repeat(32));
        e.add_invoice(&coffee, &h1, "lnbcrt1", 50_000, now_ms() + 600_000).unwrap();
        e.add_invoice(&coffee, &h2, "lnbcrt2", 50_000, now_ms() + 600_000).unwrap();
        assert!(e.add_invoice(&coffee, &h1, "lnbcrt1", 50_000, 0).is_err(), "one invoice per payment hash");

        // Not one of ours: nothing happens.
        assert_eq!(e.lightning_received(&"33".repeat(32), 50_000).unwrap(), None);
        assert!(e.log().unwrap().is_empty());

        // Paid: due once, whatever replays the node's event.
        let event_id = format!("coffee:ln:{h1}");
        assert_eq!(e.lightning_received(&h1, 50_000).unwrap(), Some(EngineEvent::Due { event_id: event_id.clone() }));
        assert_eq!(e.lightning_received(&h1, 50_000).unwrap(), None);
        drop(e);
        let mut e = Engine::open(&path, rules, Network::Regtest).unwrap();
        assert_eq!(e.lightning_received(&h1, 50_000).unwrap(), None, "after a restart too");
        let log = e.log().unwrap();
        assert_eq!(log.len(), 1);
        let a = &log[0];
        assert_eq!((a.event_id.as_str(), a.state, a.trigger.as_deref(), a.txid.as_deref()), (event_id.as_str(), OutboxState::Due, Some("lightning"), None));
        assert_eq!(a.lightning, Some(LightningPayment { payment_hash: h1.clone(), amount_msat: 50_000, invoice_msat: 50_000 }));
        assert_eq!(a.payload()["lightning"]["payment_hash"], h1.as_str());
        assert_eq!(a.ttl_ms, Some(600_000));

        // Less than the invoice asked for: refused, nothing due.
        assert!(matches!(e.lightning_received(&h2, 49_999).unwrap(), Some(EngineEvent::LightningRefused { .. })));
        assert_eq!(e.log().unwrap().len(), 1);
        let invoices = e.invoices().unwrap();
        assert_eq!(invoices.len(), 2);
        assert!(invoices.iter().all(|i| i.paid_ms.is_some() && i.rule_id == "coffee" && i.device == "lock-7"));

        // An invoice of an API rule removed since still fires (the rule is kept with it).
        let tea = rule("tea", Trigger::Lightning { amount_msat: 1_000, expiry_secs: 60 });
        e.add_rule(tea.clone()).unwrap();
        let h3 = "44".repeat(32);
        e.add_invoice(&tea, &h3, "lnbcrt3", 1_000, now_ms() + 60_000).unwrap();
        e.remove_rule("tea").unwrap();
        assert_eq!(e.lightning_received(&h3, 1_000).unwrap(), Some(EngineEvent::Due { event_id: format!("tea:ln:{h3}") }));
    }

    #[test]
    fn lightning_rules_need_an_amount_and_take_no_revert() {
        let mut r = rule("c", Trigger::Lightning { amount_msat: 0, expiry_secs: 600 });
        assert!(r.check(Network::Regtest).unwrap_err().to_string().contains("amount_msat"));
        r.trigger = Trigger::Lightning { amount_msat: 1, expiry_secs: 0 };
        assert!(r.check(Network::Regtest).unwrap_err().to_string().contains("expiry_secs"));
        r.trigger = Trigger::Lightning { amount_msat: 1, expiry_secs: 1 };
        r.revert = Some(r.action.clone());
        assert!(r.check(Network::Regtest).unwrap_err().to_string().contains("revert"));
        let text = "[[rule]]\nid = \"c\"\ndevice = \"d\"\ntrigger = { kind = \"lightning\", amount_msat = 5000 }\naction = { command = \"on\" }\n";
        let rs = RuleSet::parse(text, Network::Regtest).unwrap();
        assert_eq!(rs.rules[0].trigger, Trigger::Lightning { amount_msat: 5000, expiry_secs: 600 });
    }
}
