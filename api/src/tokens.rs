//! Join tokens: `POST /v1/tokens`, `GET /v1/tokens` (`DELETE /v1/tokens/{id}` has no body).

use serde::{Deserialize, Serialize};

use crate::{TokenId, UnixTime};

/// `POST /v1/tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// The network a joining node lands in.
    pub network: String,
    /// Tags every node joining with the token gets. Absent: none.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Lifetime in seconds from now. Absent or `null`: never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_secs: Option<u64>,
    /// How many joins it allows. Absent or `null`: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses: Option<u64>,
}

/// A token just created: the only answer that holds the token text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedToken {
    /// Id, for revocation.
    pub id: TokenId,
    /// The join token (`mlj1_...`), with the coordinators' addresses and fingerprint in it.
    pub token: String,
    /// Network.
    pub network: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Expiry; `null`: never.
    pub expires_at: Option<UnixTime>,
    /// Use limit; `null`: unlimited.
    pub uses: Option<u64>,
    /// Uses so far.
    pub used: u64,
}

/// A token, as listed (never the secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    /// Id.
    pub id: TokenId,
    /// Network.
    pub network: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Expiry; `null`: never.
    pub expires_at: Option<UnixTime>,
    /// Use limit; `null`: unlimited.
    pub uses: Option<u64>,
    /// Uses so far.
    pub used: u64,
    /// Revoked by an operator.
    pub revoked: bool,
    /// Past its expiry when the list was made.
    pub expired: bool,
    /// Creation time.
    pub created_at: UnixTime,
}
