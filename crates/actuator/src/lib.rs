//! bitmote-actuator: devices that react to chain events exactly once.
//!
//! * [`rules`]: what triggers what (payments with confirmations, block heights,
//!   authenticated on-chain commands, Lightning payments to the gateway's node), from TOML;
//! * [`command`]: the signed, numbered OP_RETURN command format;
//! * [`engine`]: applies reorg-aware block events to the rules, atomically with its
//!   cursor, and keeps the exactly-once outbox of actions (due → delivered → acked, or
//!   cancelled / expired / reverted with alerts), and the rules added over the API.
//!
//! Delivery (MQTT commands with acknowledgements, signed webhooks, local programs) is
//! the gateway's: it reads the outbox and records attempts and acknowledgements in it.

pub mod command;
pub mod engine;
pub mod rules;

pub use engine::{
    ClaimState, Command, Engine, EngineError, EngineEvent, Invoice, LightningPayment, OutboxItem, OutboxState, Payment, RuleEntry,
    RuleSource, Settle,
};
pub use rules::{Action, Delivery, Exec, Rule, RuleError, RuleSet, Trigger, Webhook};
