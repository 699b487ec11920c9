//! Two agent data planes ([`meshlink_agent::dataplane::Device`]) joined in memory, for the
//! packet-path benchmark (`benches/packet_path.rs`): no sockets, no TUN, no root.
//!
//! [`Pair::new`] completes a real WireGuard handshake between them by handing each one's
//! datagrams to the other; [`Pair::seal`] encrypts a batch at `a` as the agent's TUN loop does
//! (`Device::outbound_batch`), [`Pair::open`] decrypts it at `b` as the UDP loop does
//! (`Device::inbound_batch`, firewall and all).

use std::net::{Ipv4Addr, SocketAddr};

use meshlink_agent::dataplane::{Device, NetBatch, TunBatch};
use meshlink_agent::settings::{DeviceConfig, PeerConfig, PrivateKey};

/// The tunnel MTU the benchmark's packets fill (the agent's default).
pub const MTU: usize = 1420;
/// Packets per batch: what one offloaded TUN read (64 KiB) gives at this MTU, rounded up.
pub const BATCH: usize = 48;

const A: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const B: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);

fn underlay(host: u8) -> SocketAddr {
    SocketAddr::from(([198, 18, 0, host], 51820))
}

/// An IPv4/UDP packet of `len` bytes from `src` to `dst`, header checksum left zero (the
/// data plane does not check it; the kernel would).
pub fn packet(src: Ipv4Addr, dst: Ipv4Addr, len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&5201u16.to_be_bytes());
    p[24..26].copy_from_slice(&((len - 20) as u16).to_be_bytes());
    for (i, b) in p[28..].iter_mut().enumerate() {
        *b = i as u8;
    }
    p
}

fn device(own: u8, peer: u8, peer_overlay: Ipv4Addr) -> Device {
    let key = |seed: u8| PrivateKey::from_bytes([seed; 32]);
    let config = DeviceConfig {
        private_key: key(own),
        listen_port: 51820,
        fwmark: None,
        peers: vec![PeerConfig {
            public_key: key(peer).public_key(),
            preshared_key: None,
            endpoint: Some(underlay(peer)),
            allowed_ips: vec![format!("{peer_overlay}/32").parse().expect("prefix")],
            persistent_keepalive: None,
        }],
    };
    Device::new(config, u32::from(own) * 1000)
}

/// Hands `datagrams` (all from `a`'s underlay address) to `b` as its receive loop does, into
/// `tun` (emptied first); returns how many packets it delivered.
fn deliver<'d>(
    b: &Device,
    tun: &mut TunBatch,
    datagrams: impl IntoIterator<Item = &'d [u8]>,
) -> usize {
    tun.clear();
    let mut replies = NetBatch::with_capacity(0);
    b.inbound_batch(underlay(1), datagrams, tun, &mut replies);
    tun.len()
}

/// Two devices with a completed handshake, `a` sending to `b`.
pub struct Pair {
    /// The sender.
    pub a: Device,
    /// The receiver.
    pub b: Device,
    /// A batch of full-size packets from `a`'s overlay address to `b`'s.
    pub packets: Vec<Vec<u8>>,
    net: NetBatch,
    tun: TunBatch,
}

impl Pair {
    /// Two devices; the first packet starts the handshake, which is run to completion.
    ///
    /// # Panics
    /// When the handshake does not complete, or a packet does not arrive whole: the
    /// benchmark would measure nothing.
    #[must_use]
    pub fn new() -> Pair {
        let mut pair = Pair {
            a: device(1, 2, B),
            b: device(2, 1, A),
            packets: (0..BATCH).map(|_| packet(A, B, MTU)).collect(),
            net: NetBatch::with_capacity(BATCH * (MTU + 64)),
            tun: TunBatch::new(BATCH, 0, 2048),
        };
        // Initiation a -> b, response b -> a (releasing the queued packet), data a -> b.
        let first = packet(A, B, 100);
        pair.a.outbound(&first, &mut pair.net);
        let mut to_b = true;
        for _ in 0..4 {
            let datagrams: Vec<Vec<u8>> = pair
                .net
                .items()
                .iter()
                .map(|i| pair.net.bytes(i.start, i.len).to_vec())
                .collect();
            pair.net.clear();
            if datagrams.is_empty() {
                break;
            }
            let (to, from) = if to_b {
                (&pair.b, underlay(1))
            } else {
                (&pair.a, underlay(2))
            };
            for d in &datagrams {
                to.inbound(from, d, &mut pair.tun, &mut pair.net);
            }
            to_b = !to_b;
        }
        assert!(
            pair.tun.packets().any(|p| p == first.as_slice()),
            "the handshake did not complete in memory"
        );
        pair.tun.clear();
        pair.check();
        pair
    }

    /// Encrypts the batch at `a`; returns the ciphertext's bytes.
    pub fn seal(&mut self) -> usize {
        self.net.clear();
        self.a
            .outbound_batch(self.packets.iter().map(Vec::as_slice), &mut self.net);
        self.net.used()
    }

    /// The datagrams [`Pair::seal`] left, copied out.
    #[must_use]
    pub fn sealed(&self) -> Vec<Vec<u8>> {
        self.net
            .items()
            .iter()
            .map(|i| self.net.bytes(i.start, i.len).to_vec())
            .collect()
    }

    /// Decrypts `datagrams` at `b`; returns how many packets it delivered.
    pub fn open(&mut self, datagrams: &[Vec<u8>]) -> usize {
        deliver(&self.b, &mut self.tun, datagrams.iter().map(Vec::as_slice))
    }

    /// Encrypts the batch at `a` and decrypts it at `b`, as the two loops would, without
    /// copying the ciphertext out; returns how many packets `b` delivered.
    pub fn round_trip(&mut self) -> usize {
        self.seal();
        let net = &self.net;
        deliver(
            &self.b,
            &mut self.tun,
            net.items().iter().map(|i| net.bytes(i.start, i.len)),
        )
    }

    /// One batch through both ends arrives whole.
    fn check(&mut self) {
        self.seal();
        let datagrams = self.sealed();
        assert_eq!(datagrams.len(), BATCH, "every packet encrypted");
        assert_eq!(self.open(&datagrams), BATCH, "every packet delivered");
        assert!(
            self.tun.packets().all(|p| p == self.packets[0].as_slice()),
            "packets arrive unchanged"
        );
    }
}

impl Default for Pair {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_crosses_whole() {
        let mut pair = Pair::new();
        pair.check();
        // Replayed ciphertext is refused: the benchmark's decryption must use fresh batches.
        pair.seal();
        let datagrams = pair.sealed();
        assert_eq!(pair.open(&datagrams), BATCH);
        assert_eq!(pair.open(&datagrams), 0);
        assert_eq!(pair.round_trip(), BATCH);
    }
}
