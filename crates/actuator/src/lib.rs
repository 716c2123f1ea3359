//! bitmote-actuator: devices that react to chain events exactly once.
//!
//! * [`rules`]: what triggers what (payments with confirmations, block heights,
//!   authenticated on-chain commands), from TOML;
//! * [`command`]: the signed, numbered OP_RETURN command format;
//! * [`engine`]: applies reorg-aware block events to the rules, atomically with its
//!   cursor, and keeps the exactly-once outbox of actions (due → delivered → acked, or
//!   cancelled / expired / reverted with alerts).
//!
//! Delivery to devices (MQTT commands with acknowledgements, webhooks), the device-side
//! actuator program, authenticated on-chain commands and the light-client mode build
//! on this outbox.

pub mod command;
pub mod engine;
pub mod rules;

pub use engine::{Engine, EngineError, EngineEvent, OutboxItem, OutboxState};
pub use rules::{Action, Rule, RuleError, RuleSet, Trigger};
