//! Key rotation and node expiry: the handlers on both stores (time passed in), the service
//! with its sessions' queues and a clock the test moves (both stores), and one rotation
//! driven over QUIC through the admin API.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshlink_coordinator::dispatch::SessionRef;
use meshlink_coordinator::handlers::networks::{create_network, CreateNetwork};
use meshlink_coordinator::handlers::nodes::{
    announce_next_key, ask_rotation, authenticate, complete_rotation, expire, expires_at, join,
    list_nodes, netmap, rotation_due, HelloEndpoints, Joined,
};
use meshlink_coordinator::handlers::tokens::{create_token, CreateToken};
use meshlink_coordinator::handlers::{ApiError, Caller};
use meshlink_coordinator::hub::Outbound;
use meshlink_coordinator::keys::KeySettings;
use meshlink_coordinator::service::{Clock, Service, Session, SystemClock};
use meshlink_coordinator::store::{Store, UnixTime};
use meshlink_proto::control::{ClientMessage, ServerMessage};
use meshlink_proto::{NetmapDelta, PublicKey};
use serde_json::json;

use crate::common::{
    decode_frame, http, join_hello, key, node_hello, start, Agent, TempDir, TestDb,
};
use crate::quic::{addr_of, delta, full_map, join as quic_join, token_for, welcome};

const ADMIN: Caller = Caller::Admin;
const DAY: u64 = 86_400;

fn agent() -> Caller {
    Caller::Agent {
        remote: "198.18.5.5".parse().unwrap(),
    }
}

fn node_caller(id: u64) -> Caller {
    Caller::Node {
        id,
        remote: IpAddr::from([198, 18, 0, 1]),
    }
}

/// A network `prod` with nodes `a` (key 1) and `b` (key 2), joined at 1001.
async fn two_nodes(store: &dyn Store) -> (Joined, Joined) {
    create_network(
        store,
        1000,
        &ADMIN,
        CreateNetwork {
            name: "prod".into(),
            cidr: "100.64.0.0/24".into(),
            cidr6: None,
        },
    )
    .await
    .unwrap();
    let req = CreateToken {
        network: "prod".into(),
        tags: vec![],
        expires_in_secs: None,
        uses: Some(10),
    };
    create_token(store, 1000, &ADMIN, req, "tok").await.unwrap();
    let mut joined = Vec::new();
    for (k, name) in [(1, "a"), (2, "b")] {
        let hello = join_hello("tok", k, Some(name));
        let j = join(store, 1001, &agent(), &hello, "tok", &format!("s{k}"))
            .await
            .unwrap();
        joined.push(j);
    }
    let b = joined.pop().unwrap();
    (joined.pop().unwrap(), b)
}

async fn hello_with(store: &dyn Store, id: u64, k: u8, now: UnixTime) -> Result<(), ApiError> {
    authenticate(
        store,
        now,
        &agent(),
        &node_hello(id, &format!("s{id}"), k),
        id,
        &format!("s{id}"),
        HelloEndpoints::Record,
    )
    .await
    .map(drop)
}

async fn a_rotation_is_asked_announced_and_completed_by_a_hello(db: &TestDb) {
    let store = db.open().await;
    let (a, b) = two_nodes(&store).await;
    assert_eq!(a.node.key_since, 1001);
    assert_eq!((a.node.next_key, a.node.rotation_asked), (None, None));
    // Nobody asked: an announcement is ignored, the map stays.
    let c = announce_next_key(&store, &node_caller(a.node.id), key(11))
        .await
        .unwrap();
    assert_eq!((c.version, c.node.next_key), (None, None));

    let asked = ask_rotation(&store, &ADMIN, 2000, "a", None).await.unwrap();
    assert_eq!(asked.rotation_asked, Some(2000));
    assert_eq!(
        store.node(a.node.id).await.unwrap().unwrap().rotation_asked,
        Some(2000)
    );
    let c = announce_next_key(&store, &node_caller(a.node.id), key(11))
        .await
        .unwrap();
    let v = c.version.expect("the next key changes the map");
    assert!(v > b.version);
    assert_eq!(c.node.next_key, Some(key(11)));
    let stored = store.node(a.node.id).await.unwrap().unwrap();
    assert_eq!(
        (stored.next_key, stored.rotation_asked),
        (Some(key(11)), None)
    );
    // Every map shows both keys of a; the same key again changes nothing.
    let nodes = list_nodes(&store, &ADMIN, Some("prod")).await.unwrap();
    let m = netmap(v, &nodes, &[], None);
    assert_eq!(m.peers[&a.node.id].public_key, key(1));
    assert_eq!(m.peers[&a.node.id].next_key, Some(key(11)));
    assert_eq!(m.peers[&b.node.id].next_key, None);
    let again = announce_next_key(&store, &node_caller(a.node.id), key(11))
        .await
        .unwrap();
    assert_eq!(again.version, None);
    // The next key is taken in the network: nobody joins with it.
    assert_eq!(
        store
            .node_with_key("prod", &key(11))
            .await
            .unwrap()
            .map(|n| n.id),
        Some(a.node.id)
    );
    // Until the rotation completes either key says hello.
    hello_with(&store, a.node.id, 1, 2100).await.unwrap();
    hello_with(&store, a.node.id, 11, 2101).await.unwrap();
    let node = store.node(a.node.id).await.unwrap().unwrap();
    let old = complete_rotation(&store, &node, key(1), 2102)
        .await
        .unwrap();
    assert_eq!(
        old.version, None,
        "a hello with the old key completes nothing"
    );
    let done = complete_rotation(&store, &node, key(11), 2102)
        .await
        .unwrap();
    assert!(done.version.unwrap() > v);
    let node = store.node(a.node.id).await.unwrap().unwrap();
    assert_eq!(
        (node.public_key, node.next_key, node.key_since),
        (key(11), None, 2102)
    );
    let twice = complete_rotation(&store, &node, key(11), 2103)
        .await
        .unwrap();
    assert_eq!(twice.version, None);
    // The old key is no longer the node's: a hello with it is refused, naming the field.
    let e = hello_with(&store, a.node.id, 1, 2200).await.unwrap_err();
    assert!(
        matches!(&e, ApiError::Refused(m) if m.contains("public_key")),
        "{e}"
    );
    assert_eq!(store.node_with_key("prod", &key(1)).await.unwrap(), None);
}

async fn bad_next_keys_are_refused_naming_the_field(db: &TestDb) {
    let store = db.open().await;
    let (a, b) = two_nodes(&store).await;
    ask_rotation(&store, &ADMIN, 2000, "a", None).await.unwrap();
    let caller = node_caller(a.node.id);
    let e = announce_next_key(&store, &caller, PublicKey([0; 32]))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ApiError::Invalid(m) if m.starts_with("next_key")),
        "{e}"
    );
    let e = announce_next_key(&store, &caller, key(1))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ApiError::Invalid(m) if m.starts_with("next_key")),
        "{e}"
    );
    let e = announce_next_key(&store, &caller, key(2))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ApiError::Conflict(m) if m.starts_with("next_key")),
        "{e}"
    );
    // b's next key cannot be a's either.
    ask_rotation(&store, &ADMIN, 2000, "b", None).await.unwrap();
    announce_next_key(&store, &node_caller(b.node.id), key(22))
        .await
        .unwrap();
    let e = announce_next_key(&store, &caller, key(22))
        .await
        .unwrap_err();
    assert!(matches!(&e, ApiError::Conflict(_)), "{e}");
    // Only nodes announce keys; revoked nodes have none to rotate.
    let e = announce_next_key(&store, &ADMIN, key(33))
        .await
        .unwrap_err();
    assert!(matches!(e, ApiError::Forbidden(_)));
    meshlink_coordinator::handlers::nodes::revoke_node(&store, &ADMIN, "b", None)
        .await
        .unwrap();
    let e = ask_rotation(&store, &ADMIN, 2001, "b", None)
        .await
        .unwrap_err();
    assert!(matches!(e, ApiError::Refused(_)), "{e}");
    let e = ask_rotation(&store, &ADMIN, 2001, "nope", None)
        .await
        .unwrap_err();
    assert!(matches!(e, ApiError::NotFound(_)), "{e}");
    // A hello with a key that is neither is refused.
    let e = hello_with(&store, a.node.id, 44, 2100).await.unwrap_err();
    assert!(
        matches!(&e, ApiError::Refused(m) if m.contains("public_key")),
        "{e}"
    );
}

async fn the_schedule_and_expiry_follow_the_times(db: &TestDb) {
    let store = db.open().await;
    let (a, b) = two_nodes(&store).await;
    let every = Duration::from_secs(30 * DAY);
    let joined = 1001;
    let due_at = joined + (30 * DAY) as i64;
    assert!(!rotation_due(&a.node, every, due_at - 1));
    assert!(rotation_due(&a.node, every, due_at));
    let asked = ask_rotation(&store, &ADMIN, due_at, "a", None)
        .await
        .unwrap();
    assert!(!rotation_due(&asked, every, due_at + 1), "asked already");

    // Expiry counts from the last session's end, never for a node with a session.
    let week = Duration::from_secs(7 * DAY);
    let expiry = Some(week);
    let b_node = store.node(b.node.id).await.unwrap().unwrap();
    assert_eq!(b_node.last_seen, Some(joined));
    let at = joined + (7 * DAY) as i64;
    assert_eq!(expires_at(&b_node, expiry, false), Some(at));
    assert_eq!(expires_at(&b_node, expiry, true), None);
    assert_eq!(expires_at(&b_node, None, false), None);
    // Seen since (a session ended later): not expired by a stale reading.
    store.touch_node(b.node.id, joined + 100).await.unwrap();
    let stale = expire(&store, &b_node, week, at).await.unwrap();
    assert_eq!(stale.version, None);
    let b_node = store.node(b.node.id).await.unwrap().unwrap();
    let done = expire(&store, &b_node, week, at + 100).await.unwrap();
    assert!(done.version.is_some());
    let b_node = store.node(b.node.id).await.unwrap().unwrap();
    assert!(b_node.revoked);
    assert_eq!(b_node.expired_at, Some(at + 100));
    assert_eq!(expires_at(&b_node, expiry, false), None, "revoked");
    let nodes = list_nodes(&store, &ADMIN, Some("prod")).await.unwrap();
    assert!(!netmap(9, &nodes, &[], None).peers.contains_key(&b.node.id));
    let e = hello_with(&store, b.node.id, 2, at + 200)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ApiError::Refused(m) if m.contains("revoked")),
        "{e}"
    );
    let twice = expire(&store, &b_node, week, at + 300).await.unwrap();
    assert_eq!(twice.version, None);
}

struct TestClock(AtomicI64);

impl Clock for TestClock {
    fn now(&self) -> UnixTime {
        self.0.load(Ordering::Relaxed)
    }

    fn instant(&self) -> Instant {
        SystemClock.instant()
    }

    fn sleep_until(&self, at: Instant) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        SystemClock.sleep_until(at)
    }
}

fn remote() -> IpAddr {
    "198.18.3.3".parse().unwrap()
}

/// Everything queued for a session now, decoded.
fn queued(s: &mut Session) -> Vec<ServerMessage> {
    let mut out = Vec::new();
    while let Ok(Outbound::Frame(f)) = s.attached.rx.try_recv() {
        out.push(decode_frame(&f));
    }
    out
}

fn deltas(msgs: &[ServerMessage]) -> Vec<&NetmapDelta> {
    msgs.iter()
        .filter_map(|m| match m {
            ServerMessage::Delta(d) => Some(d),
            _ => None,
        })
        .collect()
}

async fn the_service_carries_a_rotation_from_request_to_completion(db: &TestDb) {
    let clock = Arc::new(TestClock(AtomicI64::new(1_000)));
    let s = Arc::new(
        Service::load(Arc::new(db.open().await), clock.clone(), 64)
            .await
            .unwrap(),
    );
    s.set_key_settings(KeySettings {
        grace: Duration::from_millis(700),
        ..KeySettings::default()
    });
    s.create_network(CreateNetwork {
        name: "prod".into(),
        cidr: "100.64.0.0/24".into(),
        cidr6: None,
    })
    .await
    .unwrap();
    let (_, secret) = s
        .create_token(CreateToken {
            network: "prod".into(),
            tags: vec![],
            expires_in_secs: None,
            uses: None,
        })
        .await
        .unwrap();
    let mut ha = join_hello(&secret, 1, Some("a"));
    ha.key_rotation = true;
    let mut a = s.hello(&ha, remote()).await.unwrap();
    let mut b = s
        .hello(&join_hello(&secret, 2, Some("b")), remote())
        .await
        .unwrap();
    queued(&mut a);
    queued(&mut b);

    // An operator asks: a's session (which rotates keys) is told at once, with the grace.
    let node = s.rotate_key("a", None).await.unwrap();
    assert_eq!(node.rotation_asked, Some(1_000));
    assert_eq!(
        queued(&mut a),
        vec![ServerMessage::RotateKey { grace_ms: 700 }]
    );
    // b's agent does not rotate: asked, it waits in the store, nothing is sent.
    s.rotate_key("b", None).await.unwrap();
    assert!(queued(&mut b).is_empty());

    // a announces its next key: one delta to every session with both keys.
    let from = SessionRef {
        node: a.node,
        network: "prod",
        remote: remote(),
        serial: a.attached.serial,
    };
    s.on_agent_message(
        from.clone(),
        ClientMessage::NextKey {
            public_key: key(11),
        },
    )
    .await
    .unwrap();
    let got = queued(&mut b);
    let d = deltas(&got);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].upsert[0].node_id, a.node);
    assert_eq!(
        (d[0].upsert[0].public_key, d[0].upsert[0].next_key),
        (key(1), Some(key(11)))
    );
    assert_eq!(deltas(&queued(&mut a)).len(), 1);
    // A bad key ends the session with an error naming the field.
    let e = s
        .on_agent_message(
            from,
            ClientMessage::NextKey {
                public_key: PublicKey([0; 32]),
            },
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("next_key"), "{e}");

    // a switches and says hello with the new key: the rotation completes, the old key goes.
    clock.0.store(1_050, Ordering::Relaxed);
    let mut again = ha.clone();
    again.auth = meshlink_proto::control::Auth::Node {
        node_id: a.node,
        secret: match decode_frame(&a.welcome) {
            ServerMessage::Welcome(w) => w.node_secret.unwrap(),
            other => panic!("{other:?}"),
        },
    };
    again.public_key = key(11);
    let mut a2 = s.hello(&again, remote()).await.unwrap();
    let got = queued(&mut b);
    let d = deltas(&got);
    assert_eq!(d.len(), 1, "{got:?}");
    assert_eq!(
        (d[0].upsert[0].public_key, d[0].upsert[0].next_key),
        (key(11), None)
    );
    assert!(queued(&mut a2)
        .iter()
        .all(|m| !matches!(m, ServerMessage::RotateKey { .. })));
    let rec = s.store().node(a.node).await.unwrap().unwrap();
    assert_eq!((rec.public_key, rec.key_since), (key(11), 1_050));
}

async fn the_tick_asks_on_schedule_and_expires_nodes_away(db: &TestDb) {
    let clock = Arc::new(TestClock(AtomicI64::new(1_000)));
    let s = Arc::new(
        Service::load(Arc::new(db.open().await), clock.clone(), 64)
            .await
            .unwrap(),
    );
    let mut settings = KeySettings {
        rotation: Some(Duration::from_secs(100)),
        node_expiry: Some(Duration::from_secs(500)),
        ..KeySettings::default()
    };
    settings.networks.insert("lab".into(), None);
    s.set_key_settings(settings);
    for (name, cidr) in [("prod", "100.64.0.0/24"), ("lab", "100.64.1.0/24")] {
        s.create_network(CreateNetwork {
            name: name.into(),
            cidr: cidr.into(),
            cidr6: None,
        })
        .await
        .unwrap();
    }
    let mut sessions = Vec::new();
    for (i, net) in [(1u8, "prod"), (2, "prod"), (3, "lab")] {
        let (_, secret) = s
            .create_token(CreateToken {
                network: net.into(),
                tags: vec![],
                expires_in_secs: None,
                uses: None,
            })
            .await
            .unwrap();
        let mut h = join_hello(&secret, i, None);
        h.key_rotation = true;
        sessions.push(s.hello(&h, remote()).await.unwrap());
    }
    for q in &mut sessions {
        queued(q);
    }
    // Node 2 goes away at 1,000.
    let gone = sessions.remove(1);
    s.session_closed("prod", gone.node, gone.attached.serial)
        .await;

    clock.0.store(1_099, Ordering::Relaxed);
    s.key_tick().await;
    assert!(queued(&mut sessions[0]).is_empty(), "not due yet");
    clock.0.store(1_100, Ordering::Relaxed);
    s.key_tick().await;
    assert_eq!(
        queued(&mut sessions[0]),
        vec![ServerMessage::RotateKey {
            grace_ms: meshlink_coordinator::keys::DEFAULT_GRACE.as_millis() as u64
        }]
    );
    assert!(queued(&mut sessions[1]).is_empty(), "lab has no schedule");
    // Asked once: the next tick sends nothing more.
    s.key_tick().await;
    assert!(queued(&mut sessions[0]).is_empty());
    let rec = s.store().node(gone.node).await.unwrap().unwrap();
    assert_eq!(
        rec.rotation_asked,
        Some(1_100),
        "asked in the store for later"
    );

    // Expiry: node 2, away since 1,000, expires at 1,500; the online nodes never.
    clock.0.store(1_499, Ordering::Relaxed);
    s.key_tick().await;
    assert!(!s.store().node(gone.node).await.unwrap().unwrap().revoked);
    clock.0.store(1_500, Ordering::Relaxed);
    s.key_tick().await;
    let rec = s.store().node(gone.node).await.unwrap().unwrap();
    assert!(rec.revoked);
    assert_eq!(rec.expired_at, Some(1_500));
    let got = queued(&mut sessions[0]);
    assert!(
        deltas(&got).iter().any(|d| d.remove == vec![gone.node]),
        "{got:?}"
    );
    for s_ in [&sessions[0], &sessions[1]] {
        let n = s.store().node(s_.node).await.unwrap().unwrap();
        assert!(!n.revoked, "a node with a session does not expire");
    }
    assert!(!s.hub().map("prod").unwrap().peers.contains_key(&gone.node));
}

crate::on_both_stores!(
    a_rotation_is_asked_announced_and_completed_by_a_hello,
    bad_next_keys_are_refused_naming_the_field,
    the_schedule_and_expiry_follow_the_times,
    the_service_carries_a_rotation_from_request_to_completion,
    the_tick_asks_on_schedule_and_expires_nodes_away,
);

/// Over QUIC, through the admin API: an agent is asked, announces, its peer sees both keys,
/// it says hello again with the new key, and `GET /v1/nodes` shows the key and no next key.
#[tokio::test]
async fn a_rotation_over_quic_through_the_admin_api() {
    let dir = TempDir::new("quic-rotate");
    let c = start(dir.path()).await;
    let t = token_for(&c, "prod", "100.64.0.0/24").await;
    let admin = c.admin_token().value.clone();
    let admin = Some(admin.as_str());

    let mut a = Agent::connect(addr_of(&t), &t.fingerprint).await.unwrap();
    let mut ha = join_hello(&t.secret, 1, Some("a"));
    ha.key_rotation = true;
    let wa = welcome(a.hello(ha.clone()).await);
    full_map(&mut a).await;
    let (mut b, _, _) = quic_join(&t, 2, Some("b")).await;
    delta(&mut a).await;

    let (status, node) = http(
        c.admin_addr(),
        "POST",
        "/v1/nodes/a/rotate-key",
        admin,
        None,
    )
    .await;
    assert_eq!(status, 200, "{node}");
    assert!(node["rotation_asked"].is_i64(), "{node}");
    let (status, _) = http(
        c.admin_addr(),
        "POST",
        "/v1/nodes/zz/rotate-key",
        admin,
        None,
    )
    .await;
    assert_eq!(status, 404);
    match a.recv().await {
        Some(ServerMessage::RotateKey { grace_ms }) => {
            assert_eq!(
                grace_ms,
                meshlink_coordinator::keys::DEFAULT_GRACE.as_millis() as u64
            )
        }
        other => panic!("expected a rotation, got {other:?}"),
    }
    a.send(&ClientMessage::NextKey {
        public_key: key(11),
    })
    .await;
    let d = delta(&mut b).await;
    assert_eq!(d.upsert[0].next_key, Some(key(11)));
    let (_, node) = http(c.admin_addr(), "GET", "/v1/nodes/a", admin, None).await;
    assert_eq!(node["next_key"], json!(key(11).to_base64()));
    assert!(node.get("rotation_asked").is_none(), "{node}");

    // The switch: a new session with the new key completes the rotation.
    let mut a2 = Agent::connect(addr_of(&t), &t.fingerprint).await.unwrap();
    let mut again = crate::common::node_hello(wa.node_id, &wa.node_secret.unwrap(), 11);
    again.key_rotation = true;
    again.endpoints = ha.endpoints.clone();
    welcome(a2.hello(again).await);
    let m = full_map(&mut a2).await;
    assert_eq!(
        m.peers[&wa.node_id].next_key,
        Some(key(11)),
        "as of the hello"
    );
    let d = delta(&mut b).await;
    assert_eq!(
        (d.upsert[0].public_key, d.upsert[0].next_key),
        (key(11), None)
    );
    let (_, node) = http(c.admin_addr(), "GET", "/v1/nodes/a", admin, None).await;
    assert_eq!(node["public_key"], json!(key(11).to_base64()));
    assert!(node.get("next_key").is_none(), "{node}");
    drop(a);
}
