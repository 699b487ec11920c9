//! [`SqlStore`]: the [`Store`] on SQLite (embedded, WAL mode) or PostgreSQL, through sqlx's
//! `Any` driver, so that both run the same queries. Each backend has its own migrations,
//! compiled in (`coordinator/migrations/{sqlite,postgres}`), that build the same tables with
//! the same columns: text, 64-bit integers, 0/1 flags, JSON text for lists.
//!
//! Writers are serialized: SQLite's write lock (`BEGIN IMMEDIATE`), and on PostgreSQL one
//! transaction-scoped advisory lock, so several coordinators sharing a database commit one
//! change at a time and a read-then-write transaction never works on a stale snapshot.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};

use ipnet::Ipv6Net;
use std::path::Path;
use std::str::FromStr;
use std::sync::Once;
use std::time::Duration;

use meshlink_proto::{NodeId, PublicKey};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Executor, Row, Transaction};

use meshlink_proto::ipam::allocate_v4;

use super::{
    AddressChoice, AdminTokenRecord, AuditQuery, AuditRecord, Backend, Change, ChangeRecord,
    Expected, NetworkRecord, NewAdminToken, NewNetwork, NewNode, NewPolicy, NewToken, NewWorkload,
    NodeRecord, PolicyRecord, Store, StoreError, StoreFuture, TokenId, TokenRecord, UnixTime,
    WorkloadRecord, CHANGES_CHANNEL,
};

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// How long an SQLite connection waits for another writer before failing (milliseconds).
const SQLITE_BUSY_TIMEOUT_MS: u32 = 5_000;

/// How long a query waits for a free connection (and, at start, for the database at all).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// The advisory lock every PostgreSQL write transaction takes ("meshlink" in ASCII, folded).
const PG_WRITE_LOCK: i64 = 0x6d65_7368_6c69_6e6b;

/// How many versions of each network the change log keeps; a coordinator further behind
/// reloads the network's whole map instead.
pub const CHANGES_KEPT: u64 = 10_000;

const WORKLOAD_COLUMNS: &str = "id, network, name, address, holder, generation, previous, \
                                standby, allowed, tags, created_at, moved_at, \
                                (SELECT cidr6 FROM networks WHERE networks.name = workloads.network) \
                                AS cidr6";

const POLICY_COLUMNS: &str = "network, version, source, author, created_at, restored";

const NODE_COLUMNS: &str = "id, network, name, public_key, address, secret_hash, labels, tags, \
                            endpoints, observed, revoked, created_at, last_seen, next_key, \
                            key_since, rotation_asked, expired_at, via, \
                            (SELECT cidr6 FROM networks WHERE networks.name = nodes.network) \
                            AS cidr6";

const TOKEN_COLUMNS: &str =
    "id, secret_hash, network, tags, expires_at, max_uses, used, revoked, created_at";

/// The SQL [`Store`], on either backend.
#[derive(Debug, Clone)]
pub struct SqlStore {
    pool: AnyPool,
    backend: Backend,
    clock: Option<LeaseClock>,
}

/// A clock for the shared leases in place of the database's (a simulation's), in milliseconds.
#[derive(Clone)]
pub struct LeaseClock(pub std::sync::Arc<dyn Fn() -> i64 + Send + Sync>);

impl std::fmt::Debug for LeaseClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LeaseClock")
    }
}

fn install_drivers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(sqlx::any::install_default_drivers);
}

impl SqlStore {
    /// Opens (creating when missing) the SQLite database at `path` and brings its schema up
    /// to date.
    ///
    /// # Errors
    /// [`StoreError::Database`] when the file cannot be opened or a migration fails,
    /// [`StoreError::NewerSchema`] when the database was made by a newer coordinator.
    pub async fn open_sqlite(path: &Path) -> Result<Self, StoreError> {
        install_drivers();
        let text = path.to_str().ok_or_else(|| {
            StoreError::Corrupt(format!("{}: the path is not UTF-8", path.display()))
        })?;
        let url = format!(
            "sqlite://{}?mode=rwc",
            utf8_percent_encode(text, NON_ALPHANUMERIC)
        );
        let pool = AnyPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute(sqlx::AssertSqlSafe(format!(
                        "PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}; \
                         PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                         PRAGMA foreign_keys = ON;"
                    )))
                    .await?;
                    Ok(())
                })
            })
            .connect(&url)
            .await?;
        Self::migrate(pool, Backend::Sqlite).await
    }

    /// Connects to the PostgreSQL database at `url` (`postgres://USER@HOST[:PORT]/DB`, with
    /// `?host=/socket/dir` for a Unix socket) and brings its schema up to date. Several
    /// coordinators may share it.
    ///
    /// # Errors
    /// [`StoreError::Database`] when the database cannot be reached or a migration fails,
    /// [`StoreError::NewerSchema`] when the database was made by a newer coordinator.
    pub async fn connect_postgres(url: &str) -> Result<Self, StoreError> {
        install_drivers();
        // One connection first, so that a wrong URL fails with the database's own reason
        // ("connection refused", "password authentication failed") rather than the pool's
        // timeout.
        let first = tokio::time::timeout(
            ACQUIRE_TIMEOUT,
            <sqlx::AnyConnection as sqlx::Connection>::connect(url),
        )
        .await
        .map_err(|_| StoreError::Database(sqlx::Error::PoolTimedOut))??;
        sqlx::Connection::close(first).await?;
        let pool = AnyPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect(url)
            .await?;
        Self::migrate(pool, Backend::Postgres).await
    }

    async fn migrate(pool: AnyPool, backend: Backend) -> Result<Self, StoreError> {
        let migrator = match backend {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::Postgres => &POSTGRES_MIGRATIONS,
        };
        let known = migrator.iter().map(|m| m.version).max().unwrap_or(0);
        migrator.run(&pool).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::VersionMissing(v) => {
                StoreError::NewerSchema { found: v, known }
            }
            e => StoreError::Database(e.into()),
        })?;
        Ok(SqlStore {
            pool,
            backend,
            clock: None,
        })
    }

    pub(super) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// The same store with the shared leases' times taken from `clock` instead of the
    /// database's clock: for a simulation, whose time is its own.
    #[must_use]
    pub fn with_lease_clock(mut self, clock: LeaseClock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// SQL for "now" in milliseconds: the database's clock, or the lease clock's reading.
    pub(super) fn now_sql(&self) -> String {
        match &self.clock {
            Some(c) => format!("{}::BIGINT", (c.0)()),
            None => super::shared::NOW_MS.to_string(),
        }
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Waits for the connections to close; later calls fail.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// A transaction that holds the write lock from its start (see the module documentation).
    async fn write_tx(&self) -> Result<Transaction<'static, Any>, StoreError> {
        match self.backend {
            Backend::Sqlite => Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?),
            Backend::Postgres => {
                let mut tx = self.pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(PG_WRITE_LOCK)
                    .execute(&mut *tx)
                    .await?;
                Ok(tx)
            }
        }
    }

    /// Tells the coordinators listening that `network` changed, when the transaction commits.
    async fn notify_changed(
        &self,
        tx: &mut Transaction<'static, Any>,
        network: &str,
    ) -> Result<(), StoreError> {
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANGES_CHANNEL)
                .bind(network)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// Bumps a network's version, logs what changed at the new version, and returns it.
    async fn bump(
        &self,
        tx: &mut Transaction<'static, Any>,
        network: &str,
        change: &Change,
    ) -> Result<u64, StoreError> {
        let row = sqlx::query(
            "UPDATE networks SET version = version + 1 WHERE name = $1 RETURNING version",
        )
        .bind(network)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("network {network}")))?;
        let version = row.try_get::<i64, _>(0)?;
        let (kind, reference) = change.to_columns();
        sqlx::query("INSERT INTO changes (network, version, kind, ref) VALUES ($1, $2, $3, $4)")
            .bind(network)
            .bind(version)
            .bind(kind)
            .bind(reference)
            .execute(&mut **tx)
            .await?;
        let kept = i64::try_from(CHANGES_KEPT).unwrap_or(i64::MAX);
        sqlx::query("DELETE FROM changes WHERE network = $1 AND version <= $2")
            .bind(network)
            .bind(version - kept)
            .execute(&mut **tx)
            .await?;
        self.notify_changed(tx, network).await?;
        to_u64(version)
    }

    /// Applies an [`AddressChoice`] inside a write transaction: the addresses of the
    /// network's nodes (revoked ones included) and workloads are taken.
    async fn choose_address(
        tx: &mut Transaction<'static, Any>,
        network: &str,
        choice: AddressChoice,
    ) -> Result<Ipv4Addr, StoreError> {
        let rows = sqlx::query(
            "SELECT address FROM nodes WHERE network = $1 \
             UNION ALL SELECT address FROM workloads WHERE network = $1",
        )
        .bind(network)
        .fetch_all(&mut **tx)
        .await?;
        let used: BTreeSet<Ipv4Addr> = rows
            .iter()
            .map(|r| parse::<Ipv4Addr>(&r.try_get::<String, _>("address")?, "address"))
            .collect::<Result<_, _>>()?;
        match choice {
            AddressChoice::Exact(a) if used.contains(&a) => Err(StoreError::AddressTaken(a)),
            AddressChoice::Exact(a) => Ok(a),
            AddressChoice::LowestFree(cidr) => {
                allocate_v4(cidr, &used).ok_or(StoreError::NetworkFull)
            }
        }
    }

    /// A network's IPv6 prefix, if it has one.
    async fn network_cidr6(
        tx: &mut Transaction<'static, Any>,
        network: &str,
    ) -> Result<Option<Ipv6Net>, StoreError> {
        let row = sqlx::query("SELECT cidr6 FROM networks WHERE name = $1")
            .bind(network)
            .fetch_optional(&mut **tx)
            .await?;
        match row {
            Some(row) => cidr6_column(&row),
            None => Ok(None),
        }
    }

    async fn node_network(
        tx: &mut Transaction<'static, Any>,
        id: NodeId,
    ) -> Result<String, StoreError> {
        let row = sqlx::query("SELECT network FROM nodes WHERE id = $1")
            .bind(to_i64(id)?)
            .fetch_optional(&mut **tx)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("node {id}")))?;
        Ok(row.try_get("network")?)
    }
}

impl Store for SqlStore {
    fn create_network(&self, n: NewNetwork) -> StoreFuture<'_, NetworkRecord> {
        Box::pin(async move {
            let mut tx = self.write_tx().await?;
            sqlx::query(
                "INSERT INTO networks (name, cidr, version, created_at, cidr6) \
                 VALUES ($1, $2, 0, $3, $4)",
            )
            .bind(&n.name)
            .bind(n.cidr.to_string())
            .bind(n.created_at)
            .bind(n.cidr6.map(|c| c.to_string()))
            .execute(&mut *tx)
            .await
            .map_err(conflict)?;
            self.notify_changed(&mut tx, &n.name).await?;
            tx.commit().await?;
            Ok(NetworkRecord {
                name: n.name,
                cidr: n.cidr,
                cidr6: n.cidr6,
                version: 0,
                created_at: n.created_at,
            })
        })
    }

    fn networks(&self) -> StoreFuture<'_, Vec<NetworkRecord>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT name, cidr, cidr6, version, created_at FROM networks ORDER BY name",
            )
            .fetch_all(&self.pool)
            .await?;
            rows.iter().map(network_row).collect()
        })
    }

    fn network<'a>(&'a self, name: &'a str) -> StoreFuture<'a, Option<NetworkRecord>> {
        Box::pin(async move {
            let row = sqlx::query(
                "SELECT name, cidr, cidr6, version, created_at FROM networks WHERE name = $1",
            )
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
            row.as_ref().map(network_row).transpose()
        })
    }

    fn create_token(&self, t: NewToken) -> StoreFuture<'_, TokenRecord> {
        Box::pin(async move {
            let max_uses = t.max_uses.map(to_i64).transpose()?;
            let row = sqlx::query(
                "INSERT INTO join_tokens (secret_hash, network, tags, expires_at, max_uses, used, revoked, created_at) \
                 SELECT $1, name, $3, $4, $5, 0, 0, $6 FROM networks WHERE name = $2 RETURNING id",
            )
            .bind(&t.secret_hash)
            .bind(&t.network)
            .bind(to_json(&t.tags))
            .bind(t.expires_at)
            .bind(max_uses)
            .bind(t.created_at)
            .fetch_optional(&self.pool)
            .await
            .map_err(conflict)?
            .ok_or_else(|| StoreError::NotFound(format!("network {}", t.network)))?;
            Ok(TokenRecord {
                id: to_u64(row.try_get::<i64, _>("id")?)?,
                secret_hash: t.secret_hash,
                network: t.network,
                tags: t.tags,
                expires_at: t.expires_at,
                max_uses: t.max_uses,
                used: 0,
                revoked: false,
                created_at: t.created_at,
            })
        })
    }

    fn tokens(&self) -> StoreFuture<'_, Vec<TokenRecord>> {
        Box::pin(async move {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {TOKEN_COLUMNS} FROM join_tokens ORDER BY id"
            )))
            .fetch_all(&self.pool)
            .await?;
            rows.iter().map(token_row).collect()
        })
    }

    fn token_by_hash<'a>(&'a self, secret_hash: &'a str) -> StoreFuture<'a, Option<TokenRecord>> {
        Box::pin(async move {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {TOKEN_COLUMNS} FROM join_tokens WHERE secret_hash = $1"
            )))
            .bind(secret_hash)
            .fetch_optional(&self.pool)
            .await?;
            row.as_ref().map(token_row).transpose()
        })
    }

    fn revoke_token(&self, id: TokenId) -> StoreFuture<'_, bool> {
        Box::pin(async move {
            let done = sqlx::query("UPDATE join_tokens SET revoked = 1 WHERE id = $1")
                .bind(to_i64(id)?)
                .execute(&self.pool)
                .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    fn insert_node(
        &self,
        n: NewNode,
        token: Option<(TokenId, UnixTime)>,
    ) -> StoreFuture<'_, (NodeRecord, u64)> {
        Box::pin(async move {
            let mut tx = self.write_tx().await?;
            if let Some((token_id, now)) = token {
                let used = sqlx::query(
                    "UPDATE join_tokens SET used = used + 1 \
                     WHERE id = $1 AND revoked = 0 AND network = $2 \
                     AND (max_uses IS NULL OR used < max_uses) \
                     AND (expires_at IS NULL OR expires_at > $3)",
                )
                .bind(to_i64(token_id)?)
                .bind(&n.network)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                if used.rows_affected() != 1 {
                    return Err(StoreError::TokenUnusable);
                }
            }
            let address = Self::choose_address(&mut tx, &n.network, n.address).await?;
            let cidr6 = Self::network_cidr6(&mut tx, &n.network).await?;
            // Without a wanted name the node is inserted under an empty name (never a valid
            // name, and the transaction holds the write lock) and renamed once its id is known.
            let row = sqlx::query(
                "INSERT INTO nodes (network, name, public_key, address, secret_hash, labels, tags, \
                 endpoints, observed, revoked, created_at, last_seen, via) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 0, $10, $10, $11) RETURNING id",
            )
            .bind(&n.network)
            .bind(n.name.as_deref().unwrap_or(""))
            .bind(n.public_key.to_base64())
            .bind(address.to_string())
            .bind(&n.secret_hash)
            .bind(to_json(&n.labels))
            .bind(to_json(&n.tags))
            .bind(to_json(&n.endpoints))
            .bind(n.observed.map(|o| o.to_string()))
            .bind(n.created_at)
            .bind(n.via.map(to_i64).transpose()?)
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| conflict_at(e, address))?;
            let id = to_u64(row.try_get::<i64, _>("id")?)?;
            let name = match n.name {
                Some(name) => name,
                None => {
                    let mut chosen = None;
                    for attempt in 0..16u32 {
                        let candidate = if attempt == 0 {
                            format!("node-{id}")
                        } else {
                            format!("node-{id}-{attempt}")
                        };
                        let taken =
                            sqlx::query("SELECT 1 FROM nodes WHERE network = $1 AND name = $2")
                                .bind(&n.network)
                                .bind(&candidate)
                                .fetch_optional(&mut *tx)
                                .await?
                                .is_some();
                        if !taken {
                            chosen = Some(candidate);
                            break;
                        }
                    }
                    let name = chosen.ok_or_else(|| {
                        StoreError::Conflict(format!("no free default name for node {id}"))
                    })?;
                    sqlx::query("UPDATE nodes SET name = $1 WHERE id = $2")
                        .bind(&name)
                        .bind(to_i64(id)?)
                        .execute(&mut *tx)
                        .await?;
                    name
                }
            };
            let version = self.bump(&mut tx, &n.network, &Change::Node(id)).await?;
            tx.commit().await?;
            let record = NodeRecord {
                id,
                network: n.network,
                name,
                public_key: n.public_key,
                address,
                secret_hash: n.secret_hash,
                labels: n.labels,
                tags: n.tags,
                endpoints: n.endpoints,
                observed: n.observed,
                revoked: false,
                created_at: n.created_at,
                last_seen: Some(n.created_at),
                next_key: None,
                key_since: n.created_at,
                rotation_asked: None,
                expired_at: None,
                via: n.via,
                address6: None,
            }
            .with_cidr6(cidr6);
            Ok((record, version))
        })
    }

    fn nodes<'a>(&'a self, network: Option<&'a str>) -> StoreFuture<'a, Vec<NodeRecord>> {
        Box::pin(async move {
            let rows = match network {
                Some(network) => {
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "SELECT {NODE_COLUMNS} FROM nodes WHERE network = $1 ORDER BY id"
                    )))
                    .bind(network)
                    .fetch_all(&self.pool)
                    .await?
                }
                None => {
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "SELECT {NODE_COLUMNS} FROM nodes ORDER BY id"
                    )))
                    .fetch_all(&self.pool)
                    .await?
                }
            };
            rows.iter().map(node_row).collect()
        })
    }

    fn node(&self, id: NodeId) -> StoreFuture<'_, Option<NodeRecord>> {
        Box::pin(async move {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {NODE_COLUMNS} FROM nodes WHERE id = $1"
            )))
            .bind(to_i64(id)?)
            .fetch_optional(&self.pool)
            .await?;
            row.as_ref().map(node_row).transpose()
        })
    }

    fn nodes_named<'a>(&'a self, name: &'a str) -> StoreFuture<'a, Vec<NodeRecord>> {
        Box::pin(async move {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {NODE_COLUMNS} FROM nodes WHERE name = $1 ORDER BY id"
            )))
            .bind(name)
            .fetch_all(&self.pool)
            .await?;
            rows.iter().map(node_row).collect()
        })
    }

    fn node_with_key<'a>(
        &'a self,
        network: &'a str,
        key: &'a PublicKey,
    ) -> StoreFuture<'a, Option<NodeRecord>> {
        Box::pin(async move {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {NODE_COLUMNS} FROM nodes WHERE network = $1 \
                 AND (public_key = $2 OR next_key = $2) ORDER BY id LIMIT 1"
            )))
            .bind(network)
            .bind(key.to_base64())
            .fetch_optional(&self.pool)
            .await?;
            row.as_ref().map(node_row).transpose()
        })
    }

    fn set_endpoints(
        &self,
        id: NodeId,
        endpoints: Vec<SocketAddr>,
        observed: Option<SocketAddr>,
    ) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            let mut tx = self.write_tx().await?;
            let network = Self::node_network(&mut tx, id).await?;
            sqlx::query("UPDATE nodes SET endpoints = $1, observed = $2 WHERE id = $3")
                .bind(to_json(&endpoints))
                .bind(observed.map(|o| o.to_string()))
                .bind(to_i64(id)?)
                .execute(&mut *tx)
                .await?;
            let version = self.bump(&mut tx, &network, &Change::Node(id)).await?;
            tx.commit().await?;
            Ok(version)
        })
    }

    fn touch_node(&self, id: NodeId, now: UnixTime) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            sqlx::query("UPDATE nodes SET last_seen = $1 WHERE id = $2")
                .bind(now)
                .bind(to_i64(id)?)
                .execute(&self.pool)
                .await?;
            Ok(())
        })
    }

    fn revoke_node(&self, id: NodeId) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            let mut tx = self.write_tx().await?;
            let network = Self::node_network(&mut tx, id).await?;
            sqlx::query("UPDATE nodes SET revoked = 1 WHERE id = $1")
                .bind(to_i64(id)?)
                .execute(&mut *tx)
                .await?;
            let version = self.bump(&mut tx, &network, &Change::Node(id)).await?;
            tx.commit().await?;
            Ok(version)
        })
    }

    fn delete_node(&self, id: NodeId, bump: bool) -> StoreFuture<'_, Option<u64>> {
        Box::pin(async move {
            let mut tx = self.write_tx().await?;
            let network = Self::node_network(&mut tx, id).await?;
            sqlx::query("DELETE FROM nodes WHERE id = $1")
                .bind(to_i64(id)?)
                .execute(&mut *tx)
                .await?;
            let version = if bump {
                Some(self.bump(&mut tx, &network, &Change::Node(id)).await?)
            } else {
                None
            };
            tx.commit().await?;
            Ok(version)
        })
    }

    fn create_workload(&self, w: NewWorkload) -> StoreFuture<'_, (WorkloadRecord, u64)> {
        Box::pin(async move {
            let mut tx = self.write_tx().await?;
            let address = Self::choose_address(&mut tx, &w.network, w.address).await?;
            let cidr6 = Self::network_cidr6(&mut tx, &w.network).await?;
            let row = sqlx::query(
                "INSERT INTO workloads (network, name, address, holder, generation, previous, \
                 standby, allowed, tags, created_at, moved_at) \
                 VALUES ($1, $2, $3, NULL, 0, NULL, $4, $5, $6, $7, NULL) RETURNING id",
            )
            .bind(&w.network)
            .bind(&w.name)
            .bind(address.to_string())
            .bind(to_json(&w.standby))
            .bind(to_json(&w.allowed))
            .bind(to_json(&w.tags))
            .bind(w.created_at)
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| conflict_at(e, address))?;
            let id = to_u64(row.try_get::<i64, _>("id")?)?;
            let version = self
                .bump(&mut tx, &w.network, &Change::Workload(w.name.clone()))
                .await?;
            tx.commit().await?;
            Ok((
                WorkloadRecord {
                    id,
                    network: w.network,
                    name: w.name,
                    address,
                    holder: None,
                    generation: 0,
                    previous: None,
                    standby: w.standby,
                    allowed: w.allowed,
                    tags: w.tags,
                    created_at: w.created_at,
                    moved_at: None,
                    address6: None,
                }
                .with_cidr6(cidr6),
                version,
            ))
        })
    }

    fn workloads<'a>(&'a self, network: Option<&'a str>) -> StoreFuture<'a, Vec<WorkloadRecord>> {
        Box::pin(async move {
            let rows = match network {
                Some(n) => {
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "SELECT {WORKLOAD_COLUMNS} FROM workloads WHERE network = $1 ORDER BY id"
                    )))
                    .bind(n)
                    .fetch_all(&self.pool)
                    .await?
                }
                None => {
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "SELECT {WORKLOAD_COLUMNS} FROM workloads ORDER BY id"
                    )))
                    .fetch_all(&self.pool)
                    .await?
                }
            };
            rows.iter().map(workload_row).collect()
        })
    }

    fn workload<'a>(
        &'a self,
        network: &'a str,
        name: &'a str,
    ) -> StoreFuture<'a, Option<WorkloadRecord>> {
        Box::pin(workload_by_name(&self.pool, network, name))
    }

    fn set_holder<'a>(
        &'a self,
        network: &'a str,
        name: &'a str,
        holder: Option<NodeId>,
        expected: Expected,
        now: UnixTime,
    ) -> StoreFuture<'a, (WorkloadRecord, u64)> {
        Box::pin(async move {
            let mut tx = self.write_tx().await?;
            if let Some(h) = holder {
                // A node deleted or revoked since the move was planned cannot become holder.
                let ok = sqlx::query("SELECT 1 FROM nodes WHERE id = $1 AND revoked = 0")
                    .bind(to_i64(h)?)
                    .fetch_optional(&mut *tx)
                    .await?
                    .is_some();
                if !ok {
                    return Err(StoreError::NotFound(format!(
                        "node {h} (deleted or revoked)"
                    )));
                }
            }
            let done = sqlx::query(
                "UPDATE workloads SET previous = holder, holder = $1, \
                 generation = generation + 1, moved_at = $2 \
                 WHERE network = $3 AND name = $4 AND id = $5 AND generation = $6",
            )
            .bind(holder.map(to_i64).transpose()?)
            .bind(now)
            .bind(network)
            .bind(name)
            .bind(to_i64(expected.id)?)
            .bind(to_i64(expected.generation)?)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() != 1 {
                return match workload_by_name(&mut *tx, network, name).await? {
                    None => Err(StoreError::NotFound(format!("workload {name}"))),
                    Some(w) if w.id != expected.id => Err(StoreError::Conflict(format!(
                        "workload {name} was deleted and created again meanwhile"
                    ))),
                    Some(w) => Err(StoreError::Conflict(format!(
                        "workload {name} moved on to generation {} meanwhile",
                        w.generation
                    ))),
                };
            }
            let record = workload_by_name(&mut *tx, network, name)
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("workload {name}")))?;
            let version = self
                .bump(&mut tx, network, &Change::Workload(name.to_string()))
                .await?;
            tx.commit().await?;
            Ok((record, version))
        })
    }

    fn delete_workload<'a>(&'a self, network: &'a str, name: &'a str) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            let mut tx = self.write_tx().await?;
            let done = sqlx::query("DELETE FROM workloads WHERE network = $1 AND name = $2")
                .bind(network)
                .bind(name)
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() != 1 {
                return Err(StoreError::NotFound(format!("workload {name}")));
            }
            let version = self
                .bump(&mut tx, network, &Change::Workload(name.to_string()))
                .await?;
            tx.commit().await?;
            Ok(version)
        })
    }

    fn set_node_tags(&self, id: NodeId, tags: Vec<String>) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            let mut tx = self.write_tx().await?;
            let network = Self::node_network(&mut tx, id).await?;
            sqlx::query("UPDATE nodes SET tags = $1 WHERE id = $2")
                .bind(to_json(&tags))
                .bind(to_i64(id)?)
                .execute(&mut *tx)
                .await?;
            let version = self.bump(&mut tx, &network, &Change::Node(id)).await?;
            tx.commit().await?;
            Ok(version)
        })
    }

    fn set_workload_tags<'a>(
        &'a self,
        network: &'a str,
        name: &'a str,
        tags: Vec<String>,
    ) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            let mut tx = self.write_tx().await?;
            let done =
                sqlx::query("UPDATE workloads SET tags = $1 WHERE network = $2 AND name = $3")
                    .bind(to_json(&tags))
                    .bind(network)
                    .bind(name)
                    .execute(&mut *tx)
                    .await?;
            if done.rows_affected() != 1 {
                return Err(StoreError::NotFound(format!("workload {name}")));
            }
            let version = self
                .bump(&mut tx, network, &Change::Workload(name.to_string()))
                .await?;
            tx.commit().await?;
            Ok(version)
        })
    }

    fn put_policy(&self, p: NewPolicy) -> StoreFuture<'_, (PolicyRecord, u64)> {
        Box::pin(async move {
            let mut tx = self.write_tx().await?;
            let row = sqlx::query(
                "SELECT COALESCE(MAX(version), 0) AS latest FROM policies WHERE network = $1",
            )
            .bind(&p.network)
            .fetch_one(&mut *tx)
            .await?;
            let version = to_u64(row.try_get::<i64, _>("latest")?)? + 1;
            sqlx::query(
                "INSERT INTO policies (network, version, source, author, created_at, restored) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&p.network)
            .bind(to_i64(version)?)
            .bind(p.source.as_deref())
            .bind(&p.author)
            .bind(p.created_at)
            .bind(p.restored.map(to_i64).transpose()?)
            .execute(&mut *tx)
            .await
            .map_err(|e| match e {
                sqlx::Error::Database(db) if db.is_foreign_key_violation() => {
                    StoreError::NotFound(format!("network {}", p.network))
                }
                e => StoreError::Database(e),
            })?;
            let map_version = self.bump(&mut tx, &p.network, &Change::Policy).await?;
            tx.commit().await?;
            Ok((
                PolicyRecord {
                    network: p.network,
                    version,
                    source: p.source,
                    author: p.author,
                    created_at: p.created_at,
                    restored: p.restored,
                },
                map_version,
            ))
        })
    }

    fn policies<'a>(&'a self, network: &'a str) -> StoreFuture<'a, Vec<PolicyRecord>> {
        Box::pin(async move {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {POLICY_COLUMNS} FROM policies WHERE network = $1 ORDER BY version"
            )))
            .bind(network)
            .fetch_all(&self.pool)
            .await?;
            rows.iter().map(policy_row).collect()
        })
    }

    fn policy<'a>(&'a self, network: &'a str) -> StoreFuture<'a, Option<PolicyRecord>> {
        Box::pin(async move {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {POLICY_COLUMNS} FROM policies WHERE network = $1 \
                 ORDER BY version DESC LIMIT 1"
            )))
            .bind(network)
            .fetch_optional(&self.pool)
            .await?;
            row.as_ref().map(policy_row).transpose()
        })
    }

    fn create_admin_token(&self, token: NewAdminToken) -> StoreFuture<'_, AdminTokenRecord> {
        Box::pin(self.insert_admin_token(token))
    }

    fn admin_tokens(&self) -> StoreFuture<'_, Vec<AdminTokenRecord>> {
        Box::pin(self.list_admin_tokens())
    }

    fn admin_token_by_hash<'a>(
        &'a self,
        secret_hash: &'a str,
    ) -> StoreFuture<'a, Option<AdminTokenRecord>> {
        Box::pin(self.find_admin_token(secret_hash))
    }

    fn revoke_admin_token(&self, id: u64, now: UnixTime) -> StoreFuture<'_, bool> {
        Box::pin(self.revoke_admin(id, now))
    }

    fn record_audit(&self, entry: AuditRecord) -> StoreFuture<'_, ()> {
        Box::pin(self.insert_audit(entry))
    }

    fn audit(&self, query: AuditQuery) -> StoreFuture<'_, Vec<AuditRecord>> {
        Box::pin(self.query_audit(query))
    }

    fn prune_audit(&self, before: UnixTime, keep: u64) -> StoreFuture<'_, u64> {
        Box::pin(self.delete_old_audit(before, keep))
    }

    fn ask_rotation(&self, id: NodeId, at: Option<UnixTime>) -> StoreFuture<'_, bool> {
        Box::pin(async move {
            let done = sqlx::query("UPDATE nodes SET rotation_asked = $1 WHERE id = $2")
                .bind(at)
                .bind(to_i64(id)?)
                .execute(&self.pool)
                .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    fn set_next_key(&self, id: NodeId, key: PublicKey) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            let mut tx = self.write_tx().await?;
            let row = sqlx::query("SELECT network FROM nodes WHERE id = $1 AND revoked = 0")
                .bind(to_i64(id)?)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("node {id} (deleted or revoked)")))?;
            let network: String = row.try_get("network")?;
            let text = key.to_base64();
            // Checked under the write lock: no other writer can take the key in between.
            let taken = sqlx::query(
                "SELECT id FROM nodes WHERE network = $1 \
                 AND (public_key = $2 OR (next_key = $2 AND id <> $3))",
            )
            .bind(&network)
            .bind(&text)
            .bind(to_i64(id)?)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(r) = taken {
                let other = r.try_get::<i64, _>("id")?;
                return Err(StoreError::Conflict(format!(
                    "the key is already used by node {other} in network {network}"
                )));
            }
            sqlx::query("UPDATE nodes SET next_key = $1, rotation_asked = NULL WHERE id = $2")
                .bind(&text)
                .bind(to_i64(id)?)
                .execute(&mut *tx)
                .await
                .map_err(conflict)?;
            let version = self.bump(&mut tx, &network, &Change::Node(id)).await?;
            tx.commit().await?;
            Ok(version)
        })
    }

    fn promote_next_key(
        &self,
        id: NodeId,
        key: PublicKey,
        now: UnixTime,
    ) -> StoreFuture<'_, Option<u64>> {
        Box::pin(async move {
            let mut tx = self.write_tx().await?;
            let network = Self::node_network(&mut tx, id).await?;
            let done = sqlx::query(
                "UPDATE nodes SET public_key = next_key, next_key = NULL, key_since = $1 \
                 WHERE id = $2 AND next_key = $3",
            )
            .bind(now)
            .bind(to_i64(id)?)
            .bind(key.to_base64())
            .execute(&mut *tx)
            .await
            .map_err(conflict)?;
            if done.rows_affected() != 1 {
                return Ok(None);
            }
            let version = self.bump(&mut tx, &network, &Change::Node(id)).await?;
            tx.commit().await?;
            Ok(Some(version))
        })
    }

    fn expire_node(
        &self,
        id: NodeId,
        now: UnixTime,
        seen_before: UnixTime,
    ) -> StoreFuture<'_, Option<u64>> {
        Box::pin(async move {
            let mut tx = self.write_tx().await?;
            let done = sqlx::query(
                "UPDATE nodes SET revoked = 1, expired_at = $1 WHERE id = $2 AND revoked = 0 \
                 AND COALESCE(last_seen, created_at) < $3",
            )
            .bind(now)
            .bind(to_i64(id)?)
            .bind(seen_before)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() != 1 {
                return Ok(None);
            }
            let network = Self::node_network(&mut tx, id).await?;
            let version = self.bump(&mut tx, &network, &Change::Node(id)).await?;
            tx.commit().await?;
            Ok(Some(version))
        })
    }

    fn changes_since<'a>(
        &'a self,
        network: &'a str,
        after: u64,
        limit: u32,
    ) -> StoreFuture<'a, Vec<ChangeRecord>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT version, kind, ref FROM changes WHERE network = $1 AND version > $2 \
                 ORDER BY version LIMIT $3",
            )
            .bind(network)
            .bind(to_i64(after)?)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
            rows.iter()
                .map(|r| {
                    Ok(ChangeRecord {
                        version: to_u64(r.try_get("version")?)?,
                        change: Change::from_columns(
                            &r.try_get::<String, _>("kind")?,
                            &r.try_get::<String, _>("ref")?,
                        )?,
                    })
                })
                .collect()
        })
    }
}

/// The workload of a network with this name, on the pool or inside a transaction.
async fn workload_by_name<'e>(
    db: impl sqlx::Executor<'e, Database = Any>,
    network: &str,
    name: &str,
) -> Result<Option<WorkloadRecord>, StoreError> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {WORKLOAD_COLUMNS} FROM workloads WHERE network = $1 AND name = $2"
    )))
    .bind(network)
    .bind(name)
    .fetch_optional(db)
    .await?;
    row.as_ref().map(workload_row).transpose()
}

/// Maps a unique-constraint failure to [`StoreError::Conflict`], naming the columns.
pub(super) fn conflict(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            // PostgreSQL names the constraint (named like SQLite's message, see the
            // migrations); SQLite names the columns at the end of its message.
            let what = db
                .constraint()
                .unwrap_or_else(|| db.message().rsplit(':').next().unwrap_or("").trim())
                .to_string();
            StoreError::Conflict(format!("{what} already taken"))
        }
        _ => StoreError::Database(e),
    }
}

/// As [`conflict`], but a clash on the address is [`StoreError::AddressTaken`].
fn conflict_at(e: sqlx::Error, address: Ipv4Addr) -> StoreError {
    match conflict(e) {
        StoreError::Conflict(what) if what.contains(".address") => {
            StoreError::AddressTaken(address)
        }
        other => other,
    }
}

fn network_row(row: &AnyRow) -> Result<NetworkRecord, StoreError> {
    Ok(NetworkRecord {
        name: row.try_get("name")?,
        cidr: parse(&row.try_get::<String, _>("cidr")?, "cidr")?,
        cidr6: cidr6_column(row)?,
        version: to_u64(row.try_get("version")?)?,
        created_at: row.try_get("created_at")?,
    })
}

fn token_row(row: &AnyRow) -> Result<TokenRecord, StoreError> {
    Ok(TokenRecord {
        id: to_u64(row.try_get("id")?)?,
        secret_hash: row.try_get("secret_hash")?,
        network: row.try_get("network")?,
        tags: from_json(&row.try_get::<String, _>("tags")?, "tags")?,
        expires_at: row.try_get("expires_at")?,
        max_uses: row
            .try_get::<Option<i64>, _>("max_uses")?
            .map(to_u64)
            .transpose()?,
        used: to_u64(row.try_get("used")?)?,
        revoked: row.try_get::<i64, _>("revoked")? != 0,
        created_at: row.try_get("created_at")?,
    })
}

fn workload_row(row: &AnyRow) -> Result<WorkloadRecord, StoreError> {
    let opt_id = |col: &str| -> Result<Option<NodeId>, StoreError> {
        row.try_get::<Option<i64>, _>(col)?.map(to_u64).transpose()
    };
    Ok(WorkloadRecord {
        id: to_u64(row.try_get::<i64, _>("id")?)?,
        network: row.try_get("network")?,
        name: row.try_get("name")?,
        address: parse(&row.try_get::<String, _>("address")?, "workloads.address")?,
        holder: opt_id("holder")?,
        generation: to_u64(row.try_get::<i64, _>("generation")?)?,
        previous: opt_id("previous")?,
        standby: from_json(&row.try_get::<String, _>("standby")?, "workloads.standby")?,
        allowed: from_json(&row.try_get::<String, _>("allowed")?, "workloads.allowed")?,
        tags: from_json(&row.try_get::<String, _>("tags")?, "workloads.tags")?,
        created_at: row.try_get("created_at")?,
        moved_at: row.try_get("moved_at")?,
        address6: None,
    }
    .with_cidr6(cidr6_column(row)?))
}

/// The `cidr6` column of a row (a network's, or one joined to a node or workload).
fn cidr6_column(row: &AnyRow) -> Result<Option<Ipv6Net>, StoreError> {
    row.try_get::<Option<String>, _>("cidr6")?
        .map(|c| parse(&c, "networks.cidr6"))
        .transpose()
}

fn policy_row(row: &AnyRow) -> Result<PolicyRecord, StoreError> {
    Ok(PolicyRecord {
        network: row.try_get("network")?,
        version: to_u64(row.try_get("version")?)?,
        source: row.try_get("source")?,
        author: row.try_get("author")?,
        created_at: row.try_get("created_at")?,
        restored: row
            .try_get::<Option<i64>, _>("restored")?
            .map(to_u64)
            .transpose()?,
    })
}

fn node_row(row: &AnyRow) -> Result<NodeRecord, StoreError> {
    let observed: Option<String> = row.try_get("observed")?;
    Ok(NodeRecord {
        id: to_u64(row.try_get("id")?)?,
        network: row.try_get("network")?,
        name: row.try_get("name")?,
        public_key: parse::<PublicKey>(&row.try_get::<String, _>("public_key")?, "public_key")?,
        address: parse(&row.try_get::<String, _>("address")?, "address")?,
        secret_hash: row.try_get("secret_hash")?,
        labels: from_json::<BTreeMap<String, String>>(
            &row.try_get::<String, _>("labels")?,
            "labels",
        )?,
        tags: from_json(&row.try_get::<String, _>("tags")?, "tags")?,
        endpoints: from_json(&row.try_get::<String, _>("endpoints")?, "endpoints")?,
        observed: observed
            .as_deref()
            .map(|o| parse(o, "observed"))
            .transpose()?,
        revoked: row.try_get::<i64, _>("revoked")? != 0,
        created_at: row.try_get("created_at")?,
        last_seen: row.try_get("last_seen")?,
        next_key: row
            .try_get::<Option<String>, _>("next_key")?
            .map(|k| parse::<PublicKey>(&k, "next_key"))
            .transpose()?,
        key_since: row
            .try_get::<Option<i64>, _>("key_since")?
            .map_or_else(|| row.try_get("created_at"), Ok)?,
        rotation_asked: row.try_get("rotation_asked")?,
        expired_at: row.try_get("expired_at")?,
        via: row
            .try_get::<Option<i64>, _>("via")?
            .map(to_u64)
            .transpose()?,
        address6: None,
    }
    .with_cidr6(cidr6_column(row)?))
}

fn parse<T: FromStr>(text: &str, column: &str) -> Result<T, StoreError> {
    text.parse()
        .map_err(|_| StoreError::Corrupt(format!("column {column}: cannot parse {text:?}")))
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    // Strings, string maps and socket addresses always serialize.
    serde_json::to_string(value).unwrap_or_default()
}

fn from_json<T: serde::de::DeserializeOwned>(text: &str, column: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("column {column}: {e}")))
}

pub(super) fn to_u64(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("negative value {v}")))
}

pub(super) fn to_i64(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Corrupt(format!("value {v} out of range")))
}

#[cfg(test)]
mod tests {
    use ipnet::Ipv4Net;

    use super::*;

    #[test]
    fn ipv4net_round_trips_through_text() {
        let net: Ipv4Net = "100.64.0.0/10".parse().unwrap();
        assert_eq!(parse::<Ipv4Net>(&net.to_string(), "cidr").unwrap(), net);
        assert!(matches!(
            parse::<Ipv4Net>("nope", "cidr"),
            Err(StoreError::Corrupt(_))
        ));
    }
}
