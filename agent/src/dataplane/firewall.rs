//! The firewall: what the `Device` checks for each decrypted packet before the TUN device gets
//! it, and what it notes of each packet it sends so that the replies come back.
//!
//! Pipeline (inbound, after WireGuard and cryptokey routing; packets the device forwards on to
//! a workload's new holder skip it, the new holder checks them):
//!
//! ```text
//!  decrypted packet ──> destination check (mesh mode) ──not local──> dropped, not_local
//!                   ──> no policy ──> TUN
//!                   ──> connection table: a tracked flow ──> TUN  (cut by a policy change ──> dropped, policy_denied)
//!                   ──> an ICMP error quoting a tracked flow ──> TUN
//!                   ──> NodeTable::lookup: a rule ──> flow recorded, counted against the rule ──> TUN
//!                                          none   ──> dropped, policy_denied
//!  outbound packet (policy in force) ──> its flow recorded (opened by this node) or refreshed
//! ```
//!
//! The destination check keeps a peer from using this node as a router: a decrypted packet
//! must be addressed to this node's own addresses, the prefixes the map routes to it, or the
//! workload addresses it holds or is being prepared for. Static (wg-quick style) devices have
//! no such check: forwarding to a LAN behind them is their user's choice.
//!
//! The policy is a per-node table compiled from the network's policy ([`CompiledPolicy`]), so
//! a new flow costs one hash lookup and a packet of a known flow none. A new table is a new
//! *generation*: the connection table checks each flow again against it at the flow's next
//! packet, so a policy change cuts the flows it denies without a restart.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use meshlink_proto::policy::NodeTable;
use meshlink_proto::{Netmap, NodeId, Policy};

use super::allowed_ips::AllowedIps;
use super::conntrack::{Conntrack, Kind, Opened, Packet, Track, Tuple};
use super::status::{FirewallStatus, RuleCount};

/// One version of the network's policy, compiled for this node (or for the external nodes a
/// gateway serves, see `gateway`), with a counter per rule.
pub struct CompiledPolicy {
    version: u64,
    /// Per node it is compiled for (one: this node), the table of flows to it, and the same
    /// rules with `from` and `to` swapped: whether the node may open a flow *to* a peer.
    /// The reverse is consulted only for TCP segments of a connection the table has not seen
    /// open (one that began before the policy): which end may have opened it. Each node's
    /// table has that node's prefixes alone as destinations, so at most one of them answers
    /// for a packet.
    tables: Box<[(NodeTable, NodeTable)]>,
    /// The file line of each rule, by rule index.
    lines: Box<[u32]>,
    /// New flows each rule let in, by rule index.
    allowed: Box<[AtomicU64]>,
}

impl CompiledPolicy {
    /// Compiles `policy` for node `me` of `map`.
    pub fn compile(policy: &Policy, map: &Netmap, me: NodeId) -> CompiledPolicy {
        CompiledPolicy::compile_for(policy, map, &[me])
    }

    /// Compiles `policy` for each of `nodes` of `map` (a gateway's external nodes: flows to
    /// any of them).
    pub fn compile_for(policy: &Policy, map: &Netmap, nodes: &[NodeId]) -> CompiledPolicy {
        let swapped = Policy {
            version: policy.version,
            rules: policy
                .rules
                .iter()
                .map(|r| meshlink_proto::policy::Rule {
                    from: r.to.clone(),
                    to: r.from.clone(),
                    ..r.clone()
                })
                .collect(),
        };
        CompiledPolicy::with_tables(
            policy,
            nodes
                .iter()
                .map(|&n| {
                    (
                        NodeTable::compile(policy, map, n),
                        NodeTable::compile(&swapped, map, n),
                    )
                })
                .collect(),
        )
    }

    /// `policy` with its tables, already compiled: `table` for flows to this node, `reverse`
    /// (the rules with `from` and `to` swapped) for flows from it.
    pub fn new(policy: &Policy, table: NodeTable, reverse: NodeTable) -> CompiledPolicy {
        CompiledPolicy::with_tables(policy, Box::new([(table, reverse)]))
    }

    fn with_tables(policy: &Policy, tables: Box<[(NodeTable, NodeTable)]>) -> CompiledPolicy {
        CompiledPolicy {
            version: policy.version,
            tables,
            lines: policy.rules.iter().map(|r| r.line).collect(),
            allowed: policy.rules.iter().map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The policy's version.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Whether a new flow of `t` (from its source) is allowed; counts it against its rule
    /// when `count`.
    #[inline]
    fn allows(&self, t: &Tuple, count: bool) -> bool {
        match self
            .tables
            .iter()
            .find_map(|(table, _)| table.lookup(t.src_ip(), t.dst_ip(), t.proto, t.policy_port()))
        {
            Some(rule) => {
                if count {
                    if let Some(c) = self.allowed.get(rule) {
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                }
                true
            }
            None => false,
        }
    }

    /// Whether the policy lets this node open the flow of `t`, a tuple from this node to a
    /// peer (judged by its destination port, as the peer's own agent would).
    #[inline]
    fn allows_out(&self, t: &Tuple) -> bool {
        self.tables.iter().any(|(_, reverse)| {
            reverse
                .lookup(t.dst_ip(), t.src_ip(), t.proto, t.policy_port())
                .is_some()
        })
    }

    /// Keeps the counts of `old` when it is the same version (the map changed, not the
    /// policy).
    fn carry_counts(&self, old: &CompiledPolicy) {
        if old.version == self.version && old.lines == self.lines {
            for (new, old) in self.allowed.iter().zip(old.allowed.iter()) {
                new.store(old.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
    }
}

impl std::fmt::Debug for CompiledPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledPolicy")
            .field("version", &self.version)
            .field("rules", &self.lines.len())
            .finish()
    }
}

/// What the firewall enforces; see [`super::Device::set_firewall`]. The default enforces
/// nothing (a static device).
#[derive(Debug, Clone, Default)]
pub struct FirewallConfig {
    /// The destinations this node accepts packets for (mesh mode): its addresses, the
    /// prefixes the map routes to it, the workload addresses it holds or is being prepared
    /// for. `None`: no destination check (a static device).
    pub local: Option<Vec<IpNet>>,
    /// The policy in force. `None`: none, every flow is allowed.
    pub policy: Option<Arc<CompiledPolicy>>,
}

/// Device-wide firewall counters; they survive configuration changes.
#[derive(Debug, Default)]
pub struct FirewallCounters {
    /// Decrypted packets addressed to no local destination.
    pub not_local: AtomicU64,
    /// Decrypted packets the policy denied: no rule allows their new flow, or their flow was
    /// cut by a policy change.
    pub denied: AtomicU64,
    /// Flows a policy change cut.
    pub cut: AtomicU64,
}

/// Why the firewall drops a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Through.
    Pass,
    /// Addressed to no local destination.
    NotLocal,
    /// Denied by the policy.
    Denied,
}

/// What the firewall checks of a decrypted packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Check {
    /// The destination check and the policy: a packet about to reach the TUN device.
    Full,
    /// The policy alone: a packet kept back for a workload address this node awaits, which is
    /// not one of its destinations yet (see `handover`). It is checked in full at its release.
    Policy,
}

/// Local destinations in one order, host bits cleared.
fn normalise(local: Option<Vec<IpNet>>) -> Option<Vec<IpNet>> {
    local.map(|mut nets| {
        for n in &mut nets {
            *n = n.trunc();
        }
        nets.sort();
        nets.dedup();
        nets
    })
}

/// Whether two policy tables are the same one.
fn same_policy(a: &Option<Arc<CompiledPolicy>>, b: &Option<Arc<CompiledPolicy>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// What the firewall remembers within one batch of packets (one hold of the device's table,
/// during which the firewall cannot change): the last flow it let through, so that the rest
/// of a bulk transfer's batch costs a parse and a comparison per packet, no lock.
#[derive(Debug, Default)]
pub(crate) struct Memo {
    /// The last destination that passed the destination check (no policy).
    dst: Option<IpAddr>,
    /// The last flow that passed (destination check and policy), by its [`FlowBytes`].
    flow: Option<FlowBytes>,
}

/// The header bytes that name a TCP or UDP flow (version, protocol, addresses, ports), copied
/// as they are: what [`Memo`] compares without parsing.
type FlowBytes = [u8; 40];

/// The [`FlowBytes`] of a TCP segment without SYN, FIN or RST or of a UDP datagram, in an
/// IPv4 packet without options that is no fragment or an IPv6 packet without extension
/// headers: the packets that change nothing in their flow's state but its idle time (which
/// a batch's first packet has restarted). `None` for every other packet.
#[inline]
fn flow_bytes(p: &[u8]) -> Option<FlowBytes> {
    const TCP: u8 = 6;
    const UDP: u8 = 17;
    const SYN_FIN_RST: u8 = 0x07;
    let (proto, addrs, l4) = match *p.first()? {
        0x45 if p.len() >= 40 && p[6] & 0x3f == 0 && p[7] == 0 => (p[9], &p[12..20], 20),
        b if b >> 4 == 6 && p.len() >= 60 => (p[6], &p[8..40], 40),
        _ => return None,
    };
    match proto {
        TCP if p[l4 + 13] & SYN_FIN_RST == 0 => {}
        UDP => {}
        _ => return None,
    }
    let mut key = [0u8; 40];
    key[0] = p[0] >> 4;
    key[1] = proto;
    key[2..6].copy_from_slice(&p[l4..l4 + 4]);
    key[8..8 + addrs.len()].copy_from_slice(addrs);
    Some(key)
}

/// Whether `p` is a TCP segment that does not open a connection: one of a connection the
/// connection table may never have seen open.
fn mid_connection(p: &Packet) -> bool {
    matches!(p.kind, Kind::Tcp(flags) if flags & super::conntrack::SYN == 0)
}

/// `p` as the connection table records a flow its *receiver* opened.
fn opened_by_receiver(p: &Packet) -> Packet {
    Packet {
        tuple: p.tuple.reversed(),
        kind: p.kind,
    }
}

/// The local destinations: a few prefixes are scanned (the usual case: an address or two and
/// the workloads held), more are looked up in a prefix table.
enum Local {
    Few(Vec<IpNet>),
    Many(Box<AllowedIps<()>>),
}

/// Up to this many local prefixes are scanned.
const FEW: usize = 8;

impl Local {
    fn new(nets: &[IpNet]) -> Local {
        if nets.len() <= FEW {
            return Local::Few(nets.to_vec());
        }
        let mut table = AllowedIps::new();
        for n in nets {
            table.insert(*n, ());
        }
        Local::Many(Box::new(table))
    }

    #[inline]
    fn contains(&self, addr: IpAddr) -> bool {
        match self {
            Local::Few(nets) => nets.iter().any(|n| n.contains(&addr)),
            Local::Many(table) => table.lookup(addr).is_some(),
        }
    }
}

/// The firewall as the device holds it: the configuration, in the form the packet path uses.
#[derive(Default)]
pub(crate) struct Firewall {
    local: Option<Local>,
    local_nets: Option<Vec<IpNet>>,
    policy: Option<Arc<CompiledPolicy>>,
    /// Bumped by every change of policy table (see the module documentation).
    generation: u32,
}

impl Firewall {
    /// Whether it checks anything at all.
    #[inline]
    pub(crate) fn is_open(&self) -> bool {
        self.local.is_none() && self.policy.is_none()
    }

    /// Whether a policy is in force.
    #[inline]
    pub(crate) fn has_policy(&self) -> bool {
        self.policy.is_some()
    }

    /// Whether `config` is what the firewall enforces already.
    pub(crate) fn is(&self, config: &FirewallConfig) -> bool {
        same_policy(&self.policy, &config.policy)
            && normalise(config.local.clone()) == self.local_nets
    }

    /// Brings the firewall to `config`. Returns whether the policy table changed (and with it
    /// the generation).
    pub(crate) fn set(&mut self, config: FirewallConfig) -> bool {
        let local_nets = normalise(config.local);
        if local_nets != self.local_nets {
            self.local = local_nets.as_deref().map(Local::new);
            self.local_nets = local_nets;
        }
        if same_policy(&self.policy, &config.policy) {
            return false;
        }
        if let (Some(old), Some(new)) = (&self.policy, &config.policy) {
            new.carry_counts(old);
        }
        self.policy = config.policy;
        self.generation = self.generation.wrapping_add(1);
        true
    }

    /// Whether `dst` is a local destination (true without the check).
    #[inline]
    fn is_local(&self, dst: Option<IpAddr>, counters: &FirewallCounters) -> bool {
        let Some(local) = &self.local else {
            return true;
        };
        if dst.is_some_and(|d| local.contains(d)) {
            return true;
        }
        counters.not_local.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// The verdict on a decrypted packet (`dst` is its destination), with `check` (the
    /// destination check is skipped for [`Check::Policy`]). A packet of a new flow that the
    /// policy allows is recorded in `flows`; the counters count drops device-wide. `memo` is
    /// the batch's (see [`Memo`]).
    #[inline]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn inbound(
        &self,
        packet: &[u8],
        dst: Option<IpAddr>,
        check: Check,
        flows: Option<&Conntrack>,
        now: Duration,
        counters: &FirewallCounters,
        memo: &mut Memo,
    ) -> Verdict {
        let full = check == Check::Full;
        let (Some(policy), Some(flows)) = (&self.policy, flows) else {
            if !full || self.local.is_none() {
                return Verdict::Pass;
            }
            if dst.is_some() && memo.dst == dst {
                return Verdict::Pass;
            }
            if !self.is_local(dst, counters) {
                return Verdict::NotLocal;
            }
            memo.dst = dst;
            return Verdict::Pass;
        };
        let deny = || {
            counters.denied.fetch_add(1, Ordering::Relaxed);
            Verdict::Denied
        };
        let fast = flow_bytes(packet);
        if fast.is_some() && memo.flow == fast {
            return Verdict::Pass;
        }
        let Some(p) = Packet::parse(packet) else {
            return if !full || self.is_local(dst, counters) {
                deny()
            } else {
                Verdict::NotLocal
            };
        };
        if full && !self.is_local(dst, counters) {
            return Verdict::NotLocal;
        }
        let remember = |memo: &mut Memo| {
            if fast.is_some() {
                memo.flow = fast;
            }
        };
        // The packet comes from the remote end: a flow it opened is checked again.
        let recheck = |o: &Opened| {
            if !o.by_sender {
                return true;
            }
            let ok = policy.allows(&o.tuple, false);
            if !ok {
                counters.cut.fetch_add(1, Ordering::Relaxed);
            }
            ok
        };
        match flows.track(&p, now, self.generation, recheck) {
            Track::Pass => {
                remember(memo);
                return Verdict::Pass;
            }
            Track::Cut => return deny(),
            Track::Miss => {}
        }
        if let Kind::IcmpError(quoted) = p.kind {
            // The quoted packet was sent by this node: its flow was opened here, or by the
            // remote end (then checked again, the packet's sender being the responder).
            let recheck = |o: &Opened| {
                if o.by_sender {
                    return true;
                }
                let ok = policy.allows(&o.tuple, false);
                if !ok {
                    counters.cut.fetch_add(1, Ordering::Relaxed);
                }
                ok
            };
            if flows.related(&quoted, now, self.generation, recheck) {
                return Verdict::Pass;
            }
        }
        if !policy.allows(&p.tuple, true) {
            // A segment of a TCP connection the table never saw open (it began before the
            // policy): it passes if this node may have opened it, and is recorded so.
            if mid_connection(&p) && policy.allows_out(&p.tuple.reversed()) {
                flows.insert(&opened_by_receiver(&p), now, self.generation);
                remember(memo);
                return Verdict::Pass;
            }
            return deny();
        }
        if !matches!(p.kind, Kind::IcmpError(_)) {
            flows.insert(&p, now, self.generation);
            remember(memo);
        }
        Verdict::Pass
    }

    /// Notes a packet this node sends (policy in force): its flow is recorded as opened here,
    /// or refreshed, so that the replies pass.
    #[inline]
    pub(crate) fn outbound(
        &self,
        packet: &[u8],
        flows: &Conntrack,
        now: Duration,
        counters: &FirewallCounters,
        memo: &mut Memo,
    ) {
        let Some(policy) = &self.policy else {
            return;
        };
        let fast = flow_bytes(packet);
        if fast.is_some() && memo.flow == fast {
            return;
        }
        let Some(p) = Packet::parse(packet) else {
            return;
        };
        if matches!(p.kind, Kind::IcmpError(_)) {
            return;
        }
        // The packet comes from this end: a flow the remote end opened is checked again.
        let recheck = |o: &Opened| {
            if o.by_sender {
                return true;
            }
            let ok = policy.allows(&o.tuple, false);
            if !ok {
                counters.cut.fetch_add(1, Ordering::Relaxed);
            }
            ok
        };
        match flows.track(&p, now, self.generation, recheck) {
            // A segment of a TCP connection the table never saw open (it began before the
            // policy): recorded with the end the policy lets open it, or not at all (then
            // the peer's segments are judged as they come, and denied unless allowed).
            Track::Miss if mid_connection(&p) => {
                if policy.allows_out(&p.tuple) {
                    flows.insert(&p, now, self.generation);
                } else if policy.allows(&p.tuple.reversed(), false) {
                    flows.insert(&opened_by_receiver(&p), now, self.generation);
                } else {
                    return;
                }
            }
            Track::Miss => flows.insert(&p, now, self.generation),
            Track::Cut => return,
            Track::Pass => {}
        }
        if fast.is_some() {
            memo.flow = fast;
        }
    }

    /// What `meshlink-agent status` shows.
    pub(crate) fn status(
        &self,
        flows: Option<&Conntrack>,
        counters: &FirewallCounters,
    ) -> FirewallStatus {
        FirewallStatus {
            destination_check: self.local.is_some(),
            local: self.local_nets.clone().unwrap_or_default(),
            policy_version: self.policy.as_ref().map(|p| p.version),
            rules: self
                .policy
                .as_ref()
                .map(|p| {
                    p.lines
                        .iter()
                        .zip(p.allowed.iter())
                        .map(|(line, n)| RuleCount {
                            line: *line,
                            flows: n.load(Ordering::Relaxed),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            not_local: counters.not_local.load(Ordering::Relaxed),
            denied: counters.denied.load(Ordering::Relaxed),
            cut: counters.cut.load(Ordering::Relaxed),
            flows: flows.map(Conntrack::stats),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::conntrack;
    use meshlink_proto::policy::{Ports, Rule, Selector};
    use meshlink_proto::PeerInfo;

    const ME: NodeId = 1;
    const A: [u8; 4] = [100, 64, 0, 1];
    const B: [u8; 4] = [100, 64, 0, 2];
    const C: [u8; 4] = [100, 64, 0, 3];
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;

    fn node(id: NodeId, name: &str, addr: [u8; 4], extra: &[&str]) -> PeerInfo {
        let own: IpNet = format!("{}/32", IpAddr::from(addr)).parse().unwrap();
        let mut allowed = vec![own];
        allowed.extend(extra.iter().map(|n| n.parse::<IpNet>().unwrap()));
        PeerInfo {
            node_id: id,
            name: name.into(),
            public_key: meshlink_proto::PublicKey([id as u8; 32]),
            next_key: None,
            addresses: vec![own],
            allowed_ips: allowed,
            endpoints: Vec::new(),
            labels: Default::default(),
            tags: Vec::new(),
            via: None,
        }
    }

    /// Node a (this one, routing a LAN 10.1.0.0/24), b and c.
    fn map() -> Netmap {
        let mut map = Netmap::default();
        for p in [
            node(1, "a", A, &["10.1.0.0/24"]),
            node(2, "b", B, &[]),
            node(3, "c", C, &[]),
        ] {
            map.peers.insert(p.node_id, p);
        }
        map
    }

    fn rule(line: u32, from: &str, to: &str, ports: &str) -> Rule {
        Rule {
            line,
            from: vec![from.parse::<Selector>().unwrap()],
            to: vec![to.parse::<Selector>().unwrap()],
            ports: vec![ports.parse::<Ports>().unwrap()],
        }
    }

    fn compiled(version: u64, rules: Vec<Rule>) -> Arc<CompiledPolicy> {
        let policy = Policy { version, rules };
        Arc::new(CompiledPolicy::compile(&policy, &map(), ME))
    }

    fn ip(proto: u8, src: [u8; 4], dst: [u8; 4], t: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&((20 + t.len()) as u16).to_be_bytes());
        p[9] = proto;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p.extend_from_slice(t);
        p
    }

    fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
        let mut t = [0u8; 20];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[12] = 0x50;
        t[13] = flags;
        ip(6, src, dst, &t)
    }

    struct Fw {
        fw: Firewall,
        flows: Conntrack,
        counters: FirewallCounters,
        now: Duration,
    }

    impl Fw {
        fn new(local: Option<&[&str]>, policy: Option<Arc<CompiledPolicy>>) -> Fw {
            let mut fw = Firewall::default();
            fw.set(FirewallConfig {
                local: local.map(|l| l.iter().map(|n| n.parse().unwrap()).collect()),
                policy,
            });
            Fw {
                fw,
                flows: Conntrack::new(1024, 1),
                counters: FirewallCounters::default(),
                now: Duration::from_secs(1),
            }
        }

        fn inbound(&self, p: &[u8]) -> Verdict {
            let dst = IpAddr::from([p[16], p[17], p[18], p[19]]);
            self.fw.inbound(
                p,
                Some(dst),
                Check::Full,
                Some(&self.flows),
                self.now,
                &self.counters,
                &mut Memo::default(),
            )
        }

        fn outbound(&self, p: &[u8]) {
            self.fw.outbound(
                p,
                &self.flows,
                self.now,
                &self.counters,
                &mut Memo::default(),
            );
        }

        fn status(&self) -> FirewallStatus {
            self.fw.status(Some(&self.flows), &self.counters)
        }
    }

    const LOCAL: &[&str] = &["100.64.0.1/32", "10.1.0.0/24", "100.64.50.10/32"];

    #[test]
    fn the_destination_check_accepts_local_destinations_only() {
        let fw = Fw::new(Some(LOCAL), None);
        assert_eq!(fw.inbound(&tcp(B, 1, A, 22, SYN)), Verdict::Pass);
        assert_eq!(
            fw.inbound(&tcp(B, 1, [10, 1, 0, 5], 22, SYN)),
            Verdict::Pass
        );
        assert_eq!(
            fw.inbound(&tcp(B, 1, [100, 64, 50, 10], 22, SYN)),
            Verdict::Pass,
            "a held workload address"
        );
        assert_eq!(
            fw.inbound(&tcp(B, 1, [192, 168, 1, 5], 22, SYN)),
            Verdict::NotLocal,
            "a LAN the map does not route here"
        );
        assert_eq!(
            fw.inbound(&tcp(B, 1, C, 22, SYN)),
            Verdict::NotLocal,
            "another node"
        );
        let st = fw.status();
        assert_eq!((st.not_local, st.denied), (2, 0));
        assert!(st.destination_check);
        // Many local prefixes: a prefix table instead of a scan, the same answers.
        let many: Vec<String> = (0..20).map(|i| format!("100.64.60.{i}/32")).collect();
        let many: Vec<&str> = many
            .iter()
            .map(String::as_str)
            .chain(LOCAL.iter().copied())
            .collect();
        let fw = Fw::new(Some(&many), None);
        assert!(matches!(fw.fw.local, Some(Local::Many(_))));
        assert_eq!(
            fw.inbound(&tcp(B, 1, [100, 64, 60, 19], 22, SYN)),
            Verdict::Pass
        );
        assert_eq!(
            fw.inbound(&tcp(B, 1, [10, 1, 0, 5], 22, SYN)),
            Verdict::Pass
        );
        assert_eq!(
            fw.inbound(&tcp(B, 1, [100, 64, 60, 20], 22, SYN)),
            Verdict::NotLocal
        );
        // A static device forwards what its user routes.
        let open = Fw::new(None, None);
        assert!(open.fw.is_open());
        assert_eq!(
            open.inbound(&tcp(B, 1, [192, 168, 1, 5], 22, SYN)),
            Verdict::Pass
        );
    }

    #[test]
    fn a_rule_lets_new_flows_in_and_counts_them_by_line() {
        let policy = compiled(4, vec![rule(3, "node:b", "node:a", "tcp:22")]);
        let fw = Fw::new(Some(LOCAL), Some(policy));
        assert_eq!(fw.inbound(&tcp(B, 40000, A, 22, SYN)), Verdict::Pass);
        assert_eq!(fw.inbound(&tcp(B, 40000, A, 22, ACK)), Verdict::Pass);
        assert_eq!(fw.inbound(&tcp(B, 40001, A, 22, SYN)), Verdict::Pass);
        assert_eq!(fw.inbound(&tcp(B, 40000, A, 23, SYN)), Verdict::Denied);
        assert_eq!(fw.inbound(&tcp(C, 40000, A, 22, SYN)), Verdict::Denied);
        let st = fw.status();
        assert_eq!(st.policy_version, Some(4));
        assert_eq!(st.rules, vec![RuleCount { line: 3, flows: 2 }]);
        assert_eq!((st.denied, st.cut), (2, 0));
        assert_eq!(st.flows.unwrap().flows, 2);
    }

    #[test]
    fn replies_of_a_flow_opened_here_pass_against_a_policy_for_the_other_direction() {
        // Only a -> c is allowed (c's agent enforces that); nothing lets c open a flow to a.
        let policy = compiled(1, vec![rule(1, "node:a", "node:c", "tcp:80")]);
        let fw = Fw::new(Some(LOCAL), Some(policy));
        assert_eq!(
            fw.inbound(&tcp(C, 80, A, 50000, SYN | ACK)),
            Verdict::Denied,
            "no flow yet"
        );
        fw.outbound(&tcp(A, 50000, C, 80, SYN));
        assert_eq!(fw.inbound(&tcp(C, 80, A, 50000, SYN | ACK)), Verdict::Pass);
        assert_eq!(fw.inbound(&tcp(C, 80, A, 50000, ACK)), Verdict::Pass);
        assert_eq!(
            fw.inbound(&tcp(C, 80, A, 50001, SYN)),
            Verdict::Denied,
            "another port pair is another flow"
        );
    }

    #[test]
    fn connections_from_before_the_policy_are_judged_by_the_end_that_may_open_them() {
        // a -> c:443 is allowed; nothing lets c open anything to a.
        let policy = compiled(1, vec![rule(1, "node:a", "node:c", "tcp:443")]);
        let fw = Fw::new(Some(LOCAL), Some(policy));
        // c opened a connection to a:5432 before the policy; a's server speaks first. Its
        // segment is not recorded as a flow a opened, and c's segments stay denied.
        fw.outbound(&tcp(A, 5432, C, 40000, ACK));
        assert_eq!(fw.inbound(&tcp(C, 40000, A, 5432, ACK)), Verdict::Denied);
        fw.outbound(&tcp(A, 5432, C, 40000, ACK));
        assert_eq!(fw.inbound(&tcp(C, 40000, A, 5432, ACK)), Verdict::Denied);
        // a opened a connection to c:443 before the policy: c's segments pass, whichever end
        // speaks first after it, and are recorded as a flow a opened.
        assert_eq!(fw.inbound(&tcp(C, 443, A, 40001, ACK)), Verdict::Pass);
        fw.outbound(&tcp(A, 40002, C, 443, ACK));
        assert_eq!(fw.inbound(&tcp(C, 443, A, 40002, ACK)), Verdict::Pass);
        // A new connection from c is still denied, whatever its port.
        assert_eq!(fw.inbound(&tcp(C, 443, A, 40003, SYN)), Verdict::Denied);
    }

    #[test]
    fn icmp_errors_of_tracked_flows_pass_and_others_are_judged_as_icmp() {
        let policy = compiled(1, vec![rule(1, "node:b", "node:a", "tcp:22")]);
        let fw = Fw::new(Some(LOCAL), Some(policy));
        fw.outbound(&tcp(A, 50000, C, 443, SYN));
        let unreachable = |sport: u16| {
            let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
            icmp.extend_from_slice(&tcp(A, sport, C, 443, SYN)[..28]);
            ip(1, C, A, &icmp)
        };
        assert_eq!(fw.inbound(&unreachable(50000)), Verdict::Pass);
        assert_eq!(
            fw.inbound(&unreachable(50001)),
            Verdict::Denied,
            "quotes no tracked flow"
        );
        // An error quoting a flow b opened (and the policy allows) passes too.
        assert_eq!(fw.inbound(&tcp(B, 40000, A, 22, SYN)), Verdict::Pass);
        let mut icmp = vec![11, 0, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&tcp(A, 22, B, 40000, SYN | ACK)[..28]);
        assert_eq!(fw.inbound(&ip(1, B, A, &icmp)), Verdict::Pass);
    }

    #[test]
    fn a_policy_change_cuts_the_flows_it_denies_and_only_those() {
        let v1 = compiled(
            1,
            vec![
                rule(2, "node:b", "node:a", "tcp:22"),
                rule(5, "node:c", "node:a", "tcp:80"),
            ],
        );
        let mut fw = Fw::new(Some(LOCAL), Some(v1.clone()));
        assert_eq!(fw.inbound(&tcp(B, 40000, A, 22, SYN)), Verdict::Pass);
        fw.outbound(&tcp(A, 22, B, 40000, SYN | ACK));
        assert_eq!(fw.inbound(&tcp(C, 40000, A, 80, SYN)), Verdict::Pass);
        fw.outbound(&tcp(A, 60000, B, 9000, SYN));
        // The same table again: nothing changes, no generation.
        assert!(!fw.fw.set(FirewallConfig {
            local: Some(LOCAL.iter().map(|n| n.parse().unwrap()).collect()),
            policy: Some(v1),
        }));
        // Version 2 drops b's rule.
        let v2 = compiled(2, vec![rule(5, "node:c", "node:a", "tcp:80")]);
        assert!(fw.fw.set(FirewallConfig {
            local: Some(LOCAL.iter().map(|n| n.parse().unwrap()).collect()),
            policy: Some(v2),
        }));
        fw.now += Duration::from_secs(1);
        assert_eq!(fw.inbound(&tcp(B, 40000, A, 22, ACK)), Verdict::Denied);
        // What a's server still sends does not revive it.
        fw.outbound(&tcp(A, 22, B, 40000, ACK));
        assert_eq!(fw.inbound(&tcp(B, 40000, A, 22, ACK)), Verdict::Denied);
        assert_eq!(
            fw.inbound(&tcp(C, 40000, A, 80, ACK)),
            Verdict::Pass,
            "still allowed"
        );
        assert_eq!(
            fw.inbound(&tcp(B, 9000, A, 60000, SYN | ACK)),
            Verdict::Pass,
            "a flow this node opened is the remote end's to judge"
        );
        let st = fw.status();
        assert_eq!((st.cut, st.denied, st.policy_version), (1, 2, Some(2)));
        assert_eq!(st.rules, vec![RuleCount { line: 5, flows: 0 }]);
    }

    /// A packet kept back for an awaited workload address (not local yet) is checked against
    /// the policy alone; the destination check waits for its release.
    #[test]
    fn the_policy_check_alone_skips_the_destination_check() {
        // A destination the policy speaks of that is not local (yet), as an awaited address.
        const AWAITED: [u8; 4] = [10, 1, 0, 5];
        let policy = compiled(1, vec![rule(1, "node:b", "node:a", "tcp:22")]);
        let fw = Fw::new(Some(&["100.64.0.1/32"]), Some(policy));
        let policy_only = |p: &[u8]| {
            fw.fw.inbound(
                p,
                Some(IpAddr::from([p[16], p[17], p[18], p[19]])),
                Check::Policy,
                Some(&fw.flows),
                fw.now,
                &fw.counters,
                &mut Memo::default(),
            )
        };
        assert_eq!(policy_only(&tcp(B, 40000, AWAITED, 22, SYN)), Verdict::Pass);
        assert_eq!(
            policy_only(&tcp(B, 40000, AWAITED, 23, SYN)),
            Verdict::Denied
        );
        let mut cut_short = tcp(B, 40000, AWAITED, 22, SYN);
        cut_short.truncate(24);
        assert_eq!(policy_only(&cut_short), Verdict::Denied, "unparsable");
        let st = fw.status();
        assert_eq!((st.not_local, st.denied), (0, 2));
        // In full, the same destination is not local (until it is held).
        assert_eq!(
            fw.inbound(&tcp(B, 40000, AWAITED, 22, ACK)),
            Verdict::NotLocal
        );
        // Without a policy, nothing to check; the destination check is not made either.
        let open = Fw::new(Some(LOCAL), None);
        let mut memo = Memo::default();
        let v = open.fw.inbound(
            &tcp(B, 1, AWAITED, 23, SYN),
            Some(IpAddr::from(AWAITED)),
            Check::Policy,
            None,
            open.now,
            &open.counters,
            &mut memo,
        );
        assert_eq!(v, Verdict::Pass);
        assert_eq!(memo.dst, None, "not remembered as local");
        assert_eq!(open.status().not_local, 0);
    }

    #[test]
    fn a_batch_remembers_only_plain_packets_of_a_flow_that_passed() {
        let policy = compiled(1, vec![rule(1, "node:b", "node:a", "tcp:22")]);
        let fw = Fw::new(Some(LOCAL), Some(policy));
        let mut memo = Memo::default();
        let mut check = |p: &[u8]| {
            fw.fw.inbound(
                p,
                Some(IpAddr::from([p[16], p[17], p[18], p[19]])),
                Check::Full,
                Some(&fw.flows),
                fw.now,
                &fw.counters,
                &mut memo,
            )
        };
        assert_eq!(check(&tcp(B, 40000, A, 22, SYN)), Verdict::Pass);
        assert_eq!(check(&tcp(B, 40000, A, 22, ACK)), Verdict::Pass);
        assert_eq!(check(&tcp(B, 40000, A, 22, ACK)), Verdict::Pass);
        // Another port, another source, another destination: judged, not remembered.
        assert_eq!(check(&tcp(B, 40000, A, 23, ACK)), Verdict::Denied);
        assert_eq!(check(&tcp(C, 40000, A, 22, ACK)), Verdict::Denied);
        assert_eq!(check(&tcp(B, 40000, C, 22, ACK)), Verdict::NotLocal);
        // The flow's key bytes: SYN, FIN and RST are never skipped; fragments and options
        // have none.
        assert!(flow_bytes(&tcp(B, 1, A, 22, ACK)).is_some());
        assert!(flow_bytes(&tcp(B, 1, A, 22, SYN)).is_none());
        assert!(flow_bytes(&tcp(B, 1, A, 22, 0x01 | ACK)).is_none());
        let mut frag = tcp(B, 1, A, 22, ACK);
        frag[6] = 0x20;
        assert!(flow_bytes(&frag).is_none());
        assert_ne!(
            flow_bytes(&tcp(B, 1, A, 22, ACK)),
            flow_bytes(&tcp(B, 1, A, 23, ACK))
        );
    }

    #[test]
    fn rule_counts_carry_over_a_recompile_of_the_same_version() {
        let rules = vec![rule(3, "node:b", "node:a", "tcp:22")];
        let fw = &mut Fw::new(Some(LOCAL), Some(compiled(1, rules.clone())));
        fw.inbound(&tcp(B, 40000, A, 22, SYN));
        fw.fw.set(FirewallConfig {
            local: None,
            policy: Some(compiled(1, rules.clone())),
        });
        assert_eq!(fw.status().rules, vec![RuleCount { line: 3, flows: 1 }]);
        fw.fw.set(FirewallConfig {
            local: None,
            policy: Some(compiled(2, rules)),
        });
        assert_eq!(fw.status().rules, vec![RuleCount { line: 3, flows: 0 }]);
    }

    /// Cost of the packet path with a 1,000-rule policy, and of 100,000 flows. Run with
    /// `cargo test -p meshlink-agent --release --lib measure_ -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn measure_packet_path_with_a_thousand_rules() {
        use std::time::Instant;
        let mut map = Netmap::default();
        for i in 0..100u64 {
            let addr = [100, 64, (i >> 8) as u8, (i & 0xff) as u8 + 1];
            let p = node(i + 1, &format!("n{i}"), addr, &[]);
            map.peers.insert(p.node_id, p);
        }
        let rules: Vec<Rule> = (0..1000u32)
            .map(|i| {
                let from = format!("node:n{}", 1 + i % 99);
                rule(i + 1, &from, "node:n0", &format!("tcp:{}", 10_000 + i))
            })
            .collect();
        let policy = Policy { version: 1, rules };
        let t0 = Instant::now();
        let compiled = Arc::new(CompiledPolicy::compile(&policy, &map, 1));
        println!("compile 1,000 rules x 100 nodes: {:?}", t0.elapsed());
        let me = [100, 64, 0, 1];
        let peer = [100, 64, 0, 2];
        let mut fw = Fw::new(Some(&["100.64.0.1/32"]), Some(compiled));
        fw.flows = Conntrack::new(conntrack::DEFAULT_CAPACITY, 9);
        // An established flow: the per-packet cost of a bulk transfer.
        let syn = tcp(peer, 40000, me, 10_000, SYN);
        assert_eq!(fw.inbound(&syn), Verdict::Pass);
        let data = tcp(peer, 40000, me, 10_000, ACK);
        let ack = tcp(me, 10_000, peer, 40000, ACK);
        let n = 2_000_000;
        let t0 = Instant::now();
        for _ in 0..n {
            assert_eq!(fw.inbound(std::hint::black_box(&data)), Verdict::Pass);
        }
        let per_in = t0.elapsed() / n;
        let t0 = Instant::now();
        for _ in 0..n {
            fw.outbound(std::hint::black_box(&ack));
        }
        let per_out = t0.elapsed() / n;
        println!(
            "established flow, one packet a batch: inbound {per_in:?}/packet, outbound \
             {per_out:?}/packet"
        );
        let t0 = Instant::now();
        for _ in 0..n {
            std::hint::black_box(Packet::parse(std::hint::black_box(&data)));
        }
        println!("parse alone: {:?}/packet", t0.elapsed() / n);
        let dst = Some(IpAddr::from(me));
        let t0 = Instant::now();
        for _ in 0..n / 64 {
            let mut memo = Memo::default();
            for _ in 0..64 {
                let v = fw.fw.inbound(
                    std::hint::black_box(&data),
                    dst,
                    Check::Full,
                    Some(&fw.flows),
                    fw.now,
                    &fw.counters,
                    &mut memo,
                );
                assert_eq!(v, Verdict::Pass);
            }
        }
        println!(
            "established flow, batches of 64: inbound {:?}/packet",
            t0.elapsed() / n
        );
        // New flows: a rule lookup and an insertion each, up to 100,000 flows.
        let t0 = Instant::now();
        for i in 0..100_000u32 {
            // n1's rules: ports 10000 and 10099 (rules 1 and 100).
            let dport = if i < 60_000 { 10_000 } else { 10_099 };
            let p = tcp(peer, (i % 60_000) as u16, me, dport, SYN);
            assert_eq!(fw.inbound(&p), Verdict::Pass);
        }
        let per_new = t0.elapsed() / 100_000;
        let st = fw.flows.stats();
        println!(
            "new flows: {per_new:?} each; {st:?}; {} bytes per entry, {:.1} MiB for the table",
            Conntrack::entry_bytes(),
            (st.capacity as usize * Conntrack::entry_bytes()) as f64 / (1 << 20) as f64
        );
        // Denied packets: a rule lookup that finds nothing.
        let denied = tcp(peer, 40000, me, 9, SYN);
        let t0 = Instant::now();
        for _ in 0..1_000_000 {
            assert_eq!(fw.inbound(std::hint::black_box(&denied)), Verdict::Denied);
        }
        println!("denied: {:?}/packet", t0.elapsed() / 1_000_000);
    }
}
