//! The agent's side of the relays: WireGuard datagrams for relayed peers go to the home
//! standalone relay ([`sessions`]: the nearest of those the coordinator grants), or, with none
//! up, to the coordinator's embedded relay as QUIC datagrams (or records) on the control
//! session's connection ([`meshlink_proto::relay`] frames), and come back the same ways.
//!
//! Frames from [`RELAY_SELF`] are the coordinator's grants (the standalone relays and this
//! node's ticket); they are taken only from the control session, never from a standalone
//! relay, which could otherwise list relays of its own choosing.
//!
//! The data plane is not told about relays. Each relayed peer gets a **shim**: a UDP socket
//! on loopback whose address is that peer's WireGuard endpoint while it is relayed. What the
//! data plane sends there is framed for the peer and sent on the connection; what the relay
//! delivers from the peer is sent from its shim to the WireGuard socket, so it arrives as any
//! datagram from that "endpoint" and goes through WireGuard's authentication as usual. A path
//! change is an endpoint change: WireGuard sessions survive it.
//!
//! Bounded: one shim per peer of the map (the relay delivers nothing from other keys),
//! reassembly bounded by [`Reassembler`] (grants, the coordinator relay's frames and the
//! standalone relays' each in their own, so that no sender's fragments can evict another's
//! grant), QUIC's datagram buffers bounded by quinn.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use meshlink_proto::control::{encode_relay, RelayTransport, MAX_RELAY_RECORD};
use meshlink_proto::relay::{self, Grant, Reassembler, RELAY_SELF};
use meshlink_proto::PublicKey;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tracing::debug;

use super::transport::LinkConn;
use super::workloads::Link;

mod home;
mod sessions;

pub use sessions::{HomeLink, RelayStatus, Relays, Unreachable, UNREACHABLE_FOR};

/// Frames from standalone relays waiting for the relay client; more are dropped.
const RELAYED_QUEUED: usize = 1024;

/// The largest frame sent: fits a QUIC datagram on any path QUIC works on (1,200-byte UDP
/// payloads), so a full WireGuard datagram takes two frames.
pub const MAX_FRAME: usize = 1100;

/// The room a shim gives one datagram from the WireGuard socket: the largest WireGuard
/// datagram of a tunnel at the largest MTU the agent takes (the packet padded to 16 bytes, a
/// 16-byte header and a 16-byte tag) and one byte more, so that a longer datagram shows as
/// one that filled the buffer. The largest, not the tunnel's own: the MTU may be changed
/// while the agent runs (`ip link set mtu`). Every shim's buffer lives as long as its peer is
/// relayed: a mesh reached through a relay has one per peer, and 64 KiB each made 200
/// relayed peers cost 12.5 MiB (9 KiB each: 1.8 MiB).
const SHIM_ROOM: usize = crate::config::MAX_MTU as usize + 15 + 32 + 1;

/// The relay one peer's datagrams go through: what status and the path report show of a
/// relayed path. Another relay, or the same one over another transport, is another route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The relay's address.
    pub remote: SocketAddr,
    /// What the frames run over (`udp`, `tcp`).
    pub transport: RelayTransport,
    /// A standalone relay's name; none for the coordinator's.
    pub name: Option<String>,
}

/// What the relay client counted.
#[derive(Debug, Default)]
pub struct RelayCounters {
    /// Datagrams sent through the relay.
    pub tx: AtomicU64,
    /// Datagrams received through the relay.
    pub rx: AtomicU64,
    /// Datagrams for a relayed peer while no relay session was up.
    pub no_relay: AtomicU64,
    /// Datagrams too large for [`relay::MAX_FRAGMENTS`] frames, or for the largest MTU.
    pub too_large: AtomicU64,
    /// Frames the connection refused (its buffer full, datagrams off).
    pub send_failed: AtomicU64,
    /// Frames from keys that are not peers, or malformed.
    pub refused: AtomicU64,
    /// Grants received from the coordinator (standalone relays and a ticket).
    pub grants: AtomicU64,
}

struct Shim {
    socket: Arc<UdpSocket>,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Shim {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The relay client: shims per relayed peer and the connection's datagrams.
pub struct RelayClient {
    wg: SocketAddr,
    shims: Mutex<HashMap<PublicKey, Shim>>,
    link: watch::Receiver<Option<Link>>,
    counters: Arc<RelayCounters>,
    next_id: Arc<AtomicU64>,
    relays: Arc<Relays>,
    home: watch::Receiver<Option<HomeLink>>,
    grants: watch::Sender<Option<Grant>>,
}

impl std::fmt::Debug for RelayClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayClient").field("wg", &self.wg).finish()
    }
}

impl RelayClient {
    /// A client for the WireGuard socket on `wg_port`, sending on whatever connection `link`
    /// holds.
    #[must_use]
    pub fn new(wg_port: u16, link: watch::Receiver<Option<Link>>) -> Self {
        let relays = Arc::new(Relays::new());
        Self {
            wg: SocketAddr::from((Ipv4Addr::LOCALHOST, wg_port)),
            shims: Mutex::new(HashMap::new()),
            link,
            counters: Arc::new(RelayCounters::default()),
            next_id: Arc::new(AtomicU64::new(0)),
            home: relays.home(),
            relays,
            grants: watch::channel(None).0,
        }
    }

    /// The standalone relays (status).
    #[must_use]
    pub fn relays(&self) -> &Relays {
        &self.relays
    }

    /// What wakes those who show the relay each peer's frames go through
    /// ([`RelayClient::route_for`]) when it may have changed.
    #[must_use]
    pub fn route_changes(&self) -> RouteChanges {
        let unreachable = self.relays.unreachable();
        RouteChanges {
            links: self.relays.links(),
            noticed: unreachable.noticed(),
            unreachable,
        }
    }

    /// The counters.
    #[must_use]
    pub fn counters(&self) -> &RelayCounters {
        &self.counters
    }

    fn shims(&self) -> std::sync::MutexGuard<'_, HashMap<PublicKey, Shim>> {
        self.shims.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The loopback endpoint that relays to `peer` (made on first use).
    ///
    /// # Errors
    /// When no loopback socket can be bound.
    pub fn endpoint(&self, peer: PublicKey) -> std::io::Result<SocketAddr> {
        self.shim(peer).map(|(addr, _)| addr)
    }

    /// `peer`'s shim, made on first use: its address and socket.
    fn shim(&self, peer: PublicKey) -> std::io::Result<(SocketAddr, Arc<UdpSocket>)> {
        let mut shims = self.shims();
        if let Some(s) = shims.get(&peer) {
            return Ok((s.addr, s.socket.clone()));
        }
        let std_sock = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
        std_sock.set_nonblocking(true)?;
        let socket = Arc::new(UdpSocket::from_std(std_sock)?);
        let addr = socket.local_addr()?;
        let task = tokio::spawn(outbound(
            socket.clone(),
            self.wg,
            peer,
            Routes {
                links: self.relays.links(),
                unreachable: self.relays.unreachable(),
                link: self.link.clone(),
            },
            self.counters.clone(),
            self.next_id.clone(),
        ));
        shims.insert(
            peer,
            Shim {
                socket: socket.clone(),
                addr,
                task,
            },
        );
        Ok((addr, socket))
    }

    /// Whether `addr` is the shim of some peer (status shows such an endpoint as the relay).
    #[must_use]
    pub fn is_shim(&self, addr: SocketAddr) -> bool {
        self.shim_owner(addr).is_some()
    }

    /// The peer whose shim `addr` is: a datagram from there came through the relay from that
    /// peer.
    #[must_use]
    pub fn shim_owner(&self, addr: SocketAddr) -> Option<PublicKey> {
        if !addr.ip().is_loopback() {
            return None;
        }
        self.shims()
            .iter()
            .find_map(|(peer, s)| (s.addr == addr).then_some(*peer))
    }

    /// The relay's address (the home standalone relay's, else the control connection's
    /// remote end) and transport (`udp`, `tcp`), while one is up.
    #[must_use]
    pub fn link_remote(&self) -> Option<(SocketAddr, RelayTransport)> {
        if let Some(h) = self.home.borrow().as_ref() {
            return Some((h.remote, h.transport));
        }
        self.link
            .borrow()
            .as_ref()
            .filter(|l| l.relay)
            .map(|l| (l.remote, l.transport))
    }

    /// The relay `peer`'s datagrams go through now (see [`Routes`]).
    #[must_use]
    pub fn route_for(&self, peer: &PublicKey) -> Option<Route> {
        let links = self.relays.links();
        {
            let links = links.borrow();
            let unreachable = self.relays.unreachable();
            if let Some(l) = sessions::pick(&links, &unreachable, peer, Instant::now()) {
                return Some(Route {
                    remote: l.remote,
                    transport: l.transport,
                    name: Some(l.name.clone()),
                });
            }
        }
        self.link
            .borrow()
            .as_ref()
            .filter(|l| l.relay)
            .map(|l| Route {
                remote: l.remote,
                transport: l.transport,
                name: None,
            })
    }

    /// Whether some relay is up (the home standalone relay, or the coordinator's).
    #[must_use]
    pub fn available(&self) -> bool {
        self.link_remote().is_some()
    }

    /// Keeps the shims of `peers` only, and relays' notices of them only.
    pub fn retain(&self, peers: &[PublicKey]) {
        self.shims().retain(|k, _| peers.contains(k));
        self.relays.unreachable().set_peers(peers);
    }

    /// Delivers what the relay sends: QUIC datagrams on the connection `link` holds, and
    /// frames a TCP session's stream carried (`stream_frames`); runs until the link's
    /// sender is gone.
    pub async fn run_inbound(
        self: Arc<Self>,
        mut stream_frames: mpsc::Receiver<Vec<u8>>,
        peers: impl Fn(&PublicKey) -> bool + Send,
    ) {
        let mut link = self.link.clone();
        let mut reassembler = Reassembler::new();
        // Frames from standalone relays are put back together apart, so that none of theirs
        // can complete (or pass for) a grant.
        let mut relayed_reassembler = Reassembler::new();
        // Grants apart from peers' frames too: a peer's first fragments (64 of them fill a
        // reassembler) must not push out a grant that is half there.
        let mut grant_reassembler = Reassembler::new();
        let (relayed_tx, mut relayed) = mpsc::channel(RELAYED_QUEUED);
        let sessions = tokio::spawn(self.relays.clone().run(self.grants.subscribe(), relayed_tx));
        let _sessions = AbortOnDrop(sessions);
        // A QUIC connection that ended reads nothing more until the link changes.
        let mut ended = false;
        loop {
            let quic = link
                .borrow_and_update()
                .as_ref()
                .and_then(|l| match &l.conn {
                    LinkConn::Quic(c) if !ended => Some(c.clone()),
                    _ => None,
                });
            let (frame, from_control): (Vec<u8>, bool) = tokio::select! {
                f = relayed.recv() => match f {
                    Some(f) => (f, false),
                    None => continue,
                },
                d = async {
                    match &quic {
                        Some(c) => c.read_datagram().await.ok(),
                        None => std::future::pending().await,
                    }
                } => match d {
                    Some(d) => (d.to_vec(), true),
                    None => {
                        ended = true;
                        continue;
                    }
                },
                f = stream_frames.recv() => match f {
                    Some(f) => (f, true),
                    None => return,
                },
                r = link.changed() => {
                    if r.is_err() {
                        return;
                    }
                    ended = false;
                    continue;
                }
            };
            let Ok((header, bytes)) = relay::parse(&frame) else {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            if header.peer == RELAY_SELF && from_control {
                if let Some((_, json)) = grant_reassembler.push(header, bytes, Instant::now()) {
                    self.take_grant(&json);
                }
                continue;
            }
            if !peers(&header.peer) {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let pushed = if from_control {
                reassembler.push(header, bytes, Instant::now())
            } else {
                relayed_reassembler.push(header, bytes, Instant::now())
            };
            let Some((from, whole)) = pushed else {
                continue;
            };
            let socket = match self.shim(from) {
                Ok((_, socket)) => Some(socket),
                Err(e) => {
                    debug!("relay shim: {e}");
                    None
                }
            };
            if let Some(socket) = socket {
                self.counters.rx.fetch_add(1, Ordering::Relaxed);
                let _ = socket.send_to(&whole, self.wg).await;
            }
        }
    }
}

impl RelayClient {
    /// A grant from the coordinator: the newest replaces the one before.
    fn take_grant(&self, json: &[u8]) {
        match serde_json::from_slice::<Grant>(json) {
            Ok(mut grant) => {
                grant.relays.truncate(relay::MAX_LISTED_RELAYS);
                self.counters.grants.fetch_add(1, Ordering::Relaxed);
                self.grants.send_replace(Some(grant));
            }
            Err(e) => {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                debug!("a grant that does not parse: {e}");
            }
        }
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Wakes its holder when the relay some peer's frames go through ([`Routes`]) may have changed
/// other than by the control link (which its holder watches itself): the standalone relays
/// came, went or were reordered (the home among them), a relay said it lacks a peer (its
/// frames go through the next relay from then on, possibly not the home's), or such a notice
/// wore off (they go back). The last two happen with the home unchanged.
#[derive(Debug)]
pub struct RouteChanges {
    links: watch::Receiver<Vec<HomeLink>>,
    noticed: watch::Receiver<()>,
    unreachable: Arc<sessions::Unreachable>,
}

impl RouteChanges {
    /// Resolves at the next such change. Cancel safe: a change that comes while this is not
    /// polled is seen at the next call.
    ///
    /// # Errors
    /// When the relay client is gone.
    pub async fn changed(&mut self) -> Result<(), watch::error::RecvError> {
        let wears_off = self.unreachable.next_expiry(Instant::now());
        tokio::select! {
            r = self.links.changed() => r,
            r = self.noticed.changed() => r,
            () = super::sleep_until(wears_off) => Ok(()),
        }
    }
}

/// Where a shim's datagrams go: the home standalone relay, or the next one that has not said
/// it lacks the peer, else the coordinator's.
struct Routes {
    links: watch::Receiver<Vec<HomeLink>>,
    unreachable: Arc<sessions::Unreachable>,
    link: watch::Receiver<Option<Link>>,
}

impl Routes {
    fn conn(&self, peer: &PublicKey) -> Option<LinkConn> {
        {
            let links = self.links.borrow();
            if let Some(l) = sessions::pick(&links, &self.unreachable, peer, Instant::now()) {
                return Some(l.conn.clone());
            }
        }
        self.link
            .borrow()
            .as_ref()
            .filter(|l| l.relay)
            .map(|l| l.conn.clone())
    }
}

/// What the data plane sends to one peer's shim goes to the relay.
async fn outbound(
    socket: Arc<UdpSocket>,
    wg: SocketAddr,
    peer: PublicKey,
    routes: Routes,
    counters: Arc<RelayCounters>,
    next_id: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; SHIM_ROOM];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            return;
        };
        // Only the WireGuard socket speaks to a shim.
        if from.port() != wg.port() || !from.ip().to_canonical().is_loopback() {
            continue;
        }
        if n == buf.len() {
            // Longer than any datagram of a tunnel, and cut short by the buffer.
            counters.too_large.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let conn = routes.conn(&peer);
        let id = next_id.fetch_add(1, Ordering::Relaxed) as u16;
        match conn {
            None => {
                counters.no_relay.fetch_add(1, Ordering::Relaxed);
            }
            Some(LinkConn::Quic(conn)) => {
                let max = conn.max_datagram_size().unwrap_or(0).min(MAX_FRAME);
                match relay::frames(&peer, id, &buf[..n], max) {
                    Ok(frames) => {
                        counters.tx.fetch_add(1, Ordering::Relaxed);
                        for f in frames {
                            if conn.send_datagram(f.into()).is_err() {
                                counters.send_failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    Err(e) => {
                        counters.too_large.fetch_add(1, Ordering::Relaxed);
                        debug!("relay: {e}");
                    }
                }
            }
            Some(LinkConn::Stream(writer)) => {
                // A stream takes a whole datagram as one record.
                let record = relay::frames(&peer, id, &buf[..n], MAX_RELAY_RECORD)
                    .ok()
                    .and_then(|f| f.into_iter().next())
                    .and_then(|f| encode_relay(&f).ok());
                match record {
                    Some(r) => {
                        counters.tx.fetch_add(1, Ordering::Relaxed);
                        if writer.write(&r).await.is_err() {
                            counters.send_failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    None => {
                        counters.too_large.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Waits (a few seconds at most) for `f` to hold.
    async fn until(f: impl Fn() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition not reached in 5 s");
    }

    #[tokio::test]
    async fn a_shim_takes_any_datagram_of_a_tunnel_and_counts_a_longer_one() {
        let wg = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let (_link_tx, link) = watch::channel(None);
        let mtu = crate::config::MAX_MTU;
        let client = RelayClient::new(wg.local_addr().unwrap().port(), link);
        let shim = client.endpoint(PublicKey([7; 32])).unwrap();
        let c = client.counters();

        // The largest datagram a tunnel at the largest MTU sends: taken whole (no relay is up, so
        // it is counted as such).
        let largest = usize::from(mtu) + 15 + 32;
        wg.send_to(&vec![1u8; largest], shim).await.unwrap();
        until(|| c.no_relay.load(Ordering::Relaxed) == 1).await;
        assert_eq!(c.too_large.load(Ordering::Relaxed), 0);

        // Anything longer would be cut short by the buffer: counted, not sent.
        for len in [largest + 1, 60_000] {
            wg.send_to(&vec![1u8; len], shim).await.unwrap();
        }
        until(|| c.too_large.load(Ordering::Relaxed) == 2).await;
        assert_eq!(c.no_relay.load(Ordering::Relaxed), 1);
    }

    /// A grant cut in fragments still arrives whole while a peer sends enough first fragments
    /// to fill a reassembler in between (they are put back together apart).
    #[tokio::test]
    async fn a_peer_cannot_push_out_a_grant_half_there() {
        let (_link_tx, link) = watch::channel(None);
        let client = Arc::new(RelayClient::new(9, link));
        let (frames_tx, frames_rx) = mpsc::channel(256);
        let peer = PublicKey([7; 32]);
        let inbound = tokio::spawn(client.clone().run_inbound(frames_rx, move |k| *k == peer));
        let grant = Grant {
            relays: vec![],
            ticket: "t".repeat(1500),
            expires: 1,
            proof_secret: Default::default(),
        };
        let json = serde_json::to_vec(&grant).unwrap();
        let pieces = relay::frames(&RELAY_SELF, 1, &json, MAX_FRAME).unwrap();
        assert_eq!(pieces.len(), 2);
        frames_tx.send(pieces[0].clone()).await.unwrap();
        for id in 0..relay::MAX_PARTIAL as u16 {
            let f = relay::frames(&peer, id, &[0; 1500], MAX_FRAME).unwrap();
            frames_tx.send(f[0].clone()).await.unwrap();
        }
        frames_tx.send(pieces[1].clone()).await.unwrap();
        let c = client.counters();
        until(|| c.grants.load(Ordering::Relaxed) == 1).await;
        assert_eq!(client.grants.borrow().as_ref(), Some(&grant));
        inbound.abort();
    }
}
