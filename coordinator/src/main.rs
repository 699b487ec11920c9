//! `meshlink-coordinator`: the control service. See `meshlink-coordinator --help`.

/// mimalloc rather than glibc's allocator: the control messages a daemon decodes are many
/// small allocations freed on other threads, which glibc's arenas serve slowly and keep.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use meshlink_coordinator::config::{self, Overrides};
use meshlink_coordinator::identity;
use meshlink_coordinator::logging::{self, LogFormat};
use meshlink_coordinator::Coordinator;

/// meshlink coordinator: join tokens, node identities, addresses and network maps.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve agents (QUIC, and TLS over TCP) and operators (admin HTTP API) until SIGINT or SIGTERM.
    Serve(Box<ServeArgs>),
    /// Make the mesh's TLS identity and admin token in a state directory (once per mesh);
    /// copy coordinator.crt, coordinator.key and admin.token from there to the state
    /// directory of every coordinator that shares the mesh's PostgreSQL store.
    Init {
        /// State directory to write [default: /var/lib/meshlink-coordinator].
        #[arg(long, env = "MESHLINK_STATE_DIR", value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Configuration file (TOML; see configs/coordinator.example.toml).
    #[arg(long, env = "MESHLINK_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// State directory: database, TLS identity, admin token [default: /var/lib/meshlink-coordinator].
    #[arg(long, env = "MESHLINK_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// QUIC (UDP) address agents connect to [default: 0.0.0.0:7443].
    #[arg(long, env = "MESHLINK_LISTEN", value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// TLS-over-TCP address for agents whose network blocks UDP, or `off`; agents try the QUIC
    /// address's port [default: the listen address, TCP 0.0.0.0:7443].
    #[arg(long, env = "MESHLINK_TCP_LISTEN", value_name = "ADDR|off")]
    tcp_listen: Option<String>,
    /// Admin API (HTTP) address [default: 127.0.0.1:7444].
    #[arg(long, env = "MESHLINK_ADMIN_LISTEN", value_name = "ADDR")]
    admin_listen: Option<SocketAddr>,
    /// Let the admin API listen beyond loopback in plain HTTP (its token and answers then
    /// cross the network in the clear: put TLS in front instead where you can).
    #[arg(long, env = "MESHLINK_ADMIN_INSECURE")]
    admin_insecure: bool,
    /// host:port put in join tokens [default: the listen address, or the host's first IPv4 address].
    #[arg(long, env = "MESHLINK_ADVERTISE", value_name = "HOST:PORT")]
    advertise: Option<String>,
    /// Every coordinator of the mesh, comma-separated host:port, put in join tokens and told to
    /// agents so that they fail over between them [default: only this one].
    #[arg(long, env = "MESHLINK_COORDINATORS", value_name = "HOST:PORT,...")]
    coordinators: Option<String>,
    /// Where the state lives: `sqlite` (in the state directory) or postgres://USER@HOST/DB,
    /// shared by several coordinators; a password from PGPASSWORD or ~/.pgpass [default: sqlite].
    #[arg(
        long,
        env = "MESHLINK_STORE",
        value_name = "URL",
        hide_env_values = true
    )]
    store: Option<String>,
    /// UDP address that tells agents the address their WireGuard socket is seen from (behind
    /// NAT), or `off` [default: the listen address with the next port, 0.0.0.0:7444].
    #[arg(long, env = "MESHLINK_REFLECT_LISTEN", value_name = "ADDR|off")]
    reflect_listen: Option<String>,
    /// Relay WireGuard datagrams between the nodes of a network that cannot reach each other
    /// directly, over their control connections [default: on].
    #[arg(long, env = "MESHLINK_RELAY", value_name = "on|off")]
    relay: Option<String>,
    /// Bytes per second one node may send through the relay [default: 25000000].
    #[arg(long, env = "MESHLINK_RELAY_RATE", value_name = "BYTES")]
    relay_rate: Option<u64>,
    /// Days entries of the audit log are kept [default: 90].
    #[arg(long, env = "MESHLINK_AUDIT_RETENTION_DAYS", value_name = "DAYS")]
    audit_retention_days: Option<u64>,
    /// Seconds an agent has to say hello [default: 10].
    #[arg(long, env = "MESHLINK_HELLO_TIMEOUT_SECS", value_name = "SECS")]
    hello_timeout_secs: Option<u64>,
    /// Messages per second an agent may send [default: 20].
    #[arg(long, env = "MESHLINK_MESSAGE_RATE")]
    message_rate: Option<u32>,
    /// Messages an agent may send at once [default: 100].
    #[arg(long, env = "MESHLINK_MESSAGE_BURST")]
    message_burst: Option<u32>,
    /// Messages queued per session before it is dropped as too slow [default: 256].
    #[arg(long, env = "MESHLINK_SESSION_QUEUE")]
    session_queue: Option<usize>,
    /// Agent connections at once [default: 10000].
    #[arg(long, env = "MESHLINK_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Connections at once that have not said hello yet, of all sources [default: 1000].
    #[arg(long, env = "MESHLINK_MAX_UNAUTHENTICATED")]
    max_unauthenticated: Option<usize>,
    /// Connections at once that have not said hello yet from one IPv4 address or IPv6 /64
    /// [default: 32].
    #[arg(long, env = "MESHLINK_MAX_UNAUTHENTICATED_PER_IP")]
    max_unauthenticated_per_ip: Option<usize>,
    /// Seconds between two endpoint changes of one node past the burst; a change within it
    /// waits for its end [default: 5].
    #[arg(long, env = "MESHLINK_ENDPOINT_INTERVAL_SECS", value_name = "SECS")]
    endpoint_interval_secs: Option<u64>,
    /// Endpoint changes one node may make at once [default: 3].
    #[arg(long, env = "MESHLINK_ENDPOINT_BURST")]
    endpoint_burst: Option<u32>,
    /// Seconds without traffic before a connection is dropped [default: 30].
    #[arg(long, env = "MESHLINK_IDLE_TIMEOUT_SECS", value_name = "SECS")]
    idle_timeout_secs: Option<u64>,
    /// Milliseconds a workload holder keeps its address after its last answered heartbeat;
    /// a silent holder fails over after it [default: 1500].
    #[arg(long, env = "MESHLINK_WORKLOAD_LEASE_MS", value_name = "MS")]
    workload_lease_ms: Option<u64>,
    /// Milliseconds a former holder forwards packets for a moved workload address to the new
    /// holder [default: 10000].
    #[arg(long, env = "MESHLINK_WORKLOAD_GRACE_MS", value_name = "MS")]
    workload_grace_ms: Option<u64>,
    /// Seconds a node's WireGuard key may age before the coordinator has the node rotate it,
    /// in every network without its own entry in the file; 0: no schedule [default: none].
    #[arg(long, env = "MESHLINK_KEY_ROTATION_SECS", value_name = "SECS")]
    key_rotation_secs: Option<u64>,
    /// Milliseconds peers get to learn a rotating node's next key before it switches
    /// [default: 3000].
    #[arg(long, env = "MESHLINK_KEY_ROTATION_GRACE_MS", value_name = "MS")]
    key_rotation_grace_ms: Option<u64>,
    /// Seconds a node may stay away (no session) before it is revoked as expired; 0: never
    /// [default: never].
    #[arg(long, env = "MESHLINK_NODE_EXPIRY_SECS", value_name = "SECS")]
    node_expiry_secs: Option<u64>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match LogFormat::from_env() {
        Ok(format) => logging::init(format),
        Err(e) => {
            eprintln!("meshlink-coordinator: {e}");
            return ExitCode::FAILURE;
        }
    }
    let result = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Init { state_dir } => init(state_dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Every error of this crate names its cause in its own message, so the chain is
            // not printed again.
            eprintln!("meshlink-coordinator: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init(state_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let dir = state_dir.unwrap_or_else(|| PathBuf::from(config::DEFAULT_STATE_DIR));
    identity::prepare_state_dir(&dir)?;
    let id = identity::load_or_create_identity(&dir)?;
    let token = identity::load_or_create_admin_token(&dir)?;
    let made = if id.created || token.created {
        "made"
    } else {
        "already there, kept"
    };
    println!("mesh identity {made} in {}", dir.display());
    if token.created {
        println!("{}", admin_token_written(&token));
    }
    println!("coordinator fingerprint: {}", id.fingerprint);
    println!(
        "copy {}, {} and {} to the state directory of every coordinator of this mesh",
        identity::CERT_FILE,
        identity::KEY_FILE,
        identity::ADMIN_TOKEN_FILE
    );
    Ok(())
}

/// The line saying where a new admin token was written. Never the token itself: stdout ends
/// up in journald and in terminal scrollback, which more people read than the state directory.
fn admin_token_written(token: &identity::AdminToken) -> String {
    format!("admin token written to {} (0600)", token.path.display())
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let over = Overrides {
        state_dir: args.state_dir,
        listen: args.listen,
        tcp_listen: args.tcp_listen,
        admin_listen: args.admin_listen,
        admin_insecure: args.admin_insecure.then_some(true),
        advertise: args.advertise,
        coordinators: args.coordinators,
        store: args.store,
        reflect_listen: args.reflect_listen,
        relay: args.relay,
        relay_rate: args.relay_rate,
        hello_timeout_secs: args.hello_timeout_secs,
        audit_retention_days: args.audit_retention_days,
        message_rate: args.message_rate,
        message_burst: args.message_burst,
        session_queue: args.session_queue,
        max_connections: args.max_connections,
        max_unauthenticated: args.max_unauthenticated,
        max_unauthenticated_per_ip: args.max_unauthenticated_per_ip,
        endpoint_interval_secs: args.endpoint_interval_secs,
        endpoint_burst: args.endpoint_burst,
        idle_timeout_secs: args.idle_timeout_secs,
        workload_lease_ms: args.workload_lease_ms,
        workload_grace_ms: args.workload_grace_ms,
        key_rotation_secs: args.key_rotation_secs,
        key_rotation_grace_ms: args.key_rotation_grace_ms,
        node_expiry_secs: args.node_expiry_secs,
    };
    let settings = config::load(args.config.as_deref(), over)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let coordinator = Coordinator::start(&settings).await?;
        let token = coordinator.admin_token();
        if token.created {
            println!("{}", admin_token_written(token));
        }
        println!("coordinator fingerprint: {}", coordinator.fingerprint());
        wait_for_signal().await?;
        tracing::info!("shutting down");
        coordinator.shutdown().await;
        Ok(())
    })
}

async fn wait_for_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r,
        _ = term.recv() => Ok(()),
    }
}
