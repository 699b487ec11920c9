//! Which path reaches each peer: a direct address found by probing, or the relay.
//!
//! [`Paths`] is a state machine given time (it reads no clock and does no I/O): it takes the
//! peers' candidate addresses from the map, discovery datagrams received on the WireGuard
//! socket and the passing of time, and gives back datagrams to send from that socket
//! ([`Paths::poll_transmit`]) and a path per peer ([`Paths::path`]).
//!
//! - **Reflexive address**: a [`Reflect`] query to the coordinator's discovery port, from the
//!   WireGuard socket, every [`REFLECT_EVERY`] (every [`REFLECT_RETRY`] until answered); the
//!   answer is the address a NAT mapped the socket to, reported to the coordinator as a
//!   candidate and so distributed in maps.
//! - **Hole punching**: every peer's candidates are pinged with sealed probes
//!   ([`meshlink_proto::disco`]) as soon as they appear or change, by both nodes at about the
//!   same time (both see the same map delta), every [`PUNCH_EVERY`] for [`PUNCH_FOR`] and every
//!   [`SEARCH_EVERY`] after that. An outgoing ping opens this side's NAT for the other's
//!   pings, so the pair finds a way through any NAT that keeps one mapping per socket. A ping
//!   from an address not listed is answered and that address tried too (the peer's mapping
//!   towards this node, where its NAT maps per destination).
//! - **Choice**: the candidate with the lowest round trip among those that answered within
//!   [`ALIVE`] ([`Path::Direct`]); a better one must be clearly better ([`SWITCH_RATIO`]) to
//!   take over, so paths do not flap. With none, the relay ([`Path::Relay`]) once the peer has
//!   been probed for [`DIRECT_GRACE`] (before that, or without a relay, [`Path::Unknown`]:
//!   the caller keeps its own choice). The path in use is pinged every [`HEARTBEAT`]; one
//!   silent for [`ALIVE`] is dropped, so a dead direct path falls back to the relay within
//!   seconds, and a relayed pair keeps searching and upgrades as soon as a ping gets through.
//! - **Through the relay**: a relayed peer is also pinged through the relay
//!   ([`Destination::Relay`]: its shim, which frames a probe as any datagram of the WireGuard
//!   socket) every [`RELAYED_PING_EVERY`], and answers come back the same way
//!   ([`Paths::handle_relayed`]), so a relayed path's round trip is measured end to end, both
//!   directions through whatever relays the two nodes send through. The relay in use
//!   ([`Paths::set_route`]) is part of the path: another relay, or the same over another
//!   transport, is a change of the path (its age starts over and its round trip is measured
//!   afresh, the first ping going at once). Relayed probes only measure: they never choose a
//!   path, and an address they come from is never a candidate.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshlink_proto::disco::{self, PairKey, Probe, Reflect, TxId};
use meshlink_proto::PublicKey;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

use super::relay::Route;

/// How often a peer without a direct path pings all its candidates at first.
pub const PUNCH_EVERY: Duration = Duration::from_millis(500);
/// How long after candidates appear or change pings go at [`PUNCH_EVERY`].
pub const PUNCH_FOR: Duration = Duration::from_secs(10);
/// How often a peer without a direct path pings its candidates after [`PUNCH_FOR`].
pub const SEARCH_EVERY: Duration = Duration::from_secs(4);
/// How often the path in use is pinged.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// How often a peer with a direct path pings its other candidates (a better path).
pub const REPROBE_EVERY: Duration = Duration::from_secs(30);
/// A candidate counts as working while its last answer is younger than this.
pub const ALIVE: Duration = Duration::from_millis(6500);
/// How long a ping waits for its answer.
pub const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a new peer is probed before its traffic goes through the relay.
pub const DIRECT_GRACE: Duration = Duration::from_millis(800);
/// Another candidate takes over the path in use only with a round trip below this share of
/// the current one.
pub const SWITCH_RATIO: f64 = 0.7;
/// How often the reflexive address is asked once known.
pub const REFLECT_EVERY: Duration = Duration::from_secs(20);
/// How often the reflexive address is asked until answered.
pub const REFLECT_RETRY: Duration = Duration::from_secs(1);
/// The most candidates kept per peer (listed ones first, then those learnt from pings).
pub const MAX_CANDIDATES: usize = 8;
/// The most pongs answered per peer per second (a replayed ping costs one pong at most).
pub const PONGS_PER_SECOND: u32 = 20;
/// How often a peer whose path is the relay is pinged through it (its round trip): as
/// rarely as its candidates are searched ([`SEARCH_EVERY`]), one ping and one pong each way.
pub const RELAYED_PING_EVERY: Duration = Duration::from_secs(4);
/// The least time between two pings through the relay to one peer, however often its path or
/// relay changes.
pub const RELAYED_PING_GAP: Duration = Duration::from_secs(1);
/// A round trip through the relay is shown while its last answer is younger than this (three
/// pings): one that stopped answering shows none rather than an old figure.
pub const RELAYED_RTT_FOR: Duration = Duration::from_secs(12);
/// The most pings waiting for their answer per address (or through the relay, per peer).
const MAX_OUTSTANDING: usize = 4;
/// The most datagrams waiting to be sent.
const MAX_QUEUED: usize = 4096;

/// Where a datagram from the WireGuard socket goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// Straight to this address.
    Addr(SocketAddr),
    /// To this peer through the relay (its shim).
    Relay(PublicKey),
}

/// The path to one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Not decided yet (being probed), or no relay to fall back to: the caller's own choice.
    Unknown,
    /// Straight to this address.
    Direct(SocketAddr),
    /// Through the relay.
    Relay,
}

/// What `status` shows of a peer's path.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PathStatus {
    /// The path.
    pub path: Path,
    /// Its round trip, when measured: by pings to the address (direct) or through the relay,
    /// lately ([`RELAYED_RTT_FOR`]).
    pub rtt: Option<Duration>,
    /// When it last changed (for a relayed path, its relay too).
    pub changed: Instant,
}

/// Pings through the relay to a peer whose path is the relay.
#[derive(Debug, Default)]
struct Relayed {
    outstanding: VecDeque<(TxId, Instant)>,
    rtt: Option<Duration>,
    last_pong: Option<Instant>,
    /// When the next ping is due; none while the path is not the relay.
    next: Option<Instant>,
    last_sent: Option<Instant>,
}

impl Relayed {
    /// The path through the relay starts (or its relay changed) at `now`: measured afresh,
    /// the first ping as soon as [`RELAYED_PING_GAP`] allows.
    fn restart(&mut self, now: Instant) {
        self.outstanding.clear();
        self.rtt = None;
        self.last_pong = None;
        self.next = Some(
            self.last_sent
                .map_or(now, |at| (at + RELAYED_PING_GAP).max(now)),
        );
    }

    /// The path is no longer the relay: no pings, and answers to earlier ones match nothing.
    fn stop(&mut self) {
        self.outstanding.clear();
        self.rtt = None;
        self.last_pong = None;
        self.next = None;
    }

    /// The round trip, while answers keep coming.
    fn rtt(&self, now: Instant) -> Option<Duration> {
        let fresh = self
            .last_pong
            .is_some_and(|at| now.saturating_duration_since(at) < RELAYED_RTT_FOR);
        self.rtt.filter(|_| fresh)
    }
}

/// Forgets pings of `outstanding` that timed out at `now`, and the oldest beyond
/// [`MAX_OUTSTANDING`] with one more on its way.
fn expire(outstanding: &mut VecDeque<(TxId, Instant)>, now: Instant) {
    while let Some((_, sent)) = outstanding.front() {
        if now.saturating_duration_since(*sent) >= PING_TIMEOUT
            || outstanding.len() >= MAX_OUTSTANDING
        {
            outstanding.pop_front();
        } else {
            break;
        }
    }
}

/// A smoothed round trip: `sample` folded into `old`.
fn smoothed(old: Option<Duration>, sample: Duration) -> Duration {
    match old {
        Some(old) => (old * 3 + sample) / 4,
        None => sample,
    }
}

#[derive(Debug)]
struct Candidate {
    addr: SocketAddr,
    /// Listed in the map (not learnt from a ping).
    listed: bool,
    outstanding: VecDeque<(TxId, Instant)>,
    last_pong: Option<Instant>,
    rtt: Option<Duration>,
}

impl Candidate {
    fn new(addr: SocketAddr, listed: bool) -> Self {
        Self {
            addr,
            listed,
            outstanding: VecDeque::new(),
            last_pong: None,
            rtt: None,
        }
    }

    fn alive(&self, now: Instant) -> bool {
        self.last_pong
            .is_some_and(|t| now.saturating_duration_since(t) < ALIVE)
    }
}

#[derive(Debug)]
struct Peer {
    key: Option<PairKey>,
    candidates: Vec<Candidate>,
    /// When its candidates last appeared or changed (punching starts over).
    punch_from: Instant,
    appeared: Instant,
    next_probe: Instant,
    last_full_probe: Instant,
    path: Path,
    changed: Instant,
    pong_window: (Instant, u32),
    /// The relay its datagrams go through while relayed ([`Paths::set_route`]).
    route: Option<Route>,
    relayed: Relayed,
}

impl Peer {
    /// Whether one more pong may go out at `now` ([`PONGS_PER_SECOND`]).
    fn may_answer(&mut self, now: Instant) -> bool {
        let (start, n) = self.pong_window;
        if now.saturating_duration_since(start) >= Duration::from_secs(1) {
            self.pong_window = (now, 1);
            true
        } else if n >= PONGS_PER_SECOND {
            false
        } else {
            self.pong_window.1 += 1;
            true
        }
    }
}

#[derive(Debug)]
struct ReflectState {
    target: SocketAddr,
    outstanding: Option<(TxId, Instant)>,
    next: Instant,
}

/// Counters of what discovery refused.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DiscoDrops {
    /// Probes from keys not in the map, that failed authentication, or malformed.
    pub refused: u64,
    /// Pongs and answers matching no question (late, replayed or forged).
    pub unmatched: u64,
    /// Pings over the per-peer answer rate.
    pub rate_limited: u64,
}

/// Paths to every peer. See the module documentation.
#[derive(Debug)]
pub struct Paths {
    own: PublicKey,
    private: [u8; 32],
    peers: HashMap<PublicKey, Peer>,
    reflect: Option<ReflectState>,
    reflexive: Option<SocketAddr>,
    relay: bool,
    out: VecDeque<(Destination, Vec<u8>)>,
    changed: bool,
    measured: bool,
    rng: StdRng,
    drops: DiscoDrops,
}

impl Paths {
    /// Paths for the node with these keys; `seed` seeds transaction ids and nonces (random in
    /// the agent, fixed in tests).
    #[must_use]
    pub fn new(own: PublicKey, private: [u8; 32], seed: u64) -> Self {
        Self {
            own,
            private,
            peers: HashMap::new(),
            reflect: None,
            reflexive: None,
            relay: false,
            out: VecDeque::new(),
            changed: false,
            measured: false,
            rng: StdRng::seed_from_u64(seed),
            drops: DiscoDrops::default(),
        }
    }

    /// This node switched to another key pair (a key rotation): probes are sealed with it from
    /// now on. Paths found stay; peers that still know the old key answer nothing until their
    /// map shows the new one, and a path they stop confirming falls back as any would.
    pub fn set_own_key(&mut self, own: PublicKey, private: [u8; 32]) {
        self.own = own;
        self.private = private;
        for (key, peer) in &mut self.peers {
            peer.key = PairKey::derive(&private, key).ok();
        }
    }

    /// The peers and their listed candidates (from the map), replacing the previous set.
    pub fn set_peers(
        &mut self,
        peers: impl IntoIterator<Item = (PublicKey, Vec<SocketAddr>)>,
        now: Instant,
    ) {
        let mut seen = Vec::new();
        for (key, listed) in peers {
            if key == self.own {
                continue;
            }
            seen.push(key);
            let private = self.private;
            let peer = self.peers.entry(key).or_insert_with(|| Peer {
                key: PairKey::derive(&private, &key).ok(),
                candidates: Vec::new(),
                punch_from: now,
                appeared: now,
                next_probe: now,
                last_full_probe: now,
                path: Path::Unknown,
                changed: now,
                pong_window: (now, 0),
                route: None,
                relayed: Relayed::default(),
            });
            let before: Vec<SocketAddr> = peer
                .candidates
                .iter()
                .filter(|c| c.listed)
                .map(|c| c.addr)
                .collect();
            if before == listed {
                continue;
            }
            let mut old = std::mem::take(&mut peer.candidates);
            for addr in listed.iter().take(MAX_CANDIDATES) {
                let c = match old.iter().position(|c| c.addr == *addr) {
                    Some(i) => {
                        let mut c = old.swap_remove(i);
                        c.listed = true;
                        c
                    }
                    None => Candidate::new(*addr, true),
                };
                peer.candidates.push(c);
            }
            // Learnt candidates stay while there is room.
            for c in old.into_iter().filter(|c| !c.listed) {
                if peer.candidates.len() < MAX_CANDIDATES {
                    peer.candidates.push(c);
                }
            }
            peer.punch_from = now;
            peer.next_probe = now;
        }
        let before = self.peers.len();
        self.peers.retain(|k, _| seen.contains(k));
        if self.peers.len() != before {
            self.changed = true;
        }
        for key in seen {
            self.choose(&key, now);
        }
    }

    /// Whether a relay is there to fall back to.
    pub fn set_relay(&mut self, available: bool, now: Instant) {
        if self.relay != available {
            self.relay = available;
            let keys: Vec<PublicKey> = self.peers.keys().copied().collect();
            for k in keys {
                self.choose(&k, now);
            }
        }
    }

    /// The relay `peer`'s datagrams go through now (none: no relay has it). While its path is
    /// the relay, another route is a change of the path.
    pub fn set_route(&mut self, peer: &PublicKey, route: Option<Route>, now: Instant) {
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        if p.route == route {
            return;
        }
        p.route = route;
        if p.path == Path::Relay {
            p.changed = now;
            p.relayed.restart(now);
            self.changed = true;
        }
    }

    /// Where reflexive address queries go (the coordinator's discovery port), or none.
    pub fn set_reflect_target(&mut self, target: Option<SocketAddr>, now: Instant) {
        match target {
            Some(t) if self.reflect.as_ref().map(|r| r.target) != Some(t) => {
                self.reflect = Some(ReflectState {
                    target: t,
                    outstanding: None,
                    next: now,
                });
            }
            Some(_) => {}
            None => self.reflect = None,
        }
    }

    /// The address a NAT maps the WireGuard socket to, as last seen by the coordinator.
    #[must_use]
    pub fn reflexive(&self) -> Option<SocketAddr> {
        self.reflexive
    }

    /// The path to `peer`.
    #[must_use]
    pub fn path(&self, peer: &PublicKey) -> Path {
        self.peers.get(peer).map_or(Path::Unknown, |p| p.path)
    }

    /// The path to `peer` with its round trip and age at `now`, for status.
    #[must_use]
    pub fn status(&self, peer: &PublicKey, now: Instant) -> Option<PathStatus> {
        let p = self.peers.get(peer)?;
        let rtt = match p.path {
            Path::Direct(a) => p.candidates.iter().find(|c| c.addr == a)?.rtt,
            Path::Relay => p.relayed.rtt(now),
            Path::Unknown => None,
        };
        Some(PathStatus {
            path: p.path,
            rtt,
            changed: p.changed,
        })
    }

    /// Whether any path (or the reflexive address) changed since the last call.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// Whether the round trip of some path became known since the last call (the first
    /// answer through the relay after the path or its relay changed): worth reporting.
    pub fn take_measured(&mut self) -> bool {
        std::mem::take(&mut self.measured)
    }

    /// What discovery refused so far.
    #[must_use]
    pub fn drops(&self) -> DiscoDrops {
        self.drops
    }

    /// The next datagram to send from the WireGuard socket.
    pub fn poll_transmit(&mut self) -> Option<(Destination, Vec<u8>)> {
        self.out.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) wants to run next.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let peers = self.peers.values().map(|p| p.next_probe);
        let relayed = self.peers.values().filter_map(|p| p.relayed.next);
        let reflect = self.reflect.iter().map(|r| r.next);
        peers.chain(relayed).chain(reflect).min()
    }

    /// A discovery datagram arrived on the WireGuard socket from `from`.
    pub fn handle_datagram(&mut self, from: SocketAddr, datagram: &[u8], now: Instant) {
        if datagram.starts_with(&disco::REFLECT_MAGIC) {
            self.handle_reflect(from, datagram, now);
            return;
        }
        let Some((sender, probe)) = self.open_probe(datagram) else {
            return;
        };
        let Some(peer) = self.peers.get_mut(&sender) else {
            return;
        };
        match probe {
            Probe::Ping { tx } => {
                if !peer.may_answer(now) {
                    self.drops.rate_limited += 1;
                    return;
                }
                // A ping from an address not listed: the peer's mapping towards this node.
                if !peer.candidates.iter().any(|c| c.addr == from)
                    && peer.candidates.len() < MAX_CANDIDATES
                {
                    peer.candidates.push(Candidate::new(from, false));
                    peer.next_probe = now;
                }
                if let Some(pair) = &peer.key {
                    let pong = Probe::Pong { tx, observed: from };
                    let to = Destination::Addr(from);
                    send_sealed(&mut self.out, &mut self.rng, &self.own, pair, to, &pong);
                }
            }
            Probe::Pong { tx, .. } => {
                let matched = peer.candidates.iter_mut().find_map(|c| {
                    let i = c.outstanding.iter().position(|(t, _)| *t == tx)?;
                    let (_, sent) = c.outstanding.remove(i)?;
                    Some((c, sent))
                });
                let Some((c, sent)) = matched else {
                    self.drops.unmatched += 1;
                    return;
                };
                c.rtt = Some(smoothed(c.rtt, now.saturating_duration_since(sent)));
                c.last_pong = Some(now);
                self.choose(&sender, now);
            }
            // Relayed probes come through the relay only (`handle_relayed`).
            Probe::RelayedPing { .. } | Probe::RelayedPong { .. } => {
                self.drops.refused += 1;
            }
        }
    }

    /// A discovery datagram came through the relay from `peer` (the relay client handed it
    /// to the WireGuard socket from that peer's shim). Only relayed probes sealed by `peer`
    /// are taken; a relayed ping is answered the same way.
    pub fn handle_relayed(&mut self, peer: PublicKey, datagram: &[u8], now: Instant) {
        if disco::probe_sender(datagram) != Some(peer) {
            self.drops.refused += 1;
            return;
        }
        let Some((_, probe)) = self.open_probe(datagram) else {
            return;
        };
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        match probe {
            Probe::RelayedPing { tx } => {
                if !p.may_answer(now) {
                    self.drops.rate_limited += 1;
                    return;
                }
                if let Some(pair) = &p.key {
                    let pong = Probe::RelayedPong { tx };
                    let to = Destination::Relay(peer);
                    send_sealed(&mut self.out, &mut self.rng, &self.own, pair, to, &pong);
                }
            }
            Probe::RelayedPong { tx } => {
                let r = &mut p.relayed;
                let Some(i) = r.outstanding.iter().position(|(t, _)| *t == tx) else {
                    self.drops.unmatched += 1;
                    return;
                };
                let Some((_, sent)) = r.outstanding.remove(i) else {
                    return;
                };
                // After a silence the old figure is not folded in.
                let first = r.rtt(now).is_none();
                let old = if first { None } else { r.rtt };
                r.rtt = Some(smoothed(old, now.saturating_duration_since(sent)));
                r.last_pong = Some(now);
                if first {
                    self.measured = true;
                }
            }
            // A probe of a direct path has no business coming through the relay.
            Probe::Ping { .. } | Probe::Pong { .. } => {
                self.drops.refused += 1;
            }
        }
    }

    /// The probe `datagram` carries and its sender, when the sender is a peer whose shared
    /// key opens it; else `None`, counted refused.
    fn open_probe(&mut self, datagram: &[u8]) -> Option<(PublicKey, Probe)> {
        let opened = disco::probe_sender(datagram).and_then(|sender| {
            let pair = self.peers.get(&sender)?.key.as_ref()?;
            Some((sender, pair.open(datagram).ok()?))
        });
        if opened.is_none() {
            self.drops.refused += 1;
        }
        opened
    }

    fn handle_reflect(&mut self, from: SocketAddr, datagram: &[u8], now: Instant) {
        let Ok(Reflect::Response { tx, observed }) = Reflect::decode(datagram) else {
            self.drops.refused += 1;
            return;
        };
        let Some(r) = self.reflect.as_mut() else {
            self.drops.unmatched += 1;
            return;
        };
        if r.target != from || r.outstanding.map(|(t, _)| t) != Some(tx) {
            self.drops.unmatched += 1;
            return;
        }
        r.outstanding = None;
        r.next = now + REFLECT_EVERY;
        if self.reflexive != Some(observed) {
            self.reflexive = Some(observed);
            self.changed = true;
        }
    }

    /// Sends the pings and queries that are due and re-decides paths whose answers ran out.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(r) = self.reflect.as_mut() {
            if r.next <= now {
                let tx = new_tx(&mut self.rng);
                r.outstanding = Some((tx, now));
                push(
                    &mut self.out,
                    Destination::Addr(r.target),
                    Reflect::Request { tx }.encode(),
                );
                // Asked again soon until an answer comes (see handle_reflect), then rarely.
                r.next = now
                    + if self.reflexive.is_some() {
                        REFLECT_EVERY
                    } else {
                        REFLECT_RETRY
                    };
            }
        }
        let keys: Vec<PublicKey> = self
            .peers
            .iter()
            .filter(|(_, p)| p.next_probe <= now)
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            self.probe(&k, now);
            self.choose(&k, now);
        }
        let relayed: Vec<PublicKey> = self
            .peers
            .iter()
            .filter(|(_, p)| p.relayed.next.is_some_and(|at| at <= now))
            .map(|(k, _)| *k)
            .collect();
        for k in relayed {
            self.ping_relayed(&k, now);
        }
        // Paths whose answers ran out between probes.
        let stale: Vec<PublicKey> = self
            .peers
            .iter()
            .filter(|(_, p)| match p.path {
                Path::Direct(a) => !p.candidates.iter().any(|c| c.addr == a && c.alive(now)),
                _ => false,
            })
            .map(|(k, _)| *k)
            .collect();
        for k in stale {
            self.choose(&k, now);
        }
    }

    fn probe(&mut self, key: &PublicKey, now: Instant) {
        let Some(peer) = self.peers.get_mut(key) else {
            return;
        };
        let Some(pair) = peer.key.clone() else {
            // A peer whose key gives no shared secret is never probed.
            peer.next_probe = now + REPROBE_EVERY;
            return;
        };
        let direct = match peer.path {
            Path::Direct(a) => Some(a),
            _ => None,
        };
        let full = direct.is_none()
            || now.saturating_duration_since(peer.last_full_probe) >= REPROBE_EVERY;
        if full {
            peer.last_full_probe = now;
        }
        for c in &mut peer.candidates {
            if !full && Some(c.addr) != direct {
                continue;
            }
            expire(&mut c.outstanding, now);
            let tx = new_tx(&mut self.rng);
            c.outstanding.push_back((tx, now));
            let (to, ping) = (Destination::Addr(c.addr), Probe::Ping { tx });
            send_sealed(&mut self.out, &mut self.rng, &self.own, &pair, to, &ping);
        }
        peer.next_probe = now
            + if direct.is_some() {
                HEARTBEAT
            } else if now.saturating_duration_since(peer.punch_from) < PUNCH_FOR {
                PUNCH_EVERY
            } else {
                SEARCH_EVERY
            };
    }

    /// Pings `key` through the relay, and sets when next.
    fn ping_relayed(&mut self, key: &PublicKey, now: Instant) {
        let Some(peer) = self.peers.get_mut(key) else {
            return;
        };
        peer.relayed.next = Some(now + RELAYED_PING_EVERY);
        // Without a relay that has the peer, a ping would only be counted as undeliverable.
        let (Some(pair), Some(_)) = (&peer.key, &peer.route) else {
            return;
        };
        let r = &mut peer.relayed;
        expire(&mut r.outstanding, now);
        let tx = new_tx(&mut self.rng);
        r.outstanding.push_back((tx, now));
        r.last_sent = Some(now);
        let (to, ping) = (Destination::Relay(*key), Probe::RelayedPing { tx });
        send_sealed(&mut self.out, &mut self.rng, &self.own, pair, to, &ping);
    }

    fn choose(&mut self, key: &PublicKey, now: Instant) {
        let relay = self.relay;
        let Some(peer) = self.peers.get_mut(key) else {
            return;
        };
        let best = peer
            .candidates
            .iter()
            .filter(|c| c.alive(now))
            .min_by_key(|c| c.rtt.unwrap_or(Duration::MAX));
        let current = match peer.path {
            Path::Direct(a) => peer.candidates.iter().find(|c| c.addr == a && c.alive(now)),
            _ => None,
        };
        let next = match (current, best) {
            (Some(cur), Some(best)) => {
                let better = match (cur.rtt, best.rtt) {
                    (Some(c), Some(b)) => b.as_secs_f64() < c.as_secs_f64() * SWITCH_RATIO,
                    _ => false,
                };
                Path::Direct(if better { best.addr } else { cur.addr })
            }
            (None, Some(best)) => Path::Direct(best.addr),
            (_, None) => {
                if relay && now.saturating_duration_since(peer.appeared) >= DIRECT_GRACE {
                    Path::Relay
                } else if relay && matches!(peer.path, Path::Direct(_) | Path::Relay) {
                    // A direct path that died: the relay at once.
                    Path::Relay
                } else {
                    Path::Unknown
                }
            }
        };
        if next != peer.path {
            peer.path = next;
            peer.changed = now;
            self.changed = true;
            if next == Path::Relay {
                peer.relayed.restart(now);
            } else {
                peer.relayed.stop();
            }
        }
        // The grace ends at a known time: be woken for it.
        if peer.path == Path::Unknown && relay {
            peer.next_probe = peer.next_probe.min(peer.appeared + DIRECT_GRACE);
        }
    }
}

/// A fresh transaction id.
fn new_tx(rng: &mut StdRng) -> TxId {
    let mut tx = [0u8; disco::TX_LEN];
    rng.fill_bytes(&mut tx);
    tx
}

/// Queues `probe` for `to`, sealed by `own` for the peer of `pair` under a fresh nonce.
fn send_sealed(
    out: &mut VecDeque<(Destination, Vec<u8>)>,
    rng: &mut StdRng,
    own: &PublicKey,
    pair: &PairKey,
    to: Destination,
    probe: &Probe,
) {
    let mut nonce = [0u8; 24];
    rng.fill_bytes(&mut nonce);
    push(out, to, pair.seal(own, probe, nonce));
}

fn push(out: &mut VecDeque<(Destination, Vec<u8>)>, to: Destination, d: Vec<u8>) {
    if out.len() < MAX_QUEUED {
        out.push_back((to, d));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshlink_proto::control::RelayTransport;

    fn node(seed: u8) -> ([u8; 32], PublicKey) {
        let secret = [seed; 32];
        let s = x25519_dalek::StaticSecret::from(secret);
        (
            secret,
            PublicKey(*x25519_dalek::PublicKey::from(&s).as_bytes()),
        )
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Two nodes behind NATs that keep one mapping per socket: `a` is seen as `a_pub`, `b` as
    /// `b_pub`. A datagram crosses when it goes to a public address whose NAT has sent to the
    /// sender's public address before (the NAT's filter), or when `open` says so. A datagram
    /// for the relay crosses it `relay_delay` later while `relay_up`.
    struct Pair {
        a: Paths,
        b: Paths,
        a_key: PublicKey,
        b_key: PublicKey,
        a_pub: SocketAddr,
        b_pub: SocketAddr,
        a_sent_to: Vec<SocketAddr>,
        b_sent_to: Vec<SocketAddr>,
        filter: bool,
        blocked: bool,
        relay_up: bool,
        relay_delay: Duration,
        /// Datagrams crossing the relay: when they arrive, whether to `b`, the datagram.
        in_relay: Vec<(Instant, bool, Vec<u8>)>,
        /// The pings `a` sent through the relay (not its answers to `b`'s).
        a_relayed: usize,
        /// `b`'s key with `a`, to tell `a`'s pings.
        ba: PairKey,
        /// How far time moves between two rounds of [`Pair::run`].
        step: Duration,
    }

    impl Pair {
        fn new(filter: bool) -> (Self, PublicKey, PublicKey) {
            let (a_sec, a_key) = node(1);
            let (b_sec, b_key) = node(2);
            let p = Pair {
                a: Paths::new(a_key, a_sec, 1),
                b: Paths::new(b_key, b_sec, 2),
                a_key,
                b_key,
                a_pub: addr("198.18.0.1:40001"),
                b_pub: addr("198.18.0.2:40002"),
                a_sent_to: vec![],
                b_sent_to: vec![],
                filter,
                blocked: false,
                relay_up: true,
                relay_delay: Duration::ZERO,
                in_relay: vec![],
                a_relayed: 0,
                ba: PairKey::derive(&b_sec, &a_key).unwrap(),
                step: Duration::from_millis(100),
            };
            (p, a_key, b_key)
        }

        /// Moves every queued datagram across (and what the relay delivers by `now`), four
        /// rounds.
        fn exchange(&mut self, now: Instant) {
            for _ in 0..4 {
                let (due, later) = std::mem::take(&mut self.in_relay)
                    .into_iter()
                    .partition(|(at, _, _)| *at <= now);
                self.in_relay = later;
                for (_, to_b, d) in due {
                    if to_b {
                        self.b.handle_relayed(self.a_key, &d, now);
                    } else {
                        self.a.handle_relayed(self.b_key, &d, now);
                    }
                }
                while let Some((to, d)) = self.a.poll_transmit() {
                    self.carry(true, to, d, now);
                }
                while let Some((to, d)) = self.b.poll_transmit() {
                    self.carry(false, to, d, now);
                }
            }
        }

        /// Carries one datagram from `a` (or `b`) to the other, if it crosses.
        fn carry(&mut self, from_a: bool, to: Destination, d: Vec<u8>, now: Instant) {
            let (sent_to, other_sent_to, own, other_pub, other_key) = if from_a {
                (
                    &mut self.a_sent_to,
                    &self.b_sent_to,
                    self.a_pub,
                    self.b_pub,
                    self.b_key,
                )
            } else {
                (
                    &mut self.b_sent_to,
                    &self.a_sent_to,
                    self.b_pub,
                    self.a_pub,
                    self.a_key,
                )
            };
            match to {
                Destination::Addr(to) => {
                    sent_to.push(to);
                    let open = !self.filter || other_sent_to.contains(&own);
                    if to == other_pub && open && !self.blocked {
                        let receiver = if from_a { &mut self.b } else { &mut self.a };
                        receiver.handle_datagram(own, &d, now);
                    }
                }
                Destination::Relay(peer) => {
                    assert_eq!(peer, other_key, "through the relay to its peer");
                    if from_a && matches!(self.ba.open(&d), Ok(Probe::RelayedPing { .. })) {
                        self.a_relayed += 1;
                    }
                    if self.relay_up {
                        self.in_relay.push((now + self.relay_delay, from_a, d));
                    }
                }
            }
        }

        fn run(&mut self, from: Instant, secs: f64) -> Instant {
            let end = from + Duration::from_secs_f64(secs);
            let mut now = from;
            while now < end {
                self.a.handle_timeout(now);
                self.b.handle_timeout(now);
                self.exchange(now);
                now += self.step;
            }
            now
        }

        /// Both list each other's public address, through NATs that let nothing through
        /// directly, with a relay that takes `relay_delay` each way, `r1` over UDP for both.
        fn relayed(relay_delay: Duration, t0: Instant) -> Self {
            let (mut p, a_key, b_key) = Pair::new(true);
            p.blocked = true;
            p.relay_delay = relay_delay;
            p.step = Duration::from_millis(10);
            p.a.set_peers([(b_key, vec![p.b_pub])], t0);
            p.b.set_peers([(a_key, vec![p.a_pub])], t0);
            p.a.set_relay(true, t0);
            p.b.set_relay(true, t0);
            p.a.set_route(&b_key, Some(route(Some("r1"), RelayTransport::Udp)), t0);
            p.b.set_route(&a_key, Some(route(Some("r1"), RelayTransport::Udp)), t0);
            p
        }
    }

    fn route(name: Option<&str>, transport: RelayTransport) -> Route {
        Route {
            remote: addr("198.18.0.100:7443"),
            transport,
            name: name.map(str::to_string),
        }
    }

    #[test]
    fn two_nats_find_the_direct_path_by_pinging_each_other_at_once() {
        let (mut p, a_key, b_key) = Pair::new(true);
        let t0 = Instant::now();
        // Each lists the other's private address first (unreachable) and its reflexive one.
        p.a.set_peers([(b_key, vec![addr("10.0.2.10:51820"), p.b_pub])], t0);
        p.b.set_peers([(a_key, vec![addr("10.0.1.10:51820"), p.a_pub])], t0);
        p.a.set_relay(true, t0);
        p.b.set_relay(true, t0);
        assert_eq!(p.a.path(&b_key), Path::Unknown);
        let t = p.run(t0, 1.5);
        assert_eq!(p.a.path(&b_key), Path::Direct(p.b_pub));
        assert_eq!(p.b.path(&a_key), Path::Direct(p.a_pub));
        assert!(p.a.status(&b_key, t).unwrap().rtt.is_some());
        assert!(p.a.take_changed());
        // The heartbeat keeps it.
        let t = p.run(t, 20.0);
        assert_eq!(p.a.path(&b_key), Path::Direct(p.b_pub));
        // The path dies: the relay takes over within ALIVE plus a heartbeat.
        p.blocked = true;
        let t = p.run(t, (ALIVE + HEARTBEAT).as_secs_f64() + 0.2);
        assert_eq!(p.a.path(&b_key), Path::Relay);
        assert_eq!(p.b.path(&a_key), Path::Relay);
        // It comes back: the search finds it again within SEARCH_EVERY.
        p.blocked = false;
        p.run(t, SEARCH_EVERY.as_secs_f64() + 0.5);
        assert_eq!(p.a.path(&b_key), Path::Direct(p.b_pub));
    }

    #[test]
    fn without_any_way_through_the_relay_carries_after_the_grace() {
        let (mut p, a_key, b_key) = Pair::new(true);
        p.blocked = true;
        let t0 = Instant::now();
        p.a.set_peers([(b_key, vec![p.b_pub])], t0);
        p.b.set_peers([(a_key, vec![p.a_pub])], t0);
        p.a.set_relay(true, t0);
        p.run(t0, 0.5);
        assert_eq!(p.a.path(&b_key), Path::Unknown);
        assert!(p.a.poll_timeout().unwrap() <= t0 + DIRECT_GRACE);
        p.run(t0 + Duration::from_millis(500), 0.5);
        assert_eq!(p.a.path(&b_key), Path::Relay);
        // Without a relay, the caller's choice stays.
        p.a.set_relay(false, t0 + Duration::from_secs(1));
        assert_eq!(p.a.path(&b_key), Path::Unknown);
    }

    #[test]
    fn forged_replayed_and_unknown_probes_change_nothing() {
        let (mut p, a_key, b_key) = Pair::new(false);
        let t0 = Instant::now();
        p.a.set_peers([(b_key, vec![p.b_pub])], t0);
        p.b.set_peers([(a_key, vec![p.a_pub])], t0);
        p.a.handle_timeout(t0);
        let (_, ping) = p.a.poll_transmit().unwrap();
        // b answers; a replayed pong afterwards matches nothing.
        p.b.handle_datagram(p.a_pub, &ping, t0);
        let (_, pong) = p.b.poll_transmit().unwrap();
        p.a.handle_datagram(p.b_pub, &pong, t0);
        assert_eq!(p.a.path(&b_key), Path::Direct(p.b_pub));
        p.a.handle_datagram(p.b_pub, &pong, t0);
        assert_eq!(p.a.drops().unmatched, 1);
        // A stranger (key not in the map) and a forged seal are refused.
        let (c_sec, c_key) = node(3);
        let mut c = Paths::new(c_key, c_sec, 3);
        c.set_peers([(a_key, vec![p.a_pub])], t0);
        c.handle_timeout(t0);
        let (_, stranger) = c.poll_transmit().unwrap();
        p.a.handle_datagram(addr("198.18.0.3:1"), &stranger, t0);
        let mut forged = ping.clone();
        let n = forged.len();
        forged[n - 1] ^= 1;
        p.b.handle_datagram(p.a_pub, &forged, t0);
        assert_eq!(p.a.drops().refused, 1);
        assert_eq!(p.b.drops().refused, 1);
        assert!(p.b.poll_transmit().is_none());
        // A flood of replayed pings costs at most PONGS_PER_SECOND pongs a second.
        for _ in 0..1000 {
            p.b.handle_datagram(p.a_pub, &ping, t0);
        }
        let mut pongs = 0;
        while p.b.poll_transmit().is_some() {
            pongs += 1;
        }
        assert_eq!(pongs, PONGS_PER_SECOND - 1);
    }

    #[test]
    fn the_reflexive_address_is_asked_until_answered_and_only_the_answer_counts() {
        let (sec, key) = node(1);
        let mut p = Paths::new(key, sec, 1);
        let coord = addr("198.18.0.10:7444");
        let t0 = Instant::now();
        p.set_reflect_target(Some(coord), t0);
        p.handle_timeout(t0);
        let (to, req) = p.poll_transmit().unwrap();
        assert_eq!(to, Destination::Addr(coord));
        let Ok(Reflect::Request { tx }) = Reflect::decode(&req) else {
            panic!("not a request")
        };
        let seen = addr("198.18.0.1:40001");
        // From elsewhere, or for another transaction: ignored.
        let answer = Reflect::Response { tx, observed: seen }.encode();
        p.handle_datagram(addr("198.18.0.66:7444"), &answer, t0);
        let other = Reflect::Response {
            tx: [0; disco::TX_LEN],
            observed: addr("1.2.3.4:5"),
        };
        p.handle_datagram(coord, &other.encode(), t0);
        assert_eq!(p.reflexive(), None);
        p.handle_datagram(coord, &answer, t0);
        assert_eq!(p.reflexive(), Some(seen));
        assert!(p.take_changed());
        assert_eq!(p.poll_timeout(), Some(t0 + REFLECT_EVERY));
    }

    #[test]
    fn a_ping_from_an_unlisted_address_adds_that_address() {
        let (mut p, a_key, b_key) = Pair::new(false);
        let t0 = Instant::now();
        // b does not know a's public address (a symmetric NAT mapped it elsewhere).
        p.a.set_peers([(b_key, vec![p.b_pub])], t0);
        p.b.set_peers([(a_key, vec![addr("198.18.0.1:1")])], t0);
        p.run(t0, 1.0);
        assert_eq!(p.b.path(&a_key), Path::Direct(p.a_pub));
    }

    /// A relayed pair measures its round trip through the relay, end to end (both ways
    /// through it), with one ping every few seconds; none is shown before the first answer,
    /// nor once answers stop.
    #[test]
    fn a_relayed_path_has_its_round_trip_measured_through_the_relay() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        // 40 ms each way through the relay.
        let mut p = Pair::relayed(ms(40), t0);
        let (a_key, b_key) = (p.a_key, p.b_key);
        let t = p.run(t0, DIRECT_GRACE.as_secs_f64() + 0.005);
        assert_eq!(p.a.path(&b_key), Path::Relay);
        assert_eq!(p.a.status(&b_key, t).unwrap().rtt, None, "not measured yet");
        assert!(!p.a.take_measured());
        let t = p.run(t, 0.2);
        let rtt = p.a.status(&b_key, t).unwrap().rtt.unwrap();
        assert!(rtt >= ms(80) && rtt <= ms(90), "{rtt:?}");
        assert!(
            p.a.take_measured(),
            "a round trip newly known is worth reporting"
        );
        let rtt = p.b.status(&a_key, t).unwrap().rtt.unwrap();
        assert!(rtt >= ms(80) && rtt <= ms(90), "{rtt:?}");
        // Kept up at a modest rate while the direct search goes on.
        let before = p.a_relayed;
        let t = p.run(t, 40.0);
        let sent = p.a_relayed - before;
        assert!(sent <= 11, "{sent} pings through the relay in 40 s");
        assert!(p.a.status(&b_key, t).unwrap().rtt.is_some());
        assert!(!p.a.take_measured(), "only the first answer is news");
        assert!(p.a_sent_to.contains(&p.b_pub), "the direct search goes on");
        // The relay stops carrying: no round trip is shown once the answers are old.
        p.relay_up = false;
        let t = p.run(t, RELAYED_RTT_FOR.as_secs_f64() + 0.1);
        assert_eq!(p.a.path(&b_key), Path::Relay);
        assert_eq!(p.a.status(&b_key, t).unwrap().rtt, None);
        // The direct path opens: pings through the relay stop.
        p.relay_up = true;
        p.blocked = false;
        let t = p.run(t, SEARCH_EVERY.as_secs_f64() + 0.5);
        assert_eq!(p.a.path(&b_key), Path::Direct(p.b_pub));
        let before = p.a_relayed;
        p.run(t, 20.0);
        assert_eq!(p.a_relayed, before);
    }

    /// The relay a relayed peer's datagrams go through is part of its path: moving to
    /// another relay, or to the same one over another transport, changes the path (its age
    /// starts over and the round trip is measured again at once); the same relay does not,
    /// nor does a relay change under a direct path. A flapping relay costs at most one ping
    /// per RELAYED_PING_GAP.
    #[test]
    fn a_relayed_peer_moving_to_another_relay_changes_its_path() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut p = Pair::relayed(ms(20), t0);
        let b_key = p.b_key;
        let t = p.run(t0, 2.0);
        let st = p.a.status(&b_key, t).unwrap();
        assert_eq!(st.path, Path::Relay);
        assert!(st.rtt.is_some());
        let relayed_at = st.changed;
        assert!(p.a.take_changed());
        p.a.take_measured();
        // Time and pings are no change.
        let t = p.run(t, 10.0);
        assert!(!p.a.take_changed());
        assert_eq!(p.a.status(&b_key, t).unwrap().changed, relayed_at);
        p.a.set_route(&b_key, Some(route(Some("r1"), RelayTransport::Udp)), t);
        assert!(!p.a.take_changed(), "the same relay");

        let steps = [
            (Some("r2"), RelayTransport::Udp),
            (Some("r2"), RelayTransport::Tcp),
            (None, RelayTransport::Tcp),
        ];
        let mut t = t;
        for (name, over) in steps {
            p.a.set_route(&b_key, Some(route(name, over)), t);
            assert!(p.a.take_changed(), "to {name:?} over {over:?}");
            let st = p.a.status(&b_key, t).unwrap();
            assert_eq!((st.path, st.changed, st.rtt), (Path::Relay, t, None));
            // Measured again within moments (a ping goes at once, or a second after the
            // last one at most).
            t = p.run(t, (RELAYED_PING_GAP + ms(100)).as_secs_f64());
            assert!(p.a.status(&b_key, t).unwrap().rtt.is_some());
            assert!(p.a.take_measured());
            t = p.run(t, 5.0);
        }
        // No relay has the peer any more: a change too.
        p.a.set_route(&b_key, None, t);
        assert!(p.a.take_changed());
        assert_eq!(p.a.status(&b_key, t).unwrap().changed, t);

        // Flapping between two relays every 100 ms for 5 s: a path change each time, but at
        // most a ping a second through the relay.
        let before = p.a_relayed;
        let mut now = t;
        for i in 0..50 {
            let name = if i % 2 == 0 { "r1" } else { "r2" };
            p.a.set_route(&b_key, Some(route(Some(name), RelayTransport::Udp)), now);
            now = p.run(now, 0.1);
        }
        let sent = p.a_relayed - before;
        assert!(
            sent <= 6,
            "{sent} pings through the relay in 5 s of flapping"
        );

        // Under a direct path, the relay is no part of it.
        p.blocked = false;
        let t = p.run(now, SEARCH_EVERY.as_secs_f64() + 0.5);
        assert_eq!(p.a.path(&b_key), Path::Direct(p.b_pub));
        p.a.take_changed();
        let direct_at = p.a.status(&b_key, t).unwrap().changed;
        p.a.set_route(&b_key, Some(route(Some("r3"), RelayTransport::Udp)), t);
        assert!(!p.a.take_changed());
        assert_eq!(p.a.status(&b_key, t).unwrap().changed, direct_at);
    }

    /// Relayed probes are taken only through the relay, from the peer whose shim they came
    /// from; direct probes only from an address.
    #[test]
    fn relayed_probes_come_through_the_relay_only() {
        let t0 = Instant::now();
        let mut p = Pair::relayed(Duration::ZERO, t0);
        let (a_key, b_key) = (p.a_key, p.b_key);
        let t = p.run(t0, 1.0);
        assert_eq!(p.a.path(&b_key), Path::Relay);
        // A relayed ping of a's, taken out of the relay.
        p.relay_up = false;
        let mut relayed_ping = None;
        let mut direct_ping = None;
        let mut now = t;
        while relayed_ping.is_none() || direct_ping.is_none() {
            now += Duration::from_millis(100);
            p.a.handle_timeout(now);
            while let Some((to, d)) = p.a.poll_transmit() {
                match to {
                    Destination::Relay(_) => relayed_ping = Some(d),
                    Destination::Addr(_) => direct_ping = Some(d),
                }
            }
        }
        let (relayed_ping, direct_ping) = (relayed_ping.unwrap(), direct_ping.unwrap());
        let refused = p.b.drops().refused;
        // Sent straight to b's address: refused, no answer, and a's address is not learnt.
        p.b.handle_datagram(addr("198.18.0.9:9"), &relayed_ping, now);
        // A direct ping coming through the relay: refused.
        p.b.handle_relayed(a_key, &direct_ping, now);
        // Through the relay but from another peer's shim: refused.
        let (_, c_key) = node(3);
        p.b.handle_relayed(c_key, &relayed_ping, now);
        assert_eq!(p.b.drops().refused, refused + 3);
        assert!(p.b.poll_transmit().is_none());
        // Through the relay from a: answered through the relay, to a.
        p.b.handle_relayed(a_key, &relayed_ping, now);
        let (to, pong) = p.b.poll_transmit().unwrap();
        assert_eq!(to, Destination::Relay(a_key));
        // The answer is taken once.
        p.a.handle_relayed(b_key, &pong, now);
        assert!(p.a.status(&b_key, now).unwrap().rtt.is_some());
        let unmatched = p.a.drops().unmatched;
        p.a.handle_relayed(b_key, &pong, now);
        assert_eq!(p.a.drops().unmatched, unmatched + 1);
    }
}
