//! Relayed WireGuard datagrams: the frames an agent and a relay exchange as QUIC datagrams.
//!
//! A relay forwards opaque WireGuard datagrams between enrolled nodes, keyed by node public
//! key: the agent sends `[destination key | fragment header | bytes]`, the relay checks that
//! both ends are nodes it serves, puts the *source's* key where the destination's was and
//! delivers the frame to the destination's session. The relay never sees plaintext: what it
//! carries is WireGuard ciphertext, authenticated again by the receiving peer.
//!
//! A QUIC datagram is smaller than a full WireGuard datagram (1,452 bytes for a 1,420-byte
//! tunnel MTU), so a datagram is cut into at most [`MAX_FRAGMENTS`] fragments that the
//! receiver puts back together ([`Reassembler`], bounded in entries and time); one that
//! would need more is refused with [`RelayError::TooLarge`] and counted by the caller, never
//! dropped unnoticed.
//!
//! ```text
//! frame: peer public key (32) | id (u16, per sender) | index (u8) | count (u8) | bytes
//! ```

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::key::PublicKey;

/// Bytes before the payload of a frame.
pub const HEADER_LEN: usize = 32 + 2 + 1 + 1;
/// The most fragments one datagram is cut into.
pub const MAX_FRAGMENTS: usize = 4;
/// How long the fragments of one datagram may take to arrive.
pub const REASSEMBLY_WINDOW: Duration = Duration::from_secs(2);
/// The most datagrams being put back together at once (per receiver).
pub const MAX_PARTIAL: usize = 64;

/// Why a datagram cannot be framed or a frame read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    /// The datagram needs more than [`MAX_FRAGMENTS`] frames of the path's size.
    #[error("datagram of {len} bytes does not fit in {MAX_FRAGMENTS} relay frames of {max} bytes")]
    TooLarge {
        /// The datagram's length.
        len: usize,
        /// The largest frame the path takes.
        max: usize,
    },
    /// A frame shorter than its header, or with an impossible fragment header.
    #[error("malformed relay frame")]
    Malformed,
}

/// One frame's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Destination (agent to relay) or source (relay to agent).
    pub peer: PublicKey,
    /// The datagram's id, chosen by its sender.
    pub id: u16,
    /// This fragment's place.
    pub index: u8,
    /// How many fragments the datagram has.
    pub count: u8,
}

/// Cuts `datagram` into frames for `peer` of at most `max_frame` bytes each.
///
/// # Errors
/// [`RelayError::TooLarge`] when it would take more than [`MAX_FRAGMENTS`] frames.
pub fn frames(
    peer: &PublicKey,
    id: u16,
    datagram: &[u8],
    max_frame: usize,
) -> Result<Vec<Vec<u8>>, RelayError> {
    let room = max_frame.saturating_sub(HEADER_LEN);
    let count = if room == 0 {
        usize::MAX
    } else {
        datagram.len().div_ceil(room).max(1)
    };
    if count > MAX_FRAGMENTS {
        return Err(RelayError::TooLarge {
            len: datagram.len(),
            max: max_frame,
        });
    }
    Ok((0..count)
        .map(|i| {
            let part = &datagram[i * room..((i + 1) * room).min(datagram.len())];
            let mut f = Vec::with_capacity(HEADER_LEN + part.len());
            f.extend_from_slice(&peer.0);
            f.extend_from_slice(&id.to_be_bytes());
            f.push(i as u8);
            f.push(count as u8);
            f.extend_from_slice(part);
            f
        })
        .collect())
}

/// Reads a frame's header.
///
/// # Errors
/// [`RelayError::Malformed`] for a short frame or a fragment header out of range.
pub fn parse(frame: &[u8]) -> Result<(Header, &[u8]), RelayError> {
    if frame.len() < HEADER_LEN {
        return Err(RelayError::Malformed);
    }
    let peer = PublicKey(frame[..32].try_into().map_err(|_| RelayError::Malformed)?);
    let id = u16::from_be_bytes([frame[32], frame[33]]);
    let (index, count) = (frame[34], frame[35]);
    if count == 0 || usize::from(count) > MAX_FRAGMENTS || index >= count {
        return Err(RelayError::Malformed);
    }
    Ok((
        Header {
            peer,
            id,
            index,
            count,
        },
        &frame[HEADER_LEN..],
    ))
}

/// Puts `peer` in a frame's key field (what a relay does before delivering it).
///
/// # Errors
/// [`RelayError::Malformed`] for a frame shorter than its header.
pub fn readdress(frame: &mut [u8], peer: &PublicKey) -> Result<(), RelayError> {
    if frame.len() < HEADER_LEN {
        return Err(RelayError::Malformed);
    }
    frame[..32].copy_from_slice(&peer.0);
    Ok(())
}

#[derive(Debug)]
struct Partial {
    peer: PublicKey,
    id: u16,
    started: Instant,
    parts: Vec<Option<Vec<u8>>>,
}

/// Puts fragmented datagrams back together; bounded to [`MAX_PARTIAL`] datagrams in progress
/// and [`REASSEMBLY_WINDOW`] each (the oldest give way).
#[derive(Debug, Default)]
pub struct Reassembler {
    partial: VecDeque<Partial>,
    expired: u64,
}

impl Reassembler {
    /// An empty reassembler.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one frame; returns the sender and the whole datagram once complete.
    pub fn push(
        &mut self,
        header: Header,
        bytes: &[u8],
        now: Instant,
    ) -> Option<(PublicKey, Vec<u8>)> {
        if header.count == 1 {
            return Some((header.peer, bytes.to_vec()));
        }
        let before = self.partial.len();
        self.partial
            .retain(|p| now.saturating_duration_since(p.started) < REASSEMBLY_WINDOW);
        self.expired += (before - self.partial.len()) as u64;
        let at = self
            .partial
            .iter()
            .position(|p| p.peer == header.peer && p.id == header.id);
        let at = match at {
            Some(i) if self.partial[i].parts.len() == usize::from(header.count) => i,
            Some(i) => {
                // The same id with another count: a new datagram after a wrap; start over.
                self.partial.remove(i);
                self.expired += 1;
                self.start(header, now)
            }
            None => self.start(header, now),
        };
        let p = &mut self.partial[at];
        p.parts[usize::from(header.index)] = Some(bytes.to_vec());
        if p.parts.iter().all(Option::is_some) {
            let p = self.partial.remove(at)?;
            let whole = p.parts.into_iter().flatten().flatten().collect();
            return Some((p.peer, whole));
        }
        None
    }

    fn start(&mut self, header: Header, now: Instant) -> usize {
        if self.partial.len() >= MAX_PARTIAL {
            self.partial.pop_front();
            self.expired += 1;
        }
        self.partial.push_back(Partial {
            peer: header.peer,
            id: header.id,
            started: now,
            parts: vec![None; usize::from(header.count)],
        });
        self.partial.len() - 1
    }

    /// Datagrams given up unfinished (late, evicted, or superseded).
    #[must_use]
    pub fn expired(&self) -> u64 {
        self.expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_wireguard_datagram_crosses_in_two_frames_in_any_order() {
        let peer = PublicKey([5; 32]);
        let datagram: Vec<u8> = (0..1452u32).map(|i| i as u8).collect();
        let mut f = frames(&peer, 9, &datagram, 1200).unwrap();
        assert_eq!(f.len(), 2);
        assert!(f.iter().all(|x| x.len() <= 1200));
        f.reverse();
        let mut r = Reassembler::new();
        let now = Instant::now();
        let (h0, b0) = parse(&f[0]).unwrap();
        assert_eq!(r.push(h0, b0, now), None);
        let (h1, b1) = parse(&f[1]).unwrap();
        assert_eq!(r.push(h1, b1, now), Some((peer, datagram)));
    }

    #[test]
    fn too_large_is_an_error_not_a_silent_drop() {
        let peer = PublicKey([5; 32]);
        assert_eq!(
            frames(&peer, 1, &[0; 9000], 1200),
            Err(RelayError::TooLarge {
                len: 9000,
                max: 1200
            })
        );
        assert!(frames(&peer, 1, &[0; 10], HEADER_LEN).is_err());
    }

    #[test]
    fn bad_headers_are_refused_and_partial_state_is_bounded() {
        assert_eq!(parse(&[0; 10]), Err(RelayError::Malformed));
        let mut f = frames(&PublicKey([1; 32]), 1, &[0; 100], 80).unwrap();
        f[0][35] = 0;
        assert!(parse(&f[0]).is_err());
        f[0][35] = 9;
        assert!(parse(&f[0]).is_err());
        let mut r = Reassembler::new();
        let now = Instant::now();
        for id in 0..1000u16 {
            let f = frames(&PublicKey([1; 32]), id, &[0; 100], 80).unwrap();
            let (h, b) = parse(&f[0]).unwrap();
            assert_eq!(r.push(h, b, now), None);
        }
        assert_eq!(r.partial.len(), MAX_PARTIAL);
        assert_eq!(r.expired(), 1000 - MAX_PARTIAL as u64);
        // Late fragments start nothing that lives past the window.
        let later = now + REASSEMBLY_WINDOW;
        let f = frames(&PublicKey([2; 32]), 1, &[0; 100], 80).unwrap();
        let (h, b) = parse(&f[0]).unwrap();
        r.push(h, b, later);
        assert_eq!(r.partial.len(), 1);
    }
}
