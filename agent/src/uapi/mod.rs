//! The WireGuard cross-platform userspace API: the text protocol `wg(8)` speaks to a userspace
//! WireGuard implementation over the UNIX socket `/var/run/wireguard/IFACE.sock`
//! (described at <https://www.wireguard.com/xplatform/>).
//!
//! The module has three layers:
//!
//! - pure functions, [`render_get`] and [`apply_set`], which turn a [`DeviceConfig`] and the data
//!   plane's [`DeviceStatus`] into a `get=1` response, and a `set=1` request into a new desired
//!   [`DeviceConfig`];
//! - the server, [`serve`], which answers requests on a listener made by [`bind`] and hands new
//!   configurations to a [`UapiHandler`];
//! - a small client, [`request`], used by `meshlink-agent status`.
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
//!
//! A request longer than [`MAX_REQUEST_BYTES`], or a line longer than [`MAX_LINE_BYTES`], is
//! answered with `errno=EMSGSIZE` and the connection is closed.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use ipnet::IpNet;
use meshlink_proto::{Key, PublicKey};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use crate::dataplane::status::{DeviceStatus, DropCounts, PeerStatus};
use crate::settings::{DeviceConfig, PeerConfig, PrivateKey};

/// The largest request the server accepts, in bytes (all lines, newlines included).
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// The longest line the server accepts, in bytes, newline excluded.
pub const MAX_LINE_BYTES: usize = 4096;
/// The largest response [`request`] accepts, in bytes.
const MAX_RESPONSE_BYTES: usize = 64 << 20;
/// How long [`request`] waits for a complete answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed `accept`, so that running out of file descriptors does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

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
    /// The interface name cannot name a socket file.
    #[error("invalid interface name {0:?}: 1 to 15 bytes, no '/', NUL or whitespace")]
    InvalidInterface(String),
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

// ---------------------------------------------------------------------------------------------
// get=1

/// Renders the response to `get=1`: the device's keys and settings from `config`, endpoints and
/// statistics from `status`, ending with `errno=0` and an empty line.
///
/// Peers are listed in configuration order; a configured peer the data plane does not (yet) know
/// shows the configured endpoint and zero statistics. A peer's live endpoint wins over the
/// configured one, since the peer may have roamed; IPv4-mapped IPv6 endpoints are shown as IPv4.
/// `listen_port` is the port actually bound, or the configured one while nothing is bound.
pub fn render_get(config: &DeviceConfig, status: &DeviceStatus) -> String {
    let live: HashMap<&PublicKey, &PeerStatus> =
        status.peers.iter().map(|p| (&p.public_key, p)).collect();
    let listen_port = if status.listen_port != 0 {
        status.listen_port
    } else {
        config.listen_port
    };

    let mut out = String::with_capacity(128 + 400 * config.peers.len());
    line(
        &mut out,
        "private_key",
        config.private_key.to_key().to_hex(),
    );
    line(&mut out, "listen_port", listen_port);
    if let Some(mark) = config.fwmark.filter(|m| *m != 0) {
        line(&mut out, "fwmark", mark);
    }
    for peer in &config.peers {
        let stats = live.get(&peer.public_key).copied();
        line(&mut out, "public_key", Key(peer.public_key.0).to_hex());
        if let Some(psk) = peer.preshared_key.filter(|k| !k.is_zero()) {
            line(&mut out, "preshared_key", psk.to_hex());
        }
        line(&mut out, "protocol_version", 1);
        if let Some(endpoint) = stats.and_then(|s| s.endpoint).or(peer.endpoint) {
            line(&mut out, "endpoint", display_endpoint(endpoint));
        }
        let handshake = stats
            .and_then(|s| s.last_handshake)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .unwrap_or_default();
        line(&mut out, "last_handshake_time_sec", handshake.as_secs());
        line(
            &mut out,
            "last_handshake_time_nsec",
            handshake.subsec_nanos(),
        );
        line(&mut out, "tx_bytes", stats.map_or(0, |s| s.tx_bytes));
        line(&mut out, "rx_bytes", stats.map_or(0, |s| s.rx_bytes));
        line(
            &mut out,
            "persistent_keepalive_interval",
            peer.persistent_keepalive.unwrap_or(0),
        );
        for net in &peer.allowed_ips {
            line(&mut out, "allowed_ip", net);
        }
    }
    out.push_str("errno=0\n\n");
    out
}

fn line(out: &mut String, key: &str, value: impl std::fmt::Display) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "{key}={value}");
}

/// `a.b.c.d:port` or `[v6]:port`, with IPv4-mapped IPv6 addresses unmapped.
fn display_endpoint(endpoint: SocketAddr) -> String {
    match endpoint {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()).to_string(),
            None => endpoint.to_string(),
        },
        SocketAddr::V4(_) => endpoint.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// set=1

/// The peer section a `set=1` request is in: which peer later peer keys change.
struct PeerSection {
    /// Index of the peer in the new configuration; `None` when the section is ignored (the peer
    /// was removed, is `update_only` and absent, or is this device itself).
    index: Option<usize>,
    /// Whether this section created the peer.
    created: bool,
}

/// Applies the body of a `set=1` request (the lines after `set=1`, up to the empty line) to a copy
/// of `current` and returns the new desired configuration. Empty lines are skipped.
///
/// Device keys: `private_key` (hex; all-zero is refused), `listen_port`, `fwmark` (0 = none),
/// `replace_peers=true`. Then `public_key=HEX` opens a peer section (creating the peer if new),
/// whose keys are `remove=true`, `update_only=true` (drop the section if the peer is new),
/// `preshared_key` (all-zero = none), `endpoint` (`a.b.c.d:port` or `[v6]:port`),
/// `persistent_keepalive_interval` (0 = off), `replace_allowed_ips=true`, `allowed_ip=CIDR`
/// (host bits cleared, duplicates skipped, and taken away from any other peer that had it, as the
/// kernel's routing table does) and `protocol_version=1`. A section for this device's own public
/// key is ignored, and setting a private key removes the peer with the matching public key, both as
/// the kernel module does.
///
/// # Errors
/// The first unknown key, malformed line or unparsable value; `current` is never modified.
pub fn apply_set(current: &DeviceConfig, request: &str) -> Result<DeviceConfig, UapiError> {
    let mut new = current.clone();
    let mut section: Option<PeerSection> = None;
    for text in request.split('\n') {
        if text.is_empty() {
            continue;
        }
        let (key, value) = text.split_once('=').ok_or_else(|| {
            UapiError::Malformed(format!(
                "a line without '=' (starting {})",
                crate::untrusted::key_name(text.split(' ').next().unwrap_or(""))
            ))
        })?;
        if key == "public_key" {
            let public_key = PublicKey(parse_hex_key(key, value)?.0);
            section = Some(open_peer(&mut new, public_key));
            continue;
        }
        match section.as_mut() {
            None => set_device_key(&mut new, key, value)?,
            Some(s) => set_peer_key(&mut new, s, key, value)?,
        }
    }
    Ok(new)
}

fn open_peer(config: &mut DeviceConfig, public_key: PublicKey) -> PeerSection {
    if public_key == config.private_key.public_key() {
        return PeerSection {
            index: None,
            created: false,
        };
    }
    if let Some(index) = config.peers.iter().position(|p| p.public_key == public_key) {
        return PeerSection {
            index: Some(index),
            created: false,
        };
    }
    config.peers.push(PeerConfig {
        public_key,
        preshared_key: None,
        endpoint: None,
        allowed_ips: Vec::new(),
        persistent_keepalive: None,
    });
    PeerSection {
        index: Some(config.peers.len() - 1),
        created: true,
    }
}

fn set_device_key(config: &mut DeviceConfig, key: &str, value: &str) -> Result<(), UapiError> {
    match key {
        "private_key" => {
            let k = parse_hex_key(key, value)?;
            if k.is_zero() {
                return Err(UapiError::RemovePrivateKey);
            }
            config.private_key = PrivateKey::from_bytes(k.0);
            let own = config.private_key.public_key();
            config.peers.retain(|p| p.public_key != own);
        }
        "listen_port" => config.listen_port = parse_uint(key, value)?,
        "fwmark" => {
            let mark: u32 = parse_uint(key, value)?;
            config.fwmark = (mark != 0).then_some(mark);
        }
        "replace_peers" => {
            expect_true(key, value)?;
            config.peers.clear();
        }
        _ => {
            return Err(UapiError::UnknownKey {
                scope: "device",
                key: crate::untrusted::key_name(key),
            })
        }
    }
    Ok(())
}

fn set_peer_key(
    config: &mut DeviceConfig,
    section: &mut PeerSection,
    key: &str,
    value: &str,
) -> Result<(), UapiError> {
    match key {
        "remove" => {
            expect_true(key, value)?;
            if let Some(index) = section.index.take() {
                config.peers.remove(index);
            }
        }
        "update_only" => {
            expect_true(key, value)?;
            if section.created {
                if let Some(index) = section.index.take() {
                    config.peers.remove(index);
                }
            }
        }
        "preshared_key" => {
            let k = parse_hex_key(key, value)?;
            if let Some(peer) = section_peer(config, section) {
                peer.preshared_key = (!k.is_zero()).then_some(k);
            }
        }
        "endpoint" => {
            let endpoint = SocketAddr::from_str(value).map_err(|_| {
                UapiError::invalid(
                    key,
                    format!("{:?} is not IP:PORT or [IPv6]:PORT", clip(value)),
                )
            })?;
            if let Some(peer) = section_peer(config, section) {
                peer.endpoint = Some(endpoint);
            }
        }
        "persistent_keepalive_interval" => {
            let seconds: u16 = parse_uint(key, value)?;
            if let Some(peer) = section_peer(config, section) {
                peer.persistent_keepalive = (seconds != 0).then_some(seconds);
            }
        }
        "replace_allowed_ips" => {
            expect_true(key, value)?;
            if let Some(peer) = section_peer(config, section) {
                peer.allowed_ips.clear();
            }
        }
        "allowed_ip" => {
            let net = IpNet::from_str(value)
                .map_err(|_| UapiError::invalid(key, format!("{:?} is not a CIDR", clip(value))))?
                .trunc();
            if let Some(index) = section.index {
                for (i, peer) in config.peers.iter_mut().enumerate() {
                    if i == index {
                        if !peer.allowed_ips.contains(&net) {
                            peer.allowed_ips.push(net);
                        }
                    } else {
                        peer.allowed_ips.retain(|n| *n != net);
                    }
                }
            }
        }
        "protocol_version" => {
            if value != "1" {
                return Err(UapiError::ProtocolVersion(clip(value)));
            }
        }
        _ => {
            return Err(UapiError::UnknownKey {
                scope: "peer",
                key: crate::untrusted::key_name(key),
            })
        }
    }
    Ok(())
}

fn section_peer<'a>(
    config: &'a mut DeviceConfig,
    section: &PeerSection,
) -> Option<&'a mut PeerConfig> {
    section.index.and_then(|i| config.peers.get_mut(i))
}

/// 64 hex digits. The message never repeats the value: it may be a secret.
fn parse_hex_key(key: &str, value: &str) -> Result<Key, UapiError> {
    if value.len() != 64 || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(UapiError::invalid(key, "a key is 64 hex digits"));
    }
    Key::from_hex(value).map_err(|_| UapiError::invalid(key, "a key is 64 hex digits"))
}

/// A decimal unsigned integer: digits only (no sign, no spaces).
fn parse_uint<T: FromStr>(key: &str, value: &str) -> Result<T, UapiError> {
    let bad = || UapiError::invalid(key, format!("{:?} is not an integer in range", clip(value)));
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    value.parse().map_err(|_| bad())
}

fn expect_true(key: &str, value: &str) -> Result<(), UapiError> {
    if value == "true" {
        Ok(())
    } else {
        Err(UapiError::invalid(
            key,
            format!("the only accepted value is true, got {:?}", clip(value)),
        ))
    }
}

/// At most 64 characters of untrusted text, for error messages.
fn clip(text: &str) -> String {
    text.chars().take(64).collect()
}

// ---------------------------------------------------------------------------------------------
// The server

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
    /// Claims a workload for this node through the coordinator (our extension op
    /// `claim=NAME`, used by `meshctl workload claim`): the generation it is now held at, or
    /// why not. Blocks until the coordinator answers or a timeout.
    fn claim(&self, workload: &str) -> Result<u64, String> {
        Err(format!(
            "cannot claim {workload}: this agent is not joined to a coordinator"
        ))
    }
}

/// Answers userspace API requests on `listener` until `shutdown` turns true (or its sender is
/// dropped), then waits for open connections to finish and removes the socket file if it is
/// still the one this server listened on.
///
/// Each connection is served by its own task; handler calls run on Tokio's blocking pool, and
/// `set=1` requests are serialized so that concurrent clients cannot lose each other's changes.
/// A malformed request is answered with an `errno` and never stops the server.
pub async fn serve(
    listener: Listener,
    handler: Arc<dyn UapiHandler>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Listener {
        inner: listener,
        path,
    } = listener;
    let socket_id = std::fs::symlink_metadata(&path)
        .ok()
        .map(|m| (m.dev(), m.ino()));
    let set_lock = Arc::new(Mutex::new(()));
    let mut connections = JoinSet::new();

    loop {
        tokio::select! {
            () = shutdown_requested(&mut shutdown) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(
                        stream,
                        Arc::clone(&handler),
                        Arc::clone(&set_lock),
                        shutdown.clone(),
                    ));
                }
                Err(e) => {
                    tracing::warn!("userspace API: accept failed: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}

    if let Some(id) = socket_id {
        let same = std::fs::symlink_metadata(&path).is_ok_and(|m| (m.dev(), m.ino()) == id);
        if same {
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!("userspace API: removing {}: {e}", path.display());
            }
        }
    }
}

/// Completes when shutdown is requested or can no longer be signalled.
async fn shutdown_requested(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

async fn serve_connection(
    stream: UnixStream,
    handler: Arc<dyn UapiHandler>,
    set_lock: Arc<Mutex<()>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (read_half, mut write_half) = stream.into_split();
    let mut reader = BufReader::new(read_half);
    loop {
        let outcome = tokio::select! {
            () = shutdown_requested(&mut shutdown) => return,
            outcome = read_request(&mut reader) => outcome,
        };
        let response = match outcome {
            Ok(Incoming::Request(bytes)) => {
                let handler = Arc::clone(&handler);
                let set_lock = Arc::clone(&set_lock);
                tokio::task::spawn_blocking(move || handle_request(&*handler, &set_lock, &bytes))
                    .await
                    .unwrap_or_else(|e| {
                        tracing::error!("userspace API: request handler failed: {e}");
                        errno_response(libc::EIO)
                    })
            }
            Ok(Incoming::TooLarge) => {
                tracing::warn!(
                    "userspace API: {}; closing the connection",
                    UapiError::TooLarge
                );
                let _ = write_half
                    .write_all(errno_response(UapiError::TooLarge.errno()).as_bytes())
                    .await;
                return;
            }
            Ok(Incoming::Eof) => return,
            Err(e) => {
                tracing::debug!("userspace API: connection read failed: {e}");
                return;
            }
        };
        if let Err(e) = write_half.write_all(response.as_bytes()).await {
            tracing::debug!("userspace API: connection write failed: {e}");
            return;
        }
    }
}

/// What came in on a connection.
enum Incoming {
    /// The lines of one request, each with its newline, without the terminating empty line.
    Request(Vec<u8>),
    /// A line or the request exceeded the limits.
    TooLarge,
    /// The client closed the connection (a partial request is discarded).
    Eof,
}

async fn read_request<R: AsyncBufRead + Unpin>(reader: &mut R) -> io::Result<Incoming> {
    let mut request = Vec::new();
    let mut text = Vec::new();
    loop {
        text.clear();
        let limit = MAX_LINE_BYTES as u64 + 1;
        let n = (&mut *reader)
            .take(limit)
            .read_until(b'\n', &mut text)
            .await?;
        if n == 0 {
            return Ok(Incoming::Eof);
        }
        if text.last() != Some(&b'\n') {
            // Either the line is too long or the stream ended in the middle of it.
            return Ok(if text.len() > MAX_LINE_BYTES {
                Incoming::TooLarge
            } else {
                Incoming::Eof
            });
        }
        if text == b"\n" {
            if request.is_empty() {
                continue; // a stray empty line between requests
            }
            return Ok(Incoming::Request(request));
        }
        if request.len() + text.len() > MAX_REQUEST_BYTES {
            return Ok(Incoming::TooLarge);
        }
        request.extend_from_slice(&text);
    }
}

/// `errno=0`, or `errno=-N` for the positive errno `N` (see the module documentation).
fn errno_response(errno: i32) -> String {
    if errno == 0 {
        "errno=0\n\n".to_string()
    } else {
        format!("errno=-{}\n\n", errno.unsigned_abs())
    }
}

/// Answers one complete request (its lines, without the terminating empty line).
fn handle_request(handler: &dyn UapiHandler, set_lock: &Mutex<()>, request: &[u8]) -> String {
    match try_handle_request(handler, set_lock, request) {
        Ok(response) => response,
        Err(e) => {
            tracing::warn!("userspace API: {e}");
            errno_response(e.errno())
        }
    }
}

fn try_handle_request(
    handler: &dyn UapiHandler,
    set_lock: &Mutex<()>,
    request: &[u8],
) -> Result<String, UapiError> {
    let text = std::str::from_utf8(request).map_err(|_| UapiError::NotUtf8)?;
    let (op, body) = text.split_once('\n').unwrap_or((text, ""));
    match op {
        "get=1" | "get=meshlink" if !body.is_empty() => {
            Err(UapiError::Malformed(format!("{op} takes no arguments")))
        }
        "get=1" => Ok(render_get(&handler.config(), &handler.status())),
        "get=meshlink" => {
            // Raw newlines in JSON text can only be whitespace: flatten to one line.
            let json = handler.status_json().replace(['\n', '\r'], " ");
            Ok(format!("{json}\nerrno=0\n\n"))
        }
        _ if op.starts_with("claim=") => {
            let name = &op["claim=".len()..];
            if !body.is_empty() {
                return Err(UapiError::Malformed("claim takes no arguments".into()));
            }
            Ok(match handler.claim(name) {
                Ok(generation) => format!("generation={generation}\nerrno=0\n\n"),
                Err(message) => {
                    tracing::warn!("userspace API: claim of {}: {message}", clip(name));
                    format!(
                        "message={}\nerrno=-{}\n\n",
                        message.replace(['\n', '\r'], " "),
                        libc::EPERM
                    )
                }
            })
        }
        "set=1" => {
            let _serialized = set_lock
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let current = handler.config();
            let new = apply_set(&current, body)?;
            if new != current {
                handler.apply(new)?;
                tracing::info!("userspace API: configuration updated");
            }
            Ok(errno_response(0))
        }
        _ => Err(UapiError::UnknownOperation(clip(op))),
    }
}

// ---------------------------------------------------------------------------------------------
// Socket setup and the client

/// Creates the userspace API socket `dir/INTERFACE.sock` and listens on it.
///
/// Refuses if a live process already answers on the socket (another daemon owns the
/// interface) or if a non-socket file is in the way, and removes a stale socket left by a dead
/// process. Must be called within a Tokio runtime.
///
/// # Security
/// `get=1` reveals the private key and `set=1` changes peers, so no other user may reach the
/// socket at any moment, nor replace it:
/// - `dir` is made with mode 0700 when missing; an existing `dir` must be a directory owned
///   by root or by this process's user that group and others cannot write to (a root-owned
///   0755 `/var/run/wireguard`, as stock WireGuard makes it, qualifies), else
///   [`UapiError::UnsafeDirectory`] and nothing is touched;
/// - the socket is bound inside a fresh 0700 directory of its own within `dir`, restricted to
///   its owner (0600) there, and only then linked into place under its name (a link fails
///   rather than replace a socket that appeared meanwhile). Binding in place and then
///   changing the mode would leave it open, for an instant, as the umask allows.
///
/// # Errors
/// [`UapiError::InvalidInterface`], [`UapiError::UnsafeDirectory`], [`UapiError::InUse`],
/// [`UapiError::NotASocket`], [`UapiError::NoRuntime`] or [`UapiError::Io`].
pub fn bind(dir: &Path, interface: &str) -> Result<Listener, UapiError> {
    if interface.is_empty()
        || interface.len() > 15
        || interface == "."
        || interface == ".."
        || interface
            .bytes()
            .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace())
    {
        return Err(UapiError::InvalidInterface(clip(interface)));
    }
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(UapiError::NoRuntime);
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| UapiError::io("creating", dir, e))?;
    check_socket_dir(dir)?;

    let path = dir.join(format!("{interface}.sock"));
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if !meta.file_type().is_socket() => return Err(UapiError::NotASocket(path)),
        Ok(_) => match std::os::unix::net::UnixStream::connect(&path) {
            Ok(_) => {
                return Err(UapiError::InUse {
                    interface: interface.to_string(),
                    path,
                })
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!("removing stale userspace API socket {}", path.display());
                std::fs::remove_file(&path)
                    .map_err(|e| UapiError::io("removing stale", &path, e))?;
            }
            Err(e) => return Err(UapiError::io("probing", &path, e)),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(UapiError::io("inspecting", &path, e)),
    }

    let private = PrivateDir::create(dir, interface)?;
    let staged = private.path.join("s");
    let std_listener = std::os::unix::net::UnixListener::bind(&staged)
        .map_err(|e| UapiError::io("binding", &staged, e))?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| UapiError::io("restricting", &staged, e))?;
    std::fs::hard_link(&staged, &path).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            UapiError::InUse {
                interface: interface.to_string(),
                path: path.clone(),
            }
        } else {
            UapiError::io("linking", &path, e)
        }
    })?;
    drop(private);
    let finish = || -> io::Result<UnixListener> {
        std_listener.set_nonblocking(true)?;
        UnixListener::from_std(std_listener)
    };
    match finish() {
        Ok(inner) => Ok(Listener { inner, path }),
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            Err(UapiError::io("setting up", &path, e))
        }
    }
}

/// A listening userspace API socket, made by [`bind`], for [`serve`]. The kernel knows the
/// socket by the private path it was bound at (see [`bind`]); this keeps the path it is
/// reached at, which [`serve`] removes on shutdown.
#[derive(Debug)]
pub struct Listener {
    inner: UnixListener,
    path: PathBuf,
}

impl Listener {
    /// Where clients reach the socket: `dir/INTERFACE.sock`.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Checks that the existing socket directory `dir` lets no other user reach or replace what
/// it holds: a directory, owned by root or this process's user, not writable by group or
/// others.
fn check_socket_dir(dir: &Path) -> Result<(), UapiError> {
    let euid = nix::unistd::geteuid().as_raw();
    let meta = std::fs::metadata(dir).map_err(|e| UapiError::io("inspecting", dir, e))?;
    let refuse = |reason: String| UapiError::UnsafeDirectory {
        path: dir.to_path_buf(),
        reason,
        euid,
    };
    if !meta.is_dir() {
        return Err(refuse("is not a directory".into()));
    }
    if meta.uid() != 0 && meta.uid() != euid {
        return Err(refuse(format!("is owned by uid {}", meta.uid())));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(refuse(format!(
            "has mode {mode:04o}, writable by group or others"
        )));
    }
    Ok(())
}

/// A fresh 0700 directory inside the socket directory where the socket is bound before it is
/// linked into place; removed (with what it holds) when dropped.
struct PrivateDir {
    path: PathBuf,
}

impl PrivateDir {
    fn create(dir: &Path, interface: &str) -> Result<Self, UapiError> {
        let mut attempt = 0u32;
        loop {
            let path = dir.join(format!(
                ".{interface}.sock.{}.{attempt}",
                std::process::id()
            ));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(PrivateDir { path }),
                // Left by an earlier process with this pid that was killed while binding.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 16 => {
                    let _ = std::fs::remove_dir_all(&path);
                    attempt += 1;
                }
                Err(e) => return Err(UapiError::io("creating", &path, e)),
            }
        }
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Sends one request to the userspace API socket at `path` and returns the whole response,
/// through its final `errno=N` line and empty line (see [`response_errno`]).
///
/// `body` is the request, e.g. `"get=meshlink\n"`; the terminating empty line is added if missing.
///
/// # Errors
/// Connection failures, a response cut short or larger than 64 MiB, and no complete answer within
/// 10 seconds (`TimedOut`).
pub async fn request(path: &Path, body: &str) -> io::Result<String> {
    let exchange = async {
        let mut stream = UnixStream::connect(path).await?;
        let mut req = body.trim_end_matches('\n').to_string();
        if req.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "empty userspace API request",
            ));
        }
        req.push_str("\n\n");
        stream.write_all(req.as_bytes()).await?;

        let mut reader = BufReader::new(stream);
        let mut response = Vec::new();
        let mut after_errno = false;
        loop {
            let start = response.len();
            let n = (&mut reader)
                .take((MAX_RESPONSE_BYTES + 1 - start) as u64)
                .read_until(b'\n', &mut response)
                .await?;
            if response.len() > MAX_RESPONSE_BYTES {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "userspace API response too large",
                ));
            }
            let text = &response[start..];
            if n == 0 || text.last() != Some(&b'\n') {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "userspace API response cut short",
                ));
            }
            if text == b"\n" && after_errno {
                break;
            }
            after_errno = text.starts_with(b"errno=");
        }
        String::from_utf8(response).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "userspace API response is not UTF-8",
            )
        })
    };
    tokio::time::timeout(CLIENT_TIMEOUT, exchange)
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "no answer from the userspace API socket",
            )
        })?
}

/// The positive errno of a response's last `errno=N` line (0 for success), if it has one.
/// Both `errno=-22` (wireguard-go and this server) and `errno=22` read as 22.
pub fn response_errno(response: &str) -> Option<i32> {
    response
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("errno="))
        .and_then(|n| n.parse::<i32>().ok())
        .and_then(i32::checked_abs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyfile::test_support::TempDir;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn key_hex(byte: u8) -> String {
        format!("{byte:02x}").repeat(32)
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn peer(byte: u8, nets: &[&str]) -> PeerConfig {
        PeerConfig {
            public_key: PublicKey([byte; 32]),
            preshared_key: None,
            endpoint: None,
            allowed_ips: nets.iter().map(|s| net(s)).collect(),
            persistent_keepalive: None,
        }
    }

    fn sample_config() -> DeviceConfig {
        let mut a = peer(2, &["10.0.0.2/32", "fd00::2/128"]);
        a.preshared_key = Some(Key([9; 32]));
        a.endpoint = Some("192.0.2.1:51820".parse().unwrap());
        a.persistent_keepalive = Some(25);
        let mut b = peer(3, &["10.0.1.0/24"]);
        b.endpoint = Some("[2001:db8::1]:4000".parse().unwrap());
        DeviceConfig {
            private_key: PrivateKey::from_bytes([1; 32]),
            listen_port: 0,
            fwmark: Some(0x42),
            peers: vec![a, b],
        }
    }

    fn sample_status() -> DeviceStatus {
        DeviceStatus {
            listen_port: 51820,
            peers: vec![
                PeerStatus {
                    public_key: PublicKey([2; 32]),
                    // roamed, and reported through a dual-stack socket
                    endpoint: Some(SocketAddr::new(
                        IpAddr::V6(Ipv4Addr::new(198, 51, 100, 7).to_ipv6_mapped()),
                        1234,
                    )),
                    last_handshake: Some(UNIX_EPOCH + Duration::new(1_700_000_000, 5)),
                    tx_bytes: 100,
                    rx_bytes: 200,
                    tx_packets: 0,
                    rx_packets: 0,
                    handshakes: 0,
                    drops: DropCounts::default(),
                },
                PeerStatus {
                    public_key: PublicKey([3; 32]),
                    endpoint: None,
                    last_handshake: None,
                    tx_bytes: 0,
                    rx_bytes: 0,
                    tx_packets: 0,
                    rx_packets: 0,
                    handshakes: 0,
                    drops: DropCounts::default(),
                },
            ],
        }
    }

    #[test]
    fn render_get_exact_text() {
        // PrivateKey::from_bytes clamps [1; 32] to 00 01 .. 01 41.
        let private = format!("00{}41", "01".repeat(30));
        let expected = format!(
            "private_key={private}\n\
             listen_port=51820\n\
             fwmark=66\n\
             public_key={}\n\
             preshared_key={}\n\
             protocol_version=1\n\
             endpoint=198.51.100.7:1234\n\
             last_handshake_time_sec=1700000000\n\
             last_handshake_time_nsec=5\n\
             tx_bytes=100\n\
             rx_bytes=200\n\
             persistent_keepalive_interval=25\n\
             allowed_ip=10.0.0.2/32\n\
             allowed_ip=fd00::2/128\n\
             public_key={}\n\
             protocol_version=1\n\
             endpoint=[2001:db8::1]:4000\n\
             last_handshake_time_sec=0\n\
             last_handshake_time_nsec=0\n\
             tx_bytes=0\n\
             rx_bytes=0\n\
             persistent_keepalive_interval=0\n\
             allowed_ip=10.0.1.0/24\n\
             errno=0\n\n",
            key_hex(2),
            key_hex(9),
            key_hex(3),
        );
        assert_eq!(render_get(&sample_config(), &sample_status()), expected);
    }

    #[test]
    fn render_get_without_status_uses_config() {
        let mut config = sample_config();
        config.listen_port = 7000;
        config.fwmark = Some(0);
        let text = render_get(&config, &DeviceStatus::default());
        assert!(text.contains("listen_port=7000\n"));
        assert!(!text.contains("fwmark"));
        assert!(text.contains("endpoint=192.0.2.1:51820\n"));
        assert!(text.ends_with("errno=0\n\n"));
    }

    #[test]
    fn set_adds_peer() {
        let current = sample_config();
        let req = format!(
            "public_key={}\nendpoint=[::1]:9\npersistent_keepalive_interval=10\n\
             allowed_ip=10.9.0.77/16\nallowed_ip=10.9.1.1/16\nprotocol_version=1\n",
            key_hex(4)
        );
        let new = apply_set(&current, &req).unwrap();
        assert_eq!(new.peers.len(), 3);
        let p = &new.peers[2];
        assert_eq!(p.public_key, PublicKey([4; 32]));
        assert_eq!(
            p.endpoint,
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 9))
        );
        assert_eq!(p.persistent_keepalive, Some(10));
        assert_eq!(p.allowed_ips, vec![net("10.9.0.0/16")]);
        assert_eq!(new.peers[..2], current.peers[..]);
    }

    #[test]
    fn set_device_keys() {
        let current = sample_config();
        let req = format!("private_key={}\nlisten_port=1234\nfwmark=0\n", key_hex(7));
        let new = apply_set(&current, &req).unwrap();
        assert_eq!(new.private_key, PrivateKey::from_bytes([7; 32]));
        assert_eq!(new.listen_port, 1234);
        assert_eq!(new.fwmark, None);
        assert_eq!(new.peers, current.peers);
    }

    #[test]
    fn update_only_on_absent_peer_is_ignored() {
        let current = sample_config();
        let req = format!(
            "public_key={}\nupdate_only=true\nallowed_ip=10.0.0.2/32\n",
            key_hex(5)
        );
        assert_eq!(apply_set(&current, &req).unwrap(), current);

        // ...but it updates a peer that exists.
        let req = format!(
            "public_key={}\nupdate_only=true\nendpoint=1.2.3.4:5\n",
            key_hex(3)
        );
        let new = apply_set(&current, &req).unwrap();
        assert_eq!(new.peers[1].endpoint, Some("1.2.3.4:5".parse().unwrap()));
    }

    #[test]
    fn remove_peer() {
        let current = sample_config();
        let req = format!(
            "public_key={}\nremove=true\nallowed_ip=10.0.0.2/32\n",
            key_hex(2)
        );
        let new = apply_set(&current, &req).unwrap();
        assert_eq!(new.peers, vec![current.peers[1].clone()]);
        // Removing an absent peer is a no-op.
        let req = format!("public_key={}\nremove=true\n", key_hex(8));
        assert_eq!(apply_set(&current, &req).unwrap(), current);
    }

    #[test]
    fn replace_peers() {
        let current = sample_config();
        let req = format!(
            "replace_peers=true\npublic_key={}\nallowed_ip=10.0.0.3/32\n",
            key_hex(3)
        );
        let new = apply_set(&current, &req).unwrap();
        assert_eq!(new.peers, vec![peer(3, &["10.0.0.3/32"])]);
    }

    #[test]
    fn replace_allowed_ips() {
        let current = sample_config();
        let req = format!(
            "public_key={}\nreplace_allowed_ips=true\nallowed_ip=10.5.0.0/24\nallowed_ip=10.5.0.0/24\n",
            key_hex(2)
        );
        let new = apply_set(&current, &req).unwrap();
        assert_eq!(new.peers[0].allowed_ips, vec![net("10.5.0.0/24")]);
        assert_eq!(new.peers[0].endpoint, current.peers[0].endpoint);
    }

    #[test]
    fn allowed_ip_moves_between_peers() {
        let current = sample_config();
        let req = format!("public_key={}\nallowed_ip=10.0.0.2/32\n", key_hex(3));
        let new = apply_set(&current, &req).unwrap();
        assert_eq!(new.peers[0].allowed_ips, vec![net("fd00::2/128")]);
        assert_eq!(
            new.peers[1].allowed_ips,
            vec![net("10.0.1.0/24"), net("10.0.0.2/32")]
        );
    }

    #[test]
    fn zero_preshared_key_clears_it() {
        let current = sample_config();
        let req = format!("public_key={}\npreshared_key={}\n", key_hex(2), key_hex(0));
        let new = apply_set(&current, &req).unwrap();
        assert_eq!(new.peers[0].preshared_key, None);
    }

    #[test]
    fn own_public_key_is_not_a_peer() {
        let current = sample_config();
        let own = Key(current.private_key.public_key().0).to_hex();
        let req = format!("public_key={own}\nallowed_ip=10.7.0.0/16\n");
        assert_eq!(apply_set(&current, &req).unwrap(), current);
    }

    #[test]
    fn errors_leave_config_unchanged() {
        let current = sample_config();
        let snapshot = current.clone();
        let cases: Vec<(String, i32)> = vec![
            (
                format!(
                    "public_key={}\nendpoint=1.2.3.4:5\npreshared_key=zz\n",
                    key_hex(2)
                ),
                libc::EINVAL,
            ),
            (format!("public_key={}\n", &key_hex(2)[..62]), libc::EINVAL),
            (format!("public_key=+{}\n", &key_hex(2)[1..]), libc::EINVAL),
            ("listen_port=1\nbogus=1\n".to_string(), libc::EINVAL),
            ("endpoint=1.2.3.4:5\n".to_string(), libc::EINVAL),
            (
                format!("public_key={}\nlisten_port=5\n", key_hex(2)),
                libc::EINVAL,
            ),
            ("listen_port=65536\n".to_string(), libc::EINVAL),
            ("listen_port=+5\n".to_string(), libc::EINVAL),
            ("fwmark=-1\n".to_string(), libc::EINVAL),
            ("replace_peers=false\n".to_string(), libc::EINVAL),
            (format!("private_key={}\n", key_hex(0)), libc::EOPNOTSUPP),
            (
                format!("public_key={}\nendpoint=host:51820\n", key_hex(2)),
                libc::EINVAL,
            ),
            (
                format!("public_key={}\nallowed_ip=10.0.0.1\n", key_hex(2)),
                libc::EINVAL,
            ),
            (
                format!("public_key={}\nprotocol_version=2\n", key_hex(2)),
                libc::EPROTO,
            ),
            (
                "replace_peers=true\nno equals sign\n".to_string(),
                libc::EPROTO,
            ),
        ];
        for (req, errno) in cases {
            let err = apply_set(&current, &req).expect_err(&req);
            assert_eq!(err.errno(), errno, "{req}: {err}");
            assert_eq!(current, snapshot);
        }
    }

    #[test]
    fn secrets_stay_out_of_errors() {
        let secret = format!("{}q", &key_hex(0xab)[..63]);
        let err = apply_set(&sample_config(), &format!("private_key={secret}\n")).unwrap_err();
        assert!(!err.to_string().contains("abab"), "{err}");
    }

    #[test]
    fn response_errno_parses() {
        assert_eq!(response_errno("a=1\nerrno=0\n\n"), Some(0));
        assert_eq!(response_errno("errno=22\n\n"), Some(22));
        assert_eq!(response_errno("errno=-22\n\n"), Some(22));
        assert_eq!(response_errno("nothing\n"), None);
    }

    // --- server tests ---

    struct FakeHandler {
        config: Mutex<DeviceConfig>,
        applied: AtomicUsize,
        fail_apply: bool,
    }

    impl FakeHandler {
        fn new(config: DeviceConfig) -> Arc<Self> {
            Arc::new(FakeHandler {
                config: Mutex::new(config),
                applied: AtomicUsize::new(0),
                fail_apply: false,
            })
        }
    }

    impl UapiHandler for FakeHandler {
        fn config(&self) -> DeviceConfig {
            self.config.lock().unwrap().clone()
        }
        fn status(&self) -> DeviceStatus {
            sample_status()
        }
        fn apply(&self, new: DeviceConfig) -> Result<(), ApplyError> {
            if self.fail_apply {
                // As the agent answers a listen port another socket holds.
                return Err(ApplyError::ListenPort {
                    port: new.listen_port,
                    source: crate::platform::udp::UdpError::PortInUse(new.listen_port),
                });
            }
            self.applied.fetch_add(1, Ordering::SeqCst);
            *self.config.lock().unwrap() = new;
            Ok(())
        }
        fn status_json(&self) -> String {
            serde_json::to_string_pretty(&self.status()).unwrap()
        }
    }

    async fn read_response(reader: &mut BufReader<UnixStream>) -> String {
        let mut out = String::new();
        loop {
            let mut l = String::new();
            if reader.read_line(&mut l).await.unwrap() == 0 {
                return out;
            }
            let done = l == "\n" && out.lines().last().is_some_and(|p| p.starts_with("errno="));
            out.push_str(&l);
            if done {
                return out;
            }
        }
    }

    #[tokio::test]
    async fn server_round_trip() {
        let tmp = TempDir::new("serve");
        let dir = tmp.path("nested");
        let listener = bind(&dir, "mltest0").unwrap();
        let path = dir.join("mltest0.sock");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        // A second daemon for the same interface is refused.
        let err = bind(&dir, "mltest0").unwrap_err();
        assert!(matches!(err, UapiError::InUse { .. }), "{err}");
        assert!(err.to_string().contains("mltest0"));

        let handler = FakeHandler::new(sample_config());
        let (stop_tx, stop_rx) = watch::channel(false);
        let server = tokio::spawn(serve(listener, handler.clone(), stop_rx));

        // Several requests on one connection.
        let mut conn = BufReader::new(UnixStream::connect(&path).await.unwrap());
        conn.get_mut().write_all(b"get=1\n\n").await.unwrap();
        assert_eq!(
            read_response(&mut conn).await,
            render_get(&sample_config(), &sample_status())
        );

        let set = format!(
            "set=1\npublic_key={}\nallowed_ip=10.44.0.1/32\n\n",
            key_hex(6)
        );
        conn.get_mut().write_all(set.as_bytes()).await.unwrap();
        assert_eq!(read_response(&mut conn).await, "errno=0\n\n");
        assert_eq!(handler.config().peers.len(), 3);
        assert_eq!(handler.applied.load(Ordering::SeqCst), 1);

        conn.get_mut()
            .write_all(b"set=1\nlisten_port=banana\n\n")
            .await
            .unwrap();
        assert_eq!(read_response(&mut conn).await, "errno=-22\n\n");
        conn.get_mut().write_all(b"get=2\n\n").await.unwrap();
        assert_eq!(read_response(&mut conn).await, "errno=-71\n\n");
        conn.get_mut()
            .write_all(b"set=1\nfwmark=\xff\n\n")
            .await
            .unwrap();
        assert_eq!(read_response(&mut conn).await, "errno=-22\n\n");
        assert_eq!(handler.config().peers.len(), 3);

        // The extension op, through the client helper.
        let answer = request(&path, "get=meshlink").await.unwrap();
        let (json, rest) = answer.split_once('\n').unwrap();
        assert_eq!(rest, "errno=0\n\n");
        let value: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(value["listen_port"], 51820);
        assert_eq!(
            response_errno(&request(&path, "get=1\n\n").await.unwrap()),
            Some(0)
        );

        // An overlong line: errno, then the connection closes.
        let mut big = BufReader::new(UnixStream::connect(&path).await.unwrap());
        big.get_mut()
            .write_all(&vec![b'a'; MAX_LINE_BYTES + 10])
            .await
            .unwrap();
        assert_eq!(read_response(&mut big).await, "errno=-90\n\n");
        let mut rest = Vec::new();
        assert_eq!(big.read_to_end(&mut rest).await.unwrap_or(0), 0);

        // An oversized request made of acceptable lines.
        let mut huge = UnixStream::connect(&path).await.unwrap();
        let mut body = b"set=1\n".to_vec();
        while body.len() <= MAX_REQUEST_BYTES {
            body.extend_from_slice(b"allowed_ip=10.0.0.0/8\n");
        }
        let (mut rd, mut wr) = huge.split();
        let (_, answer) = tokio::join!(wr.write_all(&body), async {
            let mut got = Vec::new();
            let _ = rd.read_to_end(&mut got).await;
            got
        });
        assert!(
            answer.is_empty() || answer == b"errno=-90\n\n",
            "{answer:?}"
        );
        drop(huge);

        // The server survived all of that, and the first connection is still served.
        assert_eq!(
            response_errno(&request(&path, "get=1").await.unwrap()),
            Some(0)
        );
        conn.get_mut().write_all(b"get=1\n\n").await.unwrap();
        assert!(read_response(&mut conn).await.ends_with("errno=0\n\n"));

        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
        assert!(!path.exists(), "serve removes its socket on shutdown");
        // A stale socket file does not stop a new daemon.
        let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(stale);
        drop(bind(&dir, "mltest0").unwrap());
        std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
    }

    #[tokio::test]
    async fn apply_failure_answers_its_errno() {
        let tmp = TempDir::new("eio");
        let dir = tmp.path("uapi");
        let listener = bind(&dir, "mltest1").unwrap();
        let handler = Arc::new(FakeHandler {
            config: Mutex::new(sample_config()),
            applied: AtomicUsize::new(0),
            fail_apply: true,
        });
        let (_stop_tx, stop_rx) = watch::channel(false);
        let server = tokio::spawn(serve(listener, handler, stop_rx));
        let answer = request(&dir.join("mltest1.sock"), "set=1\nlisten_port=9\n")
            .await
            .unwrap();
        assert_eq!(answer, format!("errno=-{}\n\n", libc::EADDRINUSE));
        assert_eq!(
            ApplyError::Unsupported(String::new()).errno(),
            libc::EOPNOTSUPP
        );
        drop(_stop_tx); // a dropped sender also stops the server
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn bind_refusals() {
        let tmp = TempDir::new("refuse");
        let dir = tmp.path("uapi");
        assert!(matches!(
            bind(&dir, "a/b"),
            Err(UapiError::InvalidInterface(_))
        ));
        assert!(matches!(
            bind(&dir, "waytoolonginterface"),
            Err(UapiError::InvalidInterface(_))
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("mltest2.sock"), b"not a socket").unwrap();
        assert!(matches!(
            bind(&dir, "mltest2"),
            Err(UapiError::NotASocket(_))
        ));
        assert!(dir.join("mltest2.sock").is_file());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The socket directory: one made here is 0700 and holds nothing but the socket after
    /// `bind` (the socket is made in a private directory inside it and linked into place); an
    /// existing one that group or others may write to is refused, naming it, and left as it is.
    #[tokio::test]
    async fn socket_directory_is_private_or_refused() {
        let tmp = TempDir::new("dirmode");
        let made = tmp.path("made/uapi");
        drop(bind(&made, "mltest4").unwrap());
        let mode = std::fs::metadata(&made).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700, "a socket directory made by bind is 0700");
        let entries: Vec<String> = std::fs::read_dir(&made)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(entries, ["mltest4.sock"], "only the socket is left");
        let mode = std::fs::symlink_metadata(made.join("mltest4.sock"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        // A root-owned 0755 directory (as /var/run/wireguard is) or our own is fine.
        let shared = tmp.path("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
        drop(bind(&shared, "mltest4").unwrap());

        for mode in [0o777, 0o775, 0o1777, 0o757] {
            let dir = tmp.path(&format!("open{mode:o}"));
            std::fs::create_dir(&dir).unwrap();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
            match bind(&dir, "mltest4") {
                Ok(_) => panic!("bind accepted a socket directory with mode {mode:o}"),
                Err(e) => {
                    assert!(
                        matches!(e, UapiError::UnsafeDirectory { .. }),
                        "mode {mode:o}: {e}"
                    );
                    assert!(e.to_string().contains(&*dir.to_string_lossy()), "{e}");
                }
            }
            assert!(!dir.join("mltest4.sock").exists());
            let after = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o7777;
            assert_eq!(after, mode, "a refused directory is left as it is");
        }

        // A directory owned by another user (root only can make one).
        if nix::unistd::Uid::effective().is_root() {
            let theirs = tmp.path("theirs");
            std::fs::create_dir(&theirs).unwrap();
            std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o755)).unwrap();
            std::os::unix::fs::chown(&theirs, Some(4242), Some(4242)).unwrap();
            match bind(&theirs, "mltest4") {
                Ok(_) => panic!("bind accepted a socket directory owned by uid 4242"),
                Err(e) => {
                    assert!(matches!(e, UapiError::UnsafeDirectory { .. }), "{e}");
                    assert!(e.to_string().contains("4242"), "{e}");
                }
            }
        } else {
            println!("part of socket_directory_is_private_or_refused skipped: needs root");
        }
    }

    #[test]
    fn bind_needs_runtime() {
        assert!(matches!(
            bind(&TempDir::new("nort").path("uapi"), "mltest3"),
            Err(UapiError::NoRuntime)
        ));
    }

    /// Proves compatibility with the real `wg` tool, which only looks in /var/run/wireguard.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wg_tool_compatibility() {
        let wg = Path::new("/usr/bin/wg");
        if !wg.exists() || !nix::unistd::Uid::effective().is_root() {
            println!("skipping wg_tool_compatibility: needs root and /usr/bin/wg");
            return;
        }
        let dir = Path::new(crate::settings::DEFAULT_UAPI_DIR);
        let iface = format!("mltest{}", std::process::id());
        let listener = bind(dir, &iface).unwrap();
        let path = dir.join(format!("{iface}.sock"));
        let handler = FakeHandler::new(sample_config());
        let (stop_tx, stop_rx) = watch::channel(false);
        let server = tokio::spawn(serve(listener, handler.clone(), stop_rx));

        let run = |args: Vec<String>| {
            tokio::task::spawn_blocking(move || {
                std::process::Command::new("/usr/bin/wg")
                    .args(&args)
                    .output()
            })
        };
        let new_peer = PublicKey([0x55; 32]).to_base64();

        let show = run(vec!["showconf".into(), iface.clone()])
            .await
            .unwrap()
            .unwrap();
        let set = run(vec![
            "set".into(),
            iface.clone(),
            "peer".into(),
            new_peer.clone(),
            "allowed-ips".into(),
            "10.0.0.1/32".into(),
        ])
        .await
        .unwrap()
        .unwrap();
        let human = run(vec!["show".into(), iface.clone()])
            .await
            .unwrap()
            .unwrap();
        let bad = run(vec![
            "set".into(),
            iface.clone(),
            "private-key".into(),
            "/dev/null".into(),
        ])
        .await
        .unwrap()
        .unwrap();

        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
        let _ = std::fs::remove_file(&path);

        let showconf = String::from_utf8_lossy(&show.stdout);
        assert!(show.status.success(), "{show:?}");
        let config = sample_config();
        assert!(
            showconf.contains(&format!(
                "PrivateKey = {}",
                config.private_key.to_key().to_base64()
            )),
            "{showconf}"
        );
        assert!(showconf.contains("ListenPort = 51820"), "{showconf}");
        assert!(showconf.contains("FwMark = 0x42"), "{showconf}");
        assert!(
            showconf.contains(&format!("PublicKey = {}", PublicKey([2; 32]).to_base64())),
            "{showconf}"
        );
        assert!(
            showconf.contains(&format!("PresharedKey = {}", Key([9; 32]).to_base64())),
            "{showconf}"
        );
        assert!(
            showconf.contains("AllowedIPs = 10.0.0.2/32, fd00::2/128"),
            "{showconf}"
        );
        assert!(
            showconf.contains("Endpoint = 198.51.100.7:1234"),
            "{showconf}"
        );
        assert!(
            showconf.contains("Endpoint = [2001:db8::1]:4000"),
            "{showconf}"
        );
        assert!(showconf.contains("PersistentKeepalive = 25"), "{showconf}");

        assert!(set.status.success(), "{set:?}");
        let added = handler
            .config()
            .peers
            .into_iter()
            .find(|p| p.public_key == PublicKey([0x55; 32]));
        assert_eq!(added.map(|p| p.allowed_ips), Some(vec![net("10.0.0.1/32")]));

        let human = String::from_utf8_lossy(&human.stdout);
        assert!(human.contains(&format!("peer: {new_peer}")), "{human}");
        assert!(
            human.contains("transfer: 200 B received, 100 B sent"),
            "{human}"
        );

        // An all-zero private key is refused, and wg reports the errno.
        assert!(!bad.status.success(), "{bad:?}");
        let complaint = String::from_utf8_lossy(&bad.stderr);
        assert!(complaint.contains("Operation not supported"), "{complaint}");
        assert_eq!(handler.config().private_key, config.private_key);
    }
}
