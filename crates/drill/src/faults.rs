//! The faults a round injects, chosen by the seed. Each is something that happens to real
//! deployments: blocks replaced, processes killed or stopped, a terminal's Ctrl-C with the
//! output pipe gone, a node that crashed before flushing its last blocks, node outages,
//! a full disk, a bad network between meter and provider.

use std::fmt;
use std::time::Duration;

use crate::rng::Rng;

/// A process of the system under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    /// `bitmote up`: the gateway (HTTP, the embedded MQTT broker, anchoring, actuators,
    /// its Lightning node) runs in this process.
    Gateway,
    /// The embedded regtest bitcoind.
    Node,
    Meter,
    Provider,
    Sensor,
    Actuator,
}

impl Target {
    pub const ALL: [Target; 6] = [Target::Gateway, Target::Node, Target::Meter, Target::Provider, Target::Sensor, Target::Actuator];

    pub fn name(self) -> &'static str {
        match self {
            Target::Gateway => "gateway",
            Target::Node => "node",
            Target::Meter => "meter",
            Target::Provider => "provider",
            Target::Sensor => "sensor",
            Target::Actuator => "actuator",
        }
    }
}

/// One fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Replace the last `depth` blocks; each transaction in them re-mined, dropped or
    /// double-spent as the seed says.
    Reorg { depth: u32 },
    /// SIGKILL of a process.
    Kill { target: Target },
    /// SIGTERM of a process (a clean stop, as an operator or systemd does).
    Term { target: Target },
    /// `bitmote up 2>&1 | tee`, then Ctrl-C: the output pipe is closed, then SIGINT.
    CtrlCClosedOutput,
    /// Mine a few blocks and SIGKILL the node at once: it may come back without them.
    NodeLosesBlocks { blocks: u32 },
    /// The node stops answering (SIGSTOP) for a while, then resumes (SIGCONT).
    NodeOutage { secs: u64 },
    /// The MQTT broker restarts. The embedded broker runs inside the gateway process, so
    /// this is a clean restart of `bitmote up` (SIGTERM, then start).
    BrokerRestart,
    /// The gateway's file system is full for a while (a ballast file fills a small quota).
    DiskFull { secs: u64 },
    /// Delay and loss on the provider's ports (Lightning and HTTP), in the drill's proxy,
    /// for a while; loss 100 % is a disconnection ([`crate::proxy::Link`]).
    Network { delay_ms: u32, loss_pct: u32, secs: u64 },
}

/// The kinds, for coverage: every kind comes up in the first rounds of any campaign.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Reorg,
    Kill(Target),
    Term(Target),
    CtrlCClosedOutput,
    NodeLosesBlocks,
    NodeOutage,
    BrokerRestart,
    DiskFull,
    NetworkDelayLoss,
    NetworkDisconnect,
}

impl Kind {
    pub fn all(disk: bool) -> Vec<Kind> {
        let mut v = vec![Kind::Reorg, Kind::Reorg, Kind::Reorg];
        for t in Target::ALL {
            v.push(Kind::Kill(t));
            v.push(Kind::Term(t));
        }
        v.extend([Kind::CtrlCClosedOutput, Kind::NodeLosesBlocks, Kind::NodeOutage, Kind::BrokerRestart]);
        if disk {
            v.push(Kind::DiskFull);
        }
        v.extend([Kind::NetworkDelayLoss, Kind::NetworkDisconnect]);
        v
    }

    /// The name the report counts faults of this kind under.
    pub fn name(self) -> String {
        self.instance(&mut Rng::new(0), true).kind_name()
    }

    /// A concrete fault of this kind; `quick` keeps waits short (CI).
    pub fn instance(self, rng: &mut Rng, quick: bool) -> Fault {
        let long = |rng: &mut Rng, max: u64| if quick { rng.range(1, max.min(5)) } else { rng.range(1, max) };
        match self {
            Kind::Reorg => Fault::Reorg { depth: rng.range(1, 6) as u32 },
            Kind::Kill(target) => Fault::Kill { target },
            Kind::Term(target) => Fault::Term { target },
            Kind::CtrlCClosedOutput => Fault::CtrlCClosedOutput,
            Kind::NodeLosesBlocks => Fault::NodeLosesBlocks { blocks: rng.range(1, 6) as u32 },
            Kind::NodeOutage => Fault::NodeOutage { secs: long(rng, 60) },
            Kind::BrokerRestart => Fault::BrokerRestart,
            Kind::DiskFull => Fault::DiskFull { secs: long(rng, 20) },
            Kind::NetworkDelayLoss => {
                Fault::Network { delay_ms: rng.range(20, 800) as u32, loss_pct: rng.range(0, 30) as u32, secs: long(rng, 30) }
            }
            Kind::NetworkDisconnect => Fault::Network { delay_ms: 0, loss_pct: 100, secs: long(rng, 30) },
        }
    }
}

impl Fault {
    /// The name the report counts it under.
    pub fn kind_name(&self) -> String {
        match self {
            Fault::Reorg { .. } => "reorg".into(),
            Fault::Kill { target } => format!("kill -9 {}", target.name()),
            Fault::Term { target } => format!("SIGTERM {}", target.name()),
            Fault::CtrlCClosedOutput => "Ctrl-C of up, output closed".into(),
            Fault::NodeLosesBlocks { .. } => "node crash losing blocks".into(),
            Fault::NodeOutage { .. } => "node outage".into(),
            Fault::BrokerRestart => "broker restart".into(),
            Fault::DiskFull { .. } => "disk full".into(),
            Fault::Network { loss_pct: 100, .. } => "meter-provider disconnection".into(),
            Fault::Network { .. } => "meter-provider delay and loss".into(),
        }
    }

    pub fn duration(&self) -> Duration {
        match self {
            Fault::NodeOutage { secs } | Fault::DiskFull { secs } | Fault::Network { secs, .. } => Duration::from_secs(*secs),
            _ => Duration::ZERO,
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Reorg { depth } => write!(f, "reorg of depth {depth}"),
            Fault::NodeLosesBlocks { blocks } => write!(f, "node killed right after {blocks} new blocks"),
            Fault::NodeOutage { secs } => write!(f, "node outage of {secs} s"),
            Fault::DiskFull { secs } => write!(f, "gateway disk full for {secs} s"),
            Fault::Network { delay_ms, loss_pct, secs } => write!(f, "provider link: {delay_ms} ms delay, {loss_pct} % loss for {secs} s"),
            other => write!(f, "{}", other.kind_name()),
        }
    }
}
