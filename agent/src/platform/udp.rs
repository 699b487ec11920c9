//! The underlay UDP socket: one dual-stack socket with batched, segmentation-offloaded I/O.
//!
//! Sends go out as GSO runs (one system call for up to 64 equal-sized datagrams to one peer);
//! receives use GRO and `recvmmsg`, both through quinn-udp, which probes what the kernel
//! supports. The socket's buffers are raised on purpose: the kernel default (208 KiB) drops
//! datagrams under load, while much larger buffers add queueing delay (see BENCHMARKS.md).
//!
//! The socket can be replaced while the loops run ([`UdpTransport::rebind`]: a new listen
//! port) and its firewall mark changed ([`UdpTransport::set_mark`]); the [`Underlay`] trait is
//! what the agent's reconfiguration needs of it, with a fake in the tests that use it.

use std::io::{self, IoSliceMut};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nix::sys::socket::{setsockopt, sockopt};
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::watch;

use crate::dataplane::NetBatch;

/// Receive and send buffer size asked of the kernel. Measured against 256 KiB, 512 KiB and
/// 1 MiB (with TUN queue lengths 32-500) side by side with wireguard-go: no setting gave a
/// repeatable latency gain under load, and smaller buffers cost throughput (BENCHMARKS.md).
pub const SOCKET_BUFFER: usize = 4 << 20;
/// The most UDP payload one GSO send may carry: the kernel refuses a super-datagram whose
/// IP length would pass 64 KiB.
const MAX_GSO_BYTES: usize = 65_535 - 48 - 8;

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum UdpError {
    /// Another socket holds the port.
    #[error("UDP port {0} is already in use (listen_port)")]
    PortInUse(u16),
    /// Any other failure.
    #[error("cannot open UDP socket on port {port}: {source}")]
    Io {
        /// The port asked for.
        port: u16,
        /// The system's error.
        source: io::Error,
    },
}

/// The agent's UDP socket: the one bound now, replaced as a whole by [`UdpTransport::rebind`].
pub struct UdpTransport {
    /// The socket in use. Senders take it for each batch; the receive loop waits on it and on
    /// its replacement. An old socket closes once the last send that took it returns.
    bound: watch::Sender<Arc<Bound>>,
    /// The firewall mark of the socket in use (0: none); a rebind keeps it. The lock also
    /// serializes rebinds and mark changes.
    mark: Mutex<u32>,
    send_errors: AtomicU64,
}

/// One bound socket and what quinn-udp probed of it.
struct Bound {
    socket: UdpSocket,
    state: UdpSocketState,
    dual_stack: bool,
    port: u16,
}

/// What the agent's reconfiguration (a `wg set` of `listen-port` or `fwmark`) needs of the
/// underlay socket.
pub trait Underlay {
    /// The bound port.
    fn port(&self) -> u16;
    /// The firewall mark of the socket in use (0: none).
    fn mark(&self) -> u32;
    /// Binds `port` (0: any free port) with firewall mark `mark` (0: none) and moves every
    /// send and receive to the new socket; the old one closes. On failure the old socket
    /// stays in use. Returns the port bound.
    ///
    /// # Errors
    /// [`UdpError`] when the new socket cannot be bound.
    fn rebind(&self, port: u16, mark: u32) -> Result<u16, UdpError>;
    /// Sets the firewall mark (`SO_MARK`) of the socket in use; 0 clears it.
    ///
    /// # Errors
    /// The operating system's, e.g. `EPERM` without `CAP_NET_ADMIN`.
    fn set_mark(&self, mark: u32) -> io::Result<()>;
}

fn open(port: u16, v6: bool, fwmark: Option<u32>) -> io::Result<Socket> {
    let (domain, addr): (Domain, SocketAddr) = if v6 {
        (Domain::IPV6, (Ipv6Addr::UNSPECIFIED, port).into())
    } else {
        (Domain::IPV4, ([0, 0, 0, 0], port).into())
    };
    let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if v6 {
        s.set_only_v6(false)?;
    }
    if let Some(mark) = fwmark.filter(|m| *m != 0) {
        s.set_mark(mark)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    // Raise the buffers past net.core.{r,w}mem_max when privileged, else as far as allowed.
    if setsockopt(&s, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
        let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    }
    if setsockopt(&s, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
        let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    }
    Ok(s)
}

impl Bound {
    /// Binds `[::]:port` (dual stack), or `0.0.0.0:port` where IPv6 is unavailable.
    fn open(port: u16, fwmark: Option<u32>) -> Result<Bound, UdpError> {
        let map = |source: io::Error| {
            if source.kind() == io::ErrorKind::AddrInUse {
                UdpError::PortInUse(port)
            } else {
                UdpError::Io { port, source }
            }
        };
        let (sock, dual_stack) = match open(port, true, fwmark) {
            Ok(s) => (s, true),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => return Err(map(e)),
            Err(_) => (open(port, false, fwmark).map_err(map)?, false),
        };
        let std_sock: std::net::UdpSocket = sock.into();
        let state = UdpSocketState::new(UdpSockRef::from(&std_sock)).map_err(map)?;
        let socket = UdpSocket::from_std(std_sock).map_err(map)?;
        let port = socket.local_addr().map_err(map)?.port();
        Ok(Bound {
            socket,
            state,
            dual_stack,
            port,
        })
    }

    fn wire_addr(&self, a: SocketAddr) -> SocketAddr {
        match a {
            SocketAddr::V4(v4) if self.dual_stack => {
                SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
            }
            other => other,
        }
    }
}

impl UdpTransport {
    /// Binds `[::]:port` (dual stack), or `0.0.0.0:port` where IPv6 is unavailable.
    /// Port 0 picks a free port.
    ///
    /// # Errors
    /// [`UdpError::PortInUse`] when the port is taken; [`UdpError::Io`] otherwise.
    pub fn bind(port: u16, fwmark: Option<u32>) -> Result<Self, UdpError> {
        let bound = Bound::open(port, fwmark)?;
        Ok(UdpTransport {
            bound: watch::Sender::new(Arc::new(bound)),
            mark: Mutex::new(fwmark.unwrap_or(0)),
            send_errors: AtomicU64::new(0),
        })
    }

    /// The socket in use.
    fn current(&self) -> Arc<Bound> {
        self.bound.borrow().clone()
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.bound.borrow().port
    }

    /// Datagrams the kernel refused to send since start.
    pub fn send_errors(&self) -> u64 {
        self.send_errors.load(Ordering::Relaxed)
    }

    /// How many datagrams one GSO send may carry.
    pub fn max_gso_segments(&self) -> usize {
        self.bound.borrow().state.max_gso_segments()
    }

    /// How many datagrams one GRO receive may carry.
    pub fn gro_segments(&self) -> usize {
        self.bound.borrow().state.gro_segments()
    }

    /// Sends every datagram of `batch`, in GSO runs. A datagram the kernel refuses (an
    /// unreachable network, say) is dropped, as a router would, and counted.
    pub async fn send_batch(&self, batch: &NetBatch) {
        let b = self.current();
        for (dst, bytes, seg) in batch.runs(b.state.max_gso_segments(), MAX_GSO_BYTES) {
            let segment_size = (bytes.len() > seg).then_some(seg);
            let t = Transmit {
                destination: b.wire_addr(dst),
                ecn: None,
                contents: bytes,
                segment_size,
                src_ip: None,
            };
            loop {
                match b.socket.try_io(Interest::WRITABLE, || {
                    b.state.try_send(UdpSockRef::from(&b.socket), &t)
                }) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if b.socket.writable().await.is_err() {
                            self.send_errors.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(%dst, len = bytes.len(), segment = seg, "udp send: {e}");
                        self.send_errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
        }
    }

    /// Receives one batch of datagrams into `bufs`, returning how many buffers were filled.
    /// Source addresses come back in their plain IPv4 form. A rebind while it waits moves
    /// the wait to the new socket (what was queued on the old one is lost, as a port change
    /// loses it in WireGuard).
    pub async fn recv(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        // Subscribed before the socket is taken, so that no rebind falls in between.
        let mut rebinds = self.bound.subscribe();
        let mut b = rebinds.borrow_and_update().clone();
        loop {
            tokio::select! {
                r = b.socket.readable() => r?,
                r = rebinds.changed() => {
                    if r.is_ok() {
                        b = rebinds.borrow_and_update().clone();
                    }
                    continue;
                }
            }
            match b.socket.try_io(Interest::READABLE, || {
                b.state.recv(UdpSockRef::from(&b.socket), bufs, meta)
            }) {
                Ok(n) => {
                    for m in &mut meta[..n] {
                        m.addr = SocketAddr::new(m.addr.ip().to_canonical(), m.addr.port());
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl Underlay for UdpTransport {
    fn port(&self) -> u16 {
        UdpTransport::port(self)
    }

    fn mark(&self) -> u32 {
        *self.mark.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn rebind(&self, port: u16, mark: u32) -> Result<u16, UdpError> {
        let mut held = self.mark.lock().unwrap_or_else(|e| e.into_inner());
        // The old socket stays bound meanwhile: a failure leaves everything as it was.
        let new = Bound::open(port, Some(mark))?;
        let port = new.port;
        self.bound.send_replace(Arc::new(new));
        *held = mark;
        Ok(port)
    }

    fn set_mark(&self, mark: u32) -> io::Result<()> {
        let mut held = self.mark.lock().unwrap_or_else(|e| e.into_inner());
        socket2::SockRef::from(&self.current().socket).set_mark(mark)?;
        *held = mark;
        Ok(())
    }
}
