//! Live migration on the userspace API socket: an application that serves a workload asks
//! the agent to tell it about the workload's moves, and hands its state over when asked.
//!
//! ```text
//! app -> agent   handover=chat                      register (one application per workload)
//! agent -> app   errno=0                            (or message=... errno=-16: taken)
//! agent -> app   event=holder ...                   at once and whenever the holder changes
//! agent -> app   event=handover ... to=vm-c1        a live migration away from this node
//! app -> agent   handed_over=chat generation=5      state handed over (error=...: not)
//! agent -> app   event=left / event=arrived         this node stopped / started answering
//! agent -> app   event=aborted                      the handover answered will not happen
//! ```
//!
//! Every message is `key=value` lines ending with an empty line, like the rest of the API.
//! The registration ends with the connection. [`Watch`] is the blocking client.

use std::io::{self, BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{response_errno, MAX_LINE_BYTES};

/// The most lines of one handover message.
pub const MAX_LINES: usize = 16;

/// What the agent tells a registered application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    /// Who holds the workload now, by the agent's map (sent at registration and on every
    /// change); `None` when nobody does. An application that takes handovers accepts one only
    /// from the holder's address.
    Holder {
        /// The workload.
        workload: String,
        /// Its generation.
        generation: u64,
        /// The holder's name and mesh address.
        holder: Option<(String, IpAddr)>,
    },
    /// A live migration to `to`: hand the state over to the application there (at
    /// `address`), then answer with [`AppAnswer::HandedOver`].
    Handover {
        /// The workload.
        workload: String,
        /// The generation the move will take.
        generation: u64,
        /// The destination's name.
        to: String,
        /// The destination's mesh address.
        address: IpAddr,
    },
    /// This node answers for the workload's address from now on (it became its confirmed
    /// holder).
    Arrived {
        /// The workload.
        workload: String,
        /// Its generation.
        generation: u64,
    },
    /// This node stopped answering for the workload's address: `moved` when the workload
    /// went to another node (`reason=moved`), not when this node's lease ran out while the
    /// map still gives it the workload (`reason=lease`: it may come back, or be failed over,
    /// which then says `left` again with `moved`).
    Left {
        /// The workload.
        workload: String,
        /// The generation it held.
        generation: u64,
        /// Whether the workload moved away.
        moved: bool,
    },
    /// The live migration asked by the handover at `generation` will not happen (no answer
    /// in time, or it could not commit): carry on here, resuming what was frozen.
    Aborted {
        /// The workload.
        workload: String,
        /// The handover's generation.
        generation: u64,
    },
}

/// What a registered application tells the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppAnswer {
    /// The answer to [`AgentEvent::Handover`]: handed over, or why not.
    HandedOver {
        /// The workload.
        workload: String,
        /// The generation of the handover answered.
        generation: u64,
        /// Why it failed, when it did.
        error: Option<String>,
    },
}

/// Why a handover message could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// A line is not `key=value`.
    #[error("a line without '=': {0:?}")]
    NotKeyValue(String),
    /// A field is missing; names it.
    #[error("the field '{0}' is missing")]
    Missing(&'static str),
    /// A field does not parse; names it.
    #[error("the field '{field}' is not valid: {value:?}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What it held.
        value: String,
    },
    /// The message is of a kind this side does not know.
    #[error("unknown message {0:?}")]
    Unknown(String),
    /// Too many lines, or a line too long.
    #[error("the message is too large")]
    TooLarge,
}

/// The registration request for `workload` (without its empty line).
pub fn request(workload: &str) -> String {
    format!("handover={workload}")
}

/// One message's fields, in order.
struct Fields(Vec<(String, String)>);

impl Fields {
    fn parse(text: &str) -> Result<Fields, MessageError> {
        let mut out = Vec::new();
        for line in text.lines().filter(|l| !l.is_empty()) {
            if out.len() == MAX_LINES || line.len() > MAX_LINE_BYTES {
                return Err(MessageError::TooLarge);
            }
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| MessageError::NotKeyValue(line.to_string()))?;
            out.push((k.to_string(), v.to_string()));
        }
        Ok(Fields(out))
    }

    fn get(&self, key: &'static str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn text(&self, key: &'static str) -> Result<String, MessageError> {
        self.get(key)
            .map(str::to_string)
            .ok_or(MessageError::Missing(key))
    }

    fn parsed<T: std::str::FromStr>(&self, key: &'static str) -> Result<T, MessageError> {
        let v = self.get(key).ok_or(MessageError::Missing(key))?;
        v.parse().map_err(|_| MessageError::Invalid {
            field: key,
            value: v.to_string(),
        })
    }
}

/// A value with no newline in it (a reason given by an application, say).
fn one_line(s: &str) -> String {
    let line: String = s.chars().map(|c| if c == '\n' { ' ' } else { c }).collect();
    let mut end = line.len().min(MAX_LINE_BYTES - 16);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    line[..end].to_string()
}

impl AgentEvent {
    /// The workload the event is about.
    pub fn workload(&self) -> &str {
        match self {
            AgentEvent::Holder { workload, .. }
            | AgentEvent::Handover { workload, .. }
            | AgentEvent::Arrived { workload, .. }
            | AgentEvent::Left { workload, .. }
            | AgentEvent::Aborted { workload, .. } => workload,
        }
    }

    /// The message, with its empty line.
    pub fn render(&self) -> String {
        match self {
            AgentEvent::Holder {
                workload,
                generation,
                holder,
            } => {
                let mut s = format!("event=holder\nworkload={workload}\ngeneration={generation}\n");
                if let Some((node, address)) = holder {
                    s.push_str(&format!("node={node}\naddress={address}\n"));
                }
                s + "\n"
            }
            AgentEvent::Handover {
                workload,
                generation,
                to,
                address,
            } => format!(
                "event=handover\nworkload={workload}\ngeneration={generation}\nto={to}\naddress={address}\n\n"
            ),
            AgentEvent::Arrived {
                workload,
                generation,
            } => format!("event=arrived\nworkload={workload}\ngeneration={generation}\n\n"),
            AgentEvent::Left {
                workload,
                generation,
                moved,
            } => {
                let reason = if *moved { "moved" } else { "lease" };
                format!(
                    "event=left\nworkload={workload}\ngeneration={generation}\nreason={reason}\n\n"
                )
            }
            AgentEvent::Aborted {
                workload,
                generation,
            } => format!("event=aborted\nworkload={workload}\ngeneration={generation}\n\n"),
        }
    }

    /// Reads one message (its lines, the empty line optional).
    ///
    /// # Errors
    /// [`MessageError`], naming the field at fault.
    pub fn parse(text: &str) -> Result<AgentEvent, MessageError> {
        let f = Fields::parse(text)?;
        let workload = f.text("workload")?;
        let generation = f.parsed("generation")?;
        match f.get("event").ok_or(MessageError::Missing("event"))? {
            "holder" => {
                let holder = match f.get("node") {
                    Some(node) => Some((node.to_string(), f.parsed("address")?)),
                    None => None,
                };
                Ok(AgentEvent::Holder {
                    workload,
                    generation,
                    holder,
                })
            }
            "handover" => Ok(AgentEvent::Handover {
                workload,
                generation,
                to: f.text("to")?,
                address: f.parsed("address")?,
            }),
            "arrived" => Ok(AgentEvent::Arrived {
                workload,
                generation,
            }),
            "left" => Ok(AgentEvent::Left {
                workload,
                generation,
                moved: match f.get("reason") {
                    None | Some("moved") => true,
                    Some("lease") => false,
                    Some(other) => {
                        return Err(MessageError::Invalid {
                            field: "reason",
                            value: other.to_string(),
                        })
                    }
                },
            }),
            "aborted" => Ok(AgentEvent::Aborted {
                workload,
                generation,
            }),
            other => Err(MessageError::Unknown(other.to_string())),
        }
    }
}

impl AppAnswer {
    /// The message, with its empty line.
    pub fn render(&self) -> String {
        match self {
            AppAnswer::HandedOver {
                workload,
                generation,
                error,
            } => {
                let mut s = format!("handed_over={workload}\ngeneration={generation}\n");
                if let Some(e) = error {
                    s.push_str(&format!("error={}\n", one_line(e)));
                }
                s + "\n"
            }
        }
    }

    /// Reads one message (its lines, the empty line optional).
    ///
    /// # Errors
    /// [`MessageError`], naming the field at fault.
    pub fn parse(text: &str) -> Result<AppAnswer, MessageError> {
        let f = Fields::parse(text)?;
        match f.0.first() {
            Some((k, workload)) if k == "handed_over" => Ok(AppAnswer::HandedOver {
                workload: workload.clone(),
                generation: f.parsed("generation")?,
                error: f.get("error").map(str::to_string),
            }),
            Some((k, _)) => Err(MessageError::Unknown(k.clone())),
            None => Err(MessageError::Missing("handed_over")),
        }
    }
}

/// Why a [`Watch`] failed.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The socket could not be reached.
    #[error("cannot connect to {}: {source}", .path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// What connecting reported.
        #[source]
        source: io::Error,
    },
    /// The agent refused the registration.
    #[error("the agent refused: {message} (errno {errno})")]
    Refused {
        /// The errno it answered.
        errno: i32,
        /// Its message.
        message: String,
    },
    /// The agent sent something that is not a handover message.
    #[error("from the agent: {0}")]
    Message(#[from] MessageError),
    /// The connection failed or ended.
    #[error("the connection to the agent: {0}")]
    Io(#[from] io::Error),
}

/// A registration for one workload's handovers: read events with [`Watch::next_event`], answer
/// with [`Watch::answer`] (from another thread if wanted: [`Watch::answers`]).
#[derive(Debug)]
pub struct Watch {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

/// The answering side of a [`Watch`], for another thread.
#[derive(Debug)]
pub struct Answers {
    writer: UnixStream,
}

impl Answers {
    /// Sends an answer.
    ///
    /// # Errors
    /// The connection failed.
    pub fn send(&mut self, answer: &AppAnswer) -> io::Result<()> {
        self.writer.write_all(answer.render().as_bytes())
    }
}

impl Watch {
    /// Registers for `workload` on the agent's socket `socket`; fails when another
    /// application is registered for it.
    ///
    /// # Errors
    /// [`WatchError`].
    pub fn open(socket: &Path, workload: &str) -> Result<Watch, WatchError> {
        let stream = UnixStream::connect(socket).map_err(|source| WatchError::Connect {
            path: socket.to_owned(),
            source,
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut writer = stream.try_clone()?;
        writer.write_all(format!("{}\n\n", request(workload)).as_bytes())?;
        let mut reader = BufReader::new(stream);
        let answer = read_message(&mut reader)?;
        match response_errno(&answer) {
            Some(0) => {}
            errno => {
                let message = answer
                    .lines()
                    .find_map(|l| l.strip_prefix("message="))
                    .unwrap_or("no reason given")
                    .to_string();
                return Err(WatchError::Refused {
                    errno: errno.unwrap_or(0),
                    message,
                });
            }
        }
        reader.get_ref().set_read_timeout(None)?;
        Ok(Watch { reader, writer })
    }

    /// Waits for the next event; with `within`, at most that long (`Ok(None)`: nothing came).
    ///
    /// # Errors
    /// [`WatchError::Io`] when the agent closed the connection or it failed.
    pub fn next_event(
        &mut self,
        within: Option<Duration>,
    ) -> Result<Option<AgentEvent>, WatchError> {
        self.reader.get_ref().set_read_timeout(within)?;
        match read_message(&mut self.reader) {
            Ok(text) => Ok(Some(AgentEvent::parse(&text)?)),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Sends an answer.
    ///
    /// # Errors
    /// The connection failed.
    pub fn answer(&mut self, answer: &AppAnswer) -> io::Result<()> {
        self.writer.write_all(answer.render().as_bytes())
    }

    /// A second handle to answer with, from another thread.
    ///
    /// # Errors
    /// The socket could not be cloned.
    pub fn answers(&self) -> io::Result<Answers> {
        Ok(Answers {
            writer: self.writer.try_clone()?,
        })
    }
}

/// Reads lines up to an empty line (bounded: [`MAX_LINES`] lines of [`MAX_LINE_BYTES`]).
fn read_message<R: BufRead>(reader: &mut R) -> io::Result<String> {
    let mut text = String::new();
    let mut lines = 0;
    loop {
        let mut line = String::new();
        let n = io::Read::take(&mut *reader, MAX_LINE_BYTES as u64 + 1).read_line(&mut line)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the agent closed the connection",
            ));
        }
        if !line.ends_with('\n') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a line from the agent is too long",
            ));
        }
        if line == "\n" {
            if lines > 0 {
                return Ok(text);
            }
            continue;
        }
        lines += 1;
        if lines > MAX_LINES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a message from the agent is too long",
            ));
        }
        text.push_str(&line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_and_answers_read_back_as_written() {
        let address: IpAddr = "100.64.0.7".parse().unwrap();
        for e in [
            AgentEvent::Holder {
                workload: "chat".into(),
                generation: 4,
                holder: Some(("vm-a1".into(), address)),
            },
            AgentEvent::Holder {
                workload: "chat".into(),
                generation: 5,
                holder: None,
            },
            AgentEvent::Handover {
                workload: "chat".into(),
                generation: 5,
                to: "vm-c1".into(),
                address,
            },
            AgentEvent::Arrived {
                workload: "chat".into(),
                generation: 5,
            },
            AgentEvent::Left {
                workload: "chat".into(),
                generation: 5,
                moved: true,
            },
            AgentEvent::Left {
                workload: "chat".into(),
                generation: 5,
                moved: false,
            },
            AgentEvent::Aborted {
                workload: "chat".into(),
                generation: 5,
            },
        ] {
            assert_eq!(AgentEvent::parse(&e.render()).unwrap(), e);
            assert!(e.render().ends_with("\n\n"));
        }
        let ok = AppAnswer::HandedOver {
            workload: "chat".into(),
            generation: 5,
            error: None,
        };
        assert_eq!(AppAnswer::parse(&ok.render()).unwrap(), ok);
        let failed = AppAnswer::HandedOver {
            workload: "chat".into(),
            generation: 5,
            error: Some("no answer from\nvm-c1".into()),
        };
        assert_eq!(
            AppAnswer::parse(&failed.render()).unwrap(),
            AppAnswer::HandedOver {
                workload: "chat".into(),
                generation: 5,
                error: Some("no answer from vm-c1".into()),
            },
            "a reason stays on its line"
        );
    }

    #[test]
    fn bad_messages_name_the_field() {
        assert_eq!(
            AgentEvent::parse("event=handover\nworkload=chat\ngeneration=x\n"),
            Err(MessageError::Invalid {
                field: "generation",
                value: "x".into()
            })
        );
        assert_eq!(
            AgentEvent::parse("event=handover\nworkload=chat\ngeneration=1\nto=b\n"),
            Err(MessageError::Missing("address"))
        );
        assert_eq!(
            AppAnswer::parse("handed_over=chat\n"),
            Err(MessageError::Missing("generation"))
        );
        assert_eq!(
            AppAnswer::parse("nonsense\n"),
            Err(MessageError::NotKeyValue("nonsense".into()))
        );
        assert!(matches!(
            AgentEvent::parse(&"a=b\n".repeat(MAX_LINES + 1)),
            Err(MessageError::TooLarge)
        ));
    }

    #[test]
    fn messages_are_read_whole_and_bounded() {
        let mut input = "\nevent=left\nworkload=a\ngeneration=1\n\nevent=arrived\n".as_bytes();
        let first = read_message(&mut input).unwrap();
        assert_eq!(
            AgentEvent::parse(&first).unwrap(),
            AgentEvent::Left {
                workload: "a".into(),
                generation: 1,
                moved: true
            },
            "no reason: moved (as before reasons)"
        );
        assert_eq!(
            read_message(&mut input).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof,
            "a message cut short is no message"
        );
        let long = format!("a={}\n\n", "x".repeat(MAX_LINE_BYTES + 1));
        assert_eq!(
            read_message(&mut long.as_bytes()).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }
}
