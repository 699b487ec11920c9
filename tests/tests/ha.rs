//! Three coordinators sharing a private PostgreSQL cluster, three VMs on three providers, a
//! workload held by vm-a1 with vm-c1 as standby, and vm-b1 pinging the workload address every
//! 10 ms throughout:
//!
//! 1. the coordinator every agent is connected to is SIGKILLed: no ping is lost, nothing
//!    moves, every agent is back on another coordinator;
//! 2. PostgreSQL stops for less than a lease: the mesh does not notice, admin writes are
//!    refused saying why; it starts again: writes resume with no coordinator restarted;
//! 3. with that coordinator still down, the holder is killed: the standby takes over;
//! 4. PostgreSQL stops again and an agent restarted meanwhile is told to come back (not turned
//!    away); it is back once PostgreSQL is.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use meshlink_tests::coordinator::{Shared, QUIC_PORT};
use meshlink_tests::ping::{ping_run, ping_summary};
use meshlink_tests::postgres::PgCluster;
use meshlink_tests::{
    agent_bin, coordinator_bin, meshctl_bin, require_root, skipping_allowed, wait_until,
    Coordinator, MeshAgent, Provider, Providers, ScratchDir,
};

const NETWORK: &str = "prod";
const WORKLOAD: &str = "chat";
const WORKLOAD_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 50, 10);
const STEP: Duration = Duration::from_secs(15);

fn timing(what: &str, took: Duration) {
    eprintln!("ha: {what}: {took:.2?}");
}

/// Runs `count` pings (10 ms apart) from `from` to the workload address around `during`, and
/// returns (sent, received).
fn pings_across(from: &MeshAgent, count: u32, during: impl FnOnce()) -> (u32, u32) {
    let ping = ping_run(from.ns(), WORKLOAD_IP, count);
    std::thread::sleep(Duration::from_millis(500));
    during();
    let out = ping.wait_with_output().expect("ping runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ping_summary(&text)
}

#[test]
fn coordinators_and_the_database_fail_without_the_mesh_noticing() {
    if !require_root() {
        return;
    }
    agent_bin();
    coordinator_bin();
    meshctl_bin();
    let cluster = match PgCluster::start() {
        Ok(c) => c,
        Err(e) => {
            assert!(
                skipping_allowed(|k| std::env::var(k).ok()),
                "this test needs PostgreSQL, and CI=true forbids skipping it: {e}"
            );
            return;
        }
    };
    let store = cluster.create_database("ha").expect("a database");
    let dir = ScratchDir::create("ha");
    let mut providers = Providers::create(3);
    let hosts: Vec<_> = [Provider::A, Provider::B, Provider::C]
        .into_iter()
        .map(|p| providers.add_host(p))
        .collect();
    let list: Vec<SocketAddrV4> = hosts
        .iter()
        .map(|h| SocketAddrV4::new(h.underlay, QUIC_PORT))
        .collect();
    let mut coords: Vec<Coordinator> = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let name = format!("coord-{}", i + 1);
        let first = coords.first().map(|c| c.state_dir().to_path_buf());
        let shared = Shared {
            name: &name,
            store: &store,
            coordinators: &list,
            identity_from: first.as_deref(),
        };
        coords.push(Coordinator::start_shared(&h.ns, &dir, h.underlay, &shared));
    }
    let fingerprints: Vec<&str> = coords.iter().map(Coordinator::fingerprint).collect();
    assert!(
        fingerprints.windows(2).all(|w| w[0] == w[1]),
        "{fingerprints:?}"
    );

    // Everything through coord-1's admin API; its token lists all three.
    let ctl = coords[0].meshctl();
    ctl.network_create(NETWORK, "100.64.0.0/16");
    let token = ctl.token_create(NETWORK, Some(3), Some("1h"));
    let vms = [
        (providers.add_host(Provider::A), "vm-a1"),
        (providers.add_host(Provider::B), "vm-b1"),
        (providers.add_host(Provider::C), "vm-c1"),
    ];
    let mut agents: Vec<MeshAgent> = vms
        .iter()
        .map(|(h, name)| MeshAgent::spawn_join(&h.ns, &dir, &token, name, &[]))
        .collect();
    for a in &mut agents {
        a.wait_ready(meshlink_tests::mesh::READY_TIMEOUT);
    }
    // The workload is made through coord-2 and attached through coord-3: any will do.
    coords[1].meshctl().run(&[
        "workload",
        "create",
        WORKLOAD,
        "--network",
        NETWORK,
        "--address",
        "100.64.50.10",
        "--standby",
        "vm-c1",
    ]);
    coords[2]
        .meshctl()
        .run(&["workload", "attach", WORKLOAD, "--node", "vm-a1"]);
    wait_until(STEP, "the workload address on vm-a1", || {
        agents[0].has_address(WORKLOAD_IP).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    agents[1]
        .ns()
        .wait_for_ping(WORKLOAD_IP, STEP)
        .unwrap_or_else(|e| panic!("the workload address does not answer from vm-b1: {e}"));
    let connected_to = |a: &MeshAgent| -> Option<String> {
        let st = a.try_status()?;
        let c = &st["control"];
        (c["connected"] == true).then(|| c["coordinator"].as_str().map(str::to_owned))?
    };
    let holder_coord = wait_until(STEP, "vm-a1 connected", || connected_to(&agents[0]))
        .unwrap_or_else(|e| panic!("{e}"));
    let victim = list
        .iter()
        .position(|a| a.to_string() == holder_coord)
        .unwrap_or_else(|| panic!("vm-a1 is on {holder_coord}, not one of {list:?}"));
    let survivor = coords[(victim + 1) % 3].meshctl();

    // 1. The holder's coordinator is SIGKILLed under traffic.
    let (sent, received) = pings_across(&agents[1], 400, || {
        coords[victim].kill();
    });
    timing(
        &format!("pings across the holder's coordinator killed: {received} of {sent}"),
        Duration::ZERO,
    );
    assert!(sent >= 300, "ping sent only {sent}");
    assert_eq!(
        received, sent,
        "the workload address went silent when its holder's coordinator died"
    );
    let started = Instant::now();
    for a in &agents {
        let now_on = wait_until(STEP, "every agent on a live coordinator", || {
            connected_to(a).filter(|c| *c != holder_coord)
        })
        .unwrap_or_else(|e| panic!("{e}"));
        timing(
            &format!("{} reconnected to {now_on}", a.name()),
            started.elapsed(),
        );
    }
    let w = survivor.json(&["workload", "show", WORKLOAD]);
    assert_eq!(w["generation"], 1, "nothing moved: {w}");
    // `meshctl status` lists the three coordinators: the dead one down, the sessions on the
    // others.
    let victim_addr = list[victim].to_string();
    let last = std::cell::RefCell::new(serde_json::Value::Null);
    wait_until(STEP, "status to show the dead coordinator down", || {
        let st = survivor.json(&["status"]);
        *last.borrow_mut() = st.clone();
        let cs = st["coordinators"].as_array()?.clone();
        let dead_down = cs
            .iter()
            .any(|c| c["address"] == victim_addr.as_str() && c["up"] == false);
        let live: u64 = cs
            .iter()
            .filter(|c| c["up"] == true)
            .filter_map(|c| c["sessions"].as_u64())
            .sum();
        (cs.len() == 3 && dead_down && live == 3).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}; last status: {}", last.borrow()));

    // 2. PostgreSQL stops for less than a lease and starts again under traffic.
    let mut refused = String::new();
    let (sent, received) = pings_across(&agents[1], 300, || {
        cluster.stop().expect("PostgreSQL stops");
        let out = survivor.exec(&["token", "create", "--network", NETWORK]);
        assert!(
            !out.status.success(),
            "a write succeeded without the database"
        );
        refused = String::from_utf8_lossy(&out.stderr).into_owned();
        std::thread::sleep(Duration::from_millis(700));
        cluster.restart().expect("PostgreSQL starts again");
    });
    timing(
        &format!("pings across a PostgreSQL restart: {received} of {sent}"),
        Duration::ZERO,
    );
    assert!(refused.contains("database is unavailable"), "{refused}");
    assert_eq!(received, sent, "the mesh noticed the database going away");
    let started = Instant::now();
    wait_until(STEP, "admin writes to resume", || {
        survivor
            .exec(&["token", "create", "--network", NETWORK])
            .status
            .success()
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    timing("admin writes resumed after the restart", started.elapsed());

    // 3. The holder dies while its old coordinator is still down: vm-c1 takes over.
    let killed = Instant::now();
    agents[0].kill();
    wait_until(STEP, "vm-c1 to hold the workload address", || {
        agents[2].has_address(WORKLOAD_IP).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let took = killed.elapsed();
    agents[1]
        .ns()
        .wait_for_ping(WORKLOAD_IP, STEP)
        .unwrap_or_else(|e| panic!("the workload address does not answer after the failover: {e}"));
    timing("failover to the standby with a coordinator down", took);
    let w = survivor.json(&["workload", "show", WORKLOAD]);
    assert_eq!(w["generation"], 2, "{w}");
    assert_eq!(
        w.pointer("/holder/name").and_then(|v| v.as_str()),
        Some("vm-c1"),
        "{w}"
    );

    // 4. PostgreSQL stops again, and vm-b1's agent restarts meanwhile: its hello cannot be
    // served, and it is told to come back rather than turned away; once PostgreSQL is back,
    // so is vm-b1. (This outage may outlast a lease: addresses may go silent and fail over.)
    cluster.stop().expect("PostgreSQL stops");
    agents[1].respawn();
    wait_until(STEP, "vm-b1's hello to meet the outage", || {
        let log = agents[1].log();
        (log.contains("cannot serve this node now") || log.contains("refused this node"))
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}; its log:\n{}", agents[1].log()));
    cluster.restart().expect("PostgreSQL starts again");
    let back = wait_until(STEP, "vm-b1 back on a coordinator after the outage", || {
        connected_to(&agents[1])
    })
    .unwrap_or_else(|e| panic!("{e}; its log:\n{}", agents[1].log()));
    timing(
        &format!("vm-b1, restarted during the outage, on {back}"),
        Duration::ZERO,
    );
    drop(agents);
    drop(coords);
}
