//! Nodes: joining with a token, authenticating with node credentials, endpoint reports, key
//! rotation and expiry, and the operator's listing, revocation and deletion. Also the pure
//! conversions from records to what agents see ([`peer_info`], [`welcome`], [`netmap`]).
//!
//! # Key rotation
//!
//! A rotation is asked for ([`ask_rotation`]: an operator, or the network's schedule,
//! [`rotation_due`]); the agent makes a key pair and announces its public key
//! ([`announce_next_key`]), which becomes the node's `next_key` in every map: peers accept
//! both keys for the node. The agent switches after a grace period and says hello with the
//! new key, which completes the rotation ([`complete_rotation`]): the new key is the node's
//! only key. Until then a hello with either key is accepted (the node secret is what
//! authenticates a node; the key only names its tunnels).
//!
//! # Expiry
//!
//! With `node_expiry` set, a node with no session anywhere whose last session ended that long
//! ago ([`expires_at`]) is revoked as expired ([`expire`]) and leaves every map; it must join
//! again.
//!
//! # Endpoints
//!
//! A peer's endpoints are the ones its agent reported (cleaned by [`clean_endpoints`], in the
//! agent's order), followed by the one the coordinator observed ([`observed_endpoint`]): the
//! source IP of the agent's QUIC connection with the WireGuard port of its first reported
//! endpoint of the same family. The observed endpoint is what crosses a NAT; it is left out
//! when it is loopback or already reported.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use meshlink_proto::control::{Auth, Hello, Welcome, PROTOCOL_VERSION};
use meshlink_proto::{ipam, Netmap, NodeId, PeerInfo, PublicKey};

use super::tokens::unusable_reason;
use super::{constant_time_eq, hash_secret, require_admin, ApiError, Caller};
use crate::store::{
    AddressChoice, NetworkRecord, NewNode, NodeRecord, Store, StoreError, TokenRecord, UnixTime,
    WorkloadRecord,
};

/// The most endpoints an agent may report.
pub const MAX_ENDPOINTS: usize = 16;
/// The most labels a node may carry.
pub const MAX_LABELS: usize = 32;
/// The longest label key, in bytes.
pub const MAX_LABEL_KEY: usize = 63;
/// The longest label value, in bytes.
pub const MAX_LABEL_VALUE: usize = 255;

/// A node that just joined.
#[derive(Debug, Clone)]
pub struct Joined {
    /// The new node.
    pub node: NodeRecord,
    /// Its network.
    pub network: NetworkRecord,
    /// The network's version after the join.
    pub version: u64,
}

/// Whether a returning node's hello records the endpoints it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HelloEndpoints {
    /// Record them (when they changed).
    Record,
    /// Check them, but leave the recorded ones: the node changed its endpoints too often just
    /// now, and the hello's wait their turn (`crate::endpoint_pace`).
    Leave,
}

/// A node that proved its identity.
#[derive(Debug, Clone)]
pub struct Authenticated {
    /// The node, with its endpoints as recorded now.
    pub node: NodeRecord,
    /// Its network.
    pub network: NetworkRecord,
    /// The network's new version when the hello changed the node's endpoints.
    pub version: Option<u64>,
}

/// A change to one node's map entry.
#[derive(Debug, Clone)]
pub struct Changed {
    /// The node after the change.
    pub node: NodeRecord,
    /// The network's version after the change; `None` when the map did not change (the node
    /// was already revoked, or already out of the map).
    pub version: Option<u64>,
}

/// Creates a node from a join token and the agent's hello. `node_secret` is the credential
/// the agent gets in its welcome (drawn by the caller; only its hash is stored).
///
/// The node gets the lowest free address of the network, the hello's name (or `node-<id>`),
/// labels and endpoints, and the token's tags.
///
/// # Errors
/// [`ApiError::Unauthorized`] for an unknown token; [`ApiError::Refused`] for a revoked,
/// expired or used-up token, a wrong protocol version or a full network;
/// [`ApiError::Conflict`] when the name or public key is already used in the network;
/// [`ApiError::Invalid`] for a bad name, labels or endpoints.
pub async fn join(
    store: &dyn Store,
    now: UnixTime,
    caller: &Caller,
    hello: &Hello,
    token_secret: &str,
    node_secret: &str,
) -> Result<Joined, ApiError> {
    let remote = agent_remote(caller)?;
    check_protocol(hello)?;
    let token = usable_token(store, now, token_secret).await?;
    let network = store.network(&token.network).await?.ok_or_else(|| {
        ApiError::Refused(format!(
            "the token's network {} no longer exists",
            token.network
        ))
    })?;
    if let Some(name) = &hello.name {
        validate_node_name(name)?;
    }
    validate_labels(&hello.labels)?;
    check_key(&hello.public_key, "public_key")?;
    let endpoints = clean_endpoints(&hello.endpoints)?;
    check_free(
        store,
        &network.name,
        hello.name.as_deref(),
        &hello.public_key,
    )
    .await?;
    // The lowest free address, chosen by the store inside its write transaction, so that
    // coordinators sharing it never choose the same one.
    let new = NewNode {
        network: network.name.clone(),
        name: hello.name.clone(),
        public_key: hello.public_key,
        address: AddressChoice::LowestFree(network.cidr),
        secret_hash: hash_secret(node_secret),
        labels: hello.labels.clone(),
        tags: token.tags.clone(),
        observed: observed_endpoint(&endpoints, remote),
        endpoints,
        created_at: now,
        via: None,
    };
    let (node, version) = store
        .insert_node(new, Some((token.id, now)))
        .await
        .map_err(|e| match e {
            StoreError::TokenUnusable => {
                ApiError::Refused("the join token can no longer be used".into())
            }
            StoreError::NetworkFull => ApiError::Refused(format!(
                "network {} ({}) has no free address",
                network.name, network.cidr
            )),
            StoreError::Conflict(m) => ApiError::Conflict(m),
            e => e.into(),
        })?;
    Ok(Joined {
        node,
        network,
        version,
    })
}

/// Checks a returning node's credentials and records the time, and its hello's endpoints
/// unless told to leave them ([`HelloEndpoints`]).
///
/// # Errors
/// [`ApiError::Unauthorized`] for an unknown (or deleted) node or a wrong secret;
/// [`ApiError::Refused`] for a revoked node, a wrong protocol version or a public key that
/// differs from the registered one; [`ApiError::Invalid`] for bad endpoints.
pub async fn authenticate(
    store: &dyn Store,
    now: UnixTime,
    caller: &Caller,
    hello: &Hello,
    node_id: NodeId,
    secret: &str,
    endpoints: HelloEndpoints,
) -> Result<Authenticated, ApiError> {
    let remote = agent_remote(caller)?;
    check_protocol(hello)?;
    let mut node = returning_node(store, hello, node_id, secret).await?;
    let network = store
        .network(&node.network)
        .await?
        .ok_or_else(|| ApiError::Refused(format!("network {} no longer exists", node.network)))?;
    let record = endpoints == HelloEndpoints::Record;
    let endpoints = clean_endpoints(&hello.endpoints)?;
    let observed = observed_endpoint(&endpoints, remote);
    let version = if record && (endpoints != node.endpoints || observed != node.observed) {
        let v = store
            .set_endpoints(node.id, endpoints.clone(), observed)
            .await?;
        node.endpoints = endpoints;
        node.observed = observed;
        Some(v)
    } else {
        None
    };
    store.touch_node(node.id, now).await?;
    node.last_seen = Some(now);
    Ok(Authenticated {
        node,
        network,
        version,
    })
}

/// The checks of a hello's credentials that need only reads: the protocol version, and a
/// join token that exists and can be used, or a node that exists, with this secret, not
/// revoked, with this public key. The service runs them before it takes its write lock, so
/// that a hello with a bad credential is refused without queueing behind changes (nor holding
/// up the next); [`join`] and [`authenticate`] run them again under the lock.
///
/// # Errors
/// As [`join`] and [`authenticate`] for the same checks.
pub async fn check_credentials(
    store: &dyn Store,
    now: UnixTime,
    caller: &Caller,
    hello: &Hello,
) -> Result<(), ApiError> {
    agent_remote(caller)?;
    check_protocol(hello)?;
    match &hello.auth {
        Auth::JoinToken { secret } => usable_token(store, now, secret).await.map(drop),
        Auth::Node { node_id, secret } => returning_node(store, hello, *node_id, secret)
            .await
            .map(drop),
    }
}

/// The join token with this secret, if it can be used at `now`.
async fn usable_token(
    store: &dyn Store,
    now: UnixTime,
    secret: &str,
) -> Result<TokenRecord, ApiError> {
    let token = store
        .token_by_hash(&hash_secret(secret))
        .await?
        .ok_or_else(|| ApiError::Unauthorized("unknown join token".into()))?;
    match unusable_reason(&token, now) {
        Some(reason) => Err(ApiError::Refused(reason.into())),
        None => Ok(token),
    }
}

/// Node `node_id`, if `secret` is its secret, it is not revoked and `hello` has its key.
async fn returning_node(
    store: &dyn Store,
    hello: &Hello,
    node_id: NodeId,
    secret: &str,
) -> Result<NodeRecord, ApiError> {
    let node = store.node(node_id).await?.ok_or_else(|| {
        ApiError::Unauthorized(format!(
            "node {node_id} is unknown (deleted?); join again with a token"
        ))
    })?;
    if node.via.is_some() {
        return Err(ApiError::Unauthorized(format!(
            "node {node_id} is an external node (stock WireGuard, no agent): it has no session"
        )));
    }
    if !constant_time_eq(hash_secret(secret).as_bytes(), node.secret_hash.as_bytes()) {
        return Err(ApiError::Unauthorized(format!(
            "wrong secret for node {node_id}"
        )));
    }
    if node.revoked {
        return Err(ApiError::Refused(format!(
            "node {} ({}) has been revoked",
            node.id, node.name
        )));
    }
    if node.public_key != hello.public_key && node.next_key != Some(hello.public_key) {
        return Err(ApiError::Refused(format!(
            "public_key: not the key of node {} (nor its next key while it rotates); a node \
             changes its key only through a rotation (meshctl node rotate-key)",
            node.id
        )));
    }
    Ok(node)
}

/// Asks a node to rotate its key (admin): recorded at `now`, sent to its agent at once when it
/// has a session, else at its next hello. Asking again while a rotation is under way starts
/// it over with a new key (an agent that lost its key pair gets to make another).
///
/// # Errors
/// As [`find_node`]; [`ApiError::Refused`] for a revoked node.
pub async fn ask_rotation(
    store: &dyn Store,
    caller: &Caller,
    now: UnixTime,
    reference: &str,
    network: Option<&str>,
) -> Result<NodeRecord, ApiError> {
    let mut node = find_node(store, caller, reference, network).await?;
    check_not_revoked_for_rotation(&node)?;
    if node.via.is_some() {
        return Err(ApiError::Invalid(format!(
            "public_key: node {} is an external node: its device makes the new key pair, and \
             the rotation needs the new public key",
            node.name
        )));
    }
    if !store.ask_rotation(node.id, Some(now)).await? {
        return Err(ApiError::NotFound(format!(
            "node {} no longer exists",
            node.id
        )));
    }
    node.rotation_asked = Some(now);
    Ok(node)
}

/// Refuses a key no tunnel would be private with.
///
/// # Errors
/// [`ApiError::Invalid`] naming `field`.
pub fn check_key(key: &PublicKey, field: &str) -> Result<(), ApiError> {
    if key.has_small_order() {
        return Err(ApiError::Invalid(format!(
            "{field}: the public key is a point of small order: no tunnel with it would be \
             private; generate a new key pair"
        )));
    }
    Ok(())
}

/// Checks that no node of `network` has the name `name` (when given) or the key `key`, as a
/// new node (joining, or an external one) needs. Both lookups are indexed, so it costs the
/// same in a large network.
///
/// # Errors
/// [`ApiError::Conflict`] naming `name` or `public_key`.
pub async fn check_free(
    store: &dyn Store,
    network: &str,
    name: Option<&str>,
    key: &PublicKey,
) -> Result<(), ApiError> {
    if let Some(name) = name {
        if let Some(other) = store
            .nodes_named(name)
            .await?
            .into_iter()
            .find(|n| n.network == network)
        {
            return Err(ApiError::Conflict(format!(
                "name: {} is already used by node {} in network {network}; pick another name \
                 or delete that node",
                other.name, other.id
            )));
        }
    }
    if let Some(other) = store.node_with_key(network, key).await? {
        return Err(ApiError::Conflict(format!(
            "public_key: this public key already belongs to node {} ({}) in network {network}",
            other.id, other.name
        )));
    }
    Ok(())
}

/// A revoked node has no key to rotate.
///
/// # Errors
/// [`ApiError::Refused`] for a revoked node.
pub fn check_not_revoked_for_rotation(node: &NodeRecord) -> Result<(), ApiError> {
    if node.revoked {
        return Err(ApiError::Refused(format!(
            "node {} ({}) is revoked: it has no key to rotate",
            node.id, node.name
        )));
    }
    Ok(())
}

/// Whether the schedule asks node `node` for a rotation at `now`: it is not revoked, no
/// rotation is under way or asked for, and its key is `every` old.
pub fn rotation_due(node: &NodeRecord, every: std::time::Duration, now: UnixTime) -> bool {
    let every = i64::try_from(every.as_secs()).unwrap_or(i64::MAX);
    !node.revoked
        && node.via.is_none()
        && node.next_key.is_none()
        && node.rotation_asked.is_none()
        && node.key_since.saturating_add(every) <= now
}

/// An authenticated node's agent announces `key` as its next key. When a rotation was asked
/// for, the key becomes the node's `next_key` (a change of the map); the same key again
/// changes nothing; a key nobody asked for is ignored (`version: None`), so a node cannot make
/// its peers' maps change at will.
///
/// # Errors
/// [`ApiError::Forbidden`] unless the caller is a node; [`ApiError::NotFound`] when it was
/// deleted; [`ApiError::Refused`] when revoked; [`ApiError::Invalid`] for a key of small
/// order or the node's own key; [`ApiError::Conflict`] when another node of the network has
/// it.
pub async fn announce_next_key(
    store: &dyn Store,
    caller: &Caller,
    key: PublicKey,
) -> Result<Changed, ApiError> {
    let Caller::Node { id, .. } = *caller else {
        return Err(ApiError::Forbidden("only a node announces its keys".into()));
    };
    let mut node = store
        .node(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("node {id} no longer exists")))?;
    if node.revoked {
        return Err(ApiError::Refused(format!("node {id} has been revoked")));
    }
    check_key(&key, "next_key")?;
    if key == node.public_key {
        return Err(ApiError::Invalid(format!(
            "next_key: node {id} uses this key already; a rotation needs a new key pair"
        )));
    }
    if node.next_key == Some(key) || node.rotation_asked.is_none() {
        return Ok(Changed {
            node,
            version: None,
        });
    }
    let version = store.set_next_key(id, key).await.map_err(|e| match e {
        StoreError::Conflict(m) => ApiError::Conflict(format!("next_key: {m}")),
        StoreError::NotFound(m) => ApiError::NotFound(m),
        e => e.into(),
    })?;
    node.next_key = Some(key);
    node.rotation_asked = None;
    Ok(Changed {
        node,
        version: Some(version),
    })
}

/// A node said hello with `key`: when that is its next key, the rotation is complete and it
/// becomes the node's only key from `now` (a change of the map); otherwise nothing changes.
///
/// # Errors
/// [`ApiError::Internal`] when the store fails.
pub async fn complete_rotation(
    store: &dyn Store,
    node: &NodeRecord,
    key: PublicKey,
    now: UnixTime,
) -> Result<Changed, ApiError> {
    let mut node = node.clone();
    if node.next_key != Some(key) {
        return Ok(Changed {
            node,
            version: None,
        });
    }
    let version = store.promote_next_key(node.id, key, now).await?;
    if version.is_some() {
        node.public_key = key;
        node.next_key = None;
        node.key_since = now;
    }
    Ok(Changed { node, version })
}

/// When node `node` expires if it stays away: `expiry` after its last session ended (or its
/// join); `None` when expiry is off, the node is revoked, it has a session now (`online`), or
/// it is an external node (which never has one).
pub fn expires_at(
    node: &NodeRecord,
    expiry: Option<std::time::Duration>,
    online: bool,
) -> Option<UnixTime> {
    let expiry = i64::try_from(expiry?.as_secs()).unwrap_or(i64::MAX);
    if node.revoked || online || node.via.is_some() {
        return None;
    }
    Some(
        node.last_seen
            .unwrap_or(node.created_at)
            .saturating_add(expiry),
    )
}

/// Revokes node `node` as expired at `now`, unless it was seen meanwhile (its record in the
/// store is newer than `node`) or is revoked already (`version: None`).
///
/// # Errors
/// [`ApiError::Internal`] when the store fails.
pub async fn expire(
    store: &dyn Store,
    node: &NodeRecord,
    expiry: std::time::Duration,
    now: UnixTime,
) -> Result<Changed, ApiError> {
    let mut node = node.clone();
    let expiry = i64::try_from(expiry.as_secs()).unwrap_or(i64::MAX);
    let version = store
        .expire_node(node.id, now, now.saturating_sub(expiry).saturating_add(1))
        .await?;
    if version.is_some() {
        node.revoked = true;
        node.expired_at = Some(now);
    }
    Ok(Changed { node, version })
}

/// Replaces an authenticated node's endpoints. Reporting the same endpoints again changes
/// nothing and bumps no version.
///
/// # Errors
/// [`ApiError::Forbidden`] unless the caller is a node; [`ApiError::NotFound`] when it was
/// deleted, [`ApiError::Refused`] when revoked; [`ApiError::Invalid`] for bad endpoints.
pub async fn update_endpoints(
    store: &dyn Store,
    caller: &Caller,
    endpoints: &[SocketAddr],
) -> Result<Changed, ApiError> {
    let Caller::Node { id, remote } = *caller else {
        return Err(ApiError::Forbidden("only a node reports endpoints".into()));
    };
    let mut node = store
        .node(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("node {id} no longer exists")))?;
    if node.revoked {
        return Err(ApiError::Refused(format!("node {id} has been revoked")));
    }
    let endpoints = clean_endpoints(endpoints)?;
    let observed = observed_endpoint(&endpoints, remote);
    if endpoints == node.endpoints && observed == node.observed {
        return Ok(Changed {
            node,
            version: None,
        });
    }
    let version = store
        .set_endpoints(id, endpoints.clone(), observed)
        .await
        .map_err(|e| match e {
            StoreError::NotFound(m) => ApiError::NotFound(m),
            e => e.into(),
        })?;
    node.endpoints = endpoints;
    node.observed = observed;
    Ok(Changed {
        node,
        version: Some(version),
    })
}

/// Every node, or those of one network.
///
/// # Errors
/// [`ApiError::NotFound`] when `network` names no network.
pub async fn list_nodes(
    store: &dyn Store,
    caller: &Caller,
    network: Option<&str>,
) -> Result<Vec<NodeRecord>, ApiError> {
    require_admin(caller)?;
    if let Some(name) = network {
        if store.network(name).await?.is_none() {
            return Err(ApiError::NotFound(format!("no network named {name:?}")));
        }
    }
    Ok(store.nodes(network).await?)
}

/// Finds a node by reference: an id (all digits; names never are) or a name, optionally
/// within one network.
///
/// # Errors
/// [`ApiError::NotFound`]; [`ApiError::Conflict`] when a name exists in several networks and
/// none was given.
pub async fn find_node(
    store: &dyn Store,
    caller: &Caller,
    reference: &str,
    network: Option<&str>,
) -> Result<NodeRecord, ApiError> {
    require_admin(caller)?;
    let in_network = |n: &NodeRecord| network.is_none_or(|want| n.network == want);
    let where_ = network
        .map(|n| format!(" in network {n}"))
        .unwrap_or_default();
    if let Ok(id) = reference.parse::<NodeId>() {
        return match store.node(id).await? {
            Some(node) if in_network(&node) => Ok(node),
            _ => Err(ApiError::NotFound(format!("no node with id {id}{where_}"))),
        };
    }
    let mut found: Vec<NodeRecord> = store
        .nodes_named(reference)
        .await?
        .into_iter()
        .filter(in_network)
        .collect();
    match found.len() {
        0 => Err(ApiError::NotFound(format!(
            "no node named {reference:?}{where_}"
        ))),
        1 => Ok(found.remove(0)),
        _ => {
            let networks: Vec<&str> = found.iter().map(|n| n.network.as_str()).collect();
            Err(ApiError::Conflict(format!(
                "node name {reference:?} exists in networks {}; say which with ?network=",
                networks.join(", ")
            )))
        }
    }
}

/// Revokes a node: it is refused from now on and leaves every map. Revoking a revoked node
/// changes nothing (`version: None`).
///
/// # Errors
/// As [`find_node`].
pub async fn revoke_node(
    store: &dyn Store,
    caller: &Caller,
    reference: &str,
    network: Option<&str>,
) -> Result<Changed, ApiError> {
    let mut node = find_node(store, caller, reference, network).await?;
    if node.revoked {
        return Ok(Changed {
            node,
            version: None,
        });
    }
    let version = store.revoke_node(node.id).await.map_err(not_found)?;
    node.revoked = true;
    Ok(Changed {
        node,
        version: Some(version),
    })
}

/// Deletes a node, freeing its name and address for reuse (its id is never reused). The map
/// changes only when the node was not already revoked.
///
/// # Errors
/// As [`find_node`].
pub async fn delete_node(
    store: &dyn Store,
    caller: &Caller,
    reference: &str,
    network: Option<&str>,
) -> Result<Changed, ApiError> {
    let node = find_node(store, caller, reference, network).await?;
    let version = store
        .delete_node(node.id, !node.revoked)
        .await
        .map_err(not_found)?;
    Ok(Changed { node, version })
}

fn not_found(e: StoreError) -> ApiError {
    match e {
        StoreError::NotFound(m) => ApiError::NotFound(m),
        e => e.into(),
    }
}

fn agent_remote(caller: &Caller) -> Result<IpAddr, ApiError> {
    match caller {
        Caller::Agent { remote } => Ok(*remote),
        _ => Err(ApiError::Forbidden("only an agent says hello".into())),
    }
}

fn check_protocol(hello: &Hello) -> Result<(), ApiError> {
    if hello.protocol == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(ApiError::Refused(format!(
            "protocol version {} is not supported (this coordinator speaks {PROTOCOL_VERSION})",
            hello.protocol
        )))
    }
}

/// Checks a node name: as [`validate_name`], and not only digits (a reference of only digits
/// is an id).
///
/// # Errors
/// [`ApiError::Invalid`].
pub fn validate_node_name(name: &str) -> Result<(), ApiError> {
    meshlink_api::NodeName::new(name)
        .map(drop)
        .map_err(|e| ApiError::Invalid(e.to_string()))
}

fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if labels.len() > MAX_LABELS {
        return Err(ApiError::Invalid(format!("at most {MAX_LABELS} labels")));
    }
    for (k, v) in labels {
        if k.is_empty()
            || k.len() > MAX_LABEL_KEY
            || v.len() > MAX_LABEL_VALUE
            || k.chars().any(char::is_control)
            || v.chars().any(char::is_control)
        {
            return Err(ApiError::Invalid(format!(
                "label {k:?} is not valid: keys are 1 to {MAX_LABEL_KEY} bytes, values up to {MAX_LABEL_VALUE}, no control characters"
            )));
        }
    }
    Ok(())
}

/// Cleans reported endpoints: IPv4-mapped IPv6 becomes IPv4; port 0, unspecified, multicast,
/// broadcast, loopback and link-local addresses are dropped; repeats are dropped, order is
/// kept.
///
/// # Errors
/// [`ApiError::Invalid`] when more than [`MAX_ENDPOINTS`] remain.
pub fn clean_endpoints(reported: &[SocketAddr]) -> Result<Vec<SocketAddr>, ApiError> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for ep in reported {
        let ep = SocketAddr::new(ep.ip().to_canonical(), ep.port());
        // Addresses that would make peers send to themselves (loopback), onto their own
        // link (link-local) or to no single host are dropped: a node must not be able to point
        // its peers' traffic back at them or at their neighbours.
        let unusable = ep.port() == 0
            || ep.ip().is_unspecified()
            || ep.ip().is_multicast()
            || ep.ip().is_loopback()
            || match ep.ip() {
                IpAddr::V4(v4) => v4.is_broadcast() || v4.is_link_local(),
                IpAddr::V6(v6) => v6.is_unicast_link_local(),
            };
        if !unusable && !out.contains(&ep) {
            out.push(ep);
        }
    }
    if out.len() > MAX_ENDPOINTS {
        return Err(ApiError::Invalid(format!(
            "at most {MAX_ENDPOINTS} endpoints"
        )));
    }
    Ok(out)
}

/// The endpoint seen from the coordinator: `remote` with the port of the first reported
/// endpoint of the same family (or of the first one). `None` without reported endpoints,
/// for a loopback or unspecified `remote`, or when it is already reported.
pub fn observed_endpoint(reported: &[SocketAddr], remote: IpAddr) -> Option<SocketAddr> {
    let remote = remote.to_canonical();
    if remote.is_loopback() || remote.is_unspecified() {
        return None;
    }
    let port = reported
        .iter()
        .find(|e| e.is_ipv4() == remote.is_ipv4())
        .or_else(|| reported.first())?
        .port();
    let observed = SocketAddr::new(remote, port);
    (!reported.contains(&observed)).then_some(observed)
}

/// What peers see of a node.
pub fn peer_info(node: &NodeRecord) -> PeerInfo {
    let mut endpoints = node.endpoints.clone();
    if let Some(o) = node.observed {
        if !endpoints.contains(&o) {
            endpoints.push(o);
        }
    }
    PeerInfo {
        node_id: node.id,
        name: node.name.clone(),
        public_key: node.public_key,
        next_key: node.next_key,
        addresses: std::iter::once(IpNet::V4(Ipv4Net::from(node.address)))
            .chain(node.address6.map(|a| IpNet::V6(a.into())))
            .collect(),
        allowed_ips: Vec::new(),
        endpoints,
        labels: node.labels.clone(),
        tags: node.tags.clone(),
        via: node.via,
    }
}

/// The welcome for a node of `network`; `node_secret` only right after a join;
/// `coordinators`: every coordinator of the mesh, for the agent to fail over to.
pub fn welcome(
    node: &NodeRecord,
    network: &NetworkRecord,
    node_secret: Option<String>,
    coordinators: Vec<String>,
) -> Welcome {
    // The prefix length of a valid Ipv4Net always fits an address of it.
    let address = Ipv4Net::new(node.address, network.cidr.prefix_len())
        .unwrap_or_else(|_| Ipv4Net::from(node.address));
    Welcome {
        talker_reports: false,
        node_id: node.id,
        name: node.name.clone(),
        network: network.name.clone(),
        network_cidr: IpNet::V4(network.cidr),
        addresses: std::iter::once(IpNet::V4(address))
            .chain(node.address6.map(|a| {
                // A /48 always fits an IPv6 address.
                IpNet::V6(Ipv6Net::new(a, ipam::CIDR6_LEN).unwrap_or_else(|_| a.into()))
            }))
            .collect(),
        node_secret,
        coordinators,
        reflect_port: None,
        relay: false,
        path_reports: false,
        confirms_handovers: false,
        handover: false,
        network_cidr6: network.cidr6.map(IpNet::V6),
    }
}

/// The map of a network at `version`: every node that is not revoked, every workload, and
/// the policy in force.
pub fn netmap(
    version: u64,
    nodes: &[NodeRecord],
    workloads: &[WorkloadRecord],
    policy: Option<meshlink_proto::Policy>,
) -> Netmap {
    Netmap {
        version,
        peers: nodes
            .iter()
            .filter(|n| !n.revoked)
            .map(|n| (n.id, peer_info(n)))
            .collect(),
        workloads: workloads
            .iter()
            .map(|w| (w.name.clone(), super::workloads::info(w)))
            .collect(),
        policy,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn endpoints_are_cleaned() {
        let got = clean_endpoints(&[
            sa("198.18.0.1:51820"),
            sa("0.0.0.0:51820"),
            sa("198.18.0.2:0"),
            sa("[::ffff:198.18.0.3]:51820"),
            sa("198.18.0.1:51820"),
            sa("224.0.0.1:5"),
        ])
        .unwrap();
        assert_eq!(got, vec![sa("198.18.0.1:51820"), sa("198.18.0.3:51820")]);
        let many: Vec<SocketAddr> = (1..=17)
            .map(|p| SocketAddr::new("198.18.0.1".parse().unwrap(), p))
            .collect();
        assert!(clean_endpoints(&many).is_err());
    }

    /// A node must not make its peers send to themselves (loopback) or onto their own link
    /// (link-local), nor anywhere that is no single host.
    #[test]
    fn endpoints_that_point_back_at_the_peers_are_dropped() {
        let got = clean_endpoints(&[
            sa("127.0.0.1:51820"),
            sa("127.9.9.9:51820"),
            sa("[::1]:51820"),
            sa("169.254.1.1:51820"),
            sa("[fe80::1]:51820"),
            sa("[ff02::1]:51820"),
            sa("[::]:51820"),
            sa("[::ffff:127.0.0.1]:51820"),
            sa("255.255.255.255:51820"),
            sa("198.18.0.7:51820"),
            sa("[fd00::7]:51820"),
        ])
        .unwrap();
        assert_eq!(got, vec![sa("198.18.0.7:51820"), sa("[fd00::7]:51820")]);
    }

    #[test]
    fn observed_endpoint_takes_the_wireguard_port() {
        let reported = [sa("[fd00::1]:4000"), sa("10.0.0.5:51820")];
        assert_eq!(
            observed_endpoint(&reported, "198.18.1.1".parse().unwrap()),
            Some(sa("198.18.1.1:51820"))
        );
        assert_eq!(
            observed_endpoint(&reported, "::ffff:198.18.1.1".parse().unwrap()),
            Some(sa("198.18.1.1:51820"))
        );
        assert_eq!(
            observed_endpoint(&reported, "10.0.0.5".parse().unwrap()),
            None,
            "already reported"
        );
        assert_eq!(
            observed_endpoint(&reported, "127.0.0.1".parse().unwrap()),
            None
        );
        assert_eq!(observed_endpoint(&[], "198.18.1.1".parse().unwrap()), None);
    }

    #[test]
    fn node_names() {
        assert!(validate_node_name("web-1").is_ok());
        assert!(validate_node_name("123").is_err());
        assert!(validate_node_name("Web").is_err());
    }
}
