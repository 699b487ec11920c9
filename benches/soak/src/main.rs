//! `meshlink-soak`: the churn soak's fleet and judge (issue 11 item 10). Started by
//! `benches/soak.py`, which runs the real coordinator and three real agents in namespaces
//! and measures what they leak; see `benches/README.md`.
//!
//! Against a running coordinator (its admin API and QUIC address) and a network that exists,
//! it joins `--agents` simulated agents (each the real [`AgentSession`] in a QUIC shell,
//! `sim.rs`), creates `--workloads` workloads (and one that only the real agents hold), then
//! for `--duration-secs` churns (`operator.rs`) while checking the fencing invariant on every
//! simulated agent every `--snapshot-ms` and on every real agent through its userspace API
//! (`fencing.rs`). Then it stops the churn, brings every agent back, and waits until every
//! agent has the coordinator's map version and generations, with exactly each workload's
//! holder answering for it. The report (JSON) goes to standard output and `--json`. The exit
//! status is 0 only when no breach was seen and everything converged.
//!
//! [`AgentSession`]: meshlink_proto::agent_session::AgentSession

mod admin;
mod fencing;
mod operator;
mod real;
mod sim;

/// mimalloc rather than glibc's allocator: the control messages a daemon decodes are many
/// small allocations freed on other threads, which glibc's arenas serve slowly and keep.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use meshlink_proto::token::JoinToken;
use meshlink_proto::NodeId;
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::admin::Admin;
use crate::fencing::{Fencing, Holding};
use crate::operator::{Operator, Workload};
use crate::real::RealAgent;
use crate::sim::{Command, Counters, Shared, Slot, View};

#[derive(Parser, Debug)]
#[command(about = "The churn soak's simulated fleet, operator and fencing judge")]
struct Args {
    /// The coordinator's QUIC address.
    #[arg(long, default_value = "127.0.0.1:7443")]
    server: SocketAddr,
    /// The coordinator's admin API.
    #[arg(long, default_value = "http://127.0.0.1:7444")]
    admin: String,
    /// File holding the admin token.
    #[arg(long)]
    admin_token_file: PathBuf,
    /// The network (must exist).
    #[arg(long, default_value = "soak")]
    network: String,
    /// Simulated agents.
    #[arg(long, default_value_t = 200)]
    agents: usize,
    /// Workloads shared by simulated and real agents.
    #[arg(long, default_value_t = 20)]
    workloads: usize,
    /// The first workload address is the one after this.
    #[arg(long, default_value = "100.64.200.0")]
    workload_base: Ipv4Addr,
    /// Length of the churn.
    #[arg(long, default_value_t = 600)]
    duration_secs: u64,
    /// Mean pause between two churn actions.
    #[arg(long, default_value_t = 50)]
    action_ms: u64,
    /// A real agent: its node name and interface (`vm-a=mls1a`); repeated.
    #[arg(long = "real", value_name = "NAME=IFACE")]
    real: Vec<String>,
    /// Directory of the real agents' UAPI sockets.
    #[arg(long, default_value = "/var/run/wireguard")]
    uapi_dir: PathBuf,
    /// The `meshlink-agent` binary, to ask the real agents for their status.
    #[arg(long, default_value = "meshlink-agent")]
    agent_bin: PathBuf,
    /// The workload only the real agents hold: `NAME=ADDRESS`.
    #[arg(long, value_name = "NAME=ADDRESS")]
    real_workload: Option<String>,
    /// How often the simulated fleet's holdings are checked.
    #[arg(long, default_value_t = 5)]
    snapshot_ms: u64,
    /// How often each real agent's holdings are read.
    #[arg(long, default_value_t = 300)]
    real_sample_ms: u64,
    /// Local addresses (127.0.1.N) the simulated agents' connections are spread over.
    #[arg(long, default_value_t = 16)]
    client_addresses: u8,
    /// How long agents may take to converge after the churn.
    #[arg(long, default_value_t = 90)]
    settle_secs: u64,
    /// Seed of the churn (default: random, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Also write the report here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// A QUIC client endpoint on `ip`, pinned to `fingerprint`, with the agent's keepalive (1 s)
/// and idle timeout (4 s).
fn client_endpoint(ip: Ipv4Addr, fingerprint: &str) -> anyhow::Result<quinn::Endpoint> {
    let mut endpoint = quinn::Endpoint::client(SocketAddr::from((ip, 0)))
        .with_context(|| format!("client socket on {ip}"))?;
    let mut config = meshlink_tls::client_config(fingerprint)?;
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(1)));
    transport.max_idle_timeout(Some(Duration::from_secs(4).try_into()?));
    config.transport_config(Arc::new(transport));
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

fn parse_pair(s: &str, what: &str) -> anyhow::Result<(String, String)> {
    let (a, b) = s
        .split_once('=')
        .with_context(|| format!("{what}: expected NAME=VALUE, got {s:?}"))?;
    Ok((a.to_string(), b.to_string()))
}

/// Blocking admin work on the runtime's blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
    Ok(tokio::task::spawn_blocking(f).await?)
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,meshlink_soak=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (report, ok) = runtime.block_on(soak(args))?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}

async fn soak(args: Args) -> anyhow::Result<(serde_json::Value, bool)> {
    let seed = args.seed.unwrap_or_else(rand::random);
    tracing::info!(seed, "churn seed");
    let admin_token = meshctl::admin_token::AdminToken::from_file(&args.admin_token_file)?;
    let admin = Admin::new(&args.admin, admin_token, &args.network)?;
    let token = {
        let a = admin.clone();
        blocking(move || a.create_token()).await??
    };
    let token = JoinToken::decode(&token)?;

    // Real agents: node ids by name.
    let nodes = {
        let a = admin.clone();
        blocking(move || a.nodes()).await??
    };
    let mut real = Vec::new();
    for r in &args.real {
        let (name, iface) = parse_pair(r, "--real")?;
        let node = nodes
            .iter()
            .find(|n| n.name == name && !n.revoked)
            .with_context(|| format!("--real {name}: no such node in {}", args.network))?;
        real.push(RealAgent {
            name,
            node: node.id.0,
            interface: iface,
            bin: args.agent_bin.clone(),
            uapi_dir: args.uapi_dir.clone(),
        });
    }
    let real_workload = args
        .real_workload
        .as_deref()
        .map(|s| -> anyhow::Result<Workload> {
            let (name, addr) = parse_pair(s, "--real-workload")?;
            Ok(Workload {
                name: name.parse().context("--real-workload name")?,
                address: addr.parse().context("--real-workload address")?,
            })
        })
        .transpose()?;

    // The fleet.
    let endpoints: Vec<quinn::Endpoint> = (1..=args.client_addresses.max(1))
        .map(|k| client_endpoint(Ipv4Addr::new(127, 0, 1, k), &token.fingerprint))
        .collect::<anyhow::Result<_>>()?;
    let shared = Arc::new(Shared {
        server: args.server,
        token_secret: token.secret,
        counters: Counters::default(),
        stopping: Default::default(),
    });
    let started = Instant::now();
    let t0 = started.into_std();
    let mut slots = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..args.agents {
        let (tx, rx) = mpsc::channel(16);
        let slot = Arc::new(Slot {
            index,
            view: Mutex::new(View::default()),
            commands: tx,
        });
        slots.push(slot.clone());
        let (shared, endpoint) = (shared.clone(), endpoints[index % endpoints.len()].clone());
        tasks.spawn(async move {
            // A ramp of 50 joins a second.
            tokio::time::sleep(Duration::from_millis(20 * index as u64)).await;
            sim::run(slot, shared, endpoint, rx).await;
        });
    }
    let ramp_deadline = Instant::now() + Duration::from_secs(60 + args.agents as u64 / 10);
    while shared.counters.joins.load(Ordering::Relaxed) < args.agents as u64 {
        anyhow::ensure!(
            Instant::now() < ramp_deadline,
            "only {} of {} simulated agents joined",
            shared.counters.joins.load(Ordering::Relaxed),
            args.agents
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ramp = started.elapsed();
    tracing::info!(?ramp, "every simulated agent joined");

    // The checkers.
    let fencing = Arc::new(Mutex::new(Fencing::new(t0)));
    let checking = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut checkers = tokio::task::JoinSet::new();
    {
        let (fencing, slots, checking) = (fencing.clone(), slots.clone(), checking.clone());
        let every = Duration::from_millis(args.snapshot_ms.max(1));
        checkers.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while checking.load(Ordering::Relaxed) {
                tick.tick().await;
                // Every session locked first, then the instant read: the snapshot is of one
                // instant even if this thread is preempted halfway through taking the locks
                // (agents lock only their own slot, so the fixed order cannot deadlock).
                let views: Vec<_> = slots.iter().map(|s| s.lock()).collect();
                let now = std::time::Instant::now();
                let mut held: BTreeMap<NodeId, Vec<Holding>> = BTreeMap::new();
                for v in &views {
                    if let (Some(node), Some(session)) = (v.node, v.session.as_ref()) {
                        let h = session.holdings().held(now);
                        if !h.is_empty() {
                            let map = session.map();
                            let id = |a| {
                                map.workloads
                                    .values()
                                    .find(|w| w.address == a)
                                    .map(|w| w.id)
                            };
                            held.insert(
                                node,
                                h.iter()
                                    .map(|x| Holding {
                                        address: x.address.addr(),
                                        generation: x.generation,
                                        workload: id(x.address),
                                    })
                                    .collect(),
                            );
                        }
                    }
                }
                // Two holders of one address in this snapshot: what each session knew, for
                // the investigation (the judgement counts it either way).
                let mut by_addr: BTreeMap<IpAddr, Vec<NodeId>> = BTreeMap::new();
                for (node, hs) in &held {
                    for h in hs {
                        by_addr.entry(h.address).or_default().push(*node);
                    }
                }
                for (addr, nodes) in by_addr.iter().filter(|(_, n)| n.len() > 1) {
                    for v in views.iter().filter(|v| v.node.is_some_and(|n| nodes.contains(&n))) {
                        if let Some(s) = v.session.as_ref() {
                            tracing::warn!(
                                address = %addr,
                                node = ?v.node,
                                "two holders in one snapshot; this one's holdings: {:?}; map version {}, \
                                 connected {}",
                                s.holdings(),
                                s.map().version,
                                s.is_connected()
                            );
                        }
                    }
                }
                drop(views);
                fencing
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .sim_snapshot(now, &held);
            }
        });
    }
    let real_errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    if !real.is_empty() {
        let (fencing, real, checking, errors) = (
            fencing.clone(),
            real.clone(),
            checking.clone(),
            real_errors.clone(),
        );
        let every = Duration::from_millis(args.real_sample_ms.max(1)) / real.len() as u32;
        checkers.spawn(async move {
            let mut tick = tokio::time::interval(every);
            let mut k = 0;
            while checking.load(Ordering::Relaxed) {
                tick.tick().await;
                let r = &real[k % real.len()];
                k += 1;
                let lo = std::time::Instant::now();
                match r.state().await {
                    Ok(state) => {
                        let hi = std::time::Instant::now();
                        fencing
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .real_observation(r.node, lo, hi, &state.held());
                    }
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!("real agent {}: {e}", r.name);
                    }
                }
            }
        });
    }

    // Workloads, then the churn.
    let workloads: Vec<Workload> = (0..args.workloads)
        .map(|i| {
            Ok(Workload {
                name: format!("wl-{i}").parse()?,
                address: Ipv4Addr::from(u32::from(args.workload_base) + 1 + i as u32),
            })
        })
        .collect::<Result<_, meshlink_api::NameError>>()?;
    let mut op = Operator {
        admin: admin.clone(),
        slots: slots.clone(),
        workloads: workloads.clone(),
        real: real.iter().map(|r| r.name.clone()).collect(),
        real_workload: real_workload.clone(),
        rng: StdRng::seed_from_u64(seed),
        every: Duration::from_millis(args.action_ms.max(1)),
        revoked: Vec::new(),
        tally: Default::default(),
    };
    let churn = Duration::from_secs(args.duration_secs);
    let churn_started = Instant::now();
    let op = blocking(move || {
        op.create_real_workload();
        for w in op.workloads.clone() {
            op.recreate(&w);
        }
        op.run(std::time::Instant::now() + churn);
        op
    })
    .await?;
    let churn_took = churn_started.elapsed();
    tracing::info!("churn over; settling");

    // Settle: everyone back, nothing more asked.
    let settle_started = Instant::now();
    for s in &slots {
        let _ = s.commands.send(Command::Settle).await;
    }
    let settle_deadline = settle_started + Duration::from_secs(args.settle_secs);
    let mut last_mismatch = Vec::new();
    let mut converged_after = None;
    while Instant::now() < settle_deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        last_mismatch = mismatches(&admin, &slots, &real).await?;
        if last_mismatch.is_empty() {
            converged_after = Some(settle_started.elapsed());
            break;
        }
    }
    // A little more checking while settled, then the verdict.
    tokio::time::sleep(Duration::from_secs(2)).await;
    checking.store(false, Ordering::Relaxed);
    while checkers.join_next().await.is_some() {}
    let (breaches, fencing_report) = {
        let f = fencing.lock().unwrap_or_else(|e| e.into_inner());
        let breaches = f.judge();
        let report = serde_json::json!({
            "sim_snapshots": f.sim_snapshots,
            "longest_snapshot_gap_ms": f.longest_snapshot_gap.as_secs_f64() * 1e3,
            "real_observations": f.real_observations,
            "real_observation_errors": real_errors.load(Ordering::Relaxed),
            "widest_real_window_ms": f.widest_real_window.as_secs_f64() * 1e3,
            "holding_runs": f.runs(),
            "same_snapshot_doubles": f.same_snapshot_doubles,
            "breaches": breaches,
        });
        (breaches, report)
    };

    // Stop the fleet: every connection closed, every task ended.
    shared.stopping.store(true, Ordering::Relaxed);
    for e in &endpoints {
        e.close(0u32.into(), b"soak over");
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    for e in &endpoints {
        let _ = tokio::time::timeout(Duration::from_secs(5), e.wait_idle()).await;
    }

    let c = &shared.counters;
    let n = |x: &std::sync::atomic::AtomicU64| x.load(Ordering::Relaxed);
    let ok = breaches.is_empty() && converged_after.is_some();
    let report = serde_json::json!({
        "seed": seed,
        "agents": args.agents,
        "workloads": args.workloads,
        "real_agents": real.iter().map(|r| &r.name).collect::<Vec<_>>(),
        "ramp_s": ramp.as_secs_f64(),
        "churn_s": churn_took.as_secs_f64(),
        "actions": op.tally,
        "fleet": {
            "joins": n(&c.joins),
            "reconnects": n(&c.reconnects),
            "sessions_lost_unasked": n(&c.lost),
            "failed_attempts": n(&c.failed_attempts),
            "leaves": n(&c.leaves),
            "crashes": n(&c.crashes),
            "revoked_or_deleted": n(&c.revoked),
            "prepares_answered": n(&c.prepared),
            "claims": n(&c.claims),
            "claims_granted": n(&c.claims_granted),
            "claims_refused": n(&c.claims_refused),
            "claims_lost_or_expired": n(&c.claims_lost),
            "protocol_errors": n(&c.protocol_errors),
            "deltas_refused": n(&c.deltas_refused),
        },
        "fencing": fencing_report,
        "converged": converged_after.is_some(),
        "converged_after_s": converged_after.map(|d| d.as_secs_f64()),
        "not_converged": last_mismatch,
        "ok": ok,
    });
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("{}", path.display()))?;
    }
    Ok((report, ok))
}

/// What keeps the fleet from having converged: every simulated and real agent connected,
/// with the coordinator's map version and every workload's generation, and exactly each
/// workload's holder answering for it. Empty when converged.
async fn mismatches(
    admin: &Admin,
    slots: &[Arc<Slot>],
    real: &[RealAgent],
) -> anyhow::Result<Vec<String>> {
    let (net, workloads) = {
        let a = admin.clone();
        blocking(move || anyhow::Ok((a.network_state()?, a.workloads()?))).await??
    };
    let version = net.version.0;
    let store: BTreeMap<String, (IpAddr, u64, Option<NodeId>)> = workloads
        .iter()
        .map(|w| {
            (
                w.name.clone(),
                (
                    IpAddr::V4(w.address),
                    w.generation.0,
                    w.holder.as_ref().map(|h| h.id.0),
                ),
            )
        })
        .collect();
    let mut out = Vec::new();
    let now = std::time::Instant::now();
    for s in slots {
        let v = s.lock();
        let (Some(node), Some(session)) = (v.node, v.session.as_ref()) else {
            out.push(format!("sim {}: no session", s.index));
            continue;
        };
        if !session.is_connected() {
            out.push(format!("sim {} (node {node}): not connected", s.index));
            continue;
        }
        if session.map().version != version {
            out.push(format!(
                "sim {} (node {node}): map version {}, the coordinator's {version}",
                s.index,
                session.map().version
            ));
        }
        let held: Vec<IpAddr> = session
            .holdings()
            .held(now)
            .iter()
            .map(|h| h.address.addr())
            .collect();
        for (name, (addr, generation, holder)) in &store {
            let seen = session.map().workloads.get(name).map(|w| w.generation);
            if seen != Some(*generation) {
                out.push(format!(
                    "sim {} (node {node}): {name} at generation {seen:?}, the store's {generation}",
                    s.index
                ));
            }
            if held.contains(addr) != (*holder == Some(node)) {
                out.push(format!(
                    "sim {} (node {node}): answers for {name}: {}, the store's holder {holder:?}",
                    s.index,
                    held.contains(addr)
                ));
            }
        }
    }
    for r in real {
        let state = match r.state().await {
            Ok(s) => s,
            Err(e) => {
                out.push(format!("real {}: {e}", r.name));
                continue;
            }
        };
        if !state.connected || state.map_version != version {
            out.push(format!(
                "real {}: connected {}, map version {}, the coordinator's {version}",
                r.name, state.connected, state.map_version
            ));
        }
        for (name, (_, generation, holder)) in &store {
            let Some((_, seen, _, here)) = state.workloads.get(name) else {
                out.push(format!("real {}: {name} missing from its map", r.name));
                continue;
            };
            if seen != generation || *here != (*holder == Some(r.node)) {
                out.push(format!(
                    "real {}: {name} at generation {seen} answered here {here}; the store: \
                     generation {generation}, holder {holder:?}",
                    r.name
                ));
            }
        }
    }
    Ok(out)
}
