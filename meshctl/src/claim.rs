//! `workload claim`: asks the agent on this VM to claim a workload for its node.
//!
//! Unlike every other command, a claim goes to the local agent, not to the coordinator, and
//! needs no admin token: the agent asks the coordinator over its own authenticated session,
//! and the coordinator decides whether this node may hold the workload. Being able to open the
//! agent's socket (root, normally) is the local permission.
//!
//! # Protocol
//!
//! The agent's userspace API socket is `<uapi-dir>/<interface>.sock`
//! ([`meshlink_uapi::socket_path`]), a unix stream socket speaking WireGuard's UAPI framing: a
//! request is lines ending with an empty line, and so is the reply, whose lines are `key=value`
//! and end with `errno`. The exchange is [`meshlink_uapi::Client`]'s; what a claim reply means is
//! read here.
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

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meshlink_uapi::{Client, ClientError};

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

/// Asks the agent listening on `socket` to claim `workload`, waiting at most `timeout` in all.
///
/// # Errors
///
/// Any [`ClaimError`]; a refusal is [`ClaimError::Refused`] with the agent's message.
pub fn claim(socket: &Path, workload: &str, timeout: Duration) -> Result<Claimed, ClaimError> {
    let bad_name = || ClaimError::BadName {
        name: workload.to_owned(),
    };
    if workload.is_empty() || workload.chars().any(char::is_control) {
        return Err(bad_name());
    }
    let started = Instant::now();
    let response = Client::new(timeout)
        .max_response_bytes(REPLY_LIMIT)
        .request(socket, &format!("claim={workload}"))
        .map_err(|e| match e {
            ClientError::Connect { path, source } => ClaimError::Unreachable { path, source },
            ClientError::Timeout { path, after } => ClaimError::Timeout { path, after },
            ClientError::Io { path, source } => ClaimError::Io { path, source },
            ClientError::CutShort { path, received } => ClaimError::BadReply {
                path,
                detail: MalformedReply(if received == 0 {
                    "the agent closed the connection without answering".into()
                } else {
                    format!("the agent closed the connection {received} bytes into its reply")
                }),
            },
            ClientError::ResponseTooLarge { path, limit } => ClaimError::BadReply {
                path,
                detail: MalformedReply(format!("longer than {limit} bytes")),
            },
            ClientError::NotUtf8 { path } => ClaimError::BadReply {
                path,
                detail: MalformedReply("not UTF-8 text".into()),
            },
            // A name too long for one request line.
            ClientError::EmptyRequest
            | ClientError::EmptyLineInRequest
            | ClientError::RequestTooLarge => bad_name(),
        })?;
    let took = started.elapsed();
    match parse_reply(response.text()) {
        Ok(Reply::Claimed { generation }) => Ok(Claimed { generation, took }),
        Ok(Reply::Refused { errno, message }) => Err(ClaimError::Refused {
            workload: workload.to_owned(),
            errno,
            message,
        }),
        Err(detail) => Err(ClaimError::BadReply {
            path: socket.to_owned(),
            detail,
        }),
    }
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
    use meshlink_uapi::socket_path;
    use meshlink_uapi::test_support::serve_once;

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
    fn a_claim_over_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path(), "mesh0");
        let server = serve_once(&path, Some("generation=5\nerrno=0\n\n".as_bytes()));
        let claimed = claim(&path, "chat", DEFAULT_TIMEOUT).unwrap();
        assert_eq!(claimed.generation, 5);
        assert!(claimed.took < DEFAULT_TIMEOUT);
        assert_eq!(server.join().unwrap(), "claim=chat\n\n");
    }

    #[test]
    fn a_refusal_over_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path(), "mesh0");
        let server = serve_once(
            &path,
            Some("message=not allowed here\nerrno=-1\n\n".as_bytes()),
        );
        let err = claim(&path, "chat", DEFAULT_TIMEOUT).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot claim chat: not allowed here (errno -1)"
        );
        server.join().unwrap();
    }

    #[test]
    fn a_silent_agent_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path(), "mesh0");
        let server = serve_once(&path, None);
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
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path(), "mesh0");
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
