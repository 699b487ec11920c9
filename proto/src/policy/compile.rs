//! The per-node table the data plane consults for a new flow. Contract only.

use std::net::IpAddr;

use super::Policy;
use crate::{Netmap, NodeId};

/// The rules of a policy that can allow a flow *to* node `me`, keyed by source address.
#[derive(Debug, Clone, Default)]
pub struct NodeTable {}

impl NodeTable {
    /// Compiles `policy` for node `me` of `map`.
    pub fn compile(_policy: &Policy, _map: &Netmap, _me: NodeId) -> NodeTable {
        unimplemented!("contract")
    }

    /// The index of the first rule allowing a new flow, or `None`: denied.
    pub fn lookup(&self, _src: IpAddr, _dst: IpAddr, _proto: u8, _port: u16) -> Option<usize> {
        unimplemented!("contract")
    }
}
