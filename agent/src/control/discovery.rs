//! The I/O shell of path discovery: feeds [`Paths`] the map's candidates, the discovery
//! datagrams the receive loop sets aside, the control link (where to ask for the reflexive
//! address, whether a relay is there), the relay each peer's datagrams go through and time;
//! sends what it asks from the WireGuard socket (to a peer through the relay: to the peer's
//! shim, which frames it for the relay as any datagram of that socket); wakes the reconciler
//! when a path changes and tells the control loop the reflexive address and the path report.
//! The reconciler asks [`Discovery::endpoint`] for each peer's endpoint.
//!
//! A discovery datagram from a peer's shim came through the relay from that peer
//! ([`RelayClient::shim_owner`]): it goes to [`Paths::handle_relayed`], never as one from an
//! address.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use meshlink_proto::control::{PathKind, PathReport, MAX_PATH_REPORTS};
use meshlink_proto::{Netmap, NodeId, PublicKey};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info};

use super::paths::{Destination, Path, Paths};
use super::relay::RelayClient;
use super::sleep_until;
use super::workloads::Shared;
use crate::dataplane::batch::NetBatch;
use crate::platform::udp::UdpTransport;

/// How often the path report is refreshed without a change (round trips move).
const REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// A discovery datagram and where it came from.
type Received = (SocketAddr, Vec<u8>);

/// Discovery datagrams waiting for the discovery task; more are dropped (they are retried).
const INBOX: usize = 1024;

/// Path discovery and the relay, as the rest of the agent sees them.
pub struct Discovery {
    paths: Mutex<Paths>,
    relay: Arc<RelayClient>,
    inbox: mpsc::Sender<Received>,
    inbox_rx: Mutex<Option<mpsc::Receiver<Received>>>,
    dropped: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery").finish_non_exhaustive()
    }
}

impl Discovery {
    /// Discovery for the node with these keys, its WireGuard socket on `wg_port`, the control
    /// link in `shared`.
    #[must_use]
    pub fn new(own: PublicKey, private: [u8; 32], wg_port: u16, shared: &Shared) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(INBOX);
        let seed = rand_core::RngCore::next_u64(&mut rand_core::OsRng);
        Arc::new(Self {
            paths: Mutex::new(Paths::new(own, private, seed)),
            relay: Arc::new(RelayClient::new(wg_port, shared.link.subscribe())),
            inbox: tx,
            inbox_rx: Mutex::new(Some(rx)),
            dropped: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The node switched to another key pair (a key rotation).
    pub fn set_own_key(&self, own: PublicKey, private: [u8; 32]) {
        self.paths().set_own_key(own, private);
    }

    fn paths(&self) -> MutexGuard<'_, Paths> {
        self.paths.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A discovery datagram from the WireGuard socket (the receive loop never waits for it).
    pub fn deliver(&self, from: SocketAddr, datagram: &[u8]) {
        if self.inbox.try_send((from, datagram.to_vec())).is_err() {
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The endpoint `peer` should have: `Some` when discovery decided (a direct address or
    /// the peer's relay shim), `None` to keep the caller's own choice.
    pub fn endpoint(&self, peer: &PublicKey) -> Option<SocketAddr> {
        let path = self.paths().path(peer);
        match path {
            Path::Direct(a) => Some(a),
            Path::Relay => match self.relay.endpoint(*peer) {
                Ok(a) => Some(a),
                Err(e) => {
                    debug!("relay shim: {e}");
                    None
                }
            },
            Path::Unknown => None,
        }
    }

    /// The path to `peer` as `meshlink-agent status` shows it, given the endpoint the data
    /// plane uses now.
    pub fn path_kind(&self, peer: &PublicKey, endpoint: Option<SocketAddr>) -> PathKind {
        let relayed = endpoint.is_some_and(|e| self.relay.is_shim(e));
        // "direct" only once a probe through some address answered; an endpoint nobody
        // confirmed yet (the map's first guess) is "unconfirmed".
        let confirmed = self
            .paths()
            .status(peer, Instant::now())
            .is_some_and(|s| matches!(s.path, Path::Direct(_)));
        match (relayed, endpoint) {
            (true, _) => PathKind::Relay,
            (false, Some(_)) if confirmed => PathKind::Direct,
            (false, Some(_)) => PathKind::Unconfirmed,
            (false, None) => PathKind::None,
        }
    }

    /// The path to `peer` as `status` shows it: its kind, where it goes, its RTT.
    pub fn status_json(
        &self,
        peer: &PublicKey,
        endpoint: Option<SocketAddr>,
        now: Instant,
    ) -> serde_json::Value {
        let st = self.paths().status(peer, now);
        let kind = self.path_kind(peer, endpoint);
        let relayed = kind == PathKind::Relay;
        // The round trip measured of the kind of path the data plane uses: none while the
        // two differ (a path just chosen and not yet applied).
        let rtt = st
            .filter(|s| match s.path {
                Path::Direct(_) => !relayed,
                Path::Relay => relayed,
                Path::Unknown => false,
            })
            .and_then(|s| s.rtt);
        let kind = crate::metrics::path_label(kind);
        let route = self.relay.route_for(peer).filter(|_| relayed);
        let via = match &route {
            Some(r) => Some(r.remote.to_string()),
            None => endpoint.map(|e| e.to_string()),
        };
        let over = route.as_ref().map(|r| r.transport);
        // The standalone relay's name; absent through the coordinator's relay.
        let relay_name = route.and_then(|r| r.name);
        serde_json::json!({
            "kind": kind,
            "via": via,
            "relay": relay_name,
            "over": over,
            "rtt_ms": rtt.map(|d| d.as_secs_f64() * 1000.0),
            "changed_secs_ago": st.map(|s| now.saturating_duration_since(s.changed).as_secs()),
        })
    }

    /// Counters for status.
    pub fn counters_json(&self) -> serde_json::Value {
        use std::sync::atomic::Ordering::Relaxed;
        let c = self.relay.counters();
        let p = self.paths();
        serde_json::json!({
            "reflexive": p.reflexive().map(|a| a.to_string()),
            "disco": p.drops(),
            "disco_inbox_full": self.dropped.load(Relaxed),
            "relay": {
                "tx": c.tx.load(Relaxed),
                "rx": c.rx.load(Relaxed),
                "no_relay": c.no_relay.load(Relaxed),
                "too_large": c.too_large.load(Relaxed),
                "send_failed": c.send_failed.load(Relaxed),
                "refused": c.refused.load(Relaxed),
                "grants": c.grants.load(Relaxed),
            },
            "relays": self.relay.relays().status(),
        })
    }

    /// The paths to the peers `ids` names, as reported to the coordinator.
    fn report(&self, ids: &[(PublicKey, NodeId)], now: Instant) -> Vec<PathReport> {
        let p = self.paths();
        ids.iter()
            .filter_map(|(key, id)| {
                let st = p.status(key, now)?;
                let relay = self.relay.route_for(key);
                let (kind, via, over, name) = match (st.path, relay) {
                    (Path::Direct(a), _) => (PathKind::Direct, Some(a), None, None),
                    (Path::Relay, Some(r)) => {
                        (PathKind::Relay, Some(r.remote), Some(r.transport), r.name)
                    }
                    (Path::Relay, None) => (PathKind::Relay, None, None, None),
                    (Path::Unknown, _) => (PathKind::Unconfirmed, None, None, None),
                };
                Some(PathReport {
                    peer: *id,
                    kind,
                    via,
                    over,
                    relay: name,
                    rtt_us: st
                        .rtt
                        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
                    changed_secs_ago: Some(now.saturating_duration_since(st.changed).as_secs()),
                })
            })
            .take(MAX_PATH_REPORTS)
            .collect()
    }

    /// The relays changed (the control link, a standalone relay, or the relay a peer's frames
    /// go through): whether any is up, and each peer's route, for the paths of `ids`.
    fn relays_changed(&self, ids: &[(PublicKey, NodeId)], now: Instant) {
        let available = self.relay.available();
        self.paths().set_relay(available, now);
        self.set_routes(ids.iter().map(|(k, _)| *k), now);
    }

    /// Tells the paths the relay each of `keys` goes through now.
    fn set_routes(&self, keys: impl Iterator<Item = PublicKey>, now: Instant) {
        let routes: Vec<_> = keys.map(|k| (k, self.relay.route_for(&k))).collect();
        let mut p = self.paths();
        for (key, route) in routes {
            p.set_route(&key, route, now);
        }
    }

    /// Runs discovery, and the relay client's side that receives, until the map channel
    /// closes.
    pub async fn run(
        self: Arc<Self>,
        udp: Arc<UdpTransport>,
        maps: watch::Receiver<Netmap>,
        shared: Arc<Shared>,
    ) {
        let Some(stream_frames) = shared
            .relay_frames
            .rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        let known: Arc<Mutex<Vec<PublicKey>>> = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(self.relay.clone().run_inbound(stream_frames, {
            let known = known.clone();
            move |k| known.lock().unwrap_or_else(|e| e.into_inner()).contains(k)
        }));
        self.discover(udp, maps, shared, known).await;
    }

    /// The discovery loop (see [`Discovery::run`]); the peers of the map go to `known`, the
    /// keys the relay client takes frames from.
    async fn discover(
        self: Arc<Self>,
        udp: Arc<UdpTransport>,
        mut maps: watch::Receiver<Netmap>,
        shared: Arc<Shared>,
        known: Arc<Mutex<Vec<PublicKey>>>,
    ) {
        let Some(mut inbox) = self
            .inbox_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        let mut link = shared.link.subscribe();
        let mut routes = self.relay.route_changes();
        maps.mark_changed();
        link.mark_changed();
        let mut net = NetBatch::with_capacity(64 * 1024);
        let mut ids: Vec<(PublicKey, NodeId)> = Vec::new();
        let mut reported = Instant::now();
        loop {
            let wake = self.paths().poll_timeout();
            tokio::select! {
                r = maps.changed() => {
                    if r.is_err() {
                        return;
                    }
                    let map = maps.borrow_and_update().clone();
                    let peers: Vec<(PublicKey, Vec<SocketAddr>)> = map
                        .peers
                        .values()
                        .map(|p| (p.public_key, p.endpoints.clone()))
                        .collect();
                    ids = map.peers.values().map(|p| (p.public_key, p.node_id)).collect();
                    let keys: Vec<PublicKey> = peers.iter().map(|p| p.0).collect();
                    self.relay.retain(&keys);
                    *known.lock().unwrap_or_else(|e| e.into_inner()) = keys;
                    let now = Instant::now();
                    self.paths().set_peers(peers, now);
                    self.set_routes(ids.iter().map(|(k, _)| *k), now);
                }
                r = link.changed() => {
                    if r.is_err() {
                        return;
                    }
                    let l = link.borrow_and_update().clone();
                    let now = Instant::now();
                    self.paths()
                        .set_reflect_target(l.as_ref().and_then(|l| l.reflect), now);
                    // The coordinator's relay is the control link's.
                    self.relays_changed(&ids, now);
                }
                r = routes.changed() => {
                    if r.is_err() {
                        return;
                    }
                    // A standalone relay came or went, or a relayed peer's frames moved to
                    // another relay (a relay's notice, or its wearing off) with the home
                    // unchanged: the shims stay the relayed peers' endpoints, but the relay is
                    // part of a relayed path (its change is a change of the path).
                    self.relays_changed(&ids, Instant::now());
                }
                Some((from, d)) = inbox.recv() => {
                    tracing::trace!(%from, len = d.len(), "discovery datagram");
                    let now = Instant::now();
                    match self.relay.shim_owner(from) {
                        Some(peer) => self.paths().handle_relayed(peer, &d, now),
                        None => self.paths().handle_datagram(from, &d, now),
                    }
                }
                () = sleep_until(wake) => {
                    self.paths().handle_timeout(Instant::now());
                }
            }
            let (changed, measured, reflexive) = {
                let mut p = self.paths();
                while let Some((to, d)) = p.poll_transmit() {
                    let to = match to {
                        Destination::Addr(a) => a,
                        // The peer is relayed, so its shim is there already.
                        Destination::Relay(peer) => match self.relay.endpoint(peer) {
                            Ok(shim) => shim,
                            Err(e) => {
                                debug!("relay shim: {e}");
                                continue;
                            }
                        },
                    };
                    net.push(to, &d);
                }
                (p.take_changed(), p.take_measured(), p.reflexive())
            };
            if !net.is_empty() {
                tracing::trace!(datagrams = net.items().len(), "discovery sends");
                udp.send_batch(&net).await;
                net.clear();
            }
            // What operators see (`meshctl node show`): on a change (a relayed path's relay
            // included), when a new path's round trip becomes known, and every so often for
            // fresh round trips; the control loop paces what it sends to the coordinator.
            let now = Instant::now();
            if changed || measured || now.saturating_duration_since(reported) >= REPORT_EVERY {
                reported = now;
                let report = self.report(&ids, now);
                shared.path_report.send_if_modified(|r| {
                    let new = *r != report;
                    *r = report;
                    new
                });
            }
            if changed {
                shared.changed.notify_one();
                let learnt = shared.reflexive.send_if_modified(|r| {
                    let new = *r != reflexive;
                    *r = reflexive;
                    new
                });
                if learnt {
                    info!(reflexive = ?reflexive, "reflexive address");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::coordinators::Coordinators;
    use crate::control::paths::DIRECT_GRACE;
    use crate::control::relay::{HomeLink, UNREACHABLE_FOR};
    use crate::control::transport::LinkConn;
    use meshlink_proto::control::RelayTransport;
    use meshlink_proto::PeerInfo;
    use std::time::Duration;

    /// How soon the report must name the relay a peer's frames moved to: well below
    /// [`REPORT_EVERY`], so that only a change told at once gets there in time.
    const PROMPTLY: Duration = Duration::from_secs(1);

    /// What keeps a test's QUIC connection open: both endpoints and the server's end.
    struct Keep {
        _server: quinn::Endpoint,
        _client: quinn::Endpoint,
        other_end: quinn::Connection,
    }

    impl Drop for Keep {
        fn drop(&mut self) {
            self.other_end.close(0u32.into(), b"");
        }
    }

    /// A QUIC server and client endpoint on loopback, the client trusting the server.
    fn endpoints() -> (quinn::Endpoint, quinn::Endpoint) {
        const CERT: &[u8] = include_bytes!("../../tests/fixtures/coordinator.cert.der");
        const KEY: &[u8] = include_bytes!("../../tests/fixtures/coordinator.key.der");
        let tls = meshlink_tls::server_config(
            CERT.to_vec().into(),
            rustls::pki_types::PrivateKeyDer::Pkcs8(KEY.to_vec().into()),
            meshlink_tls::ALPN,
        )
        .unwrap();
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
        let server = quinn::Endpoint::server(
            quinn::ServerConfig::with_crypto(Arc::new(crypto)),
            (std::net::Ipv4Addr::LOCALHOST, 0).into(),
        )
        .unwrap();
        let mut client =
            quinn::Endpoint::client((std::net::Ipv4Addr::LOCALHOST, 0).into()).unwrap();
        client.set_default_client_config(
            meshlink_tls::client_config(&meshlink_tls::fingerprint(CERT)).unwrap(),
        );
        (server, client)
    }

    /// A connection from `client` to `server`, and the server's end of it.
    async fn connect(
        server: &quinn::Endpoint,
        client: &quinn::Endpoint,
    ) -> (quinn::Connection, quinn::Connection) {
        let accepting = server.clone();
        let accepted = tokio::spawn(async move { accepting.accept().await?.await.ok() });
        let conn = client
            .connect(server.local_addr().unwrap(), meshlink_tls::SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        (conn, accepted.await.unwrap().unwrap())
    }

    /// A QUIC connection on loopback (relay links carry one), with what keeps it open.
    async fn a_connection() -> (quinn::Connection, Keep) {
        let (server, client) = endpoints();
        let (conn, other_end) = connect(&server, &client).await;
        (
            conn,
            Keep {
                _server: server,
                _client: client,
                other_end,
            },
        )
    }

    /// A coordinator's relay on loopback between two nodes whose keys are `keys`: what one
    /// sends on its connection the other gets on its own `delay` later, from the sender.
    struct FakeRelay {
        _server: quinn::Endpoint,
        _client: quinn::Endpoint,
        ends: Vec<quinn::Connection>,
        tasks: Vec<tokio::task::JoinHandle<()>>,
    }

    impl FakeRelay {
        async fn start(keys: [PublicKey; 2], delay: Duration) -> (Self, [quinn::Connection; 2]) {
            let (server, client) = endpoints();
            let (a, a_end) = connect(&server, &client).await;
            let (b, b_end) = connect(&server, &client).await;
            let ends = vec![a_end, b_end];
            let tasks = (0..2)
                .map(|i| {
                    let (from, to, sender) = (ends[i].clone(), ends[1 - i].clone(), keys[i]);
                    tokio::spawn(async move {
                        while let Ok(d) = from.read_datagram().await {
                            let mut frame = d.to_vec();
                            if meshlink_proto::relay::readdress(&mut frame, &sender).is_err() {
                                continue;
                            }
                            let to = to.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(delay).await;
                                let _ = to.send_datagram(frame.into());
                            });
                        }
                    })
                })
                .collect();
            let relay = FakeRelay {
                _server: server,
                _client: client,
                ends,
                tasks,
            };
            (relay, [a, b])
        }
    }

    impl Drop for FakeRelay {
        fn drop(&mut self) {
            for t in &self.tasks {
                t.abort();
            }
            for c in &self.ends {
                c.close(0u32.into(), b"");
            }
        }
    }

    /// A node's key pair from a seed.
    fn keys(seed: u8) -> ([u8; 32], PublicKey) {
        let secret = x25519_dalek::StaticSecret::from([seed; 32]);
        let public = x25519_dalek::PublicKey::from(&secret);
        ([seed; 32], PublicKey(*public.as_bytes()))
    }

    /// A map with one peer, `id` with `key`, that lists no endpoint (reached through a relay).
    fn map_of(id: NodeId, key: PublicKey) -> Netmap {
        Netmap {
            version: 1,
            peers: [(
                id,
                PeerInfo {
                    node_id: id,
                    name: format!("vm-{id}"),
                    public_key: key,
                    next_key: None,
                    addresses: vec![],
                    allowed_ips: vec![],
                    endpoints: vec![],
                    labels: Default::default(),
                    tags: vec![],
                    via: None,
                },
            )]
            .into(),
            ..Netmap::default()
        }
    }

    /// What the agent's receive loop does for discovery: the discovery datagrams that
    /// arrive on the WireGuard socket go to it.
    async fn receive(udp: Arc<UdpTransport>, discovery: Arc<Discovery>) {
        let mut buf = vec![0u8; 64 * 1024];
        let mut meta = [quinn_udp::RecvMeta::default()];
        loop {
            let n = {
                let mut slices = [std::io::IoSliceMut::new(&mut buf)];
                udp.recv(&mut slices, &mut meta).await
            };
            let Ok(n) = n else {
                return;
            };
            for m in &meta[..n] {
                for d in buf[..m.len].chunks(m.stride.max(1)) {
                    if meshlink_proto::disco::is_disco(d) {
                        discovery.deliver(m.addr, d);
                    }
                }
            }
        }
    }

    /// One node's discovery with its WireGuard socket, its map's one peer, and the
    /// coordinator's relay on `conn`; runs until the tasks are aborted.
    struct Node {
        discovery: Arc<Discovery>,
        shared: Arc<Shared>,
        _maps: watch::Sender<Netmap>,
        tasks: Vec<tokio::task::JoinHandle<()>>,
    }

    impl Node {
        fn start(
            (id, secret, key): (NodeId, [u8; 32], PublicKey),
            peer: (NodeId, PublicKey),
            conn: &quinn::Connection,
        ) -> Self {
            let coordinators = Coordinators::new(["127.0.0.1:1".to_string()]).unwrap();
            let shared = Arc::new(Shared::new(
                id,
                Netmap::default(),
                Instant::now(),
                coordinators,
            ));
            let udp = Arc::new(UdpTransport::bind(0, None).unwrap());
            let discovery = Discovery::new(key, secret, udp.port(), &shared);
            shared
                .link
                .send_replace(Some(crate::control::workloads::Link {
                    conn: LinkConn::Quic(conn.clone()),
                    remote: conn.remote_address(),
                    transport: RelayTransport::Udp,
                    reflect: None,
                    relay: true,
                }));
            let (maps_tx, maps) = watch::channel(map_of(peer.0, peer.1));
            let tasks = vec![
                tokio::spawn(receive(udp.clone(), discovery.clone())),
                tokio::spawn(discovery.clone().run(udp, maps, shared.clone())),
            ];
            Node {
                discovery,
                shared,
                _maps: maps_tx,
                tasks,
            }
        }
    }

    impl Drop for Node {
        fn drop(&mut self) {
            for t in &self.tasks {
                t.abort();
            }
        }
    }

    fn link(name: &str, conn: &quinn::Connection) -> HomeLink {
        HomeLink {
            name: name.into(),
            conn: LinkConn::Quic(conn.clone()),
            remote: conn.remote_address(),
            transport: RelayTransport::Udp,
        }
    }

    /// Waits (at most `within`) for the report on the one peer to satisfy `want`.
    async fn reported(
        rx: &mut watch::Receiver<Vec<PathReport>>,
        within: Duration,
        what: &str,
        want: impl Fn(&PathReport) -> bool,
    ) {
        let waited = tokio::time::timeout(within, async {
            loop {
                if rx.borrow_and_update().first().is_some_and(&want) {
                    return;
                }
                rx.changed().await.unwrap();
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "not reported within {within:?}: {what}; the report: {:?}",
            *rx.borrow()
        );
    }

    /// Two nodes that reach each other only through the coordinator's relay (their map lists
    /// no endpoint) measure the round trip of their relayed path through it, end to end: the
    /// relay adds 25 ms each way, which a round trip measured anywhere else (loopback) lacks.
    /// Status and the path report both show it, the report within moments of the path
    /// becoming relayed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_relayed_path_reports_its_round_trip_through_the_relay() {
        let delay = Duration::from_millis(25);
        let (a_sec, a_key) = keys(1);
        let (b_sec, b_key) = keys(2);
        let (_relay, [a_conn, b_conn]) = FakeRelay::start([a_key, b_key], delay).await;
        let a = Node::start((1, a_sec, a_key), (2, b_key), &a_conn);
        let b = Node::start((2, b_sec, b_key), (1, a_key), &b_conn);
        let through_the_relay = |r: &PathReport| {
            r.kind == PathKind::Relay
                && r.over == Some(RelayTransport::Udp)
                && r.rtt_us
                    .is_some_and(|us| us >= 2 * delay.as_micros() as u64)
        };
        for (node, what) in [(&a, "a's path to b"), (&b, "b's path to a")] {
            let mut report = node.shared.path_report.subscribe();
            reported(
                &mut report,
                DIRECT_GRACE + 2 * PROMPTLY,
                what,
                through_the_relay,
            )
            .await;
        }
        let endpoint = a.discovery.endpoint(&b_key);
        assert!(endpoint.is_some_and(|e| a.discovery.relay.is_shim(e)));
        let status = a.discovery.status_json(&b_key, endpoint, Instant::now());
        assert_eq!(status["kind"], "relay", "{status}");
        let rtt_ms = status["rtt_ms"].as_f64().unwrap_or_default();
        assert!(rtt_ms >= 50.0, "{status}");
        // Nothing came straight from the peer: no candidate was learnt from the relayed
        // probes (a shim's address would have become a "direct" path).
        assert_eq!(a.discovery.paths().path(&b_key), Path::Relay);
        assert_eq!(a.discovery.paths().drops().refused, 0);
    }

    /// A relayed peer's frames move between relays with the home unchanged (a relay's
    /// notice that it lacks the peer, another relay coming up, the notice wearing off): the
    /// report names the relay in use each time within moments, not at its next periodic
    /// refresh ([`REPORT_EVERY`]).
    #[tokio::test]
    async fn the_report_follows_a_relayed_peer_between_relays_at_once() {
        let (conn, _keep) = a_connection().await;
        let coordinators = Coordinators::new(["127.0.0.1:1".to_string()]).unwrap();
        let shared = Arc::new(Shared::new(
            1,
            Netmap::default(),
            Instant::now(),
            coordinators,
        ));
        let udp = Arc::new(UdpTransport::bind(0, None).unwrap());
        let discovery = Discovery::new(PublicKey([1; 32]), [1; 32], udp.port(), &shared);
        let relays = discovery.relay.relays();
        // r1 is home; the peer lists no endpoint, so its frames go through a relay.
        relays.set_links(vec![link("r1", &conn)]);
        let peer = PublicKey([2; 32]);
        let map = map_of(2, peer);
        let (_maps_tx, maps) = watch::channel(map);
        let mut report = shared.path_report.subscribe();
        let known = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn(discovery.clone().discover(udp, maps, shared.clone(), known));
        let through = |relay: Option<&'static str>| {
            move |r: &PathReport| r.kind == PathKind::Relay && r.relay.as_deref() == relay
        };
        reported(
            &mut report,
            Duration::from_secs(10),
            "relayed by r1",
            through(Some("r1")),
        )
        .await;

        // r1 says it lacks the peer: no other relay (nor the coordinator's) has it. The notice
        // is dated so that it wears off a few seconds from now.
        let wears_off = Instant::now() + 3 * PROMPTLY;
        relays
            .unreachable()
            .mark(peer, "r1", wears_off.checked_sub(UNREACHABLE_FOR).unwrap());
        reported(
            &mut report,
            PROMPTLY,
            "no relay after r1's notice",
            through(None),
        )
        .await;
        // r2 comes up, the home still r1: the peer's frames go through r2.
        relays.set_links(vec![link("r1", &conn), link("r2", &conn)]);
        reported(&mut report, PROMPTLY, "relayed by r2", through(Some("r2"))).await;
        // The notice wears off: back through r1.
        let left = wears_off.saturating_duration_since(Instant::now());
        reported(
            &mut report,
            left + PROMPTLY,
            "relayed by r1 again",
            through(Some("r1")),
        )
        .await;
        assert!(
            Instant::now() >= wears_off,
            "not before the notice wore off"
        );
        // Each move was a change of the path: its age counts from the last one, not from
        // when the peer was first relayed (3 s and more before).
        let last = report.borrow().first().cloned().unwrap();
        assert_eq!(last.changed_secs_ago, Some(0), "{last:?}");
        task.abort();
    }
}
