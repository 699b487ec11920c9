//! Providers behind NAT routers on a simulated internet: the test bed of NAT traversal and
//! relays (issue 10).
//!
//! ```text
//!                    switch namespace: bridge "internet", 198.18.0.0/24
//!          |                        |                          |
//!   coordinator host          router A (NAT)             router B (NAT)          ...
//!     198.18.0.10        public 198.18.0.1           public 198.18.0.2
//!   (other public hosts   LAN bridge 198.18.1.1/24    LAN bridge 198.18.2.1/24
//!    198.18.0.11, ...)        |          |                |          |
//!                           host       host             host       host
//!                        198.18.1.10 198.18.1.11     198.18.2.10 198.18.2.11
//! ```
//!
//! Each router namespace forwards between its LAN and the internet segment and knows no route
//! to any other LAN, so a packet from one provider's host to another provider's private
//! address dies at its own router: the only way between providers is through the routers'
//! public addresses. LAN hosts route the whole underlay (198.18.0.0/15) through their router;
//! hosts on the internet segment (the coordinator's) route only that /24 and cannot reach any
//! LAN. Nothing has a default route.
//!
//! Each router runs one nftables table, `ip meshlink`:
//! - `postrouting` (nat): what leaves on the internet side is masqueraded to the router's
//!   public address, as its [`NatMode`] says: [`NatMode::Masquerade`] keeps source ports
//!   where it can, so one LAN socket has one public address for every destination (an
//!   endpoint-independent mapping); [`NatMode::RandomMasquerade`] picks a random port for every
//!   new flow, so each destination sees another one (a "symmetric" NAT).
//! - `forward` (filter): from the internet side only replies (`ct state established,related`)
//!   get in, as through any stateful NAT; first it jumps to `block`, empty unless a test blocks
//!   UDP ([`NatBed::block_udp_except`]), and further rules may be added and removed at run time
//!   ([`NatBed::add_forward_rule`]).
//! - `input` (filter): unsolicited packets from the internet side to the router itself are
//!   dropped (but ICMP). Besides being what a router's firewall does, this keeps the mapping
//!   endpoint-independent in the usual hole-punching race: a peer's packet that arrives before
//!   the LAN host has sent one its way would otherwise leave a conntrack entry on the router's
//!   own address and port, and the host's first packet out would then be given another port.
//!   A dropped packet leaves no entry.
//!
//! Everything lives in this run's namespaces (names from [`crate::unique_name`]); the
//! namespaces are deleted by their guards, and the nftables tables and bridges go with them.
//!
//! [`NatMesh`] puts a mesh on the bed: a coordinator on its internet host, a network and a
//! join token, agents on LAN hosts, and their paths to each other as `status` reports them
//! ([`PeerPath`]). The namespace tests (`tests/tests/nat.rs`) and the NAT benchmark
//! (`benches/natbench`) both start from it.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::coordinator::Coordinator;
use crate::mesh::{MeshAgent, Reach};
use crate::netns::{veth_link, Netns, NsRef};
use crate::process::{Process, Stdout};
use crate::providers::{Provider, ProviderHost, FIRST_HOST_OCTET, UNDERLAY};
use crate::scratch::ScratchDir;
use crate::wait::wait_until;
use crate::{agent_bin, coordinator_bin, meshctl_bin, require_tool, unique_name};

/// The simulated internet: the segment every router's public side and the coordinator's host
/// share.
pub const INTERNET: &str = "198.18.0.0/24";
/// The coordinator's host on the internet segment.
pub const COORDINATOR_HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
/// The most routers a bed may have: their public addresses, `198.18.0.1` onwards, stay below
/// [`COORDINATOR_HOST`].
pub const MAX_ROUTERS: usize = 9;
/// The nftables table each router's rules live in (inside the router's own namespace).
const TABLE: &str = "meshlink";

/// How a router translates what its LAN sends to the internet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatMode {
    /// `masquerade`: Linux keeps the source port where it can, so a LAN socket has one public
    /// `address:port` whatever it sends to (an endpoint-independent mapping, in practice).
    Masquerade,
    /// `masquerade random,fully-random`: every new flow gets a random port, so each
    /// destination sees the socket at another public port (a symmetric NAT).
    RandomMasquerade,
}

impl NatMode {
    /// The nftables statement.
    fn statement(self) -> &'static str {
        match self {
            NatMode::Masquerade => "masquerade",
            NatMode::RandomMasquerade => "masquerade random,fully-random",
        }
    }
}

/// A host on the internet segment itself (no NAT in front of it), such as the coordinator's.
#[derive(Debug)]
pub struct PublicHost {
    /// The host's namespace.
    pub ns: Netns,
    /// Its address on the internet segment (/24).
    pub address: Ipv4Addr,
    /// Its end of the veth to the internet bridge.
    pub veth: String,
}

impl PublicHost {
    /// A cloneable reference to its namespace.
    pub fn handle(&self) -> NsRef {
        self.ns.handle()
    }
}

/// One provider's NAT router.
#[derive(Debug)]
pub struct Router {
    /// The router's namespace.
    pub ns: Netns,
    /// How it translates.
    pub mode: NatMode,
    /// Its address on the internet segment: what the internet sees its LAN hosts as.
    pub public: Ipv4Addr,
    /// Its interface on the internet segment.
    pub wan: String,
    /// Its LAN bridge (with the provider's gateway address).
    pub lan: String,
}

/// A rule added at run time with [`NatBed::add_forward_rule`], for [`NatBed::remove_rule`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleHandle {
    provider: Provider,
    handle: u64,
}

/// The internet segment, the coordinator's host on it, and one NAT router per provider.
///
/// LAN hosts are added with [`NatBed::add_host`] and owned by the caller (drop them, with the
/// processes in them, before the bed); more hosts on the internet segment with
/// [`NatBed::add_public_host`].
#[derive(Debug)]
pub struct NatBed {
    /// The namespace holding the internet bridge.
    pub switch: Netns,
    bridge: String,
    coordinator: PublicHost,
    routers: Vec<Router>,
    next_lan_octet: Vec<u8>,
    next_public_octet: u8,
}

impl NatBed {
    /// Builds the internet segment with the coordinator's host on it, and one router per
    /// entry of `modes`: `modes[0]` for [`Provider::A`] (LAN 198.18.1.0/24, public
    /// 198.18.0.1), `modes[1]` for [`Provider::B`], and so on.
    ///
    /// # Panics
    /// With no modes or more than [`MAX_ROUTERS`], or when a namespace, link, address or
    /// nftables rule cannot be made.
    pub fn create(modes: &[NatMode]) -> NatBed {
        assert!(
            (1..=MAX_ROUTERS).contains(&modes.len()),
            "between 1 and {MAX_ROUTERS} routers"
        );
        let switch = Netns::create();
        let bridge = unique_name("br");
        switch.ip(&["link", "add", &bridge, "type", "bridge"]);
        switch.ip(&["link", "set", &bridge, "up"]);
        let coordinator = attach_public_host(&switch, &bridge, COORDINATOR_HOST);
        let mut bed = NatBed {
            switch,
            bridge,
            coordinator,
            routers: Vec::with_capacity(modes.len()),
            next_lan_octet: vec![FIRST_HOST_OCTET; modes.len()],
            next_public_octet: COORDINATOR_HOST.octets()[3] + 1,
        };
        for (i, mode) in modes.iter().enumerate() {
            let router = bed.make_router(Provider(i), *mode);
            bed.routers.push(router);
        }
        bed
    }

    fn make_router(&self, provider: Provider, mode: NatMode) -> Router {
        let ns = Netns::create();
        ns.sysctl("net/ipv4/ip_forward", "1");
        let public = public_address(provider);
        let link = veth_link(&ns, &self.switch);
        self.switch
            .ip(&["link", "set", &link.b, "master", &self.bridge]);
        ns.ip(&["addr", "add", &format!("{public}/24"), "dev", &link.a]);
        let lan = unique_name("br");
        ns.ip(&["link", "add", &lan, "type", "bridge"]);
        ns.ip(&[
            "addr",
            "add",
            &format!("{}/24", provider.gateway()),
            "dev",
            &lan,
        ]);
        ns.ip(&["link", "set", &lan, "up"]);
        nft(&ns, &ruleset(&link.a, mode));
        Router {
            ns,
            mode,
            public,
            wan: link.a,
            lan,
        }
    }

    /// The coordinator's host, [`COORDINATOR_HOST`] on the internet segment.
    pub fn coordinator_host(&self) -> &PublicHost {
        &self.coordinator
    }

    /// The router of `provider`.
    ///
    /// # Panics
    /// When the bed has no such provider.
    pub fn router(&self, provider: Provider) -> &Router {
        self.routers
            .get(provider.0)
            .unwrap_or_else(|| panic!("the bed has no provider {}", provider.letter()))
    }

    /// The public address of `provider`'s router: what the internet sees its hosts as.
    ///
    /// # Panics
    /// When the bed has no such provider.
    pub fn public_address(&self, provider: Provider) -> Ipv4Addr {
        self.router(provider).public
    }

    /// How many providers (routers) there are.
    pub fn count(&self) -> usize {
        self.routers.len()
    }

    /// A new host on `provider`'s LAN, with the next free address (`.10`, `.11`, ...) and a
    /// route for the whole underlay through the provider's router (and no default route).
    ///
    /// # Panics
    /// When there is no such provider, its /24 is full, or an `ip` command fails.
    pub fn add_host(&mut self, provider: Provider) -> ProviderHost {
        let router = self.router(provider);
        let octet = self.next_lan_octet[provider.0];
        assert!(octet < 255, "provider {} is full", provider.letter());
        let underlay = Ipv4Addr::new(198, 18, provider.octet(), octet);
        let ns = Netns::create();
        let link = veth_link(&ns, &router.ns);
        router
            .ns
            .ip(&["link", "set", &link.b, "master", &router.lan]);
        ns.ip(&["addr", "add", &format!("{underlay}/24"), "dev", &link.a]);
        ns.ip(&[
            "route",
            "add",
            UNDERLAY,
            "via",
            &provider.gateway().to_string(),
        ]);
        self.next_lan_octet[provider.0] = octet + 1;
        ProviderHost {
            ns,
            provider,
            underlay,
            veth: link.a,
        }
    }

    /// A new host on the internet segment (`198.18.0.11`, `.12`, ...), reachable from every
    /// LAN through its router and routing only the internet /24.
    ///
    /// # Panics
    /// When the segment is full or an `ip` command fails.
    pub fn add_public_host(&mut self) -> PublicHost {
        let octet = self.next_public_octet;
        assert!(octet < 255, "the internet segment is full");
        let host = attach_public_host(&self.switch, &self.bridge, Ipv4Addr::new(198, 18, 0, octet));
        self.next_public_octet = octet + 1;
        host
    }

    /// Blocks UDP from `provider`'s LAN to the internet, except to `allowed`: what a
    /// restrictive corporate firewall does. Replaces any earlier block of this router;
    /// [`NatBed::unblock`] lifts it. Flows already established are cut as well.
    ///
    /// # Panics
    /// When nftables refuses the rule.
    pub fn block_udp_except(&self, provider: Provider, allowed: Ipv4Addr) {
        let router = self.router(provider);
        nft(
            &router.ns,
            &format!(
                "flush chain ip {TABLE} block\n\
                 add rule ip {TABLE} block oifname \"{wan}\" meta l4proto udp \
                 ip daddr != {allowed} drop\n",
                wan = router.wan
            ),
        );
    }

    /// Drops every UDP datagram `provider`'s hosts send out to the internet, the
    /// coordinator's included (a firewall that lets only TCP out); lifted by
    /// [`NatBed::unblock`].
    ///
    /// # Panics
    /// When nftables refuses the rule.
    pub fn block_all_udp(&self, provider: Provider) {
        let router = self.router(provider);
        nft(
            &router.ns,
            &format!(
                "flush chain ip {TABLE} block\n\
                 add rule ip {TABLE} block oifname \"{wan}\" meta l4proto udp drop\n",
                wan = router.wan
            ),
        );
    }

    /// Blocks UDP from `provider`'s LAN to the internet except to the hosts `allowed` (the
    /// coordinator and standalone relays, say); as [`NatBed::block_udp_except`] otherwise.
    ///
    /// # Panics
    /// When nftables refuses the rule.
    pub fn block_udp_except_hosts(&self, provider: Provider, allowed: &[Ipv4Addr]) {
        let router = self.router(provider);
        let set = allowed
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        nft(
            &router.ns,
            &format!(
                "flush chain ip {TABLE} block\n\
                 add rule ip {TABLE} block oifname \"{wan}\" meta l4proto udp \
                 ip daddr != {{ {set} }} drop\n",
                wan = router.wan
            ),
        );
    }

    /// [`NatBed::block_udp_except`] the coordinator's host.
    ///
    /// # Panics
    /// When nftables refuses the rule.
    pub fn block_udp_except_coordinator(&self, provider: Provider) {
        self.block_udp_except(provider, COORDINATOR_HOST);
    }

    /// Lifts the UDP block of `provider`'s router, if any.
    ///
    /// # Panics
    /// When nftables fails.
    pub fn unblock(&self, provider: Provider) {
        nft(
            &self.router(provider).ns,
            &format!("flush chain ip {TABLE} block\n"),
        );
    }

    /// Appends `rule` (nftables syntax, e.g. `meta l4proto udp ip daddr 198.18.0.2 drop`) to
    /// the forward chain of `provider`'s router, after the block and before the stateful
    /// inbound filter; returns a handle for [`NatBed::remove_rule`].
    ///
    /// # Panics
    /// When nftables refuses the rule or does not say its handle.
    pub fn add_forward_rule(&self, provider: Provider, rule: &str) -> RuleHandle {
        let router = self.router(provider);
        // `insert ... position` would need a handle to insert before; instead every run-time
        // rule goes right after the jump to `block`, which is the chain's first rule.
        let jump = chain_handles(&router.ns, "forward")
            .into_iter()
            .next()
            .expect("the forward chain starts with the jump to `block`");
        let script = format!("add rule ip {TABLE} forward position {jump} {rule}");
        let out = router.ns.run("nft", &["--echo", "--handle", &script]);
        // The echo is the rule ending in `# handle N`, then a `# new generation` line.
        let handle = out
            .lines()
            .find_map(|l| l.rsplit_once("# handle ")?.1.trim().parse().ok())
            .unwrap_or_else(|| panic!("nft did not say the new rule's handle: {out}"));
        RuleHandle { provider, handle }
    }

    /// Removes a rule added with [`NatBed::add_forward_rule`].
    ///
    /// # Panics
    /// When nftables fails (for instance, when the rule was removed already).
    pub fn remove_rule(&self, rule: &RuleHandle) {
        let router = self.router(rule.provider);
        router.ns.run(
            "nft",
            &[format!(
                "delete rule ip {TABLE} forward handle {}",
                rule.handle
            )],
        );
    }

    /// The ruleset of `provider`'s router, with counters, for failure messages.
    pub fn ruleset(&self, provider: Provider) -> String {
        let out = self
            .router(provider)
            .ns
            .exec("nft", &["--handle", "list", "ruleset"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// `198.18.0.N` for the router of provider `N - 1`.
fn public_address(provider: Provider) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, provider.octet())
}

/// A namespace on the internet bridge with `address/24` and no other route.
fn attach_public_host(switch: &NsRef, bridge: &str, address: Ipv4Addr) -> PublicHost {
    let ns = Netns::create();
    let link = veth_link(&ns, switch);
    switch.ip(&["link", "set", &link.b, "master", bridge]);
    ns.ip(&["addr", "add", &format!("{address}/24"), "dev", &link.a]);
    PublicHost {
        ns,
        address,
        veth: link.a,
    }
}

/// The router's table: NAT out of `wan`, replies only in from it, and an empty `block` chain.
fn ruleset(wan: &str, mode: NatMode) -> String {
    let masquerade = mode.statement();
    format!(
        "table ip {TABLE} {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname \"{wan}\" {masquerade}
  }}
  chain block {{
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    jump block
    iifname \"{wan}\" ct state established,related accept
    iifname \"{wan}\" drop
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname \"{wan}\" ct state established,related accept
    iifname \"{wan}\" meta l4proto icmp accept
    iifname \"{wan}\" drop
  }}
}}
"
    )
}

/// The handles of a chain's rules, in order.
fn chain_handles(ns: &NsRef, chain: &str) -> Vec<u64> {
    let out = ns.run("nft", &["--handle", "list", "chain", "ip", TABLE, chain]);
    // The table's and the chain's own lines carry handles too.
    out.lines()
        .map(str::trim_start)
        .filter(|l| !l.starts_with("table ") && !l.starts_with("chain "))
        .filter_map(|l| l.rsplit_once("# handle ")?.1.trim().parse().ok())
        .collect()
}

/// Runs an nftables script in `ns` (`nft -f -`, the script on stdin).
///
/// # Panics
/// When `nft` cannot start or refuses the script; the message has the script and nft's error.
pub fn nft(ns: &NsRef, script: &str) {
    let mut cmd = ns.command("nft");
    cmd.args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start nft in {}: {e}", ns.name()));
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(script.as_bytes())
        .unwrap_or_else(|e| panic!("writing to nft: {e}"));
    let out = child.wait_with_output().expect("wait for nft");
    assert!(
        out.status.success(),
        "nft -f in {} failed ({}):\n{script}\n{}",
        ns.name(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim_end()
    );
}

/// A UDP echo server (`python3`) that answers every datagram with the `ip:port` it came from,
/// as text: what a host on the internet sees of a NATed sender.
#[derive(Debug)]
pub struct UdpEcho {
    process: Process,
    /// The ports it listens on, on every address of its namespace.
    pub ports: Vec<u16>,
}

const ECHO_SERVER: &str = "
import select, socket, sys
ports, _, punch = ' '.join(sys.argv[1:]).partition(' --punch ')
socks = []
for port in ports.split():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(('0.0.0.0', int(port)))
    socks.append(s)
for dest in punch.split():
    host, port = dest.rsplit(':', 1)
    for s in socks:
        s.sendto(b'punch', (host, int(port)))
print('ready', flush=True)
while True:
    readable, _, _ = select.select(socks, [], [])
    for s in readable:
        data, addr = s.recvfrom(2048)
        s.sendto(('%s:%d' % addr).encode(), addr)
";

const PROBE: &str = "
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(('0.0.0.0', int(sys.argv[1])))
wait = float(sys.argv[2])
for dest in sys.argv[3:]:
    host, port = dest.rsplit(':', 1)
    dest = (host, int(port))
    answer = 'timeout'
    for attempt in range(3):
        try:
            s.sendto(b'probe', dest)
        except OSError as e:
            answer = 'error'
            break
        deadline = time.monotonic() + wait / 3
        while answer == 'timeout':
            left = deadline - time.monotonic()
            if left <= 0:
                break
            s.settimeout(left)
            try:
                data, source = s.recvfrom(2048)
            except socket.timeout:
                break
            except OSError:
                continue
            if source == dest:
                answer = data.decode()
        if answer != 'timeout':
            break
    print(answer, flush=True)
";

impl UdpEcho {
    /// Starts the server in `ns` on `ports` and waits until it has bound them; logs to `log`.
    ///
    /// # Panics
    /// When `python3` cannot start or the server is not ready within 10 s.
    pub fn start(ns: &NsRef, ports: &[u16], log: &Path) -> UdpEcho {
        UdpEcho::start_punching(ns, ports, &[], log)
    }

    /// Like [`UdpEcho::start`], and before answering anything, sends one datagram from each
    /// port to each of `punch`: behind a NAT, that opens the way for answers from there (a
    /// hole punched, as two peers do to reach each other).
    ///
    /// # Panics
    /// As [`UdpEcho::start`].
    pub fn start_punching(
        ns: &NsRef,
        ports: &[u16],
        punch: &[SocketAddrV4],
        log: &Path,
    ) -> UdpEcho {
        let mut cmd = ns.daemon_command("python3");
        cmd.args(["-c", ECHO_SERVER]);
        cmd.args(ports.iter().map(u16::to_string));
        if !punch.is_empty() {
            cmd.arg("--punch");
            cmd.args(punch.iter().map(ToString::to_string));
        }
        let process = Process::spawn(
            &format!("udp echo in {}", ns.name()),
            cmd,
            log,
            Stdout::Lines,
        );
        process
            .wait_for_line("ready", Duration::from_secs(10))
            .unwrap_or_else(|| panic!("the UDP echo did not start:\n{}", process.log_tail(20)));
        UdpEcho {
            process,
            ports: ports.to_vec(),
        }
    }

    /// The server's process.
    pub fn process(&mut self) -> &mut Process {
        &mut self.process
    }
}

/// Sends one datagram from `ns`, from local port `local_port`, to each of `destinations` in
/// turn (one socket for all, three tries each within `wait`), and returns what each
/// [`UdpEcho`] saw as the sender: `None` where no answer came.
///
/// # Panics
/// When `python3` cannot run or prints something unexpected.
pub fn udp_probe(
    ns: &NsRef,
    local_port: u16,
    destinations: &[SocketAddrV4],
    wait: Duration,
) -> Vec<Option<SocketAddrV4>> {
    let mut args = vec![
        "-c".to_string(),
        PROBE.to_string(),
        local_port.to_string(),
        wait.as_secs_f64().to_string(),
    ];
    args.extend(destinations.iter().map(ToString::to_string));
    let out = ns.run("python3", &args);
    let answers: Vec<Option<SocketAddrV4>> = out
        .lines()
        .map(|line| match line.trim() {
            "timeout" | "error" => None,
            seen => Some(
                seen.parse()
                    .unwrap_or_else(|e| panic!("the UDP probe printed {seen:?}: {e}")),
            ),
        })
        .collect();
    assert_eq!(
        answers.len(),
        destinations.len(),
        "the UDP probe printed {out:?}"
    );
    answers
}

// ---------------------------------------------------------------------------------------------
// A mesh on the bed.

/// The network a [`NatMesh`] makes.
pub const NETWORK: &str = "prod";
/// Its overlay prefix.
pub const NETWORK_CIDR: &str = "100.64.0.0/16";

/// A mesh behind NAT routers: the bed, the coordinator on its internet host, and agents on
/// LAN hosts that join with one token.
///
/// Dropping it ends the agents, then the coordinator, then deletes the namespaces; the scratch
/// directory (logs, state) goes last, and is kept when a panic unwinds through the drop.
#[derive(Debug)]
pub struct NatMesh {
    // Field order is drop order: processes before the namespaces they run in, and the
    // scratch directory last.
    agents: Vec<MeshAgent>,
    relays: Vec<StandaloneRelay>,
    /// The other coordinators of a mesh of several ([`NatMesh::with_coordinators`]).
    others: Vec<Coordinator>,
    coord: Coordinator,
    other_hosts: Vec<PublicHost>,
    hosts: Vec<ProviderHost>,
    bed: NatBed,
    /// A join token per coordinator (`tokens[i]` made through coordinator `i`, so that its
    /// list of coordinators begins with that one): agents join with the first unless told.
    tokens: Vec<String>,
    dir: ScratchDir,
}

impl NatMesh {
    /// Builds the bed with `modes` (see [`NatBed::create`]), starts the coordinator on its
    /// internet host, and makes the network [`NETWORK`] and a join token for up to 8 agents.
    /// `name` tags the scratch directory.
    ///
    /// The caller checks for root first ([`crate::require_root`]).
    ///
    /// # Panics
    /// When `nft` or a binary is missing (the message says how to get it), or the bed or the
    /// coordinator cannot be set up.
    pub fn new(name: &str, modes: &[NatMode]) -> NatMesh {
        require_tool("nft", "nftables");
        agent_bin();
        coordinator_bin();
        meshctl_bin();
        let dir = ScratchDir::create(name);
        let bed = NatBed::create(modes);
        let coord = Coordinator::start(&bed.coordinator_host().handle(), &dir, COORDINATOR_HOST);
        let ctl = coord.meshctl();
        ctl.network_create(NETWORK, NETWORK_CIDR);
        let token = ctl.token_create(NETWORK, Some(8), Some("1h"));
        NatMesh {
            agents: Vec::new(),
            relays: Vec::new(),
            others: Vec::new(),
            coord,
            other_hosts: Vec::new(),
            hosts: Vec::new(),
            bed,
            tokens: vec![token],
            dir,
        }
    }

    /// As [`NatMesh::new`], with a standalone relay (`meshlink-relay`) per name of `relays`,
    /// each on a host of its own on the internet segment (198.18.0.11, .12, ...), listening on
    /// [`RELAY_PORT`] and registered in the coordinator's configuration (`[[relays]]`, region
    /// `region-NAME`, provider `bed`). The relays start after the coordinator, with its
    /// certificate.
    ///
    /// # Panics
    /// As [`NatMesh::new`], and when a relay cannot be set up or does not start.
    pub fn with_relays(name: &str, modes: &[NatMode], relays: &[&str]) -> NatMesh {
        require_tool("nft", "nftables");
        agent_bin();
        coordinator_bin();
        meshctl_bin();
        crate::relay_bin();
        let dir = ScratchDir::create(name);
        let mut bed = NatBed::create(modes);
        let mut config = String::new();
        let mut pending = Vec::new();
        for relay in relays {
            let host = bed.add_public_host();
            let state = dir.join(&format!("relay-{relay}"));
            let addr = SocketAddrV4::new(host.address, RELAY_PORT);
            let out = std::process::Command::new(crate::relay_bin())
                .arg("--state-dir")
                .arg(&state)
                .args(["init", "--name", relay, "--addr", &addr.to_string()])
                .args(["--region", &format!("region-{relay}"), "--provider", "bed"])
                .output()
                .expect("meshlink-relay init runs");
            assert!(
                out.status.success(),
                "meshlink-relay init failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            config.push_str(&String::from_utf8_lossy(&out.stdout));
            pending.push((relay.to_string(), host, state, addr));
        }
        let config_path = dir.join("coordinator.toml");
        std::fs::write(&config_path, &config).expect("the coordinator configuration is written");
        let config_arg = config_path.display().to_string();
        let coord = Coordinator::start_with(
            &bed.coordinator_host().handle(),
            &dir,
            COORDINATOR_HOST,
            &["--config", &config_arg],
        );
        let cert = coord.state_dir().join("coordinator.crt");
        let relays = pending
            .into_iter()
            .map(|(name, host, state, addr)| {
                StandaloneRelay::start(name, host, state, addr, &cert, &dir)
            })
            .collect();
        let ctl = coord.meshctl();
        ctl.network_create(NETWORK, NETWORK_CIDR);
        let token = ctl.token_create(NETWORK, Some(8), Some("1h"));
        NatMesh {
            agents: Vec::new(),
            relays,
            others: Vec::new(),
            coord,
            other_hosts: Vec::new(),
            hosts: Vec::new(),
            bed,
            tokens: vec![token],
            dir,
        }
    }

    /// As [`NatMesh::new`], with `count` coordinators sharing one database of the test
    /// process's private PostgreSQL cluster and one identity: the first on the coordinator's
    /// host, the others on hosts of their own on the internet segment (198.18.0.11, .12, ...),
    /// every one listing all. Each makes a join token ([`NatMesh::spawn_via`]). `None` (said
    /// why) when PostgreSQL is missing and skipping is allowed.
    ///
    /// # Panics
    /// As [`NatMesh::new`]; when PostgreSQL is missing under `CI=true`, or a coordinator does
    /// not start.
    pub fn with_coordinators(name: &str, modes: &[NatMode], count: usize) -> Option<NatMesh> {
        require_tool("nft", "nftables");
        agent_bin();
        coordinator_bin();
        meshctl_bin();
        let cluster = crate::postgres::PgCluster::shared()?;
        let store = cluster
            .create_database("natmesh")
            .unwrap_or_else(|e| panic!("a database for the coordinators: {e}"));
        let dir = ScratchDir::create(name);
        let mut bed = NatBed::create(modes);
        let other_hosts: Vec<PublicHost> = (1..count).map(|_| bed.add_public_host()).collect();
        let list: Vec<SocketAddrV4> = std::iter::once(COORDINATOR_HOST)
            .chain(other_hosts.iter().map(|h| h.address))
            .map(|ip| SocketAddrV4::new(ip, crate::coordinator::QUIC_PORT))
            .collect();
        let start = |ns: &NsRef, ip: Ipv4Addr, n: usize, first: Option<&Path>| {
            let name = format!("coord-{n}");
            let shared = crate::coordinator::Shared {
                name: &name,
                store: &store,
                coordinators: &list,
                identity_from: first,
            };
            Coordinator::start_shared(ns, &dir, ip, &shared)
        };
        let coord = start(&bed.coordinator_host().handle(), COORDINATOR_HOST, 1, None);
        let others: Vec<Coordinator> = other_hosts
            .iter()
            .enumerate()
            .map(|(i, h)| start(&h.handle(), h.address, i + 2, Some(coord.state_dir())))
            .collect();
        coord.meshctl().network_create(NETWORK, NETWORK_CIDR);
        let tokens = std::iter::once(&coord)
            .chain(&others)
            .map(|c| c.meshctl().token_create(NETWORK, Some(8), Some("1h")))
            .collect();
        Some(NatMesh {
            agents: Vec::new(),
            relays: Vec::new(),
            others,
            coord,
            other_hosts,
            hosts: Vec::new(),
            bed,
            tokens,
            dir,
        })
    }

    /// Every coordinator: the first one, then the others of a mesh of several.
    pub fn coordinators(&self) -> Vec<&Coordinator> {
        std::iter::once(&self.coord).chain(&self.others).collect()
    }

    /// The hosts of every coordinator: the coordinator's host first.
    pub fn coordinator_hosts(&self) -> Vec<Ipv4Addr> {
        std::iter::once(COORDINATOR_HOST)
            .chain(self.other_hosts.iter().map(|h| h.address))
            .collect()
    }

    /// The standalone relay called `name`.
    ///
    /// # Panics
    /// When there is none.
    pub fn relay(&mut self, name: &str) -> &mut StandaloneRelay {
        self.relays
            .iter_mut()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("no relay {name}"))
    }

    /// The addresses of the standalone relays' hosts.
    pub fn relay_hosts(&self) -> Vec<Ipv4Addr> {
        self.relays.iter().map(|r| *r.addr.ip()).collect()
    }

    /// Starts an agent called `name` on a new host of each `provider`'s LAN, all at once,
    /// without waiting for them (labelled `provider=A`, ...). The hosts are made first, so
    /// that the agents start within moments of each other; returns when the first one was
    /// started.
    ///
    /// # Panics
    /// When a host cannot be made or an agent cannot be started.
    pub fn spawn(&mut self, nodes: &[(&str, Provider)]) -> Instant {
        self.spawn_via(nodes, 0)
    }

    /// [`NatMesh::spawn`] with the join token of coordinator `coordinator` (0: the first),
    /// which the agents therefore try first.
    ///
    /// # Panics
    /// As [`NatMesh::spawn`]; when there is no such coordinator.
    pub fn spawn_via(&mut self, nodes: &[(&str, Provider)], coordinator: usize) -> Instant {
        let token = self.tokens[coordinator].clone();
        let hosts: Vec<ProviderHost> = nodes
            .iter()
            .map(|(_, provider)| self.bed.add_host(*provider))
            .collect();
        let started = Instant::now();
        for ((name, provider), host) in nodes.iter().zip(hosts) {
            let label = provider.letter().to_string();
            let agent =
                MeshAgent::spawn_join(&host.ns, &self.dir, &token, name, &[("provider", &label)]);
            self.hosts.push(host);
            self.agents.push(agent);
        }
        started
    }

    /// [`NatMesh::spawn`], then waits until every new agent is up; returns how long it took.
    ///
    /// # Panics
    /// As [`NatMesh::spawn`], and when an agent exits or is not up within
    /// [`crate::mesh::READY_TIMEOUT`] (with its log).
    pub fn join(&mut self, nodes: &[(&str, Provider)]) -> Duration {
        self.join_via(nodes, 0)
    }

    /// [`NatMesh::join`] with the join token of coordinator `coordinator` (see
    /// [`NatMesh::spawn_via`]).
    ///
    /// # Panics
    /// As [`NatMesh::join`].
    pub fn join_via(&mut self, nodes: &[(&str, Provider)], coordinator: usize) -> Duration {
        let first = self.agents.len();
        let started = self.spawn_via(nodes, coordinator);
        for agent in &mut self.agents[first..] {
            agent.wait_ready(crate::mesh::READY_TIMEOUT);
        }
        started.elapsed()
    }

    /// The bed the mesh runs on.
    pub fn bed(&self) -> &NatBed {
        &self.bed
    }

    /// The coordinator.
    pub fn coordinator(&self) -> &Coordinator {
        &self.coord
    }

    /// The scratch directory: state, tokens and every process's log.
    pub fn dir(&self) -> &ScratchDir {
        &self.dir
    }

    /// The agent called `name`.
    ///
    /// # Panics
    /// When there is none.
    pub fn agent(&self, name: &str) -> &MeshAgent {
        self.agents
            .iter()
            .find(|a| a.name() == name)
            .unwrap_or_else(|| panic!("no agent {name}"))
    }

    /// The provider of the host `name` runs on.
    ///
    /// # Panics
    /// When there is no such agent.
    pub fn provider_of(&self, name: &str) -> Provider {
        let ns = self.agent(name).ns();
        self.hosts
            .iter()
            .find(|h| h.ns.name() == ns.name())
            .map(|h| h.provider)
            .unwrap_or_else(|| panic!("no host for {name}"))
    }

    /// The public address of the router in front of agent `name`: where its peers reach it
    /// on a direct path.
    ///
    /// # Panics
    /// When there is no such agent.
    pub fn public_address_of(&self, name: &str) -> Ipv4Addr {
        self.bed.public_address(self.provider_of(name))
    }

    /// Every agent's `status` JSON, for failure messages.
    pub fn statuses(&self) -> String {
        let mut out = String::new();
        for a in &self.agents {
            let status = a.try_status().map_or_else(
                || "(no answer)".to_owned(),
                |s| serde_json::to_string_pretty(&s).unwrap_or_default(),
            );
            out.push_str(&format!("---- status of {} ----\n{status}\n", a.name()));
        }
        out
    }

    /// Waits until every path answers a ping; returns the longest wait.
    ///
    /// # Panics
    /// When a path gives no reply within `timeout`, with every agent's status.
    pub fn reach(&self, paths: &[Reach], timeout: Duration) -> Duration {
        match Reach::wait_all(paths, timeout) {
            Ok(took) => took.into_iter().max().unwrap_or_default(),
            Err(e) => panic!("{e}\n{}", self.statuses()),
        }
    }

    /// Paths both ways between each pair of `names`.
    ///
    /// # Panics
    /// When an agent is missing or reports no address.
    pub fn both_ways(&self, names: &[&str]) -> Vec<Reach> {
        let nodes: Vec<(&str, &NsRef, Ipv4Addr)> = names
            .iter()
            .map(|n| {
                let a = self.agent(n);
                (a.name(), a.ns(), a.address())
            })
            .collect();
        Reach::all_pairs(&nodes)
    }

    /// The path from `from` to `to` as `from`'s status shows it (all `None` while `from`
    /// does not answer).
    ///
    /// # Panics
    /// When either agent is missing, or `to` does not answer `status`.
    pub fn path(&self, from: &str, to: &str) -> PeerPath {
        let key = self.agent(to).public_key();
        self.agent(from)
            .try_status()
            .map_or_else(PeerPath::default, |s| PeerPath::of(&s, &key))
    }

    /// Waits until `check` holds for the path of every ordered pair of `names`, for at most
    /// `timeout`, asking every [`crate::wait::POLL_INTERVAL`]; returns how long it took.
    ///
    /// # Errors
    /// When `timeout` passes first: a message with `what`, every path as last seen and every
    /// agent's status.
    pub fn settle_paths(
        &self,
        names: &[&str],
        timeout: Duration,
        what: &str,
        check: impl Fn(&str, &str, &PeerPath) -> bool,
    ) -> Result<Duration, String> {
        let started = Instant::now();
        let result = wait_until(timeout, what, || {
            names
                .iter()
                .flat_map(|from| names.iter().map(move |to| (*from, *to)))
                .filter(|(from, to)| from != to)
                .all(|(from, to)| check(from, to, &self.path(from, to)))
                .then_some(())
        });
        match result {
            Ok(()) => Ok(started.elapsed()),
            Err(e) => {
                let mut paths = String::new();
                for from in names {
                    for to in names.iter().filter(|t| *t != from) {
                        paths.push_str(&format!("{from} -> {to}: {:?}\n", self.path(from, to)));
                    }
                }
                Err(format!("{e}\n{paths}{}", self.statuses()))
            }
        }
    }

    /// [`NatMesh::settle_paths`], panicking on a timeout.
    ///
    /// # Panics
    /// When `timeout` passes first, with the paths and every agent's status.
    pub fn wait_paths(
        &self,
        names: &[&str],
        timeout: Duration,
        what: &str,
        check: impl Fn(&str, &str, &PeerPath) -> bool,
    ) -> Duration {
        self.settle_paths(names, timeout, what, check)
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

/// The port standalone relays listen on in the bed (QUIC and TLS/TCP).
pub const RELAY_PORT: u16 = 7450;

/// A `meshlink-relay` on a host of the internet segment ([`NatMesh::with_relays`]).
#[derive(Debug)]
pub struct StandaloneRelay {
    // Field order is drop order: the process before its namespace.
    process: Process,
    /// Its name in the coordinator's `[[relays]]`.
    pub name: String,
    /// Where agents reach it.
    pub addr: SocketAddrV4,
    /// Its certificate's fingerprint.
    pub fingerprint: String,
    _host: PublicHost,
}

impl StandaloneRelay {
    fn start(
        name: String,
        host: PublicHost,
        state: PathBuf,
        addr: SocketAddrV4,
        cert: &Path,
        dir: &ScratchDir,
    ) -> StandaloneRelay {
        let mut cmd = host.handle().daemon_command(crate::relay_bin());
        cmd.arg("--state-dir")
            .arg(&state)
            .args(["--listen", &format!("0.0.0.0:{RELAY_PORT}")])
            .arg("--coordinator-cert")
            .arg(cert);
        let log = dir.join(&format!("relay-{name}.log"));
        let process = Process::spawn(&format!("meshlink-relay {name}"), cmd, &log, Stdout::Lines);
        let Some(line) = process.wait_for_line("relay fingerprint: ", Duration::from_secs(20))
        else {
            panic!(
                "meshlink-relay {name} did not start; log:\n{}",
                process.log_tail(40)
            );
        };
        let fingerprint = line
            .trim()
            .trim_start_matches("relay fingerprint: ")
            .to_owned();
        StandaloneRelay {
            process,
            name,
            addr,
            fingerprint,
            _host: host,
        }
    }

    /// Kills the relay (SIGKILL): it ends no session, its agents learn of it by silence.
    pub fn kill(&mut self) {
        self.process.kill();
    }
}

/// One peer's entry of `meshlink-agent status -o json`: its endpoint and `path`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PeerPath {
    /// Whether the peer is listed at all.
    pub listed: bool,
    /// `endpoint`: where WireGuard sends (a loopback shim's address while relayed).
    pub endpoint: Option<SocketAddr>,
    /// `path.kind`: `direct`, `relay`, `unconfirmed` or `none`.
    pub kind: Option<String>,
    /// `path.via`: the relay, for a relayed path.
    pub via: Option<String>,
    /// `path.over`: `udp` or `tcp` for a relayed path.
    pub over: Option<String>,
    /// `path.relay`: the standalone relay's name, for a path through one.
    pub relay: Option<String>,
    /// `path.rtt_ms`.
    pub rtt_ms: Option<f64>,
    /// `path.changed_secs_ago`.
    pub changed_secs_ago: Option<u64>,
}

impl PeerPath {
    /// The entry of the peer with `public_key` in a `status` answer; the default (not
    /// listed, all `None`) when it has none.
    pub fn of(status: &Value, public_key: &str) -> PeerPath {
        let Some(peer) = status
            .get("peers")
            .and_then(Value::as_array)
            .and_then(|peers| peers.iter().find(|p| p["public_key"] == public_key))
        else {
            return PeerPath::default();
        };
        let text = |pointer: &str| {
            peer.pointer(pointer)
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        PeerPath {
            listed: true,
            endpoint: peer["endpoint"].as_str().and_then(|e| e.parse().ok()),
            kind: text("/path/kind"),
            via: text("/path/via"),
            over: text("/path/over"),
            relay: text("/path/relay"),
            rtt_ms: peer.pointer("/path/rtt_ms").and_then(Value::as_f64),
            changed_secs_ago: peer
                .pointer("/path/changed_secs_ago")
                .and_then(Value::as_u64),
        }
    }

    /// Whether `path.kind` is `kind`.
    pub fn is(&self, kind: &str) -> bool {
        self.kind.as_deref() == Some(kind)
    }

    /// Whether it has a round trip measured (through the relay, for a relayed path).
    pub fn is_measured(&self) -> bool {
        self.rtt_ms.is_some_and(|ms| ms > 0.0)
    }

    /// Whether it is relayed over `over` (`udp` or `tcp`).
    pub fn is_relayed_over(&self, over: &str) -> bool {
        self.is("relay") && self.over.as_deref() == Some(over)
    }

    /// The endpoint's IP address.
    pub fn endpoint_ip(&self) -> Option<IpAddr> {
        self.endpoint.map(|e| e.ip())
    }

    /// `kind`, with `over` for a relayed path (`direct`, `relay/udp`, ...), or `-` when not
    /// listed: for reports.
    pub fn describe(&self) -> String {
        match (self.kind.as_deref(), self.over.as_deref()) {
            (Some("relay"), Some(over)) => format!("relay/{over}"),
            (Some(kind), _) => kind.to_owned(),
            (None, _) => "-".to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn router_addresses() {
        assert_eq!(public_address(Provider::A), Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(public_address(Provider(8)), Ipv4Addr::new(198, 18, 0, 9));
        assert!(public_address(Provider(MAX_ROUTERS - 1)) < COORDINATOR_HOST);
    }

    #[test]
    fn ruleset_masquerades_out_of_the_wan_only() {
        let rules = ruleset("wan0", NatMode::RandomMasquerade);
        assert!(rules.contains("oifname \"wan0\" masquerade random,fully-random"));
        assert!(ruleset("wan0", NatMode::Masquerade).contains("oifname \"wan0\" masquerade\n"));
    }

    #[test]
    fn peer_path_reads_a_status_entry() {
        let status: Value = serde_json::from_str(
            r#"{"peers": [
                {"public_key": "k1", "endpoint": "127.0.0.1:40001",
                 "path": {"kind": "relay", "via": "coordinator", "over": "tcp", "rtt_ms": 1.5,
                          "changed_secs_ago": 3}},
                {"public_key": "k2", "endpoint": "198.18.0.2:51820",
                 "path": {"kind": "direct", "via": null, "over": null, "rtt_ms": null,
                          "changed_secs_ago": null}}]}"#,
        )
        .unwrap();
        let relayed = PeerPath::of(&status, "k1");
        assert!(relayed.listed && relayed.is_relayed_over("tcp") && !relayed.is("direct"));
        assert_eq!(relayed.via.as_deref(), Some("coordinator"));
        assert_eq!(relayed.rtt_ms, Some(1.5));
        assert_eq!(relayed.describe(), "relay/tcp");
        let direct = PeerPath::of(&status, "k2");
        assert_eq!(
            direct.endpoint_ip(),
            Some(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)))
        );
        assert_eq!(direct.describe(), "direct");
        assert_eq!(PeerPath::of(&status, "k3"), PeerPath::default());
        assert_eq!(PeerPath::default().describe(), "-");
    }
}
