//! The simulated sensor (`bitmote device sensor`): signs plausible temperature readings
//! (one signature each, or batches) and sends them over MQTT or HTTP, waiting for each
//! receipt before it moves its sequence number on. What it is told back is typed
//! ([`bitmote_proto::Receipts`], [`bitmote_proto::ErrorBody`]): it branches on error codes,
//! never on message text.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bitmote_chain::now_ms;
use bitmote_device::reading::{sensor, unit};
use bitmote_device::{Reading, SignedBatch, SignedReading, Value};
use bitmote_proto::client::{ClientError, Gateway};
use bitmote_proto::{topic, ErrorBody, Receipts};

use crate::keys::{read_key, refused_login, seq_file};

/// How a sensor reaches the gateway.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    Mqtt,
    Http,
}

/// What the sensor does.
pub struct SensorOptions<'a> {
    /// The gateway's HTTP API (for `Transport::Http`).
    pub gateway: &'a Gateway,
    pub key: &'a Path,
    pub transport: Transport,
    /// The MQTT broker, `host:port`.
    pub mqtt: &'a str,
    pub password: Option<String>,
    pub interval: Duration,
    /// Readings per signed batch (1 = one signature per reading).
    pub batch: usize,
    /// Stop after this many readings (None: until stopped).
    pub count: Option<u64>,
    /// Set by Ctrl-C / SIGTERM: the sensor stops between sends.
    pub stop: Arc<AtomicBool>,
}

/// Why a send did not end in a receipt.
#[derive(Debug)]
enum SendError {
    /// The gateway refused the readings for good (a 4xx answer, or an error on the errors topic).
    Refused(ErrorBody),
    /// The gateway already has readings up to `last` (this device lost its counter).
    Replayed { last: u64 },
    /// Nothing was stored, for a reason that passes: send the same readings again.
    Transient(String),
    /// The broker refused the device's login.
    Login(String),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Refused(b) => write!(f, "refused ({}): {}", b.code, b.error),
            SendError::Replayed { last } => write!(f, "the gateway already has readings up to seq {last}"),
            SendError::Transient(why) => write!(f, "{why}"),
            SendError::Login(why) => write!(f, "refused: {why}"),
        }
    }
}

/// What an error body means to a sender.
fn classify(body: ErrorBody) -> SendError {
    match body.last_seq {
        Some(last) if body.code == "replay" => SendError::Replayed { last },
        _ if body.is_transient() => SendError::Transient(format!("not stored for now ({}): {}", body.code, body.error)),
        _ => SendError::Refused(body),
    }
}

fn http_send(gw: &Gateway, payload: &[u8]) -> Result<Receipts, SendError> {
    gw.post_readings(payload).map_err(|e| match e {
        ClientError::Status { status, body } if (400..500).contains(&status) => classify(body),
        ClientError::Status { body, .. } if body.code == "replay" => classify(body),
        other => SendError::Transient(other.to_string()),
    })
}

/// Run the sensor until `count` readings are stored or it is stopped.
pub fn run(o: SensorOptions) -> Result<()> {
    let k = read_key(o.key)?;
    let id = k.public_key().device_id();
    let mut seq: u64 = std::fs::read_to_string(seq_file(o.key)).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(1);
    let mut sent = 0u64;
    // A plausible temperature: daily swing plus noise from a cheap PRNG.
    let mut x: u64 = u64::from_le_bytes(id.0[..8].try_into().expect("8 bytes")) | 1;
    let mut next_reading = |seq: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let t = now_ms();
        let day = ((t / 1000) % 86_400) as f64 / 86_400.0 * std::f64::consts::TAU;
        let centi = 2000.0 + 400.0 * day.sin() + ((x % 100) as f64 - 50.0);
        Reading {
            device: id,
            seq,
            timestamp_ms: t,
            sensor: sensor::TEMPERATURE,
            unit: unit::CELSIUS,
            value: Value::Scaled { mantissa: centi as i64, exponent: -2 },
        }
    };
    let mut link = match o.transport {
        Transport::Mqtt => Some(MqttLink::connect(o.mqtt, &id.to_string(), o.password.clone())?),
        Transport::Http => None,
    };
    eprintln!("sensor {id} sending over {:?} from seq {seq}", o.transport);
    let stop = &o.stop;
    // Ctrl-C / SIGTERM stop between sends, never between a receipt and its sequence number.
    while o.count.is_none_or(|c| sent < c) && !stop.load(Ordering::SeqCst) {
        let n = match o.count {
            Some(c) => o.batch.min((c - sent) as usize),
            None => o.batch,
        };
        let readings: Vec<Reading> = (0..n as u64).map(|i| next_reading(seq + i)).collect();
        let payload = if n == 1 {
            SignedReading::sign(&k, readings[0].clone()).map_err(|e| anyhow::anyhow!("{e}"))?.encode()
        } else {
            SignedBatch::sign(&k, readings).map_err(|e| anyhow::anyhow!("{e}"))?.encode()
        };
        // Send until a receipt arrives: resending a stored reading is acknowledged again.
        let mut skip_to = None;
        let receipts = loop {
            let r = match &mut link {
                Some(l) => l.send(&payload),
                None => http_send(o.gateway, &payload),
            };
            match r {
                Ok(v) => break Some(v),
                // Killed after a receipt but before saving the sequence number: go on after
                // the last one the gateway accepted (the readings are new, with new numbers).
                Err(SendError::Replayed { last }) if last >= seq => {
                    eprintln!("the gateway already has readings up to seq {last}; going on from {}", last + 1);
                    skip_to = Some(last + 1);
                    break None;
                }
                Err(e @ (SendError::Refused(_) | SendError::Login(_) | SendError::Replayed { .. })) => anyhow::bail!("{e}"),
                Err(SendError::Transient(e)) => {
                    // Stopped while the gateway does not answer (`up` killed: its fleet gets
                    // SIGTERM): nothing was acknowledged, so nothing is lost; the next start
                    // sends these readings again, with the same sequence numbers.
                    if stop.load(Ordering::SeqCst) {
                        eprintln!("stopped while the gateway does not answer ({e}); seq {seq} is sent again at the next start");
                        return Ok(());
                    }
                    eprintln!("send failed ({e}); retrying");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        };
        if let Some(next) = skip_to.take() {
            seq = next;
            bitmote_chain::stream::write_atomic(&seq_file(o.key), seq.to_string().as_bytes())?;
            continue;
        }
        seq += n as u64;
        sent += n as u64;
        bitmote_chain::stream::write_atomic(&seq_file(o.key), seq.to_string().as_bytes())?;
        let last = receipts.as_ref().and_then(|r| r.receipts.get(n - 1)).context("the gateway sent fewer receipts than readings")?;
        println!("{}", serde_json::json!({ "seq": seq - 1, "reading_id": hex::encode(last.reading_id), "leaf_index": last.leaf_index }));
        std::thread::sleep(o.interval);
    }
    Ok(())
}

/// What arrives on the device's own topics.
enum Inbox {
    Receipts(Receipts),
    Error(ErrorBody),
    Malformed(String),
    LoginRefused(String),
}

/// A device's MQTT session: publish on its readings topic, wait for its receipt.
struct MqttLink {
    client: rumqttc::Client,
    rx: std::sync::mpsc::Receiver<Inbox>,
    device: String,
}

impl MqttLink {
    fn connect(addr: &str, device: &str, password: Option<String>) -> Result<Self> {
        let (host, port) = addr.rsplit_once(':').context("--mqtt must be host:port")?;
        let mut opts = rumqttc::MqttOptions::new(format!("bitmote-{}", &device[..16]), host, port.parse().context("MQTT port")?);
        if let Some(p) = password {
            opts.set_credentials(device, p);
        }
        opts.set_keep_alive(Duration::from_secs(10));
        opts.set_clean_session(false);
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut conn) = bitmote_proto::client::mqtt_client(opts, 64);
        let (tx, rx) = std::sync::mpsc::channel();
        let (receipts, errors) = (topic::receipts(device), topic::errors(device));
        let (r2, e2) = (receipts.clone(), errors.clone());
        std::thread::spawn(move || {
            for ev in conn.iter() {
                let msg = match ev {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) if p.topic == r2 => {
                        bitmote_proto::decode(&p.payload).map(Inbox::Receipts).unwrap_or_else(|e| Inbox::Malformed(e.to_string()))
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) if p.topic == e2 => {
                        bitmote_proto::decode(&p.payload).map(Inbox::Error).unwrap_or_else(|e| Inbox::Malformed(e.to_string()))
                    }
                    Ok(_) => continue,
                    Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                        let _ = tx.send(Inbox::LoginRefused(refused_login(code)));
                        return;
                    }
                    Err(e) => {
                        eprintln!("mqtt: {e}; reconnecting");
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                };
                if tx.send(msg).is_err() {
                    return;
                }
            }
        });
        client.subscribe(receipts, rumqttc::QoS::AtLeastOnce)?;
        client.subscribe(errors, rumqttc::QoS::AtLeastOnce)?;
        Ok(MqttLink { client, rx, device: device.to_string() })
    }

    fn send(&mut self, payload: &[u8]) -> Result<Receipts, SendError> {
        self.client
            .publish(topic::readings(&self.device), rumqttc::QoS::AtLeastOnce, false, payload.to_vec())
            .map_err(|e| SendError::Transient(format!("publishing: {e}")))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(Inbox::Receipts(r)) => return Ok(r),
                Ok(Inbox::Error(body)) => return Err(classify(body)),
                Ok(Inbox::Malformed(e)) => eprintln!("ignoring a malformed message from the gateway: {e}"),
                Ok(Inbox::LoginRefused(why)) => return Err(SendError::Login(why)),
                Err(_) => return Err(SendError::Transient("no receipt within 10 s".into())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_decide_what_a_sensor_does() {
        let mut replay = ErrorBody::new("replayed", "replay");
        replay.last_seq = Some(41);
        assert!(matches!(classify(replay), SendError::Replayed { last: 41 }));
        assert!(matches!(classify(ErrorBody::new("full", "disk_full")), SendError::Transient(_)));
        assert!(matches!(classify(ErrorBody::new("stopping", "shutting_down")), SendError::Transient(_)));
        assert!(matches!(classify(ErrorBody::new("bad", "bad_signature")), SendError::Refused(_)));
        // A replay refusal without the number (an older gateway) is a refusal, not a guess.
        assert!(matches!(classify(ErrorBody::new("replayed", "replay")), SendError::Refused(_)));
    }
}
