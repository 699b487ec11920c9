//! `meshlink-natbench`: NAT traversal measured on the namespace NAT bed (issue 10 item 9).
//!
//! ```text
//! cargo build --release -p meshlink-agent -p meshlink-coordinator -p meshctl -p meshlink-natbench
//! sudo target/release/meshlink-natbench [--rounds N] [--seconds S] [--only CASE,...] [--json FILE]
//! ```
//!
//! In one run, side by side, two agents behind two masquerading nftables routers
//! (`meshlink_tests::nat::NatMesh`, coordinator on the simulated internet):
//! - for a direct path, a path relayed by the coordinator over UDP (UDP blocked except to the
//!   coordinator) and one relayed over TLS/TCP (no UDP at all): the time from agent start to
//!   the first ping answered both ways, then TCP throughput (`iperf3`, one stream) and ping
//!   RTT idle and under that flow ([`measure::path_round`]);
//! - the upgrade from relay to direct once the block is lifted under a 10 ms ping
//!   ([`measure::upgrade_round`]).
//!
//! Every round starts a fresh bed, coordinator and agents; the path cases rotate their order
//! each round, the upgrade comes last. A case that cannot be measured (the TCP relay before
//! the coordinator listens on TCP, say) is reported as such with its error, never skipped
//! silently. Progress goes to stderr; the tables, then the JSON summary, to stdout.
//!
//! The binaries under test are the release builds next to this one (`--bin-dir`), passed to
//! the test bed through `MESHLINK_AGENT_BIN`, `MESHLINK_COORDINATOR_BIN` and
//! `MESHLINK_MESHCTL_BIN`. Needs root, `/dev/net/tun`, `nft`, `iperf3` and `ping`.

mod iperf;
mod measure;
mod ping;
mod report;

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use serde_json::{json, Value};

use measure::PathCase;
use report::Results;

/// NAT traversal benchmark: first packet, throughput and latency direct vs relayed over UDP
/// vs relayed over TCP, and the relay-to-direct upgrade.
#[derive(Debug, Parser)]
#[command(name = "meshlink-natbench", version)]
struct Cli {
    /// Rounds of every case, each on fresh agents.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    rounds: u32,
    /// Length of each TCP flow (`iperf3 -t`), seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(3..=120))]
    seconds: u32,
    /// Only these cases.
    #[arg(long, value_delimiter = ',', default_values_t = Case::all())]
    only: Vec<Case>,
    /// Where the agent, coordinator and meshctl binaries are: by default the directory of
    /// this executable (`target/release`).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Also write the JSON summary to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Copy every round's logs (agents, coordinator, ping, iperf3) into DIR/CASE-ROUND/.
    #[arg(long, value_name = "DIR")]
    keep_logs: Option<PathBuf>,
}

/// What can be measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Case {
    /// Direct path through two masquerading routers.
    Direct,
    /// Relayed by the coordinator over QUIC (UDP).
    RelayUdp,
    /// Relayed by the coordinator over TLS/TCP.
    RelayTcp,
    /// Relay to direct once UDP is allowed.
    Upgrade,
}

impl Case {
    fn all() -> Vec<Case> {
        Case::value_variants().to_vec()
    }

    fn path(self) -> Option<PathCase> {
        match self {
            Case::Direct => Some(PathCase::Direct),
            Case::RelayUdp => Some(PathCase::RelayUdp),
            Case::RelayTcp => Some(PathCase::RelayTcp),
            Case::Upgrade => None,
        }
    }
}

impl std::fmt::Display for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = self.to_possible_value().map(|v| v.get_name().to_owned());
        f.write_str(name.as_deref().unwrap_or("?"))
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if !nix::unistd::geteuid().is_root() || !Path::new("/dev/net/tun").exists() {
        bail!("meshlink-natbench needs root and /dev/net/tun (it builds network namespaces)");
    }
    for (tool, package) in [
        ("iperf3", "iperf3"),
        ("ping", "iputils-ping"),
        ("nft", "nftables"),
    ] {
        meshlink_tests::require_tool(tool, package);
    }
    let bin_dir = match &cli.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()
            .context("path of this executable")?
            .parent()
            .context("directory of this executable")?
            .to_owned(),
    };
    for (var, name) in [
        ("MESHLINK_AGENT_BIN", "meshlink-agent"),
        ("MESHLINK_COORDINATOR_BIN", "meshlink-coordinator"),
        ("MESHLINK_MESHCTL_BIN", "meshctl"),
    ] {
        let path = bin_dir.join(name);
        if !path.is_file() {
            bail!(
                "{} does not exist: cargo build --release -p meshlink-agent -p \
                 meshlink-coordinator -p meshctl (or pass --bin-dir)",
                path.display()
            );
        }
        // Set before any thread starts; the test bed reads these to find the binaries.
        std::env::set_var(var, &path);
    }
    // Fails here, not in the first round, when the agent was built with `mock-clock`.
    meshlink_tests::agent_bin();

    let meta_start = meta(&cli, &bin_dir);
    eprintln!(
        "natbench: {}",
        serde_json::to_string(&meta_start).unwrap_or_default()
    );
    let started = Instant::now();
    let results = run(&cli);
    let mut meta = meta_start;
    meta["load_end"] = json!(loadavg());
    meta["duration_s"] = json!(started.elapsed().as_secs());

    println!("{}", report::table(&results));
    let summary = report::summary(&results, meta);
    let text = serde_json::to_string_pretty(&summary)?;
    println!("{text}");
    if let Some(path) = &cli.json {
        std::fs::write(path, format!("{text}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Every round of every case asked for.
fn run(cli: &Cli) -> Results {
    let cases: Vec<PathCase> = PathCase::ALL
        .into_iter()
        .filter(|c| cli.only.iter().any(|o| o.path() == Some(*c)))
        .collect();
    let mut results = Results {
        paths: cases.iter().map(|c| (*c, Vec::new())).collect(),
        upgrade: cli.only.contains(&Case::Upgrade).then(Vec::new),
    };
    for round in 0..cli.rounds as usize {
        for i in 0..cases.len() {
            let slot = (i + round) % cases.len();
            let case = cases[slot];
            eprintln!(
                "natbench: round {} of {}: {}",
                round + 1,
                cli.rounds,
                case.name()
            );
            let sample =
                guarded(|| measure::path_round(case, cli.seconds, round, cli.keep_logs.as_deref()));
            match &sample {
                Ok(s) => eprintln!(
                    "natbench:   first ping {:.2} s ({} / {}), {:.0} Mbit/s, ping idle {:.2} \
                     ms, under load {:.2} ms",
                    s.first_ping_s,
                    s.path_at_first_ping[0],
                    s.path_at_first_ping[1],
                    s.tcp.mbit_s,
                    s.ping_idle.avg_ms,
                    s.ping_load.avg_ms
                ),
                Err(e) => eprintln!("natbench:   not measured: {e}"),
            }
            results.paths[slot].1.push(sample);
        }
        if let Some(upgrade) = &mut results.upgrade {
            eprintln!("natbench: round {} of {}: upgrade", round + 1, cli.rounds);
            let sample = guarded(|| measure::upgrade_round(round, cli.keep_logs.as_deref()));
            match &sample {
                Ok(s) => eprintln!(
                    "natbench:   direct both ways {:.2} s after the lift, longest ping gap {:.0} \
                     ms, {} lost",
                    s.direct_s, s.longest_gap_ms, s.lost
                ),
                Err(e) => eprintln!("natbench:   not measured: {e}"),
            }
            upgrade.push(sample);
        }
    }
    results
}

/// Runs one round; a panic of the test bed (a helper that could not set something up)
/// becomes that round's error. The bed's guards clean up as the panic unwinds.
fn guarded<T>(round: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    std::panic::catch_unwind(AssertUnwindSafe(round)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "a panic without a message".into());
        Err(format!("panicked: {message}"))
    })
}

/// What the figures depend on: machine, load, commit, binaries, command.
fn meta(cli: &Cli, bin_dir: &Path) -> Value {
    let repo = bin_dir
        .ancestors()
        .find(|d| d.join("Cargo.toml").is_file() && d.join(".git").exists())
        .map(Path::to_path_buf);
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git")
            .arg("-C")
            .arg(repo.as_ref()?)
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
    };
    // Changes not in the commit to the sources of the binaries under test.
    let uncommitted: Vec<String> = git(&[
        "status",
        "--porcelain",
        "--",
        "agent",
        "coordinator",
        "proto",
        "tls",
        "meshctl",
        "Cargo.lock",
    ])
    .map(|s| s.lines().map(|l| l.trim().to_owned()).collect())
    .unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| {
        c.lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, m)| m.trim().to_owned())
    });
    let first_line = |program: &str, args: &[&str]| -> Option<String> {
        let out = Command::new(program).args(args).output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines().next().map(|l| l.trim().to_owned())
    };
    let binaries: Vec<Value> = ["meshlink-agent", "meshlink-coordinator", "meshctl"]
        .iter()
        .map(|name| {
            let path = bin_dir.join(name);
            let modified = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs());
            json!({"path": path, "modified_unix": modified})
        })
        .collect();
    json!({
        "commit": git(&["rev-parse", "--short", "HEAD"]),
        "uncommitted_sources": uncommitted,
        "started_utc": first_line("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]),
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(usize::from).ok(),
        "kernel": first_line("uname", &["-r"]),
        "iperf3": first_line("iperf3", &["--version"]),
        "load_start": loadavg(),
        "rustc_running": first_line("pgrep", &["-c", "rustc"]),
        "binaries": binaries,
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "rounds": cli.rounds,
        "seconds": cli.seconds,
    })
}

/// `/proc/loadavg`'s three averages.
fn loadavg() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(
        text.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    )
}
