//! The relay embedded in the coordinator: WireGuard datagrams between two nodes of one network
//! that cannot reach each other directly, carried on each agent's control connection (QUIC
//! datagrams beside the stream of a QUIC session, relay records of the stream itself on a
//! TLS/TCP session). The forwarding core ([`Relay`], [`Link`], [`Route`], [`Source`],
//! [`Dropped`], the counters) is `meshlink_relay::forward`, shared with the standalone
//! `meshlink-relay`; the sessions that feed it are `session.rs`'s.
//!
//! What only a coordinator does is here: [`Grants`], which tells each agent of the standalone
//! relays registered with this coordinator (its configuration's `[[relays]]`) and vouches for
//! the node there with a ticket signed by the coordinator identity's key
//! ([`meshlink_relay::ticket`]), with the secret of the ticket's proof key by which the node
//! proves at each relay that the ticket is its own. A grant travels on the session's own relay
//! channel as a frame from [`RELAY_SELF`] (so the secret only ever crosses the pinned control
//! session), and is sent again well before its ticket expires.
//!
//! In a mesh of several coordinators, agents on different coordinators share no control
//! session, so the embedded relays alone would never carry a frame between them. There every
//! coordinator also serves relay sessions (the standalone relay's protocol, tickets and all:
//! [`meshlink_relay::sessions`]) on its own port, chosen by ALPN, and lists every coordinator
//! of the mesh in its grants after the `[[relays]]` ([`coordinator_relays`]): each agent keeps
//! a relay session with each, so the nearest one a sender picks is one the receiver is at too.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshlink_proto::relay::{self as frames, Grant, RelayInfo, RELAY_ALPN, RELAY_SELF};
use meshlink_proto::{NodeId, PublicKey};
pub use meshlink_relay::forward::*;
use meshlink_relay::sessions::Sessions;

use crate::session::{Admission, Connections};
use meshlink_relay::ticket::{Issuer, KeyError};

/// When a session's first grants go (after the route is registered): again soon after the
/// first, since a QUIC datagram may be lost.
pub const GRANT_FIRST: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_secs(1),
    Duration::from_secs(4),
];

/// The longest name, region or provider of a listed relay, in bytes.
pub const MAX_NAME: usize = 32;
/// The longest address (`host:port`) of a listed relay, in bytes.
pub const MAX_ADDR: usize = 128;

/// What the coordinator's listeners relay with.
#[derive(Debug, Clone, Default)]
pub struct Relaying {
    /// The embedded relay (frames on control sessions); `None` when off.
    pub relay: Option<Arc<Relay>>,
    /// What sessions tell agents of the relays; `None` when the embedded relay is off.
    pub grants: Option<Arc<Grants>>,
    /// The relay sessions served on this coordinator's port (ALPN [`RELAY_ALPN`]); `None`
    /// unless they are ([`serves_relay_sessions`]).
    pub port: Option<RelayPort>,
}

/// The relay sessions a coordinator of a mesh of several serves on its own port.
#[derive(Debug, Clone)]
pub struct RelayPort {
    /// The sessions (their own forwarding core, which delivers through the embedded relay).
    pub sessions: Arc<Sessions>,
    /// Their places, apart from the control sessions': every agent of the mesh keeps a relay
    /// session here, which must never take a control session's place.
    pub connections: Arc<Connections>,
}

impl Relaying {
    /// Where a connection whose handshake chose `alpn` is served: `Some` when it chose the
    /// relay's and this coordinator serves relay sessions.
    pub fn port_for(&self, alpn: Option<&[u8]>) -> Option<&RelayPort> {
        self.port.as_ref().filter(|_| alpn == Some(RELAY_ALPN))
    }
}

impl RelayPort {
    /// The place among the relay sessions' own of a connection from `remote` that chose the
    /// relay ALPN, which leaves the place it was admitted to (`control`, a control session's);
    /// `None` (logged) when theirs are all taken.
    pub fn admit(&self, remote: IpAddr, control: Admission) -> Option<Admission> {
        drop(control);
        match self.connections.admit(remote) {
            Ok(a) => Some(a),
            Err(refusal) => {
                tracing::debug!(%remote, "relay session refused: {refusal}");
                None
            }
        }
    }
}

/// Whether a coordinator serves relay sessions on its own port and lists the mesh's
/// coordinators as relays: with its relay on, in a mesh of several (`all`, the mesh's
/// coordinators, has two or more), and with no `[[relays]]` (`standalone` empty: standalone
/// relays serve every coordinator's agents, and operators who run them keep bulk relaying off
/// their coordinators).
pub fn serves_relay_sessions(relay: bool, all: &[String], standalone: &[RelayInfo]) -> bool {
    relay && all.len() >= 2 && standalone.is_empty()
}

/// The name a coordinator of the mesh has as a relay: [`COORDINATOR_RELAY_PREFIX`] and its
/// place (from 1) in the mesh's list of coordinators, which every coordinator holds in the
/// same order. `[[relays]]` names may not take this form.
pub fn coordinator_relay_name(place: usize) -> String {
    format!("{COORDINATOR_RELAY_PREFIX}{}", place + 1)
}

/// How the names of coordinators as relays begin.
pub const COORDINATOR_RELAY_PREFIX: &str = "coordinator-";

/// The coordinators of a mesh of several, as relays its agents are granted (when
/// [`serves_relay_sessions`]): each at its own address (`all`, the mesh's list, the same from
/// every coordinator), pinned by the identity the coordinators share (`fingerprint`). None
/// for a lone coordinator: its agents meet on its embedded relay. An address longer than
/// [`MAX_ADDR`] is left out, with a warning (agents refuse it).
pub fn coordinator_relays(all: &[String], fingerprint: &str) -> Vec<RelayInfo> {
    if all.len() < 2 {
        return Vec::new();
    }
    all.iter()
        .enumerate()
        .filter(|(_, addr)| {
            let fits = addr.len() <= MAX_ADDR;
            if !fits {
                tracing::warn!(
                    coordinator = %addr,
                    "not listed to agents as a relay: an address longer than {MAX_ADDR} bytes"
                );
            }
            fits
        })
        .map(|(place, addr)| RelayInfo {
            name: coordinator_relay_name(place),
            addr: addr.clone(),
            fingerprint: fingerprint.to_string(),
            region: String::new(),
            provider: String::new(),
        })
        .collect()
}

/// What a coordinator tells agents of the standalone relays, and the key it vouches with.
/// A coordinator with none registered still says so ([`Grants::none`]): an agent that was
/// granted relays by another coordinator, or by this one before its configuration changed,
/// learns that they are withdrawn and closes its sessions with them.
#[derive(Debug)]
pub struct Grants {
    /// `None`: no relays, no tickets.
    issuer: Option<Issuer>,
    relays: Vec<RelayInfo>,
}

impl Grants {
    /// Grants listing `relays` (at most [`frames::MAX_LISTED_RELAYS`] are sent) with tickets
    /// from `issuer`.
    pub fn new(issuer: Issuer, mut relays: Vec<RelayInfo>) -> Self {
        relays.truncate(frames::MAX_LISTED_RELAYS);
        Grants {
            issuer: Some(issuer),
            relays,
        }
    }

    /// Grants that list no relay (and carry no ticket).
    pub fn none() -> Self {
        Grants {
            issuer: None,
            relays: Vec::new(),
        }
    }

    /// How often a session's grant is sent again once the first ones went: a quarter of the
    /// ticket's life, so that a fresh ticket is there well before the old one expires even if
    /// a datagram or two is lost (a quarter of the default life when there are no tickets).
    pub fn every(&self) -> Duration {
        let ttl = self
            .issuer
            .as_ref()
            .map_or(meshlink_relay::ticket::DEFAULT_TTL, Issuer::ttl);
        (ttl / 4).max(Duration::from_secs(5))
    }

    /// The relays listed.
    pub fn relays(&self) -> &[RelayInfo] {
        &self.relays
    }

    /// The grant for `key`, node `node` of `network`, at `now`, as relay frames of at most
    /// `max` bytes each from [`RELAY_SELF`] (`id` numbers the grant, as a sender numbers its
    /// datagrams).
    ///
    /// # Errors
    /// [`KeyError`] when the ticket cannot be signed.
    pub fn frames(
        &self,
        key: PublicKey,
        network: &str,
        node: NodeId,
        now: SystemTime,
        id: u16,
        max: usize,
    ) -> Result<Vec<Vec<u8>>, KeyError> {
        let unix = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let grant = match &self.issuer {
            Some(issuer) => {
                let issued = issuer.issue(key, network, node, unix)?;
                Grant {
                    relays: self.relays.clone(),
                    ticket: issued.ticket,
                    expires: issued.expires,
                    proof_secret: issued.proof_secret,
                }
            }
            // The fields agents of every version read, empty: no relays.
            None => Grant {
                relays: Vec::new(),
                ticket: String::new(),
                expires: 0,
                proof_secret: Default::default(),
            },
        };
        let json = serde_json::to_vec(&grant)
            .map_err(|e| KeyError::UnsupportedKey(format!("cannot encode a grant: {e}")))?;
        frames::frames(&RELAY_SELF, id, &json, max)
            .map_err(|e| KeyError::UnsupportedKey(format!("a grant does not fit: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use meshlink_proto::relay::{parse, Reassembler, Ticket};
    use meshlink_relay::ticket::Verifier;
    use rustls::pki_types::PrivateKeyDer;

    use super::*;

    fn relay(n: usize) -> RelayInfo {
        RelayInfo {
            name: format!("r{n}"),
            addr: format!("198.18.0.{n}:7443"),
            fingerprint: "ab".repeat(32),
            region: "eu-west".into(),
            provider: "example".into(),
        }
    }

    /// The largest grant the configuration allows (the most relays, every field as long as
    /// allowed) fits the frames of the smallest QUIC datagram (1,200-byte UDP payloads leave
    /// more than 1,100 bytes).
    #[test]
    fn the_largest_grant_fits_the_smallest_datagram() {
        let c = rcgen::generate_simple_self_signed(vec!["meshlink-coordinator".into()]).unwrap();
        let key = PrivateKeyDer::Pkcs8(c.signing_key.serialize_der().into());
        let issuer = Issuer::new(&key, Duration::from_secs(86_400)).unwrap();
        let long = |n: usize, len: usize| format!("{n}{}", "x".repeat(len - 1));
        let relays = (0..frames::MAX_LISTED_RELAYS)
            .map(|n| RelayInfo {
                name: long(n, MAX_NAME),
                addr: format!("{}:65535", long(n, MAX_ADDR - 6)),
                fingerprint: "ab".repeat(32),
                region: long(n, MAX_NAME),
                provider: long(n, MAX_NAME),
            })
            .collect();
        let grants = Grants::new(issuer, relays);
        let pieces = grants
            .frames(
                PublicKey([5; 32]),
                &"n".repeat(64),
                u64::MAX,
                SystemTime::now(),
                1,
                1100,
            )
            .unwrap();
        assert!(pieces.len() <= frames::MAX_FRAGMENTS);
    }

    /// A grant with every relay listed fits the frames of a QUIC datagram, and carries a ticket
    /// the relays accept for that node only.
    #[test]
    fn a_grant_fits_a_datagram_and_vouches_for_the_node() {
        let c = rcgen::generate_simple_self_signed(vec!["meshlink-coordinator".into()]).unwrap();
        let key = PrivateKeyDer::Pkcs8(c.signing_key.serialize_der().into());
        let issuer = Issuer::new(&key, Duration::from_secs(600)).unwrap();
        let grants = Grants::new(issuer, (1..=20).map(relay).collect());
        assert_eq!(grants.relays().len(), frames::MAX_LISTED_RELAYS);
        assert_eq!(grants.every(), Duration::from_secs(150));
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let pieces = grants
            .frames(PublicKey([5; 32]), "prod", 3, now, 1, 1150)
            .unwrap();
        assert!(pieces.iter().all(|f| f.len() <= 1150));
        let mut r = Reassembler::new();
        let mut whole = None;
        for f in &pieces {
            let (h, b) = parse(f).unwrap();
            assert_eq!(h.peer, RELAY_SELF);
            whole = whole.or(r.push(h, b, std::time::Instant::now()));
        }
        let (_, json) = whole.unwrap();
        let grant: Grant = serde_json::from_slice(&json).unwrap();
        assert_eq!(grant.relays.len(), frames::MAX_LISTED_RELAYS);
        assert_eq!(grant.expires, 1_800_000_600);
        let body = Verifier::new(c.cert.der().clone())
            .unwrap()
            .verify(&grant.ticket, 1_800_000_001)
            .unwrap();
        assert_eq!(
            (body.key, body.network, body.node),
            (PublicKey([5; 32]), "prod".into(), 3)
        );
        assert!(Ticket::parse(&grant.ticket).is_ok());
    }

    /// A mesh of several coordinators lists each at its address, in the mesh's order, pinned
    /// by the shared identity; a lone coordinator lists none.
    #[test]
    fn coordinators_of_a_mesh_of_several_are_relays() {
        let fp = "cd".repeat(32);
        assert!(coordinator_relays(&["a:7443".into()], &fp).is_empty());
        let all = ["a:7443".to_string(), "b:7443".into(), "c:7443".into()];
        let listed = coordinator_relays(&all, &fp);
        let names: Vec<&str> = listed.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["coordinator-1", "coordinator-2", "coordinator-3"]);
        assert!(listed.iter().all(|r| r.fingerprint == fp));
        assert_eq!(listed[1].addr, "b:7443");
        let r = Relaying::default();
        assert!(r.port_for(Some(RELAY_ALPN)).is_none());
        let two = ["a:7443".to_string(), "b:7443".into()];
        assert!(serves_relay_sessions(true, &two, &[]));
        assert!(!serves_relay_sessions(false, &two, &[]), "relay off");
        assert!(
            !serves_relay_sessions(true, &two[..1], &[]),
            "a lone coordinator"
        );
        assert!(
            !serves_relay_sessions(true, &two, &[relay(1)]),
            "standalone relays carry"
        );
    }

    /// Without relays registered, a grant still goes: one frame listing none, no ticket.
    #[test]
    fn no_relays_is_a_grant_of_none() {
        let grants = Grants::none();
        assert_eq!(grants.every(), Duration::from_secs(150));
        let pieces = grants
            .frames(PublicKey([5; 32]), "prod", 3, SystemTime::now(), 1, 1150)
            .unwrap();
        assert_eq!(pieces.len(), 1);
        let (h, json) = parse(&pieces[0]).unwrap();
        assert_eq!(h.peer, RELAY_SELF);
        let grant: Grant = serde_json::from_slice(json).unwrap();
        assert!(grant.relays.is_empty() && grant.ticket.is_empty());
        assert!(grant.proof_secret.is_empty());
    }
}
