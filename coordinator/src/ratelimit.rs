//! A token bucket, given the time: the per-session cap on messages from an agent.

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

    /// Takes one token if there is one at `now`.
    pub fn allow(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
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
}
