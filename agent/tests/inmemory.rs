//! Two (or three) data planes joined by an in-memory UDP wire and fake TUN devices, with
//! boringtun's clock driven by the test (`mock-clock` feature): no root, no sockets, no sleeps.
//!
//! Run with `cargo test -p meshlink-agent --features mock-clock --test inmemory`.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime};

use meshlink_agent::dataplane::{Device, NetBatch, TunBatch, WorkloadRouting};
use meshlink_agent::settings::{DeviceConfig, PeerConfig, PrivateKey};
use mock_instant::MockClock;

const TICK: Duration = Duration::from_millis(250);

struct Node {
    device: Device,
    key: PrivateKey,
    addr: SocketAddr,
    overlay: Ipv4Addr,
    delivered: Vec<Vec<u8>>,
}

/// The simulated underlay: datagrams in flight, in order.
struct Sim {
    nodes: Vec<Node>,
    wire: VecDeque<(SocketAddr, SocketAddr, Vec<u8>)>,
    lost: usize,
    /// The room for a decrypted packet in the receive batches (2,048 bytes, the agent's at
    /// an MTU of 1,420).
    room: usize,
}

fn underlay(host: u8, port: u16) -> SocketAddr {
    SocketAddr::from(([198, 18, 0, host], port))
}

/// A minimal IPv4/UDP packet with a correct total length (the engine trims padding by it).
fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[20..22].copy_from_slice(&4000u16.to_be_bytes());
    p[22..24].copy_from_slice(&5000u16.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    p
}

fn key(seed: u8) -> PrivateKey {
    PrivateKey::from_bytes([seed; 32])
}

impl Sim {
    /// `n` nodes, fully meshed: node i has overlay 100.64.0.(i+1) and underlay 198.18.0.(i+1).
    /// Only node 0 knows the others' endpoints at start; the others learn node 0's by roaming.
    fn mesh(n: u8, keepalive: Option<u16>) -> Sim {
        let keys: Vec<PrivateKey> = (0..n).map(|i| key(i + 1)).collect();
        let nodes = (0..n)
            .map(|i| {
                let peers = (0..n)
                    .filter(|j| *j != i)
                    .map(|j| PeerConfig {
                        public_key: keys[j as usize].public_key(),
                        preshared_key: None,
                        endpoint: (i == 0).then(|| underlay(j + 1, 51820)),
                        allowed_ips: vec![format!("100.64.0.{}/32", j + 1).parse().unwrap()],
                        persistent_keepalive: keepalive,
                    })
                    .collect();
                let config = DeviceConfig {
                    private_key: keys[i as usize].clone(),
                    listen_port: 51820,
                    fwmark: None,
                    peers,
                };
                Node {
                    device: Device::new(config, u32::from(i) * 1000),
                    key: keys[i as usize].clone(),
                    addr: underlay(i + 1, 51820),
                    overlay: Ipv4Addr::new(100, 64, 0, i + 1),
                    delivered: Vec::new(),
                }
            })
            .collect();
        Sim {
            nodes,
            wire: VecDeque::new(),
            lost: 0,
            room: 2048,
        }
    }

    fn enqueue(&mut self, from: usize, net: &NetBatch) {
        let src = self.nodes[from].addr;
        for item in net.items() {
            self.wire
                .push_back((src, item.dst, net.bytes(item.start, item.len).to_vec()));
        }
    }

    /// An application on node `from` sends `packet` into its TUN device.
    fn send(&mut self, from: usize, packet: &[u8]) {
        let mut net = NetBatch::with_capacity(4096);
        self.nodes[from].device.outbound(packet, &mut net);
        self.enqueue(from, &net);
        self.run();
    }

    /// Delivers everything on the wire, including the replies it causes.
    fn run(&mut self) {
        while let Some((from, to, data)) = self.wire.pop_front() {
            let Some(j) = self.nodes.iter().position(|n| n.addr == to) else {
                self.lost += 1;
                continue;
            };
            let mut tun = TunBatch::new(4, 16, self.room);
            let mut net = NetBatch::with_capacity(4096);
            self.nodes[j]
                .device
                .inbound(from, &data, &mut tun, &mut net);
            let packets: Vec<Vec<u8>> = tun.packets().map(<[u8]>::to_vec).collect();
            self.nodes[j].delivered.extend(packets);
            self.enqueue(j, &net);
        }
    }

    /// Lets `d` of simulated time pass, running every node's timers every 250 ms.
    fn advance(&mut self, d: Duration) {
        let steps = d.as_millis() / TICK.as_millis();
        for step in 0..steps {
            MockClock::advance(TICK);
            for i in 0..self.nodes.len() {
                self.nodes[i].device.set_time(MockClock::time());
                if step % 4 == 0 {
                    self.nodes[i].device.reset_handshake_limiter();
                }
                let mut net = NetBatch::with_capacity(4096);
                self.nodes[i].device.handle_timeout(&mut net);
                self.enqueue(i, &net);
            }
            self.run();
        }
    }

    /// Delivers what node `node` kept back at a handover and may deliver now, as the agent's
    /// receive loop does: `tun` taken and written until nothing is left, and what it sends on
    /// put on the wire. Returns how many were delivered.
    fn release(&mut self, node: usize, tun: &mut TunBatch) -> usize {
        let mut n = 0;
        while self.nodes[node].device.has_released() {
            let mut net = NetBatch::with_capacity(4096);
            n += self.nodes[node].device.take_released(tun, &mut net);
            let packets: Vec<Vec<u8>> = tun.packets().map(<[u8]>::to_vec).collect();
            self.nodes[node].delivered.extend(packets);
            tun.clear();
            self.enqueue(node, &net);
        }
        self.run();
        n
    }

    /// Sends one packet from `a` to `b` and says whether `b` received exactly it.
    fn ping(&mut self, a: usize, b: usize, tag: &[u8]) -> bool {
        let p = ipv4(self.nodes[a].overlay, self.nodes[b].overlay, tag);
        let before = self.nodes[b].delivered.len();
        self.send(a, &p);
        self.nodes[b].delivered[before..].contains(&p)
    }

    /// Seconds since `node`'s last handshake with `peer`.
    fn handshake_age(&self, node: usize, peer: usize) -> Option<Duration> {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let pk = self.nodes[peer].key.public_key();
        let st = self.nodes[node].device.status(now);
        let p = st.peers.iter().find(|p| p.public_key == pk)?;
        p.last_handshake.map(|t| now.duration_since(t).unwrap())
    }

    fn peer_status(&self, node: usize, peer: usize) -> meshlink_agent::uapi::PeerStatus {
        let pk = self.nodes[peer].key.public_key();
        self.nodes[node]
            .device
            .status(SystemTime::now())
            .peers
            .into_iter()
            .find(|p| p.public_key == pk)
            .unwrap()
    }
}

#[test]
fn handshake_and_traffic_both_ways() {
    let mut sim = Sim::mesh(2, None);
    assert!(sim.handshake_age(0, 1).is_none());
    // The first packet starts the handshake and is queued, then released when it completes.
    assert!(
        sim.ping(0, 1, b"hello"),
        "first packet is delivered after the handshake"
    );
    assert!(sim.handshake_age(0, 1).is_some());
    // B learned A's endpoint from the handshake (B was configured without one).
    assert_eq!(sim.peer_status(1, 0).endpoint, Some(sim.nodes[0].addr));
    for i in 0..50u8 {
        assert!(sim.ping(0, 1, &[i; 100]));
        assert!(sim.ping(1, 0, &[i; 1300]));
    }
    let st = sim.peer_status(0, 1);
    assert!(st.tx_bytes > 50 * 100 && st.rx_bytes > 50 * 1300, "{st:?}");
    // Datagrams: the initiation, the keepalive that confirms the session, the first packet
    // (released by the handshake) and the 50 pings out; the response and the 50 answers in.
    // B, the other way round: its response counts as sent.
    assert_eq!((st.tx_packets, st.rx_packets), (53, 51), "{st:?}");
    let b = sim.peer_status(1, 0);
    assert_eq!((b.tx_packets, b.rx_packets), (51, 53), "{b:?}");
    assert_eq!(b.tx_bytes, st.rx_bytes, "what B sent is what A received");
    assert_eq!(st.tx_bytes, b.rx_bytes, "and the other way round");
    // One handshake, completed on both sides: A got B's response, B answered A's initiation.
    assert_eq!(st.handshakes, 1, "{st:?}");
    assert_eq!(sim.peer_status(1, 0).handshakes, 1);
    assert_eq!(sim.lost, 0);
}

#[test]
fn rekeys_after_simulated_minutes_without_losing_traffic() {
    let mut sim = Sim::mesh(2, None);
    assert!(sim.ping(0, 1, b"start"));
    let mut delivered = 0;
    // Ten simulated minutes, a packet each way every second.
    for s in 0..600u32 {
        sim.advance(Duration::from_secs(1));
        let tag = s.to_be_bytes();
        delivered += usize::from(sim.ping(0, 1, &tag)) + usize::from(sim.ping(1, 0, &tag));
    }
    // Sessions rekey every 120 s: the last handshake is recent, not ten minutes old.
    let age = sim.handshake_age(0, 1).unwrap();
    assert!(
        age < Duration::from_secs(130),
        "last handshake {age:?} ago: no rekey"
    );
    // A rekey every 120 s or so over ten minutes, each one counted by both sides together.
    let handshakes = sim.peer_status(0, 1).handshakes + sim.peer_status(1, 0).handshakes;
    assert!((8..=20).contains(&handshakes), "{handshakes} handshakes");
    // A packet sent while a rekey runs is queued, not lost; allow none lost.
    assert_eq!(delivered, 1200);
}

#[test]
fn idle_session_expires_and_comes_back() {
    let mut sim = Sim::mesh(2, None);
    assert!(sim.ping(0, 1, b"one"));
    // After REJECT_AFTER_TIME * 3 (9 minutes) of silence all keys are gone.
    sim.advance(Duration::from_secs(600));
    assert!(sim.ping(0, 1, b"two"), "a new handshake starts on demand");
    assert!(sim.handshake_age(0, 1).unwrap() < Duration::from_secs(5));
}

#[test]
fn persistent_keepalive_keeps_sending_when_idle() {
    let mut sim = Sim::mesh(2, Some(5));
    assert!(sim.ping(0, 1, b"up"));
    let rx_before = sim.peer_status(1, 0).rx_bytes;
    sim.advance(Duration::from_secs(60));
    let rx_after = sim.peer_status(1, 0).rx_bytes;
    // About 12 keepalives of 32 bytes in a minute.
    assert!(rx_after - rx_before >= 10 * 32, "{rx_before} -> {rx_after}");
}

#[test]
fn roaming_follows_the_latest_authenticated_packet() {
    let mut sim = Sim::mesh(2, None);
    assert!(sim.ping(0, 1, b"hi"));
    assert!(sim.ping(1, 0, b"from old address"));
    // Node 1's underlay address changes (a new public IP after a migration, say).
    sim.nodes[1].addr = underlay(77, 40000);
    assert!(sim.ping(1, 0, b"from new address"));
    assert_eq!(sim.peer_status(0, 1).endpoint, Some(underlay(77, 40000)));
    // Replies now go to the new address.
    assert!(sim.ping(0, 1, b"reply"));
    // A forged datagram from elsewhere does not move the endpoint.
    sim.wire.push_back((
        underlay(99, 1),
        sim.nodes[0].addr,
        vec![4, 0, 0, 0, 1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0, 9, 9],
    ));
    sim.run();
    assert_eq!(sim.peer_status(0, 1).endpoint, Some(underlay(77, 40000)));
}

#[test]
fn spoofed_inner_source_is_dropped_and_counted() {
    let mut sim = Sim::mesh(2, None);
    assert!(sim.ping(0, 1, b"up"));
    // Node 1 sends a packet claiming an inner source it does not own.
    let forged = ipv4(
        Ipv4Addr::new(100, 64, 0, 99),
        sim.nodes[0].overlay,
        b"spoof",
    );
    let before = sim.nodes[0].delivered.len();
    sim.send(1, &forged);
    assert_eq!(
        sim.nodes[0].delivered.len(),
        before,
        "spoofed packet was delivered"
    );
    assert_eq!(sim.peer_status(0, 1).drops.spoofed_source, 1);
    // Genuine traffic still flows.
    assert!(sim.ping(1, 0, b"genuine"));
}

#[test]
fn longest_prefix_picks_the_peer() {
    let mut sim = Sim::mesh(3, None);
    // Node 1 also routes 10.0.0.0/8, node 2 the narrower 10.1.0.0/16.
    let mut cfg = sim.nodes[0].device.config();
    cfg.peers[0].allowed_ips.push("10.0.0.0/8".parse().unwrap());
    cfg.peers[1]
        .allowed_ips
        .push("10.1.0.0/16".parse().unwrap());
    sim.nodes[0].device.set_config(cfg);
    // Nodes 1 and 2 accept any inner source from node 0.
    for node in [1usize, 2] {
        let mut c = sim.nodes[node].device.config();
        c.peers[0].allowed_ips.push("0.0.0.0/0".parse().unwrap());
        sim.nodes[node].device.set_config(c);
    }
    let to = |d: [u8; 4]| ipv4(Ipv4Addr::new(100, 64, 0, 1), Ipv4Addr::from(d), b"x");
    sim.send(0, &to([10, 1, 2, 3]));
    sim.send(0, &to([10, 2, 2, 3]));
    assert_eq!(
        sim.nodes[2].delivered.last().map(|p| p[16..20].to_vec()),
        Some(vec![10, 1, 2, 3])
    );
    assert_eq!(
        sim.nodes[1].delivered.last().map(|p| p[16..20].to_vec()),
        Some(vec![10, 2, 2, 3])
    );
    // Nothing routes 192.0.2.1: dropped and counted.
    sim.send(0, &to([192, 0, 2, 1]));
    assert_eq!(
        sim.nodes[0]
            .device
            .drops()
            .no_route
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn reconfiguring_other_peers_keeps_a_live_session() {
    let mut sim = Sim::mesh(2, None);
    assert!(sim.ping(0, 1, b"up"));
    sim.advance(Duration::from_secs(30));
    let age = sim.handshake_age(0, 1).unwrap();
    // Add an unrelated peer and change node 1's allowed IPs: node 0's session with 1 stays.
    let mut cfg = sim.nodes[0].device.config();
    cfg.peers.push(PeerConfig {
        public_key: key(42).public_key(),
        preshared_key: None,
        endpoint: Some(underlay(42, 1)),
        allowed_ips: vec!["100.64.0.42/32".parse().unwrap()],
        persistent_keepalive: None,
    });
    cfg.peers[0]
        .allowed_ips
        .push("10.9.0.0/16".parse().unwrap());
    sim.nodes[0].device.set_config(cfg);
    let wire_before = sim.wire.len();
    assert!(sim.ping(0, 1, b"still up"));
    assert!(
        sim.handshake_age(0, 1).unwrap() >= age,
        "the session was restarted"
    );
    assert_eq!(wire_before, 0);
    // Removing the peer ends its session; routes to it go with it.
    let mut cfg = sim.nodes[0].device.config();
    cfg.peers.retain(|p| p.public_key == key(42).public_key());
    sim.nodes[0].device.set_config(cfg);
    let before = sim.nodes[1].delivered.len();
    sim.send(
        0,
        &ipv4(sim.nodes[0].overlay, sim.nodes[1].overlay, b"gone"),
    );
    assert_eq!(sim.nodes[1].delivered.len(), before);
}

#[test]
fn garbage_from_the_network_is_dropped_without_panic() {
    let mut sim = Sim::mesh(2, None);
    assert!(sim.ping(0, 1, b"up"));
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for len in 0..2000usize {
        let mut d = Vec::with_capacity(len);
        for _ in 0..len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            d.push(x as u8);
        }
        // Make many of them look like each WireGuard message type.
        if len > 0 {
            d[0] = (len % 5) as u8;
        }
        sim.wire.push_back((underlay(66, 6), sim.nodes[0].addr, d));
    }
    let before = sim.nodes[0].delivered.len();
    sim.run();
    assert_eq!(
        sim.nodes[0].delivered.len(),
        before,
        "garbage reached the TUN device"
    );
    assert_eq!(
        sim.peer_status(0, 1).endpoint,
        Some(sim.nodes[1].addr),
        "garbage moved an endpoint"
    );
    assert!(sim.ping(1, 0, b"still fine"));
    assert!(
        sim.nodes[0]
            .device
            .drops()
            .unknown_peer
            .load(std::sync::atomic::Ordering::Relaxed)
            > 1000
    );
}

/// A data message whose plaintext could not fit a packet slot (longer than any MTU the
/// receiver has room for) is dropped, not handed to boringtun, which panics on it.
#[test]
fn a_data_message_longer_than_a_packet_slot_is_dropped_without_panic() {
    let mut sim = Sim::mesh(2, None);
    // Node 1 learns node 0's endpoint from its first packet.
    assert!(sim.ping(0, 1, b"up") && sim.ping(1, 0, b"back"));
    let mut net = NetBatch::with_capacity(4096);
    let p = ipv4(sim.nodes[1].overlay, sim.nodes[0].overlay, b"x");
    sim.nodes[1].device.outbound(&p, &mut net);
    let item = net.items()[0];
    let mut long = net.bytes(item.start, item.len).to_vec();
    long.resize(4096, 0);
    sim.wire
        .push_back((sim.nodes[1].addr, sim.nodes[0].addr, long));
    let before = sim.nodes[0].delivered.len();
    sim.run();
    assert_eq!(sim.nodes[0].delivered.len(), before);
    assert_eq!(sim.peer_status(0, 1).drops.other, 1);
    assert!(sim.ping(1, 0, b"still fine"));
}

/// Node 0's first handshake initiation to node 1 (node 0 knows node 1's endpoint).
fn first_initiation(sim: &Sim) -> Vec<u8> {
    let mut net = NetBatch::with_capacity(4096);
    sim.nodes[0].device.outbound(
        &ipv4(sim.nodes[0].overlay, sim.nodes[1].overlay, b"x"),
        &mut net,
    );
    let init = net.bytes(net.items()[0].start, net.items()[0].len).to_vec();
    assert_eq!(init[0], 1);
    init
}

/// Node 1 receives `datagram` `times` times from a flooding address; what it answers, counted
/// by WireGuard message type (index 1 to 3; 0 for anything else).
fn replay(sim: &Sim, datagram: &[u8], times: usize) -> [usize; 4] {
    let mut answers = [0usize; 4];
    for _ in 0..times {
        let mut tun = TunBatch::new(1, 16, 2048);
        let mut out = NetBatch::with_capacity(4096);
        sim.nodes[1]
            .device
            .inbound(underlay(66, 6), datagram, &mut tun, &mut out);
        for i in out.items() {
            let kind = usize::from(out.bytes(i.start, i.len)[0]);
            answers[if kind <= 3 { kind } else { 0 }] += 1;
        }
    }
    answers
}

#[test]
fn handshake_flood_engages_cookies_and_real_peers_still_connect() {
    let mut sim = Sim::mesh(2, None);
    // Capture a genuine handshake initiation to replay as a flood.
    let mut net = NetBatch::with_capacity(4096);
    sim.nodes[1].device.outbound(
        &ipv4(sim.nodes[1].overlay, sim.nodes[0].overlay, b"x"),
        &mut net,
    );
    assert!(net.is_empty(), "node 1 knows no endpoint for node 0 yet");
    let init = first_initiation(&sim);
    // Node 1 receives 500 copies from a flooding address within one limiter window.
    let cookies = replay(&sim, &init, 500)[3];
    assert!(cookies > 300, "only {cookies} cookie replies under load");
    // Node 0's own initiation was the one replayed, so its handshake is in flight; it retries
    // after REKEY_TIMEOUT (5 s), by which time the limiter's window has passed.
    sim.advance(Duration::from_secs(6));
    assert!(sim.ping(0, 1, b"after flood"));
}

#[test]
fn the_handshake_limit_counts_each_message_once() {
    // The device allows 100 handshake messages a second before it asks for cookies; each one
    // must count once (it once counted twice: cookies from the 51st).
    let sim = Sim::mesh(2, None);
    let init = first_initiation(&sim);
    let answers = replay(&sim, &init, 95);
    assert_eq!(answers[3], 0, "cookie replies below the limit: {answers:?}");
    assert_eq!(answers[0], 0, "nothing but handshake answers: {answers:?}");
    assert!(answers[2] >= 1, "the initiation was answered: {answers:?}");
    // Beyond it, cookies.
    let cookies = replay(&sim, &init, 20)[3];
    assert!(
        cookies >= 10,
        "only {cookies} cookie replies past the limit"
    );
}

/// The workload address of the move tests.
const WORKLOAD: Ipv4Addr = Ipv4Addr::new(100, 64, 50, 10);

/// Gives `WORKLOAD` to node `holder` in the peer tables of every other node.
fn route_workload(sim: &mut Sim, holder: usize) {
    for i in 0..sim.nodes.len() {
        let mut config = sim.nodes[i].device.config();
        let holder_key = sim.nodes[holder].key.public_key();
        for p in &mut config.peers {
            p.allowed_ips
                .retain(|n| n.addr() != std::net::IpAddr::V4(WORKLOAD));
            if p.public_key == holder_key {
                p.allowed_ips
                    .push(format!("{WORKLOAD}/32").parse().unwrap());
            }
        }
        sim.nodes[i].device.set_config(config);
    }
}

#[test]
fn a_released_workload_address_is_forwarded_to_its_new_holder() {
    MockClock::set_time(Duration::ZERO);
    let mut sim = Sim::mesh(3, None);
    // Every node knows every endpoint, as in a mesh made by the coordinator.
    for i in 0..3 {
        let mut config = sim.nodes[i].device.config();
        for p in &mut config.peers {
            let j = sim
                .nodes
                .iter()
                .position(|n| n.key.public_key() == p.public_key)
                .unwrap();
            p.endpoint = Some(sim.nodes[j].addr);
        }
        sim.nodes[i].device.set_config(config);
    }
    assert!(sim.ping(0, 1, b"hello 1"));
    assert!(sim.ping(0, 2, b"hello 2"));
    assert!(sim.ping(1, 2, b"1 to 2"));
    route_workload(&mut sim, 1);
    let to_workload = ipv4(sim.nodes[0].overlay, WORKLOAD, b"to the workload");
    sim.send(0, &to_workload);
    assert_eq!(
        sim.nodes[1].delivered.last(),
        Some(&to_workload),
        "node 1 holds it"
    );

    // Node 1 hands the address to node 2; node 0 has not heard yet and still sends to node 1.
    let (k0, k1, k2) = (
        sim.nodes[0].key.public_key(),
        sim.nodes[1].key.public_key(),
        sim.nodes[2].key.public_key(),
    );
    sim.nodes[1].device.set_workload_routing(WorkloadRouting {
        forward: [(WORKLOAD.into(), k2)].into(),
        ..WorkloadRouting::default()
    });
    let before = sim.nodes[2].delivered.len();
    let in_flight = ipv4(sim.nodes[0].overlay, WORKLOAD, b"in flight");
    sim.send(0, &in_flight);
    assert!(
        !sim.nodes[1].delivered.contains(&in_flight),
        "the old holder does not deliver it"
    );
    assert_eq!(
        sim.nodes[2].delivered.len(),
        before,
        "the new holder refuses a relayed packet it was not told to accept"
    );
    assert_eq!(
        sim.nodes[2]
            .device
            .status(SystemTime::now())
            .peers
            .iter()
            .map(|p| p.drops.spoofed_source)
            .sum::<u64>(),
        1
    );

    sim.nodes[2].device.set_workload_routing(WorkloadRouting {
        relay_from: [(WORKLOAD.into(), k1)].into(),
        relay_sources: [sim.nodes[0].overlay.into(), sim.nodes[1].overlay.into()].into(),
        ..WorkloadRouting::default()
    });
    sim.send(0, &in_flight);
    assert_eq!(
        sim.nodes[2].delivered.last(),
        Some(&in_flight),
        "relayed by the old holder to the new one"
    );
    assert_eq!(
        sim.nodes[1]
            .device
            .drops()
            .forwarded
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );

    // The new holder answers from the workload address before node 0 routes it there: node 0
    // accepts it from node 2 only once its workload routing lists node 2 as a sender (the
    // reconciler sets it before the peer table).
    let answer = ipv4(WORKLOAD, sim.nodes[0].overlay, b"answer");
    let before = sim.nodes[0].delivered.len();
    sim.send(2, &answer);
    assert_eq!(
        sim.nodes[0].delivered.len(),
        before,
        "not yet a sender: dropped as spoofed"
    );
    sim.nodes[0].device.set_workload_routing(WorkloadRouting {
        also_from: [(WORKLOAD.into(), vec![k1, k2])].into(),
        ..WorkloadRouting::default()
    });
    sim.send(2, &answer);
    assert_eq!(sim.nodes[0].delivered.last(), Some(&answer));

    // Once node 0 learns of the move it sends to node 2 directly; nothing is forwarded.
    route_workload(&mut sim, 2);
    let direct = ipv4(sim.nodes[0].overlay, WORKLOAD, b"direct");
    sim.send(0, &direct);
    assert_eq!(sim.nodes[2].delivered.last(), Some(&direct));
    assert_eq!(
        sim.nodes[1]
            .device
            .drops()
            .forwarded
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    let _ = k0;
}

#[test]
fn forwarding_never_sends_a_packet_back_to_its_sender() {
    MockClock::set_time(Duration::ZERO);
    let mut sim = Sim::mesh(2, None);
    assert!(sim.ping(0, 1, b"hello"));
    route_workload(&mut sim, 1);
    // Node 1 was told to forward the address to node 0, which itself sends to it: a loop.
    let k0 = sim.nodes[0].key.public_key();
    sim.nodes[1].device.set_workload_routing(WorkloadRouting {
        forward: [(WORKLOAD.into(), k0)].into(),
        ..WorkloadRouting::default()
    });
    let p = ipv4(sim.nodes[0].overlay, WORKLOAD, b"loop?");
    let wire_before = sim.lost;
    sim.send(0, &p);
    assert_eq!(
        sim.nodes[1].delivered.last(),
        Some(&p),
        "delivered locally instead of bounced"
    );
    assert_eq!(sim.lost, wire_before);
    assert_eq!(
        sim.nodes[1]
            .device
            .drops()
            .forwarded
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

/// Adds `prefix` to the allowed IPs of `owner` in every other node's peer table (a LAN behind
/// it, or another workload it holds).
fn route_prefix(sim: &mut Sim, owner: usize, prefix: &str) {
    let owner_key = sim.nodes[owner].key.public_key();
    for i in 0..sim.nodes.len() {
        let mut config = sim.nodes[i].device.config();
        for p in config
            .peers
            .iter_mut()
            .filter(|p| p.public_key == owner_key)
        {
            p.allowed_ips.push(prefix.parse().unwrap());
        }
        sim.nodes[i].device.set_config(config);
    }
}

/// Gives every node every other node's endpoint, as in a mesh made by the coordinator.
fn know_every_endpoint(sim: &mut Sim) {
    for i in 0..sim.nodes.len() {
        let mut config = sim.nodes[i].device.config();
        for p in &mut config.peers {
            let j = sim
                .nodes
                .iter()
                .position(|n| n.key.public_key() == p.public_key)
                .unwrap();
            p.endpoint = Some(sim.nodes[j].addr);
        }
        sim.nodes[i].device.set_config(config);
    }
}

fn spoofed(sim: &Sim, node: usize) -> u64 {
    sim.nodes[node]
        .device
        .status(SystemTime::now())
        .peers
        .iter()
        .map(|p| p.drops.spoofed_source)
        .sum()
}

#[test]
fn a_relayed_packet_needs_a_node_address_as_source_and_the_workload_as_destination() {
    MockClock::set_time(Duration::ZERO);
    let mut sim = Sim::mesh(3, None);
    know_every_endpoint(&mut sim);
    // Node 0 routes a LAN and holds another workload address; node 2 holds WORKLOAD, which
    // node 1 held before and may relay to it for the grace period.
    route_prefix(&mut sim, 0, "10.1.0.0/24");
    route_prefix(&mut sim, 0, "100.64.50.11/32");
    route_workload(&mut sim, 2);
    assert!(sim.ping(1, 2, b"1 to 2"));
    let k1 = sim.nodes[1].key.public_key();
    let node_addresses = sim.nodes.iter().take(2).map(|n| n.overlay.into());
    sim.nodes[2].device.set_workload_routing(WorkloadRouting {
        relay_from: [(WORKLOAD.into(), k1)].into(),
        relay_sources: node_addresses.collect(),
        ..WorkloadRouting::default()
    });
    // Node 1 relays: what it sends carries other senders' addresses.
    let relay = |sim: &mut Sim, src: Ipv4Addr, dst: Ipv4Addr, tag: &[u8]| -> bool {
        let p = ipv4(src, dst, tag);
        let before = sim.nodes[2].delivered.len();
        sim.send(1, &p);
        sim.nodes[2].delivered[before..].contains(&p)
    };
    let (n0, n2) = (sim.nodes[0].overlay, sim.nodes[2].overlay);
    assert!(
        relay(&mut sim, n0, WORKLOAD, b"from node 0"),
        "a packet from a node's own address to the workload is relayed"
    );
    let spoofed_before = spoofed(&sim, 2);
    assert!(
        !relay(
            &mut sim,
            Ipv4Addr::new(10, 1, 0, 5),
            WORKLOAD,
            b"from a LAN"
        ),
        "a prefix a peer routes for others is no relayed sender"
    );
    assert!(
        !relay(
            &mut sim,
            Ipv4Addr::new(100, 64, 50, 11),
            WORKLOAD,
            b"from a workload"
        ),
        "another workload address is no relayed sender"
    );
    assert!(
        !relay(&mut sim, n0, n2, b"to node 2"),
        "only packets for the workload address are relayed"
    );
    assert_eq!(spoofed(&sim, 2), spoofed_before + 3);
}

/// A handover the coordinator has not confirmed yet: the new holder (node 2) keeps back what
/// reaches it for the workload address, from peers whose maps name it already and relayed by
/// the old holder (node 1), and delivers all of it, in order and before anything newer, once
/// the address is held and up; nothing is answered before. What it keeps for an address that
/// goes elsewhere, or longer than the timeout, is dropped and counted.
#[test]
fn an_unconfirmed_new_holder_keeps_packets_back_until_the_address_is_held_and_up() {
    use meshlink_agent::dataplane::handover::HANDOVER_TIMEOUT;
    use meshlink_agent::dataplane::FirewallConfig;
    MockClock::set_time(Duration::ZERO);
    let mut sim = Sim::mesh(3, None);
    know_every_endpoint(&mut sim);
    assert!(sim.ping(0, 2, b"0 to 2"));
    assert!(sim.ping(1, 2, b"1 to 2"));
    let k1 = sim.nodes[1].key.public_key();
    let k2 = sim.nodes[2].key.public_key();
    let w: std::net::IpAddr = WORKLOAD.into();
    let n2: std::net::IpAddr = sim.nodes[2].overlay.into();
    // Node 2 checks destinations, as a mesh node does: its own address; the workload address
    // only once held.
    let local = |held: bool| FirewallConfig {
        local: Some(
            std::iter::once(format!("{n2}/32").parse().unwrap())
                .chain(held.then(|| format!("{WORKLOAD}/32").parse().unwrap()))
                .collect(),
        ),
        policy: None,
    };
    sim.nodes[2].device.set_firewall(local(false));
    let awaited = WorkloadRouting {
        awaited: [w].into(),
        relay_from: [(w, k1)].into(),
        relay_sources: [sim.nodes[0].overlay.into(), sim.nodes[1].overlay.into()].into(),
        workloads: [w].into(),
        ..WorkloadRouting::default()
    };
    sim.nodes[2].device.set_workload_routing(awaited.clone());
    // Node 0 routes the address to node 2 already; node 1 forwards what still reaches it.
    route_workload(&mut sim, 2);
    sim.nodes[1].device.set_workload_routing(WorkloadRouting {
        forward: [(w, k2)].into(),
        ..WorkloadRouting::default()
    });
    let p = |sim: &Sim, i: u8| ipv4(sim.nodes[0].overlay, WORKLOAD, &[i; 8]);
    let delivered_before = sim.nodes[2].delivered.len();
    sim.send(0, &p(&sim, 1));
    let mut config = sim.nodes[0].device.config();
    // A packet sent to the old holder (node 0's map a moment behind), relayed to node 2.
    for peer in &mut config.peers {
        peer.allowed_ips.retain(|n| n.addr() != w);
        if peer.public_key == k1 {
            peer.allowed_ips
                .push(format!("{WORKLOAD}/32").parse().unwrap());
        }
    }
    sim.nodes[0].device.set_config(config);
    sim.send(0, &p(&sim, 2));
    route_workload(&mut sim, 2);
    sim.send(0, &p(&sim, 3));
    assert_eq!(
        sim.nodes[2].delivered.len(),
        delivered_before,
        "nothing answered before the confirmation"
    );
    let st = sim.nodes[2].device.handover_status();
    assert_eq!((st.queued, st.waiting, st.released), (3, 3, 0));
    assert_eq!(spoofed(&sim, 2), 0, "the relayed packet is taken");
    assert!(!sim.nodes[2].device.has_released());

    // Confirmed: held, but the address is not up on the interface yet. Still kept back.
    sim.nodes[2].device.set_firewall(local(true));
    let held = WorkloadRouting {
        awaited: Default::default(),
        held: [w].into(),
        ..awaited.clone()
    };
    sim.nodes[2].device.set_workload_routing(held.clone());
    sim.send(0, &p(&sim, 4));
    assert!(!sim.nodes[2].device.has_released());
    assert_eq!(sim.nodes[2].delivered.len(), delivered_before);
    // Up: released in order, ahead of anything newer.
    sim.nodes[2].device.set_addresses_up([w]);
    assert!(sim.nodes[2].device.has_released());
    sim.send(0, &p(&sim, 5));
    let mut tun = TunBatch::new(2, 16, 2048);
    assert_eq!(sim.release(2, &mut tun), 5);
    assert_eq!(
        sim.nodes[2].delivered[delivered_before..],
        (1..=5).map(|i| p(&sim, i)).collect::<Vec<_>>()
    );
    assert!(!sim.nodes[2].device.has_released());
    sim.send(0, &p(&sim, 6));
    assert_eq!(
        sim.nodes[2].delivered.last(),
        Some(&p(&sim, 6)),
        "directly now"
    );
    let st = sim.nodes[2].device.handover_status();
    assert_eq!(
        (st.queued, st.released, st.waiting, st.denied, st.not_local),
        (5, 5, 0, 0, 0)
    );

    // Another move here that goes elsewhere before its confirmation: dropped, abandoned.
    sim.nodes[2].device.set_addresses_up([]);
    sim.nodes[2].device.set_firewall(local(false));
    sim.nodes[2].device.set_workload_routing(awaited.clone());
    sim.send(0, &p(&sim, 7));
    sim.nodes[2].device.set_workload_routing(WorkloadRouting {
        workloads: [w].into(),
        ..WorkloadRouting::default()
    });
    let st = sim.nodes[2].device.handover_status();
    assert_eq!((st.abandoned, st.waiting), (1, 0));
    // Neither held nor awaited: dropped as not local, and named.
    sim.send(0, &p(&sim, 8));
    assert_eq!(sim.nodes[2].device.handover_status().not_held, 1);
    // No confirmation within the timeout: dropped, timed out.
    sim.nodes[2].device.set_workload_routing(awaited);
    sim.send(0, &p(&sim, 9));
    sim.advance(HANDOVER_TIMEOUT + TICK);
    let st = sim.nodes[2].device.handover_status();
    assert_eq!((st.timed_out, st.waiting), (1, 0));
    sim.nodes[2].device.set_firewall(local(true));
    sim.nodes[2].device.set_workload_routing(held);
    sim.nodes[2].device.set_addresses_up([w]);
    assert_eq!(sim.release(2, &mut tun), 0);
    assert_eq!(
        st.queued,
        st.released + st.denied + st.not_local + st.full + st.timed_out + st.abandoned + st.waiting,
        "every packet kept back is accounted for: {st:?}"
    );
}

/// Node 2 awaits `WORKLOAD` (its handover not confirmed yet), which node 0 and node 1 route
/// to it already. Returns the routing that makes it held.
fn await_workload_at_node_2(sim: &mut Sim) -> WorkloadRouting {
    let w: std::net::IpAddr = WORKLOAD.into();
    route_workload(sim, 2);
    let awaited = WorkloadRouting {
        awaited: [w].into(),
        workloads: [w].into(),
        ..WorkloadRouting::default()
    };
    sim.nodes[2].device.set_workload_routing(awaited.clone());
    WorkloadRouting {
        awaited: Default::default(),
        held: [w].into(),
        ..awaited
    }
}

/// What is kept back goes out a batch at a time, the batch never growing, and a packet that
/// arrives after a batch is taken and before it is written (on another core, say) is kept
/// behind it: nothing newer overtakes what was kept.
#[test]
fn kept_packets_go_out_a_batch_at_a_time_and_nothing_newer_overtakes_them() {
    MockClock::set_time(Duration::ZERO);
    let mut sim = Sim::mesh(3, None);
    know_every_endpoint(&mut sim);
    assert!(sim.ping(0, 2, b"0 to 2"));
    let held = await_workload_at_node_2(&mut sim);
    let p = |sim: &Sim, i: u8| ipv4(sim.nodes[0].overlay, WORKLOAD, &[i; 8]);
    for i in 1..=5 {
        sim.send(0, &p(&sim, i));
    }
    let before = sim.nodes[2].delivered.len();
    sim.nodes[2].device.set_workload_routing(held);
    sim.nodes[2].device.set_addresses_up([WORKLOAD.into()]);
    let mut tun = TunBatch::new(2, 16, 2048);
    let mut written: Vec<Vec<u8>> = Vec::new();
    let mut next = 6;
    while sim.nodes[2].device.has_released() {
        sim.nodes[2]
            .device
            .take_released(&mut tun, &mut NetBatch::with_capacity(4096));
        assert_eq!(tun.len() + tun.free(), 2, "the batch did not grow");
        if next <= 8 {
            sim.send(0, &p(&sim, next));
            next += 1;
        }
        // What reached the TUN device directly meanwhile was written first.
        written.extend(sim.nodes[2].delivered.drain(before..));
        written.extend(tun.packets().map(<[u8]>::to_vec));
        tun.clear();
    }
    let sent = next - 1;
    assert_eq!(
        written,
        (1..=sent).map(|i| p(&sim, i)).collect::<Vec<_>>(),
        "in order"
    );
    assert_eq!(sent, 8, "three packets arrived during the release");
    // Then directly.
    sim.send(0, &p(&sim, 9));
    assert_eq!(sim.nodes[2].delivered[before..], [p(&sim, 9)]);
    let st = sim.nodes[2].device.handover_status();
    assert_eq!((st.queued, st.released, st.waiting), (8, 8, 0));
}

/// A kept packet comes out whole whatever the room of the batch it is released into (the
/// receive batches' at the MTU of its arrival may be larger).
#[test]
fn a_large_kept_packet_is_released_whole() {
    MockClock::set_time(Duration::ZERO);
    let mut sim = Sim::mesh(3, None);
    // Receive batches sized for an MTU of 9,000.
    sim.room = 9000 + 128;
    know_every_endpoint(&mut sim);
    assert!(sim.ping(0, 2, b"0 to 2"));
    let held = await_workload_at_node_2(&mut sim);
    let payload: Vec<u8> = (0..7000u32).map(|i| (i % 251) as u8).collect();
    let large = ipv4(sim.nodes[0].overlay, WORKLOAD, &payload);
    sim.send(0, &large);
    assert_eq!(sim.nodes[2].device.handover_status().waiting, 1);
    let before = sim.nodes[2].delivered.len();
    sim.nodes[2].device.set_workload_routing(held);
    sim.nodes[2].device.set_addresses_up([WORKLOAD.into()]);
    // A batch of a smaller room (the MTU lowered meanwhile).
    let mut tun = TunBatch::new(4, 16, 2048);
    assert_eq!(sim.release(2, &mut tun), 1);
    assert_eq!(sim.nodes[2].delivered[before..], [large]);
}

/// Node `node`'s count of packets its host sent that no peer routes.
fn no_route(sim: &Sim, node: usize) -> u64 {
    use std::sync::atomic::Ordering;
    sim.nodes[node]
        .device
        .drops()
        .no_route
        .load(Ordering::Relaxed)
}

/// The new holder's own host sends to the workload address during the handover (its map names
/// it the holder, the coordinator has not confirmed it): no peer routes the address and the
/// kernel does not have it yet, so the packets come out of its TUN device. They are kept back
/// with what peers send, not answered before the address is held and up, then delivered in
/// arrival order. (They were dropped for want of a route: the soak's lost pings.)
#[test]
fn the_new_holders_own_host_is_kept_back_and_answered_once_the_address_is_up() {
    MockClock::set_time(Duration::ZERO);
    let mut sim = Sim::mesh(3, None);
    know_every_endpoint(&mut sim);
    assert!(sim.ping(0, 2, b"0 to 2"));
    let held = await_workload_at_node_2(&mut sim);
    let n2 = sim.nodes[2].overlay;
    let mine = |i: u8| ipv4(n2, WORKLOAD, &[i; 8]);
    let theirs = ipv4(sim.nodes[0].overlay, WORKLOAD, &[2; 8]);
    let before = sim.nodes[2].delivered.len();
    sim.send(2, &mine(1));
    sim.send(0, &theirs);
    sim.send(2, &mine(3));
    assert_eq!(
        no_route(&sim, 2),
        0,
        "kept, not dropped for want of a route"
    );
    assert!(
        sim.nodes[2].device.take_kept_from_host(),
        "the send loop wakes the receive loop"
    );
    assert!(!sim.nodes[2].device.take_kept_from_host());
    assert_eq!(sim.nodes[2].delivered.len(), before, "nothing answered");
    assert_eq!(sim.nodes[2].device.handover_status().waiting, 3);
    // Confirmed, the address not up yet: still kept back.
    sim.nodes[2].device.set_workload_routing(held);
    assert!(!sim.nodes[2].device.has_released());
    sim.send(2, &mine(4));
    // Up: written to its own TUN device, in arrival order.
    sim.nodes[2].device.set_addresses_up([WORKLOAD.into()]);
    let mut tun = TunBatch::new(2, 16, 2048);
    assert_eq!(sim.release(2, &mut tun), 4);
    assert_eq!(
        sim.nodes[2].delivered[before..],
        [mine(1), theirs, mine(3), mine(4)]
    );
    // Written by its host just before the address came up and read after the release: kept
    // and delivered at the wake-up it causes.
    sim.send(2, &mine(5));
    assert!(sim.nodes[2].device.take_kept_from_host());
    assert_eq!(sim.release(2, &mut tun), 1);
    assert_eq!(sim.nodes[2].delivered.last(), Some(&mine(5)));
    // Nothing else changes: a destination no peer routes is dropped, counted.
    sim.send(2, &ipv4(n2, Ipv4Addr::new(100, 64, 9, 9), b"nowhere"));
    assert_eq!(no_route(&sim, 2), 1);
    let st = sim.nodes[2].device.handover_status();
    assert_eq!((st.queued, st.released, st.waiting), (5, 5, 0), "{st:?}");
}

/// While a move to node 2 is only being prepared, node 1 still holds the address and the map
/// routes it there: node 2's own host sends to node 1 as before, so that a preparation that
/// does not land (a live migration refused, a move that lost its race) holds nothing up.
#[test]
fn a_prepared_holders_own_host_still_goes_to_the_holder() {
    MockClock::set_time(Duration::ZERO);
    let mut sim = Sim::mesh(3, None);
    know_every_endpoint(&mut sim);
    assert!(sim.ping(2, 1, b"2 to 1"));
    route_workload(&mut sim, 1);
    let w: std::net::IpAddr = WORKLOAD.into();
    let k1 = sim.nodes[1].key.public_key();
    let prepared = WorkloadRouting {
        awaited: [w].into(),
        relay_from: [(w, k1)].into(),
        workloads: [w].into(),
        ..WorkloadRouting::default()
    };
    sim.nodes[2].device.set_workload_routing(prepared);
    let n2 = sim.nodes[2].overlay;
    let mine = |i: u8| ipv4(n2, WORKLOAD, &[i; 8]);
    let at_holder = sim.nodes[1].delivered.len();
    sim.send(2, &mine(1));
    sim.send(2, &mine(2));
    assert_eq!(sim.nodes[1].delivered[at_holder..], [mine(1), mine(2)]);
    let st = sim.nodes[2].device.handover_status();
    assert_eq!((st.queued, st.waiting), (0, 0), "{st:?}");
}

/// The kernel takes packets with the host's own source from a mesh node's TUN device (its
/// own, kept back at a handover): a peer never may send from one of the node's own addresses,
/// whatever its allowed IPs cover.
#[test]
fn no_peer_may_send_from_the_nodes_own_address() {
    let mut sim = Sim::mesh(2, None);
    assert!(sim.ping(0, 1, b"up"));
    // Node 0 routes the whole network to node 1 (a hand-written configuration, say).
    let mut config = sim.nodes[0].device.config();
    config.peers[0].allowed_ips = vec!["100.64.0.0/16".parse().unwrap()];
    sim.nodes[0].device.set_config(config);
    let n0 = sim.nodes[0].overlay;
    let forged = |tag: &[u8]| ipv4(n0, n0, tag);
    let before = sim.nodes[0].delivered.len();
    sim.send(1, &forged(b"as you, before"));
    assert_eq!(
        sim.nodes[0].delivered.len(),
        before + 1,
        "its allowed IPs cover it"
    );
    sim.nodes[0].device.set_own_addresses([n0.into()]);
    sim.send(1, &forged(b"as you"));
    assert_eq!(sim.nodes[0].delivered.len(), before + 1, "refused");
    assert_eq!(sim.peer_status(0, 1).drops.spoofed_source, 1);
    assert!(sim.ping(1, 0, b"from its own address"));
}

/// A workload address up at node 0 while node 1 holds it (prepared there ahead of a move, or
/// lingering after one) is one of node 0's own addresses, and node 1 answers from it what
/// node 0's host sent it before: those answers pass, from node 1 only (the fencing state
/// lets it send from the address). Any other own address stays refused, and so does the
/// workload address from a peer whose allowed IPs merely cover it. (Refused, a ping's answer
/// was lost at each move onto or off the pinging node.)
#[test]
fn the_holder_answers_from_a_workload_address_that_is_up_here_too() {
    let mut sim = Sim::mesh(3, None);
    know_every_endpoint(&mut sim);
    assert!(sim.ping(0, 1, b"up"));
    assert!(sim.ping(0, 2, b"up"));
    route_workload(&mut sim, 1);
    // Node 2 routes the whole network to node 0's peers (a hand-written configuration).
    let mut config = sim.nodes[0].device.config();
    let k2 = sim.nodes[2].key.public_key();
    for p in &mut config.peers {
        if p.public_key == k2 {
            p.allowed_ips.push("100.64.0.0/16".parse().unwrap());
        }
    }
    sim.nodes[0].device.set_config(config);
    let n0 = sim.nodes[0].overlay;
    sim.nodes[0]
        .device
        .set_own_addresses([n0.into(), WORKLOAD.into()]);
    let w: std::net::IpAddr = WORKLOAD.into();
    sim.nodes[0].device.set_workload_routing(WorkloadRouting {
        also_from: [(w, vec![sim.nodes[1].key.public_key()])].into(),
        workloads: [w].into(),
        ..WorkloadRouting::default()
    });
    let answer = |tag: &[u8]| ipv4(WORKLOAD, n0, tag);
    let before = sim.nodes[0].delivered.len();
    sim.send(1, &answer(b"from the holder"));
    sim.send(2, &answer(b"covered only"));
    sim.send(2, &ipv4(n0, n0, b"as node 0"));
    assert_eq!(
        sim.nodes[0].delivered[before..],
        [answer(b"from the holder")]
    );
    assert_eq!(sim.peer_status(0, 2).drops.spoofed_source, 2);
    assert_eq!(sim.peer_status(0, 1).drops.spoofed_source, 0);
}

#[test]
fn warming_before_a_move_renews_old_sessions_and_skips_silent_peers() {
    MockClock::set_time(Duration::ZERO);
    let mut sim = Sim::mesh(3, None);
    assert!(sim.ping(0, 1, b"hello 1"));
    let (fresh, alive) = (Duration::from_secs(90), Duration::from_secs(600));
    // Node 2 has never answered node 0: it does not hold the check up.
    assert!(sim.nodes[0].device.all_fresh(fresh, alive, None));
    sim.advance(Duration::from_secs(100));
    assert!(
        !sim.nodes[0].device.all_fresh(fresh, alive, None),
        "a 100 s old session is not fresh"
    );
    let mut net = NetBatch::with_capacity(4096);
    let started = sim.nodes[0].device.warm(fresh, None, &mut net);
    assert_eq!(started, 2, "both peers are asked");
    sim.enqueue(0, &net);
    sim.run();
    assert!(
        sim.nodes[0].device.all_fresh(fresh, alive, None),
        "the live peer answered the handshake"
    );
    let mut net = NetBatch::with_capacity(4096);
    assert_eq!(
        sim.nodes[0].device.warm(fresh, None, &mut net),
        0,
        "both peers answered: nothing to renew"
    );
    // Traffic on the renewed session still flows.
    assert!(sim.ping(0, 1, b"after the rekey"));
}

#[test]
fn the_talkers_of_a_held_workload_are_remembered_and_a_move_warms_only_them() {
    MockClock::set_time(Duration::ZERO);
    let mut sim = Sim::mesh(4, None);
    know_every_endpoint(&mut sim);
    // Node 1 holds the workload address; nodes 2 and 3 send to it, node 0 only to node 1.
    route_workload(&mut sim, 1);
    let w: std::net::IpAddr = WORKLOAD.into();
    let routing = WorkloadRouting {
        held: [w].into(),
        workloads: [w].into(),
        ..WorkloadRouting::default()
    };
    sim.nodes[1].device.set_workload_routing(routing);
    sim.nodes[1].device.set_addresses_up([w]);
    for n in [2, 3] {
        let p = ipv4(sim.nodes[n].overlay, WORKLOAD, b"to the workload");
        sim.send(n, &p);
        assert!(sim.nodes[1].delivered.contains(&p), "node {n}'s packet");
    }
    assert!(sim.ping(0, 1, b"to node 1 itself"));
    let keys: Vec<_> = sim.nodes.iter().map(|n| n.key.public_key()).collect();
    let key = |i: usize| keys[i];
    let window = Duration::from_secs(60);
    let mut talkers = sim.nodes[1].device.talkers(w, window, 64);
    talkers.sort();
    let mut want = vec![key(2), key(3)];
    want.sort();
    assert_eq!(talkers, want, "nodes 2 and 3, not node 0");
    assert_eq!(
        sim.nodes[1].device.talkers(w, window, 1).len(),
        1,
        "at most max"
    );
    // Node 0, the destination of a move, warms the holder and the talkers it was told of:
    // one handshake per peer that matters, not one per peer of the mesh.
    sim.advance(Duration::from_secs(100));
    let fresh = Duration::from_secs(90);
    let only: std::collections::HashSet<_> = [key(1), key(2)].into();
    let mut net = NetBatch::with_capacity(4096);
    assert_eq!(sim.nodes[0].device.warm(fresh, Some(&only), &mut net), 2);
    sim.enqueue(0, &net);
    sim.run();
    let alive = Duration::from_secs(600);
    assert!(sim.nodes[0].device.all_fresh(fresh, alive, Some(&only)));
    assert!(
        sim.handshake_age(0, 3).is_some_and(|age| age > fresh),
        "node 3 was not asked: its session is as old as it was ({:?})",
        sim.handshake_age(0, 3)
    );
    // Long after the last packet to the address, nobody is a talker any more.
    sim.advance(Duration::from_secs(61));
    assert!(sim.nodes[1].device.talkers(w, window, 64).is_empty());
}

#[test]
fn a_new_endpoint_for_a_peer_without_a_session_is_tried_at_once() {
    let mut sim = Sim::mesh(2, None);
    // Node 0 first knows node 1 by an address that goes nowhere (a private address behind
    // another NAT): its handshake is lost.
    let mut config = sim.nodes[0].device.config();
    config.peers[0].endpoint = Some(underlay(200, 51820));
    sim.nodes[0].device.set_config(config.clone());
    assert!(!sim.ping(0, 1, b"lost"));
    assert!(sim.lost > 0);
    // Path discovery finds the right address: the handshake goes there at the next tick,
    // not at WireGuard's 5 s retry.
    config.peers[0].endpoint = Some(sim.nodes[1].addr);
    sim.nodes[0].device.set_config(config);
    sim.advance(Duration::from_millis(500));
    assert!(
        sim.handshake_age(0, 1).is_some(),
        "no handshake within 500 ms"
    );
    assert!(sim.ping(0, 1, b"through"));
}

#[test]
fn a_datagram_from_loopback_does_not_pull_a_peer_off_its_direct_path() {
    let mut sim = Sim::mesh(2, None);
    assert!(sim.ping(0, 1, b"direct"));
    let direct = sim.nodes[1].addr;
    // Node 1's packets arrive through a relay shim on loopback (what the relay still carried
    // after the path turned direct): delivered, but the endpoint stays direct.
    sim.nodes[1].addr = "127.0.0.1:40000".parse().unwrap();
    assert!(sim.ping(1, 0, b"relayed"));
    assert_eq!(sim.peer_status(0, 1).endpoint, Some(direct));
    // From another public address (a NAT rebinding), roaming still follows.
    sim.nodes[1].addr = underlay(77, 40000);
    assert!(sim.ping(1, 0, b"rebound"));
    assert_eq!(sim.peer_status(0, 1).endpoint, Some(underlay(77, 40000)));
}

// Policy enforcement: real devices, a real policy compiled for each node by
// `meshlink_proto::policy::NodeTable`, packets through WireGuard both ways.

mod policy {
    use super::*;
    use std::sync::Arc;

    use meshlink_agent::dataplane::{CompiledPolicy, FirewallConfig, GatewayConfig};
    use meshlink_proto::policy::{Policy, Ports, Rule, Selector};
    use meshlink_proto::{Netmap, PeerInfo};

    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;

    /// A TCP segment with a correct total length.
    fn tcp(
        src: Ipv4Addr,
        sport: u16,
        dst: Ipv4Addr,
        dport: u16,
        flags: u8,
        data: &[u8],
    ) -> Vec<u8> {
        let total = 20 + 20 + data.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p[32] = 0x50;
        p[33] = flags;
        p[40..].copy_from_slice(data);
        p
    }

    /// The map of the simulated mesh: node i is `n{i}`, id i + 1, with its overlay address and
    /// the extra prefixes given.
    fn map_of(sim: &Sim, extra: &[(usize, &str)]) -> Netmap {
        let mut map = Netmap::default();
        for (i, n) in sim.nodes.iter().enumerate() {
            let own: ipnet::IpNet = format!("{}/32", n.overlay).parse().unwrap();
            let mut allowed = vec![own];
            allowed.extend(
                extra
                    .iter()
                    .filter(|(j, _)| *j == i)
                    .map(|(_, p)| p.parse::<ipnet::IpNet>().unwrap()),
            );
            map.peers.insert(
                i as u64 + 1,
                PeerInfo {
                    node_id: i as u64 + 1,
                    name: format!("n{i}"),
                    public_key: n.key.public_key(),
                    next_key: None,
                    addresses: vec![own],
                    allowed_ips: allowed,
                    endpoints: Vec::new(),
                    labels: Default::default(),
                    tags: Vec::new(),
                    via: None,
                },
            );
        }
        map
    }

    fn rule(line: u32, from: &str, to: &str, ports: &str) -> Rule {
        Rule {
            line,
            from: vec![from.parse::<Selector>().unwrap()],
            to: vec![to.parse::<Selector>().unwrap()],
            ports: vec![ports.parse::<Ports>().unwrap()],
        }
    }

    /// Sets every node's firewall as the mesh reconciler would: its own prefixes of `map` as
    /// local destinations, and `policy` compiled for it.
    fn enforce(sim: &Sim, map: &Netmap, policy: Option<&Policy>) {
        for (i, n) in sim.nodes.iter().enumerate() {
            let id = i as u64 + 1;
            n.device.set_firewall(FirewallConfig {
                local: Some(map.routed_to(id)),
                policy: policy.map(|p| Arc::new(CompiledPolicy::compile(p, map, id))),
            });
        }
    }

    /// Sends `p` from node `a`; whether node `b` received exactly it.
    fn deliver(sim: &mut Sim, a: usize, b: usize, p: &[u8]) -> bool {
        let before = sim.nodes[b].delivered.len();
        sim.send(a, p);
        sim.nodes[b].delivered[before..].iter().any(|d| d == p)
    }

    /// Node `node`'s drop counts for packets from `peer`.
    fn drops(sim: &Sim, node: usize, peer: usize) -> meshlink_agent::dataplane::status::DropCounts {
        sim.peer_status(node, peer).drops
    }

    /// Node 2's firewall, with workload `web` (at [`WORKLOAD`], moving to node 2, id 3, from
    /// id 2) local or not yet, under a policy letting `from` reach it on UDP port 5000.
    fn web_moving_to_node_2(sim: &Sim, from: &str) -> impl Fn(bool) -> FirewallConfig {
        use meshlink_proto::workload::WorkloadInfo;
        let mut map = map_of(sim, &[]);
        let web: ipnet::IpNet = format!("{WORKLOAD}/32").parse().unwrap();
        map.workloads.insert(
            "web".into(),
            WorkloadInfo {
                id: 1,
                name: "web".into(),
                address: web,
                holder: Some(3),
                generation: 2,
                previous: Some(2),
                candidates: vec![2, 3],
                grace_ms: None,
                tags: Vec::new(),
                address6: None,
            },
        );
        let policy = Policy {
            version: 1,
            rules: vec![rule(1, from, "workload:web", "udp:5000")],
        };
        let compiled = Arc::new(CompiledPolicy::compile(&policy, &map, 3));
        let local: Vec<ipnet::IpNet> = map.routed_to(3).into_iter().collect();
        let firewall = move |held: bool| FirewallConfig {
            local: Some(local.iter().copied().chain(held.then_some(web)).collect()),
            policy: Some(compiled.clone()),
        };
        firewall
    }

    fn mesh() -> Sim {
        MockClock::set_time(Duration::ZERO);
        let mut sim = Sim::mesh(3, None);
        know_every_endpoint(&mut sim);
        // Sessions first, so that every test packet is a data packet.
        assert!(sim.ping(0, 1, b"up") && sim.ping(0, 2, b"up") && sim.ping(1, 2, b"up"));
        sim
    }

    #[test]
    fn an_allowed_flow_works_both_ways_and_a_denied_one_is_dropped_and_counted() {
        let mut sim = mesh();
        let map = map_of(&sim, &[]);
        let policy = Policy {
            version: 7,
            rules: vec![
                rule(4, "node:n0", "node:n1", "tcp:22"),
                rule(9, "*", "node:n1", "udp:5000"),
            ],
        };
        enforce(&sim, &map, Some(&policy));
        let (n0, n1, n2) = (
            sim.nodes[0].overlay,
            sim.nodes[1].overlay,
            sim.nodes[2].overlay,
        );
        // n0 opens an ssh connection to n1: the flow works both ways.
        assert!(deliver(&mut sim, 0, 1, &tcp(n0, 40000, n1, 22, SYN, b"")));
        assert!(deliver(
            &mut sim,
            1,
            0,
            &tcp(n1, 22, n0, 40000, SYN | ACK, b"")
        ));
        for i in 0..20u8 {
            assert!(deliver(
                &mut sim,
                0,
                1,
                &tcp(n0, 40000, n1, 22, ACK, &[i; 100])
            ));
            assert!(deliver(
                &mut sim,
                1,
                0,
                &tcp(n1, 22, n0, 40000, ACK, &[i; 1000])
            ));
        }
        // UDP from anyone to n1's port 5000 (the `ipv4` helper's ports), and its answers.
        assert!(sim.ping(2, 1, b"udp to 5000"));
        assert!(deliver(
            &mut sim,
            1,
            2,
            &ipv4_ports(n1, 5000, n2, 4000, b"answer")
        ));
        // Denied: n2 to n1's ssh, n0 to another port, n1 to n0 at all.
        assert!(!deliver(&mut sim, 2, 1, &tcp(n2, 40000, n1, 22, SYN, b"")));
        assert!(!deliver(&mut sim, 0, 1, &tcp(n0, 40001, n1, 23, SYN, b"")));
        assert!(!deliver(&mut sim, 1, 0, &tcp(n1, 40002, n0, 22, SYN, b"")));
        assert!(!sim.ping(1, 0, b"udp to n0"));
        assert_eq!(drops(&sim, 1, 2).policy_denied, 1);
        assert_eq!(drops(&sim, 1, 0).policy_denied, 1);
        assert_eq!(drops(&sim, 0, 1).policy_denied, 2);
        let st = sim.nodes[1].device.firewall_status();
        assert_eq!(st.policy_version, Some(7));
        assert_eq!(st.denied, 2);
        assert_eq!(
            st.rules
                .iter()
                .map(|r| (r.line, r.flows))
                .collect::<Vec<_>>(),
            vec![(4, 1), (9, 1)],
            "one new flow per rule"
        );
        // The two flows n1 let in, and the two it opened towards n0 (which n0 denied).
        assert_eq!(st.flows.unwrap().flows, 4);
        assert_eq!(sim.lost, 0);
    }

    /// A UDP packet with the given ports.
    fn ipv4_ports(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, data: &[u8]) -> Vec<u8> {
        let mut p = ipv4(src, dst, data);
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p
    }

    #[test]
    fn replies_pass_against_a_policy_that_allows_only_the_other_direction() {
        let mut sim = mesh();
        let map = map_of(&sim, &[]);
        // n0 may reach n1's web server; nothing lets n1 open anything towards n0.
        let policy = Policy {
            version: 1,
            rules: vec![rule(1, "node:n0", "node:n1", "tcp:80")],
        };
        enforce(&sim, &map, Some(&policy));
        let (n0, n1) = (sim.nodes[0].overlay, sim.nodes[1].overlay);
        let reply = tcp(n1, 80, n0, 51000, SYN | ACK, b"");
        assert!(
            !deliver(&mut sim, 1, 0, &reply),
            "a 'reply' to nothing n0 sent is a new flow from n1, denied"
        );
        assert!(deliver(&mut sim, 0, 1, &tcp(n0, 51000, n1, 80, SYN, b"")));
        assert!(
            deliver(&mut sim, 1, 0, &reply),
            "n0 noted its flow: the reply passes"
        );
        assert!(deliver(
            &mut sim,
            1,
            0,
            &tcp(n1, 80, n0, 51000, ACK, b"page")
        ));
        assert_eq!(drops(&sim, 0, 1).policy_denied, 1);
    }

    #[test]
    fn a_packet_to_an_address_that_is_not_local_is_dropped_and_counted() {
        let mut sim = mesh();
        // n1 routes 10.1.0.0/24 (in the map); 192.168.1.0/24 behind it is not in the map, but
        // n0 routes it to n1 anyway (a peer that tries to use n1 as a router).
        route_prefix(&mut sim, 0, 1, "10.1.0.0/24");
        route_prefix(&mut sim, 0, 1, "192.168.1.0/24");
        let map = map_of(&sim, &[(1, "10.1.0.0/24")]);
        let n0 = sim.nodes[0].overlay;
        let lan = Ipv4Addr::new(192, 168, 1, 5);
        // Before the mesh's firewall is set (a static device): forwarded to the LAN.
        assert!(deliver(&mut sim, 0, 1, &ipv4(n0, lan, b"static")));
        enforce(&sim, &map, None);
        assert!(!deliver(&mut sim, 0, 1, &ipv4(n0, lan, b"mesh")));
        assert!(deliver(
            &mut sim,
            0,
            1,
            &ipv4(n0, Ipv4Addr::new(10, 1, 0, 9), b"routed")
        ));
        assert!(sim.ping(0, 1, b"to n1 itself"));
        assert_eq!(drops(&sim, 1, 0).not_local, 1);
        let st = sim.nodes[1].device.firewall_status();
        assert_eq!((st.not_local, st.policy_version), (1, None));
        assert!(st.destination_check);
        assert!(st.flows.is_none(), "no policy, no connection table");
    }

    /// Adds `prefix` to `owner`'s allowed IPs in node `at`'s peer table only.
    fn route_prefix(sim: &mut Sim, at: usize, owner: usize, prefix: &str) {
        let key = sim.nodes[owner].key.public_key();
        let mut config = sim.nodes[at].device.config();
        for p in config.peers.iter_mut().filter(|p| p.public_key == key) {
            p.allowed_ips.push(prefix.parse().unwrap());
        }
        sim.nodes[at].device.set_config(config);
    }

    #[test]
    fn a_policy_change_cuts_an_established_flow_it_denies() {
        let mut sim = mesh();
        let map = map_of(&sim, &[]);
        let v1 = Policy {
            version: 1,
            rules: vec![
                rule(2, "node:n0", "node:n1", "tcp:22"),
                rule(3, "node:n2", "node:n1", "tcp:22"),
            ],
        };
        enforce(&sim, &map, Some(&v1));
        let (n0, n1, n2) = (
            sim.nodes[0].overlay,
            sim.nodes[1].overlay,
            sim.nodes[2].overlay,
        );
        for (i, src) in [(0, n0), (2, n2)] {
            assert!(deliver(&mut sim, i, 1, &tcp(src, 40000, n1, 22, SYN, b"")));
            assert!(deliver(
                &mut sim,
                1,
                i,
                &tcp(n1, 22, src, 40000, SYN | ACK, b"")
            ));
            assert!(deliver(
                &mut sim,
                i,
                1,
                &tcp(src, 40000, n1, 22, ACK, b"ls")
            ));
        }
        sim.advance(Duration::from_secs(5));
        // Version 2 keeps n2's rule only; it reaches n1 without a restart.
        let v2 = Policy {
            version: 2,
            rules: vec![rule(3, "node:n2", "node:n1", "tcp:22")],
        };
        enforce(&sim, &map, Some(&v2));
        assert!(!deliver(
            &mut sim,
            0,
            1,
            &tcp(n0, 40000, n1, 22, ACK, b"ls -l")
        ));
        // n1's side of the cut flow still leaves n1 (n0's firewall has its flow), but does
        // not revive it at n1.
        assert!(deliver(
            &mut sim,
            1,
            0,
            &tcp(n1, 22, n0, 40000, ACK, b"output")
        ));
        assert!(!deliver(
            &mut sim,
            0,
            1,
            &tcp(n0, 40000, n1, 22, ACK, b"ls -a")
        ));
        assert!(
            deliver(&mut sim, 2, 1, &tcp(n2, 40000, n1, 22, ACK, b"ls -l")),
            "n2's flow is still allowed"
        );
        let st = sim.nodes[1].device.firewall_status();
        assert_eq!((st.policy_version, st.cut, st.denied), (Some(2), 1, 2));
        assert_eq!(drops(&sim, 1, 0).policy_denied, 2);
        // Policy cleared: open again.
        enforce(&sim, &map, None);
        assert!(deliver(&mut sim, 0, 1, &tcp(n0, 40000, n1, 22, ACK, b"ls")));
    }

    #[test]
    fn tracked_flows_time_out_on_the_clock_the_timer_loop_gives() {
        let mut sim = mesh();
        let map = map_of(&sim, &[]);
        let policy = Policy {
            version: 1,
            rules: vec![rule(1, "node:n0", "node:n1", "*")],
        };
        enforce(&sim, &map, Some(&policy));
        let (n0, n1) = (sim.nodes[0].overlay, sim.nodes[1].overlay);
        // n1 sends to n0 (noted at n1), n0's answer passes n1 within UDP's 60 s.
        let out = ipv4_ports(n1, 6000, n0, 7000, b"query");
        let answer = ipv4_ports(n0, 7000, n1, 6000, b"answer");
        sim.send(1, &out);
        sim.advance(Duration::from_secs(30));
        assert!(deliver(&mut sim, 0, 1, &answer), "n0 may send to n1 anyway");
        let flows = sim.nodes[1].device.firewall_status().flows.unwrap();
        assert_eq!(flows.flows, 1);
        // After 200 s of silence (answered UDP: 180 s) the sweep has reclaimed the flow.
        sim.advance(Duration::from_secs(200));
        let flows = sim.nodes[1].device.firewall_status().flows.unwrap();
        assert_eq!((flows.flows, flows.expired), (0, 1), "{flows:?}");
    }

    /// A new holder checks what it keeps back against the policy at once: a peer the policy
    /// lets reach the awaited address on one port cannot fill its queue with packets to
    /// another (dropped at once, counted as denied), and with packets the policy allows it
    /// pushes out only its own, not another peer's.
    #[test]
    fn an_awaited_address_keeps_back_only_what_the_policy_allows_and_no_peer_crowds_out_another() {
        use meshlink_agent::dataplane::handover::HANDOVER_PACKETS;
        let mut sim = mesh();
        let firewall = web_moving_to_node_2(&sim, "*");
        sim.nodes[2].device.set_firewall(firewall(false));
        let held = await_workload_at_node_2(&mut sim);
        let (n0, n1) = (sim.nodes[0].overlay, sim.nodes[1].overlay);
        let mine: Vec<Vec<u8>> = (0..3u8)
            .map(|i| ipv4_ports(n0, 4000, WORKLOAD, 5000, &[i; 8]))
            .collect();
        for p in &mine {
            sim.send(0, p);
        }
        // Node 1 floods: first to a port the policy denies, then to the one it allows.
        for i in 0..600u16 {
            sim.send(1, &tcp(n1, 40000 + i, WORKLOAD, 23, SYN, b""));
        }
        let st = sim.nodes[2].device.handover_status();
        assert_eq!((st.queued, st.denied, st.waiting), (603, 600, 3));
        assert_eq!(drops(&sim, 2, 1).policy_denied, 600);
        for i in 0..600u16 {
            sim.send(1, &ipv4_ports(n1, 4000, WORKLOAD, 5000, &i.to_be_bytes()));
        }
        let st = sim.nodes[2].device.handover_status();
        assert_eq!(st.waiting, HANDOVER_PACKETS as u64);
        assert_eq!(st.full, 603 - HANDOVER_PACKETS as u64);
        // Confirmed and up: node 0's packets were all kept, and come out first.
        let before = sim.nodes[2].delivered.len();
        sim.nodes[2].device.set_firewall(firewall(true));
        sim.nodes[2].device.set_workload_routing(held);
        sim.nodes[2].device.set_addresses_up([WORKLOAD.into()]);
        let mut tun = TunBatch::new(64, 16, 2048);
        assert_eq!(sim.release(2, &mut tun), HANDOVER_PACKETS);
        assert_eq!(sim.nodes[2].delivered[before..before + 3], mine[..]);
        let st = sim.nodes[2].device.handover_status();
        assert_eq!(
            st.queued,
            st.released + st.denied + st.full + st.waiting,
            "{st:?}"
        );
    }

    /// What the new holder's own host sends the awaited address is not the policy's to judge
    /// (it speaks of what peers send; the host reaches its own addresses unfiltered): kept
    /// back and delivered whatever the policy allows peers.
    #[test]
    fn the_new_holders_own_host_is_not_judged_by_the_policy() {
        let mut sim = mesh();
        let firewall = web_moving_to_node_2(&sim, "node:n0");
        sim.nodes[2].device.set_firewall(firewall(false));
        let held = await_workload_at_node_2(&mut sim);
        let (n1, n2) = (sim.nodes[1].overlay, sim.nodes[2].overlay);
        let mine = tcp(n2, 40000, WORKLOAD, 22, SYN, b"");
        sim.send(2, &mine);
        sim.send(1, &tcp(n1, 40000, WORKLOAD, 22, SYN, b""));
        let st = sim.nodes[2].device.handover_status();
        assert_eq!((st.queued, st.denied, st.waiting), (2, 1, 1), "{st:?}");
        let before = sim.nodes[2].delivered.len();
        sim.nodes[2].device.set_firewall(firewall(true));
        sim.nodes[2].device.set_workload_routing(held);
        sim.nodes[2].device.set_addresses_up([WORKLOAD.into()]);
        let mut tun = TunBatch::new(4, 16, 2048);
        assert_eq!(sim.release(2, &mut tun), 1);
        assert_eq!(sim.nodes[2].delivered[before..], [mine]);
    }

    /// The mesh of `mesh()` with node 2 made an external node (stock WireGuard: one peer,
    /// node 0, its gateway, for the whole network's prefix; no firewall), node 1 routing its
    /// address to node 0; node 0's firewall in mesh mode. Returns the map (node 2 has `via`
    /// node 0, tagged `phone`).
    fn external_behind_node_0(sim: &mut Sim) -> Netmap {
        let gateway_key = sim.nodes[0].key.public_key();
        let x_key = sim.nodes[2].key.public_key();
        let mut x = sim.nodes[2].device.config();
        x.peers.retain(|p| p.public_key == gateway_key);
        x.peers[0].allowed_ips = vec!["100.64.0.0/16".parse().unwrap()];
        x.peers[0].persistent_keepalive = Some(25);
        sim.nodes[2].device.set_config(x);
        let mut y = sim.nodes[1].device.config();
        y.peers.retain(|p| p.public_key != x_key);
        for p in y.peers.iter_mut().filter(|p| p.public_key == gateway_key) {
            p.allowed_ips.push("100.64.0.3/32".parse().unwrap());
        }
        sim.nodes[1].device.set_config(y);
        let mut map = map_of(sim, &[]);
        let x = map.peers.get_mut(&3).unwrap();
        x.via = Some(1);
        x.tags = vec!["phone".into()];
        sim.nodes[0].device.set_firewall(FirewallConfig {
            local: Some(vec!["100.64.0.1/32".parse().unwrap()]),
            policy: None,
        });
        map
    }

    fn serve(sim: &Sim, map: &Netmap, policy: Option<&Policy>) {
        sim.nodes[0].device.set_gateway(GatewayConfig {
            served: [sim.nodes[2].key.public_key()].into_iter().collect(),
            policy: policy.map(|p| Arc::new(CompiledPolicy::compile_for(p, map, &[3]))),
        });
    }

    #[test]
    fn a_gateway_forwards_for_its_external_node_both_ways() {
        let mut sim = mesh();
        let map = external_behind_node_0(&mut sim);
        // Not yet its gateway: what the external node sends to node 1 is not node 0's.
        assert!(!sim.ping(2, 1, b"to n1, no gateway"));
        let not_local = sim.nodes[0].device.firewall_status().not_local;
        assert!(not_local >= 1, "{not_local}");
        serve(&sim, &map, None);
        for i in 0..10u8 {
            assert!(sim.ping(2, 1, &[b'x', i]), "external -> n1, {i}");
            assert!(sim.ping(1, 2, &[b'y', i]), "n1 -> external, {i}");
        }
        // And node 0 itself, directly.
        assert!(sim.ping(2, 0, b"to the gateway"));
        assert!(sim.ping(0, 2, b"from the gateway"));
        let gatewayed = sim.nodes[0]
            .device
            .drops()
            .gatewayed
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(gatewayed, 20);
        // The external node's packets reach node 1 with their own source, accepted from the
        // gateway because node 1 routes that address there.
        assert_eq!(drops(&sim, 1, 0).spoofed_source, 0);
    }

    #[test]
    fn a_gateway_enforces_the_policy_for_its_external_node() {
        let mut sim = mesh();
        let map = external_behind_node_0(&mut sim);
        let policy = Policy {
            version: 3,
            rules: vec![
                // The phone may ssh to n1; n1 may send UDP to port 5000 of phones.
                rule(2, "tag:phone", "node:n1", "tcp:22"),
                rule(5, "node:n1", "tag:phone", "udp:5000"),
            ],
        };
        sim.nodes[1].device.set_firewall(FirewallConfig {
            local: Some(map.routed_to(2)),
            policy: Some(Arc::new(CompiledPolicy::compile(&policy, &map, 2))),
        });
        serve(&sim, &map, Some(&policy));
        let (n1, x) = (sim.nodes[1].overlay, sim.nodes[2].overlay);
        // The phone's ssh connection: through, and its answers back.
        assert!(deliver(&mut sim, 2, 1, &tcp(x, 41000, n1, 22, SYN, b"")));
        assert!(deliver(
            &mut sim,
            1,
            2,
            &tcp(n1, 22, x, 41000, SYN | ACK, b"")
        ));
        for i in 0..5u8 {
            assert!(deliver(
                &mut sim,
                2,
                1,
                &tcp(x, 41000, n1, 22, ACK, &[i; 50])
            ));
            assert!(deliver(
                &mut sim,
                1,
                2,
                &tcp(n1, 22, x, 41000, ACK, &[i; 900])
            ));
        }
        // n1 opening a connection to the phone: no rule allows it; the gateway drops it and
        // counts it against n1.
        let denied = drops(&sim, 0, 1).policy_denied;
        assert!(!deliver(&mut sim, 1, 2, &tcp(n1, 40000, x, 22, SYN, b"")));
        assert_eq!(drops(&sim, 0, 1).policy_denied, denied + 1);
        // UDP to the phone's port 5000 (the `ipv4` helper's): allowed by rule 5.
        assert!(sim.ping(1, 2, b"udp to the phone"));
        // The phone to n1 on a port no rule opens: n1's own firewall drops it.
        assert!(!deliver(&mut sim, 2, 1, &tcp(x, 41001, n1, 80, SYN, b"")));
        assert!(drops(&sim, 1, 0).policy_denied >= 1);
        // The gateway's own host is held to the phone's policy too: no rule lets n0 open a
        // connection to it; the phone's own connection to n0 is answered.
        let n0 = sim.nodes[0].overlay;
        assert!(!deliver(&mut sim, 0, 2, &tcp(n0, 40000, x, 22, SYN, b"")));
        assert!(deliver(&mut sim, 2, 0, &tcp(x, 41002, n0, 22, SYN, b"")));
        assert!(deliver(
            &mut sim,
            0,
            2,
            &tcp(n0, 22, x, 41002, SYN | ACK, b"")
        ));
        // Nobody on the gateway's host may speak as the phone.
        let spoofed = tcp(x, 41003, n1, 22, SYN, b"");
        assert!(!deliver(&mut sim, 0, 1, &spoofed));
        let foreign = sim.nodes[0]
            .device
            .drops()
            .foreign_source
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(foreign, 1);
    }
}

// Issue 10, "A 5 s tail on the relayed first packet": handshakes that cross. Two agents that
// switch to the relay in the same timer tick each send an initiation there before the other's
// arrives, each with packets queued while its first initiation went to a dead address. See
// `dataplane::noise`, "Crossing handshakes".

mod crossing_handshakes {
    use super::*;
    use meshlink_agent::dataplane::noise::CONFIRM_RUNS;

    /// WireGuard's message types, as the first byte of a datagram.
    const INITIATION: u8 = 1;
    const COOKIE_REPLY: u8 = 3;
    const DATA: u8 = 4;

    /// The one-way delay of the simulated path (a relay through the coordinator).
    const LATENCY: Duration = Duration::from_millis(2);

    /// Datagrams in flight on a path with `LATENCY`, delivered in the order they fall due;
    /// counts what each node sent. boringtun's clock (and so the TAI64N timestamp of each
    /// initiation, which the receiver needs to grow) moves with every delivery.
    #[derive(Default)]
    struct Flight {
        queue: VecDeque<(Duration, SocketAddr, SocketAddr, Vec<u8>)>,
        initiations: [usize; 2],
        cookies: [usize; 2],
        /// Every data message from this node is lost while set.
        lose_data_from: Option<usize>,
    }

    impl Flight {
        /// Takes what `sim` put on its wire, as sent now.
        fn take(&mut self, sim: &mut Sim) {
            let due = MockClock::time() + LATENCY;
            for (from, to, data) in sim.wire.drain(..) {
                let sender = sim.nodes.iter().position(|n| n.addr == from);
                if let Some(s) = sender {
                    match data[0] {
                        INITIATION => self.initiations[s] += 1,
                        COOKIE_REPLY => self.cookies[s] += 1,
                        DATA if self.lose_data_from == Some(s) => continue,
                        _ => {}
                    }
                }
                self.queue.push_back((due, from, to, data));
            }
        }

        /// Delivers what falls due by `until`, the clock moving to each delivery; then the
        /// clock stands at `until`.
        fn deliver_until(&mut self, sim: &mut Sim, until: Duration) {
            while self.queue.front().is_some_and(|(due, ..)| *due <= until) {
                let (due, from, to, data) = self.queue.pop_front().unwrap();
                MockClock::set_time(due.max(MockClock::time()));
                let Some(j) = sim.nodes.iter().position(|n| n.addr == to) else {
                    sim.lost += 1;
                    continue;
                };
                let mut tun = TunBatch::new(4, 16, sim.room);
                let mut net = NetBatch::with_capacity(4096);
                sim.nodes[j].device.inbound(from, &data, &mut tun, &mut net);
                let packets: Vec<Vec<u8>> = tun.packets().map(<[u8]>::to_vec).collect();
                sim.nodes[j].delivered.extend(packets);
                sim.enqueue(j, &net);
                self.take(sim);
            }
            MockClock::set_time(until.max(MockClock::time()));
        }

        /// Lets `d` pass: node i's timers run every 250 ms from `phase[i]` after now.
        fn run(&mut self, sim: &mut Sim, d: Duration, phase: [Duration; 2]) {
            let start = MockClock::time();
            let mut next = [start + phase[0], start + phase[1]];
            loop {
                let tick = next[0].min(next[1]);
                if tick > start + d {
                    break;
                }
                self.deliver_until(sim, tick);
                for (i, at) in next.iter_mut().enumerate() {
                    if *at == tick {
                        let mut net = NetBatch::with_capacity(4096);
                        sim.nodes[i].device.handle_timeout(&mut net);
                        sim.enqueue(i, &net);
                        *at += TICK;
                    }
                }
                self.take(sim);
            }
            self.deliver_until(sim, start + d);
        }

        /// Node `a` sends `packet` now.
        fn send(&mut self, sim: &mut Sim, a: usize, packet: &[u8]) {
            let mut net = NetBatch::with_capacity(4096);
            sim.nodes[a].device.outbound(packet, &mut net);
            sim.enqueue(a, &net);
            self.take(sim);
        }
    }

    /// The packet number `k` from `a` to `b`.
    fn packet(sim: &Sim, a: usize, b: usize, k: u8) -> Vec<u8> {
        ipv4(sim.nodes[a].overlay, sim.nodes[b].overlay, &[k])
    }

    /// Two nodes that first know each other at addresses that go nowhere, each with three
    /// packets queued for the other behind an initiation that was lost.
    fn queued_behind_a_lost_initiation() -> (Sim, Flight) {
        let mut sim = Sim::mesh(2, None);
        for (i, dead) in [(0usize, 201u8), (1, 202)] {
            let mut config = sim.nodes[i].device.config();
            config.peers[0].endpoint = Some(underlay(dead, 51820));
            sim.nodes[i].device.set_config(config);
        }
        let mut flight = Flight::default();
        for k in 0..3 {
            for (a, b) in [(0, 1), (1, 0)] {
                let p = packet(&sim, a, b, k);
                flight.send(&mut sim, a, &p);
            }
        }
        flight.deliver_until(&mut sim, MockClock::time() + LATENCY);
        assert_eq!(sim.lost, 2, "both first initiations went nowhere");
        assert_eq!(flight.initiations, [1, 1]);
        (sim, flight)
    }

    /// Path discovery gives `node` the working address of the other (the relay shim).
    fn path_found(sim: &mut Sim, node: usize) {
        let other = sim.nodes[1 - node].addr;
        let mut config = sim.nodes[node].device.config();
        config.peers[0].endpoint = Some(other);
        sim.nodes[node].device.set_config(config);
    }

    /// Whether `node` received packets `0..n` from the other, in order.
    fn received_in_order(sim: &Sim, node: usize, n: u8) -> bool {
        let want: Vec<Vec<u8>> = (0..n).map(|k| packet(sim, 1 - node, node, k)).collect();
        sim.nodes[node].delivered == want
    }

    #[test]
    fn crossing_initiations_complete_in_one_round_trip() {
        let (mut sim, mut flight) = queued_behind_a_lost_initiation();
        // Both switch to the working path; their ticks 1 ms apart, so each initiation leaves
        // before the other's arrives.
        path_found(&mut sim, 0);
        path_found(&mut sim, 1);
        flight.run(
            &mut sim,
            Duration::from_millis(20),
            [Duration::ZERO, Duration::from_millis(1)],
        );
        // One initiation each on the new path, each answered and its answer taken: before the
        // fix each answer was followed by a new initiation that voided the one it answered,
        // ~26 a side until the limiter sent cookies, and no session for 5 s.
        assert_eq!(
            flight.initiations,
            [2, 2],
            "initiations sent, lost ones included"
        );
        assert_eq!(flight.cookies, [0, 0], "the handshake limiter was engaged");
        for (node, peer) in [(0, 1), (1, 0)] {
            assert!(
                sim.handshake_age(node, peer).is_some(),
                "node {node}: no session"
            );
            assert_eq!(
                sim.peer_status(node, peer).drops.other,
                0,
                "answers refused"
            );
            assert!(
                received_in_order(&sim, node, 3),
                "node {node} missed queued packets"
            );
        }
        assert!(sim.ping(0, 1, b"after") && sim.ping(1, 0, b"after"));
    }

    #[test]
    fn an_answered_session_sends_what_waited_once_the_peer_confirms_it() {
        let (mut sim, mut flight) = queued_behind_a_lost_initiation();
        // Only node 0 has found the path yet; node 1 still sends towards the dead address.
        path_found(&mut sim, 0);
        flight.run(&mut sim, LATENCY, [Duration::ZERO, TICK]);
        // Node 1 answered node 0's initiation. A packet it sends before node 0's confirmation
        // arrives waits for it rather than start an initiation that would void the answer.
        let p = packet(&sim, 1, 0, 3);
        flight.send(&mut sim, 1, &p);
        flight.run(&mut sim, Duration::from_millis(20), [TICK, TICK]);
        assert_eq!(
            flight.initiations,
            [2, 1],
            "node 1 started an initiation of its own"
        );
        assert!(sim.handshake_age(1, 0).is_some() && sim.handshake_age(0, 1).is_some());
        // Node 0's first data confirmed node 1's session: all four went, in order.
        assert!(
            received_in_order(&sim, 0, 4),
            "{:?}",
            sim.nodes[0].delivered
        );
        assert!(received_in_order(&sim, 1, 3));
    }

    #[test]
    fn a_lost_confirmation_ends_the_wait_with_a_handshake_of_its_own() {
        let (mut sim, mut flight) = queued_behind_a_lost_initiation();
        path_found(&mut sim, 0);
        // Node 0's confirmation (its keepalive, and the packets it had queued) never arrives,
        // and node 0 sends nothing more.
        flight.lose_data_from = Some(0);
        flight.run(&mut sim, Duration::from_millis(20), [Duration::ZERO, TICK]);
        assert!(sim.handshake_age(0, 1).is_some());
        assert!(
            sim.handshake_age(1, 0).is_none(),
            "node 1's session is unconfirmed"
        );
        assert_eq!(flight.initiations, [2, 1]);
        // Node 1 waits no longer than CONFIRM_RUNS runs of its timers, then starts a
        // handshake itself; what it held goes with the session that brings.
        flight.run(
            &mut sim,
            TICK * u32::from(CONFIRM_RUNS),
            [TICK, Duration::from_millis(230)],
        );
        assert_eq!(flight.initiations, [2, 2]);
        assert!(sim.handshake_age(1, 0).is_some(), "node 1 has no session");
        assert!(
            received_in_order(&sim, 0, 3),
            "{:?}",
            sim.nodes[0].delivered
        );
    }
}
