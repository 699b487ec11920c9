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

/// The largest IP packet: what one coalesced TUN write may carry.
pub const MAX_COALESCED: usize = 65_535;

/// Decrypted IP packets waiting to be written to the TUN device. Every packet sits in its own
/// buffer after `headroom` bytes, where the TUN offload header goes.
pub struct TunBatch {
    bufs: Vec<Vec<u8>>,
    count: usize,
    urgent: bool,
    headroom: usize,
    packet_room: usize,
    /// The capacity each buffer is allocated with.
    capacity: usize,
}

impl TunBatch {
    /// A batch of `slots` buffers, each with `headroom` bytes before the packet and room for
    /// `packet_room` bytes of packet.
    pub fn new(slots: usize, headroom: usize, packet_room: usize) -> Self {
        Self::with_buffer_capacity(slots, headroom, packet_room, headroom + packet_room)
    }

    /// A batch written to a TUN device with offload, whose write coalesces the segments of
    /// a TCP flow into one super-packet in the buffer of the first (tun-rs's GRO, as
    /// wireguard-go's): every buffer can hold a whole coalesced packet and the headroom
    /// twice, which the coalescing asks of a buffer before it grows one. With buffers the
    /// size of one packet nothing is coalesced: the kernel then takes every segment through
    /// its stack alone, and the receiving TCP acknowledges each.
    pub fn for_coalescing(slots: usize, headroom: usize, packet_room: usize) -> Self {
        let capacity = (2 * headroom + MAX_COALESCED).max(headroom + packet_room);
        Self::with_buffer_capacity(slots, headroom, packet_room, capacity)
    }

    fn with_buffer_capacity(
        slots: usize,
        headroom: usize,
        packet_room: usize,
        capacity: usize,
    ) -> Self {
        let bufs = (0..slots).map(|_| Vec::with_capacity(capacity)).collect();
        TunBatch {
            bufs,
            count: 0,
            urgent: false,
            headroom,
            packet_room,
            capacity,
        }
    }

    /// The next free packet slot.
    pub fn slot(&mut self) -> &mut [u8] {
        if self.count == self.bufs.len() {
            self.bufs.push(Vec::with_capacity(self.capacity));
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

#[cfg(test)]
mod coalescing {
    use super::*;

    const HEADROOM: usize = tun_rs::VIRTIO_NET_HDR_LEN;

    fn fold(mut sum: u32) -> u16 {
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    fn sum16(bytes: &[u8]) -> u32 {
        bytes
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
            .sum()
    }

    /// A full-size TCP segment of one flow (ACK set), checksums correct.
    fn segment(seq: u32, payload: usize) -> Vec<u8> {
        let total = 20 + 20 + payload;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[6] = 0x40; // don't fragment
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[100, 64, 0, 1]);
        p[16..20].copy_from_slice(&[100, 64, 0, 2]);
        let ip = fold(sum16(&p[..20]));
        p[10..12].copy_from_slice(&ip.to_be_bytes());
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&5201u16.to_be_bytes());
        p[24..28].copy_from_slice(&seq.to_be_bytes());
        p[32] = 5 << 4;
        p[33] = 0x10; // ACK
        p[34..36].copy_from_slice(&512u16.to_be_bytes());
        for (i, b) in p[40..].iter_mut().enumerate() {
            *b = (seq as usize + i) as u8;
        }
        let pseudo = sum16(&p[12..20]) + 6 + (total as u32 - 20);
        let tcp = fold(pseudo + sum16(&p[20..]));
        p[36..38].copy_from_slice(&tcp.to_be_bytes());
        p
    }

    /// How many writes tun-rs's GRO leaves of `count` consecutive segments of one flow.
    fn writes(mut batch: TunBatch, count: u32) -> usize {
        let mss = 1380;
        for i in 0..count {
            batch.push_copy(&segment(1000 + i * mss as u32, mss));
        }
        let mut to_write = Vec::new();
        tun_rs::handle_gro(
            batch.buffers_mut(),
            HEADROOM,
            &mut Default::default(),
            &mut Default::default(),
            false,
            &mut to_write,
        )
        .expect("gro");
        to_write.len()
    }

    #[test]
    fn a_flows_segments_coalesce_into_few_writes() {
        // 44 segments of 1,380 bytes: 60,720 bytes, one super-packet.
        let n = writes(TunBatch::for_coalescing(128, HEADROOM, 2048), 44);
        assert_eq!(n, 1, "one write for the whole run");
        // 100 segments: as few writes as 64 KiB super-packets allow.
        let n = writes(TunBatch::for_coalescing(128, HEADROOM, 2048), 100);
        assert!(n <= 3, "{n} writes");
    }

    #[test]
    fn buffers_of_one_packet_coalesce_nothing() {
        // Why `for_coalescing` exists: tun-rs refuses to grow a buffer past its capacity.
        assert_eq!(writes(TunBatch::new(128, HEADROOM, 2048), 44), 44);
    }
}
