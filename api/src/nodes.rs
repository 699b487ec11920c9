//! Nodes: `GET /v1/nodes`, `GET /v1/nodes/{ref}`, `POST /v1/nodes/{ref}/revoke`
//! (`DELETE /v1/nodes/{ref}` has no body).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

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
}
