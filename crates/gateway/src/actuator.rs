//! The actuator loop: block events into the trigger engine, due actions out — to the
//! devices over MQTT (`bitmote/<device>/commands`, acknowledged on `bitmote/<device>/acks`),
//! or by a signed webhook or a local program ([`crate::deliver`]) — and retries with
//! exponential backoff until acknowledged or past their time-to-live (then expired, with
//! an alert). The loop also runs the API's jobs on the engine (rules added or removed
//! apply from the next block, without a restart).
//!
//! An MQTT command is the action JSON ([`OutboxItem::payload`]); the device acts at most
//! once per event id (it keeps the ids it executed) and answers
//! `{"event_id", "result": "done" | "expired" | "refused", "reason"?}` ("refused": a device
//! that checks payments itself found the claimed one wrong; never retried). Redelivery after a lost message or a
//! reconnect is therefore harmless; webhook receivers and programs get the same event id
//! on every attempt for the same reason.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use bitmote_actuator::{Delivery, Engine, EngineEvent, OutboxItem, RuleSet};
use bitmote_chain::{BlockStream, ChainClient, Start, StreamConfig};
use bitmote_proto::AckResult;

use crate::{deliver, GatewayError, Job, Shared};
use bitmote_chain::now_ms;

/// Block events applied before the loop turns to acknowledgements and deliveries (more
/// than any reorg the stream follows: a reorg is applied whole).
const MAX_EVENTS_PER_BATCH: usize = 1000;

/// Webhook and program attempts running at once, at most.
const MAX_IN_FLIGHT: usize = 16;

/// When unacknowledged actions are tried again: `first` after the first attempt, then
/// twice as long after each further one, at most `max`.
#[derive(Clone, Copy, Debug)]
pub struct Retry {
    pub first: Duration,
    pub max: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry { first: Duration::from_secs(5), max: Duration::from_secs(300) }
    }
}

impl Retry {
    /// Whether `item` is to be (re)tried at `now`.
    fn due(&self, item: &OutboxItem, now: u64) -> bool {
        let Some(last) = item.delivered_ms else {
            return true;
        };
        let wait = self.first.saturating_mul(1 << item.attempts.saturating_sub(1).min(20)).min(self.max);
        now >= last + wait.as_millis() as u64
    }
}

pub(crate) fn alert(shared: &Shared, message: String) {
    tracing::warn!("{message}");
    shared.alerts.lock().unwrap_or_else(|p| p.into_inner()).push(message);
}

pub fn start(
    shared: Arc<Shared>,
    data_dir: &Path,
    client: ChainClient,
    rules: RuleSet,
    retry: Retry,
    jobs: mpsc::Receiver<Job<Engine>>,
) -> Result<JoinHandle<()>, GatewayError> {
    let engine = Engine::open(&data_dir.join("actuator.sqlite"), rules, shared.network, shared.signer.name())
        .map_err(|e| GatewayError::Actuator(e.to_string()))?;
    let (ack_tx, ack_rx) = mpsc::channel();
    *shared.acks.lock().unwrap_or_else(|p| p.into_inner()) = Some(ack_tx);
    // Headers of the last blocks delivered, kept with the engine's cursor: a node that comes
    // back without its last blocks (a crash before it flushed them) is a reorg the engine
    // is walked back through, reverting what those blocks carried.
    let history = data_dir.join("actuator.history.json");
    std::thread::Builder::new()
        .name("actuator".into())
        .spawn(move || run(shared, engine, client, ack_rx, retry, jobs, history))
        .map_err(|e| GatewayError::Io { context: "spawning the actuator loop".into(), source: e })
}

fn run(
    shared: Arc<Shared>,
    mut engine: Engine,
    client: ChainClient,
    acks: mpsc::Receiver<(String, bitmote_proto::Ack)>,
    retry: Retry,
    jobs: mpsc::Receiver<Job<Engine>>,
    history: std::path::PathBuf,
) {
    let mut stream: Option<BlockStream<ChainClient>> = None;
    // Pause before reopening the stream after a failure: doubles from 250 ms up to 10 s.
    // Meanwhile the loop goes on with the API's jobs, acknowledgements and retries.
    let mut backoff = Duration::from_millis(250);
    let mut reopen_at: Option<std::time::Instant> = None;
    // Outcomes of webhook and program attempts, from their threads.
    let (done_tx, done_rx) = mpsc::channel::<(String, Result<(), String>)>();
    let mut in_flight = HashSet::new();
    while !shared.stop.load(Ordering::SeqCst) {
        // 1. Chain events.
        if stream.is_none() && reopen_at.is_none_or(|t| std::time::Instant::now() >= t) {
            let stored = match engine.cursor() {
                Ok(c) => c.map(Some),
                Err(e) => {
                    tracing::error!("actuator cursor: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            };
            let cfg = StreamConfig::with_history(&history);
            match client.fresh().and_then(|c| BlockStream::resume(c, stored, Start::Tip, cfg)) {
                Ok(s) => stream = Some(s),
                Err(e) => {
                    if e.is_transient() {
                        crate::node_seen(&shared, Err(&e));
                    } else {
                        tracing::warn!("actuator: {e}");
                    }
                    reopen_at = Some(std::time::Instant::now() + backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
        // All the events there are, before any delivery: a reorg is applied whole, so a
        // trigger it disconnects and mines again in the new branch (still final) costs the
        // device nothing — its revert is cancelled before it could be sent.
        let mut wait = Some(Duration::from_millis(100));
        for _ in 0..MAX_EVENTS_PER_BATCH {
            let Some(s) = stream.as_mut() else {
                std::thread::sleep(Duration::from_millis(100));
                break;
            };
            match s.next_event(wait) {
                Ok(Some(ev)) => {
                    backoff = Duration::from_millis(250);
                    match engine.apply(&ev) {
                        Ok(events) => {
                            for e in events {
                                tracing::info!("actuator: {e:?}");
                                if let EngineEvent::Alert { message, .. } | EngineEvent::Restored { message, .. } = e {
                                    alert(&shared, message);
                                }
                            }
                        }
                        Err(e) => {
                            tracing::error!("actuator: applying a block: {e}");
                            stream = None; // resume from the engine's cursor
                            break;
                        }
                    }
                }
                Ok(None) => {
                    backoff = Duration::from_millis(250);
                    break;
                }
                Err(e) => {
                    // Node down or restarting (or a cursor it cannot place): never fatal; the
                    // stream is reopened from the engine's cursor with growing pauses.
                    if e.is_transient() {
                        crate::node_seen(&shared, Err(&e));
                    } else {
                        tracing::warn!("actuator: {e}");
                    }
                    stream = None;
                    reopen_at = Some(std::time::Instant::now() + backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    break;
                }
            }
            wait = Some(Duration::ZERO);
        }
        // 2. The API's jobs (rules added and removed).
        while let Ok(job) = jobs.try_recv() {
            job(&mut engine);
        }
        // 3. Acknowledgements: MQTT acks, and the outcomes of webhook and program attempts.
        while let Ok((device, ack)) = acks.try_recv() {
            let id = ack.event_id.as_str();
            let belongs = engine.get(id).ok().flatten().is_some_and(|i| i.device == device && i.delivery == Delivery::Mqtt);
            if !belongs {
                tracing::warn!("ack for {id} from {device}, which it was not sent to; ignored");
                continue;
            }
            let r = match ack.result {
                AckResult::Expired => {
                    alert(&shared, format!("{id}: {device} received it after its time-to-live and did not act"));
                    engine.mark_expired(id, "the device received it after its time-to-live and did not act")
                }
                AckResult::Refused => {
                    let note = format!("the device refused it: {}", ack.reason.as_deref().unwrap_or("no reason given"));
                    alert(&shared, format!("{id}: {device}: {note}"));
                    engine.mark_refused(id, &note)
                }
                AckResult::Done => engine.mark_acked(id),
            };
            if let Err(e) = r {
                tracing::error!("actuator: recording ack {id}: {e}");
            }
        }
        while let Ok((id, outcome)) = done_rx.try_recv() {
            in_flight.remove(&id);
            let r = match outcome {
                Ok(()) => engine.mark_acked(&id).map(drop),
                Err(why) => {
                    tracing::warn!("{id}: delivery failed: {why}; will retry");
                    engine.mark_failed(&id, &format!("last attempt failed: {why}"))
                }
            };
            if let Err(e) = r {
                tracing::error!("actuator: recording the outcome of {id}: {e}");
            }
        }
        // Held Lightning payments: claimed once acknowledged, failed back otherwise.
        crate::lightning::settle(&shared, &mut engine);
        // 4. Deliveries.
        let out = shared.mqtt_out.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let now = now_ms();
        for item in engine.pending().unwrap_or_default() {
            let mqtt = item.delivery == Delivery::Mqtt;
            if in_flight.contains(&item.event_id)
                || !retry.due(&item, now)
                || (mqtt && out.is_none())
                || (!mqtt && in_flight.len() >= MAX_IN_FLIGHT)
            {
                continue;
            }
            match engine.mark_delivered(&item.event_id) {
                Ok(true) => {}
                Ok(false) => {
                    alert(&shared, format!("{} expired before it could be delivered; not executed", item.event_id));
                    continue;
                }
                Err(e) => {
                    tracing::error!("actuator: {e}");
                    continue;
                }
            }
            let (id, payload) = (item.event_id.clone(), item.payload());
            let attempt: Box<dyn FnOnce() -> Result<(), String> + Send> = match item.delivery {
                Delivery::Mqtt => {
                    if let Some(out) = &out {
                        let _ = out.send((crate::mqtt::commands_topic(&item.device), bitmote_proto::encode(&payload)));
                    }
                    continue;
                }
                Delivery::Webhook(w) => Box::new(move || deliver::webhook(&w, &id, &payload)),
                Delivery::Exec(e) => Box::new(move || deliver::exec(&e, &id, &payload)),
            };
            let (done, id) = (done_tx.clone(), item.event_id.clone());
            match std::thread::Builder::new().name("deliver".into()).spawn(move || done.send((id, attempt()))) {
                Ok(_) => drop(in_flight.insert(item.event_id)),
                Err(e) => tracing::error!("actuator: cannot start a delivery: {e}"),
            }
        }
        if let Ok(log) = engine.log() {
            *shared.actions.lock().unwrap_or_else(|p| p.into_inner()) = log;
        }
    }
}
