//! Overlay address allocation: the lowest free host address of a network's prefix, and the
//! IPv6 address that goes with it.
//!
//! A network may also have an IPv6 ULA /48 (`cidr6`). Its nodes and workloads then get an
//! IPv6 address beside their IPv4 one, with no allocation of its own: the /48 with the IPv4
//! address in the low 32 bits ([`ipv6_of`]). So both families follow one allocation and one
//! record, a move moves both, and the IPv6 address says which IPv4 address it goes with.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

/// The length of a network's IPv6 prefix: a ULA /48 (RFC 4193).
pub const CIDR6_LEN: u8 = 48;

/// The IPv6 address of the node or workload with IPv4 address `v4` in a network whose IPv6
/// prefix is `cidr6`: the prefix with `v4` in its low 32 bits.
pub fn ipv6_of(cidr6: Ipv6Net, v4: Ipv4Addr) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(cidr6.network()) | u128::from(u32::from(v4)))
}

/// Why a prefix cannot be a network's IPv6 prefix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Cidr6Error {
    /// Not a /48.
    #[error("{0} is not a /48: a network's IPv6 prefix is a ULA /48 (fdXX:XXXX:XXXX::/48)")]
    Length(Ipv6Net),
    /// Outside fd00::/8.
    #[error("{0} is not a unique local prefix: it must lie in fd00::/8 (RFC 4193)")]
    NotUla(Ipv6Net),
    /// Host bits set.
    #[error("{0} has host bits set; did you mean {1}?")]
    HostBits(Ipv6Net, Ipv6Net),
}

/// Checks that `cidr6` can be a network's IPv6 prefix: a /48 in fd00::/8, host bits clear.
///
/// # Errors
/// [`Cidr6Error`] naming what is wrong.
pub fn check_cidr6(cidr6: Ipv6Net) -> Result<(), Cidr6Error> {
    if cidr6.prefix_len() != CIDR6_LEN {
        return Err(Cidr6Error::Length(cidr6));
    }
    if cidr6.addr().octets()[0] != 0xfd {
        return Err(Cidr6Error::NotUla(cidr6));
    }
    if cidr6.addr() != cidr6.network() {
        return Err(Cidr6Error::HostBits(cidr6, cidr6.trunc()));
    }
    Ok(())
}

/// A random ULA /48 (RFC 4193: fd, then a 40-bit global id) from 5 random bytes.
pub fn ula_from(global_id: [u8; 5]) -> Ipv6Net {
    let mut octets = [0u8; 16];
    octets[0] = 0xfd;
    octets[1..6].copy_from_slice(&global_id);
    // A /48 of a valid address is always valid.
    Ipv6Net::new(Ipv6Addr::from(octets), CIDR6_LEN).unwrap_or_default()
}

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
    fn the_ipv6_address_is_the_prefix_with_the_ipv4_address() {
        let cidr6: Ipv6Net = "fd7a:115c:a1e0::/48".parse().unwrap();
        assert_eq!(
            ipv6_of(cidr6, Ipv4Addr::new(100, 64, 0, 5)),
            "fd7a:115c:a1e0::6440:5".parse::<Ipv6Addr>().unwrap()
        );
        assert!(check_cidr6(cidr6).is_ok());
        for (bad, why) in [
            ("fd7a:115c:a1e0::/64", "not a /48"),
            ("2001:db8:1::/48", "unique local"),
            ("fc00:1:2::/48", "unique local"),
            ("fd7a:115c:a1e0::1/48", "host bits"),
        ] {
            let err = check_cidr6(bad.parse().unwrap()).unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
        let random = ula_from([1, 2, 3, 4, 5]);
        assert_eq!(random, "fd01:203:405::/48".parse::<Ipv6Net>().unwrap());
        assert!(check_cidr6(random).is_ok());
    }

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
