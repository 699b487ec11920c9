//! Nodes: `GET /v1/nodes`, `GET /v1/nodes/{ref}`, `POST /v1/nodes/{ref}/revoke`,
//! `POST /v1/nodes/{ref}/rotate-key` (`DELETE /v1/nodes/{ref}` has no body), and external
//! nodes: `POST /v1/external-nodes`, `GET /v1/external-nodes/{ref}`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::{Ipv4Net, Ipv6Net};

use meshlink_proto::control::{PathKind, RelayTransport};
use meshlink_proto::PublicKey;
use serde::{Deserialize, Serialize};

use crate::{NetworkName, NodeId, NodeName, UnixTime};

/// A node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Id.
    pub id: NodeId,
    /// Name, unique in its network.
    pub name: String,
    /// Network.
    pub network: String,
    /// Overlay address, without prefix length (`100.64.0.1`).
    pub address: Ipv4Addr,
    /// IPv6 overlay address, when its network has an IPv6 prefix. Absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address6: Option<Ipv6Addr>,
    /// WireGuard public key (base64).
    pub public_key: PublicKey,
    /// Labels the agent reported (`provider=aws`).
    pub labels: BTreeMap<String, String>,
    /// Tags, from its join token.
    pub tags: Vec<String>,
    /// Endpoints as peers see them, `ip:port`: reported, then observed.
    pub endpoints: Vec<SocketAddr>,
    /// Has a live session.
    pub online: bool,
    /// Last session start or end; `null`: never.
    pub last_seen: Option<UnixTime>,
    /// Revoked.
    pub revoked: bool,
    /// Join time.
    pub created_at: UnixTime,
    /// When its WireGuard key became its key (the join, or the end of its last rotation).
    /// Absent from coordinators before key rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_since: Option<UnixTime>,
    /// Its next WireGuard key while it rotates: peers accept both until the node switches.
    /// Absent: no rotation under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_key: Option<PublicKey>,
    /// When a rotation was asked for (by an operator or the schedule) that the node has not
    /// answered with a next key yet. Absent: none waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation_asked: Option<UnixTime>,
    /// When the node expires if it stays away (no session) until then: the coordinator's
    /// `node_expiry` after its last session. Absent: it does not (expiry off, it has a
    /// session, or it is revoked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<UnixTime>,
    /// When it was revoked for staying away too long; it must join again. Absent: it did not
    /// expire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expired_at: Option<UnixTime>,
    /// What the node last reported of its paths to its peers, to the coordinator that
    /// answered. Absent: no report there (an agent from before path reports, or one whose
    /// session is on another coordinator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths: Option<NodePaths>,
    /// An external node (a device that runs stock WireGuard, no agent): the name of the node
    /// whose agent it reaches the mesh through, its gateway. Absent: a node with an agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
}

/// `POST /v1/external-nodes`: registers a device that runs stock WireGuard (a phone, a
/// router, an appliance) as a node of a network. It gets an address like any node; it is a
/// WireGuard peer of its gateway's agent only, which forwards its packets to and from the
/// rest of the mesh (every other node routes its address to the gateway).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateExternalNode {
    /// Name, unique in its network.
    pub name: NodeName,
    /// Network.
    pub network: NetworkName,
    /// The device's WireGuard public key. Its private key stays on the device (or on the
    /// machine of the `meshctl` that made it): the coordinator never sees it.
    pub public_key: PublicKey,
    /// The gateway: a node name or id of the same network, with an agent.
    pub via: String,
    /// Tags, which access policies select by (`tag:NAME`). Absent: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// An external node and what its WireGuard configuration needs: the answer of
/// `POST /v1/external-nodes` and `GET /v1/external-nodes/{ref}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalNode {
    /// The node.
    pub node: Node,
    /// Its network's prefix: what the device routes to its gateway.
    pub network_cidr: Ipv4Net,
    /// Its network's IPv6 prefix, routed to the gateway too. Absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_cidr6: Option<Ipv6Net>,
    /// Its gateway.
    pub gateway: Gateway,
}

/// The node an external node reaches the mesh through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gateway {
    /// Id.
    pub id: NodeId,
    /// Name.
    pub name: String,
    /// Its WireGuard public key: the device's one peer.
    pub public_key: PublicKey,
    /// Its overlay address.
    pub address: Ipv4Addr,
    /// Its endpoints as peers see them, best first (reported, then observed); empty when it
    /// never reported any (then the operator names one).
    pub endpoints: Vec<SocketAddr>,
    /// Has a live session.
    pub online: bool,
}

/// `POST /v1/nodes/{ref}/rotate-key`, optional body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateKey {
    /// An external node's new public key (required for one: its device made the key pair,
    /// the node switches to it at once). Absent for a node with an agent, which makes its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<PublicKey>,
}

/// A node's report of its paths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePaths {
    /// When the report arrived.
    pub reported_at: UnixTime,
    /// One entry per peer.
    pub peers: Vec<PeerPath>,
}

/// How a node reaches one peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerPath {
    /// The peer's id.
    pub peer: NodeId,
    /// The peer's name, when the coordinator knows it.
    #[serde(default)]
    pub peer_name: Option<String>,
    /// `direct`, `relay`, `unconfirmed` or `none`.
    pub kind: PathKind,
    /// The peer's address (direct) or the relay's (relay).
    #[serde(default)]
    pub via: Option<SocketAddr>,
    /// What a relayed path runs over: `udp` or `tcp`.
    #[serde(default)]
    pub over: Option<RelayTransport>,
    /// The standalone relay's name, for a path through one (absent: the coordinator's relay,
    /// or not relayed).
    #[serde(default)]
    pub relay: Option<String>,
    /// Round trip of a direct path, in microseconds.
    #[serde(default)]
    pub rtt_us: Option<u64>,
    /// Seconds since the path changed, as of the report.
    #[serde(default)]
    pub changed_secs_ago: Option<u64>,
}
