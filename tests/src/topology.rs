//! Ready-made topologies: hosts with their namespace, addresses, keys and interface name.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;

use crate::agent::{Agent, AgentConfig, PeerConfig};
use crate::keys::Keypair;
use crate::netns::{veth, Netns};
use crate::scratch::ScratchDir;
use crate::unique_name;
use crate::wireguard_go::{WgGoConfig, WireguardGo};

/// The underlay /24 of [`TwoHosts`]. Fixed addresses are safe: they live only inside this
/// run's own namespaces.
pub const UNDERLAY_PREFIX: [u8; 3] = [198, 18, 0];
/// The overlay /24 of [`TwoHosts`].
pub const OVERLAY_PREFIX: [u8; 3] = [100, 64, 0];
/// The WireGuard port each host listens on (inside its own namespace, so no clash).
pub const LISTEN_PORT: u16 = 51820;
/// The tunnel MTU: 1500 on the veth minus WireGuard's worst-case (IPv6) overhead.
pub const TUNNEL_MTU: u16 = 1420;

/// One simulated machine: a namespace with an underlay address on its veth, and what its
/// WireGuard device will use.
#[derive(Debug)]
pub struct Host {
    /// The host's namespace.
    pub ns: Netns,
    /// Its end of the veth.
    pub veth: String,
    /// Its underlay address on the veth (/24).
    pub underlay: Ipv4Addr,
    /// Its overlay address (/24 on the tunnel interface).
    pub overlay: Ipv4Addr,
    /// Its WireGuard keys.
    pub keys: Keypair,
    /// The private key file (mode 0600).
    pub key_file: PathBuf,
    /// The tunnel interface name, unique to this run.
    pub iface: String,
    /// UDP listen port.
    pub listen_port: u16,
}

impl Host {
    /// The host's underlay endpoint.
    pub fn endpoint(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.underlay, self.listen_port))
    }

    /// How other hosts list this one as a peer: its key, endpoint and overlay /32.
    pub fn as_peer(&self) -> PeerConfig {
        PeerConfig {
            public_key: self.keys.public.clone(),
            preshared_key_file: None,
            endpoint: Some(self.endpoint()),
            allowed_ips: vec![format!("{}/32", self.overlay)],
            persistent_keepalive: None,
        }
    }

    /// An agent configuration for this host with `peers`.
    pub fn agent_config(&self, peers: Vec<PeerConfig>) -> AgentConfig {
        AgentConfig {
            interface: self.iface.clone(),
            private_key_file: self.key_file.clone(),
            listen_port: self.listen_port,
            addresses: vec![format!("{}/24", self.overlay)],
            mtu: TUNNEL_MTU,
            uapi_dir: None,
            peers,
        }
    }

    /// A `wireguard-go` configuration for this host with `peers`.
    pub fn wg_go_config(&self, peers: Vec<PeerConfig>) -> WgGoConfig {
        WgGoConfig {
            interface: self.iface.clone(),
            private_key_file: self.key_file.clone(),
            listen_port: self.listen_port,
            addresses: vec![format!("{}/24", self.overlay)],
            mtu: TUNNEL_MTU,
            peers,
        }
    }

    /// Starts `meshlink-agent` on this host with `peers` and waits until it is ready.
    pub fn start_agent(&self, dir: &ScratchDir, peers: Vec<PeerConfig>) -> Agent {
        Agent::start(&self.ns, dir, &self.agent_config(peers))
    }

    /// Starts and configures `wireguard-go` on this host with `peers`.
    pub fn start_wireguard_go(&self, dir: &ScratchDir, peers: Vec<PeerConfig>) -> WireguardGo {
        WireguardGo::start(&self.ns, dir, &self.wg_go_config(peers))
    }
}

/// Two hosts, `a` (198.18.0.1, overlay 100.64.0.1) and `b` (198.18.0.2, overlay 100.64.0.2),
/// joined by one veth with MTU 1500. Nothing runs on them yet.
#[derive(Debug)]
pub struct TwoHosts {
    /// The first host.
    pub a: Host,
    /// The second host.
    pub b: Host,
    /// Configs, keys and logs. Declared last so it is dropped after the hosts.
    pub dir: ScratchDir,
}

impl TwoHosts {
    /// Builds the two namespaces and the veth; `tag` names the scratch directory.
    ///
    /// # Panics
    /// When a namespace, link or key cannot be made.
    pub fn create(tag: &str) -> TwoHosts {
        let dir = ScratchDir::create(tag);
        let ns_a = Netns::create();
        let ns_b = Netns::create();
        let [u0, u1, u2] = UNDERLAY_PREFIX;
        let link = veth(
            &ns_a,
            &format!("{u0}.{u1}.{u2}.1/24"),
            &ns_b,
            &format!("{u0}.{u1}.{u2}.2/24"),
        );
        let host = |ns: Netns, veth: String, n: u8| {
            let keys = Keypair::generate();
            let iface = unique_name("w");
            let key_file = dir.join(&format!("{iface}.key"));
            keys.write_private(&key_file);
            Host {
                ns,
                veth,
                underlay: Ipv4Addr::new(u0, u1, u2, n),
                overlay: Ipv4Addr::new(OVERLAY_PREFIX[0], OVERLAY_PREFIX[1], OVERLAY_PREFIX[2], n),
                keys,
                key_file,
                iface,
                listen_port: LISTEN_PORT,
            }
        };
        let a = host(ns_a, link.a, 1);
        let b = host(ns_b, link.b, 2);
        TwoHosts { a, b, dir }
    }

    /// Both hosts can reach each other on the underlay (one ping each way).
    pub fn underlay_works(&self) -> bool {
        let wait = std::time::Duration::from_secs(2);
        self.a.ns.ping_once(self.b.underlay, wait) && self.b.ns.ping_once(self.a.underlay, wait)
    }
}
