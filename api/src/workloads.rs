//! Workloads: `POST /v1/workloads`, `GET /v1/workloads[/{name}]`, and the changes of holder
//! `POST /v1/workloads/{name}/attach|move|detach` (`DELETE /v1/workloads/{name}` has no body).

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use crate::{Generation, NetworkName, NodeId, UnixTime, WorkloadName};

/// `POST /v1/workloads`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateWorkload {
    /// Name, unique in its network.
    pub name: WorkloadName,
    /// Network.
    pub network: NetworkName,
    /// Absent or `null`: the lowest free address of the network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Ipv4Addr>,
    /// Node names or ids, in failover order. Absent: none.
    #[serde(default)]
    pub standby: Vec<String>,
    /// Node names or ids that may claim it from their own agent. Absent: none.
    #[serde(default)]
    pub allowed: Vec<String>,
    /// Tags, which access policies select by (`tag:NAME`). Absent: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// `POST /v1/workloads/{name}/attach` and `/move` (detach has no body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveWorkload {
    /// The destination: a node name or id.
    pub node: String,
    /// A live migration: the application serving the workload on its holder hands its state
    /// (its open connections, its data) over to the same application on the destination
    /// before the move commits; refused (nothing moves) when it cannot. Absent: an ordinary
    /// move.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub live: bool,
}

/// A node named in a workload. A deleted node keeps its id and has no name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadNode {
    /// Id.
    pub id: NodeId,
    /// Name; `null`: the node was deleted.
    pub name: Option<String>,
}

/// Where a workload's address is answered for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadState {
    /// `held`: a holder with a live session answers for the address.
    Held,
    /// `holder-offline`: it has a holder, but that node has no live session now.
    HolderOffline,
    /// `detached`: no holder, nobody answers for the address.
    Detached,
}

impl WorkloadState {
    /// The state as the wire writes it: `held`, `holder-offline` or `detached`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Held => "held",
            Self::HolderOffline => "holder-offline",
            Self::Detached => "detached",
        }
    }
}

impl fmt::Display for WorkloadState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A workload: an overlay address that belongs to it and moves between nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// Name, unique in its network.
    pub name: String,
    /// Network.
    pub network: String,
    /// Overlay address, without prefix length (`100.64.50.10`).
    pub address: Ipv4Addr,
    /// IPv6 overlay address, when its network has an IPv6 prefix. Absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address6: Option<Ipv6Addr>,
    /// The node holding it; `null`: detached.
    pub holder: Option<WorkloadNode>,
    /// Bumped by every change of holder; 0 until it is first attached.
    pub generation: Generation,
    /// The holder before the last change; `null`: none.
    pub previous: Option<WorkloadNode>,
    /// Failover candidates, in order.
    pub standby: Vec<WorkloadNode>,
    /// Nodes that may claim it from their own agent.
    pub allowed: Vec<WorkloadNode>,
    /// Tags, which access policies select by. Absent: none.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Whether its address is answered for now.
    pub state: WorkloadState,
    /// Creation time.
    pub created_at: UnixTime,
    /// When its holder last changed; `null`: never.
    pub moved_at: Option<UnixTime>,
}

/// The answer to attach, move and detach: the workload after the change, and what it took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MovedWorkload {
    /// The workload after the change (its fields, inline).
    #[serde(flatten)]
    pub workload: Workload,
    /// False when nothing had to change (the node already held it, or it was already
    /// detached).
    pub changed: bool,
    /// Milliseconds the destination took to report its tunnels ready; `null` when it was not
    /// asked (offline, detach, no change) or did not answer in time.
    pub prepared_ms: Option<f64>,
    /// Milliseconds the holder's application took to hand its state over (a live
    /// migration); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handed_over_ms: Option<f64>,
    /// Milliseconds from the request to the change being queued to every session.
    pub took_ms: f64,
}
