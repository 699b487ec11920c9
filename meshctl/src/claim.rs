//! `workload claim`: asks the agent on this VM to claim a workload for its node.
//!
//! Unlike every other command, a claim goes to the local agent, not to the coordinator, and
//! needs no admin token: the agent asks the coordinator over its own authenticated session,
//! and the coordinator decides whether this node may hold the workload. Being able to open the
//! agent's socket (root, normally) is the local permission.
//!
//! # Protocol
//!
//! The agent's userspace API socket is `<uapi-dir>/<interface>.sock`, a unix stream socket
//! speaking WireGuard's UAPI framing: a request is lines ending with an empty line, and so is the
//! reply, whose lines are `key=value`.
//!
//! ```text
//! -> claim=chat
//! ->
//! <- generation=4          (or  message=node vm-c is not an allowed holder ...)
//! <- errno=0               (or  errno=-1)
//! <-
//! ```
//!
//! `errno=0` with a `generation` is success; any other `errno` is a refusal, explained by
//! `message` when the agent sends one. Unknown keys are ignored.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::client::one_line;

/// How long a claim waits for the agent's answer by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

/// The longest reply read; a real one is a few dozen bytes.
const REPLY_LIMIT: usize = 64 * 1024;

/// What a successful claim returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claimed {
    /// The generation the workload is now held at by this node.
    pub generation: u64,
    /// From connecting to the agent until its answer.
    pub took: Duration,
}

/// The agent's answer, read from its reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// This node holds the workload now, at this generation.
    Claimed {
        /// The workload's new generation.
        generation: u64,
    },
    /// The claim was refused.
    Refused {
        /// The agent's `errno` (negative, as the UAPI sends it, or positive).
        errno: i64,
        /// Why, as the agent put it (already on one line).
        message: String,
    },
}

/// A reply that does not follow the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct MalformedReply(String);

/// Why a claim failed.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// The workload name cannot be sent in the protocol (empty, or a control character).
    #[error("{name:?} is not a workload name")]
    BadName {
        /// The name given.
        name: String,
    },
    /// No agent could be reached at the socket: it is missing, nobody listens, or this user
    /// may not open it.
    #[error("cannot reach the agent at {}: {source}{}", .path.display(), hint(.source))]
    Unreachable {
        /// The socket.
        path: PathBuf,
        /// What connecting reported.
        #[source]
        source: io::Error,
    },
    /// The agent did not answer in time.
    #[error("the agent at {} did not answer within {}", .path.display(), seconds(*.after))]
    Timeout {
        /// The socket.
        path: PathBuf,
        /// How long was waited.
        after: Duration,
    },
    /// The exchange broke down after connecting.
    #[error("talking to the agent at {} failed: {source}", .path.display())]
    Io {
        /// The socket.
        path: PathBuf,
        /// What the socket reported.
        #[source]
        source: io::Error,
    },
    /// The agent answered with something that is not a claim reply.
    #[error("the agent at {} sent an unexpected reply: {detail}", .path.display())]
    BadReply {
        /// The socket.
        path: PathBuf,
        /// What was wrong.
        detail: MalformedReply,
    },
    /// The claim was refused (by the coordinator, or by the agent itself).
    #[error("cannot claim {workload}: {message} (errno {errno})")]
    Refused {
        /// The workload.
        workload: String,
        /// The agent's `errno`.
        errno: i64,
        /// Why.
        message: String,
    },
}

/// What to try when connecting failed.
fn hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::NotFound => {
            "; is meshlink-agent running on this interface? (see --interface and --uapi-dir)"
        }
        io::ErrorKind::PermissionDenied => "; the agent's socket is for root only: try sudo",
        io::ErrorKind::ConnectionRefused => "; the socket is stale: is meshlink-agent running?",
        _ => "",
    }
}

/// A timeout as `10 s`, or `0.5 s` below a second.
fn seconds(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// The socket of the agent serving `interface`: `<uapi_dir>/<interface>.sock`.
pub fn socket_path(uapi_dir: &Path, interface: &str) -> PathBuf {
    uapi_dir.join(format!("{interface}.sock"))
}

/// Asks the agent listening on `socket` to claim `workload`, waiting at most `timeout` in all.
///
/// # Errors
///
/// Any [`ClaimError`]; a refusal is [`ClaimError::Refused`] with the agent's message.
pub fn claim(socket: &Path, workload: &str, timeout: Duration) -> Result<Claimed, ClaimError> {
    if workload.is_empty() || workload.chars().any(char::is_control) {
        return Err(ClaimError::BadName {
            name: workload.to_owned(),
        });
    }
    let started = Instant::now();
    let path = || socket.to_owned();
    let timed_out = || ClaimError::Timeout {
        path: path(),
        after: timeout,
    };
    let io_error = |source: io::Error| match source.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => timed_out(),
        _ => ClaimError::Io {
            path: path(),
            source,
        },
    };
    // Time left before the deadline; `None` once it has passed (a zero socket timeout would
    // mean "wait forever").
    let remaining = || {
        timeout
            .checked_sub(started.elapsed())
            .filter(|left| !left.is_zero())
    };

    let mut stream = UnixStream::connect(socket).map_err(|source| ClaimError::Unreachable {
        path: path(),
        source,
    })?;
    stream
        .set_write_timeout(Some(remaining().ok_or_else(timed_out)?))
        .map_err(io_error)?;
    stream
        .write_all(format!("claim={workload}\n\n").as_bytes())
        .map_err(io_error)?;

    let mut reply = Vec::new();
    let mut chunk = [0u8; 1024];
    while !is_complete(&reply) {
        stream
            .set_read_timeout(Some(remaining().ok_or_else(timed_out)?))
            .map_err(io_error)?;
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error(e)),
        };
        if n == 0 {
            // The agent closed the connection: what came is the whole reply.
            break;
        }
        reply.extend_from_slice(&chunk[..n]);
        if reply.len() > REPLY_LIMIT {
            return Err(ClaimError::BadReply {
                path: path(),
                detail: MalformedReply(format!("longer than {REPLY_LIMIT} bytes")),
            });
        }
    }
    let took = started.elapsed();
    let text = String::from_utf8(reply).map_err(|_| ClaimError::BadReply {
        path: path(),
        detail: MalformedReply("not UTF-8 text".into()),
    })?;
    match parse_reply(&text) {
        Ok(Reply::Claimed { generation }) => Ok(Claimed { generation, took }),
        Ok(Reply::Refused { errno, message }) => Err(ClaimError::Refused {
            workload: workload.to_owned(),
            errno,
            message,
        }),
        Err(detail) => Err(ClaimError::BadReply {
            path: path(),
            detail,
        }),
    }
}

/// Whether a reply has reached its terminating empty line.
fn is_complete(reply: &[u8]) -> bool {
    reply.starts_with(b"\n") || reply.windows(2).any(|w| w == b"\n\n")
}

/// Reads the agent's reply: `key=value` lines up to the first empty line (or the end).
///
/// # Errors
///
/// [`MalformedReply`] for an empty reply, a line without `=`, a missing or non-numeric `errno`,
/// or success without a numeric `generation`.
pub fn parse_reply(text: &str) -> Result<Reply, MalformedReply> {
    let mut errno = None;
    let mut generation = None;
    let mut message = None;
    let mut lines = 0;
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            break;
        }
        lines += 1;
        let Some((key, value)) = line.split_once('=') else {
            return Err(MalformedReply(format!(
                "a line without '=': {:?}",
                one_line(line)
            )));
        };
        match key {
            "errno" => errno = Some(value),
            "generation" => generation = Some(value),
            "message" => message = Some(value),
            _ => {}
        }
    }
    if lines == 0 {
        return Err(MalformedReply(
            "the agent closed the connection without answering".into(),
        ));
    }
    let errno: i64 = match errno {
        Some(text) => text
            .trim()
            .parse()
            .map_err(|_| MalformedReply(format!("errno {:?} is not a number", one_line(text))))?,
        None => return Err(MalformedReply("no errno line".into())),
    };
    if errno != 0 {
        let message = match message.map(one_line) {
            Some(m) if !m.is_empty() => m,
            // The agent refused before the coordinator was asked (for example, an agent that
            // does not know claims): say what the errno means.
            _ => describe_errno(errno),
        };
        return Ok(Reply::Refused { errno, message });
    }
    match generation {
        Some(text) => text
            .trim()
            .parse()
            .map(|generation| Reply::Claimed { generation })
            .map_err(|_| {
                MalformedReply(format!("generation {:?} is not a number", one_line(text)))
            }),
        None => Err(MalformedReply("errno=0 but no generation".into())),
    }
}

/// The operating system's words for an errno, for example `Operation not permitted`.
fn describe_errno(errno: i64) -> String {
    let code = i32::try_from(errno.unsigned_abs()).unwrap_or(i32::MAX);
    let text = io::Error::from_raw_os_error(code).to_string();
    // "Operation not permitted (os error 1)": the number is shown separately.
    match text.split_once(" (os error") {
        Some((words, _)) => words.to_owned(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::thread;

    fn malformed(text: &str) -> String {
        parse_reply(text).unwrap_err().to_string()
    }

    #[test]
    fn successful_replies() {
        assert_eq!(
            parse_reply("generation=4\nerrno=0\n\n"),
            Ok(Reply::Claimed { generation: 4 })
        );
        assert_eq!(
            parse_reply("errno=0\r\ngeneration=12\r\nnew_key=x\r\n\r\n"),
            Ok(Reply::Claimed { generation: 12 }),
            "CRLF and unknown keys"
        );
        assert_eq!(
            parse_reply("generation=7\nerrno=0"),
            Ok(Reply::Claimed { generation: 7 }),
            "a reply cut short by the agent closing"
        );
        assert_eq!(
            parse_reply("generation=1\nerrno=0\n\ngarbage after the reply"),
            Ok(Reply::Claimed { generation: 1 })
        );
    }

    #[test]
    fn refusals() {
        assert_eq!(
            parse_reply("message=node vm-c is not an allowed holder\nerrno=-1\n\n"),
            Ok(Reply::Refused {
                errno: -1,
                message: "node vm-c is not an allowed holder".into()
            })
        );
        assert_eq!(
            parse_reply("message=a=b\x1b[2J\nerrno=1\n\n"),
            Ok(Reply::Refused {
                errno: 1,
                message: "a=b [2J".into()
            }),
            "values may hold '=', control characters are cleaned"
        );
        assert_eq!(
            parse_reply("errno=-22\n\n"),
            Ok(Reply::Refused {
                errno: -22,
                message: "Invalid argument".into()
            }),
            "without a message, the errno's meaning"
        );
    }

    #[test]
    fn malformed_replies() {
        assert!(malformed("").contains("without answering"));
        assert!(malformed("\n").contains("without answering"));
        assert!(malformed("generation=3\n\n").contains("no errno"));
        assert!(malformed("errno=zero\n\n").contains("not a number"));
        assert!(malformed("errno=0\n\n").contains("no generation"));
        assert!(malformed("generation=-1\nerrno=0\n\n").contains("not a number"));
        assert!(malformed("HTTP/1.1 400 Bad Request\n\n").contains("without '='"));
    }

    #[test]
    fn sockets_are_named_after_the_interface() {
        assert_eq!(
            socket_path(Path::new("/var/run/wireguard"), "mesh0"),
            Path::new("/var/run/wireguard/mesh0.sock")
        );
    }

    /// A scratch directory, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new() -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("meshctl-claim-unit-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Serves one connection: reads the request up to its empty line, answers `reply` (if
    /// any), and returns the request.
    fn agent(path: &Path, reply: Option<&'static str>) -> thread::JoinHandle<String> {
        let listener = UnixListener::bind(path).unwrap();
        thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\n\n") && stream.read(&mut byte).unwrap() == 1 {
                request.push(byte[0]);
            }
            match reply {
                Some(reply) => stream.write_all(reply.as_bytes()).unwrap(),
                // Say nothing until the client gives up and closes.
                None => while stream.read(&mut byte).unwrap_or(0) == 1 {},
            }
            String::from_utf8(request).unwrap()
        })
    }

    #[test]
    fn a_claim_over_the_socket() {
        let dir = Scratch::new();
        let path = socket_path(&dir.0, "mesh0");
        let server = agent(&path, Some("generation=5\nerrno=0\n\n"));
        let claimed = claim(&path, "chat", DEFAULT_TIMEOUT).unwrap();
        assert_eq!(claimed.generation, 5);
        assert!(claimed.took < DEFAULT_TIMEOUT);
        assert_eq!(server.join().unwrap(), "claim=chat\n\n");
    }

    #[test]
    fn a_refusal_over_the_socket() {
        let dir = Scratch::new();
        let path = socket_path(&dir.0, "mesh0");
        let server = agent(&path, Some("message=not allowed here\nerrno=-1\n\n"));
        let err = claim(&path, "chat", DEFAULT_TIMEOUT).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot claim chat: not allowed here (errno -1)"
        );
        server.join().unwrap();
    }

    #[test]
    fn a_silent_agent_times_out() {
        let dir = Scratch::new();
        let path = socket_path(&dir.0, "mesh0");
        let server = agent(&path, None);
        let started = Instant::now();
        let err = claim(&path, "chat", Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, ClaimError::Timeout { .. }), "{err:?}");
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(
            err.to_string().ends_with("did not answer within 0.2 s"),
            "{err}"
        );
        server.join().unwrap();
    }

    #[test]
    fn a_missing_socket_says_what_to_check() {
        let dir = Scratch::new();
        let path = socket_path(&dir.0, "mesh0");
        let err = claim(&path, "chat", DEFAULT_TIMEOUT).unwrap_err();
        assert!(matches!(err, ClaimError::Unreachable { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("mesh0.sock"), "{text}");
        assert!(text.contains("--uapi-dir"), "{text}");
    }

    #[test]
    fn names_that_would_break_the_protocol_are_refused() {
        for name in ["", "chat\nset=1", "a\0b"] {
            let err = claim(Path::new("/nonexistent.sock"), name, DEFAULT_TIMEOUT).unwrap_err();
            assert!(
                matches!(err, ClaimError::BadName { .. }),
                "{name:?}: {err:?}"
            );
        }
    }
}
