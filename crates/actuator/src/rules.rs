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
//!
//! [[rule]]
//! id = "door-7-remote"
//! device = "lock-7"
//! # an OP_RETURN signed by this key for this gateway, network, domain and device
//! trigger = { kind = "command", key = "01…", domain = "site-7/doors", confirmations = 2 }
//! action = { command = "*" }              # whatever word the command carries
//! revert = { command = "inverse" }
//!
//! [[rule]]
//! id = "coffee"
//! device = "lock-7"
//! # paid by a BOLT11 invoice of the gateway's Lightning node (one per payment order)
//! trigger = { kind = "lightning", amount_msat = 50000, expiry_secs = 600 }
//! action = { command = "unlock" }
//!
//! [[rule]]
//! id = "notify"
//! device = "door-7"
//! trigger = { kind = "height", height = 900000 }
//! # delivered by an HTTP POST signed with HMAC-SHA256 instead of MQTT …
//! action = { command = "unlock", webhook = { url = "http://127.0.0.1:9000/hook", secret_file = "/etc/bitmote/hook.secret" } }
//! # … or by running a local program: action = { command = "unlock", exec = { program = "/usr/local/bin/open-door", args = ["7"] } }
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

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
    /// `"BM" 0x02 || seq u32 || expires u24 || command || BIP340 signature` by `key`
    /// over the network, the gateway's log origin, `domain` and the device (see
    /// [`crate::command`]), mined by its expiry height and buried under `confirmations`
    /// blocks. Sequence numbers only go up per (key, device), so a command can never be
    /// replayed, here or anywhere else.
    Command {
        /// The authorized key (hex, bitmote encoding `01 || x-only key`).
        key: String,
        /// The command domain the signer signs (e.g. `site-7/doors`). Required; optional
        /// only so that a rule stored before it existed still loads (it matches nothing).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        domain: Option<String>,
        #[serde(default = "one")]
        confirmations: u32,
    },
    /// A Lightning payment of `amount_msat` to the gateway's node: each payment order
    /// for this rule (`POST /v1/devices/{id}/orders` with `{"rule": id}`) gets a BOLT11
    /// invoice of its own, valid for `expiry_secs`, and fires once when it is paid
    /// (keyed by its payment hash). Lightning payments are final once claimed: no
    /// confirmations, no reorgs.
    Lightning {
        amount_msat: u64,
        #[serde(default = "default_expiry")]
        expiry_secs: u32,
    },
}

fn one() -> u32 {
    1
}

fn default_expiry() -> u32 {
    600
}

/// A command for the device, and how it reaches it: over MQTT (the default), a
/// webhook, or a local program.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    pub command: String,
    #[serde(default)]
    pub args: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<Webhook>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<Exec>,
}

/// `POST /v1/devices/{id}/orders` (admin), an on-chain payment order: pay at least
/// `min_sat` to a fresh gateway address, and the device does `action`. The gateway makes it
/// a payment rule ([`OrderRequest::rule`]); the same type on both sides of the API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderRequest {
    pub min_sat: u64,
    /// Default 1, as in rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmations: Option<u32>,
    pub action: Action,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revert: Option<Action>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
}

impl OrderRequest {
    /// The payment rule `id` for `device`, paid to `address`.
    pub fn rule(&self, id: String, device: &str, address: String) -> Rule {
        Rule {
            id,
            device: device.into(),
            trigger: Trigger::Payment { address, min_sat: self.min_sat, confirmations: self.confirmations.unwrap_or(1) },
            action: self.action.clone(),
            revert: self.revert.clone(),
            ttl_secs: self.ttl_secs,
        }
    }
}

/// The gateway's answer to an [`OrderRequest`]: where to pay, and how much.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentOrder {
    /// The order's rule id.
    pub order_id: String,
    pub device: String,
    pub address: String,
    /// At least this much, in sat.
    pub amount: u64,
    pub confirmations: Option<u32>,
}

impl Action {
    /// An MQTT action with no arguments.
    pub fn new(command: &str) -> Action {
        Action { command: command.to_string(), args: serde_json::Value::Null, webhook: None, exec: None }
    }
}

/// Deliver an action by an HTTP POST of its JSON, signed with HMAC-SHA256; any 2xx
/// answer acknowledges it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    /// `http://…` (this build has no TLS: put a TLS-terminating proxy in front of remote receivers).
    pub url: String,
    /// Absolute path of the file holding the HMAC secret (mode 0600; surrounding whitespace
    /// is ignored). It is read again on every attempt, so it can be rotated.
    pub secret_file: PathBuf,
    /// Seconds to wait for the answer (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
}

/// Deliver an action by running a local program with the action JSON on its standard
/// input and `BITMOTE_EVENT_ID` in its environment; exit status 0 acknowledges it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exec {
    /// Absolute path of an executable file.
    pub program: PathBuf,
    #[serde(default)]
    pub args: Vec<String>,
    /// Seconds before the program is killed and the attempt counts as failed (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
}

/// How an action is delivered (recorded with each outbox entry).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    Mqtt,
    Webhook(Webhook),
    Exec(Exec),
}

/// Timeout of a webhook or program when the rule gives none.
pub const DEFAULT_DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

fn timeout(secs: Option<u64>) -> Duration {
    secs.map(Duration::from_secs).unwrap_or(DEFAULT_DELIVERY_TIMEOUT)
}

/// The file's mode bits, refusing paths that are relative or not regular files.
fn file_mode(path: &Path, what: &str) -> Result<u32, String> {
    use std::os::unix::fs::PermissionsExt;
    if !path.is_absolute() {
        return Err(format!("{what} {} must be an absolute path", path.display()));
    }
    let m = std::fs::metadata(path).map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if !m.is_file() {
        return Err(format!("{what} {} is not a file", path.display()));
    }
    Ok(m.permissions().mode())
}

impl Webhook {
    pub fn timeout(&self) -> Duration {
        timeout(self.timeout_secs)
    }

    /// The HMAC secret, from a file only its owner can read.
    pub fn secret(&self) -> Result<Vec<u8>, String> {
        if file_mode(&self.secret_file, "secret_file")? & 0o077 != 0 {
            return Err(format!("secret_file {} must be readable by its owner only (chmod 600)", self.secret_file.display()));
        }
        let text = std::fs::read_to_string(&self.secret_file).map_err(|e| format!("secret_file {}: {e}", self.secret_file.display()))?;
        match text.trim() {
            "" => Err(format!("secret_file {} is empty", self.secret_file.display())),
            t => Ok(t.as_bytes().to_vec()),
        }
    }
}

impl Exec {
    pub fn timeout(&self) -> Duration {
        timeout(self.timeout_secs)
    }
}

impl Action {
    pub fn delivery(&self) -> Delivery {
        match (&self.webhook, &self.exec) {
            (Some(w), _) => Delivery::Webhook(w.clone()),
            (_, Some(e)) => Delivery::Exec(e.clone()),
            _ => Delivery::Mqtt,
        }
    }

    fn check(&self) -> Result<(), String> {
        if self.command.is_empty() {
            return Err("the command is empty".into());
        }
        match (&self.webhook, &self.exec) {
            (Some(_), Some(_)) => return Err("an action has a webhook or an exec, not both".into()),
            (Some(w), None) => {
                if !w.url.starts_with("http://") {
                    return Err(format!("webhook url {:?} must start with http:// (no TLS in this build)", w.url));
                }
                w.secret()?;
            }
            (None, Some(e)) => {
                if file_mode(&e.program, "program")? & 0o111 == 0 {
                    return Err(format!("program {} is not executable", e.program.display()));
                }
            }
            (None, None) => {}
        }
        let t = self.webhook.as_ref().and_then(|w| w.timeout_secs).or(self.exec.as_ref().and_then(|e| e.timeout_secs));
        if t == Some(0) {
            return Err("timeout_secs must be positive".into());
        }
        Ok(())
    }
}

impl Trigger {
    /// Blocks the triggering transaction must be buried under (none for heights).
    pub fn confirmations(&self) -> Option<u32> {
        match self {
            Trigger::Payment { confirmations, .. } | Trigger::Command { confirmations, .. } => Some(*confirmations),
            Trigger::Height { .. } | Trigger::Lightning { .. } => None,
        }
    }

    /// The trigger's kind, as in rules (`payment`, `height`, `command`, `lightning`).
    pub fn kind(&self) -> &'static str {
        match self {
            Trigger::Payment { .. } => "payment",
            Trigger::Height { .. } => "height",
            Trigger::Command { .. } => "command",
            Trigger::Lightning { .. } => "lightning",
        }
    }
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
    /// The command [`INVERSE`] means the inverse of the command the action executed
    /// (see [`inverse_of`]): for rules whose action is `*`, such as signed commands.
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
            Trigger::Height { .. } | Trigger::Command { .. } | Trigger::Lightning { .. } => Ok(None),
        }
    }

    fn invalid(&self, why: String) -> RuleError {
        RuleError::Invalid { id: self.id.clone(), why }
    }

    /// Check the rule makes sense on `network`.
    pub fn check(&self, network: Network) -> Result<(), RuleError> {
        if let Some(c) = self.trigger.confirmations() {
            if c > MAX_CONFIRMATIONS {
                return Err(self.invalid(format!("confirmations = {c} is more than {MAX_CONFIRMATIONS} (about 70 days of blocks)")));
            }
        }
        if self.id.is_empty() || self.id.contains(':') {
            return Err(self.invalid("ids must be non-empty and must not contain ':'".into()));
        }
        for a in std::iter::once(&self.action).chain(self.revert.as_ref()) {
            let d = depth(&a.args);
            if d > MAX_ARGS_DEPTH {
                return Err(self.invalid(format!("the args of {:?} are nested {d} deep, more than {MAX_ARGS_DEPTH}", a.command)));
            }
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
        if let Trigger::Command { key, confirmations, domain } = &self.trigger {
            let k: bitmote_device::PublicKey = key.parse().map_err(|e| self.invalid(format!("key: {e}")))?;
            if !matches!(k, bitmote_device::PublicKey::Schnorr(_)) {
                return Err(self.invalid("on-chain commands are signed with BIP340 keys (01…)".into()));
            }
            let Some(domain) = domain else {
                return Err(self.invalid(
                    "name the command domain the signer signs (domain = \"site-7/doors\"): a command is bound to it, \
                     to the network, the gateway's log origin and the device"
                        .into(),
                ));
            };
            if domain.is_empty() || domain.len() > crate::command::MAX_NAME || self.device.len() > crate::command::MAX_NAME {
                return Err(self.invalid(format!("the domain and the device are 1 to {} bytes", crate::command::MAX_NAME)));
            }
            if *confirmations == 0 {
                return Err(self.invalid("confirmations = 0 is not supported; use at least 1".into()));
            }
        }
        if let Trigger::Lightning { amount_msat, expiry_secs } = &self.trigger {
            if *amount_msat == 0 {
                return Err(self.invalid("amount_msat must be positive".into()));
            }
            if *expiry_secs == 0 {
                return Err(self.invalid("expiry_secs must be positive".into()));
            }
            if self.revert.is_some() {
                return Err(self.invalid("Lightning payments are final once received: a revert action would never run".into()));
            }
        }
        for (what, a) in [("action", Some(&self.action)), ("revert", self.revert.as_ref())] {
            if let Some(a) = a {
                a.check().map_err(|why| self.invalid(format!("{what}: {why}")))?;
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
        // A number of confirmations near u32::MAX would wrap `height + confirmations`.
        for c in [10_001u64, u32::MAX as u64] {
            let huge = text.replace("min_sat = 20000", &format!("min_sat = 20000, confirmations = {c}"));
            let e = RuleSet::parse(&huge, Network::Regtest).unwrap_err().to_string();
            assert!(e.contains(&format!("confirmations = {c} is more than 10000")), "{e}");
        }
        let most = text.replace("min_sat = 20000", "min_sat = 20000, confirmations = 10000");
        assert!(RuleSet::parse(&most, Network::Regtest).is_ok());
        let dup = text.replace("id = \"lease\"", "id = \"door\"");
        assert!(RuleSet::parse(&dup, Network::Regtest).unwrap_err().to_string().contains("duplicate"));
        assert!(matches!(RuleSet::parse("[[rule]]\nid = 1\n", Network::Regtest), Err(RuleError::Parse(_))));
        let typo = text.replace("ttl_secs", "ttl_sec");
        assert!(RuleSet::parse(&typo, Network::Regtest).is_err(), "unknown keys are refused");
    }

    #[test]
    fn deeply_nested_args_are_refused() {
        // The fuzz target's find: dotted keys nest args past serde_json's read-back limit.
        let dotted: Vec<String> = (0..60).map(|i| format!("k{i}")).collect();
        let text = format!(
            "[[rule]]\nid = \"r\"\ndevice = \"relay-3\"\ntrigger = {{ kind = \"height\", height = 9 }}\naction = {{ command = \"on\", args.{} = 1 }}\n",
            dotted.join(".")
        );
        let e = RuleSet::parse(&text, Network::Regtest).unwrap_err().to_string();
        assert!(e.contains("nested 60 deep, more than 32"), "{e}");
        let ok = text.replace(&dotted.join("."), &dotted[..32].join("."));
        let rs = RuleSet::parse(&ok, Network::Regtest).unwrap();
        let json = serde_json::to_string(&rs.rules[0]).unwrap();
        assert_eq!(serde_json::from_str::<Rule>(&json).unwrap(), rs.rules[0], "what is accepted loads back");
    }

    #[test]
    fn a_command_rule_names_its_domain() {
        let key = "01".to_string() + "79be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798";
        let text = |trigger: &str| {
            format!("[[rule]]\nid = \"remote\"\ndevice = \"lock-7\"\ntrigger = {trigger}\naction = {{ command = \"*\" }}\n")
        };
        let without = text(&format!("{{ kind = \"command\", key = \"{key}\" }}"));
        let e = RuleSet::parse(&without, Network::Regtest).unwrap_err().to_string();
        assert!(e.contains("name the command domain"), "{e}");
        let empty = text(&format!("{{ kind = \"command\", key = \"{key}\", domain = \"\" }}"));
        assert!(RuleSet::parse(&empty, Network::Regtest).unwrap_err().to_string().contains("1 to 255 bytes"));
        let with = text(&format!("{{ kind = \"command\", key = \"{key}\", domain = \"site-7/doors\" }}"));
        let rs = RuleSet::parse(&with, Network::Regtest).unwrap();
        assert!(matches!(&rs.rules[0].trigger, Trigger::Command { domain: Some(d), .. } if d == "site-7/doors"));
    }

    #[test]
    fn webhooks_need_a_private_secret_file_and_programs_must_be_executable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("hook.secret");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let rule = |action: &str| {
            format!("[[rule]]\nid = \"r\"\ndevice = \"d\"\ntrigger = {{ kind = \"height\", height = 5 }}\naction = {action}\n")
        };
        let hook = rule(&format!(
            "{{ command = \"on\", webhook = {{ url = \"http://127.0.0.1:9/h\", secret_file = \"{}\" }} }}",
            secret.display()
        ));
        let chmod = |p: &Path, mode| std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
        chmod(&secret, 0o644);
        let err = RuleSet::parse(&hook, Network::Regtest).unwrap_err().to_string();
        assert!(err.contains("owner only"), "{err}");
        chmod(&secret, 0o600);
        let rs = RuleSet::parse(&hook, Network::Regtest).unwrap();
        let Delivery::Webhook(w) = rs.rules[0].action.delivery() else { panic!("a webhook") };
        assert_eq!(w.secret().unwrap(), b"s3cret", "trimmed");
        assert_eq!(w.timeout(), DEFAULT_DELIVERY_TIMEOUT);
        assert!(RuleSet::parse(&hook.replace("http://", "ftp://"), Network::Regtest).is_err());
        let relative = hook.replace(&secret.display().to_string(), "hook.secret");
        assert!(RuleSet::parse(&relative, Network::Regtest).unwrap_err().to_string().contains("absolute"));

        let program = dir.path().join("act.sh");
        std::fs::write(&program, "#!/bin/sh\nexit 0\n").unwrap();
        chmod(&program, 0o644);
        let exec =
            rule(&format!("{{ command = \"on\", exec = {{ program = \"{}\", args = [\"7\"], timeout_secs = 2 }} }}", program.display()));
        assert!(RuleSet::parse(&exec, Network::Regtest).unwrap_err().to_string().contains("not executable"));
        chmod(&program, 0o755);
        let rs = RuleSet::parse(&exec, Network::Regtest).unwrap();
        assert!(matches!(rs.rules[0].action.delivery(), Delivery::Exec(e) if e.args == ["7"] && e.timeout() == Duration::from_secs(2)));
        assert!(RuleSet::parse(&exec.replace("timeout_secs = 2", "timeout_secs = 0"), Network::Regtest).is_err());
        let both = hook.replace("} }", &format!("}}, exec = {{ program = \"{}\" }} }}", program.display()));
        assert!(RuleSet::parse(&both, Network::Regtest).unwrap_err().to_string().contains("not both"), "{both}");
    }

    /// Found by `fuzz/` (target `rules_json`): a rule's float argument changed in the last
    /// digit when the engine stored the rule as JSON and loaded it back (serde_json without
    /// `float_roundtrip`), so a restart changed the action's arguments.
    #[test]
    fn a_stored_rule_loads_back_with_the_same_arguments() {
        let text = r#"{"id": "r", "device": "d", "trigger": {"kind": "height", "height": 9}, "action": {"command": "set", "args": {"x": 1.3333333333333337, "y": 1e-142}}}"#;
        let rule: Rule = serde_json::from_str(text).unwrap();
        assert_eq!(rule.action.args["x"].as_f64(), Some(1.3333333333333337));
        assert_eq!(rule.action.args["y"].as_f64(), Some(1e-142));
        let back: Rule = serde_json::from_str(&serde_json::to_string(&rule).unwrap()).unwrap();
        assert_eq!(back, rule);
    }
}

/// A revert command meaning "the inverse of what the action did".
/// The most confirmations a rule may ask for: deeper than any sensible finality, and
/// small enough that `height + confirmations` stays far from overflowing a block height.
pub const MAX_CONFIRMATIONS: u32 = 10_000;

/// Deepest nesting of an action's `args`. Found by the `rules_toml` fuzz target: TOML's dotted
/// keys nest args deeper than serde_json reads back (128), so a rule that parsed could store
/// actions the engine cannot load again.
pub const MAX_ARGS_DEPTH: usize = 32;

/// How deep a JSON value nests (a scalar is 0).
fn depth(v: &serde_json::Value) -> usize {
    // Iterative: a value nested far too deep must not overflow the stack here either.
    let mut stack = vec![(v, 0usize)];
    let mut most = 0;
    while let Some((v, d)) = stack.pop() {
        most = most.max(d);
        match v {
            serde_json::Value::Array(a) => stack.extend(a.iter().map(|x| (x, d + 1))),
            serde_json::Value::Object(o) => stack.extend(o.values().map(|x| (x, d + 1))),
            _ => {}
        }
    }
    most
}

pub const INVERSE: &str = "inverse";

/// The command that undoes `command`, for the commands bitmote's devices know.
pub fn inverse_of(command: &str) -> Option<&'static str> {
    Some(match command {
        "on" => "off",
        "off" => "on",
        "open" => "close",
        "close" => "open",
        "unlock" => "lock",
        "lock" => "unlock",
        _ => return None,
    })
}

#[cfg(test)]
mod inverse_tests {
    use super::*;

    #[test]
    fn every_known_command_has_an_inverse_that_undoes_it() {
        for c in ["on", "off", "open", "close", "unlock", "lock"] {
            let i = inverse_of(c).unwrap();
            assert_eq!(inverse_of(i), Some(c));
            assert_ne!(i, c);
        }
        assert_eq!(inverse_of("reboot"), None);
    }
}
