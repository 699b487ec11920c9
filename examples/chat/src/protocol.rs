//! The room's line protocol, shared by the server and the client.
//!
//! Every message is one line of UTF-8 text ending in `\n` (a `\r` just before it is dropped,
//! so `nc -C` and telnet work too). A line is at most [`MAX_LINE`] bytes, not counting its
//! ending.
//!
//! ```text
//! client -> server   NICK <nick>                         first line, once
//!                    <text>                              every later line
//! server -> client   * welcome to the room on <server>   after a good NICK
//!                    <nick>: <text>                      what another member said
//!                    * <nick> joined | * <nick> left
//!                    * server shutting down              before the server closes
//!                    ERR bad nick | ERR line too long    then the server closes
//! ```

use std::fmt;
use std::io;
use std::str::FromStr;

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// The longest line either side accepts, in bytes, without its `\n`.
pub const MAX_LINE: usize = 4096;

/// A member's name: 1 to [`Nick::MAX_LEN`] characters of `[A-Za-z0-9_-]`.
///
/// The only way to make one is [`Nick::parse`] (or [`FromStr`]), so a `Nick` is always valid.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Nick(String);

/// A name that is not a valid [`Nick`], or a first line that is not `NICK <nick>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a nick is 1-32 characters of A-Z, a-z, 0-9, '_' and '-'")]
pub struct BadNick;

impl Nick {
    /// The longest nick, in characters (all of them ASCII).
    pub const MAX_LEN: usize = 32;

    /// Checks `name` and makes it a nick.
    ///
    /// # Errors
    /// [`BadNick`] when `name` is empty, too long or has another character.
    pub fn parse(name: &str) -> Result<Nick, BadNick> {
        let allowed = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
        if (1..=Self::MAX_LEN).contains(&name.len()) && name.chars().all(allowed) {
            Ok(Nick(name.to_string()))
        } else {
            Err(BadNick)
        }
    }

    /// The nick as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Nick {
    type Err = BadNick;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Nick::parse(s)
    }
}

impl fmt::Display for Nick {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Reads a client's first line: `NICK <nick>`, with exactly one space.
///
/// # Errors
/// [`BadNick`] for any other line.
pub fn parse_hello(line: &str) -> Result<Nick, BadNick> {
    line.strip_prefix("NICK ")
        .ok_or(BadNick)
        .and_then(Nick::parse)
}

/// The client's first line for `nick`, with its `\n`.
pub fn hello(nick: &Nick) -> String {
    format!("NICK {nick}\n")
}

/// Why [`read_line`] returned no line.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    /// The peer sent more than the limit without a line ending.
    #[error("line too long")]
    TooLong,
    /// The connection failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Reads the next line from `reader`, of at most `max` bytes without its ending, as text
/// (invalid UTF-8 is replaced, not refused). `Ok(None)` is the end of the stream; a last line
/// without `\n` is still returned.
///
/// `partial` keeps the bytes of a line not yet complete. The only await is on filling the
/// reader's buffer, and bytes move from the buffer to `partial` without one in between, so
/// the future may be dropped at any await (in `tokio::select!`) and called again with the
/// same `partial` without losing or repeating anything.
///
/// # Errors
/// [`LineError::TooLong`] as soon as the line exceeds `max` (the rest of it is not read);
/// [`LineError::Io`] when reading fails.
pub async fn read_line<R>(
    reader: &mut R,
    partial: &mut Vec<u8>,
    max: usize,
) -> Result<Option<String>, LineError>
where
    R: AsyncBufRead + Unpin,
{
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            if partial.is_empty() {
                return Ok(None);
            }
            return Ok(Some(take_line(partial)));
        }
        let (chunk, found_end) = match available.iter().position(|&b| b == b'\n') {
            Some(end) => (&available[..end], true),
            None => (available, false),
        };
        // A `\r` that may end the line is not counted.
        let last = chunk.last().or(partial.last());
        let limit = if last == Some(&b'\r') { max + 1 } else { max };
        if partial.len() + chunk.len() > limit {
            return Err(LineError::TooLong);
        }
        partial.extend_from_slice(chunk);
        let used = chunk.len() + usize::from(found_end);
        reader.consume(used);
        if found_end {
            return Ok(Some(take_line(partial)));
        }
    }
}

/// Empties `partial` into a line without its `\r`.
fn take_line(partial: &mut Vec<u8>) -> String {
    if partial.last() == Some(&b'\r') {
        partial.pop();
    }
    let line = String::from_utf8_lossy(partial).into_owned();
    partial.clear();
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nicks() {
        for good in ["a", "alice", "Bob_2", "x-y", &"n".repeat(32)] {
            assert_eq!(Nick::parse(good).unwrap().as_str(), good);
        }
        for bad in ["", "al ice", "é", "a.b", &"n".repeat(33), "alice\r"] {
            assert_eq!(Nick::parse(bad), Err(BadNick), "{bad:?}");
        }
        assert_eq!(parse_hello("NICK alice").unwrap().as_str(), "alice");
        assert!(parse_hello("NICK  alice").is_err());
        assert!(parse_hello("nick alice").is_err());
        assert!(parse_hello("alice").is_err());
    }

    async fn lines(input: &[u8], max: usize) -> Vec<Result<Option<String>, String>> {
        // A one-byte buffer makes every line span many fills.
        let mut reader = tokio::io::BufReader::with_capacity(1, input);
        let mut partial = Vec::new();
        let mut out = Vec::new();
        loop {
            let next = read_line(&mut reader, &mut partial, max).await;
            let stop = !matches!(next, Ok(Some(_)));
            out.push(next.map_err(|e| e.to_string()));
            if stop {
                return out;
            }
        }
    }

    #[tokio::test]
    async fn reads_lines() {
        let ok = |s: &str| Ok(Some(s.to_string()));
        assert_eq!(
            lines(b"hi\r\nthere\n\nlast", 5).await,
            vec![ok("hi"), ok("there"), ok(""), ok("last"), Ok(None)]
        );
        assert_eq!(
            lines(b"12345\n12345\r\n123456\n", 5).await,
            vec![ok("12345"), ok("12345"), Err("line too long".into())]
        );
        assert_eq!(
            lines(b"12345\rx\n", 5).await,
            vec![Err("line too long".into())]
        );
        assert_eq!(lines(b"", 5).await, vec![Ok(None)]);
    }
}
