//! Nodes: `GET /v1/nodes`, `GET /v1/nodes/{ref}`, `POST /v1/nodes/{ref}/revoke`,
//! `POST /v1/nodes/{ref}/rotate-key` (`DELETE /v1/nodes/{ref}` has no body).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

use meshlink_proto::control::{PathKind, RelayTransport};
use meshlink_proto::PublicKey;
use serde::{Deserialize, Serialize};

use crate::{NodeId, UnixTime};

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
