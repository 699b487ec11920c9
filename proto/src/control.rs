//! The control protocol between agents and the coordinator, carried on one bidirectional QUIC
//! stream per session.
//!
//! Framing: every message is a 4-byte big-endian length followed by that many bytes of JSON.
//! The length is checked against a cap before anything is buffered ([`Decoder`]), so a peer
//! cannot make the other side allocate more than the cap.
//!
//! Protocol versions ([`PROTOCOL_VERSION`]):
//! - 1 (2026-11-26): hello/welcome, full maps and deltas, endpoint reports, revocation;
//!   (2026-11-27, before any release) workloads in maps, heartbeats and leases, move
//!   preparation, claims; (2026-12) every coordinator address of the mesh in the welcome
//!   (`Welcome::coordinators`, absent from older coordinators); (2026-12) the reflexive
//!   address port and relaying (`Welcome::reflect_port`, `Welcome::relay`; QUIC datagrams of
//!   [`crate::relay`] frames on the session's connection); path reports
//!   (`ClientMessage::Paths`, sent only when `Welcome::path_reports` says so); (2026-12) key
//!   rotation (`Hello::key_rotation`, `ServerMessage::RotateKey`, `ClientMessage::NextKey`,
//!   `PeerInfo::next_key` in maps; a hello may carry the node's next key, which completes
//!   its rotation); (2026-12) confirmed handovers of workload addresses (`Heartbeat::version`,
//!   the map version a heartbeat acknowledges; `Lease::confirmed`, the generations a holder
//!   may answer at, also sent unsolicited with `seq` 0: see [`crate::workload`]); (2026-12)
//!   policy edits (`Hello::policy_edits`; [`crate::PolicyChange::Edit`] in deltas, sent only
//!   to agents whose hello says so); (2026-12) compressed records (`Hello::compression`: a
//!   server message whose JSON is over [`COMPRESS_MIN`] bytes may come as a record whose
//!   prefix has [`COMPRESSED_RECORD`] set, its body the JSON's length (4 bytes, big-endian)
//!   and the JSON as a raw DEFLATE stream; sent only to agents whose hello says so, so older
//!   agents get every message as before); (2026-12) warm-up lists (`ClientMessage::Talkers`,
//!   the peers that send to a workload's address at its holder, sent only when
//!   `Welcome::talker_reports` says so; `Prepare::warm`, the peers a move's destination brings
//!   sessions up with, absent meaning every peer, which older agents ignore).
//!
//! Absent optional fields mean "none" or "empty" as documented per field; they never mean
//! "unchanged", since every message that carries state carries all of it.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::key::PublicKey;
use crate::netmap::{Netmap, NetmapDelta, NodeId};

mod tag_first;

/// The ALPN protocol of the control channel (QUIC, TLS 1.3).
pub const ALPN: &[u8] = b"meshlink/1";
/// The name the coordinator's certificate is issued to and clients ask for.
pub const SERVER_NAME: &str = "meshlink-coordinator";

/// The protocol version this code speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// The largest message an agent may send (the coordinator closes the session past it).
pub const MAX_CLIENT_MESSAGE: usize = 64 * 1024;
/// The largest message the coordinator may send (a full map of a large network).
pub const MAX_SERVER_MESSAGE: usize = 64 * 1024 * 1024;

/// How an agent proves who it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Auth {
    /// First contact: the secret of a join token.
    JoinToken {
        /// The token's secret part.
        secret: String,
    },
    /// Every later contact: the credentials given at join.
    Node {
        /// The node's id.
        node_id: NodeId,
        /// The node's secret.
        secret: String,
    },
}

/// The first message of a session, from the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The agent's [`PROTOCOL_VERSION`].
    pub protocol: u32,
    /// Credentials.
    pub auth: Auth,
    /// The node's WireGuard public key (the private key never leaves the node).
    pub public_key: PublicKey,
    /// Wanted name at join; ignored afterwards. Absent: the coordinator picks one.
    #[serde(default)]
    pub name: Option<String>,
    /// Labels at join; ignored afterwards. Absent: none.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The node's local underlay addresses with its WireGuard port.
    #[serde(default)]
    pub endpoints: Vec<SocketAddr>,
    /// Whether the agent rotates its key when told ([`ServerMessage::RotateKey`]); older
    /// agents do not know the message, so they are never sent it. Absent: no.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub key_rotation: bool,
    /// Whether the agent takes a policy change as an edit of the policy it has
    /// ([`crate::PolicyChange::Edit`]); older agents do not know it (they would close the
    /// session on it), so they always get the policy whole. Absent: no.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub policy_edits: bool,
    /// Whether the agent takes compressed records ([`COMPRESSED_RECORD`]); older agents
    /// would refuse one as over the size cap, so they get every message as it is. Absent: no.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub compression: bool,
    /// Whether the agent takes part in live migrations ([`ServerMessage::Handover`]): it
    /// passes a handover to the application registered for the workload on its local API and
    /// answers [`ClientMessage::HandedOver`]. Older agents are never sent one (a live migration
    /// away from them is refused). Absent: no.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub handover: bool,
}

/// Messages from the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum ClientMessage {
    /// Opens the session; must be first and only once.
    Hello(Hello),
    /// The node's local endpoints changed.
    Endpoints {
        /// The new list (replaces the old one).
        endpoints: Vec<SocketAddr>,
    },
    /// The agent saw a version gap and wants a full map.
    FullMapRequest,
    /// A holder of workload addresses keeps its lease alive; answered by
    /// [`ServerMessage::Lease`] with the same `seq`.
    Heartbeat {
        /// Sequence number, chosen by the agent.
        seq: u64,
        /// The version of the agent's map when it sent the heartbeat (every change up to it
        /// applied): a node that a change took a workload from sends one at once, which
        /// acknowledges the change, so that the next holder may answer. Absent: an agent
        /// from before 2026-12, which acknowledges nothing (the next holder waits until its
        /// lease has surely run out).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<u64>,
    },
    /// The agent is ready to take `workload` at `generation` (its tunnels are up), in answer
    /// to [`ServerMessage::Prepare`].
    Prepared {
        /// The workload's name.
        workload: String,
        /// The generation the move will take.
        generation: u64,
    },
    /// The application serving `workload` here handed its state over to the destination of
    /// a live migration, in answer to [`ServerMessage::Handover`]; with `error`, it could not
    /// (the move does not happen, and the application carries on here).
    HandedOver {
        /// The workload's name.
        workload: String,
        /// The generation the move will take.
        generation: u64,
        /// The handover's [`ServerMessage::Handover::attempt`].
        #[serde(default)]
        attempt: u64,
        /// Why the handover failed, when it did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// The paths this node uses to its peers, for operators (`meshctl node show`); sent only
    /// to coordinators whose welcome says [`Welcome::path_reports`], when they changed, at
    /// most [`MAX_PATH_REPORTS`] of them. Replaces the previous report.
    Paths {
        /// One entry per peer.
        paths: Vec<PathReport>,
    },
    /// The node asks to become the holder of `workload` (a migration script on this VM);
    /// answered by [`ServerMessage::ClaimResult`] with the same `request`.
    Claim {
        /// Request number, chosen by the agent.
        request: u64,
        /// The workload's name.
        workload: String,
    },
    /// The peers that sent to `workload`'s address at this node, its holder, in the last
    /// [`TALKER_WINDOW_SECS`] (at most [`MAX_TALKERS`], the most recent first), so that the
    /// destination of a move brings sessions up with them rather than with every peer of the
    /// network. Sent only to coordinators whose welcome says [`Welcome::talker_reports`], when
    /// the set changed; replaces the previous report for that workload. A coordinator keeps
    /// it only from the workload's holder.
    Talkers {
        /// The workload's name.
        workload: String,
        /// The peers, by node id.
        nodes: Vec<NodeId>,
    },
    /// The public key of the key pair this node made for its rotation, in answer to
    /// [`ServerMessage::RotateKey`] (again after a reconnection, the same key). The private key
    /// stays on the node.
    NextKey {
        /// The new public key.
        public_key: PublicKey,
    },
}

/// The most entries of one [`ClientMessage::Paths`] (the message cap allows about twice as
/// many).
pub const MAX_PATH_REPORTS: usize = 256;

/// The most peers of one [`ClientMessage::Talkers`] report, and of a `Prepare`'s warm-up list.
pub const MAX_TALKERS: usize = 64;

/// How far back a holder's [`ClientMessage::Talkers`] report looks.
pub const TALKER_WINDOW_SECS: u64 = 60;

/// How a node reaches a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathKind {
    /// Straight to the peer's address (a probe through it answered).
    Direct,
    /// Through the relay.
    Relay,
    /// Sending to an address nothing confirmed yet.
    Unconfirmed,
    /// No way to send.
    None,
}

/// What a relayed path runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelayTransport {
    /// QUIC datagrams.
    Udp,
    /// Records on a TLS/TCP stream.
    Tcp,
}

/// One peer's path in a [`ClientMessage::Paths`] report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathReport {
    /// The peer.
    pub peer: NodeId,
    /// The kind of path.
    pub kind: PathKind,
    /// The peer's address (direct) or the relay's (relay).
    #[serde(default)]
    pub via: Option<SocketAddr>,
    /// For a relay: over what.
    #[serde(default)]
    pub over: Option<RelayTransport>,
    /// For a path through a standalone relay: the relay's name, as the coordinators'
    /// `[[relays]]` list it (at most [`MAX_RELAY_NAME`] bytes). Absent: the coordinator's own
    /// relay, or not relayed (and from agents from before 2026-12).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
    /// Round trip of the path, in microseconds: measured by probes straight to the peer
    /// (direct) or through the relay, end to end (relay; agents from before 2026-12 report
    /// none for a relayed path). Absent: not measured.
    #[serde(default)]
    pub rtt_us: Option<u64>,
    /// Seconds since the path last changed, when reported.
    #[serde(default)]
    pub changed_secs_ago: Option<u64>,
}

/// The longest relay name a [`PathReport`] keeps (a coordinator's `[[relays]]` names are at
/// most 32 bytes).
pub const MAX_RELAY_NAME: usize = 64;

/// The coordinator's answer to an accepted hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The node's id.
    pub node_id: NodeId,
    /// The node's name.
    pub name: String,
    /// The network's name.
    pub network: String,
    /// The network's prefix.
    pub network_cidr: IpNet,
    /// The network's IPv6 prefix, when it has one. Absent: none (or an older coordinator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_cidr6: Option<IpNet>,
    /// The node's overlay addresses, with the network's prefix length (IPv4; then IPv6 with
    /// its /48 when the network has an IPv6 prefix).
    pub addresses: Vec<IpNet>,
    /// Present only on join: the node's secret for [`Auth::Node`]. The agent stores it (0600).
    #[serde(default)]
    pub node_secret: Option<String>,
    /// Every coordinator address (`host:port`) of the mesh as this coordinator knows it now,
    /// in the order agents should try them. The agent replaces the list it keeps with it.
    /// Empty or absent (a coordinator from before 2026-12): unknown, the agent keeps the list
    /// it has.
    #[serde(default)]
    pub coordinators: Vec<String>,
    /// The UDP port on this coordinator's address that answers reflexive address queries
    /// ([`crate::disco::Reflect`]) sent from the agent's WireGuard socket. Absent: none.
    #[serde(default)]
    pub reflect_port: Option<u16>,
    /// Whether this coordinator relays WireGuard datagrams between the nodes of the network
    /// as QUIC datagrams on the session's connection ([`crate::relay`]). Absent: no.
    #[serde(default)]
    pub relay: bool,
    /// Whether this coordinator takes [`ClientMessage::Paths`] (older ones close a session on
    /// a message they do not know). Absent: no.
    #[serde(default)]
    pub path_reports: bool,
    /// Whether this coordinator takes [`ClientMessage::Talkers`]. Absent: no.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub talker_reports: bool,
    /// Whether this coordinator takes [`ClientMessage::HandedOver`] (live migrations); an
    /// agent answers a handover only on a session whose welcome says so. Absent: no.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub handover: bool,
    /// Whether this coordinator confirms handovers ([`ServerMessage::Lease`]'s `confirmed`):
    /// then a node sets up no address for a move being prepared before the confirmation,
    /// from the first move on (else it learns so only from its first lease answer). Absent:
    /// unknown until a lease answer says.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub confirms_handovers: bool,
}

/// Messages from the coordinator.
///
/// Encoded as a JSON object whose `type` comes first; decoded by [`tag_first`] (the derive
/// below makes the inherent `ServerMessage::serialize`/`deserialize` that it and the trait
/// impls there use).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self", rename_all = "snake_case", tag = "type")]
pub enum ServerMessage {
    /// The hello was accepted.
    Welcome(Welcome),
    /// The whole map; replaces whatever the agent had.
    FullMap(Netmap),
    /// One change to the map.
    Delta(NetmapDelta),
    /// The hello was refused; the session closes and the node must not come back (a bad
    /// or used-up token, wrong credentials).
    Refused {
        /// Why, for the operator.
        reason: String,
    },
    /// The coordinator cannot serve the hello now (its database is unavailable); the session
    /// closes and the node tries again later, or another coordinator. (Older agents do not
    /// know it: to them it is a protocol error, after which they try again too.)
    Unavailable {
        /// Why, for the operator.
        reason: String,
    },
    /// The node was revoked; the agent must drop its peers and not reconnect.
    Revoked {
        /// Why, for the operator.
        reason: String,
    },
    /// The answer to [`ClientMessage::Heartbeat`] `seq`: the node may answer for the
    /// workload addresses its map gives it until the heartbeat's send time plus `lease_ms`.
    Lease {
        /// The heartbeat answered.
        seq: u64,
        /// The lease, in milliseconds.
        lease_ms: u64,
        /// The network's map version when it was granted: it holds only once the agent's map
        /// has reached it.
        version: u64,
        /// The workloads (by id) this node holds and may answer for, with the generation
        /// confirmed: every node that held one before has acknowledged the change (a
        /// heartbeat at its version) or has surely lost its lease. A workload the map gives
        /// the node at a newer generation than confirmed here or earlier is held back: the
        /// node answers for it once a later `Lease` confirms it. `seq` 0 answers no heartbeat
        /// (agents number theirs from 1) and renews nothing: the coordinator sends it when a
        /// handover is confirmed. Absent: a coordinator from before 2026-12, which confirms
        /// nothing and holds nothing back.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        confirmed: Option<Vec<crate::workload::Confirmation>>,
    },
    /// This node is about to become the holder of `workload` at `generation`: bring up
    /// tunnels to the peers, then answer [`ClientMessage::Prepared`].
    Prepare {
        /// The workload's name.
        workload: String,
        /// The generation the move will take.
        generation: u64,
        /// The peers to bring sessions up with (at most [`MAX_TALKERS`]): the holder and the
        /// peers its last [`ClientMessage::Talkers`] report named. Absent: every peer (the
        /// coordinator has no report, or is from before 2026-12; older agents ignore it and
        /// warm every peer).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        warm: Option<Vec<NodeId>>,
    },
    /// A live migration of `workload`, held here, to the node `to` at `generation` (its
    /// tunnels are up): the application serving the workload here is to hand its state (its
    /// connections, its data) over to the same application on `to`, then this node answers
    /// [`ClientMessage::HandedOver`]; only then does the move commit. Sent only to agents
    /// whose hello says [`Hello::handover`].
    Handover {
        /// The workload's name.
        workload: String,
        /// The generation the move will take.
        generation: u64,
        /// The destination.
        to: NodeId,
        /// Identifies this request among the coordinator's (a retry has another): the answer
        /// repeats it.
        #[serde(default)]
        attempt: u64,
    },
    /// The live migration asked by the [`ServerMessage::Handover`] with `attempt` will not
    /// commit (no answer in time, or the commit failed): the application is to carry on where
    /// it is. Sent only to agents whose hello says [`Hello::handover`].
    HandoverAborted {
        /// The workload's name.
        workload: String,
        /// The generation the move would have taken.
        generation: u64,
        /// The handover's attempt.
        attempt: u64,
    },
    /// The answer to [`ClientMessage::Claim`] `request`.
    ClaimResult {
        /// The claim answered.
        request: u64,
        /// The generation the node now holds the workload at, when granted.
        #[serde(default)]
        generation: Option<u64>,
        /// Why the claim was refused, when it was.
        #[serde(default)]
        error: Option<String>,
    },
    /// Rotate the node's WireGuard key: make a new key pair here, announce its public key
    /// ([`ClientMessage::NextKey`]; a key pair made earlier and not used yet is announced
    /// again instead), then, `grace_ms` after the node's own map entry first shows that key
    /// as its [`crate::PeerInfo::next_key`] (every peer got the same delta and accepts it by
    /// then), switch to it and say hello with it: that hello completes the rotation. Sent only
    /// to agents whose hello says [`Hello::key_rotation`].
    RotateKey {
        /// How long peers get to learn the next key before the node switches, in
        /// milliseconds (at most [`MAX_KEY_SWITCH_GRACE_MS`]; more is taken as that).
        grace_ms: u64,
    },
}

/// The longest wait between announcing a next key and switching to it that an agent accepts
/// from a coordinator (a minute).
pub const MAX_KEY_SWITCH_GRACE_MS: u64 = 60_000;

impl ServerMessage {
    /// What kind of message this is, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            ServerMessage::Welcome(_) => "welcome",
            ServerMessage::FullMap(_) => "full map",
            ServerMessage::Delta(_) => "delta",
            ServerMessage::Refused { .. } => "refusal",
            ServerMessage::Unavailable { .. } => "unavailability",
            ServerMessage::Revoked { .. } => "revocation",
            ServerMessage::Lease { .. } => "lease",
            ServerMessage::Prepare { .. } => "prepare",
            ServerMessage::Handover { .. } => "handover",
            ServerMessage::HandoverAborted { .. } => "handover abort",
            ServerMessage::ClaimResult { .. } => "claim result",
            ServerMessage::RotateKey { .. } => "key rotation",
        }
    }
}

/// Why bytes are not a message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    /// The length prefix exceeds the cap.
    #[error("message of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// The body is not a valid message.
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// Frames one message.
///
/// # Panics
/// Never for the message types of this module: their JSON encoding cannot fail.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let body = serde_json::to_vec(msg).expect("control messages always serialize");
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// The length prefix's top bit marks a record that is a relay frame ([`crate::relay`]), not a
/// message: on a control session over TLS/TCP (networks that block UDP), relay frames travel
/// on the same stream as the messages. Lengths of messages never reach it.
pub const RELAY_RECORD: u32 = 0x8000_0000;
/// The largest relay frame record: a whole WireGuard datagram (no fragments on a stream).
pub const MAX_RELAY_RECORD: usize = 65_535 + crate::relay::HEADER_LEN;

/// The length prefix's second bit marks a message sent compressed ([`compress`]), to agents
/// whose hello says [`Hello::compression`]. The body is the JSON's length (4 bytes, big-endian)
/// then the JSON as a raw DEFLATE stream (RFC 1951). Both lengths are within the decoder's cap.
pub const COMPRESSED_RECORD: u32 = 0x4000_0000;
/// Messages whose JSON is at most this long are never compressed (the saving would not pay
/// for the work).
pub const COMPRESS_MIN: usize = 4096;
/// DEFLATE cannot expand data more than this many times (258 bytes from 2 bits, with room);
/// a compressed record claiming more is malformed.
const MAX_INFLATE_RATIO: usize = 1040;

/// The compressed record of a framed message (as [`encode`] made it), or `None` when it is
/// not worth it: its JSON is at most [`COMPRESS_MIN`] bytes, the record would not be smaller,
/// or `frame` is not one framed message.
///
/// DEFLATE at level 1 (the fastest): the record is made once per message and sent to many
/// agents, so what counts is the bytes each of them is sent.
pub fn compress(frame: &[u8]) -> Option<Vec<u8>> {
    use std::io::Write;
    let body = frame.get(4..)?;
    let len = u32::from_be_bytes(frame.get(..4)?.try_into().ok()?);
    if len as usize != body.len() || body.len() <= COMPRESS_MIN || len & !0x3FFF_FFFF != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(8 + body.len() / 4);
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&len.to_be_bytes());
    let mut z = flate2::write::DeflateEncoder::new(out, flate2::Compression::fast());
    z.write_all(body).ok()?;
    let mut out = z.finish().ok()?;
    if out.len() >= frame.len() {
        return None;
    }
    let record = u32::try_from(out.len() - 4).ok()?;
    out[..4].copy_from_slice(&(COMPRESSED_RECORD | record).to_be_bytes());
    Some(out)
}

/// The JSON of a compressed record's body, at most `max` bytes.
///
/// # Errors
/// [`CodecError::TooLarge`] when the JSON's length is over `max` (nothing is inflated);
/// [`CodecError::Malformed`] when the body is shorter than its length field, claims more
/// than DEFLATE can give from it, is not a DEFLATE stream, or inflates to another length
/// than it says (inflating stops one byte past it: memory is bounded by `max`).
pub fn decompress(body: &[u8], max: usize) -> Result<Vec<u8>, CodecError> {
    use std::io::Read;
    let (head, stream) = body
        .split_first_chunk::<4>()
        .ok_or_else(|| CodecError::Malformed("compressed record: no length".into()))?;
    let len = u32::from_be_bytes(*head) as usize;
    if len > max {
        return Err(CodecError::TooLarge { len, max });
    }
    if len > stream.len().saturating_mul(MAX_INFLATE_RATIO) + 64 {
        return Err(CodecError::Malformed(format!(
            "compressed record: {len} bytes claimed from {} compressed",
            stream.len()
        )));
    }
    let mut out = Vec::with_capacity(len);
    flate2::read::DeflateDecoder::new(stream)
        .take(len as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| CodecError::Malformed(format!("compressed record: {e}")))?;
    if out.len() > len {
        return Err(CodecError::Malformed(format!(
            "compressed record: inflates past the {len} bytes it says"
        )));
    }
    if out.len() < len {
        return Err(CodecError::Malformed(format!(
            "compressed record: inflates to {} bytes, says {len}",
            out.len()
        )));
    }
    Ok(out)
}

/// One record of a control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record<T> {
    /// A message.
    Message(T),
    /// A relay frame.
    Relay(Vec<u8>),
}

/// Frames one relay frame as a record of a control stream.
///
/// # Errors
/// [`CodecError::TooLarge`] past [`MAX_RELAY_RECORD`].
pub fn encode_relay(frame: &[u8]) -> Result<Vec<u8>, CodecError> {
    if frame.len() > MAX_RELAY_RECORD {
        return Err(CodecError::TooLarge {
            len: frame.len(),
            max: MAX_RELAY_RECORD,
        });
    }
    let mut out = Vec::with_capacity(4 + frame.len());
    out.extend_from_slice(&(RELAY_RECORD | frame.len() as u32).to_be_bytes());
    out.extend_from_slice(frame);
    Ok(out)
}

/// Incremental decoder of framed messages, with a size cap.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    max: usize,
    /// Whether compressed records are taken ([`Decoder::with_compression`]).
    compressed: bool,
}

impl Decoder {
    /// A decoder refusing messages over `max` bytes, and compressed records (a prefix with
    /// [`COMPRESSED_RECORD`] reads as a length over the cap, as it did before them).
    pub fn new(max: usize) -> Self {
        Decoder {
            buf: Vec::new(),
            max,
            compressed: false,
        }
    }

    /// A decoder refusing messages over `max` bytes, taking compressed records
    /// ([`COMPRESSED_RECORD`]) of which neither the compressed body nor the message it
    /// inflates to may be over `max` (an agent whose hello says [`Hello::compression`]).
    pub fn with_compression(max: usize) -> Self {
        Decoder {
            compressed: true,
            ..Decoder::new(max)
        }
    }

    /// Appends received bytes. Refuses at once when a length prefix is over the cap.
    ///
    /// # Errors
    /// [`CodecError::TooLarge`].
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), CodecError> {
        self.buf.extend_from_slice(bytes);
        self.check_len().map(|_| ())
    }

    /// The next record's kind and length, once its prefix has arrived.
    fn check_len(&self) -> Result<Option<(Kind, usize)>, CodecError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let raw = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
        let (kind, len) = if raw & RELAY_RECORD != 0 {
            (Kind::Relay, raw & !RELAY_RECORD)
        } else if self.compressed && raw & COMPRESSED_RECORD != 0 {
            (Kind::Compressed, raw & !COMPRESSED_RECORD)
        } else {
            (Kind::Message, raw)
        };
        let len = len as usize;
        let max = if kind == Kind::Relay {
            MAX_RELAY_RECORD
        } else {
            self.max
        };
        if len > max {
            return Err(CodecError::TooLarge { len, max });
        }
        Ok(Some((kind, len)))
    }

    /// The next whole message, if one has arrived. `Ok(None)` means "need more bytes".
    ///
    /// # Errors
    /// [`CodecError`] when the next message is over the cap or malformed, or is a relay frame;
    /// the stream is then unusable.
    pub fn decode<T: DeserializeOwned>(&mut self) -> Result<Option<T>, CodecError> {
        match self.decode_record()? {
            None => Ok(None),
            Some(Record::Message(m)) => Ok(Some(m)),
            Some(Record::Relay(_)) => Err(CodecError::Malformed(
                "a relay frame where a message was expected".into(),
            )),
        }
    }

    /// The next whole record (a message or a relay frame), if one has arrived.
    ///
    /// # Errors
    /// [`CodecError`] when the next record is over its cap or a malformed message; the
    /// stream is then unusable.
    pub fn decode_record<T: DeserializeOwned>(&mut self) -> Result<Option<Record<T>>, CodecError> {
        let Some((kind, len)) = self.check_len()? else {
            return Ok(None);
        };
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let body = &self.buf[4..4 + len];
        let parsed = match kind {
            Kind::Relay => Ok(Record::Relay(body.to_vec())),
            Kind::Message => serde_json::from_slice(body)
                .map(Record::Message)
                .map_err(|e| CodecError::Malformed(e.to_string())),
            Kind::Compressed => decompress(body, self.max).and_then(|json| {
                serde_json::from_slice(&json)
                    .map(Record::Message)
                    .map_err(|e| CodecError::Malformed(e.to_string()))
            }),
        };
        self.buf.drain(..4 + len);
        parsed.map(Some)
    }

    /// Bytes held that do not yet form a message.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

/// What a record's prefix says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Message,
    Compressed,
    Relay,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> ClientMessage {
        ClientMessage::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            auth: Auth::Node {
                node_id: 4,
                secret: "s".into(),
            },
            public_key: PublicKey([3; 32]),
            name: Some("vm-a".into()),
            labels: BTreeMap::from([("provider".into(), "aws".into())]),
            endpoints: vec!["198.18.0.1:51820".parse().unwrap()],
            key_rotation: true,
            policy_edits: true,
            compression: true,
            handover: true,
        })
    }

    #[test]
    fn round_trip_in_pieces() {
        let a = encode(&hello());
        let b = encode(&ClientMessage::FullMapRequest);
        let all: Vec<u8> = a.iter().chain(b.iter()).copied().collect();
        let mut d = Decoder::new(MAX_CLIENT_MESSAGE);
        let mut got = Vec::new();
        for chunk in all.chunks(3) {
            d.push(chunk).unwrap();
            while let Some(m) = d.decode::<ClientMessage>().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, vec![hello(), ClientMessage::FullMapRequest]);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn key_rotation_messages_and_an_older_hello() {
        let pk = PublicKey([9; 32]);
        let msg = ClientMessage::NextKey { public_key: pk };
        let mut d = Decoder::new(MAX_CLIENT_MESSAGE);
        d.push(&encode(&msg)).unwrap();
        assert_eq!(d.decode::<ClientMessage>().unwrap(), Some(msg));
        let rotate = ServerMessage::RotateKey { grace_ms: 2000 };
        let mut d = Decoder::new(MAX_SERVER_MESSAGE);
        d.push(&encode(&rotate)).unwrap();
        assert_eq!(d.decode::<ServerMessage>().unwrap(), Some(rotate));
        // A hello from before key rotation has no flag: the agent is never asked to rotate.
        let old = r#"{"type":"hello","protocol":1,"auth":{"kind":"join_token","secret":"s"},
            "public_key":"CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk="}"#;
        let mut d = Decoder::new(MAX_CLIENT_MESSAGE);
        let mut framed = (old.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(old.as_bytes());
        d.push(&framed).unwrap();
        match d.decode::<ClientMessage>().unwrap() {
            Some(ClientMessage::Hello(h)) => {
                assert!(!h.key_rotation && !h.policy_edits && !h.compression && !h.handover)
            }
            other => panic!("{other:?}"),
        }
        // A key that is not 32 bytes is refused, naming the field.
        let bad = r#"{"type":"next_key","public_key":"AAAA"}"#;
        let mut d = Decoder::new(MAX_CLIENT_MESSAGE);
        let mut framed = (bad.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(bad.as_bytes());
        d.push(&framed).unwrap();
        assert!(d.decode::<ClientMessage>().is_err());
    }

    #[test]
    fn oversized_prefix_is_refused_before_buffering() {
        let mut d = Decoder::new(100);
        assert_eq!(
            d.push(&1000u32.to_be_bytes()),
            Err(CodecError::TooLarge {
                len: 1000,
                max: 100
            })
        );
    }

    #[test]
    fn malformed_body_is_an_error_not_a_panic() {
        let mut d = Decoder::new(100);
        d.push(&[0, 0, 0, 5, b'{', b'x', 0xff, b'}', b'!']).unwrap();
        assert!(matches!(
            d.decode::<ClientMessage>(),
            Err(CodecError::Malformed(_))
        ));
        let mut d = Decoder::new(100);
        d.push(&[0, 0, 0, 2, b'{', b'}']).unwrap();
        assert!(matches!(
            d.decode::<ClientMessage>(),
            Err(CodecError::Malformed(_))
        ));
    }

    #[test]
    fn handover_fields_are_optional_both_ways() {
        // An agent from before 2026-12 sends no version; a coordinator from then sends no
        // confirmations: both still decode, as `None`.
        let old: ClientMessage = serde_json::from_str(r#"{"type":"heartbeat","seq":4}"#).unwrap();
        assert_eq!(
            old,
            ClientMessage::Heartbeat {
                seq: 4,
                version: None
            }
        );
        let old: ServerMessage =
            serde_json::from_str(r#"{"type":"lease","seq":4,"lease_ms":1500,"version":9}"#)
                .unwrap();
        assert!(matches!(
            old,
            ServerMessage::Lease {
                confirmed: None,
                ..
            }
        ));
        let lease = ServerMessage::Lease {
            seq: 0,
            lease_ms: 0,
            version: 9,
            confirmed: Some(vec![crate::workload::Confirmation {
                workload: 7,
                generation: 3,
            }]),
        };
        let mut d = Decoder::new(MAX_SERVER_MESSAGE);
        d.push(&encode(&lease)).unwrap();
        assert_eq!(d.decode::<ServerMessage>().unwrap(), Some(lease));
    }

    #[test]
    fn warm_up_lists_are_optional_both_ways() {
        // A coordinator from before 2026-12 sends no list: every peer is warmed.
        let old: ServerMessage =
            serde_json::from_str(r#"{"type":"prepare","workload":"chat","generation":3}"#).unwrap();
        assert_eq!(
            old,
            ServerMessage::Prepare {
                workload: "chat".into(),
                generation: 3,
                warm: None
            }
        );
        // An older agent ignores the list; a newer one reads it.
        let new = ServerMessage::Prepare {
            workload: "chat".into(),
            generation: 3,
            warm: Some(vec![1, 7]),
        };
        let bytes = encode(&new);
        let text = std::str::from_utf8(&bytes[4..]).unwrap();
        assert!(text.contains(r#""warm":[1,7]"#), "{text}");
        let mut d = Decoder::new(MAX_SERVER_MESSAGE);
        d.push(&bytes).unwrap();
        assert_eq!(d.decode::<ServerMessage>().unwrap(), Some(new));
        // A welcome without the flag: no talker reports.
        let w: Welcome = serde_json::from_str(
            r#"{"node_id":1,"name":"a","network":"n","network_cidr":"100.64.0.0/16","addresses":[]}"#,
        )
        .unwrap();
        assert!(!w.talker_reports);
        let report = ClientMessage::Talkers {
            workload: "chat".into(),
            nodes: vec![2, 3],
        };
        let mut d = Decoder::new(MAX_CLIENT_MESSAGE);
        d.push(&encode(&report)).unwrap();
        assert_eq!(d.decode::<ClientMessage>().unwrap(), Some(report));
    }

    #[test]
    fn relay_frames_and_messages_share_a_stream() {
        let mut bytes = encode(&ClientMessage::FullMapRequest);
        bytes.extend(encode_relay(&[7; 40]).unwrap());
        bytes.extend(encode(&ClientMessage::Heartbeat {
            seq: 3,
            version: None,
        }));
        let mut d = Decoder::new(MAX_CLIENT_MESSAGE);
        d.push(&bytes).unwrap();
        assert_eq!(
            d.decode_record::<ClientMessage>().unwrap(),
            Some(Record::Message(ClientMessage::FullMapRequest))
        );
        assert_eq!(
            d.decode_record::<ClientMessage>().unwrap(),
            Some(Record::Relay(vec![7; 40]))
        );
        assert_eq!(
            d.decode::<ClientMessage>().unwrap(),
            Some(ClientMessage::Heartbeat {
                seq: 3,
                version: None
            })
        );
        // Where only messages are expected, a relay frame is an error; an oversized one is
        // refused from its prefix alone.
        let mut d = Decoder::new(MAX_CLIENT_MESSAGE);
        d.push(&encode_relay(&[1; 8]).unwrap()).unwrap();
        assert!(d.decode::<ClientMessage>().is_err());
        let mut d = Decoder::new(MAX_CLIENT_MESSAGE);
        let huge = (RELAY_RECORD | (MAX_RELAY_RECORD as u32 + 1)).to_be_bytes();
        assert!(d.push(&huge).is_err());
        assert!(encode_relay(&vec![0; MAX_RELAY_RECORD + 1]).is_err());
    }

    /// A server message of `n` peers, some 300 bytes of JSON each.
    fn big_map(n: u64) -> ServerMessage {
        let mut map = Netmap {
            version: 7,
            ..Netmap::default()
        };
        for id in 1..=n {
            map.peers.insert(
                id,
                crate::PeerInfo {
                    node_id: id,
                    name: format!("node-{id}"),
                    public_key: PublicKey([id as u8; 32]),
                    next_key: None,
                    addresses: vec![format!("100.64.{}.{}/32", id / 256, id % 256)
                        .parse()
                        .unwrap()],
                    allowed_ips: vec![],
                    endpoints: vec![format!("198.18.{}.{}:51820", id / 256, id % 256)
                        .parse()
                        .unwrap()],
                    labels: BTreeMap::from([("rack".into(), format!("r{}", id % 7))]),
                    tags: vec!["web".into()],
                    via: None,
                },
            );
        }
        ServerMessage::FullMap(map)
    }

    /// A compressed record of `body` as `compress` makes them, claiming `claim` bytes.
    fn record(claim: u32, json: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        z.write_all(json).unwrap();
        let stream = z.finish().unwrap();
        let mut out = (COMPRESSED_RECORD | (stream.len() as u32 + 4))
            .to_be_bytes()
            .to_vec();
        out.extend_from_slice(&claim.to_be_bytes());
        out.extend_from_slice(&stream);
        out
    }

    #[test]
    fn compressed_records_round_trip_in_pieces_among_plain_ones() {
        let big = big_map(200);
        let plain = encode(&big);
        let packed = compress(&plain).expect("a large map compresses");
        assert!(
            packed.len() * 3 < plain.len(),
            "{} of {}",
            packed.len(),
            plain.len()
        );
        let small = ServerMessage::RotateKey { grace_ms: 5 };
        let mut bytes = encode(&small);
        bytes.extend_from_slice(&packed);
        bytes.extend(encode(&small));
        let mut d = Decoder::with_compression(MAX_SERVER_MESSAGE);
        let mut got = Vec::new();
        for chunk in bytes.chunks(1000) {
            d.push(chunk).unwrap();
            while let Some(m) = d.decode::<ServerMessage>().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, vec![small.clone(), big, small]);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn only_messages_over_the_threshold_are_compressed() {
        // JSON of COMPRESS_MIN bytes exactly stays as it is; one byte more is compressed.
        let at = |n: usize| {
            let msg = ServerMessage::Revoked {
                reason: "x".repeat(n),
            };
            let pad = encode(&msg).len() - 4 - n;
            encode(&ServerMessage::Revoked {
                reason: "x".repeat(COMPRESS_MIN - pad),
            })
        };
        let edge = at(COMPRESS_MIN);
        assert_eq!(edge.len(), 4 + COMPRESS_MIN);
        assert_eq!(compress(&edge), None);
        let mut over = edge.clone();
        // `"xxx"}` gets one more x.
        over.insert(over.len() - 3, b'x');
        over[..4].copy_from_slice(&(COMPRESS_MIN as u32 + 1).to_be_bytes());
        assert!(compress(&over).is_some());
        // Not one framed message: nothing.
        assert_eq!(compress(&over[..over.len() - 1]), None);
        // Incompressible bytes are not worth it.
        let mut noise = Vec::new();
        let mut x: u32 = 1;
        for _ in 0..COMPRESS_MIN * 2 {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            noise.push((x >> 24) as u8);
        }
        let mut framed = (noise.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&noise);
        assert_eq!(compress(&framed), None);
    }

    #[test]
    fn a_decoder_without_compression_refuses_compressed_records() {
        // As an agent from before them: the prefix reads as a length over the cap.
        let packed = compress(&encode(&big_map(50))).unwrap();
        let mut d = Decoder::new(MAX_SERVER_MESSAGE);
        assert!(matches!(d.push(&packed), Err(CodecError::TooLarge { .. })));
    }

    #[test]
    fn inflating_is_bounded_by_the_cap() {
        // A bomb: 16 MiB of zeros claimed as 1 KiB inflates no further than 1 KiB + 1.
        let zeros = vec![b' '; 16 << 20];
        let bomb = record(1024, &zeros);
        assert!(bomb.len() < 64 << 10, "{}", bomb.len());
        let mut d = Decoder::with_compression(MAX_SERVER_MESSAGE);
        d.push(&bomb).unwrap();
        match d.decode::<ServerMessage>() {
            Err(CodecError::Malformed(e)) => assert!(e.contains("past the 1024 bytes"), "{e}"),
            other => panic!("{other:?}"),
        }
        // Claiming more than the cap is refused before inflating.
        let mut d = Decoder::with_compression(1 << 20);
        d.push(&record(16 << 20, &zeros)).unwrap();
        assert_eq!(
            d.decode::<ServerMessage>(),
            Err(CodecError::TooLarge {
                len: 16 << 20,
                max: 1 << 20
            })
        );
        // Claiming more than DEFLATE can give from the bytes sent: refused, nothing reserved.
        let mut d = Decoder::with_compression(MAX_SERVER_MESSAGE);
        d.push(&record(32 << 20, b"{}")).unwrap();
        assert!(matches!(
            d.decode::<ServerMessage>(),
            Err(CodecError::Malformed(_))
        ));
        // The compressed body itself is held to the cap from its prefix.
        let mut d = Decoder::with_compression(100);
        assert!(matches!(
            d.push(&(COMPRESSED_RECORD | 101).to_be_bytes()),
            Err(CodecError::TooLarge { len: 101, max: 100 })
        ));
    }

    #[test]
    fn corrupt_compressed_records_are_errors_not_panics() {
        let plain = encode(&big_map(100));
        let packed = compress(&plain).unwrap();
        let json_len = plain.len() as u32 - 4;
        // Too short for its length field.
        let mut d = Decoder::with_compression(MAX_SERVER_MESSAGE);
        d.push(&(COMPRESSED_RECORD | 2).to_be_bytes()).unwrap();
        d.push(&[0, 1]).unwrap();
        assert!(matches!(
            d.decode::<ServerMessage>(),
            Err(CodecError::Malformed(_))
        ));
        // Claiming more than it gives.
        let mut short = packed.clone();
        short[4..8].copy_from_slice(&(json_len + 1).to_be_bytes());
        let mut d = Decoder::with_compression(MAX_SERVER_MESSAGE);
        d.push(&short).unwrap();
        assert!(matches!(
            d.decode::<ServerMessage>(),
            Err(CodecError::Malformed(_))
        ));
        // Every single-byte corruption of the stream, and every truncation: an error or
        // (where DEFLATE cannot tell) a message, never a panic; most are errors.
        let mut errors = 0;
        let mut tried = 0;
        for i in (8..packed.len()).step_by(7) {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = packed.clone();
                bad[i] ^= flip;
                let mut d = Decoder::with_compression(MAX_SERVER_MESSAGE);
                d.push(&bad).unwrap();
                tried += 1;
                errors += usize::from(d.decode::<ServerMessage>().is_err());
            }
        }
        assert!(errors * 10 >= tried * 9, "{errors} errors of {tried}");
        for cut in (9..packed.len()).step_by(13) {
            let mut bad = packed[..cut].to_vec();
            bad[..4].copy_from_slice(&(COMPRESSED_RECORD | (cut as u32 - 4)).to_be_bytes());
            let mut d = Decoder::with_compression(MAX_SERVER_MESSAGE);
            d.push(&bad).unwrap();
            assert!(d.decode::<ServerMessage>().is_err(), "cut at {cut}");
        }
    }
}
