//! What an [`AgentSession`](crate::agent_session::AgentSession) keeps of its network's map.
//!
//! The session needs four things of a map: its version, the deltas applied to it with the
//! rules of [`Netmap::apply`], the workloads (for [`Holdings`](crate::workload::Holdings)), and
//! this node's own entry (for [`KeyRotation`](crate::key_rotation::KeyRotation)). The agent
//! keeps the whole [`Netmap`]; the load generator, which runs ten thousand sessions in one
//! process, keeps a digest per peer instead and implements this trait for it, so that both
//! run the same session code.

use std::collections::BTreeMap;

use crate::netmap::{DeltaError, Netmap, NetmapDelta, NodeId, PeerInfo};
use crate::workload::WorkloadInfo;

/// A network map as an [`AgentSession`](crate::agent_session::AgentSession) holds it.
pub trait SessionMap {
    /// The version the map reflects.
    fn version(&self) -> u64;

    /// Takes a full map from the coordinator in place of this one.
    fn replace(&mut self, map: Netmap);

    /// Applies a delta with the rules of [`Netmap::apply`]: an old delta changes nothing, one
    /// that does not start at this version or whose policy edit does not apply is refused and
    /// changes nothing.
    ///
    /// # Errors
    /// [`DeltaError`] when the delta is refused.
    fn apply(&mut self, delta: NetmapDelta) -> Result<(), DeltaError>;

    /// Every workload of the network, by name.
    fn workloads(&self) -> &BTreeMap<String, WorkloadInfo>;

    /// The entry of node `me` (the node the session belongs to), if the map has it. Another
    /// node's entry is not asked for.
    fn own_entry(&self, me: NodeId) -> Option<&PeerInfo>;
}

impl SessionMap for Netmap {
    fn version(&self) -> u64 {
        self.version
    }

    fn replace(&mut self, map: Netmap) {
        *self = map;
    }

    fn apply(&mut self, delta: NetmapDelta) -> Result<(), DeltaError> {
        Netmap::apply(self, delta)
    }

    fn workloads(&self) -> &BTreeMap<String, WorkloadInfo> {
        &self.workloads
    }

    fn own_entry(&self, me: NodeId) -> Option<&PeerInfo> {
        self.peers.get(&me)
    }
}
