//! `meshlink-loadgen`: the control-plane propagation benchmark. See `README.md` beside
//! `Cargo.toml` for what it measures and how to read the results.
//!
//! Phases:
//!
//! ```text
//! start M coordinators in-process (one on SQLite, or several sharing PostgreSQL) or use an
//! external one
//!   ─> admin API (of the first coordinator): a network and a join token with N uses
//!   ─> ramp: N agents join over QUIC at a controlled pace, agent i on coordinator i % M
//!      (each join is a change, so the ramp costs O(N²) bytes in total; it is reported, not
//!      measured)
//!   ─> drain: wait until every agent holds the network's version
//!   ─> K changes, one at a time: an existing agent reports new endpoints (to its
//!      coordinator; the others learn it through the database); time until every agent has
//!      applied the delta, bytes on the wire, CPU
//!   ─> check every agent's map against its coordinator's, and the coordinators' maps
//!      against each other; report, shut down, remove the private database and state
//! ```

/// mimalloc rather than glibc's allocator: the control messages a daemon decodes are many
/// small allocations freed on other threads, which glibc's arenas serve slowly and keep.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use meshlink_coordinator::config::StoreLocation;
use meshlink_coordinator::server::Limits;
use meshlink_coordinator::service::Service;
use meshlink_coordinator::Coordinator;
use meshlink_loadgen::admin::{Admin, NetworkState};
use meshlink_loadgen::agent::{Offers, Shared};
use meshlink_loadgen::coordinators::{self, Cleanup, CleanupHandle, StoreChoice};
use meshlink_loadgen::fleet::{Fleet, RampKind, RampPlan};
use meshlink_loadgen::report::{ChangeResult, RampResult, RunReport, Spread};
use meshlink_loadgen::scoreboard::Scoreboard;
use meshlink_loadgen::sys;
use meshlink_loadgen::table::{map_digest, TableKind};
use meshlink_proto::token::JoinToken;

/// Above this many agents, `--map auto` keeps digests instead of whole maps (see `table.rs`).
const FULL_MAP_AGENTS: usize = 2000;
/// Traffic and CPU of a change are read this long after the last agent applied it, so that
/// the acknowledgements (delayed up to 25 ms by QUIC) and the coordinator's retransmissions
/// of deltas whose acknowledgement was dropped (after a probe timeout of some tens of
/// milliseconds on loopback) are counted with it.
const SETTLE: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RampArg {
    /// Every agent joins and stays connected; each join is a delta to every agent already
    /// connected (N²/2 deltas in all).
    Live,
    /// Every agent joins and disconnects after its welcome, then every agent connects with
    /// its node credentials (no deltas; each still receives a full map).
    Enroll,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ChangeArg {
    /// An agent reports new endpoints.
    Endpoints,
    /// An operator sets a new version of the network's policy (`--policy-rules` rules over
    /// tags, one of which lets every agent reach every other on one port, so need to know
    /// leaves every peer in every map and the delta carries the policy alone; how many rules
    /// each version changes: `--policy-edit`; which rules concern the agents:
    /// `--policy-scope`).
    Policy,
    /// An operator moves a workload between two agents (nodes 1 and 2; simulated agents are
    /// ready at once, so the destination's preparation costs a round trip): from the request
    /// until every agent has the move is the control plane's move time at this mesh size.
    Move,
}

/// The workload `--change move` moves.
const MOVED_WORKLOAD: &str = "loadgen-move";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PolicyScope {
    /// The first rule concerns every agent, the others none (each agent gets one rule).
    First,
    /// Every rule concerns every agent (each agent gets the whole policy): the worst case.
    Every,
}

/// How many rules of the policy each `--change policy` changes (their ports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PolicyEditArg {
    /// This many: the first rule, and the others spread over the file, different each time.
    Rules(usize),
    /// Every rule: the whole policy replaced.
    All,
}

impl std::str::FromStr for PolicyEditArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(PolicyEditArg::All),
            n => match n.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(PolicyEditArg::Rules(n)),
                _ => Err(format!(
                    "{s:?}: expected a number of rules (1 or more) or \"all\""
                )),
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum MapArg {
    /// Whole maps up to 2,000 agents, digests above.
    Auto,
    /// A whole `Netmap` per agent, as the real agent (about 300 B per peer per agent).
    Full,
    /// A digest per peer per agent.
    Compact,
}

/// Measures how one change to a network's map reaches N agents over real QUIC on loopback.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Simulated agents.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Measured changes.
    #[arg(long, default_value_t = 20)]
    changes: usize,
    /// Unmeasured changes before the measured ones.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Write the full report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// How agents come online before the measurement.
    #[arg(long, value_enum, default_value_t = RampArg::Live)]
    ramp: RampArg,
    /// Joins in flight at once during the ramp.
    #[arg(long, default_value_t = 16)]
    join_concurrency: usize,
    /// Joins started per second at most (0: as fast as --join-concurrency allows).
    #[arg(long, default_value_t = 0.0)]
    join_rate: f64,
    /// Client UDP sockets the agents' connections are spread over [default: one per 100
    /// agents, 1 to 32]. Each real agent has a socket of its own; agents that share one share
    /// its receive buffer, and a change of 17 KB to each of 500 agents behind one socket
    /// overflowed it (thousands of datagrams dropped and resent a change).
    #[arg(long)]
    client_endpoints: Option<usize>,
    /// Receive and send buffer asked for each client socket, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    socket_buffer: usize,
    /// How agents hold their maps.
    #[arg(long, value_enum, default_value_t = MapArg::Auto)]
    map: MapArg,
    /// What one change is.
    #[arg(long, value_enum, default_value_t = ChangeArg::Endpoints)]
    change: ChangeArg,
    /// Rules of the policy each `--change policy` sets.
    #[arg(long, default_value_t = 1000)]
    policy_rules: usize,
    /// Rules each `--change policy` changes: a number (the first rule and others spread over
    /// the file), or `all` (every rule: the whole policy replaced).
    #[arg(long, default_value = "1")]
    policy_edit: PolicyEditArg,
    /// Which rules of the policy concern the agents.
    #[arg(long, value_enum, default_value_t = PolicyScope::First)]
    policy_scope: PolicyScope,
    /// Agents do not say in their hello that they take policy edits: every policy change
    /// reaches them whole, as it reaches agents from before edits.
    #[arg(long)]
    no_policy_edits: bool,
    /// Agents do not say in their hello that they take compressed records: every message
    /// reaches them as it is, as it reaches agents from before compression.
    #[arg(long)]
    no_compression: bool,
    /// Pause between changes, in milliseconds.
    #[arg(long, default_value_t = 200)]
    interval_ms: u64,
    /// How long to wait for one change to reach every agent, in seconds.
    #[arg(long, default_value_t = 60)]
    change_timeout_secs: u64,
    /// How long to wait for the agents to drain after the ramp, in seconds.
    #[arg(long, default_value_t = 1800)]
    drain_timeout_secs: u64,
    /// The in-process coordinator's `session_queue` limit [default: N + 256, so that no
    /// agent is dropped as lagging during the ramp; the coordinator's own default is 256].
    #[arg(long)]
    session_queue: Option<usize>,
    /// In-process coordinators sharing one PostgreSQL database (`--store`); agent i
    /// connects to coordinator i % M, admin calls go to the first.
    #[arg(long, default_value_t = 1, conflicts_with = "coordinator")]
    coordinators: usize,
    /// The in-process coordinators' store: `sqlite` (one coordinator only), `postgres` (a
    /// private PostgreSQL cluster started for the run, removed at its end) or a PostgreSQL
    /// URL [default: sqlite for one coordinator, postgres for several].
    #[arg(long, value_parser = StoreChoice::parse, conflicts_with = "coordinator")]
    store: Option<StoreChoice>,
    /// Worker threads of the in-process coordinators' runtime (one runtime for all).
    #[arg(long, default_value_t = 2)]
    coordinator_threads: usize,
    /// Worker threads of the agents' runtime.
    #[arg(long, default_value_t = 2)]
    agent_threads: usize,
    /// The network to create [default: loadgen-<agents>-<pid>].
    #[arg(long)]
    network: Option<String>,
    /// The network's prefix [default: 100.64.0.0/16, or /10 past 65,000 agents].
    #[arg(long)]
    cidr: Option<String>,
    /// State directory of the in-process coordinator, or the parent of one directory per
    /// coordinator (`coordinator-I`) with several [default: a new one under the temporary
    /// directory, removed at the end].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Keep the in-process coordinator's state directory.
    #[arg(long)]
    keep_state: bool,
    /// Use the coordinator at this QUIC address instead of starting one.
    #[arg(long, requires_all = ["fingerprint", "admin"])]
    coordinator: Option<SocketAddr>,
    /// The external coordinator's certificate fingerprint (hex SHA-256).
    #[arg(long)]
    fingerprint: Option<String>,
    /// The external coordinator's admin API base URL (http://127.0.0.1:7444).
    #[arg(long)]
    admin: Option<String>,
    /// The external coordinator's admin token.
    #[arg(
        long,
        env = "MESHLINK_ADMIN_TOKEN",
        hide_env_values = true,
        conflicts_with = "admin_token_file"
    )]
    admin_token: Option<String>,
    /// A file holding the external coordinator's admin token.
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// No progress lines on standard error.
    #[arg(long, short)]
    quiet: bool,
}

/// Where the agents connect, and how to administer it.
struct Target {
    /// The coordinators' QUIC addresses; agent i connects to `servers[i % len]`.
    servers: Vec<SocketAddr>,
    fingerprint: String,
    /// The first coordinator's admin API.
    admin: Admin,
    /// The in-process coordinators' services (in `servers`' order), to compare the agents'
    /// maps with their own; empty for an external coordinator.
    services: Vec<Arc<Service>>,
    describe: String,
    /// The store in words.
    store: String,
    /// The private PostgreSQL server's process id, for its CPU time.
    store_pid: Option<u32>,
    limits: Vec<String>,
}

/// Set on SIGINT or SIGTERM: nothing is logged any more.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Removes what the run left outside the process (the private PostgreSQL cluster, the
/// temporary state directories) when SIGINT or SIGTERM arrives, then exits with the usual
/// status for the signal. A run ended another way cleans up as `main` returns.
async fn clean_up_on_signal(cleanup: CleanupHandle) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return;
    };
    let status = tokio::select! {
        _ = int.recv() => 130,
        _ = term.recv() => 143,
    };
    eprintln!("interrupted: removing the run's database and state");
    // The coordinators still run and would log every failed query while the database goes.
    INTERRUPTED.store(true, Ordering::Relaxed);
    let _ = tokio::task::spawn_blocking(move || cleanup.clean()).await;
    std::process::exit(status);
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    {
        use tracing_subscriber::filter::{filter_fn, EnvFilter, FilterExt};
        use tracing_subscriber::prelude::*;
        let env = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
        let quiet = filter_fn(|_| !INTERRUPTED.load(Ordering::Relaxed));
        tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_filter(env.and(quiet)),
            )
            .init();
    }
    if args.agents == 0 {
        bail!("--agents must be at least 1");
    }
    if args.coordinators == 0 {
        bail!("--coordinators must be at least 1");
    }
    let store = StoreChoice::for_count(args.store.clone(), args.coordinators)
        .map_err(anyhow::Error::msg)?;
    let n = args.agents;
    let table = match args.map {
        MapArg::Full => TableKind::Full,
        MapArg::Compact => TableKind::Compact,
        MapArg::Auto if n <= FULL_MAP_AGENTS => TableKind::Full,
        MapArg::Auto => TableKind::Compact,
    };

    // What the run leaves outside the process (a private PostgreSQL cluster, temporary
    // state), removed when this is dropped: declared first, so dropped last, after the
    // coordinators, on every way out of `main`.
    let cleanup = Cleanup::default();
    let agent_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.agent_threads.max(1))
        .thread_name("ml-agents")
        .enable_all()
        .build()
        .context("agents' runtime")?;
    agent_rt.spawn(clean_up_on_signal(cleanup.handle()));

    // The coordinators, in-process or not.
    let mut in_process: Option<(tokio::runtime::Runtime, Vec<Coordinator>)> = None;
    let target = match args.coordinator {
        Some(quic) => {
            let token = match (&args.admin_token, &args.admin_token_file) {
                (Some(t), _) => t.clone(),
                (None, Some(path)) => std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?,
                (None, None) => bail!("--coordinator needs --admin-token or --admin-token-file"),
            };
            Target {
                servers: vec![quic],
                fingerprint: args.fingerprint.clone().unwrap_or_default(),
                admin: Admin::new(args.admin.as_deref().unwrap_or_default(), &token),
                services: Vec::new(),
                describe: format!("external coordinator {quic}"),
                store: "external (unknown)".into(),
                store_pid: None,
                limits: Vec::new(),
            }
        }
        None => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(args.coordinator_threads.max(1))
                .thread_name("ml-coord")
                .enable_all()
                .build()
                .context("coordinator's runtime")?;
            let dir = args.state_dir.clone().unwrap_or_else(|| {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos());
                std::env::temp_dir()
                    .join(format!("meshlink-loadgen-{}-{nanos}", std::process::id()))
            });
            if !args.keep_state && args.state_dir.is_none() {
                cleanup.remove_dir_at_end(dir.clone());
            }
            let (location, store_words, store_pid) = match store {
                StoreChoice::Sqlite => (StoreLocation::Sqlite, "sqlite".to_string(), None),
                StoreChoice::PrivatePostgres => {
                    if !args.quiet {
                        eprintln!("starting a private PostgreSQL cluster");
                    }
                    let pg = cleanup
                        .start_private_postgres()
                        .map_err(|e| anyhow::anyhow!("a private PostgreSQL cluster: {e}"))?;
                    let words = format!(
                        "postgres {} (private cluster, Unix socket, fsync off)",
                        pg.version
                    );
                    (StoreLocation::Postgres(pg.url), words, pg.postmaster)
                }
                StoreChoice::Postgres(url) => {
                    let location = StoreLocation::Postgres(url);
                    let words = format!("postgres at {}", location.redacted());
                    (location, words, None)
                }
            };
            let d = Limits::default();
            let mut limits = d.clone();
            // Room for every agent, and a queue that holds every delta of the ramp, so that
            // an agent slowed down by the shared CPU is not dropped as lagging.
            limits.max_connections = d.max_connections.max(n + 64);
            // Every simulated agent comes from 127.0.0.1, where a real fleet comes from many
            // addresses: the caps on connections before the hello are per address, so they
            // are raised to the fleet (else a reconnect wave would queue at 32 at a time).
            limits.max_unauthenticated = d.max_unauthenticated.max(n + 64);
            limits.max_unauthenticated_per_ip = limits.max_unauthenticated;
            limits.session_queue = args
                .session_queue
                .unwrap_or_else(|| d.session_queue.max(n + 256))
                .max(1);
            let limit_words = vec![
                format!("max_connections={}", limits.max_connections),
                format!("session_queue={}", limits.session_queue),
                format!(
                    "max_unauthenticated(_per_ip)={}",
                    limits.max_unauthenticated
                ),
            ];
            let plan = coordinators::Plan {
                count: args.coordinators,
                store: location,
                state_dir: dir,
                limits,
            };
            let started = rt
                .block_on(coordinators::start(&plan))
                .context("starting the coordinators")?;
            let first = &started[0];
            let servers: Vec<SocketAddr> = started.iter().map(Coordinator::quic_addr).collect();
            let quic = servers
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            let target = Target {
                fingerprint: first.fingerprint().to_string(),
                admin: Admin::new(
                    &format!("http://{}", first.admin_addr()),
                    &first.admin_token().value,
                ),
                services: started.iter().map(|c| c.service().clone()).collect(),
                describe: if started.len() == 1 {
                    format!("in-process coordinator, QUIC {quic}")
                } else {
                    format!("{} in-process coordinators, QUIC {quic}", started.len())
                },
                servers,
                store: store_words,
                store_pid,
                limits: limit_words,
            };
            in_process = Some((rt, started));
            target
        }
    };

    let network = args
        .network
        .clone()
        .unwrap_or_else(|| format!("loadgen-{n}-{}", std::process::id()));
    let cidr = args.cidr.clone().unwrap_or_else(|| {
        if n < 65_000 {
            "100.64.0.0/16"
        } else {
            "100.64.0.0/10"
        }
        .to_string()
    });
    target
        .admin
        .create_network(&network, &cidr)
        .context("creating the network")?;
    // N uses, plus a few for joins that are tried again after the coordinator completed
    // them but the agent did not hear back (each such join leaves an offline node).
    let token_uses = (n + (n / 50).max(16)) as u64;
    let text = target
        .admin
        .create_token(&network, token_uses)
        .context("creating the join token")?;
    let token = JoinToken::decode(&text).context("the join token")?;

    let outcome = agent_rt
        .block_on(run(&args, &target, &network, table, &token.secret))
        .map(|mut report| {
            report.token_uses = token_uses;
            report
        });

    if let Some((rt, started)) = in_process {
        rt.block_on(async {
            for coordinator in started {
                coordinator.shutdown().await;
            }
        });
        rt.shutdown_timeout(Duration::from_secs(5));
    }
    agent_rt.shutdown_timeout(Duration::from_secs(5));
    // The coordinators have stopped: the private cluster and temporary state can go.
    drop(cleanup);

    let report = outcome?;
    println!("{}", report.markdown());
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Reads the network's state through the admin API, off the runtime's threads.
async fn network_state(admin: &Admin, network: &str) -> anyhow::Result<NetworkState> {
    let (admin, network) = (admin.clone(), network.to_string());
    Ok(tokio::task::spawn_blocking(move || admin.network(&network)).await??)
}

/// The policy `--change policy` sets, version after version: rule 0 lets every agent (all
/// tagged `loadgen` by their join token) reach every other on one port; rule `i` > 0 speaks
/// of tags, nodes and workloads nobody has, and concerns every agent too (it names
/// `tag:loadgen` as a destination) with [`PolicyScope::Every`]. A change moves the ports of
/// the rules `--policy-edit` says; what each node may see never changes.
#[derive(Debug, Clone)]
struct PolicyFile {
    scope: PolicyScope,
    /// The TCP port of each rule.
    ports: Vec<u16>,
}

impl PolicyFile {
    fn new(rules: usize, scope: PolicyScope) -> Self {
        PolicyFile {
            scope,
            ports: (0..rules.max(1)).map(|i| 1 + (i % 60_000) as u16).collect(),
        }
    }

    /// The rules change `k` edits: rule 0 and `n - 1` others spread over the file, starting
    /// at a different place each time; every rule for [`PolicyEditArg::All`].
    fn edited(&self, k: usize, edit: PolicyEditArg) -> Vec<usize> {
        let rules = self.ports.len();
        let n = match edit {
            PolicyEditArg::All => return (0..rules).collect(),
            PolicyEditArg::Rules(n) => n.min(rules),
        };
        let others = rules - 1;
        let mut out = vec![0];
        if n > 1 {
            let stride = (others / (n - 1)).max(1);
            out.extend((0..n - 1).map(|j| 1 + (k.wrapping_mul(131) + j * stride) % others));
        }
        out
    }

    /// Moves the ports of the rules change `k` edits (each to a port it did not have).
    fn change(&mut self, k: usize, edit: PolicyEditArg) {
        for i in self.edited(k, edit) {
            self.ports[i] = self.ports[i] % 60_000 + 1;
        }
    }

    /// The file.
    fn source(&self) -> String {
        let mut text = format!(
            "[[rule]]\nfrom = [\"tag:loadgen\"]\nto = [\"tag:loadgen\"]\nports = [\"tcp:{}\"]\n",
            self.ports[0]
        );
        for (i, port) in self.ports.iter().enumerate().skip(1) {
            let to = match self.scope {
                PolicyScope::First => format!("tag:server-{i}"),
                PolicyScope::Every => "tag:loadgen".to_string(),
            };
            text.push_str(&format!(
                "\n[[rule]]\nfrom = [\"tag:client-{i}\", \"node:spare-{i}\"]\nto = [\"{to}\", \"workload:svc-{i}\"]\nports = [\"tcp:{port}\", \"udp:53\", \"icmp\"]\n"
            ));
        }
        text
    }
}

/// The endpoint agent `agent` reports for change `k`: distinct for every change.
fn change_endpoint(k: usize) -> SocketAddr {
    let k = u32::try_from(k).unwrap_or(0);
    let ip =
        std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(198, 19, 0, 0)) + (k & 0xffff));
    SocketAddr::from((ip, 40000 + (k % 20000) as u16))
}

/// The agent that makes change `k`: spread over the fleet and, with several coordinators,
/// one of coordinator `k % coordinators`'s agents (agent i is on coordinator
/// i % coordinators), so that every coordinator makes changes in turn.
fn change_agent(k: usize, agents: usize, coordinators: usize) -> usize {
    let spread = (k.wrapping_mul(7919).wrapping_add(13)) % agents;
    let m = coordinators.clamp(1, agents);
    let agent = spread - spread % m + k % m;
    if agent < agents {
        agent
    } else {
        agent - m
    }
}

async fn run(
    args: &Args,
    target: &Target,
    network: &str,
    table: TableKind,
    token: &str,
) -> anyhow::Result<RunReport> {
    let n = args.agents;
    let board = Arc::new(Scoreboard::new(n));
    let shared = Arc::new(Shared {
        servers: target.servers.clone(),
        table,
        board: board.clone(),
        stopping: AtomicBool::new(false),
        offers: Offers {
            policy_edits: !args.no_policy_edits,
            compression: !args.no_compression,
        },
    });
    let plan = RampPlan {
        agents: n,
        kind: match args.ramp {
            RampArg::Live => RampKind::Live,
            RampArg::Enroll => RampKind::Enroll,
        },
        client_endpoints: args
            .client_endpoints
            .unwrap_or_else(|| n.div_ceil(100).clamp(1, 32)),
        concurrency: args.join_concurrency,
        rate: (args.join_rate > 0.0).then_some(args.join_rate),
        socket_buffer: args.socket_buffer,
        progress: !args.quiet,
    };
    let say = |m: String| {
        if !args.quiet {
            eprintln!("{m}");
        }
    };

    // Ramp.
    say(format!(
        "bringing {n} agents online ({:?} ramp) into network {network}, {}, store {} ({} client sockets, {} in flight)",
        plan.kind, target.describe, target.store, plan.client_endpoints, plan.concurrency
    ));
    let udp_start = sys::udp_drops();
    let (fleet, ramp) = Fleet::ramp(shared, &plan, &target.fingerprint, token).await?;
    if args.change == ChangeArg::Move {
        // Made before the drain, so that the changes start from a map that has it.
        let (admin, net) = (target.admin.clone(), network.to_string());
        tokio::task::spawn_blocking(move || admin.create_workload(&net, MOVED_WORKLOAD)).await??;
    }

    // Drain: every agent at the network's version, every agent online.
    let drain_start = Instant::now();
    let mut last_say = Instant::now();
    let version = loop {
        let net = network_state(&target.admin, network).await?;
        let at = board.agents_at(net.version);
        if net.online >= n && at == n {
            break net.version;
        }
        if drain_start.elapsed() > Duration::from_secs(args.drain_timeout_secs) {
            bail!(
                "not drained after {} s: {} of {n} agents at version {}, {} online",
                args.drain_timeout_secs,
                at,
                net.version,
                net.online
            );
        }
        if last_say.elapsed() > Duration::from_secs(5) {
            last_say = Instant::now();
            say(format!(
                "  draining: {at}/{n} agents at version {}, lowest {}, {} online",
                net.version,
                board.lowest_version(),
                net.online
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let drain = drain_start.elapsed();
    let ramp_version = version;
    let agent_ports = fleet.local_ports();
    let socket_drops = || {
        let by_port = sys::udp_drops_by_port();
        let coordinator = target
            .servers
            .iter()
            .filter_map(|s| by_port.get(&s.port()).copied())
            .reduce(|a, b| a + b);
        let agents: u64 = agent_ports.iter().filter_map(|p| by_port.get(p)).sum();
        (coordinator, agents)
    };
    let ramp_socket_drops = socket_drops();
    let ramp_wire = board.wire();
    let udp_ramp = sys::udp_drops().since(&udp_start);
    let memory_after_ramp = sys::memory();
    let counters_after_ramp = board.counters.values();
    say(format!(
        "ramp: {n} online in {:.1} s, drained in {:.1} s at version {version}; RSS {} MiB",
        ramp.duration.as_secs_f64(),
        drain.as_secs_f64(),
        memory_after_ramp.rss >> 20
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Changes.
    let udp_changes_start = sys::udp_drops();
    let mut per_change = Vec::new();
    let m = target.servers.len();
    let mut all = Vec::with_capacity(n * args.changes);
    let mut on_trigger = Vec::new();
    let mut on_others = Vec::new();
    let mut version = version;
    let mut policy = PolicyFile::new(args.policy_rules, args.policy_scope);
    for k in 0..args.warmup + args.changes {
        let agent = change_agent(k, n, m);
        board.arm(version + 1);
        let wire0 = board.wire();
        let cpu0 = sys::cpu();
        let store_cpu0 = target.store_pid.map(sys::process_tree_cpu);
        let trigger = match args.change {
            ChangeArg::Endpoints => {
                let Some(trigger) = fleet
                    .report_endpoints(agent, vec![change_endpoint(k)])
                    .await
                else {
                    bail!("agent {agent} is gone");
                };
                trigger
            }
            ChangeArg::Policy => {
                // The first sets the policy (whole to every agent); each later one changes it.
                if k > 0 {
                    policy.change(k, args.policy_edit);
                }
                let source = policy.source();
                let (admin, net) = (target.admin.clone(), network.to_string());
                let trigger = Instant::now();
                tokio::task::spawn_blocking(move || admin.set_policy(&net, &source)).await??;
                trigger
            }
            ChangeArg::Move => {
                // Node 1 (the warm-up's attach), then 2, 1, 2, ...
                let to = if k % 2 == 0 { "1" } else { "2" };
                let (admin, net) = (target.admin.clone(), network.to_string());
                let trigger = Instant::now();
                let answer = tokio::task::spawn_blocking(move || {
                    admin.move_workload(&net, MOVED_WORKLOAD, to)
                })
                .await??;
                if answer["prepared_ms"].is_null() {
                    say(format!(
                        "  note: node {to} did not report ready for move {k}"
                    ));
                }
                trigger
            }
        };
        let arrivals = board
            .wait(trigger, Duration::from_secs(args.change_timeout_secs))
            .await;
        tokio::time::sleep(SETTLE).await;
        let wire = board.wire().since(&wire0);
        let cpu = sys::cpu_since(&sys::cpu(), &cpu0);
        let store_cpu = target
            .store_pid
            .map(sys::process_tree_cpu)
            .zip(store_cpu0)
            .map(|(later, earlier)| later.saturating_sub(earlier) as f64 / 1e6);
        let latencies: Vec<Duration> = arrivals.latency.iter().flatten().copied().collect();
        let trigger_coordinator = agent % m;
        let (local, remote): (Vec<_>, Vec<_>) = arrivals
            .latency
            .iter()
            .enumerate()
            .filter_map(|(i, l)| l.map(|l| (i % m == trigger_coordinator, l)))
            .partition(|(local, _)| *local);
        let local: Vec<Duration> = local.into_iter().map(|(_, l)| l).collect();
        let remote: Vec<Duration> = remote.into_iter().map(|(_, l)| l).collect();
        let missing = n - latencies.len();
        let net = network_state(&target.admin, network).await?;
        if net.version != version + 1 {
            say(format!(
                "  note: change {k} moved the network from version {version} to {}",
                net.version
            ));
        }
        version = net.version;
        let cpu_ms = |g: &str| cpu.get(g).copied().unwrap_or(0) as f64 / 1e6;
        let result = ChangeResult {
            change: k + 1 - args.warmup.min(k + 1),
            trigger_agent: agent,
            trigger_coordinator,
            version,
            latency: Spread::of(latencies.clone()),
            on_trigger_coordinator: Spread::of(local.clone()),
            on_other_coordinators: Spread::of(remote.clone()),
            missing,
            by_full_map: arrivals.by_full_map,
            frame_bytes: arrivals.frame_bytes,
            wire,
            coordinator_cpu_ms: cpu_ms("coordinator"),
            agents_cpu_ms: cpu_ms("agents"),
            store_cpu_ms: store_cpu,
        };
        if k < args.warmup {
            say(format!(
                "  warm-up change: p99 {:.1} ms, max {:.1} ms",
                result.latency.p99_ms, result.latency.max_ms
            ));
        } else {
            say(format!(
                "  change {}/{}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, {} missing, {} delta bytes, {} wire bytes",
                result.change,
                args.changes,
                result.latency.p50_ms,
                result.latency.p99_ms,
                result.latency.max_ms,
                missing,
                result.frame_bytes,
                result.wire.rx_bytes
            ));
            all.extend(latencies);
            on_trigger.extend(local);
            on_others.extend(remote);
            per_change.push(result);
        }
        if missing > 0 {
            // Let the stragglers catch up before the next change.
            let wait = Instant::now();
            while board.agents_at(version) < n && wait.elapsed() < Duration::from_secs(60) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
    }
    let udp_changes = sys::udp_drops().since(&udp_changes_start);
    let end_socket_drops = socket_drops();

    // Every agent against its coordinator's map, and the coordinators' maps against each
    // other.
    let summaries = fleet.describe().await;
    let net = network_state(&target.admin, network).await?;
    let maps: Vec<Option<meshlink_proto::Netmap>> = target
        .services
        .iter()
        .map(|s| s.hub().map(network))
        .collect();
    let expected: Vec<Option<u64>> = maps.iter().map(|m| m.as_ref().map(map_digest)).collect();
    // Each agent's policy: the rules of its coordinator's that concern its node, exactly.
    let policy_of = |agent: usize, node: meshlink_proto::NodeId| {
        let m = maps.get(agent % maps.len().max(1))?.as_ref()?;
        Some(m.policy.as_ref().map(|p| p.for_node(m, node).digest()))
    };
    let sessions_per_coordinator: Vec<usize> = target
        .services
        .iter()
        .map(|s| s.hub().online_count(network))
        .collect();
    let coordinators_agree = expected.iter().all(|e| e.is_some() && *e == expected[0]);
    let first_answer = summaries.iter().flatten().next().map(|s| s.digest);
    let reference = |agent: usize| {
        if expected.is_empty() {
            first_answer
        } else {
            expected[agent % expected.len()]
        }
    };
    let answered = summaries.iter().flatten().count();
    let matching = summaries
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.map(|s| (i, s)))
        .filter(|(i, s)| {
            s.version == net.version
                && s.peers == net.nodes
                && Some(s.digest) == reference(*i)
                && (maps.is_empty() || policy_of(*i, s.node) == Some(s.policy))
        })
        .count();
    let consistent = answered == n && matching == n && coordinators_agree;
    let compared_with = match expected.len() {
        0 => "each other".to_string(),
        1 => "the coordinator's map".to_string(),
        _ if coordinators_agree => format!(
            "their coordinator's map; the {} coordinators' maps are identical",
            expected.len()
        ),
        _ => format!(
            "their coordinator's map; the coordinators' maps DIFFER (versions {})",
            target
                .services
                .iter()
                .map(|s| s
                    .hub()
                    .version(network)
                    .map_or("none".into(), |v| v.to_string()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let consistency = format!(
        "{matching} of {n} agents hold version {} with all {} peers{}, identical to {compared_with}",
        net.version,
        net.nodes,
        if maps.is_empty() {
            ""
        } else {
            " and the rules of the policy that concern them"
        },
    );
    let memory_end = sys::memory();
    let counters_end = board.counters.values();

    let errors = fleet.stop().await;
    if !errors.is_empty() {
        say(format!(
            "{} agents ended with an error; the first: {}",
            errors.len(),
            errors[0]
        ));
    }

    let mut report = RunReport {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        agents: n,
        changes: per_change.len(),
        coordinator: target.describe.clone(),
        coordinators: m,
        store: target.store.clone(),
        sessions_per_coordinator,
        map: match table {
            TableKind::Full => "full",
            TableKind::Compact => "compact",
        }
        .into(),
        client_endpoints: plan.client_endpoints,
        token_uses: 0,
        limits: target.limits.clone(),
        threads: (args.coordinator_threads, args.agent_threads),
        ramp: RampResult {
            kind: format!("{:?}", plan.kind).to_lowercase(),
            enroll_secs: ramp.enrolled.map(|d| d.as_secs_f64()),
            join_secs: ramp.duration.as_secs_f64(),
            drain_secs: drain.as_secs_f64(),
            online_latency: Spread::of(ramp.latency),
            wire: ramp_wire,
            version: ramp_version,
        },
        per_change,
        latency: Spread::default(),
        latency_on_trigger_coordinator: Spread::default(),
        latency_on_other_coordinators: Spread::default(),
        worst_change_p99_ms: 0.0,
        frame_bytes_per_change: 0.0,
        wire_rx_bytes_per_change: 0.0,
        wire_tx_bytes_per_change: 0.0,
        coordinator_cpu_ms_per_change: 0.0,
        agents_cpu_ms_per_change: 0.0,
        store_cpu_ms_per_change: None,
        full_map_bytes: counters_end.largest_full_map,
        memory_after_ramp,
        memory_end,
        counters_after_ramp,
        counters_end,
        coordinator_socket_drops: ramp_socket_drops
            .0
            .zip(end_socket_drops.0)
            .map(|(r, e)| (r, e.saturating_sub(r))),
        agent_socket_drops: (
            ramp_socket_drops.1,
            end_socket_drops.1.saturating_sub(ramp_socket_drops.1),
        ),
        udp_drops_ramp: udp_ramp,
        udp_drops_changes: udp_changes,
        consistent,
        consistency,
    };
    report.summarise(all, on_trigger, on_others);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::{change_agent, PolicyEditArg, PolicyFile, PolicyScope};

    #[test]
    fn policy_changes_edit_as_many_rules_as_asked() {
        let parse = |f: &PolicyFile| meshlink_proto::policy::parse(&f.source()).unwrap();
        for scope in [PolicyScope::First, PolicyScope::Every] {
            let mut f = PolicyFile::new(1000, scope);
            assert_eq!(parse(&f).rules.len(), 1000);
            for (edit, n) in [
                (PolicyEditArg::Rules(1), 1),
                (PolicyEditArg::Rules(10), 10),
                (PolicyEditArg::All, 1000),
            ] {
                for k in 1..5 {
                    let before = parse(&f).into_policy(k as u64);
                    f.change(k, edit);
                    let after = parse(&f).into_policy(k as u64 + 1);
                    let changed = before
                        .rules
                        .iter()
                        .zip(&after.rules)
                        .filter(|(a, b)| a != b)
                        .count();
                    assert_eq!(changed, n, "{edit:?}, change {k}");
                }
            }
        }
        assert_eq!("all".parse(), Ok(PolicyEditArg::All));
        assert_eq!("7".parse(), Ok(PolicyEditArg::Rules(7)));
        assert!("0".parse::<PolicyEditArg>().is_err() && "x".parse::<PolicyEditArg>().is_err());
    }

    #[test]
    fn changes_rotate_over_coordinators() {
        for (agents, m) in [(1000, 3), (4, 3), (2, 2), (7, 7), (1000, 1), (1, 1)] {
            for k in 0..50 {
                let a = change_agent(k, agents, m);
                assert!(
                    a < agents,
                    "{agents} agents, {m} coordinators, change {k}: {a}"
                );
                assert_eq!(
                    a % m,
                    k % m,
                    "{agents} agents, {m} coordinators, change {k}"
                );
            }
        }
        // One coordinator: the agents of earlier runs.
        assert_eq!(change_agent(1, 1000, 1), (7919 + 13) % 1000);
    }
}
