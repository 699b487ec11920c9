//! Verdicts for flows between nodes and workloads named in a map.
//!
//! A selector is matched against *who* a party is, never against an address: `Any` matches
//! every node and workload of the map, `Tag(t)` those whose tags hold `t`, `Node(n)` and
//! `Workload(n)` the one of that name. A selector that names nobody matches nothing.
//!
//! Two questions are answered here:
//! - [`Policy::check`]: is this one flow allowed, and by which rule (the first allowing one)?
//! - [`may_talk`] / [`visible_peers`]: may two nodes ever exchange packets, given what they are
//!   and every workload they hold, held before or may hold? That is "need to know": a node
//!   learns of, and configures, only such peers. A workload's move must not need a new map to
//!   become reachable, so candidates count as holders.

use std::collections::{BTreeSet, HashMap, HashSet};

use super::{FlowPort, Policy, PolicyFile, Rule, Selector};
use crate::{Netmap, NodeId, PeerInfo, WorkloadInfo};

/// A party to a flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entity {
    /// A node, by id.
    Node(NodeId),
    /// A workload, by name.
    Workload(String),
}

/// The verdict on one flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// The index in [`Policy::rules`] of the first rule that allows it; `None`: denied.
    pub rule: Option<usize>,
}

/// A `[[test]]` whose expectation the policy does not meet, or that names nobody.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestFailure {
    /// The test's line.
    pub line: u32,
    /// What happened.
    pub message: String,
}

impl Policy {
    /// The verdict on a flow from `from` to `to`: allowed iff some rule has a `from` selector
    /// matching `from`, a `to` selector matching `to` and ports matching `port`. An entity
    /// that is not in `map` matches no selector, so a flow from or to it is denied.
    pub fn check(&self, map: &Netmap, from: &Entity, to: &Entity, port: FlowPort) -> Verdict {
        Verdict {
            rule: first_allowing(&self.rules, map, from, to, port),
        }
    }
}

/// The index of the first of `rules` allowing the flow.
fn first_allowing(
    rules: &[Rule],
    map: &Netmap,
    from: &Entity,
    to: &Entity,
    port: FlowPort,
) -> Option<usize> {
    let from = Party::of(map, from)?;
    let to = Party::of(map, to)?;
    rules.iter().position(|r| {
        r.ports.iter().any(|p| p.matches(port.proto, port.port))
            && r.from.iter().any(|s| from.is(s))
            && r.to.iter().any(|s| to.is(s))
    })
}

/// One node or workload of a map.
#[derive(Debug, Clone, Copy)]
enum Party<'a> {
    Node(&'a PeerInfo),
    Workload(&'a WorkloadInfo),
}

impl<'a> Party<'a> {
    fn of(map: &'a Netmap, e: &Entity) -> Option<Party<'a>> {
        match e {
            Entity::Node(id) => map.peers.get(id).map(Party::Node),
            Entity::Workload(name) => map.workloads.get(name).map(Party::Workload),
        }
    }

    /// Whether `selector` matches this party.
    fn is(self, selector: &Selector) -> bool {
        match self {
            Party::Node(p) => selects_node(selector, p),
            Party::Workload(w) => selects_workload(selector, w),
        }
    }
}

/// Whether `selector` matches node `peer`.
pub(super) fn selects_node(selector: &Selector, peer: &PeerInfo) -> bool {
    match selector {
        Selector::Any => true,
        Selector::Tag(t) => peer.tags.iter().any(|x| x == t),
        Selector::Node(n) => peer.name == *n,
        Selector::Workload(_) => false,
    }
}

/// Whether `selector` matches workload `w`.
impl Selector {
    /// Whether the selector matches some node or workload of `map` (one that names nobody
    /// matches nothing: not an error, the node may join later). For many selectors, see
    /// [`unmatched_selectors`].
    pub fn names_anyone(&self, map: &Netmap) -> bool {
        map.peers.values().any(|p| selects_node(self, p))
            || map.workloads.values().any(|w| selects_workload(self, w))
    }
}

/// The selectors of `rules` that name nobody in `map` ([`Selector::names_anyone`]), with the
/// rule of each, in file order. One pass to index the map, then a lookup per selector: a
/// 1,000-rule policy over 1,000 nodes costs some thousands of lookups, not millions of
/// comparisons.
pub fn unmatched_selectors<'r>(rules: &'r [Rule], map: &Netmap) -> Vec<(&'r Rule, &'r Selector)> {
    let index = Index::new(map);
    rules
        .iter()
        .flat_map(|r| r.from.iter().chain(&r.to).map(move |s| (r, s)))
        .filter(|(_, s)| !index.names_anyone(s))
        .collect()
}

pub(super) fn selects_workload(selector: &Selector, w: &WorkloadInfo) -> bool {
    match selector {
        Selector::Any => true,
        Selector::Tag(t) => w.tags.iter().any(|x| x == t),
        Selector::Workload(n) => w.name == *n,
        Selector::Node(_) => false,
    }
}

/// How an entity is written in messages: `node:NAME`, `workload:NAME`.
fn describe(map: &Netmap, e: &Entity) -> String {
    match e {
        Entity::Node(id) => match map.peers.get(id) {
            Some(p) => format!("node:{}", p.name),
            None => format!("node #{id}"),
        },
        Entity::Workload(name) => format!("workload:{name}"),
    }
}

impl Entity {
    /// The node or workload a name means in `map`: `node:NAME`, `workload:NAME`, or a bare
    /// `NAME` (the node of that name, else the workload of that name).
    ///
    /// # Errors
    /// A message when nobody has that name, or both a node and a workload do.
    pub fn resolve(map: &Netmap, name: &str) -> Result<Entity, String> {
        let node = |n: &str| map.peers.values().find(|p| p.name == n).map(|p| p.node_id);
        let workload = |n: &str| map.workloads.contains_key(n).then(|| n.to_string());
        match name.split_once(':') {
            Some(("node", n)) => node(n)
                .map(Entity::Node)
                .ok_or_else(|| format!("no node named {n:?}")),
            Some(("workload", n)) => workload(n)
                .map(Entity::Workload)
                .ok_or_else(|| format!("no workload named {n:?}")),
            Some((kind, _)) => Err(format!(
                "{name:?}: {kind:?} is not a node or workload: write NAME, node:NAME or \
                 workload:NAME"
            )),
            None => match (node(name), workload(name)) {
                (Some(id), None) => Ok(Entity::Node(id)),
                (None, Some(w)) => Ok(Entity::Workload(w)),
                (Some(_), Some(_)) => Err(format!(
                    "{name:?} is both a node and a workload: write node:{name} or \
                     workload:{name}"
                )),
                (None, None) => Err(format!("no node or workload named {name:?}")),
            },
        }
    }
}

impl PolicyFile {
    /// Runs the file's tests against `map`: every `[[test]]` whose parties do not resolve, or
    /// whose expectation the file's rules do not meet, in file order.
    pub fn run_tests(&self, map: &Netmap) -> Vec<TestFailure> {
        let mut failures = Vec::new();
        for t in &self.tests {
            let fail = |message: String| TestFailure {
                line: t.line,
                message,
            };
            let (from, to) = match (Entity::resolve(map, &t.from), Entity::resolve(map, &t.to)) {
                (Ok(from), Ok(to)) => (from, to),
                (Err(e), _) => {
                    failures.push(fail(format!("from: {e}")));
                    continue;
                }
                (_, Err(e)) => {
                    failures.push(fail(format!("to: {e}")));
                    continue;
                }
            };
            match (
                first_allowing(&self.rules, map, &from, &to, t.port),
                t.allow,
            ) {
                (Some(_), true) | (None, false) => {}
                (None, true) => failures.push(fail(format!(
                    "expected allow, denied: no rule allows {} from {} to {}",
                    t.port,
                    describe(map, &from),
                    describe(map, &to)
                ))),
                (Some(i), false) => failures.push(fail(format!(
                    "expected deny, allowed by the rule at line {}",
                    self.rules[i].line
                ))),
            }
        }
        failures
    }
}

/// What a node is or may hold: itself and every workload whose holder, previous holder or
/// candidate it is.
struct Holdings<'a> {
    node: Option<&'a PeerInfo>,
    workloads: Vec<&'a WorkloadInfo>,
}

impl<'a> Holdings<'a> {
    fn of(map: &'a Netmap, id: NodeId) -> Holdings<'a> {
        Holdings {
            node: map.peers.get(&id),
            workloads: map.workloads.values().filter(|w| may_hold(w, id)).collect(),
        }
    }

    /// Whether one of `selectors` matches something here.
    fn meets(&self, selectors: &[Selector]) -> bool {
        selectors.iter().any(|s| {
            self.node.is_some_and(|p| selects_node(s, p))
                || self.workloads.iter().any(|w| selects_workload(s, w))
        })
    }
}

/// Whether node `id` holds, held or may hold `w`.
fn may_hold(w: &WorkloadInfo, id: NodeId) -> bool {
    w.holder == Some(id) || w.previous == Some(id) || w.candidates.contains(&id)
}

/// The nodes that hold, held or may hold `w`.
fn holders(w: &WorkloadInfo) -> impl Iterator<Item = NodeId> + '_ {
    w.holder
        .into_iter()
        .chain(w.previous)
        .chain(w.candidates.iter().copied())
}

/// Whether nodes `a` and `b` may ever exchange packets: with no policy, always; otherwise when
/// both may hold one workload (a move between them has the old holder forward what peers
/// still send it, and the new one accept it: the relayed packets' own flows are judged by the
/// rules at the new holder), or when some rule (with at least one port) allows a flow, either
/// way, between something `a` is or may hold and something `b` is or may hold.
pub fn may_talk(policy: Option<&Policy>, map: &Netmap, a: NodeId, b: NodeId) -> bool {
    let Some(policy) = policy else {
        return true;
    };
    let a = Holdings::of(map, a);
    let b = Holdings::of(map, b);
    if a.workloads
        .iter()
        .any(|w| b.workloads.iter().any(|v| v.name == w.name))
    {
        return true;
    }
    policy.rules.iter().any(|r| {
        !r.ports.is_empty()
            && ((a.meets(&r.from) && b.meets(&r.to)) || (b.meets(&r.from) && a.meets(&r.to)))
    })
}

/// The indices of the rules of `policy` that concern node `me` of `map`: those with a selector,
/// on either side, that matches something `me` is or may hold. They are all a node needs:
/// its table ([`super::NodeTable`]) and the reverse one, and [`visible_peers`], give the same
/// answers from these rules as from the whole policy, so the coordinator sends each node only
/// these (need to know, for rules too). A gateway also gets those of the external nodes it
/// serves: it judges the flows to them and forwards for them.
pub fn relevant_rules(policy: &Policy, map: &Netmap, me: NodeId) -> Vec<usize> {
    let mine: Vec<Holdings<'_>> = std::iter::once(me)
        .chain(map.externals_via(me).map(|x| x.node_id))
        .map(|id| Holdings::of(map, id))
        .collect();
    policy
        .rules
        .iter()
        .enumerate()
        .filter(|(_, r)| mine.iter().any(|h| h.meets(&r.from) || h.meets(&r.to)))
        .map(|(i, _)| i)
        .collect()
}

/// The peers node `me` may ever exchange packets with ([`may_talk`]): every other node of
/// `map` when there is no policy.
///
/// Cost: one pass over the map to index nodes by name and tag and workloads by tag, then per
/// rule a test of its selectors against what `me` is or may hold; the selectors on the other
/// side of a rule that concerns `me` are expanded to nodes once each, however many rules
/// repeat them. Never a check per pair of nodes per rule.
///
/// External nodes ([`crate::PeerInfo::via`]) bend this: a gateway sees the external nodes it
/// serves and everyone they may talk to (it forwards their packets), an external node sees
/// its gateway, and whoever sees an external node sees its gateway too (it routes the node's
/// addresses there). The relation stays symmetric, which the coordinator's incremental cuts
/// rely on.
pub fn visible_peers(policy: Option<&Policy>, map: &Netmap, me: NodeId) -> BTreeSet<NodeId> {
    let mut seen = visible_directly(policy, map, me);
    Externals::of(map).add_gateways(policy, map, me, &mut seen);
    seen
}

/// The external nodes of a map by gateway, indexed once for many [`Externals::add_gateways`].
#[derive(Debug, Default)]
pub struct Externals {
    by_gateway: std::collections::HashMap<NodeId, Vec<NodeId>>,
}

impl Externals {
    /// Indexes `map`'s external nodes.
    pub fn of(map: &Netmap) -> Externals {
        let mut by_gateway: std::collections::HashMap<NodeId, Vec<NodeId>> = Default::default();
        for p in map.peers.values() {
            if let Some(g) = p.via {
                by_gateway.entry(g).or_default().push(p.node_id);
            }
        }
        Externals { by_gateway }
    }

    /// Whether the map has none.
    pub fn is_empty(&self) -> bool {
        self.by_gateway.is_empty()
    }

    /// Whether node `id` is a gateway or an external node: what it sees depends on more than
    /// its own kind.
    pub fn involves(&self, map: &Netmap, id: NodeId) -> bool {
        self.by_gateway.contains_key(&id) || map.peers.get(&id).is_some_and(|p| p.via.is_some())
    }

    /// Adds to `seen`, what node `me` sees directly ([`visible_directly`]), what external
    /// nodes make it see (see [`visible_peers`]).
    pub fn add_gateways(
        &self,
        policy: Option<&Policy>,
        map: &Netmap,
        me: NodeId,
        seen: &mut BTreeSet<NodeId>,
    ) {
        if self.is_empty() {
            return;
        }
        for &x in self.by_gateway.get(&me).into_iter().flatten() {
            seen.insert(x);
            seen.extend(visible_directly(policy, map, x));
        }
        let gateways: Vec<NodeId> = seen
            .iter()
            .chain(std::iter::once(&me))
            .filter_map(|id| map.peers.get(id)?.via)
            .collect();
        seen.extend(gateways);
        seen.remove(&me);
    }
}

/// The peers node `me` may exchange packets with itself ([`may_talk`]), without what
/// external nodes add ([`visible_peers`]).
pub fn visible_directly(policy: Option<&Policy>, map: &Netmap, me: NodeId) -> BTreeSet<NodeId> {
    let everyone = || map.peers.keys().copied().filter(|&id| id != me).collect();
    let Some(policy) = policy else {
        return everyone();
    };
    let mine = Holdings::of(map, me);
    let mut reach = Reach::new(map);
    // Whoever may hold a workload `me` may hold: a move between them relays through them.
    for w in &mine.workloads {
        reach.mark_holders(w);
    }
    for r in &policy.rules {
        if r.ports.is_empty() {
            continue;
        }
        if mine.meets(&r.from) {
            r.to.iter().for_each(|s| reach.add(s));
        }
        if mine.meets(&r.to) {
            r.from.iter().for_each(|s| reach.add(s));
        }
        if reach.all {
            return everyone();
        }
    }
    reach
        .marked
        .iter()
        .zip(map.peers.keys())
        .filter(|&(&m, &id)| m && id != me)
        .map(|(_, &id)| id)
        .collect()
}

/// The nodes that are, or may hold, something a set of selectors matches; built up one
/// selector at a time.
struct Reach<'a> {
    index: Index<'a>,
    /// Position of each node in `map.peers`.
    position: HashMap<NodeId, usize>,
    /// Selectors already added.
    done: HashSet<&'a Selector>,
    /// Whether `Any` was added: every node is reached.
    all: bool,
    /// Reached nodes, by position.
    marked: Vec<bool>,
}

impl<'a> Reach<'a> {
    fn new(map: &'a Netmap) -> Reach<'a> {
        Reach {
            index: Index::new(map),
            position: map
                .peers
                .keys()
                .enumerate()
                .map(|(i, &id)| (id, i))
                .collect(),
            done: HashSet::new(),
            all: false,
            marked: vec![false; map.peers.len()],
        }
    }

    fn add(&mut self, selector: &'a Selector) {
        if self.all || !self.done.insert(selector) {
            return;
        }
        if *selector == Selector::Any {
            self.all = true;
            return;
        }
        for p in self.index.nodes(selector) {
            self.marked[self.position[&p.node_id]] = true;
        }
        for w in self.index.workloads(selector) {
            self.mark_holders(w);
        }
    }

    /// Marks every node that holds, held or may hold `w`.
    fn mark_holders(&mut self, w: &WorkloadInfo) {
        for id in holders(w) {
            if let Some(&i) = self.position.get(&id) {
                self.marked[i] = true;
            }
        }
    }
}

/// A map's nodes and workloads indexed by name and tag, to find what a selector matches
/// without a pass over the map per selector.
pub(super) struct Index<'a> {
    map: &'a Netmap,
    node_by_name: HashMap<&'a str, &'a PeerInfo>,
    nodes_by_tag: HashMap<&'a str, Vec<&'a PeerInfo>>,
    workloads_by_tag: HashMap<&'a str, Vec<&'a WorkloadInfo>>,
}

impl<'a> Index<'a> {
    pub(super) fn new(map: &'a Netmap) -> Index<'a> {
        let mut index = Index {
            map,
            node_by_name: HashMap::with_capacity(map.peers.len()),
            nodes_by_tag: HashMap::new(),
            workloads_by_tag: HashMap::new(),
        };
        for p in map.peers.values() {
            index.node_by_name.insert(&p.name, p);
            for t in &p.tags {
                index.nodes_by_tag.entry(t).or_default().push(p);
            }
        }
        for w in map.workloads.values() {
            for t in &w.tags {
                index.workloads_by_tag.entry(t).or_default().push(w);
            }
        }
        index
    }

    /// Whether `selector` matches some node or workload ([`Selector::names_anyone`]).
    fn names_anyone(&self, selector: &Selector) -> bool {
        match selector {
            Selector::Any => !self.map.peers.is_empty() || !self.map.workloads.is_empty(),
            Selector::Tag(t) => {
                self.nodes_by_tag.contains_key(t.as_str())
                    || self.workloads_by_tag.contains_key(t.as_str())
            }
            Selector::Node(n) => self.node_by_name.contains_key(n.as_str()),
            Selector::Workload(n) => self.map.workloads.contains_key(n),
        }
    }

    /// The nodes `selector` matches (a node twice if it carries a tag twice).
    pub(super) fn nodes(&self, selector: &Selector) -> Vec<&'a PeerInfo> {
        match selector {
            Selector::Any => self.map.peers.values().collect(),
            Selector::Tag(t) => self
                .nodes_by_tag
                .get(t.as_str())
                .cloned()
                .unwrap_or_default(),
            Selector::Node(n) => self
                .node_by_name
                .get(n.as_str())
                .copied()
                .into_iter()
                .collect(),
            Selector::Workload(_) => Vec::new(),
        }
    }

    /// The workloads `selector` matches (a workload twice if it carries a tag twice).
    pub(super) fn workloads(&self, selector: &Selector) -> Vec<&'a WorkloadInfo> {
        match selector {
            Selector::Any => self.map.workloads.values().collect(),
            Selector::Tag(t) => self
                .workloads_by_tag
                .get(t.as_str())
                .cloned()
                .unwrap_or_default(),
            Selector::Workload(n) => self.map.workloads.get(n).into_iter().collect(),
            Selector::Node(_) => Vec::new(),
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::{ip_proto, parse, Ports};
    use super::*;
    use crate::key::PublicKey;
    use crate::policy::testkit::Lcg;
    use ipnet::IpNet;

    pub(in crate::policy) fn node(id: NodeId, name: &str, tags: &[&str]) -> PeerInfo {
        PeerInfo {
            node_id: id,
            name: name.to_string(),
            public_key: PublicKey([u8::try_from(id % 251).unwrap(); 32]),
            next_key: None,
            addresses: vec![format!("100.64.0.{id}/32").parse().unwrap()],
            allowed_ips: Vec::new(),
            endpoints: Vec::new(),
            labels: Default::default(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            via: None,
        }
    }

    pub(in crate::policy) fn workload(
        name: &str,
        last_octet: u8,
        holder: Option<NodeId>,
        tags: &[&str],
    ) -> WorkloadInfo {
        WorkloadInfo {
            id: u64::from(last_octet),
            name: name.to_string(),
            address: format!("100.96.0.{last_octet}/32")
                .parse::<IpNet>()
                .unwrap(),
            holder,
            generation: 1,
            previous: None,
            candidates: holder.into_iter().collect(),
            grace_ms: None,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            address6: None,
        }
    }

    pub(in crate::policy) fn map_of(peers: Vec<PeerInfo>, workloads: Vec<WorkloadInfo>) -> Netmap {
        Netmap {
            version: 1,
            peers: peers.into_iter().map(|p| (p.node_id, p)).collect(),
            workloads: workloads.into_iter().map(|w| (w.name.clone(), w)).collect(),
            policy: None,
        }
    }

    /// vm-a (web), vm-b (db), vm-c (untagged), chat (tag app) held by vm-b, a node and a
    /// workload both named `both`.
    fn sample() -> Netmap {
        map_of(
            vec![
                node(1, "vm-a", &["web"]),
                node(2, "vm-b", &["db"]),
                node(3, "vm-c", &[]),
                node(4, "both", &[]),
            ],
            vec![
                workload("chat", 1, Some(2), &["app"]),
                workload("both", 2, None, &[]),
            ],
        )
    }

    fn tcp(port: u16) -> FlowPort {
        FlowPort {
            proto: ip_proto::TCP,
            port,
        }
    }

    const POLICY: &str = r#"
[[rule]]
from = ["tag:web"]
to = ["tag:db"]
ports = ["tcp:5432"]

[[rule]]
from = ["node:vm-a", "tag:db"]
to = ["workload:chat"]
ports = ["tcp:7000-7100", "icmp"]

[[rule]]
from = ["*"]
to = ["tag:app"]
ports = ["tcp:7070"]
"#;

    #[test]
    fn check_names_the_first_allowing_rule() {
        let map = sample();
        let p = parse(POLICY).unwrap().into_policy(1);
        let a = Entity::Node(1);
        let b = Entity::Node(2);
        let c = Entity::Node(3);
        let chat = Entity::Workload("chat".into());
        assert_eq!(p.check(&map, &a, &b, tcp(5432)).rule, Some(0));
        assert_eq!(
            p.check(&map, &b, &a, tcp(5432)).rule,
            None,
            "rules have a direction"
        );
        assert_eq!(p.check(&map, &a, &b, tcp(5433)).rule, None);
        assert_eq!(p.check(&map, &a, &chat, tcp(7070)).rule, Some(1));
        assert_eq!(p.check(&map, &c, &chat, tcp(7070)).rule, Some(2));
        assert_eq!(p.check(&map, &c, &chat, tcp(7071)).rule, None);
        let icmp = FlowPort {
            proto: ip_proto::ICMP,
            port: 0,
        };
        assert_eq!(p.check(&map, &b, &chat, icmp).rule, Some(1));
        assert_eq!(
            p.check(&map, &Entity::Node(99), &chat, tcp(7070)).rule,
            None
        );
        let ghost = Entity::Workload("ghost".into());
        assert_eq!(p.check(&map, &a, &ghost, tcp(7070)).rule, None);
        let empty = Policy {
            version: 2,
            rules: vec![Rule {
                line: 1,
                from: vec![Selector::Any],
                to: vec![Selector::Any],
                ports: vec![],
            }],
        };
        assert_eq!(empty.check(&map, &a, &b, tcp(1)).rule, None);
        let wide = Policy {
            version: 3,
            rules: vec![Rule {
                line: 1,
                from: vec![Selector::Node("nobody".into())],
                to: vec![Selector::Any],
                ports: vec![Ports::Any],
            }],
        };
        assert_eq!(wide.check(&map, &a, &b, tcp(1)).rule, None);
    }

    #[test]
    fn resolve_names_and_refuses_ambiguity() {
        let map = sample();
        assert_eq!(Entity::resolve(&map, "vm-a"), Ok(Entity::Node(1)));
        assert_eq!(Entity::resolve(&map, "node:vm-a"), Ok(Entity::Node(1)));
        assert_eq!(
            Entity::resolve(&map, "chat"),
            Ok(Entity::Workload("chat".into()))
        );
        assert!(Entity::resolve(&map, "node:chat").is_err());
        let e = Entity::resolve(&map, "both").unwrap_err();
        assert!(e.contains("write node:both or workload:both"), "{e}");
        assert_eq!(Entity::resolve(&map, "node:both"), Ok(Entity::Node(4)));
        assert_eq!(
            Entity::resolve(&map, "workload:both"),
            Ok(Entity::Workload("both".into()))
        );
        let e = Entity::resolve(&map, "nobody").unwrap_err();
        assert!(e.contains("no node or workload named"), "{e}");
        assert!(Entity::resolve(&map, "tag:web").is_err());
    }

    #[test]
    fn run_tests_reports_failures_with_their_lines() {
        let map = sample();
        let text = format!(
            "{POLICY}
[[test]]
from = \"vm-a\"
to = \"chat\"
port = \"tcp:7070\"
expect = \"allow\"

[[test]]
from = \"vm-c\"
to = \"chat\"
port = \"tcp:7071\"
expect = \"allow\"

[[test]]
from = \"vm-c\"
to = \"chat\"
port = \"tcp:7070\"
expect = \"deny\"

[[test]]
from = \"both\"
to = \"chat\"
port = \"tcp:7070\"
expect = \"deny\"

[[test]]
from = \"vm-a\"
to = \"ghost\"
port = \"icmp\"
expect = \"deny\"
"
        );
        let f = parse(&text).unwrap();
        let failures = f.run_tests(&map);
        let lines: Vec<u32> = failures.iter().map(|f| f.line).collect();
        assert_eq!(lines, vec![23, 29, 35, 41], "{failures:?}");
        assert_eq!(
            failures[0].message,
            "expected allow, denied: no rule allows tcp:7071 from node:vm-c to workload:chat"
        );
        assert_eq!(
            failures[1].message,
            "expected deny, allowed by the rule at line 12"
        );
        assert!(
            failures[2].message.contains("write node:both"),
            "{failures:?}"
        );
        assert!(
            failures[3].message.starts_with("to: no node or workload"),
            "{failures:?}"
        );
    }

    #[test]
    fn may_talk_counts_held_previous_and_candidate_workloads() {
        // vm-a may talk to whoever holds chat; vm-b holds it, vm-c is a candidate, vm-d held
        // it before; nobody talks to vm-e.
        let mut chat = workload("chat", 1, Some(2), &[]);
        chat.candidates = vec![2, 3];
        chat.previous = Some(4);
        let map = map_of(
            vec![
                node(1, "vm-a", &["web"]),
                node(2, "vm-b", &[]),
                node(3, "vm-c", &[]),
                node(4, "vm-d", &[]),
                node(5, "vm-e", &[]),
            ],
            vec![chat],
        );
        let p = parse(
            "[[rule]]\nfrom = [\"tag:web\"]\nto = [\"workload:chat\"]\nports = [\"tcp:1\"]\n",
        )
        .unwrap()
        .into_policy(1);
        for other in [2, 3, 4] {
            assert!(may_talk(Some(&p), &map, 1, other), "{other}");
            assert!(may_talk(Some(&p), &map, other, 1), "either way: {other}");
        }
        assert!(!may_talk(Some(&p), &map, 1, 5));
        // Nodes that may hold one workload are peers whatever the rules: a move between them
        // has the old holder forward to the new one.
        assert!(may_talk(Some(&p), &map, 2, 3), "fellow holders are peers");
        assert!(may_talk(Some(&p), &map, 4, 2), "and the previous holder");
        assert!(may_talk(None, &map, 2, 3));
        assert_eq!(visible_peers(Some(&p), &map, 1), BTreeSet::from([2, 3, 4]));
        assert_eq!(visible_peers(Some(&p), &map, 3), BTreeSet::from([1, 2, 4]));
        assert_eq!(visible_peers(Some(&p), &map, 5), BTreeSet::new());
        assert_eq!(visible_peers(None, &map, 5), BTreeSet::from([1, 2, 3, 4]));
        let open = parse("[[rule]]\nfrom = [\"node:vm-e\"]\nto = [\"*\"]\nports = [\"icmp\"]\n")
            .unwrap()
            .into_policy(2);
        assert_eq!(
            visible_peers(Some(&open), &map, 5),
            BTreeSet::from([1, 2, 3, 4])
        );
        assert_eq!(visible_peers(Some(&open), &map, 1), BTreeSet::from([5]));
    }

    pub(in crate::policy) const TAGS: [&str; 4] = ["web", "db", "app", "ops"];

    /// A random map: nodes `n0..`, some with a routed /24 besides their address and an IPv6
    /// address; workloads `w0..` with holders, previous holders and candidates among the
    /// nodes (and sometimes a node id absent from the map). Addresses never overlap.
    pub(in crate::policy) fn random_map(g: &mut Lcg) -> Netmap {
        let nodes = 1 + g.below(8);
        let mut peers = Vec::new();
        for i in 0..nodes {
            let id = 10 + i as u64;
            let tags: Vec<&str> = TAGS.iter().copied().filter(|_| g.chance(30)).collect();
            let mut p = node(id, &format!("n{i}"), &tags);
            p.addresses = vec![format!("10.0.{i}.1/32").parse().unwrap()];
            if g.chance(40) {
                p.addresses
                    .push(format!("fd00::{i}:1/128").parse().unwrap());
            }
            if g.chance(30) {
                p.allowed_ips = p.addresses.clone();
                p.allowed_ips
                    .push(format!("10.1.{i}.0/24").parse().unwrap());
            }
            peers.push(p);
        }
        let mut workloads = Vec::new();
        for i in 0..g.below(5) {
            let pick = |g: &mut Lcg| 10 + g.below(nodes + 1) as u64;
            let tags: Vec<&str> = TAGS.iter().copied().filter(|_| g.chance(30)).collect();
            let holder = g.chance(70).then(|| pick(g));
            let mut w = workload(&format!("w{i}"), i as u8 + 1, holder, &tags);
            w.previous = g.chance(30).then(|| pick(g));
            w.candidates = (0..g.below(3)).map(|_| pick(g)).collect();
            if g.chance(30) {
                w.address = format!("fd01::{i}/128").parse().unwrap();
            }
            workloads.push(w);
        }
        map_of(peers, workloads)
    }

    pub(in crate::policy) fn random_selector(g: &mut Lcg, map: &Netmap) -> Selector {
        match g.below(9) {
            0 => Selector::Any,
            1..=3 => Selector::Tag(TAGS[g.below(TAGS.len())].to_string()),
            4..=5 => Selector::Node(format!("n{}", g.below(map.peers.len() + 1))),
            _ => Selector::Workload(format!("w{}", g.below(map.workloads.len() + 1))),
        }
    }

    pub(in crate::policy) fn random_ports(g: &mut Lcg) -> Ports {
        match g.below(6) {
            0 => Ports::Any,
            1 => Ports::Icmp,
            2 | 3 => {
                let a = g.below(4) as u16 * 10;
                Ports::Tcp(a, a + g.below(15) as u16)
            }
            _ => {
                let a = g.below(4) as u16 * 10;
                Ports::Udp(a, a + g.below(15) as u16)
            }
        }
    }

    pub(in crate::policy) fn random_policy(g: &mut Lcg, map: &Netmap) -> Policy {
        let rules = (0..g.below(7))
            .map(|i| Rule {
                line: 1 + i as u32 * 5,
                from: (0..1 + g.below(3))
                    .map(|_| random_selector(g, map))
                    .collect(),
                to: (0..1 + g.below(3))
                    .map(|_| random_selector(g, map))
                    .collect(),
                ports: (0..g.below(4)).map(|_| random_ports(g)).collect(),
            })
            .collect();
        Policy { version: 1, rules }
    }

    /// `may_talk` by brute force from `Policy::check`: some rule's first port, between
    /// anything either node is or may hold, either way.
    fn may_talk_by_check(policy: &Policy, map: &Netmap, a: NodeId, b: NodeId) -> bool {
        let parties = |n: NodeId| {
            let mut v: Vec<Entity> = map
                .peers
                .contains_key(&n)
                .then_some(Entity::Node(n))
                .into_iter()
                .collect();
            v.extend(
                map.workloads
                    .values()
                    .filter(|w| {
                        w.holder == Some(n) || w.previous == Some(n) || w.candidates.contains(&n)
                    })
                    .map(|w| Entity::Workload(w.name.clone())),
            );
            v
        };
        let ports: Vec<FlowPort> = policy
            .rules
            .iter()
            .flat_map(|r| &r.ports)
            .map(|p| match *p {
                Ports::Any | Ports::Tcp(..) => tcp(match *p {
                    Ports::Tcp(lo, _) => lo,
                    _ => 0,
                }),
                Ports::Icmp => FlowPort {
                    proto: ip_proto::ICMP,
                    port: 0,
                },
                Ports::Udp(lo, _) => FlowPort {
                    proto: ip_proto::UDP,
                    port: lo,
                },
            })
            .collect();
        let (pa, pb) = (parties(a), parties(b));
        let shared = pa
            .iter()
            .any(|x| matches!(x, Entity::Workload(_)) && pb.contains(x));
        shared
            || pa.iter().any(|x| {
                pb.iter().any(|y| {
                    ports.iter().any(|&port| {
                        policy.check(map, x, y, port).rule.is_some()
                            || policy.check(map, y, x, port).rule.is_some()
                    })
                })
            })
    }

    #[test]
    fn a_gateway_sees_what_its_external_nodes_see_and_they_bring_it_along() {
        // phone (external, via gw) may reach db; web may reach gw. Nobody else talks.
        let mut phone = node(4, "phone", &["phone"]);
        phone.via = Some(2);
        let map = map_of(
            vec![
                node(1, "web", &["web"]),
                node(2, "gw", &["gw"]),
                node(3, "db", &["db"]),
                phone,
                node(5, "other", &[]),
            ],
            vec![],
        );
        let p = parse(
            "[[rule]]\nfrom = [\"tag:phone\"]\nto = [\"tag:db\"]\nports = [\"tcp:5432\"]\n\n\
             [[rule]]\nfrom = [\"tag:web\"]\nto = [\"tag:gw\"]\nports = [\"tcp:22\"]\n",
        )
        .unwrap()
        .into_policy(1);
        let seen = |me| {
            visible_peers(Some(&p), &map, me)
                .into_iter()
                .collect::<Vec<_>>()
        };
        // The gateway: web (its own rule), db (the phone's), the phone itself.
        assert_eq!(seen(2), vec![1, 3, 4]);
        // db sees the phone, and its gateway to route it through.
        assert_eq!(seen(3), vec![2, 4]);
        assert_eq!(
            visible_directly(Some(&p), &map, 3)
                .into_iter()
                .collect::<Vec<_>>(),
            vec![4]
        );
        // web sees the gateway for itself, not the phone.
        assert_eq!(seen(1), vec![2]);
        assert!(seen(5).is_empty());
        // Without a policy everyone sees everyone.
        assert_eq!(visible_peers(None, &map, 5).len(), 4);
    }

    #[test]
    fn visible_peers_agrees_with_may_talk_and_check() {
        let mut g = Lcg(0x5eed);
        let mut talking = 0;
        for _ in 0..2_000 {
            let map = random_map(&mut g);
            let policy = random_policy(&mut g, &map);
            for &me in map.peers.keys() {
                let seen = visible_peers(Some(&policy), &map, me);
                for &other in map.peers.keys() {
                    let talk = may_talk(Some(&policy), &map, me, other);
                    assert_eq!(
                        talk,
                        may_talk_by_check(&policy, &map, me, other),
                        "may_talk({me}, {other}) in {map:?} under {policy:?}"
                    );
                    if other != me {
                        assert_eq!(
                            seen.contains(&other),
                            talk,
                            "visible_peers({me}) = {seen:?} but may_talk({other}) = {talk}, \
                             {map:?} under {policy:?}"
                        );
                        talking += usize::from(talk);
                    }
                }
                assert!(!seen.contains(&me));
            }
        }
        assert!(
            talking > 1_000,
            "the generator should produce talking pairs: {talking}"
        );
    }

    #[test]
    fn unmatched_selectors_are_those_that_name_nobody() {
        let mut g = Lcg(0x0dd);
        let (mut named, mut unnamed) = (0, 0);
        for _ in 0..500 {
            let map = random_map(&mut g);
            let policy = random_policy(&mut g, &map);
            let got: Vec<(u32, &Selector)> = unmatched_selectors(&policy.rules, &map)
                .into_iter()
                .map(|(r, s)| (r.line, s))
                .collect();
            let want: Vec<(u32, &Selector)> = policy
                .rules
                .iter()
                .flat_map(|r| r.from.iter().chain(&r.to).map(move |s| (r.line, s)))
                .filter(|(_, s)| !s.names_anyone(&map))
                .collect();
            assert_eq!(got, want, "{map:?} under {policy:?}");
            unnamed += want.len();
            named += policy
                .rules
                .iter()
                .map(|r| r.from.len() + r.to.len())
                .sum::<usize>()
                - want.len();
        }
        assert!(named > 100 && unnamed > 100, "{named} named, {unnamed} not");
    }
}
