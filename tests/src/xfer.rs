//! TCP transfers across a tunnel, checked end to end by SHA-256.
//!
//! Both ends run the `meshlink-xfer` binary of this crate inside their namespaces: the sender
//! streams pseudo-random bytes and hashes what it wrote, the receiver hashes what it read, and
//! the test compares the two. (Why a binary of our own rather than `nc` or a `python3`
//! one-liner: see `src/bin/meshlink-xfer.rs`.)

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::netns::NsRef;
use crate::process::{Process, Stdout};
use crate::scratch::ScratchDir;
use crate::{unique_name, xfer_bin};

/// How long a transfer may make no progress before its ends give up.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// What one end of a transfer reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Transfer {
    /// Bytes written (sender) or read (receiver).
    pub bytes: u64,
    /// SHA-256 of those bytes, lowercase hex.
    pub sha256: String,
    /// Seconds from connection to end of stream.
    pub secs: f64,
}

impl Transfer {
    /// Parses the `done bytes=N sha256=HEX secs=F` line.
    pub fn parse(line: &str) -> Option<Transfer> {
        let mut rest = line.strip_prefix("done ")?.split_whitespace();
        let mut field = |name: &str| rest.next()?.strip_prefix(name).map(str::to_owned);
        Some(Transfer {
            bytes: field("bytes=")?.parse().ok()?,
            sha256: field("sha256=")?,
            secs: field("secs=")?.parse().ok()?,
        })
    }

    /// Throughput in Mbit/s.
    pub fn mbit_per_sec(&self) -> f64 {
        self.bytes as f64 * 8.0 / 1e6 / self.secs.max(1e-9)
    }
}

/// Waits for `process` to exit successfully and returns its `done` report.
fn finish(process: &mut Process, timeout: Duration) -> Transfer {
    let Some(status) = process.wait_timeout(timeout) else {
        panic!(
            "{} did not finish within {timeout:?}; log:\n{}",
            process.name(),
            process.log_tail(40)
        );
    };
    assert!(
        status.success(),
        "{} failed ({status}); log:\n{}",
        process.name(),
        process.log_tail(40)
    );
    while let Some(line) = process.next_line(Duration::from_secs(5)) {
        if let Some(transfer) = Transfer::parse(&line) {
            return transfer;
        }
    }
    panic!(
        "{} printed no `done` line; log:\n{}",
        process.name(),
        process.log()
    );
}

/// The receiving end: listens on an ephemeral port, reads one connection to its end.
#[derive(Debug)]
pub struct XferReceiver {
    process: Process,
    addr: SocketAddr,
}

impl XferReceiver {
    /// Starts a receiver in `ns` listening on `ip` (an ephemeral port) and waits until it is
    /// listening. It gives up `timeout` after starting.
    ///
    /// # Panics
    /// When it does not report listening within 10 s.
    pub fn start(ns: &NsRef, dir: &ScratchDir, ip: IpAddr, timeout: Duration) -> XferReceiver {
        let mut cmd = ns.daemon_command(xfer_bin());
        cmd.arg("recv")
            .args(["--listen", &SocketAddr::new(ip, 0).to_string()])
            .args(["--timeout", &timeout.as_secs_f64().to_string()])
            .args(["--idle", &IDLE_TIMEOUT.as_secs_f64().to_string()]);
        let log = dir.join(&format!("{}.xfer-recv.log", unique_name("x")));
        let process = Process::spawn(
            &format!("xfer receiver in {}", ns.name()),
            cmd,
            &log,
            Stdout::Lines,
        );
        let line = process.next_line(Duration::from_secs(10));
        let addr = line
            .as_deref()
            .and_then(|l| l.strip_prefix("listening "))
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "receiver did not start listening: {line:?}\n{}",
                    process.log()
                )
            });
        XferReceiver { process, addr }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits for the transfer to end and returns what was received.
    ///
    /// # Panics
    /// When the receiver fails or does not finish within `timeout`; the message has its log.
    pub fn finish(&mut self, timeout: Duration) -> Transfer {
        finish(&mut self.process, timeout)
    }
}

/// The sending end.
#[derive(Debug)]
pub struct XferSender {
    process: Process,
}

impl XferSender {
    /// Starts sending `bytes` pseudo-random bytes from `ns` to `to`, at most `rate_mbit` Mbit/s
    /// if given. The sender retries connecting (the tunnel may still be handshaking) and gives
    /// up `timeout` after starting.
    pub fn start(
        ns: &NsRef,
        dir: &ScratchDir,
        to: SocketAddr,
        bytes: u64,
        rate_mbit: Option<f64>,
        timeout: Duration,
    ) -> XferSender {
        let mut cmd = ns.daemon_command(xfer_bin());
        cmd.arg("send")
            .args(["--connect", &to.to_string()])
            .args(["--bytes", &bytes.to_string()])
            .args(["--timeout", &timeout.as_secs_f64().to_string()])
            .args(["--idle", &IDLE_TIMEOUT.as_secs_f64().to_string()]);
        if let Some(rate) = rate_mbit {
            cmd.args(["--rate-mbit", &rate.to_string()]);
        }
        let log = dir.join(&format!("{}.xfer-send.log", unique_name("x")));
        let process = Process::spawn(
            &format!("xfer sender in {}", ns.name()),
            cmd,
            &log,
            Stdout::Lines,
        );
        XferSender { process }
    }

    /// Whether it is still sending.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// Waits for the transfer to end and returns what was sent.
    ///
    /// # Panics
    /// When the sender fails or does not finish within `timeout`; the message has its log.
    pub fn finish(&mut self, timeout: Duration) -> Transfer {
        finish(&mut self.process, timeout)
    }
}

/// Sends `bytes` from `from` to a receiver at `to_ip` in `to`, and checks that the receiver got
/// exactly the bytes sent (count and SHA-256). Returns the receiver's report.
///
/// # Panics
/// When either end fails, `timeout` passes, or the counts or digests differ.
pub fn transfer_checked(
    from: &NsRef,
    to: &NsRef,
    to_ip: IpAddr,
    dir: &ScratchDir,
    bytes: u64,
    timeout: Duration,
) -> Transfer {
    let mut receiver = XferReceiver::start(to, dir, to_ip, timeout);
    let mut sender = XferSender::start(from, dir, receiver.addr(), bytes, None, timeout);
    let sent = sender.finish(timeout);
    let received = receiver.finish(Duration::from_secs(10));
    assert_eq!(sent.bytes, bytes, "sender wrote a different count");
    assert_eq!(
        received.bytes, sent.bytes,
        "received byte count differs from sent"
    );
    assert_eq!(
        received.sha256, sent.sha256,
        "SHA-256 of received bytes differs from sent"
    );
    received
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_done_line() {
        let t = Transfer::parse("done bytes=1024 sha256=abcd secs=0.500").unwrap();
        assert_eq!(t.bytes, 1024);
        assert_eq!(t.sha256, "abcd");
        assert!((t.mbit_per_sec() - 0.016384).abs() < 1e-9);
        assert_eq!(Transfer::parse("listening 1.2.3.4:5"), None);
    }
}
