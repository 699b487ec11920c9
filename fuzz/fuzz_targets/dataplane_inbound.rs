//! The data plane's inbound path: `meshlink_agent::dataplane::Device::inbound`, which takes
//! every datagram that reaches the WireGuard port, from anyone.
//!
//! Three real devices on an in-memory underlay, as in `agent/tests/inmemory.rs` (boringtun's
//! clock is the test's): A, the device under test, with peers B (endpoint configured, allowed
//! 100.64.0.2/32, 10.2.0.0/16, fd00::2/128) and C (no endpoint: it reaches out; 100.64.0.3/32,
//! fd00::3/128); B and C each route everything to A. The input is a script of operations
//! (`Op`): bytes from anywhere; an IP packet (any source, destination, length field and
//! payload) sent by B or C through its own device, up to four times, each datagram on the way
//! maybe arriving from another address, one of the first three maybe altered; packets from A
//! to a peer; a datagram A received arriving again; time passing (timers, rekeys, session
//! expiry); A's workload routing and configuration changing.
//!
//! A send that finds no session starts a handshake, and the packets go once it completes: a
//! single `Send` reaches a live session, and its copies (and later sends) the session's
//! steady state, with a datagram altered after the handshake meeting the session's
//! authentication and a replayed one its replay window.
//!
//! Checked, beyond "never panics":
//! - A delivers to its TUN device only packets that B or C sent (never from bytes nobody
//!   sealed), and only with an inner source the sender may use: cryptokey routing by longest
//!   prefix, or the workload exceptions (`WorkloadRouting::also_from`; `relay_from` with
//!   `relay_sources`); a packet
//!   for an address released to another peer is forwarded, not delivered.
//! - A's endpoint for a peer is only ever one that was configured or one a fresh datagram of
//!   that peer came from: no replayed, altered or forged datagram moves it.
//! - Everything A sends on the underlay is a WireGuard message of a valid type and size: no
//!   plaintext leaves.

#![no_main]

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, SystemTime};

use arbitrary::Arbitrary;
use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;
use meshlink_agent::dataplane::{Device, NetBatch, TunBatch, WorkloadRouting};
use meshlink_agent::settings::{DeviceConfig, PeerConfig, PrivateKey};
use meshlink_proto::PublicKey;
use mock_instant::MockClock;

const TICK: Duration = Duration::from_millis(250);
/// Deliveries per operation at most (a reply storm must end).
const MAX_DELIVERIES: usize = 200;
/// Datagrams A received, kept for replays.
const MAX_CAPTURED: usize = 32;
const MAX_OPS: usize = 48;

#[derive(Arbitrary, Debug)]
enum Op {
    Raw {
        from: Source,
        datagram: Vec<u8>,
    },
    Send {
        by_c: bool,
        packet: Packet,
        /// The packet is sent `1 + copies % 4` times, one after the other.
        copies: u8,
        from: Option<Source>,
        tamper: Option<Tamper>,
    },
    Reply {
        to_c: bool,
        packet: Packet,
    },
    Replay {
        index: u8,
        from: Option<Source>,
        tamper: Option<Tamper>,
    },
    Tick {
        quarters: u8,
    },
    Routing(u8),
    Reconfigure(u8),
}

/// Where a datagram to A comes from.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Source {
    B,
    C,
    Stranger(u8, u16),
    V6(u16),
    /// B's address as an IPv4-mapped IPv6 address.
    MappedB,
}

#[derive(Arbitrary, Debug)]
struct Packet {
    v6: bool,
    src: Addr,
    dst: Addr,
    protocol: u8,
    /// Added to the true length in the header's length field (`None`: exact).
    length_error: Option<i8>,
    payload: Vec<u8>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Addr {
    A,
    B,
    C,
    /// In B's 10.2.0.0/16 (IPv4) or outside every prefix (IPv6).
    BExtra(u8),
    Workload,
    Other([u8; 4]),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Tamper {
    /// In a `Send`, which of the datagrams its sender sends A is altered: `nth % 3` (0: the
    /// first, a handshake initiation when there is no session yet). Not used by `Replay`.
    nth: u8,
    at: u16,
    xor: u8,
    cut: bool,
}

struct Datagram {
    from: SocketAddr,
    to: SocketAddr,
    bytes: Vec<u8>,
    /// The device that sealed it (1: B, 2: C); `None` for bytes nobody sealed.
    origin: Option<usize>,
    /// Already delivered to A once in these very bytes.
    replay: bool,
    tamper: Option<Tamper>,
}

struct Node {
    device: Device,
    addr: SocketAddr,
    key: PublicKey,
}

struct World {
    nodes: [Node; 3],
    wire: VecDeque<Datagram>,
    /// Where an address seen by A leads (a peer that sent from another address).
    nat: HashMap<SocketAddr, usize>,
    /// Plaintexts given to B's and C's devices.
    sent: [Vec<Vec<u8>>; 3],
    captured: Vec<(Vec<u8>, Option<usize>)>,
    /// Per peer of A (1, 2): endpoints A may hold for it.
    legit: [HashSet<SocketAddr>; 3],
    routing: WorkloadRouting,
    /// Applied to datagrams B or C send to A during the current operation.
    send_from: Option<(usize, SocketAddr)>,
    tamper_next: Option<Tamper>,
    /// Datagrams B or C sent to A during the current operation.
    to_a: u8,
    steps: u64,
}

fn underlay(host: u8) -> SocketAddr {
    SocketAddr::from(([198, 18, 0, host], 51820))
}

fn key(i: usize) -> PrivateKey {
    PrivateKey::from_bytes([i as u8 + 1; 32])
}

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|n| n.parse().unwrap()).collect()
}

fn peer_of_a(i: usize, endpoint: Option<SocketAddr>, allowed: &[&str]) -> PeerConfig {
    PeerConfig {
        public_key: key(i).public_key(),
        preshared_key: None,
        endpoint,
        allowed_ips: nets(allowed),
        persistent_keepalive: (i == 2).then_some(25),
    }
}

/// A's configuration, variant `v` (see `Op::Reconfigure`).
fn a_config(v: u8) -> DeviceConfig {
    let b_allowed: &[&str] = if v == 3 {
        &["100.64.0.2/32", "fd00::2/128"]
    } else {
        &["100.64.0.2/32", "10.2.0.0/16", "fd00::2/128"]
    };
    let c_allowed: &[&str] = if v == 3 {
        &["100.64.0.3/32", "fd00::3/128", "10.2.0.0/16"]
    } else {
        &["100.64.0.3/32", "fd00::3/128"]
    };
    let mut peers = vec![peer_of_a(1, Some(underlay(2)), b_allowed)];
    if v != 2 {
        peers.push(peer_of_a(2, (v == 1).then(|| underlay(3)), c_allowed));
    }
    DeviceConfig {
        private_key: key(0),
        listen_port: 51820,
        fwmark: None,
        peers,
    }
}

fn routing(v: u8) -> WorkloadRouting {
    let (b, c) = (key(1).public_key(), key(2).public_key());
    let w4: IpAddr = Ipv4Addr::new(100, 64, 50, 10).into();
    let w6: IpAddr = "fd00::50:10".parse().unwrap();
    let a4: IpAddr = Ipv4Addr::new(100, 64, 0, 1).into();
    let mut r = WorkloadRouting::default();
    match v % 4 {
        1 => {
            r.also_from.insert(w4, vec![b, c]);
            r.also_from.insert(w6, vec![c]);
        }
        2 => {
            // A holds the workload after a move from C, which relays what peers still send it.
            r.relay_from.insert(w4, c);
            r.relay_from.insert(w6, c);
            r.relay_sources.insert(Ipv4Addr::new(100, 64, 0, 2).into());
            r.relay_sources.insert("fd00::2".parse().unwrap());
            r.also_from.insert(a4, vec![b]);
        }
        3 => {
            r.forward.insert(w4, c);
            r.forward.insert(w6, b);
        }
        _ => {}
    }
    r
}

impl World {
    fn new() -> World {
        let node = |i: usize, config: DeviceConfig| Node {
            device: Device::new(config, i as u32 * 1000),
            addr: underlay(i as u8 + 1),
            key: key(i).public_key(),
        };
        let to_a = |i: usize| DeviceConfig {
            private_key: key(i),
            listen_port: 51820,
            fwmark: None,
            peers: vec![PeerConfig {
                public_key: key(0).public_key(),
                preshared_key: None,
                endpoint: Some(underlay(1)),
                allowed_ips: nets(&["0.0.0.0/0", "::/0"]),
                persistent_keepalive: None,
            }],
        };
        let mut legit: [HashSet<SocketAddr>; 3] = Default::default();
        legit[1].insert(underlay(2));
        World {
            nodes: [node(0, a_config(0)), node(1, to_a(1)), node(2, to_a(2))],
            wire: VecDeque::new(),
            nat: HashMap::new(),
            sent: Default::default(),
            captured: Vec::new(),
            legit,
            routing: WorkloadRouting::default(),
            send_from: None,
            tamper_next: None,
            to_a: 0,
            steps: 0,
        }
    }

    fn address_of(&self, f: Source) -> SocketAddr {
        match f {
            Source::B => self.nodes[1].addr,
            Source::C => self.nodes[2].addr,
            Source::Stranger(host, port) => SocketAddr::from(([203, 0, 113, host], port)),
            Source::V6(port) => {
                SocketAddr::from((Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7), port))
            }
            Source::MappedB => {
                SocketAddr::from((Ipv4Addr::new(198, 18, 0, 2).to_ipv6_mapped(), 51820))
            }
        }
    }

    /// Queues what node `i` produced.
    fn enqueue(&mut self, i: usize, net: &NetBatch) {
        for item in net.items() {
            let bytes = net.bytes(item.start, item.len).to_vec();
            if i == 0 {
                check_wireguard(&bytes);
                self.check_sealed(&bytes);
            }
            let mut from = self.nodes[i].addr;
            let mut tamper = None;
            if item.dst == self.nodes[0].addr && i != 0 {
                if let Some((who, addr)) = self.send_from {
                    if who == i {
                        from = addr;
                    }
                }
                if self.tamper_next.is_some_and(|t| t.nth % 3 == self.to_a) {
                    tamper = self.tamper_next.take();
                }
                self.to_a = self.to_a.saturating_add(1);
            }
            self.wire.push_back(Datagram {
                from,
                to: item.dst,
                bytes,
                origin: (i != 0).then_some(i),
                replay: false,
                tamper,
            });
        }
    }

    /// No IP header a device was given appears where a data message's ciphertext starts.
    fn check_sealed(&self, d: &[u8]) {
        if d.first() != Some(&4) || d.len() < 16 + 20 {
            return;
        }
        for q in self.sent.iter().flatten() {
            if q.len() >= 20 {
                assert_ne!(&d[16..36], &q[..20], "A sent an IP header in the clear");
            }
        }
    }

    /// Delivers everything on the wire, and what that causes, within a bound.
    fn pump(&mut self) {
        let mut n = 0;
        while let Some(d) = self.wire.pop_front() {
            n += 1;
            if n > MAX_DELIVERIES {
                self.wire.clear();
                return;
            }
            if d.to == self.nodes[0].addr {
                self.deliver_to_a(d);
                continue;
            }
            let j = match self.nodes.iter().position(|x| x.addr == d.to) {
                Some(j) => j,
                None => match self.nat.get(&d.to) {
                    Some(j) => *j,
                    None => continue,
                },
            };
            let mut tun = TunBatch::new(4, 16, 2048);
            let mut net = NetBatch::with_capacity(4096);
            self.nodes[j]
                .device
                .inbound(d.from, &d.bytes, &mut tun, &mut net);
            self.enqueue(j, &net);
        }
    }

    fn deliver_to_a(&mut self, mut d: Datagram) {
        // Whether the bytes may still be the sealer's own: unaltered, or altered only in a
        // handshake's mac2, which WireGuard checks only under load.
        let mut genuine = true;
        if let Some(t) = d.tamper {
            if !d.bytes.is_empty() {
                let at = usize::from(t.at) % d.bytes.len();
                let mac2 = match d.bytes[0] {
                    1 => 132..148,
                    2 => 76..92,
                    _ => 0..0,
                };
                if t.cut {
                    d.bytes.truncate(at);
                    genuine = false;
                } else if t.xor != 0 {
                    d.bytes[at] ^= t.xor;
                    genuine = mac2.contains(&at);
                }
            }
        }
        if let Some(o) = d.origin {
            if d.from != self.nodes[o].addr {
                self.nat.insert(d.from, o);
            }
            if !d.replay && genuine {
                // A fresh datagram of peer `o`: WireGuard roams to where it came from.
                self.legit[o].insert(d.from);
            }
        }
        if self.captured.len() < MAX_CAPTURED {
            self.captured.push((d.bytes.clone(), d.origin));
        }
        let mut tun = TunBatch::new(4, 16, 2048);
        let mut net = NetBatch::with_capacity(4096);
        self.nodes[0]
            .device
            .inbound(d.from, &d.bytes, &mut tun, &mut net);
        for p in tun.packets() {
            self.check_delivered(p, d.origin);
        }
        self.enqueue(0, &net);
        self.check_endpoints();
    }

    /// A packet A put on its TUN device: sealed by `origin`, with a source it may use.
    fn check_delivered(&self, p: &[u8], origin: Option<usize>) {
        let o = origin.expect("A delivered a packet from bytes nobody sealed");
        assert!(
            self.sent[o].iter().any(|q| q.starts_with(p)),
            "A delivered a packet its sender never sent"
        );
        let (src, dst) = addresses(p).expect("A delivered something that is not an IP packet");
        let k = self.nodes[o].key;
        let config = self.nodes[0].device.config();
        let owner = config
            .peers
            .iter()
            .flat_map(|pc| pc.allowed_ips.iter().map(move |n| (n, pc.public_key)))
            .filter(|(n, _)| n.contains(&src))
            .max_by_key(|(n, _)| n.prefix_len())
            .map(|(_, key)| key);
        let r = &self.routing;
        let ok = owner == Some(k)
            || r.also_from.get(&src).is_some_and(|ks| ks.contains(&k))
            || (r.relay_from.get(&dst) == Some(&k) && r.relay_sources.contains(&src));
        assert!(ok, "A accepted inner source {src} from peer {o}");
        if let Some(to) = r.forward.get(&dst) {
            let is_peer = config.peers.iter().any(|pc| pc.public_key == *to);
            assert!(
                !is_peer || *to == k,
                "a packet for released address {dst} was delivered instead of forwarded"
            );
        }
    }

    fn check_endpoints(&self) {
        let status = self.nodes[0].device.status(SystemTime::UNIX_EPOCH);
        for p in status.peers {
            let i = if p.public_key == self.nodes[1].key {
                1
            } else {
                2
            };
            if let Some(e) = p.endpoint {
                assert!(
                    self.legit[i].contains(&e),
                    "A's endpoint for peer {i} moved to {e} without a fresh datagram from there"
                );
            }
        }
    }

    fn tick(&mut self, step: Duration) {
        MockClock::advance(step);
        self.steps += 1;
        for i in 0..3 {
            if self.steps.is_multiple_of(4) {
                self.nodes[i].device.reset_handshake_limiter();
            }
            let mut net = NetBatch::with_capacity(4096);
            self.nodes[i].device.handle_timeout(&mut net);
            self.enqueue(i, &net);
        }
        self.pump();
        self.check_endpoints();
    }

    fn run(&mut self, op: Op) {
        match op {
            Op::Raw { from, datagram } => {
                let d = Datagram {
                    from: self.address_of(from),
                    to: self.nodes[0].addr,
                    bytes: datagram,
                    origin: None,
                    replay: false,
                    tamper: None,
                };
                self.deliver_to_a(d);
                self.pump();
            }
            Op::Send {
                by_c,
                packet,
                copies,
                from,
                tamper,
            } => {
                let i = if by_c { 2 } else { 1 };
                let p = packet.build(i);
                self.sent[i].push(p.clone());
                self.send_from = from.map(|f| (i, self.address_of(f)));
                self.tamper_next = tamper;
                self.to_a = 0;
                for _ in 0..=copies % 4 {
                    let mut net = NetBatch::with_capacity(4096);
                    self.nodes[i].device.outbound(&p, &mut net);
                    self.enqueue(i, &net);
                    self.pump();
                }
                self.send_from = None;
                self.tamper_next = None;
            }
            Op::Reply { to_c, packet } => {
                let p = packet.build(0);
                let mut p = p;
                // To the chosen peer's own address.
                let dst: IpAddr = if to_c {
                    Ipv4Addr::new(100, 64, 0, 3).into()
                } else {
                    Ipv4Addr::new(100, 64, 0, 2).into()
                };
                if let (IpAddr::V4(d), true) = (dst, p.len() >= 20 && p[0] >> 4 == 4) {
                    p[16..20].copy_from_slice(&d.octets());
                }
                self.sent[0].push(p.clone());
                let mut net = NetBatch::with_capacity(4096);
                self.nodes[0].device.outbound(&p, &mut net);
                self.enqueue(0, &net);
                self.pump();
            }
            Op::Replay {
                index,
                from,
                tamper,
            } => {
                if self.captured.is_empty() {
                    return;
                }
                let (bytes, origin) =
                    self.captured[usize::from(index) % self.captured.len()].clone();
                let d = Datagram {
                    from: from.map_or(self.nodes[origin.unwrap_or(1)].addr, |f| self.address_of(f)),
                    to: self.nodes[0].addr,
                    bytes,
                    origin,
                    replay: true,
                    tamper,
                };
                self.deliver_to_a(d);
                self.pump();
            }
            Op::Tick { quarters } => {
                if quarters < 240 {
                    for _ in 0..quarters % 64 {
                        self.tick(TICK);
                    }
                } else {
                    // Minutes at once: sessions expire, handshakes are abandoned.
                    self.tick(Duration::from_secs(60 * u64::from(quarters - 239)));
                }
            }
            Op::Routing(v) => {
                self.routing = routing(v);
                self.nodes[0]
                    .device
                    .set_workload_routing(self.routing.clone());
            }
            Op::Reconfigure(v) => {
                let config = a_config(v % 4);
                for pc in &config.peers {
                    if let Some(e) = pc.endpoint {
                        let i = if pc.public_key == self.nodes[1].key {
                            1
                        } else {
                            2
                        };
                        self.legit[i].insert(e);
                    }
                }
                self.nodes[0].device.set_config(config);
                self.check_endpoints();
            }
        }
    }
}

impl Addr {
    fn v4(self, sender: usize) -> Ipv4Addr {
        match self {
            Addr::A => Ipv4Addr::new(100, 64, 0, 1),
            Addr::B => Ipv4Addr::new(100, 64, 0, 2),
            Addr::C => Ipv4Addr::new(100, 64, 0, 3),
            Addr::BExtra(x) => Ipv4Addr::new(10, 2, x, sender as u8),
            Addr::Workload => Ipv4Addr::new(100, 64, 50, 10),
            Addr::Other(o) => Ipv4Addr::from(o),
        }
    }
    fn v6(self, sender: usize) -> Ipv6Addr {
        match self {
            Addr::A => "fd00::1".parse().unwrap(),
            Addr::B => "fd00::2".parse().unwrap(),
            Addr::C => "fd00::3".parse().unwrap(),
            Addr::BExtra(x) => Ipv6Addr::new(0xfd02, 0, 0, 0, 0, 0, u16::from(x), sender as u16),
            Addr::Workload => "fd00::50:10".parse().unwrap(),
            Addr::Other(o) => Ipv6Addr::from(u128::from(u32::from_be_bytes(o))),
        }
    }
}

impl Packet {
    /// An IPv4 or IPv6 packet as `sender`'s TUN device would give it.
    fn build(&self, sender: usize) -> Vec<u8> {
        let payload = &self.payload[..self.payload.len().min(1300)];
        let mut p;
        if self.v6 {
            p = vec![0u8; 40 + payload.len()];
            p[0] = 0x60;
            let len = (payload.len() as i32 + i32::from(self.length_error.unwrap_or(0)))
                .clamp(0, 65535) as u16;
            p[4..6].copy_from_slice(&len.to_be_bytes());
            p[6] = self.protocol;
            p[7] = 64;
            p[8..24].copy_from_slice(&self.src.v6(sender).octets());
            p[24..40].copy_from_slice(&self.dst.v6(sender).octets());
            p[40..].copy_from_slice(payload);
        } else {
            p = vec![0u8; 20 + payload.len()];
            p[0] = 0x45;
            let len = (20 + payload.len() as i32 + i32::from(self.length_error.unwrap_or(0)))
                .clamp(0, 65535) as u16;
            p[2..4].copy_from_slice(&len.to_be_bytes());
            p[8] = 64;
            p[9] = self.protocol;
            p[12..16].copy_from_slice(&self.src.v4(sender).octets());
            p[16..20].copy_from_slice(&self.dst.v4(sender).octets());
            p[20..].copy_from_slice(payload);
        }
        p
    }
}

/// Source and destination of an IP packet.
fn addresses(p: &[u8]) -> Option<(IpAddr, IpAddr)> {
    match p.first()? >> 4 {
        4 if p.len() >= 20 => {
            let s: [u8; 4] = p[12..16].try_into().ok()?;
            let d: [u8; 4] = p[16..20].try_into().ok()?;
            Some((Ipv4Addr::from(s).into(), Ipv4Addr::from(d).into()))
        }
        6 if p.len() >= 40 => {
            let s: [u8; 16] = p[8..24].try_into().ok()?;
            let d: [u8; 16] = p[24..40].try_into().ok()?;
            Some((Ipv6Addr::from(s).into(), Ipv6Addr::from(d).into()))
        }
        _ => None,
    }
}

/// A datagram A sends: a WireGuard message of a known type and size, nothing else. (Data
/// messages are not padded to 16 bytes as the WireGuard paper asks: boringtun 0.7 does not pad.)
fn check_wireguard(d: &[u8]) {
    let ok = match d.first() {
        Some(1) => d.len() == 148,
        Some(2) => d.len() == 92,
        Some(3) => d.len() == 64,
        Some(4) => d.len() >= 32,
        _ => false,
    };
    assert!(
        ok && d[1..4] == [0, 0, 0],
        "A sent something that is not WireGuard: {d:?}"
    );
}

fuzz_target!(|ops: Vec<Op>| {
    // Every run starts at the same time on boringtun's clock (an hour in, so nothing in it
    // reaches back before zero).
    MockClock::set_time(Duration::from_secs(3600));
    let mut world = World::new();
    for op in ops.into_iter().take(MAX_OPS) {
        world.run(op);
    }
});
