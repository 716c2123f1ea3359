//! The gateway's own Lightning node (optional): an ldk-node on the gateway's bitcoind
//! (RPC, cookie or user/password), state under `<gateway data>/ldk`, listening on
//! loopback. It hands out BOLT11 invoices for Lightning rules (payment orders) and
//! accepts inbound channels, so machines can use it as a routing hub.
//!
//! Invoices for Lightning rules are held (`receive_for_hash`; the preimage is the
//! gateway's, stored before the invoice is handed out). Its events are handled by one
//! thread: a `PaymentClaimable` for one of our invoices makes the rule's action due in the
//! actuator's outbox ([`Engine::lightning_claimable`], run by the actuator loop, which owns
//! the engine), and only once that is durable is the event acknowledged to ldk-node. A
//! crash in between replays the event, which then changes nothing (the event id is keyed
//! by the payment hash). The payment is claimed only once the device acknowledged the
//! action, and failed back otherwise ([`settle`], on every turn of the actuator loop).
//! (`PaymentReceived` fires actions only for invoices made before holding, claimed on arrival.)

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bitmote_actuator::{Engine, EngineEvent};
use bitmote_chain::ChainClient;
use bitmote_pay::ldk_node::{Event, Node};
use bitmote_pay::node::NodeConfig;

use crate::{GatewayError, Shared};

/// How the gateway runs its Lightning node.
#[derive(Clone, Debug)]
pub struct LightningConfig {
    /// Lightning P2P address (loopback by default).
    pub listen: SocketAddr,
    pub alias: String,
    /// Announce the node's address (so channels opened to it as announced enter the
    /// public graph, for routing through it).
    pub announce: bool,
}

impl Default for LightningConfig {
    fn default() -> Self {
        LightningConfig { listen: SocketAddr::from(([127, 0, 0, 1], 9735)), alias: "bitmote-gateway".into(), announce: true }
    }
}

/// What the gateway's node charges for forwarding, on every channel: no base fee and 0.1 %
/// (1000 ppm). LDK's default (1000 msat base, 0 %) would cost a machine 1 sat for every
/// micropayment routed through the hub, however small: 100 times a 10 msat tick.
pub const FORWARDING_FEE_BASE_MSAT: u32 = 0;
pub const FORWARDING_FEE_PPM: u32 = 1000;

/// Give every channel of `node` the gateway's forwarding fees (at start, and when a channel
/// becomes ready); a changed fee goes out to the network as a channel update.
fn apply_fees(node: &Node) {
    for c in node.list_channels() {
        let mut cfg = c.config;
        if (cfg.forwarding_fee_base_msat, cfg.forwarding_fee_proportional_millionths) == (FORWARDING_FEE_BASE_MSAT, FORWARDING_FEE_PPM) {
            continue;
        }
        cfg.forwarding_fee_base_msat = FORWARDING_FEE_BASE_MSAT;
        cfg.forwarding_fee_proportional_millionths = FORWARDING_FEE_PPM;
        if let Err(e) = node.update_channel_config(&c.user_channel_id, c.counterparty_node_id, cfg) {
            tracing::warn!("setting the forwarding fee of channel {}: {e}", c.channel_id);
        }
    }
}

/// Start the node under `<data_dir>/ldk` on the chain `client` talks to.
/// Its store asks `disk` for room when a write is refused, and its log pauses while the
/// disk is short of space (see [`crate::disk`]).
pub fn start_node(
    cfg: &LightningConfig,
    data_dir: &Path,
    client: &ChainClient,
    disk: &Arc<crate::disk::DiskGuard>,
) -> Result<Arc<Node>, GatewayError> {
    let nc = NodeConfig {
        dir: bitmote_pay::node::node_dir(data_dir),
        listen: cfg.listen,
        rpc: client.config().clone(),
        alias: cfg.alias.clone(),
        announce: cfg.announce,
        announce_as: None,
    };
    let log = Arc::new(bitmote_pay::ldk_store::FileLog::new(nc.dir.join("ldk_node.log"), bitmote_pay::ldk_node::logger::LogLevel::Info));
    disk.set_log(log.clone());
    let storage = bitmote_pay::node::NodeStorage { room: Some(disk.clone() as Arc<dyn bitmote_pay::ldk_store::MakeRoom>), log: Some(log) };
    let node = bitmote_pay::node::start_with(&nc, storage).map_err(|e| GatewayError::Lightning(e.to_string()))?;
    tracing::info!(node_id = %node.node_id(), listen = %cfg.listen, "Lightning node up");
    Ok(node)
}

/// The node's identity, address, channels and balances (`GET /v1/lightning`).
pub fn status(shared: &Shared) -> serde_json::Value {
    match &shared.lightning {
        Some(n) => {
            let mut v = bitmote_pay::node_json(n);
            v["enabled"] = serde_json::json!(true);
            v
        }
        None => serde_json::json!({ "enabled": false }),
    }
}

/// Hex of a payment hash.
pub fn hash_hex(h: &[u8; 32]) -> String {
    hex::encode(h)
}

/// Handle the node's events until the gateway stops.
///
/// With a faucet, an empty on-chain wallet is funded first: ldk-node accepts an inbound
/// (anchor) channel only with an on-chain reserve for fee bumping.
pub fn start_events(shared: Arc<Shared>, faucet: Option<Arc<dyn bitmote_chain::Faucet>>) -> Result<JoinHandle<()>, GatewayError> {
    std::thread::Builder::new()
        .name("lightning".into())
        .spawn(move || {
            if let Some(faucet) = &faucet {
                if let Some(node) = &shared.lightning {
                    if node.list_balances().total_onchain_balance_sats == 0 {
                        tracing::info!("asking the faucet for coins to the gateway's Lightning wallet (reserve for inbound channels)");
                        if let Err(e) = bitmote_pay::node::fund(faucet.as_ref(), node, 1) {
                            tracing::warn!("funding the Lightning wallet: {e}");
                        }
                    }
                }
            }
            events(shared)
        })
        .map_err(|e| GatewayError::Io { context: "spawning the Lightning event loop".into(), source: e })
}

fn events(shared: Arc<Shared>) {
    let Some(node) = shared.lightning.clone() else { return };
    apply_fees(&node);
    let rt = match tokio::runtime::Builder::new_current_thread().enable_time().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("Lightning event loop: {e}");
            return;
        }
    };
    while !shared.stop.load(Ordering::SeqCst) {
        let Ok(ev) = rt.block_on(async { tokio::time::timeout(Duration::from_millis(200), node.next_event_async()).await }) else {
            continue;
        };
        tracing::debug!("Lightning event {ev:?}");
        match handle(&shared, &ev) {
            Ok(()) => {
                if let Err(e) = node.event_handled() {
                    tracing::error!("acknowledging a Lightning event: {e}");
                }
            }
            Err(e) => {
                // Not acknowledged: ldk-node gives it again, and we retry.
                tracing::warn!("handling {ev:?}: {e}; will retry");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

fn handle(shared: &Shared, ev: &Event) -> Result<(), String> {
    match ev {
        Event::PaymentClaimable { payment_hash, claimable_amount_msat, claim_deadline, .. } => {
            let (hash, amount, deadline) = (hash_hex(&payment_hash.0), *claimable_amount_msat, *claim_deadline);
            let h = hash.clone();
            let r = on_engine(shared, move |e| e.lightning_claimable(&h, amount, deadline))?.map_err(|e| e.to_string())?;
            match r {
                Some(EngineEvent::Due { event_id }) => {
                    tracing::info!("Lightning payment {hash} ({amount} msat) held until block {deadline:?}: {event_id} due")
                }
                Some(EngineEvent::LightningRefused { reason, .. }) => {
                    crate::actuator::alert(shared, format!("Lightning payment {hash}: {reason}"));
                    if let Some(node) = &shared.lightning {
                        if let Err(e) = node.bolt11_payment().fail_for_hash(*payment_hash) {
                            tracing::warn!("failing back {hash}: {e}");
                        }
                    }
                }
                None => {
                    // Not a held invoice of ours (none is made but for actuator rules), or
                    // already recorded (a replayed event): the latter is settled by
                    // `settle`; fail the former back rather than hold it to its deadline.
                    let known = on_engine(shared, {
                        let h = hash.clone();
                        move |e| e.invoices().map(|l| l.iter().any(|i| i.payment_hash == h))
                    })?
                    .map_err(|e| e.to_string())?;
                    if !known {
                        tracing::warn!("Lightning payment {hash} is claimable but no invoice of ours has its hash: failing it back");
                        if let Some(node) = &shared.lightning {
                            let _ = node.bolt11_payment().fail_for_hash(*payment_hash);
                        }
                    }
                }
                Some(other) => tracing::info!("Lightning payment {hash}: {other:?}"),
            }
            Ok(())
        }
        Event::PaymentReceived { payment_hash, amount_msat, .. } => {
            let (hash, amount) = (hash_hex(&payment_hash.0), *amount_msat);
            let h = hash.clone();
            let r = on_engine(shared, move |e| e.lightning_received(&h, amount))?.map_err(|e| e.to_string())?;
            match r {
                Some(EngineEvent::Due { event_id }) => tracing::info!("Lightning payment {hash} ({amount} msat): {event_id} due"),
                Some(EngineEvent::LightningRefused { reason, .. }) => {
                    crate::actuator::alert(shared, format!("Lightning payment {hash}: {reason}"))
                }
                _ => tracing::info!("Lightning payment {hash} ({amount} msat): no action (not an actuator invoice, or fired already)"),
            }
            Ok(())
        }
        Event::ChannelReady { channel_id, counterparty_node_id, .. } => {
            tracing::info!("Lightning channel {channel_id} with {counterparty_node_id:?} ready");
            if let Some(node) = &shared.lightning {
                apply_fees(node);
            }
            Ok(())
        }
        Event::ChannelClosed { channel_id, reason, .. } => {
            tracing::info!("Lightning channel {channel_id} closed: {reason:?}");
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Settle the held Lightning payments the engine says are ready ([`Engine::claims_to_settle`]):
/// claim those whose action the device acknowledged (`claim_for_hash`, with the preimage
/// kept since the invoice was made), fail back the others (`fail_for_hash`), and record
/// it. Run by the actuator loop, which owns the engine, on every turn: after a restart it
/// settles what was left (an acknowledgement recorded, the claim not yet made).
pub(crate) fn settle(shared: &Shared, engine: &mut Engine) {
    use bitmote_pay::ldk_node::lightning_types::payment::{PaymentHash, PaymentPreimage};
    let Some(node) = &shared.lightning else { return };
    let list = match engine.claims_to_settle() {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("held Lightning payments: {e}");
            return;
        }
    };
    let bytes = |h: &str| -> Option<[u8; 32]> { hex::decode(h).ok()?.try_into().ok() };
    for s in list {
        let Some(hash) = bytes(&s.payment_hash).map(PaymentHash) else { continue };
        let outcome = match (s.claim, bytes(&s.preimage)) {
            (true, Some(pre)) => match node.bolt11_payment().claim_for_hash(hash, s.amount_msat, PaymentPreimage(pre)) {
                Ok(()) => Ok(true),
                Err(e) => {
                    // Not claimable as it is: give the money back rather than keep it held.
                    let _ = node.bolt11_payment().fail_for_hash(hash);
                    Err(format!("could not claim it ({e}): failed back"))
                }
            },
            (true, None) => Err("its preimage is unreadable: failed back".to_string()),
            (false, _) => match node.bolt11_payment().fail_for_hash(hash) {
                Ok(()) => Ok(false),
                Err(e) => Err(format!("{}; the node: {e}", s.why)),
            },
        };
        let (claimed, note) = match outcome {
            Ok(true) => (true, s.why.clone()),
            Ok(false) => (false, s.why.clone()),
            Err(note) => (false, note),
        };
        if claimed {
            tracing::info!("Lightning payment {}: claimed ({} msat): {note}", s.payment_hash, s.amount_msat);
        } else {
            crate::actuator::alert(shared, format!("Lightning payment {} failed back: {note}", s.payment_hash));
        }
        if let Err(e) = engine.mark_settled(&s.payment_hash, claimed, &note) {
            tracing::error!("recording the settlement of {}: {e}", s.payment_hash);
        }
    }
}

/// Run `f` on the actuator's engine (owned by the actuator loop) and wait for it.
fn on_engine<R: Send + 'static>(shared: &Shared, f: impl FnOnce(&mut Engine) -> R + Send + 'static) -> Result<R, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    shared.actuator_jobs.send(Box::new(move |e: &mut Engine| drop(tx.send(f(e))))).map_err(|_| "the actuator loop is gone".to_string())?;
    rx.recv_timeout(Duration::from_secs(30)).map_err(|_| "the actuator loop did not answer".to_string())
}
