//! `meshlink-agent`: the daemon on every VM. See `meshlink-agent --help`.

/// mimalloc rather than glibc's allocator: the control messages a daemon decodes are many
/// small allocations freed on other threads, which glibc's arenas serve slowly and keep.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use meshlink_agent::config::{self, Overrides};
use meshlink_agent::control::coordinators::Coordinators;
use meshlink_agent::control::state::{self, MapTrust, StateDir};
use meshlink_agent::control::{self as ctl, ControlError, MeshControl};
use meshlink_agent::platform::sched;
use meshlink_agent::settings::{PrivateKey, DEFAULT_INTERFACE, DEFAULT_UAPI_DIR};
use meshlink_agent::token_source::TokenSource;
use meshlink_agent::{run, uapi};
use meshlink_proto::reconnect::{Reconnect, ReconnectPolicy};
use meshlink_proto::token::JoinToken;
use meshlink_proto::{Key, Netmap};
use std::time::{Duration, Instant};

mod wg_quick_hook;

/// meshlink agent: WireGuard tunnels through a TUN device.
///
/// `meshlink-agent [-f] INTERFACE` behaves as wireguard-go's command line, for wg-quick:
/// `WG_QUICK_USERSPACE_IMPLEMENTATION=meshlink-agent wg-quick up wg0`.
#[derive(Parser)]
#[command(version, about, long_about = None, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// With INTERFACE: stay in the foreground instead of starting a daemon (as wireguard-go's
    /// -f; also WG_PROCESS_FOREGROUND=1).
    #[arg(short = 'f', long, requires = "interface")]
    foreground: bool,
    /// Create INTERFACE with no address and no peer, to be configured through its userspace
    /// API socket (`wg setconf`, as wg-quick does), and run until it is deleted.
    #[arg(value_name = "INTERFACE")]
    interface: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Print a new base64 private key (like `wg genkey`).
    Genkey,
    /// Read a base64 private key on stdin and print its public key (like `wg pubkey`).
    Pubkey,
    /// Bring the interface up and run in the foreground until SIGINT or SIGTERM.
    Up(Box<UpArgs>),
    /// Show the running agent's peers: endpoints, handshakes, traffic and drops.
    Status(StatusArgs),
}

#[derive(clap::Args)]
struct UpArgs {
    /// Agent configuration file (TOML; see configs/agent.static.example.toml): static peers
    /// and their key, or, without private_key_file and peers, a mesh node's local settings.
    /// Env: MESHLINK_CONFIG.
    #[arg(long, value_name = "FILE", conflicts_with = "wg_quick")]
    config: Option<PathBuf>,
    /// A stock wg-quick configuration file instead. Env: MESHLINK_WG_QUICK.
    #[arg(long, value_name = "FILE")]
    wg_quick: Option<PathBuf>,
    /// Interface name [default: mesh0, or the wg-quick file's name]. Env: MESHLINK_INTERFACE.
    #[arg(long)]
    interface: Option<String>,
    /// Private key file (mode 0600 or stricter). Env: MESHLINK_PRIVATE_KEY_FILE.
    #[arg(long, value_name = "FILE")]
    private_key_file: Option<PathBuf>,
    /// UDP listen port (0 picks one). Env: MESHLINK_LISTEN_PORT.
    #[arg(long)]
    listen_port: Option<u16>,
    /// Overlay address with prefix length; repeat for several. Env: MESHLINK_ADDRESSES.
    #[arg(long = "address", value_name = "CIDR")]
    addresses: Option<Vec<String>>,
    /// Tunnel MTU [default: 1420]. Env: MESHLINK_MTU.
    #[arg(long)]
    mtu: Option<u16>,
    /// Firewall mark for the tunnel's UDP packets. Env: MESHLINK_FWMARK.
    #[arg(long)]
    fwmark: Option<u32>,
    /// Directory of the userspace API socket [default: /var/run/wireguard]. Env: MESHLINK_UAPI_DIR.
    #[arg(long, value_name = "DIR")]
    uapi_dir: Option<PathBuf>,
    /// A mesh node's longest trust in a network map no coordinator has confirmed since: a
    /// cached map older than this is not used at start, and peers are dropped when the map
    /// gets this old without a coordinator. 90s, 30m, 12h, 7d or never [default: 7d].
    /// Env: MESHLINK_MAX_CACHED_MAP_AGE.
    #[arg(long, value_name = "AGE")]
    max_cached_map_age: Option<String>,
    /// Keep blackhole routes for the overlay's prefixes (a joined node's network, static
    /// peers' allowed IPs) while the agent is down, crashed included, so that overlay traffic
    /// never leaves in the clear through the default route. Without it, such routes left by
    /// an earlier run are removed at start. Env: MESHLINK_FAIL_CLOSED.
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    fail_closed: Option<bool>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics on a loopback address, or on a
    /// Unix socket PATH (off by default). Env: MESHLINK_METRICS_LISTEN.
    #[arg(long, value_name = "ADDR:PORT|PATH")]
    metrics_listen: Option<String>,
    /// A mesh node answers DNS for its network's names (NODE.NETWORK.mesh,
    /// WORKLOAD.NETWORK.mesh) [default: true]. Env: MESHLINK_DNS.
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    dns: Option<bool>,
    /// Where the DNS server listens, UDP and TCP [default: the node's overlay address, port
    /// 53]. Env: MESHLINK_DNS_LISTEN.
    #[arg(long, value_name = "ADDR[:PORT]")]
    dns_listen: Option<String>,
    /// The suffix of mesh names [default: mesh]. Env: MESHLINK_DNS_SUFFIX.
    #[arg(long, value_name = "SUFFIX")]
    dns_suffix: Option<String>,
    /// Join a network with the token (from `meshctl token create`) in FILE; group or others
    /// should not be able to read it. Env: MESHLINK_TOKEN_FILE.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["wg_quick", "token"])]
    token_file: Option<PathBuf>,
    /// Join a network with this token; `-` reads it from standard input. A token given here is
    /// visible to every local user in /proc/PID/cmdline: prefer --token-file, `--token -` or
    /// the MESHLINK_TOKEN variable.
    #[arg(long, value_name = "TOKEN|-", conflicts_with = "wg_quick")]
    token: Option<String>,
    /// Node name to ask for at join [default: chosen by the coordinator].
    #[arg(long, env = "MESHLINK_NAME")]
    name: Option<String>,
    /// Label to attach at join, KEY=VALUE; repeat for several.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Where a joined node keeps its identity and cached map.
    #[arg(long, env = "MESHLINK_STATE_DIR", default_value = state::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?}: a label is KEY=VALUE")),
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(clap::Args)]
struct StatusArgs {
    /// Interface of the agent to ask. Env: MESHLINK_INTERFACE.
    #[arg(
        long,
        env = "MESHLINK_INTERFACE",
        default_value = DEFAULT_INTERFACE,
        value_parser = meshlink_uapi::parse_interface_name
    )]
    interface: String,
    /// Directory of the userspace API socket. Env: MESHLINK_UAPI_DIR.
    #[arg(long, env = "MESHLINK_UAPI_DIR", default_value = DEFAULT_UAPI_DIR)]
    uapi_dir: PathBuf,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    output: Output,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match (cli.command, cli.interface) {
        (Some(Command::Genkey), _) => genkey(),
        (Some(Command::Pubkey), _) => pubkey(),
        (Some(Command::Up(args)), _) => up(*args),
        (Some(Command::Status(args)), _) => status(args),
        (None, Some(interface)) => {
            wg_quick_hook::main(&interface, cli.foreground).map_err(anyhow::Error::from)
        }
        (None, None) => {
            use clap::CommandFactory;
            let _ = Cli::command().print_help();
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<Logged>() => ExitCode::FAILURE,
        Err(e) => {
            // Our error types already carry their causes in their text; print the top level only.
            eprintln!("meshlink-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

fn genkey() -> anyhow::Result<()> {
    println!("{}", PrivateKey::generate().to_key().to_base64());
    Ok(())
}

fn pubkey() -> anyhow::Result<()> {
    let mut text = String::new();
    std::io::stdin().take(1024).read_to_string(&mut text)?;
    let key =
        Key::from_base64(&text).map_err(|e| anyhow::anyhow!("stdin: not a private key: {e}"))?;
    let mut out = std::io::stdout();
    writeln!(out, "{}", PrivateKey::from_bytes(key.0).public_key())?;
    Ok(())
}

/// The runtime's worker threads unless `MESHLINK_WORKER_THREADS` says otherwise: the send loop
/// and the receive loop each get one (see `run`).
const WORKER_THREADS: usize = 2;
/// The most worker threads `MESHLINK_WORKER_THREADS` may ask for.
const MAX_WORKER_THREADS: usize = 64;

/// The runtime's worker threads: `MESHLINK_WORKER_THREADS` (1 to 64; default 2). One thread
/// suits a VM with one vCPU: the send and receive loops then take turns.
fn worker_threads(value: Option<&str>) -> Result<usize, String> {
    match value.map(str::trim) {
        None | Some("") => Ok(WORKER_THREADS),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=MAX_WORKER_THREADS).contains(&n) => Ok(n),
            _ => Err(format!(
                "MESHLINK_WORKER_THREADS: {v:?} is not a number of threads from 1 to \
                 {MAX_WORKER_THREADS}"
            )),
        },
    }
}

/// The runtime's settings: `MESHLINK_WORKER_THREADS` and `MESHLINK_SCHEDULING`; a bad one is
/// an `InvalidInput` error naming it.
fn runtime_settings() -> std::io::Result<(usize, sched::Scheduling)> {
    let invalid = |e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
    let threads = worker_threads(std::env::var("MESHLINK_WORKER_THREADS").ok().as_deref())
        .map_err(invalid)?;
    let scheduling =
        sched::Scheduling::from_env_value(std::env::var("MESHLINK_SCHEDULING").ok().as_deref())
            .map_err(invalid)?;
    Ok((threads, scheduling))
}

/// The agent's runtime, its threads at the priority `MESHLINK_SCHEDULING` asks for (see
/// `platform::sched`); errors as [`runtime_settings`].
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let (threads, scheduling) = runtime_settings()?;
    sched::threads().ask(scheduling);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .thread_name("meshlink")
        .on_thread_start(|| sched::threads().started(&sched::Linux))
        .on_thread_stop(|| sched::threads().stopped())
        .build()?;
    sched::spawn_guard();
    Ok(rt)
}

/// How the log is written: `MESHLINK_LOG_FORMAT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LogFormat {
    /// Lines for people (the default).
    Text,
    /// One JSON object a line, for log collectors.
    Json,
}

/// The log format `MESHLINK_LOG_FORMAT` asks for: `json`, or `text` (also when unset or
/// empty); anything else is an error naming the variable.
fn log_format(value: Option<&str>) -> Result<LogFormat, String> {
    match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("text") => Ok(LogFormat::Text),
        Some("json") => Ok(LogFormat::Json),
        Some(other) => Err(format!(
            "MESHLINK_LOG_FORMAT: {other:?} is not a log format (text or json)"
        )),
    }
}

/// The log filter: `MESHLINK_LOG` (default `info`), with hickory's DNS server and its network
/// layer at `error` unless the variable names them: they log every request at `info` and odd
/// datagrams at `warn`, and both come from the network.
fn log_filter(var: Option<&str>) -> String {
    let spec = var
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .unwrap_or("info");
    if spec.contains("hickory") {
        spec.to_string()
    } else {
        format!("{spec},hickory_server=error,hickory_net=error")
    }
}

/// Logs to standard error at the level of `MESHLINK_LOG` (default `info`), as text or, with
/// `MESHLINK_LOG_FORMAT=json`, as JSON lines (one object per event, its fields flattened,
/// the current span's fields under `span`).
///
/// # Errors
/// An unknown `MESHLINK_LOG_FORMAT`: the log is then text, and the caller says whether that is
/// fatal.
fn init_logging() -> Result<LogFormat, String> {
    use std::io::IsTerminal;
    let format = log_format(config::process_env("MESHLINK_LOG_FORMAT").as_deref());
    let filter = tracing_subscriber::EnvFilter::try_new(log_filter(
        config::process_env("MESHLINK_LOG").as_deref(),
    ))
    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(log_filter(None)));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        Ok(LogFormat::Json) => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
        Ok(LogFormat::Text) | Err(_) => {
            builder.with_ansi(std::io::stderr().is_terminal()).init();
        }
    }
    format
}

/// An error already written to the log (as JSON): `main` prints nothing more.
#[derive(Debug, thiserror::Error)]
#[error("stopped (the log says why)")]
struct Logged;

/// `up`, its logging set up first. With JSON logs, why it stopped is a log event too, so that
/// standard error stays JSON lines only.
fn up(args: UpArgs) -> anyhow::Result<()> {
    let format = init_logging().map_err(|e| anyhow::anyhow!(e))?;
    let result = up_logged(args);
    match result {
        Err(e) if format == LogFormat::Json => {
            tracing::error!(error = %e, "meshlink-agent stopped");
            Err(Logged.into())
        }
        other => other,
    }
}

fn up_logged(args: UpArgs) -> anyhow::Result<()> {
    // The process's settings and the token are read first, so that bad input is reported
    // before anything is touched.
    runtime_settings()?;
    let source = TokenSource::choose(args.token, args.token_file, &config::process_env)?;
    let given = |var: &str| config::process_env(var).is_some_and(|x| !x.trim().is_empty());
    // A TOML file names static peers (with their key), or holds a mesh node's local settings.
    let config_file = args.config.clone().or_else(|| {
        config::process_env(config::ENV_CONFIG)
            .filter(|x| !x.trim().is_empty())
            .map(PathBuf::from)
    });
    let static_file = match &config_file {
        Some(path) => config::names_static_peers(path)?,
        None => false,
    };
    let wg_quick = args.wg_quick.is_some() || given(config::ENV_WG_QUICK);
    if let Some(source) = &source {
        if static_file || wg_quick {
            anyhow::bail!(
                "a join token ({source}) makes a mesh node and a configuration file with \
                 static peers (--config or --wg-quick, or their variables) a node with static \
                 peers: give one of them"
            );
        }
    }
    let token = match source {
        Some(source) => Some(source.read(std::io::stdin().lock(), &mut |warning| {
            tracing::warn!("{warning}");
        })?),
        None => None,
    };
    let mut overrides = Overrides {
        interface: args.interface,
        private_key_file: args.private_key_file,
        listen_port: args.listen_port,
        addresses: args.addresses,
        mtu: args.mtu,
        fwmark: args.fwmark,
        uapi_dir: args.uapi_dir,
        max_cached_map_age: args.max_cached_map_age,
        fail_closed: args.fail_closed,
        metrics_listen: args.metrics_listen,
        dns: args.dns,
        dns_listen: args.dns_listen,
        dns_suffix: args.dns_suffix,
    };
    // Static peers come from a config file naming them or a key, a wg-quick file, or at least
    // a private key given by flag or variable; without any of those the agent is a mesh node
    // (joined or joining).
    let static_source = static_file
        || wg_quick
        || overrides.private_key_file.is_some()
        || given(config::ENV_PRIVATE_KEY_FILE);
    let mesh_mode = token.is_some() || !static_source;
    let rt = runtime()?;
    if mesh_mode {
        let state = StateDir::open(&args.state_dir)?;
        let key = state.private_key()?;
        overrides.private_key_file = Some(state.key_path());
        let local = config_file.as_deref().filter(|_| !static_file);
        let settings = config::load_settings(local, None, &overrides, &config::process_env)?;
        let labels = args.labels.into_iter().collect();
        return rt.block_on(up_mesh(
            settings,
            state,
            key.public_key(),
            token,
            args.name,
            labels,
        ));
    }
    let settings = config::load_settings(
        args.config.as_deref(),
        args.wg_quick.as_deref(),
        &overrides,
        &config::process_env,
    )?;
    rt.block_on(async move { run::run(settings, shutdown_signal(), None).await })?;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
}

/// The UDP port for a mesh node: the one asked for, else the one peers know (`known`), else
/// WireGuard's usual 51820; any of them only if free, else 0 (the system picks).
fn preferred_port(settings: &meshlink_agent::settings::Settings, known: Option<u16>) -> u16 {
    if settings.device.listen_port != 0 {
        return settings.device.listen_port;
    }
    let free = |p: u16| std::net::UdpSocket::bind(("0.0.0.0", p)).is_ok();
    match known {
        Some(p) if free(p) => p,
        None if free(51820) => 51820,
        _ => 0,
    }
}

/// `up` with a join token (or a restart of a joined node): join if needed, then run with the
/// control loop.
async fn up_mesh(
    mut settings: meshlink_agent::settings::Settings,
    state: StateDir,
    public_key: meshlink_proto::PublicKey,
    token: Option<JoinToken>,
    name: Option<String>,
    labels: std::collections::BTreeMap<String, String>,
) -> anyhow::Result<()> {
    let max_age = settings.max_cached_map_age;
    let (node, map, first, trust) = match state.node()? {
        Some(node) => {
            if token.is_some() {
                tracing::info!(name = %node.name, network = %node.network, "already joined; the token is not used (remove {} to join again)", state.path().join("node.json").display());
            }
            let (map, trust) = cached_map(&state, max_age)?;
            (node, map, None, trust)
        }
        None => {
            let token = token.ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: this node has not joined a network (or was revoked): give it a join token from \
                     `meshctl token create` with --token-file FILE, --token - (standard input) or MESHLINK_TOKEN \
                     (a revoked node must be deleted with `meshctl node delete` before it joins again), \
                     or give static peers with --config or --wg-quick",
                    state.path().display()
                )
            })?;
            let mut coordinators = Coordinators::new(token.coordinators())
                .expect("a decoded token names a coordinator");
            let port = preferred_port(&settings, None);
            let endpoints = match port {
                0 => Vec::new(),
                // Before the join the overlay's prefixes are unknown: only the tunnel's
                // interface is left out.
                p => ctl::local_endpoints(p, &settings.interface, &[]),
            };
            // Every address of the token in turn, with the control loop's backoff.
            let mut reconnect = Reconnect::new(ReconnectPolicy::default());
            let (node, map, session) = loop {
                match ctl::join(
                    &token,
                    coordinators.target(),
                    public_key,
                    name.clone(),
                    labels.clone(),
                    endpoints.clone(),
                )
                .await
                {
                    Ok(joined) => break joined,
                    Err(e @ ControlError::Connect { .. }) => {
                        coordinators.failed();
                        let pause = reconnect.after_failure(false, ctl::fraction());
                        tracing::warn!("{e}; trying {} in {pause:?}", coordinators.target());
                        tokio::select! {
                            _ = tokio::time::sleep(pause) => {}
                            _ = shutdown_signal() => return Ok(()),
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            state.save_node(&node)?;
            state.save_netmap(&map)?;
            tracing::info!(name = %node.name, network = %node.network, addresses = ?node.addresses, "joined");
            let trust = MapTrust::new(max_age, Some(Duration::ZERO), Instant::now());
            (node, map.clone(), Some((session, map)), trust)
        }
    };
    settings.addresses = node.addresses.clone();
    settings.device.listen_port = preferred_port(&settings, node.listen_port);
    let (tx, rx) = tokio::sync::watch::channel(map.clone());
    let coordinators = Coordinators::new(node.coordinators()).ok_or_else(|| {
        anyhow::anyhow!(
            "{}: names no coordinator; remove it to join again",
            state.path().join("node.json").display()
        )
    })?;
    let shared = std::sync::Arc::new(ctl::workloads::Shared::new(
        node.node_id,
        map,
        std::time::Instant::now(),
        coordinators,
    ));
    let (claims_tx, claims_rx) = tokio::sync::mpsc::channel(16);
    let control = MeshControl::new(
        state.clone(),
        node.clone(),
        public_key,
        tx,
        first,
        shared.clone(),
        claims_rx,
    );
    run::run(
        settings,
        shutdown_signal(),
        Some(run::Mesh {
            self_id: node.node_id,
            maps: rx,
            control,
            shared,
            claims: claims_tx,
            state,
            trust,
            networks: node.networks(),
            network_name: node.network.clone(),
        }),
    )
    .await?;
    Ok(())
}

/// The map a joined node starts from: the cached one while it is trusted (see
/// [`MapTrust`]), else none: the node then waits for a coordinator rather than bring up peers
/// that may have been revoked meanwhile.
fn cached_map(state: &StateDir, max_age: Option<Duration>) -> anyhow::Result<(Netmap, MapTrust)> {
    let now = Instant::now();
    let Some(cached) = state.netmap()? else {
        // Nothing cached: nothing to distrust.
        return Ok((
            Netmap::default(),
            MapTrust::new(max_age, Some(Duration::ZERO), now),
        ));
    };
    let age = cached.age(std::time::SystemTime::now());
    let trust = MapTrust::new(max_age, age, now);
    let peers = cached.map.peers.len().saturating_sub(1);
    if trust.expired(now) {
        let when = match age {
            Some(age) => format!("{} ago", rough(age)),
            None => "at an unknown time (an older agent cached it)".to_string(),
        };
        tracing::warn!(
            peers,
            "the cached network map was last confirmed by a coordinator {when}, longer ago than \
             max_cached_map_age ({}): its peers are not brought up; waiting for a coordinator",
            config::format_map_age(max_age)
        );
        return Ok((Netmap::default(), trust));
    }
    tracing::info!(
        peers,
        age = %age.map_or_else(|| "unknown".to_string(), rough),
        "starting from the cached network map"
    );
    Ok((cached.map, trust))
}

/// A duration for people: in its largest whole unit, `3d`, `5h`, `12m` or `40s`.
fn rough(age: Duration) -> String {
    let secs = age.as_secs();
    match secs {
        s if s >= 2 * 86_400 => format!("{}d", s / 86_400),
        s if s >= 2 * 3600 => format!("{}h", s / 3600),
        s if s >= 2 * 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

fn status(args: StatusArgs) -> anyhow::Result<()> {
    let path = meshlink_uapi::socket_path(&args.uapi_dir, &args.interface);
    let response = uapi::CLIENT
        .request(&path, "get=meshlink")
        .map_err(|e| anyhow::anyhow!("no agent answers on {}: {e}", path.display()))?;
    let json_line = response.text().lines().next().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(json_line)
        .map_err(|e| anyhow::anyhow!("{}: unexpected answer: {e}", path.display()))?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&v)?),
        Output::Table => print_status_table(&v),
    }
    Ok(())
}

/// The firewall in `status`: the destination check, the policy version and what it let in
/// (new flows by rule line, only rules that matched) and dropped, and the connection table.
/// `None` when the firewall checks nothing (a static device).
fn firewall_line(fw: &serde_json::Value) -> Option<String> {
    let n = |x: &serde_json::Value| x.as_u64().unwrap_or(0);
    let check = fw["destination_check"].as_bool() == Some(true);
    let version = fw["policy_version"].as_u64();
    if !check && version.is_none() {
        return None;
    }
    let mut out = match version {
        Some(v) => format!("policy: version {v}"),
        None => "policy: none (every flow allowed)".to_string(),
    };
    if version.is_some() {
        let rules: Vec<String> = fw["rules"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| n(&r["flows"]) > 0)
            .map(|r| format!("line {}: {}", r["line"], n(&r["flows"])))
            .collect();
        out.push_str(&format!(
            "  allowed flows by rule: {}  denied {}  cut {}",
            if rules.is_empty() {
                "none".to_string()
            } else {
                rules.join(", ")
            },
            n(&fw["denied"]),
            n(&fw["cut"]),
        ));
    }
    if check {
        out.push_str(&format!("  not local {}", n(&fw["not_local"])));
    }
    let flows = &fw["flows"];
    if flows.is_object() {
        out.push_str(&format!(
            "\nflows: {}/{}  evicted {}  expired {}",
            n(&flows["flows"]),
            n(&flows["capacity"]),
            n(&flows["evicted"]),
            n(&flows["expired"]),
        ));
    }
    Some(out)
}

/// Where packets to workload addresses went at handovers here (`None` before the first).
fn handover_line(h: &serde_json::Value) -> Option<String> {
    let n = |k: &str| h[k].as_u64().unwrap_or(0);
    (n("queued") + n("not_held") > 0).then(|| {
        format!(
            "handovers: kept back {}  released {}  sent on {}  dropped: denied {}, not local {}, \
             full {}, timed out {}, abandoned {}, not held {}  waiting {}",
            n("queued"),
            n("released"),
            n("sent_on"),
            n("denied"),
            n("not_local"),
            n("full"),
            n("timed_out"),
            n("abandoned"),
            n("not_held"),
            n("waiting"),
        )
    })
}

/// Where the agent's own servers listen: metrics, DNS (`None` when neither runs).
fn served_line(served: &serde_json::Value) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(at) = served["metrics"].as_str() {
        parts.push(format!("metrics {at}"));
    }
    let dns = &served["dns"];
    if let Some(listen) = dns["listen"].as_str() {
        parts.push(format!(
            "dns {listen} (*.{}, {})",
            dns["suffix"].as_str().unwrap_or("?"),
            if dns["registered"].as_bool() == Some(true) {
                "registered with systemd-resolved"
            } else {
                "not registered with the host's resolver"
            }
        ));
    }
    (!parts.is_empty()).then(|| format!("serving: {}", parts.join("  ")))
}

fn print_status_table(v: &serde_json::Value) {
    let s = |x: &serde_json::Value| x.as_str().map(str::to_string).unwrap_or_else(|| "-".into());
    println!(
        "interface {}  public key {}  port {}  addresses {}",
        s(&v["interface"]),
        s(&v["public_key"]),
        v["listen_port"],
        v["addresses"]
            .as_array()
            .map(|a| a.iter().map(s).collect::<Vec<_>>().join(","))
            .unwrap_or_default()
    );
    let k = &v["key"];
    if k.is_object() {
        let age = k["age_secs"].as_u64().map_or_else(
            || "unknown".to_string(),
            |a| format!("{} days {} h", a / 86_400, a % 86_400 / 3600),
        );
        let rotation = match (k["next_public_key"].as_str(), k["switch_in_secs"].as_u64()) {
            (Some(next), Some(due)) => format!("rotating to {next}, switch in {due} s"),
            (Some(next), None) => format!("rotating to {next}, waiting for the coordinator"),
            _ => "none".to_string(),
        };
        println!("key: age {age}  rotation {rotation}");
    }
    println!("device drops: {}", v["drops"]);
    if let Some(state) = v["scheduling"]["state"].as_str() {
        println!(
            "scheduling: {state}  released under overload {} times",
            v["scheduling"]["releases"]
        );
    }
    if let Some(line) = firewall_line(&v["firewall"]) {
        println!("{line}");
    }
    if let Some(line) = handover_line(&v["handover"]) {
        println!("{line}");
    }
    if let Some(line) = served_line(&v["served"]) {
        println!("{line}");
    }
    let c = &v["control"];
    if c.is_object() {
        let held: Vec<String> = c["workloads"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|w| w["held_here"].as_bool() == Some(true))
            .map(|w| {
                format!(
                    "{} ({}, generation {})",
                    s(&w["name"]),
                    s(&w["address"]),
                    w["generation"]
                )
            })
            .collect();
        println!(
            "control: {}  map version {}  lease {}  holding {}",
            match (c["connected"].as_bool(), c["coordinator"].as_str()) {
                (Some(true), Some(addr)) => format!(
                    "connected to {addr}{}",
                    if c["transport"] == "tcp" {
                        " over TLS/TCP"
                    } else {
                        ""
                    }
                ),
                (Some(true), None) => "connected".to_string(),
                _ => "not connected".to_string(),
            },
            c["map_version"],
            if c["lease_valid"].as_bool() == Some(true) {
                "valid"
            } else {
                "none"
            },
            if held.is_empty() {
                "nothing".to_string()
            } else {
                held.join(", ")
            }
        );
        let known: Vec<String> = c["coordinators"]
            .as_array()
            .into_iter()
            .flatten()
            .map(s)
            .collect();
        if !known.is_empty() {
            println!("coordinators: {}", known.join(", "));
        }
    }
    println!(
        "{:<44}  {:<22}  {:<24}  {:>10}  {:>12}  {:>12}  DROPS",
        "PEER", "ENDPOINT", "ALLOWED IPS", "HANDSHAKE", "RX", "TX"
    );
    for p in v["peers"].as_array().into_iter().flatten() {
        let hs = p["latest_handshake_secs_ago"]
            .as_u64()
            .map(|x| format!("{x}s ago"))
            .unwrap_or_else(|| "never".into());
        let allowed = p["allowed_ips"]
            .as_array()
            .map(|a| a.iter().map(s).collect::<Vec<_>>().join(","))
            .unwrap_or_default();
        let drops: Vec<String> = p["drops"]
            .as_object()
            .map(|o| {
                o.iter()
                    .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
                    .map(|(k, n)| format!("{k}={n}"))
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "{:<44}  {:<22}  {:<24}  {:>10}  {:>12}  {:>12}  {}",
            s(&p["public_key"]),
            s(&p["endpoint"]),
            allowed,
            hs,
            p["rx_bytes"],
            p["tx_bytes"],
            if drops.is_empty() {
                "-".to_string()
            } else {
                drops.join(" ")
            }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_served_line_names_metrics_and_dns() {
        assert_eq!(
            served_line(&serde_json::json!({"metrics": null, "dns": null})),
            None
        );
        let served = serde_json::json!({
            "metrics": "unix:/run/m.sock",
            "dns": {"listen": "100.64.0.5:53", "suffix": "mesh", "registered": false},
        });
        assert_eq!(
            served_line(&served).unwrap(),
            "serving: metrics unix:/run/m.sock  dns 100.64.0.5:53 (*.mesh, not registered with \
             the host's resolver)"
        );
    }

    #[test]
    fn dns_requests_are_not_logged_unless_asked_for() {
        assert_eq!(
            log_filter(None),
            "info,hickory_server=error,hickory_net=error"
        );
        assert_eq!(
            log_filter(Some("debug")),
            "debug,hickory_server=error,hickory_net=error"
        );
        assert_eq!(
            log_filter(Some("info,hickory_server=debug")),
            "info,hickory_server=debug"
        );
    }

    #[test]
    fn worker_threads_are_two_unless_one_to_sixty_four_is_asked_for() {
        assert_eq!(worker_threads(None), Ok(2));
        assert_eq!(worker_threads(Some(" ")), Ok(2));
        assert_eq!(worker_threads(Some("1")), Ok(1));
        assert_eq!(worker_threads(Some(" 8 ")), Ok(8));
        for bad in ["0", "65", "-1", "two", "1.5"] {
            let e = worker_threads(Some(bad)).unwrap_err();
            assert!(e.starts_with("MESHLINK_WORKER_THREADS:"), "{e}");
        }
    }

    #[test]
    fn log_format_is_text_unless_json_is_asked_for() {
        assert_eq!(log_format(None), Ok(LogFormat::Text));
        assert_eq!(log_format(Some(" ")), Ok(LogFormat::Text));
        assert_eq!(log_format(Some("text")), Ok(LogFormat::Text));
        assert_eq!(log_format(Some("JSON")), Ok(LogFormat::Json));
        let e = log_format(Some("yaml")).unwrap_err();
        assert!(e.starts_with("MESHLINK_LOG_FORMAT:"), "{e}");
    }

    #[test]
    fn the_handover_line_names_where_packets_went() {
        assert_eq!(handover_line(&serde_json::json!({"queued": 0})), None);
        let h = serde_json::json!({"queued": 10, "released": 5, "sent_on": 1, "denied": 2,
            "timed_out": 2, "not_held": 1});
        assert_eq!(
            handover_line(&h).unwrap(),
            "handovers: kept back 10  released 5  sent on 1  dropped: denied 2, not local 0, \
             full 0, timed out 2, abandoned 0, not held 1  waiting 0"
        );
    }

    #[test]
    fn the_firewall_line_shows_policy_counters_and_flows() {
        let static_device = serde_json::json!({"destination_check": false, "policy_version": null});
        assert_eq!(firewall_line(&static_device), None);
        let fw = serde_json::json!({
            "destination_check": true,
            "policy_version": 3,
            "rules": [{"line": 4, "flows": 12}, {"line": 9, "flows": 0}],
            "not_local": 1, "denied": 5, "cut": 2,
            "flows": {"flows": 10, "capacity": 131072, "evicted": 0, "expired": 7},
        });
        assert_eq!(
            firewall_line(&fw).unwrap(),
            "policy: version 3  allowed flows by rule: line 4: 12  denied 5  cut 2  not local 1\n\
             flows: 10/131072  evicted 0  expired 7"
        );
    }
}
