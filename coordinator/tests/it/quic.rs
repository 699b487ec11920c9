//! QUIC tests on 127.0.0.1: agents join with tokens made through the admin API, receive maps
//! and deltas, get revoked, misbehave, and survive a coordinator restart.

use std::net::SocketAddr;
use std::time::Duration;

use meshlink_coordinator::server::close_code;
use meshlink_coordinator::Coordinator;
use meshlink_proto::control::{ClientMessage, Hello, ServerMessage, Welcome, COMPRESS_MIN};
use meshlink_proto::token::JoinToken;
use meshlink_proto::{Netmap, NetmapDelta, PolicyChange};
use serde_json::json;

use crate::common::{http, join_hello, loopback_settings, node_hello, start, Agent, TempDir};

/// Creates a network and returns a fresh join token for it, both through the admin API.
pub(crate) async fn token_for(c: &Coordinator, network: &str, cidr: &str) -> JoinToken {
    let t = c.admin_token().value.clone();
    let body = json!({"name": network, "cidr": cidr}).to_string();
    let (status, _) = http(
        c.admin_addr(),
        "POST",
        "/v1/networks",
        Some(&t),
        Some(&body),
    )
    .await;
    assert!(status == 201 || status == 409, "network: {status}");
    // Several nodes join with it, the tests take their time.
    let body =
        json!({"network": network, "uses": "unlimited", "expires_in_secs": "never"}).to_string();
    let (status, tok) = http(c.admin_addr(), "POST", "/v1/tokens", Some(&t), Some(&body)).await;
    assert_eq!(status, 201);
    JoinToken::decode(tok["token"].as_str().unwrap()).unwrap()
}

pub(crate) fn addr_of(t: &JoinToken) -> SocketAddr {
    t.coordinator.parse().unwrap()
}

pub(crate) fn welcome(m: ServerMessage) -> Welcome {
    match m {
        ServerMessage::Welcome(w) => w,
        other => panic!("expected a welcome, got {other:?}"),
    }
}

pub(crate) async fn full_map(a: &mut Agent) -> Netmap {
    match a.recv().await {
        Some(ServerMessage::FullMap(m)) => m,
        other => panic!("expected a full map, got {other:?}"),
    }
}

pub(crate) async fn delta(a: &mut Agent) -> NetmapDelta {
    match a.recv().await {
        Some(ServerMessage::Delta(d)) => d,
        other => panic!("expected a delta, got {other:?}"),
    }
}

/// Joins and reads the welcome and the full map.
pub(crate) async fn join(t: &JoinToken, key: u8, name: Option<&str>) -> (Agent, Welcome, Netmap) {
    let mut a = Agent::connect(addr_of(t), &t.fingerprint).await.unwrap();
    let w = welcome(a.hello(join_hello(&t.secret, key, name)).await);
    let m = full_map(&mut a).await;
    (a, w, m)
}

#[tokio::test]
async fn join_deltas_revocation_and_deletion() {
    let dir = TempDir::new("quic-flow");
    let c = start(dir.path()).await;
    let t = token_for(&c, "prod", "100.64.0.0/24").await;
    let admin = c.admin_token().value.clone();
    let admin = Some(admin.as_str());

    let (mut a, wa, ma) = join(&t, 1, Some("a")).await;
    assert_eq!(
        (wa.node_id, wa.name.as_str(), wa.network.as_str()),
        (1, "a", "prod")
    );
    assert_eq!(wa.addresses, vec!["100.64.0.1/24".parse().unwrap()]);
    assert_eq!(wa.network_cidr, "100.64.0.0/24".parse().unwrap());
    let a_secret = wa.node_secret.clone().expect("a secret at join");
    assert_eq!(ma.version, 1);
    assert_eq!(
        ma.peers[&1].addresses,
        vec!["100.64.0.1/32".parse().unwrap()]
    );
    assert_eq!(
        ma.peers[&1].labels.get("provider").map(String::as_str),
        Some("test")
    );

    let (mut b, wb, mb) = join(&t, 2, None).await;
    assert_eq!((wb.node_id, wb.name.as_str()), (2, "node-2"));
    assert_eq!((mb.version, mb.peers.len()), (2, 2));
    let d = delta(&mut a).await;
    assert_eq!((d.from_version, d.to_version, d.remove.len()), (1, 2, 0));
    assert_eq!(
        d.upsert.iter().map(|p| p.node_id).collect::<Vec<_>>(),
        vec![2]
    );

    let eps: Vec<SocketAddr> = vec![
        "198.18.0.2:51820".parse().unwrap(),
        "10.1.1.1:51820".parse().unwrap(),
    ];
    b.send(&ClientMessage::Endpoints {
        endpoints: eps.clone(),
    })
    .await;
    let d = delta(&mut a).await;
    assert_eq!((d.from_version, d.to_version), (2, 3));
    assert_eq!(d.upsert[0].endpoints, eps);
    assert_eq!(
        delta(&mut b).await.to_version,
        3,
        "the same delta reaches its subject"
    );
    b.send(&ClientMessage::Endpoints {
        endpoints: eps.clone(),
    })
    .await;

    a.send(&ClientMessage::FullMapRequest).await;
    let m = full_map(&mut a).await;
    assert_eq!(
        (m.version, m.peers.len()),
        (3, 2),
        "repeating endpoints changed nothing"
    );

    let (status, nodes) = http(c.admin_addr(), "GET", "/v1/nodes?network=prod", admin, None).await;
    assert_eq!(status, 200);
    let nodes = nodes.as_array().unwrap().clone();
    assert_eq!(nodes.len(), 2);
    let mut k: Vec<&String> = nodes[0].as_object().unwrap().keys().collect();
    k.sort();
    assert_eq!(
        k,
        [
            "address",
            "created_at",
            "endpoints",
            "id",
            "key_since",
            "labels",
            "last_seen",
            "name",
            "network",
            "online",
            "public_key",
            "revoked",
            "tags"
        ]
        .iter()
        .collect::<Vec<_>>()
    );
    assert_eq!(nodes[0]["address"], json!("100.64.0.1"));
    assert_eq!(nodes[0]["online"], json!(true));
    assert_eq!(
        nodes[1]["endpoints"],
        json!(["198.18.0.2:51820", "10.1.1.1:51820"])
    );
    let (status, one) = http(c.admin_addr(), "GET", "/v1/nodes/node-2", admin, None).await;
    assert_eq!((status, one["id"].as_u64()), (200, Some(2)));
    let (_, st) = http(c.admin_addr(), "GET", "/v1/status", admin, None).await;
    assert_eq!(
        (st["nodes"].as_u64(), st["online"].as_u64()),
        (Some(2), Some(2))
    );

    let (status, revoked) = http(c.admin_addr(), "POST", "/v1/nodes/a/revoke", admin, None).await;
    assert_eq!(status, 200, "{revoked}");
    assert_eq!(revoked["revoked"], json!(true));
    match a.recv().await {
        Some(ServerMessage::Revoked { reason }) => assert!(reason.contains("revoked"), "{reason}"),
        other => panic!("expected Revoked, got {other:?}"),
    }
    assert_eq!(a.closed_code().await, u64::from(close_code::REVOKED));
    let d = delta(&mut b).await;
    assert_eq!(
        (d.from_version, d.to_version, d.remove.clone()),
        (3, 4, vec![1])
    );

    let mut again = Agent::connect(addr_of(&t), &t.fingerprint).await.unwrap();
    match again.hello(node_hello(1, &a_secret, 1)).await {
        ServerMessage::Refused { reason } => assert!(reason.contains("revoked"), "{reason}"),
        other => panic!("expected Refused, got {other:?}"),
    }
    assert_eq!(again.closed_code().await, u64::from(close_code::REFUSED));

    let (status, _) = http(c.admin_addr(), "DELETE", "/v1/nodes/2", admin, None).await;
    assert_eq!(status, 204);
    assert!(matches!(
        b.recv().await,
        Some(ServerMessage::Revoked { .. })
    ));
    assert_eq!(b.closed_code().await, u64::from(close_code::REVOKED));
    let (_, st) = http(c.admin_addr(), "GET", "/v1/status", admin, None).await;
    assert_eq!(
        (st["nodes"].as_u64(), st["online"].as_u64()),
        (Some(0), Some(0))
    );
    c.shutdown().await;
}

#[tokio::test]
async fn bad_agents_lose_only_their_own_session() {
    let dir = TempDir::new("quic-bad");
    let c = start(dir.path()).await;
    let t = token_for(&c, "prod", "100.64.0.0/24").await;
    let (mut good, _, _) = join(&t, 1, Some("good")).await;

    // Malformed JSON after the hello.
    let (mut bad, _, _) = join(&t, 2, None).await;
    bad.send_raw(&[0, 0, 0, 3, b'x', b'y', b'z']).await;
    assert_eq!(bad.closed_code().await, u64::from(close_code::PROTOCOL));

    // An oversized length prefix before anything else.
    let mut big = Agent::connect(addr_of(&t), &t.fingerprint).await.unwrap();
    big.send_raw(&(1u32 << 20).to_be_bytes()).await;
    assert_eq!(big.closed_code().await, u64::from(close_code::PROTOCOL));

    // Something other than a hello first.
    let mut early = Agent::connect(addr_of(&t), &t.fingerprint).await.unwrap();
    early.send(&ClientMessage::FullMapRequest).await;
    assert_eq!(early.closed_code().await, u64::from(close_code::PROTOCOL));

    // A second hello.
    let (mut twice, _, _) = join(&t, 4, None).await;
    twice
        .send(&ClientMessage::Hello(join_hello(&t.secret, 5, None)))
        .await;
    assert_eq!(twice.closed_code().await, u64::from(close_code::PROTOCOL));

    // A wrong pin never gets a session.
    assert!(Agent::connect(addr_of(&t), &"00".repeat(32)).await.is_err());

    // The good agent saw the two joins and still gets answers.
    assert_eq!(delta(&mut good).await.to_version, 2);
    assert_eq!(delta(&mut good).await.to_version, 3);
    good.send(&ClientMessage::FullMapRequest).await;
    let m = full_map(&mut good).await;
    assert_eq!((m.version, m.peers.len()), (3, 3));
    c.shutdown().await;
}

#[tokio::test]
async fn silence_and_floods_are_cut_off() {
    let dir = TempDir::new("quic-limits");
    let mut s = loopback_settings(dir.path());
    s.limits.hello_timeout = Duration::from_secs(1);
    s.limits.message_rate = 1;
    s.limits.message_burst = 5;
    let c = Coordinator::start(&s).await.unwrap();
    let t = token_for(&c, "prod", "100.64.0.0/24").await;

    let silent = Agent::connect(addr_of(&t), &t.fingerprint).await.unwrap();
    let started = std::time::Instant::now();
    assert_eq!(
        silent.closed_code().await,
        u64::from(close_code::HELLO_TIMEOUT)
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    let (mut flood, _, _) = join(&t, 1, None).await;
    for _ in 0..20 {
        flood.send(&ClientMessage::FullMapRequest).await;
    }
    assert_eq!(
        flood.closed_code().await,
        u64::from(close_code::RATE_LIMITED)
    );
    c.shutdown().await;
}

#[tokio::test]
async fn a_new_session_replaces_the_old_one() {
    let dir = TempDir::new("quic-replace");
    let c = start(dir.path()).await;
    let t = token_for(&c, "prod", "100.64.0.0/24").await;
    let (old, w, _) = join(&t, 1, None).await;
    let mut new = Agent::connect(addr_of(&t), &t.fingerprint).await.unwrap();
    let w2 = welcome(
        new.hello(node_hello(w.node_id, w.node_secret.as_deref().unwrap(), 1))
            .await,
    );
    assert_eq!(
        (w2.node_id, w2.addresses.clone(), w2.node_secret.clone()),
        (w.node_id, w.addresses.clone(), None)
    );
    assert_eq!(old.closed_code().await, u64::from(close_code::REPLACED));
    let m = full_map(&mut new).await;
    assert_eq!(m.peers.len(), 1);
    assert!(
        c.service().hub().is_online("prod", w.node_id),
        "the replaced session does not detach the new one"
    );
    c.shutdown().await;
}

#[tokio::test]
async fn a_restart_keeps_identity_addresses_and_versions() {
    let dir = TempDir::new("quic-restart");
    let c = start(dir.path()).await;
    assert!(c.admin_token().created);
    let fingerprint = c.fingerprint().to_string();
    let admin = c.admin_token().value.clone();
    let t = token_for(&c, "prod", "100.64.0.0/24").await;
    let (a, _, _) = join(&t, 1, Some("a")).await;
    let (_b, wb, mb) = join(&t, 2, Some("b")).await;
    c.shutdown().await;
    assert_eq!(a.closed_code().await, u64::from(close_code::SHUTDOWN));

    let c = start(dir.path()).await;
    assert_eq!(c.fingerprint(), fingerprint);
    assert!(!c.admin_token().created);
    assert_eq!(c.admin_token().value, admin);
    let mut b = Agent::connect(c.quic_addr(), c.fingerprint())
        .await
        .unwrap();
    let w = welcome(
        b.hello(node_hello(
            wb.node_id,
            wb.node_secret.as_deref().unwrap(),
            2,
        ))
        .await,
    );
    assert_eq!(
        (w.node_id, w.addresses.clone()),
        (wb.node_id, vec!["100.64.0.2/24".parse().unwrap()])
    );
    let m = full_map(&mut b).await;
    assert!(m.version >= mb.version);
    assert_eq!(m.peers.len(), 2);

    // The token from before the restart still works, and the next address is the next one.
    let t2 = JoinToken {
        coordinator: c.quic_addr().to_string(),
        ..t
    };
    let (_c3, w3, _) = join(&t2, 3, None).await;
    assert_eq!(w3.addresses, vec!["100.64.0.3/24".parse().unwrap()]);
    assert_eq!(w3.node_id, 3);
    let d = delta(&mut b).await;
    assert_eq!(d.from_version, m.version);
    c.shutdown().await;
}

/// The workload messages over real QUIC: a holder's heartbeats are answered with leases; a
/// claim from an allowed node is prepared on that node's own session (`Prepare`, a heartbeat,
/// `Prepared`), committed, and answered; a claim from a node that is not allowed is refused.
#[tokio::test]
async fn heartbeats_claims_and_prepared_over_quic() {
    let dir = TempDir::new("quic-workloads");
    let c = start(dir.path()).await;
    let t = token_for(&c, "prod", "100.64.0.0/24").await;
    let admin = c.admin_token().value.clone();
    let (mut a, wa, _) = join(&t, 1, Some("a")).await;
    let (mut b, wb, _) = join(&t, 2, Some("b")).await;
    let (mut x, _, _) = join(&t, 3, Some("x")).await;
    let _ = delta(&mut a).await; // b joined
    let _ = delta(&mut a).await; // x joined
    let _ = delta(&mut b).await; // x joined
    let body = json!({"name": "chat", "network": "prod", "standby": ["b"], "allowed": ["a", "b"]});
    let (status, _) = http(
        c.admin_addr(),
        "POST",
        "/v1/workloads",
        Some(&admin),
        Some(&body.to_string()),
    )
    .await;
    assert_eq!(status, 201);
    let (status, moved) = http(
        c.admin_addr(),
        "POST",
        "/v1/workloads/chat/attach?network=prod",
        Some(&admin),
        Some(&json!({"node": "a"}).to_string()),
    )
    .await;
    assert_eq!(status, 200, "{moved}");
    // The destination was asked to prepare (it did not answer: the attach went ahead after
    // the preparation timeout); every node saw the creation and the attach.
    for (name, agent) in [("a", &mut a), ("b", &mut b), ("x", &mut x)] {
        let d = delta(agent).await; // created
        assert_eq!(d.upsert_workloads[0].holder, None);
        let mut next = agent.recv().await;
        if name == "a" {
            assert!(
                matches!(&next, Some(ServerMessage::Prepare { generation: 1, .. })),
                "{next:?}"
            );
            next = agent.recv().await;
        }
        match next {
            Some(ServerMessage::Delta(d)) => {
                assert_eq!(d.upsert_workloads[0].holder, Some(wa.node_id));
            }
            other => panic!("{name}: expected the attach, got {other:?}"),
        }
    }

    // The holder's heartbeat gets a lease at the map's version (after the unsolicited one,
    // seq 0, that confirmed the attach to it).
    a.send(&ClientMessage::Heartbeat {
        seq: 7,
        version: None,
    })
    .await;
    let mut answer = a.recv().await;
    while let Some(ServerMessage::Lease { seq: 0, .. }) = answer {
        answer = a.recv().await;
    }
    match answer {
        Some(ServerMessage::Lease {
            seq: 7,
            lease_ms,
            version,
            ..
        }) => {
            assert_eq!(lease_ms, 1500);
            assert_eq!(
                version, 5,
                "two joins after the first, a create and an attach"
            );
        }
        other => panic!("expected a lease, got {other:?}"),
    }

    // b claims it: the coordinator asks b to prepare, b heartbeats and reports ready, and the
    // change lands at generation 2.
    b.send(&ClientMessage::Claim {
        request: 1,
        workload: "chat".into(),
    })
    .await;
    match b.recv().await {
        Some(ServerMessage::Prepare {
            workload,
            generation,
            ..
        }) => assert_eq!((workload.as_str(), generation), ("chat", 2)),
        other => panic!("expected a prepare, got {other:?}"),
    }
    b.send(&ClientMessage::Heartbeat {
        seq: 1,
        version: None,
    })
    .await;
    assert!(matches!(
        b.recv().await,
        Some(ServerMessage::Lease { seq: 1, .. })
    ));
    b.send(&ClientMessage::Prepared {
        workload: "chat".into(),
        generation: 2,
    })
    .await;
    let mut answered = None;
    let mut moved = None;
    while answered.is_none() || moved.is_none() {
        match b.recv().await {
            Some(ServerMessage::ClaimResult {
                request: 1,
                generation,
                error,
            }) => answered = Some((generation, error)),
            Some(ServerMessage::Delta(d)) => moved = Some(d.upsert_workloads[0].clone()),
            other => panic!("expected the claim's result and its delta, got {other:?}"),
        }
    }
    assert_eq!(answered, Some((Some(2), None)));
    let w = moved.unwrap();
    assert_eq!(
        (w.holder, w.previous, w.generation),
        (Some(wb.node_id), Some(wa.node_id), 2)
    );
    // The old holder learns of the move.
    assert_eq!(
        delta(&mut a).await.upsert_workloads[0].holder,
        Some(wb.node_id)
    );

    // x is not an allowed holder: refused, nothing changes.
    x.send(&ClientMessage::Claim {
        request: 9,
        workload: "chat".into(),
    })
    .await;
    let _ = delta(&mut x).await; // the move to b
    match x.recv().await {
        Some(ServerMessage::ClaimResult {
            request: 9,
            generation: None,
            error: Some(e),
        }) => assert!(e.contains("not an allowed holder"), "{e}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    c.shutdown().await;
}

/// A large message goes compressed to an agent whose hello says it takes compressed records,
/// and as it was to one whose hello does not (it would refuse a compressed record as over the
/// size cap); both get the same message, and small ones go as they are to both.
#[tokio::test]
async fn large_messages_go_compressed_only_to_agents_that_take_them() {
    let dir = TempDir::new("quic-compression");
    let c = start(dir.path()).await;
    let t = token_for(&c, "prod", "100.64.0.0/24").await;
    let mut agents = Vec::new();
    for (key, compression) in [(1u8, true), (2, false)] {
        let mut a = Agent::connect(addr_of(&t), &t.fingerprint).await.unwrap();
        if compression {
            a.take_compression();
        }
        let hello = Hello {
            compression,
            ..join_hello(&t.secret, key, None)
        };
        welcome(a.hello(hello).await);
        full_map(&mut a).await;
        agents.push(a);
    }
    // The second join reached the first agent as a small delta, as it is: the delta's JSON.
    let before = agents[0].received;
    let d = delta(&mut agents[0]).await;
    let small = agents[0].received - before;
    assert_eq!(
        small,
        4 + serde_json::to_vec(&ServerMessage::Delta(d)).unwrap().len()
    );
    // 300 rules that concern every node: some 30 KB of JSON.
    let source: String = (0..300)
        .map(|i| {
            format!(
                "[[rule]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"tcp:{}\"]\n",
                1000 + i
            )
        })
        .collect();
    let admin = c.admin_token().value.clone();
    let body = json!({ "source": source }).to_string();
    let (status, _) = http(
        c.admin_addr(),
        "POST",
        "/v1/networks/prod/policy",
        Some(&admin),
        Some(&body),
    )
    .await;
    assert_eq!(status, 200);
    let mut got = Vec::new();
    for a in &mut agents {
        let before = a.received;
        let d = delta(a).await;
        let wire = a.received - before;
        let json = serde_json::to_vec(&ServerMessage::Delta(d.clone()))
            .unwrap()
            .len();
        assert!(json > 4 * COMPRESS_MIN, "{json}");
        got.push((d, wire, json));
    }
    let (new, old) = (&got[0], &got[1]);
    match (&new.0.policy, &old.0.policy) {
        (Some(PolicyChange::Set(a)), Some(PolicyChange::Set(b))) => {
            assert_eq!((a.rules.len(), a), (300, b));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(old.1, 4 + old.2, "the older agent gets the JSON as it is");
    assert!(
        new.1 * 4 < new.2,
        "compressed: {} bytes on the wire for {} of JSON",
        new.1,
        new.2
    );
    c.shutdown().await;
}
