//! Join tokens: creation, listing (never the secret), revocation, and the usability check
//! that a join runs.

use meshlink_api::{self as api, TokenLifetime, TokenUses};

use super::policy::validate_tags;
use super::{hash_secret, require_admin, ApiError, Caller};
use crate::store::{NewToken, Store, StoreError, TokenId, TokenRecord, UnixTime};

/// A token to create, with every limit decided: `None` here means *no* limit.
///
/// This is not the admin API's request, where an absent limit means the default (one use, one
/// hour): [`CreateToken::from`] an [`api::CreateToken`] fills those defaults in, and is the
/// only way a request from outside gets here.
#[derive(Debug, Clone)]
pub struct CreateToken {
    /// The network a joining node lands in.
    pub network: String,
    /// Tags every node joining with the token gets.
    pub tags: Vec<String>,
    /// Lifetime in seconds from now; `None`: never expires.
    pub expires_in_secs: Option<u64>,
    /// How many joins it allows; `None`: unlimited.
    pub uses: Option<u64>,
}

impl From<api::CreateToken> for CreateToken {
    /// The request with the defaults of [`meshlink_api::DEFAULT_TOKEN_USES`] and
    /// [`meshlink_api::DEFAULT_TOKEN_LIFETIME_SECS`] for what it leaves out.
    fn from(req: api::CreateToken) -> Self {
        let api::CreateToken {
            network,
            tags,
            expires_in_secs,
            uses,
        } = req;
        CreateToken {
            network: network.into(),
            tags,
            expires_in_secs: match expires_in_secs {
                None => Some(api::DEFAULT_TOKEN_LIFETIME_SECS),
                Some(TokenLifetime::Secs(secs)) => Some(secs),
                Some(TokenLifetime::Never) => None,
            },
            uses: match uses {
                None => Some(api::DEFAULT_TOKEN_USES),
                Some(TokenUses::Limit(n)) => Some(n),
                Some(TokenUses::Unlimited) => None,
            },
        }
    }
}

/// Why a token cannot be used now, or `None` when it can.
pub fn unusable_reason(token: &TokenRecord, now: UnixTime) -> Option<&'static str> {
    if token.revoked {
        Some("the join token was revoked")
    } else if is_expired(token, now) {
        Some("the join token has expired")
    } else if token.max_uses.is_some_and(|max| token.used >= max) {
        Some("the join token has no uses left")
    } else {
        None
    }
}

/// Whether the token's lifetime is over at `now`.
pub fn is_expired(token: &TokenRecord, now: UnixTime) -> bool {
    token.expires_at.is_some_and(|at| at <= now)
}

/// Creates a token whose secret is `secret` (the caller draws it; only its hash is stored).
///
/// # Errors
/// [`ApiError::NotFound`] when the network does not exist, [`ApiError::Invalid`] for bad
/// tags, a zero lifetime or zero uses.
pub async fn create_token(
    store: &dyn Store,
    now: UnixTime,
    caller: &Caller,
    req: CreateToken,
    secret: &str,
) -> Result<TokenRecord, ApiError> {
    require_admin(caller)?;
    validate_tags(&req.tags)?;
    let expires_at = match req.expires_in_secs {
        Some(0) => {
            return Err(ApiError::Invalid(
                "expires_in_secs must be at least 1".into(),
            ))
        }
        Some(secs) => Some(
            i64::try_from(secs)
                .ok()
                .and_then(|s| now.checked_add(s))
                .ok_or_else(|| ApiError::Invalid("expires_in_secs is too large".into()))?,
        ),
        None => None,
    };
    if req.uses == Some(0) {
        return Err(ApiError::Invalid("uses must be at least 1".into()));
    }
    if store.network(&req.network).await?.is_none() {
        return Err(ApiError::NotFound(format!(
            "no network named {:?}",
            req.network
        )));
    }
    let new = NewToken {
        secret_hash: hash_secret(secret),
        network: req.network,
        tags: req.tags,
        expires_at,
        max_uses: req.uses,
        created_at: now,
    };
    store.create_token(new).await.map_err(|e| match e {
        StoreError::NotFound(m) => ApiError::NotFound(m),
        e => e.into(),
    })
}

/// Every token, by id.
///
/// # Errors
/// [`ApiError::Forbidden`] for non-admins; [`ApiError::Internal`].
pub async fn list_tokens(store: &dyn Store, caller: &Caller) -> Result<Vec<TokenRecord>, ApiError> {
    require_admin(caller)?;
    Ok(store.tokens().await?)
}

/// Revokes a token; revoking a revoked token is not an error. Nodes that joined with it stay.
///
/// # Errors
/// [`ApiError::NotFound`] when no such token exists.
pub async fn revoke_token(store: &dyn Store, caller: &Caller, id: TokenId) -> Result<(), ApiError> {
    require_admin(caller)?;
    if store.revoke_token(id).await? {
        Ok(())
    } else {
        Err(ApiError::NotFound(format!("no join token with id {id}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> TokenRecord {
        TokenRecord {
            id: 1,
            secret_hash: String::new(),
            network: "n".into(),
            tags: vec![],
            expires_at: Some(100),
            max_uses: Some(2),
            used: 1,
            revoked: false,
            created_at: 0,
        }
    }

    #[test]
    fn usability() {
        assert_eq!(unusable_reason(&token(), 99), None);
        assert!(unusable_reason(&token(), 100).unwrap().contains("expired"));
        assert!(unusable_reason(&TokenRecord { used: 2, ..token() }, 0)
            .unwrap()
            .contains("no uses"));
        assert!(unusable_reason(
            &TokenRecord {
                revoked: true,
                ..token()
            },
            0
        )
        .unwrap()
        .contains("revoked"));
        assert_eq!(
            unusable_reason(
                &TokenRecord {
                    expires_at: None,
                    max_uses: None,
                    used: 9,
                    ..token()
                },
                1 << 40
            ),
            None
        );
    }

    #[test]
    fn tags() {
        assert!(validate_tags(&["web".into(), "eu-west.1".into()]).is_ok());
        // A tag must be a name a policy can select (`tag:NAME`).
        assert!(validate_tags(&["role=web".into()]).is_err());
        assert!(validate_tags(&["Web".into()]).is_err());
        assert!(validate_tags(&["".into()]).is_err());
        assert!(validate_tags(&["a b".into()]).is_err());
        assert!(validate_tags(&vec!["x".to_string(); 33]).is_err());
    }
}
