//! The store itself, on both databases: the change log that lets coordinators sharing a
//! database follow each other, writers from two coordinators at once, and a schema from a
//! newer coordinator refused.

use std::sync::Arc;

use meshlink_coordinator::handlers::networks::{create_network, CreateNetwork};
use meshlink_coordinator::handlers::tokens::{create_token, CreateToken};
use meshlink_coordinator::handlers::workloads::{create_workload, CreateWorkload};
use meshlink_coordinator::handlers::Caller;
use meshlink_coordinator::store::{Backend, Change, LeaseClock, SqlStore, Store, StoreError};

use crate::common::{join_hello, TestDb};

async fn network(store: &dyn Store) {
    create_network(
        store,
        1000,
        &Caller::Admin,
        CreateNetwork {
            name: "prod".into(),
            cidr: "100.64.0.0/16".into(),
            cidr6: None,
        },
    )
    .await
    .unwrap();
    let req = CreateToken {
        network: "prod".into(),
        tags: vec![],
        expires_in_secs: None,
        uses: None,
    };
    create_token(store, 1000, &Caller::Admin, req, "tok")
        .await
        .unwrap();
}

async fn join(store: &dyn Store, key: u8) -> u64 {
    let j = meshlink_coordinator::handlers::nodes::join(
        store,
        1001,
        &Caller::Agent {
            remote: "198.18.5.5".parse().unwrap(),
        },
        &join_hello("tok", key, None),
        "tok",
        &format!("secret-{key}"),
    )
    .await
    .unwrap();
    j.version
}

async fn every_version_is_logged_in_order(db: &TestDb) {
    let store = db.open().await;
    network(&store).await;
    let v1 = join(&store, 1).await;
    let v2 = join(&store, 2).await;
    let (w, v3) = create_workload(
        &store,
        1002,
        &Caller::Admin,
        CreateWorkload {
            network: "prod".into(),
            name: "chat".into(),
            address: None,
            standby: vec![],
            allowed: vec![],
            tags: Vec::new(),
        },
    )
    .await
    .unwrap();
    assert_eq!((v1, v2, v3), (1, 2, 3));
    let log = store.changes_since("prod", 0, 100).await.unwrap();
    let versions: Vec<u64> = log.iter().map(|c| c.version).collect();
    assert_eq!(versions, vec![1, 2, 3]);
    assert!(matches!(log[0].change, Change::Node(_)));
    assert_eq!(log[2].change, Change::Workload(w.name.clone()));
    let after = store.changes_since("prod", 2, 100).await.unwrap();
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].version, 3);
    assert_eq!(store.changes_since("prod", 1, 1).await.unwrap().len(), 1);
    assert!(store
        .changes_since("other", 0, 100)
        .await
        .unwrap()
        .is_empty());
}

/// Two coordinators (two pools) writing at once: every version is taken exactly once and the
/// log has no gap.
async fn two_writers_share_one_version_sequence(db: &TestDb) {
    let a: Arc<dyn Store> = Arc::new(db.open().await);
    let b: Arc<dyn Store> = Arc::new(db.open().await);
    network(a.as_ref()).await;
    let mut tasks = Vec::new();
    for (i, store) in [a.clone(), b.clone()].into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut versions = Vec::new();
            for k in 0..20u8 {
                versions.push(join(store.as_ref(), 10 + k * 2 + u8::try_from(i).unwrap()).await);
            }
            versions
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    assert_eq!(all, (1..=40).collect::<Vec<u64>>());
    let log = b.changes_since("prod", 0, 1000).await.unwrap();
    assert_eq!(
        log.iter().map(|c| c.version).collect::<Vec<_>>(),
        (1..=40).collect::<Vec<u64>>()
    );
    assert_eq!(a.network("prod").await.unwrap().unwrap().version, 40);
}

/// A database a newer coordinator migrated is refused with an error that says so, and is
/// left as it was.
async fn a_newer_schema_is_refused(db: &TestDb) {
    let store = db.open().await;
    let backend = store.backend();
    store.close().await;
    let url = db.url();
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    let checksum = match backend {
        Backend::Sqlite => "x'00'",
        Backend::Postgres => "'\\x00'::bytea",
    };
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (9999, 'from the future', TRUE, {checksum}, 0)"
    )))
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    let e = match db.try_open().await {
        Ok(_) => panic!("a newer schema was accepted"),
        Err(e) => e,
    };
    assert!(
        matches!(e, StoreError::NewerSchema { found: 9999, .. }),
        "{e}"
    );
    assert!(
        e.to_string().contains("upgrade meshlink-coordinator"),
        "{e}"
    );
}

crate::on_both_stores!(
    every_version_is_logged_in_order,
    two_writers_share_one_version_sequence,
    a_newer_schema_is_refused,
);

#[tokio::test]
async fn an_unreachable_database_fails_at_once_with_one_line() {
    let dir = crate::common::TempDir::new("nodb");
    let url = format!(
        "postgres://postgres@localhost/meshlink?host={}",
        dir.path().display()
    );
    let started = std::time::Instant::now();
    let e = SqlStore::connect_postgres(&url).await.unwrap_err();
    let text = e.to_string();
    assert!(!text.contains('\n'), "{text}");
    assert!(matches!(e, StoreError::Database(_)), "{text}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}

/// Coordinators of one PostgreSQL store must share the certificate agents pin.
#[tokio::test]
async fn a_coordinator_with_another_identity_is_refused() {
    let Some(db) = TestDb::postgres() else {
        return;
    };
    let store = db.open().await;
    store.claim_identity(&"a".repeat(64)).await.unwrap();
    store.claim_identity(&"a".repeat(64)).await.unwrap();
    let e = store.claim_identity(&"b".repeat(64)).await.unwrap_err();
    assert!(matches!(e, StoreError::Conflict(_)), "{e}");
    assert!(e.to_string().contains("coordinator.crt"), "{e}");
}

/// Coordinators report themselves; one that stopped reporting shows down.
#[tokio::test]
async fn coordinators_report_themselves() {
    let Some(db) = TestDb::postgres() else {
        return;
    };
    let store = db.open().await;
    store
        .report_coordinator("198.18.1.10:7443", 2)
        .await
        .unwrap();
    store
        .report_coordinator("198.18.2.10:7443", 0)
        .await
        .unwrap();
    store
        .report_coordinator("198.18.1.10:7443", 3)
        .await
        .unwrap();
    let list = store.coordinators().await.unwrap();
    assert_eq!(
        list,
        vec![
            ("198.18.1.10:7443".to_string(), 3, true),
            ("198.18.2.10:7443".to_string(), 0, true)
        ]
    );
    let pool = sqlx::AnyPool::connect(&db.url()).await.unwrap();
    sqlx::query(
        "UPDATE coordinators SET seen_ms = seen_ms - 60000 WHERE address = '198.18.2.10:7443'",
    )
    .execute(&pool)
    .await
    .unwrap();
    let list = store.coordinators().await.unwrap();
    assert!(!list[1].2, "{list:?}");
}

/// A shared-lease store whose "now" is `now` (milliseconds), set by the test.
async fn lease_store(db: &TestDb) -> (SqlStore, Arc<std::sync::atomic::AtomicI64>) {
    let now = Arc::new(std::sync::atomic::AtomicI64::new(1_000_000));
    let read = now.clone();
    let store = db
        .open()
        .await
        .with_lease_clock(LeaseClock(Arc::new(move || {
            read.load(std::sync::atomic::Ordering::SeqCst)
        })));
    (store, now)
}

fn set(now: &std::sync::atomic::AtomicI64, ms: i64) {
    now.store(ms, std::sync::atomic::Ordering::SeqCst);
}

/// Two coordinators fence one holder (a failover and a move away from it while quiet, or two
/// such moves): the first to finish lifts its own fence only, and the holder stays fenced
/// until the other is lifted too.
#[tokio::test]
async fn a_fence_is_lifted_only_by_its_owner() {
    let Some(db) = TestDb::postgres() else {
        return;
    };
    let (store, now) = lease_store(&db).await;
    assert!(store.renew_lease(7, "prod").await.unwrap().renewed);
    set(&now, 1_005_000);
    let a = store.fence_lease(7, 1_000, 60_000).await.unwrap().unwrap();
    let b = store.fence_lease(7, 1_000, 60_000).await.unwrap().unwrap();
    assert_ne!(a.token, b.token);
    assert!(!store.renew_lease(7, "prod").await.unwrap().renewed);
    store.unfence_lease(&a).await.unwrap();
    assert!(
        !store.renew_lease(7, "prod").await.unwrap().renewed,
        "renewed while the second fence holds"
    );
    // Lifting a fence twice lifts nobody else's.
    store.unfence_lease(&a).await.unwrap();
    assert!(!store.renew_lease(7, "prod").await.unwrap().renewed);
    store.unfence_lease(&b).await.unwrap();
    assert!(store.renew_lease(7, "prod").await.unwrap().renewed);
    // Another node's fences are its own.
    set(&now, 1_010_000);
    let c = store.fence_lease(8, 1_000, 60_000).await.unwrap().unwrap();
    assert!(store.renew_lease(7, "prod").await.unwrap().renewed);
    assert!(!store.renew_lease(8, "prod").await.unwrap().renewed);
    store.unfence_lease(&c).await.unwrap();
    assert!(store.renew_lease(8, "prod").await.unwrap().renewed);
}

/// A fence lasts as long as its owner asks: past the wait for a long lease (600 s) to run
/// out, and not forever when its owner never lifts it.
#[tokio::test]
async fn a_fence_lasts_as_long_as_asked() {
    let Some(db) = TestDb::postgres() else {
        return;
    };
    let (store, now) = lease_store(&db).await;
    assert!(store.renew_lease(7, "prod").await.unwrap().renewed);
    set(&now, 1_010_000);
    let fence_ms = 600_000 + 100 + 500 + 10_000;
    let f = store.fence_lease(7, 5_000, fence_ms).await.unwrap();
    assert!(f.is_some());
    // The lease waited out, the destination prepared: still fenced.
    set(&now, 1_010_000 + 600_600);
    assert!(
        !store.renew_lease(7, "prod").await.unwrap().renewed,
        "the fence ended before the lease it waits out"
    );
    set(&now, 1_010_000 + i64::try_from(fence_ms).unwrap() - 1);
    assert!(!store.renew_lease(7, "prod").await.unwrap().renewed);
    // Never lifted (its owner died): it times out.
    set(&now, 1_010_000 + i64::try_from(fence_ms).unwrap() + 1);
    assert!(store.renew_lease(7, "prod").await.unwrap().renewed);
}

/// The fence reports how long before it the holder was last renewed, as the database saw it:
/// the wait for its lease to run out is counted from there.
#[tokio::test]
async fn a_fence_reports_the_last_renewal() {
    let Some(db) = TestDb::postgres() else {
        return;
    };
    let (store, now) = lease_store(&db).await;
    assert!(store.renew_lease(7, "prod").await.unwrap().renewed);
    set(&now, 1_003_000);
    // Renewed 3 s ago: not silent for 5 s.
    assert_eq!(store.fence_lease(7, 5_000, 60_000).await.unwrap(), None);
    assert!(store.renew_lease(7, "prod").await.unwrap().renewed);
    set(&now, 1_010_250);
    let f = store.fence_lease(7, 5_000, 60_000).await.unwrap().unwrap();
    assert_eq!((f.node, f.renewed_ago_ms), (7, 7_250));
    store.unfence_lease(&f).await.unwrap();
    // A node never renewed is fenced too, as silent since ever.
    let g = store.fence_lease(9, 5_000, 60_000).await.unwrap().unwrap();
    assert!(g.renewed_ago_ms >= 1_010_250, "{g:?}");
    assert!(!store.renew_lease(9, "prod").await.unwrap().renewed);
}

/// A renewal that waits for the lease row's lock (held by a fence being lifted, with a change
/// committed meanwhile) reports the network's version as of after the wait: the holder's lease
/// then counts only once its map has that change. Read in the renewal's own statement, the
/// version was the one of the snapshot the statement started with, from before the change.
#[tokio::test]
async fn a_renewal_that_waited_for_the_lease_row_reports_the_version_after_the_wait() {
    let Some(db) = TestDb::postgres() else {
        return;
    };
    let (store, _now) = lease_store(&db).await;
    network(&store).await;
    assert!(store.renew_lease(7, "prod").await.unwrap().renewed);
    let pool = sqlx::AnyPool::connect(&db.url()).await.unwrap();
    let version = |pool: sqlx::AnyPool| async move {
        sqlx::query_scalar::<_, i64>("SELECT version FROM networks WHERE name = 'prod'")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let before = version(pool.clone()).await;
    // Another coordinator holds the lease row (as lifting a fence does).
    let mut lock = pool.begin().await.unwrap();
    sqlx::query("SELECT node FROM leases WHERE node = 7 FOR UPDATE")
        .fetch_one(&mut *lock)
        .await
        .unwrap();
    let renewal = tokio::spawn({
        let store = store.clone();
        async move { store.renew_lease(7, "prod").await.unwrap() }
    });
    // The renewal is waiting for the row; a change commits meanwhile.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !renewal.is_finished(),
        "the renewal did not wait for the row"
    );
    sqlx::query("UPDATE networks SET version = version + 1 WHERE name = 'prod'")
        .execute(&pool)
        .await
        .unwrap();
    lock.commit().await.unwrap();
    let r = renewal.await.unwrap();
    assert!(r.renewed);
    assert_eq!(
        r.version as i64,
        before + 1,
        "the version of before the wait: a lease on a map without the change"
    );
}
