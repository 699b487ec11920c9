//! Networks: `POST /v1/networks` and `GET /v1/networks`.

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::{MapVersion, NetworkName, UnixTime};

/// `POST /v1/networks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateNetwork {
    /// Name, `[a-z0-9-]{1,63}`.
    pub name: NetworkName,
    /// IPv4 prefix, such as `100.64.0.0/16`. Text, not a parsed prefix: the coordinator checks
    /// it and says what is wrong with it.
    pub cidr: String,
}

/// A network, as created and as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    /// Name.
    pub name: String,
    /// Prefix its nodes and workloads get their addresses from, such as `100.64.0.0/16`.
    pub cidr: Ipv4Net,
    /// Map version.
    pub version: MapVersion,
    /// Nodes that are not revoked.
    pub nodes: u64,
    /// Nodes with a live session.
    pub online: u64,
    /// Creation time.
    pub created_at: UnixTime,
}
