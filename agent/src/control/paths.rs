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

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshlink_proto::disco::{self, PairKey, Probe, Reflect, TxId};
use meshlink_proto::PublicKey;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

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
/// The most datagrams waiting to be sent.
const MAX_QUEUED: usize = 4096;

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
    /// Its round trip, when measured (direct paths).
    pub rtt: Option<Duration>,
    /// When it last changed.
    pub changed: Instant,
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
    out: VecDeque<(SocketAddr, Vec<u8>)>,
    changed: bool,
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

    /// The path to `peer` with its round trip and age, for status.
    #[must_use]
    pub fn status(&self, peer: &PublicKey) -> Option<PathStatus> {
        let p = self.peers.get(peer)?;
        let rtt = match p.path {
            Path::Direct(a) => p.candidates.iter().find(|c| c.addr == a)?.rtt,
            _ => None,
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

    /// What discovery refused so far.
    #[must_use]
    pub fn drops(&self) -> DiscoDrops {
        self.drops
    }

    /// The next datagram to send from the WireGuard socket.
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.out.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) wants to run next.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let peers = self.peers.values().map(|p| p.next_probe);
        let reflect = self.reflect.iter().map(|r| r.next);
        peers.chain(reflect).min()
    }

    /// A discovery datagram arrived on the WireGuard socket from `from`.
    pub fn handle_datagram(&mut self, from: SocketAddr, datagram: &[u8], now: Instant) {
        if datagram.starts_with(&disco::REFLECT_MAGIC) {
            self.handle_reflect(from, datagram, now);
            return;
        }
        let Some(sender) = disco::probe_sender(datagram) else {
            self.drops.refused += 1;
            return;
        };
        let Some(peer) = self.peers.get_mut(&sender) else {
            self.drops.refused += 1;
            return;
        };
        let Some(probe) = peer.key.as_ref().and_then(|k| k.open(datagram).ok()) else {
            self.drops.refused += 1;
            return;
        };
        match probe {
            Probe::Ping { tx } => {
                let (start, n) = peer.pong_window;
                if now.saturating_duration_since(start) >= Duration::from_secs(1) {
                    peer.pong_window = (now, 1);
                } else if n >= PONGS_PER_SECOND {
                    self.drops.rate_limited += 1;
                    return;
                } else {
                    peer.pong_window.1 += 1;
                }
                // A ping from an address not listed: the peer's mapping towards this node.
                if !peer.candidates.iter().any(|c| c.addr == from)
                    && peer.candidates.len() < MAX_CANDIDATES
                {
                    peer.candidates.push(Candidate::new(from, false));
                    peer.next_probe = now;
                }
                let pong = Probe::Pong { tx, observed: from };
                let mut nonce = [0u8; 24];
                self.rng.fill_bytes(&mut nonce);
                if let Some(key) = &peer.key {
                    let d = key.seal(&self.own, &pong, nonce);
                    push(&mut self.out, from, d);
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
                let rtt = now.saturating_duration_since(sent);
                c.rtt = Some(match c.rtt {
                    Some(old) => (old * 3 + rtt) / 4,
                    None => rtt,
                });
                c.last_pong = Some(now);
                self.choose(&sender, now);
            }
        }
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
                let mut tx = [0u8; disco::TX_LEN];
                self.rng.fill_bytes(&mut tx);
                r.outstanding = Some((tx, now));
                push(&mut self.out, r.target, Reflect::Request { tx }.encode());
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
            while let Some((_, sent)) = c.outstanding.front() {
                if now.saturating_duration_since(*sent) >= PING_TIMEOUT || c.outstanding.len() >= 4
                {
                    c.outstanding.pop_front();
                } else {
                    break;
                }
            }
            let mut tx = [0u8; disco::TX_LEN];
            self.rng.fill_bytes(&mut tx);
            let mut nonce = [0u8; 24];
            self.rng.fill_bytes(&mut nonce);
            c.outstanding.push_back((tx, now));
            push(
                &mut self.out,
                c.addr,
                pair.seal(&self.own, &Probe::Ping { tx }, nonce),
            );
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
        }
        // The grace ends at a known time: be woken for it.
        if peer.path == Path::Unknown && relay {
            peer.next_probe = peer.next_probe.min(peer.appeared + DIRECT_GRACE);
        }
    }
}

fn push(out: &mut VecDeque<(SocketAddr, Vec<u8>)>, to: SocketAddr, d: Vec<u8>) {
    if out.len() < MAX_QUEUED {
        out.push_back((to, d));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    /// sender's public address before (the NAT's filter), or when `open` says so.
    struct Pair {
        a: Paths,
        b: Paths,
        a_pub: SocketAddr,
        b_pub: SocketAddr,
        a_sent_to: Vec<SocketAddr>,
        b_sent_to: Vec<SocketAddr>,
        filter: bool,
        blocked: bool,
    }

    impl Pair {
        fn new(filter: bool) -> (Self, PublicKey, PublicKey) {
            let (a_sec, a_key) = node(1);
            let (b_sec, b_key) = node(2);
            let p = Pair {
                a: Paths::new(a_key, a_sec, 1),
                b: Paths::new(b_key, b_sec, 2),
                a_pub: addr("198.18.0.1:40001"),
                b_pub: addr("198.18.0.2:40002"),
                a_sent_to: vec![],
                b_sent_to: vec![],
                filter,
                blocked: false,
            };
            (p, a_key, b_key)
        }

        /// Moves every queued datagram across, `rounds` times.
        fn exchange(&mut self, now: Instant) {
            for _ in 0..4 {
                while let Some((to, d)) = self.a.poll_transmit() {
                    self.a_sent_to.push(to);
                    let open = !self.filter || self.b_sent_to.contains(&self.a_pub);
                    if to == self.b_pub && open && !self.blocked {
                        self.b.handle_datagram(self.a_pub, &d, now);
                    }
                }
                while let Some((to, d)) = self.b.poll_transmit() {
                    self.b_sent_to.push(to);
                    let open = !self.filter || self.a_sent_to.contains(&self.b_pub);
                    if to == self.a_pub && open && !self.blocked {
                        self.a.handle_datagram(self.b_pub, &d, now);
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
                now += Duration::from_millis(100);
            }
            now
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
        assert!(p.a.status(&b_key).unwrap().rtt.is_some());
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
        assert_eq!(to, coord);
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
}
