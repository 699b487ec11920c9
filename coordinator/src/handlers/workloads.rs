//! Workloads: create, list, delete, and the checks before a change of holder (attach, move,
//! detach, claim, failover). The change itself is [`commit_holder`], a compare-and-set on the
//! generation, so two racing moves cannot both win.

use std::net::Ipv4Addr;

use ipnet::{IpNet, Ipv4Net};
use meshlink_proto::{NodeId, WorkloadInfo};

use super::nodes::find_node;
use super::{require_admin, validate_name, ApiError, Caller};
use crate::store::{
    AddressChoice, NewWorkload, NodeRecord, Store, StoreError, UnixTime, WorkloadRecord,
};

/// What `POST /v1/workloads` asks for.
#[derive(Debug, Clone, Default)]
pub struct CreateWorkload {
    /// Name, unique in the network.
    pub name: String,
    /// Network.
    pub network: String,
    /// A wanted address; `None`: the lowest free one of the network.
    pub address: Option<Ipv4Addr>,
    /// Failover candidates in order (node names or ids).
    pub standby: Vec<String>,
    /// Nodes that may claim it from their own agent (names or ids).
    pub allowed: Vec<String>,
    /// Tags, which policies select by.
    pub tags: Vec<String>,
}

/// The workload as agents see it, in maps.
pub fn info(w: &WorkloadRecord) -> WorkloadInfo {
    let mut candidates: Vec<NodeId> = Vec::new();
    // Not the previous holder: once peers know of a move, they accept the address only from
    // nodes that may hold it.
    for id in w.holder.iter().chain(&w.standby).chain(&w.allowed) {
        if !candidates.contains(id) {
            candidates.push(*id);
        }
    }
    WorkloadInfo {
        id: w.id,
        name: w.name.clone(),
        address: IpNet::V4(Ipv4Net::from(w.address)),
        holder: w.holder,
        generation: w.generation,
        previous: w.previous,
        candidates,
        grace_ms: None,
        tags: w.tags.clone(),
        address6: w.address6.map(|a| IpNet::V6(a.into())),
    }
}

async fn resolve(
    store: &dyn Store,
    network: &str,
    refs: &[String],
    what: &str,
) -> Result<Vec<NodeId>, ApiError> {
    let mut out = Vec::new();
    for r in refs {
        let node = find_node(store, &Caller::Admin, r, Some(network))
            .await
            .map_err(|e| match e {
                ApiError::NotFound(m) => ApiError::NotFound(format!("{what}: {m}")),
                other => other,
            })?;
        refuse_external(&node, what)?;
        if !out.contains(&node.id) {
            out.push(node.id);
        }
    }
    Ok(out)
}

/// An external node (stock WireGuard, no agent) cannot hold a workload: nothing there would
/// put the address up, and no peer routes a workload to one.
fn refuse_external(node: &NodeRecord, what: &str) -> Result<(), ApiError> {
    if node.via.is_some() {
        return Err(ApiError::Invalid(format!(
            "{what}: node {} is an external node (stock WireGuard, no agent): it cannot hold \
             a workload",
            node.name
        )));
    }
    Ok(())
}

/// Creates a detached workload with an address of the network (admin).
///
/// # Errors
/// [`ApiError::Invalid`] for a bad name or an address outside the network's prefix (or its
/// network or broadcast address), [`ApiError::NotFound`] for an unknown network or node,
/// [`ApiError::Conflict`] when the name or address is taken, [`ApiError::Refused`] when the
/// network has no free address.
pub async fn create_workload(
    store: &dyn Store,
    now: UnixTime,
    caller: &Caller,
    req: CreateWorkload,
) -> Result<(WorkloadRecord, u64), ApiError> {
    require_admin(caller)?;
    validate_name("workload", &req.name)?;
    super::policy::validate_tags(&req.tags)?;
    let network = store
        .network(&req.network)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no network named {:?}", req.network)))?;
    if let Some(a) = req.address {
        let cidr = network.cidr;
        if !cidr.contains(&a)
            || a == cidr.network()
            || (cidr.prefix_len() < 31 && a == cidr.broadcast())
        {
            return Err(ApiError::Invalid(format!(
                "address {a} is not a usable address of network {} ({cidr})",
                network.name
            )));
        }
    }
    let standby = resolve(store, &network.name, &req.standby, "standby").await?;
    let allowed = resolve(store, &network.name, &req.allowed, "allowed").await?;
    // The wanted address, or the lowest free one chosen by the store inside its write
    // transaction (coordinators sharing it never choose the same one).
    let new = NewWorkload {
        network: network.name.clone(),
        name: req.name.clone(),
        address: req.address.map_or(
            AddressChoice::LowestFree(network.cidr),
            AddressChoice::Exact,
        ),
        standby,
        allowed,
        tags: req.tags.clone(),
        created_at: now,
    };
    store.create_workload(new).await.map_err(|e| match e {
        StoreError::AddressTaken(a) => ApiError::Conflict(format!(
            "address {a} is already taken in network {}",
            network.name
        )),
        StoreError::NetworkFull => {
            ApiError::Refused(format!("network {} has no free address", network.name))
        }
        StoreError::Conflict(m) if m.contains("workloads.name") => ApiError::Conflict(format!(
            "a workload named {} already exists in network {}",
            req.name, network.name
        )),
        StoreError::Conflict(m) => ApiError::Conflict(format!("workload {}: {m}", req.name)),
        other => other.into(),
    })
}

/// Every workload, or those of one network (admin).
///
/// # Errors
/// [`ApiError::Forbidden`] for non-admins; store failures.
pub async fn list_workloads(
    store: &dyn Store,
    caller: &Caller,
    network: Option<&str>,
) -> Result<Vec<WorkloadRecord>, ApiError> {
    require_admin(caller)?;
    Ok(store.workloads(network).await?)
}

/// One workload of a network.
///
/// # Errors
/// [`ApiError::NotFound`].
pub async fn find_workload(
    store: &dyn Store,
    network: &str,
    name: &str,
) -> Result<WorkloadRecord, ApiError> {
    store.workload(network, name).await?.ok_or_else(|| {
        ApiError::NotFound(format!("no workload named {name:?} in network {network}"))
    })
}

/// Where a workload should go, checked: the workload, and its next holder (`None`: detach).
#[derive(Debug, Clone)]
pub struct PlannedMove {
    /// The workload as it is now.
    pub workload: WorkloadRecord,
    /// The node it goes to; `None` detaches it.
    pub to: Option<NodeRecord>,
    /// A live migration: the holder's application hands over before the commit.
    pub live: bool,
}

impl PlannedMove {
    /// Whether the move changes nothing (the node already holds it).
    pub fn is_noop(&self) -> bool {
        self.workload.holder == self.to.as_ref().map(|n| n.id)
    }
}

fn check_target(w: &WorkloadRecord, node: &NodeRecord) -> Result<(), ApiError> {
    if node.network != w.network {
        return Err(ApiError::Invalid(format!(
            "node {} is in network {}, workload {} in {}",
            node.name, node.network, w.name, w.network
        )));
    }
    if node.revoked {
        return Err(ApiError::Refused(format!("node {} is revoked", node.name)));
    }
    refuse_external(node, "node")
}

/// Checks an operator's attach, move or detach (`to: None`) of a workload (admin).
///
/// # Errors
/// [`ApiError::NotFound`] for an unknown workload or node, [`ApiError::Refused`] for a revoked
/// node, [`ApiError::Invalid`] for a node of another network.
pub async fn plan_move(
    store: &dyn Store,
    caller: &Caller,
    network: &str,
    name: &str,
    to: Option<&str>,
) -> Result<PlannedMove, ApiError> {
    require_admin(caller)?;
    let workload = find_workload(store, network, name).await?;
    let to = match to {
        Some(r) => {
            let node = find_node(store, caller, r, Some(network)).await?;
            check_target(&workload, &node)?;
            Some(node)
        }
        None => None,
    };
    Ok(PlannedMove {
        workload,
        to,
        live: false,
    })
}

/// Checks a node's claim of a workload of its own network: only a node listed as allowed may
/// claim (a standby is a failover candidate, not a node that may take the workload at will).
///
/// # Errors
/// [`ApiError::Forbidden`] for other nodes and non-node callers, [`ApiError::NotFound`].
pub async fn plan_claim(
    store: &dyn Store,
    caller: &Caller,
    name: &str,
) -> Result<PlannedMove, ApiError> {
    let Caller::Node { id, .. } = caller else {
        return Err(ApiError::Forbidden(
            "only a node's own agent can claim a workload".into(),
        ));
    };
    let node = store
        .node(*id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("node {id}")))?;
    let workload = find_workload(store, &node.network, name).await?;
    if !workload.allowed.contains(&node.id) {
        return Err(ApiError::Forbidden(format!(
            "node {} is not an allowed holder of workload {name} (ask an operator to add it with --allow)",
            node.name
        )));
    }
    check_target(&workload, &node)?;
    Ok(PlannedMove {
        workload,
        to: Some(node),
        live: false,
    })
}

/// Makes a planned move durable at the next generation, provided nobody moved the workload
/// since it was planned. Returns the workload and the network's new version.
///
/// # Errors
/// [`ApiError::Conflict`] when another move won the race, [`ApiError::NotFound`] when the
/// workload was deleted meanwhile.
pub async fn commit_holder(
    store: &dyn Store,
    now: UnixTime,
    plan: &PlannedMove,
) -> Result<(WorkloadRecord, u64), ApiError> {
    let w = &plan.workload;
    store
        .set_holder(
            &w.network,
            &w.name,
            plan.to.as_ref().map(|n| n.id),
            w.expected(),
            now,
        )
        .await
        .map_err(|e| match e {
            StoreError::Conflict(m) => ApiError::Conflict(m),
            StoreError::NotFound(m) => ApiError::NotFound(m),
            other => other.into(),
        })
}

/// Deletes a workload (admin); returns it and the network's new version.
///
/// # Errors
/// [`ApiError::NotFound`].
pub async fn delete_workload(
    store: &dyn Store,
    caller: &Caller,
    network: &str,
    name: &str,
) -> Result<(WorkloadRecord, u64), ApiError> {
    require_admin(caller)?;
    let w = find_workload(store, network, name).await?;
    let v = store
        .delete_workload(network, name)
        .await
        .map_err(|e| match e {
            StoreError::NotFound(m) => ApiError::NotFound(m),
            other => other.into(),
        })?;
    Ok((w, v))
}
