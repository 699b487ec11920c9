//! What the coordinator measures of itself, for Prometheus (`GET /metrics` on the admin
//! listener, see `admin/metrics.rs`).
//!
//! The values are kept by the `metrics` crate's process-wide recorder, here the Prometheus
//! exporter's ([`install`]: its recorder and handle only, no listener of its own; the admin
//! API renders it). Every name is in [`names`], with what it counts; README ("Metrics") is the
//! operator's list.
//!
//! Labels are bounded: transports, causes, store operations and admin routes are fixed sets
//! (an admin route is the router's template, such as `/v1/nodes/{reference}`, never the
//! path asked for); the one label an operator chooses, `network`, is bounded by the networks
//! in the store. No label carries a node id, a key or an address.
//!
//! Hot paths keep handles: a session makes its [`SessionMeter`] once, and counts each frame
//! it writes with atomic adds; nothing is looked up per frame. A delta's propagation sample
//! is a clock read and a push onto the recorder's lock-free list (which allocates a block per
//! 64 samples, freed when [`upkeep`] or a scrape drains it into the buckets). Rare events (a
//! move, an admin request, a store call) use the `metrics` macros directly. The relay counts
//! in its own atomics, read at each scrape.
//!
//! Several coordinators in one process (tests) share the one recorder: their counts add up.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Gauge, Histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::hub::{Frame, FrameKind};

/// Every metric's name.
pub mod names {
    /// Gauge, `transport` (`quic`, `tcp`): agent sessions open here (hello accepted).
    pub const SESSIONS: &str = "meshlink_coordinator_sessions";
    /// Gauge: agent connections open here, with or without an accepted hello.
    pub const CONNECTIONS: &str = "meshlink_coordinator_connections";
    /// Gauge, `network`: nodes in the network's map (not revoked).
    pub const NODES: &str = "meshlink_coordinator_nodes";
    /// Gauge, `network`: nodes with a session on this coordinator.
    pub const NODES_ONLINE: &str = "meshlink_coordinator_nodes_online";
    /// Gauge, `network`: the version of the network's map here.
    pub const MAP_VERSION: &str = "meshlink_coordinator_map_version";
    /// Gauge, `network`: workloads in the network's map.
    pub const WORKLOADS: &str = "meshlink_coordinator_workloads";
    /// Counter: changes of a map the hub published to its sessions (one per version).
    pub const MAP_CHANGES: &str = "meshlink_coordinator_map_changes_total";
    /// Counter: deltas written to agent sessions (one per session per change).
    pub const DELTAS_PUSHED: &str = "meshlink_coordinator_deltas_pushed_total";
    /// Counter: full maps written to agent sessions.
    pub const FULL_MAPS_PUSHED: &str = "meshlink_coordinator_full_maps_pushed_total";
    /// Counter, `kind` (`delta`, `full_map`, `other`): bytes of control messages written to
    /// agent sessions, as written (compressed where the agent takes it); relayed datagrams
    /// are not in it.
    pub const PUSHED_BYTES: &str = "meshlink_coordinator_pushed_bytes_total";
    /// Histogram, seconds: from a change's publication (its store transaction committed,
    /// under the write lock; for a change another coordinator committed, when this one read
    /// it from the change log) to the end of the write of its delta to one agent session (the
    /// bytes handed to QUIC or TLS). One sample per session per delta.
    pub const PROPAGATION: &str = "meshlink_coordinator_propagation_seconds";
    /// Counter, `reason` (`queue_full`): sessions dropped by the hub.
    pub const SESSIONS_DROPPED: &str = "meshlink_coordinator_sessions_dropped_total";
    /// Counter, `cause` (`operator`, `claim`, `release`): changes of a workload's holder to a
    /// node committed here, failovers apart.
    pub const MOVES: &str = "meshlink_coordinator_moves_total";
    /// Histogram, seconds, `cause`: from the request reaching the service to the new holder
    /// being confirmed (told it may answer).
    pub const MOVE_DURATION: &str = "meshlink_coordinator_move_duration_seconds";
    /// Counter, `cause` (`operator`, `claim`, `release`, `failover`): changes of holder that
    /// failed (the store refused or failed).
    pub const MOVE_ERRORS: &str = "meshlink_coordinator_move_errors_total";
    /// Counter: workloads failed over from a silent holder, committed here.
    pub const FAILOVERS: &str = "meshlink_coordinator_failovers_total";
    /// Histogram, seconds: from the last heartbeat this coordinator received from the silent
    /// holder to the new holder being confirmed.
    pub const FAILOVER_DURATION: &str = "meshlink_coordinator_failover_duration_seconds";
    /// Counter, `route` (the router's template), `method`, `status`: admin API requests.
    pub const ADMIN_REQUESTS: &str = "meshlink_coordinator_admin_requests_total";
    /// Histogram, seconds, `route`, `method`: admin API requests, until the answer's head.
    pub const ADMIN_DURATION: &str = "meshlink_coordinator_admin_request_duration_seconds";
    /// Histogram, seconds, `op` (the `Store` method): store calls.
    pub const STORE_DURATION: &str = "meshlink_coordinator_store_operation_duration_seconds";
    /// Counter, `op`, `error` (`refused`: a rule of the store kept, such as a name taken or a
    /// record gone; `database`: the database failed): store calls that returned an error.
    pub const STORE_ERRORS: &str = "meshlink_coordinator_store_errors_total";
    /// Counter: frames the relay forwarded.
    pub const RELAY_FRAMES: &str = "meshlink_coordinator_relay_frames_total";
    /// Counter: bytes the relay forwarded.
    pub const RELAY_BYTES: &str = "meshlink_coordinator_relay_bytes_total";
    /// Counter, `reason`: frames the relay dropped (as `GET /v1/status` names them).
    pub const RELAY_DROPPED: &str = "meshlink_coordinator_relay_dropped_total";
    /// Gauge, `transport` (`quic`, `tcp`): relay sessions open on this coordinator's port (a
    /// mesh of several coordinators).
    pub const RELAY_SESSIONS: &str = "meshlink_coordinator_relay_sessions";
    /// Counter, `outcome` (`answered`, `refused`, `ignored`): datagrams of the reflect port.
    pub const REFLECT: &str = "meshlink_coordinator_reflect_datagrams_total";
    /// Gauge, `version`: 1.
    pub const BUILD_INFO: &str = "meshlink_coordinator_build_info";

    /// Every name above.
    pub const ALL: &[&str] = &[
        SESSIONS,
        CONNECTIONS,
        NODES,
        NODES_ONLINE,
        MAP_VERSION,
        WORKLOADS,
        MAP_CHANGES,
        DELTAS_PUSHED,
        FULL_MAPS_PUSHED,
        PUSHED_BYTES,
        PROPAGATION,
        SESSIONS_DROPPED,
        MOVES,
        MOVE_DURATION,
        MOVE_ERRORS,
        FAILOVERS,
        FAILOVER_DURATION,
        ADMIN_REQUESTS,
        ADMIN_DURATION,
        STORE_DURATION,
        STORE_ERRORS,
        RELAY_FRAMES,
        RELAY_BYTES,
        RELAY_DROPPED,
        RELAY_SESSIONS,
        REFLECT,
        BUILD_INFO,
    ];
}

/// Upper bounds of the buckets of the short latencies (propagation, store, admin requests),
/// seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Upper bounds of the buckets of moves and failovers, seconds (a failover waits a lease, 1.5 s
/// by default, and the margin).
pub const HANDOVER_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 5.0, 10.0, 30.0, 60.0,
];

/// How often [`upkeep`] should run: histogram samples wait in the recorder until then (or the
/// next scrape).
pub const UPKEEP_EVERY: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder as the process's `metrics` recorder, once; later calls
/// return the same handle. `None` when another recorder was installed first (by a program
/// embedding the coordinator): then `GET /metrics` answers 503 and the values go to that
/// recorder.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = builder().build_recorder();
            let handle = recorder.handle();
            match metrics::set_global_recorder(recorder) {
                Ok(()) => {
                    describe();
                    register();
                    Some(handle)
                }
                Err(_) => {
                    tracing::warn!(
                        "another metrics recorder is installed: GET /metrics will answer 503"
                    );
                    None
                }
            }
        })
        .clone()
}

/// The handle [`install`] made, if it did.
pub fn handle() -> Option<PrometheusHandle> {
    HANDLE.get().cloned().flatten()
}

/// Drains the histograms' samples into their buckets, so that they do not grow between
/// scrapes. Call it every [`UPKEEP_EVERY`].
pub fn upkeep() {
    if let Some(h) = handle() {
        h.run_upkeep();
    }
}

fn builder() -> PrometheusBuilder {
    let mut b = PrometheusBuilder::new();
    for (name, buckets) in [
        (names::PROPAGATION, LATENCY_BUCKETS),
        (names::ADMIN_DURATION, LATENCY_BUCKETS),
        (names::STORE_DURATION, LATENCY_BUCKETS),
        (names::MOVE_DURATION, HANDOVER_BUCKETS),
        (names::FAILOVER_DURATION, HANDOVER_BUCKETS),
    ] {
        // The only error is an empty list; these are constants (tested).
        b = b
            .set_buckets_for_metric(Matcher::Full(name.to_string()), buckets)
            .expect("bucket lists are not empty");
    }
    b
}

/// Makes the series that exist from the start (at zero), so that a dashboard's rates and
/// sums have them before the first event.
fn register() {
    use names::*;
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    for t in [Transport::Quic, Transport::Tcp] {
        gauge!(SESSIONS, "transport" => t.as_str()).increment(0.0);
    }
    for name in [MAP_CHANGES, DELTAS_PUSHED, FULL_MAPS_PUSHED, FAILOVERS] {
        counter!(name).increment(0);
    }
    for kind in ["delta", "full_map", "other"] {
        counter!(PUSHED_BYTES, "kind" => kind).increment(0);
    }
    for cause in [MoveCause::Operator, MoveCause::Claim, MoveCause::Release] {
        counter!(MOVES, "cause" => cause.as_str()).increment(0);
    }
    counter!(SESSIONS_DROPPED, "reason" => "queue_full").increment(0);
}

fn describe() {
    use names::*;
    describe_gauge!(
        SESSIONS,
        "Agent sessions open here (hello accepted), by transport."
    );
    describe_gauge!(
        CONNECTIONS,
        "Agent connections open here, with or without an accepted hello."
    );
    describe_gauge!(NODES, "Nodes in the network's map (not revoked).");
    describe_gauge!(NODES_ONLINE, "Nodes with a session on this coordinator.");
    describe_gauge!(MAP_VERSION, "Version of the network's map here.");
    describe_gauge!(WORKLOADS, "Workloads in the network's map.");
    describe_counter!(
        MAP_CHANGES,
        "Map changes published to sessions (one per version)."
    );
    describe_counter!(DELTAS_PUSHED, "Deltas written to agent sessions.");
    describe_counter!(FULL_MAPS_PUSHED, "Full maps written to agent sessions.");
    describe_counter!(
        PUSHED_BYTES,
        Unit::Bytes,
        "Bytes of control messages written to agent sessions, by kind."
    );
    describe_histogram!(
        PROPAGATION,
        Unit::Seconds,
        "From a change's publication (store commit) to its delta written to one agent session."
    );
    describe_counter!(SESSIONS_DROPPED, "Sessions dropped by the hub, by reason.");
    describe_counter!(
        MOVES,
        "Changes of a workload's holder committed here, by cause."
    );
    describe_histogram!(
        MOVE_DURATION,
        Unit::Seconds,
        "From a move's request to its new holder's confirmation, by cause."
    );
    describe_counter!(MOVE_ERRORS, "Changes of holder that failed, by cause.");
    describe_counter!(FAILOVERS, "Workloads failed over from a silent holder.");
    describe_histogram!(
        FAILOVER_DURATION,
        Unit::Seconds,
        "From the silent holder's last heartbeat to the new holder's confirmation."
    );
    describe_counter!(
        ADMIN_REQUESTS,
        "Admin API requests by route template, method and status."
    );
    describe_histogram!(
        ADMIN_DURATION,
        Unit::Seconds,
        "Admin API request durations by route template and method."
    );
    describe_histogram!(
        STORE_DURATION,
        Unit::Seconds,
        "Store call durations by operation."
    );
    describe_counter!(
        STORE_ERRORS,
        "Store calls that returned an error, by operation and class."
    );
    describe_counter!(RELAY_FRAMES, "Frames the relay forwarded.");
    describe_counter!(RELAY_BYTES, Unit::Bytes, "Bytes the relay forwarded.");
    describe_counter!(RELAY_DROPPED, "Frames the relay dropped, by reason.");
    describe_gauge!(
        RELAY_SESSIONS,
        "Relay sessions open on this coordinator's port (a mesh of several), by transport."
    );
    describe_counter!(REFLECT, "Datagrams of the reflect port, by outcome.");
    describe_gauge!(BUILD_INFO, "1, labelled with the coordinator's version.");
}

/// A session's transport, as the `transport` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// QUIC.
    Quic,
    /// TLS over TCP.
    Tcp,
}

impl Transport {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
        }
    }
}

/// One agent session's handles: what it writes is counted through them, and it counts as
/// open until dropped.
#[derive(Debug)]
pub struct SessionMeter {
    open: Gauge,
    deltas: Counter,
    full_maps: Counter,
    delta_bytes: Counter,
    full_map_bytes: Counter,
    other_bytes: Counter,
    propagation: Histogram,
}

impl SessionMeter {
    /// A session just accepted on `transport`: counted open from now.
    pub fn open(transport: Transport) -> Self {
        let open = gauge!(names::SESSIONS, "transport" => transport.as_str());
        open.increment(1.0);
        SessionMeter {
            open,
            deltas: counter!(names::DELTAS_PUSHED),
            full_maps: counter!(names::FULL_MAPS_PUSHED),
            delta_bytes: counter!(names::PUSHED_BYTES, "kind" => "delta"),
            full_map_bytes: counter!(names::PUSHED_BYTES, "kind" => "full_map"),
            other_bytes: counter!(names::PUSHED_BYTES, "kind" => "other"),
            propagation: histogram!(names::PROPAGATION),
        }
    }

    /// `frame` was written to the agent as `bytes` bytes, at `now` (the service's clock, as
    /// the frame's publication time is).
    pub fn written(&self, frame: &Frame, bytes: usize, now: Instant) {
        let bytes = u64::try_from(bytes).unwrap_or(u64::MAX);
        match frame.kind() {
            FrameKind::Delta => {
                self.deltas.increment(1);
                self.delta_bytes.increment(bytes);
                if let Some(at) = frame.published() {
                    self.propagation
                        .record(now.saturating_duration_since(at).as_secs_f64());
                }
            }
            FrameKind::FullMap => {
                self.full_maps.increment(1);
                self.full_map_bytes.increment(bytes);
            }
            FrameKind::Other => self.other_bytes.increment(bytes),
        }
    }
}

impl Drop for SessionMeter {
    fn drop(&mut self) {
        self.open.decrement(1.0);
    }
}

/// Why a workload changed holder, as the `cause` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveCause {
    /// An operator's attach or move.
    Operator,
    /// The destination's own claim.
    Claim,
    /// Its holder was revoked or deleted.
    Release,
    /// Its holder went silent.
    Failover,
}

impl MoveCause {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            MoveCause::Operator => "operator",
            MoveCause::Claim => "claim",
            MoveCause::Release => "release",
            MoveCause::Failover => "failover",
        }
    }
}

/// A change of holder to a node was committed.
pub fn move_committed(cause: MoveCause) {
    match cause {
        MoveCause::Failover => counter!(names::FAILOVERS).increment(1),
        c => counter!(names::MOVES, "cause" => c.as_str()).increment(1),
    }
}

/// A change of holder failed.
pub fn move_failed(cause: MoveCause) {
    counter!(names::MOVE_ERRORS, "cause" => cause.as_str()).increment(1);
}

/// The new holder of a change of `cause` was confirmed `took` after its start (see
/// [`names::MOVE_DURATION`] and [`names::FAILOVER_DURATION`]).
pub fn handover_confirmed(cause: MoveCause, took: Duration) {
    match cause {
        MoveCause::Failover => histogram!(names::FAILOVER_DURATION).record(took.as_secs_f64()),
        c => histogram!(names::MOVE_DURATION, "cause" => c.as_str()).record(took.as_secs_f64()),
    }
}

/// The hub published a change of a map.
pub fn map_changed() {
    counter!(names::MAP_CHANGES).increment(1);
}

/// The hub dropped a session whose queue was full.
pub fn session_dropped() {
    counter!(names::SESSIONS_DROPPED, "reason" => "queue_full").increment(1);
}

/// A store call `op` took `took`; `failed`: the class of its error, if it returned one.
pub fn store_call(op: &'static str, took: Duration, failed: Option<&'static str>) {
    histogram!(names::STORE_DURATION, "op" => op).record(took.as_secs_f64());
    if let Some(error) = failed {
        counter!(names::STORE_ERRORS, "op" => op, "error" => error).increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_lists_are_not_empty_and_grow() {
        for buckets in [LATENCY_BUCKETS, HANDOVER_BUCKETS] {
            assert!(!buckets.is_empty());
            assert!(buckets.windows(2).all(|w| w[0] < w[1]), "{buckets:?}");
        }
        // The recorder is made with them without a panic.
        let _ = builder().build_recorder();
    }

    #[test]
    fn label_values_are_fixed() {
        assert_eq!(Transport::Quic.as_str(), "quic");
        assert_eq!(Transport::Tcp.as_str(), "tcp");
        let causes = [
            MoveCause::Operator,
            MoveCause::Claim,
            MoveCause::Release,
            MoveCause::Failover,
        ];
        let labels: Vec<&str> = causes.iter().map(|c| c.as_str()).collect();
        assert_eq!(labels, ["operator", "claim", "release", "failover"]);
    }
}
