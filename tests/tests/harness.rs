//! Checks of the test-bed itself, independent of `meshlink-agent`: if these fail, the harness
//! or the machine is at fault, not the agent.
//!
//! The reference tunnel is `wireguard-go` on both hosts, configured exactly as the agent tests
//! configure their stock peer.

use std::net::IpAddr;
use std::time::Duration;

use meshlink_tests::xfer::transfer_checked;
use meshlink_tests::{require_root, wait_until, Netns, TwoHosts};

/// A namespace guard removes its namespace, and the veth inside goes with it.
#[test]
fn namespaces_and_veths_are_cleaned_up() {
    if !require_root() {
        return;
    }
    let bed = TwoHosts::create("harness-cleanup");
    assert!(
        bed.underlay_works(),
        "no underlay connectivity between the two namespaces"
    );
    let names = [bed.a.ns.name().to_owned(), bed.b.ns.name().to_owned()];
    drop(bed);
    let listed = meshlink_tests::host_run("ip", &["netns", "list"]);
    for name in names {
        assert!(
            !listed
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name.as_str())),
            "namespace {name} left behind"
        );
    }
    // A single namespace on its own.
    let ns = Netns::create();
    assert!(ns.has_link("lo"));
}

/// wireguard-go on both ends: handshake, ping both ways, a checked 16 MiB TCP transfer.
#[test]
fn wireguard_go_to_wireguard_go() {
    if !require_root() {
        return;
    }
    let bed = TwoHosts::create("harness-wggo");
    let (a, b) = (&bed.a, &bed.b);
    let wg_a = a.start_wireguard_go(&bed.dir, vec![b.as_peer()]);
    let wg_b = b.start_wireguard_go(&bed.dir, vec![a.as_peer()]);

    let rtt =
        a.ns.wait_for_ping(b.overlay, Duration::from_secs(15))
            .unwrap();
    eprintln!("first overlay ping a->b after {rtt:?}");
    b.ns.wait_for_ping(a.overlay, Duration::from_secs(10))
        .unwrap();
    wait_until(Duration::from_secs(5), "handshakes on both sides", || {
        (wg_a.latest_handshake(&b.keys.public).is_some()
            && wg_b.latest_handshake(&a.keys.public).is_some())
        .then_some(())
    })
    .unwrap();

    let got = transfer_checked(
        &a.ns,
        &b.ns,
        IpAddr::V4(b.overlay),
        &bed.dir,
        16 << 20,
        Duration::from_secs(60),
    );
    eprintln!(
        "16 MiB a->b through wireguard-go: {:.0} Mbit/s",
        got.mbit_per_sec()
    );
}

/// A process spawned in a namespace runs there, logs to its file, and is ended by its guard.
#[test]
fn spawned_processes_run_inside_and_are_ended() {
    if !require_root() {
        return;
    }
    let dir = meshlink_tests::ScratchDir::create("harness-spawn");
    let ns = Netns::create();
    let log = dir.join("sleeper.log");
    let mut sleeper = ns.spawn("sh", &["-c", "ip -o link show; exec sleep 600"], &log);
    let pid = sleeper.pid();
    // It sees only the namespace's own loopback.
    wait_until(Duration::from_secs(5), "the sleeper's link listing", || {
        sleeper.log().contains("lo:").then_some(())
    })
    .unwrap();
    assert_eq!(
        sleeper.log().lines().count(),
        1,
        "more than lo inside: {}",
        sleeper.log()
    );
    assert!(sleeper.is_running());
    drop(sleeper);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "process {pid} still exists after its guard dropped"
    );
}
