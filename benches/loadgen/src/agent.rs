//! One simulated agent: the control-channel half of `meshlink-agent`, over real QUIC, without
//! a data plane.
//!
//! Like the real agent it opens one QUIC connection (ALPN `meshlink/1`, the coordinator's
//! certificate pinned by fingerprint, server name `meshlink-coordinator`) and one
//! bidirectional stream, sends a `Hello` (a join token the first time, the node's credentials
//! after that), reads `Welcome` and `FullMap`, then hands every message to the agent's own
//! session state machine ([`AgentSession`]: deltas, gaps and the full map they ask for,
//! leases, prepared moves, timers) and sends what it asks. Unlike the real agent it shares a
//! client `quinn::Endpoint` (one UDP socket) with other simulated agents, keeps its map in
//! memory only (whole or as digests: [`PeerTable`]), changes its endpoints only when the
//! benchmark tells it to ([`Command::ReportEndpoints`]), and has no data plane: it holds no
//! workload, claims none, and answers a `Prepare` at once.
//!
//! Every map version it reaches is reported to the [`Scoreboard`] right after it is applied.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshlink_coordinator::identity::SERVER_NAME;
use meshlink_proto::agent_session::{AgentSession, Event, SessionError};
use meshlink_proto::control::{
    encode, Auth, ClientMessage, Decoder, Hello, ServerMessage, Welcome, MAX_SERVER_MESSAGE,
    PROTOCOL_VERSION,
};
use meshlink_proto::session_map::SessionMap;
use meshlink_proto::{DeltaError, Netmap, NodeId, PolicyChange, PublicKey};
use tokio::sync::{mpsc, oneshot};

use crate::scoreboard::Scoreboard;
use crate::table::{PeerTable, TableKind};

/// How long connecting plus the hello exchange may take. Generous: a join the coordinator
/// completed but the agent gave up on leaves a node behind and spends a token use.
const HELLO_TIMEOUT: Duration = Duration::from_secs(120);
/// The pause before opening a lost session again.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);
/// After a frame this large, the decoder is made anew once empty, so that ten thousand
/// agents do not each keep a buffer the size of the largest full map they ever received.
const SHRINK_AFTER: usize = 256 * 1024;

/// `e` and its sources, as one line (quinn's errors say little without their source).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Why a session failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The connection could not be made, or broke.
    #[error("connection: {0}")]
    Connection(String),
    /// The coordinator refused the hello.
    #[error("refused: {0}")]
    Refused(String),
    /// The node was revoked.
    #[error("revoked: {0}")]
    Revoked(String),
    /// The coordinator sent something out of order or undecodable.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The hello exchange took longer than [`HELLO_TIMEOUT`].
    #[error("no welcome and full map within {HELLO_TIMEOUT:?}")]
    Timeout,
}

/// What every agent of a run shares.
#[derive(Debug)]
pub struct Shared {
    /// The coordinators' QUIC addresses: agent `i` uses `servers[i % len]` ([`Shared::server`]).
    pub servers: Vec<SocketAddr>,
    /// How agents hold their maps.
    pub table: TableKind,
    /// Where agents report.
    pub board: Arc<Scoreboard>,
    /// Set when the run ends: lost sessions are then not opened again.
    pub stopping: AtomicBool,
    /// What agents say in their hello that they take.
    pub offers: Offers,
}

/// What a simulated agent's hello says it takes. The real agent takes all of it; without one,
/// agents are as an older agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offers {
    /// Policy changes as edits ([`Hello::policy_edits`]); without, every change is whole.
    pub policy_edits: bool,
    /// Compressed records ([`Hello::compression`]); without, every message is sent as it is.
    pub compression: bool,
}

impl Offers {
    /// A decoder of server messages for a session whose hello says this.
    fn decoder(self) -> Decoder {
        if self.compression {
            Decoder::with_compression(MAX_SERVER_MESSAGE)
        } else {
            Decoder::new(MAX_SERVER_MESSAGE)
        }
    }
}

impl Shared {
    /// The coordinator agent `index` connects to (and reconnects to): round robin over
    /// [`Shared::servers`].
    ///
    /// # Panics
    /// When `servers` is empty.
    pub fn server(&self, index: usize) -> SocketAddr {
        self.servers[index % self.servers.len()]
    }
}

/// Orders from the benchmark to one agent.
#[derive(Debug)]
pub enum Command {
    /// Send `Endpoints` with these endpoints; answer with the instant just before the write.
    ReportEndpoints {
        /// The new endpoints.
        endpoints: Vec<SocketAddr>,
        /// Receives the instant the message was handed to QUIC.
        sent: oneshot::Sender<Instant>,
    },
    /// Answer with the map's version, size and digest.
    Describe(oneshot::Sender<MapSummary>),
}

/// An agent's map, summarised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapSummary {
    /// Version.
    pub version: u64,
    /// Peers.
    pub peers: usize,
    /// [`PeerTable::digest`].
    pub digest: u64,
    /// The node's id.
    pub node: NodeId,
    /// [`meshlink_proto::Policy::digest`] of its policy (the rules that concern it), if any.
    pub policy: Option<u64>,
}

/// An open control connection: one connection, one stream, a decoder.
struct Link {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: Decoder,
    /// A large frame went through the decoder; shrink it when it is empty.
    shrink: bool,
    /// What its hello said it takes.
    offers: Offers,
}

impl Link {
    async fn open(
        endpoint: &quinn::Endpoint,
        server: SocketAddr,
        offers: Offers,
    ) -> Result<Link, AgentError> {
        let conn = endpoint
            .connect(server, SERVER_NAME)
            .map_err(|e| AgentError::Connection(chain(&e)))?
            .await
            .map_err(|e| AgentError::Connection(chain(&e)))?;
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| AgentError::Connection(chain(&e)))?;
        Ok(Link {
            conn,
            send,
            recv,
            decoder: offers.decoder(),
            shrink: false,
            offers,
        })
    }

    async fn send(&mut self, msg: &ClientMessage) -> Result<(), AgentError> {
        self.send
            .write_all(&encode(msg))
            .await
            .map_err(|e| AgentError::Connection(chain(&e)))
    }

    /// The next whole message already received, with its frame length (prefix included).
    fn decoded(&mut self) -> Result<Option<(ServerMessage, usize)>, AgentError> {
        let before = self.decoder.buffered();
        let msg = self
            .decoder
            .decode::<ServerMessage>()
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        Ok(msg.map(|m| {
            let len = before - self.decoder.buffered();
            self.shrink |= len > SHRINK_AFTER;
            (m, len)
        }))
    }

    /// Reads more bytes into the decoder. Cancel-safe (`read_chunk` is).
    async fn fill(&mut self) -> Result<(), AgentError> {
        if self.shrink && self.decoder.buffered() == 0 {
            self.decoder = self.offers.decoder();
            self.shrink = false;
        }
        match self.recv.read_chunk(usize::MAX, true).await {
            Ok(Some(chunk)) => self
                .decoder
                .push(&chunk.bytes)
                .map_err(|e| AgentError::Protocol(e.to_string())),
            Ok(None) => Err(AgentError::Connection(
                "the coordinator finished the stream".into(),
            )),
            Err(e) => Err(AgentError::Connection(chain(&e))),
        }
    }

    async fn next(&mut self) -> Result<(ServerMessage, usize), AgentError> {
        loop {
            if let Some(m) = self.decoded()? {
                return Ok(m);
            }
            self.fill().await?;
        }
    }

    /// Sends the hello and reads the welcome.
    async fn hello(&mut self, hello: Hello) -> Result<Welcome, AgentError> {
        self.send(&ClientMessage::Hello(hello)).await?;
        match self.next().await?.0 {
            ServerMessage::Welcome(w) => Ok(w),
            ServerMessage::Refused { reason } => Err(AgentError::Refused(reason)),
            ServerMessage::Unavailable { reason } => {
                Err(AgentError::Connection(format!("unavailable: {reason}")))
            }
            ServerMessage::Revoked { reason } => Err(AgentError::Revoked(reason)),
            other => Err(AgentError::Protocol(format!(
                "expected a welcome, got {other:?}"
            ))),
        }
    }

    /// Reads the full map that follows the welcome, with its frame length.
    async fn first_map(&mut self) -> Result<(Netmap, usize), AgentError> {
        match self.next().await? {
            (ServerMessage::FullMap(map), len) => Ok((map, len)),
            _ => Err(AgentError::Protocol(
                "expected a full map after the welcome".into(),
            )),
        }
    }
}

/// What a node needs to open a session after its join.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The node's id.
    pub node: NodeId,
    /// The node's secret, from the welcome of its join.
    pub secret: String,
    /// The node's WireGuard public key (random here).
    pub public_key: PublicKey,
    /// The underlay endpoints it reports.
    pub endpoints: Vec<SocketAddr>,
    /// What its hello says it takes ([`Shared::offers`]).
    pub offers: Offers,
}

impl Credentials {
    fn hello(&self) -> Hello {
        Hello {
            protocol: PROTOCOL_VERSION,
            auth: Auth::Node {
                node_id: self.node,
                secret: self.secret.clone(),
            },
            public_key: self.public_key,
            key_rotation: false,
            policy_edits: self.offers.policy_edits,
            compression: self.offers.compression,
            name: None,
            labels: BTreeMap::new(),
            endpoints: self.endpoints.clone(),
            handover: false,
        }
    }
}

/// Joins with the token secret `token` under a new random public key: opens a session and
/// reads the welcome, within [`HELLO_TIMEOUT`].
async fn join_session(
    endpoint: &quinn::Endpoint,
    server: SocketAddr,
    token: &str,
    endpoints: Vec<SocketAddr>,
    offers: Offers,
) -> Result<(Link, Credentials), AgentError> {
    let public_key = PublicKey(rand::random());
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        auth: Auth::JoinToken {
            secret: token.to_string(),
        },
        public_key,
        key_rotation: false,
        policy_edits: offers.policy_edits,
        compression: offers.compression,
        name: None,
        labels: BTreeMap::new(),
        endpoints: endpoints.clone(),
        handover: false,
    };
    let exchange = async {
        let mut session = Link::open(endpoint, server, offers).await?;
        let welcome = session.hello(hello).await?;
        Ok::<_, AgentError>((session, welcome))
    };
    let (session, welcome) = tokio::time::timeout(HELLO_TIMEOUT, exchange)
        .await
        .map_err(|_| AgentError::Timeout)??;
    let secret = welcome
        .node_secret
        .ok_or_else(|| AgentError::Protocol("no node secret in the welcome of a join".into()))?;
    let creds = Credentials {
        node: welcome.node_id,
        secret,
        public_key,
        endpoints,
        offers,
    };
    Ok((session, creds))
}

/// Opens a session with a node's credentials and reads the welcome and the full map, within
/// [`HELLO_TIMEOUT`].
async fn authenticate(
    endpoint: &quinn::Endpoint,
    server: SocketAddr,
    creds: &Credentials,
) -> Result<(Link, Netmap, usize), AgentError> {
    let exchange = async {
        let mut session = Link::open(endpoint, server, creds.offers).await?;
        session.hello(creds.hello()).await?;
        let (map, len) = session.first_map().await?;
        Ok::<_, AgentError>((session, map, len))
    };
    tokio::time::timeout(HELLO_TIMEOUT, exchange)
        .await
        .map_err(|_| AgentError::Timeout)?
}

/// A simulated agent with an open session.
pub struct Agent {
    index: usize,
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    creds: Credentials,
    link: Link,
    session: AgentSession<PeerTable>,
}

/// What the message being handled was, for the counters of what it changed.
#[derive(Debug, Clone, Copy)]
enum Arrival {
    /// A full map of this many bytes.
    FullMap(usize),
    /// A delta of this many bytes, with its policy change's counter if it has one.
    Delta(usize, Option<PolicyKind>),
    /// Anything else.
    Other,
}

#[derive(Debug, Clone, Copy)]
enum PolicyKind {
    Edit,
    Whole,
}

impl Arrival {
    fn of(msg: &ServerMessage, len: usize) -> Arrival {
        match msg {
            ServerMessage::FullMap(_) => Arrival::FullMap(len),
            ServerMessage::Delta(d) => Arrival::Delta(
                len,
                match d.policy {
                    Some(PolicyChange::Edit(_)) => Some(PolicyKind::Edit),
                    Some(PolicyChange::Set(_)) => Some(PolicyKind::Whole),
                    _ => None,
                },
            ),
            _ => Arrival::Other,
        }
    }
}

impl From<SessionError> for AgentError {
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::Refused(reason) => AgentError::Refused(reason),
            SessionError::Revoked(reason) => AgentError::Revoked(reason),
            // Retried as a lost connection is.
            SessionError::Unavailable(reason) => {
                AgentError::Connection(format!("unavailable: {reason}"))
            }
            SessionError::Protocol(reason) => AgentError::Protocol(reason),
        }
    }
}

impl Agent {
    /// Joins with the token secret `token`: a new random public key, `endpoints` as its
    /// underlay endpoints. Returns once the welcome and the full map are in.
    ///
    /// # Errors
    /// [`AgentError`].
    pub async fn join(
        shared: Arc<Shared>,
        endpoint: quinn::Endpoint,
        index: usize,
        token: &str,
        endpoints: Vec<SocketAddr>,
    ) -> Result<Agent, AgentError> {
        let (mut link, creds) = join_session(
            &endpoint,
            shared.server(index),
            token,
            endpoints,
            shared.offers,
        )
        .await?;
        let (map, len) = tokio::time::timeout(HELLO_TIMEOUT, link.first_map())
            .await
            .map_err(|_| AgentError::Timeout)??;
        Agent::start(shared, endpoint, index, creds, link, map, len).await
    }

    /// Joins like [`Agent::join`], but closes the session right after the welcome: the node
    /// is enrolled and offline. [`Agent::connect`] brings it online later.
    ///
    /// # Errors
    /// [`AgentError`].
    pub async fn enroll(
        endpoint: &quinn::Endpoint,
        server: SocketAddr,
        token: &str,
        endpoints: Vec<SocketAddr>,
        offers: Offers,
    ) -> Result<Credentials, AgentError> {
        let (link, creds) = join_session(endpoint, server, token, endpoints, offers).await?;
        link.conn.close(0u32.into(), b"enrolled");
        Ok(creds)
    }

    /// Opens a session with an enrolled node's credentials (as an agent does after a
    /// restart). Returns once the welcome and the full map are in.
    ///
    /// # Errors
    /// [`AgentError`].
    pub async fn connect(
        shared: Arc<Shared>,
        endpoint: quinn::Endpoint,
        index: usize,
        creds: Credentials,
    ) -> Result<Agent, AgentError> {
        let (link, map, len) = authenticate(&endpoint, shared.server(index), &creds).await?;
        Agent::start(shared, endpoint, index, creds, link, map, len).await
    }

    async fn start(
        shared: Arc<Shared>,
        endpoint: quinn::Endpoint,
        index: usize,
        creds: Credentials,
        link: Link,
        map: Netmap,
        len: usize,
    ) -> Result<Agent, AgentError> {
        shared.board.set_connection(index, link.conn.clone());
        let table = PeerTable::new(shared.table, creds.node);
        let mut agent = Agent {
            index,
            session: AgentSession::new(creds.node, table, Instant::now()),
            shared,
            endpoint,
            creds,
            link,
        };
        agent.connected(map, len).await?;
        Ok(agent)
    }

    /// Runs until the run ends, the node is revoked or refused, or `commands` closes.
    /// Lost sessions are opened again with the node's credentials.
    pub async fn run(mut self, mut commands: mpsc::Receiver<Command>) -> Result<(), AgentError> {
        loop {
            let ended = self.serve(&mut commands).await;
            self.session.disconnected();
            match ended {
                Ok(()) => return Ok(()),
                Err(e) if self.shared.stopping.load(Ordering::Relaxed) => {
                    tracing::debug!(agent = self.index, "session ended at shutdown: {e}");
                    return Ok(());
                }
                Err(e @ (AgentError::Revoked(_) | AgentError::Refused(_))) => {
                    self.shared
                        .board
                        .counters
                        .sessions_lost
                        .fetch_add(1, Ordering::Relaxed);
                    return Err(e);
                }
                Err(e) => {
                    self.shared
                        .board
                        .counters
                        .sessions_lost
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        agent = self.index,
                        node = self.creds.node,
                        "session lost: {e}; opening it again"
                    );
                }
            }
            loop {
                tokio::time::sleep(RECONNECT_PAUSE).await;
                if self.shared.stopping.load(Ordering::Relaxed) {
                    return Ok(());
                }
                match self.reconnect().await {
                    Ok(()) => break,
                    Err(e @ (AgentError::Revoked(_) | AgentError::Refused(_))) => {
                        self.session.stop();
                        return Err(e);
                    }
                    Err(e) => tracing::info!(agent = self.index, "reconnecting failed: {e}"),
                }
            }
        }
    }

    async fn reconnect(&mut self) -> Result<(), AgentError> {
        let (link, map, len) =
            authenticate(&self.endpoint, self.shared.server(self.index), &self.creds).await?;
        self.shared
            .board
            .set_connection(self.index, link.conn.clone());
        self.shared
            .board
            .counters
            .reconnects
            .fetch_add(1, Ordering::Relaxed);
        self.link = link;
        self.connected(map, len).await
    }

    /// The coordinator accepted the hello with `map` (`len` bytes on the wire).
    async fn connected(&mut self, map: Netmap, len: usize) -> Result<(), AgentError> {
        self.count_full_map(len);
        self.session
            .connected(Instant::now(), map, self.creds.endpoints.clone());
        self.act(Arrival::FullMap(len)).await
    }

    /// One session: messages from the coordinator, the session's timer, and commands from
    /// the benchmark.
    async fn serve(&mut self, commands: &mut mpsc::Receiver<Command>) -> Result<(), AgentError> {
        loop {
            while let Some((msg, len)) = self.link.decoded()? {
                let arrival = Arrival::of(&msg, len);
                if let Arrival::FullMap(len) = arrival {
                    self.count_full_map(len);
                }
                let handled = self.session.handle_message(Instant::now(), msg);
                self.act(arrival).await?;
                handled?;
            }
            let timer = self.session.poll_timeout();
            tokio::select! {
                filled = self.link.fill() => filled?,
                () = sleep_until(timer) => {
                    self.session.handle_timeout(Instant::now());
                    self.act(Arrival::Other).await?;
                }
                cmd = commands.recv() => match cmd {
                    None => return Ok(()),
                    Some(Command::ReportEndpoints { endpoints, sent }) => {
                        self.creds.endpoints = endpoints.clone();
                        let at = Instant::now();
                        self.session.set_endpoints(endpoints);
                        self.act(Arrival::Other).await?;
                        let _ = sent.send(at);
                    }
                    Some(Command::Describe(reply)) => {
                        let map = self.session.map();
                        let _ = reply.send(MapSummary {
                            version: map.version(),
                            peers: map.len(),
                            digest: map.digest(),
                            node: self.creds.node,
                            policy: map.policy().map(|p| p.digest()),
                        });
                    }
                },
            }
        }
    }

    fn count_full_map(&self, len: usize) {
        let counters = &self.shared.board.counters;
        counters.full_maps.fetch_add(1, Ordering::Relaxed);
        counters
            .largest_full_map
            .fetch_max(len as u64, Ordering::Relaxed);
    }

    /// Sends what the session asks, in order, and carries out its events; `arrival` is the
    /// message that was just handled, if any.
    async fn act(&mut self, arrival: Arrival) -> Result<(), AgentError> {
        while let Some(event) = self.session.poll_event() {
            let counters = &self.shared.board.counters;
            match event {
                Event::MapChanged => {
                    let version = self.session.map().version();
                    let frame = match arrival {
                        Arrival::Delta(len, policy) => {
                            counters.deltas.fetch_add(1, Ordering::Relaxed);
                            let policy = match policy {
                                Some(PolicyKind::Edit) => Some(&counters.policy_edits),
                                Some(PolicyKind::Whole) => Some(&counters.policy_wholes),
                                None => None,
                            };
                            if let Some(counter) = policy {
                                counter.fetch_add(1, Ordering::Relaxed);
                            }
                            Some(len)
                        }
                        Arrival::FullMap(_) | Arrival::Other => None,
                    };
                    self.shared.board.applied(self.index, version, frame);
                }
                Event::DeltaRefused(refused) => {
                    match refused {
                        DeltaError::Gap(_) => &counters.gaps,
                        DeltaError::Policy(_) => &counters.edits_refused,
                    }
                    .fetch_add(1, Ordering::Relaxed);
                    tracing::info!(agent = self.index, "{refused}; asking for a full map");
                }
                // No tunnels to warm: ready at once.
                Event::Prepare {
                    workload,
                    generation,
                    ..
                } => self.session.prepared(workload, generation),
                // Its hello offers no live migration; were it asked, it has no application.
                Event::Handover {
                    workload,
                    generation,
                    attempt,
                    ..
                } => self.session.handed_over(
                    workload,
                    generation,
                    attempt,
                    Err("a simulated agent runs no application".into()),
                ),
                // Simulated agents answer for no address and make no claims.
                Event::HandoverAborted { .. }
                | Event::HoldingsChanged
                | Event::ClaimAnswered { .. } => {}
            }
        }
        while let Some(msg) = self.session.poll_transmit() {
            self.link.send(&msg).await?;
        }
        Ok(())
    }
}

/// Sleeps until `at`, or for ever when there is nothing to wait for.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}
