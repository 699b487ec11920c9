//! `GET /v1/relays`: the relays a coordinator's agents relay through: its own, embedded in it,
//! and the standalone relays (`meshlink-relay`) it vouches for.

use meshlink_proto::control::RelayTransport;
use serde::{Deserialize, Serialize};

/// The relays of the coordinator that answers. Each coordinator answers from its own
/// configuration (the coordinators of one mesh normally list the same `[[relays]]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relays {
    /// The relay embedded in the coordinator, on its agents' control connections.
    pub embedded: EmbeddedRelay,
    /// The standalone relays of the coordinator's `[[relays]]`, in the configuration's order.
    /// Empty: none.
    pub standalone: Vec<StandaloneRelay>,
    /// In a mesh of several coordinators, every coordinator, each of which serves relay
    /// sessions on its own port to agents of all of them (named `coordinator-N` by their place
    /// in the mesh's list, no region or provider), listed to agents after the standalone
    /// relays. Empty for a lone coordinator (its agents meet on its embedded relay), and absent
    /// from the answers of older coordinators.
    #[serde(default)]
    pub coordinators: Vec<StandaloneRelay>,
}

/// The coordinator's own relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbeddedRelay {
    /// Whether it is on (`relay` in the coordinator's configuration; on by default).
    pub on: bool,
    /// Where agents reach it: the coordinator's advertised `host:port` (their control
    /// connections go there).
    pub addr: String,
    /// What it carries frames over: `udp` (QUIC datagrams) and, when the coordinator's TCP
    /// listener is on, `tcp` (records of the TLS stream). Empty when it is off.
    pub transports: Vec<RelayTransport>,
}

/// A relay the coordinator vouches for: a `[[relays]]` entry, or a coordinator of the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StandaloneRelay {
    /// Its name in the mesh (agents' status and path reports name it).
    pub name: String,
    /// Where agents reach it, `host:port` (QUIC over UDP and TLS over TCP on one port).
    pub addr: String,
    /// What agents reach it over: `udp` (QUIC datagrams) and `tcp` (records of a TLS
    /// stream), on the one port (every `meshlink-relay` serves both).
    pub transports: Vec<RelayTransport>,
    /// Lowercase hex SHA-256 of its certificate, which agents pin.
    pub fingerprint: String,
    /// Its region label; `null`: none given.
    pub region: Option<String>,
    /// Its provider label; `null`: none given.
    pub provider: Option<String>,
    /// Whether agents are told of it: the grants that list it ride the embedded relay's
    /// channel, so a coordinator whose relay is off announces none.
    pub granted: bool,
}
