//! Agents over TLS over TCP on 127.0.0.1 (the fallback for networks that block UDP): the same
//! sessions as over QUIC at the same address and port number, the pinned certificate, relay
//! records between TCP and QUIC agents (a whole datagram cut for QUIC on the way), relay
//! records before the hello, the listener's setting, and bytes that end a session.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshlink_coordinator::config::TcpListen;
use meshlink_coordinator::identity::SERVER_NAME;
use meshlink_coordinator::{pin, Coordinator, StartError};
use meshlink_proto::control::{
    encode, encode_relay, ClientMessage, Decoder, Hello, Record, ServerMessage, Welcome,
    MAX_RELAY_RECORD, MAX_SERVER_MESSAGE, RELAY_RECORD,
};
use meshlink_proto::relay::{frames, parse, Reassembler};
use meshlink_proto::token::JoinToken;
use meshlink_proto::{Netmap, NetmapDelta, PublicKey};
use rustls::pki_types::ServerName;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::common::{http, join_hello, key, loopback_settings, node_hello, start, TempDir, WAIT};
use crate::quic::{addr_of, join, token_for, welcome};
use crate::relay::{datagram, relay_stats, send_to};

/// A minimal agent over TLS/TCP: one stream of messages and relay records.
pub(crate) struct TcpAgent {
    read: ReadHalf<TlsStream<TcpStream>>,
    write: WriteHalf<TlsStream<TcpStream>>,
    decoder: Decoder,
}

impl TcpAgent {
    /// Connects to `addr` over TCP and completes the TLS handshake, pinning `fingerprint`.
    pub(crate) async fn connect(addr: SocketAddr, fingerprint: &str) -> Result<TcpAgent, String> {
        let config = pin::rustls_client_config(fingerprint).map_err(|e| e.to_string())?;
        TcpAgent::connect_with(addr, config).await
    }

    async fn connect_with(
        addr: SocketAddr,
        config: rustls::ClientConfig,
    ) -> Result<TcpAgent, String> {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = ServerName::try_from(SERVER_NAME).unwrap();
        let tls = tokio::time::timeout(
            WAIT,
            TlsConnector::from(Arc::new(config)).connect(name, tcp),
        )
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| e.to_string())?;
        let (read, write) = tokio::io::split(tls);
        Ok(TcpAgent {
            read,
            write,
            decoder: Decoder::new(MAX_SERVER_MESSAGE),
        })
    }

    async fn send(&mut self, msg: &ClientMessage) {
        self.send_raw(&encode(msg)).await;
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.write.write_all(bytes).await.unwrap();
        self.write.flush().await.unwrap();
    }

    /// Sends one relay frame as a record of the stream.
    async fn send_frame(&mut self, frame: &[u8]) {
        self.send_raw(&encode_relay(frame).unwrap()).await;
    }

    /// The next record, `None` when the stream ended, `Err` after `within`.
    async fn record(
        &mut self,
        within: Duration,
    ) -> Result<Option<Record<ServerMessage>>, tokio::time::error::Elapsed> {
        let mut buf = vec![0u8; 64 * 1024];
        tokio::time::timeout(within, async {
            loop {
                match self.decoder.decode_record::<ServerMessage>().unwrap() {
                    // Grants of no relays come to every session; tests of grants use relays.
                    Some(Record::Relay(f)) if crate::relay::is_grant_of_none(&f) => continue,
                    Some(r) => return Some(r),
                    None => {}
                }
                match self.read.read(&mut buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => self.decoder.push(&buf[..n]).unwrap(),
                }
            }
        })
        .await
    }

    /// The next message, or `None` when the stream ended (relay records are not expected).
    async fn recv(&mut self) -> Option<ServerMessage> {
        match self
            .record(WAIT)
            .await
            .expect("timed out waiting for a message")
        {
            Some(Record::Message(m)) => Some(m),
            Some(Record::Relay(f)) => panic!("a relay record of {} bytes", f.len()),
            None => None,
        }
    }

    /// The next relay frame (messages in between are skipped), or `None` after `within`.
    async fn frame(&mut self, within: Duration) -> Option<Vec<u8>> {
        let until = tokio::time::Instant::now() + within;
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            match self.record(left).await {
                Ok(Some(Record::Relay(f))) => return Some(f),
                Ok(Some(Record::Message(_))) => {}
                Ok(None) => panic!("the session ended"),
                Err(_) => return None,
            }
        }
    }

    async fn hello(&mut self, hello: Hello) -> ServerMessage {
        self.send(&ClientMessage::Hello(hello)).await;
        self.recv().await.expect("an answer to the hello")
    }

    /// Waits until the coordinator ends the stream, skipping what comes before.
    async fn closed(&mut self) {
        loop {
            match self.record(WAIT).await {
                Ok(Some(_)) => {}
                Ok(None) => return,
                Err(_) => panic!("the coordinator did not close the stream"),
            }
        }
    }
}

async fn full_map(a: &mut TcpAgent) -> Netmap {
    match a.recv().await {
        Some(ServerMessage::FullMap(m)) => m,
        other => panic!("expected a full map, got {other:?}"),
    }
}

async fn delta(a: &mut TcpAgent) -> NetmapDelta {
    match a.recv().await {
        Some(ServerMessage::Delta(d)) => d,
        other => panic!("expected a delta, got {other:?}"),
    }
}

/// Joins over TLS/TCP at the token's address (the QUIC one) and reads the welcome and map.
async fn join_tcp(t: &JoinToken, key: u8, name: Option<&str>) -> (TcpAgent, Welcome, Netmap) {
    let mut a = TcpAgent::connect(addr_of(t), &t.fingerprint).await.unwrap();
    let w = welcome(a.hello(join_hello(&t.secret, key, name)).await);
    let m = full_map(&mut a).await;
    (a, w, m)
}

/// One whole WireGuard datagram of the largest size.
fn wireguard_datagram() -> Vec<u8> {
    (0..1452u32).map(|i| (i * 7) as u8).collect()
}

/// The one frame a TCP agent sends for `datagram` (a stream takes it whole).
fn whole_frame(to: &PublicKey, id: u16, datagram: &[u8]) -> Vec<u8> {
    let mut f = frames(to, id, datagram, MAX_RELAY_RECORD).unwrap();
    assert_eq!(f.len(), 1);
    f.remove(0)
}

#[tokio::test]
async fn an_agent_over_tls_tcp_gets_welcome_maps_and_deltas() {
    let dir = TempDir::new("tcp-flow");
    let c = start(dir.path()).await;
    let tcp = c.tcp_addr().expect("on by default");
    assert_eq!(
        tcp,
        c.quic_addr(),
        "TCP at the QUIC address and port number"
    );
    let t = token_for(&c, "prod", "100.64.0.0/24").await;
    let admin = c.admin_token().value.clone();

    let (mut a, wa, ma) = join_tcp(&t, 1, Some("a")).await;
    assert_eq!((wa.node_id, wa.name.as_str()), (1, "a"));
    assert!(wa.relay);
    assert_eq!((ma.version, ma.peers.len()), (1, 1));

    // A QUIC agent joins: a delta over TCP; the TCP agent's endpoints reach the QUIC agent.
    let (mut b, _, mb) = join(&t, 2, Some("b")).await;
    assert_eq!(mb.peers.len(), 2);
    let d = delta(&mut a).await;
    assert_eq!((d.from_version, d.to_version), (1, 2));
    let eps: Vec<SocketAddr> = vec!["198.18.0.1:51821".parse().unwrap()];
    a.send(&ClientMessage::Endpoints {
        endpoints: eps.clone(),
    })
    .await;
    let d = match b.recv().await {
        Some(ServerMessage::Delta(d)) => d,
        other => panic!("expected a delta, got {other:?}"),
    };
    assert_eq!((d.to_version, d.upsert[0].endpoints.clone()), (3, eps));
    assert_eq!(delta(&mut a).await.to_version, 3);
    a.send(&ClientMessage::Heartbeat {
        seq: 9,
        version: None,
    })
    .await;
    assert!(matches!(
        a.recv().await,
        Some(ServerMessage::Lease { seq: 9, .. })
    ));
    let (_, st) = http(c.admin_addr(), "GET", "/v1/status", Some(&admin), None).await;
    assert_eq!(st["online"], json!(2));

    // Revoked over TCP: the message, then the end of the stream.
    let (status, _) = http(
        c.admin_addr(),
        "POST",
        "/v1/nodes/a/revoke",
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert!(matches!(
        a.recv().await,
        Some(ServerMessage::Revoked { .. })
    ));
    assert!(a.recv().await.is_none(), "the stream ends after Revoked");

    // A refused hello over TCP: Refused, then the end.
    let mut again = TcpAgent::connect(tcp, &t.fingerprint).await.unwrap();
    let secret = wa.node_secret.expect("a secret at join");
    assert!(matches!(
        again.hello(node_hello(1, &secret, 1)).await,
        ServerMessage::Refused { .. }
    ));
    assert!(again.recv().await.is_none());

    // Shutting down ends TCP sessions too, promptly, those still before their hello as well.
    let (mut c2, _, _) = join_tcp(&t, 3, None).await;
    let mut silent = TcpAgent::connect(tcp, &t.fingerprint).await.unwrap();
    let started = Instant::now();
    c.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    c2.closed().await;
    silent.closed().await;
}

#[tokio::test]
async fn a_wrong_pin_or_no_alpn_gets_no_session() {
    let dir = TempDir::new("tcp-pin");
    let c = start(dir.path()).await;
    let t = token_for(&c, "prod", "100.64.0.0/24").await;
    let tcp = c.tcp_addr().unwrap();
    let e = TcpAgent::connect(tcp, &"00".repeat(32)).await.err();
    assert!(e.is_some(), "the handshake fails on the agent's side");

    // Without ALPN the handshake completes and the coordinator hangs up.
    let mut config = pin::rustls_client_config(&t.fingerprint).unwrap();
    config.alpn_protocols.clear();
    let mut no_alpn = TcpAgent::connect_with(tcp, config).await.unwrap();
    no_alpn
        .send(&ClientMessage::Hello(join_hello(&t.secret, 1, None)))
        .await;
    no_alpn.closed().await;
    let (_, st) = http(
        c.admin_addr(),
        "GET",
        "/v1/status",
        Some(&c.admin_token().value),
        None,
    )
    .await;
    assert_eq!(st["nodes"], json!(0), "no node joined");
    c.shutdown().await;
}

#[tokio::test]
async fn relay_frames_cross_between_tcp_and_quic_agents() {
    let dir = TempDir::new("tcp-relay");
    let c = start(dir.path()).await;
    let t = token_for(&c, "prod", "100.64.0.0/24").await;
    let (mut a, _, _) = join_tcp(&t, 1, Some("a")).await;
    let (b, wb, _) = join(&t, 2, Some("b")).await;
    let (mut d, _, _) = join_tcp(&t, 4, Some("d")).await;
    assert!(wb.relay);
    let quic_max = b.conn.max_datagram_size().expect("datagrams offered");
    let wg = wireguard_datagram();
    assert!(
        wg.len() > quic_max,
        "the QUIC path takes less than a whole datagram"
    );

    // TCP -> QUIC: one whole datagram, cut by the relay, put back together by b.
    a.send_frame(&whole_frame(&key(2), 41, &wg)).await;
    let mut r = Reassembler::new();
    let mut got = None;
    let mut pieces = 0;
    while got.is_none() {
        let f = datagram(&b, WAIT).await.expect("a relayed frame");
        assert!(f.len() <= quic_max);
        let (h, bytes) = parse(&f).unwrap();
        assert_eq!((h.peer, h.id, h.count), (key(1), 41, 2));
        pieces += 1;
        got = r.push(h, bytes, Instant::now());
    }
    assert_eq!((pieces, got), (2, Some((key(1), wg.clone()))));

    // QUIC -> TCP: the QUIC agent's fragments arrive as they are, as records.
    send_to(&b, &key(1), 42, &wg);
    let mut r = Reassembler::new();
    let mut got = None;
    while got.is_none() {
        let f = a.frame(WAIT).await.expect("a relayed record");
        let (h, bytes) = parse(&f).unwrap();
        assert_eq!((h.peer, h.id), (key(2), 42));
        got = r.push(h, bytes, Instant::now());
    }
    assert_eq!(got, Some((key(2), wg.clone())));
    send_to(&b, &key(1), 43, b"handshake response");
    let f = a.frame(WAIT).await.unwrap();
    assert_eq!(
        parse(&f).unwrap(),
        (
            meshlink_proto::relay::Header {
                peer: key(2),
                id: 43,
                index: 0,
                count: 1
            },
            &b"handshake response"[..]
        )
    );

    // TCP -> TCP: whole, in one record.
    a.send_frame(&whole_frame(&key(4), 44, &wg)).await;
    let f = d.frame(WAIT).await.unwrap();
    let (h, bytes) = parse(&f).unwrap();
    assert_eq!((h.peer, h.id, h.count, bytes), (key(1), 44, 1, &wg[..]));

    let s = relay_stats(&c, |s| s.frames == 5).await;
    assert_eq!(
        s.bytes,
        (2 * (36 + 1452) + (1452 + 2 * 36) + 36 + 18) as u64
    );
    assert_eq!(
        (s.too_large, s.malformed, s.no_route, s.unauthenticated),
        (0, 0, 0, 0)
    );

    // A newer QUIC session of a TCP node takes its route; the TCP session ends.
    let (mut e, we, _) = join_tcp(&t, 5, Some("e")).await;
    let mut e2 = crate::common::Agent::connect(addr_of(&t), &t.fingerprint)
        .await
        .unwrap();
    welcome(
        e2.hello(node_hello(
            we.node_id,
            we.node_secret.as_deref().unwrap(),
            5,
        ))
        .await,
    );
    e.closed().await;
    a.send_frame(&whole_frame(&key(5), 45, b"to the new session"))
        .await;
    let f = datagram(&e2, WAIT)
        .await
        .expect("relayed to the QUIC session");
    assert_eq!(parse(&f).unwrap().1, b"to the new session");
    c.shutdown().await;
}

#[tokio::test]
async fn relay_records_before_the_hello_go_nowhere_and_are_counted() {
    let dir = TempDir::new("tcp-relay-early");
    let c = start(dir.path()).await;
    let t = token_for(&c, "prod", "100.64.0.0/24").await;
    let (b, _, _) = join(&t, 2, Some("b")).await;

    // A connection that never says hello.
    let mut lurker = TcpAgent::connect(addr_of(&t), &t.fingerprint)
        .await
        .unwrap();
    lurker
        .send_frame(&whole_frame(&key(2), 1, b"let me in"))
        .await;
    lurker.send_frame(&whole_frame(&key(2), 2, b"again")).await;
    // One whose hello is then refused.
    let mut refused = TcpAgent::connect(addr_of(&t), &t.fingerprint)
        .await
        .unwrap();
    refused
        .send_frame(&whole_frame(&key(2), 3, b"before"))
        .await;
    assert!(matches!(
        refused.hello(node_hello(2, "not the secret", 7)).await,
        ServerMessage::Refused { .. }
    ));
    relay_stats(&c, |s| s.unauthenticated == 3).await;
    assert_eq!(datagram(&b, Duration::from_millis(200)).await, None);
    assert_eq!(c.relay().unwrap().stats().frames, 0);

    // After its hello, the lurker's frames go through.
    let w = welcome(lurker.hello(join_hello(&t.secret, 1, None)).await);
    assert!(w.relay);
    lurker.send_frame(&whole_frame(&key(2), 4, b"now")).await;
    let f = datagram(&b, WAIT).await.expect("relayed after the hello");
    assert_eq!(parse(&f).unwrap().1, b"now");
    c.shutdown().await;
}

#[tokio::test]
async fn tcp_listen_off_means_no_listener_and_relay_off_means_no_records() {
    let dir = TempDir::new("tcp-off");
    let mut s = loopback_settings(dir.path());
    s.tcp_listen = TcpListen::Off;
    let c = Coordinator::start(&s).await.unwrap();
    assert_eq!(c.tcp_addr(), None);
    assert!(TcpStream::connect(c.quic_addr()).await.is_err());
    c.shutdown().await;

    // With the relay off, a relay record is a protocol error that ends only its session.
    let dir = TempDir::new("tcp-no-relay");
    let mut s = loopback_settings(dir.path());
    s.relay = false;
    let c = Coordinator::start(&s).await.unwrap();
    let t = token_for(&c, "prod", "100.64.0.0/24").await;
    let (mut a, w, _) = join_tcp(&t, 1, None).await;
    assert!(!w.relay);
    a.send_frame(&whole_frame(&key(2), 1, b"x")).await;
    a.closed().await;
    let (mut b, _, _) = join_tcp(&t, 2, None).await;
    b.send(&ClientMessage::Heartbeat {
        seq: 1,
        version: None,
    })
    .await;
    assert!(matches!(
        b.recv().await,
        Some(ServerMessage::Lease { seq: 1, .. })
    ));
    c.shutdown().await;
}

#[tokio::test]
async fn a_taken_tcp_port_is_a_start_error_naming_tcp_listen() {
    let dir = TempDir::new("tcp-taken");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let mut s = loopback_settings(dir.path());
    s.tcp_listen = TcpListen::At(addr);
    let e = Coordinator::start(&s).await.unwrap_err();
    assert!(matches!(e, StartError::Tcp { .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains(&addr.to_string()) && text.contains("tcp_listen"),
        "{text}"
    );
    // The default, TCP at the QUIC port, when that port is taken in TCP only.
    s.tcp_listen = TcpListen::AtListen;
    s.listen = addr;
    s.reflect_listen = meshlink_coordinator::config::ReflectListen::Off;
    let e = Coordinator::start(&s).await.unwrap_err();
    assert!(
        matches!(e, StartError::Tcp { addr: a, .. } if a == addr),
        "{e:?}"
    );
}

#[tokio::test]
async fn bytes_that_are_no_record_end_only_their_session() {
    let dir = TempDir::new("tcp-bad");
    let mut s = loopback_settings(dir.path());
    s.limits.hello_timeout = Duration::from_secs(1);
    s.limits.message_rate = 1;
    s.limits.message_burst = 5;
    let c = Coordinator::start(&s).await.unwrap();
    let t = token_for(&c, "prod", "100.64.0.0/24").await;
    let tcp = c.tcp_addr().unwrap();
    let (mut good, _, _) = join_tcp(&t, 1, Some("good")).await;

    // Plain HTTP where TLS is expected: no handshake, no session.
    let mut plain = TcpStream::connect(tcp).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut sink = Vec::new();
    let read = tokio::time::timeout(WAIT, plain.read_to_end(&mut sink)).await;
    assert!(read.is_ok(), "the coordinator hangs up");

    // Garbage inside TLS before the hello: an absurd length prefix.
    let mut garbage = TcpAgent::connect(tcp, &t.fingerprint).await.unwrap();
    garbage.send_raw(b"GET / HTTP/1.1\r\n\r\n").await;
    garbage.closed().await;
    // An oversized relay record and an oversized message, after the hello.
    let (mut big_relay, _, _) = join_tcp(&t, 2, None).await;
    big_relay
        .send_raw(&(RELAY_RECORD | (MAX_RELAY_RECORD as u32 + 1)).to_be_bytes())
        .await;
    big_relay.closed().await;
    let (mut big, _, _) = join_tcp(&t, 3, None).await;
    big.send_raw(&(1u32 << 20).to_be_bytes()).await;
    big.closed().await;
    // Malformed JSON of a valid length.
    let (mut bad, _, _) = join_tcp(&t, 4, None).await;
    bad.send_raw(&[0, 0, 0, 3, b'x', b'y', b'z']).await;
    bad.closed().await;
    // Silence: the hello timeout.
    let mut silent = TcpAgent::connect(tcp, &t.fingerprint).await.unwrap();
    let started = Instant::now();
    silent.closed().await;
    assert!(started.elapsed() < Duration::from_secs(5));
    // A flood of messages: the rate cap.
    let (mut flood, _, _) = join_tcp(&t, 5, None).await;
    for _ in 0..20 {
        flood.send(&ClientMessage::FullMapRequest).await;
    }
    flood.closed().await;

    // The good agent saw every join and still gets answers.
    for v in 2..=5 {
        assert_eq!(delta(&mut good).await.to_version, v);
    }
    good.send(&ClientMessage::FullMapRequest).await;
    let m = full_map(&mut good).await;
    assert_eq!((m.version, m.peers.len()), (5, 5));
    c.shutdown().await;
}

#[tokio::test]
async fn quic_and_tcp_connections_share_max_connections() {
    let dir = TempDir::new("tcp-max");
    let mut s = loopback_settings(dir.path());
    s.limits.max_connections = 1;
    let c = Coordinator::start(&s).await.unwrap();
    let t = token_for(&c, "prod", "100.64.0.0/24").await;
    let (quic, _, _) = join(&t, 1, None).await;
    assert!(
        TcpAgent::connect(addr_of(&t), &t.fingerprint)
            .await
            .is_err(),
        "no room left for a TCP connection"
    );
    quic.conn.close(0u32.into(), b"bye");
    // The slot is free once the QUIC session has ended.
    let started = Instant::now();
    let mut tcp = loop {
        if let Ok(a) = TcpAgent::connect(addr_of(&t), &t.fingerprint).await {
            break a;
        }
        assert!(started.elapsed() < WAIT, "the slot was never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(matches!(
        tcp.hello(node_hello(1, "wrong", 1)).await,
        ServerMessage::Refused { .. }
    ));
    c.shutdown().await;
}

/// Over TLS/TCP, grants come as relay records of the stream, checked as over QUIC.
#[tokio::test]
async fn grants_come_as_relay_records_over_tcp() {
    let dir = TempDir::new("tcp-grants");
    let ttl = Duration::from_secs(120);
    let c = crate::relay::start_with_relays(dir.path(), ttl).await;
    let t = token_for(&c, "prod", "100.64.0.0/24").await;
    let (mut a, _, _) = join_tcp(&t, 3, Some("a")).await;
    let f = a.frame(WAIT).await.expect("a grant record");
    crate::relay::check_grant(&[f], dir.path(), key(3), "prod", ttl);
    drop(a);
    c.shutdown().await;
}
