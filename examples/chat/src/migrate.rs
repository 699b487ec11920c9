//! What the chat ships in a handover ([`Chat`], the [`Application`] of
//! [`meshlink_tcp_migrate::handover`], which carries the frames, the sockets and the rest).
//!
//! The room has no state of its own beyond its members, and each member is a connection:
//! its session ([`Session`]) is its nick, the input read from its socket but not handled yet
//! (part of a line, or lines) and the output taken from its outbox but not written yet. A
//! connection without a nick has not sent its `NICK` line yet. Its place in this server's
//! room does not travel: at the destination the member rejoins without an announcement.
//!
//! ```text
//! session:  nick length (1 byte; 0: none), nick,
//!           unread length (4 bytes, big-endian), unread,
//!           pending length (4 bytes, big-endian), pending
//! state:    empty
//! ```
//!
//! # Security
//! A session comes from the network: the nick is parsed as any other, the unread input and
//! pending output are capped ([`MAX_UNREAD`], [`MAX_PENDING`]), nothing may follow, and an
//! error names the field at fault.

use meshlink_tcp_migrate::handover::{Application, FormatError};

use crate::protocol::Nick;
use crate::server::Session;

/// The most unhandled input one connection may carry: a line in progress and what the
/// reader had buffered (a line is at most 4 KiB, the buffer 8 KiB).
pub const MAX_UNREAD: usize = 64 << 10;
/// The most unwritten output one connection may carry (its outbox, 256 lines of up to 4 KiB,
/// with room to spare). A member with more is too slow and is dropped at the freeze.
pub const MAX_PENDING: usize = 4 << 20;

/// The chat's part in a handover: no state of its own, a [`Session`] per connection.
#[derive(Debug)]
pub struct Chat;

impl Application for Chat {
    /// History: 1 (the first).
    const FORMAT: &'static str = "meshlink-chat/1";
    type State = ();
    type Session = Session;

    fn encode_state((): &()) -> Vec<u8> {
        Vec::new()
    }

    fn decode_state(bytes: &[u8]) -> Result<(), FormatError> {
        if bytes.is_empty() {
            Ok(())
        } else {
            Err(FormatError::invalid(
                "",
                format!("{} bytes; the room has no state of its own", bytes.len()),
            ))
        }
    }

    fn encode_session(session: &Session) -> Vec<u8> {
        let nick = session.nick.as_ref().map_or("", Nick::as_str);
        let mut out =
            Vec::with_capacity(9 + nick.len() + session.unread.len() + session.pending.len());
        out.push(u8::try_from(nick.len()).expect("a nick is at most 32 bytes"));
        out.extend_from_slice(nick.as_bytes());
        for field in [&session.unread, &session.pending] {
            let len = u32::try_from(field.len()).expect("capped far below 4 GiB");
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(field);
        }
        out
    }

    fn decode_session(bytes: &[u8]) -> Result<Session, FormatError> {
        let mut rest = bytes;
        let nick_len = usize::from(take(&mut rest, 1, "nick")?[0]);
        let nick = match take(&mut rest, nick_len, "nick")? {
            [] => None,
            name => {
                let name = std::str::from_utf8(name)
                    .map_err(|_| FormatError::invalid("nick", "not UTF-8"))?;
                Some(Nick::parse(name).map_err(|e| FormatError::invalid("nick", e.to_string()))?)
            }
        };
        let unread = take_field(&mut rest, "unread", MAX_UNREAD)?.to_vec();
        let pending = take_field(&mut rest, "pending", MAX_PENDING)?.to_vec();
        if !rest.is_empty() {
            return Err(FormatError::invalid(
                "",
                format!("{} bytes after the pending output", rest.len()),
            ));
        }
        Ok(Session {
            nick,
            membership: None,
            unread,
            pending,
        })
    }
}

/// The next `n` bytes of `rest`.
fn take<'a>(rest: &mut &'a [u8], n: usize, field: &str) -> Result<&'a [u8], FormatError> {
    if rest.len() < n {
        return Err(FormatError::invalid(field, "cut short"));
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Ok(head)
}

/// A field of at most `max` bytes after its 4-byte length.
fn take_field<'a>(rest: &mut &'a [u8], field: &str, max: usize) -> Result<&'a [u8], FormatError> {
    let header = take(rest, 4, field)?;
    let len = u32::from_be_bytes(header.try_into().expect("4 bytes")) as usize;
    if len > max {
        return Err(FormatError::invalid(
            field,
            format!("{len} bytes, over the limit of {max}"),
        ));
    }
    take(rest, len, field)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(nick: Option<&str>, unread: &[u8], pending: &[u8]) -> Session {
        Session {
            nick: nick.map(|n| Nick::parse(n).unwrap()),
            membership: None,
            unread: unread.to_vec(),
            pending: pending.to_vec(),
        }
    }

    fn round_trip(s: &Session) -> Session {
        Chat::decode_session(&Chat::encode_session(s)).unwrap()
    }

    fn same(a: &Session, b: &Session) -> bool {
        (a.nick.as_ref(), &a.unread, &a.pending) == (b.nick.as_ref(), &b.unread, &b.pending)
    }

    #[test]
    fn sessions_round_trip() {
        for s in [
            session(Some("alice"), b"half a li", b"* bob joined\nbob: he"),
            session(None, &[0, 255, b'\n'], b""),
            session(Some(&"x".repeat(32)), b"", b""),
        ] {
            assert!(same(&round_trip(&s), &s));
        }
        Chat::decode_state(&Chat::encode_state(&())).unwrap();
    }

    #[test]
    fn bad_fields_are_named() {
        let good = Chat::encode_session(&session(Some("alice"), b"ab", b"cd"));
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (Vec::new(), "nick: cut short"),
            (good[..3].to_vec(), "nick: cut short"),
            (
                [&[9][..], b"no spaces"].concat(),
                "nick: a nick is 1-32 characters",
            ),
            ([&[2][..], &[0xff, 0xfe]].concat(), "nick: not UTF-8"),
            (good[..8].to_vec(), "unread: cut short"),
            (good[..good.len() - 1].to_vec(), "pending: cut short"),
            (
                [&good[..], b"!"].concat(),
                "1 bytes after the pending output",
            ),
        ];
        for (bytes, wanted) in cases {
            let error = match Chat::decode_session(&bytes) {
                Ok(_) => panic!("{bytes:?} decoded"),
                Err(e) => e.to_string(),
            };
            assert!(error.contains(wanted), "{error:?} should say {wanted:?}");
        }
        assert_eq!(
            Chat::decode_state(b"x").unwrap_err().to_string(),
            "1 bytes; the room has no state of its own"
        );
    }

    #[test]
    fn sizes_are_capped() {
        let at_caps = session(
            Some("alice"),
            &vec![b'x'; MAX_UNREAD],
            &vec![b'y'; MAX_PENDING],
        );
        assert!(same(&round_trip(&at_caps), &at_caps), "at the caps");
        let over = session(None, &vec![b'x'; MAX_UNREAD + 1], b"");
        let error = Chat::decode_session(&Chat::encode_session(&over))
            .unwrap_err()
            .to_string();
        assert_eq!(error, "unread: 65537 bytes, over the limit of 65536");
        let over = session(None, b"", &vec![b'y'; MAX_PENDING + 1]);
        let error = Chat::decode_session(&Chat::encode_session(&over))
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("pending: 4194305 bytes, over"), "{error}");
    }
}
