//! The topology page's data: `GET /v1/topology[?network=N]` answers one [`Topology`], and
//! `GET /v1/topology/stream[?network=N]` sends one as a server-sent event at once and again
//! whenever it changes.
//!
//! A [`Topology`] is a picture, not a record: the nodes of each network grouped by their
//! `provider` label, whether each has a live session, the paths the nodes last reported to
//! their peers, and which node holds each workload address. Revoked nodes are left out.

use std::net::{Ipv4Addr, SocketAddr};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::{Generation, MapVersion, NodeId, PathKind, RelayTransport, WorkloadState};

/// The label whose value groups nodes on the page.
pub const PROVIDER_LABEL: &str = "provider";

/// Every network the caller may see, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// By name.
    pub networks: Vec<TopologyNetwork>,
}

/// One network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopologyNetwork {
    /// Name.
    pub name: String,
    /// Its prefix.
    pub cidr: Ipv4Net,
    /// Map version.
    pub version: MapVersion,
    /// Its nodes by [`PROVIDER_LABEL`], groups by provider name, the group of nodes without
    /// the label last.
    pub providers: Vec<ProviderGroup>,
    /// The paths its online nodes last reported to its other nodes, by reporting node then
    /// peer (an offline node's report is stale and left out).
    pub paths: Vec<TopologyPath>,
    /// Its workloads, by name.
    pub workloads: Vec<TopologyWorkload>,
}

/// The nodes of one provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderGroup {
    /// The `provider` label's value; `null`: the nodes without one.
    pub provider: Option<String>,
    /// Its nodes, by name.
    pub nodes: Vec<TopologyNode>,
}

/// One node as the page shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopologyNode {
    /// Id.
    pub id: NodeId,
    /// Name.
    pub name: String,
    /// Overlay address.
    pub address: Ipv4Addr,
    /// Whether it has a live control session (here, or on another coordinator of a shared
    /// store).
    pub online: bool,
}

/// One node's last report of its path to one peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopologyPath {
    /// The node that reported it.
    pub from: NodeId,
    /// The peer.
    pub to: NodeId,
    /// Direct, relayed, unconfirmed or none.
    pub kind: PathKind,
    /// The peer's address (direct) or the relay's (relayed); `null`: none reported.
    pub via: Option<SocketAddr>,
    /// What a relayed path runs over; `null`: not relayed, or not reported.
    pub over: Option<RelayTransport>,
    /// Round trip of a direct path in microseconds; `null`: not measured.
    pub rtt_us: Option<u64>,
}

/// One workload address and its holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopologyWorkload {
    /// Name.
    pub name: String,
    /// Its overlay address.
    pub address: Ipv4Addr,
    /// The node holding it; `null`: detached (or held by a node that was since removed).
    pub holder: Option<NodeId>,
    /// The holder's name; `null` with `holder`.
    pub holder_name: Option<String>,
    /// Bumped by every change of holder.
    pub generation: Generation,
    /// Whether its address is answered for now.
    pub state: WorkloadState,
}

impl Topology {
    /// Only the network called `name` (nothing when there is none).
    #[must_use]
    pub fn only(&self, name: &str) -> Topology {
        Topology {
            networks: self
                .networks
                .iter()
                .filter(|n| n.name == name)
                .cloned()
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_shape_is_as_documented() {
        let t = Topology {
            networks: vec![TopologyNetwork {
                name: "prod".into(),
                cidr: "100.64.0.0/16".parse().unwrap(),
                version: MapVersion(7),
                providers: vec![ProviderGroup {
                    provider: Some("aws".into()),
                    nodes: vec![TopologyNode {
                        id: NodeId(1),
                        name: "vm-a1".into(),
                        address: Ipv4Addr::new(100, 64, 0, 1),
                        online: true,
                    }],
                }],
                paths: vec![TopologyPath {
                    from: NodeId(1),
                    to: NodeId(2),
                    kind: PathKind::Relay,
                    via: None,
                    over: Some(RelayTransport::Udp),
                    rtt_us: None,
                }],
                workloads: vec![TopologyWorkload {
                    name: "chat".into(),
                    address: Ipv4Addr::new(100, 64, 50, 10),
                    holder: Some(NodeId(1)),
                    holder_name: Some("vm-a1".into()),
                    generation: Generation(3),
                    state: WorkloadState::Held,
                }],
            }],
        };
        let json = serde_json::to_value(&t).unwrap();
        assert_eq!(json["networks"][0]["providers"][0]["provider"], "aws");
        assert_eq!(json["networks"][0]["paths"][0]["kind"], "relay");
        assert_eq!(json["networks"][0]["workloads"][0]["holder"], 1);
        assert_eq!(json["networks"][0]["workloads"][0]["state"], "held");
        let back: Topology = serde_json::from_value(json).unwrap();
        assert_eq!(back, t);
        assert_eq!(t.only("prod"), t);
        assert!(t.only("lab").networks.is_empty());
    }
}
