//! Workload addresses: an overlay address that belongs to a workload, not to a node, held by
//! at most one node at a time and moved between nodes by the coordinator.
//!
//! Fencing has three parts:
//!
//! - **Generations.** Every change of holder takes a new, higher generation
//!   ([`WorkloadInfo::generation`]). An agent remembers the highest generation it has seen of
//!   each workload ([`Holdings`]) and never acts on an older one, so a stale map (a cache read at
//!   start-up, a delayed full map) cannot hand an address back.
//! - **Leases.** A holder sends heartbeats; each answer ([`crate::control::ServerMessage::Lease`])
//!   makes it the holder until *the instant the heartbeat was sent* plus the lease. The
//!   coordinator counts from the instant it *received* the latest heartbeat ([`LeaseTable`]),
//!   which is later, so when the coordinator considers a lease over, the holder has already
//!   stopped answering. A holder cut off from the coordinator therefore goes quiet on its own
//!   before anyone else is given its address.
//! - **Release on sight.** An agent that learns of a newer generation held elsewhere releases
//!   the address at once and forwards what still reaches it for the address to the new holder
//!   for a grace period ([`Holdings::forwards`]): a planned move loses nothing in flight. It
//!   acknowledges the change at once: a heartbeat carrying its map's version
//!   ([`Holdings::take_release_ack`]).
//! - **Confirmed handovers.** A node that the map makes the holder answers only once the
//!   coordinator has confirmed that generation ([`Holdings::on_confirmed`]): every node that
//!   held the address before has acknowledged the change, or its lease has surely run out.
//!   So a holder cut off just before a move (which keeps its lease and cannot learn of the
//!   move) is never answered over. What reaches the new holder for the address before its
//!   confirmation is kept back, not answered ([`Holdings::awaited`]), and answered once the
//!   confirmation has come: the old holder had stopped by then. Invariant: at no instant do two nodes answer for one
//!   address, given clocks that run at the same rate (each node counts its lease from the
//!   send time of the heartbeat the coordinator answered, before the coordinator received
//!   it, and stops at its end on its own clock; the coordinator confirms the next holder
//!   only after the old holder's acknowledgement or once a lease plus a margin has passed
//!   since the change was published, on its own clock). A coordinator from before 2026-12
//!   confirms nothing: its answers carry no confirmations, and the node answers as soon as its
//!   map names it, as before.
//!
//! Everything here is a pure state machine that is given time.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::netmap::{Netmap, NodeId};

/// The default lease: how long a holder keeps answering for an address after the last
/// heartbeat the coordinator answered (counted from when that heartbeat was sent).
pub const DEFAULT_LEASE: Duration = Duration::from_millis(1500);
/// The default grace period during which a former holder forwards packets for the address to
/// the new holder.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);
/// How long a node keeps a workload address prepared for a move that does not land.
pub const PREPARE_HOLD: Duration = Duration::from_secs(3);
/// How many heartbeats a lease spans: a holder sends one every `lease / HEARTBEATS_PER_LEASE`,
/// so one or two lost heartbeats do not end the lease.
pub const HEARTBEATS_PER_LEASE: u32 = 5;
/// The pace of a holder's heartbeats while the latest answer is overdue (none for a whole
/// heartbeat interval): the coordinator may have restarted, and each heartbeat that reaches a
/// restarted coordinator draws the stateless reset that tells the agent to reconnect at once,
/// before its lease runs out.
pub const OVERDUE_HEARTBEAT: Duration = Duration::from_millis(50);

/// One workload as every node of its network sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadInfo {
    /// The workload's identifier, never reused: a workload deleted and created again under
    /// the same name is another workload, whose generations start again.
    #[serde(default)]
    pub id: u64,
    /// The workload's name, unique in its network.
    pub name: String,
    /// Its overlay address (a host prefix).
    pub address: IpNet,
    /// Its IPv6 address (a host prefix) when its network has an IPv6 prefix: it goes with
    /// `address` (held, moved and forwarded with it). Absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address6: Option<IpNet>,
    /// The node that holds it now; `None`: detached (nobody answers for it).
    #[serde(default)]
    pub holder: Option<NodeId>,
    /// Bumped by every change of holder; only grows.
    pub generation: u64,
    /// The holder before the last change, which forwards to the new one for a grace period.
    #[serde(default)]
    pub previous: Option<NodeId>,
    /// Every node that may hold the address (allowed claimers and standbys, the holder
    /// included; not the previous holder unless it is one of those). Being one is no leave
    /// to send from the address: peers accept that only from the holder, and briefly from
    /// the previous one ([`Holdings::senders`]).
    #[serde(default)]
    pub candidates: Vec<NodeId>,
    /// The grace period for forwarding after a move, in milliseconds. Absent: the default.
    #[serde(default)]
    pub grace_ms: Option<u64>,
    /// Tags, given by operators; policies select by them. Absent means none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

impl WorkloadInfo {
    /// The grace period of this workload.
    pub fn grace(&self) -> Duration {
        self.grace_ms.map_or(DEFAULT_GRACE, Duration::from_millis)
    }

    /// The workload's (IPv4) address, the one its fencing state is keyed by.
    pub fn ip(&self) -> IpAddr {
        self.address.addr()
    }

    /// Every address of the workload: `address`, then `address6` if any.
    pub fn addresses(&self) -> impl Iterator<Item = IpNet> + '_ {
        std::iter::once(self.address).chain(self.address6)
    }
}

/// A generation of a workload that its holder may answer at: the coordinator's confirmation
/// of a handover ([`crate::control::ServerMessage::Lease`], [`Holdings::on_confirmed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    /// The workload's id ([`WorkloadInfo::id`]).
    pub workload: u64,
    /// The generation confirmed (and every older one).
    pub generation: u64,
}

/// One address this node should answer for now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Held {
    /// The address (a host prefix).
    pub address: IpNet,
    /// The generation it is held at.
    pub generation: u64,
}

/// An address this node released, and where packets that still reach it for the address go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward {
    /// The released address.
    pub address: IpAddr,
    /// The new holder.
    pub to: NodeId,
    /// When forwarding stops.
    pub until: Instant,
}

/// The nodes whose packets may carry a workload address as their source, as this node sees it
/// at an instant (see [`Holdings::senders`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Senders {
    /// The workload address.
    pub address: IpAddr,
    /// The nodes that may send from it (never this node).
    pub nodes: Vec<NodeId>,
}

/// A workload address this node holds or is being prepared for, and the node that may relay
/// packets of other senders to it (see [`Holdings::relays`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relay {
    /// The workload address.
    pub address: IpAddr,
    /// The node that may relay packets to it (never this node).
    pub from: NodeId,
}

/// The agent's side of fencing: which workload addresses this node may answer for, given the
/// network map it has, the leases it was granted and the time. See the module documentation.
#[derive(Debug)]
pub struct Holdings {
    me: NodeId,
    /// The highest generation seen of each workload, by name, with the workload's id.
    seen: HashMap<String, (u64, u64)>,
    /// When this node first saw a workload at its newest generation: (id, generation,
    /// instant). Kept by generation, so that neither a later map at the same generation nor
    /// the workload leaving a map and coming back moves the instant: the windows a change
    /// opens ([`Holdings::relays`], [`Holdings::senders`]) belong to that one change.
    first_seen: HashMap<String, (u64, u64, Instant)>,
    /// The newest map's workloads, by name.
    current: BTreeMap<String, WorkloadInfo>,
    /// The lease: valid before this instant.
    lease_until: Option<Instant>,
    /// A lease granted at a map version this node has not reached yet: (version, until).
    pending: Option<(u64, Instant)>,
    /// The version of the newest map taken.
    map_version: u64,
    /// Heartbeats sent and not yet answered: (sequence number, when sent).
    in_flight: VecDeque<(u64, Instant)>,
    next_seq: u64,
    last_heartbeat: Option<Instant>,
    /// The lease length the coordinator announced last (used to pace heartbeats).
    lease: Duration,
    forwards: BTreeMap<String, Forward>,
    /// Moves being prepared here: the address, the generation it will take, and until when.
    tentative: BTreeMap<String, (IpNet, u64, Instant)>,
    /// Whether the coordinator confirms handovers (its latest lease answer carried
    /// confirmations): then a workload is answered for only at a confirmed generation.
    confirms: bool,
    /// The highest generation confirmed for this node, by workload id (ids are never
    /// reused, so a workload created again under a name inherits nothing).
    confirmed: HashMap<u64, u64>,
    /// A map took a workload from this node that it has not acknowledged yet.
    release_ack: bool,
}

impl Holdings {
    /// Nothing held, no lease: a node answers for nothing until the coordinator has answered
    /// one of its heartbeats.
    pub fn new(me: NodeId) -> Self {
        Holdings {
            me,
            seen: HashMap::new(),
            first_seen: HashMap::new(),
            current: BTreeMap::new(),
            lease_until: None,
            pending: None,
            map_version: 0,
            in_flight: VecDeque::new(),
            next_seq: 1,
            last_heartbeat: None,
            lease: DEFAULT_LEASE,
            forwards: BTreeMap::new(),
            tentative: BTreeMap::new(),
            confirms: false,
            confirmed: HashMap::new(),
            release_ack: false,
        }
    }

    /// This node's id.
    pub fn me(&self) -> NodeId {
        self.me
    }

    /// Takes the workloads of a newer map. Entries older than a generation already seen are
    /// ignored (fencing). An address this node answered for until now and that is now held by
    /// another node is forwarded to it until the workload's grace period ends.
    pub fn on_map(&mut self, map: &Netmap, now: Instant) {
        self.on_workloads(map.version, &map.workloads, now);
    }

    /// [`Holdings::on_map`] for a map at `version` whose workloads are `workloads`, however
    /// the rest of the map is held.
    pub fn on_workloads(
        &mut self,
        version: u64,
        workloads: &BTreeMap<String, WorkloadInfo>,
        now: Instant,
    ) {
        let held_before: BTreeMap<String, Held> = self.held_named(now);
        self.map_version = self.map_version.max(version);
        if let Some((v, until)) = self.pending {
            if v <= self.map_version {
                self.pending = None;
                self.extend(until);
            }
        }
        let mut next = BTreeMap::new();
        for w in workloads.values() {
            let seen = self.seen.entry(w.name.clone()).or_insert((w.id, 0));
            if seen.0 != w.id {
                // Another workload under the same name: its generations start again.
                *seen = (w.id, 0);
            }
            if w.generation < seen.1 {
                // A stale entry: keep what we knew.
                if let Some(old) = self.current.get(&w.name) {
                    next.insert(w.name.clone(), old.clone());
                }
                continue;
            }
            let first = self.first_seen.get(&w.name);
            if first.is_none_or(|(id, generation, _)| (*id, *generation) != (w.id, w.generation)) {
                self.first_seen
                    .insert(w.name.clone(), (w.id, w.generation, now));
            }
            seen.1 = w.generation;
            next.insert(w.name.clone(), w.clone());
        }
        // A workload this node was the holder of and is no longer (moved, detached, deleted):
        // the coordinator waits for the acknowledgement before the next holder answers.
        let me = self.me;
        if self.current.values().any(|w| {
            w.holder == Some(me)
                && next
                    .get(&w.name)
                    .is_none_or(|n| n.holder != Some(me) || n.id != w.id)
        }) {
            self.release_ack = true;
        }
        // Workloads deleted from the map are forgotten, except their highest generation.
        self.current = next;
        // A prepared move has landed (or another one won): it is no longer tentative.
        let seen = &self.seen;
        self.tentative
            .retain(|name, (_, generation, _)| seen.get(name).is_some_and(|s| s.1 < *generation));
        for (name, held) in held_before {
            match self.current.get(&name) {
                Some(w) if w.holder == Some(self.me) => {
                    self.forwards.remove(&name);
                }
                Some(w) => {
                    if let Some(to) = w.holder {
                        self.forwards.insert(
                            name.clone(),
                            Forward {
                                address: held.address.addr(),
                                to,
                                until: now + w.grace(),
                            },
                        );
                    } else {
                        self.forwards.remove(&name);
                    }
                }
                None => {
                    self.forwards.remove(&name);
                }
            }
        }
        // A forward follows the workload when it moves on again, and stops when it comes back.
        let mut done = Vec::new();
        for (name, f) in &mut self.forwards {
            match self.current.get(name).and_then(|w| w.holder) {
                Some(h) if h == self.me => done.push(name.clone()),
                Some(h) => f.to = h,
                None => done.push(name.clone()),
            }
        }
        for n in done {
            self.forwards.remove(&n);
        }
    }

    /// The coordinator is about to give `workload` to this node at `generation`: the address
    /// is set up here ahead of the switch (see [`Holdings::tentative`]) so that the first
    /// packets after it find it, and dropped if the move has not landed within
    /// [`PREPARE_HOLD`]. Nothing can reach it here before the switch: no peer routes it to
    /// this node until the new generation is in its map.
    pub fn on_prepare(&mut self, workload: &str, generation: u64, now: Instant) {
        let Some(w) = self.current.get(workload) else {
            return;
        };
        if self
            .seen
            .get(workload)
            .is_some_and(|s| s.0 == w.id && s.1 >= generation)
        {
            return;
        }
        self.tentative.insert(
            workload.to_string(),
            (w.address, generation, now + PREPARE_HOLD),
        );
        // The address is coming back here: stop forwarding it away (to the node that is about
        // to forward it here), or packets would bounce between the two.
        self.forwards.remove(workload);
    }

    /// Addresses set up for moves being prepared, not (yet) held. Only packets sent after the
    /// switch can reach them (no peer routes them here before), so answering those is safe.
    /// None while the coordinator confirms handovers: the address then goes up only once this
    /// node may answer for it (the holder it replaces may be cut off, and still answering).
    pub fn tentative(&mut self, now: Instant) -> Vec<IpNet> {
        self.tentative.retain(|_, (_, _, until)| now < *until);
        if self.confirms {
            return Vec::new();
        }
        self.tentative.values().map(|(a, _, _)| *a).collect()
    }

    /// The welcome said that the coordinator confirms handovers
    /// ([`crate::control::Welcome::confirms_handovers`]): from now on, as after a lease answer
    /// with confirmations. A welcome that does not say leaves it to the lease answers.
    pub fn on_welcome(&mut self, confirms_handovers: bool) {
        if confirms_handovers {
            self.confirms = true;
        }
    }

    /// What a lease message said about handovers
    /// ([`crate::control::ServerMessage::Lease`]'s `confirmed`): `Some` (a coordinator that
    /// confirms handovers) adds the generations it confirms, by workload id; they are kept
    /// (a confirmation is never withdrawn: the old holders it waited for have let go for
    /// good). `None` (a coordinator from before 2026-12): nothing is held back.
    pub fn on_confirmed(&mut self, confirmed: Option<&[Confirmation]>) {
        let Some(confirmed) = confirmed else {
            self.confirms = false;
            return;
        };
        self.confirms = true;
        for c in confirmed {
            let g = self.confirmed.entry(c.workload).or_insert(0);
            *g = (*g).max(c.generation);
        }
    }

    /// Whether this node may answer for `w` as far as handovers go: the coordinator confirmed
    /// its generation, or confirms nothing.
    fn confirmed(&self, w: &WorkloadInfo) -> bool {
        !self.confirms
            || self
                .confirmed
                .get(&w.id)
                .is_some_and(|g| *g >= w.generation)
    }

    /// The workload addresses this node is about to answer for and may not yet, while the
    /// coordinator confirms handovers: those the map gives it at a generation not confirmed
    /// yet ([`Holdings::held_back`]), and those of moves being prepared here. Packets that
    /// reach this node for them (peers whose maps name it already, the old holder forwarding)
    /// are kept back, not answered, until the confirmation (the data plane queues them, a
    /// bounded time). Empty from a coordinator that confirms nothing (prepared addresses are
    /// then [`Holdings::tentative`]).
    pub fn awaited(&mut self, now: Instant) -> Vec<IpNet> {
        self.tentative.retain(|_, (_, _, until)| now < *until);
        if !self.confirms {
            return Vec::new();
        }
        let mut out: Vec<IpNet> = self
            .current
            .values()
            .filter(|w| w.holder == Some(self.me) && !self.confirmed(w))
            .map(|w| w.address)
            .chain(self.tentative.values().map(|(a, _, _)| *a))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Workloads the map gives this node that it may not answer for yet: the coordinator has
    /// not confirmed their handover (see the module documentation).
    pub fn held_back(&self) -> Vec<String> {
        self.current
            .values()
            .filter(|w| w.holder == Some(self.me) && !self.confirmed(w))
            .map(|w| w.name.clone())
            .collect()
    }

    /// Whether a map took a workload from this node since the last call: the node then
    /// acknowledges it at once (a heartbeat with its map's version), so that the next holder
    /// may answer.
    pub fn take_release_ack(&mut self) -> bool {
        std::mem::take(&mut self.release_ack)
    }

    /// Whether this node is the holder of any workload in the newest map (and so must keep
    /// its lease alive).
    pub fn is_holder(&self) -> bool {
        self.current.values().any(|w| w.holder == Some(self.me))
    }

    /// A heartbeat to send now, if one is due: its sequence number. Heartbeats are sent only
    /// by holders, every `lease / HEARTBEATS_PER_LEASE`, and every [`OVERDUE_HEARTBEAT`] while
    /// the oldest unanswered one is older than that interval.
    pub fn poll_heartbeat(&mut self, now: Instant) -> Option<u64> {
        if !self.is_holder() {
            return None;
        }
        let due = self.next_heartbeat().is_none_or(|t| now >= t);
        due.then(|| self.heartbeat_now(now))
    }

    /// When the next heartbeat falls due: `None` when this node holds nothing, or has sent
    /// no heartbeat yet (then one is due at once).
    pub fn next_heartbeat(&self) -> Option<Instant> {
        if !self.is_holder() {
            return None;
        }
        let last = self.last_heartbeat?;
        let overdue = self.in_flight.front().is_some_and(|(_, sent)| {
            last.saturating_duration_since(*sent) >= self.heartbeat_interval()
        });
        let pace = if overdue {
            OVERDUE_HEARTBEAT.min(self.heartbeat_interval())
        } else {
            self.heartbeat_interval()
        };
        Some(last + pace)
    }

    /// A heartbeat to send now whatever the pace: this node is about to become a holder (a
    /// move is being prepared), so that it has a lease when the move lands.
    pub fn heartbeat_now(&mut self, now: Instant) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.last_heartbeat = Some(now);
        self.in_flight.push_back((seq, now));
        // Answers older than a few leases no longer matter.
        while self.in_flight.len() > 64 {
            self.in_flight.pop_front();
        }
        seq
    }

    /// The interval between heartbeats.
    pub fn heartbeat_interval(&self) -> Duration {
        self.lease / HEARTBEATS_PER_LEASE
    }

    /// The coordinator answered heartbeat `seq` with a lease of `lease`, when its map was at
    /// `version`: this node may answer for what its map gives it until the heartbeat's send
    /// time plus `lease`, once its own map has reached `version` (so that a node that missed
    /// a move cannot renew a lease for an address it no longer holds). Unknown or repeated
    /// answers change nothing.
    pub fn on_lease(&mut self, seq: u64, lease: Duration, version: u64) {
        let Some(pos) = self.in_flight.iter().position(|(s, _)| *s == seq) else {
            return;
        };
        let (_, sent) = self.in_flight[pos];
        // Answers to earlier heartbeats are implied by this one.
        self.in_flight.drain(..=pos);
        let until = sent + lease;
        if lease.is_zero() {
            // A refusal (the coordinator is failing this node's workloads over): no renewal.
            return;
        }
        self.lease = lease.max(Duration::from_millis(50));
        if version <= self.map_version {
            self.extend(until);
        } else if self.pending.is_none_or(|(v, _)| version >= v) {
            self.pending = Some((version, until));
        }
    }

    fn extend(&mut self, until: Instant) {
        if self.lease_until.is_none_or(|u| until > u) {
            self.lease_until = Some(until);
        }
    }

    /// Drops the lease at once (the session was refused or the node revoked).
    pub fn drop_lease(&mut self) {
        self.lease_until = None;
        self.pending = None;
        self.in_flight.clear();
    }

    /// Whether the lease is valid at `now`.
    pub fn lease_valid(&self, now: Instant) -> bool {
        self.lease_until.is_some_and(|u| now < u)
    }

    /// [`Holdings::held`], by workload name.
    pub fn held_named(&self, now: Instant) -> BTreeMap<String, Held> {
        if !self.lease_valid(now) {
            return BTreeMap::new();
        }
        self.current
            .values()
            .filter(|w| w.holder == Some(self.me) && self.confirmed(w))
            .map(|w| {
                (
                    w.name.clone(),
                    Held {
                        address: w.address,
                        generation: w.generation,
                    },
                )
            })
            .collect()
    }

    /// The addresses this node answers for at `now`: those the newest map gives it at a
    /// generation the coordinator confirmed (or all, from a coordinator that confirms nothing),
    /// while the lease is valid.
    pub fn held(&self, now: Instant) -> Vec<Held> {
        self.held_named(now).into_values().collect()
    }

    /// The addresses this node released and still forwards at `now`, with their new holders.
    pub fn forwards(&mut self, now: Instant) -> Vec<Forward> {
        self.forwards.retain(|_, f| now < f.until);
        self.forwards.values().copied().collect()
    }

    /// The highest generation seen of a workload.
    pub fn seen_generation(&self, name: &str) -> Option<u64> {
        self.seen.get(name).map(|s| s.1)
    }

    /// Whether `workload` changed holder less than its grace period before `now`, counted
    /// from the first map that showed this node the change (later maps at the same
    /// generation do not count again).
    pub fn in_grace(&self, workload: &str, now: Instant) -> bool {
        self.current
            .get(workload)
            .and_then(|w| self.window_end(w))
            .is_some_and(|end| now < end)
    }

    /// When the grace period of `w`'s latest change ends, as this node saw it.
    fn window_end(&self, w: &WorkloadInfo) -> Option<Instant> {
        let (id, generation, at) = self.first_seen.get(&w.name)?;
        ((*id, *generation) == (w.id, w.generation)).then(|| *at + w.grace())
    }

    /// Who may send packets from each workload address at `now`, as this node sees it: the
    /// holder, and for the grace period after a change (counted from the first map that
    /// showed this node the change, as [`Holdings::relays`]) the previous holder, whose
    /// answers written before it saw the move are still on their way. A detached workload:
    /// nobody. Standbys and allowed nodes are not senders for being candidates: they may
    /// become holders, not send as one.
    pub fn senders(&self, now: Instant) -> Vec<Senders> {
        self.current
            .values()
            .map(|w| {
                let previous = w
                    .previous
                    .filter(|p| w.holder.is_some() && w.holder != Some(*p))
                    .filter(|_| self.in_grace(&w.name, now));
                Senders {
                    address: w.ip(),
                    nodes: w
                        .holder
                        .into_iter()
                        .chain(previous)
                        .filter(|n| *n != self.me)
                        .collect(),
                }
            })
            .collect()
    }

    /// The workload addresses this node holds at `now` or is being prepared for, and the one
    /// node that may relay packets of other senders to each (the packets peers still send to
    /// it because their maps are not updated yet):
    ///
    /// - held here at generation G, or given here at G and awaiting the coordinator's
    ///   confirmation ([`Holdings::awaited`]): G's previous holder, for the grace period
    ///   counted from the first map that showed this node G. Keyed by G: no later map, claim
    ///   or restart of the session reopens it; only another change of holder opens another
    ///   window.
    /// - being prepared here: the current holder (it forwards once it has seen the move, so
    ///   whatever it relays comes after the switch), until the preparation ends.
    ///
    /// What is relayed to an awaited address is kept back with the rest of its packets until
    /// the confirmation, never answered before it.
    ///
    /// # Security
    ///
    /// The new holder cannot tell a packet the relay received from a peer from one it made
    /// up; the window is what bounds what a relay can send. The data plane narrows it further
    /// (a peer's own node address as source, the workload address as destination).
    pub fn relays(&self, now: Instant) -> Vec<Relay> {
        let held = self.held_named(now);
        self.current
            .values()
            .filter_map(|w| {
                let awaited = w.holder == Some(self.me) && !self.confirmed(w);
                let from = if held.contains_key(&w.name) || awaited {
                    w.previous.filter(|_| self.in_grace(&w.name, now))?
                } else if self
                    .tentative
                    .get(&w.name)
                    .is_some_and(|(_, _, until)| now < *until)
                {
                    w.holder?
                } else {
                    return None;
                };
                (from != self.me).then(|| Relay {
                    address: w.ip(),
                    from,
                })
            })
            .collect()
    }

    /// The next instant after `now` at which [`Holdings::held`], [`Holdings::forwards`],
    /// [`Holdings::tentative`], [`Holdings::awaited`], [`Holdings::relays`] or
    /// [`Holdings::senders`] may change by
    /// time alone (a lease, a forward, a prepared move or a change's grace period ending).
    /// Heartbeats are paced apart: [`Holdings::next_heartbeat`].
    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        let lease = self.lease_until.filter(|_| self.is_holder());
        let forwards = self.forwards.values().map(|f| f.until);
        let tentative = self.tentative.values().map(|(_, _, until)| *until);
        let windows = self
            .current
            .values()
            .filter(|w| w.previous.is_some())
            .filter_map(|w| self.window_end(w));
        lease
            .into_iter()
            .chain(forwards)
            .chain(tentative)
            .chain(windows)
            .filter(|t| *t > now)
            .min()
    }
}

/// The coordinator's side of leases: when each holder's latest heartbeat arrived, and which
/// holders have gone silent for longer than the lease plus a margin.
#[derive(Debug)]
pub struct LeaseTable {
    lease: Duration,
    margin: Duration,
    last: HashMap<NodeId, Instant>,
    started: Instant,
    /// The longest lease the previous run may have granted (its stop lease, see
    /// [`LeaseTable::stop`]): what any node may still hold, counted from the start.
    inherited: Duration,
    /// Since when, and with what lease, heartbeats are answered while the coordinator stops.
    stopping: Option<(Instant, Duration)>,
    /// Nodes whose workloads are being taken from them: their heartbeats are answered with
    /// no lease until the change is committed.
    fenced: HashMap<NodeId, u32>,
    /// `last`'s size at which nodes not heard from for [`LeaseTable::forget_after`] are
    /// forgotten: nodes come and go (a revoked or deleted node joins again as a new one), and
    /// the table would otherwise keep every node a coordinator ever heard from.
    prune_at: usize,
}

/// The least `last` is let grow to before it is pruned (see [`LeaseTable::prune`]).
const PRUNE_AT_LEAST: usize = 1024;

/// After a coordinator start, how much longer than a lease a holder that has not been heard
/// from yet is given before its workloads fail over: agents reconnect with a backoff.
pub const STARTUP_GRACE: Duration = Duration::from_secs(3);

impl LeaseTable {
    /// A table for leases of `lease`; a holder is silent once no heartbeat arrived for
    /// `lease + margin`. `started` is when the coordinator started: a holder that has not sent
    /// a heartbeat since then is treated as if it had sent one at that instant (it may hold a
    /// lease granted by the previous run).
    pub fn new(lease: Duration, margin: Duration, started: Instant) -> Self {
        LeaseTable {
            lease,
            margin,
            last: HashMap::new(),
            started,
            inherited: lease,
            stopping: None,
            fenced: HashMap::new(),
            prune_at: PRUNE_AT_LEAST,
        }
    }

    /// The previous run may have granted leases up to `longest` (it stopped granting its
    /// stop lease, [`LeaseTable::stop`]): every node is counted as possibly holding that long
    /// from the start ([`LeaseTable::inherited_until`]), whether heard from since or not.
    pub fn inherit(mut self, longest: Duration) -> Self {
        self.inherited = longest.max(self.lease);
        self
    }

    /// The coordinator is stopping (to restart, alone: nobody else can renew a lease while it
    /// is away): from `now` on, heartbeats are answered with `lease` (if longer than the
    /// usual one), so that holders ride out the restart. The next run must be started with
    /// [`LeaseTable::inherit`] of it.
    pub fn stop(&mut self, lease: Duration, now: Instant) {
        // (`now` is read under the caller's lock on the table: a heartbeat answered with the
        // usual lease cannot be stamped after it.)
        if self.stopping.is_none() {
            self.stopping = Some((now, lease.max(self.lease)));
        }
    }

    /// While stopping: how many holders with a running lease (heard from within a lease
    /// and the margin before the stop, not fenced) have not sent a heartbeat since, and so
    /// have no stop lease yet. Zero when not stopping.
    pub fn without_stop_lease(&self) -> usize {
        let Some((since, _)) = self.stopping else {
            return 0;
        };
        let running = since.checked_sub(self.lease + self.margin);
        self.last
            .iter()
            .filter(|(n, t)| {
                **t < since && running.is_none_or(|r| **t >= r) && !self.fenced.contains_key(n)
            })
            .count()
    }

    /// The lease a heartbeat that arrives at `at` is answered with.
    fn granted_at(&self, at: Instant) -> Duration {
        match self.stopping {
            Some((since, lease)) if at >= since => lease,
            _ => self.lease,
        }
    }

    /// The longest lease granted from now on: the stop lease while stopping.
    pub fn granting(&self) -> Duration {
        self.stopping.map_or(self.lease, |(_, l)| l)
    }

    /// How long after its last heartbeat a node is forgotten: long past any lease, margin and
    /// start-up grace, so that a forgotten node is as silent as it was (see
    /// [`LeaseTable::expires`]: the start of a coordinator that has run this long is older).
    fn forget_after(&self) -> Duration {
        (2 * (self.granting().max(self.inherited) + self.margin) + STARTUP_GRACE)
            .max(Duration::from_secs(600))
    }

    /// Forgets the nodes not heard from for [`LeaseTable::forget_after`] (fenced ones are
    /// kept) once the table has doubled since the last time: amortised O(1) a heartbeat.
    fn prune(&mut self, now: Instant) {
        if self.last.len() < self.prune_at {
            return;
        }
        let horizon = self.forget_after();
        let fenced = &self.fenced;
        self.last
            .retain(|n, t| fenced.contains_key(n) || now.saturating_duration_since(*t) < horizon);
        self.prune_at = (2 * self.last.len()).max(PRUNE_AT_LEAST);
    }

    /// The lease granted with each answer (but while stopping, see [`LeaseTable::granting`]).
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// A heartbeat from `node` arrived at `now`: the lease to answer with, zero while the
    /// node is fenced.
    pub fn heartbeat(&mut self, node: NodeId, now: Instant) -> Duration {
        if self.fenced.contains_key(&node) {
            return Duration::ZERO;
        }
        let e = self.last.entry(node).or_insert(now);
        if now > *e {
            *e = now;
        }
        self.prune(now);
        self.granted_at(now)
    }

    /// Stops renewing `node`'s lease until [`LeaseTable::unfence`] (as many times as fenced):
    /// called when its workloads are about to be given to another node without its knowledge
    /// (a failover, a move away from a holder that is not answering), so that a heartbeat
    /// arriving meanwhile cannot extend a lease past the change.
    pub fn fence(&mut self, node: NodeId) {
        *self.fenced.entry(node).or_insert(0) += 1;
    }

    /// Ends one [`LeaseTable::fence`].
    pub fn unfence(&mut self, node: NodeId) {
        if let Some(n) = self.fenced.get_mut(&node) {
            *n -= 1;
            if *n == 0 {
                self.fenced.remove(&node);
            }
        }
    }

    /// How long ago `node`'s latest heartbeat arrived (since the start when none did).
    pub fn heard_ago(&self, node: NodeId, now: Instant) -> Duration {
        now.saturating_duration_since(
            self.last
                .get(&node)
                .copied()
                .unwrap_or(self.started)
                .max(self.started),
        )
    }

    /// A node becomes the holder at `now` (a move or a claim): its lease period starts now, so
    /// that it is not declared silent before it had a chance to send a heartbeat.
    pub fn granted(&mut self, node: NodeId, now: Instant) {
        // Counted even while the node is fenced (for another workload): the grant is the
        // coordinator's own doing.
        let e = self.last.entry(node).or_insert(now);
        if now > *e {
            *e = now;
        }
        self.prune(now);
    }

    /// Whether `node`'s lease has surely run out at `now`: no heartbeat for `lease + margin`.
    pub fn is_silent(&self, node: NodeId, now: Instant) -> bool {
        now >= self.expires(node)
            && now.saturating_duration_since(self.expires(node)) > Duration::ZERO
    }

    /// When `node`'s lease surely ends, as far as the coordinator knows: never before what
    /// the previous run may have granted it ([`LeaseTable::inherited_until`]; a renewal here
    /// can be shorter than the stop lease it still holds). A node not heard from since the
    /// coordinator started gets [`STARTUP_GRACE`] more than a lease, or the previous run's
    /// stop lease if longer ([`LeaseTable::inherit`]).
    pub fn expires(&self, node: NodeId) -> Instant {
        match self.last.get(&node) {
            Some(t) if *t >= self.started => {
                (*t + self.granted_at(*t) + self.margin).max(self.inherited_until())
            }
            _ => self.started + self.margin + self.inherited.max(self.lease + STARTUP_GRACE),
        }
    }

    /// Until when any node may still answer under a lease the previous run granted (its stop
    /// lease, [`LeaseTable::inherit`]), heard from since or not.
    pub fn inherited_until(&self) -> Instant {
        self.started + self.inherited + self.margin
    }
}

/// The failover decision for one workload: when its holder is silent, the first standby in
/// `standby` order that is online and not silent itself. `None`: nothing to do.
pub fn failover_target(
    w: &WorkloadInfo,
    standby: &[NodeId],
    leases: &LeaseTable,
    online: impl Fn(NodeId) -> bool,
    now: Instant,
) -> Option<NodeId> {
    let holder = w.holder?;
    if !leases.is_silent(holder, now) {
        return None;
    }
    standby.iter().copied().find(|s| *s != holder && online(*s))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Workload `name` at 100.64.50.10, candidates 1, 2 and 3 (shared with other tests).
    pub(crate) fn wl(name: &str, holder: Option<NodeId>, generation: u64) -> WorkloadInfo {
        WorkloadInfo {
            id: 7,
            name: name.into(),
            address: "100.64.50.10/32".parse().unwrap(),
            holder,
            generation,
            previous: None,
            candidates: vec![1, 2, 3],
            grace_ms: Some(1000),
            tags: Vec::new(),
            address6: None,
        }
    }

    /// A map at `version` holding only `ws`.
    pub(crate) fn map(version: u64, ws: &[WorkloadInfo]) -> Netmap {
        Netmap {
            version,
            workloads: ws.iter().map(|w| (w.name.clone(), w.clone())).collect(),
            ..Netmap::default()
        }
    }

    #[test]
    fn nothing_is_held_without_a_lease() {
        let t0 = Instant::now();
        let mut h = Holdings::new(1);
        h.on_map(&map(1, &[wl("chat", Some(1), 1)]), t0);
        assert!(h.held(t0).is_empty());
        let seq = h.poll_heartbeat(t0).unwrap();
        assert_eq!(h.poll_heartbeat(t0), None, "one heartbeat per interval");
        h.on_lease(seq, Duration::from_millis(1500), 1);
        assert_eq!(h.held(t0 + Duration::from_millis(10)).len(), 1);
        // The lease counts from the send time.
        assert_eq!(h.held(t0 + Duration::from_millis(1499)).len(), 1);
        assert!(h.held(t0 + Duration::from_millis(1500)).is_empty());
        assert_eq!(h.next_heartbeat(), Some(t0 + Duration::from_millis(300)));
        assert_eq!(h.poll_timeout(t0), Some(t0 + Duration::from_millis(1500)));
        assert_eq!(
            h.poll_timeout(t0 + Duration::from_millis(1500)),
            None,
            "no timer in the past"
        );
    }

    #[test]
    fn a_newer_generation_elsewhere_releases_and_forwards() {
        let t0 = Instant::now();
        let mut h = Holdings::new(1);
        h.on_map(&map(1, &[wl("chat", Some(1), 1)]), t0);
        let s = h.poll_heartbeat(t0).unwrap();
        h.on_lease(s, Duration::from_secs(5), 1);
        h.on_map(
            &map(2, &[wl("chat", Some(2), 2)]),
            t0 + Duration::from_millis(5),
        );
        assert!(h.held(t0 + Duration::from_millis(6)).is_empty());
        let f = h.forwards(t0 + Duration::from_millis(6));
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].to, 2);
        // It follows a further move, and ends after the grace period.
        h.on_map(
            &map(3, &[wl("chat", Some(3), 3)]),
            t0 + Duration::from_millis(7),
        );
        assert_eq!(h.forwards(t0 + Duration::from_millis(8))[0].to, 3);
        assert!(h.forwards(t0 + Duration::from_millis(1006)).is_empty());
        // A stale map cannot hand the address back.
        h.on_map(
            &map(1, &[wl("chat", Some(1), 1)]),
            t0 + Duration::from_millis(9),
        );
        assert!(h.held(t0 + Duration::from_millis(10)).is_empty());
        assert_eq!(h.seen_generation("chat"), Some(3));
    }

    #[test]
    fn only_holders_heartbeat_and_stale_answers_are_ignored() {
        let t0 = Instant::now();
        let mut h = Holdings::new(2);
        h.on_map(&map(1, &[wl("chat", Some(1), 1)]), t0);
        assert_eq!(h.poll_heartbeat(t0), None);
        h.on_lease(99, Duration::from_secs(5), 1);
        assert!(!h.lease_valid(t0));
    }

    #[test]
    fn heartbeats_quicken_while_an_answer_is_overdue_and_slow_down_once_answered() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut h = Holdings::new(1);
        h.on_map(&map(1, &[wl("chat", Some(1), 1)]), t0);
        let interval = h.heartbeat_interval();
        let s1 = h.poll_heartbeat(t0).unwrap();
        h.on_lease(s1, DEFAULT_LEASE, 1);
        // Answered: the normal pace.
        assert_eq!(h.poll_heartbeat(t0 + interval - ms(1)), None);
        let s2 = h.poll_heartbeat(t0 + interval).unwrap();
        // Not answered yet, but not overdue either: still the normal pace.
        assert_eq!(h.next_heartbeat(), Some(t0 + 2 * interval));
        let s3 = h.poll_heartbeat(t0 + 2 * interval).unwrap();
        // s2 has now waited a whole interval: one every OVERDUE_HEARTBEAT.
        let t = t0 + 2 * interval;
        assert_eq!(h.next_heartbeat(), Some(t + OVERDUE_HEARTBEAT));
        assert_eq!(h.poll_heartbeat(t + OVERDUE_HEARTBEAT - ms(1)), None);
        let s4 = h.poll_heartbeat(t + OVERDUE_HEARTBEAT).unwrap();
        assert!(s2 < s3 && s3 < s4);
        // An answer (to any of them: a new session answers the newest) restores the pace.
        h.on_lease(s4, DEFAULT_LEASE, 1);
        let last = t + OVERDUE_HEARTBEAT;
        assert_eq!(h.poll_heartbeat(last + OVERDUE_HEARTBEAT), None);
        assert!(h.poll_heartbeat(last + interval).is_some());
    }

    #[test]
    fn a_prepared_address_is_tentative_until_the_move_lands_or_expires() {
        let t0 = Instant::now();
        let mut h = Holdings::new(2);
        h.on_map(&map(1, &[wl("chat", Some(1), 1)]), t0);
        h.on_prepare("chat", 2, t0);
        assert_eq!(h.tentative(t0).len(), 1);
        h.on_prepare("chat", 1, t0);
        let s = h.heartbeat_now(t0);
        h.on_lease(s, Duration::from_secs(5), 1);
        h.on_map(
            &map(2, &[wl("chat", Some(2), 2)]),
            t0 + Duration::from_millis(3),
        );
        assert!(
            h.tentative(t0 + Duration::from_millis(3)).is_empty(),
            "landed"
        );
        assert_eq!(h.held(t0 + Duration::from_millis(3)).len(), 1);
        // Preparing to take back an address this node forwards elsewhere ends the forwarding.
        let mut h = Holdings::new(1);
        h.on_map(&map(1, &[wl("chat", Some(1), 1)]), t0);
        let s = h.heartbeat_now(t0);
        h.on_lease(s, Duration::from_secs(5), 1);
        h.on_map(&map(2, &[wl("chat", Some(2), 2)]), t0);
        assert_eq!(h.forwards(t0).len(), 1);
        h.on_prepare("chat", 3, t0);
        assert!(h.forwards(t0).is_empty());
        // A move that never lands is forgotten.
        let mut h = Holdings::new(3);
        h.on_map(&map(1, &[wl("chat", Some(1), 1)]), t0);
        h.on_prepare("chat", 2, t0);
        assert_eq!(h.poll_timeout(t0), Some(t0 + PREPARE_HOLD));
        assert!(h.tentative(t0 + PREPARE_HOLD).is_empty());
        // Another node winning the generation ends it too.
        h.on_prepare("chat", 2, t0);
        h.on_map(&map(2, &[wl("chat", Some(2), 2)]), t0);
        assert!(h.tentative(t0).is_empty());
    }

    /// A node that never held anything learns from its welcome that the coordinator confirms
    /// handovers: its first prepared move sets up no address (its own host's connections to
    /// the address would be answered here, by nobody), the address is awaited instead. Without
    /// the welcome's word it would be set up until the first lease answer says so.
    #[test]
    fn a_welcome_that_confirms_handovers_keeps_the_first_prepared_address_down() {
        let t0 = Instant::now();
        let chat = wl("chat", Some(1), 1);
        let mut told = Holdings::new(3);
        told.on_welcome(true);
        told.on_map(&map(1, std::slice::from_ref(&chat)), t0);
        told.on_prepare("chat", 2, t0);
        assert!(
            told.tentative(t0).is_empty(),
            "no address up before a confirmation"
        );
        assert_eq!(told.awaited(t0), vec![chat.address]);
        // An older coordinator's welcome says nothing: as before, until a lease answer.
        let mut untold = Holdings::new(3);
        untold.on_welcome(false);
        untold.on_map(&map(1, std::slice::from_ref(&chat)), t0);
        untold.on_prepare("chat", 2, t0);
        assert_eq!(untold.tentative(t0), vec![chat.address]);
        let s = untold.heartbeat_now(t0);
        untold.on_lease(s, Duration::from_secs(5), 1);
        untold.on_confirmed(Some(&[]));
        assert!(untold.tentative(t0).is_empty());
    }

    #[test]
    fn a_lease_from_a_newer_map_waits_for_that_map() {
        let t0 = Instant::now();
        let mut h = Holdings::new(1);
        h.on_map(&map(3, &[wl("chat", Some(1), 1)]), t0);
        let s = h.poll_heartbeat(t0).unwrap();
        // The coordinator was at version 4 (it moved the workload away; the delta is late).
        h.on_lease(s, Duration::from_secs(5), 4);
        assert!(h.held(t0).is_empty(), "no lease before the map catches up");
        h.on_map(&map(4, &[wl("chat", Some(2), 2)]), t0);
        assert!(h.lease_valid(t0));
        assert!(
            h.held(t0).is_empty(),
            "and then the map says another node holds it"
        );
    }

    #[test]
    fn a_relay_window_belongs_to_one_move_and_never_reopens() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let relayers = |h: &Holdings, t: Instant| -> Vec<NodeId> {
            h.relays(t).into_iter().map(|r| r.from).collect()
        };
        // Node 2 holds chat at generation 2, taken from node 1 (grace: 1000 ms).
        let mut moved = wl("chat", Some(2), 2);
        moved.previous = Some(1);
        let mut h = Holdings::new(2);
        h.on_map(&map(1, &[moved.clone()]), t0);
        let s = h.heartbeat_now(t0);
        h.on_lease(s, Duration::from_secs(60), 1);
        assert_eq!(relayers(&h, t0), vec![1]);
        assert_eq!(h.relays(t0)[0].address, moved.ip());
        // A later map at the same generation does not restart the window.
        h.on_map(&map(2, &[moved.clone()]), t0 + ms(900));
        assert_eq!(relayers(&h, t0 + ms(999)), vec![1]);
        assert!(
            relayers(&h, t0 + ms(1000)).is_empty(),
            "the grace period is over"
        );
        // Nor does the workload leaving a map and coming back at the same generation.
        h.on_map(&map(3, &[]), t0 + ms(1100));
        h.on_map(&map(4, &[moved.clone()]), t0 + ms(1200));
        assert_eq!(h.held(t0 + ms(1200)).len(), 1);
        assert!(
            relayers(&h, t0 + ms(1300)).is_empty(),
            "the window of generation 2 does not reopen"
        );

        // Node 3, prepared to take it at generation 3, takes relays from the holder it takes
        // over from (node 2), never from the one before (node 1), even within its grace.
        let mut h = Holdings::new(3);
        h.on_map(&map(1, &[moved.clone()]), t0);
        h.on_prepare("chat", 3, t0 + ms(10));
        assert_eq!(relayers(&h, t0 + ms(20)), vec![2]);
        assert!(relayers(&h, t0 + ms(10) + PREPARE_HOLD).is_empty());
    }

    #[test]
    fn only_the_holder_sends_from_a_workload_address_and_its_predecessor_briefly() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let senders = |h: &Holdings, t: Instant| -> Vec<(IpAddr, Vec<NodeId>)> {
            h.senders(t)
                .into_iter()
                .map(|s| (s.address, s.nodes))
                .collect()
        };
        // Node 4 is a peer; chat may be held by 1, 2 and 3 and is held by 1.
        let ip = wl("chat", None, 0).ip();
        let mut h = Holdings::new(4);
        h.on_map(&map(1, &[wl("chat", Some(1), 1)]), t0);
        assert_eq!(
            senders(&h, t0),
            vec![(ip, vec![1])],
            "standbys and allowed nodes may not send as the workload"
        );
        assert_eq!(h.poll_timeout(t0), None);
        // A move to node 2: the previous holder for the grace period (its answers in flight,
        // its last ones before it saw the move), counted from the first map that showed it.
        let mut moved = wl("chat", Some(2), 2);
        moved.previous = Some(1);
        h.on_map(&map(2, &[moved.clone()]), t0 + ms(100));
        assert_eq!(senders(&h, t0 + ms(100)), vec![(ip, vec![2, 1])]);
        assert_eq!(h.poll_timeout(t0 + ms(100)), Some(t0 + ms(1100)));
        h.on_map(&map(3, &[moved.clone()]), t0 + ms(600));
        assert_eq!(senders(&h, t0 + ms(1099)), vec![(ip, vec![2, 1])]);
        assert_eq!(senders(&h, t0 + ms(1100)), vec![(ip, vec![2])]);
        // Detached: nobody, not even the node that just let it go.
        let mut detached = wl("chat", None, 3);
        detached.previous = Some(2);
        h.on_map(&map(4, &[detached]), t0 + ms(1200));
        assert_eq!(senders(&h, t0 + ms(1200)), vec![(ip, vec![])]);
        // The holder itself is never listed (it does not receive its own packets).
        let mut h = Holdings::new(2);
        h.on_map(&map(2, &[moved]), t0);
        assert_eq!(senders(&h, t0), vec![(ip, vec![1])]);
    }

    #[test]
    fn silent_holders_fail_over_to_the_first_live_standby() {
        let t0 = Instant::now();
        let mut leases =
            LeaseTable::new(Duration::from_millis(1500), Duration::from_millis(100), t0);
        let w = wl("chat", Some(1), 4);
        assert_eq!(
            leases.heartbeat(1, t0 + Duration::from_millis(100)),
            Duration::from_millis(1500)
        );
        let online = |n: NodeId| n != 4;
        assert_eq!(
            failover_target(
                &w,
                &[4, 5],
                &leases,
                online,
                t0 + Duration::from_millis(1700)
            ),
            None
        );
        assert_eq!(
            failover_target(
                &w,
                &[4, 5],
                &leases,
                online,
                t0 + Duration::from_millis(1701)
            ),
            Some(5)
        );
        assert_eq!(
            failover_target(&w, &[4], &leases, online, t0 + Duration::from_secs(9)),
            None
        );
        // A fenced node gets no lease, and its heartbeat does not count.
        leases.fence(1);
        assert_eq!(
            leases.heartbeat(1, t0 + Duration::from_secs(2)),
            Duration::ZERO
        );
        assert!(leases.is_silent(1, t0 + Duration::from_secs(2)));
        leases.unfence(1);
        assert_eq!(
            leases.heartbeat(1, t0 + Duration::from_secs(2)),
            Duration::from_millis(1500)
        );
        // After a start, a holder not heard from yet gets the startup grace.
        assert!(!leases.is_silent(9, t0 + Duration::from_millis(1601)));
        assert!(leases.is_silent(9, t0 + Duration::from_millis(1601) + STARTUP_GRACE));
    }

    /// A stopping coordinator answers heartbeats with its stop lease, counts the holders
    /// that have not had one yet, and the next run counts nodes it has not heard from as
    /// holding that long from its start.
    #[test]
    fn a_stop_lease_is_granted_counted_and_inherited() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut leases = LeaseTable::new(ms(1500), ms(100), t0);
        leases.heartbeat(1, t0 + ms(100));
        leases.heartbeat(2, t0 + ms(200));
        leases.heartbeat(3, t0 + ms(300));
        leases.fence(3);
        // Node 4 was last heard 1.7 s before the stop: its lease is over, nothing to wait for.
        leases.heartbeat(4, t0);
        assert_eq!(leases.without_stop_lease(), 0, "not stopping");
        let stop = t0 + ms(1700);
        leases.stop(ms(4000), stop);
        assert_eq!(leases.without_stop_lease(), 2, "nodes 1 and 2");
        assert_eq!(leases.granting(), ms(4000));
        assert_eq!(leases.lease(), ms(1500), "the usual lease paces heartbeats");
        assert_eq!(leases.heartbeat(1, stop + ms(50)), ms(4000));
        assert_eq!(leases.without_stop_lease(), 1);
        // A fenced holder gets nothing, stopping or not.
        assert_eq!(leases.heartbeat(3, stop + ms(60)), Duration::ZERO);
        assert_eq!(leases.heartbeat(2, stop + ms(70)), ms(4000));
        assert_eq!(leases.without_stop_lease(), 0);
        // The coordinator knows the longer lease runs: node 1 is silent only after it.
        assert!(!leases.is_silent(1, stop + ms(50) + ms(4100)));
        assert!(leases.is_silent(1, stop + ms(51) + ms(4100)));
        // A second stop changes nothing.
        leases.stop(ms(9000), stop + ms(80));
        assert_eq!(leases.heartbeat(1, stop + ms(90)), ms(4000));

        // The next run, started 1 s later, has not heard from node 1 yet: its stop lease may
        // run until 3.05 s after this start, and is waited out (the start-up grace is longer).
        let t1 = stop + ms(1000);
        let mut next = LeaseTable::new(ms(1500), ms(100), t1).inherit(ms(4000));
        assert_eq!(next.expires(1), t1 + ms(100) + ms(4500));
        // Heard from, its renewal (1.5 s) is shorter than the stop lease it still holds.
        next.heartbeat(1, t1 + ms(100));
        assert_eq!(next.expires(1), t1 + ms(4100));
        assert_eq!(next.inherited_until(), t1 + ms(4100));
        next.heartbeat(1, t1 + ms(3000));
        assert_eq!(next.expires(1), t1 + ms(4600));
        // With a stop lease longer than a lease and the grace, that is waited out instead.
        let next = LeaseTable::new(ms(1500), ms(100), t1).inherit(ms(9000));
        assert!(!next.is_silent(1, t1 + ms(9100)));
        assert!(next.is_silent(1, t1 + ms(9101)));
        // A run with no stop lease before it: as ever.
        let plain = LeaseTable::new(ms(1500), ms(100), t1);
        assert_eq!(plain.expires(1), t1 + ms(100) + ms(1500) + STARTUP_GRACE);
    }

    /// Nodes come and go (a revoked or deleted node joins again as a new one): the table
    /// forgets those long silent, and a forgotten node stays as silent as it was.
    #[test]
    fn lease_table_forgets_nodes_long_gone_and_keeps_them_silent() {
        let t0 = Instant::now();
        let mut leases =
            LeaseTable::new(Duration::from_millis(1500), Duration::from_millis(100), t0);
        let minute = Duration::from_secs(60);
        // Twenty thousand nodes over twenty minutes, each heard from once.
        let mut now = t0;
        for n in 0..20_000u64 {
            now = t0 + minute * (n / 1000) as u32;
            leases.heartbeat(n, now);
            if n == 5 {
                // Fenced while its workload is taken from it: kept, however long ago.
                leases.fence(n);
            }
        }
        assert!(
            leases.last.len() <= 2 * 1000 * 11,
            "{} nodes remembered",
            leases.last.len()
        );
        // What is kept: the last ten minutes' nodes and the fenced one.
        assert!(leases.last.contains_key(&19_999));
        assert!(leases.last.contains_key(&5));
        assert!(!leases.last.contains_key(&0));
        // A forgotten node is silent, as it was before it was forgotten.
        assert!(leases.is_silent(0, now));
        assert!(leases.is_silent(1, now));
        assert!(!leases.is_silent(19_999, now));
        // One heard from again is remembered again.
        leases.heartbeat(0, now);
        assert!(!leases.is_silent(0, now));
    }

    /// The bug the chaos tests found: node 1 holds chat and is cut off just before a move to
    /// node 2. Node 1 keeps its lease (it cannot learn of the move) and answers until it ends;
    /// node 2 must not answer before the coordinator confirms the handover.
    #[test]
    fn a_new_holder_answers_only_once_the_coordinator_confirms_the_handover() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let confirmed = |pairs: &[(u64, u64)]| -> Vec<Confirmation> {
            pairs
                .iter()
                .map(|(workload, generation)| Confirmation {
                    workload: *workload,
                    generation: *generation,
                })
                .collect()
        };
        // Node 1, the holder, cut off at t0 + 10 ms with a lease until t0 + 1500 ms.
        let mut old = Holdings::new(1);
        old.on_map(&map(1, &[wl("chat", Some(1), 1)]), t0);
        let s = old.heartbeat_now(t0);
        old.on_lease(s, DEFAULT_LEASE, 1);
        old.on_confirmed(Some(&confirmed(&[(7, 1)])));
        assert_eq!(old.held(t0 + ms(10)).len(), 1);
        // Node 2, prepared for generation 2 and given a lease, then the move's map.
        let mut new = Holdings::new(2);
        new.on_map(&map(1, &[wl("chat", Some(1), 1)]), t0);
        new.on_prepare("chat", 2, t0 + ms(20));
        let s = new.heartbeat_now(t0 + ms(20));
        new.on_lease(s, Duration::from_secs(5), 1);
        new.on_confirmed(Some(&confirmed(&[])));
        assert!(
            new.tentative(t0 + ms(21)).is_empty(),
            "no address ahead of a confirmation: the holder may be cut off"
        );
        assert_eq!(
            new.awaited(t0 + ms(21)),
            vec![moved_address()],
            "what reaches it for the address is kept back"
        );
        let mut moved = wl("chat", Some(2), 2);
        moved.previous = Some(1);
        new.on_map(&map(2, &[moved.clone()]), t0 + ms(30));
        assert!(new.is_holder(), "it heartbeats as a holder");
        assert_eq!(new.held_back(), vec!["chat".to_string()]);
        let mut t = t0 + ms(30);
        while t < t0 + DEFAULT_LEASE {
            assert!(
                old.held(t).is_empty() || new.held(t).is_empty(),
                "two holders at {:?}",
                t - t0
            );
            assert!(new.held(t).is_empty(), "not confirmed yet");
            assert_eq!(new.awaited(t), vec![moved.address]);
            // The old holder's relays are taken within the move's grace period (1 s), to be
            // kept back with the rest.
            let relays: Vec<NodeId> = new.relays(t).iter().map(|r| r.from).collect();
            let in_grace = t < t0 + ms(30) + moved.grace();
            assert_eq!(relays, if in_grace { vec![1] } else { vec![] });
            t += ms(10);
        }
        assert!(old.held(t0 + DEFAULT_LEASE).is_empty(), "its lease ran out");
        // The coordinator confirms once the old lease has surely run out; an older
        // generation's confirmation would not do.
        new.on_confirmed(Some(&confirmed(&[(7, 1)])));
        assert!(new.held(t0 + ms(1600)).is_empty());
        assert_eq!(new.awaited(t0 + ms(1600)), vec![moved.address]);
        new.on_confirmed(Some(&confirmed(&[(7, 2)])));
        assert_eq!(new.held(t0 + ms(1600)).len(), 1);
        assert!(new.held_back().is_empty());
        assert!(new.awaited(t0 + ms(1600)).is_empty(), "held now");
        // A confirmation is kept: a later answer that does not list it changes nothing.
        new.on_confirmed(Some(&confirmed(&[])));
        assert_eq!(new.held(t0 + ms(1600)).len(), 1);

        // From a coordinator that confirms nothing (before 2026-12): at once, as before.
        let mut new = Holdings::new(2);
        new.on_map(&map(1, &[wl("chat", Some(1), 1)]), t0);
        new.on_prepare("chat", 2, t0);
        let s = new.heartbeat_now(t0);
        new.on_lease(s, DEFAULT_LEASE, 1);
        new.on_confirmed(None);
        assert_eq!(new.tentative(t0).len(), 1);
        assert!(new.awaited(t0).is_empty(), "the tentative address is up");
        new.on_map(&map(2, &[moved]), t0 + ms(30));
        assert_eq!(new.held(t0 + ms(30)).len(), 1);
    }

    /// What a new holder keeps back while the coordinator confirms: the prepared address
    /// (with relays from the current holder) until the move lands or the preparation ends,
    /// then the address the map gives it until the confirmation; never an address moved on.
    #[test]
    fn a_prepared_or_unconfirmed_address_is_awaited_until_confirmed_or_gone() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut h = Holdings::new(2);
        h.on_map(&map(1, &[wl("chat", Some(1), 1)]), t0);
        let s = h.heartbeat_now(t0);
        h.on_lease(s, Duration::from_secs(5), 1);
        h.on_confirmed(Some(&[]));
        assert!(h.awaited(t0).is_empty(), "nothing prepared");
        h.on_prepare("chat", 2, t0);
        assert_eq!(h.awaited(t0 + ms(1)), vec![moved_address()]);
        assert_eq!(
            h.relays(t0 + ms(1))
                .iter()
                .map(|r| r.from)
                .collect::<Vec<_>>(),
            vec![1],
            "the current holder forwards once it has seen the move"
        );
        // The preparation ends without a move: nothing is awaited any more.
        assert!(h.awaited(t0 + PREPARE_HOLD).is_empty());
        assert!(h.relays(t0 + PREPARE_HOLD).is_empty());
        // Prepared again, the move lands, and then moves on before any confirmation.
        h.on_prepare("chat", 2, t0 + ms(4000));
        let mut moved = wl("chat", Some(2), 2);
        moved.previous = Some(1);
        h.on_map(&map(2, &[moved]), t0 + ms(4001));
        assert_eq!(h.awaited(t0 + ms(4002)), vec![moved_address()]);
        let mut on = wl("chat", Some(3), 3);
        on.previous = Some(2);
        h.on_map(&map(3, &[on]), t0 + ms(4003));
        assert!(h.awaited(t0 + ms(4004)).is_empty());
        assert!(h.held(t0 + ms(4004)).is_empty());
        assert!(h.relays(t0 + ms(4004)).is_empty());
    }

    fn moved_address() -> IpNet {
        wl("chat", None, 0).address
    }

    #[test]
    fn a_holder_acknowledges_every_change_that_takes_a_workload_from_it() {
        let t0 = Instant::now();
        let mut h = Holdings::new(1);
        h.on_map(&map(1, &[wl("chat", Some(1), 1)]), t0);
        assert!(!h.take_release_ack(), "nothing taken yet");
        // Acknowledged whether or not it had a lease: the coordinator cannot know.
        h.on_map(&map(2, &[wl("chat", Some(2), 2)]), t0);
        assert!(h.take_release_ack());
        assert!(!h.take_release_ack(), "once");
        h.on_map(&map(3, &[wl("chat", Some(1), 3)]), t0);
        assert!(!h.take_release_ack());
        h.on_map(&map(4, &[wl("chat", None, 4)]), t0);
        assert!(h.take_release_ack(), "detached");
        h.on_map(&map(5, &[wl("chat", Some(1), 5)]), t0);
        h.on_map(&map(6, &[]), t0);
        assert!(h.take_release_ack(), "deleted");
        // A stale map changes nothing.
        h.on_map(&map(7, &[wl("chat", Some(2), 6)]), t0);
        h.take_release_ack();
        h.on_map(&map(8, &[wl("chat", Some(1), 5)]), t0);
        h.on_map(&map(9, &[wl("chat", Some(2), 6)]), t0);
        assert!(!h.take_release_ack());
    }

    #[test]
    fn a_workload_created_again_under_its_name_starts_over() {
        let t0 = Instant::now();
        let mut h = Holdings::new(1);
        h.on_map(&map(1, &[wl("chat", Some(2), 5)]), t0);
        let mut again = wl("chat", Some(1), 1);
        again.id = 8;
        h.on_map(&map(2, &[again]), t0);
        assert_eq!(h.seen_generation("chat"), Some(1));
        assert!(h.is_holder());
        let s = h.heartbeat_now(t0);
        h.on_lease(s, Duration::from_secs(5), 2);
        assert_eq!(h.held(t0).len(), 1);
        // A zero lease (a refusal) renews nothing.
        let s = h.heartbeat_now(t0 + Duration::from_secs(1));
        h.on_lease(s, Duration::ZERO, 2);
        assert!(h.held(t0 + Duration::from_secs(5)).is_empty());
    }
}
