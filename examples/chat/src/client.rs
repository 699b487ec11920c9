//! The chat client: sends the lines it is given, reports what the server says, and
//! reconnects whenever the connection fails or drops. This is what makes a moving server
//! invisible to the user beyond a `* disconnected` and a `* connected` line.
//!
//! ```text
//! loop: connect (within connect_timeout)
//!         ok   -> Connected, send `NICK`, then: server lines -> Line events,
//!                 queued input -> the socket, until the connection is lost -> Disconnected
//!         fail -> ConnectFailed
//!       wait the backoff: 100 ms, doubling after each wait up to 1 s; back to 100 ms once a
//!       connection has lasted 1 s
//! ```
//!
//! Input lines are queued (up to [`ClientConfig::queue_len`]) while disconnected and sent
//! after the next connection. A line is taken off the queue when it has been handed whole to
//! the kernel; a line only partly written when the connection fails is sent again whole. Lines
//! handed to the kernel just before a connection dies may still be lost: TCP does not say
//! whether the server read them.
//!
//! When the input ends, the client sends what is queued, stays `linger` longer to show the
//! answers, and returns. If it is disconnected then, it keeps trying for `linger` after the
//! input ended, and gives up on what is still queued.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{self, Instant};

use crate::protocol::{hello, read_line, LineError, Nick, MAX_LINE};

/// What a client is told at start.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The server to connect to.
    pub server: SocketAddr,
    /// Sent as `NICK <nick>` on every connection.
    pub nick: Nick,
    /// How long one connection attempt may take (1 s).
    pub connect_timeout: Duration,
    /// How long to stay connected after the input ended and everything was sent (500 ms).
    pub linger: Duration,
    /// The wait after the first failure (100 ms); it doubles after each further failure.
    pub backoff_initial: Duration,
    /// The longest wait between attempts (1 s).
    pub backoff_max: Duration,
    /// Input lines kept while disconnected (1000); reading input pauses when it is full.
    pub queue_len: usize,
}

impl ClientConfig {
    /// The defaults, for `nick` on `server`.
    pub fn new(server: SocketAddr, nick: Nick) -> Self {
        ClientConfig {
            server,
            nick,
            connect_timeout: Duration::from_secs(1),
            linger: Duration::from_millis(500),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            queue_len: 1000,
        }
    }
}

/// What happened, for the caller to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// A connection to the server is up (shown as `* connected to <addr>`).
    Connected(SocketAddr),
    /// A line from the server.
    Line(String),
    /// An established connection was lost (shown as `* disconnected: <reason>`).
    Disconnected(String),
    /// A connection attempt failed; `attempt` counts failures since the last connection.
    ConnectFailed {
        /// 1 for the first failure in a row.
        attempt: u32,
        /// Why.
        reason: String,
        /// The wait before the next attempt.
        retry_in: Duration,
    },
    /// An input line longer than [`MAX_LINE`] bytes was not sent (the server would refuse it).
    Skipped(usize),
    /// The input ended while disconnected and `count` lines were never sent.
    Unsent(usize),
}

/// The client's state between connections.
struct Client<'a, F> {
    config: &'a ClientConfig,
    input: mpsc::Receiver<String>,
    input_ended: Option<Instant>,
    /// Lines waiting to be sent, each with its `\n`.
    queue: VecDeque<String>,
    events: F,
}

/// Why a connection ended.
enum SessionEnd {
    /// The input ended, everything was sent and the linger passed.
    Done,
    /// The connection was lost, for this reason.
    Lost(String),
}

/// Runs the client until `input` ends (see the module documentation), reporting to `events`.
pub async fn run(
    config: &ClientConfig,
    input: mpsc::Receiver<String>,
    events: impl FnMut(ClientEvent),
) {
    let mut client = Client {
        config,
        input,
        input_ended: None,
        queue: VecDeque::new(),
        events,
    };
    client.run().await;
}

impl<F: FnMut(ClientEvent)> Client<'_, F> {
    async fn run(&mut self) {
        let mut backoff = self.config.backoff_initial;
        let mut failures = 0;
        loop {
            let connect = TcpStream::connect(self.config.server);
            let failure = match time::timeout(self.config.connect_timeout, connect).await {
                Ok(Ok(stream)) => {
                    failures = 0;
                    keep_alive(&stream);
                    let connected_at = Instant::now();
                    (self.events)(ClientEvent::Connected(self.config.server));
                    match self.session(stream).await {
                        SessionEnd::Done => return,
                        SessionEnd::Lost(reason) => {
                            (self.events)(ClientEvent::Disconnected(reason))
                        }
                    }
                    // A server that accepts and then drops every connection at once still
                    // sees the backoff grow.
                    if connected_at.elapsed() >= self.config.backoff_max {
                        backoff = self.config.backoff_initial;
                    }
                    None
                }
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(format!(
                    "no answer within {:?}",
                    self.config.connect_timeout
                )),
            };
            if let Some(reason) = failure {
                failures += 1;
                (self.events)(ClientEvent::ConnectFailed {
                    attempt: failures,
                    reason,
                    retry_in: backoff,
                });
            }
            if !self.wait(backoff).await {
                if !self.queue.is_empty() {
                    (self.events)(ClientEvent::Unsent(self.queue.len()));
                }
                return;
            }
            backoff = (backoff * 2).min(self.config.backoff_max);
        }
    }

    /// Waits `delay` while still reading input. Returns false when the input has ended and
    /// the linger after it has passed: time to give up.
    async fn wait(&mut self, delay: Duration) -> bool {
        let until = Instant::now() + delay;
        loop {
            if let Some(ended) = self.input_ended {
                if Instant::now() >= ended + self.config.linger {
                    return false;
                }
            }
            let give_up = self.input_ended.map(|ended| ended + self.config.linger);
            let wake = give_up.map_or(until, |g| g.min(until));
            tokio::select! {
                () = time::sleep_until(wake) => {
                    if wake == until {
                        return true;
                    }
                }
                line = self.input.recv(), if self.wants_input() => self.take_input(line),
            }
        }
    }

    fn wants_input(&self) -> bool {
        self.input_ended.is_none() && self.queue.len() < self.config.queue_len
    }

    fn take_input(&mut self, line: Option<String>) {
        match line {
            Some(line) if line.len() > MAX_LINE => (self.events)(ClientEvent::Skipped(line.len())),
            Some(line) => self.queue.push_back(line + "\n"),
            None => self.input_ended = Some(Instant::now()),
        }
    }

    /// One connection, until it is lost or the client is done.
    async fn session(&mut self, stream: TcpStream) -> SessionEnd {
        let _ = stream.set_nodelay(true);
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let mut partial = Vec::new();
        if let Err(e) = write.write_all(hello(&self.config.nick).as_bytes()).await {
            return SessionEnd::Lost(e.to_string());
        }
        // How much of the queue's first line is written.
        let mut written = 0;
        // Set once the input has ended and the queue is empty.
        let mut done_at: Option<Instant> = None;
        loop {
            if done_at.is_none() && self.input_ended.is_some() && self.queue.is_empty() {
                done_at = Some(Instant::now() + self.config.linger);
            }
            let front = self.queue.front().map(|l| &l.as_bytes()[written..]);
            tokio::select! {
                line = read_line(&mut reader, &mut partial, 2 * MAX_LINE) => match line {
                    Ok(Some(line)) => (self.events)(ClientEvent::Line(line)),
                    Ok(None) => return SessionEnd::Lost("server closed the connection".into()),
                    Err(LineError::TooLong) => return SessionEnd::Lost("line from server too long".into()),
                    Err(LineError::Io(e)) => return SessionEnd::Lost(e.to_string()),
                },
                // `write` (not `write_all`) either writes some bytes or none, so losing this
                // race to another branch never loses track of what was sent.
                n = write.write(front.unwrap_or_default()), if front.is_some() => match n {
                    Ok(0) => return SessionEnd::Lost("connection closed for writing".into()),
                    Ok(n) => {
                        written += n;
                        if self.queue.front().is_some_and(|l| written == l.len()) {
                            self.queue.pop_front();
                            written = 0;
                        }
                    }
                    Err(e) => return SessionEnd::Lost(e.to_string()),
                },
                line = self.input.recv(), if self.wants_input() => self.take_input(line),
                () = time::sleep_until(done_at.unwrap_or_else(Instant::now)), if done_at.is_some() => {
                    let _ = write.shutdown().await;
                    return SessionEnd::Done;
                }
            }
        }
    }
}

/// TCP keepalive probes after 2 s of silence, every second, three times: an idle client
/// notices within a few seconds that its server is gone, also when the server's address has
/// moved to another VM (whose kernel answers the first probe with a reset) or died with it.
fn keep_alive(stream: &TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(2))
        .with_interval(Duration::from_secs(1))
        .with_retries(3);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&ka) {
        tracing::debug!("TCP keepalive not set: {e}");
    }
}
