//! MQTT security for the embedded broker: per-device credentials and per-device topics.
//!
//! rumqttd 0.20 can authenticate a CONNECT (a username/password table or an external
//! handler), but it has no hook to authorize a PUBLISH or a SUBSCRIBE: any client it lets
//! in may publish to and subscribe to any topic. So the public MQTT port is served by a
//! thin MQTT-aware front ([`start`]) and the broker itself listens on a private loopback
//! port:
//!
//! * the front reads the client's CONNECT and authenticates it: the username is a device
//!   id (64 hex digits) or an enrolled device name, the password the one issued at
//!   enrolment ([`issue`]; the gateway keeps only its SHA-256). A revoked device, a
//!   device without credentials, a wrong or missing password get CONNACK 4 or 5 and the
//!   connection is closed. The user `admin` with the admin token as password may use
//!   every topic (the operator's tools; anyone who holds the token can already command
//!   every device through rules);
//! * it then opens a connection to the broker with a CONNECT rewritten to the broker's
//!   own credentials (a random secret held only in memory, so nothing but the front can
//!   connect to the private port) and a client id prefixed with the device id (so one
//!   device cannot take over another's persistent session by reusing its client id);
//! * from then on every packet from the client is framed and checked before it is
//!   forwarded: a PUBLISH (and the CONNECT's last will) only to the device's own
//!   device-to-gateway topics `bitmote/<id or name>/readings|acks|presence`, a SUBSCRIBE
//!   only to filters under `bitmote/<id or name>/`. Anything else closes the connection
//!   (MQTT 3.1.1 has no way to refuse a single PUBLISH) and is logged. What the broker
//!   sends to the client is copied unchanged.
//!
//! The front forwards whole packets, several per write when they arrive together, and
//! acknowledges TCP data at once (`TCP_QUICKACK`): rumqttd and rumqttc leave Nagle's
//! algorithm on, so without it a receipt sent right after a PUBACK waits for a delayed ACK
//! (~40 ms on Linux). `bitmote bench mqtt` measures the front against the bare broker.
//! Untrusted strings (usernames, topics) are logged in their escaped (`Debug`) form.
//!
//! Revoking a device, or issuing it new credentials, closes its open connections
//! ([`MqttAuth::kick`]). Names are used in topics only when they are topic-safe (no `/`,
//! `+`, `#`, not 64 hex digits, not `admin`); the enrolment API refuses other names.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bitmote_device::DeviceId;
use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::Login;
use rumqttc::mqttbytes::FixedHeader;
use rusqlite::{params, Connection};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::mqtt_wire::{allowed, check_sizes, encode_checked, next_packet, read_connect, ConnectRefusal};
pub use crate::mqtt_wire::{topic_safe, Who, ADMIN_USER};
use crate::{GatewayError, Shared};

/// Bytes read at a time.
const READ_CHUNK: usize = 16 * 1024;

/// Open connections one device may have at once (a reconnecting device briefly has two).
pub const MAX_PER_DEVICE: usize = 4;
/// Open client connections the front serves at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 4096;
/// Username the front uses towards the broker.
const FRONT_USER: &str = "bitmote-front";

/// The credentials table, in `notary.sqlite` (next to the registry it refers to), as a
/// schema of its own that the notary store versions and migrates
/// ([`bitmote_notary::store::migrate`]) apart from the notary's.
///
/// Why not in the notary's schema: the table is the MQTT front's, a gateway concern the
/// notary knows nothing of (the notary has devices and readings, not brokers or
/// passwords), and it changes when the front changes. The store owns the mechanism
/// (one way to open the file, one set of pragmas, numbered migrations, a recorded
/// version per schema); the gateway owns this DDL. Keeping it in the same file keeps
/// what it needs: credentials are written on the connection that enrols the device.
/// Version 1 is the table as it was created before versioning (`IF NOT EXISTS`), so an
/// existing table is kept as it is.
pub const SCHEMA: bitmote_notary::store::Schema = bitmote_notary::store::Schema {
    name: "gateway.mqtt_credentials",
    migrations: &["CREATE TABLE IF NOT EXISTS mqtt_credentials (
    device BLOB PRIMARY KEY,
    hash BLOB NOT NULL,
    issued_ms INTEGER NOT NULL
);"],
};

/// MQTT credentials of a device, returned once to the admin who enrols it: the
/// protocol's login (its `Debug` never shows the password).
pub type Credentials = bitmote_proto::notary::MqttLogin;

/// A username and password for a broker; `Debug` never shows the password.
#[derive(Clone)]
pub struct BrokerLogin {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for BrokerLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerLogin").field("username", &self.username).field("password", &"<redacted>").finish()
    }
}

/// Credential hashes (from the database, kept in memory) and the open connections of
/// each device, so revoking it closes them.
pub struct MqttAuth {
    hashes: Mutex<HashMap<DeviceId, [u8; 32]>>,
    live: Mutex<HashMap<DeviceId, Vec<tokio::sync::watch::Sender<bool>>>>,
    /// Logins refused since the start (for `/metrics`).
    pub refused_logins: AtomicU64,
    /// Connections closed for a foreign topic (publish, subscribe or last will) since the start.
    pub refused_topics: AtomicU64,
}

fn hash(password: &str) -> [u8; 32] {
    Sha256::digest(password.as_bytes()).into()
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl MqttAuth {
    /// Create or migrate the credentials table ([`SCHEMA`]) and load it.
    pub fn load(c: &Connection) -> rusqlite::Result<MqttAuth> {
        bitmote_notary::store::migrate(c, &SCHEMA)?;
        let mut hashes = HashMap::new();
        let mut st = c.prepare("SELECT device, hash FROM mqtt_credentials")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?)))?;
        for row in rows {
            let (d, h) = row?;
            if let (Ok(d), Ok(h)) = (<[u8; 32]>::try_from(d), <[u8; 32]>::try_from(h)) {
                hashes.insert(DeviceId(d), h);
            }
        }
        Ok(MqttAuth {
            hashes: Mutex::new(hashes),
            live: Mutex::new(HashMap::new()),
            refused_logins: AtomicU64::new(0),
            refused_topics: AtomicU64::new(0),
        })
    }

    /// Close every open MQTT connection of `id` (after revoking it or replacing its password).
    pub fn kick(&self, id: &DeviceId) {
        if let Some(conns) = self.live.lock().unwrap_or_else(|p| p.into_inner()).remove(id) {
            for c in conns {
                let _ = c.send(true);
            }
        }
    }

    /// Register an open connection of `id`; `None` if it has [`MAX_PER_DEVICE`] already.
    fn register(&self, id: DeviceId) -> Option<tokio::sync::watch::Receiver<bool>> {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let v = live.entry(id).or_default();
        v.retain(|c| !c.is_closed());
        if v.len() >= MAX_PER_DEVICE {
            return None;
        }
        v.push(tx);
        Some(rx)
    }
}

/// Issue new MQTT credentials for `id` (replacing any earlier ones, whose connections are
/// closed): a random 256-bit password, of which only the SHA-256 is stored.
pub fn issue(shared: &Shared, c: &Connection, id: &DeviceId) -> Result<Credentials, GatewayError> {
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b).map_err(|e| GatewayError::Io { context: "random password".into(), source: e.into() })?;
    let password = hex::encode(b);
    let h = hash(&password);
    c.execute(
        "INSERT OR REPLACE INTO mqtt_credentials (device, hash, issued_ms) VALUES (?1, ?2, ?3)",
        params![&id.0[..], &h[..], bitmote_chain::now_ms() as i64],
    )?;
    shared.mqtt_auth.hashes.lock().unwrap_or_else(|p| p.into_inner()).insert(*id, h);
    shared.mqtt_auth.kick(id);
    Ok(Credentials { username: id.to_string(), password })
}

/// Check a CONNECT's login; the identity, or the CONNACK return code to refuse it with
/// (4: bad username or password, 5: not authorized).
pub fn authenticate(shared: &Shared, username: &str, password: &str) -> Result<Who, u8> {
    if username == ADMIN_USER {
        return if ct_eq(password.as_bytes(), shared.admin_token.as_bytes()) { Ok(Who::Admin) } else { Err(4) };
    }
    let device = match username.parse::<DeviceId>() {
        Ok(id) if username.len() == 64 => shared.ingest.device(&id),
        _ => shared.ingest.devices().into_iter().find(|d| d.name == username),
    };
    let Some(d) = device else { return Err(4) };
    if d.is_revoked() {
        return Err(5);
    }
    let stored = shared.mqtt_auth.hashes.lock().unwrap_or_else(|p| p.into_inner()).get(&d.id).copied();
    match stored {
        Some(h) if ct_eq(&h, &hash(password)) => Ok(Who::Device { id: d.id, name: topic_safe(&d.name).then_some(d.name) }),
        _ => Err(4),
    }
}

/// Start the front on the bound `listener`, forwarding to the broker at `backend` with
/// the broker's `secret`. Runs until the gateway stops.
pub fn start(
    shared: Arc<Shared>,
    listener: std::net::TcpListener,
    backend: SocketAddr,
    secret: String,
) -> Result<JoinHandle<()>, GatewayError> {
    let io = |context: &str, e: std::io::Error| GatewayError::Io { context: context.into(), source: e };
    listener.set_nonblocking(true).map_err(|e| io("MQTT listener", e))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("mqtt-front")
        .build()
        .map_err(|e| io("starting the MQTT front", e))?;
    std::thread::Builder::new()
        .name("mqtt-front".into())
        .spawn(move || {
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => return tracing::error!("MQTT listener: {e}"),
                };
                let secret: Arc<str> = secret.into();
                let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
                while !shared.stop.load(Ordering::SeqCst) {
                    match tokio::time::timeout(Duration::from_millis(200), listener.accept()).await {
                        Ok(Ok((stream, peer))) => {
                            if open.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                                tracing::warn!(%peer, "MQTT connection refused: {MAX_CONNECTIONS} open");
                                drop(stream);
                                continue;
                            }
                            let (shared, secret, open) = (shared.clone(), secret.clone(), open.clone());
                            open.fetch_add(1, Ordering::Relaxed);
                            tokio::spawn(async move {
                                if let Err(e) = connection(shared, stream, backend, &secret).await {
                                    tracing::info!(%peer, "MQTT connection closed: {e}");
                                }
                                open.fetch_sub(1, Ordering::Relaxed);
                            });
                        }
                        Ok(Err(e)) => {
                            tracing::warn!("MQTT accept: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(_) => {}
                    }
                }
            });
            rt.shutdown_timeout(Duration::from_secs(1));
        })
        .map_err(|e| io("spawning the MQTT front", e))
}

/// The next whole packet from `r`: its fixed header and bytes (fixed header included).
async fn read_packet(r: &mut (impl AsyncReadExt + Unpin), buf: &mut BytesMut) -> Result<(FixedHeader, Bytes), String> {
    loop {
        if let Some(p) = next_packet(buf)? {
            return Ok(p);
        }
        buf.reserve(READ_CHUNK);
        if r.read_buf(buf).await.map_err(|e| e.to_string())? == 0 {
            return Err("closed by the client".into());
        }
    }
}

/// Acknowledge received data at once (Linux `TCP_QUICKACK`, which the kernel resets, so it
/// is set again after each read).
fn quickack(s: &TcpStream) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let one: libc::c_int = 1;
        // SAFETY: a valid socket descriptor and a c_int option value of the right size.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_QUICKACK,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = s;
}

async fn connack(w: &mut TcpStream, code: u8) {
    let _ = w.write_all(&[0x20, 0x02, 0x00, code]).await;
    let _ = w.shutdown().await;
}

async fn connection(shared: Arc<Shared>, mut client: TcpStream, backend: SocketAddr, secret: &str) -> Result<(), String> {
    client.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut buf = BytesMut::with_capacity(4096);
    let (fh, bytes) = tokio::time::timeout(Duration::from_secs(10), read_packet(&mut client, &mut buf))
        .await
        .map_err(|_| "no CONNECT within 10 s".to_string())??;
    let mut connect = match read_connect(fh, bytes).and_then(|c| check_sizes(&c).map(|()| c)) {
        Ok(c) => c,
        Err(ConnectRefusal::Unsupported(e)) => {
            connack(&mut client, 1).await;
            return Err(e);
        }
        Err(ConnectRefusal::TooLarge(code, e)) => {
            connack(&mut client, code).await;
            return Err(format!("refused: {e}"));
        }
        Err(ConnectRefusal::Malformed(e)) => return Err(e),
    };
    let Some(login) = connect.login.take() else {
        shared.mqtt_auth.refused_logins.fetch_add(1, Ordering::Relaxed);
        connack(&mut client, 5).await;
        return Err("refused: no username and password".into());
    };
    // (In memory: the registry cache and the credential hashes.)
    let who = match authenticate(&shared, &login.username, &login.password) {
        Ok(w) => w,
        Err(code) => {
            shared.mqtt_auth.refused_logins.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(username = ?login.username, "MQTT login refused (CONNACK {code})");
            connack(&mut client, code).await;
            return Err(format!("refused login of {:?}", login.username));
        }
    };
    if let Some(will) = &connect.last_will {
        if !who.may_publish(&will.topic) {
            shared.mqtt_auth.refused_topics.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(device = %who.label(), topic = ?will.topic, "MQTT last will on a foreign topic refused");
            connack(&mut client, 5).await;
            return Err("last will on a foreign topic".into());
        }
    }
    // From here a revocation or a new password closes the connection; one that came between
    // the check above and this registration is caught by checking again.
    let mut kicked = match &who {
        Who::Device { id, .. } => match shared.mqtt_auth.register(*id) {
            Some(rx) => rx,
            None => {
                connack(&mut client, 3).await;
                return Err(format!("refused: the device has {MAX_PER_DEVICE} connections open already"));
            }
        },
        Who::Admin => tokio::sync::watch::channel(false).1,
    };
    if authenticate(&shared, &login.username, &login.password).as_ref() != Ok(&who) {
        connack(&mut client, 5).await;
        return Err("credentials revoked or replaced while logging in".into());
    }
    if connect.client_id.is_empty() {
        if !connect.clean_session {
            connack(&mut client, 2).await;
            return Err("an empty client id needs a clean session".into());
        }
        let mut r = [0u8; 8];
        getrandom::getrandom(&mut r).map_err(|e| e.to_string())?;
        connect.client_id = hex::encode(r);
    }
    // The device's sessions live in its own namespace of client ids.
    connect.client_id = format!("{}.{}", who.label(), connect.client_id);
    connect.login = Some(Login::new(FRONT_USER, secret));
    let first = encode_checked(&connect)?;
    // A client that sends nothing for 1.5 keep-alive periods is gone (MQTT 3.1.1, 3.1.2.10);
    // one without keep-alive gets the longest period MQTT can name.
    let idle = Duration::from_millis(1500 * u64::from(if connect.keep_alive == 0 { u16::MAX } else { connect.keep_alive }));

    let mut broker = TcpStream::connect(backend).await.map_err(|e| format!("broker: {e}"))?;
    broker.set_nodelay(true).map_err(|e| e.to_string())?;
    broker.write_all(&first).await.map_err(|e| format!("broker: {e}"))?;
    let (mut br, mut bw) = broker.into_split();
    let (mut cr, mut cw) = client.into_split();
    // Broker to client: copied unchanged. The broker (rumqttd) does not disable Nagle, so
    // a receipt that follows its PUBACK would wait for our delayed ACK (~40 ms on Linux):
    // acknowledge at once instead.
    let down = async move {
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        loop {
            buf.reserve(READ_CHUNK);
            let n = br.read_buf(&mut buf).await.map_err(|e| format!("broker: {e}"))?;
            if n == 0 {
                return Err("closed by the broker".to_string());
            }
            quickack(br.as_ref());
            cw.write_all(&buf).await.map_err(|e| format!("client: {e}"))?;
            buf.clear();
        }
    };
    let label = who.label();
    let counters = shared.clone();
    let counters = &counters.mqtt_auth;
    // Client to broker: every whole packet is checked; the allowed ones read together are
    // forwarded in one write.
    let up = async move {
        let mut out = BytesMut::with_capacity(READ_CHUNK);
        loop {
            loop {
                let Some((fh, bytes)) = next_packet(&mut buf)? else { break };
                if let Err(e) = allowed(&who, &label, fh, &bytes) {
                    if e.ends_with("refused") {
                        counters.refused_topics.fetch_add(1, Ordering::Relaxed);
                    }
                    return Err(e);
                }
                out.extend_from_slice(&bytes);
            }
            if !out.is_empty() {
                bw.write_all(&out).await.map_err(|e| format!("broker: {e}"))?;
                out.clear();
            }
            buf.reserve(READ_CHUNK);
            let read = tokio::time::timeout(idle, cr.read_buf(&mut buf)).await.map_err(|_| format!("idle for {} s", idle.as_secs()))?;
            if read.map_err(|e| e.to_string())? == 0 {
                return Err("closed by the client".into());
            }
            quickack(cr.as_ref());
        }
    };
    let kick = async move {
        while !*kicked.borrow() {
            if kicked.changed().await.is_err() && !*kicked.borrow() {
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        r = down => r,
        r = up => r,
        _ = kick => Err("credentials revoked or replaced".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_confined_to_their_own_topics() {
        let id = DeviceId([7; 32]);
        let other = DeviceId([8; 32]);
        let me = Who::Device { id, name: Some("lock-7".into()) };
        for t in [format!("bitmote/{id}/readings"), "bitmote/lock-7/acks".into(), "bitmote/lock-7/presence".into()] {
            assert!(me.may_publish(&t), "{t}");
        }
        for t in [
            format!("bitmote/{other}/readings"),
            "bitmote/lock-8/acks".into(),
            "bitmote/lock-7/commands".into(),
            format!("bitmote/{id}/receipts"),
            "bitmote/lock-7".into(),
            "bitmote/lock-7/readings/x".into(),
            "bitmote/+/readings".into(),
        ] {
            assert!(!me.may_publish(&t), "{t}");
        }
        for f in [format!("bitmote/{id}/receipts"), "bitmote/lock-7/commands".into(), "bitmote/lock-7/#".into(), "bitmote/lock-7/+".into()]
        {
            assert!(me.may_subscribe(&f), "{f}");
        }
        for f in ["bitmote/+/commands", "bitmote/#", "#", "bitmote/lock-7", "bitmote/lock-70/commands", "+/lock-7/commands"] {
            assert!(!me.may_subscribe(f), "{f}");
        }
        assert!(Who::Admin.may_subscribe("bitmote/+/acks") && Who::Admin.may_publish("bitmote/x/commands"));
    }

    #[test]
    fn only_topic_safe_names_become_topics() {
        assert!(topic_safe("lock-7"));
        for n in ["a/b", "a+", "#", "admin", "$SYS", &"ab".repeat(32), ""] {
            assert!(!topic_safe(n), "{n}");
        }
    }
}
