//! A deterministic simulation of workload fencing: a model coordinator (generations, the real
//! [`LeaseTable`] and [`failover_target`]) and agents running the real [`Holdings`] and
//! [`Netmap::apply`], joined by links that delay, lose and cut messages, while workloads are
//! moved, claimed, and failed over, agents are partitioned and crash, and the coordinator
//! restarts.
//!
//! Checked at every simulated millisecond:
//! - never two live holders of one workload at one generation;
//! - two live holders at once only while a *planned* change (move, claim, detach) is on its
//!   way to the older one, never across a failover, and never for longer than a lease plus
//!   the links' delay (a partitioned holder stops on its own);
//!
//! and after the chaos ends, that every agent converges to the coordinator's newest
//! generation of every workload, with exactly its holder answering for it.
//!
//! The coordinator's side follows `coordinator/src/service.rs`: a failover fences the silent
//! holder (its heartbeats get no lease) and commits after a preparation delay; a planned change
//! away from a holder that is not answering fences it too and waits until its lease has surely
//! run out; a planned change away from a holder that answers lands at once (make-before-break).

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use meshlink_proto::workload::{failover_target, Holdings, LeaseTable};
use meshlink_proto::{Netmap, NetmapDelta, NodeId, WorkloadInfo};

const AGENTS: u64 = 6;
const WORKLOADS: usize = 3;
const LEASE: Duration = Duration::from_millis(1500);
const MARGIN: Duration = Duration::from_millis(100);
const MAX_LATENCY_MS: u64 = 40;
const CHAOS_MS: u64 = 30_000;
const HEAL_MS: u64 = 10_000;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// True with probability `per_million` / 1,000,000.
    fn chance(&mut self, per_million: u64) -> bool {
        self.below(1_000_000) < per_million
    }
}

#[derive(Debug, Clone)]
enum Down {
    Delta(NetmapDelta),
    Full(Netmap),
    Lease {
        seq: u64,
        lease: Duration,
        version: u64,
    },
}

#[derive(Debug, Clone)]
enum Up {
    Heartbeat(u64),
    FullMapRequest,
    Claim(String),
}

/// An ordered link with delay: what is sent arrives in order, or is lost.
struct Link<T> {
    queue: VecDeque<(u64, T)>,
    last: u64,
}

impl<T> Link<T> {
    fn new() -> Self {
        Link {
            queue: VecDeque::new(),
            last: 0,
        }
    }
    fn send(&mut self, now: u64, latency: u64, msg: T) {
        let at = (now + latency).max(self.last);
        self.last = at;
        self.queue.push_back((at, msg));
    }
    fn due(&mut self, now: u64) -> Vec<T> {
        let mut out = Vec::new();
        while self.queue.front().is_some_and(|(at, _)| *at <= now) {
            out.push(
                self.queue
                    .pop_front()
                    .map(|(_, m)| m)
                    .unwrap_or_else(|| unreachable!()),
            );
        }
        out
    }
    fn cut(&mut self) {
        self.queue.clear();
    }
}

struct Agent {
    id: NodeId,
    holdings: Holdings,
    map: Netmap,
    up: Link<Up>,
    down: Link<Down>,
    awaiting_full: bool,
    /// Crashed (process dead) until this step.
    dead_until: Option<u64>,
    /// Cut off from the coordinator until this step.
    cut_until: Option<u64>,
}

impl Agent {
    fn connected(&self) -> bool {
        self.dead_until.is_none() && self.cut_until.is_none()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    Planned,
    Failover,
}

/// A change decided and not yet committed (preparing the destination, or waiting out the
/// old holder's lease), with the node it fences.
struct Pending {
    name: String,
    to: Option<NodeId>,
    kind: Grant,
    at: u64,
    fenced: Option<NodeId>,
}

struct Coordinator {
    pending: Vec<Pending>,
    map: Netmap,
    leases: LeaseTable,
    standby: BTreeMap<String, Vec<NodeId>>,
    /// How each (workload, generation) came to be.
    grants: BTreeMap<(String, u64), Grant>,
    failovers: u64,
    moves: u64,
}

struct Sim {
    rng: Rng,
    t0: Instant,
    now: u64,
    loss_per_million: u64,
    coord: Coordinator,
    agents: Vec<Agent>,
    /// Start of the current overlap of two holders, per workload.
    overlap_since: BTreeMap<String, u64>,
    max_overlap: u64,
    overlaps: u64,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let t0 = Instant::now();
        let mut map = Netmap {
            version: 1,
            ..Netmap::default()
        };
        let mut standby = BTreeMap::new();
        for w in 0..WORKLOADS {
            let name = format!("w{w}");
            let info = WorkloadInfo {
                id: w as u64 + 1,
                name: name.clone(),
                address: format!("100.64.50.{}/32", 10 + w)
                    .parse()
                    .unwrap_or_else(|e| panic!("{e}")),
                holder: Some(1 + w as u64),
                generation: 1,
                previous: None,
                candidates: (1..=AGENTS).collect(),
                grace_ms: Some(2000),
            };
            standby.insert(
                name.clone(),
                vec![4 + (w as u64 % 3), 1 + ((w as u64 + 1) % 3)],
            );
            map.workloads.insert(name, info);
        }
        let mut grants = BTreeMap::new();
        for w in map.workloads.keys() {
            grants.insert((w.clone(), 1), Grant::Planned);
        }
        let agents = (1..=AGENTS)
            .map(|id| {
                let mut a = Agent {
                    id,
                    holdings: Holdings::new(id),
                    map: Netmap::default(),
                    up: Link::new(),
                    down: Link::new(),
                    awaiting_full: false,
                    dead_until: None,
                    cut_until: None,
                };
                a.down.send(0, 1, Down::Full(map.clone()));
                a
            })
            .collect();
        Sim {
            rng: Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1),
            t0,
            now: 0,
            loss_per_million: 20_000,
            coord: Coordinator {
                pending: Vec::new(),
                map,
                leases: LeaseTable::new(LEASE, MARGIN, t0),
                standby,
                grants,
                failovers: 0,
                moves: 0,
            },
            agents,
            overlap_since: BTreeMap::new(),
            max_overlap: 0,
            overlaps: 0,
        }
    }

    fn instant(&self) -> Instant {
        self.t0 + Duration::from_millis(self.now)
    }

    fn latency(&mut self) -> u64 {
        1 + self.rng.below(MAX_LATENCY_MS)
    }

    fn lost(&mut self) -> bool {
        self.rng.chance(self.loss_per_million)
    }

    fn send_down(&mut self, i: usize, msg: Down) {
        if !self.agents[i].connected() || self.lost() {
            return;
        }
        let lat = self.latency();
        let now = self.now;
        self.agents[i].down.send(now, lat, msg);
    }

    /// A planned change (a move, a claim, a detach): at once when the holder answers
    /// heartbeats; otherwise fenced, after the holder's lease has surely ended.
    fn plan(&mut self, name: &str, to: Option<NodeId>) {
        if self.coord.pending.iter().any(|p| p.name == name) {
            return; // one change at a time per workload, as the generation check makes it
        }
        let Some(w) = self.coord.map.workloads.get(name).cloned() else {
            return;
        };
        let now_i = self.instant();
        match w.holder {
            Some(old)
                if Some(old) != to && self.coord.leases.heard_ago(old, now_i) > 2 * (LEASE / 5) =>
            {
                self.coord.leases.fence(old);
                let wait = self
                    .coord
                    .leases
                    .expires(old)
                    .saturating_duration_since(now_i)
                    .as_millis() as u64;
                let at = self.now + wait + 1;
                self.coord.pending.push(Pending {
                    name: name.to_string(),
                    to,
                    kind: Grant::Planned,
                    at,
                    fenced: Some(old),
                });
            }
            _ => self.change_holder(name, to, Grant::Planned),
        }
    }

    /// A change of holder at the next generation, sent to every connected agent.
    fn change_holder(&mut self, name: &str, to: Option<NodeId>, kind: Grant) {
        let Some(mut w) = self.coord.map.workloads.get(name).cloned() else {
            return;
        };
        if w.holder == to {
            return;
        }
        w.previous = w.holder;
        w.holder = to;
        w.generation += 1;
        self.coord
            .grants
            .insert((name.to_string(), w.generation), kind);
        if std::env::var_os("FENCING_TRACE").is_some() {
            let heard: Vec<(u64, u128)> = (1..=AGENTS)
                .map(|n| {
                    (
                        n,
                        self.coord.leases.heard_ago(n, self.instant()).as_millis(),
                    )
                })
                .collect();
            eprintln!(
                "t={} {name} gen {} {:?} -> {:?} ({kind:?}) version {} heard {heard:?}",
                self.now,
                w.generation,
                w.previous,
                to,
                self.coord.map.version + 1
            );
        }
        if let Some(h) = to {
            let at = self.instant();
            self.coord.leases.granted(h, at);
        }
        let delta = NetmapDelta {
            from_version: self.coord.map.version,
            to_version: self.coord.map.version + 1,
            upsert_workloads: vec![w],
            ..NetmapDelta::default()
        };
        self.coord
            .map
            .apply(&delta)
            .unwrap_or_else(|e| panic!("coordinator's own delta: {e}"));
        match kind {
            Grant::Failover => self.coord.failovers += 1,
            Grant::Planned => self.coord.moves += 1,
        }
        for i in 0..self.agents.len() {
            self.send_down(i, Down::Delta(delta.clone()));
        }
    }

    fn coordinator_step(&mut self, chaos: bool) {
        let now_i = self.instant();
        // Messages from agents.
        for i in 0..self.agents.len() {
            let now = self.now;
            let msgs = self.agents[i].up.due(now);
            let id = self.agents[i].id;
            for m in msgs {
                match m {
                    Up::Heartbeat(seq) => {
                        let lease = self.coord.leases.heartbeat(id, now_i);
                        let version = self.coord.map.version;
                        self.send_down(
                            i,
                            Down::Lease {
                                seq,
                                lease,
                                version,
                            },
                        );
                    }
                    Up::FullMapRequest => {
                        let full = self.coord.map.clone();
                        self.send_down(i, Down::Full(full));
                    }
                    Up::Claim(name) => self.plan(&name, Some(id)),
                }
            }
        }
        if chaos {
            // Planned moves and detaches by an operator.
            if self.rng.chance(4_000) {
                let name = format!("w{}", self.rng.below(WORKLOADS as u64));
                let to = if self.rng.chance(100_000) {
                    None
                } else {
                    Some(1 + self.rng.below(AGENTS))
                };
                self.plan(&name, to);
            }
            // A workload left detached is attached again after a while.
            let detached: Vec<String> = self
                .coord
                .map
                .workloads
                .values()
                .filter(|w| w.holder.is_none())
                .map(|w| w.name.clone())
                .collect();
            for name in detached {
                if self.rng.chance(2_000) {
                    let to = 1 + self.rng.below(AGENTS);
                    self.plan(&name, Some(to));
                }
            }
            // The coordinator restarts: every session drops, leases count from now, changes
            // under way are lost.
            if self.rng.chance(30) {
                self.coord.leases = LeaseTable::new(LEASE, MARGIN, now_i);
                self.coord.pending.clear();
                for a in &mut self.agents {
                    a.up.cut();
                    a.down.cut();
                    if a.connected() {
                        a.cut_until = Some(self.now + 20 + self.rng.below(500));
                    }
                }
            }
        }
        // Changes whose time has come.
        let now = self.now;
        let (due, later): (Vec<Pending>, Vec<Pending>) = std::mem::take(&mut self.coord.pending)
            .into_iter()
            .partition(|p| p.at <= now);
        self.coord.pending = later;
        for p in due {
            self.change_holder(&p.name, p.to, p.kind);
            if let Some(f) = p.fenced {
                self.coord.leases.unfence(f);
            }
        }
        // Failover, every 50 ms: fence the silent holder, commit after a preparation.
        if self.now.is_multiple_of(50) {
            let names: Vec<String> = self.coord.map.workloads.keys().cloned().collect();
            for name in names {
                if self.coord.pending.iter().any(|p| p.name == name) {
                    continue;
                }
                let w = self.coord.map.workloads[&name].clone();
                let online: Vec<bool> = self.agents.iter().map(Agent::connected).collect();
                let target = failover_target(
                    &w,
                    &self.coord.standby[&name],
                    &self.coord.leases,
                    |n| online[(n - 1) as usize],
                    now_i,
                );
                if let (Some(t), Some(old)) = (target, w.holder) {
                    self.coord.leases.fence(old);
                    let at = self.now + self.rng.below(500);
                    self.coord.pending.push(Pending {
                        name,
                        to: Some(t),
                        kind: Grant::Failover,
                        at,
                        fenced: Some(old),
                    });
                }
            }
        }
    }

    fn agent_step(&mut self, i: usize, chaos: bool) {
        let now = self.now;
        let now_i = self.instant();
        // Crashes, partitions, and their ends.
        if let Some(until) = self.agents[i].dead_until {
            if now < until {
                return;
            }
            // Restart: fresh fencing state, the cached map, a new session (a full map).
            let a = &mut self.agents[i];
            a.dead_until = None;
            a.holdings = Holdings::new(a.id);
            a.holdings.on_map(&a.map, now_i);
            a.awaiting_full = false;
            let full = self.coord.map.clone();
            self.send_down(i, Down::Full(full));
        }
        if let Some(until) = self.agents[i].cut_until {
            if now >= until {
                self.agents[i].cut_until = None;
                let full = self.coord.map.clone();
                self.send_down(i, Down::Full(full));
            }
        }
        if chaos && self.agents[i].connected() {
            if self.rng.chance(120) {
                let a = &mut self.agents[i];
                a.dead_until = Some(now + 500 + self.rng.below(2500));
                a.up.cut();
                a.down.cut();
                return;
            }
            if self.rng.chance(100) {
                let a = &mut self.agents[i];
                a.cut_until = Some(now + 500 + self.rng.below(4500));
                a.up.cut();
                a.down.cut();
            }
        }
        // Messages from the coordinator.
        let msgs = self.agents[i].down.due(now);
        for m in msgs {
            let a = &mut self.agents[i];
            match m {
                Down::Full(map) => {
                    a.awaiting_full = false;
                    a.map = map;
                    a.holdings.on_map(&a.map, now_i);
                }
                Down::Delta(_) if a.awaiting_full => {}
                Down::Delta(d) => match a.map.apply(&d) {
                    Ok(()) => a.holdings.on_map(&a.map, now_i),
                    Err(_) => {
                        a.awaiting_full = true;
                        let lat = 1 + self.rng.below(MAX_LATENCY_MS);
                        if a.connected() {
                            a.up.send(now, lat, Up::FullMapRequest);
                        }
                    }
                },
                Down::Lease {
                    seq,
                    lease,
                    version,
                } => a.holdings.on_lease(seq, lease, version),
            }
        }
        // Heartbeats and claims.
        if !self.agents[i].connected() {
            // Cut off: heartbeats are sent into the void (they still pace the agent).
            let _ = self.agents[i].holdings.poll_heartbeat(now_i);
            return;
        }
        if let Some(seq) = self.agents[i].holdings.poll_heartbeat(now_i) {
            if !self.lost() {
                let lat = self.latency();
                self.agents[i].up.send(now, lat, Up::Heartbeat(seq));
            }
        }
        if chaos && self.rng.chance(300) {
            let name = format!("w{}", self.rng.below(WORKLOADS as u64));
            let lat = self.latency();
            self.agents[i].up.send(now, lat, Up::Claim(name));
        }
    }

    /// The invariants that hold at every instant.
    fn check(&mut self) {
        let now_i = self.instant();
        let mut by_workload: BTreeMap<IpAddr, Vec<(NodeId, u64)>> = BTreeMap::new();
        for a in &self.agents {
            if a.dead_until.is_some() {
                continue; // a dead process answers for nothing
            }
            for h in a.holdings.held(now_i) {
                by_workload
                    .entry(h.address.addr())
                    .or_default()
                    .push((a.id, h.generation));
            }
        }
        let names: BTreeMap<IpAddr, String> = self
            .coord
            .map
            .workloads
            .values()
            .map(|w| (w.ip(), w.name.clone()))
            .collect();
        for name in names.values() {
            let ip = self.coord.map.workloads[name].ip();
            let holders = by_workload.get(&ip).cloned().unwrap_or_default();
            let mut gens: Vec<u64> = holders.iter().map(|h| h.1).collect();
            gens.sort_unstable();
            let before = gens.len();
            gens.dedup();
            assert_eq!(
                gens.len(),
                before,
                "t={} ms: two holders of {name} at one generation: {holders:?}",
                self.now
            );
            if holders.len() > 1 {
                let (lo, hi) = (gens[0], gens[gens.len() - 1]);
                for g in lo + 1..=hi {
                    assert_eq!(
                        self.coord.grants.get(&(name.clone(), g)),
                        Some(&Grant::Planned),
                        "t={} ms: {name} held at generations {gens:?} ({holders:?}) across a failover at generation {g}",
                        self.now
                    );
                }
                let since = *self.overlap_since.entry(name.clone()).or_insert(self.now);
                if since == self.now {
                    self.overlaps += 1;
                }
                let took = self.now - since;
                self.max_overlap = self.max_overlap.max(took);
                assert!(
                    took <= (LEASE.as_millis() as u64) + 2 * MAX_LATENCY_MS,
                    "t={} ms: {name} has had two holders for {took} ms: {holders:?}",
                    self.now
                );
            } else {
                self.overlap_since.remove(name);
            }
        }
    }

    fn step(&mut self, chaos: bool) {
        self.coordinator_step(chaos);
        for i in 0..self.agents.len() {
            self.agent_step(i, chaos);
        }
        self.check();
        self.now += 1;
    }

    fn heal(&mut self) {
        self.loss_per_million = 0;
    }

    /// After the chaos: every agent at the newest generation, exactly the holder answering.
    fn check_converged(&self) {
        let now_i = self.instant();
        for w in self.coord.map.workloads.values() {
            for a in &self.agents {
                assert!(
                    a.dead_until.is_none() && a.cut_until.is_none(),
                    "agent {} still down after healing",
                    a.id
                );
                assert_eq!(
                    a.holdings.seen_generation(&w.name),
                    Some(w.generation),
                    "agent {} has not converged on {}",
                    a.id,
                    w.name
                );
                let holds = a
                    .holdings
                    .held(now_i)
                    .iter()
                    .any(|h| h.address == w.address);
                assert_eq!(
                    holds,
                    w.holder == Some(a.id),
                    "agent {} answering for {} is {holds}, holder is {:?}",
                    a.id,
                    w.name,
                    w.holder
                );
            }
        }
    }
}

fn run(seed: u64) -> Sim {
    let mut sim = Sim::new(seed);
    for _ in 0..CHAOS_MS {
        sim.step(true);
    }
    sim.heal();
    // Every outage ends within 5 s of the chaos; then 5 s more to settle.
    for _ in 0..HEAL_MS {
        sim.step(false);
    }
    sim.check_converged();
    sim
}

#[test]
fn fencing_holds_under_moves_partitions_losses_and_crashes() {
    let (mut moves, mut failovers, mut overlaps, mut max_overlap) = (0, 0, 0, 0);
    for seed in 1..=8 {
        let sim = run(seed);
        moves += sim.coord.moves;
        failovers += sim.coord.failovers;
        overlaps += sim.overlaps;
        max_overlap = max_overlap.max(sim.max_overlap);
    }
    eprintln!("fencing: 8 seeds x {} s: {moves} planned changes, {failovers} failovers, {overlaps} planned overlaps (longest {max_overlap} ms)", (CHAOS_MS + HEAL_MS) / 1000);
    // The simulation must have exercised what it checks.
    assert!(moves > 100, "only {moves} planned changes");
    assert!(failovers > 5, "only {failovers} failovers");
}
