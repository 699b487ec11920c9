//! Reusable packet batches that carry the data plane's output to the I/O loops.
//!
//! Both batches keep their buffers between rounds: after warm-up, handling a packet allocates
//! nothing.

use std::net::SocketAddr;

/// Encrypted datagrams waiting to be sent, packed back to back in one buffer so that runs of
/// equal-sized datagrams to one destination can leave in a single GSO send.
pub struct NetBatch {
    buf: Vec<u8>,
    used: usize,
    items: Vec<NetItem>,
}

/// One datagram in a [`NetBatch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetItem {
    /// Where it goes.
    pub dst: SocketAddr,
    /// Offset in the batch buffer.
    pub start: usize,
    /// Length in bytes.
    pub len: usize,
}

impl NetBatch {
    /// A batch with room for `bytes` of datagrams before it must grow.
    pub fn with_capacity(bytes: usize) -> Self {
        NetBatch {
            buf: vec![0; bytes],
            used: 0,
            items: Vec::with_capacity(bytes / 1024 + 1),
        }
    }

    /// Space for the next datagram: at least `need` bytes. Grows the buffer if it must.
    pub fn space(&mut self, need: usize) -> &mut [u8] {
        if self.buf.len() - self.used < need {
            let new_len = (self.buf.len() * 2).max(self.used + need);
            self.buf.resize(new_len, 0);
        }
        &mut self.buf[self.used..]
    }

    /// Records that the first `len` bytes of the last [`space`](Self::space) hold a datagram
    /// for `dst`.
    pub fn commit(&mut self, dst: SocketAddr, len: usize) {
        self.items.push(NetItem {
            dst,
            start: self.used,
            len,
        });
        self.used += len;
    }

    /// Copies `data` in as a datagram for `dst`.
    pub fn push(&mut self, dst: SocketAddr, data: &[u8]) {
        self.space(data.len())[..data.len()].copy_from_slice(data);
        self.commit(dst, data.len());
    }

    /// The datagrams, in order.
    pub fn items(&self) -> &[NetItem] {
        &self.items
    }

    /// The bytes of `item`, or of a run of consecutive items.
    pub fn bytes(&self, start: usize, len: usize) -> &[u8] {
        &self.buf[start..start + len]
    }

    /// Bytes held.
    pub fn used(&self) -> usize {
        self.used
    }

    /// True when no datagram is held.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Empties the batch, keeping its buffers.
    pub fn clear(&mut self) {
        self.items.clear();
        self.used = 0;
    }

    /// Splits the batch into sends: each run is consecutive datagrams to one destination, all
    /// of one size except perhaps a shorter last one, at most `max_segments` long and at most
    /// `max_bytes` in all (a single datagram may exceed it). Returns (destination, bytes,
    /// segment size).
    pub fn runs(&self, max_segments: usize, max_bytes: usize) -> Runs<'_> {
        Runs {
            batch: self,
            next: 0,
            max_segments: max_segments.max(1),
            max_bytes,
        }
    }
}

/// Iterator over GSO-able runs of a [`NetBatch`].
pub struct Runs<'a> {
    batch: &'a NetBatch,
    next: usize,
    max_segments: usize,
    max_bytes: usize,
}

impl<'a> Iterator for Runs<'a> {
    type Item = (SocketAddr, &'a [u8], usize);

    fn next(&mut self) -> Option<Self::Item> {
        let items = &self.batch.items;
        let first = *items.get(self.next)?;
        let mut end = self.next + 1;
        let mut total = first.len;
        while end < items.len() && end - self.next < self.max_segments {
            let it = items[end];
            let prev = items[end - 1];
            if it.dst != first.dst
                || it.len > first.len
                || prev.len != first.len
                || it.start != prev.start + prev.len
                || total + it.len > self.max_bytes
            {
                break;
            }
            total += it.len;
            end += 1;
        }
        self.next = end;
        Some((
            first.dst,
            &self.batch.buf[first.start..first.start + total],
            first.len,
        ))
    }
}

/// Decrypted IP packets waiting to be written to the TUN device. Every packet sits in its own
/// buffer after `headroom` bytes, where the TUN offload header goes.
pub struct TunBatch {
    bufs: Vec<Vec<u8>>,
    count: usize,
    urgent: bool,
    headroom: usize,
    packet_room: usize,
}

impl TunBatch {
    /// A batch of `slots` buffers, each with `headroom` bytes before the packet and room for
    /// `packet_room` bytes of packet.
    pub fn new(slots: usize, headroom: usize, packet_room: usize) -> Self {
        let bufs = (0..slots)
            .map(|_| Vec::with_capacity(headroom + packet_room))
            .collect();
        TunBatch {
            bufs,
            count: 0,
            urgent: false,
            headroom,
            packet_room,
        }
    }

    /// The next free packet slot.
    pub fn slot(&mut self) -> &mut [u8] {
        if self.count == self.bufs.len() {
            self.bufs
                .push(Vec::with_capacity(self.headroom + self.packet_room));
        }
        let b = &mut self.bufs[self.count];
        b.resize(self.headroom + self.packet_room, 0);
        &mut b[self.headroom..]
    }

    /// The first `len` bytes of the last [`slot`](Self::slot), not kept as a packet (the next
    /// `slot` reuses the room).
    pub fn uncommitted(&self, len: usize) -> &[u8] {
        &self.bufs[self.count][self.headroom..self.headroom + len]
    }

    /// Keeps the first `len` bytes of the last [`slot`](Self::slot) as a packet.
    pub fn commit(&mut self, len: usize) {
        self.bufs[self.count].truncate(self.headroom + len);
        self.count += 1;
    }

    /// Marks the batch as holding a packet that should not wait for the rest of a receive
    /// batch (see `Device::inbound`).
    pub fn mark_urgent(&mut self) {
        self.urgent = true;
    }

    /// Whether a packet that should be written at once is held.
    pub fn is_urgent(&self) -> bool {
        self.urgent
    }

    /// Forgets the urgent mark (the packets stay).
    pub fn clear_urgent(&mut self) {
        self.urgent = false;
    }

    /// The `i`th packet held, without headroom.
    pub fn packet(&self, i: usize) -> &[u8] {
        &self.bufs[i][self.headroom..]
    }

    /// Keeps only the first `len` packets.
    pub fn truncate(&mut self, len: usize) {
        self.count = self.count.min(len);
    }

    /// Appends a copy of `packet`, whole: a packet longer than the batch's room (one kept back
    /// at a handover before the interface's MTU was lowered) gets a slot grown to fit it,
    /// never a cut copy, which would reach the TUN device as a broken IP packet (and could
    /// make the kernel refuse the whole batch).
    pub fn push_copy(&mut self, packet: &[u8]) {
        let slot = self.slot();
        if let Some(slot) = slot.get_mut(..packet.len()) {
            slot.copy_from_slice(packet);
        } else {
            let b = &mut self.bufs[self.count];
            b.truncate(self.headroom);
            b.extend_from_slice(packet);
        }
        self.commit(packet.len());
    }

    /// Packets the batch takes before it grows.
    pub fn free(&self) -> usize {
        self.bufs.len() - self.count
    }

    /// Number of packets held.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True when no packet is held.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// True when the preallocated slots are used up.
    pub fn is_full(&self) -> bool {
        self.count >= self.bufs.len()
    }

    /// The headroom before each packet.
    pub fn headroom(&self) -> usize {
        self.headroom
    }

    /// The held packets' buffers (headroom included), for a batched TUN write.
    pub fn buffers_mut(&mut self) -> &mut [Vec<u8>] {
        &mut self.bufs[..self.count]
    }

    /// The held packets, without headroom.
    pub fn packets(&self) -> impl Iterator<Item = &[u8]> {
        self.bufs[..self.count].iter().map(|b| &b[self.headroom..])
    }

    /// Empties the batch, keeping its buffers.
    pub fn clear(&mut self) {
        self.count = 0;
        self.urgent = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], p))
    }

    #[test]
    fn runs_group_equal_sizes_to_one_destination() {
        let mut b = NetBatch::with_capacity(16);
        for len in [100, 100, 100, 60, 100, 100] {
            b.push(addr(1), &vec![1; len]);
        }
        b.push(addr(2), &[2; 100]);
        let runs: Vec<_> = b
            .runs(64, 65000)
            .map(|(d, bytes, seg)| (d, bytes.len(), seg))
            .collect();
        assert_eq!(
            runs,
            vec![
                (addr(1), 360, 100),
                (addr(1), 200, 100),
                (addr(2), 100, 100)
            ]
        );
        let capped: Vec<_> = b.runs(2, 65000).map(|(_, bytes, _)| bytes.len()).collect();
        assert_eq!(capped, vec![200, 160, 200, 100]);
        let by_bytes: Vec<_> = b.runs(64, 250).map(|(_, bytes, _)| bytes.len()).collect();
        assert_eq!(by_bytes, vec![200, 160, 200, 100]);
    }

    #[test]
    fn tun_batch_reuses_slots() {
        let mut t = TunBatch::new(1, 10, 100);
        t.slot()[..3].copy_from_slice(&[1, 2, 3]);
        t.commit(3);
        assert!(t.is_full());
        t.slot()[0] = 9;
        t.commit(1);
        assert_eq!(
            t.packets().collect::<Vec<_>>(),
            vec![&[1, 2, 3][..], &[9][..]]
        );
        assert_eq!(t.buffers_mut()[0].len(), 13);
        t.clear();
        assert!(t.is_empty());
    }

    #[test]
    fn a_copied_packet_is_never_cut() {
        let mut t = TunBatch::new(2, 10, 100);
        assert_eq!(t.free(), 2);
        let long: Vec<u8> = (0..250u32).map(|i| i as u8).collect();
        t.push_copy(&[7; 40]);
        t.push_copy(&long);
        assert_eq!(t.free(), 0);
        assert_eq!(t.packet(0), &[7; 40][..]);
        assert_eq!(t.packet(1), &long[..], "whole, longer than the room");
        assert_eq!(t.buffers_mut()[1].len(), 10 + 250, "headroom kept");
        t.clear();
        // The grown slot serves a packet of the usual room again.
        t.push_copy(&[1; 20]);
        t.push_copy(&[2; 100]);
        assert_eq!(
            t.packets().collect::<Vec<_>>(),
            vec![&[1; 20][..], &[2; 100][..]]
        );
    }
}
