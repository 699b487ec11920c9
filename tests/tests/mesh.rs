//! The mesh end to end with real binaries: `meshlink-coordinator`, `meshctl` and
//! `meshlink-agent up --token` on two simulated cloud providers.
//!
//! Topology (see `meshlink_tests::Providers`): a router namespace with one bridge per provider,
//! provider A on 198.18.1.0/24 and provider B on 198.18.2.0/24 (router at `.1` on each, IPv4
//! forwarding on); every host has one veth to its provider's bridge and routes 198.18.0.0/15
//! through that router, with no default route. The coordinator runs on provider A (its admin API
//! on its own loopback, where `meshctl` runs); agents get their overlay addresses from the
//! coordinator's pool, 100.64.0.0/16.
//!
//! One test walks through the life of a mesh, in order, because each step starts from the state
//! the previous one left (as on a real deployment): formation from tokens alone, a late joiner,
//! revocation, the coordinator crashing (tunnels and a rebooted agent carry on from the cached
//! map), and the coordinator coming back (addresses kept, a new node joins). Every wait is
//! bounded; the timings are printed (`-- --nocapture` to see them on success).
//!
//! Needs root (skips with one line otherwise) and the binaries:
//! `cargo build -p meshlink-agent -p meshlink-coordinator -p meshctl` first.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use meshlink_tests::agent::{Agent, AgentConfig, PeerConfig};
use meshlink_tests::{
    agent_bin, coordinator_bin, meshctl_bin, require_root, unique_name, wait_until, Coordinator,
    MeshAgent, NodeInfo, Provider, Providers, Reach, ScratchDir,
};

/// The network every node joins.
const NETWORK: &str = "prod";
/// Its overlay prefix: inside the project's 100.64.0.0/10.
const NETWORK_CIDR: &str = "100.64.0.0/16";
/// Bound on every "all these paths answer a ping" step.
const REACH: Duration = Duration::from_secs(20);
/// Bound on an agent noticing that it was revoked, and its peers dropping it.
const REVOKE: Duration = Duration::from_secs(10);
/// Bound on the agents noticing that the coordinator is gone, and on all of them being back
/// online after it restarts. A crashed coordinator sends nothing, so an agent notices only
/// through QUIC's idle timeout (4 s without a packet, keepalives every second); a restarted
/// one answers the next keepalive with a stateless reset. The bound leaves room for a slow,
/// loaded CI machine.
const OUTAGE: Duration = Duration::from_secs(30);

/// Prints how long a step took (`-- --nocapture` shows it on success).
fn timing(what: &str, took: Duration) {
    eprintln!("mesh: {what}: {took:.2?}");
}

/// `(name, namespace, overlay address)` of running agents, for [`Reach::all_pairs`].
fn nodes<'a>(
    agents: &[(&'a MeshAgent, Ipv4Addr)],
) -> Vec<(&'a str, &'a meshlink_tests::NsRef, Ipv4Addr)> {
    agents
        .iter()
        .map(|(a, ip)| (a.name(), a.ns(), *ip))
        .collect()
}

/// Paths both ways between `one` and each of `others`.
fn both_ways(one: (&MeshAgent, Ipv4Addr), others: &[(&MeshAgent, Ipv4Addr)]) -> Vec<Reach> {
    let mut paths = Vec::new();
    for (other, ip) in others {
        paths.push(Reach {
            label: format!("{} -> {} ({})", one.0.name(), other.name(), ip),
            from: one.0.ns().clone(),
            to: *ip,
        });
        paths.push(Reach {
            label: format!("{} -> {} ({})", other.name(), one.0.name(), one.1),
            from: other.ns().clone(),
            to: one.1,
        });
    }
    paths
}

/// Waits for every path to answer, panicking with the failures, and returns the slowest.
fn reach_all(paths: &[Reach]) -> Duration {
    let took = Reach::wait_all(paths, REACH).unwrap_or_else(|e| panic!("{e}"));
    took.into_iter().max().unwrap_or_default()
}

/// The agent's count of datagrams dropped as coming from no known peer.
fn unknown_peer_drops(agent: &MeshAgent) -> u64 {
    let status = agent.status();
    status
        .pointer("/drops/unknown_peer")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or_else(|| panic!("status has no drops.unknown_peer: {status}"))
}

/// The node called `name` in a `node list`.
fn find<'a>(list: &'a [NodeInfo], name: &str) -> &'a NodeInfo {
    list.iter()
        .find(|n| n.name == name)
        .unwrap_or_else(|| panic!("{name} is not in the node list: {list:#?}"))
}

#[test]
fn mesh_forms_survives_revocation_and_coordinator_outage() {
    if !require_root() {
        return;
    }
    agent_bin();
    coordinator_bin();
    meshctl_bin();
    let whole = Instant::now();

    // Declared first, dropped last: it outlives every process that writes into it.
    let dir = ScratchDir::create("mesh");
    let mut providers = Providers::create(2);
    let coord_host = providers.add_host(Provider::A);
    let host_a1 = providers.add_host(Provider::A);
    let host_a2 = providers.add_host(Provider::A);
    let host_b1 = providers.add_host(Provider::B);
    let host_b2 = providers.add_host(Provider::B);
    let host_a3 = providers.add_host(Provider::A);
    for (host, to) in [
        (&host_a1, coord_host.underlay),
        (&host_b1, coord_host.underlay),
        (&host_b1, host_a1.underlay),
    ] {
        assert!(
            host.ns.ping_once(to, Duration::from_secs(2)),
            "underlay: {} cannot ping {to}",
            host.underlay
        );
    }

    let mut coord = Coordinator::start(&coord_host.ns, &dir, coord_host.underlay);
    let ctl = coord.meshctl();
    ctl.network_create(NETWORK, NETWORK_CIDR);
    let token = ctl.token_create(NETWORK, Some(3), Some("1h"));

    // 1. Three VMs on two providers join with the token alone; every pair pings both ways.
    let started = Instant::now();
    let mut a1 = MeshAgent::spawn_join(&host_a1.ns, &dir, &token, "vm-a1", &[("provider", "a")]);
    let mut a2 = MeshAgent::spawn_join(&host_a2.ns, &dir, &token, "vm-a2", &[("provider", "a")]);
    let mut b1 = MeshAgent::spawn_join(&host_b1.ns, &dir, &token, "vm-b1", &[("provider", "b")]);
    for agent in [&mut a1, &mut a2, &mut b1] {
        agent.wait_ready(meshlink_tests::mesh::READY_TIMEOUT);
    }
    timing("3 agents joined and up", started.elapsed());
    let (ip_a1, ip_a2, ip_b1) = (a1.address(), a2.address(), b1.address());

    let list = ctl.nodes();
    assert_eq!(list.len(), 3, "node list: {list:#?}");
    for (agent, ip, provider) in [(&a1, ip_a1, "a"), (&a2, ip_a2, "a"), (&b1, ip_b1, "b")] {
        let node = find(&list, agent.name());
        assert_eq!(
            node.address,
            ip,
            "coordinator and agent disagree on {}",
            agent.name()
        );
        assert_eq!(node.public_key, agent.public_key());
        assert_eq!(
            node.labels.get("provider").map(String::as_str),
            Some(provider)
        );
        assert!(!node.revoked);
        assert_eq!(
            &ip.octets()[..2],
            &[100, 64],
            "{ip} is outside {NETWORK_CIDR}"
        );
    }
    assert!(
        ip_a1 != ip_a2 && ip_a1 != ip_b1 && ip_a2 != ip_b1,
        "duplicate addresses: {list:#?}"
    );

    let first3 = [(&a1, ip_a1), (&a2, ip_a2), (&b1, ip_b1)];
    let slowest = reach_all(&Reach::all_pairs(&nodes(&first3)));
    timing("all 6 pairs of 3 answer (from the ping start)", slowest);
    timing("mesh of 3 formed (from agent start)", started.elapsed());

    // 2. A fourth VM joins later, on provider B, with a token of its own.
    let token = ctl.token_create(NETWORK, Some(1), Some("1h"));
    let started = Instant::now();
    let b2 = MeshAgent::join(&host_b2.ns, &dir, &token, "vm-b2", &[("provider", "b")]);
    let ip_b2 = b2.address();
    assert!(
        ![ip_a1, ip_a2, ip_b1].contains(&ip_b2),
        "vm-b2 got a taken address {ip_b2}"
    );
    reach_all(&both_ways((&b2, ip_b2), &first3));
    timing(
        "vm-b2 joined and reached both ways by all 3",
        started.elapsed(),
    );

    // 3. vm-a2 is revoked: its agent exits, its peers drop it, nobody reaches its address.
    let a2_key = a2.public_key();
    let started = Instant::now();
    ctl.revoke("vm-a2");
    let status = a2
        .wait_exit(REVOKE)
        .unwrap_or_else(|| panic!("vm-a2's agent still runs {REVOKE:?} after its revocation"));
    timing("revoked vm-a2's agent exited", started.elapsed());
    assert!(
        !status.success(),
        "vm-a2's agent exited with {status} after revocation"
    );
    let log = a2.process().log();
    assert!(
        log.contains("this node was revoked"),
        "vm-a2's agent does not say it was revoked:\n{log}"
    );
    let survivors = [(&a1, ip_a1), (&b1, ip_b1), (&b2, ip_b2)];
    wait_until(REVOKE, "every other agent to drop vm-a2's key", || {
        survivors
            .iter()
            .all(|(agent, _)| !agent.peer_keys().contains(&a2_key))
            .then_some(())
    })
    .unwrap_or_else(|e| {
        let lists: Vec<String> = survivors
            .iter()
            .map(|(a, _)| format!("{}: {:?}", a.name(), a.peer_keys()))
            .collect();
        panic!("{e}; peers still listed: {lists:#?}")
    });
    timing("vm-a2 dropped by every peer", started.elapsed());
    let to_a2: Vec<Reach> = both_ways((&a2, ip_a2), &survivors)
        .into_iter()
        .filter(|r| r.to == ip_a2)
        .collect();
    let answered = Reach::answering(&to_a2, 3);
    assert!(
        answered.is_empty(),
        "the revoked node's address still answers: {answered:?}"
    );
    let node = ctl.node("vm-a2").expect("a revoked node stays listed");
    assert!(
        node.revoked && !node.online,
        "vm-a2 after revocation: {node:#?}"
    );
    assert_eq!(
        node.address, ip_a2,
        "a revoked node keeps its address until deleted"
    );
    // The agent forgot its membership: it cannot start again from its state directory.
    a2.respawn();
    let status = a2
        .wait_exit(Duration::from_secs(10))
        .expect("a revoked node's agent started again from its state directory");
    assert!(
        !status.success(),
        "restarting a revoked node exited with {status}"
    );
    let said = a2.process().log();
    eprintln!(
        "mesh: restarting the revoked vm-a2 without a token: {}",
        said.trim()
    );

    // Even with its old key, a hand-written configuration and the peers' endpoints, the
    // revoked node gets no answer: the peers no longer know its key.
    let peers: Vec<PeerConfig> = ctl
        .nodes()
        .iter()
        .filter(|n| !n.revoked)
        .map(|n| PeerConfig {
            public_key: n.public_key.clone(),
            preshared_key_file: None,
            endpoint: n
                .endpoints
                .iter()
                .find_map(|e| e.parse::<SocketAddr>().ok()),
            allowed_ips: vec![format!("{}/32", n.address)],
            persistent_keepalive: None,
        })
        .collect();
    assert_eq!(peers.len(), 3);
    assert!(
        peers.iter().all(|p| p.endpoint.is_some()),
        "peers without endpoints: {peers:#?}"
    );
    let unknown_before: Vec<u64> = survivors
        .iter()
        .map(|(a, _)| unknown_peer_drops(a))
        .collect();
    let rogue = Agent::start(
        a2.ns(),
        &dir,
        &AgentConfig {
            interface: unique_name("r"),
            private_key_file: a2.state_dir().join("private.key"),
            listen_port: 51820,
            addresses: vec![format!("{ip_a2}/16")],
            mtu: 1420,
            uapi_dir: None,
            peers,
        },
    );
    let answered = Reach::answering(&both_ways((&a2, ip_a2), &survivors), 5);
    assert!(
        answered.is_empty(),
        "the revoked node and its peers still talk: {answered:?}"
    );
    // Not vacuous: the rogue's handshakes did arrive, and were dropped as from an unknown key.
    for ((agent, _), before) in survivors.iter().zip(unknown_before) {
        let after = unknown_peer_drops(agent);
        assert!(
            after > before,
            "{} dropped no packet from an unknown peer ({before} -> {after}): did the revoked \
             node's handshakes reach it at all?",
            agent.name()
        );
    }
    assert!(
        survivors
            .iter()
            .all(|(a, _)| !a.peer_keys().contains(&a2_key)),
        "a peer took the revoked key back"
    );
    drop(rogue);
    drop(a2);

    // 4. The coordinator crashes: tunnels keep working, and an agent that restarts meanwhile
    // comes back from its cached map and is reached.
    let before = ctl.nodes();
    coord.kill();
    let started = Instant::now();
    reach_all(&Reach::all_pairs(&nodes(&survivors)));
    timing(
        "3 nodes reach each other with the coordinator dead",
        started.elapsed(),
    );

    b1.kill();
    let started = Instant::now();
    b1.restart();
    timing(
        "vm-b1 restarted from its cache (coordinator down)",
        started.elapsed(),
    );
    assert_eq!(b1.address(), ip_b1, "vm-b1 came back with another address");
    let others = [(&a1, ip_a1), (&b2, ip_b2)];
    reach_all(&both_ways((&b1, ip_b1), &others));
    let survivors = [(&a1, ip_a1), (&b1, ip_b1), (&b2, ip_b2)];
    timing(
        "restarted vm-b1 reached both ways (coordinator down)",
        started.elapsed(),
    );

    // The agents notice that the coordinator is gone (their control loops are now retrying)
    // and the tunnels still carry traffic.
    let started = Instant::now();
    let notices = [
        (&a1, "control session lost"),
        (&b2, "control session lost"),
        (&b1, "cannot reach the coordinator"),
    ];
    wait_until(
        OUTAGE,
        "every agent to notice that the coordinator is gone",
        || {
            notices
                .iter()
                .all(|(agent, line)| agent.log().contains(line))
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    timing(
        "every agent noticed the coordinator is gone",
        started.elapsed(),
    );
    let slowest = reach_all(&Reach::all_pairs(&nodes(&survivors)));
    timing("3 nodes still reach each other after noticing", slowest);

    // 5. The coordinator comes back: every node keeps its address, all reconnect, and a node
    // that joins now gets a fresh address and is reached by all.
    let started = Instant::now();
    coord.restart();
    let after = ctl.nodes();
    let summary = |list: &[NodeInfo]| -> BTreeMap<String, (Ipv4Addr, String, bool)> {
        list.iter()
            .map(|n| (n.name.clone(), (n.address, n.public_key.clone(), n.revoked)))
            .collect()
    };
    assert_eq!(
        summary(&after),
        summary(&before),
        "the node list changed across the restart"
    );
    for (agent, ip) in &survivors {
        assert_eq!(agent.address(), *ip, "{} changed its address", agent.name());
    }
    wait_until(
        OUTAGE,
        "every agent to reconnect to the restarted coordinator",
        || {
            ctl.nodes()
                .iter()
                .filter(|n| !n.revoked)
                .all(|n| n.online)
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {:#?}", ctl.nodes()));
    timing(
        "all agents back online after the coordinator restart",
        started.elapsed(),
    );

    let token = ctl.token_create(NETWORK, Some(1), Some("1h"));
    let started = Instant::now();
    let a3 = MeshAgent::join(&host_a3.ns, &dir, &token, "vm-a3", &[("provider", "a")]);
    let ip_a3 = a3.address();
    let taken: Vec<Ipv4Addr> = before.iter().map(|n| n.address).collect();
    assert!(
        !taken.contains(&ip_a3),
        "vm-a3 got a taken address {ip_a3}: {before:#?}"
    );
    assert_eq!(find(&ctl.nodes(), "vm-a3").address, ip_a3);
    reach_all(&both_ways((&a3, ip_a3), &survivors));
    timing(
        "vm-a3 joined after the restart and reached both ways",
        started.elapsed(),
    );
    let last4 = [(&a1, ip_a1), (&b1, ip_b1), (&b2, ip_b2), (&a3, ip_a3)];
    reach_all(&Reach::all_pairs(&nodes(&last4)));

    timing("whole test", whole.elapsed());
    eprintln!("mesh: addresses a1={ip_a1} a2={ip_a2} (revoked) b1={ip_b1} b2={ip_b2} a3={ip_a3}");
}
