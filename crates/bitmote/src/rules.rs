//! `bitmote rules …`: the gateway's actuator rules, through its API (admin token).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use serde_json::Value as Json;

use crate::config::Config;
use crate::device::{admin_request, api_err};
use crate::Global;

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
    let url = format!("{}/v1/rules", Config::load(g.config.as_deref(), &g.data_dir())?.gateway_url());
    match cmd {
        RulesCommand::List { json } => {
            let r: Json = admin_request(g, "GET", &url)?.call().map_err(api_err)?.into_json()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r["rules"])?);
                return Ok(());
            }
            for r in r["rules"].as_array().cloned().unwrap_or_default() {
                let s = |v: &Json| v.as_str().unwrap_or("").to_string();
                println!(
                    "{:<24} {:<12} {:<8} {:<10} {}",
                    s(&r["id"]),
                    s(&r["device"]),
                    s(&r["trigger"]["kind"]),
                    s(&r["action"]["command"]),
                    s(&r["source"])
                );
            }
            Ok(())
        }
        RulesCommand::Add { file } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let doc: toml::Value = toml::from_str(&text).with_context(|| format!("{} is not TOML", file.display()))?;
            let list = doc.get("rule").and_then(|r| r.as_array()).context("no [[rule]] in the file")?;
            for rule in list {
                let r: Json = admin_request(g, "POST", &url)?.send_json(serde_json::to_value(rule)?).map_err(api_err)?.into_json()?;
                println!("added {}", r["rule"]["id"].as_str().unwrap_or(""));
            }
            Ok(())
        }
        RulesCommand::Remove { id } => {
            admin_request(g, "DELETE", &format!("{url}/{id}"))?.call().map_err(api_err)?;
            println!("removed {id}");
            Ok(())
        }
    }
}
