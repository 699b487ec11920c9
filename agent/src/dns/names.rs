//! The names a mesh node answers for, from its trusted network map: pure.
//!
//! `NODE.NETWORK.SUFFIX` for every node of the map (its own included), `WORKLOAD.NETWORK.SUFFIX`
//! for every workload; all lower case (DNS compares names without case). A node name and a
//! workload name that are the same give the workload's address: a workload is a service that
//! clients look up, a node is reachable by address too.
//!
//! A workload's address never changes when it moves (moves carry the address), so its name
//! "follows" the workload by answering that address wherever the workload runs; the holder of
//! the moment is published beside it as a TXT record `holder=NODE` (`holder=` when nobody holds
//! it), and both have a short TTL ([`WORKLOAD_TTL`]) so that a cache never shows an old holder
//! for long.
//!
//! [`NameTable::zone`] turns the table into a hickory zone (SOA at the suffix), which answers
//! NXDOMAIN for any other name under the suffix (with the SOA, so resolvers cache the negative
//! answer for [`NEGATIVE_TTL`] only); names outside the suffix are no zone of ours, which hickory's
//! catalog refuses (REFUSED: not an open resolver).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use hickory_server::net::runtime::TokioRuntimeProvider;
use hickory_server::proto::rr::rdata::{A, AAAA, SOA, TXT};
use hickory_server::proto::rr::{LowerName, Name, RData, Record};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};
use meshlink_proto::Netmap;

/// TTL of a node's records: node addresses change only when a node is deleted and joins again.
pub const NODE_TTL: u32 = 30;
/// TTL of a workload's records: short, so that the holder shown follows a move at once.
pub const WORKLOAD_TTL: u32 = 5;
/// How long a resolver may remember that a name does not exist (the SOA's minimum).
pub const NEGATIVE_TTL: u32 = 5;

/// What one name answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its addresses (A and AAAA records).
    pub addresses: Vec<IpAddr>,
    /// The TTL of its records.
    pub ttl: u32,
    /// For a workload: the name of the node holding it (`Some("")` when nobody does); `None`
    /// for a node.
    pub holder: Option<String>,
}

/// Every name of one network, by fully qualified name (lower case, no final dot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameTable {
    suffix: String,
    entries: BTreeMap<String, Entry>,
}

/// `name` as one DNS label, lower-cased: letters, digits, `-` and `_`, 1 to 63 bytes, no
/// hyphen at either end. `None` for a name that cannot be one (it gets no record).
pub fn label(name: &str) -> Option<String> {
    let label = name.to_ascii_lowercase();
    let ok = (1..=63).contains(&label.len())
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && !label.starts_with('-')
        && !label.ends_with('-');
    ok.then_some(label)
}

impl NameTable {
    /// The names of `map`, a map of network `network`, under `suffix` (already checked by
    /// `config::parse_dns_suffix`). Nodes and workloads whose names are no DNS label are left
    /// out; `None` when the network's own name is none.
    pub fn from_map(map: &Netmap, network: &str, suffix: &str) -> Option<NameTable> {
        let domain = format!("{}.{suffix}", label(network)?);
        let mut entries = BTreeMap::new();
        for peer in map.peers.values() {
            let Some(name) = label(&peer.name) else {
                continue;
            };
            entries.insert(
                format!("{name}.{domain}"),
                Entry {
                    addresses: peer.addresses.iter().map(|a| a.addr()).collect(),
                    ttl: NODE_TTL,
                    holder: None,
                },
            );
        }
        for w in map.workloads.values() {
            let Some(name) = label(&w.name) else {
                continue;
            };
            let holder = w
                .holder
                .and_then(|id| map.peers.get(&id))
                .map_or_else(String::new, |p| p.name.clone());
            entries.insert(
                format!("{name}.{domain}"),
                Entry {
                    addresses: w.addresses().map(|a| a.addr()).collect(),
                    ttl: WORKLOAD_TTL,
                    holder: Some(holder),
                },
            );
        }
        Some(NameTable {
            suffix: suffix.to_string(),
            entries,
        })
    }

    /// What `name` (fully qualified, lower case, no final dot) answers, if it is in the table.
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.get(name)
    }

    /// How many names.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The table as a catalog with one authoritative zone, the suffix; `serial` is its SOA
    /// serial (the map's version).
    pub fn zone(&self, serial: u32) -> Catalog {
        let origin = fqdn(&self.suffix);
        let mut zone = InMemoryZoneHandler::<TokioRuntimeProvider>::empty(
            origin.clone(),
            ZoneType::Primary,
            AxfrPolicy::Deny,
        );
        let soa = SOA::new(
            fqdn(&format!("ns.{}", self.suffix)),
            fqdn(&format!("hostmaster.{}", self.suffix)),
            serial,
            60,
            60,
            3600,
            NEGATIVE_TTL,
        );
        zone.upsert_mut(
            Record::from_rdata(origin.clone(), NEGATIVE_TTL, RData::SOA(soa)),
            serial,
        );
        for (name, entry) in &self.entries {
            let name = fqdn(name);
            for ip in &entry.addresses {
                let rdata = match ip {
                    IpAddr::V4(v4) => RData::A(A(*v4)),
                    IpAddr::V6(v6) => RData::AAAA(AAAA(*v6)),
                };
                zone.upsert_mut(Record::from_rdata(name.clone(), entry.ttl, rdata), serial);
            }
            if let Some(holder) = &entry.holder {
                let txt = TXT::new(vec![format!("holder={holder}")]);
                zone.upsert_mut(
                    Record::from_rdata(name.clone(), entry.ttl, RData::TXT(txt)),
                    serial,
                );
            }
        }
        let mut catalog = Catalog::new();
        catalog.upsert(LowerName::new(&origin), vec![Arc::new(zone)]);
        catalog
    }
}

/// A checked name (labels made by [`label`] and a checked suffix) as hickory's, with the
/// final dot.
fn fqdn(name: &str) -> Name {
    let mut n = Name::from_ascii(name).expect("names are made of checked labels");
    n.set_fqdn(true);
    n
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use meshlink_proto::workload::WorkloadInfo;
    use meshlink_proto::{PeerInfo, PublicKey};

    pub(crate) fn node(id: u64, name: &str, addr: &str) -> PeerInfo {
        PeerInfo {
            node_id: id,
            name: name.into(),
            public_key: PublicKey([id as u8; 32]),
            next_key: None,
            addresses: vec![addr.parse().unwrap()],
            allowed_ips: Vec::new(),
            endpoints: Vec::new(),
            labels: Default::default(),
            tags: Vec::new(),
            via: None,
        }
    }

    pub(crate) fn workload(name: &str, addr: &str, holder: Option<u64>) -> WorkloadInfo {
        WorkloadInfo {
            id: 1,
            name: name.into(),
            address: addr.parse().unwrap(),
            holder,
            generation: 1,
            previous: None,
            candidates: Vec::new(),
            grace_ms: None,
            tags: Vec::new(),
            address6: None,
        }
    }

    pub(crate) fn map() -> Netmap {
        let mut map = Netmap {
            version: 7,
            ..Netmap::default()
        };
        for p in [
            node(1, "vm-a1", "100.64.0.1/32"),
            node(2, "VM-B1", "100.64.0.2/32"),
            node(3, "has space", "100.64.0.3/32"),
            node(4, "v6", "fd00::4/128"),
        ] {
            map.peers.insert(p.node_id, p);
        }
        for w in [
            workload("chat", "100.64.50.10/32", Some(2)),
            workload("idle", "100.64.50.11/32", None),
        ] {
            map.workloads.insert(w.name.clone(), w);
        }
        map
    }

    #[test]
    fn nodes_and_workloads_are_named_under_network_and_suffix() {
        let t = NameTable::from_map(&map(), "Prod", "mesh").unwrap();
        let a1 = t.get("vm-a1.prod.mesh").unwrap();
        assert_eq!(a1.addresses, ["100.64.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!((a1.ttl, a1.holder.as_deref()), (NODE_TTL, None));
        // Lower-cased, whatever the map's case.
        assert!(t.get("vm-b1.prod.mesh").is_some());
        assert_eq!(
            t.get("v6.prod.mesh").unwrap().addresses,
            ["fd00::4".parse::<IpAddr>().unwrap()]
        );
        let chat = t.get("chat.prod.mesh").unwrap();
        assert_eq!(chat.addresses, ["100.64.50.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(chat.ttl, WORKLOAD_TTL);
        assert_eq!(chat.holder.as_deref(), Some("VM-B1"));
        assert_eq!(t.get("idle.prod.mesh").unwrap().holder.as_deref(), Some(""));
        // A name that is no DNS label gets no record; the rest do.
        assert_eq!(t.len(), 5);
        assert!(NameTable::from_map(&map(), "not a label", "mesh").is_none());
    }

    #[test]
    fn a_workload_named_like_a_node_answers_its_own_address() {
        let mut m = map();
        let w = workload("vm-a1", "100.64.50.20/32", Some(1));
        m.workloads.insert(w.name.clone(), w);
        let t = NameTable::from_map(&m, "prod", "mesh").unwrap();
        assert_eq!(
            t.get("vm-a1.prod.mesh").unwrap().addresses,
            ["100.64.50.20".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn labels_are_checked() {
        assert_eq!(label("Web_1").as_deref(), Some("web_1"));
        for bad in ["", "-x", "x-", "a.b", "a b", &"x".repeat(64), "é"] {
            assert_eq!(label(bad), None, "{bad:?}");
        }
    }
}
