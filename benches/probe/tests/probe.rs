//! The responder and the prober together, on 127.0.0.1 with ephemeral ports.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use meshlink_probe::echo::Echo;
use meshlink_probe::prober::{self, ProberConfig};
use meshlink_probe::wire::Name;

const MS: Duration = Duration::from_millis(1);

/// A port on 127.0.0.1 where nothing listens (probably, for the length of a test).
fn closed_port() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[test]
fn every_probe_is_answered_by_the_echo() {
    let echo = Echo::bind("127.0.0.1:0".parse().unwrap(), Name::parse("vm-b").unwrap()).unwrap();
    let to = echo.local_addr().unwrap();
    let stop_echo = AtomicBool::new(false);
    let never = AtomicBool::new(false);
    let (report, answered) = thread::scope(|scope| {
        let serving = scope.spawn(|| echo.serve(&stop_echo));
        let started = Instant::now();
        let report =
            prober::run(&ProberConfig::new(to, MS, Duration::from_secs(1)), &never).unwrap();
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(1400) && took < Duration::from_secs(5),
            "{took:?}"
        );
        stop_echo.store(true, Ordering::Relaxed);
        (report, serving.join().unwrap().unwrap())
    });
    let summary = &report.summary;
    assert_eq!(summary.sent, 1000, "{summary}");
    assert_eq!(summary.answered, 1000, "{summary}");
    assert_eq!(
        (summary.lost, summary.dups, summary.strays),
        (0, 0, 0),
        "{summary}"
    );
    assert_eq!(summary.by.get("vm-b"), Some(&1000), "{summary}");
    assert_eq!(answered, 1000);
    for (seq, record) in (0..).zip(&report.records) {
        assert_eq!(record.seq, seq);
        assert_eq!(record.by.as_deref(), Some("vm-b"));
        assert!(record.recv.unwrap() >= record.sent);
    }
    // Paced by absolute deadlines: the run spans 999 intervals whatever each sleep did.
    let span = report.records[999].sent - report.records[0].sent;
    assert!((990_000_000..1_500_000_000).contains(&span), "{span} ns");
}

#[test]
fn with_no_responder_every_probe_is_lost() {
    let mut config = ProberConfig::new(closed_port(), MS, Duration::from_millis(200));
    config.grace = Duration::from_millis(100);
    let report = prober::run(&config, &AtomicBool::new(false)).unwrap();
    let summary = &report.summary;
    assert_eq!(summary.sent, 200, "{summary}");
    assert_eq!((summary.answered, summary.lost), (0, 200), "{summary}");
    assert!(summary.by.is_empty());
    assert!(report
        .records
        .iter()
        .all(|r| r.recv.is_none() && r.by.is_none()));
}

#[test]
fn stop_ends_the_run_early() {
    let mut config = ProberConfig::new(closed_port(), MS, Duration::from_secs(30));
    config.grace = Duration::ZERO;
    let stop = AtomicBool::new(false);
    let report = thread::scope(|scope| {
        scope.spawn(|| {
            thread::sleep(Duration::from_millis(100));
            stop.store(true, Ordering::Relaxed);
        });
        prober::run(&config, &stop).unwrap()
    });
    assert!(
        (50..1000).contains(&report.summary.sent),
        "{}",
        report.summary
    );
}

#[test]
fn the_binary_writes_records_and_a_summary() {
    let bin = env!("CARGO_BIN_EXE_meshlink-probe");
    let mut echo = Command::new(bin)
        .args(["echo", "--bind", "127.0.0.1:0", "--name", "vm-b"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(echo.stderr.take().unwrap());
    let mut first = String::new();
    stderr.read_line(&mut first).unwrap();
    let to = first
        .split_whitespace()
        .skip_while(|w| *w != "on")
        .nth(1)
        .unwrap_or_else(|| panic!("no address in {first:?}"))
        .to_string();

    let dir = std::env::temp_dir().join(format!("meshlink-probe-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("probe.jsonl");
    let ready = dir.join("ready");
    let send = Command::new(bin)
        .args([
            "send",
            "--to",
            &to,
            "--interval-us",
            "2000",
            "--duration-s",
            "0.3",
        ])
        .arg("--out")
        .arg(&out)
        .arg("--ready-file")
        .arg(&ready)
        .args(["--grace-ms", "100"])
        .output()
        .unwrap();
    let summary = String::from_utf8_lossy(&send.stderr);
    assert!(send.status.success(), "{summary}");
    assert!(
        summary.contains("sent 150, answered 150, lost 0"),
        "{summary}"
    );
    assert!(summary.contains("by vm-b 150"), "{summary}");
    assert!(ready.exists());
    let records = std::fs::read_to_string(&out).unwrap();
    assert_eq!(records.lines().count(), 150);
    let first: serde_json::Value = serde_json::from_str(records.lines().next().unwrap()).unwrap();
    assert_eq!(first["seq"], 0);
    assert_eq!(first["by"], "vm-b");
    assert!(first["sent"].as_u64().unwrap() <= first["recv"].as_u64().unwrap());
    std::fs::remove_dir_all(&dir).unwrap();

    kill(Pid::from_raw(echo.id() as i32), Signal::SIGTERM).unwrap();
    assert_eq!(echo.wait().unwrap().code(), Some(0));
    let mut last = String::new();
    stderr.read_line(&mut last).unwrap();
    assert!(last.contains("answered 150 probes"), "{last:?}");
}
