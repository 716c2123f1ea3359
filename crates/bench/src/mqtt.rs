//! `bitmote bench mqtt`: what the embedded broker's authenticating front costs, beside the
//! same broker without it, and what a reading's round trip over MQTT costs beside HTTP.
//!
//! * QoS 1 publish -> PUBACK, one at a time and pipelined (100 in flight): directly to an
//!   rumqttd with the gateway's broker configuration (no login, no topic checks), and
//!   through the gateway's front as an enrolled device on its own topic (login, framing,
//!   ACL check, forwarding to the private broker port).
//! * A signed reading -> its receipt, one at a time, over MQTT (through the front) and over
//!   HTTP: both are bound by the durable commit (one fsync per group).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bitmote_device::reading::{sensor, unit};
use bitmote_device::{Reading, SignedReading, SigningKey, Value};
use bitmote_regtest::{RegtestNode, RegtestOptions};
use rumqttc::{Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value as Json};

use crate::{summary, Env};

/// A connected synchronous client (its event loop is driven by the caller).
fn connect(addr: SocketAddr, id: &str, login: Option<(&str, &str)>) -> Result<(rumqttc::Client, rumqttc::Connection)> {
    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_inflight(100);
    if let Some((u, p)) = login {
        opts.set_credentials(u, p);
    }
    let (client, mut conn) = bitmote_proto::client::mqtt_client(opts, 200);
    for ev in conn.iter() {
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok((client, conn)),
            Ok(_) => {}
            Err(e) => bail!("connecting to {addr}: {e}"),
        }
    }
    bail!("no CONNACK from {addr}")
}

/// Drive the event loop until `n` PUBACKs arrived.
fn await_pubacks(conn: &mut rumqttc::Connection, n: usize) -> Result<()> {
    let mut got = 0;
    for ev in conn.iter() {
        match ev {
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                got += 1;
                if got == n {
                    return Ok(());
                }
            }
            Ok(_) => {}
            Err(e) => bail!("MQTT: {e}"),
        }
    }
    bail!("connection ended")
}

/// Sequential publish -> PUBACK latencies, then the rate of `pipelined` publishes with up to
/// 100 in flight.
fn qos1(addr: SocketAddr, login: Option<(&str, &str)>, topic: &str, n: usize, pipelined: usize) -> Result<Json> {
    let (client, mut conn) = connect(addr, "bench-qos1", login)?;
    let payload = vec![0x42u8; 130]; // about a signed reading
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        client.publish(topic, QoS::AtLeastOnce, false, payload.clone())?;
        await_pubacks(&mut conn, 1)?;
        lat.push(t.elapsed());
    }
    let t = Instant::now();
    let mut sent = 0;
    while sent < pipelined {
        let burst = (pipelined - sent).min(100);
        for _ in 0..burst {
            client.publish(topic, QoS::AtLeastOnce, false, payload.clone())?;
        }
        await_pubacks(&mut conn, burst)?;
        sent += burst;
    }
    let rate = pipelined as f64 / t.elapsed().as_secs_f64();
    let _ = client.disconnect();
    Ok(json!({ "publish_to_puback": summary(lat), "pipelined_per_s": rate }))
}

/// Publish `n` readings from `next` one at a time on `addr`, each after the previous one's
/// receipt; the latencies to the receipt and to the PUBACK.
fn receipts(
    addr: SocketAddr,
    login: Option<(&str, &str)>,
    id: &str,
    n: usize,
    next: &mut dyn FnMut() -> Result<Vec<u8>>,
) -> Result<(Vec<std::time::Duration>, Vec<std::time::Duration>)> {
    let (client, mut conn) = connect(addr, "bench-reading", login)?;
    client.subscribe(format!("bitmote/{id}/receipts"), QoS::AtLeastOnce)?;
    for ev in conn.iter() {
        match ev {
            Ok(Event::Incoming(Packet::SubAck(_))) => break,
            Ok(_) => {}
            Err(e) => bail!("MQTT: {e}"),
        }
    }
    let (mut lat, mut puback) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let payload = next()?;
        let t = Instant::now();
        client.publish(format!("bitmote/{id}/readings"), QoS::AtLeastOnce, false, payload)?;
        let mut got = false;
        for ev in conn.iter() {
            match ev {
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic.ends_with("/receipts") => {
                    got = true;
                    break;
                }
                Ok(Event::Incoming(Packet::Publish(p))) => bail!("unexpected {}: {:?}", p.topic, p.payload),
                Ok(Event::Incoming(Packet::PubAck(_))) => puback.push(t.elapsed()),
                Ok(_) => {}
                Err(e) => bail!("MQTT: {e}"),
            }
        }
        if !got {
            bail!("no receipt");
        }
        lat.push(t.elapsed());
    }
    let _ = client.disconnect();
    Ok((lat, puback))
}

pub fn run(env: &Env, messages: usize, readings: usize, json_out: bool) -> Result<()> {
    if messages == 0 || readings == 0 {
        bail!("--messages and --readings must be at least 1");
    }
    let dir = tempfile::Builder::new().prefix("bitmote-bench-").tempdir()?;
    let node = RegtestNode::start(RegtestOptions::new(env.bitcoind.clone())).context("starting a private regtest node")?;
    let mut cfg = bitmote_gateway::GatewayConfig::new(dir.path().join("gateway"));
    cfg.http_listen = "127.0.0.1:0".parse()?;
    cfg.mqtt_listen = Some("127.0.0.1:0".parse()?);
    let gw = bitmote_gateway::Gateway::start(cfg, node.client().fresh()?)?;
    let front = gw.mqtt_addr.context("the gateway has no MQTT broker")?;

    // The same broker configuration, bare, for the baseline.
    let bare: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?
    };
    let mut broker = rumqttd::Broker::new(bitmote_gateway::mqtt::broker_config(bare)?);
    std::thread::spawn(move || drop(broker.start()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(bare).is_err() {
        if Instant::now() > deadline {
            bail!("the baseline broker did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    let key = SigningKey::schnorr_from_secret(&[0x5a; 32]).map_err(|e| anyhow::anyhow!("{e}"))?;
    let id = key.public_key().device_id();
    let d = gw.shared().ingest.enroll(&key.public_key(), Some("bench-1"))?;
    let creds = bitmote_gateway::mqtt_front::issue(gw.shared(), &*gw.shared().db()?, &d.id)?;
    let login = Some((creds.username.as_str(), creds.password.as_str()));

    let pipelined = messages * 10;
    let direct = qos1(bare, None, "bitmote/bench-1/presence", messages, pipelined)?;
    let fronted = qos1(front, login, "bitmote/bench-1/presence", messages, pipelined)?;

    // Readings to receipts, one at a time: MQTT through the front, then HTTP.
    let mut seq = 0u64;
    let mut next = || {
        seq += 1;
        let r = Reading {
            device: id,
            seq,
            timestamp_ms: bitmote_chain::now_ms(),
            sensor: sensor::TEMPERATURE,
            unit: unit::CELSIUS,
            value: Value::Scaled { mantissa: 2000, exponent: -2 },
        };
        SignedReading::sign(&key, r).map(|s| s.encode()).map_err(|e| anyhow::anyhow!("{e}"))
    };
    let (mqtt_lat, puback_lat) = receipts(front, login, &id.to_string(), readings, &mut next)?;
    let url = format!("http://{}/v1/readings", gw.http_addr);
    let agent = ureq::AgentBuilder::new().build();
    let mut http_lat = Vec::with_capacity(readings);
    for _ in 0..readings {
        let payload = next()?;
        let t = Instant::now();
        agent
            .post(&url)
            .set("Content-Type", "application/octet-stream")
            .send_bytes(&payload)
            .map_err(|e| anyhow::anyhow!("{}", bitmote_proto::client::ClientError::from(e)))?;
        http_lat.push(t.elapsed());
    }
    gw.shutdown();
    // The same over the bare broker, with a gateway using it as its external broker.
    let mut cfg = bitmote_gateway::GatewayConfig::new(dir.path().join("gateway-ext"));
    cfg.http_listen = "127.0.0.1:0".parse()?;
    cfg.mqtt_listen = None;
    cfg.mqtt_broker = Some(format!("mqtt://{bare}"));
    let gw2 = bitmote_gateway::Gateway::start(cfg, node.client().fresh()?)?;
    gw2.shared().ingest.enroll(&key.public_key(), Some("bench-1"))?;
    std::thread::sleep(Duration::from_secs(1)); // its subscriptions
    let (ext_lat, ext_puback) = receipts(bare, None, &id.to_string(), readings, &mut next)?;
    gw2.shutdown();
    node.stop()?;

    let report = json!({
        "bench": "mqtt", "messages": messages, "pipelined": pipelined, "readings": readings,
        "direct_broker": direct, "through_front": fronted,
        "reading_to_receipt_mqtt": summary(mqtt_lat), "reading_to_puback_mqtt": summary(puback_lat),
        "reading_to_receipt_bare_external": summary(ext_lat), "reading_to_puback_bare_external": summary(ext_puback), "reading_to_receipt_http": summary(http_lat),
    });
    let line = |what: &str, v: &Json| {
        let g = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        println!("  {what:<50} p50 {:>7.3} ms  p99 {:>7.3} ms  max {:>7.3} ms", g("p50_ms"), g("p99_ms"), g("max_ms"));
    };
    println!("MQTT bench (loopback; {messages} sequential and {pipelined} pipelined QoS 1 publishes, {readings} readings)");
    line("QoS 1 publish -> PUBACK, bare broker (baseline)", &direct["publish_to_puback"]);
    line("QoS 1 publish -> PUBACK, through the front (device)", &fronted["publish_to_puback"]);
    println!(
        "  pipelined QoS 1 publishes/s: bare {:>9.0}   through the front {:>9.0}",
        direct["pipelined_per_s"].as_f64().unwrap_or(f64::NAN),
        fronted["pipelined_per_s"].as_f64().unwrap_or(f64::NAN)
    );
    line("signed reading -> PUBACK over MQTT", &report["reading_to_puback_mqtt"]);
    line("signed reading -> receipt over MQTT (durable)", &report["reading_to_receipt_mqtt"]);
    line("signed reading -> receipt over HTTP (durable)", &report["reading_to_receipt_http"]);
    line("bare broker, gateway as external client: -> PUBACK", &report["reading_to_puback_bare_external"]);
    line("bare broker, gateway as external client: -> receipt", &report["reading_to_receipt_bare_external"]);
    if json_out {
        println!("{report}");
    }
    Ok(())
}
