//! A peer that rotates its WireGuard key, between two data planes on an in-memory wire with
//! boringtun's clock driven by the test (`mock-clock`): the peer's next key configured as an
//! alias, the switch in the middle of a steady two-way stream, the old key dropped.
//!
//! Run with `cargo test -p meshlink-agent --features mock-clock --test key_alias`.

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime};

use meshlink_agent::dataplane::{Device, NetBatch, TunBatch};
use meshlink_agent::settings::{DeviceConfig, PeerConfig, PrivateKey};
use meshlink_proto::PublicKey;
use mock_instant::MockClock;

const TICK: Duration = Duration::from_millis(250);
const KEEPALIVE: Option<u16> = Some(25);

fn underlay(host: u8) -> SocketAddr {
    SocketAddr::from(([198, 18, 0, host], 51820))
}

fn overlay(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(100, 64, 0, host)
}

/// A minimal IPv4/UDP packet with a correct total length.
fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, seq: u32) -> Vec<u8> {
    let payload = seq.to_be_bytes();
    let total = 20 + 8 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(&payload);
    p
}

fn peer(key: PublicKey, endpoint: Option<SocketAddr>, host: Option<u8>) -> PeerConfig {
    PeerConfig {
        public_key: key,
        preshared_key: None,
        endpoint,
        allowed_ips: host
            .map(|h| vec![format!("100.64.0.{h}/32").parse().unwrap()])
            .unwrap_or_default(),
        persistent_keepalive: KEEPALIVE,
    }
}

/// Node 0 (`r`, which rotates) and node 1 (`p`, its peer).
struct Pair {
    devices: [Device; 2],
    wire: VecDeque<(usize, usize, Vec<u8>)>,
    delivered: [Vec<Vec<u8>>; 2],
}

impl Pair {
    fn new(r: &PrivateKey, p: &PrivateKey) -> Pair {
        let config = |own: &PrivateKey, other: &PrivateKey, host: u8| DeviceConfig {
            private_key: own.clone(),
            listen_port: 51820,
            fwmark: None,
            peers: vec![peer(other.public_key(), Some(underlay(host)), Some(host))],
        };
        Pair {
            devices: [
                Device::new(config(r, p, 2), 1),
                Device::new(config(p, r, 1), 7_000),
            ],
            wire: VecDeque::new(),
            delivered: [Vec::new(), Vec::new()],
        }
    }

    fn enqueue(&mut self, from: usize, net: &NetBatch) {
        for item in net.items() {
            let to = if item.dst == underlay(1) { 0 } else { 1 };
            self.wire
                .push_back((from, to, net.bytes(item.start, item.len).to_vec()));
        }
    }

    fn run(&mut self) {
        while let Some((from, to, data)) = self.wire.pop_front() {
            let mut tun = TunBatch::new(4, 16, 2048);
            let mut net = NetBatch::with_capacity(4096);
            self.devices[to].inbound(underlay(from as u8 + 1), &data, &mut tun, &mut net);
            let got: Vec<Vec<u8>> = tun.packets().map(<[u8]>::to_vec).collect();
            self.delivered[to].extend(got);
            self.enqueue(to, &net);
        }
    }

    /// One packet each way, then a timer tick of both: a steady two-way stream. Returns
    /// whether each direction's packet arrived (0 -> 1, 1 -> 0).
    fn step(&mut self, seq: u32) -> (bool, bool) {
        let mut arrived = [false, false];
        for from in 0..2 {
            let to = 1 - from;
            let p = ipv4(overlay(from as u8 + 1), overlay(to as u8 + 1), seq);
            let before = self.delivered[to].len();
            let mut net = NetBatch::with_capacity(4096);
            self.devices[from].outbound(&p, &mut net);
            self.enqueue(from, &net);
            self.run();
            arrived[to] = self.delivered[to][before..].contains(&p);
        }
        MockClock::advance(TICK);
        for i in 0..2 {
            self.devices[i].set_time(MockClock::time());
            self.devices[i].reset_handshake_limiter();
            let mut net = NetBatch::with_capacity(4096);
            self.devices[i].handle_timeout(&mut net);
            self.enqueue(i, &net);
        }
        self.run();
        (arrived[1], arrived[0])
    }

    fn keys_of(&self, node: usize) -> Vec<PublicKey> {
        self.devices[node]
            .status(SystemTime::now())
            .peers
            .iter()
            .map(|p| p.public_key)
            .collect()
    }
}

#[test]
fn a_key_switch_in_a_two_way_stream_loses_at_most_a_tick_and_keeps_the_new_session() {
    let old = PrivateKey::from_bytes([1; 32]);
    let new = PrivateKey::from_bytes([11; 32]);
    let p_key = PrivateKey::from_bytes([2; 32]);
    let mut pair = Pair::new(&old, &p_key);
    let mut seq = 0;
    for _ in 0..8 {
        seq += 1;
        assert_eq!(pair.step(seq), (true, true), "a steady stream first");
    }

    // The peer learns the next key: an alias of the same node, with no allowed IPs. Nothing
    // changes for the stream (the alias has no session; the node still uses its old key).
    pair.devices[1].set_key_aliases(HashMap::from([(new.public_key(), old.public_key())]));
    let mut config = pair.devices[1].config();
    config.peers.push(peer(new.public_key(), None, None));
    pair.devices[1].set_config(config);
    assert_eq!(
        pair.keys_of(1),
        vec![old.public_key(), new.public_key()],
        "wg show lists both keys while the node rotates"
    );
    for _ in 0..8 {
        seq += 1;
        assert_eq!(pair.step(seq), (true, true), "the alias disturbs nothing");
    }

    // The node switches its private key mid-stream.
    let mut config = pair.devices[0].config();
    config.private_key = new.clone();
    pair.devices[0].set_config(config);
    let mut lost = [0, 0];
    let mut last_loss = 0;
    for i in 0..40 {
        seq += 1;
        let (there, back) = pair.step(seq);
        lost[0] += usize::from(!there);
        lost[1] += usize::from(!back);
        if !there || !back {
            last_loss = i;
        }
    }
    // The node's first packet under the new key starts the handshake (the packet waits for
    // it and goes); the peer's packets to the old session are lost until the handshake
    // completes, within the tick.
    assert!(
        lost[0] == 0 && lost[1] <= 1 && last_loss <= 1,
        "lost {lost:?}, the last at step {last_loss}"
    );
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
    let status = pair.devices[1].status(at);
    let alias = status
        .peers
        .iter()
        .find(|p| p.public_key == new.public_key())
        .unwrap();
    assert!(
        alias.last_handshake.is_some(),
        "the peer knows the new key's session"
    );
    assert_eq!(
        alias.drops.spoofed_source, 0,
        "the alias speaks for the node's addresses"
    );

    // The rotation completes: the new key is the node's only key. The alias's peer (and its
    // session) becomes the node's peer: no handshake, no loss.
    let handshake = alias.last_handshake;
    pair.devices[1].set_key_aliases(HashMap::new());
    let mut config = pair.devices[1].config();
    config.peers = vec![peer(new.public_key(), Some(underlay(1)), Some(1))];
    pair.devices[1].set_config(config);
    assert_eq!(
        pair.keys_of(1),
        vec![new.public_key()],
        "the old key is gone"
    );
    for _ in 0..20 {
        seq += 1;
        assert_eq!(
            pair.step(seq),
            (true, true),
            "no loss when the old key goes"
        );
    }
    // With the same wall clock, a handshake that is 20 ticks older: no new one was made.
    let status = pair.devices[1].status(at);
    assert_eq!(
        status.peers[0].last_handshake,
        handshake.map(|h| h - 20 * TICK),
        "the same session"
    );
}

#[test]
fn an_alias_never_carries_other_addresses_nor_gets_traffic_before_its_handshake() {
    let old = PrivateKey::from_bytes([3; 32]);
    let new = PrivateKey::from_bytes([13; 32]);
    let p_key = PrivateKey::from_bytes([4; 32]);
    let mut pair = Pair::new(&old, &p_key);
    assert_eq!(pair.step(1), (true, true));
    // An alias of a key that is not configured does nothing; nor does a stray alias peer.
    pair.devices[1].set_key_aliases(HashMap::from([(new.public_key(), PublicKey([9; 32]))]));
    let mut config = pair.devices[1].config();
    config.peers.push(peer(new.public_key(), None, None));
    pair.devices[1].set_config(config);
    let mut config = pair.devices[0].config();
    config.private_key = new.clone();
    pair.devices[0].set_config(config);
    // The node's packets under the new key reach the alias peer, but the alias speaks for
    // no node here: dropped as spoofed (never delivered).
    let mut delivered = 0;
    for seq in 2..10 {
        delivered += usize::from(pair.step(seq).0);
    }
    assert_eq!(delivered, 0);
    let status = pair.devices[1].status(SystemTime::now());
    let stray = status
        .peers
        .iter()
        .find(|p| p.public_key == new.public_key())
        .unwrap();
    assert!(stray.drops.spoofed_source > 0);
}
