//! MQTT ingest through an embedded broker (rumqttd).
//!
//! Topics, per device (`<id>` is the 64-hex-digit device id):
//! * `bitmote/<id>/readings` — the device publishes (QoS 1) a signed reading or batch
//!   in the binary wire format (`'R' …` / `'B' …`, see `bitmote_device::batch`);
//! * `bitmote/<id>/receipts` — the gateway answers once the readings are durable:
//!   `{"receipts":[{"reading_id","leaf_index","tree_size"}]}`;
//! * `bitmote/<id>/errors` — or says why it refused them: `{"error","code"}`.
//!
//! * `bitmote/<name>/commands`, `bitmote/<name>/acks`, `bitmote/<name>/presence` — an
//!   actuator's commands, its acknowledgements and its presence (`online`, retained; the
//!   last will says `offline`).
//!
//! Devices log in with the credentials issued at enrolment and may only use their own
//! topics: the embedded broker is served through [`crate::mqtt_front`].
//!
//! The broker's own PUBACK only means the broker has the message; a device treats a
//! reading as stored when its receipt arrives, and resends otherwise (resending an
//! already stored reading returns the same receipt, so this is safe).

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bitmote_notary::ingest::Submission;
use bitmote_proto::{Ack, ErrorBody, Presence};
use rumqttd::{Broker, Notification};

use crate::{GatewayError, Shared};

// The topics are the protocol's (`bitmote_proto::topic`).
use bitmote_proto::topic::{self, errors as errors_topic, receipts as receipts_topic, Inbound};
pub use bitmote_proto::topic::{acks as acks_topic, commands as commands_topic, readings as readings_topic};

/// The one thread that publishes the gateway's messages (receipts, errors, commands)
/// through `publish`, until the gateway stops; then `finish`. Returns the queue to it,
/// also installed as `shared.mqtt_out`.
fn spawn_publisher(
    shared: Arc<Shared>,
    mut publish: impl FnMut(String, Vec<u8>) -> Result<(), String> + Send + 'static,
    finish: impl FnOnce() + Send + 'static,
) -> Result<(crate::MqttOut, JoinHandle<()>), GatewayError> {
    let (out_tx, out_rx) = mpsc::channel::<(String, Vec<u8>)>();
    *shared.mqtt_out.lock().unwrap_or_else(|p| p.into_inner()) = Some(out_tx.clone());
    let handle = std::thread::Builder::new()
        .name("mqtt-publish".into())
        .spawn(move || {
            while !shared.stop.load(Ordering::SeqCst) {
                match out_rx.recv_timeout(Duration::from_millis(200)) {
                    Ok((topic, payload)) => {
                        if let Err(e) = publish(topic, payload) {
                            tracing::warn!("MQTT publish failed: {e}");
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
            finish();
        })
        .map_err(|e| GatewayError::Io { context: "spawning the MQTT publisher".into(), source: e })?;
    Ok((out_tx, handle))
}

/// Configuration of an rumqttd broker listening on `addr` (MQTT 3.1.1).
pub fn broker_config(addr: SocketAddr) -> Result<rumqttd::Config, GatewayError> {
    let text = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 10010
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[v4.1]
name = "v4-1"
listen = "{addr}"
next_connection_delay_ms = 1
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = 1048576
max_inflight_count = 100
dynamic_filters = true
"#
    );
    toml::from_str(&text).map_err(|e| GatewayError::Mqtt(format!("broker configuration: {e}")))
}

/// Start the embedded broker with its authenticating front on `addr` (port 0 = a free
/// port; see [`crate::mqtt_front`]) and the bridge to ingest. The broker itself listens on
/// a free loopback port and accepts only the front, with a secret held in memory.
pub fn start(shared: Arc<Shared>, addr: SocketAddr) -> Result<(SocketAddr, Vec<JoinHandle<()>>), GatewayError> {
    let public = TcpListener::bind(addr).map_err(|e| GatewayError::Io { context: format!("binding MQTT on {addr}"), source: e })?;
    let addr = public.local_addr().map_err(|e| GatewayError::Io { context: "MQTT address".into(), source: e })?;
    let backend = {
        let l = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .map_err(|e| GatewayError::Io { context: "finding a port for the MQTT broker".into(), source: e })?;
        l.local_addr().map_err(|e| GatewayError::Io { context: "MQTT broker address".into(), source: e })?
    };
    let mut secret = [0u8; 32];
    getrandom::getrandom(&mut secret).map_err(|e| GatewayError::Io { context: "random broker secret".into(), source: e.into() })?;
    let secret = hex::encode(secret);
    let mut config = broker_config(backend)?;
    for server in config.v4.iter_mut().flat_map(|m| m.values_mut()) {
        let secret = secret.clone();
        server.set_auth_handler(move |_client: String, user: String, pass: String| {
            let ok = user == "bitmote-front"
                && pass.len() == secret.len()
                && pass.bytes().zip(secret.bytes()).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0;
            async move { ok }
        });
    }
    let front = crate::mqtt_front::start(shared.clone(), public, backend, secret)?;
    let mut broker = Broker::new(config);
    let (mut link_tx, mut link_rx) = broker.link("bitmote-gateway").map_err(|e| GatewayError::Mqtt(e.to_string()))?;
    for topic in topic::GATEWAY_SUBSCRIPTIONS {
        link_tx.subscribe(topic).map_err(|e| GatewayError::Mqtt(e.to_string()))?;
    }
    // The broker runs until the process exits (rumqttd has no stop); it holds no state of ours.
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!("MQTT broker stopped: {e}");
            }
        })
        .map_err(|e| GatewayError::Io { context: "spawning the MQTT broker".into(), source: e })?;
    // (The front's own sockets are set up by the front; this is the broker's private port.)
    if !nodelay_on_listener(backend, Duration::from_secs(5)) {
        tracing::warn!("MQTT broker on {backend}: could not set TCP_NODELAY on its listener; commands and receipts may wait ~40 ms each");
    }

    let (out_tx, publisher) = spawn_publisher(
        shared.clone(),
        move |topic, payload| link_tx.publish(topic, payload).map(|_| ()).map_err(|e| e.to_string()),
        || {},
    )?;
    let bridge = std::thread::Builder::new()
        .name("mqtt-ingest".into())
        .spawn(move || {
            while !shared.stop.load(Ordering::SeqCst) {
                match link_rx.recv_deadline(Instant::now() + Duration::from_millis(200)) {
                    Ok(Some(Notification::Forward(f))) => {
                        let topic = String::from_utf8_lossy(&f.publish.topic).to_string();
                        handle(&shared, &out_tx, &topic, &f.publish.payload);
                    }
                    Ok(_) => {}
                    Err(rumqttd::local::LinkError::RecvTimeout(flume::RecvTimeoutError::Timeout)) => {}
                    Err(e) => {
                        tracing::error!("MQTT link closed: {e}");
                        break;
                    }
                }
            }
        })
        .map_err(|e| GatewayError::Io { context: "spawning the MQTT bridge".into(), source: e })?;
    Ok((addr, vec![front, publisher, bridge]))
}

/// Connect to an external broker at `url` (`mqtt://host:port` or `host:port`) as the
/// gateway's client (with `login`, a username and password, if the broker wants one),
/// subscribe to every device's readings, acks and presence topics (QoS 1, persistent
/// session), and answer on the receipts and errors topics. Authenticating devices and
/// confining them to their topics is then that broker's job (see `docs/mqtt.md`).
pub fn start_external(
    shared: Arc<Shared>,
    url: &str,
    login: Option<crate::mqtt_front::BrokerLogin>,
) -> Result<Vec<JoinHandle<()>>, GatewayError> {
    let hp = url.strip_prefix("mqtt://").unwrap_or(url);
    let (host, port) = hp.rsplit_once(':').ok_or_else(|| GatewayError::Mqtt(format!("broker URL {url:?} must be mqtt://host:port")))?;
    let port: u16 = port.parse().map_err(|_| GatewayError::Mqtt(format!("bad port in broker URL {url:?}")))?;
    let mut opts = rumqttc::MqttOptions::new("bitmote-gateway", host, port);
    opts.set_keep_alive(Duration::from_secs(10));
    opts.set_clean_session(false);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    if let Some(l) = login {
        opts.set_credentials(l.username, l.password);
    }
    let (client, mut conn) = client(opts, 1024);
    let (out_tx, publisher) = {
        let (c1, c2) = (client.clone(), client.clone());
        spawn_publisher(
            shared.clone(),
            move |topic, payload| c1.publish(topic, rumqttc::QoS::AtLeastOnce, false, payload).map_err(|e| e.to_string()),
            move || {
                let _ = c2.disconnect();
            },
        )?
    };
    let bridge = std::thread::Builder::new()
        .name("mqtt-ingest".into())
        .spawn(move || {
            for ev in conn.iter() {
                if shared.stop.load(Ordering::SeqCst) {
                    break;
                }
                match ev {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        // (Re)subscribe on every connection; the session keeps what arrived meanwhile.
                        for topic in topic::GATEWAY_SUBSCRIPTIONS {
                            if let Err(e) = client.try_subscribe(topic, rumqttc::QoS::AtLeastOnce) {
                                tracing::warn!("MQTT subscribe failed: {e}");
                            }
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => handle(&shared, &out_tx, &p.topic, &p.payload),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!("MQTT broker connection: {e}; retrying");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            }
        })
        .map_err(|e| GatewayError::Io { context: "spawning the MQTT bridge".into(), source: e })?;
    Ok(vec![publisher, bridge])
}

fn handle(shared: &Arc<Shared>, out: &mpsc::Sender<(String, Vec<u8>)>, topic: &str, payload: &[u8]) {
    let device = match Inbound::parse(topic) {
        Some(Inbound::Presence(device)) => {
            let state = Presence::from_payload(payload).as_str();
            let now = bitmote_chain::now_ms();
            shared.presence.lock().unwrap_or_else(|p| p.into_inner()).insert(device.to_string(), (state.to_string(), now));
            return;
        }
        Some(Inbound::Acks(device)) => {
            // A closed set of results: an ack that does not decode is never taken for done;
            // the command stays delivered and is sent again.
            match bitmote_proto::decode::<Ack>(payload) {
                Ok(ack) => {
                    if let Some(tx) = shared.acks.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                        let _ = tx.send((device.to_string(), ack));
                    }
                }
                Err(e) => tracing::warn!("ignoring a malformed acknowledgement from {device}: {e}"),
            }
            return;
        }
        Some(Inbound::Readings(device)) => device.to_string(),
        None => return,
    };
    let refuse = |msg: String, code: &str| {
        let _ = out.send((errors_topic(&device), bitmote_proto::encode(&ErrorBody::new(msg, code))));
    };
    let sub = match Submission::decode(payload) {
        Ok(s) => s,
        Err(e) => return refuse(e.to_string(), e.code()),
    };
    let named = match &sub {
        Submission::Reading(r) => r.reading.device.to_string(),
        Submission::Batch(b) => b.readings.first().map(|r| r.device.to_string()).unwrap_or_default(),
    };
    if named != device {
        return refuse(format!("readings of device {named} published on the topic of {device}"), "wrong_topic");
    }
    let out = out.clone();
    shared.ingest.submit_with(sub, move |res| {
        let msg = match res {
            Ok(receipts) => (receipts_topic(&device), bitmote_proto::encode(&bitmote_proto::Receipts { receipts })),
            Err(e) => (errors_topic(&device), bitmote_proto::encode(&crate::ingest_error_body(&e))),
        };
        let _ = out.send(msg);
    });
}

pub use bitmote_proto::client::mqtt_client as client;

/// Make the sockets the embedded broker accepts on `addr` send at once.
///
/// rumqttd 0.20 neither sets `TCP_NODELAY` on the connections it accepts nor lets us
/// hand it a listener, and with Nagle's algorithm on, a broker that writes two small
/// packets in a row to one client (a PUBACK, then a PUBLISH) holds the second until the
/// client's delayed ACK, ~40 ms: measured, every command→acknowledgement round trip
/// took 42 ms instead of 1 ms. Linux copies `TCP_NODELAY` from a listening socket to
/// the sockets it accepts, so we find the broker's listener among this process's file
/// descriptors (a TCP socket in LISTEN state bound to `addr`) and set it there, waiting
/// up to `wait` for the broker thread to bind. Returns whether it was set.
#[cfg(target_os = "linux")]
pub fn nodelay_on_listener(addr: SocketAddr, wait: Duration) -> bool {
    use std::os::fd::BorrowedFd;
    let deadline = Instant::now() + wait;
    loop {
        for entry in std::fs::read_dir("/proc/self/fd").into_iter().flatten().flatten() {
            let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
            if !std::fs::read_link(entry.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:")) {
                continue;
            }
            // SAFETY: `fd` is open in this process while we look (from /proc/self/fd);
            // if it was closed and reused meanwhile, the checks below only read options
            // of whatever it is now, and we set an option only on a matching TCP listener.
            let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
            let sock = socket2::SockRef::from(&borrowed);
            let listening = sock.is_listener().unwrap_or(false);
            let bound = sock.local_addr().ok().and_then(|a| a.as_socket());
            if listening && bound == Some(addr) {
                return sock.set_tcp_nodelay(true).is_ok();
            }
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(not(target_os = "linux"))]
pub fn nodelay_on_listener(_addr: SocketAddr, _wait: Duration) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_found_by_its_address_passes_nodelay_to_the_sockets_it_accepts() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(nodelay_on_listener(l.local_addr().unwrap(), Duration::from_secs(1)));
        let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert!(l.accept().unwrap().0.nodelay().unwrap());
        // Only that listener: another one keeps the default.
        let _c2 = std::net::TcpStream::connect(other.local_addr().unwrap()).unwrap();
        assert!(!other.accept().unwrap().0.nodelay().unwrap());
        // No listener on an address: false, after the wait.
        let gone = {
            let t = TcpListener::bind("127.0.0.1:0").unwrap();
            t.local_addr().unwrap()
        };
        assert!(!nodelay_on_listener(gone, Duration::from_millis(20)));
    }
}
