//! The campaign: start the system, then round after round inject the seed's faults, let
//! the system settle, check the invariants; at the end stop it as an operator would.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::chainops::Miner;
use crate::checks::{self, NotaryView, Tally};
use crate::customer::Customer;
use crate::faults::{Fault, Kind};
use crate::inject::{self, Ctx};
use crate::probe::Probe;
use crate::proxy::Proxy;
use crate::rng::Rng;
use crate::system::{Shape, System};
use crate::{DrillError, Options, Report};

/// Steps (about a second each) of a round's active phase.
const STEPS: u64 = 8;
/// The fleet's actuators.
const DEVICES: [&str; 2] = ["lock-1", "relay-1"];
/// Blocks mined while settling before anything is checked: deeper than any reorg the
/// drill makes, so every trigger can become final.
const SETTLE_BLOCKS: u32 = 7;

/// A small tmpfs over the gateway's data directory, so the drill can fill it (root only).
fn small_disk(gateway_dir: &Path) -> Option<PathBuf> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    std::fs::create_dir_all(gateway_dir).ok()?;
    if Command::new("mountpoint").arg("-q").arg(gateway_dir).status().is_ok_and(|s| s.success()) {
        return Some(gateway_dir.to_path_buf()); // left mounted by an interrupted drill
    }
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256m,mode=0700", "bitmote-drill", &gateway_dir.display().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    ok.then(|| gateway_dir.to_path_buf())
}

fn unmount(dir: &Path) {
    let _ = Command::new("umount").arg(dir).status();
}

pub fn run(opts: &Options) -> Result<Report, DrillError> {
    let t0 = Instant::now();
    let dir = opts.dir.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("bitmote-drill-{}-{}", opts.seed, std::process::id())));
    std::fs::create_dir_all(&dir).map_err(|e| DrillError::io(format!("creating {}", dir.display()), e))?;
    let shape = Shape { sensors: opts.sensors, tick_ms: 1000 };
    let mut sys = System::new(opts.exe.clone(), dir.clone(), &shape)?;
    let mut skipped = BTreeMap::new();
    let mut kinds = select_kinds(opts)?;
    // The provider's public ports are the proxy's, for the whole campaign (transparent
    // until a network fault sets it); it goes after `sys`, once nothing uses it.
    let proxy = Proxy::start(&sys.provider_routes(), opts.seed)?;
    // The small file system only when a full disk is among the faults to inject.
    let disk = match kinds.contains(&Kind::DiskFull) {
        true => small_disk(&sys.data.join("gateway")),
        false => None,
    };
    if kinds.contains(&Kind::DiskFull) && disk.is_none() {
        kinds.retain(|k| *k != Kind::DiskFull);
        skipped.insert("disk full".to_string(), "needs root and tmpfs to give the gateway a small file system".to_string());
        if kinds.is_empty() {
            return Err(DrillError::Setup("no fault kind left to inject".into()));
        }
    }
    let result = campaign(opts, &mut sys, &proxy, disk.clone(), kinds, t0, skipped);
    // Stop whatever is left before unmounting.
    drop(sys);
    drop(proxy);
    let keep = opts.keep || result.as_ref().map_or(true, |r| !r.violations.is_empty());
    if let Some(d) = &disk {
        if keep {
            // The tmpfs goes with the unmount: keep a copy of the gateway's data for a post-mortem.
            let _ = Command::new("cp").arg("-a").arg(d).arg(d.with_file_name("gateway.kept")).status();
        }
        unmount(d);
    }
    let report = result?;
    if report.violations.is_empty() && !opts.keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(report)
}

fn campaign(
    opts: &Options,
    sys: &mut System,
    proxy: &Proxy,
    disk: Option<PathBuf>,
    kinds: Vec<Kind>,
    t0: Instant,
    skipped: BTreeMap<String, String>,
) -> Result<Report, DrillError> {
    let mut rng = Rng::new(opts.seed);
    let mut tally = Tally::default();
    let mut miner = Miner::default();
    let mut notary = NotaryView::default();
    println!("drill: starting bitmote up in {} (first start funds the meter and opens its channels)", sys.dir.display());
    sys.start(Duration::from_secs(900))?;
    warm_up(sys, &miner)?;
    let mut probe = Probe::enroll(sys)?;
    // I4: a customer buying Lightning-paid actions on the lock (its own seed, so that the
    // faults a seed injects stay those of campaigns before it).
    println!("drill: a customer's Lightning node opens a channel to the gateway's (I4)");
    let mut customer = Customer::start(sys)?;
    let mut buy_rng = Rng::new(opts.seed ^ 0x14c0_ffee);
    let mut order = kinds.clone();
    let mut faults_count: BTreeMap<String, u32> = BTreeMap::new();
    let mut sessions_closed = 0;
    let mut statement_seen = checks::statement(sys).and_then(|s| s.closed_ms);
    let mut aborted = false;
    for round in 1..=opts.rounds {
        tally.round = round;
        let i = ((round - 1) as usize) % order.len();
        if i == 0 {
            rng.shuffle(&mut order);
        }
        let mut faults: Vec<(u64, Fault)> = vec![(rng.range(1, STEPS - 2), order[i].instance(&mut rng, opts.quick))];
        if rng.chance(1, 3) {
            let k = *rng.pick(&kinds);
            faults.push((rng.range(1, STEPS - 2), k.instance(&mut rng, opts.quick)));
        }
        let mut body = || -> Result<String, DrillError> {
            let mut done = vec![];
            {
                let mut ctx = Ctx {
                    sys: &mut *sys,
                    miner: &mut miner,
                    probe: &mut probe,
                    rng: &mut rng,
                    tally: &mut tally,
                    disk: disk.clone(),
                    proxy,
                    tick_ms: 1000,
                };
                for step in 0..STEPS {
                    if step == 1 && buy_rng.chance(1, 2) {
                        done.push(customer.buy(ctx.sys, round));
                    }
                    for (at, f) in &faults {
                        if *at == step {
                            *faults_count.entry(f.kind_name()).or_default() += 1;
                            let what = match inject::inject(&mut ctx, f) {
                                Ok(w) => w,
                                Err(e) => {
                                    ctx.tally.fail("I5 availability", format!("injecting {f}: {e}"));
                                    if !ctx.sys.up_alive() {
                                        ctx.sys.start(Duration::from_secs(300))?;
                                    }
                                    format!("{f}: {e}")
                                }
                            };
                            done.push(what);
                        }
                    }
                    ctx.step(true);
                    if step % 3 == 2 {
                        let _ = checks::check_payments(ctx.sys, ctx.tally, false);
                    }
                    std::thread::sleep(Duration::from_millis(700));
                }
            }
            let acked_before = probe.acked.len();
            settle(sys, &mut miner, &mut probe, &mut tally, round, true)?;
            let chain = sys.chain()?;
            notary.check_log(sys, &mut tally)?;
            let counts = notary.check_readings(sys, &chain, &probe.acked[..acked_before], &mut rng, 8, true, &mut tally)?;
            actuators(sys, &chain, &mut miner, &mut tally)?;
            customer.check(sys, false, &mut tally)?;
            sessions_closed = checks::check_payments(sys, &mut tally, false).unwrap_or(sessions_closed).max(sessions_closed);
            statement_seen = checks::check_statement(sys, statement_seen, &mut tally);
            Ok(format!("{} | proofs checked {}", done.join("; "), counts.proven + counts.pending))
        };
        let line = body();
        let bad = tally.violations.iter().filter(|v| v.round == round).count();
        match line {
            Ok(line) => println!(
                "round {round:>4}/{}: {line} | {}",
                opts.rounds,
                if bad == 0 { "ok".to_string() } else { format!("{bad} VIOLATION(S)") }
            ),
            Err(e) => {
                tally.fail("I5 availability", format!("the campaign cannot go on: {e}"));
                println!("round {round:>4}/{}: the campaign cannot go on: {e}", opts.rounds);
                aborted = true;
                break;
            }
        }
    }
    // The end: every reading ever acknowledged, proven against the chain; then a clean
    // stop, as an operator's Ctrl-C.
    if !aborted {
        let mut end = || -> Result<(), DrillError> {
            tally.round = opts.rounds;
            settle(sys, &mut miner, &mut probe, &mut tally, opts.rounds, false)?;
            let chain = sys.chain()?;
            let all = probe.acked.clone();
            notary.check_log(sys, &mut tally)?;
            notary.check_readings(sys, &chain, &all, &mut rng, usize::MAX, true, &mut tally)?;
            actuators(sys, &chain, &mut miner, &mut tally)?;
            customer.wait_settled(Duration::from_secs(90));
            customer.check(sys, true, &mut tally)?;
            let _ = checks::check_payments(sys, &mut tally, false);
            let code = sys.stop()?;
            tally.check("I5 availability", code == Some(0), || format!("the final Ctrl-C: bitmote up exited with {code:?}"));
            // The Ctrl-C closed the meter's session: its statement must say reconciled.
            let st = checks::statement(sys);
            tally.check("I3 payments", st.as_ref().is_some_and(|s| s.closed_ms != statement_seen && s.reconciled), || {
                format!("after the final Ctrl-C the meter's statement is {st:?}, not a new reconciled close")
            });
            Ok(())
        };
        if let Err(e) = end() {
            tally.fail("I5 availability", format!("the final checks could not run: {e}"));
        }
    }
    Ok(Report {
        seed: opts.seed,
        rounds: opts.rounds,
        faults: faults_count,
        skipped_kinds: skipped,
        checks_passed: tally.passed.clone(),
        violations: tally.violations.clone(),
        upstream_limits: tally.upstream.values().cloned().collect(),
        readings_acknowledged: probe.acked.len() as u64,
        readings_acknowledged_during_outages: probe.acked.iter().filter(|a| a.during_outage).count() as u64,
        sessions_closed,
        lightning_orders: customer.counts().0 as u64,
        lightning_orders_not_placed: u64::from(customer.not_placed),
        customer_channels_reopened: u64::from(customer.reopened),
        elapsed_secs: t0.elapsed().as_secs(),
        dir: sys.dir.clone(),
    })
}

/// The fault kinds, narrowed by `--only` and `--except`; checked before anything starts,
/// so a bad selection fails at once.
fn select_kinds(opts: &Options) -> Result<Vec<Kind>, DrillError> {
    let mut kinds = Kind::all(true);
    if !opts.only.is_empty() {
        kinds.retain(|k| opts.only.iter().any(|o| k.name().contains(o.as_str())));
        if kinds.is_empty() {
            return Err(DrillError::Setup(format!("no fault kind matches {:?}", opts.only)));
        }
    }
    kinds.retain(|k| !opts.except.iter().any(|o| k.name().contains(o.as_str())));
    if kinds.is_empty() {
        return Err(DrillError::Setup("every fault kind is excluded".into()));
    }
    Ok(kinds)
}

/// Mine until the meter streams (its first start funds it and opens the channels).
fn warm_up(sys: &mut System, miner: &Miner) -> Result<(), DrillError> {
    let end = Instant::now() + Duration::from_secs(600);
    loop {
        if let Ok(c) = sys.chain() {
            let _ = miner.mine(&c);
        }
        let streaming = sys.status().and_then(|s| s.meter_url).and_then(|u| sys.get_url(&format!("{u}/v1/status")).ok()).is_some_and(|v| {
            v["sessions"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["state"] == "open" && s["account"]["ticks"].as_u64().unwrap_or(0) > 0))
        });
        if streaming {
            return Ok(());
        }
        if !sys.up_alive() {
            return Err(DrillError::Setup("bitmote up exited while the fleet was starting".into()));
        }
        if Instant::now() > end {
            return Err(DrillError::Setup("the meter was not streaming payments 10 minutes after the start".into()));
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// After the faults: everything back, blocks until the triggers are final and the
/// probe's readings anchored, the outbox idle; at most a few minutes.
fn settle(sys: &mut System, miner: &mut Miner, probe: &mut Probe, tally: &mut Tally, round: u32, send: bool) -> Result<(), DrillError> {
    // Dropped transactions may come back from now on.
    miner.excluded.clear();
    if !sys.up_alive() {
        tally.fail("I5 availability", "bitmote up was not running when the round ended (not stopped by the drill)");
        sys.start(Duration::from_secs(300))?;
    }
    let last = probe.acked.last().map(|a| a.receipt.reading_id.clone());
    let end = Instant::now() + Duration::from_secs(240);
    let mut mined = 0;
    loop {
        if let Ok(c) = sys.chain() {
            if miner.mine(&c).is_ok() {
                mined += 1;
            }
        }
        if send {
            let _ = probe.send(sys, round, false);
        }
        if mined >= SETTLE_BLOCKS {
            let anchored = last.as_ref().is_none_or(|id| {
                sys.get_json(&format!("/v1/readings/{id}/proof"))
                    .ok()
                    .and_then(|b| serde_json::from_value::<bitmote_notary::proof::ProofBundle>(b).ok())
                    .is_some_and(|b| !b.is_pending())
            });
            let idle = checks::actions(sys).is_ok_and(|a| checks::outbox_busy(&a).is_empty());
            if anchored && idle && fleet_whole(sys) {
                return Ok(());
            }
        }
        if Instant::now() > end {
            tracing::warn!("round {round}: not settled after 240 s; checking anyway");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(800));
    }
}

/// Every member of the fleet running again (a killed one is restarted by `up`), and the
/// meter and the provider answering: the checks, and the final Ctrl-C's close, are about a
/// whole system, not one caught while a machine restarts.
fn fleet_whole(sys: &System) -> bool {
    let Some(st) = sys.status() else { return false };
    let members = st.fleet.unwrap_or_default();
    let running = !members.is_empty() && members.iter().all(|m| m.pid.is_some_and(crate::system::process_alive));
    let answers = |u: &str| sys.get_url(&format!("{u}/v1/status")).is_ok();
    running && st.meter_url.as_deref().is_none_or(answers) && answers(&sys.provider_direct_url())
}

/// I2, giving deliveries still on their way up to a minute (blocks keep coming).
fn actuators(sys: &mut System, chain: &bitmote_chain::ChainClient, miner: &mut Miner, tally: &mut Tally) -> Result<(), DrillError> {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let last_call = Instant::now() > end;
        let mut scratch = Tally { round: tally.round, ..Default::default() };
        let pending = checks::check_actuators(sys, chain, &DEVICES, last_call, &mut scratch)?;
        if pending.is_empty() || last_call {
            for (k, n) in scratch.passed {
                *tally.passed.entry(k).or_default() += n;
            }
            tally.violations.extend(scratch.violations);
            return Ok(());
        }
        let _ = miner.mine(chain);
        std::thread::sleep(Duration::from_secs(2));
    }
}
