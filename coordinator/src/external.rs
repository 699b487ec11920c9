//! External nodes at the coordinator: registration, the configuration a device needs, and
//! key rotation by an operator. The rules are `handlers::external`'s; this module runs them
//! under the service's write lock and sends the changes to the network (see
//! [`meshlink_proto::PeerInfo::via`] for what agents do with an external node).

use meshlink_proto::PublicKey;

use crate::handlers::external::{self, External, NewExternal};
use crate::handlers::nodes;
use crate::handlers::{ApiError, Caller};
use crate::service::Service;
use crate::store::{NodeRecord, StoreError};

impl Service {
    /// Registers an external node and sends its entry to its network.
    ///
    /// # Errors
    /// As [`external::add`].
    pub async fn add_external(&self, req: NewExternal) -> Result<External, ApiError> {
        let _w = self.lock_writes().await;
        let added = external::add(self.store(), &Caller::Admin, self.now(), req).await?;
        if let Some(version) = added.version {
            self.publish_node(&added.node, version).await;
        }
        tracing::info!(
            node = added.node.id,
            name = %added.node.name,
            via = %added.gateway.name,
            "external node registered"
        );
        Ok(added)
    }

    /// An external node with its gateway and network.
    ///
    /// # Errors
    /// As [`external::show`].
    pub async fn external(
        &self,
        reference: &str,
        network: Option<&str>,
    ) -> Result<External, ApiError> {
        external::show(self.store(), &Caller::Admin, reference, network).await
    }

    /// Gives an external node a new public key, which it uses from now on (its device has
    /// it): announced as its next key, then made its only key, two changes of the map.
    ///
    /// # Errors
    /// As [`nodes::find_node`] and [`external::check_new_key`]; [`ApiError::Invalid`] for a
    /// node with an agent; [`ApiError::Conflict`] when another node of the network has the
    /// key.
    pub async fn rotate_external_key(
        &self,
        reference: &str,
        network: Option<&str>,
        key: PublicKey,
    ) -> Result<NodeRecord, ApiError> {
        let _w = self.lock_writes().await;
        let mut node = nodes::find_node(self.store(), &Caller::Admin, reference, network).await?;
        if node.via.is_none() {
            return Err(ApiError::Invalid(format!(
                "public_key: node {} has an agent, which makes its own key pair; rotate it \
                 without a key",
                node.name
            )));
        }
        external::check_new_key(&node, &key)?;
        let announced = self
            .store()
            .set_next_key(node.id, key)
            .await
            .map_err(|e| match e {
                StoreError::Conflict(m) => ApiError::Conflict(format!("public_key: {m}")),
                StoreError::NotFound(m) => ApiError::NotFound(m),
                e => e.into(),
            })?;
        node.next_key = Some(key);
        self.publish_node(&node, announced).await;
        let changed = nodes::complete_rotation(self.store(), &node, key, self.now()).await?;
        if let Some(version) = changed.version {
            self.publish_node(&changed.node, version).await;
        }
        tracing::info!(node = node.id, key = %key.short(), "external node's key replaced");
        Ok(changed.node)
    }
}
