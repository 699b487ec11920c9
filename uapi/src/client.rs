//! The client: one request and its response on a fresh connection to a userspace API socket.
//!
//! It blocks (a std `UnixStream`), because its users are a CLI waiting for one answer and the
//! agent's own one-shot commands; the agent's async callers run it on Tokio's blocking pool. The
//! whole exchange, from connecting to the response's last line, is bounded by one deadline, and
//! the response by a size limit, so a server that drips bytes or never stops cannot hold the
//! client or fill its memory.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{response_errno, MAX_LINE_BYTES, MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES};

/// Sends requests to userspace API sockets, waiting at most its timeout for each whole exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Client {
    timeout: Duration,
    max_response_bytes: usize,
}

/// A complete response: its lines through the final `errno=N` line and the empty line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    text: String,
}

/// Why an exchange with a userspace API socket failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The request is empty once its trailing newlines are removed.
    #[error("an empty userspace API request")]
    EmptyRequest,
    /// The request holds an empty line, which would end it there and make the rest a second
    /// request.
    #[error("a userspace API request may not hold an empty line")]
    EmptyLineInRequest,
    /// The request, or one of its lines, is longer than a server accepts.
    #[error(
        "the userspace API request is too large \
         (limits: {MAX_LINE_BYTES} bytes a line, {MAX_REQUEST_BYTES} a request)"
    )]
    RequestTooLarge,
    /// Nothing could be reached at the socket: it is missing, nobody listens, or this user may
    /// not open it.
    #[error("cannot connect to {}: {source}", .path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// What connecting reported.
        #[source]
        source: io::Error,
    },
    /// No complete response came within the timeout.
    #[error("no complete answer from {} within {after:?}", .path.display())]
    Timeout {
        /// The socket.
        path: PathBuf,
        /// How long was waited in all.
        after: Duration,
    },
    /// Writing the request or reading the response failed after connecting.
    #[error("talking to {} failed: {source}", .path.display())]
    Io {
        /// The socket.
        path: PathBuf,
        /// What the socket reported.
        #[source]
        source: io::Error,
    },
    /// The server closed the connection before the response's `errno` line and empty line.
    #[error("the answer from {} was cut short after {received} bytes", .path.display())]
    CutShort {
        /// The socket.
        path: PathBuf,
        /// How many bytes came before the end.
        received: usize,
    },
    /// The response grew past the client's limit.
    #[error("the answer from {} is longer than {limit} bytes", .path.display())]
    ResponseTooLarge {
        /// The socket.
        path: PathBuf,
        /// The limit, in bytes.
        limit: usize,
    },
    /// The response is not UTF-8 text.
    #[error("the answer from {} is not UTF-8 text", .path.display())]
    NotUtf8 {
        /// The socket.
        path: PathBuf,
    },
}

impl Client {
    /// A client that waits at most `timeout` for each exchange and accepts responses of up to
    /// [`MAX_RESPONSE_BYTES`].
    pub const fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            max_response_bytes: MAX_RESPONSE_BYTES,
        }
    }

    /// The same client, accepting responses of at most `limit` bytes.
    #[must_use]
    pub const fn max_response_bytes(self, limit: usize) -> Self {
        Self {
            max_response_bytes: limit,
            ..self
        }
    }

    /// How long an exchange may take in all.
    pub const fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends `request` to the socket at `socket` and returns the complete response.
    ///
    /// `request` is the request's lines, e.g. `"get=1"`; the terminating empty line is added
    /// (trailing newlines are removed first). A response is complete at the empty line that
    /// follows an `errno=` line; anything the server sends after it is ignored.
    ///
    /// # Errors
    /// A request that cannot be framed (empty, holding an empty line, over the server's limits)
    /// is refused before connecting; then [`ClientError::Connect`], [`ClientError::Timeout`]
    /// once the whole exchange took the client's timeout, [`ClientError::Io`],
    /// [`ClientError::CutShort`], [`ClientError::ResponseTooLarge`] or [`ClientError::NotUtf8`].
    pub fn request(&self, socket: &Path, request: &str) -> Result<Response, ClientError> {
        let framed = frame(request)?;
        let started = Instant::now();
        let path = || socket.to_owned();
        let timed_out = || ClientError::Timeout {
            path: path(),
            after: self.timeout,
        };
        let io_error = |source: io::Error| match source.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => timed_out(),
            _ => ClientError::Io {
                path: path(),
                source,
            },
        };
        // Time left before the deadline; `None` once it has passed (a zero socket timeout
        // would mean "wait forever").
        let remaining = || {
            self.timeout
                .checked_sub(started.elapsed())
                .filter(|left| !left.is_zero())
                .ok_or_else(timed_out)
        };

        let mut stream = connect(socket, remaining()?).map_err(|source| ClientError::Connect {
            path: path(),
            source,
        })?;
        stream
            .set_write_timeout(Some(remaining()?))
            .map_err(io_error)?;
        stream.write_all(framed.as_bytes()).map_err(io_error)?;

        let mut response = Vec::new();
        let mut end = End::default();
        let mut chunk = [0u8; 8192];
        loop {
            stream
                .set_read_timeout(Some(remaining()?))
                .map_err(io_error)?;
            let n = match stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(ClientError::CutShort {
                        path: path(),
                        received: response.len(),
                    })
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_error(e)),
            };
            let scanned = response.len();
            response.extend_from_slice(&chunk[..n]);
            let complete = end.find(&response, scanned);
            if complete.unwrap_or(response.len()) > self.max_response_bytes {
                return Err(ClientError::ResponseTooLarge {
                    path: path(),
                    limit: self.max_response_bytes,
                });
            }
            if let Some(len) = complete {
                response.truncate(len);
                break;
            }
        }
        let text =
            String::from_utf8(response).map_err(|_| ClientError::NotUtf8 { path: path() })?;
        Ok(Response { text })
    }
}

/// The request with its terminating empty line.
fn frame(request: &str) -> Result<String, ClientError> {
    let lines = request.trim_end_matches('\n');
    if lines.is_empty() {
        return Err(ClientError::EmptyRequest);
    }
    if lines.starts_with('\n') || lines.contains("\n\n") {
        return Err(ClientError::EmptyLineInRequest);
    }
    if lines.len() + 1 > MAX_REQUEST_BYTES || lines.split('\n').any(|l| l.len() > MAX_LINE_BYTES) {
        return Err(ClientError::RequestTooLarge);
    }
    Ok(format!("{lines}\n\n"))
}

/// Where a response ends, found as its bytes arrive: the empty line after an `errno=` line.
#[derive(Debug, Default)]
struct End {
    /// Where the line being read starts.
    line_start: usize,
    /// Whether the last complete line was an `errno=` line.
    after_errno: bool,
}

impl End {
    /// The response's length if it is complete, looking at the lines that end in
    /// `response[scanned..]`.
    fn find(&mut self, response: &[u8], scanned: usize) -> Option<usize> {
        for (i, byte) in response.iter().enumerate().skip(scanned) {
            if *byte != b'\n' {
                continue;
            }
            let line = &response[self.line_start..i];
            self.line_start = i + 1;
            if line.is_empty() && self.after_errno {
                return Some(i + 1);
            }
            self.after_errno = line.starts_with(b"errno=");
        }
        None
    }
}

impl Response {
    /// The whole response, through its final empty line.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The whole response, owned.
    pub fn into_text(self) -> String {
        self.text
    }

    /// The positive errno the response ends with (0 for success), if its `errno` line holds a
    /// number (see [`response_errno`]).
    pub fn errno(&self) -> Option<i32> {
        response_errno(&self.text)
    }
}

/// Connects to the socket at `path` within `timeout`: a blocking connect to a server whose
/// backlog is full would wait for as long as the server does not accept. Non-blocking, such a
/// connect fails at once (`EAGAIN`), as it does for every other reason.
fn connect(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    socket.connect_timeout(&socket2::SockAddr::unix(path)?, timeout)?;
    socket.set_nonblocking(false)?;
    Ok(UnixStream::from(std::os::fd::OwnedFd::from(socket)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::socket_path;
    use crate::test_support::serve_once;

    const TIMEOUT: Duration = Duration::from_secs(10);

    #[test]
    fn a_normal_reply() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path(), "mesh0");
        let reply = b"private_key=00\nlisten_port=51820\nerrno=0\n\n";
        let server = serve_once(&path, Some(&reply[..]));
        let response = Client::new(TIMEOUT).request(&path, "get=1\n").unwrap();
        assert_eq!(
            response.text(),
            "private_key=00\nlisten_port=51820\nerrno=0\n\n"
        );
        assert_eq!(response.errno(), Some(0));
        assert_eq!(server.join().unwrap(), "get=1\n\n");
    }

    #[test]
    fn an_errno_reply_and_what_follows_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path(), "mesh0");
        // An empty line before any errno line does not end the response; bytes after its end
        // are not part of it.
        let reply = b"message=no\n\nerrno=-22\n\nerrno=0\n\n";
        let server = serve_once(&path, Some(&reply[..]));
        let response = Client::new(TIMEOUT)
            .request(&path, "set=1\nbogus=1")
            .unwrap();
        assert_eq!(response.errno(), Some(22));
        assert_eq!(response.into_text(), "message=no\n\nerrno=-22\n\n");
        assert_eq!(server.join().unwrap(), "set=1\nbogus=1\n\n");
    }

    /// A server that never accepts, with its backlog full: a blocking connect would wait for
    /// ever; the client gives up within its timeout.
    #[test]
    fn a_server_that_never_accepts_does_not_hold_the_client() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path(), "mesh0");
        let listener =
            socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
        listener
            .bind(&socket2::SockAddr::unix(&path).unwrap())
            .unwrap();
        listener.listen(0).unwrap();
        // Fill the backlog: connects that nobody accepts, until one would have to wait.
        let mut pending = Vec::new();
        loop {
            let s =
                socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
            s.set_nonblocking(true).unwrap();
            match s.connect(&socket2::SockAddr::unix(&path).unwrap()) {
                Ok(()) => pending.push(s),
                Err(_) => break,
            }
            assert!(pending.len() < 1000, "the backlog never filled");
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let asked = path.clone();
        std::thread::spawn(move || {
            let _ = tx.send(Client::new(Duration::from_millis(200)).request(&asked, "get=1"));
        });
        let answer = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the client waited on a server that never accepts");
        assert!(
            matches!(
                answer,
                Err(ClientError::Connect { .. } | ClientError::Timeout { .. })
            ),
            "{answer:?}"
        );
        drop(listener);
    }

    #[test]
    fn a_silent_server_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path(), "mesh0");
        let server = serve_once(&path, None);
        let started = Instant::now();
        let timeout = Duration::from_millis(200);
        let err = Client::new(timeout).request(&path, "get=1").unwrap_err();
        assert!(
            matches!(err, ClientError::Timeout { after, .. } if after == timeout),
            "{err:?}"
        );
        assert!(started.elapsed() >= timeout);
        assert!(err.to_string().ends_with("within 200ms"), "{err}");
        server.join().unwrap();
    }

    #[test]
    fn an_oversized_reply_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path(), "mesh0");
        let mut reply = b"allowed_ip=10.0.0.0/8\n".repeat(1000);
        reply.extend_from_slice(b"errno=0\n\n");
        let server = serve_once(&path, Some(&reply));
        let err = Client::new(TIMEOUT)
            .max_response_bytes(4096)
            .request(&path, "get=1")
            .unwrap_err();
        assert!(
            matches!(err, ClientError::ResponseTooLarge { limit: 4096, .. }),
            "{err:?}"
        );
        server.join().unwrap();
    }

    #[test]
    fn a_reply_cut_short_or_not_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path(), "mesh0");
        let server_end = serve_once(&path, Some(&b"generation=7\nerrno=0"[..]));
        let err = Client::new(TIMEOUT)
            .request(&path, "claim=chat")
            .unwrap_err();
        assert!(
            matches!(err, ClientError::CutShort { received: 20, .. }),
            "{err:?}"
        );
        server_end.join().unwrap();

        std::fs::remove_file(&path).unwrap();
        let server_end = serve_once(&path, Some(&b"\xff\nerrno=0\n\n"[..]));
        let err = Client::new(TIMEOUT).request(&path, "get=1").unwrap_err();
        assert!(matches!(err, ClientError::NotUtf8 { .. }), "{err:?}");
        server_end.join().unwrap();
    }

    #[test]
    fn no_server() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path(), "mesh0");
        let err = Client::new(TIMEOUT).request(&path, "get=1").unwrap_err();
        match &err {
            ClientError::Connect { path: p, source } => {
                assert_eq!(p, &path);
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains("mesh0.sock"), "{err}");
    }

    #[test]
    fn requests_that_cannot_be_framed_are_refused_before_connecting() {
        assert_eq!(frame("get=1").unwrap(), "get=1\n\n");
        assert_eq!(
            frame("set=1\nlisten_port=1\n\n").unwrap(),
            "set=1\nlisten_port=1\n\n"
        );
        // No socket exists here: a refusal comes before connecting.
        let refused = |request: &str| {
            Client::new(TIMEOUT)
                .request(Path::new("/nonexistent/mesh0.sock"), request)
                .unwrap_err()
        };
        assert!(matches!(refused(""), ClientError::EmptyRequest));
        assert!(matches!(refused("\n\n"), ClientError::EmptyRequest));
        assert!(matches!(
            refused("claim=a\n\nset=1"),
            ClientError::EmptyLineInRequest
        ));
        assert!(matches!(
            refused("\nget=1"),
            ClientError::EmptyLineInRequest
        ));
        let long_line = "a".repeat(MAX_LINE_BYTES + 1);
        assert!(matches!(refused(&long_line), ClientError::RequestTooLarge));
        // Exactly the largest request a server takes is sent (and fails only to connect).
        let largest = "a=1\n".repeat(MAX_REQUEST_BYTES / 4);
        assert!(matches!(refused(&largest), ClientError::Connect { .. }));
        let long_request = "a=1\n".repeat(MAX_REQUEST_BYTES / 4 + 1);
        assert!(matches!(
            refused(&long_request),
            ClientError::RequestTooLarge
        ));
    }
}
