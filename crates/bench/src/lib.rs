//! `bitmote-bench`: the benchmarks behind `bitmote bench …`, performance reports measured
//! on this machine, each against a limit measured in the same run (a report, never a
//! pass/fail test). Each starts what it measures itself (a private regtest node, an
//! in-process gateway, device processes of the `bitmote` executable); the binary hands in
//! where bitcoind and itself are ([`Env`]).
//!
//! * [`notary`] — ingest, proofs and verification against signature and hash limits;
//! * [`actuator`] — payment-to-acknowledgement latency, rules per block, device memory;
//! * [`mqtt`] — the authenticating front beside the bare broker, reading round trips;
//! * [`pay`] — raw keysend against the session protocol, concurrent meter sessions;
//! * the block stream's block-to-event latency (`chain`, here).

pub mod actuator;
pub mod mqtt;
pub mod notary;
pub mod pay;

use std::path::PathBuf;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bitmote_chain::{BlockEvent, BlockStream, Start, StreamConfig};
use bitmote_regtest::{RegtestNode, RegtestOptions};
use clap::Subcommand;
use serde_json::Value;

/// What the benchmarks run: bitcoind (found or built by the caller, with its own progress
/// display) and the `bitmote` executable whose device programs some of them start.
pub struct Env {
    pub bitcoind: PathBuf,
    pub exe: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Block-to-event latency of the block stream on a private regtest node: from
    /// `generatetoaddress` returning to the `Connected` event reaching the consumer.
    Chain {
        /// Number of blocks to mine, one at a time.
        #[arg(long, default_value_t = 200)]
        blocks: u32,
        /// Also print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Notary throughput on this machine against its own signature and hash limits:
    /// signed and batched ingest (durable), proof generation and verification, proof sizes.
    Notary {
        /// Individually signed readings to ingest.
        #[arg(long, default_value_t = 20_000)]
        readings: usize,
        /// Readings to ingest in device-signed batches.
        #[arg(long, default_value_t = 500_000)]
        batched: usize,
        /// Readings per batch.
        #[arg(long, default_value_t = 4096)]
        batch_size: usize,
        /// Also print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Lightning streaming payments: raw keysend throughput (the limit), the session
    /// protocol's throughput as a ratio of it, per-payment latency, and how many
    /// concurrent 2-second-tick meter sessions one provider keeps on time.
    Pay {
        /// Raw keysends for the limit.
        #[arg(long, default_value_t = 1000)]
        raw: u64,
        /// Concurrent sessions paying back to back.
        #[arg(long, default_value_t = 40)]
        concurrent: usize,
        /// Ticks per session in that run.
        #[arg(long, default_value_t = 25)]
        ticks: u64,
        /// Concurrent session counts to hold at a 2 s tick.
        #[arg(long, value_delimiter = ',', default_value = "100,200")]
        load: Vec<usize>,
        /// Seconds each load step lasts.
        #[arg(long, default_value_t = 30)]
        load_secs: u64,
        /// Also print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Actuators: block-to-action latency (payment mined -> device acknowledgement at the
    /// gateway) for a plain and a light-client device, rules applied per block with many
    /// watched addresses, and the device program's memory.
    Actuator {
        /// Payments per device, each mined in its own block.
        #[arg(long, default_value_t = 100)]
        triggers: u32,
        /// Payment rules (watched addresses) for the per-block rules measurement.
        #[arg(long, default_value_t = 10_000)]
        rules: u32,
        /// Also print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// MQTT: QoS 1 publish latency and rate through the embedded broker's authenticating
    /// front beside the bare broker, and a reading's round trip to its receipt over MQTT and HTTP.
    Mqtt {
        /// Sequential publishes per path (ten times as many are pipelined).
        #[arg(long, default_value_t = 2000)]
        messages: usize,
        /// Readings sent one at a time over each transport.
        #[arg(long, default_value_t = 300)]
        readings: usize,
        /// Also print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Run one benchmark and print its report.
pub fn run(env: &Env, cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Pay { raw, concurrent, ticks, load, load_secs, json } => {
            pay::run(env, raw, concurrent, ticks, &load, load_secs, json)
        }
        BenchCommand::Chain { blocks, json } => chain(env, blocks, json),
        BenchCommand::Notary { readings, batched, batch_size, json } => notary::run(env, readings, batched, batch_size, json),
        BenchCommand::Actuator { triggers, rules, json } => actuator::run(env, triggers, rules, json),
        BenchCommand::Mqtt { messages, readings, json } => mqtt::run(env, messages, readings, json),
    }
}

/// Percentile (nearest rank) of sorted samples, in milliseconds.
fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1].as_secs_f64() * 1e3
}

pub fn summary(mut v: Vec<Duration>) -> Value {
    v.sort();
    serde_json::json!({
        "n": v.len(), "p50_ms": pct(&v, 50.0), "p90_ms": pct(&v, 90.0), "p99_ms": pct(&v, 99.0), "max_ms": pct(&v, 100.0),
    })
}

fn chain(env: &Env, blocks: u32, json: bool) -> Result<()> {
    if blocks == 0 {
        bail!("--blocks must be at least 1");
    }
    let node = RegtestNode::start(RegtestOptions::new(env.bitcoind.clone())).context("starting a private regtest node")?;
    node.mine(101)?;
    let client = node.client();
    let reference = client.fresh()?;

    // The consumer: a block stream on its own connection, reporting when each event arrives.
    let (tx, rx) = mpsc::channel::<(bitmote_chain::bitcoin::BlockHash, Instant)>();
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = {
        let stop = stop.clone();
        let mut stream = BlockStream::starting_at(client.fresh()?, Start::Tip, StreamConfig::default())?;
        std::thread::spawn(move || -> Result<()> {
            while !stop.load(Ordering::SeqCst) {
                if let Some(BlockEvent::Connected { id, .. }) = stream.next_event(Some(Duration::from_millis(200)))? {
                    if tx.send((id.hash, Instant::now())).is_err() {
                        break;
                    }
                }
            }
            Ok(())
        })
    };

    let mut stream_lat = Vec::with_capacity(blocks as usize);
    let mut fetch_lat = Vec::with_capacity(blocks as usize);
    let mut rtt = Vec::with_capacity(blocks as usize);
    let addr = bitmote_regtest::op_true_address();
    for _ in 0..blocks {
        let hash = client.mine(1, &addr)?.pop().context("generatetoaddress returned no block")?;
        let mined = Instant::now();
        let (got, at) = rx.recv_timeout(Duration::from_secs(30)).context("the stream delivered nothing in 30 s")?;
        if got != hash {
            bail!("stream delivered {got}, expected {hash}");
        }
        stream_lat.push(at.saturating_duration_since(mined));
        // Limit: what any RPC consumer must pay at least, given the hash for free —
        // fetch the header and the block (two round trips and the block's transfer).
        let t = Instant::now();
        reference.header_state(&hash)?;
        reference.block(&hash)?;
        fetch_lat.push(t.elapsed());
        let t = Instant::now();
        reference.tip()?;
        rtt.push(t.elapsed());
    }
    stop.store(true, Ordering::SeqCst);
    drop(rx);
    consumer.join().map_err(|_| anyhow::anyhow!("consumer thread panicked"))??;
    let version = client.info()?.version;
    node.stop()?;

    let s = summary(stream_lat);
    let f = summary(fetch_lat);
    let r = summary(rtt);
    let ratio = s["p50_ms"].as_f64().unwrap_or(f64::NAN) / f["p50_ms"].as_f64().unwrap_or(f64::NAN);
    let report = serde_json::json!({
        "bench": "chain", "bitcoind": version, "blocks": blocks,
        "block_to_event": s, "limit_known_hash_fetch": f, "rpc_round_trip": r,
        "ratio_p50_vs_limit": ratio, "target_ms": 100,
    });
    println!("block-to-event latency over {blocks} blocks (bitcoind {version}, regtest, loopback)");
    let line = |name: &str, v: &Value| {
        let g = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "  {name:<44} p50 {:>7.2} ms  p90 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms",
            g("p50_ms"),
            g("p90_ms"),
            g("p99_ms"),
            g("max_ms")
        );
    };
    line("stream: generatetoaddress returned -> event", &s);
    line("limit: fetch header+block of a known hash", &f);
    line("plain RPC round trip (getblockchaininfo)", &r);
    println!("  ratio stream p50 / limit p50 = {ratio:.2} (target: stream p50 and p99 < 100 ms)");
    if json {
        println!("{report}");
    }
    Ok(())
}
