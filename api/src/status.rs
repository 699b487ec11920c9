//! `GET /v1/status`.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// The coordinator's own state, and the mesh's coordinators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The coordinator's version.
    pub version: String,
    /// Networks.
    pub networks: u64,
    /// Nodes that are not revoked.
    pub nodes: u64,
    /// Nodes with a live session, on any coordinator.
    pub online: u64,
    /// Seconds since start.
    pub uptime_secs: u64,
    /// The address its QUIC listener is bound to.
    pub quic_listen: SocketAddr,
    /// The `host:port` in join tokens.
    pub advertise: String,
    /// The certificate fingerprint agents pin.
    pub fingerprint: String,
    /// Every coordinator of the mesh (with a shared store, as each reports itself every
    /// second; else this one). Absent from coordinators before 2026-12: read as empty.
    #[serde(default)]
    pub coordinators: Vec<CoordinatorStatus>,
    /// This coordinator's relay, with its counters since start. Absent (or `null`): relaying
    /// is off, or a coordinator before 2026-12.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelayStatus>,
    /// This coordinator's reflexive address responder, with its counters since start. Absent
    /// (or `null`): off, or a coordinator before 2026-12.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reflect: Option<ReflectStatus>,
    /// The asynchronous tasks alive in the coordinator's runtime now (sessions, their timers,
    /// followers: a count that returns to its level once what started them ended; a leak
    /// grows it). Absent: a coordinator before 2026-12-06.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tasks: Option<u64>,
}

/// The relay in [`Status`]: WireGuard datagrams relayed between nodes, as QUIC datagrams on
/// their control connections.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayStatus {
    /// Frames delivered to a destination.
    pub frames: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Frames not delivered, by reason.
    pub dropped: RelayDrops,
}

/// Frames the relay dropped, by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayDrops {
    /// Sent before the connection's hello was accepted.
    pub unauthenticated: u64,
    /// The sending node was over its byte rate (`relay_rate`).
    pub rate_limited: u64,
    /// Not a well-formed frame.
    pub malformed: u64,
    /// No node of the sender's network with that key has a session on this coordinator.
    pub no_route: u64,
    /// The destination is a node of another network.
    pub other_network: u64,
    /// Larger than the destination's connection takes.
    pub too_large: u64,
    /// The destination's agent takes no datagrams.
    pub unsupported: u64,
    /// The destination's send buffer was full.
    pub congested: u64,
}

/// The reflexive address responder in [`Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReflectStatus {
    /// The UDP address it is bound to.
    pub listen: SocketAddr,
    /// Requests answered.
    pub answered: u64,
    /// Requests not answered: their source was over its cap.
    pub refused: u64,
    /// Datagrams that were not a well-formed request.
    pub ignored: u64,
}

/// One coordinator in [`Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorStatus {
    /// Its `host:port` for agents.
    pub address: String,
    /// Agent sessions it has.
    pub sessions: u64,
    /// Whether it reported itself in the last few seconds.
    pub up: bool,
}
