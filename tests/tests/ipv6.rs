//! The IPv6 overlay end to end: a network created with a ULA /48 (`meshctl network create
//! --cidr6`), three VMs on two simulated providers, a workload address.
//!
//! `nodes_and_workloads_answer_on_ipv6_too`: every node has the /48 with its IPv4 address in
//! the low 32 bits on its interface, and every pair answers IPv6 pings both ways (also with
//! 1,300-byte payloads); the workload `web` answers on its IPv6 address at vm-a1, then at
//! vm-b2 after `meshctl workload move`, and its AAAA record follows (the agent's DNS); a
//! policy that lets only vm-b1 ping vm-a1 holds for IPv6 as for IPv4.
//!
//! Needs root (skips with one line otherwise; fails under CI), `ping` (iputils-ping), `dig`
//! (dnsutils) and the binaries: `cargo build -p meshlink-agent -p meshlink-coordinator -p
//! meshctl` first.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use meshlink_tests::xfer::transfer_checked;
use meshlink_tests::{
    agent_bin, coordinator_bin, meshctl_bin, require_root, require_tool, wait_until, Coordinator,
    MeshAgent, NsRef, Provider, Providers, ScratchDir,
};

const NETWORK: &str = "prod";
const NETWORK_CIDR: &str = "100.64.0.0/16";
const NETWORK_CIDR6: &str = "fd7a:115c:a1e0::/48";
const WORKLOAD_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 50, 10);
/// Bound on an address or a map change reaching an agent, and on a first answer.
const STEP: Duration = Duration::from_secs(15);
/// The TCP transfer each way, and its bound (a debug build on 2 shared cores is slow).
const TRANSFER_BYTES: u64 = 8 << 20;
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(60);

/// The IPv6 address that goes with `v4` in the test network.
fn v6(v4: Ipv4Addr) -> Ipv6Addr {
    let prefix: Ipv6Addr = "fd7a:115c:a1e0::".parse().unwrap();
    Ipv6Addr::from(u128::from(prefix) | u128::from(u32::from(v4)))
}

/// One IPv6 ping of `size` payload bytes from `ns` to `to`; whether it was answered.
fn ping6(ns: &NsRef, to: Ipv6Addr, size: u32) -> bool {
    let to = to.to_string();
    let size = size.to_string();
    ns.exec(
        "ping",
        &["-6", "-c", "1", "-W", "1", "-s", size.as_str(), to.as_str()],
    )
    .status
    .success()
}

fn wait_ping6(ns: &NsRef, to: Ipv6Addr, what: &str) {
    wait_until(STEP, what, || ping6(ns, to, 56).then_some(())).unwrap_or_else(|e| panic!("{e}"));
}

/// The AAAA records `dig @server name AAAA` gets in `ns`.
fn aaaa(ns: &NsRef, server: Ipv4Addr, name: &str) -> Vec<String> {
    let at = format!("@{server}");
    let out = ns.exec(
        "dig",
        &[at.as_str(), name, "AAAA", "+short", "+time=2", "+tries=2"],
    );
    assert!(out.status.success(), "dig failed: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn nodes_and_workloads_answer_on_ipv6_too() {
    if !require_root() {
        return;
    }
    require_tool("dig", "dnsutils");
    require_tool("ping", "iputils-ping");
    agent_bin();
    coordinator_bin();
    meshctl_bin();

    let dir = ScratchDir::create("ipv6");
    let mut providers = Providers::create(2);
    let coord_host = providers.add_host(Provider::A);
    let hosts = [
        (providers.add_host(Provider::A), "vm-a1"),
        (providers.add_host(Provider::B), "vm-b1"),
        (providers.add_host(Provider::B), "vm-b2"),
    ];
    let coord = Coordinator::start(&coord_host.ns, &dir, coord_host.underlay);
    let ctl = coord.meshctl();
    ctl.run(&[
        "network",
        "create",
        NETWORK,
        "--cidr",
        NETWORK_CIDR,
        "--cidr6",
        NETWORK_CIDR6,
    ]);
    let token = ctl.token_create(NETWORK, Some(3), Some("1h"));
    let mut agents: Vec<MeshAgent> = hosts
        .iter()
        .map(|(h, name)| MeshAgent::spawn_join(&h.ns, &dir, &token, name, &[]))
        .collect();
    for a in &mut agents {
        a.wait_ready(meshlink_tests::mesh::READY_TIMEOUT);
    }
    let ips: Vec<Ipv4Addr> = agents.iter().map(MeshAgent::address).collect();
    let ns: Vec<&NsRef> = hosts.iter().map(|(h, _)| &*h.ns).collect();

    // Every node's IPv6 address is up on its interface, and the coordinator shows it.
    for (i, a) in agents.iter().enumerate() {
        let want = v6(ips[i]).to_string();
        let shown = ctl.json(&["node", "show", a.name()]);
        assert_eq!(shown["address6"].as_str(), Some(want.as_str()), "{shown:#}");
        let out = ns[i].exec("ip", &["-6", "addr", "show", "dev", a.interface()]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&format!("{want}/48")) && !text.contains("tentative"),
            "{}: {text}",
            a.name()
        );
    }
    // Every pair, both ways, small and near the MTU.
    for (i, from) in ns.iter().enumerate() {
        for (j, to) in ips.iter().enumerate().filter(|(j, _)| *j != i) {
            wait_ping6(
                from,
                v6(*to),
                &format!("node {i} to ping node {j} over IPv6"),
            );
            assert!(ping6(from, v6(*to), 1300), "1,300-byte ping6 {i} -> {j}");
        }
    }

    // TCP over IPv6 through the tunnel (the TUN device's offload included), both ways: the
    // receiver gets exactly the bytes sent.
    for (a, b) in [(1, 0), (0, 2)] {
        let t = transfer_checked(
            ns[a],
            ns[b],
            IpAddr::V6(v6(ips[b])),
            &dir,
            TRANSFER_BYTES,
            TRANSFER_TIMEOUT,
        );
        eprintln!(
            "ipv6: TCP {a} -> {b}: {} bytes, {:.0} Mbit/s (debug build)",
            t.bytes,
            t.mbit_per_sec()
        );
    }

    // A workload: its IPv6 address answers where it is held, and moves with it.
    ctl.run(&[
        "workload",
        "create",
        "web",
        "--network",
        NETWORK,
        "--address",
        &WORKLOAD_IP.to_string(),
        "--allow",
        "vm-a1,vm-b2",
    ]);
    ctl.run(&["workload", "attach", "web", "--node", "vm-a1"]);
    let web6 = v6(WORKLOAD_IP);
    wait_ping6(ns[1], web6, "vm-b1 to ping web's IPv6 address on vm-a1");
    let want = vec![web6.to_string()];
    wait_until(STEP, "web's AAAA record at vm-b1", || {
        (aaaa(ns[1], ips[1], "web.prod.mesh") == want).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        aaaa(ns[1], ips[1], "vm-a1.prod.mesh"),
        vec![v6(ips[0]).to_string()]
    );
    ctl.run(&["workload", "move", "web", "--to", "vm-b2"]);
    wait_until(STEP, "web's IPv6 address to be on vm-b2", || {
        let out = ns[2].exec("ip", &["-6", "addr", "show", "dev", agents[2].interface()]);
        String::from_utf8_lossy(&out.stdout)
            .contains(&web6.to_string())
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    wait_ping6(ns[1], web6, "vm-b1 to ping web's IPv6 address on vm-b2");
    // The old holder lets it go too (after the short linger of a released address).
    wait_until(STEP, "vm-a1 to release web's IPv6 address", || {
        let out = ns[0].exec("ip", &["-6", "addr", "show", "dev", agents[0].interface()]);
        (!String::from_utf8_lossy(&out.stdout).contains(&web6.to_string())).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}"));

    // A policy: only vm-b1 may ping vm-a1, over either family.
    let policy = dir.join("policy.toml");
    std::fs::write(
        &policy,
        "[[rule]]\nfrom = [\"node:vm-b1\"]\nto = [\"node:vm-a1\"]\nports = [\"icmp\"]\n",
    )
    .unwrap();
    ctl.run(&[
        "policy",
        "set",
        NETWORK,
        policy.to_str().expect("UTF-8 path"),
    ]);
    wait_until(STEP, "vm-b2's IPv6 pings to vm-a1 to be denied", || {
        (!ping6(ns[2], v6(ips[0]), 56)).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    wait_ping6(
        ns[1],
        v6(ips[0]),
        "vm-b1 to ping vm-a1 over IPv6 under the policy",
    );
    assert!(
        ns[1].ping_once(ips[0], Duration::from_secs(2)),
        "vm-b1 pings vm-a1 over IPv4 under the policy"
    );
    assert!(
        !ns[2].ping_once(ips[0], Duration::from_secs(1)),
        "vm-b2's IPv4 ping to vm-a1 is denied too"
    );
}
