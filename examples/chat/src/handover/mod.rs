//! Live migration: the room moves to another server with its clients' TCP connections
//! (same ports, no reconnect), each socket frozen here and restored there with the kernel's
//! TCP repair mode ([`meshlink_tcp_migrate`]). Every instance runs the same way, on the
//! workload's holder and on its standbys: registered with its agent for the workload,
//! listening on the workload address (`IP_FREEBIND`, so a standby can listen before the
//! address is there) and for handovers on a port of its own.
//!
//! ```text
//! source (serves the room)                          destination (standing by)
//! agent: event=handover to=vm-c1 address=A
//! pause every connection at a clean point
//! freeze each socket (parked: silent)    ─state─>   from the holder's address only:
//!                                                   restore each connection, held (silent)
//!                                        <─ready─
//! answer handed_over                                (the coordinator commits the move)
//! agent: event=left                                 agent: event=arrived
//! read the parked sockets' state again ─final─>   restore again those that took in data
//! discard them; stand by                            after the freeze; go live, serve them
//!
//! any failure before ready: resume here, answer handed_over with the error
//! no left within 15 s: resume here                  no arrival within 15 s: discard
//! ```
//!
//! The final frame exists because a parked socket still takes in (and acknowledges) what
//! its client sends (`Parked::state` reads it, without leaving repair mode): without it, a
//! line typed between the freeze and the move would be lost and the connection would stall.
//! While a handover is out, new clients wait in the accept backlog.
//!
//! Every step is logged at `info` as one line starting `migrate: ` (the README lists them).
//!
//! # Security
//! A handover is taken only from the workload's holder's mesh address, as the agent's latest
//! `event=holder` names it (the mesh authenticates source addresses); only connections on
//! this server's own address and port are restored; every frame is bounded in size and
//! time ([`crate::migrate`]).

mod destination;
mod source;

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time;
use tracing::{debug, info, warn};

use meshlink_tcp_migrate::MigrateError;
use meshlink_uapi::handover::{AgentEvent, AppAnswer};

use crate::agent::{self, AgentMsg, Answers};
use crate::migrate::{self, FormatError};
use crate::server::{Connections, ServerConfig};

use destination::{Incoming, Received};
use source::Outgoing;

/// The listener's backlog: clients arriving during a handover wait in it.
const BACKLOG: i32 = 1024;
/// How long a failing accept on the handover port pauses the loop.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// What a migrating server is told at start.
#[derive(Debug, Clone)]
pub struct MigrateConfig {
    /// The workload whose handovers this server takes part in.
    pub workload: String,
    /// The agent's userspace API socket.
    pub agent_socket: PathBuf,
    /// How long a source gives the destination to connect, take the state and answer ready
    /// (3 s); the clients are frozen meanwhile.
    pub handover_timeout: Duration,
    /// How long a destination waits for a state once connected (5 s).
    pub receive_timeout: Duration,
    /// How long a source waits for `event=left` after answering, and a destination for
    /// `event=arrived` after answering ready (15 s); then the source resumes, the
    /// destination discards.
    pub outcome_timeout: Duration,
    /// How long a destination that has arrived waits for the source's final frame before it
    /// goes live with the state of the freeze (2 s).
    pub final_wait: Duration,
    /// How often to try registering with the agent while it cannot be reached (1 s).
    pub agent_retry: Duration,
}

impl MigrateConfig {
    /// The defaults for `workload`, with the agent at `agent_socket`.
    pub fn new(workload: impl Into<String>, agent_socket: impl Into<PathBuf>) -> Self {
        MigrateConfig {
            workload: workload.into(),
            agent_socket: agent_socket.into(),
            handover_timeout: Duration::from_secs(3),
            receive_timeout: Duration::from_secs(5),
            outcome_timeout: Duration::from_secs(15),
            final_wait: Duration::from_secs(2),
            agent_retry: Duration::from_secs(1),
        }
    }
}

/// Why a migrating server stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The listener's or the handover listener's address cannot be read.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The thread that talks to the agent could not start.
    #[error("cannot start the agent's thread: {0}")]
    Agent(io::Error),
}

/// A listener on `addr` with `IP_FREEBIND` (the address need not be on this host yet) and
/// `SO_REUSEADDR` (a restart binds while old connections linger; restored connections share
/// its port, which `restore_held` allows).
///
/// # Errors
/// The socket call that failed. Must be called within a tokio runtime.
pub fn bind_freebind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv4() {
        socket.set_freebind_v4(true)?;
    } else {
        socket.set_freebind_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}

/// Serves the room on `listener` (see [`bind_freebind`]) and takes part in the workload's
/// live migrations: registered with the agent, taking handovers on `handovers` and sending
/// them to the destination's address at the same port. Returns when `shutdown` completes,
/// after telling the clients `* server shutting down`.
///
/// # Errors
/// [`RunError`]; the connections are dropped then.
pub async fn run(
    listener: TcpListener,
    handovers: TcpListener,
    server: ServerConfig,
    config: MigrateConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let listen = listener.local_addr().map_err(|source| RunError::Listen {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    let handover_port = handovers
        .local_addr()
        .map_err(|source| RunError::Listen {
            addr: listen,
            source,
        })?
        .port();
    let mut agent_rx = agent::spawn(
        config.agent_socket.clone(),
        config.workload.clone(),
        config.agent_retry,
    )
    .map_err(RunError::Agent)?;
    let (inbound_tx, mut inbound_rx) = mpsc::unbounded_channel();
    let mut node = Node {
        connections: Connections::new(server),
        listener,
        listen,
        handover_port,
        config,
        agent: None,
        holder: None,
        outgoing: None,
        incoming: None,
        receiving: false,
        next_id: 0,
        inbound: inbound_tx,
    };
    node.connections.announce(&node.listener);
    info!(
        "migrate: listening for handovers of {} on {}",
        node.config.workload,
        handovers
            .local_addr()
            .map_or_else(|e| e.to_string(), |a| a.to_string())
    );
    let mut agent_alive = true;
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let deadline = node.deadline();
        tokio::select! {
            () = &mut shutdown => break,
            accepted = node.listener.accept(), if node.outgoing.is_none() => {
                node.connections.accepted(accepted).await;
            }
            () = node.connections.reap() => {}
            msg = agent_rx.recv(), if agent_alive => match msg {
                Some(msg) => node.on_agent(msg).await,
                None => {
                    warn!("migrate: the agent's thread ended; no more handovers");
                    node.agent = None;
                    node.holder = None;
                    agent_alive = false;
                }
            },
            accepted = handovers.accept() => node.on_handover_connection(accepted).await,
            Some(inbound) = inbound_rx.recv() => node.on_inbound(inbound),
            () = sleep_until(deadline) => node.on_deadline(),
        }
    }
    node.stop().await;
    Ok(())
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
enum FrameError {
    #[error("the connection closed")]
    Closed,
    #[error("the frame was cut short at {got} of {want} bytes")]
    Short { got: usize, want: usize },
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Reads one frame of at most `limit` bytes. The body grows as it arrives, so a length that
/// lies costs only what was sent.
async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    limit: usize,
) -> Result<Vec<u8>, FrameError> {
    let mut header = [0u8; 4];
    match reader.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let want = migrate::frame_len(header, limit)?;
    let mut body = Vec::new();
    reader.take(want as u64).read_to_end(&mut body).await?;
    if body.len() != want {
        return Err(FrameError::Short {
            got: body.len(),
            want,
        });
    }
    Ok(body)
}

/// The migrating server's state, driven by its loop.
struct Node {
    connections: Connections,
    listener: TcpListener,
    listen: SocketAddr,
    handover_port: u16,
    config: MigrateConfig,
    agent: Option<Answers>,
    /// The holder by the agent's latest `event=holder`.
    holder: Option<(String, IpAddr)>,
    outgoing: Option<Outgoing>,
    incoming: Option<Incoming>,
    /// Whether a handover connection is being read.
    receiving: bool,
    next_id: u64,
    inbound: mpsc::UnboundedSender<Received>,
}

impl Node {
    /// The next deadline of the handover out or in, if one is under way.
    fn deadline(&self) -> Option<Instant> {
        let out = self.outgoing.as_ref().map(|o| o.deadline);
        let inc = self.incoming.as_ref().map(|i| i.deadline);
        out.into_iter().chain(inc).min()
    }

    fn holder_text(&self) -> String {
        match &self.holder {
            Some((name, address)) => format!("{name} at {address}"),
            None => "no holder known".into(),
        }
    }

    async fn on_agent(&mut self, msg: AgentMsg) {
        let event = match msg {
            AgentMsg::Registered(answers) => {
                info!(
                    "migrate: registered for {} with the agent at {}",
                    self.config.workload,
                    self.config.agent_socket.display()
                );
                self.agent = Some(answers);
                return;
            }
            AgentMsg::Lost(why) => {
                info!("migrate: lost the agent ({why}); registering again");
                self.agent = None;
                self.holder = None;
                return;
            }
            AgentMsg::Event(event) => event,
        };
        if event.workload() != self.config.workload {
            debug!("migrate: an event for another workload: {event:?}");
            return;
        }
        let workload = self.config.workload.clone();
        match event {
            AgentEvent::Holder {
                generation, holder, ..
            } => {
                match &holder {
                    Some((name, address)) => info!(
                        "migrate: holder of {workload} is {name} ({address}) at generation {generation}"
                    ),
                    None => info!("migrate: {workload} has no holder at generation {generation}"),
                }
                self.holder = holder;
            }
            AgentEvent::Handover {
                generation,
                to,
                address,
                ..
            } => {
                info!("migrate: handover of {workload} to {to} ({address}) at generation {generation}");
                let error = self.hand_over(generation, &to, address).await.err();
                self.answer(generation, error);
            }
            AgentEvent::Left { generation, .. } => match self.outgoing.take() {
                Some(out) => self.left(out, generation).await,
                None => info!("migrate: left {workload} at generation {generation}"),
            },
            AgentEvent::Arrived { generation, .. } => self.arrived(generation),
        }
    }

    fn answer(&self, generation: u64, error: Option<String>) {
        let answer = AppAnswer::HandedOver {
            workload: self.config.workload.clone(),
            generation,
            error,
        };
        if !self.agent.as_ref().is_some_and(|a| a.send(answer)) {
            info!("migrate: cannot answer the handover: not registered with the agent");
        }
    }

    fn on_deadline(&mut self) {
        let now = Instant::now();
        self.outgoing_deadline(now);
        self.incoming_deadline(now);
    }

    /// Ends what is under way (silently: a move may have happened) and shuts the room down.
    async fn stop(mut self) {
        self.drop_outgoing();
        self.drop_incoming();
        drop(self.listener);
        self.connections.shutdown().await;
    }
}

/// A std stream from the migration crate, served by tokio.
fn to_tokio(stream: std::net::TcpStream) -> Result<TcpStream, MigrateError> {
    stream
        .set_nonblocking(true)
        .and_then(|()| TcpStream::from_std(stream))
        .map_err(|source| MigrateError::Socket {
            step: "hand the socket to the runtime",
            source,
        })
}
