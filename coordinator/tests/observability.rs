//! What the coordinator tells of itself: `GET /metrics` scraped from a real coordinator on
//! loopback while real QUIC sessions, admin requests, moves and a failover happen, and the
//! binary's JSON logs (`MESHLINK_LOG_FORMAT=json`).
//!
//! A test binary of its own: metrics are process-wide, and the tests of `it` running beside
//! these would move the counts.

#[allow(dead_code, unused_macros)]
#[path = "it/common.rs"]
mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{join_hello, loopback_settings, Agent, TempDir, WAIT};
use meshlink_coordinator::handlers::tokens::CreateToken;
use meshlink_coordinator::Coordinator;
use meshlink_proto::control::ServerMessage;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One series: its name and labels.
type Series = (String, BTreeMap<String, String>);

/// A scrape, parsed: every sample by series.
#[derive(Debug, Clone)]
struct Scrape {
    samples: BTreeMap<Series, f64>,
    text: String,
}

impl Scrape {
    /// Parses Prometheus's text format (what the exporter writes: no timestamps).
    fn parse(text: &str) -> Scrape {
        let mut samples = BTreeMap::new();
        for line in text.lines() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("a sample line");
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("a value: {line}"));
            let (name, labels) = match series.split_once('{') {
                None => (series.to_string(), BTreeMap::new()),
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').expect("labels end with }");
                    (name.to_string(), parse_labels(body))
                }
            };
            samples.insert((name, labels), value);
        }
        Scrape {
            samples,
            text: text.to_string(),
        }
    }

    /// The value of the series `name` with exactly `labels`; 0 when absent (a counter not
    /// counted yet).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .get(&(name.to_string(), labels))
            .copied()
            .unwrap_or(0.0)
    }

    /// Whether the series exists at all.
    fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples.contains_key(&(name.to_string(), labels))
    }
}

/// `a="x",b="y\"z"` as a map.
fn parse_labels(body: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = body;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").expect("key=\"value\"");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next().expect("a closing quote") {
                (_, '\\') => match chars.next().expect("an escaped character").1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        out.insert(key.to_string(), value);
        rest = after[end + 1..].trim_start_matches(',');
    }
    out
}

#[test]
fn the_scrape_parser_reads_labels_and_escapes() {
    let s = Scrape::parse(
        "# HELP x y\n# TYPE x counter\nx 3\ny{a=\"1\",b=\"q\\\"uote\"} 2.5\nz_bucket{le=\"+Inf\"} 4\n",
    );
    assert_eq!(s.get("x", &[]), 3.0);
    assert_eq!(s.get("y", &[("a", "1"), ("b", "q\"uote")]), 2.5);
    assert_eq!(s.get("z_bucket", &[("le", "+Inf")]), 4.0);
    assert!(!s.has("y", &[("a", "1")]), "labels match exactly");
}

/// A plain HTTP/1.1 request; the status and the body as text.
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut raw))
        .await
        .expect("an answer in time")
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let status: u16 = text.split(' ').nth(1).unwrap().parse().unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "plain bodies only"
    );
    (status, head.to_string(), body.to_string())
}

struct Admin {
    addr: SocketAddr,
    token: String,
}

impl Admin {
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let (status, _, text) =
            request(self.addr, method, path, Some(&self.token), body.as_ref()).await;
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap()
        };
        (status, value)
    }

    async fn scrape(&self) -> Scrape {
        let (status, head, text) =
            request(self.addr, "GET", "/metrics", Some(&self.token), None).await;
        assert_eq!(status, 200, "{text}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
        Scrape::parse(&text)
    }

    /// Scrapes until `ok` holds of a scrape (what a session counts follows its write, which
    /// the agent may see first); panics with the last scrape after [`WAIT`].
    async fn scrape_until(&self, what: &str, ok: impl Fn(&Scrape) -> bool) -> Scrape {
        let deadline = Instant::now() + WAIT;
        loop {
            let s = self.scrape().await;
            if ok(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{what}; last scrape:\n{}",
                s.text
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

const REQUESTS: &str = "meshlink_coordinator_admin_requests_total";
const SESSIONS: &str = "meshlink_coordinator_sessions";
const DELTAS: &str = "meshlink_coordinator_deltas_pushed_total";
const FULL_MAPS: &str = "meshlink_coordinator_full_maps_pushed_total";
const BYTES: &str = "meshlink_coordinator_pushed_bytes_total";
const PROPAGATION_COUNT: &str = "meshlink_coordinator_propagation_seconds_count";
const MOVES: &str = "meshlink_coordinator_moves_total";
const MOVE_COUNT: &str = "meshlink_coordinator_move_duration_seconds_count";
const FAILOVERS: &str = "meshlink_coordinator_failovers_total";
const FAILOVER_COUNT: &str = "meshlink_coordinator_failover_duration_seconds_count";
const FAILOVER_SUM: &str = "meshlink_coordinator_failover_duration_seconds_sum";
const STORE_COUNT: &str = "meshlink_coordinator_store_operation_duration_seconds_count";

fn admin_req(
    route: &'static str,
    method: &'static str,
    status: &'static str,
) -> [(&'static str, &'static str); 3] {
    [("route", route), ("method", method), ("status", status)]
}

/// An agent's session over TLS over TCP, open until dropped: connects to `addr` pinning
/// `fingerprint`, says `hello` and reads up to the welcome.
async fn tcp_session(
    addr: SocketAddr,
    fingerprint: &str,
    hello: meshlink_proto::control::Hello,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use meshlink_proto::control::{encode, ClientMessage, Decoder, MAX_SERVER_MESSAGE};
    let config = meshlink_coordinator::pin::rustls_client_config(fingerprint).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(meshlink_coordinator::identity::SERVER_NAME)
        .unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    tls.write_all(&encode(&ClientMessage::Hello(hello)))
        .await
        .unwrap();
    tls.flush().await.unwrap();
    let mut decoder = Decoder::new(MAX_SERVER_MESSAGE);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Some(m) = decoder.decode::<ServerMessage>().unwrap() {
            assert!(matches!(m, ServerMessage::Welcome(_)), "{m:?}");
            return tls;
        }
        let n = tokio::time::timeout(WAIT, tls.read(&mut buf))
            .await
            .expect("a welcome in time")
            .unwrap();
        assert!(n > 0, "the session ended before its welcome");
        decoder.push(&buf[..n]).unwrap();
    }
}

/// Reads messages until one matches `want` (others, such as deltas or a `Prepare`, pass).
async fn until_message(agent: &mut Agent, want: impl Fn(&ServerMessage) -> bool) {
    loop {
        let m = agent.recv().await.expect("the session goes on");
        if want(&m) {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_shows_what_the_coordinator_did() {
    let dir = TempDir::new("metrics");
    let c = Coordinator::start(&loopback_settings(dir.path()))
        .await
        .unwrap();
    let admin = Admin {
        addr: c.admin_addr(),
        token: c.admin_token().value.clone(),
    };
    let before = admin.scrape().await;
    assert_eq!(
        before.get(
            "meshlink_coordinator_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );

    // Who may scrape: the token is needed; a network's own token may not (the metrics span
    // every network); a read token for every network may.
    let (status, _, _) = request(admin.addr, "GET", "/metrics", None, None).await;
    assert_eq!(status, 401);
    let (status, net) = admin
        .call(
            "POST",
            "/v1/networks",
            Some(json!({"name": "prod", "cidr": "100.64.0.0/24"})),
        )
        .await;
    assert_eq!(status, 201, "{net}");
    let (status, scoped) = admin
        .call(
            "POST",
            "/v1/admin-tokens",
            Some(json!({"name": "prod-reader", "role": "read", "network": "prod"})),
        )
        .await;
    assert_eq!(status, 201, "{scoped}");
    let scoped = scoped["token"].as_str().unwrap();
    let (status, _, body) = request(admin.addr, "GET", "/metrics", Some(scoped), None).await;
    assert_eq!(status, 403, "{body}");
    let (_, reader) = admin
        .call(
            "POST",
            "/v1/admin-tokens",
            Some(json!({"name": "prometheus", "role": "read"})),
        )
        .await;
    let reader = Admin {
        addr: admin.addr,
        token: reader["token"].as_str().unwrap().to_string(),
    };
    reader.scrape().await;

    // Admin requests, by route template and status.
    admin
        .call("GET", "/v1/nodes/ghost-node?network=prod", None)
        .await;
    admin.call("GET", "/no/such/route/ghost-path", None).await;
    let after = admin.scrape().await;
    let grew = |labels: &[(&str, &str)]| after.get(REQUESTS, labels) - before.get(REQUESTS, labels);
    assert_eq!(grew(&admin_req("/v1/networks", "POST", "201")), 1.0);
    assert_eq!(grew(&admin_req("/v1/admin-tokens", "POST", "201")), 2.0);
    assert_eq!(grew(&admin_req("/metrics", "GET", "401")), 1.0);
    assert_eq!(grew(&admin_req("/metrics", "GET", "403")), 1.0);
    // The scrape before this one, by the admin and by the reader (this one counts once
    // answered).
    assert_eq!(grew(&admin_req("/metrics", "GET", "200")), 2.0);
    assert_eq!(grew(&admin_req("/v1/nodes/{reference}", "GET", "404")), 1.0);
    assert_eq!(grew(&admin_req("unmatched", "GET", "404")), 1.0);
    assert!(
        !after.text.contains("ghost"),
        "no label holds a path as asked for:\n{}",
        after.text
    );
    assert!(
        after.has(
            "meshlink_coordinator_admin_request_duration_seconds_count",
            &[("route", "/v1/networks"), ("method", "POST")]
        ),
        "{}",
        after.text
    );
    // The store is timed per operation.
    assert_eq!(
        after.get(STORE_COUNT, &[("op", "create_network")])
            - before.get(STORE_COUNT, &[("op", "create_network")]),
        1.0
    );
    assert_eq!(
        after.get(
            "meshlink_coordinator_store_operation_duration_seconds_bucket",
            &[("op", "create_network"), ("le", "+Inf")]
        ) - before.get(
            "meshlink_coordinator_store_operation_duration_seconds_bucket",
            &[("op", "create_network"), ("le", "+Inf")]
        ),
        1.0,
        "a real histogram, with buckets"
    );
    assert_eq!(
        after.get("meshlink_coordinator_nodes", &[("network", "prod")]),
        0.0
    );
    assert!(after.has("meshlink_coordinator_nodes_online", &[("network", "prod")]));

    // Two agents over QUIC: sessions, full maps, and the delta of the second's join pushed
    // to the first.
    let (_, secret) = c
        .service()
        .create_token(CreateToken {
            network: "prod".into(),
            tags: vec![],
            expires_in_secs: None,
            uses: None,
        })
        .await
        .unwrap();
    let quic = [("transport", "quic")];
    let mut a = Agent::connect(c.quic_addr(), c.fingerprint())
        .await
        .unwrap();
    assert!(matches!(
        a.hello(join_hello(&secret, 1, Some("vm-a"))).await,
        ServerMessage::Welcome(_)
    ));
    until_message(&mut a, |m| matches!(m, ServerMessage::FullMap(_))).await;
    let one = admin
        .scrape_until("one session, its full map written", |s| {
            s.get(SESSIONS, &quic) - after.get(SESSIONS, &quic) == 1.0
                && s.get(FULL_MAPS, &[]) - after.get(FULL_MAPS, &[]) == 1.0
        })
        .await;
    let mut b = Agent::connect(c.quic_addr(), c.fingerprint())
        .await
        .unwrap();
    assert!(matches!(
        b.hello(join_hello(&secret, 2, Some("vm-b"))).await,
        ServerMessage::Welcome(_)
    ));
    until_message(&mut b, |m| matches!(m, ServerMessage::FullMap(_))).await;
    until_message(&mut a, |m| matches!(m, ServerMessage::Delta(_))).await;
    let two = admin
        .scrape_until("two sessions, the join's delta written to the first", |s| {
            s.get(SESSIONS, &quic) - after.get(SESSIONS, &quic) == 2.0
                && s.get(DELTAS, &[]) > one.get(DELTAS, &[])
        })
        .await;
    assert_eq!(
        two.get("meshlink_coordinator_nodes", &[("network", "prod")]),
        2.0
    );
    assert_eq!(
        two.get("meshlink_coordinator_nodes_online", &[("network", "prod")]),
        2.0
    );
    assert!(two.get("meshlink_coordinator_map_version", &[("network", "prod")]) >= 2.0);
    assert_eq!(two.get(FULL_MAPS, &[]) - after.get(FULL_MAPS, &[]), 2.0);
    let pushed = two.get(BYTES, &[("kind", "delta")]) - one.get(BYTES, &[("kind", "delta")]);
    assert!(pushed > 0.0, "the delta's bytes are counted");
    let samples = two.get(PROPAGATION_COUNT, &[]) - one.get(PROPAGATION_COUNT, &[]);
    assert_eq!(
        samples,
        two.get(DELTAS, &[]) - one.get(DELTAS, &[]),
        "one propagation sample per delta written"
    );
    assert!(two.get("meshlink_coordinator_map_changes_total", &[]) >= 2.0);
    assert!(two.get(BYTES, &[("kind", "full_map")]) > 0.0);
    assert!(two.get(BYTES, &[("kind", "other")]) > 0.0, "the welcomes");

    // A third over TLS/TCP counts under its own transport.
    let tcp = [("transport", "tcp")];
    let over_tcp = tcp_session(
        c.tcp_addr().expect("TLS/TCP is on"),
        c.fingerprint(),
        join_hello(&secret, 3, Some("vm-c")),
    )
    .await;
    admin
        .scrape_until("a session over TLS/TCP", |s| {
            s.get(SESSIONS, &tcp) - two.get(SESSIONS, &tcp) == 1.0
                && s.get("meshlink_coordinator_nodes_online", &[("network", "prod")]) == 3.0
        })
        .await;
    drop(over_tcp);
    admin
        .scrape_until("the TLS/TCP session closed", |s| {
            s.get(SESSIONS, &tcp) == two.get(SESSIONS, &tcp)
        })
        .await;

    // An operator's attach (the first holder: confirmed at once) and a move (confirmed once
    // the old holder acknowledges or its lease has surely run out).
    let (status, w) = admin
        .call(
            "POST",
            "/v1/workloads",
            Some(json!({"name": "chat", "network": "prod"})),
        )
        .await;
    assert_eq!(status, 201, "{w}");
    let operator = [("cause", "operator")];
    let (status, moved) = admin
        .call(
            "POST",
            "/v1/workloads/chat/attach",
            Some(json!({"node": "vm-a"})),
        )
        .await;
    assert_eq!(status, 200, "{moved}");
    let attached = admin
        .scrape_until("the attach confirmed", |s| {
            s.get(MOVE_COUNT, &operator) - two.get(MOVE_COUNT, &operator) == 1.0
        })
        .await;
    assert_eq!(
        attached.get(MOVES, &operator) - two.get(MOVES, &operator),
        1.0
    );
    assert_eq!(
        grew_by(
            &two,
            &attached,
            REQUESTS,
            &admin_req("/v1/workloads/{name}/attach", "POST", "200")
        ),
        1.0
    );
    let (status, moved) = admin
        .call(
            "POST",
            "/v1/workloads/chat/move",
            Some(json!({"node": "vm-b"})),
        )
        .await;
    assert_eq!(status, 200, "{moved}");
    let moved = admin
        .scrape_until("the move confirmed", |s| {
            s.get(MOVE_COUNT, &operator) - two.get(MOVE_COUNT, &operator) == 2.0
        })
        .await;
    assert_eq!(moved.get(MOVES, &operator) - two.get(MOVES, &operator), 2.0);
    assert_eq!(moved.get(FAILOVERS, &[]), before.get(FAILOVERS, &[]));

    // A failover: vm-a holds `db` and sends no heartbeat; vm-b, its standby, is online. The
    // duration counts from vm-a becoming the holder (its last sign of life), so it is at
    // least the lease.
    let (status, w) = admin
        .call(
            "POST",
            "/v1/workloads",
            Some(json!({"name": "db", "network": "prod", "standby": ["vm-b"]})),
        )
        .await;
    assert_eq!(status, 201, "{w}");
    let (status, held) = admin
        .call(
            "POST",
            "/v1/workloads/db/attach",
            Some(json!({"node": "vm-a"})),
        )
        .await;
    assert_eq!(status, 200, "{held}");
    let failed_over = admin
        .scrape_until("the failover confirmed", |s| {
            s.get(FAILOVER_COUNT, &[]) - moved.get(FAILOVER_COUNT, &[]) == 1.0
        })
        .await;
    assert_eq!(grew_by(&moved, &failed_over, FAILOVERS, &[]), 1.0);
    let lease = c.service().timing().lease.as_secs_f64();
    assert!(
        grew_by(&moved, &failed_over, FAILOVER_SUM, &[]) >= lease,
        "a failover waits out the silent holder's lease ({lease} s)"
    );
    let (_, db) = admin
        .call("GET", "/v1/workloads/db?network=prod", None)
        .await;
    assert_eq!(db["holder"]["name"], "vm-b", "{db}");

    // Sessions count down as they end.
    drop(a);
    drop(b);
    admin
        .scrape_until("both sessions closed", |s| {
            s.get(SESSIONS, &quic) == after.get(SESSIONS, &quic)
                && s.get("meshlink_coordinator_nodes_online", &[("network", "prod")]) == 0.0
        })
        .await;
    c.shutdown().await;
}

fn grew_by(from: &Scrape, to: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    to.get(name, labels) - from.get(name, labels)
}

/// The coordinator binary, killed when dropped.
struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `meshlink-coordinator serve` on loopback with `MESHLINK_LOG_FORMAT` set to
/// `format` (or unset), and returns its standard error's lines up to the one that says it
/// runs.
fn serve_and_read_logs(format: Option<&str>) -> Vec<String> {
    let dir = TempDir::new("logs");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshlink-coordinator"));
    cmd.args(["serve", "--state-dir"])
        .arg(dir.path())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--reflect-listen",
            "off",
        ])
        .env("MESHLINK_LOG", "info")
        .env_remove("MESHLINK_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    match format {
        Some(f) => cmd.env("MESHLINK_LOG_FORMAT", f),
        None => cmd.env_remove("MESHLINK_LOG_FORMAT"),
    };
    let mut served = Served(cmd.spawn().expect("the coordinator binary starts"));
    let stderr = served.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + WAIT;
    let mut lines = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no \"coordinator running\" line; got {lines:#?}"));
        let done = line.contains("coordinator running");
        lines.push(line);
        if done {
            return lines;
        }
    }
}

#[test]
fn json_logs_on_request_text_by_default() {
    let lines = serve_and_read_logs(Some("json"));
    for line in &lines {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(v["timestamp"].is_string(), "{line}");
        assert!(v["level"].is_string(), "{line}");
    }
    let running: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(running["level"], "INFO");
    assert_eq!(running["fields"]["message"], "coordinator running");
    let admin = running["fields"]["admin_addr"]
        .as_str()
        .expect("the event's fields");
    assert!(admin.starts_with("127.0.0.1:"), "{admin}");

    let lines = serve_and_read_logs(None);
    let running = lines.last().unwrap();
    assert!(
        serde_json::from_str::<Value>(running).is_err(),
        "text by default: {running}"
    );
    assert!(running.contains("INFO"), "{running}");
}

#[test]
fn an_unknown_log_format_is_refused_by_name() {
    let dir = TempDir::new("logs-bad");
    let out = Command::new(env!("CARGO_BIN_EXE_meshlink-coordinator"))
        .args(["serve", "--state-dir"])
        .arg(dir.path())
        .env("MESHLINK_LOG_FORMAT", "logfmt")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("MESHLINK_LOG_FORMAT=\"logfmt\" is not a log format"),
        "{err}"
    );
}

/// The metric names `text` uses: each run of name characters that starts with `prefix`.
fn metric_names(text: &str, prefix: &str) -> std::collections::BTreeSet<String> {
    let mut found = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find(prefix) {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        found.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    found
}

#[test]
fn the_sample_dashboard_charts_the_metrics_there_are() {
    use meshlink_coordinator::telemetry::names::ALL;
    let file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../configs/grafana-meshlink.json"
    );
    let text = std::fs::read_to_string(file).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert!(dashboard["panels"]
        .as_array()
        .is_some_and(|p| !p.is_empty()));
    let used = metric_names(&text, "meshlink_coordinator_");
    for name in &used {
        let known = ALL.contains(&name.as_str())
            || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                name.strip_suffix(suffix)
                    .is_some_and(|base| base.ends_with("_seconds") && ALL.contains(&base))
            });
        assert!(
            known,
            "the dashboard charts {name}, which the coordinator does not export"
        );
    }
    for name in ALL {
        assert!(
            used.iter().any(|u| u.starts_with(name)),
            "{name} is on no panel"
        );
    }
}
