//! A fast ping from a namespace, run in the background, and its summary: the probe the
//! workload tests count lost packets with.

use std::net::Ipv4Addr;

use crate::netns::NsRef;

/// Starts `count` pings from `ns` to `dst`, one every 10 ms (ping waits for the last answers
/// before it prints its summary).
pub fn ping_run(ns: &NsRef, dst: Ipv4Addr, count: u32) -> std::process::Child {
    ping_every(ns, dst, count, "0.01")
}

/// Starts `count` pings from `ns` to `dst`, one every millisecond (as root: ping refuses
/// intervals below 2 ms to others).
pub fn ping_run_1ms(ns: &NsRef, dst: Ipv4Addr, count: u32) -> std::process::Child {
    ping_every(ns, dst, count, "0.001")
}

fn ping_every(ns: &NsRef, dst: Ipv4Addr, count: u32, interval: &str) -> std::process::Child {
    let mut cmd = ns.command("ping");
    cmd.args([
        "-n",
        "-q",
        "-i",
        interval,
        "-c",
        &count.to_string(),
        &dst.to_string(),
    ])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    cmd.spawn().expect("ping starts")
}

/// `(transmitted, received)` from ping's summary line.
pub fn ping_summary(out: &str) -> (u32, u32) {
    let line = out
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary in {out:?}"));
    let num = |i: usize| -> u32 {
        line.split(',')
            .nth(i)
            .and_then(|f| f.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("ping summary {line:?}"))
    };
    (num(0), num(1))
}
