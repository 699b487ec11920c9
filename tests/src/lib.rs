//! A small test-bed for running real binaries in Linux network namespaces.
//!
//! Each simulated host is a network namespace ([`Netns`]) joined to others by veth pairs
//! ([`veth`]) on the RFC 2544 underlay 198.18.0.0/15; tunnels carry the overlay
//! 100.64.0.0/10. On those hosts the tests start `meshlink-agent` ([`Agent`]), the stock
//! `wireguard-go` ([`WireguardGo`]) and the TCP sender/receiver of this crate
//! ([`xfer`], the `meshlink-xfer` binary), all as [`Process`] guards.
//!
//! Hygiene, as `shared/TESTNET.md` asks:
//! - Every namespace, link and interface name carries a per-run prefix made of `ml`, the test
//!   process id and a counter ([`unique_name`]), so two test processes, or two tests in one
//!   process, never share a name. Interface names stay within Linux's 15 bytes.
//! - Every resource is a guard that removes what it made on `Drop`, which also runs when a test
//!   panics: processes are ended by their pid (SIGTERM, then SIGKILL), namespaces deleted (their
//!   veths and TUN devices go with them), stale UAPI sockets removed. Long-running processes are
//!   also started under `setpriv --pdeathsig TERM`, so a test run killed outright (which runs no
//!   `Drop`) does not leave them running, and the namespaces of dead runs are swept at the next
//!   run's first [`Netns::create`].
//! - When a test fails, each process guard prints the tail of its log and the scratch directory
//!   ([`ScratchDir`]) is kept for inspection.
//! - Tests that need root call [`require_root`] first; it prints one visible line and returns
//!   `false` where root or `/dev/net/tun` is missing.
//!
//! Most tests start from [`TwoHosts`]: two namespaces on one veth with keys, addresses and
//! interface names already chosen.
//!
//! The mesh tests use [`Providers`] instead: a router namespace with one bridge per simulated
//! cloud provider (198.18.1.0/24, 198.18.2.0/24, ...), hosts on those bridges routing the
//! underlay through their provider's router. On them run a [`Coordinator`] (state kept across
//! restarts and kills, [`Meshctl`] inside its namespace for the admin API) and agents that join
//! with a token ([`MeshAgent`]); [`Reach`] checks many overlay paths at once.
//!
//! The helpers panic with a descriptive message instead of returning errors: they are for
//! tests, where a panic with context is the most useful failure.

pub mod agent;
pub mod browser;
pub mod chaos;
pub mod coordinator;
pub mod keys;
pub mod mesh;
pub mod nat;
pub mod netns;
pub mod ping;
pub mod policy;
pub mod postgres;
pub mod process;
pub mod providers;
pub mod scratch;
pub mod topology;
pub mod wait;
pub mod wg;
pub mod wireguard_go;
pub mod xfer;

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

pub use agent::{Agent, AgentConfig, ConfigFormat, PeerConfig};
pub use coordinator::{Coordinator, Meshctl, NodeInfo};
pub use keys::{write_secret, Keypair};
pub use mesh::{MeshAgent, Reach};
pub use netns::{host_run, veth, veth_link, Netns, NsRef, Veth};
pub use process::Process;
pub use providers::{Provider, ProviderHost, Providers};
pub use scratch::ScratchDir;
pub use topology::{Host, TwoHosts};
pub use wait::{wait_until, TimedOut};
pub use wireguard_go::WireguardGo;
pub use xfer::{Transfer, XferReceiver, XferSender};

/// The default directory of WireGuard userspace API sockets, shared by every namespace
/// (it is a filesystem path, not a network object).
pub const UAPI_DIR: &str = meshlink_uapi::DEFAULT_DIR;

/// Whether this process may build namespaces and TUN devices.
///
/// Returns `true` when running as root with `/dev/net/tun` present. Otherwise, on a developer's
/// machine, prints the single line `skipped: needs root and /dev/net/tun` straight to stderr
/// (past the test harness's output capture, so it is seen) and returns `false`; the caller then
/// returns early.
///
/// # Panics
/// When they are missing and skipping is not allowed ([`skipping_allowed`]): under CI, a
/// namespace test that cannot run is a failure, never a pass.
pub fn require_root() -> bool {
    let root = nix::unistd::geteuid().is_root();
    let tun = std::path::Path::new("/dev/net/tun").exists();
    if root && tun {
        return true;
    }
    let missing = match (root, tun) {
        (false, false) => "root and /dev/net/tun",
        (false, true) => "root",
        _ => "/dev/net/tun",
    };
    assert!(
        skipping_allowed(|k| std::env::var(k).ok()),
        "this namespace test needs {missing}, and CI=true or MESHLINK_REQUIRE_NETNS=1 forbids skipping it"
    );
    // `eprintln!` is captured by the test harness; a direct write to fd 2 is not.
    let _ = writeln!(std::io::stderr(), "skipped: needs {missing}");
    false
}

/// Whether a namespace test may skip itself when root or TUN is missing: not when `CI` is
/// `true` (CI sets it) or `MESHLINK_REQUIRE_NETNS` is `1`. `var` reads the environment.
pub fn skipping_allowed(var: impl Fn(&str) -> Option<String>) -> bool {
    let ci = var("CI").is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    let required = var("MESHLINK_REQUIRE_NETNS").is_some_and(|v| v == "1");
    !(ci || required)
}

/// Panics unless `program` can be run, naming the Debian package that provides it.
///
/// # Panics
/// When `program --help`/`--version` cannot be started at all.
pub fn require_tool(program: &str, debian_package: &str) {
    let found = std::process::Command::new(program)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok();
    assert!(
        found,
        "`{program}` is not installed: apt-get install -y {debian_package}"
    );
}

/// A name unique to this run: `ml<pid><tag><n>`, at most 15 bytes for a 7-digit pid and
/// `n` below 1000 (so it is valid as a network interface name).
///
/// The pid tells runs apart (and which run leaked a name, should one ever leak); the counter
/// tells apart the tests that run as threads of one process.
pub fn unique_name(tag: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = format!("ml{}{tag}{n}", std::process::id());
    debug_assert!(name.len() <= 15, "interface name too long: {name}");
    name
}

/// `<target>/debug` (or whichever profile built the running test): where Cargo puts the
/// workspace's binaries.
///
/// An integration test runs as `<target>/<profile>/deps/<test>-<hash>`, so this is two
/// directories up from [`std::env::current_exe`].
///
/// # Panics
/// When the running executable's path cannot be read or has fewer than two parents.
pub fn target_profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("path of the running test executable");
    exe.parent()
        .and_then(|deps| deps.parent())
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("cannot find the target directory from {}", exe.display()))
}

/// The `meshlink-agent` binary under test: `$MESHLINK_AGENT_BIN` if set, else the one next to
/// this test's executable in `<target>/<profile>/`.
///
/// # Panics
/// When the binary does not exist, with the command that builds it.
pub fn agent_bin() -> PathBuf {
    let path = match std::env::var_os("MESHLINK_AGENT_BIN") {
        Some(path) => PathBuf::from(path),
        None => target_profile_dir().join("meshlink-agent"),
    };
    assert!(
        path.is_file(),
        "{} does not exist: run `cargo build -p meshlink-agent` first \
         (or point MESHLINK_AGENT_BIN at the binary)",
        path.display()
    );
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| assert_real_clock(&path));
    path
}

/// Panics if `binary` was built with the agent's `mock-clock` feature.
///
/// That feature swaps boringtun's clock for `mock_instant`, which only tests advance: such a
/// binary never re-handshakes, never sends keepalives and reports every handshake as just now.
/// Cargo writes it to the same `<target>/debug/meshlink-agent` path as a normal build whenever
/// `cargo test -p meshlink-agent --features mock-clock` runs, so a stale one is easy to pick up.
fn assert_real_clock(binary: &std::path::Path) {
    let mock = std::process::Command::new("grep")
        .args(["-q", "-a", "-F", "mock_instant"])
        .arg(binary)
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        !mock,
        "{} was built with the `mock-clock` feature (its protocol timers never run): rebuild it \
         with `cargo build -p meshlink-agent`",
        binary.display()
    );
}

/// A workspace binary: `$env_var` if set, else `<target>/<profile>/name`.
///
/// # Panics
/// When the binary does not exist, with the command that builds it.
fn workspace_bin(name: &str, env_var: &str, package: &str) -> PathBuf {
    let path = match std::env::var_os(env_var) {
        Some(path) => PathBuf::from(path),
        None => target_profile_dir().join(name),
    };
    assert!(
        path.is_file(),
        "{} does not exist: run `cargo build -p {package}` first (or point {env_var} at the \
         binary)",
        path.display()
    );
    path
}

/// The `meshlink-coordinator` binary under test: `$MESHLINK_COORDINATOR_BIN` if set, else the
/// one next to this test's executable.
///
/// # Panics
/// When the binary does not exist, with the command that builds it.
pub fn coordinator_bin() -> PathBuf {
    workspace_bin(
        "meshlink-coordinator",
        "MESHLINK_COORDINATOR_BIN",
        "meshlink-coordinator",
    )
}

/// The `meshlink-relay` binary under test: `$MESHLINK_RELAY_BIN` if set, else the one next to
/// this test's executable.
///
/// # Panics
/// When the binary does not exist, with the command that builds it.
pub fn relay_bin() -> PathBuf {
    workspace_bin("meshlink-relay", "MESHLINK_RELAY_BIN", "meshlink-relay")
}

/// The `meshctl` binary under test: `$MESHLINK_MESHCTL_BIN` if set, else the one next to this
/// test's executable.
///
/// # Panics
/// When the binary does not exist, with the command that builds it.
pub fn meshctl_bin() -> PathBuf {
    workspace_bin("meshctl", "MESHLINK_MESHCTL_BIN", "meshctl")
}

/// The `meshlink-chat` binary (the example app of the workload tests): `$MESHLINK_CHAT_BIN`
/// if set, else the one next to this test's executable.
///
/// # Panics
/// When the binary does not exist, with the command that builds it.
pub fn chat_bin() -> PathBuf {
    workspace_bin("meshlink-chat", "MESHLINK_CHAT_BIN", "meshlink-chat")
}

/// The `meshlink-xfer` binary of this crate, which Cargo builds before the integration tests.
///
/// # Panics
/// When the binary does not exist.
pub fn xfer_bin() -> PathBuf {
    let path = target_profile_dir().join("meshlink-xfer");
    assert!(
        path.is_file(),
        "{} does not exist: run `cargo build -p meshlink-tests --bins`",
        path.display()
    );
    path
}

#[cfg(test)]
mod tests {
    use super::skipping_allowed;

    #[test]
    fn ci_or_the_variable_forbid_skipping() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| (*v).to_string())
            }
        };
        assert!(skipping_allowed(env(&[])));
        assert!(skipping_allowed(env(&[("CI", "false")])));
        assert!(skipping_allowed(env(&[("MESHLINK_REQUIRE_NETNS", "0")])));
        assert!(!skipping_allowed(env(&[("CI", "true")])));
        assert!(!skipping_allowed(env(&[("CI", "1")])));
        assert!(!skipping_allowed(env(&[("MESHLINK_REQUIRE_NETNS", "1")])));
    }
}
