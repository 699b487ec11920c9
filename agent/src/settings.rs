//! The agent's validated settings: what configuration files, environment variables and flags
//! become once parsed and checked (see `config`), and what the rest of the agent is built from.
//!
//! Architecture invariant: nothing past this module sees raw configuration text; constructors
//! take these types, which hold only checked values.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use boringtun::x25519;
use ipnet::IpNet;
use meshlink_proto::{Key, PublicKey};

/// The default interface name.
pub const DEFAULT_INTERFACE: &str = "mesh0";
/// The default tunnel MTU: 1500 minus the 80 bytes of IPv6 + UDP + WireGuard overhead.
pub const DEFAULT_MTU: u16 = 1420;
/// The default directory of WireGuard userspace API sockets, where `wg` looks for them.
pub const DEFAULT_UAPI_DIR: &str = meshlink_uapi::DEFAULT_DIR;

/// How long a mesh node trusts a network map that no coordinator has confirmed since, by
/// default: a week (see [`Settings::max_cached_map_age`]).
pub const DEFAULT_MAX_CACHED_MAP_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// The DNS suffix of mesh names by default: `NODE.NETWORK.mesh`.
pub const DEFAULT_DNS_SUFFIX: &str = "mesh";
/// The DNS server's port when `dns_listen` does not say.
pub const DEFAULT_DNS_PORT: u16 = 53;

/// Where the agent serves its Prometheus metrics: never beyond the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsListen {
    /// A TCP address on a loopback interface (`127.0.0.1:9586`, `[::1]:9586`).
    Tcp(SocketAddr),
    /// A Unix socket path, made by the agent (mode 0660) and removed at exit.
    Unix(PathBuf),
}

impl fmt::Display for MetricsListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetricsListen::Tcp(addr) => write!(f, "http://{addr}/metrics"),
            MetricsListen::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// The DNS server of a mesh node (see `crate::dns`): the names of its network's nodes and
/// workloads, from its trusted network map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    /// Whether a mesh node answers DNS at all (on by default; static peers have no map and
    /// never do).
    pub enabled: bool,
    /// Where to answer (UDP and TCP); `None`: the node's own overlay address, port 53.
    pub listen: Option<SocketAddr>,
    /// The suffix of every name, lower case, without dots at either end: `mesh`.
    pub suffix: String,
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings {
            enabled: true,
            listen: None,
            suffix: DEFAULT_DNS_SUFFIX.to_string(),
        }
    }
}

/// A private X25519 key. It is generated on the host that uses it, read from a 0600 file and
/// never printed: `Debug` hides it.
#[derive(Clone)]
pub struct PrivateKey(pub x25519::StaticSecret);

impl PrivateKey {
    /// A fresh key from the operating system's random source, clamped as `wg genkey` prints it.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
        Self::from_bytes(bytes)
    }

    /// The key from its 32 bytes, clamped as `wg genkey` clamps.
    pub fn from_bytes(mut bytes: [u8; 32]) -> Self {
        bytes[0] &= 248;
        bytes[31] = (bytes[31] & 127) | 64;
        PrivateKey(x25519::StaticSecret::from(bytes))
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(x25519::PublicKey::from(&self.0).to_bytes())
    }

    /// The raw bytes, for the userspace API and for writing the key file.
    pub fn to_key(&self) -> Key {
        Key(self.0.to_bytes())
    }
}

impl PartialEq for PrivateKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bytes() == other.0.to_bytes()
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(public {})", self.public_key().short())
    }
}

/// One WireGuard peer as configured.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerConfig {
    /// The peer's static public key; it names the peer.
    pub public_key: PublicKey,
    /// An optional preshared key mixed into the handshake.
    pub preshared_key: Option<Key>,
    /// Where to send to the peer until it roams; `None` waits for the peer to reach us first.
    pub endpoint: Option<SocketAddr>,
    /// The inner addresses this peer may send from and receives packets for.
    pub allowed_ips: Vec<IpNet>,
    /// Seconds between keepalives when otherwise idle; `None` sends none.
    pub persistent_keepalive: Option<u16>,
}

/// The WireGuard side of the device: the part the userspace API reads and writes.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceConfig {
    /// This device's private key.
    pub private_key: PrivateKey,
    /// UDP port to listen on; 0 picks a free one.
    pub listen_port: u16,
    /// Firewall mark set on outgoing UDP packets; `None` or 0 sets none.
    pub fwmark: Option<u32>,
    /// The peers, at most one per public key.
    pub peers: Vec<PeerConfig>,
}

/// Everything `meshlink-agent up` needs, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Interface name (at most 15 bytes).
    pub interface: String,
    /// Overlay addresses assigned to the interface, with their prefix lengths.
    pub addresses: Vec<IpNet>,
    /// Interface MTU.
    pub mtu: u16,
    /// Directory for the userspace API socket (`IFACE.sock`).
    pub uapi_dir: PathBuf,
    /// The WireGuard device.
    pub device: DeviceConfig,
    /// A mesh node's longest trust in a network map that no coordinator has confirmed since
    /// (a map is confirmed when it arrives and all the while a control session is up):
    /// an agent started from a cached map older than this waits for a coordinator instead of
    /// bringing up its peers, and a running agent without a coordinator drops its peers when
    /// its map gets this old. So a node that was away when a peer was revoked does not trust
    /// the revoked peer forever. `None`: no limit. Static peers are not concerned.
    pub max_cached_map_age: Option<Duration>,
    /// Keep blackhole routes for the overlay's prefixes (a joined node's network, a static
    /// node's allowed IPs) at a metric below the tunnel's routes, and leave them when the
    /// agent stops or crashes, so that overlay traffic never leaves in the clear through
    /// another route while it is down. Off: such routes left by an earlier run are removed.
    pub fail_closed: bool,
    /// Route the peers' allowed IPs through the interface: a route to each in the main table
    /// at start, kept equal to the peers' as they change, removed at exit (default routes
    /// excepted). Off where another program owns the routes: wg-quick's userspace hook sets
    /// it off, since wg-quick routes the file's `AllowedIPs` itself (`Table`, policy routing
    /// for `0.0.0.0/0`).
    pub install_routes: bool,
    /// Serve Prometheus metrics there; `None` (the default): no metrics endpoint.
    pub metrics_listen: Option<MetricsListen>,
    /// The DNS server of a mesh node.
    pub dns: DnsSettings,
}
