//! What the simulated agents report to the benchmark while they run, without a lock on the
//! hot path: each agent's map version, its live connection (for QUIC statistics), and, while
//! a change is being measured, the instant each agent applied it.
//!
//! A measurement is *armed* with the version the change will produce ([`Scoreboard::arm`]);
//! every agent then records, once, the instant its map reaches that version
//! ([`Scoreboard::applied`]), and the last one wakes the waiter ([`Scoreboard::wait`]).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Counters of notable events, summed over agents.
#[derive(Debug, Default)]
pub struct Counters {
    /// Deltas applied.
    pub deltas: AtomicU64,
    /// Full maps received (the one after each hello included).
    pub full_maps: AtomicU64,
    /// Deltas that did not follow the agent's version (each answered by one
    /// `FullMapRequest` unless one was already pending).
    pub gaps: AtomicU64,
    /// Sessions that ended while the benchmark ran (lost, dropped as lagging, refused).
    pub sessions_lost: AtomicU64,
    /// Sessions opened again with the node's credentials after one was lost.
    pub reconnects: AtomicU64,
    /// The largest full-map frame received, in bytes.
    pub largest_full_map: AtomicU64,
    /// Joins tried again after a connection failure or timeout.
    pub join_retries: AtomicU64,
    /// Deltas applied that carried a policy edit.
    pub policy_edits: AtomicU64,
    /// Deltas applied that carried a policy whole.
    pub policy_wholes: AtomicU64,
    /// Deltas refused because their policy edit did not fit the agent's policy (each
    /// answered by one `FullMapRequest` unless one was already pending).
    pub edits_refused: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CounterValues {
    /// See [`Counters::deltas`].
    pub deltas: u64,
    /// See [`Counters::full_maps`].
    pub full_maps: u64,
    /// See [`Counters::gaps`].
    pub gaps: u64,
    /// See [`Counters::sessions_lost`].
    pub sessions_lost: u64,
    /// See [`Counters::reconnects`].
    pub reconnects: u64,
    /// See [`Counters::largest_full_map`].
    pub largest_full_map: u64,
    /// See [`Counters::join_retries`].
    pub join_retries: u64,
    /// See [`Counters::policy_edits`].
    pub policy_edits: u64,
    /// See [`Counters::policy_wholes`].
    pub policy_wholes: u64,
    /// See [`Counters::edits_refused`].
    pub edits_refused: u64,
}

impl Counters {
    /// The current values.
    pub fn values(&self) -> CounterValues {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CounterValues {
            deltas: l(&self.deltas),
            full_maps: l(&self.full_maps),
            gaps: l(&self.gaps),
            sessions_lost: l(&self.sessions_lost),
            reconnects: l(&self.reconnects),
            largest_full_map: l(&self.largest_full_map),
            join_retries: l(&self.join_retries),
            policy_edits: l(&self.policy_edits),
            policy_wholes: l(&self.policy_wholes),
            edits_refused: l(&self.edits_refused),
        }
    }
}

/// Wire statistics summed over the agents' QUIC connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Wire {
    /// UDP payload bytes the agents received (what the coordinator sent them).
    pub rx_bytes: u64,
    /// UDP datagrams the agents received.
    pub rx_datagrams: u64,
    /// UDP payload bytes the agents sent (hellos, reports, acknowledgements).
    pub tx_bytes: u64,
    /// UDP datagrams the agents sent.
    pub tx_datagrams: u64,
}

impl Wire {
    /// `self - earlier`, per field.
    pub fn since(&self, earlier: &Wire) -> Wire {
        Wire {
            rx_bytes: self.rx_bytes.saturating_sub(earlier.rx_bytes),
            rx_datagrams: self.rx_datagrams.saturating_sub(earlier.rx_datagrams),
            tx_bytes: self.tx_bytes.saturating_sub(earlier.tx_bytes),
            tx_datagrams: self.tx_datagrams.saturating_sub(earlier.tx_datagrams),
        }
    }
}

/// One measured change, as the agents saw it.
#[derive(Debug, Clone)]
pub struct Arrivals {
    /// Per agent: time from the trigger to the change being applied; `None` for agents that
    /// never applied it (the wait timed out).
    pub latency: Vec<Option<Duration>>,
    /// Bytes of the delta frames carrying the change, summed over the agents that applied it
    /// through a delta (length prefix included).
    pub frame_bytes: u64,
    /// Agents that reached the version through a full map instead.
    pub by_full_map: u64,
}

/// See the module documentation.
#[derive(Debug)]
pub struct Scoreboard {
    base: Instant,
    versions: Vec<AtomicU64>,
    connections: Vec<Mutex<Option<quinn::Connection>>>,
    target: AtomicU64,
    arrivals: Vec<AtomicU64>,
    pending: AtomicUsize,
    frame_bytes: AtomicU64,
    by_full_map: AtomicU64,
    done: Notify,
    /// Event counters.
    pub counters: Counters,
}

impl Scoreboard {
    /// A board for `agents` agents.
    pub fn new(agents: usize) -> Self {
        Scoreboard {
            base: Instant::now(),
            versions: (0..agents).map(|_| AtomicU64::new(0)).collect(),
            connections: (0..agents).map(|_| Mutex::new(None)).collect(),
            target: AtomicU64::new(0),
            arrivals: (0..agents).map(|_| AtomicU64::new(0)).collect(),
            pending: AtomicUsize::new(0),
            frame_bytes: AtomicU64::new(0),
            by_full_map: AtomicU64::new(0),
            done: Notify::new(),
            counters: Counters::default(),
        }
    }

    /// The number of agents.
    pub fn agents(&self) -> usize {
        self.versions.len()
    }

    /// Records agent `agent`'s live connection (replacing a lost one).
    pub fn set_connection(&self, agent: usize, conn: quinn::Connection) {
        *self.connections[agent]
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(conn);
    }

    /// The agents' QUIC statistics, summed.
    pub fn wire(&self) -> Wire {
        let mut w = Wire::default();
        for slot in &self.connections {
            let conn = slot.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(conn) = conn {
                let s = conn.stats();
                w.rx_bytes += s.udp_rx.bytes;
                w.rx_datagrams += s.udp_rx.datagrams;
                w.tx_bytes += s.udp_tx.bytes;
                w.tx_datagrams += s.udp_tx.datagrams;
            }
        }
        w
    }

    /// Every agent's current connection, for closing them at the end.
    pub fn take_connections(&self) -> Vec<quinn::Connection> {
        self.connections
            .iter()
            .filter_map(|slot| slot.lock().unwrap_or_else(|p| p.into_inner()).take())
            .collect()
    }

    /// How many agents hold exactly `version`.
    pub fn agents_at(&self, version: u64) -> usize {
        self.versions
            .iter()
            .filter(|v| v.load(Ordering::Acquire) == version)
            .count()
    }

    /// The lowest version any agent holds.
    pub fn lowest_version(&self) -> u64 {
        self.versions
            .iter()
            .map(|v| v.load(Ordering::Acquire))
            .min()
            .unwrap_or(0)
    }

    /// Starts measuring the change that will produce `version`. Call before triggering it.
    pub fn arm(&self, version: u64) {
        self.target.store(0, Ordering::SeqCst);
        for a in &self.arrivals {
            a.store(0, Ordering::Relaxed);
        }
        self.frame_bytes.store(0, Ordering::Relaxed);
        self.by_full_map.store(0, Ordering::Relaxed);
        self.pending.store(self.agents(), Ordering::SeqCst);
        self.target.store(version, Ordering::SeqCst);
    }

    /// Agent `agent` now holds `version`. `delta_frame` is the length of the delta frame that
    /// took it there (`None` for a full map). Cheap when nothing is being measured.
    pub fn applied(&self, agent: usize, version: u64, delta_frame: Option<usize>) {
        self.versions[agent].store(version, Ordering::Release);
        let target = self.target.load(Ordering::Acquire);
        if target == 0 || version < target {
            return;
        }
        let at = self.stamp(Instant::now());
        if self.arrivals[agent]
            .compare_exchange(0, at, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        match delta_frame {
            Some(len) if version == target => {
                self.frame_bytes.fetch_add(len as u64, Ordering::Relaxed);
            }
            Some(_) => {}
            None => {
                self.by_full_map.fetch_add(1, Ordering::Relaxed);
            }
        }
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.notify_one();
        }
    }

    /// Waits until every agent applied the armed change, or `limit` passes; then disarms and
    /// returns the latencies from `trigger`.
    pub async fn wait(&self, trigger: Instant, limit: Duration) -> Arrivals {
        let _ = tokio::time::timeout(limit, async {
            loop {
                let notified = self.done.notified();
                if self.pending.load(Ordering::Acquire) == 0 {
                    break;
                }
                notified.await;
            }
        })
        .await;
        self.target.store(0, Ordering::SeqCst);
        let t0 = self.stamp(trigger);
        let latency = self
            .arrivals
            .iter()
            .map(|a| match a.load(Ordering::Acquire) {
                0 => None,
                at => Some(Duration::from_nanos(at.saturating_sub(t0))),
            })
            .collect();
        Arrivals {
            latency,
            frame_bytes: self.frame_bytes.load(Ordering::Relaxed),
            by_full_map: self.by_full_map.load(Ordering::Relaxed),
        }
    }

    /// Nanoseconds since the board was made, plus one (zero means "not yet").
    fn stamp(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX - 1)
            + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_agent_is_timed_once() {
        let board = Scoreboard::new(3);
        for a in 0..3 {
            board.applied(a, 4, Some(100));
        }
        let trigger = Instant::now();
        board.arm(5);
        board.applied(0, 5, Some(100));
        board.applied(0, 5, Some(100));
        board.applied(1, 5, None);
        board.applied(2, 6, Some(90));
        let got = board.wait(trigger, Duration::from_secs(1)).await;
        assert!(got.latency.iter().all(Option::is_some));
        assert_eq!(
            got.frame_bytes, 100,
            "only the delta to the armed version counts"
        );
        assert_eq!(got.by_full_map, 1);
        assert_eq!(board.agents_at(5), 2);
        assert_eq!(board.lowest_version(), 5);
    }

    #[tokio::test]
    async fn a_missing_agent_times_out() {
        let board = Scoreboard::new(2);
        let trigger = Instant::now();
        board.arm(1);
        board.applied(0, 1, Some(10));
        let got = board.wait(trigger, Duration::from_millis(20)).await;
        assert!(got.latency[0].is_some() && got.latency[1].is_none());
    }
}
