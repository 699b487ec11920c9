//! `fail_closed`: blackhole routes for the overlay prefixes that outlive the agent, so
//! overlay traffic never leaves in the clear while the agent is down.

use std::collections::BTreeSet;

use ipnet::IpNet;
use tracing::{info, warn};

use crate::platform::netlink::{self, route_plan};
use crate::settings::Settings;

use super::{wanted_routes, RunError};

/// The blackhole routes of `fail_closed` (see `platform::netlink`): the overlay's own prefixes
/// (`base`), and the tunnel's routes that they do not cover, kept as the routes change.
/// Never removed at exit: they are there for when the agent is down.
pub(super) struct FailClosed {
    pub(super) handle: rtnetlink::Handle,
    pub(super) base: Vec<IpNet>,
    pub(super) held: BTreeSet<IpNet>,
}

impl FailClosed {
    /// Makes the blackholes of `base` exist (`on`), or removes such routes an earlier run
    /// with `fail_closed` left for them (`!on`, so that turning the setting off works).
    /// Returns the blackholes kept, `None` when off.
    pub(super) async fn start(
        handle: rtnetlink::Handle,
        base: Vec<IpNet>,
        on: bool,
    ) -> Result<Option<FailClosed>, RunError> {
        let plan = netlink::blackhole_plan(&base, &BTreeSet::new());
        if !on {
            for net in plan {
                netlink::del_blackhole(&handle, net).await?;
            }
            return Ok(None);
        }
        for net in &plan {
            netlink::add_blackhole(&handle, *net).await?;
        }
        info!(
            prefixes = ?plan,
            metric = netlink::FAIL_CLOSED_METRIC,
            "fail_closed: blackhole routes for the overlay stay while the agent is down"
        );
        Ok(Some(FailClosed {
            handle,
            base,
            held: plan,
        }))
    }

    /// Follows the tunnel's routes (`routes`): a blackhole for each one the base does not
    /// cover, none for one that went.
    pub(super) async fn follow(&mut self, routes: &BTreeSet<IpNet>) {
        let want: Vec<IpNet> = netlink::blackhole_plan(&self.base, routes)
            .into_iter()
            .collect();
        let (add, del) = route_plan(&self.held, &want);
        for net in add {
            match netlink::add_blackhole(&self.handle, net).await {
                Ok(()) => {
                    self.held.insert(net);
                }
                Err(e) => warn!("fail_closed: {e}"),
            }
        }
        for net in del {
            if let Err(e) = netlink::del_blackhole(&self.handle, net).await {
                warn!("fail_closed: {e}");
            }
            self.held.remove(&net);
        }
    }
}

/// The overlay's own prefixes, which `fail_closed` blackholes: a joined node's network, or a
/// static node's allowed IPs as configured.
pub(super) fn overlay_prefixes(settings: &Settings, networks: Option<&[IpNet]>) -> Vec<IpNet> {
    match networks {
        Some(nets) => nets.iter().map(IpNet::trunc).collect(),
        None => wanted_routes(&settings.device),
    }
}
