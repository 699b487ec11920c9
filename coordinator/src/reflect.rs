//! The reflexive address responder: on its own UDP port, it answers each well-formed
//! [`Reflect::Request`] with a [`Reflect::Response`] naming the request's source address, sent
//! back to that address. Agents ask from their WireGuard socket, so the answer is the address a
//! NAT mapped that socket to: a candidate endpoint that peers then probe (`meshlink_proto::disco`).
//!
//! Pipeline:
//!
//! ```text
//! recv_from ─> Reflector::handle_input(now, source, bytes)
//!                not a request: ignored (counted)
//!                over the source's cap: refused (counted)
//!                else: the answer ─> send_to(source)
//! ```
//!
//! # Security
//!
//! The port is open to anyone and unauthenticated, like STUN: the answer is only a candidate,
//! and an agent uses a candidate only after a sealed probe through it succeeded. Sources can be
//! spoofed, so the responder must not become a flood reflector: answers are capped per source
//! ([`ANSWER_RATE`] per second, [`ANSWER_BURST`] at once; IPv6 sources by /64), in a table of at
//! most [`MAX_SOURCES`] that evicts the oldest, and an answer is no larger than a request plus
//! an address (no amplification worth the name). Nothing received is logged per datagram above
//! `debug`, and nothing in it can panic the task.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshlink_proto::disco::{Reflect, MAX_LEN};
use tokio::net::UdpSocket;
use tokio::sync::watch;

use crate::ratelimit::TokenBucket;

/// Answers per second one source may draw on average.
pub const ANSWER_RATE: u32 = 20;
/// Answers one source may draw at once.
pub const ANSWER_BURST: u32 = 40;
/// Sources tracked at once; beyond it the oldest is forgotten.
pub const MAX_SOURCES: usize = 4096;
/// How often sources whose bucket has refilled are forgotten (they lose nothing by it).
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// What the responder did, since start.
#[derive(Debug, Default)]
pub struct ReflectCounters {
    answered: AtomicU64,
    refused: AtomicU64,
    ignored: AtomicU64,
}

/// A copy of [`ReflectCounters`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReflectStats {
    /// Requests answered.
    pub answered: u64,
    /// Requests not answered: their source was over its cap.
    pub refused: u64,
    /// Datagrams that were not a well-formed request.
    pub ignored: u64,
}

impl ReflectCounters {
    /// The counters now.
    pub fn stats(&self) -> ReflectStats {
        ReflectStats {
            answered: self.answered.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            ignored: self.ignored.load(Ordering::Relaxed),
        }
    }
}

/// The responder's logic, given the time; no socket (see [`run`] for the loop around it).
#[derive(Debug)]
pub struct Reflector {
    counters: Arc<ReflectCounters>,
    sources: HashMap<IpAddr, TokenBucket>,
    /// The keys of `sources`, oldest first (may name sources already swept).
    order: VecDeque<IpAddr>,
    last_sweep: Instant,
}

impl Reflector {
    /// A responder that counts into `counters`.
    pub fn new(counters: Arc<ReflectCounters>, now: Instant) -> Self {
        Reflector {
            counters,
            sources: HashMap::new(),
            order: VecDeque::new(),
            last_sweep: now,
        }
    }

    /// One datagram from `source`: the answer to send back to `source`, or `None`.
    pub fn handle_input(
        &mut self,
        now: Instant,
        source: SocketAddr,
        datagram: &[u8],
    ) -> Option<Vec<u8>> {
        let Ok(Reflect::Request { tx }) = Reflect::decode(datagram) else {
            self.counters.ignored.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        if !self.allow(now, source_key(source.ip())) {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        self.counters.answered.fetch_add(1, Ordering::Relaxed);
        let observed = SocketAddr::new(source.ip().to_canonical(), source.port());
        Some(Reflect::Response { tx, observed }.encode())
    }

    /// Sources tracked now.
    pub fn sources(&self) -> usize {
        self.sources.len()
    }

    fn allow(&mut self, now: Instant, key: IpAddr) -> bool {
        if now.saturating_duration_since(self.last_sweep) >= SWEEP_INTERVAL {
            self.last_sweep = now;
            self.sources.retain(|_, bucket| !bucket.is_full(now));
            let sources = &self.sources;
            self.order.retain(|k| sources.contains_key(k));
        }
        if let Some(bucket) = self.sources.get_mut(&key) {
            return bucket.allow(now);
        }
        while self.sources.len() >= MAX_SOURCES {
            match self.order.pop_front() {
                Some(old) => {
                    self.sources.remove(&old);
                }
                None => break,
            }
        }
        let mut bucket = TokenBucket::new(ANSWER_RATE, ANSWER_BURST, now);
        let allowed = bucket.allow(now);
        self.sources.insert(key, bucket);
        self.order.push_back(key);
        allowed
    }
}

/// The key a source is capped under (its IPv4 address, or its IPv6 /64): the same as for the
/// caps before the hello (`meshlink_relay::admission`).
pub(crate) use meshlink_relay::admission::source_key;

/// Answers on `socket` until `shutdown` changes (or its sender is dropped).
pub async fn run(
    socket: UdpSocket,
    counters: Arc<ReflectCounters>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut reflector = Reflector::new(counters, Instant::now());
    // Longer than any request, so that a longer datagram is seen whole enough to be refused.
    let mut buf = [0u8; MAX_LEN + 64];
    loop {
        let (len, source) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    // Such as an ICMP error reported on the socket: nothing to do but go on,
                    // without spinning should it repeat.
                    tracing::debug!("reflect socket: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let Some(answer) = reflector.handle_input(Instant::now(), source, &buf[..len]) else {
            continue;
        };
        if let Err(e) = socket.try_send_to(&answer, source) {
            tracing::debug!(%source, "reflect answer not sent: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use meshlink_proto::disco::TX_LEN;

    use super::*;

    fn request(n: u8) -> Vec<u8> {
        Reflect::Request { tx: [n; TX_LEN] }.encode()
    }

    #[test]
    fn a_request_is_answered_with_its_source() {
        let counters = Arc::new(ReflectCounters::default());
        let now = Instant::now();
        let mut r = Reflector::new(counters.clone(), now);
        let from: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        let answer = r.handle_input(now, from, &request(3)).unwrap();
        assert_eq!(
            Reflect::decode(&answer),
            Ok(Reflect::Response {
                tx: [3; TX_LEN],
                observed: from
            })
        );
        // A v4-mapped source (a dual-stack socket) is answered as the IPv4 address it is.
        let mapped: SocketAddr = "[::ffff:198.51.100.8]:40001".parse().unwrap();
        let answer = r.handle_input(now, mapped, &request(4)).unwrap();
        assert!(matches!(
            Reflect::decode(&answer),
            Ok(Reflect::Response { observed, .. }) if observed == "198.51.100.8:40001".parse().unwrap()
        ));
        assert_eq!(
            counters.stats(),
            ReflectStats {
                answered: 2,
                ..ReflectStats::default()
            }
        );
    }

    #[test]
    fn anything_but_a_request_is_ignored() {
        let counters = Arc::new(ReflectCounters::default());
        let now = Instant::now();
        let mut r = Reflector::new(counters.clone(), now);
        let from: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        let response = Reflect::Response {
            tx: [1; TX_LEN],
            observed: from,
        }
        .encode();
        let mut long = request(1);
        long.push(0);
        for junk in [
            &[][..],
            b"hello",
            &[1, 0, 0, 0],
            &response,
            &long,
            &[0xff; 2000],
        ] {
            assert_eq!(r.handle_input(now, from, junk), None);
        }
        assert_eq!(counters.stats().ignored, 6);
        assert_eq!(r.sources(), 0, "garbage takes no room");
    }

    #[test]
    fn answers_are_capped_per_source_and_the_table_is_bounded() {
        let counters = Arc::new(ReflectCounters::default());
        let t0 = Instant::now();
        let mut r = Reflector::new(counters.clone(), t0);
        let victim: SocketAddr = "192.0.2.1:9".parse().unwrap();
        let answered = (0..1000)
            .filter(|i| {
                let from = SocketAddr::new(victim.ip(), 1000 + i);
                r.handle_input(t0, from, &request(0)).is_some()
            })
            .count();
        assert_eq!(
            answered, ANSWER_BURST as usize,
            "every port of one IP shares it"
        );
        let t1 = t0 + Duration::from_millis(500);
        let answered = (0..1000)
            .filter(|_| r.handle_input(t1, victim, &request(0)).is_some())
            .count();
        assert_eq!(answered, (ANSWER_RATE / 2) as usize);
        // IPv6 sources of one /64 share one cap.
        let answered = (0..1000u16)
            .filter(|i| {
                let ip: Ipv6Addr = format!("2001:db8:1:2::{i:x}").parse().unwrap();
                r.handle_input(t1, SocketAddr::new(ip.into(), 9), &request(0))
                    .is_some()
            })
            .count();
        assert_eq!(answered, ANSWER_BURST as usize);
        // A flood of distinct sources never holds more than MAX_SOURCES.
        for i in 0..(MAX_SOURCES as u32 * 3) {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
            r.handle_input(t1, SocketAddr::new(ip.into(), 9), &request(0));
        }
        assert_eq!(r.sources(), MAX_SOURCES);
        // Sources idle long enough to have refilled are forgotten at the next sweep.
        let later = t1 + Duration::from_secs(10);
        r.handle_input(later, victim, &request(0));
        assert_eq!(r.sources(), 1);
        assert!(r.order.len() == 1);
    }
}
