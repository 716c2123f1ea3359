//! The live dashboard: a static page (`/`, `/dashboard.js`, `/dashboard.css`, embedded in
//! the binary) that polls `GET /v1/dashboard` (notary, anchors, devices, actuators in one
//! answer) and `GET /v1/pay` (the `/v1/status` of each configured Lightning meter and
//! provider) every second.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use bitmote_notary::anchor::AnchorInfo;
use bitmote_notary::log::MerkleLog;
use serde_json::{json, Value};

use crate::http::{blocking, call_with_timeout, internal, ApiError};
use crate::Shared;

/// How long `/v1/pay` waits for each status URL.
pub const PAY_TIMEOUT: Duration = Duration::from_secs(2);
/// Anchors and actions the dashboard shows (the newest).
const SHOWN: usize = 20;

pub async fn page() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], include_str!("dashboard/index.html"))
}

pub async fn script() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], include_str!("dashboard/dashboard.js"))
}

pub async fn style() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], include_str!("dashboard/dashboard.css"))
}

/// Everything the page shows but the Lightning part, in one answer.
pub async fn dashboard(State(s): State<Arc<Shared>>, headers: axum::http::HeaderMap) -> Result<Json<Value>, ApiError> {
    // Anonymous readers do not see where actions are delivered or what addresses are paid.
    let admin = crate::http::is_admin(&s, &headers);
    // Rules live in the actuator loop; the page goes on without them if it is busy.
    let rules = call_with_timeout(&s.actuator_jobs, Duration::from_secs(2), |e| e.rules()).await.ok();
    let rules: Option<Vec<Value>> = rules.map(|rules| {
        rules
            .into_iter()
            .map(|r| {
                let delivery = if r.rule.action.webhook.is_some() {
                    "webhook"
                } else if r.rule.action.exec.is_some() {
                    "exec"
                } else {
                    "mqtt"
                };
                let mut trigger = json!(r.rule.trigger);
                if !admin && trigger.get("address").is_some() {
                    trigger["address"] = json!(crate::http::REDACTED);
                }
                json!({ "id": r.rule.id, "device": r.rule.device, "trigger": trigger,
                        "command": r.rule.action.command, "delivery": delivery, "source": r.source })
            })
            .collect()
    });
    blocking(move || {
        let c = s.db().map_err(internal)?;
        let log = MerkleLog::new(&c);
        let size = log.size().map_err(internal)?;
        let root = log.root_at(size).map_err(internal)?;
        // Newest first (as listed by the anchorer), like the actions and alerts below.
        let anchors: Vec<AnchorInfo> = s.anchors.lock().unwrap_or_else(|p| p.into_inner()).iter().take(SHOWN).cloned().collect();
        // Each anchor with the last reading it covers, whose proof and .ots the page links to.
        let anchors: Vec<Value> = anchors
            .into_iter()
            .map(|a| {
                let id = a.tree_size.checked_sub(1).and_then(|i| bitmote_notary::ingest::reading_id_at(&c, i).ok().flatten());
                let mut v = json!(a);
                v["reading_id"] = json!(id.map(hex::encode));
                v
            })
            .collect();
        // Enrolled devices with their presence, then devices known only by presence (actuators).
        let mut presence = s.presence.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let presence_json = |(state, since): (String, u64)| json!({ "state": state, "since_ms": since });
        let mut devices: Vec<Value> = s
            .ingest
            .devices()
            .into_iter()
            .map(|d| {
                let p = presence.remove(&d.name).or_else(|| presence.remove(&d.id.to_string()));
                let mut v = json!(d);
                v["presence"] = json!(p.map(presence_json));
                v
            })
            .collect();
        devices.extend(presence.into_iter().map(|(name, p)| json!({ "name": name, "presence": presence_json(p) })));
        let actions: Vec<Value> = s
            .actions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .rev()
            .take(SHOWN)
            .map(|a| crate::http::redact_action(json!(a), admin))
            .collect();
        let alerts: Vec<_> = s.alerts.lock().unwrap_or_else(|p| p.into_inner()).iter().rev().take(SHOWN).cloned().collect();
        Ok(Json(json!({
            "now_ms": bitmote_chain::now_ms(),
            "log": { "tree_size": size, "root": hex::encode(root), "checkpoint": s.signer.sign(size, root) },
            "ingest": s.ingest.stats(),
            "disk": s.disk.status(),
            "anchors": {
                "status": *s.anchor_status.lock().unwrap_or_else(|p| p.into_inner()),
                "node": *s.node_status.lock().unwrap_or_else(|p| p.into_inner()),
                "tip_height": *s.tip_height.lock().unwrap_or_else(|p| p.into_inner()),
                "anchors": anchors,
            },
            "devices": devices,
            "rules": rules,
            "actions": actions,
            "alerts": alerts,
            "lightning": crate::lightning::status(&s),
        })))
    })
    .await
}

/// `url`'s status endpoint: `url` itself if it names one, else `<url>/v1/status`.
fn status_url(url: &str) -> String {
    let u = url.trim_end_matches('/');
    if u.ends_with("/v1/status") {
        u.to_string()
    } else {
        format!("{u}/v1/status")
    }
}

fn fetch_status(url: &str) -> Result<Value, String> {
    let agent = ureq::AgentBuilder::new().timeout(PAY_TIMEOUT).build();
    let res = agent.get(url).call().map_err(|e| e.to_string())?;
    res.into_json().map_err(|e| format!("{url}: not a JSON status: {e}"))
}

/// The status of each URL, fetched at once; a URL that fails has `error` instead of `status`.
pub async fn pay_sources(urls: &[String]) -> Value {
    let tasks: Vec<_> = urls
        .iter()
        .map(|u| {
            let u = status_url(u);
            tokio::task::spawn_blocking(move || fetch_status(&u))
        })
        .collect();
    let mut sources = vec![];
    for (url, task) in urls.iter().zip(tasks) {
        sources.push(match task.await.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok(status) => json!({ "url": url, "status": status }),
            Err(error) => json!({ "url": url, "error": error }),
        });
    }
    json!({ "sources": sources })
}

pub async fn pay(State(s): State<Arc<Shared>>) -> Json<Value> {
    Json(pay_sources(&s.pay_status_urls).await)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;

    #[tokio::test]
    async fn pay_status_is_fetched_per_url_and_errors_stay_per_url() {
        // A stand-in meter: a real HTTP server with the meter's status shape.
        let meter = json!({
            "role": "meter", "power_w": 1500, "register_mwh": 2500,
            "node": { "node_id": "02ab", "onchain_sat": 100000, "lightning_sat": 49000, "channels": [] },
            "sessions": [{ "id": "s1", "tariff": { "price_msat_per_wh": 200, "tick_ms": 2000, "mode": "prepaid" },
                           "state": "open", "supply": true, "account": { "ticks": 3, "register_mwh": 2500, "paid_msat": 700 },
                           "energy_wh": 2.5, "due_msat": 500, "credit_msat": 200, "late": 0, "short": 0, "refused_msat": 0 }],
        });
        let body = meter.clone();
        let app = axum::Router::new()
            .route("/v1/status", get(move || async move { Json(body) }))
            .route("/broken/v1/status", get(|| async { "not json" }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        // A port nobody listens on.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();

        let urls = vec![
            format!("http://{addr}"),
            format!("http://{addr}/v1/status/"),
            format!("http://{closed}"),
            format!("http://{addr}/broken"),
            format!("http://{addr}/missing"),
        ];
        let v = pay_sources(&urls).await;
        let s = v["sources"].as_array().unwrap();
        assert_eq!(s.len(), 5, "{v}");
        for (i, src) in s.iter().enumerate() {
            assert_eq!(src["url"], urls[i]);
        }
        assert_eq!(s[0]["status"], meter);
        assert_eq!(s[1]["status"]["sessions"][0]["account"]["paid_msat"], 700);
        assert!(s[2]["error"].as_str().unwrap().contains("Connection refused"), "{}", s[2]);
        assert!(s[3]["error"].as_str().unwrap().contains("not a JSON status"), "{}", s[3]);
        assert!(s[4]["error"].as_str().unwrap().contains("404"), "{}", s[4]);
        assert!(s[2..].iter().all(|x| x.get("status").is_none()));
        assert_eq!(pay_sources(&[]).await, json!({ "sources": [] }));
    }
}
