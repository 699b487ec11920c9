//! How a control session reaches its coordinator: QUIC over UDP, or TLS over TCP where UDP is
//! blocked (corporate firewalls), to the same address.
//!
//! [`Transport::connect`] tries QUIC first; when no QUIC connection is up after
//! [`TCP_AFTER`], it races a TLS/TCP connection against it and keeps whichever is up first
//! (TCP also at once when QUIC fails outright). Both pin the coordinator's certificate
//! (`meshlink-tls`), both carry the same framed messages; over TCP, relay frames travel on
//! the same stream as records ([`meshlink_proto::control::RELAY_RECORD`]) instead of as
//! QUIC datagrams. A TCP session notices a dead coordinator through TCP keepalives and
//! `TCP_USER_TIMEOUT` at about the QUIC idle timeout.
//!
//! A session that fell back to TCP does not stay there: every [`QUIC_RETRY`] the control loop
//! asks [`quic_answers`] whether a QUIC connection to the coordinator comes up now (a whole
//! handshake, pinned, then closed), and when it does, ends the TCP session and opens the next
//! one at once, which [`Transport::connect`] makes over QUIC.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshlink_proto::control::RelayTransport;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::tls::{self, Liveness};

/// How long QUIC has alone before TCP joins the race.
pub const TCP_AFTER: Duration = Duration::from_millis(1000);

/// How often a session over TCP checks whether QUIC works again.
pub const QUIC_RETRY: Duration = Duration::from_secs(30);

/// How long such a check waits for a QUIC handshake.
pub const QUIC_PROBE: Duration = Duration::from_secs(2);

/// A TLS/TCP client stream.
pub type Tls = TlsStream<TcpStream>;

/// The writing half of a TLS/TCP session, shared by the control loop (messages) and the
/// relay client (frames).
#[derive(Clone)]
pub struct StreamWriter(Arc<tokio::sync::Mutex<WriteHalf<Tls>>>);

impl std::fmt::Debug for StreamWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StreamWriter")
    }
}

impl StreamWriter {
    /// The writer of a TLS/TCP stream's write half (a control session's, or a relay's).
    #[must_use]
    pub fn new(write: WriteHalf<Tls>) -> Self {
        StreamWriter(Arc::new(tokio::sync::Mutex::new(write)))
    }

    /// Whether both write to the same stream.
    #[must_use]
    pub fn same(&self, other: &StreamWriter) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Writes `bytes` whole (one record), after whatever record is being written.
    ///
    /// # Errors
    /// The stream's error.
    pub async fn write(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut w = self.0.lock().await;
        w.write_all(bytes).await?;
        w.flush().await
    }
}

/// What the relay client sends relay frames on.
#[derive(Debug, Clone)]
pub enum LinkConn {
    /// QUIC datagrams on the session's connection.
    Quic(quinn::Connection),
    /// Records on the session's TLS/TCP stream.
    Stream(StreamWriter),
}

/// An open transport to one coordinator.
pub enum Transport {
    /// QUIC: the connection and its one bidirectional stream.
    Quic {
        /// Kept for the connection's lifetime.
        endpoint: quinn::Endpoint,
        /// The connection.
        conn: quinn::Connection,
        /// Sending half of the stream.
        send: quinn::SendStream,
        /// Receiving half of the stream.
        recv: quinn::RecvStream,
    },
    /// TLS over TCP.
    Tcp {
        /// The coordinator's address.
        remote: SocketAddr,
        /// Reading half.
        read: ReadHalf<Tls>,
        /// Writing half, shared with the relay client.
        write: StreamWriter,
    },
}

impl Transport {
    /// Connects to `target`, pinning `pin`, within `patience`: QUIC, or TLS/TCP when QUIC is
    /// not up within [`TCP_AFTER`] (see the module documentation).
    ///
    /// # Errors
    /// Why neither worked.
    pub async fn connect(
        target: SocketAddr,
        pin: &str,
        patience: Duration,
        liveness: Liveness,
    ) -> Result<Transport, String> {
        let quic = tokio::time::timeout(patience, quic(target, pin, liveness));
        tokio::pin!(quic);
        let quic_err = tokio::select! {
            r = &mut quic => match r {
                Ok(Ok(t)) => return Ok(t),
                Ok(Err(e)) => Some(e),
                Err(_) => Some("timed out".to_string()),
            },
            () = tokio::time::sleep(TCP_AFTER.min(patience)) => None,
        };
        let tcp = tokio::time::timeout(patience, tcp(target, pin, liveness));
        tokio::pin!(tcp);
        match quic_err {
            Some(q) => match tcp.await {
                Ok(Ok(t)) => Ok(t),
                Ok(Err(e)) => Err(format!("QUIC: {q}; TCP: {e}")),
                Err(_) => Err(format!("QUIC: {q}; TCP: timed out")),
            },
            None => {
                let mut tcp_err = None;
                let mut quic_err = None;
                loop {
                    tokio::select! {
                        r = &mut quic, if quic_err.is_none() => match r {
                            Ok(Ok(t)) => return Ok(t),
                            Ok(Err(e)) => quic_err = Some(e),
                            Err(_) => quic_err = Some("timed out".to_string()),
                        },
                        r = &mut tcp, if tcp_err.is_none() => match r {
                            Ok(Ok(t)) => return Ok(t),
                            Ok(Err(e)) => tcp_err = Some(e),
                            Err(_) => tcp_err = Some("timed out".to_string()),
                        },
                    }
                    if let (Some(q), Some(t)) = (&quic_err, &tcp_err) {
                        return Err(format!("QUIC: {q}; TCP: {t}"));
                    }
                }
            }
        }
    }

    /// The coordinator's address as connected.
    #[must_use]
    pub fn remote(&self) -> SocketAddr {
        match self {
            Transport::Quic { conn, .. } => conn.remote_address(),
            Transport::Tcp { remote, .. } => *remote,
        }
    }

    /// What relay frames run over on this transport.
    #[must_use]
    pub fn kind(&self) -> RelayTransport {
        match self {
            Transport::Quic { .. } => RelayTransport::Udp,
            Transport::Tcp { .. } => RelayTransport::Tcp,
        }
    }

    /// What relay frames go out on.
    #[must_use]
    pub fn link_conn(&self) -> LinkConn {
        match self {
            Transport::Quic { conn, .. } => LinkConn::Quic(conn.clone()),
            Transport::Tcp { write, .. } => LinkConn::Stream(write.clone()),
        }
    }

    /// Writes one framed record.
    ///
    /// # Errors
    /// The transport's error, as text.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        match self {
            Transport::Quic { send, .. } => send.write_all(bytes).await.map_err(|e| e.to_string()),
            Transport::Tcp { write, .. } => write.write(bytes).await.map_err(|e| e.to_string()),
        }
    }

    /// Reads what has arrived into `buf`; `Ok(None)` when the coordinator closed the stream.
    /// Cancel-safe.
    ///
    /// # Errors
    /// The transport's error, as text.
    pub async fn read(&mut self, buf: &mut [u8]) -> Result<Option<usize>, String> {
        match self {
            Transport::Quic { recv, .. } => recv.read(buf).await.map_err(|e| e.to_string()),
            Transport::Tcp { read, .. } => match read.read(buf).await {
                Ok(0) => Ok(None),
                Ok(n) => Ok(Some(n)),
                Err(e) => Err(e.to_string()),
            },
        }
    }
}

/// Whether a QUIC connection to `target`, pinned to `pin`, comes up within [`QUIC_PROBE`]: a
/// whole handshake, after which the connection is closed (the coordinator sees a connection
/// that never said hello, which it counts and closes as any other).
pub async fn quic_answers(target: SocketAddr, pin: &str, liveness: Liveness) -> bool {
    match tokio::time::timeout(QUIC_PROBE, quic(target, pin, liveness)).await {
        Ok(Ok(Transport::Quic { endpoint, conn, .. })) => {
            conn.close(0u32.into(), b"probe");
            endpoint.close(0u32.into(), b"probe");
            true
        }
        _ => false,
    }
}

async fn quic(target: SocketAddr, pin: &str, liveness: Liveness) -> Result<Transport, String> {
    let bind: SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| e.to_string())?;
    endpoint.set_default_client_config(tls::client_config(pin, liveness)?);
    let conn = endpoint
        .connect(target, tls::SERVER_NAME)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    Ok(Transport::Quic {
        endpoint,
        conn,
        send,
        recv,
    })
}

/// A TLS/TCP connection to `target` (a coordinator's or a relay's), its socket set up by
/// [`configure_tcp`]; then TLS with `config` for `server_name`.
///
/// # Errors
/// The socket's or the handshake's error, as text.
pub async fn tls_over_tcp(
    target: SocketAddr,
    config: rustls::ClientConfig,
    server_name: &'static str,
    keepalive: Duration,
    idle: Duration,
) -> Result<Tls, String> {
    let stream = TcpStream::connect(target)
        .await
        .map_err(|e| e.to_string())?;
    configure_tcp(&stream, keepalive, idle).map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from(server_name).map_err(|e| e.to_string())?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, stream)
        .await
        .map_err(|e| e.to_string())
}

/// The shortest TCP keepalive: the kernel counts its time and interval in whole seconds, and
/// refuses 0 (`EINVAL`).
pub const MIN_TCP_KEEPALIVE: Duration = Duration::from_secs(1);

/// No Nagle, a TCP keepalive after `keepalive` of silence (at least [`MIN_TCP_KEEPALIVE`];
/// three unanswered: dead) and `TCP_USER_TIMEOUT` `idle` (milliseconds: data unacknowledged
/// that long ends the connection), so a dead server is noticed about when QUIC would notice
/// it. A holder's QUIC keepalive is a fraction of a second; over TCP its heartbeats, which
/// are data, are what `idle` bounds.
///
/// # Errors
/// What the socket refused.
pub fn configure_tcp(stream: &TcpStream, keepalive: Duration, idle: Duration) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let sock = socket2::SockRef::from(stream);
    let keepalive = keepalive.max(MIN_TCP_KEEPALIVE);
    let probes = socket2::TcpKeepalive::new()
        .with_time(keepalive)
        .with_interval(keepalive)
        .with_retries(3);
    sock.set_tcp_keepalive(&probes)?;
    sock.set_tcp_user_timeout(Some(idle))
}

async fn tcp(target: SocketAddr, pin: &str, liveness: Liveness) -> Result<Transport, String> {
    let config = meshlink_tls::rustls_client_config(pin).map_err(|e| e.to_string())?;
    let tls = tls_over_tcp(
        target,
        config,
        tls::SERVER_NAME,
        liveness.keepalive,
        liveness.idle.max(Duration::from_secs(1)),
    )
    .await?;
    let (read, write) = tokio::io::split(tls);
    Ok(Transport::Tcp {
        remote: target,
        read,
        write: StreamWriter(Arc::new(tokio::sync::Mutex::new(write))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A holder of a mesh of several coordinators keeps a QUIC keepalive of 125 ms: over TCP
    /// that was a keepalive of 0 s, which the kernel refuses, so no TCP session could open.
    /// It is raised to a second; the user timeout stays as short as asked.
    #[tokio::test]
    async fn a_keepalive_below_a_second_is_raised_to_one() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        configure_tcp(
            &stream,
            Duration::from_millis(125),
            Duration::from_millis(625),
        )
        .unwrap();
        let sock = socket2::SockRef::from(&stream);
        assert_eq!(sock.tcp_keepalive_time().unwrap(), MIN_TCP_KEEPALIVE);
        assert_eq!(sock.tcp_keepalive_interval().unwrap(), MIN_TCP_KEEPALIVE);
        assert_eq!(
            sock.tcp_user_timeout().unwrap(),
            Some(Duration::from_millis(625))
        );
        assert!(stream.nodelay().unwrap());
    }
}
