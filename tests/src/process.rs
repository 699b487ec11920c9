//! Long-running processes started by a test, ended by their pid when the guard drops.
//!
//! A [`Process`] sends its stderr (and, unless its stdout is read line by line, its stdout) to
//! a log file. On drop it stops the process if it still runs: SIGTERM, then SIGKILL after a
//! grace period. If the test is panicking, it also prints the tail of the log, so the failure
//! message comes with what the process said.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long [`Process::terminate`] waits after SIGTERM before sending SIGKILL.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);

/// How many lines of a log [`Process`] prints when a test fails.
const LOG_TAIL_LINES: usize = 80;

/// Where a spawned process's stdout goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stdout {
    /// Into the log file, with stderr.
    Log,
    /// Line by line to [`Process::next_line`]; each line is also appended to the log.
    Lines,
}

/// A child process owned by a test. Dropping it ends the process (by pid) if still running.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Child,
    exit: Option<ExitStatus>,
    log: PathBuf,
    lines: Option<mpsc::Receiver<String>>,
    stdin: Option<ChildStdin>,
    grace: Duration,
    /// Whether the test ended it (by signal) rather than the process exiting on its own or
    /// being ended by someone else: failure reports say which, since a daemon that died
    /// mid-test looks like a network fault otherwise.
    ended_by_test: bool,
}

impl Process {
    /// Starts `cmd`, logging to `log` (created or truncated). `name` labels the process in
    /// messages.
    ///
    /// # Panics
    /// When the log cannot be created or the command cannot be started.
    pub fn spawn(name: &str, cmd: Command, log: &Path, stdout: Stdout) -> Process {
        Self::start(name, cmd, log, stdout, false)
    }

    /// Like [`Process::spawn`] with stdout read line by line, and a pipe on stdin that
    /// [`Process::write_line`] writes to (an interactive program such as a chat client).
    ///
    /// # Panics
    /// As [`Process::spawn`].
    pub fn spawn_interactive(name: &str, cmd: Command, log: &Path) -> Process {
        Self::start(name, cmd, log, Stdout::Lines, true)
    }

    fn start(name: &str, mut cmd: Command, log: &Path, stdout: Stdout, stdin: bool) -> Process {
        let file = File::create(log)
            .unwrap_or_else(|e| panic!("cannot create log {}: {e}", log.display()));
        let stderr = file.try_clone().expect("clone log file handle");
        cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stderr(stderr);
        match stdout {
            Stdout::Log => cmd.stdout(file),
            Stdout::Lines => cmd.stdout(Stdio::piped()),
        };
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        let stdin = child.stdin.take();
        let lines = child.stdout.take().map(|out| {
            let (tx, rx) = mpsc::channel();
            let mut copy = OpenOptions::new().append(true).open(log).ok();
            thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if let Some(copy) = copy.as_mut() {
                        let _ = writeln!(copy, "{line}");
                    }
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            rx
        });
        Process {
            name: name.to_owned(),
            child,
            exit: None,
            log: log.to_owned(),
            lines,
            stdin,
            grace: DEFAULT_GRACE,
            ended_by_test: false,
        }
    }

    /// Writes one line to the process's stdin (see [`Process::spawn_interactive`]).
    ///
    /// # Panics
    /// When it has no stdin pipe or the write fails.
    pub fn write_line(&mut self, line: &str) {
        let name = self.name.clone();
        let stdin = self
            .stdin
            .as_mut()
            .unwrap_or_else(|| panic!("{name} has no stdin pipe"));
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("writing to {name}: {e}"));
    }

    /// Reads stdout lines until one contains `needle`, for at most `timeout`; returns it.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.next_line(left) {
                Some(line) if line.contains(needle) => return Some(line),
                Some(_) => {}
                None => return None,
            }
        }
    }

    /// The label given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Each of the process's threads: its name and its scheduling policy (see
    /// [`thread_policies`]).
    pub fn thread_policies(&self) -> Vec<(String, u32)> {
        thread_policies(self.pid())
    }

    /// The log file's path.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The next stdout line, waiting at most `timeout`. `None` on timeout, at end of output,
    /// or when stdout was not spawned as [`Stdout::Lines`].
    pub fn next_line(&self, timeout: Duration) -> Option<String> {
        self.lines.as_ref()?.recv_timeout(timeout).ok()
    }

    /// The exit status if the process has exited (reaping it), `None` while it runs.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    /// Waits up to `timeout` for the process to exit on its own.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` to the process by pid, unless it has already been reaped (whose pid the
    /// system may have reused).
    ///
    /// # Panics
    /// Never for a real pid (they fit in `i32`).
    pub fn signal(&mut self, signal: Signal) {
        if self.try_wait().is_none() {
            self.ended_by_test |=
                matches!(signal, Signal::SIGTERM | Signal::SIGKILL | Signal::SIGINT);
            let pid = Pid::from_raw(i32::try_from(self.pid()).expect("pid fits in i32"));
            let _ = kill(pid, signal);
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited after the grace period; returns the status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        if let Some(status) = self.wait_timeout(self.grace) {
            return status;
        }
        eprintln!(
            "{} (pid {}) ignored SIGTERM for {:?}: sending SIGKILL",
            self.name,
            self.pid(),
            self.grace
        );
        self.kill()
    }

    /// SIGKILL, then reaps the process; returns the status.
    ///
    /// # Panics
    /// When waiting for the child fails, which only happens if it was already reaped elsewhere.
    pub fn kill(&mut self) -> ExitStatus {
        if let Some(status) = self.try_wait() {
            return status;
        }
        self.ended_by_test = true;
        let _ = self.child.kill();
        let status = self.child.wait().expect("wait for a killed child");
        self.exit = Some(status);
        status
    }

    /// Sets how long [`Process::terminate`] waits before SIGKILL.
    pub fn set_grace(&mut self, grace: Duration) {
        self.grace = grace;
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let status = match self.try_wait() {
            Some(status) => status,
            None => self.terminate(),
        };
        if thread::panicking() {
            let how = if self.ended_by_test {
                format!("ended by the test: {status}")
            } else {
                format!("exited before the test ended it: {status}")
            };
            eprintln!(
                "---- {} (pid {}, {how}) log {} ----\n{}\n---- end of {} log ----",
                self.name,
                self.pid(),
                self.log.display(),
                self.log_tail(LOG_TAIL_LINES),
                self.name
            );
        }
    }
}

/// `SCHED_OTHER`: normal priority.
pub const SCHED_OTHER: u32 = 0;
/// `SCHED_RR`: real-time round robin.
pub const SCHED_RR: u32 = 2;

/// Each thread of process `pid`: its name and its scheduling policy (`/proc/PID/task/*/stat`,
/// field 41). Threads that exit meanwhile are left out.
///
/// # Panics
/// When the process does not exist or a stat line does not parse.
pub fn thread_policies(pid: u32) -> Vec<(String, u32)> {
    let mut threads = Vec::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap_or_else(|e| panic!("process {pid}: {e}"));
    for task in tasks {
        let path = task.expect("a task entry").path();
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
            continue;
        };
        // The name is in parentheses and may hold spaces: fields are counted after it.
        let (head, rest) = stat.rsplit_once(") ").expect("stat has a name");
        let name = head.split_once(" (").expect("stat has a pid").1.to_string();
        let policy = rest
            .split_whitespace()
            .nth(41 - 3)
            .and_then(|f| f.parse().ok())
            .unwrap_or_else(|| panic!("no policy in {stat}"));
        threads.push((name, policy));
    }
    threads
}
