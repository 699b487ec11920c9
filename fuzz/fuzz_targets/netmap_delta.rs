//! Netmap deltas: JSON from the coordinator, decoded to a `NetmapDelta` and applied with
//! `Netmap::apply` to a small map, as an agent does with every `ServerMessage::Delta`.
//!
//! Input: the delta's JSON. It is applied to a fixed map at version 5 and to a copy of that map
//! moved to the delta's own `from_version` (so that the fuzzer reaches the upsert and remove
//! paths without guessing versions). Checked: a refused delta changes nothing; an applied one
//! does exactly what it says; applying it again changes nothing; `diff` of the maps before and
//! after, applied to the map before, gives the map after; maps and deltas survive JSON.

#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use meshlink_proto::{Netmap, NetmapDelta, NodeId, PeerInfo, PublicKey, WorkloadInfo};

fuzz_target!(|data: &[u8]| {
    let Ok(delta) = serde_json::from_slice::<NetmapDelta>(data) else {
        return;
    };
    let json = serde_json::to_vec(&delta).expect("a delta serializes");
    let back: NetmapDelta = serde_json::from_slice(&json).expect("a serialized delta decodes");
    assert_eq!(back, delta, "delta changed in a JSON round trip");

    let fixed = small_map(5);
    check(&fixed, &delta);
    check(&small_map(delta.from_version), &delta);
});

fn check(before: &Netmap, delta: &NetmapDelta) {
    let mut map = before.clone();
    match map.apply(delta) {
        Err(gap) => {
            assert_eq!(&map, before, "a refused delta changed the map");
            assert_eq!(
                (gap.have, gap.delta_from),
                (before.version, delta.from_version)
            );
            assert!(delta.from_version != before.version || delta.to_version <= delta.from_version);
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
    assert_eq!(again.apply(delta), Ok(()));
    assert_eq!(again, map, "a repeated delta changed the map");

    // diff and apply agree.
    let d = before.diff(&map);
    let mut rebuilt = before.clone();
    rebuilt
        .apply(&d)
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

/// Two peers and one workload held by the second, at `version`.
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
        holder: Some(2),
        generation: 1,
        previous: None,
        candidates: vec![1, 2],
        grace_ms: None,
    };
    Netmap {
        version,
        peers: BTreeMap::from([(1, peer(1)), (2, peer(2))]),
        workloads: BTreeMap::from([(chat.name.clone(), chat)]),
    }
}
