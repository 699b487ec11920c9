//! NAT traversal help over real sockets on 127.0.0.1: relayed frames between agents' QUIC
//! connections (and the frames that must go nowhere), the reflexive address responder, and
//! both switched off.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshlink_coordinator::config::ReflectListen;
use meshlink_coordinator::relay::RelayStats;
use meshlink_coordinator::server::close_code;
use meshlink_coordinator::{Coordinator, StartError};
use meshlink_proto::control::ServerMessage;
use meshlink_proto::control::{encode, Decoder};
use meshlink_proto::disco::{Reflect, TX_LEN};
use meshlink_proto::relay::{
    frames, parse, Grant, Reassembler, RelayAnswer, RelayHello, RelayInfo, EXPORTER_LABEL,
    EXPORTER_LEN, RELAY_ALPN, RELAY_PROTOCOL, RELAY_SELF, RELAY_SERVER_NAME,
};
use meshlink_proto::PublicKey;
use meshlink_relay::ticket::Verifier;
use serde_json::json;
use tokio::net::UdpSocket;

use crate::common::{http, key, loopback_settings, node_hello, start, Agent, TempDir, WAIT};
use crate::quic::{addr_of, join, token_for, welcome};

/// The largest frame agents send (they cut WireGuard datagrams to fit).
const FRAME: usize = 1100;

/// The next datagram on `a`'s connection, or `None` after `within` (grants of no relays,
/// which every session gets, are skipped: tests of grants use relays).
pub(crate) async fn datagram(a: &Agent, within: Duration) -> Option<Vec<u8>> {
    let until = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(until, a.conn.read_datagram()).await {
            Ok(Ok(d)) if is_grant_of_none(&d) => {}
            Ok(Ok(d)) => return Some(d.to_vec()),
            Ok(Err(e)) => panic!("connection lost: {e}"),
            Err(_) => return None,
        }
    }
}

/// Whether `frame` is a whole grant from the relay itself that lists no relay.
pub(crate) fn is_grant_of_none(frame: &[u8]) -> bool {
    match parse(frame) {
        Ok((h, json)) if h.peer == RELAY_SELF && h.count == 1 => {
            serde_json::from_slice::<Grant>(json).is_ok_and(|g| g.relays.is_empty())
        }
        _ => false,
    }
}

/// Sends `payload` to `to` through the relay as frames of at most [`FRAME`] bytes.
pub(crate) fn send_to(a: &Agent, to: &PublicKey, id: u16, payload: &[u8]) {
    for f in frames(to, id, payload, FRAME).unwrap() {
        a.conn.send_datagram(f.into()).unwrap();
    }
}

/// Waits until the relay's counters satisfy `done`.
pub(crate) async fn relay_stats(c: &Coordinator, done: impl Fn(&RelayStats) -> bool) -> RelayStats {
    let start = Instant::now();
    loop {
        let s = c.relay().expect("the relay is on").stats();
        if done(&s) {
            return s;
        }
        assert!(start.elapsed() < WAIT, "relay counters stuck at {s:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn two_nodes_of_a_network_talk_through_the_relay() {
    let dir = TempDir::new("relay-pair");
    let c = start(dir.path()).await;
    let t = token_for(&c, "prod", "100.64.0.0/24").await;
    let (a, wa, _) = join(&t, 1, Some("a")).await;
    let (b, wb, _) = join(&t, 2, Some("b")).await;
    let reflect_port = c.reflect_addr().expect("on by default").port();
    for w in [&wa, &wb] {
        assert!(w.relay);
        assert_eq!(w.reflect_port, Some(reflect_port));
    }
    assert!(a.conn.max_datagram_size().is_some(), "datagrams offered");

    // One WireGuard datagram of the largest size, cut in two frames, arrives whole, as from a.
    let wg: Vec<u8> = (0..1452u32).map(|i| i as u8).collect();
    send_to(&a, &key(2), 1, &wg);
    let mut r = Reassembler::new();
    let mut got = None;
    while got.is_none() {
        let f = datagram(&b, WAIT).await.expect("a relayed frame");
        let (h, bytes) = parse(&f).unwrap();
        assert_eq!(h.peer, key(1), "the relay names the source");
        got = r.push(h, bytes, Instant::now());
    }
    assert_eq!(got, Some((key(1), wg)));

    // And back.
    send_to(&b, &key(1), 1, b"handshake response");
    let f = datagram(&a, WAIT).await.unwrap();
    let (h, bytes) = parse(&f).unwrap();
    assert_eq!((h.peer, bytes), (key(2), &b"handshake response"[..]));

    let s = relay_stats(&c, |s| s.frames == 3).await;
    assert_eq!(s.bytes, (1452 + 2 * 36 + 18 + 36) as u64);
    assert_eq!(
        s,
        RelayStats {
            frames: 3,
            bytes: s.bytes,
            ..RelayStats::default()
        }
    );
    c.shutdown().await;
}

#[tokio::test]
async fn frames_outside_the_network_or_before_hello_go_nowhere() {
    let dir = TempDir::new("relay-refused");
    let c = start(dir.path()).await;
    let prod = token_for(&c, "prod", "100.64.0.0/24").await;
    let staging = token_for(&c, "staging", "100.65.0.0/24").await;
    let (a, _, _) = join(&prod, 1, Some("a")).await;
    let (b, wb, _) = join(&prod, 2, Some("b")).await;
    let (other, _, _) = join(&staging, 3, Some("other")).await;

    // To a node of another network, to nobody, to itself.
    send_to(&a, &key(3), 1, b"across networks");
    send_to(&a, &key(9), 2, b"to nobody");
    send_to(&a, &key(1), 3, b"to itself");
    // Not a frame.
    a.conn.send_datagram(vec![0u8; 10].into()).unwrap();
    // From a connection that never said hello, to b.
    let lurker = Agent::connect(addr_of(&prod), &prod.fingerprint)
        .await
        .unwrap();
    send_to(&lurker, &key(2), 1, b"let me in");

    let s = relay_stats(&c, |s| {
        s.other_network == 1 && s.no_route == 2 && s.malformed == 1 && s.unauthenticated == 1
    })
    .await;
    assert_eq!(s.frames, 0);
    assert_eq!(datagram(&b, Duration::from_millis(200)).await, None);
    assert_eq!(datagram(&other, Duration::from_millis(10)).await, None);
    assert_eq!(datagram(&a, Duration::from_millis(10)).await, None);

    // The counters are in the status.
    let admin = c.admin_token().value.clone();
    let (_, st) = http(c.admin_addr(), "GET", "/v1/status", Some(&admin), None).await;
    assert_eq!(
        st["relay"],
        json!({"frames": 0, "bytes": 0, "dropped": {
            "unauthenticated": 1, "rate_limited": 0, "malformed": 1, "no_route": 2,
            "other_network": 1, "too_large": 0, "unsupported": 0, "congested": 0,
        }})
    );

    // A newer session of b takes its route, and the older one's end leaves it there.
    let secret = wb.node_secret.expect("a secret at join");
    let mut b2 = Agent::connect(addr_of(&prod), &prod.fingerprint)
        .await
        .unwrap();
    let w = welcome(b2.hello(node_hello(wb.node_id, &secret, 2)).await);
    assert!(w.relay);
    assert_eq!(b.closed_code().await, u64::from(close_code::REPLACED));
    send_to(&a, &key(2), 4, b"to the new session");
    let f = datagram(&b2, WAIT)
        .await
        .expect("relayed to the newer session");
    assert_eq!(parse(&f).unwrap().1, b"to the new session");
    c.shutdown().await;
}

#[tokio::test]
async fn the_reflect_port_answers_with_the_source_address() {
    let dir = TempDir::new("reflect");
    let c = start(dir.path()).await;
    let target = c.reflect_addr().unwrap();
    assert_ne!(target.port(), 0);
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = sock.local_addr().unwrap();

    // Garbage and answers are ignored; a request is answered.
    sock.send_to(b"not a request", target).await.unwrap();
    let stray = Reflect::Response {
        tx: [1; TX_LEN],
        observed: me,
    };
    sock.send_to(&stray.encode(), target).await.unwrap();
    let request = Reflect::Request { tx: [7; TX_LEN] };
    sock.send_to(&request.encode(), target).await.unwrap();
    let mut buf = [0u8; 1500];
    let (n, from) = tokio::time::timeout(WAIT, sock.recv_from(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    assert_eq!(from, target);
    assert_eq!(
        Reflect::decode(&buf[..n]),
        Ok(Reflect::Response {
            tx: [7; TX_LEN],
            observed: me
        })
    );
    // Only one answer came.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), sock.recv_from(&mut buf))
            .await
            .is_err()
    );
    let s = c.reflect_stats();
    assert_eq!((s.answered, s.ignored, s.refused), (1, 2, 0));

    let admin = c.admin_token().value.clone();
    let (_, st) = http(c.admin_addr(), "GET", "/v1/status", Some(&admin), None).await;
    assert_eq!(
        st["reflect"],
        json!({"listen": target.to_string(), "answered": 1, "refused": 0, "ignored": 2})
    );
    c.shutdown().await;
}

#[tokio::test]
async fn relay_and_reflect_can_be_off() {
    let dir = TempDir::new("traversal-off");
    let mut s = loopback_settings(dir.path());
    s.relay = false;
    s.reflect_listen = ReflectListen::Off;
    let c = Coordinator::start(&s).await.unwrap();
    assert!(c.reflect_addr().is_none() && c.relay().is_none());
    let t = token_for(&c, "prod", "100.64.0.0/24").await;
    let (a, w, _) = join(&t, 1, None).await;
    assert_eq!((w.relay, w.reflect_port), (false, None));
    assert_eq!(a.conn.max_datagram_size(), None, "no datagrams offered");
    let admin = c.admin_token().value.clone();
    let (_, st) = http(c.admin_addr(), "GET", "/v1/status", Some(&admin), None).await;
    let fields = st.as_object().unwrap();
    assert!(
        !fields.contains_key("relay") && !fields.contains_key("reflect"),
        "{st}"
    );
    c.shutdown().await;
}

#[tokio::test]
async fn a_taken_reflect_port_is_a_start_error_naming_it() {
    let dir = TempDir::new("reflect-taken");
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr: SocketAddr = taken.local_addr().unwrap();
    let mut s = loopback_settings(dir.path());
    s.reflect_listen = ReflectListen::At(addr);
    let e = Coordinator::start(&s).await.unwrap_err();
    assert!(matches!(e, StartError::Reflect { .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains(&addr.to_string()) && text.contains("reflect_listen"),
        "{text}"
    );
}

#[tokio::test]
async fn a_refused_hello_never_relays() {
    let dir = TempDir::new("relay-refused-hello");
    let c = start(dir.path()).await;
    let t = token_for(&c, "prod", "100.64.0.0/24").await;
    let (b, _, _) = join(&t, 2, None).await;
    let mut bad = Agent::connect(addr_of(&t), &t.fingerprint).await.unwrap();
    send_to(&bad, &key(2), 1, b"before");
    match bad.hello(node_hello(2, "not the secret", 5)).await {
        ServerMessage::Refused { .. } => {}
        other => panic!("expected Refused, got {other:?}"),
    }
    relay_stats(&c, |s| s.unauthenticated >= 1).await;
    assert_eq!(datagram(&b, Duration::from_millis(200)).await, None);
    assert_eq!(c.relay().unwrap().stats().frames, 0);
    c.shutdown().await;
}

#[tokio::test]
async fn a_nodes_path_report_shows_in_the_admin_api() {
    use meshlink_proto::control::{ClientMessage, PathKind, PathReport, RelayTransport};
    let dir = TempDir::new("paths");
    let c = start(dir.path()).await;
    let t = token_for(&c, "prod", "100.64.0.0/24").await;
    let (mut a, wa, _) = join(&t, 1, Some("a")).await;
    let (_b, wb, _) = join(&t, 2, Some("b")).await;
    assert!(wa.path_reports, "the welcome offers path reports");
    let report = vec![PathReport {
        relay: None,
        peer: wb.node_id,
        kind: PathKind::Relay,
        via: Some(addr_of(&t)),
        over: Some(RelayTransport::Tcp),
        rtt_us: None,
        changed_secs_ago: Some(2),
    }];
    a.send(&ClientMessage::Paths { paths: report }).await;
    let start = Instant::now();
    let shown = loop {
        let (status, node) = http(
            c.admin_addr(),
            "GET",
            "/v1/nodes/a?network=prod",
            Some(&c.admin_token().value),
            None,
        )
        .await;
        assert_eq!(status, 200, "{node}");
        if !node["paths"].is_null() {
            break node;
        }
        assert!(start.elapsed() < WAIT, "no paths shown: {node}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(shown["paths"]["peers"][0]["peer_name"], "b");
    assert_eq!(shown["paths"]["peers"][0]["kind"], "relay");
    assert_eq!(shown["paths"]["peers"][0]["over"], "tcp");
    // A node that never reported shows none (the field is absent).
    let (_, b) = http(
        c.admin_addr(),
        "GET",
        "/v1/nodes/b?network=prod",
        Some(&c.admin_token().value),
        None,
    )
    .await;
    assert!(b.get("paths").is_none(), "{b}");
    c.shutdown().await;
}

/// A coordinator with two standalone relays registered (`[[relays]]`) and tickets of
/// `ttl`.
pub(crate) async fn start_with_relays(dir: &std::path::Path, ttl: Duration) -> Coordinator {
    let mut s = loopback_settings(dir);
    s.relays = ["eu-1", "us-1"]
        .iter()
        .enumerate()
        .map(|(i, name)| RelayInfo {
            name: (*name).to_string(),
            addr: format!("198.18.0.{}:7450", 11 + i),
            fingerprint: "ab".repeat(32),
            region: format!("region-{name}"),
            provider: "bed".into(),
        })
        .collect();
    s.relay_ticket = ttl;
    Coordinator::start(&s).await.unwrap()
}

/// Puts the grant together from frames from the relay itself (other frames are not expected),
/// and checks its ticket against the coordinator's certificate in `dir`: it must vouch for
/// `key` in `network` for `ttl`.
pub(crate) fn check_grant(
    frames: &[Vec<u8>],
    dir: &std::path::Path,
    key: PublicKey,
    network: &str,
    ttl: Duration,
) -> Grant {
    let mut r = Reassembler::new();
    let mut whole = None;
    for f in frames {
        let (h, bytes) = parse(f).unwrap();
        assert_eq!(h.peer, RELAY_SELF, "only grants come from the relay itself");
        whole = whole.or(r.push(h, bytes, Instant::now()));
    }
    let (_, json) = whole.expect("a whole grant");
    let grant: Grant = serde_json::from_slice(&json).unwrap();
    let names: Vec<&str> = grant.relays.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["eu-1", "us-1"]);
    let verifier = Verifier::from_pem_file(&dir.join("coordinator.crt")).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let body = verifier.verify(&grant.ticket, now).unwrap();
    assert_eq!((body.key, body.network.as_str()), (key, network));
    assert_eq!(body.expires - body.issued, ttl.as_secs());
    assert_eq!(grant.expires, body.expires);
    // The grant carries the secret of the ticket's proof key, and only it proves the ticket.
    let exporter = [7u8; meshlink_proto::relay::EXPORTER_LEN];
    let proof = meshlink_relay::ticket::prove(&grant.proof_secret, &exporter).expect("a secret");
    assert_eq!(
        meshlink_relay::ticket::check_proof(&body, &exporter, &proof),
        Ok(())
    );
    grant
}

/// An agent's session carries grants of the registered relays, with a ticket those relays
/// accept for that node only, again after a while (fresh tickets).
#[tokio::test]
async fn sessions_carry_grants_of_the_registered_relays() {
    let dir = TempDir::new("relay-grants");
    let ttl = Duration::from_secs(60);
    let c = start_with_relays(dir.path(), ttl).await;
    let t = token_for(&c, "prod", "100.64.0.0/24").await;
    let (a, _, _) = join(&t, 1, Some("a")).await;
    // The first grants come at once, a second after and four seconds after: each whole,
    // each with a ticket of its own.
    let mut by_id: std::collections::BTreeMap<u16, Vec<Vec<u8>>> = Default::default();
    while by_id.len() < 2 {
        let f = datagram(&a, WAIT).await.expect("a grant");
        let (h, _) = parse(&f).unwrap();
        by_id.entry(h.id).or_default().push(f);
    }
    let grants: Vec<Grant> = by_id
        .values()
        .map(|frames| check_grant(frames, dir.path(), key(1), "prod", ttl))
        .collect();
    assert_ne!(
        grants[0].ticket, grants[1].ticket,
        "a fresh ticket each time"
    );
    drop(a);
    c.shutdown().await;
}

/// Without relays registered, a session carries grants of none (one frame, no ticket), so
/// that an agent granted relays elsewhere or before drops them.
#[tokio::test]
async fn without_relays_sessions_carry_grants_of_none() {
    let dir = TempDir::new("relay-grants-none");
    let c = start(dir.path()).await;
    let t = token_for(&c, "prod", "100.64.0.0/24").await;
    let (a, _, _) = join(&t, 1, Some("a")).await;
    let f = tokio::time::timeout(WAIT, a.conn.read_datagram())
        .await
        .expect("a grant within WAIT")
        .unwrap();
    let (h, json) = parse(&f).unwrap();
    assert_eq!((h.peer, h.count), (RELAY_SELF, 1));
    let grant: Grant = serde_json::from_slice(json).unwrap();
    assert!(
        grant.relays.is_empty() && grant.ticket.is_empty(),
        "{grant:?}"
    );
    assert!(is_grant_of_none(&f));
    drop(a);
    c.shutdown().await;
}

/// The first grant on `a`'s session that lists relays, put together from its frames.
async fn grant_with_relays(a: &Agent) -> Grant {
    let mut r = Reassembler::new();
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        let d = tokio::time::timeout_at(until, a.conn.read_datagram())
            .await
            .expect("a grant listing relays within WAIT")
            .unwrap();
        let (h, bytes) = parse(&d).unwrap();
        if h.peer != RELAY_SELF {
            continue;
        }
        if let Some((_, json)) = r.push(h, bytes, Instant::now()) {
            let grant: Grant = serde_json::from_slice(&json).unwrap();
            if !grant.relays.is_empty() {
                return grant;
            }
        }
    }
}

/// A relay session at `addr` (pinning `fingerprint`) opened with `grant`'s ticket, proved over
/// the connection as an agent does: the answer and the connection.
async fn relay_session(
    addr: SocketAddr,
    fingerprint: &str,
    grant: &Grant,
) -> (RelayAnswer, quinn::Connection) {
    let mut tls = meshlink_tls::rustls_client_config(fingerprint).unwrap();
    tls.alpn_protocols = vec![RELAY_ALPN.to_vec()];
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(quic)));
    let conn = endpoint
        .connect(addr, RELAY_SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let mut exporter = [0u8; EXPORTER_LEN];
    conn.export_keying_material(&mut exporter, EXPORTER_LABEL, b"")
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let hello = RelayHello {
        protocol: RELAY_PROTOCOL,
        ticket: grant.ticket.clone(),
        proof: meshlink_relay::ticket::prove(&grant.proof_secret, &exporter).unwrap(),
    };
    send.write_all(&encode(&hello)).await.unwrap();
    let mut d = Decoder::new(8192);
    let mut buf = [0u8; 1024];
    let answer = loop {
        if let Some(a) = d.decode::<RelayAnswer>().unwrap() {
            break a;
        }
        let n = recv.read(&mut buf).await.unwrap().unwrap();
        d.push(&buf[..n]).unwrap();
    };
    // Kept open: the relay takes the stream's end as the agent's.
    std::mem::forget((send, recv, endpoint));
    (answer, conn)
}

/// A coordinator of a mesh of several serves relay sessions on its own port to the nodes its
/// grants vouch for, in places of their own (they never take a control session's); frames
/// cross between them and control sessions both ways; a revoked node's relay session ends
/// within a sweep although its ticket is still good.
#[tokio::test]
async fn a_coordinator_of_several_serves_relay_sessions_on_its_port() {
    let dir = TempDir::new("relay-port");
    let mut s = loopback_settings(dir.path());
    s.coordinators = vec!["127.0.0.2:9".into()];
    s.limits.max_connections = 2;
    let c = Coordinator::start(&s).await.unwrap();
    let t = token_for(&c, "prod", "100.64.0.0/24").await;
    let admin = c.admin_token().value.clone();
    let (a, _, _) = join(&t, 1, Some("a")).await;
    let grant = grant_with_relays(&a).await;
    let listed: Vec<(&str, &str)> = grant
        .relays
        .iter()
        .map(|r| (r.name.as_str(), r.addr.as_str()))
        .collect();
    assert_eq!(
        listed,
        [
            ("coordinator-1", "127.0.0.2:9"),
            ("coordinator-2", t.coordinator.as_str())
        ]
    );
    assert!(grant.relays.iter().all(|r| r.fingerprint == t.fingerprint));
    let (answer, relayed) = relay_session(addr_of(&t), &t.fingerprint, &grant).await;
    assert!(matches!(answer, RelayAnswer::Accepted { .. }), "{answer:?}");
    // Both control places are still free for control sessions: B joins.
    let (b, _, _) = join(&t, 2, Some("b")).await;
    // A leaves its control session; its relay session stays, and carries both ways.
    drop(a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    send_to(&b, &key(1), 7, b"to a");
    let got = tokio::time::timeout(WAIT, relayed.read_datagram())
        .await
        .expect("B's frame at A's relay session")
        .unwrap();
    let (h, payload) = parse(&got).unwrap();
    assert_eq!((h.peer, payload), (key(2), &b"to a"[..]));
    for f in frames(&key(2), 8, b"to b", FRAME).unwrap() {
        relayed.send_datagram(f.into()).unwrap();
    }
    // B's grants (from the relay itself) come on the same channel.
    let back = loop {
        let d = datagram(&b, WAIT)
            .await
            .expect("A's frame at B's control session");
        if parse(&d).unwrap().0.peer != RELAY_SELF {
            break d;
        }
    };
    let (h, payload) = parse(&back).unwrap();
    assert_eq!((h.peer, payload), (key(1), &b"to b"[..]));
    // Revoked: its relay session ends, its ticket notwithstanding.
    let (status, _) = http(
        c.admin_addr(),
        "POST",
        "/v1/nodes/a/revoke",
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(status, 200);
    tokio::time::timeout(Duration::from_secs(3), relayed.closed())
        .await
        .expect("the revoked node's relay session ended within 3 s");
    drop(b);
    c.shutdown().await;
}

/// A lone coordinator offers no relay sessions: a connection asking for them fails its
/// handshake (no ALPN in common).
#[tokio::test]
async fn a_lone_coordinator_serves_no_relay_sessions() {
    let dir = TempDir::new("relay-port-lone");
    let c = start(dir.path()).await;
    let t = token_for(&c, "prod", "100.64.0.0/24").await;
    let mut tls = meshlink_tls::rustls_client_config(&t.fingerprint).unwrap();
    tls.alpn_protocols = vec![RELAY_ALPN.to_vec()];
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(quic)));
    let r = endpoint
        .connect(addr_of(&t), RELAY_SERVER_NAME)
        .unwrap()
        .await;
    assert!(r.is_err(), "a relay session at a lone coordinator");
    c.shutdown().await;
}
