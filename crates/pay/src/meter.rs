//! The buyer's secure energy meter: measures the energy the provider delivers and
//! pays for it tick by tick by keysend, never more than the register makes due
//! (prepaid: plus one tick ahead), and stops paying the moment energy stops.
//!
//! Crash safety: each tick is written to the store (with the signed register and the
//! payment hash) before it is sent, and its preimage is derived from a secret of the
//! meter and (session, tick); after a restart the pending tick is sent again with the
//! same preimage, which ldk-node and the provider both recognise, so a tick is never
//! paid twice.
//!
//! Closing ([`Meter::close`]) is one agreed state, whenever and however streaming
//! stopped (a tick limit, Ctrl-C, a restart after `kill -9`): the tick in flight is
//! settled first from ldk-node's payment store (succeeded: counted; failed or never
//! sent: dropped, no money moved; still pending: the session stays open and the next
//! run closes it); a prepaid meter then delivers its tick paid ahead with closing
//! ticks that pay no tick ahead, ending with exactly the register's price paid (no
//! refund is ever needed); last, the provider gets the final account, signed, and
//! answers with its signed statement of the same account. HTTP: `GET /v1/status`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State as AxState;
use axum::routing::get;
use axum::{Json, Router};
use bitmote_chain::now_ms;
use bitmote_device::sign::SigningKey;
use ldk_node::lightning::ln::channelmanager::PaymentId;
use ldk_node::lightning_types::payment::PaymentPreimage;
use ldk_node::payment::PaymentStatus;
use ldk_node::{CustomTlvRecord, Event, Node, NodeError};
use serde::Serialize;

use crate::load::SimMeter;
use crate::node::parse_node_id;
use crate::provider::{CloseRequest, OpenRequest, Statement};
use crate::store::{Session, State, Store, TickRow};
use crate::tariff::{BuyerPolicy, Mode, SignedTariff};
use crate::tick::{Account, SessionId, Tick, TLV_TICK};
use crate::PayError;

/// How a session ended, and whether both accounts agree.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub session: Session,
    /// The provider's signed statement (None if the provider could not be reached).
    pub provider: Option<Statement>,
    /// Both accounts equal, to the millisatoshi, and the statement's signature valid.
    pub reconciled: bool,
    /// What is not settled yet, in words (a tick still in flight: the session stays
    /// open; prepaid energy not delivered in time), or None.
    pub unsettled: Option<String>,
}

/// How long a closing prepaid meter may take to deliver its tick paid ahead.
pub const DELIVERY_LIMIT: Duration = Duration::from_secs(30);

/// The running meter.
pub struct Meter {
    pub node: Arc<Node>,
    store: Mutex<Store>,
    key: SigningKey,
    secret: [u8; 32],
    provider_url: String,
    /// Stop streaming (Ctrl-C): the session can still be closed.
    stop: Arc<AtomicBool>,
    /// Stop the machine's threads (event loop, HTTP, notary posts).
    halt: Arc<AtomicBool>,
    waiters: Mutex<HashMap<[u8; 32], mpsc::Sender<bool>>>,
    sim: Mutex<Option<SimMeter>>,
    /// Where the tick readings go as notary receipts, and the last error doing so.
    notary: Mutex<Option<NotaryLink>>,
    pub http_addr: SocketAddr,
    /// What this meter is willing to pay, whatever the provider signs.
    policy: Mutex<BuyerPolicy>,
}

#[derive(Clone, Debug)]
struct NotaryLink {
    url: String,
    last_error: Option<String>,
}

fn http_get<T: serde::de::DeserializeOwned>(url: &str) -> Result<T, PayError> {
    let err = |why: String| PayError::Provider { url: url.to_string(), why };
    ureq::get(url).timeout(Duration::from_secs(5)).call().map_err(|e| err(e.to_string()))?.into_json().map_err(|e| err(e.to_string()))
}

fn http_post<T: serde::de::DeserializeOwned>(url: &str, body: &impl Serialize) -> Result<T, PayError> {
    let err = |why: String| PayError::Provider { url: url.to_string(), why };
    let resp = ureq::post(url).timeout(Duration::from_secs(30)).send_json(body).map_err(|e| match e {
        ureq::Error::Status(code, r) => err(format!("{code}: {}", r.into_string().unwrap_or_default())),
        e => err(e.to_string()),
    })?;
    resp.into_json().map_err(|e| err(e.to_string()))
}

/// The meter's secret in `<data>/meter.key` (0600), made on first use: its device key (BIP340)
/// and the seed of its tick preimages. Also used by `bitmote up` to enrol the meter's key
/// with the notary before the meter first starts.
pub fn load_or_create_secret(data: &Path) -> Result<[u8; 32], PayError> {
    let key_path = data.join("meter.key");
    // A key that exists but cannot be read is never replaced: a new key would make every
    // later tick fail the provider's signature check, and lose the preimages of the old.
    let never = "fix or remove it (it is never overwritten)";
    match std::fs::read(&key_path) {
        Ok(b) => b.try_into().map_err(|_| PayError::Config(format!("{} is not 32 bytes; {never}", key_path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let k = SigningKey::generate_schnorr().map_err(|e| PayError::Config(format!("{e:?}")))?;
            bitmote_chain::wallet::create_secret(&key_path, &k.secret_bytes()).map_err(|e| PayError::Config(e.to_string()))?;
            Ok(k.secret_bytes())
        }
        Err(e) => Err(PayError::Config(format!("{} cannot be read ({e}); {never}", key_path.display()))),
    }
}

/// The meter's device key, from [`load_or_create_secret`].
pub fn device_key(secret: &[u8; 32]) -> Result<SigningKey, PayError> {
    SigningKey::schnorr_from_secret(secret).map_err(|e| PayError::Config(format!("meter key: {e:?}")))
}

impl Meter {
    /// Start on a running node. The device key and the preimage secret live in
    /// `<data>/meter.key` (0600), created on first start.
    pub fn start(node: Arc<Node>, data: &Path, provider_url: &str, http: SocketAddr) -> Result<Arc<Self>, PayError> {
        let secret = load_or_create_secret(data)?;
        let key = device_key(&secret)?;
        let listener = std::net::TcpListener::bind(http).map_err(|e| PayError::Config(format!("HTTP {http}: {e}")))?;
        let m = Arc::new(Meter {
            node,
            store: Mutex::new(Store::open(&data.join("meter.db"))?),
            secret: bitmote_device::tagged_hash(b"bitmote/meter/preimage", &[&secret]),
            key,
            provider_url: provider_url.trim_end_matches('/').to_string(),
            stop: Arc::new(AtomicBool::new(false)),
            halt: Arc::new(AtomicBool::new(false)),
            waiters: Mutex::new(HashMap::new()),
            sim: Mutex::new(None),
            notary: Mutex::new(None),
            http_addr: listener.local_addr().map_err(|e| PayError::Config(e.to_string()))?,
            policy: Mutex::new(BuyerPolicy::default()),
        });
        let ev = m.clone();
        std::thread::Builder::new().name("meter-events".into()).spawn(move || ev.event_loop()).expect("thread");
        listener.set_nonblocking(true).map_err(|e| PayError::Config(e.to_string()))?;
        let router =
            Router::new().route("/v1/status", get(|AxState(m): AxState<Arc<Meter>>| async move { Json(m.status()) })).with_state(m.clone());
        crate::machine::serve(listener, router, &m.halt);
        Ok(m)
    }

    /// The meter's device key (its signed registers are notary readings).
    pub fn device_key(&self) -> &SigningKey {
        &self.key
    }

    /// Post every paid tick's signed register reading to a bitmote gateway
    /// (`POST {url}/v1/readings`), in the meter's reading order, and keep the receipts,
    /// so a bill can be proven later against the chain. Runs on its own thread until
    /// shutdown; the gateway being down or refusing (e.g. the meter's key is not
    /// enrolled yet) never holds up a tick: readings wait in the store and go later.
    pub fn post_receipts(self: &Arc<Self>, url: &str) {
        *self.notary.lock().unwrap() = Some(NotaryLink { url: url.trim_end_matches('/').to_string(), last_error: None });
        let m = self.clone();
        std::thread::Builder::new().name("meter-notary".into()).spawn(move || m.notary_loop()).expect("thread");
    }

    fn notary_loop(&self) {
        let Some(url) = self.notary.lock().unwrap().as_ref().map(|n| format!("{}/v1/readings", n.url)) else { return };
        while !self.halt.load(Ordering::Relaxed) {
            let wait = match self.post_some(&url) {
                Ok(0) => Duration::from_millis(500),
                Ok(_) => Duration::ZERO,
                Err(e) => {
                    tracing::warn!("notary receipts: {e}");
                    let refused = e.starts_with("4");
                    if let Some(n) = self.notary.lock().unwrap().as_mut() {
                        n.last_error = Some(e);
                    }
                    // A refusal (not enrolled, ...) needs an operator: ask again less often.
                    Duration::from_secs(if refused { 5 } else { 2 })
                }
            };
            std::thread::sleep(wait);
        }
    }

    /// Post the readings waiting in the store, lowest sequence number first (the
    /// notary refuses a device's sequence numbers out of order). Returns how many.
    fn post_some(&self, url: &str) -> Result<usize, String> {
        let rows = self.store.lock().unwrap().unnotarized(256).map_err(|e| e.to_string())?;
        let mut rows: Vec<_> = rows
            .into_iter()
            .filter_map(|(session, tick, hex)| {
                let bytes = bitmote_device::hex_decode(&hex)?;
                let seq = bitmote_device::batch::SignedReading::decode(&bytes).ok()?.reading.seq;
                Some((seq, session, tick, bytes))
            })
            .collect();
        rows.sort_by_key(|r| r.0);
        for (n, (_, session, tick, bytes)) in rows.iter().enumerate() {
            let resp = ureq::post(url)
                .timeout(Duration::from_secs(10))
                .set("Content-Type", "application/octet-stream")
                .send_bytes(bytes)
                .map_err(|e| match e {
                ureq::Error::Status(code, r) => format!("{code} from {url}: {}", r.into_string().unwrap_or_default()),
                e => format!("{url}: {e}"),
            })?;
            let v: serde_json::Value = resp.into_json().map_err(|e| format!("{url}: {e}"))?;
            let receipt = v["receipts"].get(0).ok_or_else(|| format!("{url}: no receipt in {v}"))?;
            self.store.lock().unwrap().set_receipt(session, *tick, &receipt.to_string()).map_err(|e| e.to_string())?;
            if n == 0 {
                if let Some(l) = self.notary.lock().unwrap().as_mut() {
                    l.last_error = None;
                }
            }
        }
        Ok(rows.len())
    }

    /// Wait until every paid tick's reading has its notary receipt (true), at most
    /// `timeout` (false). True at once when no notary is configured.
    pub fn flush_receipts(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if self.notary.lock().unwrap().is_none() {
                return true;
            }
            let waiting = self.store.lock().unwrap().receipt_counts().map_or(1, |c| c.1);
            if waiting == 0 {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Replace the buyer's spending policy (default: [`BuyerPolicy::default`]).
    pub fn set_policy(&self, p: BuyerPolicy) {
        *self.policy.lock().unwrap() = p;
    }

    pub fn policy(&self) -> BuyerPolicy {
        self.policy.lock().unwrap().clone()
    }

    /// Stop streaming ([`Meter::run`] returns at its next tick); everything else keeps
    /// running so the session can still be closed ([`Meter::close`]) and its receipts
    /// posted ([`Meter::flush_receipts`]). What a Ctrl-C does.
    pub fn stop_streaming(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Stop streaming and the machine's threads.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.halt.store(true, Ordering::Relaxed);
    }

    fn event_loop(self: Arc<Self>) {
        crate::machine::event_loop(&self.node, &self.halt, |ev| {
            let (hash, ok) = match ev {
                Event::PaymentSuccessful { payment_hash, .. } => (payment_hash.0, true),
                Event::PaymentFailed { payment_hash: Some(h), reason, .. } => {
                    tracing::warn!("payment {} failed: {reason:?}", bitmote_device::hex_encode(&h.0));
                    (h.0, false)
                }
                _ => return Ok(()),
            };
            if let Some(tx) = self.waiters.lock().unwrap().remove(&hash) {
                let _ = tx.send(ok);
            }
            Ok(())
        });
    }

    /// Fetch and check the provider's tariff, and open a session under it.
    pub fn open_session(&self, provider_node: &str) -> Result<Session, PayError> {
        let st: SignedTariff = http_get(&format!("{}/v1/tariff", self.provider_url))?;
        let pk = parse_node_id(provider_node)?;
        st.check(provider_node, bitmote_chain::now_secs(), |m, sig| self.node.verify_signature(m, sig, &pk))?;
        // Refused before anything is paid.
        self.policy().admit(&st.tariff)?;
        let (tariff_id, meter_key, meter_node) =
            (st.id(), bitmote_device::hex_encode(&self.key.public_key().encode()), self.node.node_id().to_string());
        let timestamp_ms = now_ms();
        let signature =
            bitmote_device::hex_encode(&self.key.sign(&crate::open_message(&tariff_id, &meter_key, &meter_node, timestamp_ms)).encode());
        let req = OpenRequest { tariff_id, meter_key, meter_node, timestamp_ms, signature };
        let s: Session = http_post(&format!("{}/v1/sessions", self.provider_url), &req)?;
        if s.tariff != st.tariff || s.meter_key != req.meter_key {
            return Err(PayError::Session("the provider opened the session under other terms".into()));
        }
        self.store.lock().unwrap().put_session(&s)?;
        tracing::info!(session = bitmote_device::hex_encode(&s.id), "session opened");
        Ok(s)
    }

    /// The most recent open session in the store (to resume after a restart).
    pub fn open_sessions(&self) -> Result<Vec<Session>, PayError> {
        self.store.lock().unwrap().open_sessions()
    }

    fn preimage(&self, id: &SessionId, tick: u64) -> [u8; 32] {
        bitmote_device::tagged_hash(b"bitmote/meter/tick", &[&self.secret, id, &tick.to_be_bytes()])
    }

    /// The provider's view of the session: for the simulation, also "the line"
    /// (whether energy flows). None if the provider cannot be reached.
    fn line(&self, id: &SessionId) -> Option<Session> {
        http_get(&format!("{}/v1/sessions/{}", self.provider_url, bitmote_device::hex_encode(id))).ok()
    }

    /// Stream payments for session `id` until `max_ticks` ticks are paid, the
    /// provider ends the session or cuts the supply, or [`Meter::stop_streaming`].
    pub fn run(&self, id: &SessionId, max_ticks: Option<u64>) -> Result<Session, PayError> {
        let mut s = self.store.lock().unwrap().session(id)?.ok_or_else(|| PayError::Session("unknown session".into()))?;
        let t = s.tariff.clone();
        let seed = u64::from_be_bytes(id[..8].try_into().unwrap());
        // Energy is measured from now: while the meter was down its contactor was open.
        *self.sim.lock().unwrap() = Some(SimMeter::new(seed, t.max_power_w, s.account.register_mwh, now_ms()));
        let mut next = if t.mode == Mode::Prepaid && s.account.ticks == 0 { now_ms() } else { now_ms() + t.tick_ms };
        // When the register a new tick pays for started growing: the previous new tick's
        // measurement, or now (the simulation measures from now).
        let mut measured_ms = now_ms();
        while s.state == State::Open && !self.stop.load(Ordering::Relaxed) && max_ticks.is_none_or(|m| s.account.ticks < m) {
            let wait = next.saturating_sub(now_ms());
            std::thread::sleep(Duration::from_millis(wait));
            next += t.tick_ms;
            let Some(register) = self.measure(&mut s) else { break };
            // A tick written but not paid (before a restart, or while the provider was
            // unreachable) is sent again unchanged: same record, same preimage.
            // (Bound first: a guard in the `if let` would live through `pay`.)
            let pending = self.store.lock().unwrap().pending_tick(id)?;
            if let Some(row) = pending {
                if let Err(e) = self.pay(&mut s, row, false) {
                    tracing::warn!("{e}");
                }
                continue;
            }
            let at = now_ms();
            let policy = self.policy();
            let tick = s.account.next_tick(&t, *id, register, at.saturating_sub(measured_ms));
            let tick = s.account.with_ahead_at_most(&t, tick, policy.max_cover_msat);
            measured_ms = at;
            let day = self.store.lock().unwrap().paid_since(now_ms().saturating_sub(24 * 3600 * 1000))?;
            if let Err(e) = policy.allows(&t, tick.amount_msat, s.account.paid_msat, day) {
                tracing::warn!(session = bitmote_device::hex_encode(id), "stopping: spending policy: {e}");
                s.reason = Some(format!("spending policy: {e}"));
                break;
            }
            if let Err(e) = self.send_tick(&mut s, tick, false) {
                // Unpaid past the grace period: the provider will cut the supply, which
                // the next look at the line shows; the tick stays pending in the store.
                tracing::warn!("{e}");
            }
        }
        self.store.lock().unwrap().put_session(&s)?;
        Ok(s)
    }

    /// Look at the line and read the register. None when streaming must end: the
    /// provider ended the session, or the supply is off after energy had flowed.
    fn measure(&self, s: &mut Session) -> Option<u64> {
        let id = s.id;
        let line = self.line(&id);
        if let Some(p) = &line {
            if p.state != State::Open {
                s.state = p.state;
                s.reason = p.reason.clone();
                s.supply = false;
                tracing::warn!(session = bitmote_device::hex_encode(&id), "provider ended the session: {:?}", p.reason);
                return None;
            }
        }
        let supply = line.map(|p| p.supply).unwrap_or(s.supply);
        let register = {
            let mut sim = self.sim.lock().unwrap();
            let sim = sim.as_mut()?;
            // A tick pending at start (before a restart) and paid since carries a register
            // the simulation, started from the last tick paid before, has not reached: the
            // register never goes backwards.
            sim.register_mwh = sim.register_mwh.max(s.account.register_mwh);
            sim.advance(now_ms(), supply)
        };
        // Energy stopped flowing (supply cut) after it had flowed: stop paying.
        if !supply && s.account.ticks > 0 {
            s.state = State::Cut;
            s.reason = Some("no energy: the supply is off".into());
            return None;
        }
        s.supply = supply;
        Some(register)
    }

    /// Sign a new tick, write it to the store, and pay it (`closing`: see [`Meter::pay`]).
    fn send_tick(&self, s: &mut Session, tick: Tick, closing: bool) -> Result<(), PayError> {
        let seq = self.store.lock().unwrap().next("reading_seq")?;
        let sr = tick.sign(&self.key, seq, now_ms());
        let row = TickRow {
            tick,
            payment_hash: bitmote_device::sha256(&self.preimage(&s.id, tick.tick)),
            reading: bitmote_device::hex_encode(&sr.encode()),
            sent_ms: now_ms(),
            done_ms: None,
            latency_us: None,
        };
        self.store.lock().unwrap().put_tick(s, &row)?;
        self.pay(s, row, closing)
    }

    /// Send one tick (again, after a restart) and wait for its outcome; a failed
    /// attempt (peer disconnected, no route) is retried with the same preimage until
    /// the provider's grace period would be over, or streaming stops (unless `closing`:
    /// a closing tick is sent while streaming has stopped). A payment sent is always
    /// waited for, even once streaming stops.
    fn pay(&self, s: &mut Session, row: TickRow, closing: bool) -> Result<(), PayError> {
        let provider = parse_node_id(&s.tariff.provider)?;
        let preimage = PaymentPreimage(self.preimage(&s.id, row.tick.tick));
        let tlv = bitmote_device::hex_decode(&row.reading).unwrap_or_default();
        let give_up = Instant::now() + Duration::from_millis(s.tariff.tick_ms + s.tariff.grace_ms);
        loop {
            let started = Instant::now();
            let (tx, rx) = mpsc::channel();
            self.waiters.lock().unwrap().insert(row.payment_hash, tx);
            let rec = CustomTlvRecord { type_num: TLV_TICK, value: tlv.clone() };
            let sent = self.node.spontaneous_payment().send_with_preimage_and_custom_tlvs(
                row.tick.amount_msat,
                provider,
                vec![rec],
                preimage,
                None,
            );
            let ok = match sent {
                Ok(_) => rx.recv_timeout(give_up.saturating_duration_since(Instant::now()).max(Duration::from_secs(1))).unwrap_or(false),
                // Sent before a restart: its fate is in ldk-node's payment store.
                Err(NodeError::DuplicatePayment) => loop {
                    match self.payment_status(&row) {
                        Some(PaymentStatus::Succeeded) => break true,
                        // Polled a second at a time: in between, a provider that restarted
                        // is called back (below), or the pending HTLC never moves.
                        Some(PaymentStatus::Pending) if Instant::now() < (started + Duration::from_secs(1)).min(give_up) => {
                            std::thread::sleep(Duration::from_millis(20))
                        }
                        _ => break false,
                    }
                },
                Err(e) => {
                    tracing::warn!("tick {}: {e}", row.tick.tick);
                    false
                }
            };
            self.waiters.lock().unwrap().remove(&row.payment_hash);
            // (A late success event after a timeout: the payment store knows.)
            if ok || self.payment_status(&row) == Some(PaymentStatus::Succeeded) {
                let lat = started.elapsed().as_micros() as u64;
                return self.paid(s, &row, lat);
            }
            let stopped = (!closing && self.stop.load(Ordering::Relaxed)) || self.halt.load(Ordering::Relaxed);
            if Instant::now() > give_up || stopped {
                return Err(PayError::Session(format!("tick {} could not be paid", row.tick.tick)));
            }
            // ldk-node reconnects to peers only once a minute: a provider that restarted
            // is called back at once.
            if let Some(peer) = self.node.list_peers().into_iter().find(|p| p.node_id == provider && !p.is_connected) {
                if let Err(e) = self.node.connect(provider, peer.address, true) {
                    tracing::debug!("reconnecting to the provider: {e}");
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn payment_status(&self, row: &TickRow) -> Option<PaymentStatus> {
        self.node.payment(&PaymentId(row.payment_hash)).map(|p| p.status)
    }

    /// Count a tick whose payment succeeded.
    fn paid(&self, s: &mut Session, row: &TickRow, latency_us: u64) -> Result<(), PayError> {
        s.account.record(&row.tick);
        s.last_paid_ms = now_ms();
        self.store.lock().unwrap().tick_done(s, row.tick.tick, s.last_paid_ms, latency_us)
    }

    /// Settle the tick in flight, if any, from ldk-node's payment store, waiting while
    /// it is pending (at most `wait`): succeeded, it is counted; failed for good or
    /// never sent, it is dropped (no money moved). `Err(why)`: still pending.
    fn settle_in_flight(&self, s: &mut Session, wait: Duration) -> Result<Result<(), String>, PayError> {
        let pending = self.store.lock().unwrap().pending_tick(&s.id)?;
        let Some(row) = pending else { return Ok(Ok(())) };
        let deadline = Instant::now() + wait;
        loop {
            match self.payment_status(&row) {
                Some(PaymentStatus::Succeeded) => {
                    self.paid(s, &row, 0)?;
                    tracing::info!(session = bitmote_device::hex_encode(&s.id), "tick {} in flight at close: paid", row.tick.tick);
                    return Ok(Ok(()));
                }
                Some(PaymentStatus::Pending) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                Some(PaymentStatus::Pending) => {
                    return Ok(Err(format!(
                        "tick {} ({} msat) is still in flight; the session stays open and is closed on the next run",
                        row.tick.tick, row.tick.amount_msat
                    )))
                }
                status => {
                    self.store.lock().unwrap().drop_unpaid_tick(&s.id, row.tick.tick)?;
                    tracing::info!(
                        session = bitmote_device::hex_encode(&s.id),
                        "tick {} in flight at close: not paid ({status:?}), dropped",
                        row.tick.tick
                    );
                    return Ok(Ok(()));
                }
            }
        }
    }

    /// Prepaid: deliver the tick paid ahead before closing. Closing ticks pay no tick
    /// ahead (1-msat keep-alives, so the provider keeps the supply on) until the
    /// register makes the whole payment due; the last one pays exactly the rest.
    /// `Ok(None)`: delivered; `Ok(Some(why))`: not all of it (not within
    /// [`DELIVERY_LIMIT`], or the supply ended); `Err(why)`: a closing tick is still in
    /// flight.
    fn deliver_ahead(&self, s: &mut Session) -> Result<Result<Option<String>, String>, PayError> {
        let t = s.tariff.clone();
        if self.sim.lock().unwrap().is_none() {
            *self.sim.lock().unwrap() =
                Some(SimMeter::new(u64::from_be_bytes(s.id[..8].try_into().unwrap()), t.max_power_w, s.account.register_mwh, now_ms()));
        }
        let limit = Instant::now() + DELIVERY_LIMIT;
        let mut next = s.last_paid_ms.max(now_ms().saturating_sub(t.tick_ms)) + t.tick_ms;
        while s.account.credit_msat(&t) > 0 {
            if Instant::now() > limit || self.halt.load(Ordering::Relaxed) {
                return Ok(Ok(Some(format!("{} msat paid ahead were not delivered in time", s.account.credit_msat(&t)))));
            }
            std::thread::sleep(Duration::from_millis(next.saturating_sub(now_ms())));
            next += t.tick_ms;
            let Some(register) = self.measure(s) else {
                return Ok(Ok(Some(format!("{} msat paid ahead not delivered: the supply ended", s.account.credit_msat(&t)))));
            };
            let (tick, last) = s.account.closing_tick(&t, s.id, register);
            // The spending policy holds for the closing ticks too: none takes the session or
            // the day past its limit.
            let day = self.store.lock().unwrap().paid_since(now_ms().saturating_sub(24 * 3600 * 1000))?;
            if let Err(e) = self.policy().allows(&t, tick.amount_msat, s.account.paid_msat, day) {
                return Ok(Ok(Some(format!("{} msat paid ahead not delivered: spending policy: {e}", s.account.credit_msat(&t)))));
            }
            tracing::debug!(
                credit = s.account.credit_msat(&t),
                register,
                "closing tick {} of {} msat (last: {last})",
                tick.tick,
                tick.amount_msat
            );
            if let Err(e) = self.send_tick(s, tick, true) {
                tracing::warn!("{e}");
                if let Err(why) = self.settle_in_flight(s, Duration::from_millis(t.tick_ms + t.grace_ms))? {
                    return Ok(Err(why));
                }
            } else if last {
                break;
            }
        }
        Ok(Ok(None))
    }

    /// End the session as one state both sides agree on: settle the tick in flight,
    /// deliver a prepaid tick ahead, then send the final account (signed) and compare
    /// it with the provider's signed statement.
    pub fn close(&self, id: &SessionId) -> Result<Outcome, PayError> {
        let mut s = self.store.lock().unwrap().session(id)?.ok_or_else(|| PayError::Session("unknown session".into()))?;
        let wait = Duration::from_millis(s.tariff.tick_ms + s.tariff.grace_ms) + Duration::from_secs(10);
        if let Err(why) = self.settle_in_flight(&mut s, wait)? {
            tracing::warn!(session = bitmote_device::hex_encode(id), "{why}");
            return Ok(Outcome { session: s, provider: None, reconciled: false, unsettled: Some(why) });
        }
        let mut unsettled = None;
        tracing::debug!(credit = s.account.credit_msat(&s.tariff), state = ?s.state, "closing: {:?}", s.account);
        if s.tariff.mode == Mode::Prepaid && s.state == State::Open && s.account.credit_msat(&s.tariff) > 0 {
            match self.deliver_ahead(&mut s)? {
                Ok(note) => unsettled = note,
                Err(why) => {
                    self.store.lock().unwrap().put_session(&s)?;
                    return Ok(Outcome { session: s, provider: None, reconciled: false, unsettled: Some(why) });
                }
            }
        }
        let url = format!("{}/v1/sessions/{}/close", self.provider_url, bitmote_device::hex_encode(id));
        let req = CloseRequest {
            account: s.account.clone(),
            signature: bitmote_device::hex_encode(&self.key.sign(&crate::close_message(id, &s.account)).encode()),
        };
        // The provider waits for the declared ticks itself; retrying covers a provider
        // that is restarting or briefly unreachable.
        let deadline = Instant::now() + Duration::from_secs(30);
        let statement = loop {
            match http_post::<Statement>(&url, &req) {
                Ok(st) if st.session.account == s.account || Instant::now() > deadline => break Some(st),
                Ok(st) => tracing::warn!("the provider's statement says {:?}, ours {:?}; asking again", st.session.account, s.account),
                Err(e) if Instant::now() > deadline => {
                    tracing::warn!("closing: {e}");
                    break None;
                }
                Err(e) => tracing::warn!("closing: {e}; trying again"),
            }
            std::thread::sleep(Duration::from_secs(1));
        };
        if s.state == State::Open {
            s.state = State::Closed;
            s.reason = Some("closed by the meter".into());
        }
        s.supply = false;
        self.store.lock().unwrap().put_session(&s)?;
        // Only the provider the session's tariff names can reconcile it, and only this session.
        let reconciled = statement
            .as_ref()
            .is_some_and(|st| st.verify_by(&self.node, &s.tariff.provider) && st.session.id == s.id && st.session.account == s.account);
        if unsettled.is_none() && statement.is_none() {
            unsettled = Some("the provider did not answer the close".into());
        }
        Ok(Outcome { session: s, provider: statement, reconciled, unsettled })
    }

    /// Account of a session.
    pub fn account(&self, id: &SessionId) -> Result<Option<Account>, PayError> {
        Ok(self.store.lock().unwrap().session(id)?.map(|s| s.account))
    }

    /// The signed tick readings of a session (notary receipts).
    pub fn ticks(&self, id: &SessionId) -> Result<Vec<TickRow>, PayError> {
        self.store.lock().unwrap().ticks(id)
    }

    pub fn status(&self) -> serde_json::Value {
        let sessions = self.store.lock().unwrap().sessions().unwrap_or_default();
        let sim = self.sim.lock().unwrap().clone();
        serde_json::json!({
            "role": "meter",
            "node": crate::machine::node_json(&self.node),
            "provider_url": self.provider_url,
            "device_key": bitmote_device::hex_encode(&self.key.public_key().encode()),
            "power_w": sim.as_ref().map_or(0, |m| m.power_w),
            "register_mwh": sim.as_ref().map_or(0, |m| m.register_mwh),
            "sessions": sessions.iter().map(crate::machine::session_json).collect::<Vec<_>>(),
            "notary": self.notary_json(),
        })
    }

    fn notary_json(&self) -> serde_json::Value {
        let link = self.notary.lock().unwrap().clone();
        let Some(link) = link else { return serde_json::Value::Null };
        let (posted, waiting, last) = self.store.lock().unwrap().receipt_counts().unwrap_or((0, 0, None));
        serde_json::json!({
            "url": link.url,
            "device_id": self.key.public_key().device_id().to_string(),
            "posted": posted,
            "waiting": waiting,
            "last_receipt": last.and_then(|r| serde_json::from_str::<serde_json::Value>(&r).ok()),
            "last_error": link.last_error,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue #13, item 9: a meter key that cannot be read is never replaced.
    #[test]
    fn an_unreadable_meter_key_is_refused_not_replaced() {
        let d = tempfile::tempdir().unwrap();
        let k = load_or_create_secret(d.path()).unwrap();
        assert_eq!(load_or_create_secret(d.path()).unwrap(), k);
        let p = d.path().join("meter.key");
        std::fs::write(&p, b"short").unwrap();
        let e = load_or_create_secret(d.path()).unwrap_err().to_string();
        assert!(e.contains("is not 32 bytes") && e.contains("never overwritten"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"short");
        std::fs::remove_file(&p).unwrap();
        std::fs::create_dir(&p).unwrap();
        assert!(load_or_create_secret(d.path()).unwrap_err().to_string().contains("cannot be read"));
        assert!(p.is_dir());
    }
}
