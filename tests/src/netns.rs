//! Network namespaces as simulated hosts, and veth pairs as the wires between them.
//!
//! A [`Netns`] owns a namespace and deletes it on drop; the veths and TUN devices inside go
//! with it. [`NsRef`] is a cheap, cloneable name of a namespace for running commands in it, held
//! by the process guards that must keep using the namespace.

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::process::{Process, Stdout};
use crate::unique_name;
use crate::wait::{wait_until, TimedOut};

/// Runs a command in the host's own namespace and returns its stdout.
///
/// # Panics
/// When the command cannot start or exits non-zero; the message has its stderr.
pub fn host_run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> String {
    let mut cmd = Command::new(program);
    cmd.args(args);
    checked(&mut cmd)
}

/// Runs `cmd` to completion, returning stdout, or panics describing the failure.
fn checked(cmd: &mut Command) -> String {
    let output = output(cmd);
    assert!(
        output.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout).trim_end(),
        String::from_utf8_lossy(&output.stderr).trim_end()
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

/// The name of a namespace, for running commands in it. It does not own the namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NsRef {
    name: String,
}

impl NsRef {
    /// The namespace's name as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `f` on a thread of its own inside the namespace, and returns what it returns:
    /// sockets made there belong to the namespace for good, whichever thread uses them later.
    ///
    /// # Errors
    /// When the namespace cannot be entered, or the thread panicked.
    pub fn within<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::io::Result<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path)?;
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| std::io::Error::other(format!("setns {path}: {e}")))?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|_| {
            Err(std::io::Error::other(
                "the thread in the namespace panicked",
            ))
        })
    }

    /// A `Command` that runs `program` inside the namespace (`ip netns exec NS program`).
    ///
    /// `ip netns exec` replaces itself with `program`, so the spawned child's pid is the
    /// program's own pid: signals sent to it reach the program.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Like [`NsRef::command`], for long-running programs: the program also gets SIGTERM when
    /// the thread that spawns it dies (`setpriv --pdeathsig TERM`, which then replaces itself
    /// with the program, keeping the pid). Guards end processes normally; this covers a test
    /// run that is itself killed (Ctrl-C), which runs no guards.
    pub fn daemon_command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = self.command("setpriv");
        cmd.args(["--pdeathsig", "TERM", "--"]).arg(program);
        cmd
    }

    /// Starts a long-running `program args` in the namespace as a [`Process`] guard (ended by
    /// pid on drop), logging its stdout and stderr to `log`.
    ///
    /// # Panics
    /// When it cannot be started.
    pub fn spawn<S: AsRef<OsStr>>(
        &self,
        program: &str,
        args: &[S],
        log: &std::path::Path,
    ) -> Process {
        let mut cmd = self.daemon_command(program);
        cmd.args(args);
        Process::spawn(
            &format!("{program} in {}", self.name),
            cmd,
            log,
            Stdout::Log,
        )
    }

    /// Runs `program args` in the namespace and returns its full output, whatever its status.
    pub fn exec<S: AsRef<OsStr>>(&self, program: &str, args: &[S]) -> Output {
        let mut cmd = self.command(program);
        cmd.args(args);
        output(&mut cmd)
    }

    /// Runs `program args` in the namespace and returns its stdout.
    ///
    /// # Panics
    /// When it cannot start or exits non-zero; the message has its stderr.
    pub fn run<S: AsRef<OsStr>>(&self, program: &str, args: &[S]) -> String {
        let mut cmd = self.command(program);
        cmd.args(args);
        checked(&mut cmd)
    }

    /// Runs `program args` in the namespace and tells whether it exited zero.
    pub fn succeeds<S: AsRef<OsStr>>(&self, program: &str, args: &[S]) -> bool {
        self.exec(program, args).status.success()
    }

    /// `ip ARGS` in the namespace (through `ip -n`, which is cheaper than `ip netns exec`).
    ///
    /// # Panics
    /// When `ip` exits non-zero.
    pub fn ip<S: AsRef<OsStr>>(&self, args: &[S]) -> String {
        let mut cmd = Command::new("ip");
        cmd.args(["-n", &self.name]).args(args);
        checked(&mut cmd)
    }

    /// One ICMP echo to `dst`, waiting at most `wait` (whole seconds, at least one) for the reply.
    pub fn ping_once(&self, dst: Ipv4Addr, wait: Duration) -> bool {
        let wait = wait.as_secs().max(1).to_string();
        self.succeeds(
            "ping",
            &["-n", "-q", "-c", "1", "-W", &wait, &dst.to_string()],
        )
    }

    /// Pings `dst` once a second until a reply comes back or `timeout` passes; returns how
    /// long it took.
    ///
    /// # Errors
    /// [`TimedOut`] when no reply came within `timeout`.
    pub fn wait_for_ping(&self, dst: Ipv4Addr, timeout: Duration) -> Result<Duration, TimedOut> {
        let start = std::time::Instant::now();
        wait_until(timeout, &format!("ping {dst} from {}", self.name), || {
            self.ping_once(dst, Duration::from_secs(1))
                .then(|| start.elapsed())
        })
    }

    /// Writes `value` to a file under `/proc/sys` as seen inside the namespace, e.g.
    /// `sysctl("net/ipv4/conf/all/promote_secondaries", "1")` (no `sysctl` binary needed).
    ///
    /// # Panics
    /// When the write fails.
    pub fn sysctl(&self, key: &str, value: &str) {
        let script = format!("echo {value} > /proc/sys/{key}");
        self.run("sh", &["-c", &script]);
    }

    /// Whether a network interface called `iface` exists in the namespace.
    pub fn has_link(&self, iface: &str) -> bool {
        Command::new("ip")
            .args(["-n", &self.name, "link", "show", "dev", iface])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// All routes of all tables in the namespace, IPv4 and IPv6, one per line.
    pub fn routes(&self) -> String {
        let v4 = self.ip(&["-4", "route", "show", "table", "all"]);
        let v6 = self.ip(&["-6", "route", "show", "table", "all"]);
        v4 + &v6
    }
}

/// A network namespace owned by the test: created with a unique name and `lo` up, deleted on
/// drop (also during a panic).
///
/// It dereferences to [`NsRef`] for running commands. Processes still inside when it is
/// dropped keep the namespace alive until they exit; the process guards end them.
#[derive(Debug)]
pub struct Netns {
    ns: NsRef,
}

impl Netns {
    /// Creates a namespace named `ml<pid>-<n>` and brings its loopback up.
    ///
    /// # Panics
    /// When `ip netns add` fails.
    pub fn create() -> Netns {
        static SWEPT: std::sync::Once = std::sync::Once::new();
        SWEPT.call_once(sweep_stale);
        let name = unique_name("-");
        host_run("ip", &["netns", "add", &name]);
        // Own it before anything else can fail, so that a panic below still deletes it.
        let ns = Netns { ns: NsRef { name } };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// A cloneable reference to this namespace.
    pub fn handle(&self) -> NsRef {
        self.ns.clone()
    }
}

impl std::ops::Deref for Netns {
    type Target = NsRef;

    fn deref(&self) -> &NsRef {
        &self.ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let status = Command::new("ip")
            .args(["netns", "del", &self.ns.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status();
        if !status.is_ok_and(|s| s.success()) {
            eprintln!("warning: could not delete namespace {}", self.ns.name);
        }
    }
}

/// Deletes namespaces that an earlier test run made and could not remove because it was
/// killed: those named `ml<pid>-<n>` whose `<pid>` no longer runs.
fn sweep_stale() {
    let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = stale_owner(name) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("deleting namespace {name} left by dead test process {pid}");
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// The pid in a namespace name of the form `ml<pid>-<n>`, if it has that form.
fn stale_owner(name: &str) -> Option<u32> {
    let (pid, n) = name.strip_prefix("ml")?.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(pid) && digits(n)).then(|| pid.parse().ok())?
}

/// The two ends of a veth pair, one in each namespace. The veth disappears with either
/// namespace, so it needs no guard of its own.
#[derive(Debug, Clone)]
pub struct Veth {
    /// Interface name of the end in the first namespace.
    pub a: String,
    /// Interface name of the end in the second namespace.
    pub b: String,
}

/// Joins two namespaces with a veth pair (MTU 1500, both ends up) and gives each end one
/// IPv4 address with its prefix, e.g. `"198.18.0.1/24"`.
///
/// # Panics
/// When any `ip` command fails.
pub fn veth(a: &NsRef, a_addr: &str, b: &NsRef, b_addr: &str) -> Veth {
    let ends = veth_link(a, b);
    for (ns, dev, addr) in [(a, &ends.a, a_addr), (b, &ends.b, b_addr)] {
        ns.ip(&["addr", "add", addr, "dev", dev]);
    }
    ends
}

/// Joins two namespaces with a veth pair (MTU 1500, both ends up) without addresses, e.g. to
/// put one end on a bridge.
///
/// # Panics
/// When any `ip` command fails.
pub fn veth_link(a: &NsRef, b: &NsRef) -> Veth {
    let base = unique_name("v");
    let ends = Veth {
        a: format!("{base}a"),
        b: format!("{base}b"),
    };
    // Created straight into the namespaces: nothing is ever left in the host's namespace.
    host_run(
        "ip",
        &[
            "link",
            "add",
            &ends.a,
            "netns",
            a.name(),
            "mtu",
            "1500",
            "type",
            "veth",
            "peer",
            "name",
            &ends.b,
            "netns",
            b.name(),
            "mtu",
            "1500",
        ],
    );
    for (ns, dev) in [(a, &ends.a), (b, &ends.b)] {
        ns.ip(&["link", "set", dev, "up"]);
    }
    ends
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_only_its_own_namespace_names() {
        assert_eq!(stale_owner("ml1234-0"), Some(1234));
        assert_eq!(stale_owner("ml1234-17"), Some(1234));
        for other in [
            "ml1234",
            "mlb1234-a",
            "ml-1",
            "ml12x4-1",
            "smA",
            "ml1234-",
            "ml1234-1a",
        ] {
            assert_eq!(stale_owner(other), None, "{other}");
        }
    }
}
