//! The energy provider: publishes a signed tariff, opens sessions for meters,
//! credits each keysend tick it can verify, and cuts the supply of a session whose
//! payment is late past the grace period or short.
//!
//! HTTP API (JSON, loopback by default):
//! - `GET /v1/tariff` – the signed tariff
//! - `POST /v1/sessions` `{tariff_id, meter_key, meter_node, timestamp_ms, signature}` – open a
//!   session (signed by the meter key over [`crate::open_message`]; one open session per
//!   meter, [`MAX_OPEN_SESSIONS`] in all)
//! - `GET /v1/sessions/{id}` – the provider's account and supply state (for the
//!   simulation this is also "the line": a meter sees whether energy flows)
//! - `POST /v1/sessions/{id}/close` `{account, signature}` – end it at the meter's final
//!   account (signed by the session's meter key, over [`crate::close_message`]); waits
//!   until every tick declared is credited, then returns the signed statement
//! - `GET /v1/status` – node, channels, balances, totals

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path as UrlPath, State as AxState};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use bitmote_chain::now_ms;
use bitmote_device::sign::PublicKey as DeviceKey;
use ldk_node::{Event, Node};
use serde::{Deserialize, Serialize};

use crate::node::parse_node_id;
use crate::store::{Session, State, Store, TickRow};
use crate::tariff::{SignedTariff, Tariff};
use crate::tick::{Account, Refusal, SessionId, Tick, Verdict, TLV_TICK};
use crate::PayError;

/// A request to open a session, signed by the meter's device key.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenRequest {
    pub tariff_id: String,
    /// The meter's device key (bitmote encoding, hex): it signs every register.
    pub meter_key: String,
    pub meter_node: String,
    /// The meter's clock (unix ms): each meter's opens must carry increasing times.
    pub timestamp_ms: u64,
    /// The meter key's signature (hex) over [`crate::open_message`].
    pub signature: String,
}

/// How far an open request's time may be from the provider's clock.
pub const OPEN_CLOCK_SKEW: Duration = Duration::from_secs(300);

/// Open sessions a provider serves at most (all meters together); each meter has at most
/// one open session.
pub const MAX_OPEN_SESSIONS: usize = 1000;

/// A side's account of a session, signed with its node key.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Statement {
    pub session: Session,
    /// Node-key signature (zbase32) over the canonical JSON of `session`.
    pub signature: String,
    pub signer: String,
}

impl Statement {
    pub fn sign(node: &Node, session: Session) -> Self {
        let signature = node.sign_message(&serde_json::to_vec(&session).expect("serializes"));
        Statement { session, signature, signer: node.node_id().to_string() }
    }
    /// Whether `expected` (a node id: for a meter, the provider its tariff pinned) signed
    /// this statement. The statement's own `signer` field is not trusted: anyone answering at
    /// the provider's URL could sign with a key of their own and name it.
    pub fn verify_by(&self, node: &Node, expected: &str) -> bool {
        let Ok(pk) = parse_node_id(expected) else { return false };
        self.signer == expected && node.verify_signature(&serde_json::to_vec(&self.session).expect("serializes"), &self.signature, &pk)
    }
}

/// Totals for the status endpoint.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Totals {
    pub received_msat: u64,
    pub refused_msat: u64,
    pub refused: u64,
    pub late: u64,
    pub short: u64,
}

/// The running provider.
pub struct Provider {
    pub node: Arc<Node>,
    store: Mutex<Store>,
    tariff: SignedTariff,
    stop: Arc<AtomicBool>,
    pub http_addr: SocketAddr,
}

fn now() -> u64 {
    now_ms()
}

impl Provider {
    /// Start on a running node: sign the tariff (its `provider` field is set to our
    /// node id), serve HTTP on `http`, handle payments and deadlines.
    pub fn start(node: Arc<Node>, data: &Path, mut tariff: Tariff, http: SocketAddr) -> Result<Arc<Self>, PayError> {
        tariff.provider = node.node_id().to_string();
        tariff.check(bitmote_chain::now_secs())?;
        let signature = node.sign_message(&tariff.canonical());
        let store = Store::open(&data.join("provider.db"))?;
        // Sessions that were open when we stopped get a fresh grace period: our own
        // downtime is not the meter's fault.
        for mut s in store.open_sessions()? {
            s.last_paid_ms = now();
            store.put_session(&s)?;
        }
        let listener = std::net::TcpListener::bind(http).map_err(|e| PayError::Config(format!("HTTP {http}: {e}")))?;
        listener.set_nonblocking(true).map_err(|e| PayError::Config(e.to_string()))?;
        let p = Arc::new(Provider {
            node,
            store: Mutex::new(store),
            tariff: SignedTariff { tariff, signature },
            stop: Arc::new(AtomicBool::new(false)),
            http_addr: listener.local_addr().map_err(|e| PayError::Config(e.to_string()))?,
        });
        let ev = p.clone();
        std::thread::Builder::new().name("provider-events".into()).spawn(move || ev.event_loop()).expect("thread");
        let dl = p.clone();
        std::thread::Builder::new()
            .name("provider-deadlines".into())
            .spawn(move || {
                while !dl.stop.load(Ordering::Relaxed) {
                    if let Err(e) = dl.check_deadlines() {
                        tracing::error!("deadlines: {e}");
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
            .expect("thread");
        crate::machine::serve(listener, router(p.clone()), &p.stop);
        Ok(p)
    }

    pub fn tariff(&self) -> &SignedTariff {
        &self.tariff
    }

    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    fn event_loop(self: Arc<Self>) {
        crate::machine::event_loop(&self.node, &self.stop, |ev| match ev {
            Event::PaymentReceived { payment_hash, amount_msat, custom_records, .. } => {
                let rec = custom_records.iter().find(|r| r.type_num == TLV_TICK).map(|r| r.value.as_slice());
                self.on_payment(payment_hash.0, *amount_msat, rec)
            }
            _ => Ok(()),
        });
    }

    /// Credit (or refuse) one received payment. Idempotent by payment hash.
    pub fn on_payment(&self, hash: [u8; 32], amount: u64, record: Option<&[u8]>) -> Result<(), PayError> {
        let mut store = self.store.lock().unwrap();
        if store.known_payment(&hash)? {
            return Ok(());
        }
        let mut session_id = None;
        let res = (|| {
            let (sr, tick) = Tick::decode_record(record.ok_or(Refusal::Missing)?)?;
            session_id = Some(tick.session);
            let hex = bitmote_device::hex_encode(&tick.session);
            let mut s =
                store.session(&tick.session).map_err(|e| Refusal::Malformed(e.to_string()))?.ok_or(Refusal::UnknownSession(hex.clone()))?;
            // A tick still in flight when the supply was cut, or declared by the meter's
            // close request, is credited when it arrives (its money has come in); the
            // supply stays off. Any other tick for an ended session is refused.
            let open = s.state == State::Open;
            let in_flight = match s.state {
                State::Open => true,
                State::Cut => s.final_ticks.is_none_or(|n| tick.tick < n),
                State::Closed => s.final_ticks.is_some_and(|n| tick.tick < n),
            };
            if !in_flight {
                return Err(Refusal::Ended(hex));
            }
            let key =
                DeviceKey::decode(&bitmote_device::hex_decode(&s.meter_key).unwrap_or_default()).map_err(|_| Refusal::BadSignature)?;
            sr.verify(&key).map_err(|_| Refusal::BadSignature)?;
            let t = now();
            let verdict = s.account.accept(&s.tariff, &tick, amount, t.saturating_sub(s.last_paid_ms))?;
            s.last_paid_ms = t;
            match verdict {
                _ if !open => {}
                Verdict::Paid if s.account.paid_msat >= s.tariff.session_limit_msat => {
                    end(&mut s, State::Closed, "session limit reached".into())
                }
                Verdict::Paid => s.supply = true,
                Verdict::Short { required_msat, paid_msat } => {
                    s.short += 1;
                    end(
                        &mut s,
                        State::Cut,
                        format!("short payment at tick {}: {paid_msat} msat paid, {required_msat} msat due", tick.tick),
                    );
                    tracing::warn!(session = hex, "supply cut: {}", s.reason.as_deref().unwrap_or(""));
                }
            }
            let row = TickRow {
                tick,
                payment_hash: hash,
                reading: bitmote_device::hex_encode(&sr.encode()),
                sent_ms: t,
                done_ms: Some(t),
                latency_us: None,
            };
            Ok((s, row))
        })();
        match res {
            Ok((s, row)) => {
                store.put_tick(&s, &row)?;
            }
            Err(why) => {
                tracing::warn!("payment {} of {amount} msat refused: {why}", bitmote_device::hex_encode(&hash));
                if let Some(Ok(Some(mut s))) = session_id.map(|id| store.session(&id)) {
                    s.refused_msat += amount;
                    store.put_session(&s)?;
                }
                store.refuse(&hash, session_id.as_ref(), amount, &why.to_string(), now())?;
            }
        }
        Ok(())
    }

    fn check_deadlines(&self) -> Result<(), PayError> {
        let store = self.store.lock().unwrap();
        let t = now();
        for mut s in store.open_sessions()? {
            let deadline = s.last_paid_ms + s.tariff.tick_ms + s.tariff.grace_ms;
            if s.state == State::Open && t > deadline {
                s.late += 1;
                let reason = format!("payment for tick {} late by {} ms past the grace period", s.account.ticks, t - deadline);
                tracing::warn!(session = bitmote_device::hex_encode(&s.id), "supply cut: {reason}");
                end(&mut s, State::Cut, reason);
                store.put_session(&s)?;
            }
        }
        Ok(())
    }

    /// Open a session for a meter.
    pub fn open(&self, req: &OpenRequest) -> Result<Session, PayError> {
        if req.tariff_id != self.tariff.id() {
            return Err(PayError::Session(format!("unknown tariff {} (current: {})", req.tariff_id, self.tariff.id())));
        }
        let key = bitmote_device::hex_decode(&req.meter_key).ok_or_else(|| PayError::Session("meter_key is not hex".into()))?;
        let meter = DeviceKey::decode(&key).map_err(|e| PayError::Session(format!("meter_key: {e:?}")))?;
        parse_node_id(&req.meter_node)?;
        // Only the meter key's holder opens sessions for it, each signed request once.
        let message = crate::open_message(&req.tariff_id, &req.meter_key, &req.meter_node, req.timestamp_ms);
        check_signed(&meter, &message, &req.signature, "open request", "its meter key")?;
        let skew = OPEN_CLOCK_SKEW.as_millis() as u64;
        if req.timestamp_ms.abs_diff(now()) > skew {
            return Err(PayError::Unauthorized(format!("the open request's time is more than {} s from ours", skew / 1000)));
        }
        let store = self.store.lock().unwrap();
        let last = format!("open_ms:{}", req.meter_key);
        if store.counter(&last)?.is_some_and(|l| req.timestamp_ms <= l) {
            return Err(PayError::Unauthorized("a replayed open request (its time is not after the meter's last open)".into()));
        }
        let open = store.open_sessions()?;
        if open.iter().any(|s| s.meter_key == req.meter_key) {
            return Err(PayError::Busy("this meter has an open session already (resume it, or close it first)".into()));
        }
        if open.len() >= MAX_OPEN_SESSIONS {
            return Err(PayError::Busy(format!("{MAX_OPEN_SESSIONS} sessions are open: no more now")));
        }
        store.set_counter(&last, req.timestamp_ms)?;
        let mut id = [0u8; 16];
        id.copy_from_slice(&bitmote_device::sha256(&[&key[..], &now().to_be_bytes(), &rand_bytes()].concat())[..16]);
        let t = now();
        let s = Session {
            id,
            tariff: self.tariff.tariff.clone(),
            meter_key: req.meter_key.clone(),
            meter_node: req.meter_node.clone(),
            opened_ms: t,
            state: State::Open,
            reason: None,
            // Postpaid: energy flows at once. Prepaid: after the first payment.
            supply: self.tariff.tariff.mode == crate::tariff::Mode::Postpaid,
            account: Default::default(),
            last_paid_ms: t,
            refused_msat: 0,
            late: 0,
            short: 0,
            final_ticks: None,
        };
        store.put_session(&s)?;
        tracing::info!(session = bitmote_device::hex_encode(&id), meter = req.meter_node, "session opened");
        Ok(s)
    }

    pub fn session(&self, id: &SessionId) -> Result<Option<Session>, PayError> {
        self.store.lock().unwrap().session(id)
    }

    /// End a session at the meter's request, at the final `account` it declares, with
    /// `signature` (hex) by the session's meter key over [`crate::close_message`]. The
    /// meter saw its declared ticks succeed; the provider waits (up to [`CLOSE_WAIT`])
    /// until its event loop has credited them, then signs its statement. No money is
    /// sent back: a prepaid meter has delivered its tick ahead before closing. Closing
    /// again returns the statement again (with any declared tick credited since).
    pub fn close(&self, id: &SessionId, account: &Account, signature: &str) -> Result<Statement, PayError> {
        let s = self.session(id)?.ok_or_else(|| PayError::Session("unknown session".into()))?;
        let key = DeviceKey::decode(&bitmote_device::hex_decode(&s.meter_key).unwrap_or_default())
            .map_err(|e| PayError::Session(format!("stored meter key: {e:?}")))?;
        check_signed(&key, &crate::close_message(id, account), signature, "close request", "the session's meter")?;
        // From now on only the declared ticks may still be credited.
        {
            let store = self.store.lock().unwrap();
            let mut s = store.session(id)?.ok_or_else(|| PayError::Session("unknown session".into()))?;
            if s.final_ticks.is_none() {
                s.final_ticks = Some(account.ticks);
                if s.state == State::Open {
                    end(&mut s, State::Closed, "closed by the meter".into());
                }
                store.put_session(&s)?;
            }
        }
        let deadline = std::time::Instant::now() + CLOSE_WAIT;
        loop {
            let s = self.session(id)?.ok_or_else(|| PayError::Session("unknown session".into()))?;
            let credited = s.account.ticks >= s.final_ticks.unwrap_or(0);
            if credited || std::time::Instant::now() >= deadline {
                if !credited {
                    tracing::warn!(
                        session = bitmote_device::hex_encode(id),
                        "closing with {} of the {} ticks the meter declared credited",
                        s.account.ticks,
                        s.final_ticks.unwrap_or(0)
                    );
                }
                return Ok(Statement::sign(&self.node, s));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn status(&self) -> Result<serde_json::Value, PayError> {
        let store = self.store.lock().unwrap();
        let sessions = store.sessions()?;
        let mut totals = Totals::default();
        for s in &sessions {
            totals.received_msat += s.account.paid_msat;
            totals.refused_msat += s.refused_msat;
            totals.late += s.late;
            totals.short += s.short;
        }
        let refusals = store.refusals()?;
        totals.refused = refusals.len() as u64;
        Ok(serde_json::json!({
            "role": "provider",
            "node": crate::machine::node_json(&self.node),
            "tariff": self.tariff,
            "tariff_id": self.tariff.id(),
            "totals": totals,
            "sessions": sessions.iter().map(crate::machine::session_json).collect::<Vec<_>>(),
            "refusals": refusals,
        }))
    }
}

fn end(s: &mut Session, state: State, reason: String) {
    s.state = state;
    s.supply = false;
    s.reason = Some(reason);
}

fn rand_bytes() -> [u8; 16] {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).expect("OS randomness");
    b
}

type Shared = Arc<Provider>;

/// Check that `signature` (hex) is `key`'s over `message`: a meter's signed request
/// (`what`, e.g. "open request"), which only `signer` may make.
fn check_signed(key: &DeviceKey, message: &[u8; 32], signature: &str, what: &str, signer: &str) -> Result<(), PayError> {
    let sig = bitmote_device::hex_decode(signature)
        .and_then(|b| bitmote_device::Signature::decode(&b).ok())
        .ok_or_else(|| PayError::Unauthorized(format!("the {what}'s signature is not a signature")))?;
    key.verify(message, &sig).map_err(|_| PayError::Unauthorized(format!("the {what} is not signed by {signer}")))
}

fn api_err(code: StatusCode) -> impl Fn(PayError) -> (StatusCode, String) {
    move |e| (code, e.to_string())
}

/// How long a close waits for the ticks the meter declared to be credited.
pub const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// `POST /v1/sessions/{id}/close`: the meter's final account and its signature over
/// [`crate::close_message`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloseRequest {
    pub account: Account,
    pub signature: String,
}

fn session_id(s: &str) -> Result<SessionId, (StatusCode, String)> {
    crate::parse_session(s).ok_or((StatusCode::BAD_REQUEST, format!("{s:?} is not a session id")))
}

fn router(p: Shared) -> Router {
    Router::new()
        .route("/v1/tariff", get(|AxState(p): AxState<Shared>| async move { Json(p.tariff.clone()) }))
        .route(
            "/v1/status",
            get(|AxState(p): AxState<Shared>| async move { p.status().map(Json).map_err(api_err(StatusCode::INTERNAL_SERVER_ERROR)) }),
        )
        .route(
            "/v1/sessions",
            post(|AxState(p): AxState<Shared>, Json(req): Json<OpenRequest>| async move {
                p.open(&req).map(Json).map_err(|e| match e {
                    PayError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, e.to_string()),
                    PayError::Busy(_) => (StatusCode::CONFLICT, e.to_string()),
                    e => (StatusCode::BAD_REQUEST, e.to_string()),
                })
            }),
        )
        .route(
            "/v1/sessions/{id}",
            get(|AxState(p): AxState<Shared>, UrlPath(id): UrlPath<String>| async move {
                let id = session_id(&id)?;
                match p.session(&id).map_err(api_err(StatusCode::INTERNAL_SERVER_ERROR))? {
                    Some(s) => Ok(Json(s)),
                    None => Err((StatusCode::NOT_FOUND, "unknown session".into())),
                }
            }),
        )
        .route(
            "/v1/sessions/{id}/close",
            post(|AxState(p): AxState<Shared>, UrlPath(id): UrlPath<String>, Json(req): Json<CloseRequest>| async move {
                let id = session_id(&id)?;
                tokio::task::spawn_blocking(move || p.close(&id, &req.account, &req.signature))
                    .await
                    .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
                    .map(Json)
                    .map_err(|e| match e {
                        PayError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, e.to_string()),
                        e => (StatusCode::BAD_REQUEST, e.to_string()),
                    })
            }),
        )
        .with_state(p)
}
