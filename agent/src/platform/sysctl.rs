//! The kernel settings of the agent's own TUN device (`/proc/sys/net/ipv4/conf/<tun>/...`).
//!
//! `accept_local`: a mesh node that takes over a workload address keeps back what its own host
//! sends the address until the coordinator confirms the handover, then writes it to the TUN
//! device (see `crate::dataplane::handover`). Such a packet's source is one of the host's own
//! addresses (the node's overlay address, as a rule), and Linux drops a packet arriving with a
//! local source as a martian unless the interface accepts local sources. IPv6 has no such
//! check, and no setting.
//!
//! # Security
//!
//! The setting is the TUN device's alone (the host's other interfaces keep theirs), and every
//! packet the agent writes to it either came from this host (kept back at a handover) or
//! passed the WireGuard source check: its inner source is among the allowed IPs of the peer
//! whose key sealed it (or a workload address that peer may send from), and never one of the
//! host's local addresses, which the data plane refuses from any peer whatever its allowed IPs
//! cover (`Device::set_own_addresses`: the node's addresses and the host's other interfaces',
//! such as its LAN address inside a subnet route an operator gave a peer). A workload address
//! on the interface here is accepted only from the nodes the fencing state lets send from it
//! (its holder, while the address is prepared here or lingers after a move away; its previous
//! holder for the grace period), never from a peer whose allowed IPs merely cover it. So what
//! a peer sends is held to what the kernel's martian check held it to before, but for the
//! holder's answers during a handover, which that check dropped. The one gap: the host's addresses are read again every 2 s and at every change of
//! the agent's own, so an address another program adds is refused from peers up to 2 s late.
//! Set only on mesh nodes, where handovers happen; a standalone configuration keeps the
//! kernel's default.

use std::io;
use std::path::PathBuf;

/// The IPv4 configuration file `key` of interface `interface`.
///
/// # Errors
/// [`io::ErrorKind::InvalidInput`] for a name that is no interface's (empty, `.`, `..`, with
/// a `/`, or `all` and `default`, the kernel's settings for every interface), which would name
/// another file.
fn ipv4_conf(interface: &str, key: &str) -> io::Result<PathBuf> {
    if matches!(interface, "" | "." | ".." | "all" | "default") || interface.contains('/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {interface:?}"),
        ));
    }
    Ok(PathBuf::from("/proc/sys/net/ipv4/conf")
        .join(interface)
        .join(key))
}

/// Lets `interface` (the agent's TUN device) take packets whose source is one of the host's
/// own addresses (see the module documentation).
///
/// # Errors
/// The write's (no such interface, `/proc/sys` read-only in a container, not permitted), or
/// an invalid interface name.
pub fn accept_local(interface: &str) -> io::Result<()> {
    std::fs::write(ipv4_conf(interface, "accept_local")?, b"1\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_setting_is_the_named_interfaces_own() {
        assert_eq!(
            ipv4_conf("ml0", "accept_local").unwrap(),
            PathBuf::from("/proc/sys/net/ipv4/conf/ml0/accept_local")
        );
        for bad in ["", ".", "..", "../all", "a/b", "all", "default"] {
            let e = ipv4_conf(bad, "accept_local").unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
    }
}
