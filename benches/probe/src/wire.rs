//! The probe's datagrams.
//!
//! ```text
//! probe   seq: u64 | sent_unix_ns: u64                  16 bytes, big-endian
//! answer  seq: u64 | sent_unix_ns: u64 | name: UTF-8    the probe, then the responder's name
//! ```
//!
//! `sent_unix_ns` is the prober's `CLOCK_REALTIME` in nanoseconds since the Unix epoch, so that
//! it compares with timestamps taken by other processes on the same machine. The responder
//! copies the probe as it is; only the prober reads the fields.

use std::time::{SystemTime, UNIX_EPOCH};

/// The size of a probe.
pub const PROBE_LEN: usize = 16;

/// The longest responder name, in bytes.
pub const MAX_NAME: usize = 64;

/// One probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// The probe's number, from 0.
    pub seq: u64,
    /// When it was sent (see the module documentation).
    pub sent_unix_ns: u64,
}

impl Probe {
    /// The datagram.
    pub fn encode(&self) -> [u8; PROBE_LEN] {
        let mut out = [0u8; PROBE_LEN];
        out[..8].copy_from_slice(&self.seq.to_be_bytes());
        out[8..].copy_from_slice(&self.sent_unix_ns.to_be_bytes());
        out
    }

    /// Reads a probe; `None` unless `datagram` is exactly [`PROBE_LEN`] bytes.
    pub fn parse(datagram: &[u8]) -> Option<Probe> {
        let bytes: &[u8; PROBE_LEN] = datagram.try_into().ok()?;
        Some(Self::from_bytes(bytes))
    }

    fn from_bytes(bytes: &[u8; PROBE_LEN]) -> Probe {
        let (seq, sent) = bytes.split_at(8);
        Probe {
            seq: u64::from_be_bytes(seq.try_into().expect("8 bytes")),
            sent_unix_ns: u64::from_be_bytes(sent.try_into().expect("8 bytes")),
        }
    }
}

/// A responder's name: 1 to [`MAX_NAME`] bytes of UTF-8 without control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(String);

/// A name that is empty, too long or has control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadName;

impl std::fmt::Display for BadName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "a responder name is 1-{MAX_NAME} bytes of text without control characters"
        )
    }
}

impl std::error::Error for BadName {}

impl Name {
    /// Checks `name`.
    ///
    /// # Errors
    /// [`BadName`].
    pub fn parse(name: &str) -> Result<Name, BadName> {
        if (1..=MAX_NAME).contains(&name.len()) && !name.chars().any(char::is_control) {
            Ok(Name(name.to_string()))
        } else {
            Err(BadName)
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Name {
    type Err = BadName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Name::parse(s)
    }
}

/// A responder's answer to a probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The probe answered.
    pub probe: Probe,
    /// Who answered.
    pub by: Name,
}

impl Answer {
    /// Appends the answer to `probe` from `by` to `out`: the probe's bytes as received, then
    /// the name.
    pub fn encode(probe: &[u8; PROBE_LEN], by: &Name, out: &mut Vec<u8>) {
        out.extend_from_slice(probe);
        out.extend_from_slice(by.as_str().as_bytes());
    }

    /// Reads an answer; `None` if `datagram` is shorter than a probe or the name is not a
    /// valid [`Name`].
    pub fn parse(datagram: &[u8]) -> Option<Answer> {
        let (probe, name) = datagram.split_first_chunk::<PROBE_LEN>()?;
        let by = Name::parse(std::str::from_utf8(name).ok()?).ok()?;
        Some(Answer {
            probe: Probe::from_bytes(probe),
            by,
        })
    }
}

/// Now, as [`Probe::sent_unix_ns`] counts it.
pub fn unix_now_ns() -> u64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    // Fits in a u64 until the year 2554.
    since_epoch.as_nanos() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let probe = Probe {
            seq: 7,
            sent_unix_ns: 1_800_000_000_123_456_789,
        };
        let bytes = probe.encode();
        assert_eq!(&bytes[..8], &[0, 0, 0, 0, 0, 0, 0, 7]);
        assert_eq!(Probe::parse(&bytes), Some(probe));
        assert_eq!(Probe::parse(&bytes[..15]), None);

        let name = Name::parse("vm-b").unwrap();
        let mut answer = Vec::new();
        Answer::encode(&bytes, &name, &mut answer);
        assert_eq!(answer.len(), PROBE_LEN + 4);
        assert_eq!(Answer::parse(&answer), Some(Answer { probe, by: name }));
        assert_eq!(Answer::parse(&bytes), None, "no name");
        assert_eq!(Answer::parse(&bytes[..10]), None);
    }

    #[test]
    fn names() {
        assert!(Name::parse("vm-b").is_ok());
        assert!(Name::parse(&"n".repeat(MAX_NAME)).is_ok());
        assert!(Name::parse("").is_err());
        assert!(Name::parse(&"n".repeat(MAX_NAME + 1)).is_err());
        assert!(Name::parse("a\nb").is_err());
    }
}
