//! `bitmote bench pay`: Lightning streaming payments between two real ldk-node
//! machines on a private regtest node, against raw keysend measured in the same run.

use crate::Env;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bitmote_pay::ldk_node::{Event, Node};
use bitmote_pay::meter::Meter;
use bitmote_pay::node::{self as ln, NodeConfig};
use bitmote_pay::provider::Provider;
use bitmote_pay::tariff::{Mode, Tariff};
use bitmote_regtest::{RegtestNode, RegtestOptions};

fn free() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

fn tariff(tick_ms: u64, grace_ms: u64) -> Tariff {
    Tariff {
        provider: String::new(),
        price_msat_per_wh: 250,
        tick_ms,
        mode: Mode::Postpaid,
        grace_ms,
        max_power_w: 7000,
        session_limit_msat: u64::MAX / 4,
        valid_until: u64::MAX,
    }
}

/// Drain a node's events until `stop`, counting successes and failures.
fn drain(node: Arc<Node>, stop: Arc<AtomicBool>, ok: Arc<AtomicU64>, failed: Arc<AtomicU64>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match node.next_event() {
                Some(ev) => {
                    match ev {
                        Event::PaymentSuccessful { .. } => ok.fetch_add(1, Ordering::Relaxed),
                        Event::PaymentFailed { .. } => failed.fetch_add(1, Ordering::Relaxed),
                        _ => 0,
                    };
                    let _ = node.event_handled();
                }
                None => std::thread::sleep(Duration::from_micros(200)),
            }
        }
    })
}

/// (a) The limit: `n` keysends of 1000 msat in flight together, as ldk-node's own
/// payments benchmark does, retried when the channel has no free HTLC slot.
fn raw_keysend(a: &Arc<Node>, b: &Arc<Node>, n: u64) -> Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let da = drain(a.clone(), stop.clone(), ok.clone(), failed.clone());
    let db = drain(b.clone(), stop.clone(), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let start = Instant::now();
    let mut sent = 0;
    while ok.load(Ordering::Relaxed) < n {
        let want = n - ok.load(Ordering::Relaxed);
        let in_flight = sent - ok.load(Ordering::Relaxed) - failed.load(Ordering::Relaxed);
        if in_flight < want
            && a.list_channels()[0].next_outbound_htlc_limit_msat > 1000
            && a.spontaneous_payment().send(1000, b.node_id(), None).is_ok()
        {
            sent += 1;
            continue;
        }
        std::thread::sleep(Duration::from_millis(1));
        anyhow::ensure!(start.elapsed() < Duration::from_secs(600), "raw keysend did not finish");
    }
    let secs = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = (da.join(), db.join());
    Ok(n as f64 / secs)
}

/// The limit for (c): `n` keysends of 1000 msat one at a time, each from `send` until
/// the payer's `PaymentSuccessful` (what a tick payment costs without bitmote's protocol).
fn raw_latency(a: &Arc<Node>, b: &Arc<Node>, n: u64) -> Result<Vec<f64>> {
    let stop = Arc::new(AtomicBool::new(false));
    let db = drain(b.clone(), stop.clone(), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut lat = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let start = Instant::now();
        let id = a.spontaneous_payment().send(1000, b.node_id(), None).map_err(|e| anyhow::anyhow!("keysend: {e}"))?;
        loop {
            let ev = a.wait_next_event();
            let done = match &ev {
                Event::PaymentSuccessful { payment_id: Some(p), .. } if *p == id => Some(true),
                Event::PaymentFailed { payment_id: Some(p), .. } if *p == id => Some(false),
                _ => None,
            };
            let _ = a.event_handled();
            match done {
                Some(true) => break,
                Some(false) => anyhow::bail!("a raw keysend failed"),
                None => {}
            }
        }
        lat.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = db.join();
    Ok(lat)
}

/// Run `sessions` concurrent sessions of `ticks` ticks; returns (ticks paid, seconds,
/// per-payment latencies in ms, provider's late + short count).
fn sessions(meter: &Arc<Meter>, provider: &Arc<Provider>, pnode: &str, sessions: usize, ticks: u64) -> Result<(u64, f64, Vec<f64>, u64)> {
    let opened: Vec<_> = (0..sessions).map(|_| meter.open_session(pnode)).collect::<Result<_, _>>()?;
    let start = Instant::now();
    let handles: Vec<_> = opened
        .iter()
        .map(|s| {
            let (m, id) = (meter.clone(), s.id);
            std::thread::spawn(move || m.run(&id, Some(ticks)))
        })
        .collect();
    let mut paid = 0;
    for h in handles {
        paid += h.join().map_err(|_| anyhow::anyhow!("session thread panicked"))??.account.ticks;
    }
    let secs = start.elapsed().as_secs_f64();
    let mut lat = Vec::new();
    let mut faults = 0;
    for s in &opened {
        lat.extend(meter.ticks(&s.id)?.iter().filter_map(|r| r.latency_us).map(|us| us as f64 / 1000.0));
        let ps = provider.session(&s.id)?.context("provider lost a session")?;
        faults += ps.late + ps.short;
        meter.close(&s.id)?;
    }
    Ok((paid, secs, lat, faults))
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[(((p / 100.0) * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
}

pub fn run(env: &Env, raw: u64, concurrent: usize, ticks: u64, load: &[usize], load_secs: u64, json: bool) -> Result<()> {
    let chain = RegtestNode::start(RegtestOptions::new(env.bitcoind.clone())).context("starting a private regtest node")?;
    chain.mine(101)?;
    let dir = tempfile::tempdir()?;
    let machine = |name: &str| {
        ln::start(&NodeConfig {
            dir: dir.path().join(name).join("ldk"),
            listen: free(),
            rpc: chain.rpc_config().clone(),
            alias: name.into(),
            announce: false,
            announce_as: None,
        })
    };
    let (mn, pn) = (machine("meter")?, machine("provider")?);
    let faucet = chain.faucet()?;
    ln::fund(&faucet, &mn, 2)?;
    let paddr = pn.listening_addresses().context("provider not listening")?[0].clone();
    ln::open_channel(Some(&faucet), &mn, pn.node_id(), paddr, 5_000_000, None, false)?;
    ln::wait_usable(Some(&faucet), &pn, mn.node_id())?;
    eprintln!("channel ready; (a) raw keysend ×{raw}");

    let raw_rate = raw_keysend(&mn, &pn, raw)?;
    eprintln!("(c) limit: 100 raw keysends one at a time");
    let mut lat_raw = raw_latency(&mn, &pn, 100)?;

    // (b), (c): the full session protocol, `concurrent` sessions paying back to back
    // (10 ms ticks; a long grace, as this measures throughput, not punctuality), then
    // one session alone for unloaded latency.
    let provider = Provider::start(pn.clone(), &dir.path().join("provider"), tariff(10, 60_000), free())?;
    let meter = Meter::start(mn.clone(), &dir.path().join("meter"), &format!("http://{}", provider.http_addr), free())?;
    let pid = pn.node_id().to_string();
    eprintln!("(b) {concurrent} sessions × {ticks} ticks");
    let (paid, secs, mut lat_loaded, faults_b) = sessions(&meter, &provider, &pid, concurrent, ticks)?;
    let stream_rate = paid as f64 / secs;
    let (_, _, mut lat_alone, _) = sessions(&meter, &provider, &pid, 1, 100)?;
    provider.shutdown();
    meter.shutdown();
    std::thread::sleep(Duration::from_millis(500));

    // (d): N meters at the default 2 s tick for `load_secs`; every payment must be on time.
    let provider = Provider::start(pn.clone(), &dir.path().join("provider"), tariff(2000, 2000), free())?;
    let meter = Meter::start(mn.clone(), &dir.path().join("meter"), &format!("http://{}", provider.http_addr), free())?;
    let mut loads = Vec::new();
    for &n in load {
        eprintln!("(d) {n} concurrent sessions at a 2 s tick for {load_secs} s");
        let (paid, _, mut lat, faults) = sessions(&meter, &provider, &pid, n, load_secs / 2)?;
        loads.push(serde_json::json!({
            "sessions": n, "ticks_paid": paid, "late_or_short": faults,
            "p50_ms": pct(&mut lat, 50.0), "p99_ms": pct(&mut lat, 99.0),
        }));
    }
    provider.shutdown();
    meter.shutdown();

    let report = serde_json::json!({
        "a_raw_keysend_per_s": raw_rate,
        "b_session_ticks_per_s": stream_rate,
        "b_ratio": stream_rate / raw_rate,
        "b_late_or_short": faults_b,
        "c_latency_loaded": {"n": lat_loaded.len(), "p50_ms": pct(&mut lat_loaded, 50.0), "p99_ms": pct(&mut lat_loaded, 99.0)},
        "c_latency_alone": {"n": lat_alone.len(), "p50_ms": pct(&mut lat_alone, 50.0), "p99_ms": pct(&mut lat_alone, 99.0)},
        "c_latency_raw_keysend": {"n": lat_raw.len(), "p50_ms": pct(&mut lat_raw, 50.0), "p99_ms": pct(&mut lat_raw, 99.0)},
        "d_load": loads,
    });
    println!("bench pay (regtest, two ldk-node 0.7.1 machines in one process, direct channel)");
    println!("  (a) raw keysend, {raw} in flight together   {raw_rate:>8.1} payments/s   (the limit)");
    println!(
        "  (b) session protocol, {concurrent} sessions      {stream_rate:>8.1} ticks/s     = {:.0}% of (a)",
        100.0 * stream_rate / raw_rate
    );
    println!(
        "  (c) latency per tick payment   loaded p50 {:.1} ms p99 {:.1} ms;  alone p50 {:.1} ms p99 {:.1} ms",
        report["c_latency_loaded"]["p50_ms"].as_f64().unwrap_or(f64::NAN),
        report["c_latency_loaded"]["p99_ms"].as_f64().unwrap_or(f64::NAN),
        report["c_latency_alone"]["p50_ms"].as_f64().unwrap_or(f64::NAN),
        report["c_latency_alone"]["p99_ms"].as_f64().unwrap_or(f64::NAN)
    );
    println!(
        "  (c) limit: raw keysend one at a time           p50 {:.1} ms p99 {:.1} ms  (alone / limit at p50: {:.2}×)",
        report["c_latency_raw_keysend"]["p50_ms"].as_f64().unwrap_or(f64::NAN),
        report["c_latency_raw_keysend"]["p99_ms"].as_f64().unwrap_or(f64::NAN),
        report["c_latency_alone"]["p50_ms"].as_f64().unwrap_or(f64::NAN)
            / report["c_latency_raw_keysend"]["p50_ms"].as_f64().unwrap_or(f64::NAN)
    );
    for l in report["d_load"].as_array().unwrap() {
        println!(
            "  (d) {:>4} sessions at 2 s ticks: {} ticks paid, {} late or short, p50 {:.1} ms p99 {:.1} ms",
            l["sessions"],
            l["ticks_paid"],
            l["late_or_short"],
            l["p50_ms"].as_f64().unwrap_or(f64::NAN),
            l["p99_ms"].as_f64().unwrap_or(f64::NAN)
        );
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    for n in [&mn, &pn] {
        let _ = n.stop();
    }
    Ok(())
}
