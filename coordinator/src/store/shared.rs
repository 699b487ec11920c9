//! What the coordinators sharing one PostgreSQL store share beyond the records: the TLS
//! identity agents pin (one per mesh), which node has a session where, and workload leases.
//!
//! Leases: whichever coordinator a
//! holder's heartbeat reaches renews the lease in the database; one of them at a time (the
//! failover leader, holding a session-level advisory lock) reads every lease and decides
//! failovers, fencing a silent holder in the database first, so that no coordinator can
//! renew it while its workloads are given away (a move away from a quiet holder fences it
//! too). Each fence has an owner, who lifts only its own: a node is renewed again once none
//! of its fences holds. Times are the database's clock.

use sqlx::pool::PoolConnection;
use sqlx::{Any, Row};

use super::{Backend, SqlStore, StoreError};
use meshlink_proto::NodeId;

/// The database clock in milliseconds since the Unix epoch: the one clock every coordinator
/// sharing the database reads, whatever their hosts' clocks say.
pub(super) const NOW_MS: &str = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT";

/// The advisory lock the failover leader holds for as long as its connection lives.
const LEADER_LOCK: i64 = 0x6d6c_6c65_6164_6572;

/// How old a presence row may be and still count: three refreshes.
const PRESENCE_MS: i64 = 3_000;

/// A coordinator's claim to be the failover leader: the connection holding the lock.
#[derive(Debug, Default)]
pub struct Leadership {
    conn: Option<PoolConnection<Any>>,
}

/// A fence of [`SqlStore::fence_lease`], to be lifted by its owner alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseFence {
    /// The fenced node.
    pub node: NodeId,
    /// The fence's identity in the database.
    pub token: i64,
    /// How long before the fence the node's lease was last renewed, by any coordinator, in
    /// milliseconds of the database's clock (the age of a node never renewed is the epoch's).
    pub renewed_ago_ms: u64,
}

/// What a heartbeat did in the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Renewal {
    /// Whether the lease was renewed (`false`: the holder is fenced).
    pub renewed: bool,
    /// The network's version in the database at that moment.
    pub version: u64,
}

impl SqlStore {
    fn require_postgres(&self) -> Result<(), StoreError> {
        match self.backend() {
            Backend::Postgres => Ok(()),
            Backend::Sqlite => Err(StoreError::Corrupt(
                "shared leases need the PostgreSQL store".into(),
            )),
        }
    }

    /// A heartbeat of `node` (of `network`) arrived: renews its lease unless it is fenced.
    ///
    /// # Errors
    /// [`StoreError::Database`] when the database cannot be reached.
    pub async fn renew_lease(&self, node: NodeId, network: &str) -> Result<Renewal, StoreError> {
        self.require_postgres()?;
        let now = self.now_sql();
        let renewed = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO leases (node, heard_ms, fenced_until_ms) VALUES ($1, {now}, 0) \
             ON CONFLICT (node) DO UPDATE SET heard_ms = EXCLUDED.heard_ms \
             WHERE leases.fenced_until_ms < {now} RETURNING node"
        )))
        .bind(i64::try_from(node).unwrap_or(i64::MAX))
        .fetch_optional(self.pool())
        .await?
        .is_some();
        // Read after the renewal, in a statement of its own: a renewal that waited for a
        // fence to be lifted (the row's lock) would otherwise return the version of the
        // snapshot its statement started with, from before the change committed under that
        // fence, and the holder's lease would count on a map without it.
        let version = sqlx::query("SELECT version FROM networks WHERE name = $1")
            .bind(network)
            .fetch_optional(self.pool())
            .await?
            .map(|r| r.try_get::<i64, _>("version"))
            .transpose()?
            .and_then(|v| u64::try_from(v).ok())
            .unwrap_or(0);
        Ok(Renewal { renewed, version })
    }

    /// How long ago each node's lease was last renewed, by any coordinator.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn lease_ages(&self) -> Result<Vec<(NodeId, u64)>, StoreError> {
        self.require_postgres()?;
        let now = self.now_sql();
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT node, GREATEST({now} - heard_ms, 0) AS ago FROM leases"
        )))
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                let node = u64::try_from(r.try_get::<i64, _>("node")?)
                    .map_err(|_| StoreError::Corrupt("leases.node: negative".into()))?;
                let ago = u64::try_from(r.try_get::<i64, _>("ago")?).unwrap_or(0);
                Ok((node, ago))
            })
            .collect()
    }

    /// Fences `node` if no coordinator renewed its lease for `silent_ms`: from then on none
    /// renews it until this fence is lifted ([`SqlStore::unfence_lease`]) or `fence_ms` has
    /// passed, should the caller die half-way; the node stays fenced while any other fence of
    /// it holds. `None`: it was renewed meanwhile, so it is not silent after all.
    ///
    /// The fence and the renewal age it reports are decided under the lease row's lock, which
    /// renewals take too: no renewal recorded after the age was read can succeed.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn fence_lease(
        &self,
        node: NodeId,
        silent_ms: u64,
        fence_ms: u64,
    ) -> Result<Option<LeaseFence>, StoreError> {
        self.require_postgres()?;
        let now = self.now_sql();
        let id = i64::try_from(node).unwrap_or(i64::MAX);
        let mut tx = self.pool().begin().await?;
        // A node never renewed is fenced as well: its row is made (heard at 0) to be locked.
        sqlx::query(
            "INSERT INTO leases (node, heard_ms, fenced_until_ms) VALUES ($1, 0, 0) \
             ON CONFLICT (node) DO NOTHING",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT GREATEST({now} - heard_ms, 0) AS ago FROM leases WHERE node = $1 FOR UPDATE"
        )))
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        let ago = u64::try_from(row.try_get::<i64, _>("ago")?).unwrap_or(0);
        if ago <= silent_ms {
            tx.commit().await?;
            return Ok(None);
        }
        let fence_ms = i64::try_from(fence_ms).unwrap_or(i64::MAX / 2);
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO lease_fences (node, until_ms) VALUES ($1, {now} + $2) \
             RETURNING token, until_ms"
        )))
        .bind(id)
        .bind(fence_ms)
        .fetch_one(&mut *tx)
        .await?;
        let token = row.try_get::<i64, _>("token")?;
        let until = row.try_get::<i64, _>("until_ms")?;
        sqlx::query(
            "UPDATE leases SET fenced_until_ms = GREATEST(fenced_until_ms, $2) WHERE node = $1",
        )
        .bind(id)
        .bind(until)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(LeaseFence {
            node,
            token,
            renewed_ago_ms: ago,
        }))
    }

    /// Lifts `fence` (of [`SqlStore::fence_lease`]), and no other: the node is renewed again
    /// once none of its fences holds. Fences that timed out are cleared on the way.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn unfence_lease(&self, fence: &LeaseFence) -> Result<(), StoreError> {
        self.require_postgres()?;
        let now = self.now_sql();
        let id = i64::try_from(fence.node).unwrap_or(i64::MAX);
        let mut tx = self.pool().begin().await?;
        // The row's lock first: each statement after it sees every fence committed before.
        sqlx::query("SELECT node FROM leases WHERE node = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM lease_fences WHERE node = $1 AND (token = $2 OR until_ms < {now})"
        )))
        .bind(id)
        .bind(fence.token)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE leases SET fenced_until_ms = \
             COALESCE((SELECT MAX(until_ms) FROM lease_fences WHERE node = $1), 0) \
             WHERE node = $1",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Whether this coordinator is the failover leader: it holds the leader lock on a
    /// connection of its own (taking it when free), and that connection still answers. A
    /// coordinator that lost its connection lost the lock with it, and takes no decision.
    pub async fn lead(&self, l: &mut Leadership) -> bool {
        if self.backend() != Backend::Postgres {
            return true;
        }
        if let Some(conn) = l.conn.as_mut() {
            if sqlx::query("SELECT 1").execute(&mut **conn).await.is_ok() {
                return true;
            }
            l.conn = None;
            tracing::warn!("lost the failover leadership (database connection)");
        }
        let Ok(mut conn) = self.pool().acquire().await else {
            return false;
        };
        let got = sqlx::query("SELECT pg_try_advisory_lock($1) AS got")
            .bind(LEADER_LOCK)
            .fetch_one(&mut *conn)
            .await
            .and_then(|r| r.try_get::<bool, _>("got"))
            .unwrap_or(false);
        if got {
            tracing::info!("this coordinator now decides failovers");
            // The lock lives as long as this connection: it never goes back to the pool (where
            // another query would hold the lock unknowingly); dropping it closes it.
            conn.close_on_drop();
            l.conn = Some(conn);
        }
        got
    }

    /// `node` has a session with coordinator `me`.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn presence_attach(&self, node: NodeId, me: &str) -> Result<(), StoreError> {
        self.require_postgres()?;
        let now = self.now_sql();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO presence (node, coordinator, seen_ms) VALUES ($1, $2, {now}) \
             ON CONFLICT (node) DO UPDATE SET coordinator = $2, seen_ms = {now}"
        )))
        .bind(i64::try_from(node).unwrap_or(i64::MAX))
        .bind(me)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// `node`'s session with coordinator `me` ended (a newer one elsewhere is kept).
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn presence_detach(&self, node: NodeId, me: &str) -> Result<(), StoreError> {
        self.require_postgres()?;
        sqlx::query("DELETE FROM presence WHERE node = $1 AND coordinator = $2")
            .bind(i64::try_from(node).unwrap_or(i64::MAX))
            .bind(me)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Coordinator `me` still has these sessions: their rows are fresh again, and rows of
    /// `me` for other nodes go (sessions that ended while the database was away).
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn presence_refresh(&self, me: &str, nodes: &[NodeId]) -> Result<(), StoreError> {
        self.require_postgres()?;
        let now = self.now_sql();
        let list = serde_json::to_string(nodes).unwrap_or_else(|_| "[]".into());
        let mut tx = self.pool().begin().await?;
        sqlx::query(
            "DELETE FROM presence WHERE coordinator = $1 AND node NOT IN \
             (SELECT value::BIGINT FROM json_array_elements_text($2::json))",
        )
        .bind(me)
        .bind(&list)
        .execute(&mut *tx)
        .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO presence (node, coordinator, seen_ms) \
             SELECT value::BIGINT, $1, {now} FROM json_array_elements_text($2::json) \
             ON CONFLICT (node) DO UPDATE SET coordinator = $1, seen_ms = {now} \
             WHERE presence.coordinator = $1"
        )))
        .bind(me)
        .bind(&list)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The nodes with a live session on any coordinator.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn present(&self) -> Result<std::collections::HashSet<NodeId>, StoreError> {
        self.require_postgres()?;
        let now = self.now_sql();
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT node FROM presence WHERE seen_ms > {now} - {PRESENCE_MS}"
        )))
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                u64::try_from(r.try_get::<i64, _>("node")?)
                    .map_err(|_| StoreError::Corrupt("presence.node: negative".into()))
            })
            .collect()
    }

    /// Coordinator `address` is alive with `sessions` sessions.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn report_coordinator(
        &self,
        address: &str,
        sessions: usize,
    ) -> Result<(), StoreError> {
        self.require_postgres()?;
        let now = self.now_sql();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO coordinators (address, seen_ms, sessions) VALUES ($1, {now}, $2) \
             ON CONFLICT (address) DO UPDATE SET seen_ms = {now}, sessions = $2"
        )))
        .bind(address)
        .bind(i64::try_from(sessions).unwrap_or(i64::MAX))
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Every coordinator that reported itself: address, sessions, whether it reported in the
    /// last few seconds.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn coordinators(&self) -> Result<Vec<(String, u64, bool)>, StoreError> {
        self.require_postgres()?;
        let now = self.now_sql();
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT address, sessions, \
             CASE WHEN seen_ms > {now} - {PRESENCE_MS} THEN 1::BIGINT ELSE 0::BIGINT END \
             AS alive FROM coordinators ORDER BY address"
        )))
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get::<String, _>("address")?,
                    u64::try_from(r.try_get::<i64, _>("sessions")?).unwrap_or(0),
                    r.try_get::<i64, _>("alive")? != 0,
                ))
            })
            .collect()
    }

    /// Sends `payload` on notification `channel` to every coordinator listening.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn notify(&self, channel: &str, payload: &str) -> Result<(), StoreError> {
        self.require_postgres()?;
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(channel)
            .bind(payload)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Records `fingerprint` as the mesh's certificate when none is yet; refuses with
    /// [`StoreError::Conflict`] when another one is (a coordinator started with its own
    /// identity instead of the mesh's: agents pinning the mesh's would refuse it).
    ///
    /// # Errors
    /// As described, and [`StoreError::Database`].
    pub async fn claim_identity(&self, fingerprint: &str) -> Result<(), StoreError> {
        self.require_postgres()?;
        sqlx::query(
            "INSERT INTO mesh (key, value) VALUES ('fingerprint', $1) ON CONFLICT (key) DO NOTHING",
        )
        .bind(fingerprint)
        .execute(self.pool())
        .await?;
        let row = sqlx::query("SELECT value FROM mesh WHERE key = 'fingerprint'")
            .fetch_one(self.pool())
            .await?;
        let theirs: String = row.try_get("value")?;
        if theirs == fingerprint {
            Ok(())
        } else {
            Err(StoreError::Conflict(format!(
                "this coordinator's certificate (fingerprint {fingerprint}) is not the mesh's \
                 ({theirs}): copy coordinator.crt and coordinator.key from a coordinator of this \
                 mesh into the state directory (see meshlink-coordinator init)"
            )))
        }
    }
}
