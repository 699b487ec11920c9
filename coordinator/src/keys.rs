//! Key rotation and node expiry at the coordinator: the schedule per network, the operator's
//! request, what a hello and a `NextKey` do to a rotation, and the expiry of nodes that stay
//! away. The decisions are the pure functions of `handlers::nodes` ([`nodes::rotation_due`],
//! [`nodes::expires_at`], [`nodes::announce_next_key`], [`nodes::complete_rotation`]); this
//! module runs them under the service's write lock and tells the hub.
//!
//! ```text
//!  meshctl node rotate-key / the schedule (key_tick)
//!    ──> rotation_asked in the store ──> RotateKey{grace} to the node's session (now, or at
//!        its next hello; a session on another coordinator gets it from that one's tick)
//!  agent: NextKey{pk} ──> next_key = pk, one delta: every peer accepts pk for the node
//!  agent, grace later: switches, reconnects, hello with pk ──> pk is the only key, one delta
//! ```
//!
//! Only agents whose hello says `key_rotation` are asked; for others the request waits in the
//! store (`meshctl node show` shows it).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use meshlink_proto::control::{encode, Hello, ServerMessage};
use meshlink_proto::{NodeId, PublicKey};

use crate::handlers::nodes;
use crate::handlers::{ApiError, Caller};
use crate::hub::CloseReason;
use crate::service::Service;
use crate::store::{NodeRecord, UnixTime};

/// The default wait between a node's next key reaching its peers and the node switching to it.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3);

/// The longest pause between two looks at the schedule, at expiries and at rotations asked
/// on other coordinators.
pub const MAX_TICK: Duration = Duration::from_secs(30);

/// The settings of key rotation and node expiry (`configs/coordinator.example.toml`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySettings {
    /// How old a node's key may get before the coordinator asks for a rotation, for networks
    /// without their own entry; `None`: no schedule.
    pub rotation: Option<Duration>,
    /// Per network, replacing `rotation` (`None`: no schedule in that network).
    pub networks: BTreeMap<String, Option<Duration>>,
    /// How long peers get to learn a next key before the node switches to it.
    pub grace: Duration,
    /// How long a node may stay away (no session) before it is revoked as expired; `None`:
    /// never.
    pub node_expiry: Option<Duration>,
}

impl Default for KeySettings {
    fn default() -> Self {
        KeySettings {
            rotation: None,
            networks: BTreeMap::new(),
            grace: DEFAULT_GRACE,
            node_expiry: None,
        }
    }
}

impl KeySettings {
    /// The rotation interval of `network`, if it has one.
    pub fn rotation_of(&self, network: &str) -> Option<Duration> {
        self.networks.get(network).copied().unwrap_or(self.rotation)
    }

    /// How often [`Service::key_tick`] should run: a quarter of the shortest interval it
    /// watches, between a second and [`MAX_TICK`].
    pub fn tick(&self) -> Duration {
        self.networks
            .values()
            .copied()
            .chain([self.rotation, self.node_expiry])
            .flatten()
            .map(|d| d / 4)
            .min()
            .unwrap_or(MAX_TICK)
            .clamp(Duration::from_secs(1), MAX_TICK)
    }
}

/// What the service keeps about rotations: its settings, and the nodes whose session here
/// rotates keys, with the request last sent on it.
#[derive(Debug, Default)]
pub struct KeyState {
    settings: Mutex<KeySettings>,
    sessions: Mutex<HashMap<NodeId, Option<UnixTime>>>,
}

impl KeyState {
    pub(crate) fn sessions(&self) -> MutexGuard<'_, HashMap<NodeId, Option<UnixTime>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Service {
    /// Sets the rotation schedule, the grace and the expiry.
    pub fn set_key_settings(&self, settings: KeySettings) {
        *self.keys.settings.lock().unwrap_or_else(|p| p.into_inner()) = settings;
    }

    /// The rotation schedule, the grace and the expiry.
    pub fn key_settings(&self) -> KeySettings {
        self.keys
            .settings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Forgets node `node`'s session here (the node was revoked or deleted).
    pub(crate) fn keys_forget(&self, node: NodeId) {
        self.keys.sessions().remove(&node);
    }

    /// Sends `RotateKey` to node `node`'s session here, for the request made at `asked`, if
    /// the session rotates keys and was not sent that request yet. Returns whether it was sent.
    fn tell_rotate(&self, network: &str, node: NodeId, asked: UnixTime) -> bool {
        let mut sessions = self.keys.sessions();
        let Some(told) = sessions.get_mut(&node) else {
            return false;
        };
        if *told == Some(asked) || !self.hub().is_online(network, node) {
            return false;
        }
        let grace_ms = u64::try_from(self.key_settings().grace.as_millis()).unwrap_or(u64::MAX);
        let frame = encode(&ServerMessage::RotateKey { grace_ms });
        let sent = self.hub().send_to(network, node, frame.into());
        if sent {
            *told = Some(asked);
            tracing::info!(node, network, "asked the node to rotate its key");
        }
        sent
    }

    /// After a hello was accepted and its session attached (under the write lock): a hello
    /// with the node's next key completes its rotation; a session that rotates keys is asked
    /// to when a rotation waits.
    pub(crate) async fn keys_on_hello(&self, node: &NodeRecord, hello: &Hello) {
        match nodes::complete_rotation(self.store(), node, hello.public_key, self.now()).await {
            Ok(changed) => {
                if let Some(v) = changed.version {
                    tracing::info!(
                        node = node.id,
                        network = %node.network,
                        key = %hello.public_key.short(),
                        "key rotation complete"
                    );
                    self.publish_node(&changed.node, v).await;
                }
            }
            Err(e) => tracing::warn!(node = node.id, "cannot complete the key rotation: {e}"),
        }
        {
            let mut sessions = self.keys.sessions();
            if hello.key_rotation {
                sessions.insert(node.id, None);
            } else {
                sessions.remove(&node.id);
            }
        }
        if let Some(asked) = node.rotation_asked {
            self.tell_rotate(&node.network, node.id, asked);
        }
    }

    /// An operator asks node `reference` to rotate its key: its agent is told at once when
    /// it has a session here (else at its next hello, or by the coordinator it is on).
    ///
    /// # Errors
    /// As [`nodes::ask_rotation`].
    pub async fn rotate_key(
        &self,
        reference: &str,
        network: Option<&str>,
    ) -> Result<NodeRecord, ApiError> {
        let _w = self.lock_writes().await;
        let node =
            nodes::ask_rotation(self.store(), &Caller::Admin, self.now(), reference, network)
                .await?;
        if let Some(asked) = node.rotation_asked {
            self.tell_rotate(&node.network, node.id, asked);
        }
        Ok(node)
    }

    /// A node's session announced its next key.
    ///
    /// # Errors
    /// As [`nodes::announce_next_key`]; the session should end.
    pub(crate) async fn next_key_announced(
        &self,
        node: NodeId,
        remote: std::net::IpAddr,
        key: PublicKey,
    ) -> Result<(), ApiError> {
        let _w = self.lock_writes().await;
        let caller = Caller::Node { id: node, remote };
        let changed = nodes::announce_next_key(self.store(), &caller, key).await?;
        match changed.version {
            Some(v) => {
                tracing::info!(node, key = %key.short(), "next key announced");
                self.publish_node(&changed.node, v).await;
            }
            None if changed.node.next_key != Some(key) => {
                tracing::debug!(node, "a next key nobody asked for was ignored");
            }
            None => {}
        }
        Ok(())
    }

    /// The periodic look (`run.rs`, every [`KeySettings::tick`]): nodes whose key is as old as
    /// their network's rotation interval are asked to rotate; rotations asked elsewhere reach
    /// the sessions here; nodes away for `node_expiry` are revoked as expired.
    pub async fn key_tick(&self) {
        let settings = self.key_settings();
        let networks = match self.store().networks().await {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!("cannot read the networks: {e}");
                return;
            }
        };
        let online = self.online_anywhere().await;
        for net in networks {
            let all = match self.store().nodes(Some(&net.name)).await {
                Ok(all) => all,
                Err(e) => {
                    tracing::debug!(network = %net.name, "cannot read the nodes: {e}");
                    continue;
                }
            };
            let now = self.now();
            for node in all.iter().filter(|n| !n.revoked) {
                if let Some(every) = settings.rotation_of(&net.name) {
                    if nodes::rotation_due(node, every, now) {
                        match self.store().ask_rotation(node.id, Some(now)).await {
                            Ok(_) => {
                                tracing::info!(node = node.id, network = %net.name, "the key is due for rotation");
                                self.tell_rotate(&net.name, node.id, now);
                            }
                            Err(e) => tracing::debug!(node = node.id, "cannot ask: {e}"),
                        }
                        continue;
                    }
                }
                if let Some(asked) = node.rotation_asked {
                    self.tell_rotate(&net.name, node.id, asked);
                }
                let due = nodes::expires_at(node, settings.node_expiry, online.contains(&node.id))
                    .is_some_and(|at| at <= now);
                if let (true, Some(expiry)) = (due, settings.node_expiry) {
                    self.expire(node, expiry).await;
                }
            }
        }
    }

    /// Revokes `node` as expired (unless a session came up meanwhile) and tells its peers.
    async fn expire(&self, node: &NodeRecord, expiry: Duration) {
        let _w = self.lock_writes().await;
        // Asked again under the lock: a hello takes the same lock.
        if self.hub().is_online(&node.network, node.id) {
            return;
        }
        match nodes::expire(self.store(), node, expiry, self.now()).await {
            Ok(changed) if changed.version.is_some() => {
                let days = expiry.as_secs() / 86_400;
                let why = if days > 0 {
                    format!("expired: not seen for {days} days")
                } else {
                    format!("expired: not seen for {} s", expiry.as_secs())
                };
                tracing::info!(node = node.id, network = %node.network, "node {why}");
                self.remove(&changed.node, changed.version, CloseReason::Revoked, &why)
                    .await;
                drop(_w);
                self.release_orphans(&node.network).await;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(node = node.id, "cannot expire the node: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_have_their_own_interval_and_the_tick_follows_the_shortest() {
        let s = |x| Some(Duration::from_secs(x));
        let settings = KeySettings {
            rotation: s(30 * 86_400),
            networks: [("prod".to_string(), s(20)), ("lab".to_string(), None)]
                .into_iter()
                .collect(),
            grace: DEFAULT_GRACE,
            node_expiry: s(7 * 86_400),
        };
        assert_eq!(settings.rotation_of("prod"), s(20));
        assert_eq!(settings.rotation_of("lab"), None);
        assert_eq!(settings.rotation_of("other"), s(30 * 86_400));
        assert_eq!(settings.tick(), Duration::from_secs(5));
        assert_eq!(KeySettings::default().tick(), MAX_TICK);
        let fast = KeySettings {
            rotation: s(2),
            ..KeySettings::default()
        };
        assert_eq!(fast.tick(), Duration::from_secs(1));
    }
}
