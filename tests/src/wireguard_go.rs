//! Debian's `wireguard-go` as a reference peer, configured the stock way: `wg set` over its
//! userspace API socket, then `ip` for addresses, MTU and routes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::agent::PeerConfig;
use crate::netns::NsRef;
use crate::process::{Process, Stdout};
use crate::scratch::ScratchDir;
use crate::wait::wait_until;
use crate::{wg, UAPI_DIR};

/// What to configure on a `wireguard-go` device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgGoConfig {
    /// Interface name; also names the UAPI socket.
    pub interface: String,
    /// File holding the base64 private key.
    pub private_key_file: PathBuf,
    /// UDP listen port.
    pub listen_port: u16,
    /// Overlay addresses with prefix.
    pub addresses: Vec<String>,
    /// Interface MTU.
    pub mtu: u16,
    /// The peers.
    pub peers: Vec<PeerConfig>,
}

impl WgGoConfig {
    /// The arguments of `wg set IFACE ...` that configure the device's keys, port and peers.
    pub fn wg_set_args(&self) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "set".into(),
            self.interface.clone(),
            "listen-port".into(),
            self.listen_port.to_string(),
            "private-key".into(),
            path_str(&self.private_key_file),
        ];
        for peer in &self.peers {
            args.extend(["peer".into(), peer.public_key.clone()]);
            if let Some(psk) = &peer.preshared_key_file {
                args.extend(["preshared-key".into(), path_str(psk)]);
            }
            if let Some(endpoint) = peer.endpoint {
                args.extend(["endpoint".into(), endpoint.to_string()]);
            }
            if let Some(keepalive) = peer.persistent_keepalive {
                args.extend(["persistent-keepalive".into(), keepalive.to_string()]);
            }
            args.extend(["allowed-ips".into(), peer.allowed_ips.join(",")]);
        }
        args
    }
}

fn path_str(path: &std::path::Path) -> String {
    path.to_str().expect("test paths are UTF-8").to_owned()
}

/// A running, configured `wireguard-go` in a namespace. Dropping it ends the process by pid
/// and removes its UAPI socket if left behind.
#[derive(Debug)]
pub struct WireguardGo {
    ns: NsRef,
    interface: String,
    process: Process,
}

impl WireguardGo {
    /// Starts `WG_PROCESS_FOREGROUND=1 wireguard-go IFACE` in `ns`, waits for its socket, and
    /// configures it: `wg set`, `ip addr add`, `ip link set mtu .. up`, a route per allowed IP.
    ///
    /// # Panics
    /// When `wireguard-go` is missing, exits, is not ready within 10 s, or a configuration
    /// command fails.
    pub fn start(ns: &NsRef, dir: &ScratchDir, config: &WgGoConfig) -> WireguardGo {
        crate::require_tool("wireguard-go", "wireguard-go");
        let iface = config.interface.clone();
        let mut cmd = ns.daemon_command("wireguard-go");
        cmd.arg(&iface)
            .env("WG_PROCESS_FOREGROUND", "1")
            .env("LOG_LEVEL", "verbose");
        let log = dir.join(&format!("{iface}.wireguard-go.log"));
        let mut process = Process::spawn(&format!("wireguard-go {iface}"), cmd, &log, Stdout::Log);

        let ready = wait_until(
            Duration::from_secs(10),
            &format!("wireguard-go {iface}"),
            || {
                if let Some(status) = process.try_wait() {
                    return Some(Err(status));
                }
                wg::answers(ns, &iface).then_some(Ok(()))
            },
        );
        match ready {
            Ok(Ok(())) => {}
            Ok(Err(status)) => panic!("wireguard-go {iface} exited ({status}):\n{}", process.log()),
            Err(timeout) => panic!("{timeout}:\n{}", process.log()),
        }
        let wg = WireguardGo {
            ns: ns.clone(),
            interface: iface.clone(),
            process,
        };

        ns.run("wg", &config.wg_set_args());
        for addr in &config.addresses {
            ns.ip(&["addr", "add", addr, "dev", &iface]);
        }
        ns.ip(&[
            "link",
            "set",
            "dev",
            &iface,
            "mtu",
            &config.mtu.to_string(),
            "up",
        ]);
        for peer in &config.peers {
            for prefix in &peer.allowed_ips {
                ns.ip(&["route", "replace", prefix, "dev", &iface]);
            }
        }
        wg
    }

    /// The interface name.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// The process.
    pub fn process(&mut self) -> &mut Process {
        &mut self.process
    }

    /// The Unix time of the latest handshake with `peer`, through `wg show`.
    pub fn latest_handshake(&self, peer: &str) -> Option<u64> {
        wg::latest_handshake(&self.ns, &self.interface, peer)
    }

    /// The current endpoint of `peer`, through `wg show`.
    pub fn endpoint(&self, peer: &str) -> Option<String> {
        wg::endpoint(&self.ns, &self.interface, peer)
    }
}

impl Drop for WireguardGo {
    fn drop(&mut self) {
        self.process.terminate();
        let socket = meshlink_uapi::socket_path(Path::new(UAPI_DIR), &self.interface);
        if socket.exists() {
            let _ = std::fs::remove_file(socket);
        }
    }
}
