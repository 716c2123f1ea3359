//! Plumbing both machines share: the HTTP server thread, the Lightning event loop,
//! and the JSON shapes of the status endpoints.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use ldk_node::payment::{PaymentDirection, PaymentKind, PaymentStatus};
use ldk_node::{Event, Node};

use crate::store::Session;
use crate::PayError;

/// Serve `router` on `listener` from a thread of its own until `stop` is set.
pub(crate) fn serve(listener: TcpListener, router: Router, stop: &Arc<AtomicBool>) {
    let stop = stop.clone();
    std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
            rt.block_on(async move {
                let l = tokio::net::TcpListener::from_std(listener).expect("listener");
                let _ = axum::serve(l, router)
                    .with_graceful_shutdown(async move {
                        while !stop.load(Ordering::Relaxed) {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    })
                    .await;
            });
        })
        .expect("thread");
}

/// Handle the node's events until `stop`: each event is acknowledged to ldk-node only
/// after `handle` returned Ok (so it is persisted first); an error leaves it queued
/// and it is handled again.
pub(crate) fn event_loop(node: &Node, stop: &AtomicBool, mut handle: impl FnMut(&Event) -> Result<(), PayError>) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    while !stop.load(Ordering::Relaxed) {
        let Ok(ev) = rt.block_on(async { tokio::time::timeout(Duration::from_millis(200), node.next_event_async()).await }) else {
            continue;
        };
        tracing::debug!("event {ev:?}");
        match handle(&ev) {
            Ok(()) => {
                if let Err(e) = node.event_handled() {
                    tracing::error!("acknowledging event: {e}");
                }
            }
            Err(e) => {
                tracing::error!("handling {ev:?}: {e}; will retry");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

/// The node's identity, channels and balances.
pub fn node_json(node: &Node) -> serde_json::Value {
    let b = node.list_balances();
    let channels: Vec<_> = node
        .list_channels()
        .iter()
        .map(|c| {
            serde_json::json!({
                "peer": c.counterparty_node_id.to_string(),
                "channel_id": c.channel_id.to_string(),
                "capacity_sat": c.channel_value_sats,
                "outbound_msat": c.outbound_capacity_msat,
                "inbound_msat": c.inbound_capacity_msat,
                "usable": c.is_usable,
            })
        })
        .collect();
    serde_json::json!({
        "node_id": node.node_id().to_string(),
        "listening": node.listening_addresses().unwrap_or_default().iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        // Where peers must connect: the announced addresses (ldk-node falls back to the
        // listening ones), which differ behind a port forward or a proxy.
        "announced": node.announcement_addresses().unwrap_or_default().iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "onchain_sat": b.total_onchain_balance_sats,
        "lightning_sat": b.total_lightning_balance_sats,
        "channels": channels,
        // What this node paid hubs for routing its Lightning payments, over its whole life
        // (not the mining fees of its on-chain payments, which ldk-node lists too).
        "routing_fees_paid_msat": node
            .list_payments_with_filter(|p| {
                p.direction == PaymentDirection::Outbound && p.status == PaymentStatus::Succeeded && !matches!(p.kind, PaymentKind::Onchain { .. })
            })
            .iter()
            .map(|p| p.fee_paid_msat.unwrap_or(0))
            .sum::<u64>(),
    })
}

/// A session with derived figures (energy in Wh, money due).
pub fn session_json(s: &Session) -> serde_json::Value {
    let mut v = serde_json::to_value(s).expect("serializes");
    v["energy_wh"] = serde_json::json!(s.account.register_mwh as f64 / 1000.0);
    v["due_msat"] = serde_json::json!(s.account.due_msat(&s.tariff));
    v["credit_msat"] = serde_json::json!(s.account.credit_msat(&s.tariff) as i64);
    v
}
