//! Rules: which chain event makes which device do what.
//!
//! ```toml
//! [[rule]]
//! id = "door-7-rental"
//! device = "lock-7"
//! trigger = { kind = "payment", address = "bcrt1q…", min_sat = 20000, confirmations = 1 }
//! action = { command = "unlock", args = { seconds = 3600 } }
//! revert = { command = "lock" }          # if a reorg takes the payment away after firing
//! ttl_secs = 300                          # not executed if delivered later than this
//!
//! [[rule]]
//! id = "lease-end"
//! device = "relay-2"
//! trigger = { kind = "height", height = 900000 }
//! action = { command = "off" }
//! ```

use std::collections::HashSet;
use std::str::FromStr;

use bitcoin::{Address, Network, ScriptBuf};
use serde::{Deserialize, Serialize};

/// Errors in a rule set.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuleError {
    #[error("rules file: {0}")]
    Parse(String),
    #[error("rule {id:?}: {why}")]
    Invalid { id: String, why: String },
}

/// What makes a rule fire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Trigger {
    /// A payment of at least `min_sat` to `address`, buried under `confirmations` blocks
    /// (each qualifying output fires once).
    Payment {
        address: String,
        min_sat: u64,
        #[serde(default = "one")]
        confirmations: u32,
    },
    /// The chain reaching `height` (leases, timeouts).
    Height { height: u32 },
    /// An authenticated on-chain command for this rule's device: an OP_RETURN
    /// `"BMC" 0x01 || seq u32 || len u8 || command || BIP340 signature` by `key`
    /// (see [`crate::command`]), buried under `confirmations` blocks. Sequence numbers
    /// only go up, so a command can never be replayed.
    Command {
        /// The authorized key (hex, bitmote encoding `01 || x-only key`).
        key: String,
        #[serde(default = "one")]
        confirmations: u32,
    },
}

fn one() -> u32 {
    1
}

/// A command for the device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    pub command: String,
    #[serde(default)]
    pub args: serde_json::Value,
}

/// One rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub id: String,
    pub device: String,
    pub trigger: Trigger,
    pub action: Action,
    /// What to do if a reorg takes the triggering event away after the action fired.
    #[serde(default)]
    pub revert: Option<Action>,
    /// A command delivered later than this after it became due is not executed.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    #[serde(default)]
    rule: Vec<Rule>,
}

/// A checked rule set for one network.
#[derive(Clone, Debug, Default)]
pub struct RuleSet {
    pub rules: Vec<Rule>,
}

impl Rule {
    /// The script a payment rule watches.
    pub fn watched_script(&self, network: Network) -> Result<Option<ScriptBuf>, RuleError> {
        match &self.trigger {
            Trigger::Payment { address, .. } => {
                let a = Address::from_str(address)
                    .map_err(|e| self.invalid(format!("address {address}: {e}")))?
                    .require_network(network)
                    .map_err(|_| self.invalid(format!("address {address} is not a {network} address")))?;
                Ok(Some(a.script_pubkey()))
            }
            Trigger::Height { .. } | Trigger::Command { .. } => Ok(None),
        }
    }

    fn invalid(&self, why: String) -> RuleError {
        RuleError::Invalid { id: self.id.clone(), why }
    }

    /// Check the rule makes sense on `network`.
    pub fn check(&self, network: Network) -> Result<(), RuleError> {
        if self.id.is_empty() || self.id.contains(':') {
            return Err(self.invalid("ids must be non-empty and must not contain ':'".into()));
        }
        if self.device.is_empty() {
            return Err(self.invalid("device is empty".into()));
        }
        if let Trigger::Payment { confirmations, min_sat, .. } = &self.trigger {
            if *confirmations == 0 {
                return Err(self.invalid("confirmations = 0 (acting on unconfirmed payments) is not supported; use at least 1".into()));
            }
            if *min_sat == 0 {
                return Err(self.invalid("min_sat must be positive".into()));
            }
        }
        if let Trigger::Command { key, confirmations } = &self.trigger {
            let k: bitmote_device::PublicKey = key.parse().map_err(|e| self.invalid(format!("key: {e}")))?;
            if !matches!(k, bitmote_device::PublicKey::Schnorr(_)) {
                return Err(self.invalid("on-chain commands are signed with BIP340 keys (01…)".into()));
            }
            if *confirmations == 0 {
                return Err(self.invalid("confirmations = 0 is not supported; use at least 1".into()));
            }
        }
        self.watched_script(network)?;
        Ok(())
    }
}

impl RuleSet {
    pub fn parse(text: &str, network: Network) -> Result<Self, RuleError> {
        let f: RuleFile = toml::from_str(text).map_err(|e| RuleError::Parse(e.to_string()))?;
        Self::new(f.rule, network)
    }

    pub fn new(rules: Vec<Rule>, network: Network) -> Result<Self, RuleError> {
        let mut ids = HashSet::new();
        for r in &rules {
            r.check(network)?;
            if !ids.insert(r.id.clone()) {
                return Err(r.invalid("duplicate rule id".into()));
            }
        }
        Ok(RuleSet { rules })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADDR: &str = "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080";

    #[test]
    fn parses_the_documented_example_and_refuses_nonsense() {
        let text = format!(
            "[[rule]]\nid = \"door\"\ndevice = \"lock-7\"\ntrigger = {{ kind = \"payment\", address = \"{ADDR}\", min_sat = 20000 }}\naction = {{ command = \"unlock\", args = {{ seconds = 3600 }} }}\nrevert = {{ command = \"lock\" }}\nttl_secs = 300\n\n[[rule]]\nid = \"lease\"\ndevice = \"relay\"\ntrigger = {{ kind = \"height\", height = 500 }}\naction = {{ command = \"off\" }}\n"
        );
        let rs = RuleSet::parse(&text, Network::Regtest).unwrap();
        assert_eq!(rs.rules.len(), 2);
        assert!(matches!(rs.rules[0].trigger, Trigger::Payment { confirmations: 1, .. }));
        assert!(matches!(RuleSet::parse(&text, Network::Bitcoin), Err(RuleError::Invalid { .. })), "wrong network address");
        let zero = text.replace("min_sat = 20000", "min_sat = 20000, confirmations = 0");
        assert!(RuleSet::parse(&zero, Network::Regtest).unwrap_err().to_string().contains("confirmations = 0"));
        let dup = text.replace("id = \"lease\"", "id = \"door\"");
        assert!(RuleSet::parse(&dup, Network::Regtest).unwrap_err().to_string().contains("duplicate"));
        assert!(matches!(RuleSet::parse("[[rule]]\nid = 1\n", Network::Regtest), Err(RuleError::Parse(_))));
        let typo = text.replace("ttl_secs", "ttl_sec");
        assert!(RuleSet::parse(&typo, Network::Regtest).is_err(), "unknown keys are refused");
    }
}
