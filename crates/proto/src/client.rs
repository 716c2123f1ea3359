//! A blocking client of the gateway's HTTP API (feature `client`): the requests the CLI
//! and the simulated fleet make, each with its typed answer, and one error type whose
//! variants a caller can branch on (an HTTP status with the gateway's [`ErrorBody`], or no
//! answer at all) — never the message text.

use std::path::Path;
use std::time::Duration;

use crate::notary::{DeviceAnswer, DeviceList, EnrolRequest, Enrolment, RevokeRequest};
use crate::{ErrorBody, Receipts};

/// Why a request to the gateway failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum ClientError {
    /// The gateway answered with an error status and (usually) a body saying why.
    Status { status: u16, body: ErrorBody },
    /// No answer: refused, timed out, reset.
    Unreachable(Box<ureq::Transport>),
    /// An answer that is not the message expected.
    Decode(std::io::Error),
    /// The admin token could not be read.
    Token { path: std::path::PathBuf, source: std::io::Error },
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Status { status, body } => {
                let msg = if body.error.is_empty() { "(no message)" } else { body.error.as_str() };
                write!(f, "gateway answered {status}: {msg}")
            }
            ClientError::Unreachable(t) => write!(f, "cannot reach the gateway: {t}"),
            ClientError::Decode(e) => write!(f, "unexpected answer from the gateway: {e}"),
            ClientError::Token { path, source } => {
                write!(f, "reading the admin token {} (is this the gateway's data dir?): {source}", path.display())
            }
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Unreachable(t) => Some(t.as_ref()),
            ClientError::Decode(e) | ClientError::Token { source: e, .. } => Some(e),
            ClientError::Status { .. } => None,
        }
    }
}

impl ClientError {
    /// The HTTP status, when the gateway answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The gateway's error body, when it answered with one.
    pub fn body(&self) -> Option<&ErrorBody> {
        match self {
            ClientError::Status { body, .. } => Some(body),
            _ => None,
        }
    }
}

impl From<ureq::Error> for ClientError {
    fn from(e: ureq::Error) -> Self {
        match e {
            ureq::Error::Status(status, r) => {
                let body = r.into_json::<ErrorBody>().unwrap_or_else(|_| ErrorBody::new("", ""));
                ClientError::Status { status, body }
            }
            ureq::Error::Transport(t) => ClientError::Unreachable(Box::new(t)),
        }
    }
}

/// The gateway's HTTP API at one base URL, optionally with its admin token.
#[derive(Clone)]
pub struct Gateway {
    url: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").field("url", &self.url).field("admin", &self.token.is_some()).finish()
    }
}

impl Gateway {
    /// The API at `url` (`http://127.0.0.1:8650`), requests timing out after 40 s.
    pub fn new(url: &str) -> Gateway {
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(40)).build();
        Gateway { url: url.trim_end_matches('/').to_string(), token: None, agent }
    }

    /// With the admin token read from `path` (the gateway's `admin.token`).
    pub fn with_token_file(self, path: &Path) -> Result<Gateway, ClientError> {
        let token = std::fs::read_to_string(path).map_err(|source| ClientError::Token { path: path.to_path_buf(), source })?;
        Ok(Gateway { token: Some(token.trim().to_string()), ..self })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// A request to `path` (starting with `/`), with the admin token if there is one.
    pub fn request(&self, method: &str, path: &str) -> ureq::Request {
        let r = self.agent.request(method, &format!("{}{path}", self.url));
        match &self.token {
            Some(t) => r.set("Authorization", &format!("Bearer {t}")),
            None => r,
        }
    }

    fn answer<T: serde::de::DeserializeOwned>(r: Result<ureq::Response, ureq::Error>) -> Result<T, ClientError> {
        r?.into_json().map_err(ClientError::Decode)
    }

    /// `GET path`, decoded as `T`.
    pub fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        Self::answer(self.request("GET", path).call())
    }

    /// `POST path` with a JSON body, the answer decoded as `T`.
    pub fn post<B: serde::Serialize, T: serde::de::DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, ClientError> {
        Self::answer(self.request("POST", path).send_json(body))
    }

    /// `DELETE path`; the answer is not read.
    pub fn delete(&self, path: &str) -> Result<(), ClientError> {
        self.request("DELETE", path).call()?;
        Ok(())
    }

    /// Enrol a device key (admin): its record and new MQTT login.
    pub fn enroll(&self, public_key: &str, name: Option<&str>) -> Result<Enrolment, ClientError> {
        self.post("/v1/devices", &EnrolRequest { public_key: public_key.to_string(), name: name.map(str::to_string) })
    }

    /// Revoke a device (admin).
    pub fn revoke(&self, device_id: &str, reason: &str) -> Result<DeviceAnswer, ClientError> {
        self.post(&format!("/v1/devices/{device_id}/revoke"), &RevokeRequest { reason: reason.to_string() })
    }

    /// The enrolled devices.
    pub fn devices(&self) -> Result<DeviceList, ClientError> {
        self.get("/v1/devices")
    }

    /// Submit a signed reading or batch (its binary wire encoding).
    pub fn post_readings(&self, payload: &[u8]) -> Result<Receipts, ClientError> {
        Self::answer(self.request("POST", "/v1/readings").set("Content-Type", "application/octet-stream").send_bytes(payload))
    }

    /// The log's identity and head (`GET /v1/log`).
    pub fn log(&self) -> Result<crate::notary::LogInfo, ClientError> {
        self.get("/v1/log")
    }
}

/// An MQTT client whose TCP connection sends at once (`TCP_NODELAY`). With Nagle's
/// algorithm on, a device that answers a command with PUBACK then its own PUBLISH
/// waits ~40 ms for the broker's delayed ACK before the second packet leaves; every
/// bitmote client (gateway bridge, devices, benches) goes through here.
pub fn mqtt_client(opts: rumqttc::MqttOptions, cap: usize) -> (rumqttc::Client, rumqttc::Connection) {
    let (client, mut conn) = rumqttc::Client::new(opts, cap);
    let mut net = conn.eventloop.network_options();
    net.set_tcp_nodelay(true);
    conn.eventloop.set_network_options(net);
    (client, conn)
}
