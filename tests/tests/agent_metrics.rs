//! The agent's Prometheus endpoint with real binaries: two mesh agents on two simulated
//! providers, one of them serving metrics on a Unix socket (`--metrics-listen PATH`); pings go
//! both ways and the scrapes show the other node by name, its byte and packet counters rising,
//! a completed handshake, its path, the control session up and the map version.
//!
//! The socket is a file, so the test scrapes it from outside the agent's namespace; a plain
//! HTTP/1.0 GET, as `curl --unix-socket` would send.
//!
//! Needs root (skips with one line otherwise; fails under CI=true) and the binaries:
//! `cargo build -p meshlink-agent -p meshlink-coordinator -p meshctl` first.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use meshlink_tests::agent::AgentOptions;
use meshlink_tests::{
    agent_bin, coordinator_bin, meshctl_bin, require_root, wait_until, Coordinator, MeshAgent,
    Provider, Providers, ScratchDir,
};

const NETWORK: &str = "prod";
const NETWORK_CIDR: &str = "100.64.0.0/16";

/// `GET /metrics` on the Unix socket at `path`: the body.
fn scrape(path: &Path) -> String {
    let mut stream = UnixStream::connect(path)
        .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", path.display()));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout set");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .expect("request sent");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("answer read");
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    assert!(head.contains(" 200 "), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.to_owned()
}

/// The value of the sample `series` (name and labels exactly as rendered) in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let value = l.strip_prefix(series)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

#[test]
fn metrics_show_the_peer_by_name_with_rising_counters() {
    if !require_root() {
        return;
    }
    agent_bin();
    coordinator_bin();
    meshctl_bin();
    let dir = ScratchDir::create("metrics");
    let mut providers = Providers::create(2);
    let coord_host = providers.add_host(Provider::A);
    let host_a = providers.add_host(Provider::A);
    let host_b = providers.add_host(Provider::B);
    let coord = Coordinator::start(&coord_host.ns, &dir, coord_host.underlay);
    let ctl = coord.meshctl();
    ctl.network_create(NETWORK, NETWORK_CIDR);
    let token = ctl.token_create(NETWORK, Some(2), Some("1h"));

    let socket = dir.join("vm-a.metrics.sock");
    let options = AgentOptions {
        metrics_listen: Some(socket.clone()),
        ..AgentOptions::default()
    };
    let mut a = MeshAgent::spawn_join_with(&host_a.ns, &dir, &token, "vm-a", &[], &options);
    let mut b = MeshAgent::spawn_join(&host_b.ns, &dir, &token, "vm-b", &[]);
    a.wait_ready(meshlink_tests::mesh::READY_TIMEOUT);
    b.wait_ready(meshlink_tests::mesh::READY_TIMEOUT);
    let (ip_a, ip_b) = (a.address(), b.address());
    host_a
        .ns
        .wait_for_ping(ip_b, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("vm-a -> vm-b: {e}\nlog:\n{}", a.log()));
    host_b
        .ns
        .wait_for_ping(ip_a, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("vm-b -> vm-a: {e}"));

    let served = &a.status()["served"];
    assert_eq!(
        served["metrics"],
        format!("unix:{}", socket.display()),
        "{served}"
    );
    assert!(b.status()["served"]["metrics"].is_null(), "off by default");
    // The runtime's tasks: the control session's, the packet loops', the metrics server's.
    let tasks = &a.status()["runtime"]["tasks"];
    assert!(tasks.as_u64().is_some_and(|n| n >= 3), "{tasks}");

    let peer = r#"{peer="vm-b"}"#;
    let rx = format!("meshlink_agent_peer_rx_bytes_total{peer}");
    let tx = format!("meshlink_agent_peer_tx_bytes_total{peer}");
    let rx_packets = format!("meshlink_agent_peer_rx_packets_total{peer}");
    let first = scrape(&socket);
    let value = |text: &str, series: &str| {
        sample(text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"))
    };
    let (rx1, tx1, rxp1) = (
        value(&first, &rx),
        value(&first, &tx),
        value(&first, &rx_packets),
    );
    assert!(rx1 > 0.0 && tx1 > 0.0 && rxp1 > 0.0, "{first}");
    assert!(
        value(
            &first,
            &format!("meshlink_agent_peer_handshakes_total{peer}")
        ) >= 1.0,
        "{first}"
    );
    assert!(
        value(
            &first,
            &format!("meshlink_agent_peer_last_handshake_age_seconds{peer}")
        ) < 120.0,
        "{first}"
    );
    assert!(
        value(&first, "meshlink_agent_map_version") >= 1.0,
        "{first}"
    );
    assert_eq!(
        value(&first, "meshlink_agent_control_connected"),
        1.0,
        "{first}"
    );
    assert_eq!(value(&first, "meshlink_agent_peers"), 1.0, "{first}");
    // The path gauge: exactly one kind is 1, and the two hosts reach each other directly
    // (or have not confirmed it yet), never through the relay.
    let kinds = ["direct", "unconfirmed", "relay", "none"];
    let on: Vec<&str> = kinds
        .iter()
        .copied()
        .filter(|k| {
            value(
                &first,
                &format!(r#"meshlink_agent_peer_path{{peer="vm-b",path="{k}"}}"#),
            ) == 1.0
        })
        .collect();
    assert!(
        on == ["direct"] || on == ["unconfirmed"],
        "path kinds on: {on:?}\n{first}"
    );

    // Ten pings of 1000 bytes each way: the counters rise by at least that.
    let out = host_a.ns.run(
        "ping",
        &[
            "-c",
            "10",
            "-i",
            "0.05",
            "-s",
            "1000",
            "-W",
            "2",
            &ip_b.to_string(),
        ],
    );
    assert!(out.contains("10 received"), "{out}");
    // Counters are read at scrape time: no waiting for a push.
    let second = scrape(&socket);
    let (rx2, tx2, rxp2) = (
        value(&second, &rx),
        value(&second, &tx),
        value(&second, &rx_packets),
    );
    assert!(tx2 - tx1 >= 10_000.0, "tx {tx1} -> {tx2}");
    assert!(rx2 - rx1 >= 10_000.0, "rx {rx1} -> {rx2}");
    assert!(rxp2 - rxp1 >= 10.0, "rx packets {rxp1} -> {rxp2}");
    // A reconciliation ran (the map arrived) and was timed.
    let reconciles = wait_until(
        Duration::from_secs(5),
        "a reconciliation in the histogram",
        || {
            sample(
                &scrape(&socket),
                "meshlink_agent_reconcile_duration_seconds_count",
            )
            .filter(|n| *n >= 1.0)
        },
    );
    assert!(reconciles.is_ok(), "{second}");
    drop(b);
    a.terminate();
    assert!(
        !socket.exists(),
        "the agent removes its metrics socket at exit"
    );
}
