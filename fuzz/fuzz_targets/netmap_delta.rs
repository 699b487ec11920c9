//! Netmap deltas: JSON from the coordinator, decoded to a `NetmapDelta` and applied with
//! `Netmap::apply` to a small map, as an agent does with every `ServerMessage::Delta`.
//!
//! Input: the delta's JSON. It is applied to a fixed map at version 5 (two peers, a workload
//! with an IPv6 address and a tag, a policy of version 1 with three rules) and to a copy of
//! that map moved to the delta's own `from_version` (so that the fuzzer reaches the upsert
//! and remove paths without guessing versions). A policy edit names its result by a digest
//! the fuzzer cannot guess, so a delta carrying one whose script fits the map's policy is
//! applied a third time with the digest of the result a plain model of the script builds:
//! that is how applied edits are reached.
//!
//! Checked: a refused delta changes nothing, and is refused for a version gap or an edit that
//! does not fit (the model's verdict, or a digest other than its result's); an applied one
//! does exactly what it says, to peers, workloads and the policy (set, cleared, or edited to
//! the model's result); applying it again changes nothing; `diff` of the maps before and
//! after, applied to the map before, gives the map after; maps and deltas survive JSON.

#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use meshlink_proto::policy::{self, EditOp, Policy, PolicyEdit};
use meshlink_proto::{
    DeltaError, Gap, Netmap, NetmapDelta, NodeId, PeerInfo, PolicyChange, PublicKey, WorkloadInfo,
};

fuzz_target!(|data: &[u8]| {
    let Ok(delta) = serde_json::from_slice::<NetmapDelta>(data) else {
        return;
    };
    let json = serde_json::to_vec(&delta).expect("a delta serializes");
    let back: NetmapDelta = serde_json::from_slice(&json).expect("a serialized delta decodes");
    assert_eq!(back, delta, "delta changed in a JSON round trip");

    let fixed = small_map(5);
    check(&fixed, &delta);
    let moved = small_map(delta.from_version);
    check(&moved, &delta);
    if let Some(PolicyChange::Edit(edit)) = &delta.policy {
        if let Some(result) = edited(moved.policy.as_ref(), edit) {
            let mut fitting = delta.clone();
            fitting.policy = Some(PolicyChange::Edit(PolicyEdit {
                digest: result.digest(),
                ..edit.clone()
            }));
            check(&moved, &fitting);
        }
    }
});

/// `base` edited by `edit`'s script as plainly as can be (copying every rule), or `None` when
/// the script does not fit it: another base version, counts past its end or short of it, a
/// line moved out of range, more than `MAX_RULES` rules. The digest is not looked at.
fn edited(base: Option<&Policy>, edit: &PolicyEdit) -> Option<Policy> {
    let base = base.filter(|b| b.version == edit.base)?;
    let mut left = base.rules.iter();
    let mut rules = Vec::new();
    for op in &edit.ops {
        match op {
            EditOp::Keep { count, shift } => {
                for _ in 0..*count {
                    let mut r = left.next()?.clone();
                    r.line = u32::try_from(i64::from(r.line).checked_add(*shift)?).ok()?;
                    rules.push(r);
                }
            }
            EditOp::Drop { count } => {
                for _ in 0..*count {
                    left.next()?;
                }
            }
            EditOp::Add { rules: new } => rules.extend(new.iter().cloned()),
        }
        if rules.len() > policy::MAX_RULES {
            return None;
        }
    }
    if left.next().is_some() {
        return None;
    }
    Some(Policy {
        version: edit.version,
        rules,
    })
}

fn check(before: &Netmap, delta: &NetmapDelta) {
    let mut map = before.clone();
    // The policy the delta leaves, if it applies: `None` when its edit does not fit.
    let policy_after = match &delta.policy {
        None => Some(before.policy.clone()),
        Some(PolicyChange::Set(p)) => Some(Some(p.clone())),
        Some(PolicyChange::Clear) => Some(None),
        Some(PolicyChange::Edit(e)) => edited(before.policy.as_ref(), e)
            .filter(|p| p.digest() == e.digest)
            .map(Some),
    };
    match map.apply(delta.clone()) {
        Err(DeltaError::Gap(gap)) => {
            assert_eq!(&map, before, "a refused delta changed the map");
            assert_eq!(
                gap,
                Gap {
                    have: before.version,
                    delta_from: delta.from_version
                }
            );
            assert!(delta.from_version != before.version || delta.to_version <= delta.from_version);
            return;
        }
        Err(DeltaError::Policy(e)) => {
            assert_eq!(&map, before, "a refused delta changed the map");
            assert!(policy_after.is_none(), "an edit that fits was refused: {e}");
            assert!(delta.from_version == before.version && delta.to_version > before.version);
            return;
        }
        Ok(()) if map.version == before.version => {
            assert_eq!(&map, before, "an ignored delta changed the map");
            assert!(delta.to_version <= before.version && delta.from_version < before.version);
            return;
        }
        Ok(()) => {}
    }
    assert_eq!(delta.from_version, before.version);
    assert_eq!(map.version, delta.to_version);
    assert!(map.version > before.version);
    assert_eq!(
        Some(&map.policy),
        policy_after.as_ref(),
        "the policy is not what the delta says"
    );

    // Exactly what the delta says: removals, then upserts (the last of repeats wins).
    let mut upserted: BTreeMap<NodeId, &PeerInfo> = BTreeMap::new();
    for p in &delta.upsert {
        upserted.insert(p.node_id, p);
    }
    for (id, p) in &map.peers {
        assert_eq!(*id, p.node_id, "a peer filed under another id");
    }
    for (id, p) in &upserted {
        assert_eq!(
            map.peers.get(id),
            Some(*p),
            "an upserted peer is not as sent"
        );
    }
    for id in &delta.remove {
        if !upserted.contains_key(id) {
            assert!(!map.peers.contains_key(id), "a removed peer is still there");
        }
    }
    for (id, p) in &before.peers {
        if !upserted.contains_key(id) && !delta.remove.contains(id) {
            assert_eq!(
                map.peers.get(id),
                Some(p),
                "a peer the delta did not name changed"
            );
        }
    }
    let mut wl: BTreeMap<&str, &WorkloadInfo> = BTreeMap::new();
    for w in &delta.upsert_workloads {
        wl.insert(&w.name, w);
    }
    for (name, w) in &map.workloads {
        assert_eq!(name, &w.name, "a workload filed under another name");
    }
    for (name, w) in &wl {
        assert_eq!(map.workloads.get(*name), Some(*w));
    }
    for name in &delta.remove_workloads {
        if !wl.contains_key(name.as_str()) {
            assert!(!map.workloads.contains_key(name));
        }
    }
    for (name, w) in &before.workloads {
        if !wl.contains_key(name.as_str()) && !delta.remove_workloads.contains(name) {
            assert_eq!(map.workloads.get(name), Some(w));
        }
    }

    // A repeat is ignored.
    let mut again = map.clone();
    assert_eq!(again.apply(delta.clone()), Ok(()));
    assert_eq!(again, map, "a repeated delta changed the map");

    // diff and apply agree.
    let d = before.diff(&map);
    let mut rebuilt = before.clone();
    rebuilt
        .apply(d)
        .expect("a diff applies to the map it was taken from");
    assert_eq!(rebuilt, map, "diff then apply does not reach the newer map");

    // The map survives JSON (peers and workloads travel as lists).
    let json = serde_json::to_vec(&map).expect("a map serializes");
    let back: Netmap = serde_json::from_slice(&json).expect("a serialized map decodes");
    assert_eq!(back, map, "map changed in a JSON round trip");

    for id in map.peers.keys().copied().chain([0, 3, u64::MAX]) {
        let _ = map.routed_to(id);
    }
}

/// Two peers, one workload held by the second (with an IPv6 address and a tag), and a
/// policy of three rules at version 1, at `version`.
fn small_map(version: u64) -> Netmap {
    let peer = |id: u8| PeerInfo {
        node_id: NodeId::from(id),
        name: format!("vm-{id}"),
        public_key: PublicKey([id; 32]),
        next_key: None,
        addresses: vec![format!("100.64.0.{id}/32").parse().unwrap()],
        allowed_ips: vec![],
        endpoints: vec![format!("198.18.0.{id}:51820").parse().unwrap()],
        labels: BTreeMap::from([("provider".to_string(), "aws".to_string())]),
        tags: Vec::new(),
        via: None,
    };
    let chat = WorkloadInfo {
        id: 1,
        name: "chat".into(),
        address: "100.64.50.10/32".parse().unwrap(),
        address6: Some("fd00::50:10/128".parse().unwrap()),
        holder: Some(2),
        generation: 1,
        previous: None,
        candidates: vec![1, 2],
        grace_ms: None,
        tags: vec!["app".into()],
    };
    let rules = "[[rule]]\nfrom = [\"*\"]\nto = [\"tag:app\"]\nports = [\"tcp:443\"]\n\n\
                 [[rule]]\nfrom = [\"node:vm-1\"]\nto = [\"node:vm-2\"]\nports = [\"icmp\"]\n\n\
                 [[rule]]\nfrom = [\"workload:chat\"]\nto = [\"*\"]\nports = [\"udp:53\"]\n";
    let policy = policy::parse(rules)
        .expect("the fixed policy parses")
        .into_policy(1);
    Netmap {
        version,
        peers: BTreeMap::from([(1, peer(1)), (2, peer(2))]),
        workloads: BTreeMap::from([(chat.name.clone(), chat)]),
        policy: Some(policy),
    }
}
