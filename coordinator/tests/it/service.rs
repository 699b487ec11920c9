//! The service in process, without sockets: many agents, one encoded delta per change, and a
//! clock the test moves.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use meshlink_coordinator::handlers::networks::CreateNetwork;
use meshlink_coordinator::handlers::tokens::CreateToken;
use meshlink_coordinator::handlers::ApiError;
use meshlink_coordinator::hub::Outbound;
use meshlink_coordinator::service::{Clock, Service, Session, SystemClock, WorkloadTiming};
use meshlink_coordinator::store::{SqlStore, UnixTime};

use crate::common::{join_hello, TempDir};

struct TestClock(AtomicI64);

/// A wall clock the test sets; monotonic time and sleeps are the system's (nothing here
/// depends on them).
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

async fn service(dir: &TempDir, clock: Arc<TestClock>, queue: usize) -> Service {
    service_with(dir, clock, queue, WorkloadTiming::default()).await
}

/// [`service`] with workload timings.
async fn service_with(
    dir: &TempDir,
    clock: Arc<TestClock>,
    queue: usize,
    timing: WorkloadTiming,
) -> Service {
    let store = SqlStore::open_sqlite(&dir.path().join("coordinator.db"))
        .await
        .unwrap();
    let s = Service::load_with(Arc::new(store), clock, queue, timing)
        .await
        .unwrap();
    s.create_network(CreateNetwork {
        name: "prod".into(),
        cidr: "100.64.0.0/16".into(),
        cidr6: None,
    })
    .await
    .unwrap();
    s
}

/// The secret of a join token of "prod" for any number of joins, valid forever.
async fn open_token(s: &Service) -> String {
    s.create_token(CreateToken {
        network: "prod".into(),
        tags: vec![],
        expires_in_secs: None,
        uses: None,
    })
    .await
    .unwrap()
    .1
}

fn remote() -> IpAddr {
    "198.18.3.3".parse().unwrap()
}

#[tokio::test]
async fn each_change_is_encoded_once_for_every_session() {
    const N: usize = 200;
    let dir = TempDir::new("svc-fanout");
    let clock = Arc::new(TestClock(AtomicI64::new(1_000)));
    let s = service(&dir, clock, 2 * N).await;
    let secret = open_token(&s).await;

    let started = Instant::now();
    let mut sessions: Vec<Session> = Vec::new();
    for i in 0..N {
        let mut hello = join_hello(&secret, 0, None);
        hello.public_key.0[1] = i as u8;
        hello.public_key.0[2] = (i >> 8) as u8;
        sessions.push(s.hello(&hello, remote()).await.unwrap());
    }
    let elapsed = started.elapsed();
    assert!(elapsed.as_secs() < 30, "{N} joins took {elapsed:?}");
    assert_eq!(s.hub().online_count("prod"), N);

    // The last join reached the N-1 earlier sessions as the very same bytes.
    let mut last_frames = Vec::new();
    for (i, session) in sessions.iter_mut().enumerate().take(N - 1) {
        let mut last = None;
        let mut count = 0;
        while let Ok(Outbound::Frame(f)) = session.attached.rx.try_recv() {
            last = Some(f);
            count += 1;
        }
        assert_eq!(count, N - 1 - i, "session {i} got one delta per later join");
        last_frames.push(last.unwrap());
    }
    assert!(last_frames
        .iter()
        .all(|f| meshlink_coordinator::hub::Frame::ptr_eq(f, &last_frames[0])));
    let full = s.hub().full_map("prod").unwrap();
    assert!(
        last_frames[0].len() * 20 < full.len(),
        "a delta is small next to the full map"
    );
}

#[tokio::test]
async fn token_expiry_follows_the_service_clock() {
    let dir = TempDir::new("svc-clock");
    let clock = Arc::new(TestClock(AtomicI64::new(1_000)));
    let s = service(&dir, clock.clone(), 16).await;
    let (t, secret) = s
        .create_token(CreateToken {
            network: "prod".into(),
            tags: vec![],
            expires_in_secs: Some(60),
            uses: None,
        })
        .await
        .unwrap();
    assert_eq!(t.expires_at, Some(1_060));
    s.hello(&join_hello(&secret, 1, None), remote())
        .await
        .unwrap();
    clock.0.store(1_060, Ordering::Relaxed);
    let e = s
        .hello(&join_hello(&secret, 2, None), remote())
        .await
        .unwrap_err();
    assert!(matches!(e, ApiError::Refused(_)), "{e}");
}

#[tokio::test]
async fn a_revoked_node_with_a_full_queue_still_learns_it_was_revoked() {
    let dir = TempDir::new("svc-revoke-full");
    let clock = Arc::new(TestClock(AtomicI64::new(1_000)));
    let s = service(&dir, clock, 1).await;
    let secret = open_token(&s).await;
    let mut a = s
        .hello(&join_hello(&secret, 1, None), remote())
        .await
        .unwrap();
    // b's join fills a's one-place queue.
    let _b = s
        .hello(&join_hello(&secret, 2, None), remote())
        .await
        .unwrap();
    s.revoke_node(&a.node.to_string(), None).await.unwrap();
    let mut got = Vec::new();
    while let Ok(out) = a.attached.rx.try_recv() {
        got.push(out);
    }
    let revoked = got.iter().any(|o| {
        matches!(o, Outbound::Frame(f) if std::str::from_utf8(&f[4..]).is_ok_and(|t| t.contains("\"revoked\"")))
    });
    assert!(revoked, "no Revoked frame reached the session: {got:?}");
    assert!(
        matches!(got.last(), Some(Outbound::Close(_))),
        "the session was not closed: {got:?}"
    );
}

/// A key whose shared secret with anyone is predictable (all zeros, or another point of small
/// order on Curve25519) is refused at join: no tunnel with it would be private.
#[tokio::test]
async fn joins_with_low_order_public_keys_are_refused() {
    let dir = TempDir::new("svc-weak-keys");
    let s = service(&dir, Arc::new(TestClock(AtomicI64::new(1_000))), 16).await;
    let secret = open_token(&s).await;
    let mut p_minus_1 = [0xff; 32];
    p_minus_1[0] = 0xec;
    p_minus_1[31] = 0x7f;
    let mut one = [0; 32];
    one[0] = 1;
    for weak in [[0; 32], one, p_minus_1] {
        let mut hello = join_hello(&secret, 1, None);
        hello.public_key.0 = weak;
        match s.hello(&hello, remote()).await {
            Err(ApiError::Invalid(m)) => assert!(m.contains("public key"), "{m}"),
            Err(e) => panic!("refused for another reason: {e}"),
            Ok(_) => panic!("a join with the low-order key {weak:02x?} was accepted"),
        }
    }
    // An ordinary key still joins.
    s.hello(&join_hello(&secret, 2, None), remote())
        .await
        .unwrap();
}

/// Being a failover candidate does not let a node take a workload whenever it likes: only
/// the nodes listed as allowed may claim it (issue 11 item 7).
#[tokio::test]
async fn a_standby_may_not_claim_unless_allowed() {
    use meshlink_coordinator::handlers::workloads::CreateWorkload;
    let dir = TempDir::new("svc-standby-claim");
    let s = service(&dir, Arc::new(TestClock(AtomicI64::new(1_000))), 16).await;
    let secret = open_token(&s).await;
    let standby = s
        .hello(&join_hello(&secret, 1, Some("vm-s")), remote())
        .await
        .unwrap();
    let allowed = s
        .hello(&join_hello(&secret, 2, Some("vm-a")), remote())
        .await
        .unwrap();
    s.create_workload(CreateWorkload {
        name: "chat".into(),
        network: "prod".into(),
        address: None,
        standby: vec!["vm-s".into()],
        allowed: vec!["vm-a".into()],
        tags: Vec::new(),
    })
    .await
    .unwrap();
    match s.claim(standby.node, remote(), "chat").await {
        Err(ApiError::Forbidden(m)) => assert!(m.contains("--allow"), "{m}"),
        other => panic!("a standby-only node claimed the workload: {other:?}"),
    }
    let o = s.claim(allowed.node, remote(), "chat").await.unwrap();
    assert_eq!(o.workload.holder, Some(allowed.node));
}

/// A deleted workload's address may go to a new workload at once, but the new one's first
/// holder answers for it only once the deleted one's holder has the deletion (or its lease
/// has surely run out): before, it was confirmed at once, and the churn soak saw both answer
/// for one address for up to 736 ms.
#[tokio::test]
async fn a_deleted_workloads_address_is_answered_for_anew_only_once_its_holder_let_go() {
    use meshlink_coordinator::handlers::workloads::CreateWorkload;
    let dir = TempDir::new("svc-freed-address");
    // A lease far longer than the test: only the acknowledgement can end the wait.
    let timing = WorkloadTiming {
        lease: std::time::Duration::from_secs(60),
        prepare_timeout: std::time::Duration::from_millis(10),
        ..WorkloadTiming::default()
    };
    let clock = Arc::new(TestClock(AtomicI64::new(1_000)));
    let s = service_with(&dir, clock, 16, timing).await;
    let secret = open_token(&s).await;
    let a = s
        .hello(&join_hello(&secret, 1, Some("vm-a")), remote())
        .await
        .unwrap();
    let b = s
        .hello(&join_hello(&secret, 2, Some("vm-b")), remote())
        .await
        .unwrap();
    let create = |name: &str, address| CreateWorkload {
        name: name.into(),
        network: "prod".into(),
        address,
        standby: vec![],
        allowed: vec!["vm-a".into(), "vm-b".into()],
        tags: Vec::new(),
    };
    let old = s.create_workload(create("old", None)).await.unwrap();
    s.claim(a.node, remote(), "old").await.unwrap();
    let confirmed = |node| {
        s.confirmed_for("prod", node)
            .iter()
            .map(|c| (c.workload, c.generation))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        confirmed(a.node),
        vec![(old.id, 1)],
        "a first holder answers at once"
    );

    s.delete_workload("prod", "old").await.unwrap();
    let deleted_at = s.hub().version("prod").unwrap();
    let new = s
        .create_workload(create("new", Some(old.address)))
        .await
        .unwrap();
    assert_eq!(new.address, old.address);
    s.claim(b.node, remote(), "new").await.unwrap();
    assert_eq!(
        confirmed(b.node),
        vec![],
        "vm-a may still answer for the address of the workload deleted under it"
    );
    // An acknowledgement of an earlier map changes nothing; of the deletion, ends the wait.
    s.acknowledged("prod", a.node, deleted_at - 1);
    assert_eq!(confirmed(b.node), vec![]);
    s.acknowledged("prod", a.node, deleted_at);
    assert_eq!(confirmed(b.node), vec![(new.id, 1)]);
}
