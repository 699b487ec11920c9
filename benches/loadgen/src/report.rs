//! The results of a run: per-change figures, the summary row, and their markdown and JSON
//! forms.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::scoreboard::{CounterValues, Wire};
use crate::sys::{Memory, UdpDrops};

/// The value at quantile `q` (0..=1) of `sorted` by nearest rank; zero when empty.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Milliseconds, as a float for reports.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// p50, p99 and max of some latencies, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Spread {
    /// Samples.
    pub samples: usize,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl Spread {
    /// The spread of `samples` (sorted here).
    pub fn of(mut samples: Vec<Duration>) -> Spread {
        samples.sort_unstable();
        Spread {
            samples: samples.len(),
            p50_ms: ms(quantile(&samples, 0.50)),
            p99_ms: ms(quantile(&samples, 0.99)),
            max_ms: ms(samples.last().copied().unwrap_or_default()),
        }
    }
}

/// One measured change: an existing agent reports new endpoints, the coordinator sends every
/// agent one delta.
#[derive(Debug, Clone, Serialize)]
pub struct ChangeResult {
    /// 1-based.
    pub change: usize,
    /// The agent that reported new endpoints.
    pub trigger_agent: usize,
    /// The coordinator that agent is connected to (0-based), where the change is made.
    pub trigger_coordinator: usize,
    /// The network version the change produced.
    pub version: u64,
    /// From the report being handed to QUIC to each agent having applied the delta.
    pub latency: Spread,
    /// The same, over the agents of the coordinator the change was made through.
    pub on_trigger_coordinator: Spread,
    /// The same, over the agents of the other coordinators (none with one coordinator):
    /// the change reached them through the shared database.
    pub on_other_coordinators: Spread,
    /// Agents that had not applied it when the wait timed out.
    pub missing: usize,
    /// Agents that got the version through a full map rather than the delta.
    pub by_full_map: u64,
    /// Delta frame bytes (4-byte length prefix + JSON), summed over the agents: the
    /// application bytes the coordinator wrote for this change.
    pub frame_bytes: u64,
    /// QUIC/UDP traffic on the agents' connections from just before the trigger to 250 ms
    /// after the last agent applied it (`SETTLE` in `main.rs`).
    pub wire: Wire,
    /// CPU time of the coordinator's threads over the same window, in milliseconds.
    pub coordinator_cpu_ms: f64,
    /// CPU time of the agents' threads over the same window, in milliseconds.
    pub agents_cpu_ms: f64,
    /// CPU time of the private PostgreSQL server's processes over the same window, in
    /// milliseconds; `None` without a private cluster.
    pub store_cpu_ms: Option<f64>,
}

/// The ramp-up: joining every agent, then draining every delta the joins caused.
#[derive(Debug, Clone, Serialize)]
pub struct RampResult {
    /// `live` (joins, each a delta to all) or `enroll` (joins, then connections).
    pub kind: String,
    /// With `enroll`: seconds to enroll every agent.
    pub enroll_secs: Option<f64>,
    /// From the first join to the last agent's first full map, in seconds.
    pub join_secs: f64,
    /// From then until every agent held the network's version, in seconds.
    pub drain_secs: f64,
    /// Per agent, the start that brought it online (connect, handshake, hello, welcome,
    /// full map): its join (`live`) or its connection after enrolling (`enroll`).
    pub online_latency: Spread,
    /// Traffic on the agents' connections during the ramp and drain.
    pub wire: Wire,
    /// The network's version once drained (one per join).
    pub version: u64,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// The command line of the run.
    pub command: String,
    /// Simulated agents.
    pub agents: usize,
    /// Measured changes.
    pub changes: usize,
    /// The coordinators, in words: in-process (with their QUIC addresses) or external.
    pub coordinator: String,
    /// How many coordinators the agents are spread over (agent `i` on coordinator
    /// `i % coordinators`).
    pub coordinators: usize,
    /// Their store: `sqlite`, `postgres (private cluster ...)`, the PostgreSQL URL without
    /// its password, or `external` (unknown).
    pub store: String,
    /// Sessions on each in-process coordinator at the end (empty for an external one).
    pub sessions_per_coordinator: Vec<usize>,
    /// `full` or `compact` (see `table.rs`).
    pub map: String,
    /// Client UDP sockets the agent connections share.
    pub client_endpoints: usize,
    /// Uses of the join token: N plus a few for retried joins.
    pub token_uses: u64,
    /// Coordinator limits the run set (in-process) as `name=value`.
    pub limits: Vec<String>,
    /// Worker threads of the coordinator's runtime (in-process) and of the agents' runtime.
    pub threads: (usize, usize),
    /// Ramp-up.
    pub ramp: RampResult,
    /// Every change.
    pub per_change: Vec<ChangeResult>,
    /// Latency over every (change, agent) pair.
    pub latency: Spread,
    /// Latency over the (change, agent) pairs where the agent is on the coordinator the
    /// change was made through.
    pub latency_on_trigger_coordinator: Spread,
    /// Latency over the other pairs (the change went through the database).
    pub latency_on_other_coordinators: Spread,
    /// The largest per-change p99.
    pub worst_change_p99_ms: f64,
    /// Mean delta frame bytes per change, summed over agents.
    pub frame_bytes_per_change: f64,
    /// Mean UDP bytes received by the agents per change.
    pub wire_rx_bytes_per_change: f64,
    /// Mean UDP bytes sent by the agents per change (acknowledgements, the report).
    pub wire_tx_bytes_per_change: f64,
    /// Mean coordinator CPU per change, in milliseconds.
    pub coordinator_cpu_ms_per_change: f64,
    /// Mean agent CPU per change, in milliseconds.
    pub agents_cpu_ms_per_change: f64,
    /// Mean CPU of the private PostgreSQL server per change, in milliseconds.
    pub store_cpu_ms_per_change: Option<f64>,
    /// The largest full map an agent received, in bytes (what a coordinator that resends
    /// whole maps would send each agent per change).
    pub full_map_bytes: u64,
    /// Process memory after the ramp.
    pub memory_after_ramp: Memory,
    /// Process memory at the end (`peak` is the run's peak).
    pub memory_end: Memory,
    /// Agent event counters after the ramp.
    pub counters_after_ramp: CounterValues,
    /// Agent event counters at the end.
    pub counters_end: CounterValues,
    /// Datagrams dropped by the coordinator's own UDP socket (full receive buffer) during
    /// the ramp and during the changes; `None` when its socket is not in this network
    /// namespace's `/proc/net/udp`.
    pub coordinator_socket_drops: Option<(u64, u64)>,
    /// Datagrams dropped by the agents' client sockets, during the ramp and the changes.
    pub agent_socket_drops: (u64, u64),
    /// UDP drops in the network namespace during the ramp.
    pub udp_drops_ramp: UdpDrops,
    /// UDP drops during the measured changes.
    pub udp_drops_changes: UdpDrops,
    /// Whether every agent ended with the coordinator's map (version and every peer).
    pub consistent: bool,
    /// What the consistency check found, in words.
    pub consistency: String,
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

impl RunReport {
    /// Fills the summary fields from `per_change` and the pooled latencies: all of them,
    /// those on the change's coordinator and those on the others.
    pub fn summarise(
        &mut self,
        all_latencies: Vec<Duration>,
        on_trigger_coordinator: Vec<Duration>,
        on_other_coordinators: Vec<Duration>,
    ) {
        let c = &self.per_change;
        self.latency = Spread::of(all_latencies);
        self.latency_on_trigger_coordinator = Spread::of(on_trigger_coordinator);
        self.latency_on_other_coordinators = Spread::of(on_other_coordinators);
        self.worst_change_p99_ms = c.iter().map(|r| r.latency.p99_ms).fold(0.0, f64::max);
        self.frame_bytes_per_change = mean(c.iter().map(|r| r.frame_bytes as f64));
        self.wire_rx_bytes_per_change = mean(c.iter().map(|r| r.wire.rx_bytes as f64));
        self.wire_tx_bytes_per_change = mean(c.iter().map(|r| r.wire.tx_bytes as f64));
        self.coordinator_cpu_ms_per_change = mean(c.iter().map(|r| r.coordinator_cpu_ms));
        self.agents_cpu_ms_per_change = mean(c.iter().map(|r| r.agents_cpu_ms));
        self.store_cpu_ms_per_change = c
            .iter()
            .all(|r| r.store_cpu_ms.is_some())
            .then(|| mean(c.iter().filter_map(|r| r.store_cpu_ms)));
    }

    /// The header of the summary table.
    pub fn summary_header() -> &'static str {
        "| N | coordinators | store | changes | p50 ms | p99 ms | max ms | worst change p99 ms | delta B/agent | app B/change | wire rx B/change | wire rx B/agent | coord CPU ms/change | full map B | join ramp s | drain s | RSS MiB (peak) |\n\
         |---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    }

    /// This run as one row of the summary table.
    pub fn summary_row(&self) -> String {
        let n = self.agents.max(1) as f64;
        format!(
            "| {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {} | {:.1} | {:.1} | {} ({}) |",
            self.agents,
            self.coordinators,
            self.store_kind(),
            self.changes,
            self.latency.p50_ms,
            self.latency.p99_ms,
            self.latency.max_ms,
            self.worst_change_p99_ms,
            self.frame_bytes_per_change / n,
            self.frame_bytes_per_change,
            self.wire_rx_bytes_per_change,
            self.wire_rx_bytes_per_change / n,
            self.coordinator_cpu_ms_per_change,
            self.full_map_bytes,
            self.ramp.join_secs,
            self.ramp.drain_secs,
            self.memory_end.rss >> 20,
            self.memory_end.peak >> 20,
        )
    }

    /// The store in one word, for tables: `sqlite`, `postgres` or `external`.
    pub fn store_kind(&self) -> &str {
        self.store.split_whitespace().next().unwrap_or("")
    }

    /// The whole report as markdown: summary, per-change table, ramp and anomalies.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let n = self.agents.max(1) as f64;
        let _ = writeln!(
            out,
            "## Propagation of one change to {} agents over {} coordinator{} ({}; store: {}; maps: {}; {} client sockets; threads: coordinators {}, agents {})\n",
            self.agents,
            self.coordinators,
            if self.coordinators == 1 { "" } else { "s" },
            self.coordinator,
            self.store,
            self.map,
            self.client_endpoints,
            self.threads.0,
            self.threads.1
        );
        let _ = writeln!(out, "{}", Self::summary_header());
        let _ = writeln!(out, "{}\n", self.summary_row());
        let _ = writeln!(
            out,
            "| change | agent | coordinator | version | p50 ms | p99 ms | max ms | missing | delta B/agent | wire rx B | rx datagrams | wire tx B | coord CPU ms | agents CPU ms | store CPU ms |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for c in &self.per_change {
            let applied = (self.agents - c.missing).max(1) as f64;
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {} | {:.0} | {} | {} | {} | {:.1} | {:.1} | {} |",
                c.change,
                c.trigger_agent,
                c.trigger_coordinator,
                c.version,
                c.latency.p50_ms,
                c.latency.p99_ms,
                c.latency.max_ms,
                c.missing,
                c.frame_bytes as f64 / applied,
                c.wire.rx_bytes,
                c.wire.rx_datagrams,
                c.wire.tx_bytes,
                c.coordinator_cpu_ms,
                c.agents_cpu_ms,
                c.store_cpu_ms.map_or("-".into(), |ms| format!("{ms:.1}")),
            );
        }
        let r = &self.ramp;
        let _ = writeln!(
            out,
            "\nRamp ({}): {} agents online in {:.1} s{} (start latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms), drained in {:.1} s to version {}; agents received {:.1} MB in {} datagrams ({:.0} B per pair of agents).",
            r.kind,
            self.agents,
            r.join_secs,
            r.enroll_secs
                .map(|s| format!(" (enrolling took {s:.1} s)"))
                .unwrap_or_default(),
            r.online_latency.p50_ms,
            r.online_latency.p99_ms,
            r.online_latency.max_ms,
            r.drain_secs,
            r.version,
            r.wire.rx_bytes as f64 / 1e6,
            r.wire.rx_datagrams,
            r.wire.rx_bytes as f64 / (n * n),
        );
        let _ = writeln!(
            out,
            "Per change: {:.0} delta bytes to every agent, {:.0} UDP bytes received and {:.0} sent per agent; coordinator CPU {:.2} ms, agents CPU {:.2} ms ({:.1} µs and {:.1} µs per agent).",
            self.frame_bytes_per_change / n,
            self.wire_rx_bytes_per_change / n,
            self.wire_tx_bytes_per_change / n,
            self.coordinator_cpu_ms_per_change,
            self.agents_cpu_ms_per_change,
            self.coordinator_cpu_ms_per_change * 1e3 / n,
            self.agents_cpu_ms_per_change * 1e3 / n,
        );
        if self.coordinators > 1 {
            let (t, o) = (
                &self.latency_on_trigger_coordinator,
                &self.latency_on_other_coordinators,
            );
            let _ = writeln!(
                out,
                "Coordinators: {} sharing {}; sessions at the end {}. Agents on the coordinator the change was made through: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; on the others (through the database): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms.",
                self.coordinators,
                self.store,
                self.sessions_per_coordinator
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" / "),
                t.p50_ms,
                t.p99_ms,
                t.max_ms,
                o.p50_ms,
                o.p99_ms,
                o.max_ms,
            );
        }
        if let Some(ms) = self.store_cpu_ms_per_change {
            let _ = writeln!(
                out,
                "PostgreSQL server CPU per change: {ms:.2} ms (its processes, outside this one)."
            );
        }
        let m = (&self.memory_after_ramp, &self.memory_end);
        let _ = writeln!(
            out,
            "Memory: RSS {} MiB after the ramp, {} MiB at the end, peak {} MiB.",
            m.0.rss >> 20,
            m.1.rss >> 20,
            m.1.peak >> 20
        );
        let (a, e) = (&self.counters_after_ramp, &self.counters_end);
        let _ = writeln!(
            out,
            "Agents: {} join retries; {} deltas and {} full maps applied; gaps {} (ramp) / {} (end); sessions lost {} / {}; reconnects {} / {}. UDP drops: {} receive-buffer errors during the ramp, {} during the changes.",
            e.join_retries,
            e.deltas,
            e.full_maps,
            a.gaps,
            e.gaps,
            a.sessions_lost,
            e.sessions_lost,
            a.reconnects,
            e.reconnects,
            self.udp_drops_ramp.rcvbuf_errors,
            self.udp_drops_changes.rcvbuf_errors,
        );
        let _ = writeln!(
            out,
            "Policies: {} deltas with a policy edit and {} with a policy whole applied; {} edits refused (not the agent's base).",
            e.policy_edits - a.policy_edits,
            e.policy_wholes - a.policy_wholes,
            e.edits_refused,
        );
        let _ = writeln!(
            out,
            "Dropped by socket (ramp / changes): coordinator {}, agents {} / {}.",
            self.coordinator_socket_drops
                .map_or("not visible".to_string(), |(r, c)| format!("{r} / {c}")),
            self.agent_socket_drops.0,
            self.agent_socket_drops.1,
        );
        let _ = writeln!(out, "Consistency: {}.", self.consistency);
        if !self.limits.is_empty() {
            let _ = writeln!(out, "Coordinator limits set: {}.", self.limits.join(", "));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&v, 0.5), Duration::from_millis(50));
        assert_eq!(quantile(&v, 0.99), Duration::from_millis(99));
        assert_eq!(quantile(&v, 1.0), Duration::from_millis(100));
        assert_eq!(quantile(&v[..1], 0.99), Duration::from_millis(1));
        assert_eq!(quantile(&[], 0.5), Duration::ZERO);
        let s = Spread::of(vec![Duration::from_millis(3), Duration::from_millis(1)]);
        assert_eq!((s.samples, s.p50_ms, s.max_ms), (2, 1.0, 3.0));
    }
}
