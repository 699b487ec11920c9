//! Need to know: which peers each session's node may see while its network has a policy, and
//! which peers each change then upserts or removes for each session. Pure: maps and deltas in,
//! sets and selections out; the hub queues the bytes.
//!
//! With a policy ([`Netmap::policy`]), a node's map holds itself, the peers
//! [`visible_peers`] gives it, every workload and every tag as they are (a workload entry
//! carries no key or endpoint, and an agent needs every workload's address to route and filter
//! it), and of the policy only the rules that concern the node ([`relevant_rules`]: those that
//! name something it is or may hold, which give its tables and its visible peers the same
//! answers as the whole policy; a node learns nothing of the others' rules, and a policy
//! change costs each node its own rules, not the whole file). The rules that concern a node
//! change only with the policy or with what the node is, exactly when its set is computed
//! again, and are sent then. Without a policy, every peer.
//!
//! Both a node's visible peers and its rules depend only on its *kind* (what it is and may
//! hold, as the policy can tell it: [`Kind`]), so each is computed once per kind of node, not
//! once per node: with a thousand nodes of one kind, a policy change costs one pass over the
//! rules, not a thousand. Distinct rule subsets are numbered in a [`Change`], so that the hub
//! keys its encodings by a number, not by the list.
//!
//! Why a change is cheap to follow: visibility is symmetric (`b` is among `a`'s visible peers
//! iff `a` is among `b`'s: [`meshlink_proto::policy::may_talk`] looks both ways), and whether
//! two nodes see each other depends only on the policy and on what each of them *is* (its name
//! and tags) or *may hold* (the name and tags of every workload naming it holder, previous
//! holder or candidate). So a change that touches neither for any node alters no pair (an
//! endpoint change: filtering by set lookup), and a change that touches them for some nodes
//! (a join, tags, a workload's holders) alters only pairs with one of those: their sets are
//! computed again, and every other session's membership of them is read off those sets. Only
//! a policy set or cleared computes every session's set again.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use meshlink_proto::policy::{
    relevant_rules, visible_directly, visible_peers, Externals, Selector,
};
use meshlink_proto::Policy;
use meshlink_proto::{Netmap, NetmapDelta, NodeId, WorkloadInfo};

/// Indices of the rules of a map's policy that concern a node, shared by nodes of a kind.
pub(super) type Rules = Arc<[usize]>;

/// The peers a session's node sees: `None` while its network has no policy (every peer).
pub(super) type Visible = Option<BTreeSet<NodeId>>;

/// The peers `me` sees in `map`: `None` (every peer) when the map has no policy.
pub(super) fn visible(map: &Netmap, me: NodeId) -> Visible {
    map.policy.as_ref().map(|p| visible_peers(Some(p), map, me))
}

/// The visible peers of each of `nodes` in `map`; empty when `map` has no policy.
///
/// Computed once per kind of node (then external nodes' gateways added per node, see
/// [`visible_peers`]): `visible_directly` reads of `me` only what it is and may hold
/// (its tags, its name where a `node:` selector names it, the workloads it may hold). Nodes of
/// one kind may talk with the same nodes R, themselves included or not, and each sees R but
/// itself. So from `a`'s set `R \ {a}`, another `b` of its kind sees `R \ {b}`, where `a` is
/// in R iff `b` is in `a`'s set (`b` in R means its kind, `a`'s, is).
pub(super) fn visible_each(map: &Netmap, nodes: &[NodeId]) -> HashMap<NodeId, BTreeSet<NodeId>> {
    let Some(policy) = &map.policy else {
        return HashMap::new();
    };
    let kinds = Kinds::new(map, policy);
    let mut seen: HashMap<Kind<'_>, (NodeId, BTreeSet<NodeId>)> = HashMap::new();
    let mut out = HashMap::with_capacity(nodes.len());
    for &me in nodes {
        let Some(kind) = kinds.of(map, me) else {
            out.insert(me, visible_peers(Some(policy), map, me));
            continue;
        };
        let mut set = match seen.get(&kind) {
            Some((a, theirs)) => {
                let mut set = theirs.clone();
                if set.remove(&me) {
                    set.insert(*a);
                }
                set
            }
            None => {
                let set = visible_directly(Some(policy), map, me);
                seen.insert(kind, (me, set.clone()));
                set
            }
        };
        // Per node, not per kind: whoever sees an external node sees its gateway.
        kinds
            .externals
            .add_gateways(Some(policy), map, me, &mut set);
        out.insert(me, set);
    }
    out
}

/// The rules of `map`'s policy that concern each of `nodes` ([`relevant_rules`]), computed
/// once per kind and shared; empty when `map` has no policy.
pub(super) fn rules_each(map: &Netmap, nodes: &[NodeId]) -> HashMap<NodeId, Rules> {
    let Some(policy) = &map.policy else {
        return HashMap::new();
    };
    let mut by_kind = RulesByKind::new(map, policy);
    nodes
        .iter()
        .map(|&me| {
            let id = by_kind.of(me);
            (me, by_kind.subsets[id].clone())
        })
        .collect()
}

/// What of a map a policy can tell nodes apart by.
#[derive(Debug)]
struct Kinds<'a> {
    /// The names `node:` selectors name.
    named: HashSet<&'a str>,
    /// The workloads each node holds, held or may hold, by name, in name order.
    held: HashMap<NodeId, Vec<&'a str>>,
    /// The external nodes by gateway: a gateway or an external node sees more than its kind
    /// (and a gateway gets its devices' rules), so neither has a kind to share.
    externals: Externals,
}

impl<'a> Kinds<'a> {
    fn new(map: &'a Netmap, policy: &'a Policy) -> Self {
        let named = policy
            .rules
            .iter()
            .flat_map(|r| r.from.iter().chain(&r.to))
            .filter_map(|s| match s {
                Selector::Node(n) => Some(n.as_str()),
                _ => None,
            })
            .collect();
        let mut held: HashMap<NodeId, Vec<&str>> = HashMap::new();
        for w in map.workloads.values() {
            for id in may_hold(w) {
                // In name order: the workloads are.
                held.entry(id).or_default().push(&w.name);
            }
        }
        Kinds {
            named,
            held,
            externals: Externals::of(map),
        }
    }

    /// Node `me`'s kind; `None` when the map does not have it, or when `me` is a gateway or an
    /// external node (computed alone).
    fn of(&self, map: &'a Netmap, me: NodeId) -> Option<Kind<'a>> {
        if self.externals.involves(map, me) {
            return None;
        }
        let p = map.peers.get(&me)?;
        let mut tags: Vec<&str> = p.tags.iter().map(String::as_str).collect();
        tags.sort_unstable();
        tags.dedup();
        Some(Kind {
            tags,
            name: self
                .named
                .contains(p.name.as_str())
                .then_some(p.name.as_str()),
            held: self.held.get(&me).cloned().unwrap_or_default(),
        })
    }
}

/// The rules that concern nodes, computed once per kind ([`relevant_rules`] reads of a node
/// only what its kind holds) and numbered once per distinct subset.
#[derive(Debug)]
struct RulesByKind<'a> {
    map: &'a Netmap,
    policy: &'a Policy,
    kinds: Kinds<'a>,
    by_kind: HashMap<Kind<'a>, usize>,
    by_content: HashMap<Rules, usize>,
    /// The distinct subsets, by number.
    subsets: Vec<Rules>,
}

impl<'a> RulesByKind<'a> {
    fn new(map: &'a Netmap, policy: &'a Policy) -> Self {
        RulesByKind {
            map,
            policy,
            kinds: Kinds::new(map, policy),
            by_kind: HashMap::new(),
            by_content: HashMap::new(),
            subsets: Vec::new(),
        }
    }

    /// The number of the subset that concerns `me`.
    fn of(&mut self, me: NodeId) -> usize {
        let kind = self.kinds.of(self.map, me);
        if let Some(id) = kind.as_ref().and_then(|k| self.by_kind.get(k)) {
            return *id;
        }
        let rules: Rules = relevant_rules(self.policy, self.map, me).into();
        let id = match self.by_content.get(&rules) {
            Some(id) => *id,
            None => {
                let id = self.subsets.len();
                self.subsets.push(rules.clone());
                self.by_content.insert(rules, id);
                id
            }
        };
        if let Some(kind) = kind {
            self.by_kind.insert(kind, id);
        }
        id
    }
}

/// What a policy can tell of a node: nodes of one kind see the same peers but themselves.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Kind<'a> {
    /// Its tags, sorted.
    tags: Vec<&'a str>,
    /// Its name, when a `node:` selector names it.
    name: Option<&'a str>,
    /// The workloads it holds, held or may hold, by name.
    held: Vec<&'a str>,
}

/// `map` as node `me` may see it: itself and `visible` of its peers; every workload, tags,
/// and `policy`, the rules of the map's policy that concern it (see [`rules_each`]).
pub(super) fn map_for(
    map: &Netmap,
    me: NodeId,
    visible: &BTreeSet<NodeId>,
    policy: Option<&Policy>,
) -> Netmap {
    Netmap {
        version: map.version,
        peers: visible
            .iter()
            .chain(std::iter::once(&me))
            .filter_map(|id| Some((*id, map.peers.get(id)?.clone())))
            .collect(),
        workloads: map.workloads.clone(),
        policy: policy.cloned(),
    }
}

/// What one session gets of one change: the peers to upsert and to remove, by id. Sessions
/// with equal selections share one encoding.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub(super) struct Selection {
    /// Upserted peers: those of the delta it sees, then those it sees from now on.
    pub upsert: Vec<NodeId>,
    /// Removed peers: those of the delta it saw, then those it sees no longer.
    pub remove: Vec<NodeId>,
    /// The rules of the policy that concern the node, when they are to be sent (the policy
    /// was set, or the change touched what the node is): the number of the subset
    /// ([`Change::subset`]).
    pub rules: Option<usize>,
}

/// Which nodes' visibility a change can alter, judged before it is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Recompute {
    /// The policy is set or cleared: every node's.
    All,
    /// These nodes' only (what they are or may hold changed; new nodes), possibly none.
    Nodes(BTreeSet<NodeId>),
}

/// A change judged against the map before it: [`Pending::applied`] once the map has taken it.
#[derive(Debug)]
pub(super) struct Pending {
    recompute: Recompute,
    /// Every peer of the map before, when it had no policy (one is being set).
    before_all: BTreeSet<NodeId>,
}

/// Judges `delta` against `before`, the map it applies to.
pub(super) fn judge(before: &Netmap, delta: &NetmapDelta) -> Pending {
    let recompute = if delta.policy.is_some() {
        Recompute::All
    } else {
        Recompute::Nodes(touched(before, delta))
    };
    let before_all = match (&recompute, &before.policy) {
        (Recompute::All, None) => before.peers.keys().copied().collect(),
        _ => BTreeSet::new(),
    };
    Pending {
        recompute,
        before_all,
    }
}

/// The nodes whose name, tags or workloads held, held before or possibly held `delta`
/// changes in `before`; new nodes too.
fn touched(before: &Netmap, delta: &NetmapDelta) -> BTreeSet<NodeId> {
    let mut nodes = BTreeSet::new();
    for p in &delta.upsert {
        match before.peers.get(&p.node_id) {
            Some(old) if old.name == p.name && old.tags == p.tags => {}
            _ => {
                nodes.insert(p.node_id);
            }
        }
    }
    for w in &delta.upsert_workloads {
        let new = may_hold(w);
        match before.workloads.get(&w.name) {
            Some(old) if old.tags == w.tags => {
                nodes.extend(may_hold(old).symmetric_difference(&new));
            }
            Some(old) => {
                nodes.extend(may_hold(old));
                nodes.extend(new);
            }
            None => nodes.extend(new),
        }
    }
    for name in &delta.remove_workloads {
        if let Some(old) = before.workloads.get(name) {
            nodes.extend(may_hold(old));
        }
    }
    // An external node touched, added or removed changes what its gateway sees (its peers,
    // and the rules it is sent): the gateway, before and after, is computed again too.
    let via_before = |id: &NodeId| before.peers.get(id).and_then(|p| p.via);
    let mut gateways: Vec<NodeId> = nodes.iter().filter_map(via_before).collect();
    gateways.extend(delta.remove.iter().filter_map(via_before));
    gateways.extend(
        delta
            .upsert
            .iter()
            .filter(|p| nodes.contains(&p.node_id) || via_before(&p.node_id) != p.via)
            .filter_map(|p| p.via),
    );
    nodes.extend(gateways);
    nodes
}

/// The nodes that hold, held or may hold `w`: what a policy counts as the workload.
fn may_hold(w: &WorkloadInfo) -> BTreeSet<NodeId> {
    w.holder
        .into_iter()
        .chain(w.previous)
        .chain(w.candidates.iter().copied())
        .collect()
}

impl Pending {
    /// The change as `after` (the map that took `delta`) shows it, ready to select for each
    /// of `sessions` (by node). Computes the visible peers of the nodes it touched, or of
    /// every session's node when the policy changed.
    pub(super) fn applied<'a>(
        self,
        after: &'a Netmap,
        delta: &NetmapDelta,
        sessions: &[NodeId],
    ) -> Change<'a> {
        let recomputed = match &self.recompute {
            Recompute::Nodes(nodes) => {
                let present: Vec<NodeId> = nodes
                    .iter()
                    .copied()
                    .filter(|id| after.peers.contains_key(id))
                    .collect();
                visible_each(after, &present)
            }
            Recompute::All => visible_each(after, sessions),
        };
        let after_all = match (&self.recompute, &after.policy) {
            (Recompute::All, None) => after.peers.keys().copied().collect(),
            _ => BTreeSet::new(),
        };
        Change {
            after,
            rules: after.policy.as_ref().map(|p| RulesByKind::new(after, p)),
            all: self.recompute == Recompute::All,
            before_all: self.before_all,
            after_all,
            recomputed,
            upsert: delta.upsert.iter().map(|p| p.node_id).collect(),
            remove: delta.remove.clone(),
            gone: delta
                .remove
                .iter()
                .copied()
                .filter(|id| !after.peers.contains_key(id))
                .collect(),
        }
    }
}

/// A change applied to a network's map, from which each session's [`Selection`] is made.
#[derive(Debug)]
pub(super) struct Change<'a> {
    after: &'a Netmap,
    /// The rules that concern each kind of node, while there is a policy.
    rules: Option<RulesByKind<'a>>,
    /// Every session's set is computed again (the policy was set or cleared).
    all: bool,
    /// Every peer before, when there was no policy.
    before_all: BTreeSet<NodeId>,
    /// Every peer after, when there is no policy any more.
    after_all: BTreeSet<NodeId>,
    /// The visible peers, in `after`, of each node the change touched (or, when `all`, of
    /// each session's node), while there is a policy.
    recomputed: HashMap<NodeId, BTreeSet<NodeId>>,
    /// The delta's upserted peers, in its order.
    upsert: Vec<NodeId>,
    /// The delta's removed peers, in its order.
    remove: Vec<NodeId>,
    /// Removed peers the map no longer has.
    gone: Vec<NodeId>,
}

impl Change<'_> {
    /// The rules of subset `id` of a [`Selection`] (indices into the map's policy).
    ///
    /// # Panics
    /// When no selection of this change named `id`.
    pub(super) fn subset(&self, id: usize) -> &Rules {
        &self
            .rules
            .as_ref()
            .expect("a selection named a subset")
            .subsets[id]
    }

    /// Moves session `me`'s visible peers (`cached`) to the map after the change and says what
    /// of it the session gets.
    pub(super) fn select(&mut self, me: NodeId, cached: &mut Visible) -> Selection {
        // The rules that concern `me` change only with the policy or with what `me` is, and
        // then `me`'s set is computed again (all, or `me` among the touched nodes).
        let rules = match &mut self.rules {
            Some(by_kind) if self.all || self.recomputed.contains_key(&me) => Some(by_kind.of(me)),
            _ => None,
        };
        let old = cached.take();
        let (new, gained, lost) = if self.all {
            let new = match self.recomputed.remove(&me) {
                Some(set) => Some(set),
                None => visible(self.after, me),
            };
            let old_set = old.as_ref().unwrap_or(&self.before_all);
            let new_set = new.as_ref().unwrap_or(&self.after_all);
            let gained = new_set
                .difference(old_set)
                .copied()
                .filter(|&id| id != me)
                .collect();
            let lost = old_set
                .difference(new_set)
                .copied()
                .filter(|&id| id != me)
                .collect();
            (new, gained, lost)
        } else if let Some(set) = self.recomputed.get(&me) {
            let old_set = old.unwrap_or_else(|| self.assumed_before(me));
            let gained = set.difference(&old_set).copied().collect();
            let lost = old_set.difference(set).copied().collect();
            (Some(set.clone()), gained, lost)
        } else {
            let mut set = old.unwrap_or_else(|| self.assumed_before(me));
            let mut gained = Vec::new();
            let mut lost = Vec::new();
            for id in &self.gone {
                if set.remove(id) {
                    lost.push(*id);
                }
            }
            for (&id, theirs) in &self.recomputed {
                if theirs.contains(&me) {
                    if set.insert(id) {
                        gained.push(id);
                    }
                } else if set.remove(&id) {
                    lost.push(id);
                }
            }
            gained.sort_unstable();
            lost.sort_unstable();
            (Some(set), gained, lost)
        };
        let sees = |id: NodeId| id == me || new.as_ref().is_none_or(|s| s.contains(&id));
        let mut selection = Selection {
            rules,
            upsert: self.upsert.iter().copied().filter(|&id| sees(id)).collect(),
            remove: self
                .remove
                .iter()
                .copied()
                .filter(|&id| id == me || lost.binary_search(&id).is_ok())
                .collect(),
        };
        if !gained.is_empty() {
            let named: HashSet<NodeId> = self.upsert.iter().copied().collect();
            selection
                .upsert
                .extend(gained.into_iter().filter(|id| !named.contains(id)));
        }
        if !lost.is_empty() {
            let named: HashSet<NodeId> = self.remove.iter().copied().collect();
            selection
                .remove
                .extend(lost.into_iter().filter(|id| !named.contains(id)));
        }
        *cached = new;
        selection
    }

    /// A session's set when it has none although its network had a policy (never, as the hub
    /// keeps them): as if it saw every peer, so that what it may not see is removed.
    fn assumed_before(&self, me: NodeId) -> BTreeSet<NodeId> {
        self.after
            .peers
            .keys()
            .copied()
            .chain(self.gone.iter().copied())
            .filter(|&id| id != me)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use meshlink_proto::policy::parse;
    use meshlink_proto::{PeerInfo, PolicyChange, PublicKey};

    use super::*;

    fn node(id: NodeId, tags: &[&str]) -> PeerInfo {
        PeerInfo {
            node_id: id,
            name: format!("n{id}"),
            public_key: PublicKey([id as u8; 32]),
            next_key: None,
            addresses: vec![format!("100.64.0.{id}/32").parse().unwrap()],
            allowed_ips: vec![],
            endpoints: vec![],
            labels: BTreeMap::new(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            via: None,
        }
    }

    fn workload(name: &str, holder: Option<NodeId>, candidates: &[NodeId]) -> WorkloadInfo {
        WorkloadInfo {
            id: 1,
            name: name.into(),
            address: "100.64.0.200/32".parse().unwrap(),
            holder,
            generation: 1,
            previous: None,
            candidates: candidates.to_vec(),
            grace_ms: None,
            tags: Vec::new(),
            address6: None,
        }
    }

    /// web -> db; workload:chat talks to tag:client.
    const POLICY: &str = r#"
[[rule]]
from = ["tag:web"]
to = ["tag:db"]
ports = ["tcp:5432"]

[[rule]]
from = ["tag:client"]
to = ["workload:chat"]
ports = ["tcp:7070"]
"#;

    fn map() -> Netmap {
        let mut m = Netmap {
            version: 1,
            policy: Some(parse(POLICY).unwrap().into_policy(1)),
            ..Netmap::default()
        };
        for p in [
            node(1, &["web"]),
            node(2, &["db"]),
            node(3, &["client"]),
            node(4, &[]),
            node(5, &[]),
        ] {
            m.peers.insert(p.node_id, p);
        }
        m.workloads
            .insert("chat".into(), workload("chat", Some(4), &[4]));
        m
    }

    /// Applies `delta` to `map` and selects for sessions `ids` (their sets as `sets` holds
    /// them, updated), checking each set against a fresh computation.
    fn step(
        map: &mut Netmap,
        sets: &mut BTreeMap<NodeId, Visible>,
        mut delta: NetmapDelta,
    ) -> BTreeMap<NodeId, Selection> {
        delta.from_version = map.version;
        delta.to_version = map.version + 1;
        let pending = judge(map, &delta);
        map.apply(delta.clone()).unwrap();
        let ids: Vec<NodeId> = sets.keys().copied().collect();
        let mut change = pending.applied(map, &delta, &ids);
        let out = sets
            .iter_mut()
            .map(|(&id, set)| (id, change.select(id, set)))
            .collect();
        for (&id, set) in sets.iter().filter(|(id, _)| map.peers.contains_key(id)) {
            assert_eq!(*set, visible(map, id), "node {id}'s set after the change");
        }
        out
    }

    fn sets(map: &Netmap) -> BTreeMap<NodeId, Visible> {
        map.peers.keys().map(|&id| (id, visible(map, id))).collect()
    }

    #[test]
    fn a_map_holds_the_node_what_it_sees_and_every_workload() {
        let m = map();
        let v = visible(&m, 1).unwrap();
        assert_eq!(v, BTreeSet::from([2]));
        let whole = m.policy.as_ref().unwrap();
        let rules = rules_each(&m, &[1]);
        let mine = map_for(&m, 1, &v, Some(&whole.subset(&rules[&1])));
        assert_eq!(mine.peers.keys().copied().collect::<Vec<_>>(), [1, 2]);
        assert_eq!(mine.workloads, m.workloads);
        // Of the policy, only the rules that concern node 1 (tag web: the first rule).
        assert_eq!(mine.policy.as_ref().unwrap().rules, whole.rules[..1]);
        assert_eq!(mine.policy.as_ref().unwrap().version, whole.version);
        assert_eq!(visible(&m, 3).unwrap(), BTreeSet::from([4]));
        assert_eq!(visible(&m, 5).unwrap(), BTreeSet::new());
    }

    #[test]
    fn an_endpoint_change_reaches_only_those_who_see_it() {
        let mut m = map();
        let mut s = sets(&m);
        let mut moved = node(2, &["db"]);
        moved.endpoints = vec!["198.18.0.2:1".parse().unwrap()];
        let got = step(
            &mut m,
            &mut s,
            NetmapDelta {
                upsert: vec![moved],
                ..NetmapDelta::default()
            },
        );
        assert_eq!(got[&1].upsert, [2]);
        assert_eq!(got[&2].upsert, [2], "a node always gets itself");
        for id in [3, 4, 5] {
            assert_eq!(got[&id], Selection::default(), "node {id}");
        }
    }

    #[test]
    fn tags_bring_and_take_peers_both_ways() {
        let mut m = map();
        let mut s = sets(&m);
        // 5 becomes a db: web (1) sees it, and it sees web.
        let got = step(
            &mut m,
            &mut s,
            NetmapDelta {
                upsert: vec![node(5, &["db"])],
                ..NetmapDelta::default()
            },
        );
        assert_eq!(got[&1].upsert, [5]);
        assert_eq!(got[&5].upsert, [5, 1]);
        assert!(got[&3].upsert.is_empty() && got[&2].upsert.is_empty());
        // 1 stops being web: 2 and 5 lose it, it loses them.
        let got = step(
            &mut m,
            &mut s,
            NetmapDelta {
                upsert: vec![node(1, &[])],
                ..NetmapDelta::default()
            },
        );
        assert_eq!(
            (got[&2].upsert.clone(), got[&2].remove.clone()),
            (vec![], vec![1])
        );
        assert_eq!(got[&5].remove, [1]);
        assert_eq!(
            (got[&1].upsert.clone(), got[&1].remove.clone()),
            (vec![1], vec![2, 5])
        );
    }

    #[test]
    fn joins_removals_and_workload_moves_touch_only_their_nodes() {
        let mut m = map();
        let mut s = sets(&m);
        let got = step(
            &mut m,
            &mut s,
            NetmapDelta {
                upsert: vec![node(6, &["web"])],
                ..NetmapDelta::default()
            },
        );
        assert_eq!(got[&2].upsert, [6]);
        assert!(got[&1].upsert.is_empty() && got[&3].upsert.is_empty());
        // The removal reaches only those who saw it.
        let got = step(
            &mut m,
            &mut s,
            NetmapDelta {
                remove: vec![2],
                ..NetmapDelta::default()
            },
        );
        assert_eq!(got[&1].remove, [2]);
        assert!(got[&3].remove.is_empty() && got[&5].remove.is_empty());
        s.remove(&2);
        // chat moves to 5, not a candidate before: the client (3) gets 5, and keeps 4
        // (the previous holder) until the next move; 4 and 5, both chat's, see each other.
        let mut moved = workload("chat", Some(5), &[5]);
        moved.previous = Some(4);
        let got = step(
            &mut m,
            &mut s,
            NetmapDelta {
                upsert_workloads: vec![moved],
                ..NetmapDelta::default()
            },
        );
        assert_eq!(got[&3].upsert, [5]);
        assert_eq!(got[&4].upsert, [5]);
        assert_eq!(got[&5].upsert, [3, 4]);
        let got = step(
            &mut m,
            &mut s,
            NetmapDelta {
                upsert_workloads: vec![workload("chat", Some(5), &[5])],
                ..NetmapDelta::default()
            },
        );
        assert_eq!(got[&3].remove, [4]);
        assert_eq!(got[&4].remove, [3, 5]);
        assert_eq!(got[&5].remove, [4]);
    }

    #[test]
    fn an_external_node_brings_its_gateway_and_the_gateway_its_peers() {
        let mut m = map();
        m.policy = Some(
            parse(&format!(
                "{POLICY}\n[[rule]]\nfrom = [\"tag:web\"]\nto = [\"tag:phone\"]\nports = [\"tcp:22\"]\n"
            ))
            .unwrap()
            .into_policy(2),
        );
        let mut s = sets(&m);
        let phone = |tags: &[&str]| {
            let mut p = node(6, tags);
            p.via = Some(5);
            p
        };
        // The phone joins through 5: web (1) sees it and its gateway, 5 sees it and web.
        let got = step(
            &mut m,
            &mut s,
            NetmapDelta {
                upsert: vec![phone(&["phone"])],
                ..NetmapDelta::default()
            },
        );
        assert_eq!(got[&1].upsert, [6, 5]);
        assert_eq!(got[&5].upsert, [6, 1]);
        assert!(
            got[&5].rules.is_some(),
            "the gateway gets the phone's rules"
        );
        let rules = rules_each(&m, &[5]);
        assert!(
            rules[&5].contains(&2),
            "the phone's rule, for its gateway: {:?}",
            rules[&5]
        );
        for id in [2, 3, 4] {
            assert!(got[&id].upsert.is_empty(), "node {id}: {:?}", got[&id]);
        }
        s.insert(6, visible(&m, 6));
        assert_eq!(visible(&m, 6).unwrap(), BTreeSet::from([1, 5]));
        // Its tag goes: web loses it and the gateway; the gateway loses web.
        let got = step(
            &mut m,
            &mut s,
            NetmapDelta {
                upsert: vec![phone(&[])],
                ..NetmapDelta::default()
            },
        );
        assert_eq!(got[&1].remove, [5, 6]);
        assert_eq!(got[&5].remove, [1]);
        // Back, then removed.
        step(
            &mut m,
            &mut s,
            NetmapDelta {
                upsert: vec![phone(&["phone"])],
                ..NetmapDelta::default()
            },
        );
        let got = step(
            &mut m,
            &mut s,
            NetmapDelta {
                remove: vec![6],
                ..NetmapDelta::default()
            },
        );
        assert_eq!(got[&1].remove, [6, 5]);
        assert_eq!(got[&5].remove, [6, 1]);
    }

    #[test]
    fn nodes_of_a_kind_share_one_computation_but_not_themselves() {
        let mut m = map();
        m.policy = Some(
            parse(
                r#"
[[rule]]
from = ["tag:web"]
to = ["tag:web", "tag:db"]
ports = ["*"]

[[rule]]
from = ["node:n8"]
to = ["tag:client"]
ports = ["icmp"]

[[rule]]
from = ["tag:client"]
to = ["workload:chat"]
ports = ["tcp:7070"]
"#,
            )
            .unwrap()
            .into_policy(2),
        );
        // Three webs (they see each other), two dbs (they do not), clients and spares of
        // which one is named by a rule and one may hold chat.
        for (id, tags) in [
            (6, &["web"][..]),
            (7, &["web"]),
            (8, &["client"]),
            (9, &["client"]),
            (10, &["db"]),
            (11, &[]),
        ] {
            m.peers.insert(id, node(id, tags));
        }
        m.workloads
            .insert("chat".into(), workload("chat", Some(4), &[4, 11]));
        let ids: Vec<NodeId> = m.peers.keys().copied().collect();
        let each = visible_each(&m, &ids);
        let rules = rules_each(&m, &ids);
        let policy = m.policy.as_ref().unwrap();
        for &id in &ids {
            assert_eq!(Some(&each[&id]), visible(&m, id).as_ref(), "node {id}");
            assert_eq!(
                &*rules[&id],
                relevant_rules(policy, &m, id).as_slice(),
                "node {id}'s rules"
            );
        }
        // One computation, one list, for the webs; n8 (named by a rule) is a kind of its own
        // but has the clients' rules: one list too.
        assert!(Arc::ptr_eq(&rules[&6], &rules[&7]) && Arc::ptr_eq(&rules[&1], &rules[&6]));
        assert_eq!(&*rules[&8], [1, 2]);
        assert!(Arc::ptr_eq(&rules[&8], &rules[&9]));
        assert_eq!(each[&6], BTreeSet::from([1, 2, 7, 10]));
        assert!(visible_each(&Netmap::default(), &[1]).is_empty());
    }

    #[test]
    fn a_policy_set_or_cleared_recomputes_everyone() {
        let mut m = map();
        let policy = m.policy.take().unwrap();
        let mut s = sets(&m);
        assert!(s.values().all(Option::is_none));
        let got = step(
            &mut m,
            &mut s,
            NetmapDelta {
                policy: Some(PolicyChange::Set(policy)),
                ..NetmapDelta::default()
            },
        );
        assert_eq!(got[&1].remove, [3, 4, 5]);
        assert_eq!(got[&5].remove, [1, 2, 3, 4]);
        assert!(got.values().all(|sel| sel.upsert.is_empty()));
        let got = step(
            &mut m,
            &mut s,
            NetmapDelta {
                upsert: vec![node(7, &[])],
                policy: Some(PolicyChange::Clear),
                ..NetmapDelta::default()
            },
        );
        assert_eq!(got[&1].upsert, [7, 3, 4, 5]);
        assert_eq!(got[&5].upsert, [7, 1, 2, 3, 4]);
        assert!(s.values().all(Option::is_none));
    }
}
