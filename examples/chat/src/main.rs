//! `meshlink-chat`: a TCP chat room server and its reconnecting client.
//!
//! ```text
//! meshlink-chat server --listen 100.64.50.10:7070 [--name vm-a]
//!                      [--migrate chat [--agent-socket /var/run/wireguard/mesh0.sock] [--handover-port 7071]]
//! meshlink-chat client --server 100.64.50.10:7070 --nick alice [--connect-timeout-ms 1000] [--linger-ms 500]
//! ```
//!
//! The server logs one line per event to stdout and exits 0 on SIGINT or SIGTERM; if it cannot
//! listen it prints one error line naming the address and exits 1. The client sends the lines
//! of its stdin and prints the room's lines, plus `* connected to <addr>` and
//! `* disconnected: <reason>`, to stdout; failed connection attempts go to stderr. It exits 0
//! after stdin ends.
//!
//! With `--migrate`, the server takes part in the workload's live migrations
//! ([`meshlink_chat::handover`]): it registers with the agent, listens with `IP_FREEBIND`
//! (the address may not be on this VM yet) and takes handovers on `0.0.0.0:HANDOVER_PORT`.

use std::io::{BufRead, IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use meshlink_chat::client::{self, ClientConfig, ClientEvent};
use meshlink_chat::handover::{self, Config as MigrateConfig};
use meshlink_chat::protocol::Nick;
use meshlink_chat::server::{self, ServerConfig};

/// A small TCP chat room whose server can move between VMs on a workload address.
#[derive(Debug, Parser)]
#[command(name = "meshlink-chat", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the room.
    Server {
        /// The address to listen on (the workload address and a port).
        #[arg(long)]
        listen: SocketAddr,
        /// The name in the welcome line [default: the host name].
        #[arg(long)]
        name: Option<String>,
        /// Take part in live migrations of this workload (the one whose address --listen
        /// names): hand the room over with its connections, or take one in.
        #[arg(long, value_name = "WORKLOAD")]
        migrate: Option<String>,
        /// The agent's userspace API socket (the default is the agent's default interface,
        /// mesh0).
        #[arg(long, value_name = "PATH", requires = "migrate", default_value = DEFAULT_AGENT_SOCKET)]
        agent_socket: PathBuf,
        /// The TCP port handovers arrive on (0.0.0.0) and are sent to; the same on every
        /// node.
        #[arg(
            long,
            value_name = "PORT",
            requires = "migrate",
            default_value_t = 7071
        )]
        handover_port: u16,
    },
    /// Join the room: send stdin's lines, print the room's.
    Client {
        /// The server's address.
        #[arg(long)]
        server: SocketAddr,
        /// Your name: 1-32 characters of A-Z, a-z, 0-9, '_' and '-'.
        #[arg(long)]
        nick: Nick,
        /// How long one connection attempt may take.
        #[arg(long, default_value_t = 1000)]
        connect_timeout_ms: u64,
        /// How long to stay after stdin ended and everything was sent.
        #[arg(long, default_value_t = 500)]
        linger_ms: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("meshlink-chat: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Server {
            listen,
            name,
            migrate,
            agent_socket,
            handover_port,
        } => {
            let migrate = migrate.map(|workload| {
                (
                    MigrateConfig::new(workload, agent_socket),
                    SocketAddr::from(([0, 0, 0, 0], handover_port)),
                )
            });
            runtime.block_on(serve(listen, name, migrate))
        }
        Command::Client {
            server,
            nick,
            connect_timeout_ms,
            linger_ms,
        } => {
            let mut config = ClientConfig::new(server, nick);
            config.connect_timeout = Duration::from_millis(connect_timeout_ms);
            config.linger = Duration::from_millis(linger_ms);
            runtime.block_on(chat(config))
        }
    }
}

/// Where the agent serves its userspace API by default.
const DEFAULT_AGENT_SOCKET: &str = "/var/run/wireguard/mesh0.sock";

async fn serve(
    listen: SocketAddr,
    name: Option<String>,
    migrate: Option<(MigrateConfig, SocketAddr)>,
) -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stdout)
        .with_ansi(std::io::stdout().is_terminal())
        .with_target(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MESHLINK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let name = name.unwrap_or_else(host_name);
    // Signal handlers go in before binding, so that a signal sent as soon as the server says
    // it listens is never fatal.
    let (mut interrupt, mut terminate) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(i), Ok(t)) => (i, t),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("meshlink-chat: cannot handle signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match &migrate {
        Some(_) => handover::listen(listen),
        None => TcpListener::bind(listen).await,
    };
    let listener = match listener {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("meshlink-chat: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = async {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    };
    let config = ServerConfig::new(name);
    let Some((migrate, handover_listen)) = migrate else {
        server::run(listener, config, shutdown).await;
        return ExitCode::SUCCESS;
    };
    let handovers = match TcpListener::bind(handover_listen).await {
        Ok(handovers) => handovers,
        Err(e) => {
            eprintln!("meshlink-chat: cannot listen on {handover_listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    match handover::run(listener, handovers, config, migrate, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshlink-chat: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The kernel's host name, or `localhost` when it cannot be read.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

async fn chat(config: ClientConfig) -> ExitCode {
    // Stdin is read on a thread of its own: a blocking read cannot be cancelled, and this way
    // it never holds up the end of the program.
    let (lines, input) = mpsc::channel(16);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if lines.blocking_send(line).is_err() {
                break;
            }
        }
    });
    let server = config.server;
    client::run(&config, input, |event| show(server, event)).await;
    ExitCode::SUCCESS
}

/// Prints a client event: the room's lines on stdout, flushed at once so that a harness reading
/// a pipe sees them; retries on stderr, once per failure streak and then every tenth.
fn show(server: SocketAddr, event: ClientEvent) {
    let line = match event {
        ClientEvent::Connected(addr) => format!("* connected to {addr}"),
        ClientEvent::Line(line) => line,
        ClientEvent::Disconnected(reason) => format!("* disconnected: {reason}"),
        ClientEvent::ConnectFailed {
            attempt,
            reason,
            retry_in,
        } => {
            if attempt == 1 || attempt % 10 == 0 {
                eprintln!("meshlink-chat: cannot connect to {server} ({reason}), attempt {attempt}; next in {retry_in:?}");
            }
            return;
        }
        ClientEvent::Skipped(len) => {
            eprintln!(
                "meshlink-chat: line of {len} bytes not sent (the limit is {})",
                meshlink_chat::protocol::MAX_LINE
            );
            return;
        }
        ClientEvent::Unsent(count) => {
            eprintln!("meshlink-chat: gave up on {count} unsent lines");
            return;
        }
    };
    let mut stdout = std::io::stdout().lock();
    // A closed stdout (the reader went away) is not worth stopping the chat for.
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}
