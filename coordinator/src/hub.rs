//! Live network state: the current [`Netmap`] of every network and the sessions attached to
//! it, each with a bounded outbound queue.
//!
//! A change is applied with [`Hub::apply`]: it becomes one [`NetmapDelta`], encoded once, and
//! the same bytes ([`Frame`], reference-counted) are queued to every session of the network,
//! so the work per change grows linearly with the number of sessions. A session whose queue
//! is full is dropped from the hub at once (its sender is dropped, so its task sees the queue
//! end after what was queued); it reconnects and gets a full map.
//!
//! Need to know: while a network has a policy ([`Netmap::policy`]), a session's map holds
//! only its node, the peers [`meshlink_proto::policy::visible_peers`] lets that node see, and
//! every workload and tags as they are, and the rules of the policy that concern it
//! (`need_to_know`). Each session's set of
//! visible peers is kept in its slot and computed again only when a change can alter it (a
//! policy set or cleared: every session's, once per kind of node; a join, tags, a workload's
//! holders or candidates: the nodes touched, the others read off theirs); any other change is
//! filtered by set lookup.
//! Each session then gets the delta cut to what it sees, with the peers it sees from now on
//! as upserts and those it no longer sees as removes, at the network's versions (a delta for
//! every version, possibly without peers, so an agent never sees a gap). Sessions whose cut
//! is the same share one encoding; a session's full map is encoded for it alone. Without a
//! policy nothing of this runs: one encoding, shared.
//!
//! Policies: each slot keeps the node policy its agent has (`NodePolicy`: the rules that
//! concern its node), shared by every slot with the same rules. When a change gives a node
//! other rules, its agent gets them as an edit of the node policy it has
//! ([`meshlink_proto::policy::PolicyEdit`], made once per pair of old and new node policy, by
//! projecting one alignment of the old and new policy made once per change) when its hello
//! said it takes edits and the edit is smaller, else whole; when the rules are the same as it
//! has, nothing. So an operator's edit of a few rules of a large policy costs each agent those
//! rules, and the coordinator one diff per change and one pass and one encoding per distinct
//! pair.
//!
//! The hub never blocks and never awaits: its lock is held only to touch maps and queues.
//! Ordering of changes is the caller's job ([`crate::service`] holds its write lock while it
//! changes the store and applies the result here), so deltas reach every queue in version
//! order.
//!
//! Architecture invariant: a node has at most one attached session; attaching a new one
//! closes the old one ([`CloseReason::Replaced`]).

mod need_to_know;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use meshlink_proto::control::{compress, encode, Hello, ServerMessage, COMPRESS_MIN};
use meshlink_proto::policy::{relevant_rules, Alignment, PolicyEdit};
use meshlink_proto::{Netmap, NetmapDelta, NodeId, PeerInfo, Policy, PolicyChange, PublicKey};
use tokio::sync::mpsc;

use need_to_know::{Rules, Selection, Visible};

/// An encoded server message, shared by every queue it is put on: as [`encode`] made it
/// (what it dereferences to), and compressed ([`compress`]) for the agents that take it, made
/// once, by the first session that is to be sent it compressed (in a fan-out, under the
/// hub's lock, so never twice).
#[derive(Debug, Clone)]
pub struct Frame(Arc<Encoded>);

#[derive(Debug)]
struct Encoded {
    plain: Box<[u8]>,
    /// `None` inside: not worth compressing (see [`compress`]).
    compressed: OnceLock<Option<Box<[u8]>>>,
    kind: FrameKind,
    /// For a delta: when the change was published (see [`Hub::apply_delta_at`]).
    published: Option<Instant>,
}

/// What a [`Frame`] carries, as the metrics count it (`crate::telemetry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// A change of a network's map ([`ServerMessage::Delta`]), made by the hub.
    Delta,
    /// A whole map ([`ServerMessage::FullMap`]), made by the hub.
    FullMap,
    /// Anything else (made with `Frame::from`).
    Other,
}

impl Frame {
    /// The bytes to write to an agent that takes compressed records (`compression`: its
    /// hello said [`Hello::compression`]) or not.
    pub fn bytes(&self, compression: bool) -> &[u8] {
        let e = &*self.0;
        if !compression || e.plain.len() <= 4 + COMPRESS_MIN {
            return &e.plain;
        }
        e.compressed
            .get_or_init(|| compress(&e.plain).map(Vec::into_boxed_slice))
            .as_deref()
            .unwrap_or(&e.plain)
    }

    /// Whether two frames are the same encoding (shared, not merely equal).
    pub fn ptr_eq(a: &Frame, b: &Frame) -> bool {
        Arc::ptr_eq(&a.0, &b.0)
    }

    /// What it carries.
    pub fn kind(&self) -> FrameKind {
        self.0.kind
    }

    /// For a delta, when its change was published, by the clock the publisher passed to
    /// [`Hub::apply_delta_at`]; `None` for anything else.
    pub fn published(&self) -> Option<Instant> {
        self.0.published
    }

    fn made(plain: Vec<u8>, kind: FrameKind, published: Option<Instant>) -> Frame {
        Frame(Arc::new(Encoded {
            plain: plain.into_boxed_slice(),
            compressed: OnceLock::new(),
            kind,
            published,
        }))
    }

    fn delta(message: &ServerMessage, published: Option<Instant>) -> Frame {
        Frame::made(encode(message), FrameKind::Delta, published)
    }

    fn full_map(map: Netmap) -> Frame {
        Frame::made(
            encode(&ServerMessage::FullMap(map)),
            FrameKind::FullMap,
            None,
        )
    }
}

impl From<Vec<u8>> for Frame {
    fn from(plain: Vec<u8>) -> Self {
        Frame::made(plain, FrameKind::Other, None)
    }
}

impl std::ops::Deref for Frame {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0.plain
    }
}

impl PartialEq for Frame {
    fn eq(&self, other: &Frame) -> bool {
        self.0.plain == other.0.plain
    }
}

impl Eq for Frame {}

/// What a session's queue carries.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// Bytes to write to the agent as they are.
    Frame(Frame),
    /// Close the session after what came before.
    Close(CloseReason),
}

/// Why the hub closed a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// A newer session of the same node was attached.
    Replaced,
    /// The node was revoked.
    Revoked,
    /// The node was deleted.
    Deleted,
}

/// What a session's agent can take, as its hello says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    /// Policy changes as edits of the policy it has ([`Hello::policy_edits`]).
    pub policy_edits: bool,
    /// Compressed records ([`Hello::compression`]): its frames are written with
    /// [`Frame::bytes`]`(true)`.
    pub compression: bool,
    /// Live migrations ([`Hello::handover`]): it may be sent a `Handover`.
    pub handover: bool,
}

impl Features {
    /// What the agent that sent `hello` can take.
    pub fn of(hello: &Hello) -> Self {
        Features {
            policy_edits: hello.policy_edits,
            compression: hello.compression,
            handover: hello.handover,
        }
    }
}

/// A session just attached: its queue, and the full map to send first.
#[derive(Debug)]
pub struct Attached {
    /// Identifies this attachment, for [`Hub::detach`].
    pub serial: u64,
    /// Everything to send after the full map, in order. It ends (`None`) when the hub drops
    /// the session without a [`Outbound::Close`]: the queue was full.
    pub rx: mpsc::Receiver<Outbound>,
    /// The network's map when the session attached, as its node may see it (need to know).
    pub full_map: Frame,
    /// What its agent can take, as given to [`Hub::attach`]: the session writes every frame
    /// as [`Frame::bytes`]`(features.compression)`.
    pub features: Features,
}

impl Attached {
    /// The full map to send first, taken: a session holds it only until it is written. It
    /// is the whole map as of the attachment (shared only with sessions attached at the same
    /// version), and a session kept it for its whole life, a copy of the map per session.
    pub fn take_full_map(&mut self) -> Frame {
        std::mem::replace(&mut self.full_map, Frame::from(Vec::new()))
    }
}

/// What one [`Hub::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fanout {
    /// Bytes encoded: the one delta (queued once per session, shared), or under a policy the
    /// sum of the distinct cuts.
    pub bytes: usize,
    /// Distinct encodings made: 1 without a policy, one per distinct cut with one.
    pub frames: usize,
    /// Sessions it was queued to.
    pub sessions: usize,
    /// Sessions dropped because their queue was full.
    pub dropped: usize,
}

/// Queue places reserved for a session's closing messages (a last frame such as `Revoked`,
/// then the close), so that a session whose queue filled up still learns why it ends.
const CLOSE_ROOM: usize = 2;

#[derive(Debug)]
struct Slot {
    serial: u64,
    tx: mpsc::Sender<Outbound>,
    /// The version of the last full map this session was given.
    full_sent: u64,
    /// The peers this session's node sees, while the network has a policy; `None`: every
    /// peer (no policy).
    visible: Visible,
    /// What its agent can take.
    features: Features,
    /// The policy its agent has (the rules that concern its node), while the network has
    /// one: the base of the next edit.
    policy: Option<Arc<NodePolicy>>,
}

/// The rules of a network's policy that concern a node, as the policy its agent has. Slots
/// with the same rules share one. It holds their indices in the network's policy (shared by
/// every node policy of that version), not copies of them: a policy with many distinct parts
/// costs the coordinator its indices, and a part's rules are copied only while it is encoded.
#[derive(Debug)]
struct NodePolicy {
    /// Never reused in a network: encodings and edits are keyed by it.
    id: u64,
    /// The network's policy this is a part of.
    whole: Arc<Policy>,
    /// Its rules' indices in `whole`, increasing.
    rules: Rules,
    /// [`Policy::digest`] of the part, the result an edit to it announces.
    digest: u64,
}

impl NodePolicy {
    /// The part as the policy its agent has.
    fn policy(&self) -> Policy {
        self.whole.subset(&self.rules)
    }
}

/// The node policies of a network's current policy, by rules, and the alignment of the
/// policy before it with it, from which the edit of any node policy of the one to any of the
/// other is made in a pass over the two ([`Alignment::edit`]): one diff per policy change,
/// however many distinct pairs of node policies it makes.
#[derive(Debug, Default)]
struct NodePolicies {
    by_rules: HashMap<Rules, Arc<NodePolicy>>,
    next_id: u64,
    /// The network's policy the node policies are parts of.
    current: Option<Arc<Policy>>,
    /// `current` aligned with itself, for parts of it that change (made on first demand).
    same: Option<Arc<Alignment>>,
    /// The one before it, and its alignment with `current` (made on the first edit asked).
    previous: Option<(Arc<Policy>, Option<Arc<Alignment>>)>,
    /// The map's policy changed since `current` was taken.
    stale: bool,
}

impl NodePolicies {
    /// The node policy of `rules` of `policy` (the network's current one), made on first
    /// demand. Those no slot holds any more are forgotten once there are more than twice as
    /// many as `sessions`.
    fn get(&mut self, policy: &Policy, rules: &Rules, sessions: usize) -> Arc<NodePolicy> {
        let whole = match &self.current {
            Some(c) if !self.stale && c.version == policy.version => c.clone(),
            _ => {
                let c = Arc::new(policy.clone());
                self.previous = self.current.replace(c.clone()).map(|p| (p, None));
                self.same = None;
                self.stale = false;
                self.by_rules.clear();
                c
            }
        };
        if let Some(p) = self.by_rules.get(rules) {
            return p.clone();
        }
        if self.by_rules.len() > 2 * sessions + 16 {
            self.by_rules.retain(|_, p| Arc::strong_count(p) > 1);
        }
        self.next_id += 1;
        let p = Arc::new(NodePolicy {
            id: self.next_id,
            digest: whole.part_digest(rules),
            whole,
            rules: rules.clone(),
        });
        self.by_rules.insert(rules.clone(), p.clone());
        p
    }

    /// The edit from node policy `old` (of the current policy or the one before) to `new` (of
    /// the current one), or `None` when it goes whole: an edit would not be smaller, or `old`
    /// is of an older policy still.
    fn edit(&mut self, old: &NodePolicy, new: &NodePolicy) -> Option<PolicyEdit> {
        let alignment = match (&mut self.previous, &self.current) {
            (_, Some(current)) if Arc::ptr_eq(&old.whole, current) => {
                if !Arc::ptr_eq(&new.whole, current) {
                    return None;
                }
                self.same
                    .get_or_insert_with(|| Arc::new(Alignment::same(current)))
                    .clone()
            }
            (Some((before, alignment)), Some(current))
                if Arc::ptr_eq(before, &old.whole) && Arc::ptr_eq(current, &new.whole) =>
            {
                alignment
                    .get_or_insert_with(|| Arc::new(before.align(current)))
                    .clone()
            }
            _ => return None,
        };
        alignment.edit(&old.whole, &old.rules, &new.whole, &new.rules, new.digest)
    }

    /// The network's policy changed: every node policy is made anew (the ids go on).
    fn policy_changed(&mut self) {
        self.stale = true;
    }
}

/// What a session's request for a full map gets ([`Hub::full_map_for`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FullMapAnswer {
    /// The full map to send.
    Send(Frame),
    /// Nothing: the session was given the full map of this version already (or it is no
    /// longer attached). A session that has a gap in its deltas is behind the map's version,
    /// so it never asks in vain.
    Nothing,
    /// The network is not loaded.
    NoNetwork,
}

#[derive(Debug, Default)]
struct NetworkState {
    map: Netmap,
    /// The encoded full map at `map.version`, made on first demand after each change.
    full: Option<Frame>,
    sessions: HashMap<NodeId, Slot>,
    policies: NodePolicies,
}

impl NetworkState {
    fn full_frame(&mut self) -> Frame {
        if let Some(f) = &self.full {
            return f.clone();
        }
        let f = Frame::full_map(self.map.clone());
        self.full = Some(f.clone());
        f
    }

    /// The full map as a node that sees `visible` and has `policy` may see it: the shared
    /// encoding without a policy, else one for it alone.
    fn full_frame_for(
        &mut self,
        me: NodeId,
        visible: Option<&BTreeSet<NodeId>>,
        policy: Option<&NodePolicy>,
    ) -> Frame {
        match visible {
            Some(v) => Frame::full_map(need_to_know::map_for(
                &self.map,
                me,
                v,
                policy.map(NodePolicy::policy).as_ref(),
            )),
            None => self.full_frame(),
        }
    }

    /// Computes every session's visible peers and node policy again (the map was replaced).
    fn recompute_need_to_know(&mut self) {
        let nodes: Vec<NodeId> = self.sessions.keys().copied().collect();
        let mut sets = need_to_know::visible_each(&self.map, &nodes);
        let mut rules = need_to_know::rules_each(&self.map, &nodes);
        self.policies.policy_changed();
        let count = self.sessions.len();
        for (node, slot) in &mut self.sessions {
            slot.visible = self
                .map
                .policy
                .as_ref()
                .map(|_| sets.remove(node).unwrap_or_default());
            slot.policy = match (&self.map.policy, rules.remove(node)) {
                (Some(p), Some(r)) => Some(self.policies.get(p, &r, count)),
                _ => None,
            };
        }
    }
}

#[derive(Debug, Default)]
struct State {
    networks: HashMap<String, NetworkState>,
    next_serial: u64,
}

/// The networks' live maps and sessions. See the module documentation.
#[derive(Debug)]
pub struct Hub {
    state: Mutex<State>,
    queue_depth: usize,
}

impl Hub {
    /// A hub whose session queues hold `queue_depth` messages.
    pub fn new(queue_depth: usize) -> Self {
        Hub {
            state: Mutex::new(State::default()),
            queue_depth: queue_depth.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a map half-changed (each change is
        // applied by `Netmap::apply` after the delta is built), so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets a network's map (at start, or when a network is created). Sessions stay (and
    /// are sent nothing).
    pub fn set_map(&self, network: &str, map: Netmap) {
        let mut st = self.lock();
        let net = st.networks.entry(network.to_string()).or_default();
        net.map = map;
        net.full = None;
        net.recompute_need_to_know();
    }

    /// A network's current version.
    pub fn version(&self, network: &str) -> Option<u64> {
        self.lock().networks.get(network).map(|n| n.map.version)
    }

    /// The networks the hub has maps of, by name.
    pub fn networks(&self) -> Vec<String> {
        let mut names: Vec<String> = self.lock().networks.keys().cloned().collect();
        names.sort();
        names
    }

    /// The keys (and announced next keys) of every network's nodes now: not revoked, not
    /// deleted. One pass over the maps, under one lock.
    pub fn keys(&self) -> HashMap<String, HashSet<PublicKey>> {
        self.lock()
            .networks
            .iter()
            .map(|(name, n)| {
                let keys = n
                    .map
                    .peers
                    .values()
                    .flat_map(|p| std::iter::once(p.public_key).chain(p.next_key))
                    .collect();
                (name.clone(), keys)
            })
            .collect()
    }

    /// A copy of a network's current map.
    pub fn map(&self, network: &str) -> Option<Netmap> {
        self.lock().networks.get(network).map(|n| n.map.clone())
    }

    /// Moves a network's map to `to_version` by upserting and removing peers, and queues the
    /// one encoded delta to every session of the network. Nothing happens (`None`) for an
    /// unknown network or a version that does not move forward.
    pub fn apply(
        &self,
        network: &str,
        to_version: u64,
        upsert: Vec<PeerInfo>,
        remove: Vec<NodeId>,
    ) -> Option<Fanout> {
        self.apply_delta(
            network,
            NetmapDelta {
                to_version,
                upsert,
                remove,
                ..NetmapDelta::default()
            },
        )
    }

    /// As [`Hub::apply`] for a whole delta (peers, workloads, policy); its `from_version` is
    /// set here to the map's version. While the network has a policy (or gets one with this
    /// delta), each session gets the delta cut to what it may see (see the module
    /// documentation).
    pub fn apply_delta(&self, network: &str, delta: NetmapDelta) -> Option<Fanout> {
        self.apply_stamped(network, delta, None)
    }

    /// As [`Hub::apply_delta`], for a change published at `published` (just after its store
    /// transaction committed, or, for another coordinator's change, when it was read from the
    /// change log): its frames carry the time, so that each session can measure how long the
    /// change took to reach its agent ([`Frame::published`]).
    pub fn apply_delta_at(
        &self,
        network: &str,
        delta: NetmapDelta,
        published: Instant,
    ) -> Option<Fanout> {
        self.apply_stamped(network, delta, Some(published))
    }

    fn apply_stamped(
        &self,
        network: &str,
        mut delta: NetmapDelta,
        published: Option<Instant>,
    ) -> Option<Fanout> {
        let to_version = delta.to_version;
        let mut st = self.lock();
        let net = st.networks.get_mut(network)?;
        if to_version <= net.map.version {
            return None;
        }
        delta.from_version = net.map.version;
        if net.map.policy.is_none() && !matches!(delta.policy, Some(PolicyChange::Set(_))) {
            net.map.apply(delta.clone()).ok()?;
            net.full = None;
            crate::telemetry::map_changed();
            let frame = Frame::delta(&ServerMessage::Delta(delta), published);
            return Some(fan_out(network, net, &frame));
        }
        let pending = need_to_know::judge(&net.map, &delta);
        net.map.apply(delta.clone()).ok()?;
        net.full = None;
        crate::telemetry::map_changed();
        if delta.policy.is_some() {
            net.policies.policy_changed();
        }
        let nodes: Vec<NodeId> = net.sessions.keys().copied().collect();
        let change = pending.applied(&net.map, &delta, &nodes);
        Some(fan_out_cut(
            network,
            &net.map,
            &mut net.sessions,
            &mut net.policies,
            delta,
            change,
            published,
        ))
    }

    /// Replaces a network's map and queues it whole to every session of the network (for a
    /// coordinator too far behind the change log to replay it), each session's as its node
    /// may see it. Adds the network when new.
    pub fn reset_map(&self, network: &str, map: Netmap) -> Fanout {
        let mut st = self.lock();
        let net = st.networks.entry(network.to_string()).or_default();
        net.map = map;
        net.full = None;
        net.recompute_need_to_know();
        let version = net.map.version;
        for slot in net.sessions.values_mut() {
            slot.full_sent = version;
        }
        if net.map.policy.is_none() {
            let frame = net.full_frame();
            return fan_out(network, net, &frame);
        }
        let mut fanout = Fanout::default();
        let map = &net.map;
        net.sessions.retain(|&node, slot| {
            let frame = match &slot.visible {
                Some(v) => Frame::full_map(need_to_know::map_for(
                    map,
                    node,
                    v,
                    slot.policy.as_deref().map(NodePolicy::policy).as_ref(),
                )),
                None => Frame::full_map(map.clone()),
            };
            fanout.bytes += frame.len();
            fanout.frames += 1;
            offer(network, node, slot, &frame, &mut fanout)
        });
        fanout
    }

    /// Attaches a session of `node` whose agent can take `features`, closing an older one
    /// ([`CloseReason::Replaced`]). `None` for an unknown network.
    pub fn attach(&self, network: &str, node: NodeId, features: Features) -> Option<Attached> {
        let mut st = self.lock();
        st.next_serial += 1;
        let serial = st.next_serial;
        let net = st.networks.get_mut(network)?;
        if let Some(old) = net.sessions.remove(&node) {
            let _ = old.tx.try_send(Outbound::Close(CloseReason::Replaced));
        }
        let (tx, rx) = mpsc::channel(self.queue_depth + CLOSE_ROOM);
        let visible = need_to_know::visible(&net.map, node);
        let count = net.sessions.len() + 1;
        let policy = net.map.policy.as_ref().map(|p| {
            let rules: Rules = relevant_rules(p, &net.map, node).into();
            net.policies.get(p, &rules, count)
        });
        let full_map = net.full_frame_for(node, visible.as_ref(), policy.as_deref());
        net.sessions.insert(
            node,
            Slot {
                serial,
                tx,
                full_sent: net.map.version,
                visible,
                features,
                policy,
            },
        );
        Some(Attached {
            serial,
            rx,
            full_map,
            features,
        })
    }

    /// Detaches a session when it ends; `false` when it was no longer attached (replaced or
    /// dropped).
    pub fn detach(&self, network: &str, node: NodeId, serial: u64) -> bool {
        let mut st = self.lock();
        let Some(net) = st.networks.get_mut(network) else {
            return false;
        };
        match net.sessions.get(&node) {
            Some(slot) if slot.serial == serial => {
                net.sessions.remove(&node);
                true
            }
            _ => false,
        }
    }

    /// Closes a node's session, if it has one: queues `last` (when given) and the close, then
    /// forgets the session. Returns whether there was one.
    pub fn close(
        &self,
        network: &str,
        node: NodeId,
        reason: CloseReason,
        last: Option<Frame>,
    ) -> bool {
        let mut st = self.lock();
        let Some(slot) = st
            .networks
            .get_mut(network)
            .and_then(|n| n.sessions.remove(&node))
        else {
            return false;
        };
        if let Some(frame) = last {
            let _ = slot.tx.try_send(Outbound::Frame(frame));
        }
        let _ = slot.tx.try_send(Outbound::Close(reason));
        true
    }

    /// Queues `frame` to one node's session only (a message meant for it alone). Returns
    /// whether it was queued: `false` when the node has no session or its queue is full.
    pub fn send_to(&self, network: &str, node: NodeId, frame: Frame) -> bool {
        let st = self.lock();
        let Some(slot) = st.networks.get(network).and_then(|n| n.sessions.get(&node)) else {
            return false;
        };
        slot.tx.capacity() > CLOSE_ROOM && slot.tx.try_send(Outbound::Frame(frame)).is_ok()
    }

    /// The encoded full map of a network for session `serial` of `node`, which asked for it,
    /// as the node may see it: at most once per version and session, so that repeating the
    /// request costs neither the coordinator nor the network anything (a full map can be
    /// large).
    pub fn full_map_for(&self, network: &str, node: NodeId, serial: u64) -> FullMapAnswer {
        let mut st = self.lock();
        let Some(net) = st.networks.get_mut(network) else {
            return FullMapAnswer::NoNetwork;
        };
        let version = net.map.version;
        let (visible, policy) = match net.sessions.get_mut(&node) {
            Some(slot) if slot.serial == serial && slot.full_sent != version => {
                slot.full_sent = version;
                (slot.visible.clone(), slot.policy.clone())
            }
            _ => return FullMapAnswer::Nothing,
        };
        FullMapAnswer::Send(net.full_frame_for(node, visible.as_ref(), policy.as_deref()))
    }

    /// The encoded full map of a network, every peer (what its sessions get while it has no
    /// policy; the admin's and tests' view).
    pub fn full_map(&self, network: &str) -> Option<Frame> {
        self.lock()
            .networks
            .get_mut(network)
            .map(NetworkState::full_frame)
    }

    /// The id and generation of a workload in a network's map, if the map has it.
    pub fn workload_generation(&self, network: &str, name: &str) -> Option<(u64, u64)> {
        self.lock()
            .networks
            .get(network)
            .and_then(|n| n.map.workloads.get(name))
            .map(|w| (w.id, w.generation))
    }

    /// The holder of a workload in a network's map, if it has one.
    pub fn holder_of(&self, network: &str, name: &str) -> Option<NodeId> {
        self.lock()
            .networks
            .get(network)
            .and_then(|n| n.map.workloads.get(name))
            .and_then(|w| w.holder)
    }

    /// The workloads of one network, or of it those `holder` holds, cloned (nothing of the
    /// other networks is touched: a heartbeat asks this).
    pub fn network_workloads(
        &self,
        network: &str,
        holder: Option<NodeId>,
    ) -> Vec<meshlink_proto::WorkloadInfo> {
        self.lock()
            .networks
            .get(network)
            .map(|n| {
                n.map
                    .workloads
                    .values()
                    .filter(|w| holder.is_none() || w.holder == holder)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every workload of every network, with its network's name.
    pub fn workloads(&self) -> Vec<(String, meshlink_proto::WorkloadInfo)> {
        self.lock()
            .networks
            .iter()
            .flat_map(|(name, n)| {
                n.map
                    .workloads
                    .values()
                    .map(move |w| (name.clone(), w.clone()))
            })
            .collect()
    }

    /// Whether a node has an attached session.
    /// What the agent of `node`'s session here can take; `None` without a session here.
    pub fn features_of(&self, network: &str, node: NodeId) -> Option<Features> {
        self.lock()
            .networks
            .get(network)?
            .sessions
            .get(&node)
            .map(|s| s.features)
    }

    /// Whether `node` has a session here.
    pub fn is_online(&self, network: &str, node: NodeId) -> bool {
        self.lock()
            .networks
            .get(network)
            .is_some_and(|n| n.sessions.contains_key(&node))
    }

    /// Every node with an attached session.
    pub fn online(&self) -> HashSet<NodeId> {
        self.lock()
            .networks
            .values()
            .flat_map(|n| n.sessions.keys().copied())
            .collect()
    }

    /// How many sessions a network has.
    pub fn online_count(&self, network: &str) -> usize {
        self.lock()
            .networks
            .get(network)
            .map_or(0, |n| n.sessions.len())
    }

    /// Counts of every network, by name (for the metrics): nothing is copied but the names.
    pub fn census(&self) -> Vec<Census> {
        let mut all: Vec<Census> = self
            .lock()
            .networks
            .iter()
            .map(|(name, n)| Census {
                network: name.clone(),
                version: n.map.version,
                nodes: n.map.peers.len(),
                online: n.sessions.len(),
                workloads: n.map.workloads.len(),
            })
            .collect();
        all.sort_by(|a, b| a.network.cmp(&b.network));
        all
    }
}

/// A network's counts, as [`Hub::census`] gives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Census {
    /// The network's name.
    pub network: String,
    /// Its map's version.
    pub version: u64,
    /// Nodes in its map (revoked ones are not).
    pub nodes: usize,
    /// Nodes with a session attached here.
    pub online: usize,
    /// Workloads in its map.
    pub workloads: usize,
}

/// Queues `frame` to every session of a network, dropping those whose queue is full.
fn fan_out(network: &str, net: &mut NetworkState, frame: &Frame) -> Fanout {
    let mut fanout = Fanout {
        bytes: frame.len(),
        frames: 1,
        ..Fanout::default()
    };
    net.sessions
        .retain(|&node, slot| offer(network, node, slot, frame, &mut fanout));
    fanout
}

/// Queues to every session of a network the cut of `delta` (as applied to `map`) that
/// `change` selects for it, moving its visible peers and node policy along; sessions with the
/// same cut and the same policy to send share one encoding. Drops sessions whose queue is
/// full.
fn fan_out_cut(
    network: &str,
    map: &Netmap,
    sessions: &mut HashMap<NodeId, Slot>,
    policies: &mut NodePolicies,
    delta: NetmapDelta,
    mut change: need_to_know::Change<'_>,
    published: Option<Instant>,
) -> Fanout {
    // Everything but the peers and the policy is the same for every session: one message,
    // those set for each distinct cut.
    // A policy set goes to each session as the rules that concern it (its selection's), as
    // an edit of what it has or whole; a policy cleared, to everyone as it is.
    let clear = matches!(delta.policy, Some(PolicyChange::Clear));
    let mut message = ServerMessage::Delta(NetmapDelta {
        upsert: Vec::new(),
        remove: Vec::new(),
        policy: None,
        ..delta
    });
    let count = sessions.len();
    // The node policy of each subset of the change, and the edit of each pair.
    let mut node_policies: HashMap<usize, Arc<NodePolicy>> = HashMap::new();
    let mut edits: HashMap<(u64, u64), Option<Arc<PolicyEdit>>> = HashMap::new();
    let mut frames: HashMap<(Selection, PolicyKey), Frame> = HashMap::new();
    let mut fanout = Fanout::default();
    sessions.retain(|&node, slot| {
        let selection = change.select(node, &mut slot.visible);
        let send = match (selection.rules, &map.policy) {
            (Some(id), Some(policy)) => {
                let new = node_policies
                    .entry(id)
                    .or_insert_with(|| policies.get(policy, change.subset(id), count))
                    .clone();
                let send = match slot.policy.take() {
                    Some(old) if old.id == new.id => PolicySend::Nothing,
                    Some(old) if slot.features.policy_edits => {
                        // Made once per pair; whole (and shared with the sessions that get
                        // it whole) when an edit is not smaller.
                        match edits
                            .entry((old.id, new.id))
                            .or_insert_with(|| policies.edit(&old, &new).map(Arc::new))
                        {
                            Some(edit) => PolicySend::Edit(edit.clone(), old.id, new.id),
                            None => PolicySend::Whole(new.clone()),
                        }
                    }
                    _ => PolicySend::Whole(new.clone()),
                };
                slot.policy = Some(new);
                send
            }
            _ if clear => {
                slot.policy = None;
                PolicySend::Clear
            }
            _ => PolicySend::Nothing,
        };
        let key = (selection, send.key());
        let frame = match frames.get(&key) {
            Some(f) => f.clone(),
            None => {
                if let ServerMessage::Delta(d) = &mut message {
                    d.upsert = key
                        .0
                        .upsert
                        .iter()
                        .filter_map(|id| map.peers.get(id).cloned())
                        .collect();
                    d.remove.clone_from(&key.0.remove);
                    d.policy = match &send {
                        PolicySend::Nothing => None,
                        PolicySend::Clear => Some(PolicyChange::Clear),
                        PolicySend::Whole(new) => Some(PolicyChange::Set(new.policy())),
                        PolicySend::Edit(edit, ..) => Some(PolicyChange::Edit((**edit).clone())),
                    };
                }
                let f = Frame::delta(&message, published);
                fanout.bytes += f.len();
                fanout.frames += 1;
                frames.insert(key, f.clone());
                f
            }
        };
        offer(network, node, slot, &frame, &mut fanout)
    });
    fanout
}

/// What of the policy one session gets with a change.
enum PolicySend {
    /// Nothing: its rules are as they were.
    Nothing,
    /// The network's policy was cleared.
    Clear,
    /// Its node policy, whole.
    Whole(Arc<NodePolicy>),
    /// The edit from the node policy it has to its new one (their ids).
    Edit(Arc<PolicyEdit>, u64, u64),
}

/// [`PolicySend`] as a key of encodings: the kind and the node policies' ids.
type PolicyKey = (u8, u64, u64);

impl PolicySend {
    fn key(&self) -> PolicyKey {
        match self {
            PolicySend::Nothing => (0, 0, 0),
            PolicySend::Clear => (1, 0, 0),
            PolicySend::Whole(new) => (2, 0, new.id),
            PolicySend::Edit(_, old, new) => (3, *old, *new),
        }
    }
}

/// Queues `frame` to one session of a fan-out; `false` when the session is to be dropped
/// (its queue is full, or its task is gone).
fn offer(network: &str, node: NodeId, slot: &Slot, frame: &Frame, fanout: &mut Fanout) -> bool {
    // Compressed here, once per encoding (the first session that takes it), rather than by
    // each session's task as it writes.
    if slot.features.compression {
        frame.bytes(true);
    }
    // The last CLOSE_ROOM places are kept for a closing message (see `close`).
    let send = if slot.tx.capacity() > CLOSE_ROOM {
        slot.tx.try_send(Outbound::Frame(frame.clone()))
    } else {
        Err(mpsc::error::TrySendError::Full(Outbound::Frame(
            frame.clone(),
        )))
    };
    match send {
        Ok(()) => {
            fanout.sessions += 1;
            true
        }
        Err(mpsc::error::TrySendError::Full(_)) => {
            tracing::info!(node, network, "session dropped: its queue is full");
            crate::telemetry::session_dropped();
            fanout.dropped += 1;
            false
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use meshlink_proto::control::{Decoder, MAX_SERVER_MESSAGE};
    use meshlink_proto::PublicKey;

    use super::*;

    fn peer(id: NodeId) -> PeerInfo {
        PeerInfo {
            node_id: id,
            name: format!("n{id}"),
            public_key: PublicKey([id as u8; 32]),
            next_key: None,
            addresses: vec![format!("100.64.0.{id}/32").parse().unwrap()],
            allowed_ips: vec![],
            endpoints: vec![],
            labels: BTreeMap::new(),
            tags: Vec::new(),
            via: None,
        }
    }

    fn decode(frame: &[u8]) -> ServerMessage {
        let mut d = Decoder::new(MAX_SERVER_MESSAGE);
        d.push(frame).unwrap();
        d.decode().unwrap().unwrap()
    }

    #[test]
    fn one_encoding_is_shared_by_every_session() {
        let hub = Hub::new(8);
        hub.set_map(
            "n",
            Netmap {
                version: 5,
                ..Netmap::default()
            },
        );
        let mut sessions: Vec<Attached> = (1..=3)
            .map(|id| hub.attach("n", id, Features::default()).unwrap())
            .collect();
        let fan = hub.apply("n", 6, vec![peer(9)], vec![]).unwrap();
        assert_eq!((fan.sessions, fan.dropped), (3, 0));
        let frames: Vec<Frame> = sessions
            .iter_mut()
            .map(|s| match s.rx.try_recv().unwrap() {
                Outbound::Frame(f) => f,
                other => panic!("{other:?}"),
            })
            .collect();
        assert!(frames.iter().all(|f| Frame::ptr_eq(f, &frames[0])));
        match decode(&frames[0]) {
            ServerMessage::Delta(d) => {
                assert_eq!((d.from_version, d.to_version, d.upsert.len()), (5, 6, 1))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(hub.version("n"), Some(6));
        assert!(
            hub.apply("n", 6, vec![], vec![]).is_none(),
            "versions only move forward"
        );
    }

    #[test]
    fn frames_say_what_they_carry_and_when_their_change_was_published() {
        let hub = Hub::new(8);
        hub.set_map("n", Netmap::default());
        let mut a = hub.attach("n", 1, Features::default()).unwrap();
        assert_eq!(a.full_map.kind(), FrameKind::FullMap);
        assert_eq!(a.full_map.published(), None);
        let next = |a: &mut Attached| match a.rx.try_recv().unwrap() {
            Outbound::Frame(f) => f,
            other => panic!("{other:?}"),
        };
        let at = Instant::now();
        hub.apply_delta_at(
            "n",
            NetmapDelta {
                to_version: 1,
                upsert: vec![peer(2)],
                ..NetmapDelta::default()
            },
            at,
        )
        .unwrap();
        let f = next(&mut a);
        assert_eq!((f.kind(), f.published()), (FrameKind::Delta, Some(at)));
        hub.apply("n", 2, vec![peer(3)], vec![]).unwrap();
        let f = next(&mut a);
        assert_eq!((f.kind(), f.published()), (FrameKind::Delta, None));
        // Under a policy each cut carries the time too.
        let later = at + std::time::Duration::from_millis(5);
        hub.apply_delta_at(
            "n",
            NetmapDelta {
                to_version: 3,
                policy: Some(PolicyChange::Set(policy_of(&[80], 1))),
                ..NetmapDelta::default()
            },
            later,
        )
        .unwrap();
        let f = next(&mut a);
        assert_eq!((f.kind(), f.published()), (FrameKind::Delta, Some(later)));
        let reset = hub.reset_map("n", hub.map("n").unwrap());
        assert_eq!(reset.sessions, 1);
        assert_eq!(next(&mut a).kind(), FrameKind::FullMap);
        let other: Frame = encode(&ServerMessage::Revoked { reason: "r".into() }).into();
        assert_eq!((other.kind(), other.published()), (FrameKind::Other, None));
        let census = hub.census();
        assert_eq!(census.len(), 1);
        assert_eq!(
            (
                census[0].network.as_str(),
                census[0].version,
                census[0].nodes,
                census[0].online,
                census[0].workloads
            ),
            ("n", 3, 2, 1, 0)
        );
    }

    #[test]
    fn large_frames_are_compressed_once_for_the_sessions_that_take_them() {
        use meshlink_proto::control::COMPRESSED_RECORD;
        let hub = Hub::new(8);
        hub.set_map("n", Netmap::default());
        let take = Features {
            compression: true,
            ..Features::default()
        };
        let mut sessions: Vec<Attached> = [take, Features::default(), take]
            .into_iter()
            .enumerate()
            .map(|(i, f)| hub.attach("n", i as NodeId + 1, f).unwrap())
            .collect();
        assert_eq!(
            sessions
                .iter()
                .map(|s| s.features.compression)
                .collect::<Vec<_>>(),
            [true, false, true]
        );
        let next = |s: &mut Attached| match s.rx.try_recv().unwrap() {
            Outbound::Frame(f) => f,
            other => panic!("{other:?}"),
        };
        // A small delta: as it is, whoever takes it.
        hub.apply("n", 1, vec![peer(9)], vec![]).unwrap();
        let small: Vec<Frame> = sessions.iter_mut().map(next).collect();
        assert!(small.iter().all(|f| f.bytes(true) == &f[..]));
        // Some 60 KB of peers: compressed in the fan-out, once, for both that take it.
        hub.apply("n", 2, (10..210).map(peer).collect(), vec![])
            .unwrap();
        let big: Vec<Frame> = sessions.iter_mut().map(next).collect();
        assert!(big.iter().all(|f| Frame::ptr_eq(f, &big[0])));
        assert!(big[0].0.compressed.get().is_some(), "made in the fan-out");
        let packed = big[0].bytes(true);
        assert!(std::ptr::eq(packed, big[2].bytes(true)));
        assert_ne!(
            u32::from_be_bytes(packed[..4].try_into().unwrap()) & COMPRESSED_RECORD,
            0
        );
        assert!(
            packed.len() * 3 < big[0].len(),
            "{} of {}",
            packed.len(),
            big[0].len()
        );
        // Those that do not take it get the JSON as it is.
        assert_eq!(big[1].bytes(false), &big[1][..]);
        let mut d = Decoder::with_compression(MAX_SERVER_MESSAGE);
        d.push(packed).unwrap();
        assert_eq!(d.decode::<ServerMessage>().unwrap(), Some(decode(&big[1])));
    }

    #[test]
    fn a_full_queue_drops_the_session() {
        let hub = Hub::new(2);
        hub.set_map("n", Netmap::default());
        let mut slow = hub.attach("n", 1, Features::default()).unwrap();
        let _fast = hub.attach("n", 2, Features::default()).unwrap();
        for v in 1..=3 {
            hub.apply("n", v, vec![peer(v)], vec![]);
        }
        assert!(!hub.is_online("n", 1));
        // What was queued still arrives, then the queue ends without a close.
        assert!(matches!(slow.rx.try_recv(), Ok(Outbound::Frame(_))));
        assert!(matches!(slow.rx.try_recv(), Ok(Outbound::Frame(_))));
        assert!(matches!(
            slow.rx.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
    }

    #[test]
    fn attaching_again_replaces_and_detach_checks_the_serial() {
        let hub = Hub::new(4);
        hub.set_map("n", Netmap::default());
        let mut first = hub.attach("n", 1, Features::default()).unwrap();
        let second = hub.attach("n", 1, Features::default()).unwrap();
        assert!(matches!(
            first.rx.try_recv(),
            Ok(Outbound::Close(CloseReason::Replaced))
        ));
        assert!(
            !hub.detach("n", 1, first.serial),
            "the old session does not detach the new one"
        );
        assert!(hub.is_online("n", 1));
        assert!(hub.detach("n", 1, second.serial));
        assert_eq!(hub.online_count("n"), 0);
    }

    #[test]
    fn full_map_is_cached_until_the_next_change() {
        let hub = Hub::new(4);
        hub.set_map("n", Netmap::default());
        let a = hub.full_map("n").unwrap();
        assert!(Frame::ptr_eq(&a, &hub.full_map("n").unwrap()));
        hub.apply("n", 1, vec![peer(1)], vec![]);
        match decode(&hub.full_map("n").unwrap()) {
            ServerMessage::FullMap(m) => assert_eq!((m.version, m.peers.len()), (1, 1)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_session_gets_the_full_map_of_a_version_once() {
        let hub = Hub::new(4);
        hub.set_map("n", Netmap::default());
        let old = hub.attach("n", 1, Features::default()).unwrap();
        hub.apply("n", 1, vec![peer(1)], vec![]);
        let new = hub.attach("n", 1, Features::default()).unwrap();
        assert_eq!(
            hub.full_map_for("n", 1, new.serial),
            FullMapAnswer::Nothing,
            "the attach gave it this version's"
        );
        hub.apply("n", 2, vec![peer(2)], vec![]);
        // The replaced session gets nothing, and does not spend the new one's turn.
        assert_eq!(hub.full_map_for("n", 1, old.serial), FullMapAnswer::Nothing);
        assert!(matches!(
            hub.full_map_for("n", 1, new.serial),
            FullMapAnswer::Send(_)
        ));
        assert_eq!(hub.full_map_for("n", 1, new.serial), FullMapAnswer::Nothing);
        // A whole map pushed to every session counts as given.
        hub.reset_map(
            "n",
            Netmap {
                version: 9,
                ..Netmap::default()
            },
        );
        assert_eq!(hub.full_map_for("n", 1, new.serial), FullMapAnswer::Nothing);
        assert_eq!(
            hub.full_map_for("x", 1, new.serial),
            FullMapAnswer::NoNetwork
        );
    }

    fn peers_of(frame: &[u8]) -> Vec<NodeId> {
        match decode(frame) {
            ServerMessage::FullMap(m) => m.peers.keys().copied().collect(),
            ServerMessage::Delta(d) => d.upsert.iter().map(|p| p.node_id).collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn under_a_policy_each_session_gets_its_cut() {
        let hub = Hub::new(8);
        let policy = meshlink_proto::policy::parse(
            "[[rule]]\nfrom = [\"node:n1\"]\nto = [\"node:n2\"]\nports = [\"*\"]\n",
        )
        .unwrap()
        .into_policy(1);
        let mut map = Netmap {
            version: 1,
            policy: Some(policy),
            ..Netmap::default()
        };
        for id in 1..=3 {
            map.peers.insert(id, peer(id));
        }
        hub.set_map("n", map.clone());
        let mut s: Vec<Attached> = (1..=3)
            .map(|id| hub.attach("n", id, Features::default()).unwrap())
            .collect();
        assert_eq!(peers_of(&s[0].full_map), [1, 2]);
        assert_eq!(peers_of(&s[2].full_map), [3]);

        // n3's change: n3 alone gets it; n1 and n2 share the encoding without it.
        let fan = hub.apply("n", 2, vec![peer(3)], vec![]).unwrap();
        assert_eq!((fan.sessions, fan.frames), (3, 2));
        let frames: Vec<Frame> = s
            .iter_mut()
            .map(|a| match a.rx.try_recv().unwrap() {
                Outbound::Frame(f) => f,
                other => panic!("{other:?}"),
            })
            .collect();
        assert!(Frame::ptr_eq(&frames[0], &frames[1]));
        assert!(peers_of(&frames[0]).is_empty());
        assert_eq!(peers_of(&frames[2]), [3]);

        // A reloaded map is sent whole to each as it may see it.
        map.version = 7;
        let fan = hub.reset_map("n", map);
        assert_eq!((fan.sessions, fan.frames), (3, 3));
        let got: Vec<Vec<NodeId>> = s
            .iter_mut()
            .map(|a| match a.rx.try_recv().unwrap() {
                Outbound::Frame(f) => peers_of(&f),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(got, [vec![1, 2], vec![1, 2], vec![3]]);
        assert_eq!(
            hub.full_map_for("n", 3, s[2].serial),
            FullMapAnswer::Nothing,
            "the reload counts as given"
        );
        hub.apply("n", 8, vec![], vec![]);
        match hub.full_map_for("n", 3, s[2].serial) {
            FullMapAnswer::Send(f) => assert_eq!(peers_of(&f), [3]),
            other => panic!("{other:?}"),
        }
    }

    /// A policy of `ports.len()` rules, each naming every node (`tag:all`), rule `i` on port
    /// `ports[i]`.
    fn policy_of(ports: &[u16], version: u64) -> meshlink_proto::Policy {
        let text: String = ports
            .iter()
            .map(|p| {
                format!(
                    "[[rule]]\nfrom = [\"tag:all\"]\nto = [\"tag:all\"]\nports = [\"tcp:{p}\"]\n"
                )
            })
            .collect();
        meshlink_proto::policy::parse(&text)
            .unwrap()
            .into_policy(version)
    }

    /// An agent's map: the full map it attached with, then every delta queued to it.
    fn follow(map: &mut Netmap, a: &mut Attached) -> Vec<ServerMessage> {
        let mut got = Vec::new();
        while let Ok(Outbound::Frame(f)) = a.rx.try_recv() {
            let msg = decode(&f);
            if let ServerMessage::Delta(d) = &msg {
                map.apply(d.clone()).unwrap();
            }
            got.push(msg);
        }
        got
    }

    fn policy_change(msg: &ServerMessage) -> Option<&PolicyChange> {
        match msg {
            ServerMessage::Delta(d) => d.policy.as_ref(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_policy_edit_reaches_agents_that_take_edits_as_an_edit_shared() {
        let hub = Hub::new(8);
        let mut map = Netmap {
            version: 1,
            ..Netmap::default()
        };
        for id in 1..=4 {
            let mut p = peer(id);
            p.tags = vec!["all".into()];
            map.peers.insert(id, p);
        }
        hub.set_map("n", map);
        let edits = Features {
            policy_edits: true,
            ..Features::default()
        };
        // 1 to 3 take edits; 4 is an older agent.
        let mut s: Vec<Attached> = (1..=4)
            .map(|id| {
                let f = if id < 4 { edits } else { Features::default() };
                hub.attach("n", id, f).unwrap()
            })
            .collect();
        let mut maps: Vec<Netmap> = s
            .iter()
            .map(|a| match decode(&a.full_map) {
                ServerMessage::FullMap(m) => m,
                other => panic!("{other:?}"),
            })
            .collect();
        let mut ports: Vec<u16> = (1..=200).collect();
        let check = |maps: &[Netmap], hub: &Hub| {
            let whole = hub.map("n").unwrap();
            for (i, m) in maps.iter().enumerate() {
                let me = i as NodeId + 1;
                assert_eq!(m.version, whole.version);
                assert_eq!(
                    m.policy,
                    whole.policy.as_ref().map(|p| p.for_node(&whole, me)),
                    "node {me}"
                );
            }
        };

        // The first policy: whole to everyone, one encoding.
        let fan = hub
            .apply_delta(
                "n",
                NetmapDelta {
                    to_version: 2,
                    policy: Some(PolicyChange::Set(policy_of(&ports, 1))),
                    ..NetmapDelta::default()
                },
            )
            .unwrap();
        assert_eq!((fan.sessions, fan.frames), (4, 1));
        for (a, m) in s.iter_mut().zip(&mut maps) {
            let got = follow(m, a);
            assert!(matches!(policy_change(&got[0]), Some(PolicyChange::Set(_))));
        }
        check(&maps, &hub);

        // Two rules edited: an edit, encoded once, to 1-3; the whole policy to 4.
        ports[17] = 9000;
        ports[150] = 9001;
        let fan = hub
            .apply_delta(
                "n",
                NetmapDelta {
                    to_version: 3,
                    policy: Some(PolicyChange::Set(policy_of(&ports, 2))),
                    ..NetmapDelta::default()
                },
            )
            .unwrap();
        assert_eq!((fan.sessions, fan.frames), (4, 2));
        let got: Vec<Vec<ServerMessage>> = s
            .iter_mut()
            .zip(&mut maps)
            .map(|(a, m)| follow(m, a))
            .collect();
        for g in &got[..3] {
            match policy_change(&g[0]) {
                Some(PolicyChange::Edit(e)) => {
                    assert_eq!((e.base, e.version), (1, 2));
                    // Two rules and a few ops, against some 14 KB whole.
                    let len = serde_json::to_vec(e).unwrap().len();
                    assert!(len < 1000, "{len} bytes");
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            policy_change(&got[3][0]),
            Some(PolicyChange::Set(_))
        ));
        check(&maps, &hub);

        // Every rule replaced: whole to everyone, one encoding again.
        let replaced: Vec<u16> = ports.iter().map(|p| p + 20_000).collect();
        let fan = hub
            .apply_delta(
                "n",
                NetmapDelta {
                    to_version: 4,
                    policy: Some(PolicyChange::Set(policy_of(&replaced, 3))),
                    ..NetmapDelta::default()
                },
            )
            .unwrap();
        assert_eq!(fan.frames, 1);
        for (a, m) in s.iter_mut().zip(&mut maps) {
            let got = follow(m, a);
            assert!(matches!(policy_change(&got[0]), Some(PolicyChange::Set(_))));
        }
        check(&maps, &hub);

        // A node's tag changes its rules (none of them now concern it): it gets the rules it
        // has now (an edit dropping every rule); the others keep theirs and get no policy.
        let mut untagged = peer(2);
        untagged.tags = vec!["other".into()];
        hub.apply("n", 5, vec![untagged], vec![]).unwrap();
        let got: Vec<Vec<ServerMessage>> = s
            .iter_mut()
            .zip(&mut maps)
            .map(|(a, m)| follow(m, a))
            .collect();
        assert!(matches!(
            policy_change(&got[1][0]),
            Some(PolicyChange::Edit(_))
        ));
        assert_eq!(maps[1].policy.as_ref().map(|p| p.rules.len()), Some(0));
        for i in [0, 2, 3] {
            assert_eq!(policy_change(&got[i][0]), None, "node {}", i + 1);
        }
        check(&maps, &hub);

        // A session that asks for a full map gets its rules as its slot has them.
        hub.apply("n", 6, vec![], vec![]).unwrap();
        match hub.full_map_for("n", 3, s[2].serial) {
            FullMapAnswer::Send(f) => match decode(&f) {
                ServerMessage::FullMap(m) => {
                    let whole = hub.map("n").unwrap();
                    assert_eq!(
                        m.policy,
                        whole.policy.as_ref().map(|p| p.for_node(&whole, 3))
                    );
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn close_sends_the_last_words_then_closes() {
        let hub = Hub::new(4);
        hub.set_map("n", Netmap::default());
        let mut s = hub.attach("n", 1, Features::default()).unwrap();
        let last: Frame = encode(&ServerMessage::Revoked { reason: "r".into() }).into();
        assert!(hub.close("n", 1, CloseReason::Revoked, Some(last)));
        assert!(matches!(s.rx.try_recv(), Ok(Outbound::Frame(_))));
        assert!(matches!(
            s.rx.try_recv(),
            Ok(Outbound::Close(CloseReason::Revoked))
        ));
        assert!(!hub.close("n", 1, CloseReason::Revoked, None));
    }
}
