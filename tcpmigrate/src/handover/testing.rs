//! A stand-in agent for the tests of applications that migrate (feature `test-support`): a
//! unix socket speaking the agent's side of the handover protocol, driven by the test.
//! Built for tests only; it panics, with a message, where a real agent would not do what the
//! test expects.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixListener;
use tokio::time::timeout;

use meshlink_uapi::handover::{AgentEvent, AppAnswer};

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
