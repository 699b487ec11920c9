//! One round of each measurement, on a fresh [`NatMesh`]: two agents, `vm-a1` behind router
//! A and `vm-b1` behind router B, both masquerading, started at the same moment.
//!
//! - [`path_round`]: with the routers set up for a [`PathCase`], the time from agent start to
//!   both agents reporting an overlay address and to the first ping answered both ways; then,
//!   once `status` shows the expected path both ways, ping idle and a single-stream TCP flow
//!   a1 -> b1 with ping alongside.
//! - [`upgrade_round`]: UDP blocked except to the coordinator (relayed over UDP, pings
//!   answered both ways), a ping a1 -> b1 every 10 ms, then the block lifted: the time from the lift to `status` showing
//!   `direct` both ways, and the longest silence of the ping around the switch.
//!
//! Every wait is bounded; a round that cannot be measured returns an error saying why, with
//! the agents' status.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde::Serialize;
use serde_json::Value;

use meshlink_tests::mesh::address_of;
use meshlink_tests::nat::{NatMesh, NatMode, PeerPath};
use meshlink_tests::{MeshAgent, Provider};

use crate::iperf::{self, Throughput};
use crate::ping::{self, PingStats};

/// The two agents and where they run.
const NODES: [(&str, Provider); 2] = [(A, Provider::A), (B, Provider::B)];
/// The agent behind router A: the ping and iperf3 client side.
pub const A: &str = "vm-a1";
/// The agent behind router B: the iperf3 server side.
pub const B: &str = "vm-b1";

/// Bound on both agents reporting an overlay address.
const JOIN: Duration = Duration::from_secs(20);
/// Bound on the first ping answered, from when both have an address.
const FIRST_PING: Duration = Duration::from_secs(20);
/// Bound on `status` showing the expected path both ways, from the first ping.
const SETTLE: Duration = Duration::from_secs(10);
/// Bound on the path turning direct after the block is lifted.
const UPGRADE: Duration = Duration::from_secs(20);
/// How often `status` is asked while timing a path change.
const POLL: Duration = Duration::from_millis(20);
/// Pings of the idle run (10 ms apart).
const IDLE_PINGS: u32 = 200;

/// The way between the two agents that a round sets up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PathCase {
    /// Both routers masquerade, nothing blocked: a direct path.
    Direct,
    /// UDP out of both LANs only to the coordinator: relayed by it over QUIC (UDP).
    RelayUdp,
    /// No UDP out of either LAN at all: control and relay over TLS/TCP.
    RelayTcp,
}

impl PathCase {
    /// Every case, in the order of the report.
    pub const ALL: [PathCase; 3] = [PathCase::Direct, PathCase::RelayUdp, PathCase::RelayTcp];

    /// The name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            PathCase::Direct => "direct",
            PathCase::RelayUdp => "relay-udp",
            PathCase::RelayTcp => "relay-tcp",
        }
    }

    /// What the report calls it.
    pub fn label(self) -> &'static str {
        match self {
            PathCase::Direct => "direct (two masquerading routers)",
            PathCase::RelayUdp => "relayed over UDP (UDP only to the coordinator)",
            PathCase::RelayTcp => "relayed over TCP (no UDP at all)",
        }
    }

    /// Sets up both routers for this case.
    fn block(self, mesh: &NatMesh) {
        for provider in [Provider::A, Provider::B] {
            match self {
                PathCase::Direct => {}
                PathCase::RelayUdp => mesh.bed().block_udp_except_coordinator(provider),
                PathCase::RelayTcp => mesh.bed().block_all_udp(provider),
            }
        }
    }

    /// Whether `path` (towards agent `to`) is the path this case should give.
    fn expects(self, mesh: &NatMesh, to: &str, path: &PeerPath) -> bool {
        match self {
            PathCase::Direct => {
                path.is("direct")
                    && path.endpoint_ip() == Some(IpAddr::V4(mesh.public_address_of(to)))
            }
            PathCase::RelayUdp => path.is_relayed_over("udp"),
            PathCase::RelayTcp => path.is_relayed_over("tcp"),
        }
    }

    /// The expected path, for messages.
    fn expected(self) -> &'static str {
        match self {
            PathCase::Direct => "direct, to the other router's public address",
            PathCase::RelayUdp => "relay with path.over udp",
            PathCase::RelayTcp => "relay with path.over tcp",
        }
    }
}

/// One round of a [`PathCase`].
#[derive(Debug, Clone, Serialize)]
pub struct PathSample {
    /// Agent start to both agents reporting an overlay address, seconds.
    pub joined_s: f64,
    /// Agent start to the first ping answered a1 -> b1 and b1 -> a1, seconds.
    pub first_ping_each_s: [f64; 2],
    /// The later of the two: the pair reaches each other both ways.
    pub first_ping_s: f64,
    /// The path each side's status showed right after the first ping (`a1->b1`, `b1->a1`).
    pub path_at_first_ping: [String; 2],
    /// Agent start to the expected path shown both ways, seconds.
    pub settled_s: f64,
    /// The path's RTT as a1's status measured it, if it says.
    pub status_rtt_ms: Option<f64>,
    /// `ping -c 200 -i 0.01` a1 -> b1 on the idle tunnel.
    pub ping_idle: PingStats,
    /// The TCP flow a1 -> b1.
    pub tcp: Throughput,
    /// Ping a1 -> b1 every 10 ms while the TCP flow runs.
    pub ping_load: PingStats,
    /// What the coordinator's relay counted during the flow (`meshctl status`), when it
    /// relays: frames passed and dropped by reason.
    pub relay_during_flow: Option<RelayDelta>,
}

/// The change of the relay's counters (`relay` in `meshctl status -o json`) over a span.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RelayDelta {
    /// Frames relayed.
    pub frames: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Frames dropped, by reason; reasons with none are left out.
    pub dropped: BTreeMap<String, u64>,
}

impl RelayDelta {
    /// The relay's counters in a `meshctl status -o json` answer: `(frames, bytes, dropped)`.
    fn counters(status: &Value) -> Option<(u64, u64, BTreeMap<String, u64>)> {
        let relay = status.get("relay")?;
        let dropped = relay
            .get("dropped")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
                    .collect()
            })
            .unwrap_or_default();
        Some((relay["frames"].as_u64()?, relay["bytes"].as_u64()?, dropped))
    }

    /// From `before` to `after`; `None` when either has no relay counters.
    fn between(before: &Value, after: &Value) -> Option<RelayDelta> {
        let (f0, b0, d0) = RelayDelta::counters(before)?;
        let (f1, b1, d1) = RelayDelta::counters(after)?;
        let dropped = d1
            .into_iter()
            .map(|(k, v)| {
                let was = d0.get(&k).copied().unwrap_or(0);
                (k, v.saturating_sub(was))
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        Some(RelayDelta {
            frames: f1.saturating_sub(f0),
            bytes: b1.saturating_sub(b0),
            dropped,
        })
    }
}

/// `meshctl status -o json` of the mesh's coordinator; `Null` when it does not answer.
fn coordinator_status(mesh: &NatMesh) -> Value {
    let out = mesh.coordinator().meshctl().exec(&["status", "-o", "json"]);
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// One round of the relay-to-direct upgrade.
#[derive(Debug, Clone, Serialize)]
pub struct UpgradeSample {
    /// Agent start to pings answered both ways and `relay` over UDP shown both ways, seconds.
    pub relayed_s: f64,
    /// Lift to `direct` shown by a1 (towards b1) and by b1 (towards a1), seconds.
    pub direct_each_s: [f64; 2],
    /// The later of the two.
    pub direct_s: f64,
    /// The longest time between two ping replies from the lift to the end of the run, ms.
    pub longest_gap_ms: f64,
    /// The same over the second before the lift (the relayed path's own jitter), ms.
    pub gap_before_ms: f64,
    /// Pings after the lift that got no reply.
    pub lost: u32,
    /// Pings after the lift that did.
    pub answered: u32,
}

/// Both agents' public keys, asked once (each `status` call starts a process).
struct Keys {
    a: String,
    b: String,
}

impl Keys {
    fn of(mesh: &NatMesh) -> Keys {
        Keys {
            a: mesh.agent(A).public_key(),
            b: mesh.agent(B).public_key(),
        }
    }

    /// The paths a1 -> b1 and b1 -> a1 as the two agents' status shows them now.
    fn paths(&self, mesh: &NatMesh) -> [PeerPath; 2] {
        let path = |from: &MeshAgent, key: &str| {
            from.try_status()
                .map_or_else(PeerPath::default, |s| PeerPath::of(&s, key))
        };
        [path(mesh.agent(A), &self.b), path(mesh.agent(B), &self.a)]
    }
}

/// A fresh mesh set up for `case`, with the two agents started.
struct Round {
    mesh: NatMesh,
    /// When the first agent was started.
    started: Instant,
    /// The same, in Unix seconds (the clock of `ping -D`).
    started_unix: f64,
}

impl Round {
    fn start(tag: &str, case: PathCase) -> Round {
        let mut mesh = NatMesh::new(tag, &[NatMode::Masquerade, NatMode::Masquerade]);
        case.block(&mesh);
        let started = mesh.spawn(&NODES);
        let started_unix = ping::unix_now() - started.elapsed().as_secs_f64();
        Round {
            mesh,
            started,
            started_unix,
        }
    }

    /// Seconds since the first agent was started.
    fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Copies every log of the round (agents, coordinator, iperf3, ping) into `dir`.
    fn keep_logs(&self, dir: &Path) {
        let copied = std::fs::create_dir_all(dir).and_then(|()| {
            for entry in std::fs::read_dir(self.mesh.dir().path())? {
                let path = entry?.path();
                if path.extension().is_some_and(|e| e == "log") {
                    if let Some(name) = path.file_name() {
                        std::fs::copy(&path, dir.join(name))?;
                    }
                }
            }
            Ok(())
        });
        if let Err(e) = copied {
            eprintln!(
                "natbench: could not keep the logs in {}: {e}",
                dir.display()
            );
        }
    }

    /// Waits until both agents report an overlay address; returns them (a1's, b1's).
    fn addresses(&self) -> Result<[Ipv4Addr; 2], String> {
        let mesh = &self.mesh;
        let deadline = Instant::now() + JOIN;
        loop {
            let a = mesh.agent(A).try_status().and_then(|s| address_of(&s));
            let b = mesh.agent(B).try_status().and_then(|s| address_of(&s));
            if let (Some(a), Some(b)) = (a, b) {
                return Ok([a, b]);
            }
            if Instant::now() >= deadline {
                let logs: String = [A, B]
                    .iter()
                    .map(|n| {
                        let log = mesh.agent(n).log();
                        let lines: Vec<&str> = log.lines().collect();
                        let tail = lines[lines.len().saturating_sub(8)..].join("\n");
                        format!("---- last lines of {n}'s log ----\n{tail}\n")
                    })
                    .collect();
                return Err(format!(
                    "the agents did not both join within {JOIN:?} (address of {A}: {a:?}, {B}: \
                     {b:?})\n{logs}"
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Pings both ways at once until each is answered; returns when (seconds since the
    /// start), a1 -> b1 and b1 -> a1.
    fn first_pings(
        &self,
        [addr_a, addr_b]: [Ipv4Addr; 2],
        keys: &Keys,
    ) -> Result<[f64; 2], String> {
        let mesh = &self.mesh;
        let (ns_a, ns_b) = (mesh.agent(A).ns(), mesh.agent(B).ns());
        let (ab, ba) = std::thread::scope(|s| {
            let ab = s.spawn(|| ping::first_reply(ns_a, addr_b, FIRST_PING));
            let ba = s.spawn(|| ping::first_reply(ns_b, addr_a, FIRST_PING));
            (
                ab.join().expect("ping thread"),
                ba.join().expect("ping thread"),
            )
        });
        let first = |r: Result<f64, String>, dir: &str| {
            r.map(|at| at - self.started_unix).map_err(|e| {
                format!(
                    "{dir}: {e}\npaths: {:?}\n{}",
                    keys.paths(mesh),
                    mesh.statuses()
                )
            })
        };
        Ok([first(ab, "a1 -> b1")?, first(ba, "b1 -> a1")?])
    }

    /// Waits until both agents show the path `case` should give.
    fn settle(&self, case: PathCase, timeout: Duration) -> Result<Duration, String> {
        self.mesh.settle_paths(
            &[A, B],
            timeout,
            &format!("{} both ways", case.expected()),
            |_, to, path| case.expects(&self.mesh, to, path),
        )
    }
}

/// One round of `case`; `seconds` is the TCP flow's length (at least 3). With `keep`, the
/// round's logs are copied into `keep/CASE-ROUND/`.
///
/// # Errors
/// What could not be measured, and why.
pub fn path_round(
    case: PathCase,
    seconds: u32,
    round: usize,
    keep: Option<&Path>,
) -> Result<PathSample, String> {
    let tag = format!("{}-{round}", case.name());
    let r = Round::start(&format!("natbench-{tag}"), case);
    let sample = measure_path(&r, case, seconds);
    if let Some(dir) = keep {
        r.keep_logs(&dir.join(tag));
    }
    sample
}

fn measure_path(r: &Round, case: PathCase, seconds: u32) -> Result<PathSample, String> {
    let mesh = &r.mesh;
    let [addr_a, addr_b] = r.addresses()?;
    let joined_s = r.elapsed();
    let keys = Keys::of(mesh);
    let first_ping_each_s = r.first_pings([addr_a, addr_b], &keys)?;
    let path_at_first_ping = keys.paths(mesh).map(|p| p.describe());
    r.settle(case, SETTLE)?;
    let settled_s = r.elapsed();
    let status_rtt_ms = keys.paths(mesh)[0].rtt_ms;

    let (ns_a, ns_b) = (mesh.agent(A).ns(), mesh.agent(B).ns());
    let ping_idle = ping::burst(ns_a, addr_b, IDLE_PINGS).map_err(|e| format!("idle ping: {e}"))?;
    let _server = iperf::server(ns_b, addr_b, &mesh.dir().join("iperf3-server.log"))?;
    // The flow runs 1 + `seconds` s (`-O 1`); the pings start 1.5 s in and end about 1 s
    // before it does.
    let load_pings = (seconds.saturating_sub(3) * 100).max(100);
    let relay_before = coordinator_status(mesh);
    let (tcp, ping_load) = std::thread::scope(|s| {
        let flow = s.spawn(|| iperf::client(ns_a, addr_b, seconds));
        std::thread::sleep(Duration::from_millis(1500));
        let ping_load = ping::burst(ns_a, addr_b, load_pings);
        (flow.join().expect("iperf3 thread"), ping_load)
    });
    let relay_during_flow = RelayDelta::between(&relay_before, &coordinator_status(mesh));
    let tcp = tcp.map_err(|e| format!("TCP flow: {e}"))?;
    let ping_load = ping_load.map_err(|e| format!("ping under load: {e}"))?;

    Ok(PathSample {
        joined_s,
        first_ping_s: first_ping_each_s[0].max(first_ping_each_s[1]),
        first_ping_each_s,
        path_at_first_ping,
        settled_s,
        status_rtt_ms,
        ping_idle,
        tcp,
        ping_load,
        relay_during_flow,
    })
}

/// One round of the relay-to-direct upgrade. With `keep`, the round's logs are copied into
/// `keep/upgrade-ROUND/`.
///
/// # Errors
/// What could not be measured, and why.
pub fn upgrade_round(round: usize, keep: Option<&Path>) -> Result<UpgradeSample, String> {
    let r = Round::start(&format!("natbench-upgrade-{round}"), PathCase::RelayUdp);
    let sample = measure_upgrade(&r);
    if let Some(dir) = keep {
        r.keep_logs(&dir.join(format!("upgrade-{round}")));
    }
    sample
}

fn measure_upgrade(r: &Round) -> Result<UpgradeSample, String> {
    let mesh = &r.mesh;
    let [addr_a, addr_b] = r.addresses()?;
    let keys = Keys::of(mesh);
    // Relayed, and answering: status can show the relay before WireGuard has a session.
    let first = r.first_pings([addr_a, addr_b], &keys)?;
    r.settle(PathCase::RelayUdp, SETTLE)?;
    let relayed_s = first[0].max(first[1]).max(r.elapsed());

    let mut pinger = mesh.agent(A).ns().spawn(
        "ping",
        &["-n", "-D", "-i", "0.01", &addr_b.to_string()],
        &mesh.dir().join("ping-upgrade.log"),
    );
    std::thread::sleep(Duration::from_secs(2));
    let lift_unix = ping::unix_now();
    let lifted = Instant::now();
    mesh.bed().unblock(Provider::A);
    mesh.bed().unblock(Provider::B);

    let mut direct: [Option<f64>; 2] = [None, None];
    while direct.iter().any(Option::is_none) && lifted.elapsed() < UPGRADE {
        let paths = keys.paths(mesh);
        for (seen, (path, to)) in direct.iter_mut().zip(paths.iter().zip([B, A])) {
            if seen.is_none() && PathCase::Direct.expects(mesh, to, path) {
                *seen = Some(lifted.elapsed().as_secs_f64());
            }
        }
        std::thread::sleep(POLL);
    }
    // Let the ping run on past the switch before reading it.
    std::thread::sleep(Duration::from_secs(2));
    let end_unix = ping::unix_now();
    pinger.signal(Signal::SIGINT);
    pinger.wait_timeout(Duration::from_secs(5));
    let [Some(a), Some(b)] = direct else {
        return Err(format!(
            "not direct both ways within {UPGRADE:?} of the lift (seen: a1 -> b1 {:?}, b1 -> \
             a1 {:?}); paths: {:?}\n{}",
            direct[0],
            direct[1],
            keys.paths(mesh),
            mesh.statuses()
        ));
    };
    let log = pinger.log();
    let replies = ping::replies(&log);
    let ping_tail = || pinger.log_tail(5);
    let (longest_gap_ms, lost) =
        ping::longest_gap(&replies, lift_unix, end_unix).ok_or_else(|| {
            format!(
                "fewer than two ping replies after the lift: {}",
                ping_tail()
            )
        })?;
    let (gap_before_ms, _) =
        ping::longest_gap(&replies, lift_unix - 1.0, lift_unix).ok_or_else(|| {
            format!(
                "fewer than two ping replies in the second before the lift: {}",
                ping_tail()
            )
        })?;
    let answered = replies
        .iter()
        .filter(|r| r.at.is_some_and(|at| at >= lift_unix))
        .count();
    Ok(UpgradeSample {
        relayed_s,
        direct_each_s: [a, b],
        direct_s: a.max(b),
        longest_gap_ms,
        gap_before_ms,
        lost,
        answered: u32::try_from(answered).unwrap_or(u32::MAX),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_counters_change_over_a_span() {
        let before = serde_json::json!({"relay": {"frames": 10, "bytes": 1000,
            "dropped": {"rate_limited": 1, "congested": 0, "no_route": 2}}});
        let after = serde_json::json!({"relay": {"frames": 110, "bytes": 151_000,
            "dropped": {"rate_limited": 51, "congested": 3, "no_route": 2}}});
        let d = RelayDelta::between(&before, &after).unwrap();
        assert_eq!((d.frames, d.bytes), (100, 150_000));
        assert_eq!(
            d.dropped.into_iter().collect::<Vec<_>>(),
            vec![("congested".to_owned(), 3), ("rate_limited".to_owned(), 50)]
        );
        assert_eq!(
            RelayDelta::between(&before, &serde_json::json!({"relay": null})),
            None
        );
        assert_eq!(RelayDelta::between(&Value::Null, &after), None);
    }
}
