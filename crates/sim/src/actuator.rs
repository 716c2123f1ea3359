//! The simulated actuator (`bitmote device actuator`): a lock or relay's firmware. It
//! receives [`Command`]s over MQTT, acts at most once per event id (its state written
//! before its [`Ack`]), reports its presence, and in light-client mode checks a claimed
//! payment in its own BIP157/158 header chain before it opens.

use std::path::Path;
#[cfg(feature = "gpio")]
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bitmote_chain::now_ms;
use bitmote_light::{PaymentClaim, PaymentPolicy, Peers};
use bitmote_proto::{topic, Ack, AckResult, Command, Presence};
use serde_json::json;

use crate::keys::refused_login;

/// Trust-minimized mode: the device checks payments itself with a BIP157/158 light client.
#[derive(Clone, Debug)]
pub struct LightOptions {
    /// P2P addresses of nodes serving compact block filters (none: trust the gateway).
    pub light_client: Vec<std::net::SocketAddr>,
    pub network: bitmote_chain::bitcoin::Network,
    /// How long to wait for the device's own chain to bury a payment deep enough.
    pub light_wait_secs: u64,
    /// The device's own floor on the amount, whatever the command claims.
    pub min_sat: u64,
    /// The device's own floor on confirmations, whatever the command claims.
    pub min_confirmations: u32,
    /// Accept payments to these addresses …
    pub pay_to: Vec<String>,
    /// … or to the addresses of these public output descriptors (indexes below `descriptor_max_index`).
    pub pay_to_descriptor: Vec<String>,
    pub descriptor_max_index: u32,
}

/// What the actuator does.
pub struct ActuatorOptions<'a> {
    /// Its name in rules (`device = "…"`) and topics.
    pub name: &'a str,
    /// The MQTT broker, `host:port`.
    pub mqtt: &'a str,
    /// Username and password, when the broker asks for a login.
    pub login: Option<(String, String)>,
    pub state: &'a Path,
    /// Exit after acting on this many commands.
    pub count: Option<u64>,
    /// A GPIO line to drive (`CHIP:LINE`, feature `gpio`).
    pub gpio: Option<&'a str>,
    pub light: LightOptions,
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
    a: &LightOptions,
    cmd: &Command,
    paid: &[String],
) -> std::result::Result<String, String> {
    let Some(p) = &cmd.payment else {
        return Err("the command claims no payment: this device acts only on payments it checks itself".into());
    };
    let txid: bitmote_chain::bitcoin::Txid = p.txid.parse().map_err(|e| format!("payment txid: {e}"))?;
    let address = p.address.as_str();
    let script = address
        .parse::<bitmote_chain::bitcoin::Address<_>>()
        .ok()
        .and_then(|x| x.require_network(a.network).ok())
        .ok_or_else(|| format!("payment address {address:?} is not a {} address", a.network))?
        .script_pubkey();
    if !policy.accepts(&script) {
        return Err(format!("{address} is not an address this device accepts payments to"));
    }
    let vout = p.vout;
    let outpoint = format!("{txid}:{vout}");
    if paid.contains(&outpoint) {
        return Err(format!("payment {outpoint} was already used"));
    }
    let claim = PaymentClaim {
        txid,
        vout,
        script_pubkey: script,
        min_sat: p.amount_sat.max(policy.min_sat),
        height: p.height,
        confirmations: cmd.confirmations.unwrap_or(0).max(a.min_confirmations),
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
        bail!("this bitmote was built without GPIO support: build it with `cargo build -p bitmote --features gpio`")
    }

    fn set(&self, _high: bool) -> Result<()> {
        Ok(())
    }
}

/// Run the actuator until `count` commands are acted on (or for ever).
pub fn run(o: ActuatorOptions) -> Result<()> {
    let ActuatorOptions { name, mqtt, login, state: state_path, count, gpio, light: la } = o;
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
    let presence = topic::presence(name);
    let mut opts = rumqttc::MqttOptions::new(format!("bitmote-act-{name}"), host, port.parse().context("MQTT port")?);
    if let Some((user, password)) = login {
        opts.set_credentials(user, password);
    }
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_clean_session(false); // the broker keeps commands sent while we were away
    opts.set_last_will(rumqttc::LastWill::new(&presence, Presence::Offline.as_str(), rumqttc::QoS::AtLeastOnce, true));
    let (client, mut conn) = bitmote_proto::client::mqtt_client(opts, 64);
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
    let commands = topic::commands(name);
    let acks = topic::acks(name);
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
                client.try_publish(&presence, rumqttc::QoS::AtLeastOnce, true, Presence::Online.as_str())?;
                published += 1;
            }
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) if p.topic == commands => {
                let cmd: Command = match bitmote_proto::decode(&p.payload) {
                    Ok(v) => v,
                    Err(e) => {
                        eprintln!("ignoring a malformed command: {e}");
                        continue;
                    }
                };
                let id = cmd.event_id.clone();
                let command = cmd.command.as_str();
                let checked = match &mut light {
                    Some((l, policy)) if opens(command) && !state.done.contains(&id) => {
                        Some(check_payment(l, policy, &la, &cmd, &state.paid))
                    }
                    _ => None,
                };
                if let Some(Err(reason)) = &checked {
                    println!("{}", json!({ "event_id": id, "command": command, "refused": reason }));
                    let ack = Ack::refused(id, reason.clone());
                    client.try_publish(&acks, rumqttc::QoS::AtLeastOnce, false, bitmote_proto::encode(&ack))?;
                    published += 1;
                    continue;
                }
                let result = if state.done.contains(&id) {
                    AckResult::Done // already executed: acknowledge again, do not act again
                } else {
                    let result = if cmd.is_late(now_ms()) {
                        eprintln!("{id}: arrived after its time-to-live; not executed");
                        AckResult::Expired
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
                        println!("{}", json!({ "event_id": id, "command": cmd.command, "output": state.output }));
                        acted += 1;
                        state.executed.push(id.clone());
                        if let Some(Ok(outpoint)) = checked {
                            state.paid_by.insert(id.clone(), outpoint.clone());
                            state.paid.push(outpoint);
                        }
                        // A revert undoes the action it names: its payment opens once more, at most.
                        if let Some(outpoint) = cmd.reverts.as_deref().filter(|_| !opens(command)).and_then(|r| state.paid_by.remove(r)) {
                            state.paid.retain(|p| *p != outpoint);
                        }
                        AckResult::Done
                    };
                    state.done.push(id.clone());
                    // Durable before the acknowledgement: a crash here re-acknowledges, never repeats.
                    bitmote_chain::stream::write_atomic(state_path, &serde_json::to_vec(&state)?)?;
                    result
                };
                client.try_publish(&acks, rumqttc::QoS::AtLeastOnce, false, bitmote_proto::encode(&Ack::new(id, result)))?;
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
