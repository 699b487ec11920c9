//! The data plane's core: peers, cryptokey routing and the WireGuard sessions, with no I/O.
//!
//! Pipeline:
//!
//! ```text
//!  TUN read batch ──> Device::outbound ──> allowed-IPs lookup (dst) ──> flow noted (policy) ──> peer.encapsulate ──> NetBatch ──> UDP (GSO)
//!  UDP read batch ──> Device::inbound  ──> peer by receiver index / handshake ──> decapsulate
//!                                          ──> allowed-IPs check (src) ──> roam endpoint
//!                                          ──> firewall (destination, policy; see `firewall`) ──> TunBatch ──> TUN (GRO)
//!                                          ──> (an awaited workload address) policy ──> kept back (see `handover`)
//!  TUN read, dst awaited or held here and no peer routing it ──> kept back (this host's)
//!  address held and up ──> Device::take_released, a batch at a time ──> firewall ──> TunBatch ──> TUN
//!  every 250 ms   ──> Device::handle_timeout ──> handshake retries, rekeys, keepalives ──> NetBatch
//! ```
//!
//! The I/O loops in `crate::run` own the sockets and call in here one batch at a time. The
//! `Device` is shared by those loops: the peer table sits behind a read-write lock that the
//! loops take once per batch, and each peer's session behind its own mutex, so the send and
//! receive paths run on different cores.
//!
//! Architecture invariant: nothing here touches a socket, a file or the clock; the WireGuard
//! engine keeps its own timers (see `noise`), and the connection table counts time from what
//! the timer loop tells it ([`Device::set_time`]).
//!
//! Key aliases (a peer that rotates its key, see [`Device::set_key_aliases`]): the peer's next
//! key is a peer of its own, with no allowed IPs, that stands for the same node. Inbound, a
//! packet authenticated under either key passes the source check against the node's allowed
//! IPs (cryptokey routing keeps one owner per prefix: the key in use). Outbound, a packet
//! routed to the key in use goes to whichever of the two last completed a handshake, so the
//! node can switch keys at any moment: its first handshake under the new key moves the
//! traffic over, and a TCP connection sees at most the few packets sent to the old session
//! in between, which it retransmits.

pub mod allowed_ips;
pub mod batch;
pub mod conntrack;
pub mod firewall;
pub mod gateway;
pub mod handover;
pub mod noise;
pub mod status;
mod talkers;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard};
use std::time::{Duration, SystemTime};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, TunnResult};
use boringtun::x25519;
use meshlink_proto::PublicKey;

use crate::settings::{DeviceConfig, PeerConfig};
pub use allowed_ips::AllowedIps;
pub use batch::{NetBatch, TunBatch};
use conntrack::Conntrack;
use firewall::{Check, Firewall, Memo};
pub use firewall::{CompiledPolicy, FirewallConfig, FirewallCounters, Verdict};
use gateway::Gateway;
pub use gateway::GatewayConfig;
use handover::{HandoverLimits, HandoverQueues, Outcome};
pub use noise::{BoringNoise, Noise, NoiseError, NoiseOutput};
use status::{DeviceStatus, DropCounts, FirewallStatus, HandoverStatus, PeerStatus};

/// Handshake initiations per second the device accepts before it asks for cookies.
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// WireGuard overhead on a data packet: header (16) and tag (16); plaintext is padded to 16.
const DATA_OVERHEAD: usize = 32 + 16;
/// WireGuard's transport data message type (the first byte of the datagram).
const DATA_MESSAGE: u8 = 4;
/// WireGuard's handshake initiation message type.
const HANDSHAKE_INIT: u8 = 1;
/// WireGuard's handshake response message type.
const HANDSHAKE_RESPONSE: u8 = 2;
/// The bytes of a data message before its ciphertext: type, reserved, receiver, counter.
const DATA_HEADER: usize = 16;
/// The smallest buffer boringtun accepts for output (a handshake initiation).
const MIN_OUT: usize = 148;
/// This host's packets for an address that went elsewhere sent on per
/// [`Device::take_released`] call at most, so that the receive loop's datagram batch stays
/// about the size it has.
const SEND_ON_BATCH: usize = 8;
/// A handshake older than this leaves no session (WireGuard's REJECT_AFTER_TIME).
const NO_SESSION_AFTER: std::time::Duration = std::time::Duration::from_secs(180);

/// Drops the device counts before any peer is known.
#[derive(Debug, Default)]
pub struct DeviceDrops {
    /// Outbound packets whose destination no peer's allowed IPs hold.
    pub no_route: AtomicU64,
    /// Outbound packets for a peer with no known endpoint.
    pub no_endpoint: AtomicU64,
    /// Inbound datagrams that name no peer of ours, or fail the handshake MAC.
    pub unknown_peer: AtomicU64,
    /// Outbound packets that are not IPv4 or IPv6.
    pub malformed: AtomicU64,
    /// Outbound packets from this host whose source is the address of an external node this
    /// node is the gateway of: only the device itself may send as it (see `gateway`).
    pub foreign_source: AtomicU64,
    /// Not a drop: packets for a released workload address sent on to its new holder.
    pub forwarded: AtomicU64,
    /// Not a drop: packets from or to an external node this node is the gateway of, sent on
    /// (see `gateway`).
    pub gatewayed: AtomicU64,
}

/// One peer: its session and where it is.
pub struct Peer {
    /// The peer's public key.
    pub key: PublicKey,
    index: u32,
    state: Mutex<PeerState>,
}

struct PeerState {
    noise: Box<dyn Noise>,
    endpoint: Option<SocketAddr>,
    config: PeerConfig,
    rx_bytes: u64,
    tx_bytes: u64,
    /// Authenticated datagrams received from the peer (those counted in `rx_bytes`).
    rx_packets: u64,
    /// Datagrams sent to the peer (those counted in `tx_bytes`).
    tx_packets: u64,
    /// Handshakes completed with the peer: responses to our initiations, and initiations
    /// of the peer's that we answered.
    handshakes: u64,
    drops: DropCounts,
    /// Send a keepalive at the next timer tick: set for new peers with a persistent keepalive,
    /// so that a restarted node announces itself (and its new endpoint) at once, as WireGuard
    /// does when a keepalive interval is configured.
    kick: bool,
    /// Start a handshake at the next timer tick: the configured endpoint changed (a path was
    /// found) while the peer has no session, so the handshake pending towards the old
    /// endpoint is sent again at once rather than after its 5 s retry.
    rehandshake: bool,
    /// The workload addresses held here that the peer sent to lately ([`Device::talkers`]).
    talked: talkers::Talked,
}

impl PeerState {
    /// Runs `op` on the session with `room` bytes of `net`; the datagram it makes goes to the
    /// peer's endpoint (counted in `tx_bytes`), or nowhere when it has none. Returns whether one
    /// was queued.
    fn emit(
        &mut self,
        net: &mut NetBatch,
        room: usize,
        op: impl for<'a> FnOnce(&mut dyn Noise, &'a mut [u8]) -> NoiseOutput<'a>,
    ) -> bool {
        let space = net.space(room);
        if let NoiseOutput::Network(out) = op(self.noise.as_mut(), space) {
            let n = out.len();
            if let Some(ep) = self.endpoint {
                self.tx_bytes += n as u64;
                self.tx_packets += 1;
                net.commit(ep, n);
                return true;
            }
        }
        false
    }

    /// Encrypts an IP packet for this peer into `net`; without an endpoint the packet is
    /// dropped, counted in `drops`, and `false` returned.
    #[inline]
    fn seal(&mut self, packet: &[u8], net: &mut NetBatch, drops: &DeviceDrops) -> bool {
        if self.endpoint.is_none() {
            drops.no_endpoint.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        self.emit(
            net,
            (packet.len() + DATA_OVERHEAD).max(MIN_OUT),
            |noise, out| noise.encapsulate(packet, out),
        );
        true
    }
}

impl Peer {
    fn lock(&self) -> MutexGuard<'_, PeerState> {
        // A panic while holding a peer lock is a bug, but the data must stay usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How workload addresses bend cryptokey routing (see `crate::workloads`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkloadRouting {
    /// Addresses this node released in a move, and the new holder: a packet that still
    /// arrives here for one of them is sent on to the new holder instead of the TUN device.
    pub forward: HashMap<IpAddr, PublicKey>,
    /// Inner source addresses also accepted from these peers, beyond their allowed IPs: a
    /// workload address from its holder, and for a move's grace period from its previous
    /// holder, whose answers written before it saw the move are still on their way (see
    /// `meshlink_proto::workload::Holdings::senders`).
    pub also_from: HashMap<IpAddr, Vec<PublicKey>>,
    /// Workload addresses held here (or being prepared), and the one peer that may relay
    /// packets of other senders to each: the previous holder, which forwards what peers still
    /// send it after a move (the packets keep their senders' addresses), for the move's grace
    /// period only (see `meshlink_proto::workload::Holdings::relays`).
    pub relay_from: HashMap<IpAddr, PublicKey>,
    /// The inner sources a relayed packet may carry: the node addresses of the network's other
    /// nodes. Never a prefix a peer routes for others (a LAN behind it) or a workload address:
    /// a relay cannot speak for those.
    pub relay_sources: HashSet<IpAddr>,
    /// Workload addresses this node is about to answer for and may not yet (the coordinator
    /// has not confirmed the handover, or a move here is being prepared; see
    /// `meshlink_proto::workload::Holdings::awaited`): what arrives for them is kept back,
    /// in order, a bounded time (see `handover`), never delivered before they are held. So
    /// is what this node's own host sends them once no peer routes them (the map names this
    /// node); while the map still routes them to their holder (a move here being prepared)
    /// that goes to the holder.
    pub awaited: HashSet<IpAddr>,
    /// Workload addresses this node answers for. A packet for one that arrives before the
    /// address is up on the interface ([`Device::set_addresses_up`]) is kept back too, and
    /// delivered once it is: the kernel would drop it.
    pub held: HashSet<IpAddr>,
    /// Every workload address of the map: a packet for one that this node neither holds,
    /// awaits nor forwards is counted (`HandoverStatus::not_held`) as well as `not_local`.
    pub workloads: HashSet<IpAddr>,
}

struct Table {
    config: DeviceConfig,
    workloads: WorkloadRouting,
    firewall: Firewall,
    gateway: Gateway,
    public: x25519::PublicKey,
    /// Counts and limits handshake messages, device-wide (`find_sender`).
    limiter: Arc<RateLimiter>,
    /// Checks them again in each session, without counting (see [`new_verifier`]).
    verifier: Arc<RateLimiter>,
    peers: HashMap<PublicKey, Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>>,
    routes: AllowedIps<Arc<Peer>>,
    next_index: u32,
    /// Next keys of peers that rotate (an alias) -> the key they use now (see
    /// [`Device::set_key_aliases`]).
    aliases: HashMap<PublicKey, PublicKey>,
    /// For each peer whose alias is configured too: its key in use -> the alias's peer.
    alias_peers: HashMap<PublicKey, Arc<Peer>>,
    /// Workload addresses up on the interface ([`Device::set_addresses_up`]).
    up: HashSet<IpAddr>,
    /// The destinations whose packets are kept back now: awaited addresses, held ones not up
    /// yet, and held ones whose kept packets are not delivered yet (so that nothing overtakes
    /// them). See [`Device::settle`].
    waiting: HashSet<IpAddr>,
    /// This node's own addresses on the interface ([`Device::set_own_addresses`]): never an
    /// inner source a peer may send from (but a workload address, from its senders).
    own_addresses: Vec<IpAddr>,
}

impl Table {
    /// Pairs each configured alias with its peer; call when peers or aliases change.
    fn pair_aliases(&mut self) {
        self.alias_peers = self
            .aliases
            .iter()
            .filter(|(_, primary)| self.peers.contains_key(*primary))
            .filter_map(|(alias, primary)| Some((*primary, self.peers.get(alias)?.clone())))
            .collect();
    }

    /// The key that names the node `peer` is: its own, or for an alias the key in use.
    #[inline]
    fn identity<'a>(&'a self, peer: &'a Peer) -> &'a PublicKey {
        if self.aliases.is_empty() {
            return &peer.key;
        }
        self.aliases.get(&peer.key).unwrap_or(&peer.key)
    }

    /// Where a packet routed to `peer` goes: `peer`, or its alias once the alias has the newer
    /// handshake (the node switched to its next key).
    #[inline]
    fn sender<'a>(&'a self, peer: &'a Arc<Peer>) -> &'a Arc<Peer> {
        if self.alias_peers.is_empty() {
            return peer;
        }
        match self.alias_peers.get(&peer.key) {
            Some(alias) => {
                let alias_age = alias.lock().noise.time_since_last_handshake();
                let own_age = peer.lock().noise.time_since_last_handshake();
                match (alias_age, own_age) {
                    (Some(a), Some(o)) if a < o => alias,
                    (Some(_), None) => alias,
                    _ => peer,
                }
            }
            None => peer,
        }
    }
}

/// The data plane of one interface. See the module documentation.
pub struct Device {
    table: RwLock<Table>,
    drops: DeviceDrops,
    /// The connection table, made when a policy first takes effect (a device that never
    /// has one spends no memory on it); it outlives firewall changes.
    flows: OnceLock<Conntrack>,
    /// The gateway's connection table (see `gateway`), made when it first serves an external
    /// node under a policy.
    gateway_flows: OnceLock<Conntrack>,
    flow_capacity: usize,
    flow_seed: u64,
    /// The time as the timer loop last told it, in milliseconds ([`Device::set_time`]).
    clock_ms: AtomicU64,
    firewall_counters: FirewallCounters,
    /// Packets kept back for awaited workload addresses (see `handover`). Lock order: the
    /// table, a peer, then this.
    handover: Mutex<HandoverQueues>,
    /// Packets for a workload address neither held, awaited nor forwarded here.
    not_held: AtomicU64,
    /// The send path kept back a packet of this host's since [`Device::take_kept_from_host`]
    /// was last asked.
    kept_from_host: AtomicBool,
}

/// Makes a WireGuard session; tests may substitute their own engine.
pub type NoiseFactory = dyn Fn(&x25519::StaticSecret, &PeerConfig, u32, Arc<RateLimiter>) -> Box<dyn Noise>
    + Send
    + Sync;

fn boring_factory(
    private: &x25519::StaticSecret,
    peer: &PeerConfig,
    index: u32,
    limiter: Arc<RateLimiter>,
) -> Box<dyn Noise> {
    Box::new(BoringNoise::new(
        private.clone(),
        x25519::PublicKey::from(peer.public_key.0),
        peer.preshared_key.map(|k| k.0),
        peer.persistent_keepalive.filter(|k| *k > 0),
        index,
        limiter,
    ))
}

fn new_limiter(public: &x25519::PublicKey) -> Arc<RateLimiter> {
    Arc::new(RateLimiter::new(public, HANDSHAKE_RATE_LIMIT))
}

/// What the sessions check handshake messages with: the device's MAC1 key, and no limit. The
/// device's limiter has counted (and, under load, answered with a cookie) each message in
/// `find_sender` already; a session checking it against that same limiter again would count
/// it twice, halving the rate before cookies.
fn new_verifier(public: &x25519::PublicKey) -> Arc<RateLimiter> {
    Arc::new(RateLimiter::new(public, u64::MAX))
}

/// Whether a decrypted packet should reach the TUN device without waiting for the rest of its
/// receive batch: anything but TCP (pings, DNS, real-time UDP). Bulk TCP is what fills large
/// batches; a packet of another kind decrypted early in one would otherwise wait for all of
/// them. Writing it at once (with what came before it) keeps every flow in order.
#[inline]
fn is_urgent(packet: &[u8]) -> bool {
    const TCP: u8 = 6;
    match packet.first().map(|b| b >> 4) {
        Some(4) => packet.get(9).is_some_and(|p| *p != TCP),
        Some(6) => packet.get(6).is_some_and(|p| *p != TCP),
        _ => false,
    }
}

/// The source address of an IP packet, if it is one.
#[inline]
fn source(packet: &[u8]) -> Option<IpAddr> {
    header_address(packet, 12, 8)
}

/// The destination address of an IP packet, if it is one.
#[inline]
fn destination(packet: &[u8]) -> Option<IpAddr> {
    header_address(packet, 16, 24)
}

/// The address at byte `v4` of an IPv4 header or `v6` of an IPv6 one, if `packet` is either.
#[inline]
fn header_address(packet: &[u8], v4: usize, v6: usize) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 if packet.len() >= 20 => {
            let b: [u8; 4] = packet[v4..v4 + 4].try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(b)))
        }
        6 if packet.len() >= 40 => {
            let b: [u8; 16] = packet[v6..v6 + 16].try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

impl Device {
    /// A device with `config`'s key and peers. `index_seed` varies the session indexes between
    /// runs (pass something random in production, anything in tests).
    pub fn new(config: DeviceConfig, index_seed: u32) -> Self {
        Device::with_flow_capacity(config, index_seed, conntrack::DEFAULT_CAPACITY)
    }

    /// A device whose connection table holds at most `flow_capacity` flows (when a policy
    /// makes it). `index_seed` also keys the table's hash.
    pub fn with_flow_capacity(config: DeviceConfig, index_seed: u32, flow_capacity: usize) -> Self {
        let public = x25519::PublicKey::from(&config.private_key.0);
        let table = Table {
            public,
            limiter: new_limiter(&public),
            verifier: new_verifier(&public),
            config: DeviceConfig {
                peers: Vec::new(),
                ..config.clone()
            },
            workloads: WorkloadRouting::default(),
            firewall: Firewall::default(),
            gateway: Gateway::default(),
            peers: HashMap::new(),
            by_index: HashMap::new(),
            routes: AllowedIps::new(),
            next_index: index_seed & 0x00ff_ffff,
            aliases: HashMap::new(),
            alias_peers: HashMap::new(),
            up: HashSet::new(),
            waiting: HashSet::new(),
            own_addresses: Vec::new(),
        };
        let device = Device {
            table: RwLock::new(table),
            drops: DeviceDrops::default(),
            flows: OnceLock::new(),
            gateway_flows: OnceLock::new(),
            flow_capacity,
            flow_seed: u64::from(index_seed).wrapping_mul(0x9e37_79b9_7f4a_7c15)
                ^ u64::from(index_seed.rotate_left(16)),
            clock_ms: AtomicU64::new(0),
            firewall_counters: FirewallCounters::default(),
            handover: Mutex::new(HandoverQueues::new(HandoverLimits::default())),
            not_held: AtomicU64::new(0),
            kept_from_host: AtomicBool::new(false),
        };
        device.set_config(config);
        device
    }

    fn read(&self) -> RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The current configuration (peers' endpoints as configured, not as roamed).
    pub fn config(&self) -> DeviceConfig {
        self.read().config.clone()
    }

    /// Device-wide drop counters.
    pub fn drops(&self) -> &DeviceDrops {
        &self.drops
    }

    /// Brings the device to `new`, touching only what differs: a peer whose key, preshared key
    /// and keepalive are unchanged keeps its session; its endpoint changes only if the
    /// configured endpoint changed; allowed IPs are rebuilt. An allowed IP claimed by two peers
    /// goes to the later one, as in WireGuard.
    pub fn set_config(&self, mut new: DeviceConfig) {
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        let key_changed = t.config.private_key != new.private_key;
        if key_changed {
            t.public = x25519::PublicKey::from(&new.private_key.0);
            t.limiter = new_limiter(&t.public);
            t.verifier = new_verifier(&t.public);
        }
        // Later peers win contested prefixes; drop the prefix from the earlier holder.
        let mut owner: HashMap<ipnet::IpNet, usize> = HashMap::new();
        for (i, p) in new.peers.iter_mut().enumerate() {
            for net in p.allowed_ips.iter_mut() {
                *net = net.trunc();
            }
            p.allowed_ips.dedup();
            for net in &p.allowed_ips {
                owner.insert(*net, i);
            }
        }
        for (i, p) in new.peers.iter_mut().enumerate() {
            p.allowed_ips.retain(|n| owner.get(n) == Some(&i));
        }

        let mut peers = HashMap::with_capacity(new.peers.len());
        let mut by_index = HashMap::with_capacity(new.peers.len());
        let mut routes = AllowedIps::new();
        for pc in &new.peers {
            let keep = t.peers.get(&pc.public_key).filter(|old| {
                let s = old.lock();
                !key_changed
                    && s.config.preshared_key == pc.preshared_key
                    && s.config.persistent_keepalive == pc.persistent_keepalive
            });
            let peer = match keep {
                Some(old) => {
                    let mut s = old.lock();
                    if s.config.endpoint != pc.endpoint && pc.endpoint.is_some() {
                        s.endpoint = pc.endpoint;
                        s.rehandshake = s
                            .noise
                            .time_since_last_handshake()
                            .is_none_or(|d| d >= NO_SESSION_AFTER);
                    }
                    s.config = pc.clone();
                    drop(s);
                    old.clone()
                }
                None => {
                    let index = loop {
                        t.next_index = (t.next_index + 1) & 0x00ff_ffff;
                        let i = t.next_index;
                        if !t.by_index.contains_key(&i) && !by_index.contains_key(&i) {
                            break i;
                        }
                    };
                    // A replaced session keeps the endpoint it had learned.
                    let endpoint = pc
                        .endpoint
                        .or_else(|| t.peers.get(&pc.public_key).and_then(|o| o.lock().endpoint));
                    let noise = boring_factory(&new.private_key.0, pc, index, t.verifier.clone());
                    Arc::new(Peer {
                        key: pc.public_key,
                        index,
                        state: Mutex::new(PeerState {
                            noise,
                            endpoint,
                            config: pc.clone(),
                            rx_bytes: 0,
                            tx_bytes: 0,
                            rx_packets: 0,
                            tx_packets: 0,
                            handshakes: 0,
                            drops: DropCounts::default(),
                            kick: pc.persistent_keepalive.is_some_and(|k| k > 0),
                            rehandshake: false,
                            talked: talkers::Talked::default(),
                        }),
                    })
                }
            };
            for net in &pc.allowed_ips {
                routes.insert(*net, peer.clone());
            }
            by_index.insert(peer.index, peer.clone());
            peers.insert(pc.public_key, peer);
        }
        t.peers = peers;
        t.by_index = by_index;
        t.routes = routes;
        t.config = new;
        t.pair_aliases();
    }

    /// Sets which peers stand for the same node as another: `next key -> key in use`, for
    /// peers that rotate their key (both configured as peers, the next key with no allowed
    /// IPs). Set it before the configuration that adds the alias peers; an alias whose peers
    /// are not both configured does nothing. See the module documentation.
    pub fn set_key_aliases(&self, aliases: HashMap<PublicKey, PublicKey>) {
        if self.read().aliases == aliases {
            return;
        }
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        t.aliases = aliases;
        t.pair_aliases();
    }

    /// Sets this node's own addresses (every local address of the host: those on its
    /// interface, its workload addresses up here, the host's other interfaces'; see
    /// `crate::run`, which reads them again every few seconds). No peer may send from one,
    /// whatever its allowed IPs cover (a peer routed `0.0.0.0/0`, say): what passes the
    /// source check is never taken for this host's own traffic, which the kernel accepts from
    /// the TUN device on a mesh node (see `crate::platform::sysctl`). A workload address up
    /// here is the one exception, from the nodes the fencing state lets send from it
    /// ([`WorkloadRouting::also_from`]).
    pub fn set_own_addresses(&self, addresses: impl IntoIterator<Item = IpAddr>) {
        let mut own: Vec<IpAddr> = addresses.into_iter().collect();
        own.sort();
        own.dedup();
        if self.read().own_addresses == own {
            return;
        }
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        t.own_addresses = own;
    }

    /// Sets how workload addresses are forwarded, accepted and kept back; peers and sessions
    /// stay. Packets kept back for an address that is now neither awaited nor held are
    /// dropped (`abandoned`), but for this host's own, which [`Device::take_released`] sends
    /// on by the routes; those of an address now held and up wait for
    /// [`Device::take_released`] (see [`Device::has_released`]), and so does what arrives
    /// for it until they are all taken.
    pub fn set_workload_routing(&self, routing: WorkloadRouting) {
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        if t.workloads != routing {
            t.workloads = routing;
            self.settle(&mut t);
        }
    }

    /// Tells the data plane which workload addresses are up on the interface (all of them):
    /// kept packets of a held address wait until it is, since the kernel drops packets to an
    /// address it does not have. Call after each change of the interface's addresses, then
    /// [`Device::take_released`].
    /// Whether the workload address `address` is on the interface (the kernel has it).
    pub fn is_up(&self, address: IpAddr) -> bool {
        self.table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .up
            .contains(&address)
    }

    /// Records the workload addresses now on the interface (see [`Device::is_up`]).
    pub fn set_addresses_up(&self, up: impl IntoIterator<Item = IpAddr>) {
        let up: HashSet<IpAddr> = up.into_iter().collect();
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        if t.up != up {
            t.up = up;
            self.settle(&mut t);
        }
    }

    fn handover(&self) -> MutexGuard<'_, HandoverQueues> {
        self.handover.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `dst`, whose packets are kept back, may be answered now: held, up, and not
    /// awaited again.
    fn releasable(t: &Table, dst: IpAddr) -> bool {
        t.workloads.held.contains(&dst)
            && t.up.contains(&dst)
            && !t.workloads.awaited.contains(&dst)
    }

    /// Drops what is kept for addresses no longer awaited nor held, and works out which
    /// destinations are kept back from now on.
    fn settle(&self, t: &mut Table) {
        let mut q = self.handover();
        let gone: Vec<IpAddr> = q
            .addresses()
            .filter(|a| !t.workloads.awaited.contains(a) && !t.workloads.held.contains(a))
            .collect();
        for a in gone {
            q.discard(a);
        }
        let mut waiting: HashSet<IpAddr> = t.workloads.awaited.clone();
        waiting.extend(t.workloads.held.iter().filter(|a| !t.up.contains(a)));
        // Held and up, with packets kept: still kept back until they are delivered.
        waiting.extend(q.addresses());
        t.waiting = waiting;
    }

    /// Whether the send path kept back a packet of this host's since the last call (see
    /// `handover`): the sending loop then wakes the receive loop, which delivers it if its
    /// address may be answered already ([`Device::has_released`]).
    pub fn take_kept_from_host(&self) -> bool {
        self.kept_from_host.load(Ordering::Relaxed)
            && self.kept_from_host.swap(false, Ordering::Relaxed)
    }

    /// Whether [`Device::take_released`] has something to do: kept packets to deliver or (this
    /// host's, for an address that went elsewhere) to send on, or addresses whose kept
    /// packets were all taken to let go of.
    pub fn has_released(&self) -> bool {
        let t = self.read();
        let q = self.handover();
        q.has_ready()
            || q.has_unsent()
            || q.is_releasing()
            || q.queued().any(|a| Self::releasable(&t, a))
    }

    /// Moves packets kept back for addresses that may be answered now (held and up) to `tun`,
    /// in arrival order, through the firewall as if they arrived now: at most as many as
    /// `tun` has free slots (at least one), so that it never grows. Returns how many. This
    /// host's own packets for an address that went elsewhere are sent on by the routes into
    /// `net`.
    ///
    /// Call it until [`Device::has_released`] is false, writing `tun` to the TUN device
    /// between calls (the call after the last packets were taken finds nothing left and lets
    /// the addresses go). Until then what arrives for those addresses is kept back behind
    /// the packets released, so nothing overtakes them however the caller's writes and
    /// receives interleave; the agent makes them in its receive loop, between two receive
    /// batches (`crate::run`). The table is held for writing only to move the queues, the
    /// firewall runs under the read lock.
    pub fn take_released(&self, tun: &mut TunBatch, net: &mut NetBatch) -> usize {
        self.send_on(net);
        let now = self.now();
        {
            let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
            let mut q = self.handover();
            // The caller wrote what the previous call took.
            let finished = q.finish();
            let ready: Vec<IpAddr> = q.queued().filter(|a| Self::releasable(&t, *a)).collect();
            for a in &ready {
                q.release(*a, now);
            }
            drop(q);
            if finished || !ready.is_empty() {
                self.settle(&mut t);
            }
        }
        let t = self.read();
        let mut memo = Memo::default();
        let mut n = 0;
        for _ in 0..tun.free().max(1) {
            let Some((sender, packet)) = self.handover().pop_ready() else {
                break;
            };
            let dst = destination(&packet);
            let verdict = if sender == handover::HOST {
                // This host's own: the policy speaks of what peers send. Delivered only while
                // its address may still be answered here.
                match dst {
                    Some(d) if Self::releasable(&t, d) => Verdict::Pass,
                    _ => Verdict::NotLocal,
                }
            } else {
                self.admit(&t, &packet, dst, Check::Full, &mut memo)
            };
            let outcome = match verdict {
                Verdict::Pass => {
                    tun.push_copy(&packet);
                    n += 1;
                    Outcome::Released
                }
                Verdict::Denied => Outcome::Denied,
                Verdict::NotLocal => Outcome::NotLocal,
            };
            self.handover().count(outcome);
        }
        n
    }

    /// Sends this host's packets kept back for addresses that went elsewhere by the routes
    /// (see `handover`), [`SEND_ON_BATCH`] at most: what a peer routes now is sealed into
    /// `net`; what is kept back here again waits again.
    fn send_on(&self, net: &mut NetBatch) {
        let mut unsent = Vec::new();
        {
            let mut q = self.handover();
            while unsent.len() < SEND_ON_BATCH {
                let Some(p) = q.pop_unsent() else {
                    break;
                };
                unsent.push(p);
            }
        }
        if !unsent.is_empty() {
            self.outbound_batch(unsent.iter().map(Vec::as_slice), net);
        }
    }

    /// The firewall's verdict on a decrypted packet to `dst` (see `firewall`); nothing to
    /// check when the firewall enforces nothing `check` asks for.
    #[inline]
    fn admit(
        &self,
        t: &Table,
        packet: &[u8],
        dst: Option<IpAddr>,
        check: Check,
        memo: &mut Memo,
    ) -> Verdict {
        let nothing = match check {
            Check::Full => t.firewall.is_open(),
            Check::Policy => !t.firewall.has_policy(),
        };
        if nothing {
            return Verdict::Pass;
        }
        t.firewall.inbound(
            packet,
            dst,
            check,
            self.flows.get(),
            self.now(),
            &self.firewall_counters,
            memo,
        )
    }

    /// Where packets to workload addresses went at handovers (see `handover`).
    pub fn handover_status(&self) -> HandoverStatus {
        HandoverStatus {
            not_held: self.not_held.load(Ordering::Relaxed),
            ..self.handover().status()
        }
    }

    /// Sets what the firewall enforces (see `firewall`): the destination check and the
    /// policy. Peers, sessions and tracked flows stay; a new policy table (another `Arc`)
    /// makes every tracked flow be checked against it at its next packet, which cuts those it
    /// denies. The counts per rule carry over when the policy's version is the same.
    pub fn set_firewall(&self, config: FirewallConfig) {
        if self.read().firewall.is(&config) {
            // The reconciler sets it on every pass; the packet loops keep going.
            return;
        }
        if config.policy.is_some() {
            // Made outside the table's lock: it is the one large allocation here.
            self.flows
                .get_or_init(|| Conntrack::new(self.flow_capacity, self.flow_seed));
        }
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        t.firewall.set(config);
    }

    /// Sets which external nodes this node is the gateway of, and the policy for flows to
    /// them (see `gateway`). Their peers must be among the device's peers; their sessions and
    /// tracked flows stay.
    pub fn set_gateway(&self, config: GatewayConfig) {
        if self.read().gateway.is(&config) {
            return;
        }
        if config.policy.is_some() {
            self.gateway_flows.get_or_init(|| {
                Conntrack::new(gateway::GATEWAY_FLOWS, self.flow_seed.rotate_left(7))
            });
        }
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        t.gateway.set(config);
    }

    /// The next hop of a decrypted packet from `who` when this node is the gateway of the
    /// sender or of the destination (see `gateway`): `None` when it is neither (the packet
    /// goes its usual way), `Some(None)` when the policy denies it, else the peer to send it
    /// to.
    #[inline]
    fn through_gateway<'t>(
        &self,
        t: &'t Table,
        who: &PublicKey,
        packet: &[u8],
        dst: Option<IpAddr>,
    ) -> Option<Option<&'t Arc<Peer>>> {
        let dst = dst?;
        let to = t.routes.lookup(dst)?;
        if to.key == *who {
            return None;
        }
        if t.gateway.served.contains(&to.key) {
            // To an external node: its policy, checked here.
            return Some(self.served_admits(t, packet, dst).then_some(to));
        }
        if !t.gateway.served.contains(who) {
            return None;
        }
        // From an external node to another node: that node's agent checks it; the flow is
        // noted as the external node's, so that the answers pass.
        self.note_served_flow(t, packet);
        Some(Some(to))
    }

    /// Whether a gateway sends `packet`, from this host to `dst` (routed to `peer`): not with
    /// the source address of an external node it serves (a container or a LAN host behind
    /// this one would otherwise speak as the device to the whole mesh), and to one of them
    /// only as its policy allows (this host's programs and workloads included: the device has
    /// no firewall of its own).
    fn gateway_allows_out(&self, t: &Table, packet: &[u8], dst: IpAddr, peer: &Arc<Peer>) -> bool {
        if source(packet)
            .and_then(|s| t.routes.lookup(s))
            .is_some_and(|owner| t.gateway.served.contains(&owner.key))
        {
            self.drops.foreign_source.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        !t.gateway.served.contains(&peer.key) || self.served_admits(t, packet, dst)
    }

    /// Whether the policy of the served external node at `dst` lets `packet` reach it (a flow
    /// it opened, or a rule); recorded as a flow when it does (see `gateway`).
    fn served_admits(&self, t: &Table, packet: &[u8], dst: IpAddr) -> bool {
        t.gateway.firewall.inbound(
            packet,
            Some(dst),
            Check::Policy,
            self.gateway_flows.get(),
            self.now(),
            &self.firewall_counters,
            &mut Memo::default(),
        ) == Verdict::Pass
    }

    /// Notes a flow a served external node opened (to another peer or to this node itself) in
    /// the gateway's connection table, so that the answers to it pass `gateway_allows_out`
    /// and `through_gateway`.
    fn note_served_flow(&self, t: &Table, packet: &[u8]) {
        if let Some(flows) = self.gateway_flows.get() {
            t.gateway.firewall.outbound(
                packet,
                flows,
                self.now(),
                &self.firewall_counters,
                &mut Memo::default(),
            );
        }
    }

    /// Tells the data plane the time, from any fixed instant (the agent's start): the
    /// connection table's timeouts count by it. Also reclaims expired flows, a slice of the
    /// table at a time. Call from the timer loop (every 250 ms).
    pub fn set_time(&self, now: Duration) {
        self.clock_ms.store(
            u64::try_from(now.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.handover().expire(now);
        for flows in [self.flows.get(), self.gateway_flows.get()]
            .into_iter()
            .flatten()
        {
            // The whole table every 64 calls: 16 s at 4 calls a second.
            let buckets = (flows.capacity() / conntrack::WAYS).div_ceil(64);
            flows.expire(now, buckets);
        }
    }

    #[inline]
    fn now(&self) -> Duration {
        Duration::from_millis(self.clock_ms.load(Ordering::Relaxed))
    }

    /// The firewall's state and counters.
    pub fn firewall_status(&self) -> FirewallStatus {
        self.read()
            .firewall
            .status(self.flows.get(), &self.firewall_counters)
    }

    /// Starts a handshake with every peer (or every one of `only`, by key or by the key it
    /// is the next key of) that has an endpoint and no session younger than `fresh` (the
    /// datagrams go to `net`); returns how many were started. A node about to take over a
    /// workload address calls it so that its tunnels are up before the switch.
    pub fn warm(
        &self,
        fresh: std::time::Duration,
        only: Option<&HashSet<PublicKey>>,
        net: &mut NetBatch,
    ) -> usize {
        let t = self.read();
        let mut started = 0;
        for peer in t.peers.values() {
            if only.is_some_and(|keys| !keys.contains(t.identity(peer))) {
                continue;
            }
            let mut s = peer.lock();
            if s.endpoint.is_none()
                || s.noise
                    .time_since_last_handshake()
                    .is_some_and(|d| d < fresh)
            {
                continue;
            }
            if s.emit(net, MIN_OUT + 64, |noise, out| noise.start_handshake(out)) {
                started += 1;
            }
        }
        started
    }

    /// Whether every peer (of `only`, when given) that is likely alive has a session younger
    /// than `fresh`: peers with an endpoint and a handshake within `alive` (a peer silent for
    /// longer, or never heard from, may be gone, and is not waited for; [`Device::warm`]
    /// still reaches out to it).
    pub fn all_fresh(
        &self,
        fresh: std::time::Duration,
        alive: std::time::Duration,
        only: Option<&HashSet<PublicKey>>,
    ) -> bool {
        let t = self.read();
        t.peers.values().all(|p| {
            if only.is_some_and(|keys| !keys.contains(t.identity(p))) {
                return true;
            }
            let s = p.lock();
            match (s.endpoint, s.noise.time_since_last_handshake()) {
                (Some(_), Some(age)) if age < alive => age < fresh,
                _ => true,
            }
        })
    }

    /// The peers that sent to `address` (a workload address held here) within `within`, the
    /// most recent first, at most `max`; a peer's next key counts as the peer.
    pub fn talkers(
        &self,
        address: IpAddr,
        within: std::time::Duration,
        max: usize,
    ) -> Vec<PublicKey> {
        let t = self.read();
        let now = self.now();
        let mut recent: Vec<(std::time::Duration, PublicKey)> = t
            .peers
            .values()
            .filter_map(|p| {
                let ago = p.lock().talked.since(address, now)?;
                (ago <= within).then(|| (ago, *t.identity(p)))
            })
            .collect();
        recent.sort();
        let mut seen = HashSet::new();
        recent
            .into_iter()
            .map(|(_, key)| key)
            .filter(|key| seen.insert(*key))
            .take(max)
            .collect()
    }

    /// Encrypts one IP packet read from the TUN device into `net`, or drops it (counted).
    pub fn outbound(&self, packet: &[u8], net: &mut NetBatch) {
        self.outbound_batch(std::iter::once(packet), net);
    }

    /// Encrypts a batch of IP packets read from the TUN device into `net`, taking the peer
    /// table once for the whole batch.
    pub fn outbound_batch<'p>(
        &self,
        packets: impl IntoIterator<Item = &'p [u8]>,
        net: &mut NetBatch,
    ) {
        let t = self.read();
        let flows = self.flows.get().filter(|_| t.firewall.has_policy());
        let now = self.now();
        let mut memo = Memo::default();
        for packet in packets {
            let Some(dst) = destination(packet) else {
                self.drops.malformed.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let route = t.routes.lookup(dst);
            if route.is_none()
                && (!t.waiting.is_empty() && t.waiting.contains(&dst)
                    || t.workloads.held.contains(&dst))
            {
                // A workload address moving here, which the kernel does not have yet (or
                // just got: this packet was written before) and no peer routes any more (the
                // map names this node): kept back with what peers send it, and delivered once
                // it may be answered here (see `handover`). While a move here is only
                // prepared, the holder of the map still answers and gets it: a preparation
                // that does not land (a live migration refused, a move that lost its race)
                // must not hold up this host's traffic to the address.
                self.handover().push(dst, handover::HOST, packet, now);
                self.kept_from_host.store(true, Ordering::Relaxed);
                continue;
            }
            let Some(peer) = route else {
                self.drops.no_route.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            if !t.gateway.served.is_empty() && !self.gateway_allows_out(&t, packet, dst, peer) {
                continue;
            }
            let peer = t.sender(peer);
            if let Some(flows) = flows {
                // Noted so that the replies pass.
                t.firewall
                    .outbound(packet, flows, now, &self.firewall_counters, &mut memo);
            }
            peer.lock().seal(packet, net, &self.drops);
        }
    }

    /// Handles one datagram received from `from`: decrypted packets go to `tun`, replies and
    /// packets released by a completed handshake go to `net`. Anything invalid is dropped and
    /// counted; nothing a remote sends can make this panic.
    pub fn inbound(
        &self,
        from: SocketAddr,
        datagram: &[u8],
        tun: &mut TunBatch,
        net: &mut NetBatch,
    ) {
        let t = self.read();
        self.inbound_locked(&t, from, datagram, tun, net, &mut Memo::default());
    }

    /// Handles a batch of datagrams that all came from `from` with one table lock.
    pub fn inbound_batch<'d>(
        &self,
        from: SocketAddr,
        datagrams: impl IntoIterator<Item = &'d [u8]>,
        tun: &mut TunBatch,
        net: &mut NetBatch,
    ) {
        let t = self.read();
        let mut memo = Memo::default();
        for d in datagrams {
            self.inbound_locked(&t, from, d, tun, net, &mut memo);
        }
    }

    fn inbound_locked(
        &self,
        t: &Table,
        from: SocketAddr,
        datagram: &[u8],
        tun: &mut TunBatch,
        net: &mut NetBatch,
        memo: &mut Memo,
    ) {
        let Some(peer) = self.find_sender(t, from, datagram, net) else {
            return;
        };
        let kind = datagram[0];
        let mut s = peer.lock();
        let PeerState {
            noise,
            endpoint,
            rx_bytes,
            rx_packets,
            tx_bytes,
            tx_packets,
            handshakes,
            drops,
            talked,
            ..
        } = &mut *s;
        let mut authenticated = false;
        let mut forward: Option<(&Arc<Peer>, usize)> = None;
        let mut gatewayed = false;
        // boringtun panics when a data message's plaintext cannot fit where it is to go: one
        // longer than a packet slot (the interface's MTU allows no such packet) is dropped.
        let slot = tun.slot();
        if kind == DATA_MESSAGE && datagram.len().saturating_sub(DATA_HEADER) > slot.len() {
            drops.other += 1;
            return;
        }
        let mut flush = false;
        match noise.decapsulate(Some(from.ip()), datagram, slot) {
            NoiseOutput::Tunnel(packet, _)
                if packet.len()
                    < match packet.first().map_or(0, |b| b >> 4) {
                        6 => 40,
                        _ => 20,
                    } =>
            {
                // Shorter than its own IP header (a total length below 20 passes boringtun's
                // check): never handed to the TUN device, where one such packet would make
                // the kernel refuse the whole coalesced batch, other peers' packets with it.
                drops.short_packet += 1;
                authenticated = true;
            }
            NoiseOutput::Tunnel(packet, src) => {
                // Cryptokey routing, inbound half: the inner source must be one of the peer's,
                // or a workload address the peer may send from, or (a packet the previous
                // holder of a workload address held here relays to it) a node's own address.
                // A peer's alias (its next key) speaks for the same node. Never one of this
                // node's own addresses, whatever the peer's allowed IPs cover, but for a
                // workload address from a node the fencing state lets send from it: its
                // holder while it is up here ahead of a move (prepared, or lingering after
                // one), its previous holder for the grace period after one. Their answers to
                // what this host sent the address reach it then.
                let who = t.identity(peer);
                let sends_as = || {
                    t.workloads
                        .also_from
                        .get(&src)
                        .is_some_and(|keys| keys.contains(who))
                };
                let owner_ok = if t.own_addresses.contains(&src) {
                    sends_as()
                } else {
                    t.routes
                        .lookup(src)
                        .is_some_and(|o| Arc::ptr_eq(o, peer) || o.key == *who)
                        || sends_as()
                        || (!t.workloads.relay_from.is_empty()
                            && destination(packet).and_then(|d| t.workloads.relay_from.get(&d))
                                == Some(who)
                            && t.workloads.relay_sources.contains(&src))
                };
                if owner_ok {
                    let n = packet.len();
                    let next = if t.workloads.forward.is_empty() {
                        None
                    } else {
                        destination(packet)
                            .and_then(|d| t.workloads.forward.get(&d))
                            .and_then(|k| t.peers.get(k))
                    };
                    let dst = destination(packet);
                    let hop = if t.gateway.served.is_empty() {
                        None
                    } else {
                        self.through_gateway(t, who, packet, dst)
                    };
                    match next {
                        // Never back to the sender: that would loop. The new holder's
                        // firewall checks what is forwarded to it.
                        Some(to) if to.key != *who => forward = Some((to, n)),
                        // From or to an external node this node is the gateway of.
                        _ if hop.is_some() => match hop.flatten() {
                            Some(to) => {
                                forward = Some((to, n));
                                gatewayed = true;
                            }
                            None => drops.policy_denied += 1,
                        },
                        // An awaited workload address: kept back until it may be answered,
                        // if the policy lets it through (what it would drop takes no room
                        // from others); the firewall checks it in full at its release.
                        _ if !t.waiting.is_empty()
                            && dst.is_some_and(|d| t.waiting.contains(&d)) =>
                        {
                            let verdict = self.admit(t, packet, dst, Check::Policy, memo);
                            match (verdict, dst) {
                                (Verdict::Pass, Some(d)) => {
                                    self.handover().push(d, *who, packet, self.now());
                                }
                                _ => {
                                    drops.policy_denied += 1;
                                    self.handover().denied_on_arrival();
                                }
                            }
                        }
                        _ => match self.admit(t, packet, dst, Check::Full, memo) {
                            Verdict::Pass => {
                                if !t.gateway.served.is_empty() && t.gateway.served.contains(who) {
                                    self.note_served_flow(t, packet);
                                }
                                if is_urgent(packet) {
                                    tun.mark_urgent();
                                }
                                if !t.workloads.held.is_empty() {
                                    if let Some(d) = dst.filter(|d| t.workloads.held.contains(d)) {
                                        talked.note(d, self.now());
                                    }
                                }
                                tun.commit(n);
                            }
                            Verdict::NotLocal => {
                                drops.not_local += 1;
                                if dst.is_some_and(|d| t.workloads.workloads.contains(&d)) {
                                    self.not_held.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Verdict::Denied => drops.policy_denied += 1,
                        },
                    }
                    authenticated = true;
                } else {
                    drops.spoofed_source += 1;
                    // The packet was genuine WireGuard from this peer, so it still roams.
                    authenticated = true;
                }
            }
            NoiseOutput::Network(reply) => {
                // A cookie reply is what the limiter sends to unauthenticated senders.
                authenticated = reply.first() != Some(&3);
                let n = reply.len();
                net.push(from, reply);
                if authenticated {
                    // Sent to the peer: its handshake response (or cookie), then the packets
                    // queued while the handshake ran, which it releases.
                    *tx_bytes += n as u64;
                    *tx_packets += 1;
                    flush = true;
                }
            }
            NoiseOutput::Done => {
                authenticated = kind == DATA_MESSAGE || kind == HANDSHAKE_RESPONSE;
            }
            NoiseOutput::Error(e) => match e {
                NoiseError::DecryptFailed => drops.decrypt_failed += 1,
                NoiseError::Replay => drops.replay += 1,
                _ => drops.other += 1,
            },
        }
        // Also released by the peer's first data on a session this side answered (see
        // `noise`, "Crossing handshakes").
        if flush || (kind == DATA_MESSAGE && noise.take_confirmed()) {
            loop {
                let space = net.space(1500 + DATA_OVERHEAD + 64);
                match noise.decapsulate(None, &[], space) {
                    NoiseOutput::Network(out) => {
                        let n = out.len();
                        net.commit(from, n);
                        *tx_bytes += n as u64;
                        *tx_packets += 1;
                    }
                    _ => break,
                }
            }
        }
        if authenticated {
            *rx_bytes += datagram.len() as u64;
            *rx_packets += 1;
            if kind == HANDSHAKE_INIT || kind == HANDSHAKE_RESPONSE {
                *handshakes += 1;
            }
            // Roaming: the endpoint follows the latest authenticated packet, except from
            // loopback (the agent's relay shims) onto a path that is not: a datagram the relay
            // still carried must not pull a peer back from the direct path chosen for it.
            let relayed_onto_direct =
                from.ip().is_loopback() && endpoint.is_some_and(|e| !e.ip().is_loopback());
            if *endpoint != Some(from) && !relayed_onto_direct {
                *endpoint = Some(from);
            }
        }
        drop(s);
        if let Some((to, n)) = forward {
            // A released workload address: on to its new holder, one peer lock at a time.
            if t.sender(to)
                .lock()
                .seal(tun.uncommitted(n), net, &self.drops)
            {
                let counter = if gatewayed {
                    &self.drops.gatewayed
                } else {
                    &self.drops.forwarded
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Which peer a datagram claims to come from. Handshake initiations are checked (MAC,
    /// cookie under load) and opened to learn the sender's static key; other messages name
    /// our session index.
    fn find_sender<'t>(
        &self,
        t: &'t Table,
        from: SocketAddr,
        datagram: &[u8],
        net: &mut NetBatch,
    ) -> Option<&'t Arc<Peer>> {
        let mut cookie = [0u8; 64];
        let found = match t
            .limiter
            .verify_packet(Some(from.ip()), datagram, &mut cookie)
        {
            Ok(Packet::HandshakeInit(init)) => {
                parse_handshake_anon(&t.config.private_key.0, &t.public, &init)
                    .ok()
                    .and_then(|half| t.peers.get(&PublicKey(half.peer_static_public)))
            }
            Ok(Packet::HandshakeResponse(p)) => t.by_index.get(&(p.receiver_idx >> 8)),
            Ok(Packet::PacketCookieReply(p)) => t.by_index.get(&(p.receiver_idx >> 8)),
            Ok(Packet::PacketData(p)) => t.by_index.get(&(p.receiver_idx >> 8)),
            Err(TunnResult::WriteToNetwork(reply)) => {
                net.push(from, reply);
                return None;
            }
            Err(_) => None,
        };
        if found.is_none() {
            self.drops.unknown_peer.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    /// Runs every peer's protocol timers; datagrams they produce go to `net`. Call every
    /// 250 ms or so.
    pub fn handle_timeout(&self, net: &mut NetBatch) {
        let t = self.read();
        for peer in t.peers.values() {
            let mut s = peer.lock();
            if s.kick && s.endpoint.is_some() {
                s.kick = false;
                s.emit(net, MIN_OUT + 64, |noise, out| noise.encapsulate(&[], out));
            }
            if s.rehandshake && s.endpoint.is_some() {
                s.rehandshake = false;
                s.emit(net, MIN_OUT + 64, |noise, out| noise.resend_handshake(out));
            }
            // The timers run with or without an endpoint; only a datagram needs one.
            s.emit(net, MIN_OUT + 64, |noise, out| noise.update_timers(out));
        }
    }

    /// Starts a new one-second window of the handshake limiter. Call once a second.
    pub fn reset_handshake_limiter(&self) {
        self.read().limiter.reset_count();
    }

    /// Live status: endpoints as roamed, handshake ages, counters. `now` is wall-clock time,
    /// used to turn handshake ages into timestamps.
    pub fn status(&self, now: SystemTime) -> DeviceStatus {
        let t = self.read();
        let peers = t
            .config
            .peers
            .iter()
            .filter_map(|pc| t.peers.get(&pc.public_key))
            .map(|p| {
                let s = p.lock();
                PeerStatus {
                    public_key: p.key,
                    endpoint: s.endpoint,
                    last_handshake: s
                        .noise
                        .time_since_last_handshake()
                        .and_then(|d| now.checked_sub(d)),
                    tx_bytes: s.tx_bytes,
                    rx_bytes: s.rx_bytes,
                    tx_packets: s.tx_packets,
                    rx_packets: s.rx_packets,
                    handshakes: s.handshakes,
                    drops: s.drops,
                }
            })
            .collect();
        DeviceStatus {
            listen_port: t.config.listen_port,
            peers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destination_of_ipv4_and_ipv6() {
        let mut v4 = [0u8; 20];
        v4[0] = 0x45;
        v4[16..20].copy_from_slice(&[100, 64, 0, 2]);
        assert_eq!(destination(&v4), Some("100.64.0.2".parse().unwrap()));
        let mut v6 = [0u8; 40];
        v6[0] = 0x60;
        v6[39] = 1;
        assert_eq!(destination(&v6), Some("::1".parse().unwrap()));
        assert_eq!(destination(&[0x45, 0, 0]), None);

        assert_eq!(destination(&[]), None);
        let mut tcp = v4;
        tcp[9] = 6;
        let mut icmp = v4;
        icmp[9] = 1;
        assert!(!is_urgent(&tcp) && is_urgent(&icmp));
        let mut v6_udp = v6;
        v6_udp[6] = 17;
        assert!(is_urgent(&v6_udp) && !is_urgent(&[]));
    }
}
