//! Numbers with a meaning: times, ids, generations and versions. Each is its own type so that
//! a node id cannot be passed where a generation is meant; on the wire each is a plain JSON
//! integer.

use std::fmt;
use std::num::ParseIntError;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A point in time, in seconds since 1970-01-01 UTC (no leap seconds).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct UnixTime(pub i64);

impl From<i64> for UnixTime {
    fn from(seconds: i64) -> Self {
        Self(seconds)
    }
}

impl fmt::Display for UnixTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Defines an unsigned integer newtype: transparent on the wire, shown and parsed as the bare
/// number.
macro_rules! number {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize,
            Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl From<u64> for $name {
            fn from(n: u64) -> Self {
                Self(n)
            }
        }

        impl From<$name> for u64 {
            fn from(n: $name) -> u64 {
                n.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = ParseIntError;

            /// The decimal number, as [`Display`](fmt::Display) writes it.
            fn from_str(text: &str) -> Result<Self, ParseIntError> {
                text.parse().map(Self)
            }
        }
    };
}

number!(
    /// A node's identifier: never reused, kept by a deleted node where a workload still names
    /// it.
    NodeId
);

number!(
    /// A join token's identifier, never reused.
    TokenId
);

number!(
    /// A workload's generation: 0 until it is first attached, then one more for every change
    /// of holder.
    Generation
);

number!(
    /// A network map's version: one more for every change of the map.
    MapVersion
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_integers_on_the_wire() {
        assert_eq!(serde_json::to_string(&UnixTime(-5)).unwrap(), "-5");
        assert_eq!(serde_json::to_string(&NodeId(7)).unwrap(), "7");
        assert_eq!(
            serde_json::from_str::<Generation>("3").unwrap(),
            Generation(3)
        );
        assert!(serde_json::from_str::<TokenId>("\"3\"").is_err());
        assert_eq!("12".parse::<TokenId>(), Ok(TokenId(12)));
        assert!("abc".parse::<TokenId>().is_err());
        assert_eq!(MapVersion(4).to_string(), "4");
    }
}
