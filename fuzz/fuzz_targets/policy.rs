//! Policy files: `policy::parse` of arbitrary text, and for a file that parses, its policy
//! against a small fixed map, as the coordinator (tests, need to know) and every agent (the
//! per-node table) use it.
//!
//! Input: the file's text (bytes that are not UTF-8 are skipped). The map has three nodes
//! (`vm-a` tagged `web`, `vm-b` tagged `db` with a routed /24 and an IPv6 address, `vm-c`
//! untagged), a workload `chat` (tag `app`) held by `vm-b` with `vm-c` a candidate and `vm-a`
//! its previous holder, a detached workload `db`, and a node and a workload both named `both`.
//! The workloads' addresses take every form a map gives them: `chat` has an IPv4 address and
//! its IPv6 twin (`address6`), `db` an IPv6 address alone, `both` an IPv4 address alone. No
//! address lies within another entity's prefix, so an address names one node or workload and
//! the table, which goes by addresses, must agree with the check, which goes by names.
//!
//! Checked: an error names a line of the file (or the one after its end) and a field; a
//! parsed file keeps the limits and the shape it promises (non-empty `from`/`to`/`ports`, rules
//! and tests in file order); every test failure names a test's line; for every node of the
//! map, `NodeTable::lookup` agrees with `Policy::check` for flows from every address of every
//! node and workload (IPv6 twins included, and an address nobody owns, which only `*` sources
//! match) to every destination of the node's table (each of a workload's addresses);
//! `visible_peers` agrees with `may_talk`.

#![no_main]

use std::net::IpAddr;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use meshlink_proto::policy::{
    self, ip_proto, may_talk, visible_peers, Entity, FlowPort, NodeTable, Policy, Rule, Selector,
};
use meshlink_proto::{Netmap, PeerInfo, PublicKey, WorkloadInfo};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let lines = u32::try_from(text.lines().count()).unwrap_or(u32::MAX);
    let file = match policy::parse(text) {
        Ok(file) => file,
        Err(e) => {
            assert!(e.line >= 1 && e.line <= lines.saturating_add(1), "{e}");
            assert!(!e.field.is_empty() && !e.message.is_empty(), "{e}");
            return;
        }
    };
    assert!(file.rules.len() <= policy::MAX_RULES && file.tests.len() <= policy::MAX_TESTS);
    for r in &file.rules {
        for list in [r.from.len(), r.to.len(), r.ports.len()] {
            assert!((1..=policy::MAX_ENTRIES).contains(&list), "{r:?}");
        }
        assert!(r.line >= 1 && r.line <= lines, "{r:?}");
    }
    assert!(file.rules.windows(2).all(|w| w[0].line <= w[1].line));
    assert!(file.tests.windows(2).all(|w| w[0].line <= w[1].line));

    let map = map();
    let failures = file.run_tests(map);
    for f in &failures {
        assert!(file.tests.iter().any(|t| t.line == f.line), "{f:?}");
    }
    let policy = file.into_policy(1);
    for &me in map.peers.keys() {
        check_table(&policy, map, me);
        let seen = visible_peers(Some(&policy), map, me);
        for &other in map.peers.keys() {
            if other != me {
                assert_eq!(
                    seen.contains(&other),
                    may_talk(Some(&policy), map, me, other),
                    "visible_peers({me}) and may_talk({other}) disagree"
                );
            }
        }
        assert!(!seen.contains(&me));
    }
});

/// Flows to every destination of `me`'s table, from everyone, on a few ports.
fn check_table(policy: &Policy, map: &Netmap, me: u64) {
    let table = NodeTable::compile(policy, map, me);
    let mut dests: Vec<(Entity, IpAddr)> = map.peers[&me]
        .routed()
        .into_iter()
        .map(|n| (Entity::Node(me), n.addr()))
        .collect();
    for w in map.workloads.values() {
        dests.extend(
            w.addresses()
                .map(|a| (Entity::Workload(w.name.clone()), a.addr())),
        );
    }
    let mut sources: Vec<(Entity, IpAddr)> = Vec::new();
    for p in map.peers.values() {
        for n in p.routed() {
            sources.push((Entity::Node(p.node_id), n.addr()));
        }
    }
    for w in map.workloads.values() {
        for a in w.addresses() {
            sources.push((Entity::Workload(w.name.clone()), a.addr()));
        }
    }
    let nobody: IpAddr = "192.0.2.1".parse().unwrap();
    for (to, dst) in &dests {
        for flow in FLOWS {
            for (from, src) in &sources {
                assert_eq!(
                    table.lookup(*src, *dst, flow.proto, flow.port),
                    policy.check(map, from, to, flow).rule,
                    "{from:?} {src} -> {to:?} {dst} {flow} at node {me}"
                );
            }
            let any_source = policy.rules.iter().position(|r| {
                r.from.contains(&Selector::Any)
                    && Policy {
                        version: 0,
                        rules: vec![Rule {
                            from: vec![Selector::Any],
                            ..r.clone()
                        }],
                    }
                    .check(map, to, to, flow)
                    .rule
                    .is_some()
            });
            assert_eq!(
                table.lookup(nobody, *dst, flow.proto, flow.port),
                any_source,
                "nobody's {nobody} -> {to:?} {dst} {flow} at node {me}"
            );
        }
    }
    let elsewhere: IpAddr = "10.200.0.1".parse().unwrap();
    for (_, src) in &sources {
        assert_eq!(table.lookup(*src, elsewhere, ip_proto::TCP, 80), None);
    }
}

const FLOWS: [FlowPort; 6] = [
    FlowPort {
        proto: ip_proto::TCP,
        port: 80,
    },
    FlowPort {
        proto: ip_proto::TCP,
        port: 5432,
    },
    FlowPort {
        proto: ip_proto::UDP,
        port: 53,
    },
    FlowPort {
        proto: ip_proto::ICMP,
        port: 0,
    },
    FlowPort {
        proto: ip_proto::ICMPV6,
        port: 0,
    },
    FlowPort { proto: 47, port: 0 },
];

fn map() -> &'static Netmap {
    static MAP: OnceLock<Netmap> = OnceLock::new();
    MAP.get_or_init(|| {
        let node = |id: u64, name: &str, tags: &[&str], nets: &[&str]| PeerInfo {
            node_id: id,
            name: name.to_string(),
            public_key: PublicKey([id as u8; 32]),
            next_key: None,
            addresses: vec![format!("100.64.0.{id}/32").parse().unwrap()],
            allowed_ips: nets.iter().map(|n| n.parse().unwrap()).collect(),
            endpoints: Vec::new(),
            labels: Default::default(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            via: None,
        };
        let workload = |name: &str, addr: &str, holder: Option<u64>, tags: &[&str]| WorkloadInfo {
            id: 1,
            name: name.to_string(),
            address: addr.parse().unwrap(),
            address6: None,
            holder,
            generation: 1,
            previous: None,
            candidates: holder.into_iter().collect(),
            grace_ms: None,
            tags: tags.iter().map(|t| t.to_string()).collect(),
        };
        let mut chat = workload("chat", "100.96.0.1/32", Some(2), &["app"]);
        chat.candidates.push(3);
        chat.previous = Some(1);
        chat.address6 = Some("fd00:96::1/128".parse().unwrap());
        let peers = [
            node(1, "vm-a", &["web"], &[]),
            node(
                2,
                "vm-b",
                &["db"],
                &["100.64.0.2/32", "fd00::2/128", "10.2.0.0/24"],
            ),
            node(3, "vm-c", &[], &[]),
            node(4, "both", &["web", "db"], &[]),
        ];
        let workloads = [
            chat,
            workload("db", "fd01::1/128", None, &["db"]),
            workload("both", "100.96.0.3/32", Some(4), &[]),
        ];
        Netmap {
            version: 1,
            peers: peers.into_iter().map(|p| (p.node_id, p)).collect(),
            workloads: workloads.into_iter().map(|w| (w.name.clone(), w)).collect(),
            policy: None,
        }
    })
}
