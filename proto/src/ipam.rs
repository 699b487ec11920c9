//! Overlay address allocation: the lowest free host address of a network's prefix.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// The lowest address of `cidr` not in `used`, skipping the network and broadcast addresses
/// (for prefixes shorter than /31). `None` when the prefix is full.
pub fn allocate_v4(cidr: Ipv4Net, used: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    let first = u32::from(cidr.network());
    let last = u32::from(cidr.broadcast());
    let (lo, hi) = if cidr.prefix_len() >= 31 {
        (first, last)
    } else {
        (first + 1, last - 1)
    };
    (lo..=hi).map(Ipv4Addr::from).find(|a| !used.contains(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_free_host_address() {
        let net: Ipv4Net = "100.64.0.0/30".parse().unwrap();
        let mut used = BTreeSet::new();
        assert_eq!(allocate_v4(net, &used), Some(Ipv4Addr::new(100, 64, 0, 1)));
        used.insert(Ipv4Addr::new(100, 64, 0, 1));
        assert_eq!(allocate_v4(net, &used), Some(Ipv4Addr::new(100, 64, 0, 2)));
        used.insert(Ipv4Addr::new(100, 64, 0, 2));
        assert_eq!(
            allocate_v4(net, &used),
            None,
            "network and broadcast are never handed out"
        );
        used.remove(&Ipv4Addr::new(100, 64, 0, 1));
        assert_eq!(
            allocate_v4(net, &used),
            Some(Ipv4Addr::new(100, 64, 0, 1)),
            "freed addresses are reused"
        );
    }

    #[test]
    fn point_to_point_prefixes_use_both_addresses() {
        let net: Ipv4Net = "100.64.0.8/31".parse().unwrap();
        assert_eq!(
            allocate_v4(net, &BTreeSet::new()),
            Some(Ipv4Addr::new(100, 64, 0, 8))
        );
    }
}
