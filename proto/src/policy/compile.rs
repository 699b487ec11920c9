//! The per-node table the data plane consults for a new flow.
//!
//! Pipeline: the agent compiles its [`NodeTable`] once per map or policy change
//! ([`NodeTable::compile`]); for the first packet of every new inbound flow it asks
//! [`NodeTable::lookup`] with the packet's addresses, protocol and destination port, and lets
//! the flow in (and counts it against the rule) iff a rule index comes back.
//!
//! The table holds only the rules that can allow a flow *to* this node: to one of its routed
//! prefixes, or to the address of *any* workload of the network, wherever it is held now. A
//! workload may move here at any moment and the table must not need recompiling for that;
//! whether a workload's address is local is the data plane's own check.
//!
//! Entries are keyed by source address, so a lookup looks only at the entries for that source:
//! - host sources (a /32 or /128: a node's address, a workload's address) in a hash map;
//! - wider sources (a prefix routed to a node) in a short list;
//! - `*` sources in a list of their own: `Any` matches any source address, since the packet
//!   has already passed WireGuard's cryptokey routing.
//!
//! Each list is sorted by rule index, so the first match in a list is its smallest; the
//! answer is the smallest over the three, the same rule [`Policy::check`] names.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::IpAddr;
use std::ops::Range;

use ipnet::IpNet;

use super::eval::Index;
use super::{Policy, Ports, Selector};
use crate::{Netmap, NodeId};

/// The rules of a policy that can allow a flow *to* node `me`, keyed by source address.
///
/// The default table is empty: it allows nothing.
#[derive(Debug, Clone, Default)]
pub struct NodeTable {
    /// The entries of every host source, grouped by source, each group sorted by rule.
    entries: Vec<Entry>,
    /// IPv4 host sources -> their group in `entries`.
    hosts_v4: HashMap<u32, Range<u32>, BuildHasherDefault<AddrHasher>>,
    /// IPv6 host sources -> their group in `entries`.
    hosts_v6: HashMap<u128, Range<u32>, BuildHasherDefault<AddrHasher>>,
    /// Sources wider than one address, sorted by rule.
    wide: Vec<(Net, Entry)>,
    /// `*` sources, sorted by rule.
    any: Vec<Entry>,
}

/// One rule's leave for flows to `dst` on `ports`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Entry {
    dst: Net,
    ports: Ports,
    rule: u32,
}

impl Entry {
    #[inline]
    fn allows(&self, dst: Addr, proto: u8, port: u16) -> bool {
        self.ports.matches(proto, port) && self.dst.contains(dst)
    }
}

/// An address as bits, IPv4 in the low 32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Addr {
    v6: bool,
    bits: u128,
}

impl Addr {
    #[inline]
    fn of(ip: IpAddr) -> Addr {
        match ip {
            IpAddr::V4(a) => Addr {
                v6: false,
                bits: u128::from(u32::from(a)),
            },
            IpAddr::V6(a) => Addr {
                v6: true,
                bits: u128::from(a),
            },
        }
    }
}

/// A prefix as bits and mask, IPv4 in the low 32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Net {
    v6: bool,
    bits: u128,
    mask: u128,
}

impl Net {
    fn of(net: IpNet) -> Net {
        let net = net.trunc();
        match net {
            IpNet::V4(n) => Net {
                v6: false,
                bits: u128::from(u32::from(n.network())),
                mask: u128::from(u32::from(n.netmask())),
            },
            IpNet::V6(n) => Net {
                v6: true,
                bits: u128::from(n.network()),
                mask: u128::from(n.netmask()),
            },
        }
    }

    #[inline]
    fn contains(&self, a: Addr) -> bool {
        self.v6 == a.v6 && a.bits & self.mask == self.bits
    }
}

/// A hasher for addresses (one multiply): the keys are the map's addresses, chosen by the
/// coordinator, not by whoever sends packets, so a fast hash with no key cannot be driven
/// into collisions from outside; a lookup of any address costs one probe sequence among
/// them.
#[derive(Debug, Clone, Copy, Default)]
struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        // Fold the high half down so that the bits hashbrown takes (top 7 and low ones)
        // depend on every input bit.
        let x = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = x ^ (x >> 29);
    }

    fn write_u128(&mut self, n: u128) {
        self.write_u64(n as u64);
        self.write_u64((n >> 64) as u64);
    }
}

impl NodeTable {
    /// Compiles `policy` for node `me` of `map`: for every rule that allows something to
    /// `me`'s routed prefixes or to any workload's address, an entry per source, destination
    /// prefix and ports. A rule with no ports, or whose destinations are nobody here, leaves
    /// nothing; an entry that an earlier rule's entry for the same source, destination and
    /// ports already covers is left out.
    pub fn compile(policy: &Policy, map: &Netmap, me: NodeId) -> NodeTable {
        let index = Index::new(map);
        let me = map.peers.get(&me);
        let my_routed = me.map(|p| p.routed()).unwrap_or_default();

        let mut hosts: HashMap<Addr, Vec<Entry>> = HashMap::new();
        let mut wide: Vec<(Net, Entry)> = Vec::new();
        let mut any: Vec<Entry> = Vec::new();
        let mut dsts: Vec<Net> = Vec::new();
        let mut srcs: Vec<IpNet> = Vec::new();
        for (i, rule) in policy.rules.iter().enumerate() {
            let Ok(rule_index) = u32::try_from(i) else {
                break;
            };
            if rule.ports.is_empty() {
                continue;
            }
            dsts.clear();
            for s in &rule.to {
                if me.is_some_and(|p| super::eval::selects_node(s, p)) {
                    dsts.extend(my_routed.iter().map(|&n| Net::of(n)));
                }
                dsts.extend(index.workloads(s).iter().map(|w| Net::of(w.address)));
            }
            dsts.sort_unstable_by_key(|n| (n.v6, n.bits, n.mask));
            dsts.dedup();
            if dsts.is_empty() {
                continue;
            }
            let entries = || {
                dsts.iter().flat_map(|&dst| {
                    rule.ports.iter().map(move |&ports| Entry {
                        dst,
                        ports,
                        rule: rule_index,
                    })
                })
            };
            if rule.from.contains(&Selector::Any) {
                any.extend(entries());
                continue;
            }
            srcs.clear();
            for s in &rule.from {
                srcs.extend(index.nodes(s).iter().flat_map(|p| p.routed()));
                srcs.extend(index.workloads(s).iter().map(|w| w.address));
            }
            for &src in &srcs {
                let src = src.trunc();
                if src.prefix_len() == src.max_prefix_len() {
                    hosts
                        .entry(Addr::of(src.addr()))
                        .or_default()
                        .extend(entries());
                } else {
                    let src = Net::of(src);
                    wide.extend(entries().map(|e| (src, e)));
                }
            }
        }

        let mut table = NodeTable {
            any: covered_once(any, |e| *e),
            wide: covered_once(wide, |&(src, e)| (src, e.dst, e.ports)),
            ..NodeTable::default()
        };
        // Sources in address order, so that the table does not depend on hash order.
        let mut hosts: Vec<(Addr, Vec<Entry>)> = hosts.into_iter().collect();
        hosts.sort_unstable_by_key(|(a, _)| (a.v6, a.bits));
        for (src, entries) in hosts {
            let entries = covered_once(entries, |e| (e.dst, e.ports));
            let start = table.entries.len();
            table.entries.extend(entries);
            let (Ok(start), Ok(end)) = (u32::try_from(start), u32::try_from(table.entries.len()))
            else {
                break;
            };
            if src.v6 {
                table.hosts_v6.insert(src.bits, start..end);
            } else {
                table.hosts_v4.insert(src.bits as u32, start..end);
            }
        }
        table
    }

    /// The index of the first rule allowing a new flow from `src` to `dst` of IP protocol
    /// `proto` and destination port `port` (0 for ICMP), or `None`: denied.
    ///
    /// Looks at the entries for `src` only (its host entries, the wider sources and the `*`
    /// ones), stops in each list at its first match; allocates nothing.
    #[inline]
    pub fn lookup(&self, src: IpAddr, dst: IpAddr, proto: u8, port: u16) -> Option<usize> {
        let s = Addr::of(src);
        let d = Addr::of(dst);
        let mut best = u32::MAX;
        let host = match src {
            IpAddr::V4(a) => self.hosts_v4.get(&u32::from(a)),
            IpAddr::V6(a) => self.hosts_v6.get(&u128::from(a)),
        };
        if let Some(r) = host {
            let group = &self.entries[r.start as usize..r.end as usize];
            if let Some(e) = group.iter().find(|e| e.allows(d, proto, port)) {
                best = e.rule;
            }
        }
        for (net, e) in &self.wide {
            if e.rule >= best {
                break;
            }
            if net.contains(s) && e.allows(d, proto, port) {
                best = e.rule;
                break;
            }
        }
        for e in &self.any {
            if e.rule >= best {
                break;
            }
            if e.allows(d, proto, port) {
                best = e.rule;
                break;
            }
        }
        (best != u32::MAX).then_some(best as usize)
    }

    /// How many entries the table holds (a measure of what a lookup may look at).
    pub fn len(&self) -> usize {
        self.entries.len() + self.wide.len() + self.any.len()
    }

    /// Whether the table allows nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `items` in rule order (stable: within a rule, as given), keeping of the items with equal
/// `key` only the first: a later one can never be the smallest match.
fn covered_once<T: Copy + RuleOf, K: Eq + std::hash::Hash>(
    mut items: Vec<T>,
    key: impl Fn(&T) -> K,
) -> Vec<T> {
    items.sort_by_key(|t| t.rule_of());
    let mut seen = HashSet::new();
    items.retain(|t| seen.insert(key(t)));
    items
}

/// The rule an item of a table belongs to.
trait RuleOf {
    fn rule_of(&self) -> u32;
}

impl RuleOf for Entry {
    fn rule_of(&self) -> u32 {
        self.rule
    }
}

impl RuleOf for (Net, Entry) {
    fn rule_of(&self) -> u32 {
        self.1.rule
    }
}

#[cfg(test)]
mod tests {
    use super::super::eval::tests::{map_of, node, random_map, random_policy, workload, Lcg};
    use super::super::{ip_proto, parse, Entity, FlowPort, Rule};
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn lookup_finds_the_first_rule_for_source_destination_and_port() {
        // vm-a (web) 100.64.0.1, vm-b (db, me) 100.64.0.2 + routed 10.2.0.0/24,
        // vm-c 100.64.0.3 + routed 10.3.0.0/24, chat 100.96.0.1 held by vm-c.
        let mut b = node(2, "vm-b", &["db"]);
        b.allowed_ips = vec![
            "100.64.0.2/32".parse().unwrap(),
            "10.2.0.0/24".parse().unwrap(),
        ];
        let mut c = node(3, "vm-c", &[]);
        c.allowed_ips = vec![
            "100.64.0.3/32".parse().unwrap(),
            "10.3.0.0/24".parse().unwrap(),
        ];
        let map = map_of(
            vec![node(1, "vm-a", &["web"]), b, c],
            vec![workload("chat", 1, Some(3), &[])],
        );
        let policy = parse(
            r#"
[[rule]]
from = ["tag:web"]
to = ["tag:db"]
ports = ["tcp:5432"]

[[rule]]
from = ["node:vm-c"]
to = ["workload:chat", "node:vm-b"]
ports = ["udp:53"]

[[rule]]
from = ["*"]
to = ["*"]
ports = ["icmp"]

[[rule]]
from = ["tag:web"]
to = ["node:vm-a"]
ports = ["*"]

[[rule]]
from = ["tag:web"]
to = ["tag:db"]
ports = ["tcp:5000-6000"]
"#,
        )
        .unwrap()
        .into_policy(1);
        let t = NodeTable::compile(&policy, &map, 2);
        let tcp = ip_proto::TCP;
        let udp = ip_proto::UDP;
        assert_eq!(
            t.lookup(ip("100.64.0.1"), ip("100.64.0.2"), tcp, 5432),
            Some(0)
        );
        assert_eq!(
            t.lookup(ip("100.64.0.1"), ip("10.2.0.9"), tcp, 5432),
            Some(0)
        );
        assert_eq!(
            t.lookup(ip("100.64.0.1"), ip("100.64.0.2"), tcp, 5433),
            Some(4)
        );
        assert_eq!(
            t.lookup(ip("100.64.0.1"), ip("100.64.0.2"), udp, 5432),
            None
        );
        assert_eq!(
            t.lookup(ip("100.64.0.3"), ip("100.64.0.2"), tcp, 5432),
            None
        );
        // From vm-c's routed prefix, to me and to chat (wherever it is).
        assert_eq!(
            t.lookup(ip("10.3.0.77"), ip("100.64.0.2"), udp, 53),
            Some(1)
        );
        assert_eq!(
            t.lookup(ip("100.64.0.3"), ip("100.96.0.1"), udp, 53),
            Some(1)
        );
        assert_eq!(t.lookup(ip("10.3.0.77"), ip("100.96.0.1"), udp, 54), None);
        // Anyone may ping anything here, even from an address nobody owns.
        assert_eq!(
            t.lookup(ip("192.0.2.1"), ip("100.64.0.2"), ip_proto::ICMP, 0),
            Some(2)
        );
        assert_eq!(
            t.lookup(ip("100.64.0.1"), ip("100.96.0.1"), ip_proto::ICMPV6, 0),
            Some(2)
        );
        // Rule 3 is vm-a's business, not mine: nothing of it here.
        assert_eq!(t.lookup(ip("100.64.0.1"), ip("100.64.0.1"), tcp, 1), None);
        assert_eq!(t.lookup(ip("100.64.0.1"), ip("fd00::2"), tcp, 5432), None);
        assert_eq!(
            NodeTable::default().lookup(ip("1.2.3.4"), ip("1.2.3.5"), tcp, 1),
            None
        );
        assert!(NodeTable::default().is_empty());
        // vm-a's own table: rule 3 and the ICMP rule; chat is in every table.
        let a = NodeTable::compile(&policy, &map, 1);
        assert_eq!(
            a.lookup(ip("100.64.0.1"), ip("100.64.0.1"), tcp, 1),
            Some(3)
        );
        assert_eq!(
            a.lookup(ip("100.64.0.3"), ip("100.96.0.1"), udp, 53),
            Some(1)
        );
        assert_eq!(
            a.lookup(ip("100.64.0.1"), ip("100.64.0.2"), tcp, 5432),
            None
        );
    }

    #[test]
    fn redundant_entries_are_left_out() {
        let map = map_of(vec![node(1, "a", &["x", "y"]), node(2, "b", &[])], vec![]);
        let policy = parse(
            "[[rule]]\nfrom = [\"tag:x\", \"tag:y\", \"node:a\"]\nto = [\"*\"]\nports = [\"tcp:1\", \"tcp:1\"]\n\
             [[rule]]\nfrom = [\"node:a\"]\nto = [\"node:b\"]\nports = [\"tcp:1\"]\n",
        )
        .unwrap()
        .into_policy(1);
        let t = NodeTable::compile(&policy, &map, 2);
        assert_eq!(t.len(), 1, "{t:?}");
        assert_eq!(
            t.lookup(ip("100.64.0.1"), ip("100.64.0.2"), ip_proto::TCP, 1),
            Some(0)
        );
    }

    /// One address in `net`: its first host for a wider prefix.
    fn inside(net: IpNet) -> IpAddr {
        match net {
            IpNet::V4(n) if n.prefix_len() < 32 => IpAddr::V4((u32::from(n.network()) + 7).into()),
            IpNet::V6(n) if n.prefix_len() < 128 => {
                IpAddr::V6((u128::from(n.network()) + 7).into())
            }
            n => n.addr(),
        }
    }

    fn random_flow(g: &mut Lcg) -> FlowPort {
        let proto = [
            ip_proto::TCP,
            ip_proto::UDP,
            ip_proto::ICMP,
            ip_proto::ICMPV6,
            47,
        ][g.below(5)];
        let port = if matches!(proto, ip_proto::TCP | ip_proto::UDP) {
            g.below(50) as u16
        } else {
            0
        };
        FlowPort { proto, port }
    }

    #[test]
    fn lookup_agrees_with_check_on_random_maps_and_policies() {
        let mut g = Lcg(0xfeed_f00d);
        let mut allowed = 0;
        let mut denied = 0;
        for _ in 0..1_500 {
            let map = random_map(&mut g);
            let policy = random_policy(&mut g, &map);
            // Every source: the nodes' routed prefixes and the workloads' addresses.
            let mut sources: Vec<(Entity, IpAddr)> = Vec::new();
            for p in map.peers.values() {
                for net in p.routed() {
                    sources.push((Entity::Node(p.node_id), inside(net)));
                }
            }
            for w in map.workloads.values() {
                sources.push((Entity::Workload(w.name.clone()), w.ip()));
            }
            // Some table owners are not in the map at all.
            let owners: Vec<NodeId> = map.peers.keys().copied().chain([99]).collect();
            for me in owners {
                let table = NodeTable::compile(&policy, &map, me);
                let mut dests: Vec<(Entity, IpAddr)> = map
                    .peers
                    .get(&me)
                    .map(|p| p.routed())
                    .unwrap_or_default()
                    .into_iter()
                    .map(|net| (Entity::Node(me), inside(net)))
                    .collect();
                for w in map.workloads.values() {
                    dests.push((Entity::Workload(w.name.clone()), w.ip()));
                }
                for (to, dst) in &dests {
                    for _ in 0..4 {
                        let flow = random_flow(&mut g);
                        for (from, src) in &sources {
                            let want = policy.check(&map, from, to, flow).rule;
                            let got = table.lookup(*src, *dst, flow.proto, flow.port);
                            assert_eq!(
                                got, want,
                                "{from:?} {src} -> {to:?} {dst} {flow} at node {me}: \
                                 {map:?} under {policy:?}"
                            );
                            if want.is_some() {
                                allowed += 1;
                            } else {
                                denied += 1;
                            }
                        }
                        // A source nobody owns matches only `*` sources: the first rule
                        // with one whose destinations and ports match (`to` itself as the
                        // source of a one-rule policy, since `*` matches it).
                        let want = policy.rules.iter().position(|r| {
                            let alone = Policy {
                                version: 0,
                                rules: vec![Rule {
                                    from: vec![Selector::Any],
                                    ..r.clone()
                                }],
                            };
                            r.from.contains(&Selector::Any)
                                && alone.check(&map, to, to, flow).rule.is_some()
                        });
                        let got = table.lookup(ip("192.0.2.1"), *dst, flow.proto, flow.port);
                        assert_eq!(got, want, "unowned source -> {to:?} {flow} at node {me}");
                    }
                }
                // A destination that is neither mine nor a workload's is never allowed.
                let other = ip("10.200.0.1");
                for (_, src) in &sources {
                    assert_eq!(table.lookup(*src, other, ip_proto::TCP, 1), None);
                }
            }
        }
        assert!(
            allowed > 2_000 && denied > 2_000,
            "allowed {allowed}, denied {denied}"
        );
    }
}
