//! Admin tokens with roles (`/v1/admin-tokens`) and the audit log (`/v1/audit`).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::NetworkName;

use crate::UnixTime;

/// What an admin token may do; each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// `read`: lists and status.
    Read,
    /// `operator`: also workload attach, move, detach and join tokens.
    Operator,
    /// `admin`: everything (networks, nodes, workloads, policies, tags, admin tokens).
    Admin,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Read => "read",
            Role::Operator => "operator",
            Role::Admin => "admin",
        })
    }
}

/// `POST /v1/admin-tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateAdminToken {
    /// A unique name (`[a-z0-9-]{1,63}`); the audit log names the token by it.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// The one network it may act on. Absent: every network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkName>,
}

/// An admin token, without its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminToken {
    /// Identifier.
    pub id: u64,
    /// Name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// The one network it may act on; `null`: every network.
    pub network: Option<String>,
    /// When it was made.
    pub created_at: UnixTime,
    /// Who made it (`admin:NAME`).
    pub created_by: String,
    /// When it was revoked; `null`: it works.
    pub revoked_at: Option<UnixTime>,
}

/// The answer to `POST /v1/admin-tokens`: the only time the secret is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedAdminToken {
    /// The token's fields.
    #[serde(flatten)]
    pub admin_token: AdminToken,
    /// The secret, for `Authorization: Bearer`.
    pub token: String,
}

/// `GET /v1/audit?since=&node=&limit=`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditFilter {
    /// Only entries at or after this time. Absent: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<i64>,
    /// Only entries concerning this node (as requests named it) or made by it. Absent: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// At most this many, the newest (default 100, at most 10,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// One entry of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// In order of recording.
    pub id: u64,
    /// When.
    pub at: UnixTime,
    /// Who: `admin:NAME` (an admin token; `admin:bootstrap` is the coordinator's own),
    /// `node:NAME`, or `unauthenticated`.
    pub actor: String,
    /// What: `POST /v1/workloads/chat/move`, `claim chat`, ...
    pub action: String,
    /// The network concerned; `null`: none or not known.
    pub network: Option<String>,
    /// The node concerned, as the request named it; `null`: none.
    pub node: Option<String>,
    /// The HTTP status of the answer (403 for a refused node action).
    pub status: u16,
    /// The outcome in one line (`ok`, or the error).
    pub result: String,
    /// The client's address; `null`: not known.
    pub source: Option<String>,
}
