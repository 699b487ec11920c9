//! Key rotation with real binaries: `meshlink-coordinator`, `meshctl` and two
//! `meshlink-agent up` nodes on one simulated provider (see `meshlink_tests::Providers`).
//!
//! - `a_rotation_during_a_tcp_transfer_keeps_the_connection`: a rate-limited TCP transfer
//!   (`meshlink-xfer`, one connection, checked by SHA-256) from vm-a to vm-b runs while vm-b
//!   rotates its key (`meshctl node rotate-key vm-b`); the transfer completes on its one
//!   connection, data flows after the switch, and vm-b's old key is gone from vm-a's `wg show`
//!   and from the coordinator. What it measures: the longest pause in the ACKs vm-a gets from
//!   vm-b (its peer entries' received bytes, sampled as fast as `wg show` answers) during
//!   the transfer, printed (`-- --nocapture`).
//! - `keys_rotate_on_the_schedule`: with `--key-rotation-secs 6`, both nodes' keys change
//!   twice on their own and the nodes still reach each other.
//!
//! Needs root (skips with one line otherwise) and the binaries:
//! `cargo build -p meshlink-agent -p meshlink-coordinator -p meshctl -p meshlink-tests` first.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use meshlink_tests::{
    agent_bin, coordinator_bin, meshctl_bin, require_root, wait_until, wg, Coordinator, MeshAgent,
    Provider, ProviderHost, Providers, Reach, ScratchDir, XferReceiver, XferSender,
};

const NETWORK: &str = "prod";
const NETWORK_CIDR: &str = "100.64.0.0/16";
/// Bound on every "both paths answer a ping" step.
const REACH: Duration = Duration::from_secs(20);
/// The transfer: 40 Mbit/s for about 16 s, so that the rotation falls well inside it.
const RATE_MBIT: f64 = 40.0;
const BYTES: u64 = 80_000_000;
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on a rotation from the request to the old key gone everywhere.
const ROTATION: Duration = Duration::from_secs(30);
/// The longest pause of the transfer the switch may cause: a handshake and a TCP
/// retransmission (200 ms at least), with room for a loaded debug build. (Measured on an idle
/// machine: about 0.1 s.)
const MAX_STALL: Duration = Duration::from_secs(2);

struct Bed {
    // Dropped in this order: processes first, then namespaces, then the directory.
    a: MeshAgent,
    b: MeshAgent,
    coord: Coordinator,
    _hosts: Vec<ProviderHost>,
    _providers: Providers,
    dir: ScratchDir,
}

/// A coordinator (with `flags`) and two joined agents that reach each other; `None` when
/// not root.
fn bed(tag: &str, flags: &[&str]) -> Option<Bed> {
    if !require_root() {
        return None;
    }
    agent_bin();
    coordinator_bin();
    meshctl_bin();
    let dir = ScratchDir::create(tag);
    let mut providers = Providers::create(1);
    let coord_host = providers.add_host(Provider::A);
    let host_a = providers.add_host(Provider::A);
    let host_b = providers.add_host(Provider::A);
    let coord = Coordinator::start_with(&coord_host.ns, &dir, coord_host.underlay, flags);
    let ctl = coord.meshctl();
    ctl.network_create(NETWORK, NETWORK_CIDR);
    let token = ctl.token_create(NETWORK, Some(2), Some("1h"));
    let mut a = MeshAgent::spawn_join(&host_a.ns, &dir, &token, "vm-a", &[]);
    let mut b = MeshAgent::spawn_join(&host_b.ns, &dir, &token, "vm-b", &[]);
    a.wait_ready(meshlink_tests::mesh::READY_TIMEOUT);
    b.wait_ready(meshlink_tests::mesh::READY_TIMEOUT);
    let bed = Bed {
        a,
        b,
        coord,
        _hosts: vec![coord_host, host_a, host_b],
        _providers: providers,
        dir,
    };
    bed.reach();
    Some(bed)
}

impl Bed {
    fn reach(&self) {
        let nodes = [
            (self.a.name(), self.a.ns(), self.a.address()),
            (self.b.name(), self.b.ns(), self.b.address()),
        ];
        Reach::wait_all(&Reach::all_pairs(&nodes), REACH).unwrap_or_else(|e| panic!("{e}"));
    }

    /// The node's public key as the coordinator has it.
    fn key_at_coordinator(&self, name: &str) -> String {
        self.coord
            .meshctl()
            .node(name)
            .expect("the node")
            .public_key
    }

    /// The node's `next_key` as the coordinator shows it.
    fn next_key_at_coordinator(&self, name: &str) -> Option<String> {
        let node = self.coord.meshctl().json(&["node", "show", name]);
        node["next_key"].as_str().map(str::to_owned)
    }
}

/// Received bytes per peer key, as `wg show IFACE transfer` reports them.
fn received(agent: &MeshAgent) -> HashMap<String, u64> {
    wg::show(agent.ns(), agent.interface(), "transfer")
        .into_iter()
        .filter_map(|(key, counts)| Some((key, counts.split_whitespace().next()?.parse().ok()?)))
        .collect()
}

#[test]
fn a_rotation_during_a_tcp_transfer_keeps_the_connection() {
    let Some(bed) = bed("keyrot", &["--key-rotation-grace-ms", "1500"]) else {
        return;
    };
    let old_b = bed.b.public_key();
    assert_eq!(bed.key_at_coordinator("vm-b"), old_b);
    let b_ip = bed.b.address();

    let mut receiver = XferReceiver::start(bed.b.ns(), &bed.dir, b_ip.into(), TRANSFER_TIMEOUT);
    let mut sender = XferSender::start(
        bed.a.ns(),
        &bed.dir,
        receiver.addr(),
        BYTES,
        Some(RATE_MBIT),
        TRANSFER_TIMEOUT,
    );

    // Watch what vm-a receives from vm-b (the ACKs of the transfer), under any of vm-b's
    // keys: the highest count seen per key, summed, only grows while data flows.
    let started = Instant::now();
    let mut best: HashMap<String, u64> = HashMap::new();
    let mut last_growth = Instant::now();
    let mut last_total = 0u64;
    // Every pause after the request: (when it began, how long it lasted).
    let mut pauses: Vec<(Instant, Duration)> = Vec::new();
    let mut samples = 0u32;
    let mut asked_at = None;
    let mut both_keys_at = None;
    let mut new_b = None;
    let mut old_gone_at = None;
    let mut after_switch = 0u64;
    while sender.is_running() {
        let now = Instant::now();
        samples += 1;
        for (key, rx) in received(&bed.a) {
            let e = best.entry(key).or_default();
            *e = (*e).max(rx);
        }
        let total: u64 = best.values().sum();
        if total > last_total {
            if last_total > 0 && asked_at.is_some() {
                pauses.push((last_growth, now - last_growth));
            }
            last_total = total;
            last_growth = now;
        }
        // Three seconds in, with the transfer flowing, rotate the receiver's key.
        if asked_at.is_none() && started.elapsed() > Duration::from_secs(3) {
            assert!(total > 0, "the transfer does not flow");
            bed.coord.meshctl().run(&["node", "rotate-key", "vm-b"]);
            asked_at = Some(now);
        }
        let keys: Vec<String> = received(&bed.a).into_keys().collect();
        if asked_at.is_some() && both_keys_at.is_none() && keys.len() == 2 {
            both_keys_at = Some(now);
        }
        if both_keys_at.is_some()
            && old_gone_at.is_none()
            && keys.len() == 1
            && !keys.contains(&old_b)
        {
            old_gone_at = Some(now);
            new_b = keys.first().cloned();
            after_switch = total;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let sent = sender.finish(TRANSFER_TIMEOUT);
    let got = receiver.finish(Duration::from_secs(10));
    let asked_at = asked_at.expect("the rotation was asked during the transfer");
    let both = both_keys_at.expect("vm-a never saw vm-b's next key beside its key");
    let gone = old_gone_at.unwrap_or_else(|| {
        panic!(
            "vm-b's old key was still on vm-a when the transfer ended; vm-b log:\n{}",
            bed.b.log()
        )
    });
    // The switch happens between the next key reaching vm-a and the old key leaving it.
    let around_switch = pauses
        .iter()
        .filter(|(at, d)| *at + *d >= both && *at <= gone + Duration::from_millis(500))
        .map(|(_, d)| *d)
        .max()
        .unwrap_or_default();
    let longest = pauses.iter().map(|(_, d)| *d).max().unwrap_or_default();
    eprintln!(
        "key rotation: next key on vm-a {:.2?} after the request, old key gone {:.2?} after it; \
         longest pause of the ACKs around the switch {around_switch:.2?}, anywhere after the \
         request {longest:.2?} (sampled every {:.1?} on average); {:.1} Mbit/s over {:.2?}",
        both - asked_at,
        gone - asked_at,
        started.elapsed() / samples.max(1),
        got.mbit_per_sec(),
        started.elapsed(),
    );
    // One connection carried every byte: the receiver reads exactly one.
    assert_eq!(sent.bytes, BYTES);
    assert_eq!((got.bytes, &got.sha256), (sent.bytes, &sent.sha256));
    assert!(
        last_total > after_switch,
        "no data flowed after the old key was gone"
    );
    assert!(
        around_switch < MAX_STALL,
        "the transfer paused {around_switch:.2?} around the switch"
    );

    // The new key everywhere, the old nowhere.
    let new_b = new_b.expect("vm-b's new key");
    assert_ne!(new_b, old_b);
    wait_until(ROTATION, "vm-b's status to show its new key", || {
        (bed.b.public_key() == new_b).then_some(())
    })
    .unwrap();
    assert_eq!(bed.key_at_coordinator("vm-b"), new_b);
    assert_eq!(bed.next_key_at_coordinator("vm-b"), None);
    let peers: Vec<String> = bed
        .a
        .ns()
        .run("wg", &["show", bed.a.interface(), "peers"])
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(peers.contains(&new_b), "{peers:?}");
    assert!(
        !peers.contains(&old_b),
        "vm-a still lists the old key: {peers:?}"
    );
    // vm-b's state directory: the key in use only, private, and the next one gone.
    let state = bed.b.state_dir();
    assert!(!state.join("private.key.next").exists());
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(state.join("private.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let status = bed.b.status();
    assert!(
        status["key"]["age_secs"].as_u64().is_some_and(|a| a < 120),
        "{status}"
    );
    bed.reach();
}

#[test]
fn keys_rotate_on_the_schedule() {
    let Some(bed) = bed(
        "keysched",
        &["--key-rotation-secs", "6", "--key-rotation-grace-ms", "500"],
    ) else {
        return;
    };
    let mut seen: HashMap<&str, Vec<String>> = HashMap::new();
    for agent in [&bed.a, &bed.b] {
        seen.insert(agent.name(), vec![agent.public_key()]);
    }
    // Two rotations of each node: each key lives about 6 s (plus the tick and the grace).
    let started = Instant::now();
    wait_until(
        Duration::from_secs(60),
        "two scheduled rotations of each node",
        || {
            for agent in [&bed.a, &bed.b] {
                let key = bed.key_at_coordinator(agent.name());
                let keys = seen.get_mut(agent.name()).unwrap();
                if keys.last() != Some(&key) {
                    keys.push(key);
                }
            }
            seen.values().all(|k| k.len() >= 3).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}: keys seen {seen:?}"));
    eprintln!(
        "scheduled rotation: two rotations of each node in {:.2?}",
        started.elapsed()
    );
    for keys in seen.values() {
        let mut unique = keys.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), keys.len(), "a key came back: {keys:?}");
    }
    // Each agent ends on the key the coordinator has, and each reaches the other.
    for agent in [&bed.a, &bed.b] {
        wait_until(ROTATION, "the agent to use the coordinator's key", || {
            (agent.public_key() == bed.key_at_coordinator(agent.name())).then_some(())
        })
        .unwrap();
    }
    bed.reach();
}
