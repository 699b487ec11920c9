//! The control server over TLS over TCP, for agents on networks that block UDP: the same
//! sessions as over QUIC (`session.rs`), on one TLS 1.3 stream per connection, with the same
//! identity, ALPN and pinned certificate. Relay frames travel on that stream as relay records
//! ([`meshlink_proto::control::Record::Relay`]) between the messages, both ways.
//!
//! ```text
//! accept (max_connections, max_unauthenticated and max_unauthenticated_per_ip, shared with
//!   QUIC) ─> TCP_NODELAY, keepalive, TCP_USER_TIMEOUT
//!   ─> TLS 1.3 handshake, ALPN meshlink/1 (the handshake and the hello within hello_timeout)
//!   ─> session::serve ─> close_notify and FIN; the agent's last bytes read and dropped
//! ```
//!
//! A dead agent is noticed about as fast as over QUIC: keepalive probes after
//! [`KEEPALIVE_TIME`] of silence, [`KEEPALIVE_RETRIES`] of them [`KEEPALIVE_INTERVAL`] apart,
//! and [`USER_TIMEOUT`] for data the agent does not acknowledge.
//!
//! Agents fall back to TLS/TCP at the very address they use for QUIC, so the listener takes
//! the QUIC listen address's IP and port by default (`tcp_listen`; TCP and UDP ports are
//! separate spaces).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{timeout, timeout_at};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use crate::identity::Identity;
use crate::relay::{Relaying, SessionLink};
use crate::server::{tls_config, Limits, ServerError, ALPN};
use crate::service::Service;
use crate::session::{self, Admission, Connections, Transport, LINGER};

/// Silence on a connection before the first keepalive probe.
pub const KEEPALIVE_TIME: Duration = Duration::from_secs(1);
/// Time between keepalive probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// Unanswered probes after which the connection is dropped.
pub const KEEPALIVE_RETRIES: u32 = 3;
/// How long sent data may stay unacknowledged before the connection is dropped (Linux).
pub const USER_TIMEOUT: Duration = Duration::from_secs(4);

/// The TLS acceptor: the coordinator's identity, TLS 1.3 only, ring, ALPN [`ALPN`] (the
/// configuration of the QUIC endpoint).
///
/// # Errors
/// [`ServerError::Tls`].
pub fn acceptor(identity: &Identity, relay_sessions: bool) -> Result<TlsAcceptor, ServerError> {
    Ok(TlsAcceptor::from(Arc::new(tls_config(
        identity,
        relay_sessions,
    )?)))
}

/// Sets what every accepted connection needs: no Nagle delay (small messages and relay
/// records go out at once), keepalive and the user timeout (see the module documentation).
///
/// # Errors
/// The operating system's, for an option it refuses.
pub fn configure(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let socket = SockRef::from(stream);
    socket.set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(KEEPALIVE_TIME)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(KEEPALIVE_RETRIES),
    )?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    socket.set_tcp_user_timeout(Some(USER_TIMEOUT))?;
    Ok(())
}

/// Accepts connections until `shutdown` changes to `true` (or its sender is dropped), then
/// stops listening, tells every session to end (code `SHUTDOWN`, in the log) and waits a
/// little for them. `connections` is shared with the QUIC server.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    service: Arc<Service>,
    limits: Limits,
    relaying: Relaying,
    connections: Arc<Connections>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut sessions = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => break,
        };
        let (stream, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors, or a connection reset before it was accepted: the
                // pause keeps the former from becoming a busy loop.
                tracing::debug!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        while sessions.try_join_next().is_some() {}
        let admission = match connections.admit(remote.ip()) {
            Ok(admitted) => admitted,
            Err(refusal) => {
                tracing::debug!(%remote, "connection refused: {refusal}");
                continue;
            }
        };
        if let Err(e) = configure(&stream) {
            tracing::debug!(%remote, "socket options refused: {e}");
            continue;
        }
        let span = tracing::info_span!("session", %remote, transport = "tls", node = tracing::field::Empty);
        let transport = TcpTransport {
            remote,
            shutdown: shutdown.clone(),
        };
        sessions.spawn(
            connection(
                stream,
                transport,
                acceptor.clone(),
                service.clone(),
                limits.clone(),
                relaying.clone(),
                admission,
            )
            .instrument(span),
        );
    }
    drop(listener);
    let drained = timeout(Duration::from_secs(5), async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        sessions.abort_all();
    }
}

#[allow(clippy::too_many_arguments)]
async fn connection(
    stream: TcpStream,
    transport: TcpTransport,
    acceptor: TlsAcceptor,
    service: Arc<Service>,
    limits: Limits,
    relaying: Relaying,
    admission: Admission,
) {
    // One deadline covers the handshake and the hello.
    let deadline = tokio::time::Instant::now() + limits.hello_timeout;
    let handshake = tokio::select! {
        h = timeout_at(deadline, acceptor.accept(stream)) => h,
        () = transport.shutting_down() => return,
    };
    let tls = match handshake {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!("handshake failed: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!("handshake timed out");
            return;
        }
    };
    if let Some(port) = relaying.port_for(tls.get_ref().1.alpn_protocol()) {
        let Some(Admission {
            slot: _slot,
            before_hello,
        }) = port.admit(transport.remote.ip(), admission)
        else {
            return;
        };
        return port.sessions.serve_tls(tls, deadline, before_hello).await;
    }
    let Admission {
        slot: _slot,
        before_hello,
    } = admission;
    // rustls refuses a client that offers only other protocols; one that offers none gets
    // through the handshake, and is turned away here.
    if tls.get_ref().1.alpn_protocol() != Some(ALPN) {
        tracing::debug!("handshake without ALPN {}", String::from_utf8_lossy(ALPN));
        return;
    }
    let (read, write) = tokio::io::split(tls);
    session::serve(
        transport,
        read,
        write,
        &service,
        &limits,
        relaying.relay.as_ref(),
        relaying.grants.as_ref(),
        deadline,
        before_hello,
    )
    .await;
}

/// A TLS/TCP connection as a session's transport: relay frames are records of the stream, and
/// the close code is only logged (the stream has no place for it).
struct TcpTransport {
    remote: SocketAddr,
    shutdown: watch::Receiver<bool>,
}

type Stream = TlsStream<TcpStream>;

impl Transport for TcpTransport {
    type Read = ReadHalf<Stream>;
    type Write = WriteHalf<Stream>;
    const KIND: crate::telemetry::Transport = crate::telemetry::Transport::Tcp;

    fn remote(&self) -> SocketAddr {
        self.remote
    }

    fn datagram_link(&self) -> Option<SessionLink> {
        None
    }

    fn datagram(&self) -> impl Future<Output = Option<Vec<u8>>> + Send {
        std::future::pending()
    }

    fn shutting_down(&self) -> impl Future<Output = ()> + Send {
        let mut shutdown = self.shutdown.clone();
        async move {
            // A dropped sender counts as shutting down, as in `run`.
            let _ = shutdown.wait_for(|stop| *stop).await;
        }
    }

    async fn finish(write: &mut WriteHalf<Stream>) {
        // TLS close_notify, then FIN; the kernel delivers what is queued before it.
        let _ = timeout(LINGER, write.shutdown()).await;
    }

    async fn close(
        self,
        _code: u32,
        _reason: &'static str,
        mut read: ReadHalf<Stream>,
        mut write: WriteHalf<Stream>,
    ) {
        Self::finish(&mut write).await;
        // Closing a socket with unread bytes resets the connection, which can destroy what
        // the agent has not yet read (a Refused, a Revoked): read until the agent closes too.
        let mut sink = [0u8; 4096];
        let _ = timeout(LINGER, async {
            while matches!(read.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_get_keepalive_user_timeout_and_nodelay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        configure(&server).unwrap();
        let socket = SockRef::from(&server);
        assert!(server.nodelay().unwrap());
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), KEEPALIVE_TIME);
        assert_eq!(socket.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), KEEPALIVE_RETRIES);
        #[cfg(target_os = "linux")]
        assert_eq!(socket.tcp_user_timeout().unwrap(), Some(USER_TIMEOUT));
    }
}
