//! A rule in JSON (`POST /v1/rules`, then `Rule::check` in the engine). Properties: a rule
//! that checks is stored as JSON and loads back the same and still checks; written as a
//! TOML rule file it parses to the same rule.
#![no_main]
use bitmote_actuator::{Rule, RuleSet};
use bitcoin::Network;
use libfuzzer_sys::fuzz_target;

#[derive(serde::Serialize)]
struct File<'a> {
    rule: &'a [Rule],
}

fuzz_target!(|data: &[u8]| {
    let Ok(rule) = serde_json::from_slice::<Rule>(data) else { return };
    if rule.check(Network::Regtest).is_err() {
        return;
    }
    let _ = rule.action.delivery();
    let json = serde_json::to_string(&rule).expect("a rule serializes");
    let back: Rule = serde_json::from_str(&json).expect("a stored rule loads back");
    assert_eq!(back, rule, "JSON round trip changed the rule");
    if let Ok(toml_text) = toml::to_string(&File { rule: std::slice::from_ref(&rule) }) {
        match RuleSet::parse(&toml_text, Network::Regtest) {
            Ok(again) => assert_eq!(again.rules, vec![rule], "TOML round trip changed the rule"),
            // See rules_toml.rs: the toml crate's writer exceeds its parser's dotted-key limit.
            Err(e) if e.to_string().contains("recursion limit exceeded") => {}
            Err(e) => panic!("the rule written as TOML does not parse: {e}\n{toml_text}"),
        }
    }
});
