//! The server: the socket, made safely ([`bind`]), and the loop that answers requests on it
//! ([`serve`]), one task per connection.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshlink_proto::agent_session::ClaimError;
use meshlink_uapi::{errno_response, MAX_LINE_BYTES, MAX_REQUEST_BYTES};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::{apply_set, clip, render_get, UapiError, UapiHandler};
use crate::control::workloads::ClaimFailure;

/// Pause after a failed `accept`, so that running out of file descriptors does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

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
pub(super) async fn shutdown_requested(rx: &mut watch::Receiver<bool>) {
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
        if let Ok(Incoming::Request(bytes)) = &outcome {
            if bytes.starts_with(super::watch::OP.as_bytes()) {
                let request = String::from_utf8_lossy(bytes).into_owned();
                super::watch::serve(
                    &request,
                    handler.handovers(),
                    &mut reader,
                    &mut write_half,
                    &mut shutdown,
                )
                .await;
                return;
            }
        }
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
pub(super) enum Incoming {
    /// The lines of one request, each with its newline, without the terminating empty line.
    Request(Vec<u8>),
    /// A line or the request exceeded the limits.
    TooLarge,
    /// The client closed the connection (a partial request is discarded).
    Eof,
}

pub(super) async fn read_request<R: AsyncBufRead + Unpin>(reader: &mut R) -> io::Result<Incoming> {
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
                Err(failure) => {
                    tracing::warn!("userspace API: claim of {}: {failure}", clip(name));
                    format!(
                        "message={}\n{}",
                        failure.to_string().replace(['\n', '\r'], " "),
                        errno_response(claim_errno(&failure))
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
    meshlink_uapi::check_interface_name(interface)?;
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(UapiError::NoRuntime);
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| UapiError::io("creating", dir, e))?;
    check_socket_dir(dir)?;

    let path = meshlink_uapi::socket_path(dir, interface);
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

/// The errno a failed claim is answered with (the message says the rest).
fn claim_errno(failure: &ClaimFailure) -> i32 {
    match failure {
        ClaimFailure::Session(ClaimError::Refused(_) | ClaimError::NoResult) => libc::EPERM,
        ClaimFailure::Session(ClaimError::SessionLost) | ClaimFailure::Stopped => libc::ENOTCONN,
        ClaimFailure::Session(ClaimError::Expired) | ClaimFailure::Timeout(_) => libc::ETIMEDOUT,
        ClaimFailure::Busy => libc::EAGAIN,
        ClaimFailure::NotJoined => libc::EOPNOTSUPP,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyfile::test_support::TempDir;
    use crate::settings::DeviceConfig;
    use crate::uapi::protocol::tests::{key_hex, net, sample_config, sample_status};
    use crate::uapi::{request, response_errno, ApplyError, DeviceStatus};
    use meshlink_proto::{Key, PublicKey};
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct FakeHandler {
        config: Mutex<DeviceConfig>,
        applied: AtomicUsize,
        fail_apply: bool,
        handovers: Option<crate::control::handover::Handovers>,
    }

    impl FakeHandler {
        fn new(config: DeviceConfig) -> Arc<Self> {
            Arc::new(FakeHandler {
                config: Mutex::new(config),
                applied: AtomicUsize::new(0),
                fail_apply: false,
                handovers: None,
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
        fn handovers(&self) -> Option<&crate::control::handover::Handovers> {
            self.handovers.as_ref()
        }
    }

    /// An application registers for a workload on the socket (with the blocking client
    /// applications use), hears the agent's events, and its answer reaches the control loop;
    /// one application per workload, and none without a mesh session.
    #[tokio::test]
    async fn live_migration_registrations_on_the_socket() {
        use crate::control::handover::{Answer, Handovers};
        use meshlink_uapi::handover::{AgentEvent, AppAnswer, Watch, WatchError};
        let tmp = TempDir::new("watch");
        let dir = tmp.path("sock");
        let path = dir.join("mltest1.sock");
        let handler = Arc::new(FakeHandler {
            config: Mutex::new(sample_config()),
            applied: AtomicUsize::new(0),
            fail_apply: false,
            handovers: Some(Handovers::default()),
        });
        let h = || handler.handovers.as_ref().unwrap();
        let mut answers = h().take_answers().unwrap();
        let (stop_tx, stop_rx) = watch::channel(false);
        let server = tokio::spawn(serve(
            bind(&dir, "mltest1").unwrap(),
            handler.clone(),
            stop_rx,
        ));

        let p = path.clone();
        let mut app = tokio::task::spawn_blocking(move || Watch::open(&p, "chat"))
            .await
            .unwrap()
            .unwrap();
        let p = path.clone();
        let second = tokio::task::spawn_blocking(move || Watch::open(&p, "chat"))
            .await
            .unwrap();
        assert!(
            matches!(&second, Err(WatchError::Refused { errno, message }) if *errno == libc::EBUSY && message.contains("chat")),
            "{second:?}"
        );
        h().ask("chat", 5, 9, "vm-c1".into(), "100.64.0.7".parse().unwrap())
            .unwrap();
        let (event, app) = tokio::task::spawn_blocking(move || {
            let e = app.next_event(Some(Duration::from_secs(5))).unwrap();
            app.answer(&AppAnswer::HandedOver {
                workload: "chat".into(),
                generation: 5,
                error: None,
            })
            .unwrap();
            (e, app)
        })
        .await
        .unwrap();
        assert_eq!(
            event,
            Some(AgentEvent::Handover {
                workload: "chat".into(),
                generation: 5,
                to: "vm-c1".into(),
                address: "100.64.0.7".parse().unwrap()
            })
        );
        let answer = tokio::time::timeout(Duration::from_secs(5), answers.recv())
            .await
            .unwrap();
        assert_eq!(
            answer,
            Some(Answer {
                workload: "chat".into(),
                generation: 5,
                attempt: 9,
                result: Ok(())
            })
        );
        // The application goes: its registration ends, and another may register.
        drop(app);
        let p = path.clone();
        let again = tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                match Watch::open(&p, "chat") {
                    Ok(w) => return Ok(w),
                    Err(e) if std::time::Instant::now() > deadline => return Err(e),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        })
        .await
        .unwrap();
        assert!(
            again.is_ok(),
            "a closed registration frees the workload: {again:?}"
        );

        // Without a mesh session: refused, saying why.
        let bare = FakeHandler::new(sample_config());
        let dir2 = tmp.path("sock2");
        let (_stop2, stop_rx2) = watch::channel(false);
        tokio::spawn(serve(bind(&dir2, "mltest2").unwrap(), bare, stop_rx2));
        let p = dir2.join("mltest2.sock");
        let refused = tokio::task::spawn_blocking(move || Watch::open(&p, "chat"))
            .await
            .unwrap();
        assert!(
            matches!(&refused, Err(WatchError::Refused { errno, .. }) if *errno == libc::ENOTCONN),
            "{refused:?}"
        );
        drop(again);
        stop_tx.send(true).unwrap();
        server.await.unwrap();
    }

    #[test]
    fn claim_failures_have_distinct_errnos() {
        let all = [
            ClaimFailure::Session(ClaimError::Refused("no".into())),
            ClaimFailure::Session(ClaimError::SessionLost),
            ClaimFailure::Session(ClaimError::Expired),
            ClaimFailure::Busy,
            ClaimFailure::NotJoined,
        ];
        let errnos: std::collections::BTreeSet<i32> = all.iter().map(claim_errno).collect();
        assert_eq!(errnos.len(), all.len());
        assert_eq!(
            claim_errno(&ClaimFailure::Timeout(Duration::from_secs(10))),
            claim_errno(&ClaimFailure::Session(ClaimError::Expired))
        );
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

        // A claim on an agent without a coordinator: refused with its reason and errno.
        let answer = request(&path, "claim=chat").await.unwrap();
        assert_eq!(
            answer,
            format!(
                "message={}\nerrno=-{}\n\n",
                ClaimFailure::NotJoined,
                libc::EOPNOTSUPP
            )
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
            handovers: None,
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
