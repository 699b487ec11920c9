//! How often one node's endpoint reports may change its peers' maps.
//!
//! Every change of a node's endpoints is a store write, a new network version and a delta to
//! every session of the network, each of which makes every agent rewrite its cached map. A
//! node may change its endpoints `burst` times at once and then once per `interval`, counted
//! per node and not per connection, so reconnecting does not refill it. A report beyond that
//! is not refused: it waits, replacing any earlier one still waiting, and the latest is
//! written when the node's next write is due ([`EndpointPace::take_due`]). A legitimate change
//! still lands, late; a flood of changes costs the fleet one delta per interval.
//!
//! Pure: it is given the time. The service (`service.rs`) decides under its write lock, and a
//! task of `run.rs` calls `Service::endpoint_tick`, which writes what is due.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use meshlink_proto::NodeId;

/// The default time between two endpoint changes of one node, past the burst.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// The default number of endpoint changes one node may make at once.
pub const DEFAULT_BURST: u32 = 3;

/// A node's endpoint report as the session received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The endpoints the agent reported.
    pub endpoints: Vec<SocketAddr>,
    /// The address its session comes from (for the observed endpoint).
    pub remote: IpAddr,
}

#[derive(Debug)]
struct Entry {
    /// The instant at which the node's allowance is whole again (the "theoretical arrival
    /// time" of the generic cell rate algorithm): each write moves it one interval on from
    /// `max(itself, now)`, and a write is allowed while it is no more than `burst - 1`
    /// intervals ahead of now.
    full_at: Instant,
    /// The latest report that could not be written yet.
    pending: Option<Report>,
}

/// See the module documentation.
#[derive(Debug)]
pub struct EndpointPace {
    interval: Duration,
    burst: u32,
    nodes: HashMap<NodeId, Entry>,
}

impl EndpointPace {
    /// `burst` changes at once, then one per `interval`, per node (`burst` at least 1).
    pub fn new(interval: Duration, burst: u32) -> Self {
        EndpointPace {
            interval,
            burst: burst.max(1),
            nodes: HashMap::new(),
        }
    }

    /// How far ahead of now a node's `full_at` may be for a write to be allowed.
    fn slack(&self) -> Duration {
        self.interval * (self.burst - 1)
    }

    /// The earliest instant at which `node` may write.
    fn allowed_from(&self, node: NodeId) -> Option<Instant> {
        let e = self.nodes.get(&node)?;
        Some(e.full_at.checked_sub(self.slack()).unwrap_or(e.full_at))
    }

    /// Whether `node` may change its endpoints at `now`.
    pub fn allows(&self, node: NodeId, now: Instant) -> bool {
        self.allowed_from(node).is_none_or(|at| at <= now)
    }

    /// A report of `node` at `now`: `Some` when it may be written now (and any older report
    /// still waiting is forgotten: this one is newer); `None` when it must wait, in place of
    /// any older one. A report handed back counts only once [`EndpointPace::wrote`] says it
    /// changed something.
    pub fn offer(&mut self, node: NodeId, now: Instant, report: Report) -> Option<Report> {
        let allowed = self.allows(node, now);
        match self.nodes.get_mut(&node) {
            Some(e) if !allowed => {
                e.pending = Some(report);
                None
            }
            Some(e) => {
                e.pending = None;
                Some(report)
            }
            None => Some(report),
        }
    }

    /// `node`'s endpoints were written at `now` (a report, a hello, a join).
    pub fn wrote(&mut self, node: NodeId, now: Instant) {
        let interval = self.interval;
        let e = self.nodes.entry(node).or_insert(Entry {
            full_at: now,
            pending: None,
        });
        e.full_at = e.full_at.max(now) + interval;
    }

    /// The waiting reports that may be written at `now`, each taken out of the pace; forgets
    /// the nodes that have neither a report waiting nor any write still counting.
    pub fn take_due(&mut self, now: Instant) -> Vec<(NodeId, Report)> {
        let slack = self.slack();
        let mut due = Vec::new();
        self.nodes.retain(|node, e| {
            let allowed = e.full_at.checked_sub(slack).unwrap_or(e.full_at) <= now;
            if allowed {
                if let Some(r) = e.pending.take() {
                    due.push((*node, r));
                }
            }
            e.pending.is_some() || e.full_at > now
        });
        due
    }

    /// When the next waiting report may be written; `None` when none waits.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.nodes
            .iter()
            .filter(|(_, e)| e.pending.is_some())
            .filter_map(|(node, _)| self.allowed_from(*node))
            .min()
    }

    /// Forgets `node` (revoked or deleted): a report of it still waiting is dropped.
    pub fn forget(&mut self, node: NodeId) {
        self.nodes.remove(&node);
    }

    /// Nodes the pace keeps anything for.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether it keeps nothing.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

impl Default for EndpointPace {
    fn default() -> Self {
        EndpointPace::new(DEFAULT_INTERVAL, DEFAULT_BURST)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(n: u8) -> Report {
        Report {
            endpoints: vec![SocketAddr::from(([198, 18, 0, n], 51820))],
            remote: "198.18.9.9".parse().unwrap(),
        }
    }

    /// Offers `r`, and counts it as written when it may be.
    fn write(p: &mut EndpointPace, node: NodeId, now: Instant, r: Report) -> bool {
        let now_ok = p.offer(node, now, r).is_some();
        if now_ok {
            p.wrote(node, now);
        }
        now_ok
    }

    #[test]
    fn a_burst_then_one_per_interval_with_the_latest_report_written_late() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut p = EndpointPace::new(s(5), 3);
        assert!((1..=3).all(|n| write(&mut p, 7, t0, report(n))));
        assert_eq!(p.poll_timeout(), None);
        // A thousand more within the window: none written, the last one waits.
        for n in 4..=250 {
            assert!(!write(&mut p, 7, t0 + s(1), report(n)));
        }
        assert_eq!(p.poll_timeout(), Some(t0 + s(5)));
        assert!(p.take_due(t0 + s(4)).is_empty());
        assert_eq!(p.take_due(t0 + s(5)), vec![(7, report(250))]);
        p.wrote(7, t0 + s(5));
        assert_eq!(p.poll_timeout(), None);
        // The next is due an interval later, not at once.
        assert!(!write(&mut p, 7, t0 + s(6), report(1)));
        assert_eq!(p.poll_timeout(), Some(t0 + s(10)));
        // Other nodes are not held back.
        assert!(write(&mut p, 8, t0 + s(6), report(2)));
    }

    #[test]
    fn a_report_written_at_once_replaces_the_one_waiting() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut p = EndpointPace::new(s(5), 1);
        assert!(write(&mut p, 7, t0, report(1)));
        assert!(!write(&mut p, 7, t0 + s(1), report(2)));
        // The window ends; a newer report comes before the tick that would write report 2.
        assert!(write(&mut p, 7, t0 + s(5), report(3)));
        assert!(p.take_due(t0 + s(10)).is_empty(), "report 2 is stale");
    }

    #[test]
    fn a_report_that_changed_nothing_costs_nothing_and_idle_nodes_are_forgotten() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut p = EndpointPace::new(s(5), 1);
        // Offered but not written (the same endpoints again): the allowance stays.
        assert!(p.offer(7, t0, report(1)).is_some());
        assert!(p.offer(7, t0, report(1)).is_some());
        assert!(p.is_empty());
        p.wrote(7, t0);
        assert_eq!(p.len(), 1);
        assert!(p.take_due(t0 + s(4)).is_empty());
        assert_eq!(p.len(), 1, "still counting");
        assert!(p.take_due(t0 + s(5)).is_empty());
        assert!(p.is_empty(), "nothing left to remember");
        // A revoked node's waiting report goes with it.
        p.wrote(8, t0);
        assert!(!write(&mut p, 8, t0, report(2)));
        p.forget(8);
        assert!(p.take_due(t0 + s(60)).is_empty());
    }
}
