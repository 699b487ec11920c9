//! Network maps: what a node knows of its peers, and the deltas that move a map from one
//! version to the next.
//!
//! The coordinator keeps one map per network and bumps its version on every change; each change
//! is one [`NetmapDelta`], the same bytes for every agent of the network (an agent skips its own
//! entry). An agent applies deltas in order; a delta that does not start at the agent's version
//! is a gap ([`Gap`]) and the agent asks for a full map.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::key::PublicKey;
use crate::policy::{EditError, Policy, PolicyEdit};
use crate::workload::WorkloadInfo;

/// A node's identifier, unique within a coordinator and never reused.
pub type NodeId = u64;

/// One node as its peers see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// The node's identifier.
    pub node_id: NodeId,
    /// The node's name, unique in its network.
    pub name: String,
    /// The node's WireGuard public key.
    pub public_key: PublicKey,
    /// The node's next WireGuard public key while it rotates its key: peers accept it as the
    /// same node (same allowed IPs) beside `public_key`, and send to whichever of the two the
    /// node last completed a handshake with, so that the node can switch at any moment
    /// without breaking its connections. Absent: the node has one key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_key: Option<PublicKey>,
    /// The node's own overlay addresses (host prefixes).
    pub addresses: Vec<IpNet>,
    /// Everything routed to the node: its addresses and any further prefixes. Absent means the
    /// same as `addresses`.
    #[serde(default)]
    pub allowed_ips: Vec<IpNet>,
    /// Underlay endpoints to try, best first. Empty: the node cannot be reached first, it
    /// reaches out.
    #[serde(default)]
    pub endpoints: Vec<SocketAddr>,
    /// Free-form labels (`provider=aws`). Absent means none.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Tags, given by the coordinator (from the join token and `meshctl node tag`), never
    /// chosen by the node; policies select by them. Absent means none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// An external node (a device that runs stock WireGuard, no agent): the node it reaches
    /// the mesh through, its gateway. Only the gateway has it as a WireGuard peer (it has no
    /// endpoints: it reaches out); every other node routes its addresses to the gateway
    /// ([`Netmap::routed_to`]). Absent: a node with an agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<NodeId>,
}

impl PeerInfo {
    /// The prefixes to route to this node: `allowed_ips`, or `addresses` when none are given.
    pub fn routed(&self) -> Vec<IpNet> {
        if self.allowed_ips.is_empty() {
            self.addresses.clone()
        } else {
            self.allowed_ips.clone()
        }
    }
}

/// A full map of a network at one version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Netmap {
    /// The network's version this map reflects.
    pub version: u64,
    /// Every node of the network, by id.
    #[serde(with = "peers_as_list")]
    pub peers: BTreeMap<NodeId, PeerInfo>,
    /// Every workload of the network, by name. Absent means none.
    #[serde(default, with = "workloads_as_list")]
    pub workloads: BTreeMap<String, WorkloadInfo>,
    /// The network's access policy. Absent: none, the network is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Policy>,
}

/// A change of a network's policy, in a [`NetmapDelta`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyChange {
    /// This policy replaces the network's (or is its first).
    Set(Policy),
    /// The network no longer has a policy: it is open again.
    Clear,
    /// The policy the holder has, edited ([`PolicyEdit`]: its base is named by version and
    /// digest). Sent only to agents whose hello says
    /// [`crate::control::Hello::policy_edits`]; an older agent would not decode it.
    Edit(PolicyEdit),
}

impl PolicyChange {
    /// Applies this change to `policy`, or refuses it and changes nothing.
    ///
    /// # Errors
    /// [`EditError`] when an edit does not fit (see [`Policy::apply_edit`]).
    pub fn apply_to(self, policy: &mut Option<Policy>) -> Result<(), EditError> {
        match (self, policy.as_mut()) {
            (PolicyChange::Set(p), _) => *policy = Some(p),
            (PolicyChange::Clear, _) => *policy = None,
            (PolicyChange::Edit(e), Some(p)) => p.apply_edit(&e)?,
            (PolicyChange::Edit(e), None) => {
                return Err(EditError::BaseVersion {
                    base: e.base,
                    have: "none".into(),
                })
            }
        }
        Ok(())
    }
}

/// The change from one version of a network's map to the next.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetmapDelta {
    /// The version this delta applies to.
    pub from_version: u64,
    /// The version after it.
    pub to_version: u64,
    /// Nodes added or changed, whole.
    #[serde(default)]
    pub upsert: Vec<PeerInfo>,
    /// Nodes removed.
    #[serde(default)]
    pub remove: Vec<NodeId>,
    /// Workloads added or changed, whole.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upsert_workloads: Vec<WorkloadInfo>,
    /// Workloads removed, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove_workloads: Vec<String>,
    /// The network's policy changed. Absent: unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyChange>,
}

/// Why a delta was refused (the map is unchanged): the holder needs a full map.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    /// The delta does not follow the map's version.
    #[error(transparent)]
    Gap(#[from] Gap),
    /// The delta's policy edit does not apply to the map's policy.
    #[error("policy: {0}")]
    Policy(#[from] EditError),
}

/// A delta that does not follow the map's version: the holder needs a full map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("netmap delta from version {delta_from} does not follow version {have}")]
pub struct Gap {
    /// The map's version.
    pub have: u64,
    /// The version the delta starts from.
    pub delta_from: u64,
}

impl Netmap {
    /// Applies `delta`, or refuses it (changing nothing) when it does not start at this map's
    /// version or its policy edit does not apply to this map's policy. A delta that is
    /// already applied (`to_version <= version`) is ignored.
    ///
    /// # Errors
    /// [`DeltaError::Gap`] when versions do not line up, [`DeltaError::Policy`] when the
    /// policy edit does not fit.
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
        // First, as the one step that may still fail (and then changes nothing): an edit that
        // does not fit refuses the whole delta.
        if let Some(change) = delta.policy {
            change.apply_to(&mut self.policy)?;
        }
        for id in &delta.remove {
            self.peers.remove(id);
        }
        for p in delta.upsert {
            self.peers.insert(p.node_id, p);
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

    /// The delta from this map to `newer`.
    pub fn diff(&self, newer: &Netmap) -> NetmapDelta {
        let upsert = newer
            .peers
            .values()
            .filter(|p| self.peers.get(&p.node_id) != Some(*p))
            .cloned()
            .collect();
        let remove = self
            .peers
            .keys()
            .filter(|id| !newer.peers.contains_key(id))
            .copied()
            .collect();
        let upsert_workloads = newer
            .workloads
            .values()
            .filter(|w| self.workloads.get(&w.name) != Some(*w))
            .cloned()
            .collect();
        let remove_workloads = self
            .workloads
            .keys()
            .filter(|n| !newer.workloads.contains_key(*n))
            .cloned()
            .collect();
        let policy = match (&self.policy, &newer.policy) {
            (old, new) if old == new => None,
            (_, Some(p)) => Some(PolicyChange::Set(p.clone())),
            (Some(_), None) => Some(PolicyChange::Clear),
            (None, None) => None,
        };
        NetmapDelta {
            from_version: self.version,
            to_version: newer.version,
            upsert,
            remove,
            upsert_workloads,
            remove_workloads,
            policy,
        }
    }

    /// The prefixes routed to node `id`: its own ([`PeerInfo::routed`]), the addresses of
    /// the workloads it holds, and those of the external nodes it is the gateway of.
    pub fn routed_to(&self, id: NodeId) -> Vec<IpNet> {
        let mut out = self
            .peers
            .get(&id)
            .map(PeerInfo::routed)
            .unwrap_or_default();
        out.extend(
            self.workloads
                .values()
                .filter(|w| w.holder == Some(id))
                .flat_map(WorkloadInfo::addresses),
        );
        out.extend(self.externals_via(id).flat_map(PeerInfo::routed));
        out
    }

    /// The external nodes whose gateway is node `id`.
    pub fn externals_via(&self, id: NodeId) -> impl Iterator<Item = &PeerInfo> + '_ {
        self.peers.values().filter(move |p| p.via == Some(id))
    }
}

mod peers_as_list {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        peers: &BTreeMap<NodeId, PeerInfo>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(peers.values())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<NodeId, PeerInfo>, D::Error> {
        let list = Vec::<PeerInfo>::deserialize(d)?;
        Ok(list.into_iter().map(|p| (p.node_id, p)).collect())
    }
}

mod workloads_as_list {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        w: &BTreeMap<String, WorkloadInfo>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(w.values())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, WorkloadInfo>, D::Error> {
        let list = Vec::<WorkloadInfo>::deserialize(d)?;
        Ok(list.into_iter().map(|w| (w.name.clone(), w)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: NodeId, ep: &str) -> PeerInfo {
        PeerInfo {
            node_id: id,
            name: format!("vm-{id}"),
            public_key: PublicKey([id as u8; 32]),
            next_key: None,
            addresses: vec![format!("100.64.0.{id}/32").parse().unwrap()],
            allowed_ips: vec![],
            endpoints: vec![ep.parse().unwrap()],
            labels: BTreeMap::new(),
            tags: Vec::new(),
            via: None,
        }
    }

    #[test]
    fn diff_then_apply_reaches_the_newer_map() {
        let mut old = Netmap {
            version: 3,
            ..Netmap::default()
        };
        old.peers.insert(1, peer(1, "198.18.0.1:51820"));
        old.peers.insert(2, peer(2, "198.18.0.2:51820"));
        let mut new = old.clone();
        new.version = 5;
        new.peers.remove(&1);
        new.peers.insert(2, peer(2, "198.18.0.9:51820"));
        new.peers.insert(3, peer(3, "198.18.0.3:51820"));
        let d = old.diff(&new);
        assert_eq!(d.remove, vec![1]);
        assert_eq!(d.upsert.len(), 2);
        let mut applied = old.clone();
        applied.apply(d).unwrap();
        assert_eq!(applied, new);
    }

    #[test]
    fn gaps_are_refused_and_repeats_ignored() {
        let mut m = Netmap {
            version: 4,
            ..Netmap::default()
        };
        let gap = NetmapDelta {
            from_version: 5,
            to_version: 6,
            ..Default::default()
        };
        assert_eq!(
            m.apply(gap),
            Err(DeltaError::Gap(Gap {
                have: 4,
                delta_from: 5
            }))
        );
        assert_eq!(m.version, 4);
        let old = NetmapDelta {
            from_version: 2,
            to_version: 3,
            upsert: vec![peer(9, "198.18.0.9:1")],
            ..Default::default()
        };
        assert_eq!(m.apply(old), Ok(()));
        assert!(m.peers.is_empty());
        let backwards = NetmapDelta {
            from_version: 4,
            to_version: 4,
            ..Default::default()
        };
        assert!(m.apply(backwards).is_err());
    }

    #[test]
    fn a_policy_edit_applies_to_its_base_or_the_whole_delta_is_refused() {
        let rules = |ports: &[u16]| {
            let text: String = ports
                .iter()
                .map(|p| format!("[[rule]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"tcp:{p}\"]\n"))
                .collect();
            crate::policy::parse(&text).unwrap()
        };
        let v1 = rules(&[1, 2, 3, 4]).into_policy(1);
        let v2 = rules(&[1, 2, 9, 4]).into_policy(2);
        let mut m = Netmap {
            version: 7,
            policy: Some(v1.clone()),
            ..Netmap::default()
        };
        let delta = NetmapDelta {
            from_version: 7,
            to_version: 8,
            upsert: vec![peer(1, "198.18.0.1:51820")],
            policy: Some(PolicyChange::Edit(v1.edit_to(&v2).unwrap())),
            ..Default::default()
        };
        // Over the wire, then applied.
        let delta: NetmapDelta =
            serde_json::from_slice(&serde_json::to_vec(&delta).unwrap()).unwrap();
        let mut applied = m.clone();
        applied.apply(delta.clone()).unwrap();
        assert_eq!(applied.policy.as_ref(), Some(&v2));
        assert_eq!(applied.peers.len(), 1);
        // A map with another base, or none, refuses it and changes nothing.
        m.policy = Some(rules(&[1, 2, 3, 5]).into_policy(1));
        let before = m.clone();
        assert!(matches!(m.apply(delta.clone()), Err(DeltaError::Policy(_))));
        assert_eq!(m, before);
        m.policy = None;
        assert!(matches!(m.apply(delta), Err(DeltaError::Policy(_))));
        assert!(m.peers.is_empty() && m.version == 7);
    }

    #[test]
    fn a_node_is_routed_its_prefixes_and_the_workloads_it_holds() {
        let mut m = Netmap {
            version: 1,
            ..Netmap::default()
        };
        m.peers.insert(1, peer(1, "198.18.0.1:51820"));
        m.peers.insert(2, peer(2, "198.18.0.2:51820"));
        let w = WorkloadInfo {
            id: 1,
            name: "chat".into(),
            address: "100.64.50.10/32".parse().unwrap(),
            holder: Some(2),
            generation: 1,
            previous: None,
            candidates: vec![1, 2],
            grace_ms: None,
            tags: Vec::new(),
            address6: None,
        };
        m.workloads.insert(w.name.clone(), w);
        assert_eq!(
            m.routed_to(1),
            vec!["100.64.0.1/32".parse::<IpNet>().unwrap()]
        );
        assert_eq!(
            m.routed_to(2),
            vec![
                "100.64.0.2/32".parse::<IpNet>().unwrap(),
                "100.64.50.10/32".parse().unwrap()
            ]
        );
        assert!(m.routed_to(3).is_empty());
    }

    #[test]
    fn a_gateway_is_routed_its_external_nodes_addresses() {
        let mut m = Netmap::default();
        m.peers.insert(1, peer(1, "198.18.0.1:51820"));
        m.peers.insert(2, peer(2, "198.18.0.2:51820"));
        let mut phone = peer(3, "198.18.0.3:51820");
        phone.via = Some(1);
        m.peers.insert(3, phone);
        assert_eq!(
            m.routed_to(1),
            vec![
                "100.64.0.1/32".parse::<IpNet>().unwrap(),
                "100.64.0.3/32".parse().unwrap()
            ]
        );
        assert_eq!(
            m.routed_to(3),
            vec!["100.64.0.3/32".parse::<IpNet>().unwrap()]
        );
        assert_eq!(
            m.externals_via(1).map(|p| p.node_id).collect::<Vec<_>>(),
            vec![3]
        );
        assert_eq!(m.externals_via(2).count(), 0);
    }

    #[test]
    fn absent_optional_fields_mean_empty() {
        let json = r#"{"node_id":7,"name":"a","public_key":"BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=","addresses":["100.64.0.7/32"]}"#;
        let p: PeerInfo = serde_json::from_str(json).unwrap();
        assert!(p.endpoints.is_empty() && p.labels.is_empty());
        assert_eq!(p.routed(), p.addresses);
    }
}
