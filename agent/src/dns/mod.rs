//! A mesh node's DNS server: `NODE.NETWORK.mesh` and `WORKLOAD.NETWORK.mesh` (suffix
//! `dns_suffix`), answered from the node's trusted network map, on the node's own overlay
//! address, UDP and TCP port 53 (or `dns_listen`). On by default on a mesh node (`dns = false`
//! turns it off); a node with static peers has no map and no server.
//!
//! Pipeline: trusted map (`run::trusted_maps`) -> [`names::NameTable`] (pure; rebuilt only
//! when the names or addresses change) -> a hickory zone -> [`server::MeshDns`] (who may ask,
//! rate limit) <- hickory's UDP loop and our bounded TCP loop. At start the node registers
//! with systemd-resolved where it runs ([`resolved`]) and reverts that at exit.
//!
//! A server that cannot start (port 53 taken, say) is logged and the agent runs without it:
//! names are a convenience, the tunnels are not.

pub mod names;
pub mod resolved;
pub mod server;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use ipnet::IpNet;
use meshlink_proto::Netmap;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use self::names::NameTable;
use self::server::MeshDns;
use crate::settings::{DnsSettings, DEFAULT_DNS_PORT};

/// Where the server listens: `dns_listen`, else the first of the node's own addresses (IPv4
/// first), port 53. `None` without any address.
pub fn listen_address(settings: &DnsSettings, own: &[IpNet]) -> Option<SocketAddr> {
    settings.listen.or_else(|| {
        let ip = own
            .iter()
            .map(IpNet::addr)
            .find(IpAddr::is_ipv4)
            .or_else(|| own.first().map(IpNet::addr))?;
        Some(SocketAddr::new(ip, DEFAULT_DNS_PORT))
    })
}

/// The UDP socket for `listen`, with `SO_REUSEADDR`: a resolver of the host (dnsmasq, unbound)
/// that binds port 53 on every address, before or after the agent, must not be refused (the
/// kernel gives each datagram to the most specific socket).
fn udp_socket(listen: SocketAddr) -> std::io::Result<tokio::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(listen),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&listen.into())?;
    tokio::net::UdpSocket::from_std(socket.into())
}

/// The handler as hickory's server holds it (shared with the map follower).
struct Shared(Arc<MeshDns>);

#[async_trait::async_trait]
impl RequestHandler for Shared {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response: R,
    ) -> ResponseInfo {
        self.0.handle_request::<R, T>(request, response).await
    }
}

/// A running DNS server.
pub struct DnsService {
    handler: Arc<MeshDns>,
    udp: hickory_server::Server<Shared>,
    tcp: tokio::net::TcpListener,
    listen: SocketAddr,
    network: String,
    suffix: String,
}

impl DnsService {
    /// Binds `listen` (UDP and TCP) and answers the names of `map` (network `network`) under
    /// `settings.suffix` to this host alone (loopback and `own`, the node's overlay
    /// addresses). `None`, after a log line, when it cannot start. Registering with the
    /// host's resolver is apart ([`resolved::Registration::register`]): it waits on D-Bus,
    /// and the mesh must not wait for it.
    ///
    /// Only this host: the names come from this node's map, which under a policy holds only
    /// the peers this node may see; another node asking here would learn of peers its own map
    /// leaves out.
    pub async fn start(
        settings: &DnsSettings,
        listen: SocketAddr,
        network: &str,
        own: &[IpNet],
        map: &Netmap,
    ) -> Option<DnsService> {
        let Some(table) = NameTable::from_map(map, network, &settings.suffix) else {
            warn!(
                network,
                "the network's name is no DNS label: no DNS names for its nodes"
            );
            return None;
        };
        let sockets = async {
            let udp = udp_socket(listen)?;
            let tcp = tokio::net::TcpListener::bind(listen).await?;
            std::io::Result::Ok((udp, tcp))
        };
        let (udp_socket, tcp) = match sockets.await {
            Ok(s) => s,
            Err(e) => {
                warn!(%listen, "DNS server not started: cannot listen: {e} (set dns_listen, or dns = false)");
                return None;
            }
        };
        let askers = own.iter().map(|n| IpNet::from(n.addr())).collect();
        let handler = Arc::new(MeshDns::new(&table, serial(map), askers));
        let mut udp = hickory_server::Server::new(Shared(handler.clone()));
        udp.register_socket(udp_socket);
        info!(%listen, names = table.len(), "DNS server: *.{network}.{}", settings.suffix);
        Some(DnsService {
            handler,
            udp,
            tcp,
            listen,
            network: network.to_string(),
            suffix: settings.suffix.clone(),
        })
    }

    /// Where it listens.
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// The serving half (run it as a task).
    pub fn into_task(self) -> DnsTask {
        DnsTask {
            handler: self.handler,
            udp: self.udp,
            tcp: self.tcp,
            network: self.network,
            suffix: self.suffix,
        }
    }
}

/// The serving half of a [`DnsService`].
pub struct DnsTask {
    handler: Arc<MeshDns>,
    udp: hickory_server::Server<Shared>,
    tcp: tokio::net::TcpListener,
    network: String,
    suffix: String,
}

impl DnsTask {
    /// Serves until dropped, answering from each new map of `maps` (the trusted maps).
    pub async fn run(self, mut maps: watch::Receiver<Netmap>) {
        let DnsTask {
            handler,
            mut udp,
            tcp,
            network,
            suffix,
        } = self;
        let follow = {
            let handler = handler.clone();
            async move {
                // The map may have changed since the server was made from it: answer from
                // this one from the start.
                let mut current = {
                    let map = maps.borrow_and_update();
                    let table = NameTable::from_map(&map, &network, &suffix);
                    if let Some(t) = &table {
                        handler.set(t, serial(&map));
                    }
                    table
                };
                while maps.changed().await.is_ok() {
                    let (table, version) = {
                        let map = maps.borrow_and_update();
                        (NameTable::from_map(&map, &network, &suffix), serial(&map))
                    };
                    if table != current {
                        if let Some(t) = &table {
                            debug!(names = t.len(), version, "DNS names follow the map");
                            handler.set(t, version);
                        }
                        current = table;
                    }
                }
                // The map's sender is gone: the agent is stopping.
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = follow => {}
            () = server::serve_tcp(tcp, handler.clone()) => {}
            r = udp.block_until_done() => {
                if let Err(e) = r {
                    warn!("DNS server (UDP) stopped: {e}");
                }
                std::future::pending::<()>().await;
            }
        }
    }
}

/// A map's version as an SOA serial (serials wrap, as RFC 1982 allows).
fn serial(map: &Netmap) -> u32 {
    map.version as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listens_on_the_first_ipv4_overlay_address_unless_told() {
        let own: Vec<IpNet> = vec![
            "fd00::1/128".parse().unwrap(),
            "100.64.0.5/32".parse().unwrap(),
        ];
        let settings = DnsSettings::default();
        assert_eq!(
            listen_address(&settings, &own),
            Some("100.64.0.5:53".parse().unwrap())
        );
        assert_eq!(
            listen_address(&settings, &own[..1]),
            Some("[fd00::1]:53".parse().unwrap())
        );
        assert_eq!(listen_address(&settings, &[]), None);
        let told = DnsSettings {
            listen: Some("127.0.0.1:5353".parse().unwrap()),
            ..DnsSettings::default()
        };
        assert_eq!(
            listen_address(&told, &own),
            Some("127.0.0.1:5353".parse().unwrap())
        );
    }
}
