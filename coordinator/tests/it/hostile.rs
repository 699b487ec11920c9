//! What one enrolled node, or one source address, can make the coordinator do (issue 11 items
//! 1 and 2), over real QUIC on loopback: its endpoint changes reach the fleet paced per node,
//! across reconnects; a full map is sent at most once per version to a session.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshlink_proto::control::{ClientMessage, ServerMessage};
use meshlink_proto::NodeId;
use tokio::sync::watch;

use crate::common::{node_hello, start, Agent, TempDir, WAIT};
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
