//! The mesh reconciler: keeps the device's peers, firewall, workload routing and workload
//! addresses equal to what the trusted map and the fencing state ask for.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ipnet::IpNet;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::control::peers::EndpointChooser;
use crate::control::sleep_until;
use crate::control::workloads::Shared;
use crate::dataplane::{CompiledPolicy, FirewallConfig, GatewayConfig, WorkloadRouting};
use crate::metrics::AgentMetrics;
use crate::settings::PeerConfig;
use crate::uapi::UapiHandler;
use meshlink_proto::policy::visible_peers;
use meshlink_proto::workload::{Forward, Held, Holdings, Relay, Senders};
use meshlink_proto::{Netmap, NodeId, Policy, PublicKey};

use super::handle::Control;
use super::{NetCmd, RunError};

/// How long a released workload address stays on the interface after packets for it are
/// forwarded to the new holder: new packets no longer reach local programs, but answers they
/// are writing at that instant still leave from it instead of failing.
pub(super) const RELEASE_LINGER: Duration = Duration::from_millis(20);

/// What of a map the compiled policy depends on: the policy, and the nodes and workloads
/// without what changes often and no selector names (endpoints, labels, holders). A map that
/// differs from the last compiled one only elsewhere is not compiled again.
pub(super) fn policy_inputs(map: &Netmap) -> Netmap {
    Netmap {
        version: 0,
        peers: map
            .peers
            .iter()
            .map(|(id, p)| {
                let mut p = p.clone();
                p.endpoints.clear();
                p.labels.clear();
                (*id, p)
            })
            .collect(),
        workloads: map
            .workloads
            .iter()
            .map(|(name, w)| {
                let mut w = w.clone();
                w.holder = None;
                w.previous = None;
                w.generation = 0;
                w.candidates.clear();
                w.grace_ms = None;
                (name.clone(), w)
            })
            .collect(),
        policy: map.policy.clone(),
    }
}

/// The destinations a mesh node accepts decrypted packets for: its own addresses (in the map
/// and on the interface), the prefixes the map routes to it, and the workload addresses it
/// holds or is being prepared for (`workloads`).
pub(super) fn local_destinations(
    map: &Netmap,
    self_id: NodeId,
    interface: &[IpNet],
    workloads: impl IntoIterator<Item = IpNet>,
) -> Vec<IpNet> {
    let host = |a: &IpNet| IpNet::from(a.addr());
    let mut local: Vec<IpNet> = interface.iter().map(host).collect();
    if let Some(me) = map.peers.get(&self_id) {
        local.extend(me.addresses.iter().map(host));
        local.extend(me.routed());
    }
    local.extend(workloads);
    local.sort();
    local.dedup();
    local
}

/// What the fencing state says this node holds, forwards, awaits and accepts at one instant
/// (see `Holdings`): what the reconciler reads of the control session.
#[derive(Debug, Default)]
pub(super) struct HoldingsNow {
    pub(super) held: Vec<Held>,
    pub(super) forwards: Vec<Forward>,
    pub(super) tentative: Vec<IpNet>,
    pub(super) awaited: Vec<IpNet>,
    pub(super) senders: Vec<Senders>,
    pub(super) relays: Vec<Relay>,
}

impl HoldingsNow {
    /// `h` at `now`, each workload's IPv6 address (in `map`) beside its address: fencing
    /// decides per workload, keyed by its (IPv4) address, and the IPv6 address goes with it.
    pub(super) fn of(h: &mut Holdings, map: &Netmap, now: Instant) -> Self {
        let mut now_ = HoldingsNow {
            held: h.held(now),
            forwards: h.forwards(now),
            tentative: h.tentative(now),
            awaited: h.awaited(now),
            senders: h.senders(now),
            relays: h.relays(now),
        };
        let twins: HashMap<IpAddr, IpNet> = map
            .workloads
            .values()
            .filter_map(|w| Some((w.ip(), w.address6?)))
            .collect();
        if !twins.is_empty() {
            now_.add_twins(&twins);
        }
        now_
    }

    /// Adds, after each entry for a workload address with an IPv6 twin, the same for the twin.
    fn add_twins(&mut self, twins: &HashMap<IpAddr, IpNet>) {
        let twin = |a: IpAddr| twins.get(&a).copied();
        let held: Vec<Held> = self
            .held
            .iter()
            .filter_map(|h| {
                Some(Held {
                    address: twin(h.address.addr())?,
                    ..*h
                })
            })
            .collect();
        self.held.extend(held);
        let forwards: Vec<Forward> = self
            .forwards
            .iter()
            .filter_map(|f| {
                Some(Forward {
                    address: twin(f.address)?.addr(),
                    ..*f
                })
            })
            .collect();
        self.forwards.extend(forwards);
        for list in [&mut self.tentative, &mut self.awaited] {
            let more: Vec<IpNet> = list.iter().filter_map(|a| twin(a.addr())).collect();
            list.extend(more);
        }
        let senders: Vec<Senders> = self
            .senders
            .iter()
            .filter_map(|s| {
                Some(Senders {
                    address: twin(s.address)?.addr(),
                    nodes: s.nodes.clone(),
                })
            })
            .collect();
        self.senders.extend(senders);
        let relays: Vec<Relay> = self
            .relays
            .iter()
            .filter_map(|r| {
                Some(Relay {
                    address: twin(r.address)?.addr(),
                    ..*r
                })
            })
            .collect();
        self.relays.extend(relays);
    }
}

/// What the device and the interface are to be after one pass, in the order the shell applies
/// it: the firewall first (a policy takes effect before the peers it admits, and goes on
/// cutting what it denies until the peers it hides are gone), then the workload routing
/// (forwarding before addresses: a released address is never left unanswered), the key
/// aliases of the old and the new peers, the peers, the new peers' aliases alone, and last
/// the workload addresses on the interface.
#[derive(Debug)]
pub(super) struct Plan {
    pub(super) firewall: FirewallConfig,
    /// The external nodes this node is the gateway of, and their policy.
    pub(super) gateway: GatewayConfig,
    pub(super) routing: WorkloadRouting,
    /// Peers' next keys as aliases while the peers change: those of the peers before and
    /// after (see `control::keys`).
    pub(super) aliases_during: HashMap<PublicKey, PublicKey>,
    pub(super) peers: Vec<PeerConfig>,
    /// The aliases once the peers are set.
    pub(super) aliases: HashMap<PublicKey, PublicKey>,
    /// Every workload address wanted on the interface, when that changed since the last pass.
    pub(super) addresses: Option<Vec<IpNet>>,
}

/// A policy compiled for some nodes of a map, and what of the map it was compiled from:
/// compiled again only when what it reads ([`policy_inputs`]) or the nodes changed.
#[derive(Debug)]
struct Compiled {
    from: Netmap,
    nodes: Vec<NodeId>,
    table: Arc<CompiledPolicy>,
}

impl Compiled {
    /// The table for `nodes` of `map` (`inputs` its [`policy_inputs`]): `slot`'s, or compiled
    /// now and kept there.
    fn get(
        slot: &mut Option<Compiled>,
        policy: &Policy,
        map: &Netmap,
        inputs: &Netmap,
        nodes: &[NodeId],
    ) -> Arc<CompiledPolicy> {
        if let Some(c) = slot.as_ref() {
            if c.from == *inputs && c.nodes == nodes {
                return c.table.clone();
            }
        }
        let table = Arc::new(CompiledPolicy::compile_for(policy, map, nodes));
        debug!(
            version = policy.version,
            rules = policy.rules.len(),
            nodes = nodes.len(),
            "policy compiled"
        );
        *slot = Some(Compiled {
            from: inputs.clone(),
            nodes: nodes.to_vec(),
            table: table.clone(),
        });
        table
    }
}

/// The reconciler's decisions, given the map, the fencing state, the peers' chosen endpoints
/// and the time: no I/O (the shell, [`reconcile_mesh`], reads the inputs and applies the
/// [`Plan`]). It remembers the compiled policy and what it read, the aliases and the
/// workload addresses of the last pass, and the released addresses that linger.
#[derive(Debug)]
pub(super) struct Planner {
    /// This node.
    self_id: NodeId,
    /// The addresses on its interface.
    interface: Vec<IpNet>,
    /// The policy compiled for this node.
    compiled: Option<Compiled>,
    /// The policy compiled for the external nodes this node is the gateway of.
    compiled_served: Option<Compiled>,
    /// Peers' next keys configured as aliases, as last planned.
    aliases: HashMap<PublicKey, PublicKey>,
    /// The workload addresses last planned on the interface.
    addresses: Vec<IpNet>,
    /// Addresses released after a move, kept until then (see [`RELEASE_LINGER`]).
    releasing: HashMap<IpNet, Instant>,
}

impl Planner {
    /// The planner of node `self_id` with `interface` addresses.
    pub(super) fn new(self_id: NodeId, interface: Vec<IpNet>) -> Self {
        Planner {
            self_id,
            interface,
            compiled: None,
            compiled_served: None,
            aliases: HashMap::new(),
            addresses: Vec::new(),
            releasing: HashMap::new(),
        }
    }

    /// When a lingering address is next due to go (a pass is needed then).
    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        self.releasing.values().min().copied()
    }

    /// One pass: `peers` as the endpoint chooser made them from `map`, `discovered` the path
    /// discovery's endpoint for a peer (a direct path or the relay's shim), `holdings` the
    /// fencing state at `now`.
    pub(super) fn plan(
        &mut self,
        map: &Netmap,
        mut peers: Vec<PeerConfig>,
        discovered: impl Fn(&PublicKey) -> Option<SocketAddr>,
        holdings: HoldingsNow,
        now: Instant,
    ) -> Plan {
        // Need to know: only the peers the policy ever lets this node exchange packets with
        // (every peer without a policy). The same rule whichever of map and policy came
        // first: both are read from this one map.
        let self_id = self.self_id;
        let visible = visible_peers(map.policy.as_ref(), map, self_id);
        let visible_keys: HashSet<PublicKey> = map
            .peers
            .values()
            .filter(|p| visible.contains(&p.node_id))
            .map(|p| p.public_key)
            .collect();
        peers.retain(|p| visible_keys.contains(&p.public_key));
        for p in &mut peers {
            if let Some(ep) = discovered(&p.public_key) {
                p.endpoint = Some(ep);
            }
        }
        let HoldingsNow {
            held,
            forwards,
            tentative,
            awaited,
            senders,
            relays,
        } = holdings;
        let tentative: Vec<IpNet> = tentative
            .into_iter()
            .filter(|t| !held.iter().any(|h| h.address == *t))
            .collect();
        let key_of: HashMap<NodeId, PublicKey> = map
            .peers
            .values()
            .map(|p| (p.node_id, p.public_key))
            .collect();
        let keys = |nodes: &[NodeId]| -> Vec<PublicKey> {
            nodes
                .iter()
                .filter_map(|n| key_of.get(n).copied())
                .collect()
        };
        let routing = WorkloadRouting {
            forward: forwards
                .iter()
                .filter_map(|f| Some((f.address, *key_of.get(&f.to)?)))
                .collect(),
            also_from: senders
                .iter()
                .map(|s| (s.address, keys(&s.nodes)))
                .collect(),
            relay_from: relays
                .iter()
                .filter_map(|r| Some((r.address, *key_of.get(&r.from)?)))
                .collect(),
            awaited: awaited.iter().map(IpNet::addr).collect(),
            held: held.iter().map(|h| h.address.addr()).collect(),
            workloads: map
                .workloads
                .values()
                .flat_map(|w| w.addresses().map(|a| a.addr()))
                .collect(),
            // What a relay may pass on: packets from nodes' own addresses, not from the
            // prefixes they route for others.
            relay_sources: if relays.is_empty() {
                HashSet::new()
            } else {
                map.peers
                    .values()
                    .filter(|p| p.node_id != self_id)
                    .flat_map(|p| &p.addresses)
                    .filter(|a| a.prefix_len() == a.max_prefix_len())
                    .map(IpNet::addr)
                    .collect()
            },
        };
        let local = local_destinations(
            map,
            self_id,
            &self.interface,
            held.iter()
                .map(|h| h.address)
                .chain(tentative.iter().copied()),
        );
        // What the policy tables read of the map, taken once for both.
        let inputs = map.policy.as_ref().map(|_| policy_inputs(map));
        let firewall = FirewallConfig {
            local: Some(local),
            policy: self.policy(map, self_id, inputs.as_ref()),
        };
        let gateway = self.gateway(map, self_id, inputs.as_ref());
        // Rotating peers: their next keys as aliases, set before the peers that use them and
        // kept until the peers that no longer do are gone.
        let aliases = crate::control::keys::alias_peers(map, &mut peers);
        let mut aliases_during = self.aliases.clone();
        aliases_during.extend(aliases.iter().map(|(k, v)| (*k, *v)));
        self.aliases = aliases.clone();
        Plan {
            firewall,
            gateway,
            routing,
            aliases_during,
            peers,
            aliases,
            addresses: self.addresses(&held, tentative, &forwards, now),
        }
    }

    /// The external nodes this node is the gateway of in `map`, and the policy compiled for
    /// them (`inputs`: [`policy_inputs`] of `map`, when it has a policy).
    fn gateway(&mut self, map: &Netmap, self_id: NodeId, inputs: Option<&Netmap>) -> GatewayConfig {
        let served: Vec<&meshlink_proto::PeerInfo> = map.externals_via(self_id).collect();
        let ids: Vec<NodeId> = served.iter().map(|p| p.node_id).collect();
        let policy = match (&map.policy, inputs) {
            (Some(policy), Some(inputs)) if !ids.is_empty() => Some(Compiled::get(
                &mut self.compiled_served,
                policy,
                map,
                inputs,
                &ids,
            )),
            _ => {
                self.compiled_served = None;
                None
            }
        };
        GatewayConfig {
            served: served
                .iter()
                .flat_map(|p| std::iter::once(p.public_key).chain(p.next_key))
                .collect(),
            policy,
        }
    }

    /// The policy compiled for this node from `map` (`inputs`: [`policy_inputs`] of `map`,
    /// when it has a policy).
    fn policy(
        &mut self,
        map: &Netmap,
        self_id: NodeId,
        inputs: Option<&Netmap>,
    ) -> Option<Arc<CompiledPolicy>> {
        let (Some(policy), Some(inputs)) = (&map.policy, inputs) else {
            self.compiled = None;
            return None;
        };
        Some(Compiled::get(
            &mut self.compiled,
            policy,
            map,
            inputs,
            &[self_id],
        ))
    }

    /// The workload addresses wanted on the interface (held, tentative, and those released
    /// to a forward that linger), when they differ from the last pass's.
    fn addresses(
        &mut self,
        held: &[Held],
        tentative: Vec<IpNet>,
        forwards: &[Forward],
        now: Instant,
    ) -> Option<Vec<IpNet>> {
        let mut wanted: Vec<IpNet> = held.iter().map(|h| h.address).chain(tentative).collect();
        for gone in self.addresses.iter().filter(|a| !wanted.contains(a)) {
            if forwards.iter().any(|f| f.address == gone.addr()) {
                self.releasing.entry(*gone).or_insert(now + RELEASE_LINGER);
            }
        }
        self.releasing
            .retain(|a, until| now < *until && !wanted.contains(a));
        wanted.extend(self.releasing.keys().copied());
        wanted.sort();
        wanted.dedup();
        if wanted == self.addresses {
            return None;
        }
        self.addresses = wanted.clone();
        Some(wanted)
    }
}

/// How soon the reconciler looks again at a held address not up on the interface yet, to
/// tell applications registered for live migration that it arrived.
const ARRIVAL_RECHECK: Duration = Duration::from_millis(2);

/// How long the reconciler looks again that often.
const ARRIVAL_WAIT: Duration = Duration::from_secs(1);

/// Keeps the device's peers equal to the latest network map, touching only what changed, and
/// moves silent peers to their next endpoint. Workload addresses: routed to their holders,
/// held here while the fencing state says so, forwarded after a move for the grace period.
/// The decisions are the [`Planner`]'s; this shell reads its inputs (the map, the fencing
/// state, the endpoint chooser and path discovery) and applies its [`Plan`] to the device,
/// queueing the interface's changes for the main loop. Each pass's duration goes to
/// `metrics` when they are served.
pub(super) async fn reconcile_mesh(
    control: Arc<Control>,
    self_id: NodeId,
    mut maps: watch::Receiver<Netmap>,
    shared: Arc<Shared>,
    metrics: Option<Arc<AgentMetrics>>,
) -> Result<(), RunError> {
    let mut chooser = EndpointChooser::new();
    let mut planner = Planner::new(self_id, control.addresses.clone());
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    maps.mark_changed();
    let mut control_gone = false;
    // When to tell registered applications again of addresses held but not up yet.
    let mut arrivals_due: Option<Instant> = None;
    let mut waiting_since: Option<Instant> = None;
    loop {
        // Only instants still ahead: a lease that ran out is no timer (it would wake this
        // loop over and over until the map changes).
        let wake = [
            shared.lock().holdings().poll_timeout(Instant::now()),
            planner.poll_timeout(),
            arrivals_due,
        ]
        .into_iter()
        .flatten()
        .min();
        tokio::select! {
            r = maps.changed(), if !control_gone => {
                if r.is_err() {
                    // The control loop ended; it reports why.
                    control_gone = true;
                    continue;
                }
            }
            () = shared.changed.notified() => {}
            () = sleep_until(wake) => {}
            _ = tick.tick() => {
                let map = maps.borrow().clone();
                let status = control.device.status(SystemTime::now());
                if !chooser.rotate_silent(&map, &status.peers, Instant::now()) {
                    continue;
                }
            }
        }
        let map = maps.borrow_and_update().clone();
        let now = Instant::now();
        let peers = chooser.peers(&map, self_id, now);
        let holdings = HoldingsNow::of(shared.lock().holdings_mut(), &map, now);
        let plan = planner.plan(
            &map,
            peers,
            |key| control.discovery.as_ref()?.endpoint(key),
            holdings,
            now,
        );
        control.device.set_firewall(plan.firewall);
        control.device.set_workload_routing(plan.routing);
        if control.device.has_released() {
            // An address already up became held: its kept packets go out now.
            let _ = control.routes_tx.send(NetCmd::Release);
        }
        control.device.set_key_aliases(plan.aliases_during);
        let mut config = control.device.config();
        if config.peers != plan.peers {
            debug!(
                version = map.version,
                peers = plan.peers.len(),
                "applying network map"
            );
            config.peers = plan.peers;
            if let Err(e) = control.apply(config) {
                warn!("applying the network map: {e}");
            }
        }
        control.device.set_key_aliases(plan.aliases);
        control.device.set_gateway(plan.gateway);
        if let Some(addresses) = plan.addresses {
            let _ = control.routes_tx.send(NetCmd::Addresses(addresses));
        }
        // Applications registered for live migration hear of holders and of this node
        // starting or stopping to answer: starting once the address is on the interface (a
        // connection made live before would answer from an address the kernel does not
        // have yet); until then, look again shortly.
        let mut held = shared.lock().holdings().held_named(now);
        let before = held.len();
        held.retain(|_, h| control.device.is_up(h.address.addr()));
        if held.len() < before {
            // For a second at most: an address that does not come up is no reason to spin.
            let since = *waiting_since.get_or_insert(now);
            arrivals_due = (now < since + ARRIVAL_WAIT).then(|| now + ARRIVAL_RECHECK);
        } else {
            waiting_since = None;
            arrivals_due = None;
        }
        shared.handovers.observe(&map, self_id, &held);
        if let Some(m) = &metrics {
            m.observe_reconcile(now.elapsed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: NodeId, addr: &str, extra: &[&str], tags: &[&str]) -> meshlink_proto::PeerInfo {
        let own: IpNet = addr.parse().unwrap();
        meshlink_proto::PeerInfo {
            node_id: id,
            name: format!("n{id}"),
            public_key: meshlink_proto::PublicKey([id as u8; 32]),
            next_key: None,
            addresses: vec![own],
            allowed_ips: std::iter::once(own)
                .chain(extra.iter().map(|n| n.parse().unwrap()))
                .collect(),
            endpoints: vec!["198.18.0.1:51820".parse().unwrap()],
            labels: Default::default(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            via: None,
        }
    }

    #[test]
    fn local_destinations_are_own_addresses_routed_prefixes_and_workloads_held() {
        let mut map = Netmap::default();
        map.peers
            .insert(1, peer(1, "100.64.0.1/32", &["10.1.0.0/24"], &[]));
        map.peers
            .insert(2, peer(2, "100.64.0.2/32", &["10.2.0.0/24"], &[]));
        let local = local_destinations(
            &map,
            1,
            &["100.64.0.1/10".parse().unwrap()],
            ["100.64.50.10/32".parse().unwrap()],
        );
        let want: Vec<IpNet> = ["10.1.0.0/24", "100.64.0.1/32", "100.64.50.10/32"]
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        assert_eq!(
            local, want,
            "the interface's /10 counts as its address only"
        );
    }

    #[test]
    fn the_policy_is_compiled_again_only_when_what_it_reads_changes() {
        let mut map = Netmap::default();
        map.peers.insert(1, peer(1, "100.64.0.1/32", &[], &[]));
        map.peers.insert(2, peer(2, "100.64.0.2/32", &[], &["web"]));
        let before = policy_inputs(&map);
        let mut moved = map.clone();
        moved.version += 1;
        moved.peers.get_mut(&2).unwrap().endpoints = vec!["198.18.0.9:1".parse().unwrap()];
        assert_eq!(policy_inputs(&moved), before, "an endpoint changed");
        let mut tagged = map.clone();
        tagged.peers.get_mut(&2).unwrap().tags.push("db".into());
        assert_ne!(policy_inputs(&tagged), before, "a tag changed");
        let mut with_policy = map.clone();
        with_policy.policy = Some(meshlink_proto::Policy {
            version: 1,
            rules: Vec::new(),
        });
        assert_ne!(policy_inputs(&with_policy), before, "a policy arrived");
    }

    /// Nodes 1 (this one, tag `a`), 2 (tag `b`) and 3 (tag `c`).
    fn three_nodes() -> Netmap {
        let mut map = Netmap::default();
        map.peers.insert(1, peer(1, "100.64.0.1/32", &[], &["a"]));
        map.peers.insert(2, peer(2, "100.64.0.2/32", &[], &["b"]));
        map.peers
            .insert(3, peer(3, "100.64.0.3/32", &["10.3.0.0/24"], &["c"]));
        map
    }

    fn with_policy(mut map: Netmap, text: &str) -> Netmap {
        map.policy = Some(meshlink_proto::Policy {
            version: 1,
            rules: meshlink_proto::policy::parse(text).unwrap().rules,
        });
        map
    }

    fn chosen(map: &Netmap, now: Instant) -> Vec<PeerConfig> {
        EndpointChooser::new().peers(map, 1, now)
    }

    fn keys(peers: &[PeerConfig]) -> Vec<PublicKey> {
        peers.iter().map(|p| p.public_key).collect()
    }

    fn held(address: &str) -> Held {
        Held {
            address: address.parse().unwrap(),
            generation: 1,
        }
    }

    #[test]
    fn a_plan_keeps_the_peers_the_policy_lets_this_node_reach_with_their_discovered_paths() {
        let now = Instant::now();
        let interface: Vec<IpNet> = vec!["100.64.0.1/10".parse().unwrap()];
        let map = three_nodes();
        let mut planner = Planner::new(1, interface);
        let open = planner.plan(
            &map,
            chosen(&map, now),
            |_| None,
            HoldingsNow::default(),
            now,
        );
        assert_eq!(
            keys(&open.peers),
            vec![PublicKey([2; 32]), PublicKey([3; 32])],
            "no policy: every other node"
        );
        assert!(open.firewall.policy.is_none());

        let map = with_policy(
            map,
            "[[rule]]\nfrom = [\"tag:a\"]\nto = [\"tag:b\"]\nports = [\"tcp:22\"]\n",
        );
        let relay: SocketAddr = "127.0.0.1:40001".parse().unwrap();
        let plan = planner.plan(
            &map,
            chosen(&map, now),
            |k| (*k == PublicKey([2; 32])).then_some(relay),
            HoldingsNow::default(),
            now,
        );
        assert_eq!(keys(&plan.peers), vec![PublicKey([2; 32])], "need to know");
        assert_eq!(plan.peers[0].endpoint, Some(relay), "the discovered path");
        assert!(plan.firewall.policy.is_some());
        assert_eq!(
            plan.firewall.local.as_deref(),
            Some(&["100.64.0.1/32".parse::<IpNet>().unwrap()][..])
        );
        assert_eq!(plan.addresses, None, "no workload address, as before");
    }

    #[test]
    fn a_workloads_ipv6_address_goes_with_its_address() {
        let twins: HashMap<IpAddr, IpNet> = [(
            "100.64.50.10".parse().unwrap(),
            "fd7a:1:2::6440:320a/128".parse().unwrap(),
        )]
        .into_iter()
        .collect();
        let t0 = Instant::now();
        let mut h = HoldingsNow {
            held: vec![held("100.64.50.10/32"), held("100.64.50.11/32")],
            forwards: vec![Forward {
                address: "100.64.50.10".parse().unwrap(),
                to: 3,
                until: t0,
            }],
            tentative: vec!["100.64.50.10/32".parse().unwrap()],
            awaited: vec![],
            senders: vec![Senders {
                address: "100.64.50.10".parse().unwrap(),
                nodes: vec![2],
            }],
            relays: vec![Relay {
                address: "100.64.50.10".parse().unwrap(),
                from: 2,
            }],
        };
        h.add_twins(&twins);
        let v6: IpNet = "fd7a:1:2::6440:320a/128".parse().unwrap();
        assert_eq!(h.held.len(), 3, "the twin of .10 only");
        assert_eq!(h.held[2].address, v6);
        assert_eq!(h.forwards[1].address, v6.addr());
        assert_eq!(h.forwards[1].to, 3);
        assert_eq!(h.tentative, vec!["100.64.50.10/32".parse().unwrap(), v6]);
        assert!(h.awaited.is_empty());
        assert_eq!(h.senders[1].address, v6.addr());
        assert_eq!(h.senders[1].nodes, vec![2]);
        assert_eq!(h.relays[1].address, v6.addr());
        // The plan: both on the interface, both local.
        let mut map = three_nodes();
        let mut w = meshlink_proto::WorkloadInfo {
            id: 1,
            name: "web".into(),
            address: "100.64.50.10/32".parse().unwrap(),
            address6: Some(v6),
            holder: Some(1),
            generation: 1,
            previous: None,
            candidates: vec![1],
            grace_ms: None,
            tags: vec![],
        };
        map.workloads.insert(w.name.clone(), w.clone());
        let mut planner = Planner::new(1, vec!["100.64.0.1/10".parse().unwrap()]);
        let held_now = HoldingsNow {
            held: vec![
                held("100.64.50.10/32"),
                Held {
                    address: v6,
                    generation: 1,
                },
            ],
            ..HoldingsNow::default()
        };
        let plan = planner.plan(&map, chosen(&map, t0), |_| None, held_now, t0);
        let local = plan.firewall.local.unwrap();
        assert!(local.contains(&v6), "{local:?}");
        assert!(plan.routing.held.contains(&v6.addr()));
        assert!(plan.routing.workloads.contains(&v6.addr()));
        let on = plan.addresses.unwrap();
        assert!(on.contains(&v6) && on.contains(&"100.64.50.10/32".parse().unwrap()));
        w.address6 = None;
        assert_eq!(w.addresses().count(), 1);
    }

    #[test]
    fn a_policy_is_compiled_once_per_change_of_what_it_reads() {
        let now = Instant::now();
        let map = with_policy(
            three_nodes(),
            "[[rule]]\nfrom = [\"tag:a\"]\nto = [\"tag:b\"]\nports = [\"icmp\"]\n",
        );
        let mut planner = Planner::new(1, Vec::new());
        let mut pass = |map: &Netmap| {
            planner
                .plan(map, chosen(map, now), |_| None, HoldingsNow::default(), now)
                .firewall
                .policy
                .unwrap()
        };
        let first = pass(&map);
        let mut moved = map.clone();
        moved.version += 1;
        moved.peers.get_mut(&2).unwrap().endpoints = vec!["198.18.0.9:1".parse().unwrap()];
        assert!(
            Arc::ptr_eq(&first, &pass(&moved)),
            "an endpoint changed only"
        );
        let mut tagged = map.clone();
        tagged.peers.get_mut(&3).unwrap().tags.push("b".into());
        assert!(!Arc::ptr_eq(&first, &pass(&tagged)), "a tag changed");
    }

    #[test]
    fn a_released_address_lingers_after_its_forward_starts_then_goes() {
        let t0 = Instant::now();
        let map = three_nodes();
        let mut planner = Planner::new(1, Vec::new());
        let mut pass = |holdings: HoldingsNow, now: Instant| {
            planner.plan(&map, chosen(&map, now), |_| None, holdings, now)
        };
        let chat: IpNet = "100.64.50.10/32".parse().unwrap();
        let first = pass(
            HoldingsNow {
                held: vec![held("100.64.50.10/32")],
                ..HoldingsNow::default()
            },
            t0,
        );
        assert_eq!(first.addresses, Some(vec![chat]));
        assert!(first.routing.held.contains(&chat.addr()));
        assert!(first
            .firewall
            .local
            .as_ref()
            .is_some_and(|l| l.contains(&chat)));
        // Moved to node 2: forwarded there, and still on the interface for the linger.
        let forward = Forward {
            address: chat.addr(),
            to: 2,
            until: t0 + Duration::from_secs(5),
        };
        let moved = pass(
            HoldingsNow {
                forwards: vec![forward],
                ..HoldingsNow::default()
            },
            t0,
        );
        assert_eq!(moved.addresses, None, "kept for the linger");
        assert_eq!(
            moved.routing.forward.get(&chat.addr()),
            Some(&PublicKey([2; 32]))
        );
        assert_eq!(planner.poll_timeout(), Some(t0 + RELEASE_LINGER));
        let later = t0 + RELEASE_LINGER;
        let gone = planner.plan(
            &map,
            chosen(&map, later),
            |_| None,
            HoldingsNow {
                forwards: vec![forward],
                ..HoldingsNow::default()
            },
            later,
        );
        assert_eq!(
            gone.addresses,
            Some(Vec::new()),
            "gone once the linger ended"
        );
        assert_eq!(planner.poll_timeout(), None);
    }

    #[test]
    fn a_released_address_not_forwarded_goes_at_once_and_a_tentative_one_comes() {
        let now = Instant::now();
        let map = three_nodes();
        let mut planner = Planner::new(1, Vec::new());
        let mut pass =
            |holdings: HoldingsNow| planner.plan(&map, chosen(&map, now), |_| None, holdings, now);
        pass(HoldingsNow {
            held: vec![held("100.64.50.10/32")],
            ..HoldingsNow::default()
        });
        let next = pass(HoldingsNow {
            tentative: vec!["100.64.50.11/32".parse().unwrap()],
            ..HoldingsNow::default()
        });
        assert_eq!(
            next.addresses,
            Some(vec!["100.64.50.11/32".parse().unwrap()]),
            "a detach lets go at once; a prepared move's address comes up ahead"
        );
    }

    #[test]
    fn a_rotating_peers_next_key_is_an_alias_until_no_peer_uses_it() {
        let now = Instant::now();
        let mut map = three_nodes();
        map.peers.get_mut(&2).unwrap().next_key = Some(PublicKey([22; 32]));
        let mut planner = Planner::new(1, Vec::new());
        let rotating = planner.plan(
            &map,
            chosen(&map, now),
            |_| None,
            HoldingsNow::default(),
            now,
        );
        let alias = HashMap::from([(PublicKey([22; 32]), PublicKey([2; 32]))]);
        assert_eq!(rotating.aliases, alias);
        assert_eq!(rotating.aliases_during, alias);
        assert!(keys(&rotating.peers).contains(&PublicKey([22; 32])));
        // Rotated: the next key is the key; the old alias is kept while the peers change.
        let peer = map.peers.get_mut(&2).unwrap();
        peer.public_key = PublicKey([22; 32]);
        peer.next_key = None;
        let done = planner.plan(
            &map,
            chosen(&map, now),
            |_| None,
            HoldingsNow::default(),
            now,
        );
        assert!(done.aliases.is_empty());
        assert_eq!(done.aliases_during, alias);
    }
}
