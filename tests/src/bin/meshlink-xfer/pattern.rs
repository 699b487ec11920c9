//! The payload: a pseudo-random pattern from a seed, which a transfer can stop anywhere in
//! and carry on from elsewhere.

/// A small, fast pseudo-random generator (xorshift64*): the payload only has to be
/// incompressible-looking and different per run, not secret.
pub(crate) struct XorShift64Star(u64);

impl XorShift64Star {
    pub(crate) fn new(seed: u64) -> Self {
        // Zero is xorshift's fixed point; any other value works.
        XorShift64Star(seed | 1)
    }

    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub(crate) fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next().to_le_bytes());
        }
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            let last = self.next().to_le_bytes();
            tail.copy_from_slice(&last[..tail.len()]);
        }
    }
}

/// A place in the pattern: byte `i` is byte `i % 8` of the generator's output number `i / 8`
/// (little-endian), so `send`'s chunks (whole outputs but for the last) make the same bytes.
/// Kept as the offset and the generator's state before the output that holds it, so a
/// transfer can stop anywhere and go on elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pattern {
    pub(crate) offset: u64,
    /// The generator's state before output `offset / 8`.
    pub(crate) state: u64,
}

impl Pattern {
    pub(crate) fn new(seed: u64) -> Pattern {
        Pattern {
            offset: 0,
            state: XorShift64Star::new(seed).0,
        }
    }

    /// The pattern's bytes from the offset on, as many as `buf` holds.
    pub(crate) fn fill(&self, buf: &mut [u8]) {
        let mut rng = XorShift64Star(self.state);
        let mut skip = (self.offset % 8) as usize;
        let mut at = 0;
        while at < buf.len() {
            let word = rng.next().to_le_bytes();
            let take = (8 - skip).min(buf.len() - at);
            buf[at..at + take].copy_from_slice(&word[skip..skip + take]);
            at += take;
            skip = 0;
        }
    }

    /// Moves the offset `n` bytes on.
    pub(crate) fn advance(&mut self, n: u64) {
        let mut rng = XorShift64Star(self.state);
        let words = (self.offset + n) / 8 - self.offset / 8;
        for _ in 0..words {
            rng.next();
        }
        self.offset += n;
        self.state = rng.0;
    }
}
