//! External nodes: devices that run stock WireGuard (a phone, a router, an appliance) and no
//! agent. Each reaches the mesh through one node with an agent, its *gateway* (`via`): the
//! gateway's agent has it as a WireGuard peer and forwards its packets to and from the other
//! nodes, which route its address to the gateway. So the device's configuration is one peer
//! (the gateway, `AllowedIPs` the network's prefix) that never goes stale: nodes that join,
//! move or change endpoints, and workload addresses that move, are the gateway's business.
//!
//! An external node has an address, a name, tags and a public key like any node; it has no
//! secret (it never says hello), so it never has a session, never expires, and its key changes
//! only when an operator gives a new one ([`rotate_key`]).

use super::nodes::{
    check_free, check_key, check_not_revoked_for_rotation, find_node, validate_node_name,
};
use super::policy::validate_tags;
use super::{require_admin, ApiError, Caller};
use crate::store::{
    AddressChoice, NetworkRecord, NewNode, NodeRecord, Store, StoreError, UnixTime,
};
use meshlink_proto::PublicKey;

/// What an external node's `secret_hash` holds: never the hex SHA-256 of any secret, so no
/// hello can authenticate as it.
pub const NO_SECRET: &str = "external";

/// A request for a new external node (`meshlink_api::CreateExternalNode`, checked).
#[derive(Debug, Clone)]
pub struct NewExternal {
    /// Network.
    pub network: String,
    /// Name.
    pub name: String,
    /// The device's public key.
    pub public_key: PublicKey,
    /// The gateway: a node name or id.
    pub via: String,
    /// Tags.
    pub tags: Vec<String>,
}

/// An external node with its gateway and network.
#[derive(Debug, Clone)]
pub struct External {
    /// The node.
    pub node: NodeRecord,
    /// Its gateway.
    pub gateway: NodeRecord,
    /// Its network.
    pub network: NetworkRecord,
    /// The network's version after the change; `None` when the map did not change.
    pub version: Option<u64>,
}

/// Registers an external node: the lowest free address of the network, reached through
/// `via`.
///
/// # Errors
/// [`ApiError::NotFound`] for an unknown network or gateway; [`ApiError::Invalid`] for a bad
/// name, tags or key, or a gateway that cannot be one (revoked, external itself, or of
/// another network); [`ApiError::Conflict`] when the name or key is taken;
/// [`ApiError::Refused`] when the network is full.
pub async fn add(
    store: &dyn Store,
    caller: &Caller,
    now: UnixTime,
    req: NewExternal,
) -> Result<External, ApiError> {
    require_admin(caller)?;
    validate_node_name(&req.name)?;
    validate_tags(&req.tags)?;
    check_key(&req.public_key, "public_key")?;
    let network = store
        .network(&req.network)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no network named {:?}", req.network)))?;
    let gateway = find_node(store, caller, &req.via, Some(&network.name))
        .await
        .map_err(|e| match e {
            ApiError::NotFound(m) => ApiError::NotFound(format!("via: {m}")),
            e => e,
        })?;
    check_gateway(&gateway)?;
    check_free(store, &network.name, Some(&req.name), &req.public_key).await?;
    let new = NewNode {
        network: network.name.clone(),
        name: Some(req.name),
        public_key: req.public_key,
        address: AddressChoice::LowestFree(network.cidr),
        secret_hash: NO_SECRET.into(),
        labels: Default::default(),
        tags: req.tags,
        endpoints: Vec::new(),
        observed: None,
        created_at: now,
        via: Some(gateway.id),
    };
    let (node, version) = store.insert_node(new, None).await.map_err(|e| match e {
        StoreError::NetworkFull => ApiError::Refused(format!(
            "network {} ({}) has no free address",
            network.name, network.cidr
        )),
        StoreError::Conflict(m) => ApiError::Conflict(m),
        e => e.into(),
    })?;
    Ok(External {
        node,
        gateway,
        network,
        version: Some(version),
    })
}

/// An external node with its gateway and network, for its WireGuard configuration.
///
/// # Errors
/// As [`find_node`]; [`ApiError::Invalid`] when the node has an agent;
/// [`ApiError::NotFound`] when its gateway was deleted.
pub async fn show(
    store: &dyn Store,
    caller: &Caller,
    reference: &str,
    network: Option<&str>,
) -> Result<External, ApiError> {
    let node = find_node(store, caller, reference, network).await?;
    let Some(via) = node.via else {
        return Err(ApiError::Invalid(format!(
            "node {} ({}) has an agent: its configuration is the agent's own",
            node.id, node.name
        )));
    };
    let gateway = store.node(via).await?.ok_or_else(|| {
        ApiError::NotFound(format!(
            "the gateway of node {} (node {via}) no longer exists; register the device again \
             with another --via",
            node.name
        ))
    })?;
    if gateway.revoked {
        return Err(ApiError::Refused(format!(
            "the gateway of node {} ({}) is revoked: the device reaches nothing through it; \
             register the device again with another --via",
            node.name, gateway.name
        )));
    }
    let network = store
        .network(&node.network)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no network named {:?}", node.network)))?;
    Ok(External {
        node,
        gateway,
        network,
        version: None,
    })
}

/// Whether `node` can be a gateway.
///
/// # Errors
/// [`ApiError::Invalid`] naming `via` when it is revoked or external itself.
pub fn check_gateway(node: &NodeRecord) -> Result<(), ApiError> {
    if node.revoked {
        return Err(ApiError::Invalid(format!(
            "via: node {} ({}) is revoked",
            node.id, node.name
        )));
    }
    if node.via.is_some() {
        return Err(ApiError::Invalid(format!(
            "via: node {} ({}) is an external node itself; a gateway runs an agent",
            node.id, node.name
        )));
    }
    Ok(())
}

/// The external nodes reached through `gateway`, among `nodes`, not revoked.
pub fn served_by(nodes: &[NodeRecord], gateway: u64) -> Vec<&NodeRecord> {
    nodes
        .iter()
        .filter(|n| n.via == Some(gateway) && !n.revoked)
        .collect()
}

/// Checks an external node's new key: the node switches to it at once (its device has it
/// already). Returns the node.
///
/// # Errors
/// [`ApiError::Refused`] for a revoked node; [`ApiError::Invalid`] for a small-order key or
/// the key it has.
pub fn check_new_key(node: &NodeRecord, key: &PublicKey) -> Result<(), ApiError> {
    check_not_revoked_for_rotation(node)?;
    check_key(key, "public_key")?;
    if *key == node.public_key {
        return Err(ApiError::Invalid(format!(
            "public_key: node {} uses this key already; a rotation needs a new key pair",
            node.name
        )));
    }
    Ok(())
}
