//! DNS names with real binaries: every mesh agent answers `NODE.prod.mesh` and
//! `WORKLOAD.prod.mesh` on its own overlay address, port 53, and `dig` asks them.
//!
//! Topology (`meshlink_tests::Providers`, two providers): the coordinator and vm-a1 on A, vm-b1
//! and vm-c1 on B. The workload `web` (100.64.50.10) may be held by vm-a1 and vm-c1.
//!
//! - vm-b1 asks its own agent (UDP, then TCP) for the three nodes and the workload, each answer
//!   the address the coordinator gave; the case of a name does not matter; an unknown name
//!   under the suffix is NXDOMAIN, a name outside it REFUSED (not an open resolver).
//! - vm-b1 asks vm-a1's agent through the tunnel, over UDP and TCP: no answer at all (an
//!   agent answers its own host only: its map, under a policy, may name peers vm-b1's leaves
//!   out); vm-a1's own host asking it gets the same answers as vm-b1's own.
//! - The workload moves from vm-a1 to vm-c1 (`meshctl workload move`): its name still answers
//!   its address (a workload keeps its address across moves), with a TTL of 5 s, and its
//!   `holder` TXT record follows the move, on every agent.
//!
//! Needs root (skips with one line otherwise; fails under CI=true), `dig` (dnsutils) and the
//! binaries: `cargo build -p meshlink-agent -p meshlink-coordinator -p meshctl` first.

use std::net::Ipv4Addr;
use std::time::Duration;

use meshlink_tests::{
    agent_bin, coordinator_bin, meshctl_bin, require_root, require_tool, wait_until, Coordinator,
    MeshAgent, NsRef, Provider, Providers, ScratchDir,
};

const NETWORK: &str = "prod";
const NETWORK_CIDR: &str = "100.64.0.0/16";
const WORKLOAD_IP: &str = "100.64.50.10";
/// Bound on an address or a map change reaching an agent.
const STEP: Duration = Duration::from_secs(15);

/// What `dig` got.
#[derive(Debug)]
struct Answer {
    status: String,
    /// `(name, ttl, type, data)` of the answer section.
    records: Vec<(String, u32, String, String)>,
}

impl Answer {
    fn data(&self, kind: &str) -> Vec<String> {
        self.records
            .iter()
            .filter(|r| r.2 == kind)
            .map(|r| r.3.clone())
            .collect()
    }
}

/// Whether `dig @server name` in `ns` got no answer at all (UDP, or TCP when `tcp`: a TCP
/// connection closed before any answer counts as none).
fn no_answer(ns: &NsRef, server: Ipv4Addr, name: &str, tcp: bool) -> bool {
    let at = format!("@{server}");
    let mut args = vec![at.as_str(), name, "A", "+time=1", "+tries=1"];
    if tcp {
        args.push("+tcp");
    }
    let out = ns.exec("dig", &args);
    let text = String::from_utf8_lossy(&out.stdout);
    !out.status.success() && !text.contains("status: ")
}

/// `dig @server name kind` in `ns` (`+tcp` when `tcp`), parsed.
fn dig(ns: &NsRef, server: Ipv4Addr, name: &str, kind: &str, tcp: bool) -> Answer {
    let at = format!("@{server}");
    let mut args = vec![
        at.as_str(),
        name,
        kind,
        "+noall",
        "+comments",
        "+answer",
        "+time=2",
        "+tries=2",
    ];
    if tcp {
        args.push("+tcp");
    }
    let out = ns.exec("dig", &args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "dig {args:?} failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = text
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or_else(|| panic!("no status in dig's answer: {text}"))
        .to_owned();
    let records = text
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() >= 5, "unexpected answer line {l:?}");
            (
                f[0].to_owned(),
                f[1].parse().expect("a TTL"),
                f[3].to_owned(),
                f[4..].join(" "),
            )
        })
        .collect();
    Answer { status, records }
}

#[test]
fn names_answer_nodes_and_workloads_and_follow_a_move() {
    if !require_root() {
        return;
    }
    require_tool("dig", "dnsutils");
    agent_bin();
    coordinator_bin();
    meshctl_bin();
    let dir = ScratchDir::create("dns");
    let mut providers = Providers::create(2);
    let coord_host = providers.add_host(Provider::A);
    let host_a1 = providers.add_host(Provider::A);
    let host_b1 = providers.add_host(Provider::B);
    let host_c1 = providers.add_host(Provider::B);
    let coord = Coordinator::start(&coord_host.ns, &dir, coord_host.underlay);
    let ctl = coord.meshctl();
    ctl.network_create(NETWORK, NETWORK_CIDR);
    let token = ctl.token_create(NETWORK, Some(3), Some("1h"));
    let mut agents: Vec<MeshAgent> = [
        (&host_a1, "vm-a1"),
        (&host_b1, "vm-b1"),
        (&host_c1, "vm-c1"),
    ]
    .iter()
    .map(|(h, name)| MeshAgent::spawn_join(&h.ns, &dir, &token, name, &[]))
    .collect();
    for a in &mut agents {
        a.wait_ready(meshlink_tests::mesh::READY_TIMEOUT);
    }
    let ips: Vec<Ipv4Addr> = agents.iter().map(MeshAgent::address).collect();
    let (ip_a1, ip_b1) = (ips[0], ips[1]);
    ctl.run(&[
        "workload",
        "create",
        "web",
        "--network",
        NETWORK,
        "--address",
        WORKLOAD_IP,
        "--allow",
        "vm-a1,vm-c1",
    ]);
    ctl.run(&["workload", "attach", "web", "--node", "vm-a1"]);

    let b1 = &host_b1.ns;
    // The map reaches vm-b1 and its server answers (its interface and address are up).
    wait_until(STEP, "vm-b1 to answer web.prod.mesh", || {
        let a = dig(b1, ip_b1, "web.prod.mesh", "TXT", false);
        (a.data("TXT") == [r#""holder=vm-a1""#]).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\nvm-b1 log:\n{}", agents[1].log()));

    // `status` says where each agent answers; none registered with systemd-resolved, since
    // an agent in a namespace of its own leaves the host's resolver alone.
    for (agent, ip) in agents.iter().zip(&ips) {
        let st = agent.status();
        let dns = &st["served"]["dns"];
        assert_eq!(dns["listen"], format!("{ip}:53"), "{st}");
        assert_eq!(dns["suffix"], "mesh", "{st}");
        assert_eq!(dns["registered"], false, "{st}");
    }

    for tcp in [false, true] {
        for (agent, ip) in agents.iter().zip(&ips) {
            let name = format!("{}.prod.mesh", agent.name());
            let a = dig(b1, ip_b1, &name, "A", tcp);
            assert_eq!(a.status, "NOERROR", "{name} (tcp {tcp}): {a:?}");
            assert_eq!(a.data("A"), [ip.to_string()], "{name} (tcp {tcp})");
            assert_eq!(a.records[0].1, 30, "a node's TTL: {a:?}");
        }
        let a = dig(b1, ip_b1, "web.prod.mesh", "A", tcp);
        assert_eq!(a.data("A"), [WORKLOAD_IP], "tcp {tcp}: {a:?}");
        assert_eq!(a.records[0].1, 5, "a workload's TTL: {a:?}");
    }
    let a = dig(b1, ip_b1, "VM-A1.Prod.Mesh", "A", false);
    assert_eq!(
        a.data("A"),
        [ip_a1.to_string()],
        "names compare without case"
    );
    let a = dig(b1, ip_b1, "nobody.prod.mesh", "A", false);
    assert_eq!(a.status, "NXDOMAIN", "{a:?}");
    let a = dig(b1, ip_b1, "vm-a1.elsewhere.mesh", "A", false);
    assert_eq!(a.status, "NXDOMAIN", "{a:?}");
    for outside in ["example.com", "localhost", "vm-a1.prod.meshy"] {
        let a = dig(b1, ip_b1, outside, "A", false);
        assert_eq!(a.status, "REFUSED", "{outside}: {a:?}");
        assert!(a.records.is_empty(), "{outside}: {a:?}");
    }
    // vm-a1's agent answers its own host, and nobody else, not even through the tunnel.
    let a1 = &host_a1.ns;
    let a = dig(a1, ip_a1, "vm-c1.prod.mesh", "A", false);
    assert_eq!(a.data("A"), [ips[2].to_string()], "{a:?}");
    let a = dig(a1, ip_a1, "web.prod.mesh", "A", true);
    assert_eq!(a.data("A"), [WORKLOAD_IP], "{a:?}");
    assert!(
        b1.wait_for_ping(ip_a1, STEP).is_ok(),
        "vm-a1 does not answer pings from vm-b1"
    );
    for tcp in [false, true] {
        assert!(
            no_answer(b1, ip_a1, "vm-c1.prod.mesh", tcp),
            "vm-a1's agent answered vm-b1 (tcp {tcp})"
        );
    }

    // The workload moves: its name keeps answering its address, and the holder follows.
    ctl.run(&["workload", "move", "web", "--to", "vm-c1"]);
    for (ns, server, via) in [(b1, ip_b1, "vm-b1"), (a1, ip_a1, "vm-a1")] {
        wait_until(
            STEP,
            &format!("{via} to name vm-c1 as web's holder"),
            || {
                let a = dig(ns, server, "web.prod.mesh", "TXT", false);
                (a.data("TXT") == [r#""holder=vm-c1""#]).then_some(())
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let a = dig(ns, server, "web.prod.mesh", "A", false);
        assert_eq!(a.status, "NOERROR", "{a:?}");
        assert_eq!(
            a.data("A"),
            [WORKLOAD_IP],
            "after the move, via {via}: {a:?}"
        );
        assert_eq!(a.records[0].1, 5, "{a:?}");
    }
    // vm-c1 itself answers for its own workload.
    let a = dig(&host_c1.ns, ips[2], "web.prod.mesh", "TXT", false);
    assert_eq!(a.data("TXT"), [r#""holder=vm-c1""#], "{a:?}");
    // And the address answers pings where it now is (the name leads somewhere real).
    assert!(
        b1.wait_for_ping(WORKLOAD_IP.parse().unwrap(), STEP).is_ok(),
        "{WORKLOAD_IP} does not answer after the move"
    );
    drop(agents);
}
