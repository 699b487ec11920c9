//! The underlay UDP socket: one dual-stack socket with batched, segmentation-offloaded I/O.
//!
//! Sends go out as GSO runs (one system call for up to 64 equal-sized datagrams to one peer);
//! receives use GRO and `recvmmsg`, both through quinn-udp, which probes what the kernel
//! supports. The socket's buffers are raised on purpose: the kernel default (208 KiB) drops
//! datagrams under load, while much larger buffers add queueing delay (see BENCHMARKS.md).

use std::io::{self, IoSliceMut};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::sys::socket::{setsockopt, sockopt};
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;

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

/// The agent's UDP socket.
pub struct UdpTransport {
    socket: UdpSocket,
    state: UdpSocketState,
    dual_stack: bool,
    port: u16,
    send_errors: AtomicU64,
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

impl UdpTransport {
    /// Binds `[::]:port` (dual stack), or `0.0.0.0:port` where IPv6 is unavailable.
    /// Port 0 picks a free port.
    ///
    /// # Errors
    /// [`UdpError::PortInUse`] when the port is taken; [`UdpError::Io`] otherwise.
    pub fn bind(port: u16, fwmark: Option<u32>) -> Result<Self, UdpError> {
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
        Ok(UdpTransport {
            socket,
            state,
            dual_stack,
            port,
            send_errors: AtomicU64::new(0),
        })
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Datagrams the kernel refused to send since start.
    pub fn send_errors(&self) -> u64 {
        self.send_errors.load(Ordering::Relaxed)
    }

    /// How many datagrams one GSO send may carry.
    pub fn max_gso_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// How many datagrams one GRO receive may carry.
    pub fn gro_segments(&self) -> usize {
        self.state.gro_segments()
    }

    fn wire_addr(&self, a: SocketAddr) -> SocketAddr {
        match a {
            SocketAddr::V4(v4) if self.dual_stack => {
                SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
            }
            other => other,
        }
    }

    /// Sends every datagram of `batch`, in GSO runs. A datagram the kernel refuses (an
    /// unreachable network, say) is dropped, as a router would, and counted.
    pub async fn send_batch(&self, batch: &NetBatch) {
        for (dst, bytes, seg) in batch.runs(self.max_gso_segments(), MAX_GSO_BYTES) {
            let segment_size = (bytes.len() > seg).then_some(seg);
            let t = Transmit {
                destination: self.wire_addr(dst),
                ecn: None,
                contents: bytes,
                segment_size,
                src_ip: None,
            };
            loop {
                match self.socket.try_io(Interest::WRITABLE, || {
                    self.state.try_send(UdpSockRef::from(&self.socket), &t)
                }) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if self.socket.writable().await.is_err() {
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
    /// Source addresses come back in their plain IPv4 form.
    pub async fn recv(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        loop {
            self.socket.readable().await?;
            match self.socket.try_io(Interest::READABLE, || {
                self.state.recv(UdpSockRef::from(&self.socket), bufs, meta)
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
