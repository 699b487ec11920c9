//! Which standalone relay is home: the one this node sends its relayed datagrams through.
//!
//! A state machine given time: it takes the relays that are up with their round trips and
//! answers the home. A relay is a candidate once its session has been up for [`SETTLE`]: the
//! peers learn the relays at about the same time and need a moment to open their sessions
//! there too, and a datagram sent through a relay the peer is not on yet is lost (a lost
//! WireGuard handshake costs 5 s). The nearest (lowest round trip) becomes home; another takes over only
//! when it is clearly nearer ([`SWITCH_RATIO`]) and the home has been home for at least
//! [`MIN_HOME`], so the home does not flap between relays of about the same distance. A home
//! that goes down is replaced at once by the nearest of the others; with none up, there is no
//! home (the embedded relay of the coordinator carries relayed datagrams then).

use std::time::{Duration, Instant};

/// Another relay takes over only with a round trip below this share of the home's.
pub const SWITCH_RATIO: f64 = 0.7;
/// How long a relay stays home at least while it is up.
pub const MIN_HOME: Duration = Duration::from_secs(10);
/// How long a relay's session must have been up before it may become home.
pub const SETTLE: Duration = Duration::from_secs(3);

/// One relay as the choice sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate<'a> {
    /// Its name.
    pub name: &'a str,
    /// Its round trip, once measured.
    pub rtt: Option<Duration>,
    /// Since when its session has been up.
    pub since: Instant,
}

/// The home relay and since when.
#[derive(Debug, Default)]
pub struct HomeChoice {
    home: Option<(String, Instant)>,
}

impl HomeChoice {
    /// No home yet.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The home now.
    #[must_use]
    pub fn home(&self) -> Option<&str> {
        self.home.as_ref().map(|(n, _)| n.as_str())
    }

    /// Chooses among the relays `up` at `now`; returns whether the home changed.
    pub fn update(&mut self, up: &[Candidate<'_>], now: Instant) -> bool {
        // The home stays a candidate while up; others once settled.
        let up: Vec<&Candidate<'_>> = up
            .iter()
            .filter(|c| {
                self.home() == Some(c.name) || now.saturating_duration_since(c.since) >= SETTLE
            })
            .collect();
        // The nearest; those not measured yet count as far; ties by name (every node of a site
        // tends to pick the same one).
        let best = up.iter().min_by(|a, b| {
            let ra = a.rtt.unwrap_or(Duration::MAX);
            let rb = b.rtt.unwrap_or(Duration::MAX);
            ra.cmp(&rb).then_with(|| a.name.cmp(b.name))
        });
        let current = self
            .home
            .as_ref()
            .and_then(|(name, since)| up.iter().find(|c| c.name == name).map(|c| (*c, *since)));
        let next = match (current, best) {
            (_, None) => None,
            (None, Some(best)) => Some(best.name),
            (Some((home, since)), Some(best)) => {
                let settled = now.saturating_duration_since(since) >= MIN_HOME;
                let clearly = match (home.rtt, best.rtt) {
                    (Some(h), Some(b)) => b.as_secs_f64() < h.as_secs_f64() * SWITCH_RATIO,
                    (None, Some(_)) => true,
                    _ => false,
                };
                if best.name != home.name && settled && clearly {
                    Some(best.name)
                } else {
                    Some(home.name)
                }
            }
        };
        if next == self.home() {
            return false;
        }
        self.home = next.map(|n| (n.to_string(), now));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A relay up since long before any test's `t0`.
    fn c(name: &str, ms: u64) -> Candidate<'_> {
        Candidate {
            name,
            rtt: Some(Duration::from_millis(ms)),
            since: long_ago(),
        }
    }

    fn long_ago() -> Instant {
        Instant::now()
            .checked_sub(Duration::from_secs(3600))
            .unwrap_or_else(Instant::now)
    }

    #[test]
    fn a_relay_becomes_home_only_once_settled() {
        let t0 = Instant::now() + Duration::from_secs(7200);
        let mut h = HomeChoice::new();
        let fresh = Candidate {
            name: "eu",
            rtt: Some(Duration::from_millis(5)),
            since: t0,
        };
        assert!(!h.update(std::slice::from_ref(&fresh), t0 + SETTLE / 2));
        assert_eq!(h.home(), None, "the coordinator's relay carries meanwhile");
        assert!(h.update(std::slice::from_ref(&fresh), t0 + SETTLE));
        assert_eq!(h.home(), Some("eu"));
        // A home that dies is replaced at once by a settled relay, not by a fresh one.
        let mut h = HomeChoice::new();
        h.update(&[c("eu", 30)], t0);
        let new = Candidate {
            name: "ap",
            rtt: Some(Duration::from_millis(1)),
            since: t0 + Duration::from_secs(1),
        };
        assert!(h.update(&[new.clone(), c("us", 90)], t0 + Duration::from_secs(2)));
        assert_eq!(h.home(), Some("us"));
    }

    #[test]
    fn the_nearest_becomes_home_and_stays_until_clearly_beaten() {
        let t0 = Instant::now();
        let mut h = HomeChoice::new();
        assert!(!h.update(&[], t0));
        assert_eq!(h.home(), None);
        assert!(h.update(&[c("eu", 30), c("us", 90)], t0));
        assert_eq!(h.home(), Some("eu"));
        // Nearer, but not clearly (25 ms > 0.7 * 30 ms): stays.
        assert!(!h.update(&[c("eu", 30), c("us", 25)], t0 + MIN_HOME * 2));
        // Clearly nearer, but the home is new: stays for MIN_HOME.
        let mut h2 = HomeChoice::new();
        h2.update(&[c("eu", 30)], t0);
        assert!(!h2.update(&[c("eu", 30), c("us", 10)], t0 + MIN_HOME / 2));
        assert_eq!(h2.home(), Some("eu"));
        assert!(h2.update(&[c("eu", 30), c("us", 10)], t0 + MIN_HOME));
        assert_eq!(h2.home(), Some("us"));
    }

    #[test]
    fn a_home_that_goes_down_is_replaced_at_once() {
        let t0 = Instant::now();
        let mut h = HomeChoice::new();
        h.update(&[c("eu", 30), c("us", 90)], t0);
        // eu dies a second later: us at once, MIN_HOME or not.
        assert!(h.update(&[c("us", 90)], t0 + Duration::from_secs(1)));
        assert_eq!(h.home(), Some("us"));
        // eu comes back nearer: us has been home long enough and eu is clearly nearer.
        let back = t0 + Duration::from_secs(1) + MIN_HOME;
        assert!(h.update(&[c("eu", 30), c("us", 90)], back));
        assert_eq!(h.home(), Some("eu"));
        // All down: no home (the coordinator's embedded relay carries it).
        assert!(h.update(&[], back + Duration::from_secs(1)));
        assert_eq!(h.home(), None);
    }

    #[test]
    fn unmeasured_relays_count_as_far_and_ties_go_by_name() {
        let t0 = Instant::now();
        let mut h = HomeChoice::new();
        let unmeasured = Candidate {
            name: "a",
            rtt: None,
            since: long_ago(),
        };
        h.update(&[unmeasured.clone(), c("b", 200)], t0);
        assert_eq!(h.home(), Some("b"));
        let mut h = HomeChoice::new();
        h.update(&[c("z", 20), c("m", 20)], t0);
        assert_eq!(h.home(), Some("m"));
        // An unmeasured home gives way to a measured one once settled.
        let mut h = HomeChoice::new();
        h.update(std::slice::from_ref(&unmeasured), t0);
        assert_eq!(h.home(), Some("a"));
        assert!(h.update(&[unmeasured, c("b", 200)], t0 + MIN_HOME));
        assert_eq!(h.home(), Some("b"));
    }
}
