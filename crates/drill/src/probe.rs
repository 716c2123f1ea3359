//! The drill's own device: it signs readings and posts them over HTTP, as any device may,
//! and keeps every receipt it got. A receipt is the gateway's promise that the reading is
//! durable (invariant I1 checks the promise). A reading not acknowledged is sent again,
//! byte for byte, until it is: the gateway acknowledges a stored reading again.

use std::time::Duration;

use bitmote_device::reading::{sensor, unit};
use bitmote_device::{Reading, SignedReading, SigningKey, Value};
use serde::Deserialize;

use crate::system::System;
use crate::DrillError;

#[derive(Debug, Clone, Deserialize)]
pub struct Receipt {
    pub reading_id: String,
    pub leaf_index: u64,
}

#[derive(Deserialize)]
struct Receipts {
    receipts: Vec<Receipt>,
}

/// A receipt and when (which round) it was received.
#[derive(Debug, Clone)]
pub struct Acked {
    pub receipt: Receipt,
    pub round: u32,
    /// Acknowledged while the drill had the node down.
    pub during_outage: bool,
}

pub struct Probe {
    key: SigningKey,
    seq: u64,
    /// Signed and sent, not yet acknowledged: sent again as is.
    pending: Option<Vec<u8>>,
    pub acked: Vec<Acked>,
    /// Sends that got no receipt (refused or unreachable), by round.
    pub unacked_attempts: u64,
}

impl Probe {
    /// A fresh key, enrolled through the admin API as `drill-probe`.
    pub fn enroll(sys: &System) -> Result<Probe, DrillError> {
        let key = SigningKey::generate_schnorr().map_err(|e| DrillError::Setup(format!("making the probe's key: {e}")))?;
        let body = serde_json::json!({ "public_key": key.public_key().to_string(), "name": "drill-probe" });
        sys.post("/v1/devices", "application/json", body.to_string().as_bytes())?;
        Ok(Probe { key, seq: 1, pending: None, acked: vec![], unacked_attempts: 0 })
    }

    /// Send one reading (or the pending one again). Ok(true) when acknowledged.
    pub fn send(&mut self, sys: &System, round: u32, during_outage: bool) -> Result<bool, DrillError> {
        let payload = match &self.pending {
            Some(p) => p.clone(),
            None => {
                let r = Reading {
                    device: self.key.public_key().device_id(),
                    seq: self.seq,
                    timestamp_ms: bitmote_chain::now_ms(),
                    sensor: sensor::TEMPERATURE,
                    unit: unit::CELSIUS,
                    value: Value::Scaled { mantissa: 2000 + (self.seq % 100) as i64, exponent: -2 },
                };
                let p = SignedReading::sign(&self.key, r).map_err(|e| DrillError::Setup(format!("signing: {e}")))?.encode();
                self.pending = Some(p.clone());
                p
            }
        };
        match sys.post("/v1/readings", "application/octet-stream", &payload) {
            Ok(v) => {
                let r: Receipts = serde_json::from_value(v).map_err(|e| DrillError::Http(format!("a receipt that does not parse: {e}")))?;
                let Some(receipt) = r.receipts.into_iter().next() else {
                    return Err(DrillError::Http("an answer with no receipt".into()));
                };
                self.acked.push(Acked { receipt, round, during_outage });
                self.pending = None;
                self.seq += 1;
                Ok(true)
            }
            Err(e) => {
                self.unacked_attempts += 1;
                tracing::debug!("probe: no receipt ({e})");
                Ok(false)
            }
        }
    }

    /// Send until acknowledged or `timeout`; Ok(true) when acknowledged.
    pub fn send_within(&mut self, sys: &System, round: u32, during_outage: bool, timeout: Duration) -> Result<bool, DrillError> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if self.send(sys, round, during_outage)? {
                return Ok(true);
            }
            if std::time::Instant::now() > deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}
