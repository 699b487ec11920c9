//! The control channel: joining a network with a token, then keeping the network map current
//! over a QUIC session to the coordinator, through outages.
//!
//! - [`join`] and [`authenticate`] open a session (pinned TLS, see `tls`) and return the
//!   coordinator's welcome and the first full map.
//! - [`MeshControl::run`] is the long-lived loop: it applies deltas (asking for a full map on a
//!   version gap), caches every map in the state directory, reports the node's underlay
//!   endpoints when they change, and reconnects with jittered exponential backoff when the
//!   coordinator goes away. Tunnels never wait for it: the data plane keeps the last map.
//! - Maps are published on a `watch` channel; `crate::run` turns them into peers
//!   (`peers::EndpointChooser`) and applies only the difference.

pub mod peers;
pub mod state;
pub mod tls;
pub mod workloads;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use meshlink_proto::control::{
    self, Auth, ClientMessage, Decoder, Hello, ServerMessage, Welcome, MAX_SERVER_MESSAGE,
    PROTOCOL_VERSION,
};
use meshlink_proto::token::{JoinToken, TokenError};
use meshlink_proto::{Netmap, PublicKey};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use state::{NodeState, StateDir, StateError};
use workloads::{ClaimRequest, Shared, Tunnels};

/// How long connecting and the first exchange may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the QUIC handshake of a holder of workload addresses may take before it starts
/// over: a fresh attempt sends its first packet at once, where a late one would wait for its
/// retransmission timer, so a coordinator back from a restart is reached sooner.
const HOLDER_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(1);
/// The first pause after a failed attempt, and the longest, for nodes holding no workload.
const BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The same for a node holding a workload address: its lease is short.
const HOLDER_BACKOFF: Duration = Duration::from_millis(100);
const HOLDER_MAX_BACKOFF: Duration = Duration::from_millis(250);
/// After a session that worked ends, the next attempt starts after a random pause below this
/// (a holder: below [`HOLDER_FIRST_RETRY`]): a coordinator that restarted is usually back
/// already, and the pause spreads a whole fleet's reconnections over a second.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const HOLDER_FIRST_RETRY: Duration = Duration::from_millis(20);
/// How often local endpoints are checked for changes.
const ENDPOINT_CHECK: Duration = Duration::from_secs(5);

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
    /// The coordinator refused this node (bad or used-up token, unknown node).
    #[error("the coordinator refused this node: {0}")]
    Refused(String),
    /// The node was revoked.
    #[error("this node was revoked: {0}")]
    Revoked(String),
    /// The coordinator broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The state directory failed.
    #[error(transparent)]
    State(#[from] StateError),
}

/// An open control session.
pub struct Session {
    addr: String,
    _endpoint: quinn::Endpoint,
    _conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: Decoder,
}

impl Session {
    async fn connect(addr: &str, pin: &str, patience: Duration) -> Result<Session, ControlError> {
        let fail = |reason: String| ControlError::Connect {
            addr: addr.to_string(),
            reason,
        };
        let target = tokio::net::lookup_host(addr)
            .await
            .map_err(|e| fail(e.to_string()))?
            .next()
            .ok_or_else(|| fail("no address".into()))?;
        let bind: SocketAddr = if target.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| fail(e.to_string()))?;
        endpoint.set_default_client_config(tls::client_config(pin).map_err(fail)?);
        let connecting = endpoint
            .connect(target, tls::SERVER_NAME)
            .map_err(|e| fail(e.to_string()))?;
        let conn = tokio::time::timeout(patience, connecting)
            .await
            .map_err(|_| fail("timed out".into()))?
            .map_err(|e| fail(e.to_string()))?;
        let (send, recv) = conn.open_bi().await.map_err(|e| fail(e.to_string()))?;
        Ok(Session {
            addr: addr.to_string(),
            _endpoint: endpoint,
            _conn: conn,
            send,
            recv,
            decoder: Decoder::new(MAX_SERVER_MESSAGE),
        })
    }

    async fn send(&mut self, msg: &ClientMessage) -> Result<(), ControlError> {
        self.send
            .write_all(&control::encode(msg))
            .await
            .map_err(|e| ControlError::Connect {
                addr: self.addr.clone(),
                reason: e.to_string(),
            })
    }

    async fn recv(&mut self) -> Result<ServerMessage, ControlError> {
        let mut buf = [0u8; 16 * 1024];
        loop {
            if let Some(m) = self
                .decoder
                .decode::<ServerMessage>()
                .map_err(|e| ControlError::Protocol(e.to_string()))?
            {
                return Ok(m);
            }
            match self.recv.read(&mut buf).await {
                Ok(Some(n)) => self
                    .decoder
                    .push(&buf[..n])
                    .map_err(|e| ControlError::Protocol(e.to_string()))?,
                Ok(None) => {
                    return Err(ControlError::Connect {
                        addr: self.addr.clone(),
                        reason: "the coordinator closed the session".into(),
                    })
                }
                Err(e) => {
                    return Err(ControlError::Connect {
                        addr: self.addr.clone(),
                        reason: e.to_string(),
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
                ServerMessage::Refused { reason } => return Err(ControlError::Refused(reason)),
                ServerMessage::Revoked { reason } => return Err(ControlError::Revoked(reason)),
                other => {
                    return Err(ControlError::Protocol(format!(
                        "expected a welcome, got {}",
                        kind(&other)
                    )))
                }
            };
            match self.recv().await? {
                ServerMessage::FullMap(m) => Ok((welcome, m)),
                other => Err(ControlError::Protocol(format!(
                    "expected a full map, got {}",
                    kind(&other)
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

fn kind(m: &ServerMessage) -> &'static str {
    match m {
        ServerMessage::Welcome(_) => "welcome",
        ServerMessage::FullMap(_) => "full map",
        ServerMessage::Delta(_) => "delta",
        ServerMessage::Refused { .. } => "refusal",
        ServerMessage::Revoked { .. } => "revocation",
        ServerMessage::Lease { .. } => "lease",
        ServerMessage::Prepare { .. } => "prepare",
        ServerMessage::ClaimResult { .. } => "claim result",
    }
}

/// Joins the network a token names, reporting `endpoints` (the node's underlay addresses and
/// WireGuard port, when already known). The private key stays here; only `public_key` is sent.
///
/// # Errors
/// [`ControlError`]: unreachable coordinator, refused token, protocol trouble.
pub async fn join(
    token: &JoinToken,
    public_key: PublicKey,
    name: Option<String>,
    labels: BTreeMap<String, String>,
    endpoints: Vec<SocketAddr>,
) -> Result<(NodeState, Netmap, Session), ControlError> {
    let mut s = Session::connect(&token.coordinator, &token.fingerprint, CONNECT_TIMEOUT).await?;
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        auth: Auth::JoinToken {
            secret: token.secret.clone(),
        },
        public_key,
        name,
        labels,
        endpoints,
    };
    let (w, map) = s.hello(hello).await?;
    let secret = w.node_secret.clone().ok_or_else(|| {
        ControlError::Protocol("the welcome after a join carries no node secret".into())
    })?;
    let node = NodeState {
        coordinator: token.coordinator.clone(),
        fingerprint: token.fingerprint.clone(),
        node_id: w.node_id,
        node_secret: secret,
        name: w.name,
        network: w.network,
        network_cidr: w.network_cidr,
        addresses: w.addresses,
        listen_port: None,
    };
    Ok((node, map, s))
}

/// Opens a session with the node's own credentials; the QUIC handshake may take `patience`.
///
/// # Errors
/// [`ControlError`].
pub async fn authenticate(
    node: &NodeState,
    public_key: PublicKey,
    endpoints: Vec<SocketAddr>,
    patience: Duration,
) -> Result<(Welcome, Netmap, Session), ControlError> {
    let mut s = Session::connect(&node.coordinator, &node.fingerprint, patience).await?;
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        auth: Auth::Node {
            node_id: node.node_id,
            secret: node.node_secret.clone(),
        },
        public_key,
        name: None,
        labels: BTreeMap::new(),
        endpoints,
    };
    let (w, m) = s.hello(hello).await?;
    Ok((w, m, s))
}

/// This host's underlay endpoints: every up, non-loopback address with `port`, except those of
/// the tunnel interface and inside the overlay.
pub fn local_endpoints(port: u16, tunnel: &str, overlay: &IpNet) -> Vec<SocketAddr> {
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
                || overlay.contains(&ip);
            (!unusable).then_some(SocketAddr::new(ip, port))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// A uniformly random fraction of `[0, 1)`, in thousandths.
fn fraction() -> f64 {
    f64::from(rand_core::RngCore::next_u32(&mut rand_core::OsRng) % 1000) / 1000.0
}

fn jitter(d: Duration) -> Duration {
    // Between 50% and 150% of `d`, so that agents restarted together do not reconnect in step.
    d.mul_f64(0.5 + fraction())
}

/// How often the control loop checks whether a heartbeat is due (overdue ones go out every
/// `OVERDUE_HEARTBEAT`, 50 ms).
const HEARTBEAT_CHECK: Duration = Duration::from_millis(25);

/// The long-lived control loop of a joined node.
pub struct MeshControl {
    state: StateDir,
    node: NodeState,
    public_key: PublicKey,
    maps: watch::Sender<Netmap>,
    first: Option<Session>,
    shared: Arc<Shared>,
    claims: mpsc::Receiver<ClaimRequest>,
    /// Claim request numbers, unique for the life of the process (a late answer from an
    /// earlier session can never match a later claim).
    next_claim: u64,
}

impl MeshControl {
    /// A loop for `node`, publishing maps on `maps`; `first` is a session already open (after a
    /// join), if any. `shared` is the workload state it keeps current; `claims` come from the
    /// userspace API.
    pub fn new(
        state: StateDir,
        node: NodeState,
        public_key: PublicKey,
        maps: watch::Sender<Netmap>,
        first: Option<Session>,
        shared: Arc<Shared>,
        claims: mpsc::Receiver<ClaimRequest>,
    ) -> Self {
        shared.lock().on_map(&maps.borrow(), Instant::now());
        MeshControl {
            state,
            node,
            public_key,
            maps,
            first,
            shared,
            claims,
            next_claim: 1,
        }
    }

    fn publish(&self, map: Netmap) {
        if let Err(e) = self.state.save_netmap(&map) {
            warn!("caching the network map: {e}");
        }
        // Fencing first, so that the reconciler never sees a map the holdings do not know.
        self.shared.lock().on_map(&map, Instant::now());
        self.maps.send_replace(map);
        self.shared.changed.notify_one();
    }

    /// Runs until the node is revoked or refused. `wg_port` is the data plane's UDP port and
    /// `tunnel` its interface (left out of reported endpoints).
    ///
    /// # Errors
    /// [`ControlError::Revoked`] or [`ControlError::Refused`]; other failures are retried.
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
        let mut backoff = BACKOFF;
        let mut failures = 0u32;
        loop {
            let holder = self.shared.lock().is_holder();
            let session = match self.first.take() {
                Some(s) => Ok(s),
                None => {
                    let eps = local_endpoints(wg_port, &tunnel, &self.node.network_cidr);
                    let patience = if holder {
                        HOLDER_HANDSHAKE_TIMEOUT
                    } else {
                        CONNECT_TIMEOUT
                    };
                    debug!("connecting");
                    authenticate(&self.node, self.public_key, eps, patience)
                        .await
                        .map(|(_, map, s)| {
                            debug!("authenticated");
                            self.publish(map);
                            s
                        })
                }
            };
            let pause = match session {
                Ok(s) => {
                    if failures > 0 {
                        info!(coordinator = %self.node.coordinator, "control session re-established");
                    }
                    failures = 0;
                    match self.serve(s, wg_port, &tunnel, &tunnels).await {
                        Err(e @ (ControlError::Revoked(_) | ControlError::Refused(_))) => {
                            self.shared.lock().drop_lease();
                            self.shared.changed.notify_one();
                            if matches!(e, ControlError::Revoked(_)) {
                                self.state.forget_node();
                                self.maps.send_replace(Netmap::default());
                            }
                            return Err(e);
                        }
                        Err(e) => {
                            warn!("control session lost: {e}; tunnels keep running on the last map")
                        }
                        Ok(()) => {}
                    }
                    let holder = self.shared.lock().is_holder();
                    backoff = if holder { HOLDER_BACKOFF } else { BACKOFF };
                    (if holder {
                        HOLDER_FIRST_RETRY
                    } else {
                        FIRST_RETRY
                    })
                    .mul_f64(fraction())
                }
                Err(e @ (ControlError::Revoked(_) | ControlError::Refused(_))) => return Err(e),
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures.is_power_of_two() {
                        warn!(
                            attempt = failures,
                            "cannot reach the coordinator: {e}; retrying"
                        );
                    }
                    // A holder of workload addresses comes back quickly: its lease is short.
                    let (first, cap) = if holder {
                        (HOLDER_BACKOFF, HOLDER_MAX_BACKOFF)
                    } else {
                        (BACKOFF, MAX_BACKOFF)
                    };
                    let pause = jitter(backoff.clamp(first, cap));
                    backoff = (backoff * 2).clamp(first, cap);
                    pause
                }
            };
            tokio::time::sleep(pause).await;
        }
    }

    async fn serve(
        &mut self,
        mut s: Session,
        wg_port: u16,
        tunnel: &str,
        tunnels: &Arc<dyn Tunnels>,
    ) -> Result<(), ControlError> {
        let mut map = self.maps.borrow().clone();
        // A holder renews its lease at once on a new session: the previous one may have died
        // with a coordinator, and the lease has been running down since.
        let renew = {
            let mut h = self.shared.lock();
            h.is_holder().then(|| h.heartbeat_now(Instant::now()))
        };
        if let Some(seq) = renew {
            debug!(seq, "renewing the lease on the new session");
            s.send(&ClientMessage::Heartbeat { seq }).await?;
        }
        let mut endpoints = local_endpoints(wg_port, tunnel, &self.node.network_cidr);
        s.send(&ClientMessage::Endpoints {
            endpoints: endpoints.clone(),
        })
        .await?;
        let mut tick = tokio::time::interval(ENDPOINT_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut beat = tokio::time::interval(HEARTBEAT_CHECK);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // After a gap, deltas are skipped until the one full map asked for arrives.
        let mut awaiting_full_map = false;
        // Claims sent and not yet answered; dropping them (session lost) tells the caller.
        let mut claims: HashMap<u64, std::sync::mpsc::Sender<Result<u64, String>>> = HashMap::new();
        let (prepared_tx, mut prepared_rx) = mpsc::channel::<(String, u64)>(16);
        loop {
            tokio::select! {
                m = s.recv() => match m? {
                    ServerMessage::FullMap(m) => {
                        awaiting_full_map = false;
                        map = m;
                        self.publish(map.clone());
                    }
                    ServerMessage::Delta(_) if awaiting_full_map => {}
                    ServerMessage::Delta(d) => match map.apply(&d) {
                        Ok(()) => self.publish(map.clone()),
                        Err(gap) => {
                            info!("{gap}; asking for a full map");
                            awaiting_full_map = true;
                            s.send(&ClientMessage::FullMapRequest).await?;
                        }
                    },
                    ServerMessage::Lease { seq, lease_ms, version } => {
                        debug!(seq, lease_ms, version, "lease");
                        self.shared.lock().on_lease(seq, Duration::from_millis(lease_ms), version);
                        self.shared.changed.notify_one();
                    }
                    ServerMessage::Prepare { workload, generation } => {
                        debug!(%workload, generation, "preparing to take a workload");
                        // The address ready, a lease before the move lands, and tunnels up to
                        // every peer.
                        let seq = {
                            let mut h = self.shared.lock();
                            h.on_prepare(&workload, generation, Instant::now());
                            h.heartbeat_now(Instant::now())
                        };
                        self.shared.changed.notify_one();
                        s.send(&ClientMessage::Heartbeat { seq }).await?;
                        let tunnels = tunnels.clone();
                        let tx = prepared_tx.clone();
                        tokio::spawn(async move {
                            workloads::prepare(tunnels.as_ref()).await;
                            let _ = tx.send((workload, generation)).await;
                        });
                    }
                    ServerMessage::ClaimResult { request, generation, error } => {
                        if let Some(reply) = claims.remove(&request) {
                            let _ = reply.send(match (generation, error) {
                                (Some(g), None) => Ok(g),
                                (_, Some(e)) => Err(e),
                                (None, None) => Err("the coordinator gave no result".into()),
                            });
                        }
                    }
                    ServerMessage::Revoked { reason } => return Err(ControlError::Revoked(reason)),
                    ServerMessage::Refused { reason } => return Err(ControlError::Refused(reason)),
                    ServerMessage::Welcome(_) => return Err(ControlError::Protocol("a second welcome".into())),
                },
                Some((workload, generation)) = prepared_rx.recv() => {
                    s.send(&ClientMessage::Prepared { workload, generation }).await?;
                }
                Some(claim) = self.claims.recv() => {
                    if Instant::now() >= claim.deadline {
                        // Queued while the session was down; its caller has given up.
                        continue;
                    }
                    let request = self.next_claim;
                    self.next_claim += 1;
                    claims.insert(request, claim.reply);
                    s.send(&ClientMessage::Claim { request, workload: claim.workload }).await?;
                }
                _ = beat.tick() => {
                    let due = self.shared.lock().poll_heartbeat(Instant::now());
                    if let Some(seq) = due {
                        s.send(&ClientMessage::Heartbeat { seq }).await?;
                    }
                }
                _ = tick.tick() => {
                    let now = local_endpoints(wg_port, tunnel, &self.node.network_cidr);
                    if now != endpoints {
                        endpoints = now;
                        info!(?endpoints, "local endpoints changed");
                        s.send(&ClientMessage::Endpoints { endpoints: endpoints.clone() }).await?;
                    }
                }
            }
        }
    }
}
