//! Names with a meaning: networks, nodes and workloads. Each is its own type, checked when it
//! is made (parsed from a command line, decoded from JSON), so that a name that passed through
//! one is valid wherever it goes and a network name cannot be passed where a workload name is
//! meant. On the wire each is a JSON string.
//!
//! The rule is the same for all three: 1 to 63 characters of `a-z`, `0-9` and `-` (a DNS
//! label, so that every name can be `NAME.NETWORK.mesh`). A node name is also not only
//! digits, which would read as a node id wherever a node is named "by name or id".

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The longest name.
pub const MAX_NAME_LEN: usize = 63;

/// Why a text is not a valid name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty, too long, or a character outside `a-z`, `0-9`, `-`.
    #[error("{what} name {text:?} is not valid: use 1 to 63 characters of a-z, 0-9 and -")]
    Characters {
        /// What was named: `network`, `node`, `workload`, ...
        what: &'static str,
        /// The text (as given).
        text: String,
    },
    /// Only digits: it would read as an id.
    #[error("{what} name {text:?} is only digits, which reads as a {what} id")]
    Digits {
        /// What was named.
        what: &'static str,
        /// The text.
        text: String,
    },
}

/// Checks `text` as the name of a `what`: 1 to 63 characters of `a-z`, `0-9` and `-`.
///
/// # Errors
/// [`NameError::Characters`].
pub fn check_name(what: &'static str, text: &str) -> Result<(), NameError> {
    let ok = (1..=MAX_NAME_LEN).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(NameError::Characters {
            what,
            text: text.to_owned(),
        })
    }
}

/// Defines a name type: checked by `$check` when made, a JSON string on the wire, shown as
/// the bare name.
macro_rules! name {
    ($(#[$doc:meta])* $name:ident, $what:literal, $check:path) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// What this names, in messages.
            pub const WHAT: &'static str = $what;

            /// `text` as a name.
            ///
            /// # Errors
            /// [`NameError`] saying what is wrong with it.
            pub fn new(text: impl Into<String>) -> Result<Self, NameError> {
                let text = text.into();
                $check($what, &text)?;
                Ok(Self(text))
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;

            fn try_from(text: String) -> Result<Self, NameError> {
                Self::new(text)
            }
        }

        impl From<$name> for String {
            fn from(name: $name) -> String {
                name.0
            }
        }

        impl FromStr for $name {
            type Err = NameError;

            fn from_str(text: &str) -> Result<Self, NameError> {
                Self::new(text)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Deref for $name {
            type Target = str;

            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

/// [`check_name`], and not only digits.
fn check_node_name(what: &'static str, text: &str) -> Result<(), NameError> {
    check_name(what, text)?;
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(NameError::Digits {
            what,
            text: text.to_owned(),
        });
    }
    Ok(())
}

name!(
    /// A network's name, unique in the mesh.
    NetworkName,
    "network",
    check_name
);

name!(
    /// A node's name, unique in its network; never only digits.
    NodeName,
    "node",
    check_node_name
);

name!(
    /// A workload's name, unique in its network.
    WorkloadName,
    "workload",
    check_name
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rule() {
        assert!(NetworkName::new("prod-eu-1").is_ok());
        assert!(NetworkName::new("a".repeat(63)).is_ok());
        for bad in ["", "Prod", "a_b", "a b", "é", "a.b"] {
            let e = NetworkName::new(bad).unwrap_err();
            assert!(e.to_string().starts_with("network name "), "{e}");
        }
        assert!(NetworkName::new("a".repeat(64)).is_err());
        assert!(WorkloadName::new("123").is_ok());
        assert_eq!(
            NodeName::new("123").unwrap_err(),
            NameError::Digits {
                what: "node",
                text: "123".into()
            }
        );
        assert!(NodeName::new("vm-1").is_ok());
    }

    #[test]
    fn json_is_a_checked_string() {
        let n = WorkloadName::new("chat").unwrap();
        assert_eq!(serde_json::to_string(&n).unwrap(), "\"chat\"");
        assert_eq!(serde_json::from_str::<WorkloadName>("\"chat\"").unwrap(), n);
        let e = serde_json::from_str::<WorkloadName>("\"Chat\"").unwrap_err();
        assert!(
            e.to_string()
                .contains("workload name \"Chat\" is not valid"),
            "{e}"
        );
    }

    #[test]
    fn a_name_reads_as_its_text() {
        let n: NodeName = "vm-1".parse().unwrap();
        assert_eq!(n, "vm-1");
        assert_eq!(n.to_string(), "vm-1");
        assert_eq!(n.len(), 4);
        let set: std::collections::BTreeSet<NodeName> = [n.clone()].into();
        assert!(set.contains("vm-1"));
    }
}
