//! The prober: one probe every interval to one address, and a record of every answer.
//!
//! ```text
//! sending thread    probe `seq` at start + seq × interval (absolute deadlines: a late
//!                   probe does not push the later ones back), until the duration is over or
//!                   `stop` is set; touches the ready file after the first probe
//! receiving thread  first answer per seq, with its receive time and responder; duplicates
//!                   and datagrams that are no answer are only counted
//! then              wait `grace` for late answers, stop receiving, merge into one record
//!                   per probe ([`merge`])
//! ```
//!
//! The socket is connected to the target, so the kernel delivers only datagrams from the
//! target's address and port. Sending goes on when a send fails (an unreachable route while
//! the address moves, an ICMP error from an earlier probe): the probe counts as sent and lost.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::wire::{unix_now_ns, Answer, Name, Probe};

/// How often the receiving thread looks at its stop flag, and the longest sleep of the sending
/// thread between two looks at `stop`.
const POLL: Duration = Duration::from_millis(20);

/// What the prober is told.
#[derive(Debug, Clone)]
pub struct ProberConfig {
    /// The target: the workload address and the responder's port.
    pub to: SocketAddr,
    /// The time between two probes.
    pub interval: Duration,
    /// How long to send; `duration / interval` probes are sent unless stopped early.
    pub duration: Duration,
    /// How long to wait for late answers after the last probe (500 ms).
    pub grace: Duration,
    /// A file to create once the first probe is sent.
    pub ready_file: Option<PathBuf>,
}

impl ProberConfig {
    /// One probe every `interval` to `to` for `duration`, with the default grace and no ready
    /// file.
    pub fn new(to: SocketAddr, interval: Duration, duration: Duration) -> Self {
        ProberConfig {
            to,
            interval,
            duration,
            grace: Duration::from_millis(500),
            ready_file: None,
        }
    }
}

/// One probe's fate, as one line of the output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Record {
    /// The probe's number.
    pub seq: u64,
    /// When it was sent, in Unix nanoseconds (`CLOCK_REALTIME`).
    pub sent: u64,
    /// When its first answer arrived, in Unix nanoseconds; `None` if none did.
    pub recv: Option<u64>,
    /// The responder's name from the first answer; `None` if none arrived.
    pub by: Option<String>,
}

/// Totals over a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Probes sent (including those whose send failed).
    pub sent: u64,
    /// Probes answered at least once.
    pub answered: u64,
    /// Probes never answered.
    pub lost: u64,
    /// Answers beyond the first to a probe.
    pub dups: u64,
    /// Datagrams that were no answer to a probe of this run.
    pub strays: u64,
    /// Probes whose send failed.
    pub send_errors: u64,
    /// How late the 99th percentile probe left after its deadline, in microseconds (pacing
    /// accuracy: mostly how late the sending thread's sleep woke up).
    pub late_p99_us: u64,
    /// The most a probe left after its deadline, in microseconds.
    pub late_max_us: u64,
    /// Answered probes by responder name.
    pub by: BTreeMap<String, u64>,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sent {}, answered {}, lost {}, dups {}, strays {}, send errors {}, late p99 {} us, max {} us; by",
            self.sent,
            self.answered,
            self.lost,
            self.dups,
            self.strays,
            self.send_errors,
            self.late_p99_us,
            self.late_max_us
        )?;
        if self.by.is_empty() {
            return write!(f, " nobody");
        }
        let mut sep = " ";
        for (name, count) in &self.by {
            write!(f, "{sep}{name} {count}")?;
            sep = ", ";
        }
        Ok(())
    }
}

/// The result of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// One record per probe sent, by seq.
    pub records: Vec<Record>,
    /// The totals.
    pub summary: Summary,
}

impl Report {
    /// Writes one JSON object per line and probe:
    /// `{"seq":0,"sent":...,"recv":...|null,"by":"vm-b"|null}`.
    ///
    /// # Errors
    /// When writing fails.
    pub fn write_jsonl(&self, mut out: impl Write) -> io::Result<()> {
        for record in &self.records {
            serde_json::to_writer(&mut out, record)?;
            out.write_all(b"\n")?;
        }
        out.flush()
    }
}

/// What the sending thread saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sent {
    /// The send time of probe `seq`, at index `seq`.
    pub times: Vec<u64>,
    /// Sends that failed.
    pub errors: u64,
    /// How late each probe left after its deadline, in microseconds, by seq.
    pub late_us: Vec<u64>,
}

/// The first answer to a probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirstAnswer {
    /// When it arrived, in Unix nanoseconds.
    pub recv: u64,
    /// The send time the answer carries.
    pub sent: u64,
    /// Who answered.
    pub by: Name,
}

/// What the receiving thread saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Received {
    /// The first answer per seq.
    pub first: HashMap<u64, FirstAnswer>,
    /// Answers to a seq already answered.
    pub dups: u64,
    /// Datagrams that were not answers.
    pub strays: u64,
}

/// Probes `config.to` as configured, or until `stop` is set.
///
/// # Errors
/// When the socket cannot be set up or the ready file cannot be created (nothing is measured
/// then); failed sends are counted, not errors.
pub fn run(config: &ProberConfig, stop: &AtomicBool) -> io::Result<Report> {
    let local: SocketAddr = match config.to {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local)?;
    socket.connect(config.to)?;
    let receiving = socket.try_clone()?;
    receiving.set_read_timeout(Some(POLL))?;
    let done = AtomicBool::new(false);
    thread::scope(|scope| {
        let receiver = thread::Builder::new()
            .name("probe-recv".into())
            .spawn_scoped(scope, || receive(&receiving, &done))?;
        let sent = send(&socket, config, stop);
        if sent.is_ok() {
            thread::sleep(config.grace);
        }
        done.store(true, Ordering::Relaxed);
        let received = receiver
            .join()
            .map_err(|_| io::Error::other("the receiving thread panicked"))?;
        Ok(merge(sent?, received))
    })
}

/// The sending loop.
fn send(socket: &UdpSocket, config: &ProberConfig, stop: &AtomicBool) -> io::Result<Sent> {
    let interval = config.interval.max(Duration::from_nanos(1));
    let count = u64::try_from(config.duration.as_nanos() / interval.as_nanos()).unwrap_or(u64::MAX);
    let mut sent = Sent {
        times: Vec::with_capacity(count.min(1 << 24) as usize),
        late_us: Vec::with_capacity(count.min(1 << 24) as usize),
        errors: 0,
    };
    let start = Instant::now();
    for seq in 0..count {
        let deadline = start + interval.saturating_mul(u32::try_from(seq).unwrap_or(u32::MAX));
        let now = loop {
            if stop.load(Ordering::Relaxed) {
                return Ok(sent);
            }
            let now = Instant::now();
            if now >= deadline {
                break now;
            }
            thread::sleep((deadline - now).min(POLL));
        };
        sent.late_us.push((now - deadline).as_micros() as u64);
        let sent_unix_ns = unix_now_ns();
        if socket.send(&Probe { seq, sent_unix_ns }.encode()).is_err() {
            sent.errors += 1;
        }
        sent.times.push(sent_unix_ns);
        if seq == 0 {
            if let Some(path) = &config.ready_file {
                File::create(path)?;
            }
        }
    }
    Ok(sent)
}

/// The receiving loop, until `done` is set.
fn receive(socket: &UdpSocket, done: &AtomicBool) -> Received {
    let mut received = Received::default();
    let mut buf = [0u8; 2048];
    while !done.load(Ordering::Relaxed) {
        // Timeouts, and ICMP errors that a connected socket reports, are all the same here.
        let Ok(len) = socket.recv(&mut buf) else {
            continue;
        };
        let now = unix_now_ns();
        let Some(answer) = Answer::parse(&buf[..len]) else {
            received.strays += 1;
            continue;
        };
        match received.first.entry(answer.probe.seq) {
            Entry::Occupied(_) => received.dups += 1,
            Entry::Vacant(entry) => {
                entry.insert(FirstAnswer {
                    recv: now,
                    sent: answer.probe.sent_unix_ns,
                    by: answer.by,
                });
            }
        }
    }
    received
}

/// One record per probe sent, and the totals. An answer whose probe was not sent by this run
/// (unknown seq, or a send time that differs from ours) counts as a stray.
pub fn merge(sent: Sent, mut received: Received) -> Report {
    let mut late = sent.late_us;
    late.sort_unstable();
    let mut summary = Summary {
        sent: sent.times.len() as u64,
        dups: received.dups,
        strays: received.strays,
        send_errors: sent.errors,
        late_p99_us: late.get(late.len() * 99 / 100).copied().unwrap_or(0),
        late_max_us: late.last().copied().unwrap_or(0),
        ..Summary::default()
    };
    let records = (0u64..)
        .zip(sent.times)
        .map(|(seq, sent_ns)| {
            let answer = match received.first.remove(&seq) {
                Some(answer) if answer.sent == sent_ns => Some(answer),
                Some(_) => {
                    summary.strays += 1;
                    None
                }
                None => None,
            };
            let (recv, by) = match answer {
                Some(answer) => {
                    summary.answered += 1;
                    let by = answer.by.as_str().to_string();
                    *summary.by.entry(by.clone()).or_default() += 1;
                    (Some(answer.recv), Some(by))
                }
                None => (None, None),
            };
            Record {
                seq,
                sent: sent_ns,
                recv,
                by,
            }
        })
        .collect();
    summary.lost = summary.sent - summary.answered;
    // What is left answered no probe of ours.
    summary.strays += received.first.len() as u64;
    Report { records, summary }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(recv: u64, sent: u64, by: &str) -> FirstAnswer {
        FirstAnswer {
            recv,
            sent,
            by: Name::parse(by).unwrap(),
        }
    }

    #[test]
    fn merges_answers_into_records() {
        let sent = Sent {
            times: vec![100, 200, 300, 400],
            errors: 1,
            late_us: vec![5, 42, 7, 9],
        };
        let received = Received {
            first: HashMap::from([
                (0, answer(150, 100, "vm-a")),
                // An answer to another run's probe 1.
                (1, answer(250, 999, "vm-a")),
                (3, answer(450, 400, "vm-b")),
                // A seq never sent.
                (9, answer(950, 900, "vm-b")),
            ]),
            dups: 2,
            strays: 1,
        };
        let report = merge(sent, received);
        let record = |seq, sent, recv: Option<u64>, by: Option<&str>| Record {
            seq,
            sent,
            recv,
            by: by.map(str::to_string),
        };
        assert_eq!(
            report.records,
            [
                record(0, 100, Some(150), Some("vm-a")),
                record(1, 200, None, None),
                record(2, 300, None, None),
                record(3, 400, Some(450), Some("vm-b")),
            ]
        );
        assert_eq!(
            report.summary,
            Summary {
                sent: 4,
                answered: 2,
                lost: 2,
                dups: 2,
                strays: 3,
                send_errors: 1,
                late_p99_us: 42,
                late_max_us: 42,
                by: BTreeMap::from([("vm-a".into(), 1), ("vm-b".into(), 1)]),
            }
        );
        assert_eq!(
            report.summary.to_string(),
            "sent 4, answered 2, lost 2, dups 2, strays 3, send errors 1, late p99 42 us, max 42 us; by vm-a 1, vm-b 1"
        );
        let mut out = Vec::new();
        report.write_jsonl(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], r#"{"seq":0,"sent":100,"recv":150,"by":"vm-a"}"#);
        assert_eq!(lines[1], r#"{"seq":1,"sent":200,"recv":null,"by":null}"#);
        assert_eq!(lines.len(), 4);
    }
}
