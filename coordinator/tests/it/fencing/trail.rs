//! What a failing fencing run tells about itself: a bounded trail of what happened, per
//! workload, per node and at the coordinators (the service's own log lines included),
//! printed when two holders of one workload are first seen.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use meshlink_proto::control::{ClientMessage, ServerMessage};
use meshlink_proto::netmap::Netmap;
use meshlink_proto::NodeId;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

use super::SimClock;

/// Lines kept per workload, per node and for the coordinators.
const KEPT: usize = 800;
/// How far back (simulated ms) a report goes.
const REPORT_MS: u64 = 8_000;

#[derive(Default)]
struct Lines {
    workloads: BTreeMap<String, VecDeque<(u64, String)>>,
    nodes: BTreeMap<NodeId, VecDeque<(u64, String)>>,
    coordinator: VecDeque<(u64, String)>,
}

fn push(list: &mut VecDeque<(u64, String)>, at: u64, line: String) {
    if list.len() == KEPT {
        list.pop_front();
    }
    list.push_back((at, line));
}

/// The trail of one run, shared with the service's log (a tracing layer) and the operator's
/// tasks.
#[derive(Clone)]
pub(super) struct Trail {
    lines: Arc<Mutex<Lines>>,
    clock: Arc<SimClock>,
}

impl Trail {
    pub(super) fn new(clock: Arc<SimClock>) -> Self {
        Trail {
            lines: Arc::default(),
            clock,
        }
    }

    fn now(&self) -> u64 {
        self.clock.ms.load(Ordering::SeqCst)
    }

    fn lines(&self) -> std::sync::MutexGuard<'_, Lines> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn workload(&self, name: &str, line: String) {
        let at = self.now();
        push(
            self.lines().workloads.entry(name.to_string()).or_default(),
            at,
            line,
        );
    }

    pub(super) fn node(&self, node: NodeId, line: String) {
        let at = self.now();
        push(self.lines().nodes.entry(node).or_default(), at, line);
    }

    pub(super) fn coordinator(&self, line: String) {
        let at = self.now();
        push(&mut self.lines().coordinator, at, line);
    }

    /// The last [`REPORT_MS`] of workload `name`'s, the coordinators' and `nodes`' trails,
    /// merged in time order.
    pub(super) fn report(&self, name: &str, nodes: &[NodeId]) -> String {
        let since = self.now().saturating_sub(REPORT_MS);
        let lines = self.lines();
        let mut sources = vec![
            (name.to_string(), lines.workloads.get(name)),
            ("coord".to_string(), Some(&lines.coordinator)),
        ];
        sources.extend(
            nodes
                .iter()
                .map(|n| (format!("vm-{n}"), lines.nodes.get(n))),
        );
        let mut all: Vec<(u64, &str, &str)> = Vec::new();
        for (who, list) in &sources {
            for (at, l) in list.iter().copied().flatten() {
                if *at >= since {
                    all.push((*at, who, l));
                }
            }
        }
        // Stable: the order of each source stays.
        all.sort_by_key(|(at, _, _)| *at);
        let mut out = String::new();
        for (at, who, l) in all {
            let _ = writeln!(out, "  {at:>6} {who:>5}: {l}");
        }
        out
    }

    /// A subscriber that records the coordinators' log lines (info and above) here.
    pub(super) fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync {
        let targets = tracing_subscriber::filter::Targets::new()
            .with_target("meshlink_coordinator", tracing::Level::INFO);
        tracing_subscriber::registry().with(ServiceLog(self.clone()).with_filter(targets))
    }
}

struct ServiceLog(Trail);

#[derive(Default)]
struct Fields {
    workload: Option<String>,
    text: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "workload" {
            self.workload = Some(value.to_string());
        }
        self.record_debug(field, &value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.text, "{value:?} ");
        } else {
            if field.name() == "workload" && self.workload.is_none() {
                self.workload = Some(format!("{value:?}"));
            }
            let _ = write!(self.text, "{}={value:?} ", field.name());
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for ServiceLog {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let mut f = Fields::default();
        event.record(&mut f);
        let line = format!("log {}", f.text.trim_end());
        match f.workload {
            Some(w) => self.0.workload(&w, line),
            None => self.0.coordinator(line),
        }
    }
}

/// A map's workloads, shortly: `name g<generation>@<holder>`.
pub(super) fn workloads(map: &Netmap) -> String {
    map.workloads
        .values()
        .map(|w| format!("{} g{}@{:?}", w.name, w.generation, w.holder))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A message to an agent, shortly; workload ids named by `map`.
pub(super) fn server_message(msg: &ServerMessage, map: &Netmap) -> String {
    let name = |id: u64| {
        map.workloads
            .values()
            .find(|w| w.id == id)
            .map_or(format!("#{id}"), |w| w.name.clone())
    };
    match msg {
        ServerMessage::FullMap(m) => format!("<- full map v{}: {}", m.version, workloads(m)),
        ServerMessage::Delta(d) => {
            let up: Vec<String> = d
                .upsert_workloads
                .iter()
                .map(|w| format!("{} g{}@{:?}", w.name, w.generation, w.holder))
                .collect();
            format!(
                "<- delta v{}->v{} {} {}",
                d.from_version,
                d.to_version,
                up.join(", "),
                d.remove_workloads
                    .iter()
                    .map(|n| format!("-{n}"))
                    .collect::<String>()
            )
        }
        ServerMessage::Lease {
            seq,
            lease_ms,
            version,
            confirmed,
        } => format!(
            "<- lease #{seq} {lease_ms} ms v{version} confirmed {:?}",
            confirmed.as_ref().map(|c| c
                .iter()
                .map(|c| format!("{} g{}", name(c.workload), c.generation))
                .collect::<Vec<_>>())
        ),
        ServerMessage::Prepare {
            workload,
            generation,
            ..
        } => format!("<- prepare {workload} g{generation}"),
        ServerMessage::ClaimResult {
            request,
            generation,
            error,
        } => format!("<- claim {request} result g{generation:?} {error:?}"),
        other => format!("<- {other:?}"),
    }
}

/// A message from an agent, shortly (`None`: not worth a line).
pub(super) fn client_message(msg: &ClientMessage) -> Option<String> {
    match msg {
        ClientMessage::Heartbeat { seq, version } => Some(format!("hb #{seq} v{version:?}")),
        ClientMessage::Prepared {
            workload,
            generation,
        } => Some(format!("prepared {workload} g{generation}")),
        ClientMessage::Claim { request, workload } => Some(format!("claim {request} {workload}")),
        ClientMessage::FullMapRequest => Some("full map request".into()),
        _ => None,
    }
}
