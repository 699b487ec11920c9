//! What the control loop and the data plane share about workload addresses: the session state
//! ([`AgentSession`], whose [`meshlink_proto::workload::Holdings`] say what this node answers
//! for), the coordinators known and the one in use (for `meshlink-agent status`), a wake-up
//! for the reconciler, and claims coming from the userspace API (`meshctl workload claim`).

use std::collections::HashSet;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use meshlink_proto::agent_session::{AgentSession, ClaimError};
use meshlink_proto::{Netmap, NodeId, PublicKey};
use tokio::sync::{mpsc, watch, Notify};

use super::coordinators::Coordinators;

/// How long `meshctl workload claim` waits for the coordinator (meshctl waits 15 s, so that this
/// agent's own message reaches it).
pub const CLAIM_TIMEOUT: Duration = Duration::from_secs(10);

/// Relay frames from a TCP session waiting for the relay client; more are dropped.
const RELAY_FRAMES_QUEUED: usize = 1024;

/// State shared by the control loop (maps, leases) and the reconciler (addresses, routing).
///
/// Lock one part at a time (the session or the coordinators), never both at once.
#[derive(Debug)]
pub struct Shared {
    session: Mutex<AgentSession>,
    coordinators: Mutex<Coordinators>,
    /// Woken whenever holdings may have changed (a map, a lease, a revocation), or a path.
    pub changed: Notify,
    /// The control session's connection while one is up, with what its coordinator offers
    /// (path discovery and the relay read it).
    pub link: watch::Sender<Option<Link>>,
    /// The WireGuard socket's reflexive address, as path discovery last learnt it (the control
    /// loop reports it as an endpoint).
    pub reflexive: watch::Sender<Option<std::net::SocketAddr>>,
    /// Relay frames that arrived on a TLS/TCP session's stream, for the relay client (the
    /// receiver is taken once).
    pub relay_frames: RelayFrames,
    /// The paths to the peers, as last reported by path discovery (the control loop sends
    /// them to coordinators that take them).
    pub path_report: watch::Sender<Vec<meshlink_proto::control::PathReport>>,
    /// Applications registered for live migration (the userspace API registers them, the
    /// reconciler and the control loop tell them what happens).
    pub handovers: super::handover::Handovers,
}

/// Relay frames that arrived on a TLS/TCP session's stream, on their way to the relay client.
#[derive(Debug)]
pub struct RelayFrames {
    /// Where the session puts them.
    pub tx: mpsc::Sender<Vec<u8>>,
    /// Where the relay client takes them (taken once).
    pub rx: Mutex<Option<mpsc::Receiver<Vec<u8>>>>,
}

/// A control session's connection and what its coordinator offers.
#[derive(Debug, Clone)]
pub struct Link {
    /// What relay frames travel on (QUIC datagrams, or records on a TLS/TCP stream).
    pub conn: super::transport::LinkConn,
    /// The coordinator's address.
    pub remote: std::net::SocketAddr,
    /// What relay frames run over (QUIC datagrams: `udp`; a TLS/TCP stream: `tcp`).
    pub transport: meshlink_proto::control::RelayTransport,
    /// The coordinator's reflexive address port, at the connection's remote address.
    pub reflect: Option<std::net::SocketAddr>,
    /// Whether the coordinator relays.
    pub relay: bool,
}

impl Shared {
    /// Node `me`, starting from `map` (cached or just received), nothing held yet, with the
    /// mesh's `coordinators`.
    pub fn new(
        me: NodeId,
        map: Netmap,
        now: std::time::Instant,
        coordinators: Coordinators,
    ) -> Self {
        Shared {
            session: Mutex::new(AgentSession::new(me, map, now)),
            coordinators: Mutex::new(coordinators),
            changed: Notify::new(),
            link: watch::channel(None).0,
            reflexive: watch::channel(None).0,
            path_report: watch::channel(Vec::new()).0,
            handovers: super::handover::Handovers::default(),
            relay_frames: {
                let (tx, rx) = mpsc::channel(RELAY_FRAMES_QUEUED);
                RelayFrames {
                    tx,
                    rx: Mutex::new(Some(rx)),
                }
            },
        }
    }

    /// The session state.
    pub fn lock(&self) -> MutexGuard<'_, AgentSession> {
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The coordinators known, and the one in use.
    pub fn coordinators(&self) -> MutexGuard<'_, Coordinators> {
        self.coordinators.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why a claim from the userspace API did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimFailure {
    /// The session answered it: the coordinator refused it, or the session ended or its
    /// deadline passed before an answer.
    #[error(transparent)]
    Session(#[from] ClaimError),
    /// The control loop did not take the request.
    #[error("the control loop is busy or stopped")]
    Busy,
    /// No answer within [`CLAIM_TIMEOUT`].
    #[error("no answer from the coordinator within {} s (is it reachable?)", .0.as_secs())]
    Timeout(Duration),
    /// The control loop ended without answering.
    #[error("the control loop stopped before the coordinator answered; try again")]
    Stopped,
    /// The agent has no coordinator: it runs static peers.
    #[error("this agent runs static peers, not joined to a coordinator")]
    NotJoined,
}

/// A claim from the userspace API, answered on `reply` with the generation or why not.
#[derive(Debug)]
pub struct ClaimRequest {
    /// The workload's name.
    pub workload: String,
    /// Where the answer goes (a blocking caller waits on it).
    pub reply: std::sync::mpsc::Sender<Result<u64, ClaimError>>,
    /// The caller gives up then: a claim still queued by that time is not sent (the caller
    /// was told it failed).
    pub deadline: std::time::Instant,
}

/// The sending half for claims, held by the userspace API handler.
pub type ClaimSender = mpsc::Sender<ClaimRequest>;

/// Asks the control loop to claim `workload` and waits (blocking) for the answer.
///
/// # Errors
/// [`ClaimFailure`]: the coordinator's refusal, or why no answer came.
pub fn claim_blocking(tx: &ClaimSender, workload: &str) -> Result<u64, ClaimFailure> {
    let (reply, answer) = std::sync::mpsc::channel();
    let deadline = std::time::Instant::now() + CLAIM_TIMEOUT;
    tx.try_send(ClaimRequest {
        workload: workload.to_string(),
        reply,
        deadline,
    })
    .map_err(|_| ClaimFailure::Busy)?;
    match answer.recv_timeout(CLAIM_TIMEOUT) {
        Ok(r) => Ok(r?),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            Err(ClaimFailure::Timeout(CLAIM_TIMEOUT))
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(ClaimFailure::Stopped),
    }
}

/// Peers by public key (`None` where it stands for every peer).
pub type PeerKeys = HashSet<PublicKey>;

/// What the control loop needs from the data plane to prepare a move here, and to tell the
/// coordinator who talks to the workloads held here.
pub trait Tunnels: Send + Sync + 'static {
    /// Starts handshakes with every peer (of `only`) that has no fresh session, and sends
    /// them.
    fn warm(&self, only: Option<PeerKeys>) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
    /// Whether every reachable peer (of `only`) has a fresh session.
    fn all_fresh(&self, only: Option<&PeerKeys>) -> bool;
    /// The peers that sent to `address` (held here) within `within`, the most recent first,
    /// at most `max`.
    fn talkers(&self, address: IpAddr, within: Duration, max: usize) -> Vec<PublicKey>;
}

/// How long a move's preparation waits for handshakes before answering anyway.
pub const PREPARE_BUDGET: Duration = Duration::from_millis(300);

/// Brings tunnels up for a coming move: starts handshakes with the peers that matter (`only`:
/// the holder and those that talk to the workload; `None`: every peer), then waits until each
/// has a fresh session or [`PREPARE_BUDGET`] has passed.
pub async fn prepare(tunnels: &dyn Tunnels, only: Option<PeerKeys>) {
    tunnels.warm(only.clone()).await;
    let deadline = tokio::time::Instant::now() + PREPARE_BUDGET;
    while !tunnels.all_fresh(only.as_ref()) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
