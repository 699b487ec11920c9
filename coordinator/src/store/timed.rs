//! [`TimedStore`]: a [`Store`] that times every call of the store it wraps, for the metrics
//! (`crate::telemetry`: a histogram of durations and a counter of failures, by operation,
//! the method's name). The coordinator wraps its store in it at start (`run.rs`); the
//! simulations and handler tests use the store itself.
//!
//! What `SqlStore` offers beyond the trait (shared leases, presence, notifications) is not
//! timed.

use std::net::SocketAddr;
use std::time::Instant;

use meshlink_proto::{NodeId, PublicKey};

use super::{
    AdminTokenRecord, AuditQuery, AuditRecord, ChangeRecord, Expected, NetworkRecord,
    NewAdminToken, NewNetwork, NewNode, NewPolicy, NewToken, NewWorkload, NodeRecord, PolicyRecord,
    Store, StoreError, StoreFuture, TokenId, TokenRecord, UnixTime, WorkloadRecord,
};
use crate::telemetry;

/// A [`Store`] timing every call of `S` (see the module documentation).
#[derive(Debug, Clone)]
pub struct TimedStore<S> {
    inner: S,
}

impl<S: Store> TimedStore<S> {
    /// Times the calls of `inner`.
    pub fn new(inner: S) -> Self {
        TimedStore { inner }
    }
}

/// Runs `call`, then records its duration and whether it failed under the operation `op`.
fn timed<'a, T: 'a>(op: &'static str, call: StoreFuture<'a, T>) -> StoreFuture<'a, T> {
    Box::pin(async move {
        let started = Instant::now();
        let result = call.await;
        telemetry::store_call(
            op,
            started.elapsed(),
            result.as_ref().err().map(error_class),
        );
        result
    })
}

/// A failure as the `error` label says it: `refused` when the store kept a rule (a name
/// taken, a record gone, a token used up: the request's or the state's doing), `database`
/// when the database failed or holds what this coordinator cannot read.
pub fn error_class(e: &StoreError) -> &'static str {
    match e {
        StoreError::Conflict(_)
        | StoreError::AddressTaken(_)
        | StoreError::NetworkFull
        | StoreError::NotFound(_)
        | StoreError::TokenUnusable => "refused",
        StoreError::Corrupt(_) | StoreError::NewerSchema { .. } | StoreError::Database(_) => {
            "database"
        }
    }
}

impl<S: Store> Store for TimedStore<S> {
    fn create_network(&self, network: NewNetwork) -> StoreFuture<'_, NetworkRecord> {
        timed("create_network", self.inner.create_network(network))
    }

    fn networks(&self) -> StoreFuture<'_, Vec<NetworkRecord>> {
        timed("networks", self.inner.networks())
    }

    fn network<'a>(&'a self, name: &'a str) -> StoreFuture<'a, Option<NetworkRecord>> {
        timed("network", self.inner.network(name))
    }

    fn create_token(&self, token: NewToken) -> StoreFuture<'_, TokenRecord> {
        timed("create_token", self.inner.create_token(token))
    }

    fn tokens(&self) -> StoreFuture<'_, Vec<TokenRecord>> {
        timed("tokens", self.inner.tokens())
    }

    fn token_by_hash<'a>(&'a self, secret_hash: &'a str) -> StoreFuture<'a, Option<TokenRecord>> {
        timed("token_by_hash", self.inner.token_by_hash(secret_hash))
    }

    fn revoke_token(&self, id: TokenId) -> StoreFuture<'_, bool> {
        timed("revoke_token", self.inner.revoke_token(id))
    }

    fn insert_node(
        &self,
        node: NewNode,
        token: Option<(TokenId, UnixTime)>,
    ) -> StoreFuture<'_, (NodeRecord, u64)> {
        timed("insert_node", self.inner.insert_node(node, token))
    }

    fn nodes<'a>(&'a self, network: Option<&'a str>) -> StoreFuture<'a, Vec<NodeRecord>> {
        timed("nodes", self.inner.nodes(network))
    }

    fn node(&self, id: NodeId) -> StoreFuture<'_, Option<NodeRecord>> {
        timed("node", self.inner.node(id))
    }

    fn nodes_named<'a>(&'a self, name: &'a str) -> StoreFuture<'a, Vec<NodeRecord>> {
        timed("nodes_named", self.inner.nodes_named(name))
    }

    fn node_with_key<'a>(
        &'a self,
        network: &'a str,
        key: &'a PublicKey,
    ) -> StoreFuture<'a, Option<NodeRecord>> {
        timed("node_with_key", self.inner.node_with_key(network, key))
    }

    fn set_endpoints(
        &self,
        id: NodeId,
        endpoints: Vec<SocketAddr>,
        observed: Option<SocketAddr>,
    ) -> StoreFuture<'_, u64> {
        timed(
            "set_endpoints",
            self.inner.set_endpoints(id, endpoints, observed),
        )
    }

    fn touch_node(&self, id: NodeId, now: UnixTime) -> StoreFuture<'_, ()> {
        timed("touch_node", self.inner.touch_node(id, now))
    }

    fn revoke_node(&self, id: NodeId) -> StoreFuture<'_, u64> {
        timed("revoke_node", self.inner.revoke_node(id))
    }

    fn delete_node(&self, id: NodeId, bump: bool) -> StoreFuture<'_, Option<u64>> {
        timed("delete_node", self.inner.delete_node(id, bump))
    }

    fn create_workload(&self, w: NewWorkload) -> StoreFuture<'_, (WorkloadRecord, u64)> {
        timed("create_workload", self.inner.create_workload(w))
    }

    fn workloads<'a>(&'a self, network: Option<&'a str>) -> StoreFuture<'a, Vec<WorkloadRecord>> {
        timed("workloads", self.inner.workloads(network))
    }

    fn workload<'a>(
        &'a self,
        network: &'a str,
        name: &'a str,
    ) -> StoreFuture<'a, Option<WorkloadRecord>> {
        timed("workload", self.inner.workload(network, name))
    }

    fn set_holder<'a>(
        &'a self,
        network: &'a str,
        name: &'a str,
        holder: Option<NodeId>,
        expected: Expected,
        now: UnixTime,
    ) -> StoreFuture<'a, (WorkloadRecord, u64)> {
        timed(
            "set_holder",
            self.inner.set_holder(network, name, holder, expected, now),
        )
    }

    fn changes_since<'a>(
        &'a self,
        network: &'a str,
        after: u64,
        limit: u32,
    ) -> StoreFuture<'a, Vec<ChangeRecord>> {
        timed(
            "changes_since",
            self.inner.changes_since(network, after, limit),
        )
    }

    fn delete_workload<'a>(&'a self, network: &'a str, name: &'a str) -> StoreFuture<'a, u64> {
        timed("delete_workload", self.inner.delete_workload(network, name))
    }

    fn set_node_tags(&self, id: NodeId, tags: Vec<String>) -> StoreFuture<'_, u64> {
        timed("set_node_tags", self.inner.set_node_tags(id, tags))
    }

    fn set_workload_tags<'a>(
        &'a self,
        network: &'a str,
        name: &'a str,
        tags: Vec<String>,
    ) -> StoreFuture<'a, u64> {
        timed(
            "set_workload_tags",
            self.inner.set_workload_tags(network, name, tags),
        )
    }

    fn put_policy(&self, policy: NewPolicy) -> StoreFuture<'_, (PolicyRecord, u64)> {
        timed("put_policy", self.inner.put_policy(policy))
    }

    fn policies<'a>(&'a self, network: &'a str) -> StoreFuture<'a, Vec<PolicyRecord>> {
        timed("policies", self.inner.policies(network))
    }

    fn policy<'a>(&'a self, network: &'a str) -> StoreFuture<'a, Option<PolicyRecord>> {
        timed("policy", self.inner.policy(network))
    }

    fn create_admin_token(&self, token: NewAdminToken) -> StoreFuture<'_, AdminTokenRecord> {
        timed("create_admin_token", self.inner.create_admin_token(token))
    }

    fn admin_tokens(&self) -> StoreFuture<'_, Vec<AdminTokenRecord>> {
        timed("admin_tokens", self.inner.admin_tokens())
    }

    fn admin_token_by_hash<'a>(
        &'a self,
        secret_hash: &'a str,
    ) -> StoreFuture<'a, Option<AdminTokenRecord>> {
        timed(
            "admin_token_by_hash",
            self.inner.admin_token_by_hash(secret_hash),
        )
    }

    fn revoke_admin_token(&self, id: u64, now: UnixTime) -> StoreFuture<'_, bool> {
        timed("revoke_admin_token", self.inner.revoke_admin_token(id, now))
    }

    fn record_audit(&self, entry: AuditRecord) -> StoreFuture<'_, ()> {
        timed("record_audit", self.inner.record_audit(entry))
    }

    fn audit(&self, query: AuditQuery) -> StoreFuture<'_, Vec<AuditRecord>> {
        timed("audit", self.inner.audit(query))
    }

    fn prune_audit(&self, before: UnixTime, keep: u64) -> StoreFuture<'_, u64> {
        timed("prune_audit", self.inner.prune_audit(before, keep))
    }

    fn ask_rotation(&self, id: NodeId, at: Option<UnixTime>) -> StoreFuture<'_, bool> {
        timed("ask_rotation", self.inner.ask_rotation(id, at))
    }

    fn set_next_key(&self, id: NodeId, key: PublicKey) -> StoreFuture<'_, u64> {
        timed("set_next_key", self.inner.set_next_key(id, key))
    }

    fn promote_next_key(
        &self,
        id: NodeId,
        key: PublicKey,
        now: UnixTime,
    ) -> StoreFuture<'_, Option<u64>> {
        timed(
            "promote_next_key",
            self.inner.promote_next_key(id, key, now),
        )
    }

    fn expire_node(
        &self,
        id: NodeId,
        now: UnixTime,
        seen_before: UnixTime,
    ) -> StoreFuture<'_, Option<u64>> {
        timed("expire_node", self.inner.expire_node(id, now, seen_before))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_the_requests_or_the_databases() {
        assert_eq!(error_class(&StoreError::Conflict("name".into())), "refused");
        assert_eq!(
            error_class(&StoreError::NotFound("node 3".into())),
            "refused"
        );
        assert_eq!(error_class(&StoreError::TokenUnusable), "refused");
        assert_eq!(error_class(&StoreError::NetworkFull), "refused");
        assert_eq!(error_class(&StoreError::Corrupt("tags".into())), "database");
        assert_eq!(
            error_class(&StoreError::Database(sqlx::Error::PoolClosed)),
            "database"
        );
    }
}
