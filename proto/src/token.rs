//! Join tokens: what `meshctl token create` prints and `meshlink-agent up --token` takes.
//!
//! A token carries everything an agent needs for first contact: the coordinator's address, the
//! SHA-256 fingerprint of its certificate (so the agent needs no CA), and a secret. Text form:
//! `mlj1_` followed by unpadded base64url of a small JSON object. The secret makes the token a
//! credential: treat it like a password.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};

const PREFIX: &str = "mlj1_";

/// A parsed join token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    /// The coordinator's QUIC address, `host:port`.
    #[serde(rename = "c")]
    pub coordinator: String,
    /// Hex SHA-256 of the coordinator's certificate (DER).
    #[serde(rename = "f")]
    pub fingerprint: String,
    /// The secret the coordinator checks.
    #[serde(rename = "s")]
    pub secret: String,
}

/// Why text is not a join token. Never includes the text (it holds a secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Wrong prefix: not a meshlink join token, or a newer format.
    #[error("not a meshlink join token (expected it to start with {PREFIX})")]
    Prefix,
    /// The body does not decode.
    #[error("the join token is damaged (was it copied whole?)")]
    Damaged,
}

impl JoinToken {
    /// The token's text form.
    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).expect("a token always serializes");
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }

    /// Parses the text form (surrounding whitespace ignored).
    ///
    /// # Errors
    /// [`TokenError`].
    pub fn decode(text: &str) -> Result<Self, TokenError> {
        let body = text.trim().strip_prefix(PREFIX).ok_or(TokenError::Prefix)?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError::Damaged)?;
        let t: JoinToken = serde_json::from_slice(&json).map_err(|_| TokenError::Damaged)?;
        if t.secret.is_empty() || t.coordinator.is_empty() || t.fingerprint.len() != 64 {
            return Err(TokenError::Damaged);
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let t = JoinToken {
            coordinator: "198.18.1.1:7443".into(),
            fingerprint: "ab".repeat(32),
            secret: "sekret".into(),
        };
        let s = t.encode();
        assert!(s.starts_with("mlj1_"));
        assert_eq!(JoinToken::decode(&format!(" {s}\n")).unwrap(), t);
        assert_eq!(JoinToken::decode("xyz"), Err(TokenError::Prefix));
        assert_eq!(
            JoinToken::decode(&s[..s.len() - 4]),
            Err(TokenError::Damaged)
        );
        let e = JoinToken::decode(&s[..s.len() - 4])
            .unwrap_err()
            .to_string();
        assert!(!e.contains("sekret"));
    }
}
