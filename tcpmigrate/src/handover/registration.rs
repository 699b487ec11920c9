//! The application's registration with the agent for one workload's handovers. The client
//! ([`Watch`]) blocks, so it runs on threads of its own and talks to the [`super::Migrator`]
//! in messages.
//!
//! ```text
//! reader thread:  Watch::open (again every `retry` until it works) ─> Registered(answers)
//!                 ─> each event ─> Event ─> ... ─> the connection fails ─> Lost, open again
//! writer thread:  one per registration: the migrator's answers ─> the agent
//! ```
//!
//! The reader ends when the migrator has dropped its receiver and something happens (an
//! event, a failure, a retry), the writer when its registration is lost.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::thread;
use std::time::Duration;

use meshlink_uapi::handover::{AgentEvent, AppAnswer, Watch};
use tokio::sync::mpsc;
use tracing::info;

/// What the reader thread tells the migrator.
#[derive(Debug)]
pub(super) enum AgentMsg {
    /// Registered: answers go through this until the registration is lost.
    Registered(Answers),
    /// An event of the registration.
    Event(AgentEvent),
    /// The registration ended (the agent closed the connection or sent nonsense); the reader
    /// registers again.
    Lost(String),
}

/// Answers to one registration's agent, sent without blocking the migrator.
#[derive(Debug)]
pub(super) struct Answers(std_mpsc::Sender<AppAnswer>);

impl Answers {
    /// Queues `answer`; false when the registration is gone.
    pub(super) fn send(&self, answer: AppAnswer) -> bool {
        self.0.send(answer).is_ok()
    }
}

/// Starts the reader thread for `workload` on the agent's socket `socket`.
///
/// # Errors
/// When the thread cannot be started.
pub(super) fn spawn(
    socket: PathBuf,
    workload: String,
    retry: Duration,
) -> io::Result<mpsc::UnboundedReceiver<AgentMsg>> {
    let (tx, rx) = mpsc::unbounded_channel();
    thread::Builder::new()
        .name("agent-watch".into())
        .spawn(move || read_events(&socket, &workload, retry, &tx))?;
    Ok(rx)
}

fn read_events(
    socket: &Path,
    workload: &str,
    retry: Duration,
    tx: &mpsc::UnboundedSender<AgentMsg>,
) {
    let mut failing = false;
    loop {
        let mut watch = match Watch::open(socket, workload) {
            Ok(watch) => watch,
            Err(e) => {
                if !failing {
                    info!(
                        "migrate: cannot register with the agent at {}: {e}; trying every {} ms",
                        socket.display(),
                        retry.as_millis()
                    );
                    failing = true;
                }
                thread::sleep(retry);
                if tx.is_closed() {
                    return;
                }
                continue;
            }
        };
        failing = false;
        let answers = match start_writer(&watch) {
            Ok(answers) => answers,
            Err(e) => {
                let _ = tx.send(AgentMsg::Lost(format!("cannot answer the agent: {e}")));
                thread::sleep(retry);
                continue;
            }
        };
        if tx.send(AgentMsg::Registered(answers)).is_err() {
            return;
        }
        let lost = loop {
            match watch.next_event(None) {
                Ok(Some(event)) => {
                    if tx.send(AgentMsg::Event(event)).is_err() {
                        return;
                    }
                }
                Ok(None) => {}
                Err(e) => break e.to_string(),
            }
        };
        if tx.send(AgentMsg::Lost(lost)).is_err() {
            return;
        }
        thread::sleep(retry);
    }
}

/// The writer thread of one registration.
fn start_writer(watch: &Watch) -> io::Result<Answers> {
    let mut writer = watch.answers()?;
    let (tx, rx) = std_mpsc::channel::<AppAnswer>();
    thread::Builder::new()
        .name("agent-answers".into())
        .spawn(move || {
            for answer in rx {
                if writer.send(&answer).is_err() {
                    return;
                }
            }
        })?;
    Ok(Answers(tx))
}
