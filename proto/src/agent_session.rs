//! The agent's side of the control protocol as a state machine without I/O: what an agent
//! does with the coordinator's messages, its own claims and the passing of time, across the
//! QUIC connections that come and go. The agent's control loop, the coordinator's simulation,
//! the load generator and the fencing simulation all drive this one implementation.
//!
//! ```text
//!  connected(now, first map, endpoints) ─┐
//!  handle_message(now, ServerMessage) ───┤                 ┌─> poll_transmit(): ClientMessage to send
//!  claim(now, workload, deadline) ───────┼─> AgentSession ─┼─> poll_event(): map changed, holdings
//!  prepared(workload, generation) ───────┤   (Holdings,    │   changed, prepare tunnels, claim
//!  set_endpoints(endpoints) ─────────────┤    map: M)      │   answered, delta refused
//!  handle_timeout(now) ──────────────────┤                 └─> poll_timeout(): when to call
//!  disconnected(now) ────────────────────┘                      handle_timeout next
//! ```
//!
//! `M` is the map as the session holds it ([`SessionMap`]): the whole [`Netmap`] in the agent
//! and the simulations, a digest per peer in the load generator.
//!
//! It never reads a clock or a socket: every input carries `now`. The shell sends what
//! `poll_transmit` returns in order on the session's stream, and acts on every event.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::Instant;

use crate::control::{ClientMessage, ServerMessage};
use crate::key::PublicKey;
use crate::key_rotation::{KeyAction, KeyRotation};
use crate::netmap::{DeltaError, Netmap, NodeId};
use crate::session_map::SessionMap;
use crate::workload::Holdings;

/// A claim's number, unique for the life of an [`AgentSession`], so that a late answer from an
/// earlier connection can never match a later claim.
pub type ClaimId = u64;

/// Something the shell must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The map changed: publish [`AgentSession::map`] (and cache it).
    MapChanged,
    /// What this node answers for may have changed (a map, a lease, a revocation): whoever
    /// applies [`Holdings`] to the system should look again.
    HoldingsChanged,
    /// A move to this node is coming: bring tunnels up, then call [`AgentSession::prepared`].
    Prepare {
        /// The workload's name.
        workload: String,
        /// The generation the move will take.
        generation: u64,
        /// The peers that matter (the holder and those that talk to the workload); `None`:
        /// every peer.
        warm: Option<Vec<NodeId>>,
    },
    /// A live migration of a workload held here: hand the application's state over to `to`,
    /// then call [`AgentSession::handed_over`].
    Handover {
        /// The workload's name.
        workload: String,
        /// The generation the move will take.
        generation: u64,
        /// The destination.
        to: NodeId,
        /// The coordinator's attempt, to repeat in the answer.
        attempt: u64,
    },
    /// The live migration of that [`Event::Handover`] will not commit.
    HandoverAborted {
        /// The workload's name.
        workload: String,
        /// The generation it would have taken.
        generation: u64,
        /// The attempt.
        attempt: u64,
    },
    /// A delta did not apply (it does not follow the map's version, or its policy edit does
    /// not fit the map's policy): the map is unchanged, a full map was asked for, and deltas
    /// are skipped until it comes.
    DeltaRefused(DeltaError),
    /// The answer to a claim.
    ClaimAnswered {
        /// The claim.
        id: ClaimId,
        /// The generation this node now holds the workload at, or why not.
        result: Result<u64, ClaimError>,
    },
}

/// Why a claim did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    /// The coordinator refused it.
    #[error("{0}")]
    Refused(String),
    /// The coordinator answered with neither a generation nor an error.
    #[error("the coordinator gave no result")]
    NoResult,
    /// The connection it was sent on ended before the answer came.
    #[error("the control session to the coordinator was lost; try again")]
    SessionLost,
    /// Its deadline passed before it could be sent.
    #[error("the coordinator could not be reached before the claim's deadline")]
    Expired,
}

/// Why the coordinator ended the session (the connection must be closed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The coordinator refused this node.
    #[error("the coordinator refused this node: {0}")]
    Refused(String),
    /// The coordinator cannot serve this node now (its database is unavailable): try again.
    #[error("the coordinator cannot serve this node now: {0}")]
    Unavailable(String),
    /// The node was revoked: it must forget its credentials and not come back.
    #[error("this node was revoked: {0}")]
    Revoked(String),
    /// The coordinator broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// See the module documentation. `M` is how the map is held: the whole [`Netmap`], or
/// anything else that follows its rules ([`SessionMap`]).
#[derive(Debug)]
pub struct AgentSession<M = Netmap> {
    holdings: Holdings,
    map: M,
    connected: bool,
    /// After a version gap, deltas are skipped until the one full map asked for arrives.
    awaiting_full_map: bool,
    /// The endpoints last reported on this connection (or to report on the next one).
    endpoints: Vec<SocketAddr>,
    /// Claims sent on this connection and not answered yet.
    claims_sent: BTreeMap<ClaimId, String>,
    /// Claims waiting for a connection, with their deadlines.
    claims_queued: VecDeque<(ClaimId, String, Instant)>,
    next_claim: ClaimId,
    /// When holdings next change by time alone, as of the latest input.
    holdings_timer: Option<Instant>,
    transmits: VecDeque<ClientMessage>,
    events: VecDeque<Event>,
    /// The key rotation under way, if any (see [`crate::key_rotation`]).
    keys: KeyRotation,
}

impl<M: SessionMap> AgentSession<M> {
    /// Node `me`, starting from `map` (the cached one, or an empty map), not connected.
    pub fn new(me: NodeId, map: M, now: Instant) -> Self {
        let mut holdings = Holdings::new(me);
        holdings.on_workloads(map.version(), map.workloads(), now);
        AgentSession {
            holdings,
            map,
            connected: false,
            awaiting_full_map: false,
            endpoints: Vec::new(),
            claims_sent: BTreeMap::new(),
            claims_queued: VecDeque::new(),
            next_claim: 1,
            holdings_timer: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            keys: KeyRotation::new(me),
        }
    }

    /// The newest map.
    pub fn map(&self) -> &M {
        &self.map
    }

    /// The fencing state: what this node answers for and forwards.
    pub fn holdings(&self) -> &Holdings {
        &self.holdings
    }

    /// The fencing state, for the reconciler's timers ([`Holdings::forwards`] prunes).
    pub fn holdings_mut(&mut self) -> &mut Holdings {
        &mut self.holdings
    }

    /// Whether a connection is open.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// The coordinator's welcome on a new connection, before [`AgentSession::connected`]: what
    /// the session takes from it (whether the coordinator confirms handovers).
    pub fn welcomed(&mut self, welcome: &crate::control::Welcome) {
        self.holdings.on_welcome(welcome.confirms_handovers);
    }

    /// A connection was opened and the coordinator accepted the hello with `map`; the node's
    /// underlay endpoints are `endpoints`. A holder renews its lease at once (the previous
    /// connection may have died with a coordinator, and the lease has been running down
    /// since); the endpoints are reported; claims still within their deadline are sent.
    pub fn connected(&mut self, now: Instant, map: Netmap, endpoints: Vec<SocketAddr>) {
        self.awaiting_full_map = false;
        self.transmits.clear();
        self.take_map(map, now);
        self.connected = true;
        if self.holdings.is_holder() || self.holdings.take_release_ack() {
            let seq = self.holdings.heartbeat_now(now);
            self.send_heartbeat(seq);
        }
        self.endpoints = endpoints;
        self.transmits.push_back(ClientMessage::Endpoints {
            endpoints: self.endpoints.clone(),
        });
        self.expire_claims(now);
        while let Some((id, workload, _)) = self.claims_queued.pop_front() {
            self.send_claim(id, workload);
        }
        self.after_input(now);
    }

    /// The connection ended (lost, or closed after a [`SessionError`]). Claims sent on it are
    /// answered with [`ClaimError::SessionLost`]; messages not yet sent are dropped.
    pub fn disconnected(&mut self) {
        self.connected = false;
        self.awaiting_full_map = false;
        self.transmits.clear();
        for (id, _) in std::mem::take(&mut self.claims_sent) {
            self.events.push_back(Event::ClaimAnswered {
                id,
                result: Err(ClaimError::SessionLost),
            });
        }
    }

    /// A message from the coordinator.
    ///
    /// # Errors
    /// [`SessionError`] when the coordinator ends the session (revocation, refusal) or breaks
    /// the protocol; the shell closes the connection and calls
    /// [`AgentSession::disconnected`]. On a revocation or refusal the lease is dropped at
    /// once: this node answers for nothing from then on.
    pub fn handle_message(&mut self, now: Instant, msg: ServerMessage) -> Result<(), SessionError> {
        let result = self.message(now, msg);
        self.after_input(now);
        result
    }

    fn message(&mut self, now: Instant, msg: ServerMessage) -> Result<(), SessionError> {
        match msg {
            ServerMessage::FullMap(m) => {
                self.awaiting_full_map = false;
                self.take_map(m, now);
            }
            ServerMessage::Delta(_) if self.awaiting_full_map => {}
            ServerMessage::Delta(d) => {
                // In place: `apply` changes nothing when it refuses a delta.
                let before = self.map.version();
                match self.map.apply(d) {
                    Ok(()) if self.map.version() != before => self.map_changed(now),
                    Ok(()) => {} // already applied
                    Err(refused) => {
                        self.awaiting_full_map = true;
                        self.transmits.push_back(ClientMessage::FullMapRequest);
                        self.events.push_back(Event::DeltaRefused(refused));
                    }
                }
            }
            ServerMessage::Lease {
                seq,
                lease_ms,
                version,
                confirmed,
            } => {
                self.holdings
                    .on_lease(seq, std::time::Duration::from_millis(lease_ms), version);
                // Confirmations count whatever heartbeat the message answers (seq 0: none).
                self.holdings.on_confirmed(confirmed.as_deref());
                self.events.push_back(Event::HoldingsChanged);
            }
            ServerMessage::Prepare {
                workload,
                generation,
                warm,
            } => {
                // The address ready and a lease before the move lands; the shell brings the
                // tunnels up and answers.
                self.holdings.on_prepare(&workload, generation, now);
                let seq = self.holdings.heartbeat_now(now);
                self.send_heartbeat(seq);
                self.events.push_back(Event::HoldingsChanged);
                self.events.push_back(Event::Prepare {
                    workload,
                    generation,
                    warm,
                });
            }
            ServerMessage::Handover {
                workload,
                generation,
                to,
                attempt,
            } => {
                self.events.push_back(Event::Handover {
                    workload,
                    generation,
                    to,
                    attempt,
                });
            }
            ServerMessage::HandoverAborted {
                workload,
                generation,
                attempt,
            } => {
                self.events.push_back(Event::HandoverAborted {
                    workload,
                    generation,
                    attempt,
                });
            }
            ServerMessage::ClaimResult {
                request,
                generation,
                error,
            } => {
                if self.claims_sent.remove(&request).is_some() {
                    let result = match (generation, error) {
                        (_, Some(e)) => Err(ClaimError::Refused(e)),
                        (Some(g), None) => Ok(g),
                        (None, None) => Err(ClaimError::NoResult),
                    };
                    self.events.push_back(Event::ClaimAnswered {
                        id: request,
                        result,
                    });
                }
            }
            ServerMessage::Revoked { reason } => {
                self.end_lease();
                return Err(SessionError::Revoked(reason));
            }
            ServerMessage::Refused { reason } => {
                self.end_lease();
                return Err(SessionError::Refused(reason));
            }
            ServerMessage::Unavailable { reason } => {
                return Err(SessionError::Unavailable(reason));
            }
            ServerMessage::Welcome(_) => {
                return Err(SessionError::Protocol("a second welcome".into()));
            }
            ServerMessage::RotateKey { grace_ms } => {
                if let Some(m) = self.keys.on_rotate(grace_ms) {
                    self.transmits.push_back(m);
                }
            }
        }
        Ok(())
    }

    /// Asks to become the holder of `workload`; the answer comes as
    /// [`Event::ClaimAnswered`] with the returned id. Without a connection the claim waits for
    /// the next one until `deadline`.
    pub fn claim(&mut self, now: Instant, workload: String, deadline: Instant) -> ClaimId {
        let id = self.next_claim;
        self.next_claim += 1;
        if now >= deadline {
            self.events.push_back(Event::ClaimAnswered {
                id,
                result: Err(ClaimError::Expired),
            });
        } else if self.connected {
            self.send_claim(id, workload);
        } else {
            self.claims_queued.push_back((id, workload, deadline));
        }
        self.after_input(now);
        id
    }

    /// The tunnels for a coming move are up (the answer to [`Event::Prepare`]).
    pub fn prepared(&mut self, workload: String, generation: u64) {
        if self.connected {
            self.transmits.push_back(ClientMessage::Prepared {
                workload,
                generation,
            });
        }
    }

    /// The answer to [`Event::Handover`]: the state was handed over, or why not. Lost with
    /// the connection (the coordinator gives up on the move).
    pub fn handed_over(
        &mut self,
        workload: String,
        generation: u64,
        attempt: u64,
        result: Result<(), String>,
    ) {
        if self.connected {
            self.transmits.push_back(ClientMessage::HandedOver {
                workload,
                generation,
                attempt,
                error: result.err(),
            });
        }
    }

    /// The node's underlay endpoints now; reported when they changed. Returns whether they
    /// changed.
    pub fn set_endpoints(&mut self, endpoints: Vec<SocketAddr>) -> bool {
        if endpoints == self.endpoints {
            return false;
        }
        self.endpoints = endpoints;
        if self.connected {
            self.transmits.push_back(ClientMessage::Endpoints {
                endpoints: self.endpoints.clone(),
            });
        }
        true
    }

    /// Time passed: sends a heartbeat when one is due, gives up on claims past their
    /// deadline, and reports that holdings may have changed when a lease or a forward ran
    /// out.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.expire_claims(now);
        self.keys.handle_timeout(now);
        if self.holdings_timer.is_some_and(|t| t <= now) {
            self.events.push_back(Event::HoldingsChanged);
        }
        self.after_input(now);
    }

    /// When [`AgentSession::handle_timeout`] should be called next: a heartbeat due (only
    /// while connected), a claim's deadline, a lease, forward or prepared move ending (as of
    /// the latest input).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let heartbeat = self
            .connected
            .then(|| self.holdings.next_heartbeat())
            .flatten();
        let claim = self.claims_queued.iter().map(|(_, _, d)| *d).min();
        [
            heartbeat,
            claim,
            self.holdings_timer,
            self.keys.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The next message to send, in order.
    pub fn poll_transmit(&mut self) -> Option<ClientMessage> {
        self.transmits.pop_front()
    }

    /// The next event to act on.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next step of a key rotation for the shell to take (see [`crate::key_rotation`]).
    pub fn poll_key_action(&mut self) -> Option<KeyAction> {
        self.keys.poll_action()
    }

    /// The key rotation's state.
    pub fn keys(&self) -> &KeyRotation {
        &self.keys
    }

    /// A key pair made for a rotation earlier and not used yet (found in the state directory
    /// at start), if any.
    pub fn set_next_key(&mut self, now: Instant, key: Option<PublicKey>) {
        self.keys.set_pending(key);
        self.keys_on_map(now);
    }

    /// The shell made the key pair asked for by [`KeyAction::MakeKey`] (`None`: it could not;
    /// the next request tries again); its public key is announced while connected.
    pub fn next_key_made(&mut self, now: Instant, key: Option<PublicKey>) {
        let Some(key) = key else {
            self.keys.make_failed();
            return;
        };
        let announce = self.keys.made(key);
        if self.connected {
            self.transmits.push_back(announce);
        }
        self.keys_on_map(now);
    }

    /// The shell carried out [`KeyAction::Switch`] (`None`: it could not; the next map that
    /// shows the key schedules it again).
    pub fn key_switched(&mut self, key: Option<PublicKey>) {
        match key {
            Some(k) => self.keys.switched(k),
            None => self.keys.switch_failed(),
        }
    }

    fn take_map(&mut self, map: Netmap, now: Instant) {
        self.map.replace(map);
        self.map_changed(now);
    }

    fn keys_on_map(&mut self, now: Instant) {
        let me = self.holdings.me();
        self.keys.on_own_entry(self.map.own_entry(me), now);
    }

    fn map_changed(&mut self, now: Instant) {
        // Fencing before anyone is told, so that nobody sees a map the holdings do not know.
        self.holdings
            .on_workloads(self.map.version(), self.map.workloads(), now);
        self.keys_on_map(now);
        self.events.push_back(Event::MapChanged);
        self.events.push_back(Event::HoldingsChanged);
        self.after_input(now);
    }

    /// Bookkeeping after any input at `now`: a node that has just become a holder sends its
    /// first heartbeat at once, so does one that a change took a workload from (the
    /// heartbeat's map version acknowledges the change, and the next holder may answer), and
    /// the holdings' next timer is taken.
    fn after_input(&mut self, now: Instant) {
        if self.connected {
            if let Some(seq) = self.holdings.poll_heartbeat(now) {
                self.send_heartbeat(seq);
            } else if self.holdings.take_release_ack() {
                let seq = self.holdings.heartbeat_now(now);
                self.send_heartbeat(seq);
            }
        }
        self.holdings_timer = self.holdings.poll_timeout(now);
    }

    /// Sends heartbeat `seq` with the map's version, which acknowledges every change up to it.
    fn send_heartbeat(&mut self, seq: u64) {
        self.holdings.take_release_ack();
        self.transmits.push_back(ClientMessage::Heartbeat {
            seq,
            version: Some(self.map.version()),
        });
    }

    /// The coordinator refused or revoked this node when it said hello: it answers for
    /// nothing from now on (as after [`SessionError::Refused`] or [`SessionError::Revoked`]
    /// in a session).
    pub fn stop(&mut self) {
        self.end_lease();
    }

    fn end_lease(&mut self) {
        self.holdings.drop_lease();
        self.events.push_back(Event::HoldingsChanged);
    }

    fn send_claim(&mut self, id: ClaimId, workload: String) {
        self.claims_sent.insert(id, workload.clone());
        self.transmits.push_back(ClientMessage::Claim {
            request: id,
            workload,
        });
    }

    fn expire_claims(&mut self, now: Instant) {
        let (late, keep): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.claims_queued)
            .into_iter()
            .partition(|(_, _, deadline)| now >= *deadline);
        self.claims_queued = keep;
        for (id, _, _) in late {
            self.events.push_back(Event::ClaimAnswered {
                id,
                result: Err(ClaimError::Expired),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::netmap::NetmapDelta;
    use crate::workload::{WorkloadInfo, DEFAULT_LEASE, OVERDUE_HEARTBEAT};

    fn wl(holder: Option<NodeId>, generation: u64) -> WorkloadInfo {
        crate::workload::tests::wl("chat", holder, generation)
    }

    use crate::workload::tests::map;

    /// Node 1, holder of `chat` in a session, with a lease granted at `t0`.
    fn leased_holder(t0: Instant) -> AgentSession {
        let m = map(1, &[wl(Some(1), 1)]);
        let mut s = AgentSession::new(1, m.clone(), t0);
        s.connected(t0, m, vec![]);
        let seq = heartbeat_seq(&transmits(&mut s)).expect("a heartbeat on connecting");
        s.handle_message(
            t0,
            ServerMessage::Lease {
                seq,
                lease_ms: 1500,
                version: 1,
                confirmed: None,
            },
        )
        .unwrap();
        assert_eq!(s.holdings().held(t0).len(), 1);
        s
    }

    fn delta(from: u64, to: u64) -> NetmapDelta {
        NetmapDelta {
            from_version: from,
            to_version: to,
            ..NetmapDelta::default()
        }
    }

    fn transmits(s: &mut AgentSession) -> Vec<ClientMessage> {
        std::iter::from_fn(|| s.poll_transmit()).collect()
    }

    fn events(s: &mut AgentSession) -> Vec<Event> {
        std::iter::from_fn(|| s.poll_event()).collect()
    }

    fn heartbeat_seq(m: &[ClientMessage]) -> Option<u64> {
        m.iter().find_map(|m| match m {
            ClientMessage::Heartbeat { seq, .. } => Some(*seq),
            _ => None,
        })
    }

    #[test]
    fn a_new_session_renews_a_holders_lease_and_reports_endpoints() {
        let t0 = Instant::now();
        let cached = map(3, &[wl(Some(1), 1)]);
        let mut s = AgentSession::new(1, cached.clone(), t0);
        assert!(
            transmits(&mut s).is_empty(),
            "nothing is sent without a session"
        );
        s.handle_timeout(t0 + Duration::from_secs(1));
        assert!(transmits(&mut s).is_empty());
        let ep: SocketAddr = "198.18.1.11:51820".parse().unwrap();
        s.connected(t0, cached, vec![ep]);
        let sent = transmits(&mut s);
        let seq = heartbeat_seq(&sent).expect("a renewing heartbeat");
        assert!(sent.contains(&ClientMessage::Endpoints {
            endpoints: vec![ep]
        }));
        assert!(s.holdings().held(t0).is_empty(), "no lease yet");
        s.handle_message(
            t0,
            ServerMessage::Lease {
                seq,
                lease_ms: 1500,
                version: 3,
                confirmed: None,
            },
        )
        .unwrap();
        assert_eq!(s.holdings().held(t0).len(), 1);
        assert!(events(&mut s).contains(&Event::HoldingsChanged));
        // The same endpoints again are not reported; new ones are.
        assert!(!s.set_endpoints(vec![ep]));
        assert!(transmits(&mut s).is_empty());
        assert!(s.set_endpoints(vec![]));
        assert_eq!(
            transmits(&mut s),
            vec![ClientMessage::Endpoints { endpoints: vec![] }]
        );
    }

    #[test]
    fn heartbeats_follow_poll_timeout_and_quicken_when_unanswered() {
        let t0 = Instant::now();
        let mut s = leased_holder(t0);
        let interval = DEFAULT_LEASE / crate::workload::HEARTBEATS_PER_LEASE;
        assert_eq!(s.poll_timeout(), Some(t0 + interval));
        // The coordinator goes quiet: one interval, a second, then the overdue pace.
        let mut now = t0;
        let mut sent_at = Vec::new();
        for _ in 0..6 {
            now = s.poll_timeout().unwrap();
            s.handle_timeout(now);
            if heartbeat_seq(&transmits(&mut s)).is_some() {
                sent_at.push(now - t0);
            }
        }
        assert_eq!(sent_at[0], interval);
        assert_eq!(sent_at[1], 2 * interval);
        assert_eq!(sent_at[2], 2 * interval + OVERDUE_HEARTBEAT);
        // The lease runs out at t0 + 1.5 s whatever is sent meanwhile.
        assert!(s.holdings().held(t0 + DEFAULT_LEASE).is_empty());
        let _ = now;
    }

    #[test]
    fn a_gap_asks_once_for_a_full_map_and_skips_deltas_until_it_comes() {
        let t0 = Instant::now();
        let mut s = AgentSession::new(2, map(1, &[]), t0);
        s.connected(t0, map(1, &[]), vec![]);
        transmits(&mut s);
        events(&mut s);
        s.handle_message(t0, ServerMessage::Delta(delta(1, 2)))
            .unwrap();
        assert_eq!(s.map().version, 2);
        assert!(events(&mut s).contains(&Event::MapChanged));
        // 3 is missing.
        s.handle_message(t0, ServerMessage::Delta(delta(3, 4)))
            .unwrap();
        s.handle_message(t0, ServerMessage::Delta(delta(4, 5)))
            .unwrap();
        assert_eq!(transmits(&mut s), vec![ClientMessage::FullMapRequest]);
        assert_eq!(s.map().version, 2);
        // The refusal is told once, with its reason; the skipped delta is not.
        assert_eq!(
            events(&mut s),
            vec![Event::DeltaRefused(DeltaError::Gap(crate::netmap::Gap {
                have: 2,
                delta_from: 3
            }))]
        );
        s.handle_message(t0, ServerMessage::FullMap(map(5, &[])))
            .unwrap();
        s.handle_message(t0, ServerMessage::Delta(delta(5, 6)))
            .unwrap();
        assert_eq!(s.map().version, 6);
        // A lost connection forgets the request: the next session starts from its full map.
        s.handle_message(t0, ServerMessage::Delta(delta(7, 8)))
            .unwrap();
        s.disconnected();
        s.connected(t0, map(8, &[]), vec![]);
        s.handle_message(t0, ServerMessage::Delta(delta(8, 9)))
            .unwrap();
        assert_eq!(s.map().version, 9);
    }

    #[test]
    fn a_policy_edit_that_does_not_fit_asks_for_a_full_map() {
        let t0 = Instant::now();
        let policy = |ports: &[u16], version| {
            let text: String = ports
                .iter()
                .map(|p| format!("[[rule]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"tcp:{p}\"]\n"))
                .collect();
            crate::policy::parse(&text).unwrap().into_policy(version)
        };
        let (v1, v2) = (policy(&[1, 2, 3, 4], 1), policy(&[1, 2, 9, 4], 2));
        let with = |m: Netmap, p: &crate::Policy| Netmap {
            policy: Some(p.clone()),
            ..m
        };
        let mut s = AgentSession::new(2, with(map(1, &[]), &v1), t0);
        s.connected(t0, with(map(1, &[]), &v1), vec![]);
        transmits(&mut s);
        events(&mut s);
        let edit = |from, to| {
            ServerMessage::Delta(NetmapDelta {
                policy: Some(crate::PolicyChange::Edit(v1.edit_to(&v2).unwrap())),
                ..delta(from, to)
            })
        };
        // An edit of the policy it has: applied.
        s.handle_message(t0, edit(1, 2)).unwrap();
        assert_eq!(s.map().policy.as_ref(), Some(&v2));
        assert!(events(&mut s).contains(&Event::MapChanged));
        // The same edit again (its base is gone): refused, the map kept, a full map asked.
        s.handle_message(t0, edit(2, 3)).unwrap();
        assert_eq!((s.map().version, s.map().policy.as_ref()), (2, Some(&v2)));
        assert_eq!(transmits(&mut s), vec![ClientMessage::FullMapRequest]);
        assert!(matches!(
            events(&mut s)[..],
            [Event::DeltaRefused(DeltaError::Policy(_))]
        ));
        s.handle_message(t0, ServerMessage::FullMap(with(map(3, &[]), &v1)))
            .unwrap();
        assert_eq!(s.map().policy.as_ref(), Some(&v1));
    }

    #[test]
    fn claims_wait_for_a_session_until_their_deadline_and_fail_with_it() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut s = AgentSession::new(2, map(1, &[wl(Some(1), 1)]), t0);
        let late = s.claim(t0, "chat".into(), t0 + ms(100));
        let kept = s.claim(t0, "chat".into(), t0 + ms(500));
        assert_eq!(s.poll_timeout(), Some(t0 + ms(100)));
        s.handle_timeout(t0 + ms(100));
        assert_eq!(
            events(&mut s),
            vec![Event::ClaimAnswered {
                id: late,
                result: Err(ClaimError::Expired)
            }]
        );
        s.connected(t0 + ms(200), map(1, &[wl(Some(1), 1)]), vec![]);
        assert!(transmits(&mut s).contains(&ClientMessage::Claim {
            request: kept,
            workload: "chat".into()
        }));
        // An answer to an unknown request changes nothing; the right one is passed on.
        s.handle_message(
            t0,
            ServerMessage::ClaimResult {
                request: 99,
                generation: Some(2),
                error: None,
            },
        )
        .unwrap();
        assert!(!events(&mut s)
            .iter()
            .any(|e| matches!(e, Event::ClaimAnswered { .. })));
        let again = s.claim(t0 + ms(300), "chat".into(), t0 + ms(900));
        s.handle_message(
            t0,
            ServerMessage::ClaimResult {
                request: kept,
                generation: None,
                error: Some("not an allowed holder".into()),
            },
        )
        .unwrap();
        assert!(events(&mut s).contains(&Event::ClaimAnswered {
            id: kept,
            result: Err(ClaimError::Refused("not an allowed holder".into()))
        }));
        s.disconnected();
        assert!(events(&mut s).contains(&Event::ClaimAnswered {
            id: again,
            result: Err(ClaimError::SessionLost)
        }));
    }

    #[test]
    fn prepare_heartbeats_at_once_and_prepared_is_sent_only_in_a_session() {
        let t0 = Instant::now();
        let m = map(1, &[wl(Some(1), 1)]);
        let mut s = AgentSession::new(2, m.clone(), t0);
        s.connected(t0, m, vec![]);
        transmits(&mut s);
        s.handle_message(
            t0,
            ServerMessage::Prepare {
                warm: None,
                workload: "chat".into(),
                generation: 2,
            },
        )
        .unwrap();
        assert!(heartbeat_seq(&transmits(&mut s)).is_some());
        assert!(events(&mut s).contains(&Event::Prepare {
            warm: None,
            workload: "chat".into(),
            generation: 2
        }));
        assert_eq!(s.holdings_mut().tentative(t0).len(), 1);
        s.prepared("chat".into(), 2);
        assert_eq!(
            transmits(&mut s),
            vec![ClientMessage::Prepared {
                workload: "chat".into(),
                generation: 2
            }]
        );
        s.disconnected();
        s.prepared("chat".into(), 2);
        assert!(transmits(&mut s).is_empty());
    }

    #[test]
    fn a_handover_is_an_event_and_its_answer_is_sent_only_in_a_session() {
        let t0 = Instant::now();
        let m = map(1, &[wl(Some(2), 1)]);
        let mut s = AgentSession::new(2, m.clone(), t0);
        s.connected(t0, m, vec![]);
        transmits(&mut s);
        let handover = ServerMessage::Handover {
            workload: "chat".into(),
            generation: 2,
            to: 3,
            attempt: 77,
        };
        s.handle_message(t0, handover).unwrap();
        assert!(
            transmits(&mut s).is_empty(),
            "nothing sent before the answer"
        );
        assert!(events(&mut s).contains(&Event::Handover {
            workload: "chat".into(),
            generation: 2,
            to: 3,
            attempt: 77
        }));
        let abort = ServerMessage::HandoverAborted {
            workload: "chat".into(),
            generation: 2,
            attempt: 77,
        };
        s.handle_message(t0, abort).unwrap();
        assert!(events(&mut s).contains(&Event::HandoverAborted {
            workload: "chat".into(),
            generation: 2,
            attempt: 77
        }));
        s.handed_over("chat".into(), 2, 77, Err("the destination refused".into()));
        s.handed_over("chat".into(), 2, 78, Ok(()));
        assert_eq!(
            transmits(&mut s),
            vec![
                ClientMessage::HandedOver {
                    workload: "chat".into(),
                    generation: 2,
                    attempt: 77,
                    error: Some("the destination refused".into()),
                },
                ClientMessage::HandedOver {
                    workload: "chat".into(),
                    generation: 2,
                    attempt: 78,
                    error: None,
                }
            ]
        );
        s.disconnected();
        s.handed_over("chat".into(), 2, 78, Ok(()));
        assert!(transmits(&mut s).is_empty());
    }

    /// A planned move from node 1 to node 2 as the coordinator drives it: node 2 answers only
    /// once the coordinator confirms, which it does on node 1's acknowledgement, sent as soon
    /// as node 1 applies the move's map. Node 1 cut off before the map reaches it sends none:
    /// node 2 stays held back however long.
    #[test]
    fn a_moved_workload_is_answered_at_its_new_holder_only_after_the_old_one_acknowledges() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let lease = |seq, version, confirmed: &[(u64, u64)]| ServerMessage::Lease {
            seq,
            lease_ms: 5000,
            version,
            confirmed: Some(
                confirmed
                    .iter()
                    .map(|(workload, generation)| crate::workload::Confirmation {
                        workload: *workload,
                        generation: *generation,
                    })
                    .collect(),
            ),
        };
        let before = map(1, &[wl(Some(1), 1)]);
        let mut moved = wl(Some(2), 2);
        moved.previous = Some(1);
        let after = map(2, &[moved]);
        for old_holder_cut_off in [false, true] {
            let mut old = AgentSession::new(1, before.clone(), t0);
            old.connected(t0, before.clone(), vec![]);
            let seq = heartbeat_seq(&transmits(&mut old)).unwrap();
            old.handle_message(t0, lease(seq, 1, &[(7, 1)])).unwrap();
            assert_eq!(old.holdings().held(t0).len(), 1);
            let mut new = AgentSession::new(2, before.clone(), t0);
            new.connected(t0, before.clone(), vec![]);
            transmits(&mut new);
            new.handle_message(
                t0 + ms(5),
                ServerMessage::Prepare {
                    warm: None,
                    workload: "chat".into(),
                    generation: 2,
                },
            )
            .unwrap();
            let sent = transmits(&mut new);
            assert!(sent.contains(&ClientMessage::Heartbeat {
                seq: heartbeat_seq(&sent).unwrap(),
                version: Some(1)
            }));
            new.handle_message(t0 + ms(6), lease(heartbeat_seq(&sent).unwrap(), 1, &[]))
                .unwrap();
            // The commit: the delta reaches the new holder, which holds it back.
            new.handle_message(t0 + ms(10), ServerMessage::FullMap(after.clone()))
                .unwrap();
            assert!(new.holdings().held(t0 + ms(10)).is_empty());
            assert!(new.holdings_mut().tentative(t0 + ms(10)).is_empty());
            if old_holder_cut_off {
                // Its lease runs on; the new holder answers for nothing meanwhile.
                for t in (10..5000).step_by(50) {
                    let now = t0 + ms(t);
                    new.handle_timeout(now);
                    assert!(
                        old.holdings().held(now).is_empty() || new.holdings().held(now).is_empty(),
                        "two holders at {t} ms"
                    );
                }
                assert!(old.holdings().held(t0 + ms(4999)).len() == 1);
                continue;
            }
            // The old holder applies the map and acknowledges it at once.
            old.handle_message(t0 + ms(11), ServerMessage::FullMap(after.clone()))
                .unwrap();
            assert!(old.holdings().held(t0 + ms(11)).is_empty());
            let ack = transmits(&mut old);
            assert!(
                matches!(
                    ack[..],
                    [ClientMessage::Heartbeat {
                        version: Some(2),
                        ..
                    }]
                ),
                "{ack:?}"
            );
            // The coordinator confirms generation 2 to the new holder (unsolicited, seq 0).
            new.handle_message(t0 + ms(12), lease(0, 2, &[(7, 2)]))
                .unwrap();
            assert_eq!(new.holdings().held(t0 + ms(12)).len(), 1);
            assert!(events(&mut new).contains(&Event::HoldingsChanged));
        }
    }

    #[test]
    fn revocation_ends_the_lease_at_once() {
        let t0 = Instant::now();
        let mut s = leased_holder(t0);
        let end = s.handle_message(
            t0,
            ServerMessage::Revoked {
                reason: "by an operator".into(),
            },
        );
        assert_eq!(end, Err(SessionError::Revoked("by an operator".into())));
        assert!(s.holdings().held(t0).is_empty());
        assert!(matches!(
            s.handle_message(
                t0,
                ServerMessage::Welcome(crate::control::Welcome {
                    talker_reports: false,
                    node_id: 1,
                    name: "a".into(),
                    network: "n".into(),
                    network_cidr: "100.64.0.0/16".parse().unwrap(),
                    addresses: vec![],
                    node_secret: None,
                    coordinators: vec![],
                    reflect_port: None,
                    relay: false,
                    path_reports: false,
                    handover: false,
                    confirms_handovers: false,
                    network_cidr6: None,
                })
            ),
            Err(SessionError::Protocol(_))
        ));
    }

    #[test]
    fn a_key_rotation_runs_through_the_session_in_driven_time() {
        use crate::netmap::PeerInfo;
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let me = |next: Option<PublicKey>| PeerInfo {
            node_id: 2,
            name: "b".into(),
            public_key: PublicKey([2; 32]),
            next_key: next,
            addresses: vec!["100.64.0.2/32".parse().unwrap()],
            allowed_ips: vec![],
            endpoints: vec![],
            labels: Default::default(),
            tags: vec![],
            via: None,
        };
        let mut m = map(1, &[]);
        m.peers.insert(2, me(None));
        let mut s = AgentSession::new(2, m.clone(), t0);
        s.connected(t0, m, vec![]);
        transmits(&mut s);
        s.handle_message(t0, ServerMessage::RotateKey { grace_ms: 300 })
            .unwrap();
        assert_eq!(s.poll_key_action(), Some(KeyAction::MakeKey));
        assert!(
            transmits(&mut s).is_empty(),
            "nothing before the key exists"
        );
        let new = PublicKey([9; 32]);
        s.next_key_made(t0 + ms(5), Some(new));
        assert_eq!(
            transmits(&mut s),
            vec![ClientMessage::NextKey { public_key: new }]
        );
        assert_eq!(
            s.poll_timeout(),
            None,
            "no switch before the map shows the key"
        );
        // The coordinator's delta with the next key: the switch is due 300 ms later.
        let mut d = delta(1, 2);
        d.upsert = vec![me(Some(new))];
        s.handle_message(t0 + ms(20), ServerMessage::Delta(d))
            .unwrap();
        assert_eq!(s.poll_timeout(), Some(t0 + ms(320)));
        s.handle_timeout(t0 + ms(319));
        assert_eq!(s.poll_key_action(), None);
        s.handle_timeout(t0 + ms(320));
        assert_eq!(s.poll_key_action(), Some(KeyAction::Switch(new)));
        s.key_switched(Some(new));
        assert_eq!(s.keys().pending(), None);
        // Without a session, a key made is not announced (the next RotateKey does it).
        s.disconnected();
        s.handle_message(t0, ServerMessage::RotateKey { grace_ms: 300 })
            .unwrap();
        s.next_key_made(t0, Some(PublicKey([10; 32])));
        assert!(transmits(&mut s).is_empty());
    }

    #[test]
    fn a_lease_running_out_wakes_the_shell_once() {
        let t0 = Instant::now();
        let mut s = leased_holder(t0);
        s.disconnected();
        events(&mut s);
        // Without a session only the lease's end is a timer, and only once.
        assert_eq!(s.poll_timeout(), Some(t0 + DEFAULT_LEASE));
        s.handle_timeout(t0 + DEFAULT_LEASE);
        assert_eq!(events(&mut s), vec![Event::HoldingsChanged]);
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn an_unavailable_coordinator_keeps_the_lease_and_is_not_a_refusal() {
        let t0 = Instant::now();
        let mut s = leased_holder(t0);
        let e = s
            .handle_message(
                t0,
                ServerMessage::Unavailable {
                    reason: "the database is unavailable".into(),
                },
            )
            .unwrap_err();
        assert!(matches!(e, SessionError::Unavailable(_)), "{e}");
        // The node was not turned away: what it holds it keeps until its lease ends.
        assert_eq!(s.holdings().held(t0).len(), 1);
    }
}
