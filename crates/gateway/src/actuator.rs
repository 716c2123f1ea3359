//! The actuator loop: block events into the trigger engine, due actions out to the
//! devices over MQTT (`bitmote/<device>/commands`), acknowledgements back
//! (`bitmote/<device>/acks`), redelivery until acknowledged.
//!
//! A command is `{"event_id", "command", "args", "due_ms", "ttl_ms"}`; the device acts at
//! most once per event id (it keeps the ids it executed) and answers
//! `{"event_id", "result": "done" | "expired"}`. Redelivery after a lost message or a
//! reconnect is therefore harmless.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use bitmote_actuator::{Engine, EngineEvent, OutboxState, RuleSet};
use bitmote_chain::{BlockStream, ChainClient, Start, StreamConfig};
use serde_json::json;

use crate::{GatewayError, Shared};
use bitmote_chain::now_ms;

/// Resend an unacknowledged command after this long.
const REDELIVER_MS: u64 = 5_000;


pub fn start(shared: Arc<Shared>, data_dir: &Path, client: ChainClient, rules: RuleSet) -> Result<JoinHandle<()>, GatewayError> {
    let engine = Engine::open(&data_dir.join("actuator.sqlite"), rules, shared.network)
        .map_err(|e| GatewayError::Actuator(e.to_string()))?;
    let (ack_tx, ack_rx) = mpsc::channel();
    *shared.acks.lock().unwrap_or_else(|p| p.into_inner()) = Some(ack_tx);
    std::thread::Builder::new()
        .name("actuator".into())
        .spawn(move || run(shared, engine, client, ack_rx))
        .map_err(|e| GatewayError::Io { context: "spawning the actuator loop".into(), source: e })
}

fn run(shared: Arc<Shared>, mut engine: Engine, client: ChainClient, acks: mpsc::Receiver<(String, serde_json::Value)>) {
    let mut stream: Option<BlockStream<ChainClient>> = None;
    while !shared.stop.load(Ordering::SeqCst) {
        // 1. Chain events.
        if stream.is_none() {
            let stored = match engine.cursor() {
                Ok(c) => c.map(Some),
                Err(e) => {
                    tracing::error!("actuator cursor: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            };
            match client.fresh().and_then(|c| BlockStream::resume(c, stored, Start::Tip, StreamConfig::default())) {
                Ok(s) => stream = Some(s),
                Err(e) => {
                    tracing::warn!("actuator: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            }
        }
        let s = stream.as_mut().expect("just set");
        match s.next_event(Some(Duration::from_millis(100))) {
            Ok(Some(ev)) => match engine.apply(&ev) {
                Ok(events) => {
                    for e in events {
                        if let EngineEvent::Alert { message, .. } = &e {
                            shared.alerts.lock().unwrap_or_else(|p| p.into_inner()).push(message.clone());
                        }
                        tracing::info!("actuator: {e:?}");
                    }
                }
                Err(e) => {
                    tracing::error!("actuator: applying a block: {e}");
                    stream = None; // resume from the engine's cursor
                }
            },
            Ok(None) => {}
            Err(e) => {
                tracing::warn!("actuator: {e}");
                stream = None;
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        // 2. Acknowledgements.
        while let Ok((device, v)) = acks.try_recv() {
            let Some(id) = v["event_id"].as_str() else { continue };
            let belongs = engine.get(id).ok().flatten().is_some_and(|i| i.device == device);
            if !belongs {
                tracing::warn!("ack for {id} from {device}, which it was not sent to; ignored");
                continue;
            }
            let r = match v["result"].as_str() {
                Some("expired") => engine.mark_expired(id, "the device received it after its time-to-live and did not act"),
                _ => engine.mark_acked(id),
            };
            if let Err(e) = r {
                tracing::error!("actuator: recording ack {id}: {e}");
            }
        }
        // 3. Deliveries.
        let out = shared.mqtt_out.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let (Some(out), Ok(pending)) = (out, engine.pending()) {
            let now = now_ms();
            for item in pending {
                let resend = item.state == OutboxState::Due || item.delivered_ms.is_some_and(|d| now > d + REDELIVER_MS);
                if !resend {
                    continue;
                }
                match engine.mark_delivered(&item.event_id) {
                    Ok(true) => {
                        let msg = json!({
                            "event_id": item.event_id, "command": item.command, "args": item.args,
                            "due_ms": item.due_ms, "ttl_ms": item.ttl_ms,
                        });
                        let _ = out.send((crate::mqtt::commands_topic(&item.device), msg.to_string().into_bytes()));
                    }
                    Ok(false) => tracing::warn!("{} expired before it could be delivered", item.event_id),
                    Err(e) => tracing::error!("actuator: {e}"),
                }
            }
        }
        if let Ok(log) = engine.log() {
            *shared.actions.lock().unwrap_or_else(|p| p.into_inner()) = log;
        }
    }
}
