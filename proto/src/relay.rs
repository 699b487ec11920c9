//! Relayed WireGuard datagrams: the frames an agent and a relay exchange as QUIC datagrams.
//!
//! A relay forwards opaque WireGuard datagrams between enrolled nodes, keyed by node public
//! key: the agent sends `[destination key | fragment header | bytes]`, the relay checks that
//! both ends are nodes it serves, puts the *source's* key where the destination's was and
//! delivers the frame to the destination's session. The relay never sees plaintext: what it
//! carries is WireGuard ciphertext, authenticated again by the receiving peer.
//!
//! A QUIC datagram is smaller than a full WireGuard datagram (1,452 bytes for a 1,420-byte
//! tunnel MTU), so a datagram is cut into at most [`MAX_FRAGMENTS`] fragments that the
//! receiver puts back together ([`Reassembler`], bounded in entries and time); one that
//! would need more is refused with [`RelayError::TooLarge`] and counted by the caller, never
//! dropped unnoticed.
//!
//! ```text
//! frame: peer public key (32) | id (u16, per sender) | index (u8) | count (u8) | bytes
//! ```
//!
//! # Relays beyond the coordinator's
//!
//! Besides the relay embedded in each coordinator (frames on the control session), a mesh may
//! run standalone relays (`meshlink-relay`). The coordinator tells each agent of them in a
//! [`Grant`]: the relays registered with it ([`RelayInfo`]: address, certificate fingerprint,
//! region, provider) and a [`TicketBody`] signed with the coordinator's identity key that
//! vouches for the node's key in its network until an expiry. The grant travels as a relay
//! frame *from the relay itself* ([`RELAY_SELF`] in the key field) on the control session,
//! sent again well before the ticket expires; an agent that does not know grants counts it as
//! a frame from a stranger and drops it, so the wire stays compatible both ways. An agent
//! opens a session to each listed relay ([`RELAY_ALPN`]: a [`RelayHello`] with the ticket,
//! answered by a [`RelayAnswer`], framed as control messages), then exchanges frames there
//! exactly as with the embedded relay.
//!
//! # Tickets are bound to their sessions
//!
//! A ticket alone proves nothing about who presents it: every listed relay sees it. So each
//! ticket names a fresh Ed25519 key ([`TicketBody::proof_key`]) whose private half travels
//! only in the grant ([`Grant::proof_secret`], on the pinned control session), and the agent
//! signs, in each hello, a value of that very connection's TLS keys
//! ([`session_proof_message`]: the TLS exporter under [`EXPORTER_LABEL`]). The relay derives
//! the same value from its end of the connection and checks the signature against the
//! ticket's key. A relay (or anyone) that saw a hello cannot replay it on another connection:
//! its exporter differs, and signing a new one takes the key only the node has.
//!
//! Wire compatibility: only the session with a standalone relay changed ([`RELAY_PROTOCOL`]
//! 2; the standalone relay was never released with 1). Grants keep their form with one more
//! field that older agents ignore, so an older agent's use of the coordinator's embedded relay
//! is untouched.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::key::PublicKey;
use crate::netmap::NodeId;

/// The key field of a frame that comes from the relay itself (a [`Grant`]), not from a
/// node: the all-zero key, which no node may have (it is of small order).
pub const RELAY_SELF: PublicKey = PublicKey([0; 32]);
/// The ALPN protocol of a session with a standalone relay (QUIC and TLS/TCP alike).
pub const RELAY_ALPN: &[u8] = b"meshlink-relay/1";
/// The name a standalone relay's certificate is issued to and agents ask for.
pub const RELAY_SERVER_NAME: &str = "meshlink-relay";
/// The version of the relay session's protocol ([`RelayHello::protocol`]).
///
/// - 1: a hello with a bearer ticket (never released).
/// - 2: the hello also proves the ticket's key over the connection ([`RelayHello::proof`]).
pub const RELAY_PROTOCOL: u32 = 2;
/// The most relays a grant lists (more registered are left out, in the coordinator's order).
pub const MAX_LISTED_RELAYS: usize = 8;
/// The largest message of a relay session before it is accepted (a hello with its ticket).
pub const MAX_RELAY_MESSAGE: usize = 8 * 1024;
/// What a signature over a ticket's body starts with (domain separation: a signature made for
/// anything else, a TLS handshake say, never verifies as a ticket's).
pub const TICKET_CONTEXT: &[u8] = b"meshlink relay ticket v1\0";
/// What a hello's proof signs before the connection's exporter value (domain separation).
pub const PROOF_CONTEXT: &[u8] = b"meshlink relay session v1\0";
/// The TLS exporter label of the value a hello's proof signs (RFC 8446, section 7.5), with an
/// empty context, over QUIC and TLS/TCP alike.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-meshlink-relay-session";
/// Bytes of the exporter value a hello's proof signs.
pub const EXPORTER_LEN: usize = 32;
/// Bytes of a ticket's proof key (Ed25519 public key) and of its secret (Ed25519 seed).
pub const PROOF_KEY_LEN: usize = 32;

/// The message a hello's proof signs: [`PROOF_CONTEXT`] and the connection's exporter value.
#[must_use]
pub fn session_proof_message(exporter: &[u8; EXPORTER_LEN]) -> Vec<u8> {
    let mut m = Vec::with_capacity(PROOF_CONTEXT.len() + EXPORTER_LEN);
    m.extend_from_slice(PROOF_CONTEXT);
    m.extend_from_slice(exporter);
    m
}

/// The private half of a ticket's proof key: an Ed25519 seed, base64url. It travels only in
/// the grant, on the pinned control session, and is never shown (its `Debug` hides it).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ProofSecret(String);

impl std::fmt::Debug for ProofSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() {
            "ProofSecret(none)"
        } else {
            "ProofSecret(..)"
        })
    }
}

impl ProofSecret {
    /// The secret of `seed`.
    #[must_use]
    pub fn from_seed(seed: &[u8; PROOF_KEY_LEN]) -> Self {
        ProofSecret(URL_SAFE_NO_PAD.encode(seed))
    }

    /// The seed; `None` when absent or not 32 bytes of base64url.
    #[must_use]
    pub fn seed(&self) -> Option<[u8; PROOF_KEY_LEN]> {
        URL_SAFE_NO_PAD.decode(&self.0).ok()?.try_into().ok()
    }

    /// Whether there is none (a grant of an older coordinator, or one listing no relays).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A standalone relay as grants list it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RelayInfo {
    /// The relay's name, unique in the mesh (status shows it).
    pub name: String,
    /// Where it listens, `host:port` (QUIC over UDP and TLS over TCP on the same port).
    pub addr: String,
    /// Lowercase hex SHA-256 of its certificate: agents pin it.
    pub fingerprint: String,
    /// Its region, for operators (`eu-west`, say). Absent: none given.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub region: String,
    /// Its provider, for operators (`hetzner`, say). Absent: none given.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub provider: String,
}

/// What the coordinator tells an agent of the standalone relays: the list and a ticket.
/// Each grant replaces the previous one; one listing no relays (its ticket empty) says there
/// are none, and the agent closes the sessions it had.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The relays, at most [`MAX_LISTED_RELAYS`].
    #[serde(default)]
    pub relays: Vec<RelayInfo>,
    /// The node's ticket ([`Ticket`] text); empty when no relay is listed.
    #[serde(default)]
    pub ticket: String,
    /// When the ticket expires (Unix seconds): the agent uses it until then.
    #[serde(default)]
    pub expires: u64,
    /// The secret of the ticket's [`TicketBody::proof_key`], with which the agent proves the
    /// ticket is its own at each relay ([`RelayHello::proof`]). Absent: none (an older
    /// coordinator's grant, which standalone relays of protocol 2 refuse).
    #[serde(default, skip_serializing_if = "ProofSecret::is_empty")]
    pub proof_secret: ProofSecret,
}

/// What a ticket vouches for: this key is a node of this network until `expires`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketBody {
    /// The node's WireGuard public key.
    pub key: PublicKey,
    /// Its network.
    pub network: String,
    /// Its id (for logs).
    pub node: NodeId,
    /// When it was issued (Unix seconds).
    pub issued: u64,
    /// When it expires (Unix seconds).
    pub expires: u64,
    /// The Ed25519 public key (base64url) whose holder the ticket is for: a relay serves the
    /// ticket only on a connection whose hello is signed with it ([`RelayHello::proof`]).
    /// Absent (empty): a ticket of an older coordinator, which relays refuse.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub proof_key: String,
}

impl TicketBody {
    /// The proof key's bytes; `None` when absent or not 32 bytes of base64url.
    #[must_use]
    pub fn proof_key(&self) -> Option<[u8; PROOF_KEY_LEN]> {
        URL_SAFE_NO_PAD
            .decode(&self.proof_key)
            .ok()?
            .try_into()
            .ok()
    }
}

/// A ticket as text: `base64url(body JSON) "." base64url(scheme (u16, big-endian) | signature)`,
/// the signature over [`TICKET_CONTEXT`] followed by the body JSON, made with the coordinator
/// identity's key under the TLS signature scheme `scheme`. Parsing checks the form only; the
/// signature is the verifier's (`meshlink-relay`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    /// The body's JSON, as signed.
    pub body_json: Vec<u8>,
    /// The body.
    pub body: TicketBody,
    /// The TLS signature scheme's code point.
    pub scheme: u16,
    /// The signature.
    pub signature: Vec<u8>,
}

/// Why a ticket's text is not a ticket.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    /// Not two base64url parts separated by a dot, or the body is not a ticket body.
    #[error("malformed ticket: {0}")]
    Malformed(&'static str),
}

/// The most bytes of a ticket's text.
pub const MAX_TICKET_LEN: usize = 2048;

impl Ticket {
    /// The message a ticket's signature covers.
    #[must_use]
    pub fn signed_message(body_json: &[u8]) -> Vec<u8> {
        let mut m = Vec::with_capacity(TICKET_CONTEXT.len() + body_json.len());
        m.extend_from_slice(TICKET_CONTEXT);
        m.extend_from_slice(body_json);
        m
    }

    /// The text of a ticket with `body_json`, signed with `signature` under `scheme`.
    #[must_use]
    pub fn encode(body_json: &[u8], scheme: u16, signature: &[u8]) -> String {
        let mut sig = scheme.to_be_bytes().to_vec();
        sig.extend_from_slice(signature);
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(body_json),
            URL_SAFE_NO_PAD.encode(sig)
        )
    }

    /// Reads a ticket's text (its form, not its signature).
    ///
    /// # Errors
    /// [`TicketError::Malformed`].
    pub fn parse(text: &str) -> Result<Ticket, TicketError> {
        if text.len() > MAX_TICKET_LEN {
            return Err(TicketError::Malformed("too long"));
        }
        let (body, sig) = text
            .split_once('.')
            .ok_or(TicketError::Malformed("no signature"))?;
        let body_json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TicketError::Malformed("body is not base64url"))?;
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| TicketError::Malformed("signature is not base64url"))?;
        if sig.len() < 3 {
            return Err(TicketError::Malformed("signature too short"));
        }
        let body: TicketBody = serde_json::from_slice(&body_json)
            .map_err(|_| TicketError::Malformed("body is not a ticket body"))?;
        Ok(Ticket {
            body_json,
            body,
            scheme: u16::from_be_bytes([sig[0], sig[1]]),
            signature: sig[2..].to_vec(),
        })
    }
}

/// What a standalone relay's notice that a destination has no session there starts with (its
/// key follows): a frame from [`RELAY_SELF`] on a relay session, sent back for a frame the
/// relay could not deliver (at a capped rate), so that the sender reaches that peer another
/// way. The coordinator's relay sends none.
pub const NOTICE_UNREACHABLE: &[u8] = b"unreachable\0";

/// The notice that `peer` has no session at this relay, as a whole frame.
#[must_use]
pub fn unreachable_notice(peer: &PublicKey) -> Vec<u8> {
    let mut f = Vec::with_capacity(HEADER_LEN + NOTICE_UNREACHABLE.len() + 32);
    f.extend_from_slice(&RELAY_SELF.0);
    f.extend_from_slice(&[0, 0, 0, 1]);
    f.extend_from_slice(NOTICE_UNREACHABLE);
    f.extend_from_slice(&peer.0);
    f
}

/// The peer a notice's payload names, if it is one ([`unreachable_notice`]).
#[must_use]
pub fn parse_unreachable(payload: &[u8]) -> Option<PublicKey> {
    let key = payload.strip_prefix(NOTICE_UNREACHABLE)?;
    Some(PublicKey(key.try_into().ok()?))
}

/// The first message of a relay session, from the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayHello {
    /// The agent's [`RELAY_PROTOCOL`].
    pub protocol: u32,
    /// The node's ticket.
    pub ticket: String,
    /// The Ed25519 signature (base64url) with the ticket's proof key over
    /// [`session_proof_message`] of this connection's exporter value: the ticket is this
    /// agent's, not one a relay saw and replays.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub proof: String,
}

/// The relay's answer to a [`RelayHello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum RelayAnswer {
    /// Frames may flow; the relay ends the session when the ticket expires (`expires`, Unix
    /// seconds), so the agent opens a new one with a fresh ticket before that.
    Accepted {
        /// The ticket's expiry.
        expires: u64,
    },
    /// The ticket was refused (forged, expired, another mesh's); the session closes.
    Refused {
        /// Why, for the operator.
        reason: String,
    },
}

/// Bytes before the payload of a frame.
pub const HEADER_LEN: usize = 32 + 2 + 1 + 1;
/// The most fragments one datagram is cut into.
pub const MAX_FRAGMENTS: usize = 4;
/// How long the fragments of one datagram may take to arrive.
pub const REASSEMBLY_WINDOW: Duration = Duration::from_secs(2);
/// The most datagrams being put back together at once (per receiver).
pub const MAX_PARTIAL: usize = 64;

/// Why a datagram cannot be framed or a frame read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    /// The datagram needs more than [`MAX_FRAGMENTS`] frames of the path's size.
    #[error("datagram of {len} bytes does not fit in {MAX_FRAGMENTS} relay frames of {max} bytes")]
    TooLarge {
        /// The datagram's length.
        len: usize,
        /// The largest frame the path takes.
        max: usize,
    },
    /// A frame shorter than its header, or with an impossible fragment header.
    #[error("malformed relay frame")]
    Malformed,
}

/// One frame's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Destination (agent to relay) or source (relay to agent).
    pub peer: PublicKey,
    /// The datagram's id, chosen by its sender.
    pub id: u16,
    /// This fragment's place.
    pub index: u8,
    /// How many fragments the datagram has.
    pub count: u8,
}

/// Cuts `datagram` into frames for `peer` of at most `max_frame` bytes each.
///
/// # Errors
/// [`RelayError::TooLarge`] when it would take more than [`MAX_FRAGMENTS`] frames.
pub fn frames(
    peer: &PublicKey,
    id: u16,
    datagram: &[u8],
    max_frame: usize,
) -> Result<Vec<Vec<u8>>, RelayError> {
    let room = max_frame.saturating_sub(HEADER_LEN);
    let count = if room == 0 {
        usize::MAX
    } else {
        datagram.len().div_ceil(room).max(1)
    };
    if count > MAX_FRAGMENTS {
        return Err(RelayError::TooLarge {
            len: datagram.len(),
            max: max_frame,
        });
    }
    Ok((0..count)
        .map(|i| {
            let part = &datagram[i * room..((i + 1) * room).min(datagram.len())];
            let mut f = Vec::with_capacity(HEADER_LEN + part.len());
            f.extend_from_slice(&peer.0);
            f.extend_from_slice(&id.to_be_bytes());
            f.push(i as u8);
            f.push(count as u8);
            f.extend_from_slice(part);
            f
        })
        .collect())
}

/// Reads a frame's header.
///
/// # Errors
/// [`RelayError::Malformed`] for a short frame or a fragment header out of range.
pub fn parse(frame: &[u8]) -> Result<(Header, &[u8]), RelayError> {
    if frame.len() < HEADER_LEN {
        return Err(RelayError::Malformed);
    }
    let peer = PublicKey(frame[..32].try_into().map_err(|_| RelayError::Malformed)?);
    let id = u16::from_be_bytes([frame[32], frame[33]]);
    let (index, count) = (frame[34], frame[35]);
    if count == 0 || usize::from(count) > MAX_FRAGMENTS || index >= count {
        return Err(RelayError::Malformed);
    }
    Ok((
        Header {
            peer,
            id,
            index,
            count,
        },
        &frame[HEADER_LEN..],
    ))
}

/// Puts `peer` in a frame's key field (what a relay does before delivering it).
///
/// # Errors
/// [`RelayError::Malformed`] for a frame shorter than its header.
pub fn readdress(frame: &mut [u8], peer: &PublicKey) -> Result<(), RelayError> {
    if frame.len() < HEADER_LEN {
        return Err(RelayError::Malformed);
    }
    frame[..32].copy_from_slice(&peer.0);
    Ok(())
}

#[derive(Debug)]
struct Partial {
    peer: PublicKey,
    id: u16,
    started: Instant,
    parts: Vec<Option<Vec<u8>>>,
}

/// Puts fragmented datagrams back together; bounded to [`MAX_PARTIAL`] datagrams in progress
/// and [`REASSEMBLY_WINDOW`] each (the oldest give way).
#[derive(Debug, Default)]
pub struct Reassembler {
    partial: VecDeque<Partial>,
    expired: u64,
}

impl Reassembler {
    /// An empty reassembler.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one frame; returns the sender and the whole datagram once complete.
    pub fn push(
        &mut self,
        header: Header,
        bytes: &[u8],
        now: Instant,
    ) -> Option<(PublicKey, Vec<u8>)> {
        if header.count == 1 {
            return Some((header.peer, bytes.to_vec()));
        }
        let before = self.partial.len();
        self.partial
            .retain(|p| now.saturating_duration_since(p.started) < REASSEMBLY_WINDOW);
        self.expired += (before - self.partial.len()) as u64;
        let at = self
            .partial
            .iter()
            .position(|p| p.peer == header.peer && p.id == header.id);
        let at = match at {
            Some(i) if self.partial[i].parts.len() == usize::from(header.count) => i,
            Some(i) => {
                // The same id with another count: a new datagram after a wrap; start over.
                self.partial.remove(i);
                self.expired += 1;
                self.start(header, now)
            }
            None => self.start(header, now),
        };
        let p = &mut self.partial[at];
        p.parts[usize::from(header.index)] = Some(bytes.to_vec());
        if p.parts.iter().all(Option::is_some) {
            let p = self.partial.remove(at)?;
            let whole = p.parts.into_iter().flatten().flatten().collect();
            return Some((p.peer, whole));
        }
        None
    }

    fn start(&mut self, header: Header, now: Instant) -> usize {
        if self.partial.len() >= MAX_PARTIAL {
            self.partial.pop_front();
            self.expired += 1;
        }
        self.partial.push_back(Partial {
            peer: header.peer,
            id: header.id,
            started: now,
            parts: vec![None; usize::from(header.count)],
        });
        self.partial.len() - 1
    }

    /// Datagrams given up unfinished (late, evicted, or superseded).
    #[must_use]
    pub fn expired(&self) -> u64 {
        self.expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_notice_names_its_peer() {
        let f = unreachable_notice(&PublicKey([8; 32]));
        let (h, payload) = parse(&f).unwrap();
        assert_eq!((h.peer, h.count), (RELAY_SELF, 1));
        assert_eq!(parse_unreachable(payload), Some(PublicKey([8; 32])));
        assert_eq!(parse_unreachable(b"unreachable\0short"), None);
        assert_eq!(parse_unreachable(&[0; 44]), None);
    }

    #[test]
    fn a_ticket_round_trips_and_bad_text_is_refused() {
        let body = TicketBody {
            key: PublicKey([3; 32]),
            network: "prod".into(),
            node: 7,
            issued: 100,
            expires: 700,
            proof_key: URL_SAFE_NO_PAD.encode([6; 32]),
        };
        let json = serde_json::to_vec(&body).unwrap();
        let text = Ticket::encode(&json, 0x0403, &[9; 64]);
        let t = Ticket::parse(&text).unwrap();
        assert_eq!(t.body.proof_key(), Some([6; 32]));
        assert_eq!((t.body, t.scheme, t.signature), (body, 0x0403, vec![9; 64]));
        assert!(RELAY_SELF.has_small_order(), "no node can have it");
        for bad in [
            "",
            "abc",
            "!!.!!",
            &"a".repeat(MAX_TICKET_LEN + 1),
            "e30.AAAA",
        ] {
            assert!(Ticket::parse(bad).is_err(), "{bad}");
        }
        let grant = Grant {
            relays: vec![],
            ticket: text,
            expires: 700,
            proof_secret: ProofSecret::from_seed(&[7; 32]),
        };
        let back: Grant = serde_json::from_slice(&serde_json::to_vec(&grant).unwrap()).unwrap();
        assert_eq!(back, grant);
        assert_eq!(back.proof_secret.seed(), Some([7; 32]));
        assert!(!format!("{grant:?}").contains(&URL_SAFE_NO_PAD.encode([7; 32])));
        // A grant as an agent without proofs reads it, and one without a secret.
        let old: serde_json::Value =
            serde_json::from_slice(&serde_json::to_vec(&grant).unwrap()).unwrap();
        assert_eq!(old["ticket"], grant.ticket);
        let bare: Grant = serde_json::from_str(r#"{"relays":[],"ticket":"","expires":0}"#).unwrap();
        assert!(bare.proof_secret.is_empty() && bare.proof_secret.seed().is_none());
    }

    #[test]
    fn a_full_wireguard_datagram_crosses_in_two_frames_in_any_order() {
        let peer = PublicKey([5; 32]);
        let datagram: Vec<u8> = (0..1452u32).map(|i| i as u8).collect();
        let mut f = frames(&peer, 9, &datagram, 1200).unwrap();
        assert_eq!(f.len(), 2);
        assert!(f.iter().all(|x| x.len() <= 1200));
        f.reverse();
        let mut r = Reassembler::new();
        let now = Instant::now();
        let (h0, b0) = parse(&f[0]).unwrap();
        assert_eq!(r.push(h0, b0, now), None);
        let (h1, b1) = parse(&f[1]).unwrap();
        assert_eq!(r.push(h1, b1, now), Some((peer, datagram)));
    }

    #[test]
    fn too_large_is_an_error_not_a_silent_drop() {
        let peer = PublicKey([5; 32]);
        assert_eq!(
            frames(&peer, 1, &[0; 9000], 1200),
            Err(RelayError::TooLarge {
                len: 9000,
                max: 1200
            })
        );
        assert!(frames(&peer, 1, &[0; 10], HEADER_LEN).is_err());
    }

    #[test]
    fn bad_headers_are_refused_and_partial_state_is_bounded() {
        assert_eq!(parse(&[0; 10]), Err(RelayError::Malformed));
        let mut f = frames(&PublicKey([1; 32]), 1, &[0; 100], 80).unwrap();
        f[0][35] = 0;
        assert!(parse(&f[0]).is_err());
        f[0][35] = 9;
        assert!(parse(&f[0]).is_err());
        let mut r = Reassembler::new();
        let now = Instant::now();
        for id in 0..1000u16 {
            let f = frames(&PublicKey([1; 32]), id, &[0; 100], 80).unwrap();
            let (h, b) = parse(&f[0]).unwrap();
            assert_eq!(r.push(h, b, now), None);
        }
        assert_eq!(r.partial.len(), MAX_PARTIAL);
        assert_eq!(r.expired(), 1000 - MAX_PARTIAL as u64);
        // Late fragments start nothing that lives past the window.
        let later = now + REASSEMBLY_WINDOW;
        let f = frames(&PublicKey([2; 32]), 1, &[0; 100], 80).unwrap();
        let (h, b) = parse(&f[0]).unwrap();
        r.push(h, b, later);
        assert_eq!(r.partial.len(), 1);
    }
}
