//! NAT traversal and relays (issue 10) with real binaries, on providers behind NAT routers
//! (`meshlink_tests::nat::NatBed`): the coordinator on a host of the simulated internet
//! (198.18.0.10), each provider's VMs on a private LAN (198.18.N.0/24) behind a router that
//! masquerades them to its public address (198.18.0.N) and knows no route to any other LAN.
//! A VM's packet to another provider's private address dies at its own router, so two VMs
//! of different providers meet only through their routers' public addresses, or through the
//! coordinator's relay.
//!
//! First the bed itself, with plain tools (`ping`, a `python3` UDP echo): if these fail, the
//! harness or the machine is at fault, not meshlink.
//! - `nat_bed_masquerades_and_isolates_the_lans`: LAN hosts reach the internet and are seen
//!   there as their router (one public port per socket behind `masquerade`, another for each
//!   destination behind `masquerade random,fully-random`); no LAN reaches another, nor does the
//!   internet reach a LAN.
//! - `nat_bed_blocks_udp_and_lifts_the_block`: the "UDP only to the coordinator" block, its
//!   lifting, and a rule added and removed at run time.
//!
//! Then the mesh, on `meshlink_tests::nat::NatMesh` (which `benches/natbench` shares). Each
//! asserts with every agent's `status` JSON in its message; the process guards print the
//! agents' and the coordinator's logs when a test fails:
//! - `two_providers_behind_masquerade_connect_directly`: both VMs ping each other, on a direct
//!   path whose endpoint is the other router's public address.
//! - `symmetric_nat_still_connects`: one router is symmetric; the VMs still ping each other
//!   (directly or through the relay: either is accepted, the test prints which).
//! - `udp_blocked_between_providers_goes_through_the_relay`: UDP out of both LANs only to the
//!   coordinator: the VMs reach each other through its relay; a TCP transfer then runs while
//!   the block is lifted, completes intact, and the path turns direct.
//! - `without_any_udp_the_session_and_the_relay_go_over_tcp`: no UDP out of either LAN, the
//!   coordinator's included: the control session and the relay run over TLS/TCP, and a TCP
//!   transfer through that relay arrives whole.
//! - `a_workload_moves_between_natted_nodes`: a workload address moves from a VM behind one
//!   router to a VM behind another and answers a third VM (behind a third router) after it.
//! - `a_standalone_relay_carries_and_another_takes_over_when_it_dies`: two `meshlink-relay`s on
//!   internet hosts, registered in the coordinator's `[[relays]]`; UDP out of both LANs only to
//!   the coordinator and the relays: the VMs reach each other via their home relays, and a TCP
//!   transfer completes intact while vm-a1's home relay is SIGKILLed (the other takes over).
//! - `without_any_udp_standalone_relays_carry_over_tcp`: no UDP out of either LAN: the relay
//!   sessions go over TLS/TCP and a transfer through the relay arrives whole.
//! - `a_peer_not_on_the_home_relay_is_reached_another_way`: vm-a1 reaches only r1, vm-b1 only
//!   r2: each one's home lacks the other, its notices turn them to the coordinator's relay
//!   (fails with the notices ignored).
//! - `agents_on_different_coordinators_meet_at_a_coordinator_relay`: two coordinators sharing
//!   PostgreSQL, vm-a1 on one and vm-b1 on the other, UDP out of both LANs only to the
//!   coordinators: they reach each other through a coordinator serving relay sessions (the
//!   embedded relays alone carry nothing between two coordinators' agents), and a TCP transfer
//!   through it arrives whole; `without_any_udp_agents_on_different_coordinators_meet_over_tcp`:
//!   the same with no UDP out of either LAN (sessions of both kinds over TLS/TCP).
//! - `after_a_key_rotation_the_standalone_relay_carries_for_the_new_key`: a VM relayed through
//!   a standalone relay rotates its key; its relay session follows at once (pings within a
//!   second after the rotation; the ticket of the old key would have kept it for minutes).
//!
//! Needs root (skips with one line otherwise, fails under CI=true), `nft` and `python3`,
//! PostgreSQL for the mesh of two coordinators (likewise), and the binaries: `cargo build -p meshlink-agent -p meshlink-coordinator -p meshctl -p
//! meshlink-relay` first.

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use serde_json::Value;

use meshlink_tests::nat::{
    udp_probe, NatBed, NatMesh, NatMode, UdpEcho, COORDINATOR_HOST, NETWORK,
};
use meshlink_tests::xfer::{XferReceiver, XferSender};
use meshlink_tests::{require_root, require_tool, wait_until, MeshAgent, Provider, ScratchDir};

/// Bound on VMs reaching each other over the overlay.
const REACH: Duration = Duration::from_secs(20);
/// Bound on `status` showing the path the pings already use.
const SETTLE: Duration = Duration::from_secs(5);
/// Bound on a relayed path turning direct once UDP between the providers is allowed.
const DIRECT_AFTER_LIFT: Duration = Duration::from_secs(15);
/// Bound on a workload address appearing or leaving.
const STEP: Duration = Duration::from_secs(15);
/// The UDP echo's ports on internet hosts.
const ECHO_PORTS: [u16; 2] = [9001, 9002];
/// The local port of the UDP probes on LAN hosts.
const PROBE_PORT: u16 = 40000;
/// How long a UDP probe waits for each answer.
const PROBE_WAIT: Duration = Duration::from_secs(2);

fn timing(what: &str, took: Duration) {
    eprintln!("nat: {what}: {took:.2?}");
}

fn require_tools() {
    require_tool("nft", "nftables");
    require_tool("python3", "python3");
}

// ---------------------------------------------------------------------------------------------
// The bed itself.

/// `host:port` of an echo port on `ip`.
fn echo(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

#[test]
fn nat_bed_masquerades_and_isolates_the_lans() {
    if !require_root() {
        return;
    }
    require_tools();
    let dir = ScratchDir::create("nat-bed");
    let mut bed = NatBed::create(&[NatMode::Masquerade, NatMode::RandomMasquerade]);
    let a1 = bed.add_host(Provider::A);
    let a2 = bed.add_host(Provider::A);
    let b1 = bed.add_host(Provider::B);
    let coord = bed.coordinator_host().handle();
    let router_a = bed.public_address(Provider::A);
    let router_b = bed.public_address(Provider::B);
    assert_eq!(router_a, Ipv4Addr::new(198, 18, 0, 1));
    assert_eq!(router_b, Ipv4Addr::new(198, 18, 0, 2));
    let echo_server = UdpEcho::start(&coord, &ECHO_PORTS, &dir.join("echo.log"));

    // Every LAN reaches the internet; hosts of one LAN reach each other.
    let second = Duration::from_secs(1);
    for (from, name) in [(&a1, "a1"), (&b1, "b1")] {
        assert!(
            from.ns.ping_once(COORDINATOR_HOST, second),
            "{name} ({}) cannot ping the coordinator's host",
            from.underlay
        );
    }
    assert!(a1.ns.ping_once(a2.underlay, second), "a1 cannot ping a2");
    assert!(
        a1.ns.ping_once(router_b, second),
        "a1 cannot ping router B's public address"
    );
    // No LAN reaches another provider's private addresses, nor does the internet reach a LAN.
    for (from, name, to) in [
        (&*a1.ns, "a1", b1.underlay),
        (&*b1.ns, "b1", a1.underlay),
        (&*a1.ns, "a1", Provider::B.gateway()),
        (&coord, "the coordinator's host", a1.underlay),
        (&coord, "the coordinator's host", b1.underlay),
    ] {
        assert!(
            !from.ping_once(to, second),
            "{name} reaches the private address {to}: the LANs are not isolated"
        );
    }
    let routes = coord.ip(&["-4", "route", "show"]);
    assert!(
        !routes.contains("default") && routes.lines().count() == 1,
        "the coordinator's host routes more than the internet segment:\n{routes}"
    );

    // Masquerade: the internet sees router A's address, and the socket's own port for every
    // destination (an endpoint-independent mapping).
    let to = [
        echo(COORDINATOR_HOST, ECHO_PORTS[0]),
        echo(COORDINATOR_HOST, ECHO_PORTS[1]),
    ];
    let seen = udp_probe(&a1.ns, PROBE_PORT, &to, PROBE_WAIT);
    let expected = Some(SocketAddrV4::new(router_a, PROBE_PORT));
    assert_eq!(
        seen,
        vec![expected, expected],
        "behind Masquerade, the echo saw a1's datagrams from {seen:?}; ruleset:\n{}",
        bed.ruleset(Provider::A)
    );
    // Two hosts behind one router, the same local port: the router tells them apart by port.
    let seen_a2 = udp_probe(&a2.ns, PROBE_PORT, &to[..1], PROBE_WAIT);
    let a2_seen = seen_a2[0].expect("a2's probe is answered");
    assert_eq!(*a2_seen.ip(), router_a);
    assert_ne!(
        a2_seen.port(),
        PROBE_PORT,
        "a1 already has that public port"
    );

    // Random masquerade: router B's address, another port for each destination.
    let seen = udp_probe(&b1.ns, PROBE_PORT, &to, PROBE_WAIT);
    let [Some(first), Some(second)] = seen[..] else {
        panic!("b1's probes were not all answered: {seen:?}");
    };
    assert_eq!(
        (*first.ip(), *second.ip()),
        (router_b, router_b),
        "behind RandomMasquerade, the echo saw b1 as {seen:?}"
    );
    assert_ne!(
        first.port(),
        second.port(),
        "behind RandomMasquerade, one socket kept its public port for two destinations"
    );
    eprintln!("nat: b1 seen as {first} and {second} (symmetric NAT)");

    // Everything goes with the guards.
    let mut names: Vec<String> = [&a1.ns, &a2.ns, &b1.ns, &bed.switch]
        .iter()
        .map(|ns| ns.name().to_owned())
        .collect();
    names.push(coord.name().to_owned());
    for p in [Provider::A, Provider::B] {
        names.push(bed.router(p).ns.name().to_owned());
    }
    drop(echo_server);
    drop((a1, a2, b1, bed));
    let listed = meshlink_tests::host_run("ip", &["netns", "list"]);
    for name in names {
        assert!(
            !listed
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name.as_str())),
            "namespace {name} left behind"
        );
    }
}

#[test]
fn nat_bed_blocks_udp_and_lifts_the_block() {
    if !require_root() {
        return;
    }
    require_tools();
    let dir = ScratchDir::create("nat-block");
    let mut bed = NatBed::create(&[NatMode::Masquerade]);
    let a1 = bed.add_host(Provider::A);
    let other = bed.add_public_host();
    let _echo_coord = UdpEcho::start(
        &bed.coordinator_host().handle(),
        &ECHO_PORTS[..1],
        &dir.join("echo-coordinator.log"),
    );
    let _echo_other = UdpEcho::start(
        &other.handle(),
        &ECHO_PORTS[..1],
        &dir.join("echo-other.log"),
    );
    let to = [
        echo(COORDINATOR_HOST, ECHO_PORTS[0]),
        echo(other.address, ECHO_PORTS[0]),
    ];
    let answered = |what: &str| -> [bool; 2] {
        let seen = udp_probe(&a1.ns, PROBE_PORT, &to, PROBE_WAIT);
        eprintln!("nat: {what}: {seen:?}");
        [seen[0].is_some(), seen[1].is_some()]
    };
    let ruleset = || bed.ruleset(Provider::A);

    assert_eq!(answered("open"), [true, true], "{}", ruleset());

    bed.block_udp_except_coordinator(Provider::A);
    assert_eq!(
        answered("UDP blocked but to the coordinator"),
        [true, false],
        "{}",
        ruleset()
    );
    assert!(
        a1.ns.ping_once(other.address, Duration::from_secs(1)),
        "the UDP block stops ICMP too"
    );
    // Blocking twice replaces the block.
    bed.block_udp_except_coordinator(Provider::A);
    assert_eq!(answered("blocked again"), [true, false], "{}", ruleset());

    bed.unblock(Provider::A);
    assert_eq!(answered("block lifted"), [true, true], "{}", ruleset());

    // A path that dies, and comes back.
    let rule = bed.add_forward_rule(
        Provider::A,
        &format!("meta l4proto udp ip daddr {COORDINATOR_HOST} drop"),
    );
    assert_eq!(
        answered("UDP to the coordinator dropped"),
        [false, true],
        "{}",
        ruleset()
    );
    bed.remove_rule(&rule);
    assert_eq!(answered("rule removed"), [true, true], "{}", ruleset());
}

#[test]
fn nat_bed_lets_masqueraded_hosts_punch_through() {
    if !require_root() {
        return;
    }
    require_tools();
    let dir = ScratchDir::create("nat-punch");
    let mut bed = NatBed::create(&[NatMode::Masquerade, NatMode::Masquerade]);
    let a1 = bed.add_host(Provider::A);
    let b1 = bed.add_host(Provider::B);
    let b2 = bed.add_host(Provider::B);
    let router_a = bed.public_address(Provider::A);
    let router_b = bed.public_address(Provider::B);
    // b1 sends first towards a1's public mapping (198.18.0.1:PROBE_PORT), b2 does not.
    let _punched = UdpEcho::start_punching(
        &b1.handle(),
        &ECHO_PORTS[..1],
        &[SocketAddrV4::new(router_a, PROBE_PORT)],
        &dir.join("echo-b1.log"),
    );
    let _unpunched = UdpEcho::start(&b2.handle(), &ECHO_PORTS[1..], &dir.join("echo-b2.log"));
    let seen = udp_probe(
        &a1.ns,
        PROBE_PORT,
        &[echo(router_b, ECHO_PORTS[0]), echo(router_b, ECHO_PORTS[1])],
        PROBE_WAIT,
    );
    eprintln!("nat: a1 to b1 (punched) and b2 (not): {seen:?}");
    assert_eq!(
        seen,
        vec![Some(SocketAddrV4::new(router_a, PROBE_PORT)), None],
        "a1 -> router B's public address: b1 punched a hole and must answer, seeing a1 as \
         router A's address with a1's own port; b2 did not and must not\nA:\n{}\nB:\n{}",
        bed.ruleset(Provider::A),
        bed.ruleset(Provider::B)
    );
}

// ---------------------------------------------------------------------------------------------
// The mesh behind NAT.

/// The bed of every mesh test ([`NatMesh`]): root checked (`None`: skipped), routers built
/// with `modes`, the coordinator started on its internet host, the network and a join token
/// made.
fn nat_mesh(name: &str, modes: &[NatMode]) -> Option<NatMesh> {
    if !require_root() {
        return None;
    }
    require_tools();
    Some(NatMesh::new(name, modes))
}

/// Starts the agents of `nodes` at once and waits until every one is up.
fn join(mesh: &mut NatMesh, nodes: &[(&str, Provider)]) {
    let took = mesh.join(nodes);
    timing(&format!("{} agents up", nodes.len()), took);
}

#[test]
fn two_providers_behind_masquerade_connect_directly() {
    let Some(mut mesh) = nat_mesh("nat-direct", &[NatMode::Masquerade, NatMode::Masquerade]) else {
        return;
    };
    join(&mut mesh, &[("vm-a1", Provider::A), ("vm-b1", Provider::B)]);
    let names = ["vm-a1", "vm-b1"];
    let took = mesh.reach(&mesh.both_ways(&names), REACH);
    timing("vm-a1 and vm-b1 ping each other", took);

    // Each reaches the other directly, at the other router's public address.
    let settled = mesh.wait_paths(
        &names,
        SETTLE,
        "a direct path to the other router's public address, both ways",
        |_, to, path| {
            path.is("direct") && path.endpoint_ip() == Some(IpAddr::V4(mesh.public_address_of(to)))
        },
    );
    timing("paths reported direct", settled);
    for (from, to) in [("vm-a1", "vm-b1"), ("vm-b1", "vm-a1")] {
        eprintln!("nat: {from} -> {to}: {:?}", mesh.path(from, to));
    }
}

#[test]
fn symmetric_nat_still_connects() {
    let Some(mut mesh) = nat_mesh(
        "nat-symmetric",
        &[NatMode::RandomMasquerade, NatMode::Masquerade],
    ) else {
        return;
    };
    join(&mut mesh, &[("vm-a1", Provider::A), ("vm-b1", Provider::B)]);
    let names = ["vm-a1", "vm-b1"];
    let took = mesh.reach(&mesh.both_ways(&names), REACH);
    timing("vm-a1 (symmetric NAT) and vm-b1 ping each other", took);

    // Either way is fine behind a symmetric NAT; the path says which.
    mesh.wait_paths(
        &names,
        SETTLE,
        "a direct or relayed path both ways",
        |_, _, path| path.is("direct") || path.is("relay"),
    );
    for (from, to) in [("vm-a1", "vm-b1"), ("vm-b1", "vm-a1")] {
        let path = mesh.path(from, to);
        eprintln!(
            "nat: behind a symmetric NAT, {from} -> {to} goes {} (endpoint {:?}, via {:?}, rtt {:?} ms)",
            path.kind.as_deref().unwrap_or("?"),
            path.endpoint,
            path.via,
            path.rtt_ms
        );
    }
}

#[test]
fn udp_blocked_between_providers_goes_through_the_relay() {
    let Some(mut mesh) = nat_mesh("nat-relay", &[NatMode::Masquerade, NatMode::Masquerade]) else {
        return;
    };
    // Only the coordinator is reachable over UDP, from the start.
    mesh.bed().block_udp_except_coordinator(Provider::A);
    mesh.bed().block_udp_except_coordinator(Provider::B);
    join(&mut mesh, &[("vm-a1", Provider::A), ("vm-b1", Provider::B)]);
    let names = ["vm-a1", "vm-b1"];
    let took = mesh.reach(&mesh.both_ways(&names), REACH);
    timing("vm-a1 and vm-b1 ping each other with UDP blocked", took);
    mesh.wait_paths(&names, SETTLE, "a relayed path both ways", |_, _, path| {
        path.is("relay") && path.is_measured()
    });

    // A TCP transfer through the relay, during which the block is lifted.
    let (a1, b1) = (mesh.agent("vm-a1"), mesh.agent("vm-b1"));
    let limit = Duration::from_secs(150);
    let mut receiver = XferReceiver::start(b1.ns(), mesh.dir(), IpAddr::V4(b1.address()), limit);
    // 8 MB at 4 Mbit/s: 16 s at least, so that the lift falls in the middle.
    let bytes = 8_000_000;
    let mut sender = XferSender::start(
        a1.ns(),
        mesh.dir(),
        receiver.addr(),
        bytes,
        Some(4.0),
        limit,
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        sender.is_running(),
        "the transfer ended before the block was lifted\n{}",
        mesh.statuses()
    );
    let lifted = Instant::now();
    mesh.bed().unblock(Provider::A);
    mesh.bed().unblock(Provider::B);
    let direct = mesh.wait_paths(
        &names,
        DIRECT_AFTER_LIFT,
        "the path to turn direct, to the other router's public address, after the block is \
         lifted",
        |_, to, path| {
            path.is("direct") && path.endpoint_ip() == Some(IpAddr::V4(mesh.public_address_of(to)))
        },
    );
    timing("block lifted -> direct both ways", direct);
    let transfer_running = sender.is_running();
    let sent = sender.finish(limit);
    let received = receiver.finish(Duration::from_secs(30));
    timing(
        &format!(
            "transfer of {} bytes ({:.1} Mbit/s; still running when the path turned direct: \
             {transfer_running})",
            received.bytes,
            received.mbit_per_sec()
        ),
        lifted.elapsed(),
    );
    assert_eq!(sent.bytes, bytes, "the sender wrote a different count");
    assert_eq!(
        received.bytes, sent.bytes,
        "received {} of {} bytes across the relay-to-direct switch",
        received.bytes, sent.bytes
    );
    assert_eq!(
        received.sha256, sent.sha256,
        "the bytes received differ from those sent across the relay-to-direct switch"
    );
    for (from, to) in [("vm-a1", "vm-b1"), ("vm-b1", "vm-a1")] {
        eprintln!(
            "nat: {from} -> {to} after the lift: {:?}",
            mesh.path(from, to)
        );
    }
}

#[test]
fn without_any_udp_the_session_and_the_relay_go_over_tcp() {
    let Some(mut mesh) = nat_mesh("nat-tcp", &[NatMode::Masquerade, NatMode::Masquerade]) else {
        return;
    };
    // A firewall that lets only TCP out, on both sides: no QUIC to the coordinator either.
    mesh.bed().block_all_udp(Provider::A);
    mesh.bed().block_all_udp(Provider::B);
    join(&mut mesh, &[("vm-a1", Provider::A), ("vm-b1", Provider::B)]);
    let names = ["vm-a1", "vm-b1"];
    let took = mesh.reach(&mesh.both_ways(&names), REACH);
    timing("vm-a1 and vm-b1 ping each other with no UDP at all", took);
    mesh.wait_paths(
        &names,
        SETTLE,
        "a path relayed over TCP both ways",
        |_, _, path| path.is_relayed_over("tcp") && path.is_measured(),
    );

    // Bulk data through the TCP relay arrives whole.
    send_whole(&mesh, "over the TCP relay");
}

const WORKLOAD: &str = "web";
const WORKLOAD_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 50, 10);

/// Whether the workload address is on `agent`'s tunnel interface.
fn has_workload(agent: &MeshAgent) -> bool {
    agent.has_address(WORKLOAD_IP)
}

fn wait_workload(mesh: &NatMesh, name: &str, present: bool) -> Duration {
    let started = Instant::now();
    let agent = mesh.agent(name);
    let what = format!(
        "{WORKLOAD_IP} to be {} on {name}",
        if present { "present" } else { "absent" }
    );
    wait_until(STEP, &what, || {
        (has_workload(agent) == present).then_some(())
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}; workload: {}\n{}",
            mesh.coordinator()
                .meshctl()
                .json(&["workload", "show", WORKLOAD]),
            mesh.statuses()
        )
    });
    started.elapsed()
}

#[test]
fn a_workload_moves_between_natted_nodes() {
    let Some(mut mesh) = nat_mesh(
        "nat-workload",
        &[
            NatMode::Masquerade,
            NatMode::Masquerade,
            NatMode::Masquerade,
        ],
    ) else {
        return;
    };
    join(
        &mut mesh,
        &[
            ("vm-a1", Provider::A),
            ("vm-b1", Provider::B),
            ("vm-c1", Provider::C),
        ],
    );
    let took = mesh.reach(&mesh.both_ways(&["vm-a1", "vm-b1", "vm-c1"]), REACH);
    timing("3 VMs behind 3 routers ping each other", took);

    let ctl = mesh.coordinator().meshctl();
    ctl.run(&[
        "workload",
        "create",
        WORKLOAD,
        "--network",
        NETWORK,
        "--address",
        &WORKLOAD_IP.to_string(),
        "--allow",
        "vm-a1,vm-b1",
    ]);
    ctl.run(&["workload", "attach", WORKLOAD, "--node", "vm-a1"]);
    wait_workload(&mesh, "vm-a1", true);
    let c1 = mesh.agent("vm-c1").ns().clone();
    let answered = c1.wait_for_ping(WORKLOAD_IP, REACH).unwrap_or_else(|e| {
        panic!(
            "the workload address on vm-a1 does not answer vm-c1: {e}\n{}",
            mesh.statuses()
        )
    });
    timing("workload on vm-a1 answers vm-c1", answered);

    let started = Instant::now();
    ctl.run(&["workload", "move", WORKLOAD, "--to", "vm-b1"]);
    wait_workload(&mesh, "vm-b1", true);
    wait_workload(&mesh, "vm-a1", false);
    timing(
        "moved to vm-b1 (address there, gone from vm-a1)",
        started.elapsed(),
    );
    let answered = c1.wait_for_ping(WORKLOAD_IP, REACH).unwrap_or_else(|e| {
        panic!(
            "the workload address, moved to vm-b1, does not answer vm-c1: {e}\n{}",
            mesh.statuses()
        )
    });
    timing("workload on vm-b1 answers vm-c1", answered);
    let w = ctl.json(&["workload", "show", WORKLOAD]);
    assert_eq!(
        w.pointer("/holder/name").and_then(Value::as_str),
        Some("vm-b1"),
        "{w}"
    );
}

/// The standalone relay that is `name`'s home, from its `status` (`discovery.relays`).
fn home_relay(mesh: &NatMesh, name: &str) -> Option<String> {
    let status = mesh.agent(name).try_status()?;
    status
        .pointer("/discovery/relays")?
        .as_array()?
        .iter()
        .find(|r| r["home"] == true && r["up"] == true)
        .and_then(|r| r["name"].as_str())
        .map(str::to_owned)
}

#[test]
fn a_standalone_relay_carries_and_another_takes_over_when_it_dies() {
    if !require_root() {
        return;
    }
    require_tools();
    let mut mesh = NatMesh::with_relays(
        "nat-standalone",
        &[NatMode::Masquerade, NatMode::Masquerade],
        &["r1", "r2"],
    );
    // UDP out of both LANs only to the coordinator and the two relays: no direct path.
    let mut allowed = vec![COORDINATOR_HOST];
    allowed.extend(mesh.relay_hosts());
    mesh.bed().block_udp_except_hosts(Provider::A, &allowed);
    mesh.bed().block_udp_except_hosts(Provider::B, &allowed);
    join(&mut mesh, &[("vm-a1", Provider::A), ("vm-b1", Provider::B)]);
    let names = ["vm-a1", "vm-b1"];
    let took = mesh.reach(&mesh.both_ways(&names), REACH);
    timing("vm-a1 and vm-b1 ping each other through the relays", took);

    // Both carry through a standalone relay (not the coordinator's): the path goes via a
    // relay host's address, which is that agent's home.
    let relay_addrs: Vec<String> = ["r1", "r2"]
        .iter()
        .map(|r| mesh.relay(r).addr.to_string())
        .collect();
    let settled = mesh.wait_paths(
        &names,
        Duration::from_secs(15),
        "a path relayed via a standalone relay, both ways",
        |_, _, path| {
            path.is_relayed_over("udp")
                && path.is_measured()
                && path.via.as_ref().is_some_and(|v| relay_addrs.contains(v))
        },
    );
    timing("paths relayed via standalone relays", settled);
    let home = home_relay(&mesh, "vm-a1")
        .unwrap_or_else(|| panic!("vm-a1 has no home relay\n{}", mesh.statuses()));
    let home_addr = mesh.relay(&home).addr.to_string();
    let path = mesh.path("vm-a1", "vm-b1");
    assert_eq!(
        (path.via.as_deref(), path.relay.as_deref()),
        (Some(home_addr.as_str()), Some(home.as_str())),
        "vm-a1 sends through its home\n{}",
        mesh.statuses()
    );
    eprintln!(
        "nat: homes: vm-a1 {home}, vm-b1 {:?}",
        home_relay(&mesh, "vm-b1")
    );

    // A TCP transfer runs while vm-a1's home relay is killed: it completes intact, through
    // the other relay, on the same WireGuard session.
    let (a1, b1) = (mesh.agent("vm-a1"), mesh.agent("vm-b1"));
    let limit = Duration::from_secs(150);
    let mut receiver = XferReceiver::start(b1.ns(), mesh.dir(), IpAddr::V4(b1.address()), limit);
    let bytes = 8_000_000;
    let mut sender = XferSender::start(
        a1.ns(),
        mesh.dir(),
        receiver.addr(),
        bytes,
        Some(4.0),
        limit,
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        sender.is_running(),
        "the transfer ended before the relay was killed\n{}",
        mesh.statuses()
    );
    let through_home: Vec<(&str, &str)> = [("vm-a1", "vm-b1"), ("vm-b1", "vm-a1")]
        .into_iter()
        .filter(|(from, to)| mesh.path(from, to).via.as_deref() == Some(home_addr.as_str()))
        .collect();
    let killed = Instant::now();
    mesh.relay(&home).kill();
    let survivors: Vec<String> = relay_addrs
        .iter()
        .filter(|a| **a != home_addr)
        .cloned()
        .collect();
    let moved = mesh.wait_paths(
        &names,
        Duration::from_secs(20),
        "the path relayed via the surviving relay, both ways, after the home relay was killed",
        |_, _, path| path.is("relay") && path.via.as_ref().is_some_and(|v| survivors.contains(v)),
    );
    timing(
        &format!("relay {home} killed -> the other relay carries"),
        moved,
    );
    assert_ne!(
        home_relay(&mesh, "vm-a1").as_deref(),
        Some(home.as_str()),
        "a dead relay is no home\n{}",
        mesh.statuses()
    );
    // For a path that went through the dead relay, the move to the other is its last change.
    assert!(
        !through_home.is_empty(),
        "vm-a1's path to vm-b1 went via its home"
    );
    for (from, to) in through_home {
        let path = mesh.path(from, to);
        assert!(
            path.changed_secs_ago
                .is_some_and(|ago| ago <= killed.elapsed().as_secs()),
            "{from} -> {to}: changed before the relay died: {path:?}"
        );
    }
    let sent = sender.finish(limit);
    let received = receiver.finish(Duration::from_secs(30));
    timing(
        &format!(
            "transfer of {} bytes across the relay's death ({:.1} Mbit/s)",
            received.bytes,
            received.mbit_per_sec()
        ),
        killed.elapsed(),
    );
    assert_eq!(sent.bytes, bytes, "the sender wrote a different count");
    assert_eq!(
        (received.bytes, received.sha256),
        (sent.bytes, sent.sha256),
        "the bytes received differ from those sent across the relay's death"
    );
    mesh.reach(&mesh.both_ways(&names), REACH);
}

#[test]
fn without_any_udp_standalone_relays_carry_over_tcp() {
    if !require_root() {
        return;
    }
    require_tools();
    let mut mesh = NatMesh::with_relays(
        "nat-standalone-tcp",
        &[NatMode::Masquerade, NatMode::Masquerade],
        &["r1"],
    );
    // No UDP out of either LAN: the control session, the grants and the relay sessions all
    // go over TLS/TCP.
    mesh.bed().block_all_udp(Provider::A);
    mesh.bed().block_all_udp(Provider::B);
    join(&mut mesh, &[("vm-a1", Provider::A), ("vm-b1", Provider::B)]);
    let names = ["vm-a1", "vm-b1"];
    let relay_addr = mesh.relay("r1").addr.to_string();
    let took = mesh.reach(&mesh.both_ways(&names), REACH);
    timing("vm-a1 and vm-b1 ping each other without UDP", took);
    let settled = mesh.wait_paths(
        &names,
        Duration::from_secs(15),
        "a path relayed via the standalone relay over tcp, both ways",
        |_, _, path| path.is_relayed_over("tcp") && path.via.as_deref() == Some(&relay_addr),
    );
    timing("paths relayed via r1 over tcp", settled);
    send_whole(&mesh, "through r1 over tcp");
}

#[test]
fn agents_on_different_coordinators_meet_at_a_coordinator_relay() {
    // UDP out of both LANs only to the coordinators: no direct path.
    on_two_coordinators("nat-coordinators", "udp", |bed, provider, coordinators| {
        bed.block_udp_except_hosts(provider, coordinators);
    });
}

#[test]
fn without_any_udp_agents_on_different_coordinators_meet_over_tcp() {
    // No UDP out of either LAN: control and relay sessions over TLS/TCP.
    on_two_coordinators("nat-coordinators-tcp", "tcp", |bed, provider, _| {
        bed.block_all_udp(provider);
    });
}

/// Two coordinators sharing PostgreSQL, vm-a1 (provider A) joined through the first and
/// vm-b1 (provider B) through the second, both LANs blocked with `block` before they join:
/// they hold their sessions with different coordinators, reach each other relayed `over`
/// (`udp`, `tcp`) through a coordinator as a relay, which any coordinator lists, and a TCP
/// transfer between them arrives whole.
fn on_two_coordinators(name: &str, over: &str, block: impl Fn(&NatBed, Provider, &[Ipv4Addr])) {
    if !require_root() {
        return;
    }
    require_tools();
    let Some(mut mesh) =
        NatMesh::with_coordinators(name, &[NatMode::Masquerade, NatMode::Masquerade], 2)
    else {
        return;
    };
    let coordinators = mesh.coordinator_hosts();
    block(mesh.bed(), Provider::A, &coordinators);
    block(mesh.bed(), Provider::B, &coordinators);
    // Each joins with the token of another coordinator, which it tries first.
    join_via(&mut mesh, &[("vm-a1", Provider::A)], 0);
    join_via(&mut mesh, &[("vm-b1", Provider::B)], 1);
    let connected_to = |name: &str| -> Option<String> {
        let st = mesh.agent(name).try_status()?;
        let c = &st["control"];
        (c["connected"] == true).then(|| c["coordinator"].as_str().map(str::to_owned))?
    };
    let on: Vec<String> = ["vm-a1", "vm-b1"]
        .iter()
        .map(|n| {
            wait_until(SETTLE, "connected", || connected_to(n)).unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    eprintln!("nat: vm-a1 on {}, vm-b1 on {}", on[0], on[1]);
    assert_ne!(
        on[0],
        on[1],
        "the two agents must hold their sessions with different coordinators\n{}",
        mesh.statuses()
    );
    let names = ["vm-a1", "vm-b1"];
    let took = mesh.reach(&mesh.both_ways(&names), REACH);
    timing(
        &format!("vm-a1 and vm-b1, on different coordinators, ping each other ({over})"),
        took,
    );
    // Relayed, through a coordinator as a relay (a relay session, not the control session).
    let settled = mesh.wait_paths(
        &names,
        Duration::from_secs(15),
        &format!("a path relayed over {over} through a coordinator's relay sessions, both ways"),
        |_, _, path| {
            path.is_relayed_over(over)
                && path.is_measured()
                && path
                    .relay
                    .as_deref()
                    .is_some_and(|r| r.starts_with("coordinator-"))
        },
    );
    timing("paths relayed via coordinators", settled);
    // The report reaches vm-a1's coordinator within a second or so, round trip included.
    let shown = Instant::now();
    let ctl = mesh.coordinators()[0].meshctl();
    let last = std::cell::RefCell::new(Value::Null);
    wait_until(
        Duration::from_secs(3),
        "vm-a1's relayed path to vm-b1, measured, in node show",
        || {
            let node = ctl.json(&["node", "show", "vm-a1"]);
            let ok = node["paths"]["peers"].as_array().is_some_and(|peers| {
                peers.iter().any(|p| {
                    p["peer_name"] == "vm-b1"
                        && p["kind"] == "relay"
                        && p["rtt_us"].as_u64().is_some_and(|us| us > 0)
                })
            });
            *last.borrow_mut() = node;
            ok.then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {}", last.borrow()));
    timing("the measured relayed path in node show", shown.elapsed());
    // Any coordinator lists both as relays.
    let relays = mesh.coordinators()[1].meshctl().json(&["relay", "list"]);
    let listed: Vec<&str> = relays["coordinators"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert_eq!(listed, ["coordinator-1", "coordinator-2"], "{relays}");
    for (from, to) in [("vm-a1", "vm-b1"), ("vm-b1", "vm-a1")] {
        eprintln!("nat: {from} -> {to}: {:?}", mesh.path(from, to));
    }
    send_whole(&mesh, &format!("through a coordinator's relay over {over}"));
}

/// Sends 4 MB from vm-a1 to vm-b1 over TCP as fast as it goes, and checks that it arrived
/// whole (count and SHA-256); `how` says which way it went, for the timing line and the
/// failure.
fn send_whole(mesh: &NatMesh, how: &str) {
    let (a1, b1) = (mesh.agent("vm-a1"), mesh.agent("vm-b1"));
    let limit = Duration::from_secs(60);
    let mut receiver = XferReceiver::start(b1.ns(), mesh.dir(), IpAddr::V4(b1.address()), limit);
    let bytes = 4_000_000;
    let started = Instant::now();
    let mut sender = XferSender::start(a1.ns(), mesh.dir(), receiver.addr(), bytes, None, limit);
    let sent = sender.finish(limit);
    let received = receiver.finish(Duration::from_secs(30));
    timing(
        &format!(
            "transfer of {} bytes {how} ({:.1} Mbit/s)",
            received.bytes,
            received.mbit_per_sec()
        ),
        started.elapsed(),
    );
    assert_eq!(
        (received.bytes, &received.sha256),
        (bytes, &sent.sha256),
        "the bytes received {how} differ from those sent"
    );
}

/// [`NatMesh::join_via`], timed.
fn join_via(mesh: &mut NatMesh, nodes: &[(&str, Provider)], coordinator: usize) {
    let took = mesh.join_via(nodes, coordinator);
    timing(
        &format!("{} agents up via coordinator {coordinator}", nodes.len()),
        took,
    );
}

#[test]
fn after_a_key_rotation_the_standalone_relay_carries_for_the_new_key() {
    if !require_root() {
        return;
    }
    require_tools();
    let mut mesh = NatMesh::with_relays(
        "nat-standalone-rotation",
        &[NatMode::Masquerade, NatMode::Masquerade],
        &["r1"],
    );
    let mut allowed = vec![COORDINATOR_HOST];
    allowed.extend(mesh.relay_hosts());
    mesh.bed().block_udp_except_hosts(Provider::A, &allowed);
    mesh.bed().block_udp_except_hosts(Provider::B, &allowed);
    join(&mut mesh, &[("vm-a1", Provider::A), ("vm-b1", Provider::B)]);
    let names = ["vm-a1", "vm-b1"];
    let relay_addr = mesh.relay("r1").addr.to_string();
    mesh.reach(&mesh.both_ways(&names), REACH);
    mesh.wait_paths(
        &names,
        Duration::from_secs(15),
        "a path relayed via r1, both ways",
        |_, _, path| path.is("relay") && path.via.as_deref() == Some(&relay_addr),
    );

    // vm-b1 rotates its key: its relay session must follow, or r1 would deliver nothing
    // addressed to the new key (and name vm-b1 by the old one) until its ticket ran out.
    let old = mesh.agent("vm-b1").public_key();
    let asked = Instant::now();
    mesh.coordinator()
        .meshctl()
        .run(&["node", "rotate-key", "vm-b1"]);
    let rotated = wait_until(Duration::from_secs(30), "vm-b1's new key", || {
        mesh.agent("vm-b1")
            .try_status()
            .and_then(|s| s["public_key"].as_str().map(str::to_owned))
            .filter(|k| *k != old)
    });
    assert!(rotated.is_ok(), "vm-b1 kept its key\n{}", mesh.statuses());
    timing("vm-b1's key rotated", asked.elapsed());
    let took = mesh.reach(&mesh.both_ways(&names), REACH);
    timing("ping both ways again after the rotation", took);
    mesh.wait_paths(
        &names,
        Duration::from_secs(15),
        "a path relayed via r1 after the rotation, both ways",
        |_, _, path| path.is("relay") && path.via.as_deref() == Some(&relay_addr),
    );
}

#[test]
fn a_peer_not_on_the_home_relay_is_reached_another_way() {
    if !require_root() {
        return;
    }
    require_tools();
    let mut mesh = NatMesh::with_relays(
        "nat-standalone-apart",
        &[NatMode::Masquerade, NatMode::Masquerade],
        &["r1", "r2"],
    );
    let mut allowed = vec![COORDINATOR_HOST];
    allowed.extend(mesh.relay_hosts());
    mesh.bed().block_udp_except_hosts(Provider::A, &allowed);
    mesh.bed().block_udp_except_hosts(Provider::B, &allowed);
    // vm-a1 reaches r1 only, vm-b1 r2 only: they share no standalone relay, so each one's home
    // lacks the other; its notices send them through the coordinator's relay.
    let (r1, r2) = (*mesh.relay("r1").addr.ip(), *mesh.relay("r2").addr.ip());
    let _a = mesh
        .bed()
        .add_forward_rule(Provider::A, &format!("ip daddr {r2} drop"));
    let _b = mesh
        .bed()
        .add_forward_rule(Provider::B, &format!("ip daddr {r1} drop"));
    join(&mut mesh, &[("vm-a1", Provider::A), ("vm-b1", Provider::B)]);
    let names = ["vm-a1", "vm-b1"];
    // Each has its reachable relay as home before anything else is checked.
    for (name, relay) in [("vm-a1", "r1"), ("vm-b1", "r2")] {
        let homed = wait_until(Duration::from_secs(15), "a home relay", || {
            (home_relay(&mesh, name).as_deref() == Some(relay)).then_some(())
        });
        assert!(
            homed.is_ok(),
            "{name} has no home {relay}\n{}",
            mesh.statuses()
        );
    }
    let took = mesh.reach(&mesh.both_ways(&names), REACH);
    timing(
        "vm-a1 and vm-b1 ping each other, homed on different relays",
        took,
    );
    let coordinator = format!(
        "{COORDINATOR_HOST}:{}",
        meshlink_tests::coordinator::QUIC_PORT
    );
    mesh.wait_paths(
        &names,
        Duration::from_secs(10),
        "a path through the coordinator's relay, both ways",
        |_, _, path| {
            path.is("relay") && path.relay.is_none() && path.via.as_deref() == Some(&coordinator)
        },
    );
}

#[test]
fn a_control_session_over_tcp_moves_back_to_quic_once_udp_opens() {
    let Some(mut mesh) = nat_mesh("nat-quic-back", &[NatMode::Masquerade]) else {
        return;
    };
    // A firewall that lets only TCP out: the session falls back to TLS over TCP.
    mesh.bed().block_all_udp(Provider::A);
    join(&mut mesh, &[("vm-a1", Provider::A)]);
    let a1 = mesh.agent("vm-a1");
    let over = |want: &str| {
        let st = a1.try_status()?;
        let c = &st["control"];
        (c["connected"] == true && c["transport"] == want).then_some(())
    };
    wait_until(STEP, "vm-a1's control session over TCP", || over("tcp"))
        .unwrap_or_else(|e| panic!("{e}\n{}", mesh.statuses()));
    // The firewall lets UDP out again: within a retry period (30 s) and a reconnection, the
    // session runs over QUIC again.
    mesh.bed().unblock(Provider::A);
    let started = Instant::now();
    wait_until(
        Duration::from_secs(45),
        "vm-a1's control session over QUIC",
        || over("udp"),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.statuses()));
    timing("back on QUIC after UDP opened", started.elapsed());
}
