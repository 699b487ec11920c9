//! A stand-in agent for the tests of applications that migrate (feature `test-support`): a
//! unix socket speaking the agent's side of the handover protocol, driven by the test; a
//! stand-in destination server ([`destination`]); and the root check of repair-mode tests.
//! Built for tests only; it panics, with a message, where a real agent would not do what the
//! test expects.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;

use meshlink_uapi::handover::{AgentEvent, AppAnswer};

use super::wire::{self, Reply};

/// Whether the test runs as root (TCP repair mode needs it). Without root a test fails
/// under `CI=true` and is skipped otherwise, saying so.
///
/// # Panics
/// Without root under `CI=true`.
pub fn root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("1");
    if euid == "0" {
        return true;
    }
    assert!(
        std::env::var("CI").is_err(),
        "TCP repair mode needs root, and CI forbids skipping"
    );
    eprintln!("skipped: TCP repair mode needs root");
    false
}

/// A destination server at `at`: reads the state frame and hands it to the test, then
/// answers as told (`None`: never, holding the connection open), then hands over the final
/// frame.
///
/// # Panics
/// When `at` cannot be bound. Must be called within a tokio runtime.
pub fn destination(
    at: SocketAddr,
    reply: Option<Reply>,
) -> (mpsc::UnboundedReceiver<Vec<u8>>, JoinHandle<()>) {
    let (tx, frames) = mpsc::unbounded_channel();
    let listener = std::net::TcpListener::bind(at).unwrap_or_else(|e| panic!("bind {at}: {e}"));
    listener
        .set_nonblocking(true)
        .expect("a non-blocking listener");
    let task = tokio::spawn(async move {
        let listener = TcpListener::from_std(listener).expect("a tokio listener");
        let (mut stream, _) = listener.accept().await.expect("the source connects");
        let Ok(body) = wire::read_frame(&mut stream, wire::MAX_MESSAGE).await else {
            return;
        };
        let _ = tx.send(body);
        let Some(reply) = reply else {
            // Holds the connection open without a word.
            let _ = stream.read(&mut [0u8; 1]).await;
            return;
        };
        stream
            .write_all(&wire::frame(&reply.encode()))
            .await
            .expect("the reply written");
        if let Ok(body) = wire::read_frame(&mut stream, wire::MAX_MESSAGE).await {
            let _ = tx.send(body);
        }
    });
    (frames, task)
}

/// The next frame a [`destination`] got, within [`WAIT`].
///
/// # Panics
/// When none comes in time.
pub async fn next_frame(frames: &mut mpsc::UnboundedReceiver<Vec<u8>>) -> Vec<u8> {
    timeout(WAIT, frames.recv())
        .await
        .expect("a frame in time")
        .expect("a frame")
}

/// How long the fake agent waits for the application.
pub const WAIT: Duration = Duration::from_secs(5);

/// The agent's socket, before the application registers.
#[derive(Debug)]
pub struct AgentSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl AgentSocket {
    /// Listens on `path` (in the test's own temporary directory).
    ///
    /// # Panics
    /// When `path` cannot be bound. Must be called within a tokio runtime.
    pub fn bind(path: &Path) -> AgentSocket {
        AgentSocket {
            listener: UnixListener::bind(path)
                .unwrap_or_else(|e| panic!("bind {}: {e}", path.display())),
            path: path.to_owned(),
        }
    }

    /// The socket's path, for the application's configuration.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts the application's registration for `workload` within [`WAIT`] and tells it
    /// that `holder` (a node name and its mesh address) holds it at generation 1.
    ///
    /// # Panics
    /// When no registration for `workload` comes in time.
    pub async fn accept(&self, workload: &str, holder: (&str, IpAddr)) -> FakeAgent {
        let (stream, _) = timeout(WAIT, self.listener.accept())
            .await
            .expect("the application registers in time")
            .expect("accept the application's connection");
        let (read, writer) = stream.into_split();
        let mut agent = FakeAgent {
            workload: workload.to_string(),
            reader: BufReader::new(read),
            writer,
        };
        assert_eq!(agent.message().await, format!("handover={workload}\n"));
        agent.write(b"errno=0\n\n").await;
        agent
            .send(AgentEvent::Holder {
                workload: workload.into(),
                generation: 1,
                holder: Some((holder.0.to_string(), holder.1)),
            })
            .await;
        agent
    }
}

/// The agent's side of one registration.
#[derive(Debug)]
pub struct FakeAgent {
    workload: String,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl FakeAgent {
    async fn write(&mut self, bytes: &[u8]) {
        self.writer
            .write_all(bytes)
            .await
            .expect("the application reads the agent's socket");
    }

    /// The application's next message, without its empty line.
    ///
    /// # Panics
    /// When none comes within [`WAIT`], or the application closed the connection.
    pub async fn message(&mut self) -> String {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            let n = timeout(WAIT, self.reader.read_line(&mut line))
                .await
                .expect("the application answers in time")
                .expect("read the application's message");
            assert!(n > 0, "the application closed the agent's connection");
            if line == "\n" {
                return text;
            }
            text.push_str(&line);
        }
    }

    /// Sends an event.
    pub async fn send(&mut self, event: AgentEvent) {
        self.write(event.render().as_bytes()).await;
    }

    /// Asks for a handover at `generation` to `to` at `address`.
    pub async fn handover(&mut self, generation: u64, to: &str, address: IpAddr) {
        self.send(AgentEvent::Handover {
            workload: self.workload.clone(),
            generation,
            to: to.into(),
            address,
        })
        .await;
    }

    /// Says that this node stopped answering for the workload.
    pub async fn left(&mut self, generation: u64) {
        self.send(AgentEvent::Left {
            workload: self.workload.clone(),
            generation,
            moved: true,
        })
        .await;
    }

    /// Says that this node answers for the workload now.
    pub async fn arrived(&mut self, generation: u64) {
        self.send(AgentEvent::Arrived {
            workload: self.workload.clone(),
            generation,
        })
        .await;
    }

    /// The application's answer to the handover at `generation`: its error, if any.
    ///
    /// # Panics
    /// When the answer is of another workload or generation, or none comes in time.
    pub async fn handed_over(&mut self, generation: u64) -> Option<String> {
        let text = self.message().await;
        match AppAnswer::parse(&text).expect("a handed_over answer") {
            AppAnswer::HandedOver {
                workload,
                generation: g,
                error,
            } => {
                assert_eq!((workload.as_str(), g), (self.workload.as_str(), generation));
                error
            }
        }
    }
}
