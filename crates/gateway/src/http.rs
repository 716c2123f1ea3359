//! The HTTP API: ingest (binary wire format or JSON), readings, proofs and `.ots`
//! files, the signed checkpoint, consistency proofs, anchors, devices (admin), stats,
//! actuator rules and payment orders (admin), the action log, device presence, the
//! verifier run against the gateway's node, the dashboard ([`crate::dashboard`]), Prometheus
//! metrics ([`crate::metrics`]) and the OpenAPI description at `/openapi.json`.

use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use bitmote_actuator::{Action, EngineError, Rule, Trigger};
use bitmote_chain::bitcoin::{Address, Block, BlockHash, ScriptBuf};
use bitmote_device::{DeviceId, PublicKey};
use bitmote_notary::ingest::{IngestError, JsonSubmissionError, Receipt, Submission};
use bitmote_notary::log::MerkleLog;
use bitmote_notary::verify::{verify_bundle, verify_ots, Policy, Step};
use serde::Deserialize;
use serde_json::json;

use crate::{Job, Shared};
use bitmote_actuator::rules::{OrderRequest, PaymentOrder};
use bitmote_proto::notary::{DeviceAnswer, DeviceList, EnrolRequest, Enrolment, RevokeRequest};

/// Largest request body (a full batch of 4096 readings with payloads fits).
pub const MAX_BODY: usize = 8 << 20;
/// The body limit of every other route (enrolment, rules, orders, revocations: small JSON).
pub const MAX_SMALL_BODY: usize = 64 << 10;

/// An API error: HTTP status and a JSON body `{ "error": message, "code": reason }`.
pub struct ApiError {
    status: StatusCode,
    body: bitmote_proto::ErrorBody,
}

fn api_error(status: StatusCode, msg: String, code: &'static str) -> ApiError {
    ApiError { status, body: bitmote_proto::ErrorBody::new(msg, code) }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

impl From<IngestError> for ApiError {
    fn from(e: IngestError) -> Self {
        let status = match &e {
            IngestError::Malformed(_) => StatusCode::BAD_REQUEST,
            IngestError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            IngestError::UnknownDevice(_) | IngestError::Revoked(_) => StatusCode::FORBIDDEN,
            IngestError::BadSignature(_) | IngestError::ClockSkew { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            IngestError::Replay { .. } => StatusCode::CONFLICT,
            IngestError::Storage(_) | IngestError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            IngestError::DiskFull(_) => StatusCode::INSUFFICIENT_STORAGE,
        };
        ApiError { status, body: crate::ingest_error_body(&e) }
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    api_error(StatusCode::BAD_REQUEST, msg.into(), "bad_request")
}

pub(crate) fn internal(e: impl std::fmt::Display) -> ApiError {
    api_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), "internal")
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(crate::dashboard::page))
        .route("/dashboard.js", get(crate::dashboard::script))
        .route("/dashboard.css", get(crate::dashboard::style))
        .route("/v1/dashboard", get(crate::dashboard::dashboard))
        .route("/v1/pay", get(crate::dashboard::pay))
        .route("/metrics", get(crate::metrics::metrics))
        .route("/health", get(health))
        .route("/openapi.json", get(openapi))
        .route("/v1/readings", post(post_readings).layer(DefaultBodyLimit::max(MAX_BODY)))
        .route("/v1/readings/{id}", get(get_reading))
        .merge(
            // The anonymous routes that reach the Bitcoin node: limited per client address.
            Router::new()
                .route("/v1/readings/{id}/proof", get(get_proof))
                .route("/v1/readings/{id}/proof.ots", get(get_ots))
                .route("/v1/readings/{id}/verify", post(verify))
                .route_layer(axum::middleware::from_fn_with_state(shared.clone(), anonymous_rate)),
        )
        .route("/v1/log", get(get_log))
        .route("/v1/log/consistency", get(get_consistency))
        .route("/v1/anchors", get(get_anchors))
        .route("/v1/devices", get(list_devices).post(enroll))
        .route("/v1/devices/{id}/revoke", post(revoke))
        .route("/v1/stats", get(stats))
        .route("/v1/actions", get(actions))
        .route("/v1/presence", get(presence))
        .route("/v1/rules", get(list_rules).post(add_rule))
        .route("/v1/rules/{id}", delete(remove_rule))
        .route("/v1/devices/{id}/orders", post(order))
        .route("/v1/lightning", get(lightning))
        .route("/v1/wallet", get(wallet))
        // Only a batch of readings needs a large body; every other route reads a small JSON.
        .layer(DefaultBodyLimit::max(MAX_SMALL_BODY))
        .layer(axum::middleware::from_fn_with_state(shared.clone(), crate::metrics::count_requests))
        .with_state(shared)
}

/// [`crate::serve::RateLimiter`] in front of the routes that reach the node: `429` with
/// `Retry-After` when a client's bucket is empty; the admin token is never limited.
async fn anonymous_rate(State(s): State<Arc<Shared>>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if let Some(peer) = crate::serve::peer(req.extensions()) {
        if !is_admin(&s, req.headers()) {
            if let Err(wait) = s.anonymous_rate.check(peer.ip()) {
                let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
                let mut r = api_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!("too many requests from {}; try again in {secs} s", peer.ip()),
                    "rate_limited",
                )
                .into_response();
                if let Ok(v) = header::HeaderValue::from_str(&secs.to_string()) {
                    r.headers_mut().insert(header::RETRY_AFTER, v);
                }
                return r;
            }
        }
    }
    next.run(req).await
}

async fn health() -> &'static str {
    "ok"
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], include_str!("openapi.json"))
}

pub use bitmote_notary::ingest::{ReadingJson, ValueJson};

fn parse_submission(headers: &HeaderMap, body: &[u8]) -> Result<Submission, ApiError> {
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if ct.starts_with("application/json") {
        Submission::from_json(body).map_err(|e| match e {
            JsonSubmissionError::Invalid(m) => bad(m),
            e @ JsonSubmissionError::TooMany(_) => api_error(StatusCode::PAYLOAD_TOO_LARGE, e.to_string(), "too_large"),
        })
    } else {
        Ok(Submission::decode(body)?)
    }
}

/// Submit and wait (without blocking the runtime) until durable.
pub async fn submit(shared: &Arc<Shared>, sub: Submission) -> Result<Vec<Receipt>, IngestError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let s = shared.clone();
    tokio::task::spawn_blocking(move || {
        s.ingest.submit_with(sub, move |r| {
            let _ = tx.send(r);
        })
    })
    .await
    .map_err(|_| IngestError::ShuttingDown)?;
    rx.await.unwrap_or(Err(IngestError::ShuttingDown))
}

async fn post_readings(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Result<Json<bitmote_proto::Receipts>, ApiError> {
    // Decoding (and for JSON, parsing) up to 8 MiB is CPU work: off the async workers.
    let sub = blocking(move || parse_submission(&headers, &body)).await?;
    let receipts = submit(&s, sub).await?;
    Ok(Json(bitmote_proto::Receipts { receipts }))
}

fn parse_id(id: &str) -> Result<[u8; 32], ApiError> {
    hex::decode(id).ok().and_then(|v| v.try_into().ok()).ok_or_else(|| bad("a reading id is 64 hex digits"))
}

pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(internal)?
}

fn stored_reading(s: &Shared, id: &[u8; 32]) -> Result<bitmote_notary::ingest::StoredReading, ApiError> {
    let c = s.db().map_err(internal)?;
    bitmote_notary::ingest::reading_by_id(&c, id)?.ok_or_else(|| api_error(StatusCode::NOT_FOUND, "no such reading".into(), "not_found"))
}

async fn get_reading(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Result<Json<serde_json::Value>, ApiError> {
    let id = parse_id(&id)?;
    blocking(move || {
        let r = stored_reading(&s, &id)?;
        Ok(Json(json!({
            "id": hex::encode(id),
            "leaf_index": r.leaf_index,
            "received_ms": r.received_ms,
            "reading": ReadingJson::from_reading(&r.reading),
            "value": r.reading.value_string(),
            "encoded": hex::encode(r.reading.encode()),
            "batched": matches!(r.evidence, bitmote_device::Evidence::Batch(_)),
        })))
    })
    .await
}

/// The last anchor blocks proofs needed, by hash (a block never changes under its hash):
/// anonymous `proof`, `proof.ots` and `verify` calls then cost the node one `getblock` per
/// anchor, not one per request (issue 13, item 7).
#[derive(Default)]
pub struct BlockCache(Mutex<std::collections::VecDeque<(BlockHash, Arc<Block>)>>);

/// Blocks [`BlockCache`] keeps (most recent use first out last).
const CACHED_BLOCKS: usize = 32;

impl BlockCache {
    pub fn get(&self, client: &bitmote_chain::ChainClient, hash: &BlockHash) -> Result<Arc<Block>, bitmote_chain::ChainError> {
        {
            let mut c = self.0.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(i) = c.iter().position(|(h, _)| h == hash) {
                let hit = c.remove(i).expect("index from position");
                let block = hit.1.clone();
                c.push_front(hit);
                return Ok(block);
            }
        }
        let block = Arc::new(client.block(hash)?);
        let mut c = self.0.lock().unwrap_or_else(|p| p.into_inner());
        c.push_front((*hash, block.clone()));
        c.truncate(CACHED_BLOCKS);
        Ok(block)
    }
}

fn proof_of(s: &Shared, id: [u8; 32]) -> Result<bitmote_notary::proof::ProofBundle, ApiError> {
    let c = s.db().map_err(internal)?;
    bitmote_notary::proof::assemble_with(&c, &|h| s.blocks.get(&s.client, h), &id, Some(&s.signer)).map_err(|e| match e {
        bitmote_notary::proof::AssembleError::NotFound(_) => api_error(StatusCode::NOT_FOUND, e.to_string(), "not_found"),
        bitmote_notary::proof::AssembleError::Chain(_) => api_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string(), "node_unavailable"),
        other => internal(other),
    })
}

async fn get_proof(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Result<Json<bitmote_notary::proof::ProofBundle>, ApiError> {
    let id = parse_id(&id)?;
    blocking(move || proof_of(&s, id).map(Json)).await
}

async fn get_ots(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let idb = parse_id(&id)?;
    blocking(move || {
        let bundle = proof_of(&s, idb)?;
        let ots = bundle.to_ots().map_err(|e| api_error(StatusCode::CONFLICT, e.to_string(), "pending"))?;
        let bytes = ots.serialize().map_err(internal)?;
        Ok((
            [
                (header::CONTENT_TYPE, "application/vnd.opentimestamps.v1".to_string()),
                (header::CONTENT_DISPOSITION, format!("attachment; filename=\"{id}.ots\"")),
            ],
            bytes,
        )
            .into_response())
    })
    .await
}

/// Run the verifier on a reading's proof bundle and `.ots`, against the gateway's node,
/// with the stored reading, the revoked keys and the checkpoint key; report every step.
async fn verify(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Result<Json<serde_json::Value>, ApiError> {
    let idb = parse_id(&id)?;
    blocking(move || {
        let stored = stored_reading(&s, &idb)?;
        let bundle = proof_of(&s, idb)?;
        let revoked: Vec<DeviceId> = s.ingest.devices().into_iter().filter(|d| d.revoked_ms.is_some()).map(|d| d.id).collect();
        let key = s.signer.verifier_key();
        let policy = Policy { reading_file: Some(&stored.encoded), revoked: &revoked, checkpoint_key: Some(&key) };
        let result = verify_bundle(&bundle, &s.client, &policy);
        let failed = result.as_ref().err();
        let pos = |step: Step| Step::ALL.iter().position(|&x| x == step);
        let steps: Vec<_> = Step::ALL
            .iter()
            .map(|&step| {
                let (state, detail) = match failed {
                    Some(e) if e.step == step => (if e.is_pending() { "pending" } else { "failed" }, Some(e.detail.clone())),
                    Some(e) if pos(e.step) < pos(step) => ("not_run", None),
                    _ => ("ok", None),
                };
                json!({ "step": step, "name": step.to_string(), "result": state, "detail": detail })
            })
            .collect();
        let ots = match bundle.to_ots() {
            Ok(ots) => match verify_ots(&stored.encoded, &ots, &s.client) {
                Ok((height, time)) => json!({ "result": "ok", "block_height": height, "block_time": time }),
                Err(e) => json!({ "result": if e.is_pending() { "pending" } else { "failed" }, "detail": e.to_string() }),
            },
            Err(e) => json!({ "result": "pending", "detail": e.to_string() }),
        };
        Ok(Json(json!({
            "reading_id": id,
            "result": match failed { None => "verified", Some(e) if e.is_pending() => "pending", Some(_) => "failed" },
            "verified": result.as_ref().ok(),
            "error": failed.map(|e| e.to_string()),
            "steps": steps,
            "ots": ots,
        })))
    })
    .await
}

async fn get_log(State(s): State<Arc<Shared>>) -> Result<Json<bitmote_proto::notary::LogInfo>, ApiError> {
    blocking(move || {
        let c = s.db().map_err(internal)?;
        let log = MerkleLog::new(&c);
        let size = log.size().map_err(internal)?;
        let root = log.root_at(size).map_err(internal)?;
        Ok(Json(bitmote_proto::notary::LogInfo {
            origin: s.signer.name().to_string(),
            tree_size: size,
            root: hex::encode(root),
            checkpoint: s.signer.sign(size, root),
            verifier_key: s.signer.verifier_key(),
        }))
    })
    .await
}

#[derive(Deserialize)]
struct Consistency {
    old: u64,
    new: Option<u64>,
}

async fn get_consistency(State(s): State<Arc<Shared>>, Query(q): Query<Consistency>) -> Result<Json<serde_json::Value>, ApiError> {
    blocking(move || {
        let c = s.db().map_err(internal)?;
        let log = MerkleLog::new(&c);
        let new = match q.new {
            Some(n) => n,
            None => log.size().map_err(internal)?,
        };
        let proof = log.consistency_proof(q.old, new).map_err(|e| bad(e.to_string()))?;
        Ok(Json(json!({
            "old": q.old, "new": new,
            "old_root": hex::encode(log.root_at(q.old).map_err(internal)?),
            "new_root": hex::encode(log.root_at(new).map_err(internal)?),
            "proof": proof.iter().map(hex::encode).collect::<Vec<_>>(),
        })))
    })
    .await
}

async fn get_anchors(State(s): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let anchors = s.anchors.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let status = s.anchor_status.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let tip = *s.tip_height.lock().unwrap_or_else(|p| p.into_inner());
    let node = s.node_status.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Json(json!({ "status": status, "node": node, "tip_height": tip, "anchors": anchors }))
}

/// An admin call: the extractor refuses the request (401) unless it carries the admin token,
/// before its body is even read.
pub struct Admin;

impl axum::extract::FromRequestParts<Arc<Shared>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, s: &Arc<Shared>) -> Result<Self, ApiError> {
        require_admin(s, &parts.headers).map(|()| Admin)
    }
}

fn require_admin(s: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    // Compare in constant time.
    let ok = given
        .is_some_and(|g| g.len() == s.admin_token.len() && g.bytes().zip(s.admin_token.bytes()).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0);
    if ok {
        Ok(())
    } else {
        Err(api_error(
            StatusCode::UNAUTHORIZED,
            "admin token required (Authorization: Bearer <contents of <data-dir>/gateway/admin.token>)".into(),
            "unauthorized",
        ))
    }
}

async fn list_devices(State(s): State<Arc<Shared>>) -> Json<DeviceList> {
    Json(DeviceList { devices: s.ingest.devices().iter().map(crate::device_record).collect() })
}

/// Enrol a device (idempotent) and issue it new MQTT credentials, returned only here.
async fn enroll(State(s): State<Arc<Shared>>, _: Admin, Json(e): Json<EnrolRequest>) -> Result<Json<Enrolment>, ApiError> {
    let key: PublicKey = e.public_key.parse().map_err(|err| bad(format!("public_key: {err}")))?;
    if let Some(n) = e.name.as_deref().filter(|n| !crate::mqtt_front::topic_safe(n)) {
        return Err(bad(format!("device name {n:?} cannot be used in MQTT topics (no '/', '+', '#', not 64 hex digits, not \"admin\")")));
    }
    blocking(move || {
        let d = s.ingest.enroll(&key, e.name.as_deref()).map_err(|err| api_error(StatusCode::CONFLICT, err.to_string(), "enroll"))?;
        let c = s.db().map_err(internal)?;
        let mqtt = crate::mqtt_front::issue(&s, &c, &d.id).map_err(internal)?;
        Ok(Json(Enrolment { device: crate::device_record(&d), mqtt }))
    })
    .await
}

async fn revoke(
    State(s): State<Arc<Shared>>,
    _: Admin,
    Path(id): Path<String>,
    Json(r): Json<RevokeRequest>,
) -> Result<Json<DeviceAnswer>, ApiError> {
    let id: DeviceId = id.parse().map_err(|e| bad(format!("device id: {e}")))?;
    // A SQLite write: off the async workers, as every other database call here.
    let s2 = s.clone();
    let d =
        blocking(move || s2.ingest.revoke(&id, &r.reason).map_err(|e| api_error(StatusCode::NOT_FOUND, e.to_string(), "revoke"))).await?;
    // Its MQTT connections are closed now; new ones are refused (the device is revoked).
    s.mqtt_auth.kick(&id);
    Ok(Json(DeviceAnswer { device: crate::device_record(&d) }))
}

async fn actions(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Json<serde_json::Value> {
    let actions = s.actions.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let alerts = s.alerts.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let admin = is_admin(&s, &headers);
    let actions: Vec<serde_json::Value> = actions.iter().map(|a| redact_action(json!(a), admin)).collect();
    Json(json!({ "actions": actions, "alerts": alerts }))
}

/// Whether the request carries the admin token (public routes show more to the admin).
pub(crate) fn is_admin(s: &Shared, headers: &HeaderMap) -> bool {
    require_admin(s, headers).is_ok()
}

/// An outbox entry as an anonymous reader may see it: how it is delivered (`mqtt`,
/// `webhook`, `exec`) but not where to (webhook URL, secret file, program and arguments),
/// and not the address a payment went to. The admin sees everything.
pub(crate) fn redact_action(mut v: serde_json::Value, admin: bool) -> serde_json::Value {
    if admin {
        return v;
    }
    if let Some((kind, detail)) = v["delivery"].as_object().and_then(|o| o.iter().next()).map(|(k, d)| (k.clone(), d.clone())) {
        // A failed attempt's note may name the URL or the program: those parts go too.
        let secrets: Vec<String> = [&detail["url"], &detail["secret_file"], &detail["program"]]
            .into_iter()
            .filter_map(|x| x.as_str().map(String::from))
            .filter(|x| !x.is_empty())
            .collect();
        if let Some(note) = v["note"].as_str() {
            let note = secrets.iter().fold(note.to_string(), |n, x| n.replace(x.as_str(), REDACTED));
            v["note"] = json!(note);
        }
        v["delivery"] = json!({ kind: REDACTED });
    }
    if v["payment"].is_object() {
        v["payment"]["address"] = json!(REDACTED);
    }
    v
}

/// What anonymous readers see in place of a detail only the admin may see.
pub(crate) const REDACTED: &str = "<redacted: admin only>";

async fn presence(State(s): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let p = s.presence.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let devices: serde_json::Map<String, serde_json::Value> =
        p.into_iter().map(|(d, (state, since))| (d, json!({ "state": state, "since_ms": since }))).collect();
    Json(json!({ "devices": devices }))
}

async fn stats(State(s): State<Arc<Shared>>) -> Json<serde_json::Value> {
    Json(json!({ "ingest": s.ingest.stats(), "disk": s.disk.status() }))
}

/// How long an API call waits for the loop that owns the engine or the wallet.
const JOB_TIMEOUT: Duration = Duration::from_secs(30);

/// Rule ids of payment orders: `order-<n>`, reserved for them.
pub const ORDER_PREFIX: &str = "order-";

/// Run `f` on what a loop owns (the actuator engine, the wallet) and wait for the answer.
async fn call<T: 'static, R: Send + 'static>(
    jobs: &mpsc::Sender<Job<T>>,
    what: &str,
    f: impl FnOnce(&mut T) -> R + Send + 'static,
) -> Result<R, ApiError> {
    call_with_timeout(jobs, JOB_TIMEOUT, f)
        .await
        .map_err(|()| api_error(StatusCode::SERVICE_UNAVAILABLE, format!("{what} is not available now; try again"), "unavailable"))
}

/// [`call`], waiting at most `timeout`; `Err` if the loop is gone or busy.
pub(crate) async fn call_with_timeout<T: 'static, R: Send + 'static>(
    jobs: &mpsc::Sender<Job<T>>,
    timeout: Duration,
    f: impl FnOnce(&mut T) -> R + Send + 'static,
) -> Result<R, ()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    jobs.send(Box::new(move |t: &mut T| drop(tx.send(f(t))))).map_err(drop)?;
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(r)) => Ok(r),
        _ => Err(()),
    }
}

fn engine_err(e: EngineError) -> ApiError {
    let (status, code) = match &e {
        EngineError::Rules(_) => (StatusCode::BAD_REQUEST, "invalid_rule"),
        EngineError::RuleExists(_) | EngineError::FileRule(_) => (StatusCode::CONFLICT, "conflict"),
        EngineError::NoSuchRule(_) => (StatusCode::NOT_FOUND, "not_found"),
        _ => return internal(e),
    };
    api_error(status, e.to_string(), code)
}

/// A JSON body, refused with a 400 that says what is wrong.
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| bad(format!("invalid request: {e}")))
}

async fn list_rules(State(s): State<Arc<Shared>>, _: Admin) -> Result<Json<serde_json::Value>, ApiError> {
    let rules = call(&s.actuator_jobs, "the actuator", |e| e.rules()).await?;
    Ok(Json(json!({ "rules": rules })))
}

async fn add_rule(State(s): State<Arc<Shared>>, _: Admin, body: Bytes) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let rule: Rule = json_body(&body)?;
    api_may_add(&s, [Some(&rule.action), rule.revert.as_ref()])?;
    if rule.id.starts_with(ORDER_PREFIX) {
        return Err(bad(format!("rule ids starting with {ORDER_PREFIX:?} are reserved for payment orders")));
    }
    let rule = call(&s.actuator_jobs, "the actuator", move |e| e.add_rule(rule)).await?.map_err(engine_err)?;
    Ok((StatusCode::CREATED, Json(json!({ "rule": rule }))))
}

/// Actions from the API may run a program or read a file only if the configuration's
/// allow-list names it (403 otherwise, saying why): the admin token is not a shell.
fn api_may_add<'a>(s: &Shared, actions: impl IntoIterator<Item = Option<&'a Action>>) -> Result<(), ApiError> {
    for a in actions.into_iter().flatten() {
        s.api_actions.check(a).map_err(|why| api_error(StatusCode::FORBIDDEN, why, "forbidden_action"))?;
    }
    Ok(())
}

async fn remove_rule(State(s): State<Arc<Shared>>, _: Admin, Path(id): Path<String>) -> Result<Json<serde_json::Value>, ApiError> {
    let rule = call(&s.actuator_jobs, "the actuator", move |e| e.remove_rule(&id)).await?.map_err(engine_err)?;
    Ok(Json(json!({ "removed": rule })))
}

/// The gateway wallet's receive descriptor (admin: it names every address orders are paid to).
async fn wallet(State(s): State<Arc<Shared>>, _: Admin) -> Result<Json<serde_json::Value>, ApiError> {
    let descriptor = call(&s.wallet_jobs, "the gateway wallet", |w| w.receive_descriptor()).await?;
    Ok(Json(json!({ "network": s.network.to_core_arg(), "receive_descriptor": descriptor })))
}

async fn lightning(State(s): State<Arc<Shared>>) -> Json<serde_json::Value> {
    Json(crate::lightning::status(&s))
}

/// A Lightning payment order: an invoice for the Lightning rule `rule`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LightningOrder {
    rule: String,
}

fn is_online(s: &Shared, device: &str) -> bool {
    s.presence.lock().unwrap_or_else(|p| p.into_inner()).get(device).is_some_and(|(state, _)| state == "online")
}

async fn lightning_order(s: Arc<Shared>, device: String, o: LightningOrder) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let Some(node) = s.lightning.clone() else {
        return Err(api_error(
            StatusCode::CONFLICT,
            "this gateway runs no Lightning node ([gateway] lightning = true)".into(),
            "no_lightning",
        ));
    };
    let id = o.rule.clone();
    let rule = call(&s.actuator_jobs, "the actuator", move |e| e.lightning_rule(&id)).await?.map_err(engine_err)?;
    if rule.device != device {
        return Err(bad(format!("rule {} is for device {}, not {device}", rule.id, rule.device)));
    }
    let Trigger::Lightning { amount_msat, expiry_secs } = rule.trigger else { return Err(internal("not a Lightning rule")) };
    // No one is asked to pay for a device that cannot act now.
    if !is_online(&s, &device) {
        return Err(api_error(StatusCode::CONFLICT, format!("device {device} is offline"), "offline"));
    }
    let what = format!("bitmote {} {} ({})", device, rule.action.command, rule.id);
    // A held invoice: the gateway makes the preimage and keeps it (durable before the
    // invoice is handed out); the payment is claimed only once the device acknowledged the
    // action, and failed back otherwise (see `lightning::settle`).
    let mut preimage = [0u8; 32];
    getrandom::getrandom(&mut preimage).map_err(internal)?;
    let payment_hash = <bitmote_chain::bitcoin::hashes::sha256::Hash as bitmote_chain::bitcoin::hashes::Hash>::hash(&preimage);
    let payment_hash = bitmote_chain::bitcoin::hashes::Hash::to_byte_array(payment_hash);
    let invoice = blocking(move || {
        let desc = bitmote_pay::ldk_node::lightning_invoice::Description::new(what).map_err(internal)?;
        let desc = bitmote_pay::ldk_node::lightning_invoice::Bolt11InvoiceDescription::Direct(desc);
        let hash = bitmote_pay::ldk_node::lightning_types::payment::PaymentHash(payment_hash);
        node.bolt11_payment().receive_for_hash(amount_msat, &desc, expiry_secs, hash).map_err(internal)
    })
    .await?;
    let hash = crate::lightning::hash_hex(&payment_hash);
    let bolt11 = invoice.to_string();
    let expires_ms = bitmote_chain::now_ms() + expiry_secs as u64 * 1000;
    let (h, b, r, p) = (hash.clone(), bolt11.clone(), rule.clone(), hex::encode(preimage));
    call(&s.actuator_jobs, "the actuator", move |e| e.add_invoice(&r, &h, &b, amount_msat, expires_ms, Some(&p)))
        .await?
        .map_err(engine_err)?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "order_id": format!("{}:ln:{hash}", rule.id), "rule": rule.id, "device": rule.device, "invoice": bolt11,
            "payment_hash": hash, "amount_msat": amount_msat, "expiry_secs": expiry_secs, "expires_ms": expires_ms,
        })),
    ))
}

async fn order(
    State(s): State<Arc<Shared>>,
    _: Admin,
    Path(device): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let v: serde_json::Value = json_body(&body)?;
    if v.get("rule").is_some() {
        return lightning_order(s, device, serde_json::from_value(v).map_err(|e| bad(format!("invalid request: {e}")))?).await;
    }
    let o: OrderRequest = serde_json::from_value(v).map_err(|e| bad(format!("invalid request: {e}")))?;
    api_may_add(&s, [Some(&o.action), o.revert.as_ref()])?;
    // Check everything but the address before taking one from the wallet.
    let placeholder = Address::p2wsh(&ScriptBuf::new(), s.network).to_string();
    o.rule(format!("{ORDER_PREFIX}0"), &device, placeholder).check(s.network).map_err(|e| bad(e.to_string()))?;
    // No one is asked to pay for a device that cannot act now.
    if !is_online(&s, &device) {
        return Err(api_error(StatusCode::CONFLICT, format!("device {device} is offline"), "offline"));
    }
    let address = call(&s.wallet_jobs, "the gateway wallet", |w| w.new_address()).await?.map_err(internal)?.to_string();
    let (min_sat, a) = (o.min_sat, address.clone());
    let rule = call(&s.actuator_jobs, "the actuator", move |e| e.add_rule_with(|n| o.rule(format!("{ORDER_PREFIX}{n}"), &device, a)))
        .await?
        .map_err(engine_err)?;
    let confirmations = rule.trigger.confirmations();
    Ok((
        StatusCode::CREATED,
        Json(
            serde_json::to_value(PaymentOrder { order_id: rule.id, device: rule.device, address, amount: min_sat, confirmations })
                .map_err(internal)?,
        ),
    ))
}

#[cfg(test)]
mod tests {
    /// The OpenAPI description names every route of the router.
    #[test]
    fn every_route_is_in_the_openapi_description() {
        let spec: serde_json::Value = serde_json::from_str(include_str!("openapi.json")).expect("openapi.json is JSON");
        let routes: Vec<&str> = include_str!("http.rs").split(".route(\"").skip(1).filter_map(|r| r.split('"').next()).collect();
        assert!(routes.len() > 20, "{routes:?}");
        for r in routes {
            assert!(spec["paths"][r].is_object(), "{r} is missing from openapi.json");
        }
    }
}
