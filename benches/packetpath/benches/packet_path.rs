//! The agent's packet path in memory: encryption of a TUN batch, decryption of a UDP batch,
//! both, for full-size packets. A regression guard for the data plane that needs neither
//! root nor the namespace bed; figures are recorded in BENCHMARKS.md ("Packet path in
//! memory"). Run: `cargo bench -p meshlink-packetpath`.

use std::cell::RefCell;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use meshlink_packetpath::{Pair, BATCH, MTU};

fn packet_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("packet_path");
    group.throughput(Throughput::Bytes((BATCH * MTU) as u64));

    let mut pair = Pair::new();
    group.bench_function("encapsulate", |b| b.iter(|| pair.seal()));

    // Fresh ciphertext for every batch (a replayed one is refused), made outside the timing.
    let pair = RefCell::new(Pair::new());
    group.bench_function("decapsulate", |b| {
        b.iter_batched(
            || {
                let mut pair = pair.borrow_mut();
                pair.seal();
                pair.sealed()
            },
            |datagrams| pair.borrow_mut().open(&datagrams),
            BatchSize::SmallInput,
        )
    });

    let mut pair = Pair::new();
    group.bench_function("both", |b| b.iter(|| pair.round_trip()));
    group.finish();
}

criterion_group!(benches, packet_path);
criterion_main!(benches);
