//! `bitmote device …`, `bitmote proof` and `bitmote verify`: device keys and enrolment,
//! a simulated sensor that speaks the real protocols, and proofs fetched from the
//! gateway and checked against the chain without it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bitmote_device::reading::{sensor, unit};
use bitmote_device::{DeviceId, PublicKey, Reading, SignedBatch, SignedReading, SigningKey, Value};
use bitmote_light::{PaymentClaim, PaymentPolicy, Peers};
use bitmote_notary::ots::DetachedTimestampFile;
use bitmote_notary::proof::ProofBundle;
use bitmote_notary::verify::{verify_bundle, verify_ots, HeaderSource, HeadersFile, Policy};
use clap::{Subcommand, ValueEnum};
use serde_json::{json, Value as Json};

use crate::config::Config;
use crate::Global;
use bitmote_chain::now_ms;

#[derive(Subcommand, Debug)]
pub enum DeviceCommand {
    /// Create a device key file (0600) and print its public key and device id.
    Keygen {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// A P-256 key (as in ATECC608 secure elements and TPMs) instead of BIP340.
        #[arg(long)]
        p256: bool,
    },
    /// Enroll a device with the gateway (admin). Writes the device's new MQTT password
    /// (0600) to --mqtt-password-file, by default next to the key (`<key>.mqtt`).
    Enroll {
        /// The device's public key (hex), or use --key.
        public_key: Option<String>,
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        #[arg(long)]
        name: Option<String>,
        /// Where to write the MQTT password (default: the key file with extension `.mqtt`;
        /// with a bare public key and no file, it is printed).
        #[arg(long, value_name = "FILE")]
        mqtt_password_file: Option<PathBuf>,
    },
    /// Revoke a device (admin).
    Revoke {
        device_id: String,
        #[arg(long)]
        reason: String,
    },
    /// List enrolled devices.
    List,
    /// Run a simulated sensor: sign readings and send them, waiting for each receipt.
    Sensor {
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        #[arg(long, value_enum, default_value_t = Transport::Mqtt)]
        transport: Transport,
        /// MQTT broker address.
        #[arg(long, default_value = "127.0.0.1:1883")]
        mqtt: String,
        /// Milliseconds between sends.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        /// Readings per signed batch (1 = one signature per reading).
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Stop after this many readings (default: run until killed).
        #[arg(long)]
        count: Option<u64>,
        /// The MQTT password issued at enrolment (default: `<key>.mqtt` if it exists).
        #[arg(long, value_name = "FILE")]
        mqtt_password_file: Option<PathBuf>,
    },
    /// Sign an on-chain command for a device: prints the OP_RETURN data (hex) to put in any
    /// transaction, e.g. `bitcoin-cli send '{"data":"<hex>"}'`.
    Command {
        /// The operator's BIP340 key file (authorized by the rule's `key`).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The target device's name.
        #[arg(long)]
        device: String,
        /// Sequence number: greater than any earlier command by this key for this device.
        #[arg(long)]
        seq: u32,
        /// The command word (at most 6 bytes), e.g. unlock.
        #[arg(long)]
        command: String,
        /// The chain the command is for: bitcoin, testnet, testnet4, signet or regtest.
        #[arg(long, value_parser = parse_network)]
        network: bitmote_chain::bitcoin::Network,
        /// The gateway the command is for: its log origin (`origin` in `GET /v1/log`).
        #[arg(long, value_name = "ORIGIN")]
        gateway: String,
        /// The command domain the rule names (`domain = "…"`).
        #[arg(long)]
        domain: String,
        /// The last block height the command may be mined at (at most 16,777,215).
        #[arg(long, value_name = "HEIGHT")]
        expires: u32,
    },
    /// Run a simulated actuator (a lock or relay): receive commands over MQTT, act once per
    /// command, acknowledge, report presence.
    Actuator {
        /// The device name used in rules (`device = "…"`).
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "127.0.0.1:1883")]
        mqtt: String,
        /// Where the actuator keeps its state and the commands it executed.
        #[arg(long, value_name = "FILE")]
        state: PathBuf,
        /// Exit after acting on this many commands.
        #[arg(long)]
        count: Option<u64>,
        /// The device's key file, enrolled under --name: the MQTT username is its device id
        /// and the password is read from `<key>.mqtt` (unless --mqtt-password-file).
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        /// The MQTT password issued at enrolment (the username is then the device id of
        /// --key, or else --name).
        #[arg(long, value_name = "FILE")]
        mqtt_password_file: Option<PathBuf>,
        /// Drive a real GPIO line (Linux GPIO character device): high when open/on, low
        /// when closed/off. CHIP is a path (`/dev/gpiochip0`), a name (`gpiochip0`) or a
        /// number (`0`); LINE the line's offset. Needs a build with `--features gpio`.
        #[arg(long, value_name = "CHIP:LINE")]
        gpio: Option<String>,
        #[command(flatten)]
        light: LightArgs,
    },
}

/// Trust-minimized mode: the device checks payments itself with a BIP157/158 light client.
#[derive(clap::Args, Debug)]
pub struct LightArgs {
    /// P2P address of a Bitcoin node serving compact block filters. The device then acts
    /// on an opening command (unlock, open, on) only when the payment it claims is in the
    /// device's own chain, deep enough; closing commands (lock, close, off) need none.
    /// Give it several times to follow several peers: a payment then counts only if every
    /// one of them shows it, in the same block.
    #[arg(long, value_name = "HOST:PORT")]
    light_client: Vec<std::net::SocketAddr>,
    /// The chain the light client follows.
    #[arg(long, default_value = "regtest")]
    network: bitmote_chain::bitcoin::Network,
    /// How long to wait for the device's own chain to bury a payment deep enough before refusing.
    #[arg(long, default_value_t = 30)]
    light_wait_secs: u64,
    /// The device's own floor on the amount, whatever the command claims (required, > 0,
    /// with `--light-client`).
    #[arg(long, default_value_t = 0)]
    min_sat: u64,
    /// The device's own floor on confirmations, whatever the command claims.
    #[arg(long, default_value_t = 1)]
    min_confirmations: u32,
    /// Accept payments to these addresses (with `--light-client`, this or
    /// `--pay-to-descriptor` is required).
    #[arg(long, value_name = "ADDRESS")]
    pay_to: Vec<String>,
    /// Accept payments to the addresses of this public output descriptor, e.g. the gateway
    /// wallet's `receive_descriptor` (`GET /v1/wallet`), where every payment order is paid.
    #[arg(long, value_name = "DESCRIPTOR")]
    pay_to_descriptor: Vec<String>,
    /// How many addresses of each descriptor are accepted (indexes 0 to N-1).
    #[arg(long, value_name = "N", default_value_t = bitmote_light::policy::DEFAULT_MAX_INDEX)]
    descriptor_max_index: u32,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
pub enum Transport {
    Mqtt,
    Http,
}

/// Key file: `schnorr:<hex secret>` or `p256:<hex secret>`.
pub fn read_key(path: &Path) -> Result<SigningKey> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading key {}", path.display()))?;
    let (kind, hex) = text.trim().split_once(':').context("key file must be `schnorr:<hex>` or `p256:<hex>`")?;
    let secret: [u8; 32] = hex::decode(hex).ok().and_then(|v| v.try_into().ok()).context("key secret must be 32 bytes of hex")?;
    Ok(match kind {
        "schnorr" => SigningKey::schnorr_from_secret(&secret),
        "p256" => SigningKey::p256_from_secret(&secret),
        other => bail!("unknown key type {other:?}"),
    }
    .map_err(|e| anyhow::anyhow!("{e}"))?)
}

pub(crate) fn write_key(path: &Path, k: &SigningKey) -> Result<()> {
    let kind = match k {
        SigningKey::Schnorr(_) => "schnorr",
        SigningKey::P256(_) => "p256",
    };
    // Never over an existing file: a device key is its identity.
    bitmote_chain::wallet::create_secret(path, format!("{kind}:{}\n", hex::encode(k.secret_bytes())).as_bytes())?;
    Ok(())
}

/// A request to an admin endpoint, with the token from the gateway's data directory.
pub fn admin_request(g: &Global, method: &str, url: &str) -> Result<ureq::Request> {
    let p = g.data_dir().join("gateway").join("admin.token");
    let token = std::fs::read_to_string(&p)
        .with_context(|| format!("reading the admin token {} (is this the gateway's data dir?)", p.display()))?;
    Ok(ureq::request(method, url).set("Authorization", &format!("Bearer {}", token.trim())))
}

pub fn api_err(e: ureq::Error) -> anyhow::Error {
    match e {
        ureq::Error::Status(code, r) => {
            let body: Json = r.into_json().unwrap_or(Json::Null);
            anyhow::anyhow!("gateway answered {code}: {}", body["error"].as_str().unwrap_or("(no message)"))
        }
        other => anyhow::anyhow!("cannot reach the gateway: {other}"),
    }
}

pub fn device(g: &Global, cmd: DeviceCommand) -> Result<()> {
    let cfg = Config::load(g.config.as_deref(), &g.data_dir())?;
    let url = cfg.gateway_url();
    match cmd {
        DeviceCommand::Keygen { out, p256 } => {
            if out.exists() {
                bail!("{} exists; not overwriting a key", out.display());
            }
            let k = new_key(p256)?;
            write_key(&out, &k)?;
            println!("public key: {}", k.public_key());
            println!("device id : {}", k.public_key().device_id());
            Ok(())
        }
        DeviceCommand::Enroll { public_key, key, name, mqtt_password_file } => {
            let pk = match (public_key, &key) {
                (Some(p), None) => p.parse::<PublicKey>().map_err(|e| anyhow::anyhow!("public key: {e}"))?,
                (None, Some(f)) => read_key(f)?.public_key(),
                _ => bail!("give either a public key or --key FILE"),
            };
            let r = enroll(g, &url, &pk, name.as_deref())?;
            println!("enrolled {} as {}", r["device"]["id"].as_str().unwrap_or(""), r["device"]["name"].as_str().unwrap_or(""));
            let password = mqtt_password_of(&r)?;
            match mqtt_password_file.or_else(|| key.as_deref().map(mqtt_file)) {
                Some(f) => {
                    bitmote_chain::wallet::write_secret(&f, format!("{password}\n").as_bytes())?;
                    println!("mqtt user {} (password in {}, 0600)", r["mqtt"]["username"].as_str().unwrap_or(""), f.display());
                }
                None => {
                    println!("mqtt user {} password {password} (shown once; keep it secret)", r["mqtt"]["username"].as_str().unwrap_or(""))
                }
            }
            Ok(())
        }
        DeviceCommand::Revoke { device_id, reason } => {
            let _: DeviceId = device_id.parse().map_err(|e| anyhow::anyhow!("device id: {e}"))?;
            admin_request(g, "POST", &format!("{url}/v1/devices/{device_id}/revoke"))?
                .send_json(json!({ "reason": reason }))
                .map_err(api_err)?;
            println!("revoked {device_id}");
            Ok(())
        }
        DeviceCommand::List => {
            let r: Json = ureq::get(&format!("{url}/v1/devices")).call().map_err(api_err)?.into_json()?;
            for d in r["devices"].as_array().cloned().unwrap_or_default() {
                let state = if d["revoked_ms"].is_null() { "active" } else { "REVOKED" };
                println!(
                    "{}  {:<20} {:<8} last seq {}",
                    d["id"].as_str().unwrap_or(""),
                    d["name"].as_str().unwrap_or(""),
                    state,
                    d["last_seq"]
                );
            }
            Ok(())
        }
        DeviceCommand::Sensor { key, transport, mqtt, interval_ms, batch, count, mqtt_password_file } => {
            let password = mqtt_password(mqtt_password_file.as_deref(), Some(&key))?;
            sensor(&url, &key, transport, &mqtt, password, Duration::from_millis(interval_ms), batch.max(1), count)
        }
        DeviceCommand::Actuator { name, mqtt, state, count, key, mqtt_password_file, gpio, light } => {
            let user = match &key {
                Some(k) => read_key(k)?.public_key().device_id().to_string(),
                None => name.clone(),
            };
            let login = mqtt_password(mqtt_password_file.as_deref(), key.as_deref())?.map(|p| (user, p));
            actuator(&name, &mqtt, login, &state, count, gpio.as_deref(), light)
        }
        DeviceCommand::Command { key, device, seq, command, network, gateway, domain, expires } => {
            let k = read_key(&key)?;
            let scope = bitmote_actuator::command::Scope { network, gateway: &gateway, domain: &domain, device: &device };
            let payload = bitmote_actuator::command::encode(&k, &scope, seq, expires, &command)?;
            println!("{}", hex::encode(payload));
            Ok(())
        }
    }
}

fn parse_network(s: &str) -> Result<bitmote_chain::bitcoin::Network, String> {
    s.parse()
        .or_else(|_| bitmote_chain::bitcoin::Network::from_core_arg(s))
        .map_err(|_| format!("{s:?} is not a network (bitcoin, testnet, testnet4, signet, regtest)"))
}

/// Where `device enroll --key K` writes the MQTT password: beside the key, `K` with extension `.mqtt`.
pub fn mqtt_file(key: &Path) -> PathBuf {
    key.with_extension("mqtt")
}

/// The device's MQTT password: from `file`, or else from beside its key if there is one.
fn mqtt_password(file: Option<&Path>, key: Option<&Path>) -> Result<Option<String>> {
    let path = match (file, key) {
        (Some(f), _) => f.to_path_buf(),
        (None, Some(k)) if mqtt_file(k).exists() => mqtt_file(k),
        _ => return Ok(None),
    };
    let p = std::fs::read_to_string(&path).with_context(|| format!("reading the MQTT password {}", path.display()))?;
    Ok(Some(p.trim().to_string()))
}

/// Why the broker refused a login, and what to do about it.
fn refused_login(code: rumqttc::ConnectReturnCode) -> String {
    format!(
        "the MQTT broker refused the login ({code:?}): enrol the device (`bitmote device enroll --key FILE --name NAME` writes \
         its password to FILE.mqtt) and give its password (--mqtt-password-file, or --key for actuators)"
    )
}

/// A fresh random device key (BIP340, or P-256).
pub(crate) fn new_key(p256: bool) -> Result<SigningKey> {
    loop {
        let mut s = [0u8; 32];
        getrandom::getrandom(&mut s)?;
        let k = if p256 { SigningKey::p256_from_secret(&s) } else { SigningKey::schnorr_from_secret(&s) };
        if let Ok(k) = k {
            return Ok(k);
        }
    }
}

/// Enrol a device key with the gateway at `url` (admin): what `bitmote device enroll` and
/// the simulated fleet of `bitmote up` both do. The gateway's answer.
pub(crate) fn enroll(g: &Global, url: &str, pk: &PublicKey, name: Option<&str>) -> Result<Json> {
    Ok(admin_request(g, "POST", &format!("{url}/v1/devices"))?
        .send_json(json!({ "public_key": pk.to_string(), "name": name }))
        .map_err(api_err)?
        .into_json()?)
}

fn mqtt_password_of(answer: &Json) -> Result<&str> {
    answer["mqtt"]["password"].as_str().context("the gateway returned no MQTT credentials")
}

/// Make sure the device key at `key` exists, is enrolled under `name` and has its MQTT
/// password beside it (`<key>.mqtt`): what the simulated fleet does for each member. Safe to
/// repeat after a crash at any point: enrolling a key again issues it a new password.
pub(crate) fn ensure_enrolled(g: &Global, url: &str, key: &Path, name: &str) -> Result<()> {
    if !key.exists() {
        write_key(key, &new_key(false)?)?;
    }
    let f = mqtt_file(key);
    if f.exists() {
        return Ok(());
    }
    let pk = read_key(key)?.public_key();
    let answer = enroll(g, url, &pk, Some(name)).with_context(|| format!("enrolling {name}"))?;
    bitmote_chain::wallet::write_secret(&f, format!("{}\n", mqtt_password_of(&answer)?).as_bytes())?;
    Ok(())
}

/// The next sequence number is kept beside the key, so a restarted device never reuses one.
fn seq_file(key: &Path) -> PathBuf {
    key.with_extension("seq")
}

#[allow(clippy::too_many_arguments)]
fn sensor(
    url: &str,
    key: &Path,
    transport: Transport,
    mqtt: &str,
    password: Option<String>,
    interval: Duration,
    batch: usize,
    count: Option<u64>,
) -> Result<()> {
    let k = read_key(key)?;
    let id = k.public_key().device_id();
    let mut seq: u64 = std::fs::read_to_string(seq_file(key)).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(1);
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
    let mut link = match transport {
        Transport::Mqtt => Some(MqttLink::connect(mqtt, &id.to_string(), password)?),
        Transport::Http => None,
    };
    eprintln!("sensor {id} sending over {transport:?} from seq {seq}");
    // Ctrl-C / SIGTERM stop between sends, never between a receipt and its sequence number.
    let stop = crate::node::stop_flag()?;
    while count.is_none_or(|c| sent < c) && !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let n = match count {
            Some(c) => batch.min((c - sent) as usize),
            None => batch,
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
                None => ureq::post(&format!("{url}/v1/readings"))
                    .set("Content-Type", "application/octet-stream")
                    .send_bytes(&payload)
                    .map_err(api_err)
                    .and_then(|r| Ok(r.into_json::<Json>()?)),
            };
            match r {
                Ok(v) => break v,
                Err(e) => {
                    let msg = e.to_string();
                    // Killed after a receipt but before saving the sequence number: go on after
                    // the last one the gateway accepted (the readings are new, with new numbers).
                    if let Some(last) = replayed_after(&msg).filter(|&l| l >= seq) {
                        eprintln!("the gateway already has readings up to seq {last}; going on from {}", last + 1);
                        skip_to = Some(last + 1);
                        break Json::Null;
                    }
                    if msg.contains("answered 4") || msg.contains("refused:") {
                        return Err(e);
                    }
                    // Stopped while the gateway does not answer (`up` killed: its fleet gets
                    // SIGTERM): nothing was acknowledged, so nothing is lost; the next start
                    // sends these readings again, with the same sequence numbers.
                    if stop.load(std::sync::atomic::Ordering::SeqCst) {
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
            bitmote_chain::stream::write_atomic(&seq_file(key), seq.to_string().as_bytes())?;
            continue;
        }
        seq += n as u64;
        sent += n as u64;
        bitmote_chain::stream::write_atomic(&seq_file(key), seq.to_string().as_bytes())?;
        let last = &receipts["receipts"][n - 1];
        println!("{}", json!({ "seq": seq - 1, "reading_id": last["reading_id"], "leaf_index": last["leaf_index"] }));
        std::thread::sleep(interval);
    }
    Ok(())
}

/// The last sequence number the gateway accepted, from its refusal of a replayed one.
fn replayed_after(error: &str) -> Option<u64> {
    let rest = error.split_once("the last accepted for this device is ")?.1;
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// A device's MQTT session: publish on its readings topic, wait for its receipt.
struct MqttLink {
    client: rumqttc::Client,
    rx: std::sync::mpsc::Receiver<(String, Json)>,
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
        let (client, mut conn) = bitmote_gateway::mqtt::client(opts, 64);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let v = serde_json::from_slice(&p.payload).unwrap_or(Json::Null);
                        if tx.send((p.topic.clone(), v)).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                        let _ = tx.send(("$refused".into(), Json::String(refused_login(code))));
                        return;
                    }
                    Err(e) => {
                        eprintln!("mqtt: {e}; reconnecting");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            }
        });
        client.subscribe(bitmote_proto::topic::receipts(device), rumqttc::QoS::AtLeastOnce)?;
        client.subscribe(bitmote_proto::topic::errors(device), rumqttc::QoS::AtLeastOnce)?;
        Ok(MqttLink { client, rx, device: device.to_string() })
    }

    fn send(&mut self, payload: &[u8]) -> Result<Json> {
        self.client.publish(bitmote_proto::topic::readings(&self.device), rumqttc::QoS::AtLeastOnce, false, payload.to_vec())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (topic, v) = self.rx.recv_timeout(left).context("no receipt within 10 s")?;
            if topic == "$refused" {
                bail!("refused: {}", v.as_str().unwrap_or("?"));
            }
            if topic.ends_with("/receipts") {
                return Ok(v);
            }
            if topic.ends_with("/errors") {
                let code = v["code"].as_str().unwrap_or("");
                // Nothing was stored, for a reason that passes (a full disk, a storage error,
                // a stop): the caller sends the same readings again.
                if matches!(code, "disk_full" | "storage" | "shutting_down") {
                    bail!("not stored for now ({code}): {}", v["error"].as_str().unwrap_or("?"));
                }
                bail!("refused: {}", v["error"].as_str().unwrap_or("?"));
            }
        }
    }
}

/// `bitmote proof <reading-id>`.
pub fn proof(g: &Global, id: &str, out: Option<PathBuf>, ots: Option<PathBuf>, reading: Option<PathBuf>) -> Result<()> {
    let cfg = Config::load(g.config.as_deref(), &g.data_dir())?;
    let url = cfg.gateway_url();
    let bundle: Json = ureq::get(&format!("{url}/v1/readings/{id}/proof")).call().map_err(api_err)?.into_json()?;
    let text = serde_json::to_string_pretty(&bundle)?;
    match &out {
        Some(p) => std::fs::write(p, &text)?,
        None => println!("{text}"),
    }
    if bundle["anchor"]["status"] == "pending" {
        eprintln!("PENDING: {}", bundle["anchor"]["message"].as_str().unwrap_or(""));
    }
    if let Some(p) = reading {
        std::fs::write(&p, hex::decode(bundle["reading"].as_str().unwrap_or(""))?)?;
    }
    if let Some(p) = ots {
        let mut bytes = vec![];
        std::io::Read::read_to_end(
            &mut ureq::get(&format!("{url}/v1/readings/{id}/proof.ots")).call().map_err(api_err)?.into_reader(),
            &mut bytes,
        )?;
        std::fs::write(&p, bytes)?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

/// `bitmote verify`.
pub fn verify(
    g: &Global,
    proof: &Path,
    reading: Option<PathBuf>,
    headers: Option<PathBuf>,
    checkpoint_key: Option<String>,
    revoked: Vec<String>,
) -> Result<()> {
    let source: Box<dyn HeaderSource> = match headers {
        Some(p) => Box::new(HeadersFile::read(&p).map_err(|e| anyhow::anyhow!(e))?),
        None => {
            let cfg = Config::load(g.config.as_deref(), &g.data_dir())?;
            let node = crate::node::connect(g, &cfg)?;
            Box::new(node)
        }
    };
    let bytes = std::fs::read(proof).with_context(|| format!("reading {}", proof.display()))?;
    let file = reading.as_ref().map(std::fs::read).transpose().context("reading the reading file")?;
    if bytes.starts_with(bitmote_notary::ots::MAGIC) {
        let Some(file) = file else { bail!("an .ots proof needs --reading FILE (the timestamped file)") };
        let ots = DetachedTimestampFile::deserialize(&bytes)?;
        let (height, time) = verify_ots(&file, &ots, source.as_ref())?;
        println!("OK: Bitcoin block {height} attests the file existed by {time} (unix time)");
        return Ok(());
    }
    let bundle: ProofBundle = serde_json::from_slice(&bytes).context("not a proof bundle (JSON) or an .ots file")?;
    let revoked: Vec<DeviceId> =
        revoked.iter().map(|r| r.parse()).collect::<Result<_, _>>().map_err(|e| anyhow::anyhow!("revoked id: {e}"))?;
    let policy = Policy { reading_file: file.as_deref(), revoked: &revoked, checkpoint_key: checkpoint_key.as_deref() };
    let v = verify_bundle(&bundle, source.as_ref(), &policy)?;
    println!("OK: reading {} of device {}", v.reading_id, v.device);
    println!("    leaf {} of a log of {} readings, anchored in block {} ({})", v.leaf_index, v.tree_size, v.block_height, v.block_hash);
    println!("    existed no later than block time {} (unix)", v.block_time);
    Ok(())
}

/// What a simulated actuator remembers across restarts.
#[derive(serde::Serialize, serde::Deserialize, Default)]
struct ActuatorState {
    /// `open`/`closed` for a lock, `on`/`off` for a relay.
    output: String,
    /// Event ids already handled, so a redelivered command is acknowledged, not repeated.
    done: Vec<String>,
    /// Payments (`txid:vout`) already acted on in light-client mode: each opens once …
    #[serde(default)]
    paid: Vec<String>,
    /// Event ids of the commands executed (acted on), in order: what the device did, for
    /// its operator and for `bitmote drill` (expired or refused ones are in `done` only).
    #[serde(default)]
    executed: Vec<String>,
    /// … net: the payment each executed event id used, so that executing the revert of that
    /// event (a reorg took the payment away) frees it for the action's next generation (the
    /// payment mined again in the new branch, checked again).
    #[serde(default)]
    paid_by: std::collections::BTreeMap<String, String>,
}

/// Whether a command opens (and so, in light-client mode, needs a checked payment).
fn opens(command: &str) -> bool {
    matches!(command, "unlock" | "open" | "on")
}

/// A light-client device's check of the payment a command claims; the outpoint, or why not.
fn check_payment(
    light: &Peers,
    policy: &mut PaymentPolicy,
    a: &LightArgs,
    cmd: &Json,
    paid: &[String],
) -> std::result::Result<String, String> {
    let p = &cmd["payment"];
    if p.is_null() {
        return Err("the command claims no payment: this device acts only on payments it checks itself".into());
    }
    let field = |k: &str| p[k].as_u64().ok_or_else(|| format!("the payment has no {k}"));
    let txid: bitmote_chain::bitcoin::Txid = p["txid"].as_str().unwrap_or("").parse().map_err(|e| format!("payment txid: {e}"))?;
    let address = p["address"].as_str().unwrap_or("");
    let script = address
        .parse::<bitmote_chain::bitcoin::Address<_>>()
        .ok()
        .and_then(|x| x.require_network(a.network).ok())
        .ok_or_else(|| format!("payment address {address:?} is not a {} address", a.network))?
        .script_pubkey();
    if !policy.accepts(&script) {
        return Err(format!("{address} is not an address this device accepts payments to"));
    }
    let vout = u32::try_from(field("vout")?).map_err(|_| "payment vout out of range".to_string())?;
    let outpoint = format!("{txid}:{vout}");
    if paid.contains(&outpoint) {
        return Err(format!("payment {outpoint} was already used"));
    }
    let claim = PaymentClaim {
        txid,
        vout,
        script_pubkey: script,
        min_sat: field("amount_sat")?.max(policy.min_sat),
        height: u32::try_from(field("height")?).map_err(|_| "payment height out of range".to_string())?,
        confirmations: (cmd["confirmations"].as_u64().unwrap_or(0).min(u32::MAX as u64) as u32).max(a.min_confirmations),
    };
    let ok = light.verify_payment(&claim, Duration::from_secs(a.light_wait_secs)).map_err(|e| e.to_string())?;
    eprintln!("payment {outpoint}: {} sat in block {} ({}), {} confirmations", ok.value_sat, ok.height, ok.block_hash, ok.confirmations);
    Ok(outpoint)
}

/// Whether the output drives a GPIO line high.
fn high(output: &str) -> bool {
    matches!(output, "open" | "on")
}

/// A GPIO output line held by the actuator (`--gpio CHIP:LINE`).
#[cfg(feature = "gpio")]
struct Gpio {
    req: gpiocdev::Request,
    offset: u32,
}

#[cfg(feature = "gpio")]
impl Gpio {
    /// Request `spec` (`CHIP:LINE`) as an output, at `high` from the start.
    fn open(spec: &str, high: bool) -> Result<Gpio> {
        let (chip, line) = spec.rsplit_once(':').context("--gpio must be CHIP:LINE, e.g. gpiochip0:17")?;
        let offset: u32 = line.parse().with_context(|| format!("--gpio line {line:?} must be a line offset (a number)"))?;
        let path = if chip.starts_with('/') {
            PathBuf::from(chip)
        } else if chip.chars().all(|c| c.is_ascii_digit()) && !chip.is_empty() {
            PathBuf::from(format!("/dev/gpiochip{chip}"))
        } else {
            Path::new("/dev").join(chip)
        };
        let req = gpiocdev::Request::builder()
            .on_chip(&path)
            .with_consumer("bitmote-actuator")
            .with_line(offset)
            .as_output(gpiocdev::line::Value::from(high))
            .request()
            .with_context(|| format!("requesting GPIO line {offset} of {} as an output", path.display()))?;
        Ok(Gpio { req, offset })
    }

    fn set(&self, high: bool) -> Result<()> {
        self.req.set_value(self.offset, gpiocdev::line::Value::from(high)).context("setting the GPIO line")?;
        Ok(())
    }
}

/// Without the `gpio` feature there is no line to drive.
#[cfg(not(feature = "gpio"))]
struct Gpio;

#[cfg(not(feature = "gpio"))]
impl Gpio {
    fn open(_spec: &str, _high: bool) -> Result<Gpio> {
        anyhow::bail!("this bitmote was built without GPIO support: build it with `cargo build -p bitmote --features gpio`")
    }

    fn set(&self, _high: bool) -> Result<()> {
        Ok(())
    }
}

fn actuator(
    name: &str,
    mqtt: &str,
    login: Option<(String, String)>,
    state_path: &Path,
    count: Option<u64>,
    gpio: Option<&str>,
    la: LightArgs,
) -> Result<()> {
    let mut state: ActuatorState = match std::fs::read(state_path) {
        Ok(b) => serde_json::from_slice(&b).context("corrupt actuator state file")?,
        Err(_) => ActuatorState { output: "closed".into(), ..Default::default() },
    };
    // The line follows the saved state from the start (a restarted lock stays as it was).
    let gpio = gpio.map(|spec| Gpio::open(spec, high(&state.output))).transpose()?;
    if gpio.is_some() {
        eprintln!("actuator {name}: GPIO line driven {}", if high(&state.output) { "high" } else { "low" });
    }
    let mut light = match la.light_client.as_slice() {
        [] => None,
        peers => {
            // Without a policy of its own the device would accept whatever amount and
            // address a (compromised) gateway claims: refuse to start (issue #13, item 12).
            let policy = PaymentPolicy::new(la.network, &la.pay_to, &la.pay_to_descriptor, la.descriptor_max_index, la.min_sat)?;
            let l = Peers::start(peers, la.network)?;
            let tip = l.wait_synced(Duration::from_secs(120))?;
            let names: Vec<String> = l.addrs().map(|a| a.to_string()).collect();
            eprintln!("actuator {name}: light client synced with {} to block {tip}", names.join(", "));
            Some((l, policy))
        }
    };
    let (host, port) = mqtt.rsplit_once(':').context("--mqtt must be host:port")?;
    let presence = format!("bitmote/{name}/presence");
    let mut opts = rumqttc::MqttOptions::new(format!("bitmote-act-{name}"), host, port.parse().context("MQTT port")?);
    if let Some((user, password)) = login {
        opts.set_credentials(user, password);
    }
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_clean_session(false); // the broker keeps commands sent while we were away
    opts.set_last_will(rumqttc::LastWill::new(&presence, "offline", rumqttc::QoS::AtLeastOnce, true));
    let (client, mut conn) = bitmote_gateway::mqtt::client(opts, 64);
    // The connection runs on its own thread, so a payment check waiting for the chain
    // never stalls keep-alives.
    let (ev_tx, events) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for ev in conn.iter() {
            let failed = ev.is_err();
            if ev_tx.send(ev).is_err() {
                return;
            }
            if failed {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    });
    let commands = bitmote_proto::topic::commands(name);
    let acks = bitmote_proto::topic::acks(name);
    eprintln!("actuator {name}: output {} ({} commands done before)", state.output, state.done.len());
    let mut acted = 0u64;
    // With --count: exit once the broker has acknowledged (PUBACK) our last acknowledgement,
    // not on any PUBACK (that of the presence message may come after the command). Our
    // publishes leave in the order made, each reported with its packet id.
    let (mut published, mut sent) = (0u64, 0u64);
    let mut last_ack: Option<u64> = None; // which of our publishes is the final acknowledgement
    let mut last_ack_pkid: Option<u16> = None;
    for ev in events {
        match ev {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                client.try_subscribe(&commands, rumqttc::QoS::AtLeastOnce)?;
                client.try_publish(&presence, rumqttc::QoS::AtLeastOnce, true, "online")?;
                published += 1;
            }
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) if p.topic == commands => {
                let cmd: Json = match serde_json::from_slice(&p.payload) {
                    Ok(v) => v,
                    Err(e) => {
                        eprintln!("ignoring a malformed command: {e}");
                        continue;
                    }
                };
                let Some(id) = cmd["event_id"].as_str().map(str::to_string) else { continue };
                let command = cmd["command"].as_str().unwrap_or("");
                let checked = match &mut light {
                    Some((l, policy)) if opens(command) && !state.done.contains(&id) => {
                        Some(check_payment(l, policy, &la, &cmd, &state.paid))
                    }
                    _ => None,
                };
                if let Some(Err(reason)) = &checked {
                    println!("{}", json!({ "event_id": id, "command": command, "refused": reason }));
                    let ack = json!({ "event_id": id, "result": "refused", "reason": reason });
                    client.try_publish(&acks, rumqttc::QoS::AtLeastOnce, false, ack.to_string())?;
                    published += 1;
                    continue;
                }
                let result = if state.done.contains(&id) {
                    "done" // already executed: acknowledge again, do not act again
                } else {
                    let late = match (cmd["due_ms"].as_u64(), cmd["ttl_ms"].as_u64()) {
                        (Some(due), Some(ttl)) => now_ms() > due + ttl,
                        _ => false,
                    };
                    let result = if late {
                        eprintln!("{id}: arrived after its time-to-live; not executed");
                        "expired"
                    } else {
                        state.output = match command {
                            "unlock" | "open" => "open",
                            "lock" | "close" => "closed",
                            "on" => "on",
                            "off" => "off",
                            other => {
                                eprintln!("{id}: unknown command {other:?}; not executed");
                                "unchanged"
                            }
                        }
                        .replace("unchanged", &state.output);
                        // The real output first: if it fails, nothing is recorded or
                        // acknowledged, so the command comes again.
                        if let Some(g) = &gpio {
                            g.set(high(&state.output))?;
                        }
                        println!("{}", json!({ "event_id": id, "command": cmd["command"], "output": state.output }));
                        acted += 1;
                        state.executed.push(id.clone());
                        if let Some(Ok(outpoint)) = checked {
                            state.paid_by.insert(id.clone(), outpoint.clone());
                            state.paid.push(outpoint);
                        }
                        // A revert undoes the action it names: its payment opens once more, at most.
                        if let Some(outpoint) = cmd["reverts"].as_str().filter(|_| !opens(command)).and_then(|r| state.paid_by.remove(r)) {
                            state.paid.retain(|p| *p != outpoint);
                        }
                        "done"
                    };
                    state.done.push(id.clone());
                    // Durable before the acknowledgement: a crash here re-acknowledges, never repeats.
                    bitmote_chain::stream::write_atomic(state_path, &serde_json::to_vec(&state)?)?;
                    result
                };
                client.try_publish(&acks, rumqttc::QoS::AtLeastOnce, false, json!({ "event_id": id, "result": result }).to_string())?;
                published += 1;
                if count.is_some_and(|c| acted >= c) && last_ack.is_none() {
                    last_ack = Some(published); // exit once the broker has this acknowledgement
                }
            }
            Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => {
                sent += 1;
                if last_ack == Some(sent) {
                    last_ack_pkid = Some(pkid);
                }
            }
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(a))) if last_ack_pkid == Some(a.pkid) => return Ok(()),
            Ok(_) => {}
            Err(rumqttc::ConnectionError::ConnectionRefused(code)) => bail!("{}", refused_login(code)),
            Err(e) => eprintln!("mqtt: {e}; reconnecting"),
        }
    }
    Ok(())
}
