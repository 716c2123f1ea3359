//! `bitmote device …`, `bitmote proof` and `bitmote verify`: device keys and enrolment,
//! the simulated sensor and actuator (`bitmote-sim`), and proofs fetched from the gateway
//! and checked against the chain without it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bitmote_device::{DeviceId, PublicKey};
use bitmote_notary::ots::DetachedTimestampFile;
use bitmote_notary::proof::ProofBundle;
use bitmote_notary::verify::{verify_bundle, verify_ots, HeaderSource, HeadersFile, Policy};
use bitmote_proto::client::Gateway;
use bitmote_sim::actuator::{self, ActuatorOptions, LightOptions};
use bitmote_sim::keys::{self, mqtt_file, mqtt_password, new_key, read_key, write_key};
use bitmote_sim::sensor::{self, SensorOptions};
use clap::{Subcommand, ValueEnum};
use serde_json::Value as Json;

use crate::api::{admin, api_err};
use crate::config::Config;
use crate::Global;

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

impl From<Transport> for sensor::Transport {
    fn from(t: Transport) -> Self {
        match t {
            Transport::Mqtt => sensor::Transport::Mqtt,
            Transport::Http => sensor::Transport::Http,
        }
    }
}

impl From<LightArgs> for LightOptions {
    fn from(a: LightArgs) -> Self {
        LightOptions {
            light_client: a.light_client,
            network: a.network,
            light_wait_secs: a.light_wait_secs,
            min_sat: a.min_sat,
            min_confirmations: a.min_confirmations,
            pay_to: a.pay_to,
            pay_to_descriptor: a.pay_to_descriptor,
            descriptor_max_index: a.descriptor_max_index,
        }
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
            let r = keys::enroll(&admin(g, &url)?, &pk, name.as_deref())?;
            println!("enrolled {} as {}", r.device.id, r.device.name);
            let password = &r.mqtt.password;
            match mqtt_password_file.or_else(|| key.as_deref().map(mqtt_file)) {
                Some(f) => {
                    bitmote_chain::wallet::write_secret(&f, format!("{password}\n").as_bytes())?;
                    println!("mqtt user {} (password in {}, 0600)", r.mqtt.username, f.display());
                }
                None => println!("mqtt user {} password {password} (shown once; keep it secret)", r.mqtt.username),
            }
            Ok(())
        }
        DeviceCommand::Revoke { device_id, reason } => {
            let _: DeviceId = device_id.parse().map_err(|e| anyhow::anyhow!("device id: {e}"))?;
            admin(g, &url)?.revoke(&device_id, &reason)?;
            println!("revoked {device_id}");
            Ok(())
        }
        DeviceCommand::List => {
            for d in Gateway::new(&url).devices()?.devices {
                let state = if d.is_revoked() { "REVOKED" } else { "active" };
                let last = d.last_seq.map_or("null".to_string(), |s| s.to_string());
                println!("{}  {:<20} {:<8} last seq {last}", d.id, d.name, state);
            }
            Ok(())
        }
        DeviceCommand::Sensor { key, transport, mqtt, interval_ms, batch, count, mqtt_password_file } => {
            let password = mqtt_password(mqtt_password_file.as_deref(), Some(&key))?;
            sensor::run(SensorOptions {
                gateway: &Gateway::new(&url),
                key: &key,
                transport: transport.into(),
                mqtt: &mqtt,
                password,
                interval: Duration::from_millis(interval_ms),
                batch: batch.max(1),
                count,
                stop: crate::node::stop_flag()?,
            })
        }
        DeviceCommand::Actuator { name, mqtt, state, count, key, mqtt_password_file, gpio, light } => {
            let user = match &key {
                Some(k) => read_key(k)?.public_key().device_id().to_string(),
                None => name.clone(),
            };
            let login = mqtt_password(mqtt_password_file.as_deref(), key.as_deref())?.map(|p| (user, p));
            actuator::run(ActuatorOptions {
                name: &name,
                mqtt: &mqtt,
                login,
                state: &state,
                count,
                gpio: gpio.as_deref(),
                light: light.into(),
            })
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
