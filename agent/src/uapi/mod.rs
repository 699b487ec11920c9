//! The WireGuard cross-platform userspace API: the text protocol `wg(8)` speaks to a userspace
//! WireGuard implementation over the UNIX socket `/var/run/wireguard/IFACE.sock`
//! (described at <https://www.wireguard.com/xplatform/>).
//!
//! The module has three layers:
//!
//! - [`protocol`]: pure functions, [`render_get`] and [`apply_set`], which turn a
//!   [`DeviceConfig`] and the data plane's [`DeviceStatus`] into a `get=1` response, and a
//!   `set=1` request into a new desired [`DeviceConfig`];
//! - [`server`]: [`serve`], which answers requests on a listener made by [`bind`] and hands new
//!   configurations to a [`UapiHandler`];
//! - the client, [`request`] (and [`CLIENT`] where blocking is fine), used by
//!   `meshlink-agent status` and the wg-quick hook: `meshlink_uapi`'s, which `meshctl` uses too,
//!   as it does the socket path, the interface-name check and the framing limits.
//!
//! # Wire protocol
//!
//! A request is a sequence of `key=value` lines ended by an empty line; its first line names the
//! operation. A connection may carry several requests, one after the other. Every response ends
//! with `errno=N` and an empty line, where `N` is 0 on success or a positive `errno.h` value.
//!
//! - `get=1` answers the device's configuration and statistics (see [`render_get`]).
//! - `set=1` applies the lines that follow it (see [`apply_set`]) and answers only `errno=N`.
//! - `get=meshlink` is meshlink's own extension: the answer is [`UapiHandler::status_json`] on a
//!   single line, followed by `errno=0` and the empty line.
//! - `handover=NAME` is another: the connection stays open for an application registered
//!   for live migration of workload `NAME` ([`watch`], `meshlink_uapi::handover`).
//! - `claim=NAME` is another: [`UapiHandler::claim`]'s generation as `generation=N`, or its
//!   refusal as `message=...`, before the `errno` line.
//!
//! A request longer than [`MAX_REQUEST_BYTES`], or a line longer than [`MAX_LINE_BYTES`], is
//! answered with `errno=EMSGSIZE` and the connection is closed.

pub mod protocol;
pub mod server;
pub mod watch;

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshlink_uapi::{Client, ClientError, InterfaceNameError};

use crate::control::workloads::ClaimFailure;
pub use crate::dataplane::status::{DeviceStatus, DropCounts, PeerStatus};
use crate::settings::DeviceConfig;
pub use meshlink_uapi::{response_errno, MAX_LINE_BYTES, MAX_REQUEST_BYTES};
pub use protocol::{apply_set, render_get};
pub use server::{bind, serve, Listener};

/// The agent's userspace API client: it waits at most 10 seconds for a complete answer, of up
/// to [`meshlink_uapi::MAX_RESPONSE_BYTES`].
pub const CLIENT: Client = Client::new(Duration::from_secs(10));

/// Why a userspace API request failed, or why the API socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum UapiError {
    /// The request breaks the protocol: a line without `=`, an unexpected line.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// The first line of the request names no operation this server knows.
    #[error("unknown operation {0:?}")]
    UnknownOperation(String),
    /// A key this server does not know, or a peer key outside a peer section (or the reverse).
    #[error("unknown {scope} key {key:?}")]
    UnknownKey {
        /// `"device"` or `"peer"`: which section the key appeared in.
        scope: &'static str,
        /// The key as received.
        key: String,
    },
    /// A known key with a value that does not parse.
    #[error("invalid value for {key}: {reason}")]
    InvalidValue {
        /// The key whose value is wrong.
        key: String,
        /// What is wrong with it (secret values are never repeated here).
        reason: String,
    },
    /// `private_key=` with the all-zero key, which would leave the device without an identity.
    #[error("removing the private key is not supported")]
    RemovePrivateKey,
    /// A `protocol_version` other than 1.
    #[error("unsupported protocol version {0:?}")]
    ProtocolVersion(String),
    /// The request or one of its lines exceeds the server's limits.
    #[error(
        "request too large (limits: {MAX_LINE_BYTES} bytes a line, {MAX_REQUEST_BYTES} a request)"
    )]
    TooLarge,
    /// The request is not UTF-8 text.
    #[error("request is not UTF-8 text")]
    NotUtf8,
    /// The handler refused or failed to apply the new configuration.
    #[error("applying the configuration failed: {0}")]
    Apply(#[from] ApplyError),
    /// The interface name cannot name a socket file (see
    /// [`meshlink_uapi::check_interface_name`]).
    #[error(transparent)]
    InvalidInterface(#[from] InterfaceNameError),
    /// A live process already answers on the interface's socket.
    #[error("interface {interface} is already served by another process (socket {path} answers)")]
    InUse {
        /// The interface name.
        interface: String,
        /// The socket that answered.
        path: PathBuf,
    },
    /// Something other than a socket sits where the socket belongs; it is left alone.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// The socket directory exists but could let another user reach or replace the socket:
    /// it is owned by someone other than root or this process's user, writable by group or
    /// others, or not a directory. It is left as it is.
    #[error(
        "userspace API socket directory {path} {reason}; it must be a directory owned by root \
         (or uid {euid}, the agent's user) that group and others cannot write to \
         (e.g. `chown root {path} && chmod 755 {path}`), or choose another with --uapi-dir"
    )]
    UnsafeDirectory {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it, e.g. "has mode 0777".
        reason: String,
        /// This process's effective uid.
        euid: u32,
    },
    /// [`bind`] was called outside a Tokio runtime.
    #[error("the userspace API socket needs a Tokio runtime")]
    NoRuntime,
    /// A filesystem or socket operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// On which path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Why the agent could not apply a new configuration (`set=1`); nothing of it was applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The new listen port could not be bound; the old one is still in use.
    #[error("cannot move to listen-port {port}: {source}")]
    ListenPort {
        /// The port asked for.
        port: u16,
        /// Why it could not be bound.
        #[source]
        source: crate::platform::udp::UdpError,
    },
    /// The firewall mark could not be set on the UDP socket.
    #[error("cannot set fwmark {mark:#x} on the UDP socket: {source}")]
    Fwmark {
        /// The mark asked for.
        mark: u32,
        /// The operating system's reason.
        #[source]
        source: io::Error,
    },
    /// This agent does not take such a change (e.g. a joined node's listen port, which its
    /// coordinator publishes): the message says which and what to do instead.
    #[error("{0}")]
    Unsupported(String),
}

impl ApplyError {
    /// The positive `errno.h` value answered for it: `EADDRINUSE` for a listen port or mark
    /// that cannot be set, as wireguard-go answers both; `EOPNOTSUPP` for a change refused.
    pub fn errno(&self) -> i32 {
        match self {
            ApplyError::ListenPort { .. } | ApplyError::Fwmark { .. } => libc::EADDRINUSE,
            ApplyError::Unsupported(_) => libc::EOPNOTSUPP,
        }
    }
}

impl UapiError {
    /// The positive `errno.h` value for this error; the client receives it negated, `errno=-N`.
    pub fn errno(&self) -> i32 {
        match self {
            UapiError::Malformed(_)
            | UapiError::UnknownOperation(_)
            | UapiError::ProtocolVersion(_) => libc::EPROTO,
            UapiError::UnknownKey { .. }
            | UapiError::InvalidValue { .. }
            | UapiError::NotUtf8
            | UapiError::InvalidInterface(_) => libc::EINVAL,
            UapiError::RemovePrivateKey => libc::EOPNOTSUPP,
            UapiError::TooLarge => libc::EMSGSIZE,
            UapiError::InUse { .. } => libc::EADDRINUSE,
            UapiError::NotASocket(_) => libc::EEXIST,
            UapiError::UnsafeDirectory { .. } => libc::EACCES,
            UapiError::Apply(e) => e.errno(),
            UapiError::NoRuntime => libc::EIO,
            UapiError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }

    fn invalid(key: &str, reason: impl Into<String>) -> Self {
        UapiError::InvalidValue {
            key: key.to_string(),
            reason: reason.into(),
        }
    }

    fn io(action: &'static str, path: &Path, source: io::Error) -> Self {
        UapiError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// What the server needs from the rest of the agent.
pub trait UapiHandler: Send + Sync + 'static {
    /// The current desired configuration.
    fn config(&self) -> DeviceConfig;
    /// The data plane's live state.
    fn status(&self) -> DeviceStatus;
    /// Applies a new desired config; Err(message) on failure.
    ///
    /// # Errors
    /// [`ApplyError`] when a part of it cannot be applied; then nothing of it is.
    fn apply(&self, new: DeviceConfig) -> Result<(), ApplyError>;
    /// JSON for `meshlink-agent status` (our extension op `get=meshlink`).
    fn status_json(&self) -> String;
    /// The registry of applications taking part in live migrations (our extension op
    /// `handover=NAME`, see [`watch`]); `None` without a mesh session.
    fn handovers(&self) -> Option<&crate::control::handover::Handovers> {
        None
    }
    /// Claims a workload for this node through the coordinator (our extension op
    /// `claim=NAME`, used by `meshctl workload claim`): the generation it is now held at, or
    /// why not. Blocks until the coordinator answers or a timeout.
    fn claim(&self, _workload: &str) -> Result<u64, ClaimFailure> {
        Err(ClaimFailure::NotJoined)
    }
}

/// At most 64 characters of untrusted text, for error messages.
fn clip(text: &str) -> String {
    text.chars().take(64).collect()
}

/// Sends one request to the userspace API socket at `path` with [`CLIENT`], on Tokio's
/// blocking pool, and returns the whole response, through its final `errno=N` line and empty
/// line (see [`response_errno`]).
///
/// `body` is the request, e.g. `"get=meshlink\n"`; the terminating empty line is added if missing.
///
/// # Errors
/// Any [`ClientError`]: a request that cannot be framed, connection failures, a response cut
/// short or larger than 64 MiB, and no complete answer within 10 seconds.
pub async fn request(path: &Path, body: &str) -> Result<String, ClientError> {
    let (socket, body) = (path.to_owned(), body.to_owned());
    match tokio::task::spawn_blocking(move || CLIENT.request(&socket, &body)).await {
        Ok(response) => response.map(meshlink_uapi::Response::into_text),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // The runtime is shutting down.
        Err(e) => Err(ClientError::Io {
            path: path.to_owned(),
            source: io::Error::other(e),
        }),
    }
}
