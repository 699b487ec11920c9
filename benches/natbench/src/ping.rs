//! `ping` through the tunnel: runs in a namespace, and what its output says (per-reply times
//! and timestamps, summary figures, the longest silence).
//!
//! Replies are read from iputils `ping -n [-D]` lines such as
//! `[1796438317.721020] 64 bytes from 100.64.0.2: icmp_seq=1 ttl=64 time=0.029 ms`; the
//! bracketed Unix time (`-D`) is when the reply was printed, that is received.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use meshlink_tests::NsRef;

/// One echo reply.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reply {
    /// When it arrived, Unix seconds (`None` without `-D`).
    pub at: Option<f64>,
    /// `icmp_seq`.
    pub seq: u32,
    /// Round-trip time.
    pub rtt_ms: f64,
}

/// The replies in `ping -n` output, in order; duplicates (`DUP!`) are left out.
pub fn replies(out: &str) -> Vec<Reply> {
    out.lines()
        .filter(|l| l.contains(" bytes from ") && !l.contains("DUP!"))
        .filter_map(|line| {
            let at = line
                .strip_prefix('[')
                .and_then(|rest| rest.split_once(']'))
                .and_then(|(ts, _)| ts.parse().ok());
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .map(str::to_owned)
            };
            Some(Reply {
                at,
                seq: field("icmp_seq=")?.parse().ok()?,
                rtt_ms: field("time=")?.parse().ok()?,
            })
        })
        .collect()
}

/// Round-trip times of one ping run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PingStats {
    /// Echo requests sent.
    pub sent: u32,
    /// Replies received.
    pub received: u32,
    /// Mean round-trip time.
    pub avg_ms: f64,
    /// 99th percentile (nearest rank).
    pub p99_ms: f64,
    /// Longest round-trip time.
    pub max_ms: f64,
}

impl PingStats {
    /// The figures of a finished `ping -n` run's output.
    ///
    /// # Errors
    /// When it has no summary line or no reply.
    pub fn of(out: &str) -> Result<PingStats, String> {
        let mut times: Vec<f64> = replies(out).iter().map(|r| r.rtt_ms).collect();
        let sent = out
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
            .ok_or_else(|| format!("no ping summary in {:?}", tail(out)))?;
        if times.is_empty() {
            return Err(format!("no ping reply of {sent}: {:?}", tail(out)));
        }
        times.sort_by(f64::total_cmp);
        let received = u32::try_from(times.len()).unwrap_or(u32::MAX);
        Ok(PingStats {
            sent,
            received,
            avg_ms: times.iter().sum::<f64>() / times.len() as f64,
            p99_ms: percentile(&times, 0.99),
            max_ms: times[times.len() - 1],
        })
    }
}

/// The nearest-rank percentile `p` (0..=1) of sorted, non-empty `values`.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The longest time between two consecutive replies that arrived within `[from, to]` (Unix
/// seconds), in milliseconds, and how many requests in that span got no reply (sequence
/// numbers missing between the first and the last reply of the span). `None` with fewer than
/// two replies there.
pub fn longest_gap(replies: &[Reply], from: f64, to: f64) -> Option<(f64, u32)> {
    let span: Vec<&Reply> = replies
        .iter()
        .filter(|r| r.at.is_some_and(|at| (from..=to).contains(&at)))
        .collect();
    let (first, last) = (span.first()?, span.last()?);
    let gap = span
        .windows(2)
        .filter_map(|w| Some(w[1].at? - w[0].at?))
        .max_by(f64::total_cmp)?;
    let expected = last.seq.saturating_sub(first.seq) + 1;
    let lost = expected.saturating_sub(u32::try_from(span.len()).unwrap_or(u32::MAX));
    Some((gap * 1000.0, lost))
}

/// `ping -n -c COUNT -i 0.01` from `ns` to `to`, waiting for it to finish.
///
/// # Errors
/// When no reply came back.
pub fn burst(ns: &NsRef, to: Ipv4Addr, count: u32) -> Result<PingStats, String> {
    // The deadline only guards against a path that dies: a healthy run takes count/100 s.
    let deadline = (count / 100 + 10).to_string();
    let out = ns.exec(
        "ping",
        &[
            "-n",
            "-i",
            "0.01",
            "-c",
            &count.to_string(),
            "-w",
            &deadline,
            &to.to_string(),
        ],
    );
    PingStats::of(&String::from_utf8_lossy(&out.stdout))
}

/// Pings `to` from `ns` every 10 ms until the first reply, for at most `timeout`; returns
/// when that reply arrived (Unix seconds, from `ping -D`).
///
/// `ping` exits at once while the namespace has no route to `to` (the agent has not set up
/// its interface yet); it is then started again.
///
/// # Errors
/// When no reply came within `timeout`.
pub fn first_reply(ns: &NsRef, to: Ipv4Addr, timeout: Duration) -> Result<f64, String> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no ping reply from {to} within {timeout:?}; last ping said: {}",
                tail(&last)
            ));
        }
        let wait = left.as_secs().max(1).to_string();
        let out = ns.exec(
            "ping",
            &[
                "-n",
                "-D",
                "-i",
                "0.01",
                "-c",
                "1",
                "-w",
                &wait,
                &to.to_string(),
            ],
        );
        last = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(at) = replies(&last).first().and_then(|r| r.at) {
            return Ok(at);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Now, in Unix seconds: the clock `ping -D` prints.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The last few lines of `out`, for error messages.
fn tail(out: &str) -> String {
    let lines: Vec<&str> = out.lines().collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUN: &str = "\
PING 100.64.0.2 (100.64.0.2) 56(84) bytes of data.
[1000.000000] 64 bytes from 100.64.0.2: icmp_seq=1 ttl=64 time=0.50 ms
[1000.010000] 64 bytes from 100.64.0.2: icmp_seq=2 ttl=64 time=1.50 ms
[1000.010500] 64 bytes from 100.64.0.2: icmp_seq=2 ttl=64 time=1.9 ms (DUP!)
[1000.050000] 64 bytes from 100.64.0.2: icmp_seq=6 ttl=64 time=3 ms
[1000.060000] 64 bytes from 100.64.0.2: icmp_seq=7 ttl=64 time=1.00 ms

--- 100.64.0.2 ping statistics ---
8 packets transmitted, 4 received, 50% packet loss, time 70ms
";

    #[test]
    fn reads_replies_with_and_without_timestamps() {
        let r = replies(RUN);
        assert_eq!(r.len(), 4, "the duplicate is left out");
        assert_eq!(
            r[0],
            Reply {
                at: Some(1000.0),
                seq: 1,
                rtt_ms: 0.5
            }
        );
        assert_eq!(r[2].rtt_ms, 3.0);
        let plain = replies("64 bytes from 100.64.0.2: icmp_seq=9 ttl=64 time=0.029 ms\n");
        assert_eq!(
            plain,
            vec![Reply {
                at: None,
                seq: 9,
                rtt_ms: 0.029
            }]
        );
    }

    #[test]
    fn summarises_a_run() {
        let s = PingStats::of(RUN).unwrap();
        assert_eq!((s.sent, s.received), (8, 4));
        assert!((s.avg_ms - 1.5).abs() < 1e-9);
        assert_eq!((s.p99_ms, s.max_ms), (3.0, 3.0));
        assert!(PingStats::of("8 packets transmitted, 0 received\n").is_err());
        assert!(PingStats::of("").is_err());
    }

    #[test]
    fn nearest_rank_percentile() {
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.99), 198.0);
        assert_eq!(percentile(&v, 0.5), 100.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
    }

    #[test]
    fn longest_gap_and_losses_within_a_span() {
        let r = replies(RUN);
        let (gap, lost) = longest_gap(&r, 999.0, 1001.0).unwrap();
        assert!((gap - 40.0).abs() < 1e-6, "{gap}");
        assert_eq!(lost, 3, "seq 3, 4 and 5");
        let (gap, lost) = longest_gap(&r, 1000.045, 1001.0).unwrap();
        assert!((gap - 10.0).abs() < 1e-6, "{gap}");
        assert_eq!(lost, 0);
        assert_eq!(longest_gap(&r, 1000.055, 1001.0), None);
    }
}
