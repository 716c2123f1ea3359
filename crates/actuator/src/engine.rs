//! The trigger engine and its outbox: block events in, due actions out, exactly once.
//!
//! Each [`BlockEvent`] is applied in ONE SQLite transaction together with the engine's
//! stream cursor, so a crash at any point either applied an event completely (and the
//! restarted stream continues after it) or not at all (and it is applied again). An
//! action enters the outbox under a deterministic event id — `rule:txid:vout` for a
//! payment, `rule:height:H` for a height — with `INSERT OR IGNORE`, so no event fires
//! twice, whatever happens to the process.
//!
//! Payments become due only when buried under the rule's confirmations, and an action
//! stands exactly while its trigger is final on the best chain ([`reconcile`]): a trigger
//! a reorg takes away before delivery cancels its action; one taken away after it raises
//! an alert and, if the rule has one, a compensating `revert` action
//! (`<event id>:revert`); a trigger that comes back (mined again in the new branch, height
//! reached again) cancels a revert not yet delivered, or fires again under a new event id
//! (`<key>:g2`, …) once the device has executed the revert.
//!
//! Lightning rules use held invoices: [`Engine::lightning_claimable`] makes the action due
//! when the payment is claimable, and [`Engine::claims_to_settle`] says when to claim it
//! (the device acknowledged) or fail it back (refused, expired, underpaid, claim deadline).
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
pub use bitmote_proto::actuator::{ClaimState, Command, LightningPayment, Payment};

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

/// Time a block is assumed to take when a Lightning action's time-to-live is clamped to
/// its claim deadline (a height): Bitcoin's target spacing. Blocks may come faster (always
/// on regtest with fast mining), so the deadline is also enforced by height.
pub const BLOCK_SPACING_MS: u64 = 600_000;

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

/// Columns added to `act_invoices` for held invoices: `preimage` (hex, stored before the
/// invoice is handed out; NULL = an invoice claimed on arrival, made before holding), what
/// is claimable and until which block, and how it was settled (`claimed` / `failed_back`).
const INVOICE_COLUMNS: [(&str, &str); 6] = [
    ("preimage", "TEXT"),
    ("claimable_msat", "INTEGER"),
    ("claim_deadline", "INTEGER"),
    ("settled", "TEXT"),
    ("settled_ms", "INTEGER"),
    ("settle_note", "TEXT"),
];

/// Columns added to `act_outbox` after its first release (`delivery` NULL = MQTT).
/// `payment` is the triggering payment as JSON ([`Payment`]).
/// `trigger` is the rule's trigger kind; `lightning` the triggering Lightning payment as
/// JSON ([`LightningPayment`]). `trigger_key` names the trigger (the first generation's
/// event id), `generation` counts its actions (a trigger back after its revert executed
/// fires again under a new event id), `reverts` is, on a revert, the action it reverts.
const OUTBOX_COLUMNS: [(&str, &str); 8] = [
    ("delivery", "TEXT"),
    ("confirmations", "INTEGER"),
    ("payment", "TEXT"),
    ("trigger", "TEXT"),
    ("lightning", "TEXT"),
    ("trigger_key", "TEXT"),
    ("generation", "INTEGER"),
    ("reverts", "TEXT"),
];

/// Entries made before `trigger_key` existed: an action's event id is its trigger key, a
/// revert's is `<action>:revert`.
const OUTBOX_MIGRATE: &str = "
UPDATE act_outbox SET reverts = substr(event_id, 1, length(event_id) - 7) WHERE trigger_key IS NULL AND event_id LIKE '%:revert';
UPDATE act_outbox SET trigger_key = COALESCE(reverts, event_id), generation = 1 WHERE trigger_key IS NULL;
CREATE INDEX IF NOT EXISTS act_outbox_trigger ON act_outbox(trigger_key);
CREATE INDEX IF NOT EXISTS act_outbox_reverts ON act_outbox(reverts);
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
    /// The trigger it is for: the event id of its first action (`rule:txid:vout`, …).
    pub trigger_key: Option<String>,
    /// Its generation: 1, or n when its trigger came back after n - 1 executed reverts.
    pub generation: Option<u32>,
    /// For a revert, the event id of the action it reverts.
    pub reverts: Option<String>,
}

/// What to do with a held Lightning payment ([`Engine::claims_to_settle`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settle {
    pub payment_hash: String,
    /// What is claimable.
    pub amount_msat: u64,
    /// Hex of the preimage, kept since the invoice was made.
    pub preimage: String,
    /// Claim it (the action was acknowledged), or fail it back (and why).
    pub claim: bool,
    pub why: String,
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

impl OutboxItem {
    /// What the device (or webhook, or program) receives. The event id is the same on
    /// every attempt, so receivers deduplicate by it.
    pub fn payload(&self) -> Command {
        Command {
            v: Default::default(),
            event_id: self.event_id.clone(),
            rule: self.rule_id.clone(),
            device: self.device.clone(),
            command: self.command.clone(),
            args: self.args.clone(),
            txid: self.txid.clone(),
            height: self.height,
            confirmations: self.confirmations,
            payment: self.payment.clone(),
            lightning: self.lightning.clone(),
            due_ms: Some(self.due_ms),
            ttl_ms: self.ttl_ms,
            reverts: self.reverts.clone(),
        }
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
    /// A reverted action's trigger is final on the best chain again before any revert of
    /// it executed (its revert, if any, is cancelled): the action stands again.
    Restored { event_id: String, message: String },
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
    /// API rules removed since: they fire nothing new, but what they already did is still
    /// reverted if its trigger leaves the best chain, and stands again if it comes back.
    retired: Vec<Watched>,
    network: Network,
    /// The gateway's identity (its log origin), which on-chain commands are signed for.
    gateway: String,
}

impl Engine {
    /// Open the database and watch the file's `rules` and the rules added over the API,
    /// for the gateway whose log origin is `gateway` on `network`.
    pub fn open(path: &Path, rules: RuleSet, network: Network, gateway: &str) -> Result<Self> {
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
        db.execute_batch(OUTBOX_MIGRATE)?;
        for (col, ty) in INVOICE_COLUMNS {
            let have: bool = db.prepare("SELECT 1 FROM pragma_table_info('act_invoices') WHERE name = ?1")?.exists([col])?;
            if !have {
                db.execute_batch(&format!("ALTER TABLE act_invoices ADD COLUMN {col} {ty}"))?;
            }
        }
        for col in ["key", "device"] {
            let have: bool = db.prepare("SELECT 1 FROM pragma_table_info('act_commands') WHERE name = ?1")?.exists([col])?;
            if !have {
                db.execute_batch(&format!("ALTER TABLE act_commands ADD COLUMN {col} TEXT"))?;
            }
        }
        db.execute_batch("CREATE INDEX IF NOT EXISTS act_commands_key ON act_commands(key, device, seq)")?;
        let removed_col: bool = db.prepare("SELECT 1 FROM pragma_table_info('act_rules') WHERE name = 'removed'")?.exists([])?;
        if !removed_col {
            db.execute_batch("ALTER TABLE act_rules ADD COLUMN removed INTEGER NOT NULL DEFAULT 0")?;
        }
        let load = |removed: bool| -> Result<Vec<Rule>> {
            let mut st = db.prepare("SELECT rule FROM act_rules WHERE removed = ?1 ORDER BY n")?;
            let rows = st.query_map([removed], |r| json_col(r, 0))?;
            Ok(rows.collect::<Result<_, _>>()?)
        };
        let (stored, retired) = (load(false)?, load(true)?);
        let retired = retired
            .into_iter()
            .map(|rule| Ok(Watched { script: rule.watched_script(network)?, rule, source: RuleSource::Api }))
            .collect::<Result<_>>()?;
        let mut engine = Engine { db, watched: vec![], retired, network, gateway: gateway.to_string() };
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
        // A removed rule's id may be used again: the new rule replaces the old for good.
        self.db.execute("DELETE FROM act_rules WHERE id = ?1 AND removed = 1", [&rule.id])?;
        self.retired.retain(|w| w.rule.id != rule.id);
        self.db.execute("INSERT INTO act_rules (n, id, rule) VALUES (?1, ?2, ?3)", params![n, rule.id, json])?;
        self.watch(rule.clone(), RuleSource::Api)?;
        Ok(rule)
    }

    pub fn add_rule(&mut self, rule: Rule) -> Result<Rule> {
        self.add_rule_with(|_| rule)
    }

    /// Stop watching an API rule. Actions it already made due stay in the outbox and are
    /// still delivered; its payments not yet buried never fire. What it already did is
    /// still reconciled with the best chain (reverted if its trigger is reorged out, standing
    /// again if it comes back), however deep the reorg: the rule is kept as retired.
    pub fn remove_rule(&mut self, id: &str) -> Result<Rule> {
        let i = self.watched.iter().position(|w| w.rule.id == id).ok_or_else(|| EngineError::NoSuchRule(id.into()))?;
        if self.watched[i].source == RuleSource::File {
            return Err(EngineError::FileRule(id.into()));
        }
        self.db.execute("UPDATE act_rules SET removed = 1 WHERE id = ?1", [id])?;
        let w = self.watched.remove(i);
        let rule = w.rule.clone();
        self.retired.push(w);
        Ok(rule)
    }

    /// The rule `id` for reconciling a trigger: watched (`true`), or retired (`false`).
    fn rule_for(&self, id: &str) -> Option<(&Rule, bool)> {
        rule_for(&self.watched, &self.retired, id)
    }

    /// The Lightning rule `id` (for a payment order).
    pub fn lightning_rule(&self, id: &str) -> Result<Rule> {
        let w = self.watched.iter().find(|w| w.rule.id == id).ok_or_else(|| EngineError::NoSuchRule(id.into()))?;
        match w.rule.trigger {
            Trigger::Lightning { .. } => Ok(w.rule.clone()),
            _ => {
                Err(crate::RuleError::Invalid { id: id.into(), why: "is not a Lightning rule (trigger kind \"lightning\")".into() }.into())
            }
        }
    }

    /// Remember an invoice handed out for the Lightning rule `rule` (kept with the rule
    /// as it is now, so a payment still fires it if the rule is removed meanwhile).
    ///
    /// `preimage` (hex) is that of a held invoice (`receive_for_hash`): kept here, durable
    /// before the invoice is handed out, so the payment can be claimed after any restart —
    /// once its action is acknowledged ([`Engine::claims_to_settle`]).
    pub fn add_invoice(
        &mut self,
        rule: &Rule,
        payment_hash: &str,
        bolt11: &str,
        amount_msat: u64,
        expires_ms: u64,
        preimage: Option<&str>,
    ) -> Result<()> {
        let json = serde_json::to_string(rule).map_err(|e| EngineError::Corrupt(e.to_string()))?;
        self.db.execute(
            "INSERT INTO act_invoices (payment_hash, rule, amount_msat, bolt11, created_ms, expires_ms, preimage) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![payment_hash, json, amount_msat, bolt11, now_ms(), expires_ms, preimage],
        )?;
        Ok(())
    }

    /// The gateway's node holds `amount_msat` for `payment_hash` (ldk-node's
    /// `PaymentClaimable`), claimable until block `claim_deadline`: if that is one of our
    /// held invoices, its rule's action becomes due, once (`rule:ln:<hash>`), in one
    /// transaction with recording what is claimable. Its time-to-live is clamped to end
    /// before the claim deadline (one block early, at [`BLOCK_SPACING_MS`] a block; the note
    /// says so), and [`Engine::claims_to_settle`] expires it anyway once the chain is one
    /// block short of the deadline. Call it before acknowledging the node's event; a
    /// replayed event changes nothing. Underpaid: `LightningRefused`, failed back.
    pub fn lightning_claimable(
        &mut self,
        payment_hash: &str,
        amount_msat: u64,
        claim_deadline: Option<u32>,
    ) -> Result<Option<EngineEvent>> {
        let tx = self.db.transaction()?;
        let row: Option<(String, u64, Option<String>)> = tx
            .query_row("SELECT rule, amount_msat, preimage FROM act_invoices WHERE payment_hash = ?1", [payment_hash], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        let Some((rule, invoice_msat, Some(_))) = row else { return Ok(None) };
        let rule: Rule = serde_json::from_str(&rule).map_err(|e| EngineError::Corrupt(e.to_string()))?;
        tx.execute(
            "UPDATE act_invoices SET claimable_msat = ?2, claim_deadline = ?3, paid_ms = COALESCE(paid_ms, ?4), paid_msat = ?2
             WHERE payment_hash = ?1 AND settled IS NULL",
            params![payment_hash, amount_msat, claim_deadline, now_ms()],
        )?;
        if amount_msat < invoice_msat {
            tx.commit()?;
            let reason = format!("received {amount_msat} msat for an invoice of {invoice_msat} msat; not acting, failing it back");
            return Ok(Some(EngineEvent::LightningRefused { payment_hash: payment_hash.into(), reason }));
        }
        let height: u32 = tx
            .query_row("SELECT height FROM act_cursor WHERE k = 0", [], |r| r.get::<_, Option<u32>>(0))
            .optional()?
            .flatten()
            .unwrap_or(0);
        let event_id = format!("{}:ln:{payment_hash}", rule.id);
        let ln = LightningPayment {
            payment_hash: payment_hash.into(),
            amount_msat,
            invoice_msat,
            claim_deadline,
            claim: Some(ClaimState::Held),
        };
        let new = NewAction {
            event_id: &event_id,
            rule: &rule,
            action: &rule.action,
            txid: None,
            height,
            payment: None,
            lightning: Some(&ln),
            trigger_key: &event_id,
            generation: 1,
            reverts: None,
        };
        let new = insert_due(&tx, &new)?;
        if let (true, Some(deadline)) = (new, claim_deadline) {
            // Blocks left before LDK fails it back, less one: the time they take, at most.
            let blocks = deadline.saturating_sub(height).saturating_sub(1) as u64;
            let limit = blocks.saturating_mul(BLOCK_SPACING_MS);
            let ttl = rule.ttl_secs.map(|s| s.saturating_mul(1000));
            if ttl.is_none_or(|t| t > limit) {
                let note = format!(
                    "time-to-live clamped to {} s: the payment must be claimed before block {deadline}, when the node fails it back",
                    limit / 1000
                );
                tx.execute("UPDATE act_outbox SET ttl_ms = ?2, note = ?3 WHERE event_id = ?1", params![event_id, limit, note])?;
            }
        }
        tx.commit()?;
        Ok(new.then_some(EngineEvent::Due { event_id }))
    }

    /// Held Lightning payments to settle now: claim those whose action the device
    /// acknowledged; fail back those underpaid, refused, expired or cancelled, and those
    /// still unacknowledged when the chain is one block short of their claim deadline
    /// (their action is expired first, so it is not delivered again). Record the outcome
    /// with [`Engine::mark_settled`]; until then the same answer comes again (after a
    /// restart too: nothing here is lost).
    pub fn claims_to_settle(&mut self) -> Result<Vec<Settle>> {
        let tx = self.db.transaction()?;
        let tip: Option<u32> =
            tx.query_row("SELECT height FROM act_cursor WHERE k = 0", [], |r| r.get::<_, Option<u32>>(0)).optional()?.flatten();
        let held: Vec<(String, String, u64, u64, Option<u32>, String)> = {
            let mut st = tx.prepare_cached(
                "SELECT payment_hash, rule, amount_msat, claimable_msat, claim_deadline, preimage FROM act_invoices
                 WHERE claimable_msat IS NOT NULL AND settled IS NULL AND preimage IS NOT NULL",
            )?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut out = vec![];
        for (payment_hash, rule, invoice_msat, amount_msat, deadline, preimage) in held {
            let rule: Rule = serde_json::from_str(&rule).map_err(|e| EngineError::Corrupt(e.to_string()))?;
            let event_id = format!("{}:ln:{payment_hash}", rule.id);
            let state: Option<(String, Option<String>)> = tx
                .query_row("SELECT state, note FROM act_outbox WHERE event_id = ?1", [&event_id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let state = state.map(|(s, n)| OutboxState::parse(&s).map(|s| (s, n))).transpose()?;
            let settle = |claim: bool, why: String| Settle {
                payment_hash: payment_hash.clone(),
                amount_msat,
                preimage: preimage.clone(),
                claim,
                why,
            };
            let decision = match state {
                _ if amount_msat < invoice_msat => Some(settle(false, format!("underpaid: {amount_msat} msat for {invoice_msat}"))),
                None => Some(settle(false, "no action for it".into())),
                Some((OutboxState::Acked, _)) => Some(settle(true, "the device acknowledged the action".into())),
                Some((OutboxState::Due | OutboxState::Delivered, _)) => match (deadline, tip) {
                    (Some(d), Some(t)) if t as u64 + 1 >= d as u64 => {
                        let note = format!("not acknowledged one block before the payment's claim deadline (block {d}): not to be executed; payment failed back");
                        tx.execute(
                            "UPDATE act_outbox SET state = 'expired', note = ?2 WHERE event_id = ?1 AND state IN ('due', 'delivered')",
                            params![event_id, note],
                        )?;
                        Some(settle(false, note))
                    }
                    _ => None,
                },
                Some((s, note)) => {
                    Some(settle(false, format!("the action was {}{}", s.as_str(), note.map(|n| format!(": {n}")).unwrap_or_default())))
                }
            };
            out.extend(decision);
        }
        tx.commit()?;
        Ok(out)
    }

    /// A held payment was claimed (`claimed`) or failed back: recorded with the invoice and
    /// shown with its action (`lightning.claim`, and the note for a failed-back one).
    pub fn mark_settled(&mut self, payment_hash: &str, claimed: bool, note: &str) -> Result<()> {
        let tx = self.db.transaction()?;
        let state = if claimed { ClaimState::Claimed } else { ClaimState::FailedBack };
        let name = if claimed { "claimed" } else { "failed_back" };
        tx.execute(
            "UPDATE act_invoices SET settled = ?2, settled_ms = ?3, settle_note = ?4 WHERE payment_hash = ?1 AND settled IS NULL",
            params![payment_hash, name, now_ms(), note],
        )?;
        let rows: Vec<(String, String, Option<String>)> = {
            let mut st = tx.prepare_cached("SELECT event_id, lightning, note FROM act_outbox WHERE trigger = 'lightning' AND lightning IS NOT NULL AND event_id LIKE ?1")?;
            let rows = st.query_map([format!("%:ln:{payment_hash}")], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        for (event_id, ln, old) in rows {
            let mut ln: LightningPayment = serde_json::from_str(&ln).map_err(|e| EngineError::Corrupt(e.to_string()))?;
            ln.claim = Some(state);
            let ln = serde_json::to_string(&ln).map_err(|e| EngineError::Corrupt(e.to_string()))?;
            let note = match (claimed, old) {
                (true, old) => old,
                (false, Some(old)) => Some(format!("{old}; payment failed back: {note}")),
                (false, None) => Some(format!("payment failed back: {note}")),
            };
            tx.execute("UPDATE act_outbox SET lightning = ?2, note = ?3 WHERE event_id = ?1", params![event_id, ln, note])?;
        }
        tx.commit()?;
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
            .query_row("SELECT rule, amount_msat FROM act_invoices WHERE payment_hash = ?1", [payment_hash], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let Some((rule, invoice_msat)) = row else { return Ok(None) };
        let rule: Rule = serde_json::from_str(&rule).map_err(|e| EngineError::Corrupt(e.to_string()))?;
        tx.execute(
            "UPDATE act_invoices SET paid_ms = ?2, paid_msat = ?3 WHERE payment_hash = ?1 AND paid_ms IS NULL",
            params![payment_hash, now_ms(), amount_msat],
        )?;
        let held: bool =
            tx.query_row("SELECT preimage IS NOT NULL FROM act_invoices WHERE payment_hash = ?1", [payment_hash], |r| r.get(0))?;
        if held {
            // A held invoice: its action was made due when it became claimable; this is the
            // claim (made after the acknowledgement) completing.
            tx.commit()?;
            return Ok(None);
        }
        if amount_msat < invoice_msat {
            tx.commit()?;
            let reason = format!("received {amount_msat} msat for an invoice of {invoice_msat} msat; not acting");
            return Ok(Some(EngineEvent::LightningRefused { payment_hash: payment_hash.into(), reason }));
        }
        let height: u32 = tx
            .query_row("SELECT height FROM act_cursor WHERE k = 0", [], |r| r.get::<_, Option<u32>>(0))
            .optional()?
            .flatten()
            .unwrap_or(0);
        let event_id = format!("{}:ln:{payment_hash}", rule.id);
        let ln = LightningPayment { payment_hash: payment_hash.into(), amount_msat, invoice_msat, claim_deadline: None, claim: None };
        let new = NewAction {
            event_id: &event_id,
            rule: &rule,
            action: &rule.action,
            txid: None,
            height,
            payment: None,
            lightning: Some(&ln),
            trigger_key: &event_id,
            generation: 1,
            reverts: None,
        };
        let new = insert_due(&tx, &new)?;
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
    ///
    /// After it, every trigger whose finality this block changed is reconciled with the
    /// outbox ([`reconcile`]): an action stands exactly while its trigger is final on the
    /// best chain. Apply a reorg's events together before delivering (the gateway's loop
    /// drains the stream first): a trigger that loses finality and regains it within one
    /// batch then costs the device nothing (its undelivered revert is cancelled).
    pub fn apply(&mut self, ev: &BlockEvent) -> Result<Vec<EngineEvent>> {
        let tx = self.db.transaction()?;
        let mut out = vec![];
        let id = ev.id();
        let tip = ev.cursor_after().map(|c| c.height);
        // (rule id, trigger key) to reconcile after this event.
        let mut touched: Vec<(String, String)> = vec![];
        match ev {
            BlockEvent::Connected { block, .. } => {
                // Payment rules by the script they watch: one lookup per output.
                // Retired rules too, for payments they already acted on that come back.
                let mut by_script: HashMap<&ScriptBuf, Vec<(&Watched, bool)>> = HashMap::new();
                for (w, active) in self.watched.iter().map(|w| (w, true)).chain(self.retired.iter().map(|w| (w, false))) {
                    if let Some(script) = &w.script {
                        by_script.entry(script).or_default().push((w, active));
                    }
                }
                for t in &block.txdata {
                    let mut txid = None;
                    for (vout, o) in t.output.iter().enumerate() {
                        for (w, active) in by_script.get(&o.script_pubkey).into_iter().flatten() {
                            let Trigger::Payment { min_sat, .. } = &w.rule.trigger else { continue };
                            if o.value.to_sat() >= *min_sat {
                                let txid: &str = txid.get_or_insert_with(|| t.compute_txid().to_string());
                                if !active && !acted_on(&tx, &format!("{}:{txid}:{vout}", w.rule.id))? {
                                    continue;
                                }
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
                        for (w, active) in self.watched.iter().map(|w| (w, true)).chain(self.retired.iter().map(|w| (w, false))) {
                            let Trigger::Command { key: key_hex, domain: Some(domain), .. } = &w.rule.trigger else { continue };
                            if !active && !acted_on(&tx, &format!("{}:cmd:{}", w.rule.id, cmd.seq))? {
                                continue;
                            }
                            let Ok(key) = key_hex.parse::<bitmote_device::PublicKey>() else { continue };
                            let scope =
                                crate::command::Scope { network: self.network, gateway: &self.gateway, domain, device: &w.rule.device };
                            if !cmd.verify(&key, &scope) {
                                continue; // not for this rule (forged, or signed for another context)
                            }
                            let refuse =
                                |reason: String| EngineEvent::CommandRefused { rule_id: w.rule.id.clone(), txid: txid.clone(), reason };
                            if id.height > cmd.expires {
                                out.push(refuse(format!("command {} expired at height {}, mined at {}", cmd.seq, cmd.expires, id.height)));
                                continue;
                            }
                            if w.rule.action.command != "*" && w.rule.action.command != cmd.command {
                                out.push(refuse(format!(
                                    "command {:?} is not allowed by the rule (allowed: {:?})",
                                    cmd.command, w.rule.action.command
                                )));
                                continue;
                            }
                            // Sequence numbers go up per (key, device), whichever rule took
                            // the command: a rule renamed or added again starts from there.
                            // Only the commands on the best chain count: one whose block a
                            // reorg disconnected is gone from this table, so the same command
                            // mined again in the new branch is accepted (and is the same
                            // trigger, `rule:cmd:seq`: it takes effect once). Two rules
                            // taking the same command (the same transaction) both act on it.
                            let last: Option<u32> = tx.query_row(
                                "SELECT MAX(seq) FROM act_commands WHERE key = ?1 AND device = ?2 AND txid != ?3",
                                params![key_hex, w.rule.device, txid],
                                |r| r.get(0),
                            )?;
                            if last.is_some_and(|l| cmd.seq <= l) {
                                out.push(refuse(format!(
                                    "replayed or out-of-order sequence number {} (last {})",
                                    cmd.seq,
                                    last.unwrap_or(0)
                                )));
                                continue;
                            }
                            tx.execute(
                                "INSERT OR IGNORE INTO act_commands (rule_id, seq, txid, command, height, block_hash, key, device) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                                params![w.rule.id, cmd.seq, txid, cmd.command, id.height, id.hash.to_string(), key_hex, w.rule.device],
                            )?;
                        }
                    }
                }
                // What is final now and has no action standing or closed (never fired, or
                // cancelled or reverted by a reorg and back since): one query per rule.
                let tip = id.height as i64;
                for w in self.watched.iter().chain(self.retired.iter()) {
                    let rid = &w.rule.id;
                    match &w.rule.trigger {
                        Trigger::Payment { confirmations, .. } => {
                            let mut st = tx.prepare_cached(
                                "SELECT txid, vout FROM act_payments p WHERE rule_id = ?1 AND height + ?2 <= ?3 + 1
                                 AND NOT EXISTS (SELECT 1 FROM act_outbox o WHERE o.trigger_key = p.rule_id || ':' || p.txid || ':' || p.vout
                                                 AND o.reverts IS NULL AND o.state IN ('due', 'delivered', 'acked', 'expired', 'refused'))",
                            )?;
                            let rows = st.query_map(params![rid, confirmations, tip], |r| {
                                Ok(format!("{rid}:{}:{}", r.get::<_, String>(0)?, r.get::<_, u32>(1)?))
                            })?;
                            for k in rows {
                                touched.push((rid.clone(), k?));
                            }
                        }
                        Trigger::Command { confirmations, .. } => {
                            let mut st = tx.prepare_cached(
                                "SELECT seq FROM act_commands c WHERE rule_id = ?1 AND height + ?2 <= ?3 + 1
                                 AND NOT EXISTS (SELECT 1 FROM act_outbox o WHERE o.trigger_key = c.rule_id || ':cmd:' || c.seq
                                                 AND o.reverts IS NULL AND o.state IN ('due', 'delivered', 'acked', 'expired', 'refused'))",
                            )?;
                            let rows =
                                st.query_map(params![rid, confirmations, tip], |r| Ok(format!("{rid}:cmd:{}", r.get::<_, u32>(0)?)))?;
                            for k in rows {
                                touched.push((rid.clone(), k?));
                            }
                        }
                        Trigger::Height { height } if id.height >= *height => touched.push((rid.clone(), format!("{rid}:height:{height}"))),
                        Trigger::Height { .. } | Trigger::Lightning { .. } => {}
                    }
                }
            }
            BlockEvent::Disconnected { .. } => {
                // Triggers in this block leave the best chain …
                let hash = id.hash.to_string();
                {
                    let mut st = tx.prepare_cached("SELECT rule_id, txid, vout FROM act_payments WHERE block_hash = ?1")?;
                    let rows = st.query_map([&hash], |r| {
                        let rule: String = r.get(0)?;
                        Ok((rule.clone(), format!("{rule}:{}:{}", r.get::<_, String>(1)?, r.get::<_, u32>(2)?)))
                    })?;
                    for k in rows {
                        touched.push(k?);
                    }
                    let mut st = tx.prepare_cached("SELECT rule_id, seq FROM act_commands WHERE block_hash = ?1")?;
                    let rows = st.query_map([&hash], |r| {
                        let rule: String = r.get(0)?;
                        Ok((rule.clone(), format!("{rule}:cmd:{}", r.get::<_, u32>(1)?)))
                    })?;
                    for k in rows {
                        touched.push(k?);
                    }
                }
                tx.execute("DELETE FROM act_payments WHERE block_hash = ?1", [&hash])?;
                tx.execute("DELETE FROM act_commands WHERE block_hash = ?1", [&hash])?;
                // … and those this block made final are final no more (buried one block
                // less, or below their height again).
                let h = id.height as i64;
                for w in self.watched.iter().chain(self.retired.iter()) {
                    let rid = &w.rule.id;
                    match &w.rule.trigger {
                        Trigger::Payment { confirmations, .. } => {
                            let mut st =
                                tx.prepare_cached("SELECT txid, vout FROM act_payments WHERE rule_id = ?1 AND height + ?2 - 1 = ?3")?;
                            let rows = st.query_map(params![rid, confirmations, h], |r| {
                                Ok(format!("{rid}:{}:{}", r.get::<_, String>(0)?, r.get::<_, u32>(1)?))
                            })?;
                            for k in rows {
                                touched.push((rid.clone(), k?));
                            }
                        }
                        Trigger::Command { confirmations, .. } => {
                            let mut st = tx.prepare_cached("SELECT seq FROM act_commands WHERE rule_id = ?1 AND height + ?2 - 1 = ?3")?;
                            let rows =
                                st.query_map(params![rid, confirmations, h], |r| Ok(format!("{rid}:cmd:{}", r.get::<_, u32>(0)?)))?;
                            for k in rows {
                                touched.push((rid.clone(), k?));
                            }
                        }
                        Trigger::Height { height } if *height == id.height => touched.push((rid.clone(), format!("{rid}:height:{height}"))),
                        Trigger::Height { .. } | Trigger::Lightning { .. } => {}
                    }
                }
            }
        }
        for (rule_id, key) in touched {
            let (rule, active) = rule_for(&self.watched, &self.retired, &rule_id).map_or((None, false), |(r, a)| (Some(r), a));
            let found = lookup(&tx, rule, &key, tip)?;
            reconcile(&tx, rule, active, &key, found.as_ref(), id.height, &mut out)?;
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
                    COALESCE(delivery, '\"mqtt\"'), confirmations, payment, trigger, lightning, trigger_key, generation, reverts
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
                trigger_key: r.get(19)?,
                generation: r.get(20)?,
                reverts: r.get(21)?,
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
        let tx = self.db.unchecked_transaction()?;
        let expired = tx.execute(
            "UPDATE act_outbox SET state = 'expired', note = 'delivered after its time-to-live; not executed'
             WHERE event_id = ?1 AND state IN ('due', 'delivered') AND ttl_ms IS NOT NULL AND due_ms + ttl_ms < ?2",
            params![event_id, now],
        )?;
        if expired > 0 {
            tracing::warn!("{event_id} expired before delivery");
            self.after_revert(&tx, event_id)?;
            tx.commit()?;
            return Ok(false);
        }
        tx.execute(
            "UPDATE act_outbox SET state = 'delivered', attempts = attempts + 1, delivered_ms = ?2 WHERE event_id = ?1 AND state IN ('due', 'delivered')",
            params![event_id, now],
        )?;
        tx.commit()?;
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
        let tx = self.db.unchecked_transaction()?;
        let n = tx.execute(
            "UPDATE act_outbox SET state = ?3, note = ?2 WHERE event_id = ?1 AND state IN ('due', 'delivered')",
            params![event_id, note, state.as_str()],
        )?;
        if n > 0 {
            self.after_revert(&tx, event_id)?;
        }
        tx.commit()?;
        Ok(n > 0)
    }

    /// The device acknowledged it acted (idempotent). An acknowledgement of an action
    /// reverted meanwhile is recorded too (`acked_ms`: it did run, and its revert follows).
    pub fn mark_acked(&self, event_id: &str) -> Result<bool> {
        let tx = self.db.unchecked_transaction()?;
        let n = tx.execute(
            "UPDATE act_outbox SET state = 'acked', acked_ms = ?2 WHERE event_id = ?1 AND state IN ('due', 'delivered')",
            params![event_id, now_ms()],
        )?;
        tx.execute(
            "UPDATE act_outbox SET acked_ms = ?2 WHERE event_id = ?1 AND state = 'reverted' AND acked_ms IS NULL",
            params![event_id, now_ms()],
        )?;
        if n > 0 {
            self.after_revert(&tx, event_id)?;
        }
        tx.commit()?;
        Ok(n > 0)
    }

    /// `event_id` was answered (or expired): if it is a revert, its trigger may be final again
    /// and waiting for that answer to fire anew (or to stand again) — reconcile it.
    fn after_revert(&self, tx: &Connection, event_id: &str) -> Result<()> {
        let row: Option<(Option<String>, Option<String>, String)> = tx
            .query_row("SELECT reverts, trigger_key, rule_id FROM act_outbox WHERE event_id = ?1", [event_id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        let Some((Some(_), Some(key), rule_id)) = row else { return Ok(()) };
        let (rule, active) = self.rule_for(&rule_id).map_or((None, false), |(r, a)| (Some(r), a));
        let tip: Option<u32> =
            tx.query_row("SELECT height FROM act_cursor WHERE k = 0", [], |r| r.get::<_, Option<u32>>(0)).optional()?.flatten();
        let found = lookup(tx, rule, &key, tip)?;
        let mut out = vec![];
        reconcile(tx, rule, active, &key, found.as_ref(), tip.unwrap_or(0), &mut out)?;
        for e in out {
            tracing::info!("actuator, after {event_id}: {e:?}");
        }
        Ok(())
    }
}

/// Put an action in the outbox once; returns whether it is new. Every trigger goes
/// through here — chain events from [`Engine::apply`], Lightning payments from
/// [`Engine::lightning_received`] — so they share the outbox, its delivery and its
/// exactly-once: the event id is the key (`rule:txid:vout`, `rule:height:H`,
/// `rule:cmd:seq`, `rule:ln:<payment hash>`; `<key>:g<n>` for the n-th generation of a
/// trigger that came back after its action was reverted, `<event id>:revert` for a revert).
fn insert_due(tx: &Connection, a: &NewAction<'_>) -> Result<bool> {
    let corrupt = |e: serde_json::Error| EngineError::Corrupt(e.to_string());
    let n = tx.execute(
        "INSERT OR IGNORE INTO act_outbox (event_id, rule_id, device, command, args, txid, height, state, due_ms, ttl_ms, delivery, confirmations, payment, trigger, lightning, trigger_key, generation, reverts)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'due', ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
        params![
            a.event_id,
            a.rule.id,
            a.rule.device,
            a.action.command,
            a.action.args.to_string(),
            a.txid,
            a.height,
            now_ms(),
            a.rule.ttl_secs.map(|s| s.saturating_mul(1000)),
            serde_json::to_string(&a.action.delivery()).map_err(corrupt)?,
            a.rule.trigger.confirmations(),
            a.payment.map(serde_json::to_string).transpose().map_err(corrupt)?,
            a.rule.trigger.kind(),
            a.lightning.map(serde_json::to_string).transpose().map_err(corrupt)?,
            a.trigger_key,
            a.generation,
            a.reverts,
        ],
    )?;
    Ok(n > 0)
}

/// What a trigger key names: `rule:txid:vout`, `rule:cmd:seq`, `rule:height:H` or `rule:ln:hash`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum KeyKind {
    Payment { txid: String, vout: u32 },
    Command { seq: u32 },
    Height { height: u32 },
    Lightning,
}

fn parse_key(key: &str) -> Option<(&str, KeyKind)> {
    let mut it = key.splitn(3, ':');
    let (rule, a, b) = (it.next()?, it.next()?, it.next()?);
    Some((
        rule,
        match a {
            "cmd" => KeyKind::Command { seq: b.parse().ok()? },
            "height" => KeyKind::Height { height: b.parse().ok()? },
            "ln" => KeyKind::Lightning,
            txid => KeyKind::Payment { txid: txid.into(), vout: b.parse().ok()? },
        },
    ))
}

/// A trigger as it is on the best chain now.
#[derive(Clone, Debug)]
struct Found {
    /// Its confirmations (or height) are reached.
    final_: bool,
    txid: Option<String>,
    payment: Option<Payment>,
    /// The command word, for on-chain commands.
    command: Option<String>,
    /// How it stands, for notes.
    what: String,
}

/// Whether something mined at `height` is buried under `confirmations` blocks at `tip`
/// (u64 arithmetic: `height + confirmations` does not fit a u32 for every rule).
fn buried(height: u32, confirmations: u32, tip: Option<u32>) -> bool {
    tip.is_some_and(|tip| height as u64 + confirmations as u64 <= tip as u64 + 1)
}

/// Where the trigger `key` of `rule` is on the best chain whose tip is `tip` (`None`: not
/// on it). Unknown without the rule (removed since): then not on it.
fn lookup(tx: &Connection, rule: Option<&Rule>, key: &str, tip: Option<u32>) -> Result<Option<Found>> {
    let (Some(rule), Some((_, kind))) = (rule, parse_key(key)) else { return Ok(None) };
    Ok(match (kind, &rule.trigger) {
        (KeyKind::Payment { txid, vout }, Trigger::Payment { address, confirmations, .. }) => {
            let row: Option<(u64, u32)> = tx
                .query_row(
                    "SELECT amount, height FROM act_payments WHERE rule_id = ?1 AND txid = ?2 AND vout = ?3",
                    params![rule.id, txid, vout],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            row.map(|(amount_sat, height)| Found {
                final_: buried(height, *confirmations, tip),
                what: format!("payment {txid}:{vout}"),
                txid: Some(txid.clone()),
                payment: Some(Payment { txid, vout, address: address.clone(), amount_sat, height }),
                command: None,
            })
        }
        (KeyKind::Command { seq }, Trigger::Command { confirmations, .. }) => {
            let row: Option<(String, String, u32)> = tx
                .query_row("SELECT txid, command, height FROM act_commands WHERE rule_id = ?1 AND seq = ?2", params![rule.id, seq], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .optional()?;
            row.map(|(txid, command, height)| Found {
                final_: buried(height, *confirmations, tip),
                what: format!("command {txid} (seq {seq})"),
                txid: Some(txid),
                payment: None,
                command: Some(command),
            })
        }
        (KeyKind::Height { height }, Trigger::Height { .. }) => Some(Found {
            final_: tip.is_some_and(|t| t >= height),
            what: format!("height {height}"),
            txid: None,
            payment: None,
            command: None,
        }),
        _ => None,
    })
}

/// An outbox row as reconciliation needs it.
struct Row {
    event_id: String,
    state: OutboxState,
    generation: u32,
    acked_ms: Option<u64>,
}

fn row_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok(Row {
        event_id: r.get(0)?,
        state: OutboxState::parse(&r.get::<_, String>(1)?).map_err(|e| conversion(1, e))?,
        generation: r.get::<_, Option<u32>>(2)?.unwrap_or(1),
        acked_ms: r.get(3)?,
    })
}

/// The latest action of the trigger `key` (its highest generation).
fn latest_action(tx: &Connection, key: &str) -> Result<Option<Row>> {
    Ok(tx
        .query_row(
            "SELECT event_id, state, generation, acked_ms FROM act_outbox WHERE trigger_key = ?1 AND reverts IS NULL ORDER BY generation DESC LIMIT 1",
            [key],
            row_of,
        )
        .optional()?)
}

/// The latest revert of the action `event_id`, and how many it has.
fn latest_revert(tx: &Connection, event_id: &str) -> Result<(Option<Row>, u32)> {
    let n: u32 = tx.query_row("SELECT COUNT(*) FROM act_outbox WHERE reverts = ?1", [event_id], |r| r.get(0))?;
    let row = tx
        .query_row(
            "SELECT event_id, state, generation, acked_ms FROM act_outbox WHERE reverts = ?1 ORDER BY rowid DESC LIMIT 1",
            [event_id],
            row_of,
        )
        .optional()?;
    Ok((row, n))
}

/// The rule `id` among the watched (`true`) and the retired (`false`) rules.
fn rule_for<'a>(watched: &'a [Watched], retired: &'a [Watched], id: &str) -> Option<(&'a Rule, bool)> {
    watched
        .iter()
        .find(|w| w.rule.id == id)
        .map(|w| (&w.rule, true))
        .or_else(|| retired.iter().find(|w| w.rule.id == id).map(|w| (&w.rule, false)))
}

/// Whether the outbox has an action for the trigger `key` (a retired rule's trigger that
/// comes back is recorded again only then).
fn acted_on(tx: &Connection, key: &str) -> Result<bool> {
    Ok(tx.prepare_cached("SELECT 1 FROM act_outbox WHERE trigger_key = ?1 LIMIT 1")?.exists([key])?)
}

/// The event id of generation `g` of the trigger `key`: the key itself first, then
/// `<key>:g<g>` — a new id, because a device executes each event id at most once and
/// the action it reverted must be able to run again.
fn generation_id(key: &str, g: u32) -> String {
    if g <= 1 {
        key.to_string()
    } else {
        format!("{key}:g{g}")
    }
}

/// The event id of the `n`-th revert (from 1) of the action `event_id`.
fn revert_id(event_id: &str, n: u32) -> String {
    if n <= 1 {
        format!("{event_id}:revert")
    } else {
        format!("{event_id}:revert{n}")
    }
}

/// Make the outbox agree with where the trigger `key` of `rule` is (`found`, from
/// [`lookup`]): **the action stands exactly while its trigger is final on the best chain.**
///
/// * final, no action yet → due (generation 1);
/// * final, action cancelled (it was never delivered) → due again, same event id;
/// * final, action reverted: its revert not delivered yet → the revert is cancelled and the
///   action stands again (the device saw nothing); the revert executed → a new generation
///   is due (`<key>:g2`, …); the revert refused, expired or absent (no revert action) → the
///   action stands again; the revert delivered and unanswered → wait for its answer
///   ([`Engine::mark_acked`] and the other outcomes reconcile again);
/// * not final, action due → cancelled; delivered or acknowledged → reverted, with an alert
///   and the rule's revert action, if any;
/// * expired and refused actions are closed: nothing changes them.
///
/// A retired rule (`active` false: removed over the API) starts nothing new (no first
/// generation), but what it did is reconciled like any other.
#[allow(clippy::too_many_arguments)]
fn reconcile(
    tx: &Connection,
    rule: Option<&Rule>,
    active: bool,
    key: &str,
    found: Option<&Found>,
    height: u32,
    out: &mut Vec<EngineEvent>,
) -> Result<()> {
    let latest = latest_action(tx, key)?;
    let now = now_ms();
    match found.filter(|f| f.final_) {
        Some(f) => {
            let Some(rule) = rule else { return Ok(()) };
            let action = Action { command: f.command.clone().unwrap_or_else(|| rule.action.command.clone()), ..rule.action.clone() };
            let fire = |g: u32, out: &mut Vec<EngineEvent>| -> Result<()> {
                let event_id = generation_id(key, g);
                let new = NewAction {
                    event_id: &event_id,
                    rule,
                    action: &action,
                    txid: f.txid.as_deref(),
                    height,
                    payment: f.payment.as_ref(),
                    lightning: None,
                    trigger_key: key,
                    generation: g,
                    reverts: None,
                };
                if insert_due(tx, &new)? {
                    out.push(EngineEvent::Due { event_id });
                }
                Ok(())
            };
            let Some(m) = latest else { return if active { fire(1, out) } else { Ok(()) } };
            match m.state {
                OutboxState::Due | OutboxState::Delivered | OutboxState::Acked | OutboxState::Expired | OutboxState::Refused => {}
                OutboxState::Cancelled => {
                    let payment =
                        f.payment.as_ref().map(serde_json::to_string).transpose().map_err(|e| EngineError::Corrupt(e.to_string()))?;
                    tx.execute(
                        "UPDATE act_outbox SET state = 'due', due_ms = ?2, height = ?3, txid = ?4, payment = ?5, note = ?6 WHERE event_id = ?1",
                        params![m.event_id, now, height, f.txid, payment, format!("{} is final on the best chain again", f.what)],
                    )?;
                    out.push(EngineEvent::Due { event_id: m.event_id });
                }
                OutboxState::Reverted => {
                    let (revert, _) = latest_revert(tx, &m.event_id)?;
                    match revert.as_ref().map(|r| r.state) {
                        Some(OutboxState::Delivered) => {} // the device may be running it: wait for its answer
                        Some(OutboxState::Acked) => fire(m.generation + 1, out)?,
                        other => {
                            if let (Some(r), Some(OutboxState::Due)) = (&revert, other) {
                                tx.execute(
                                    "UPDATE act_outbox SET state = 'cancelled', note = ?2 WHERE event_id = ?1",
                                    params![
                                        r.event_id,
                                        format!("{} is final on the best chain again before this revert was delivered", f.what)
                                    ],
                                )?;
                                out.push(EngineEvent::Cancelled { event_id: r.event_id.clone() });
                            }
                            // The action was delivered, and nothing undid it: it stands again.
                            let state = if m.acked_ms.is_some() { "acked" } else { "delivered" };
                            let message =
                                format!("{} that triggered {} is final on the best chain again: the action stands", f.what, m.event_id);
                            tx.execute(
                                "UPDATE act_outbox SET state = ?2, note = ?3 WHERE event_id = ?1",
                                params![m.event_id, state, message],
                            )?;
                            tracing::info!("{message}");
                            out.push(EngineEvent::Restored { event_id: m.event_id, message });
                        }
                    }
                }
            }
        }
        None => {
            let Some(m) = latest else { return Ok(()) };
            let gone = match found {
                None => "was reorged out".to_string(),
                Some(_) => match rule.and_then(|r| r.trigger.confirmations()) {
                    Some(c) => format!("is no longer buried under {c} blocks on the best chain"),
                    None => "is above the best chain's tip again".to_string(),
                },
            };
            let what = found.map(|f| f.what.clone()).unwrap_or_else(|| match parse_key(key) {
                Some((_, KeyKind::Payment { txid, vout })) => format!("payment {txid}:{vout}"),
                Some((_, KeyKind::Command { seq })) => format!("command (seq {seq})"),
                Some((_, KeyKind::Height { height })) => format!("height {height}"),
                _ => key.to_string(),
            });
            match m.state {
                OutboxState::Due => {
                    tx.execute(
                        "UPDATE act_outbox SET state = 'cancelled', note = ?2 WHERE event_id = ?1",
                        params![m.event_id, format!("{what} {gone} before delivery")],
                    )?;
                    out.push(EngineEvent::Cancelled { event_id: m.event_id });
                }
                OutboxState::Delivered | OutboxState::Acked => {
                    tx.execute(
                        "UPDATE act_outbox SET state = 'reverted', note = ?2 WHERE event_id = ?1",
                        params![m.event_id, format!("{what} {gone} after the action")],
                    )?;
                    let mut message = format!("{what} that triggered {} {gone} after the action", m.event_id);
                    let mut revert_due = None;
                    let mut inverse = None;
                    let revert = match rule.and_then(|r| r.revert.as_ref().map(|a| (r, a))) {
                        // `revert = { command = "inverse" }`: undo whatever the action was.
                        Some((r, a)) if a.command == crate::rules::INVERSE => {
                            let done: String =
                                tx.query_row("SELECT command FROM act_outbox WHERE event_id = ?1", [&m.event_id], |r| r.get(0))?;
                            match crate::rules::inverse_of(&done) {
                                Some(c) => inverse = Some(Action { command: c.to_string(), ..a.clone() }),
                                None => message.push_str(&format!("; {done:?} has no known inverse, nothing reverts it")),
                            }
                            inverse.as_ref().map(|a| (r, a))
                        }
                        other => other,
                    };
                    if rule.is_none() {
                        let rule_id = parse_key(key).map_or(key, |(r, _)| r);
                        message.push_str(&format!("; its rule {rule_id} was removed, so nothing reverts it"));
                    }
                    if let Some(revert) = revert {
                        let (rule, action) = revert;
                        let (_, n) = latest_revert(tx, &m.event_id)?;
                        let rid = revert_id(&m.event_id, n + 1);
                        let txid: Option<String> =
                            tx.query_row("SELECT txid FROM act_outbox WHERE event_id = ?1", [&m.event_id], |r| r.get(0))?;
                        let new = NewAction {
                            event_id: &rid,
                            rule,
                            action,
                            txid: txid.as_deref(),
                            height,
                            payment: None,
                            lightning: None,
                            trigger_key: key,
                            generation: m.generation,
                            reverts: Some(&m.event_id),
                        };
                        if insert_due(tx, &new)? {
                            message.push_str("; revert action queued");
                            revert_due = Some(rid);
                        }
                    }
                    tracing::warn!("{message}");
                    out.push(EngineEvent::Alert { event_id: m.event_id, message });
                    out.extend(revert_due.map(|event_id| EngineEvent::Due { event_id }));
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// A new outbox entry (see [`insert_due`]).
struct NewAction<'a> {
    event_id: &'a str,
    rule: &'a Rule,
    action: &'a Action,
    txid: Option<&'a str>,
    height: u32,
    payment: Option<&'a Payment>,
    lightning: Option<&'a LightningPayment>,
    /// The trigger it is for (its generations and reverts share it).
    trigger_key: &'a str,
    generation: u32,
    /// For a revert: the event id of the action it reverts.
    reverts: Option<&'a str>,
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
        let mut e = Engine::open(&path, rules.clone(), Network::Regtest, "gw.test/log").unwrap();

        assert_eq!(e.lightning_rule("coffee").unwrap(), coffee);
        assert!(e.lightning_rule("lease").unwrap_err().to_string().contains("not a Lightning rule"));
        assert!(matches!(e.lightning_rule("nope"), Err(EngineError::NoSuchRule(_))));

        let (h1, h2) = ("11".repeat(32), "22".repeat(32));
        e.add_invoice(&coffee, &h1, "lnbcrt1", 50_000, now_ms() + 600_000, None).unwrap();
        e.add_invoice(&coffee, &h2, "lnbcrt2", 50_000, now_ms() + 600_000, None).unwrap();
        assert!(e.add_invoice(&coffee, &h1, "lnbcrt1", 50_000, 0, None).is_err(), "one invoice per payment hash");

        // Not one of ours: nothing happens.
        assert_eq!(e.lightning_received(&"33".repeat(32), 50_000).unwrap(), None);
        assert!(e.log().unwrap().is_empty());

        // Paid: due once, whatever replays the node's event.
        let event_id = format!("coffee:ln:{h1}");
        assert_eq!(e.lightning_received(&h1, 50_000).unwrap(), Some(EngineEvent::Due { event_id: event_id.clone() }));
        assert_eq!(e.lightning_received(&h1, 50_000).unwrap(), None);
        drop(e);
        let mut e = Engine::open(&path, rules, Network::Regtest, "gw.test/log").unwrap();
        assert_eq!(e.lightning_received(&h1, 50_000).unwrap(), None, "after a restart too");
        let log = e.log().unwrap();
        assert_eq!(log.len(), 1);
        let a = &log[0];
        assert_eq!(
            (a.event_id.as_str(), a.state, a.trigger.as_deref(), a.txid.as_deref()),
            (event_id.as_str(), OutboxState::Due, Some("lightning"), None)
        );
        assert_eq!(
            a.lightning,
            Some(LightningPayment {
                payment_hash: h1.clone(),
                amount_msat: 50_000,
                invoice_msat: 50_000,
                claim_deadline: None,
                claim: None
            })
        );
        assert_eq!(a.payload().lightning.map(|l| l.payment_hash), Some(h1.clone()));
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
        e.add_invoice(&tea, &h3, "lnbcrt3", 1_000, now_ms() + 60_000, None).unwrap();
        e.remove_rule("tea").unwrap();
        assert_eq!(e.lightning_received(&h3, 1_000).unwrap(), Some(EngineEvent::Due { event_id: format!("tea:ln:{h3}") }));
    }

    #[test]
    fn a_held_lightning_payment_is_claimed_only_after_the_acknowledgement_and_failed_back_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("actuator.sqlite");
        let mut coffee = rule("coffee", Trigger::Lightning { amount_msat: 50_000, expiry_secs: 600 });
        coffee.ttl_secs = None;
        let rules = RuleSet::new(vec![coffee.clone()], Network::Regtest).unwrap();
        let mut e = Engine::open(&path, rules.clone(), Network::Regtest, "gw.test/log").unwrap();
        let tip = |e: &mut Engine, height: u32| {
            e.db.execute("INSERT OR REPLACE INTO act_cursor (k, height, hash) VALUES (0, ?1, ?2)", params![height, "00".repeat(32)])
                .unwrap();
        };
        tip(&mut e, 100);
        let hashes: Vec<String> = (1..=5u8).map(|i| format!("{i:02x}").repeat(32)).collect();
        for h in &hashes {
            e.add_invoice(&coffee, h, "lnbcrt", 50_000, now_ms() + 600_000, Some(&"ab".repeat(32))).unwrap();
        }
        let id = |h: &str| format!("coffee:ln:{h}");

        // Claimable: due once (a replayed event changes nothing), nothing to settle yet.
        let h = &hashes[0];
        assert_eq!(e.lightning_claimable(h, 50_000, Some(103)).unwrap(), Some(EngineEvent::Due { event_id: id(h) }));
        assert_eq!(e.lightning_claimable(h, 50_000, Some(103)).unwrap(), None);
        let a = e.get(&id(h)).unwrap().unwrap();
        assert_eq!(a.lightning.as_ref().unwrap().claim, Some(ClaimState::Held));
        assert_eq!(a.ttl_ms, Some(2 * BLOCK_SPACING_MS), "clamped to end a block before the claim deadline, 3 blocks away");
        assert!(a.note.unwrap().contains("clamped"));
        assert!(e.claims_to_settle().unwrap().is_empty(), "not acknowledged yet");
        assert!(e.mark_delivered(&id(h)).unwrap());
        assert!(e.claims_to_settle().unwrap().is_empty(), "delivered is not done");
        // The device acknowledges: claim it (again after a restart, until recorded).
        assert!(e.mark_acked(&id(h)).unwrap());
        drop(e);
        let mut e = Engine::open(&path, rules, Network::Regtest, "gw.test/log").unwrap();
        let s = e.claims_to_settle().unwrap();
        assert_eq!(s.len(), 1);
        assert!(s[0].claim && s[0].payment_hash == *h && s[0].amount_msat == 50_000 && s[0].preimage == "ab".repeat(32), "{s:?}");
        e.mark_settled(h, true, "claimed").unwrap();
        assert!(e.claims_to_settle().unwrap().is_empty());
        assert_eq!(e.get(&id(h)).unwrap().unwrap().lightning.unwrap().claim, Some(ClaimState::Claimed));
        // The claim completing (PaymentReceived) fires nothing more.
        assert_eq!(e.lightning_received(h, 50_000).unwrap(), None);

        // Refused by the device: failed back, and the action log says so.
        let h = &hashes[1];
        e.lightning_claimable(h, 50_000, Some(103)).unwrap();
        assert!(e.mark_refused(&id(h), "the device refused it: jammed").unwrap());
        let s = e.claims_to_settle().unwrap();
        assert_eq!((s.len(), s[0].claim), (1, false), "{s:?}");
        assert!(s[0].why.contains("refused"), "{s:?}");
        e.mark_settled(h, false, &s[0].why).unwrap();
        let a = e.get(&id(h)).unwrap().unwrap();
        assert_eq!((a.state, a.lightning.unwrap().claim), (OutboxState::Refused, Some(ClaimState::FailedBack)));
        assert!(a.note.unwrap().contains("payment failed back"));

        // Underpaid: nothing due, failed back.
        let h = &hashes[2];
        assert!(matches!(e.lightning_claimable(h, 49_999, Some(103)).unwrap(), Some(EngineEvent::LightningRefused { .. })));
        assert!(e.get(&id(h)).unwrap().is_none());
        let s = e.claims_to_settle().unwrap();
        assert!(s.iter().any(|s| s.payment_hash == *h && !s.claim && s.why.contains("underpaid")), "{s:?}");
        e.mark_settled(h, false, "underpaid").unwrap();

        // Unacknowledged one block before the claim deadline: expired (not delivered again), failed back.
        let h = &hashes[3];
        e.lightning_claimable(h, 50_000, Some(103)).unwrap();
        assert!(e.mark_delivered(&id(h)).unwrap());
        tip(&mut e, 101);
        assert!(e.claims_to_settle().unwrap().is_empty());
        tip(&mut e, 102);
        let s = e.claims_to_settle().unwrap();
        assert!(matches!(&s[..], [s] if !s.claim && s.payment_hash == *h), "{s:?}");
        assert_eq!(e.get(&id(h)).unwrap().unwrap().state, OutboxState::Expired);
        assert!(!e.mark_acked(&id(h)).unwrap(), "a late acknowledgement does not claim it");
        e.mark_settled(h, false, &s[0].why).unwrap();
        assert!(e.claims_to_settle().unwrap().is_empty());

        // Expired by its time-to-live (delivered too late): failed back.
        let h = &hashes[4];
        e.lightning_claimable(h, 50_000, Some(200)).unwrap();
        assert!(e.mark_expired(&id(h), "the device received it after its time-to-live").unwrap());
        let s = e.claims_to_settle().unwrap();
        assert!(matches!(&s[..], [s] if !s.claim && s.why.contains("expired")), "{s:?}");

        // Not a held invoice of ours: nothing.
        assert_eq!(e.lightning_claimable(&"77".repeat(32), 1, Some(5)).unwrap(), None);
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
        let text =
            "[[rule]]\nid = \"c\"\ndevice = \"d\"\ntrigger = { kind = \"lightning\", amount_msat = 5000 }\naction = { command = \"on\" }\n";
        let rs = RuleSet::parse(text, Network::Regtest).unwrap();
        assert_eq!(rs.rules[0].trigger, Trigger::Lightning { amount_msat: 5000, expiry_secs: 600 });
    }
}

/// The engine on synthetic chains: reorgs of every depth in which the trigger is mined
/// again, dropped or double-spent, with a simulated device between the batches of events,
/// checking invariant I2 after every batch.
#[cfg(test)]
mod reorg_tests {
    use super::*;
    use bitcoin::block::{Header, Version};
    use bitcoin::hashes::Hash;
    use bitcoin::{
        absolute, transaction, Amount, Block, BlockHash, CompactTarget, OutPoint, Sequence, Transaction, TxIn, TxMerkleNode, TxOut, Txid,
        Witness,
    };
    use std::collections::HashSet;
    use std::sync::Arc;

    fn address(tag: u8) -> bitcoin::Address {
        bitcoin::Address::p2wsh(&ScriptBuf::from(vec![0x60 + tag, 0x87]), Network::Regtest)
    }

    fn pay(input: u8, to: &bitcoin::Address, sat: u64) -> Transaction {
        Transaction {
            version: transaction::Version::TWO,
            lock_time: absolute::LockTime::ZERO,
            input: vec![TxIn {
                previous_output: OutPoint { txid: Txid::from_byte_array([input; 32]), vout: 0 },
                script_sig: ScriptBuf::new(),
                sequence: Sequence::MAX,
                witness: Witness::new(),
            }],
            output: vec![TxOut { value: Amount::from_sat(sat), script_pubkey: to.script_pubkey() }],
        }
    }

    fn op_return(input: u8, payload: Vec<u8>) -> Transaction {
        let mut t = pay(input, &address(9), 1);
        t.output[0] = TxOut {
            value: Amount::ZERO,
            script_pubkey: ScriptBuf::new_op_return(bitcoin::script::PushBytesBuf::try_from(payload).unwrap()),
        };
        t
    }

    fn door(confirmations: u32) -> Rule {
        Rule {
            id: "door".into(),
            device: "lock-7".into(),
            trigger: Trigger::Payment { address: address(1).to_string(), min_sat: 20_000, confirmations },
            action: Action { command: "unlock".into(), args: serde_json::Value::Null, webhook: None, exec: None },
            revert: Some(Action { command: "lock".into(), args: serde_json::Value::Null, webhook: None, exec: None }),
            ttl_secs: Some(600),
        }
    }

    /// A chain fed to the engine, and a device executing what the engine delivers.
    struct Sim {
        e: Engine,
        _dir: tempfile::TempDir,
        chain: Vec<(BlockId, Arc<Block>)>,
        nonce: u32,
        /// Event ids the device executed, in order, with their commands.
        executed: Vec<(String, String)>,
        done: HashSet<String>,
        /// Event ids ever delivered.
        delivered: HashSet<String>,
    }

    impl Sim {
        fn new(rules: Vec<Rule>) -> Sim {
            let dir = tempfile::tempdir().unwrap();
            let e =
                Engine::open(&dir.path().join("a.sqlite"), RuleSet::new(rules, Network::Regtest).unwrap(), Network::Regtest, "gw.test/log")
                    .unwrap();
            let mut s = Sim { e, _dir: dir, chain: vec![], nonce: 0, executed: vec![], done: HashSet::new(), delivered: HashSet::new() };
            s.connect(vec![]);
            s
        }

        fn tip(&self) -> u32 {
            self.chain.last().map(|(id, _)| id.height).unwrap_or(0)
        }

        fn connect(&mut self, txdata: Vec<Transaction>) -> Vec<EngineEvent> {
            self.nonce += 1;
            let prev = self.chain.last().map(|(id, _)| id.hash).unwrap_or_else(BlockHash::all_zeros);
            let header = Header {
                version: Version::ONE,
                prev_blockhash: prev,
                merkle_root: TxMerkleNode::all_zeros(),
                time: self.nonce,
                bits: CompactTarget::from_consensus(0x207fffff),
                nonce: self.nonce,
            };
            let block = Arc::new(Block { header, txdata });
            let id = BlockId { height: self.chain.len() as u32, hash: block.block_hash() };
            self.chain.push((id, block.clone()));
            self.e.apply(&BlockEvent::Connected { id, block }).unwrap()
        }

        fn mine(&mut self, n: usize) {
            for _ in 0..n {
                self.connect(vec![]);
            }
        }

        fn disconnect(&mut self) -> Vec<EngineEvent> {
            let (id, block) = self.chain.pop().unwrap();
            self.e.apply(&BlockEvent::Disconnected { id, block }).unwrap()
        }

        /// Where `txid` is on the chain (its height).
        fn height_of(&self, txid: &Txid) -> Option<u32> {
            self.chain.iter().find(|(_, b)| b.txdata.iter().any(|t| t.compute_txid() == *txid)).map(|(id, _)| id.height)
        }

        fn is_final(&self, txid: &Txid, confirmations: u32) -> bool {
            self.height_of(txid).is_some_and(|h| self.tip() + 1 >= h + confirmations)
        }

        /// Deliver everything pending to the device, which acts once per event id and
        /// acknowledges, until nothing is pending. `check` says whether the trigger of a
        /// revert is final now (a revert must never run while it is).
        fn deliver(&mut self, check: &dyn Fn(&Sim, &OutboxItem) -> bool) {
            for _ in 0..10 {
                let pending = self.e.pending().unwrap();
                if pending.is_empty() {
                    return;
                }
                for item in pending {
                    if item.state == OutboxState::Due {
                        assert!(!self.delivered.contains(&item.event_id), "{} due again after it was delivered", item.event_id);
                    }
                    assert!(self.e.mark_delivered(&item.event_id).unwrap());
                    self.delivered.insert(item.event_id.clone());
                    if self.done.insert(item.event_id.clone()) {
                        if item.reverts.is_some() {
                            assert!(!check(self, &item), "revert {} runs while its trigger is final", item.event_id);
                        } else {
                            assert!(check(self, &item), "action {} runs while its trigger is not final", item.event_id);
                        }
                        self.executed.push((item.event_id.clone(), item.command.clone()));
                    }
                    self.e.mark_acked(&item.event_id).unwrap();
                }
            }
            panic!("deliveries never settle");
        }

        /// Net executions of the trigger `key`: actions minus reverts.
        fn net(&self, key: &str) -> i64 {
            let log = self.e.log().unwrap();
            self.executed
                .iter()
                .filter_map(|(id, _)| log.iter().find(|i| i.event_id == *id))
                .filter(|i| i.trigger_key.as_deref() == Some(key))
                .map(|i| if i.reverts.is_some() { -1 } else { 1 })
                .sum()
        }
    }

    #[derive(Clone, Copy, Debug)]
    enum Fate {
        ReMined,
        Dropped,
        DoubleSpent,
    }

    /// I2 for one payment: final on the best chain ⇔ executed once net, else zero.
    fn check_i2(s: &Sim, txid: &Txid, confirmations: u32, what: &str) {
        let key = format!("door:{txid}:0");
        let want = s.is_final(txid, confirmations) as i64;
        assert_eq!(s.net(&key), want, "{what}: tip {} executed {:?}\n{:#?}", s.tip(), s.executed, s.e.log().unwrap());
        let standing =
            s.e.log()
                .unwrap()
                .into_iter()
                .filter(|i| i.trigger_key.as_deref() == Some(&key) && i.reverts.is_none() && matches!(i.state, OutboxState::Acked))
                .count();
        assert_eq!(standing as i64, want, "{what}: one standing action while final");
    }

    #[test]
    fn invariant_i2_holds_through_reorgs_of_depth_1_to_6_whatever_becomes_of_the_payment() {
        let mut cases = 0;
        for confirmations in [1, 3] {
            for depth in 1..=6usize {
                for fate in [Fate::ReMined, Fate::Dropped, Fate::DoubleSpent] {
                    for deliver_between in [false, true] {
                        for buried in 0..2usize {
                            let what =
                                format!("conf {confirmations} depth {depth} {fate:?} deliver-between {deliver_between} extra {buried}");
                            let mut s = Sim::new(vec![door(confirmations)]);
                            s.mine(7);
                            let p = pay(1, &address(1), 25_000);
                            let txid = p.compute_txid();
                            let check = move |s: &Sim, _: &OutboxItem| s.is_final(&txid, confirmations);
                            s.connect(vec![p.clone()]);
                            s.mine(confirmations as usize - 1 + buried);
                            s.deliver(&check);
                            check_i2(&s, &txid, confirmations, &format!("{what}, before the reorg"));
                            for _ in 0..depth {
                                s.disconnect();
                            }
                            if deliver_between {
                                s.deliver(&check);
                                check_i2(&s, &txid, confirmations, &format!("{what}, at the fork point"));
                            }
                            // The new branch, one block longer; the payment in its first block, or not.
                            // (A reorg that left the payment's block in place leaves it where it is.)
                            let gone = s.height_of(&txid).is_none();
                            let first = match fate {
                                Fate::ReMined if gone => vec![p.clone()],
                                Fate::DoubleSpent if gone => vec![pay(1, &address(2), 25_000)],
                                _ => vec![],
                            };
                            s.connect(first);
                            s.mine(depth);
                            s.deliver(&check);
                            check_i2(&s, &txid, confirmations, &format!("{what}, after the new branch"));
                            s.mine(confirmations as usize);
                            s.deliver(&check);
                            check_i2(&s, &txid, confirmations, &format!("{what}, buried"));
                            // Every event id executed once.
                            let ids: HashSet<&String> = s.executed.iter().map(|(id, _)| id).collect();
                            assert_eq!(ids.len(), s.executed.len(), "{what}");
                            cases += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(cases, 2 * 6 * 3 * 2 * 2);
    }

    #[test]
    fn the_issue_s_rental_reorg_reverts_then_fires_again_under_a_new_event_id() {
        let mut s = Sim::new(vec![door(3)]);
        s.mine(2);
        let p = pay(1, &address(1), 25_000);
        let txid = p.compute_txid();
        let key = format!("door:{txid}:0");
        let check = move |s: &Sim, _: &OutboxItem| s.is_final(&txid, 3);
        s.connect(vec![p.clone()]);
        s.mine(2);
        s.deliver(&check);
        assert_eq!(s.executed, vec![(key.clone(), "unlock".into())]);
        // invalidateblock on the payment's block: the tip is its parent for a while …
        for _ in 0..3 {
            s.disconnect();
        }
        s.deliver(&check);
        assert_eq!(s.executed.last().unwrap(), &(format!("{key}:revert"), "lock".to_string()));
        assert_eq!(s.e.get(&key).unwrap().unwrap().state, OutboxState::Reverted);
        // … then the payment is mined again in the new branch, and buried under 3 blocks.
        s.connect(vec![p]);
        s.mine(1);
        s.deliver(&check);
        assert_eq!(s.executed.len(), 2, "2 confirmations are not 3");
        let evs = s.connect(vec![]);
        assert!(evs.contains(&EngineEvent::Due { event_id: format!("{key}:g2") }), "{evs:?}");
        s.deliver(&check);
        let cmds: Vec<&str> = s.executed.iter().map(|(_, c)| c.as_str()).collect();
        assert_eq!(cmds, ["unlock", "lock", "unlock"], "the lock ends open");
        assert_eq!(s.net(&key), 1);
        let g2 = s.e.get(&format!("{key}:g2")).unwrap().unwrap();
        assert_eq!((g2.state, g2.generation, g2.trigger_key.as_deref()), (OutboxState::Acked, Some(2), Some(key.as_str())));
        assert_eq!(g2.payment.as_ref().map(|p| p.height), Some(3), "the payment where it is now");
        // Later blocks change nothing.
        s.mine(5);
        s.deliver(&check);
        assert_eq!(s.executed.len(), 3);
    }

    #[test]
    fn a_reorg_applied_whole_that_mines_the_payment_again_costs_the_device_nothing() {
        let mut s = Sim::new(vec![door(1)]);
        let p = pay(1, &address(1), 25_000);
        let txid = p.compute_txid();
        let key = format!("door:{txid}:0");
        let check = move |s: &Sim, _: &OutboxItem| s.is_final(&txid, 1);
        s.connect(vec![p.clone()]);
        s.deliver(&check);
        let evs = s.disconnect();
        assert!(evs.contains(&EngineEvent::Due { event_id: format!("{key}:revert") }), "{evs:?}");
        let evs = s.connect(vec![p]);
        assert!(evs.contains(&EngineEvent::Cancelled { event_id: format!("{key}:revert") }), "{evs:?}");
        assert!(evs.iter().any(|e| matches!(e, EngineEvent::Restored { event_id, .. } if *event_id == key)), "{evs:?}");
        s.deliver(&check);
        assert_eq!(s.executed.len(), 1, "{:?}", s.executed);
        assert_eq!(s.e.get(&key).unwrap().unwrap().state, OutboxState::Acked);
        // Lost again, after a restored action: a second revert, under its own id.
        s.disconnect();
        s.deliver(&check);
        assert_eq!(s.executed.last().unwrap().0, format!("{key}:revert2"));
        assert_eq!(s.net(&key), 0);
    }

    #[test]
    fn a_due_action_cancelled_by_a_reorg_fires_when_its_payment_is_mined_again() {
        let mut s = Sim::new(vec![door(1)]);
        let p = pay(1, &address(1), 25_000);
        let txid = p.compute_txid();
        let key = format!("door:{txid}:0");
        s.connect(vec![p.clone()]);
        assert_eq!(s.e.get(&key).unwrap().unwrap().state, OutboxState::Due);
        assert_eq!(s.disconnect(), vec![EngineEvent::Cancelled { event_id: key.clone() }]);
        s.mine(2);
        assert_eq!(s.e.get(&key).unwrap().unwrap().state, OutboxState::Cancelled);
        let evs = s.connect(vec![p]);
        assert!(evs.contains(&EngineEvent::Due { event_id: key.clone() }), "never delivered: the same id: {evs:?}");
        let item = s.e.get(&key).unwrap().unwrap();
        assert_eq!((item.state, item.payment.as_ref().map(|p| p.height)), (OutboxState::Due, Some(3)));
        s.deliver(&move |s: &Sim, _: &OutboxItem| s.is_final(&txid, 1));
        assert_eq!(s.executed, vec![(key, "unlock".to_string())]);
    }

    /// A rule removed over the API after it fired still reverts what it did when its
    /// payment leaves the best chain, however deep the reorg (the drill: a regtest node
    /// killed at the wrong time came back having lost all 420 of its blocks, long after the
    /// fleet had removed the rental's rule), and its action stands again if the payment
    /// comes back; but the removed rule fires nothing new, also across a restart.
    #[test]
    fn a_removed_rule_still_reconciles_what_it_did_but_fires_nothing_new() {
        let mut s = Sim::new(vec![]);
        s.e.add_rule(door(1)).unwrap();
        s.connect(vec![]);
        let p = pay(1, &address(1), 25_000);
        let key = format!("door:{}:0", p.compute_txid());
        s.connect(vec![p.clone()]);
        assert!(s.e.mark_delivered(&key).unwrap() && s.e.mark_acked(&key).unwrap());
        s.mine(3);
        s.e.remove_rule("door").unwrap();
        assert!(s.e.rules().is_empty());
        for _ in 0..4 {
            s.disconnect();
        }
        let item = s.e.get(&key).unwrap().unwrap();
        assert_eq!(item.state, OutboxState::Reverted);
        let revert = s.e.get(&format!("{key}:revert")).unwrap().expect("a revert was queued");
        assert_eq!((revert.command.as_str(), revert.state), ("lock", OutboxState::Due));
        // The payment is mined again before the revert went out: the action stands again.
        s.connect(vec![p]);
        assert_eq!(s.e.get(&key).unwrap().unwrap().state, OutboxState::Acked);
        // A new payment to the removed rule's address fires nothing, before or after a restart.
        let again = pay(2, &address(1), 25_000);
        let other = format!("door:{}:0", again.compute_txid());
        s.connect(vec![again]);
        s.mine(2);
        assert!(s.e.get(&other).unwrap().is_none(), "the removed rule fired");
    }

    #[test]
    fn a_revert_in_flight_when_the_payment_returns_is_awaited_then_answered() {
        let mut s = Sim::new(vec![door(1)]);
        let p = pay(1, &address(1), 25_000);
        let key = format!("door:{}:0", p.compute_txid());
        let revert = format!("{key}:revert");
        s.connect(vec![p.clone()]);
        assert!(s.e.mark_delivered(&key).unwrap() && s.e.mark_acked(&key).unwrap());
        s.disconnect();
        assert!(s.e.mark_delivered(&revert).unwrap(), "the revert is sent, not answered yet");
        s.connect(vec![p.clone()]);
        assert_eq!(
            s.e.pending().unwrap().iter().map(|i| i.event_id.as_str()).collect::<Vec<_>>(),
            [revert.as_str()],
            "nothing fires before the device answers"
        );
        // The device ran the revert: the payment, back, fires again.
        assert!(s.e.mark_acked(&revert).unwrap());
        let pending: Vec<String> = s.e.pending().unwrap().into_iter().map(|i| i.event_id).collect();
        assert_eq!(pending, [format!("{key}:g2")]);

        // The same with a revert the device did not run (it expired): the action stands again.
        let mut s = Sim::new(vec![door(1)]);
        s.connect(vec![p.clone()]);
        assert!(s.e.mark_delivered(&key).unwrap() && s.e.mark_acked(&key).unwrap());
        s.disconnect();
        assert!(s.e.mark_delivered(&revert).unwrap());
        s.connect(vec![p]);
        assert!(s.e.mark_expired(&revert, "late").unwrap());
        assert!(s.e.pending().unwrap().is_empty());
        assert_eq!(s.e.get(&key).unwrap().unwrap().state, OutboxState::Acked);
    }

    #[test]
    fn a_height_rule_whose_block_is_disconnected_and_reconnected() {
        let lease = Rule {
            id: "lease".into(),
            device: "relay-2".into(),
            trigger: Trigger::Height { height: 5 },
            action: Action { command: "off".into(), args: serde_json::Value::Null, webhook: None, exec: None },
            revert: Some(Action { command: "on".into(), args: serde_json::Value::Null, webhook: None, exec: None }),
            ttl_secs: None,
        };
        let mut s = Sim::new(vec![lease]);
        let check = |s: &Sim, _: &OutboxItem| s.tip() >= 5;
        s.mine(5);
        s.deliver(&check);
        assert_eq!(s.executed, vec![("lease:height:5".to_string(), "off".to_string())]);
        // A one-block reorg applied whole: nothing for the relay.
        s.disconnect();
        s.connect(vec![]);
        s.deliver(&check);
        assert_eq!(s.executed.len(), 1);
        // Below the height long enough for the revert to run, then the height again.
        s.disconnect();
        s.deliver(&check);
        s.connect(vec![]);
        s.deliver(&check);
        let cmds: Vec<(&str, &str)> = s.executed.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        // (The first revert was cancelled in the one-block reorg, never sent: this is the second.)
        assert_eq!(s.e.get("lease:height:5:revert").unwrap().unwrap().state, OutboxState::Cancelled);
        assert_eq!(cmds, [("lease:height:5", "off"), ("lease:height:5:revert2", "on"), ("lease:height:5:g2", "off")]);
        assert_eq!(s.net("lease:height:5"), 1);
    }

    const DOMAIN: &str = "test/doors";

    /// A command for the Sim's gateway (`gw.test/log` on regtest) in [`DOMAIN`], valid up to height 1,000.
    fn signed(key: &bitmote_device::SigningKey, device: &str, seq: u32, word: &str) -> Vec<u8> {
        let scope = crate::command::Scope { network: Network::Regtest, gateway: "gw.test/log", domain: DOMAIN, device };
        crate::command::encode(key, &scope, seq, 1_000, word).unwrap()
    }

    fn command_rule(id: &str, key: &bitmote_device::SigningKey) -> Rule {
        Rule {
            id: id.into(),
            device: "lock-9".into(),
            trigger: Trigger::Command { key: key.public_key().to_string(), domain: Some(DOMAIN.into()), confirmations: 1 },
            action: Action { command: "*".into(), args: serde_json::Value::Null, webhook: None, exec: None },
            revert: None,
            ttl_secs: None,
        }
    }

    /// Issue #13 item 10: a command copied into a new transaction after its rule was
    /// renamed (removed, and added again under another id) is a replay, refused; so is a
    /// command signed for another network, gateway or domain (ignored: not for this
    /// rule), and one mined after its expiry height.
    #[test]
    fn an_old_command_is_refused_after_its_rule_is_renamed_and_in_any_other_context() {
        use bitmote_device::SigningKey;
        let key = SigningKey::schnorr_from_secret(&[7; 32]).unwrap();
        let mut s = Sim::new(vec![]);
        s.e.add_rule(command_rule("door-a", &key)).unwrap();
        let unlock = signed(&key, "lock-9", 1, "unlock");
        let c1 = op_return(1, unlock.clone());
        let txid = c1.compute_txid();
        s.connect(vec![c1]);
        s.deliver(&move |s: &Sim, _: &OutboxItem| s.is_final(&txid, 1));
        assert_eq!(s.executed.len(), 1, "the command ran once: {:?}", s.executed);
        // The rule is renamed: removed, and added again under another id.
        s.e.remove_rule("door-a").unwrap();
        s.e.add_rule(command_rule("door-b", &key)).unwrap();
        // Anyone copies the mined payload into a new transaction of theirs.
        let evs = s.connect(vec![op_return(2, unlock)]);
        assert!(
            evs.iter().any(
                |e| matches!(e, EngineEvent::CommandRefused { rule_id, reason, .. } if rule_id == "door-b" && reason.contains("replayed"))
            ),
            "the copy is a replay under the new rule id too: {evs:?}"
        );
        // Signed for another network, gateway or domain: not a command for this rule at all.
        let other = |network, gateway, domain| {
            let scope = crate::command::Scope { network, gateway, domain, device: "lock-9" };
            op_return(3, crate::command::encode(&key, &scope, 2, 1_000, "unlock").unwrap())
        };
        let evs = s.connect(vec![
            other(Network::Signet, "gw.test/log", DOMAIN),
            other(Network::Regtest, "other.test/log", DOMAIN),
            other(Network::Regtest, "gw.test/log", "other/doors"),
        ]);
        assert!(evs.is_empty(), "{evs:?}");
        // Expired: valid up to height 3, mined later.
        let scope = crate::command::Scope { network: Network::Regtest, gateway: "gw.test/log", domain: DOMAIN, device: "lock-9" };
        let late = op_return(4, crate::command::encode(&key, &scope, 5, 3, "unlock").unwrap());
        let evs = s.connect(vec![late]);
        assert!(
            evs.iter().any(|e| matches!(e, EngineEvent::CommandRefused { reason, .. } if reason.contains("expired at height 3"))),
            "{evs:?}"
        );
        s.mine(2);
        s.deliver(&|_: &Sim, _: &OutboxItem| true);
        assert_eq!(s.executed.len(), 1, "nothing else ran: {:?}", s.executed);
        // A new command (the next sequence number, in scope, in time) still works.
        s.connect(vec![op_return(5, signed(&key, "lock-9", 2, "lock"))]);
        s.deliver(&|_: &Sim, _: &OutboxItem| true);
        let ran: Vec<&str> = s.executed.iter().map(|(a, _)| a.as_str()).collect();
        assert_eq!(ran, ["door-a:cmd:1", "door-b:cmd:2"]);
    }

    #[test]
    fn an_on_chain_command_mined_again_after_a_reorg_is_the_same_command_and_takes_effect_again() {
        use bitmote_device::SigningKey;
        let key = SigningKey::schnorr_from_secret(&[5; 32]).unwrap();
        let rule = Rule {
            id: "door-cmd".into(),
            device: "lock-9".into(),
            trigger: Trigger::Command { key: key.public_key().to_string(), domain: Some(DOMAIN.into()), confirmations: 2 },
            action: Action { command: "*".into(), args: serde_json::Value::Null, webhook: None, exec: None },
            revert: Some(Action { command: "lock".into(), args: serde_json::Value::Null, webhook: None, exec: None }),
            ttl_secs: None,
        };
        let mut s = Sim::new(vec![rule]);
        let c1 = op_return(1, signed(&key, "lock-9", 1, "unlock"));
        let txid = c1.compute_txid();
        let check = move |s: &Sim, _: &OutboxItem| s.is_final(&txid, 2);
        s.connect(vec![c1.clone()]);
        s.mine(1);
        s.deliver(&check);
        s.disconnect();
        s.disconnect();
        s.deliver(&check);
        let evs = s.connect(vec![c1]);
        assert!(!evs.iter().any(|e| matches!(e, EngineEvent::CommandRefused { .. })), "not a replay: {evs:?}");
        s.mine(1);
        s.deliver(&check);
        let cmds: Vec<(&str, &str)> = s.executed.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert_eq!(cmds, [("door-cmd:cmd:1", "unlock"), ("door-cmd:cmd:1:revert", "lock"), ("door-cmd:cmd:1:g2", "unlock")]);
    }

    /// Found by `bitmote drill`: a relay switched by signed commands (`action = "*"`) whose
    /// command is double-spent away after it ran kept the relay switched. With
    /// `revert = { command = "inverse" }` the inverse of what ran is sent.
    #[test]
    fn an_inverse_revert_undoes_whatever_the_command_did() {
        use bitmote_device::SigningKey;
        let key = SigningKey::schnorr_from_secret(&[6; 32]).unwrap();
        let rule = Rule {
            id: "relay-cmd".into(),
            device: "relay-9".into(),
            trigger: Trigger::Command { key: key.public_key().to_string(), domain: Some(DOMAIN.into()), confirmations: 1 },
            action: Action { command: "*".into(), args: serde_json::Value::Null, webhook: None, exec: None },
            revert: Some(Action { command: crate::rules::INVERSE.into(), args: serde_json::Value::Null, webhook: None, exec: None }),
            ttl_secs: None,
        };
        let mut s = Sim::new(vec![rule]);
        let on = op_return(1, signed(&key, "relay-9", 1, "on"));
        let txid = on.compute_txid();
        let check = move |s: &Sim, _: &OutboxItem| s.is_final(&txid, 1);
        s.connect(vec![on]);
        s.deliver(&check);
        // The command's block is replaced by one without it (double-spent, never back).
        s.disconnect();
        s.connect(vec![]);
        s.mine(1);
        s.deliver(&check);
        let cmds: Vec<(&str, &str)> = s.executed.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert_eq!(cmds, [("relay-cmd:cmd:1", "on"), ("relay-cmd:cmd:1:revert", "off")]);
        assert_eq!(s.net("relay-cmd:cmd:1"), 0);
    }

    #[test]
    fn confirmations_near_u32_max_never_overflow() {
        // Such rules are refused now (at most MAX_CONFIRMATIONS); the most allowed works.
        assert!(RuleSet::new(vec![door(u32::MAX)], Network::Regtest).is_err());
        let mut s = Sim::new(vec![door(crate::rules::MAX_CONFIRMATIONS)]);
        s.connect(vec![pay(1, &address(1), 25_000)]);
        s.mine(3);
        s.disconnect();
        s.disconnect();
        assert!(s.e.log().unwrap().is_empty());
        assert!(buried(u32::MAX, 1, Some(u32::MAX)) && !buried(u32::MAX, 2, Some(u32::MAX)) && !buried(1, 1, None));
    }

    #[test]
    fn entries_of_an_older_database_get_their_trigger_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.sqlite");
        {
            let db = Connection::open(&path).unwrap();
            db.execute_batch(SCHEMA).unwrap();
            for id in ["door:aa:0", "door:aa:0:revert"] {
                db.execute(
                    "INSERT INTO act_outbox (event_id, rule_id, device, command, args, height, state, due_ms) VALUES (?1, 'door', 'lock-7', 'x', 'null', 1, 'acked', 0)",
                    [id],
                )
                .unwrap();
            }
        }
        let e = Engine::open(&path, RuleSet::default(), Network::Regtest, "gw.test/log").unwrap();
        let a = e.get("door:aa:0").unwrap().unwrap();
        assert_eq!((a.trigger_key.as_deref(), a.generation, a.reverts), (Some("door:aa:0"), Some(1), None));
        let r = e.get("door:aa:0:revert").unwrap().unwrap();
        assert_eq!((r.trigger_key.as_deref(), r.reverts.as_deref()), (Some("door:aa:0"), Some("door:aa:0")));
    }
}
