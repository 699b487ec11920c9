//! Cryptokey routing table: which peer owns which inner addresses.
//!
//! Longest prefix wins, for outbound packets (destination to peer) and for the inbound check
//! (a decrypted packet's source must map back to the peer that sent it).

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prefix_trie::PrefixMap;

/// A longest-prefix-match table from IP prefixes to values (peer slots).
#[derive(Clone, Default)]
pub struct AllowedIps<T> {
    v4: PrefixMap<Ipv4Net, T>,
    v6: PrefixMap<Ipv6Net, T>,
}

impl<T> AllowedIps<T> {
    /// An empty table.
    pub fn new() -> Self {
        AllowedIps {
            v4: PrefixMap::new(),
            v6: PrefixMap::new(),
        }
    }

    /// Maps `net` (host bits cleared) to `value`, returning the value it replaces.
    pub fn insert(&mut self, net: IpNet, value: T) -> Option<T> {
        match net.trunc() {
            IpNet::V4(n) => self.v4.insert(n, value),
            IpNet::V6(n) => self.v6.insert(n, value),
        }
    }

    /// Removes exactly `net`.
    pub fn remove(&mut self, net: IpNet) -> Option<T> {
        match net.trunc() {
            IpNet::V4(n) => self.v4.remove(&n),
            IpNet::V6(n) => self.v6.remove(&n),
        }
    }

    /// The value of the longest prefix holding `addr`.
    #[inline]
    pub fn lookup(&self, addr: IpAddr) -> Option<&T> {
        match addr {
            IpAddr::V4(a) => self.v4.get_lpm(&Ipv4Net::from(a)).map(|(_, v)| v),
            IpAddr::V6(a) => self.v6.get_lpm(&Ipv6Net::from(a)).map(|(_, v)| v),
        }
    }

    /// Number of prefixes held.
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// True when the table holds no prefix.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins() {
        let mut t = AllowedIps::new();
        t.insert(net("0.0.0.0/0"), 'a');
        t.insert(net("10.0.0.0/8"), 'b');
        t.insert(net("10.1.0.0/16"), 'c');
        t.insert(net("10.1.2.3/32"), 'd');
        assert_eq!(t.lookup(ip("192.0.2.1")), Some(&'a'));
        assert_eq!(t.lookup(ip("10.9.9.9")), Some(&'b'));
        assert_eq!(t.lookup(ip("10.1.9.9")), Some(&'c'));
        assert_eq!(t.lookup(ip("10.1.2.3")), Some(&'d'));
        t.remove(net("10.1.0.0/16"));
        assert_eq!(t.lookup(ip("10.1.9.9")), Some(&'b'));
    }

    #[test]
    fn families_are_separate() {
        let mut t = AllowedIps::new();
        t.insert(net("fd00::/8"), 1);
        assert_eq!(t.lookup(ip("fd12::1")), Some(&1));
        assert_eq!(t.lookup(ip("10.0.0.1")), None);
        t.insert(net("::/0"), 2);
        assert_eq!(t.lookup(ip("2001:db8::1")), Some(&2));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn host_bits_are_cleared() {
        let mut t = AllowedIps::new();
        t.insert(net("100.64.0.7/24"), 1);
        assert_eq!(t.lookup(ip("100.64.0.200")), Some(&1));
        assert_eq!(t.remove(net("100.64.0.0/24")), Some(1));
        assert!(t.is_empty());
    }
}
