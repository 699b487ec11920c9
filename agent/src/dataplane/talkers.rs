//! Which workload addresses held here a peer sent to lately: the holder reports these peers
//! to the coordinator (`ClientMessage::Talkers`), which passes them to the destination of the
//! next move, so that it brings sessions up with the peers that matter rather than with every
//! peer of the network.
//!
//! Kept per peer, under the peer's lock the inbound path holds anyway: a few slots, written at
//! most once a second per address, so a packet to a held workload address costs a comparison
//! or two.

use std::net::IpAddr;
use std::time::Duration;

/// Workload addresses one peer may be remembered for at once; the oldest gives way.
const SLOTS: usize = 4;
/// A slot's time is refreshed at most this often.
const REFRESH: Duration = Duration::from_secs(1);

/// The workload addresses a peer sent to, each with when it last did.
#[derive(Debug, Clone, Default)]
pub(crate) struct Talked {
    slots: [Option<(IpAddr, Duration)>; SLOTS],
}

impl Talked {
    /// The peer sent a packet to `address` at `now` (the device's clock).
    pub(crate) fn note(&mut self, address: IpAddr, now: Duration) {
        let mut oldest = 0;
        for (i, slot) in self.slots.iter_mut().enumerate() {
            match slot {
                Some((a, at)) if *a == address => {
                    if now.saturating_sub(*at) >= REFRESH {
                        *at = now;
                    }
                    return;
                }
                None => {
                    *slot = Some((address, now));
                    return;
                }
                Some(_) => oldest = i,
            }
        }
        // Full: the slot written longest ago gives way.
        let mut at_oldest = Duration::MAX;
        for (i, slot) in self.slots.iter().enumerate() {
            if let Some((_, at)) = slot {
                if *at < at_oldest {
                    at_oldest = *at;
                    oldest = i;
                }
            }
        }
        self.slots[oldest] = Some((address, now));
    }

    /// How long ago the peer last sent to `address`, if it is remembered.
    pub(crate) fn since(&self, address: IpAddr, now: Duration) -> Option<Duration> {
        self.slots
            .iter()
            .flatten()
            .find(|(a, _)| *a == address)
            .map(|(_, at)| now.saturating_sub(*at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([100, 64, 50, last])
    }

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn remembers_the_latest_time_per_address() {
        let mut t = Talked::default();
        assert_eq!(t.since(ip(1), s(5)), None);
        t.note(ip(1), s(1));
        t.note(ip(1), s(1) + Duration::from_millis(300));
        assert_eq!(
            t.since(ip(1), s(5)),
            Some(s(4)),
            "refreshed at most once a second"
        );
        t.note(ip(1), s(3));
        assert_eq!(t.since(ip(1), s(5)), Some(s(2)));
    }

    #[test]
    fn the_oldest_address_gives_way() {
        let mut t = Talked::default();
        for (i, at) in [(1, 10), (2, 4), (3, 12), (4, 11)] {
            t.note(ip(i), s(at));
        }
        t.note(ip(5), s(13));
        assert_eq!(t.since(ip(2), s(13)), None, "written longest ago");
        for i in [1, 3, 4, 5] {
            assert!(t.since(ip(i), s(13)).is_some(), "{i}");
        }
    }
}
