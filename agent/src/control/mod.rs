//! The control channel: joining a network with a token, then keeping the network map current
//! over a QUIC session to the coordinator, through outages.
//!
//! - [`join`] and [`authenticate`] open a session to one coordinator address (pinned TLS, see
//!   `tls`) and return the coordinator's welcome and the first full map.
//! - [`MeshControl::run`] is the long-lived loop: it applies deltas (asking for a full map on a
//!   version gap), caches every map in the state directory, reports the node's underlay
//!   endpoints when they change and its paths to its peers as they change (at most one report
//!   a second: `Pace`), and reconnects with jittered exponential backoff when the
//!   coordinator goes away, to the next of the mesh's coordinators (`coordinators`: which
//!   one, and when a holder gives up on one whose lease renewals stopped). Tunnels never wait
//!   for it: the data plane keeps the last map.
//! - Maps are published on a `watch` channel; `crate::run` turns them into peers
//!   (`peers::EndpointChooser`) and applies only the difference.

pub mod coordinators;
pub mod discovery;
pub mod handover;
pub mod keys;
pub mod paths;
pub mod peers;
pub mod relay;
pub mod state;
pub mod tls;
pub mod transport;
pub mod workloads;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use meshlink_proto::control::{
    self, Auth, ClientMessage, Decoder, Hello, Record, ServerMessage, Welcome, MAX_SERVER_MESSAGE,
    MAX_TALKERS, PROTOCOL_VERSION, TALKER_WINDOW_SECS,
};
use meshlink_proto::token::{JoinToken, TokenError};
use meshlink_proto::{Netmap, NodeId, PublicKey};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use meshlink_proto::agent_session::{ClaimError, ClaimId, Event, SessionError};
use meshlink_proto::key_rotation::KeyAction;
use meshlink_proto::reconnect::{Reconnect, ReconnectPolicy};
use meshlink_proto::workload::HEARTBEATS_PER_LEASE;
use state::{NodeState, StateDir, StateError};
use tls::Liveness;
use transport::Transport;
use workloads::{ClaimRequest, Shared, Tunnels};

/// How long connecting and the first exchange may take (joining; reconnections follow
/// [`ReconnectPolicy`]).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often local endpoints are checked for changes.
const ENDPOINT_CHECK: Duration = Duration::from_secs(5);
/// The shortest time between two writes of the cached map (see [`MapCache`]).
const CACHE_INTERVAL: Duration = Duration::from_secs(1);
/// The shortest time between two path reports to the coordinator (a [`Pace`]).
const REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// Why the control channel failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The join token is not usable.
    #[error("join token: {0}")]
    Token(#[from] TokenError),
    /// The coordinator could not be reached or the session broke.
    #[error("coordinator {addr}: {reason}")]
    Connect {
        /// The coordinator's address.
        addr: String,
        /// What went wrong.
        reason: String,
    },
    /// The coordinator refused or revoked this node (a bad or used-up token, an unknown
    /// node), or broke the protocol.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The state directory failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The node switched to its next key: the session ends so that a new one says hello with
    /// it (which completes the rotation at the coordinator); it is opened again at once.
    #[error("switched to the new key; saying hello with it")]
    KeySwitched,
    /// The session ran over TLS/TCP and QUIC answers again: it ends so that the next one,
    /// opened at once, runs over QUIC.
    #[error("QUIC answers again; moving the session off TCP")]
    QuicBack,
}

/// An open control session.
pub struct Session {
    addr: String,
    transport: Transport,
    decoder: Decoder,
    /// Where relay frames that arrive on the stream go (sessions over TCP).
    relay_sink: Option<mpsc::Sender<Vec<u8>>>,
    /// What the welcome offered: the reflexive address port, relaying, path reports.
    reflect_port: Option<u16>,
    relay: bool,
    path_reports: bool,
    talker_reports: bool,
    /// Whether its coordinator takes handover answers (`Welcome::handover`).
    handover: bool,
    /// The welcome, for the session state.
    welcome: Option<Welcome>,
}

impl Session {
    async fn connect(
        addr: &str,
        pin: &str,
        patience: Duration,
        liveness: Liveness,
    ) -> Result<Session, ControlError> {
        let fail = |reason: String| ControlError::Connect {
            addr: addr.to_string(),
            reason,
        };
        let target = tokio::net::lookup_host(addr)
            .await
            .map_err(|e| fail(e.to_string()))?
            .next()
            .ok_or_else(|| fail("no address".into()))?;
        let transport = Transport::connect(target, pin, patience, liveness)
            .await
            .map_err(fail)?;
        Ok(Session {
            addr: addr.to_string(),
            transport,
            // Its hello says it takes compressed records: each is bounded as a message is.
            decoder: Decoder::with_compression(MAX_SERVER_MESSAGE),
            relay_sink: None,
            reflect_port: None,
            relay: false,
            path_reports: false,
            talker_reports: false,
            handover: false,
            welcome: None,
        })
    }

    /// The coordinator address the session was opened to.
    pub fn address(&self) -> &str {
        &self.addr
    }

    async fn send(&mut self, msg: &ClientMessage) -> Result<(), ControlError> {
        self.transport
            .write(&control::encode(msg))
            .await
            .map_err(|reason| ControlError::Connect {
                addr: self.addr.clone(),
                reason,
            })
    }

    async fn recv(&mut self) -> Result<ServerMessage, ControlError> {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match self
                .decoder
                .decode_record::<ServerMessage>()
                .map_err(|e| protocol(e.to_string()))?
            {
                Some(Record::Message(m)) => return Ok(m),
                Some(Record::Relay(frame)) => {
                    // Relay frames on the stream (TCP): to the relay client, never waited for.
                    if let Some(sink) = &self.relay_sink {
                        let _ = sink.try_send(frame);
                    }
                    continue;
                }
                None => {}
            }
            match self.transport.read(&mut buf).await {
                Ok(Some(n)) => self
                    .decoder
                    .push(&buf[..n])
                    .map_err(|e| protocol(e.to_string()))?,
                Ok(None) => {
                    return Err(ControlError::Connect {
                        addr: self.addr.clone(),
                        reason: "the coordinator closed the session".into(),
                    })
                }
                Err(reason) => {
                    return Err(ControlError::Connect {
                        addr: self.addr.clone(),
                        reason,
                    })
                }
            }
        }
    }

    /// Sends the hello and waits for the welcome and the first map.
    async fn hello(&mut self, hello: Hello) -> Result<(Welcome, Netmap), ControlError> {
        self.send(&ClientMessage::Hello(hello)).await?;
        let exchange = async {
            let welcome = match self.recv().await? {
                ServerMessage::Welcome(w) => w,
                ServerMessage::Refused { reason } => {
                    return Err(SessionError::Refused(reason).into())
                }
                ServerMessage::Unavailable { reason } => {
                    return Err(SessionError::Unavailable(reason).into())
                }
                ServerMessage::Revoked { reason } => {
                    return Err(SessionError::Revoked(reason).into())
                }
                other => {
                    return Err(protocol(format!(
                        "expected a welcome, got {}",
                        other.kind()
                    )))
                }
            };
            self.reflect_port = welcome.reflect_port;
            self.relay = welcome.relay;
            self.path_reports = welcome.path_reports;
            self.talker_reports = welcome.talker_reports;
            self.handover = welcome.handover;
            self.welcome = Some(welcome.clone());
            match self.recv().await? {
                ServerMessage::FullMap(m) => Ok((welcome, m)),
                other => Err(protocol(format!(
                    "expected a full map, got {}",
                    other.kind()
                ))),
            }
        };
        tokio::time::timeout(CONNECT_TIMEOUT, exchange)
            .await
            .map_err(|_| ControlError::Connect {
                addr: self.addr.clone(),
                reason: "no welcome within 10 s".into(),
            })?
    }
}

/// Joins the network a token names through the coordinator at `addr` (one of the token's),
/// reporting `endpoints` (the node's underlay addresses and WireGuard port, when already
/// known). The private key stays here; only `public_key` is sent. The node's coordinators are
/// those the welcome lists, else the token's.
///
/// # Errors
/// [`ControlError`]: unreachable coordinator, refused token, protocol trouble.
pub async fn join(
    token: &JoinToken,
    addr: &str,
    public_key: PublicKey,
    name: Option<String>,
    labels: BTreeMap<String, String>,
    endpoints: Vec<SocketAddr>,
) -> Result<(NodeState, Netmap, Session), ControlError> {
    // The join's connection becomes the node's session: it notices a dead coordinator as any
    // node's does, at the default lease (a coordinator with another lease is corrected at the
    // next session).
    let elsewhere = token.coordinators().len() > 1;
    let liveness = Liveness::for_node(false, meshlink_proto::workload::DEFAULT_LEASE, elsewhere);
    let mut s = Session::connect(addr, &token.fingerprint, CONNECT_TIMEOUT, liveness).await?;
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        auth: Auth::JoinToken {
            secret: token.secret.clone(),
        },
        public_key,
        key_rotation: true,
        policy_edits: true,
        compression: true,
        handover: true,
        name,
        labels,
        endpoints,
    };
    let (w, map) = s.hello(hello).await?;
    let secret = w
        .node_secret
        .clone()
        .ok_or_else(|| protocol("the welcome after a join carries no node secret"))?;
    let mut node = NodeState {
        coordinator: token.coordinator.clone(),
        coordinators: token.coordinators(),
        fingerprint: token.fingerprint.clone(),
        node_id: w.node_id,
        node_secret: secret,
        name: w.name,
        network: w.network,
        network_cidr: w.network_cidr,
        network_cidr6: w.network_cidr6,
        addresses: w.addresses,
        listen_port: None,
    };
    node.set_coordinators(&w.coordinators);
    Ok((node, map, s))
}

/// Opens a session to the coordinator at `addr` with the node's own credentials; the QUIC
/// handshake may take `patience`, and the connection notices a silent coordinator as
/// `liveness` says.
///
/// # Errors
/// [`ControlError`].
pub async fn authenticate(
    node: &NodeState,
    addr: &str,
    public_key: PublicKey,
    endpoints: Vec<SocketAddr>,
    patience: Duration,
    liveness: Liveness,
) -> Result<(Welcome, Netmap, Session), ControlError> {
    let mut s = Session::connect(addr, &node.fingerprint, patience, liveness).await?;
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        auth: Auth::Node {
            node_id: node.node_id,
            secret: node.node_secret.clone(),
        },
        public_key,
        key_rotation: true,
        policy_edits: true,
        compression: true,
        handover: true,
        name: None,
        labels: BTreeMap::new(),
        endpoints,
    };
    let (w, m) = s.hello(hello).await?;
    Ok((w, m, s))
}

/// This host's underlay endpoints: every up, non-loopback address with `port`, except those of
/// the tunnel interface and inside the overlay.
pub fn local_endpoints(port: u16, tunnel: &str, overlay: &[IpNet]) -> Vec<SocketAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out: Vec<SocketAddr> = addrs
        .filter(|a| a.interface_name != tunnel)
        .filter_map(|a| {
            let sa = a.address?;
            let ip: IpAddr = if let Some(v4) = sa.as_sockaddr_in() {
                IpAddr::V4(v4.ip())
            } else {
                IpAddr::V6(sa.as_sockaddr_in6()?.ip())
            };
            let unusable = ip.is_loopback()
                || ip.is_unspecified()
                || ip.is_multicast()
                || matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
                || overlay.iter().any(|o| o.contains(&ip));
            (!unusable).then_some(SocketAddr::new(ip, port))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// A uniformly random fraction of `[0, 1)`, in thousandths.
pub fn fraction() -> f64 {
    f64::from(rand_core::RngCore::next_u32(&mut rand_core::OsRng) % 1000) / 1000.0
}

/// The coordinator broke the protocol.
fn protocol(reason: impl Into<String>) -> ControlError {
    SessionError::Protocol(reason.into()).into()
}

impl ControlError {
    /// Whether the coordinator turned this node away for good (refused or revoked): no
    /// reconnection helps.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            ControlError::Session(SessionError::Refused(_) | SessionError::Revoked(_))
        )
    }
}

/// The long-lived control loop of a joined node: the I/O shell around
/// [`meshlink_proto::agent_session::AgentSession`] (kept in [`Shared`], where the reconciler
/// reads the holdings) and [`coordinators::Coordinators`], which decide everything. This loop
/// only moves the session's messages over the QUIC session to the coordinator chosen, feeds
/// it time, claims and endpoint changes, and carries out its events.
pub struct MeshControl {
    state: StateDir,
    node: NodeState,
    public_key: PublicKey,
    maps: watch::Sender<Netmap>,
    first: Option<(Session, Netmap)>,
    shared: Arc<Shared>,
    claims: mpsc::Receiver<ClaimRequest>,
    /// Where the answer of each claim handed to the session goes.
    replies: HashMap<ClaimId, std::sync::mpsc::Sender<Result<u64, ClaimError>>>,
    reconnect: Reconnect,
    cache: MapCache,
    /// Where a key switch reaches the data plane (see `keys`).
    key_switch: Option<Arc<dyn keys::KeySwitch>>,
    /// Applications' answers to handovers (taken from `shared` once).
    handover_answers: Option<mpsc::Receiver<handover::Answer>>,
}

/// At most one of something per `interval`: at once when the last went longer ago, else once
/// at the end of the interval (whatever waits then goes as one). Pure, given time: the map
/// cache's writes ([`MapCache`]) and the path reports to the coordinator are paced by it.
#[derive(Debug)]
struct Pace {
    interval: Duration,
    last: Option<Instant>,
    waiting: bool,
}

impl Pace {
    fn new(interval: Duration) -> Self {
        Pace {
            interval,
            last: None,
            waiting: false,
        }
    }

    /// Something changed at `now`: whether it goes now (counted gone; else it waits for
    /// [`Pace::poll_timeout`]).
    fn changed(&mut self, now: Instant) -> bool {
        if self.last.is_some_and(|at| now < at + self.interval) {
            self.waiting = true;
            false
        } else {
            self.went(now);
            true
        }
    }

    /// When what waits goes; `None` when nothing waits.
    fn poll_timeout(&self) -> Option<Instant> {
        if !self.waiting {
            return None;
        }
        self.last.map(|at| at + self.interval)
    }

    /// Whether what waits goes at `now` (counted gone then).
    fn handle_timeout(&mut self, now: Instant) -> bool {
        let due = self.poll_timeout().is_some_and(|at| at <= now);
        if due {
            self.went(now);
        }
        due
    }

    /// What waited went at `now`, whatever its time.
    fn went(&mut self, now: Instant) {
        self.waiting = false;
        self.last = Some(now);
    }

    /// What waited is dropped.
    fn cancel(&mut self) {
        self.waiting = false;
    }
}

/// The map cached in the state directory, written at most once per [`CACHE_INTERVAL`]: every
/// delta changes the map, and each write is the whole map, synced to disk, so a burst of
/// deltas (a wave of joins, a peer's endpoint changes) would otherwise cost as many. A map
/// that changes within the interval after a write is written at its end, the latest one
/// only; whatever waits is written when the session ends and when the control loop is dropped
/// (the agent shutting down), and dropped when the node is revoked.
struct MapCache {
    state: StateDir,
    pace: Pace,
    pending: Option<Netmap>,
}

impl MapCache {
    fn new(state: StateDir) -> Self {
        MapCache {
            state,
            pace: Pace::new(CACHE_INTERVAL),
            pending: None,
        }
    }

    /// The map changed at `now`: written now, or kept for the end of the interval.
    fn changed(&mut self, map: &Netmap, now: Instant) {
        if self.pace.changed(now) {
            self.pending = None;
            self.write(map);
        } else {
            self.pending = Some(map.clone());
        }
    }

    /// When the map waiting must be written; `None` when none waits.
    fn poll_timeout(&self) -> Option<Instant> {
        self.pace.poll_timeout()
    }

    /// Writes the map waiting, if its time has come at `now`.
    fn handle_timeout(&mut self, now: Instant) {
        if self.pace.handle_timeout(now) {
            if let Some(map) = self.pending.take() {
                self.write(&map);
            }
        }
    }

    /// Writes the map waiting, if any, now.
    fn flush(&mut self, now: Instant) {
        if let Some(map) = self.pending.take() {
            self.pace.went(now);
            self.write(&map);
        }
    }

    /// Forgets the map waiting (the node was revoked: its cache goes).
    fn discard(&mut self) {
        self.pending = None;
        self.pace.cancel();
    }

    fn write(&self, map: &Netmap) {
        if let Err(e) = self.state.save_netmap(map) {
            warn!("caching the network map: {e}");
        }
    }
}

impl Drop for MapCache {
    fn drop(&mut self) {
        self.flush(Instant::now());
    }
}

/// What the control loop needs to carry out a session's events.
struct Effects<'a> {
    tunnels: &'a Arc<dyn Tunnels>,
    prepared: &'a mpsc::Sender<(String, u64)>,
}

impl MeshControl {
    /// A loop for `node`, publishing maps on `maps`; `first` is a session already open (after a
    /// join) with its first map, if any. `shared` holds the session state (its map is the one
    /// `maps` starts with); `claims` come from the userspace API.
    pub fn new(
        state: StateDir,
        node: NodeState,
        public_key: PublicKey,
        maps: watch::Sender<Netmap>,
        first: Option<(Session, Netmap)>,
        shared: Arc<Shared>,
        claims: mpsc::Receiver<ClaimRequest>,
    ) -> Self {
        // A rotation under way when the agent stopped: its next key is still to switch to.
        match state.next_key() {
            Ok(Some(next)) => shared
                .lock()
                .set_next_key(Instant::now(), Some(next.public_key())),
            Ok(None) => {}
            Err(e) => warn!("the next key of a rotation is unusable: {e}"),
        }
        MeshControl {
            key_switch: None,
            handover_answers: shared.handovers.take_answers(),
            cache: MapCache::new(state.clone()),
            state,
            node,
            public_key,
            maps,
            first,
            shared,
            claims,
            replies: HashMap::new(),
            reconnect: Reconnect::new(ReconnectPolicy::default()),
        }
    }

    /// Switches of the node's key (rotations) go to `switch` (the data plane).
    #[must_use]
    pub fn with_key_switch(mut self, switch: Arc<dyn keys::KeySwitch>) -> Self {
        self.key_switch = Some(switch);
        self
    }

    /// Runs until the node is revoked or refused. `wg_port` is the data plane's UDP port and
    /// `tunnel` its interface (left out of reported endpoints).
    ///
    /// # Errors
    /// [`ControlError::Session`] when the node was revoked or refused; other failures are
    /// retried.
    pub async fn run(
        mut self,
        wg_port: u16,
        tunnel: String,
        tunnels: Arc<dyn Tunnels>,
    ) -> Result<(), ControlError> {
        if self.node.listen_port != Some(wg_port) {
            self.node.listen_port = Some(wg_port);
            if let Err(e) = self.state.save_node(&self.node) {
                warn!("saving the listen port: {e}");
            }
        }
        loop {
            let (holder, lease) = {
                let session = self.shared.lock();
                let h = session.holdings();
                (h.is_holder(), h.heartbeat_interval() * HEARTBEATS_PER_LEASE)
            };
            let opened = match self.first.take() {
                // The join's welcome listed the coordinators already.
                Some((s, map)) => Ok((s, map, Vec::new())),
                None => {
                    let eps = self.endpoints(wg_port, &tunnel);
                    let (addr, patience, elsewhere) = {
                        let c = self.shared.coordinators();
                        let patience = self.reconnect.patience(holder);
                        (
                            c.target().to_string(),
                            c.patience(patience, self.reconnect.failures()),
                            c.addresses().len() > 1,
                        )
                    };
                    debug!(coordinator = %addr, "connecting");
                    authenticate(
                        &self.node,
                        &addr,
                        self.public_key,
                        eps,
                        patience,
                        Liveness::for_node(holder, lease, elsewhere),
                    )
                    .await
                    .map(|(w, map, s)| (s, map, w.coordinators))
                }
            };
            let pause = match opened {
                Ok((s, map, listed)) => {
                    self.shared.coordinators().connected(s.address());
                    self.learn(&listed);
                    if self.reconnect.failures() > 0 {
                        info!(coordinator = %s.address(), "control session re-established");
                    } else {
                        debug!(coordinator = %s.address(), "control session open");
                    }
                    self.reconnect.connected();
                    let e = self.serve(s, map, wg_port, &tunnel, &tunnels).await;
                    if matches!(e, ControlError::KeySwitched | ControlError::QuicBack) {
                        // Not a failure: the same coordinator, at once (with the new key, or
                        // over QUIC).
                        if matches!(e, ControlError::QuicBack) {
                            info!(coordinator = %self.shared.coordinators().target(), "QUIC answers again: the control session moves off TCP");
                        }
                        continue;
                    }
                    self.shared.coordinators().failed();
                    if e.is_final() {
                        return Err(self.stopped(e));
                    }
                    warn!("control session lost: {e}; tunnels keep running on the last map");
                    let (holder, fleet) = {
                        let s = self.shared.lock();
                        (s.holdings().is_holder(), s.map().peers.len() + 1)
                    };
                    self.reconnect.after_session(holder, fleet, fraction())
                }
                Err(e) if e.is_final() => {
                    self.shared.lock().stop();
                    return Err(self.stopped(e));
                }
                Err(e) => {
                    let next = {
                        let mut c = self.shared.coordinators();
                        c.failed();
                        c.target().to_string()
                    };
                    let attempt = self.reconnect.failures() + 1;
                    if attempt == 1 || attempt.is_power_of_two() {
                        warn!(attempt, "cannot reach the coordinator: {e}; trying {next}");
                    }
                    self.reconnect.after_failure(holder, fraction())
                }
            };
            tokio::time::sleep(pause).await;
        }
    }

    /// The endpoints to report: the local ones, then the reflexive one (the WireGuard socket
    /// as the coordinator sees it through NAT), when known and not already listed.
    fn endpoints(&self, wg_port: u16, tunnel: &str) -> Vec<SocketAddr> {
        let mut eps = local_endpoints(wg_port, tunnel, &self.node.networks());
        if let Some(r) = *self.shared.reflexive.borrow() {
            if !eps.contains(&r) {
                eps.push(r);
            }
        }
        eps
    }

    /// A welcome listed the mesh's coordinators: they replace the known ones, and the node's
    /// file is written when they changed.
    fn learn(&mut self, listed: &[String]) {
        let list = {
            let mut c = self.shared.coordinators();
            if !c.learn(listed) {
                return;
            }
            c.addresses().to_vec()
        };
        if self.node.set_coordinators(&list) {
            info!(coordinators = ?list, "the mesh's coordinators changed");
            if let Err(e) = self.state.save_node(&self.node) {
                warn!("saving the coordinators: {e}");
            }
        }
    }

    /// The node was refused or revoked: nothing is held any more; a revoked node forgets its
    /// credentials and its map.
    fn stopped(&mut self, e: ControlError) -> ControlError {
        self.shared.changed.notify_one();
        if matches!(e, ControlError::Session(SessionError::Revoked(_))) {
            self.cache.discard();
            self.state.forget_node();
            self.maps.send_replace(Netmap::default());
        }
        e
    }

    /// One session: its messages, time, claims and endpoint changes go into the session
    /// state; what it asks for goes out. Returns why it ended (a session only ends by an
    /// error: the connection lost, or the coordinator ending it).
    async fn serve(
        &mut self,
        mut s: Session,
        map: Netmap,
        wg_port: u16,
        tunnel: &str,
        tunnels: &Arc<dyn Tunnels>,
    ) -> ControlError {
        let endpoints = self.endpoints(wg_port, tunnel);
        {
            let mut session = self.shared.lock();
            if let Some(w) = &s.welcome {
                session.welcomed(w);
            }
            session.connected(Instant::now(), map, endpoints);
        }
        s.relay_sink = Some(self.shared.relay_frames.tx.clone());
        let remote = s.transport.remote();
        self.shared.link.send_replace(Some(workloads::Link {
            conn: s.transport.link_conn(),
            remote,
            transport: s.transport.kind(),
            reflect: s
                .reflect_port
                .map(|p| SocketAddr::new(remote.ip().to_canonical(), p)),
            relay: s.relay,
        }));
        let mut reflexive = self.shared.reflexive.subscribe();
        let mut paths = self.shared.path_report.subscribe();
        paths.mark_changed();
        // A new session's coordinator has no report from this one yet.
        let mut report_pace = Pace::new(REPORT_INTERVAL);
        let (prepared_tx, mut prepared_rx) = mpsc::channel::<(String, u64)>(16);
        let effects = Effects {
            tunnels,
            prepared: &prepared_tx,
        };
        // The talker reports this coordinator has (a new session starts with none).
        let mut talkers_sent: HashMap<String, Vec<NodeId>> = HashMap::new();
        let mut tick = tokio::time::interval(ENDPOINT_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Over TCP: whether QUIC answers again, asked now and then by a task of its own.
        let over_tcp = matches!(s.transport.kind(), control::RelayTransport::Tcp);
        let (quic_tx, mut quic_rx) = mpsc::channel::<()>(1);
        let mut quic_retry = tokio::time::interval_at(
            tokio::time::Instant::now() + transport::QUIC_RETRY,
            transport::QUIC_RETRY,
        );
        quic_retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let opened = Instant::now();
        let ended = loop {
            if let Err(e) = self.flush(&mut s, &effects).await {
                break e;
            }
            let now = Instant::now();
            // Leaving only helps with another coordinator to go to: a lone one's restart is
            // learnt sooner on the connection kept (its stateless reset) than by a new one.
            let elsewhere = self.shared.coordinators().addresses().len() > 1;
            if elsewhere
                && coordinators::renewal_overdue(self.shared.lock().holdings(), opened, now)
            {
                break ControlError::Connect {
                    addr: s.address().to_string(),
                    reason: "the lease has not been renewed and half of it is gone; \
                             trying another coordinator"
                        .into(),
                };
            }
            let wake = self.shared.lock().poll_timeout();
            let cache_due = self.cache.poll_timeout();
            let report_due = report_pace.poll_timeout();
            tokio::select! {
                m = s.recv() => {
                    let handled = m.and_then(|m| {
                        self.shared.lock().handle_message(Instant::now(), m).map_err(ControlError::from)
                    });
                    if let Err(e) = handled {
                        break e;
                    }
                }
                Some((workload, generation)) = prepared_rx.recv() => {
                    self.shared.lock().prepared(workload, generation);
                }
                Some(answer) = recv_some(&mut self.handover_answers) => {
                    if let Err(why) = &answer.result {
                        info!(workload = %answer.workload, generation = answer.generation, "the application did not hand over: {why}");
                    } else {
                        info!(workload = %answer.workload, generation = answer.generation, "the application handed over");
                    }
                    // Only a coordinator that asks for handovers takes answers (an older one
                    // would close the session on the message).
                    if s.handover {
                        self.shared.lock().handed_over(answer.workload, answer.generation, answer.attempt, answer.result);
                    }
                }
                Some(claim) = self.claims.recv() => {
                    let id = self.shared.lock().claim(Instant::now(), claim.workload, claim.deadline);
                    self.replies.insert(id, claim.reply);
                }
                () = sleep_until(wake) => {
                    self.shared.lock().handle_timeout(Instant::now());
                }
                () = sleep_until(cache_due) => self.cache.handle_timeout(Instant::now()),
                // Path reports: as they change, at most one a second (the latest).
                Ok(()) = paths.changed(), if s.path_reports => {
                    if report_pace.changed(Instant::now()) {
                        let report = paths.borrow_and_update().clone();
                        if let Err(e) = s.send(&ClientMessage::Paths { paths: report }).await {
                            break e;
                        }
                    }
                }
                () = sleep_until(report_due) => {
                    if report_pace.handle_timeout(Instant::now()) {
                        let report = paths.borrow_and_update().clone();
                        if let Err(e) = s.send(&ClientMessage::Paths { paths: report }).await {
                            break e;
                        }
                    }
                }
                _ = tick.tick() => {
                    let now = self.endpoints(wg_port, tunnel);
                    if self.shared.lock().set_endpoints(now.clone()) {
                        info!(endpoints = ?now, "endpoints changed");
                    }
                    // Who talks to the workloads held here, when it changed.
                    if s.talker_reports {
                        let reports = self.talker_reports(tunnels.as_ref(), &mut talkers_sent);
                        let mut failed = None;
                        for msg in reports {
                            if let Err(e) = s.send(&msg).await {
                                failed = Some(e);
                                break;
                            }
                        }
                        if let Some(e) = failed {
                            break e;
                        }
                    }
                }
                _ = quic_retry.tick(), if over_tcp => {
                    let (pin, tx) = (self.node.fingerprint.clone(), quic_tx.clone());
                    tokio::spawn(async move {
                        if transport::quic_answers(remote, &pin, Liveness::LONE).await {
                            let _ = tx.try_send(());
                        }
                    });
                }
                Some(()) = quic_rx.recv() => break ControlError::QuicBack,
                Ok(()) = reflexive.changed() => {
                    let now = self.endpoints(wg_port, tunnel);
                    if self.shared.lock().set_endpoints(now.clone()) {
                        info!(endpoints = ?now, "reflexive endpoint learnt");
                    }
                }
            }
        };
        self.shared.link.send_replace(None);
        self.shared.lock().disconnected();
        // Claims sent on this session are answered now (it is lost).
        self.act(&effects);
        self.cache.flush(Instant::now());
        ended
    }

    /// The talker reports due: for each workload held here, the peers that sent to its
    /// address lately, when that differs from what this coordinator was last told
    /// (`sent`, which forgets workloads no longer held).
    fn talker_reports(
        &self,
        tunnels: &dyn Tunnels,
        sent: &mut HashMap<String, Vec<NodeId>>,
    ) -> Vec<ClientMessage> {
        let (held, nodes_by_key) = {
            let st = self.shared.lock();
            // Each held workload's addresses: its IPv6 one too, if any (its talkers count).
            let held: Vec<(String, Vec<IpAddr>)> = st
                .holdings()
                .held_named(Instant::now())
                .into_iter()
                .map(|(name, h)| {
                    let v6 = st.map().workloads.get(&name).and_then(|w| w.address6);
                    let addresses = std::iter::once(h.address)
                        .chain(v6)
                        .map(|a| a.addr())
                        .collect();
                    (name, addresses)
                })
                .collect();
            if held.is_empty() && sent.is_empty() {
                return Vec::new();
            }
            let by_key: HashMap<PublicKey, NodeId> = st
                .map()
                .peers
                .values()
                .flat_map(|p| {
                    std::iter::once((p.public_key, p.node_id))
                        .chain(p.next_key.map(|k| (k, p.node_id)))
                })
                .collect();
            (held, by_key)
        };
        sent.retain(|name, _| held.iter().any(|(n, _)| n == name));
        let mut out = Vec::new();
        for (workload, addresses) in held {
            let window = Duration::from_secs(TALKER_WINDOW_SECS);
            let mut nodes: Vec<NodeId> = Vec::new();
            for address in addresses {
                for k in tunnels.talkers(address, window, MAX_TALKERS) {
                    match nodes_by_key.get(&k) {
                        Some(n) if !nodes.contains(n) && nodes.len() < MAX_TALKERS => {
                            nodes.push(*n);
                        }
                        _ => {}
                    }
                }
            }
            if sent.get(&workload) != Some(&nodes) {
                sent.insert(workload.clone(), nodes.clone());
                out.push(ClientMessage::Talkers { workload, nodes });
            }
        }
        out
    }

    /// Sends what the session state asks to send, then carries out its events.
    async fn flush(&mut self, s: &mut Session, effects: &Effects<'_>) -> Result<(), ControlError> {
        self.rotate()?;
        loop {
            let next = self.shared.lock().poll_transmit();
            let Some(msg) = next else { break };
            s.send(&msg).await?;
        }
        self.act(effects);
        Ok(())
    }

    /// Carries out the steps of a key rotation the session asks for: the next key pair made
    /// (its announcement is then sent with the other messages), or the switch to it, which
    /// ends the session ([`ControlError::KeySwitched`]) so that a new one says hello with it.
    fn rotate(&mut self) -> Result<(), ControlError> {
        loop {
            let next = self.shared.lock().poll_key_action();
            match next {
                None => return Ok(()),
                Some(KeyAction::MakeKey) => {
                    let made = match self.state.make_next_key() {
                        Ok(k) => {
                            info!(next_key = %k.public_key().short(), "made the next key pair for a rotation");
                            Some(k.public_key())
                        }
                        Err(e) => {
                            warn!("cannot make the next key pair: {e}");
                            None
                        }
                    };
                    self.shared.lock().next_key_made(Instant::now(), made);
                }
                Some(KeyAction::Switch(public)) => match self.state.switch_to_next_key(&public) {
                    Ok(key) => {
                        if let Some(switch) = &self.key_switch {
                            switch.switch_key(&key);
                        }
                        self.public_key = key.public_key();
                        self.shared.lock().key_switched(Some(public));
                        info!(key = %public.short(), "switched to the new key");
                        return Err(ControlError::KeySwitched);
                    }
                    Err(e) => {
                        warn!("cannot switch to the new key: {e}");
                        self.shared.lock().key_switched(None);
                    }
                },
            }
        }
    }

    fn act(&mut self, effects: &Effects<'_>) {
        loop {
            let next = self.shared.lock().poll_event();
            let Some(event) = next else { break };
            match event {
                Event::MapChanged => {
                    let map = self.shared.lock().map().clone();
                    self.cache.changed(&map, Instant::now());
                    self.maps.send_replace(map);
                    self.shared.changed.notify_one();
                }
                Event::HoldingsChanged => self.shared.changed.notify_one(),
                Event::DeltaRefused(refused) => {
                    let version = self.shared.lock().map().version;
                    info!(
                        version,
                        "a map change from the coordinator did not apply ({refused}); asking for the whole map"
                    );
                }
                Event::Prepare {
                    workload,
                    generation,
                    warm,
                } => {
                    // The peers that matter, by key (`None`: every peer).
                    let only: Option<workloads::PeerKeys> = warm.map(|ids| {
                        let st = self.shared.lock();
                        let peers = &st.map().peers;
                        ids.iter()
                            .filter_map(|id| peers.get(id))
                            .flat_map(|p| std::iter::once(p.public_key).chain(p.next_key))
                            .collect()
                    });
                    debug!(%workload, generation, peers = only.as_ref().map(|o| o.len()), "preparing to take a workload");
                    let tunnels = effects.tunnels.clone();
                    let tx = effects.prepared.clone();
                    tokio::spawn(async move {
                        workloads::prepare(tunnels.as_ref(), only).await;
                        let _ = tx.send((workload, generation)).await;
                    });
                }
                Event::Handover {
                    workload,
                    generation,
                    to,
                    attempt,
                } => {
                    let (dest, holds) = {
                        let st = self.shared.lock();
                        let held = st.holdings().held_named(Instant::now());
                        let holds = handover::holds(
                            st.map(),
                            &held,
                            self.node.node_id,
                            &workload,
                            generation,
                        );
                        (handover::peer(st.map(), to), holds)
                    };
                    let asked = match (holds, dest) {
                        (Err(why), _) => Err(why),
                        (Ok(()), Some((name, address))) => {
                            info!(%workload, generation, to = %name, "asked to hand a workload over");
                            self.shared
                                .handovers
                                .ask(&workload, generation, attempt, name, address)
                        }
                        (Ok(()), None) => Err(format!("node {to} is not in this node's map")),
                    };
                    if let Err(why) = asked {
                        info!(%workload, generation, "cannot hand the workload over: {why}");
                        self.shared
                            .lock()
                            .handed_over(workload, generation, attempt, Err(why));
                    }
                }
                Event::HandoverAborted {
                    workload,
                    generation,
                    attempt,
                } => {
                    if self.shared.handovers.abort(&workload, generation, attempt) {
                        info!(%workload, generation, "the coordinator called the handover off");
                    }
                }
                Event::ClaimAnswered { id, result } => {
                    if let Some(reply) = self.replies.remove(&id) {
                        let _ = reply.send(result);
                    }
                }
            }
        }
    }
}

/// The next value of `rx`, or never when there is none.
async fn recv_some<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
pub(crate) async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The version of the map in the cache file, if any.
    fn cached(state: &StateDir) -> Option<u64> {
        state.netmap().unwrap().map(|c| c.map.version)
    }

    fn map(version: u64) -> Netmap {
        Netmap {
            version,
            ..Netmap::default()
        }
    }

    /// A changed path report goes at once; changes within a second of it wait for its end
    /// and go as one (the latest, read when it goes); a flapping path costs one report a
    /// second.
    #[test]
    fn path_reports_go_at_once_then_at_most_once_a_second() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut pace = Pace::new(REPORT_INTERVAL);
        assert!(pace.changed(t0), "the first at once");
        assert_eq!(pace.poll_timeout(), None);
        // Changes right after: they wait for the second to be over, then go as one.
        for i in 1..=50 {
            assert!(!pace.changed(t0 + ms(i * 10)));
        }
        assert_eq!(pace.poll_timeout(), Some(t0 + REPORT_INTERVAL));
        assert!(!pace.handle_timeout(t0 + ms(999)));
        assert!(pace.handle_timeout(t0 + REPORT_INTERVAL));
        assert!(!pace.handle_timeout(t0 + REPORT_INTERVAL), "once");
        assert_eq!(pace.poll_timeout(), None);
        // A change long after the last report goes at once.
        assert!(pace.changed(t0 + ms(5000)));
        // A path flapping every 50 ms for 10 s: at most one report a second.
        let mut sent = 0;
        let mut now = t0 + ms(5000);
        let end = now + Duration::from_secs(10);
        while now < end {
            now += ms(50);
            if pace.handle_timeout(now) {
                sent += 1;
            }
            if pace.changed(now) {
                sent += 1;
            }
        }
        assert!((9..=10).contains(&sent), "{sent} reports in 10 s");
    }

    #[test]
    fn the_map_cache_is_written_at_most_once_a_second_the_latest_map_last() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut cache = MapCache::new(state.clone());
        cache.changed(&map(1), t0);
        assert_eq!(cached(&state), Some(1), "the first map at once");
        assert_eq!(cache.poll_timeout(), None);
        // A burst of deltas: none written until the second is over, then the latest.
        for v in 2..=200 {
            cache.changed(&map(v), t0 + ms(v));
        }
        assert_eq!(cached(&state), Some(1));
        assert_eq!(cache.poll_timeout(), Some(t0 + CACHE_INTERVAL));
        cache.handle_timeout(t0 + ms(999));
        assert_eq!(cached(&state), Some(1));
        cache.handle_timeout(t0 + CACHE_INTERVAL);
        assert_eq!(cached(&state), Some(200));
        assert_eq!(cache.poll_timeout(), None);
        // A change long after the last write is written at once.
        cache.changed(&map(201), t0 + ms(5000));
        assert_eq!(cached(&state), Some(201));
        // What waits when the loop goes (shutdown) is written.
        cache.changed(&map(202), t0 + ms(5100));
        assert_eq!(cached(&state), Some(201));
        drop(cache);
        assert_eq!(cached(&state), Some(202));
        // A revoked node's map waiting is not written after its cache was removed.
        let mut cache = MapCache::new(state.clone());
        cache.changed(&map(203), t0);
        cache.changed(&map(204), t0 + ms(10));
        cache.discard();
        state.forget_node();
        drop(cache);
        assert_eq!(cached(&state), None);
    }
}
