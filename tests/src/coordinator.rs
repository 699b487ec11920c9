//! `meshlink-coordinator` in a namespace, and `meshctl` against it.
//!
//! [`Coordinator`] owns the running `serve` process (ended by pid), keeps its state directory
//! across restarts and kills, and knows where its admin token is. The admin API listens on the
//! loopback of the coordinator's namespace, so [`Meshctl`] runs `meshctl` inside that namespace.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::netns::NsRef;
use crate::process::{Process, Stdout};
use crate::scratch::ScratchDir;
use crate::{coordinator_bin, meshctl_bin};

/// The QUIC (UDP) port agents connect to, inside the coordinator's own namespace.
pub const QUIC_PORT: u16 = 7443;
/// The admin API's port, on the loopback of the coordinator's namespace.
pub const ADMIN_PORT: u16 = 7444;
/// How long [`Coordinator::start`] waits for the `coordinator fingerprint:` line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `meshlink-coordinator serve` in a namespace.
///
/// Dropping it ends the process by pid (SIGTERM, then SIGKILL).
#[derive(Debug)]
pub struct Coordinator {
    ns: NsRef,
    state_dir: PathBuf,
    log_dir: PathBuf,
    advertise: SocketAddrV4,
    fingerprint: String,
    /// Flags beyond the defaults (store, other coordinators), kept for restarts.
    extra: Vec<String>,
    /// Distinguishes the log files of coordinators sharing a scratch directory.
    label: String,
    process: Process,
    /// Earlier incarnations, kept so their logs print if the test fails.
    previous: Vec<Process>,
}

/// One of several coordinators sharing a PostgreSQL store ([`Coordinator::start_shared`]).
#[derive(Debug, Clone)]
pub struct Shared<'a> {
    /// Its name: state in `dir/NAME`, logs `NAME.N.log`.
    pub name: &'a str,
    /// The store's URL.
    pub store: &'a str,
    /// Every coordinator's `host:port`, in the same order for all.
    pub coordinators: &'a [SocketAddrV4],
    /// The state directory of a coordinator already started, whose identity (certificate,
    /// key, admin token) this one must share; `None` for the first.
    pub identity_from: Option<&'a Path>,
}

impl Coordinator {
    /// Starts a coordinator in `ns` listening on every address, advertising `ip` in its join
    /// tokens, with its state in `dir/coordinator`; waits until it prints its fingerprint (its
    /// listeners are bound by then).
    ///
    /// # Panics
    /// When the binary is missing, or the coordinator exits or is not ready within
    /// [`READY_TIMEOUT`]; the message carries its log.
    pub fn start(ns: &NsRef, dir: &ScratchDir, ip: Ipv4Addr) -> Coordinator {
        Coordinator::start_with(ns, dir, ip, &[])
    }

    /// As [`Coordinator::start`], with further flags (`--key-rotation-secs 10`), kept for
    /// restarts.
    ///
    /// # Panics
    /// As [`Coordinator::start`].
    pub fn start_with(ns: &NsRef, dir: &ScratchDir, ip: Ipv4Addr, flags: &[&str]) -> Coordinator {
        let state_dir = dir.join("coordinator");
        let advertise = SocketAddrV4::new(ip, QUIC_PORT);
        let label = "coordinator".to_string();
        let extra: Vec<String> = flags.iter().map(|f| (*f).to_owned()).collect();
        let (process, fingerprint) =
            spawn(ns, &state_dir, advertise, dir.path(), &label, &extra, 1);
        Coordinator {
            ns: ns.clone(),
            state_dir,
            log_dir: dir.path().to_owned(),
            advertise,
            fingerprint,
            extra,
            label,
            process,
            previous: Vec::new(),
        }
    }

    /// Starts one of several coordinators sharing a PostgreSQL store (see [`Shared`]).
    ///
    /// # Panics
    /// As [`Coordinator::start`]; also when the identity cannot be copied.
    pub fn start_shared(
        ns: &NsRef,
        dir: &ScratchDir,
        ip: Ipv4Addr,
        shared: &Shared<'_>,
    ) -> Coordinator {
        let state_dir = dir.join(shared.name);
        if let Some(from) = shared.identity_from {
            std::fs::create_dir_all(&state_dir)
                .unwrap_or_else(|e| panic!("{}: {e}", state_dir.display()));
            for file in ["coordinator.crt", "coordinator.key", "admin.token"] {
                std::fs::copy(from.join(file), state_dir.join(file))
                    .unwrap_or_else(|e| panic!("copy {file}: {e}"));
            }
        }
        let list: Vec<String> = shared
            .coordinators
            .iter()
            .map(ToString::to_string)
            .collect();
        let extra = vec![
            "--store".to_string(),
            shared.store.to_string(),
            "--coordinators".to_string(),
            list.join(","),
        ];
        let advertise = SocketAddrV4::new(ip, QUIC_PORT);
        let label = shared.name.to_string();
        let (process, fingerprint) =
            spawn(ns, &state_dir, advertise, dir.path(), &label, &extra, 1);
        Coordinator {
            ns: ns.clone(),
            state_dir,
            log_dir: dir.path().to_owned(),
            advertise,
            fingerprint,
            extra,
            label,
            process,
            previous: Vec::new(),
        }
    }

    /// Starts it again on the same state directory (ending the current process first with
    /// SIGTERM if it still runs) and waits until it is ready.
    ///
    /// # Panics
    /// As [`Coordinator::start`]; also when the restarted coordinator reports another
    /// certificate fingerprint (every join token and agent pins the first one).
    pub fn restart(&mut self) {
        self.process.terminate();
        let n = self.previous.len() + 2;
        let (next, fingerprint) = spawn(
            &self.ns,
            &self.state_dir,
            self.advertise,
            &self.log_dir,
            &self.label,
            &self.extra,
            n,
        );
        self.previous
            .push(std::mem::replace(&mut self.process, next));
        assert_eq!(
            fingerprint, self.fingerprint,
            "the restarted coordinator has another certificate"
        );
    }

    /// SIGKILL: a crash, with no chance to close sessions or flush anything.
    pub fn kill(&mut self) -> ExitStatus {
        self.process.kill()
    }

    /// SIGTERM (SIGKILL after the grace period); returns the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.process.terminate()
    }

    /// Whether the current process still runs.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// The current process.
    pub fn process(&mut self) -> &mut Process {
        &mut self.process
    }

    /// The namespace it runs in.
    pub fn ns(&self) -> &NsRef {
        &self.ns
    }

    /// The address put in join tokens.
    pub fn advertise(&self) -> SocketAddr {
        SocketAddr::V4(self.advertise)
    }

    /// The hex SHA-256 of its certificate, as it printed it.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Its state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// `STATE_DIR/admin.token`, which the coordinator writes on first start (mode 0600).
    pub fn admin_token_file(&self) -> PathBuf {
        self.state_dir.join("admin.token")
    }

    /// The admin token, read from its file.
    ///
    /// # Panics
    /// When the file cannot be read.
    pub fn admin_token(&self) -> String {
        let path = self.admin_token_file();
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
            .trim()
            .to_owned()
    }

    /// A `meshctl` for this coordinator's admin API.
    pub fn meshctl(&self) -> Meshctl {
        Meshctl {
            ns: self.ns.clone(),
            url: format!("http://127.0.0.1:{ADMIN_PORT}"),
            token_file: self.admin_token_file(),
        }
    }
}

fn spawn(
    ns: &NsRef,
    state_dir: &Path,
    advertise: SocketAddrV4,
    log_dir: &Path,
    label: &str,
    extra: &[String],
    n: usize,
) -> (Process, String) {
    let mut cmd = ns.daemon_command(coordinator_bin());
    cmd.arg("serve")
        .arg("--state-dir")
        .arg(state_dir)
        .args(["--listen", &format!("0.0.0.0:{QUIC_PORT}")])
        .args(["--admin-listen", &format!("127.0.0.1:{ADMIN_PORT}")])
        .args(["--advertise", &advertise.to_string()])
        .args(extra);
    let log = log_dir.join(format!("{label}.{n}.log"));
    let mut process = Process::spawn(
        &format!("meshlink-coordinator {label} ({n})"),
        cmd,
        &log,
        Stdout::Lines,
    );
    let deadline = Instant::now() + READY_TIMEOUT;
    while Instant::now() < deadline {
        // The fingerprint is printed once the listeners are bound, on every start.
        if let Some(line) = process.next_line(Duration::from_millis(100)) {
            if let Some(fingerprint) = line.strip_prefix("coordinator fingerprint: ") {
                return (process, fingerprint.trim().to_owned());
            }
        } else if let Some(status) = process.try_wait() {
            panic!(
                "meshlink-coordinator exited before it was ready ({status}); log:\n{}",
                process.log_tail(60)
            );
        }
    }
    panic!(
        "meshlink-coordinator printed no fingerprint within {READY_TIMEOUT:?}; log:\n{}",
        process.log_tail(60)
    );
}

/// One node as `meshctl node list -o json` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Node id.
    pub id: u64,
    /// Node name.
    pub name: String,
    /// Overlay address (no prefix length).
    pub address: Ipv4Addr,
    /// WireGuard public key, base64.
    pub public_key: String,
    /// Endpoints as peers see them.
    pub endpoints: Vec<String>,
    /// Labels given at join.
    pub labels: BTreeMap<String, String>,
    /// Has a live control session.
    pub online: bool,
    /// Revoked.
    pub revoked: bool,
}

impl NodeInfo {
    /// Reads one element of `node list -o json`.
    ///
    /// # Panics
    /// When a field is missing or has the wrong type.
    pub fn from_json(v: &Value) -> NodeInfo {
        let field = |name: &str| {
            v.get(name)
                .unwrap_or_else(|| panic!("node JSON has no `{name}`: {v}"))
        };
        let text = |name: &str| {
            field(name)
                .as_str()
                .unwrap_or_else(|| panic!("node `{name}` is not a string: {v}"))
                .to_owned()
        };
        let flag = |name: &str| {
            field(name)
                .as_bool()
                .unwrap_or_else(|| panic!("node `{name}` is not a boolean: {v}"))
        };
        NodeInfo {
            id: field("id")
                .as_u64()
                .unwrap_or_else(|| panic!("node `id` is not a number: {v}")),
            name: text("name"),
            address: text("address")
                .parse()
                .unwrap_or_else(|e| panic!("node `address` is not IPv4 ({e}): {v}")),
            public_key: text("public_key"),
            endpoints: field("endpoints")
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|e| e.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
            labels: v
                .get("labels")
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                        .collect()
                })
                .unwrap_or_default(),
            online: flag("online"),
            revoked: flag("revoked"),
        }
    }
}

/// `meshctl` pointed at one coordinator, run inside the coordinator's namespace.
#[derive(Debug, Clone)]
pub struct Meshctl {
    ns: NsRef,
    url: String,
    token_file: PathBuf,
}

impl Meshctl {
    /// Runs `meshctl --coordinator URL --admin-token-file FILE ARGS` and returns its output,
    /// whatever its status.
    ///
    /// # Panics
    /// When the binary is missing or cannot be started.
    pub fn exec(&self, args: &[&str]) -> Output {
        let bin = meshctl_bin();
        let mut full: Vec<&str> = vec![
            "--coordinator",
            &self.url,
            "--admin-token-file",
            self.token_file.to_str().expect("UTF-8 path"),
        ];
        full.extend_from_slice(args);
        self.ns.exec(bin.to_str().expect("UTF-8 path"), &full)
    }

    /// Like [`Meshctl::exec`], returning stdout.
    ///
    /// # Panics
    /// When `meshctl` exits non-zero; the message has its stderr.
    pub fn run(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "meshctl {} failed ({}):\nstdout: {}\nstderr: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim_end(),
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `meshctl ARGS -o json`, parsed.
    ///
    /// # Panics
    /// When `meshctl` fails or does not print JSON.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut full = args.to_vec();
        full.extend_from_slice(&["-o", "json"]);
        let text = self.run(&full);
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("meshctl {} printed no JSON ({e}):\n{text}", full.join(" ")))
    }

    /// `network create NAME --cidr CIDR`.
    ///
    /// # Panics
    /// When it fails.
    pub fn network_create(&self, name: &str, cidr: &str) {
        self.run(&["network", "create", name, "--cidr", cidr]);
    }

    /// `token create --network NETWORK [--uses N] [--expires D]`: the token's text.
    ///
    /// # Panics
    /// When it fails or the JSON has no `.token`.
    pub fn token_create(&self, network: &str, uses: Option<u32>, expires: Option<&str>) -> String {
        let uses = uses.map(|n| n.to_string());
        let mut args = vec!["token", "create", "--network", network];
        if let Some(uses) = &uses {
            args.extend_from_slice(&["--uses", uses]);
        }
        if let Some(expires) = expires {
            args.extend_from_slice(&["--expires", expires]);
        }
        let json = self.json(&args);
        json.get("token")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("token create printed no `.token`: {json}"))
            .to_owned()
    }

    /// `node list`: every node, revoked ones included.
    ///
    /// # Panics
    /// When it fails or prints something other than an array of nodes.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        let json = self.json(&["node", "list"]);
        json.as_array()
            .unwrap_or_else(|| panic!("node list is not a JSON array: {json}"))
            .iter()
            .map(NodeInfo::from_json)
            .collect()
    }

    /// The node called `name`, if listed.
    ///
    /// # Panics
    /// As [`Meshctl::nodes`].
    pub fn node(&self, name: &str) -> Option<NodeInfo> {
        self.nodes().into_iter().find(|n| n.name == name)
    }

    /// `node revoke NAME`.
    ///
    /// # Panics
    /// When it fails.
    pub fn revoke(&self, name: &str) {
        self.run(&["node", "revoke", name]);
    }

    /// `node delete NAME`.
    ///
    /// # Panics
    /// When it fails.
    pub fn delete(&self, name: &str) {
        self.run(&["node", "delete", name]);
    }

    /// `status`, parsed.
    ///
    /// # Panics
    /// When it fails.
    pub fn status(&self) -> Value {
        self.json(&["status"])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_node_from_meshctl_json() {
        let v: Value = serde_json::from_str(
            r#"{"id": 3, "name": "vm-a1", "network": "prod", "address": "100.64.0.3",
                "public_key": "abc=", "labels": {"provider": "a"}, "tags": [],
                "endpoints": ["198.18.1.11:51820"], "online": true, "last_seen": 1,
                "revoked": false, "created_at": 1}"#,
        )
        .unwrap();
        let node = NodeInfo::from_json(&v);
        assert_eq!(node.id, 3);
        assert_eq!(node.address, Ipv4Addr::new(100, 64, 0, 3));
        assert_eq!(node.endpoints, vec!["198.18.1.11:51820".to_owned()]);
        assert_eq!(node.labels.get("provider").map(String::as_str), Some("a"));
        assert!(node.online && !node.revoked);
    }
}
