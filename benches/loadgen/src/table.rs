//! The network map a simulated agent keeps: either a whole [`Netmap`], exactly as the real
//! agent keeps it, or a compact table of one 64-bit digest per peer that follows the same
//! version rules.
//!
//! Why two: every agent of a network holds every peer, so N agents in one process hold N²
//! entries. A whole `PeerInfo` costs about 300 bytes in memory, which is 30 GB at N = 10,000;
//! a digest costs about 17 bytes (hash table slot), which is under 2 GB. The compact table
//! keeps everything the benchmark checks: versions, gaps, and (through the digests) that each
//! agent ends up with the coordinator's map.
//!
//! Both are a [`SessionMap`], so a simulated agent runs the agent's own session code
//! ([`meshlink_proto::agent_session::AgentSession`]) over either. The compact table keeps
//! whole what that code reads: the workloads, the policy and the node's own entry.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

use meshlink_proto::session_map::SessionMap;
use meshlink_proto::{
    DeltaError, Gap, Netmap, NetmapDelta, NodeId, PeerInfo, Policy, WorkloadInfo,
};

/// How agents hold their map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    /// A whole [`Netmap`] per agent.
    Full,
    /// A digest per peer ([`CompactMap`]).
    Compact,
}

/// A simulated agent's map.
#[derive(Debug, Clone)]
pub enum PeerTable {
    /// As the real agent.
    Full(Netmap),
    /// Digests only.
    Compact(CompactMap),
}

impl PeerTable {
    /// An empty map of node `me`, held as `kind` says.
    pub fn new(kind: TableKind, me: NodeId) -> Self {
        match kind {
            TableKind::Full => PeerTable::Full(Netmap::default()),
            TableKind::Compact => PeerTable::Compact(CompactMap::new(me)),
        }
    }

    /// How many peers the map holds.
    pub fn len(&self) -> usize {
        match self {
            PeerTable::Full(m) => m.peers.len(),
            PeerTable::Compact(c) => c.peers.len(),
        }
    }

    /// Whether the map holds no peer.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// An order-independent digest of the whole map (version and peers), equal for equal
    /// maps whichever way they are held.
    pub fn digest(&self) -> u64 {
        match self {
            PeerTable::Full(m) => map_digest(m),
            PeerTable::Compact(c) => c.digest(),
        }
    }

    /// The map's policy (this node's rules of it), whole in both forms.
    pub fn policy(&self) -> Option<&Policy> {
        match self {
            PeerTable::Full(m) => m.policy.as_ref(),
            PeerTable::Compact(c) => c.policy.as_ref(),
        }
    }
}

impl SessionMap for PeerTable {
    fn version(&self) -> u64 {
        match self {
            PeerTable::Full(m) => m.version,
            PeerTable::Compact(c) => c.version,
        }
    }

    fn replace(&mut self, map: Netmap) {
        match self {
            PeerTable::Full(m) => *m = map,
            PeerTable::Compact(c) => c.replace(map),
        }
    }

    fn apply(&mut self, delta: NetmapDelta) -> Result<(), DeltaError> {
        match self {
            PeerTable::Full(m) => m.apply(delta),
            PeerTable::Compact(c) => c.apply(delta),
        }
    }

    fn workloads(&self) -> &BTreeMap<String, WorkloadInfo> {
        match self {
            PeerTable::Full(m) => &m.workloads,
            PeerTable::Compact(c) => &c.workloads,
        }
    }

    fn own_entry(&self, me: NodeId) -> Option<&PeerInfo> {
        match self {
            PeerTable::Full(m) => m.peers.get(&me),
            PeerTable::Compact(c) => c.own_entry(me),
        }
    }
}

/// A map as `node id -> digest of the PeerInfo`, with the version rules of [`Netmap::apply`].
/// The policy and the workloads are kept whole (an edit applies to the policy; the session
/// fences on the workloads), as the real agent keeps them, and so is the node's own entry
/// (its key rotation reads it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactMap {
    me: NodeId,
    version: u64,
    peers: HashMap<NodeId, u64>,
    own: Option<Box<PeerInfo>>,
    workloads: BTreeMap<String, WorkloadInfo>,
    policy: Option<Policy>,
}

impl CompactMap {
    /// The empty map of node `me`.
    pub fn new(me: NodeId) -> Self {
        CompactMap {
            me,
            version: 0,
            peers: HashMap::new(),
            own: None,
            workloads: BTreeMap::new(),
            policy: None,
        }
    }

    /// Takes `map` in compact form.
    fn replace(&mut self, map: Netmap) {
        self.version = map.version;
        self.peers = map
            .peers
            .values()
            .map(|p| (p.node_id, peer_digest(p)))
            .collect();
        self.own = map.peers.get(&self.me).cloned().map(Box::new);
        self.workloads = map.workloads;
        self.policy = map.policy;
    }

    fn own_entry(&self, me: NodeId) -> Option<&PeerInfo> {
        self.own.as_deref().filter(|_| me == self.me)
    }

    /// See [`Netmap::apply`]: an old delta is ignored, one that does not start at this
    /// version is a gap, one whose policy edit does not apply is refused; either changes
    /// nothing.
    ///
    /// # Errors
    /// [`DeltaError`].
    pub fn apply(&mut self, delta: NetmapDelta) -> Result<(), DeltaError> {
        if delta.to_version <= self.version && delta.from_version < self.version {
            return Ok(());
        }
        if delta.from_version != self.version || delta.to_version <= delta.from_version {
            return Err(Gap {
                have: self.version,
                delta_from: delta.from_version,
            }
            .into());
        }
        if let Some(change) = delta.policy {
            change.apply_to(&mut self.policy)?;
        }
        for id in &delta.remove {
            self.peers.remove(id);
            if *id == self.me {
                self.own = None;
            }
        }
        for p in delta.upsert {
            self.peers.insert(p.node_id, peer_digest(&p));
            if p.node_id == self.me {
                self.own = Some(Box::new(p));
            }
        }
        for name in &delta.remove_workloads {
            self.workloads.remove(name);
        }
        for w in delta.upsert_workloads {
            self.workloads.insert(w.name.clone(), w);
        }
        self.version = delta.to_version;
        Ok(())
    }

    /// See [`PeerTable::digest`].
    pub fn digest(&self) -> u64 {
        combine(
            self.version,
            self.peers.iter().map(|(id, digest)| (*id, *digest)),
        )
    }
}

/// A digest of everything a peer's entry holds. `DefaultHasher::new()` has fixed keys, so the
/// digest is the same in every agent of the process.
pub fn peer_digest(p: &PeerInfo) -> u64 {
    let mut h = DefaultHasher::new();
    p.node_id.hash(&mut h);
    p.name.hash(&mut h);
    p.public_key.hash(&mut h);
    p.addresses.hash(&mut h);
    p.allowed_ips.hash(&mut h);
    p.endpoints.hash(&mut h);
    p.labels.hash(&mut h);
    h.finish()
}

/// The digest of a whole map, as [`PeerTable::digest`].
pub fn map_digest(map: &Netmap) -> u64 {
    combine(
        map.version,
        map.peers.values().map(|p| (p.node_id, peer_digest(p))),
    )
}

/// Sums a hash of every `(id, digest)` pair, so that the order of a hash table does not
/// matter, then mixes in the version.
fn combine(version: u64, entries: impl Iterator<Item = (NodeId, u64)>) -> u64 {
    let sum = entries.fold(0u64, |acc, (id, digest)| {
        let mut h = DefaultHasher::new();
        (id, digest).hash(&mut h);
        acc.wrapping_add(h.finish())
    });
    let mut h = DefaultHasher::new();
    (version, sum).hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use meshlink_proto::PublicKey;

    use super::*;

    fn peer(id: NodeId, port: u16) -> PeerInfo {
        PeerInfo {
            node_id: id,
            name: format!("node-{id}"),
            public_key: PublicKey([id as u8; 32]),
            next_key: None,
            addresses: vec![format!("100.64.0.{id}/32").parse().unwrap()],
            allowed_ips: vec![],
            endpoints: vec![format!("198.18.0.{id}:{port}").parse().unwrap()],
            labels: BTreeMap::new(),
            tags: Vec::new(),
            via: None,
        }
    }

    fn workload(n: u64, holder: NodeId) -> WorkloadInfo {
        WorkloadInfo {
            id: n + 1,
            name: format!("w{n}"),
            address: format!("100.64.1.{n}/32").parse().unwrap(),
            holder: Some(holder),
            generation: holder,
            previous: None,
            candidates: vec![holder],
            grace_ms: None,
            tags: Vec::new(),
            address6: None,
        }
    }

    /// A small deterministic generator, so the test needs no RNG crate features.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, below: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % below
        }
    }

    #[test]
    fn compact_follows_the_netmap_rules() {
        let mut rng = Lcg(7);
        let start = Netmap {
            version: 3,
            peers: (1..=5).map(|id| (id, peer(id, 51820))).collect(),
            ..Netmap::default()
        };
        // Node 3's tables: its own entry is kept whole in both.
        let mut full = PeerTable::new(TableKind::Full, 3);
        let mut compact = PeerTable::new(TableKind::Compact, 3);
        full.replace(start.clone());
        compact.replace(start);
        assert_eq!(full.digest(), compact.digest());
        let mut version: u64 = 3;
        for _ in 0..500 {
            // Mostly in order, sometimes old, sometimes a gap, sometimes backwards.
            let from = match rng.next(10) {
                0 => version.saturating_sub(1),
                1 => version + 1,
                _ => version,
            };
            let to = if rng.next(20) == 0 { from } else { from + 1 };
            let delta = NetmapDelta {
                from_version: from,
                to_version: to,
                upsert: (0..rng.next(3))
                    .map(|_| peer(1 + rng.next(8), 1 + rng.next(60000) as u16))
                    .collect(),
                remove: (0..rng.next(2)).map(|_| 1 + rng.next(8)).collect(),
                upsert_workloads: (0..rng.next(2))
                    .map(|_| workload(rng.next(3), 1 + rng.next(8)))
                    .collect(),
                remove_workloads: (0..rng.next(2))
                    .map(|_| format!("w{}", rng.next(3)))
                    .collect(),
                ..NetmapDelta::default()
            };
            let a = full.apply(delta.clone());
            let b = compact.apply(delta.clone());
            assert_eq!(a, b, "{delta:?}");
            assert_eq!(full.version(), compact.version());
            assert_eq!(full.len(), compact.len());
            assert_eq!(full.digest(), compact.digest());
            assert_eq!(full.workloads(), compact.workloads());
            assert_eq!(full.own_entry(3), compact.own_entry(3));
            version = full.version();
        }
        assert!(version > 100, "most deltas applied");
    }

    #[test]
    fn digests_see_every_field() {
        let a = peer(1, 51820);
        let mut b = a.clone();
        b.endpoints[0].set_port(51821);
        assert_ne!(peer_digest(&a), peer_digest(&b));
        let mut c = a.clone();
        c.labels.insert("k".into(), "v".into());
        assert_ne!(peer_digest(&a), peer_digest(&c));
    }
}
