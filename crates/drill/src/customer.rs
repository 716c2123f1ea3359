//! I4, exercised: a customer with its own Lightning node (ldk-node, in the drill's process)
//! and a channel to the gateway's node buys a Lightning-paid action on `lock-1` now and then
//! (a rule the drill adds over the admin API), while the faults go on. The gateway holds each
//! payment until the lock acknowledges the action, and fails it back when the lock refuses,
//! the action expires, or the claim deadline comes first.
//!
//! Checked from outside, per order: the customer's payment succeeded only if the lock
//! executed the order's action (its `state.json`), and a payment whose action did not run and
//! never will (expired, refused, cancelled) is failed back — the gateway keeps no money for
//! an action not done. `GET /v1/actions` says the same (`lightning.claim`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bitmote_pay::ldk_node::lightning::ln::channelmanager::PaymentId;
use bitmote_pay::ldk_node::lightning_invoice::Bolt11Invoice;
use bitmote_pay::ldk_node::payment::PaymentStatus;
use bitmote_pay::ldk_node::Node;
use bitmote_pay::node::{self, NodeConfig};

use crate::checks::Tally;
use crate::system::System;
use crate::DrillError;

/// The rule the drill adds: 21 sat for an `unlock` of `lock-1`.
pub const RULE: &str = "drill-coffee";
const DEVICE: &str = "lock-1";
const AMOUNT_MSAT: u64 = 21_000;

/// One order: its action's event id and the customer's payment.
#[derive(Debug)]
struct Order {
    event_id: String,
    payment: PaymentId,
    round: u32,
    /// Checked and found settled consistently: not looked at again.
    done: bool,
}

pub struct Customer {
    node: Arc<Node>,
    gateway: bitmote_chain::bitcoin::secp256k1::PublicKey,
    orders: Vec<Order>,
    /// Orders the gateway refused (the lock offline, the gateway restarting), by reason.
    pub not_placed: u32,
    /// Channels to the gateway opened again after the last one was closed.
    pub reopened: u32,
}

impl Customer {
    /// Start the customer's node, fund it, open a channel to the gateway's node and add the
    /// rule. Mines (the drill is the only miner, and this runs before the first round).
    pub fn start(sys: &System) -> Result<Customer, DrillError> {
        let chain = sys.chain()?;
        let ln: serde_json::Value = sys.get_json("/v1/lightning")?;
        let id = ln["node_id"].as_str().ok_or_else(|| DrillError::Setup(format!("the gateway has no Lightning node: {ln}")))?;
        let gateway = node::parse_node_id(id).map_err(|e| DrillError::Setup(e.to_string()))?;
        let listen = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| DrillError::io("picking the customer's Lightning port", e))?;
        let err = |e: bitmote_pay::PayError| DrillError::Setup(format!("the customer's Lightning node: {e}"));
        let node = node::start(&NodeConfig {
            dir: sys.dir.join("customer").join("ldk"),
            listen,
            rpc: chain.config().clone(),
            alias: "drill-customer".into(),
            announce: false,
            announce_as: None,
        })
        .map_err(err)?;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], sys.ports.gateway_ln));
        node::open_funded_channel(Some(&faucet(&chain)?), &node, gateway, addr.into(), 200_000, false).map_err(err)?;
        let rule = serde_json::json!({
            "id": RULE,
            "device": DEVICE,
            "trigger": { "kind": "lightning", "amount_msat": AMOUNT_MSAT },
            "action": { "command": "unlock" },
            "ttl_secs": 600,
        });
        sys.post("/v1/rules", "application/json", rule.to_string().as_bytes())?;
        Ok(Customer { node, gateway, orders: vec![], not_placed: 0, reopened: 0 })
    }

    /// Buy one action: order it (the gateway makes the invoice), pay the invoice. The
    /// payment is then on its way; [`Customer::check`] looks at how it ended.
    pub fn buy(&mut self, sys: &System, round: u32) -> String {
        let mut note = String::new();
        if !self.usable() {
            match self.restore(sys) {
                Ok(how) => note = format!("customer {how}; "),
                Err(why) => {
                    self.not_placed += 1;
                    return format!("customer: no usable channel to the gateway now ({why})");
                }
            }
        }
        let order =
            match sys.post(&format!("/v1/devices/{DEVICE}/orders"), "application/json", format!("{{\"rule\":\"{RULE}\"}}").as_bytes()) {
                Ok(o) => o,
                Err(e) => {
                    self.not_placed += 1;
                    return format!("customer: order refused ({e})");
                }
            };
        let (Some(event_id), Some(invoice)) = (order["order_id"].as_str(), order["invoice"].as_str()) else {
            self.not_placed += 1;
            return format!("customer: an order without an invoice: {order}");
        };
        let invoice: Bolt11Invoice = match invoice.parse() {
            Ok(i) => i,
            Err(e) => {
                self.not_placed += 1;
                return format!("customer: the invoice does not parse: {e}");
            }
        };
        match self.node.bolt11_payment().send(&invoice, None) {
            Ok(payment) => {
                self.orders.push(Order { event_id: event_id.to_string(), payment, round, done: false });
                let short: String = event_id.rsplit(':').next().unwrap_or(event_id).chars().take(8).collect();
                format!("{note}customer paid order {short}…")
            }
            Err(e) => {
                self.not_placed += 1;
                format!("customer: the payment could not start ({e})")
            }
        }
    }

    fn usable(&self) -> bool {
        self.node.list_channels().iter().any(|c| c.counterparty_node_id == self.gateway && c.is_usable)
    }

    /// Make the channel to the gateway usable again, as a customer would: reconnect at once
    /// when the gateway came back (ldk-node retries only every minute or so), and open a new
    /// channel when the old one is gone (force-closed after a `kill -9` of `up`, which LDK 0.2
    /// may do: rust-lightning#4286). What was done, or why not.
    fn restore(&mut self, sys: &System) -> Result<&'static str, String> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], sys.ports.gateway_ln));
        let open = self.node.list_channels().into_iter().any(|c| c.counterparty_node_id == self.gateway);
        if open {
            self.node.connect(self.gateway, addr.into(), true).map_err(|e| format!("reconnecting: {e}"))?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if self.usable() {
                    return Ok("reconnected");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            return Err("reconnected, but the channel is not usable within 10 s".into());
        }
        let chain = sys.chain().map_err(|e| e.to_string())?;
        node::open_funded_channel(Some(&faucet(&chain).map_err(|e| e.to_string())?), &self.node, self.gateway, addr.into(), 200_000, false)
            .map_err(|e| format!("reopening: {e}"))?;
        self.reopened += 1;
        Ok("opened a new channel")
    }

    /// I4 over every order not settled yet. A payment still pending, or an action still on
    /// its way, is left for a later check, unless `last_call`.
    pub fn check(&mut self, sys: &System, last_call: bool, t: &mut Tally) -> Result<(), DrillError> {
        let actions = crate::checks::actions(sys)?;
        let executed = crate::checks::executed(sys, DEVICE);
        for o in self.orders.iter_mut().filter(|o| !o.done) {
            let status = self.node.payment(&o.payment).map(|p| p.status);
            let action = actions.iter().find(|a| a.event_id == o.event_id);
            let ran = executed.iter().filter(|e| **e == o.event_id).count();
            let state = action.map(|a| a.state.as_str()).unwrap_or("none");
            let terminal = matches!(state, "acked" | "expired" | "refused" | "cancelled" | "none");
            let claim = action.and_then(|a| a.lightning.as_ref()).and_then(|l| l.claim.as_deref()).unwrap_or("");
            let what = || {
                format!(
                    "order {} (round {}): payment {status:?}, action {state}, claim {claim:?}, executed {ran} time(s)",
                    o.event_id, o.round
                )
            };
            match status {
                Some(PaymentStatus::Succeeded) => {
                    // Money taken: the lock must have run the action, once.
                    t.check("I4 lightning", ran == 1 && state == "acked", || format!("money kept for an action not done: {}", what()));
                    o.done = true;
                }
                Some(PaymentStatus::Failed) => {
                    // Failed back (or never arrived): the action may still have run (the
                    // gateway's loss, not the customer's), never twice.
                    t.check("I4 lightning", ran <= 1, || format!("an action ran more than once: {}", what()));
                    o.done = true;
                }
                _ if terminal && ran == 0 && state != "acked" && last_call => {
                    t.fail("I4 lightning", format!("the action will not run, but the payment is not failed back: {}", what()));
                    o.done = true;
                }
                _ if last_call => {
                    t.fail("I4 lightning", format!("not settled at the end: {}", what()));
                    o.done = true;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Orders placed, and how many are settled.
    pub fn counts(&self) -> (usize, usize) {
        (self.orders.len(), self.orders.iter().filter(|o| o.done).count())
    }

    /// Give the held payments left up to `limit` to settle (the gateway claims or fails
    /// them back on its actuator loop; the customer's node learns it from its peer).
    pub fn wait_settled(&self, limit: Duration) {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            let pending = self.orders.iter().filter(|o| !o.done).any(|o| {
                !matches!(self.node.payment(&o.payment).map(|p| p.status), Some(PaymentStatus::Succeeded | PaymentStatus::Failed))
            });
            if !pending {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Customer {
    fn drop(&mut self) {
        let _ = self.node.stop();
    }
}

/// The drill's regtest faucet (the customer's channel is funded by mining).
fn faucet(chain: &bitmote_chain::ChainClient) -> Result<bitmote_regtest::RegtestFaucet, DrillError> {
    bitmote_regtest::RegtestFaucet::new(chain).map_err(|e| DrillError::Setup(format!("the regtest faucet: {e}")))
}
