//! When an agent tries to reach the coordinator again, without a clock or a random number
//! generator of its own: the caller passes a uniformly random fraction in `[0, 1)` with each
//! decision (the agent draws it from the OS, a simulation from its seed).
//!
//! - After a session that worked ends, the next attempt follows a short random pause that
//!   spreads a whole fleet's reconnections out: as long as it takes the fleet to reconnect at
//!   [`RECONNECTS_PER_SECOND`] (the mesh's size is in every agent's map), at most
//!   `first_retry`: a few milliseconds in a small mesh, a second at 10,000 nodes. A holder of
//!   workload addresses comes back at once: its lease is running down.
//! - After a failed attempt, the pause doubles up to a cap, jittered between 50% and 150%.
//! - A holder's QUIC handshake gets little patience: a fresh attempt sends its first packet at
//!   once, where a late one waits for its retransmission timer.

use std::time::Duration;

/// The pace at which a fleet whose coordinator went away is spread over its reconnections.
pub const RECONNECTS_PER_SECOND: u32 = 10_000;

/// The timings of [`Reconnect`]; [`ReconnectPolicy::default`] is the agent's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// After a working session ends: a random pause below this.
    pub first_retry: Duration,
    /// The same, for a holder of workload addresses.
    pub holder_first_retry: Duration,
    /// The first pause after a failed attempt, doubled after each further one up to
    /// `max_backoff`.
    pub backoff: Duration,
    /// The longest pause between failed attempts.
    pub max_backoff: Duration,
    /// `backoff` for a holder.
    pub holder_backoff: Duration,
    /// `max_backoff` for a holder.
    pub holder_max_backoff: Duration,
    /// How long connecting and the first exchange may take.
    pub handshake: Duration,
    /// How long a holder's QUIC handshake may take before it starts over.
    pub holder_handshake: Duration,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy {
            first_retry: Duration::from_secs(1),
            holder_first_retry: Duration::from_millis(20),
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            holder_backoff: Duration::from_millis(100),
            holder_max_backoff: Duration::from_millis(250),
            handshake: Duration::from_secs(10),
            holder_handshake: Duration::from_secs(1),
        }
    }
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct Reconnect {
    policy: ReconnectPolicy,
    /// Failed attempts since the last session that worked.
    failures: u32,
    /// The next pause after a failure, before jitter.
    backoff: Duration,
}

impl Reconnect {
    /// No attempt made yet.
    pub fn new(policy: ReconnectPolicy) -> Self {
        Reconnect {
            policy,
            failures: 0,
            backoff: policy.backoff,
        }
    }

    /// How long the next attempt's handshake may take.
    pub fn patience(&self, holder: bool) -> Duration {
        if holder {
            self.policy.holder_handshake
        } else {
            self.policy.handshake
        }
    }

    /// Failed attempts since the last session that worked.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// A session opened: failures are forgotten.
    pub fn connected(&mut self) {
        self.failures = 0;
    }

    /// A session that worked ended: the pause before the next attempt, for a node of a mesh
    /// of `fleet` nodes. `fraction` is uniformly random in `[0, 1)`.
    pub fn after_session(&mut self, holder: bool, fleet: usize, fraction: f64) -> Duration {
        self.failures = 0;
        let spread = (Duration::from_secs(1) / RECONNECTS_PER_SECOND)
            .saturating_mul(u32::try_from(fleet).unwrap_or(u32::MAX));
        let (first, backoff) = if holder {
            (self.policy.holder_first_retry, self.policy.holder_backoff)
        } else {
            (self.policy.first_retry.min(spread), self.policy.backoff)
        };
        self.backoff = backoff;
        first.mul_f64(fraction.clamp(0.0, 1.0))
    }

    /// An attempt failed: the pause before the next one. `fraction` is uniformly random in
    /// `[0, 1)`.
    pub fn after_failure(&mut self, holder: bool, fraction: f64) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let (first, cap) = if holder {
            (self.policy.holder_backoff, self.policy.holder_max_backoff)
        } else {
            (self.policy.backoff, self.policy.max_backoff)
        };
        let base = self.backoff.clamp(first, cap);
        self.backoff = (base * 2).clamp(first, cap);
        // Between 50% and 150%, so that agents restarted together do not retry in step.
        base.mul_f64(0.5 + fraction.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_back_off_to_a_cap_and_a_session_resets_it() {
        let mut r = Reconnect::new(ReconnectPolicy::default());
        let mid = 0.5; // no jitter
        let pauses: Vec<u64> = (0..7)
            .map(|_| r.after_failure(false, mid).as_secs())
            .collect();
        assert_eq!(pauses, vec![1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(r.failures(), 7);
        // After a working session: a pause below a second, then the backoff starts over.
        let p = r.after_session(false, 1_000_000, 0.999);
        assert!(p < Duration::from_secs(1), "{p:?}");
        assert!(p > Duration::from_millis(990), "{p:?}");
        assert_eq!(r.failures(), 0);
        assert_eq!(r.after_failure(false, mid), Duration::from_secs(1));
    }

    #[test]
    fn holders_come_back_at_once_and_retry_quickly() {
        let mut r = Reconnect::new(ReconnectPolicy::default());
        assert!(r.after_session(true, 10_000, 0.999) < Duration::from_millis(20));
        let pauses: Vec<u128> = (0..4)
            .map(|_| r.after_failure(true, 0.5).as_millis())
            .collect();
        assert_eq!(pauses, vec![100, 200, 250, 250]);
        assert_eq!(r.patience(true), Duration::from_secs(1));
        assert_eq!(r.patience(false), Duration::from_secs(10));
        // A node that was a holder and no longer is backs off as any node.
        let p = r.after_failure(false, 0.5);
        assert_eq!(p, Duration::from_secs(1));
    }

    #[test]
    fn jitter_spans_half_to_one_and_a_half() {
        let mut lo = Reconnect::new(ReconnectPolicy::default());
        let mut hi = Reconnect::new(ReconnectPolicy::default());
        assert_eq!(lo.after_failure(false, 0.0), Duration::from_millis(500));
        assert_eq!(hi.after_failure(false, 1.0), Duration::from_millis(1500));
    }

    #[test]
    fn a_fleet_reconnects_spread_by_its_size() {
        let mut r = Reconnect::new(ReconnectPolicy::default());
        // Three nodes: within a millisecond; 1,000: within 100 ms; 10,000 and more: a second.
        assert!(r.after_session(false, 3, 0.999) < Duration::from_millis(1));
        let p = r.after_session(false, 1_000, 0.999);
        assert!(
            p < Duration::from_millis(100) && p > Duration::from_millis(99),
            "{p:?}"
        );
        let p = r.after_session(false, 50_000, 0.999);
        assert!(
            p < Duration::from_secs(1) && p > Duration::from_millis(990),
            "{p:?}"
        );
    }
}
