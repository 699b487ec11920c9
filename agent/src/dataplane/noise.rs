//! The WireGuard protocol engine behind a small trait of our own.
//!
//! The data plane talks to [`Noise`] only, so the engine (boringtun's `noise::Tunn` today) could
//! be replaced by a fork with the same shape without touching the packet path.
//!
//! # Crossing handshakes
//!
//! Two peers that start handshakes at the same moment (two agents switching to the relay in
//! the same timer tick) each receive the other's initiation while their own is out. boringtun
//! answers it and keeps its own initiation aside, so the peer's answer to that one still
//! completes it: one round trip brings both sides a session. But a new initiation pushes the
//! one kept aside out, and boringtun starts one whenever it has a packet to send and no
//! session is current, which after answering is the case until the peer's first data confirms
//! the answered session: for the packets queued during the handshake, which the caller flushes
//! right after the answer, and for any packet sent within the round trip. Each side then
//! answers the other's new initiation and discards the answer to its own, round after round,
//! until the handshake limiter stops both with cookies and WireGuard's 5 s retry settles it
//! (issue 10: ~29 initiations a side, the first packet 5 s late).
//!
//! So [`BoringNoise`] starts no initiation for packets after answering one while no session is
//! current: it holds them, in order, until a session is: the peer's answer to the initiation
//! kept aside, or the peer's first data on the answered session, after which
//! [`Noise::take_confirmed`] tells the caller to send what waited (as WireGuard's kernel
//! module sends its staged packets when a session it answered is confirmed). Should neither
//! come by the [`CONFIRM_RUNS`]th timer run (the peer's confirmation lost), it starts a
//! handshake of its own. Nothing changes on the wire: these are the messages a WireGuard peer
//! sends, fewer of them.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519;

/// Timer runs ([`Noise::update_timers`]; every 250 ms in the agent, so 0.25 to 0.5 s) that a
/// session this side answered may wait for the peer's confirmation before this side starts a
/// handshake of its own. The confirmation takes one round trip of the path.
pub const CONFIRM_RUNS: u8 = 2;
/// Packets held while an answered session waits for its confirmation; more are dropped, as
/// boringtun drops packets past as many queued during its own handshakes.
const MAX_HELD: usize = 256;
/// WireGuard's handshake initiation message type (the first byte of the datagram).
const HANDSHAKE_INIT: u8 = 1;
/// WireGuard's handshake response message type.
const HANDSHAKE_RESPONSE: u8 = 2;
/// WireGuard's transport data message type.
const DATA_MESSAGE: u8 = 4;
/// What boringtun adds to a packet it encrypts (header and tag); it panics when `dst` has
/// less room than the packet and this.
const SEAL_OVERHEAD: usize = 32;

/// What one call into the protocol engine produced. Buffers borrow the caller's `dst`.
#[derive(Debug)]
pub enum NoiseOutput<'a> {
    /// Nothing to send or deliver.
    Done,
    /// A datagram to send to the peer.
    Network(&'a mut [u8]),
    /// A decrypted IP packet, with its inner source address, to deliver to the TUN device.
    Tunnel(&'a mut [u8], IpAddr),
    /// The input was rejected.
    Error(NoiseError),
}

/// Why the protocol engine rejected a datagram, grouped for drop counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoiseError {
    /// Authentication failed (bad MAC or AEAD tag): forged, corrupt, or keyed to someone else.
    DecryptFailed,
    /// A counter already seen or too old: a replayed or badly reordered packet.
    Replay,
    /// No session matches the packet's receiver index (for example after a restart).
    NoSession,
    /// The handshake limiter is engaged and the sender has no valid cookie.
    UnderLoad,
    /// The peer has not completed a handshake for too long; queued packets were dropped.
    ConnectionExpired,
    /// Anything else: malformed packets, wrong lengths, unexpected handshake messages.
    Other,
}

impl From<WireGuardError> for NoiseError {
    fn from(e: WireGuardError) -> Self {
        match e {
            WireGuardError::InvalidMac | WireGuardError::InvalidAeadTag => {
                NoiseError::DecryptFailed
            }
            WireGuardError::DuplicateCounter | WireGuardError::InvalidCounter => NoiseError::Replay,
            WireGuardError::NoCurrentSession | WireGuardError::WrongIndex => NoiseError::NoSession,
            WireGuardError::UnderLoad => NoiseError::UnderLoad,
            WireGuardError::ConnectionExpired => NoiseError::ConnectionExpired,
            _ => NoiseError::Other,
        }
    }
}

/// A WireGuard session with one peer: handshakes, transport keys, timers.
pub trait Noise: Send {
    /// Encrypts one IP packet, or queues it until a session is up (starting a handshake
    /// unless one is under way, see the module documentation).
    /// `dst` must hold `src.len() + 32` bytes and at least 148.
    fn encapsulate<'a>(&mut self, src: &[u8], dst: &'a mut [u8]) -> NoiseOutput<'a>;
    /// Processes one datagram from the peer. After a `Network` output, or when
    /// [`Noise::take_confirmed`] says so, call again with an empty datagram until `Done` to
    /// flush packets queued during the handshake.
    fn decapsulate<'a>(
        &mut self,
        from: Option<IpAddr>,
        datagram: &[u8],
        dst: &'a mut [u8],
    ) -> NoiseOutput<'a>;
    /// Runs the protocol timers: retransmits, rekeys, keepalives, expiry.
    fn update_timers<'a>(&mut self, dst: &'a mut [u8]) -> NoiseOutput<'a>;
    /// Time since the last completed handshake, if any.
    fn time_since_last_handshake(&self) -> Option<Duration>;
    /// Starts a handshake now (unless one is under way), also with a live session, which
    /// keeps carrying traffic until the new one is up: a rekey ahead of time.
    fn start_handshake<'a>(&mut self, dst: &'a mut [u8]) -> NoiseOutput<'a>;
    /// Sends a handshake initiation now, also when one is under way (its endpoint changed:
    /// the one under way went where no answer will come from).
    fn resend_handshake<'a>(&mut self, dst: &'a mut [u8]) -> NoiseOutput<'a>;
    /// Whether the data message just decapsulated confirmed a session this side answered
    /// while packets waited for it (see the module documentation): they go with the calls
    /// `decapsulate` makes after a `Network` output. True once per confirmation.
    fn take_confirmed(&mut self) -> bool;
}

/// The boringtun engine.
pub struct BoringNoise {
    tunn: Tunn,
    /// Set when this side answered the peer's initiation with no session current, until one
    /// is: the timer runs since (see the module documentation).
    answered: Option<u8>,
    /// Packets to send that came meanwhile, in order.
    held: VecDeque<Vec<u8>>,
    /// A data message made a session current while packets waited.
    confirmed: bool,
}

impl BoringNoise {
    /// A session with `peer`; `limiter` checks handshake messages (the device gives its
    /// verifier, which counts nothing: the device counted them already).
    pub fn new(
        private: x25519::StaticSecret,
        peer: x25519::PublicKey,
        preshared: Option<[u8; 32]>,
        keepalive: Option<u16>,
        index: u32,
        limiter: Arc<RateLimiter>,
    ) -> Self {
        BoringNoise {
            tunn: Tunn::new(private, peer, preshared, keepalive, index, Some(limiter)),
            answered: None,
            held: VecDeque::new(),
            confirmed: false,
        }
    }

    /// Whether a session is current (carries what is sent).
    fn has_session(&self) -> bool {
        self.tunn.time_since_last_handshake().is_some()
    }

    /// Whether packets must wait for the session this side answered; the wait ends once a
    /// session is current.
    fn waiting(&mut self) -> bool {
        if self.answered.is_some() && self.has_session() {
            self.answered = None;
        }
        self.answered.is_some()
    }

    /// Keeps `packet` for [`BoringNoise::next_held`], if there is room.
    fn hold(&mut self, packet: &[u8]) {
        if self.held.len() < MAX_HELD {
            self.held.push_back(packet.to_vec());
        }
    }

    /// The oldest held packet, encrypted, once a session is current to carry it.
    fn next_held<'a>(&mut self, dst: &'a mut [u8]) -> NoiseOutput<'a> {
        if self.held.is_empty() || !self.has_session() {
            return NoiseOutput::Done;
        }
        while let Some(packet) = self.held.pop_front() {
            // Dropped, not handed to boringtun (which panics), should the caller's room be
            // too small for it.
            if packet.len() + SEAL_OVERHEAD <= dst.len() {
                return convert(self.tunn.encapsulate(&packet, dst));
            }
        }
        NoiseOutput::Done
    }

    /// The packets queued during the handshake, once a session can carry them: boringtun's
    /// queue (the older), then those held here.
    fn flush<'a>(&mut self, dst: &'a mut [u8]) -> NoiseOutput<'a> {
        if self.waiting() {
            // boringtun would start an initiation for them.
            return NoiseOutput::Done;
        }
        let n = match self.tunn.decapsulate(None, &[], dst) {
            TunnResult::WriteToNetwork(out) => out.len(),
            TunnResult::Err(e) => return NoiseOutput::Error(e.into()),
            _ => 0,
        };
        if n > 0 {
            return NoiseOutput::Network(&mut dst[..n]);
        }
        self.next_held(dst)
    }
}

fn convert(r: TunnResult<'_>) -> NoiseOutput<'_> {
    match r {
        TunnResult::Done => NoiseOutput::Done,
        TunnResult::Err(e) => NoiseOutput::Error(e.into()),
        TunnResult::WriteToNetwork(b) => NoiseOutput::Network(b),
        TunnResult::WriteToTunnelV4(b, a) => NoiseOutput::Tunnel(b, IpAddr::V4(a)),
        TunnResult::WriteToTunnelV6(b, a) => NoiseOutput::Tunnel(b, IpAddr::V6(a)),
    }
}

impl Noise for BoringNoise {
    fn encapsulate<'a>(&mut self, src: &[u8], dst: &'a mut [u8]) -> NoiseOutput<'a> {
        if self.answered.is_none() && self.held.is_empty() {
            return convert(self.tunn.encapsulate(src, dst));
        }
        self.hold(src);
        if self.waiting() {
            return NoiseOutput::Done;
        }
        // The wait is over with packets still held: they go first, in order, on the session
        // or after the handshake this side starts now.
        if self.has_session() {
            return self.next_held(dst);
        }
        convert(self.tunn.format_handshake_initiation(dst, false))
    }
    fn decapsulate<'a>(
        &mut self,
        from: Option<IpAddr>,
        datagram: &[u8],
        dst: &'a mut [u8],
    ) -> NoiseOutput<'a> {
        let Some(&kind) = datagram.first() else {
            return self.flush(dst);
        };
        let out = self.tunn.decapsulate(from, datagram, dst);
        match (kind, &out) {
            // Answered (not a cookie), with no session current.
            (HANDSHAKE_INIT, TunnResult::WriteToNetwork(reply))
                if reply.first() == Some(&HANDSHAKE_RESPONSE) && !self.has_session() =>
            {
                self.answered = Some(0);
            }
            // The first data on a session, while packets wait for one.
            (
                DATA_MESSAGE,
                TunnResult::Done
                | TunnResult::WriteToTunnelV4(..)
                | TunnResult::WriteToTunnelV6(..),
            ) if (self.answered.is_some() || !self.held.is_empty()) && self.has_session() => {
                self.answered = None;
                self.confirmed = true;
            }
            _ => {}
        }
        convert(out)
    }
    fn update_timers<'a>(&mut self, dst: &'a mut [u8]) -> NoiseOutput<'a> {
        let mut give_up = false;
        if let Some(runs) = self.answered {
            if self.has_session() {
                self.answered = None;
            } else if runs + 1 >= CONFIRM_RUNS {
                self.answered = None;
                give_up = true;
            } else {
                self.answered = Some(runs + 1);
            }
        }
        let n = match self.tunn.update_timers(dst) {
            TunnResult::WriteToNetwork(out) => out.len(),
            TunnResult::Err(e) => {
                if matches!(e, WireGuardError::ConnectionExpired) {
                    // boringtun dropped its queue: the packets held here go too.
                    self.held.clear();
                }
                return NoiseOutput::Error(e.into());
            }
            _ => 0,
        };
        if n > 0 {
            return NoiseOutput::Network(&mut dst[..n]);
        }
        if give_up {
            // No confirmation came: a handshake of this side's own brings the session, and
            // with it what waits.
            return convert(self.tunn.format_handshake_initiation(dst, false));
        }
        NoiseOutput::Done
    }
    fn time_since_last_handshake(&self) -> Option<Duration> {
        self.tunn.time_since_last_handshake()
    }
    fn start_handshake<'a>(&mut self, dst: &'a mut [u8]) -> NoiseOutput<'a> {
        if self.waiting() {
            // The session answered is coming up; an initiation would push out this side's own.
            return NoiseOutput::Done;
        }
        convert(self.tunn.format_handshake_initiation(dst, false))
    }
    fn resend_handshake<'a>(&mut self, dst: &'a mut [u8]) -> NoiseOutput<'a> {
        convert(self.tunn.format_handshake_initiation(dst, true))
    }
    fn take_confirmed(&mut self) -> bool {
        std::mem::take(&mut self.confirmed)
    }
}
