//! The forwarding core of every relay: WireGuard datagrams between two nodes of one network
//! that cannot reach each other directly ([`meshlink_proto::relay`] frames), as QUIC datagrams
//! beside a session's stream or as relay records of a TLS/TCP stream
//! ([`meshlink_proto::control::Record::Relay`]). The coordinator's embedded relay (its agents'
//! control sessions) and the standalone `meshlink-relay` ([`crate::server`]) both forward
//! through a [`Relay`]; only who may register a route differs (an accepted hello there, a
//! verified ticket here: [`crate::ticket`]).
//!
//! Pipeline of one frame (a session loop reads it from the source's connection, once the
//! source is accepted):
//!
//! ```text
//! Relay::forward(source, frame)
//!   ─> the source's byte cap (token bucket)        over: dropped, rate_limited
//!   ─> parse the header: the destination's key      malformed
//!   ─> the destination's route in the source's network, else in the relay it also delivers
//!      through (a coordinator's other one: Relay::also_deliver_through)
//!                                                   none: no_route; only in another: other_network
//!   ─> fits the destination's max_datagram_size     unsupported: it takes no datagrams
//!        or is a whole datagram (count 1), cut into at most MAX_FRAGMENTS frames that fit
//!                                                   else: too_large
//!   ─> room in the destination's send buffer        congested
//!   ─> readdress with the source's key ─> the destination's link (a QUIC datagram, or a
//!      record queued to the TLS/TCP session's writer)
//! ```
//!
//! A TLS/TCP agent sends whole WireGuard datagrams (count 1, up to ~1,500 bytes: a stream has
//! no datagram size); a QUIC destination takes ~1,150 bytes, so the relay cuts such a frame
//! with the sender's id and the destination's agent puts it back together, as it does for a
//! QUIC sender's fragments. Fragments pass to a TLS/TCP destination as they are.
//!
//! # Security
//!
//! Not an open relay: only an accepted session is a source, and a frame goes only to a node
//! of the source's own network with a live session on this relay. The receiver learns the
//! source from the key the relay wrote, never from the sender. The relay carries WireGuard
//! ciphertext it cannot read, which the receiving peer authenticates again. Each source is
//! capped in bytes per second, and the destinations' queues are bounded ([`STREAM_SEND_BUFFER`],
//! quinn's datagram buffers), so a fast source cannot make the relay queue without bound; a
//! drop is counted, never logged per frame.
//!
//! Architecture invariant: a node (a key in a network) has at most
//! [`MAX_SESSIONS_PER_NODE`] sessions here, the current one and the one replacing it (make
//! before break); frames for it go to the newest ([`Relay::register`] orders them by serial),
//! a third closes the oldest ([`Route::displaced`]), and all of them draw on one byte cap,
//! so sessions multiply neither a node's share of the relay nor its rate. A session is removed
//! only by itself ([`Route`] on drop), so an older session's end cannot remove a newer one's
//! route.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::Instant;

use meshlink_proto::control::MAX_RELAY_RECORD;
use meshlink_proto::relay;
use meshlink_proto::PublicKey;
use tokio::sync::{mpsc, watch};

use crate::ratelimit::TokenBucket;

/// The default cap on what one node may send through the relay: 25 MB/s (200 Mbit/s).
pub const DEFAULT_RATE: u64 = 25_000_000;
/// The least burst a source is allowed, so that a frame of any size passes a low cap.
const MIN_BURST: u64 = 64 * 1024;
/// The most sessions one node (a key in a network) has on a relay at once: the current one and
/// the one that replaces it. A newer one closes the oldest ([`Route::displaced`]).
pub const MAX_SESSIONS_PER_NODE: usize = 2;

/// The burst allowed at `rate` bytes per second: a tenth of a second's worth, at least 64 KiB.
pub fn burst_for(rate: u64) -> u64 {
    (rate / 10).max(MIN_BURST)
}

/// A destination's connection, as the relay uses it. Implemented by [`quinn::Connection`],
/// [`StreamLink`] and [`SessionLink`] (either); a test puts a fake in its place.
pub trait Link: Clone + Send + Sync + 'static {
    /// The largest datagram the connection takes now; `None`: the peer takes none.
    fn max_datagram_size(&self) -> Option<usize>;
    /// Bytes free in the connection's datagram send buffer.
    fn send_buffer_space(&self) -> usize;
    /// Queues `datagram`.
    ///
    /// # Errors
    /// Why it was not queued: [`Dropped::NoRoute`] when the connection is gone,
    /// [`Dropped::Congested`] when its buffer is full, [`Dropped::TooLarge`],
    /// [`Dropped::Unsupported`].
    fn send(&self, datagram: Vec<u8>) -> Result<(), Dropped>;
}

impl Link for quinn::Connection {
    fn max_datagram_size(&self) -> Option<usize> {
        quinn::Connection::max_datagram_size(self)
    }

    fn send_buffer_space(&self) -> usize {
        self.datagram_send_buffer_space()
    }

    fn send(&self, datagram: Vec<u8>) -> Result<(), Dropped> {
        use quinn::SendDatagramError as E;
        self.send_datagram(datagram.into()).map_err(|e| match e {
            E::TooLarge => Dropped::TooLarge,
            E::UnsupportedByPeer | E::Disabled => Dropped::Unsupported,
            E::ConnectionLost(_) => Dropped::NoRoute,
        })
    }
}

/// Bytes of QUIC datagrams queued to one connection and not yet sent (beyond it the relay
/// drops new frames: `congested`). At 100 Mbit/s, 20 ms of queue.
pub const DATAGRAM_SEND_BUFFER: usize = 256 * 1024;
/// Bytes of QUIC datagrams received on one connection and not yet read by its session (quinn
/// drops the oldest beyond it). About 100 relay frames: the session reads them as they come.
pub const DATAGRAM_RECEIVE_BUFFER: usize = 128 * 1024;
/// Bytes of relay frames queued to one TLS/TCP session and not yet taken by its writer (beyond
/// it new frames are dropped: `congested`): the bound of a QUIC connection's datagram buffer.
pub const STREAM_SEND_BUFFER: usize = DATAGRAM_SEND_BUFFER;

/// The relay's end of a session whose frames travel as records of its stream (TLS/TCP): a
/// queue that the session's writer drains ([`StreamQueue`]), bounded in bytes
/// ([`STREAM_SEND_BUFFER`]). Made by [`stream_link`].
#[derive(Debug, Clone)]
pub struct StreamLink {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    queued: Arc<AtomicUsize>,
}

/// The session's end of a [`StreamLink`]: the frames to write to its stream, oldest first.
#[derive(Debug)]
pub struct StreamQueue {
    rx: mpsc::UnboundedReceiver<Vec<u8>>,
    queued: Arc<AtomicUsize>,
}

/// A queue of relay frames for one stream session: the relay's end and the writer's end.
pub fn stream_link() -> (StreamLink, StreamQueue) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    (
        StreamLink {
            tx,
            queued: queued.clone(),
        },
        StreamQueue { rx, queued },
    )
}

impl Link for StreamLink {
    /// A record takes a whole WireGuard datagram: no fragments are needed on a stream.
    fn max_datagram_size(&self) -> Option<usize> {
        Some(MAX_RELAY_RECORD)
    }

    fn send_buffer_space(&self) -> usize {
        STREAM_SEND_BUFFER.saturating_sub(self.queued.load(Ordering::Acquire))
    }

    fn send(&self, frame: Vec<u8>) -> Result<(), Dropped> {
        let len = frame.len();
        // Reserved before queuing, so that sources racing each other cannot pass the bound.
        let before = self.queued.fetch_add(len, Ordering::AcqRel);
        if before + len > STREAM_SEND_BUFFER {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            return Err(Dropped::Congested);
        }
        self.tx.send(frame).map_err(|_| {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            Dropped::NoRoute
        })
    }
}

impl StreamQueue {
    /// The next frame to write; `None` once every [`StreamLink`] is gone. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Vec<u8>> {
        let frame = self.rx.recv().await?;
        self.queued.fetch_sub(frame.len(), Ordering::AcqRel);
        Some(frame)
    }

    /// The next frame if one is queued now.
    pub fn try_recv(&mut self) -> Option<Vec<u8>> {
        let frame = self.rx.try_recv().ok()?;
        self.queued.fetch_sub(frame.len(), Ordering::AcqRel);
        Some(frame)
    }
}

/// A session's connection, QUIC or TLS/TCP: what the relay's routes hold.
#[derive(Debug, Clone)]
pub enum SessionLink {
    /// QUIC datagrams on the session's connection.
    Quic(quinn::Connection),
    /// Relay records on the session's TLS/TCP stream.
    Stream(StreamLink),
}

impl Link for SessionLink {
    fn max_datagram_size(&self) -> Option<usize> {
        match self {
            SessionLink::Quic(c) => Link::max_datagram_size(c),
            SessionLink::Stream(s) => s.max_datagram_size(),
        }
    }

    fn send_buffer_space(&self) -> usize {
        match self {
            SessionLink::Quic(c) => c.send_buffer_space(),
            SessionLink::Stream(s) => s.send_buffer_space(),
        }
    }

    fn send(&self, datagram: Vec<u8>) -> Result<(), Dropped> {
        match self {
            SessionLink::Quic(c) => Link::send(c, datagram),
            SessionLink::Stream(s) => s.send(datagram),
        }
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
    /// Larger than the destination's connection takes, and not a whole datagram that could be
    /// cut into at most [`relay::MAX_FRAGMENTS`] frames that fit.
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
    /// Frames delivered to a destination's connection (a frame cut to fit counts once).
    pub frames: u64,
    /// Their bytes, as received.
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

impl std::ops::Add for RelayStats {
    type Output = RelayStats;

    /// Both relays' counts together (a coordinator's two: its control sessions' and its relay
    /// sessions').
    fn add(self, o: RelayStats) -> RelayStats {
        RelayStats {
            frames: self.frames + o.frames,
            bytes: self.bytes + o.bytes,
            unauthenticated: self.unauthenticated + o.unauthenticated,
            rate_limited: self.rate_limited + o.rate_limited,
            malformed: self.malformed + o.malformed,
            no_route: self.no_route + o.no_route,
            other_network: self.other_network + o.other_network,
            too_large: self.too_large + o.too_large,
            unsupported: self.unsupported + o.unsupported,
            congested: self.congested + o.congested,
        }
    }
}

impl RelayStats {
    /// The frames dropped, by reason, named as `GET /v1/status` and the metrics name them.
    pub fn dropped(&self) -> [(&'static str, u64); 8] {
        [
            ("unauthenticated", self.unauthenticated),
            ("rate_limited", self.rate_limited),
            ("malformed", self.malformed),
            ("no_route", self.no_route),
            ("other_network", self.other_network),
            ("too_large", self.too_large),
            ("unsupported", self.unsupported),
            ("congested", self.congested),
        ]
    }
}

/// Sessions registered with a [`Relay`] of [`SessionLink`]s, by transport.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionsByTransport {
    /// Over QUIC.
    pub quic: usize,
    /// Over TLS/TCP.
    pub tcp: usize,
}

/// One session of a node.
#[derive(Debug)]
struct Session<L> {
    serial: u64,
    link: L,
    /// Told `true` when a newer session pushed this one out.
    displaced: watch::Sender<bool>,
}

/// A node's place: its sessions, oldest first (frames go to the last), and its byte cap,
/// which every one of its sessions draws on.
#[derive(Debug)]
struct Entry<L> {
    network: Arc<str>,
    sessions: Vec<Session<L>>,
    bucket: Arc<Mutex<TokenBucket>>,
}

impl<L> Entry<L> {
    /// The link of the newest session.
    fn link(&self) -> Option<&L> {
        self.sessions.last().map(|s| &s.link)
    }
}

/// The relay: every node with a session here, by key, and the counters. One per process (a
/// coordinator or a `meshlink-relay`), shared by every session.
pub struct Relay<L: Link = SessionLink> {
    /// Usually one entry per key; several only when one key is a node in several networks.
    routes: RwLock<HashMap<PublicKey, Vec<Entry<L>>>>,
    counters: Counters,
    rate: u64,
    /// Where a destination with no session here is looked up too
    /// ([`Relay::also_deliver_through`]).
    also: OnceLock<Weak<Relay<L>>>,
}

impl<L: Link> std::fmt::Debug for Relay<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("rate", &self.rate)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// One session's place in the relay: while it lives and is its node's newest, frames for its
/// node go to its connection. Dropping it removes the session (the node's other session, if
/// any, then gets the frames).
#[must_use = "the route is removed when this is dropped"]
pub struct Route<L: Link = SessionLink> {
    relay: Arc<Relay<L>>,
    key: PublicKey,
    network: Arc<str>,
    serial: u64,
    displaced: watch::Receiver<bool>,
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

impl<L: Link> Route<L> {
    /// Ready once newer sessions of the node pushed this one out (more than
    /// [`MAX_SESSIONS_PER_NODE`]): it gets no frames any more and should be closed, so that
    /// its agent sees it go. Pending for as long as it is not. Cancel-safe.
    pub async fn displaced(&self) {
        let mut rx = self.displaced.clone();
        if rx.wait_for(|d| *d).await.is_err() {
            // Removed without being displaced: only the route's own drop does that.
            std::future::pending::<()>().await;
        }
    }

    /// Whether newer sessions pushed this one out.
    pub fn is_displaced(&self) -> bool {
        *self.displaced.borrow()
    }
}

/// One session as a source of frames: its node's key and network, and its node's byte cap
/// (shared by the node's sessions).
#[derive(Debug)]
pub struct Source {
    key: PublicKey,
    network: Arc<str>,
    bucket: Arc<Mutex<TokenBucket>>,
}

impl Source {
    /// The node's key.
    pub fn key(&self) -> PublicKey {
        self.key
    }
}

impl<L: Link> Relay<L> {
    /// A relay that lets each node send `rate` bytes per second (burst: [`burst_for`]).
    pub fn new(rate: u64) -> Self {
        Relay {
            routes: RwLock::new(HashMap::new()),
            counters: Counters::default(),
            rate,
            also: OnceLock::new(),
        }
    }

    /// Frames for a node with no session here go to its session at `other` (in the source's
    /// network), once set; the first call counts. A coordinator of a mesh of several has two
    /// relays, its control sessions' and the relay sessions on its port (tickets), and a
    /// node may be at either: each delivers through the other, so that a frame never waits for
    /// both ends to be at the same one. One hop only: `other`'s own `also` is not followed.
    /// The frame is counted here, not at `other`; a node at both has one byte cap (the
    /// second relay it registers at takes the first one's).
    pub fn also_deliver_through(&self, other: &Arc<Relay<L>>) {
        let _ = self.also.set(Arc::downgrade(other));
    }

    /// Adds the session with `serial` (unique, growing with each session: the hub's attach
    /// serial, the standalone relay's count) of `key` in `network`, on `link`. Frames for the
    /// node go to its newest session; beyond [`MAX_SESSIONS_PER_NODE`] the oldest is pushed
    /// out and told so ([`Route::displaced`]): a late registration of an older session is
    /// itself the one pushed out.
    pub fn register(
        self: &Arc<Self>,
        key: PublicKey,
        network: &str,
        serial: u64,
        link: L,
    ) -> Route<L> {
        let network: Arc<str> = network.into();
        let (displaced, rx) = watch::channel(false);
        // One byte cap per node over both relays it may be at. Looked up before this relay's
        // lock is taken: the other relay registers under its own lock and may look here.
        let shared = self
            .also
            .get()
            .and_then(Weak::upgrade)
            .and_then(|other| other.bucket_of(&key, &network));
        {
            let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
            let entries = routes.entry(key).or_default();
            let at = match entries.iter().position(|e| e.network == network) {
                Some(at) => at,
                None => {
                    entries.push(Entry {
                        network: network.clone(),
                        sessions: Vec::with_capacity(MAX_SESSIONS_PER_NODE + 1),
                        bucket: shared.unwrap_or_else(|| self.fresh_bucket(Instant::now())),
                    });
                    entries.len() - 1
                }
            };
            let sessions = &mut entries[at].sessions;
            let place = sessions.partition_point(|s| s.serial < serial);
            sessions.insert(
                place,
                Session {
                    serial,
                    link,
                    displaced,
                },
            );
            while sessions.len() > MAX_SESSIONS_PER_NODE {
                let oldest = sessions.remove(0);
                oldest.displaced.send_replace(true);
            }
        }
        Route {
            relay: self.clone(),
            key,
            network,
            serial,
            displaced: rx,
        }
    }

    fn unregister(&self, key: &PublicKey, network: &str, serial: u64) {
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        if let Some(entries) = routes.get_mut(key) {
            for e in entries.iter_mut().filter(|e| &*e.network == network) {
                e.sessions.retain(|s| s.serial != serial);
            }
            entries.retain(|e| !e.sessions.is_empty());
            if entries.is_empty() {
                routes.remove(key);
            }
        }
    }

    /// The source state of a session of `key` in `network`: the node's byte cap, shared with
    /// its other sessions (a fresh full one at `now` when it has none registered).
    pub fn source(&self, key: PublicKey, network: &str, now: Instant) -> Source {
        Source {
            key,
            network: network.into(),
            bucket: self
                .bucket_of(&key, network)
                .unwrap_or_else(|| self.fresh_bucket(now)),
        }
    }

    /// A node's byte cap, full at `now`.
    fn fresh_bucket(&self, now: Instant) -> Arc<Mutex<TokenBucket>> {
        Arc::new(Mutex::new(TokenBucket::per_second(
            self.rate,
            burst_for(self.rate),
            now,
        )))
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
        let allowed = source
            .bucket
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(now, len as u64);
        if !allowed {
            return Err(Dropped::RateLimited);
        }
        let (header, payload) = relay::parse(&frame).map_err(|_| Dropped::Malformed)?;
        if header.peer == source.key {
            return Err(Dropped::NoRoute);
        }
        let link = match self.link_to(&header.peer, &source.network) {
            // Not here in the source's network (or not here at all): maybe at the other
            // relay; the reason stays this relay's when it is not there either.
            Err(here @ (Dropped::NoRoute | Dropped::OtherNetwork)) => {
                match self.also.get().and_then(Weak::upgrade) {
                    Some(other) => match other.link_to(&header.peer, &source.network) {
                        Ok(link) => link,
                        Err(Dropped::NoRoute) => return Err(here),
                        Err(there) => return Err(there),
                    },
                    None => return Err(here),
                }
            }
            found => found?,
        };
        let max = link.max_datagram_size().ok_or(Dropped::Unsupported)?;
        if len <= max {
            // Dropping the new frame, rather than letting quinn drop the oldest queued ones,
            // keeps what a slow destination already has in flight in order.
            if link.send_buffer_space() < len {
                return Err(Dropped::Congested);
            }
            relay::readdress(&mut frame, &source.key).map_err(|_| Dropped::Malformed)?;
            return link.send(frame).map(|()| len);
        }
        // A whole datagram from a stream session, for a destination of smaller datagrams:
        // cut with the sender's id (the receiver reassembles by source key and id), the
        // pieces addressed from the source.
        if header.count != 1 {
            return Err(Dropped::TooLarge);
        }
        let pieces =
            relay::frames(&source.key, header.id, payload, max).map_err(|_| Dropped::TooLarge)?;
        let total: usize = pieces.iter().map(Vec::len).sum();
        if link.send_buffer_space() < total {
            return Err(Dropped::Congested);
        }
        for piece in pieces {
            link.send(piece)?;
        }
        Ok(len)
    }

    /// The byte cap of `key`'s sessions in `network`, when it has any here.
    fn bucket_of(&self, key: &PublicKey, network: &str) -> Option<Arc<Mutex<TokenBucket>>> {
        self.routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)?
            .iter()
            .find(|e| &*e.network == network)
            .map(|e| e.bucket.clone())
    }

    /// Pushes out every session of a node `keep` refuses (by key and network): its routes go
    /// at once, and each session is told as if displaced ([`Route::displaced`]), so that it
    /// ends. A coordinator so ends the relay sessions of nodes revoked or deleted since their
    /// tickets were issued. Returns how many nodes were pushed out.
    pub fn push_out(&self, keep: impl Fn(&PublicKey, &str) -> bool) -> usize {
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        let mut pushed = 0;
        routes.retain(|key, entries| {
            entries.retain(|e| {
                let kept = keep(key, &e.network);
                if !kept {
                    pushed += 1;
                    for session in &e.sessions {
                        session.displaced.send_replace(true);
                    }
                }
                kept
            });
            !entries.is_empty()
        });
        pushed
    }

    /// The link of `peer`'s newest session in `network`.
    fn link_to(&self, peer: &PublicKey, network: &str) -> Result<L, Dropped> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        let entries = routes.get(peer).ok_or(Dropped::NoRoute)?;
        Ok(entries
            .iter()
            .find(|e| &*e.network == network)
            .ok_or(Dropped::OtherNetwork)?
            .link()
            .ok_or(Dropped::NoRoute)?
            .clone())
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

    /// Sessions registered, over every node (for tests and status).
    pub fn sessions(&self) -> usize {
        self.routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .flatten()
            .map(|e| e.sessions.len())
            .sum()
    }
}

impl Relay<SessionLink> {
    /// Sessions registered, by the transport of their connection (for the metrics).
    pub fn sessions_by_transport(&self) -> SessionsByTransport {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        let mut counts = SessionsByTransport::default();
        for session in routes.values().flatten().flat_map(|e| &e.sessions) {
            match session.link {
                SessionLink::Quic(_) => counts.quic += 1,
                SessionLink::Stream(_) => counts.tcp += 1,
            }
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use meshlink_proto::relay::{frames, parse, Reassembler, HEADER_LEN, MAX_FRAGMENTS};

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

        fn send(&self, datagram: Vec<u8>) -> Result<(), Dropped> {
            self.sent.lock().unwrap().push(datagram);
            Ok(())
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

    /// A node with no session at the source's relay is reached at the relay it also delivers
    /// through, in the source's network only, one hop only; the frame counts at the first.
    #[test]
    fn a_frame_for_a_node_at_the_other_relay_goes_there() {
        let control = Arc::new(Relay::<FakeLink>::new(DEFAULT_RATE));
        let tickets = Arc::new(Relay::<FakeLink>::new(DEFAULT_RATE));
        let third = Arc::new(Relay::<FakeLink>::new(DEFAULT_RATE));
        let now = Instant::now();
        let (a, b, c, far) = (
            FakeLink::new(),
            FakeLink::new(),
            FakeLink::new(),
            FakeLink::new(),
        );
        let _a = control.register(key(1), "prod", 1, a.clone());
        let _b = tickets.register(key(2), "prod", 1, b.clone());
        let _c = tickets.register(key(3), "staging", 2, c.clone());
        let _far = third.register(key(4), "prod", 1, far.clone());
        let mut from_a = control.source(key(1), "prod", now);
        assert_eq!(
            control.forward(&mut from_a, frame(2, b"x"), now),
            Err(Dropped::NoRoute),
            "not before it is told to"
        );
        control.also_deliver_through(&tickets);
        tickets.also_deliver_through(&control);
        tickets.also_deliver_through(&third);
        assert_eq!(control.forward(&mut from_a, frame(2, b"x"), now), Ok(()));
        let got = b.sent();
        assert_eq!(got.len(), 1);
        assert_eq!(parse(&got[0]).unwrap().0.peer, key(1));
        // And back: B at the ticket relay reaches A at the control relay.
        let mut from_b = tickets.source(key(2), "prod", now);
        assert_eq!(tickets.forward(&mut from_b, frame(1, b"y"), now), Ok(()));
        assert_eq!(a.sent().len(), 1);
        assert_eq!(
            control.forward(&mut from_a, frame(3, b"x"), now),
            Err(Dropped::OtherNetwork)
        );
        // The ticket relay delivers through the control relay (the first call counts), and
        // the control relay's own `also` is not followed from there.
        assert_eq!(
            control.forward(&mut from_a, frame(4, b"x"), now),
            Err(Dropped::NoRoute)
        );
        assert!(c.sent().is_empty() && far.sent().is_empty());
        assert_eq!((control.stats().frames, tickets.stats().frames), (1, 1));
    }

    /// A key at the source's relay in another network only is still found in the source's
    /// network at the other relay.
    #[test]
    fn a_node_of_two_networks_is_found_in_the_right_one() {
        let control = Arc::new(Relay::<FakeLink>::new(DEFAULT_RATE));
        let tickets = Arc::new(Relay::<FakeLink>::new(DEFAULT_RATE));
        control.also_deliver_through(&tickets);
        let now = Instant::now();
        let (staging, prod) = (FakeLink::new(), FakeLink::new());
        let _a = control.register(key(1), "prod", 1, FakeLink::new());
        let _s = control.register(key(9), "staging", 2, staging.clone());
        let _p = tickets.register(key(9), "prod", 1, prod.clone());
        let mut from_a = control.source(key(1), "prod", now);
        assert_eq!(control.forward(&mut from_a, frame(9, b"x"), now), Ok(()));
        assert_eq!((prod.sent().len(), staging.sent().len()), (1, 0));
        drop(_p);
        assert_eq!(
            control.forward(&mut from_a, frame(9, b"x"), now),
            Err(Dropped::OtherNetwork),
            "this relay's reason when the other has it nowhere"
        );
    }

    /// A node at both relays has one byte cap: what it sends through one is taken from what it
    /// may send through the other.
    #[test]
    fn a_node_at_both_relays_has_one_byte_cap() {
        let control = Arc::new(Relay::<FakeLink>::new(100_000));
        let tickets = Arc::new(Relay::<FakeLink>::new(100_000));
        control.also_deliver_through(&tickets);
        tickets.also_deliver_through(&control);
        let now = Instant::now();
        let _a1 = control.register(key(1), "prod", 1, FakeLink::new());
        let _a2 = tickets.register(key(1), "prod", 1, FakeLink::new());
        let _b = control.register(key(2), "prod", 2, FakeLink::new());
        let mut via_control = control.source(key(1), "prod", now);
        let mut via_tickets = tickets.source(key(1), "prod", now);
        let payload = vec![0u8; 1000];
        let mut sent = 0;
        for i in 0..400 {
            let (relay, source) = if i % 2 == 0 {
                (&control, &mut via_control)
            } else {
                (&tickets, &mut via_tickets)
            };
            if relay.forward(source, frame(2, &payload), now).is_ok() {
                sent += 1;
            }
        }
        let one_cap = burst_for(100_000) / (1000 + HEADER_LEN as u64);
        assert!(
            sent <= one_cap + 1,
            "{sent} frames passed in one instant; one cap allows {one_cap}"
        );
    }

    /// A node registering at both relays at once (its control session and its relay session
    /// at one coordinator) never leaves the two waiting for each other's lock.
    #[test]
    fn registrations_at_both_relays_at_once_never_deadlock() {
        let a = Arc::new(Relay::<FakeLink>::new(DEFAULT_RATE));
        let b = Arc::new(Relay::<FakeLink>::new(DEFAULT_RATE));
        a.also_deliver_through(&b);
        b.also_deliver_through(&a);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let barrier = Arc::new(std::sync::Barrier::new(2));
        for relay in [a, b] {
            let (done, barrier) = (done_tx.clone(), barrier.clone());
            std::thread::spawn(move || {
                for n in 0..20_000u32 {
                    if n % 64 == 0 {
                        barrier.wait();
                    }
                    let mut k = [0u8; 32];
                    k[..4].copy_from_slice(&n.to_be_bytes());
                    drop(relay.register(PublicKey(k), "prod", 1, FakeLink::new()));
                }
                let _ = done.send(());
            });
        }
        for _ in 0..2 {
            done_rx
                .recv_timeout(Duration::from_secs(30))
                .expect("both registration loops end (no deadlock)");
        }
    }

    /// Pushing out a node ends its sessions' routes and tells them; others stay.
    #[test]
    fn pushed_out_nodes_lose_their_routes() {
        let relay = Arc::new(Relay::<FakeLink>::new(DEFAULT_RATE));
        let now = Instant::now();
        let gone = relay.register(key(1), "prod", 1, FakeLink::new());
        let stays = relay.register(key(2), "prod", 2, FakeLink::new());
        assert_eq!(relay.push_out(|k, net| *k != key(1) && net == "prod"), 1);
        assert!(gone.is_displaced() && !stays.is_displaced());
        let mut from_b = relay.source(key(2), "prod", now);
        assert_eq!(
            relay.forward(&mut from_b, frame(1, b"x"), now),
            Err(Dropped::NoRoute)
        );
        assert_eq!(relay.routes(), 1);
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

    /// A node keeps at most two sessions (make before break): a third pushes out the oldest,
    /// which is told so and gets no frames; a thief's or an old session's end leaves the
    /// newest's route; and every session of the node draws on one byte cap.
    #[test]
    fn a_node_holds_two_sessions_and_one_rate() {
        let relay = Arc::new(Relay::<FakeLink>::new(200_000));
        let now = Instant::now();
        let links = [FakeLink::new(), FakeLink::new(), FakeLink::new()];
        let first = relay.register(key(2), "prod", 1, links[0].clone());
        let second = relay.register(key(2), "prod", 2, links[1].clone());
        assert!(!first.is_displaced());
        assert_eq!((relay.routes(), relay.sessions()), (1, 2));
        let third = relay.register(key(2), "prod", 3, links[2].clone());
        assert!(first.is_displaced(), "the oldest is pushed out");
        assert!(!second.is_displaced() && !third.is_displaced());
        assert_eq!(relay.sessions(), 2);
        let mut a = relay.source(key(1), "prod", now);
        assert_eq!(relay.forward(&mut a, frame(2, b"x"), now), Ok(()));
        assert_eq!(
            links.iter().map(|l| l.sent().len()).collect::<Vec<_>>(),
            [0, 0, 1]
        );
        // The pushed-out session's end removes nothing; the newest's end leaves the other.
        drop(first);
        drop(third);
        assert_eq!(relay.forward(&mut a, frame(2, b"y"), now), Ok(()));
        assert_eq!(links[1].sent().len(), 1);

        // One bucket for the node: a second session adds no rate.
        let _b = relay.register(key(5), "prod", 10, FakeLink::new());
        let _b2 = relay.register(key(5), "prod", 11, FakeLink::new());
        let mut s1 = relay.source(key(5), "prod", now);
        let mut s2 = relay.source(key(5), "prod", now);
        let sent = |s: &mut Source| {
            (0..200)
                .filter(|_| relay.forward(s, frame(2, &[0; 1000]), now).is_ok())
                .count()
        };
        let burst = (MIN_BURST as usize) / (HEADER_LEN + 1000);
        assert_eq!(sent(&mut s1), burst);
        assert_eq!(
            sent(&mut s2),
            0,
            "the burst is the node's, not the session's"
        );
        drop(second);
    }

    /// The displacement is awaitable: a session loop ends on it.
    #[tokio::test]
    async fn a_displaced_session_is_woken() {
        let relay = Arc::new(Relay::<FakeLink>::new(DEFAULT_RATE));
        let old = relay.register(key(2), "prod", 1, FakeLink::new());
        let _a = relay.register(key(2), "prod", 2, FakeLink::new());
        let waiting = tokio::time::timeout(Duration::from_millis(50), old.displaced()).await;
        assert!(waiting.is_err(), "not displaced yet");
        let _b = relay.register(key(2), "prod", 3, FakeLink::new());
        tokio::time::timeout(Duration::from_secs(1), old.displaced())
            .await
            .expect("woken once displaced");
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
        // A fragment is never cut again; a whole datagram is, into at most MAX_FRAGMENTS.
        let fragment = frames(&key(2), 8, &[0; 22], HEADER_LEN + 11)
            .unwrap()
            .remove(0);
        assert_eq!(relay.forward(&mut a, fragment, now), Err(Dropped::TooLarge));
        assert_eq!(
            relay.forward(&mut a, frame(2, &[0; 10 * MAX_FRAGMENTS + 1]), now),
            Err(Dropped::TooLarge)
        );
        assert_eq!(small.sent().len(), 1);
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

    /// A whole datagram from a stream session reaches a QUIC destination cut to its size,
    /// with the sender's id, and is put back together there.
    #[test]
    fn a_whole_datagram_is_cut_for_a_smaller_destination() {
        let relay = Arc::new(Relay::<FakeLink>::new(DEFAULT_RATE));
        let now = Instant::now();
        let quic = FakeLink {
            max: Some(1150),
            ..FakeLink::new()
        };
        let _q = relay.register(key(2), "prod", 1, quic.clone());
        let mut a = relay.source(key(1), "prod", now);
        let wg: Vec<u8> = (0..1452u32).map(|i| i as u8).collect();
        let whole = frames(&key(2), 77, &wg, MAX_RELAY_RECORD)
            .unwrap()
            .remove(0);
        assert_eq!(relay.forward(&mut a, whole, now), Ok(()));
        let sent = quic.sent();
        assert_eq!(sent.len(), 2);
        assert!(sent.iter().all(|f| f.len() <= 1150));
        let mut r = Reassembler::new();
        let mut got = None;
        for f in &sent {
            let (h, bytes) = parse(f).unwrap();
            assert_eq!((h.peer, h.id, h.count), (key(1), 77, 2));
            got = got.or(r.push(h, bytes, now));
        }
        assert_eq!(got, Some((key(1), wg)));
        let s = relay.stats();
        assert_eq!((s.frames, s.bytes), (1, (HEADER_LEN + 1452) as u64));
        // No room for every piece: none is sent.
        let tight = FakeLink {
            max: Some(1150),
            space: 1200,
            ..FakeLink::new()
        };
        let _t = relay.register(key(3), "prod", 2, tight.clone());
        let whole = frames(&key(3), 78, &[0; 1452], MAX_RELAY_RECORD)
            .unwrap()
            .remove(0);
        assert_eq!(relay.forward(&mut a, whole, now), Err(Dropped::Congested));
        assert!(tight.sent().is_empty());
    }

    /// A stream session's queue is bounded in bytes, and its frames come out in order.
    #[tokio::test]
    async fn a_stream_link_is_a_bounded_queue() {
        let (link, mut queue) = stream_link();
        assert_eq!(link.max_datagram_size(), Some(MAX_RELAY_RECORD));
        let frame = vec![1u8; 60_000];
        let fits = STREAM_SEND_BUFFER / frame.len();
        for _ in 0..fits {
            assert_eq!(link.send(frame.clone()), Ok(()));
        }
        assert!(link.send_buffer_space() < frame.len());
        assert_eq!(link.send(frame.clone()), Err(Dropped::Congested));
        assert_eq!(queue.recv().await.map(|f| f.len()), Some(60_000));
        assert_eq!(link.send(vec![2; 10]), Ok(()));
        for _ in 1..fits {
            assert!(queue.try_recv().is_some());
        }
        assert_eq!(queue.try_recv(), Some(vec![2; 10]));
        assert_eq!(link.send_buffer_space(), STREAM_SEND_BUFFER);
        drop(queue);
        assert_eq!(link.send(vec![3; 10]), Err(Dropped::NoRoute));
    }
}
