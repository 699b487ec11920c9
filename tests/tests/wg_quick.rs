//! wg-quick's userspace hook: Debian's own `/usr/bin/wg-quick`, with an unchanged wg-quick
//! file, brings `meshlink-agent` up as its userspace implementation
//! (`WG_QUICK_USERSPACE_IMPLEMENTATION=meshlink-agent wg-quick up FILE`) and takes it down
//! again (`wg-quick down FILE` deletes the link; the agent's daemon must exit and leave no
//! socket). The other side runs the stock `wireguard-go` (wg-quick's default userspace
//! implementation) or the agent the same way.
//!
//! What wg-quick changes after starting the agent is followed with no help from the agent's
//! own variables: a server file's `ListenPort` (and a later `wg set listen-port`), a
//! full-tunnel file's `AllowedIPs = 0.0.0.0/0` (wg-quick's firewall mark and policy routing;
//! the agent routes nothing itself, as `Table = off` shows), and an `MTU` above 1420.
//!
//! Topology: `meshlink_tests::TwoHosts` (198.18.0.1 and .2 on the underlay, 100.64.0.1 and .2
//! on the overlay). Needs root, `wg-quick`/`wg` (wireguard-tools), `wireguard-go`, `nft`
//! (nftables, which wg-quick's full-tunnel mode runs) and a built agent; under CI a missing
//! tool fails the test.

use std::fs::File;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use meshlink_tests::xfer::transfer_checked;
use meshlink_tests::{
    agent_bin, require_root, require_tool, wait_until, Host, NsRef, Process, TwoHosts, UAPI_DIR,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Bound on the first ping through a fresh tunnel (handshake included).
const FIRST_PING: Duration = Duration::from_secs(15);
/// Bound on a transfer; a debug build on 2 shared cores is slow, a stall is not.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a userspace daemon may take to exit once its link is deleted.
const EXIT_AFTER_DOWN: Duration = Duration::from_secs(10);
/// The TCP transfer each way.
const TRANSFER_BYTES: u64 = 4 << 20;

/// Two hosts, or `None` (after one visible line) when not root; checks every tool first.
fn two_hosts(tag: &str) -> Option<TwoHosts> {
    if !require_root() {
        return None;
    }
    require_tool("wg", "wireguard-tools");
    require_tool("wireguard-go", "wireguard-go");
    // `wg-quick` has no --version; `wg-quick -h` prints its usage and exits zero.
    let wg_quick = Command::new("wg-quick").arg("-h").output();
    assert!(
        wg_quick.is_ok_and(|o| o.status.success()),
        "`wg-quick` is not installed: apt-get install -y wireguard-tools"
    );
    agent_bin();
    let bed = TwoHosts::create(tag);
    assert!(
        bed.underlay_works(),
        "underlay ping between the namespaces failed"
    );
    Some(bed)
}

/// Which userspace implementation wg-quick runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Implementation {
    /// `meshlink-agent`, through `WG_QUICK_USERSPACE_IMPLEMENTATION`.
    Agent,
    /// wg-quick's default, the stock `wireguard-go`.
    WireguardGo,
}

/// A stock wg-quick file for `host`, named `IFACE.conf` as wg-quick wants: its key and
/// address, `ListenPort` if `listen`, and `peer` (with its endpoint if `dial`, and a 1 s
/// keepalive then, as a client behind NAT would have).
fn wg_quick_file(bed: &TwoHosts, host: &Host, peer: &Host, listen: bool, dial: bool) -> PathBuf {
    wg_quick_file_with(
        bed,
        host,
        peer,
        listen,
        dial,
        &format!("{}/32", peer.overlay),
        "",
    )
}

/// As [`wg_quick_file`], with the peer's `AllowedIPs` given and `interface` (lines) added to
/// the `[Interface]` section.
fn wg_quick_file_with(
    bed: &TwoHosts,
    host: &Host,
    peer: &Host,
    listen: bool,
    dial: bool,
    allowed_ips: &str,
    interface: &str,
) -> PathBuf {
    let mut text = format!(
        "[Interface]\nPrivateKey = {}\nAddress = {}/24\n{interface}",
        host.keys.private, host.overlay
    );
    if listen {
        text.push_str(&format!("ListenPort = {}\n", host.listen_port));
    }
    text.push_str(&format!(
        "\n[Peer]\nPublicKey = {}\nAllowedIPs = {allowed_ips}\n",
        peer.keys.public
    ));
    if dial {
        text.push_str(&format!(
            "Endpoint = {}\nPersistentKeepalive = 1\n",
            peer.endpoint()
        ));
    }
    let path = bed.dir.join(&format!("{}.conf", host.iface));
    meshlink_tests::write_secret(&path, &text);
    path
}

/// An interface brought up by `wg-quick up`. On drop (a failed test) it is taken down again
/// and its daemon, if still running, ended by its pid.
struct WgQuickUp {
    ns: NsRef,
    iface: String,
    file: PathBuf,
    /// The userspace daemon, found through its socket (`SO_PEERCRED`).
    pid: Pid,
    log: PathBuf,
    down: bool,
}

impl WgQuickUp {
    /// Runs `wg-quick up FILE` in `host`'s namespace with `implementation` and `env`; logs go
    /// to a file (not a pipe, which the daemon would hold open).
    fn up(
        bed: &TwoHosts,
        host: &Host,
        file: PathBuf,
        implementation: Implementation,
        env: &[(&str, &str)],
    ) -> WgQuickUp {
        let log = bed.dir.join(&format!("{}.wg-quick.log", host.iface));
        let mut cmd = host.ns.command("wg-quick");
        cmd.arg("up").arg(&file);
        cmd.env_remove("WG_QUICK_USERSPACE_IMPLEMENTATION")
            .env_remove("WG_PROCESS_FOREGROUND");
        if implementation == Implementation::Agent {
            cmd.env("WG_QUICK_USERSPACE_IMPLEMENTATION", agent_bin())
                .env("MESHLINK_LOG", "info");
        }
        cmd.envs(env.iter().copied());
        run_logged(cmd, &log);
        let pid = socket_owner(&socket_path(&host.iface));
        WgQuickUp {
            ns: host.ns.handle(),
            iface: host.iface.clone(),
            file,
            pid,
            log,
            down: false,
        }
    }

    /// `wg-quick down FILE`; then the daemon exits, and its socket and link are gone.
    fn down(&mut self) {
        self.down = true;
        let mut cmd = self.ns.command("wg-quick");
        cmd.arg("down").arg(&self.file);
        let started = Instant::now();
        run_logged(cmd, &self.log);
        wait_until(
            EXIT_AFTER_DOWN,
            &format!("the daemon of {} (pid {}) to exit", self.iface, self.pid),
            || (!alive(self.pid)).then_some(()),
        )
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", log_text(&self.log)));
        eprintln!(
            "{}: daemon gone {:?} after `wg-quick down` started",
            self.iface,
            started.elapsed()
        );
        assert!(
            !socket_path(&self.iface).exists(),
            "{} is left behind",
            socket_path(&self.iface).display()
        );
        assert!(
            !self.ns.has_link(&self.iface),
            "{} still exists",
            self.iface
        );
    }
}

impl Drop for WgQuickUp {
    fn drop(&mut self) {
        if !self.down && self.ns.has_link(&self.iface) {
            let _ = self
                .ns
                .exec("wg-quick", &[Path::new("down"), self.file.as_path()]);
        }
        if alive(self.pid) {
            let _ = kill(self.pid, Signal::SIGTERM);
            std::thread::sleep(Duration::from_secs(1));
            if alive(self.pid) {
                let _ = kill(self.pid, Signal::SIGKILL);
            }
        }
        if std::thread::panicking() {
            eprintln!("--- {} ---\n{}", self.log.display(), log_text(&self.log));
        }
    }
}

/// Runs `cmd` with stdout and stderr appended to `log`; panics with the log unless it exits
/// zero.
fn run_logged(mut cmd: Command, log: &Path) {
    let file = File::options()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
    let err = file.try_clone().expect("clone log handle");
    let status = cmd
        .stdin(std::process::Stdio::null())
        .stdout(file)
        .stderr(err)
        .status()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    assert!(
        status.success(),
        "{cmd:?} failed ({status}); log:\n{}",
        log_text(log)
    );
}

fn log_text(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

fn socket_path(iface: &str) -> PathBuf {
    meshlink_uapi::socket_path(Path::new(UAPI_DIR), iface)
}

/// The pid of the process serving the userspace API socket at `path`, from the kernel
/// (`SO_PEERCRED`): the daemon that wg-quick started and that no test guard started.
fn socket_owner(path: &Path) -> Pid {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let stream = std::os::unix::net::UnixStream::connect(path)
        .unwrap_or_else(|e| panic!("nothing serves {}: {e}", path.display()));
    let creds = getsockopt(&stream, PeerCredentials).expect("SO_PEERCRED");
    Pid::from_raw(creds.pid())
}

/// Whether `pid` still runs (a zombie, exited and not yet reaped by init, does not).
fn alive(pid: Pid) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // `pid (comm) S ...`: the state follows the last `)`.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z" | "X") | None)
}

/// Pings both ways and moves `TRANSFER_BYTES` each way, checked by SHA-256.
fn traffic_both_ways(bed: &TwoHosts) {
    let (a, b) = (&bed.a, &bed.b);
    a.ns.wait_for_ping(b.overlay, FIRST_PING).unwrap();
    b.ns.wait_for_ping(a.overlay, FIRST_PING).unwrap();
    for (from, to) in [(a, b), (b, a)] {
        let got = transfer_checked(
            &from.ns,
            &to.ns,
            IpAddr::V4(to.overlay),
            &bed.dir,
            TRANSFER_BYTES,
            TRANSFER_TIMEOUT,
        );
        eprintln!(
            "{} -> {}: {} bytes, sha256 {}",
            from.overlay, to.overlay, got.bytes, got.sha256
        );
    }
}

/// The agent as a client (no `ListenPort`, dials the server) under wg-quick; the server is
/// wireguard-go under wg-quick with its default implementation.
#[test]
fn agent_client_to_wireguard_go_through_wg_quick() {
    let Some(bed) = two_hosts("wgq-client") else {
        return;
    };
    let server_file = wg_quick_file(&bed, &bed.b, &bed.a, true, false);
    let client_file = wg_quick_file(&bed, &bed.a, &bed.b, false, true);
    let mut server = WgQuickUp::up(&bed, &bed.b, server_file, Implementation::WireguardGo, &[]);
    let mut client = WgQuickUp::up(&bed, &bed.a, client_file, Implementation::Agent, &[]);
    // wg-quick configured the agent through its socket: `wg` reads back the file's key.
    let public = bed.a.ns.run("wg", &["show", &bed.a.iface, "public-key"]);
    assert_eq!(public.trim(), bed.a.keys.public);
    // The daemon is not wg-quick's child any more: wg-quick returned.
    assert!(alive(client.pid), "the agent's daemon is not running");
    traffic_both_ways(&bed);
    client.down();
    server.down();
}

/// Both sides are the agent under wg-quick, started with none of the agent's variables. The
/// server's file has `ListenPort`, which `wg setconf` moves the agent to, and `Table = off`,
/// so the agent must route nothing: only the kernel's route for its address goes through its
/// interface. Then the server's port changes at run time (`wg set listen-port`), its sessions
/// kept; a port another socket holds is refused with `EADDRINUSE` and the old port kept.
#[test]
fn agent_server_with_listen_port_and_agent_client_through_wg_quick() {
    let Some(bed) = two_hosts("wgq-server") else {
        return;
    };
    let (a, b) = (&bed.a, &bed.b);
    let server_file = wg_quick_file_with(
        &bed,
        b,
        a,
        true,
        false,
        &format!("{}/32", a.overlay),
        "Table = off\n",
    );
    let client_file = wg_quick_file(&bed, a, b, false, true);
    let mut server = WgQuickUp::up(&bed, b, server_file, Implementation::Agent, &[]);
    let mut client = WgQuickUp::up(&bed, a, client_file, Implementation::Agent, &[]);
    let port = b.listen_port.to_string();
    let ports = b.ns.run("wg", &["show", &b.iface, "listen-port"]);
    assert_eq!(ports.trim(), port, "the file's ListenPort");
    traffic_both_ways(&bed);
    let routes =
        b.ns.ip(&["-4", "route", "show", "table", "all", "dev", &b.iface]);
    let ours: Vec<&str> = routes
        .lines()
        .filter(|l| !l.contains("proto kernel"))
        .collect();
    assert!(
        ours.is_empty(),
        "with `Table = off` nothing may route through {}: {ours:?}",
        b.iface
    );

    // Another socket holds this port: the agent keeps its own and says why.
    let held = b.listen_port + 1;
    let holder_iface = meshlink_tests::unique_name("h");
    let mut holder_cmd = b.ns.daemon_command(agent_bin());
    holder_cmd
        .args(["-f", &holder_iface])
        .env("MESHLINK_LISTEN_PORT", held.to_string());
    let holder = Process::spawn(
        "meshlink-agent -f (holds a port)",
        holder_cmd,
        &bed.dir.join("holder.log"),
        meshlink_tests::process::Stdout::Log,
    );
    wait_until(Duration::from_secs(10), "the port holder's socket", || {
        meshlink_tests::wg::answers(&b.ns, &holder_iface).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", holder.log()));
    let held_s = held.to_string();
    let refused = b.ns.exec("wg", &["set", &b.iface, "listen-port", &held_s]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("Address already in use"),
        "wg set listen-port {held} (taken): {} {stderr}",
        refused.status
    );
    let ports = b.ns.run("wg", &["show", &b.iface, "listen-port"]);
    assert_eq!(ports.trim(), port, "the old port is kept");
    drop(holder);

    // A free port: the loops move to it and the session goes on (no new handshake).
    let handshake = |ns: &NsRef, iface: &str| ns.run("wg", &["show", iface, "latest-handshakes"]);
    let before = handshake(&b.ns, &b.iface);
    b.ns.run("wg", &["set", &b.iface, "listen-port", &held_s]);
    let ports = b.ns.run("wg", &["show", &b.iface, "listen-port"]);
    assert_eq!(ports.trim(), held_s);
    let endpoint = format!("{}:{held}", b.underlay);
    a.ns.run(
        "wg",
        &[
            "set",
            &a.iface,
            "peer",
            &b.keys.public,
            "endpoint",
            &endpoint,
        ],
    );
    a.ns.wait_for_ping(b.overlay, FIRST_PING).unwrap();
    b.ns.wait_for_ping(a.overlay, FIRST_PING).unwrap();
    assert_eq!(
        handshake(&b.ns, &b.iface),
        before,
        "the session did not survive the port change"
    );
    client.down();
    server.down();
}

/// The IPv4 routing state of a namespace that a full IPv4 tunnel changes: rules, routes of
/// every table and the nftables ruleset. (IPv6 is left out: the kernel adds a veth's
/// link-local address, and its route, whenever duplicate address detection ends.)
fn routing_state(ns: &NsRef) -> String {
    format!(
        "{}\n{}\n{}",
        ns.ip(&["-4", "rule", "show"]),
        ns.ip(&["-4", "route", "show", "table", "all"]),
        ns.run("nft", &["list", "ruleset"])
    )
}

/// A full-tunnel client (`AllowedIPs = 0.0.0.0/0`): wg-quick puts the default route in its own
/// table, routes everything unmarked there, and sets a firewall mark on the device so that the
/// tunnel's own UDP packets take the main table. The agent must put that mark on its socket:
/// the server is reachable only through the client's own default route (no more specific
/// route), so an unmarked datagram would loop back into the tunnel. The client's default
/// route stays its own, traffic to the server's overlay address flows, and `wg-quick down`
/// leaves the rules, routes and ruleset as they were.
#[test]
fn full_tunnel_client_through_wg_quick() {
    let Some(bed) = two_hosts("wgq-full") else {
        return;
    };
    require_tool("nft", "nftables");
    let (a, b) = (&bed.a, &bed.b);
    // The client reaches the underlay through its default route alone.
    let subnet = format!(
        "{}.0/24",
        a.underlay.to_string().rsplit_once('.').unwrap().0
    );
    a.ns.ip(&["route", "del", &subnet, "dev", &a.veth]);
    a.ns.ip(&["route", "add", "default", "dev", &a.veth]);
    let default_before = a.ns.ip(&["-4", "route", "show", "default"]);
    let before = routing_state(&a.ns);

    let server_file = wg_quick_file(&bed, b, a, true, false);
    let client_file = wg_quick_file_with(&bed, a, b, false, true, "0.0.0.0/0", "");
    let mut server = WgQuickUp::up(&bed, b, server_file, Implementation::WireguardGo, &[]);
    let mut client = WgQuickUp::up(&bed, a, client_file, Implementation::Agent, &[]);
    let mark = a.ns.run("wg", &["show", &a.iface, "fwmark"]);
    assert_ne!(mark.trim(), "off", "wg-quick set no firewall mark");
    assert_eq!(
        a.ns.ip(&["-4", "route", "show", "default"]),
        default_before,
        "the main table's default route changed"
    );
    let rules = a.ns.ip(&["-4", "rule", "show"]);
    assert!(
        rules.contains(&format!("not from all fwmark {} lookup", mark.trim())),
        "wg-quick's policy routing is missing: {rules}"
    );
    traffic_both_ways(&bed);
    client.down();
    server.down();
    assert_eq!(
        routing_state(&a.ns),
        before,
        "wg-quick down left the client's routing changed"
    );
}

/// `MTU = 8920` in the file (over a 9,000-byte underlay, as wg-quick would choose by itself
/// there): wg-quick sets it with `ip link set mtu` after starting the agent, whose buffers
/// must follow. An 8,000-byte ping that may not be fragmented (`-M do`) crosses the tunnel
/// both ways, and so does a transfer in 8,880-byte segments.
#[test]
fn an_mtu_above_1420_carries_jumbo_packets_through_wg_quick() {
    let Some(bed) = two_hosts("wgq-mtu") else {
        return;
    };
    let (a, b) = (&bed.a, &bed.b);
    for h in [a, b] {
        h.ns.ip(&["link", "set", "dev", &h.veth, "mtu", "9000"]);
    }
    let server_file = wg_quick_file_with(
        &bed,
        b,
        a,
        true,
        false,
        &format!("{}/32", a.overlay),
        "MTU = 8920\n",
    );
    let client_file = wg_quick_file_with(
        &bed,
        a,
        b,
        false,
        true,
        &format!("{}/32", b.overlay),
        "MTU = 8920\n",
    );
    let mut server = WgQuickUp::up(&bed, b, server_file, Implementation::WireguardGo, &[]);
    let mut client = WgQuickUp::up(&bed, a, client_file, Implementation::Agent, &[]);
    assert!(
        a.ns.ip(&["link", "show", "dev", &a.iface])
            .contains("mtu 8920"),
        "wg-quick did not set the MTU"
    );
    a.ns.wait_for_ping(b.overlay, FIRST_PING).unwrap();
    let dst = b.overlay.to_string();
    let big = wait_until(FIRST_PING, "an 8,000-byte ping through the tunnel", || {
        let out = a.ns.exec(
            "ping",
            &[
                "-n", "-q", "-c", "1", "-W", "1", "-M", "do", "-s", "8000", &dst,
            ],
        );
        out.status.success().then_some(())
    });
    big.unwrap_or_else(|e| panic!("{e}; log:\n{}", log_text(&client.log)));
    traffic_both_ways(&bed);
    client.down();
    server.down();
}

/// `meshlink-agent -f IFACE` stays in the foreground, is configured by `wg setconf` like
/// wireguard-go, and exits zero when its link is deleted.
#[test]
fn foreground_exits_zero_when_its_link_is_deleted() {
    let Some(bed) = two_hosts("wgq-fg") else {
        return;
    };
    let a = &bed.a;
    let log = bed.dir.join("agent-fg.log");
    let mut cmd = a.ns.daemon_command(agent_bin());
    cmd.args(["-f", &a.iface]);
    let mut agent = Process::spawn(
        "meshlink-agent -f",
        cmd,
        &log,
        meshlink_tests::process::Stdout::Log,
    );
    wait_until(Duration::from_secs(10), "the agent's socket", || {
        meshlink_tests::wg::answers(&a.ns, &a.iface).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", agent.log()));
    let conf = bed.dir.join("setconf.conf");
    meshlink_tests::write_secret(
        &conf,
        &format!(
            "[Interface]\nPrivateKey = {}\n[Peer]\nPublicKey = {}\nAllowedIPs = {}/32\n",
            a.keys.private, bed.b.keys.public, bed.b.overlay
        ),
    );
    a.ns.run("wg", &[Path::new("setconf"), Path::new(&a.iface), &conf]);
    let public = a.ns.run("wg", &["show", &a.iface, "public-key"]);
    assert_eq!(public.trim(), a.keys.public);
    a.ns.ip(&["link", "delete", "dev", &a.iface]);
    let status = agent
        .wait_timeout(EXIT_AFTER_DOWN)
        .unwrap_or_else(|| panic!("still running after its link was deleted:\n{}", agent.log()));
    assert!(status.success(), "exited {status}:\n{}", agent.log());
    assert!(agent.log().contains("the interface was deleted"));
    assert!(!socket_path(&a.iface).exists());
}

/// A daemon that cannot start reports why through the command wg-quick ran, which exits
/// non-zero: here the interface exists already.
#[test]
fn the_command_reports_a_daemon_that_cannot_start() {
    let Some(bed) = two_hosts("wgq-fail") else {
        return;
    };
    let a = &bed.a;
    a.ns.ip(&["link", "add", &a.iface, "type", "bridge"]);
    let out = a.ns.exec(
        agent_bin().to_str().expect("UTF-8 path"),
        &[a.iface.as_str()],
    );
    assert!(!out.status.success(), "started over an existing interface");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("interface {} already exists", a.iface)),
        "stderr: {stderr}"
    );
    assert!(!socket_path(&a.iface).exists());
}
