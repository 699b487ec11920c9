//! The `meshlink-relay` binary as an operator runs it: its metrics endpoint is off unless
//! `--metrics-listen` (or `MESHLINK_RELAY_METRICS_LISTEN`) asks for it, and then answers at the
//! address given.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A relay process, killed on drop.
struct Relay {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The binary on 127.0.0.1 (an ephemeral port), with its state and a coordinator
/// certificate in `dir`, and `env` and `args` besides; nothing else in its environment.
fn command(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Command {
    let cert = dir.join("coordinator.crt");
    let pem = rcgen::generate_simple_self_signed(vec!["meshlink-coordinator".into()])
        .unwrap()
        .cert
        .pem();
    std::fs::write(&cert, pem).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_meshlink-relay"));
    command
        .env_clear()
        .envs(env.iter().copied())
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--coordinator-cert")
        .arg(&cert)
        .args(["--listen", "127.0.0.1:0"])
        .args(args);
    command
}

/// Starts [`command`] and waits for its `relay fingerprint:` line (printed once it listens).
fn start(env: &[(&str, &str)], args: &[&str]) -> Relay {
    let dir = tempfile::tempdir().unwrap();
    let mut child = command(dir.path(), env, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run meshlink-relay");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.starts_with("relay fingerprint: ") {
                let _ = tx.send(());
            }
        }
    });
    let relay = Relay { child, _dir: dir };
    rx.recv_timeout(Duration::from_secs(20))
        .expect("the relay listens within 20 s");
    relay
}

/// The TCP ports the process listens on: its socket inodes (`/proc/PID/fd`) among the
/// listening sockets of its network namespace (`/proc/PID/net/tcp{,6}`).
fn listening_ports(pid: u32) -> BTreeSet<u16> {
    let inodes: BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy();
            Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let mut ports = BTreeSet::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address is fields[1] (ADDR:PORT in hex), st fields[3] (0A: LISTEN),
            // inode fields[9].
            if fields.len() > 9 && fields[3] == "0A" && inodes.contains(fields[9]) {
                let port = fields[1].rsplit(':').next().unwrap();
                ports.insert(u16::from_str_radix(port, 16).unwrap());
            }
        }
    }
    ports
}

/// A free loopback port (bound and let go: the relay binds it next).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET /metrics` at `127.0.0.1:port`: the whole answer.
fn get_metrics(port: u16) -> String {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: relay\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

#[test]
fn metrics_are_off_by_default() {
    let relay = start(&[], &[]);
    let ports = listening_ports(relay.child.id());
    assert_eq!(
        ports.len(),
        1,
        "only the relay's own TCP listener: {ports:?}"
    );
}

#[test]
fn metrics_listen_from_the_flag_or_the_environment() {
    let port = free_port();
    let at = format!("127.0.0.1:{port}");
    let relay = start(&[], &["--metrics-listen", &at]);
    let ports = listening_ports(relay.child.id());
    assert!(
        ports.len() == 2 && ports.contains(&port),
        "the relay's and the metrics' listeners: {ports:?}"
    );
    let answer = get_metrics(port);
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(answer.contains("meshlink_relay_build_info{"), "{answer}");
    assert!(
        answer.contains("meshlink_relay_hellos_accepted_total 0"),
        "{answer}"
    );
    drop(relay);

    let port = free_port();
    let at = format!("127.0.0.1:{port}");
    let relay = start(&[("MESHLINK_RELAY_METRICS_LISTEN", &at)], &[]);
    assert!(listening_ports(relay.child.id()).contains(&port));
    assert!(get_metrics(port).contains("meshlink_relay_frames_total 0"));
}

/// An address the metrics cannot be served at stops the relay at start, naming the flag.
#[test]
fn a_metrics_address_in_use_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let at = taken.local_addr().unwrap().to_string();
    let out = command(dir.path(), &[], &["--metrics-listen", &at])
        .output()
        .expect("run meshlink-relay");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--metrics-listen") && err.contains(&at),
        "{err}"
    );
}
