//! External devices end to end: a host with no agent, only Debian's stock WireGuard
//! (`wg-quick`, which runs the kernel's WireGuard or `wireguard-go`), joins the mesh with the
//! file `meshctl node add-external` prints, through a gateway node.
//!
//! Topology (`meshlink_tests::Providers`): the coordinator and vm-a1 (the gateway) on provider
//! A, vm-b1 and the phone on provider B. The workload `web` (100.64.50.10) is held by vm-b1,
//! then moved to vm-a1.
//!
//! `a_stock_wireguard_device_joins_through_its_gateway`: the file is written 0600 and brought
//! up unchanged with `wg-quick up`; the phone then reaches vm-b1 (through vm-a1), vm-a1 itself
//! and the workload address, and vm-b1 reaches the phone; the workload moves and the phone
//! still reaches it with the same file; `meshctl node rotate-key phone --new-key` prints a new
//! file, with which the phone reaches vm-b1 again; under a policy that lets the phone ping
//! vm-b1 and nothing else, it still does, while vm-b1's and the gateway's own pings to it are
//! dropped; `meshctl node revoke phone` cuts it off.
//!
//! Needs root (skips with one line otherwise; fails under CI), `wg-quick`/`wg`
//! (wireguard-tools) and `wireguard-go` (wg-quick's userspace fallback where the kernel has no
//! WireGuard), and the binaries: `cargo build -p meshlink-agent -p meshlink-coordinator -p
//! meshctl` first.

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meshlink_tests::mesh::MeshAgent;
use meshlink_tests::netns::NsRef;
use meshlink_tests::providers::{Provider, Providers};
use meshlink_tests::scratch::ScratchDir;
use meshlink_tests::{
    agent_bin, coordinator_bin, meshctl_bin, require_root, require_tool, wait_until, Coordinator,
};

const NETWORK: &str = "prod";
const NETWORK_CIDR: &str = "100.64.0.0/16";
const WORKLOAD_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 50, 10);
/// Bound on the first answer through a fresh tunnel (two handshakes: phone to gateway, gateway
/// to vm-b1) on a debug build.
const FIRST_PING: Duration = Duration::from_secs(20);
/// Bound on a change (a move, a revocation) reaching every agent.
const CHANGE: Duration = Duration::from_secs(10);

/// `wg-quick up FILE` in `ns`, taken down again when dropped.
struct WgQuick {
    ns: NsRef,
    file: PathBuf,
    up: bool,
}

impl WgQuick {
    fn up(ns: &NsRef, file: &Path) -> WgQuick {
        let mut cmd = ns.command("wg-quick");
        cmd.arg("up").arg(file);
        cmd.env_remove("WG_QUICK_USERSPACE_IMPLEMENTATION");
        let out = cmd.output().expect("wg-quick runs");
        assert!(
            out.status.success(),
            "wg-quick up {} failed ({}):\n{}{}",
            file.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        WgQuick {
            ns: ns.clone(),
            file: file.to_owned(),
            up: true,
        }
    }

    fn down(&mut self) {
        if self.up {
            self.up = false;
            let out = self
                .ns
                .exec("wg-quick", &[Path::new("down"), self.file.as_path()]);
            assert!(
                out.status.success(),
                "wg-quick down {} failed: {}",
                self.file.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

impl Drop for WgQuick {
    fn drop(&mut self) {
        if self.up {
            let _ = self
                .ns
                .exec("wg-quick", &[Path::new("down"), self.file.as_path()]);
        }
    }
}

/// The value of `Key = value` in a wg-quick file.
fn field<'a>(file: &'a str, key: &str) -> Option<&'a str> {
    file.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == key).then(|| v.trim())
    })
}

/// `wg pubkey` of a base64 private key.
fn wg_pubkey(private: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("wg")
        .arg("pubkey")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("wg runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{private}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "wg pubkey failed");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn wait_ping(ns: &NsRef, to: Ipv4Addr, what: &str, within: Duration) -> Duration {
    let started = Instant::now();
    wait_until(within, what, || {
        ns.ping_once(to, Duration::from_millis(500)).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    started.elapsed()
}

#[test]
fn a_stock_wireguard_device_joins_through_its_gateway() {
    if !require_root() {
        return;
    }
    require_tool("wg", "wireguard-tools");
    require_tool("wireguard-go", "wireguard-go");
    let wg_quick = std::process::Command::new("wg-quick").arg("-h").output();
    assert!(
        wg_quick.is_ok_and(|o| o.status.success()),
        "`wg-quick` is not installed: apt-get install -y wireguard-tools"
    );
    agent_bin();
    coordinator_bin();
    meshctl_bin();

    let dir = ScratchDir::create("external");
    let mut providers = Providers::create(2);
    let coord_host = providers.add_host(Provider::A);
    let host_a1 = providers.add_host(Provider::A);
    let host_b1 = providers.add_host(Provider::B);
    let phone = providers.add_host(Provider::B);
    let coord = Coordinator::start(&coord_host.ns, &dir, coord_host.underlay);
    let ctl = coord.meshctl();
    ctl.network_create(NETWORK, NETWORK_CIDR);
    let token = ctl.token_create(NETWORK, Some(2), Some("1h"));
    let mut a1 = MeshAgent::spawn_join(&host_a1.ns, &dir, &token, "vm-a1", &[]);
    let mut b1 = MeshAgent::spawn_join(&host_b1.ns, &dir, &token, "vm-b1", &[]);
    for a in [&mut a1, &mut b1] {
        a.wait_ready(meshlink_tests::mesh::READY_TIMEOUT);
    }
    let (ip_a1, ip_b1) = (a1.address(), b1.address());
    ctl.run(&[
        "workload",
        "create",
        "web",
        "--network",
        NETWORK,
        "--address",
        &WORKLOAD_IP.to_string(),
        "--allow",
        "vm-a1,vm-b1",
    ]);
    ctl.run(&["workload", "attach", "web", "--node", "vm-b1"]);

    // The device's file, made by meshctl (the key pair on this machine, never sent).
    let file = dir.join("phone.conf");
    ctl.run(&[
        "node",
        "add-external",
        "phone",
        "--network",
        NETWORK,
        "--via",
        "vm-a1",
        "--tag",
        "phone",
        "--out",
        file.to_str().expect("UTF-8 path"),
    ]);
    let mode = std::fs::metadata(&file)
        .expect("the file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{} has mode {mode:o}", file.display());
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(field(&text, "AllowedIPs"), Some(NETWORK_CIDR), "{text}");
    assert_eq!(
        field(&text, "PublicKey"),
        Some(a1.public_key().as_str()),
        "the one peer is the gateway:\n{text}"
    );
    let node = ctl
        .node("phone")
        .expect("meshctl node show phone finds the external node");
    let ip_phone = node.address;
    // The private key in the file is the one whose public key the coordinator has.
    let private = field(&text, "PrivateKey").expect("a PrivateKey line");
    assert_eq!(wg_pubkey(private), node.public_key, "{}", file.display());
    assert_eq!(
        field(&text, "Address"),
        Some(format!("{ip_phone}/32").as_str()),
        "{text}"
    );

    let mut up = WgQuick::up(&phone.ns, &file);
    let link = phone.ns.exec("ip", &["-d", "link", "show", "phone"]);
    let kind = if String::from_utf8_lossy(&link.stdout).contains("wireguard") {
        "the kernel's WireGuard"
    } else {
        "wireguard-go"
    };
    eprintln!("external: wg-quick brought the phone up with {kind}");
    let took = wait_ping(
        &phone.ns,
        ip_b1,
        "the phone to reach vm-b1 through vm-a1",
        FIRST_PING,
    );
    eprintln!("external: the phone reached vm-b1 {took:?} after wg-quick up");
    wait_ping(&phone.ns, ip_a1, "the phone to reach its gateway", CHANGE);
    wait_ping(
        &phone.ns,
        WORKLOAD_IP,
        "the phone to reach web on vm-b1",
        CHANGE,
    );
    wait_ping(&host_b1.ns, ip_phone, "vm-b1 to reach the phone", CHANGE);
    let gatewayed = a1.status()["drops"]["gatewayed"].as_u64().unwrap_or(0);
    assert!(gatewayed >= 4, "vm-a1 forwarded {gatewayed} packets");
    // vm-b1 sees the phone's own address as the source, through the gateway: nothing spoofed.
    let status = b1.status();
    let spoofed: u64 = status["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["drops"]["spoofed_source"].as_u64())
        .sum();
    assert_eq!(spoofed, 0, "{status:#}");

    // The workload moves; the same file reaches it at its new holder.
    ctl.run(&["workload", "move", "web", "--to", "vm-a1"]);
    wait_until(CHANGE, "web to be on vm-a1", || {
        a1.has_address(WORKLOAD_IP).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    wait_ping(
        &phone.ns,
        WORKLOAD_IP,
        "the phone to reach web on vm-a1",
        CHANGE,
    );

    // A new key: a new file, the old key refused by the gateway.
    let file2 = dir.join("phone2.conf");
    ctl.run(&[
        "node",
        "rotate-key",
        "phone",
        "--new-key",
        "--out",
        file2.to_str().expect("UTF-8 path"),
    ]);
    let text2 = std::fs::read_to_string(&file2).unwrap();
    assert_ne!(field(&text, "PrivateKey"), field(&text2, "PrivateKey"));
    up.down();
    let mut up2 = WgQuick::up(&phone.ns, &file2);
    wait_ping(
        &phone.ns,
        ip_b1,
        "the phone to reach vm-b1 with its new key",
        FIRST_PING,
    );

    // Under a policy (the phone may ping vm-b1, nothing else): what the phone opens works,
    // vm-b1's and vm-a1's own pings to the phone are dropped by the gateway, and the gateway
    // keeps the phone and learns nothing else.
    let policy = dir.join("policy.toml");
    std::fs::write(
        &policy,
        "[[rule]]\nfrom = [\"tag:phone\"]\nto = [\"node:vm-b1\"]\nports = [\"icmp\"]\n",
    )
    .unwrap();
    ctl.run(&[
        "policy",
        "set",
        "prod",
        policy.to_str().expect("UTF-8 path"),
    ]);
    wait_until(CHANGE, "vm-b1's pings to the phone to be denied", || {
        (!host_b1.ns.ping_once(ip_phone, Duration::from_millis(500))).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    wait_ping(
        &phone.ns,
        ip_b1,
        "the phone to reach vm-b1 under the policy",
        CHANGE,
    );
    assert!(
        !host_a1.ns.ping_once(ip_phone, Duration::from_millis(500)),
        "the gateway's own host pings the phone against the policy"
    );
    assert!(
        !phone.ns.ping_once(ip_a1, Duration::from_millis(500)),
        "the phone pings the gateway against the policy"
    );

    // Revoked: cut off.
    ctl.run(&["node", "revoke", "phone"]);
    wait_until(CHANGE, "the revoked phone to be cut off", || {
        (!phone.ns.ping_once(ip_b1, Duration::from_millis(500))).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    up2.down();
}
