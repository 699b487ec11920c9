//! Hands an established TCP connection over from one host to another, with the kernel's TCP
//! repair mode (`TCP_REPAIR`, root or `CAP_NET_ADMIN`), so that a workload moved with its
//! address keeps its clients' connections: same ports, same sequence numbers, no reconnect.
//!
//! ```text
//! old host                                   new host (the address already up, or coming)
//! freeze(stream) ─> Frozen ─(any channel)──> restore(&frozen) ─> TcpStream, live
//!   └ Parked: the old socket, silent;         the queues put back, the window and options
//!     discard() once restored (no FIN/RST),   as they were, then out of repair mode (a
//!     or resume() to keep it here             window probe tells the peer to go on)
//! ```
//!
//! What [`freeze`] records: both ends' addresses, the next sequence number to send and to
//! receive, the send queue (bytes sent but not acknowledged, and bytes not sent yet), the
//! receive queue (bytes the application has not read), the MSS, window scaling, SACK,
//! timestamps (the clock's offset, so that the peer's PAWS check passes) and the window.
//! While frozen the old socket sends nothing, but it still takes in and acknowledges what the
//! peer sends (repair mode stops sending, not receiving): [`Parked::state`] reads the state
//! again with that data, for the new host, before it goes live. The peer's retransmits go
//! unanswered until the new host answers, which its TCP takes as a short loss.
//!
//! The application's own state (what it has read but not handled) is the application's to
//! ship. The socket's address must be routed to the new host before the peer's retransmits
//! can reach it: with meshlink, move the workload address ([`restore`] binds with
//! `IP_FREEBIND` and `IP_TRANSPARENT`, so it may run before the address is up).
//!
//! With the feature `agent`, [`handover`] does the rest of a live migration for a TCP server
//! on tokio: the registration with the meshlink agent, shipping the application's state with
//! the frozen connections, and restoring them held at the destination until they go live.
//!
//! All of the crate's `unsafe` is in one module (`sys`): plain socket calls.

#[cfg(feature = "agent")]
pub mod handover;
mod sys;

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, OwnedFd};

use serde::{Deserialize, Serialize};

/// The version of [`Frozen`]'s encoding.
pub const FORMAT_VERSION: u32 = 1;
/// The largest queue [`Frozen::decode`] accepts (a socket's buffers are smaller).
pub const MAX_QUEUE: usize = 64 * 1024 * 1024;

/// Why a connection could not be frozen or restored.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Repair mode needs `CAP_NET_ADMIN`.
    #[error("TCP repair mode needs CAP_NET_ADMIN (run as root): {0}")]
    Permission(io::Error),
    /// Only an established connection can be handed over.
    #[error("the connection is not established (TCP state {0})")]
    NotEstablished(u8),
    /// A socket call failed; `step` names it.
    #[error("{step}: {source}")]
    Socket {
        /// What was being done.
        step: &'static str,
        /// The kernel's answer.
        source: io::Error,
    },
    /// A frozen connection's encoding is not one this version reads, or a field is out of
    /// range; the message names the field.
    #[error("frozen connection: {0}")]
    Invalid(String),
}

fn step(step: &'static str) -> impl FnOnce(io::Error) -> MigrateError {
    move |source| {
        if source.raw_os_error() == Some(libc::EPERM) {
            MigrateError::Permission(source)
        } else {
            MigrateError::Socket { step, source }
        }
    }
}

/// The window as `TCP_REPAIR_WINDOW` gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    /// Sequence number of the segment that last updated the send window.
    pub snd_wl1: u32,
    /// The peer's advertised window.
    pub snd_wnd: u32,
    /// The largest window the peer advertised.
    pub max_window: u32,
    /// Our advertised window.
    pub rcv_wnd: u32,
    /// `rcv_nxt` when our window was last advertised.
    pub rcv_wup: u32,
}

/// An established TCP connection, taken out of its socket: what [`restore`] needs to put it
/// back on another host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frozen {
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// This end's address (the workload's).
    pub local: SocketAddr,
    /// The peer's address.
    pub peer: SocketAddr,
    /// The sequence number after the last byte queued to send.
    pub send_seq: u32,
    /// The next sequence number expected from the peer.
    pub recv_seq: u32,
    /// The send queue: bytes sent and not acknowledged, then bytes not sent yet.
    #[serde(with = "bytes")]
    pub send_queue: Vec<u8>,
    /// How many bytes at the end of `send_queue` were not sent yet.
    pub unsent: usize,
    /// Bytes received and not yet read by the application.
    #[serde(with = "bytes")]
    pub recv_queue: Vec<u8>,
    /// The maximum segment size in use.
    pub mss: u32,
    /// Window scaling (ours to send, the peer's), when negotiated.
    pub window_scale: Option<(u8, u8)>,
    /// Whether SACK was negotiated.
    pub sack: bool,
    /// The TCP timestamp clock (`TCP_TIMESTAMP`), when timestamps were negotiated.
    pub timestamp: Option<u32>,
    /// The window; `None` on kernels before 4.8.
    pub window: Option<Window>,
}

mod bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        let mut hex = String::with_capacity(v.len() * 2);
        for b in v {
            hex.push_str(&format!("{b:02x}"));
        }
        s.serialize_str(&hex)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let hex = String::deserialize(d)?;
        if hex.len() % 2 != 0 || hex.len() / 2 > super::MAX_QUEUE {
            return Err(serde::de::Error::custom(
                "not a hex string of a queue's size",
            ));
        }
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
            .collect::<Result<_, _>>()
            .map_err(serde::de::Error::custom)
    }
}

impl Frozen {
    /// The connection as bytes to ship (JSON).
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a frozen connection always serialises")
    }

    /// A connection shipped by [`Frozen::encode`], checked field by field (it came over a
    /// network).
    ///
    /// # Errors
    /// [`MigrateError::Invalid`] naming the field.
    pub fn decode(bytes: &[u8]) -> Result<Frozen, MigrateError> {
        let f: Frozen = serde_json::from_slice(bytes)
            .map_err(|e| MigrateError::Invalid(format!("not a frozen connection: {e}")))?;
        f.validate()?;
        Ok(f)
    }

    fn validate(&self) -> Result<(), MigrateError> {
        let bad = |field: &str, why: String| Err(MigrateError::Invalid(format!("{field}: {why}")));
        if self.version != FORMAT_VERSION {
            return bad(
                "version",
                format!("{} (this build reads {FORMAT_VERSION})", self.version),
            );
        }
        if self.local.is_ipv4() != self.peer.is_ipv4() {
            return bad("peer", "not of the local address's family".into());
        }
        if self.send_queue.len() > MAX_QUEUE || self.recv_queue.len() > MAX_QUEUE {
            return bad("send_queue", format!("over {MAX_QUEUE} bytes"));
        }
        if self.unsent > self.send_queue.len() {
            return bad(
                "unsent",
                format!(
                    "{} beyond a queue of {}",
                    self.unsent,
                    self.send_queue.len()
                ),
            );
        }
        if !(64..=65_535).contains(&self.mss) {
            return bad("mss", format!("{} out of 64..=65535", self.mss));
        }
        if let Some((snd, rcv)) = self.window_scale {
            if snd > 14 || rcv > 14 {
                return bad("window_scale", format!("({snd}, {rcv}) above 14"));
            }
        }
        Ok(())
    }
}

/// The old host's socket of a frozen connection, in repair mode. It still takes in what the
/// peer sends and acknowledges it, and an acknowledgement that opens the window makes it send
/// data not sent at the freeze (repair mode stops neither): [`Parked::state`] reads it again,
/// with both, for a last word to the new host ([`Held::catch_up`]). Dropped (or [`Parked::discard`]ed) it closes without a FIN or a
/// reset, so the connection lives on where it was restored; [`Parked::resume`] keeps it
/// here instead.
#[derive(Debug)]
pub struct Parked {
    stream: Option<TcpStream>,
    local: SocketAddr,
    peer: SocketAddr,
    /// `tcpi_options` at the freeze, and the window scales.
    options: u8,
    wscale: (u8, u8),
}

impl Parked {
    /// The connection's state now, read again in repair mode (nothing is sent): as frozen,
    /// plus whatever the peer sent since, which the socket took in and acknowledged and the
    /// peer will therefore not send again. A new host that restored an earlier state must
    /// take this one instead (compare `recv_seq`) before it goes live.
    ///
    /// # Errors
    /// The socket call that failed.
    pub fn state(&self) -> Result<Frozen, MigrateError> {
        read_state(self)
    }

    /// Closes the old socket silently: the connection now lives elsewhere.
    pub fn discard(mut self) {
        drop(self.stream.take());
    }

    /// Takes the connection out of repair mode here, as if it had not been frozen (a move
    /// that failed).
    ///
    /// # Errors
    /// When the socket refuses to leave repair mode.
    pub fn resume(mut self) -> Result<TcpStream, MigrateError> {
        let stream = self
            .stream
            .take()
            .expect("parked socket present until taken");
        sys::set_int(stream.as_fd(), sys::TCP_REPAIR, sys::TCP_REPAIR_OFF)
            .map_err(step("leave repair mode"))?;
        Ok(stream)
    }
}

/// Freezes an established connection: the socket enters repair mode (it stops sending) and
/// its state is read out. The socket comes back as [`Parked`].
///
/// # Errors
/// [`MigrateError::Permission`] without `CAP_NET_ADMIN`, [`MigrateError::NotEstablished`],
/// or the socket call that failed (the socket is then taken out of repair mode again).
pub fn freeze(stream: TcpStream) -> Result<(Frozen, Parked), MigrateError> {
    let fd = stream.as_fd();
    let info = sys::info_head(fd).map_err(step("read TCP_INFO"))?;
    if info.state != sys::TCP_ESTABLISHED {
        return Err(MigrateError::NotEstablished(info.state));
    }
    let local = stream.local_addr().map_err(step("local address"))?;
    let peer = stream.peer_addr().map_err(step("peer address"))?;
    sys::set_int(fd, sys::TCP_REPAIR, sys::TCP_REPAIR_ON).map_err(step("enter repair mode"))?;
    let parked = Parked {
        stream: Some(stream),
        local,
        peer,
        options: info.options,
        wscale: (info.snd_wscale, info.rcv_wscale),
    };
    match parked.state() {
        Ok(frozen) => Ok((frozen, parked)),
        Err(e) => {
            // Not frozen after all: the connection goes on here.
            let _ = parked.resume();
            Err(e)
        }
    }
}

/// The largest segment size `TCP_MAXSEG` takes (the kernel's `MAX_TCP_WINDOW`).
const MAX_USER_MSS: i32 = 32767;

/// How many times [`read_state`] reads the queues before it gives up on their settling.
const QUEUE_READS: usize = 16;

/// The send queue's length, how much of it is not sent, the next sequence number to write and
/// the queue; the next sequence number to receive and the receive queue.
type Queues = (usize, usize, u32, Vec<u8>, u32, Vec<u8>);

/// Keeps a held socket from sending data before it goes live: with the send queue selected,
/// the kernel takes what it would transmit as sent without transmitting it (a held socket has
/// nothing unsent in its queue: [`Held`] keeps that apart); with another queue selected, an
/// acknowledgement that opens the window would make it transmit. A parked socket is left
/// with the receive queue selected on purpose: what it then sends reaches the peer at once
/// (selected, it would be counted as sent and wait for a retransmission timeout, and so would
/// its restored copy), and [`Parked::state`] tells the copy.
fn quiet(fd: std::os::fd::BorrowedFd<'_>) -> Result<(), MigrateError> {
    sys::set_int(fd, sys::TCP_REPAIR_QUEUE, sys::TCP_SEND_QUEUE)
        .map_err(step("select the send queue"))
}

/// One reading of a socket's queues, in repair mode; `None` when a queue changed while it
/// was read (a segment or an acknowledgement arrived).
fn queues(fd: std::os::fd::BorrowedFd<'_>) -> Result<Option<Queues>, MigrateError> {
    let outq = sys::outq(fd).map_err(step("send queue length"))?;
    let unsent = sys::outq_not_sent(fd).map_err(step("unsent length"))?;
    let inq = sys::inq(fd).map_err(step("receive queue length"))?;
    sys::set_int(fd, sys::TCP_REPAIR_QUEUE, sys::TCP_SEND_QUEUE)
        .map_err(step("select the send queue"))?;
    let send_seq = sys::get_u32(fd, sys::TCP_QUEUE_SEQ).map_err(step("send sequence"))?;
    let send_queue = sys::peek_queue(fd, outq).map_err(step("read the send queue"))?;
    sys::set_int(fd, sys::TCP_REPAIR_QUEUE, sys::TCP_RECV_QUEUE)
        .map_err(step("select the receive queue"))?;
    let recv_seq = sys::get_u32(fd, sys::TCP_QUEUE_SEQ).map_err(step("receive sequence"))?;
    let recv_queue = sys::peek_queue(fd, inq).map_err(step("read the receive queue"))?;
    if send_queue.len() != outq || recv_queue.len() != inq {
        return Ok(None);
    }
    Ok(Some((
        outq, unsent, send_seq, send_queue, recv_seq, recv_queue,
    )))
}

/// Reads a socket's state in repair mode.
fn read_state(p: &Parked) -> Result<Frozen, MigrateError> {
    let fd = p.stream.as_ref().expect("present until taken").as_fd();
    // The socket still takes in data and acknowledgements while it is read (repair mode stops
    // sending only): the queues and their sequence numbers are read until two readings agree,
    // so that a segment arriving in between cannot leave a sequence number that does not
    // match its queue.
    let mut tries = 0;
    let (outq, unsent, send_seq, send_queue, recv_seq, recv_queue) = loop {
        let readings = (queues(fd)?, queues(fd)?);
        if let (Some(snapshot), Some(again)) = readings {
            if snapshot == again {
                break snapshot;
            }
        }
        tries += 1;
        if tries == QUEUE_READS {
            return Err(MigrateError::Socket {
                step: "read the queues",
                source: io::Error::other(format!("they kept changing over {QUEUE_READS} readings")),
            });
        }
    };
    let mss = sys::get_u32(fd, libc::TCP_MAXSEG).map_err(step("MSS"))?;
    let timestamp = if p.options & sys::TCPI_OPT_TIMESTAMPS != 0 {
        Some(sys::get_u32(fd, sys::TCP_TIMESTAMP).map_err(step("timestamp clock"))?)
    } else {
        None
    };
    let window = match sys::get_window(fd) {
        Ok(w) => Some(Window {
            snd_wl1: w.snd_wl1,
            snd_wnd: w.snd_wnd,
            max_window: w.max_window,
            rcv_wnd: w.rcv_wnd,
            rcv_wup: w.rcv_wup,
        }),
        Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => None,
        Err(e) => return Err(step("window")(e)),
    };
    Ok(Frozen {
        version: FORMAT_VERSION,
        local: p.local,
        peer: p.peer,
        send_seq,
        recv_seq,
        send_queue,
        unsent: unsent.min(outq),
        recv_queue,
        mss,
        window_scale: (p.options & sys::TCPI_OPT_WSCALE != 0).then_some(p.wscale),
        sack: p.options & sys::TCPI_OPT_SACK != 0,
        timestamp,
        window,
    })
}

/// Puts a frozen connection back in a new socket on this host and takes it out of repair
/// mode: the returned stream is the same connection, live (blocking, like a fresh
/// `TcpStream`). The local address may be absent yet (`IP_FREEBIND`); packets reach the
/// socket once it is routed here.
///
/// # Errors
/// [`MigrateError::Invalid`] for a state out of range, [`MigrateError::Permission`] without
/// `CAP_NET_ADMIN`, or the socket call that failed (`step` names it; for example
/// `bind` when the address and port are taken here).
pub fn restore(f: &Frozen) -> Result<TcpStream, MigrateError> {
    restore_held(f)?.go()
}

/// A restored connection still in repair mode: it sends no data and no window probe (and
/// draws no reset) until [`Held::go`] makes it live, or [`Held::discard`] closes it
/// silently. For a destination that must not speak before the address is confirmed to be its
/// own: restore early, go when it is. What reaches it before then is taken in, as by any
/// socket in repair mode, and goes live with it.
#[derive(Debug)]
pub struct Held {
    sock: OwnedFd,
    /// Data the old host had not sent yet: sent as ordinary data once live.
    unsent: Vec<u8>,
    /// The connection's addresses, and the next sequence number to receive as of the
    /// state restored (or caught up to).
    local: SocketAddr,
    peer: SocketAddr,
    recv_seq: u32,
    /// The next sequence number to write (the end of the send queue): the old socket's
    /// must be the same.
    send_seq: u32,
}

impl Held {
    /// Takes in what the old socket did after the state this one was restored from: `last`
    /// is a later state of the same connection ([`Parked::state`] on the old host). Its
    /// receive queue ends with the bytes the old socket took in (and acknowledged)
    /// meanwhile: they go at the end of this socket's receive queue, in place (the socket
    /// never goes away, so a segment arriving meanwhile draws no reset). And a parked socket
    /// that an acknowledgement let send more counts the data not sent at the freeze as sent
    /// (its retransmissions may reach the peer): this socket counts it as sent too, or the
    /// peer's acknowledgements of it would look like acknowledgements of data never sent, and
    /// everything the peer sends would be dropped. Data the peer acknowledged meanwhile
    /// needs nothing: it is sent again once live, and the peer ignores it. Returns how many
    /// bytes were taken in.
    ///
    /// Call it before the connection is routed here: a segment this socket took in already
    /// lies beyond those bytes, and waits (out of order) for the peer's next one.
    ///
    /// # Errors
    /// [`MigrateError::Invalid`] when `last` is another connection's, or older than this
    /// one's state, or says it took in more than its queue holds; or the socket call that
    /// failed.
    pub fn catch_up(&mut self, last: &Frozen) -> Result<usize, MigrateError> {
        if last.local != self.local || last.peer != self.peer {
            return Err(MigrateError::Invalid(format!(
                "local/peer: the last state is of {} to {}, not {} to {}",
                last.local, last.peer, self.local, self.peer
            )));
        }
        if last.send_seq != self.send_seq {
            return Err(MigrateError::Invalid(format!(
                "send_seq: the last state writes at {}, this one at {}",
                last.send_seq, self.send_seq
            )));
        }
        if last.unsent > self.unsent.len() {
            return Err(MigrateError::Invalid(format!(
                "unsent: the last state has {} bytes not sent, more than this one's {}",
                last.unsent,
                self.unsent.len()
            )));
        }
        let fd = self.sock.as_fd();
        let sent = self.unsent.len() - last.unsent;
        if sent > 0 {
            // Written to the send queue in repair mode: counted as sent, not transmitted.
            sys::set_int(fd, sys::TCP_REPAIR_QUEUE, sys::TCP_SEND_QUEUE)
                .map_err(step("select the send queue"))?;
            sys::send_all(fd, &self.unsent[..sent]).map_err(step("write what was sent"))?;
            self.unsent.drain(..sent);
        }
        let late = last.recv_seq.wrapping_sub(self.recv_seq);
        let late = usize::try_from(late).unwrap_or(usize::MAX);
        if late == 0 {
            return Ok(0);
        }
        if late > last.recv_queue.len() {
            return Err(MigrateError::Invalid(format!(
                "recv_seq: the last state is {late} bytes ahead, more than its receive queue ({} bytes), or behind",
                last.recv_queue.len()
            )));
        }
        sys::set_int(fd, sys::TCP_REPAIR_QUEUE, sys::TCP_RECV_QUEUE)
            .map_err(step("select the receive queue"))?;
        sys::send_all(fd, &last.recv_queue[last.recv_queue.len() - late..])
            .map_err(step("write the late data"))?;
        quiet(fd)?;
        self.recv_seq = last.recv_seq;
        Ok(late)
    }

    /// Takes the connection out of repair mode with a window probe (the peer answers with
    /// what it has, and TCP retransmits what it lacks), then sends what the old host had not
    /// sent: the returned stream is the connection, live (blocking).
    ///
    /// # Errors
    /// When the socket refuses to leave repair mode, or the unsent data cannot be queued.
    pub fn go(self) -> Result<TcpStream, MigrateError> {
        let fd = self.sock.as_fd();
        sys::set_int(fd, sys::TCP_REPAIR, sys::TCP_REPAIR_OFF)
            .map_err(step("leave repair mode"))?;
        sys::send_all(fd, &self.unsent).map_err(step("send the unsent data"))?;
        Ok(TcpStream::from(self.sock))
    }

    /// Closes the restored socket without a FIN or a reset: the connection stays where it
    /// was (a move that did not happen).
    pub fn discard(self) {
        drop(self);
    }
}

/// [`restore`], stopping before the connection goes live: see [`Held`].
///
/// # Errors
/// As [`restore`].
pub fn restore_held(f: &Frozen) -> Result<Held, MigrateError> {
    f.validate()?;
    let sock: OwnedFd = sys::tcp_socket(f.local.is_ipv6()).map_err(step("socket"))?;
    let fd = sock.as_fd();
    // SO_REUSEADDR before repair mode: set after, it takes back the forced reuse that repair
    // mode gives, and the bind fails while a listener holds the port.
    sys::set_sol_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1).map_err(step("SO_REUSEADDR"))?;
    // Room for the whole send queue: writing it in repair mode waits for room in the send
    // buffer like any send, and nothing drains a socket in repair mode, so a queue larger
    // than a new socket's buffer (sized by segments: small for a small MSS) would wait for
    // ever, here or in `Held::catch_up`. Forced (the queue may be over `wmem_max`), which
    // also fixes the size for the connection's life: at least 4 MiB (the kernel doubles what
    // it is given), as much as the buffer of a bulk transfer grows to by default.
    let room = f.send_queue.len().saturating_add(64 << 10).max(2 << 20);
    sys::set_sol_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_SNDBUFFORCE,
        libc::c_int::try_from(room).unwrap_or(libc::c_int::MAX / 2),
    )
    .map_err(step("SO_SNDBUFFORCE"))?;
    sys::set_int(fd, sys::TCP_REPAIR, sys::TCP_REPAIR_ON).map_err(step("enter repair mode"))?;
    // The local address need not be on this host yet: FREEBIND lets the socket bind it, and
    // TRANSPARENT lets `connect` route from it (without, the route lookup from a source that
    // is not local fails with ENETUNREACH).
    let (level, freebind, transparent) = if f.local.is_ipv6() {
        (
            libc::IPPROTO_IPV6,
            libc::IPV6_FREEBIND,
            libc::IPV6_TRANSPARENT,
        )
    } else {
        (libc::IPPROTO_IP, libc::IP_FREEBIND, libc::IP_TRANSPARENT)
    };
    sys::set_sol_int(fd, level, freebind, 1).map_err(step("IP_FREEBIND"))?;
    sys::set_sol_int(fd, level, transparent, 1).map_err(step("IP_TRANSPARENT"))?;
    sys::bind(fd, f.local).map_err(step("bind"))?;
    // The queues are written back below, each moving its sequence number forward by its
    // length: start them that much earlier.
    let queue_len = |q: &[u8]| u32::try_from(q.len()).expect("validated below 4 GiB");
    sys::set_int(fd, sys::TCP_REPAIR_QUEUE, sys::TCP_SEND_QUEUE)
        .map_err(step("select the send queue"))?;
    sys::set_u32(
        fd,
        sys::TCP_QUEUE_SEQ,
        f.send_seq.wrapping_sub(queue_len(&f.send_queue)),
    )
    .map_err(step("send sequence"))?;
    sys::set_int(fd, sys::TCP_REPAIR_QUEUE, sys::TCP_RECV_QUEUE)
        .map_err(step("select the receive queue"))?;
    sys::set_u32(
        fd,
        sys::TCP_QUEUE_SEQ,
        f.recv_seq.wrapping_sub(queue_len(&f.recv_queue)),
    )
    .map_err(step("receive sequence"))?;
    if let Some(ts) = f.timestamp {
        sys::set_u32(fd, sys::TCP_TIMESTAMP, ts).map_err(step("timestamp clock"))?;
    }
    // The segment size is worked out at connect, before the options below give the peer's:
    // without this the restored connection could send 536-byte segments (the default). The
    // kernel takes at most MAX_TCP_WINDOW here (loopback's MSS is larger: capped, as the
    // path caps it anyway).
    let mss = i32::try_from(f.mss).unwrap_or(i32::MAX).min(MAX_USER_MSS);
    sys::set_int(fd, libc::TCP_MAXSEG, mss).map_err(step("TCP_MAXSEG"))?;
    // In repair mode, connect sends nothing: the socket is established at once.
    sys::connect(fd, f.peer).map_err(step("connect"))?;
    let mut opts = vec![sys::RepairOpt {
        code: sys::TCPOPT_MSS,
        val: f.mss,
    }];
    if let Some((snd, rcv)) = f.window_scale {
        opts.push(sys::RepairOpt {
            code: sys::TCPOPT_WINDOW,
            val: u32::from(snd) | (u32::from(rcv) << 16),
        });
    }
    if f.sack {
        opts.push(sys::RepairOpt {
            code: sys::TCPOPT_SACK_PERM,
            val: 0,
        });
    }
    if f.timestamp.is_some() {
        opts.push(sys::RepairOpt {
            code: sys::TCPOPT_TIMESTAMP,
            val: 0,
        });
    }
    sys::set_options(fd, &opts).map_err(step("TCP options"))?;
    sys::set_int(fd, sys::TCP_REPAIR_QUEUE, sys::TCP_RECV_QUEUE)
        .map_err(step("select the receive queue"))?;
    sys::send_all(fd, &f.recv_queue).map_err(step("write the receive queue"))?;
    let sent = f.send_queue.len() - f.unsent;
    sys::set_int(fd, sys::TCP_REPAIR_QUEUE, sys::TCP_SEND_QUEUE)
        .map_err(step("select the send queue"))?;
    sys::send_all(fd, &f.send_queue[..sent]).map_err(step("write the send queue"))?;
    if let Some(w) = f.window {
        sys::set_window(
            fd,
            &sys::RepairWindow {
                snd_wl1: w.snd_wl1,
                snd_wnd: w.snd_wnd,
                max_window: w.max_window,
                rcv_wnd: w.rcv_wnd,
                rcv_wup: w.rcv_wup,
            },
        )
        .map_err(step("window"))?;
    }
    Ok(Held {
        sock,
        unsent: f.send_queue[sent..].to_vec(),
        local: f.local,
        peer: f.peer,
        recv_seq: f.recv_seq,
        send_seq: f.send_seq,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Frozen {
        Frozen {
            version: FORMAT_VERSION,
            local: "100.64.5.10:7070".parse().unwrap(),
            peer: "100.64.0.3:40000".parse().unwrap(),
            send_seq: 5,
            recv_seq: u32::MAX - 2,
            send_queue: b"hello".to_vec(),
            unsent: 2,
            recv_queue: vec![0, 255, 7],
            mss: 1380,
            window_scale: Some((7, 7)),
            sack: true,
            timestamp: Some(123_456),
            window: Some(Window {
                snd_wl1: 1,
                snd_wnd: 2,
                max_window: 3,
                rcv_wnd: 4,
                rcv_wup: 5,
            }),
        }
    }

    #[test]
    fn a_frozen_connection_round_trips() {
        let f = sample();
        assert_eq!(Frozen::decode(&f.encode()).unwrap(), f);
    }

    #[test]
    fn bad_fields_are_named() {
        type Spoil = Box<dyn Fn(&mut Frozen)>;
        let cases: Vec<(Spoil, &str)> = vec![
            (Box::new(|f| f.version = 2), "version"),
            (Box::new(|f| f.unsent = 6), "unsent"),
            (Box::new(|f| f.mss = 10), "mss"),
            (Box::new(|f| f.window_scale = Some((15, 0))), "window_scale"),
            (
                Box::new(|f| f.peer = "[fd00::1]:1".parse().unwrap()),
                "peer",
            ),
        ];
        for (spoil, field) in cases {
            let mut f = sample();
            spoil(&mut f);
            let err = Frozen::decode(&f.encode()).unwrap_err().to_string();
            assert!(err.contains(field), "{err} should name {field}");
        }
        let err = Frozen::decode(b"{\"version\":1}").unwrap_err().to_string();
        assert!(err.contains("not a frozen connection"), "{err}");
        let bad_hex = String::from_utf8(sample().encode())
            .unwrap()
            .replace("68656c6c6f", "zz");
        assert!(Frozen::decode(bad_hex.as_bytes()).is_err());
    }
}
