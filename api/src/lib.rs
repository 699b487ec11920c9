//! The coordinator's HTTP/JSON admin API as types: every request body and every answer, defined
//! once and used by both ends (`meshlink-coordinator`'s `admin` module serves them, `meshctl`
//! reads them), so the two cannot drift apart unnoticed.
//!
//! The routes, their status codes and authentication are documented with the router, in the
//! coordinator's `admin` module. This crate holds the shapes only: no HTTP, no I/O, no
//! validation beyond what the types themselves carry. Names are such types ([`NetworkName`],
//! [`NodeName`], [`WorkloadName`]: checked when made, by `meshctl` as it reads its command
//! line and by the coordinator as it decodes a request); prefixes, selectors and policy text
//! are checked by the coordinator, which says what is wrong with them. Answers carry names as
//! text, read as they come: what one coordinator stored is shown by any `meshctl`, even if a
//! later version widens the rule.
//!
//! # The wire format
//!
//! - Times are Unix seconds, integers ([`UnixTime`]). Ids, generations and map versions are
//!   integers ([`NodeId`], [`TokenId`], [`Generation`], [`MapVersion`]).
//! - An optional answer field is always sent; `null` means "none" (never expires, no holder,
//!   never seen), as each field's documentation says.
//! - An optional request field may be left out or sent as `null`: both mean the default the
//!   field's documentation names. Unknown request fields are refused (400), so that a typo is
//!   not silently ignored; unknown answer fields are ignored, so that a newer coordinator can
//!   add one without breaking an older `meshctl`.
//! - Errors are [`ErrorBody`]: `{"error": "message"}`.

mod access;
mod ids;
mod names;
mod networks;
mod nodes;
mod policies;
mod relays;
mod status;
mod tokens;
mod topology;
mod workloads;

pub use access::{AdminToken, AuditEntry, AuditFilter, CreateAdminToken, CreatedAdminToken, Role};
pub use ids::{Generation, MapVersion, NodeId, TokenId, UnixTime};
pub use meshlink_proto::control::{PathKind, RelayTransport};
pub use meshlink_proto::PublicKey;
pub use names::{check_name, NameError, NetworkName, NodeName, WorkloadName, MAX_NAME_LEN};
pub use networks::{CreateNetwork, Network};
pub use nodes::{CreateExternalNode, ExternalNode, Gateway, Node, NodePaths, PeerPath, RotateKey};
pub use policies::{
    EditTags, FlowVerdict, PolicyChanged, PolicyVersion, RollbackPolicy, RuleView, SetPolicy,
    TestFlow,
};
pub use relays::{EmbeddedRelay, Relays, StandaloneRelay};
pub use status::{CoordinatorStatus, ReflectStatus, RelayDrops, RelayStatus, Status};
pub use tokens::{
    CreateToken, CreatedToken, Token, TokenLifetime, TokenUses, DEFAULT_TOKEN_LIFETIME_SECS,
    DEFAULT_TOKEN_USES,
};
pub use topology::{
    ProviderGroup, Topology, TopologyNetwork, TopologyNode, TopologyPath, TopologyWorkload,
    PROVIDER_LABEL,
};
pub use workloads::{
    CreateWorkload, MoveWorkload, MovedWorkload, Workload, WorkloadNode, WorkloadState,
};

use serde::{Deserialize, Serialize};

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, one line for people.
    pub error: String,
}

/// `?network=` on the node and workload routes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkFilter {
    /// Only this network. Absent: every network for a list; for one node or workload, the
    /// only network that has that name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkName>,
}
