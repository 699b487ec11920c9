//! The service's side of access control: a network's policy and the tags of its nodes and
//! workloads change under the write lock, and every session of the network gets the change
//! as one delta, like any other change of the map.

use meshlink_proto::{NetmapDelta, PolicyChange};

use crate::handlers::nodes;
use crate::handlers::policy::{self, Accepted};
use crate::handlers::{ApiError, Caller};
use crate::service::Service;
use crate::store::{NodeRecord, PolicyRecord, WorkloadRecord};

/// What [`Service::set_policy`] and friends do.
#[derive(Debug, Clone)]
pub enum PolicyEdit {
    /// Set this policy file.
    Set(String),
    /// Restore this version.
    Rollback(u64),
    /// No policy: the network is open.
    Clear,
}

impl Service {
    /// Changes a network's policy (admin) and sends the change to every agent of the network.
    ///
    /// # Errors
    /// As [`policy::set_policy`], [`policy::rollback_policy`] and [`policy::clear_policy`].
    pub async fn edit_policy(
        &self,
        network: &str,
        edit: PolicyEdit,
        author: &str,
    ) -> Result<Accepted, ApiError> {
        let _w = self.lock_writes().await;
        let map = self.hub().map(network).unwrap_or_default();
        let now = self.now();
        let store = self.store();
        let accepted = match edit {
            PolicyEdit::Set(source) => {
                policy::set_policy(store, now, &Caller::Admin, &map, network, source, author)
                    .await?
            }
            PolicyEdit::Rollback(v) => {
                policy::rollback_policy(store, now, &Caller::Admin, &map, network, v, author)
                    .await?
            }
            PolicyEdit::Clear => {
                policy::clear_policy(store, now, &Caller::Admin, network, author).await?
            }
        };
        let change = match &accepted.policy {
            Some(p) => PolicyChange::Set(p.clone()),
            None => PolicyChange::Clear,
        };
        self.publish(
            network,
            NetmapDelta {
                to_version: accepted.map_version,
                policy: Some(change),
                ..NetmapDelta::default()
            },
        )
        .await;
        tracing::info!(
            network,
            version = accepted.record.version,
            author,
            "policy changed"
        );
        Ok(accepted)
    }

    /// Every version of a network's policy, oldest first (admin).
    ///
    /// # Errors
    /// [`ApiError::NotFound`] for an unknown network.
    pub async fn policy_history(&self, network: &str) -> Result<Vec<PolicyRecord>, ApiError> {
        if self.store().network(network).await?.is_none() {
            return Err(ApiError::NotFound(format!("no network named {network:?}")));
        }
        Ok(self.store().policies(network).await?)
    }

    /// Edits a node's tags (`+tag`, `-tag`) and sends the node's new entry to its network.
    ///
    /// # Errors
    /// As [`nodes::find_node`] and [`policy::edit_tags`].
    pub async fn tag_node(
        &self,
        reference: &str,
        network: Option<&str>,
        edits: &[String],
    ) -> Result<NodeRecord, ApiError> {
        let _w = self.lock_writes().await;
        let node = nodes::find_node(self.store(), &Caller::Admin, reference, network).await?;
        let tags = policy::edit_tags(node.tags.clone(), edits)?;
        if tags == node.tags {
            return Ok(node);
        }
        let version = self.store().set_node_tags(node.id, tags.clone()).await?;
        let node = NodeRecord { tags, ..node };
        let mut delta = NetmapDelta {
            to_version: version,
            ..NetmapDelta::default()
        };
        if !node.revoked {
            delta.upsert.push(nodes::peer_info(&node));
        }
        self.publish(&node.network, delta).await;
        Ok(node)
    }

    /// Edits a workload's tags (`+tag`, `-tag`) and sends its new entry to its network.
    ///
    /// # Errors
    /// [`ApiError::NotFound`] for an unknown workload, as [`policy::edit_tags`].
    pub async fn tag_workload(
        &self,
        network: &str,
        name: &str,
        edits: &[String],
    ) -> Result<WorkloadRecord, ApiError> {
        let _w = self.lock_writes().await;
        let w = self.store().workload(network, name).await?.ok_or_else(|| {
            ApiError::NotFound(format!("no workload named {name:?} in network {network}"))
        })?;
        let tags = policy::edit_tags(w.tags.clone(), edits)?;
        if tags == w.tags {
            return Ok(w);
        }
        let version = self
            .store()
            .set_workload_tags(network, name, tags.clone())
            .await?;
        let w = WorkloadRecord { tags, ..w };
        self.publish(
            network,
            NetmapDelta {
                to_version: version,
                upsert_workloads: vec![self.info(&w)],
                ..NetmapDelta::default()
            },
        )
        .await;
        Ok(w)
    }
}
