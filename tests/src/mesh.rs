//! Agents that join a mesh with a token (`meshlink-agent up --token-file`), and reachability checks
//! over the overlay between many hosts at once.
//!
//! A [`MeshAgent`] keeps its state directory (identity, node credentials, cached map) across
//! restarts, so [`MeshAgent::restart`] is the "reboot" of a joined node: `up --state-dir`
//! without a token, which works with the coordinator down.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::netns::NsRef;
use crate::process::{Process, Stdout};
use crate::scratch::ScratchDir;
use crate::wait::wait_until;
use crate::{agent_bin, unique_name, wg, UAPI_DIR};

/// How long [`MeshAgent::join`] and [`MeshAgent::restart`] wait for the agent to join (or load
/// its cache) and bring its interface up.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `meshlink-agent up` in mesh mode, in a namespace.
///
/// Dropping it sends SIGTERM (SIGKILL after a grace period) and removes the UAPI socket if the
/// agent left it behind.
#[derive(Debug)]
pub struct MeshAgent {
    ns: NsRef,
    name: String,
    interface: String,
    state_dir: PathBuf,
    log_dir: PathBuf,
    process: Process,
    /// Earlier incarnations (before a restart), kept so their logs print if the test fails.
    previous: Vec<Process>,
    /// Flags given at every start ([`MeshAgent::spawn_join_with`]).
    options: Vec<String>,
}

impl MeshAgent {
    /// Starts `meshlink-agent up --token-file FILE --name NAME [--label K=V]...` in `ns` with a
    /// fresh state directory and interface name, and waits until it has joined and its
    /// interface answers.
    ///
    /// # Panics
    /// When the binary is missing, or the agent exits or is not ready within
    /// [`READY_TIMEOUT`]; the message carries its log.
    pub fn join(
        ns: &NsRef,
        dir: &ScratchDir,
        token: &str,
        name: &str,
        labels: &[(&str, &str)],
    ) -> MeshAgent {
        let mut agent = MeshAgent::spawn_join(ns, dir, token, name, labels);
        agent.wait_ready(READY_TIMEOUT);
        agent
    }

    /// Like [`MeshAgent::join`] without waiting: for starting several agents at once, then
    /// calling [`MeshAgent::wait_ready`] on each.
    ///
    /// # Panics
    /// When the binary is missing or cannot be started.
    pub fn spawn_join(
        ns: &NsRef,
        dir: &ScratchDir,
        token: &str,
        name: &str,
        labels: &[(&str, &str)],
    ) -> MeshAgent {
        MeshAgent::spawn_join_with(ns, dir, token, name, labels, &Default::default())
    }

    /// Like [`MeshAgent::spawn_join`], with `options` as flags at this start and every restart.
    ///
    /// # Panics
    /// When the binary is missing or cannot be started.
    pub fn spawn_join_with(
        ns: &NsRef,
        dir: &ScratchDir,
        token: &str,
        name: &str,
        labels: &[(&str, &str)],
        options: &crate::agent::AgentOptions,
    ) -> MeshAgent {
        let options = options.args();
        let interface = unique_name("m");
        let state_dir = dir.join(&format!("{name}.state"));
        // The token goes in a file (0600), not on the command line where `ps` shows it.
        let token_file = dir.join(&format!("{name}.token"));
        crate::keys::write_secret(&token_file, token);
        let mut args: Vec<String> = vec![
            "--token-file".into(),
            token_file.display().to_string(),
            "--name".into(),
            name.into(),
        ];
        for (key, value) in labels {
            args.extend(["--label".into(), format!("{key}={value}")]);
        }
        args.extend(options.iter().cloned());
        let process = spawn(ns, name, &interface, &state_dir, &args, dir.path(), 1);
        MeshAgent {
            ns: ns.clone(),
            name: name.to_owned(),
            interface,
            state_dir,
            log_dir: dir.path().to_owned(),
            process,
            previous: Vec::new(),
            options,
        }
    }

    /// Waits until the agent's interface answers `wg show` and `status` reports an overlay
    /// address (that is, it has joined, or loaded its cached membership).
    ///
    /// # Panics
    /// When the agent exits first or `timeout` passes; the message carries its log.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let what = format!("agent {} ({}) to come up", self.name, self.interface);
        let ready = wait_until(timeout, &what, || {
            if let Some(status) = self.process.try_wait() {
                return Some(Err(status));
            }
            if !wg::answers(&self.ns, &self.interface) {
                return None;
            }
            self.try_status()
                .and_then(|s| address_of(&s))
                .map(|_| Ok(()))
        });
        match ready {
            Ok(Ok(())) => {}
            Ok(Err(status)) => panic!(
                "meshlink-agent {} exited before it was ready ({status}); log:\n{}",
                self.name,
                self.process.log_tail(60)
            ),
            Err(timeout) => panic!("{timeout}; agent log:\n{}", self.process.log_tail(60)),
        }
    }

    /// Starts the agent again from its state directory alone (`up --state-dir DIR --interface
    /// IFACE`, no token), ending the old process first with SIGTERM if it still runs, and
    /// waits until it is ready.
    ///
    /// # Panics
    /// As [`MeshAgent::join`].
    pub fn restart(&mut self) {
        self.respawn();
        self.wait_ready(READY_TIMEOUT);
    }

    /// Like [`MeshAgent::restart`], without waiting: for a start that is expected to fail.
    pub fn respawn(&mut self) {
        self.process.terminate();
        let n = self.previous.len() + 2;
        let next = spawn(
            &self.ns,
            &self.name,
            &self.interface,
            &self.state_dir,
            &self.options,
            &self.log_dir,
            n,
        );
        self.previous
            .push(std::mem::replace(&mut self.process, next));
    }

    /// SIGKILL: a crash (the UAPI socket is left behind).
    pub fn kill(&mut self) -> ExitStatus {
        self.process.kill()
    }

    /// SIGTERM (SIGKILL after the grace period); returns the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.process.terminate()
    }

    /// Waits up to `timeout` for the agent to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.process.wait_timeout(timeout)
    }

    /// The current process.
    pub fn process(&mut self) -> &mut Process {
        &mut self.process
    }

    /// The current process's log so far (stderr and stdout).
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// The name it joined with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its interface name.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// The namespace it runs in.
    pub fn ns(&self) -> &NsRef {
        &self.ns
    }

    /// Its state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// `meshlink-agent status --interface IFACE -o json`, parsed; `None` when no agent answers.
    ///
    /// # Panics
    /// When the agent binary is missing.
    pub fn try_status(&self) -> Option<Value> {
        let out = self.ns.exec(
            agent_bin().to_str().expect("UTF-8 path"),
            &["status", "--interface", &self.interface, "-o", "json"],
        );
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Like [`MeshAgent::try_status`].
    ///
    /// # Panics
    /// When no agent answers.
    pub fn status(&self) -> Value {
        self.try_status().unwrap_or_else(|| {
            panic!(
                "`meshlink-agent status` for {} ({}) failed; log:\n{}",
                self.name,
                self.interface,
                self.process.log_tail(30)
            )
        })
    }

    /// Its overlay address, from `status`.
    ///
    /// # Panics
    /// When no agent answers or it reports no IPv4 address.
    pub fn address(&self) -> Ipv4Addr {
        let status = self.status();
        address_of(&status)
            .unwrap_or_else(|| panic!("{} reports no IPv4 address: {status}", self.name))
    }

    /// Whether `ip` (as a host address, `/32`) is on its tunnel interface: a workload address
    /// it holds and has put up.
    pub fn has_address(&self, ip: Ipv4Addr) -> bool {
        let host = format!("{ip}/32");
        self.ns
            .ip(&["-br", "addr", "show", "dev", self.interface()])
            .split_whitespace()
            .any(|a| a == host)
    }

    /// Its public key, from `status`.
    ///
    /// # Panics
    /// When no agent answers.
    pub fn public_key(&self) -> String {
        let status = self.status();
        status
            .get("public_key")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("status has no public_key: {status}"))
            .to_owned()
    }

    /// The public keys of the peers `status` lists.
    ///
    /// # Panics
    /// When no agent answers.
    pub fn peer_keys(&self) -> Vec<String> {
        peer_keys(&self.status())
    }

    /// Its userspace API socket (where applications register for live migration).
    pub fn uapi_socket(&self) -> std::path::PathBuf {
        Path::new(UAPI_DIR).join(format!("{}.sock", self.interface))
    }

    fn remove_stale_socket(&self) {
        let socket = self.uapi_socket();
        if socket.exists() {
            let _ = std::fs::remove_file(socket);
        }
    }
}

impl Drop for MeshAgent {
    fn drop(&mut self) {
        self.process.terminate();
        self.remove_stale_socket();
    }
}

/// The first IPv4 address in a `status -o json` answer's `addresses`, without its prefix.
pub fn address_of(status: &Value) -> Option<Ipv4Addr> {
    status
        .get("addresses")?
        .as_array()?
        .iter()
        .filter_map(Value::as_str)
        .find_map(|a| a.split('/').next()?.parse().ok())
}

/// The peers' public keys in a `status -o json` answer.
pub fn peer_keys(status: &Value) -> Vec<String> {
    status
        .get("peers")
        .and_then(Value::as_array)
        .map(|peers| {
            peers
                .iter()
                .filter_map(|p| p.get("public_key")?.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn spawn(
    ns: &NsRef,
    name: &str,
    interface: &str,
    state_dir: &Path,
    extra: &[String],
    log_dir: &Path,
    n: usize,
) -> Process {
    let mut cmd = ns.daemon_command(agent_bin());
    cmd.arg("up")
        .args(extra)
        .arg("--state-dir")
        .arg(state_dir)
        .args(["--interface", interface]);
    let log = log_dir.join(format!("{name}.agent.{n}.log"));
    Process::spawn(&format!("meshlink-agent {name}"), cmd, &log, Stdout::Log)
}

/// One directed overlay path to check: from a namespace to an address.
#[derive(Debug, Clone)]
pub struct Reach {
    /// Describes the path in messages, e.g. `vm-a1 -> vm-b1`.
    pub label: String,
    /// Where the ping runs.
    pub from: NsRef,
    /// What it pings.
    pub to: Ipv4Addr,
}

impl Reach {
    /// Every ordered pair of distinct `(name, namespace, address)` nodes.
    pub fn all_pairs(nodes: &[(&str, &NsRef, Ipv4Addr)]) -> Vec<Reach> {
        let mut out = Vec::new();
        for (from_name, from, _) in nodes {
            for (to_name, _, to) in nodes {
                if from_name != to_name {
                    out.push(Reach {
                        label: format!("{from_name} -> {to_name} ({to})"),
                        from: (*from).clone(),
                        to: *to,
                    });
                }
            }
        }
        out
    }

    /// Waits until every path answers a ping, probing all of them at once (one thread each,
    /// pinging until the first reply). Returns how long each took, in the order given.
    ///
    /// # Errors
    /// The labels of the paths that gave no reply within `timeout`, as one message.
    ///
    /// # Panics
    /// When a ping thread panics (`ping` cannot be started).
    pub fn wait_all(paths: &[Reach], timeout: Duration) -> Result<Vec<Duration>, String> {
        let start = Instant::now();
        let results: Vec<Option<Duration>> = std::thread::scope(|scope| {
            let handles: Vec<_> = paths
                .iter()
                .map(|path| {
                    scope.spawn(move || loop {
                        if path.from.ping_once(path.to, Duration::from_secs(1)) {
                            return Some(start.elapsed());
                        }
                        if start.elapsed() >= timeout {
                            return None;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("ping thread panicked"))
                .collect()
        });
        let failed: Vec<&str> = paths
            .iter()
            .zip(&results)
            .filter(|(_, r)| r.is_none())
            .map(|(p, _)| p.label.as_str())
            .collect();
        if failed.is_empty() {
            Ok(results.into_iter().flatten().collect())
        } else {
            Err(format!(
                "no ping reply within {timeout:?} on {} of {} paths: {}",
                failed.len(),
                paths.len(),
                failed.join(", ")
            ))
        }
    }

    /// Pings every path `count` times, 0.2 s apart, all at once; returns the labels of the
    /// paths that got any reply (an empty list means every path is cut).
    ///
    /// # Panics
    /// When a ping thread panics (`ping` cannot be started).
    pub fn answering(paths: &[Reach], count: u32) -> Vec<String> {
        let count = count.max(1).to_string();
        std::thread::scope(|scope| {
            let handles: Vec<_> = paths
                .iter()
                .map(|path| {
                    let count = &count;
                    scope.spawn(move || {
                        let to = path.to.to_string();
                        let args = ["-n", "-q", "-c", count, "-i", "0.2", "-W", "1", &to];
                        path.from.succeeds("ping", &args)
                    })
                })
                .collect();
            paths
                .iter()
                .zip(handles)
                .filter_map(|(p, h)| {
                    h.join()
                        .expect("ping thread panicked")
                        .then(|| p.label.clone())
                })
                .collect()
        })
    }
}
