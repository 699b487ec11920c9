//! Join tokens: what `meshctl token create` prints and `meshlink-agent up --token` takes.
//!
//! A token carries everything an agent needs for first contact: the addresses of the mesh's
//! coordinators, the SHA-256 fingerprint of their certificate (every coordinator of one mesh
//! shares one identity, so the agent needs no CA and one pin), and a secret. Text form:
//! `mlj1_` followed by unpadded base64url of a small JSON object:
//!
//! - `c`: the first coordinator address (`host:port`); every token has it.
//! - `cs`: the further coordinator addresses, in the order to try them after `c`. Absent in
//!   tokens of a mesh with one coordinator, and in every token issued before 2026-12: absent
//!   means "`c` is the only address". Agents from before 2026-12 ignore it and use `c`.
//! - `f`: the certificate pin, 64 hex digits.
//! - `s`: the secret.
//!
//! The secret makes the token a credential: treat it like a password.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};

const PREFIX: &str = "mlj1_";

/// A parsed join token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    /// The first coordinator's QUIC address, `host:port`.
    #[serde(rename = "c")]
    pub coordinator: String,
    /// The other coordinators' QUIC addresses, in the order to try them after
    /// [`JoinToken::coordinator`]. Empty for one coordinator (and in older tokens).
    #[serde(rename = "cs", default, skip_serializing_if = "Vec::is_empty")]
    pub others: Vec<String>,
    /// Hex SHA-256 of the coordinators' certificate (DER).
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
    /// A token naming `coordinators` (in the order agents should try them; repeated and empty
    /// addresses are left out), or `None` when no address is left.
    pub fn new(
        coordinators: impl IntoIterator<Item = String>,
        fingerprint: String,
        secret: String,
    ) -> Option<Self> {
        let mut all = Vec::new();
        for address in coordinators {
            let address = address.trim().to_string();
            if !address.is_empty() && !all.contains(&address) {
                all.push(address);
            }
        }
        let mut all = all.into_iter();
        let coordinator = all.next()?;
        Some(JoinToken {
            coordinator,
            others: all.collect(),
            fingerprint,
            secret,
        })
    }

    /// Every coordinator address the token names, first [`JoinToken::coordinator`], each once.
    pub fn coordinators(&self) -> Vec<String> {
        let mut all: Vec<String> = Vec::with_capacity(1 + self.others.len());
        for address in std::iter::once(&self.coordinator).chain(&self.others) {
            if !all.contains(address) {
                all.push(address.clone());
            }
        }
        all
    }

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
        let no_address = |a: &String| a.trim().is_empty();
        if t.secret.is_empty()
            || no_address(&t.coordinator)
            || t.others.iter().any(no_address)
            || t.fingerprint.len() != 64
        {
            return Err(TokenError::Damaged);
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text form of a JSON body, as an issuer would make it.
    fn text_of(json: &str) -> String {
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }

    fn one() -> JoinToken {
        JoinToken::new(
            ["198.18.1.1:7443".to_string()],
            "ab".repeat(32),
            "sekret".into(),
        )
        .unwrap()
    }

    #[test]
    fn round_trip_and_damage() {
        let t = one();
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

    #[test]
    fn a_token_of_one_coordinator_is_encoded_as_before() {
        let t = one();
        // No `cs` key: agents that know only `c` read it exactly as they always did.
        let json = URL_SAFE_NO_PAD
            .decode(t.encode().strip_prefix(PREFIX).unwrap())
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"c": "198.18.1.1:7443", "f": "ab".repeat(32), "s": "sekret"})
        );
        assert_eq!(t.coordinators(), vec!["198.18.1.1:7443".to_string()]);
    }

    #[test]
    fn old_tokens_without_a_list_still_decode() {
        let old = text_of(&format!(
            r#"{{"c":"198.18.1.1:7443","f":"{}","s":"sekret"}}"#,
            "cd".repeat(32)
        ));
        let t = JoinToken::decode(&old).unwrap();
        assert_eq!(t.coordinator, "198.18.1.1:7443");
        assert!(t.others.is_empty());
        assert_eq!(t.coordinators(), vec!["198.18.1.1:7443".to_string()]);
    }

    #[test]
    fn several_coordinators_in_order_without_duplicates() {
        let t = JoinToken::new(
            [
                "198.18.1.1:7443",
                " 198.18.2.1:7443",
                "",
                "198.18.1.1:7443",
                "c.example.net:7443",
            ]
            .map(String::from),
            "ab".repeat(32),
            "sekret".into(),
        )
        .unwrap();
        let want: Vec<String> = ["198.18.1.1:7443", "198.18.2.1:7443", "c.example.net:7443"]
            .map(String::from)
            .into();
        assert_eq!(t.coordinators(), want);
        assert_eq!(t.coordinator, "198.18.1.1:7443");
        let back = JoinToken::decode(&t.encode()).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.coordinators(), want);

        // A list issued with a repeat (by hand, or by another issuer) still yields each once.
        let repeated = text_of(&format!(
            r#"{{"c":"a:1","cs":["b:2","a:1","b:2"],"f":"{}","s":"x"}}"#,
            "ab".repeat(32)
        ));
        let t = JoinToken::decode(&repeated).unwrap();
        assert_eq!(t.coordinators(), vec!["a:1".to_string(), "b:2".to_string()]);

        assert_eq!(
            JoinToken::new(["".to_string(), " ".into()], "ab".repeat(32), "x".into()),
            None
        );
    }

    #[test]
    fn damaged_lists_are_refused() {
        let fp = "ab".repeat(32);
        for body in [
            format!(r#"{{"c":"a:1","cs":"b:2","f":"{fp}","s":"x"}}"#),
            format!(r#"{{"c":"a:1","cs":[7],"f":"{fp}","s":"x"}}"#),
            format!(r#"{{"c":"a:1","cs":["b:2",""],"f":"{fp}","s":"x"}}"#),
            format!(r#"{{"c":"","cs":["b:2"],"f":"{fp}","s":"x"}}"#),
            format!(r#"{{"cs":["b:2"],"f":"{fp}","s":"x"}}"#),
            format!(r#"{{"c":"a:1","cs":null,"f":"{fp}","s":"x"}}"#),
            r#"{"c":"a:1","cs":["b:2"],"f":"abc","s":"x"}"#.to_string(),
            format!(r#"{{"c":"a:1","cs":["b:2"],"f":"{fp}","s":""}}"#),
            "[]".to_string(),
            "not json".to_string(),
        ] {
            assert_eq!(
                JoinToken::decode(&text_of(&body)),
                Err(TokenError::Damaged),
                "{body}"
            );
        }
        assert_eq!(
            JoinToken::decode("mlj1_!!!not base64"),
            Err(TokenError::Damaged)
        );
        assert_eq!(JoinToken::decode("mlj2_abc"), Err(TokenError::Prefix));
    }
}
