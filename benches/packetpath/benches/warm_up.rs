//! The handshake burst of a move's warm-up (`Device::warm`) at a node with 1,000 and 10,000
//! peers: every peer (what a destination does without a warm-up list, and what it did before
//! there were lists), against the holder and two peers that talk to the workload (what the
//! coordinator's list names). Each iteration warms a fresh device whose peers all have an
//! endpoint and no session, the worst case. The size of the burst is printed once per case;
//! the time is criterion's. Figures in BENCHMARKS.md ("Warm-up that scales"). Run:
//! `cargo bench -p meshlink-packetpath --bench warm_up`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use meshlink_agent::dataplane::{Device, NetBatch};
use meshlink_agent::settings::{DeviceConfig, PeerConfig, PrivateKey};
use meshlink_proto::PublicKey;

/// A session younger than this is not renewed (the agent's `FRESH_SESSION`).
const FRESH: Duration = Duration::from_secs(90);

fn key(i: u32) -> PrivateKey {
    let mut bytes = [7u8; 32];
    bytes[..4].copy_from_slice(&i.to_be_bytes());
    PrivateKey::from_bytes(bytes)
}

/// A node with `n` peers, each with an endpoint on the underlay and one overlay address.
fn device(n: u32) -> Device {
    let peers = (1..=n)
        .map(|i| {
            let [_, a, b, c] = i.to_be_bytes();
            PeerConfig {
                public_key: key(i).public_key(),
                preshared_key: None,
                endpoint: Some(SocketAddr::from(([198, 18 + (a & 1), b, c], 51820))),
                allowed_ips: vec![format!("100.{}.{b}.{c}/32", 64 + (a & 63))
                    .parse()
                    .expect("prefix")],
                persistent_keepalive: None,
            }
        })
        .collect();
    let config = DeviceConfig {
        private_key: key(0),
        listen_port: 51820,
        fwmark: None,
        peers,
    };
    Device::new(config, 1)
}

/// Warms `d` (every peer, or `only`); returns the datagrams and bytes of the burst.
fn warm(d: &Device, only: Option<&HashSet<PublicKey>>) -> (usize, usize) {
    let mut net = NetBatch::with_capacity(4 * 1024 * 1024);
    d.warm(FRESH, only, &mut net);
    let items = net.items().len();
    let bytes = net.items().iter().map(|i| i.len).sum();
    (items, bytes)
}

fn warm_up(c: &mut Criterion) {
    let mut group = c.benchmark_group("warm_up");
    group.sample_size(10);
    for n in [1_000u32, 10_000] {
        // The holder and two talkers, as a Prepare's list names them.
        let listed: HashSet<PublicKey> =
            [1, n / 2, n].iter().map(|i| key(*i).public_key()).collect();
        for (case, only) in [("every peer", None), ("listed", Some(&listed))] {
            let (items, bytes) = warm(&device(n), only);
            eprintln!("warm_up {n} peers, {case}: {items} handshake initiations, {bytes} bytes");
            group.bench_function(format!("{n} peers, {case}"), |b| {
                b.iter_batched(|| device(n), |d| warm(&d, only), BatchSize::PerIteration)
            });
        }
    }
    group.finish();
}

criterion_group!(benches, warm_up);
criterion_main!(benches);
