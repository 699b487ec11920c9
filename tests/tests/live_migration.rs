//! A TCP connection to a workload address survives a move of the workload between VMs: the
//! server's socket is frozen on vm-a1 (TCP repair mode, `meshlink-tcp-migrate`) and restored
//! held on vm-c1, the address moves to vm-c1 through the mesh (`meshctl workload move`), and
//! the restored socket goes live there, with what the parked socket took in meanwhile; the client on vm-b1 keeps its one connection, with bytes in flight both ways at the
//! freeze (unacknowledged data in the server's send queue, unread data in its receive queue),
//! and reads everything in order.
//!
//! Needs root (TUN, namespaces, repair mode) and the binaries (`cargo build -p meshlink-agent
//! -p meshlink-coordinator -p meshctl`).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use meshlink_tcp_migrate::{freeze, restore_held, Frozen};
use meshlink_tests::process::Process;
use meshlink_tests::{
    agent_bin, chat_bin, coordinator_bin, meshctl_bin, require_root, wait_until, Coordinator,
    MeshAgent, Provider, ProviderHost, Providers, ScratchDir,
};

const NETWORK: &str = "prod";
const WORKLOAD: &str = "kv";
const WORKLOAD_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 50, 10);
const PORT: u16 = 7070;
const STEP: Duration = Duration::from_secs(15);

fn read_exact(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    s.read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("reading {n} bytes: {e}"));
    buf
}

/// A mesh on three providers with the coordinator on A and the VMs `vms` (host provider,
/// name, provider label), and the workload `workload` (100.64.50.10; vm-c1 its standby,
/// vm-a1 and vm-c1 allowed) held by vm-a1. Dropped in order: the agents, the coordinator,
/// the namespaces, the scratch directory.
struct Bed {
    agents: Vec<MeshAgent>,
    coord: Coordinator,
    /// The hosts' namespaces (the VMs', then the coordinator's), gone with them.
    _hosts: Vec<ProviderHost>,
    _providers: Providers,
    dir: ScratchDir,
}

fn bed(name: &str, workload: &str, vms: &[(Provider, &str, &str)]) -> Bed {
    let dir = ScratchDir::create(name);
    let mut providers = Providers::create(3);
    let coord_host = providers.add_host(Provider::A);
    let hosts: Vec<(ProviderHost, &str, &str)> = vms
        .iter()
        .map(|(p, name, label)| (providers.add_host(*p), *name, *label))
        .collect();
    let coord = Coordinator::start(&coord_host.ns, &dir, coord_host.underlay);
    let ctl = coord.meshctl();
    ctl.network_create(NETWORK, "100.64.0.0/16");
    let uses = u32::try_from(vms.len()).expect("a few VMs");
    let token = ctl.token_create(NETWORK, Some(uses), Some("1h"));
    let mut agents: Vec<MeshAgent> = hosts
        .iter()
        .map(|(h, name, provider)| {
            MeshAgent::spawn_join(&h.ns, &dir, &token, name, &[("provider", provider)])
        })
        .collect();
    for a in &mut agents {
        a.wait_ready(meshlink_tests::mesh::READY_TIMEOUT);
    }
    ctl.run(&[
        "workload",
        "create",
        workload,
        "--network",
        NETWORK,
        "--address",
        "100.64.50.10",
        "--standby",
        "vm-c1",
        "--allow",
        "vm-a1,vm-c1",
    ]);
    ctl.run(&["workload", "attach", workload, "--node", "vm-a1"]);
    wait_until(STEP, "the workload address up on vm-a1", || {
        agents[0].has_address(WORKLOAD_IP).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let mut hosts: Vec<ProviderHost> = hosts.into_iter().map(|(h, _, _)| h).collect();
    hosts.push(coord_host);
    Bed {
        agents,
        coord,
        _hosts: hosts,
        _providers: providers,
        dir,
    }
}

#[test]
fn a_connection_moves_with_its_workload() {
    if !require_root() {
        return;
    }
    agent_bin();
    coordinator_bin();
    meshctl_bin();
    let vms = [
        (Provider::A, "vm-a1", "aws"),
        (Provider::B, "vm-b1", "gcp"),
        (Provider::C, "vm-c1", "azure"),
    ];
    let bed = bed("live-migration", WORKLOAD, &vms);
    let (dir, ctl) = (&bed.dir, bed.coord.meshctl());
    let (a1, b1, c1) = (&bed.agents[0], &bed.agents[1], &bed.agents[2]);

    // The server listens on the workload address on vm-a1; the client on vm-b1 connects.
    let addr = SocketAddr::from((WORKLOAD_IP, PORT));
    let listener: TcpListener = a1
        .ns()
        .within(move || TcpListener::bind(addr).expect("bind"))
        .expect("vm-a1's namespace");
    let mut client: TcpStream = b1
        .ns()
        .within(move || {
            let started = Instant::now();
            loop {
                match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                    Ok(s) => break s,
                    Err(e) if started.elapsed() > STEP => panic!("connect to {addr}: {e}"),
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        })
        .expect("vm-b1's namespace");
    let client_port = client.local_addr().unwrap().port();
    let (mut server, _) = listener.accept().expect("accept");
    for s in [&client, &server] {
        s.set_read_timeout(Some(STEP)).unwrap();
    }
    client.write_all(b"hello").unwrap();
    assert_eq!(read_exact(&mut server, 5), b"hello");
    server.write_all(b"world").unwrap();
    assert_eq!(read_exact(&mut client, 5), b"world");

    // Bytes in flight at the freeze: the client's acknowledgements are dropped on vm-b1, so
    // what the server sends stays unacknowledged in its send queue; and the client sends
    // what the server does not read before the freeze.
    client.write_all(b"unread").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let block = format!(
        "table inet mltest {{\n  chain out {{\n    type filter hook output priority 0;\n    \
         ip daddr {WORKLOAD_IP} tcp dport {PORT} drop\n  }}\n}}\n"
    );
    let rules = dir.join("block.nft");
    std::fs::write(&rules, &block).unwrap();
    b1.ns().run("nft", &["-f", rules.to_str().unwrap()]);
    // As much as the server's socket takes without acknowledgements: some of it sent and
    // unacknowledged, the rest not sent yet (the window is shut).
    let pattern: Vec<u8> = (0..4_000_000u32).map(|i| (i % 253) as u8).collect();
    server.set_nonblocking(true).unwrap();
    let mut queued = 0;
    loop {
        match server.write(&pattern[queued..]) {
            Ok(n) => queued += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(200));
                match server.write(&pattern[queued..]) {
                    Ok(n) => queued += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("write: {e}"),
                }
            }
            Err(e) => panic!("write: {e}"),
        }
    }
    server.set_nonblocking(false).unwrap();
    let bulk = pattern[..queued].to_vec();

    let frozen_at = Instant::now();
    let (frozen, parked) = freeze(server).expect("freeze on vm-a1");
    assert!(
        !frozen.send_queue.is_empty(),
        "the server's send queue held unacknowledged data at the freeze"
    );
    assert_eq!(frozen.recv_queue, b"unread");
    let shipped = frozen.encode();
    let frozen_unsent = frozen.unsent;
    let frozen_mss = frozen.mss;
    // The client's acknowledgements flow again: those sent before the address reaches vm-c1
    // are lost, as in any move.
    b1.ns().run("nft", &["delete", "table", "inet", "mltest"]);
    eprintln!(
        "live migration: frozen with {} bytes to send ({} not sent yet), {} unread, {} bytes shipped",
        frozen.send_queue.len(),
        frozen.unsent,
        frozen.recv_queue.len(),
        shipped.len()
    );

    // Restored on vm-c1 before the move, held (silent, no reset for what reaches it), and
    // made live once the address is there.
    let held = c1
        .ns()
        .within(move || {
            restore_held(&Frozen::decode(&shipped).expect("decode")).expect("restore on vm-c1")
        })
        .expect("vm-c1's namespace");
    let mut held = held;
    ctl.run(&["workload", "move", WORKLOAD, "--to", "vm-c1"]);
    // Once vm-a1 no longer answers for the address, what its parked socket took in after the
    // freeze (it still receives, and acknowledges) goes to the held copy; then it goes live.
    wait_until(
        STEP,
        "the workload address gone from vm-a1 and up on vm-c1",
        || (!a1.has_address(WORKLOAD_IP) && c1.has_address(WORKLOAD_IP)).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let last = parked.state().expect("the parked socket's last state");
    let late = held.catch_up(&last).expect("catch up on vm-c1");
    eprintln!(
        "live migration: after the freeze the parked socket took in {late} bytes and counted {} \
         more as sent (an acknowledgement let it)",
        frozen_unsent - last.unsent
    );
    let mut server: TcpStream = held.go().expect("live on vm-c1");
    // The restored connection sends segments as large as the old one did.
    let info = c1.ns().run(
        "ss",
        &[
            "-tniH",
            "state",
            "established",
            "src",
            &format!("{WORKLOAD_IP}:{PORT}"),
        ],
    );
    let mss: u32 = info
        .split_whitespace()
        .find_map(|f| f.strip_prefix("mss:"))
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("no mss in ss's answer: {info}"));
    assert!(
        mss + 12 >= frozen_mss,
        "the restored connection's MSS is {mss}, the old one's {frozen_mss}"
    );
    parked.discard();
    let restored_after = frozen_at.elapsed();
    server.set_read_timeout(Some(STEP)).unwrap();

    // The client reads everything the server sent, in order, on its one connection.
    let got = read_exact(&mut client, bulk.len());
    assert!(got == bulk, "the bulk data arrived changed");
    client.write_all(b"after").unwrap();
    assert_eq!(read_exact(&mut server, 11), b"unreadafter");
    server.write_all(b"still here").unwrap();
    assert_eq!(read_exact(&mut client, 10), b"still here");
    let gap = frozen_at.elapsed();
    assert_eq!(client.local_addr().unwrap().port(), client_port);
    assert_eq!(server.peer_addr().unwrap(), client.local_addr().unwrap());
    eprintln!(
        "live migration: restored {restored_after:.2?} after the freeze; the client's round trip \
         through the restored server done {gap:.2?} after it"
    );
    drop(bed);
}

/// The chat server's connections to its clients, by the clients' ports: `ss` in the
/// client's namespace, established connections to the chat address.
fn chat_ports(agent: &MeshAgent) -> Vec<u16> {
    let out = agent.ns().run(
        "ss",
        &[
            "-tnH",
            "state",
            "established",
            "dst",
            &format!("{WORKLOAD_IP}:{CHAT_PORT}"),
        ],
    );
    let mut ports: Vec<u16> = out
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .filter_map(|local| local.rsplit_once(':'))
        .filter_map(|(_, port)| port.parse().ok())
        .collect();
    ports.sort_unstable();
    ports
}

const CHAT_PORT: u16 = 7070;
const HANDOVER_PORT: u16 = 7071;

fn expect_line(p: &Process, needle: &str) -> String {
    p.wait_for_line(needle, STEP).unwrap_or_else(|| {
        panic!(
            "{} did not print {needle:?} within {STEP:?}; log:\n{}",
            p.name(),
            p.log_tail(40)
        )
    })
}

/// `meshctl workload migrate chat --to vm-c1`: the chat server on vm-a1 hands its room and
/// both clients' connections over to the chat server waiting on vm-c1, and the clients carry
/// on with the same connections (same ports, no reconnect), their messages now through vm-c1;
/// then back again. A migration whose destination runs no server is refused and moves nothing.
#[test]
fn the_chat_server_moves_with_its_clients() {
    if !require_root() {
        return;
    }
    agent_bin();
    coordinator_bin();
    meshctl_bin();
    chat_bin();
    let vms = [
        (Provider::A, "vm-a1", "aws"),
        (Provider::B, "vm-b1", "gcp"),
        (Provider::C, "vm-c1", "azure"),
        (Provider::B, "vm-b2", "gcp"),
    ];
    let bed = bed("live-chat", "chat", &vms);
    let (dir, ctl) = (&bed.dir, bed.coord.meshctl());
    let (a1, b1, c1, b2) = (
        &bed.agents[0],
        &bed.agents[1],
        &bed.agents[2],
        &bed.agents[3],
    );

    // The same server on both candidates: serving on vm-a1, waiting on vm-c1.
    let server = |a: &MeshAgent| {
        let mut cmd = a.ns().daemon_command(chat_bin());
        cmd.args([
            "server",
            "--listen",
            &format!("{WORKLOAD_IP}:{CHAT_PORT}"),
            "--name",
        ])
        .arg(a.name())
        .args(["--migrate", "chat", "--agent-socket"])
        .arg(a.uapi_socket())
        .args(["--handover-port", &HANDOVER_PORT.to_string()]);
        let p = Process::spawn_interactive(
            &format!("chat server on {}", a.name()),
            cmd,
            &dir.join(&format!("server-{}.log", a.name())),
        );
        expect_line(&p, "listening on");
        p
    };
    let on_a1 = server(a1);
    let on_c1 = server(c1);
    let client = |a: &MeshAgent, nick: &str| {
        let mut cmd = a.ns().daemon_command(chat_bin());
        cmd.args([
            "client",
            "--server",
            &format!("{WORKLOAD_IP}:{CHAT_PORT}"),
            "--nick",
            nick,
        ]);
        Process::spawn_interactive(
            &format!("chat client {nick}"),
            cmd,
            &dir.join(&format!("client-{nick}.log")),
        )
    };
    let mut alice = client(b1, "alice");
    let mut bob = client(b2, "bob");
    expect_line(&alice, "welcome to the room on vm-a1");
    expect_line(&bob, "welcome to the room on vm-a1");
    expect_line(&on_a1, "bob joined");
    alice.write_line("before the move");
    expect_line(&bob, "alice: before the move");
    let ports = (chat_ports(b1), chat_ports(b2));
    assert_eq!(
        (ports.0.len(), ports.1.len()),
        (1, 1),
        "one connection each: {ports:?}"
    );

    // A destination with no server registered: refused, nothing moves, nobody notices.
    let refused = ctl.exec(&["workload", "migrate", "chat", "--to", "vm-b2"]);
    assert!(
        !refused.status.success(),
        "a migration to vm-b2 (no server) went through"
    );
    let says = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(says.contains("did not happen"), "{says}");
    bob.write_line("after a refused move");
    expect_line(&alice, "bob: after a refused move");

    for (from, to, server_to) in [("vm-a1", "vm-c1", &on_c1), ("vm-c1", "vm-a1", &on_a1)] {
        let out = ctl.run(&["workload", "migrate", "chat", "--to", to]);
        assert!(out.contains(&format!("migrated to {to}")), "{out}");
        assert!(out.contains("handed over in"), "{out}");
        alice.write_line(&format!("after the move to {to}"));
        expect_line(&bob, &format!("alice: after the move to {to}"));
        bob.write_line(&format!("bob on {to} too"));
        expect_line(&alice, &format!("bob: bob on {to} too"));
        // Served there now, the same connections carrying the lines.
        expect_line(server_to, "resumed 2 connections from");
        expect_line(server_to, "first line after resume");
        assert_eq!(
            (chat_ports(b1), chat_ports(b2)),
            ports,
            "the clients' connections changed ({from} -> {to})"
        );
    }
    for (p, nick) in [(&alice, "alice"), (&bob, "bob")] {
        let log = p.log();
        assert_eq!(
            log.matches("* connected to").count(),
            1,
            "{nick} reconnected:\n{log}"
        );
        assert!(
            !log.contains("* disconnected"),
            "{nick} was disconnected:\n{log}"
        );
    }
    drop((alice, bob, on_a1, on_c1));
    drop(bed);
}
