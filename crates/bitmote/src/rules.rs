//! `bitmote rules …`: the gateway's actuator rules, through its API (admin token).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use serde::Deserialize;

use crate::api::admin;
use crate::config::Config;
use crate::Global;

/// What `GET /v1/rules` lists of each rule (the gateway's `RuleEntry`: a rule and its source).
#[derive(Deserialize)]
struct Listed {
    id: String,
    device: String,
    trigger: Kind,
    action: Named,
    source: String,
}

#[derive(Deserialize)]
struct Kind {
    kind: String,
}

#[derive(Deserialize)]
struct Named {
    command: String,
}

#[derive(Deserialize)]
struct Added {
    rule: Id,
}

#[derive(Deserialize)]
struct Id {
    id: String,
}

#[derive(Subcommand, Debug)]
pub enum RulesCommand {
    /// The rules the gateway watches: from rules.toml and added over the API.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Add the rules of a TOML file (`[[rule]]` tables, as in rules.toml); they apply
    /// from the next block and are kept across restarts.
    Add { file: PathBuf },
    /// Remove a rule added over the API (rules.toml's are edited in the file).
    Remove { id: String },
}

pub fn rules(g: &Global, cmd: RulesCommand) -> Result<()> {
    let gw = admin(g, &Config::load(g.config.as_deref(), &g.data_dir())?.gateway_url())?;
    match cmd {
        RulesCommand::List { json } => {
            #[derive(Deserialize)]
            struct Rules<T> {
                rules: Vec<T>,
            }
            if json {
                let r: Rules<serde_json::Value> = gw.get("/v1/rules")?;
                println!("{}", serde_json::to_string_pretty(&r.rules)?);
                return Ok(());
            }
            let r: Rules<Listed> = gw.get("/v1/rules")?;
            for r in r.rules {
                println!("{:<24} {:<12} {:<8} {:<10} {}", r.id, r.device, r.trigger.kind, r.action.command, r.source);
            }
            Ok(())
        }
        RulesCommand::Add { file } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let doc: toml::Value = toml::from_str(&text).with_context(|| format!("{} is not TOML", file.display()))?;
            let list = doc.get("rule").and_then(|r| r.as_array()).context("no [[rule]] in the file")?;
            for rule in list {
                let r: Added = gw.post("/v1/rules", rule)?;
                println!("added {}", r.rule.id);
            }
            Ok(())
        }
        RulesCommand::Remove { id } => {
            gw.delete(&format!("/v1/rules/{id}"))?;
            println!("removed {id}");
            Ok(())
        }
    }
}
