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
//! A lookup takes two steps:
//! 1. The destination picks its *slot*: one of this node's routed prefixes or a workload's
//!    address (host addresses through a hash map, wider prefixes most specific first). No
//!    slot: denied at once. Each slot has a bit per rule, set when the rule allows something
//!    to the slot's prefix (or to a wider one holding it).
//! 2. The source picks its rules, each list sorted by rule index: host sources (a /32 or
//!    /128: a node's address, a workload's) through a hash map, wider sources (a prefix routed
//!    to a node) in a short list, and per slot the rules whose source is `*` (`Any` matches
//!    any source address: the packet has already passed WireGuard's cryptokey routing). The
//!    first rule of a list whose slot bit is set and whose ports match is that list's
//!    smallest; the answer is the smallest over the three, the rule [`Policy::check`] names.
//!
//! So a lookup costs two hash probes and a walk over the rules that name its source, never a
//! pass over the whole policy, and allocates nothing. Rules are never multiplied out into
//! source x destination x ports entries.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::IpAddr;
use std::ops::Range;

use ipnet::IpNet;

use super::eval::{selects_node, Index};
use super::{Policy, Ports, Selector};
use crate::{Netmap, NodeId};

type AddrMap<K, V> = HashMap<K, V, BuildHasherDefault<AddrHasher>>;

/// The rules of a policy that can allow a flow *to* node `me`, keyed by source address.
///
/// The default table is empty: it allows nothing.
#[derive(Debug, Clone, Default)]
pub struct NodeTable {
    /// Per rule index: its ports, as a range of `ports`.
    rule_ports: Vec<Range<u32>>,
    /// The ports of every rule, one after the other.
    ports: Vec<Ports>,
    /// Words of one slot's rule bits.
    words: usize,
    /// Per slot, `words` words: bit `r` is set when rule `r` allows something to the slot.
    slot_rules: Vec<u64>,
    /// Per slot: its rules with a `*` source, as a range of `any_rules`.
    slot_any: Vec<Range<u32>>,
    /// The `*`-source rules of every slot, each slot's sorted.
    any_rules: Vec<u32>,
    /// Host destinations (IPv4) -> slot.
    dst_v4: AddrMap<u32, u32>,
    /// Host destinations (IPv6) -> slot.
    dst_v6: AddrMap<u128, u32>,
    /// Wider destinations, most specific first, with their slot.
    dst_wide: Vec<(Net, u32)>,
    /// Host sources (IPv4) -> their rules, a range of `src_rules`.
    src_v4: AddrMap<u32, Range<u32>>,
    /// Host sources (IPv6) -> their rules, a range of `src_rules`.
    src_v6: AddrMap<u128, Range<u32>>,
    /// The rules of every host source as the non-zero words of a bit set over rules (word
    /// index, bits), each source's in word order.
    src_rules: Vec<(u32, u64)>,
    /// Wider sources with a rule naming them, sorted by rule.
    src_wide: Vec<(Net, u32)>,
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
    len: u8,
}

impl Net {
    fn of(net: IpNet) -> Net {
        let net = net.trunc();
        match net {
            IpNet::V4(n) => Net {
                v6: false,
                bits: u128::from(u32::from(n.network())),
                mask: u128::from(u32::from(n.netmask())),
                len: n.prefix_len(),
            },
            IpNet::V6(n) => Net {
                v6: true,
                bits: u128::from(n.network()),
                mask: u128::from(n.netmask()),
                len: n.prefix_len(),
            },
        }
    }

    fn is_host(&self) -> bool {
        self.len == if self.v6 { 128 } else { 32 }
    }

    #[inline]
    fn contains(&self, a: Addr) -> bool {
        self.v6 == a.v6 && a.bits & self.mask == self.bits
    }

    /// Whether `other` lies wholly within this prefix.
    fn covers(&self, other: &Net) -> bool {
        self.len <= other.len
            && self.contains(Addr {
                v6: other.v6,
                bits: other.bits,
            })
    }
}

/// A hasher for addresses (a multiply and a shift per word): the keys are the map's
/// addresses, chosen by the coordinator, not by whoever sends packets, so a fast hash with no
/// secret key cannot be driven into collisions from outside; a lookup of any address costs
/// one probe sequence among them.
#[derive(Debug, Clone, Copy, Default)]
struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        // The high bits of the product depend on every input bit; fold them down so that the
        // low bits (the bucket) do too.
        let x = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = x ^ (x >> 32);
    }

    fn write_u128(&mut self, n: u128) {
        self.write_u64(n as u64);
        self.write_u64((n >> 64) as u64);
    }
}

impl NodeTable {
    /// Compiles `policy` for node `me` of `map`: the rules that allow something to `me`'s
    /// routed prefixes or to any workload's address, indexed by destination and by source.
    /// A rule with no ports, or whose destinations are nobody here, leaves nothing.
    ///
    /// Cost: a pass over each rule's selectors through the map's name and tag index; memory
    /// a bit per rule per slot (one slot per routed prefix of `me` and per workload) and an
    /// index per (source, rule) pair.
    pub fn compile(policy: &Policy, map: &Netmap, me: NodeId) -> NodeTable {
        let index = Index::new(map);
        let me = map.peers.get(&me);
        let rules = &policy.rules;
        // Rule indices are u32 in the table; a parsed policy has at most 10,000.
        let rules = &rules[..rules.len().min(u32::MAX as usize)];

        let mut table = NodeTable {
            words: rules.len().div_ceil(64),
            ..NodeTable::default()
        };
        for r in rules {
            let start = table.ports.len() as u32;
            table.ports.extend(&r.ports);
            table.rule_ports.push(start..table.ports.len() as u32);
        }

        // Slots: my routed prefixes, then every workload's address.
        let mut slots: Vec<Net> = Vec::new();
        let mut slot_of: HashMap<Net, u32> = HashMap::new();
        let mut slot = |net: IpNet, slots: &mut Vec<Net>| -> u32 {
            let net = Net::of(net);
            *slot_of.entry(net).or_insert_with(|| {
                slots.push(net);
                slots.len() as u32 - 1
            })
        };
        let my_slots: Vec<u32> = me
            .map(|p| p.routed())
            .unwrap_or_default()
            .into_iter()
            .map(|n| slot(n, &mut slots))
            .collect();
        // A workload's slots: its address, and its IPv6 address if any.
        let workload_slots: HashMap<&str, Vec<u32>> = map
            .workloads
            .values()
            .map(|w| {
                let mine = w.addresses().map(|a| slot(a, &mut slots)).collect();
                (w.name.as_str(), mine)
            })
            .collect();
        table.slot_rules = vec![0; slots.len() * table.words];
        let mut any: Vec<Vec<u32>> = vec![Vec::new(); slots.len()];
        let mut src_hosts: HashMap<Addr, Vec<u32>> = HashMap::new();

        let mut dsts: Vec<u32> = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            let r = i as u32;
            if rule.ports.is_empty() {
                continue;
            }
            dsts.clear();
            for s in &rule.to {
                if me.is_some_and(|p| selects_node(s, p)) {
                    dsts.extend(&my_slots);
                }
                dsts.extend(
                    index
                        .workloads(s)
                        .iter()
                        .flat_map(|w| &workload_slots[w.name.as_str()]),
                );
            }
            if dsts.is_empty() {
                continue;
            }
            for &d in &dsts {
                table.slot_rules[d as usize * table.words + i / 64] |= 1 << (i % 64);
            }
            if rule.from.contains(&Selector::Any) {
                dsts.sort_unstable();
                dsts.dedup();
                for &d in &dsts {
                    any[d as usize].push(r);
                }
                continue;
            }
            for s in &rule.from {
                let nodes = index.nodes(s);
                let workloads = index.workloads(s);
                let prefixes = nodes
                    .iter()
                    .flat_map(|p| p.routed())
                    .chain(workloads.iter().flat_map(|w| w.addresses()));
                for src in prefixes {
                    let src = Net::of(src);
                    if src.is_host() {
                        let rules = src_hosts
                            .entry(Addr {
                                v6: src.v6,
                                bits: src.bits,
                            })
                            .or_default();
                        if rules.last() != Some(&r) {
                            rules.push(r);
                        }
                    } else if !table.src_wide.contains(&(src, r)) {
                        table.src_wide.push((src, r));
                    }
                }
            }
        }

        // A destination in a slot is also in every wider slot holding it: give each slot the
        // rules of those, so that a lookup consults one slot.
        let wide: Vec<u32> = (0..slots.len() as u32)
            .filter(|&s| !slots[s as usize].is_host())
            .collect();
        let own_rules = table.slot_rules.clone();
        let own_any = any.clone();
        for (a, net) in slots.iter().enumerate() {
            for &b in &wide {
                let b = b as usize;
                if b != a && slots[b].covers(net) {
                    let (w, words) = (table.words, table.slot_rules.len());
                    debug_assert!(b * w + w <= words);
                    for k in 0..w {
                        table.slot_rules[a * w + k] |= own_rules[b * w + k];
                    }
                    any[a].extend(&own_any[b]);
                }
            }
            any[a].sort_unstable();
            any[a].dedup();
        }
        for (a, rules) in any.into_iter().enumerate() {
            let start = table.any_rules.len() as u32;
            table.any_rules.extend(rules);
            table.slot_any.push(start..table.any_rules.len() as u32);
            let net = slots[a];
            if !net.is_host() {
                table.dst_wide.push((net, a as u32));
            } else if net.v6 {
                table.dst_v6.insert(net.bits, a as u32);
            } else {
                table.dst_v4.insert(net.bits as u32, a as u32);
            }
        }
        table
            .dst_wide
            .sort_by_key(|&(net, _)| std::cmp::Reverse(net.len));

        table.src_wide.sort_by_key(|&(_, r)| r);
        let mut hosts: Vec<(Addr, Vec<u32>)> = src_hosts.into_iter().collect();
        hosts.sort_unstable_by_key(|(a, _)| (a.v6, a.bits));
        for (src, rules) in hosts {
            let start = table.src_rules.len() as u32;
            for r in rules {
                let (word, bit) = (r / 64, 1 << (r % 64));
                let mine = &mut table.src_rules[start as usize..];
                match mine.last_mut() {
                    Some((k, bits)) if *k == word => *bits |= bit,
                    _ => table.src_rules.push((word, bit)),
                }
            }
            let range = start..table.src_rules.len() as u32;
            if src.v6 {
                table.src_v6.insert(src.bits, range);
            } else {
                table.src_v4.insert(src.bits as u32, range);
            }
        }
        table
    }

    /// The index of the first rule allowing a new flow from `src` to `dst` of IP protocol
    /// `proto` and destination port `port` (0 for ICMP), or `None`: denied.
    ///
    /// Looks at the rules naming `src` (as a host, within a wider source, or as `*`) only,
    /// stops in each list at its first match; allocates nothing.
    #[inline]
    pub fn lookup(&self, src: IpAddr, dst: IpAddr, proto: u8, port: u16) -> Option<usize> {
        let slot = match dst {
            IpAddr::V4(a) => self.dst_v4.get(&u32::from(a)),
            IpAddr::V6(a) => self.dst_v6.get(&u128::from(a)),
        };
        let slot = match slot {
            Some(&s) => s,
            None => {
                let d = Addr::of(dst);
                self.dst_wide.iter().find(|(net, _)| net.contains(d))?.1
            }
        } as usize;
        let bits = &self.slot_rules[slot * self.words..(slot + 1) * self.words];
        let ports = |r: u32| {
            let range = &self.rule_ports[r as usize];
            self.ports[range.start as usize..range.end as usize]
                .iter()
                .any(|p| p.matches(proto, port))
        };
        let allows = |r: u32| bits[r as usize / 64] & (1 << (r % 64)) != 0 && ports(r);

        let mut best = u32::MAX;
        let host = match src {
            IpAddr::V4(a) => self.src_v4.get(&u32::from(a)),
            IpAddr::V6(a) => self.src_v6.get(&u128::from(a)),
        };
        if let Some(range) = host {
            // The rules naming the source and the slot, word by word, in rule order.
            'words: for &(k, src_bits) in &self.src_rules[range.start as usize..range.end as usize]
            {
                let mut both = src_bits & bits[k as usize];
                while both != 0 {
                    let r = k * 64 + both.trailing_zeros();
                    if ports(r) {
                        best = r;
                        break 'words;
                    }
                    both &= both - 1;
                }
            }
        }
        if !self.src_wide.is_empty() {
            let s = Addr::of(src);
            for &(net, r) in &self.src_wide {
                if r >= best {
                    break;
                }
                if net.contains(s) && allows(r) {
                    best = r;
                    break;
                }
            }
        }
        let range = &self.slot_any[slot];
        for &r in &self.any_rules[range.start as usize..range.end as usize] {
            if r >= best {
                break;
            }
            if ports(r) {
                best = r;
                break;
            }
        }
        (best != u32::MAX).then_some(best as usize)
    }

    /// How many (source, rule) and (slot, `*`-source rule) pairs the table holds: a measure
    /// of what lookups may walk.
    pub fn len(&self) -> usize {
        let hosts: u32 = self.src_rules.iter().map(|(_, b)| b.count_ones()).sum();
        hosts as usize + self.src_wide.len() + self.any_rules.len()
    }

    /// Whether the table allows nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::super::eval::tests::{map_of, node, random_map, random_policy, workload};
    use super::super::{ip_proto, parse, Entity, FlowPort, Rule};
    use super::*;
    use crate::policy::testkit::Lcg;

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
    fn a_source_named_twice_by_a_rule_is_listed_once() {
        let map = map_of(vec![node(1, "a", &["x", "y"]), node(2, "b", &[])], vec![]);
        let policy = parse(
            "[[rule]]\nfrom = [\"tag:x\", \"tag:y\", \"node:a\"]\nto = [\"*\"]\nports = [\"tcp:1\"]\n\
             [[rule]]\nfrom = [\"node:a\"]\nto = [\"node:b\"]\nports = [\"tcp:1\"]\n\
             [[rule]]\nfrom = [\"node:b\"]\nto = [\"node:a\"]\nports = [\"tcp:1\"]\n",
        )
        .unwrap()
        .into_policy(1);
        let t = NodeTable::compile(&policy, &map, 2);
        assert_eq!(t.len(), 2, "{t:?}");
        assert_eq!(
            t.lookup(ip("100.64.0.1"), ip("100.64.0.2"), ip_proto::TCP, 1),
            Some(0)
        );
    }

    #[test]
    fn nested_destinations_take_the_rules_of_every_prefix_holding_them() {
        // Me: 100.64.0.2, 10.2.0.0/16 and 10.2.5.0/24 routed; chat's address lies in the /24.
        let mut b = node(2, "vm-b", &[]);
        b.allowed_ips = ["100.64.0.2/32", "10.2.0.0/16", "10.2.5.0/24"]
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        let mut chat = workload("chat", 1, Some(2), &[]);
        chat.address = "10.2.5.9/32".parse().unwrap();
        let map = map_of(vec![node(1, "vm-a", &[]), b], vec![chat]);
        let policy = parse(
            "[[rule]]\nfrom = [\"node:vm-a\"]\nto = [\"workload:chat\"]\nports = [\"tcp:1\"]\n\
             [[rule]]\nfrom = [\"*\"]\nto = [\"node:vm-b\"]\nports = [\"tcp:2\"]\n\
             [[rule]]\nfrom = [\"node:vm-a\"]\nto = [\"node:vm-b\"]\nports = [\"tcp:3\"]\n",
        )
        .unwrap()
        .into_policy(1);
        let t = NodeTable::compile(&policy, &map, 2);
        let a = ip("100.64.0.1");
        let tcp = ip_proto::TCP;
        assert_eq!(t.lookup(a, ip("10.2.5.9"), tcp, 1), Some(0));
        assert_eq!(t.lookup(a, ip("10.2.5.9"), tcp, 2), Some(1));
        assert_eq!(t.lookup(a, ip("10.2.5.9"), tcp, 3), Some(2));
        assert_eq!(t.lookup(a, ip("10.2.5.1"), tcp, 1), None);
        assert_eq!(t.lookup(a, ip("10.2.5.1"), tcp, 2), Some(1));
        assert_eq!(t.lookup(a, ip("10.2.7.1"), tcp, 3), Some(2));
        assert_eq!(t.lookup(a, ip("10.3.0.1"), tcp, 2), None);
        assert_eq!(t.lookup(ip("10.9.9.9"), ip("10.2.7.1"), tcp, 3), None);
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

    /// The rules that concern a node give its table the same answers as the whole policy for
    /// every destination it is or may hold, and the same visible peers.
    #[test]
    fn the_relevant_rules_answer_as_the_whole_policy() {
        let mut g = Lcg(0x0dd_ba11);
        for _ in 0..1_000 {
            let map = random_map(&mut g);
            let policy = random_policy(&mut g, &map);
            let sources: Vec<IpAddr> = map
                .peers
                .values()
                .flat_map(|p| p.routed())
                .map(inside)
                .chain(map.workloads.values().map(|w| w.ip()))
                .chain([ip("192.0.2.1")])
                .collect();
            for &me in map.peers.keys() {
                let keep = super::super::relevant_rules(&policy, &map, me);
                let subset = Policy {
                    version: policy.version,
                    rules: keep.iter().map(|&i| policy.rules[i].clone()).collect(),
                };
                assert_eq!(
                    super::super::visible_peers(Some(&subset), &map, me),
                    super::super::visible_peers(Some(&policy), &map, me),
                    "node {me}: {map:?} under {policy:?}"
                );
                let whole = NodeTable::compile(&policy, &map, me);
                let cut = NodeTable::compile(&subset, &map, me);
                let mut dests: Vec<IpAddr> =
                    map.peers[&me].routed().into_iter().map(inside).collect();
                dests.extend(
                    map.workloads
                        .values()
                        .filter(|w| {
                            w.holder == Some(me)
                                || w.previous == Some(me)
                                || w.candidates.contains(&me)
                        })
                        .map(|w| w.ip()),
                );
                for dst in &dests {
                    for _ in 0..4 {
                        let flow = random_flow(&mut g);
                        for src in &sources {
                            let want = whole.lookup(*src, *dst, flow.proto, flow.port);
                            let got = cut
                                .lookup(*src, *dst, flow.proto, flow.port)
                                .map(|i| keep[i]);
                            assert_eq!(got, want, "{src} -> {dst} {flow} at node {me}");
                        }
                    }
                }
            }
        }
    }
}
