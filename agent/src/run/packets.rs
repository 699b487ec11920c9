//! The packet loops: TUN to UDP (encrypt, GSO sends), UDP to TUN (GRO receive, decrypt,
//! coalesced writes, packets kept back at handovers), and the data plane's timers.

use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn_udp::RecvMeta;
use tokio::sync::Notify;
use tracing::{debug, info};

use crate::control::discovery::Discovery;
use crate::dataplane::{Device, NetBatch, TunBatch};
use crate::platform::tun::{Tun, HEADROOM, IDEAL_BATCH_SIZE};
use crate::platform::udp::UdpTransport;

use super::RunError;

/// What a TUN read error means: the interface deleted (`EBADFD`: the device was detached), or
/// a failure to report.
pub(super) fn tun_read_error(interface: &str, source: std::io::Error) -> RunError {
    if source.raw_os_error() == Some(libc::EBADFD) {
        RunError::InterfaceDeleted(interface.to_string())
    } else {
        RunError::TunRead {
            interface: interface.to_string(),
            source,
        }
    }
}

/// The room for one packet read from the TUN device at `mtu`: the MTU (at least IPv6's
/// minimum) with some slack.
pub(super) fn tun_packet_room(mtu: u16) -> usize {
    usize::from(mtu).max(1280) + 128
}

/// The room for one decrypted packet before it is written to the TUN device at `mtu`.
pub(super) fn decrypted_packet_room(mtu: u16) -> usize {
    tun_packet_room(mtu).max(2048)
}

/// The send loop: what this host writes to the TUN device, encrypted to its peers. A packet
/// it keeps back for a workload address moving here (see `Device::take_kept_from_host`)
/// wakes the receive loop through `kept`, which delivers it once the address may be answered.
pub(super) async fn tun_to_udp(
    device: Arc<Device>,
    tun: Arc<Tun>,
    udp: Arc<UdpTransport>,
    interface: String,
    kept: Arc<Notify>,
) -> Result<(), RunError> {
    let slots = IDEAL_BATCH_SIZE;
    let mut original = vec![0u8; HEADROOM + 65536];
    // The packet buffers follow the interface's MTU (see `timers`).
    let mut mtu = tun.mtu();
    let mut bufs: Vec<Vec<u8>> = (0..slots)
        .map(|_| vec![0u8; tun_packet_room(mtu)])
        .collect();
    let mut sizes = vec![0usize; slots];
    let mut net = NetBatch::with_capacity(slots * (usize::from(mtu) + 64));
    loop {
        if tun.mtu() != mtu {
            mtu = tun.mtu();
            for b in &mut bufs {
                b.resize(tun_packet_room(mtu), 0);
            }
        }
        let n = match tun.recv(&mut original, &mut bufs, &mut sizes).await {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                if e.raw_os_error().is_some() {
                    return Err(tun_read_error(&interface, e));
                }
                // A malformed offload frame affects one read only; a packet longer than the
                // buffers means the MTU was raised since it was last read.
                debug!("tun read: {e}");
                let _ = tun.refresh_mtu();
                continue;
            }
        };
        device.outbound_batch(
            bufs[..n].iter().zip(&sizes[..n]).map(|(b, s)| &b[..*s]),
            &mut net,
        );
        if device.take_kept_from_host() {
            kept.notify_one();
        }
        if !net.is_empty() {
            udp.send_batch(&net).await;
            net.clear();
        }
    }
}

/// Datagrams up to this size are taken ahead of a receive batch's bulk (see `udp_to_tun`):
/// a ping's (84-byte IP packet, padded to 96, plus 32 bytes of WireGuard) fits, a full TCP
/// segment does not.
pub(super) const SMALL_DATAGRAM: usize = 160;

/// What of one received entry (`len` bytes of datagrams `stride` apart, GRO) is small enough
/// to go ahead of the bulk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ahead {
    /// The entry is one small datagram (or several).
    Whole,
    /// A GRO train that ends with one short datagram, starting at this offset.
    LastSegment(usize),
    /// Nothing.
    Nothing,
}

pub(super) fn ahead(len: usize, stride: usize) -> Ahead {
    let stride = stride.max(1);
    if len <= SMALL_DATAGRAM {
        return Ahead::Whole;
    }
    let last = len % stride;
    if len > stride && last != 0 && last <= SMALL_DATAGRAM {
        Ahead::LastSegment(len - last)
    } else {
        Ahead::Nothing
    }
}

pub(super) async fn udp_to_tun(
    device: Arc<Device>,
    tun: Arc<Tun>,
    udp: Arc<UdpTransport>,
    discovery: Option<Arc<Discovery>>,
    kept: Arc<Notify>,
) -> Result<(), RunError> {
    // Discovery datagrams share the socket with WireGuard's; they go to the discovery task
    // (without it, to the device, which counts them as malformed).
    let wireguard = |from: SocketAddr, d: &[u8]| match &discovery {
        Some(disc) if meshlink_proto::disco::is_disco(d) => {
            disc.deliver(from, d);
            false
        }
        _ => true,
    };
    const SLOT: usize = 65536;
    let batch = quinn_udp::BATCH_SIZE.max(1);
    let mut storage = vec![0u8; SLOT * batch];
    let mut meta = vec![RecvMeta::default(); batch];
    // The packet slots follow the interface's MTU (see `timers`).
    let mut mtu = tun.mtu();
    // Written with offload: a TCP flow's segments leave as one super-packet (see
    // `TunBatch::for_coalescing`).
    let mut tun_batch =
        TunBatch::for_coalescing(IDEAL_BATCH_SIZE, HEADROOM, decrypted_packet_room(mtu));
    // Packets of small datagrams, decrypted ahead of their batch (see below).
    let mut early = TunBatch::new(batch * 4, HEADROOM, decrypted_packet_room(mtu));
    let mut net = NetBatch::with_capacity(16 * 1024);
    let mut gro = tun_rs::GROTable::default();
    loop {
        if tun.mtu() != mtu {
            // Both batches are empty here: each round writes out what it decrypted.
            mtu = tun.mtu();
            tun_batch =
                TunBatch::for_coalescing(IDEAL_BATCH_SIZE, HEADROOM, decrypted_packet_room(mtu));
            early = TunBatch::new(batch * 4, HEADROOM, decrypted_packet_room(mtu));
        }
        let n = {
            let mut slices: Vec<IoSliceMut<'_>> =
                storage.chunks_mut(SLOT).map(IoSliceMut::new).collect();
            tokio::select! {
                biased;
                // Packets kept back at a handover: delivered here, between two receive
                // batches, so that nothing decrypted later overtakes them (this loop is the
                // TUN device's one writer), in this loop's batch (sized from the MTU). The
                // receive is cancel-safe: a datagram is taken only when it completes.
                () = kept.notified() => {
                    deliver_kept(&device, &tun, &udp, &mut gro, &mut tun_batch, &mut net).await;
                    continue;
                }
                r = udp.recv(&mut slices, &mut meta) => match r {
                    Ok(n) => n,
                    Err(e) => {
                        debug!("udp receive: {e}");
                        continue;
                    }
                },
            }
        };
        // Small datagrams are decrypted first (a ping is 128 bytes on the wire, a full TCP
        // segment 1,452): under load a batch holds hundreds of kilobytes of bulk data that a
        // ping would otherwise wait for. What they carry goes to the TUN device at once when
        // it is not TCP (pings, DNS, real-time UDP); small TCP segments (ACKs, a flow's short
        // last segment) keep their place after the datagrams received before them, so no TCP
        // flow is reordered. WireGuard's replay window takes the counters out of order.
        let mut early_of = [(0usize, 0usize); quinn_udp::BATCH_SIZE];
        let mut rest_of = [0usize; quinn_udp::BATCH_SIZE];
        early.clear();
        for (i, m) in meta[..n].iter().enumerate() {
            let data = &storage[i * SLOT..i * SLOT + m.len];
            let stride = m.stride.max(1);
            let (small, rest) = match ahead(data.len(), stride) {
                Ahead::Whole => (data, 0),
                Ahead::LastSegment(at) => (&data[at..], data.len().div_ceil(stride) - 1),
                Ahead::Nothing => {
                    rest_of[i] = data.len().div_ceil(stride);
                    continue;
                }
            };
            rest_of[i] = rest;
            let start = early.len();
            early.clear_urgent();
            device.inbound_batch(
                m.addr,
                small.chunks(stride).filter(|d| wireguard(m.addr, d)),
                &mut early,
                &mut net,
            );
            if early.is_urgent() {
                for k in start..early.len() {
                    tun_batch.push_copy(early.packet(k));
                }
                early.truncate(start);
            }
            early_of[i] = (start, early.len());
        }
        if !tun_batch.is_empty() {
            flush_tun(&tun, &mut gro, &mut tun_batch).await;
        }
        for (i, m) in meta[..n].iter().enumerate() {
            let data = &storage[i * SLOT..i * SLOT + m.len];
            let stride = m.stride.max(1);
            if rest_of[i] > 0 {
                device.inbound_batch(
                    m.addr,
                    data.chunks(stride)
                        .take(rest_of[i])
                        .filter(|d| wireguard(m.addr, d)),
                    &mut tun_batch,
                    &mut net,
                );
            }
            let (from, to) = early_of[i];
            for k in from..to {
                tun_batch.push_copy(early.packet(k));
            }
            if tun_batch.is_urgent() || tun_batch.len() + 64 >= IDEAL_BATCH_SIZE {
                flush_tun(&tun, &mut gro, &mut tun_batch).await;
            }
        }
        flush_tun(&tun, &mut gro, &mut tun_batch).await;
        if !net.is_empty() {
            udp.send_batch(&net).await;
            net.clear();
        }
    }
}

/// Writes the packets kept back for workload addresses that may be answered now to the TUN
/// device, a batch at a time (see `Device::take_released`), and sends on this host's own for
/// addresses that went elsewhere; `batch` and `net` are empty before and after, and `batch`
/// does not grow.
pub(super) async fn deliver_kept(
    device: &Device,
    tun: &Tun,
    udp: &UdpTransport,
    gro: &mut tun_rs::GROTable,
    batch: &mut TunBatch,
    net: &mut NetBatch,
) {
    let mut n = 0;
    while device.has_released() {
        n += device.take_released(batch, net);
        flush_tun(tun, gro, batch).await;
        if !net.is_empty() {
            udp.send_batch(net).await;
            net.clear();
        }
    }
    if n > 0 {
        debug!(packets = n, "packets kept back at a handover delivered");
    }
}

pub(super) async fn flush_tun(tun: &Tun, gro: &mut tun_rs::GROTable, batch: &mut TunBatch) {
    if batch.is_empty() {
        return;
    }
    if let Err(e) = tun.send(gro, batch).await {
        debug!("tun write: {e}");
    }
    batch.clear();
}

pub(super) async fn timers(
    device: Arc<Device>,
    udp: Arc<UdpTransport>,
    tun: Arc<Tun>,
) -> Result<(), RunError> {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut net = NetBatch::with_capacity(4096);
    let mut n: u64 = 0;
    // The data plane's connection table counts time from here.
    let start = Instant::now();
    loop {
        tick.tick().await;
        device.set_time(start.elapsed());
        // wg-quick sets the MTU after starting the agent (`ip link set mtu`): the packet
        // loops follow it within a tick.
        if let Ok((before, now)) = tun.refresh_mtu() {
            if before != now {
                info!(
                    from = before,
                    to = now,
                    "interface MTU changed; packet buffers follow"
                );
            }
        }
        n += 1;
        if n.is_multiple_of(4) {
            device.reset_handshake_limiter();
        }
        device.handle_timeout(&mut net);
        if !net.is_empty() {
            udp.send_batch(&net).await;
            net.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_detached_tun_device_means_the_interface_was_deleted() {
        let e = tun_read_error("wg0", std::io::Error::from_raw_os_error(libc::EBADFD));
        assert!(
            matches!(&e, RunError::InterfaceDeleted(i) if i == "wg0"),
            "{e}"
        );
        let e = tun_read_error("wg0", std::io::Error::from_raw_os_error(libc::EIO));
        assert!(
            matches!(&e, RunError::TunRead { interface, .. } if interface == "wg0"),
            "{e}"
        );
        assert!(e.to_string().contains("wg0"), "{e}");
    }

    #[test]
    fn packet_buffers_follow_the_mtu() {
        assert_eq!(tun_packet_room(1420), 1548);
        assert_eq!(tun_packet_room(576), 1408, "at least IPv6's minimum");
        assert_eq!(decrypted_packet_room(1420), 2048);
        assert!(decrypted_packet_room(9000) >= 9000 && tun_packet_room(65535) >= 65535);
    }

    #[test]
    fn small_datagrams_and_short_train_tails_go_ahead() {
        assert_eq!(ahead(128, 128), Ahead::Whole, "a ping");
        assert_eq!(ahead(96, 96), Ahead::Whole, "a TCP ACK");
        assert_eq!(ahead(1452, 1452), Ahead::Nothing, "a full segment");
        assert_eq!(
            ahead(1452 * 3, 1452),
            Ahead::Nothing,
            "a train of full segments"
        );
        assert_eq!(
            ahead(1452 * 3 + 128, 1452),
            Ahead::LastSegment(1452 * 3),
            "a train ending in a ping"
        );
        assert_eq!(
            ahead(1452 * 3 + 700, 1452),
            Ahead::Nothing,
            "a train ending in a bulk tail"
        );
        assert_eq!(ahead(0, 0), Ahead::Whole);
    }
}
