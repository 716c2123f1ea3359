//! Prometheus metrics at `GET /metrics` (text exposition format 0.0.4), and the
//! middleware that counts HTTP requests for them.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bitmote_notary::anchor::AnchorState;

use crate::Shared;

/// What `/metrics` reports, gathered from the gateway.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub readings_ingested: u64,
    pub readings_rejected: BTreeMap<String, u64>,
    pub log_size: u64,
    pub anchors_pending: u64,
    pub anchors_confirmed: u64,
    pub anchors_abandoned: u64,
    /// Block height of the highest confirmed anchor.
    pub anchor_confirmed_height: Option<u32>,
    pub chain_height: u32,
    pub devices: u64,
    pub devices_revoked: u64,
    pub devices_online: u64,
    pub actions: BTreeMap<String, u64>,
    pub http_requests: BTreeMap<u16, u64>,
    /// MQTT logins refused and connections closed for a foreign topic.
    pub mqtt_refused_logins: u64,
    pub mqtt_refused_topics: u64,
}

/// States of the action log, reported even when no action is in them.
const ACTION_STATES: [&str; 6] = ["due", "delivered", "acked", "expired", "cancelled", "reverted"];

impl Snapshot {
    pub fn gather(s: &Shared) -> Snapshot {
        let stats = s.ingest.stats();
        let log_size = s.ingest.head().map(|(size, _)| size).unwrap_or(0);
        let mut m = Snapshot {
            readings_ingested: stats.accepted,
            readings_rejected: stats.rejected.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            log_size,
            chain_height: *s.tip_height.lock().unwrap_or_else(|p| p.into_inner()),
            ..Default::default()
        };
        for a in s.anchors.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            match a.state {
                AnchorState::Pending => m.anchors_pending += 1,
                AnchorState::Confirmed => {
                    m.anchors_confirmed += 1;
                    m.anchor_confirmed_height = m.anchor_confirmed_height.max(a.block_height);
                }
                AnchorState::Abandoned => m.anchors_abandoned += 1,
            }
        }
        for d in s.ingest.devices() {
            m.devices += 1;
            m.devices_revoked += u64::from(d.revoked_ms.is_some());
        }
        m.devices_online = s.presence.lock().unwrap_or_else(|p| p.into_inner()).values().filter(|(st, _)| st == "online").count() as u64;
        m.actions = ACTION_STATES.iter().map(|st| (st.to_string(), 0)).collect();
        for a in s.actions.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            if let Ok(serde_json::Value::String(st)) = serde_json::to_value(a.state) {
                *m.actions.entry(st).or_default() += 1;
            }
        }
        m.http_requests = s.http_requests.lock().unwrap_or_else(|p| p.into_inner()).clone();
        m.mqtt_refused_logins = s.mqtt_auth.refused_logins.load(std::sync::atomic::Ordering::Relaxed);
        m.mqtt_refused_topics = s.mqtt_auth.refused_topics.load(std::sync::atomic::Ordering::Relaxed);
        m
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
            let _ = writeln!(out, "# HELP bitmote_{name} {}", help.replace('\\', "\\\\").replace('\n', "\\n"));
            let _ = writeln!(out, "# TYPE bitmote_{name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(out, "bitmote_{name}{labels} {v}");
            }
        };
        let one = |v: u64| vec![(String::new(), v as f64)];
        let by = |label: &str, m: Vec<(String, u64)>| {
            m.into_iter().map(|(k, v)| (format!("{{{label}=\"{}\"}}", escape(&k)), v as f64)).collect()
        };
        family("readings_ingested_total", "counter", "Readings made durable since the gateway started.", one(self.readings_ingested));
        family(
            "readings_rejected_total",
            "counter",
            "Refused submissions since the gateway started, by reason.",
            by("code", self.readings_rejected.clone().into_iter().collect()),
        );
        family("log_size", "gauge", "Readings in the Merkle log (its tree size).", one(self.log_size));
        let states = [("pending", self.anchors_pending), ("confirmed", self.anchors_confirmed), ("abandoned", self.anchors_abandoned)];
        family("anchors", "gauge", "Anchor transactions by state.", by("state", states.map(|(k, v)| (k.to_string(), v)).to_vec()));
        if let Some(h) = self.anchor_confirmed_height {
            family("anchor_confirmed_height", "gauge", "Block height of the highest confirmed anchor.", one(h.into()));
        }
        family("chain_height", "gauge", "Height of the chain tip the anchoring loop last saw.", one(self.chain_height.into()));
        family("devices", "gauge", "Enrolled devices (revoked ones included).", one(self.devices));
        family("devices_revoked", "gauge", "Devices whose key is revoked.", one(self.devices_revoked));
        family("devices_online", "gauge", "Devices whose last MQTT presence is online.", one(self.devices_online));
        family(
            "actions",
            "gauge",
            "Actuator actions in the action log, by state.",
            by("state", self.actions.clone().into_iter().collect()),
        );
        let http = self.http_requests.iter().map(|(c, n)| (c.to_string(), *n)).collect();
        family("http_requests_total", "counter", "HTTP requests answered, by status code.", by("code", http));
        let refused = vec![("login".to_string(), self.mqtt_refused_logins), ("topic".to_string(), self.mqtt_refused_topics)];
        family(
            "mqtt_refused_total",
            "counter",
            "MQTT logins refused and connections closed for a foreign topic, since the gateway started.",
            by("reason", refused),
        );
        out
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

pub async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    let text = tokio::task::spawn_blocking(move || Snapshot::gather(&s).render()).await.unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

/// Count each answered request by its status code.
pub async fn count_requests(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let res = next.run(req).await;
    *s.http_requests.lock().unwrap_or_else(|p| p.into_inner()).entry(res.status().as_u16()).or_default() += 1;
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_exposition_format() {
        let s = Snapshot {
            readings_ingested: 42,
            readings_rejected: [("bad_signature".to_string(), 2)].into(),
            log_size: 40,
            anchors_pending: 1,
            anchors_confirmed: 3,
            anchor_confirmed_height: Some(205),
            chain_height: 207,
            devices: 5,
            devices_revoked: 1,
            devices_online: 2,
            actions: [("acked".to_string(), 4), ("weird \"state\"\n".to_string(), 1)].into(),
            http_requests: [(200, 10), (404, 1)].into(),
            ..Default::default()
        };
        let text = s.render();
        for line in [
            "# HELP bitmote_readings_ingested_total Readings made durable since the gateway started.",
            "# TYPE bitmote_readings_ingested_total counter",
            "bitmote_readings_ingested_total 42",
            "bitmote_readings_rejected_total{code=\"bad_signature\"} 2",
            "# TYPE bitmote_log_size gauge",
            "bitmote_log_size 40",
            "bitmote_anchors{state=\"pending\"} 1",
            "bitmote_anchors{state=\"confirmed\"} 3",
            "bitmote_anchors{state=\"abandoned\"} 0",
            "bitmote_anchor_confirmed_height 205",
            "bitmote_chain_height 207",
            "bitmote_devices 5",
            "bitmote_devices_revoked 1",
            "bitmote_devices_online 2",
            "bitmote_actions{state=\"acked\"} 4",
            "bitmote_actions{state=\"weird \\\"state\\\"\\n\"} 1",
            "bitmote_http_requests_total{code=\"200\"} 10",
            "bitmote_http_requests_total{code=\"404\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        // Every sample belongs to a family declared just before it, and the text ends with a newline.
        let mut declared = None;
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                declared = rest.split(' ').next();
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap();
                assert_eq!(Some(name), declared, "{l}");
            }
        }
        assert!(text.ends_with('\n'));
        // No confirmed anchor: no height rather than a made-up 0.
        assert!(!Snapshot::default().render().contains("anchor_confirmed_height"));
    }
}
