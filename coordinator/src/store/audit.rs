//! Admin tokens and the audit log in the SQL store: the queries behind the [`Store`] methods
//! of the same names.
//!
//! [`Store`]: super::Store

use sqlx::any::AnyRow;
use sqlx::Row;

use super::sql::{conflict, to_i64, to_u64};
use super::{
    AdminTokenRecord, AuditQuery, AuditRecord, NewAdminToken, SqlStore, StoreError, UnixTime,
};

const TOKEN_COLUMNS: &str =
    "id, name, secret_hash, role, network, created_at, created_by, revoked_at";

const AUDIT_COLUMNS: &str = "id, at, actor, action, network, node, status, result, source";

impl SqlStore {
    pub(super) async fn insert_admin_token(
        &self,
        t: NewAdminToken,
    ) -> Result<AdminTokenRecord, StoreError> {
        let row = sqlx::query(
            "INSERT INTO admin_tokens (name, secret_hash, role, network, created_at, created_by) \
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        )
        .bind(&t.name)
        .bind(&t.secret_hash)
        .bind(t.role.as_str())
        .bind(t.network.as_deref())
        .bind(t.created_at)
        .bind(&t.created_by)
        .fetch_one(self.pool())
        .await
        .map_err(conflict)?;
        Ok(AdminTokenRecord {
            id: to_u64(row.try_get("id")?)?,
            name: t.name,
            secret_hash: t.secret_hash,
            role: t.role,
            network: t.network,
            created_at: t.created_at,
            created_by: t.created_by,
            revoked_at: None,
        })
    }

    pub(super) async fn list_admin_tokens(&self) -> Result<Vec<AdminTokenRecord>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {TOKEN_COLUMNS} FROM admin_tokens ORDER BY id"
        )))
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(token_row).collect()
    }

    pub(super) async fn find_admin_token(
        &self,
        secret_hash: &str,
    ) -> Result<Option<AdminTokenRecord>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {TOKEN_COLUMNS} FROM admin_tokens WHERE secret_hash = $1"
        )))
        .bind(secret_hash)
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(token_row).transpose()
    }

    pub(super) async fn revoke_admin(&self, id: u64, now: UnixTime) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE admin_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(to_i64(id)?)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub(super) async fn insert_audit(&self, e: AuditRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO audit (at, actor, action, network, node, status, result, source) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(e.at)
        .bind(&e.actor)
        .bind(&e.action)
        .bind(e.network.as_deref())
        .bind(e.node.as_deref())
        .bind(i64::from(e.status))
        .bind(&e.result)
        .bind(e.source.as_deref())
        .execute(self.pool())
        .await?;
        Ok(())
    }

    pub(super) async fn query_audit(&self, q: AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        // The newest `limit` matching entries, returned oldest first.
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {AUDIT_COLUMNS} FROM audit \
             WHERE at >= $1 AND ($2 IS NULL OR node = $2 OR actor = $3) \
             ORDER BY id DESC LIMIT $4"
        )))
        .bind(q.since.unwrap_or(i64::MIN))
        .bind(q.node.as_deref())
        .bind(q.node.as_ref().map(|n| format!("node:{n}")))
        .bind(i64::from(q.limit))
        .fetch_all(self.pool())
        .await?;
        let mut out = rows.iter().map(audit_row).collect::<Result<Vec<_>, _>>()?;
        out.reverse();
        Ok(out)
    }

    pub(super) async fn delete_old_audit(
        &self,
        before: UnixTime,
        keep: u64,
    ) -> Result<u64, StoreError> {
        let old = sqlx::query("DELETE FROM audit WHERE at < $1")
            .bind(before)
            .execute(self.pool())
            .await?
            .rows_affected();
        let row = sqlx::query("SELECT COALESCE(MAX(id), 0) AS last FROM audit")
            .fetch_one(self.pool())
            .await?;
        let last: i64 = row.try_get("last")?;
        let over = sqlx::query("DELETE FROM audit WHERE id <= $1")
            .bind(last - to_i64(keep)?)
            .execute(self.pool())
            .await?
            .rows_affected();
        Ok(old + over)
    }
}

fn token_row(row: &AnyRow) -> Result<AdminTokenRecord, StoreError> {
    let role: String = row.try_get("role")?;
    Ok(AdminTokenRecord {
        id: to_u64(row.try_get("id")?)?,
        name: row.try_get("name")?,
        secret_hash: row.try_get("secret_hash")?,
        role: role
            .parse()
            .map_err(|e| StoreError::Corrupt(format!("admin_tokens.role: {e}")))?,
        network: row.try_get("network")?,
        created_at: row.try_get("created_at")?,
        created_by: row.try_get("created_by")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}

fn audit_row(row: &AnyRow) -> Result<AuditRecord, StoreError> {
    let status: i64 = row.try_get("status")?;
    Ok(AuditRecord {
        id: to_u64(row.try_get("id")?)?,
        at: row.try_get("at")?,
        actor: row.try_get("actor")?,
        action: row.try_get("action")?,
        network: row.try_get("network")?,
        node: row.try_get("node")?,
        status: u16::try_from(status)
            .map_err(|_| StoreError::Corrupt(format!("audit.status {status}")))?,
        result: row.try_get("result")?,
        source: row.try_get("source")?,
    })
}
