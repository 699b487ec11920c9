//! The connection table: which flows are open through this node, so that the firewall
//! (`super::firewall`) decides once per flow, not once per packet, lets the replies of a flow
//! through, and recognises the ICMP errors a flow draws.
//!
//! Pure and bounded: the table is given the time (`now`, from any fixed instant; it never reads
//! a clock) and allocates all its memory when it is made. After that, no packet allocates and
//! memory never grows: a flow that finds no room takes the place of an expired flow, or else of
//! the flow idle the longest among those it could go to.
//!
//! Layout: the table is split into shards, each behind its own mutex (the receive and send
//! loops run on different cores and lock one shard per packet). A shard is an array of buckets
//! of [`WAYS`] entries. A flow may live in either of two buckets of its shard, chosen by a keyed
//! hash of its key; a new flow takes the emptier one, and when both are full an entry of one of
//! them moves to its other bucket if that has room (one step of cuckoo hashing). With 8 ways
//! this fills the table to its capacity before flows start evicting each other (simulated: no
//! eviction up to 90 % of capacity, about 1 % of insertions evict at 100 %). "Oldest" is thus the
//! oldest among the 16 entries a new flow could take, not in the whole table: an exact order
//! over every entry would cost a list through all of them and a lock shared by both loops.
//!
//! Keys are normalised, so both directions of a flow find the same entry: the protocol, the
//! address family, and the two ends (address, port) in a fixed order. ICMP echo flows use the
//! echo identifier as both ports. An entry remembers which end opened the flow.
//!
//! Timeouts (idle time before a flow is forgotten; every packet of the flow restarts it):
//!
//! | flow | timeout |
//! |---|---|
//! | TCP, seen one way only (opening) | 30 s ([`TCP_OPENING`]) |
//! | TCP, answered (established) | 2 h 4 min ([`TCP_ESTABLISHED`], RFC 5382 REQ-5: longer than TCP's 2 h keepalive) |
//! | TCP after a FIN or RST (closing) | 30 s ([`TCP_CLOSING`]) |
//! | UDP and other protocols, seen one way only | 60 s ([`UDP_ONE_WAY`]) |
//! | UDP and other protocols, answered | 180 s ([`UDP_ANSWERED`]) |
//! | ICMP echo | 30 s ([`ICMP`]) |
//!
//! Policy generations: every entry carries the generation of the policy that last let it
//! through. When the firewall's policy changes, entries are checked again lazily, at their
//! next packet (see [`Conntrack::track`]): a flow the new policy denies is marked *cut* and
//! stays so (its packets are dropped, and packets this node still sends on it do not revive
//! it) until it times out or a later policy allows it again.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// Entries per bucket.
pub const WAYS: usize = 8;
/// The default capacity, in flows.
pub const DEFAULT_CAPACITY: usize = 131_072;
/// Most shards a table is split into.
const SHARDS: usize = 16;

/// Idle timeout of a TCP flow seen in one direction only.
pub const TCP_OPENING: Duration = Duration::from_secs(30);
/// Idle timeout of an answered TCP flow.
pub const TCP_ESTABLISHED: Duration = Duration::from_secs(7440);
/// Idle timeout of a TCP flow after a FIN or a RST.
pub const TCP_CLOSING: Duration = Duration::from_secs(30);
/// Idle timeout of a UDP (or other) flow seen in one direction only.
pub const UDP_ONE_WAY: Duration = Duration::from_secs(60);
/// Idle timeout of an answered UDP (or other) flow.
pub const UDP_ANSWERED: Duration = Duration::from_secs(180);
/// Idle timeout of an ICMP echo flow.
pub const ICMP: Duration = Duration::from_secs(30);

/// IANA protocol numbers.
mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
}

/// TCP flags.
const FIN: u8 = 0x01;
pub(super) const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

/// The five-tuple of one packet, as sent (not normalised). Addresses of IPv4 packets are
/// kept as IPv4-mapped IPv6 addresses; `v6` says which family the packet was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuple {
    /// IANA protocol number.
    pub proto: u8,
    /// Whether the packet is IPv6.
    pub v6: bool,
    /// Source address.
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// Source port (TCP, UDP), echo identifier (ICMP echo), else 0.
    pub sport: u16,
    /// Destination port (TCP, UDP), echo identifier (ICMP echo), else 0.
    pub dport: u16,
}

impl Tuple {
    /// The source address.
    pub fn src_ip(&self) -> IpAddr {
        to_ip(self.v6, &self.src)
    }

    /// The destination address.
    pub fn dst_ip(&self) -> IpAddr {
        to_ip(self.v6, &self.dst)
    }

    /// The destination port a policy judges a flow of this tuple by: the TCP or UDP port, 0
    /// for every other protocol (an ICMP echo's identifier is no port).
    pub fn policy_port(&self) -> u16 {
        match self.proto {
            proto::TCP | proto::UDP => self.dport,
            _ => 0,
        }
    }

    /// The tuple of the other direction.
    pub fn reversed(&self) -> Tuple {
        Tuple {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            ..*self
        }
    }
}

fn to_ip(v6: bool, a: &[u8; 16]) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(*a))
    } else {
        IpAddr::V4(Ipv4Addr::new(a[12], a[13], a[14], a[15]))
    }
}

fn mapped(b: &[u8]) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[10] = 0xff;
    a[11] = 0xff;
    a[12..16].copy_from_slice(&b[..4]);
    a
}

/// What kind of packet of its flow a [`Packet`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A TCP segment with these flags.
    Tcp(u8),
    /// A UDP datagram, or a packet of a protocol without ports.
    Datagram,
    /// An ICMP or ICMPv6 echo request.
    EchoRequest,
    /// An ICMP or ICMPv6 echo reply.
    EchoReply,
    /// An ICMP or ICMPv6 error (unreachable, packet too big, time exceeded, parameter
    /// problem) quoting a packet of this tuple, as its sender (the error's receiver) sent it.
    IcmpError(Tuple),
    /// Another ICMP message, or an ICMP error whose quote cannot be read.
    IcmpOther,
    /// A fragment after the first: no transport header, so no ports.
    Fragment,
}

/// A packet, parsed as far as the connection table and the policy need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    /// Its five-tuple.
    pub tuple: Tuple,
    /// What it is within its flow.
    pub kind: Kind,
}

impl Packet {
    /// Parses an IP packet's headers. `None`: not an IP packet, or its transport header is cut
    /// short (too short to carry the ports or the ICMP header).
    pub fn parse(packet: &[u8]) -> Option<Packet> {
        let (ip, quote) = parse_ip(packet)?;
        let Ip {
            proto,
            v6,
            src,
            dst,
            first_fragment,
            payload,
        } = ip;
        let mut tuple = Tuple {
            proto,
            v6,
            src,
            dst,
            sport: 0,
            dport: 0,
        };
        if !first_fragment {
            return Some(Packet {
                tuple,
                kind: Kind::Fragment,
            });
        }
        let t = &packet[payload..];
        let kind = match proto {
            proto::TCP => {
                if t.len() < 14 {
                    return None;
                }
                tuple.sport = u16::from_be_bytes([t[0], t[1]]);
                tuple.dport = u16::from_be_bytes([t[2], t[3]]);
                Kind::Tcp(t[13])
            }
            proto::UDP => {
                if t.len() < 4 {
                    return None;
                }
                tuple.sport = u16::from_be_bytes([t[0], t[1]]);
                tuple.dport = u16::from_be_bytes([t[2], t[3]]);
                Kind::Datagram
            }
            proto::ICMP | proto::ICMPV6 => {
                if t.len() < 8 || (proto == proto::ICMPV6) != v6 {
                    return None;
                }
                let (req, rep, err) = if v6 {
                    (128, 129, matches!(t[0], 1..=4))
                } else {
                    (8, 0, matches!(t[0], 3 | 11 | 12))
                };
                let id = u16::from_be_bytes([t[4], t[5]]);
                match t[0] {
                    x if x == req => {
                        tuple.sport = id;
                        tuple.dport = id;
                        Kind::EchoRequest
                    }
                    x if x == rep => {
                        tuple.sport = id;
                        tuple.dport = id;
                        Kind::EchoReply
                    }
                    _ if err && quote => match quoted(&t[8..], v6) {
                        Some(q) => Kind::IcmpError(q),
                        None => Kind::IcmpOther,
                    },
                    _ => Kind::IcmpOther,
                }
            }
            _ => Kind::Datagram,
        };
        Some(Packet { tuple, kind })
    }

    /// The destination port the policy judges a new flow by ([`Tuple::policy_port`]; a
    /// later fragment has none).
    pub fn policy_port(&self) -> u16 {
        self.tuple.policy_port()
    }
}

/// The IP layer of a packet.
struct Ip {
    proto: u8,
    v6: bool,
    src: [u8; 16],
    dst: [u8; 16],
    /// False for a fragment after the first.
    first_fragment: bool,
    /// Where the transport header starts.
    payload: usize,
}

/// Parses the IP header (and IPv6 extension headers). The flag says whether the packet may
/// carry a quote (it is not itself a fragment).
fn parse_ip(p: &[u8]) -> Option<(Ip, bool)> {
    match p.first()? >> 4 {
        4 => {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            if ihl < 20 || p.len() < ihl {
                return None;
            }
            let frag = u16::from_be_bytes([p[6], p[7]]);
            let offset = frag & 0x1fff;
            let more = frag & 0x2000 != 0;
            Some((
                Ip {
                    proto: p[9],
                    v6: false,
                    src: mapped(&p[12..16]),
                    dst: mapped(&p[16..20]),
                    first_fragment: offset == 0,
                    payload: ihl,
                },
                offset == 0 && !more,
            ))
        }
        6 => {
            if p.len() < 40 {
                return None;
            }
            let src: [u8; 16] = p[8..24].try_into().ok()?;
            let dst: [u8; 16] = p[24..40].try_into().ok()?;
            let mut next = p[6];
            let mut at = 40;
            let mut first_fragment = true;
            let mut whole = true;
            // Extension headers before the transport header; a bounded walk.
            for _ in 0..8 {
                match next {
                    0 | 43 | 60 => {
                        let h = p.get(at..at + 2)?;
                        next = h[0];
                        at += (usize::from(h[1]) + 1) * 8;
                    }
                    44 => {
                        let h = p.get(at..at + 8)?;
                        next = h[0];
                        let frag = u16::from_be_bytes([h[2], h[3]]);
                        first_fragment = frag >> 3 == 0;
                        whole = false;
                        at += 8;
                    }
                    _ => break,
                }
            }
            if matches!(next, 0 | 43 | 60 | 44) || at > p.len() {
                return None;
            }
            Some((
                Ip {
                    proto: next,
                    v6: true,
                    src,
                    dst,
                    first_fragment,
                    payload: at,
                },
                whole,
            ))
        }
        _ => None,
    }
}

/// The tuple of the packet an ICMP error quotes (its IP header and at least the first 8 bytes
/// after it), as that packet's sender sent it.
fn quoted(q: &[u8], v6: bool) -> Option<Tuple> {
    let (ip, _) = parse_ip(q)?;
    if ip.v6 != v6 || !ip.first_fragment {
        return None;
    }
    let t = q.get(ip.payload..ip.payload + 8)?;
    let (sport, dport) = match ip.proto {
        proto::TCP | proto::UDP => (
            u16::from_be_bytes([t[0], t[1]]),
            u16::from_be_bytes([t[2], t[3]]),
        ),
        proto::ICMP | proto::ICMPV6 => {
            let req = if v6 { 128 } else { 8 };
            if t[0] != req {
                return None;
            }
            let id = u16::from_be_bytes([t[4], t[5]]);
            (id, id)
        }
        _ => (0, 0),
    };
    Some(Tuple {
        proto: ip.proto,
        v6,
        src: ip.src,
        dst: ip.dst,
        sport,
        dport,
    })
}

/// A flow's key, the same for both directions: the lower end (address, port) first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Key {
    a: [u8; 16],
    b: [u8; 16],
    a_port: u16,
    b_port: u16,
    proto: u8,
    v6: bool,
}

impl Key {
    /// The key of `t`'s flow, and whether `t` goes from end `a` to end `b`.
    #[inline]
    fn of(t: &Tuple) -> (Key, bool) {
        let forward = (t.src, t.sport) <= (t.dst, t.dport);
        let (a, a_port, b, b_port) = if forward {
            (t.src, t.sport, t.dst, t.dport)
        } else {
            (t.dst, t.dport, t.src, t.sport)
        };
        (
            Key {
                a,
                b,
                a_port,
                b_port,
                proto: t.proto,
                v6: t.v6,
            },
            forward,
        )
    }
}

/// Where a flow is in its life; what its idle timeout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
enum State {
    /// A free slot.
    #[default]
    Free,
    TcpOpening,
    TcpEstablished,
    TcpClosing,
    OneWay,
    Answered,
    Echo,
}

impl State {
    fn timeout(self) -> u32 {
        let d = match self {
            State::Free => Duration::ZERO,
            State::TcpOpening => TCP_OPENING,
            State::TcpEstablished => TCP_ESTABLISHED,
            State::TcpClosing => TCP_CLOSING,
            State::OneWay => UDP_ONE_WAY,
            State::Answered => UDP_ANSWERED,
            State::Echo => ICMP,
        };
        d.as_secs() as u32
    }

    /// The state of a new flow whose first packet is `kind`.
    fn first(kind: Kind) -> State {
        match kind {
            Kind::Tcp(f) if f & (FIN | RST) != 0 => State::TcpClosing,
            Kind::Tcp(_) => State::TcpOpening,
            Kind::EchoRequest | Kind::EchoReply => State::Echo,
            _ => State::OneWay,
        }
    }

    /// The state after a packet `kind` from the flow's opener (`from_opener`) or its peer.
    fn next(self, kind: Kind, from_opener: bool) -> State {
        match (self, kind) {
            (_, Kind::Tcp(f)) if f & (FIN | RST) != 0 => State::TcpClosing,
            // The port pair is used again after a close.
            (State::TcpClosing, Kind::Tcp(f)) if f & (SYN | ACK) == SYN && from_opener => {
                State::TcpOpening
            }
            (State::TcpOpening, Kind::Tcp(_)) if !from_opener => State::TcpEstablished,
            (State::OneWay, _) if !from_opener => State::Answered,
            (s, _) => s,
        }
    }
}

/// The entry's flag: end `a` of the key opened the flow.
const OPENED_BY_A: u8 = 1;
/// The entry's flag: a policy change cut the flow.
const CUT: u8 = 2;

/// One slot of the table.
#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    key: Key,
    state: State,
    flags: u8,
    /// When the flow was last seen, in seconds of the table's clock.
    last_seen: u32,
    /// The policy generation that last let the flow through.
    generation: u32,
}

impl Entry {
    #[inline]
    fn live(&self, now: u32) -> bool {
        self.state != State::Free && now.saturating_sub(self.last_seen) <= self.state.timeout()
    }
}

type Bucket = [Entry; WAYS];

struct Shard {
    buckets: Box<[Bucket]>,
    /// Occupied slots (live or expired but not yet reclaimed).
    len: usize,
}

/// How a flow looks to a policy that checks it again: as it was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    /// The flow's first packet's tuple (source: the end that opened it).
    pub tuple: Tuple,
    /// Whether the packet at hand was sent by the end that opened the flow.
    pub by_sender: bool,
}

/// What the table says of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Track {
    /// The packet belongs to a tracked flow that the policy lets through.
    Pass,
    /// The packet belongs to a flow a policy change cut.
    Cut,
    /// The packet belongs to no tracked flow (or is one the flow does not explain: an echo
    /// request against the flow's direction).
    Miss,
}

/// The table's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConntrackStats {
    /// Flows held (an expired flow counts until its slot is reclaimed; the sweep run by
    /// [`Conntrack::expire`] reclaims every slot within a few seconds).
    pub flows: u64,
    /// The most flows the table holds.
    pub capacity: u64,
    /// Live flows pushed out to make room for new ones.
    pub evicted: u64,
    /// Flows forgotten after their idle timeout.
    pub expired: u64,
}

/// The connection table. See the module documentation.
pub struct Conntrack {
    shards: Box<[Mutex<Shard>]>,
    buckets_per_shard: usize,
    seed: u64,
    evicted: AtomicU64,
    expired: AtomicU64,
    /// The next bucket [`Conntrack::expire`] sweeps.
    sweep: AtomicUsize,
}

/// Folds a 128-bit product: the core of the keyed hash.
#[inline]
fn fold(a: u64, b: u64) -> u64 {
    let m = u128::from(a) * u128::from(b);
    (m as u64) ^ ((m >> 64) as u64)
}

const K0: u64 = 0x243f_6a88_85a3_08d3;
const K1: u64 = 0x1319_8a2e_0370_7344;
const K2: u64 = 0xa409_3822_299f_31d0;

/// A value in `0..n` from 32 bits of hash (Lemire's reduction, no division).
#[inline]
fn reduce(h: u32, n: usize) -> usize {
    ((u64::from(h) * n as u64) >> 32) as usize
}

/// Seconds of the table's clock.
#[inline]
fn secs(now: Duration) -> u32 {
    u32::try_from(now.as_secs()).unwrap_or(u32::MAX)
}

impl Conntrack {
    /// A table for at least `capacity` flows (rounded up to whole buckets in every shard),
    /// all its memory allocated now. `seed` keys the hash, so that nobody can aim flows at one
    /// bucket: pass something random.
    pub fn new(capacity: usize, seed: u64) -> Conntrack {
        let buckets = capacity.max(1).div_ceil(WAYS);
        let shards = if buckets >= 4 * SHARDS { SHARDS } else { 1 };
        let per_shard = buckets.div_ceil(shards);
        let shards = (0..shards)
            .map(|_| {
                Mutex::new(Shard {
                    buckets: vec![[Entry::default(); WAYS]; per_shard].into_boxed_slice(),
                    len: 0,
                })
            })
            .collect();
        Conntrack {
            shards,
            buckets_per_shard: per_shard,
            seed: seed | 1,
            evicted: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            sweep: AtomicUsize::new(0),
        }
    }

    /// The most flows the table holds.
    pub fn capacity(&self) -> usize {
        self.shards.len() * self.buckets_per_shard * WAYS
    }

    /// Bytes of one slot (the table's memory is `capacity` times this, plus a few hundred
    /// bytes).
    pub const fn entry_bytes() -> usize {
        std::mem::size_of::<Entry>()
    }

    #[inline]
    fn hash(&self, k: &Key) -> u64 {
        let w = |b: &[u8; 16], i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        let tail = u64::from(k.a_port)
            | u64::from(k.b_port) << 16
            | u64::from(k.proto) << 32
            | u64::from(k.v6) << 40;
        let mut h = fold(self.seed ^ w(&k.a, 0), K0);
        h = fold(h ^ w(&k.a, 8), K1);
        h = fold(h ^ w(&k.b, 0), K0);
        h = fold(h ^ w(&k.b, 8), K1);
        fold(h ^ tail, K2)
    }

    /// The shard of a key's hash and its two buckets there.
    #[inline]
    fn place(&self, h: u64) -> (usize, usize, usize) {
        let shard = reduce((h >> 32) as u32, self.shards.len());
        let h2 = fold(h ^ K2, K0);
        (
            shard,
            reduce(h as u32, self.buckets_per_shard),
            reduce(h2 as u32, self.buckets_per_shard),
        )
    }

    fn lock(&self, shard: usize) -> MutexGuard<'_, Shard> {
        // A panic under this lock is a bug, but the table must stay usable.
        self.shards[shard].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Finds `key` in buckets `b1`, `b2` of `s`.
    #[inline]
    fn find(s: &Shard, key: &Key, b1: usize, b2: usize) -> Option<(usize, usize)> {
        for b in [b1, b2] {
            if let Some(i) = s.buckets[b]
                .iter()
                .position(|e| e.state != State::Free && e.key == *key)
            {
                return Some((b, i));
            }
        }
        None
    }

    /// The flow of `p`, updated by it: its state follows the packet and its idle time starts
    /// again. An entry last let through by another policy generation than `generation` is
    /// checked again with `recheck` (given the flow as it was opened): allowed, it is stamped
    /// with `generation`; denied, it is cut. A cut flow stays cut, whoever sends on it, until
    /// a later generation allows it again.
    pub fn track(
        &self,
        p: &Packet,
        now: Duration,
        generation: u32,
        recheck: impl FnOnce(&Opened) -> bool,
    ) -> Track {
        let now = secs(now);
        let (key, forward) = Key::of(&p.tuple);
        let (shard, b1, b2) = self.place(self.hash(&key));
        let mut s = self.lock(shard);
        let Some((b, i)) = Self::find(&s, &key, b1, b2) else {
            return Track::Miss;
        };
        let e = &mut s.buckets[b][i];
        if !e.live(now) {
            *e = Entry::default();
            s.len -= 1;
            self.expired.fetch_add(1, Ordering::Relaxed);
            return Track::Miss;
        }
        let from_opener = forward == (e.flags & OPENED_BY_A != 0);
        // An echo request against the flow's direction is a flow of its own; so is an
        // echo reply in its direction.
        match p.kind {
            Kind::EchoRequest if !from_opener => return Track::Miss,
            Kind::EchoReply if from_opener => return Track::Miss,
            _ => {}
        }
        if e.generation != generation {
            let opened = if from_opener {
                p.tuple
            } else {
                p.tuple.reversed()
            };
            let allowed = recheck(&Opened {
                tuple: opened,
                by_sender: from_opener,
            });
            if allowed {
                e.flags &= !CUT;
            } else {
                e.flags |= CUT;
            }
            e.generation = generation;
        }
        e.state = e.state.next(p.kind, from_opener);
        e.last_seen = now;
        if e.flags & CUT != 0 {
            Track::Cut
        } else {
            Track::Pass
        }
    }

    /// Whether the flow that `quoted` (the tuple an ICMP error quotes) belongs to is tracked
    /// and not cut. Checks a stale entry again as [`Conntrack::track`] does; does not count as
    /// activity of the flow.
    pub fn related(
        &self,
        quoted: &Tuple,
        now: Duration,
        generation: u32,
        recheck: impl FnOnce(&Opened) -> bool,
    ) -> bool {
        let now = secs(now);
        let (key, forward) = Key::of(quoted);
        let (shard, b1, b2) = self.place(self.hash(&key));
        let mut s = self.lock(shard);
        let Some((b, i)) = Self::find(&s, &key, b1, b2) else {
            return false;
        };
        let e = &mut s.buckets[b][i];
        if !e.live(now) {
            return false;
        }
        if e.generation != generation {
            let from_opener = forward == (e.flags & OPENED_BY_A != 0);
            let opened = if from_opener {
                *quoted
            } else {
                quoted.reversed()
            };
            if recheck(&Opened {
                tuple: opened,
                by_sender: from_opener,
            }) {
                e.flags &= !CUT;
            } else {
                e.flags |= CUT;
            }
            e.generation = generation;
        }
        e.flags & CUT == 0
    }

    /// Records the flow `p` opens (its source is the end that opens it), stamped with
    /// `generation`. A flow already there is updated as by [`Conntrack::track`] and keeps its
    /// opener. When its two buckets are full, the new flow takes the place of an expired
    /// flow, or moves one to its other bucket, or else evicts the flow idle the longest.
    pub fn insert(&self, p: &Packet, now: Duration, generation: u32) {
        let now = secs(now);
        let (key, forward) = Key::of(&p.tuple);
        let (shard, b1, b2) = self.place(self.hash(&key));
        let mut s = self.lock(shard);
        let entry = Entry {
            key,
            state: State::first(p.kind),
            flags: if forward { OPENED_BY_A } else { 0 },
            last_seen: now,
            generation,
        };
        if let Some((b, i)) = Self::find(&s, &key, b1, b2) {
            let e = &mut s.buckets[b][i];
            if e.live(now) {
                let from_opener = forward == (e.flags & OPENED_BY_A != 0);
                e.state = e.state.next(p.kind, from_opener);
                e.last_seen = now;
            } else {
                self.expired.fetch_add(1, Ordering::Relaxed);
                *e = entry;
            }
            return;
        }
        let free = |s: &Shard, b: usize| s.buckets[b].iter().position(|e| e.state == State::Free);
        let count = |s: &Shard, b: usize| {
            s.buckets[b]
                .iter()
                .filter(|e| e.state != State::Free)
                .count()
        };
        // The emptier bucket, if it has a free slot.
        let (first, second) = if count(&s, b1) <= count(&s, b2) {
            (b1, b2)
        } else {
            (b2, b1)
        };
        if let Some(i) = free(&s, first) {
            s.buckets[first][i] = entry;
            s.len += 1;
            return;
        }
        // An expired flow of either bucket.
        for b in [first, second] {
            if let Some(i) = s.buckets[b].iter().position(|e| !e.live(now)) {
                s.buckets[b][i] = entry;
                self.expired.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        // Move one flow of either bucket to its other bucket.
        for b in [first, second] {
            for i in 0..WAYS {
                let moving = s.buckets[b][i];
                let (_, c1, c2) = self.place(self.hash(&moving.key));
                let other = if c1 == b { c2 } else { c1 };
                if other == b {
                    continue;
                }
                if let Some(j) = free(&s, other) {
                    s.buckets[other][j] = moving;
                    s.buckets[b][i] = entry;
                    s.len += 1;
                    return;
                }
            }
        }
        // The flow idle the longest.
        let (b, i) = [first, second]
            .into_iter()
            .flat_map(|b| (0..WAYS).map(move |i| (b, i)))
            .min_by_key(|&(b, i)| s.buckets[b][i].last_seen)
            .unwrap_or((first, 0));
        s.buckets[b][i] = entry;
        self.evicted.fetch_add(1, Ordering::Relaxed);
    }

    /// Reclaims the slots of expired flows in the next `buckets` buckets (in turn, over the
    /// whole table). Call from a timer, so that `flows` counts live flows.
    pub fn expire(&self, now: Duration, buckets: usize) {
        let now = secs(now);
        let total = self.shards.len() * self.buckets_per_shard;
        let start = self.sweep.fetch_add(buckets, Ordering::Relaxed) % total;
        let mut reclaimed = 0;
        let mut at = start;
        let mut left = buckets.min(total);
        while left > 0 {
            let shard = at / self.buckets_per_shard;
            let mut guard = self.lock(shard);
            let Shard {
                buckets: slots,
                len,
            } = &mut *guard;
            let end = ((shard + 1) * self.buckets_per_shard).min(at + left);
            for b in at..end {
                for e in slots[b - shard * self.buckets_per_shard].iter_mut() {
                    if e.state != State::Free && !e.live(now) {
                        *e = Entry::default();
                        *len -= 1;
                        reclaimed += 1;
                    }
                }
            }
            drop(guard);
            left -= end - at;
            at = end % total;
        }
        self.expired.fetch_add(reclaimed, Ordering::Relaxed);
    }

    /// Forgets every flow.
    pub fn clear(&self) {
        for shard in 0..self.shards.len() {
            let mut s = self.lock(shard);
            s.buckets.fill([Entry::default(); WAYS]);
            s.len = 0;
        }
    }

    /// The table's counters.
    pub fn stats(&self) -> ConntrackStats {
        let flows = (0..self.shards.len())
            .map(|i| self.lock(i).len as u64)
            .sum();
        ConntrackStats {
            flows,
            capacity: self.capacity() as u64,
            evicted: self.evicted.load(Ordering::Relaxed),
            expired: self.expired.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    /// An IPv4 packet of `proto` with a transport header of `t`.
    fn v4(proto: u8, src: [u8; 4], dst: [u8; 4], t: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&((20 + t.len()) as u16).to_be_bytes());
        p[9] = proto;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p.extend_from_slice(t);
        p
    }

    fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> Packet {
        let mut t = [0u8; 20];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[12] = 0x50;
        t[13] = flags;
        Packet::parse(&v4(proto::TCP, src, dst, &t)).unwrap()
    }

    fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Packet {
        let mut t = [0u8; 8];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        Packet::parse(&v4(proto::UDP, src, dst, &t)).unwrap()
    }

    fn echo(src: [u8; 4], dst: [u8; 4], ty: u8, id: u16) -> Vec<u8> {
        let mut t = [0u8; 8];
        t[0] = ty;
        t[4..6].copy_from_slice(&id.to_be_bytes());
        v4(proto::ICMP, src, dst, &t)
    }

    const A: [u8; 4] = [100, 64, 0, 1];
    const B: [u8; 4] = [100, 64, 0, 2];

    fn pass(_: &Opened) -> bool {
        true
    }

    #[test]
    fn both_directions_find_the_flow_and_ports_matter() {
        let ct = Conntrack::new(1024, 7);
        let syn = tcp(A, 40000, B, 22, SYN);
        assert_eq!(ct.track(&syn, S(0), 1, pass), Track::Miss);
        ct.insert(&syn, S(0), 1);
        let synack = tcp(B, 22, A, 40000, SYN | ACK);
        assert_eq!(ct.track(&synack, S(1), 1, pass), Track::Pass);
        assert_eq!(
            ct.track(&tcp(B, 22, A, 40001, ACK), S(1), 1, pass),
            Track::Miss
        );
        assert_eq!(
            ct.track(&udp(B, 22, A, 40000), S(1), 1, pass),
            Track::Miss,
            "another protocol"
        );
        assert_eq!(ct.stats().flows, 1);
    }

    #[test]
    fn timeouts_follow_the_flow_state() {
        let ct = Conntrack::new(1024, 7);
        // TCP: opening 30 s.
        let syn = tcp(A, 1000, B, 80, SYN);
        ct.insert(&syn, S(0), 1);
        assert_eq!(ct.track(&syn, S(30), 1, pass), Track::Pass);
        assert_eq!(
            ct.track(&syn, S(61), 1, pass),
            Track::Miss,
            "opening > 30 s"
        );
        // Established: 2 h 4 min.
        ct.insert(&syn, S(100), 1);
        ct.track(&tcp(B, 80, A, 1000, SYN | ACK), S(100), 1, pass);
        let ack = tcp(A, 1000, B, 80, ACK);
        assert_eq!(ct.track(&ack, S(100 + 7440), 1, pass), Track::Pass);
        assert_eq!(
            ct.track(&ack, S(100 + 2 * 7440 + 1), 1, pass),
            Track::Miss,
            "established > 7440 s"
        );
        // Closing: 30 s after a FIN.
        ct.insert(&syn, S(20_000), 1);
        ct.track(&tcp(B, 80, A, 1000, SYN | ACK), S(20_000), 1, pass);
        ct.track(&tcp(A, 1000, B, 80, FIN | ACK), S(20_000), 1, pass);
        assert_eq!(
            ct.track(&ack, S(20_031), 1, pass),
            Track::Miss,
            "closing > 30 s"
        );
        // UDP: 60 s one way, 180 s once answered.
        let q = udp(A, 5353, B, 53);
        ct.insert(&q, S(0), 1);
        assert_eq!(
            ct.track(&q, S(61), 1, pass),
            Track::Miss,
            "unanswered > 60 s"
        );
        ct.insert(&q, S(100), 1);
        assert_eq!(ct.track(&udp(B, 53, A, 5353), S(100), 1, pass), Track::Pass);
        assert_eq!(
            ct.track(&q, S(279), 1, pass),
            Track::Pass,
            "answered: 180 s"
        );
        assert_eq!(ct.track(&q, S(460), 1, pass), Track::Miss);
        // ICMP echo: 30 s.
        let req = Packet::parse(&echo(A, B, 8, 9)).unwrap();
        ct.insert(&req, S(0), 1);
        let rep = Packet::parse(&echo(B, A, 0, 9)).unwrap();
        assert_eq!(ct.track(&rep, S(30), 1, pass), Track::Pass);
        assert_eq!(ct.track(&rep, S(61), 1, pass), Track::Miss);
        assert!(ct.stats().expired >= 5, "{:?}", ct.stats());
    }

    #[test]
    fn an_echo_request_against_the_flow_is_not_part_of_it() {
        let ct = Conntrack::new(1024, 7);
        ct.insert(&Packet::parse(&echo(A, B, 8, 9)).unwrap(), S(0), 1);
        let back = Packet::parse(&echo(B, A, 8, 9)).unwrap();
        assert_eq!(ct.track(&back, S(1), 1, pass), Track::Miss);
        let reply = Packet::parse(&echo(B, A, 0, 9)).unwrap();
        assert_eq!(ct.track(&reply, S(1), 1, pass), Track::Pass);
        let wrong_way_reply = Packet::parse(&echo(A, B, 0, 9)).unwrap();
        assert_eq!(ct.track(&wrong_way_reply, S(1), 1, pass), Track::Miss);
    }

    #[test]
    fn icmp_errors_quote_the_flow_they_belong_to() {
        let ct = Conntrack::new(1024, 7);
        let out = udp(A, 5000, B, 53);
        ct.insert(&out, S(0), 1);
        // B answers with a port unreachable quoting A's datagram.
        let mut quote = v4(proto::UDP, A, B, &[0x13, 0x88, 0, 53, 0, 8, 0, 0]);
        let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
        icmp.append(&mut quote);
        let err = Packet::parse(&v4(proto::ICMP, B, A, &icmp)).unwrap();
        let Kind::IcmpError(q) = err.kind else {
            panic!("{err:?}")
        };
        assert_eq!(q, out.tuple);
        assert!(ct.related(&q, S(1), 1, pass));
        let other = udp(A, 5001, B, 53).tuple;
        assert!(!ct.related(&other, S(1), 1, pass), "an untracked flow");
        assert!(!ct.related(&q, S(100), 1, pass), "an expired flow");
        // A cut flow's errors do not pass either.
        ct.insert(&out, S(200), 1);
        assert!(!ct.related(&q, S(201), 2, |_| false));
    }

    #[test]
    fn ipv6_errors_and_echo_parse() {
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        p[6] = proto::ICMPV6;
        p[23] = 1;
        p[39] = 2;
        let mut quoted = vec![0u8; 40];
        quoted[0] = 0x60;
        quoted[6] = proto::TCP;
        quoted[23] = 2;
        quoted[39] = 1;
        quoted.extend_from_slice(&[0, 80, 0x9c, 0x40, 0, 0, 0, 0]);
        let mut icmp = vec![2, 0, 0, 0, 0, 0, 5, 0x78];
        icmp.extend_from_slice(&quoted);
        p.extend_from_slice(&icmp);
        let err = Packet::parse(&p).unwrap();
        let Kind::IcmpError(q) = err.kind else {
            panic!("{err:?}")
        };
        assert_eq!((q.proto, q.sport, q.dport), (proto::TCP, 80, 40000));
        assert_eq!(q.src_ip(), "::2".parse::<IpAddr>().unwrap());
        // An echo request.
        p.truncate(40);
        p.extend_from_slice(&[128, 0, 0, 0, 0, 7, 0, 1]);
        let e = Packet::parse(&p).unwrap();
        assert_eq!((e.kind, e.tuple.sport), (Kind::EchoRequest, 7));
        assert_eq!(e.policy_port(), 0);
        // Truncated transport headers do not parse.
        assert!(Packet::parse(&v4(proto::TCP, A, B, &[0, 1, 0, 2])).is_none());
        assert!(Packet::parse(&v4(proto::UDP, A, B, &[0, 1])).is_none());
    }

    #[test]
    fn a_later_fragment_has_no_ports() {
        let mut p = v4(proto::UDP, A, B, &[0, 1, 0, 2, 0, 8, 0, 0]);
        p[6] = 0x00;
        p[7] = 0x10;
        let f = Packet::parse(&p).unwrap();
        assert_eq!(
            (f.kind, f.tuple.dport, f.policy_port()),
            (Kind::Fragment, 0, 0)
        );
    }

    #[test]
    fn eviction_at_capacity_never_grows_and_prefers_expired_then_oldest() {
        // One bucket: both choices of every flow are the same eight slots.
        let ct = Conntrack::new(WAYS, 3);
        assert_eq!(ct.capacity(), WAYS);
        let flow = |i: u16| udp(A, i, B, 53);
        for i in 0..8 {
            ct.insert(&flow(i), S(u64::from(i)), 1);
        }
        assert_eq!(ct.stats().flows, 8);
        // Full: a new flow evicts the one idle the longest.
        ct.insert(&flow(8), S(20), 1);
        assert_eq!(ct.track(&flow(0), S(20), 1, pass), Track::Miss);
        ct.track(&flow(1), S(21), 1, pass);
        ct.insert(&flow(9), S(21), 1);
        assert_eq!(ct.track(&flow(1), S(21), 1, pass), Track::Pass, "touched");
        assert_eq!(ct.track(&flow(2), S(21), 1, pass), Track::Miss, "oldest");
        let st = ct.stats();
        assert_eq!((st.flows, st.evicted, st.capacity), (8, 2, 8), "{st:?}");
        // At 65 s, flows 3 and 4 (seen at 3 and 4 s, one way: 60 s) have expired: they make
        // room before any live flow is evicted, however old.
        ct.insert(&flow(10), S(65), 1);
        ct.insert(&flow(11), S(65), 1);
        let st = ct.stats();
        assert_eq!((st.flows, st.evicted), (8, 2), "{st:?}");
        for i in [5, 6, 7, 8, 9, 10, 11] {
            assert_eq!(ct.track(&flow(i), S(65), 1, pass), Track::Pass, "{i}");
        }
        // A thousand more flows: still eight slots.
        for i in 1000..2000 {
            ct.insert(&flow(i), S(66), 1);
        }
        let st = ct.stats();
        assert_eq!((st.flows, st.capacity), (8, 8), "{st:?}");
        assert_eq!(ct.track(&flow(1999), S(66), 1, pass), Track::Pass);
    }

    #[test]
    fn fills_to_most_of_its_capacity_without_evicting() {
        let ct = Conntrack::new(DEFAULT_CAPACITY, 0x5eed);
        let n = DEFAULT_CAPACITY * 9 / 10;
        for i in 0..n as u32 {
            let [a, b, c, d] = i.to_be_bytes();
            ct.insert(&udp([10, b, c, d], 1000 + u16::from(a), B, 53), S(0), 1);
        }
        let st = ct.stats();
        assert_eq!(st.flows as usize, n, "{st:?}");
        assert_eq!(st.evicted, 0, "{st:?}");
    }

    #[test]
    fn the_sweep_reclaims_expired_flows() {
        let ct = Conntrack::new(4096, 1);
        for i in 0..100 {
            ct.insert(&udp(A, i, B, 53), S(0), 1);
        }
        ct.insert(&udp(A, 9999, B, 53), S(100), 1);
        assert_eq!(ct.stats().flows, 101);
        ct.expire(S(100), ct.capacity() / WAYS);
        let st = ct.stats();
        assert_eq!((st.flows, st.expired), (1, 100), "{st:?}");
    }

    #[test]
    fn a_new_generation_checks_flows_again_and_a_cut_stays_cut() {
        let ct = Conntrack::new(1024, 7);
        let syn = tcp(B, 40000, A, 22, SYN);
        ct.insert(&syn, S(0), 1);
        let reply = tcp(A, 22, B, 40000, SYN | ACK);
        assert_eq!(ct.track(&reply, S(0), 1, pass), Track::Pass);
        // Generation 2 denies it: the recheck sees the flow as opened, from either side.
        let mut seen = None;
        let data = tcp(A, 22, B, 40000, ACK);
        let t = ct.track(&data, S(1), 2, |o| {
            seen = Some(*o);
            false
        });
        assert_eq!(t, Track::Cut);
        let o = seen.unwrap();
        assert_eq!(
            (o.tuple.src, o.tuple.dport, o.by_sender),
            (syn.tuple.src, 22, false)
        );
        // Cut whoever sends, and not checked again within the generation.
        assert_eq!(
            ct.track(&tcp(B, 40000, A, 22, ACK), S(2), 2, |_| panic!()),
            Track::Cut
        );
        assert_eq!(ct.track(&data, S(2), 2, |_| true), Track::Cut);
        // Generation 3 allows it again.
        assert_eq!(ct.track(&data, S(3), 3, |_| true), Track::Pass);
    }

    #[test]
    fn entry_size() {
        assert_eq!(Conntrack::entry_bytes(), 48);
    }
}
