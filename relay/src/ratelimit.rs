//! A token bucket, given the time: the per-session cap on messages from an agent, the relay's
//! per-node cap on bytes and the reflexive address responder's per-source cap on answers.

use std::time::Instant;

/// Allows `rate` events per second on average and `burst` at once.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        TokenBucket {
            rate: f64::from(rate),
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// A full bucket at `now` that allows `rate` units (bytes, say) per second on average and
    /// `burst` at once.
    pub fn per_second(rate: u64, burst: u64, now: Instant) -> Self {
        let burst = burst.max(1) as f64;
        TokenBucket {
            rate: rate as f64,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes one token if there is one at `now`.
    pub fn allow(&mut self, now: Instant) -> bool {
        self.take(now, 1)
    }

    /// Takes `amount` tokens if there are that many at `now`; takes none otherwise.
    pub fn take(&mut self, now: Instant, amount: u64) -> bool {
        self.refill(now);
        let amount = amount as f64;
        if self.tokens >= amount {
            self.tokens -= amount;
            true
        } else {
            false
        }
    }

    /// Whether the bucket is full at `now`: forgetting it would change nothing.
    pub fn is_full(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * self.rate >= self.burst
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(20, 100, t0);
        assert_eq!((0..150).filter(|_| b.allow(t0)).count(), 100);
        assert!(!b.allow(t0));
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!((0..50).filter(|_| b.allow(t1)).count(), 10);
        let later = t1 + Duration::from_secs(3600);
        assert_eq!(
            (0..200).filter(|_| b.allow(later)).count(),
            100,
            "never more than the burst"
        );
    }

    #[test]
    fn bytes_at_a_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::per_second(1000, 1500, t0);
        assert!(b.take(t0, 1200));
        assert!(!b.take(t0, 1200), "300 left");
        assert!(!b.is_full(t0));
        let t1 = t0 + Duration::from_millis(900);
        assert!(b.take(t1, 1200), "300 + 900");
        assert!(b.is_full(t1 + Duration::from_secs(2)));
    }
}
