//! `iperf3` through the tunnel: a server bound to one agent's overlay address, a single-stream
//! client in the other agent's namespace, and what its JSON report says.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use meshlink_tests::{wait_until, NsRef, Process};

/// The server's TCP port (each agent has a namespace of its own, so a fixed port is safe).
pub const PORT: u16 = 5201;

/// What one client run measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Throughput {
    /// Received rate (`end.sum_received`), Mbit/s.
    pub mbit_s: f64,
    /// TCP retransmissions the sender counted (`end.sum_sent.retransmits`).
    pub retransmits: Option<u64>,
}

impl Throughput {
    /// Reads `iperf3 -J` output.
    ///
    /// # Errors
    /// When it is not JSON, reports an error, or lacks the received rate.
    pub fn of(json: &str) -> Result<Throughput, String> {
        let v: Value = serde_json::from_str(json).map_err(|e| {
            let start: String = json.chars().take(300).collect();
            format!("iperf3 printed no JSON ({e}): {start}")
        })?;
        if let Some(error) = v.get("error").and_then(Value::as_str) {
            return Err(format!("iperf3: {error}"));
        }
        let bps = v
            .pointer("/end/sum_received/bits_per_second")
            .and_then(Value::as_f64)
            .ok_or("iperf3's report has no end.sum_received.bits_per_second")?;
        Ok(Throughput {
            mbit_s: bps / 1e6,
            retransmits: v
                .pointer("/end/sum_sent/retransmits")
                .and_then(Value::as_u64),
        })
    }
}

/// Starts `iperf3 -s` in `ns` bound to `bind`, and waits until it listens.
///
/// # Errors
/// When it does not listen within 10 s.
pub fn server(ns: &NsRef, bind: Ipv4Addr, log: &Path) -> Result<Process, String> {
    let process = ns.spawn(
        "iperf3",
        &["-s", "-B", &bind.to_string(), "-p", &PORT.to_string()],
        log,
    );
    // iperf3 block-buffers its banner into the log: ask the socket table instead.
    let filter = format!("sport = :{PORT}");
    wait_until(
        Duration::from_secs(10),
        "the iperf3 server to listen",
        || {
            let out = ns.exec("ss", &["-Hltn", &filter]);
            String::from_utf8_lossy(&out.stdout)
                .contains(&format!(":{PORT}"))
                .then_some(())
        },
    )
    .map_err(|e| format!("{e}: {}", process.log_tail(5)))?;
    Ok(process)
}

/// `iperf3 -c TO -t SECONDS -O 1 -J` (one stream, the first second left out) from `ns`.
///
/// # Errors
/// As [`Throughput::of`].
pub fn client(ns: &NsRef, to: Ipv4Addr, seconds: u32) -> Result<Throughput, String> {
    let out = ns.exec(
        "iperf3",
        &[
            "-c",
            &to.to_string(),
            "-p",
            &PORT.to_string(),
            "-t",
            &seconds.to_string(),
            "-O",
            "1",
            "-J",
        ],
    );
    Throughput::of(&String::from_utf8_lossy(&out.stdout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_received_rate_and_retransmits() {
        let t = Throughput::of(
            r#"{"start": {}, "end": {"sum_sent": {"bits_per_second": 2.1e8, "retransmits": 12},
                "sum_received": {"bits_per_second": 2.0e8}}}"#,
        )
        .unwrap();
        assert_eq!(
            t,
            Throughput {
                mbit_s: 200.0,
                retransmits: Some(12)
            }
        );
        let e = Throughput::of(r#"{"error": "unable to connect to server"}"#).unwrap_err();
        assert!(e.contains("unable to connect"), "{e}");
        assert!(Throughput::of("garbage").is_err());
        assert!(Throughput::of("{}").is_err());
    }
}
