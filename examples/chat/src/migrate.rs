//! The handover's wire format: what one chat server sends another to move its room with its
//! clients' connections, and what it hears back.
//!
//! ```text
//! source -> destination   frame(state)    the room: every connection's socket (frozen) and
//!                                         its application state
//! destination -> source   frame(ready)    every connection restored, held   (or refused)
//! source -> destination   frame(final)    after the source left the address: the sockets
//!                                         again, with what reached them after the freeze
//! ```
//!
//! A frame is a 4-byte big-endian length and that many bytes of one JSON object, which names
//! its `version` ([`FORMAT_VERSION`]) and its `kind` (`state`, `ready`, `refused`, `final`).
//! A socket is the object [`Frozen::encode`] makes; bytes are standard base64.
//!
//! The room has no state of its own beyond its members, and each member is a connection: its
//! nick, the input read from its socket but not handled yet (part of a line, or lines), and
//! the output taken from its outbox but not written yet. A connection without a nick has not
//! sent its `NICK` line yet.
//!
//! # Security
//! Everything here comes from the network: every size is capped ([`MAX_MESSAGE`],
//! [`MAX_CONNECTIONS`], [`MAX_UNREAD`], [`MAX_PENDING`]), every field is checked, and an error
//! names the field at fault. Who may send a state at all is the caller's check (the
//! workload's holder only).

use std::collections::HashMap;
use std::net::SocketAddr;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde::Serialize;
use serde_json::{Map, Value};

use meshlink_tcp_migrate::Frozen;

use crate::protocol::Nick;

/// The version of this format. History: 1 (the first).
pub const FORMAT_VERSION: u32 = 1;
/// The largest frame, in bytes: a state with its sockets' queues.
pub const MAX_MESSAGE: usize = 64 << 20;
/// The largest reply frame, in bytes.
pub const MAX_REPLY: usize = 64 << 10;
/// The most connections one state may carry.
pub const MAX_CONNECTIONS: usize = 4096;
/// The most unhandled input one connection may carry: a line in progress and what the
/// reader had buffered (a line is at most 4 KiB, the buffer 8 KiB).
pub const MAX_UNREAD: usize = 64 << 10;
/// The most unwritten output one connection may carry (its outbox, 256 lines of up to 4 KiB,
/// with room to spare). A member with more is too slow and is dropped at the freeze.
pub const MAX_PENDING: usize = 4 << 20;
/// The longest workload or server name, in bytes.
pub const MAX_NAME: usize = 255;

/// A room on the move: the first frame of a handover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    /// The workload the room is served on; the destination checks it is its own.
    pub workload: String,
    /// The generation the move will take: the destination goes live on arriving at it.
    pub generation: u64,
    /// The source server's name, for the logs.
    pub from: String,
    /// The connections, each with its application state.
    pub connections: Vec<Connection>,
}

/// One client's connection as shipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// The socket, frozen.
    pub socket: Frozen,
    /// The member's nick; `None` when the client has not sent `NICK` yet.
    pub nick: Option<Nick>,
    /// Input read from the socket and not handled yet, oldest first; the socket's own
    /// receive queue follows it.
    pub unread: Vec<u8>,
    /// Output for the client not written to the socket yet, oldest first; it goes after the
    /// socket's own send queue.
    pub pending: Vec<u8>,
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
/// answering for the address, in the order of the [`State`]'s connections. A parked socket still takes
/// in (and acknowledges) what its peer sends, so what arrived after the freeze is in these
/// and not in the state.
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
    /// A field is missing, of the wrong type or out of range; `field` is its path.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field's path, like `connections[2].nick`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> FormatError {
    FormatError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// `body` with its length in front: one frame.
///
/// # Panics
/// If `body` is over 4 GiB (every caller checks a far smaller limit first).
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

#[derive(Serialize)]
struct WireState<'a> {
    version: u32,
    kind: &'static str,
    workload: &'a str,
    generation: u64,
    from: &'a str,
    connections: Vec<WireConnection<'a>>,
}

#[derive(Serialize)]
struct WireConnection<'a> {
    socket: &'a Frozen,
    nick: Option<&'a str>,
    unread: String,
    pending: String,
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
    pub fn encode(&self) -> Vec<u8> {
        to_json(&WireState {
            version: FORMAT_VERSION,
            kind: "state",
            workload: &self.workload,
            generation: self.generation,
            from: &self.from,
            connections: self
                .connections
                .iter()
                .map(|c| WireConnection {
                    socket: &c.socket,
                    nick: c.nick.as_ref().map(Nick::as_str),
                    unread: BASE64.encode(&c.unread),
                    pending: BASE64.encode(&c.pending),
                })
                .collect(),
        })
    }

    /// A state as [`State::encode`] wrote it, checked field by field.
    ///
    /// # Errors
    /// [`FormatError`] naming the field at fault.
    pub fn decode(body: &[u8]) -> Result<State, FormatError> {
        let value = open(body, MAX_MESSAGE, "state")?;
        let top = Obj::of(&value, String::new())?;
        let workload = top.name("workload")?;
        let generation = top.u64("generation")?;
        let from = top.name("from")?;
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
            let nick = match c.field("nick")? {
                Value::Null => None,
                Value::String(s) => {
                    Some(Nick::parse(s).map_err(|e| invalid(c.path("nick"), e.to_string()))?)
                }
                _ => return Err(invalid(c.path("nick"), "not a string or null")),
            };
            let unread = c.bytes("unread", MAX_UNREAD)?;
            let pending = c.bytes("pending", MAX_PENDING)?;
            connections.push(Connection {
                socket,
                nick,
                unread,
                pending,
            });
        }
        Ok(State {
            workload,
            generation,
            from,
            connections,
        })
    }
}

impl Reply {
    /// The frame body (JSON).
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

/// A JSON object being read, with its path for the errors.
struct Obj<'a> {
    path: String,
    map: &'a Map<String, Value>,
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

    fn bytes(&self, name: &str, max: usize) -> Result<Vec<u8>, FormatError> {
        let text = self.str(name)?;
        // Checked before decoding, so that an oversized field costs nothing.
        if text.len() > max.div_ceil(3) * 4 {
            return Err(invalid(
                self.path(name),
                format!("over the limit of {max} bytes"),
            ));
        }
        let bytes = BASE64
            .decode(text)
            .map_err(|e| invalid(self.path(name), format!("not base64: {e}")))?;
        if bytes.len() > max {
            return Err(invalid(
                self.path(name),
                format!("{} bytes, over the limit of {max}", bytes.len()),
            ));
        }
        Ok(bytes)
    }

    fn socket(&self, name: &str) -> Result<Frozen, FormatError> {
        decode_socket(self.field(name)?, &self.path(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use meshlink_tcp_migrate::{Window, FORMAT_VERSION as SOCKET_VERSION};

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
            workload: "chat".into(),
            generation: 7,
            from: "vm-a1".into(),
            connections: vec![
                Connection {
                    socket: socket(40000),
                    nick: Some(Nick::parse("alice").unwrap()),
                    unread: b"half a li".to_vec(),
                    pending: b"* bob joined\nbob: he".to_vec(),
                },
                Connection {
                    socket: socket(40001),
                    nick: None,
                    unread: vec![0, 255, b'\n'],
                    pending: Vec::new(),
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
            (Box::new(|v| v["workload"] = "".into()), "workload"),
            (Box::new(|v| v["from"] = "vm\u{1b}[2J".into()), "from"),
            (Box::new(|v| v["generation"] = (-1).into()), "generation"),
            (Box::new(|v| v["connections"] = "x".into()), "connections"),
            (
                Box::new(|v| v["connections"][1] = 5.into()),
                "connections[1]: not an object",
            ),
            (
                Box::new(|v| v["connections"][0]["nick"] = "no spaces".into()),
                "connections[0].nick",
            ),
            (
                Box::new(|v| v["connections"][1]["unread"] = "***".into()),
                "connections[1].unread: not base64",
            ),
            (
                Box::new(|v| {
                    v["connections"][0]
                        .as_object_mut()
                        .unwrap()
                        .remove("pending");
                }),
                "connections[0].pending: missing",
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
    fn sizes_are_capped() {
        let mut state = sample();
        state.connections[0].unread = vec![b'x'; MAX_UNREAD];
        state.connections[0].pending = vec![b'y'; MAX_PENDING];
        assert_eq!(
            State::decode(&state.encode()).unwrap(),
            state,
            "at the caps"
        );

        state.connections[0].unread.push(b'x');
        let error = State::decode(&state.encode()).unwrap_err().to_string();
        assert!(error.starts_with("connections[0].unread: "), "{error}");
        state.connections[0].unread.pop();
        state.connections[0].pending.extend_from_slice(b"yyyy");
        let error = State::decode(&state.encode()).unwrap_err().to_string();
        assert!(error.starts_with("connections[0].pending: over"), "{error}");

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
        value["from"] = "v".repeat(MAX_NAME + 1).into();
        assert!(decode_error(&value).starts_with("from: "));
    }
}
