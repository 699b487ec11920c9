//! Simulated cloud providers: one underlay /24 per provider, joined by a router.
//!
//! ```text
//!               router namespace (ip_forward=1)
//!        bridge 198.18.1.1/24        bridge 198.18.2.1/24
//!         |        |                   |         |
//!       host     host                host      host        (one veth each)
//!   198.18.1.10  198.18.1.11      198.18.2.10  198.18.2.11
//!      provider A                     provider B
//! ```
//!
//! Every host routes the whole underlay, 198.18.0.0/15, through its provider's router address
//! and has no default route, so nothing it sends can leave the test's namespaces. Traffic
//! between hosts of one provider stays on that provider's bridge; traffic between providers
//! crosses the router.

use std::net::Ipv4Addr;

use crate::netns::{veth_link, Netns, NsRef};
use crate::unique_name;

/// The whole underlay: every host routes it through its provider's router.
pub const UNDERLAY: &str = "198.18.0.0/15";
/// The last octet of a provider's first host; the router is `.1`.
pub const FIRST_HOST_OCTET: u8 = 10;

/// A provider's identity in [`Providers`]: its index (0 for the first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Provider(pub usize);

impl Provider {
    /// Provider A: 198.18.1.0/24.
    pub const A: Provider = Provider(0);
    /// Provider B: 198.18.2.0/24.
    pub const B: Provider = Provider(1);
    /// Provider C: 198.18.3.0/24.
    pub const C: Provider = Provider(2);

    /// Its letter, `a`, `b`, ... (for names and labels).
    ///
    /// # Panics
    /// Beyond the 26th provider.
    pub fn letter(self) -> char {
        let n = u8::try_from(self.0)
            .ok()
            .filter(|n| *n < 26)
            .expect("at most 26 providers");
        char::from(b'a' + n)
    }

    /// The third octet of its underlay /24: `1` for A, `2` for B, ...
    ///
    /// # Panics
    /// Beyond the 200th provider (the /24s must stay inside 198.18.0.0/15).
    pub fn octet(self) -> u8 {
        u8::try_from(self.0 + 1)
            .ok()
            .filter(|o| *o <= 200)
            .expect("at most 200 providers")
    }

    /// Its underlay prefix, e.g. `198.18.1.0/24`.
    pub fn subnet(self) -> String {
        format!("198.18.{}.0/24", self.octet())
    }

    /// The router's address on this provider's bridge, `198.18.N.1`: every host's gateway.
    pub fn gateway(self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.octet(), 1)
    }
}

/// One host on a provider's network: a namespace with one veth to the provider's bridge.
#[derive(Debug)]
pub struct ProviderHost {
    /// The host's namespace.
    pub ns: Netns,
    /// The provider it is attached to.
    pub provider: Provider,
    /// Its underlay address (/24 on its veth).
    pub underlay: Ipv4Addr,
    /// Its end of the veth.
    pub veth: String,
}

impl ProviderHost {
    /// A cloneable reference to its namespace.
    pub fn handle(&self) -> NsRef {
        self.ns.handle()
    }
}

/// The router namespace with one bridge per provider. Hosts are added with
/// [`Providers::add_host`] and owned by the caller.
#[derive(Debug)]
pub struct Providers {
    /// The router's namespace; the bridges and the router ends of every veth live here.
    pub router: Netns,
    bridges: Vec<String>,
    next_octet: Vec<u8>,
}

impl Providers {
    /// Builds the router with `count` providers (at least one): bridge `i` has
    /// `198.18.(i+1).1/24`, and the router forwards between them.
    ///
    /// # Panics
    /// When a namespace, bridge or address cannot be made.
    pub fn create(count: usize) -> Providers {
        assert!(count >= 1, "at least one provider");
        let router = Netns::create();
        router.sysctl("net/ipv4/ip_forward", "1");
        let mut bridges = Vec::with_capacity(count);
        for i in 0..count {
            let provider = Provider(i);
            let bridge = unique_name("br");
            router.ip(&["link", "add", &bridge, "type", "bridge"]);
            router.ip(&[
                "addr",
                "add",
                &format!("{}/24", provider.gateway()),
                "dev",
                &bridge,
            ]);
            router.ip(&["link", "set", &bridge, "up"]);
            bridges.push(bridge);
        }
        Providers {
            router,
            bridges,
            next_octet: vec![FIRST_HOST_OCTET; count],
        }
    }

    /// How many providers there are.
    pub fn count(&self) -> usize {
        self.bridges.len()
    }

    /// The bridge of `provider` in the router namespace.
    ///
    /// # Panics
    /// When there is no such provider.
    pub fn bridge(&self, provider: Provider) -> &str {
        &self.bridges[provider.0]
    }

    /// A new host on `provider`'s network, with the next free address (`.10`, `.11`, ...) and a
    /// route for the whole underlay through the provider's router (and no default route).
    ///
    /// # Panics
    /// When there is no such provider, its /24 is full, or an `ip` command fails.
    pub fn add_host(&mut self, provider: Provider) -> ProviderHost {
        let octet = self.next_octet[provider.0];
        assert!(octet < 255, "provider {} is full", provider.letter());
        self.next_octet[provider.0] = octet + 1;
        let underlay = Ipv4Addr::new(198, 18, provider.octet(), octet);

        let ns = Netns::create();
        let link = veth_link(&ns, &self.router);
        self.router
            .ip(&["link", "set", &link.b, "master", self.bridge(provider)]);
        ns.ip(&["addr", "add", &format!("{underlay}/24"), "dev", &link.a]);
        ns.ip(&[
            "route",
            "add",
            UNDERLAY,
            "via",
            &provider.gateway().to_string(),
        ]);
        ProviderHost {
            ns,
            provider,
            underlay,
            veth: link.a,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_addresses() {
        assert_eq!(Provider::A.subnet(), "198.18.1.0/24");
        assert_eq!(Provider::B.gateway(), Ipv4Addr::new(198, 18, 2, 1));
        assert_eq!(Provider::B.letter(), 'b');
        assert_eq!(Provider(199).octet(), 200);
    }
}
