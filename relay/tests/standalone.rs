//! The standalone relay over real sockets on loopback: only ticket holders that prove the
//! ticket's key over their connection get a session, frames cross between QUIC and TLS/TCP
//! sessions of one network, and nowhere else; what it did is served as Prometheus metrics
//! when asked for.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshlink_proto::control::{encode, encode_relay, Decoder, Record};
use meshlink_proto::relay::{
    frames, parse, RelayAnswer, RelayHello, EXPORTER_LABEL, EXPORTER_LEN, RELAY_ALPN,
    RELAY_PROTOCOL, RELAY_SERVER_NAME,
};
use meshlink_proto::PublicKey;
use meshlink_relay::server::{start, Running, Settings};
use meshlink_relay::ticket::{prove, Issued, Issuer};
use rustls::pki_types::PrivateKeyDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Bed {
    _dir: tempfile::TempDir,
    running: Running,
    fingerprint: String,
    issuer: Issuer,
    foreign: Issuer,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn make_issuer() -> (Issuer, String) {
    let c = rcgen::generate_simple_self_signed(vec!["meshlink-coordinator".into()]).unwrap();
    let key = PrivateKeyDer::Pkcs8(c.signing_key.serialize_der().into());
    (
        Issuer::new(&key, Duration::from_secs(600)).unwrap(),
        c.cert.pem(),
    )
}

async fn bed() -> Bed {
    bed_with(|_| {}).await
}

/// A relay whose settings (16 connections of each kind, no metrics) `configure` changed.
async fn bed_with(configure: impl FnOnce(&mut Settings)) -> Bed {
    let dir = tempfile::tempdir().unwrap();
    let (issuer, pem) = make_issuer();
    let (foreign, _) = make_issuer();
    let cert = dir.path().join("coordinator.crt");
    std::fs::write(&cert, pem).unwrap();
    let mut settings = Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        state_dir: dir.path().join("state"),
        coordinator_cert: cert,
        rate: meshlink_relay::forward::DEFAULT_RATE,
        max_sessions: 16,
        max_unauthenticated: 16,
        max_unauthenticated_per_ip: 16,
        max_sessions_per_ip: 16,
        hello_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(10),
        metrics_listen: None,
    };
    configure(&mut settings);
    let running = start(&settings).await.unwrap();
    let id = meshlink_relay::server::load_or_create_identity(&settings.state_dir).unwrap();
    assert!(!id.created, "made once, then loaded");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(settings.state_dir.join("relay.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    Bed {
        _dir: dir,
        running,
        fingerprint: id.fingerprint,
        issuer,
        foreign,
    }
}

fn tls(pin: &str) -> rustls::ClientConfig {
    let mut c = meshlink_tls::rustls_client_config(pin).unwrap();
    c.alpn_protocols = vec![RELAY_ALPN.to_vec()];
    c
}

/// A QUIC session with `issued`'s ticket, proved with its secret: the answer, and the
/// connection.
async fn quic(bed: &Bed, issued: &Issued) -> (RelayAnswer, quinn::Connection) {
    let (answer, conn, _) = quic_hello(bed, &issued.ticket, |exporter| {
        prove(&issued.proof_secret, exporter).unwrap()
    })
    .await;
    (answer, conn)
}

/// A QUIC session whose hello carries `ticket` and the proof `proof` makes of the
/// connection's exporter value: the answer, the connection, and the hello as sent.
async fn quic_hello(
    bed: &Bed,
    ticket: &str,
    proof: impl FnOnce(&[u8; EXPORTER_LEN]) -> String,
) -> (RelayAnswer, quinn::Connection, RelayHello) {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls(&bed.fingerprint)).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let conn = endpoint
        .connect(bed.running.addr, RELAY_SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let mut exporter = [0u8; EXPORTER_LEN];
    conn.export_keying_material(&mut exporter, EXPORTER_LABEL, b"")
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let hello = RelayHello {
        protocol: RELAY_PROTOCOL,
        ticket: ticket.into(),
        proof: proof(&exporter),
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
    (answer, conn, hello)
}

/// A TLS/TCP connection to the relay, its handshake done, before any hello.
async fn tls_connect(bed: &Bed) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(bed.running.addr)
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from(RELAY_SERVER_NAME).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(tls(&bed.fingerprint)))
        .connect(name, tcp)
        .await
        .unwrap()
}

/// The hello of `issued` on `stream`, proved over it.
fn tls_hello(
    stream: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    issued: &Issued,
) -> RelayHello {
    let exporter = stream
        .get_ref()
        .1
        .export_keying_material([0u8; EXPORTER_LEN], EXPORTER_LABEL, Some(b"".as_slice()))
        .unwrap();
    RelayHello {
        protocol: RELAY_PROTOCOL,
        ticket: issued.ticket.clone(),
        proof: prove(&issued.proof_secret, &exporter).unwrap(),
    }
}

fn ticket(i: &Issuer, key: u8, network: &str) -> Issued {
    i.issue(PublicKey([key; 32]), network, u64::from(key), now())
        .unwrap()
}

async fn datagram(conn: &quinn::Connection) -> Vec<u8> {
    tokio::time::timeout(Duration::from_secs(5), conn.read_datagram())
        .await
        .expect("a datagram within 5 s")
        .unwrap()
        .to_vec()
}

#[tokio::test]
async fn only_vouched_nodes_relay_and_only_within_their_network() {
    let bed = bed().await;
    let (a_answer, a) = quic(&bed, &ticket(&bed.issuer, 1, "prod")).await;
    assert!(
        matches!(a_answer, RelayAnswer::Accepted { .. }),
        "{a_answer:?}"
    );
    let (_, b) = quic(&bed, &ticket(&bed.issuer, 2, "prod")).await;
    let (_, s) = quic(&bed, &ticket(&bed.issuer, 3, "staging")).await;

    // A to B: B sees it from A.
    let f = frames(&PublicKey([2; 32]), 1, b"ciphertext", 1100)
        .unwrap()
        .remove(0);
    a.send_datagram(f.into()).unwrap();
    let got = datagram(&b).await;
    let (h, payload) = parse(&got).unwrap();
    assert_eq!((h.peer, payload), (PublicKey([1; 32]), &b"ciphertext"[..]));

    // A to a node of another network: dropped, counted.
    let f = frames(&PublicKey([3; 32]), 2, b"x", 1100)
        .unwrap()
        .remove(0);
    a.send_datagram(f.into()).unwrap();

    // Forged (another mesh's coordinator), expired and garbage tickets: refused, no session.
    let (forged, _) = quic(&bed, &ticket(&bed.foreign, 4, "prod")).await;
    assert!(matches!(forged, RelayAnswer::Refused { .. }), "{forged:?}");
    let old = bed
        .issuer
        .issue(PublicKey([5; 32]), "prod", 5, now() - 3600)
        .unwrap();
    let (expired, _) = quic(&bed, &old).await;
    match expired {
        RelayAnswer::Refused { reason } => assert!(reason.contains("expired"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let (garbage, _, _) = quic_hello(&bed, "not a ticket", |_| String::new()).await;
    assert!(matches!(garbage, RelayAnswer::Refused { .. }));
    let counted = bed.running.snapshot().outcomes;
    assert_eq!(
        (
            counted.refused("bad_signature"),
            counted.refused("expired"),
            counted.refused("malformed"),
            counted.refused_total()
        ),
        (1, 1, 1, 3),
        "{counted:?}"
    );

    // A TLS/TCP session of B's network: its whole datagram reaches A (QUIC), cut to fit.
    let mut tls_stream = tls_connect(&bed).await;
    let hello = tls_hello(&tls_stream, &ticket(&bed.issuer, 6, "prod"));
    tls_stream.write_all(&encode(&hello)).await.unwrap();
    let whole: Vec<u8> = (0..1452u32).map(|i| i as u8).collect();
    let f = frames(&PublicKey([1; 32]), 9, &whole, 70_000)
        .unwrap()
        .remove(0);
    tls_stream
        .write_all(&encode_relay(&f).unwrap())
        .await
        .unwrap();
    let mut d = Decoder::new(8192);
    let mut buf = [0u8; 2048];
    loop {
        if let Some(a) = d.decode::<RelayAnswer>().unwrap() {
            assert!(matches!(a, RelayAnswer::Accepted { .. }));
            break;
        }
        let n = tls_stream.read(&mut buf).await.unwrap();
        d.push(&buf[..n]).unwrap();
    }
    let mut reassembler = meshlink_proto::relay::Reassembler::new();
    let mut back = None;
    while back.is_none() {
        let got = datagram(&a).await;
        let (h, bytes) = parse(&got).unwrap();
        back = reassembler.push(h, bytes, std::time::Instant::now());
    }
    assert_eq!(back, Some((PublicKey([6; 32]), whole)));

    // And A to the TCP node: a record on its stream.
    let f = frames(&PublicKey([6; 32]), 3, b"to tcp", 1100)
        .unwrap()
        .remove(0);
    a.send_datagram(f.into()).unwrap();
    let record = loop {
        if let Some(r) = d.decode_record::<serde_json::Value>().unwrap() {
            break r;
        }
        let n = tls_stream.read(&mut buf).await.unwrap();
        d.push(&buf[..n]).unwrap();
    };
    let Record::Relay(frame) = record else {
        panic!("a message")
    };
    assert_eq!(parse(&frame).unwrap().1, b"to tcp");

    let stats = bed.running.relay.stats();
    assert_eq!((stats.frames, stats.other_network), (3, 1), "{stats:?}");
    drop(s);
    bed.running.stop().await;
}

/// Opens two connections to `addr` that say nothing (a relay that allows two per source
/// admits both), then a third, which must be dropped at once rather than kept until the hello
/// timeout; returns the two, still open.
async fn two_silent_then_a_third_dropped(addr: SocketAddr) -> [tokio::net::TcpStream; 2] {
    let silent = [
        tokio::net::TcpStream::connect(addr).await.unwrap(),
        tokio::net::TcpStream::connect(addr).await.unwrap(),
    ];
    // Both are admitted (and wait for a handshake) before the third is tried.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(2), third.read(&mut buf))
        .await
        .expect("the third is dropped at once, not kept until the hello timeout");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    silent
}

/// Connections that never say hello hold at most their source's share: beyond it the relay
/// drops a new one at once; once they go, the source may connect again.
#[tokio::test]
async fn silent_connections_hold_only_their_share() {
    let bed = bed_with(|s| s.max_unauthenticated_per_ip = 2).await;
    let silent = two_silent_then_a_third_dropped(bed.running.addr).await;
    drop(silent);
    let mut buf = [0u8; 1];
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut fourth = tokio::net::TcpStream::connect(bed.running.addr)
        .await
        .unwrap();
    let kept = tokio::time::timeout(Duration::from_millis(500), fourth.read(&mut buf)).await;
    assert!(
        kept.is_err(),
        "admitted again once the others went: {kept:?}"
    );
    bed.running.stop().await;
}

/// A frame for a node with no session here draws a notice naming it back to the sender, at a
/// capped rate.
#[tokio::test]
async fn a_frame_for_an_absent_node_draws_a_capped_notice() {
    let bed = bed().await;
    let (_, a) = quic(&bed, &ticket(&bed.issuer, 1, "prod")).await;
    let f = frames(&PublicKey([9; 32]), 1, b"x", 1100)
        .unwrap()
        .remove(0);
    a.send_datagram(f.into()).unwrap();
    let got = datagram(&a).await;
    let (h, payload) = parse(&got).unwrap();
    assert_eq!(h.peer, meshlink_proto::relay::RELAY_SELF);
    assert_eq!(
        meshlink_proto::relay::parse_unreachable(payload),
        Some(PublicKey([9; 32]))
    );
    // A flood of such frames draws at most the cap's burst of notices.
    for i in 0..200u16 {
        let f = frames(&PublicKey([10; 32]), i, b"x", 1100)
            .unwrap()
            .remove(0);
        let _ = a.send_datagram(f.into());
    }
    let mut notices = 0;
    while tokio::time::timeout(Duration::from_millis(300), a.read_datagram())
        .await
        .is_ok()
    {
        notices += 1;
    }
    let cap = meshlink_relay::sessions::NOTICES_PER_SECOND as usize;
    assert!((1..=cap + 2).contains(&notices), "{notices} notices");
    bed.running.stop().await;
}

/// A ticket is bound to the connection it is proved on: a hello seen by one relay (ticket and
/// proof), replayed on another connection, is refused, as is the ticket with a proof made by
/// another key; the node's own session keeps its route.
#[tokio::test]
async fn a_ticket_seen_elsewhere_cannot_take_the_node_over() {
    let bed = bed().await;
    let victim = ticket(&bed.issuer, 1, "prod");
    let (answer, v, seen) = quic_hello(&bed, &victim.ticket, |e| {
        prove(&victim.proof_secret, e).unwrap()
    })
    .await;
    assert!(matches!(answer, RelayAnswer::Accepted { .. }), "{answer:?}");
    let (_, b) = quic(&bed, &ticket(&bed.issuer, 2, "prod")).await;

    // The hello replayed whole on a connection of its own.
    let (replayed, _thief, _) = quic_hello(&bed, &seen.ticket, |_| seen.proof.clone()).await;
    match replayed {
        RelayAnswer::Refused { reason } => assert!(reason.contains("prove"), "{reason}"),
        other => panic!("a replayed hello was accepted: {other:?}"),
    }
    // The ticket with a proof by another ticket's key, and with none.
    let other = ticket(&bed.issuer, 3, "prod");
    let (foreign, _, _) = quic_hello(&bed, &victim.ticket, |e| {
        prove(&other.proof_secret, e).unwrap()
    })
    .await;
    assert!(
        matches!(foreign, RelayAnswer::Refused { .. }),
        "{foreign:?}"
    );
    let (bare, _, _) = quic_hello(&bed, &victim.ticket, |_| String::new()).await;
    assert!(matches!(bare, RelayAnswer::Refused { .. }), "{bare:?}");
    let counted = bed.running.snapshot().outcomes;
    assert_eq!(
        (counted.refused("bad_proof"), counted.refused_total()),
        (3, 3),
        "{counted:?}"
    );

    // Frames for the victim still reach the victim.
    let f = frames(&PublicKey([1; 32]), 1, b"for the victim", 1100)
        .unwrap()
        .remove(0);
    b.send_datagram(f.into()).unwrap();
    let got = datagram(&v).await;
    assert_eq!(parse(&got).unwrap().1, b"for the victim");
    bed.running.stop().await;
}

/// One node holds at most two sessions: a third closes the oldest (its agent sees it go),
/// frames go to the newest; and one address holds at most its sessions' share.
#[tokio::test]
async fn a_node_holds_two_sessions_and_an_address_its_share() {
    let bed = bed_with(|s| s.max_sessions_per_ip = 4).await;
    let node = ticket(&bed.issuer, 1, "prod");
    let (_, first) = quic(&bed, &node).await;
    let (_, second) = quic(&bed, &node).await;
    let (_, third) = quic(&bed, &node).await;
    tokio::time::timeout(Duration::from_secs(5), first.closed())
        .await
        .expect("the oldest session is closed");
    assert!(second.close_reason().is_none(), "the middle one stays");
    assert_eq!(bed.running.relay.sessions(), 2);
    let (_, b) = quic(&bed, &ticket(&bed.issuer, 2, "prod")).await;
    let f = frames(&PublicKey([1; 32]), 1, b"newest", 1100)
        .unwrap()
        .remove(0);
    b.send_datagram(f.into()).unwrap();
    assert_eq!(parse(&datagram(&third).await).unwrap().1, b"newest");

    // 127.0.0.1 has 3 sessions now (the closed one's place is free): one more, not two.
    let (fourth, _) = quic(&bed, &ticket(&bed.issuer, 3, "prod")).await;
    assert!(matches!(fourth, RelayAnswer::Accepted { .. }), "{fourth:?}");
    let (fifth, _) = quic(&bed, &ticket(&bed.issuer, 4, "prod")).await;
    match fifth {
        RelayAnswer::Refused { reason } => assert!(reason.contains("address"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let counted = bed.running.snapshot().outcomes;
    assert_eq!(
        (
            counted.refused("max_sessions_per_ip"),
            counted.ended("displaced")
        ),
        (1, 1),
        "{counted:?}"
    );
    bed.running.stop().await;
}

/// A connection whose first record is a relay record (a frame before any hello) is dropped at
/// once, not buffered up to a whole record's size until the hello timeout.
#[tokio::test]
async fn a_frame_before_the_hello_ends_the_connection_at_once() {
    let bed = bed().await;
    let mut tls_stream = tls_connect(&bed).await;
    // The start of a 60,000-byte frame record.
    let record = encode_relay(&vec![0u8; 60_000]).unwrap();
    tls_stream.write_all(&record[..2_000]).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(2), tls_stream.read(&mut buf))
        .await
        .expect("dropped at once, not after the 5 s hello timeout");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    bed.running.stop().await;
}

/// `GET /metrics` from `addr` over plain HTTP: every sample, by series (`name{labels}`).
async fn scrape(addr: SocketAddr) -> BTreeMap<String, f64> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: relay\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut answer))
        .await
        .expect("an answer within 5 s")
        .unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            (series.to_string(), value.parse().unwrap())
        })
        .collect()
}

/// With `metrics_listen`, the relay serves what it did: sessions by transport, hellos
/// accepted and refused by reason, frames and bytes relayed, drops by reason, connections
/// refused by the caps, and a session ended by its ticket's expiry.
#[tokio::test]
async fn metrics_show_what_the_relay_did() {
    let bed = bed_with(|s| {
        s.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        s.max_unauthenticated_per_ip = 2;
    })
    .await;
    let metrics = bed.running.metrics_addr.expect("metrics are served");
    assert_ne!(metrics.port(), 0);

    // Two QUIC nodes of one network, one of another, one over TLS/TCP.
    let (_, a) = quic(&bed, &ticket(&bed.issuer, 1, "prod")).await;
    let (_, b) = quic(&bed, &ticket(&bed.issuer, 2, "prod")).await;
    let (_, _staging) = quic(&bed, &ticket(&bed.issuer, 3, "staging")).await;
    let mut tcp = tls_connect(&bed).await;
    tcp.write_all(&encode(&tls_hello(&tcp, &ticket(&bed.issuer, 6, "prod"))))
        .await
        .unwrap();
    let mut d = Decoder::new(8192);
    let mut buf = [0u8; 1024];
    loop {
        if let Some(a) = d.decode::<RelayAnswer>().unwrap() {
            assert!(matches!(a, RelayAnswer::Accepted { .. }), "{a:?}");
            break;
        }
        let n = tcp.read(&mut buf).await.unwrap();
        d.push(&buf[..n]).unwrap();
    }

    // A to B three times (all delivered), to the other network once, to nobody once.
    let mut bytes = 0;
    for (i, payload) in [&b"one"[..], b"second", b"the third"]
        .into_iter()
        .enumerate()
    {
        let f = frames(&PublicKey([2; 32]), i as u16, payload, 1100)
            .unwrap()
            .remove(0);
        bytes += f.len();
        a.send_datagram(f.into()).unwrap();
        assert_eq!(parse(&datagram(&b).await).unwrap().1, payload);
    }
    for to in [3, 9] {
        let f = frames(&PublicKey([to; 32]), 7, b"x", 1100)
            .unwrap()
            .remove(0);
        a.send_datagram(f.into()).unwrap();
    }
    // The notice for the absent node says the drops are counted.
    datagram(&a).await;

    // An expired ticket refused; a session whose ticket runs out within 2 s ends then.
    let old = bed
        .issuer
        .issue(PublicKey([5; 32]), "prod", 5, now() - 3600)
        .unwrap();
    let (refused, _) = quic(&bed, &old).await;
    assert!(
        matches!(refused, RelayAnswer::Refused { .. }),
        "{refused:?}"
    );
    let skew = meshlink_relay::ticket::CLOCK_SKEW;
    let ending = bed
        .issuer
        .issue(PublicKey([7; 32]), "prod", 7, now() - 600 - skew + 2)
        .unwrap();
    let (accepted, short) = quic(&bed, &ending).await;
    assert!(
        matches!(accepted, RelayAnswer::Accepted { .. }),
        "{accepted:?}"
    );
    tokio::time::timeout(Duration::from_secs(5), short.closed())
        .await
        .expect("the session ends when its ticket expires");

    // Two connections that say nothing hold their source's share; a third is refused.
    let silent = two_silent_then_a_third_dropped(bed.running.addr).await;
    // The refused hello's connection closes within 2 s; then 4 sessions and the 2 silent.
    let settled = tokio::time::timeout(Duration::from_secs(5), async {
        while bed.running.snapshot().connections != 6 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(settled.is_ok(), "{:?}", bed.running.snapshot());

    let m = scrape(metrics).await;
    let v = |series: &str| {
        *m.get(series)
            .unwrap_or_else(|| panic!("{series} missing from {m:#?}"))
    };
    for (series, expected) in [
        (r#"meshlink_relay_sessions{transport="quic"}"#, 3.0),
        (r#"meshlink_relay_sessions{transport="tcp"}"#, 1.0),
        ("meshlink_relay_nodes", 4.0),
        ("meshlink_relay_connections", 6.0),
        ("meshlink_relay_connections_before_hello", 2.0),
        ("meshlink_relay_hellos_accepted_total", 5.0),
        (
            r#"meshlink_relay_hellos_refused_total{reason="expired"}"#,
            1.0,
        ),
        (
            r#"meshlink_relay_hellos_refused_total{reason="bad_signature"}"#,
            0.0,
        ),
        (
            r#"meshlink_relay_sessions_ended_total{reason="ticket_expired"}"#,
            1.0,
        ),
        (
            r#"meshlink_relay_sessions_ended_total{reason="agent_closed"}"#,
            0.0,
        ),
        ("meshlink_relay_frames_total", 3.0),
        ("meshlink_relay_bytes_total", bytes as f64),
        (
            r#"meshlink_relay_dropped_total{reason="other_network"}"#,
            1.0,
        ),
        (r#"meshlink_relay_dropped_total{reason="no_route"}"#, 1.0),
        (
            r#"meshlink_relay_dropped_total{reason="rate_limited"}"#,
            0.0,
        ),
        (
            r#"meshlink_relay_connections_refused_total{cap="max_unauthenticated_per_ip"}"#,
            1.0,
        ),
        (
            r#"meshlink_relay_connections_refused_total{cap="max_sessions"}"#,
            0.0,
        ),
    ] {
        assert_eq!(v(series), expected, "{series}");
    }
    // The same figures as the relay's own counters.
    let snap = bed.running.snapshot();
    assert_eq!(
        (snap.relay.frames, snap.relay.bytes),
        (3, bytes as u64),
        "{snap:?}"
    );
    drop(silent);
    bed.running.stop().await;
}
