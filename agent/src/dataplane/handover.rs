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
//! This node's own host sends to the address in that window too (a client on the node the
//! workload moves to), and its packets come out of the TUN device: the kernel does not have
//! the address yet. Once the map names this node (no peer routes the address any more) they
//! are kept here as well, under [`HOST`] as their sender, and delivered with the rest (the
//! kernel takes a packet with one of its own source addresses from the TUN device: see
//! `crate::platform::sysctl`); the policy speaks of what peers send, so it does not judge
//! them. While the move is only prepared they go to the holder, which still answers, so that
//! a preparation that does not land holds nothing up; one that reaches an old holder that has
//! already applied the move is lost there (it forwards to the new holder, never back to the
//! sender). If the address does not come here after all, the kept ones are sent on by the
//! routes of then (`sent_on`), as they would have been.
//!
//! ```text
//!  decrypted packet for an awaited address ──> policy (`Device`) ──denied──> dropped (`denied`)
//!      ──> push ──> queue of its address, by sender (no room: the largest share loses its oldest, `full`)
//!  packet from this host to an awaited or held address no peer routes ──> push (sender: HOST)
//!  address held and up ──> release ──> ready, in arrival order ──> Device::take_released, a batch at a time
//!      ──> firewall in full (`denied`, `not_local`; this host's: still held and up, else `not_local`)
//!      ──> TUN; the address stays kept back until all is written
//!  address neither awaited nor held any more ──> discard (`abandoned`; this host's: unsent ──> Device::take_released
//!      ──> the routes of then, `sent_on`)
//!  older than the timeout ──> expire (`timed_out`)
//! ```
//!
//! Bounded: per address in packets and bytes, over all addresses in bytes, and every packet
//! waits at most [`HANDOVER_TIMEOUT`]. Shares are weighed by cost: a packet costs its length,
//! and at least [`HandoverLimits::bytes`] / [`HandoverLimits::packets`] (1 KiB by default), so
//! that a flood of small packets weighs what it takes of a queue's 512 packets. The total
//! bound is on the cost, which is never less than the bytes held.
//!
//! Fair when full: the queues are shared by peers that do not trust each other (any peer the
//! policy lets reach the address on some port can send to it), so no one sender may push the
//! others out. Within an address, packets are kept per sender (the peer that delivered them;
//! the old holder relaying everyone's packets counts as one), and a packet that finds no room
//! takes it from the sender with the largest share, counting the packet itself: a flood evicts
//! only the flooder's own oldest packets once its share is the largest, and a sender with less
//! always finds room. Over all addresses, room is taken the same way from the address with
//! the largest share, so that a few flooded addresses cannot starve the others (each can
//! always get its even share of the total). Evicting the oldest (not refusing the newest)
//! keeps what a sender sent last, the most useful once delivered.
//!
//! Each kept packet is copied into a buffer of its own: handovers are rare and short (about
//! one round trip), so the steady packet path still allocates nothing. Pure and given time
//! (the data plane's clock, see `Device::set_time`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::time::Duration;

use meshlink_proto::PublicKey;

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
/// The sender this node's own host's packets are kept under: the all-zero key, which no node
/// may have (it is of small order; the coordinator refuses it at join, so no mesh peer has
/// it, and handovers happen only on mesh nodes). So neither a key rotation (this node's key
/// changes while packets are kept) nor a peer sharing this node's key (a copied state
/// directory) changes what counts as the host's.
pub const HOST: PublicKey = PublicKey([0; 32]);

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

/// What became of a released packet (see [`HandoverQueues::count`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Delivered to the TUN device.
    Released,
    /// The policy denied it.
    Denied,
    /// Its address was no longer a local destination.
    NotLocal,
}

/// One packet kept back: when it arrived, its place in the arrival order, its cost, and who
/// delivered it.
#[derive(Debug)]
struct Kept {
    at: Duration,
    seq: u64,
    cost: usize,
    sender: PublicKey,
    packet: Vec<u8>,
}

/// The packets of one sender to one address, oldest first.
#[derive(Debug, Default)]
struct Share {
    packets: VecDeque<Kept>,
    cost: usize,
}

/// The packets of one address, by sender. An address keeps its (possibly empty) queue until
/// it is released or discarded, so that it stays kept back until then.
#[derive(Debug, Default)]
struct Queue {
    senders: HashMap<PublicKey, Share>,
    cost: usize,
    packets: usize,
}

impl Queue {
    /// The sender whose share is the largest, `incoming` (a sender and the cost of the packet
    /// it brings) counted with its packet; ties go to `incoming`.
    fn largest_sender(&self, incoming: Option<(PublicKey, usize)>) -> Option<PublicKey> {
        let mut best: Option<(PublicKey, usize)> =
            incoming.map(|(s, c)| (s, c + self.senders.get(&s).map_or(0, |sh| sh.cost)));
        for (s, share) in &self.senders {
            if incoming.is_some_and(|(i, _)| i == *s) {
                continue;
            }
            if best.is_none_or(|(_, c)| share.cost > c) {
                best = Some((*s, share.cost));
            }
        }
        best.map(|(s, _)| s)
    }
}

/// What happened to the packets kept back, since the start (see [`HandoverStatus`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    queued: u64,
    released: u64,
    denied: u64,
    not_local: u64,
    full: u64,
    timed_out: u64,
    abandoned: u64,
    sent_on: u64,
}

/// The queues of every awaited address, and the packets released from them waiting to be
/// taken. See the module documentation.
#[derive(Debug, Default)]
pub struct HandoverQueues {
    limits: HandoverLimits,
    queues: HashMap<IpAddr, Queue>,
    ready: VecDeque<Kept>,
    /// This host's packets for addresses discarded, in arrival order, to be sent on by the
    /// routes (see [`HandoverQueues::discard`]).
    unsent: VecDeque<Kept>,
    /// Addresses released whose packets are not all written yet (see
    /// [`HandoverQueues::finish`]).
    releasing: HashSet<IpAddr>,
    /// The cost of the packets in `queues`, `ready` and `unsent`.
    total: usize,
    /// Their bytes.
    bytes: usize,
    /// The arrival order.
    seq: u64,
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

    /// What a packet of `len` bytes costs (see the module documentation): its length, and at
    /// least an even part of an address's bytes among its packets.
    fn cost(&self, len: usize) -> usize {
        len.max(self.limits.bytes / self.limits.packets.max(1))
    }

    /// Keeps `packet`, addressed to `dst` and delivered by `sender`, back at `now`. A packet
    /// that finds no room takes it from the largest share (counted `full`), which may be its
    /// own sender's (then its oldest go) or itself (then it is dropped); see the module
    /// documentation.
    pub fn push(&mut self, dst: IpAddr, sender: PublicKey, packet: &[u8], now: Duration) {
        self.counts.queued += 1;
        let limits = self.limits;
        let cost = self.cost(packet.len());
        if limits.packets == 0 || cost > limits.bytes || cost > limits.total_bytes {
            self.counts.full += 1;
            return;
        }
        if let Some(q) = self.queues.get_mut(&dst) {
            Self::expire_queue(
                q,
                &mut self.total,
                &mut self.bytes,
                &mut self.counts,
                now,
                limits.timeout,
            );
        }
        loop {
            let (own, own_packets) = self
                .queues
                .get(&dst)
                .map_or((0, 0), |q| (q.cost, q.packets));
            let over_address = own + cost > limits.bytes || own_packets >= limits.packets;
            if !over_address && self.total + cost <= limits.total_bytes {
                break;
            }
            let from = if over_address {
                dst
            } else {
                self.largest_address(dst, own + cost)
            };
            let incoming = (from == dst).then_some((sender, cost));
            let victim = self
                .queues
                .get(&from)
                .map_or(Some(sender), |q| q.largest_sender(incoming));
            let evicted = victim.is_some_and(|s| self.evict_oldest(from, s));
            if !evicted {
                // The packet itself is the largest share (or the room is held by packets
                // released and not taken yet).
                self.counts.full += 1;
                return;
            }
        }
        self.seq += 1;
        let share = self
            .queues
            .entry(dst)
            .or_default()
            .senders
            .entry(sender)
            .or_default();
        share.packets.push_back(Kept {
            at: now,
            seq: self.seq,
            cost,
            sender,
            packet: packet.to_vec(),
        });
        share.cost += cost;
        if let Some(q) = self.queues.get_mut(&dst) {
            q.cost += cost;
            q.packets += 1;
        }
        self.total += cost;
        self.bytes += packet.len();
    }

    /// The address whose queue costs the most, `dst` counted at `dst_cost`; ties go to `dst`.
    fn largest_address(&self, dst: IpAddr, dst_cost: usize) -> IpAddr {
        let mut best = (dst, dst_cost);
        for (a, q) in &self.queues {
            if *a != dst && q.cost > best.1 {
                best = (*a, q.cost);
            }
        }
        best.0
    }

    /// Drops the oldest packet `sender` has queued for `dst` (counted `full`); false if it has
    /// none.
    fn evict_oldest(&mut self, dst: IpAddr, sender: PublicKey) -> bool {
        let Some(q) = self.queues.get_mut(&dst) else {
            return false;
        };
        let Some(share) = q.senders.get_mut(&sender) else {
            return false;
        };
        let Some(k) = share.packets.pop_front() else {
            return false;
        };
        share.cost -= k.cost;
        if share.packets.is_empty() {
            q.senders.remove(&sender);
        }
        q.cost -= k.cost;
        q.packets -= 1;
        self.let_go(&k);
        self.counts.full += 1;
        true
    }

    /// `k` is no longer kept: its cost and bytes leave the totals.
    fn let_go(&mut self, k: &Kept) {
        self.total -= k.cost;
        self.bytes -= k.packet.len();
    }

    /// A packet for an awaited address that the policy denied on arrival: counted `queued`
    /// and `denied`, not kept.
    pub fn denied_on_arrival(&mut self) {
        self.counts.queued += 1;
        self.counts.denied += 1;
    }

    /// Drops every packet that has waited the timeout at `now` (counted `timed_out`), released
    /// ones not taken yet and this host's not sent on yet included.
    pub fn expire(&mut self, now: Duration) {
        let timeout = self.limits.timeout;
        for q in self.queues.values_mut() {
            Self::expire_queue(
                q,
                &mut self.total,
                &mut self.bytes,
                &mut self.counts,
                now,
                timeout,
            );
        }
        for list in [&mut self.ready, &mut self.unsent] {
            while list
                .front()
                .is_some_and(|k| now.saturating_sub(k.at) >= timeout)
            {
                if let Some(k) = list.pop_front() {
                    self.total -= k.cost;
                    self.bytes -= k.packet.len();
                    self.counts.timed_out += 1;
                }
            }
        }
    }

    fn expire_queue(
        q: &mut Queue,
        total: &mut usize,
        bytes: &mut usize,
        counts: &mut Counts,
        now: Duration,
        timeout: Duration,
    ) {
        for share in q.senders.values_mut() {
            while share
                .packets
                .front()
                .is_some_and(|k| now.saturating_sub(k.at) >= timeout)
            {
                if let Some(k) = share.packets.pop_front() {
                    share.cost -= k.cost;
                    q.cost -= k.cost;
                    q.packets -= 1;
                    *total -= k.cost;
                    *bytes -= k.packet.len();
                    counts.timed_out += 1;
                }
            }
        }
        q.senders.retain(|_, s| !s.packets.is_empty());
    }

    /// The addresses kept back: with a queue (perhaps emptied), or released with packets not
    /// all written yet.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.queues
            .keys()
            .chain(
                self.releasing
                    .iter()
                    .filter(|a| !self.queues.contains_key(a)),
            )
            .copied()
    }

    /// The addresses with a queue, which [`HandoverQueues::release`] would release.
    pub fn queued(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.queues.keys().copied()
    }

    /// Whether packets of `dst` are queued.
    pub fn has(&self, dst: IpAddr) -> bool {
        self.queues.get(&dst).is_some_and(|q| q.cost > 0)
    }

    /// `dst` may be answered now: its packets, in arrival order, join those released before
    /// (taken with [`HandoverQueues::pop_ready`]); those that waited the timeout at `now` are
    /// dropped (`timed_out`). `dst` stays kept back ([`HandoverQueues::addresses`]) until
    /// [`HandoverQueues::finish`].
    pub fn release(&mut self, dst: IpAddr, now: Duration) {
        let Some(mut q) = self.queues.remove(&dst) else {
            return;
        };
        Self::expire_queue(
            &mut q,
            &mut self.total,
            &mut self.bytes,
            &mut self.counts,
            now,
            self.limits.timeout,
        );
        let mut kept: Vec<Kept> = q.senders.into_values().flat_map(|s| s.packets).collect();
        kept.sort_unstable_by_key(|k| k.seq);
        self.ready.extend(kept);
        self.releasing.insert(dst);
    }

    /// Every packet released was taken and written: the addresses released stop being kept
    /// back. Returns whether any was (nothing happens while released packets wait).
    pub fn finish(&mut self) -> bool {
        if !self.ready.is_empty() || self.releasing.is_empty() {
            return false;
        }
        self.releasing.clear();
        true
    }

    /// Whether released addresses wait for [`HandoverQueues::finish`].
    pub fn is_releasing(&self) -> bool {
        !self.releasing.is_empty()
    }

    /// `dst` will not be answered here after all (the workload went elsewhere, the preparation
    /// ended, the lease ran out): its packets are dropped (`abandoned`), but for those of
    /// [`HOST`] (this host's), which wait to be sent on by the routes
    /// ([`HandoverQueues::pop_unsent`]). Released ones still go through the firewall, which
    /// refuses them once the address is not local.
    pub fn discard(&mut self, dst: IpAddr) {
        self.releasing.remove(&dst);
        let Some(mut q) = self.queues.remove(&dst) else {
            return;
        };
        if let Some(mine) = q.senders.remove(&HOST) {
            self.unsent.extend(mine.packets);
            // After another address's, perhaps sent later: in arrival order.
            self.unsent.make_contiguous().sort_by_key(|k| k.seq);
        }
        for share in q.senders.into_values() {
            for k in share.packets {
                self.let_go(&k);
                self.counts.abandoned += 1;
            }
        }
    }

    /// The oldest packet of this host's whose address went elsewhere (see
    /// [`HandoverQueues::discard`]), counted `sent_on`: the caller sends it by the routes.
    pub fn pop_unsent(&mut self) -> Option<Vec<u8>> {
        let k = self.unsent.pop_front()?;
        self.let_go(&k);
        self.counts.sent_on += 1;
        Some(k.packet)
    }

    /// Whether packets of this host's wait to be sent on ([`HandoverQueues::pop_unsent`]).
    pub fn has_unsent(&self) -> bool {
        !self.unsent.is_empty()
    }

    /// The oldest released packet not taken yet, and who delivered it (the sender given to
    /// [`HandoverQueues::push`]). Say what became of it with [`HandoverQueues::count`].
    pub fn pop_ready(&mut self) -> Option<(PublicKey, Vec<u8>)> {
        let k = self.ready.pop_front()?;
        self.let_go(&k);
        Some((k.sender, k.packet))
    }

    /// Counts what became of a packet taken with [`HandoverQueues::pop_ready`].
    pub fn count(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Released => self.counts.released += 1,
            Outcome::Denied => self.counts.denied += 1,
            Outcome::NotLocal => self.counts.not_local += 1,
        }
    }

    /// Whether released packets wait to be taken.
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// The counters, and what is kept back now.
    pub fn status(&self) -> HandoverStatus {
        HandoverStatus {
            waiting: self.queues.values().map(|q| q.packets as u64).sum::<u64>()
                + self.ready.len() as u64
                + self.unsent.len() as u64,
            waiting_bytes: self.bytes as u64,
            queued: self.counts.queued,
            released: self.counts.released,
            denied: self.counts.denied,
            not_local: self.counts.not_local,
            full: self.counts.full,
            timed_out: self.counts.timed_out,
            abandoned: self.counts.abandoned,
            sent_on: self.counts.sent_on,
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

    /// Sender `n`.
    fn peer(n: u8) -> PublicKey {
        PublicKey([n; 32])
    }

    const A: u8 = 1;

    fn limits(packets: usize, bytes: usize, total_bytes: usize) -> HandoverLimits {
        HandoverLimits {
            packets,
            bytes,
            total_bytes,
            timeout: ms(3000),
        }
    }

    fn drain(q: &mut HandoverQueues) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| {
            let (_, p) = q.pop_ready()?;
            q.count(Outcome::Released);
            Some(p)
        })
        .collect()
    }

    /// Every packet queued is accounted for: waiting, released or dropped for a named reason.
    fn balanced(q: &HandoverQueues) -> bool {
        let s = q.status();
        s.queued
            == s.waiting
                + s.released
                + s.denied
                + s.not_local
                + s.full
                + s.timed_out
                + s.abandoned
                + s.sent_on
    }

    #[test]
    fn released_packets_come_out_in_arrival_order() {
        let mut q = HandoverQueues::new(HandoverLimits::default());
        // Three senders, interleaved: the order of arrival holds across them.
        for i in 0..6u8 {
            q.push(ip(10), peer(1 + i % 3), &[i; 40], ms(u64::from(i)));
        }
        q.push(ip(11), peer(A), &[9; 40], ms(5));
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
        assert_eq!(out, (0..6u8).map(|i| vec![i; 40]).collect::<Vec<_>>());
        let s = q.status();
        assert_eq!((s.queued, s.released, s.waiting), (7, 6, 1));
        assert_eq!(s.waiting_bytes, 40);
        // Releasing an address with nothing kept back changes nothing.
        q.release(ip(12), ms(100));
        assert_eq!(q.pop_ready(), None);
    }

    #[test]
    fn a_released_address_stays_kept_back_until_its_packets_are_all_taken() {
        let mut q = HandoverQueues::new(HandoverLimits::default());
        q.push(ip(10), peer(A), &[1; 40], ms(0));
        q.push(ip(10), peer(A), &[2; 40], ms(0));
        assert!(!q.finish(), "nothing released");
        q.release(ip(10), ms(1));
        assert_eq!(q.addresses().collect::<Vec<_>>(), vec![ip(10)]);
        assert!(q.is_releasing());
        assert_eq!(q.pop_ready(), Some((peer(A), vec![1; 40])));
        assert!(!q.finish(), "one packet still to be taken");
        // A packet that arrives meanwhile is queued behind, and released after the others.
        q.push(ip(10), peer(2), &[3; 40], ms(2));
        q.release(ip(10), ms(2));
        assert_eq!(q.pop_ready(), Some((peer(A), vec![2; 40])));
        assert_eq!(
            q.pop_ready(),
            Some((peer(2), vec![3; 40])),
            "with its sender"
        );
        assert!(q.addresses().any(|a| a == ip(10)), "until written");
        assert!(q.finish());
        assert_eq!(q.addresses().count(), 0);
        assert!(!q.is_releasing() && !q.finish());
    }

    #[test]
    fn a_full_queue_drops_its_oldest_packets_and_counts_them() {
        // Three packets per address.
        let mut q = HandoverQueues::new(limits(3, 10_000, 100_000));
        for i in 0..5u8 {
            q.push(ip(10), peer(A), &[i; 100], ms(1));
        }
        assert_eq!(q.status().full, 2);
        q.release(ip(10), ms(2));
        assert_eq!(
            drain(&mut q),
            vec![vec![2; 100], vec![3; 100], vec![4; 100]]
        );
        // 250 bytes per address: the third 100-byte packet pushes the first out.
        let mut q = HandoverQueues::new(limits(100, 250, 100_000));
        for i in 0..3u8 {
            q.push(ip(10), peer(A), &[i; 100], ms(1));
        }
        assert_eq!(q.status().full, 1);
        assert_eq!(q.status().waiting_bytes, 200);
        // A packet larger than a whole queue is dropped itself.
        q.push(ip(10), peer(A), &[7; 300], ms(1));
        let s = q.status();
        assert_eq!(
            (s.full, s.waiting),
            (2, 2),
            "dropped itself; the queue stays"
        );
        // Over all addresses: 300 bytes. The address with the most makes room: here the one
        // the packet is for.
        let mut q = HandoverQueues::new(limits(100, 250, 300));
        q.push(ip(10), peer(A), &[1; 200], ms(1));
        q.push(ip(11), peer(A), &[2; 100], ms(1));
        q.push(ip(11), peer(A), &[3; 100], ms(1));
        let s = q.status();
        assert_eq!((s.waiting, s.waiting_bytes, s.full), (2, 300, 1));
        q.release(ip(10), ms(2));
        q.release(ip(11), ms(2));
        assert_eq!(drain(&mut q), vec![vec![1; 200], vec![3; 100]]);
        assert_eq!(q.status().waiting_bytes, 0);
    }

    /// A peer that floods an address (with small packets the policy lets through, say) evicts
    /// only its own packets once its share is the largest: the others' stay.
    #[test]
    fn a_flooding_sender_evicts_its_own_packets_not_the_others() {
        const FLOOD: u8 = 7;
        let mut q = HandoverQueues::new(HandoverLimits::default());
        for i in 0..3u8 {
            q.push(ip(10), peer(A), &[i; 1000], ms(1));
            q.push(ip(10), peer(2), &[100 + i; 80], ms(1));
        }
        for _ in 0..5000 {
            q.push(ip(10), peer(FLOOD), &[0xff; 28], ms(2));
        }
        let s = q.status();
        assert_eq!(s.waiting, HANDOVER_PACKETS as u64, "the queue is full");
        assert_eq!(s.full, 5000 + 6 - HANDOVER_PACKETS as u64);
        // A sender with less still finds room: from the flood.
        q.push(ip(10), peer(2), &[103; 80], ms(3));
        q.release(ip(10), ms(4));
        let out = drain(&mut q);
        let mine: Vec<Vec<u8>> = out.iter().filter(|p| p[0] != 0xff).cloned().collect();
        assert_eq!(
            mine,
            vec![
                vec![0; 1000],
                vec![100; 80],
                vec![1; 1000],
                vec![101; 80],
                vec![2; 1000],
                vec![102; 80],
                vec![103; 80],
            ]
        );
        assert_eq!(out.len(), HANDOVER_PACKETS);
        assert!(balanced(&q));

        // Large packets: shares are weighed by cost (here their bytes).
        let mut q = HandoverQueues::new(limits(512, 8192, 1 << 20));
        q.push(ip(10), peer(A), &[1; 1000], ms(1));
        for _ in 0..20 {
            q.push(ip(10), peer(FLOOD), &[0xff; 1400], ms(2));
        }
        q.release(ip(10), ms(3));
        let out = drain(&mut q);
        assert_eq!(out[0], vec![1; 1000], "kept: {} packets", out.len());
        assert_eq!(out.len(), 1 + (8192 - 1000) / 1400);
    }

    /// Flooded addresses cannot take the whole of the total room: an address with less always
    /// finds its even share, taken from the address with the most.
    #[test]
    fn flooded_addresses_do_not_starve_the_others() {
        let mut q = HandoverQueues::new(HandoverLimits::default());
        for flooded in 10..14u8 {
            for _ in 0..1000 {
                q.push(ip(flooded), peer(flooded), &[flooded; 1400], ms(1));
            }
        }
        let s = q.status();
        assert!(
            s.waiting_bytes <= HANDOVER_TOTAL_BYTES as u64,
            "{}",
            s.waiting_bytes
        );
        // Four addresses of 374 packets each fill the 2 MiB; a fifth still gets its fifth.
        let even = HANDOVER_TOTAL_BYTES / 5 / 1400;
        for i in 0..even {
            q.push(ip(20), peer(A), &[i as u8; 1400], ms(2));
        }
        assert!(q.status().waiting_bytes <= HANDOVER_TOTAL_BYTES as u64);
        q.release(ip(20), ms(3));
        let out = drain(&mut q);
        assert_eq!(
            out,
            (0..even).map(|i| vec![i as u8; 1400]).collect::<Vec<_>>(),
            "none of its packets lost"
        );
        for flooded in 10..14u8 {
            q.release(ip(flooded), ms(3));
        }
        let rest = drain(&mut q).len();
        assert!(
            rest >= 4 * even,
            "each flooded address kept its share: {rest}"
        );
        assert!(balanced(&q));
    }

    #[test]
    fn packets_wait_the_timeout_at_most() {
        let mut q = HandoverQueues::new(limits(100, 100_000, 100_000));
        q.push(ip(10), peer(A), &[1; 10], ms(0));
        q.push(ip(10), peer(2), &[2; 10], ms(1000));
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
        q.push(ip(10), peer(A), &[3; 10], ms(5000));
        q.release(ip(10), ms(5001));
        q.expire(ms(8000));
        let s = q.status();
        assert_eq!(
            (s.timed_out, s.released, s.waiting, s.waiting_bytes),
            (3, 0, 0, 0)
        );
        // A push expires the old packets of its address first.
        q.push(ip(10), peer(A), &[4; 10], ms(9000));
        q.push(ip(10), peer(A), &[5; 10], ms(12000));
        assert_eq!(q.status().timed_out, 4);
        assert_eq!(q.status().waiting, 1);
    }

    #[test]
    fn an_address_not_taken_after_all_drops_its_packets() {
        let mut q = HandoverQueues::new(HandoverLimits::default());
        q.push(ip(10), peer(A), &[1; 10], ms(0));
        q.push(ip(10), peer(2), &[2; 10], ms(0));
        q.push(ip(11), peer(A), &[3; 10], ms(0));
        q.discard(ip(10));
        let s = q.status();
        assert_eq!((s.abandoned, s.waiting, s.waiting_bytes), (2, 1, 10));
        assert_eq!(q.addresses().collect::<Vec<_>>(), vec![ip(11)]);
        q.discard(ip(12));
        assert_eq!(q.status().abandoned, 2);
        assert!(!q.has_unsent() && q.pop_unsent().is_none());
    }

    /// This host's own packets for an address that goes elsewhere after all are not dropped:
    /// they wait to be sent by the routes, in arrival order over every address, and time out
    /// like the rest.
    #[test]
    fn this_hosts_packets_for_an_address_not_taken_are_sent_on() {
        let mut q = HandoverQueues::new(limits(100, 100_000, 100_000));
        q.push(ip(10), HOST, &[1; 10], ms(0));
        q.push(ip(11), HOST, &[2; 10], ms(1));
        q.push(ip(10), peer(A), &[3; 10], ms(2));
        q.push(ip(10), HOST, &[4; 10], ms(3));
        q.discard(ip(11));
        q.discard(ip(10));
        let s = q.status();
        assert_eq!((s.abandoned, s.waiting, s.sent_on), (1, 3, 0));
        assert_eq!(q.addresses().count(), 0, "neither address is kept back");
        assert!(q.has_unsent() && !q.has_ready());
        assert_eq!(q.pop_unsent(), Some(vec![1; 10]));
        assert_eq!(q.pop_unsent(), Some(vec![2; 10]));
        q.expire(ms(3003));
        let s = q.status();
        assert_eq!(
            (s.sent_on, s.timed_out, s.waiting, s.waiting_bytes),
            (2, 1, 0, 0)
        );
        assert!(!q.has_unsent());
        assert!(balanced(&q));
    }

    #[test]
    fn every_packet_is_accounted_for() {
        let mut q = HandoverQueues::new(limits(4, 1000, 1500));
        let mut t = 0;
        for round in 0..80u64 {
            for k in 0..(round % 7) {
                let dst = ip(10 + (k % 3) as u8);
                let len = 50 + (k as usize * 37) % 400;
                let sender = [peer(2), peer(1), HOST][(k % 3) as usize];
                q.push(dst, sender, &vec![k as u8; len], ms(t));
                t += 150;
            }
            match round % 7 {
                0 => q.release(ip(10), ms(t)),
                1 => q.discard(ip(11)),
                2 => q.expire(ms(t)),
                3 => q.denied_on_arrival(),
                4 => {
                    if q.pop_ready().is_some() {
                        q.count(Outcome::NotLocal);
                    }
                }
                5 => {
                    q.pop_unsent();
                }
                _ => {
                    if q.pop_ready().is_some() {
                        q.count(Outcome::Released);
                    }
                }
            }
            assert!(balanced(&q), "round {round}: {:?}", q.status());
            assert!(q.total <= 1500 && q.bytes <= q.total, "round {round}");
        }
    }
}
