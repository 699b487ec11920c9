//! The standalone relay's Prometheus metrics: `GET /metrics` on `--metrics-listen`, off by
//! default.
//!
//! Collector style, as the agent's: the relay already counts what it does (the forwarding
//! core's [`RelayStats`], the admission caps' [`Refused`], the sessions' [`OutcomeCounts`]),
//! so nothing is added to the frame path. Each scrape takes a [`Snapshot`] of those counters
//! and [`render`]s it through a `metrics` recorder made for that scrape. Every name starts with
//! `meshlink_relay_` ([`names`]); README ("Standalone relays") is the operator's list.
//!
//! # Security
//! The endpoint has no token: the figures are totals, with no node, key, network or address
//! in any label (every label value comes from a fixed set), so the operator chooses who may
//! reach it by where it listens (loopback, a private address, a firewall). Since it may face a
//! network, and shares the process's file descriptors with the relay's sessions, it is a small
//! HTTP/1.1 responder of its own rather than a general server: at most [`MAX_SCRAPES`]
//! connections at once (more are closed at once), [`SCRAPE_TIMEOUT`] for the whole exchange,
//! a request head of at most [`MAX_REQUEST_HEAD`] bytes, one request per connection.

use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, gauge, Unit};
use metrics_exporter_prometheus::PrometheusBuilder;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::debug;

use crate::admission::Refused;
use crate::forward::{RelayStats, SessionsByTransport};
use crate::outcome::OutcomeCounts;

/// Every metric's name.
pub mod names {
    /// Gauge, `transport` (`quic`, `tcp`): sessions open (hello accepted, not yet ended or
    /// displaced).
    pub const SESSIONS: &str = "meshlink_relay_sessions";
    /// Gauge: nodes with a session (a node renewing its session has two).
    pub const NODES: &str = "meshlink_relay_nodes";
    /// Gauge: connections open, before or after their hello.
    pub const CONNECTIONS: &str = "meshlink_relay_connections";
    /// Gauge: of them, those whose hello is not accepted yet.
    pub const CONNECTIONS_BEFORE_HELLO: &str = "meshlink_relay_connections_before_hello";
    /// Counter, `cap` (`max_sessions`, `max_unauthenticated`, `max_unauthenticated_per_ip`):
    /// connections refused at once, before any handshake.
    pub const CONNECTIONS_REFUSED: &str = "meshlink_relay_connections_refused_total";
    /// Counter: hellos accepted (sessions opened).
    pub const HELLOS_ACCEPTED: &str = "meshlink_relay_hellos_accepted_total";
    /// Counter, `reason` ([`crate::outcome::HELLO_REFUSALS`]): hellos refused.
    pub const HELLOS_REFUSED: &str = "meshlink_relay_hellos_refused_total";
    /// Counter, `reason` ([`crate::outcome::SESSION_ENDS`]): sessions ended.
    pub const SESSIONS_ENDED: &str = "meshlink_relay_sessions_ended_total";
    /// Counter: frames relayed (a frame cut to fit counts once).
    pub const FRAMES: &str = "meshlink_relay_frames_total";
    /// Counter: their bytes, as received.
    pub const BYTES: &str = "meshlink_relay_bytes_total";
    /// Counter, `reason` ([`super::RelayStats::dropped`]): frames dropped.
    pub const DROPPED: &str = "meshlink_relay_dropped_total";
    /// Gauge, `version`: 1.
    pub const BUILD_INFO: &str = "meshlink_relay_build_info";
}

/// Connections to the endpoint at once; more are closed at once.
pub const MAX_SCRAPES: usize = 8;
/// How long one connection has for its request and the answer.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest request head read (request line and headers).
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// The media type of Prometheus's text format.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The relay's counters at one moment: what a scrape shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The forwarding core's counters.
    pub relay: RelayStats,
    /// Sessions registered, by transport.
    pub sessions: SessionsByTransport,
    /// Nodes with a session.
    pub nodes: usize,
    /// Connections open.
    pub connections: usize,
    /// Of them, before their hello.
    pub before_hello: usize,
    /// Connections refused by the admission caps.
    pub refused: Refused,
    /// Hellos and sessions.
    pub outcomes: OutcomeCounts,
}

/// What a scrape reads: the running relay's counters.
pub type SnapshotFn = Arc<dyn Fn() -> Snapshot + Send + Sync>;

/// The Prometheus text exposition of `snapshot`.
pub fn render(snapshot: &Snapshot) -> String {
    let recorder = PrometheusBuilder::new().build_recorder();
    metrics::with_local_recorder(&recorder, || record(snapshot));
    recorder.handle().render()
}

/// Writes the snapshot to the current (scrape's) recorder.
fn record(s: &Snapshot) {
    describe_gauge!(
        names::SESSIONS,
        "Sessions open (hello accepted), by transport"
    );
    describe_gauge!(names::NODES, "Nodes with a session");
    describe_gauge!(
        names::CONNECTIONS,
        "Connections open, before or after their hello"
    );
    describe_gauge!(
        names::CONNECTIONS_BEFORE_HELLO,
        "Connections open whose hello is not accepted yet"
    );
    describe_counter!(
        names::CONNECTIONS_REFUSED,
        "Connections refused at once by an admission cap, by cap"
    );
    describe_counter!(names::HELLOS_ACCEPTED, "Hellos accepted (sessions opened)");
    describe_counter!(names::HELLOS_REFUSED, "Hellos refused, by reason");
    describe_counter!(names::SESSIONS_ENDED, "Sessions ended, by reason");
    describe_counter!(names::FRAMES, "Frames relayed");
    describe_counter!(names::BYTES, Unit::Bytes, "Bytes of the frames relayed");
    describe_counter!(names::DROPPED, "Frames dropped, by reason");
    describe_gauge!(names::BUILD_INFO, "1, labelled with the relay's version");

    for (transport, n) in [("quic", s.sessions.quic), ("tcp", s.sessions.tcp)] {
        gauge!(names::SESSIONS, "transport" => transport).set(n as f64);
    }
    gauge!(names::NODES).set(s.nodes as f64);
    gauge!(names::CONNECTIONS).set(s.connections as f64);
    gauge!(names::CONNECTIONS_BEFORE_HELLO).set(s.before_hello as f64);
    for (cap, n) in [
        ("max_sessions", s.refused.full),
        ("max_unauthenticated", s.refused.unauthenticated),
        ("max_unauthenticated_per_ip", s.refused.from_source),
    ] {
        counter!(names::CONNECTIONS_REFUSED, "cap" => cap).absolute(n);
    }
    counter!(names::HELLOS_ACCEPTED).absolute(s.outcomes.accepted);
    for (reason, n) in s.outcomes.refused {
        counter!(names::HELLOS_REFUSED, "reason" => reason).absolute(n);
    }
    for (reason, n) in s.outcomes.ended {
        counter!(names::SESSIONS_ENDED, "reason" => reason).absolute(n);
    }
    counter!(names::FRAMES).absolute(s.relay.frames);
    counter!(names::BYTES).absolute(s.relay.bytes);
    for (reason, n) in s.relay.dropped() {
        counter!(names::DROPPED, "reason" => reason).absolute(n);
    }
    gauge!(names::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// Serves `GET /metrics` on `listener` until `shutdown` turns true: each scrape renders
/// `snapshot()`. See the module's "Security" for the limits.
pub async fn serve(listener: TcpListener, snapshot: SnapshotFn, shutdown: watch::Receiver<bool>) {
    serve_limited(listener, snapshot, shutdown, MAX_SCRAPES, SCRAPE_TIMEOUT).await;
}

/// [`serve`] with `max` connections at once, each given `time`.
async fn serve_limited(
    listener: TcpListener,
    snapshot: SnapshotFn,
    mut shutdown: watch::Receiver<bool>,
    max: usize,
    time: Duration,
) {
    let mut exchanges = JoinSet::new();
    loop {
        let stream = tokio::select! {
            a = listener.accept() => match a {
                Ok((stream, _)) => stream,
                Err(e) => {
                    debug!("metrics: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        while exchanges.try_join_next().is_some() {}
        if exchanges.len() >= max {
            // Dropped: closed at once.
            continue;
        }
        let snapshot = snapshot.clone();
        exchanges.spawn(async move {
            let done = tokio::time::timeout(time, exchange(stream, &*snapshot)).await;
            if !matches!(done, Ok(Ok(()))) {
                debug!("metrics: a scrape failed or timed out");
            }
        });
    }
    exchanges.abort_all();
}

/// One connection: reads a request head, writes the answer, closes.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    snapshot: &(dyn Fn() -> Snapshot + Send + Sync),
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let complete = loop {
        if head_end(&head).is_some() {
            break true;
        }
        if head.len() >= MAX_REQUEST_HEAD {
            break false;
        }
        let room = (MAX_REQUEST_HEAD - head.len()).min(buf.len());
        let n = stream.read(&mut buf[..room]).await?;
        if n == 0 {
            // Closed before a whole request: nothing to answer.
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    };
    let reply = if complete {
        answer(&head, snapshot)
    } else {
        response(431, "Request Header Fields Too Large", "", &[], true)
    };
    stream.write_all(&reply).await?;
    stream.flush().await?;
    stream.shutdown().await
}

/// Where the request head ends (after its blank line), if it does.
fn head_end(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| at + 4)
}

/// The whole answer to the request whose head is `head`.
fn answer(head: &[u8], snapshot: &(dyn Fn() -> Snapshot + Send + Sync)) -> Vec<u8> {
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let mut parts = std::str::from_utf8(line).unwrap_or("").split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return response(400, "Bad Request", "", &[], true);
    };
    if !version.starts_with("HTTP/1.") {
        return response(400, "Bad Request", "", &[], true);
    }
    let path = target.split('?').next().unwrap_or_default();
    if path != "/metrics" {
        return response(404, "Not Found", "", &[], method != "HEAD");
    }
    match method {
        "GET" => response(200, "OK", TEXT_FORMAT, render(&snapshot()).as_bytes(), true),
        "HEAD" => response(
            200,
            "OK",
            TEXT_FORMAT,
            render(&snapshot()).as_bytes(),
            false,
        ),
        _ => response(405, "Method Not Allowed", "", &[], true),
    }
}

/// An HTTP/1.1 answer that closes the connection; `with_body: false` for a HEAD request
/// (the length is the body's all the same).
fn response(
    status: u16,
    reason: &str,
    content_type: &str,
    body: &[u8],
    with_body: bool,
) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status} {reason}\r\n");
    if !content_type.is_empty() {
        out.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    if status == 405 {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    let mut out = out.into_bytes();
    if with_body {
        out.extend_from_slice(body);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        let outcomes = crate::outcome::Outcomes::default();
        let o = &outcomes;
        o.accepted();
        o.accepted();
        o.refused(&crate::outcome::HelloRefusal::Ticket(
            crate::ticket::Refused::BadSignature,
        ));
        o.ended(&crate::outcome::SessionEnd::TicketExpired);
        Snapshot {
            relay: RelayStats {
                frames: 12,
                bytes: 3400,
                other_network: 2,
                congested: 1,
                ..RelayStats::default()
            },
            sessions: SessionsByTransport { quic: 3, tcp: 1 },
            nodes: 4,
            connections: 5,
            before_hello: 1,
            refused: Refused {
                full: 0,
                unauthenticated: 6,
                from_source: 7,
            },
            outcomes: outcomes.counts(),
        }
    }

    /// The sample lines of `text` (no comments).
    fn lines(text: &str) -> Vec<&str> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .collect()
    }

    #[test]
    fn a_snapshot_renders_every_counter_with_fixed_labels() {
        let text = render(&snapshot());
        let samples = lines(&text);
        for expected in [
            r#"meshlink_relay_sessions{transport="quic"} 3"#,
            r#"meshlink_relay_sessions{transport="tcp"} 1"#,
            "meshlink_relay_nodes 4",
            "meshlink_relay_connections 5",
            "meshlink_relay_connections_before_hello 1",
            r#"meshlink_relay_connections_refused_total{cap="max_sessions"} 0"#,
            r#"meshlink_relay_connections_refused_total{cap="max_unauthenticated"} 6"#,
            r#"meshlink_relay_connections_refused_total{cap="max_unauthenticated_per_ip"} 7"#,
            "meshlink_relay_hellos_accepted_total 2",
            r#"meshlink_relay_hellos_refused_total{reason="bad_signature"} 1"#,
            r#"meshlink_relay_hellos_refused_total{reason="expired"} 0"#,
            r#"meshlink_relay_hellos_refused_total{reason="max_sessions_per_ip"} 0"#,
            r#"meshlink_relay_sessions_ended_total{reason="ticket_expired"} 1"#,
            r#"meshlink_relay_sessions_ended_total{reason="agent_closed"} 0"#,
            "meshlink_relay_frames_total 12",
            "meshlink_relay_bytes_total 3400",
            r#"meshlink_relay_dropped_total{reason="other_network"} 2"#,
            r#"meshlink_relay_dropped_total{reason="congested"} 1"#,
            r#"meshlink_relay_dropped_total{reason="no_route"} 0"#,
            &format!(
                r#"meshlink_relay_build_info{{version="{}"}} 1"#,
                env!("CARGO_PKG_VERSION")
            ),
        ] {
            assert!(
                samples.contains(&expected),
                "{expected} missing from:\n{text}"
            );
        }
        assert!(text.contains("# TYPE meshlink_relay_frames_total counter"));
        assert!(text.contains("# TYPE meshlink_relay_sessions gauge"));
        // Every metric is the relay's; every reason of each set is there, at 0 if need be.
        for l in &samples {
            assert!(l.starts_with("meshlink_relay_"), "{l}");
        }
        let count = |prefix: &str| samples.iter().filter(|l| l.starts_with(prefix)).count();
        assert_eq!(
            count("meshlink_relay_hellos_refused_total{"),
            crate::outcome::HELLO_REFUSALS.len()
        );
        assert_eq!(
            count("meshlink_relay_sessions_ended_total{"),
            crate::outcome::SESSION_ENDS.len()
        );
        assert_eq!(count("meshlink_relay_dropped_total{"), 8);
    }

    /// `request` sent whole over an in-memory stream: the answer.
    async fn ask(request: &[u8]) -> String {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let snap: SnapshotFn = Arc::new(snapshot);
        let served = tokio::spawn(async move { exchange(server, &*snap).await });
        client.write_all(request).await.unwrap();
        let mut out = String::new();
        client.read_to_string(&mut out).await.unwrap();
        served.await.unwrap().unwrap();
        out
    }

    #[tokio::test]
    async fn answers_get_and_head_of_metrics_only() {
        let ok = ask(b"GET /metrics HTTP/1.1\r\nHost: relay\r\nAccept: */*\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains("Content-Type: text/plain; version=0.0.4"),
            "{ok}"
        );
        assert!(ok.contains("Connection: close\r\n"), "{ok}");
        let (head, body) = ok.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        assert!(body.contains("meshlink_relay_frames_total 12"), "{body}");

        let query = ask(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n").await;
        assert!(query.starts_with("HTTP/1.1 200 OK"), "{query}");
        let head = ask(b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "no body: {head}");

        for (request, status) in [
            (&b"GET / HTTP/1.1\r\n\r\n"[..], "404"),
            (b"GET /metricsx HTTP/1.1\r\n\r\n", "404"),
            (b"POST /metrics HTTP/1.1\r\n\r\n", "405"),
            (b"GET /metrics\r\n\r\n", "400"),
            (b"GET /metrics SPDY/3\r\n\r\n", "400"),
            (b"\xff\xfe /metrics HTTP/1.1\r\n\r\n", "400"),
        ] {
            let got = ask(request).await;
            assert!(
                got.starts_with(&format!("HTTP/1.1 {status} ")),
                "{request:?}: {got}"
            );
            assert!(!got.contains("meshlink_relay_"), "{got}");
        }
    }

    #[tokio::test]
    async fn an_endless_head_is_cut_off() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let snap: SnapshotFn = Arc::new(snapshot);
        let served = tokio::spawn(async move { exchange(server, &*snap).await });
        let mut request = b"GET /metrics HTTP/1.1\r\n".to_vec();
        request.extend(std::iter::repeat_n(b'a', 2 * MAX_REQUEST_HEAD));
        client.write_all(&request).await.unwrap();
        let mut out = String::new();
        client.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 431 "), "{out}");
        served.await.unwrap().unwrap();
    }

    /// Over a real socket: at most `max` connections are served at once (more are closed at
    /// once), a silent one holds its place for its time only, and the server stops when told.
    #[tokio::test]
    async fn connections_are_capped_and_timed() {
        const MAX: usize = 3;
        const TIME: Duration = Duration::from_millis(400);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = watch::channel(false);
        let snap: SnapshotFn = Arc::new(snapshot);
        let server = tokio::spawn(serve_limited(listener, snap, stopped, MAX, TIME));
        let started = std::time::Instant::now();
        let mut silent = Vec::new();
        for _ in 0..MAX {
            silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // Let the server take them all before the next.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut refused = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(1), refused.read(&mut byte))
            .await
            .expect("closed at once");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        // The silent ones are closed at their time (not before); then a scrape is served.
        for s in &mut silent {
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte))
                .await
                .expect("closed at the time");
            assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        }
        assert!(started.elapsed() >= TIME, "{:?}", started.elapsed());
        let mut scrape = tokio::net::TcpStream::connect(addr).await.unwrap();
        scrape
            .write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        scrape.read_to_string(&mut out).await.unwrap();
        assert!(out.contains("meshlink_relay_nodes 4"), "{out}");
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(1), server)
            .await
            .expect("stops when told")
            .unwrap();
    }
}
