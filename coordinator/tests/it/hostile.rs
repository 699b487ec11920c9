//! What one enrolled node, or one source address, can make the coordinator do (issue 11 items
//! 1 and 2), over real QUIC (and TCP) on loopback: its endpoint changes reach the fleet paced
//! per node, across reconnects; a full map is sent at most once per version to a session;
//! connections that never say hello from one source do not lock out another; QUIC clients
//! prove their address with a Retry first.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshlink_proto::control::{ClientMessage, ServerMessage};
use meshlink_proto::NodeId;
use tokio::sync::watch;

use meshlink_coordinator::Coordinator;

use crate::common::{join_hello, loopback_settings, node_hello, start, Agent, TempDir, WAIT};
use crate::quic::{addr_of, delta, full_map, join, token_for, welcome};

/// The `k`th endpoint of the flood: all different.
fn endpoint(k: usize) -> SocketAddr {
    SocketAddr::from(([198, 18, (k / 250) as u8, (k % 250 + 1) as u8], 51820))
}

/// A node reporting 1,000 different endpoints, over 20 sessions (each a hello with new
/// endpoints and 49 `Endpoints` messages, within the per-session message cap), makes a few
/// deltas reach its peers, not 1,000; the last endpoints it reported still land.
#[tokio::test]
async fn endpoint_changes_are_paced_per_node_across_reconnects() {
    const ROUNDS: usize = 20;
    const PER_ROUND: usize = 50;
    let dir = TempDir::new("hostile-endpoints");
    let c = start(dir.path()).await;
    let t = token_for(&c, "prod", "100.64.0.0/24").await;
    let (mut watcher, _, _) = join(&t, 1, Some("watcher")).await;
    let (first, w, _) = join(&t, 2, Some("noisy")).await;
    let noisy: NodeId = w.node_id;
    let secret = w.node_secret.expect("a secret at join");
    assert_eq!(
        delta(&mut watcher).await.to_version,
        2,
        "the noisy node joined"
    );

    // The watcher counts the deltas that change the noisy node, and keeps its last endpoints.
    let (seen_tx, mut seen) = watch::channel((0usize, Vec::<SocketAddr>::new()));
    let counting = tokio::spawn(async move {
        let mut count = 0;
        while let Some(m) = watcher.recv().await {
            if let ServerMessage::Delta(d) = m {
                if let Some(p) = d.upsert.iter().find(|p| p.node_id == noisy) {
                    count += 1;
                    seen_tx.send_replace((count, p.endpoints.clone()));
                }
            }
        }
    });

    let started = Instant::now();
    let mut session = Some(first);
    let mut last = Vec::new();
    for round in 0..ROUNDS {
        let k0 = round * PER_ROUND;
        let mut agent = match session.take() {
            Some(mut a) => {
                last = vec![endpoint(k0)];
                a.send(&ClientMessage::Endpoints {
                    endpoints: last.clone(),
                })
                .await;
                a
            }
            None => {
                let mut a = Agent::connect(addr_of(&t), &t.fingerprint).await.unwrap();
                let mut hello = node_hello(noisy, &secret, 2);
                last = vec![endpoint(k0)];
                hello.endpoints = last.clone();
                welcome(a.hello(hello).await);
                full_map(&mut a).await;
                a
            }
        };
        for k in k0 + 1..k0 + PER_ROUND {
            last = vec![endpoint(k)];
            agent
                .send(&ClientMessage::Endpoints {
                    endpoints: last.clone(),
                })
                .await;
        }
        if round + 1 < ROUNDS {
            // Let the coordinator read them, then go: the next round is a new session.
            tokio::time::sleep(Duration::from_millis(20)).await;
            agent.conn.close(0u32.into(), b"again");
        } else {
            session = Some(agent);
        }
    }
    let flood = started.elapsed();

    // The last endpoints land (late: at the end of the node's window).
    let landed = tokio::time::timeout(WAIT, seen.wait_for(|(_, eps)| *eps == last))
        .await
        .is_ok_and(|r| r.is_ok());
    assert!(
        landed,
        "the last endpoints reported never reached the peer: {:?}",
        seen.borrow().1
    );
    let deltas = seen.borrow().0;
    let limits = &meshlink_coordinator::server::Limits::default();
    let windows = (started.elapsed().as_secs_f64() / limits.endpoint_interval.as_secs_f64()).ceil();
    let bound = limits.endpoint_burst as usize + windows as usize + 1;
    assert!(
        deltas <= bound,
        "{deltas} deltas for {} endpoint changes in {flood:?}: more than {bound}",
        ROUNDS * PER_ROUND
    );
    counting.abort();
    drop(session);
    c.shutdown().await;
}

/// A session gets the full map of one version once: the one after its welcome counts, asking
/// again at that version is answered by nothing, and a new version makes a request valid again.
#[tokio::test]
async fn a_full_map_is_sent_once_per_version_and_session() {
    let dir = TempDir::new("hostile-full-maps");
    let c = start(dir.path()).await;
    let t = token_for(&c, "prod", "100.64.0.0/24").await;
    let (mut a, _, m) = join(&t, 1, Some("a")).await;
    assert_eq!(m.version, 1);
    for _ in 0..3 {
        a.send(&ClientMessage::FullMapRequest).await;
    }
    let (_b, _, _) = join(&t, 2, Some("b")).await;
    assert_eq!(
        delta(&mut a).await.to_version,
        2,
        "no full map for the version the session already has"
    );
    for _ in 0..3 {
        a.send(&ClientMessage::FullMapRequest).await;
    }
    let m = full_map(&mut a).await;
    assert_eq!((m.version, m.peers.len()), (2, 2));
    let (_x, _, _) = join(&t, 3, Some("x")).await;
    assert_eq!(
        delta(&mut a).await.to_version,
        3,
        "one full map for version 2, however often asked"
    );
    a.send(&ClientMessage::FullMapRequest).await;
    assert_eq!(
        full_map(&mut a).await.version,
        3,
        "a new version: asked again"
    );
    c.shutdown().await;
}

/// A second source: another loopback address.
const OTHER_SOURCE: [u8; 4] = [127, 0, 0, 2];

/// Connections that never say hello, from one source, over QUIC and TCP at once, take as many
/// of the coordinator's connections as it lets one source hold before hello: a node from
/// another source still gets in.
#[tokio::test]
async fn silent_connections_from_one_source_do_not_lock_out_another() {
    const SILENT: usize = 24;
    let dir = TempDir::new("hostile-silent");
    let mut s = loopback_settings(dir.path());
    s.limits.max_connections = 2 * SILENT;
    let c = Coordinator::start(&s).await.unwrap();
    let t = token_for(&c, "prod", "100.64.0.0/24").await;
    let from = SocketAddr::from((OTHER_SOURCE, 0));
    let mut held = Vec::new();
    for _ in 0..SILENT {
        // Refused ones fail: what matters is what the source holds.
        if let Ok(a) = Agent::connect_from(from, addr_of(&t), &t.fingerprint).await {
            held.push(a);
        }
    }
    let tcp = c.tcp_addr().expect("on by default");
    let mut streams = Vec::new();
    for _ in 0..SILENT {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(from).unwrap();
        streams.push(socket.connect(tcp).await.unwrap());
    }
    // Let the listener take them all.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let joined = tokio::time::timeout(WAIT, async {
        let mut a = Agent::connect(addr_of(&t), &t.fingerprint).await?;
        match a.hello(join_hello(&t.secret, 1, Some("late"))).await {
            ServerMessage::Welcome(_) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .unwrap_or_else(|_| Err("timed out".into()));
    assert!(
        joined.is_ok(),
        "a node from another source was locked out by {} silent connections: {joined:?}",
        held.len() + streams.len()
    );
    assert!(
        Agent::connect_from(from, addr_of(&t), &t.fingerprint)
            .await
            .is_err(),
        "the silent source is at its cap"
    );
    drop((held, streams));
    c.shutdown().await;
}

/// A QUIC client's first Initial is answered with a Retry (its address is proved before the
/// coordinator keeps any state for it), and the client still connects and joins. Seen by a
/// UDP relay between the two that looks at the type of the coordinator's first packet.
#[tokio::test]
async fn quic_sources_are_validated_with_a_retry() {
    let dir = TempDir::new("hostile-retry");
    let c = start(dir.path()).await;
    let t = token_for(&c, "prod", "100.64.0.0/24").await;
    let server = addr_of(&t);
    let relay = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let upstream = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    upstream.connect(server).await.unwrap();
    let (first_tx, first) = tokio::sync::oneshot::channel::<u8>();
    let relaying = tokio::spawn(async move {
        let mut first_tx = Some(first_tx);
        let mut client = None;
        let (mut up, mut down) = (vec![0u8; 65536], vec![0u8; 65536]);
        loop {
            tokio::select! {
                r = relay.recv_from(&mut up) => {
                    let (n, from) = r.unwrap();
                    client = Some(from);
                    upstream.send(&up[..n]).await.unwrap();
                }
                r = upstream.recv(&mut down) => {
                    let n = r.unwrap();
                    if let Some(tx) = first_tx.take() {
                        let _ = tx.send(down[0]);
                    }
                    if let Some(to) = client {
                        relay.send_to(&down[..n], to).await.unwrap();
                    }
                }
            }
        }
    });
    let mut a = Agent::connect(relay_addr, &t.fingerprint)
        .await
        .expect("the client connects after the retry");
    let first = first.await.unwrap();
    // A long header (bit 7) of type Retry (bits 5-4 = 3, not masked by header protection).
    assert_eq!(
        (first & 0x80, (first & 0x30) >> 4),
        (0x80, 3),
        "the coordinator's first packet ({first:#04x}) is not a Retry"
    );
    assert!(matches!(
        a.hello(join_hello(&t.secret, 1, None)).await,
        ServerMessage::Welcome(_)
    ));
    relaying.abort();
    c.shutdown().await;
}
