//! The agent's Prometheus metrics: what `metrics_listen` serves at `/metrics`.
//!
//! Collector style: the data plane already keeps its counters (per peer in
//! `dataplane::status`, per device in `DeviceDrops`), so nothing is added to the packet path.
//! At each scrape the agent takes a [`Snapshot`] of them (the same state `meshlink-agent status`
//! shows) and [`AgentMetrics::render`] writes it out through a recorder made for that scrape:
//! a peer that left the table leaves the output with it, and every counter is exactly the data
//! plane's. The one thing measured as it happens, reconciliation durations, goes to a
//! histogram in a recorder that lives as long as the agent.
//!
//! Every name starts with `meshlink_agent_`. Peers are labelled `peer` with their node name
//! from the network map, or their public key in base64 when the map does not name them (static
//! peers); the label set is bounded by the peer table.
//!
//! # Security
//! The metrics name the peers and their traffic: they are served only on loopback or a Unix
//! socket (`config::parse_metrics_listen` refuses anything else).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use metrics::{
    counter, describe_counter, describe_gauge, gauge, Histogram, Key, Metadata, Recorder, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusRecorder};

use crate::dataplane::status::{DropCounts, PeerStatus};
use crate::settings::MetricsListen;
pub use meshlink_proto::control::PathKind;

/// The reconciliation histogram's name.
pub const RECONCILE_DURATION: &str = "meshlink_agent_reconcile_duration_seconds";

/// The histogram's buckets, in seconds: a pass is normally well under a millisecond; a policy
/// compiled for thousands of peers takes longer.
const RECONCILE_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

/// The path kinds, in the order the path gauge lists them.
const PATH_KINDS: [PathKind; 4] = [
    PathKind::Direct,
    PathKind::Unconfirmed,
    PathKind::Relay,
    PathKind::None,
];

/// A path kind as a label value (as `meshlink-agent status` and the path reports spell it).
pub fn path_label(kind: PathKind) -> &'static str {
    match kind {
        PathKind::Direct => "direct",
        PathKind::Unconfirmed => "unconfirmed",
        PathKind::Relay => "relay",
        PathKind::None => "none",
    }
}

/// One peer at scrape time.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerSample {
    /// The peer's node name, when the network map gives one.
    pub name: Option<String>,
    /// What the data plane reports of it.
    pub status: PeerStatus,
    /// How it is reached.
    pub path: PathKind,
}

/// The device's own drop counters (those no peer can be charged with).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceDropSample {
    /// Outbound packets no peer's allowed IPs hold.
    pub no_route: u64,
    /// Outbound packets for a peer with no endpoint.
    pub no_endpoint: u64,
    /// Inbound datagrams naming no peer of ours.
    pub unknown_peer: u64,
    /// Outbound packets that are neither IPv4 nor IPv6.
    pub malformed: u64,
    /// Outbound packets with the source address of an external node this node serves.
    pub foreign_source: u64,
    /// UDP sends that failed.
    pub udp_send_errors: u64,
}

/// The control session at scrape time (a joined node).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlSample {
    /// Whether a session with a coordinator is up.
    pub connected: bool,
    /// The version of the network map the session holds.
    pub map_version: u64,
}

/// Everything a scrape shows, taken at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// When it was taken (handshake ages are counted to it).
    pub now: SystemTime,
    /// The peers.
    pub peers: Vec<PeerSample>,
    /// The device's drops.
    pub device: DeviceDropSample,
    /// Packets for a released workload address sent on to its new holder.
    pub forwarded: u64,
    /// Packets from or to an external node this node is the gateway of, sent on.
    pub gatewayed: u64,
    /// The control session; `None` for static peers.
    pub control: Option<ControlSample>,
    /// Whether the agent's threads hold real-time priority now (see `platform::sched`).
    pub realtime: bool,
    /// Times real-time priority was given up under overload.
    pub realtime_releases: u64,
}

/// What a scrape reads: the running agent (`run::Control`), or a fixed snapshot in tests.
pub trait MetricsSource: Send + Sync + 'static {
    /// The state to show now.
    fn snapshot(&self) -> Snapshot;
}

/// The agent's metrics: the reconciliation histogram, and the rendering of snapshots.
pub struct AgentMetrics {
    durable: PrometheusRecorder,
    reconcile: Histogram,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    /// Metrics with an empty reconciliation histogram.
    pub fn new() -> Self {
        let durable = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(RECONCILE_DURATION.to_string()),
                &RECONCILE_BUCKETS,
            )
            .expect("the buckets are not empty")
            .build_recorder();
        durable.describe_histogram(
            RECONCILE_DURATION.into(),
            Some(Unit::Seconds),
            "Time the mesh reconciler took to apply a network map or workload change to the \
             data plane"
                .into(),
        );
        let metadata = Metadata::new(module_path!(), metrics::Level::INFO, None);
        let reconcile =
            durable.register_histogram(&Key::from_static_name(RECONCILE_DURATION), &metadata);
        AgentMetrics { durable, reconcile }
    }

    /// Records one reconciliation pass.
    pub fn observe_reconcile(&self, took: Duration) {
        self.reconcile.record(took.as_secs_f64());
    }

    /// The Prometheus text exposition of `snapshot` and of the reconciliation histogram.
    pub fn render(&self, snapshot: &Snapshot) -> String {
        let scrape = PrometheusBuilder::new().build_recorder();
        metrics::with_local_recorder(&scrape, || record(snapshot));
        let mut out = scrape.handle().render();
        out.push_str(&self.durable.handle().render());
        out
    }
}

/// The `peer` label of each sample: its node name, or its key in base64 when the map gives
/// none or two peers would share the name (a node's old and new key while it rotates).
fn peer_labels(peers: &[PeerSample]) -> Vec<String> {
    let mut uses: HashMap<&str, usize> = HashMap::new();
    for p in peers {
        if let Some(name) = &p.name {
            *uses.entry(name.as_str()).or_default() += 1;
        }
    }
    peers
        .iter()
        .map(|p| match &p.name {
            Some(name) if uses.get(name.as_str()) == Some(&1) => name.clone(),
            _ => p.status.public_key.to_base64(),
        })
        .collect()
}

/// Writes the snapshot to the current (scrape's) recorder.
fn record(s: &Snapshot) {
    describe_counter!(
        "meshlink_agent_peer_rx_bytes_total",
        Unit::Bytes,
        "Bytes received from the peer, on the wire"
    );
    describe_counter!(
        "meshlink_agent_peer_tx_bytes_total",
        Unit::Bytes,
        "Bytes sent to the peer, on the wire"
    );
    describe_counter!(
        "meshlink_agent_peer_rx_packets_total",
        "Authenticated WireGuard datagrams received from the peer"
    );
    describe_counter!(
        "meshlink_agent_peer_tx_packets_total",
        "WireGuard datagrams sent to the peer"
    );
    describe_counter!(
        "meshlink_agent_peer_handshakes_total",
        "Handshakes completed with the peer, as initiator or responder"
    );
    describe_gauge!(
        "meshlink_agent_peer_last_handshake_age_seconds",
        Unit::Seconds,
        "Seconds since the last completed handshake with the peer (absent: never)"
    );
    describe_counter!(
        "meshlink_agent_peer_drops_total",
        "Packets dropped for the peer, by reason"
    );
    describe_gauge!(
        "meshlink_agent_peer_path",
        "How the peer is reached: 1 for the current path kind, 0 for the others"
    );
    describe_gauge!("meshlink_agent_peers", "Peers in the data plane");
    describe_counter!(
        "meshlink_agent_device_drops_total",
        "Packets the device dropped that no peer is charged with, by reason"
    );
    describe_counter!(
        "meshlink_agent_forwarded_total",
        "Packets for a released workload address sent on to its new holder"
    );
    describe_counter!(
        "meshlink_agent_gatewayed_total",
        "Packets from or to an external node this node is the gateway of, sent on"
    );
    describe_gauge!(
        "meshlink_agent_realtime",
        "1 while the agent's threads hold real-time priority, else 0"
    );
    describe_counter!(
        "meshlink_agent_realtime_releases_total",
        "Times the agent gave up real-time priority for a while because it was overloaded"
    );

    let labels = peer_labels(&s.peers);
    gauge!("meshlink_agent_peers").set(s.peers.len() as f64);
    for (p, peer) in s.peers.iter().zip(labels) {
        let st = &p.status;
        let label = [("peer", peer.clone())];
        counter!("meshlink_agent_peer_rx_bytes_total", &label).absolute(st.rx_bytes);
        counter!("meshlink_agent_peer_tx_bytes_total", &label).absolute(st.tx_bytes);
        counter!("meshlink_agent_peer_rx_packets_total", &label).absolute(st.rx_packets);
        counter!("meshlink_agent_peer_tx_packets_total", &label).absolute(st.tx_packets);
        counter!("meshlink_agent_peer_handshakes_total", &label).absolute(st.handshakes);
        if let Some(age) = st
            .last_handshake
            .and_then(|at| s.now.duration_since(at).ok())
        {
            gauge!("meshlink_agent_peer_last_handshake_age_seconds", &label).set(age.as_secs_f64());
        }
        for (reason, n) in drop_reasons(&st.drops) {
            counter!("meshlink_agent_peer_drops_total", "peer" => peer.clone(), "reason" => reason)
                .absolute(n);
        }
        for kind in PATH_KINDS {
            gauge!("meshlink_agent_peer_path", "peer" => peer.clone(), "path" => path_label(kind))
                .set(if kind == p.path { 1.0 } else { 0.0 });
        }
    }
    let d = &s.device;
    for (reason, n) in [
        ("no_route", d.no_route),
        ("no_endpoint", d.no_endpoint),
        ("unknown_peer", d.unknown_peer),
        ("malformed", d.malformed),
        ("foreign_source", d.foreign_source),
        ("udp_send_error", d.udp_send_errors),
    ] {
        counter!("meshlink_agent_device_drops_total", "reason" => reason).absolute(n);
    }
    counter!("meshlink_agent_forwarded_total").absolute(s.forwarded);
    counter!("meshlink_agent_gatewayed_total").absolute(s.gatewayed);
    gauge!("meshlink_agent_realtime").set(if s.realtime { 1.0 } else { 0.0 });
    counter!("meshlink_agent_realtime_releases_total").absolute(s.realtime_releases);
    if let Some(c) = &s.control {
        describe_gauge!(
            "meshlink_agent_control_connected",
            "1 while a control session with a coordinator is up, else 0"
        );
        describe_gauge!(
            "meshlink_agent_map_version",
            "Version of the network map the control session holds"
        );
        gauge!("meshlink_agent_control_connected").set(if c.connected { 1.0 } else { 0.0 });
        gauge!("meshlink_agent_map_version").set(c.map_version as f64);
    }
}

/// A peer's drop counters by reason, as the label values.
fn drop_reasons(d: &DropCounts) -> [(&'static str, u64); 8] {
    [
        ("spoofed_source", d.spoofed_source),
        ("no_route", d.no_route),
        ("decrypt_failed", d.decrypt_failed),
        ("replay", d.replay),
        ("short_packet", d.short_packet),
        ("not_local", d.not_local),
        ("policy_denied", d.policy_denied),
        ("other", d.other),
    ]
}

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The address or socket path could not be bound.
    #[error("metrics_listen {at}: cannot listen: {source}")]
    Bind {
        /// Where.
        at: MetricsListen,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// Another process answers on the socket path.
    #[error("metrics_listen {0}: another process listens on this socket")]
    InUse(PathBuf),
}

/// The bound endpoint, ready to serve.
pub enum MetricsListener {
    /// A loopback TCP address.
    Tcp(tokio::net::TcpListener),
    /// A Unix socket, whose file is removed when this (or the server) is dropped.
    Unix(tokio::net::UnixListener, SocketFile),
}

/// A Unix socket's file, removed on drop.
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl MetricsListener {
    /// Binds `at`. A Unix socket path left by an earlier run that nobody answers on is
    /// replaced; the new socket is made mode 0660 (the owner's group may scrape it).
    ///
    /// # Errors
    /// [`MetricsError`] naming where.
    pub async fn bind(at: &MetricsListen) -> Result<MetricsListener, MetricsError> {
        let bind_error = |source| MetricsError::Bind {
            at: at.clone(),
            source,
        };
        match at {
            MetricsListen::Tcp(addr) => tokio::net::TcpListener::bind(addr)
                .await
                .map(MetricsListener::Tcp)
                .map_err(bind_error),
            MetricsListen::Unix(path) => {
                remove_stale_socket(path).await?;
                let listener = tokio::net::UnixListener::bind(path).map_err(bind_error)?;
                let file = SocketFile(path.clone());
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
                    .map_err(bind_error)?;
                Ok(MetricsListener::Unix(listener, file))
            }
        }
    }

    /// Where it listens, for the log.
    pub fn local(&self) -> String {
        match self {
            MetricsListener::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "?".to_string(), |a| format!("http://{a}/metrics")),
            MetricsListener::Unix(_, f) => format!("unix:{}", f.0.display()),
        }
    }
}

/// Removes a socket file nobody answers on; refuses one somebody does.
async fn remove_stale_socket(path: &Path) -> Result<(), MetricsError> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        // Binding fails with "address in use", naming the path: not ours to remove.
        return Ok(());
    }
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        return Err(MetricsError::InUse(path.to_path_buf()));
    }
    let _ = std::fs::remove_file(path);
    Ok(())
}

/// Serves `GET /metrics` on `listener` until the task is dropped: each scrape renders
/// `source`'s snapshot.
pub async fn serve(
    listener: MetricsListener,
    metrics: Arc<AgentMetrics>,
    source: Arc<dyn MetricsSource>,
) -> std::io::Result<()> {
    use axum::http::header::CONTENT_TYPE;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let (metrics, source) = (metrics.clone(), source.clone());
            async move {
                use axum::response::IntoResponse;
                let rendered =
                    tokio::task::spawn_blocking(move || metrics.render(&source.snapshot())).await;
                match rendered {
                    Ok(text) => (
                        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                        text,
                    )
                        .into_response(),
                    // A panic while rendering (a bug): no partial page that looks whole.
                    Err(_) => axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                }
            }
        }),
    );
    match listener {
        MetricsListener::Tcp(l) => axum::serve(l, app).await,
        MetricsListener::Unix(l, _file) => axum::serve(l, app).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshlink_proto::PublicKey;
    use std::time::UNIX_EPOCH;

    fn peer(byte: u8, name: Option<&str>, path: PathKind) -> PeerSample {
        PeerSample {
            name: name.map(str::to_string),
            status: PeerStatus {
                public_key: PublicKey([byte; 32]),
                endpoint: None,
                last_handshake: Some(UNIX_EPOCH + Duration::from_secs(1_000)),
                tx_bytes: 1000 + u64::from(byte),
                rx_bytes: 2000 + u64::from(byte),
                tx_packets: 10,
                rx_packets: 20,
                handshakes: 3,
                drops: DropCounts {
                    decrypt_failed: 4,
                    policy_denied: 5,
                    ..DropCounts::default()
                },
            },
            path,
        }
    }

    fn snapshot() -> Snapshot {
        let mut never = peer(9, None, PathKind::None);
        never.status.last_handshake = None;
        Snapshot {
            now: UNIX_EPOCH + Duration::from_secs(1_042),
            peers: vec![
                peer(1, Some("vm-a1"), PathKind::Direct),
                peer(2, Some("vm-b1"), PathKind::Relay),
                never,
            ],
            device: DeviceDropSample {
                no_route: 7,
                unknown_peer: 2,
                ..DeviceDropSample::default()
            },
            forwarded: 6,
            gatewayed: 7,
            control: Some(ControlSample {
                connected: true,
                map_version: 42,
            }),
            realtime: true,
            realtime_releases: 3,
        }
    }

    /// The sample lines of `text` (no comments), for exact comparisons.
    fn lines(text: &str) -> Vec<&str> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .collect()
    }

    #[test]
    fn a_snapshot_renders_per_peer_series_labelled_by_node_name() {
        let m = AgentMetrics::new();
        let text = m.render(&snapshot());
        let samples = lines(&text);
        for expected in [
            r#"meshlink_agent_peer_rx_bytes_total{peer="vm-a1"} 2001"#,
            r#"meshlink_agent_peer_tx_bytes_total{peer="vm-b1"} 1002"#,
            r#"meshlink_agent_peer_rx_packets_total{peer="vm-a1"} 20"#,
            r#"meshlink_agent_peer_tx_packets_total{peer="vm-a1"} 10"#,
            r#"meshlink_agent_peer_handshakes_total{peer="vm-b1"} 3"#,
            r#"meshlink_agent_peer_last_handshake_age_seconds{peer="vm-a1"} 42"#,
            r#"meshlink_agent_peer_drops_total{peer="vm-a1",reason="decrypt_failed"} 4"#,
            r#"meshlink_agent_peer_drops_total{peer="vm-a1",reason="policy_denied"} 5"#,
            r#"meshlink_agent_peer_drops_total{peer="vm-a1",reason="replay"} 0"#,
            r#"meshlink_agent_peer_path{peer="vm-a1",path="direct"} 1"#,
            r#"meshlink_agent_peer_path{peer="vm-a1",path="relay"} 0"#,
            r#"meshlink_agent_peer_path{peer="vm-b1",path="relay"} 1"#,
            r#"meshlink_agent_peer_path{peer="vm-b1",path="direct"} 0"#,
            r#"meshlink_agent_peers 3"#,
            r#"meshlink_agent_device_drops_total{reason="no_route"} 7"#,
            r#"meshlink_agent_device_drops_total{reason="unknown_peer"} 2"#,
            r#"meshlink_agent_forwarded_total 6"#,
            r#"meshlink_agent_gatewayed_total 7"#,
            r#"meshlink_agent_control_connected 1"#,
            r#"meshlink_agent_map_version 42"#,
            r#"meshlink_agent_realtime 1"#,
            r#"meshlink_agent_realtime_releases_total 3"#,
        ] {
            assert!(
                samples.contains(&expected),
                "{expected} missing from:\n{text}"
            );
        }
        // A peer the map does not name is labelled by its key; one never handshaken has no age.
        let key = PublicKey([9; 32]).to_base64();
        let unnamed = format!(r#"meshlink_agent_peer_path{{peer="{key}",path="none"}} 1"#);
        assert!(samples.contains(&unnamed.as_str()), "{text}");
        assert!(
            !text.contains(&format!(
                r#"meshlink_agent_peer_last_handshake_age_seconds{{peer="{key}"}}"#
            )),
            "{text}"
        );
        assert!(text.contains("# TYPE meshlink_agent_peer_rx_bytes_total counter"));
        assert!(text.contains("# TYPE meshlink_agent_peer_path gauge"));
        // Every metric is the agent's.
        for l in samples {
            assert!(l.starts_with("meshlink_agent_"), "{l}");
        }
    }

    #[test]
    fn a_peer_gone_from_the_table_leaves_the_output_and_counters_are_exact() {
        let m = AgentMetrics::new();
        let mut s = snapshot();
        let first = m.render(&s);
        assert!(first.contains(r#"peer="vm-b1""#));
        s.peers.retain(|p| p.name.as_deref() != Some("vm-b1"));
        // A counter the data plane restarted (the peer removed and added again) reads as it is.
        s.peers[0].status.rx_bytes = 5;
        s.control = None;
        let second = m.render(&s);
        assert!(!second.contains(r#"peer="vm-b1""#), "{second}");
        assert!(
            lines(&second).contains(&r#"meshlink_agent_peer_rx_bytes_total{peer="vm-a1"} 5"#),
            "{second}"
        );
        // Static peers: no control session, no map version.
        assert!(!second.contains("meshlink_agent_map_version"), "{second}");
        assert!(
            lines(&second).contains(&"meshlink_agent_peers 2"),
            "{second}"
        );
    }

    #[test]
    fn two_peers_with_one_name_are_told_apart_by_key() {
        let s = [
            peer(1, Some("vm-a1"), PathKind::Direct),
            peer(2, Some("vm-a1"), PathKind::Direct),
            peer(3, Some("vm-c1"), PathKind::Direct),
        ];
        assert_eq!(
            peer_labels(&s),
            vec![
                PublicKey([1; 32]).to_base64(),
                PublicKey([2; 32]).to_base64(),
                "vm-c1".to_string()
            ]
        );
    }

    #[test]
    fn reconciliations_are_a_histogram_that_accumulates() {
        let m = AgentMetrics::new();
        m.observe_reconcile(Duration::from_micros(300));
        m.observe_reconcile(Duration::from_millis(3));
        let s = snapshot();
        m.render(&s);
        m.observe_reconcile(Duration::from_secs(1));
        let text = m.render(&s);
        let samples = lines(&text);
        assert!(
            text.contains("# TYPE meshlink_agent_reconcile_duration_seconds histogram"),
            "{text}"
        );
        for expected in [
            r#"meshlink_agent_reconcile_duration_seconds_bucket{le="0.0005"} 1"#,
            r#"meshlink_agent_reconcile_duration_seconds_bucket{le="0.005"} 2"#,
            r#"meshlink_agent_reconcile_duration_seconds_bucket{le="+Inf"} 3"#,
            "meshlink_agent_reconcile_duration_seconds_count 3",
        ] {
            assert!(
                samples.contains(&expected),
                "{expected} missing from:\n{text}"
            );
        }
    }

    struct Fixed(Snapshot);

    impl MetricsSource for Fixed {
        fn snapshot(&self) -> Snapshot {
            self.0.clone()
        }
    }

    /// A plain HTTP/1.0 GET over `stream`, returning the whole answer.
    async fn get<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
        mut stream: S,
        path: &str,
    ) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let request = format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn served_over_loopback_and_a_unix_socket() {
        let metrics = Arc::new(AgentMetrics::new());
        let source: Arc<dyn MetricsSource> = Arc::new(Fixed(snapshot()));
        let tcp = MetricsListener::bind(&MetricsListen::Tcp("127.0.0.1:0".parse().unwrap()))
            .await
            .unwrap();
        let MetricsListener::Tcp(l) = &tcp else {
            unreachable!()
        };
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(serve(tcp, metrics.clone(), source.clone()));
        let answer = get(
            tokio::net::TcpStream::connect(addr).await.unwrap(),
            "/metrics",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"));
        assert!(answer.contains("text/plain; version=0.0.4"), "{answer}");
        assert!(answer.contains("meshlink_agent_map_version 42"), "{answer}");
        let other = get(tokio::net::TcpStream::connect(addr).await.unwrap(), "/").await;
        assert!(other.contains(" 404 "), "{other}");
        server.abort();

        let dir = crate::keyfile::test_support::TempDir::new("metrics");
        let path = dir.path("metrics.sock");
        // A socket file left by a crashed run is replaced.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let unix = MetricsListener::bind(&MetricsListen::Unix(path.clone()))
            .await
            .unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        // While one answers there, a second agent is refused.
        let again = MetricsListener::bind(&MetricsListen::Unix(path.clone())).await;
        assert!(matches!(again, Err(MetricsError::InUse(_))));
        let server = tokio::spawn(serve(unix, metrics, source));
        let answer = get(
            tokio::net::UnixStream::connect(&path).await.unwrap(),
            "/metrics",
        )
        .await;
        assert!(answer.contains(r#"meshlink_agent_peer_rx_bytes_total{peer="vm-a1"} 2001"#));
        server.abort();
        let _ = server.await;
        assert!(!path.exists(), "the socket file is removed with the server");
    }
}
