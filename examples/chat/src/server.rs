//! The chat server: one accept loop ([`run`]) and one task per connection.
//!
//! ```text
//! accept ─> read `NICK <nick>` (within hello_timeout) ─> join the room ─> welcome
//!        ─> loop: a line from the client     -> Room::say (never waits)
//!                 a line from the outbox     -> the socket
//!                 evicted (outbox was full)  -> drop the connection
//!                 shutdown                   -> `* server shutting down`, close
//!        ─> leave the room (`* <nick> left` to the others, except at shutdown)
//! ```
//!
//! Events are logged at `info`, one line each (`listening on ...`, `alice joined from ...`).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time;
use tracing::{debug, info, warn};

use crate::protocol::{parse_hello, read_line, LineError, MAX_LINE};
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
    let config = Arc::new(config);
    let room = Arc::new(Room::new(config.outbox_len));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    match listener.local_addr() {
        Ok(addr) => info!("listening on {addr} as {}", config.name),
        Err(e) => warn!("listening (address unknown: {e}) as {}", config.name),
    }
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let connection = serve(stream, peer, room.clone(), config.clone(), stop_rx.clone());
                    connections.spawn(connection);
                }
                Err(e) => {
                    warn!("accept failed: {e}");
                    time::sleep(ACCEPT_PAUSE).await;
                }
            },
            // Reaps finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    info!("shutting down, closing {} connections", connections.len());
    let _ = stop_tx.send(true);
    let all_closed = async { while connections.join_next().await.is_some() {} };
    // Every connection bounds its own close; this is a backstop.
    if time::timeout(config.close_timeout * 2, all_closed)
        .await
        .is_err()
    {
        connections.abort_all();
    }
    info!("stopped");
}

/// Why a member's connection ended.
enum End {
    /// The client closed the connection.
    Closed,
    /// Reading or writing failed.
    Failed(std::io::Error),
    /// The client sent a line over the limit.
    TooLong,
    /// The member's outbox filled up and the room evicted it.
    TooSlow,
    /// The server is shutting down.
    Shutdown,
}

/// One connection, from its first byte to its close.
async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    room: Arc<Room>,
    config: Arc<ServerConfig>,
    mut stop: watch::Receiver<bool>,
) {
    // Chat lines are small and each one should leave at once.
    let _ = stream.set_nodelay(true);
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut partial = Vec::new();

    let hello = read_line(&mut reader, &mut partial, config.max_line);
    let hello = tokio::select! {
        hello = time::timeout(config.hello_timeout, hello) => hello,
        _ = stop.changed() => return,
    };
    let nick = match hello {
        Ok(Ok(Some(line))) => match parse_hello(&line) {
            Ok(nick) => nick,
            Err(_) => {
                info!("{peer} refused: bad nick");
                close(write, reader, "ERR bad nick\n", config.close_timeout).await;
                return;
            }
        },
        Ok(Err(LineError::TooLong)) => {
            info!("{peer} refused: line too long");
            close(write, reader, "ERR line too long\n", config.close_timeout).await;
            return;
        }
        Ok(Ok(None) | Err(LineError::Io(_))) => {
            debug!("{peer} left before NICK");
            return;
        }
        Err(_) => {
            info!("{peer} dropped: no NICK within {:?}", config.hello_timeout);
            return;
        }
    };

    // Joining before the welcome means a client that has read its welcome is in the room.
    let Membership {
        id,
        mut outbox,
        mut evicted,
    } = room.join(nick.clone());
    info!("{nick} joined from {peer}");
    let welcome = format!("* welcome to the room on {}\n", config.name);
    let end = match write.write_all(welcome.as_bytes()).await {
        Err(e) => End::Failed(e),
        Ok(()) => loop {
            tokio::select! {
                line = read_line(&mut reader, &mut partial, config.max_line) => match line {
                    Ok(Some(text)) if text.is_empty() => {}
                    Ok(Some(text)) => {
                        room.say(id, &text);
                        // Lets the other members' tasks drain their outboxes before this one
                        // adds more: a client pasting many lines at once must not get the
                        // others evicted.
                        tokio::task::yield_now().await;
                    }
                    Ok(None) => break End::Closed,
                    Err(LineError::TooLong) => break End::TooLong,
                    Err(LineError::Io(e)) => break End::Failed(e),
                },
                Some(line) = outbox.recv() => {
                    // A client that stops reading blocks this write; eviction and shutdown
                    // still end it.
                    tokio::select! {
                        written = write.write_all(line.as_bytes()) => {
                            if let Err(e) = written {
                                break End::Failed(e);
                            }
                        }
                        _ = &mut evicted => break End::TooSlow,
                        _ = stop.changed() => break End::Shutdown,
                    }
                }
                _ = &mut evicted => break End::TooSlow,
                _ = stop.changed() => break End::Shutdown,
            }
        },
    };

    room.leave(id, &nick, !matches!(end, End::Shutdown));
    match end {
        End::Closed => info!("{nick} left"),
        End::Failed(e) => info!("{nick} left: {e}"),
        End::TooLong => {
            info!("{nick} disconnected: line too long");
            close(write, reader, "ERR line too long\n", config.close_timeout).await;
        }
        End::TooSlow => info!("{nick} disconnected: too slow"),
        End::Shutdown => {
            close(
                write,
                reader,
                "* server shutting down\n",
                config.close_timeout,
            )
            .await;
        }
    }
}

/// Sends `last` and closes the connection gracefully: our side first, then reading (and
/// discarding) until the client closes its side or `timeout` passes. Closing a socket with
/// unread input makes the kernel send a reset, which can destroy `last` before the client
/// reads it.
async fn close(
    mut write: OwnedWriteHalf,
    mut reader: BufReader<OwnedReadHalf>,
    last: &str,
    timeout: Duration,
) {
    let closing = async {
        write.write_all(last.as_bytes()).await?;
        write.shutdown().await?;
        let mut sink = [0u8; 4096];
        while reader.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    let _ = time::timeout(timeout, closing).await;
}
