//! The bed of the access-policy tests (`tests/tests/policy.rs`): a mesh of tagged nodes,
//! policies set through `meshctl`, what the agents report of their firewall, and small TCP and
//! UDP programs that show what gets through.
//!
//! [`PolicyMesh`] is one provider with a coordinator and one host per node. Each node joins
//! with a join token of its own carrying its tags (`meshctl token create --tag`), so a test
//! starts from the tags it names. A policy is written to the scratch directory and set with
//! `meshctl policy set`; [`PolicyMesh::wait_policy`] waits until every agent enforces that
//! version (`firewall.policy_version` in `meshlink-agent status`).
//!
//! The programs are `python3` one-file scripts, as in the NAT and chaos tests:
//! - [`EchoServer`]: TCP and UDP on fixed ports of every address of a namespace; it answers
//!   each line (TCP) or datagram (UDP) with its own name in front and prints one line per
//!   connection accepted or datagram received, so a test sees *who* answered and *whether*
//!   anything arrived.
//! - [`tcp_exchange`]: one connection, one line, one answer (or none within the wait).
//! - [`Stream`]: one long-lived TCP connection sending a numbered line every 100 ms and
//!   printing each echo, so a test sees a running flow stop and start again.
//!
//! Policies speak of ports; the servers listen on the ports the policies name (they are the
//! only listeners in their namespace, so fixed ports do not collide).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::coordinator::{Coordinator, Meshctl};
use crate::mesh::{self, MeshAgent};
use crate::netns::NsRef;
use crate::process::{Process, Stdout};
use crate::providers::{Provider, ProviderHost, Providers};
use crate::scratch::ScratchDir;
use crate::wait::wait_until;
use crate::{agent_bin, coordinator_bin, meshctl_bin, require_tool, unique_name};

/// The network every policy test uses.
pub const NETWORK: &str = "prod";
/// Its overlay prefix.
pub const NETWORK_CIDR: &str = "100.64.0.0/16";
/// Bound on one step: a policy reaching every agent, an allowed flow answering, a counter
/// moving.
pub const STEP: Duration = Duration::from_secs(15);

/// One node of a [`PolicyMesh`]: its name and the tags its join token gives it.
#[derive(Debug, Clone, Copy)]
pub struct NodeSpec<'a> {
    /// The node's name.
    pub name: &'a str,
    /// Its tags from the start (the join token's `--tag`s).
    pub tags: &'a [&'a str],
}

/// A coordinator and one agent per node on one simulated provider, in network [`NETWORK`].
#[derive(Debug)]
pub struct PolicyMesh {
    // Field order is drop order: agents before the coordinator, processes before the
    // namespaces they run in, the scratch directory last.
    agents: Vec<MeshAgent>,
    coord: Coordinator,
    hosts: Vec<ProviderHost>,
    _providers: Providers,
    dir: ScratchDir,
    policies: u32,
}

impl PolicyMesh {
    /// Builds the bed and waits until every agent has joined.
    ///
    /// # Panics
    /// When a binary or tool is missing, or something does not start.
    pub fn start(label: &str, nodes: &[NodeSpec<'_>]) -> PolicyMesh {
        agent_bin();
        coordinator_bin();
        meshctl_bin();
        require_tool("python3", "python3");
        require_tool("wg", "wireguard-tools");
        let dir = ScratchDir::create(label);
        let mut providers = Providers::create(1);
        let coord_host = providers.add_host(Provider::A);
        let coord = Coordinator::start(&coord_host.ns, &dir, coord_host.underlay);
        let ctl = coord.meshctl();
        ctl.network_create(NETWORK, NETWORK_CIDR);
        let mut hosts = Vec::with_capacity(nodes.len() + 1);
        let mut agents: Vec<MeshAgent> = Vec::with_capacity(nodes.len());
        for node in nodes {
            let host = providers.add_host(Provider::A);
            let token = token_with_tags(&ctl, node.tags);
            agents.push(MeshAgent::spawn_join(
                &host.ns,
                &dir,
                &token,
                node.name,
                &[],
            ));
            hosts.push(host);
        }
        hosts.push(coord_host);
        for a in &mut agents {
            a.wait_ready(mesh::READY_TIMEOUT);
        }
        PolicyMesh {
            agents,
            coord,
            hosts,
            _providers: providers,
            dir,
            policies: 0,
        }
    }

    /// `meshctl` for the coordinator.
    pub fn ctl(&self) -> Meshctl {
        self.coord.meshctl()
    }

    /// The coordinator's underlay address (where agents reach it).
    pub fn coordinator_ip(&self) -> std::net::IpAddr {
        self.coord.advertise().ip()
    }

    /// The coordinator's namespace.
    pub fn coordinator_ns(&self) -> NsRef {
        self.coord.ns().clone()
    }

    /// The scratch directory (logs, policy files).
    pub fn dir(&self) -> &ScratchDir {
        &self.dir
    }

    /// The agent of node `name`.
    ///
    /// # Panics
    /// When there is none.
    pub fn agent(&self, name: &str) -> &MeshAgent {
        self.agents
            .iter()
            .find(|a| a.name() == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// Every agent.
    pub fn agents(&self) -> &[MeshAgent] {
        &self.agents
    }

    /// The namespace of node `name`.
    pub fn ns(&self, name: &str) -> NsRef {
        self.agent(name).ns().clone()
    }

    /// The host (namespace, underlay address, veth) of node `name`.
    ///
    /// # Panics
    /// When there is none.
    pub fn host(&self, name: &str) -> &ProviderHost {
        let i = self
            .agents
            .iter()
            .position(|a| a.name() == name)
            .unwrap_or_else(|| panic!("no node {name}"));
        &self.hosts[i]
    }

    /// The overlay address of node `name`.
    pub fn address(&self, name: &str) -> Ipv4Addr {
        self.agent(name).address()
    }

    /// The public key of node `name`.
    pub fn key(&self, name: &str) -> String {
        self.agent(name).public_key()
    }

    /// The pid of every agent, by node name: a policy must take effect without restarting
    /// any of them.
    pub fn pids(&mut self) -> HashMap<String, u32> {
        self.agents
            .iter_mut()
            .map(|a| {
                let name = a.name().to_owned();
                let p = a.process();
                assert!(p.is_running(), "the agent of {name} is not running");
                (name, p.pid())
            })
            .collect()
    }

    /// `meshctl -o json node tag NODE EDITS...` (`+TAG` adds, `-TAG` removes): the node's
    /// tags after the change.
    ///
    /// # Panics
    /// When it fails.
    pub fn tag(&self, node: &str, edits: &[&str]) -> Vec<String> {
        let mut args = vec!["-o", "json", "node", "tag", node];
        args.extend_from_slice(edits);
        let text = self.ctl().run(&args);
        let json: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("node tag printed no JSON ({e}): {text}"));
        strings(&json["tags"])
    }

    /// `meshctl policy set NETWORK FILE` with `text` as the file: the new version.
    ///
    /// # Panics
    /// When it fails.
    pub fn set_policy(&mut self, text: &str) -> u64 {
        self.policies += 1;
        let file = self.dir.join(&format!("policy-{}.toml", self.policies));
        std::fs::write(&file, text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let path = file.to_str().expect("UTF-8 path");
        let reply = self.ctl().json(&["policy", "set", NETWORK, path]);
        version_of(&reply)
    }

    /// `meshctl policy rollback NETWORK VERSION`: the new version (a rollback is one).
    ///
    /// # Panics
    /// When it fails.
    pub fn rollback(&self, to: u64) -> u64 {
        let reply = self
            .ctl()
            .json(&["policy", "rollback", NETWORK, &to.to_string()]);
        version_of(&reply)
    }

    /// `meshctl policy test --from FROM --to TO --port PORT`.
    ///
    /// # Panics
    /// When it fails.
    pub fn verdict(&self, from: &str, to: &str, port: &str) -> Verdict {
        let v = self
            .ctl()
            .json(&["policy", "test", "--from", from, "--to", to, "--port", port]);
        Verdict {
            allowed: v["allowed"]
                .as_bool()
                .unwrap_or_else(|| panic!("policy test: no `allowed`: {v}")),
            line: v
                .pointer("/rule/line")
                .and_then(Value::as_u64)
                .map(|l| u32::try_from(l).expect("a line fits in u32")),
        }
    }

    /// Waits until every agent enforces policy `version` (`None`: no policy).
    ///
    /// # Panics
    /// When one does not within [`STEP`].
    pub fn wait_policy(&self, version: Option<u64>) -> Duration {
        let started = Instant::now();
        for a in &self.agents {
            let what = format!("{} to enforce policy version {version:?}", a.name());
            wait_until(STEP, &what, || {
                let fw = Firewall::of(&a.try_status()?);
                (fw.policy_version == version).then_some(())
            })
            .unwrap_or_else(|e| panic!("{e}; status: {}", a.status()["firewall"]));
        }
        started.elapsed()
    }

    /// What node `name`'s agent reports of its firewall.
    pub fn firewall(&self, name: &str) -> Firewall {
        Firewall::of(&self.agent(name).status())
    }

    /// What node `at`'s agent dropped of what node `from` sent it.
    ///
    /// # Panics
    /// When `at` has no peer `from`.
    pub fn drops(&self, at: &str, from: &str) -> PeerDrops {
        let key = self.key(from);
        let status = self.agent(at).status();
        PeerDrops::of(&status, &key)
            .unwrap_or_else(|| panic!("{at} has no peer {from}: {}", status["peers"]))
    }

    /// The names of the nodes that node `name`'s agent has as peers (`status`), sorted.
    pub fn peers_of(&self, name: &str) -> Vec<String> {
        self.names_of(&self.agent(name).peer_keys())
    }

    /// The names of the nodes that `wg show IFACE peers` lists on node `name`, sorted.
    pub fn wg_peers_of(&self, name: &str) -> Vec<String> {
        let a = self.agent(name);
        let keys: Vec<String> = a
            .ns()
            .run("wg", &["show", a.interface(), "peers"])
            .lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect();
        self.names_of(&keys)
    }

    fn names_of(&self, keys: &[String]) -> Vec<String> {
        let by_key: HashMap<String, &str> = self
            .agents
            .iter()
            .map(|a| (a.public_key(), a.name()))
            .collect();
        let mut names: Vec<String> = keys
            .iter()
            .map(|k| {
                by_key
                    .get(k)
                    .map_or_else(|| format!("unknown key {k}"), |n| (*n).to_owned())
            })
            .collect();
        names.sort();
        names
    }

    /// Waits until node `name` has exactly the peers `want` (names, any order).
    ///
    /// # Panics
    /// When it does not within [`STEP`].
    pub fn wait_peers(&self, name: &str, want: &[&str]) {
        let mut want: Vec<String> = want.iter().map(|s| (*s).to_owned()).collect();
        want.sort();
        let what = format!("{name} to have exactly the peers {want:?}");
        wait_until(STEP, &what, || (self.peers_of(name) == want).then_some(()))
            .unwrap_or_else(|e| panic!("{e}; it has {:?}", self.peers_of(name)));
    }

    /// Starts an [`EchoServer`] called `name` on node `node`.
    pub fn echo_server(&self, node: &str, tcp: &[u16], udp: &[u16]) -> EchoServer {
        EchoServer::start(&self.ns(node), &self.dir, node, tcp, udp)
    }
}

/// A join token for one node carrying `tags`.
fn token_with_tags(ctl: &Meshctl, tags: &[&str]) -> String {
    let mut args = vec![
        "token",
        "create",
        "--network",
        NETWORK,
        "--uses",
        "1",
        "--expires",
        "1h",
    ];
    for t in tags {
        args.extend_from_slice(&["--tag", t]);
    }
    let json = ctl.json(&args);
    json["token"]
        .as_str()
        .unwrap_or_else(|| panic!("token create printed no `.token`: {json}"))
        .to_owned()
}

fn version_of(reply: &Value) -> u64 {
    reply
        .pointer("/policy/version")
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no policy.version in {reply}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// `meshctl policy test`'s answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Whether the flow is allowed.
    pub allowed: bool,
    /// The line of the rule that allows it.
    pub line: Option<u32>,
}

/// The `firewall` object of `meshlink-agent status -o json`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Firewall {
    /// The policy version in force; `None`: no policy.
    pub policy_version: Option<u64>,
    /// New flows allowed, as `(rule line, flows)`.
    pub rules: Vec<(u32, u64)>,
    /// Packets addressed to no local destination.
    pub not_local: u64,
    /// Packets the policy denied (no rule, or their flow cut).
    pub denied: u64,
    /// Flows cut by a policy change.
    pub cut: u64,
    /// Whether the destination check is on (mesh mode).
    pub destination_check: bool,
    /// The local destinations, as CIDR text.
    pub local: Vec<String>,
}

impl Firewall {
    /// Reads it from a whole status answer.
    ///
    /// # Panics
    /// When the status has no `firewall` object.
    pub fn of(status: &Value) -> Firewall {
        let fw = status
            .get("firewall")
            .filter(|f| f.is_object())
            .unwrap_or_else(|| panic!("status has no firewall: {status}"));
        let n = |k: &str| fw[k].as_u64().unwrap_or_default();
        Firewall {
            policy_version: fw["policy_version"].as_u64(),
            rules: fw["rules"]
                .as_array()
                .map(|rules| {
                    rules
                        .iter()
                        .filter_map(|r| {
                            let line = u32::try_from(r["line"].as_u64()?).ok()?;
                            Some((line, r["flows"].as_u64()?))
                        })
                        .collect()
                })
                .unwrap_or_default(),
            not_local: n("not_local"),
            denied: n("denied"),
            cut: n("cut"),
            destination_check: fw["destination_check"].as_bool().unwrap_or_default(),
            local: strings(&fw["local"]),
        }
    }

    /// New flows the rule starting at `line` let in (0 when there is no such rule).
    pub fn flows(&self, line: u32) -> u64 {
        self.rules
            .iter()
            .find(|(l, _)| *l == line)
            .map_or(0, |(_, n)| *n)
    }
}

/// The firewall drops one agent counts against one peer (`peers[].drops` in `status`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerDrops {
    /// Packets addressed to none of this node's destinations.
    pub not_local: u64,
    /// Packets the policy denied.
    pub policy_denied: u64,
}

impl PeerDrops {
    /// The drops against the peer with public key `key` in a status answer; `None` when it is
    /// not a peer.
    pub fn of(status: &Value, key: &str) -> Option<PeerDrops> {
        let peer = status["peers"]
            .as_array()?
            .iter()
            .find(|p| p["public_key"] == key)?;
        let d = &peer["drops"];
        Some(PeerDrops {
            not_local: d["not_local"].as_u64().unwrap_or_default(),
            policy_denied: d["policy_denied"].as_u64().unwrap_or_default(),
        })
    }
}

/// The 1-based line of every `[[rule]]` header in a policy file, in order: the lines by which
/// verdicts and the agents' counters name rules.
pub fn rule_lines(policy: &str) -> Vec<u32> {
    policy
        .lines()
        .zip(1u32..)
        .filter(|(l, _)| l.trim() == "[[rule]]")
        .map(|(_, n)| n)
        .collect()
}

const ECHO_SERVER: &str = r#"
import socket, sys, threading, time
name = sys.argv[1].encode()
tcp = [int(p) for p in sys.argv[2].split(',') if p]
udp = [int(p) for p in sys.argv[3].split(',') if p]
push = float(sys.argv[4]) if len(sys.argv) > 4 else 0
lock = threading.Lock()
def say(text):
    with lock:
        print(text, flush=True)
def serve(c, peer):
    local = c.getsockname()
    say('accepted tcp %s:%d from %s:%d' % (local[0], local[1], peer[0], peer[1]))
    if push > 0:
        threading.Thread(target=pushing, args=(c,), daemon=True).start()
    try:
        for line in c.makefile('rb'):
            c.sendall(name + b' ' + line)
    except OSError:
        pass
    c.close()
def pushing(c):
    try:
        while True:
            time.sleep(push)
            c.sendall(name + b' push\n')
    except OSError:
        pass
def accept(s):
    while True:
        c, peer = s.accept()
        threading.Thread(target=serve, args=(c, peer), daemon=True).start()
def answer(s):
    while True:
        data, peer = s.recvfrom(2048)
        say('received udp from %s:%d' % peer)
        s.sendto(name + b' ' + data, peer)
threads = []
for port in tcp:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(('0.0.0.0', port))
    s.listen(64)
    threads.append(threading.Thread(target=accept, args=(s,), daemon=True))
for port in udp:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(('0.0.0.0', port))
    threads.append(threading.Thread(target=answer, args=(s,), daemon=True))
for t in threads:
    t.start()
say('ready')
for t in threads:
    t.join()
"#;

/// TCP and UDP echo servers on fixed ports of every address of a namespace, answering with
/// their name in front; every connection accepted and datagram received is printed.
#[derive(Debug)]
pub struct EchoServer {
    process: Process,
    seen: Vec<String>,
}

impl EchoServer {
    /// Starts it in `ns`, called `name`, and waits until it listens.
    ///
    /// # Panics
    /// When `python3` cannot start or the server is not ready within 10 s.
    pub fn start(ns: &NsRef, dir: &ScratchDir, name: &str, tcp: &[u16], udp: &[u16]) -> Self {
        EchoServer::start_pushing(ns, dir, name, tcp, udp, None)
    }

    /// Like [`EchoServer::start`]; with `push`, it also sends a line of its own (`NAME push`)
    /// down every TCP connection at that interval, as a server that streams updates does.
    ///
    /// # Panics
    /// As [`EchoServer::start`].
    pub fn start_pushing(
        ns: &NsRef,
        dir: &ScratchDir,
        name: &str,
        tcp: &[u16],
        udp: &[u16],
        push: Option<Duration>,
    ) -> Self {
        let list = |ports: &[u16]| {
            ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut cmd = ns.daemon_command("python3");
        let push = push.map_or(0.0, |p| p.as_secs_f64()).to_string();
        cmd.args(["-c", ECHO_SERVER, name, &list(tcp), &list(udp), &push]);
        let log = dir.join(&format!("echo-{name}-{}.log", unique_name("e")));
        let process = Process::spawn(&format!("echo server {name}"), cmd, &log, Stdout::Lines);
        process
            .wait_for_line("ready", Duration::from_secs(10))
            .unwrap_or_else(|| panic!("echo server {name} did not start:\n{}", process.log()));
        EchoServer {
            process,
            seen: Vec::new(),
        }
    }

    /// Every line it has printed since it was ready (connections accepted, datagrams
    /// received), waiting up to `settle` for more.
    pub fn seen(&mut self, settle: Duration) -> &[String] {
        let deadline = Instant::now() + settle;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.process.next_line(left) {
                Some(line) => self.seen.push(line),
                None => return &self.seen,
            }
        }
    }
}

const TCP_EXCHANGE: &str = r#"
import socket, sys
host, port, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
try:
    c = socket.create_connection((host, port), timeout=wait)
    c.sendall(b'hello\n')
    line = c.makefile('rb').readline()
    print('answer ' + line.decode().strip() if line else 'closed')
except socket.timeout:
    print('timeout')
except OSError as e:
    print('error %s' % e)
"#;

/// One TCP connection from `ns` to `to:port`: connects, sends a line and reads the answer,
/// within `wait` for each step. Returns the name of the [`EchoServer`] that answered, `None`
/// when nothing answered (the connection or the answer timed out, or was refused).
///
/// # Panics
/// When `python3` cannot run.
pub fn tcp_exchange(ns: &NsRef, to: Ipv4Addr, port: u16, wait: Duration) -> Option<String> {
    let out = ns.run(
        "python3",
        &[
            "-c",
            TCP_EXCHANGE,
            &to.to_string(),
            &port.to_string(),
            &wait.as_secs_f64().to_string(),
        ],
    );
    let line = out.trim();
    let answer = line.strip_prefix("answer ")?;
    let (server, echoed) = answer.split_once(' ')?;
    assert_eq!(echoed, "hello", "the echo server answered {line:?}");
    Some(server.to_owned())
}

/// Like [`tcp_exchange`], trying again until an answer comes or `timeout` passes (the first
/// packets of a fresh tunnel may wait for its handshake): the server that answered.
///
/// # Panics
/// When nothing answers within `timeout`.
pub fn tcp_answer(ns: &NsRef, to: Ipv4Addr, port: u16, timeout: Duration) -> String {
    let what = format!("an answer from {to}:{port} (tcp) in {}", ns.name());
    wait_until(timeout, &what, || {
        tcp_exchange(ns, to, port, Duration::from_secs(2))
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

const UDP_EXCHANGE: &str = r#"
import socket, sys
host, port, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((host, port))
s.settimeout(wait)
try:
    s.send(b'hello\n')
    print('answer ' + s.recv(2048).decode().strip())
except socket.timeout:
    print('timeout')
except ConnectionRefusedError:
    print('refused')
except OSError as e:
    print('error %s' % e)
"#;

/// What one UDP datagram drew.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UdpOutcome {
    /// The [`EchoServer`] of this name answered.
    Answer(String),
    /// An ICMP port unreachable came back (nothing listens there).
    Refused,
    /// Nothing came back within the wait.
    Timeout,
}

/// Sends one UDP datagram from `ns` to `to:port` on a connected socket and waits up to `wait`
/// for what comes back.
///
/// # Panics
/// When `python3` cannot run or prints something unexpected.
pub fn udp_exchange(ns: &NsRef, to: Ipv4Addr, port: u16, wait: Duration) -> UdpOutcome {
    let out = ns.run(
        "python3",
        &[
            "-c",
            UDP_EXCHANGE,
            &to.to_string(),
            &port.to_string(),
            &wait.as_secs_f64().to_string(),
        ],
    );
    match out.trim() {
        "timeout" => UdpOutcome::Timeout,
        "refused" => UdpOutcome::Refused,
        line => {
            let answer = line
                .strip_prefix("answer ")
                .unwrap_or_else(|| panic!("the UDP exchange printed {line:?}"));
            let (server, echoed) = answer
                .split_once(' ')
                .unwrap_or_else(|| panic!("the UDP exchange printed {line:?}"));
            assert_eq!(echoed, "hello", "the echo server answered {line:?}");
            UdpOutcome::Answer(server.to_owned())
        }
    }
}

const UDP_SEND: &str = r#"
import socket, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(count):
    try:
        s.sendto(b'probe %d\n' % i, (host, port))
    except OSError:
        pass
"#;

/// Sends `count` UDP datagrams from `ns` to `to:port`, without waiting for answers.
///
/// # Panics
/// When `python3` cannot run.
pub fn udp_send(ns: &NsRef, to: Ipv4Addr, port: u16, count: u32) {
    ns.run(
        "python3",
        &[
            "-c",
            UDP_SEND,
            &to.to_string(),
            &port.to_string(),
            &count.to_string(),
        ],
    );
}

const STREAM: &str = r#"
import socket, sys, threading, time
host, port = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 15
while True:
    try:
        c = socket.create_connection((host, port), timeout=2)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
c.settimeout(None)
local = c.getsockname()
print('connected from %s:%d' % local, flush=True)
def read():
    for line in c.makefile('rb'):
        print('echo ' + line.decode().split()[-1], flush=True)
    print('closed', flush=True)
threading.Thread(target=read, daemon=True).start()
n = 0
while True:
    n += 1
    c.sendall(b'%d\n' % n)
    time.sleep(0.1)
"#;

/// One long-lived TCP connection to an [`EchoServer`]: a numbered line every 100 ms, each
/// echo printed. A running flow, to be cut and restored.
#[derive(Debug)]
pub struct Stream {
    process: Process,
    echoes: u64,
}

impl Stream {
    /// Connects from `ns` to `to:port` (trying for up to 15 s) and waits for the first echo.
    ///
    /// # Panics
    /// When `python3` cannot start, or no echo comes within [`STEP`].
    pub fn start(ns: &NsRef, dir: &ScratchDir, to: Ipv4Addr, port: u16) -> Stream {
        let mut cmd = ns.daemon_command("python3");
        cmd.args(["-c", STREAM, &to.to_string(), &port.to_string()]);
        let log = dir.join(&format!("stream-{}.log", unique_name("s")));
        let process = Process::spawn(
            &format!("tcp stream to {to}:{port}"),
            cmd,
            &log,
            Stdout::Lines,
        );
        let mut stream = Stream { process, echoes: 0 };
        assert!(
            stream.wait_echoes(1, STEP),
            "the stream to {to}:{port} got no echo; log:\n{}",
            stream.process.log()
        );
        stream
    }

    /// Echoes received so far.
    pub fn echoes(&self) -> u64 {
        self.echoes
    }

    /// Whether `n` more echoes come within `timeout`.
    pub fn wait_echoes(&mut self, n: u64, timeout: Duration) -> bool {
        let target = self.echoes + n;
        let deadline = Instant::now() + timeout;
        while self.echoes < target {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.process.next_line(left) {
                Some(line) if line.starts_with("echo ") => self.echoes += 1,
                Some(_) => {}
                None => return false,
            }
        }
        true
    }

    /// Reads what arrives for `period` and returns how many echoes it was.
    pub fn count_for(&mut self, period: Duration) -> u64 {
        let before = self.echoes;
        let deadline = Instant::now() + period;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return self.echoes - before;
            }
            match self.process.next_line(left) {
                Some(line) if line.starts_with("echo ") => self.echoes += 1,
                Some(_) => {}
                None => return self.echoes - before,
            }
        }
    }

    /// The stream's log so far.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Its process (to check it still runs: the connection was never closed).
    pub fn process(&mut self) -> &mut Process {
        &mut self.process
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_rule_lines() {
        let text = "# a comment\n[[rule]]\nfrom = [\"*\"]\n\n  [[rule]]  \n[[test]]\n";
        assert_eq!(rule_lines(text), vec![2, 5]);
    }

    #[test]
    fn reads_the_firewall_and_peer_drops_from_status() {
        let status: Value = serde_json::from_str(
            r#"{"peers": [{"public_key": "k1", "drops": {"not_local": 2, "policy_denied": 5}}],
                "firewall": {"destination_check": true, "local": ["100.64.0.2/32"],
                  "policy_version": 3, "rules": [{"line": 4, "flows": 7}],
                  "not_local": 2, "denied": 5, "cut": 1, "flows": null}}"#,
        )
        .unwrap();
        let fw = Firewall::of(&status);
        assert_eq!(fw.policy_version, Some(3));
        assert_eq!((fw.flows(4), fw.flows(9)), (7, 0));
        assert_eq!((fw.not_local, fw.denied, fw.cut), (2, 5, 1));
        assert_eq!(fw.local, vec!["100.64.0.2/32".to_owned()]);
        let d = PeerDrops::of(&status, "k1").unwrap();
        assert_eq!((d.not_local, d.policy_denied), (2, 5));
        assert!(PeerDrops::of(&status, "k2").is_none());
    }
}
