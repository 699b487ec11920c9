//! `meshlink-agent up`: sets the interface up from `Settings` and runs the data plane until
//! told to stop, then removes everything it added.
//!
//! One explicit loop per owned object, each on the shared tokio runtime:
//! - `tun_to_udp`: TUN read batch -> `Device::outbound_batch` -> GSO sends (what it keeps
//!   back for a workload address moving here wakes `udp_to_tun`, `Device::take_kept_from_host`);
//! - `udp_to_tun`: GRO/`recvmmsg` receive -> `Device::inbound_batch` -> coalesced TUN writes;
//!   between two receive batches, the packets kept back at a handover (`Device::take_released`);
//! - `timers`: WireGuard timers and the data plane's clock every 250 ms, handshake limiter
//!   window every second, the interface's MTU (the loops' buffers follow it);
//! - `routes`: applies route changes that follow configuration changes (unless
//!   `Settings::install_routes` is off);
//! - the userspace API server (`crate::uapi`);
//! - for a joined node, the control loop, path discovery, `trusted_maps` (maps go on to the
//!   data plane only while trusted, see `MapTrust`) and the mesh reconciler.
//!
//! The send and receive loops run on different worker threads, so one tunnel uses two cores.
//!
//! A new listen port or firewall mark from the userspace API (`wg set`) is applied to the UDP
//! socket before the rest of the configuration ([`follow_socket`]): a new port is bound first
//! and every loop moves to it (`UdpTransport::rebind`), the old socket staying on failure.
//! Sessions live in the data plane, not in the socket, so they survive the move.
//!
//! Where each part lives: this file starts and stops everything ([`run`]) and applies the
//! interface's changes; `handle` is the running agent as the userspace API, `status` and the
//! metrics see it; `packets` holds the packet loops; `maps` decides which maps reach the data
//! plane; `reconcile` turns a map and the fencing state into peers, firewall, workload
//! routing and addresses (its `Planner` decides without I/O, `reconcile_mesh` applies);
//! `fail_closed` keeps the overlay's blackhole routes.

mod fail_closed;
mod handle;
mod interface;
mod maps;
mod packets;
mod reconcile;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::sync::{mpsc, watch, Notify};
use tracing::{debug, info, warn};

use crate::control::discovery::Discovery;
use crate::control::state::{MapTrust, StateDir};
use crate::control::workloads::{ClaimSender, Shared, Tunnels};
use crate::control::{ControlError, MeshControl};
use crate::dataplane::Device;
use crate::metrics::{AgentMetrics, MetricsError, MetricsListener, MetricsSource};
use crate::platform::netlink::{self, Netlink, NetlinkError};
use crate::platform::tun::{Tun, TunError};
use crate::platform::udp::{UdpError, UdpTransport, Underlay};
use crate::settings::{DeviceConfig, Settings};
use crate::uapi::{self, ApplyError, UapiError, UapiHandler};
use meshlink_proto::{Netmap, NodeId};

use fail_closed::{overlay_prefixes, FailClosed};
use handle::{Control, DnsServed};
use interface::{Installed, Kind};
use maps::{trusted_maps, without_peers};
use packets::{timers, tun_to_udp, udp_to_tun};
use reconcile::reconcile_mesh;

/// The TUN device's transmit queue length: the kernel's default for TUN. Shorter queues (32,
/// 64, 100) were measured and gave no repeatable latency gain under load (BENCHMARKS.md).
const TUN_TXQUEUELEN: u32 = 500;

/// Why the agent could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The interface name is taken.
    #[error("interface {0} already exists (choose another with --interface or remove it)")]
    InterfaceExists(String),
    /// The TUN device could not be created.
    #[error(transparent)]
    Tun(#[from] TunError),
    /// The UDP socket could not be bound.
    #[error(transparent)]
    Udp(#[from] UdpError),
    /// A netlink operation failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// The userspace API socket could not be bound.
    #[error(transparent)]
    Uapi(#[from] UapiError),
    /// The interface was deleted under the agent (`ip link delete`, as `wg-quick down`
    /// does): the kernel detached the TUN device, whose reads then fail with `EBADFD`.
    #[error("interface {0} was deleted")]
    InterfaceDeleted(String),
    /// Reading the TUN device failed for another reason.
    #[error("reading the TUN device of {interface}: {source}")]
    TunRead {
        /// The interface.
        interface: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A loop that runs until shutdown returned (a bug).
    #[error("a packet loop stopped")]
    LoopStopped,
    /// A loop panicked (a bug); the panic's message.
    #[error("a packet loop panicked: {0}")]
    LoopPanicked(String),
    /// The control channel ended for good (revoked, refused).
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The metrics endpoint could not be bound.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
}

/// A joined node's link to the coordinator: the control loop and the maps it publishes.
pub struct Mesh {
    /// This node's id (left out of its own peers).
    pub self_id: NodeId,
    /// The latest network map.
    pub maps: watch::Receiver<Netmap>,
    /// The control loop, started once the UDP port is known.
    pub control: MeshControl,
    /// Workload fencing state, kept by the control loop.
    pub shared: Arc<Shared>,
    /// Where `meshctl workload claim` requests go.
    pub claims: ClaimSender,
    /// The state directory, where the map is cached (its date is kept current while a
    /// control session is up).
    pub state: StateDir,
    /// How far the map `maps` starts with is trusted without a coordinator.
    pub trust: MapTrust,
    /// The network's prefixes (what `fail_closed` blackholes): IPv4, then IPv6 if any.
    pub networks: Vec<IpNet>,
    /// The network's name (the middle of its DNS names).
    pub network_name: String,
}

/// A session younger than this counts as fresh when a move is prepared (WireGuard rekeys
/// after 120 s, so a fresh session will not need a handshake during the switch).
const FRESH_SESSION: Duration = Duration::from_secs(90);
/// A peer with no handshake for this long (or never) may be gone: a prepared move does not
/// wait for it (`Device::all_fresh`).
const PEER_ALIVE: Duration = Duration::from_secs(600);

/// How often the host's addresses are read again for [`own_addresses`] (besides every change
/// of the workload addresses the agent makes).
const OWN_ADDRESSES_EVERY: Duration = Duration::from_secs(2);

/// Tells the data plane every local address of the host, the node's own (`node`) included:
/// no peer may send from one (`Device::set_own_addresses`). The TUN device of a mesh node
/// takes packets with a local source (`accept_local`, for the host's own packets kept back at
/// a handover), so that check, not the kernel's, keeps a peer whose routed prefix covers one
/// of the host's addresses (its LAN address, say) from posing as the host. A dump that fails
/// keeps the addresses known before.
async fn own_addresses(nl: &Netlink, device: &Device, node: &[IpNet]) {
    match netlink::host_addresses(nl.handle()).await {
        Ok(host) => device.set_own_addresses(node.iter().map(IpNet::addr).chain(host)),
        Err(e) => debug!("cannot list the host's addresses: {e}"),
    }
}

/// Changes to the interface that the main loop makes through netlink, in order.
enum NetCmd {
    /// The wanted routes (all of them).
    Routes(Vec<IpNet>),
    /// The wanted workload addresses held here (all of them); then the packets kept back
    /// for those now up are delivered (by `udp_to_tun`).
    Addresses(Vec<IpNet>),
    /// Deliver the packets kept back for workload addresses that may be answered now (see
    /// `Device::take_released`; `udp_to_tun` does).
    Release,
}

/// The wanted routes of a configuration: every peer's allowed IPs.
fn wanted_routes(config: &DeviceConfig) -> Vec<IpNet> {
    config
        .peers
        .iter()
        .flat_map(|p| p.allowed_ips.iter().copied())
        .collect()
}

/// Makes the UDP socket follow a new configuration's listen port and firewall mark (`wg set
/// ... listen-port`, `fwmark`), before anything else of it is applied, and sets `new`'s port
/// to the one bound. A new port is bound with the new mark and every loop moves to it; on
/// failure the old socket stays and nothing changes. Port 0 keeps the port bound (any port
/// will do); a mark of 0 (or none) clears the socket's. A joined node's port is published by
/// its coordinator, so changing it at run time is refused.
///
/// # Errors
/// [`ApplyError::ListenPort`], [`ApplyError::Fwmark`], [`ApplyError::Unsupported`] (joined).
fn follow_socket(
    udp: &dyn Underlay,
    new: &mut DeviceConfig,
    joined: bool,
) -> Result<(), ApplyError> {
    let mark = new.fwmark.unwrap_or(0);
    let bound = udp.port();
    if new.listen_port != 0 && new.listen_port != bound {
        if joined {
            return Err(ApplyError::Unsupported(format!(
                "this node's coordinator publishes its listen port ({bound}); set listen_port \
                 in its configuration and restart the agent to change it"
            )));
        }
        let port = new.listen_port;
        new.listen_port = udp
            .rebind(port, mark)
            .map_err(|source| ApplyError::ListenPort { port, source })?;
        info!(
            from = bound,
            to = port,
            fwmark = mark,
            "listen port changed"
        );
    } else {
        new.listen_port = bound;
        if mark != udp.mark() {
            udp.set_mark(mark)
                .map_err(|source| ApplyError::Fwmark { mark, source })?;
            info!(fwmark = mark, "firewall mark of the UDP socket changed");
        }
    }
    Ok(())
}

/// Removes what the agent added, also when start-up fails half-way.
struct Cleanup {
    socket: Option<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(p) = self.socket.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Runs the agent until `shutdown` resolves.
///
/// # Errors
/// [`RunError`] when the interface cannot be set up or a packet loop fails.
pub async fn run(
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()>,
    mesh: Option<Mesh>,
) -> Result<(), RunError> {
    let handle = netlink::connect()?;
    if netlink::link_index(&handle, &settings.interface)
        .await?
        .is_some()
    {
        return Err(RunError::InterfaceExists(settings.interface.clone()));
    }
    // Before anything else: no instant of this start-up lets the overlay out another way.
    let mut fail_closed = FailClosed::start(
        handle.clone(),
        overlay_prefixes(&settings, mesh.as_ref().map(|m| m.networks.as_slice())),
        settings.fail_closed,
    )
    .await?;
    let udp = Arc::new(UdpTransport::bind(
        settings.device.listen_port,
        settings.device.fwmark,
    )?);
    let tun = Arc::new(Tun::create(&settings.interface, settings.mtu)?);
    let nl = Netlink::for_interface(handle, &settings.interface).await?;
    nl.set_mtu_and_up(settings.mtu, TUN_TXQUEUELEN).await?;
    for a in &settings.addresses {
        match nl.add_address(*a).await {
            Ok(()) => {}
            // A host with IPv6 disabled (`disable_ipv6=1`) refuses the IPv6 address of a
            // network with an IPv6 prefix: the node still works over IPv4.
            Err(e) if a.addr().is_ipv6() => {
                warn!("the node's IPv6 address {a} is not on the interface (IPv4 only): {e}");
            }
            Err(e) => return Err(e.into()),
        }
    }
    if mesh.is_some() {
        // What this host sends a workload address moving here is kept back until the
        // handover is confirmed, then written to the TUN device with this host's source.
        if let Err(e) = crate::platform::sysctl::accept_local(&settings.interface) {
            warn!(
                interface = %settings.interface,
                "accept_local not set: what this host sends a workload address while it moves \
                 here is lost until the address is up: {e}"
            );
        }
    }
    let mut routes = Installed::new(Kind::Route);
    let mut workload_addrs = Installed::new(Kind::Address);
    let at_start = if settings.install_routes {
        wanted_routes(&settings.device)
    } else {
        Vec::new()
    };
    routes.install(&nl, &at_start).await?;
    // Tells the receive loop that packets kept back at handovers may be delivered.
    let kept = Arc::new(Notify::new());
    let mut cleanup = Cleanup { socket: None };
    let listener = uapi::bind(&settings.uapi_dir, &settings.interface)?;
    cleanup.socket = Some(listener.path().to_path_buf());
    // Asked for explicitly, so a metrics endpoint that cannot be bound stops the start.
    let metrics = match &settings.metrics_listen {
        Some(at) => {
            let listener = MetricsListener::bind(at).await?;
            info!(at = %listener.local(), "serving metrics");
            Some((listener, Arc::new(AgentMetrics::new())))
        }
        None => None,
    };

    let discovery = mesh.as_ref().map(|m| {
        Discovery::new(
            settings.device.private_key.public_key(),
            settings.device.private_key.to_key().0,
            udp.port(),
            &m.shared,
        )
    });
    let mut device_config = settings.device.clone();
    device_config.listen_port = udp.port();
    let seed = rand_core::RngCore::next_u32(&mut rand_core::OsRng);
    let device = Arc::new(Device::new(device_config, seed));
    device.set_own_addresses(settings.addresses.iter().map(IpNet::addr));
    own_addresses(&nl, &device, &settings.addresses).await;
    let (routes_tx, mut routes_rx) = mpsc::unbounded_channel();
    let control = Arc::new(Control {
        device: device.clone(),
        interface: settings.interface.clone(),
        addresses: settings.addresses.clone(),
        udp: udp.clone(),
        install_routes: settings.install_routes,
        joined: mesh.is_some(),
        routes_tx,
        discovery: discovery.clone(),
        claims: mesh.as_ref().map(|m| m.claims.clone()),
        session: mesh.as_ref().map(|m| m.shared.clone()),
        state: mesh.as_ref().map(|m| m.state.clone()),
        served: Default::default(),
        last_warm_up: Default::default(),
    });
    info!(
        interface = %settings.interface,
        public_key = %settings.device.private_key.public_key(),
        listen_port = udp.port(),
        peers = settings.device.peers.len(),
        tun_offload = tun.offload(),
        udp_gso = udp.max_gso_segments(),
        udp_gro = udp.gro_segments(),
        "interface up"
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(tun_to_udp(
        device.clone(),
        tun.clone(),
        udp.clone(),
        settings.interface.clone(),
        kept.clone(),
    ));
    tasks.spawn(udp_to_tun(
        device.clone(),
        tun.clone(),
        udp.clone(),
        discovery.clone(),
        kept.clone(),
    ));
    tasks.spawn(timers(device.clone(), udp.clone(), tun.clone()));
    let metrics = metrics.map(|(listener, metrics)| {
        control.served().metrics = Some(listener.local());
        let source: Arc<dyn MetricsSource> = control.clone();
        let served = metrics.clone();
        tasks.spawn(async move {
            if let Err(e) = crate::metrics::serve(listener, served, source).await {
                warn!("metrics endpoint: {e}");
            }
            // Scrapes stop; the tunnels go on.
            std::future::pending::<()>().await;
            Ok(())
        });
        metrics
    });
    tasks.spawn({
        let handler: Arc<dyn UapiHandler> = control.clone();
        let stop = stop_rx.clone();
        async move {
            uapi::serve(listener, handler, stop).await;
            Ok(())
        }
    });

    let mut dns_registration = None;

    if let Some(mesh) = mesh {
        let port = udp.port();
        let tunnel = settings.interface.clone();
        let tunnels: Arc<dyn Tunnels> = control.clone();
        let switch: Arc<dyn crate::control::keys::KeySwitch> = control.clone();
        tasks.spawn(async move {
            mesh.control
                .with_key_switch(switch)
                .run(port, tunnel, tunnels)
                .await
                .map_err(RunError::from)
        });
        // The data plane sees the control loop's maps through `trusted_maps`.
        let trusted = {
            let now = Instant::now();
            let map = mesh.maps.borrow().clone();
            if mesh.trust.expired(now) {
                without_peers(&map, mesh.self_id)
            } else {
                map
            }
        };
        let (trusted_tx, trusted_rx) = watch::channel(trusted);
        // Names, from the trusted maps too (a map too old to bring up peers names none),
        // once the node's addresses are on the interface.
        if settings.dns.enabled {
            match crate::dns::listen_address(&settings.dns, &settings.addresses) {
                None => warn!("DNS server not started: this node has no overlay address"),
                Some(listen) => {
                    let initial = trusted_rx.borrow().clone();
                    let started = crate::dns::DnsService::start(
                        &settings.dns,
                        listen,
                        &mesh.network_name,
                        &settings.addresses,
                        &initial,
                    )
                    .await;
                    if let Some(service) = started {
                        control.served().dns = Some(DnsServed {
                            listen,
                            suffix: settings.dns.suffix.clone(),
                            registered: false,
                        });
                        let maps = trusted_rx.clone();
                        let task = service.into_task();
                        tasks.spawn(async move {
                            task.run(maps).await;
                            Ok(())
                        });
                        // resolved waits on D-Bus: registered beside the mesh, not before it.
                        let (control, interface, suffix) = (
                            control.clone(),
                            settings.interface.clone(),
                            settings.dns.suffix.clone(),
                        );
                        dns_registration = Some(tokio::spawn(async move {
                            let host = crate::dns::resolved::Resolvectl;
                            let r = crate::dns::resolved::Registration::register(
                                &host, &interface, listen, &suffix,
                            )
                            .await;
                            if let Some(d) = control.served().dns.as_mut() {
                                d.registered = r.is_some();
                            }
                            r
                        }));
                    }
                }
            }
        }
        tasks.spawn(trusted_maps(
            mesh.maps,
            trusted_tx,
            mesh.shared.clone(),
            mesh.state,
            mesh.trust,
            mesh.self_id,
        ));
        if let Some(d) = discovery.clone() {
            let (udp, maps, shared) = (udp.clone(), trusted_rx.clone(), mesh.shared.clone());
            tasks.spawn(async move {
                d.run(udp, maps, shared).await;
                Ok(())
            });
        }
        tasks.spawn(reconcile_mesh(
            control.clone(),
            mesh.self_id,
            trusted_rx,
            mesh.shared,
            metrics.clone(),
        ));
    }

    let result = tokio::select! {
        () = shutdown => {
            info!("shutting down");
            Ok(())
        }
        Some(r) = tasks.join_next() => match r {
            Ok(Err(e)) => Err(e),
            Ok(Ok(())) => Err(RunError::LoopStopped),
            Err(e) => Err(RunError::LoopPanicked(e.to_string())),
        },
        () = async {
            // Read at the start already (above): the first recheck one period on.
            let mut recheck = tokio::time::interval_at(
                tokio::time::Instant::now() + OWN_ADDRESSES_EVERY,
                OWN_ADDRESSES_EVERY,
            );
            loop {
                let cmd = tokio::select! {
                    cmd = routes_rx.recv() => cmd,
                    _ = recheck.tick() => {
                        own_addresses(&nl, &device, &settings.addresses).await;
                        continue;
                    }
                };
                let Some(cmd) = cmd else { break };
                match cmd {
                    NetCmd::Routes(wanted) => {
                        routes.reconcile(&nl, &wanted).await;
                        if let Some(f) = &mut fail_closed {
                            f.follow(routes.nets()).await;
                        }
                    }
                    NetCmd::Addresses(wanted) => {
                        workload_addrs.reconcile(&nl, &wanted).await;
                        own_addresses(&nl, &device, &settings.addresses).await;
                        // Only now that the kernel has them: what was kept back for them.
                        device.set_addresses_up(workload_addrs.nets().iter().map(IpNet::addr));
                        if device.has_released() {
                            kept.notify_one();
                        }
                    }
                    NetCmd::Release => kept.notify_one(),
                }
            }
        } => Ok(()),
    };
    let _ = stop_tx.send(true);
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    if let Some(registering) = dns_registration {
        use crate::dns::resolved::HostResolver;
        let host = crate::dns::resolved::Resolvectl;
        if registering.is_finished() {
            if let Ok(Some(r)) = registering.await {
                r.revert(&host).await;
            }
        } else {
            // Cut midway, perhaps half done: undone all the same (reverting what was never
            // set changes nothing).
            registering.abort();
            if let Err(e) = host.revert(&settings.interface).await {
                debug!("reverting a registration cut short: {e}");
            }
        }
    }
    routes.remove_all(&nl).await;
    if let Some(f) = &fail_closed {
        info!(prefixes = ?f.held, "fail_closed: blackhole routes left in place");
    }
    drop(cleanup);
    // Dropping the last handle closes the TUN device, which removes the interface.
    drop(tun);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An underlay socket that records what it is asked, with ports that cannot be bound.
    struct FakeUnderlay {
        port: std::cell::Cell<u16>,
        mark: std::cell::Cell<u32>,
        taken: Vec<u16>,
        calls: std::cell::RefCell<Vec<String>>,
    }

    impl FakeUnderlay {
        fn new(port: u16, taken: &[u16]) -> Self {
            FakeUnderlay {
                port: port.into(),
                mark: 0.into(),
                taken: taken.to_vec(),
                calls: Default::default(),
            }
        }
    }

    impl Underlay for FakeUnderlay {
        fn port(&self) -> u16 {
            self.port.get()
        }
        fn mark(&self) -> u32 {
            self.mark.get()
        }
        fn rebind(&self, port: u16, mark: u32) -> Result<u16, UdpError> {
            self.calls
                .borrow_mut()
                .push(format!("rebind {port} {mark}"));
            if self.taken.contains(&port) {
                return Err(UdpError::PortInUse(port));
            }
            self.port.set(port);
            self.mark.set(mark);
            Ok(port)
        }
        fn set_mark(&self, mark: u32) -> std::io::Result<()> {
            self.calls.borrow_mut().push(format!("mark {mark}"));
            self.mark.set(mark);
            Ok(())
        }
    }

    fn config(port: u16, fwmark: Option<u32>) -> DeviceConfig {
        DeviceConfig {
            private_key: crate::settings::PrivateKey::from_bytes([7; 32]),
            listen_port: port,
            fwmark,
            peers: Vec::new(),
        }
    }

    #[test]
    fn a_new_listen_port_is_bound_with_the_mark_and_a_taken_one_keeps_the_old() {
        let udp = FakeUnderlay::new(40000, &[51820]);
        let mut new = config(51821, Some(7));
        follow_socket(&udp, &mut new, false).unwrap();
        assert_eq!((new.listen_port, udp.port(), udp.mark()), (51821, 51821, 7));
        assert_eq!(
            *udp.calls.borrow(),
            ["rebind 51821 7"],
            "one new socket, marked"
        );

        let mut taken = config(51820, None);
        let e = follow_socket(&udp, &mut taken, false).expect_err("port taken");
        assert!(
            matches!(e, ApplyError::ListenPort { port: 51820, .. }),
            "{e}"
        );
        assert_eq!(e.errno(), libc::EADDRINUSE, "as wireguard-go answers");
        assert_eq!((udp.port(), udp.mark()), (51821, 7), "the old socket stays");
    }

    #[test]
    fn port_zero_or_the_same_keeps_the_socket_and_only_a_new_mark_is_set() {
        let udp = FakeUnderlay::new(40000, &[]);
        let mut same = config(40000, None);
        follow_socket(&udp, &mut same, false).unwrap();
        let mut any = config(0, None);
        follow_socket(&udp, &mut any, false).unwrap();
        assert_eq!(
            any.listen_port, 40000,
            "port 0 reads back as the port bound"
        );
        assert!(udp.calls.borrow().is_empty(), "{:?}", udp.calls.borrow());

        let mut marked = config(0, Some(51820));
        follow_socket(&udp, &mut marked, false).unwrap();
        let mut cleared = config(40000, Some(0));
        follow_socket(&udp, &mut cleared, false).unwrap();
        let mut none = config(40000, None);
        follow_socket(&udp, &mut none, false).unwrap();
        assert_eq!(*udp.calls.borrow(), ["mark 51820", "mark 0"]);
    }

    #[test]
    fn a_joined_node_keeps_the_port_its_coordinator_publishes() {
        let udp = FakeUnderlay::new(40000, &[]);
        let mut new = config(41000, None);
        let e = follow_socket(&udp, &mut new, true).expect_err("joined");
        assert!(matches!(e, ApplyError::Unsupported(_)), "{e}");
        assert_eq!(udp.port(), 40000);
        assert!(udp.calls.borrow().is_empty());
    }
}
