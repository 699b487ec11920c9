//! The WireGuard protocol engine behind a small trait of our own.
//!
//! The data plane talks to [`Noise`] only, so the engine (boringtun's `noise::Tunn` today) could
//! be replaced by a fork with the same shape without touching the packet path.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519;

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
    /// Encrypts one IP packet (or starts a handshake and queues it).
    /// `dst` must hold `src.len() + 32` bytes and at least 148.
    fn encapsulate<'a>(&mut self, src: &[u8], dst: &'a mut [u8]) -> NoiseOutput<'a>;
    /// Processes one datagram from the peer. After a `Network` output, call again with an empty
    /// datagram until `Done` to flush packets queued during the handshake.
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
}

/// The boringtun engine.
pub struct BoringNoise(Tunn);

impl BoringNoise {
    /// A session with `peer`, using a limiter shared by the whole device.
    pub fn new(
        private: x25519::StaticSecret,
        peer: x25519::PublicKey,
        preshared: Option<[u8; 32]>,
        keepalive: Option<u16>,
        index: u32,
        limiter: Arc<RateLimiter>,
    ) -> Self {
        BoringNoise(Tunn::new(
            private,
            peer,
            preshared,
            keepalive,
            index,
            Some(limiter),
        ))
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
        convert(self.0.encapsulate(src, dst))
    }
    fn decapsulate<'a>(
        &mut self,
        from: Option<IpAddr>,
        datagram: &[u8],
        dst: &'a mut [u8],
    ) -> NoiseOutput<'a> {
        convert(self.0.decapsulate(from, datagram, dst))
    }
    fn update_timers<'a>(&mut self, dst: &'a mut [u8]) -> NoiseOutput<'a> {
        convert(self.0.update_timers(dst))
    }
    fn time_since_last_handshake(&self) -> Option<Duration> {
        self.0.time_since_last_handshake()
    }
    fn start_handshake<'a>(&mut self, dst: &'a mut [u8]) -> NoiseOutput<'a> {
        convert(self.0.format_handshake_initiation(dst, false))
    }
    fn resend_handshake<'a>(&mut self, dst: &'a mut [u8]) -> NoiseOutput<'a> {
        convert(self.0.format_handshake_initiation(dst, true))
    }
}
