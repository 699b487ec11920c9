//! The gateway of external nodes: devices that run stock WireGuard and no agent (see
//! `meshlink_proto::PeerInfo::via`). Each has this node as its one WireGuard peer; this node
//! forwards what it sends to the mesh, and what the mesh sends it, re-encrypted for the next
//! hop:
//!
//! ```text
//!  external X ──> this node: decrypted, destination routed to peer Y ──> flow noted ──> Y
//!  peer Y     ──> this node: decrypted, destination routed to X ──> X's policy ──> X
//! ```
//!
//! Packets to X are checked here against the network's policy compiled for X (X has no
//! firewall of its own): a flow X opened passes (its flow is recorded in the gateway's own
//! connection table as X's), a new flow needs a rule that lets it reach X. Packets from X to
//! another node are checked by that node's agent, which sees X's address as the source (the
//! gateway's allowed IPs there include it). Packets from X to this node itself, or to what it
//! holds, are not forwarded: the device's own firewall takes them as from any peer.

use std::collections::HashSet;
use std::sync::Arc;

use meshlink_proto::PublicKey;

use super::firewall::{CompiledPolicy, Firewall, FirewallConfig};

/// How many flows the gateway's connection table holds: its own table, for the flows of the
/// external nodes it serves (a few devices, not a data centre).
pub const GATEWAY_FLOWS: usize = 16_384;

/// What the gateway does; see [`super::Device::set_gateway`]. The default serves nobody.
#[derive(Debug, Clone, Default)]
pub struct GatewayConfig {
    /// The external nodes this node is the gateway of, by the key their peer has.
    pub served: HashSet<PublicKey>,
    /// The network's policy compiled for them ([`CompiledPolicy::compile_for`]); `None`:
    /// none, every flow to them is allowed.
    pub policy: Option<Arc<CompiledPolicy>>,
}

/// The gateway as the device's table holds it.
#[derive(Default)]
pub(crate) struct Gateway {
    pub(crate) served: HashSet<PublicKey>,
    /// The policy for flows to the served nodes, with no destination check (nothing is local
    /// to them here).
    pub(crate) firewall: Firewall,
}

impl Gateway {
    /// Whether `config` is what the gateway does already.
    pub(crate) fn is(&self, config: &GatewayConfig) -> bool {
        self.served == config.served && self.firewall.is(&firewall_of(config))
    }

    /// Brings the gateway to `config`.
    pub(crate) fn set(&mut self, config: GatewayConfig) {
        self.firewall.set(firewall_of(&config));
        self.served = config.served;
    }
}

fn firewall_of(config: &GatewayConfig) -> FirewallConfig {
    FirewallConfig {
        local: None,
        policy: config.policy.clone(),
    }
}
