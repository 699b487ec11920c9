//! A fast ping from a namespace, run in the background, and its summary: the probe the
//! workload tests count lost packets with.

use std::net::Ipv4Addr;

use crate::netns::NsRef;

/// Starts `count` pings from `ns` to `dst`, one every 10 ms (ping waits for the last answers
/// before it prints its summary).
pub fn ping_run(ns: &NsRef, dst: Ipv4Addr, count: u32) -> std::process::Child {
    let mut cmd = ns.command("ping");
    cmd.args([
        "-n",
        "-q",
        "-i",
        "0.01",
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
