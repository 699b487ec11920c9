//! The interface's routes and workload addresses, kept equal to what is wanted: one set
//! reconciler for both, over a small trait of the four netlink calls it makes (a recording
//! fake in the tests).

use std::collections::BTreeSet;

use ipnet::IpNet;
use tracing::{info, warn};

use crate::platform::netlink::{route_plan, Netlink, NetlinkError};

/// The changes the agent makes to its interface's routes and addresses.
pub(super) trait InterfaceOps {
    /// Routes `net` through the interface (replacing a route already there).
    async fn add_route(&self, net: IpNet) -> Result<(), NetlinkError>;
    /// Removes the route to `net` through the interface; one already gone is not an error.
    async fn del_route(&self, net: IpNet) -> Result<(), NetlinkError>;
    /// Puts address `net` on the interface.
    async fn add_address(&self, net: IpNet) -> Result<(), NetlinkError>;
    /// Removes address `net` from the interface; one already gone is not an error.
    async fn del_address(&self, net: IpNet) -> Result<(), NetlinkError>;
}

impl InterfaceOps for Netlink {
    async fn add_route(&self, net: IpNet) -> Result<(), NetlinkError> {
        Netlink::add_route(self, net).await
    }
    async fn del_route(&self, net: IpNet) -> Result<(), NetlinkError> {
        Netlink::del_route(self, net).await
    }
    async fn add_address(&self, net: IpNet) -> Result<(), NetlinkError> {
        Netlink::add_address(self, net).await
    }
    async fn del_address(&self, net: IpNet) -> Result<(), NetlinkError> {
        Netlink::del_address(self, net).await
    }
}

/// Which of the interface's sets an [`Installed`] keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// Routes through the interface (peers' allowed IPs).
    Route,
    /// Workload addresses on the interface.
    Address,
}

impl Kind {
    async fn add(self, ops: &impl InterfaceOps, net: IpNet) -> Result<(), NetlinkError> {
        match self {
            Kind::Route => ops.add_route(net).await,
            Kind::Address => ops.add_address(net).await,
        }
    }

    async fn del(self, ops: &impl InterfaceOps, net: IpNet) -> Result<(), NetlinkError> {
        match self {
            Kind::Route => ops.del_route(net).await,
            Kind::Address => ops.del_address(net).await,
        }
    }
}

/// One of the interface's sets as this agent installed it.
#[derive(Debug)]
pub(super) struct Installed {
    kind: Kind,
    nets: BTreeSet<IpNet>,
}

impl Installed {
    /// Nothing installed yet.
    pub(super) fn new(kind: Kind) -> Self {
        Installed {
            kind,
            nets: BTreeSet::new(),
        }
    }

    /// What is installed.
    pub(super) fn nets(&self) -> &BTreeSet<IpNet> {
        &self.nets
    }

    /// Installs `wanted` at start-up, where a failure stops the start.
    ///
    /// # Errors
    /// The first change the interface refused.
    pub(super) async fn install(
        &mut self,
        ops: &impl InterfaceOps,
        wanted: &[IpNet],
    ) -> Result<(), NetlinkError> {
        let (add, _) = route_plan(&self.nets, wanted);
        for net in add {
            self.kind.add(ops, net).await?;
            self.nets.insert(net);
        }
        Ok(())
    }

    /// Makes the installed set `wanted` (prefixes truncated, default routes left out),
    /// touching only the difference: removals first, then additions. A refused removal is
    /// logged and forgotten (the interface keeps what it kept; the agent no longer claims
    /// it); a refused addition is logged and not counted as installed, so the next change
    /// that still wants it tries again.
    pub(super) async fn reconcile(&mut self, ops: &impl InterfaceOps, wanted: &[IpNet]) {
        let (add, del) = route_plan(&self.nets, wanted);
        for net in del {
            match self.kind.del(ops, net).await {
                Ok(()) if self.kind == Kind::Address => {
                    info!(address = %net, "workload address released");
                }
                Ok(()) => {}
                Err(e) => warn!("{e}"),
            }
            self.nets.remove(&net);
        }
        for net in add {
            match self.kind.add(ops, net).await {
                Ok(()) => {
                    if self.kind == Kind::Address {
                        info!(address = %net, "workload address held");
                    }
                    self.nets.insert(net);
                }
                Err(e) => warn!("{e}"),
            }
        }
    }

    /// Removes everything installed (at shutdown); refusals are only logged.
    pub(super) async fn remove_all(&mut self, ops: &impl InterfaceOps) {
        for net in std::mem::take(&mut self.nets) {
            if let Err(e) = self.kind.del(ops, net).await {
                tracing::debug!("{e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// An interface that records every change asked of it and refuses those in `refuse`.
    #[derive(Default)]
    struct Recording {
        calls: RefCell<Vec<String>>,
        refuse: RefCell<BTreeSet<String>>,
    }

    impl Recording {
        fn call(&self, what: &str, net: IpNet) -> Result<(), NetlinkError> {
            let call = format!("{what} {net}");
            self.calls.borrow_mut().push(call.clone());
            if self.refuse.borrow().contains(&call) {
                return Err(NetlinkError::Socket(std::io::Error::other(call)));
            }
            Ok(())
        }

        fn take(&self) -> Vec<String> {
            std::mem::take(&mut self.calls.borrow_mut())
        }
    }

    impl InterfaceOps for Recording {
        async fn add_route(&self, net: IpNet) -> Result<(), NetlinkError> {
            self.call("add route", net)
        }
        async fn del_route(&self, net: IpNet) -> Result<(), NetlinkError> {
            self.call("del route", net)
        }
        async fn add_address(&self, net: IpNet) -> Result<(), NetlinkError> {
            self.call("add address", net)
        }
        async fn del_address(&self, net: IpNet) -> Result<(), NetlinkError> {
            self.call("del address", net)
        }
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[tokio::test]
    async fn only_the_difference_is_changed_removals_first() {
        let ops = Recording::default();
        let mut routes = Installed::new(Kind::Route);
        routes
            .install(&ops, &nets(&["100.64.0.2/32", "10.2.0.0/24"]))
            .await
            .unwrap();
        assert_eq!(
            ops.take(),
            ["add route 10.2.0.0/24", "add route 100.64.0.2/32"]
        );
        // A host bit set is truncated; a default route is never taken over.
        routes
            .reconcile(&ops, &nets(&["100.64.0.2/32", "10.3.0.1/24", "0.0.0.0/0"]))
            .await;
        assert_eq!(
            ops.take(),
            ["del route 10.2.0.0/24", "add route 10.3.0.0/24"]
        );
        assert_eq!(
            routes.nets().iter().copied().collect::<Vec<_>>(),
            nets(&["10.3.0.0/24", "100.64.0.2/32"])
        );
        routes
            .reconcile(&ops, &nets(&["10.3.0.0/24", "100.64.0.2/32"]))
            .await;
        assert!(ops.take().is_empty(), "nothing changed, nothing asked");
        routes.remove_all(&ops).await;
        assert_eq!(
            ops.take(),
            ["del route 10.3.0.0/24", "del route 100.64.0.2/32"]
        );
        assert!(routes.nets().is_empty());
    }

    #[tokio::test]
    async fn a_refused_addition_is_not_installed_and_is_tried_again() {
        let ops = Recording::default();
        let mut addresses = Installed::new(Kind::Address);
        ops.refuse
            .borrow_mut()
            .insert("add address 100.64.50.10/32".into());
        addresses
            .reconcile(&ops, &nets(&["100.64.50.10/32", "100.64.50.11/32"]))
            .await;
        assert_eq!(
            ops.take(),
            ["add address 100.64.50.10/32", "add address 100.64.50.11/32"]
        );
        assert_eq!(
            addresses.nets().iter().copied().collect::<Vec<_>>(),
            nets(&["100.64.50.11/32"])
        );
        ops.refuse.borrow_mut().clear();
        addresses
            .reconcile(&ops, &nets(&["100.64.50.10/32", "100.64.50.11/32"]))
            .await;
        assert_eq!(ops.take(), ["add address 100.64.50.10/32"]);
    }

    #[tokio::test]
    async fn a_refused_removal_is_forgotten_and_a_start_stops_at_a_refusal() {
        let ops = Recording::default();
        let mut addresses = Installed::new(Kind::Address);
        addresses.reconcile(&ops, &nets(&["100.64.50.10/32"])).await;
        ops.take();
        ops.refuse
            .borrow_mut()
            .insert("del address 100.64.50.10/32".into());
        addresses.reconcile(&ops, &[]).await;
        assert_eq!(ops.take(), ["del address 100.64.50.10/32"]);
        assert!(addresses.nets().is_empty(), "not claimed any more");

        let mut routes = Installed::new(Kind::Route);
        ops.refuse
            .borrow_mut()
            .insert("add route 10.2.0.0/24".into());
        let refused = routes
            .install(&ops, &nets(&["10.2.0.0/24", "100.64.0.2/32"]))
            .await;
        assert!(refused.is_err());
        assert!(routes.nets().is_empty());
    }
}
