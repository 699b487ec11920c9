//! The handover's wire format: what the source's application sends the destination's to move
//! its connections, and what it hears back.
//!
//! ```text
//! source -> destination   frame(state)    the application's own state, and every connection:
//!                                         its socket (frozen) and its session
//! destination -> source   frame(ready)    every connection restored, held   (or refused)
//! source -> destination   frame(final)    after the source left the address: the sockets'
//!                                         state again, with what reached them after the freeze
//! ```
//!
//! A frame is a 4-byte big-endian length and that many bytes of one JSON object, which names
//! its `version` ([`FORMAT_VERSION`]) and its `kind` (`state`, `ready`, `refused`, `final`).
//! A socket is the object [`Frozen::encode`] makes; the application's bytes (its state, each
//! session) are standard base64, and `format` names their encoding
//! ([`super::Application::FORMAT`]).
//!
//! # Security
//! Everything here comes from the network: every size is capped ([`MAX_MESSAGE`],
//! [`MAX_CONNECTIONS`], [`MAX_NAME`]), every field is checked, and an error names the field
//! at fault. Who may send a state at all is the caller's check (the workload's holder only);
//! what the application's bytes say is the application's to check.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::Frozen;

/// The version of this format. History: 1 (the first).
pub const FORMAT_VERSION: u32 = 1;
/// The largest frame, in bytes: a state with its sockets' queues.
pub const MAX_MESSAGE: usize = 64 << 20;
/// The largest reply frame, in bytes.
pub const MAX_REPLY: usize = 64 << 10;
/// The most connections one state may carry.
pub const MAX_CONNECTIONS: usize = 4096;
/// The longest workload or format name, in bytes.
pub const MAX_NAME: usize = 255;

/// Connections on the move: the first frame of a handover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    /// The application's encoding ([`super::Application::FORMAT`]); the destination takes
    /// only its own.
    pub format: String,
    /// The workload the connections are served on; the destination checks it is its own.
    pub workload: String,
    /// The generation the move will take: the destination goes live on arriving at it.
    pub generation: u64,
    /// The application's own state, apart from its connections.
    pub state: Vec<u8>,
    /// The connections, each with its session.
    pub connections: Vec<Connection>,
}

/// One connection as shipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// The socket, frozen.
    pub socket: Frozen,
    /// What the application keeps of the connection, encoded by it.
    pub session: Vec<u8>,
}

/// The destination's answer to a [`State`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Every connection is restored and held: the source may let the move go ahead.
    Ready,
    /// Not taken, and why.
    Refused(String),
}

/// The last frame of a handover: the sockets' state read again once the source stopped
/// answering for the address, in the order of the [`State`]'s connections. A parked socket
/// still takes in (and acknowledges) what its peer sends, so what arrived after the freeze is
/// in these and not in the state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Final {
    /// One socket per connection of the state.
    pub sockets: Vec<Frozen>,
}

/// Why a frame could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The frame is over its limit.
    #[error("the message is {size} bytes, over the limit of {limit}")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A field is missing, of the wrong type or out of range; `field` is its path (empty:
    /// the whole of what was decoded).
    #[error("{}", field_and_reason(.field, .reason))]
    Invalid {
        /// The field's path, like `connections[2].session`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Why a frame could not be read from a stream.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream ended before a frame began.
    #[error("the connection closed")]
    Closed,
    /// The stream ended inside a frame.
    #[error("the frame was cut short at {got} of {want} bytes")]
    Short {
        /// The bytes that came.
        got: usize,
        /// The bytes the header announced.
        want: usize,
    },
    /// The header announced too much.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// Reading failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

fn field_and_reason(field: &str, reason: &str) -> String {
    if field.is_empty() {
        reason.to_string()
    } else {
        format!("{field}: {reason}")
    }
}

impl FormatError {
    /// A field out of range: `field` is its path (`nick`, `outbox[2].line`), `reason` what is
    /// wrong with it.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> FormatError {
        FormatError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The error as seen from the field `outer` that holds what failed: its path goes under
    /// `outer` (`nick` in `connections[2].session` is `connections[2].session.nick`).
    #[must_use]
    pub fn under(self, outer: &str) -> FormatError {
        match self {
            FormatError::Invalid { field, reason } if field.is_empty() => invalid(outer, reason),
            FormatError::Invalid { field, reason } => invalid(format!("{outer}.{field}"), reason),
            too_large @ FormatError::TooLarge { .. } => invalid(outer, too_large.to_string()),
        }
    }
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> FormatError {
    FormatError::invalid(field, reason)
}

/// `body` with its length in front: one frame.
///
/// # Panics
/// If `body` is over 4 GiB (every caller checks a far smaller limit first).
#[must_use]
pub fn frame(body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(body.len()).expect("frames are capped far below 4 GiB");
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// The body length a frame's 4-byte header announces, checked against `limit`.
///
/// # Errors
/// [`FormatError::TooLarge`].
pub fn frame_len(header: [u8; 4], limit: usize) -> Result<usize, FormatError> {
    let size = u32::from_be_bytes(header) as usize;
    if size > limit {
        return Err(FormatError::TooLarge { size, limit });
    }
    Ok(size)
}

/// Reads one frame's body of at most `limit` bytes. The body grows as it arrives, so a length
/// that lies costs only what was sent. Not cancel-safe: bound it with a timeout as a whole.
///
/// # Errors
/// [`FrameError`].
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    limit: usize,
) -> Result<Vec<u8>, FrameError> {
    let mut header = [0u8; 4];
    match reader.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let want = frame_len(header, limit)?;
    let mut body = Vec::new();
    reader.take(want as u64).read_to_end(&mut body).await?;
    if body.len() != want {
        return Err(FrameError::Short {
            got: body.len(),
            want,
        });
    }
    Ok(body)
}

#[derive(Serialize)]
struct WireState<'a> {
    version: u32,
    kind: &'static str,
    format: &'a str,
    workload: &'a str,
    generation: u64,
    state: String,
    connections: Vec<WireConnection<'a>>,
}

#[derive(Serialize)]
struct WireConnection<'a> {
    socket: &'a Frozen,
    session: String,
}

#[derive(Serialize)]
struct WireFinal<'a> {
    version: u32,
    kind: &'static str,
    sockets: &'a [Frozen],
}

fn to_json(value: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(value).expect("plain structs of strings and numbers always serialise")
}

impl State {
    /// The frame body (JSON).
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        to_json(&WireState {
            version: FORMAT_VERSION,
            kind: "state",
            format: &self.format,
            workload: &self.workload,
            generation: self.generation,
            state: BASE64.encode(&self.state),
            connections: self
                .connections
                .iter()
                .map(|c| WireConnection {
                    socket: &c.socket,
                    session: BASE64.encode(&c.session),
                })
                .collect(),
        })
    }

    /// A state as [`State::encode`] wrote it, checked field by field (the application's bytes
    /// are the application's to check).
    ///
    /// # Errors
    /// [`FormatError`] naming the field at fault.
    pub fn decode(body: &[u8]) -> Result<State, FormatError> {
        let value = open(body, MAX_MESSAGE, "state")?;
        let top = Obj::of(&value, String::new())?;
        let format = top.name("format")?;
        let workload = top.name("workload")?;
        let generation = top.u64("generation")?;
        let state = top.bytes("state")?;
        let list = top.array("connections", MAX_CONNECTIONS)?;
        let mut connections = Vec::with_capacity(list.len());
        let mut seen: HashMap<(SocketAddr, SocketAddr), usize> = HashMap::new();
        for (i, item) in list.iter().enumerate() {
            let c = Obj::of(item, format!("connections[{i}]"))?;
            let socket = c.socket("socket")?;
            if let Some(j) = seen.insert((socket.local, socket.peer), i) {
                return Err(invalid(
                    c.path("socket"),
                    format!("the same connection as connections[{j}]"),
                ));
            }
            let session = c.bytes("session")?;
            connections.push(Connection { socket, session });
        }
        Ok(State {
            format,
            workload,
            generation,
            state,
            connections,
        })
    }
}

impl Reply {
    /// The frame body (JSON).
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Map::new();
        out.insert("version".into(), FORMAT_VERSION.into());
        match self {
            Reply::Ready => {
                out.insert("kind".into(), "ready".into());
            }
            Reply::Refused(error) => {
                out.insert("kind".into(), "refused".into());
                out.insert("error".into(), error.as_str().into());
            }
        }
        to_json(&out)
    }

    /// A reply as [`Reply::encode`] wrote it.
    ///
    /// # Errors
    /// [`FormatError`] naming the field at fault.
    pub fn decode(body: &[u8]) -> Result<Reply, FormatError> {
        if body.len() > MAX_REPLY {
            return Err(FormatError::TooLarge {
                size: body.len(),
                limit: MAX_REPLY,
            });
        }
        let value = parse(body)?;
        let top = Obj::of(&value, String::new())?;
        top.version()?;
        match top.str("kind")? {
            "ready" => Ok(Reply::Ready),
            "refused" => Ok(Reply::Refused(top.str("error")?.to_string())),
            other => Err(invalid(
                "kind",
                format!("{other:?}, expected \"ready\" or \"refused\""),
            )),
        }
    }
}

impl Final {
    /// The frame body (JSON).
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        to_json(&WireFinal {
            version: FORMAT_VERSION,
            kind: "final",
            sockets: &self.sockets,
        })
    }

    /// A final frame as [`Final::encode`] wrote it, for a state of `connections`
    /// connections.
    ///
    /// # Errors
    /// [`FormatError`] naming the field at fault.
    pub fn decode(body: &[u8], connections: usize) -> Result<Final, FormatError> {
        let value = open(body, MAX_MESSAGE, "final")?;
        let top = Obj::of(&value, String::new())?;
        let list = top.array("sockets", MAX_CONNECTIONS)?;
        if list.len() != connections {
            return Err(invalid(
                "sockets",
                format!("{} sockets for {connections} connections", list.len()),
            ));
        }
        let sockets = list
            .iter()
            .enumerate()
            .map(|(i, item)| decode_socket(item, &format!("sockets[{i}]")))
            .collect::<Result<_, _>>()?;
        Ok(Final { sockets })
    }
}

fn decode_socket(value: &Value, path: &str) -> Result<Frozen, FormatError> {
    if !value.is_object() {
        return Err(invalid(path, "not an object"));
    }
    let bytes = serde_json::to_vec(value).expect("a parsed JSON value serialises");
    Frozen::decode(&bytes).map_err(|e| invalid(path, e.to_string()))
}

/// A frame's body as a JSON object.
fn parse(body: &[u8]) -> Result<Value, FormatError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(value @ Value::Object(_)) => Ok(value),
        Ok(_) => Err(invalid("message", "not a JSON object")),
        Err(e) => Err(invalid("message", format!("not JSON: {e}"))),
    }
}

/// A frame's body of `kind`, its size, version and kind checked.
fn open(body: &[u8], limit: usize, kind: &str) -> Result<Value, FormatError> {
    if body.len() > limit {
        return Err(FormatError::TooLarge {
            size: body.len(),
            limit,
        });
    }
    let value = parse(body)?;
    let top = Obj::of(&value, String::new())?;
    top.version()?;
    let found = top.str("kind")?;
    if found != kind {
        return Err(invalid("kind", format!("{found:?}, expected {kind:?}")));
    }
    Ok(value)
}

/// A JSON object being read, with its path for the errors.
struct Obj<'a> {
    path: String,
    map: &'a Map<String, Value>,
}

impl<'a> Obj<'a> {
    fn of(value: &'a Value, path: String) -> Result<Obj<'a>, FormatError> {
        match value {
            Value::Object(map) => Ok(Obj { path, map }),
            _ => Err(invalid(path, "not an object")),
        }
    }

    fn path(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.path)
        }
    }

    fn field(&self, name: &str) -> Result<&'a Value, FormatError> {
        self.map
            .get(name)
            .ok_or_else(|| invalid(self.path(name), "missing"))
    }

    fn str(&self, name: &str) -> Result<&'a str, FormatError> {
        self.field(name)?
            .as_str()
            .ok_or_else(|| invalid(self.path(name), "not a string"))
    }

    fn u64(&self, name: &str) -> Result<u64, FormatError> {
        self.field(name)?
            .as_u64()
            .ok_or_else(|| invalid(self.path(name), "not a whole number of 0 or more"))
    }

    fn version(&self) -> Result<(), FormatError> {
        let v = self.u64("version")?;
        if v != u64::from(FORMAT_VERSION) {
            return Err(invalid(
                self.path("version"),
                format!("{v} (this build reads {FORMAT_VERSION})"),
            ));
        }
        Ok(())
    }

    /// A name for the logs: 1 to [`MAX_NAME`] bytes without control characters.
    fn name(&self, name: &str) -> Result<String, FormatError> {
        let s = self.str(name)?;
        if s.is_empty() || s.len() > MAX_NAME || s.chars().any(char::is_control) {
            return Err(invalid(
                self.path(name),
                format!("not 1-{MAX_NAME} bytes without control characters"),
            ));
        }
        Ok(s.to_string())
    }

    fn array(&self, name: &str, max: usize) -> Result<&'a Vec<Value>, FormatError> {
        let list = self
            .field(name)?
            .as_array()
            .ok_or_else(|| invalid(self.path(name), "not a list"))?;
        if list.len() > max {
            return Err(invalid(
                self.path(name),
                format!("{} entries, over the limit of {max}", list.len()),
            ));
        }
        Ok(list)
    }

    /// Base64 bytes (their size is bounded by the frame's).
    fn bytes(&self, name: &str) -> Result<Vec<u8>, FormatError> {
        BASE64
            .decode(self.str(name)?)
            .map_err(|e| invalid(self.path(name), format!("not base64: {e}")))
    }

    fn socket(&self, name: &str) -> Result<Frozen, FormatError> {
        decode_socket(self.field(name)?, &self.path(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::{Window, FORMAT_VERSION as SOCKET_VERSION};

    fn socket(port: u16) -> Frozen {
        Frozen {
            version: SOCKET_VERSION,
            local: "100.64.50.10:7070".parse().unwrap(),
            peer: format!("100.64.0.3:{port}").parse().unwrap(),
            send_seq: 1000,
            recv_seq: u32::MAX - 3,
            send_queue: b"bob: hi\n".to_vec(),
            unsent: 3,
            recv_queue: b"still".to_vec(),
            mss: 1380,
            window_scale: Some((7, 7)),
            sack: true,
            timestamp: Some(42),
            window: Some(Window {
                snd_wl1: 1,
                snd_wnd: 2,
                max_window: 3,
                rcv_wnd: 4,
                rcv_wup: 5,
            }),
        }
    }

    fn sample() -> State {
        State {
            format: "counter/1".into(),
            workload: "chat".into(),
            generation: 7,
            state: b"room".to_vec(),
            connections: vec![
                Connection {
                    socket: socket(40000),
                    session: b"alice".to_vec(),
                },
                Connection {
                    socket: socket(40001),
                    session: vec![0, 255, b'\n'],
                },
            ],
        }
    }

    /// The state's JSON as a value, to spoil one field of.
    fn json(state: &State) -> Value {
        serde_json::from_slice(&state.encode()).unwrap()
    }

    fn decode_error(value: &Value) -> String {
        State::decode(&serde_json::to_vec(value).unwrap())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn frames_round_trip() {
        let state = sample();
        assert_eq!(State::decode(&state.encode()).unwrap(), state);
        for reply in [Reply::Ready, Reply::Refused("no room".into())] {
            assert_eq!(Reply::decode(&reply.encode()).unwrap(), reply);
        }
        let last = Final {
            sockets: vec![socket(40000), socket(40001)],
        };
        assert_eq!(Final::decode(&last.encode(), 2).unwrap(), last);
        let empty = State {
            connections: Vec::new(),
            state: Vec::new(),
            ..sample()
        };
        assert_eq!(State::decode(&empty.encode()).unwrap(), empty);
    }

    #[test]
    fn frame_headers_carry_the_length_and_are_capped() {
        let framed = frame(b"abc");
        assert_eq!(framed, b"\0\0\0\x03abc");
        assert_eq!(frame_len([0, 0, 0, 3], 3), Ok(3));
        assert_eq!(
            frame_len([0, 0, 0, 4], 3),
            Err(FormatError::TooLarge { size: 4, limit: 3 })
        );
        assert_eq!(
            frame_len([255; 4], MAX_MESSAGE).unwrap_err().to_string(),
            format!("the message is 4294967295 bytes, over the limit of {MAX_MESSAGE}")
        );
    }

    #[tokio::test]
    async fn frames_are_read_whole_or_not_at_all() {
        let framed = frame(b"hello");
        let body = read_frame(&mut framed.as_slice(), 5).await.unwrap();
        assert_eq!(body, b"hello");
        let err = read_frame(&mut &framed[..6], 5).await.unwrap_err();
        assert!(
            matches!(err, FrameError::Short { got: 2, want: 5 }),
            "{err}"
        );
        let err = read_frame(&mut &framed[..], 4).await.unwrap_err();
        assert!(
            matches!(err, FrameError::Format(FormatError::TooLarge { .. })),
            "{err}"
        );
        let err = read_frame(&mut &b""[..], 4).await.unwrap_err();
        assert!(matches!(err, FrameError::Closed), "{err}");
    }

    #[test]
    fn bad_fields_are_named() {
        type Spoil = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(Spoil, &str)> = vec![
            (Box::new(|v| v["version"] = 2.into()), "version: 2"),
            (
                Box::new(|v| {
                    v.as_object_mut().unwrap().remove("version");
                }),
                "version: missing",
            ),
            (Box::new(|v| v["kind"] = "final".into()), "kind"),
            (Box::new(|v| v["format"] = "".into()), "format"),
            (Box::new(|v| v["workload"] = "".into()), "workload"),
            (
                Box::new(|v| v["workload"] = "chat\u{1b}[2J".into()),
                "workload",
            ),
            (Box::new(|v| v["generation"] = (-1).into()), "generation"),
            (Box::new(|v| v["state"] = 5.into()), "state: not a string"),
            (Box::new(|v| v["connections"] = "x".into()), "connections"),
            (
                Box::new(|v| v["connections"][1] = 5.into()),
                "connections[1]: not an object",
            ),
            (
                Box::new(|v| v["connections"][1]["session"] = "***".into()),
                "connections[1].session: not base64",
            ),
            (
                Box::new(|v| {
                    v["connections"][0]
                        .as_object_mut()
                        .unwrap()
                        .remove("session");
                }),
                "connections[0].session: missing",
            ),
            (
                Box::new(|v| v["connections"][0]["socket"]["mss"] = 1.into()),
                "connections[0].socket: frozen connection: mss",
            ),
            (
                Box::new(|v| v["connections"][1]["socket"] = v["connections"][0]["socket"].clone()),
                "connections[1].socket: the same connection as connections[0]",
            ),
        ];
        for (spoil, wanted) in cases {
            let mut value = json(&sample());
            spoil(&mut value);
            let error = decode_error(&value);
            assert!(error.contains(wanted), "{error:?} should say {wanted:?}");
        }
        assert!(State::decode(b"[1]")
            .unwrap_err()
            .to_string()
            .contains("not a JSON object"));
        assert!(State::decode(b"{\"version\":1,")
            .unwrap_err()
            .to_string()
            .starts_with("message: not JSON"));
        assert!(Reply::decode(b"{\"version\":1,\"kind\":\"maybe\"}")
            .unwrap_err()
            .to_string()
            .starts_with("kind: \"maybe\""));
        let last = Final {
            sockets: vec![socket(1)],
        };
        assert_eq!(
            Final::decode(&last.encode(), 2).unwrap_err().to_string(),
            "sockets: 1 sockets for 2 connections"
        );
    }

    #[test]
    fn an_applications_errors_go_under_its_field() {
        let nick = FormatError::invalid("nick", "not a nick");
        assert_eq!(
            nick.under("connections[2].session").to_string(),
            "connections[2].session.nick: not a nick"
        );
        let whole = FormatError::invalid("", "3 bytes, expected 8");
        assert_eq!(
            whole.under("state").to_string(),
            "state: 3 bytes, expected 8"
        );
        let big = FormatError::TooLarge { size: 9, limit: 8 };
        assert_eq!(
            big.under("state").to_string(),
            "state: the message is 9 bytes, over the limit of 8"
        );
    }

    #[test]
    fn sizes_are_capped() {
        let mut value = json(&sample());
        let one = value["connections"][1].clone();
        value["connections"] = Value::Array(vec![one; MAX_CONNECTIONS + 1]);
        let error = decode_error(&value);
        assert!(error.starts_with("connections: 4097 entries"), "{error}");

        let too_long = vec![b' '; MAX_MESSAGE + 1];
        assert_eq!(
            State::decode(&too_long),
            Err(FormatError::TooLarge {
                size: MAX_MESSAGE + 1,
                limit: MAX_MESSAGE
            })
        );
        assert!(matches!(
            Reply::decode(&vec![b' '; MAX_REPLY + 1]),
            Err(FormatError::TooLarge { .. })
        ));
        let mut value = json(&sample());
        value["workload"] = "w".repeat(MAX_NAME + 1).into();
        assert!(decode_error(&value).starts_with("workload: "));
    }
}
