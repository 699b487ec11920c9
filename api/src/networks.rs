//! Networks: `POST /v1/networks` and `GET /v1/networks`.

use ipnet::{Ipv4Net, Ipv6Net};
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
    /// IPv6 ULA /48 (`fdXX:XXXX:XXXX::/48`): the network's nodes and workloads also get an
    /// IPv6 address, the /48 with their IPv4 address in the low 32 bits. Absent: IPv4 only.
    /// Set at creation only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr6: Option<String>,
}

/// A network, as created and as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    /// Name.
    pub name: String,
    /// Prefix its nodes and workloads get their addresses from, such as `100.64.0.0/16`.
    pub cidr: Ipv4Net,
    /// Its IPv6 ULA /48. Absent: IPv4 only (left out, so that the answer for such a network
    /// is what it was before IPv6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr6: Option<Ipv6Net>,
    /// Map version.
    pub version: MapVersion,
    /// Nodes that are not revoked.
    pub nodes: u64,
    /// Nodes with a live session.
    pub online: u64,
    /// Creation time.
    pub created_at: UnixTime,
}
