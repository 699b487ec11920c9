//! The fencing simulation's invariant, checked on observations of real processes: no two
//! nodes answer for one workload address at the same instant.
//!
//! Observations come from two sources with different precision:
//! - the simulated agents, every few milliseconds, all at one instant `t`
//!   (`Holdings::held(t)` of each live session);
//! - the real agents, through their userspace API, each answer taken somewhere in the window
//!   `[lo, hi]` between sending the request and reading the answer.
//!
//! Consecutive observations of one node holding one address at one generation form a *run*.
//! Within a run the node is taken to have held the address throughout, from the end of its
//! first observation window to the start of its last (its *certain* span; for a simulated
//! agent's single snapshot, the instant itself). Holding stops only by a newer map (another
//! generation, a new run) or a lease running out, and a lease renewed after running out
//! within one generation would be a breach of its own, so the assumption is safe. Two runs of
//! different nodes on one address breach the invariant when their certain spans meet, or when
//! an observation window of one lies entirely inside the other's certain span. An overlap
//! shorter than the sampling interval can go unseen; what is reported was seen.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use meshlink_proto::NodeId;
use serde::Serialize;

/// One address a node answers for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holding {
    /// The workload address.
    pub address: IpAddr,
    /// The generation it is held at.
    pub generation: u64,
    /// The workload's id in the node's map (a workload deleted and created again at the same
    /// address has another id), when the observation shows it.
    pub workload: Option<u64>,
}

/// When (between `lo` and `hi`) an observation was made.
#[derive(Debug, Clone, Copy)]
struct Window {
    lo: Instant,
    hi: Instant,
}

/// One node holding one address at one generation, over consecutive observations.
#[derive(Debug, Clone)]
struct Run {
    node: NodeId,
    real: bool,
    generation: u64,
    workload: Option<u64>,
    first: Window,
    last: Window,
    observations: u64,
}

impl Run {
    /// The span over which the node surely held the address, if any.
    fn certain(&self) -> Option<(Instant, Instant)> {
        (self.first.hi <= self.last.lo).then_some((self.first.hi, self.last.lo))
    }
}

/// A breach found: two nodes answering for one address at once.
#[derive(Debug, Clone, Serialize)]
pub struct Breach {
    /// The workload address.
    pub address: IpAddr,
    /// The two nodes, their generations, whether each is a real agent.
    pub nodes: [(NodeId, u64, bool); 2],
    /// The workload ids the two held, where known: two different ids are one workload deleted
    /// and another created at its address.
    pub workloads: [Option<u64>; 2],
    /// Where the overlap was seen, in milliseconds since the start of the run.
    pub from_ms: f64,
    /// Its end.
    pub to_ms: f64,
}

/// The observations of one run of the soak.
#[derive(Debug)]
pub struct Fencing {
    t0: Instant,
    open: BTreeMap<(IpAddr, NodeId), Run>,
    closed: BTreeMap<IpAddr, Vec<Run>>,
    /// Snapshots of the simulated fleet taken.
    pub sim_snapshots: u64,
    /// The longest time between two snapshots of the simulated fleet.
    pub longest_snapshot_gap: Duration,
    last_snapshot: Option<Instant>,
    /// Observations of real agents taken.
    pub real_observations: u64,
    /// The widest window of a real agent's observation.
    pub widest_real_window: Duration,
    /// Times two simulated agents held one address in the same snapshot (each is also a
    /// [`Breach`] at judgement).
    pub same_snapshot_doubles: u64,
}

impl Fencing {
    /// Observations from `t0` on.
    pub fn new(t0: Instant) -> Self {
        Fencing {
            t0,
            open: BTreeMap::new(),
            closed: BTreeMap::new(),
            sim_snapshots: 0,
            longest_snapshot_gap: Duration::ZERO,
            last_snapshot: None,
            real_observations: 0,
            widest_real_window: Duration::ZERO,
            same_snapshot_doubles: 0,
        }
    }

    /// A snapshot of every simulated agent at `t`: the addresses each node (with a live
    /// session) answers for, with their generations. Nodes left out answer for nothing.
    pub fn sim_snapshot(&mut self, t: Instant, held: &BTreeMap<NodeId, Vec<Holding>>) {
        self.sim_snapshots += 1;
        if let Some(last) = self.last_snapshot {
            self.longest_snapshot_gap = self.longest_snapshot_gap.max(t - last);
        }
        self.last_snapshot = Some(t);
        let mut holders: BTreeMap<IpAddr, u32> = BTreeMap::new();
        for addrs in held.values() {
            for h in addrs {
                *holders.entry(h.address).or_default() += 1;
            }
        }
        self.same_snapshot_doubles += holders.values().filter(|n| **n > 1).count() as u64;
        let w = Window { lo: t, hi: t };
        // Close the runs of simulated nodes that no longer hold.
        let ended: Vec<(IpAddr, NodeId)> = self
            .open
            .iter()
            .filter(|(_, r)| !r.real)
            .filter(|((a, n), r)| {
                !held.get(n).is_some_and(|v| {
                    v.iter()
                        .any(|h| h.address == *a && h.generation == r.generation)
                })
            })
            .map(|(k, _)| *k)
            .collect();
        for k in ended {
            self.close(k);
        }
        for (node, addrs) in held {
            for h in addrs {
                self.extend(*node, false, *h, w);
            }
        }
    }

    /// One answer of a real agent, taken between `lo` and `hi`: what node `node` answers for.
    pub fn real_observation(&mut self, node: NodeId, lo: Instant, hi: Instant, held: &[Holding]) {
        self.real_observations += 1;
        self.widest_real_window = self.widest_real_window.max(hi - lo);
        let ended: Vec<(IpAddr, NodeId)> = self
            .open
            .iter()
            .filter(|((a, n), r)| {
                *n == node
                    && !held
                        .iter()
                        .any(|h| h.address == *a && h.generation == r.generation)
            })
            .map(|(k, _)| *k)
            .collect();
        for k in ended {
            self.close(k);
        }
        for h in held {
            self.extend(node, true, *h, Window { lo, hi });
        }
    }

    fn extend(&mut self, node: NodeId, real: bool, h: Holding, w: Window) {
        let a = h.address;
        if let Some(run) = self.open.get_mut(&(a, node)) {
            if run.generation == h.generation && run.workload == h.workload {
                run.last = w;
                run.observations += 1;
                return;
            }
            self.close((a, node));
        }
        self.open.insert(
            (a, node),
            Run {
                node,
                real,
                generation: h.generation,
                workload: h.workload,
                first: w,
                last: w,
                observations: 1,
            },
        );
    }

    fn close(&mut self, key: (IpAddr, NodeId)) {
        if let Some(run) = self.open.remove(&key) {
            self.closed.entry(key.0).or_default().push(run);
        }
    }

    /// Holding runs seen so far (open and closed).
    pub fn runs(&self) -> usize {
        self.open.len() + self.closed.values().map(Vec::len).sum::<usize>()
    }

    /// Every breach among the runs seen.
    pub fn judge(&self) -> Vec<Breach> {
        let mut by_addr: BTreeMap<IpAddr, Vec<&Run>> = BTreeMap::new();
        for (a, runs) in &self.closed {
            by_addr.entry(*a).or_default().extend(runs.iter());
        }
        for ((a, _), run) in &self.open {
            by_addr.entry(*a).or_default().push(run);
        }
        let ms = |t: Instant| t.saturating_duration_since(self.t0).as_secs_f64() * 1e3;
        let mut out = Vec::new();
        for (a, mut runs) in by_addr {
            runs.sort_by_key(|r| r.first.lo);
            for (i, x) in runs.iter().enumerate() {
                // Runs that start after x's last observation ended cannot meet it.
                for y in runs[i + 1..].iter().take_while(|y| y.first.lo <= x.last.hi) {
                    if x.node == y.node {
                        continue;
                    }
                    if let Some((from, to)) = overlap(x, y) {
                        out.push(Breach {
                            address: a,
                            nodes: [
                                (x.node, x.generation, x.real),
                                (y.node, y.generation, y.real),
                            ],
                            workloads: [x.workload, y.workload],
                            from_ms: ms(from),
                            to_ms: ms(to),
                        });
                    }
                }
            }
        }
        out
    }
}

/// Where two runs of different nodes surely overlap, if they do.
fn overlap(x: &Run, y: &Run) -> Option<(Instant, Instant)> {
    if let (Some((a0, a1)), Some((b0, b1))) = (x.certain(), y.certain()) {
        let (lo, hi) = (a0.max(b0), a1.min(b1));
        if lo <= hi {
            return Some((lo, hi));
        }
    }
    for (outer, inner) in [(x, y), (y, x)] {
        if let Some((c0, c1)) = outer.certain() {
            for w in [inner.first, inner.last] {
                if c0 <= w.lo && w.hi <= c1 {
                    return Some((w.lo, w.hi));
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([100, 64, 200, n])
    }

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    fn h(address: IpAddr, generation: u64) -> Holding {
        Holding {
            address,
            generation,
            workload: None,
        }
    }

    fn snap(f: &mut Fencing, t: Instant, held: &[(NodeId, IpAddr, u64)]) {
        let mut m: BTreeMap<NodeId, Vec<Holding>> = BTreeMap::new();
        for (n, a, g) in held {
            m.entry(*n).or_default().push(h(*a, *g));
        }
        f.sim_snapshot(t, &m);
    }

    #[test]
    fn a_handover_with_a_gap_is_no_breach() {
        let t0 = Instant::now();
        let mut f = Fencing::new(t0);
        snap(&mut f, at(t0, 0), &[(1, ip(1), 1)]);
        snap(&mut f, at(t0, 5), &[(1, ip(1), 1)]);
        snap(&mut f, at(t0, 10), &[]);
        snap(&mut f, at(t0, 15), &[(2, ip(1), 2)]);
        snap(&mut f, at(t0, 20), &[(2, ip(1), 2), (1, ip(2), 1)]);
        assert!(f.judge().is_empty());
        assert_eq!(f.same_snapshot_doubles, 0);
    }

    #[test]
    fn two_simulated_holders_in_one_snapshot_are_a_breach() {
        let t0 = Instant::now();
        let mut f = Fencing::new(t0);
        snap(&mut f, at(t0, 0), &[(1, ip(1), 1)]);
        snap(&mut f, at(t0, 5), &[(1, ip(1), 1), (2, ip(1), 2)]);
        snap(&mut f, at(t0, 10), &[(2, ip(1), 2)]);
        let b = f.judge();
        assert_eq!(b.len(), 1, "{b:?}");
        assert_eq!(b[0].from_ms, 5.0);
        assert_eq!(f.same_snapshot_doubles, 1);
    }

    #[test]
    fn a_real_answer_inside_a_simulated_run_is_a_breach_and_one_outside_is_not() {
        let t0 = Instant::now();
        let mut f = Fencing::new(t0);
        for ms in (0..=100).step_by(5) {
            snap(&mut f, at(t0, ms), &[(1, ip(1), 3)]);
        }
        // Answered between 40 and 60 ms: the simulated node held throughout.
        f.real_observation(9, at(t0, 40), at(t0, 60), &[h(ip(1), 4)]);
        // Between 95 and 130 ms: the simulated run ends at 100, so not surely at once.
        f.real_observation(8, at(t0, 95), at(t0, 130), &[h(ip(1), 4)]);
        let b = f.judge();
        assert_eq!(b.len(), 1, "{b:?}");
        assert_eq!(b[0].nodes[1], (9, 4, true));
    }

    #[test]
    fn two_real_runs_that_meet_are_a_breach() {
        let t0 = Instant::now();
        let mut f = Fencing::new(t0);
        f.real_observation(7, at(t0, 0), at(t0, 10), &[h(ip(1), 1)]);
        f.real_observation(8, at(t0, 20), at(t0, 30), &[h(ip(1), 2)]);
        f.real_observation(7, at(t0, 40), at(t0, 50), &[h(ip(1), 1)]);
        assert_eq!(f.judge().len(), 1);
        // Node 7 stops holding before node 9 is seen.
        f.real_observation(7, at(t0, 60), at(t0, 70), &[]);
        f.real_observation(9, at(t0, 80), at(t0, 90), &[h(ip(1), 3)]);
        assert_eq!(f.judge().len(), 1);
    }
}
