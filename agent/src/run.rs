//! `meshlink-agent up`: sets the interface up from `Settings` and runs the data plane until
//! told to stop, then removes everything it added.
//!
//! One explicit loop per owned object, each on the shared tokio runtime:
//! - `tun_to_udp`: TUN read batch -> `Device::outbound_batch` -> GSO sends;
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

use std::collections::{BTreeSet, HashMap};
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ipnet::IpNet;
use quinn_udp::RecvMeta;
use tokio::sync::{mpsc, watch, Notify};
use tracing::{debug, info, warn};

use crate::control::coordinators::Coordinators;
use crate::control::discovery::Discovery;
use crate::control::peers::EndpointChooser;
use crate::control::sleep_until;
use crate::control::state::{MapTrust, StateDir};
use crate::control::workloads::{claim_blocking, ClaimSender, Shared, Tunnels};
use crate::control::{ControlError, MeshControl};
use crate::dataplane::{
    CompiledPolicy, Device, FirewallConfig, NetBatch, TunBatch, WorkloadRouting,
};
use crate::metrics::{
    AgentMetrics, ControlSample, DeviceDropSample, MetricsError, MetricsListener, MetricsSource,
    PathKind, PeerSample, Snapshot,
};
use crate::platform::netlink::{self, route_plan, Netlink, NetlinkError};
use crate::platform::tun::{Tun, TunError, HEADROOM, IDEAL_BATCH_SIZE};
use crate::platform::udp::{UdpError, UdpTransport, Underlay};
use crate::settings::{DeviceConfig, Settings};
use crate::uapi::{self, ApplyError, DeviceStatus, UapiError, UapiHandler};
use meshlink_proto::agent_session::AgentSession;
use meshlink_proto::policy::visible_peers;
use meshlink_proto::{Netmap, NodeId};

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
    /// The network's prefix (what `fail_closed` blackholes).
    pub network: IpNet,
    /// The network's name (the middle of its DNS names).
    pub network_name: String,
}

/// A session younger than this counts as fresh when a move is prepared (WireGuard rekeys
/// after 120 s, so a fresh session will not need a handshake during the switch).
const FRESH_SESSION: Duration = Duration::from_secs(90);
/// A peer with no handshake for this long (or never) may be gone: a prepared move does not
/// wait for it (`Device::all_fresh`).
const PEER_ALIVE: Duration = Duration::from_secs(600);

/// How long a released workload address stays on the interface after packets for it are
/// forwarded to the new holder: new packets no longer reach local programs, but answers they
/// are writing at that instant still leave from it instead of failing.
const RELEASE_LINGER: Duration = Duration::from_millis(20);

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

/// The data plane as the control loop sees it (to prepare moves).
impl Tunnels for Control {
    fn warm(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let mut net = NetBatch::with_capacity(64 * 1024);
            let started = self.device.warm(FRESH_SESSION, &mut net);
            if !net.is_empty() {
                self.udp.send_batch(&net).await;
            }
            debug!(started, "handshakes started to prepare a move");
        })
    }

    fn all_fresh(&self) -> bool {
        self.device.all_fresh(FRESH_SESSION, PEER_ALIVE)
    }
}

/// The wanted routes of a configuration: every peer's allowed IPs.
fn wanted_routes(config: &DeviceConfig) -> Vec<IpNet> {
    config
        .peers
        .iter()
        .flat_map(|p| p.allowed_ips.iter().copied())
        .collect()
}

/// What a TUN read error means: the interface deleted (`EBADFD`: the device was detached), or
/// a failure to report.
fn tun_read_error(interface: &str, source: std::io::Error) -> RunError {
    if source.raw_os_error() == Some(libc::EBADFD) {
        RunError::InterfaceDeleted(interface.to_string())
    } else {
        RunError::TunRead {
            interface: interface.to_string(),
            source,
        }
    }
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

/// What the userspace API and `status` see of a running agent.
struct Control {
    device: Arc<Device>,
    interface: String,
    addresses: Vec<IpNet>,
    udp: Arc<UdpTransport>,
    /// Whether peers' allowed IPs are routed through the interface
    /// (`Settings::install_routes`).
    install_routes: bool,
    /// Joined to a coordinator (which publishes the listen port).
    joined: bool,
    routes_tx: mpsc::UnboundedSender<NetCmd>,
    /// Path discovery and the relay, when joined to a coordinator.
    discovery: Option<Arc<Discovery>>,
    claims: Option<ClaimSender>,
    /// The control session's state, when joined to a coordinator.
    session: Option<Arc<Shared>>,
    /// The state directory, when joined (the key's age).
    state: Option<StateDir>,
    /// Where the metrics and DNS servers listen, once started (`status` shows them).
    served: std::sync::Mutex<Served>,
}

/// Where the agent's own servers listen, as `status` shows them.
#[derive(Debug, Default, serde::Serialize)]
struct Served {
    /// The metrics endpoint (`http://ADDR/metrics` or `unix:PATH`).
    metrics: Option<String>,
    /// The DNS server.
    dns: Option<DnsServed>,
}

/// The DNS server, as `status` shows it.
#[derive(Debug, serde::Serialize)]
struct DnsServed {
    /// Where it listens (UDP and TCP).
    listen: SocketAddr,
    /// The names' suffix.
    suffix: String,
    /// Whether systemd-resolved sends the suffix's names to it.
    registered: bool,
}

impl Control {
    /// Where the agent's own servers listen.
    fn served(&self) -> std::sync::MutexGuard<'_, Served> {
        self.served.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A key rotation's switch, as the control loop asks for it (see `control::keys`).
impl crate::control::keys::KeySwitch for Control {
    fn switch_key(&self, key: &crate::settings::PrivateKey) {
        let mut config = self.device.config();
        config.private_key = key.clone();
        self.device.set_config(config);
        if let Some(d) = &self.discovery {
            d.set_own_key(key.public_key(), key.to_key().0);
        }
        // Every session is new: handshakes at once rather than at the next packet or tick.
        let mut net = NetBatch::with_capacity(64 * 1024);
        let started = self.device.warm(Duration::ZERO, &mut net);
        let udp = self.udp.clone();
        tokio::spawn(async move {
            if !net.is_empty() {
                udp.send_batch(&net).await;
            }
        });
        info!(public_key = %key.public_key(), handshakes = started, "the data plane uses the new key");
    }
}

impl UapiHandler for Control {
    fn config(&self) -> DeviceConfig {
        self.device.config()
    }

    fn status(&self) -> DeviceStatus {
        self.device.status(SystemTime::now())
    }

    fn apply(&self, new: DeviceConfig) -> Result<(), ApplyError> {
        let mut new = new;
        follow_socket(&*self.udp, &mut new, self.joined)?;
        let routes = wanted_routes(&new);
        self.device.set_config(new);
        if self.install_routes {
            let _ = self.routes_tx.send(NetCmd::Routes(routes));
        }
        Ok(())
    }

    fn claim(&self, workload: &str) -> Result<u64, String> {
        match &self.claims {
            Some(tx) => claim_blocking(tx, workload),
            None => Err(format!("cannot claim {workload}: this agent runs static peers, not joined to a coordinator")),
        }
    }

    fn status_json(&self) -> String {
        let status = self.device.status(SystemTime::now());
        let config = self.device.config();
        let now = SystemTime::now();
        let drops = self.device.drops();
        let peers: Vec<serde_json::Value> = status
            .peers
            .iter()
            .map(|p| {
                let allowed: Vec<String> = config
                    .peers
                    .iter()
                    .find(|c| c.public_key == p.public_key)
                    .map(|c| c.allowed_ips.iter().map(|n| n.to_string()).collect())
                    .unwrap_or_default();
                let path = match &self.discovery {
                    Some(d) => d.status_json(&p.public_key, p.endpoint, Instant::now()),
                    None => serde_json::json!({
                        "kind": if p.endpoint.is_some() { "direct" } else { "none" },
                        "via": p.endpoint.map(|e| e.to_string()),
                        "rtt_ms": null,
                        "changed_secs_ago": null,
                    }),
                };
                serde_json::json!({
                    "public_key": p.public_key.to_base64(),
                    "endpoint": p.endpoint.map(|e| e.to_string()),
                    "path": path,
                    "allowed_ips": allowed,
                    "latest_handshake_secs_ago": p.last_handshake.and_then(|t| now.duration_since(t).ok()).map(|d| d.as_secs()),
                    "rx_bytes": p.rx_bytes,
                    "tx_bytes": p.tx_bytes,
                    "drops": p.drops,
                })
            })
            .collect();
        use std::sync::atomic::Ordering::Relaxed;
        serde_json::json!({
            "interface": self.interface,
            "public_key": config.private_key.public_key().to_base64(),
            "listen_port": self.udp.port(),
            "addresses": self.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "drops": {
                "no_route": drops.no_route.load(Relaxed),
                "no_endpoint": drops.no_endpoint.load(Relaxed),
                "unknown_peer": drops.unknown_peer.load(Relaxed),
                "malformed": drops.malformed.load(Relaxed),
                "forwarded": drops.forwarded.load(Relaxed),
                "udp_send_errors": self.udp.send_errors(),
            },
            "peers": peers,
            "firewall": self.device.firewall_status(),
            "handover": self.device.handover_status(),
            "discovery": self.discovery.as_ref().map(|d| d.counters_json()),
            "control": self.session.as_ref().map(|s| {
                let coordinators = s.coordinators().clone();
                control_json(&s.lock(), &coordinators, Instant::now())
            }),
            "key": crate::control::keys::status_json(
                self.state.as_ref().and_then(StateDir::key_made_at),
                self.session.as_ref().map(|s| s.lock()).as_deref(),
                Instant::now(),
            ),
            "served": &*self.served(),
        })
        .to_string()
    }
}

/// What a metrics scrape shows (see `crate::metrics`): the data plane's counters, each peer
/// named as the control session's map names it, and the session's state.
impl MetricsSource for Control {
    fn snapshot(&self) -> Snapshot {
        use std::sync::atomic::Ordering::Relaxed;
        let now = SystemTime::now();
        let status = self.device.status(now);
        let (names, control) = match &self.session {
            Some(shared) => {
                let session = shared.lock();
                let map = session.map();
                let names: HashMap<meshlink_proto::PublicKey, String> = map
                    .peers
                    .values()
                    .flat_map(|p| {
                        std::iter::once(p.public_key)
                            .chain(p.next_key)
                            .map(|k| (k, p.name.clone()))
                    })
                    .collect();
                let control = ControlSample {
                    connected: session.is_connected(),
                    map_version: map.version,
                };
                (names, Some(control))
            }
            None => (HashMap::new(), None),
        };
        let peers = status
            .peers
            .into_iter()
            .map(|p| PeerSample {
                name: names.get(&p.public_key).cloned(),
                path: match &self.discovery {
                    Some(d) => d.path_kind(&p.public_key, p.endpoint),
                    None if p.endpoint.is_some() => PathKind::Direct,
                    None => PathKind::None,
                },
                status: p,
            })
            .collect();
        let drops = self.device.drops();
        Snapshot {
            now,
            peers,
            device: DeviceDropSample {
                no_route: drops.no_route.load(Relaxed),
                no_endpoint: drops.no_endpoint.load(Relaxed),
                unknown_peer: drops.unknown_peer.load(Relaxed),
                malformed: drops.malformed.load(Relaxed),
                udp_send_errors: self.udp.send_errors(),
            },
            forwarded: drops.forwarded.load(Relaxed),
            control,
        }
    }
}

/// The control session as `meshlink-agent status` shows it: whether it is connected and to
/// which coordinator, the coordinators known, the map version, and each workload of the map
/// with whether this node answers for it now.
fn control_json(
    session: &AgentSession,
    coordinators: &Coordinators,
    now: Instant,
) -> serde_json::Value {
    let held = session.holdings().held(now);
    let held_back = session.holdings().held_back();
    let workloads: Vec<serde_json::Value> = session
        .map()
        .workloads
        .values()
        .map(|w| {
            serde_json::json!({
                "name": w.name,
                "address": w.address.addr().to_string(),
                "generation": w.generation,
                "holder": w.holder,
                "held_here": held.iter().any(|h| h.address == w.address),
                "awaiting_confirmation": held_back.contains(&w.name),
            })
        })
        .collect();
    serde_json::json!({
        "connected": session.is_connected(),
        "coordinator": coordinators.session(),
        "coordinators": coordinators.addresses(),
        "map_version": session.map().version,
        "lease_valid": session.holdings().lease_valid(now),
        "workloads": workloads,
    })
}

/// The blackhole routes of `fail_closed` (see `platform::netlink`): the overlay's own prefixes
/// (`base`), and the tunnel's routes that they do not cover, kept as the routes change.
/// Never removed at exit: they are there for when the agent is down.
struct FailClosed {
    handle: rtnetlink::Handle,
    base: Vec<IpNet>,
    held: BTreeSet<IpNet>,
}

impl FailClosed {
    /// Makes the blackholes of `base` exist (`on`), or removes such routes an earlier run
    /// with `fail_closed` left for them (`!on`, so that turning the setting off works).
    /// Returns the blackholes kept, `None` when off.
    async fn start(
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
    async fn follow(&mut self, routes: &BTreeSet<IpNet>) {
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
fn overlay_prefixes(settings: &Settings, network: Option<IpNet>) -> Vec<IpNet> {
    match network {
        Some(net) => vec![net.trunc()],
        None => wanted_routes(&settings.device),
    }
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
        overlay_prefixes(&settings, mesh.as_ref().map(|m| m.network)),
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
        nl.add_address(*a).await?;
    }
    let mut installed = BTreeSet::new();
    let mut workload_addrs: BTreeSet<IpNet> = BTreeSet::new();
    let at_start = if settings.install_routes {
        wanted_routes(&settings.device)
    } else {
        Vec::new()
    };
    let (add, _) = route_plan(&installed, &at_start);
    for net in add {
        nl.add_route(net).await?;
        installed.insert(net);
    }
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
            settings.mtu,
            &m.shared,
        )
    });
    let mut device_config = settings.device.clone();
    device_config.listen_port = udp.port();
    let seed = rand_core::RngCore::next_u32(&mut rand_core::OsRng);
    let device = Arc::new(Device::new(device_config, seed));
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
            while let Some(cmd) = routes_rx.recv().await {
                match cmd {
                    NetCmd::Routes(wanted) => {
                        let (add, del) = route_plan(&installed, &wanted);
                        for net in del {
                            if let Err(e) = nl.del_route(net).await { warn!("{e}"); }
                            installed.remove(&net);
                        }
                        for net in add {
                            match nl.add_route(net).await {
                                Ok(()) => { installed.insert(net); }
                                Err(e) => warn!("{e}"),
                            }
                        }
                        if let Some(f) = &mut fail_closed {
                            f.follow(&installed).await;
                        }
                    }
                    NetCmd::Addresses(wanted) => {
                        let (add, del) = route_plan(&workload_addrs, &wanted);
                        for net in del {
                            match nl.del_address(net).await {
                                Ok(()) => info!(address = %net, "workload address released"),
                                Err(e) => warn!("{e}"),
                            }
                            workload_addrs.remove(&net);
                        }
                        for net in add {
                            match nl.add_address(net).await {
                                Ok(()) => {
                                    info!(address = %net, "workload address held");
                                    workload_addrs.insert(net);
                                }
                                Err(e) => warn!("{e}"),
                            }
                        }
                        // Only now that the kernel has them: what was kept back for them.
                        device.set_addresses_up(workload_addrs.iter().map(IpNet::addr));
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
    for net in &installed {
        if let Err(e) = nl.del_route(*net).await {
            debug!("{e}");
        }
    }
    if let Some(f) = &fail_closed {
        info!(prefixes = ?f.held, "fail_closed: blackhole routes left in place");
    }
    drop(cleanup);
    // Dropping the last handle closes the TUN device, which removes the interface.
    drop(tun);
    result
}

/// The longest pause between two refreshes of the cached map's date while a control session
/// is up (a shorter `max_cached_map_age` refreshes it every eighth of that, at least every
/// second).
const MAP_DATE_REFRESH: Duration = Duration::from_secs(3600);

/// How often the cached map's date is refreshed while a session is up.
fn map_date_refresh(max_age: Option<Duration>) -> Duration {
    max_age.map_or(MAP_DATE_REFRESH, |max| {
        (max / 8).clamp(Duration::from_secs(1), MAP_DATE_REFRESH)
    })
}

/// `map` as the data plane sees it once it is no longer trusted: this node alone, no peers
/// and no workloads.
fn without_peers(map: &Netmap, self_id: NodeId) -> Netmap {
    Netmap {
        version: map.version,
        peers: map
            .peers
            .iter()
            .filter(|(id, _)| **id == self_id)
            .map(|(id, p)| (*id, p.clone()))
            .collect(),
        workloads: Default::default(),
        policy: map.policy.clone(),
    }
}

/// Passes the control loop's maps (`from`) on to the data plane (`to`) while they are
/// trusted: a map is current while a control session is up, and trusted for
/// `max_cached_map_age` after the last instant one was (after the cached map's date at start).
/// Past that, the data plane gets the map without its peers until a session is up again, so
/// a node cut off from every coordinator stops trusting peers that may have been revoked
/// meanwhile. While a session is up, the cached map's date is kept current (see
/// [`map_date_refresh`]), so that a restart trusts it for as long as a running agent would.
async fn trusted_maps(
    mut from: watch::Receiver<Netmap>,
    to: watch::Sender<Netmap>,
    shared: Arc<Shared>,
    state: StateDir,
    mut trust: MapTrust,
    self_id: NodeId,
) -> Result<(), RunError> {
    let mut link = shared.link.subscribe();
    let refresh = map_date_refresh(trust.max_age());
    let mut dated: Option<Instant> = None;
    let mut dropped = trust.expired(Instant::now());
    let mut from_open = true;
    loop {
        let now = Instant::now();
        let connected = link.borrow_and_update().is_some();
        trust.set_connected(connected, now);
        if connected && dated.is_none_or(|at| now.duration_since(at) >= refresh) {
            dated = Some(now);
            let (state, version) = (state.clone(), shared.lock().map().version);
            let confirmed = tokio::task::spawn_blocking(move || {
                state.confirm_netmap(SystemTime::now(), version)
            })
            .await;
            if let Ok(Err(e)) = confirmed {
                warn!("dating the cached network map: {e}");
            }
        }
        let expired = trust.expired(now);
        if expired && !dropped {
            let peers = from.borrow().peers.len().saturating_sub(1);
            warn!(
                peers,
                max_cached_map_age = %crate::config::format_map_age(trust.max_age()),
                "no coordinator has confirmed the network map for max_cached_map_age: \
                 its peers are dropped until one answers"
            );
            to.send_replace(without_peers(&from.borrow(), self_id));
            dropped = true;
        } else if !expired && dropped {
            info!("a coordinator answers: peers follow its network map again");
            to.send_replace(shared.lock().map().clone());
            dropped = false;
        }
        let wake = match (trust.poll_timeout(now), dated.filter(|_| connected)) {
            (Some(a), Some(b)) => Some(a.min(b + refresh)),
            (a, b) => a.or(b.map(|b| b + refresh)),
        };
        tokio::select! {
            r = from.changed(), if from_open => match r {
                // A map arrives from a session, so it is current.
                Ok(()) => {
                    let now = Instant::now();
                    trust.confirmed(now);
                    dated = Some(now);
                    to.send_replace(from.borrow_and_update().clone());
                    dropped = false;
                }
                // The control loop ended; it reports why.
                Err(_) => from_open = false,
            },
            _ = link.changed() => {}
            () = sleep_until(wake) => {}
        }
    }
}

/// What of a map the compiled policy depends on: the policy, and the nodes and workloads
/// without what changes often and no selector names (endpoints, labels, holders). A map that
/// differs from the last compiled one only elsewhere is not compiled again.
fn policy_inputs(map: &Netmap) -> Netmap {
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
fn local_destinations(
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

/// Keeps the device's peers equal to the latest network map, touching only what changed, and
/// moves silent peers to their next endpoint. Workload addresses: routed to their holders,
/// held here while the fencing state says so, forwarded after a move for the grace period.
/// Each pass's duration (the data plane's side: firewall, routing, peers; the netlink changes
/// it queues are made by the main loop) goes to `metrics` when they are served.
async fn reconcile_mesh(
    control: Arc<Control>,
    self_id: NodeId,
    mut maps: watch::Receiver<Netmap>,
    shared: Arc<Shared>,
    metrics: Option<Arc<AgentMetrics>>,
) -> Result<(), RunError> {
    let mut chooser = EndpointChooser::new();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    maps.mark_changed();
    let mut held_now: Vec<IpNet> = Vec::new();
    let mut releasing: HashMap<IpNet, Instant> = HashMap::new();
    let mut control_gone = false;
    // The policy compiled for this node, and what of the map it was compiled from.
    let mut compiled: Option<(Netmap, Arc<CompiledPolicy>)> = None;
    // Peers' next keys configured as aliases (see `control::keys`), as last set.
    let mut aliases: HashMap<meshlink_proto::PublicKey, meshlink_proto::PublicKey> = HashMap::new();
    loop {
        let linger_end = releasing.values().min().copied();
        // Only instants still ahead: a lease that ran out is no timer (it would wake this
        // loop over and over until the map changes).
        let wake = match (
            shared.lock().holdings().poll_timeout(Instant::now()),
            linger_end,
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
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
        let mut peers = chooser.peers(&map, self_id, now);
        // Need to know: only the peers the policy ever lets this node exchange packets with
        // (every peer without a policy). The same rule whichever of map and policy came first:
        // both are read from this one map.
        let visible = visible_peers(map.policy.as_ref(), &map, self_id);
        let visible_keys: std::collections::HashSet<meshlink_proto::PublicKey> = map
            .peers
            .values()
            .filter(|p| visible.contains(&p.node_id))
            .map(|p| p.public_key)
            .collect();
        peers.retain(|p| visible_keys.contains(&p.public_key));
        if let Some(d) = &control.discovery {
            for p in &mut peers {
                if let Some(ep) = d.endpoint(&p.public_key) {
                    p.endpoint = Some(ep);
                }
            }
        }
        let key_of: HashMap<NodeId, meshlink_proto::PublicKey> = map
            .peers
            .values()
            .map(|p| (p.node_id, p.public_key))
            .collect();
        let (held, forwards, tentative, awaited, senders, relays) = {
            let mut s = shared.lock();
            let h = s.holdings_mut();
            (
                h.held(now),
                h.forwards(now),
                h.tentative(now),
                h.awaited(now),
                h.senders(now),
                h.relays(now),
            )
        };
        let tentative: Vec<IpNet> = tentative
            .into_iter()
            .filter(|t| !held.iter().any(|h| h.address == *t))
            .collect();
        let keys = |nodes: &[NodeId]| -> Vec<meshlink_proto::PublicKey> {
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
            workloads: map.workloads.values().map(|w| w.ip()).collect(),
            // What a relay may pass on: packets from nodes' own addresses, not from the
            // prefixes they route for others.
            relay_sources: if relays.is_empty() {
                std::collections::HashSet::new()
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
        // The firewall first: a policy takes effect before the peers it admits, and goes on
        // cutting what it denies until the peers it hides are gone.
        let policy = match (&map.policy, &compiled) {
            (None, _) => None,
            (Some(_), Some((inputs, table))) if *inputs == policy_inputs(&map) => {
                Some(table.clone())
            }
            (Some(policy), _) => {
                let table = Arc::new(CompiledPolicy::compile(policy, &map, self_id));
                debug!(
                    version = policy.version,
                    rules = policy.rules.len(),
                    "policy compiled"
                );
                compiled = Some((policy_inputs(&map), table.clone()));
                Some(table)
            }
        };
        if map.policy.is_none() {
            compiled = None;
        }
        let local = local_destinations(
            &map,
            self_id,
            &control.addresses,
            held.iter()
                .map(|h| h.address)
                .chain(tentative.iter().copied()),
        );
        control.device.set_firewall(FirewallConfig {
            local: Some(local),
            policy,
        });
        // Forwarding first, then addresses: a released address is never left unanswered.
        control.device.set_workload_routing(routing);
        if control.device.has_released() {
            // An address already up became held: its kept packets go out now.
            let _ = control.routes_tx.send(NetCmd::Release);
        }
        // Rotating peers: their next keys as aliases, set before the peers that use them and
        // kept until the peers that no longer do are gone.
        let wanted_aliases = crate::control::keys::alias_peers(&map, &mut peers);
        let mut both = aliases.clone();
        both.extend(wanted_aliases.iter().map(|(k, v)| (*k, *v)));
        control.device.set_key_aliases(both);
        let mut config = control.device.config();
        if config.peers != peers {
            debug!(
                version = map.version,
                peers = peers.len(),
                "applying network map"
            );
            config.peers = peers;
            if let Err(e) = control.apply(config) {
                warn!("applying the network map: {e}");
            }
        }
        control.device.set_key_aliases(wanted_aliases.clone());
        aliases = wanted_aliases;
        let mut wanted: Vec<IpNet> = held.iter().map(|h| h.address).chain(tentative).collect();
        // Addresses forwarded elsewhere linger briefly (see RELEASE_LINGER).
        for gone in held_now.iter().filter(|a| !wanted.contains(a)) {
            if forwards.iter().any(|f| f.address == gone.addr()) {
                releasing.entry(*gone).or_insert(now + RELEASE_LINGER);
            }
        }
        releasing.retain(|a, until| now < *until && !wanted.contains(a));
        wanted.extend(releasing.keys().copied());
        wanted.sort();
        wanted.dedup();
        if wanted != held_now {
            held_now = wanted.clone();
            let _ = control.routes_tx.send(NetCmd::Addresses(wanted));
        }
        if let Some(m) = &metrics {
            m.observe_reconcile(now.elapsed());
        }
    }
}

/// The room for one packet read from the TUN device at `mtu`: the MTU (at least IPv6's
/// minimum) with some slack.
fn tun_packet_room(mtu: u16) -> usize {
    usize::from(mtu).max(1280) + 128
}

/// The room for one decrypted packet before it is written to the TUN device at `mtu`.
fn decrypted_packet_room(mtu: u16) -> usize {
    tun_packet_room(mtu).max(2048)
}

async fn tun_to_udp(
    device: Arc<Device>,
    tun: Arc<Tun>,
    udp: Arc<UdpTransport>,
    interface: String,
) -> Result<(), RunError> {
    let slots = IDEAL_BATCH_SIZE;
    let mut original = vec![0u8; HEADROOM + 65536];
    // The packet buffers follow the interface's MTU (see `timers`).
    let mut mtu = tun.mtu();
    let mut bufs: Vec<Vec<u8>> = (0..slots)
        .map(|_| vec![0u8; tun_packet_room(mtu)])
        .collect();
    let mut sizes = vec![0usize; slots];
    let mut net = NetBatch::with_capacity(slots * (usize::from(mtu) + 64));
    loop {
        if tun.mtu() != mtu {
            mtu = tun.mtu();
            for b in &mut bufs {
                b.resize(tun_packet_room(mtu), 0);
            }
        }
        let n = match tun.recv(&mut original, &mut bufs, &mut sizes).await {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                if e.raw_os_error().is_some() {
                    return Err(tun_read_error(&interface, e));
                }
                // A malformed offload frame affects one read only; a packet longer than the
                // buffers means the MTU was raised since it was last read.
                debug!("tun read: {e}");
                let _ = tun.refresh_mtu();
                continue;
            }
        };
        device.outbound_batch(
            bufs[..n].iter().zip(&sizes[..n]).map(|(b, s)| &b[..*s]),
            &mut net,
        );
        if !net.is_empty() {
            udp.send_batch(&net).await;
            net.clear();
        }
    }
}

/// Datagrams up to this size are taken ahead of a receive batch's bulk (see `udp_to_tun`):
/// a ping's (84-byte IP packet, padded to 96, plus 32 bytes of WireGuard) fits, a full TCP
/// segment does not.
const SMALL_DATAGRAM: usize = 160;

/// What of one received entry (`len` bytes of datagrams `stride` apart, GRO) is small enough
/// to go ahead of the bulk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ahead {
    /// The entry is one small datagram (or several).
    Whole,
    /// A GRO train that ends with one short datagram, starting at this offset.
    LastSegment(usize),
    /// Nothing.
    Nothing,
}

fn ahead(len: usize, stride: usize) -> Ahead {
    let stride = stride.max(1);
    if len <= SMALL_DATAGRAM {
        return Ahead::Whole;
    }
    let last = len % stride;
    if len > stride && last != 0 && last <= SMALL_DATAGRAM {
        Ahead::LastSegment(len - last)
    } else {
        Ahead::Nothing
    }
}

async fn udp_to_tun(
    device: Arc<Device>,
    tun: Arc<Tun>,
    udp: Arc<UdpTransport>,
    discovery: Option<Arc<Discovery>>,
    kept: Arc<Notify>,
) -> Result<(), RunError> {
    // Discovery datagrams share the socket with WireGuard's; they go to the discovery task
    // (without it, to the device, which counts them as malformed).
    let wireguard = |from: SocketAddr, d: &[u8]| match &discovery {
        Some(disc) if meshlink_proto::disco::is_disco(d) => {
            disc.deliver(from, d);
            false
        }
        _ => true,
    };
    const SLOT: usize = 65536;
    let batch = quinn_udp::BATCH_SIZE.max(1);
    let mut storage = vec![0u8; SLOT * batch];
    let mut meta = vec![RecvMeta::default(); batch];
    // The packet slots follow the interface's MTU (see `timers`).
    let mut mtu = tun.mtu();
    // Written with offload: a TCP flow's segments leave as one super-packet (see
    // `TunBatch::for_coalescing`).
    let mut tun_batch =
        TunBatch::for_coalescing(IDEAL_BATCH_SIZE, HEADROOM, decrypted_packet_room(mtu));
    // Packets of small datagrams, decrypted ahead of their batch (see below).
    let mut early = TunBatch::new(batch * 4, HEADROOM, decrypted_packet_room(mtu));
    let mut net = NetBatch::with_capacity(16 * 1024);
    let mut gro = tun_rs::GROTable::default();
    loop {
        if tun.mtu() != mtu {
            // Both batches are empty here: each round writes out what it decrypted.
            mtu = tun.mtu();
            tun_batch =
                TunBatch::for_coalescing(IDEAL_BATCH_SIZE, HEADROOM, decrypted_packet_room(mtu));
            early = TunBatch::new(batch * 4, HEADROOM, decrypted_packet_room(mtu));
        }
        let n = {
            let mut slices: Vec<IoSliceMut<'_>> =
                storage.chunks_mut(SLOT).map(IoSliceMut::new).collect();
            tokio::select! {
                biased;
                // Packets kept back at a handover: delivered here, between two receive
                // batches, so that nothing decrypted later overtakes them (this loop is the
                // TUN device's one writer), in this loop's batch (sized from the MTU). The
                // receive is cancel-safe: a datagram is taken only when it completes.
                () = kept.notified() => {
                    deliver_kept(&device, &tun, &mut gro, &mut tun_batch).await;
                    continue;
                }
                r = udp.recv(&mut slices, &mut meta) => match r {
                    Ok(n) => n,
                    Err(e) => {
                        debug!("udp receive: {e}");
                        continue;
                    }
                },
            }
        };
        // Small datagrams are decrypted first (a ping is 128 bytes on the wire, a full TCP
        // segment 1,452): under load a batch holds hundreds of kilobytes of bulk data that a
        // ping would otherwise wait for. What they carry goes to the TUN device at once when
        // it is not TCP (pings, DNS, real-time UDP); small TCP segments (ACKs, a flow's short
        // last segment) keep their place after the datagrams received before them, so no TCP
        // flow is reordered. WireGuard's replay window takes the counters out of order.
        let mut early_of = [(0usize, 0usize); quinn_udp::BATCH_SIZE];
        let mut rest_of = [0usize; quinn_udp::BATCH_SIZE];
        early.clear();
        for (i, m) in meta[..n].iter().enumerate() {
            let data = &storage[i * SLOT..i * SLOT + m.len];
            let stride = m.stride.max(1);
            let (small, rest) = match ahead(data.len(), stride) {
                Ahead::Whole => (data, 0),
                Ahead::LastSegment(at) => (&data[at..], data.len().div_ceil(stride) - 1),
                Ahead::Nothing => {
                    rest_of[i] = data.len().div_ceil(stride);
                    continue;
                }
            };
            rest_of[i] = rest;
            let start = early.len();
            early.clear_urgent();
            device.inbound_batch(
                m.addr,
                small.chunks(stride).filter(|d| wireguard(m.addr, d)),
                &mut early,
                &mut net,
            );
            if early.is_urgent() {
                for k in start..early.len() {
                    tun_batch.push_copy(early.packet(k));
                }
                early.truncate(start);
            }
            early_of[i] = (start, early.len());
        }
        if !tun_batch.is_empty() {
            flush_tun(&tun, &mut gro, &mut tun_batch).await;
        }
        for (i, m) in meta[..n].iter().enumerate() {
            let data = &storage[i * SLOT..i * SLOT + m.len];
            let stride = m.stride.max(1);
            if rest_of[i] > 0 {
                device.inbound_batch(
                    m.addr,
                    data.chunks(stride)
                        .take(rest_of[i])
                        .filter(|d| wireguard(m.addr, d)),
                    &mut tun_batch,
                    &mut net,
                );
            }
            let (from, to) = early_of[i];
            for k in from..to {
                tun_batch.push_copy(early.packet(k));
            }
            if tun_batch.is_urgent() || tun_batch.len() + 64 >= IDEAL_BATCH_SIZE {
                flush_tun(&tun, &mut gro, &mut tun_batch).await;
            }
        }
        flush_tun(&tun, &mut gro, &mut tun_batch).await;
        if !net.is_empty() {
            udp.send_batch(&net).await;
            net.clear();
        }
    }
}

/// Writes the packets kept back for workload addresses that may be answered now to the TUN
/// device, a batch at a time (see `Device::take_released`); `batch` is empty before and
/// after, and does not grow.
async fn deliver_kept(
    device: &Device,
    tun: &Tun,
    gro: &mut tun_rs::GROTable,
    batch: &mut TunBatch,
) {
    let mut n = 0;
    while device.has_released() {
        n += device.take_released(batch);
        flush_tun(tun, gro, batch).await;
    }
    if n > 0 {
        debug!(packets = n, "packets kept back at a handover delivered");
    }
}

async fn flush_tun(tun: &Tun, gro: &mut tun_rs::GROTable, batch: &mut TunBatch) {
    if batch.is_empty() {
        return;
    }
    if let Err(e) = tun.send(gro, batch).await {
        debug!("tun write: {e}");
    }
    batch.clear();
}

async fn timers(
    device: Arc<Device>,
    udp: Arc<UdpTransport>,
    tun: Arc<Tun>,
) -> Result<(), RunError> {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut net = NetBatch::with_capacity(4096);
    let mut n: u64 = 0;
    // The data plane's connection table counts time from here.
    let start = Instant::now();
    loop {
        tick.tick().await;
        device.set_time(start.elapsed());
        // wg-quick sets the MTU after starting the agent (`ip link set mtu`): the packet
        // loops follow it within a tick.
        if let Ok((before, now)) = tun.refresh_mtu() {
            if before != now {
                info!(
                    from = before,
                    to = now,
                    "interface MTU changed; packet buffers follow"
                );
            }
        }
        n += 1;
        if n.is_multiple_of(4) {
            device.reset_handshake_limiter();
        }
        device.handle_timeout(&mut net);
        if !net.is_empty() {
            udp.send_batch(&net).await;
            net.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_the_coordinator_in_use_and_those_known() {
        let now = Instant::now();
        let mut session = AgentSession::new(1, Netmap::default(), now);
        let mut coordinators =
            Coordinators::new(["198.18.0.1:7443", "198.18.0.2:7443"].map(String::from)).unwrap();
        let v = control_json(&session, &coordinators, now);
        assert_eq!(v["connected"], false);
        assert_eq!(v["coordinator"], serde_json::Value::Null);
        assert_eq!(
            v["coordinators"],
            serde_json::json!(["198.18.0.1:7443", "198.18.0.2:7443"])
        );
        coordinators.connected("198.18.0.2:7443");
        session.connected(now, Netmap::default(), Vec::new());
        let v = control_json(&session, &coordinators, now);
        assert_eq!(v["connected"], true);
        assert_eq!(v["coordinator"], "198.18.0.2:7443");
    }

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

    #[test]
    fn a_detached_tun_device_means_the_interface_was_deleted() {
        let e = tun_read_error("wg0", std::io::Error::from_raw_os_error(libc::EBADFD));
        assert!(
            matches!(&e, RunError::InterfaceDeleted(i) if i == "wg0"),
            "{e}"
        );
        let e = tun_read_error("wg0", std::io::Error::from_raw_os_error(libc::EIO));
        assert!(
            matches!(&e, RunError::TunRead { interface, .. } if interface == "wg0"),
            "{e}"
        );
        assert!(e.to_string().contains("wg0"), "{e}");
    }

    #[test]
    fn packet_buffers_follow_the_mtu() {
        assert_eq!(tun_packet_room(1420), 1548);
        assert_eq!(tun_packet_room(576), 1408, "at least IPv6's minimum");
        assert_eq!(decrypted_packet_room(1420), 2048);
        assert!(decrypted_packet_room(9000) >= 9000 && tun_packet_room(65535) >= 65535);
    }

    #[test]
    fn small_datagrams_and_short_train_tails_go_ahead() {
        assert_eq!(ahead(128, 128), Ahead::Whole, "a ping");
        assert_eq!(ahead(96, 96), Ahead::Whole, "a TCP ACK");
        assert_eq!(ahead(1452, 1452), Ahead::Nothing, "a full segment");
        assert_eq!(
            ahead(1452 * 3, 1452),
            Ahead::Nothing,
            "a train of full segments"
        );
        assert_eq!(
            ahead(1452 * 3 + 128, 1452),
            Ahead::LastSegment(1452 * 3),
            "a train ending in a ping"
        );
        assert_eq!(
            ahead(1452 * 3 + 700, 1452),
            Ahead::Nothing,
            "a train ending in a bulk tail"
        );
        assert_eq!(ahead(0, 0), Ahead::Whole);
    }
}
