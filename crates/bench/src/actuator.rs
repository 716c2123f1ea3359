//! `bitmote bench actuator`: how fast a payment becomes an action, what the rules cost per
//! block, and the memory of a device in light-client mode — each beside a limit or a
//! baseline measured in the same run.
//!
//! * Latency: a private regtest node, an in-process gateway with one payment rule per
//!   device, and the device program (`bitmote device actuator`) as a child process. Each
//!   trigger is a payment mined alone in a block; the time runs from `generatetoaddress`
//!   returning to the device's acknowledgement arriving at the gateway's MQTT broker. Run
//!   for a plain device (trusts the gateway) and a light-client device (checks the payment
//!   itself over P2P with compact filters).
//! * Rules: [`Engine::apply`] of one block of 2,500 transactions (5,000 outputs, 10 paying
//!   watched addresses) with 10,000 payment rules, against the same block with no rules.
//! * Memory: the resident set (VmRSS, VmHWM) of each device process after its triggers.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bitmote_actuator::{Action, Engine, Rule, RuleSet, Trigger};
use bitmote_chain::bitcoin::block::{Header, Version};
use bitmote_chain::bitcoin::hashes::Hash;
use bitmote_chain::bitcoin::{Address, Amount, Block, BlockHash, CompactTarget, Network, ScriptBuf, TxMerkleNode, TxOut};
use bitmote_chain::{BlockEvent, BlockId};
use bitmote_regtest::{coinbase_at, op_true_address, spend_op_true, RegtestNode, RegtestOptions};
use serde_json::{json, Value};

use crate::{summary, Env};

/// A watched address of its own for every index.
fn address(i: u32) -> Address {
    let mut script = vec![0x04];
    script.extend_from_slice(&i.to_le_bytes());
    Address::p2wsh(&ScriptBuf::from(script), Network::Regtest)
}

pub fn run(env: &Env, triggers: u32, rules: u32, json_out: bool) -> Result<()> {
    if triggers == 0 || rules == 0 {
        bail!("--triggers and --rules must be at least 1");
    }
    let dir = tempfile::Builder::new().prefix("bitmote-bench-").tempdir()?;
    let node = RegtestNode::start(RegtestOptions::new(env.bitcoind.clone())).context("starting a private regtest node")?;
    let c = node.client();
    c.mine(100 + 2 * triggers, &op_true_address())?;
    let devices = [("lock-plain", None), ("lock-light", Some(node.p2p_addr()))];
    let rules_toml: String = devices
        .iter()
        .enumerate()
        .map(|(i, (name, _))| {
            format!("[[rule]]\nid = \"{name}\"\ndevice = \"{name}\"\ntrigger = {{ kind = \"payment\", address = \"{}\", min_sat = 10000 }}\naction = {{ command = \"unlock\" }}\n", address(i as u32))
        })
        .collect();
    let gw_dir = dir.path().join("gateway");
    std::fs::create_dir_all(&gw_dir)?;
    std::fs::write(gw_dir.join("rules.toml"), rules_toml)?;
    let mut cfg = bitmote_gateway::GatewayConfig::new(&gw_dir);
    cfg.http_listen = "127.0.0.1:0".parse()?;
    cfg.mqtt_listen = Some("127.0.0.1:0".parse()?);
    let gw = bitmote_gateway::Gateway::start(cfg, c.fresh()?)?;
    let mqtt = gw.mqtt_addr.context("the gateway has no MQTT broker")?;
    // Each device is enrolled under its name, its MQTT password beside its key.
    for (i, (name, _)) in devices.iter().enumerate() {
        let key = bitmote_device::SigningKey::schnorr_from_secret(&[0x40 + i as u8; 32]).map_err(|e| anyhow::anyhow!("{e}"))?;
        let path = dir.path().join(format!("{name}.key"));
        bitmote_sim::keys::write_key(&path, &key)?;
        let d = gw.shared().ingest.enroll(&key.public_key(), Some(name))?;
        let creds = bitmote_gateway::mqtt_front::issue(gw.shared(), &*gw.shared().db()?, &d.id)?;
        bitmote_chain::wallet::write_secret(&bitmote_sim::keys::mqtt_file(&path), creds.password.as_bytes())?;
    }

    // The gateway's broker tells us each acknowledgement as it arrives (and each presence):
    // the operator's MQTT identity may read every device's topics.
    let mut opts = rumqttc::MqttOptions::new("bitmote-bench", mqtt.ip().to_string(), mqtt.port());
    opts.set_credentials(bitmote_gateway::mqtt_front::ADMIN_USER, gw.shared().admin_token.clone());
    opts.set_keep_alive(Duration::from_secs(30));
    let (watcher, mut conn) = bitmote_proto::client::mqtt_client(opts, 64);
    watcher.subscribe("bitmote/+/acks", rumqttc::QoS::AtMostOnce)?;
    watcher.subscribe("bitmote/+/presence", rumqttc::QoS::AtMostOnce)?;
    watcher.subscribe("bitmote/+/commands", rumqttc::QoS::AtMostOnce)?;
    let (tx, rx) = mpsc::channel::<(String, Vec<u8>, Instant)>();
    std::thread::spawn(move || {
        for ev in conn.iter() {
            if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) = ev {
                if tx.send((p.topic.clone(), p.payload.to_vec(), Instant::now())).is_err() {
                    return;
                }
            }
        }
    });

    let mut report = json!({ "bench": "actuator", "bitcoind": c.info()?.version, "triggers": triggers });
    let mut coinbase = 1;
    for (i, (name, light)) in devices.iter().enumerate() {
        let mut child = device(env, dir.path(), name, &mqtt.to_string(), *light)?;
        let r = (|| -> Result<Value> {
            wait_for(&rx, &format!("bitmote/{name}/presence"), Duration::from_secs(180), |p| p == b"online")?;
            let mut lat = Vec::with_capacity(triggers as usize);
            let mut to_command = Vec::with_capacity(triggers as usize);
            for _ in 0..triggers {
                let pay = TxOut { value: Amount::from_sat(20_000), script_pubkey: address(i as u32).script_pubkey() };
                let tx = spend_op_true(&coinbase_at(c, coinbase)?, vec![pay], 1_000).context("a mature coinbase")?;
                coinbase += 1;
                let txid = c.broadcast(&tx)?;
                c.mine(1, &op_true_address())?;
                let mined = Instant::now();
                let event = format!("{name}:{txid}:0");
                let is_event = |p: &[u8]| serde_json::from_slice::<Value>(p).is_ok_and(|v| v["event_id"] == event.as_str());
                let command = wait_for(&rx, &format!("bitmote/{name}/commands"), Duration::from_secs(60), is_event)?;
                to_command.push(command.1.saturating_duration_since(mined));
                let ack = wait_for(&rx, &format!("bitmote/{name}/acks"), Duration::from_secs(60), |p| {
                    serde_json::from_slice::<Value>(p).is_ok_and(|v| v["event_id"] == event.as_str())
                })?;
                let v: Value = serde_json::from_slice(&ack.0)?;
                if v["result"] != "done" {
                    bail!("{name} did not act on {event}: {v}");
                }
                lat.push(ack.1.saturating_duration_since(mined));
            }
            Ok(json!({ "block_to_ack": summary(lat), "block_to_command": summary(to_command), "memory_kib": memory(child.id())? }))
        })();
        let _ = child.kill();
        let _ = child.wait();
        report[*name] = r.with_context(|| format!("device {name} (its log: {})", dir.path().join(format!("{name}.log")).display()))?;
    }
    gw.shutdown();
    node.stop()?;
    report["rules_per_block"] = rules_bench(dir.path(), rules)?;

    let line = |what: &str, v: &Value| {
        let g = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        println!("  {what:<52} p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms", g("p50_ms"), g("p99_ms"), g("max_ms"));
    };
    println!("actuator bench (bitcoind {}, regtest, loopback; {triggers} triggers per device)", report["bitcoind"].as_str().unwrap_or("?"));
    line("plain device: block mined -> ack at the gateway", &report["lock-plain"]["block_to_ack"]);
    line("  of which block mined -> command on the broker", &report["lock-plain"]["block_to_command"]);
    line("light-client device: block mined -> ack at the gateway", &report["lock-light"]["block_to_ack"]);
    line("  of which block mined -> command on the broker", &report["lock-light"]["block_to_command"]);
    let kib = |d: &str, k: &str| report[d]["memory_kib"][k].as_f64().unwrap_or(f64::NAN) / 1024.0;
    println!("  device memory, plain:        VmRSS {:>6.1} MiB  VmHWM {:>6.1} MiB", kib("lock-plain", "rss"), kib("lock-plain", "hwm"));
    println!(
        "  device memory, light client: VmRSS {:>6.1} MiB  VmHWM {:>6.1} MiB (target < 20 MiB)",
        kib("lock-light", "rss"),
        kib("lock-light", "hwm")
    );
    let rb = &report["rules_per_block"];
    line(&format!("apply a block ({} outputs) with {rules} payment rules", rb["outputs"]), &rb["with_rules"]);
    line("the same block with no rules (fixed cost: txids, commit)", &rb["no_rules"]);
    println!("  target: light-client p50 < 200 ms");
    if json_out {
        println!("{report}");
    }
    Ok(())
}

/// The device program as a child process, its output in `<dir>/<name>.log`.
fn device(env: &Env, dir: &Path, name: &str, mqtt: &str, light: Option<std::net::SocketAddr>) -> Result<Child> {
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let mut cmd = Command::new(&env.exe);
    cmd.args(["device", "actuator", "--name", name, "--mqtt", mqtt, "--key"]).arg(dir.join(format!("{name}.key")));
    cmd.arg("--state").arg(dir.join(format!("{name}.json")));
    if let Some(peer) = light {
        cmd.args(["--light-client", &peer.to_string()]);
    }
    Ok(cmd.env("RUST_LOG", "warn").stdout(Stdio::null()).stderr(log).spawn()?)
}

/// The next message on `topic` that `want` accepts, with when it arrived.
fn wait_for(
    rx: &mpsc::Receiver<(String, Vec<u8>, Instant)>,
    topic: &str,
    timeout: Duration,
    want: impl Fn(&[u8]) -> bool,
) -> Result<(Vec<u8>, Instant)> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (t, p, at) = rx.recv_timeout(left).with_context(|| format!("nothing on {topic} within {timeout:?}"))?;
        if t == topic && want(&p) {
            return Ok((p, at));
        }
    }
}

/// VmRSS and VmHWM of a process, in KiB.
fn memory(pid: u32) -> Result<Value> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| status.lines().find_map(|l| l.strip_prefix(key)?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok());
    Ok(json!({ "rss": kib("VmRSS:"), "hwm": kib("VmHWM:") }))
}

/// Time [`Engine::apply`] on blocks of 5,000 outputs, 10 of them to watched addresses,
/// with `n` payment rules and with none.
fn rules_bench(dir: &Path, n: u32) -> Result<Value> {
    const BLOCKS: u32 = 30;
    let rules: Vec<Rule> = (0..n)
        .map(|i| Rule {
            id: format!("r{i}"),
            device: format!("d{i}"),
            trigger: Trigger::Payment { address: address(i).to_string(), min_sat: 1_000, confirmations: 1 },
            action: Action { command: "unlock".into(), args: Value::Null, webhook: None, exec: None },
            revert: None,
            ttl_secs: None,
        })
        .collect();
    let coinbase = coinbase_at_genesis();
    let block = |height: u32, prev: BlockHash| {
        let txdata: Vec<_> = (0..2_500u32)
            .map(|t| {
                let to = if t % 250 == 0 { address((t * 7 + height) % n) } else { address(n + t) };
                let outs = vec![TxOut { value: Amount::from_sat(5_000 + t as u64), script_pubkey: to.script_pubkey() }];
                let mut tx = spend_op_true(&coinbase, outs, 100).expect("enough value");
                tx.input[0].previous_output.vout = t; // distinct transactions
                tx
            })
            .collect();
        let header = Header {
            version: Version::TWO,
            prev_blockhash: prev,
            merkle_root: TxMerkleNode::all_zeros(),
            time: height,
            bits: CompactTarget::from_consensus(0x207fffff),
            nonce: 0,
        };
        Block { header, txdata }
    };
    let mut out = json!({ "rules": n, "outputs": 5_000 });
    for (key, set) in [("with_rules", rules), ("no_rules", vec![])] {
        let mut engine =
            Engine::open(&dir.join(format!("{key}.sqlite")), RuleSet::new(set, Network::Regtest)?, Network::Regtest, "bench.local/log")?;
        let (mut prev, mut times) = (BlockHash::all_zeros(), vec![]);
        for height in 1..=BLOCKS {
            let b = block(height, prev);
            let id = BlockId { height, hash: b.block_hash() };
            prev = id.hash;
            let ev = BlockEvent::Connected { id, block: Arc::new(b) };
            let t = Instant::now();
            engine.apply(&ev)?;
            times.push(t.elapsed());
        }
        out[key] = summary(times);
    }
    Ok(out)
}

/// A coinbase-like transaction paying 50 BTC to the OP_TRUE address, to spend in synthetic blocks.
fn coinbase_at_genesis() -> bitmote_chain::bitcoin::Transaction {
    let mut tx = bitmote_chain::bitcoin::constants::genesis_block(Network::Regtest).txdata.remove(0);
    tx.output[0].script_pubkey = op_true_address().script_pubkey();
    tx
}
