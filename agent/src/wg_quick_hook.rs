//! `meshlink-agent [-f] INTERFACE`: wireguard-go's command line, so that wg-quick runs the
//! agent as its userspace implementation
//! (`WG_QUICK_USERSPACE_IMPLEMENTATION=meshlink-agent wg-quick up wg0`).
//!
//! # What wg-quick expects
//!
//! Debian's `/usr/bin/wg-quick` (`add_if`), where `ip link add INTERFACE type wireguard` fails
//! (no kernel module), runs `$WG_QUICK_USERSPACE_IMPLEMENTATION INTERFACE` and goes on when it
//! returns zero: by then the interface must exist and its userspace API socket
//! (`/var/run/wireguard/INTERFACE.sock`) must answer. wg-quick then sets the key, port and
//! peers with `wg setconf`, the addresses, MTU and routes with `ip`. `wg-quick down` deletes
//! the link (`ip link delete dev INTERFACE`), and the program must then exit.
//!
//! # What this command does
//!
//! As wireguard-go: by default it starts a copy of itself in the foreground in a new session
//! (the daemon), waits until the daemon's socket answers (or the daemon reports why it could
//! not start) and returns; with `-f`/`--foreground` or `WG_PROCESS_FOREGROUND=1` it runs in the
//! foreground itself. The device starts with no address and no peer, and with a fresh private
//! key that no peer knows until `wg setconf` sets the configured one
//! ([`config::load_api_configured`]). It installs no route (`Settings::install_routes` off):
//! wg-quick routes the file's `AllowedIPs` itself, into the table its `Table` names, and for
//! `0.0.0.0/0` with policy routing on the firewall mark it sets on the device. What `wg
//! setconf` and `wg set` change at run time is followed: a new listen port is bound (the
//! loops move to it; a port that cannot be bound is answered `EADDRINUSE` and the old one
//! kept), a firewall mark is set on the UDP socket, and the packet buffers follow the MTU
//! that `ip link set mtu` gives the interface. The daemon exits when the interface is deleted
//! ([`RunError::InterfaceDeleted`]), on SIGTERM or SIGINT.
//!
//! The daemon's standard input and output are `/dev/null`. Its log (standard error) goes to
//! the journal when wg-quick's standard error is the journal (a `wg-quick@` unit:
//! `JOURNAL_STREAM`), to wg-quick's standard error when `MESHLINK_LOG` is set (as wireguard-go
//! keeps it with `LOG_LEVEL`), and nowhere otherwise, so that a caller reading wg-quick's
//! output through a pipe is not held open by the daemon.
//!
//! # Limits
//!
//! - An MTU is followed within a quarter of a second of `ip link set mtu`; packets longer
//!   than the MTU before in that instant are dropped (TCP sends them again). The packet
//!   buffers take about 3 × 128 × (MTU + 128) bytes, 3.5 MiB at a 9,000-byte MTU.
//! - A new listen port loses what peers sent to the old one meanwhile, as in wireguard-go.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use meshlink_agent::config::{self, ConfigError};
use meshlink_agent::run::{self, RunError};
use meshlink_agent::settings::PrivateKey;
use meshlink_agent::uapi;

/// Set (to `1`) in the daemon's environment: its standard output is the pipe on which it
/// reports readiness to the command that started it ([`READY`] or [`FAILED`] and a reason).
const ENV_READY_PIPE: &str = "MESHLINK_READY_PIPE";
/// wireguard-go's switch for foreground operation, honoured the same way.
const ENV_FOREGROUND: &str = "WG_PROCESS_FOREGROUND";
/// systemd's `device:inode` of the journal stream on standard error, when there is one.
const ENV_JOURNAL_STREAM: &str = "JOURNAL_STREAM";

/// The daemon's line on the readiness pipe once its socket answers.
const READY: &str = "ready";
/// The prefix of the daemon's line on the readiness pipe when it could not start.
const FAILED: &str = "error: ";

/// How long the command waits for its daemon to be ready.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the daemon asks its own socket whether it answers yet.
const READY_POLL: Duration = Duration::from_millis(10);

/// Why `meshlink-agent INTERFACE` failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The interface name or an environment variable is not acceptable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The device could not be started or stopped running.
    #[error(transparent)]
    Run(#[from] RunError),
    /// The daemon could not be started.
    #[error("cannot start the daemon ({program}): {source}")]
    Spawn {
        /// The program started.
        program: PathBuf,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// The daemon reported that it could not bring the interface up.
    #[error("{0}")]
    Daemon(String),
    /// The daemon exited without saying it was ready.
    #[error("the daemon exited ({0}) before {1} was up")]
    DaemonExited(ExitStatus, String),
    /// The daemon did not become ready in time; it was stopped.
    #[error("the daemon did not bring {0} up within {START_TIMEOUT:?}; stopped it")]
    DaemonTimeout(String),
    /// A system call of the start-up failed.
    #[error("{0}: {1}")]
    Os(&'static str, std::io::Error),
}

/// Runs `meshlink-agent [-f] INTERFACE`.
///
/// # Errors
/// [`HookError`]: a bad interface name or variable, a device that cannot start, a daemon
/// that failed to start.
pub fn main(interface: &str, foreground: bool) -> Result<(), HookError> {
    let foreground = foreground || std::env::var_os(ENV_FOREGROUND).is_some_and(|v| v == "1");
    let ready_pipe = std::env::var_os(ENV_READY_PIPE).is_some_and(|v| v == "1");
    if ready_pipe {
        // The daemon leaves wg-quick's session, so that closing its terminal does not end it.
        let _ = nix::unistd::setsid();
    }
    if !foreground && !ready_pipe {
        return start_daemon(interface);
    }
    if let Err(e) = crate::init_logging().map(|_| ()) {
        tracing::warn!("{e}; logging as text");
    }
    let settings = config::load_api_configured(
        "INTERFACE",
        interface,
        &config::process_env,
        PrivateKey::generate(),
    );
    let mut settings = match settings {
        Ok(s) => s,
        Err(e) => return Err(report_failure(ready_pipe, e.into())),
    };
    // wg-quick routes the file's AllowedIPs itself.
    settings.install_routes = false;
    let socket = meshlink_uapi::socket_path(&settings.uapi_dir, interface);
    let rt = match crate::runtime() {
        Ok(rt) => rt,
        Err(e) => return Err(report_failure(ready_pipe, HookError::Os("runtime", e))),
    };
    let result = rt.block_on(async {
        let device = run::run(settings, crate::shutdown_signal(), None);
        tokio::pin!(device);
        tokio::select! {
            result = &mut device => return result.map_err(HookError::from),
            () = answers(&socket) => {}
        }
        tracing::info!(socket = %socket.display(), "ready for wg setconf");
        if ready_pipe {
            report_ready();
        }
        device.await.map_err(HookError::from)
    });
    match result {
        Err(HookError::Run(e)) if interface_deleted(&e) => {
            tracing::info!(interface, "the interface was deleted; exiting");
            Ok(())
        }
        Err(e) => Err(report_failure(ready_pipe, e)),
        Ok(()) => Ok(()),
    }
}

/// Whether `e` says the interface was deleted (`ip link delete`, as `wg-quick down` does),
/// which ends the daemon normally.
fn interface_deleted(e: &RunError) -> bool {
    matches!(e, RunError::InterfaceDeleted(_))
}

/// Resolves once the userspace API socket at `path` answers a `get`.
async fn answers(path: &Path) {
    loop {
        if let Ok(answer) = uapi::request(path, "get=1").await {
            if uapi::response_errno(&answer) == Some(0) {
                return;
            }
        }
        tokio::time::sleep(READY_POLL).await;
    }
}

/// Tells the command that started this daemon that it is ready, then detaches standard
/// output from its pipe.
fn report_ready() {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{READY}");
    let _ = out.flush();
    drop(out);
    if let Ok(null) = std::fs::File::open("/dev/null") {
        let _ = nix::unistd::dup2_stdout(&null);
    }
}

/// Passes `e` back to the command that started this daemon, if one waits for it (it prints
/// it); returns it for this process's own exit.
fn report_failure(ready_pipe: bool, e: HookError) -> HookError {
    if ready_pipe {
        let line = e.to_string().replace('\n', " ");
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{FAILED}{line}");
        let _ = out.flush();
    }
    e
}

/// Starts the daemon (this program with `--foreground INTERFACE`) and waits until it is ready.
fn start_daemon(interface: &str) -> Result<(), HookError> {
    let program = std::env::current_exe().map_err(|e| HookError::Os("finding this program", e))?;
    let mut cmd = Command::new(&program);
    cmd.arg("--foreground")
        .arg(interface)
        .env(ENV_READY_PIPE, "1")
        .env_remove(ENV_FOREGROUND)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(daemon_stderr());
    let mut child = cmd.spawn().map_err(|source| HookError::Spawn {
        program: program.clone(),
        source,
    })?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Lines other than the report (there should be none) are skipped; the pipe's end
        // (the daemon exited or detached) ends the thread.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line == READY || line.starts_with(FAILED) {
                let _ = tx.send(line);
                return;
            }
        }
    });
    match rx.recv_timeout(START_TIMEOUT) {
        Ok(line) if line == READY => Ok(()),
        Ok(line) => {
            let _ = child.wait();
            Err(HookError::Daemon(line[FAILED.len()..].to_string()))
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            let status = child.wait().map_err(|e| HookError::Os("waiting", e))?;
            Err(HookError::DaemonExited(status, interface.to_string()))
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(HookError::DaemonTimeout(interface.to_string()))
        }
    }
}

/// The daemon's standard error: ours when it is the journal or when a log was asked for
/// (`MESHLINK_LOG`), else `/dev/null` (see the module's documentation).
fn daemon_stderr() -> Stdio {
    let asked = std::env::var_os("MESHLINK_LOG").is_some_and(|v| !v.is_empty());
    if asked || stderr_is_journal(std::env::var(ENV_JOURNAL_STREAM).ok().as_deref()) {
        Stdio::inherit()
    } else {
        Stdio::null()
    }
}

/// Whether standard error is the journal stream that systemd names in `JOURNAL_STREAM`
/// (`device:inode`).
fn stderr_is_journal(journal_stream: Option<&str>) -> bool {
    let Some((dev, ino)) = journal_stream.and_then(|s| s.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    nix::sys::stat::fstat(std::io::stderr()).is_ok_and(|st| st.st_dev == dev && st.st_ino == ino)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_deleted_interface_ends_the_daemon_normally() {
        assert!(interface_deleted(&RunError::InterfaceDeleted("wg0".into())));
        let other = RunError::TunRead {
            interface: "wg0".into(),
            source: std::io::Error::from_raw_os_error(libc::EIO),
        };
        assert!(!interface_deleted(&other));
        assert!(!interface_deleted(&RunError::InterfaceExists("wg0".into())));
        assert!(!interface_deleted(&RunError::LoopStopped));
    }

    #[test]
    fn only_a_matching_journal_stream_counts() {
        assert!(!stderr_is_journal(None));
        assert!(!stderr_is_journal(Some("garbage")));
        assert!(!stderr_is_journal(Some("1:x")));
        let st = nix::sys::stat::fstat(std::io::stderr()).expect("fstat stderr");
        let ours = format!("{}:{}", st.st_dev, st.st_ino);
        assert!(stderr_is_journal(Some(&ours)));
        let other = format!("{}:{}", st.st_dev, st.st_ino.wrapping_add(1));
        assert!(!stderr_is_journal(Some(&other)));
    }
}
