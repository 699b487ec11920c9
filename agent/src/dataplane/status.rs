//! What the data plane reports of itself: per-peer and per-device state and drop counters.
//! The userspace API (`crate::uapi`) and `meshlink-agent status` show them; they are defined
//! here, where they are produced.

use std::net::SocketAddr;
use std::time::SystemTime;

use ipnet::IpNet;
use meshlink_proto::PublicKey;

pub use super::conntrack::ConntrackStats;

/// Packets dropped on behalf of one peer (or of the device), by reason.
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DropCounts {
    /// Decrypted packets whose inner source address is not among the peer's allowed IPs.
    pub spoofed_source: u64,
    /// Packets with no peer to route to (counted per device; kept per peer for symmetry).
    pub no_route: u64,
    /// Packets that failed authentication or decryption.
    pub decrypt_failed: u64,
    /// Packets rejected by the replay window.
    pub replay: u64,
    /// Decrypted packets shorter than their IP header.
    pub short_packet: u64,
    /// Decrypted packets addressed to none of this node's destinations (mesh mode: its
    /// addresses, the prefixes the map routes to it, the workload addresses it holds).
    pub not_local: u64,
    /// Decrypted packets the network's policy denies (no rule allows their flow, or a policy
    /// change cut it).
    pub policy_denied: u64,
    /// Drops for any other reason.
    pub other: u64,
}

/// The live state of one peer, as the data plane reports it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PeerStatus {
    /// The peer's public key.
    pub public_key: PublicKey,
    /// Where the peer was last heard from (or was configured), which may differ from the
    /// configured endpoint once the peer has roamed.
    pub endpoint: Option<SocketAddr>,
    /// When the last handshake completed, if one ever did.
    pub last_handshake: Option<SystemTime>,
    /// Bytes sent to the peer, on the wire.
    pub tx_bytes: u64,
    /// Bytes received from the peer, on the wire.
    pub rx_bytes: u64,
    /// Datagrams sent to the peer (data, handshakes, keepalives).
    pub tx_packets: u64,
    /// Authenticated datagrams received from the peer.
    pub rx_packets: u64,
    /// Handshakes completed with the peer (as initiator or responder).
    pub handshakes: u64,
    /// Packets dropped for this peer.
    pub drops: DropCounts,
}

/// The live state of the device, as the data plane reports it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct DeviceStatus {
    /// The UDP port actually bound (the configuration may say 0, "pick one"); 0 when unbound.
    pub listen_port: u16,
    /// One entry per peer the data plane knows.
    pub peers: Vec<PeerStatus>,
}

/// New flows one rule of the policy let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RuleCount {
    /// The rule's line in the policy file.
    pub line: u32,
    /// New flows it allowed since the policy version took effect here.
    pub flows: u64,
}

/// The firewall's state and counters, as the data plane reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct FirewallStatus {
    /// Whether decrypted packets must be addressed to a local destination (mesh mode).
    pub destination_check: bool,
    /// Those destinations.
    pub local: Vec<IpNet>,
    /// The version of the policy in force; `None`: none, every flow is allowed.
    pub policy_version: Option<u64>,
    /// New flows allowed, by rule (in rule order).
    pub rules: Vec<RuleCount>,
    /// Decrypted packets addressed to no local destination.
    pub not_local: u64,
    /// Decrypted packets the policy denied (no rule, or their flow was cut).
    pub denied: u64,
    /// Flows cut by a policy change.
    pub cut: u64,
    /// The connection table (made when a policy first takes effect).
    pub flows: Option<ConntrackStats>,
}

/// Where packets to workload addresses went at a handover on this node (see
/// `dataplane::handover`): kept back while the address was awaited (its handover not
/// confirmed yet, or not up on the interface yet), then delivered or dropped for a named
/// reason. Counted since the start: `queued` = `released` + `denied` + `not_local` + `full` +
/// `timed_out` + `abandoned` + `sent_on` + `waiting`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct HandoverStatus {
    /// Packets that arrived for an awaited address (kept back, or dropped at once: `denied`,
    /// `full`), this host's own among them.
    pub queued: u64,
    /// Of those, delivered to the TUN device once the address could be answered.
    pub released: u64,
    /// Dropped: the policy denied them, on arrival (they are checked against it before they
    /// are kept) or at their release (the policy changed meanwhile).
    pub denied: u64,
    /// Dropped at their release: the address was no longer one of this node's destinations.
    pub not_local: u64,
    /// Dropped: no room was left (the largest share, by sender and by address, loses its
    /// oldest packets first; see `dataplane::handover`).
    pub full: u64,
    /// Dropped: no confirmation came within the timeout (`handover::HANDOVER_TIMEOUT`).
    pub timed_out: u64,
    /// Dropped: the address was not taken here after all (the workload went elsewhere, the
    /// preparation ended, the lease ran out).
    pub abandoned: u64,
    /// Not dropped: this host's own, for an address that was not taken here after all, sent on
    /// by the routes (to the holder of then).
    pub sent_on: u64,
    /// Dropped: addressed to a workload address of the map that this node neither holds,
    /// awaits nor forwards (a peer's map is ahead of or behind this node's). Not part of
    /// `queued`.
    pub not_held: u64,
    /// Packets kept back now (queued or released and not yet delivered).
    pub waiting: u64,
    /// Their bytes.
    pub waiting_bytes: u64,
}
