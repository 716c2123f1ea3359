//! `bitmote status`: the health of every component of a running `bitmote up` — the
//! node, the gateway's HTTP API and MQTT broker, anchoring, devices, the fleet's
//! processes and the Lightning session — as text or JSON.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use serde_json::{json, Value as Json};

use crate::config::Config;
use crate::Global;

fn get(url: &str) -> Result<Json, String> {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(3)).build();
    agent.get(url).call().map_err(|e| e.to_string())?.into_json().map_err(|e| e.to_string())
}

fn alive(pid: u64) -> bool {
    // A zombie (exited, not yet reaped) counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// Whether a `bitmote up` holds the data directory's lock.
fn up_running(data_dir: &Path) -> bool {
    let Ok(f) = std::fs::OpenOptions::new().write(true).open(data_dir.join("bitmote.lock")) else { return false };
    match f.try_lock() {
        Ok(()) => false,
        Err(_) => true,
    }
}

/// Everything `bitmote status` reports, with `ok` per component.
pub fn collect(g: &Global) -> Result<Json> {
    let data_dir = g.data_dir();
    let cfg = Config::load(g.config.as_deref(), &data_dir)?;
    let running = up_running(&data_dir);
    let up: Json = std::fs::read(data_dir.join("up.json")).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or(Json::Null);
    let up = if running { up } else { Json::Null };

    let bitcoind = match crate::node::connect(g, &cfg).and_then(|c| Ok(c.info()?)) {
        Ok(i) => json!({ "ok": !i.initial_block_download, "network": i.network.to_core_arg(), "version": i.version,
                         "height": i.blocks, "headers": i.headers, "synced": !i.initial_block_download && i.blocks == i.headers,
                         "peers": i.connections }),
        Err(e) => json!({ "ok": false, "error": format!("{e:#}") }),
    };
    let api = up["http"].as_str().map(String::from).unwrap_or_else(|| cfg.gateway_url());
    let dash = get(&format!("{api}/v1/dashboard"));
    let gateway = match &dash {
        Ok(_) => json!({ "ok": true, "url": api }),
        Err(e) => json!({ "ok": false, "url": api, "error": e }),
    };
    let anchoring = match &dash {
        Ok(d) => {
            let list = d["anchors"]["anchors"].as_array().cloned().unwrap_or_default();
            let confirmed = list.iter().find(|a| a["state"] == "confirmed");
            json!({ "ok": d["anchors"]["status"] == "ok", "status": d["anchors"]["status"], "node": d["anchors"]["node"], "log_size": d["log"]["tree_size"],
                    "anchors_shown": list.len(), "pending": list.iter().filter(|a| a["state"] == "pending").count(),
                    "last_confirmed": confirmed.map(|a| json!({ "tree_size": a["tree_size"], "block_height": a["block_height"], "confirmations": a["confirmations"] })) })
        }
        Err(_) => json!({ "ok": false }),
    };
    let devices = match &dash {
        Ok(d) => {
            let list = d["devices"].as_array().cloned().unwrap_or_default();
            let online = list.iter().filter(|x| x["presence"]["state"] == "online").count();
            let enrolled = list.iter().filter(|x| !x["id"].is_null()).count();
            let revoked = list.iter().filter(|x| !x["revoked_ms"].is_null()).count();
            json!({ "ok": true, "enrolled": enrolled, "revoked": revoked, "online": online,
                    "actions": d["actions"].as_array().map_or(0, Vec::len), "alerts": d["alerts"].as_array().map_or(0, Vec::len) })
        }
        Err(_) => json!({ "ok": false }),
    };
    let mqtt = match up["mqtt"].as_str().map(String::from).or_else(|| cfg.mqtt_listen().ok().flatten().map(|a| format!("mqtt://{a}"))) {
        Some(url) => {
            let addr = url.trim_start_matches("mqtt://").to_string();
            let reachable = addr.parse().ok().is_some_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok());
            json!({ "ok": reachable, "url": url })
        }
        None => json!({ "ok": true, "url": null, "note": "off" }),
    };
    let fleet = match up["fleet"].as_array() {
        Some(members) => {
            let list: Vec<Json> = members
                .iter()
                .map(|m| {
                    let alive = m["pid"].as_u64().is_some_and(alive);
                    json!({ "name": m["name"], "kind": m["kind"], "pid": m["pid"], "alive": alive, "restarts": m["restarts"], "log": m["log"] })
                })
                .collect();
            let up_count = list.iter().filter(|m| m["alive"] == true).count();
            json!({ "ok": up_count == list.len(), "alive": up_count, "total": list.len(), "members": list, "driver": up["driver"] })
        }
        None => json!({ "ok": true, "note": "no simulated fleet" }),
    };
    let mut lightning = vec![];
    for key in ["provider_url", "meter_url"] {
        let Some(url) = up[key].as_str() else { continue };
        lightning.push(match get(&format!("{url}/v1/status")) {
            Ok(st) => {
                let s = st["sessions"].as_array().and_then(|v| v.iter().rev().find(|s| s["state"] == "open").or(v.last())).cloned();
                json!({ "ok": true, "role": st["role"], "url": url, "channels": st["node"]["channels"].as_array().map_or(0, Vec::len),
                        "session": s.map(|s| json!({ "id": s["id"], "state": s["state"], "ticks": s["account"]["ticks"],
                                                      "paid_msat": s["account"]["paid_msat"], "energy_wh": s["energy_wh"] })) })
            }
            Err(e) => json!({ "ok": false, "role": key.trim_end_matches("_url"), "url": url, "error": e }),
        });
    }
    let parts = [&bitcoind, &gateway, &mqtt, &anchoring, &devices, &fleet];
    let ok = running && parts.iter().all(|p| p["ok"] == true) && lightning.iter().all(|p| p["ok"] == true);
    Ok(json!({
        "ok": ok, "up": { "running": running, "pid": up["pid"], "data_dir": data_dir },
        "bitcoind": bitcoind, "gateway": gateway, "mqtt": mqtt, "anchoring": anchoring, "devices": devices,
        "fleet": fleet, "lightning": lightning,
    }))
}

fn mark(ok: &Json) -> &'static str {
    if ok == &json!(true) {
        "ok  "
    } else {
        "FAIL"
    }
}

/// `bitmote status [--json]`: exit code 0 when all is well, 2 when something is not,
/// 3 when no `bitmote up` runs on the data directory.
pub fn status(g: &Global, as_json: bool) -> Result<()> {
    let s = collect(g)?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        let running = s["up"]["running"] == true;
        println!("bitmote up : {}", if running { format!("running (pid {})", s["up"]["pid"]) } else { "not running".into() });
        let b = &s["bitcoind"];
        match b["error"].as_str() {
            Some(e) => println!("[{}] bitcoind  : {e}", mark(&b["ok"])),
            None => println!(
                "[{}] bitcoind  : {} on {}, height {} (headers {}){}, {} peers",
                mark(&b["ok"]),
                b["version"].as_str().unwrap_or(""),
                b["network"].as_str().unwrap_or(""),
                b["height"],
                b["headers"],
                if b["synced"] == true { ", synced" } else { ", syncing" },
                b["peers"]
            ),
        }
        let gw = &s["gateway"];
        println!(
            "[{}] gateway   : {}{}",
            mark(&gw["ok"]),
            gw["url"].as_str().unwrap_or(""),
            gw["error"].as_str().map(|e| format!(" ({e})")).unwrap_or_default()
        );
        let m = &s["mqtt"];
        println!("[{}] mqtt      : {}", mark(&m["ok"]), m["url"].as_str().unwrap_or("off"));
        let a = &s["anchoring"];
        let last = &a["last_confirmed"];
        println!(
            "[{}] anchoring : {}; log size {}, {} pending{}",
            mark(&a["ok"]),
            a["status"].as_str().unwrap_or("unknown"),
            a["log_size"],
            a["pending"],
            if last.is_null() {
                String::new()
            } else {
                format!(
                    ", last confirmed: {} readings in block {} ({} conf.)",
                    last["tree_size"], last["block_height"], last["confirmations"]
                )
            }
        );
        let d = &s["devices"];
        println!(
            "[{}] devices   : {} enrolled ({} revoked), {} online; {} actions, {} alerts",
            mark(&d["ok"]),
            d["enrolled"],
            d["revoked"],
            d["online"],
            d["actions"],
            d["alerts"]
        );
        let f = &s["fleet"];
        match f["members"].as_array() {
            Some(members) => {
                println!("[{}] fleet     : {}/{} processes alive", mark(&f["ok"]), f["alive"], f["total"]);
                for m in members.iter().filter(|m| m["alive"] != true) {
                    println!(
                        "       {} ({}) is not running; log {}",
                        m["name"].as_str().unwrap_or(""),
                        m["kind"].as_str().unwrap_or(""),
                        m["log"].as_str().unwrap_or("")
                    );
                }
                let dr = &f["driver"];
                if !dr.is_null() {
                    println!("       {} rentals of {}, {} relay commands", dr["rentals"], bitmote_sim::fleet::LOCK, dr["relay_commands"]);
                }
            }
            None => println!("[ok  ] fleet     : none"),
        }
        for l in s["lightning"].as_array().cloned().unwrap_or_default() {
            let role = l["role"].as_str().unwrap_or("");
            match l["error"].as_str() {
                Some(e) => println!("[{}] {role:<9} : {} ({e})", mark(&l["ok"]), l["url"].as_str().unwrap_or("")),
                None => {
                    let ss = &l["session"];
                    let session = if ss.is_null() {
                        "no session".to_string()
                    } else {
                        format!(
                            "session {} {}, {} ticks, {} msat paid",
                            ss["id"].as_str().map(|i| &i[..i.len().min(12)]).unwrap_or(""),
                            ss["state"].as_str().unwrap_or(""),
                            ss["ticks"],
                            ss["paid_msat"]
                        )
                    };
                    println!("[{}] {role:<9} : {} channel(s), {session}", mark(&l["ok"]), l["channels"]);
                }
            }
        }
    }
    let code = if s["up"]["running"] != true {
        3
    } else if s["ok"] == true {
        0
    } else {
        2
    };
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}
