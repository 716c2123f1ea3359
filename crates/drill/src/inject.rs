//! Injecting one fault into the running system, and the availability checks (I5) that
//! belong to the moment of the fault: readings acknowledged while the node is down, no
//! process exiting because the node went away, clean stops that are clean.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::chainops::Miner;
use crate::checks::Tally;
use crate::faults::{Fault, Target};
use crate::probe::Probe;
use crate::proxy::{Link, Proxy};
use crate::rng::Rng;
use crate::system::{signal, System};
use crate::DrillError;

const I5: &str = "I5 availability";

/// Everything a fault may touch.
pub struct Ctx<'a> {
    pub sys: &'a mut System,
    pub miner: &'a mut Miner,
    pub probe: &'a mut Probe,
    pub rng: &'a mut Rng,
    pub tally: &'a mut Tally,
    /// The gateway's data directory when it is a small file system of the drill's (tmpfs).
    pub disk: Option<PathBuf>,
    /// The proxy in front of the provider's ports.
    pub proxy: &'a Proxy,
    pub tick_ms: u64,
}

impl Ctx<'_> {
    /// One step of background activity: a block (unless `mine` is false) and a reading.
    pub fn step(&mut self, mine: bool) {
        if mine {
            if let Ok(c) = self.sys.chain() {
                if let Err(e) = self.miner.mine(&c) {
                    tracing::debug!("mining: {e}");
                }
            }
        }
        let round = self.tally.round;
        let _ = self.probe.send(self.sys, round, false);
    }

    /// Keep the system busy for `d`, a block and a reading about every second.
    pub fn busy(&mut self, d: Duration, mine: bool) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.step(mine);
            std::thread::sleep(Duration::from_millis(900));
        }
    }

    /// Wait until the node answers RPC again (`bitmote up` restarts a node it manages).
    pub fn node_back(&mut self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.sys.chain().and_then(|c| Ok(c.tip()?)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        false
    }

    /// `bitmote up` must still be running (the drill did not stop it): else a violation,
    /// and it is started again so the campaign goes on.
    pub fn up_survived(&mut self, after: &str) -> Result<(), DrillError> {
        if !self.sys.up_alive() {
            self.tally.fail(I5, format!("bitmote up exited after {after}"));
            self.sys.start(Duration::from_secs(300))?;
        } else {
            self.tally.pass(I5);
        }
        Ok(())
    }
}

/// SIGCONT on drop: a stopped node never stays stopped if the drill fails.
struct Resume(Option<u32>);
impl Drop for Resume {
    fn drop(&mut self) {
        if let Some(p) = self.0 {
            signal(p, libc::SIGCONT);
        }
    }
}

/// Removes the ballast file on drop.
struct Ballast(PathBuf);
impl Drop for Ballast {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Sets the proxy's link back to clear on drop: a fault never outlives its round.
struct Heal<'a>(&'a Proxy);
impl Drop for Heal<'_> {
    fn drop(&mut self) {
        self.0.set(Link::Clear);
    }
}

/// Fill the file system at `dir` with a ballast file.
fn fill(dir: &Path) -> Result<Ballast, DrillError> {
    let path = dir.join("drill-ballast");
    let b = Ballast(path.clone());
    let mut f = fs::File::create(&path).map_err(|e| DrillError::io(format!("creating {}", path.display()), e))?;
    let chunk = vec![0u8; 1 << 20];
    while f.write_all(&chunk).is_ok() {}
    let mut small = vec![0u8; 4096];
    while f.write_all(&small).is_ok() {}
    small.truncate(1);
    while f.write_all(&small).is_ok() {}
    let _ = f.sync_all();
    Ok(b)
}

fn debug_log_len(sys: &System) -> u64 {
    fs::metadata(sys.bitcoind_dir().join("regtest").join("debug.log")).map(|m| m.len()).unwrap_or(0)
}

fn debug_log_since(sys: &System, offset: u64) -> String {
    let text = fs::read(sys.bitcoind_dir().join("regtest").join("debug.log")).unwrap_or_default();
    String::from_utf8_lossy(&text[(offset as usize).min(text.len())..]).into_owned()
}

/// A fleet member of the target's kind, chosen by the seed.
fn member_of(ctx: &mut Ctx<'_>, target: Target) -> Option<(String, u32)> {
    let kinds: &[&str] = match target {
        Target::Meter => &["meter"],
        Target::Provider => &["provider"],
        Target::Sensor => &["sensor"],
        Target::Actuator => &["lock", "relay"],
        Target::Gateway | Target::Node => return None,
    };
    let members: Vec<_> = ctx.sys.members().into_iter().filter(|m| kinds.contains(&m.kind.as_str()) && m.pid.is_some()).collect();
    if members.is_empty() {
        return None;
    }
    let m = ctx.rng.pick(&members).clone();
    Some((m.name, m.pid?))
}

/// Inject `fault`; returns what happened, for the round's log line.
pub fn inject(ctx: &mut Ctx<'_>, fault: &Fault) -> Result<String, DrillError> {
    match fault {
        Fault::Reorg { depth } => {
            let c = ctx.sys.chain()?;
            let out = ctx.miner.reorg(&c, *depth, ctx.rng)?;
            let fates: Vec<String> = out
                .fates
                .iter()
                .filter(|(_, _, w)| *w != "other")
                .map(|(t, f, w)| format!("{w} {}… {}", &t.to_string()[..8], f.name()))
                .collect();
            Ok(format!(
                "reorg depth {}: {}",
                out.depth,
                if fates.is_empty() { "no trigger or anchor in it".into() } else { fates.join(", ") }
            ))
        }
        Fault::Kill { target } | Fault::Term { target } => {
            let sig = if matches!(fault, Fault::Kill { .. }) { libc::SIGKILL } else { libc::SIGTERM };
            let how = if sig == libc::SIGKILL { "kill -9" } else { "SIGTERM" };
            match target {
                Target::Gateway => restart_up(ctx, sig, false),
                Target::Node => {
                    let Some(pid) = ctx.sys.node_pid() else { return Ok("node not running".into()) };
                    signal(pid, sig);
                    std::thread::sleep(Duration::from_secs(1));
                    let back = ctx.node_back(Duration::from_secs(120));
                    ctx.tally.check(I5, back, || {
                        format!("the node did not come back within 120 s of {how} (bitmote up restarts the node it manages)")
                    });
                    ctx.up_survived(&format!("{how} of the node"))?;
                    if !back {
                        // Go on with a fresh start of everything.
                        ctx.sys.kill_up();
                        if let Some(p) = ctx.sys.node_pid() {
                            signal(p, libc::SIGKILL);
                        }
                        ctx.sys.start(Duration::from_secs(300))?;
                    }
                    Ok(format!("{how} node (pid {pid})"))
                }
                t => {
                    // A random instant within a tick: mid-tick for the meter and provider.
                    std::thread::sleep(Duration::from_millis(ctx.rng.range(0, ctx.tick_ms)));
                    let Some((name, pid)) = member_of(ctx, *t) else { return Ok(format!("no {} running", t.name())) };
                    signal(pid, sig);
                    Ok(format!("{how} {name} (pid {pid})"))
                }
            }
        }
        Fault::BrokerRestart => restart_up(ctx, libc::SIGTERM, false),
        Fault::CtrlCClosedOutput => restart_up(ctx, libc::SIGINT, true),
        Fault::NodeLosesBlocks { blocks } => {
            let c = ctx.sys.chain()?;
            for _ in 0..*blocks {
                ctx.miner.mine(&c)?;
            }
            let before = c.tip()?.height;
            let Some(pid) = ctx.sys.node_pid() else { return Ok("node not running".into()) };
            signal(pid, libc::SIGKILL);
            std::thread::sleep(Duration::from_secs(1));
            let back = ctx.node_back(Duration::from_secs(120));
            ctx.tally.check(I5, back, || "the node did not come back within 120 s of a crash".into());
            ctx.up_survived("a crash of the node")?;
            let after = ctx.sys.chain().and_then(|c| Ok(c.tip()?.height)).unwrap_or(0);
            Ok(format!(
                "node killed at height {before} right after {blocks} blocks; back at height {after} ({} lost)",
                before.saturating_sub(after)
            ))
        }
        Fault::NodeOutage { secs } => {
            let Some(pid) = ctx.sys.node_pid() else { return Ok("node not running".into()) };
            signal(pid, libc::SIGSTOP);
            let resume = Resume(Some(pid));
            let end = Instant::now() + Duration::from_secs(*secs);
            let (mut acked, mut sent) = (0, 0);
            while Instant::now() < end {
                sent += 1;
                let round = ctx.tally.round;
                let ok = ctx.probe.send_within(ctx.sys, round, true, Duration::from_secs(10))?;
                if ok {
                    acked += 1;
                    // Its proof answers, and says pending (the node is down, nothing anchors it).
                    let id = ctx.probe.acked.last().map(|a| a.receipt.reading_id.clone()).unwrap_or_default();
                    let proof = ctx.sys.get_json(&format!("/v1/readings/{id}/proof"));
                    ctx.tally.check(I5, proof.is_ok(), || {
                        format!("the proof of {id}, acknowledged while the node was down, does not answer: {:?}", proof.err())
                    });
                }
                ctx.tally.check(I5, ok, || format!("a reading was not acknowledged within 10 s while the node was down ({secs} s outage)"));
                std::thread::sleep(Duration::from_millis(1000));
            }
            drop(resume);
            let back = ctx.node_back(Duration::from_secs(60));
            ctx.tally.check(I5, back, || "the node did not answer again after SIGCONT".into());
            ctx.up_survived("a node outage")?;
            Ok(format!("node stopped {secs} s: {acked}/{sent} readings acknowledged meanwhile"))
        }
        Fault::DiskFull { secs } => {
            let Some(dir) = ctx.disk.clone() else { return Ok("no small file system for the gateway: skipped".into()) };
            let ballast = fill(&dir)?;
            let before = ctx.probe.acked.len();
            ctx.busy(Duration::from_secs(*secs), true);
            let during = ctx.probe.acked.len() - before;
            drop(ballast);
            ctx.up_survived("a full disk")?;
            Ok(format!("gateway disk full for {secs} s ({during} readings acknowledged meanwhile)"))
        }
        Fault::Network { delay_ms, loss_pct, secs } => {
            let proxy = ctx.proxy;
            let (before, open) = (proxy.counters(), proxy.open());
            let link = Link::from_fault(*delay_ms, *loss_pct);
            proxy.set(link);
            let heal = Heal(proxy);
            ctx.busy(Duration::from_secs(*secs), true);
            drop(heal);
            let c = proxy.counters().since(&before);
            let ports = format!("provider HTTP :{}, Lightning :{}", ctx.sys.ports.provider_http, ctx.sys.ports.provider_ln);
            Ok(match link {
                Link::Cut => format!(
                    "{ports} cut for {secs} s: {} of {open} open connection(s) closed at once, {} new one(s) refused",
                    c.cut, c.refused
                ),
                _ => format!(
                    "{ports}: {delay_ms} ms delay, {loss_pct} % loss for {secs} s: {} chunk(s) delayed, {} stall(s) injected ({} ms in all), {} connection(s) made, {} B forwarded",
                    c.delayed, c.stalls, c.stalled_ms, c.accepted, c.bytes
                ),
            })
        }
    }
}

/// Stop `up` with `sig` (SIGKILL: at once), check a clean stop was clean, start it again.
fn restart_up(ctx: &mut Ctx<'_>, sig: i32, close_output: bool) -> Result<String, DrillError> {
    let what = match (sig, close_output) {
        (libc::SIGKILL, _) => "kill -9 of up",
        (libc::SIGINT, true) => "Ctrl-C of up with its output closed",
        (libc::SIGINT, false) => "Ctrl-C of up",
        _ => "SIGTERM of up",
    };
    if sig == libc::SIGKILL {
        // A random instant, possibly mid-tick or between a trigger and its acknowledgement.
        std::thread::sleep(Duration::from_millis(ctx.rng.range(0, ctx.tick_ms)));
        ctx.sys.kill_up();
    } else {
        let offset = debug_log_len(ctx.sys);
        ctx.sys.signal_up(sig, close_output);
        let t0 = Instant::now();
        let code = ctx.sys.wait_up(Duration::from_secs(150));
        let code = match code {
            Ok(c) => c,
            Err(e) => {
                ctx.tally.fail(I5, format!("{what}: {e}"));
                ctx.sys.kill_up();
                None
            }
        };
        ctx.tally.check(I5, code == Some(0), || format!("{what}: bitmote up exited with {code:?}, not 0"));
        // A node `up` stopped must have stopped cleanly (a node it only attached to may run on).
        if ctx.sys.node_pid().is_none() {
            let log = debug_log_since(ctx.sys, offset);
            ctx.tally.check(I5, log.contains("Shutdown: done") || log.contains("Shutdown done"), || {
                format!("{what}: bitcoind was stopped without a clean shutdown (no \"Shutdown done\" in its debug.log)")
            });
        }
        tracing::info!("{what}: stopped in {:.1} s", t0.elapsed().as_secs_f64());
    }
    std::thread::sleep(Duration::from_millis(500));
    ctx.sys.start(Duration::from_secs(300))?;
    Ok(format!("{what}, then started again"))
}
