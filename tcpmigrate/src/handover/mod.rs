//! The application's side of a live migration with the meshlink agent (feature `agent`): a
//! TCP server moves to another node with its clients' connections (same ports, no
//! reconnect), each socket frozen here and restored there with the crate's TCP repair
//! mode, the server's own state shipped along as bytes it encodes itself.
//!
//! Every instance of the server runs the same way, on the workload's holder and on its
//! standbys: registered with its agent for the workload (`meshlink_uapi::handover`),
//! listening on the workload address ([`listen`]: `IP_FREEBIND`, so a standby can listen
//! before the address is there) and for handovers on a port of its own. A [`Migrator`] does
//! everything that is not the application's:
//!
//! ```text
//! source (serves the workload)                      destination (standing by)
//! agent: event=handover to=vm-c1 address=A
//!   Event::HandOver ─> the application pauses
//!   its connections at a clean point ─> hand_over
//! freeze each socket (parked: silent)
//!   prepare: the application's state, sessions
//!                                        ─state─>   from the holder's address only:
//!                                                   restore each connection, held (silent)
//!                                        <─ready─
//! answer handed_over                                (the coordinator commits the move)
//! agent: event=left                                 agent: event=arrived
//! read the parked sockets' state again ─final─>   restore again those that took in data
//! discard them; Event::Released                     after the freeze; go live; Event::Arrived
//!
//! any failure before ready: resume here (Outcome::Failed), answer with the error
//! no left within 15 s, or aborted: resume here       no arrival within 15 s: discard
//! (Event::Resume)
//! ```
//!
//! The final frame exists because a parked socket still takes in (and acknowledges) what its
//! client sends ([`crate::Parked::state`] reads it without leaving repair mode): without it,
//! data sent between the freeze and the move would be lost and the connection would stall.
//!
//! What the application does: implement [`Application`] (how its state and each
//! connection's session travel), poll [`Migrator::next`] in its loop, and on
//! [`Event::HandOver`] stop every connection where its state is whole (nothing half-read
//! that is not kept, nothing half-written whose count is lost) and give them to
//! [`Migrator::hand_over`]; serve what [`Event::Resume`], [`Outcome::Failed`] and
//! [`Event::Arrived`] give back; forget what [`Event::Released`] names. While
//! [`Migrator::parked`] it should leave new clients waiting in the accept backlog.
//!
//! Every step is logged at `info` as one line starting `migrate: `.
//!
//! # Security
//! A handover is taken only from the workload's holder's mesh address, as the agent's latest
//! `event=holder` names it (the mesh authenticates source addresses); only connections on the
//! server's own address and port are restored; every frame is bounded in size and time
//! ([`wire`]); the application's bytes reach only its own decoders, which check them.

mod destination;
mod registration;
mod source;
#[cfg(feature = "test-support")]
pub mod testing;
pub mod wire;

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time;
use tracing::{debug, info, warn};

use meshlink_uapi::handover::{AgentEvent, AppAnswer};

use crate::MigrateError;
use destination::{Incoming, Received};
use registration::{AgentMsg, Answers};
use source::Outgoing;
pub use source::{Freeze, Outbound, Shipment};
pub use wire::FormatError;

/// The listener's backlog: clients arriving during a handover wait in it.
const BACKLOG: i32 = 1024;
/// How long a failing accept on the handover port pauses taking handovers.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// How an application's state travels in a handover: its own state, apart from its
/// connections, and each connection's session (what it keeps of the connection beside the
/// socket: who the client is, input read but not handled, output not written yet).
///
/// Both arrive from the network at the destination: the decoders check every field and cap
/// every size, and an error names the field at fault ([`FormatError::invalid`]); it is sent
/// back to the source and logged on both sides, and the move does not happen.
pub trait Application: 'static {
    /// Names the application and the version of its encoding, like `meshlink-chat/1`: a
    /// destination takes only a state of its own format.
    const FORMAT: &'static str;
    /// The application's own state apart from its connections (`()` for none).
    type State: Send + 'static;
    /// What the application keeps of one connection beside its socket. What it holds that
    /// cannot travel (a place in the application's own tables, say) is left out of the
    /// encoding and comes back empty at the destination.
    type Session: Send + 'static;

    /// The state's bytes.
    fn encode_state(state: &Self::State) -> Vec<u8>;
    /// A state shipped by [`Application::encode_state`].
    ///
    /// # Errors
    /// [`FormatError`] naming the field at fault.
    fn decode_state(bytes: &[u8]) -> Result<Self::State, FormatError>;
    /// A session's bytes.
    fn encode_session(session: &Self::Session) -> Vec<u8>;
    /// A session shipped by [`Application::encode_session`].
    ///
    /// # Errors
    /// [`FormatError`] naming the field at fault.
    fn decode_session(bytes: &[u8]) -> Result<Self::Session, FormatError>;
}

/// What a [`Migrator`] is told at start.
#[derive(Debug, Clone)]
pub struct Config {
    /// The workload whose handovers the application takes part in.
    pub workload: String,
    /// The agent's userspace API socket.
    pub agent_socket: PathBuf,
    /// How long a source gives the destination to connect, take the state and answer ready
    /// (3 s); the clients are frozen meanwhile. It also bounds sending the final frame.
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

impl Config {
    /// The defaults for `workload`, with the agent at `agent_socket`.
    pub fn new(workload: impl Into<String>, agent_socket: impl Into<PathBuf>) -> Self {
        Config {
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

/// Why a [`Migrator`] could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The handover listener's address cannot be read.
    #[error("the handover listener: {0}")]
    Handovers(io::Error),
    /// The thread that talks to the agent could not start.
    #[error("cannot start the agent's thread: {0}")]
    Agent(io::Error),
}

/// A listener on `addr` for a server that migrates: `IP_FREEBIND` (the workload address
/// need not be on this host yet), `SO_REUSEADDR` (a restart binds while old connections
/// linger) and a deep backlog (clients arriving during a handover wait in it). Restored
/// connections bind beside it on its port.
///
/// # Errors
/// The socket call that failed. Must be called within a tokio runtime.
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
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

/// A connection stopped at a clean point: its socket and its session.
#[derive(Debug)]
pub struct Paused<S> {
    /// The socket, whole.
    pub stream: TcpStream,
    /// The client's address.
    pub peer: SocketAddr,
    /// What the application keeps of it.
    pub session: S,
}

/// A connection that ended here during a handover: its client closed it before the freeze,
/// or it could not be resumed. The application forgets it.
#[derive(Debug)]
pub struct Gone<S> {
    /// The client's address.
    pub peer: SocketAddr,
    /// What the application kept of it.
    pub session: S,
}

/// Connections given back to the application after a handover out that did not happen.
#[derive(Debug)]
pub struct Resumed<S> {
    /// They go on here, as they were at the pause.
    pub connections: Vec<Paused<S>>,
    /// They ended (see [`Gone`]).
    pub gone: Vec<Gone<S>>,
}

impl<S> Default for Resumed<S> {
    fn default() -> Self {
        Resumed {
            connections: Vec::new(),
            gone: Vec::new(),
        }
    }
}

/// The agent's request to hand the workload over: answer it with [`Migrator::hand_over`].
#[derive(Debug)]
pub struct Request {
    generation: u64,
    to: String,
    address: IpAddr,
    /// When it came: the freeze is timed from here, the application's pause included.
    at: Instant,
}

impl Request {
    /// The generation the move will take.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The destination's node name.
    pub fn to(&self) -> &str {
        &self.to
    }

    /// The destination's mesh address.
    pub fn address(&self) -> IpAddr {
        self.address
    }
}

/// Connections handed over from another node, live here now.
pub struct Arrival<A: Application> {
    /// The node they came from (the holder then).
    pub from: String,
    /// The application's state as shipped.
    pub state: A::State,
    /// The connections, each with its session as shipped, to serve.
    pub connections: Vec<Paused<A::Session>>,
}

/// What the application must do, from [`Migrator::next`].
pub enum Event<A: Application> {
    /// The agent asks for a handover: pause every connection at a clean point and give them
    /// to [`Migrator::hand_over`] with this request.
    HandOver(Request),
    /// A handover out got no `event=left` in time: the move did not happen, and the
    /// connections go on here.
    Resume(Resumed<A::Session>),
    /// The move happened (`event=left`): these connections are the destination's now.
    Released(Vec<A::Session>),
    /// Connections arrived from another node: serve them.
    Arrived(Arrival<A>),
}

/// How [`Migrator::hand_over`] went; the agent has been answered either way.
#[must_use]
#[derive(Debug)]
pub enum Outcome<S> {
    /// The destination holds the connections: they stay parked here until `event=left`
    /// ([`Event::Released`]) or, without it, [`Event::Resume`].
    HandedOver,
    /// The handover failed: every connection goes on here.
    Failed(Resumed<S>),
}

/// One application's part in its workload's live migrations: the registration with the
/// agent, the handovers out ([`Migrator::hand_over`]) and in, and their outcomes. Drive it
/// with [`Migrator::next`].
pub struct Migrator<A: Application> {
    config: Config,
    /// The server's own address: only connections on it are taken in.
    listen: SocketAddr,
    handovers: TcpListener,
    handover_port: u16,
    agent_rx: mpsc::UnboundedReceiver<AgentMsg>,
    agent_alive: bool,
    answers: Option<Answers>,
    /// The holder by the agent's latest `event=holder`.
    holder: Option<(String, IpAddr)>,
    outgoing: Option<Outgoing<A::Session>>,
    incoming: Option<Incoming<A>>,
    /// Whether a handover connection is being read.
    receiving: bool,
    next_id: u64,
    inbound_tx: mpsc::UnboundedSender<Received<A>>,
    inbound_rx: mpsc::UnboundedReceiver<Received<A>>,
    /// Events decided and not yet returned by `next`.
    events: VecDeque<Event<A>>,
    /// Taking handovers pauses until then after a failing accept.
    accept_pause: Option<Instant>,
}

impl<A: Application> Migrator<A> {
    /// Registers with the agent (on a thread of its own, again whenever the agent goes
    /// away) and takes handovers on `handovers` for the server listening on `listen`; sends
    /// handovers to the destination's mesh address at the same port as `handovers`.
    ///
    /// # Errors
    /// [`StartError`].
    pub fn start(
        config: Config,
        listen: SocketAddr,
        handovers: TcpListener,
    ) -> Result<Self, StartError> {
        let handover_addr = handovers.local_addr().map_err(StartError::Handovers)?;
        let agent_rx = registration::spawn(
            config.agent_socket.clone(),
            config.workload.clone(),
            config.agent_retry,
        )
        .map_err(StartError::Agent)?;
        info!(
            "migrate: listening for handovers of {} on {handover_addr}",
            config.workload
        );
        let (inbound_tx, inbound_rx) = mpsc::unbounded_channel();
        Ok(Migrator {
            config,
            listen,
            handovers,
            handover_port: handover_addr.port(),
            agent_rx,
            agent_alive: true,
            answers: None,
            holder: None,
            outgoing: None,
            incoming: None,
            receiving: false,
            next_id: 0,
            inbound_tx,
            inbound_rx,
            events: VecDeque::new(),
            accept_pause: None,
        })
    }

    /// Whether connections are parked here, handed over and waiting for the outcome: new
    /// clients should wait in the accept backlog meanwhile.
    pub fn parked(&self) -> bool {
        self.outgoing.is_some()
    }

    /// The next thing the application must do. Cancel-safe: use it in a `select!` beside
    /// the application's own work.
    pub async fn next(&mut self) -> Event<A> {
        loop {
            if let Some(event) = self.events.pop_front() {
                return event;
            }
            let deadline = self.deadline();
            tokio::select! {
                msg = self.agent_rx.recv(), if self.agent_alive => self.on_agent(msg),
                accepted = self.handovers.accept(), if self.accept_pause.is_none() => {
                    self.on_handover_connection(accepted);
                }
                Some(received) = self.inbound_rx.recv() => self.on_inbound(received),
                () = sleep_until(deadline) => self.on_deadline(),
            }
        }
    }

    /// Ends what is under way, silently (a move may have happened): parked connections are
    /// discarded, held ones too.
    pub fn shutdown(mut self) {
        self.drop_outgoing();
        self.drop_incoming();
    }

    /// The next deadline of what is under way.
    fn deadline(&self) -> Option<Instant> {
        let out = self.outgoing.as_ref().map(|o| o.deadline);
        let inc = self.incoming.as_ref().map(|i| i.deadline);
        out.into_iter().chain(inc).chain(self.accept_pause).min()
    }

    fn on_deadline(&mut self) {
        let now = Instant::now();
        self.outgoing_deadline(now);
        self.incoming_deadline(now);
        self.accept_pause = self.accept_pause.filter(|at| *at > now);
    }

    fn holder_text(&self) -> String {
        match &self.holder {
            Some((name, address)) => format!("{name} at {address}"),
            None => "no holder known".into(),
        }
    }

    fn on_agent(&mut self, msg: Option<AgentMsg>) {
        let event = match msg {
            None => {
                warn!("migrate: the agent's thread ended; no more handovers");
                self.answers = None;
                self.holder = None;
                self.agent_alive = false;
                return;
            }
            Some(AgentMsg::Registered(answers)) => {
                info!(
                    "migrate: registered for {} with the agent at {}",
                    self.config.workload,
                    self.config.agent_socket.display()
                );
                self.answers = Some(answers);
                return;
            }
            Some(AgentMsg::Lost(why)) => {
                info!("migrate: lost the agent ({why}); registering again");
                self.answers = None;
                self.holder = None;
                return;
            }
            Some(AgentMsg::Event(event)) => event,
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
                if self.outgoing.is_some() {
                    let error = "a handover is already under way";
                    info!("migrate: handover to {to} failed: {error}; resumed 0 connections here");
                    self.answer(generation, Some(error.into()));
                } else {
                    self.events.push_back(Event::HandOver(Request {
                        generation,
                        to,
                        address,
                        at: Instant::now(),
                    }));
                }
            }
            AgentEvent::Left {
                generation,
                moved: false,
                ..
            } => {
                // The lease ran out, the workload still given here: not the move (yet); a
                // handover under way waits on for `left` as moved, or an abort.
                info!("migrate: stopped answering for {workload} at generation {generation} (lease), not moved");
            }
            AgentEvent::Left { generation, .. } => match self.outgoing.take() {
                Some(out) => self.left(out, generation),
                None => info!("migrate: left {workload} at generation {generation}"),
            },
            AgentEvent::Aborted { generation, .. } => {
                info!(
                    "migrate: the handover of {workload} at generation {generation} was called off"
                );
                self.abort_outgoing();
            }
            AgentEvent::Arrived { generation, .. } => self.arrived(generation),
        }
    }

    fn answer(&self, generation: u64, error: Option<String>) {
        let answer = AppAnswer::HandedOver {
            workload: self.config.workload.clone(),
            generation,
            error,
        };
        if !self.answers.as_ref().is_some_and(|a| a.send(answer)) {
            info!("migrate: cannot answer the handover: not registered with the agent");
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// A duration in milliseconds, for the logs.
fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
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
