//! `bitmote provider` and `bitmote meter`: the two machines of a streaming energy
//! session, each a separate process with its own Lightning node under
//! `<data-dir>/<name>/`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bitmote_chain::bitcoin::secp256k1::PublicKey;
use bitmote_chain::{ChainClient, Faucet};
use bitmote_pay::ldk_node::lightning::ln::msgs::SocketAddress;
use bitmote_pay::ldk_node::Node;
use bitmote_pay::meter::Meter;
use bitmote_pay::node::{self as ln, NodeConfig};
use bitmote_pay::provider::Provider;
use bitmote_pay::tariff::{BuyerPolicy, Mode, Tariff};
use clap::{Args, Subcommand};

use crate::config::Config;
use crate::Global;

#[derive(Subcommand, Debug)]
pub enum ProviderCommand {
    /// Run the energy provider until Ctrl-C.
    Run(ProviderArgs),
    /// Print the provider's status (JSON).
    Status {
        #[arg(long, default_value = "http://127.0.0.1:8660")]
        url: String,
    },
}

// Parsed once per run: the size of the run variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum MeterCommand {
    /// Run the meter: fund it and open a channel if needed, then stream payments for
    /// one session (resuming an interrupted one first) and print both accounts.
    Run(MeterArgs),
    /// Print the meter's status (JSON).
    Status {
        #[arg(long, default_value = "http://127.0.0.1:8661")]
        url: String,
    },
}

#[derive(Args, Debug)]
pub struct Machine {
    /// Name of this machine: its state lives in `<data-dir>/<name>/`.
    #[arg(long)]
    name: Option<String>,
    /// Lightning P2P address.
    #[arg(long, value_name = "ADDR")]
    ln_listen: Option<SocketAddr>,
    /// JSON API address.
    #[arg(long, value_name = "ADDR")]
    http: Option<SocketAddr>,
}

#[derive(Args, Debug)]
pub struct ProviderArgs {
    #[command(flatten)]
    machine: Machine,
    /// The Lightning address peers must connect to when it is not the one listened on (a
    /// port forward or a proxy in front of the provider): announced in gossip and shown in
    /// the status as `node.announced`, which hubs and meters connect to. Default: the
    /// listening address.
    #[arg(long, value_name = "ADDR")]
    ln_announce: Option<SocketAddr>,
    /// Price per Wh in millisatoshis.
    #[arg(long, default_value_t = 250)]
    price_msat_per_wh: u64,
    /// Tick length in milliseconds.
    #[arg(long, default_value_t = 2000)]
    tick_ms: u64,
    /// `prepaid` or `postpaid`.
    #[arg(long, default_value = "prepaid")]
    mode: Mode,
    /// How late a payment may be before the supply is cut (ms).
    #[arg(long, default_value_t = 2000)]
    grace_ms: u64,
    /// Contracted power (W).
    #[arg(long, default_value_t = 7000)]
    max_power_w: u64,
    /// A session ends after this much is paid (msat).
    #[arg(long, default_value_t = 100_000_000)]
    session_limit_msat: u64,
}

#[derive(Args, Debug)]
pub struct MeterArgs {
    #[command(flatten)]
    machine: Machine,
    /// The provider's JSON API.
    #[arg(long, default_value = "http://127.0.0.1:8660")]
    provider_url: String,
    /// Pin the provider's node id. Required off regtest; on regtest the node id the
    /// provider's API gives on first use is pinned in `<data-dir>/<name>/provider.pin`.
    #[arg(long)]
    provider_node: Option<String>,
    /// Spending policy: the highest price accepted (msat per Wh). A tariff above it is
    /// refused before anything is paid.
    #[arg(long, default_value_t = BuyerPolicy::default().max_price_msat_per_wh)]
    max_price_msat_per_wh: u64,
    /// Spending policy: the most one session may cost (msat).
    #[arg(long, default_value_t = BuyerPolicy::default().max_session_msat)]
    max_session_msat: u64,
    /// Spending policy: the most all sessions may cost in any 24 hours (msat).
    #[arg(long, default_value_t = BuyerPolicy::default().max_day_msat)]
    max_day_msat: u64,
    /// Spending policy: the most a prepaid meter pays ahead of its energy (msat).
    #[arg(long, default_value_t = BuyerPolicy::default().max_cover_msat)]
    max_cover_msat: u64,
    /// Channel size when a channel must be opened (sat).
    #[arg(long, default_value_t = 500_000)]
    channel_sat: u64,
    /// Stop after this many ticks (default: until the session limit or Ctrl-C).
    #[arg(long)]
    ticks: Option<u64>,
    /// Pay the provider through this hub (`NODE_ID@HOST:PORT`, e.g. the gateway's Lightning
    /// node): the meter's channel goes to the hub, which must have an announced channel to the
    /// provider; the hub's routing fee is paid on top of each tick.
    #[arg(long, value_name = "NODE_ID@HOST:PORT")]
    via: Option<String>,
    /// A bitmote gateway to post every paid tick's signed register reading to, as a
    /// notary receipt (the meter's device key must be enrolled there).
    #[arg(long, value_name = "URL")]
    notary_url: Option<String>,
}

fn start_node(
    g: &Global,
    m: &Machine,
    role: &str,
    default_ln: u16,
    announce_as: Option<SocketAddr>,
) -> Result<(Arc<Node>, std::path::PathBuf, ChainClient)> {
    let cfg = Config::load(g.config.as_deref(), &g.data_dir())?;
    let client = crate::node::connect(g, &cfg)?;
    let name = m.name.clone().unwrap_or_else(|| role.to_string());
    let dir = g.data_dir().join(&name);
    let ncfg = NodeConfig {
        dir: ln::node_dir(&dir),
        listen: m.ln_listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], default_ln))),
        rpc: client.config().clone(),
        alias: name,
        // A provider announces its address, so a hub can open an announced channel to it
        // and meters elsewhere can route to it; a meter stays private.
        announce: role == "provider",
        announce_as,
    };
    let node = ln::start(&ncfg).context("starting the Lightning node")?;
    match announce_as {
        Some(a) => tracing::info!("{role} node {} listening on {}, reached at {a}", node.node_id(), ncfg.listen),
        None => tracing::info!("{role} node {} listening on {}", node.node_id(), ncfg.listen),
    }
    Ok((node, dir, client))
}

fn print_status(url: &str) -> Result<()> {
    let v: serde_json::Value = ureq::get(&format!("{}/v1/status", url.trim_end_matches('/')))
        .call()
        .with_context(|| format!("{url} does not answer"))?
        .into_json()?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

pub fn provider(g: &Global, cmd: ProviderCommand) -> Result<()> {
    let a = match cmd {
        ProviderCommand::Status { url } => return print_status(&url),
        ProviderCommand::Run(a) => a,
    };
    let stop = crate::node::stop_flag()?;
    let (node, dir, _client) = start_node(g, &a.machine, "provider", 9735, a.ln_announce)?;
    let tariff = Tariff {
        provider: String::new(),
        price_msat_per_wh: a.price_msat_per_wh,
        tick_ms: a.tick_ms,
        mode: a.mode,
        grace_ms: a.grace_ms,
        max_power_w: a.max_power_w,
        session_limit_msat: a.session_limit_msat,
        valid_until: bitmote_chain::now_secs() + 365 * 86400,
    };
    let http = a.machine.http.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8660)));
    let p = Provider::start(node.clone(), &dir, tariff, http)?;
    println!("provider {} ready: API http://{} (tariff {})", node.node_id(), p.http_addr, p.tariff().id());
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
    p.shutdown();
    node.stop().ok();
    Ok(())
}

use bitmote_sim::{lightning_address, machine_node};

/// Open a channel to `peer` (the provider, or a hub) if there is none, funding the meter's
/// wallet on regtest; wait until it is usable.
fn ensure_channel(faucet: Option<&dyn Faucet>, node: &Node, peer: PublicKey, addr: SocketAddress, sat: u64) -> Result<()> {
    // A channel there may be closed under us while we wait (LDK's force close of a channel
    // whose state a crash lost): then a new one is opened.
    if !ln::channels_with(node, &peer).is_empty() && ln::wait_usable_or_gone(faucet, node, peer)? {
        return Ok(());
    }
    ln::open_funded_channel(faucet, node, peer, addr, sat, false).context("the meter's channel")?;
    println!("opened a {sat} sat channel to {peer}");
    Ok(())
}

pub fn meter(g: &Global, cmd: MeterCommand) -> Result<()> {
    let a = match cmd {
        MeterCommand::Status { url } => return print_status(&url),
        MeterCommand::Run(a) => a,
    };
    let stop = crate::node::stop_flag()?;
    let (node, dir, client) = start_node(g, &a.machine, "meter", 9736, None)?;
    // Until the session streams there is nothing to close: a stop (a SIGTERM, or `up`
    // dying: the fleet's members get SIGTERM then) ends the meter at once, its Lightning
    // node stopped cleanly, instead of after the waits for a channel or a route (up to
    // 10 minutes each, with the hub maybe gone). Found by `bitmote drill`: a meter left
    // waiting after a `kill -9` of `up` held its Lightning port against the next one.
    let streaming = Arc::new(AtomicBool::new(false));
    {
        let (stop, streaming, node) = (stop.clone(), streaming.clone(), node.clone());
        std::thread::spawn(move || {
            while !streaming.load(Ordering::SeqCst) {
                if stop.load(Ordering::SeqCst) {
                    eprintln!("stopped before the session started streaming");
                    node.stop().ok();
                    std::process::exit(0);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
    }
    let url = a.provider_url.trim_end_matches('/').to_string();
    let status: serde_json::Value =
        ureq::get(&format!("{url}/v1/status")).call().with_context(|| format!("the provider at {url} is offline"))?.into_json()?;
    let (provider, paddr) = machine_node(status).with_context(|| format!("the provider at {url}"))?;
    let pnode = provider.to_string();
    // The provider's node id is pinned: a server answering at the provider's URL cannot
    // name another node to be paid.
    pinned_provider(client.network(), a.provider_node.as_deref(), &dir.join("provider.pin"), &pnode, &url)?;
    // On regtest, coins and confirmations come from mining; elsewhere the operator funds the meter.
    let faucet = match client.network() {
        bitmote_chain::bitcoin::Network::Regtest => Some(bitmote_regtest::RegtestFaucet::new(&client)?),
        _ => None,
    };
    let faucet = faucet.as_ref().map(|f| f as &dyn Faucet);
    match &a.via {
        None => ensure_channel(faucet, &node, provider, paddr, a.channel_sat)?,
        Some(hub) => {
            let (hub_id, hub_addr) = hub.split_once('@').context("--via must be NODE_ID@HOST:PORT")?;
            let hub = ln::parse_node_id(hub_id)?;
            ensure_channel(faucet, &node, hub, lightning_address(hub_addr)?, a.channel_sat)?;
            println!("waiting for the hub's channel to the provider to be announced (gossip)");
            ln::wait_for_route(faucet, &node, hub, provider)?;
            println!("the provider is reachable through the hub");
        }
    }
    let http = a.machine.http.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8661)));
    let m = Meter::start(node.clone(), &dir, &url, http)?;
    // From here a stop closes the session the normal way (below).
    streaming.store(true, Ordering::SeqCst);
    m.set_policy(BuyerPolicy {
        max_price_msat_per_wh: a.max_price_msat_per_wh,
        max_session_msat: a.max_session_msat,
        max_day_msat: a.max_day_msat,
        max_cover_msat: a.max_cover_msat,
    });
    if let Some(n) = &a.notary_url {
        let k = m.device_key().public_key();
        println!("notary receipts to {n} as device {} (key {})", k.device_id(), bitmote_device::hex_encode(&k.encode()));
        m.post_receipts(n);
    }
    let s = match m.open_sessions()?.pop() {
        Some(s) => {
            println!("resuming session {} at tick {}", bitmote_device::hex_encode(&s.id), s.account.ticks);
            s
        }
        None => m.open_session(&pnode)?,
    };
    println!("session {} open; meter API http://{}", bitmote_device::hex_encode(&s.id), m.http_addr);
    let m2 = m.clone();
    std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
        }
        // Streaming stops; the session is still closed (tick in flight settled, prepaid
        // tick ahead delivered) and the receipts posted before the meter exits.
        m2.stop_streaming();
    });
    let s = m.run(&s.id, a.ticks)?;
    let out = m.close(&s.id)?;
    // Every paid tick's reading to the notary before the final statement (the notary
    // thread runs until shutdown); the statement says how many still wait, if any.
    let flushed = a.notary_url.is_none() || m.flush_receipts(Duration::from_secs(15));
    if !flushed {
        eprintln!("some tick readings are not notarized yet; they will be posted on the next run");
    }
    let statement = serde_json::json!({
        "session": bitmote_device::hex_encode(&s.id),
        "state": out.session.state,
        "reason": out.session.reason,
        "meter": out.session.account,
        "provider": out.provider.as_ref().map(|p| &p.session.account),
        "reconciled": out.reconciled,
        "unsettled": out.unsettled,
        "credit_msat": out.session.account.credit_msat(&out.session.tariff) as i64,
        "notary": m.status()["notary"],
        "provider_statement": out.provider,
        "closed_ms": bitmote_chain::now_ms(),
    });
    // Kept for whoever looks from outside (an operator, the fault drill): the last
    // session's final statement, `<data-dir>/<name>/statement.json`.
    let path = dir.join("statement.json");
    if let Err(e) = bitmote_chain::stream::write_atomic(&path, &serde_json::to_vec_pretty(&statement)?) {
        eprintln!("writing {}: {e}", path.display());
    }
    let mut short = statement.clone();
    short.as_object_mut().map(|o| o.remove("provider_statement"));
    println!("{}", serde_json::to_string_pretty(&short)?);
    m.shutdown();
    node.stop().ok();
    Ok(())
}

/// The provider's node id this meter pays: `given` (`--provider-node`, required off regtest),
/// or on regtest the one pinned in `pin_file` at the first start (trust on first use). The
/// node the provider's URL reports now must be that one.
fn pinned_provider(
    network: bitmote_chain::bitcoin::Network,
    given: Option<&str>,
    pin_file: &Path,
    reported: &str,
    url: &str,
) -> Result<String> {
    let pin = match given {
        Some(p) => p.to_string(),
        None if network != bitmote_chain::bitcoin::Network::Regtest => {
            bail!("--provider-node is required off regtest (the provider's node id, from its operator)")
        }
        None => match std::fs::read_to_string(pin_file) {
            Ok(p) => p.trim().to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::write(pin_file, format!("{reported}\n")).with_context(|| format!("writing {}", pin_file.display()))?;
                println!("pinned the provider's node id {reported} in {}", pin_file.display());
                reported.to_string()
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", pin_file.display())),
        },
    };
    if pin != reported {
        bail!("the provider at {url} is node {reported}, not the pinned {pin}");
    }
    Ok(pin)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "02eec7245d6b7d2ccb30380bfbe2a3648cd7a942653f5aa340edcea1f283686619";

    #[test]
    fn peers_connect_to_the_announced_address_else_the_listening_one() {
        let s = serde_json::json!({ "node": { "node_id": ID, "listening": ["127.0.0.1:19735"], "announced": ["127.0.0.1:9735"] } });
        let (id, addr) = machine_node(s).unwrap();
        assert_eq!(id.to_string(), ID);
        assert_eq!(addr.to_string(), "127.0.0.1:9735");
        // A status from before `announced` existed.
        let old = serde_json::json!({ "node": { "node_id": ID, "listening": ["127.0.0.1:19735"] } });
        assert_eq!(machine_node(old).unwrap().1.to_string(), "127.0.0.1:19735");
        for bad in [
            serde_json::json!({}),
            serde_json::json!({ "node": { "node_id": ID } }),
            serde_json::json!({ "node": { "node_id": "x", "listening": ["127.0.0.1:1"] } }),
        ] {
            assert!(machine_node(bad.clone()).is_err(), "{bad}");
        }
    }

    /// Issue #13 item 1: whoever answers at the provider's URL cannot name another node to
    /// be paid: not against `--provider-node`, not against the id pinned at the first start.
    #[test]
    fn the_provider_node_is_pinned_and_another_one_refused() {
        use bitmote_chain::bitcoin::Network;
        const OTHER: &str = "03b31e5bbf2cdbe115b485a2b480e70a1ef3951a0dc6df4b1232e0e56f3dce18d6";
        let dir = tempfile::tempdir().unwrap();
        let pin = dir.path().join("provider.pin");
        let e = pinned_provider(Network::Bitcoin, None, &pin, ID, "u").unwrap_err().to_string();
        assert!(e.contains("--provider-node is required off regtest"), "{e}");
        assert!(!pin.exists());
        let e = pinned_provider(Network::Bitcoin, Some(ID), &pin, OTHER, "u").unwrap_err().to_string();
        assert!(e.contains(&format!("is node {OTHER}, not the pinned {ID}")), "{e}");
        assert_eq!(pinned_provider(Network::Bitcoin, Some(ID), &pin, ID, "u").unwrap(), ID);
        // Regtest: the first start pins what the provider reports; later starts hold to it.
        assert_eq!(pinned_provider(Network::Regtest, None, &pin, ID, "u").unwrap(), ID);
        assert_eq!(std::fs::read_to_string(&pin).unwrap().trim(), ID);
        let e = pinned_provider(Network::Regtest, None, &pin, OTHER, "u").unwrap_err().to_string();
        assert!(e.contains("not the pinned"), "{e}");
    }
}
