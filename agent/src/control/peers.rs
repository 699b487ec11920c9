//! From a network map to WireGuard peers: which peers, which prefixes, which endpoint.
//!
//! A peer may advertise several endpoints (its local addresses and the address the coordinator
//! saw). [`EndpointChooser`] starts with the first and moves to the next when we have been
//! sending to a peer without hearing back; roaming then pins whatever works, since a peer's
//! endpoint follows its latest authenticated packet.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshlink_proto::{Netmap, NodeId, PublicKey};

use crate::dataplane::status::PeerStatus;
use crate::settings::PeerConfig;

/// Keepalive for mesh peers: keeps NAT mappings open and failures visible.
pub const MESH_KEEPALIVE: u16 = 25;
/// How long to try one endpoint without an answer before the next.
pub const TRY_ENDPOINT_FOR: Duration = Duration::from_secs(6);

#[derive(Debug, Clone, Copy)]
struct Choice {
    index: usize,
    since: Instant,
    tx: u64,
    rx: u64,
}

/// Picks and rotates each peer's endpoint. Given time; reads no clock.
#[derive(Debug, Default)]
pub struct EndpointChooser {
    choices: HashMap<PublicKey, Choice>,
}

impl EndpointChooser {
    /// An empty chooser.
    pub fn new() -> Self {
        Self::default()
    }

    /// The WireGuard peers for `map`, leaving out this node (`self_id`) and the external
    /// nodes of other gateways (their addresses are routed to their gateway; see
    /// `meshlink_proto::PeerInfo::via`).
    pub fn peers(&mut self, map: &Netmap, self_id: NodeId, now: Instant) -> Vec<PeerConfig> {
        self.choices
            .retain(|k, _| map.peers.values().any(|p| p.public_key == *k));
        map.peers
            .values()
            .filter(|p| p.node_id != self_id && p.via.is_none_or(|g| g == self_id))
            .map(|p| {
                let c = self.choices.entry(p.public_key).or_insert(Choice {
                    index: 0,
                    since: now,
                    tx: 0,
                    rx: 0,
                });
                let endpoint = if p.endpoints.is_empty() {
                    None
                } else {
                    Some(p.endpoints[c.index % p.endpoints.len()])
                };
                PeerConfig {
                    public_key: p.public_key,
                    preshared_key: None,
                    endpoint,
                    // Its own prefixes and the workload addresses it holds.
                    allowed_ips: map.routed_to(p.node_id),
                    persistent_keepalive: Some(MESH_KEEPALIVE),
                }
            })
            .collect()
    }

    /// Moves to the next endpoint for every peer we have sent to for [`TRY_ENDPOINT_FOR`]
    /// without receiving anything, among those with several endpoints. Returns whether any
    /// choice changed (then call [`peers`](Self::peers) again).
    pub fn rotate_silent(&mut self, map: &Netmap, status: &[PeerStatus], now: Instant) -> bool {
        let mut changed = false;
        for st in status {
            let Some(peer) = map.peers.values().find(|p| p.public_key == st.public_key) else {
                continue;
            };
            let Some(c) = self.choices.get_mut(&st.public_key) else {
                continue;
            };
            let sending = st.tx_bytes > c.tx;
            let hearing = st.rx_bytes > c.rx;
            if hearing || !sending {
                // Working, or idle: restart the clock.
                *c = Choice {
                    index: c.index,
                    since: now,
                    tx: st.tx_bytes,
                    rx: st.rx_bytes,
                };
                continue;
            }
            if peer.endpoints.len() > 1 && now.duration_since(c.since) >= TRY_ENDPOINT_FOR {
                *c = Choice {
                    index: (c.index + 1) % peer.endpoints.len(),
                    since: now,
                    tx: st.tx_bytes,
                    rx: st.rx_bytes,
                };
                changed = true;
            }
        }
        changed
    }

    /// The endpoint currently chosen for a peer (for tests and status).
    pub fn chosen(&self, map: &Netmap, key: &PublicKey) -> Option<SocketAddr> {
        let p = map.peers.values().find(|p| p.public_key == *key)?;
        let c = self.choices.get(key)?;
        p.endpoints.get(c.index % p.endpoints.len().max(1)).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::status::DropCounts;
    use meshlink_proto::PeerInfo;
    use std::collections::BTreeMap;

    fn map() -> Netmap {
        let mut m = Netmap {
            version: 1,
            ..Netmap::default()
        };
        for id in 1..=3u64 {
            m.peers.insert(
                id,
                PeerInfo {
                    node_id: id,
                    name: format!("vm-{id}"),
                    public_key: PublicKey([id as u8; 32]),
                    next_key: None,
                    addresses: vec![format!("100.64.0.{id}/32").parse().unwrap()],
                    allowed_ips: vec![],
                    endpoints: vec![
                        format!("198.18.0.{id}:51820").parse().unwrap(),
                        format!("198.18.1.{id}:51820").parse().unwrap(),
                    ],
                    labels: BTreeMap::new(),
                    tags: Vec::new(),
                    via: None,
                },
            );
        }
        m
    }

    fn status(id: u8, tx: u64, rx: u64) -> PeerStatus {
        PeerStatus {
            public_key: PublicKey([id; 32]),
            endpoint: None,
            last_handshake: None,
            tx_bytes: tx,
            rx_bytes: rx,
            tx_packets: 0,
            rx_packets: 0,
            handshakes: 0,
            drops: DropCounts::default(),
        }
    }

    #[test]
    fn self_is_left_out_and_first_endpoint_tried() {
        let mut c = EndpointChooser::new();
        let now = Instant::now();
        let peers = c.peers(&map(), 2, now);
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[0].endpoint, Some("198.18.0.1:51820".parse().unwrap()));
        assert_eq!(peers[1].allowed_ips, vec!["100.64.0.3/32".parse().unwrap()]);
    }

    #[test]
    fn an_external_node_is_a_peer_of_its_gateway_only() {
        let mut m = map();
        m.peers.get_mut(&3).unwrap().via = Some(1);
        let mut c = EndpointChooser::new();
        let now = Instant::now();
        // Node 2: peers with the gateway alone, which it routes the phone's address to.
        let peers = c.peers(&m, 2, now);
        assert_eq!(peers.len(), 1);
        assert_eq!(
            peers[0].allowed_ips,
            vec![
                "100.64.0.1/32".parse().unwrap(),
                "100.64.0.3/32".parse().unwrap()
            ]
        );
        // The gateway: the phone is its peer.
        let peers = c.peers(&m, 1, now);
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[1].public_key, PublicKey([3; 32]));
        assert_eq!(peers[1].allowed_ips, vec!["100.64.0.3/32".parse().unwrap()]);
    }

    #[test]
    fn silent_peers_rotate_working_and_idle_ones_do_not() {
        let m = map();
        let mut c = EndpointChooser::new();
        let t0 = Instant::now();
        c.peers(&m, 3, t0);
        // Peer 1: we send, it never answers. Peer 2: it answers. Both start at zero.
        assert!(!c.rotate_silent(&m, &[status(1, 0, 0), status(2, 0, 0)], t0));
        let t1 = t0 + Duration::from_secs(3);
        assert!(!c.rotate_silent(&m, &[status(1, 500, 0), status(2, 500, 300)], t1));
        let t2 = t0 + Duration::from_secs(7);
        assert!(c.rotate_silent(&m, &[status(1, 900, 0), status(2, 900, 600)], t2));
        assert_eq!(
            c.chosen(&m, &PublicKey([1; 32])),
            Some("198.18.1.1:51820".parse().unwrap())
        );
        assert_eq!(
            c.chosen(&m, &PublicKey([2; 32])),
            Some("198.18.0.2:51820".parse().unwrap())
        );
        // Idle (nothing sent) never rotates.
        let t3 = t2 + Duration::from_secs(60);
        assert!(!c.rotate_silent(&m, &[status(1, 900, 0)], t3));
    }
}
