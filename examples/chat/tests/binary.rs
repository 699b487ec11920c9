//! The `meshlink-chat` binary as a harness drives it: stdin, stdout, signals, exit codes. On
//! 127.0.0.1 with ephemeral ports.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixListener;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use meshlink_uapi::handover::AgentEvent;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const BIN: &str = env!("CARGO_BIN_EXE_meshlink-chat");
const WAIT: Duration = Duration::from_secs(10);

/// A running `meshlink-chat` with its stdout read line by line on a thread.
struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    fn start(args: &[&str]) -> Proc {
        let mut child = Command::new(BIN)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Proc {
            child,
            stdin,
            lines,
        }
    }

    /// Waits for a stdout line containing `text` and returns it.
    fn expect(&self, text: &str) -> String {
        let mut seen = Vec::new();
        loop {
            match self.lines.recv_timeout(WAIT) {
                Ok(line) if line.contains(text) => return line,
                Ok(line) => seen.push(line),
                Err(e) => panic!("no line with {text:?} ({e}); saw {seen:?}"),
            }
        }
    }

    fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }

    /// Closes stdin and waits for the exit code.
    fn finish(mut self) -> i32 {
        self.stdin.take();
        for _ in 0..(WAIT.as_millis() / 20) {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().expect("exited, not killed");
            }
            thread::sleep(Duration::from_millis(20));
        }
        panic!("meshlink-chat did not exit");
    }
}

/// A test that fails (or ends without [`Proc::finish`]) leaves no `meshlink-chat` running.
impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn clients_and_server_through_stdin_and_stdout() {
    let server = Proc::start(&["server", "--listen", "127.0.0.1:0", "--name", "vm-a"]);
    let listening = server.expect("listening on ");
    let addr = listening
        .split("listening on ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .to_string();

    let mut alice = Proc::start(&["client", "--server", &addr, "--nick", "alice"]);
    alice.expect(&format!("* connected to {addr}"));
    alice.expect("* welcome to the room on vm-a");
    server.expect("alice joined from 127.0.0.1:");
    let bob = Proc::start(&[
        "client",
        "--server",
        &addr,
        "--nick",
        "bob",
        "--linger-ms",
        "100",
    ]);
    bob.expect("* welcome to the room on vm-a");
    alice.expect("* bob joined");
    alice.say("hello from alice");
    bob.expect("alice: hello from alice");

    server.signal(Signal::SIGTERM);
    alice.expect("* server shutting down");
    alice.expect("* disconnected: ");
    assert_eq!(server.finish(), 0);
    assert_eq!(alice.finish(), 0);
    assert_eq!(bob.finish(), 0);
}

#[test]
fn sigint_stops_the_server() {
    let server = Proc::start(&["server", "--listen", "127.0.0.1:0"]);
    server.expect("listening on ");
    server.signal(Signal::SIGINT);
    server.expect("stopped");
    assert_eq!(server.finish(), 0);
}

#[test]
fn an_address_in_use_is_one_error_line_and_status_1() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut child = Command::new(BIN)
        .args(["server", "--listen", &addr])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
}

#[test]
fn a_bad_nick_is_a_usage_error() {
    let status = Command::new(BIN)
        .args(["client", "--server", "127.0.0.1:9", "--nick", "no spaces"])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(2));
}

#[test]
fn a_migrating_server_registers_and_takes_handovers_only_from_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("mesh0.sock");
    let agents = UnixListener::bind(&socket).unwrap();
    let port = TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let server = Proc::start(&[
        "server",
        "--listen",
        "127.0.0.1:0",
        "--name",
        "vm-c",
        "--migrate",
        "chat",
        "--agent-socket",
        socket.to_str().unwrap(),
        "--handover-port",
        &port,
    ]);
    server.expect("listening on 127.0.0.1:");
    server.expect(&format!(
        "migrate: listening for handovers of chat on 0.0.0.0:{port}"
    ));

    let (agent, _) = agents.accept().unwrap();
    let mut registration = String::new();
    let mut reader = BufReader::new(agent.try_clone().unwrap());
    while !registration.ends_with("\n\n") {
        reader.read_line(&mut registration).unwrap();
    }
    assert_eq!(registration, "handover=chat\n\n");
    let mut agent = agent;
    agent.write_all(b"errno=0\n\n").unwrap();
    let holder = AgentEvent::Holder {
        workload: "chat".into(),
        generation: 1,
        holder: Some(("vm-a".into(), "127.0.0.2".parse().unwrap())),
    };
    agent.write_all(holder.render().as_bytes()).unwrap();
    server.expect(&format!(
        "migrate: registered for chat with the agent at {}",
        socket.display()
    ));
    server.expect("migrate: holder of chat is vm-a (127.0.0.2) at generation 1");

    let stranger = TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap())).unwrap();
    let refused = server.expect("migrate: handover from 127.0.0.1:");
    assert!(
        refused.ends_with("refused: not the holder (vm-a at 127.0.0.2)"),
        "{refused}"
    );
    drop(stranger);

    server.signal(Signal::SIGTERM);
    server.expect("stopped");
    assert_eq!(server.finish(), 0);
}

#[test]
fn migration_flags_need_migrate() {
    for flags in [
        &["--handover-port", "7071"][..],
        &["--agent-socket", "/tmp/agent.sock"][..],
    ] {
        let status = Command::new(BIN)
            .args(["server", "--listen", "127.0.0.1:0"])
            .args(flags)
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert_eq!(status.code(), Some(2), "{flags:?}");
    }
}
