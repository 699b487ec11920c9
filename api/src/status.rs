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
