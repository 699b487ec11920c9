//! Caps on connections before and after their hello, over every transport: the coordinator's
//! agent sessions and the standalone relay's alike.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// The key a source is capped under: its IPv4 address, or the /64 of its IPv6 address (one
/// host commonly has a whole /64).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

/// The connections at once, over every transport: at most `max_connections`
/// (the coordinator's `Limits`; the relay's `Settings`), and of them, before their hello is accepted, at most `max_unauthenticated`,
/// and `max_unauthenticated_per_ip` from one source (an IPv4 address, or an IPv6 /64); after
/// it, at most [`Connections::with_max_sessions_per_source`] from one source (the standalone
/// relay's `max_sessions_per_ip`; the coordinator sets none). A connection holds a [`Slot`]
/// for as long as it lives, a [`BeforeHello`] until its hello is accepted, and then an
/// [`AfterHello`].
///
/// # Security
/// Without the caps before the hello, connections that never say one (each kept for
/// `hello_timeout`) could take every place, and no node could connect. With them, one source
/// holds at most its share; many sources together at most `max_unauthenticated`, leaving the
/// rest of `max_connections` to nodes that have said hello. QUIC sources are proved with a
/// Retry before they count (`server.rs`), so a spoofed address cannot spend another's share;
/// TCP's handshake proves them. The cap after the hello keeps one address (a host with many
/// tickets, or behind one NAT) from holding every place with valid sessions.
#[derive(Debug)]
pub struct Connections {
    open: Arc<AtomicUsize>,
    max: usize,
    unauthenticated: Arc<std::sync::Mutex<Unauthenticated>>,
    max_unauthenticated: usize,
    max_per_source: usize,
    authenticated: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
    max_authenticated_per_source: usize,
    refused: RefusalCounters,
}

/// Connections [`Connections::admit`] refused since start, by the cap that was reached. (A
/// hello refused by the cap after it, [`Refusal::TooManySessionsFromSource`], is the caller's
/// to count, with its other reasons for refusing a hello.)
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Refused {
    /// [`Refusal::Full`].
    pub full: u64,
    /// [`Refusal::TooManyUnauthenticated`].
    pub unauthenticated: u64,
    /// [`Refusal::TooManyFromSource`].
    pub from_source: u64,
}

/// The counts behind [`Refused`].
#[derive(Debug, Default)]
struct RefusalCounters {
    full: AtomicU64,
    unauthenticated: AtomicU64,
    from_source: AtomicU64,
}

/// The connections whose hello is not accepted yet, in all and by source.
#[derive(Debug, Default)]
struct Unauthenticated {
    all: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// One connection's place among the [`Connections`]; freed on drop.
#[derive(Debug)]
pub struct Slot(Arc<AtomicUsize>);

/// A connection's place among those before their hello (see [`Connections`]); freed on drop,
/// when the hello is accepted or the connection ends.
#[derive(Debug)]
pub struct BeforeHello {
    unauthenticated: Arc<std::sync::Mutex<Unauthenticated>>,
    source: IpAddr,
    authenticated: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
    max_authenticated_per_source: usize,
}

/// A connection's place among the sessions after their hello from its source; freed on drop.
#[derive(Debug)]
pub struct AfterHello {
    authenticated: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
    source: IpAddr,
}

/// A new connection's places among the [`Connections`].
#[derive(Debug)]
pub struct Admission {
    /// Among all connections, for as long as it lives.
    pub slot: Slot,
    /// Among those before their hello, until its hello is accepted.
    pub before_hello: BeforeHello,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// `max_connections` connections are open.
    #[error("at max_connections")]
    Full,
    /// `max_unauthenticated` connections have not said hello yet.
    #[error("at max_unauthenticated")]
    TooManyUnauthenticated,
    /// `max_unauthenticated_per_ip` connections from this source have not said hello yet.
    #[error("at max_unauthenticated_per_ip for this source")]
    TooManyFromSource,
    /// This source has as many sessions after their hello as it may have.
    #[error("too many sessions from this address (max_sessions_per_ip)")]
    TooManySessionsFromSource,
}

impl Connections {
    /// Room for `max` connections at once, of which `max_unauthenticated` before their hello,
    /// `max_per_source` of those from one source.
    pub fn new(max: usize, max_unauthenticated: usize, max_per_source: usize) -> Self {
        Connections {
            open: Arc::new(AtomicUsize::new(0)),
            max,
            unauthenticated: Arc::default(),
            max_unauthenticated,
            max_per_source,
            authenticated: Arc::default(),
            max_authenticated_per_source: usize::MAX,
            refused: RefusalCounters::default(),
        }
    }

    /// At most `max` sessions after their hello from one source ([`BeforeHello::accept`]).
    #[must_use]
    pub fn with_max_sessions_per_source(mut self, max: usize) -> Self {
        self.max_authenticated_per_source = max;
        self
    }

    /// A place for a new connection from `remote`, which has not said hello yet.
    ///
    /// # Errors
    /// [`Refusal`]: the cap that is reached (counted: [`Connections::refused`]).
    pub fn admit(&self, remote: IpAddr) -> Result<Admission, Refusal> {
        let admitted = self.try_admit(remote);
        if let Err(refusal) = &admitted {
            let r = &self.refused;
            let counter = match refusal {
                Refusal::Full => &r.full,
                Refusal::TooManyUnauthenticated => &r.unauthenticated,
                Refusal::TooManyFromSource => &r.from_source,
                // Not a cap of admission: BeforeHello::accept's.
                Refusal::TooManySessionsFromSource => return admitted,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        admitted
    }

    /// Connections refused by [`Connections::admit`] since start.
    pub fn refused(&self) -> Refused {
        let r = &self.refused;
        Refused {
            full: r.full.load(Ordering::Relaxed),
            unauthenticated: r.unauthenticated.load(Ordering::Relaxed),
            from_source: r.from_source.load(Ordering::Relaxed),
        }
    }

    fn try_admit(&self, remote: IpAddr) -> Result<Admission, Refusal> {
        let source = source_key(remote);
        let mut u = self
            .unauthenticated
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if u.all >= self.max_unauthenticated {
            return Err(Refusal::TooManyUnauthenticated);
        }
        if u.by_source.get(&source).copied().unwrap_or(0) >= self.max_per_source {
            return Err(Refusal::TooManyFromSource);
        }
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .map_err(|_| Refusal::Full)?;
        u.all += 1;
        *u.by_source.entry(source).or_default() += 1;
        Ok(Admission {
            slot: Slot(self.open.clone()),
            before_hello: BeforeHello {
                unauthenticated: self.unauthenticated.clone(),
                source,
                authenticated: self.authenticated.clone(),
                max_authenticated_per_source: self.max_authenticated_per_source,
            },
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Connections open now whose hello is not accepted yet.
    pub fn unauthenticated(&self) -> usize {
        self.unauthenticated
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .all
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl BeforeHello {
    /// The connection's hello was accepted: its place before the hello is freed, and it takes
    /// one among its source's sessions.
    ///
    /// # Errors
    /// [`Refusal::TooManySessionsFromSource`] (the place before the hello is freed all the
    /// same: the connection is to be closed).
    pub fn accept(self) -> Result<AfterHello, Refusal> {
        let mut by_source = self.authenticated.lock().unwrap_or_else(|p| p.into_inner());
        let n = by_source.entry(self.source).or_default();
        if *n >= self.max_authenticated_per_source {
            if *n == 0 {
                by_source.remove(&self.source);
            }
            return Err(Refusal::TooManySessionsFromSource);
        }
        *n += 1;
        Ok(AfterHello {
            authenticated: self.authenticated.clone(),
            source: self.source,
        })
    }
}

impl Drop for AfterHello {
    fn drop(&mut self) {
        let mut by_source = self.authenticated.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                by_source.remove(&self.source);
            }
        }
    }
}

impl Drop for BeforeHello {
    fn drop(&mut self) {
        let mut u = self
            .unauthenticated
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        u.all = u.all.saturating_sub(1);
        if let Some(n) = u.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                u.by_source.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_capped_across_transports() {
        let c = Connections::new(2, 2, 2);
        let ip: IpAddr = "198.18.0.1".parse().unwrap();
        let a = c.admit(ip).unwrap();
        let _b = c.admit(ip).unwrap();
        assert_eq!(c.admit(ip).unwrap_err(), Refusal::TooManyUnauthenticated);
        drop(a);
        assert_eq!(c.open(), 1);
        assert!(c.admit(ip).is_ok());
    }

    #[test]
    fn before_the_hello_one_source_holds_its_share_only() {
        let c = Connections::new(10, 4, 2);
        let one: IpAddr = "198.18.0.1".parse().unwrap();
        let other: IpAddr = "198.18.0.2".parse().unwrap();
        let Admission {
            slot: slot_a,
            before_hello: hello_a,
        } = c.admit(one).unwrap();
        let _b = c.admit(one).unwrap();
        assert_eq!(c.admit(one).unwrap_err(), Refusal::TooManyFromSource);
        let _c = c.admit(other).unwrap();
        let _d = c.admit(other).unwrap();
        assert_eq!(
            c.admit("198.18.0.3".parse().unwrap()).unwrap_err(),
            Refusal::TooManyUnauthenticated
        );
        // Each refusal is counted under its cap.
        assert_eq!(
            c.refused(),
            Refused {
                full: 0,
                unauthenticated: 1,
                from_source: 1
            }
        );
        // A hello accepted: the connection stays, its place before the hello is free.
        drop(hello_a);
        assert_eq!((c.open(), c.unauthenticated()), (4, 3));
        let _e = c.admit(one).unwrap();
        drop(slot_a);
        assert_eq!((c.open(), c.unauthenticated()), (4, 4));

        // IPv6 sources of one /64 are one source.
        let c = Connections::new(10, 10, 1);
        let _f = c.admit("2001:db8::1".parse().unwrap()).unwrap();
        assert_eq!(
            c.admit("2001:db8::ffff:2".parse().unwrap()).unwrap_err(),
            Refusal::TooManyFromSource
        );
        assert!(c.admit("2001:db8:0:1::1".parse().unwrap()).is_ok());

        // Authenticated connections count in max_connections only.
        let c = Connections::new(2, 2, 2);
        let first = c.admit(one).unwrap();
        let second = c.admit(one).unwrap();
        drop((first.before_hello, second.before_hello));
        assert_eq!(c.admit(other).unwrap_err(), Refusal::Full);
        assert_eq!(c.unauthenticated(), 0, "a refusal holds nothing");
        assert_eq!(
            c.refused(),
            Refused {
                full: 1,
                ..Refused::default()
            }
        );
    }

    /// After their hello, one source holds at most its sessions' share; a session that ends
    /// frees its place.
    #[test]
    fn after_the_hello_one_source_holds_its_share_only() {
        let c = Connections::new(10, 10, 10).with_max_sessions_per_source(2);
        let one: IpAddr = "198.18.0.1".parse().unwrap();
        let accept = |ip: IpAddr| c.admit(ip).unwrap().before_hello.accept();
        let a = accept(one).unwrap();
        let _b = accept(one).unwrap();
        assert_eq!(accept(one).unwrap_err(), Refusal::TooManySessionsFromSource);
        assert_eq!(
            c.refused(),
            Refused::default(),
            "a refused hello is its caller's to count"
        );
        assert_eq!(
            c.unauthenticated(),
            0,
            "a refused hello holds no place before it"
        );
        assert!(
            accept("198.18.0.2".parse().unwrap()).is_ok(),
            "others are not held back"
        );
        drop(a);
        assert!(accept(one).is_ok());
        // Without the cap (the coordinator), any number.
        let c = Connections::new(10, 10, 10);
        let all: Vec<_> = (0..5)
            .map(|_| c.admit(one).unwrap().before_hello.accept())
            .collect();
        assert!(all.iter().all(Result::is_ok));
    }
}
