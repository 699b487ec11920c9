//! Hardening of the agent (issue 11), with real binaries in namespaces:
//!
//! - a joined node does not trust a network map that no coordinator has confirmed for
//!   `max_cached_map_age`: it drops its peers when its map gets that old without a coordinator,
//!   and a restart from an older cache waits for a coordinator instead of bringing peers up;
//!
//! Topology: one provider of `meshlink_tests::Providers` (198.18.1.0/24 behind a router
//! namespace), hosts on it for the coordinator and the agents; overlay 100.64.0.0/16.
//!
//! Needs root (skips with one line otherwise; under CI it fails instead) and the binaries:
//! `cargo build -p meshlink-agent -p meshlink-coordinator -p meshctl` first.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use meshlink_tests::process::Stdout;
use meshlink_tests::{
    agent_bin, coordinator_bin, meshctl_bin, require_root, wait_until, wg, write_secret,
    Coordinator, MeshAgent, Process, Provider, Providers, ScratchDir,
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
