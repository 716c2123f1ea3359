//! `bitmote`: the one binary. A thin command line over the library crates:
//! parse arguments, load configuration, call into `bitmote-chain` (and, as they
//! land, the notary, actuator, payment and gateway crates), report errors.

/// `println!` that never panics: stdout may be a pipe whose reader is gone (`bitmote up |
/// tee up.log`, where the same Ctrl-C ends `tee`); losing a line of output must never
/// abort a clean shutdown.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

mod api;
mod config;
mod device;
mod node;
mod pay;
mod rules;
mod status;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

/// bitmote joins IoT devices to Bitcoin: notarized sensor data, actuators that react to
/// chain events exactly once, and machine-to-machine Lightning micropayments.
///
/// With no configuration, bitmote runs a private regtest Bitcoin node in its data
/// directory, so everything works on one machine out of the box.
#[derive(Parser, Debug)]
#[command(name = "bitmote", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Where bitmote keeps its state (node data, logs, cursors).
    #[arg(long, global = true, env = "BITMOTE_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Configuration file (TOML). Default: <data-dir>/bitmote.toml if it exists.
    #[arg(long, short = 'c', global = true, env = "BITMOTE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// More log output (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(long, short = 'v', global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Log format on stderr: `text` for people, `json` (one object per line) for log
    /// collectors.
    #[arg(long, global = true, env = "BITMOTE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl Global {
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(|| dirs::data_dir().unwrap_or_else(|| PathBuf::from(".")).join("bitmote"))
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run bitmote: the Bitcoin node, the gateway and (on regtest) a simulated fleet, until Ctrl-C.
    Up(node::UpArgs),
    /// Health of a running `bitmote up`: node, gateway, MQTT, anchoring, devices, fleet, Lightning.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Install, start, stop and inspect the regtest Bitcoin node.
    #[command(subcommand)]
    Node(node::NodeCommand),
    /// Follow the chain.
    #[command(subcommand)]
    Chain(node::ChainCommand),
    /// Device keys, enrolment, and a simulated sensor.
    #[command(subcommand)]
    Device(device::DeviceCommand),
    /// Actuator rules on the running gateway (admin).
    #[command(subcommand)]
    Rules(rules::RulesCommand),
    /// Fetch the proof of a reading from the gateway (JSON bundle, optionally .ots).
    Proof {
        /// Reading id (64 hex digits, as in the receipt).
        reading_id: String,
        /// Write the bundle here instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Also write the OpenTimestamps proof here.
        #[arg(long, value_name = "FILE")]
        ots: Option<PathBuf>,
        /// Also write the reading file (its canonical encoding) here.
        #[arg(long, value_name = "FILE")]
        reading: Option<PathBuf>,
    },
    /// Verify a proof bundle or .ots file against block headers (a node, or a headers file).
    Verify {
        /// The proof: a bundle (JSON) or an .ots file.
        proof: PathBuf,
        /// The reading file the proof is about (required for .ots).
        #[arg(long, value_name = "FILE")]
        reading: Option<PathBuf>,
        /// Headers file (`<height> <header hex>` per line) for offline verification.
        #[arg(long, value_name = "FILE")]
        headers: Option<PathBuf>,
        /// The gateway's checkpoint verifier key, to check the signed checkpoint.
        #[arg(long, value_name = "VKEY")]
        checkpoint_key: Option<String>,
        /// Device ids to treat as revoked.
        #[arg(long, value_name = "DEVICE_ID")]
        revoked: Vec<String>,
    },
    /// The energy provider of streaming Lightning micropayments.
    #[command(subcommand)]
    Provider(pay::ProviderCommand),
    /// The prepaid energy meter: pays the provider tick by tick over Lightning.
    #[command(subcommand)]
    Meter(pay::MeterCommand),
    /// Measure performance (a report, not a pass/fail test).
    #[command(subcommand)]
    Bench(bitmote_bench::BenchCommand),
    /// A seeded fault campaign against the whole system (its own data directory), with
    /// invariants checked after every round. Exits 1 on any violation.
    Drill(DrillArgs),
}

#[derive(Args, Debug)]
pub struct DrillArgs {
    /// Rounds to run.
    #[arg(long, default_value_t = 20)]
    pub rounds: u32,
    /// The seed: the same seed and rounds inject the same faults in the same order.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Where the drill's system keeps its data and logs (default: a new directory in /tmp,
    /// removed afterwards unless a violation was found or --keep is given).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    #[arg(long)]
    pub keep: bool,
    /// Keep outages and other timed faults to a few seconds (CI).
    #[arg(long)]
    pub quick: bool,
    /// Simulated sensors in the drill's fleet.
    #[arg(long, default_value_t = 3)]
    pub sensors: u32,
    /// Only fault kinds whose report name contains one of these (e.g. `reorg`, `kill -9 node`).
    #[arg(long, value_name = "KIND")]
    pub only: Vec<String>,
    /// Leave out fault kinds whose report name contains one of these.
    #[arg(long, value_name = "KIND")]
    pub except: Vec<String>,
    /// Also write the report as JSON here.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
}

fn init_logs(verbose: u8, format: LogFormat) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // A log line that cannot be written (stderr a pipe whose reader is gone) is dropped:
    // by default tracing-subscriber reports it with `eprintln!`, which panics on that same
    // closed stderr, and a panic on the way out of `up` used to kill bitcoind uncleanly.
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).log_internal_errors(false);
    match format {
        LogFormat::Text => fmt.with_target(false).init(),
        LogFormat::Json => fmt.json().with_current_span(false).init(),
    }
}

fn main() {
    let cli = Cli::parse();
    init_logs(cli.global.verbose, cli.global.log_format);
    if let Err(e) = run(cli) {
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "error: {e:#}");
        std::process::exit(1);
    }
}

/// `bitmote bench …`: bitcoind found (or built, with progress) here, the benchmark run by `bitmote-bench`.
fn bench(c: bitmote_bench::BenchCommand) -> Result<()> {
    let bitcoind = node::install(&bitmote_regtest::provision::InstallOptions::default())?.bitcoind;
    bitmote_bench::run(&bitmote_bench::Env { bitcoind, exe: std::env::current_exe()? }, c)
}

fn drill(a: DrillArgs) -> Result<()> {
    let opts = bitmote_drill::Options {
        seed: a.seed,
        rounds: a.rounds,
        exe: std::env::current_exe()?,
        dir: a.dir,
        keep: a.keep,
        quick: a.quick,
        sensors: a.sensors,
        only: a.only,
        except: a.except,
    };
    let report = bitmote_drill::run(&opts)?;
    report.print();
    if let Some(p) = a.report {
        std::fs::write(&p, serde_json::to_vec_pretty(&report)?)?;
    }
    if !report.violations.is_empty() {
        anyhow::bail!("{} invariant violation(s); data and logs kept in {}", report.violations.len(), report.dir.display());
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    let g = cli.global;
    match cli.command {
        Command::Up(a) => node::up(&g, a),
        Command::Status { json } => status::status(&g, json),
        Command::Node(c) => node::node(&g, c),
        Command::Chain(c) => node::chain(&g, c),
        Command::Bench(c) => bench(c),
        Command::Drill(a) => drill(a),
        Command::Provider(c) => pay::provider(&g, c),
        Command::Meter(c) => pay::meter(&g, c),
        Command::Device(c) => device::device(&g, c),
        Command::Rules(c) => rules::rules(&g, c),
        Command::Proof { reading_id, out, ots, reading } => device::proof(&g, &reading_id, out, ots, reading),
        Command::Verify { proof, reading, headers, checkpoint_key, revoked } => {
            device::verify(&g, &proof, reading, headers, checkpoint_key, revoked)
        }
    }
}
