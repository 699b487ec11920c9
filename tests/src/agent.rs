//! Configuring and running `meshlink-agent up` inside a namespace.
//!
//! [`AgentConfig`] renders the agent's TOML file; [`Agent`] owns the running daemon, waits for
//! its userspace API socket to answer, and can kill and restart it under the same guard (so two
//! guards never fight over one interface name).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use crate::netns::NsRef;
use crate::process::{Process, Stdout};
use crate::scratch::ScratchDir;
use crate::wait::wait_until;
use crate::{agent_bin, wg, UAPI_DIR};

/// How long [`Agent::start`] waits for `wg show IFACE` to answer. Generous: a debug build on a
/// busy 2-core machine with other tests running.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// One `[[peers]]` entry (also used for `wireguard-go`, through `wg set`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// The peer's public key, base64.
    pub public_key: String,
    /// A file holding the base64 preshared key (mode 0600).
    pub preshared_key_file: Option<PathBuf>,
    /// Where to reach the peer; `None` waits for it to make contact.
    pub endpoint: Option<SocketAddr>,
    /// Inner prefixes routed to this peer, e.g. `"100.64.0.2/32"`.
    pub allowed_ips: Vec<String>,
    /// Seconds between keepalives when idle.
    pub persistent_keepalive: Option<u16>,
}

/// The agent's configuration file, field for field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// TUN interface name; also names the UAPI socket.
    pub interface: String,
    /// File holding the base64 private key (mode 0600).
    pub private_key_file: PathBuf,
    /// UDP listen port.
    pub listen_port: u16,
    /// Overlay addresses with prefix, e.g. `"100.64.0.1/24"`.
    pub addresses: Vec<String>,
    /// Interface MTU.
    pub mtu: u16,
    /// UAPI socket directory; `None` leaves the agent's default (`/var/run/wireguard`).
    pub uapi_dir: Option<PathBuf>,
    /// The peers.
    pub peers: Vec<PeerConfig>,
}

impl AgentConfig {
    /// The TOML text of this configuration.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "interface = {}", quote(&self.interface));
        let _ = writeln!(
            out,
            "private_key_file = {}",
            quote_path(&self.private_key_file)
        );
        let _ = writeln!(out, "listen_port = {}", self.listen_port);
        let _ = writeln!(out, "addresses = {}", quote_list(&self.addresses));
        let _ = writeln!(out, "mtu = {}", self.mtu);
        if let Some(dir) = &self.uapi_dir {
            let _ = writeln!(out, "uapi_dir = {}", quote_path(dir));
        }
        for peer in &self.peers {
            let _ = writeln!(out, "\n[[peers]]");
            let _ = writeln!(out, "public_key = {}", quote(&peer.public_key));
            if let Some(psk) = &peer.preshared_key_file {
                let _ = writeln!(out, "preshared_key_file = {}", quote_path(psk));
            }
            if let Some(endpoint) = peer.endpoint {
                let _ = writeln!(out, "endpoint = {}", quote(&endpoint.to_string()));
            }
            let _ = writeln!(out, "allowed_ips = {}", quote_list(&peer.allowed_ips));
            if let Some(keepalive) = peer.persistent_keepalive {
                let _ = writeln!(out, "persistent_keepalive = {keepalive}");
            }
        }
        out
    }

    /// The same configuration as a stock wg-quick file. wg-quick files hold keys inline, so
    /// this reads the key files.
    ///
    /// # Panics
    /// When a key file cannot be read.
    pub fn to_wg_quick(&self) -> String {
        let read = |path: &Path| {
            std::fs::read_to_string(path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
                .trim()
                .to_owned()
        };
        let mut out = String::from("[Interface]\n");
        let _ = writeln!(out, "PrivateKey = {}", read(&self.private_key_file));
        let _ = writeln!(out, "ListenPort = {}", self.listen_port);
        let _ = writeln!(out, "Address = {}", self.addresses.join(", "));
        let _ = writeln!(out, "MTU = {}", self.mtu);
        for peer in &self.peers {
            let _ = writeln!(out, "\n[Peer]");
            let _ = writeln!(out, "PublicKey = {}", peer.public_key);
            if let Some(psk) = &peer.preshared_key_file {
                let _ = writeln!(out, "PresharedKey = {}", read(psk));
            }
            if let Some(endpoint) = peer.endpoint {
                let _ = writeln!(out, "Endpoint = {endpoint}");
            }
            let _ = writeln!(out, "AllowedIPs = {}", peer.allowed_ips.join(", "));
            if let Some(keepalive) = peer.persistent_keepalive {
                let _ = writeln!(out, "PersistentKeepalive = {keepalive}");
            }
        }
        out
    }

    /// The path of the UAPI socket the agent will serve.
    pub fn uapi_socket(&self) -> PathBuf {
        let dir = self.uapi_dir.as_deref().unwrap_or(Path::new(UAPI_DIR));
        meshlink_uapi::socket_path(dir, &self.interface)
    }
}

/// A TOML basic string.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn quote_path(path: &Path) -> String {
    quote(path.to_str().expect("test paths are UTF-8"))
}

fn quote_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| quote(s)).collect();
    format!("[{}]", quoted.join(", "))
}

/// Settings of `meshlink-agent up` beyond its configuration file, given as flags (for a mesh
/// agent, which has no file: see [`crate::MeshAgent::spawn_join_with`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentOptions {
    /// `--metrics-listen`: a loopback `ADDR:PORT` or a Unix socket path.
    pub metrics_listen: Option<PathBuf>,
    /// `--dns=BOOL`.
    pub dns: Option<bool>,
    /// `--dns-listen ADDR[:PORT]`.
    pub dns_listen: Option<SocketAddr>,
    /// `--dns-suffix SUFFIX`.
    pub dns_suffix: Option<String>,
}

impl AgentOptions {
    /// The flags.
    pub fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(at) = &self.metrics_listen {
            args.extend(["--metrics-listen".to_string(), at.display().to_string()]);
        }
        if let Some(on) = self.dns {
            args.push(format!("--dns={on}"));
        }
        if let Some(at) = self.dns_listen {
            args.extend(["--dns-listen".to_string(), at.to_string()]);
        }
        if let Some(suffix) = &self.dns_suffix {
            args.extend(["--dns-suffix".to_string(), suffix.clone()]);
        }
        args
    }
}

/// How the agent is given its configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigFormat {
    /// `up --config FILE.toml`.
    Toml,
    /// `up --wg-quick FILE.conf --interface NAME`.
    WgQuick,
}

/// A running `meshlink-agent up` in a namespace.
///
/// Dropping it sends SIGTERM (SIGKILL after a grace period) and removes the UAPI socket if the
/// agent left it behind, since a leftover socket would be a leak of this run's unique name.
#[derive(Debug)]
pub struct Agent {
    ns: NsRef,
    config: AgentConfig,
    config_path: PathBuf,
    format: ConfigFormat,
    log_dir: PathBuf,
    process: Process,
    /// Earlier incarnations (before a restart), kept so their logs print if the test fails.
    previous: Vec<Process>,
}

impl Agent {
    /// Writes `config` into `dir`, starts the agent in `ns` and waits until its UAPI socket
    /// answers.
    ///
    /// # Panics
    /// When the binary is missing, or the agent exits or is not ready within
    /// [`READY_TIMEOUT`]; the message carries its log.
    pub fn start(ns: &NsRef, dir: &ScratchDir, config: &AgentConfig) -> Agent {
        let mut agent = Agent::spawn(ns, dir, config);
        agent.wait_ready(READY_TIMEOUT);
        agent
    }

    /// Like [`Agent::start`] but returns without waiting for readiness.
    ///
    /// # Panics
    /// When the binary is missing or cannot be started.
    pub fn spawn(ns: &NsRef, dir: &ScratchDir, config: &AgentConfig) -> Agent {
        Agent::spawn_as(ns, dir, config, ConfigFormat::Toml)
    }

    /// Like [`Agent::start`], with the configuration given in `format`.
    ///
    /// # Panics
    /// As [`Agent::start`].
    pub fn start_as(
        ns: &NsRef,
        dir: &ScratchDir,
        config: &AgentConfig,
        format: ConfigFormat,
    ) -> Agent {
        let mut agent = Agent::spawn_as(ns, dir, config, format);
        agent.wait_ready(READY_TIMEOUT);
        agent
    }

    /// Like [`Agent::spawn`], with the configuration given in `format`.
    ///
    /// # Panics
    /// When the binary is missing or cannot be started.
    pub fn spawn_as(
        ns: &NsRef,
        dir: &ScratchDir,
        config: &AgentConfig,
        format: ConfigFormat,
    ) -> Agent {
        let (config_path, text) = match format {
            ConfigFormat::Toml => (
                dir.join(&format!("{}.toml", config.interface)),
                config.to_toml(),
            ),
            ConfigFormat::WgQuick => (
                dir.join(&format!("{}.conf", config.interface)),
                config.to_wg_quick(),
            ),
        };
        // 0600: a wg-quick file holds the private key.
        crate::keys::write_secret(&config_path, &text);
        let process = spawn_process(ns, &config.interface, &config_path, format, dir.path(), 1);
        Agent {
            ns: ns.clone(),
            config: config.clone(),
            config_path,
            format,
            log_dir: dir.path().to_owned(),
            process,
            previous: Vec::new(),
        }
    }

    /// Waits until `wg show IFACE` answers in the agent's namespace.
    ///
    /// # Panics
    /// When the agent exits first or `timeout` passes; the message carries its log.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let iface = self.config.interface.clone();
        let ready = wait_until(
            timeout,
            &format!("agent {iface} to answer `wg show`"),
            || {
                if let Some(status) = self.process.try_wait() {
                    return Some(Err(status));
                }
                wg::answers(&self.ns, &iface).then_some(Ok(()))
            },
        );
        match ready {
            Ok(Ok(())) => {}
            Ok(Err(status)) => panic!(
                "meshlink-agent for {iface} exited before it was ready ({status}); log:\n{}",
                self.process.log_tail(60)
            ),
            Err(timeout) => panic!("{timeout}; agent log:\n{}", self.process.log_tail(60)),
        }
    }

    /// The configuration it was started with.
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// The config file on disk.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The interface name.
    pub fn interface(&self) -> &str {
        &self.config.interface
    }

    /// The namespace it runs in.
    pub fn ns(&self) -> &NsRef {
        &self.ns
    }

    /// The current process.
    pub fn process(&mut self) -> &mut Process {
        &mut self.process
    }

    /// SIGTERM (SIGKILL after the grace period); returns the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.process.terminate()
    }

    /// SIGKILL: a crash, leaving whatever the agent would have cleaned up.
    pub fn kill(&mut self) -> ExitStatus {
        self.process.kill()
    }

    /// Starts the agent again with the same configuration (ending the old process first if it
    /// still runs) and waits until it is ready.
    ///
    /// # Panics
    /// As [`Agent::start`].
    pub fn restart(&mut self) {
        self.process.terminate();
        let n = self.previous.len() + 2;
        let next = spawn_process(
            &self.ns,
            &self.config.interface,
            &self.config_path,
            self.format,
            &self.log_dir,
            n,
        );
        self.previous
            .push(std::mem::replace(&mut self.process, next));
        self.wait_ready(READY_TIMEOUT);
    }

    /// `meshlink-agent status --interface IFACE -o json`, run in the agent's namespace.
    ///
    /// # Panics
    /// When the command fails.
    pub fn status_json(&self) -> String {
        self.ns.run(
            agent_bin().to_str().expect("UTF-8 path"),
            &[
                "status",
                "--interface",
                &self.config.interface,
                "-o",
                "json",
            ],
        )
    }

    /// The Unix time of the latest handshake with `peer`, through `wg show`.
    pub fn latest_handshake(&self, peer: &str) -> Option<u64> {
        wg::latest_handshake(&self.ns, &self.config.interface, peer)
    }

    /// The current endpoint of `peer`, through `wg show`.
    pub fn endpoint(&self, peer: &str) -> Option<String> {
        wg::endpoint(&self.ns, &self.config.interface, peer)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.process.terminate();
        let socket = self.config.uapi_socket();
        if socket.exists() {
            let _ = std::fs::remove_file(&socket);
        }
    }
}

fn spawn_process(
    ns: &NsRef,
    iface: &str,
    config: &Path,
    format: ConfigFormat,
    log_dir: &Path,
    n: usize,
) -> Process {
    let mut cmd = ns.daemon_command(agent_bin());
    match format {
        ConfigFormat::Toml => cmd.arg("up").arg("--config").arg(config),
        ConfigFormat::WgQuick => cmd
            .arg("up")
            .arg("--wg-quick")
            .arg(config)
            .args(["--interface", iface]),
    };
    // The agent reads its log filter from MESHLINK_LOG, which the test's environment passes
    // through (e.g. `MESHLINK_LOG=debug cargo test ...` for a failing test).
    let log = log_dir.join(format!("{iface}.agent.{n}.log"));
    Process::spawn(&format!("meshlink-agent {iface}"), cmd, &log, Stdout::Log)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_documented_toml_keys() {
        let config = AgentConfig {
            interface: "mesh0".into(),
            private_key_file: "/tmp/k".into(),
            listen_port: 51820,
            addresses: vec!["100.64.0.1/24".into()],
            mtu: 1420,
            uapi_dir: None,
            peers: vec![PeerConfig {
                public_key: "abc=".into(),
                preshared_key_file: Some("/tmp/p".into()),
                endpoint: Some("198.18.0.2:51820".parse().unwrap()),
                allowed_ips: vec!["100.64.0.2/32".into(), "10.0.0.0/8".into()],
                persistent_keepalive: Some(25),
            }],
        };
        let expected = r#"interface = "mesh0"
private_key_file = "/tmp/k"
listen_port = 51820
addresses = ["100.64.0.1/24"]
mtu = 1420

[[peers]]
public_key = "abc="
preshared_key_file = "/tmp/p"
endpoint = "198.18.0.2:51820"
allowed_ips = ["100.64.0.2/32", "10.0.0.0/8"]
persistent_keepalive = 25
"#;
        assert_eq!(config.to_toml(), expected);
        assert_eq!(
            config.uapi_socket(),
            Path::new("/var/run/wireguard/mesh0.sock")
        );
    }

    #[test]
    fn renders_a_stock_wg_quick_file() {
        let dir = std::env::temp_dir().join(format!("ml-wgq-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        crate::keys::write_secret(&dir.join("k"), "PRIV=\n");
        crate::keys::write_secret(&dir.join("p"), "PSK=\n");
        let config = AgentConfig {
            interface: "mesh0".into(),
            private_key_file: dir.join("k"),
            listen_port: 51820,
            addresses: vec!["100.64.0.1/24".into()],
            mtu: 1420,
            uapi_dir: None,
            peers: vec![PeerConfig {
                public_key: "PUB=".into(),
                preshared_key_file: Some(dir.join("p")),
                endpoint: Some("198.18.0.2:51820".parse().unwrap()),
                allowed_ips: vec!["100.64.0.2/32".into(), "10.0.0.0/8".into()],
                persistent_keepalive: Some(25),
            }],
        };
        let text = config.to_wg_quick();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            text,
            "[Interface]\nPrivateKey = PRIV=\nListenPort = 51820\nAddress = 100.64.0.1/24\nMTU = 1420\n\n\
             [Peer]\nPublicKey = PUB=\nPresharedKey = PSK=\nEndpoint = 198.18.0.2:51820\n\
             AllowedIPs = 100.64.0.2/32, 10.0.0.0/8\nPersistentKeepalive = 25\n"
        );
    }

    #[test]
    fn options_become_flags() {
        assert!(AgentOptions::default().args().is_empty());
        let options = AgentOptions {
            metrics_listen: Some("/run/m.sock".into()),
            dns: Some(false),
            dns_listen: Some("127.0.0.1:5353".parse().unwrap()),
            dns_suffix: Some("corp".into()),
        };
        assert_eq!(
            options.args(),
            [
                "--metrics-listen",
                "/run/m.sock",
                "--dns=false",
                "--dns-listen",
                "127.0.0.1:5353",
                "--dns-suffix",
                "corp"
            ]
        );
    }

    #[test]
    fn quotes_toml_strings() {
        assert_eq!(quote(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(quote("x\ny"), r#""x\u000Ay""#);
    }
}
