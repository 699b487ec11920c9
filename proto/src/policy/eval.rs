//! Verdicts for flows between nodes and workloads named in a map. Contract only.

use std::collections::BTreeSet;

use super::{FlowPort, Policy, PolicyFile};
use crate::{Netmap, NodeId};

/// A party to a flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entity {
    /// A node, by id.
    Node(NodeId),
    /// A workload, by name.
    Workload(String),
}

/// The verdict on one flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// The index in [`Policy::rules`] of the first rule that allows it; `None`: denied.
    pub rule: Option<usize>,
}

/// A `[[test]]` whose expectation the policy does not meet, or that names nobody.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestFailure {
    /// The test's line.
    pub line: u32,
    /// What happened.
    pub message: String,
}

impl Policy {
    /// The verdict on a flow from `from` to `to`.
    pub fn check(&self, _map: &Netmap, _from: &Entity, _to: &Entity, _port: FlowPort) -> Verdict {
        unimplemented!("contract")
    }
}

impl Entity {
    /// The node or workload a name means in `map`.
    ///
    /// # Errors
    /// A message when nobody has that name, or both a node and a workload do.
    pub fn resolve(_map: &Netmap, _name: &str) -> Result<Entity, String> {
        unimplemented!("contract")
    }
}

impl PolicyFile {
    /// Runs the file's tests against `map`.
    pub fn run_tests(&self, _map: &Netmap) -> Vec<TestFailure> {
        unimplemented!("contract")
    }
}

/// Whether nodes `a` and `b` may ever exchange packets.
pub fn may_talk(_policy: Option<&Policy>, _map: &Netmap, _a: NodeId, _b: NodeId) -> bool {
    unimplemented!("contract")
}

/// The peers node `me` may ever exchange packets with.
pub fn visible_peers(_policy: Option<&Policy>, _map: &Netmap, _me: NodeId) -> BTreeSet<NodeId> {
    unimplemented!("contract")
}
