//! The agent's side of a WireGuard key rotation, as a state machine given time.
//!
//! ```text
//!  coordinator: RotateKey{grace} ──> on_rotate ──> KeyAction::MakeKey (no key pair made yet)
//!  shell: key pair made and stored (0600) ──> made(pk) ──> NextKey{pk} to the coordinator
//!  coordinator: delta, this node's entry with next_key = pk (every peer now accepts pk)
//!    ──> on_map: the switch is due `grace` later ──> handle_timeout ──> KeyAction::Switch(pk)
//!  shell: the key file replaced, the data plane on the new key, a hello with it
//!    ──> switched(pk); the coordinator makes pk the node's only key
//! ```
//!
//! Why the switch waits for the node's own map: the coordinator stores the next key and
//! tells every peer in one delta; this node sees that delta when its peers do, so `grace`
//! after it every peer that is online has had time to apply it (peers then accept handshakes
//! from either key for the same node, see `PeerInfo::next_key`). A node that restarts between
//! announcing and switching finds its key pair in its state directory and the next key in its
//! map, and switches after [`DEFAULT_SWITCH_GRACE`]; one that restarts after switching says
//! hello with the new key, which completes the rotation at the coordinator.
//!
//! It never reads a clock or a file: [`crate::agent_session::AgentSession`] feeds it and the
//! shell carries out its [`KeyAction`]s.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::control::{ClientMessage, MAX_KEY_SWITCH_GRACE_MS};
use crate::key::PublicKey;
use crate::netmap::{Netmap, NodeId, PeerInfo};

/// The wait before switching when no [`crate::control::ServerMessage::RotateKey`] said how
/// long (an agent that restarted mid-rotation).
pub const DEFAULT_SWITCH_GRACE: Duration = Duration::from_secs(2);

/// What the shell must do for a rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAction {
    /// Make a new key pair (or take the one made before and not used yet), store its private
    /// key (0600, beside the one in use), then call
    /// [`crate::agent_session::AgentSession::next_key_made`].
    MakeKey,
    /// Switch to the key pair made for the rotation, whose public key this is: the private key
    /// in use is replaced by it on disk and in the data plane, then the control session says
    /// hello with it. Then call [`crate::agent_session::AgentSession::key_switched`] (or
    /// [`KeyRotation::switch_failed`]).
    Switch(PublicKey),
}

/// See the module documentation.
#[derive(Debug)]
pub struct KeyRotation {
    me: NodeId,
    /// The key pair made for a rotation and not switched to yet.
    pending: Option<PublicKey>,
    /// A [`KeyAction::MakeKey`] is out and not answered yet.
    making: bool,
    grace: Duration,
    /// When to switch: the node's map showed `pending` as its next key.
    switch_at: Option<Instant>,
    /// A [`KeyAction::Switch`] is out and not answered yet.
    switching: bool,
    actions: VecDeque<KeyAction>,
}

impl KeyRotation {
    /// Node `me`, with no rotation under way.
    pub fn new(me: NodeId) -> Self {
        KeyRotation {
            me,
            pending: None,
            making: false,
            grace: DEFAULT_SWITCH_GRACE,
            switch_at: None,
            switching: false,
            actions: VecDeque::new(),
        }
    }

    /// The key pair made for a rotation and not used yet (the shell found it in the state
    /// directory at start), if any.
    pub fn set_pending(&mut self, key: Option<PublicKey>) {
        self.pending = key;
        self.switch_at = None;
    }

    /// The key pair made for a rotation and not switched to yet.
    pub fn pending(&self) -> Option<PublicKey> {
        self.pending
    }

    /// When the switch is due, once the map showed the next key.
    pub fn switch_at(&self) -> Option<Instant> {
        self.switch_at
    }

    /// The coordinator asks for a rotation, the switch `grace_ms` after the map shows the next
    /// key. Returns the announcement to send at once when a key pair is there already;
    /// otherwise the shell is asked to make one.
    pub fn on_rotate(&mut self, grace_ms: u64) -> Option<ClientMessage> {
        self.grace = Duration::from_millis(grace_ms.min(MAX_KEY_SWITCH_GRACE_MS));
        match self.pending {
            Some(public_key) => Some(ClientMessage::NextKey { public_key }),
            None => {
                if !self.making {
                    self.making = true;
                    self.actions.push_back(KeyAction::MakeKey);
                }
                None
            }
        }
    }

    /// The shell made (and stored) the key pair `key`; returns its announcement.
    pub fn made(&mut self, key: PublicKey) -> ClientMessage {
        self.making = false;
        if self.pending != Some(key) {
            self.pending = Some(key);
            self.switch_at = None;
        }
        ClientMessage::NextKey { public_key: key }
    }

    /// The shell could not make a key pair: a later request tries again.
    pub fn make_failed(&mut self) {
        self.making = false;
    }

    /// The map changed at `now`: when it shows this node's next key as the one made here, the
    /// switch is due `grace` later (once: later maps do not move it); when it shows it as the
    /// node's key already, at once. When the map no longer shows it, no switch is due.
    pub fn on_map(&mut self, map: &Netmap, now: Instant) {
        self.on_own_entry(map.peers.get(&self.me), now);
    }

    /// [`KeyRotation::on_map`] for a map in which this node's entry is `entry`.
    pub fn on_own_entry(&mut self, entry: Option<&PeerInfo>, now: Instant) {
        let (Some(pending), Some(me)) = (self.pending, entry) else {
            return;
        };
        if self.switching {
            return;
        }
        if me.public_key == pending {
            self.switch_at = Some(self.switch_at.map_or(now, |at| at.min(now)));
        } else if me.next_key == Some(pending) {
            self.switch_at.get_or_insert(now + self.grace);
        } else {
            self.switch_at = None;
        }
    }

    /// Time passed: a switch that is due is handed to the shell.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let (Some(at), Some(key)) = (self.switch_at, self.pending) {
            if at <= now && !self.switching {
                self.switching = true;
                self.switch_at = None;
                self.actions.push_back(KeyAction::Switch(key));
            }
        }
    }

    /// The node now uses `key`: the rotation is over here.
    pub fn switched(&mut self, key: PublicKey) {
        if self.pending == Some(key) {
            self.pending = None;
        }
        self.switching = false;
        self.switch_at = None;
    }

    /// The shell could not switch: the next map that shows the next key schedules it again.
    pub fn switch_failed(&mut self) {
        self.switching = false;
        self.switch_at = None;
    }

    /// When [`KeyRotation::handle_timeout`] has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.switch_at.filter(|_| !self.switching)
    }

    /// The next action for the shell.
    pub fn poll_action(&mut self) -> Option<KeyAction> {
        self.actions.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netmap::PeerInfo;

    fn map(version: u64, key: u8, next: Option<u8>) -> Netmap {
        let me = PeerInfo {
            node_id: 1,
            name: "a".into(),
            public_key: PublicKey([key; 32]),
            next_key: next.map(|n| PublicKey([n; 32])),
            addresses: vec!["100.64.0.1/32".parse().unwrap()],
            allowed_ips: vec![],
            endpoints: vec![],
            labels: Default::default(),
            tags: vec![],
            via: None,
        };
        Netmap {
            version,
            peers: [(1, me)].into_iter().collect(),
            ..Netmap::default()
        }
    }

    #[test]
    fn a_rotation_makes_announces_waits_for_the_map_then_switches() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut k = KeyRotation::new(1);
        assert_eq!(k.on_rotate(500), None);
        assert_eq!(k.poll_action(), Some(KeyAction::MakeKey));
        // Asked again before the key is made: one key pair only.
        assert_eq!(k.on_rotate(500), None);
        assert_eq!(k.poll_action(), None);
        let new = PublicKey([2; 32]);
        assert_eq!(k.made(new), ClientMessage::NextKey { public_key: new });
        // Nothing is due before the map shows the next key.
        k.on_map(&map(1, 1, None), t0);
        assert_eq!(k.poll_timeout(), None);
        k.on_map(&map(2, 1, Some(2)), t0 + ms(10));
        assert_eq!(k.poll_timeout(), Some(t0 + ms(510)));
        // Later maps do not push the switch back.
        k.on_map(&map(3, 1, Some(2)), t0 + ms(400));
        assert_eq!(k.poll_timeout(), Some(t0 + ms(510)));
        k.handle_timeout(t0 + ms(509));
        assert_eq!(k.poll_action(), None);
        k.handle_timeout(t0 + ms(510));
        assert_eq!(k.poll_action(), Some(KeyAction::Switch(new)));
        assert_eq!(k.poll_timeout(), None, "one switch at a time");
        k.handle_timeout(t0 + ms(900));
        assert_eq!(k.poll_action(), None);
        k.switched(new);
        assert_eq!(k.pending(), None);
        // The coordinator makes it the only key: nothing more to do.
        k.on_map(&map(4, 2, None), t0 + ms(1000));
        assert_eq!(k.poll_timeout(), None);
    }

    #[test]
    fn a_key_made_before_is_announced_again_and_grace_is_capped() {
        let t0 = Instant::now();
        let mut k = KeyRotation::new(1);
        let pending = PublicKey([7; 32]);
        k.set_pending(Some(pending));
        assert_eq!(
            k.on_rotate(10 * MAX_KEY_SWITCH_GRACE_MS),
            Some(ClientMessage::NextKey {
                public_key: pending
            })
        );
        assert_eq!(k.poll_action(), None, "no second key pair");
        k.on_map(&map(2, 1, Some(7)), t0);
        assert_eq!(
            k.poll_timeout(),
            Some(t0 + Duration::from_millis(MAX_KEY_SWITCH_GRACE_MS))
        );
    }

    #[test]
    fn a_restart_mid_rotation_switches_from_the_map_alone() {
        let t0 = Instant::now();
        // Announced, then restarted: the map shows the next key; the default grace applies.
        let mut k = KeyRotation::new(1);
        k.set_pending(Some(PublicKey([2; 32])));
        k.on_map(&map(5, 1, Some(2)), t0);
        assert_eq!(k.poll_timeout(), Some(t0 + DEFAULT_SWITCH_GRACE));
        // A map that no longer shows it (another key was stored since): no switch.
        k.on_map(&map(6, 1, Some(3)), t0);
        assert_eq!(k.poll_timeout(), None);
        // The map shows it as the node's key already: switch at once.
        k.on_map(&map(7, 2, None), t0);
        assert_eq!(k.poll_timeout(), Some(t0));
        k.handle_timeout(t0);
        assert_eq!(k.poll_action(), Some(KeyAction::Switch(PublicKey([2; 32]))));
        // A failed switch is tried again at the next map.
        k.switch_failed();
        assert_eq!(k.poll_timeout(), None);
        k.on_map(&map(8, 2, None), t0 + DEFAULT_SWITCH_GRACE);
        assert_eq!(k.poll_timeout(), Some(t0 + DEFAULT_SWITCH_GRACE));
    }

    #[test]
    fn a_failed_key_pair_is_asked_again() {
        let mut k = KeyRotation::new(1);
        assert_eq!(k.on_rotate(100), None);
        assert_eq!(k.poll_action(), Some(KeyAction::MakeKey));
        k.make_failed();
        assert_eq!(k.on_rotate(100), None);
        assert_eq!(k.poll_action(), Some(KeyAction::MakeKey));
    }
}
