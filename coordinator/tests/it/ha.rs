//! Several coordinators sharing one PostgreSQL store, in process (real services, a real
//! private PostgreSQL cluster, the system clock): changes made through one reach the sessions
//! of the other, in order; leases renewed through either keep a holder; a silent holder is
//! failed over once, by one coordinator.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshlink_coordinator::dispatch::SessionRef;
use meshlink_coordinator::handlers::networks::CreateNetwork;
use meshlink_coordinator::handlers::tokens::CreateToken;
use meshlink_coordinator::handlers::workloads::CreateWorkload;
use meshlink_coordinator::hub::Outbound;
use meshlink_coordinator::service::{Service, Session, SystemClock, WorkloadTiming};
use meshlink_coordinator::store::SqlStore;
use meshlink_proto::control::{ClientMessage, ServerMessage};
use tokio::sync::watch;

use crate::common::{decode_frame, join_hello, TestDb};

fn remote() -> IpAddr {
    "198.18.3.3".parse().unwrap()
}

async fn coordinator(url: &str) -> (Arc<Service>, watch::Sender<bool>) {
    let store = SqlStore::connect_postgres(url).await.unwrap();
    let s = Arc::new(
        Service::load_with(
            Arc::new(store.clone()),
            Arc::new(SystemClock),
            256,
            WorkloadTiming::default(),
        )
        .await
        .unwrap(),
    );
    s.share_leases(store);
    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(meshlink_coordinator::follow::follow_postgres(
        s.clone(),
        url.to_string(),
        stop_rx,
    ));
    (s, stop)
}

/// Every message queued to a session so far.
fn drain(s: &mut Session) -> Vec<ServerMessage> {
    let mut out = Vec::new();
    while let Ok(Outbound::Frame(f)) = s.attached.rx.try_recv() {
        out.push(decode_frame(&f));
    }
    out
}

async fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !f() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    started.elapsed()
}

/// Two coordinators on the database at `url`, a network `prod` made through A and known to
/// B (notification, or the poll at the latest), and the secret of a join token made through
/// B; the senders stop each one's following.
async fn pair_with_network(
    url: &str,
) -> (
    Arc<Service>,
    watch::Sender<bool>,
    Arc<Service>,
    watch::Sender<bool>,
    String,
) {
    let (a, stop_a) = coordinator(url).await;
    let (b, stop_b) = coordinator(url).await;
    a.create_network(CreateNetwork {
        name: "prod".into(),
        cidr: "100.64.0.0/24".into(),
        cidr6: None,
    })
    .await
    .unwrap();
    until("B loads the network", Duration::from_secs(3), || {
        b.hub().version("prod").is_some()
    })
    .await;
    let (_, secret) = b
        .create_token(CreateToken {
            network: "prod".into(),
            tags: vec![],
            expires_in_secs: None,
            uses: None,
        })
        .await
        .unwrap();
    (a, stop_a, b, stop_b, secret)
}

#[tokio::test]
async fn two_coordinators_share_changes_and_leases() {
    let Some(TestDb::Postgres(url)) = TestDb::postgres() else {
        return;
    };
    let (a, stop_a, b, stop_b, secret) = pair_with_network(&url).await;

    // n1 joins through A; n2 and n3 through B; each sees the others, in version order.
    let mut n1 = a
        .hello(&join_hello(&secret, 1, Some("n1")), remote())
        .await
        .unwrap();
    let mut n2 = b
        .hello(&join_hello(&secret, 2, Some("n2")), remote())
        .await
        .unwrap();
    let _n3 = b
        .hello(&join_hello(&secret, 3, Some("n3")), remote())
        .await
        .unwrap();
    let took = until("A follows B's joins", Duration::from_secs(3), || {
        a.hub().version("prod") == Some(3)
    })
    .await;
    assert!(
        took < Duration::from_millis(500),
        "propagation took {took:?}"
    );
    let mut from = 1;
    for msg in drain(&mut n1) {
        if let ServerMessage::Delta(d) = msg {
            assert_eq!(d.from_version, from, "deltas in order, none skipped");
            from = d.to_version;
        }
    }
    assert_eq!(from, 3);
    assert_eq!(a.hub().map("prod").unwrap().peers.len(), 3);
    drain(&mut n2);

    // A workload made through B, moved to n1 through A (planned moves work anywhere).
    b.create_workload(CreateWorkload {
        network: "prod".into(),
        name: "chat".into(),
        address: None,
        standby: vec!["n2".into()],
        allowed: vec![],
        tags: Vec::new(),
    })
    .await
    .unwrap();
    until("A follows the workload", Duration::from_secs(3), || {
        a.hub().workload_generation("prod", "chat").is_some()
    })
    .await;
    // Moved to n1 through B, though n1's session is with A: B's Prepare reaches n1 through
    // A, and n1's Prepared reaches B back.
    let n1_id = n1.node;
    let answering = {
        let a = a.clone();
        tokio::spawn(async move {
            while let Some(out) = n1.attached.rx.recv().await {
                if let Outbound::Frame(f) = out {
                    if let ServerMessage::Prepare {
                        workload,
                        generation,
                        ..
                    } = decode_frame(&f)
                    {
                        a.prepared_here(n1.node, "prod", &workload, generation)
                            .await;
                    }
                }
            }
        })
    };
    let moved = b.move_workload("prod", "chat", Some("n1")).await.unwrap();
    assert_eq!(moved.workload.generation, 1);
    assert!(
        moved.prepared_in.is_some(),
        "the destination on another coordinator was asked to prepare and answered"
    );
    answering.abort();

    // Failover ticks on both, as both coordinators run them.
    let ticking = {
        let (a, b) = (a.clone(), b.clone());
        tokio::spawn(async move {
            loop {
                a.failover_tick().await;
                b.failover_tick().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    // n1 heartbeats through A for 2 s, then (A "died") through B for 2 s: it keeps the
    // workload all along, though each coordinator hears only half of it.
    for (svc, name) in [(&a, "A"), (&b, "B")] {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(2) {
            let lease = svc.heartbeat(n1_id, "prod").await.lease;
            assert!(!lease.is_zero(), "a lease refused through {name}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    let w = a.store().workload("prod", "chat").await.unwrap().unwrap();
    assert_eq!(
        (w.generation, w.holder),
        (1, Some(n1_id)),
        "no failover while the holder renews through either coordinator"
    );

    // n1 goes silent: one failover to n2, by one coordinator, within the lease and a tick.
    let silent = Instant::now();
    let took = until("failover to n2", Duration::from_secs(5), || {
        b.hub().workload_generation("prod", "chat").map(|(_, g)| g) == Some(2)
    })
    .await;
    let w = b.store().workload("prod", "chat").await.unwrap().unwrap();
    assert_eq!((w.generation, w.holder), (2, Some(n2.node)));
    assert!(
        took < Duration::from_secs(2),
        "failover took {:?}",
        silent.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        b.store()
            .workload("prod", "chat")
            .await
            .unwrap()
            .unwrap()
            .generation,
        2,
        "failed over exactly once"
    );
    // n1's heartbeats are answered again after the failover (it holds nothing now).
    let renewal = a.heartbeat(n1_id, "prod").await;
    assert!(!renewal.lease.is_zero());
    assert!(renewal.database >= Some(5), "{renewal:?}");
    assert_eq!(renewal.floor, renewal.database);

    ticking.abort();
    let _ = stop_a.send(true);
    let _ = stop_b.send(true);
}

/// A live migration asked of one coordinator while the holder's session is with the other:
/// the Handover reaches the holder through its coordinator and its answer comes back, before
/// the commit; a holder whose agent cannot take part is refused through the other coordinator
/// too, and nothing moves.
#[tokio::test]
async fn a_live_migration_through_another_coordinator() {
    let Some(TestDb::Postgres(url)) = TestDb::postgres() else {
        return;
    };
    let (a, stop_a, b, stop_b, secret) = pair_with_network(&url).await;
    // n1 (live migration: yes) on A, n2 (an older agent: no) on B.
    let hello = meshlink_proto::control::Hello {
        handover: true,
        ..join_hello(&secret, 1, Some("n1"))
    };
    let n1 = a.hello(&hello, remote()).await.unwrap();
    let n2 = b
        .hello(&join_hello(&secret, 2, Some("n2")), remote())
        .await
        .unwrap();
    let (n1_id, n2_id) = (n1.node, n2.node);
    a.create_workload(CreateWorkload {
        network: "prod".into(),
        name: "chat".into(),
        address: None,
        standby: vec![],
        allowed: vec![],
        tags: Vec::new(),
    })
    .await
    .unwrap();
    until("B follows the workload", Duration::from_secs(3), || {
        b.hub().workload_generation("prod", "chat").is_some()
    })
    .await;
    // Each node answers what its coordinator passes on: prepares, and (n1) handovers.
    let answer =
        |svc: Arc<Service>, mut session: Session, handovers: Arc<std::sync::Mutex<u32>>| {
            tokio::spawn(async move {
                while let Some(out) = session.attached.rx.recv().await {
                    let Outbound::Frame(f) = out else { continue };
                    match decode_frame(&f) {
                        ServerMessage::Prepare {
                            workload,
                            generation,
                            ..
                        } => {
                            svc.prepared_here(session.node, "prod", &workload, generation)
                                .await
                        }
                        ServerMessage::Handover {
                            workload,
                            generation,
                            attempt,
                            ..
                        } => {
                            *handovers.lock().unwrap() += 1;
                            // As the agent's message would come: through the session's
                            // dispatch.
                            let at = SessionRef {
                                node: session.node,
                                network: "prod",
                                remote: remote(),
                                serial: session.attached.serial,
                            };
                            let msg = ClientMessage::HandedOver {
                                workload,
                                generation,
                                attempt,
                                error: None,
                            };
                            svc.on_agent_message(at, msg).await.unwrap();
                        }
                        _ => {}
                    }
                }
            })
        };
    let handovers = Arc::new(std::sync::Mutex::new(0));
    let t1 = answer(a.clone(), n1, handovers.clone());
    let t2 = answer(b.clone(), n2, handovers.clone());
    a.move_workload("prod", "chat", Some("n1")).await.unwrap();
    until("B follows the attach", Duration::from_secs(3), || {
        b.hub().workload_generation("prod", "chat").map(|(_, g)| g) == Some(1)
    })
    .await;

    // Through B, whose sessions do not include n1, the holder.
    let moved = b.migrate_workload("prod", "chat", "n2").await.unwrap();
    assert_eq!(
        (moved.workload.generation, moved.workload.holder),
        (2, Some(n2_id))
    );
    assert!(moved.handed_over_in.is_some(), "{moved:?}");
    assert_eq!(
        *handovers.lock().unwrap(),
        1,
        "n1 was asked once, through A"
    );

    // Back through A: n2's agent (on B) cannot take part; B says so, and nothing moves.
    let refused = a.migrate_workload("prod", "chat", "n1").await.unwrap_err();
    assert!(refused.to_string().contains("too old"), "{refused}");
    let w = a.store().workload("prod", "chat").await.unwrap().unwrap();
    assert_eq!((w.generation, w.holder), (2, Some(n2_id)));
    let _ = n1_id;
    t1.abort();
    t2.abort();
    let _ = stop_a.send(true);
    let _ = stop_b.send(true);
}

/// PostgreSQL stops under a running coordinator: admin writes are refused with an error that
/// says so (nothing half-done), holders keep their leases, and once the database is back the
/// same writes succeed without a restart of the coordinator.
#[tokio::test]
async fn a_database_outage_refuses_writes_keeps_leases_and_heals() {
    use meshlink_coordinator::handlers::ApiError;
    use meshlink_tests::postgres::PgCluster;
    // A cluster of its own: stopping the shared one would break the other tests.
    let cluster = match PgCluster::start() {
        Ok(c) => c,
        Err(e) => {
            assert!(
                meshlink_tests::skipping_allowed(|k| std::env::var(k).ok()),
                "this test needs PostgreSQL, and CI=true forbids skipping it: {e}"
            );
            return;
        }
    };
    let url = cluster.create_database("outage").unwrap();
    let (a, stop) = coordinator(&url).await;
    a.create_network(CreateNetwork {
        name: "prod".into(),
        cidr: "100.64.0.0/24".into(),
        cidr6: None,
    })
    .await
    .unwrap();
    let token = || CreateToken {
        network: "prod".into(),
        tags: vec![],
        expires_in_secs: None,
        uses: None,
    };
    let (_, secret) = a.create_token(token()).await.unwrap();
    let n1 = a
        .hello(&join_hello(&secret, 1, Some("n1")), remote())
        .await
        .unwrap();

    // A renewal recorded before the outage.
    let before = a.heartbeat(n1.node, "prod").await;
    assert!(!before.lease.is_zero());
    assert!(before.database.is_some(), "{before:?}");
    cluster.stop().unwrap();
    let e = a.create_token(token()).await.unwrap_err();
    match &e {
        ApiError::Internal(inner) => assert!(inner.is_unavailable(), "{inner}"),
        other => panic!("{other}"),
    }
    assert!(
        e.public_message().contains("database is unavailable"),
        "{}",
        e.public_message()
    );
    let during = a.heartbeat(n1.node, "prod").await;
    assert!(
        !during.lease.is_zero(),
        "leases go on while the database is away"
    );
    assert!(
        during.lease <= WorkloadTiming::default().lease,
        "but no further than a lease after the last renewal the database recorded: {during:?}"
    );
    // And they count only on a map with every change that renewal saw in the database
    // (another coordinator's, which this one may not have followed).
    assert_eq!(
        (during.database, during.floor),
        (None, before.database),
        "{during:?}"
    );

    cluster.restart().unwrap();
    let started = Instant::now();
    loop {
        match a.create_token(token()).await {
            Ok(_) => break,
            Err(e) => assert!(
                started.elapsed() < Duration::from_secs(10),
                "writes did not resume: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop.send(true);
}
