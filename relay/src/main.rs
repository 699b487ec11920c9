//! `meshlink-relay`: a standalone relay for meshlink agents (see the crate documentation and
//! README.md, "Standalone relays").

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Default listen address (QUIC over UDP and TLS over TCP).
const DEFAULT_LISTEN: &str = "0.0.0.0:7450";
/// Default state directory.
const DEFAULT_STATE_DIR: &str = "/var/lib/meshlink-relay";

#[derive(Debug, Parser)]
#[command(
    name = "meshlink-relay",
    version,
    about = "Relays WireGuard datagrams between meshlink agents the coordinators vouch for"
)]
struct Cli {
    /// Where the relay's TLS identity lives (relay.crt, relay.key 0600; made on first start).
    #[arg(long, env = "MESHLINK_RELAY_STATE_DIR", default_value = DEFAULT_STATE_DIR, global = true)]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Makes the identity if missing and prints the `[[relays]]` entry for the coordinators'
    /// configuration (its fingerprint).
    Init {
        /// The relay's name in the mesh.
        #[arg(long)]
        name: String,
        /// The address agents reach it at (`host:port`).
        #[arg(long)]
        addr: String,
        /// Its region (for operators).
        #[arg(long, default_value = "")]
        region: String,
        /// Its provider (for operators).
        #[arg(long, default_value = "")]
        provider: String,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// QUIC (UDP) and TLS (TCP) listen address.
    #[arg(long, env = "MESHLINK_RELAY_LISTEN", default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// The coordinators' certificate (`coordinator.crt` of their state directory): tickets are
    /// checked against its key. Not a secret.
    #[arg(long, env = "MESHLINK_RELAY_COORDINATOR_CERT")]
    coordinator_cert: Option<PathBuf>,
    /// Bytes per second one node may send through the relay.
    #[arg(long, env = "MESHLINK_RELAY_RATE", default_value_t = meshlink_relay::forward::DEFAULT_RATE)]
    rate: u64,
    /// Sessions at once; more are refused.
    #[arg(long, env = "MESHLINK_RELAY_MAX_SESSIONS", default_value_t = 10_000)]
    max_sessions: usize,
    /// Of them, connections whose hello is not accepted yet.
    #[arg(
        long,
        env = "MESHLINK_RELAY_MAX_UNAUTHENTICATED",
        default_value_t = 1_000
    )]
    max_unauthenticated: usize,
    /// Of those, from one source (an IPv4 address or an IPv6 /64).
    #[arg(
        long,
        env = "MESHLINK_RELAY_MAX_UNAUTHENTICATED_PER_IP",
        default_value_t = 16
    )]
    max_unauthenticated_per_ip: usize,
    /// Sessions after their hello from one source (an IPv4 address or an IPv6 /64): nodes
    /// behind one address, each with up to 2 sessions while it renews.
    #[arg(
        long,
        env = "MESHLINK_RELAY_MAX_SESSIONS_PER_IP",
        default_value_t = 256
    )]
    max_sessions_per_ip: usize,
    /// Seconds a new connection has for its handshake and hello.
    #[arg(long, env = "MESHLINK_RELAY_HELLO_TIMEOUT_SECS", default_value_t = 10)]
    hello_timeout_secs: u64,
    /// Seconds without a packet after which a session is closed.
    #[arg(long, env = "MESHLINK_RELAY_IDLE_TIMEOUT_SECS", default_value_t = 30)]
    idle_timeout_secs: u64,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (plain HTTP, no token: choose an
    /// address only the scraper reaches). Off unless given.
    #[arg(long, env = "MESHLINK_RELAY_METRICS_LISTEN", value_name = "ADDR:PORT")]
    metrics_listen: Option<SocketAddr>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MESHLINK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Some(Command::Init {
        name,
        addr,
        region,
        provider,
    }) = &cli.command
    {
        let id = meshlink_relay::server::load_or_create_identity(&cli.state_dir)?;
        println!("[[relays]]");
        println!("name = {name:?}");
        println!("addr = {addr:?}");
        println!("fingerprint = {:?}", id.fingerprint);
        if !region.is_empty() {
            println!("region = {region:?}");
        }
        if !provider.is_empty() {
            println!("provider = {provider:?}");
        }
        return Ok(());
    }
    let run = &cli.run;
    let settings = meshlink_relay::server::Settings {
        listen: run.listen,
        state_dir: cli.state_dir.clone(),
        coordinator_cert: run.coordinator_cert.clone().context(
            "--coordinator-cert (MESHLINK_RELAY_COORDINATOR_CERT) is required: the coordinators' coordinator.crt",
        )?,
        rate: run.rate.max(1),
        max_sessions: run.max_sessions.max(1),
        max_unauthenticated: run.max_unauthenticated.max(1),
        max_unauthenticated_per_ip: run.max_unauthenticated_per_ip.max(1),
        max_sessions_per_ip: run.max_sessions_per_ip.max(1),
        hello_timeout: Duration::from_secs(run.hello_timeout_secs.clamp(1, 300)),
        idle_timeout: Duration::from_secs(run.idle_timeout_secs.clamp(3, 3600)),
        metrics_listen: run.metrics_listen,
    };
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(async {
        let running = meshlink_relay::server::start(&settings).await?;
        // Once the listeners are bound (scripts and tests wait for this line).
        println!("relay fingerprint: {}", running.fingerprint);
        // What it did, every minute it did something (besides the metrics, when served).
        let counters = running.counters();
        tokio::spawn(async move {
            let mut last = None;
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                let now = counters();
                if last != Some(now) {
                    tracing::info!(
                        sessions = now.sessions.quic + now.sessions.tcp,
                        stats = ?now.relay,
                        accepted = now.outcomes.accepted,
                        refused = now.outcomes.refused_total(),
                        "relay counters"
                    );
                    last = Some(now);
                }
            }
        });
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot watch SIGTERM")?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        let now = running.snapshot();
        tracing::info!(
            stats = ?now.relay,
            accepted = now.outcomes.accepted,
            refused = now.outcomes.refused_total(),
            "stopping"
        );
        running.stop().await;
        anyhow::Ok(())
    })
}
