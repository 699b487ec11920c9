//! Key rotation on the agent: both sides of it.
//!
//! - The rotating node (see `meshlink_proto::key_rotation` for the steps): the control loop
//!   makes the next key pair in the state directory (`StateDir::make_next_key`, 0600, never
//!   sent), announces its public key, and at the switch renames it over the key in use
//!   (`StateDir::switch_to_next_key`), hands it to the data plane through [`KeySwitch`] and
//!   opens a new session whose hello carries the new key.
//! - Its peers: a peer whose map entry shows a `next_key` gets that key configured as an alias
//!   of the same node ([`alias_peers`]: a peer with no allowed IPs, see
//!   `Device::set_key_aliases`), so that the node's first handshake under the new key is
//!   accepted and takes the traffic over; when the map shows the new key alone, the alias's
//!   peer (and its session) becomes the node's peer and the old key is gone.

use std::collections::HashMap;
use std::time::{Instant, SystemTime};

use meshlink_proto::agent_session::AgentSession;
use meshlink_proto::{Netmap, PublicKey};

use crate::settings::{PeerConfig, PrivateKey};

/// What the control loop needs from the data plane to switch keys.
pub trait KeySwitch: Send + Sync {
    /// From now on the device (and path discovery) uses `key`: every session is made again
    /// under it, and a handshake with every peer starts at once.
    fn switch_key(&self, key: &PrivateKey);
}

/// The alias peers for the peers configured in `peers` whose map entry shows a next key:
/// appended to `peers` (no endpoint, no allowed IPs, the same keepalive), and returned as
/// `next key -> key in use` for `Device::set_key_aliases`. A next key that is some configured
/// peer's key already is left out.
pub fn alias_peers(map: &Netmap, peers: &mut Vec<PeerConfig>) -> HashMap<PublicKey, PublicKey> {
    let mut aliases = HashMap::new();
    let mut extra = Vec::new();
    for p in map.peers.values() {
        let Some(next) = p.next_key else { continue };
        let Some(primary) = peers.iter().find(|c| c.public_key == p.public_key) else {
            continue;
        };
        if next == p.public_key || peers.iter().any(|c| c.public_key == next) {
            continue;
        }
        extra.push(PeerConfig {
            public_key: next,
            preshared_key: primary.preshared_key,
            endpoint: None,
            allowed_ips: Vec::new(),
            persistent_keepalive: primary.persistent_keepalive,
        });
        aliases.insert(next, p.public_key);
    }
    peers.extend(extra);
    aliases
}

/// The key as `meshlink-agent status` shows it: its age (from the key file), and a rotation
/// under way (the next key, when the switch is due).
pub fn status_json(
    key_made: Option<SystemTime>,
    session: Option<&AgentSession>,
    now: Instant,
) -> serde_json::Value {
    let age = key_made.and_then(|t| SystemTime::now().duration_since(t).ok());
    let (next, due) = session.map_or((None, None), |s| {
        (
            s.keys().pending(),
            s.keys()
                .switch_at()
                .map(|at| at.saturating_duration_since(now).as_secs()),
        )
    });
    serde_json::json!({
        "age_secs": age.map(|a| a.as_secs()),
        "next_public_key": next.map(|k| k.to_base64()),
        "switch_in_secs": due,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshlink_proto::PeerInfo;

    fn info(id: u64, key: u8, next: Option<u8>) -> PeerInfo {
        PeerInfo {
            node_id: id,
            name: format!("n{id}"),
            public_key: PublicKey([key; 32]),
            next_key: next.map(|n| PublicKey([n; 32])),
            addresses: vec![format!("100.64.0.{id}/32").parse().unwrap()],
            allowed_ips: vec![],
            endpoints: vec![],
            labels: Default::default(),
            tags: vec![],
            via: None,
        }
    }

    fn config(key: u8) -> PeerConfig {
        PeerConfig {
            public_key: PublicKey([key; 32]),
            preshared_key: None,
            endpoint: Some("198.18.0.1:51820".parse().unwrap()),
            allowed_ips: vec!["100.64.0.1/32".parse().unwrap()],
            persistent_keepalive: Some(25),
        }
    }

    #[test]
    fn only_configured_peers_get_an_alias_of_their_next_key() {
        let map = Netmap {
            version: 3,
            peers: [
                (1, info(1, 1, Some(11))),
                (2, info(2, 2, Some(12))),
                (3, info(3, 3, None)),
                (4, info(4, 4, Some(3))),
            ]
            .into_iter()
            .collect(),
            ..Netmap::default()
        };
        // Peer 2 is hidden by the policy (not configured): its next key is not either.
        let mut peers = vec![config(1), config(3), config(4)];
        let aliases = alias_peers(&map, &mut peers);
        assert_eq!(
            aliases,
            HashMap::from([(PublicKey([11; 32]), PublicKey([1; 32]))])
        );
        assert_eq!(peers.len(), 4);
        let alias = &peers[3];
        assert_eq!(alias.public_key, PublicKey([11; 32]));
        assert_eq!(alias.endpoint, None);
        assert!(alias.allowed_ips.is_empty());
        assert_eq!(
            alias.persistent_keepalive,
            Some(25),
            "kept when it becomes the peer"
        );
    }
}
