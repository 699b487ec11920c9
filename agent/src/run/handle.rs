//! The running agent as the userspace API, `status`, the metrics endpoint and the control
//! loop see it: one `Control` handle over the device, the socket and the session.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ipnet::IpNet;
use tokio::sync::mpsc;
use tracing::{debug, info};

use crate::control::coordinators::Coordinators;
use crate::control::discovery::Discovery;
use crate::control::state::StateDir;
use crate::control::workloads::{
    claim_blocking, ClaimFailure, ClaimSender, PeerKeys, Shared, Tunnels,
};
use crate::dataplane::{Device, NetBatch};
use crate::metrics::{
    ControlSample, DeviceDropSample, MetricsSource, PathKind, PeerSample, Snapshot,
};
use crate::platform::udp::UdpTransport;
use crate::settings::DeviceConfig;
use crate::uapi::{ApplyError, DeviceStatus, UapiHandler};
use meshlink_proto::agent_session::AgentSession;
use meshlink_proto::PublicKey;

use super::{follow_socket, wanted_routes, NetCmd, FRESH_SESSION, PEER_ALIVE};

/// The data plane as the control loop sees it (to prepare moves).
impl Tunnels for Control {
    fn warm(
        &self,
        only: Option<PeerKeys>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let mut net = NetBatch::with_capacity(64 * 1024);
            let started = self.device.warm(FRESH_SESSION, only.as_ref(), &mut net);
            *self.last_warm_up.lock().unwrap_or_else(|e| e.into_inner()) = Some(WarmUp {
                peers: only.as_ref().map(|o| o.len()),
                handshakes: started,
                at: Instant::now(),
            });
            if !net.is_empty() {
                self.udp.send_batch(&net).await;
            }
            debug!(
                started,
                peers = only.as_ref().map(|o| o.len()),
                "handshakes started to prepare a move"
            );
        })
    }

    fn all_fresh(&self, only: Option<&PeerKeys>) -> bool {
        self.device.all_fresh(FRESH_SESSION, PEER_ALIVE, only)
    }

    fn talkers(&self, address: IpAddr, within: Duration, max: usize) -> Vec<PublicKey> {
        self.device.talkers(address, within, max)
    }
}

/// What the userspace API and `status` see of a running agent.
pub(super) struct Control {
    pub(super) device: Arc<Device>,
    pub(super) interface: String,
    pub(super) addresses: Vec<IpNet>,
    pub(super) udp: Arc<UdpTransport>,
    /// Whether peers' allowed IPs are routed through the interface
    /// (`Settings::install_routes`).
    pub(super) install_routes: bool,
    /// Joined to a coordinator (which publishes the listen port).
    pub(super) joined: bool,
    pub(super) routes_tx: mpsc::UnboundedSender<NetCmd>,
    /// Path discovery and the relay, when joined to a coordinator.
    pub(super) discovery: Option<Arc<Discovery>>,
    pub(super) claims: Option<ClaimSender>,
    /// The control session's state, when joined to a coordinator.
    pub(super) session: Option<Arc<Shared>>,
    /// The state directory, when joined (the key's age).
    pub(super) state: Option<StateDir>,
    /// Where the metrics and DNS servers listen, once started (`status` shows them).
    pub(super) served: std::sync::Mutex<Served>,
    /// The last warm-up for a move here (`status` shows it).
    pub(super) last_warm_up: std::sync::Mutex<Option<WarmUp>>,
}

/// A warm-up for a move here, as `status` shows it.
#[derive(Debug, Clone, Copy)]
pub(super) struct WarmUp {
    /// The peers asked for (the holder and the workload's talkers); `None`: every peer.
    peers: Option<usize>,
    /// Handshakes started (peers without a fresh session among them).
    handshakes: usize,
    at: Instant,
}

/// Where the agent's own servers listen, as `status` shows them.
#[derive(Debug, Default, serde::Serialize)]
pub(super) struct Served {
    /// The metrics endpoint (`http://ADDR/metrics` or `unix:PATH`).
    pub(super) metrics: Option<String>,
    /// The DNS server.
    pub(super) dns: Option<DnsServed>,
}

/// The DNS server, as `status` shows it.
#[derive(Debug, serde::Serialize)]
pub(super) struct DnsServed {
    /// Where it listens (UDP and TCP).
    pub(super) listen: SocketAddr,
    /// The names' suffix.
    pub(super) suffix: String,
    /// Whether systemd-resolved sends the suffix's names to it.
    pub(super) registered: bool,
}

impl Control {
    /// Where the agent's own servers listen.
    pub(super) fn served(&self) -> std::sync::MutexGuard<'_, Served> {
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
        let started = self.device.warm(Duration::ZERO, None, &mut net);
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

    fn handovers(&self) -> Option<&crate::control::handover::Handovers> {
        self.session.as_ref().map(|s| &s.handovers)
    }

    fn claim(&self, workload: &str) -> Result<u64, ClaimFailure> {
        match &self.claims {
            Some(tx) => claim_blocking(tx, workload),
            None => Err(ClaimFailure::NotJoined),
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
                "foreign_source": drops.foreign_source.load(Relaxed),
                "forwarded": drops.forwarded.load(Relaxed),
                "gatewayed": drops.gatewayed.load(Relaxed),
                "udp_send_errors": self.udp.send_errors(),
            },
            "peers": peers,
            "firewall": self.device.firewall_status(),
            "handover": self.device.handover_status(),
            "scheduling": {
                "state": crate::platform::sched::threads().state(),
                "releases": crate::platform::sched::threads().releases(),
            },
            "discovery": self.discovery.as_ref().map(|d| d.counters_json()),
            "control": self.session.as_ref().map(|s| {
                let coordinators = s.coordinators().clone();
                let mut c = control_json(&s.lock(), &coordinators, Instant::now());
                // What the session runs over: "udp" (QUIC) or "tcp" (TLS/TCP), while up.
                c["transport"] = serde_json::json!(s.link.borrow().as_ref().map(|l| l.transport));
                c
            }),
            "key": crate::control::keys::status_json(
                self.state.as_ref().and_then(StateDir::key_made_at),
                self.session.as_ref().map(|s| s.lock()).as_deref(),
                Instant::now(),
            ),
            "served": &*self.served(),
            // Tasks alive in the agent's runtime (the status is answered on one of its
            // blocking threads): a leak of sessions, shims or timers grows it.
            "runtime": {
                "tasks": tokio::runtime::Handle::try_current()
                    .ok()
                    .map(|h| h.metrics().num_alive_tasks()),
            },
            "last_warm_up": self.last_warm_up.lock().unwrap_or_else(|e| e.into_inner()).map(|w| {
                serde_json::json!({
                    "peers": w.peers,
                    "handshakes": w.handshakes,
                    "secs_ago": w.at.elapsed().as_secs(),
                })
            }),
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
        let sched = crate::platform::sched::threads();
        Snapshot {
            now,
            peers,
            device: DeviceDropSample {
                no_route: drops.no_route.load(Relaxed),
                no_endpoint: drops.no_endpoint.load(Relaxed),
                unknown_peer: drops.unknown_peer.load(Relaxed),
                malformed: drops.malformed.load(Relaxed),
                foreign_source: drops.foreign_source.load(Relaxed),
                udp_send_errors: self.udp.send_errors(),
            },
            forwarded: drops.forwarded.load(Relaxed),
            gatewayed: drops.gatewayed.load(Relaxed),
            control,
            realtime: sched.state() == crate::platform::sched::State::Realtime,
            realtime_releases: sched.releases(),
        }
    }
}

/// The control session as `meshlink-agent status` shows it: whether it is connected and to
/// which coordinator, the coordinators known, the map version, and each workload of the map
/// with whether this node answers for it now.
pub(super) fn control_json(
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

#[cfg(test)]
mod tests {
    use super::*;
    use meshlink_proto::Netmap;

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
}
