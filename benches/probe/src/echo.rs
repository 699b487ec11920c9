//! The echo responder: answers every probe with the probe and its own name, from the
//! address the probe was sent to.
//!
//! Why that source address matters: the prober's socket is connected to the workload address,
//! so the kernel gives it only datagrams from that address. A socket bound to `0.0.0.0` would
//! otherwise answer from whatever address the route back prefers (often the VM's own overlay
//! address, not the workload address it holds). The responder reads each probe's destination
//! (`IP_PKTINFO`, through quinn-udp, which the agent uses for the same job) and sends the
//! answer from it. Bound to one address, it answers from that address anyway.

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};

use crate::wire::{Answer, Name, PROBE_LEN};

/// How often a waiting responder looks at its stop flag.
const POLL: Duration = Duration::from_millis(50);

/// A bound responder.
#[derive(Debug)]
pub struct Echo {
    socket: UdpSocket,
    state: UdpSocketState,
    name: Name,
}

impl Echo {
    /// Binds the responder to `addr`; it will answer as `name`.
    ///
    /// # Errors
    /// When the socket cannot be bound or set up.
    pub fn bind(addr: SocketAddr, name: Name) -> io::Result<Echo> {
        let socket = UdpSocket::bind(addr)?;
        // Asks for each datagram's destination address, among other things.
        let state = UdpSocketState::new((&socket).into())?;
        // quinn-udp makes the socket non-blocking; this responder blocks on it, one datagram
        // at a time, waking up every POLL.
        socket.set_nonblocking(false)?;
        socket.set_read_timeout(Some(POLL))?;
        Ok(Echo {
            socket,
            state,
            name,
        })
    }

    /// The bound address (with the port chosen when bound to port 0).
    ///
    /// # Errors
    /// As `getsockname`.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Answers probes until `stop` is set (seen within 50 ms); returns how many were answered.
    /// Datagrams that are not probes are ignored, and so are failures to send an answer: the
    /// prober counts those probes as lost.
    ///
    /// # Errors
    /// When receiving fails for a reason other than a timeout, an interruption or an ICMP
    /// error reported on the socket.
    pub fn serve(&self, stop: &AtomicBool) -> io::Result<u64> {
        // Room for a GRO batch: the kernel may hand over many datagrams from one sender at once.
        let mut buf = vec![0u8; 1 << 16];
        let mut answer = Vec::with_capacity(PROBE_LEN + crate::wire::MAX_NAME);
        let mut answered = 0;
        while !stop.load(Ordering::Relaxed) {
            let mut meta = [RecvMeta::default()];
            // One buffer: the blocking `recvmmsg` underneath waits for as many datagrams as
            // there are buffers.
            let received = self.state.recv(
                (&self.socket).into(),
                &mut [IoSliceMut::new(&mut buf)],
                &mut meta,
            );
            match received {
                Ok(_) => {}
                Err(e) if is_transient(&e) => continue,
                Err(e) => return Err(e),
            }
            let [meta] = meta;
            let stride = if meta.stride == 0 {
                meta.len
            } else {
                meta.stride
            };
            for datagram in buf[..meta.len].chunks(stride.max(1)) {
                let Ok(probe) = <&[u8; PROBE_LEN]>::try_from(datagram) else {
                    continue;
                };
                answer.clear();
                Answer::encode(probe, &self.name, &mut answer);
                let transmit = Transmit {
                    destination: meta.addr,
                    ecn: None,
                    contents: &answer,
                    segment_size: None,
                    src_ip: meta.dst_ip,
                };
                if self
                    .state
                    .try_send((&self.socket).into(), &transmit)
                    .is_ok()
                {
                    answered += 1;
                }
            }
        }
        Ok(answered)
    }
}

/// Errors that say nothing about the socket itself.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut
            | io::ErrorKind::Interrupted
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
    )
}
