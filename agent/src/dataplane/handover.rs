//! Packets kept back for a workload address this node is about to answer for and may not yet.
//!
//! While the coordinator confirms handovers, a new holder answers for a workload address only
//! once the old holder has let go (`meshlink_proto::workload::Holdings::awaited`). Between the
//! moment peers (and the old holder's forwarding) send to it and the moment its confirmation
//! arrives and the address is up on the interface, what arrives for the address is kept here,
//! per address and in order, and delivered to the TUN device once it may be answered: the old
//! holder acknowledged the change before the confirmation was sent, so delivering then keeps
//! one answerer per address.
//!
//! ```text
//!  decrypted packet for an awaited address ──> push ──> queue of its address (oldest dropped when full: `full`)
//!  address held and up ──> release ──> ready, in arrival order ──> Device::take_released ──> firewall ──> TUN
//!  address neither awaited nor held any more ──> discard (`abandoned`)
//!  older than the timeout ──> expire (`timed_out`)
//! ```
//!
//! Bounded: per address in packets and bytes, and in bytes over all addresses; every packet
//! waits at most [`HANDOVER_TIMEOUT`]. Each kept packet is copied into a buffer of its own:
//! handovers are rare and short (about one round trip), so the steady packet path still
//! allocates nothing. Pure and given time (the data plane's clock, see `Device::set_time`).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::Duration;

use super::status::HandoverStatus;

/// How long a packet waits for its address's confirmation at most: as long as a prepared move
/// is kept (`meshlink_proto::workload::PREPARE_HOLD`). A confirmation that waits for an old
/// holder's lease to run out (about 1.6 s by default) still finds its packets.
pub const HANDOVER_TIMEOUT: Duration = meshlink_proto::workload::PREPARE_HOLD;
/// Packets kept per address at most: half a second of a 1,000 packets/s flow.
pub const HANDOVER_PACKETS: usize = 512;
/// Bytes kept per address at most.
pub const HANDOVER_BYTES: usize = 512 * 1024;
/// Bytes kept over all addresses at most.
pub const HANDOVER_TOTAL_BYTES: usize = 2 * 1024 * 1024;

/// The bounds of [`HandoverQueues`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandoverLimits {
    /// Packets per address.
    pub packets: usize,
    /// Bytes per address.
    pub bytes: usize,
    /// Bytes over all addresses (queued and released, not yet taken).
    pub total_bytes: usize,
    /// How long a packet may wait.
    pub timeout: Duration,
}

impl Default for HandoverLimits {
    fn default() -> Self {
        HandoverLimits {
            packets: HANDOVER_PACKETS,
            bytes: HANDOVER_BYTES,
            total_bytes: HANDOVER_TOTAL_BYTES,
            timeout: HANDOVER_TIMEOUT,
        }
    }
}

/// One packet kept back, with when it arrived.
#[derive(Debug)]
struct Kept {
    at: Duration,
    packet: Vec<u8>,
}

/// The packets of one address, oldest first.
#[derive(Debug, Default)]
struct Queue {
    packets: VecDeque<Kept>,
    bytes: usize,
}

/// What happened to the packets kept back, since the start (see [`HandoverStatus`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    queued: u64,
    released: u64,
    full: u64,
    timed_out: u64,
    abandoned: u64,
}

/// The queues of every awaited address, and the packets released from them waiting to be
/// taken. See the module documentation.
#[derive(Debug, Default)]
pub struct HandoverQueues {
    limits: HandoverLimits,
    queues: HashMap<IpAddr, Queue>,
    ready: VecDeque<Kept>,
    /// Bytes in `queues` and `ready`.
    total: usize,
    counts: Counts,
}

impl HandoverQueues {
    /// Empty queues with these bounds.
    pub fn new(limits: HandoverLimits) -> Self {
        HandoverQueues {
            limits,
            ..HandoverQueues::default()
        }
    }

    /// Keeps `packet`, addressed to `dst`, back at `now`. The oldest packets of `dst` make room
    /// when its queue is full (counted `full`); a packet that finds no room over all
    /// addresses (or is larger than a queue) is dropped itself (`full`).
    pub fn push(&mut self, dst: IpAddr, packet: &[u8], now: Duration) {
        self.counts.queued += 1;
        let limits = self.limits;
        let len = packet.len();
        if len > limits.bytes || len > limits.total_bytes || limits.packets == 0 {
            self.counts.full += 1;
            return;
        }
        let q = self.queues.entry(dst).or_default();
        Self::expire_queue(q, &mut self.total, &mut self.counts, now, limits.timeout);
        while !q.packets.is_empty()
            && (q.packets.len() >= limits.packets
                || q.bytes + len > limits.bytes
                || self.total + len > limits.total_bytes)
        {
            if let Some(old) = q.packets.pop_front() {
                q.bytes -= old.packet.len();
                self.total -= old.packet.len();
                self.counts.full += 1;
            }
        }
        if self.total + len > limits.total_bytes {
            // Other addresses hold the room: their packets came first.
            self.counts.full += 1;
            return;
        }
        q.packets.push_back(Kept {
            at: now,
            packet: packet.to_vec(),
        });
        q.bytes += len;
        self.total += len;
    }

    /// Drops every packet that has waited the timeout at `now` (counted `timed_out`), released
    /// ones not taken yet included.
    pub fn expire(&mut self, now: Duration) {
        let timeout = self.limits.timeout;
        for q in self.queues.values_mut() {
            Self::expire_queue(q, &mut self.total, &mut self.counts, now, timeout);
        }
        self.queues.retain(|_, q| !q.packets.is_empty());
        while self
            .ready
            .front()
            .is_some_and(|k| now.saturating_sub(k.at) >= timeout)
        {
            if let Some(k) = self.ready.pop_front() {
                self.total -= k.packet.len();
                self.counts.timed_out += 1;
            }
        }
    }

    fn expire_queue(
        q: &mut Queue,
        total: &mut usize,
        counts: &mut Counts,
        now: Duration,
        timeout: Duration,
    ) {
        while q
            .packets
            .front()
            .is_some_and(|k| now.saturating_sub(k.at) >= timeout)
        {
            if let Some(k) = q.packets.pop_front() {
                q.bytes -= k.packet.len();
                *total -= k.packet.len();
                counts.timed_out += 1;
            }
        }
    }

    /// The addresses that have packets kept back.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.queues
            .iter()
            .filter(|(_, q)| !q.packets.is_empty())
            .map(|(a, _)| *a)
    }

    /// Whether packets of `dst` are kept back.
    pub fn has(&self, dst: IpAddr) -> bool {
        self.queues.get(&dst).is_some_and(|q| !q.packets.is_empty())
    }

    /// `dst` may be answered now: its packets, in arrival order, join those released before
    /// (taken with [`HandoverQueues::pop_ready`]); those that waited the timeout at `now` are
    /// dropped (`timed_out`).
    pub fn release(&mut self, dst: IpAddr, now: Duration) {
        let Some(mut q) = self.queues.remove(&dst) else {
            return;
        };
        Self::expire_queue(
            &mut q,
            &mut self.total,
            &mut self.counts,
            now,
            self.limits.timeout,
        );
        self.ready.extend(q.packets);
    }

    /// `dst` will not be answered here after all (the workload went elsewhere, the preparation
    /// ended, the lease ran out): its packets are dropped (`abandoned`).
    pub fn discard(&mut self, dst: IpAddr) {
        if let Some(q) = self.queues.remove(&dst) {
            self.total -= q.bytes;
            self.counts.abandoned += q.packets.len() as u64;
        }
    }

    /// The oldest released packet not taken yet, counted `released`.
    pub fn pop_ready(&mut self) -> Option<Vec<u8>> {
        let k = self.ready.pop_front()?;
        self.total -= k.packet.len();
        self.counts.released += 1;
        Some(k.packet)
    }

    /// Whether released packets wait to be taken.
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// The counters, and what is kept back now.
    pub fn status(&self) -> HandoverStatus {
        HandoverStatus {
            waiting: self
                .queues
                .values()
                .map(|q| q.packets.len() as u64)
                .sum::<u64>()
                + self.ready.len() as u64,
            waiting_bytes: self.total as u64,
            queued: self.counts.queued,
            released: self.counts.released,
            full: self.counts.full,
            timed_out: self.counts.timed_out,
            abandoned: self.counts.abandoned,
            ..HandoverStatus::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([100, 64, 50, last])
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn limits(packets: usize, bytes: usize, total_bytes: usize) -> HandoverLimits {
        HandoverLimits {
            packets,
            bytes,
            total_bytes,
            timeout: ms(3000),
        }
    }

    fn drain(q: &mut HandoverQueues) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| q.pop_ready()).collect()
    }

    /// Every packet queued is accounted for: waiting, released or dropped for a named reason.
    fn balanced(q: &HandoverQueues) -> bool {
        let s = q.status();
        s.queued == s.waiting + s.released + s.full + s.timed_out + s.abandoned
    }

    #[test]
    fn released_packets_come_out_in_arrival_order() {
        let mut q = HandoverQueues::new(HandoverLimits::default());
        for i in 0..5u8 {
            q.push(ip(10), &[i; 40], ms(u64::from(i)));
        }
        q.push(ip(11), &[9; 40], ms(5));
        assert!(q.has(ip(10)) && q.has(ip(11)));
        assert!(!q.has_ready());
        assert_eq!(
            q.pop_ready(),
            None,
            "nothing released before the confirmation"
        );
        q.release(ip(10), ms(100));
        assert!(!q.has(ip(10)) && q.has(ip(11)));
        let out = drain(&mut q);
        assert_eq!(out, (0..5u8).map(|i| vec![i; 40]).collect::<Vec<_>>());
        let s = q.status();
        assert_eq!((s.queued, s.released, s.waiting), (6, 5, 1));
        assert_eq!(s.waiting_bytes, 40);
        // Releasing an address with nothing kept back changes nothing.
        q.release(ip(12), ms(100));
        assert_eq!(q.pop_ready(), None);
    }

    #[test]
    fn a_full_queue_drops_its_oldest_packets_and_counts_them() {
        // Three packets per address.
        let mut q = HandoverQueues::new(limits(3, 10_000, 100_000));
        for i in 0..5u8 {
            q.push(ip(10), &[i; 100], ms(1));
        }
        assert_eq!(q.status().full, 2);
        q.release(ip(10), ms(2));
        assert_eq!(
            drain(&mut q),
            vec![vec![2; 100], vec![3; 100], vec![4; 100]]
        );
        // 250 bytes per address: the fourth 100-byte packet pushes the first out.
        let mut q = HandoverQueues::new(limits(100, 250, 100_000));
        for i in 0..3u8 {
            q.push(ip(10), &[i; 100], ms(1));
        }
        assert_eq!(q.status().full, 1);
        assert_eq!(q.status().waiting_bytes, 200);
        // A packet larger than a whole queue is dropped itself.
        q.push(ip(10), &[7; 300], ms(1));
        let s = q.status();
        assert_eq!(
            (s.full, s.waiting),
            (2, 2),
            "dropped itself; the queue stays"
        );
        // Over all addresses: 300 bytes. Another address's packets are not taken for room.
        let mut q = HandoverQueues::new(limits(100, 250, 300));
        q.push(ip(10), &[1; 200], ms(1));
        q.push(ip(11), &[2; 100], ms(1));
        q.push(ip(11), &[3; 100], ms(1));
        let s = q.status();
        assert_eq!((s.waiting, s.waiting_bytes, s.full), (2, 300, 1));
        q.release(ip(10), ms(2));
        q.release(ip(11), ms(2));
        assert_eq!(drain(&mut q), vec![vec![1; 200], vec![3; 100]]);
        assert_eq!(q.status().waiting_bytes, 0);
    }

    #[test]
    fn packets_wait_the_timeout_at_most() {
        let mut q = HandoverQueues::new(limits(100, 100_000, 100_000));
        q.push(ip(10), &[1; 10], ms(0));
        q.push(ip(10), &[2; 10], ms(1000));
        q.expire(ms(2999));
        assert_eq!(q.status().timed_out, 0);
        q.expire(ms(3000));
        assert_eq!(q.status().timed_out, 1);
        // A confirmation after the timeout of the rest releases nothing of them.
        q.release(ip(10), ms(4000));
        assert_eq!(q.status().timed_out, 2);
        assert_eq!(q.pop_ready(), None);
        assert!(!q.has(ip(10)), "an emptied queue is forgotten");
        // Released and not taken in time: dropped too.
        q.push(ip(10), &[3; 10], ms(5000));
        q.release(ip(10), ms(5001));
        q.expire(ms(8000));
        let s = q.status();
        assert_eq!(
            (s.timed_out, s.released, s.waiting, s.waiting_bytes),
            (3, 0, 0, 0)
        );
        // A push expires the old packets of its address first.
        q.push(ip(10), &[4; 10], ms(9000));
        q.push(ip(10), &[5; 10], ms(12000));
        assert_eq!(q.status().timed_out, 4);
        assert_eq!(q.status().waiting, 1);
    }

    #[test]
    fn an_address_not_taken_after_all_drops_its_packets() {
        let mut q = HandoverQueues::new(HandoverLimits::default());
        q.push(ip(10), &[1; 10], ms(0));
        q.push(ip(10), &[2; 10], ms(0));
        q.push(ip(11), &[3; 10], ms(0));
        q.discard(ip(10));
        let s = q.status();
        assert_eq!((s.abandoned, s.waiting, s.waiting_bytes), (2, 1, 10));
        assert_eq!(q.addresses().collect::<Vec<_>>(), vec![ip(11)]);
        q.discard(ip(12));
        assert_eq!(q.status().abandoned, 2);
    }

    #[test]
    fn every_packet_is_accounted_for() {
        let mut q = HandoverQueues::new(limits(4, 1000, 1500));
        let mut t = 0;
        for round in 0..50u64 {
            for k in 0..(round % 7) {
                let dst = ip(10 + (k % 3) as u8);
                q.push(dst, &vec![k as u8; 50 + (k as usize * 37) % 400], ms(t));
                t += 150;
            }
            match round % 4 {
                0 => q.release(ip(10), ms(t)),
                1 => q.discard(ip(11)),
                2 => q.expire(ms(t)),
                _ => {
                    let _ = q.pop_ready();
                }
            }
            assert!(balanced(&q), "round {round}: {:?}", q.status());
        }
    }
}
