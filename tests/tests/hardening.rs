//! Hardening of the agent (issue 11), with real binaries in namespaces:
//!
//! - a joined node does not trust a network map that no coordinator has confirmed for
//!   `max_cached_map_age`: it drops its peers when its map gets that old without a coordinator,
//!   and a restart from an older cache waits for a coordinator instead of bringing peers up;
//! - `fail_closed` keeps blackhole routes for the overlay's prefixes while the agent is down,
//!   so that overlay traffic never leaves in the clear through the default route, and an agent
//!   started without it removes them.
//!
//! Topologies: for joined nodes, one provider of `meshlink_tests::Providers` (198.18.1.0/24
//! behind a router namespace), hosts on it for the coordinator and the agents, overlay
//! 100.64.0.0/16; for static peers, a host whose default route goes through a veth to a
//! second namespace of the test (198.18.0.0/24), which forwards nothing.
//!
//! Needs root (skips with one line otherwise; under CI it fails instead) and the binaries:
//! `cargo build -p meshlink-agent -p meshlink-coordinator -p meshctl` first.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use meshlink_tests::process::Stdout;
use meshlink_tests::{
    agent_bin, coordinator_bin, meshctl_bin, require_root, veth, wait_until, wg, write_secret,
    AgentConfig, Coordinator, Keypair, MeshAgent, Netns, NsRef, PeerConfig, Process, Provider,
    Providers, ScratchDir,
};

/// Bound on a path answering a ping, or an agent coming up with its peers.
const REACH: Duration = Duration::from_secs(20);
/// Bound on an agent noticing a dead coordinator (QUIC's 4 s idle timeout), then on its map
/// ageing past a short `max_cached_map_age`, on a busy 2-core machine.
const OUTAGE: Duration = Duration::from_secs(40);

/// The variable of the setting under test.
const MAX_AGE_VAR: &str = "MESHLINK_MAX_CACHED_MAP_AGE";

/// Starts the joined node of `agent` again from its state directory (`up --state-dir DIR
/// --interface IFACE`, no token) with the extra environment `env`, in place of `agent`'s own
/// process (which must have ended), and waits until its interface answers with its address.
fn restart_with(agent: &MeshAgent, dir: &ScratchDir, env: &[(&str, &str)], tag: &str) -> Process {
    let mut cmd = agent.ns().daemon_command(agent_bin());
    cmd.arg("up")
        .arg("--state-dir")
        .arg(agent.state_dir())
        .args(["--interface", agent.interface()]);
    for (var, value) in env {
        cmd.env(var, value);
    }
    let log = dir.join(&format!("{}.agent.{tag}.log", agent.name()));
    let mut process = Process::spawn(
        &format!("meshlink-agent {} ({tag})", agent.name()),
        cmd,
        &log,
        Stdout::Log,
    );
    let up = wait_until(
        REACH,
        &format!("{} ({tag}) to come up", agent.name()),
        || {
            if let Some(status) = process.try_wait() {
                return Some(Err(status));
            }
            (wg::answers(agent.ns(), agent.interface())
                && agent
                    .try_status()
                    .is_some_and(|s| meshlink_tests::mesh::address_of(&s).is_some()))
            .then_some(Ok(()))
        },
    );
    match up {
        Ok(Ok(())) => process,
        Ok(Err(status)) => panic!(
            "{} ({tag}) exited before it was up ({status}); log:\n{}",
            agent.name(),
            process.log_tail(40)
        ),
        Err(e) => panic!("{e}; log:\n{}", process.log_tail(40)),
    }
}

/// `received_at` of the cached map in `netmap.json`, if the file has one.
fn received_at(cache: &Path) -> Option<u64> {
    let text = std::fs::read(cache).unwrap_or_else(|e| panic!("{}: {e}", cache.display()));
    let json: serde_json::Value = serde_json::from_slice(&text).expect("the cache is JSON");
    json.get("received_at").and_then(serde_json::Value::as_u64)
}

/// Rewrites the cached map's `received_at` (`None` removes it, as an older agent wrote it).
fn set_received_at(cache: &Path, at: Option<u64>) {
    let text = std::fs::read(cache).unwrap_or_else(|e| panic!("{}: {e}", cache.display()));
    let mut json: serde_json::Value = serde_json::from_slice(&text).expect("the cache is JSON");
    let fields = json.as_object_mut().expect("the cache is a JSON object");
    match at {
        Some(at) => fields.insert("received_at".into(), at.into()),
        None => fields.remove("received_at"),
    };
    write_secret(cache, &json.to_string());
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

#[test]
fn a_map_no_coordinator_confirmed_for_max_cached_map_age_is_not_trusted() {
    if !require_root() {
        return;
    }
    agent_bin();
    coordinator_bin();
    meshctl_bin();
    // Declared first, dropped last: it outlives every process that writes into it.
    let dir = ScratchDir::create("stale-map");
    let mut providers = Providers::create(1);
    let coord_host = providers.add_host(Provider::A);
    let host_a = providers.add_host(Provider::A);
    let host_b = providers.add_host(Provider::A);
    let mut coord = Coordinator::start(&coord_host.ns, &dir, coord_host.underlay);
    let ctl = coord.meshctl();
    ctl.network_create("prod", "100.64.0.0/16");
    let token = ctl.token_create("prod", Some(2), Some("1h"));
    let mut a = MeshAgent::join(&host_a.ns, &dir, &token, "vm-a", &[]);
    let b = MeshAgent::join(&host_b.ns, &dir, &token, "vm-b", &[]);
    let (a_key, b_key) = (a.public_key(), b.public_key());
    let ip_b = b.address();
    host_a.ns.wait_for_ping(ip_b, REACH).unwrap();
    let lists_b = |a: &MeshAgent| a.peer_keys().contains(&b_key);

    // 1. vm-a trusts an unconfirmed map for 6 s. While its control session is up, the map
    //    is current however long that lasts.
    a.terminate();
    let mut short = restart_with(&a, &dir, &[(MAX_AGE_VAR, "6s")], "6s");
    wait_until(REACH, "vm-a to list vm-b", || lists_b(&a).then_some(())).unwrap();
    std::thread::sleep(Duration::from_secs(9));
    assert!(
        lists_b(&a),
        "vm-a dropped vm-b while connected to the coordinator; log:\n{}",
        short.log_tail(30)
    );

    // 2. The coordinator dies. vm-a notices (QUIC idle timeout) and drops vm-b once its map
    //    has gone 6 s unconfirmed; vm-b, with the default week, keeps vm-a.
    coord.kill();
    let killed = Instant::now();
    wait_until(
        OUTAGE,
        "vm-a to drop the peers of its unconfirmed map",
        || a.peer_keys().is_empty().then_some(()),
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}: vm-a still lists {:?}; log:\n{}",
            a.peer_keys(),
            short.log_tail(30)
        )
    });
    let took = killed.elapsed();
    eprintln!("hardening: vm-a dropped its peers {took:.1?} after the coordinator died");
    assert!(
        took >= Duration::from_secs(6),
        "vm-a dropped its peers {took:?} after the coordinator died, sooner than its map's age"
    );
    let log = short.log();
    assert!(
        log.contains("its peers are dropped until one answers"),
        "vm-a does not say why its peers went:\n{log}"
    );
    assert!(
        b.peer_keys().contains(&a_key),
        "vm-b (default max_cached_map_age) dropped vm-a"
    );

    // 3. A restart with the default week, the coordinator still down: the cache was dated
    //    while the session was up, so it is seconds old and trusted; vm-b answers again.
    short.terminate();
    let cache = a.state_dir().join("netmap.json");
    let dated = received_at(&cache).expect("the cached map has a date");
    assert!(
        unix_now().saturating_sub(dated) < 60,
        "the cache's date {dated} is not from the session that just ended (now {})",
        unix_now()
    );
    let mut fresh = restart_with(&a, &dir, &[], "fresh-cache");
    wait_until(REACH, "vm-a to bring vm-b up from its cached map", || {
        lists_b(&a).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", fresh.log_tail(30)));
    host_a.ns.wait_for_ping(ip_b, REACH).unwrap();

    // 4. The same cache dated 8 days back: the default week is over, vm-a waits for a
    //    coordinator with its peers down, and says so.
    fresh.terminate();
    set_received_at(&cache, Some(unix_now() - 8 * 24 * 3600));
    let mut old = restart_with(&a, &dir, &[], "8-day-old-cache");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        a.peer_keys(),
        Vec::<String>::new(),
        "vm-a brought up the peers of an 8-day-old map; log:\n{}",
        old.log_tail(30)
    );
    let log = old.log();
    assert!(
        log.contains("last confirmed by a coordinator 8d ago")
            && log.contains("its peers are not brought up; waiting for a coordinator"),
        "vm-a does not say why it waits:\n{log}"
    );

    // 5. A cache written by an agent from before the date: of unknown age, so the same.
    old.terminate();
    set_received_at(&cache, None);
    let undated = restart_with(&a, &dir, &[], "undated-cache");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        a.peer_keys(),
        Vec::<String>::new(),
        "vm-a brought up the peers of an undated map; log:\n{}",
        undated.log_tail(30)
    );
    assert!(
        undated.log().contains("at an unknown time"),
        "vm-a does not say why it waits:\n{}",
        undated.log()
    );

    // 6. The coordinator comes back: vm-a takes vm-b from it.
    coord.restart();
    wait_until(OUTAGE, "vm-a to list vm-b from the coordinator", || {
        lists_b(&a).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", undated.log_tail(30)));
    host_a.ns.wait_for_ping(ip_b, REACH).unwrap();
    assert!(
        received_at(&cache).is_some_and(|at| unix_now().saturating_sub(at) < 60),
        "the map from the coordinator is cached with its date"
    );
}

/// The variable of the fail-closed setting.
const FAIL_CLOSED_VAR: &str = "MESHLINK_FAIL_CLOSED";

/// Starts `meshlink-agent up --config FILE` in `ns` with `config` and the extra environment
/// `env`, and waits until its interface answers `wg show`.
fn start_static(
    ns: &NsRef,
    dir: &ScratchDir,
    config: &AgentConfig,
    env: &[(&str, &str)],
    tag: &str,
) -> Process {
    let path = dir.join(&format!("{}.{tag}.toml", config.interface));
    write_secret(&path, &config.to_toml());
    let mut cmd = ns.daemon_command(agent_bin());
    cmd.arg("up").arg("--config").arg(&path);
    for (var, value) in env {
        cmd.env(var, value);
    }
    let log = dir.join(&format!("{}.agent.{tag}.log", config.interface));
    let mut process = Process::spawn(
        &format!("meshlink-agent {} ({tag})", config.interface),
        cmd,
        &log,
        Stdout::Log,
    );
    let up = wait_until(REACH, &format!("agent ({tag}) to answer `wg show`"), || {
        if let Some(status) = process.try_wait() {
            return Some(Err(status));
        }
        wg::answers(ns, &config.interface).then_some(Ok(()))
    });
    match up {
        Ok(Ok(())) => process,
        Ok(Err(status)) => panic!(
            "the agent ({tag}) exited before it was up ({status}); log:\n{}",
            process.log_tail(40)
        ),
        Err(e) => panic!("{e}; log:\n{}", process.log_tail(40)),
    }
}

/// Waits until the agent's TUN interface is gone (the kernel removes it with the process).
fn wait_gone(ns: &NsRef, iface: &str) {
    wait_until(REACH, &format!("{iface} to disappear"), || {
        (!ns.has_link(iface)).then_some(())
    })
    .unwrap();
}

/// `ip route get ADDR` in `ns`: `Ok(route)`, or `Err(what the kernel said)` when it has no
/// route to give (a blackhole answers "Invalid argument").
fn route_get(ns: &NsRef, addr: &str) -> Result<String, String> {
    let out = ns.exec("ip", &["route", "get", addr]);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// The blackhole routes of `ns`'s main tables, IPv4 and IPv6, one per line.
fn blackholes(ns: &NsRef) -> String {
    ns.ip(&["-4", "route", "show", "type", "blackhole"])
        + &ns.ip(&["-6", "route", "show", "type", "blackhole"])
}

/// Packets sent on `dev` in `ns` so far.
fn tx_packets(ns: &NsRef, dev: &str) -> u64 {
    let json: serde_json::Value =
        serde_json::from_str(&ns.ip(&["-j", "-s", "link", "show", "dev", dev]))
            .expect("ip -j prints JSON");
    json.pointer("/0/stats64/tx/packets")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or_else(|| panic!("no tx counter for {dev}: {json}"))
}

/// How many packets to `addr` leave `ns` through `dev` while it pings `addr` three times.
fn leaked(ns: &NsRef, dev: &str, addr: &str) -> u64 {
    let before = tx_packets(ns, dev);
    let _ = ns.exec(
        "ping",
        &["-n", "-q", "-c", "3", "-i", "0.2", "-W", "1", addr],
    );
    tx_packets(ns, dev) - before
}

#[test]
fn fail_closed_keeps_overlay_traffic_off_the_default_route_while_the_agent_is_down() {
    if !require_root() {
        return;
    }
    agent_bin();
    let dir = ScratchDir::create("fail-closed");
    // `host` runs the agent; its default route goes to `gw` (a namespace of this test that
    // forwards nothing), as a VM's default route goes to its provider's gateway.
    let host = Netns::create();
    let gw = Netns::create();
    let link = veth(&host, "198.18.0.1/24", &gw, "198.18.0.2/24");
    host.ip(&["route", "add", "default", "via", "198.18.0.2"]);
    // Only the test's own pings may leave on the veth: no IPv6 chatter, no ARP.
    host.sysctl(&format!("net/ipv6/conf/{}/disable_ipv6", link.a), "1");
    let gw_mac: serde_json::Value =
        serde_json::from_str(&gw.ip(&["-j", "link", "show", "dev", &link.b])).unwrap();
    let gw_mac = gw_mac
        .pointer("/0/address")
        .and_then(serde_json::Value::as_str)
        .unwrap();
    host.ip(&[
        "neigh",
        "replace",
        "198.18.0.2",
        "lladdr",
        gw_mac,
        "dev",
        &link.a,
        "nud",
        "permanent",
    ]);

    let keys = Keypair::generate();
    let key_file = dir.join("host.key");
    keys.write_private(&key_file);
    let peer = Keypair::generate();
    let config = AgentConfig {
        interface: meshlink_tests::unique_name("w"),
        private_key_file: key_file,
        listen_port: 51820,
        addresses: vec!["100.64.0.1/24".into(), "fd00:6d6c::1/64".into()],
        mtu: 1420,
        uapi_dir: None,
        peers: vec![PeerConfig {
            public_key: peer.public,
            preshared_key_file: None,
            endpoint: Some("198.18.0.2:51820".parse().unwrap()),
            allowed_ips: vec!["100.64.0.2/32".into(), "fd00:6d6c::2/128".into()],
            persistent_keepalive: None,
        }],
    };
    let iface = config.interface.clone();
    let overlay = "100.64.0.2";
    let through_tunnel = |what: &str| {
        let route = route_get(&host, overlay).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            route.contains(&format!("dev {iface}")),
            "{what}: {overlay} does not go through the tunnel: {route}"
        );
    };

    // 1. With fail_closed: the tunnel's route wins while the agent runs; after a crash the
    //    blackhole is left, so nothing to the overlay leaves on the veth.
    let mut agent = start_static(&host, &dir, &config, &[(FAIL_CLOSED_VAR, "true")], "closed");
    through_tunnel("while the agent runs with fail_closed");
    agent.kill();
    wait_gone(&host, &iface);
    let after_crash = route_get(&host, overlay);
    assert!(
        after_crash
            .as_ref()
            .is_err_and(|e| e.contains("Invalid argument")),
        "after a crash with fail_closed, {overlay} is routed: {after_crash:?}\nroutes:\n{}",
        host.routes()
    );
    let holes = blackholes(&host);
    assert!(
        holes.contains(&format!("blackhole {overlay} ")) && holes.contains("metric"),
        "no blackhole for {overlay}: {holes}"
    );
    assert!(
        holes.contains("blackhole fd00:6d6c::2 "),
        "no blackhole for the IPv6 peer: {holes}"
    );
    assert_eq!(
        leaked(&host, &link.a, overlay),
        0,
        "pings to {overlay} left on the veth after a crash with fail_closed"
    );

    // 2. A clean stop leaves it too; a start with fail_closed again does not stack a second.
    let mut agent = start_static(
        &host,
        &dir,
        &config,
        &[(FAIL_CLOSED_VAR, "1")],
        "closed-again",
    );
    through_tunnel("after a restart with fail_closed");
    // A peer added at runtime gets a blackhole for its prefix, and loses it with the peer.
    let extra = Keypair::generate();
    let wg_set = |args: &[&str]| {
        let mut all = vec!["set", iface.as_str(), "peer", extra.public.as_str()];
        all.extend_from_slice(args);
        host.run("wg", &all);
    };
    let has_extra = || blackholes(&host).contains("blackhole 10.99.0.0/16 ");
    wg_set(&["allowed-ips", "10.99.0.0/16"]);
    wait_until(REACH, "a blackhole for the added peer's prefix", || {
        has_extra().then_some(())
    })
    .unwrap();
    wg_set(&["remove"]);
    wait_until(REACH, "the removed peer's blackhole to go", || {
        (!has_extra()).then_some(())
    })
    .unwrap();
    assert_eq!(
        agent.terminate().code(),
        Some(0),
        "log:\n{}",
        agent.log_tail(20)
    );
    wait_gone(&host, &iface);
    assert_eq!(blackholes(&host), holes, "blackholes after a clean stop");
    assert_eq!(leaked(&host, &link.a, overlay), 0);

    // 3. Without fail_closed (the default) the agent removes the blackhole when it starts,
    //    and once it stops, the overlay goes out through the default route: the hole that
    //    the setting closes.
    let mut agent = start_static(&host, &dir, &config, &[], "open");
    through_tunnel("while the agent runs without fail_closed");
    assert_eq!(
        blackholes(&host).trim(),
        "",
        "the blackhole stayed without fail_closed"
    );
    agent.terminate();
    wait_gone(&host, &iface);
    let route = route_get(&host, overlay).expect("a route to the overlay");
    assert!(
        route.contains("via 198.18.0.2") && route.contains(&format!("dev {}", link.a)),
        "{overlay} after the agent stopped without fail_closed: {route}"
    );
    assert!(
        leaked(&host, &link.a, overlay) >= 3,
        "without fail_closed, pings to {overlay} should leave on the veth"
    );
}

#[test]
fn fail_closed_on_a_joined_node_blackholes_its_network() {
    if !require_root() {
        return;
    }
    agent_bin();
    coordinator_bin();
    meshctl_bin();
    let dir = ScratchDir::create("fail-closed-mesh");
    let mut providers = Providers::create(1);
    let coord_host = providers.add_host(Provider::A);
    let host = providers.add_host(Provider::A);
    let coord = Coordinator::start(&coord_host.ns, &dir, coord_host.underlay);
    let ctl = coord.meshctl();
    ctl.network_create("prod", "100.64.0.0/16");
    let token = ctl.token_create("prod", Some(1), Some("1h"));
    let mut joined = MeshAgent::join(&host.ns, &dir, &token, "vm-a", &[]);
    joined.terminate();
    let mut agent = restart_with(&joined, &dir, &[(FAIL_CLOSED_VAR, "yes")], "closed");
    let holes = blackholes(&host.ns);
    assert!(
        holes.contains("blackhole 100.64.0.0/16 "),
        "no blackhole for the network while running: {holes}"
    );
    let own = joined.address().to_string();
    agent.kill();
    wait_gone(&host.ns, joined.interface());
    for addr in ["100.64.0.99", own.as_str()] {
        let route = route_get(&host.ns, addr);
        assert!(
            route
                .as_ref()
                .is_err_and(|e| e.contains("Invalid argument")),
            "{addr} after a crash with fail_closed: {route:?}"
        );
    }
    // Turned off: the next start removes it.
    let _open = restart_with(&joined, &dir, &[], "open");
    assert_eq!(blackholes(&host.ns).trim(), "");
}
