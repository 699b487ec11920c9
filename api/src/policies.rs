//! Access policies and tags: `/v1/networks/{network}/policy` (set, show, clear),
//! `.../policy/history`, `.../policy/rollback`, `/v1/policy/test`, and the tag edits of nodes
//! and workloads.

use serde::{Deserialize, Serialize};

use crate::{MapVersion, NetworkName, UnixTime};

/// `POST /v1/networks/{network}/policy`: the policy file, as text (TOML).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetPolicy {
    /// The whole file.
    pub source: String,
}

/// `POST /v1/networks/{network}/policy/rollback`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackPolicy {
    /// The version to restore (it becomes a new version).
    pub version: u64,
}

/// One version of a network's policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyVersion {
    /// The network.
    pub network: String,
    /// The version: 1, 2, ...
    pub version: u64,
    /// The policy file; `null`: this version cleared the policy (the network is open).
    pub source: Option<String>,
    /// How many rules it has (0 when cleared).
    pub rules: u64,
    /// Who set it: the admin token's name.
    pub author: String,
    /// When.
    pub created_at: UnixTime,
    /// For a rollback, the version it restored; `null`: none.
    pub restored: Option<u64>,
}

/// The answer to a policy change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyChanged {
    /// The version now in force.
    pub policy: PolicyVersion,
    /// The map version that carries it to the agents.
    pub map_version: MapVersion,
    /// What the operator should know (selectors naming nobody yet; on a rollback, tests that
    /// fail now).
    pub warnings: Vec<String>,
}

/// `POST /v1/policy/test`: the verdict on one flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestFlow {
    /// The network. Absent: the one network where `from` names a node or workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkName>,
    /// Source: a node or workload name (`node:NAME`, `workload:NAME` when both exist).
    pub from: String,
    /// Destination, the same way.
    pub to: String,
    /// `tcp:PORT`, `udp:PORT` or `icmp`.
    pub port: String,
}

/// The rule that decided a verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleView {
    /// Its position in the file, from 1.
    pub number: u64,
    /// The line it starts on.
    pub line: u64,
    /// Its selectors and ports, as written.
    pub from: Vec<String>,
    /// Destinations.
    pub to: Vec<String>,
    /// Ports.
    pub ports: Vec<String>,
}

/// The answer of `POST /v1/policy/test`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowVerdict {
    /// The network the flow was judged in.
    pub network: String,
    /// Allowed or not.
    pub allowed: bool,
    /// The policy version that judged it; `null`: the network has no policy (open).
    pub policy_version: Option<u64>,
    /// The first rule allowing it; `null`: denied (no rule allows it) or no policy.
    pub rule: Option<RuleView>,
    /// The verdict in one line for people.
    pub reason: String,
}

/// `POST /v1/nodes/{node}/tags` and `POST /v1/workloads/{name}/tags`: `+TAG` adds, `-TAG`
/// removes, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditTags {
    /// The edits.
    pub edits: Vec<String>,
}
