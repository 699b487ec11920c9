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

/// One version of the network's policy, compiled for this node, with a counter per rule.
pub struct CompiledPolicy {
    version: u64,
    table: NodeTable,
    /// The file line of each rule, by rule index.
    lines: Box<[u32]>,
    /// New flows each rule let in, by rule index.
    allowed: Box<[AtomicU64]>,
}

impl CompiledPolicy {
    /// Compiles `policy` for node `me` of `map`.
    pub fn compile(policy: &Policy, map: &Netmap, me: NodeId) -> CompiledPolicy {
        CompiledPolicy::new(policy, NodeTable::compile(policy, map, me))
    }

    /// `policy` with its table, already compiled.
    pub fn new(policy: &Policy, table: NodeTable) -> CompiledPolicy {
        CompiledPolicy {
            version: policy.version,
            table,
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
            .table
            .lookup(t.src_ip(), t.dst_ip(), t.proto, t.policy_port())
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

/// The firewall as the device holds it: the configuration, in the form the packet path uses.
#[derive(Default)]
pub(crate) struct Firewall {
    local: Option<AllowedIps<()>>,
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
            self.local = local_nets.as_ref().map(|nets| {
                let mut table = AllowedIps::new();
                for n in nets {
                    table.insert(*n, ());
                }
                table
            });
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

    /// The verdict on a decrypted packet (`dst` is its destination). A packet of a new flow
    /// that the policy allows is recorded in `flows`; the counters count drops device-wide.
    #[inline]
    pub(crate) fn inbound(
        &self,
        packet: &[u8],
        dst: Option<IpAddr>,
        flows: Option<&Conntrack>,
        now: Duration,
        counters: &FirewallCounters,
    ) -> Verdict {
        if let Some(local) = &self.local {
            if dst.and_then(|d| local.lookup(d)).is_none() {
                counters.not_local.fetch_add(1, Ordering::Relaxed);
                return Verdict::NotLocal;
            }
        }
        let (Some(policy), Some(flows)) = (&self.policy, flows) else {
            return Verdict::Pass;
        };
        let deny = || {
            counters.denied.fetch_add(1, Ordering::Relaxed);
            Verdict::Denied
        };
        let Some(p) = Packet::parse(packet) else {
            return deny();
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
            Track::Pass => return Verdict::Pass,
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
            return deny();
        }
        if !matches!(p.kind, Kind::IcmpError(_)) {
            flows.insert(&p, now, self.generation);
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
    ) {
        let Some(policy) = &self.policy else {
            return;
        };
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
        if flows.track(&p, now, self.generation, recheck) == Track::Miss {
            flows.insert(&p, now, self.generation);
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
            addresses: vec![own],
            allowed_ips: allowed,
            endpoints: Vec::new(),
            labels: Default::default(),
            tags: Vec::new(),
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
            self.fw
                .inbound(p, Some(dst), Some(&self.flows), self.now, &self.counters)
        }

        fn outbound(&self, p: &[u8]) {
            self.fw.outbound(p, &self.flows, self.now, &self.counters);
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
}
