//! The relay embedded in the coordinator: WireGuard datagrams between two nodes of one network
//! that cannot reach each other directly, carried as QUIC datagrams on each agent's control
//! connection ([`meshlink_proto::relay`] frames).
//!
//! Pipeline of one frame (the session loop in `server.rs` reads it from the source's
//! connection, once the source's hello is accepted):
//!
//! ```text
//! Relay::forward(source, frame)
//!   ─> the source's byte cap (token bucket)        over: dropped, rate_limited
//!   ─> parse the header: the destination's key      malformed
//!   ─> the destination's route in the source's network
//!                                                   none: no_route; only in another: other_network
//!   ─> fits the destination's max_datagram_size     too_large (unsupported: no datagrams)
//!   ─> room in the destination's send buffer        congested
//!   ─> readdress with the source's key ─> send_datagram on the destination's connection
//! ```
//!
//! # Security
//!
//! Not an open relay: only a connection whose hello was accepted is a source, and a frame goes
//! only to a node of the source's own network with a live session on this coordinator. The
//! receiver learns the source from the key the relay wrote, never from the sender. The relay
//! carries WireGuard ciphertext it cannot read, which the receiving peer authenticates again.
//! Each source is capped in bytes per second, and quinn's datagram buffers are bounded per
//! connection (`server::endpoint`), so a fast source cannot make the coordinator queue without
//! bound; a drop is counted, never logged per frame.
//!
//! Architecture invariant: a node has at most one route per network, the one of its newest
//! session ([`Relay::register`] keeps the higher serial); a route is removed only by the
//! session that registered it ([`Route`] on drop), so an older session's end cannot remove a
//! newer one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use meshlink_proto::relay;
use meshlink_proto::PublicKey;

use crate::ratelimit::TokenBucket;

/// The default cap on what one node may send through the relay: 25 MB/s (200 Mbit/s).
pub const DEFAULT_RATE: u64 = 25_000_000;
/// The least burst a source is allowed, so that a frame of any size passes a low cap.
const MIN_BURST: u64 = 64 * 1024;

/// The burst allowed at `rate` bytes per second: a tenth of a second's worth, at least 64 KiB.
pub fn burst_for(rate: u64) -> u64 {
    (rate / 10).max(MIN_BURST)
}

/// A destination's connection, as the relay uses it. Implemented by [`quinn::Connection`]; a
/// test puts a fake in its place.
pub trait Link: Clone + Send + Sync + 'static {
    /// The largest datagram the connection takes now; `None`: the peer takes none.
    fn max_datagram_size(&self) -> Option<usize>;
    /// Bytes free in the connection's datagram send buffer.
    fn send_buffer_space(&self) -> usize;
    /// Queues `datagram`; `false` when the connection is gone (or refused it).
    fn send(&self, datagram: Vec<u8>) -> bool;
}

impl Link for quinn::Connection {
    fn max_datagram_size(&self) -> Option<usize> {
        quinn::Connection::max_datagram_size(self)
    }

    fn send_buffer_space(&self) -> usize {
        self.datagram_send_buffer_space()
    }

    fn send(&self, datagram: Vec<u8>) -> bool {
        self.send_datagram(datagram.into()).is_ok()
    }
}

/// Why a frame was not relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// The source is over its byte cap.
    RateLimited,
    /// Shorter than a header, or an impossible fragment header.
    Malformed,
    /// No node of the source's network with that key has a session here (or it is the source
    /// itself, or its connection just went away).
    NoRoute,
    /// The key is a node with a session here, of another network.
    OtherNetwork,
    /// Larger than the destination's connection takes.
    TooLarge,
    /// The destination's connection takes no datagrams (its agent did not ask for them).
    Unsupported,
    /// The destination's send buffer is full: it is not keeping up.
    Congested,
}

/// What the relay did, since start.
#[derive(Debug, Default)]
struct Counters {
    frames: AtomicU64,
    bytes: AtomicU64,
    unauthenticated: AtomicU64,
    rate_limited: AtomicU64,
    malformed: AtomicU64,
    no_route: AtomicU64,
    other_network: AtomicU64,
    too_large: AtomicU64,
    unsupported: AtomicU64,
    congested: AtomicU64,
}

/// A copy of the relay's counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Frames delivered to a destination's connection.
    pub frames: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Datagrams dropped because their connection's hello was not yet accepted.
    pub unauthenticated: u64,
    /// Frames dropped: see [`Dropped::RateLimited`].
    pub rate_limited: u64,
    /// Frames dropped: see [`Dropped::Malformed`].
    pub malformed: u64,
    /// Frames dropped: see [`Dropped::NoRoute`].
    pub no_route: u64,
    /// Frames dropped: see [`Dropped::OtherNetwork`].
    pub other_network: u64,
    /// Frames dropped: see [`Dropped::TooLarge`].
    pub too_large: u64,
    /// Frames dropped: see [`Dropped::Unsupported`].
    pub unsupported: u64,
    /// Frames dropped: see [`Dropped::Congested`].
    pub congested: u64,
}

#[derive(Debug)]
struct Entry<L> {
    network: Arc<str>,
    serial: u64,
    link: L,
}

/// The relay: every node with a session here, by key, and the counters. One per coordinator,
/// shared by every session.
pub struct Relay<L: Link = quinn::Connection> {
    /// Usually one entry per key; several only when one key is a node in several networks.
    routes: RwLock<HashMap<PublicKey, Vec<Entry<L>>>>,
    counters: Counters,
    rate: u64,
}

impl<L: Link> std::fmt::Debug for Relay<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("rate", &self.rate)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// One session's place in the relay: while it lives, frames for its node go to its
/// connection. Dropping it removes the route, unless a newer session replaced it.
#[must_use = "the route is removed when this is dropped"]
pub struct Route<L: Link = quinn::Connection> {
    relay: Arc<Relay<L>>,
    key: PublicKey,
    network: Arc<str>,
    serial: u64,
}

impl<L: Link> std::fmt::Debug for Route<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("key", &self.key)
            .field("network", &self.network)
            .field("serial", &self.serial)
            .finish()
    }
}

impl<L: Link> Drop for Route<L> {
    fn drop(&mut self) {
        self.relay.unregister(&self.key, &self.network, self.serial);
    }
}

/// One session as a source of frames: its node's key and network, and its byte cap.
#[derive(Debug)]
pub struct Source {
    key: PublicKey,
    network: Arc<str>,
    bucket: TokenBucket,
}

impl<L: Link> Relay<L> {
    /// A relay that lets each node send `rate` bytes per second (burst: [`burst_for`]).
    pub fn new(rate: u64) -> Self {
        Relay {
            routes: RwLock::new(HashMap::new()),
            counters: Counters::default(),
            rate,
        }
    }

    /// Routes frames for `key` in `network` to `link`, for the session attached with `serial`
    /// (the hub's, which grows with each attach): a route of a newer session stays.
    pub fn register(
        self: &Arc<Self>,
        key: PublicKey,
        network: &str,
        serial: u64,
        link: L,
    ) -> Route<L> {
        let network: Arc<str> = network.into();
        {
            let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
            let entries = routes.entry(key).or_default();
            match entries.iter_mut().find(|e| e.network == network) {
                Some(e) if e.serial > serial => {}
                Some(e) => {
                    e.serial = serial;
                    e.link = link;
                }
                None => entries.push(Entry {
                    network: network.clone(),
                    serial,
                    link,
                }),
            }
        }
        Route {
            relay: self.clone(),
            key,
            network,
            serial,
        }
    }

    fn unregister(&self, key: &PublicKey, network: &str, serial: u64) {
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        if let Some(entries) = routes.get_mut(key) {
            entries.retain(|e| !(&*e.network == network && e.serial == serial));
            if entries.is_empty() {
                routes.remove(key);
            }
        }
    }

    /// The source state of a session of `key` in `network`, with a full bucket at `now`.
    pub fn source(&self, key: PublicKey, network: &str, now: Instant) -> Source {
        Source {
            key,
            network: network.into(),
            bucket: TokenBucket::per_second(self.rate, burst_for(self.rate), now),
        }
    }

    /// Counts a datagram that arrived before its connection's hello was accepted (dropped).
    pub fn count_unauthenticated(&self) {
        self.counters
            .unauthenticated
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Relays one frame from `source`, or drops it and counts why.
    ///
    /// # Errors
    /// Why the frame was dropped (already counted).
    pub fn forward(
        &self,
        source: &mut Source,
        frame: Vec<u8>,
        now: Instant,
    ) -> Result<(), Dropped> {
        let result = self.route(source, frame, now);
        let c = &self.counters;
        let counter = match result {
            Ok(len) => {
                c.bytes.fetch_add(len as u64, Ordering::Relaxed);
                &c.frames
            }
            Err(Dropped::RateLimited) => &c.rate_limited,
            Err(Dropped::Malformed) => &c.malformed,
            Err(Dropped::NoRoute) => &c.no_route,
            Err(Dropped::OtherNetwork) => &c.other_network,
            Err(Dropped::TooLarge) => &c.too_large,
            Err(Dropped::Unsupported) => &c.unsupported,
            Err(Dropped::Congested) => &c.congested,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        result.map(drop)
    }

    /// Sends `frame` on its way; its length when sent.
    fn route(
        &self,
        source: &mut Source,
        mut frame: Vec<u8>,
        now: Instant,
    ) -> Result<usize, Dropped> {
        let len = frame.len();
        if !source.bucket.take(now, len as u64) {
            return Err(Dropped::RateLimited);
        }
        let (header, _) = relay::parse(&frame).map_err(|_| Dropped::Malformed)?;
        if header.peer == source.key {
            return Err(Dropped::NoRoute);
        }
        let link = {
            let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
            let entries = routes.get(&header.peer).ok_or(Dropped::NoRoute)?;
            entries
                .iter()
                .find(|e| e.network == source.network)
                .ok_or(Dropped::OtherNetwork)?
                .link
                .clone()
        };
        let max = link.max_datagram_size().ok_or(Dropped::Unsupported)?;
        if len > max {
            return Err(Dropped::TooLarge);
        }
        // Dropping the new frame, rather than letting quinn drop the oldest queued ones,
        // keeps what a slow destination already has in flight in order.
        if link.send_buffer_space() < len {
            return Err(Dropped::Congested);
        }
        relay::readdress(&mut frame, &source.key).map_err(|_| Dropped::Malformed)?;
        if link.send(frame) {
            Ok(len)
        } else {
            Err(Dropped::NoRoute)
        }
    }

    /// The counters now.
    pub fn stats(&self) -> RelayStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RelayStats {
            frames: get(&c.frames),
            bytes: get(&c.bytes),
            unauthenticated: get(&c.unauthenticated),
            rate_limited: get(&c.rate_limited),
            malformed: get(&c.malformed),
            no_route: get(&c.no_route),
            other_network: get(&c.other_network),
            too_large: get(&c.too_large),
            unsupported: get(&c.unsupported),
            congested: get(&c.congested),
        }
    }

    /// Nodes with a route (for tests and status).
    pub fn routes(&self) -> usize {
        self.routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(Vec::len)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use meshlink_proto::relay::{frames, parse, HEADER_LEN};

    use super::*;

    /// A connection that keeps what it was sent.
    #[derive(Clone, Default)]
    struct FakeLink {
        sent: Arc<Mutex<Vec<Vec<u8>>>>,
        max: Option<usize>,
        space: usize,
    }

    impl FakeLink {
        fn new() -> Self {
            FakeLink {
                max: Some(1200),
                space: 1 << 20,
                ..FakeLink::default()
            }
        }

        fn sent(&self) -> Vec<Vec<u8>> {
            self.sent.lock().unwrap().clone()
        }
    }

    impl Link for FakeLink {
        fn max_datagram_size(&self) -> Option<usize> {
            self.max
        }

        fn send_buffer_space(&self) -> usize {
            self.space
        }

        fn send(&self, datagram: Vec<u8>) -> bool {
            self.sent.lock().unwrap().push(datagram);
            true
        }
    }

    fn key(n: u8) -> PublicKey {
        PublicKey([n; 32])
    }

    fn frame(to: u8, payload: &[u8]) -> Vec<u8> {
        frames(&key(to), 7, payload, 1200).unwrap().remove(0)
    }

    #[test]
    fn a_frame_reaches_its_destination_with_the_source_key() {
        let relay = Arc::new(Relay::<FakeLink>::new(DEFAULT_RATE));
        let now = Instant::now();
        let b = FakeLink::new();
        let _a_route = relay.register(key(1), "prod", 1, FakeLink::new());
        let _b_route = relay.register(key(2), "prod", 2, b.clone());
        let mut a = relay.source(key(1), "prod", now);
        assert_eq!(relay.forward(&mut a, frame(2, b"wireguard"), now), Ok(()));
        let sent = b.sent();
        assert_eq!(sent.len(), 1);
        let (h, payload) = parse(&sent[0]).unwrap();
        assert_eq!((h.peer, h.id, payload), (key(1), 7, &b"wireguard"[..]));
        let stats = relay.stats();
        assert_eq!((stats.frames, stats.bytes), (1, (HEADER_LEN + 9) as u64));
    }

    #[test]
    fn frames_go_nowhere_outside_the_network() {
        let relay = Arc::new(Relay::<FakeLink>::new(DEFAULT_RATE));
        let now = Instant::now();
        let other = FakeLink::new();
        let _r = relay.register(key(3), "staging", 1, other.clone());
        let _me = relay.register(key(1), "prod", 2, FakeLink::new());
        let mut a = relay.source(key(1), "prod", now);
        assert_eq!(
            relay.forward(&mut a, frame(3, b"x"), now),
            Err(Dropped::OtherNetwork)
        );
        assert_eq!(
            relay.forward(&mut a, frame(9, b"x"), now),
            Err(Dropped::NoRoute)
        );
        assert_eq!(
            relay.forward(&mut a, frame(1, b"x"), now),
            Err(Dropped::NoRoute),
            "not to itself"
        );
        assert_eq!(
            relay.forward(&mut a, vec![0; 10], now),
            Err(Dropped::Malformed)
        );
        assert!(other.sent().is_empty());
        let s = relay.stats();
        assert_eq!(
            (s.frames, s.other_network, s.no_route, s.malformed),
            (0, 1, 2, 1)
        );
    }

    #[test]
    fn a_newer_session_keeps_its_route_when_the_older_ends() {
        let relay = Arc::new(Relay::<FakeLink>::new(DEFAULT_RATE));
        let now = Instant::now();
        let (old, new) = (FakeLink::new(), FakeLink::new());
        let old_route = relay.register(key(2), "prod", 5, old.clone());
        let new_route = relay.register(key(2), "prod", 6, new.clone());
        // A late registration of an older session changes nothing.
        let stale = relay.register(key(2), "prod", 4, FakeLink::new());
        drop(stale);
        drop(old_route);
        assert_eq!(relay.routes(), 1);
        let mut a = relay.source(key(1), "prod", now);
        assert_eq!(relay.forward(&mut a, frame(2, b"x"), now), Ok(()));
        assert_eq!((old.sent().len(), new.sent().len()), (0, 1));
        drop(new_route);
        assert_eq!(relay.routes(), 0);
        assert_eq!(
            relay.forward(&mut a, frame(2, b"x"), now),
            Err(Dropped::NoRoute)
        );
    }

    #[test]
    fn one_key_in_two_networks_has_two_routes() {
        let relay = Arc::new(Relay::<FakeLink>::new(DEFAULT_RATE));
        let now = Instant::now();
        let (prod, staging) = (FakeLink::new(), FakeLink::new());
        let _p = relay.register(key(2), "prod", 1, prod.clone());
        let _s = relay.register(key(2), "staging", 2, staging.clone());
        let mut a = relay.source(key(1), "staging", now);
        assert_eq!(relay.forward(&mut a, frame(2, b"x"), now), Ok(()));
        assert_eq!((prod.sent().len(), staging.sent().len()), (0, 1));
    }

    #[test]
    fn size_room_and_rate_are_checked() {
        let relay = Arc::new(Relay::<FakeLink>::new(200_000));
        let now = Instant::now();
        let small = FakeLink {
            max: Some(HEADER_LEN + 10),
            ..FakeLink::new()
        };
        let full = FakeLink {
            space: 20,
            ..FakeLink::new()
        };
        let none = FakeLink {
            max: None,
            ..FakeLink::new()
        };
        let _s = relay.register(key(2), "prod", 1, small.clone());
        let _f = relay.register(key(3), "prod", 2, full.clone());
        let _n = relay.register(key(4), "prod", 3, none.clone());
        let mut a = relay.source(key(1), "prod", now);
        assert_eq!(relay.forward(&mut a, frame(2, &[0; 10]), now), Ok(()));
        assert_eq!(
            relay.forward(&mut a, frame(2, &[0; 11]), now),
            Err(Dropped::TooLarge)
        );
        assert_eq!(
            relay.forward(&mut a, frame(3, &[0; 100]), now),
            Err(Dropped::Congested)
        );
        assert_eq!(
            relay.forward(&mut a, frame(4, &[0; 100]), now),
            Err(Dropped::Unsupported)
        );
        // The burst (64 KiB at this rate), then the rate: 200 kB/s.
        let big = HEADER_LEN + 1000;
        let mut b = relay.source(key(5), "prod", now);
        let _big = relay.register(key(6), "prod", 4, FakeLink::new());
        let first = (0..200)
            .filter(|_| relay.forward(&mut b, frame(6, &[0; 1000]), now).is_ok())
            .count();
        assert_eq!(first, (MIN_BURST as usize) / big);
        let later = now + Duration::from_millis(100);
        let more = (0..200)
            .filter(|_| relay.forward(&mut b, frame(6, &[0; 1000]), later).is_ok())
            .count();
        assert!((19..=21).contains(&more), "{more}");
        assert!(relay.stats().rate_limited > 0);
    }
}
