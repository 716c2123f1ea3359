//! `bitmote provider` and `bitmote meter` as separate processes on a real regtest
//! node: a session survives `kill -9` of the meter and of the provider, and the two
//! accounts still agree to the millisatoshi.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::bitmote;

fn port() -> String {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string()
}

/// A temporary data directory that is kept, and named on stderr, when the test fails:
/// the machines' logs (`<name>/ldk/ldk_node.log`) and stores are what explains a failure.
struct Kept(Option<tempfile::TempDir>);

impl Kept {
    fn new() -> Kept {
        Kept(Some(tempfile::tempdir().unwrap()))
    }
    fn path(&self) -> &Path {
        self.0.as_ref().unwrap().path()
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(d) = self.0.take() {
                eprintln!("test failed: its data directory is kept at {}", d.keep().display());
            }
        }
    }
}

/// A machine process whose stdout lines arrive on a channel.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    fn spawn(data: &Path, args: &[&str]) -> Proc {
        let mut child = bitmote(data).args(args).stdout(Stdio::piped()).spawn().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        Proc { child, lines }
    }
    /// Wait for a line containing `what`; returns it.
    fn expect(&self, what: &str) -> String {
        loop {
            let l = self.lines.recv_timeout(Duration::from_secs(180)).unwrap_or_else(|_| panic!("no line with {what:?}"));
            if l.contains(what) {
                return l;
            }
        }
    }
    fn kill9(&mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }
    /// SIGTERM (what `bitmote up` sends its meter at Ctrl-C) and wait for the exit.
    fn term(&mut self) -> std::process::ExitStatus {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "no exit within 90 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn status(url: &str) -> serde_json::Value {
    ureq::get(&format!("{url}/v1/status")).call().unwrap().into_json().unwrap()
}

fn ticks(url: &str) -> u64 {
    ureq::get(&format!("{url}/v1/status"))
        .call()
        .ok()
        .and_then(|r| r.into_json::<serde_json::Value>().ok())
        .and_then(|v| v["sessions"].as_array()?.iter().filter_map(|s| s["account"]["ticks"].as_u64()).max())
        .unwrap_or(0)
}

fn wait_ticks(url: &str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while ticks(url) < n {
        assert!(Instant::now() < deadline, "meter did not reach tick {n}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_session_survives_kill_9_of_either_machine_and_both_accounts_agree() {
    let dir = Kept::new();
    let d = dir.path();
    assert!(bitmote(d).args(["node", "start"]).status().unwrap().success());
    let (p_ln, p_http, m_ln, m_http) = (port(), port(), port(), port());
    // A generous grace period: this test is about recovery, and restarting a machine
    // (Lightning node, peer reconnection) takes seconds on a busy 2-core CI box.
    let provider_args =
        ["provider", "run", "--ln-listen", &p_ln, "--http", &p_http, "--mode", "postpaid", "--tick-ms", "500", "--grace-ms", "20000"];
    let purl = format!("http://{p_http}");
    let murl = format!("http://{m_http}");
    let meter_args = ["meter", "run", "--ln-listen", &m_ln, "--http", &m_http, "--provider-url", &purl, "--ticks", "40"];

    // A provider that is offline at session start: a clear error, nothing paid.
    let out = bitmote(d).args(meter_args).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("the provider at {purl} is offline")), "{err}");

    let mut provider = Proc::spawn(d, &provider_args);
    provider.expect("ready");
    let mut meter = Proc::spawn(d, &meter_args);
    meter.expect("session");
    wait_ticks(&murl, 8);
    meter.kill9();
    let paid_at_kill = ticks(&purl);

    // The meter comes back, resumes the same session, and goes on paying.
    let meter = Proc::spawn(d, &meter_args);
    let resumed = meter.expect("resuming session");
    assert!(resumed.contains("at tick"), "{resumed}");
    wait_ticks(&murl, paid_at_kill + 8);

    // Now the provider dies mid-session and comes back within the grace period.
    provider.kill9();
    let provider = Proc::spawn(d, &provider_args);
    provider.expect("ready");

    let summary = meter.expect("\"reconciled\"");
    if let Some(who) = ldk_stale_close(d) {
        // See `ldk_stale_close`: LDK force-closed the channel, and the session ended early
        // (the provider cut it after its grace period). It ended honestly: both accounts
        // are the meter's paid ticks, or the meter says it does not reconcile.
        eprintln!("the {who}'s Lightning node force-closed the channel at restart (rust-lightning#4286): {summary}");
        let mut m = meter;
        assert!(m.child.wait().unwrap().success());
        let ps = status(&purl);
        assert_eq!(ps["totals"]["refused"], 0, "{ps:#}");
        let s: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join("meter/statement.json")).unwrap()).unwrap();
        if s["reconciled"] == true {
            assert_eq!(s["meter"], ps["sessions"][0]["account"], "{s:#} {ps:#}");
        } else {
            assert!(s["unsettled"].as_str().is_some_and(|u| !u.is_empty()), "{s:#}");
        }
        drop(provider);
        assert!(bitmote(d).args(["node", "stop"]).status().unwrap().success());
        return;
    }
    assert!(summary.contains("true"), "{summary}");
    let mut m = meter;
    assert!(m.child.wait().unwrap().success());

    // Both accounts: 40 ticks, equal, nothing refused, no late or short payment.
    let ps = status(&purl);
    let s = &ps["sessions"][0];
    assert_eq!(ps["sessions"].as_array().unwrap().len(), 1, "{ps:#}");
    assert_eq!(s["account"]["ticks"], 40, "{s:#}");
    assert_eq!(s["state"], "closed", "{s:#}");
    assert_eq!(ps["totals"]["refused"], 0, "{ps:#}");
    assert_eq!(s["late"], 0);
    assert_eq!(s["short"], 0);
    // The meter's store says the same (read by a fresh meter process's API is not
    // needed: the summary line compared them); the provider really received it.
    assert!(s["account"]["paid_msat"].as_u64().unwrap() > 0);
    drop(provider);
    assert!(bitmote(d).args(["node", "stop"]).status().unwrap().success());
}

/// The meter's closing summary (pretty JSON, from a line `{` to a line `}`).
fn summary(p: &Proc) -> serde_json::Value {
    p.expect("{"); // the summary's first line (no other output line has a brace)
    let mut text = String::from("{\n");
    loop {
        let l = p.lines.recv_timeout(Duration::from_secs(60)).expect("summary ends");
        text.push_str(&l);
        text.push('\n');
        if l == "}" {
            break;
        }
    }
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn each_paid_tick_is_a_notary_reading_whose_proof_verifies_against_the_chain() {
    let dir = Kept::new();
    let d = dir.path();
    let u = common::up(d, &["--block-interval", "1"]);
    let gw = u.http.clone();
    let (p_ln, p_http, m_ln, m_http) = (port(), port(), port(), port());
    let purl = format!("http://{p_http}");
    let provider = Proc::spawn(
        d,
        &["provider", "run", "--ln-listen", &p_ln, "--http", &p_http, "--mode", "postpaid", "--tick-ms", "500", "--grace-ms", "20000"],
    );
    provider.expect("ready");
    let meter = Proc::spawn(
        d,
        &["meter", "run", "--ln-listen", &m_ln, "--http", &m_http, "--provider-url", &purl, "--ticks", "12", "--notary-url", &gw],
    );
    // The meter names its device key; the operator enrols it with the gateway.
    let line = meter.expect("notary receipts to");
    let key = line.rsplit("(key ").next().unwrap().trim_end_matches(')').to_string();
    let enrol = bitmote(d).env("BITMOTE_GATEWAY_URL", &gw).args(["device", "enroll", &key, "--name", "meter"]).output().unwrap();
    assert!(enrol.status.success(), "{}", String::from_utf8_lossy(&enrol.stderr));

    let s = summary(&meter);
    assert_eq!(s["reconciled"], true, "{s:#}");
    assert_eq!(s["meter"]["ticks"], 12, "{s:#}");
    // Every paid tick has a receipt, none waits.
    assert_eq!(s["notary"]["posted"], 12, "{s:#}");
    assert_eq!(s["notary"]["waiting"], 0, "{s:#}");
    let last = &s["notary"]["last_receipt"];
    let id = last["reading_id"].as_str().unwrap().to_string();

    // The gateway holds the meter's signed register reading (sensor code METER_TICK).
    let r: serde_json::Value = ureq::get(&format!("{gw}/v1/readings/{id}")).call().unwrap().into_json().unwrap();
    assert_eq!(r["reading"]["sensor"], bitmote_device::reading::sensor::METER_TICK as u64, "{r:#}");
    assert_eq!(r["reading"]["device"], s["notary"]["device_id"], "{r:#}");

    // Once anchored and confirmed, anyone verifies the bill's last tick against the chain.
    let tree_size = last["tree_size"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v: serde_json::Value = ureq::get(&format!("{gw}/v1/anchors")).call().unwrap().into_json().unwrap();
        if v["anchors"].as_array().unwrap().iter().any(|a| a["state"] == "confirmed" && a["tree_size"].as_u64() >= Some(tree_size)) {
            break;
        }
        assert!(Instant::now() < deadline, "no confirmed anchor covering {tree_size}: {v}");
        std::thread::sleep(Duration::from_millis(300));
    }
    let bundle = d.join("tick.proof.json");
    let file = d.join("tick.bin");
    let p = bitmote(d)
        .env("BITMOTE_GATEWAY_URL", &gw)
        .args(["proof", &id, "--out", bundle.to_str().unwrap(), "--reading", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(p.status.success(), "{}", String::from_utf8_lossy(&p.stderr));
    let v = bitmote(d)
        .env("BITMOTE_GATEWAY_URL", &gw)
        .args(["verify", bundle.to_str().unwrap(), "--reading", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&v.stdout).starts_with("OK: reading"),
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    drop(provider);
    assert!(u.interrupt().success());
}

/// The meter's ticks as it counts them (paid), from its status API.
fn meter_ticks_now(url: &str) -> Option<u64> {
    let v: serde_json::Value = ureq::get(&format!("{url}/v1/status")).call().ok()?.into_json().ok()?;
    v["sessions"].as_array()?.iter().filter(|s| s["state"] == "open").filter_map(|s| s["account"]["ticks"].as_u64()).max()
}

/// Wait for the meter's next paid tick, then `after_ms` more: with a 500 ms tick, about
/// when the following tick is signed, written and sent.
fn just_after_a_tick(url: &str, after_ms: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let n = meter_ticks_now(url).unwrap_or(0);
    while meter_ticks_now(url).unwrap_or(0) <= n {
        assert!(Instant::now() < deadline, "the meter stopped paying at tick {n}");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(after_ms));
}

/// LDK 0.2 writes its ChannelManager lazily, after the ChannelMonitor it updated: a
/// `kill -9` in between leaves a manager older than its monitor, and at restart LDK
/// force-closes the channel ("A ChannelManager is stale compared to the current
/// ChannelMonitor"; rust-lightning#4286, open upstream). A kill aimed at a tick hits that
/// window now and then. The machine whose Lightning node did it, if one did.
fn ldk_stale_close(d: &Path) -> Option<&'static str> {
    ["meter", "provider"].into_iter().find(|m| {
        std::fs::read_to_string(d.join(m).join("ldk/ldk_node.log"))
            .is_ok_and(|log| log.contains("ChannelManager is stale compared to the current ChannelMonitor"))
    })
}

/// The provider's view of its (only) session.
fn provider_session(purl: &str) -> Option<serde_json::Value> {
    let v: serde_json::Value = ureq::get(&format!("{purl}/v1/status")).call().ok()?.into_json().ok()?;
    v["sessions"].as_array()?.first().cloned()
}

/// Wait for the meter's `n`-th paid tick. `false`: the session cannot go on because LDK
/// force-closed the channel under it ([`ldk_stale_close`]; a meter that restarts opens a
/// new channel, so only a provider's force close with the meter running ends it).
///
/// Also `false` when the provider cut the session for lateness after both machines were
/// killed while a tick was in flight: the restarted meter's pending keysend can stay stuck
/// in ldk-node for about 20 s (seen once in ten runs: tick 15 paid 21.7 s after it was sent,
/// the grace period being 20 s) — an open finding; what must hold then is checked the same way.
fn progress(d: &Path, murl: &str, purl: &str, n: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(120);
    while ticks(murl) < n {
        let ended = provider_session(purl).is_some_and(|s| s["state"] != "open");
        if ended && (ldk_stale_close(d).is_some() || provider_session(purl).is_some_and(|s| s["late"].as_u64() > Some(0))) {
            return false;
        }
        assert!(Instant::now() < deadline, "meter did not reach tick {n}");
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

/// The channel was force-closed by LDK itself ([`ldk_stale_close`]) and the session ended:
/// what must still hold is that nothing was lost or counted twice. The provider refused
/// nothing; the meter's final statement either reconciles, or says it does not and why,
/// and the provider credited the meter's paid ticks, plus at most the one tick whose HTLC
/// was in the force-closed channel (it settles on chain).
fn after_an_upstream_force_close(d: &Path, mut meter: Proc, purl: &str) {
    match ldk_stale_close(d) {
        Some(who) => eprintln!(
            "the {who}'s Lightning node force-closed the channel at restart (stale ChannelManager after kill -9, \
             rust-lightning#4286): checking that nothing was lost or counted twice, then stopping"
        ),
        None => eprintln!("the provider cut the session for a late tick after the restarts: checking that nothing was lost or counted twice, then stopping"),
    }
    assert!(meter.term().success());
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join("meter/statement.json")).unwrap()).unwrap();
    let ps = provider_session(purl).expect("the provider's session");
    assert_eq!(ps["refused_msat"], 0, "{ps:#}");
    let (mt, pt) = (s["meter"]["ticks"].as_u64().unwrap(), ps["account"]["ticks"].as_u64().unwrap());
    if s["reconciled"] == true {
        assert_eq!(s["meter"], ps["account"], "{s:#}");
    } else {
        // Not reconciled, and it says why; the provider is ahead by the tick whose HTLC
        // was in the force-closed channel at most (it settles on chain: the provider claims
        // it with the preimage, or it times out back to the meter).
        assert!(s["unsettled"].as_str().is_some_and(|u| !u.is_empty()), "{s:#}");
        assert!(pt == mt || pt == mt + 1, "provider {pt} ticks, meter {mt}: {s:#} {ps:#}");
    }
    assert!(bitmote(d).args(["node", "stop"]).status().unwrap().success());
}

/// Prepaid, kill -9 of the meter mid-tick, of the provider, and of the meter while its
/// tick is in flight to the dead provider (deterministically pending in its store);
/// each restarted. Then SIGTERM to the meter (what `bitmote up` sends at Ctrl-C): its
/// final statement, on stdout and in `<data-dir>/meter/statement.json`, says
/// reconciled, both accounts equal to the millisatoshi, nothing unsettled, and the
/// buyer paid exactly its energy (the tick paid ahead delivered, no refund).
#[test]
fn prepaid_kill_9_mid_tick_of_either_machine_then_sigterm_reconciles() {
    let dir = Kept::new();
    let d = dir.path();
    assert!(bitmote(d).args(["node", "start"]).status().unwrap().success());
    let (p_ln, p_http, m_ln, m_http) = (port(), port(), port(), port());
    let provider_args =
        ["provider", "run", "--ln-listen", &p_ln, "--http", &p_http, "--mode", "prepaid", "--tick-ms", "500", "--grace-ms", "20000"];
    let purl = format!("http://{p_http}");
    let murl = format!("http://{m_http}");
    let meter_args = ["meter", "run", "--ln-listen", &m_ln, "--http", &m_http, "--provider-url", &purl];
    let mut provider = Proc::spawn(d, &provider_args);
    provider.expect("ready");
    let mut meter = Proc::spawn(d, &meter_args);
    meter.expect("session");
    wait_ticks(&murl, 6);

    // 1. The meter dies about when a tick goes out.
    just_after_a_tick(&murl, 495);
    meter.kill9();
    let mut meter = Proc::spawn(d, &meter_args);
    meter.expect("resuming session");
    let at = ticks(&purl);
    if !progress(d, &murl, &purl, at + 6) {
        return after_an_upstream_force_close(d, meter, &purl);
    }

    // 2. The provider dies about when a tick arrives, and comes back.
    just_after_a_tick(&murl, 497);
    provider.kill9();
    let mut provider = Proc::spawn(d, &provider_args);
    provider.expect("ready");
    let at = ticks(&purl);
    if !progress(d, &murl, &purl, at + 6) {
        return after_an_upstream_force_close(d, meter, &purl);
    }

    // 3. The provider dies; the meter's next tick cannot arrive and stays in flight in
    //    its store while it retries; the meter dies too. Both come back.
    provider.kill9();
    std::thread::sleep(Duration::from_millis(1500));
    meter.kill9();
    let mut provider = Proc::spawn(d, &provider_args);
    provider.expect("ready");
    let meter = Proc::spawn(d, &meter_args);
    meter.expect("resuming session");
    let at = ticks(&purl);
    if !progress(d, &murl, &purl, at + 6) {
        return after_an_upstream_force_close(d, meter, &purl);
    }

    // 4. SIGTERM mid-tick: the meter closes and exits.
    just_after_a_tick(&murl, 230);
    let mut meter = meter;
    assert!(meter.term().success());
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join("meter/statement.json")).unwrap()).unwrap();
    assert_eq!(s["reconciled"], true, "{s:#}");
    assert_eq!(s["unsettled"], serde_json::Value::Null, "{s:#}");
    assert_eq!(s["meter"], s["provider"], "{s:#}");
    assert_eq!(s["credit_msat"], 0, "the buyer paid exactly its energy: {s:#}");
    let id = s["session"].as_str().unwrap();
    let ps: serde_json::Value = ureq::get(&format!("{purl}/v1/sessions/{id}")).call().unwrap().into_json().unwrap();
    assert_eq!(ps["account"], s["meter"], "{ps:#}");
    assert_eq!(ps["state"], "closed", "{ps:#}");
    assert_eq!(ps["refused_msat"], 0, "{ps:#}");
    assert_eq!(ps["short"], 0, "{ps:#}");
    let st = status(&purl);
    assert_eq!(st["totals"]["refused"], 0, "{st:#}");
    assert_eq!(st["sessions"].as_array().unwrap().len(), 1, "one session throughout: {st:#}");
    eprintln!("after 3 kills and a SIGTERM: {}", s["meter"]);
    provider.term();
    assert!(bitmote(d).args(["node", "stop"]).status().unwrap().success());
}

/// Found by `bitmote drill` (issue 16): a meter stopped before its session streams — here
/// waiting for a route through a hub that has no channel to the provider, as when `up` is
/// killed and its gateway (the hub) is gone — exits at once on SIGTERM (what `up`'s death
/// sends its fleet), its Lightning node stopped and its port free. It used to sit in the
/// wait (up to 10 minutes), holding the port the next `up`'s meter needed.
#[test]
fn a_meter_stopped_while_it_waits_for_a_route_exits_at_once_and_frees_its_port() {
    let dir = Kept::new();
    let d = dir.path();
    assert!(bitmote(d).args(["node", "start"]).status().unwrap().success());
    let (p_ln, p_http, h_ln, h_http, m_ln, m_http) = (port(), port(), port(), port(), port(), port());
    let purl = format!("http://{p_http}");
    let _provider = Proc::spawn(d, &["provider", "run", "--ln-listen", &p_ln, "--http", &p_http]);
    _provider.expect("ready");
    // A second Lightning node, with no channel to the provider, as the meter's hub.
    let hub = Proc::spawn(d, &["provider", "run", "--name", "hub", "--ln-listen", &h_ln, "--http", &h_http]);
    let hub_id = hub.expect("ready").split_whitespace().nth(1).unwrap().to_string();
    let via = format!("{hub_id}@{h_ln}");
    let mut meter = Proc::spawn(d, &["meter", "run", "--ln-listen", &m_ln, "--http", &m_http, "--provider-url", &purl, "--via", &via]);
    meter.expect("waiting for the hub's channel to the provider");
    std::thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    let status = meter.term();
    let took = t.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(30), "the meter took {took:?} to stop");
    // Its Lightning port is free for the next meter.
    TcpListener::bind(&m_ln).unwrap_or_else(|e| panic!("the meter's Lightning port {m_ln} is still taken: {e}"));
    drop(hub);
    assert!(bitmote(d).args(["node", "stop"]).status().unwrap().success());
}
