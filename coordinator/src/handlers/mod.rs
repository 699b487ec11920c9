//! The coordinator's operations as plain functions of `(store, now, caller, request)`.
//!
//! They validate, decide and write to the [`Store`](crate::store::Store); they read no clock,
//! draw no random numbers (secrets are passed in) and touch no socket, so every rule here is
//! tested against a temporary database alone. What a change means for live sessions (deltas,
//! kicks) is applied afterwards by [`crate::service`], from what these functions return.
//!
//! Errors are [`ApiError`], grouped by who is at fault; [`crate::admin`] maps them to HTTP
//! statuses and [`crate::server`] to `Refused` messages, each in one function.

pub mod external;
pub mod networks;
pub mod nodes;
pub mod policy;
pub mod tokens;
pub mod workloads;

use std::net::IpAddr;

use meshlink_proto::NodeId;
use sha2::{Digest, Sha256};

use crate::store::StoreError;

/// Who is asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// An operator, through the admin API (already authenticated by its bearer token).
    Admin,
    /// An agent that has not proven an identity yet, connecting from `remote`.
    Agent {
        /// The source address of its QUIC connection.
        remote: IpAddr,
    },
    /// An authenticated node, connecting from `remote`.
    Node {
        /// Which node.
        id: NodeId,
        /// The source address of its QUIC connection.
        remote: IpAddr,
    },
}

/// Why an operation was not done. Each message is one line meant for the operator or the
/// agent's log; none contains a secret.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The caller's request is malformed or breaks a rule (a bad name, prefix or limit).
    #[error("{0}")]
    Invalid(String),
    /// The caller's credentials are wrong or unknown.
    #[error("{0}")]
    Unauthorized(String),
    /// The caller is known but may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// What the caller refers to does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request clashes with existing state (a name taken, overlapping prefixes, an
    /// ambiguous name).
    #[error("{0}")]
    Conflict(String),
    /// The request is well-formed but refused by state the caller cannot fix alone: a join
    /// token expired, used up or revoked, a revoked node, a full network.
    #[error("{0}")]
    Refused(String),
    /// The coordinator failed (its database); the caller may retry.
    #[error("internal error: {0}")]
    Internal(#[from] StoreError),
}

impl ApiError {
    /// The text to show a remote caller: internal failures are not detailed.
    pub fn public_message(&self) -> String {
        match self {
            ApiError::Internal(e) if e.is_unavailable() => {
                "the database is unavailable: nothing was changed; retry once it is back"
                    .to_string()
            }
            ApiError::Internal(_) => "internal error; try again later".to_string(),
            other => other.to_string(),
        }
    }
}

/// Refuses every caller but [`Caller::Admin`].
///
/// # Errors
/// [`ApiError::Forbidden`].
pub fn require_admin(caller: &Caller) -> Result<(), ApiError> {
    match caller {
        Caller::Admin => Ok(()),
        _ => Err(ApiError::Forbidden("this needs the admin token".into())),
    }
}

/// Lowercase hex SHA-256 of a secret: what the store keeps instead of it.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks a name (network, workload, admin token): 1 to 63 of `a-z`, `0-9` and `-`, the rule
/// of the admin API's name types ([`meshlink_api::check_name`]), for requests that do not come
/// through them (the service's own callers, configuration files).
///
/// # Errors
/// [`ApiError::Invalid`] naming `what`.
pub fn validate_name(what: &'static str, name: &str) -> Result<(), ApiError> {
    meshlink_api::check_name(what, name).map_err(|e| ApiError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("network", "prod-eu-1").is_ok());
        assert!(validate_name("network", "").is_err());
        assert!(validate_name("network", "Prod").is_err());
        assert!(validate_name("network", "a_b").is_err());
        assert!(validate_name("network", &"a".repeat(64)).is_err());
    }

    #[test]
    fn hashing_and_comparison() {
        assert_eq!(hash_secret("abc").len(), 64);
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn internal_errors_are_not_detailed_to_callers() {
        let e = ApiError::Internal(StoreError::Corrupt("secret detail".into()));
        assert!(!e.public_message().contains("secret detail"));
        assert_eq!(ApiError::Refused("no".into()).public_message(), "no");
    }
}
