//! Join tokens: `POST /v1/tokens`, `GET /v1/tokens` (`DELETE /v1/tokens/{id}` has no body).
//!
//! A token asked for without a use limit or a lifetime is good for one join within one hour
//! ([`DEFAULT_TOKEN_USES`], [`DEFAULT_TOKEN_LIFETIME_SECS`]): a token that leaks (a shell
//! history, a provisioning log) then opens the mesh to nobody for long. More has to be asked
//! for in so many words: `"uses": 10` or `"uses": "unlimited"`, `"expires_in_secs": 2592000`
//! or `"expires_in_secs": "never"`.
//!
//! History: before 2026-12-05 an absent or `null` limit meant unlimited and eternal, and the
//! two words did not exist. Numbers mean what they meant; a coordinator from before refuses
//! the words (400), so a newer client never gets a default it did not ask for.

use std::fmt;

use serde::de::{self, Deserializer, Unexpected, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::{NetworkName, TokenId, UnixTime};

/// How many joins a token allows when the request does not say.
pub const DEFAULT_TOKEN_USES: u64 = 1;
/// How long a token stays valid when the request does not say: one hour, in seconds.
pub const DEFAULT_TOKEN_LIFETIME_SECS: u64 = 60 * 60;

/// `POST /v1/tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// The network a joining node lands in.
    pub network: NetworkName,
    /// Tags every node joining with the token gets. Absent: none.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Lifetime from now: seconds (at least 1), or `"never"`. Absent or `null`: one hour
    /// ([`DEFAULT_TOKEN_LIFETIME_SECS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_secs: Option<TokenLifetime>,
    /// How many joins it allows: a number (at least 1), or `"unlimited"`. Absent or `null`:
    /// one ([`DEFAULT_TOKEN_USES`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses: Option<TokenUses>,
}

/// How many joins a token asked for allows; on the wire a number or the string `"unlimited"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenUses {
    /// At most this many joins. The coordinator refuses 0.
    Limit(u64),
    /// Any number of joins, until the token expires or is revoked.
    Unlimited,
}

/// How long a token asked for stays valid; on the wire a number of seconds or the string
/// `"never"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenLifetime {
    /// Valid for this many seconds from its creation. The coordinator refuses 0.
    Secs(u64),
    /// Valid until revoked (or used up).
    Never,
}

impl TokenUses {
    const WORD: &'static str = "unlimited";
}

impl TokenLifetime {
    const WORD: &'static str = "never";
}

impl Serialize for TokenUses {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Limit(n) => serializer.serialize_u64(*n),
            Self::Unlimited => serializer.serialize_str(Self::WORD),
        }
    }
}

impl Serialize for TokenLifetime {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Secs(n) => serializer.serialize_u64(*n),
            Self::Never => serializer.serialize_str(Self::WORD),
        }
    }
}

/// Reads a count that may instead be one word: `"unlimited"` for uses, `"never"` for a
/// lifetime. Anything else (another word, a negative or fractional number) is refused with
/// what was expected.
struct NumberOrWord {
    word: &'static str,
    expecting: &'static str,
}

impl Visitor<'_> for NumberOrWord {
    type Value = Option<u64>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Self::Value, E> {
        Ok(Some(n))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Self::Value, E> {
        u64::try_from(n)
            .map(Some)
            .map_err(|_| E::invalid_value(Unexpected::Signed(n), &self))
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
        if text == self.word {
            Ok(None)
        } else {
            Err(E::invalid_value(Unexpected::Str(text), &self))
        }
    }
}

impl<'de> Deserialize<'de> for TokenUses {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let visitor = NumberOrWord {
            word: Self::WORD,
            expecting: "a number of uses or \"unlimited\"",
        };
        Ok(deserializer
            .deserialize_any(visitor)?
            .map_or(Self::Unlimited, Self::Limit))
    }
}

impl<'de> Deserialize<'de> for TokenLifetime {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let visitor = NumberOrWord {
            word: Self::WORD,
            expecting: "a number of seconds or \"never\"",
        };
        Ok(deserializer
            .deserialize_any(visitor)?
            .map_or(Self::Never, Self::Secs))
    }
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
