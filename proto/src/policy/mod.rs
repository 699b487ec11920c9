//! Access policy: which nodes and workloads of a network may open flows to which others, on
//! which ports.
//!
//! A network has no policy (open: every node reaches every port of every other, as before
//! policies existed) or exactly one [`Policy`] at a time, versioned by the coordinator. Once a
//! policy exists, a flow it does not allow is denied. Rules only allow; there is no deny rule,
//! so the order of rules never changes a verdict (the first allowing rule is the one named).
//!
//! The policy travels in the network map ([`crate::Netmap::policy`]) with the tags of nodes and
//! workloads, so that every agent evaluates the same rules against the same map. A selector
//! names *who*, never an address: `workload:chat` is the workload's address wherever it is
//! held, so a rule follows the workload across moves without a new policy.
//!
//! - [`parse`]: the operator's file (TOML) -> [`PolicyFile`] (rules and `[[test]]` flows), with
//!   errors naming the line and the field.
//! - `eval`: verdicts for one flow between named nodes or workloads ([`Policy::check`]), the
//!   file's tests, and which nodes may ever exchange packets ([`visible_peers`]: need to know).
//! - `compile`: the per-node table the agent's data plane consults for a new flow
//!   ([`NodeTable`]).
//! - `edit`: a new version as the change from the one a node has ([`PolicyEdit`]), so that
//!   an edit of a few rules of a large policy costs each node those rules.

mod align;
mod compile;
mod edit;
mod eval;
mod parse;
#[cfg(test)]
mod testkit;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use align::Alignment;
pub use compile::NodeTable;
pub use edit::{EditError, EditOp, PolicyEdit};
pub use eval::{
    may_talk, relevant_rules, unmatched_selectors, visible_directly, visible_peers, Entity,
    Externals, TestFailure, Verdict,
};
pub use parse::{
    parse, FlowTest, PolicyError, PolicyFile, MAX_ENTRIES, MAX_FILE_BYTES, MAX_RULES, MAX_TESTS,
};

/// The IANA protocol numbers the policy speaks of.
pub mod ip_proto {
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
}

/// One version of a network's policy, as the map carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// The policy's version in its network (1, 2, ...; a rollback is a new version).
    pub version: u64,
    /// The rules, in file order.
    pub rules: Vec<Rule>,
}

impl Policy {
    /// The rules at `indices` (of [`relevant_rules`]), as the policy a node gets: the same
    /// version, the same lines.
    ///
    /// # Panics
    /// When an index is out of range (the indices come from this policy).
    pub fn subset(&self, indices: &[usize]) -> Policy {
        Policy {
            version: self.version,
            rules: indices.iter().map(|&i| self.rules[i].clone()).collect(),
        }
    }

    /// The policy node `me` of `map` gets: the rules that concern it ([`relevant_rules`]).
    pub fn for_node(&self, map: &crate::Netmap, me: crate::NodeId) -> Policy {
        self.subset(&relevant_rules(self, map, me))
    }
}

/// One rule: flows from any of `from` to any of `to` on any of `ports` are allowed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// The line of the file where the rule starts (1-based), to name it in verdicts and
    /// counters.
    pub line: u32,
    /// Who may open the flow.
    pub from: Vec<Selector>,
    /// To whom.
    pub to: Vec<Selector>,
    /// On which destination ports.
    pub ports: Vec<Ports>,
}

/// Who a rule speaks of. Written `*`, `tag:NAME`, `node:NAME` or `workload:NAME`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Selector {
    /// Every node and workload of the network.
    Any,
    /// Every node and every workload carrying the tag.
    Tag(String),
    /// One node (its overlay addresses and the prefixes routed to it), by name.
    Node(String),
    /// One workload (its address, wherever it is held), by name.
    Workload(String),
}

/// Destination ports of a rule. Written `*` (anything), `icmp` (ICMP and ICMPv6), `tcp:N`,
/// `tcp:N-M`, `tcp:*`, and the same for `udp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Ports {
    /// Every protocol and port.
    Any,
    /// ICMP and ICMPv6 (echo requests; errors of allowed flows pass anyway).
    Icmp,
    /// TCP destination ports `first..=last`.
    Tcp(u16, u16),
    /// UDP destination ports `first..=last`.
    Udp(u16, u16),
}

/// The protocol and destination port of one flow, as `policy test` and `[[test]]` name it:
/// `tcp:7070`, `udp:53` or `icmp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowPort {
    /// IANA protocol number ([`ip_proto`]).
    pub proto: u8,
    /// Destination port; 0 for ICMP.
    pub port: u16,
}

impl FromStr for FlowPort {
    type Err = SyntaxError;

    fn from_str(s: &str) -> Result<Self, SyntaxError> {
        let bad = || {
            SyntaxError(format!(
                "{s:?} is not a flow: expected \"tcp:PORT\", \"udp:PORT\" or \"icmp\""
            ))
        };
        if s == "icmp" {
            return Ok(FlowPort {
                proto: ip_proto::ICMP,
                port: 0,
            });
        }
        let (proto, port) = s.split_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let proto = match proto {
            "tcp" => ip_proto::TCP,
            "udp" => ip_proto::UDP,
            _ => return Err(bad()),
        };
        Ok(FlowPort { proto, port })
    }
}

impl fmt::Display for FlowPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.proto {
            ip_proto::TCP => write!(f, "tcp:{}", self.port),
            ip_proto::UDP => write!(f, "udp:{}", self.port),
            ip_proto::ICMP | ip_proto::ICMPV6 => f.write_str("icmp"),
            p => write!(f, "proto {p}"),
        }
    }
}

/// A selector or port that does not parse; the text says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SyntaxError(pub String);

impl FromStr for Selector {
    type Err = SyntaxError;

    fn from_str(s: &str) -> Result<Self, SyntaxError> {
        if s == "*" {
            return Ok(Selector::Any);
        }
        let (kind, name) = s.split_once(':').ok_or_else(|| {
            SyntaxError(format!(
                "{s:?} is not a selector: expected \"*\", \"tag:NAME\", \"node:NAME\" or \
                 \"workload:NAME\""
            ))
        })?;
        if !valid_name(name) {
            return Err(SyntaxError(format!(
                "{s:?}: a name is 1 to 63 of a-z, 0-9, '-', '_' and '.'"
            )));
        }
        let name = name.to_string();
        match kind {
            "tag" => Ok(Selector::Tag(name)),
            "node" => Ok(Selector::Node(name)),
            "workload" => Ok(Selector::Workload(name)),
            other => Err(SyntaxError(format!(
                "{s:?}: unknown selector kind {other:?} (tag, node or workload)"
            ))),
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Any => f.write_str("*"),
            Selector::Tag(n) => write!(f, "tag:{n}"),
            Selector::Node(n) => write!(f, "node:{n}"),
            Selector::Workload(n) => write!(f, "workload:{n}"),
        }
    }
}

impl Ports {
    /// Whether a flow of IP protocol `proto` to destination port `port` (0 for ICMP) is one of
    /// these.
    pub fn matches(&self, proto: u8, port: u16) -> bool {
        match *self {
            Ports::Any => true,
            Ports::Icmp => proto == ip_proto::ICMP || proto == ip_proto::ICMPV6,
            Ports::Tcp(a, b) => proto == ip_proto::TCP && (a..=b).contains(&port),
            Ports::Udp(a, b) => proto == ip_proto::UDP && (a..=b).contains(&port),
        }
    }
}

impl FromStr for Ports {
    type Err = SyntaxError;

    fn from_str(s: &str) -> Result<Self, SyntaxError> {
        match s {
            "*" => return Ok(Ports::Any),
            "icmp" => return Ok(Ports::Icmp),
            _ => {}
        }
        let bad = || {
            SyntaxError(format!(
                "{s:?} is not a port: expected \"*\", \"icmp\", \"tcp:PORT\", \"tcp:FIRST-LAST\", \
                 \"tcp:*\" or the same with udp"
            ))
        };
        let (proto, range) = s.split_once(':').ok_or_else(bad)?;
        let (first, last) = if range == "*" {
            (0, u16::MAX)
        } else if let Some((a, b)) = range.split_once('-') {
            let a: u16 = a.parse().map_err(|_| bad())?;
            let b: u16 = b.parse().map_err(|_| bad())?;
            if a > b {
                return Err(SyntaxError(format!("{s:?}: the range runs backwards")));
            }
            (a, b)
        } else {
            let p: u16 = range.parse().map_err(|_| bad())?;
            (p, p)
        };
        match proto {
            "tcp" => Ok(Ports::Tcp(first, last)),
            "udp" => Ok(Ports::Udp(first, last)),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Ports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let range = |f: &mut fmt::Formatter<'_>, p: &str, a: u16, b: u16| match (a, b) {
            (0, u16::MAX) => write!(f, "{p}:*"),
            (a, b) if a == b => write!(f, "{p}:{a}"),
            (a, b) => write!(f, "{p}:{a}-{b}"),
        };
        match *self {
            Ports::Any => f.write_str("*"),
            Ports::Icmp => f.write_str("icmp"),
            Ports::Tcp(a, b) => range(f, "tcp", a, b),
            Ports::Udp(a, b) => range(f, "udp", a, b),
        }
    }
}

/// Whether `name` may be a tag, node or workload name in a selector.
pub fn valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}

macro_rules! as_string {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_str(Parsed::<$t>(std::marker::PhantomData))
            }
        }
    };
}

/// Decodes a string as `T` from the text the decoder holds, without a copy of its own first (a
/// policy of a thousand rules has seven thousand of them).
struct Parsed<T>(std::marker::PhantomData<T>);

impl<T> serde::de::Visitor<'_> for Parsed<T>
where
    T: FromStr<Err = SyntaxError>,
{
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<T, E> {
        s.parse().map_err(E::custom)
    }
}

as_string!(Selector);
as_string!(Ports);
as_string!(FlowPort);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_and_ports_round_trip_through_text() {
        for s in ["*", "tag:web", "node:vm-a", "workload:chat"] {
            assert_eq!(s.parse::<Selector>().unwrap().to_string(), s);
        }
        for p in ["*", "icmp", "tcp:5432", "udp:53", "tcp:8000-8100", "udp:*"] {
            assert_eq!(p.parse::<Ports>().unwrap().to_string(), p);
        }
        for bad in ["web", "tag:", "tag:Web", "host:x", "tag:a b"] {
            assert!(bad.parse::<Selector>().is_err(), "{bad}");
        }
        for bad in ["tcp", "tcp:", "tcp:70000", "tcp:9-1", "sctp:1", "icmp:8"] {
            assert!(bad.parse::<Ports>().is_err(), "{bad}");
        }
    }

    #[test]
    fn ports_match_protocol_and_range() {
        let p: Ports = "tcp:8000-8100".parse().unwrap();
        assert!(p.matches(ip_proto::TCP, 8000) && p.matches(ip_proto::TCP, 8100));
        assert!(!p.matches(ip_proto::TCP, 8101) && !p.matches(ip_proto::UDP, 8050));
        assert!(Ports::Icmp.matches(ip_proto::ICMPV6, 0));
        assert!(Ports::Any.matches(47, 0));
    }
}
