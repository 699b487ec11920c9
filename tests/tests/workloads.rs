//! Workload addresses end to end with real binaries: a chat server on a workload address moves
//! between VMs on three simulated providers, and clients on other VMs follow it.
//!
//! Topology (`meshlink_tests::Providers`, three providers A, B, C): the coordinator and vm-a1 on
//! A, vm-b1 and vm-b2 on B, vm-c1 on C. The workload `chat` (100.64.50.10) may be held by vm-a1
//! and vm-c1 (vm-c1 is also its standby). The chat server is `meshlink-chat` (examples/chat).
//!
//! - `chat_moves_across_providers_and_clients_follow`: the server runs on vm-a1, alice (vm-b1)
//!   and bob (vm-b2) talk through it; the server stops, vm-c1 claims the workload through its
//!   own agent (`meshctl workload claim`, no admin token), the server starts on vm-c1, the
//!   clients reconnect to the same address and talk again.
//! - `holder_killed_the_standby_takes_over`: a hot standby server waits on vm-c1 (bound ahead
//!   of time with `ip_nonlocal_bind`); vm-a1's agent is killed; the coordinator moves the
//!   address to vm-c1 by itself and the clients carry on. vm-a1's agent restarted later does
//!   not take the address back.
//! - `cut_off_holder_stops_answering_when_its_lease_ends`: vm-a1 loses its route to the
//!   coordinator; within its lease it drops the address on its own, and the standby takes over.
//! - `coordinator_restart_silences_no_workload_address`: the coordinator is SIGKILLed and
//!   started again half a second later while vm-b1 pings the workload address every 10 ms:
//!   vm-a1 learns of the restart from the stateless reset its next heartbeat draws, reconnects
//!   and renews its lease before it runs out, so no ping is lost and nothing moves.
//! - `orderly_coordinator_restart_shorter_than_a_lease_silences_nothing`: the coordinator is
//!   stopped with SIGTERM (an upgrade) and started again 1.3 s later, longer than a crashed
//!   coordinator's holders could ride out: its stop lease carries vm-a1 through, every ping is
//!   answered and nothing moves.
//! - `planned_moves_under_traffic_lose_nothing`: `meshctl workload move` four times between
//!   vm-a1 and vm-c1 while vm-b1 pings the address every 10 ms: every ping is answered, but
//!   for the single packet a move occasionally loses at the switch (issue 14, tolerated: at
//!   most one per move).
//! - `moves_to_unlisted_and_just_joined_nodes_lose_nothing`: while vm-b1 pings the address
//!   every millisecond, it moves to vm-b2 (in the mesh from the start, listed neither as
//!   standby nor as allowed; it warms up the holder and vm-b1 only, the talkers vm-a1
//!   reported), then to vm-c2, a node that joins under the traffic and gets the address the
//!   moment it is up (no session with anyone yet), then back to vm-a1: not one ping is lost.
//! - `moves_onto_the_pinging_node_lose_nothing`: vm-b1 pings the address every millisecond
//!   while it moves to vm-b1 itself and back, twice: what vm-b1's own host sends between the
//!   preparation and the confirmation is kept back and answered once vm-b1 may answer, not
//!   lost (it was: no route at vm-b1, or dropped by vm-a1 after it let go).
//!
//! Needs root (skips with one line otherwise) and the binaries: `cargo build -p meshlink-agent
//! -p meshlink-coordinator -p meshctl -p meshlink-chat` first.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use meshlink_tests::ping::{ping_run, ping_run_1ms, ping_summary};
use meshlink_tests::process::Process;
use meshlink_tests::{
    agent_bin, chat_bin, coordinator_bin, meshctl_bin, require_root, wait_until, Coordinator,
    MeshAgent, Meshctl, NsRef, Provider, ProviderHost, Providers, ScratchDir,
};

const NETWORK: &str = "prod";
const NETWORK_CIDR: &str = "100.64.0.0/16";
const WORKLOAD: &str = "chat";
const WORKLOAD_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 50, 10);
const CHAT: &str = "100.64.50.10:7070";
/// Bound on a client (re)connecting, a message getting through, an address appearing.
const STEP: Duration = Duration::from_secs(15);

fn timing(what: &str, took: Duration) {
    eprintln!("workloads: {what}: {took:.2?}");
}

/// The bed of every test here: providers, coordinator, four agents, the workload created.
struct Bed {
    // Field order is drop order: processes before the namespaces they run in, and the
    // scratch directory last.
    agents: Vec<MeshAgent>,
    coord: Coordinator,
    hosts: Vec<ProviderHost>,
    providers: Providers,
    dir: ScratchDir,
}

impl Bed {
    fn new(name: &str) -> Bed {
        agent_bin();
        coordinator_bin();
        meshctl_bin();
        chat_bin();
        let dir = ScratchDir::create(name);
        let mut providers = Providers::create(3);
        let coord_host = providers.add_host(Provider::A);
        let hosts = [
            (providers.add_host(Provider::A), "vm-a1", "aws"),
            (providers.add_host(Provider::B), "vm-b1", "gcp"),
            (providers.add_host(Provider::B), "vm-b2", "gcp"),
            (providers.add_host(Provider::C), "vm-c1", "azure"),
        ];
        let coord = Coordinator::start(&coord_host.ns, &dir, coord_host.underlay);
        let ctl = coord.meshctl();
        ctl.network_create(NETWORK, NETWORK_CIDR);
        let token = ctl.token_create(NETWORK, Some(4), Some("1h"));
        let mut agents: Vec<MeshAgent> = hosts
            .iter()
            .map(|(h, name, provider)| {
                MeshAgent::spawn_join(&h.ns, &dir, &token, name, &[("provider", provider)])
            })
            .collect();
        let mut kept: Vec<ProviderHost> = hosts.into_iter().map(|(h, _, _)| h).collect();
        kept.push(coord_host);
        for a in &mut agents {
            a.wait_ready(meshlink_tests::mesh::READY_TIMEOUT);
        }
        ctl.run(&[
            "workload",
            "create",
            WORKLOAD,
            "--network",
            NETWORK,
            "--address",
            "100.64.50.10",
            "--standby",
            "vm-c1",
            "--allow",
            "vm-a1,vm-c1",
        ]);
        Bed {
            agents,
            coord,
            hosts: kept,
            providers,
            dir,
        }
    }

    /// Root and TUN checked (`None`: skipped), the bed made, and the workload attached to
    /// vm-a1, its address up there.
    fn held_by_vm_a1(name: &str) -> Option<Bed> {
        if !require_root() {
            return None;
        }
        let bed = Bed::new(name);
        bed.ctl()
            .run(&["workload", "attach", WORKLOAD, "--node", "vm-a1"]);
        bed.wait_address("vm-a1", true, STEP);
        Some(bed)
    }

    fn ctl(&self) -> Meshctl {
        self.coord.meshctl()
    }

    /// A new host on `provider` whose agent joins as `name` (with a token of its own); returns
    /// once the agent is up, with an address and a map.
    fn join(&mut self, provider: Provider, name: &str) {
        let host = self.providers.add_host(provider);
        let token = self.ctl().token_create(NETWORK, Some(1), Some("1h"));
        let mut agent = MeshAgent::spawn_join(&host.ns, &self.dir, &token, name, &[]);
        agent.wait_ready(meshlink_tests::mesh::READY_TIMEOUT);
        self.agents.push(agent);
        self.hosts.push(host);
    }

    fn agent(&self, name: &str) -> &MeshAgent {
        self.agents
            .iter()
            .find(|a| a.name() == name)
            .unwrap_or_else(|| panic!("no agent {name}"))
    }

    fn agent_mut(&mut self, name: &str) -> &mut MeshAgent {
        self.agents
            .iter_mut()
            .find(|a| a.name() == name)
            .unwrap_or_else(|| panic!("no agent {name}"))
    }

    /// Whether the workload address is on `name`'s tunnel interface.
    fn has_address(&self, name: &str) -> bool {
        self.agent(name).has_address(WORKLOAD_IP)
    }

    fn wait_address(&self, name: &str, present: bool, within: Duration) -> Duration {
        let started = Instant::now();
        let what = format!(
            "100.64.50.10 to be {} on {name}",
            if present { "present" } else { "absent" }
        );
        wait_until(within, &what, || {
            (self.has_address(name) == present).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
        started.elapsed()
    }

    /// Waits until `name`'s agent is connected to the coordinator and its map has the
    /// workload at `generation` (as `meshlink-agent status` reports), and its reconciler has
    /// had a moment to act on it.
    fn wait_knows(&self, name: &str, generation: u64) {
        let a = self.agent(name);
        let what = format!("{name} to be connected and know {WORKLOAD} at generation {generation}");
        wait_until(STEP, &what, || {
            let st = a.try_status()?;
            let c = &st["control"];
            let known = c["workloads"]
                .as_array()?
                .iter()
                .any(|w| w["name"] == WORKLOAD && w["generation"] == generation);
            (c["connected"] == true && known).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
        // The map is taken before the interface is reconciled: leave that a few milliseconds.
        std::thread::sleep(Duration::from_millis(100));
    }

    /// `meshctl workload show chat -o json`.
    fn workload(&self) -> serde_json::Value {
        self.ctl().json(&["workload", "show", WORKLOAD])
    }

    fn holder(&self) -> Option<String> {
        self.workload()
            .pointer("/holder/name")
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    }

    fn server(&self, on: &str, extra_sysctl: bool) -> Process {
        let a = self.agent(on);
        if extra_sysctl {
            a.ns().sysctl("net/ipv4/ip_nonlocal_bind", "1");
        }
        let mut cmd = a.ns().daemon_command(chat_bin());
        cmd.args(["server", "--listen", CHAT, "--name", on]);
        let mut p = Process::spawn_interactive(
            &format!("chat server on {on}"),
            cmd,
            &self.dir.join(&format!("server-{on}.log")),
        );
        p.wait_for_line("listening on", STEP).unwrap_or_else(|| {
            panic!("the chat server on {on} did not start:\n{}", p.log_tail(20))
        });
        let _ = &mut p;
        p
    }

    fn client(&self, on: &str, nick: &str) -> Process {
        let a = self.agent(on);
        let mut cmd = a.ns().daemon_command(chat_bin());
        cmd.args(["client", "--server", CHAT, "--nick", nick]);
        Process::spawn_interactive(
            &format!("chat client {nick} on {on}"),
            cmd,
            &self.dir.join(&format!("client-{nick}.log")),
        )
    }
}

/// Waits for a line containing `needle` from `p`.
fn expect(p: &Process, needle: &str) -> String {
    p.wait_for_line(needle, STEP).unwrap_or_else(|| {
        panic!(
            "{} did not print {needle:?} within {STEP:?}; log:\n{}",
            p.name(),
            p.log_tail(30)
        )
    })
}

/// `from` says `text`; `to` must see it (as `nick: text`). Returns the time it took.
fn say(from: &mut Process, nick: &str, to: &Process, text: &str) -> Duration {
    let started = Instant::now();
    from.write_line(text);
    expect(to, &format!("{nick}: {text}"));
    started.elapsed()
}

fn meshctl_in(ns: &NsRef, args: &[&str]) -> std::process::Output {
    ns.exec(meshctl_bin().to_str().expect("UTF-8 path"), args)
}

#[test]
fn chat_moves_across_providers_and_clients_follow() {
    if !require_root() {
        return;
    }
    let bed = Bed::new("wl-move");
    bed.ctl()
        .run(&["workload", "attach", WORKLOAD, "--node", "vm-a1"]);
    timing(
        "address on vm-a1 after attach",
        bed.wait_address("vm-a1", true, STEP),
    );
    let w = bed.workload();
    assert_eq!(w["generation"], 1, "{w}");
    assert_eq!(w["state"], "held", "{w}");

    let mut server_a = bed.server("vm-a1", false);
    let mut alice = bed.client("vm-b1", "alice");
    let bob = bed.client("vm-b2", "bob");
    expect(&alice, "* connected to");
    expect(&alice, "welcome to the room on vm-a1");
    expect(&bob, "* connected to");
    expect(&bob, "welcome to the room on vm-a1");
    say(&mut alice, "alice", &bob, "hello from gcp");

    // The migration: the server stops on vm-a1; vm-c1 (provider C) claims the workload
    // through its own agent; the server starts there; the clients come back by themselves.
    server_a.terminate();
    let started = Instant::now();
    let c1 = bed.agent("vm-c1");
    let out = meshctl_in(
        c1.ns(),
        &["workload", "claim", WORKLOAD, "--interface", c1.interface()],
    );
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("claimed chat (generation 2)"),
        "claim failed: {text}"
    );
    timing("claim answered", started.elapsed());
    bed.wait_address("vm-c1", true, STEP);
    timing("address on vm-c1", started.elapsed());
    bed.wait_address("vm-a1", false, STEP);
    let _server_c = bed.server("vm-c1", false);
    timing("server listening on vm-c1", started.elapsed());
    expect(&alice, "welcome to the room on vm-c1");
    let mut bob = bob;
    expect(&bob, "welcome to the room on vm-c1");
    say(&mut bob, "bob", &alice, "hello again");
    timing("first message through after the move", started.elapsed());

    let w = bed.workload();
    assert_eq!(
        w.pointer("/holder/name").and_then(|v| v.as_str()),
        Some("vm-c1"),
        "{w}"
    );
    assert_eq!(
        w.pointer("/previous/name").and_then(|v| v.as_str()),
        Some("vm-a1"),
        "{w}"
    );
    assert_eq!(w["generation"], 2, "{w}");

    // A node that is not an allowed holder cannot claim it.
    let b2 = bed.agent("vm-b2");
    let out = meshctl_in(
        b2.ns(),
        &["workload", "claim", WORKLOAD, "--interface", b2.interface()],
    );
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("not an allowed holder"),
        "vm-b2's claim: {text}"
    );
    assert_eq!(bed.holder().as_deref(), Some("vm-c1"));
}

#[test]
fn holder_killed_the_standby_takes_over() {
    let Some(mut bed) = Bed::held_by_vm_a1("wl-failover") else {
        return;
    };
    let _server_a = bed.server("vm-a1", false);
    // The hot standby: bound to the address before vm-c1 holds it.
    let _server_c = bed.server("vm-c1", true);
    let mut alice = bed.client("vm-b1", "alice");
    let bob = bed.client("vm-b2", "bob");
    expect(&alice, "welcome to the room on vm-a1");
    expect(&bob, "welcome to the room on vm-a1");
    say(&mut alice, "alice", &bob, "before");

    let started = Instant::now();
    bed.agent_mut("vm-a1").kill();
    let moved = wait_until(STEP, "the coordinator to move chat to vm-c1", || {
        (bed.holder().as_deref() == Some("vm-c1")).then_some(())
    });
    moved.unwrap_or_else(|e| panic!("{e}; workload: {}", bed.workload()));
    let failover = started.elapsed();
    timing("holder killed -> coordinator moved the workload", failover);
    bed.wait_address("vm-c1", true, STEP);
    timing("holder killed -> address on the standby", started.elapsed());
    // Idle clients find out that their server is gone when the new holder answers their next
    // segment (a keepalive probe, after 2 s of silence) with a reset.
    let mut bob = bob;
    expect(&alice, "welcome to the room on vm-c1");
    expect(&bob, "welcome to the room on vm-c1");
    say(&mut bob, "bob", &alice, "after");
    timing(
        "holder killed -> first message through the standby",
        started.elapsed(),
    );
    assert!(
        failover < Duration::from_secs(5),
        "failover took {failover:?} (lease 1.5 s)"
    );
    assert_eq!(bed.workload()["generation"], 2);

    // The old holder comes back: its map says vm-c1 holds generation 2; it must not answer.
    bed.agent_mut("vm-a1").restart();
    bed.wait_knows("vm-a1", 2);
    assert!(
        !bed.has_address("vm-a1"),
        "the restarted old holder took the address back"
    );
    assert!(bed.has_address("vm-c1"));
    assert_eq!(bed.holder().as_deref(), Some("vm-c1"));
}

#[test]
fn cut_off_holder_stops_answering_when_its_lease_ends() {
    let Some(bed) = Bed::held_by_vm_a1("wl-lease") else {
        return;
    };
    // vm-a1 loses its path to the coordinator (and only to it: its tunnels stay up).
    let coord_ip = bed.coord.advertise().ip().to_string();
    let a1 = bed.agent("vm-a1");
    a1.ns()
        .ip(&["route", "add", "blackhole", &format!("{coord_ip}/32")]);
    let started = Instant::now();
    let gone = bed.wait_address("vm-a1", false, Duration::from_secs(5));
    timing("cut-off holder dropped the address", gone);
    assert!(
        gone < Duration::from_millis(2500),
        "the cut-off holder kept the address {gone:?} (lease 1.5 s)"
    );
    bed.wait_address("vm-c1", true, STEP);
    timing("cut off -> standby holds it", started.elapsed());
    assert_eq!(bed.holder().as_deref(), Some("vm-c1"));
    // Never both at once after the cut: vm-a1 stays without it.
    assert!(!bed.has_address("vm-a1"));
    let b1 = bed.agent("vm-b1");
    assert!(
        b1.ns().wait_for_ping(WORKLOAD_IP, STEP).is_ok(),
        "the workload address does not answer from vm-b1"
    );
    // The path comes back: vm-a1 learns the newer generation and does not take it back.
    a1.ns()
        .ip(&["route", "del", "blackhole", &format!("{coord_ip}/32")]);
    bed.wait_knows("vm-a1", 2);
    assert!(!bed.has_address("vm-a1"));
    assert_eq!(bed.holder().as_deref(), Some("vm-c1"));
}

#[test]
fn coordinator_restart_silences_no_workload_address() {
    let Some(mut bed) = Bed::held_by_vm_a1("wl-restart") else {
        return;
    };
    restart_under_pings(&mut bed, "a 0.5 s restart after SIGKILL", |bed| {
        bed.coord.kill();
        std::thread::sleep(Duration::from_millis(500));
        let started = Instant::now();
        bed.coord.restart();
        timing("coordinator restarted", started.elapsed());
    });
    assert!(bed.has_address("vm-a1"));
    // Every agent is back on the restarted coordinator.
    wait_until(STEP, "every agent online after the restart", || {
        bed.ctl().nodes().iter().all(|n| n.online).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn orderly_coordinator_restart_shorter_than_a_lease_silences_nothing() {
    let Some(mut bed) = Bed::held_by_vm_a1("wl-orderly") else {
        return;
    };
    let mut stop_log = String::new();
    restart_under_pings(&mut bed, "an orderly restart", |bed| {
        // SIGTERM, as systemd stops it for an upgrade: the coordinator gives vm-a1 its stop
        // lease first. It stays away 1.3 s (with its start, longer than the 1.2 s of lease a
        // holder may have left when a coordinator crashes), then starts again.
        let asked = Instant::now();
        let status = bed.coord.terminate();
        assert!(status.success(), "the coordinator's orderly stop: {status}");
        timing("coordinator stopped", asked.elapsed());
        stop_log = bed.coord.process().log();
        let down = Instant::now();
        std::thread::sleep(Duration::from_millis(1_300));
        bed.coord.restart();
        timing("coordinator away (stopped to ready)", down.elapsed());
        assert!(
            down.elapsed() < Duration::from_secs(2),
            "the restart took {:?}: the machine is too slow for this test",
            down.elapsed()
        );
    });
    let given = stop_log
        .lines()
        .find(|l| l.contains("holders were given a last lease"))
        .unwrap_or_else(|| panic!("no stop lease in the coordinator's log: {stop_log}"));
    assert!(
        given.contains("holders=1") && given.contains("missed=0"),
        "vm-a1 was not given the stop lease: {given}"
    );
}

/// vm-b1 pings the workload address every 10 ms while `restart` stops and starts the
/// coordinator (`what`, for messages): every ping is answered, and nothing moved.
fn restart_under_pings(bed: &mut Bed, what: &str, restart: impl FnOnce(&mut Bed)) {
    let b1 = bed.agent("vm-b1").ns().clone();
    b1.wait_for_ping(WORKLOAD_IP, STEP)
        .unwrap_or_else(|e| panic!("the workload address does not answer from vm-b1: {e}"));
    let generation = bed.workload()["generation"].clone();
    let ping = ping_run(&b1, WORKLOAD_IP, 500);
    std::thread::sleep(Duration::from_secs(1));
    restart(bed);
    let out = ping.wait_with_output().expect("ping runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (sent, received) = ping_summary(&text);
    timing(
        &format!("pings answered across {what}: {received} of {sent}"),
        Duration::ZERO,
    );
    assert!(sent >= 300, "ping sent only {sent}: {text}");
    assert_eq!(
        received, sent,
        "the workload address went silent across {what}: {text}"
    );
    // Nothing moved, and vm-a1 holds it still.
    let w = bed.workload();
    assert_eq!(w["generation"], generation, "{w}");
    assert_eq!(bed.holder().as_deref(), Some("vm-a1"), "{w}");
}

#[test]
fn planned_moves_under_traffic_lose_nothing() {
    let Some(bed) = Bed::held_by_vm_a1("wl-moves") else {
        return;
    };
    let b1 = bed.agent("vm-b1").ns().clone();
    b1.wait_for_ping(WORKLOAD_IP, STEP)
        .unwrap_or_else(|e| panic!("the workload address does not answer from vm-b1: {e}"));
    // vm-b1 pings the address every 10 ms while it moves back and forth four times.
    let ping = ping_run(&b1, WORKLOAD_IP, 600);
    std::thread::sleep(Duration::from_millis(500));
    for to in ["vm-c1", "vm-a1", "vm-c1", "vm-a1"] {
        let started = Instant::now();
        bed.ctl().run(&["workload", "move", WORKLOAD, "--to", to]);
        timing(&format!("move to {to} answered"), started.elapsed());
        bed.wait_address(to, true, STEP);
        std::thread::sleep(Duration::from_millis(800));
    }
    let out = ping.wait_with_output().expect("ping runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (sent, received) = ping_summary(&text);
    timing(
        &format!("pings answered across four moves: {received} of {sent}"),
        Duration::ZERO,
    );
    // Nothing is lost at the switch: what reaches the new holder before its confirmation
    // waits there and is delivered once it may answer (agent/src/dataplane/handover.rs).
    assert_eq!(
        received,
        sent,
        "{} pings lost across four planned moves: {text}",
        sent - received
    );
    assert_eq!(bed.workload()["generation"], 5);
    assert_eq!(bed.holder().as_deref(), Some("vm-a1"));
}

#[test]
fn moves_to_unlisted_and_just_joined_nodes_lose_nothing() {
    let Some(mut bed) = Bed::held_by_vm_a1("wl-unlisted") else {
        return;
    };
    let b1 = bed.agent("vm-b1").ns().clone();
    b1.wait_for_ping(WORKLOAD_IP, STEP)
        .unwrap_or_else(|e| panic!("the workload address does not answer from vm-b1: {e}"));
    // 15 s of pings, one per millisecond: long enough for vm-a1 to tell the coordinator who
    // talks to the workload (it looks every 5 s) and for a node to join in the middle.
    let ping = ping_run_1ms(&b1, WORKLOAD_IP, 15_000);
    std::thread::sleep(Duration::from_millis(6000));
    let moved = |bed: &Bed, to: &str| {
        let started = Instant::now();
        bed.ctl().run(&["workload", "move", WORKLOAD, "--to", to]);
        timing(&format!("move to {to} answered"), started.elapsed());
        bed.wait_address(to, true, STEP);
    };
    // A node of the mesh the workload does not list. It warms up sessions with the holder and
    // the one peer that talks to the workload, not with every peer.
    moved(&bed, "vm-b2");
    let warm = &bed.agent("vm-b2").status()["last_warm_up"];
    assert_eq!(
        warm["peers"], 2,
        "vm-b2 warmed vm-a1 and vm-b1 only: {warm}"
    );
    std::thread::sleep(Duration::from_millis(800));
    // A node that has just joined: the move is asked for the moment it is up.
    let joining = Instant::now();
    bed.join(Provider::C, "vm-c2");
    let join_took = joining.elapsed();
    timing("vm-c2 joined and up", join_took);
    moved(&bed, "vm-c2");
    std::thread::sleep(Duration::from_millis(800));
    // And back to a listed node, from the newcomer.
    moved(&bed, "vm-a1");
    let out = ping.wait_with_output().expect("ping runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (sent, received) = ping_summary(&text);
    timing(
        &format!("pings answered across three moves: {received} of {sent}"),
        Duration::ZERO,
    );
    assert!(
        join_took < Duration::from_secs(5),
        "vm-c2 took too long to join for the pings to cover every move; nothing was measured"
    );
    assert_eq!(
        received,
        sent,
        "{} pings (1/ms) lost across moves to an unlisted and to a just-joined node: {text}",
        sent - received
    );
    assert_eq!(bed.holder().as_deref(), Some("vm-a1"));
}

#[test]
fn moves_onto_the_pinging_node_lose_nothing() {
    let Some(bed) = Bed::held_by_vm_a1("wl-onto-pinger") else {
        return;
    };
    let b1 = bed.agent("vm-b1");
    b1.ns()
        .wait_for_ping(WORKLOAD_IP, STEP)
        .unwrap_or_else(|e| panic!("the workload address does not answer from vm-b1: {e}"));
    // vm-b1 pings the address every millisecond while it moves onto vm-b1 itself and away
    // again, twice. From the preparation to the confirmation, what vm-b1's own host sends the
    // address is kept back with what peers send, and answered once vm-b1 may answer (before,
    // a ping in that window was dropped for want of a route, or by vm-a1 once it had let go).
    let ping = ping_run_1ms(b1.ns(), WORKLOAD_IP, 12_000);
    let pinging = Instant::now();
    std::thread::sleep(Duration::from_millis(1000));
    for to in ["vm-b1", "vm-a1", "vm-b1", "vm-a1"] {
        let started = Instant::now();
        bed.ctl().run(&["workload", "move", WORKLOAD, "--to", to]);
        timing(&format!("move to {to} answered"), started.elapsed());
        bed.wait_address(to, true, STEP);
        std::thread::sleep(Duration::from_millis(1200));
    }
    // Every move under the ping (12,000 at 1 ms take at least 12 s; the moves about 6 s, more
    // on a loaded machine, where one `meshctl` call took 3.6 s): a slower machine fails here
    // rather than pass having covered fewer moves.
    assert!(
        pinging.elapsed() < Duration::from_millis(11_500),
        "the four moves took {:?}, longer than the ping",
        pinging.elapsed()
    );
    let out = ping.wait_with_output().expect("ping runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (sent, received) = ping_summary(&text);
    let kept = b1.status()["handover"].clone();
    let n = |k: &str| kept[k].as_u64().unwrap_or(0);
    timing(
        &format!(
            "pings answered across four moves onto and off the pinger: {received} of {sent} \
             ({} kept back at vm-b1, {} released)",
            n("queued"),
            n("released")
        ),
        Duration::ZERO,
    );
    // One ping per move onto the pinger may still be lost: sent while the move is only
    // prepared, it goes to the old holder (which keeps answering if the move does not land),
    // and an old holder that has already applied the move forwards it to the new holder, never
    // back to its sender (counted not_held there). Known, reported; everything else arrives.
    assert!(
        sent - received <= 2,
        "{} pings (1/ms) lost across two moves onto the pinging node (vm-b1's handover: {kept}, \
         drops: {}; vm-a1's handover: {}): {text}",
        sent - received,
        b1.status()["drops"],
        bed.agent("vm-a1").status()["handover"]
    );
    assert_eq!(
        n("queued"),
        n("released"),
        "vm-b1 delivered all it kept back: {kept}"
    );
    assert_eq!(bed.holder().as_deref(), Some("vm-a1"));
}
