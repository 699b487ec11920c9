//! The chat server: one accept loop ([`run`]) and one task per connection ([`Connections`]).
//!
//! ```text
//! accept ─> read `NICK <nick>` (within hello_timeout) ─> join the room ─> welcome
//!        ─> loop: a line from the client     -> Room::say (never waits)
//!                 output pending             -> the socket, as much as it takes
//!                 a line from the outbox     -> output pending (when none is left)
//!                 evicted (outbox was full)  -> drop the connection
//!                 shutdown                   -> `* server shutting down`, close
//!                 pause                      -> stop; hand back the socket and the state
//!        ─> leave the room (`* <nick> left` to the others, except at shutdown and pause)
//! ```
//!
//! Every await of a connection's task can be dropped without losing a byte: the line reader
//! keeps a line in progress, a write is one `write` call whose count is kept, the outbox and
//! the signals keep what they hold. So a connection can stop between any two of them, with
//! its state whole ([`Paused`]): the clean point at which a handover freezes it
//! ([`crate::handover`]), and from which it goes on, here or on another server.
//!
//! Events are logged at `info`, one line each (`listening on ...`, `alice joined from ...`).

use std::future::Future;
use std::io::{self, Cursor};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, Chain};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time;
use tracing::{debug, info, warn};

use meshlink_tcp_migrate::handover;

use crate::protocol::{parse_hello, read_line, LineError, Nick, MAX_LINE};
use crate::room::{Membership, Room};

/// How long the accept loop pauses after an accept error (out of file descriptors, say), so
/// that a persistent error does not spin.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// What a server is told at start.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The server's name in the welcome line (`* welcome to the room on <name>`).
    pub name: String,
    /// The longest line accepted from a client, in bytes ([`MAX_LINE`] by default). A longer
    /// one gets `ERR line too long` and the connection is closed.
    pub max_line: usize,
    /// Lines queued for a client before it counts as too slow and is dropped (256).
    pub outbox_len: usize,
    /// How long a new connection has to send its `NICK` line (10 s).
    pub hello_timeout: Duration,
    /// How long closing one connection may take: sending its last line and waiting for the
    /// client to close its side, so that the line is not lost to a reset (500 ms).
    pub close_timeout: Duration,
}

impl ServerConfig {
    /// The defaults, with the server called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        ServerConfig {
            name: name.into(),
            max_line: MAX_LINE,
            outbox_len: 256,
            hello_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_millis(500),
        }
    }
}

/// Serves the room on `listener` until `shutdown` completes, then stops accepting, tells
/// every client `* server shutting down`, closes the connections and returns.
pub async fn run(listener: TcpListener, config: ServerConfig, shutdown: impl Future<Output = ()>) {
    let mut connections = Connections::new(config);
    connections.announce(&listener);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => connections.accepted(accepted).await,
            () = connections.reap() => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
}

/// What the connection tasks are told to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    /// Serve.
    Run,
    /// Stop at the next await and hand back the connection ([`Paused`]).
    Pause,
    /// Say `* server shutting down` and close.
    Shutdown,
}

/// A connection's application state, apart from its socket: what a handover ships with it
/// ([`crate::migrate`]), its place in the room apart.
#[derive(Debug, Default)]
pub struct Session {
    /// The member's nick; `None` before its `NICK` line.
    pub nick: Option<Nick>,
    /// Its place in this server's room. `None` with a nick: a member handed over from
    /// another server, which rejoins without an announcement.
    pub membership: Option<Membership>,
    /// Input read from the socket and not handled yet, oldest first.
    pub unread: Vec<u8>,
    /// Output for the client not written yet, oldest first; the outbox's lines follow it.
    pub pending: Vec<u8>,
}

/// A connection stopped at a clean point: its socket, whole again, and its session.
pub type Paused = handover::Paused<Session>;

/// What every connection task shares.
#[derive(Debug, Clone)]
struct Shared {
    room: Arc<Room>,
    config: Arc<ServerConfig>,
    /// When connections were last resumed from a handover, until the room hears its next
    /// line: that line is logged with the time since, for the move's timeline.
    resumed_at: Arc<Mutex<Option<Instant>>>,
}

impl Shared {
    fn heard_line(&self, nick: &Nick) {
        let resumed = self
            .resumed_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(at) = resumed {
            info!(
                "migrate: first line after resume from {nick}, {:.1} ms after resume",
                millis(at.elapsed())
            );
        }
    }
}

/// A duration in milliseconds, for the logs.
fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The room and the tasks serving its connections.
#[derive(Debug)]
pub(crate) struct Connections {
    shared: Shared,
    control: watch::Sender<Control>,
    tasks: JoinSet<Option<Paused>>,
}

impl Connections {
    pub(crate) fn new(config: ServerConfig) -> Connections {
        Connections {
            shared: Shared {
                room: Arc::new(Room::new(config.outbox_len)),
                config: Arc::new(config),
                resumed_at: Arc::default(),
            },
            control: watch::channel(Control::Run).0,
            tasks: JoinSet::new(),
        }
    }

    /// The server's name.
    pub(crate) fn name(&self) -> &str {
        &self.shared.config.name
    }

    /// The room.
    pub(crate) fn room(&self) -> &Room {
        &self.shared.room
    }

    /// Logs `listening on <addr> as <name>`.
    pub(crate) fn announce(&self, listener: &TcpListener) {
        match listener.local_addr() {
            Ok(addr) => info!("listening on {addr} as {}", self.name()),
            Err(e) => warn!("listening (address unknown: {e}) as {}", self.name()),
        }
    }

    /// Serves a connection the listener accepted (or pauses after an accept error, so that a
    /// persistent one does not spin).
    pub(crate) async fn accepted(&mut self, accepted: io::Result<(TcpStream, SocketAddr)>) {
        match accepted {
            Ok((stream, peer)) => self.spawn(stream, peer, Session::default()),
            Err(e) => {
                warn!("accept failed: {e}");
                time::sleep(ACCEPT_PAUSE).await;
            }
        }
    }

    /// Serves a connection again from where it was paused (here or on another server).
    pub(crate) fn resume(&mut self, paused: Paused) {
        self.spawn(paused.stream, paused.peer, paused.session);
    }

    /// Notes that connections were just resumed from a handover: the next line the room
    /// hears is logged with the time since.
    pub(crate) fn mark_resumed(&self) {
        *self
            .shared
            .resumed_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
    }

    fn spawn(&mut self, stream: TcpStream, peer: SocketAddr, session: Session) {
        let task = serve(
            stream,
            peer,
            session,
            self.shared.clone(),
            self.control.subscribe(),
        );
        self.tasks.spawn(task);
    }

    /// Waits until a connection task ends (forever when there are none), so that the set
    /// does not grow. Cancel-safe.
    pub(crate) async fn reap(&mut self) {
        match self.tasks.join_next().await {
            // Only a pause hands a connection back; should one come here, it goes on.
            Some(Ok(Some(paused))) => self.resume(paused),
            Some(_) => {}
            None => std::future::pending().await,
        }
    }

    /// Stops every connection at its next clean point and hands them back, their tasks
    /// ended. Connections that were closing finish first (each within `close_timeout`).
    pub(crate) async fn pause(&mut self) -> Vec<Paused> {
        self.control.send_replace(Control::Pause);
        let mut paused = Vec::new();
        let all = async {
            while let Some(ended) = self.tasks.join_next().await {
                if let Ok(Some(p)) = ended {
                    paused.push(p);
                }
            }
        };
        // Every task stops at once or closes within its own bound; this is a backstop.
        if time::timeout(self.shared.config.close_timeout * 2, all)
            .await
            .is_err()
        {
            self.tasks.abort_all();
            while self.tasks.join_next().await.is_some() {}
        }
        self.control.send_replace(Control::Run);
        paused
    }

    /// Tells every client `* server shutting down`, closes the connections and logs
    /// `stopped`.
    pub(crate) async fn shutdown(mut self) {
        info!("shutting down, closing {} connections", self.tasks.len());
        self.control.send_replace(Control::Shutdown);
        let tasks = &mut self.tasks;
        let all_closed = async { while tasks.join_next().await.is_some() {} };
        // Every connection bounds its own close; this is a backstop.
        if time::timeout(self.shared.config.close_timeout * 2, all_closed)
            .await
            .is_err()
        {
            self.tasks.abort_all();
        }
        info!("stopped");
    }
}

/// Why a member's connection ended.
enum End {
    /// The client closed the connection.
    Closed,
    /// Reading or writing failed.
    Failed(io::Error),
    /// The client sent a line over the limit.
    TooLong,
    /// The member's outbox filled up and the room evicted it.
    TooSlow,
    /// The server is shutting down.
    Shutdown,
}

/// How a connection's first line went.
enum Hello {
    /// A good `NICK` line.
    Nick(Nick),
    /// Refused with this line, then closed.
    Refused(&'static str),
    /// Gone (closed, failed, silent too long) or shut down.
    Done,
    /// Paused before its `NICK` line.
    Paused,
}

/// The control value after the next change (`Shutdown` once the sender is gone).
async fn next_control(control: &mut watch::Receiver<Control>) -> Control {
    if control.changed().await.is_err() {
        return Control::Shutdown;
    }
    *control.borrow_and_update()
}

/// One connection's socket and buffers.
struct Conn {
    peer: SocketAddr,
    /// Reads what was unread at a pause first, then the socket.
    reader: BufReader<Chain<Cursor<Vec<u8>>, OwnedReadHalf>>,
    write: OwnedWriteHalf,
    /// A line in progress ([`read_line`]).
    partial: Vec<u8>,
    /// Output not written yet, and how much of it was.
    pending: Vec<u8>,
    written: usize,
}

impl Conn {
    fn new(stream: TcpStream, peer: SocketAddr, unread: Vec<u8>, pending: Vec<u8>) -> Conn {
        // Chat lines are small and each one should leave at once.
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        Conn {
            peer,
            reader: BufReader::new(Cursor::new(unread).chain(read)),
            write,
            partial: Vec::new(),
            pending,
            written: 0,
        }
    }

    fn has_pending(&self) -> bool {
        self.written < self.pending.len()
    }

    /// Counts `n` more bytes written.
    fn wrote(&mut self, n: usize) {
        self.written += n;
        if self.written == self.pending.len() {
            self.pending.clear();
            self.written = 0;
        }
    }

    /// Reads the `NICK` line within `hello_timeout`.
    async fn hello(
        &mut self,
        config: &ServerConfig,
        control: &mut watch::Receiver<Control>,
    ) -> Hello {
        let deadline = time::Instant::now() + config.hello_timeout;
        let peer = self.peer;
        let hello = loop {
            let line = read_line(&mut self.reader, &mut self.partial, config.max_line);
            tokio::select! {
                line = time::timeout_at(deadline, line) => break line,
                signal = next_control(control) => match signal {
                    Control::Run => {}
                    Control::Pause => return Hello::Paused,
                    Control::Shutdown => return Hello::Done,
                },
            }
        };
        match hello {
            Ok(Ok(Some(line))) => match parse_hello(&line) {
                Ok(nick) => Hello::Nick(nick),
                Err(_) => {
                    info!("{peer} refused: bad nick");
                    Hello::Refused("ERR bad nick\n")
                }
            },
            Ok(Err(LineError::TooLong)) => {
                info!("{peer} refused: line too long");
                Hello::Refused("ERR line too long\n")
            }
            Ok(Ok(None) | Err(LineError::Io(_))) => {
                debug!("{peer} left before NICK");
                Hello::Done
            }
            Err(_) => {
                info!("{peer} dropped: no NICK within {:?}", config.hello_timeout);
                Hello::Done
            }
        }
    }

    /// The connection stopped here: its socket whole again, the input not handled yet (the
    /// line in progress, what the reader had buffered, what was left of earlier unread
    /// input) and the output not written yet.
    fn pause(self, nick: Option<Nick>, membership: Option<Membership>) -> Paused {
        let mut unread = self.partial;
        unread.extend_from_slice(self.reader.buffer());
        let (cursor, read) = self.reader.into_inner().into_inner();
        let at = usize::try_from(cursor.position()).unwrap_or(usize::MAX);
        unread.extend_from_slice(cursor.get_ref().get(at..).unwrap_or_default());
        let stream = read
            .reunite(self.write)
            .expect("the two halves of one stream reunite");
        let mut pending = self.pending;
        pending.drain(..self.written);
        Paused {
            stream,
            peer: self.peer,
            session: Session {
                nick,
                membership,
                unread,
                pending,
            },
        }
    }

    /// Sends what is pending and `last`, and closes the connection gracefully: our side
    /// first, then reading (and discarding) until the client closes its side or `timeout`
    /// passes. Closing a socket with unread input makes the kernel send a reset, which can
    /// destroy `last` before the client reads it.
    async fn close(mut self, last: &str, timeout: Duration) {
        let closing = async {
            self.write.write_all(&self.pending[self.written..]).await?;
            self.write.write_all(last.as_bytes()).await?;
            self.write.shutdown().await?;
            let mut sink = [0u8; 4096];
            while self.reader.read(&mut sink).await? > 0 {}
            Ok::<_, io::Error>(())
        };
        let _ = time::timeout(timeout, closing).await;
    }
}

/// One connection, from its first byte (or from where it was paused) to its close or its
/// next pause.
async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    session: Session,
    shared: Shared,
    mut control: watch::Receiver<Control>,
) -> Option<Paused> {
    let config = &shared.config;
    let Session {
        nick,
        membership,
        unread,
        pending,
    } = session;
    let mut conn = Conn::new(stream, peer, unread, pending);
    let (nick, mut membership) = match (nick, membership) {
        (Some(nick), Some(membership)) => (nick, membership),
        (Some(nick), None) => {
            let membership = shared.room.rejoin(nick.clone());
            (nick, membership)
        }
        (None, _) => match conn.hello(config, &mut control).await {
            Hello::Nick(nick) => {
                // Joining before the welcome means a client that has read its welcome is in
                // the room.
                let membership = shared.room.join(nick.clone());
                info!("{nick} joined from {peer}");
                let welcome = format!("* welcome to the room on {}\n", config.name);
                conn.pending.extend_from_slice(welcome.as_bytes());
                (nick, membership)
            }
            Hello::Refused(line) => {
                conn.close(line, config.close_timeout).await;
                return None;
            }
            Hello::Done => return None,
            Hello::Paused => return Some(conn.pause(None, None)),
        },
    };

    let end = loop {
        tokio::select! {
            line = read_line(&mut conn.reader, &mut conn.partial, config.max_line) => match line {
                Ok(Some(text)) if text.is_empty() => {}
                Ok(Some(text)) => {
                    shared.room.say(membership.id, &text);
                    shared.heard_line(&nick);
                    // Lets the other members' tasks drain their outboxes before this one
                    // adds more: a client pasting many lines at once must not get the
                    // others evicted.
                    tokio::task::yield_now().await;
                }
                Ok(None) => break End::Closed,
                Err(LineError::TooLong) => break End::TooLong,
                Err(LineError::Io(e)) => break End::Failed(e),
            },
            // A client that stops reading leaves this write waiting; its outbox fills and
            // eviction ends it.
            written = conn.write.write(&conn.pending[conn.written..]), if conn.has_pending() => {
                match written {
                    Ok(0) => break End::Failed(io::ErrorKind::WriteZero.into()),
                    Ok(n) => conn.wrote(n),
                    Err(e) => break End::Failed(e),
                }
            }
            Some(line) = membership.outbox.recv(), if !conn.has_pending() => {
                conn.pending.extend_from_slice(line.as_bytes());
            }
            _ = &mut membership.evicted => break End::TooSlow,
            signal = next_control(&mut control) => match signal {
                Control::Run => {}
                Control::Pause => return Some(conn.pause(Some(nick), Some(membership))),
                Control::Shutdown => break End::Shutdown,
            },
        }
    };

    shared
        .room
        .leave(membership.id, &nick, !matches!(end, End::Shutdown));
    match end {
        End::Closed => info!("{nick} left"),
        End::Failed(e) => info!("{nick} left: {e}"),
        End::TooLong => {
            info!("{nick} disconnected: line too long");
            conn.close("ERR line too long\n", config.close_timeout)
                .await;
        }
        End::TooSlow => info!("{nick} disconnected: too slow"),
        End::Shutdown => {
            conn.close("* server shutting down\n", config.close_timeout)
                .await;
        }
    }
    None
}
