//! Addresses, MTU, link state and routes of the tunnel interface, through rtnetlink.
//!
//! [`route_plan`] decides; [`Netlink`] applies. The agent installs one route per allowed IP
//! (except default routes, see [`route_plan`]) and removes exactly those on exit.
//!
//! With `fail_closed`, it also keeps blackhole routes for the overlay's prefixes
//! ([`blackhole_plan`], [`add_blackhole`]): marked with [`FAIL_CLOSED_PROTOCOL`], at metric
//! [`FAIL_CLOSED_METRIC`] so that the tunnel's routes win while it runs, and left in place when
//! it stops or crashes, so that overlay traffic never leaves through another route (the default
//! route, in the clear) while the agent is down.

use std::collections::BTreeSet;
use std::net::IpAddr;

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::route::{RouteMessage, RouteProtocol, RouteType};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// The routing protocol number that marks the agent's fail-closed blackhole routes
/// (`ip route` shows `proto 109`; 109 is in no registry of iproute2's `rt_protos`).
pub const FAIL_CLOSED_PROTOCOL: u8 = 109;

/// The metric of the fail-closed blackhole routes: above any route the agent (0, or 1024 for
/// IPv6) or an operator is likely to install for the same prefix, so that those win while they
/// exist, and the blackhole takes over when the tunnel's routes go with its interface.
pub const FAIL_CLOSED_METRIC: u32 = 4_000_000_000;

/// A netlink operation that failed, naming what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The netlink socket could not be opened.
    #[error("cannot open a netlink socket: {0}")]
    Socket(std::io::Error),
    /// The kernel refused an operation.
    #[error("{what}: {source}")]
    Kernel {
        /// The operation, e.g. "add route 10.0.0.0/24 dev mesh0".
        what: String,
        /// The kernel's answer.
        source: rtnetlink::Error,
    },
    /// The interface does not exist.
    #[error("interface {0} not found")]
    NoSuchInterface(String),
}

/// The routes to add and to remove to go from `installed` to the routes `wanted` asks for.
/// Default routes (`/0`) are left out: sending everything through the tunnel needs policy
/// routing so that the tunnel's own UDP packets do not loop, which this agent does not set up.
pub fn route_plan(installed: &BTreeSet<IpNet>, wanted: &[IpNet]) -> (Vec<IpNet>, Vec<IpNet>) {
    let want: BTreeSet<IpNet> = wanted
        .iter()
        .map(|n| n.trunc())
        .filter(|n| n.prefix_len() > 0)
        .collect();
    let add = want.difference(installed).copied().collect();
    let del = installed.difference(&want).copied().collect();
    (add, del)
}

/// The prefixes to keep blackhole routes for, given the overlay's own prefixes (`base`: a
/// joined node's network, or a static node's allowed IPs when it started) and the routes the
/// tunnel has now: the base, and each route that no base prefix covers (a peer's extra
/// prefix, a peer added at runtime). Default routes are left out, as in [`route_plan`].
pub fn blackhole_plan(base: &[IpNet], routes: &BTreeSet<IpNet>) -> BTreeSet<IpNet> {
    let base: BTreeSet<IpNet> = base
        .iter()
        .map(IpNet::trunc)
        .filter(|n| n.prefix_len() > 0)
        .collect();
    let uncovered = routes
        .iter()
        .map(IpNet::trunc)
        .filter(|r| r.prefix_len() > 0 && !base.iter().any(|b| b.contains(r)))
        .collect::<Vec<_>>();
    base.into_iter().chain(uncovered).collect()
}

/// The fail-closed blackhole route to `net`.
fn blackhole_message(net: IpNet) -> Result<RouteMessage, NetlinkError> {
    let b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(net.addr(), net.prefix_len())
        .map_err(|e| NetlinkError::Kernel {
            what: format!("blackhole {net}: {e}"),
            source: rtnetlink::Error::RequestFailed,
        })?;
    Ok(b.kind(RouteType::BlackHole)
        .protocol(RouteProtocol::Other(FAIL_CLOSED_PROTOCOL))
        .priority(FAIL_CLOSED_METRIC)
        .build())
}

/// Adds (or keeps) the fail-closed blackhole route to `net`.
///
/// # Errors
/// [`NetlinkError::Kernel`] when the kernel refuses it.
pub async fn add_blackhole(handle: &Handle, net: IpNet) -> Result<(), NetlinkError> {
    handle
        .route()
        .add(blackhole_message(net)?)
        .replace()
        .execute()
        .await
        .map_err(|source| NetlinkError::Kernel {
            what: format!("add route blackhole {net} metric {FAIL_CLOSED_METRIC}"),
            source,
        })
}

/// Removes the fail-closed blackhole route to `net` (only one of the agent's: same protocol,
/// metric and type); none there is not an error.
///
/// # Errors
/// [`NetlinkError::Kernel`] when the kernel refuses it.
pub async fn del_blackhole(handle: &Handle, net: IpNet) -> Result<(), NetlinkError> {
    match handle.route().del(blackhole_message(net)?).execute().await {
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => Ok(()),
        r => r.map_err(|source| NetlinkError::Kernel {
            what: format!("delete route blackhole {net} metric {FAIL_CLOSED_METRIC}"),
            source,
        }),
    }
}

/// A netlink session bound to one interface.
pub struct Netlink {
    handle: Handle,
    name: String,
    index: u32,
}

/// Opens a netlink session (spawning its connection on the current tokio runtime).
///
/// # Errors
/// [`NetlinkError::Socket`] when the socket cannot be opened.
pub fn connect() -> Result<Handle, NetlinkError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
    tokio::spawn(conn);
    Ok(handle)
}

/// The index of interface `name`, if it exists.
///
/// # Errors
/// [`NetlinkError::Kernel`] when the query fails for another reason than absence.
pub async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>, NetlinkError> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(Some(link.header.index)),
        Ok(None) => Ok(None),
        // The kernel answers ENODEV for a name it does not know.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(source) => Err(NetlinkError::Kernel {
            what: format!("look up interface {name}"),
            source,
        }),
    }
}

/// Every address of every interface of the host (its namespace's): the local addresses the
/// kernel would take as a packet's own source.
///
/// # Errors
/// [`NetlinkError::Kernel`] when the dump fails.
pub async fn host_addresses(handle: &Handle) -> Result<Vec<IpAddr>, NetlinkError> {
    use rtnetlink::packet_route::address::AddressAttribute;
    let mut dump = handle.address().get().execute();
    let mut out = Vec::new();
    loop {
        match dump.try_next().await {
            Ok(Some(msg)) => out.extend(msg.attributes.iter().filter_map(|a| match a {
                AddressAttribute::Address(ip) | AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            })),
            Ok(None) => break,
            Err(source) => {
                return Err(NetlinkError::Kernel {
                    what: "list the host's addresses".into(),
                    source,
                })
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

impl Netlink {
    /// The netlink session's handle.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// A session for the existing interface `name`.
    ///
    /// # Errors
    /// [`NetlinkError::NoSuchInterface`] if it does not exist.
    pub async fn for_interface(handle: Handle, name: &str) -> Result<Self, NetlinkError> {
        let index = link_index(&handle, name)
            .await?
            .ok_or_else(|| NetlinkError::NoSuchInterface(name.to_string()))?;
        Ok(Netlink {
            handle,
            name: name.to_string(),
            index,
        })
    }

    fn err(&self, what: String) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
        move |source| NetlinkError::Kernel { what, source }
    }

    /// Sets the MTU and the transmit queue length and brings the link up.
    pub async fn set_mtu_and_up(&self, mtu: u16, txqueuelen: u32) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(self.index)
            .mtu(u32::from(mtu))
            .txqueuelen(txqueuelen)
            .up()
            .build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(self.err(format!("set mtu {mtu} and up on {}", self.name)))
    }

    /// Adds an address with its prefix length (replacing an identical one). An IPv6 address
    /// skips duplicate address detection: the overlay's addresses are unique by construction,
    /// and a tentative address (1-2 s of it) could not be used.
    pub async fn add_address(&self, net: IpNet) -> Result<(), NetlinkError> {
        use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
        let mut request = self
            .handle
            .address()
            .add(self.index, net.addr(), net.prefix_len())
            .replace();
        if net.addr().is_ipv6() {
            request
                .message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        request
            .execute()
            .await
            .map_err(self.err(format!("add address {net} to {}", self.name)))
    }

    /// Removes an address from the interface; one already gone is not an error.
    pub async fn del_address(&self, net: IpNet) -> Result<(), NetlinkError> {
        use futures::TryStreamExt;
        let mut found = self
            .handle
            .address()
            .get()
            .set_link_index_filter(self.index)
            .set_address_filter(net.addr())
            .execute();
        while let Some(msg) = found
            .try_next()
            .await
            .map_err(self.err(format!("list addresses of {}", self.name)))?
        {
            match self.handle.address().del(msg).execute().await {
                Err(rtnetlink::Error::NetlinkError(e))
                    if e.raw_code() == -libc::EADDRNOTAVAIL || e.raw_code() == -libc::ENODEV => {}
                r => r.map_err(self.err(format!("delete address {net} from {}", self.name)))?,
            }
        }
        Ok(())
    }

    fn route_message(
        &self,
        net: IpNet,
    ) -> Result<rtnetlink::packet_route::route::RouteMessage, NetlinkError> {
        let b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(net.addr(), net.prefix_len())
            .map_err(|e| NetlinkError::Kernel {
                what: format!("route {net}: {e}"),
                source: rtnetlink::Error::RequestFailed,
            })?;
        Ok(b.output_interface(self.index).build())
    }

    /// Adds a route to `net` through the interface (replacing one that exists).
    pub async fn add_route(&self, net: IpNet) -> Result<(), NetlinkError> {
        let msg = self.route_message(net)?;
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(self.err(format!("add route {net} dev {}", self.name)))
    }

    /// Removes the route to `net` through the interface; one already gone is not an error.
    pub async fn del_route(&self, net: IpNet) -> Result<(), NetlinkError> {
        let msg = self.route_message(net)?;
        match self.handle.route().del(msg).execute().await {
            Err(rtnetlink::Error::NetlinkError(e))
                if e.raw_code() == -libc::ESRCH || e.raw_code() == -libc::ENODEV =>
            {
                Ok(())
            }
            r => r.map_err(self.err(format!("delete route {net} dev {}", self.name))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(v: &[&str]) -> Vec<IpNet> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    /// The host's addresses come from the kernel's dump: loopback's among them, each once.
    #[tokio::test]
    async fn the_hosts_addresses_include_loopback() {
        let handle = connect().unwrap();
        let all = host_addresses(&handle).await.unwrap();
        assert!(
            all.contains(&IpAddr::from([127, 0, 0, 1])),
            "127.0.0.1 not among {all:?}"
        );
        let mut unique = all.clone();
        unique.dedup();
        assert_eq!(unique, all);
    }

    #[test]
    fn plan_adds_and_removes_only_the_difference() {
        let installed: BTreeSet<IpNet> = nets(&["100.64.0.2/32", "10.0.0.0/24"])
            .into_iter()
            .collect();
        let (add, del) = route_plan(
            &installed,
            &nets(&[
                "100.64.0.2/32",
                "100.64.0.3/32",
                "0.0.0.0/0",
                "::/0",
                "fd00::1/128",
            ]),
        );
        assert_eq!(add, nets(&["100.64.0.3/32", "fd00::1/128"]));
        assert_eq!(del, nets(&["10.0.0.0/24"]));
    }

    #[test]
    fn blackholes_cover_the_base_and_what_it_does_not() {
        let routes: BTreeSet<IpNet> = nets(&[
            "100.64.0.2/32",
            "100.64.7.0/24",
            "10.20.0.0/16",
            "fd00::2/128",
            "0.0.0.0/0",
        ])
        .into_iter()
        .collect();
        // A joined node: its network, plus a peer's prefix outside it.
        let plan = blackhole_plan(&nets(&["100.64.0.9/16"]), &routes);
        assert_eq!(
            plan.into_iter().collect::<Vec<_>>(),
            nets(&["10.20.0.0/16", "100.64.0.0/16", "fd00::2/128"])
        );
        // A static node: its allowed IPs at start, plus one added later.
        let base = nets(&["100.64.0.2/32", "100.64.7.0/24", "::/0"]);
        let plan = blackhole_plan(&base, &routes);
        assert_eq!(
            plan.into_iter().collect::<Vec<_>>(),
            nets(&[
                "10.20.0.0/16",
                "100.64.0.2/32",
                "100.64.7.0/24",
                "fd00::2/128"
            ])
        );
        assert!(blackhole_plan(&[], &BTreeSet::new()).is_empty());
    }

    #[test]
    fn plan_normalizes_host_bits() {
        let installed: BTreeSet<IpNet> = nets(&["10.0.0.0/24"]).into_iter().collect();
        let (add, del) = route_plan(&installed, &nets(&["10.0.0.9/24"]));
        assert!(add.is_empty() && del.is_empty());
    }
}
