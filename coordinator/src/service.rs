//! The coordinator's operations as the QUIC server and the admin API call them: a handler
//! from [`crate::handlers`] is run against the store, and what it changed is applied to the
//! [`Hub`] (a delta to every session, a session closed).
//!
//! Architecture invariant: every operation that changes a network's map runs under one write
//! lock, from the store write to the hub update, so deltas are queued in version order and a
//! node revoked or deleted can never slip into an attached session (authentication and attach
//! happen under the same lock). Reads do not take it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use meshlink_proto::control::{encode, Auth, Hello, ServerMessage};
use meshlink_proto::NodeId;
use tokio::sync::Mutex;

use crate::handlers::networks::{self, CreateNetwork};
use crate::handlers::nodes::{self, peer_info, welcome};
use crate::handlers::tokens::{self, CreateToken};
use crate::handlers::{ApiError, Caller};
use crate::hub::{Attached, CloseReason, Frame, Hub};
use crate::identity::random_secret;
use crate::store::{NetworkRecord, NodeRecord, Store, StoreError, TokenId, TokenRecord, UnixTime};

/// The source of "now" for handlers.
pub trait Clock: Send + Sync {
    /// Seconds since the Unix epoch.
    fn now(&self) -> UnixTime;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> UnixTime {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
    }
}

/// An agent's session after an accepted hello.
#[derive(Debug)]
pub struct Session {
    /// The node.
    pub node: NodeId,
    /// Its name.
    pub name: String,
    /// Its network.
    pub network: String,
    /// Whether the hello was a join.
    pub joined: bool,
    /// The encoded `Welcome`.
    pub welcome: Frame,
    /// The session's place in the hub: the full map and the queue that follows.
    pub attached: Attached,
}

/// See the module documentation.
pub struct Service {
    store: Arc<dyn Store>,
    hub: Hub,
    clock: Arc<dyn Clock>,
    write: Mutex<()>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("hub", &self.hub)
            .finish_non_exhaustive()
    }
}

impl Service {
    /// Loads every network's map from the store into a new hub whose session queues hold
    /// `queue_depth` messages.
    ///
    /// # Errors
    /// [`StoreError`] when the store cannot be read.
    pub async fn load(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        queue_depth: usize,
    ) -> Result<Self, StoreError> {
        let hub = Hub::new(queue_depth);
        for net in store.networks().await? {
            let members = store.nodes(Some(&net.name)).await?;
            hub.set_map(&net.name, nodes::netmap(net.version, &members));
        }
        Ok(Service {
            store,
            hub,
            clock,
            write: Mutex::new(()),
        })
    }

    /// The store, for reads.
    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// The hub, for reads (who is online, full maps).
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// Now, by the service's clock.
    pub fn now(&self) -> UnixTime {
        self.clock.now()
    }

    /// Accepts or refuses an agent's hello: a join (creating the node and telling its peers)
    /// or an authentication (recording its endpoints), then attaches its session.
    ///
    /// # Errors
    /// The handler's [`ApiError`], to be sent as `Refused`.
    pub async fn hello(&self, hello: &Hello, remote: IpAddr) -> Result<Session, ApiError> {
        let caller = Caller::Agent { remote };
        let _w = self.write.lock().await;
        let now = self.clock.now();
        let (node, network, version, secret) = match &hello.auth {
            Auth::JoinToken { secret } => {
                let node_secret = random_secret();
                let j =
                    nodes::join(self.store(), now, &caller, hello, secret, &node_secret).await?;
                (j.node, j.network, Some(j.version), Some(node_secret))
            }
            Auth::Node { node_id, secret } => {
                let a = nodes::authenticate(self.store(), now, &caller, hello, *node_id, secret)
                    .await?;
                (a.node, a.network, a.version, None)
            }
        };
        let joined = secret.is_some();
        let welcome: Frame =
            encode(&ServerMessage::Welcome(welcome(&node, &network, secret))).into();
        if let Some(v) = version {
            self.hub
                .apply(&network.name, v, vec![peer_info(&node)], vec![]);
        }
        let attached = self
            .hub
            .attach(&network.name, node.id)
            .ok_or_else(|| ApiError::Refused(format!("network {} is not loaded", network.name)))?;
        Ok(Session {
            node: node.id,
            name: node.name,
            network: network.name,
            joined,
            welcome,
            attached,
        })
    }

    /// Records endpoints reported by a node's session and tells its peers when they changed.
    ///
    /// # Errors
    /// The handler's [`ApiError`]; the session should end.
    pub async fn report_endpoints(
        &self,
        node: NodeId,
        remote: IpAddr,
        endpoints: &[SocketAddr],
    ) -> Result<(), ApiError> {
        let _w = self.write.lock().await;
        let changed =
            nodes::update_endpoints(self.store(), &Caller::Node { id: node, remote }, endpoints)
                .await?;
        if let Some(v) = changed.version {
            self.hub.apply(
                &changed.node.network,
                v,
                vec![peer_info(&changed.node)],
                vec![],
            );
        }
        Ok(())
    }

    /// A session ended: detach it and record when the node was last seen. Errors are logged,
    /// not returned (the session is gone either way).
    pub async fn session_closed(&self, network: &str, node: NodeId, serial: u64) {
        if self.hub.detach(network, node, serial) {
            if let Err(e) = self.store.touch_node(node, self.clock.now()).await {
                tracing::warn!(node, "cannot record last_seen: {e}");
            }
        }
    }

    /// Creates a network (admin).
    ///
    /// # Errors
    /// As [`networks::create_network`].
    pub async fn create_network(&self, req: CreateNetwork) -> Result<NetworkRecord, ApiError> {
        let _w = self.write.lock().await;
        let net =
            networks::create_network(self.store(), self.clock.now(), &Caller::Admin, req).await?;
        self.hub.set_map(&net.name, nodes::netmap(net.version, &[]));
        Ok(net)
    }

    /// Creates a join token (admin); returns it with its secret, which is not kept.
    ///
    /// # Errors
    /// As [`tokens::create_token`].
    pub async fn create_token(&self, req: CreateToken) -> Result<(TokenRecord, String), ApiError> {
        let secret = random_secret();
        let token =
            tokens::create_token(self.store(), self.clock.now(), &Caller::Admin, req, &secret)
                .await?;
        Ok((token, secret))
    }

    /// Revokes a join token (admin).
    ///
    /// # Errors
    /// As [`tokens::revoke_token`].
    pub async fn revoke_token(&self, id: TokenId) -> Result<(), ApiError> {
        tokens::revoke_token(self.store(), &Caller::Admin, id).await
    }

    /// Revokes a node (admin): its session gets `Revoked` and is closed, its peers a delta
    /// removing it.
    ///
    /// # Errors
    /// As [`nodes::revoke_node`].
    pub async fn revoke_node(
        &self,
        reference: &str,
        network: Option<&str>,
    ) -> Result<NodeRecord, ApiError> {
        let _w = self.write.lock().await;
        let changed = nodes::revoke_node(self.store(), &Caller::Admin, reference, network).await?;
        self.remove(
            &changed.node,
            changed.version,
            CloseReason::Revoked,
            "revoked by an operator",
        );
        Ok(changed.node)
    }

    /// Deletes a node (admin), freeing its address: as [`Service::revoke_node`] for its
    /// session and peers.
    ///
    /// # Errors
    /// As [`nodes::delete_node`].
    pub async fn delete_node(
        &self,
        reference: &str,
        network: Option<&str>,
    ) -> Result<NodeRecord, ApiError> {
        let _w = self.write.lock().await;
        let changed = nodes::delete_node(self.store(), &Caller::Admin, reference, network).await?;
        self.remove(
            &changed.node,
            changed.version,
            CloseReason::Deleted,
            "deleted by an operator",
        );
        Ok(changed.node)
    }

    fn remove(&self, node: &NodeRecord, version: Option<u64>, reason: CloseReason, why: &str) {
        let last: Frame = encode(&ServerMessage::Revoked {
            reason: format!("node {} ({}) was {why}", node.id, node.name),
        })
        .into();
        if self.hub.close(&node.network, node.id, reason, Some(last)) {
            tracing::info!(node = node.id, network = %node.network, "closing the session of a node {why}");
        }
        if let Some(v) = version {
            self.hub.apply(&node.network, v, vec![], vec![node.id]);
        }
    }
}
